//! `idem proxy`: [`IdempotencyLayer`] as a sidecar reverse proxy in
//! front of any HTTP API.
//!
//! Requests go to the upstream unchanged (hop-by-hop headers, and those `Connection` names,
//! aside; paths with dot or empty segments are refused); the layer decides first. The
//! upstream's answers come back streamed. An upstream whose answer's head does not come in time
//! gives 504, one that fails after the request was sent gives 502 (both stored as
//! *indeterminate* by the embedded store's policy: the request may have taken effect), one that
//! cannot be reached gives 503 (the key is released: nothing ran).
//!
//! Keys live in an embedded store (only this proxy process deduplicates) or in a region
//! daemon shared by every replica of the API (`--store`).
//!
//! The principal comes from `--principal-header` when set, honoured only from trusted peers
//! (loopback by default): from anyone else the header is stripped before anything reads it,
//! so a client cannot claim another principal's keys. Under mutual TLS it can come from the
//! client certificate instead (`--principal-from-cert`).
//!
//! Protocol upgrades (websockets) are forwarded, and once the upstream switches, bytes are
//! copied both ways.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;

use super::listener::TlsFiles;
use super::upgrade::{splice, switched_to, upgrade_asked, SPLICE_IDLE_MAX};
use super::{
    AnswerTemplate, EmbeddedStore, IdempotencyLayer, LayerConfig, NamespaceLimits, PrincipalFrom,
    RemoteStore, RoutePolicy,
};
use crate::clock::RegionId;
use crate::http::problem::Problem;
use crate::store::policy::{NamespaceConfig, StatusRange};
use crate::store::StoreConfig;

/// The namespace the embedded store keeps the proxy's keys in.
pub const PROXY_NAMESPACE: &str = "proxy";

/// How long shutdown waits for keyed requests still running.
const DRAIN_MAX: Duration = Duration::from_secs(30);

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
    /// What is stored by route and status (see [`RoutePolicy`]); the proxy adds 502 and 504 as
    /// indeterminate to each rule, unless the rule lists them (see [`route_rules`]).
    pub routes: Vec<RoutePolicy>,
    /// Status of the answer to a key reused with another request.
    pub mismatch_status: StatusCode,
    /// Body of that answer, instead of problem+json.
    pub mismatch_body: Option<AnswerTemplate>,
    /// Serve `GET /metrics` (the layer's verdict counts, shadow reports included) on this
    /// address, apart from the proxied API so that no upstream path is shadowed.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve HTTPS (with `client_ca`: mutual TLS) instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Take the principal from the client certificate's identity (needs mutual TLS); takes
    /// precedence over `principal_header`.
    pub principal_from_cert: bool,
    /// An answer's body still going this long after its head is passed on as a stream,
    /// unrecorded (see [`LayerConfig::stream_after`]).
    pub stream_after: Duration,
    /// Protocols clients may upgrade to on GET (case-insensitive). Default `websocket`; `h2c`
    /// is never let through (see [`super::upgrade::NEVER_UPGRADED`]).
    pub upgrades: Vec<String>,
    /// Response headers replayed besides the defaults (`Content-Type`, `Location`, `ETag`,
    /// and with an embedded store `Content-Encoding`, `Vary`). Headers that must never be
    /// replayed (`Set-Cookie`, `Date`, rate-limit, CORS) stay out whatever is listed. With
    /// `--store`, the daemon's namespace must allow them too.
    pub replay_headers: Vec<String>,
    /// Connections served at once; more wait in the kernel's backlog.
    pub connections_max: usize,
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
            routes: Vec::new(),
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            mismatch_body: None,
            metrics_listen: None,
            tls: None,
            principal_from_cert: false,
            stream_after: LayerConfig::new("", PrincipalFrom::Fixed(String::new())).stream_after,
            upgrades: vec!["websocket".into()],
            replay_headers: Vec::new(),
            connections_max: 4096,
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

