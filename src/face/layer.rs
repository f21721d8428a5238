//! `IdempotencyLayer`: a tower layer that gives any axum or hyper service exact
//! `Idempotency-Key` semantics, backed by an embedded store ([`EmbeddedStore`](super::EmbeddedStore)) or a region daemon
//! ([`RemoteStore`](super::RemoteStore)).
//!
//! For a request with a key on a method the layer guards (POST and PATCH by default):
//!
//! 1. The key is parsed (quoted or bare; 400 when repeated or malformed, or when missing on a
//!    route that requires one), the principal taken from the configured source (400 without
//!    one), the body buffered within its limit (413) and the request fingerprinted.
//! 2. The key is claimed under (namespace, principal, key) with a fresh attempt token:
//!    * **execute**: the inner service runs in a task of its own, so it runs to completion and
//!      its outcome is stored even if the client goes away; heartbeats extend the lease while
//!      it runs; the outcome is durable before the response leaves, with
//!      `Idempotent-Replayed: false`;
//!    * **replay**: the stored status, allow-listed headers and body, byte for byte, with
//!      `Idempotent-Replayed: true`;
//!    * **in flight**: 409 with `Retry-After: 1`, or, when a wait is configured, the result once
//!      it is there (bounded);
//!    * **mismatch**: 422 (configurable);
//!    * **unavailable**: 503 with `Retry-After`.
//! 3. What is stored: the namespace's policy decides by status (default: 2xx stored, others
//!    release the key so a corrected retry runs); 401 and 429 are never stored, nor a response
//!    marked `Idempotency-Store: skip`, nor a streaming response (passed through unrecorded).
//!    Headers that must never be replayed (`Set-Cookie`, `Date`, rate-limit and CORS headers,
//!    hop-by-hop headers) are dropped before the namespace's allow-list applies.
//!
//! Every answer echoes `Idempotency-Key` and, once a key is claimed, says when it expires
//! (`Idempotency-Expires`, an HTTP date). Requests without a key on routes that do not require
//! one, and requests with other methods, pass through untouched.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode,
};
use axum::response::IntoResponse;
use axum::BoxError;
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
use tower::{Layer, Service, ServiceExt as _};

use super::backend::{Backend, NamespaceLimits};
use super::encoding::{accepts_gzip, encode_for_client};
use super::fingerprint::fingerprint;
use super::key::{request_key, KeyError, IDEMPOTENCY_KEY};
use super::route::{rule_for, under, RoutePolicy};
use crate::clock::{RegionId, Stamp};
use crate::http::api::StoreAs;
use crate::http::problem::Problem;
use crate::record::{AttemptToken, Body as StoredBody, Outcome, RecordKey};
use crate::store::{ClaimRequest, Decision};

/// `Idempotent-Replayed`: `true` on a replay, `false` on the first execution.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// `Idempotency-Expires`: when the key expires (an HTTP date).
pub const IDEMPOTENCY_EXPIRES: HeaderName = HeaderName::from_static("idempotency-expires");
/// `Idempotency-Store: skip`, set by the inner service, keeps its response from being stored.
pub const IDEMPOTENCY_STORE: HeaderName = HeaderName::from_static("idempotency-store");
/// `Idempotency-Indeterminate: true` on a replay of an outcome stored as indeterminate (the
/// request may or may not have taken effect: reconcile before acting on it).
pub const IDEMPOTENCY_INDETERMINATE: HeaderName =
    HeaderName::from_static("idempotency-indeterminate");

/// Where the principal (whose keys these are) comes from. Keys of different principals never
/// meet, so the client's key alone never decides.
#[derive(Debug, Clone)]
pub enum PrincipalFrom {
    /// A request header set by something the service trusts (an auth proxy, a gateway).
    Header(HeaderName),
    /// One principal for every request (a single-tenant service).
    Fixed(String),
    /// A claim of the bearer JWT in `Authorization`. The layer does not verify the token: put
    /// it inside (after) the layer that does.
    JwtClaim(String),
    /// The client certificate's identity, as a [`PeerIdentity`] request extension set by the
    /// server's TLS acceptor.
    PeerIdentity,
}

/// The verified identity of a TLS client, inserted as a request extension by whoever
/// terminates mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// A configured answer in place of the layer's problem+json: `{key}`, `{claim}` and
/// `{status}` in `body` are replaced, in one pass, by the request's key, the claim that holds
/// it and the answer's status. Values are escaped for the content type: JSON string escapes
/// for a JSON type (so a template stays valid), HTML entities for an HTML or XML type (a key is
/// the client's text: it must not become markup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerTemplate {
    /// The answer's `Content-Type`.
    pub content_type: HeaderValue,
    /// The body, with its placeholders.
    pub body: String,
}

