//! The daemon's configuration: a TOML file read into serde structs with documented defaults,
//! then checked as a whole. Every refusal names the file and the field.
//!
//! ```toml
//! region = "eu1"                 # required with a file: this region's id
//! data_dir = "/var/lib/idem"     # default "idem-data", relative to the working directory
//!
//! [http]
//! listen = "0.0.0.0:7070"        # default 127.0.0.1:7070
//! # tls = { cert = "server.pem", key = "server.key" }   # PEM files; default plain HTTP
//!
//! [operator]
//! tokens = ["..."]               # bearer tokens for operator endpoints
//!
//! [[namespaces]]
//! name = "payments"
//! tokens = ["..."]               # bearer tokens for this namespace only
//! policy = { ttl_ms = 86400000, lease_ms = 30000, indeterminate_statuses = [{ from = 500, to = 599 }] }
//! ```
//!
//! `docs/operations.md` lists every field with its default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::clock::{ClockConfig, RegionId};
use crate::store::log::LogConfig;
use crate::store::{NamespaceConfig, NamespacePolicy, StoreConfig};

/// The region id used when no config file is given.
pub const DEV_REGION: &str = "dev";
/// The namespace served when no config file is given.
pub const DEV_NAMESPACE: &str = "default";
/// The namespace token used when no config file is given (development only: the store then
/// listens on loopback).
pub const DEV_TOKEN: &str = "dev-token-not-secret";
/// The operator token used when no config file is given.
pub const DEV_OPERATOR_TOKEN: &str = "dev-operator-not-secret";
/// Largest value of a count limit (requests or connections at once).
pub const COUNT_LIMIT_MAX: usize = 1 << 20;
/// Shortest bearer token accepted in a config file, in bytes.
pub const TOKEN_LEN_MIN: usize = 16;

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This region's id (1 to 15 bytes of `a-z0-9-_`). Required in a file.
    pub region: RegionId,
    /// Where the log and hint files live. Default `idem-data` (relative to the working
    /// directory).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Operator access.
    #[serde(default)]
    pub operator: OperatorConfig,
    /// Limits on requests.
    #[serde(default)]
    pub limits: Limits,
    /// Store tuning.
    #[serde(default)]
    pub store: StoreSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// The namespaces served (at least one).
    pub namespaces: Vec<NamespaceSection>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("idem-data")
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on. Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Serve HTTPS with these PEM files (rustls, ring provider). Default: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Whether `GET /metrics` needs an operator token. Default false (metrics hold counts,
    /// never keys or outcomes).
    pub metrics_need_token: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            tls: None,
            metrics_need_token: false,
        }
    }
}

/// Certificate and key for HTTPS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Operator access.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Bearer tokens allowed on operator endpoints (and to read any namespace). Default none:
    /// operator endpoints answer 401.
    #[serde(default)]
    pub tokens: Vec<String>,
}

/// Limits on what a request may cost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body, bytes. Default 12 MiB (an 8 MiB outcome in base64 fits). Larger
    /// bodies get 413.
    pub request_bytes_max: usize,
    /// Authenticated requests served at once; more wait in line (within their time limit).
    /// Default 1024. With `request_bytes_max` it bounds the memory request bodies take.
    pub concurrent_requests_max: usize,
    /// Connections open at once; more wait in the kernel's backlog. Default 2048. Keep it
    /// below the process's file descriptor limit.
    pub connections_max: usize,
    /// How long a request may take in all, ms (including its wait for the log to be durable).
    /// Default 10 000. Past it the answer is 503: a claim may still have been granted, which
    /// the caller's retry with the same attempt token resumes.
    pub request_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: 12 << 20,
            concurrent_requests_max: 1024,
            connections_max: 2048,
            request_timeout_ms: 10_000,
        }
    }
}

