//! The daemon's store API, against real `idem serve` processes.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_identical_claims_get_exactly_one_execute() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let url = format!("{}/v1/ns/payments/claim", d.url);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                post(
                    &url,
                    PAYMENTS_TOKEN,
                    &json!({"principal": "acct_1", "key": "charge-1", "fingerprint": fp(1), "attempt": tok(&format!("{:x}", i + 1))}),
                )
                .await
            })
        })
        .collect();
    let mut executes = 0;
    let mut in_flight = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["decision"], "execute", "{body}");
                executes += 1;
            }
            409 => {
                assert_eq!(body["decision"], "in_flight", "{body}");
                assert_eq!(body["origin_region"], "eu1");
                in_flight += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((executes, in_flight), (1, 99));
    assert!(d
        .metrics()
        .await
        .contains("idem_claims_total{decision=\"in_flight\"} 99"));
}

#[tokio::test]
async fn complete_then_claim_replays_the_stored_bytes() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (status, exec) = d.claim("charge-2", &fp(2), "a1").await;
    assert_eq!(status, 200, "{exec}");
    let body = vec![0u8, 159, 146, 150, b'{', b'}'];
    let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    let (status, done) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": "charge-2", "claim": exec["claim"],
                    "outcome": {"status": 201, "headers": [["Content-Type", "application/octet-stream"], ["Set-Cookie", "secret"]], "body_base64": b64}}),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done, json!({"terminal": "completed", "superseded": false}));
    let (status, replay) = d.claim("charge-2", &fp(2), "a2").await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["decision"], "replay");
    assert_eq!(replay["claim"], exec["claim"]);
    assert_eq!(replay["outcome"]["status"], 201);
    assert_eq!(replay["outcome"]["body_base64"], b64.as_str());
    // Only allow-listed headers are kept (lower-cased names are matched case-insensitively).
    assert_eq!(
        replay["outcome"]["headers"],
        json!([["Content-Type", "application/octet-stream"]])
    );
    assert!(d
        .metrics()
        .await
        .contains("idem_time_to_outcome_seconds_count 1"));
}

#[tokio::test]
async fn a_completion_may_say_what_its_outcome_is_stored_as() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let complete = |key: &'static str, claim: Value, status: u16, store_as: Option<&str>| {
        let mut body = json!({"principal": "acct_1", "key": key, "claim": claim,
                              "outcome": {"status": status, "body": "x"}});
        if let Some(a) = store_as {
            body["store_as"] = json!(a);
        }
        body
    };
    // 503 is released by the default table; stored as indeterminate when the caller says so.
    let (_, exec) = d.claim("as-1", &fp(11), "b1").await;
    let (status, done) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &complete("as-1", exec["claim"].clone(), 503, Some("indeterminate")),
        )
        .await;
    assert_eq!(
        (status, &done["terminal"]),
        (200, &json!("indeterminate")),
        "{done}"
    );
    let (_, replay) = d.claim("as-1", &fp(11), "b2").await;
    assert_eq!(replay["decision"], "replay");
    assert_eq!(replay["indeterminate"], true);
    // 409 stored as completed.
    let (_, exec) = d.claim("as-2", &fp(12), "b3").await;
    let (_, done) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &complete("as-2", exec["claim"].clone(), 409, Some("completed")),
        )
        .await;
    assert_eq!(done["terminal"], "completed", "{done}");
    // Anything else is refused, naming the field.
    let (_, exec) = d.claim("as-3", &fp(13), "b4").await;
    let (status, p) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &complete("as-3", exec["claim"].clone(), 200, Some("released")),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("store_as"), "{p}");
}

