//! `idem proxy` as a real process in front of a counting upstream, over real sockets.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use common::{endless_events, first_chunk, post_keyed, Answer};
use serde_json::Value;

/// The API behind the proxy: counts its runs.
struct Upstream {
    url: String,
    runs: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn upstream() -> Upstream {
    let runs = Arc::new(AtomicUsize::new(0));
    let charge = |axum::extract::State(runs): axum::extract::State<Arc<AtomicUsize>>,
                  headers: HeaderMap,
                  body: String| async move {
        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let ms: u64 = headers
            .get("x-sleep-ms")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(150);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let skip = headers.contains_key("x-skip");
        let pad: usize = headers
            .get("x-pad")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mut r = (
            StatusCode::CREATED,
            [
                ("content-type", "application/json".to_owned()),
                ("location", format!("/charges/ch_{n}")),
                ("set-cookie", "session=secret".to_owned()),
                ("x-charge-id", format!("ch_{n}")),
                ("x-ratelimit-remaining", "9".to_owned()),
            ],
            format!(
                "{{\"charge\":\"ch_{n}\",\"principal\":{:?},\"xff\":{:?},\"bytes\":{},\"pad\":\"{}\"}}",
                headers
                    .get("x-principal")
                    .map(|v| v.to_str().unwrap().to_owned()),
                headers
                    .get("x-forwarded-for")
                    .map(|v| v.to_str().unwrap().to_owned()),
                body.len(),
                "x".repeat(pad)
            ),
        )
            .into_response();
        if skip {
            r.headers_mut()
                .insert("idempotency-store", "skip".parse().unwrap());
        }
        r
    };
    let stream = |axum::extract::State(runs): axum::extract::State<Arc<AtomicUsize>>| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        endless_events()
    };
    let router = Router::new()
        .route("/charges", post(charge))
        .route("/stream", post(stream))
        .route("/echo", axum::routing::get(echo_upgrade))
        .with_state(runs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Upstream { url, runs, server }
}

/// Switches to a made-up `echo` protocol (any upgrade is bytes both ways once switched) and
/// sends back every byte it gets.
async fn echo_upgrade(mut req: axum::extract::Request) -> axum::response::Response {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    match req.headers().get("upgrade").map(|v| v.as_bytes()) {
        Some(b"echo") => {}
        // Another protocol reached the upstream: the proxy let it through.
        Some(_) => return (StatusCode::BAD_REQUEST, "unexpected upgrade").into_response(),
        None => return StatusCode::UPGRADE_REQUIRED.into_response(),
    }
    let switched = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let mut io = hyper_util::rt::TokioIo::new(switched.await.unwrap());
        let mut buf = [0u8; 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => io.write_all(&buf[..n]).await.unwrap(),
            }
        }
    });
    axum::response::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(axum::body::Body::empty())
        .unwrap()
}

/// A running `idem proxy`; killed (SIGKILL) on drop.
struct Proxy {
    child: Child,
    url: String,
    /// Where its metrics are served, with `--metrics-listen`.
    metrics: Option<String>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    /// Starts `idem proxy` in front of `upstream` with its data in `dir`, plus `args`; on
    /// `port` if given (a restart keeps its address).
    fn start(upstream: &str, dir: &Path, port: Option<u16>, args: &[&str]) -> Proxy {
        let mut all = vec!["--data-dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        Self::spawn(upstream, port, &all)
    }

    /// Starts `idem proxy` in front of `upstream` with `args` (which say where keys live).
    fn spawn(upstream: &str, port: Option<u16>, args: &[&str]) -> Proxy {
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["proxy", "--listen", &listen, "--upstream", upstream])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn idem proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("idem: proxying ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let metrics = line
            .split("(metrics at ")
            .nth(1)
            .map(|r| r.trim().trim_end_matches(')').to_owned());
        Proxy {
            child,
            url: addr,
            metrics,
        }
    }

    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Answer {
        post_keyed(&format!("{}{path}", self.url), key, body, extra).await
    }
}

const BODY: &str = r#"{"amount": 1000, "currency": "eur"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_the_proxy_a_hundred_identical_requests_run_the_upstream_once() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Arc::new(Proxy::start(
        &up.url,
        dir.path(),
        None,
        &["--wait-ms", "10000"],
    ));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            proxy.post("/charges", Some("order-1"), BODY, &[]).await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
        bodies.push(a.body);
    }
    assert_eq!(up.runs.load(Ordering::SeqCst), 1);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

