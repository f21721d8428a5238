//! The store API over HTTP+JSON (axum): what API servers in any language call. Routes, auth,
//! problem details and the wait for durability; `docs/http-api.md` is the reference.
//!
//! Every answer that depends on a write is sent only once the log is durable up to it: the
//! handler appends, then awaits the flusher thread's durable position (a `watch` channel), so
//! concurrent requests share one fdatasync and no tokio worker ever blocks in a sync.

pub mod api;
pub mod auth;
pub mod problem;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::Semaphore;

use crate::clock::{wall_clock_ms, RegionId, Stamp};
use crate::daemon::metrics::{Metrics, TerminalLabels};
use crate::durable::{DurableWaiter, NotDurable};
use crate::record::{
    AttemptToken, ClaimStatus, Fingerprint, ItemId, ItemKind, RecordKey, Terminal,
};
use crate::store::storage::FsStorage;
use crate::store::{
    ClaimRequest, Completion, Decision, LookupUnanswered, Pending, Store, Unavailable,
};

use api::*;
use auth::Tokens;
use problem::{ApiError, Problem};

/// The store a daemon serves.
pub type DaemonStore = Store<FsStorage>;

/// The OpenAPI 3.1 description the daemon serves at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// What the handlers share.
pub struct ApiState {
    region: RegionId,
    store: OnceLock<Arc<DaemonStore>>,
    durable: DurableWaiter,
    tokens: Tokens,
    metrics: Arc<Metrics>,
    metrics_need_token: bool,
    draining: AtomicBool,
}

impl ApiState {
    /// State for `region`, with no store yet (it answers 503 until [`ApiState::set_store`]).
    pub fn new(
        region: RegionId,
        durable: DurableWaiter,
        tokens: Tokens,
        metrics: Arc<Metrics>,
        metrics_need_token: bool,
    ) -> Self {
        Self {
            region,
            store: OnceLock::new(),
            durable,
            tokens,
            metrics,
            metrics_need_token,
            draining: AtomicBool::new(false),
        }
    }

    /// The store, once recovered: from now on the API answers.
    pub fn set_store(&self, store: Arc<DaemonStore>) {
        let _ = self.store.set(store);
    }

    /// Marks the daemon as shutting down: `/readyz` turns false so load balancers move away.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the store answers claims now, and if not, why (`recovering`, `fenced`,
    /// `restart_fence`, `log_failed`, `shutting_down`).
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Acquire) {
            return Err("shutting_down");
        }
        let Some(store) = self.store.get() else {
            return Err("recovering");
        };
        if store.log().is_poisoned() || self.durable.current().failed {
            return Err("log_failed");
        }
        if store.is_fenced() {
            return Err("fenced");
        }
        if wall_clock_ms() <= store.clock().restart_fence_ms() {
            return Err("restart_fence");
        }
        Ok(())
    }

    fn store(&self) -> Result<&Arc<DaemonStore>, ApiError> {
        self.store.get().ok_or_else(|| {
            Problem::unavailable("recovering", "the index is being rebuilt", 1_000).into()
        })
    }

    /// Waits until `pending` is durable; the answer may then be given out.
    async fn durable<T>(&self, pending: Pending<T>) -> Result<T, ApiError> {
        self.durable.wait(pending).await.map_err(|e| match e {
            NotDurable::LogFailed => Problem::from_unavailable(Unavailable::LogFailed, 5_000).into(),
            // The daemon is exiting before its last flush was published: the write may yet be
            // durable, so this is not an answer about the key.
            NotDurable::Stopped => Problem::unavailable(
                "shutting_down",
                "the daemon stopped before this answer was durable; the request may have taken effect: re-send it unchanged (same attempt token)",
                1_000,
            )
            .into(),
        })
    }
}

/// Largest body of the calls that carry no outcome (claim, release, extend, read), bytes.
pub const SMALL_BODY_MAX: usize = 64 << 10;

