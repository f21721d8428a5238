//! `idem proxy`: [`IdempotencyLayer`] as a sidecar reverse proxy in
//! front of any HTTP API.
//!
//! Requests go to the upstream unchanged (hop-by-hop headers aside); the layer decides first.
//! The upstream's answers come back streamed. An upstream that does not answer in time gives
//! 504 (stored as *indeterminate* by the embedded store's policy: the request may have taken
//! effect), one that cannot be reached gives 502 (the key is released: nothing ran).
//!
//! Keys live in an embedded store (only this proxy process deduplicates) or in a region
//! daemon shared by every replica of the API (`--store`).
//!
//! The principal comes from `--principal-header` when set, honoured only from trusted peers
//! (loopback by default): from anyone else the header is stripped before anything reads it,
//! so a client cannot claim another principal's keys.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;

use super::{
    EmbeddedStore, IdempotencyLayer, LayerConfig, NamespaceLimits, PrincipalFrom, RemoteStore,
};
use crate::clock::RegionId;
use crate::http::problem::Problem;
use crate::store::policy::{NamespaceConfig, StatusRange};
use crate::store::StoreConfig;

/// The namespace the embedded store keeps the proxy's keys in.
pub const PROXY_NAMESPACE: &str = "proxy";

/// The principal of every request when no principal header is configured.
pub const DEFAULT_PRINCIPAL: &str = "default";

/// `idem proxy`'s settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The API behind the proxy (scheme, host, port; a path prefix is kept).
    pub upstream: reqwest::Url,
    /// Where keys are kept.
    pub store: ProxyStore,
    /// The header carrying the principal, if any.
    pub principal_header: Option<HeaderName>,
    /// Peers whose principal header is honoured.
    pub trusted: Vec<ipnet::IpNet>,
    /// Path prefixes on which POST and PATCH require a key.
    pub required: Vec<String>,
    /// Wait this long for a request in flight instead of answering 409.
    pub in_flight_wait: Option<Duration>,
    /// How long the upstream may take to answer (then 504).
    pub upstream_timeout: Duration,
    /// Decide and report, never block.
    pub shadow: bool,
}

impl ProxyConfig {
    /// Defaults: loopback is trusted, no key required anywhere, no wait, 60 s upstream
    /// timeout, enforcing.
    pub fn new(listen: SocketAddr, upstream: reqwest::Url, store: ProxyStore) -> Self {
        Self {
            listen,
            upstream,
            store,
            principal_header: None,
            trusted: vec![
                "127.0.0.0/8".parse().expect("a valid network"),
                "::1/128".parse().expect("a valid network"),
            ],
            required: Vec::new(),
            in_flight_wait: None,
            upstream_timeout: Duration::from_secs(60),
            shadow: false,
        }
    }
}

/// Where the proxy keeps its keys.
#[derive(Debug, Clone)]
pub enum ProxyStore {
    /// An embedded store in this directory: only this proxy process deduplicates.
    Embedded(PathBuf),
    /// A region daemon shared by every replica of the API (and its other regions, for
    /// failover), in `namespace`, with `token`.
    Remote {
        /// The daemons, one per region.
        endpoints: Vec<crate::client::Endpoint>,
        /// The namespace (its policy decides what is stored; its limits are the defaults).
        namespace: String,
        /// A token for the namespace.
        token: String,
    },
}

/// The embedded store's config: one namespace, in which an upstream timeout (504) is stored
/// as indeterminate.
pub fn store_config() -> StoreConfig {
    let mut ns = NamespaceConfig::named(PROXY_NAMESPACE);
    ns.indeterminate_statuses = vec![StatusRange::new(504, 504)];
    StoreConfig {
        namespaces: vec![ns],
        ..StoreConfig::new(RegionId::new("local").expect("a valid region id"), &[])
    }
}

