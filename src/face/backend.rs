//! Where the layer's keys live: a store embedded in this process ([`EmbeddedStore`]), or a
//! region daemon shared by every replica of an API ([`RemoteStore`]). Both answer with the store's decisions
//! and with RFC 9457 problems for errors, so the layer treats them alike.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{wall_clock_ms, RegionId, Stamp};
use crate::durable::{DurablePublisher, DurableWaiter, Flusher, NotDurable};
use crate::http::api::StoreAs;
use crate::http::problem::{ApiError, Problem};
use crate::record::{ClaimStatus, Outcome, RecordKey};
use crate::store::storage::FsStorage;
use crate::store::{ClaimRequest, Decision, Pending, Store, StoreConfig, Unavailable};

/// A boxed future, as the backend's calls return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store calls the layer makes; every answer is durable when it returns. Errors are RFC
/// 9457 problems (boxed), answered to the client as they are.
pub trait Backend: Send + Sync + 'static {
    /// Claims a key. `prior` names the region the request failed over from
    /// (`Idem-Prior-Region`), which the store asks about the key before granting it.
    fn claim(
        &self,
        req: ClaimRequest,
        prior: Option<RegionId>,
    ) -> BoxFuture<'_, Result<Decision, ApiError>>;
    /// Stores an outcome as `store_as` says, or, when `None`, as the namespace's policy says by
    /// status; `true` when it is kept (completed or indeterminate), `false` when the policy
    /// released the key.
    fn complete(
        &self,
        key: RecordKey,
        claim: Stamp,
        outcome: Outcome,
        store_as: Option<StoreAs>,
    ) -> BoxFuture<'_, Result<bool, ApiError>>;
    /// Releases a claim: nothing was executed, or nothing is to be kept.
    fn release(&self, key: RecordKey, claim: Stamp) -> BoxFuture<'_, Result<(), ApiError>>;
    /// Extends a claim's lease to now + `lease_ms`.
    fn extend(
        &self,
        key: RecordKey,
        claim: Stamp,
        lease_ms: u64,
    ) -> BoxFuture<'_, Result<(), ApiError>>;
    /// The namespace's limits the layer needs, or `None` if the namespace is unknown.
    fn limits(&self, namespace: &str) -> Option<NamespaceLimits>;
}

/// What the layer needs to know of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceLimits {
    /// Longest key, characters.
    pub key_len_max: usize,
    /// The in-flight lease a claim gets, ms (heartbeats extend it while the handler runs).
    pub lease_ms: u64,
    /// Largest stored outcome (headers and body), bytes; larger responses keep a digest.
    pub outcome_bytes_max: usize,
    /// Response headers kept with an outcome (case-insensitive).
    pub headers_allowed: Vec<String>,
}

/// A store in this process, with its flusher thread and housekeeping (stability, garbage
/// collection). Only this process deduplicates with it: replicas of an API each with their own
/// embedded store do not see each other's keys.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Embedded>,
}

struct Embedded {
    store: Arc<Store<FsStorage>>,
    waiter: DurableWaiter,
    flusher: Mutex<Option<Flusher>>,
    stop: Arc<AtomicBool>,
    housekeeping: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How often the embedded store's housekeeping runs, and how often it collects garbage.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const GC_EVERY: Duration = Duration::from_secs(60);

impl EmbeddedStore {
    /// Opens (or creates) a store in `dir` and rebuilds its index: blocking, call it before
    /// serving (or from a blocking thread).
    pub fn open(dir: &Path, config: StoreConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let storage =
            FsStorage::open(dir).with_context(|| format!("opening data dir {}", dir.display()))?;
        let store = Arc::new(
            Store::open(storage, config, wall_clock_ms())
                .with_context(|| format!("recovering {}", dir.display()))?,
        );
        let (publisher, waiter) = DurablePublisher::new(store.log().durable_lsn());
        let flusher =
            Flusher::start(store.clone(), publisher).context("starting the flusher thread")?;
        let stop = Arc::new(AtomicBool::new(false));
        let housekeeping = std::thread::Builder::new()
            .name("idem-housekeeping".into())
            .spawn({
                let (store, stop) = (store.clone(), stop.clone());
                move || housekeeping(&store, &stop)
            })
            .context("starting the housekeeping thread")?;
        Ok(Self {
            inner: Arc::new(Embedded {
                store,
                waiter,
                flusher: Mutex::new(Some(flusher)),
                stop,
                housekeeping: Mutex::new(Some(housekeeping)),
            }),
        })
    }

