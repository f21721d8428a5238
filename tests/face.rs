//! `IdempotencyLayer` in front of a counting handler, over real sockets, with an embedded store.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use common::{endless_events, first_chunk, http, post_keyed, Answer};
use idem::clock::RegionId;
use idem::face::{
    AnswerTemplate, EmbeddedStore, IdempotencyLayer, LayerConfig, PrincipalFrom, RoutePolicy,
};
use idem::store::policy::{NamespaceConfig, StatusRange};
use idem::store::StoreConfig;
use serde_json::{json, Value};

/// How many times each handler ran.
#[derive(Default)]
struct Counts {
    charges: AtomicUsize,
    skip: AtomicUsize,
    stream: AtomicUsize,
    refused: AtomicUsize,
    open: AtomicUsize,
    status: AtomicUsize,
    panics: AtomicUsize,
}

/// A running app: the layer around the handlers, its embedded store, its counters.
struct App {
    url: String,
    layer: IdempotencyLayer,
    counts: Arc<Counts>,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn charge(
    axum::extract::State(c): axum::extract::State<Arc<Counts>>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let n = c.charges.fetch_add(1, Ordering::SeqCst) + 1;
    // Long enough for concurrent callers to meet the claim in flight.
    let ms = headers
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(200);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json".to_owned()),
            ("location", format!("/charges/ch_{n}")),
            ("set-cookie", "session=secret".to_owned()),
            ("x-ratelimit-remaining", "41".to_owned()),
        ],
        json!({"charge": format!("ch_{n}"), "request_bytes": body.len()}).to_string(),
    )
}

async fn skip(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    let n = c.skip.fetch_add(1, Ordering::SeqCst) + 1;
    ([("idempotency-store", "skip")], format!("run {n}"))
}

async fn refused(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    let n = c.refused.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::BAD_REQUEST, format!("refused {n}"))
}

async fn open(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    let n = c.open.fetch_add(1, Ordering::SeqCst) + 1;
    format!("open {n}")
}

/// Answers with the status in `x-status`.
async fn status(
    axum::extract::State(c): axum::extract::State<Arc<Counts>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let n = c.status.fetch_add(1, Ordering::SeqCst) + 1;
    let code: u16 = headers["x-status"].to_str().unwrap().parse().unwrap();
    (
        StatusCode::from_u16(code).unwrap(),
        format!("status run {n}"),
    )
}

/// Panics the first time, answers the second.
async fn panics(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    if c.panics.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("the handler fails (a test)");
    }
    (StatusCode::CREATED, "made")
}

/// Server-sent events that never end.
async fn stream(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    c.stream.fetch_add(1, Ordering::SeqCst);
    endless_events()
}

/// A body that breaks off after its first bytes; counted in `status`.
async fn broken(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    c.status.fetch_add(1, Ordering::SeqCst);
    let chunks = futures_util::stream::iter([
        Ok(axum::body::Bytes::from_static(b"{\"partial\":")),
        Err(std::io::Error::other("the handler's body failed")),
    ]);
    (StatusCode::CREATED, axum::body::Body::from_stream(chunks))
}

/// A body that says it has 100 bytes, sends 11 and then stalls; counted in `status`.
async fn stalled(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    use futures_util::StreamExt as _;
    c.status.fetch_add(1, Ordering::SeqCst);
    let chunks = futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(b"{\"partial\":"))
    })
    .chain(futures_util::stream::pending());
    (
        StatusCode::CREATED,
        [("content-length", "100")],
        axum::body::Body::from_stream(chunks),
    )
}

/// Plain text that never ends (not a media type the layer knows as a stream); counted in
/// `stream`.
async fn trickle(axum::extract::State(c): axum::extract::State<Arc<Counts>>) -> impl IntoResponse {
    c.stream.fetch_add(1, Ordering::SeqCst);
    common::endless("text/plain")
}

/// A large JSON answer (worth compressing) saying which `Accept-Encoding` the handler saw.
async fn big(headers: HeaderMap) -> impl IntoResponse {
    let seen = headers
        .get("accept-encoding")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        json!({"accept_encoding_seen": seen, "pad": "abc".repeat(3000)}).to_string(),
    )
}

