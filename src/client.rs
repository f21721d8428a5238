//! A Rust client for the store API, following the rules every client must follow
//! (`docs/http-api.md`, "Retries and failover"):
//!
//! * **One attempt token per claim call** (128 random bits), re-sent only when no answer came
//!   back: the connection failed or broke, the answer timed out or was cut short, a gateway
//!   answered 502 or 504, or the daemon answered 503 with `state` `timeout` or
//!   `shutting_down` (the claim may have been granted). After any other answer a retry uses a
//!   fresh token.
//! * **Exponential backoff with full jitter**: before retry `n` the client sleeps a uniform
//!   random time in `[0, min(max_backoff, base_backoff * 2^n)]`, and at least `Retry-After`
//!   when the daemon sent one. Attempts and total time are capped.
//! * **Failover only when a region could not be reached (no connection) or answered 503**
//!   (other than `timeout` and `shutting_down`): the claim then goes to the next endpoint with
//!   the header `Idem-Prior-Region` naming the region tried before, so that region can be asked
//!   about the key (design §4). When no answer came back over an open connection the same
//!   region is asked again with the same token, since only it can resume that claim. Any other
//!   answer (in flight, mismatch, a 4xx) is final and never sent elsewhere.
//! * **Caps**: attempts, and total time; each attempt's timeout is cut to the time left.
//! * **Completions, releases and extensions go to the claim's own region** (the region part of
//!   the claim id); they are retried there, never failed over: only that region may write its
//!   claim.
//!
//! ```no_run
//! use idem::client::{Client, ClientConfig, ClaimOutcome, Endpoint};
//! use idem::http::api::OutcomeInput;
//! use idem::record::Fingerprint;
//!
//! # async fn run() -> Result<(), idem::client::ClientError> {
//! let client = Client::new(ClientConfig::new(
//!     vec![Endpoint::new("eu1", "http://127.0.0.1:7070")?, Endpoint::new("us1", "http://10.0.0.2:7070")?],
//!     "payments",
//!     "payments-token-0123456789",
//! ))?;
//! let fp = Fingerprint::of(br#"POST /charges {"amount":10}"#);
//! match client.claim("acct_42", "order-7", fp).await? {
//!     ClaimOutcome::Execute { claim, .. } => {
//!         // ... charge the card ...
//!         let response = OutcomeInput::text(201, r#"{"id":"ch_1"}"#);
//!         client.complete("acct_42", "order-7", &claim, response).await?;
//!     }
//!     ClaimOutcome::Replay { outcome, .. } => { /* send the stored response */ let _ = outcome; }
//!     ClaimOutcome::InFlight { .. } => { /* 409: retry later */ }
//!     ClaimOutcome::Mismatch { .. } => { /* 422: same key, different request */ }
//! }
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::clock::{RegionId, Stamp};
use crate::http::api::{
    format_attempt, hex, ClaimAnswer, ClaimBody, CompleteBody, ExtendAnswer, ExtendBody,
    FinishAnswer, OutcomeInput, OutcomeJson, ReadAnswer, ReadBody, ReleaseBody, StoreAs,
    PRIOR_REGION_HEADER,
};
use crate::http::problem::Problem;
use crate::record::Fingerprint;

/// One region's daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The region's id (sent as the prior region when failing over from it).
    pub region: RegionId,
    /// Base URL, e.g. `http://127.0.0.1:7070`.
    pub url: String,
}

