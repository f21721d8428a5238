//! The region's local store: a linearizable key map over a crash-safe log.
//!
//! # Shape
//!
//! * An in-memory [index](index) with one compact entry per key, pointing at the key's newest
//!   [log](log) entry; older entries of the same key are reached through back-pointers, so a
//!   record is read back by following a short chain (and an image entry caps the chain).
//! * A segmented, CRC-framed [log](log) over a small [storage](storage) interface, with group
//!   commit: concurrent callers share one fdatasync.
//! * The [clock](crate::clock), whose reservation lives in the same log.
//!
//! # Durability contract (the sans-IO part)
//!
//! Every operation decides at once, under the key's index lock, and appends its log entry to an
//! in-memory buffer; it returns a [`Pending`] answer carrying the log position it depends on.
//! **An answer may be given to a caller only once that position is durable.** Use
//! [`Store::wait`] (blocking group commit: the first waiter flushes for everyone), or drive
//! [`Store::flush`] yourself and check [`Pending::is_durable`] (the daemon's writer task and
//! the simulator do this). Answers that only read (a replay, "in flight", a mismatch) also wait
//! for the entries they read, so no caller ever sees state a crash could take back.
//!
//! Per-origin sequence numbers are assigned in log order as entries are appended, and become
//! visible to replication ([`Store::log_from`]) only once durable. A crash loses only a suffix
//! of the log that was never acknowledged nor shipped, so the numbers that reappear after
//! recovery were never seen by anyone.
//!
//! # Concurrency
//!
//! One authority per key: a claim is decided and appended while holding the key's index entry
//! (a dashmap shard lock), so parallel identical requests get exactly one `Execute`. The entry
//! guard is never held across another map access or an `.await`.

pub mod decide;
pub mod entry;
pub mod error;
pub mod index;
pub mod log;
pub mod policy;
pub mod storage;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use dashmap::mapref::entry::Entry;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, ClockConfig, ClockError, Observed, RegionId, Stamp};
use crate::record::{
    AttemptToken, ClaimFacts, ClaimStatus, Delta, Fingerprint, Item, ItemContext, ItemId,
    KeyDigest, Outcome, Record, RecordKey, Resolution, Retirements, Terminal,
};
use decide::{Ask, Plan};
use entry::{LogEntry, Mutation};
pub use error::{StoreError, Unavailable};
use index::{IndexEntry, IndexMap};
use log::{AppendClass, Loc, Log, LogConfig, LogError, Lsn};
pub use policy::{Disposition, Keep, NamespaceConfig, NamespacePolicy, StatusRange};
use storage::Storage;

/// How many back-pointer hops a read may take before the store writes an image of the record.
const IMAGE_AFTER_HOPS: usize = 16;
/// Every this many sequence numbers per origin, the store remembers where in the log that
/// number lies, so replication reads start near their target.
const SEQ_CHECKPOINT_EVERY: u64 = 256;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This region's id.
    pub region: RegionId,
    /// Clock settings (max drift).
    pub clock: ClockConfig,
    /// Namespaces and their policies.
    pub namespaces: Vec<NamespaceConfig>,
    /// Log settings (segment size, reserve for a full disk).
    pub log: LogConfig,
    /// How long mutations stay servable to peers (independent of any TTL). Default 7 days.
    pub log_retention_ms: u64,
    /// Index shard count (power of two). Default 256.
    pub index_shards: usize,
}

impl StoreConfig {
    /// A config for `region` with one namespace per given name, all with default policy.
    pub fn new(region: RegionId, namespaces: &[&str]) -> Self {
        Self {
            region,
            clock: ClockConfig::default(),
            namespaces: namespaces
                .iter()
                .map(|n| NamespaceConfig::named(*n))
                .collect(),
            log: LogConfig::default(),
            log_retention_ms: 7 * 24 * 3600 * 1000,
            index_shards: index::SHARDS_DEFAULT,
        }
    }
}

/// A claim request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Namespace, principal and key.
    pub key: RecordKey,
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// The caller's attempt token (re-sent only when no answer came back).
    pub attempt: AttemptToken,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// You own the key now: run the operation, then complete, release or extend the claim.
    Execute {
        /// The claim you hold.
        claim: Stamp,
        /// When its lease ends (Unix ms) unless extended.
        lease_until_ms: u64,
        /// The claim whose lease ran out and which this one replaces, if any.
        took_over: Option<Stamp>,
        /// True when this is the claim you already held (you re-sent its attempt token).
        resumed: bool,
        /// When the key expires (Unix ms).
        expires_at_ms: u64,
    },
    /// Already done: the stored outcome.
    Replay {
        /// The winning claim.
        claim: Stamp,
        /// Its outcome.
        outcome: Outcome,
        /// True when the outcome was stored as indeterminate.
        indeterminate: bool,
        /// When the key expires (Unix ms).
        expires_at_ms: u64,
    },
    /// Someone is running it; retry later.
    InFlight {
        /// The claim in flight.
        claim: Stamp,
        /// The region running it.
        region: RegionId,
        /// When its lease ends (Unix ms).
        lease_expires_at_ms: u64,
    },
    /// Same key, different request.
    Mismatch {
        /// The claim holding the key.
        claim: Stamp,
    },
    /// The store cannot answer safely now.
    Unavailable {
        /// Why.
        reason: Unavailable,
        /// Suggested wait before retrying, ms.
        retry_after_ms: u64,
    },
}