async fn app(config: impl FnOnce(LayerConfig) -> LayerConfig) -> App {
    app_with(|_| {}, config).await
}

/// [`app`], with the namespace's config changed by `namespace` first.
async fn app_with(
    namespace: impl FnOnce(&mut NamespaceConfig),
    config: impl FnOnce(LayerConfig) -> LayerConfig,
) -> App {
    let dir = tempfile::tempdir().unwrap();
    // Stores 2xx and 402; allows Set-Cookie and a rate-limit header, which the layer must
    // still never replay.
    let mut ns = NamespaceConfig::named("api");
    ns.stored_statuses = vec![StatusRange::new(200, 299), StatusRange::new(402, 402)];
    ns.headers_allowed
        .extend(["set-cookie".into(), "x-ratelimit-remaining".into()]);
    namespace(&mut ns);
    let store = EmbeddedStore::open(
        &dir.path().join("data"),
        StoreConfig {
            namespaces: vec![ns],
            ..StoreConfig::new(RegionId::new("eu1").unwrap(), &[])
        },
    )
    .unwrap();
    let layer = IdempotencyLayer::new(
        store,
        config(
            LayerConfig::new("api", PrincipalFrom::Header("x-principal".parse().unwrap()))
                .require_key_under("/charges"),
        ),
    )
    .unwrap();
    let counts = Arc::new(Counts::default());
    let router = Router::new()
        .route("/charges", post(charge))
        .route("/skip", post(skip))
        .route("/stream", post(stream))
        .route("/refused", post(refused))
        .route("/open", post(open))
        .route("/status", post(status))
        .route("/panics", post(panics))
        .route("/paid/status", post(status))
        .route("/paid/broken", post(broken))
        .route("/big", post(big))
        .route("/trickle", post(trickle))
        .route("/paid/stalled", post(stalled))
        .with_state(counts.clone())
        .layer(layer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    App {
        url,
        layer,
        counts,
        _dir: dir,
        server,
    }
}

impl App {
    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Answer {
        self.post_with(path, key, body, &[]).await
    }

    /// As the principal `acct_1`.
    async fn post_with(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut headers = vec![("x-principal", "acct_1")];
        headers.extend_from_slice(extra);
        post_keyed(&format!("{}{path}", self.url), key, body, &headers).await
    }
}

const BODY: &str =
    r#"{"amount": 1000, "currency": "eur", "card": {"last4": "4242", "exp": "12/30"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_identical_requests_run_once_and_all_get_the_same_body() {
    let app = app(|c| c.wait_in_flight(Duration::from_secs(10))).await;
    let app = Arc::new(app);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.post("/charges", Some("order-1"), BODY).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
    let first = answers
        .iter()
        .filter(|a| a.header("idempotent-replayed") == Some("false"));
    assert_eq!(first.count(), 1, "exactly one caller saw the execution");
    for a in &answers {
        assert_eq!(a.status, 201, "{}", a.body);
        assert_eq!(a.body, answers[0].body);
        assert_eq!(a.header("location"), Some("/charges/ch_1"));
        assert_eq!(a.header("idempotency-key"), Some("order-1"));
        assert!(a
            .header("idempotency-expires")
            .is_some_and(|e| e.ends_with(" GMT")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_wait_concurrent_callers_get_409_with_retry_after() {
    let app = Arc::new(app(|c| c).await);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.post_with("/charges", Some("order-2"), BODY, &[("x-sleep-ms", "500")])
                .await
        }));
    }
    let mut executed = 0;
    let mut conflicts = 0;
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            201 => executed += 1,
            409 => {
                conflicts += 1;
                assert_eq!(a.header("retry-after"), Some("1"));
                assert_eq!(a.header("content-type"), Some("application/problem+json"));
                let p: Value = serde_json::from_str(&a.body).unwrap();
                assert_eq!(p["type"], "urn:idem:problem:in-flight");
            }
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
    assert!(executed >= 1, "the owner got its answer");
    assert!(conflicts >= 1, "others were told the request is in flight");
}