impl AnswerTemplate {
    /// The answer for `key` held by `claim`, with `status`.
    pub fn render(&self, status: StatusCode, key: &str, claim: &str) -> Response<Body> {
        let ct = self
            .content_type
            .to_str()
            .unwrap_or("")
            .to_ascii_lowercase();
        let (json, markup) = (
            ct.contains("json"),
            ct.contains("html") || ct.contains("xml"),
        );
        let fill = |v: &str| {
            if json {
                // A JSON string's inside: escaped, without its quotes.
                let quoted = serde_json::Value::from(v).to_string();
                quoted[1..quoted.len() - 1].to_owned()
            } else if markup {
                v.chars()
                    .map(|c| match c {
                        '&' => "&amp;".to_owned(),
                        '<' => "&lt;".to_owned(),
                        '>' => "&gt;".to_owned(),
                        '"' => "&quot;".to_owned(),
                        '\'' => "&#39;".to_owned(),
                        c => c.to_string(),
                    })
                    .collect()
            } else {
                v.to_owned()
            }
        };
        // One pass: a value that looks like a placeholder stays as it is.
        let mut body = String::with_capacity(self.body.len() + key.len());
        let mut rest = self.body.as_str();
        while let Some(at) = rest.find('{') {
            body.push_str(&rest[..at]);
            rest = &rest[at..];
            let (value, len) = if rest.starts_with("{key}") {
                (fill(key), 5)
            } else if rest.starts_with("{claim}") {
                (fill(claim), 7)
            } else if rest.starts_with("{status}") {
                (status.as_str().to_owned(), 8)
            } else {
                ("{".to_owned(), 1)
            };
            body.push_str(&value);
            rest = &rest[len..];
        }
        body.push_str(rest);
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, self.content_type.clone());
        r
    }
}

/// The layer's settings.
#[derive(Debug, Clone)]
pub struct LayerConfig {
    /// The namespace keys are claimed in (its policy decides TTL, lease, what is stored).
    pub namespace: String,
    /// Where the principal comes from.
    pub principal: PrincipalFrom,
    /// Methods whose requests are deduplicated; others pass through. Default POST and PATCH.
    pub methods: Vec<Method>,
    /// Path prefixes on which a guarded method requires a key (400 without). Default none:
    /// requests without a key pass through untouched.
    pub required: Vec<String>,
    /// Wait for a request in flight instead of answering 409 at once, at most this long (keep
    /// it under your gateway's timeout). Default: no wait.
    pub in_flight_wait: Option<Duration>,
    /// Largest request body buffered (413 beyond). Default 1 MiB.
    pub request_bytes_max: usize,
    /// Largest response body buffered to be stored; a larger one streams through to the client
    /// unrecorded and the key is released. Default 16 MiB.
    pub response_bytes_max: usize,
    /// How long heartbeats keep a running handler's lease alive; after that the lease runs out
    /// and another request may take the key over. Default 10 minutes.
    pub execution_max: Duration,
    /// A response body without a `Content-Length` still going this long after its head is a
    /// stream (chunked without an end, long polling): what was read and the rest flow to the
    /// client, unrecorded, and the key is released. Default 10 s. (A body of known length has
    /// until `execution_max`; one still unfinished then is a failure, kept as indeterminate.) Streams that say so (`text/event-stream`, gRPC,
    /// `Idempotency-Store: skip`) pass at once; this catches the others.
    pub stream_after: Duration,
    /// Status of the answer to a key reused with another request. Default 422.
    pub mismatch_status: StatusCode,
    /// Body of that answer. Default (`None`): an RFC 9457 problem (`application/problem+json`).
    pub mismatch_body: Option<AnswerTemplate>,
    /// What is stored, by route and status, for the routes these rules cover (the most
    /// specific rule decides; see [`RoutePolicy`]). Requests no rule covers are stored as the
    /// namespace's status table says. Default: no rules.
    pub routes: Vec<RoutePolicy>,
    /// Compress keyed answers (first executions and replays alike) with gzip for clients
    /// whose `Accept-Encoding` takes it; stored outcomes stay in identity encoding. Default on.
    pub compress: bool,
    /// Shadow mode, for putting the layer in front of a live API: every request runs as if
    /// the layer were not there; what the layer would have answered instead (a replay, 409,
    /// 422, 400, 413, 503) is counted in [`LayerStats`] and logged. Executions are still
    /// claimed and stored, so the counts are what enforcing would do. Default off.
    pub shadow: bool,
}

impl LayerConfig {
    /// Defaults for `namespace`, with the principal from `principal`.
    pub fn new(namespace: impl Into<String>, principal: PrincipalFrom) -> Self {
        Self {
            namespace: namespace.into(),
            principal,
            methods: vec![Method::POST, Method::PATCH],
            required: Vec::new(),
            in_flight_wait: None,
            request_bytes_max: 1 << 20,
            response_bytes_max: 16 << 20,
            execution_max: Duration::from_secs(600),
            stream_after: Duration::from_secs(10),
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
            mismatch_body: None,
            routes: Vec::new(),
            compress: true,
            shadow: false,
        }
    }

    /// Adds a route's storage rule.
    pub fn route(mut self, rule: RoutePolicy) -> Self {
        self.routes.push(rule);
        self
    }

    /// Requires a key on paths starting with `prefix`.
    pub fn require_key_under(mut self, prefix: impl Into<String>) -> Self {
        self.required.push(prefix.into());
        self
    }

    /// Waits up to `wait` for a request in flight instead of answering 409.
    pub fn wait_in_flight(mut self, wait: Duration) -> Self {
        self.in_flight_wait = Some(wait);
        self
    }
}

/// The layer: `.layer(IdempotencyLayer::new(backend, config)?)`.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    config: LayerConfig,
    limits: NamespaceLimits,
    stats: Arc<LayerStats>,
    /// Keyed requests running now (they run on even when their client went away).
    running: std::sync::atomic::AtomicUsize,
}

/// Counts a keyed request as running while it lives.
struct Running<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Running<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An unavailable answer suggesting a wait this short (ms) is retried inside the layer...
const TRANSIENT_MS: u64 = 250;
/// ...for this long at most.
const TRANSIENT_BUDGET: Duration = Duration::from_secs(2);