    /// The store itself.
    pub fn store(&self) -> &Arc<Store<FsStorage>> {
        &self.inner.store
    }

    async fn durable<T>(&self, pending: Pending<T>) -> Result<T, ApiError> {
        self.inner.waiter.wait(pending).await.map_err(|e| {
            match e {
                NotDurable::LogFailed => Problem::from_unavailable(Unavailable::LogFailed, 5_000),
                NotDurable::Stopped => Problem::unavailable(
                    "shutting_down",
                    "the store stopped before this answer was durable",
                    1_000,
                ),
            }
            .into()
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.housekeeping.lock().ok().and_then(|mut h| h.take()) {
            let _ = t.join();
        }
        if let Some(f) = self.flusher.lock().ok().and_then(|mut f| f.take()) {
            f.stop();
        }
        let _ = self.store.write_hints();
    }
}

fn housekeeping(store: &Store<FsStorage>, stop: &AtomicBool) {
    let (mut last_gc, mut last_stability) = (Instant::now(), Instant::now());
    while !stop.load(Ordering::Acquire) {
        // Short sleeps, so that dropping the store does not wait a whole period.
        std::thread::sleep(Duration::from_millis(100));
        if last_stability.elapsed() < HOUSEKEEPING_EVERY {
            continue;
        }
        last_stability = Instant::now();
        // A single region is its own quorum.
        store.advance_stability(&[]);
        if last_gc.elapsed() >= GC_EVERY {
            last_gc = Instant::now();
            if let Err(e) = store.collect_garbage(wall_clock_ms()) {
                tracing::warn!(error = %e, "garbage collection failed");
            }
        }
    }
}

impl Backend for EmbeddedStore {
    fn claim(
        &self,
        req: ClaimRequest,
        prior: Option<RegionId>,
    ) -> BoxFuture<'_, Result<Decision, ApiError>> {
        Box::pin(async move {
            let store = self.store();
            if let Some(prior) = prior.filter(|p| *p != store.region()) {
                let ns = req.key.namespace();
                let policy = store.namespace(ns).ok_or_else(|| {
                    ApiError::from(crate::store::StoreError::UnknownNamespace(ns.to_owned()))
                })?;
                crate::http::unanswered_lookup(policy, prior)?;
            }
            let pending = store.claim(wall_clock_ms(), &req)?;
            self.durable(pending).await
        })
    }

    fn complete(
        &self,
        key: RecordKey,
        claim: Stamp,
        outcome: Outcome,
        store_as: Option<StoreAs>,
    ) -> BoxFuture<'_, Result<bool, ApiError>> {
        Box::pin(async move {
            let pending = self.store().complete_as(
                wall_clock_ms(),
                &key,
                claim,
                outcome,
                store_as.map(Into::into),
            )?;
            let done = self.durable(pending).await?;
            if done.superseded {
                tracing::warn!(%claim, "a completed claim no longer wins its key: the execution is flagged for compensation");
            }
            Ok(done.terminal != ClaimStatus::Released)
        })
    }