/// The embedded store's config: one namespace, in which a failure after the request reached
/// the upstream (502, 504: it may have acted) is stored as indeterminate, and replays keep
/// `Content-Encoding`, `Vary` and `replay_headers` besides the default headers.
pub fn store_config(replay_headers: &[String]) -> StoreConfig {
    let mut ns = NamespaceConfig::named(PROXY_NAMESPACE);
    ns.indeterminate_statuses = vec![StatusRange::new(502, 502), StatusRange::new(504, 504)];
    ns.headers_allowed
        .extend(["Content-Encoding".to_owned(), "Vary".to_owned()]);
    ns.headers_allowed.extend(replay_headers.iter().cloned());
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
    let tls = config.tls.as_ref().map(TlsFiles::acceptor).transpose()?;
    let principal = if config.principal_from_cert {
        if config.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            anyhow::bail!("the principal can come from client certificates only under mutual TLS: --tls-cert, --tls-key and --tls-client-ca");
        }
        PrincipalFrom::PeerIdentity
    } else {
        match &config.principal_header {
            Some(h) => PrincipalFrom::Header(h.clone()),
            None => PrincipalFrom::Fixed(DEFAULT_PRINCIPAL.into()),
        }
    };
    let (layer, embedded) = match &config.store {
        ProxyStore::Embedded(dir) => {
            let store = tokio::task::spawn_blocking({
                let (dir, config) = (dir.clone(), store_config(&config.replay_headers));
                move || EmbeddedStore::open(&dir, config)
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
            check_regions(endpoints).await?;
            let client = crate::client::ClientConfig::new(endpoints.clone(), namespace, token);
            // The layer must agree with the daemon's namespace (key length, lease, outcome cap,
            // headers kept): read its policy. A refusal (token, namespace) stops the start; if
            // no region answers now, start with the defaults and say so.
            let mut probe = client.clone();
            probe.max_total = Duration::from_secs(5);
            probe.attempt_timeout = Duration::from_secs(2);
            let mut limits = match crate::client::Client::new(probe)
                .context("the store client")?
                .policy()
                .await
            {
                Ok(p) => NamespaceLimits::from(&p),
                Err(crate::client::ClientError::Refused(p)) => anyhow::bail!(
                    "the store refuses namespace {namespace:?} with this token ({}: {})",
                    p.status,
                    p.detail.unwrap_or_default()
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "the store's namespace policy could not be read: assuming the daemon's defaults");
                    NamespaceLimits::daemon_defaults()
                }
            };
            limits
                .headers_allowed
                .extend(config.replay_headers.iter().cloned());
            let store = RemoteStore::new(client, limits).context("the store client")?;
            let layer = IdempotencyLayer::new(store, layer_config(&config, namespace, principal))?;
            (layer, None)
        }
    };
    let draining = layer.clone();
    let (stop_splices, stopping) = tokio::sync::watch::channel(false);
    let metrics = match config.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, layer.clone(), stopping.clone()).await?),
        None => None,
    };
    let upstream = Upstream::new(
        config.upstream.clone(),
        config.upstream_timeout,
        config.upgrades.clone(),
        stopping,
    )?;
    let strip = StripUntrusted {
        header: config.principal_header.clone(),
        trusted: config.trusted.clone(),
    };
    let app = Router::new()
        .fallback_service(tower::service_fn(move |req: Request<Body>| {
            let upstream = upstream.clone();
            async move { Ok::<_, std::convert::Infallible>(upstream.forward(req).await) }
        }))
        .layer(layer)
        .layer(axum::middleware::from_fn(refuse_odd_paths))
        .layer(axum::middleware::map_request(move |req: Request<Body>| {
            let strip = strip.clone();
            async move { strip.apply(req) }
        }));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    // One line (a reader may stop after it): where the proxy listens, then where its metrics are.
    let metrics_note = metrics
        .map(|a| format!(" (metrics at http://{a}/metrics)"))
        .unwrap_or_default();
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "idem: proxying {scheme}://{} to {}{metrics_note}",
        listener.local_addr()?,
        config.upstream
    );
    super::listener::serve(
        listener,
        tls,
        app,
        shutdown,
        DRAIN_MAX,
        config.connections_max,
    )
    .await;
    // Spliced connections and the metrics listener stop too.
    let _ = stop_splices.send(true);
    // Keyed requests whose clients left run on: let them finish and store their outcomes.
    let left = draining.drain(DRAIN_MAX).await;
    if left > 0 {
        tracing::warn!(left, "stopping with keyed requests still running: their keys stay in flight until their leases end");
    }
    // An embedded store flushes, writes its hint files and stops its threads (and frees its
    // directory) when the last handle goes: requests still open past the drains may hold one.
    drop(draining);
    tokio::task::spawn_blocking(move || drop(embedded))
        .await
        .context("closing the store")?;
    Ok(())
}