/// What the layer decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// No key on a route that does not require one, or a method the layer leaves alone.
    PassedThrough,
    /// Claimed and run.
    Executed,
    /// The stored response was replayed.
    Replayed,
    /// 409: the key's request is running.
    InFlight,
    /// 422: the key was used with another request.
    Mismatch,
    /// 503: the store could not answer.
    Unavailable,
    /// 400: no key where one is required.
    MissingKey,
    /// 400: a malformed or repeated key.
    BadKey,
    /// 400: no principal.
    MissingPrincipal,
    /// 413: the body is over the buffering limit.
    TooLarge,
    /// 400: the request body broke off.
    BadBody,
    /// 400: `Idem-Prior-Region` is not a region id.
    BadPriorRegion,
    /// After running: the response was stored (the namespace's policy may still have
    /// released it by status).
    Completed,
    /// After running: not stored (401, 429, `Idempotency-Store: skip`, a stream, a failure).
    NotStored,
}

impl Verdict {
    /// Every verdict, in order.
    pub const ALL: [Verdict; 14] = [
        Verdict::PassedThrough,
        Verdict::Executed,
        Verdict::Replayed,
        Verdict::InFlight,
        Verdict::Mismatch,
        Verdict::Unavailable,
        Verdict::MissingKey,
        Verdict::BadKey,
        Verdict::MissingPrincipal,
        Verdict::TooLarge,
        Verdict::BadBody,
        Verdict::BadPriorRegion,
        Verdict::Completed,
        Verdict::NotStored,
    ];

    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::PassedThrough => "passed_through",
            Verdict::Executed => "executed",
            Verdict::Replayed => "replayed",
            Verdict::InFlight => "in_flight",
            Verdict::Mismatch => "mismatch",
            Verdict::Unavailable => "unavailable",
            Verdict::MissingKey => "missing_key",
            Verdict::BadKey => "bad_key",
            Verdict::MissingPrincipal => "missing_principal",
            Verdict::TooLarge => "too_large",
            Verdict::BadBody => "bad_body",
            Verdict::BadPriorRegion => "bad_prior_region",
            Verdict::Completed => "completed",
            Verdict::NotStored => "not_stored",
        }
    }
}

/// Counts of the layer's verdicts (in shadow mode: what it would have done).
#[derive(Debug, Default)]
pub struct LayerStats {
    counts: [std::sync::atomic::AtomicU64; Verdict::ALL.len()],
}