impl Endpoint {
    /// An endpoint; the URL must start with `http://` or `https://`.
    pub fn new(region: &str, url: &str) -> Result<Self, ClientError> {
        let region = RegionId::new(region)
            .map_err(|e| ClientError::Config(format!("region {region:?}: {e}")))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "endpoint {url:?}: must start with http:// or https://"
            )));
        }
        Ok(Self {
            region,
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Regions in order of preference: the first is home; the rest are failover targets.
    pub endpoints: Vec<Endpoint>,
    /// The namespace.
    pub namespace: String,
    /// Its bearer token.
    pub token: String,
    /// Most HTTP attempts per call, failovers included. Default 6.
    pub max_attempts: u32,
    /// Most time per call, sleeps and attempts included. Default 30 s.
    pub max_total: Duration,
    /// First backoff ceiling. Default 50 ms.
    pub base_backoff: Duration,
    /// Largest backoff ceiling. Default 2 s.
    pub max_backoff: Duration,
    /// Per-attempt timeout (connect, send, answer). Default 11 s: longer than the daemon's
    /// default request time limit (10 s), so a slow answer arrives rather than being retried.
    pub attempt_timeout: Duration,
    /// How long a connection may take to open, default 2 s: a region whose packets are
    /// dropped (the usual way a dead region looks) is then unreachable, and failed over, well
    /// before the attempt timeout.
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) trusted for `https` endpoints, besides the public roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Seed for the backoff jitter (tests); default: from the OS.
    pub jitter_seed: Option<u64>,
}

impl ClientConfig {
    /// Settings with the documented defaults.
    pub fn new(endpoints: Vec<Endpoint>, namespace: &str, token: &str) -> Self {
        Self {
            endpoints,
            namespace: namespace.to_owned(),
            token: token.to_owned(),
            max_attempts: 6,
            max_total: Duration::from_secs(30),
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(11),
            connect_timeout: Duration::from_secs(2),
            ca_pem: None,
            jitter_seed: None,
        }
    }
}

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// You own the key: run the operation, then complete, release or extend.
    Execute {
        /// The claim id (pass it to complete, release or extend).
        claim: String,
        /// The region that granted it.
        region: RegionId,
        /// When the lease ends, Unix ms.
        lease_until_ms: u64,
        /// True when this call resumed its own claim (an earlier answer was lost).
        resumed: bool,
        /// Claims this one took over.
        took_over: Vec<String>,
        /// When the key expires, Unix ms.
        expires_at_ms: u64,
    },
    /// Already done: the stored response.
    Replay {
        /// The winning claim.
        claim: String,
        /// The stored response.
        outcome: OutcomeJson,
        /// Stored as indeterminate (a side effect may have happened).
        indeterminate: bool,
        /// When the key expires, Unix ms.
        expires_at_ms: u64,
    },
    /// Someone else is running it; retry later (a new call, a new attempt token).
    InFlight {
        /// The problem details (origin region, lease end, retry after).
        problem: Box<Problem>,
    },
    /// Same key, different request.
    Mismatch {
        /// The problem details.
        problem: Box<Problem>,
    },
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad client settings.
    #[error("client config: {0}")]
    Config(String),
    /// The daemon refused the request (a 4xx, or a 5xx other than 503): not retried.
    #[error("{}: {}", .0.status, .0.detail.as_deref().unwrap_or(&.0.title))]
    Refused(Box<Problem>),
    /// Every attempt failed, or time ran out; `last` says how the last one failed.
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last failure.
        last: String,
        /// The last 503's problem, if the last failure was one.
        problem: Option<Box<Problem>>,
    },
    /// An answer that is not what the API promises.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// A TLS client config on the ring provider (no process-wide provider needed), trusting the
/// web PKI roots and, if given, the PEM certificates in `ca_pem`.
pub(crate) fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("ca_pem: {e}"))?;
            roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The store API client. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    rng: Arc<Mutex<StdRng>>,
}

/// How one attempt ended.
enum Attempt<T> {
    /// A final answer.
    Done(T),
    /// No connection could be made: the region is unreachable (fail over).
    Unreachable(String),
    /// The request may have arrived but no answer came back (retry the same region with the
    /// same token), with the daemon's `Retry-After` if it sent one.
    NoAnswer(String, Option<Duration>),
    /// 503 (not `timeout` or `shutting_down`): the problem and its `Retry-After` (fail over).
    Unavailable(Box<Problem>, Option<Duration>),
}