/// Checks that each daemon answers with the region it was named for (completions go to the
/// claim's region by that name: a wrong name would strand every key). An unreachable daemon
/// is only reported: it may come up later.
async fn check_regions(endpoints: &[crate::client::Endpoint]) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(crate::client::tls_config(None).map_err(anyhow::Error::msg)?)
        .timeout(Duration::from_secs(5))
        .build()?;
    for e in endpoints {
        let url = format!("{}/healthz", e.url.trim_end_matches('/'));
        match http.get(&url).send().await {
            Ok(r) => {
                let region = r
                    .headers()
                    .get(crate::http::api::REGION_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if region != e.region.as_str() {
                    anyhow::bail!(
                        "--store {}={}: that daemon is region {region:?}, not {}",
                        e.region,
                        e.url,
                        e.region
                    );
                }
            }
            Err(err) => tracing::warn!(url, error = %err, "a store region is not reachable now"),
        }
    }
    Ok(())
}

fn layer_config(config: &ProxyConfig, namespace: &str, principal: PrincipalFrom) -> LayerConfig {
    let mut c = LayerConfig::new(namespace, principal);
    c.required = config.required.clone();
    c.in_flight_wait = config.in_flight_wait;
    c.shadow = config.shadow;
    c.routes = route_rules(&config.routes);
    c.mismatch_status = config.mismatch_status;
    c.mismatch_body = config.mismatch_body.clone();
    c.stream_after = config.stream_after;
    c
}

/// The proxy's route rules: as given, except that each of 502 and 504 is stored as
/// indeterminate unless the rule lists it. The proxy answers 502 and 504 itself when the upstream failed or
/// timed out after the request was sent (it may have acted): releasing the key then would let
/// a retry run the request twice.
pub fn route_rules(rules: &[RoutePolicy]) -> Vec<RoutePolicy> {
    rules
        .iter()
        .cloned()
        .map(|mut r| {
            for status in [502, 504] {
                let listed = r
                    .stored
                    .iter()
                    .chain(&r.indeterminate)
                    .any(|range| range.contains(status));
                if !listed {
                    r.indeterminate.push(StatusRange::new(status, status));
                }
            }
            r
        })
        .collect()
}

/// Serves the layer's metrics on `addr` (`GET /metrics`, `GET /healthz`) until `stop` turns
/// true; returns the bound address.
async fn serve_metrics(
    addr: SocketAddr,
    layer: IdempotencyLayer,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = layer.metrics_text();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    });
    Ok(bound)
}

/// What only a trusted peer may say about a request: its principal header, its forwarding
/// headers (`X-Forwarded-For`, `Forwarded`) and the region it failed over from
/// (`Idem-Prior-Region`). From anyone else they are removed.
#[derive(Clone)]
struct StripUntrusted {
    header: Option<HeaderName>,
    trusted: Vec<ipnet::IpNet>,
}

impl StripUntrusted {
    fn apply(&self, mut req: Request<Body>) -> Request<Body> {
        let peer: Option<IpAddr> = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_canonical());
        let trusted = peer.is_some_and(|ip| self.trusted.iter().any(|n| n.contains(&ip)));
        if !trusted {
            let h = req.headers_mut();
            if let Some(name) = &self.header {
                h.remove(name);
            }
            h.remove("x-forwarded-for");
            h.remove(header::FORWARDED);
            // Which region a request failed over from is the gateway's to say.
            h.remove(crate::http::api::PRIOR_REGION_HEADER);
        }
        req
    }
}

/// Refuses paths the layer and the upstream could read differently (dot segments, empty
/// segments).
async fn refuse_odd_paths(req: Request<Body>, next: axum::middleware::Next) -> Response<Body> {
    if !normal_path(req.uri().path()) {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-path",
            "Bad request",
            "the path has '.', '..' or empty segments; send it normalised",
        )
        .into_response();
    }
    next.run(req).await
}

