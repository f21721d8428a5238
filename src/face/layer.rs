//! `IdempotencyLayer`: a tower layer that gives any axum or hyper service exact
//! `Idempotency-Key` semantics, backed by an embedded store or (next) a region daemon.
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
use http_body_util::BodyExt as _;
use tower::{Layer, Service, ServiceExt as _};

use super::backend::{Backend, NamespaceLimits};
use super::fingerprint::fingerprint;
use super::key::{request_key, KeyError, IDEMPOTENCY_KEY};
use crate::clock::Stamp;
use crate::http::problem::Problem;
use crate::record::{AttemptToken, Body as StoredBody, Outcome, RecordKey};
use crate::store::{ClaimRequest, Decision};

/// `Idempotent-Replayed`: `true` on a replay, `false` on the first execution.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// `Idempotency-Expires`: when the key expires (an HTTP date).
pub const IDEMPOTENCY_EXPIRES: HeaderName = HeaderName::from_static("idempotency-expires");
/// `Idempotency-Store: skip`, set by the inner service, keeps its response from being stored.
pub const IDEMPOTENCY_STORE: HeaderName = HeaderName::from_static("idempotency-store");

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
    /// Status of the answer to a key reused with another request. Default 422.
    pub mismatch_status: StatusCode,
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
            mismatch_status: StatusCode::UNPROCESSABLE_ENTITY,
        }
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
}

/// Why a layer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The store does not serve the namespace.
    #[error("the store has no namespace {0:?}")]
    UnknownNamespace(String),
}

impl IdempotencyLayer {
    /// A layer claiming keys in `config.namespace` of `backend`.
    pub fn new(backend: impl Backend, config: LayerConfig) -> Result<Self, LayerError> {
        let limits = backend
            .limits(&config.namespace)
            .ok_or_else(|| LayerError::UnknownNamespace(config.namespace.clone()))?;
        Ok(Self {
            shared: Arc::new(Shared {
                backend: Arc::new(backend),
                config,
                limits,
            }),
        })
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
    let key = match request_key(req.headers(), shared.limits.key_len_max) {
        Ok(Some(k)) => k,
        Ok(None) => {
            let path = req.uri().path();
            if cfg.required.iter().any(|p| path.starts_with(p.as_str())) {
                return bad_request("missing-key", KeyError::Missing.to_string());
            }
            return call_inner(inner, req).await;
        }
        Err(e) => return bad_request("bad-key", e.to_string()),
    };
    let echo = |mut r: Response<Body>| {
        if let Some(k) = &raw_key {
            r.headers_mut().insert(IDEMPOTENCY_KEY, k.clone());
        }
        r
    };
    let principal = match principal(&cfg.principal, &req) {
        Some(p) if !p.is_empty() => p,
        _ => {
            return echo(bad_request(
                "missing-principal",
                "the request carries no principal (who the key belongs to)",
            ))
        }
    };
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, cfg.request_bytes_max)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return echo(
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
            )
        }
        Err(e) => {
            return echo(bad_request(
                "invalid-request",
                format!("reading the body failed: {e}"),
            ))
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
    let record_key = RecordKey::new(&cfg.namespace, &principal, &key);
    let deadline = cfg.in_flight_wait.map(|w| Instant::now() + w);
    let mut pause = Duration::from_millis(20);
    loop {
        let claim = ClaimRequest {
            key: record_key.clone(),
            fingerprint: fp,
            attempt: AttemptToken(rand::random::<u128>() | 1),
        };
        let decision = match shared.backend.claim(claim).await {
            Ok(d) => d,
            Err(p) => return echo(p.into_response()),
        };
        match decision {
            Decision::Execute {
                claim,
                expires_at_ms,
                ..
            } => {
                let req = Request::from_parts(parts, Body::from(bytes));
                // Its own task: the handler runs to completion and its outcome is stored even
                // if this request's future is dropped (the client went away).
                let run = tokio::spawn(execute(shared.clone(), inner, req, record_key, claim));
                let r = match run.await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "idempotent handler task failed");
                        Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "handler-failed",
                            "Handler failed",
                            "the handler did not finish; the key was not completed",
                        )
                        .into_response()
                    }
                };
                return echo(marked(r, false, expires_at_ms));
            }
            Decision::Replay {
                outcome,
                expires_at_ms,
                ..
            } => return echo(marked(replay(outcome), true, expires_at_ms)),
            Decision::InFlight {
                lease_expires_at_ms,
                claim,
                region,
            } => {
                if let Some(deadline) = deadline {
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
                return echo(p.into_response());
            }
            Decision::Mismatch { claim } => {
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
                return echo(p.into_response());
            }
            Decision::Unavailable {
                reason,
                retry_after_ms,
            } => return echo(Problem::from_unavailable(reason, retry_after_ms).into_response()),
        }
    }
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