/// What the router bounds.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Largest body of complete and resolve, bytes.
    pub request_bytes_max: usize,
    /// A request's whole time (durability wait and queueing included).
    pub request_timeout: Duration,
    /// Requests past authentication served at once; more wait in line (within their time).
    pub concurrent_requests_max: usize,
}

/// The router: the store API, health, metrics and the OpenAPI file.
///
/// In front of every route (`front_layer`, one layer: each layer costs a boxed future per
/// request): the `Idem-Region` header on every answer; the request's time limit;
/// authentication from the path and headers alone, before any body is read; the line for a
/// turn. Then per-route body limits.
fn router(front: Front, limits: RouterLimits) -> Router {
    let small = DefaultBodyLimit::max(SMALL_BODY_MAX);
    let state = front.state.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/ns/{namespace}/claim", post(claim).layer(small))
        .route("/v1/ns/{namespace}/complete", post(complete))
        .route("/v1/ns/{namespace}/release", post(release).layer(small))
        .route("/v1/ns/{namespace}/extend", post(extend).layer(small))
        .route("/v1/ns/{namespace}/read", post(read).layer(small))
        .route("/v1/ns/{namespace}/resolve", post(resolve))
        .route("/v1/ns/{namespace}/policy", get(policy))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limits.request_bytes_max))
        .layer(middleware::from_fn_with_state(front, front_layer))
        .with_state(state)
}

/// The daemon's HTTP service: claim and complete, the calls every request of an API server
/// makes, go straight to their handlers; every other route (and any claim or complete that
/// is not JSON) goes through the router. Both ways pass the same front (authentication
/// before the body, line, time limit, region header) and the same handler code.
#[derive(Clone)]
pub struct ApiService {
    front: Front,
    router: Router,
    request_bytes_max: usize,
}

/// The calls [`ApiService`] serves without the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hot {
    Claim,
    Complete,
}

impl ApiService {
    /// The service over `state` with `limits`.
    pub fn new(state: Arc<ApiState>, limits: RouterLimits) -> Self {
        let region = HeaderValue::from_str(state.region.as_str())
            .expect("region ids are header-safe (a-z0-9-_)");
        let front = Front {
            state,
            permits: Arc::new(Semaphore::new(limits.concurrent_requests_max)),
            timeout: limits.request_timeout,
            region,
        };
        Self {
            router: router(front.clone(), limits),
            front,
            request_bytes_max: limits.request_bytes_max,
        }
    }

    /// The namespace and call of a request the direct path serves: a JSON POST to claim or
    /// complete.
    fn hot<B>(req: &axum::http::Request<B>) -> Option<(String, Hot)> {
        if req.method() != axum::http::Method::POST {
            return None;
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !json {
            return None;
        }
        let rest = req.uri().path().strip_prefix("/v1/ns/")?;
        let (ns, call) = rest.split_once('/')?;
        let hot = match call {
            "claim" => Hot::Claim,
            "complete" => Hot::Complete,
            _ => return None,
        };
        (!ns.is_empty() && !ns.contains('%')).then(|| (ns.to_owned(), hot))
    }

    /// Serves a claim or complete: front, body within its limit, handler.
    async fn serve_hot<B>(self, ns: String, hot: Hot, req: axum::http::Request<B>) -> Response
    where
        B: axum::body::HttpBody<Data = axum::body::Bytes> + Send,
        B::Error: Into<axum::BoxError>,
    {
        use http_body_util::BodyExt as _;
        let (parts, body) = req.into_parts();
        let s = &self.front.state;
        let auth = authorize(s, parts.uri.path(), &parts.headers);
        let limit = match hot {
            Hot::Claim => SMALL_BODY_MAX,
            Hot::Complete => self.request_bytes_max,
        };
        let served = async {
            let bytes = match http_body_util::Limited::new(body, limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return too_large().into_response()
                }
                Err(e) => {
                    return Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-request",
                        "Invalid request",
                        // The router's words (axum's body rejection) for the same failure.
                        format!("Failed to buffer the request body: {e}"),
                    )
                    .into_response();
                }
            };
            let answer = match hot {
                Hot::Claim => match json_body(&bytes) {
                    Ok(b) => claim_call(s, &ns, &parts.headers, b).await,
                    Err(e) => Err(e),
                },
                Hot::Complete => match json_body(&bytes) {
                    Ok(b) => complete_call(s, &ns, &parts.headers, b).await,
                    Err(e) => Err(e),
                },
            };
            answer.unwrap_or_else(IntoResponse::into_response)
        };
        self.front.serve(auth, true, served).await
    }
}