#[tokio::test]
async fn a_namespace_token_reads_its_namespace_policy() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let get = |ns: &str, token: &str| {
        http()
            .get(format!("{}/v1/ns/{ns}/policy", d.url))
            .bearer_auth(token)
            .send()
    };
    let r = get("payments", PAYMENTS_TOKEN).await.unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["name"], "payments");
    assert_eq!(p["lease_ms"], common::LEASE_MS);
    assert_eq!(p["outcome_bytes_max"], common::OUTCOME_MAX);
    // The client reads the same.
    let client = idem::client::Client::new(idem::client::ClientConfig::new(
        vec![idem::client::Endpoint::new("eu1", &d.url).unwrap()],
        "payments",
        PAYMENTS_TOKEN,
    ))
    .unwrap();
    let policy = client.policy().await.unwrap();
    assert_eq!(policy.lease_ms, common::LEASE_MS);
    // And the HTTP face's remote store takes its limits from it.
    use idem::face::Backend as _;
    let remote = idem::face::RemoteStore::connect(idem::client::ClientConfig::new(
        vec![idem::client::Endpoint::new("eu1", &d.url).unwrap()],
        "payments",
        PAYMENTS_TOKEN,
    ))
    .await
    .unwrap();
    let limits = remote.limits("payments").unwrap();
    assert_eq!(
        (limits.lease_ms, limits.outcome_bytes_max),
        (common::LEASE_MS, common::OUTCOME_MAX)
    );
    // Another namespace's token: refused.
    let r = get("payments", common::ORDERS_TOKEN).await.unwrap();
    assert!(matches!(r.status().as_u16(), 401 | 403), "{}", r.status());
}

#[tokio::test]
async fn a_different_fingerprint_is_a_mismatch() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    assert_eq!(d.claim("charge-3", &fp(3), "1").await.0, 200);
    let (status, p) = d.claim("charge-3", &fp(4), "2").await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["decision"], "mismatch");
    assert_eq!(p["type"], "urn:idem:problem:mismatch");
}

#[tokio::test]
async fn a_resent_attempt_token_resumes_its_claim_but_not_after_a_takeover() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    // The reply was lost: the same token gets the same claim back.
    let (_, first) = d.claim("charge-5", &fp(5), "aaaa").await;
    let (status, again) = d.claim("charge-5", &fp(5), "aaaa").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["claim"], first["claim"]);
    assert_eq!(again["resumed"], true);

    // Past the lease (plus the max drift), another attempt takes the key over.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 200)).await;
    let (status, taker) = d.claim("charge-5", &fp(5), "bbbb").await;
    assert_eq!(status, 200, "{taker}");
    assert_eq!(taker["decision"], "execute");
    assert_eq!(taker["took_over"], json!([first["claim"]]));
    // The paused caller re-sends its token: its claim is not revived.
    let (status, late) = d.claim("charge-5", &fp(5), "aaaa").await;
    assert_eq!(status, 409, "{late}");
    assert_eq!(late["claim"], taker["claim"]);
    assert!(d.metrics().await.contains("idem_takeovers_total 1"));
}

#[tokio::test]
async fn a_replay_survives_kill_9_and_restart() {
    let dir = tempdir();
    let mut d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (_, exec) = d.claim("charge-6", &fp(6), "1").await;
    let (status, _) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": "charge-6", "claim": exec["claim"],
                    "outcome": {"status": 200, "body": "{\"charged\":10}"}}),
        )
        .await;
    assert_eq!(status, 200);
    d.kill9();
    d.restart().await;
    let (status, replay) = d.claim("charge-6", &fp(6), "2").await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["decision"], "replay");
    assert_eq!(replay["outcome"]["body"], "{\"charged\":10}");
}

#[tokio::test]
async fn wrong_or_foreign_tokens_get_401_and_read_nothing() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (_, exec) = d.claim("charge-7", &fp(7), "1").await;
    let read = json!({"principal": "acct_1", "key": "charge-7"});
    for token in [ORDERS_TOKEN, "not-a-token-at-all-0000", ""] {
        let (status, p) = d.post("/v1/ns/payments/read", token, &read).await;
        assert_eq!(status, 401, "{p}");
        assert_eq!(p["type"], "urn:idem:problem:unauthorized");
        assert!(!p.to_string().contains("charge-7"), "{p}");
        let (status, _) = d
            .post(
                "/v1/ns/payments/claim",
                token,
                &json!({"principal": "acct_1", "key": "charge-7", "fingerprint": fp(7), "attempt": tok("9")}),
            )
            .await;
        assert_eq!(status, 401);
    }
    // The operator reads any namespace; the payments token reads its own.
    for token in [OPERATOR_TOKEN, PAYMENTS_TOKEN] {
        let (status, view) = d.post("/v1/ns/payments/read", token, &read).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["claims"][0]["claim"], exec["claim"]);
    }
    // Operators do not claim.
    let (status, _) = d
        .post(
            "/v1/ns/payments/claim",
            OPERATOR_TOKEN,
            &json!({"principal": "acct_1", "key": "x", "fingerprint": fp(7), "attempt": tok("9")}),
        )
        .await;
    assert_eq!(status, 401);
    // A foreign token says nothing of whether a namespace exists.
    let (status, _) = d.post("/v1/ns/nope/read", PAYMENTS_TOKEN, &read).await;
    assert_eq!(status, 401);
    let (status, _) = d.post("/v1/ns/nope/read", OPERATOR_TOKEN, &read).await;
    assert_eq!(status, 404);
    let no_auth = http()
        .get(format!("{}/v1/status", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), 401);
    assert!(no_auth.headers().contains_key("www-authenticate"));
}