/// Runs the inner service for a claimed key and records what it answered.
async fn execute<S, RB>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<Body>,
    key: RecordKey,
    claim: Stamp,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Send + 'static,
    S::Future: Send,
    RB: HttpBody<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let backend = shared.backend.clone();
    let heartbeat = tokio::spawn(heartbeat(
        backend.clone(),
        key.clone(),
        claim,
        shared.limits.lease_ms,
    ));
    let response = call_inner(inner, req).await;
    let release = |why: &'static str| {
        let (backend, key) = (backend.clone(), key.clone());
        async move {
            if let Err(p) = backend.release(key, claim).await {
                tracing::warn!(why, problem = ?p, "releasing an idempotency key failed");
            }
        }
    };
    if streaming(&response) {
        heartbeat.abort();
        release("streaming response").await;
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            heartbeat.abort();
            // The handler ran but its answer broke off: what it did is unknown, and nothing
            // can be replayed. Release, so that a retry runs (and the handler's own
            // idempotency, if any, decides).
            release("response body failed").await;
            return Problem::new(
                StatusCode::BAD_GATEWAY,
                "response-failed",
                "Response failed",
                format!("the handler's response body failed: {e}"),
            )
            .into_response();
        }
    };
    heartbeat.abort();
    let skip = parts
        .headers
        .remove(IDEMPOTENCY_STORE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"skip"));
    let never_stored = matches!(
        parts.status,
        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
    );
    if skip || never_stored {
        release("not to be stored").await;
    } else {
        let outcome = outcome(&parts, &bytes, shared.limits.outcome_bytes_max);
        if let Err(p) = backend.complete(key, claim, outcome).await {
            // The handler ran and its answer is here: give it to the client (a retry will find
            // the key in flight until its lease ends, then run again).
            tracing::error!(problem = ?p, "storing an idempotent response failed");
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Extends the claim's lease every third of it while the handler runs.
async fn heartbeat(backend: Arc<dyn Backend>, key: RecordKey, claim: Stamp, lease_ms: u64) {
    let every = Duration::from_millis((lease_ms / 3).max(50));
    loop {
        tokio::time::sleep(every).await;
        if let Err(p) = backend.extend(key.clone(), claim, lease_ms).await {
            tracing::warn!(problem = ?p, "extending an idempotency key's lease failed");
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
    ) || n.starts_with("ratelimit")
        || n.starts_with("x-ratelimit")
        || n.starts_with("access-control-")
}

/// What is stored for a response: its status, its headers (the namespace keeps its
/// allow-list), and its body, or only the body's digest when it is over the cap.
fn outcome(parts: &axum::http::response::Parts, bytes: &Bytes, cap: usize) -> Outcome {
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(n, _)| !never_replayed(n))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let mut o = Outcome {
        status: parts.status.as_u16(),
        headers,
        body: StoredBody::Full(bytes.to_vec()),
    };
    if o.size_bytes() > cap {
        o.body = StoredBody::digest_of(&o.body);
        // Headers alone over the cap: keep none rather than fail the completion.
        if o.size_bytes() > cap {
            o.headers.clear();
        }
    }
    o
}

/// The response a stored outcome replays as.
fn replay(outcome: Outcome) -> Response<Body> {
    let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::OK);
    let body = match outcome.body {
        StoredBody::Full(b) | StoredBody::Redacted(b) => b,
        StoredBody::Digest { len, .. } => {
            return Problem::new(
                StatusCode::CONFLICT,
                "outcome-not-stored",
                "Response not kept",
                format!(
                    "this key's request was executed (status {status}, {len} bytes of body), but its response was too large to keep: it cannot be replayed"
                ),
            )
            .into_response();
        }
    };
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    for (n, v) in outcome.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            if !never_replayed(&n) {
                r.headers_mut().append(n, v);
            }
        }
    }
    r
}

/// Adds `Idempotent-Replayed` and `Idempotency-Expires`.
fn marked(mut r: Response<Body>, replayed: bool, expires_at_ms: u64) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(
        IDEMPOTENT_REPLAYED,
        HeaderValue::from_static(if replayed { "true" } else { "false" }),
    );
    if let Some(t) = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(expires_at_ms)) {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t)) {
            h.insert(IDEMPOTENCY_EXPIRES, v);
        }
    }
    r
}
