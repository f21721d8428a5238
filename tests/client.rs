//! The Rust client's retry, backoff and failover rules, against real daemons (and stopped ones).

mod common;

use std::time::{Duration, Instant};

use common::*;
use idem::client::{ClaimOutcome, Client, ClientConfig, ClientError, Endpoint};
use idem::http::api::OutcomeInput;
use idem::Fingerprint;

fn client(endpoints: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new(
        endpoints
            .iter()
            .map(|(region, url)| Endpoint::new(region, url).unwrap())
            .collect(),
        "payments",
        PAYMENTS_TOKEN,
    );
    c.jitter_seed = Some(1);
    c
}

fn failover_policy() -> String {
    config("us1", "").replace(
        "outcome_bytes_max = 4096 }",
        "outcome_bytes_max = 4096, lookup_unanswered = \"unavailable\" }",
    )
}

#[tokio::test]
async fn a_stopped_region_is_failed_over_and_named_as_the_prior_region() {
    let dir = tempdir();
    let us1 = Daemon::start(dir.path(), &config("us1", "")).await;
    let c = Client::new(client(&[("eu1", &dead_url()), ("us1", &us1.url)])).unwrap();
    let got = c
        .claim("acct_1", "k1", Fingerprint::of(b"a"))
        .await
        .unwrap();
    let ClaimOutcome::Execute { region, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(region.as_str(), "us1");
    // us1 saw the prior-region header: it could not ask eu1 and granted (the default policy).
    let m = us1.metrics().await;
    assert!(
        m.contains("idem_failover_lookups_total{prior=\"eu1\",result=\"granted_unanswered\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_region_whose_packets_are_dropped_is_failed_over_after_the_connect_timeout() {
    let dir = tempdir();
    let us1 = Daemon::start(dir.path(), &config("us1", "")).await;
    // eu1 never completes a connection (its SYNs are dropped), as a dead region looks.
    let (eu1, _held, _listener) = silent_url();
    let mut cfg = client(&[("eu1", &eu1), ("us1", &us1.url)]);
    cfg.connect_timeout = Duration::from_millis(300);
    cfg.attempt_timeout = Duration::from_secs(5);
    let c = Client::new(cfg).unwrap();
    let started = Instant::now();
    let got = c
        .claim("acct_1", "k8", Fingerprint::of(b"a"))
        .await
        .unwrap();
    let ClaimOutcome::Execute { region, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(region.as_str(), "us1");
    // Failed over after the connect timeout, not after the 5 s attempt timeout.
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_503_is_failed_over_at_once_and_the_next_region_told() {
    let dir = tempdir();
    // us1 refuses claims whose prior region it cannot ask (503, Retry-After: 1).
    let us1 = Daemon::start(&dir.path().join("us1"), &failover_policy()).await;
    let ap1 = Daemon::start(&dir.path().join("ap1"), &config("ap1", "")).await;
    let c = Client::new(client(&[
        ("eu1", &dead_url()),
        ("us1", &us1.url),
        ("ap1", &ap1.url),
    ]))
    .unwrap();
    let started = Instant::now();
    let got = c
        .claim("acct_1", "k2", Fingerprint::of(b"a"))
        .await
        .unwrap();
    let ClaimOutcome::Execute { region, .. } = got else {
        panic!("{got:?}")
    };
    assert_eq!(region.as_str(), "ap1");
    // us1's Retry-After is about us1: another region is tried without waiting it out.
    assert!(started.elapsed() < Duration::from_secs(1));
    let m = us1.metrics().await;
    assert!(
        m.contains("idem_failover_lookups_total{prior=\"eu1\",result=\"refused_unanswered\"} 1"),
        "{m}"
    );
    // ap1 was told the region tried just before it.
    let m = ap1.metrics().await;
    assert!(
        m.contains("idem_failover_lookups_total{prior=\"us1\",result=\"granted_unanswered\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_caller_named_prior_region_reaches_the_daemon_and_its_refusal_is_not_retried_in_vain() {
    let dir = tempdir();
    // us1 refuses claims whose prior region it cannot ask; it is the only region.
    let us1 = Daemon::start(dir.path(), &failover_policy()).await;
    let c = Client::new(client(&[("us1", &us1.url)])).unwrap();
    let eu1 = idem::clock::RegionId::new("eu1").unwrap();
    let got = c
        .claim_after("acct_1", "k-prior", Fingerprint::of(b"a"), Some(eu1))
        .await;
    let Err(ClientError::GaveUp {
        attempts,
        problem: Some(p),
        ..
    }) = got
    else {
        panic!("{got:?}")
    };
    assert_eq!(p.state.as_deref(), Some("lookup_unanswered"));
    assert_eq!(attempts, 1, "the same answer is not asked for again");
    let m = us1.metrics().await;
    assert!(
        m.contains("idem_failover_lookups_total{prior=\"eu1\",result=\"refused_unanswered\"} 1"),
        "{m}"
    );
    // Without a prior region the claim is granted.
    let got = c
        .claim("acct_1", "k-prior", Fingerprint::of(b"a"))
        .await
        .unwrap();
    assert!(matches!(got, ClaimOutcome::Execute { .. }), "{got:?}");
}

#[tokio::test]
async fn a_503_from_the_only_region_is_retried_after_its_retry_after() {
    let dir = tempdir();
    // A region rebuilding its index answers 503 `recovering` with Retry-After: 1.
    fill_orders(dir.path(), &config("eu1", ""), 150_000);
    let eu1 = Daemon::spawn(dir.path(), &config("eu1", ""));
    let c = Client::new(client(&[("eu1", &eu1.url)])).unwrap();
    let started = Instant::now();
    let got = c
        .claim("acct_1", "k7", Fingerprint::of(b"a"))
        .await
        .unwrap();
    assert!(matches!(got, ClaimOutcome::Execute { .. }), "{got:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "answered in {:?}: the 503 was not waited out",
        started.elapsed()
    );
    assert!(eu1
        .metrics()
        .await
        .contains("idem_claims_total{decision=\"execute\"} 1"));
}

#[tokio::test]
async fn in_flight_and_mismatch_answers_are_final_and_never_failed_over() {
    let dir = tempdir();
    let eu1 = Daemon::start(&dir.path().join("eu1"), &config("eu1", "")).await;
    let us1 = Daemon::start(&dir.path().join("us1"), &config("us1", "")).await;
    let c = Client::new(client(&[("eu1", &eu1.url), ("us1", &us1.url)])).unwrap();
    let fp = Fingerprint::of(b"a");
    assert!(matches!(
        c.claim("acct_1", "k3", fp).await.unwrap(),
        ClaimOutcome::Execute { .. }
    ));
    let again = c.claim("acct_1", "k3", fp).await.unwrap();
    assert!(matches!(again, ClaimOutcome::InFlight { .. }), "{again:?}");
    let other = c
        .claim("acct_1", "k3", Fingerprint::of(b"b"))
        .await
        .unwrap();
    assert!(matches!(other, ClaimOutcome::Mismatch { .. }), "{other:?}");
    assert!(!us1.metrics().await.contains("idem_claims_total{"));
    // A refusal (4xx) is final too.
    let err = c.claim("acct_1", &"k".repeat(300), fp).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(p) if p.status == 400),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_lost_answer_is_retried_with_the_same_attempt_token() {
    let dir = tempdir();
    let eu1 = Daemon::start(&dir.path().join("eu1"), &config("eu1", "")).await;
    let us1 = Daemon::start(&dir.path().join("us1"), &config("us1", "")).await;
    let proxy = answer_losing_proxy(&eu1.url).await;
    // A second region is listed: a lost answer is still retried at the region that may hold
    // the claim, never failed over.
    let c = Client::new(client(&[("eu1", &proxy), ("us1", &us1.url)])).unwrap();
    let got = c
        .claim("acct_1", "k4", Fingerprint::of(b"a"))
        .await
        .unwrap();
    // The first answer was lost after the claim was granted; the retry carried the same token
    // and got the same claim back, instead of "in flight" for a whole lease.
    let ClaimOutcome::Execute { resumed, .. } = got else {
        panic!("{got:?}")
    };
    assert!(resumed);
    assert!(eu1.metrics().await.contains("idem_resumes_total 1"));
    assert!(!us1.metrics().await.contains("idem_claims_total{"));
}

#[tokio::test]
async fn every_region_down_gives_up_within_the_caps() {
    let mut cfg = client(&[("eu1", &dead_url()), ("us1", &dead_url())]);
    cfg.max_attempts = 4;
    let c = Client::new(cfg).unwrap();
    let err = c
        .claim("acct_1", "k5", Fingerprint::of(b"a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::GaveUp { attempts: 4, .. }),
        "{err:?}"
    );

    let mut cfg = client(&[("eu1", &dead_url())]);
    cfg.max_attempts = 1000;
    cfg.base_backoff = Duration::from_millis(40);
    cfg.max_total = Duration::from_millis(300);
    let c = Client::new(cfg).unwrap();
    let started = Instant::now();
    let err = c
        .claim("acct_1", "k5", Fingerprint::of(b"a"))
        .await
        .unwrap_err();
    let ClientError::GaveUp {
        elapsed, attempts, ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");
    assert!((2..1000).contains(&attempts), "{attempts}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn completions_go_to_the_claims_own_region() {
    let dir = tempdir();
    let eu1 = Daemon::start(&dir.path().join("eu1"), &config("eu1", "")).await;
    let us1 = Daemon::start(&dir.path().join("us1"), &config("us1", "")).await;
    let home = Client::new(client(&[("eu1", &eu1.url), ("us1", &us1.url)])).unwrap();
    let fp = Fingerprint::of(b"a");
    let ClaimOutcome::Execute { claim, .. } = home.claim("acct_1", "k6", fp).await.unwrap() else {
        panic!()
    };
    // A client whose home is us1 still completes eu1's claim at eu1.
    let other = Client::new(client(&[("us1", &us1.url), ("eu1", &eu1.url)])).unwrap();
    let outcome = OutcomeInput::text(201, "{\"id\":\"ch_1\"}");
    let done = other
        .complete("acct_1", "k6", &claim, outcome)
        .await
        .unwrap();
    assert_eq!(done.terminal, "completed");
    let replay = home.claim("acct_1", "k6", fp).await.unwrap();
    let ClaimOutcome::Replay { outcome, .. } = replay else {
        panic!("{replay:?}")
    };
    assert_eq!(outcome.body.as_deref(), Some("{\"id\":\"ch_1\"}"));
    // A claim of a region the client has no endpoint for is a config error, not a retry.
    let lone = Client::new(client(&[("us1", &us1.url)])).unwrap();
    let err = lone.release("acct_1", "k6", &claim).await.unwrap_err();
    assert!(matches!(err, ClientError::Config(_)), "{err:?}");
    // Reads work through the client too.
    let view = home.read("acct_1", "k6").await.unwrap();
    assert_eq!(view.winner.as_deref(), Some(claim.as_str()));
}