impl Decision {
    fn unavailable(reason: Unavailable) -> Self {
        Decision::Unavailable {
            reason,
            retry_after_ms: reason.retry_after_ms(),
        }
    }
}

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// How the outcome was kept (by status, under the namespace's policy).
    pub terminal: ClaimStatus,
    /// True when the claim no longer wins its generation (it was taken over, or an earlier
    /// claim arrived): the execution will be flagged for compensation.
    pub superseded: bool,
}

/// What merging a peer's mutation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// False when the mutation was already here (same origin and sequence number).
    pub new: bool,
    /// Whether the key's record changed.
    pub changed: bool,
    /// Whether one of its stamps was too far ahead to move our clock (alarm).
    pub drift_rejected: bool,
}

/// An answer that may be given out only once the log is durable up to [`Pending::lsn`].
#[must_use = "an answer may be given out only once durable: pass it to Store::wait"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<T> {
    lsn: Lsn,
    value: T,
}

impl<T> Pending<T> {
    /// The log position the answer depends on.
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Whether the answer may be given out now.
    pub fn is_durable<S: Storage>(&self, store: &Store<S>) -> bool {
        store.log.durable_lsn() >= self.lsn
    }

    /// The answer, without checking durability. Only for callers that checked
    /// [`Pending::is_durable`] themselves.
    pub fn into_value_unchecked(self) -> T {
        self.value
    }

    /// A look at the answer before it is durable (for logging; never to answer a caller).
    pub fn peek(&self) -> &T {
        &self.value
    }
}

/// A key's record with what is derived from it, for reads and reports.
#[derive(Debug, Clone)]
pub struct KeyView {
    /// The key.
    pub key: RecordKey,
    /// Its record.
    pub record: Record,
    /// Its compensation items.
    pub items: Vec<Item>,
}

/// A chunk of a key-ordered snapshot stream.
#[derive(Debug, Clone)]
pub struct SnapshotChunk {
    /// Keys and records, in digest order.
    pub records: Vec<(KeyDigest, RecordKey, Record)>,
    /// Where to resume (`None`: the stream is complete).
    pub next: Option<KeyDigest>,
}

/// Counters, for metrics and benches.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Claims answered Execute (new claims, takeovers and resumes).
    pub executes: AtomicU64,
    /// Takeovers of claims whose lease ran out.
    pub takeovers: AtomicU64,
    /// Replays.
    pub replays: AtomicU64,
    /// In-flight answers.
    pub in_flight: AtomicU64,
    /// Mismatches.
    pub mismatches: AtomicU64,
    /// Unavailable answers.
    pub unavailable: AtomicU64,
    /// Peer stamps too far ahead to move the clock.
    pub drift_rejected: AtomicU64,
    /// Image entries written to cap back-pointer chains.
    pub images: AtomicU64,
}

/// Per-origin received sequence numbers: the contiguous mark and what lies above it.
#[derive(Debug, Clone, Default)]
struct SeqSet {
    mark: u64,
    above: BTreeSet<u64>,
}

impl SeqSet {
    fn contains(&self, seq: u64) -> bool {
        seq <= self.mark || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        if seq <= self.mark {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.mark + 1)) {
            self.mark += 1;
        }
    }
}

#[derive(Debug, Default)]
struct Replication {
    /// origin → bucket (seq / SEQ_CHECKPOINT_EVERY) → (smallest log position of any of its
    /// numbers, newest time one was written, Unix ms). Remote numbers may arrive out of order,
    /// hence the smallest position per bucket.
    buckets: BTreeMap<RegionId, BTreeMap<u64, (Loc, u64)>>,
    received: BTreeMap<RegionId, SeqSet>,
}

impl Replication {
    fn checkpoint(&mut self, origin: RegionId, seq: u64, loc: Loc, ms: u64) {
        let b = self
            .buckets
            .entry(origin)
            .or_default()
            .entry(seq / SEQ_CHECKPOINT_EVERY)
            .or_insert((loc, ms));
        b.0 = b.0.min(loc);
        b.1 = b.1.max(ms);
    }
}

/// The region's local store. See the module docs for the durability contract.
pub struct Store<S: Storage> {
    region: RegionId,
    namespaces: BTreeMap<String, NamespacePolicy>,
    log_retention_ms: u64,
    clock: Clock,
    log: Log<S>,
    index: IndexMap,
    /// Next local sequence number; held while a local entry is encoded and appended, so
    /// numbers follow log order.
    next_seq: Mutex<u64>,
    replication: Mutex<Replication>,
    retired: Retirements,
    fenced: AtomicBool,
    stats: StoreStats,
}