/// Store tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Largest clock offset tolerated between regions, ms. Default 500.
    pub max_drift_ms: u64,
    /// Log segment size, bytes. Default 64 MiB.
    pub segment_bytes: u64,
    /// How long mutations stay servable to peers, ms. Default 7 days.
    pub log_retention_ms: u64,
    /// How often garbage collection looks at the oldest segment, ms. Default 60 000.
    pub gc_interval_ms: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            max_drift_ms: ClockConfig::default().max_drift_ms,
            segment_bytes: LogConfig::default().segment_bytes,
            log_retention_ms: 7 * 24 * 3600 * 1000,
            gc_interval_ms: 60_000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` (default) or `json` (one object per line).
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` (default) or `idem=debug,info`. `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A namespace: its name, its tokens and its policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSection {
    /// Namespace name (1 to 64 bytes of `a-z0-9-_.`).
    pub name: String,
    /// Bearer tokens that may use this namespace, and no other.
    pub tokens: Vec<String>,
    /// The namespace's policy; every field has a default (see `NamespaceConfig`).
    #[serde(default)]
    pub policy: PolicySection,
}

/// A namespace policy in config: [`NamespaceConfig`] without its name (the name is the
/// namespace's).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct PolicySection(pub NamespaceConfig);

/// Why a config was refused: the file, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {field}: {message}", file.display())]
pub struct ConfigError {
    /// The config file (or `<defaults>` for the development config).
    pub file: PathBuf,
    /// The field, as a path (`namespaces[0].policy.ttl_ms`), with the line when known.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks config text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            field: location(text, e.span()),
            message: e.message().to_owned(),
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path_text = e.path().to_string();
            let inner = e.into_inner();
            let at = location(text, inner.span());
            ConfigError {
                file: path.to_owned(),
                field: if path_text == "." {
                    at
                } else if at.is_empty() {
                    path_text
                } else {
                    format!("{path_text} ({at})")
                },
                message: inner.message().to_owned(),
            }
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// The development config: region `dev`, data under `./idem-data`, loopback only, one
    /// namespace `default` with a well-known token.
    pub fn development() -> Config {
        Config {
            region: RegionId::new(DEV_REGION).expect("a valid region id"),
            data_dir: default_data_dir(),
            http: HttpConfig::default(),
            operator: OperatorConfig {
                tokens: vec![DEV_OPERATOR_TOKEN.into()],
            },
            limits: Limits::default(),
            store: StoreSection::default(),
            log: LogSection::default(),
            namespaces: vec![NamespaceSection {
                name: DEV_NAMESPACE.into(),
                tokens: vec![DEV_TOKEN.into()],
                policy: PolicySection::default(),
            }],
        }
    }

    /// Checks what serde cannot: names, tokens, policies and limits.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |field: String, message: String| ConfigError {
            file: path.to_owned(),
            field,
            message,
        };
        if self.namespaces.is_empty() {
            return Err(err(
                "namespaces".into(),
                "at least one [[namespaces]] entry is needed".into(),
            ));
        }
        let mut token_owner: BTreeMap<String, String> = BTreeMap::new();
        let mut claim_token = |token: &str, field: String| -> Result<(), ConfigError> {
            if token.len() < TOKEN_LEN_MIN {
                return Err(err(
                    field,
                    format!("tokens must be at least {TOKEN_LEN_MIN} bytes"),
                ));
            }
            if token.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(err(
                    field,
                    "tokens are printable ASCII without spaces".into(),
                ));
            }
            if let Some(other) = token_owner.insert(token.to_owned(), field.clone()) {
                return Err(err(
                    field,
                    format!("the same token is also {other}: a token grants one namespace or operator access, never both"),
                ));
            }
            Ok(())
        };
        for (i, t) in self.operator.tokens.iter().enumerate() {
            claim_token(t, format!("operator.tokens[{i}]"))?;
        }
        let mut names = BTreeMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if ns.name == "." || ns.name == ".." {
                return Err(err(
                    format!("namespaces[{i}].name"),
                    "\".\" and \"..\" cannot appear in a URL path".into(),
                ));
            }
            if let Some(first) = names.insert(ns.name.as_str(), i) {
                return Err(err(
                    format!("namespaces[{i}].name"),
                    format!("namespace {:?} is also namespaces[{first}]", ns.name),
                ));
            }
            if ns.tokens.is_empty() {
                return Err(err(
                    format!("namespaces[{i}].tokens"),
                    "a namespace needs at least one token".into(),
                ));
            }
            for (j, t) in ns.tokens.iter().enumerate() {
                claim_token(t, format!("namespaces[{i}].tokens[{j}]"))?;
            }
            let default_name = NamespaceConfig::default().name;
            if ns.policy.0.name != default_name && ns.policy.0.name != ns.name {
                return Err(err(
                    format!("namespaces[{i}].policy.name"),
                    "leave it out: the policy takes the namespace's name".into(),
                ));
            }
            NamespacePolicy::new(self.namespace_config(i)).map_err(|e| {
                err(
                    format!("namespaces[{i}].policy.{}", e.field),
                    format!("namespace {:?}: {}", e.namespace, e.reason),
                )
            })?;
        }
        if self.store.max_drift_ms == 0 || self.store.max_drift_ms > 60_000 {
            return Err(err(
                "store.max_drift_ms".into(),
                "must be 1 to 60000".into(),
            ));
        }
        if !(1 << 20..=u32::MAX as u64).contains(&self.store.segment_bytes) {
            return Err(err(
                "store.segment_bytes".into(),
                format!("must be 1 MiB to {} bytes", u32::MAX),
            ));
        }
        if self.store.gc_interval_ms == 0 {
            return Err(err(
                "store.gc_interval_ms".into(),
                "must be positive".into(),
            ));
        }
        let largest_outcome = (0..self.namespaces.len())
            .map(|i| self.namespace_config(i).outcome_bytes_max)
            .max()
            .unwrap_or(0);
        // Base64 grows a body by 4/3; headers and JSON framing need some room on top.
        let needed = largest_outcome / 3 * 4 + (64 << 10);
        if self.limits.request_bytes_max < needed {
            return Err(err(
                "limits.request_bytes_max".into(),
                format!("must be at least {needed} so that the largest outcome a namespace stores fits (in base64)"),
            ));
        }
        for (field, value) in [
            (
                "limits.concurrent_requests_max",
                self.limits.concurrent_requests_max,
            ),
            ("limits.connections_max", self.limits.connections_max),
        ] {
            if !(1..=COUNT_LIMIT_MAX).contains(&value) {
                return Err(err(field.into(), format!("must be 1 to {COUNT_LIMIT_MAX}")));
            }
        }
        if !(100..=600_000).contains(&self.limits.request_timeout_ms) {
            return Err(err(
                "limits.request_timeout_ms".into(),
                "must be 100 to 600000".into(),
            ));
        }
        Ok(())
    }

    /// Namespace `i`'s policy config, named after it.
    fn namespace_config(&self, i: usize) -> NamespaceConfig {
        let ns = &self.namespaces[i];
        NamespaceConfig {
            name: ns.name.clone(),
            ..ns.policy.0.clone()
        }
    }

    /// The store's config.
    pub fn store_config(&self) -> StoreConfig {
        let mut c = StoreConfig::new(self.region, &[]);
        c.clock = ClockConfig {
            max_drift_ms: self.store.max_drift_ms,
        };
        c.namespaces = (0..self.namespaces.len())
            .map(|i| self.namespace_config(i))
            .collect();
        c.log.segment_bytes = self.store.segment_bytes;
        c.log_retention_ms = self.store.log_retention_ms;
        c
    }
}

/// `line L, column C` of a byte span, or empty.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let upto = &text[..span.start.min(text.len())];
    let line = upto.matches('\n').count() + 1;
    let column = upto.len() - upto.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
region = "eu1"
data_dir = "data/eu1"

[operator]
tokens = ["operator-token-0123456789"]

[[namespaces]]
name = "payments"
tokens = ["payments-token-0123456789"]
policy = { ttl_ms = 3600000, indeterminate_statuses = [{ from = 500, to = 599 }] }

[[namespaces]]
name = "orders"
tokens = ["orders-token-0123456789"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("idem.toml"), text)
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.region.as_str(), "eu1");
        assert_eq!(c.http.listen, "127.0.0.1:7070".parse().unwrap());
        assert_eq!(c.limits.request_timeout_ms, 10_000);
        let sc = c.store_config();
        assert_eq!(sc.namespaces[0].name, "payments");
        assert_eq!(sc.namespaces[0].ttl_ms, 3_600_000);
        assert_eq!(sc.namespaces[1].ttl_ms, 24 * 3600 * 1000);
    }

    #[test]
    fn the_development_config_passes_its_own_checks() {
        Config::development()
            .check(Path::new("<defaults>"))
            .unwrap();
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = parse(&GOOD.replace("ttl_ms = 3600000", "ttl_ms = \"1h\"")).unwrap_err();
        assert_eq!(e.file, Path::new("idem.toml"));
        assert!(e.field.starts_with("namespaces[0].policy.ttl_ms"), "{e}");
        assert!(e.field.contains("line 11"), "{e}");

        let e = parse(&GOOD.replace("data_dir", "data_dri")).unwrap_err();
        assert!(e.message.contains("data_dri"), "{e}");

        let e = parse(&GOOD.replace("region = \"eu1\"", "region = \"EU\"")).unwrap_err();
        assert!(e.field.starts_with("region"), "{e}");

        let e = parse(&GOOD.replace("ttl_ms = 3600000", "ttl_ms = 0")).unwrap_err();
        assert_eq!(e.field, "namespaces[0].policy.ttl_ms", "{e}");

        let e = parse("region = \"eu1\"\nnamespaces = []\n").unwrap_err();
        assert_eq!(e.field, "namespaces");

        let e = parse("region = \"eu1\"\n[[namespaces]\n").unwrap_err();
        assert!(e.field.contains("line 2"), "{e}");
    }

    #[test]
    fn tokens_are_long_unique_and_single_purpose() {
        let e = parse(&GOOD.replace("orders-token-0123456789", "short")).unwrap_err();
        assert_eq!(e.field, "namespaces[1].tokens[0]");
        let e = parse(&GOOD.replace("orders-token-0123456789", "payments-token-0123456789"))
            .unwrap_err();
        assert_eq!(e.field, "namespaces[1].tokens[0]");
        assert!(e.message.contains("namespaces[0].tokens[0]"), "{e}");
        let e = parse(&GOOD.replace("orders-token-0123456789", "operator-token-0123456789"))
            .unwrap_err();
        assert!(e.message.contains("operator.tokens[0]"), "{e}");
        let e = parse(&GOOD.replace("name = \"orders\"", "name = \"payments\"")).unwrap_err();
        assert_eq!(e.field, "namespaces[1].name");
    }

    #[test]
    fn count_limits_are_bounded() {
        let text = format!("{GOOD}\n[limits]\nconnections_max = 9999999999999999999\n");
        assert_eq!(parse(&text).unwrap_err().field, "limits.connections_max");
        let text = format!("{GOOD}\n[limits]\nconcurrent_requests_max = 0\n");
        assert_eq!(
            parse(&text).unwrap_err().field,
            "limits.concurrent_requests_max"
        );
    }

    #[test]
    fn the_request_limit_must_fit_the_largest_outcome() {
        let text = format!("{GOOD}\n[limits]\nrequest_bytes_max = 1000\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.field, "limits.request_bytes_max");
    }
}