/// Classifies a failed send.
fn send_failed<T>(e: &reqwest::Error) -> Attempt<T> {
    if e.is_connect() {
        Attempt::Unreachable(describe(e))
    } else {
        Attempt::NoAnswer(describe(e), None)
    }
}

/// Classifies an answer that is not 200: a final refusal, a 503, or no answer at all.
async fn not_ok<T>(response: reqwest::Response) -> Attempt<Result<T, ClientError>> {
    let status = response.status();
    if status == StatusCode::BAD_GATEWAY || status == StatusCode::GATEWAY_TIMEOUT {
        // A gateway's own answer: the daemon's never arrived.
        return Attempt::NoAnswer(format!("gateway answered {status}"), None);
    }
    match problem_of(response).await {
        Err(no_answer) => Attempt::NoAnswer(no_answer, None),
        Ok((p, retry)) if p.status == 503 => match p.state.as_deref() {
            // Not an answer about the request: it may have taken effect.
            Some("timeout") | Some("shutting_down") => Attempt::NoAnswer(
                format!("503 {}", p.state.as_deref().unwrap_or_default()),
                retry,
            ),
            _ => Attempt::Unavailable(p, retry),
        },
        Ok((p, _)) => Attempt::Done(Err(ClientError::Refused(p))),
    }
}

/// Reads a 200 answer: a body cut short is no answer; a body that does not decode is final.
async fn ok_body<T: DeserializeOwned, U>(
    response: reqwest::Response,
) -> Result<T, Attempt<Result<U, ClientError>>> {
    let bytes = response
        .bytes()
        .await
        .map_err(|e| Attempt::NoAnswer(describe(&e), None))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Attempt::Done(Err(ClientError::Protocol(format!(
            "a 200 answer that does not decode: {e}"
        ))))
    })
}

/// Where retries of a call may go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Fail over across the endpoints (claims, reads); the first attempt names this prior
    /// region, if any.
    Failover(Option<RegionId>),
    /// Only the endpoint of this region (its own claims).
    Pinned(RegionId),
}