#[tokio::test]
async fn behind_the_proxy_keys_bodies_and_headers_behave_as_the_draft_says() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &[
            "--require-key",
            "/charges",
            "--replay-header",
            "x-charge-id",
            "--replay-header",
            "x-ratelimit-remaining",
        ],
    );
    // Missing key on a required route: 400, the upstream never sees it.
    let a = proxy.post("/charges", None, BODY, &[]).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(up.runs.load(Ordering::SeqCst), 0);
    // First run, then reordered JSON with the quoted key: a byte-identical replay.
    let first = proxy.post("/charges", Some("k-2"), BODY, &[]).await;
    assert_eq!(
        (first.status, first.header("idempotent-replayed")),
        (201, Some("false"))
    );
    assert_eq!(first.header("set-cookie"), Some("session=secret"));
    let again = proxy
        .post(
            "/charges",
            Some("\"k-2\""),
            r#"{ "currency":"eur", "amount":1000 }"#,
            &[],
        )
        .await;
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("location"), Some("/charges/ch_1"));
    assert_eq!(again.header("set-cookie"), None);
    // A header listed with --replay-header is replayed; a rate-limit header never is.
    assert_eq!(first.header("x-ratelimit-remaining"), Some("9"));
    assert_eq!(again.header("x-charge-id"), Some("ch_1"));
    assert_eq!(again.header("x-ratelimit-remaining"), None);
    // Another body: 422, never reaches the upstream.
    let other = proxy
        .post("/charges", Some("k-2"), r#"{"amount": 5}"#, &[])
        .await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(up.runs.load(Ordering::SeqCst), 1);
    // A path the upstream could read differently from the proxy: refused.
    let odd = proxy.post("/x/%2e%2e/charges", None, BODY, &[]).await;
    assert_eq!(odd.status, 400, "{}", odd.body);
    assert_eq!(up.runs.load(Ordering::SeqCst), 1);
    // Marked skip: runs again.
    for n in 2..=3 {
        let s = proxy
            .post("/charges", Some("k-skip"), BODY, &[("x-skip", "1")])
            .await;
        assert_eq!(s.status, 201);
        assert!(s.body.contains(&format!("ch_{n}")), "{}", s.body);
    }
    // A stream (with a key) passes through as it flows, unrecorded: it runs every time.
    let stream_runs = up.runs.load(Ordering::SeqCst);
    for _ in 0..2 {
        let url = format!("{}/stream", proxy.url);
        let first = first_chunk(&url, &[("idempotency-key", "k-stream")]).await;
        assert!(first.starts_with(b"data: 0"), "{first:?}");
    }
    assert_eq!(
        up.runs.load(Ordering::SeqCst),
        stream_runs + 2,
        "streams are not recorded"
    );
}