    fn release(&self, key: RecordKey, claim: Stamp) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            let pending = self.store().release(wall_clock_ms(), &key, claim)?;
            self.durable(pending).await.map(drop)
        })
    }

    fn extend(
        &self,
        key: RecordKey,
        claim: Stamp,
        lease_ms: u64,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            let pending = self
                .store()
                .extend(wall_clock_ms(), &key, claim, lease_ms)?;
            self.durable(pending).await.map(drop)
        })
    }

    fn limits(&self, namespace: &str) -> Option<NamespaceLimits> {
        Some(NamespaceLimits::of(
            self.store().namespace(namespace)?.config(),
        ))
    }
}

/// A region daemon (`idem serve`) shared by every replica of an API, through
/// [`crate::client::Client`] (its retries, backoff and failover). The daemon's namespace
/// policy decides what is stored; the layer needs its limits, given here.
#[derive(Clone)]
pub struct RemoteStore {
    client: crate::client::Client,
    limits: NamespaceLimits,
}

impl RemoteStore {
    /// A backend calling the daemon(s) of `config`, with the namespace's limits read from the
    /// daemon (`GET /v1/ns/{namespace}/policy`).
    pub async fn connect(
        config: crate::client::ClientConfig,
    ) -> Result<Self, crate::client::ClientError> {
        let client = crate::client::Client::new(config)?;
        let policy = client.policy().await?;
        Ok(Self {
            client,
            limits: NamespaceLimits::from(&policy),
        })
    }

    /// A backend calling the daemon(s) of `config`; `limits` must match the daemon's
    /// namespace (its defaults: [`NamespaceLimits::daemon_defaults`]; [`connect`](Self::connect)
    /// reads them from the daemon).
    pub fn new(
        config: crate::client::ClientConfig,
        limits: NamespaceLimits,
    ) -> Result<Self, crate::client::ClientError> {
        Ok(Self {
            client: crate::client::Client::new(config)?,
            limits,
        })
    }
}

impl NamespaceLimits {
    /// A namespace's limits under the daemon's default policy.
    pub fn daemon_defaults() -> Self {
        Self::of(&crate::store::policy::NamespaceConfig::named("defaults"))
    }

    /// The limits of a namespace with this policy.
    pub fn of(c: &crate::store::policy::NamespaceConfig) -> Self {
        Self::from(&crate::http::api::PolicyAnswer {
            name: c.name.clone(),
            ttl_ms: c.ttl_ms,
            lease_ms: c.lease_ms,
            key_len_max: c.key_len_max,
            outcome_bytes_max: c.outcome_bytes_max,
            headers_allowed: c.headers_allowed.clone(),
        })
    }
}

impl From<&crate::http::api::PolicyAnswer> for NamespaceLimits {
    /// The limits a daemon's policy answer gives.
    fn from(c: &crate::http::api::PolicyAnswer) -> Self {
        Self {
            key_len_max: c.key_len_max,
            lease_ms: c.lease_ms,
            outcome_bytes_max: c.outcome_bytes_max,
            headers_allowed: c.headers_allowed.clone(),
        }
    }
}

/// A client failure as the problem the layer answers with.
fn client_problem(e: crate::client::ClientError) -> ApiError {
    use crate::client::ClientError;
    match e {
        // The daemon refusing the proxy itself (its token, its namespace) is not the
        // client's fault: the store cannot answer.
        ClientError::Refused(p) if matches!(p.status, 401 | 403 | 404) => {
            tracing::error!(status = p.status, detail = ?p.detail, "the idempotency store refuses these calls: check the token and the namespace");
            Problem::unavailable(
                "store_misconfigured",
                format!(
                    "the idempotency store refused the call ({}); its token or namespace is wrong",
                    p.status
                ),
                5_000,
            )
            .into()
        }
        ClientError::Refused(p) => ApiError(p),
        ClientError::GaveUp {
            problem: Some(p), ..
        } => ApiError(p),
        ClientError::GaveUp { last, .. } => Problem::unavailable(
            "store_unreachable",
            format!("the idempotency store could not be reached: {last}"),
            1_000,
        )
        .into(),
        ClientError::Config(m) | ClientError::Protocol(m) => Problem::unavailable(
            "store_error",
            format!("the idempotency store's answer could not be used: {m}"),
            1_000,
        )
        .into(),
    }
}