impl LayerStats {
    fn count(&self, v: Verdict) {
        self.counts[v as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many requests got `v` so far.
    pub fn get(&self, v: Verdict) -> u64 {
        self.counts[v as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every count, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Verdict::ALL
            .iter()
            .map(|&v| (v.name(), self.get(v)))
            .collect()
    }
}

/// Why a layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The store does not serve the namespace.
    #[error("the store has no namespace {0:?}")]
    UnknownNamespace(String),
    /// A route rule names a method the layer does not guard: it would never apply.
    #[error("the route rule for {prefix:?} names {method}, which the layer does not guard (it guards {guarded})")]
    RouteMethodNotGuarded {
        /// The rule's prefix.
        prefix: String,
        /// The method it names.
        method: Method,
        /// The methods the layer guards.
        guarded: String,
    },
}

impl IdempotencyLayer {
    /// A layer claiming keys in `config.namespace` of `backend`.
    pub fn new(backend: impl Backend, config: LayerConfig) -> Result<Self, LayerError> {
        let limits = backend
            .limits(&config.namespace)
            .ok_or_else(|| LayerError::UnknownNamespace(config.namespace.clone()))?;
        for rule in &config.routes {
            if let Some(m) = rule.method.as_ref().filter(|m| !config.methods.contains(m)) {
                return Err(LayerError::RouteMethodNotGuarded {
                    prefix: rule.prefix.clone(),
                    method: m.clone(),
                    guarded: config
                        .methods
                        .iter()
                        .map(Method::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(Self {
            shared: Arc::new(Shared {
                backend: Arc::new(backend),
                config,
                limits,
                stats: Arc::default(),
                running: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// Waits (at most `max`) until no keyed request is running: call it after the server
    /// stopped accepting, before closing the store, so that requests whose clients went away
    /// still finish and store their outcomes. Returns how many were still running.
    pub async fn drain(&self, max: Duration) -> usize {
        let until = Instant::now() + max;
        loop {
            let n = self
                .shared
                .running
                .load(std::sync::atomic::Ordering::Acquire);
            if n == 0 || Instant::now() >= until {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The layer's counts (shared by every service it made).
    pub fn stats(&self) -> Arc<LayerStats> {
        self.shared.stats.clone()
    }

    /// Keyed requests running now.
    pub fn running(&self) -> usize {
        self.shared
            .running
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the layer only reports (shadow mode).
    pub fn is_shadow(&self) -> bool {
        self.shared.config.shadow
    }

    /// The layer's counts in the Prometheus text format: `idem_layer_verdicts_total` by
    /// verdict (in shadow mode: what the layer would have done), `idem_layer_running` and
    /// `idem_layer_shadow` (1 in shadow mode).
    pub fn metrics_text(&self) -> String {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct VerdictLabels {
            verdict: &'static str,
        }
        let mut registry = prometheus_client::registry::Registry::with_prefix("idem_layer");
        let verdicts = Family::<VerdictLabels, Counter>::default();
        for (verdict, n) in self.shared.stats.snapshot() {
            verdicts.get_or_create(&VerdictLabels { verdict }).inc_by(n);
        }
        registry.register(
            "verdicts",
            "Requests by what the layer decided (in shadow mode: would have decided)",
            verdicts,
        );
        let running = Gauge::<i64>::default();
        running.set(self.running() as i64);
        registry.register("running", "Keyed requests running now", running);
        let shadow = Gauge::<i64>::default();
        shadow.set(i64::from(self.is_shadow()));
        registry.register(
            "shadow",
            "1 when the layer only reports (shadow mode)",
            shadow,
        );
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around an inner one.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, RB> Service<Request<B>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = super::backend::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call clones the inner service and drives it with `oneshot`, which waits for its
        // readiness.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (inner, shared) = (self.inner.clone(), self.shared.clone());
        Box::pin(async move { Ok(serve(shared, inner, req.map(Body::new)).await) })
    }
}

/// Echoes the request's `Idempotency-Key` (as sent), if it had one, on an answer.
fn echo_key(raw_key: Option<HeaderValue>) -> impl Fn(Response<Body>) -> Response<Body> {
    move |mut r| {
        if let Some(k) = &raw_key {
            r.headers_mut().insert(IDEMPOTENCY_KEY, k.clone());
        }
        r
    }
}

/// A 400 problem about the request's key or principal.
fn bad_request(kind: &str, detail: impl Into<String>) -> Response<Body> {
    Problem::new(StatusCode::BAD_REQUEST, kind, "Bad request", detail).into_response()
}

/// Runs the inner service and turns its answer into ours (never an error: `Infallible`).
async fn call_inner<S, RB>(inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible>,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    match inner.oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(never) => match never {},
    }
}

async fn serve<S, RB>(shared: Arc<Shared>, inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let cfg = &shared.config;
    if !cfg.methods.contains(req.method()) {
        return call_inner(inner, req).await;
    }
    let raw_key = req.headers().get(IDEMPOTENCY_KEY).cloned();
    let echo = echo_key(raw_key.clone());
    let key = match request_key(req.headers(), shared.limits.key_len_max) {
        Ok(Some(k)) => k,
        Ok(None) => {
            let path = req.uri().path();
            if cfg.required.iter().any(|p| under(path, p)) {
                let answer = bad_request("missing-key", KeyError::Missing.to_string());
                return refuse(&shared, inner, req, Verdict::MissingKey, answer).await;
            }
            shared.stats.count(Verdict::PassedThrough);
            return call_inner(inner, req).await;
        }
        Err(e) => {
            let answer = echo(bad_request("bad-key", e.to_string()));
            return refuse(&shared, inner, req, Verdict::BadKey, answer).await;
        }
    };
    let principal = match principal(&cfg.principal, &req) {
        Some(p) if !p.is_empty() => p,
        _ => {
            let answer = echo(bad_request(
                "missing-principal",
                "the request carries no principal (who the key belongs to)",
            ));
            return refuse(&shared, inner, req, Verdict::MissingPrincipal, answer).await;
        }
    };
    // A request a gateway failed over from another region says so; the store asks that region
    // about the key before granting it.
    let prior = match crate::http::prior_region(req.headers()) {
        Ok(p) => p,
        Err(e) => {
            let answer = echo(e.into_response());
            return refuse(&shared, inner, req, Verdict::BadPriorRegion, answer).await;
        }
    };
    // From here on nothing is cancelled by the client going away: a claim granted while it
    // waits for durability is run (and stored) rather than left in flight until its lease ends.
    let task = tokio::spawn({
        let shared = shared.clone();
        async move {
            let _running = Running::new(&shared.running);
            keyed(
                shared.clone(),
                inner,
                req,
                Scope {
                    key,
                    principal,
                    prior,
                },
                raw_key,
            )
            .await
        }
    });
    match task.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "idempotent request task failed");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "handler-failed",
                "Handler failed",
                "the request failed inside the idempotency layer",
            )
            .into_response()
        }
    }
}

/// Whose key a request claims, and where it failed over from.
struct Scope {
    key: String,
    principal: String,
    /// `Idem-Prior-Region`, if the request names one.
    prior: Option<RegionId>,
}

/// The part of [`serve`] after the key and principal: buffering, fingerprint, claim, and
/// running or answering.
async fn keyed<S, RB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<Body>,
    scope: Scope,
    raw_key: Option<HeaderValue>,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let cfg = &shared.config;
    let echo = echo_key(raw_key);
    let (parts, body) = req.into_parts();
    let bytes = match buffer(body, cfg.request_bytes_max, None).await {
        Ok(b) => b,
        Err(Buffered::TooLarge(whole) | Buffered::Streaming(whole)) => {
            let answer = echo(
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request-too-large",
                    "Request too large",
                    format!(
                        "an idempotent request's body is buffered, up to {} bytes",
                        cfg.request_bytes_max
                    ),
                )
                .into_response(),
            );
            let req = Request::from_parts(parts, whole);
            return refuse(&shared, inner, req, Verdict::TooLarge, answer).await;
        }
        Err(Buffered::Failed(e)) => {
            // The client's body broke off: there is no request to run.
            shared.stats.count(Verdict::BadBody);
            return echo(bad_request(
                "invalid-request",
                format!("reading the body failed: {e}"),
            ));
        }
    };
    let (fp, _) = fingerprint(
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        &bytes,
    );
    let record_key = RecordKey::new(&cfg.namespace, &scope.principal, &scope.key);
    let gzip = cfg.compress.then(|| accepts_gzip(&parts.headers));
    let rule = rule_for(&cfg.routes, &parts.method, parts.uri.path()).cloned();
    let claimed_at = Instant::now();
    let deadline = cfg.in_flight_wait.map(|w| claimed_at + w);
    let mut pause = Duration::from_millis(20);
    loop {
        let claim = ClaimRequest {
            key: record_key.clone(),
            fingerprint: fp,
            attempt: AttemptToken(rand::random::<u128>() | 1),
        };
        let decision = match shared.backend.claim(claim, scope.prior).await {
            Ok(d) => d,
            Err(p) => {
                let req = Request::from_parts(parts, Body::from(bytes));
                let answer = echo(p.into_response());
                return refuse(&shared, inner, req, Verdict::Unavailable, answer).await;
            }
        };
        match decision {
            Decision::Execute {
                claim,
                expires_at_ms,
                lease_until_ms,
                ..
            } => {
                shared.stats.count(Verdict::Executed);
                let mut parts = parts;
                // Stored responses are kept in identity encoding, so that any client can read
                // a replay: compress outside this layer (first answers and replays alike).
                parts.headers.remove(header::ACCEPT_ENCODING);
                let req = Request::from_parts(parts, Body::from(bytes));
                // The lease this claim got (the store's policy, which a remote store's limits
                // here may not know): heartbeats keep renewing that much.
                let lease_ms = lease_until_ms
                    .saturating_sub(crate::clock::wall_clock_ms())
                    .clamp(100, shared.limits.lease_ms.max(100));
                let run = Run {
                    key: record_key,
                    claim,
                    lease_ms,
                    rule,
                    gzip,
                };
                let done = execute(&shared, inner, req, run).await;
                let expires = done.kept.then_some(expires_at_ms);
                return echo(marked(done.response, false, expires));
            }
            Decision::Replay {
                outcome,
                expires_at_ms,
                indeterminate,
                ..
            } => {
                let req = Request::from_parts(parts, Body::from(bytes));
                let mut answer = echo(marked(
                    replay(outcome, gzip).await,
                    true,
                    Some(expires_at_ms),
                ));
                if indeterminate {
                    answer
                        .headers_mut()
                        .insert(IDEMPOTENCY_INDETERMINATE, HeaderValue::from_static("true"));
                }
                return refuse(&shared, inner, req, Verdict::Replayed, answer).await;
            }
            Decision::InFlight {
                lease_expires_at_ms,
                claim,
                region,
            } => {
                if let Some(deadline) = deadline.filter(|_| !cfg.shadow) {
                    let now = Instant::now();
                    if now < deadline {
                        tokio::time::sleep(pause.min(deadline - now)).await;
                        pause = (pause * 2).min(Duration::from_millis(250));
                        continue;
                    }
                }
                let p = Problem {
                    decision: Some("in_flight".into()),
                    state: Some("in_flight".into()),
                    origin_region: Some(region.to_string()),
                    lease_expires_at_ms: Some(lease_expires_at_ms),
                    retry_after_seconds: Some(1),
                    claim: Some(claim.to_string()),
                    ..Problem::new(
                        StatusCode::CONFLICT,
                        "in-flight",
                        "Request in flight",
                        "a request with this key is being processed; retry later",
                    )
                };
                let req = Request::from_parts(parts, Body::from(bytes));
                let answer = echo(p.into_response());
                return refuse(&shared, inner, req, Verdict::InFlight, answer).await;
            }
            Decision::Mismatch { claim } => {
                let req = Request::from_parts(parts, Body::from(bytes));
                if let Some(t) = &cfg.mismatch_body {
                    let answer =
                        echo(t.render(cfg.mismatch_status, &scope.key, &claim.to_string()));
                    return refuse(&shared, inner, req, Verdict::Mismatch, answer).await;
                }
                let p = Problem {
                    decision: Some("mismatch".into()),
                    claim: Some(claim.to_string()),
                    ..Problem::new(
                        cfg.mismatch_status,
                        "mismatch",
                        "Key reused with another request",
                        "this idempotency key was used with a different request (method, route, query or body)",
                    )
                };
                let answer = echo(p.into_response());
                return refuse(&shared, inner, req, Verdict::Mismatch, answer).await;
            }
            Decision::Unavailable {
                reason,
                retry_after_ms,
            } => {
                // Moments (a clock reservation being synced, a restart fence): wait them out
                // here, within a budget, rather than hand the client a 503.
                if retry_after_ms <= TRANSIENT_MS && claimed_at.elapsed() < TRANSIENT_BUDGET {
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.max(1))).await;
                    continue;
                }
                let req = Request::from_parts(parts, Body::from(bytes));
                let answer =
                    echo(Problem::from_unavailable(reason, retry_after_ms).into_response());
                return refuse(&shared, inner, req, Verdict::Unavailable, answer).await;
            }
        }
    }
}

/// Answers `answer` instead of running the request, or, in shadow mode, reports that it would
/// have and runs the request as if the layer were not there.
async fn refuse<S, RB>(
    shared: &Shared,
    inner: S,
    req: Request<Body>,
    verdict: Verdict,
    answer: Response<Body>,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible>,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    shared.stats.count(verdict);
    if !shared.config.shadow {
        return answer;
    }
    tracing::info!(
        would = verdict.name(),
        status = answer.status().as_u16(),
        method = %req.method(),
        path = req.uri().path(),
        "shadow: the idempotency layer would have answered instead of running the request"
    );
    call_inner(inner, req).await
}

/// Why [`buffer`] gave no bytes.
enum Buffered {
    /// Over the limit: the whole body, what was read and the rest, to pass on unchanged.
    TooLarge(Body),
    /// Still going at the deadline (a stream): the whole body, to pass on unchanged.
    Streaming(Body),
    /// The body broke off.
    Failed(BoxError),
}

/// Reads `body` whole, up to `max` bytes and, if given, until `deadline`.
async fn buffer(mut body: Body, max: usize, deadline: Option<Instant>) -> Result<Bytes, Buffered> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let next = match deadline {
            None => body.frame().await,
            Some(at) => match tokio::time::timeout_at(at.into(), body.frame()).await {
                Ok(f) => f,
                Err(_) => return Err(Buffered::Streaming(rejoin(buf, body))),
            },
        };
        let Some(frame) = next else {
            return Ok(buf.freeze());
        };
        let frame = frame.map_err(|e| Buffered::Failed(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > max {
            return Err(Buffered::TooLarge(rejoin(buf, body)));
        }
    }
}

/// What was read of a body, followed by the rest of it.
fn rejoin(read: bytes::BytesMut, rest: Body) -> Body {
    let read = read.freeze();
    let rest = rest.into_data_stream();
    Body::from_stream(
        futures_util::stream::once(async move { Ok::<_, axum::Error>(read) }).chain(rest),
    )
}

/// The principal of `req`, if its source has one.
fn principal(from: &PrincipalFrom, req: &Request<Body>) -> Option<String> {
    match from {
        PrincipalFrom::Header(name) => req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned()),
        PrincipalFrom::Fixed(p) => Some(p.clone()),
        PrincipalFrom::JwtClaim(claim) => jwt_claim(req.headers(), claim),
        PrincipalFrom::PeerIdentity => req.extensions().get::<PeerIdentity>().map(|p| p.0.clone()),
    }
}

/// A string (or number) claim of the bearer JWT's payload, unverified.
fn jwt_claim(headers: &HeaderMap, claim: &str) -> Option<String> {
    use base64::Engine as _;
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))?;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    match v.get(claim)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// What running a claimed request came to.
struct Executed {
    response: Response<Body>,
    /// The outcome is stored: the key replays it from now on.
    kept: bool,
}

/// A running heartbeat, stopped when dropped (a panic or a cancelled request never leaves
/// one extending a lease).
struct Heartbeat(Option<tokio::task::JoinHandle<()>>);

impl Heartbeat {
    /// Stops it and waits until it has (no extension runs alongside the completion).
    async fn stop(mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            let _ = h.await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// A claimed key's run: what [`execute`] needs besides the request.
struct Run {
    key: RecordKey,
    claim: Stamp,
    /// The lease the claim was granted, ms (heartbeats renew that much).
    lease_ms: u64,
    /// The route's storage rule, if one covers the request.
    rule: Option<RoutePolicy>,
    /// Compression: `None` off, else whether the client takes gzip.
    gzip: Option<bool>,
}

/// Runs the inner service for a claimed key and records what it answered. The outcome is
/// durable before this returns.
async fn execute<S, RB>(shared: &Shared, inner: S, req: Request<Body>, run: Run) -> Executed
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Send + 'static,
    S::Future: Send,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    use futures_util::FutureExt as _;
    let Run {
        key,
        claim,
        lease_ms,
        rule,
        gzip,
    } = run;
    let backend = &shared.backend;
    let beat = Heartbeat(Some(tokio::spawn(heartbeat(
        backend.clone(),
        key.clone(),
        claim,
        lease_ms,
        shared.config.execution_max,
    ))));
    let not_kept = |beat: Heartbeat, why: &'static str, response: Response<Body>| {
        let key = key.clone();
        async move {
            beat.stop().await;
            shared.stats.count(Verdict::NotStored);
            if let Err(p) = backend.release(key, claim).await {
                tracing::warn!(why, problem = ?p, "releasing an idempotency key failed");
            }
            Executed {
                response,
                kept: false,
            }
        }
    };
    let mut response = match std::panic::AssertUnwindSafe(call_inner(inner, req))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            let p = Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "handler-failed",
                "Handler failed",
                "the handler panicked; nothing was stored and the key is free for a retry",
            );
            return not_kept(beat, "the handler panicked", p.into_response()).await;
        }
    };
    let skip = response
        .headers_mut()
        .remove(IDEMPOTENCY_STORE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"skip"));
    if skip {
        return not_kept(beat, "Idempotency-Store: skip", response).await;
    }
    if streaming(&response) {
        return not_kept(beat, "a streaming response", response).await;
    }
    let (parts, body) = response.into_parts();
    // The layer's own verdict on the outcome, before any rule or table.
    let mut forced: Option<StoreAs> = None;
    // A body of known length is finite: only one without (chunked) can be a stream. One of
    // known length that stalls is bounded too, by execution_max: a failure, not a stream.
    let finite =
        parts.headers.contains_key(header::CONTENT_LENGTH) || body.size_hint().exact().is_some();
    let deadline = Instant::now()
        + if finite {
            shared.config.execution_max
        } else {
            shared.config.stream_after
        };
    let broke_off = |why: String| async move {
        // The handler ran but its answer broke off: it may have acted. Answer 502 and keep it
        // as indeterminate, whatever a rule or the namespace's table says of 502 (written for
        // the handler's own answers): a retry must not run it again unasked.
        let p = Problem::new(
            StatusCode::BAD_GATEWAY,
            "response-failed",
            "Response failed",
            format!("the handler's response body failed; it may have acted: {why}"),
        );
        let (parts, body) = p.into_response().into_parts();
        let bytes = buffer(body, usize::MAX, None).await.unwrap_or_default();
        (parts, bytes)
    };
    let (parts, bytes) = match buffer(body, shared.config.response_bytes_max, Some(deadline)).await
    {
        Ok(b) => (parts, b),
        Err(Buffered::TooLarge(whole)) => {
            let r = Response::from_parts(parts, whole);
            return not_kept(beat, "a response over response_bytes_max", r).await;
        }
        Err(Buffered::Streaming(_)) if finite => {
            forced = Some(StoreAs::Indeterminate);
            broke_off(format!(
                "its body stalled for longer than execution_max ({:?})",
                shared.config.execution_max
            ))
            .await
        }
        Err(Buffered::Streaming(whole)) => {
            let r = Response::from_parts(parts, whole);
            return not_kept(beat, "a response body still going after stream_after", r).await;
        }
        Err(Buffered::Failed(e)) => {
            forced = Some(StoreAs::Indeterminate);
            broke_off(e.to_string()).await
        }
    };
    if matches!(
        parts.status,
        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
    ) {
        let r = Response::from_parts(parts, Body::from(bytes));
        return not_kept(beat, "401 and 429 are never stored", r).await;
    }
    let store_as = match (forced, &rule) {
        (Some(forced), _) => Some(forced),
        (None, None) => None,
        (None, Some(rule)) => match rule.store_as(parts.status.as_u16()) {
            Some(a) => Some(a),
            None => {
                let r = answer(parts, bytes, gzip).await;
                return not_kept(beat, "the route's rule does not store this status", r).await;
            }
        },
    };
    beat.stop().await;
    let mut outcome = outcome(&parts, &bytes, &shared.limits);
    let mut kept = false;
    let mut attempt = 0u32;
    let mut store_as = store_as;
    loop {
        match backend
            .complete(key.clone(), claim, outcome.clone(), store_as)
            .await
        {
            Ok(k) => {
                kept = k;
                break;
            }
            Err(p) if p.0.status == 503 && attempt < 3 => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                attempt += 1;
            }
            Err(p)
                if p.0.type_uri.ends_with(":outcome-too-large")
                    && !matches!(outcome.body, StoredBody::Digest { .. }) =>
            {
                // A store whose cap is below what this layer was told (a remote namespace):
                // keep the digest, as for any response over the cap.
                outcome.body = StoredBody::digest_of(&outcome.body);
                outcome.headers.clear();
            }
            Err(p)
                if store_as.is_some()
                    && p.0.status == 422
                    && p.0
                        .detail
                        .as_deref()
                        .is_some_and(|d| d.contains("store_as")) =>
            {
                // A daemon older than `store_as`: its namespace's table decides instead, which
                // beats leaving the key in flight. Upgrade daemons before their clients.
                tracing::warn!("the store does not take store_as (an older daemon): the namespace's status table decides this outcome");
                store_as = None;
            }
            Err(p) => {
                // The handler ran and its answer is here: give it to the client rather than
                // an error that invites running it again. A retry finds the key in flight
                // until its lease ends.
                tracing::error!(problem = ?p, "storing an idempotent response failed");
                break;
            }
        }
    }
    shared.stats.count(if kept {
        Verdict::Completed
    } else {
        Verdict::NotStored
    });
    Executed {
        response: answer(parts, bytes, gzip).await,
        kept,
    }
}