/// The API behind the proxy.
#[derive(Clone)]
struct Upstream {
    base: reqwest::Url,
    http: reqwest::Client,
    timeout: Duration,
    /// Protocols a client may upgrade to.
    upgrades: Arc<Vec<String>>,
    /// Turns true when the proxy stops: spliced connections close.
    stop: tokio::sync::watch::Receiver<bool>,
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
    fn new(
        base: reqwest::Url,
        timeout: Duration,
        upgrades: Vec<String>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let tls = crate::client::tls_config(None).map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .read_timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the upstream client")?;
        Ok(Self {
            base,
            http,
            timeout,
            upgrades: Arc::new(upgrades),
            stop,
        })
    }

    async fn forward(&self, req: Request<Body>) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        // A protocol upgrade (websockets): forwarded with its `Upgrade` header, and once the
        // upstream switches, bytes are copied both ways until either side closes.
        let upgrade = upgrade_asked(
            &parts.method,
            &parts.headers,
            &self.upgrades,
            &connection_tokens(&parts.headers),
        );
        let client_side = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}{}", parts.uri.path()));
        url.set_query(parts.uri.query());
        let dropped = connection_tokens(&parts.headers);
        let mut out = self.http.request(parts.method, url);
        let mut forwarded_for = None;
        for (name, value) in &parts.headers {
            if hop_by_hop(name) || dropped.contains(name) {
                continue;
            }
            if name == "x-forwarded-for" {
                // Only a trusted peer's value got this far (see `StripUntrusted`); ours is
                // appended to it, on one line.
                forwarded_for = value.to_str().ok().map(str::to_owned);
                continue;
            }
            out = out.header(name, value);
        }
        if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            let peer = peer.ip().to_canonical().to_string();
            let chain = match forwarded_for {
                Some(before) => format!("{before}, {peer}"),
                None => peer,
            };
            out = out.header("x-forwarded-for", chain);
        }
        if let (Some(protocol), Some(_)) = (&upgrade, &client_side) {
            out = out
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, protocol);
        }
        let out = out.body(reqwest::Body::wrap_stream(body.into_data_stream()));
        // The time limit is on the answer's head; its body may stream for as long as it keeps
        // moving (the client's read timeout bounds each pause).
        let sent = match tokio::time::timeout(self.timeout, out.send()).await {
            Ok(sent) => sent,
            Err(_) => {
                return upstream_problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    format!(
                    "the upstream did not answer within {} ms; it may have acted on the request",
                    self.timeout.as_millis()
                ),
                )
            }
        };
        match sent {
            Ok(r) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let (Some(client_side), Some(asked)) = (client_side, upgrade) else {
                    return upstream_problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream-failed",
                        "the upstream switched protocols unasked".into(),
                    );
                };
                if !switched_to(&asked, r.headers()) {
                    return upstream_problem(
                        StatusCode::BAD_GATEWAY,
                        "upstream-failed",
                        "the upstream switched to another protocol than the one asked for".into(),
                    );
                }
                let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
                let dropped = connection_tokens(r.headers());
                for (name, value) in r.headers() {
                    if !hop_by_hop(name) && !dropped.contains(name) {
                        answer = answer.header(name, value);
                    }
                }
                if let Some(protocol) = r.headers().get(header::UPGRADE) {
                    answer = answer
                        .header(header::CONNECTION, "upgrade")
                        .header(header::UPGRADE, protocol);
                }
                tokio::spawn(splice(client_side, r, SPLICE_IDLE_MAX, self.stop.clone()));
                answer.body(Body::empty()).unwrap_or_else(|e| {
                    upstream_problem(StatusCode::BAD_GATEWAY, "upstream-failed", e.to_string())
                })
            }
            Ok(r) => {
                let dropped = connection_tokens(r.headers());
                let mut answer = Response::builder().status(r.status());
                for (name, value) in r.headers() {
                    // Content-Length is kept: the body is streamed as it came, and the layer
                    // tells a finite body from a stream by it.
                    if !hop_by_hop(name) && !dropped.contains(name) {
                        answer = answer.header(name, value);
                    }
                }
                answer
                    .body(Body::from_stream(r.bytes_stream()))
                    .unwrap_or_else(|e| {
                        upstream_problem(StatusCode::BAD_GATEWAY, "upstream-failed", e.to_string())
                    })
            }
            // Nothing reached the upstream: nothing ran.
            Err(e) if e.is_connect() => upstream_problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream-unreachable",
                format!("the upstream could not be reached: {e}"),
            ),
            // Sent, then no byte for the time limit: the upstream may be acting on it.
            Err(e) if e.is_timeout() => upstream_problem(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream-timeout",
                format!(
                    "the upstream did not answer in time; it may have acted on the request: {e}"
                ),
            ),
            // Sent, then the connection failed: the upstream may have acted on it.
            Err(e) => upstream_problem(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                format!(
                    "the upstream failed after the request was sent; it may have acted on it: {e}"
                ),
            ),
        }
    }
}