fn stamp(s: &str) -> Result<Stamp, ApiError> {
    s.parse().map_err(|e| {
        Problem::unavailable(
            "store_error",
            format!("the store sent a claim id that does not parse ({s:?}: {e})"),
            1_000,
        )
        .into()
    })
}

impl Backend for RemoteStore {
    fn claim(
        &self,
        req: ClaimRequest,
        prior: Option<RegionId>,
    ) -> BoxFuture<'_, Result<Decision, ApiError>> {
        use crate::client::ClaimOutcome;
        Box::pin(async move {
            let k = &req.key;
            let got = self
                .client
                .claim_after(k.principal(), k.key(), req.fingerprint, prior)
                .await
                .map_err(client_problem)?;
            Ok(match got {
                ClaimOutcome::Execute {
                    claim,
                    lease_until_ms,
                    resumed,
                    took_over,
                    expires_at_ms,
                    ..
                } => Decision::Execute {
                    claim: stamp(&claim)?,
                    lease_until_ms,
                    took_over: took_over
                        .iter()
                        .map(|t| stamp(t))
                        .collect::<Result<_, _>>()?,
                    resumed,
                    expires_at_ms,
                },
                ClaimOutcome::Replay {
                    claim,
                    outcome,
                    indeterminate,
                    expires_at_ms,
                } => Decision::Replay {
                    claim: stamp(&claim)?,
                    outcome: outcome.to_outcome().ok_or_else(|| {
                        ApiError::from(Problem::unavailable(
                            "store_error",
                            "a replay without its body",
                            1_000,
                        ))
                    })?,
                    indeterminate,
                    expires_at_ms,
                },
                ClaimOutcome::InFlight { problem } => Decision::InFlight {
                    claim: stamp(problem.claim.as_deref().unwrap_or_default())?,
                    region: problem
                        .origin_region
                        .as_deref()
                        .and_then(|r| crate::clock::RegionId::new(r).ok())
                        .ok_or_else(|| {
                            ApiError::from(Problem::unavailable(
                                "store_error",
                                "in flight without a region",
                                1_000,
                            ))
                        })?,
                    lease_expires_at_ms: problem.lease_expires_at_ms.unwrap_or_default(),
                },
                ClaimOutcome::Mismatch { problem } => Decision::Mismatch {
                    claim: stamp(problem.claim.as_deref().unwrap_or_default())?,
                },
            })
        })
    }

    fn complete(
        &self,
        key: RecordKey,
        claim: Stamp,
        outcome: Outcome,
        store_as: Option<StoreAs>,
    ) -> BoxFuture<'_, Result<bool, ApiError>> {
        Box::pin(async move {
            let done = self
                .client
                .complete_as(
                    key.principal(),
                    key.key(),
                    &claim.to_string(),
                    crate::http::api::OutcomeInput::from_outcome(&outcome),
                    store_as,
                )
                .await
                .map_err(client_problem)?;
            Ok(done.terminal != "released")
        })
    }

    fn release(&self, key: RecordKey, claim: Stamp) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            self.client
                .release(key.principal(), key.key(), &claim.to_string())
                .await
                .map(drop)
                .map_err(client_problem)
        })
    }

    fn extend(
        &self,
        key: RecordKey,
        claim: Stamp,
        lease_ms: u64,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            self.client
                .extend(
                    key.principal(),
                    key.key(),
                    &claim.to_string(),
                    Duration::from_millis(lease_ms),
                )
                .await
                .map(drop)
                .map_err(client_problem)
        })
    }

    fn limits(&self, _namespace: &str) -> Option<NamespaceLimits> {
        Some(self.limits.clone())
    }
}