#[tokio::test]
async fn a_client_that_leaves_mid_request_gets_the_stored_outcome_and_the_upstream_ran_once() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up.url, dir.path(), None, &[]);
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        proxy.post("/charges", Some("k-leave"), BODY, &[("x-sleep-ms", "600")]),
    )
    .await;
    assert!(gone.is_err());
    // The upstream finishes on its own (600 ms); until then a retry is told it is in flight.
    let mut retry = proxy.post("/charges", Some("k-leave"), BODY, &[]).await;
    for _ in 0..100 {
        if retry.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = proxy.post("/charges", Some("k-leave"), BODY, &[]).await;
    }
    assert_eq!(
        (retry.status, retry.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(up.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn kill_9_right_after_a_response_loses_nothing() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up.url, dir.path(), None, &[]);
    let first = proxy.post("/charges", Some("k-crash"), BODY, &[]).await;
    assert_eq!(first.status, 201);
    let port = proxy.port();
    drop(proxy); // SIGKILL
    let proxy = Proxy::start(&up.url, dir.path(), Some(port), &[]);
    // Right after a restart the store may ask for a moment (its clock fence).
    let mut retry = proxy.post("/charges", Some("k-crash"), BODY, &[]).await;
    for _ in 0..50 {
        if retry.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = proxy.post("/charges", Some("k-crash"), BODY, &[]).await;
    }
    assert_eq!(
        (retry.status, retry.header("idempotent-replayed")),
        (201, Some("true"))
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(up.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shadow_mode_never_blocks() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &[
            "--shadow",
            "--require-key",
            "/charges",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    // A duplicate, a mismatch and a missing key all reach the upstream.
    let a = proxy.post("/charges", Some("k-shadow"), BODY, &[]).await;
    let b = proxy.post("/charges", Some("k-shadow"), BODY, &[]).await;
    let c = proxy
        .post("/charges", Some("k-shadow"), r#"{"amount": 1}"#, &[])
        .await;
    let d = proxy.post("/charges", None, BODY, &[]).await;
    for x in [&a, &b, &c, &d] {
        assert_eq!(x.status, 201, "{}", x.body);
    }
    assert_ne!(
        a.body, b.body,
        "the duplicate ran again instead of replaying"
    );
    assert_eq!(up.runs.load(Ordering::SeqCst), 4);
    // What it would have done is reported as metrics.
    let text = common::http()
        .get(proxy.metrics.as_deref().expect("a metrics address"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"idem_layer_verdicts_total{verdict="executed"} 1"#,
        r#"idem_layer_verdicts_total{verdict="replayed"} 1"#,
        r#"idem_layer_verdicts_total{verdict="mismatch"} 1"#,
        r#"idem_layer_verdicts_total{verdict="missing_key"} 1"#,
        "idem_layer_shadow 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
}

#[tokio::test]
async fn route_rules_and_the_mismatch_template_apply_behind_the_proxy() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("mismatch.json");
    std::fs::write(
        &template,
        r#"{"error":"key {key} reused","status":{status}}"#,
    )
    .unwrap();
    let proxy = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &[
            "--route",
            "POST /charges store=200",
            "--upstream-timeout-ms",
            "400",
            "--mismatch-status",
            "409",
            "--mismatch-body",
            template.to_str().unwrap(),
        ],
    );
    // The rule stores 200 only: the upstream's 201 releases the key, and a retry runs again.
    for _ in 0..2 {
        let a = proxy.post("/charges", Some("k-r"), BODY, &[]).await;
        assert_eq!(a.status, 201, "{}", a.body);
    }
    assert_eq!(up.runs.load(Ordering::SeqCst), 2);
    // A timeout is still kept as indeterminate (the proxy adds 502 and 504 to its rules).
    let slow = proxy
        .post("/charges", Some("k-t"), BODY, &[("x-sleep-ms", "1500")])
        .await;
    assert_eq!(slow.status, 504, "{}", slow.body);
    let retry = proxy.post("/charges", Some("k-t"), BODY, &[]).await;
    assert_eq!(retry.status, 504);
    assert_eq!(retry.header("idempotency-indeterminate"), Some("true"));
    assert_eq!(up.runs.load(Ordering::SeqCst), 3);
    // The mismatch answer from the template.
    let other = proxy
        .post("/charges", Some("k-t"), r#"{"amount": 5}"#, &[])
        .await;
    assert_eq!(other.status, 409);
    assert_eq!(other.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&other.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"error": "key k-t reused", "status": 409})
    );
    assert_eq!(up.runs.load(Ordering::SeqCst), 3);
    // A bad rule stops the proxy at start, saying why.
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", &up.url])
        .args(["--data-dir", dir.path().join("other").to_str().unwrap()])
        .args(["--route", "POST /charges store=299-200"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--route") && err.contains("backwards"),
        "{err}"
    );
}

#[tokio::test]
async fn the_principal_header_counts_only_from_trusted_peers_and_an_upstream_timeout_is_indeterminate(
) {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // Loopback is not trusted here: the header is stripped, so a keyed request has no
    // principal and is refused before the upstream.
    let untrusted = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &[
            "--principal-header",
            "x-principal",
            "--trusted-peer",
            "10.0.0.0/8",
        ],
    );
    let a = untrusted
        .post("/charges", Some("k-p"), BODY, &[("x-principal", "acct_9")])
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    let p: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(p["type"], "urn:idem:problem:missing-principal");
    assert_eq!(up.runs.load(Ordering::SeqCst), 0);
    // Nor is its X-Forwarded-For believed: the upstream sees the peer alone.
    let plain = untrusted
        .post("/charges", None, BODY, &[("x-forwarded-for", "6.6.6.6")])
        .await;
    assert!(
        plain.body.contains(r#""xff":Some("127.0.0.1")"#),
        "{}",
        plain.body
    );
    drop(untrusted);

    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &[
            "--principal-header",
            "x-principal",
            "--upstream-timeout-ms",
            "300",
        ],
    );
    let ok = proxy
        .post("/charges", Some("k-p"), BODY, &[("x-principal", "acct_9")])
        .await;
    assert_eq!(ok.status, 201);
    assert!(
        ok.body.contains("acct_9"),
        "the upstream sees the principal: {}",
        ok.body
    );
    // A trusted peer's X-Forwarded-For is kept, with the peer appended.
    let chained = proxy
        .post("/charges", None, BODY, &[("x-forwarded-for", "6.6.6.6")])
        .await;
    assert!(
        chained.body.contains(r#""xff":Some("6.6.6.6, 127.0.0.1")"#),
        "{}",
        chained.body
    );
    // Another principal's key is another key.
    let other = proxy
        .post("/charges", Some("k-p"), BODY, &[("x-principal", "acct_8")])
        .await;
    assert_eq!(other.header("idempotent-replayed"), Some("false"));
    // The upstream takes longer than allowed: 504, kept as indeterminate (it may have run).
    let slow = proxy
        .post(
            "/charges",
            Some("k-slow"),
            BODY,
            &[("x-principal", "acct_9"), ("x-sleep-ms", "1000")],
        )
        .await;
    assert_eq!(slow.status, 504, "{}", slow.body);
    let again = proxy
        .post(
            "/charges",
            Some("k-slow"),
            BODY,
            &[("x-principal", "acct_9")],
        )
        .await;
    assert_eq!(again.status, 504);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("idempotency-indeterminate"), Some("true"));
}

#[tokio::test]
async fn proxies_sharing_a_region_daemon_share_their_keys() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // `orders` refuses failed-over claims whose prior region cannot be asked, and takes keys
    // of at most 20 bytes.
    let daemon = common::Daemon::start(
        dir.path(),
        &common::config(
            "eu1",
            r#"policy = { lookup_unanswered = "unavailable", key_len_max = 20 }"#,
        ),
    )
    .await;
    let store = format!("eu1={}", daemon.url);
    let args = [
        "--store",
        &store,
        "--store-namespace",
        "payments",
        "--store-token",
        common::PAYMENTS_TOKEN,
    ];
    let (a, b) = (
        Proxy::spawn(&up.url, None, &args),
        Proxy::spawn(&up.url, None, &args),
    );
    let first = a.post("/charges", Some("k-shared"), BODY, &[]).await;
    assert_eq!(
        (first.status, first.header("idempotent-replayed")),
        (201, Some("false")),
        "{}",
        first.body
    );
    let again = b.post("/charges", Some("k-shared"), BODY, &[]).await;
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (201, Some("true")),
        "{}",
        again.body
    );
    assert_eq!(again.body, first.body);
    let other = b
        .post("/charges", Some("k-shared"), r#"{"amount": 7}"#, &[])
        .await;
    assert_eq!(other.status, 422, "{}", other.body);
    // A handler slower than the namespace's lease (800 ms) keeps its key by heartbeats: a
    // retry through the other proxy well past the lease finds it in flight, not free.
    let a = Arc::new(a);
    let slow = tokio::spawn({
        let a = a.clone();
        async move {
            a.post("/charges", Some("k-long"), BODY, &[("x-sleep-ms", "2500")])
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let meanwhile = b.post("/charges", Some("k-long"), BODY, &[]).await;
    assert_eq!(meanwhile.status, 409, "{}", meanwhile.body);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 201, "{}", slow.body);
    assert_eq!(up.runs.load(Ordering::SeqCst), 2);
    let replay = b.post("/charges", Some("k-long"), BODY, &[]).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(up.runs.load(Ordering::SeqCst), 2);
    // Over the namespace's outcome cap (4 KiB here, which the proxy reads from the daemon): the
    // first caller gets the response, the key keeps its digest, a retry is told it cannot be
    // replayed.
    let big = a
        .post("/charges", Some("k-big"), BODY, &[("x-pad", "5000")])
        .await;
    assert_eq!(big.status, 201);
    assert!(big.body.len() > 5000);
    let retry = b.post("/charges", Some("k-big"), BODY, &[]).await;
    assert_eq!(retry.status, 409, "{}", retry.body);
    let p: Value = serde_json::from_str(&retry.body).unwrap();
    assert_eq!(p["type"], "urn:idem:problem:outcome-not-stored");
    assert_eq!(up.runs.load(Ordering::SeqCst), 3);
    // A request a gateway failed over from another region says so: the daemon is told, and
    // `orders` refuses to grant it unasked.
    let orders = Proxy::spawn(
        &up.url,
        None,
        &[
            "--store",
            &store,
            "--store-namespace",
            "orders",
            "--store-token",
            common::ORDERS_TOKEN,
        ],
    );
    let failed_over = orders
        .post(
            "/charges",
            Some("k-f"),
            BODY,
            &[("idem-prior-region", "us1")],
        )
        .await;
    assert_eq!(failed_over.status, 503, "{}", failed_over.body);
    let p: Value = serde_json::from_str(&failed_over.body).unwrap();
    assert_eq!(p["state"], "lookup_unanswered", "{p}");
    assert_eq!(up.runs.load(Ordering::SeqCst), 3);
    let home = orders.post("/charges", Some("k-f"), BODY, &[]).await;
    assert_eq!(home.status, 201, "{}", home.body);
    // The proxy read the namespace's policy at start: a key over its 20 bytes is refused by the
    // layer itself, before any claim.
    let long = orders
        .post("/charges", Some("k-0123456789abcdefghij"), BODY, &[])
        .await;
    assert_eq!(long.status, 400, "{}", long.body);
    let p: Value = serde_json::from_str(&long.body).unwrap();
    assert_eq!(p["type"], "urn:idem:problem:bad-key", "{p}");
    // A token the daemon refuses stops the proxy at start, saying so.
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--upstream", &up.url])
        .args(["--store", &store, "--store-namespace", "orders"])
        .args(["--store-token", "not-the-orders-token-0000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refuses namespace \"orders\""), "{err}");
}

#[tokio::test]
async fn protocol_upgrades_pass_through_the_proxy() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        &up.url,
        dir.path(),
        None,
        &["--upstream-timeout-ms", "300", "--allow-upgrade", "echo"],
    );
    let addr = proxy.url.trim_start_matches("http://");
    // h2c is never let through: the upstream gets a plain GET without the upgrade (426).
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    plain.read_exact(&mut head).await.unwrap();
    assert_eq!(
        &head,
        b"HTTP/1.1 426",
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    let mut conn = switched(tokio::net::TcpStream::connect(addr).await.unwrap()).await;
    echo(&mut conn, b"hello").await;
    // Idle for longer than the upstream time limit, which bounds answers, not a switched
    // connection.
    tokio::time::sleep(Duration::from_millis(900)).await;
    echo(&mut conn, b"still here").await;
}

/// A certificate for `sans` (DNS names, or URIs when they contain "://"), signed by `ca`:
/// its PEM and its key's PEM.
fn issue(ca: &rcgen::Issuer<'_, rcgen::KeyPair>, sans: &[&str]) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans
        .iter()
        .map(|s| {
            if s.contains("://") {
                rcgen::SanType::URI((*s).try_into().unwrap())
            } else {
                rcgen::SanType::DnsName((*s).try_into().unwrap())
            }
        })
        .collect();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An HTTPS client trusting `ca_pem`, presenting `identity` (certificate and key PEM) if any.
fn tls_client(ca_pem: &str, identity: Option<&(String, String)>) -> reqwest::Client {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[tokio::test]
async fn under_mutual_tls_the_client_certificate_is_the_principal() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let ca_pem = ca.as_ref().pem();
    let server = issue(&ca, &["localhost"]);
    let billing = issue(&ca, &["spiffe://example.org/billing", "billing.internal"]);
    let orders = issue(&ca, &["orders.internal"]);
    let nameless = issue(&ca, &[]);
    let files = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (cert, key, ca_file) = (
        files("server.pem", &server.0),
        files("server.key", &server.1),
        files("ca.pem", &ca_pem),
    );
    let proxy = Proxy::start(
        &up.url,
        &dir.path().join("data"),
        None,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca_file,
            "--principal-from-cert",
        ],
    );
    assert!(proxy.url.starts_with("https://"), "{}", proxy.url);
    let url = format!("{}/charges", proxy.url.replace("127.0.0.1", "localhost"));
    let post = |client: reqwest::Client, key: &'static str| {
        let url = url.clone();
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(BODY)
                .send()
                .await?;
            let replayed = r
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.to_str().unwrap().to_owned());
            Ok::<_, reqwest::Error>((r.status().as_u16(), replayed))
        }
    };
    // One key, two identities: two principals, two runs; the same identity again replays.
    let a = post(tls_client(&ca_pem, Some(&billing)), "k-m")
        .await
        .unwrap();
    let b = post(tls_client(&ca_pem, Some(&orders)), "k-m")
        .await
        .unwrap();
    let again = post(tls_client(&ca_pem, Some(&billing)), "k-m")
        .await
        .unwrap();
    assert_eq!(a, (201, Some("false".into())));
    assert_eq!(b, (201, Some("false".into())));
    assert_eq!(again, (201, Some("true".into())));
    assert_eq!(up.runs.load(Ordering::SeqCst), 2);
    // A certificate without a name gives no principal: a keyed request is refused.
    let c = post(tls_client(&ca_pem, Some(&nameless)), "k-m")
        .await
        .unwrap();
    assert_eq!(c.0, 400);
    // No certificate: no connection.
    assert!(post(tls_client(&ca_pem, None), "k-m").await.is_err());
    // A certificate from another CA: no connection either.
    let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other =
        rcgen::CertifiedIssuer::self_signed(other_params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
    let stranger = issue(&other, &["billing.internal"]);
    assert!(post(tls_client(&ca_pem, Some(&stranger)), "k-m")
        .await
        .is_err());
    assert_eq!(up.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_one_to_close() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up.url, dir.path(), None, &["--connections-max", "1"]);
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    // The one connection allowed, open and idle.
    let first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    second
        .write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut head))
            .await
            .is_err(),
        "served over the cap"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut head))
        .await
        .expect("served once the first closed")
        .unwrap();
    assert!(head.starts_with(b"HTTP/1.1 "), "{head:?}");
}