impl Client {
    /// A client; checks the settings.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("at least one endpoint".into()));
        }
        if config.max_attempts == 0 {
            return Err(ClientError::Config("max_attempts must be positive".into()));
        }
        let tls = tls_config(config.ca_pem.as_deref()).map_err(ClientError::Config)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.attempt_timeout)
            .connect_timeout(config.connect_timeout.min(config.attempt_timeout))
            .build()
            .map_err(|e| ClientError::Config(format!("http client: {e}")))?;
        let rng = match config.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            http,
            config: Arc::new(config),
            rng: Arc::new(Mutex::new(rng)),
        })
    }

    /// Claims a key. Retries and fails over as the module docs say; the same attempt token
    /// is kept while no answer comes back.
    pub async fn claim(
        &self,
        principal: &str,
        key: &str,
        fingerprint: Fingerprint,
    ) -> Result<ClaimOutcome, ClientError> {
        self.claim_after(principal, key, fingerprint, None).await
    }

    /// [`claim`](Self::claim) for a request that failed over from another region: the first
    /// region asked is told `prior_region` (`Idem-Prior-Region`), so that it asks that region
    /// about the key before granting it. For a caller that learns of the failover from its own
    /// client (an HTTP layer forwarding the header); failovers of this client set it themselves.
    pub async fn claim_after(
        &self,
        principal: &str,
        key: &str,
        fingerprint: Fingerprint,
        prior_region: Option<RegionId>,
    ) -> Result<ClaimOutcome, ClientError> {
        let mut attempt_token = self.fresh_token();
        let path = self.path("claim");
        self.run(
            Route::Failover(prior_region),
            |endpoint, prior, answered_before, timeout| {
                if answered_before {
                    // An answer came back for the last token: never re-send it.
                    attempt_token = self.fresh_token();
                }
                let body = ClaimBody {
                    principal: principal.to_owned(),
                    key: key.to_owned(),
                    fingerprint: hex(&fingerprint.0),
                    attempt: format_attempt(attempt_token),
                };
                let request = self.post(endpoint, &path, &body, prior, timeout);
                let region = endpoint.region;
                async move {
                    let response = match request.send().await {
                        Ok(r) => r,
                        Err(e) => return send_failed(&e),
                    };
                    if response.status() != StatusCode::OK {
                        return match not_ok::<ClaimOutcome>(response).await {
                            Attempt::Done(Err(ClientError::Refused(p))) => {
                                match (p.status, p.decision.as_deref()) {
                                    (409, Some("in_flight")) => {
                                        Attempt::Done(Ok(ClaimOutcome::InFlight { problem: p }))
                                    }
                                    (422, Some("mismatch")) => {
                                        Attempt::Done(Ok(ClaimOutcome::Mismatch { problem: p }))
                                    }
                                    _ => Attempt::Done(Err(ClientError::Refused(p))),
                                }
                            }
                            other => other,
                        };
                    }
                    match ok_body::<ClaimAnswer, ClaimOutcome>(response).await {
                        Ok(ClaimAnswer::Execute {
                            claim,
                            lease_until_ms,
                            took_over,
                            resumed,
                            expires_at_ms,
                        }) => Attempt::Done(Ok(ClaimOutcome::Execute {
                            claim,
                            region,
                            lease_until_ms,
                            resumed,
                            took_over,
                            expires_at_ms,
                        })),
                        Ok(ClaimAnswer::Replay {
                            claim,
                            outcome,
                            indeterminate,
                            expires_at_ms,
                        }) => Attempt::Done(Ok(ClaimOutcome::Replay {
                            claim,
                            outcome,
                            indeterminate,
                            expires_at_ms,
                        })),
                        Err(a) => a,
                    }
                }
            },
        )
        .await
    }

    /// Completes a claim with its response, at the claim's own region.
    pub async fn complete(
        &self,
        principal: &str,
        key: &str,
        claim: &str,
        outcome: OutcomeInput,
    ) -> Result<FinishAnswer, ClientError> {
        self.complete_as(principal, key, claim, outcome, None).await
    }

    /// [`complete`](Self::complete), saying what the outcome is stored as (`Some`) instead of
    /// the namespace's status table (`None`).
    pub async fn complete_as(
        &self,
        principal: &str,
        key: &str,
        claim: &str,
        outcome: OutcomeInput,
        store_as: Option<StoreAs>,
    ) -> Result<FinishAnswer, ClientError> {
        let body = CompleteBody {
            principal: principal.to_owned(),
            key: key.to_owned(),
            claim: claim.to_owned(),
            outcome,
            store_as,
        };
        self.pinned_call("complete", claim, &body).await
    }

    /// Releases a claim without executing, at the claim's own region.
    pub async fn release(
        &self,
        principal: &str,
        key: &str,
        claim: &str,
    ) -> Result<FinishAnswer, ClientError> {
        let body = ReleaseBody {
            principal: principal.to_owned(),
            key: key.to_owned(),
            claim: claim.to_owned(),
        };
        self.pinned_call("release", claim, &body).await
    }

    /// Extends a claim's lease to `lease` from now, at the claim's own region.
    pub async fn extend(
        &self,
        principal: &str,
        key: &str,
        claim: &str,
        lease: Duration,
    ) -> Result<ExtendAnswer, ClientError> {
        let body = ExtendBody {
            principal: principal.to_owned(),
            key: key.to_owned(),
            claim: claim.to_owned(),
            lease_ms: lease.as_millis().min(u64::MAX as u128) as u64,
        };
        self.pinned_call("extend", claim, &body).await
    }

    /// Reads a key (any region that answers).
    pub async fn read(&self, principal: &str, key: &str) -> Result<ReadAnswer, ClientError> {
        let body = ReadBody {
            principal: principal.to_owned(),
            key: key.to_owned(),
        };
        let path = self.path("read");
        self.run(Route::Failover(None), |endpoint, _, _, timeout| {
            let request = self.post(endpoint, &path, &body, None, timeout);
            async move { json_attempt(request).await }
        })
        .await
    }

    /// The namespace's policy as the daemon applies it (limits, statuses kept, headers
    /// replayed), from any region.
    pub async fn policy(&self) -> Result<crate::http::api::PolicyAnswer, ClientError> {
        let path = self.path("policy");
        self.run(Route::Failover(None), |endpoint, _, _, timeout| {
            let request = self
                .http
                .get(format!("{}{path}", endpoint.url))
                .bearer_auth(&self.config.token)
                .timeout(timeout);
            async move { json_attempt(request).await }
        })
        .await
    }

    async fn pinned_call<B: Serialize, T: DeserializeOwned>(
        &self,
        op: &str,
        claim: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let stamp: Stamp = claim
            .parse()
            .map_err(|e| ClientError::Config(format!("claim id {claim:?}: {e}")))?;
        let path = self.path(op);
        self.run(Route::Pinned(stamp.region), |endpoint, _, _, timeout| {
            let request = self.post(endpoint, &path, body, None, timeout);
            async move { json_attempt(request).await }
        })
        .await
    }

    fn path(&self, op: &str) -> String {
        format!("/v1/ns/{}/{op}", self.config.namespace)
    }

    fn post<B: Serialize>(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &B,
        prior: Option<RegionId>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .post(format!("{}{path}", endpoint.url))
            .bearer_auth(&self.config.token)
            .timeout(timeout)
            .json(body);
        if let Some(p) = prior {
            r = r.header(PRIOR_REGION_HEADER, p.as_str());
        }
        r
    }

    fn fresh_token(&self) -> u128 {
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).random()
    }

    /// Full jitter: uniform in `[0, min(max, base * 2^retry)]`.
    fn backoff(&self, retry: u32) -> Duration {
        let c = &self.config;
        let ceiling = c
            .base_backoff
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
            .min(c.max_backoff);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        let pick = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .random_range(0..=nanos);
        Duration::from_nanos(pick)
    }

    /// The retry loop. `attempt(endpoint, prior_region, answered_before, timeout)` makes one
    /// request within `timeout`; `answered_before` tells whether the previous attempt got an
    /// answer (so a claim must not re-send its token).
    async fn run<T, F, Fut>(&self, route: Route, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(&Endpoint, Option<RegionId>, bool, Duration) -> Fut,
        Fut: std::future::Future<Output = Attempt<Result<T, ClientError>>>,
    {
        let c = &self.config;
        let started = Instant::now();
        let (pinned, mut prior) = match route {
            Route::Failover(prior) => (None, prior),
            Route::Pinned(region) => (
                Some(
                    c.endpoints
                        .iter()
                        .position(|e| e.region == region)
                        .ok_or_else(|| {
                            ClientError::Config(format!(
                                "no endpoint for region {region}, which owns the claim"
                            ))
                        })?,
                ),
                None,
            ),
        };
        let mut at = pinned.unwrap_or(0);
        let mut answered_before = false;
        let mut last = String::from("no attempt made");
        let mut last_problem = None;
        let mut attempts = 0;
        while attempts < c.max_attempts {
            let left = c.max_total.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            attempts += 1;
            let endpoint = &c.endpoints[at];
            let timeout = c.attempt_timeout.min(left);
            let (failover, wait_at_least) =
                match attempt(endpoint, prior, answered_before, timeout).await {
                    Attempt::Done(result) => return result,
                    Attempt::Unreachable(why) => {
                        last = format!("{}: unreachable: {why}", endpoint.region);
                        last_problem = None;
                        answered_before = false;
                        (true, None)
                    }
                    Attempt::NoAnswer(why, retry) => {
                        last = format!("{}: no answer: {why}", endpoint.region);
                        last_problem = None;
                        answered_before = false;
                        (false, retry)
                    }
                    Attempt::Unavailable(p, retry) => {
                        last = format!(
                            "{}: 503 {}",
                            endpoint.region,
                            p.state.as_deref().unwrap_or("unavailable")
                        );
                        last_problem = Some(p);
                        answered_before = true;
                        (true, retry)
                    }
                };
            if attempts == c.max_attempts {
                break;
            }
            let moved = failover && pinned.is_none() && c.endpoints.len() > 1;
            if !moved
                && last_problem
                    .as_ref()
                    .is_some_and(|p| p.state.as_deref() == Some("lookup_unanswered"))
            {
                // The region refuses to grant a failed-over claim whose prior region it could
                // not ask, and there is no other region to try: asking it again at once gets
                // the same answer. The caller decides when to retry.
                break;
            }
            if moved {
                // The next region is told which region was tried just before it, also when
                // the list wraps around to the home region.
                prior = Some(endpoint.region);
                at = (at + 1) % c.endpoints.len();
            }
            // Retry-After is the answering region's; a region failed over to need not wait.
            let wait = if moved { None } else { wait_at_least };
            let sleep = self.backoff(attempts - 1).max(wait.unwrap_or_default());
            if started.elapsed() + sleep >= c.max_total {
                break;
            }
            tokio::time::sleep(sleep).await;
        }
        Err(ClientError::GaveUp {
            attempts,
            elapsed: started.elapsed(),
            last,
            problem: last_problem,
        })
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A problem answer and its `Retry-After`, or why it could not be read (counts as no answer).
async fn problem_of(
    response: reqwest::Response,
) -> Result<(Box<Problem>, Option<Duration>), String> {
    let status = response.status();
    let retry = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = response.bytes().await.map_err(|e| describe(&e))?;
    let problem = serde_json::from_slice::<Problem>(&bytes).unwrap_or_else(|_| {
        // Not from idem (a proxy's error page, say): keep the status.
        Problem::new(
            status,
            "unexpected",
            "Unexpected answer",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        )
    });
    Ok((Box::new(problem), retry))
}

/// One attempt of a call whose 200 answer is `T`.
async fn json_attempt<T: DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> Attempt<Result<T, ClientError>> {
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return send_failed(&e),
    };
    if response.status() != StatusCode::OK {
        return not_ok(response).await;
    }
    match ok_body(response).await {
        Ok(t) => Attempt::Done(Ok(t)),
        Err(a) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(seed: u64) -> Client {
        let mut c = ClientConfig::new(
            vec![Endpoint::new("eu1", "http://127.0.0.1:1").unwrap()],
            "payments",
            "t",
        );
        c.jitter_seed = Some(seed);
        Client::new(c).unwrap()
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        let c = client(7);
        for retry in 0..12 {
            let ceiling = Duration::from_millis(50)
                .saturating_mul(1 << retry)
                .min(Duration::from_secs(2));
            let picks: Vec<Duration> = (0..200).map(|_| c.backoff(retry)).collect();
            assert!(picks.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter: spread over the whole range, not bunched near the ceiling.
            assert!(picks.iter().any(|d| *d < ceiling / 4), "retry {retry}");
            assert!(picks.iter().any(|d| *d > ceiling * 3 / 4), "retry {retry}");
        }
    }

    #[test]
    fn endpoints_and_settings_are_checked() {
        assert!(Endpoint::new("EU", "http://x").is_err());
        assert!(Endpoint::new("eu1", "ftp://x").is_err());
        assert_eq!(Endpoint::new("eu1", "http://x/").unwrap().url, "http://x");
        let none = ClientConfig::new(vec![], "payments", "t");
        assert!(matches!(Client::new(none), Err(ClientError::Config(_))));
    }
}