/// Bodies at least this large are compressed on a blocking thread, off the async workers.
const COMPRESS_INLINE_MAX: usize = 64 << 10;

/// A buffered response for the client, compressed when it asks (`gzip`: `None` off, else
/// whether the client takes gzip).
async fn answer(
    mut parts: axum::http::response::Parts,
    bytes: Bytes,
    gzip: Option<bool>,
) -> Response<Body> {
    let Some(accepts) = gzip else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    if !accepts || bytes.len() < COMPRESS_INLINE_MAX {
        let bytes = encode_for_client(parts.status, &mut parts.headers, bytes, accepts);
        return Response::from_parts(parts, Body::from(bytes));
    }
    let (status, mut headers) = (parts.status, std::mem::take(&mut parts.headers));
    let len = bytes.len();
    match tokio::task::spawn_blocking(move || {
        let b = encode_for_client(status, &mut headers, bytes, true);
        (headers, b)
    })
    .await
    {
        Ok((headers, b)) => {
            parts.headers = headers;
            Response::from_parts(parts, Body::from(b))
        }
        // The compressing thread failed: the headers went with it, so answer a problem rather
        // than bytes without their headers.
        Err(e) => {
            tracing::error!(error = %e, len, "compressing an answer failed");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding-failed",
                "Encoding failed",
                "compressing the answer failed; retry without Accept-Encoding: gzip",
            )
            .into_response()
        }
    }
}