#[tokio::test]
async fn oversize_keys_outcomes_and_bodies_get_clear_4xx() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (status, p) = d.claim(&"k".repeat(256), &fp(8), "1").await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["type"], "urn:idem:problem:bad-key");
    assert_eq!(p["field"], "key");

    let (_, exec) = d.claim("charge-8", &fp(8), "1").await;
    let (status, p) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": "charge-8", "claim": exec["claim"],
                    "outcome": {"status": 200, "body": "x".repeat(OUTCOME_MAX + 1)}}),
        )
        .await;
    assert_eq!(status, 413, "{p}");
    assert_eq!(p["type"], "urn:idem:problem:outcome-too-large");

    // Beyond limits.request_bytes_max (the default, 12 MiB) the body is refused unread.
    let (status, p) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": "charge-8", "claim": exec["claim"],
                    "outcome": {"status": 200, "body": "x".repeat(13 << 20)}}),
        )
        .await;
    assert_eq!(status, 413, "{p}");
    assert_eq!(p["type"], "urn:idem:problem:request-too-large");

    for (body, field) in [
        (
            json!({"principal": "a", "key": "k", "fingerprint": "xyz", "attempt": "1"}),
            "fingerprint",
        ),
        (
            json!({"principal": "a", "key": "k", "fingerprint": fp(1), "attempt": tok("g")}),
            "attempt",
        ),
        // Short tokens are refused: callers picking small numbers would share them, and a
        // shared token resumes another caller's claim.
        (
            json!({"principal": "a", "key": "k", "fingerprint": fp(1), "attempt": "1"}),
            "attempt",
        ),
    ] {
        let (status, p) = d.post("/v1/ns/payments/claim", PAYMENTS_TOKEN, &body).await;
        assert_eq!(status, 400, "{p}");
        assert_eq!(p["field"], field);
    }
    let (status, p) = d
        .post("/v1/ns/payments/claim", PAYMENTS_TOKEN, &json!({"key": 1}))
        .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["type"], "urn:idem:problem:invalid-request");
    // Calls without an outcome take small bodies only.
    let (status, p) = d
        .post(
            "/v1/ns/payments/claim",
            PAYMENTS_TOKEN,
            &json!({"principal": "x".repeat(100_000), "key": "k", "fingerprint": fp(1), "attempt": tok("1")}),
        )
        .await;
    assert_eq!(status, 413, "{p}");
}

/// Sends raw request bytes on a fresh connection and returns the status line's code.
async fn raw_status(d: &Daemon, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = d.url.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head))
        .await
        .expect("an answer within 2 s")
        .unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test]
