//! Namespace policy: what a namespace's keys live by, and how outcomes are kept.
//!
//! Policies arrive as plain serde structs with named defaults ([`NamespaceConfig`]) and are
//! validated into [`NamespacePolicy`] before the store uses them, so a bad value is refused at
//! start with an error naming the namespace and the field.

use serde::{Deserialize, Serialize};

use crate::record::{Body, Outcome};

/// Longest namespace name accepted, in bytes.
pub const NAMESPACE_LEN_MAX: usize = 64;
/// Absolute cap on key and principal length, whatever a policy says (bytes).
pub const KEY_LEN_ABSOLUTE_MAX: usize = 1024;
/// Absolute cap on a stored outcome, whatever a policy says (bytes).
pub const OUTCOME_BYTES_ABSOLUTE_MAX: usize = 8 << 20;

/// How a namespace keeps response bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode", content = "fields")]
pub enum Keep {
    /// The body as returned.
    #[default]
    Full,
    /// Only length and BLAKE3 digest (responses that must not be stored at all).
    Digest,
    /// A JSON body with the named fields (at any depth) replaced by `"[redacted]"`; a body that
    /// is not JSON is kept as a digest, never stored unredacted.
    Redact(Vec<String>),
}

/// An inclusive range of statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRange {
    /// Lowest status in the range.
    pub from: u16,
    /// Highest status in the range.
    pub to: u16,
}

impl StatusRange {
    /// `from..=to`.
    pub const fn new(from: u16, to: u16) -> Self {
        Self { from, to }
    }

    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.from..=self.to).contains(&status)
    }
}

/// A namespace's policy as written in config, with documented defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Namespace name (1 to 64 bytes of `a-z0-9-_.`).
    pub name: String,
    /// How long a key is remembered after its first claim. Default 24 h.
    pub ttl_ms: u64,
    /// In-flight lease granted with a claim. Default 30 s.
    pub lease_ms: u64,
    /// Longest lease an extension may ask for. Default 10 min.
    pub lease_max_ms: u64,
    /// Longest idempotency key, bytes. Default 255.
    pub key_len_max: usize,
    /// Longest principal, bytes. Default 255.
    pub principal_len_max: usize,
    /// Largest stored outcome (headers + body), bytes. Default 1 MiB.
    pub outcome_bytes_max: usize,
    /// Statuses whose outcome is stored and replayed. Default 200-299.
    pub stored_statuses: Vec<StatusRange>,
    /// Statuses stored as *indeterminate* (a side effect may have happened). Default none; a
    /// payments API would list 500-599 here.
    pub indeterminate_statuses: Vec<StatusRange>,
    /// Response headers kept with an outcome (case-insensitive). Default Content-Type,
    /// Location, ETag.
    pub headers_allowed: Vec<String>,
    /// How bodies are kept. Default full.
    pub keep: Keep,
    /// Before granting a key never seen in this region, ask every reachable peer about it
    /// (a bounded wait): one round trip between regions on first claims, for fewer duplicates
    /// when callers cannot say which region they tried before (a global load balancer).
    /// Default off.
    pub lookup_on_miss: bool,
    /// What a claim gets when a lookup it waited for (failover or on miss) found no answer in
    /// time. Default: granted anyway.
    pub lookup_unanswered: LookupUnanswered,
}

/// What to do when a lookup before a claim gets no answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LookupUnanswered {
    /// Decide on what this region knows (available; if both regions ran the operation, the
    /// duplicate is flagged later).
    #[default]
    Grant,
    /// Answer `Unavailable`: the caller retries later.
    Unavailable,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            name: "default".into(),
            ttl_ms: 24 * 3600 * 1000,
            lease_ms: 30_000,
            lease_max_ms: 600_000,
            key_len_max: 255,
            principal_len_max: 255,
            outcome_bytes_max: 1 << 20,
            stored_statuses: vec![StatusRange::new(200, 299)],
            indeterminate_statuses: Vec::new(),
            headers_allowed: vec!["content-type".into(), "location".into(), "etag".into()],
            keep: Keep::Full,
            lookup_on_miss: false,
            lookup_unanswered: LookupUnanswered::Grant,
        }
    }
}

impl NamespaceConfig {
    /// A namespace with default policy.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// Why a namespace config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("namespace {namespace:?}: {field}: {reason}")]
pub struct PolicyError {
    /// The namespace.
    pub namespace: String,
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// What happens to a completion, by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Stored and replayed.
    Store,
    /// Stored as indeterminate.
    Indeterminate,
    /// Not stored: the key is released so a corrected retry runs.
    Release,
}

/// A validated namespace policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePolicy {
    config: NamespaceConfig,
}