impl<B> tower::Service<axum::http::Request<B>> for ApiService
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError> + std::fmt::Display,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        use tower::ServiceExt as _;
        match Self::hot(&req) {
            Some((ns, hot)) => {
                let this = self.clone();
                Box::pin(async move { Ok(this.serve_hot(ns, hot, req).await) })
            }
            None => {
                let router = self.router.clone();
                Box::pin(async move { router.oneshot(req.map(axum::body::Body::new)).await })
            }
        }
    }
}

/// 413 for a body over its call's limit.
fn too_large() -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request-too-large",
        "Request too large",
        "the body exceeds this call's limit (64 KiB, or limits.request_bytes_max for complete and resolve)",
    )
}

/// A JSON body parsed on the direct path, with the router's statuses: 400 for text that is
/// not JSON, 422 for JSON of the wrong shape.
fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |status, text: String| -> ApiError {
        Problem::new(status, "invalid-request", "Invalid request", text).into()
    };
    let syntax = |e: &dyn std::fmt::Display| {
        invalid(
            StatusCode::BAD_REQUEST,
            format!("Failed to parse the request body as JSON: {e}"),
        )
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let t = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        if e.inner().classify() == serde_json::error::Category::Data {
            invalid(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        } else {
            syntax(&e)
        }
    })?;
    de.end().map_err(|e| syntax(&e))?;
    Ok(t)
}

/// What [`front_layer`] needs.
#[derive(Clone)]
struct Front {
    state: Arc<ApiState>,
    permits: Arc<Semaphore>,
    timeout: Duration,
    region: HeaderValue,
}

impl Front {
    /// Serves one request behind the front: `auth` is the token check made from the path and
    /// headers before any body is read; store calls (`store_call`) wait in line for a turn;
    /// the whole request is bounded by the time limit; the answer names this region.
    async fn serve<F>(&self, auth: Result<(), ApiError>, store_call: bool, served: F) -> Response
    where
        F: std::future::Future<Output = Response>,
    {
        let run = async {
            if let Err(e) = auth {
                return e.into_response();
            }
            if !store_call {
                // Health, readiness and metrics never wait behind store calls: an overloaded
                // daemon must not look dead to its liveness probe.
                return served.await;
            }
            match self.permits.acquire().await {
                Ok(_permit) => served.await,
                Err(_) => {
                    Problem::unavailable("shutting_down", "shutting down", 1_000).into_response()
                }
            }
        };
        let mut r = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r,
            Err(_) => Problem::unavailable(
                "timeout",
                "the request took longer than limits.request_timeout_ms; it may have taken effect: re-send it unchanged (same attempt token)",
                1_000,
            )
            .into_response(),
        };
        r.headers_mut()
            .insert(HeaderName::from_static(REGION_HEADER), self.region.clone());
        r
    }
}

/// The one layer in front of every route of the router: region header, time limit,
/// authentication, line.
async fn front_layer(State(f): State<Front>, req: Request, next: Next) -> Response {
    let auth = authorize(&f.state, req.uri().path(), req.headers());
    let store_call = req.uri().path().starts_with("/v1/");
    f.serve(auth, store_call, next.run(req)).await
}