impl<S: Storage> std::fmt::Debug for Store<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("region", &self.region)
            .field("keys", &self.index.len())
            .field("durable_lsn", &self.log.durable_lsn())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere never leaves these small maps half-updated; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Storage> Store<S> {
    /// Opens the store on `storage`: recovers the log, rebuilds the index, the sequence
    /// numbers, the replication marks and the clock's high-water mark, then makes a first clock
    /// reservation durable (unless the wall clock is still behind the recovered one).
    pub fn open(storage: S, config: StoreConfig, now_ms: u64) -> Result<Self, StoreError> {
        let mut namespaces = BTreeMap::new();
        for ns in &config.namespaces {
            let p = NamespacePolicy::new(ns.clone())?;
            if namespaces.insert(p.name().to_owned(), p).is_some() {
                return Err(StoreError::Config(format!(
                    "namespace {:?} configured twice",
                    ns.name
                )));
            }
        }
        let log = Log::open(storage, config.log.clone())?;
        let index = index::new_index(config.index_shards);
        let mut next_seq = 1u64;
        let mut reservation: Option<u64> = None;
        let mut max_hlc = 0u64;
        let mut repl = Replication::default();
        let region = config.region;
        log.replay(|loc, payload| -> Result<(), StoreError> {
            let entry = entry::decode(payload).map_err(|e| {
                StoreError::Corrupt(format!(
                    "segment {} offset {}: {e}",
                    loc.segment, loc.offset
                ))
            })?;
            match entry {
                LogEntry::Mutation {
                    mutation,
                    expires_at_ms,
                    ..
                } => {
                    max_hlc = max_hlc.max(mutation.delta.stamp().hlc);
                    if mutation.origin == region {
                        next_seq = next_seq.max(mutation.seq + 1);
                    } else {
                        repl.received
                            .entry(mutation.origin)
                            .or_default()
                            .insert(mutation.seq);
                    }
                    repl.checkpoint(
                        mutation.origin,
                        mutation.seq,
                        loc,
                        mutation.delta.stamp().physical_ms(),
                    );
                    index.insert(
                        mutation.key.digest(),
                        IndexEntry {
                            loc,
                            lsn: 0,
                            expires_at_ms,
                            hot: None,
                        },
                    );
                }
                LogEntry::Image {
                    key, expires_at_ms, ..
                } => {
                    index.insert(
                        key.digest(),
                        IndexEntry {
                            loc,
                            lsn: 0,
                            expires_at_ms,
                            hot: None,
                        },
                    );
                }
                LogEntry::Reserve { until_ms } => {
                    reservation = Some(reservation.unwrap_or(0).max(until_ms));
                }
                LogEntry::Marks { .. } => {}
            }
            Ok(())
        })?;
        let clock = Clock::new(region, config.clock, reservation, max_hlc);
        let store = Self {
            region,
            namespaces,
            log_retention_ms: config.log_retention_ms,
            clock,
            log,
            index,
            next_seq: Mutex::new(next_seq),
            replication: Mutex::new(repl),
            retired: Retirements::none(),
            fenced: AtomicBool::new(false),
            stats: StoreStats::default(),
        };
        if now_ms > store.clock.restart_fence_ms() {
            store.settle_clock(now_ms)?;
            store.log.flush()?;
        }
        Ok(store)
    }

    /// This region's id.
    pub fn region(&self) -> RegionId {
        self.region
    }

    /// The clock (for stamps of heartbeats and for metrics).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Counters.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The log (for its counters and for drivers that flush it themselves).
    pub fn log(&self) -> &Log<S> {
        &self.log
    }

    /// Number of keys in the index.
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// A namespace's policy.
    pub fn namespace(&self, name: &str) -> Option<&NamespacePolicy> {
        self.namespaces.get(name)
    }

    /// Fences or unfences the region. A fenced region grants no new claims and no takeovers
    /// (`Unavailable`); completions, releases, replays and reads go on.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::Release);
    }

    /// Whether the region is fenced.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Writes everything appended so far and syncs it (group commit). Returns the durable lsn.
    pub fn flush(&self) -> Result<Lsn, StoreError> {
        let lsn = self.log.flush().map_err(|e| self.log_error(e))?;
        Ok(lsn)
    }

    /// Blocks until `pending` is durable (sharing syncs with concurrent callers), then returns
    /// the answer.
    pub fn wait<T>(&self, pending: Pending<T>) -> Result<T, StoreError> {
        if self.log.durable_lsn() < pending.lsn {
            self.log
                .wait_durable(pending.lsn)
                .map_err(|e| self.log_error(e))?;
        }
        Ok(pending.value)
    }

    fn log_error(&self, e: LogError) -> StoreError {
        if self.log.is_poisoned() {
            StoreError::Unavailable(Unavailable::LogFailed)
        } else {
            StoreError::from(e)
        }
    }

    fn policy(&self, key: &RecordKey) -> Result<&NamespacePolicy, StoreError> {
        let p = self
            .namespaces
            .get(&key.namespace)
            .ok_or_else(|| StoreError::UnknownNamespace(key.namespace.clone()))?;
        let max = p.config().key_len_max;
        if key.key.is_empty() || key.key.len() > max {
            return Err(StoreError::BadKeyLength {
                len: key.key.len(),
                max,
            });
        }
        let max = p.config().principal_len_max;
        if key.principal.len() > max {
            return Err(StoreError::PrincipalTooLong {
                len: key.principal.len(),
                max,
            });
        }
        Ok(p)
    }

    /// Appends the clock's next reservation when it is due. The reservation entry precedes, in
    /// the log, every entry carrying a stamp above the previous reservation (see the clock's
    /// module docs for why that suffices).
    fn settle_clock(&self, now_ms: u64) -> Result<(), StoreError> {
        if let Some(until) = self.clock.reservation_due(now_ms) {
            let appended = entry::encode(&LogEntry::Reserve { until_ms: until })
                .map_err(|e| StoreError::Corrupt(e.to_string()))
                .and_then(|bytes| {
                    self.log
                        .append(&bytes, AppendClass::Reserved)
                        .map_err(|e| self.log_error(e))
                });
            match appended {
                Ok(_) => self.clock.reservation_logged(until),
                Err(e) => {
                    self.clock.reservation_abandoned(until);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn unavailable<T>(&self, reason: Unavailable) -> Result<Pending<Decision>, T> {
        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
        Ok(Pending {
            lsn: 0,
            value: Decision::unavailable(reason),
        })
    }

    /// Reads a key's record back from the log, following back-pointers from `loc`.
    /// Returns the record and the number of entries read.
    fn load(&self, mut loc: Loc, key: &RecordKey) -> Result<(Record, usize), StoreError> {
        let mut record = Record::new();
        let mut hops = 0usize;
        loop {
            hops += 1;
            let bytes = self.log.read(loc).map_err(|e| self.log_error(e))?;
            let entry = entry::decode(&bytes).map_err(|e| {
                StoreError::Corrupt(format!(
                    "segment {} offset {}: {e}",
                    loc.segment, loc.offset
                ))
            })?;
            match entry {
                LogEntry::Mutation { mutation, prev, .. } => {
                    if mutation.key != *key {
                        return Err(StoreError::Corrupt(format!(
                            "entry at {loc:?} belongs to another key (digest collision or damage)"
                        )));
                    }
                    record.apply(&mutation.delta)?;
                    match prev {
                        Some(p) => loc = p,
                        None => return Ok((record, hops)),
                    }
                }
                LogEntry::Image {
                    key: k, record: r, ..
                } => {
                    if k != *key {
                        return Err(StoreError::Corrupt(format!(
                            "image at {loc:?} belongs to another key"
                        )));
                    }
                    record.merge(&r);
                    return Ok((record, hops));
                }
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "back-pointer to a non-record entry at {loc:?}: {other:?}"
                    )))
                }
            }
        }
    }

    /// The record of an index entry: the cached one, or read back from the log. A long chain
    /// is capped by appending an image (which the caller's next entry points back to).
    fn take_record(&self, e: &mut IndexEntry, key: &RecordKey) -> Result<Record, StoreError> {
        if let Some(r) = e.hot.take() {
            return Ok(*r);
        }
        let (record, hops) = self.load(e.loc, key)?;
        if hops > IMAGE_AFTER_HOPS {
            let bytes = entry::encode(&LogEntry::Image {
                key: key.clone(),
                record: record.clone(),
                expires_at_ms: e.expires_at_ms,
            })
            .map_err(|err| StoreError::Corrupt(err.to_string()))?;
            if let Ok((lsn, loc)) = self.log.append(&bytes, AppendClass::Normal) {
                e.loc = loc;
                e.lsn = e.lsn.max(lsn);
                self.stats.images.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(record)
    }

    fn newest_expiry(&self, record: &Record) -> u64 {
        record
            .generations(&self.retired)
            .last()
            .map(|g| g.expires_at_ms)
            .unwrap_or(0)
    }

    /// Appends a local mutation: numbers it, applies it to `record`, encodes and appends it.
    /// On error nothing was appended and `record` may hold the delta: the caller drops it.
    fn append_local(
        &self,
        key: &RecordKey,
        prev: Option<Loc>,
        record: &mut Record,
        class: AppendClass,
        now_ms: u64,
        make: impl FnOnce(u64) -> Delta,
    ) -> Result<(Lsn, Loc), StoreError> {
        let mut next = lock(&self.next_seq);
        let seq = *next;
        let delta = make(seq);
        record.apply(&delta)?;
        let entry = LogEntry::Mutation {
            mutation: Mutation {
                origin: self.region,
                seq,
                key: key.clone(),
                delta,
            },
            prev,
            expires_at_ms: self.newest_expiry(record),
        };
        let bytes = entry::encode(&entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (lsn, loc) = self
            .log
            .append(&bytes, class)
            .map_err(|e| self.log_error(e))?;
        *next = seq + 1;
        drop(next);
        lock(&self.replication).checkpoint(self.region, seq, loc, now_ms);
        Ok((lsn, loc))
    }

    /// Claims a key. See [`Decision`] for the answers; the answer may be given out once
    /// durable (see [`Store::wait`]).
    pub fn claim(&self, now_ms: u64, req: &ClaimRequest) -> Result<Pending<Decision>, StoreError> {
        let policy = self.policy(&req.key)?;
        if self.log.is_poisoned() {
            return self.unavailable(Unavailable::LogFailed);
        }
        if let Err(e) = self.settle_clock(now_ms) {
            return match e {
                StoreError::Unavailable(u) => self.unavailable(u),
                other => Err(other),
            };
        }
        let digest = req.key.digest();
        match self.index.entry(digest) {
            Entry::Vacant(v) => {
                let mut record = Record::new();
                let decision = match self.grant(now_ms, req, policy, &mut record, None, None)? {
                    Ok(x) => x,
                    Err(u) => return self.unavailable(u),
                };
                let (lsn, loc, value) = decision;
                v.insert(IndexEntry {
                    loc,
                    lsn,
                    expires_at_ms: self.newest_expiry(&record),
                    hot: Some(Box::new(record)),
                });
                Ok(Pending { lsn, value })
            }
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                let mut record = self.take_record(e, &req.key)?;
                let result = self.claim_existing(now_ms, req, policy, e, &mut record);
                if result.is_ok() {
                    e.expires_at_ms = self.newest_expiry(&record);
                    e.hot = hot(record);
                }
                result
            }
        }
    }

    fn claim_existing(
        &self,
        now_ms: u64,
        req: &ClaimRequest,
        policy: &NamespacePolicy,
        e: &mut IndexEntry,
        record: &mut Record,
    ) -> Result<Pending<Decision>, StoreError> {
        let planned = decide::plan(
            record,
            &Ask {
                region: self.region,
                fingerprint: &req.fingerprint,
                attempt: req.attempt,
                now_ms,
                max_drift_ms: self.clock.config().max_drift_ms,
                retired: &self.retired,
            },
        );
        if let Some(stale) = planned.release_stale {
            let (lsn, loc) = self.append_local(
                &req.key,
                Some(e.loc),
                record,
                AppendClass::Reserved,
                now_ms,
                |_| Delta::Finish {
                    stamp: stale,
                    terminal: Terminal::Released,
                },
            )?;
            e.loc = loc;
            e.lsn = lsn;
        }
        let expires_at_ms = self.newest_expiry(record);
        let value = match planned.plan {
            Plan::New {
                takes_over,
                generation_expires_at_ms,
            } => match self.grant(
                now_ms,
                req,
                policy,
                record,
                Some(e.loc),
                takes_over.map(|t| (t, generation_expires_at_ms)),
            )? {
                Ok((lsn, loc, decision)) => {
                    e.loc = loc;
                    e.lsn = lsn;
                    decision
                }
                Err(u) => return self.unavailable(u),
            },
            Plan::Resume(claim) => {
                let lease_until_ms = now_ms + policy.lease_ms();
                let (lsn, loc) = self.append_local(
                    &req.key,
                    Some(e.loc),
                    record,
                    AppendClass::Reserved,
                    now_ms,
                    |_| Delta::Extend {
                        stamp: claim,
                        lease_until_ms,
                    },
                )?;
                e.loc = loc;
                e.lsn = lsn;
                self.stats.executes.fetch_add(1, Ordering::Relaxed);
                let c = record.claim(&claim);
                Decision::Execute {
                    claim,
                    lease_until_ms: c.map(|c| c.lease_until_ms).unwrap_or(lease_until_ms),
                    took_over: c.and_then(|c| c.facts.as_ref()).and_then(|f| f.takes_over),
                    resumed: true,
                    expires_at_ms,
                }
            }
            Plan::Replay(claim) => {
                self.stats.replays.fetch_add(1, Ordering::Relaxed);
                let terminal = record.claim(&claim).and_then(|c| c.terminal.as_ref());
                match terminal {
                    Some(t @ (Terminal::Completed(o) | Terminal::Indeterminate(o))) => {
                        Decision::Replay {
                            claim,
                            outcome: o.clone(),
                            indeterminate: matches!(t, Terminal::Indeterminate(_)),
                            expires_at_ms,
                        }
                    }
                    _ => return Err(StoreError::Corrupt("replay of an unfinished claim".into())),
                }
            }
            Plan::InFlight(claim) => {
                self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                Decision::InFlight {
                    claim,
                    region: claim.region,
                    lease_expires_at_ms: record.claim(&claim).map_or(0, |c| c.lease_until_ms),
                }
            }
            Plan::Mismatch(claim) => {
                self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                Decision::Mismatch { claim }
            }
        };
        Ok(Pending { lsn: e.lsn, value })
    }

    /// Grants a new claim: fence check, stamp, append. `Ok(Err(_))` is an Unavailable answer.
    #[allow(clippy::type_complexity)]
    fn grant(
        &self,
        now_ms: u64,
        req: &ClaimRequest,
        policy: &NamespacePolicy,
        record: &mut Record,
        prev: Option<Loc>,
        takeover: Option<(Stamp, Option<u64>)>,
    ) -> Result<Result<(Lsn, Loc, Decision), Unavailable>, StoreError> {
        if self.is_fenced() {
            return Ok(Err(Unavailable::Fenced));
        }
        let stamp = match self.clock.stamp(now_ms) {
            Ok(s) => s,
            Err(ClockError::RestartFence { .. }) => return Ok(Err(Unavailable::RestartFence)),
            Err(ClockError::ReservationPending { .. }) => {
                return Ok(Err(Unavailable::ClockReservation))
            }
            Err(ClockError::Exhausted(_)) => return Ok(Err(Unavailable::ClockExhausted)),
        };
        // A takeover is in force only within its victim's generation: if the new stamp lies
        // past that generation's expiry, it simply opens the next generation.
        let takes_over = takeover.and_then(|(victim, expiry)| {
            expiry
                .is_none_or(|x| stamp.physical_ms() < x)
                .then_some(victim)
        });
        let lease_ms = policy.lease_ms();
        let before = record.clone();
        let appended =
            self.append_local(&req.key, prev, record, AppendClass::Normal, now_ms, |seq| {
                Delta::Claim {
                    stamp,
                    facts: ClaimFacts {
                        fingerprint: req.fingerprint,
                        attempt: req.attempt,
                        ttl_ms: policy.ttl_ms(),
                        lease_ms,
                        origin_seq: seq,
                        takes_over,
                    },
                }
            });
        let (lsn, loc) = match appended {
            Ok(x) => x,
            Err(StoreError::Unavailable(u)) => {
                *record = before;
                return Ok(Err(u));
            }
            Err(e) => {
                *record = before;
                return Err(e);
            }
        };
        self.stats.executes.fetch_add(1, Ordering::Relaxed);
        if takes_over.is_some() {
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok((
            lsn,
            loc,
            Decision::Execute {
                claim: stamp,
                lease_until_ms: stamp.physical_ms() + lease_ms,
                took_over: takes_over,
                resumed: false,
                expires_at_ms: self.newest_expiry(record),
            },
        )))
    }

    /// Runs `f` on the record of an existing key under its index lock, then caches or drops the
    /// record depending on whether a claim is still in flight.
    fn with_key<T>(
        &self,
        key: &RecordKey,
        f: impl FnOnce(&mut IndexEntry, &mut Record) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let digest = key.digest();
        let Some(mut e) = self.index.get_mut(&digest) else {
            return Err(StoreError::UnknownKey);
        };
        let mut record = self.take_record(&mut e, key)?;
        let before = record.clone();
        let result = f(&mut e, &mut record);
        let record = if result.is_ok() { record } else { before };
        e.expires_at_ms = self.newest_expiry(&record);
        e.hot = hot(record);
        result
    }

    fn own_claim<'r>(
        &self,
        record: &'r Record,
        claim: Stamp,
    ) -> Result<&'r crate::record::ClaimState, StoreError> {
        let c = record
            .claim(&claim)
            .filter(|c| c.facts.is_some())
            .ok_or(StoreError::UnknownClaim(claim))?;
        if claim.region != self.region {
            return Err(StoreError::NotOwner {
                claim,
                owner: claim.region,
            });
        }
        Ok(c)
    }

    /// Finishes a claim with its outcome. The namespace's policy decides by status whether the
    /// outcome is stored, stored as indeterminate, or not stored (the claim is released so a
    /// corrected retry runs); headers are allow-listed and the body kept as the policy says.
    ///
    /// A claim that was taken over may still complete (a late completion): the execution is
    /// recorded and flagged, never lost. Completing twice with the same outcome is idempotent.
    pub fn complete(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        outcome: Outcome,
    ) -> Result<Pending<Completion>, StoreError> {
        let policy = self.policy(key)?;
        let max = policy.config().outcome_bytes_max;
        if outcome.size_bytes() > max {
            return Err(StoreError::OutcomeTooLarge {
                len: outcome.size_bytes(),
                max,
            });
        }
        let terminal = match policy.disposition(outcome.status) {
            Disposition::Store => Terminal::Completed(policy.shape_outcome(outcome)),
            Disposition::Indeterminate => Terminal::Indeterminate(policy.shape_outcome(outcome)),
            Disposition::Release => Terminal::Released,
        };
        self.finish(now_ms, key, claim, terminal)
    }

    /// Releases a claim without executing: the key is free again within its generation.
    pub fn release(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
    ) -> Result<Pending<Completion>, StoreError> {
        self.policy(key)?;
        self.finish(now_ms, key, claim, Terminal::Released)
    }

    fn finish(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        terminal: Terminal,
    ) -> Result<Pending<Completion>, StoreError> {
        let region = self.region;
        self.with_key(key, |e, record| {
            let c = self.own_claim(record, claim)?;
            match &c.terminal {
                Some(t) if *t == terminal => {}
                Some(_) => return Err(StoreError::AlreadyFinished(claim)),
                None => {
                    let (lsn, loc) = self.append_local(
                        key,
                        Some(e.loc),
                        record,
                        AppendClass::Reserved,
                        now_ms,
                        |_| Delta::Finish {
                            stamp: claim,
                            terminal: terminal.clone(),
                        },
                    )?;
                    e.loc = loc;
                    e.lsn = lsn;
                }
            }
            debug_assert_eq!(claim.region, region);
            let superseded = record
                .generation_of(&self.retired, &claim)
                .is_none_or(|g| g.winner != Some(claim));
            let status = record
                .claim(&claim)
                .map_or(ClaimStatus::InFlight, |c| c.status());
            Ok(Pending {
                lsn: e.lsn,
                value: Completion {
                    terminal: status,
                    superseded: superseded && status != ClaimStatus::Released,
                },
            })
        })
    }

    /// Extends a claim's lease to `now + lease_ms` (never shortens it). Refused once the claim
    /// was taken over or finished.
    pub fn extend(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        lease_ms: u64,
    ) -> Result<Pending<u64>, StoreError> {
        let policy = self.policy(key)?;
        let max_ms = policy.config().lease_max_ms;
        if lease_ms > max_ms {
            return Err(StoreError::LeaseTooLong {
                asked_ms: lease_ms,
                max_ms,
            });
        }
        self.with_key(key, |e, record| {
            let c = self.own_claim(record, claim)?;
            if c.terminal.is_some() {
                return Err(StoreError::AlreadyFinished(claim));
            }
            if let Some(g) = record.generation_of(&self.retired, &claim) {
                if let Some(by) = g.taken_over.get(&claim) {
                    return Err(StoreError::TakenOver { claim, by: *by });
                }
            }
            let until = now_ms.saturating_add(lease_ms);
            if until > c.lease_until_ms {
                let (lsn, loc) = self.append_local(
                    key,
                    Some(e.loc),
                    record,
                    AppendClass::Reserved,
                    now_ms,
                    |_| Delta::Extend {
                        stamp: claim,
                        lease_until_ms: until,
                    },
                )?;
                e.loc = loc;
                e.lsn = lsn;
            }
            let lease = record.claim(&claim).map_or(until, |c| c.lease_until_ms);
            Ok(Pending {
                lsn: e.lsn,
                value: lease,
            })
        })
    }

    /// Records that a compensation item was handled.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &self,
        now_ms: u64,
        key: &RecordKey,
        item: ItemId,
        by: &str,
        note: &str,
        hook_result: Option<String>,
        provider_ref: Option<String>,
    ) -> Result<Pending<Resolution>, StoreError> {
        self.policy(key)?;
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        self.settle_clock(now_ms)?;
        self.with_key(key, |e, record| {
            let ctx = ItemContext {
                retired: &self.retired,
                stable: false,
            };
            if !record.items(key, ctx).iter().any(|i| i.id == item) {
                return Err(StoreError::UnknownItem);
            }
            let at = self.clock.stamp(now_ms).map_err(|err| {
                StoreError::Unavailable(match err {
                    ClockError::RestartFence { .. } => Unavailable::RestartFence,
                    ClockError::ReservationPending { .. } => Unavailable::ClockReservation,
                    ClockError::Exhausted(_) => Unavailable::ClockExhausted,
                })
            })?;
            let resolution = Resolution {
                item,
                at,
                by: by.to_owned(),
                note: note.to_owned(),
                hook_result,
                provider_ref,
            };
            let (lsn, loc) = self.append_local(
                key,
                Some(e.loc),
                record,
                AppendClass::Reserved,
                now_ms,
                |_| Delta::Resolve(resolution.clone()),
            )?;
            e.loc = loc;
            e.lsn = lsn;
            Ok(Pending {
                lsn,
                value: resolution,
            })
        })
    }

    /// Reads a key: its record and items (nothing is actionable until replication tracks
    /// stability). Returns `None` for a key never seen. Wait on the answer like any other.
    pub fn read(&self, key: &RecordKey) -> Result<Pending<Option<KeyView>>, StoreError> {
        self.policy(key)?;
        let digest = key.digest();
        let Some(mut e) = self.index.get_mut(&digest) else {
            return Ok(Pending {
                lsn: 0,
                value: None,
            });
        };
        let record = match &e.hot {
            Some(r) => (**r).clone(),
            None => self.take_record(&mut e, key)?,
        };
        let items = record.items(
            key,
            ItemContext {
                retired: &self.retired,
                stable: false,
            },
        );
        Ok(Pending {
            lsn: e.lsn,
            value: Some(KeyView {
                key: key.clone(),
                record,
                items,
            }),
        })
    }

    /// Merges a peer's mutation (applied on receipt: merges commute). The mutation is stored
    /// under its (origin, seq) so this region can serve it to others; a mutation already here
    /// is skipped. Peers are untrusted: the mutation is validated before anything is written.
    pub fn merge_remote(
        &self,
        now_ms: u64,
        mutation: Mutation,
    ) -> Result<Pending<Merged>, StoreError> {
        let invalid = |reason: String| StoreError::InvalidMutation {
            origin: mutation.origin,
            seq: mutation.seq,
            reason,
        };
        if mutation.origin == self.region {
            return Err(invalid("a peer sent this region's own mutation".into()));
        }
        if mutation.seq == 0 {
            return Err(invalid("sequence numbers start at 1".into()));
        }
        mutation
            .delta
            .validate()
            .map_err(|e| invalid(e.to_string()))?;
        let k = &mutation.key;
        if k.namespace.is_empty()
            || k.namespace.len() > policy::NAMESPACE_LEN_MAX
            || k.key.is_empty()
            || k.key.len() > policy::KEY_LEN_ABSOLUTE_MAX
            || k.principal.len() > policy::KEY_LEN_ABSOLUTE_MAX
        {
            return Err(invalid("key outside the absolute limits".into()));
        }
        if let Delta::Finish { terminal, .. } = &mutation.delta {
            if terminal
                .outcome()
                .is_some_and(|o| o.size_bytes() > policy::OUTCOME_BYTES_ABSOLUTE_MAX)
            {
                return Err(invalid("outcome over the absolute limit".into()));
            }
        }
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        if lock(&self.replication)
            .received
            .get(&mutation.origin)
            .is_some_and(|s| s.contains(mutation.seq))
        {
            return Ok(Pending {
                lsn: 0,
                value: Merged {
                    new: false,
                    changed: false,
                    drift_rejected: false,
                },
            });
        }
        let drift_rejected = matches!(
            self.clock.observe(now_ms, mutation.delta.stamp()),
            Observed::TooFarAhead { .. }
        );
        if drift_rejected {
            self.stats.drift_rejected.fetch_add(1, Ordering::Relaxed);
        }
        let digest = mutation.key.digest();
        let mut slot = match self.index.entry(digest) {
            Entry::Occupied(o) => o.into_ref(),
            Entry::Vacant(v) => {
                // A key never seen here: build its record from this one delta and insert the
                // entry only once the append succeeded.
                let mut record = Record::new();
                let changed = record.apply(&mutation.delta)?;
                let expires_at_ms = self.newest_expiry(&record);
                let (lsn, loc) = self.append_remote(mutation, None, expires_at_ms, now_ms)?;
                v.insert(IndexEntry {
                    loc,
                    lsn,
                    expires_at_ms,
                    hot: hot(record),
                });
                return Ok(Pending {
                    lsn,
                    value: Merged {
                        new: true,
                        changed,
                        drift_rejected,
                    },
                });
            }
        };
        let e = slot.value_mut();
        let mut record = self.take_record(e, &mutation.key)?;
        let before = record.clone();
        let changed = record.apply(&mutation.delta)?;
        let expires_at_ms = self.newest_expiry(&record);
        match self.append_remote(mutation, Some(e.loc), expires_at_ms, now_ms) {
            Ok((lsn, loc)) => {
                e.loc = loc;
                e.lsn = lsn;
                e.expires_at_ms = expires_at_ms;
                e.hot = hot(record);
                Ok(Pending {
                    lsn,
                    value: Merged {
                        new: true,
                        changed,
                        drift_rejected,
                    },
                })
            }
            Err(err) => {
                e.hot = hot(before);
                Err(err)
            }
        }
    }

    fn append_remote(
        &self,
        mutation: Mutation,
        prev: Option<Loc>,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(Lsn, Loc), StoreError> {
        let (origin, seq) = (mutation.origin, mutation.seq);
        let entry = LogEntry::Mutation {
            mutation,
            prev,
            expires_at_ms,
        };
        let bytes = entry::encode(&entry).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let (lsn, loc) = self
            .log
            .append(&bytes, AppendClass::Normal)
            .map_err(|err| self.log_error(err))?;
        let mut repl = lock(&self.replication);
        repl.received.entry(origin).or_default().insert(seq);
        repl.checkpoint(origin, seq, loc, now_ms);
        Ok((lsn, loc))
    }

    /// Per origin, the contiguous prefix of its log held here (this region's own: the last
    /// sequence number appended).
    pub fn marks(&self) -> BTreeMap<RegionId, u64> {
        let mut out: BTreeMap<RegionId, u64> = lock(&self.replication)
            .received
            .iter()
            .map(|(r, s)| (*r, s.mark))
            .collect();
        out.insert(self.region, lock(&self.next_seq).saturating_sub(1));
        out
    }

    /// Durable mutations of `origin` from sequence number `from_seq` on, at most `max` of them,
    /// in sequence order. Numbers a peer delivered out of order may leave gaps in the answer:
    /// ask again from the first gap. Any region serves any origin's log, so partial partitions heal.
    /// Mutations older than the log retention are not served ([`StoreError::LogTruncated`]).
    pub fn log_from(
        &self,
        now_ms: u64,
        origin: RegionId,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<Mutation>, StoreError> {
        let from_seq = from_seq.max(1);
        let start = {
            let repl = lock(&self.replication);
            let Some(buckets) = repl.buckets.get(&origin) else {
                return Ok(Vec::new());
            };
            let horizon = now_ms.saturating_sub(self.log_retention_ms);
            if let Some((b, _)) = buckets.iter().find(|(_, (_, ms))| *ms >= horizon) {
                let first_retained = (b * SEQ_CHECKPOINT_EVERY).max(1);
                if from_seq < first_retained {
                    return Err(StoreError::LogTruncated {
                        origin,
                        first_retained,
                    });
                }
            }
            buckets
                .range(from_seq / SEQ_CHECKPOINT_EVERY..)
                .map(|(_, (loc, _))| *loc)
                .min()
        };
        let Some(start) = start else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        self.log
            .scan_from(start, |loc, payload| -> Result<_, StoreError> {
                let entry = entry::decode(payload).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "segment {} offset {}: {e}",
                        loc.segment, loc.offset
                    ))
                })?;
                if let LogEntry::Mutation { mutation, .. } = entry {
                    if mutation.origin == origin && mutation.seq >= from_seq {
                        out.push(mutation);
                        if out.len() >= max {
                            return Ok(std::ops::ControlFlow::Break(()));
                        }
                    }
                }
                Ok(std::ops::ControlFlow::Continue(()))
            })?;
        out.sort_by_key(|m| m.seq);
        out.dedup_by_key(|m| m.seq);
        Ok(out)
    }

    /// One chunk of a key-ordered snapshot stream: up to `max_keys` records with digests after
    /// `after`, in digest order. Resumable: pass the returned `next` back in.
    pub fn snapshot_chunk(
        &self,
        after: Option<KeyDigest>,
        max_keys: usize,
    ) -> Result<SnapshotChunk, StoreError> {
        let max_keys = max_keys.max(1);
        let shards = self.index.shards().len();
        let mut shard = after.map_or(0, |d| index::shard_of(&self.index, &d));
        let mut records = Vec::new();
        let mut cursor = after;
        while shard < shards && records.len() < max_keys {
            for digest in index::shard_keys_after(&self.index, shard, cursor.as_ref()) {
                if records.len() >= max_keys {
                    break;
                }
                let Some(e) = self.index.get(&digest) else {
                    continue;
                };
                let (loc, hot_record) = (e.loc, e.hot.as_deref().cloned());
                drop(e);
                let (key, record) = match hot_record {
                    Some(r) if !r.is_empty() => (self.key_at(loc)?, r),
                    _ => {
                        let key = self.key_at(loc)?;
                        let (r, _) = self.load(loc, &key)?;
                        (key, r)
                    }
                };
                cursor = Some(digest);
                records.push((digest, key, record));
            }
            if records.len() < max_keys {
                shard += 1;
                cursor = None;
            }
        }
        let next = if shard >= shards {
            None
        } else {
            records.last().map(|(d, _, _)| *d)
        };
        Ok(SnapshotChunk { records, next })
    }

    fn key_at(&self, loc: Loc) -> Result<RecordKey, StoreError> {
        let bytes = self.log.read(loc).map_err(|e| self.log_error(e))?;
        match entry::decode(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))? {
            LogEntry::Mutation { mutation, .. } => Ok(mutation.key),
            LogEntry::Image { key, .. } => Ok(key),
            _ => Err(StoreError::Corrupt(format!("no record entry at {loc:?}"))),
        }
    }

    /// Every compensation item of every key (a full scan; for reports and tests).
    pub fn all_items(&self) -> Result<Vec<(RecordKey, Item)>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let chunk = self.snapshot_chunk(after, 1024)?;
            for (_, key, record) in &chunk.records {
                let ctx = ItemContext {
                    retired: &self.retired,
                    stable: false,
                };
                out.extend(record.items(key, ctx).into_iter().map(|i| (key.clone(), i)));
            }
            match chunk.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }
}

/// Keeps a record in the index only while its newest generation has a claim in flight.
fn hot(record: Record) -> Option<Box<Record>> {
    let newest_in_flight = record
        .claims()
        .rev()
        .take(8)
        .any(|(_, c)| c.status() == ClaimStatus::InFlight);
    newest_in_flight.then(|| Box::new(record))
}

#[cfg(test)]
mod tests;