/// Extends the claim's lease every third of it while the handler runs, for at most `max`;
/// stops at the first refusal (the claim was taken over or finished).
async fn heartbeat(
    backend: Arc<dyn Backend>,
    key: RecordKey,
    claim: Stamp,
    lease_ms: u64,
    max: Duration,
) {
    let every = Duration::from_millis((lease_ms / 3).max(1));
    let started = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if started.elapsed() >= max {
            tracing::warn!(
                ?max,
                "a handler ran past execution_max: its lease is left to run out"
            );
            return;
        }
        if let Err(p) = backend.extend(key.clone(), claim, lease_ms).await {
            tracing::warn!(problem = ?p, "extending an idempotency key's lease failed");
            if p.0.status != 503 {
                return;
            }
        }
    }
}

/// Responses that are streams, not answers: passed through unrecorded.
fn streaming(r: &Response<Body>) -> bool {
    if r.status() == StatusCode::SWITCHING_PROTOCOLS {
        return true;
    }
    let ct = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    ct.starts_with("text/event-stream")
        || ct.starts_with("application/grpc")
        || ct.starts_with("multipart/x-mixed-replace")
}

/// Headers never stored nor replayed, whatever the namespace allows.
fn never_replayed(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "set-cookie"
            | "date"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "retry-after"
            | "idempotency-key"
            | "idempotent-replayed"
            | "idempotency-expires"
            | "idempotency-store"
            | "idempotency-indeterminate"
    ) || n.starts_with("ratelimit")
        || n.starts_with("x-ratelimit")
        || n.starts_with("x-rate-limit")
        || n.starts_with("access-control-")
}