/// Checks the bearer token against the path before the body is read, so unauthenticated
/// callers cost no buffering. Handlers check again (defence in depth). Namespaces in paths
/// are never percent-encoded (their names are `a-z0-9-_.`), so the raw path is what counts.
fn authorize(s: &ApiState, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let checked = if path == "/v1/status" {
        s.tokens.operator(headers)
    } else if let Some(rest) = path.strip_prefix("/v1/ns/") {
        match rest.split_once('/') {
            Some((_, "resolve")) => s.tokens.operator(headers),
            Some((ns, "read")) => s.tokens.reader(headers, ns),
            Some((ns, _)) => s.tokens.namespace(headers, ns),
            None => Ok(()),
        }
    } else if path == "/metrics" && s.metrics_need_token {
        s.tokens.operator(headers)
    } else {
        Ok(())
    };
    checked
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "see /openapi.json for each route's method",
    )
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such route; see /openapi.json",
    )
}

async fn healthz() -> Response {
    Json(serde_json::json!({ "alive": true })).into_response()
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    match s.readiness() {
        Ok(()) => Json(serde_json::json!({ "ready": true })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if s.metrics_need_token {
        if let Err(p) = s.tokens.operator(&headers) {
            return p.into_response();
        }
    }
    if let Some(store) = s.store.get() {
        s.metrics.keys.set(store.key_count() as i64);
        let bytes: u64 = store.log().segments().iter().map(|g| g.size).sum();
        s.metrics.log_bytes.set(bytes as i64);
    }
    s.metrics.ready.set(i64::from(s.readiness().is_ok()));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn status(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.tokens.operator(&headers)?;
    let ready = s.readiness();
    let (keys, log_bytes, log_segments, namespaces) = match s.store.get() {
        Some(store) => {
            let segments = store.log().segments();
            (
                store.key_count() as u64,
                segments.iter().map(|g| g.size).sum(),
                segments.len() as u64,
                store.namespace_names(),
            )
        }
        None => (0, 0, 0, Vec::new()),
    };
    Ok(Json(StatusAnswer {
        region: s.region.to_string(),
        ready: ready.is_ok(),
        reason: ready.err().map(str::to_owned),
        keys,
        log_bytes,
        log_segments,
        namespaces,
    })
    .into_response())
}

/// The body, or a 400/413 problem naming what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| -> ApiError {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            Problem::new(
                if status.is_client_error() {
                    status
                } else {
                    StatusCode::BAD_REQUEST
                },
                "invalid-request",
                "Invalid request",
                e.body_text(),
            )
        }
        .into()
    })
}

impl ApiState {
    /// The store, the key and the claim a complete, release or extend is about.
    fn claim_target(
        &self,
        ns: &str,
        principal: &str,
        key: &str,
        claim: &str,
    ) -> Result<(&Arc<DaemonStore>, RecordKey, Stamp), ApiError> {
        let claim: Stamp = claim
            .parse()
            .map_err(|e| Problem::bad_field("claim", format!("{e}")))?;
        Ok((self.store()?, RecordKey::new(ns, principal, key), claim))
    }
}

fn terminal_name(t: ClaimStatus) -> &'static str {
    match t {
        ClaimStatus::Completed => "completed",
        ClaimStatus::Indeterminate => "indeterminate",
        ClaimStatus::Released => "released",
        ClaimStatus::InFlight => "in_flight",
        ClaimStatus::Placeholder => "placeholder",
    }
}

/// RFC 3339 of a Unix ms time, or `None` when out of range (past year 9999).
fn rfc3339_ms(ms: u64) -> Option<String> {
    use std::fmt::Write as _;
    let t = std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    let mut out = String::new();
    write!(out, "{}", humantime::format_rfc3339_millis(t)).ok()?;
    Some(out)
}

async fn claim(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ClaimBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.namespace(&headers, &ns)?;
    claim_call(&s, &ns, &headers, body(b)?).await
}

