//! The region's local store: a linearizable key map over a crash-safe log.
//!
//! # Shape
//!
//! * An in-memory [index] with one compact entry per key, pointing at the key's newest
//!   [log] entry; older entries of the same key are reached through back-pointers, so a
//!   record is read back by following a short chain (and an image entry caps the chain).
//! * A segmented, CRC-framed [log] over a small [storage] interface, with group
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

mod claim;
mod crc;
pub mod decide;
mod encode;
pub mod entry;
pub mod error;
mod gc;
mod hint;
pub mod index;
mod lifecycle;
pub mod log;
pub mod policy;
mod record_pool;
mod recovery;
mod replication;
mod reserve;
mod retire;
mod stability;
pub mod storage;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, ClockConfig, RegionId, Stamp};
use crate::record::{
    AttemptToken, ClaimStatus, Delta, Fingerprint, Item, KeyDigest, Outcome, Record, RecordKey,
};
use entry::LogEntry;
pub use entry::Mutation;
pub use error::{StoreError, Unavailable};
pub use gc::{Collected, KeptBecause};
use index::{IndexEntry, IndexMap};
use log::{AppendClass, Loc, Log, LogConfig, LogError, Lsn, Space};
pub use policy::{
    Disposition, Keep, LookupUnanswered, NamespaceConfig, NamespacePolicy, StatusRange,
};
use replication::Replication;
pub use replication::{Holding, SEQ_MAX};
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
    /// Granularity of that retention, and of the map from sequence numbers to log positions:
    /// one checkpoint per origin every this many numbers. Default 256.
    pub log_bucket_seqs: u64,
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
            log_bucket_seqs: SEQ_CHECKPOINT_EVERY,
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
        /// Claims whose leases ran out and which this one replaces (usually none or one).
        took_over: Vec<Stamp>,
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

    /// The answer if it is durable now, else the pending answer back (for drivers that flush
    /// the log themselves).
    pub fn try_into_value<S: Storage>(self, store: &Store<S>) -> Result<T, Self> {
        if self.is_durable(store) {
            Ok(self.value)
        } else {
            Err(self)
        }
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

/// The region's local store. See the module docs for the durability contract.
pub struct Store<S: Storage> {
    region: RegionId,
    namespaces: BTreeMap<String, NamespacePolicy>,
    log_retention_ms: u64,
    bucket_seqs: u64,
    clock: Clock,
    log: Log<S>,
    index: IndexMap,
    /// Local sequence numbers; held while a local entry is encoded and appended, so numbers
    /// follow log order.
    replication: Mutex<Replication>,
    stability: Mutex<stability::Stability>,
    /// The stable lsn plus one (0: nothing stable yet), for readers.
    stable_lsn_plus1: AtomicU64,
    /// The `PushBeforeSync` mutant's copy of local mutations as they are appended.
    #[cfg(feature = "mutants")]
    mutant_unsynced: Mutex<Vec<Mutation>>,
    /// Retired regions (see `retire`), with a flag so the claim path skips the lock while
    /// there are none.
    retired: Mutex<retire::RetiredState>,
    any_retired: AtomicBool,
    /// A peer reported this region retired: no new claims, for good.
    retired_here: AtomicBool,
    fenced: AtomicBool,
    /// One garbage collection at a time; when it first saw each segment sealed (Unix ms).
    gc: Mutex<BTreeMap<storage::SegmentId, u64>>,
    /// Held for reading by readers that follow a chain without holding its key's index entry;
    /// taken for writing only while a segment is deleted.
    gc_gate: std::sync::RwLock<()>,
    stats: StoreStats,
    recovered_from: (usize, usize),
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
        let mut log_config = config.log.clone();
        // An entry the store could not decode must never be appended.
        log_config.max_payload_bytes = log_config
            .max_payload_bytes
            .min(entry::ENTRY_BYTES_MAX as u32);
        let log = Log::open(storage, log_config)?;
        let index = index::new_index(config.index_shards);
        let region = config.region;
        if config.log_bucket_seqs == 0 {
            return Err(StoreError::Config(
                "log_bucket_seqs must be at least 1".into(),
            ));
        }
        let recovered = recovery::replay(&log, &index, region, config.log_bucket_seqs)?;
        log.set_next_seq(recovered.next_seq);
        let clock = Clock::new(
            region,
            config.clock,
            recovered.reservation_ms,
            recovered.max_hlc,
        );
        let store = Self {
            region,
            namespaces,
            log_retention_ms: config.log_retention_ms,
            bucket_seqs: config.log_bucket_seqs,
            clock,
            log,
            index,
            replication: Mutex::new(recovered.replication),
            stability: Mutex::new(stability::Stability::default()),
            stable_lsn_plus1: AtomicU64::new(0),
            #[cfg(feature = "mutants")]
            mutant_unsynced: Mutex::new(Vec::new()),
            retired: Mutex::new(retire::RetiredState::default()),
            any_retired: AtomicBool::new(false),
            retired_here: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            gc: Mutex::new(BTreeMap::new()),
            gc_gate: std::sync::RwLock::new(()),
            stats: StoreStats::default(),
            recovered_from: (recovered.hinted_segments, recovered.scanned_segments),
        };
        for (region, last_seq) in &recovered.retired {
            lock(&store.retired).join(*region, *last_seq, 0);
            store.note_retired(*region);
        }
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

    /// The clock, for reading its state. A stamp may leave the process only inside a log entry
    /// (see the clock module docs): heartbeat stamps must be logged like claims.
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

    /// Writes the hint file of every sealed segment that has none (a compact summary that lets
    /// the next restart skip decoding the segment). The daemon calls this after the log rolls;
    /// recovery does it for segments it had to decode. Returns how many were written.
    pub fn write_hints(&self) -> Result<usize, StoreError> {
        let _gate = self.gc_read();
        recovery::write_missing_hints(&self.log)
    }

    /// Holds off segment deletion (see `gc`) while a reader follows chains or scans segments
    /// without holding the keys' index entries.
    fn gc_read(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gc_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of disk promised to granted claims' completions and not yet returned.
    pub fn promised_bytes(&self) -> u64 {
        self.log.promised_bytes()
    }

    /// The promise a claim of `key` holds, given its lease end: claims stamped in this
    /// incarnation hold one for their completion (see [`reserve`]).
    fn promise_of(
        &self,
        key: &RecordKey,
        claim: &Stamp,
        lease_until_ms: u64,
    ) -> Option<log::Promise> {
        if claim.region != self.region || claim.physical_ms() <= self.clock.restart_fence_ms() {
            return None;
        }
        let policy = self.namespaces.get(key.namespace())?;
        Some(log::Promise {
            bytes: Log::<S>::frame_bytes(reserve::completion_bytes(
                policy.config().outcome_bytes_max,
                key,
            )),
            lease_until_ms,
        })
    }

    /// Returns the promise of one of this region's claims that finished here.
    fn return_promise(&self, key: &RecordKey, claim: &Stamp, lease_until_ms: u64) {
        if let Some(p) = self.promise_of(key, claim, lease_until_ms) {
            self.log.return_promise(p);
        }
    }

    /// Moves a claim's promise to its new lease end.
    fn move_promise(&self, key: &RecordKey, claim: &Stamp, old_ms: u64, new_ms: u64) {
        if let Some(p) = self.promise_of(key, claim, old_ms) {
            self.log.move_promise(p, new_ms);
        }
    }

    /// Returns the promises of claims whose lease ran out (by our clock plus the max drift).
    fn expire_promises(&self, now_ms: u64) {
        self.log
            .expire_promises(now_ms.saturating_sub(self.clock.config().max_drift_ms));
    }

    /// How the last recovery went: (segments restored from hints, segments decoded).
    pub fn recovery_stats(&self) -> (usize, usize) {
        self.recovered_from
    }

    /// Number of keys in the index.
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// A namespace's policy.
    pub fn namespace(&self, name: &str) -> Option<&NamespacePolicy> {
        self.namespaces.get(name)
    }

    /// The namespaces served, in name order.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces.keys().cloned().collect()
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

    /// For a dedicated flusher thread (what a daemon runs): waits up to `idle` for new
    /// appends, then writes and syncs them as one group commit. Call it in a loop; callers then
    /// wait with [`Store::wait_durable_for`] and never block in a sync themselves, and the next
    /// group builds up while the current one syncs. Returns the durable lsn.
    pub fn flush_appended(&self, idle: std::time::Duration) -> Result<Lsn, StoreError> {
        self.log.flush_appended(idle).map_err(|e| self.log_error(e))
    }

    /// Waits up to `timeout` until everything up to `lsn` (see [`Pending::lsn`]) is durable,
    /// without leading a flush: for stores flushed by a thread running
    /// [`Store::flush_appended`]. Returns whether it is durable.
    pub fn wait_durable_for(
        &self,
        lsn: Lsn,
        timeout: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let durable = self
            .log
            .wait_durable_for(lsn, timeout)
            .map_err(|e| self.log_error(e))?;
        Ok(durable >= lsn)
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
            .get(key.namespace())
            .ok_or_else(|| StoreError::UnknownNamespace(key.namespace().to_owned()))?;
        let max = p.config().key_len_max;
        if key.key().is_empty() || key.key().len() > max {
            return Err(StoreError::BadKeyLength {
                len: key.key().len(),
                max,
            });
        }
        let max = p.config().principal_len_max;
        if key.principal().len() > max {
            return Err(StoreError::PrincipalTooLong {
                len: key.principal().len(),
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

    /// The entry at `loc`, read and decoded.
    fn entry_at(&self, loc: Loc) -> Result<LogEntry, StoreError> {
        let bytes = self.log.read(loc).map_err(|e| self.log_error(e))?;
        entry::decode_at(loc, &bytes)
    }

    /// Reads a key's record back from the log, following back-pointers from `loc`.
    /// Returns the record and the number of entries read.
    fn load(&self, mut loc: Loc, key: &RecordKey) -> Result<(Record, usize), StoreError> {
        let mut record = Record::new();
        let mut hops = 0usize;
        loop {
            hops += 1;
            match self.entry_at(loc)? {
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
    fn take_record(&self, e: &mut IndexEntry, key: &RecordKey) -> Result<Box<Record>, StoreError> {
        if let Some(r) = e.hot.take() {
            return Ok(r);
        }
        let (record, hops) = self.load(e.loc, key)?;
        if hops > IMAGE_AFTER_HOPS {
            // An image too large for one entry is skipped: the chain stays long, reads stay
            // correct.
            let image = entry::encode(&LogEntry::Image {
                key: key.clone(),
                record: record.clone(),
                expires_at_ms: e.expires_at_ms,
            });
            if let Some((lsn, loc)) = image
                .ok()
                .and_then(|bytes| self.log.append(&bytes, AppendClass::Normal).ok())
            {
                e.loc = loc;
                e.lsn = e.lsn.max(lsn);
                self.stats.images.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Box::new(record))
    }

    fn newest_expiry(&self, record: &Record) -> u64 {
        record.newest_expiry_ms().unwrap_or(0)
    }

    /// Appends a local mutation: numbers it, applies it to `record`, encodes and appends it.
    /// Returns where it went and the key's newest expiry after it. On error nothing was
    /// appended and `record` may hold the delta: the caller must drop the record (the log is the
    /// truth; the next reader reads it back).
    #[allow(clippy::too_many_arguments)]
    fn append_local(
        &self,
        key: &RecordKey,
        prev: Option<Loc>,
        record: &mut Record,
        class: AppendClass,
        space: Space,
        now_ms: u64,
        make: impl FnOnce() -> Delta,
    ) -> Result<(Lsn, Loc, u64), StoreError> {
        // The sequence number is taken under the log's lock, after encoding (it ends the entry,
        // see `LogEntry::Local`): a claim's `origin_seq` is written as 0, which decoding reads as
        // the entry's number, and set in the record below.
        let delta = make();
        debug_assert!(!matches!(&delta, Delta::Claim { facts, .. } if facts.origin_seq != 0));
        record.apply(&delta)?;
        let expires_at_ms = self.newest_expiry(record);
        let (lsn, loc, seq) =
            self.append_delta(key, prev, &delta, expires_at_ms, class, space, now_ms)?;
        if let Delta::Claim { stamp, .. } = &delta {
            record.set_origin_seq(stamp, seq);
        }
        Ok((lsn, loc, expires_at_ms))
    }

    /// Encodes and appends a local delta already applied (or known not to matter: see
    /// `finish`) with the key's newest expiry after it; numbers it. Returns its lsn, location
    /// and sequence number.
    #[allow(clippy::too_many_arguments)]
    fn append_delta(
        &self,
        key: &RecordKey,
        prev: Option<Loc>,
        delta: &Delta,
        expires_at_ms: u64,
        class: AppendClass,
        space: Space,
        now_ms: u64,
    ) -> Result<(Lsn, Loc, u64), StoreError> {
        let (lsn, loc, seq) =
            entry::with_local_mutation(self.region, key, delta, prev, expires_at_ms, |bytes| {
                self.log.append_sequenced(bytes, class, space)
            })?
            .map_err(|e| self.log_error(e))?;
        if seq % self.bucket_seqs == 0 || seq == 1 {
            // Local numbers follow log order: the first of each bucket is its smallest position.
            lock(&self.replication).checkpoint(self.region, seq, loc, now_ms);
        }
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::PushBeforeSync) {
            let mut delta = delta.clone();
            if let Delta::Claim { facts, .. } = &mut delta {
                facts.origin_seq = seq;
            }
            lock(&self.mutant_unsynced).push(Mutation {
                origin: self.region,
                seq,
                key: key.clone(),
                delta,
            });
        }
        Ok((lsn, loc, seq))
    }

    /// The `PushBeforeSync` mutant: local mutations above `seq`, durable or not.
    #[cfg(feature = "mutants")]
    pub fn mutant_unsynced_after(&self, seq: u64) -> Vec<Mutation> {
        let mut v = lock(&self.mutant_unsynced);
        v.retain(|m| m.seq > seq);
        v.clone()
    }

    /// [`Store::append_local`] for an existing key: chains the entry to the key's previous one
    /// and points the index entry at it.
    #[allow(clippy::too_many_arguments)]
    fn write_local(
        &self,
        e: &mut IndexEntry,
        key: &RecordKey,
        record: &mut Record,
        class: AppendClass,
        space: Space,
        now_ms: u64,
        make: impl FnOnce() -> Delta,
    ) -> Result<(), StoreError> {
        let (lsn, loc, expires_at_ms) =
            self.append_local(key, Some(e.loc), record, class, space, now_ms, make)?;
        e.loc = loc;
        e.lsn = lsn;
        e.expires_at_ms = expires_at_ms;
        Ok(())
    }

    /// [`Store::write_local`] of an entry that needs no new promise: it may use the space
    /// held back for promises (a write to a granted claim must not fail on a full disk).
    fn write_reserved(
        &self,
        e: &mut IndexEntry,
        key: &RecordKey,
        record: &mut Record,
        now_ms: u64,
        make: impl FnOnce() -> Delta,
    ) -> Result<(), StoreError> {
        self.write_local(
            e,
            key,
            record,
            AppendClass::Reserved,
            Space::default(),
            now_ms,
            make,
        )
    }

    /// Runs `f` on the record of an existing key under its index lock, then caches the record
    /// if a claim is still in flight. After an error the cached record is dropped: the log,
    /// which holds only what was appended, is read back next time.
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
        let result = f(&mut e, &mut record);
        if result.is_ok() {
            e.hot = hot(record);
        }
        result
    }
}

/// Keeps a record in the index only while its newest generation has a claim in flight; one
/// that leaves goes back to the thread's pool of emptied records.
fn hot(record: Box<Record>) -> Option<Box<Record>> {
    let newest_in_flight = record
        .claims()
        .rev()
        .take(8)
        .any(|(_, c)| c.status() == ClaimStatus::InFlight);
    if newest_in_flight {
        Some(record)
    } else {
        record_pool::recycle(record);
        None
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