impl NamespacePolicy {
    /// Validates a config.
    pub fn new(config: NamespaceConfig) -> Result<Self, PolicyError> {
        let err = |field: &'static str, reason: &str| PolicyError {
            namespace: config.name.clone(),
            field,
            reason: reason.to_owned(),
        };
        let name_ok = !config.name.is_empty()
            && config.name.len() <= NAMESPACE_LEN_MAX
            && config.name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
            });
        if !name_ok {
            return Err(err("name", "1 to 64 bytes of a-z, 0-9, '-', '_', '.'"));
        }
        if config.ttl_ms == 0 {
            return Err(err("ttl_ms", "must be positive"));
        }
        if config.lease_ms == 0 || config.lease_ms > config.ttl_ms {
            return Err(err("lease_ms", "must be positive and at most ttl_ms"));
        }
        if config.lease_max_ms < config.lease_ms || config.lease_max_ms > config.ttl_ms {
            return Err(err("lease_max_ms", "must lie between lease_ms and ttl_ms"));
        }
        if config.key_len_max == 0 || config.key_len_max > KEY_LEN_ABSOLUTE_MAX {
            return Err(err("key_len_max", "must lie between 1 and 1024"));
        }
        if config.principal_len_max > KEY_LEN_ABSOLUTE_MAX {
            return Err(err("principal_len_max", "must be at most 1024"));
        }
        if config.outcome_bytes_max > OUTCOME_BYTES_ABSOLUTE_MAX {
            return Err(err("outcome_bytes_max", "must be at most 8 MiB"));
        }
        for r in config
            .stored_statuses
            .iter()
            .chain(&config.indeterminate_statuses)
        {
            if r.from > r.to || r.from < 100 || r.to > 999 {
                return Err(err("statuses", "ranges must be ordered and within 100-999"));
            }
        }
        let mut config = config;
        for h in &mut config.headers_allowed {
            *h = h.to_ascii_lowercase();
        }
        Ok(Self { config })
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The config it was built from (header names lower-cased).
    pub fn config(&self) -> &NamespaceConfig {
        &self.config
    }

    /// Key TTL, ms.
    pub fn ttl_ms(&self) -> u64 {
        self.config.ttl_ms
    }

    /// Lease granted with a claim, ms.
    pub fn lease_ms(&self) -> u64 {
        self.config.lease_ms
    }

    /// What a completion with `status` becomes.
    pub fn disposition(&self, status: u16) -> Disposition {
        if self
            .config
            .indeterminate_statuses
            .iter()
            .any(|r| r.contains(status))
        {
            Disposition::Indeterminate
        } else if self
            .config
            .stored_statuses
            .iter()
            .any(|r| r.contains(status))
        {
            Disposition::Store
        } else {
            Disposition::Release
        }
    }

    /// The outcome as this namespace keeps it: allow-listed headers only, body kept, digested
    /// or redacted.
    pub fn shape_outcome(&self, outcome: Outcome) -> Outcome {
        let headers = outcome
            .headers
            .into_iter()
            .filter(|(k, _)| {
                self.config
                    .headers_allowed
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(k))
            })
            .collect();
        let body = match (&self.config.keep, outcome.body) {
            (_, Body::Digest { len, blake3 }) => Body::Digest { len, blake3 },
            (Keep::Full, body) => body,
            (Keep::Digest, Body::Full(b) | Body::Redacted(b)) => digest(&b),
            (Keep::Redact(fields), Body::Full(b) | Body::Redacted(b)) => redact(&b, fields),
        };
        Outcome {
            status: outcome.status,
            headers,
            body,
        }
    }
}

fn digest(b: &[u8]) -> Body {
    Body::Digest {
        len: b.len() as u64,
        blake3: *blake3::hash(b).as_bytes(),
    }
}

fn redact(b: &[u8], fields: &[String]) -> Body {
    fn walk(v: &mut serde_json::Value, fields: &[String]) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    if fields.iter().any(|f| f == k) {
                        *val = serde_json::Value::String("[redacted]".into());
                    } else {
                        walk(val, fields);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|i| walk(i, fields)),
            _ => {}
        }
    }
    match serde_json::from_slice::<serde_json::Value>(b) {
        Ok(mut v) => {
            walk(&mut v, fields);
            match serde_json::to_vec(&v) {
                Ok(out) => Body::Redacted(out),
                Err(_) => digest(b),
            }
        }
        Err(_) => digest(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let p = NamespacePolicy::new(NamespaceConfig::named("pay")).unwrap();
        assert_eq!(p.ttl_ms(), 86_400_000);
        assert_eq!(p.disposition(201), Disposition::Store);
        assert_eq!(p.disposition(422), Disposition::Release);
        assert_eq!(p.disposition(503), Disposition::Release);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = NamespaceConfig::named("pay");
        c.lease_ms = 0;
        let e = NamespacePolicy::new(c).unwrap_err();
        assert_eq!(e.field, "lease_ms");
        assert!(e.to_string().contains("pay"));
        assert!(NamespacePolicy::new(NamespaceConfig::named("Bad Name")).is_err());
    }

    #[test]
    fn indeterminate_statuses_take_precedence() {
        let mut c = NamespaceConfig::named("pay");
        c.indeterminate_statuses = vec![StatusRange::new(500, 599)];
        let p = NamespacePolicy::new(c).unwrap();
        assert_eq!(p.disposition(502), Disposition::Indeterminate);
    }

    #[test]
    fn headers_are_allow_listed_and_bodies_redacted() {
        let mut c = NamespaceConfig::named("pay");
        c.keep = Keep::Redact(vec!["card".into()]);
        let p = NamespacePolicy::new(c).unwrap();
        let o = Outcome {
            status: 200,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Set-Cookie".into(), "s=1".into()),
            ],
            body: Body::Full(br#"{"id":1,"src":{"card":"4242"}}"#.to_vec()),
        };
        let shaped = p.shape_outcome(o);
        assert_eq!(shaped.headers.len(), 1);
        assert_eq!(
            shaped.body,
            Body::Redacted(br#"{"id":1,"src":{"card":"[redacted]"}}"#.to_vec())
        );
        // Not JSON: never stored unredacted.
        let raw = p.shape_outcome(Outcome::new(200, "card=4242"));
        assert!(matches!(raw.body, Body::Digest { len: 9, .. }));
    }
}