/// The region a claim failed over from (`Idem-Prior-Region`), if the request names one; 400
/// when the header is not a region id.
pub(crate) fn prior_region(headers: &HeaderMap) -> Result<Option<RegionId>, ApiError> {
    match headers.get(PRIOR_REGION_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| RegionId::new(v).ok())
            .map(Some)
            .ok_or_else(|| {
                Problem::bad_field(
                    PRIOR_REGION_HEADER,
                    "not a region id (a-z0-9-_, 1 to 15 bytes)",
                )
                .into()
            }),
    }
}

/// A claim that failed over from region `prior`: that region is to be asked about the key
/// before granting it (design §4). No daemon is connected to other regions yet (the transport
/// comes with the multi-region issue), so the lookup goes unanswered and the namespace's
/// `lookup_unanswered` decides: grant, or 503 `lookup_unanswered`.
pub(crate) fn unanswered_lookup(
    policy: &crate::store::NamespacePolicy,
    prior: RegionId,
) -> Result<(), ApiError> {
    match policy.config().lookup_unanswered {
        LookupUnanswered::Grant => {
            tracing::debug!(%prior, "failover claim: prior region not reachable; granting");
            Ok(())
        }
        LookupUnanswered::Unavailable => Err(ApiError::from(Problem::unavailable(
            "lookup_unanswered",
            format!("region {prior} could not be asked about the key, and this namespace refuses to grant without an answer"),
            1_000,
        ))),
    }
}

/// A claim, once its body is parsed (the router's handler and the direct path).
async fn claim_call(
    s: &ApiState,
    ns: &str,
    headers: &HeaderMap,
    b: ClaimBody,
) -> Result<Response, ApiError> {
    s.tokens.namespace(headers, ns)?;
    let fingerprint = unhex::<32>(&b.fingerprint)
        .ok_or_else(|| Problem::bad_field("fingerprint", "64 hex digits"))?;
    let attempt = parse_attempt(&b.attempt)
        .ok_or_else(|| Problem::bad_field("attempt", "exactly 32 hex digits (128 random bits)"))?;
    let prior = prior_region(headers)?;
    let store = s.store()?;
    let policy = store
        .namespace(ns)
        .ok_or_else(|| Problem::from(crate::store::StoreError::UnknownNamespace(ns.to_owned())))?;
    if let Some(prior) = prior.filter(|p| *p != s.region) {
        let refused = unanswered_lookup(policy, prior);
        let outcome = if refused.is_ok() {
            "granted_unanswered"
        } else {
            "refused_unanswered"
        };
        s.metrics
            .failover_lookups
            .get_or_create(&s.metrics.lookup_labels(prior, outcome))
            .inc();
        if refused.is_err() {
            s.metrics.claim("unavailable");
        }
        refused?;
    }
    let req = ClaimRequest {
        key: RecordKey::new(ns, &b.principal, &b.key),
        fingerprint: Fingerprint(fingerprint),
        attempt: AttemptToken(attempt),
    };
    let pending = store.claim(wall_clock_ms(), &req)?;
    let decision = s.durable(pending).await?;
    Ok(match decision {
        Decision::Execute {
            claim,
            lease_until_ms,
            took_over,
            resumed,
            expires_at_ms,
        } => {
            s.metrics.claim("execute");
            s.metrics.takeovers.inc_by(took_over.len() as u64);
            if resumed {
                s.metrics.resumes.inc();
            }
            Json(ClaimAnswer::Execute {
                claim: claim.to_string(),
                lease_until_ms,
                expires_at_ms,
                took_over: took_over.iter().map(Stamp::to_string).collect(),
                resumed,
            })
            .into_response()
        }
        Decision::Replay {
            claim,
            outcome,
            indeterminate,
            expires_at_ms,
        } => {
            s.metrics.claim("replay");
            Json(ClaimAnswer::Replay {
                claim: claim.to_string(),
                outcome: OutcomeJson::from_outcome(&outcome),
                indeterminate,
                expires_at_ms,
            })
            .into_response()
        }
        Decision::InFlight {
            claim,
            region,
            lease_expires_at_ms,
        } => {
            s.metrics.claim("in_flight");
            let wait_ms = lease_expires_at_ms
                .saturating_sub(wall_clock_ms())
                .clamp(1, 1_000);
            Problem {
                decision: Some("in_flight".into()),
                state: Some("in_flight".into()),
                origin_region: Some(region.to_string()),
                lease_expires_at: rfc3339_ms(lease_expires_at_ms),
                lease_expires_at_ms: Some(lease_expires_at_ms),
                retry_after_seconds: Some(wait_ms.div_ceil(1000)),
                claim: Some(claim.to_string()),
                ..Problem::new(
                    StatusCode::CONFLICT,
                    "in-flight",
                    "Request in flight",
                    "another request with this key is running; retry later",
                )
            }
            .into_response()
        }
        Decision::Mismatch { claim } => {
            s.metrics.claim("mismatch");
            Problem {
                decision: Some("mismatch".into()),
                claim: Some(claim.to_string()),
                ..Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "mismatch",
                    "Key reused with another request",
                    "this idempotency key was used with a different request fingerprint",
                )
            }
            .into_response()
        }
        Decision::Unavailable {
            reason,
            retry_after_ms,
        } => {
            s.metrics.claim("unavailable");
            Problem::from_unavailable(reason, retry_after_ms).into_response()
        }
    })
}