async fn tokens_are_checked_before_any_body_is_read() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    // A 1 MB body (within the limit) is announced but never sent: the answer comes from the
    // headers alone, at once, instead of after waiting for the body.
    for token in ["wrong-token-0000000000", ORDERS_TOKEN] {
        let status = raw_status(
            &d,
            &format!("POST /v1/ns/payments/complete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 401);
    }
    // A percent-encoded namespace is not another way in.
    let status = raw_status(
        &d,
        &format!("POST /v1/ns/pay%6dents/read HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PAYMENTS_TOKEN}\r\nContent-Length: 2\r\n\r\n{{}}"),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn complete_release_and_extend_follow_the_claim_lifecycle() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (_, exec) = d.claim("charge-9", &fp(9), "1").await;
    let key = |extra: Value| {
        let mut v = json!({"principal": "acct_1", "key": "charge-9", "claim": exec["claim"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let (status, ext) = d
        .post(
            "/v1/ns/payments/extend",
            PAYMENTS_TOKEN,
            &key(json!({"lease_ms": 5000})),
        )
        .await;
    assert_eq!(status, 200, "{ext}");
    assert!(ext["lease_until_ms"].as_u64().unwrap() > exec["lease_until_ms"].as_u64().unwrap());
    let (status, p) = d
        .post(
            "/v1/ns/payments/extend",
            PAYMENTS_TOKEN,
            &key(json!({"lease_ms": 3_600_000})),
        )
        .await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["field"], "lease_ms");
    let (status, rel) = d
        .post("/v1/ns/payments/release", PAYMENTS_TOKEN, &key(json!({})))
        .await;
    assert_eq!(status, 200, "{rel}");
    assert_eq!(rel["terminal"], "released");
    // Released: the key is free again, and the finished claim cannot be completed.
    let (status, again) = d.claim("charge-9", &fp(9), "2").await;
    assert_eq!(status, 200);
    assert_ne!(again["claim"], exec["claim"]);
    let (status, p) = d
        .post(
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            &key(json!({"outcome": {"status": 200}})),
        )
        .await;
    assert_eq!(status, 409, "{p}");
    let (status, p) = d
        .post(
            "/v1/ns/payments/release",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": "charge-9", "claim": "not-a-claim"}),
        )
        .await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(p["field"], "claim");
    let m = d.metrics().await;
    assert!(m.contains("idem_lease_extensions_total 1"), "{m}");
    assert!(
        m.contains("idem_finished_total{terminal=\"released\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn readyz_is_false_while_the_index_is_rebuilt() {
    let dir = tempdir();
    // Enough keys that rebuilding takes a while (no hint files: the whole log is replayed).
    fill_orders(dir.path(), &config("eu1", ""), 300_000);
    let d = Daemon::spawn(dir.path(), &config("eu1", ""));
    let first = http()
        .get(format!("{}/readyz", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 503);
    let body: Value = first.json().await.unwrap();
    assert_eq!(body, json!({"ready": false, "reason": "recovering"}));
    // The store API says so too, with Retry-After.
    let (status, p) = d.claim("k", &fp(1), "1").await;
    assert_eq!(status, 503, "{p}");
    assert_eq!(p["state"], "recovering");
    d.wait_ready().await;
    eprintln!(
        "{}",
        d.stderr()
            .lines()
            .find(|l| l.contains("rebuilt"))
            .unwrap_or_default()
    );
    let (status, view) = d
        .post(
            "/v1/ns/orders/read",
            ORDERS_TOKEN,
            &json!({"principal": "p", "key": "key-299999"}),
        )
        .await;
    assert_eq!(status, 200, "{view}");
}

#[tokio::test]
async fn sigterm_finishes_requests_in_progress_flushes_and_exits_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempdir();
    let mut d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let (_, exec) = d.claim("charge-10", &fp(10), "1").await;
    // A completion whose body is still on its way when the signal comes.
    let body = json!({"principal": "acct_1", "key": "charge-10", "claim": exec["claim"],
                      "outcome": {"status": 200, "body": "done"}})
    .to_string();
    let addr = d.url.strip_prefix("http://").unwrap().to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!("POST /v1/ns/payments/complete HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PAYMENTS_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len())
            .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: not ready, but the request in progress is finished.
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited with a request in progress"
    );
    s.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"terminal\":\"completed\""), "{answer}");
    assert!(d.terminate(), "{}", d.stderr());
    assert!(
        d.stderr().contains("log flushed; stopped"),
        "{}",
        d.stderr()
    );
    d.restart().await;
    let (status, replay) = d.claim("charge-10", &fp(10), "2").await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay["outcome"]["body"], "done");
}

#[tokio::test]
async fn a_bad_config_names_the_file_and_the_field() {
    let dir = tempdir();
    let path = dir.path().join("idem.toml");
    std::fs::write(
        &path,
        config("eu1", "").replace("max_drift_ms = 50", "max_drift_ms = \"fast\""),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("idem.toml"), "{err}");
    assert!(err.contains("store.max_drift_ms"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn without_a_config_a_development_store_runs_on_loopback() {
    let dir = tempdir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("idem: listening on ")
        .unwrap()
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut status = 0;
    for _ in 0..500 {
        let (s, _) = post(
            &format!("{url}/v1/ns/default/claim"),
            idem::daemon::config::DEV_TOKEN,
            &json!({"principal": "p", "key": "k", "fingerprint": fp(1), "attempt": tok("1")}),
        )
        .await;
        status = s;
        if s == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert!(dir.path().join("idem-data").is_dir());

    // Its tokens are public: it refuses to listen beyond loopback.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

#[tokio::test]
async fn metrics_openapi_and_status_are_served() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    d.claim("charge-11", &fp(11), "1").await;
    let m = d.metrics().await;
    for name in [
        "idem_claims_total{decision=\"execute\"} 1",
        "idem_fsync_seconds_bucket",
        "idem_time_to_outcome_seconds",
        "idem_keys 1",
        "idem_log_bytes",
        "idem_ready 1",
    ] {
        assert!(m.contains(name), "{name} missing from {m}");
    }
    let spec: Value = http()
        .get(format!("{}/openapi.json", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    // Every path the document lists is a route the daemon serves.
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 11);
    for (path, item) in paths {
        let url = format!("{}{}", d.url, path.replace("{namespace}", "payments"));
        for method in item.as_object().unwrap().keys() {
            let req = match method.as_str() {
                "get" => http().get(&url),
                "post" => http().post(&url).json(&json!({})),
                other => panic!("{other}"),
            };
            let r = req.bearer_auth(OPERATOR_TOKEN).send().await.unwrap();
            assert_ne!(r.status(), 405, "{method} {path}");
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("urn:idem:problem:not-found"),
                "{method} {path}: {body}"
            );
        }
    }
    let (status, s) = http()
        .get(format!("{}/v1/status", d.url))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200);
    let s: Value = s.json().await.unwrap();
    assert_eq!(s["region"], "eu1");
    assert_eq!(s["keys"], 1);
    assert_eq!(s["namespaces"], json!(["orders", "payments"]));
    let missing = http()
        .get(format!("{}/v2/nothing", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn https_serves_the_same_api() {
    let dir = tempdir();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let text = config("eu1", "").replace(
        "[store]",
        &format!(
            "[http]\ntls = {{ cert = {:?}, key = {:?} }}\n\n[store]",
            dir.path().join("cert.pem"),
            dir.path().join("key.pem")
        ),
    );
    let d = Daemon::spawn(dir.path(), &text);
    assert!(d.url.starts_with("https://"), "{}", d.url);
    let url = d.url.replace("127.0.0.1", "localhost");
    let mut cfg = idem::client::ClientConfig::new(
        vec![idem::client::Endpoint::new("eu1", &url).unwrap()],
        "payments",
        PAYMENTS_TOKEN,
    );
    cfg.ca_pem = Some(cert.cert.pem().into_bytes());
    cfg.max_total = Duration::from_secs(30);
    cfg.max_attempts = 50;
    let client = idem::client::Client::new(cfg).unwrap();
    let got = client
        .claim("acct_1", "tls-1", idem::Fingerprint::of(b"x"))
        .await
        .unwrap();
    assert!(
        matches!(got, idem::client::ClaimOutcome::Execute { .. }),
        "{got:?}"
    );
    // Plain HTTP to the HTTPS port gets nothing useful.
    assert!(http()
        .get(format!("{}/healthz", d.url.replace("https", "http")))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));
}

/// Claim and complete with a plain `application/json` body take the daemon's direct path;
/// with any other content type (here with a charset) they go through the router. Both ways
/// must answer alike, errors included.
#[tokio::test]
async fn claim_and_complete_answer_alike_on_the_direct_path_and_through_the_router() {
    let dir = tempdir();
    let d = Daemon::start(dir.path(), &config("eu1", "")).await;
    let send = |content_type: &'static str, path: &'static str, body: String| {
        let url = format!("{}{path}", d.url);
        async move {
            let r = http()
                .post(url)
                .bearer_auth(PAYMENTS_TOKEN)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let region = r.headers()["idem-region"].to_str().unwrap().to_owned();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, region, v)
        }
    };
    for (n, ct) in ["application/json", "application/json; charset=utf-8"]
        .into_iter()
        .enumerate()
    {
        let key = format!("alike-{n}");
        let claim = json!({"principal": "acct_1", "key": key, "fingerprint": fp(1), "attempt": tok(&format!("a{n}"))});
        let (status, region, exec) = send(ct, "/v1/ns/payments/claim", claim.to_string()).await;
        assert_eq!((status, region.as_str()), (200, "eu1"), "{ct}: {exec}");
        assert_eq!(exec["decision"], "execute", "{ct}");
        let done = json!({"principal": "acct_1", "key": key, "claim": exec["claim"],
                          "outcome": {"status": 201, "body": "made"}});
        let (status, _, fin) = send(ct, "/v1/ns/payments/complete", done.to_string()).await;
        assert_eq!(status, 200, "{ct}: {fin}");
        assert_eq!(
            fin,
            json!({"terminal": "completed", "superseded": false}),
            "{ct}"
        );
        let again = json!({"principal": "acct_1", "key": key, "fingerprint": fp(1), "attempt": tok(&format!("b{n}"))});
        let (status, _, replay) = send(ct, "/v1/ns/payments/claim", again.to_string()).await;
        assert_eq!(status, 200, "{ct}");
        assert_eq!(replay["decision"], "replay", "{ct}");
        assert_eq!(replay["outcome"]["status"], 201, "{ct}");
        assert_eq!(replay["claim"], exec["claim"], "{ct}");

        // Over the claim's 64 KiB limit: 413 either way.
        let big = json!({"principal": "x".repeat(70_000), "key": "k", "fingerprint": fp(1), "attempt": tok("z")});
        let (status, _, p) = send(ct, "/v1/ns/payments/claim", big.to_string()).await;
        assert_eq!(status, 413, "{ct}: {p}");
        assert_eq!(p["type"], "urn:idem:problem:request-too-large");
    }

    // Errors: the two ways give the very same answer (status, region, whole problem body).
    let errors = [
        ("/v1/ns/payments/claim", PAYMENTS_TOKEN, "{\"principal\":".to_owned(), 400),
        ("/v1/ns/payments/complete", PAYMENTS_TOKEN, String::new(), 400),
        ("/v1/ns/payments/claim", PAYMENTS_TOKEN, "{\"key\": 1}".to_owned(), 422),
        ("/v1/ns/payments/complete", PAYMENTS_TOKEN, "{\"key\": 1}".to_owned(), 422),
        ("/v1/ns/payments/claim", ORDERS_TOKEN, "{}".to_owned(), 401),
        ("/v1/ns/payments/complete", "wrong-token-0000000000", "{}".to_owned(), 401),
        (
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            json!({"principal": "p", "key": "k", "claim": "1.0@eu1", "outcome": {"status": 200, "body": "x".repeat(13 << 20)}}).to_string(),
            413,
        ),
        (
            "/v1/ns/payments/complete",
            PAYMENTS_TOKEN,
            json!({"principal": "p", "key": "k", "claim": "nonsense", "outcome": {"status": 200}}).to_string(),
            400,
        ),
    ];
    for (path, token, body, want) in errors {
        let mut answers = Vec::new();
        for ct in ["application/json", "application/json; charset=utf-8"] {
            let r = http()
                .post(format!("{}{path}", d.url))
                .bearer_auth(token)
                .header("content-type", ct)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let region = r.headers()["idem-region"].to_str().unwrap().to_owned();
            let problem: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            answers.push((status, region, problem));
        }
        assert_eq!(
            answers[0].0,
            want,
            "{path} {}: {:?}",
            &body[..body.len().min(40)],
            answers[0]
        );
        assert_eq!(
            answers[0],
            answers[1],
            "{path} {}",
            &body[..body.len().min(40)]
        );
    }
}