#[tokio::test]
async fn reordered_json_is_the_same_request_and_another_body_is_422_unexecuted() {
    let app = app(|c| c).await;
    let a = app.post("/charges", Some("order-3"), BODY).await;
    assert_eq!(
        (a.status, a.header("idempotent-replayed")),
        (201, Some("false"))
    );
    let reordered = r#"{ "card": {"exp":"12/30", "last4":"4242"},
        "currency":"eur", "amount": 1000.0 }"#;
    let b = app.post("/charges", Some("order-3"), reordered).await;
    assert_eq!(
        (b.status, b.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(b.body, a.body, "byte-identical replay");
    let other = app
        .post(
            "/charges",
            Some("order-3"),
            r#"{"amount": 2000, "currency": "eur"}"#,
        )
        .await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(
        other.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn quoted_and_bare_forms_of_a_key_are_one_key() {
    let app = app(|c| c).await;
    let a = app.post("/charges", Some("3f1c-uuid-like"), BODY).await;
    let b = app.post("/charges", Some("\"3f1c-uuid-like\""), BODY).await;
    assert_eq!((a.status, b.status), (201, 201));
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(a.body, b.body);
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_missing_or_malformed_key_on_a_required_route_is_400_and_elsewhere_passes_through() {
    let app = app(|c| c).await;
    let missing = app.post("/charges", None, BODY).await;
    assert_eq!(missing.status, 400);
    let p: Value = serde_json::from_str(&missing.body).unwrap();
    assert_eq!(p["type"], "urn:idem:problem:missing-key");
    for bad in [&"k".repeat(256), "\"unterminated"] {
        let a = app.post("/charges", Some(bad), BODY).await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
    }
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 0, "nothing ran");
    // Not required on /open: without a key every request runs.
    for n in 1..=2 {
        let a = app.post("/open", None, "{}").await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (200, format!("open {n}").as_str())
        );
        assert!(a.header("idempotent-replayed").is_none());
    }
    // No principal: refused before anything runs.
    let r = http()
        .post(format!("{}/open", app.url))
        .header("idempotency-key", "k-no-principal")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(app.counts.open.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn set_cookie_and_rate_limit_headers_are_not_replayed_and_location_is() {
    let app = app(|c| c).await;
    let a = app.post("/charges", Some("order-4"), BODY).await;
    assert_eq!(
        a.header("set-cookie"),
        Some("session=secret"),
        "the first caller gets it"
    );
    let b = app.post("/charges", Some("order-4"), BODY).await;
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(b.header("location"), Some("/charges/ch_1"));
    assert_eq!(b.header("content-type"), Some("application/json"));
    assert_eq!(b.header("set-cookie"), None);
    assert_eq!(b.header("x-ratelimit-remaining"), None);
}

#[tokio::test]
async fn a_response_marked_skip_or_a_4xx_runs_again_on_retry() {
    let app = app(|c| c).await;
    for n in 1..=2 {
        let a = app.post("/skip", Some("skip-1"), "{}").await;
        assert_eq!(a.body, format!("run {n}"));
        assert_eq!(
            a.header("idempotency-store"),
            None,
            "the marker is not sent on"
        );
        assert_eq!(a.header("idempotent-replayed"), Some("false"));
    }
    for n in 1..=2 {
        let a = app.post("/refused", Some("refused-1"), "{}").await;
        assert_eq!((a.status, a.body.clone()), (400, format!("refused {n}")));
    }
}

#[tokio::test]
async fn a_streaming_response_passes_through_unrecorded() {
    let app = app(|c| c).await;
    for _ in 0..2 {
        // The stream never ends: its first events arrive while it runs.
        let url = format!("{}/stream", app.url);
        let headers = [("x-principal", "acct_1"), ("idempotency-key", "stream-1")];
        let first = first_chunk(&url, &headers).await;
        assert!(first.starts_with(b"data: 0"), "{first:?}");
    }
    assert_eq!(
        app.counts.stream.load(Ordering::SeqCst),
        2,
        "not recorded: runs again"
    );
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_gets_the_stored_outcome_on_retry() {
    let app = app(|c| c).await;
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        app.post_with("/charges", Some("order-5"), BODY, &[("x-sleep-ms", "600")]),
    )
    .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    // The handler finishes on its own (600 ms); until then a retry is told it is in flight.
    let mut retry = app.post("/charges", Some("order-5"), BODY).await;
    for _ in 0..100 {
        if retry.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = app.post("/charges", Some("order-5"), BODY).await;
    }
    assert_eq!(retry.status, 201);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn statuses_401_and_429_are_never_stored_and_the_policy_decides_the_rest() {
    let app = app(|c| c).await;
    for (code, key, runs) in [
        (401, "s-401", 2),
        (429, "s-429", 2),
        (400, "s-400", 2),
        (402, "s-402", 1),
    ] {
        let before = app.counts.status.load(Ordering::SeqCst);
        let code_text = code.to_string();
        for _ in 0..2 {
            let a = app
                .post_with("/status", Some(key), "{}", &[("x-status", &code_text)])
                .await;
            assert_eq!(a.status, code);
        }
        assert_eq!(
            app.counts.status.load(Ordering::SeqCst) - before,
            runs,
            "status {code}"
        );
    }
}

#[tokio::test]
async fn a_panicking_handler_frees_its_key_for_a_retry() {
    let app = app(|c| c).await;
    let a = app.post("/panics", Some("panic-1"), "{}").await;
    assert_eq!(a.status, 500, "{}", a.body);
    let p: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(p["type"], "urn:idem:problem:handler-failed");
    let b = app.post("/panics", Some("panic-1"), "{}").await;
    assert_eq!(
        (b.status, b.body.as_str()),
        (201, "made"),
        "the retry runs at once"
    );
    let c = app.post("/panics", Some("panic-1"), "{}").await;
    assert_eq!(c.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.counts.panics.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn repeated_keys_and_oversized_bodies_are_refused_with_the_key_echoed() {
    let app = app(|c| c).await;
    let r = http()
        .post(format!("{}/charges", app.url))
        .header("x-principal", "acct_1")
        .header("idempotency-key", "k1")
        .header("idempotency-key", "k2")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = "x".repeat((1 << 20) + 1);
    let a = app.post("/charges", Some("big-1"), &big).await;
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.header("idempotency-key"), Some("big-1"));
    let bad = app.post("/charges", Some("\"unterminated"), BODY).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.header("idempotency-key"), Some("\"unterminated"));
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn route_rules_decide_what_is_stored_on_their_routes() {
    // The namespace stores 2xx and 402. Under /paid a rule stores 201 and 409 only, and keeps
    // 5xx as indeterminate.
    let app = app(|c| {
        c.route(RoutePolicy::parse("POST /paid store=201,409 indeterminate=500-599").unwrap())
    })
    .await;
    let mut n = 0;
    for (path, code, key, runs, indeterminate) in [
        // A status the rule stores though the namespace would not.
        ("/paid/status", 409, "r-409", 1, None),
        // A status the namespace stores but the rule does not: released, runs again.
        ("/paid/status", 402, "r-402", 2, None),
        ("/paid/status", 200, "r-200", 2, None),
        // Indeterminate: replayed with the flag.
        ("/paid/status", 503, "r-503", 1, Some("true")),
        // No rule covers /status: the namespace's table (402 stored, 409 not).
        ("/status", 402, "n-402", 1, None),
        ("/status", 409, "n-409", 2, None),
    ] {
        let code_text = code.to_string();
        let mut answers = Vec::new();
        for _ in 0..2 {
            answers.push(
                app.post_with(path, Some(key), "{}", &[("x-status", &code_text)])
                    .await,
            );
        }
        n += runs;
        assert!(answers.iter().all(|a| a.status == code), "{path} {code}");
        assert_eq!(app.counts.status.load(Ordering::SeqCst), n, "{path} {code}");
        assert_eq!(
            answers[1].header("idempotent-replayed"),
            Some(if runs == 1 { "true" } else { "false" }),
            "{path} {code}"
        );
        assert_eq!(
            answers[1].header("idempotency-indeterminate"),
            indeterminate,
            "{path} {code}"
        );
    }
    // 401 stays unstored whatever a rule says.
    let all = self::app(|c| c.route(RoutePolicy::under("/paid").store(100, 599))).await;
    for _ in 0..2 {
        let a = all
            .post_with("/paid/status", Some("r-401"), "{}", &[("x-status", "401")])
            .await;
        assert_eq!(a.status, 401);
    }
    assert_eq!(all.counts.status.load(Ordering::SeqCst), 2);
    // The layer's own 502 (the handler's body broke off: it may have acted) is kept as
    // indeterminate whatever a rule or the table says of 502: the retry does not run it again.
    let not_502 = self::app(|c| c.route(RoutePolicy::under("/paid").store(200, 299))).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(
            not_502
                .post_with("/paid/broken", Some("r-broken"), "{}", &[])
                .await,
        );
    }
    assert!(
        answers.iter().all(|a| a.status == 502),
        "{}",
        answers[0].body
    );
    assert_eq!(answers[0].header("idempotent-replayed"), Some("false"));
    assert_eq!(answers[1].header("idempotent-replayed"), Some("true"));
    assert_eq!(answers[1].header("idempotency-indeterminate"), Some("true"));
    assert_eq!(not_502.counts.status.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_mismatch_answer_takes_the_configured_status_and_body() {
    let app = app(|mut c| {
        c.mismatch_status = StatusCode::CONFLICT;
        c.mismatch_body = Some(AnswerTemplate {
            content_type: "application/json".parse().unwrap(),
            body: r#"{"error":{"type":"idempotency_error","key":"{key}","claim":"{claim}","status":{status}}}"#.into(),
        });
        c
    })
    .await;
    let key = r#"k"with\quotes"#;
    let quoted = r#""k\"with\\quotes""#;
    let first = app.post("/charges", Some(quoted), BODY).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let other = app.post("/charges", Some(quoted), r#"{"amount": 1}"#).await;
    assert_eq!(other.status, 409);
    assert_eq!(other.header("content-type"), Some("application/json"));
    assert_eq!(other.header("idempotency-key"), Some(quoted));
    let v: Value = serde_json::from_str(&other.body).expect("the template stays valid JSON");
    assert_eq!(v["error"]["type"], "idempotency_error");
    assert_eq!(v["error"]["key"], key, "the key is filled in, escaped");
    assert_eq!(v["error"]["status"], 409);
    assert!(!v["error"]["claim"].as_str().unwrap().is_empty());
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
}

/// POSTs to `/big` with `accept-encoding` (if any) and returns status, headers and the raw
/// (undecoded) body.
async fn post_big(
    app: &App,
    key: &str,
    accept: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = http()
        .post(format!("{}/big", app.url))
        .header("x-principal", "acct_1")
        .header("idempotency-key", key)
        .body("{}");
    if let Some(a) = accept {
        r = r.header("accept-encoding", a);
    }
    let r = r.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.bytes().await.unwrap().to_vec())
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn answers_are_stored_in_identity_encoding_and_compressed_for_clients_that_ask() {
    let app = app(|c| c).await;
    let (status, h, first) = post_big(&app, "z-1", Some("br, gzip")).await;
    assert_eq!(status, 201);
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(h["vary"], "accept-encoding");
    let plain = gunzip(&first);
    let v: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(
        v["accept_encoding_seen"],
        Value::Null,
        "the handler is asked for identity"
    );
    // A replay to a client without Accept-Encoding: identity, the same bytes.
    let (status, h, replay) = post_big(&app, "z-1", None).await;
    assert_eq!(status, 201);
    assert_eq!(h["idempotent-replayed"], "true");
    assert!(h.get("content-encoding").is_none());
    assert_eq!(replay, plain);
    // A replay to a client that asks: gzip again, decoding to the same bytes.
    let (_, h, again) = post_big(&app, "z-1", Some("gzip;q=0.8")).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(gunzip(&again), plain);
    // gzip refused: identity.
    let (_, h, _) = post_big(&app, "z-1", Some("gzip;q=0, br")).await;
    assert!(h.get("content-encoding").is_none());
    // Compression off: identity even when asked.
    let plain_app = self::app(|mut c| {
        c.compress = false;
        c
    })
    .await;
    let (_, h, _) = post_big(&plain_app, "z-2", Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
}

#[tokio::test]
async fn the_prior_region_reaches_the_store() {
    // A namespace that refuses to grant a failed-over claim whose prior region cannot be asked.
    let app = app_with(
        |ns| ns.lookup_unanswered = idem::store::LookupUnanswered::Unavailable,
        |c| c,
    )
    .await;
    let a = app
        .post_with(
            "/charges",
            Some("p-1"),
            BODY,
            &[("idem-prior-region", "us1")],
        )
        .await;
    assert_eq!(a.status, 503, "{}", a.body);
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["state"], "lookup_unanswered", "{v}");
    assert!(a.header("retry-after").is_some());
    assert_eq!(a.header("idempotency-key"), Some("p-1"));
    // Not a region id: 400.
    let a = app
        .post_with(
            "/charges",
            Some("p-1"),
            BODY,
            &[("idem-prior-region", "Not A Region")],
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    // Its own region, or none: granted.
    let a = app
        .post_with(
            "/charges",
            Some("p-1"),
            BODY,
            &[("idem-prior-region", "eu1")],
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(app.counts.charges.load(Ordering::SeqCst), 1);
    // The default policy grants.
    let granting = self::app(|c| c).await;
    let a = granting
        .post_with(
            "/charges",
            Some("p-2"),
            BODY,
            &[("idem-prior-region", "us1")],
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
}

#[tokio::test]
async fn the_layer_reports_its_verdicts_as_metrics() {
    let app = app(|c| c).await;
    app.post("/charges", Some("m-1"), BODY).await;
    app.post("/charges", Some("m-1"), BODY).await;
    app.post("/charges", Some("m-1"), "{}").await;
    let text = app.layer.metrics_text();
    for line in [
        r#"idem_layer_verdicts_total{verdict="executed"} 1"#,
        r#"idem_layer_verdicts_total{verdict="replayed"} 1"#,
        r#"idem_layer_verdicts_total{verdict="mismatch"} 1"#,
        r#"idem_layer_verdicts_total{verdict="completed"} 1"#,
        "idem_layer_running 0",
        "idem_layer_shadow 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
}

#[tokio::test]
async fn a_body_still_going_after_stream_after_flows_through_unrecorded() {
    let app = app(|mut c| {
        c.stream_after = Duration::from_millis(300);
        c
    })
    .await;
    let url = format!("{}/trickle", app.url);
    let headers = [("x-principal", "acct_1"), ("idempotency-key", "t-1")];
    for _ in 0..2 {
        let chunk = first_chunk(&url, &headers).await;
        assert!(chunk.starts_with(b"data: 0"), "{chunk:?}");
    }
    // Not recorded: the retry ran the handler again.
    assert_eq!(app.counts.stream.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_of_known_length_that_stalls_is_kept_as_indeterminate() {
    let app = app(|mut c| {
        c.execution_max = Duration::from_millis(400);
        c.stream_after = Duration::from_millis(100);
        c
    })
    .await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(app.post("/paid/stalled", Some("s-1"), "{}").await);
    }
    // Not a stream (it said its length): a failure after the handler acted.
    assert!(
        answers.iter().all(|a| a.status == 502),
        "{}",
        answers[0].body
    );
    assert_eq!(answers[1].header("idempotent-replayed"), Some("true"));
    assert_eq!(answers[1].header("idempotency-indeterminate"), Some("true"));
    assert_eq!(app.counts.status.load(Ordering::SeqCst), 1);
}