async fn complete(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<CompleteBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.namespace(&headers, &ns)?;
    complete_call(&s, &ns, &headers, body(b)?).await
}

/// A completion, once its body is parsed (the router's handler and the direct path).
async fn complete_call(
    s: &ApiState,
    ns: &str,
    headers: &HeaderMap,
    b: CompleteBody,
) -> Result<Response, ApiError> {
    s.tokens.namespace(headers, ns)?;
    let outcome = b
        .outcome
        .to_outcome()
        .map_err(|e| Problem::bad_field("outcome", e))?;
    let (store, key, claim) = s.claim_target(ns, &b.principal, &b.key, &b.claim)?;
    let now = wall_clock_ms();
    let done = s
        .durable(store.complete_as(now, &key, claim, outcome, b.store_as.map(Into::into))?)
        .await?;
    if claim.region == s.region && done.terminal != ClaimStatus::Released {
        let took = now.saturating_sub(claim.physical_ms());
        s.metrics
            .time_to_outcome_seconds
            .observe(took as f64 / 1000.0);
    }
    Ok(finished(s, done))
}

/// `GET /v1/ns/{namespace}/policy`: the namespace's policy as this daemon applies it (limits,
/// statuses kept, headers replayed), for callers that must agree with it, such as the HTTP
/// face's remote store.
async fn policy(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    s.tokens.namespace(&headers, &ns)?;
    let store = s.store()?;
    let policy = store
        .namespace(&ns)
        .ok_or_else(|| Problem::from(crate::store::StoreError::UnknownNamespace(ns.clone())))?;
    Ok(Json(policy.config()).into_response())
}

/// Counts a completion or release and answers it.
fn finished(s: &ApiState, done: Completion) -> Response {
    s.metrics
        .finished
        .get_or_create(&TerminalLabels {
            terminal: terminal_name(done.terminal),
        })
        .inc();
    if done.superseded {
        s.metrics.superseded.inc();
    }
    Json(FinishAnswer {
        terminal: terminal_name(done.terminal).into(),
        superseded: done.superseded,
    })
    .into_response()
}

async fn release(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ReleaseBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.namespace(&headers, &ns)?;
    let b = body(b)?;
    let (store, key, claim) = s.claim_target(&ns, &b.principal, &b.key, &b.claim)?;
    let done = s
        .durable(store.release(wall_clock_ms(), &key, claim)?)
        .await?;
    Ok(finished(&s, done))
}

async fn extend(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ExtendBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.namespace(&headers, &ns)?;
    let b = body(b)?;
    let (store, key, claim) = s.claim_target(&ns, &b.principal, &b.key, &b.claim)?;
    let lease_until_ms = s
        .durable(store.extend(wall_clock_ms(), &key, claim, b.lease_ms)?)
        .await?;
    s.metrics.lease_extensions.inc();
    Ok(Json(ExtendAnswer { lease_until_ms }).into_response())
}