#[tokio::test]
async fn stopping_the_proxy_closes_switched_connections() {
    use tokio::io::AsyncReadExt as _;
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // In this process, so that only the proxy's own stop (not the process ending) can close
    // the connection.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = idem::face::proxy::ProxyConfig::new(
        listen,
        up.url.parse().unwrap(),
        idem::face::proxy::ProxyStore::Embedded(dir.path().join("data")),
    );
    config.upgrades = vec!["echo".into()];
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(idem::face::proxy::run(config, async move {
        let _ = stopped.await;
    }));
    let conn = loop {
        match tokio::net::TcpStream::connect(listen).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut conn = switched(conn).await;
    echo(&mut conn, b"ping").await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("the proxy stops")
        .unwrap()
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the switched connection outlived the proxy");
}

/// Switches `conn` to the upstream's `echo` protocol through the proxy; checks the 101.
async fn switched(mut conn: tokio::net::TcpStream) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    conn.write_all(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    // The head, up to its blank line.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            conn.read(&mut b).await.unwrap(),
            1,
            "closed in the head: {head:?}"
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    conn
}

/// Sends `msg` and reads it back.
async fn echo(conn: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    conn.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut got))
        .await
        .expect("the echo comes back")
        .unwrap();
    assert_eq!(got, msg);
}