/// What is stored for a response: its status, its headers (those the namespace allows, never
/// those that must not be replayed), and its body, or only the body's digest when the whole
/// is over the namespace's cap.
fn outcome(
    parts: &axum::http::response::Parts,
    bytes: &Bytes,
    limits: &NamespaceLimits,
) -> Outcome {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(n, _)| !never_replayed(n))
        .filter(|(n, _)| {
            limits
                .headers_allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(n.as_str()))
        })
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut o = Outcome {
        status: parts.status.as_u16(),
        headers,
        body: StoredBody::Full(bytes.to_vec()),
    };
    if o.size_bytes() > limits.outcome_bytes_max {
        o.body = StoredBody::digest_of(&o.body);
        // Headers alone over the cap: keep none rather than fail the completion (a digest
        // replays as a problem, without them).
        if o.size_bytes() > limits.outcome_bytes_max {
            o.headers.clear();
        }
    }
    o
}

/// The response a stored outcome replays as (`gzip` as for [`answer`]).
async fn replay(outcome: Outcome, gzip: Option<bool>) -> Response<Body> {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::OK);
    let body = match outcome.body {
        StoredBody::Full(b) | StoredBody::Redacted(b) => b,
        StoredBody::Digest { len, .. } => {
            return Problem::new(
                StatusCode::CONFLICT,
                "outcome-not-stored",
                "Response not kept",
                format!(
                    "this key's request was executed (status {status}, {len} bytes of body), but only a digest of its response was kept (it was over the stored-outcome cap, or the namespace keeps digests only): it cannot be replayed"
                ),
            )
            .into_response();
        }
    };
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    for (n, v) in outcome.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            if !never_replayed(&n) {
                parts.headers.append(n, v);
            }
        }
    }
    answer(parts, Bytes::from(body), gzip).await
}