async fn read(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ReadBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.reader(&headers, &ns)?;
    let b = body(b)?;
    let store = s.store()?;
    let key = RecordKey::new(&ns, &b.principal, &b.key);
    let view = s
        .durable(store.read(wall_clock_ms(), &key)?)
        .await?
        .ok_or(crate::store::StoreError::UnknownKey)?;
    let retired = store.retirements();
    let winner = view
        .record
        .generations(&retired)
        .last()
        .and_then(|g| g.winner)
        .map(|w| w.to_string());
    let claims = view
        .record
        .claims()
        .map(|(stamp, c)| ClaimView {
            claim: stamp.to_string(),
            region: stamp.region.to_string(),
            status: terminal_name(c.status()).into(),
            fingerprint: c.facts.as_ref().map(|f| hex(&f.fingerprint.0)),
            lease_until_ms: c.lease_until_ms,
            outcome: match &c.terminal {
                Some(Terminal::Completed(o)) | Some(Terminal::Indeterminate(o)) => {
                    Some(OutcomeJson::from_outcome(o))
                }
                _ => None,
            },
        })
        .collect();
    let items = view
        .items
        .iter()
        .map(|i| ItemView {
            id: hex(&i.id.0),
            kind: match i.kind {
                ItemKind::Duplicate => "duplicate",
                ItemKind::KeyReuse => "key_reuse",
                ItemKind::Verify => "verify",
                ItemKind::Orphan => "orphan",
                ItemKind::Reversed => "reversed",
            }
            .into(),
            claim: i.claim.to_string(),
            actionable: i.actionable,
            resolved: i.resolved,
        })
        .collect();
    Ok(Json(ReadAnswer {
        claims,
        winner,
        items,
    })
    .into_response())
}

async fn resolve(
    State(s): State<Arc<ApiState>>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    b: Result<Json<ResolveBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    s.tokens.operator(&headers)?;
    let b = body(b)?;
    let item = unhex::<16>(&b.item).ok_or_else(|| Problem::bad_field("item", "32 hex digits"))?;
    let store = s.store()?;
    let key = RecordKey::new(&ns, &b.principal, &b.key);
    let resolution = s
        .durable(store.resolve(
            wall_clock_ms(),
            &key,
            ItemId(item),
            &b.by,
            &b.note,
            b.hook_result,
            b.provider_ref,
        )?)
        .await?;
    Ok(Json(ResolveAnswer {
        at: resolution.at.to_string(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, content_type: Option<&str>) -> axum::http::Request<()> {
        let mut b = axum::http::Request::builder().method(method).uri(path);
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_plain_json_posts_to_claim_and_complete_take_the_direct_path() {
        let json = Some("application/json");
        assert_eq!(
            ApiService::hot(&req("POST", "/v1/ns/pay/claim", json)),
            Some(("pay".into(), Hot::Claim))
        );
        assert_eq!(
            ApiService::hot(&req(
                "POST",
                "/v1/ns/pay/complete?x=1",
                Some("Application/JSON")
            )),
            Some(("pay".into(), Hot::Complete))
        );
        for (method, path, ct) in [
            ("GET", "/v1/ns/pay/claim", json),
            ("POST", "/v1/ns/pay/release", json),
            ("POST", "/v1/ns/pay/claim/", json),
            ("POST", "/v1/ns//claim", json),
            ("POST", "/v1/ns/pa%79/claim", json),
            ("POST", "/v1/ns/pay/claim", None),
            (
                "POST",
                "/v1/ns/pay/claim",
                Some("application/json; charset=utf-8"),
            ),
            ("POST", "/v1/ns/pay/claim", Some("text/plain")),
        ] {
            assert_eq!(
                ApiService::hot(&req(method, path, ct)),
                None,
                "{method} {path} {ct:?}"
            );
        }
    }
}