/// Runs the proxy until `shutdown` resolves. `stdout` gets one line, `idem: proxying
/// <listen> to <upstream>`, once the listener is bound.
pub async fn run(
    config: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let principal = match &config.principal_header {
        Some(h) => PrincipalFrom::Header(h.clone()),
        None => PrincipalFrom::Fixed(DEFAULT_PRINCIPAL.into()),
    };
    let (layer, embedded) = match &config.store {
        ProxyStore::Embedded(dir) => {
            let store = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || EmbeddedStore::open(&dir, store_config())
            })
            .await
            .context("recovery thread")??;
            let layer = IdempotencyLayer::new(
                store.clone(),
                layer_config(&config, PROXY_NAMESPACE, principal),
            )?;
            (layer, Some(store))
        }
        ProxyStore::Remote {
            endpoints,
            namespace,
            token,
        } => {
            let client = crate::client::ClientConfig::new(endpoints.clone(), namespace, token);
            let store = RemoteStore::new(client, NamespaceLimits::daemon_defaults())
                .context("the store client")?;
            let layer = IdempotencyLayer::new(store, layer_config(&config, namespace, principal))?;
            (layer, None)
        }
    };
    let upstream = Upstream::new(config.upstream.clone(), config.upstream_timeout)?;
    let strip = StripPrincipal {
        header: config.principal_header.clone(),
        trusted: config.trusted.clone(),
    };
    let app = Router::new()
        .fallback_service(tower::service_fn(move |req: Request<Body>| {
            let upstream = upstream.clone();
            async move { Ok::<_, std::convert::Infallible>(upstream.forward(req).await) }
        }))
        .layer(layer)
        .layer(axum::middleware::map_request(move |req: Request<Body>| {
            let strip = strip.clone();
            async move { strip.apply(req) }
        }));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    println!(
        "idem: proxying http://{} to {}",
        listener.local_addr()?,
        config.upstream
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving")?;
    // An embedded store flushes, writes its hint files and stops its threads when the last
    // handle goes.
    tokio::task::spawn_blocking(move || drop(embedded))
        .await
        .context("closing the store")?;
    Ok(())
}

fn layer_config(config: &ProxyConfig, namespace: &str, principal: PrincipalFrom) -> LayerConfig {
    let mut c = LayerConfig::new(namespace, principal);
    c.required = config.required.clone();
    c.in_flight_wait = config.in_flight_wait;
    c.shadow = config.shadow;
    c
}

/// Removes the principal header from requests of untrusted peers.
#[derive(Clone)]
struct StripPrincipal {
    header: Option<HeaderName>,
    trusted: Vec<ipnet::IpNet>,
}

impl StripPrincipal {
    fn apply(&self, mut req: Request<Body>) -> Request<Body> {
        let Some(h) = &self.header else {
            return req;
        };
        let peer: Option<IpAddr> = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let trusted = peer.is_some_and(|ip| self.trusted.iter().any(|n| n.contains(&ip)));
        if !trusted {
            req.headers_mut().remove(h);
        }
        req
    }
}

/// The API behind the proxy.
#[derive(Clone)]
struct Upstream {
    base: reqwest::Url,
    http: reqwest::Client,
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1).
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

impl Upstream {
    fn new(base: reqwest::Url, timeout: Duration) -> anyhow::Result<Self> {
        let tls = crate::client::tls_config(None).map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the upstream client")?;
        Ok(Self { base, http })
    }

    async fn forward(&self, req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}{}", parts.uri.path()));
        url.set_query(parts.uri.query());
        let mut out = self.http.request(parts.method, url);
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) {
                out = out.header(name, value);
            }
        }
        if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            out = out.header("x-forwarded-for", peer.ip().to_string());
        }
        let out = out.body(reqwest::Body::wrap_stream(body.into_data_stream()));
        match out.send().await {
            Ok(r) => {
                let mut answer = Response::builder().status(r.status());
                for (name, value) in r.headers() {
                    if !hop_by_hop(name) && name != header::CONTENT_LENGTH {
                        answer = answer.header(name, value);
                    }
                }
                answer
                    .body(Body::from_stream(r.bytes_stream()))
                    .unwrap_or_else(|e| upstream_problem(StatusCode::BAD_GATEWAY, e.to_string()))
            }
            Err(e) if e.is_timeout() => upstream_problem(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the upstream did not answer in time: {e}"),
            ),
            Err(e) => upstream_problem(
                StatusCode::BAD_GATEWAY,
                format!("the upstream could not be reached: {e}"),
            ),
        }
    }
}

fn upstream_problem(status: StatusCode, detail: String) -> Response<Body> {
    let kind = if status == StatusCode::GATEWAY_TIMEOUT {
        "upstream-timeout"
    } else {
        "upstream-unreachable"
    };
    Problem::new(status, kind, "Upstream failed", detail).into_response()
}