/// Adds `Idempotent-Replayed` and, when the key holds an outcome, `Idempotency-Expires`.
fn marked(mut r: Response<Body>, replayed: bool, expires_at_ms: Option<u64>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        IDEMPOTENT_REPLAYED,
        HeaderValue::from_static(if replayed { "true" } else { "false" }),
    );
    let expires =
        expires_at_ms.and_then(|ms| std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
    if let Some(t) = expires {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t)) {
            h.insert(IDEMPOTENCY_EXPIRES, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn rendered(content_type: &'static str, body: &str, key: &str) -> String {
        let t = AnswerTemplate {
            content_type: HeaderValue::from_static(content_type),
            body: body.into(),
        };
        let r = t.render(StatusCode::CONFLICT, key, "17.0@eu1");
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[header::CONTENT_TYPE], content_type);
        let b = buffer(r.into_body(), usize::MAX, None).await.ok().unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn templates_fill_placeholders_once_escaped_for_their_type() {
        let body = "{key}|{claim}|{status}|{other}|{";
        // A key that looks like a placeholder stays as it is.
        assert_eq!(
            rendered("text/plain", body, "{status}").await,
            "{status}|17.0@eu1|409|{other}|{"
        );
        assert_eq!(
            rendered("text/html; charset=utf-8", body, "<b>&'\"").await,
            "&lt;b&gt;&amp;&#39;&quot;|17.0@eu1|409|{other}|{"
        );
        assert_eq!(
            rendered("application/json", r#"{"key":"{key}"}"#, "a\"b\\c").await,
            r#"{"key":"a\"b\\c"}"#
        );
    }

    #[test]
    fn a_route_rule_for_a_method_the_layer_leaves_alone_is_refused() {
        struct NoStore;
        impl Backend for NoStore {
            fn claim(
                &self,
                _: ClaimRequest,
                _: Option<RegionId>,
            ) -> super::super::backend::BoxFuture<
                '_,
                Result<Decision, crate::http::problem::ApiError>,
            > {
                unreachable!("never called")
            }
            fn complete(
                &self,
                _: RecordKey,
                _: Stamp,
                _: Outcome,
                _: Option<crate::http::api::StoreAs>,
            ) -> super::super::backend::BoxFuture<'_, Result<bool, crate::http::problem::ApiError>>
            {
                unreachable!("never called")
            }
            fn release(
                &self,
                _: RecordKey,
                _: Stamp,
            ) -> super::super::backend::BoxFuture<'_, Result<(), crate::http::problem::ApiError>>
            {
                unreachable!("never called")
            }
            fn extend(
                &self,
                _: RecordKey,
                _: Stamp,
                _: u64,
            ) -> super::super::backend::BoxFuture<'_, Result<(), crate::http::problem::ApiError>>
            {
                unreachable!("never called")
            }
            fn limits(&self, _: &str) -> Option<NamespaceLimits> {
                Some(NamespaceLimits::daemon_defaults())
            }
        }
        let config = LayerConfig::new("ns", PrincipalFrom::Fixed("p".into()))
            .route(RoutePolicy::under("/x").method(Method::PUT).store(200, 299));
        let e = IdempotencyLayer::new(NoStore, config).err().unwrap();
        assert!(matches!(e, LayerError::RouteMethodNotGuarded { .. }), "{e}");
        assert!(e.to_string().contains("PUT"), "{e}");
        let config = LayerConfig::new("ns", PrincipalFrom::Fixed("p".into())).route(
            RoutePolicy::under("/x")
                .method(Method::PATCH)
                .store(200, 299),
        );
        assert!(IdempotencyLayer::new(NoStore, config).is_ok());
    }
}