/// Headers a `Connection` header names: they belong to this hop only (RFC 9110 §7.6.1).
fn connection_tokens(headers: &axum::http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| t.trim().parse::<HeaderName>().ok())
        .collect()
}

/// Whether a request path is normal: no `.` or `..` segment (plain or percent-encoded) and no
/// empty segment. Anything else is refused, so that the path the layer checks is the path the
/// upstream serves.
fn normal_path(path: &str) -> bool {
    path.starts_with('/')
        && path[1..].split('/').enumerate().all(|(i, seg)| {
            let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
            let last = i == path[1..].split('/').count() - 1;
            decoded != "." && decoded != ".." && (!seg.is_empty() || last)
        })
}

fn upstream_problem(status: StatusCode, kind: &str, detail: String) -> Response<Body> {
    let mut p = Problem::new(status, kind, "Upstream failed", detail);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        p.retry_after_seconds = Some(1);
    }
    p.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_normal_paths_pass() {
        for ok in ["/", "/charges", "/charges/", "/a/b.c/d", "/a/..b", "/%2fx"] {
            assert!(normal_path(ok), "{ok}");
        }
        for odd in [
            "/x/../charges",
            "/x/%2e%2e/charges",
            "/x/%2E./charges",
            "/./charges",
            "//charges",
            "/a//b",
            "/..",
        ] {
            assert!(!normal_path(odd), "{odd}");
        }
    }

    #[test]
    fn headers_named_by_connection_are_this_hops_only() {
        let mut h = axum::http::HeaderMap::new();
        h.append(header::CONNECTION, "keep-alive, X-Secret".parse().unwrap());
        h.append(header::CONNECTION, "x-other".parse().unwrap());
        let t = connection_tokens(&h);
        assert!(t.contains(&HeaderName::from_static("x-secret")));
        assert!(t.contains(&HeaderName::from_static("x-other")));
        assert!(t.contains(&HeaderName::from_static("keep-alive")));
    }

    #[test]
    fn untrusted_peers_lose_their_principal_and_forwarding_headers() {
        let strip = StripUntrusted {
            header: Some(HeaderName::from_static("x-principal")),
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let req = |peer: &str| {
            let mut r = Request::builder()
                .header("x-principal", "acct_1")
                .header("x-forwarded-for", "1.2.3.4")
                .header("idem-prior-region", "us1")
                .body(Body::empty())
                .unwrap();
            r.extensions_mut()
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
            r
        };
        let kept = strip.apply(req("10.1.2.3:5000"));
        assert_eq!(kept.headers()["x-principal"], "acct_1");
        assert_eq!(kept.headers()["x-forwarded-for"], "1.2.3.4");
        assert_eq!(kept.headers()["idem-prior-region"], "us1");
        // An IPv4 peer seen through an IPv6 listener is the same peer.
        let mapped = strip.apply(req("[::ffff:10.1.2.3]:5000"));
        assert_eq!(mapped.headers()["x-principal"], "acct_1");
        let stripped = strip.apply(req("192.168.1.9:5000"));
        assert!(stripped.headers().get("x-principal").is_none());
        assert!(stripped.headers().get("x-forwarded-for").is_none());
        assert!(stripped.headers().get("idem-prior-region").is_none());
    }
}
