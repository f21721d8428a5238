//! The store's side of replication: merging peers' mutations, per-origin marks and log reads,
//! and key-ordered snapshot chunks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;

use super::entry::{self, LogEntry, Mutation};
use super::index::{self, IndexEntry};
use super::log::{AppendClass, Loc, Lsn};
use super::storage::Storage;
use super::{
    hot, lock, policy, record_pool, Merged, Pending, SnapshotChunk, Store, StoreError, Unavailable,
    SEQ_CHECKPOINT_EVERY,
};
use crate::clock::{Observed, RegionId};
use crate::record::{Delta, Item, KeyDigest, Record, RecordKey};

/// Per-origin received sequence numbers: the contiguous mark and what lies above it.
#[derive(Debug, Clone, Default)]
pub(super) struct SeqSet {
    pub(super) mark: u64,
    above: BTreeSet<u64>,
}

/// What a region holds of one origin's log (see [`Store::holdings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The origin.
    pub origin: RegionId,
    /// Every number up to here is held.
    pub mark: u64,
    /// The lowest missing ranges above `mark` (inclusive bounds), in order, all below `head`.
    pub gaps: Vec<(u64, u64)>,
    /// The highest number held (`mark` when nothing is held above it).
    pub head: u64,
}

impl SeqSet {
    /// The set as a mark, its lowest `gaps_max` gaps and its head.
    fn holding(&self, origin: RegionId, gaps_max: usize) -> Holding {
        let mut gaps = Vec::new();
        let mut next = self.mark + 1;
        for &s in &self.above {
            if gaps.len() == gaps_max {
                break;
            }
            if s > next {
                gaps.push((next, s - 1));
            }
            next = s.saturating_add(1);
        }
        Holding {
            origin,
            mark: self.mark,
            gaps,
            head: self.above.last().copied().unwrap_or(self.mark),
        }
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        seq <= self.mark || self.above.contains(&seq)
    }

    pub(super) fn insert(&mut self, seq: u64) {
        if seq <= self.mark {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.mark + 1)) {
            self.mark += 1;
        }
    }

    /// Counts every number up to `mark` as held (a snapshot brought their effects).
    pub(super) fn adopt(&mut self, mark: u64) {
        if mark <= self.mark {
            return;
        }
        self.mark = mark;
        self.above = self.above.split_off(&(mark + 1));
        while self.above.remove(&(self.mark + 1)) {
            self.mark += 1;
        }
    }
}

#[derive(Debug)]
pub(super) struct Replication {
    /// Sequence numbers per bucket (`StoreConfig::log_bucket_seqs`).
    pub(super) bucket_seqs: u64,
    /// origin → bucket (seq / bucket_seqs) → (smallest log position of any of its
    /// numbers, newest time one was written, Unix ms). Remote numbers may arrive out of order,
    /// hence the smallest position per bucket.
    pub(super) buckets: BTreeMap<RegionId, BTreeMap<u64, (Loc, u64)>>,
    /// Every (origin, seq) appended here, durable or not: duplicates are skipped against it.
    pub(super) received: BTreeMap<RegionId, SeqSet>,
    /// The durable part of `received`: what marks report.
    pub(super) durable: BTreeMap<RegionId, SeqSet>,
    /// Appended but not known durable yet: (origin, seq, lsn), in append order.
    pending: VecDeque<(RegionId, u64, Lsn)>,
    /// Per origin, the largest number announced before its entry was appended (see
    /// `stability`): a bound on every remote number appended so far.
    pub(super) announced: BTreeMap<RegionId, u64>,
    /// Per origin, the mark adopted from a snapshot: numbers up to it are held in effect but
    /// not as entries, so they are not served (askers get `LogTruncated`).
    pub(super) adopted: BTreeMap<RegionId, u64>,
    /// Adoptions appended but not known durable yet: (lsn, origin, mark).
    pending_adoptions: VecDeque<(Lsn, RegionId, u64)>,
}

impl Default for Replication {
    fn default() -> Self {
        Self::new(SEQ_CHECKPOINT_EVERY)
    }
}

impl Replication {
    pub(super) fn new(bucket_seqs: u64) -> Self {
        Self {
            bucket_seqs: bucket_seqs.max(1),
            buckets: BTreeMap::new(),
            received: BTreeMap::new(),
            durable: BTreeMap::new(),
            pending: VecDeque::new(),
            announced: BTreeMap::new(),
            adopted: BTreeMap::new(),
            pending_adoptions: VecDeque::new(),
        }
    }

    pub(super) fn checkpoint(&mut self, origin: RegionId, seq: u64, loc: Loc, ms: u64) {
        let b = self
            .buckets
            .entry(origin)
            .or_default()
            .entry(seq / self.bucket_seqs)
            .or_insert((loc, ms));
        b.0 = b.0.min(loc);
        b.1 = b.1.max(ms);
    }

    /// Forgets a bucket's checkpoint: what a reader sees while the appender of the bucket's
    /// first entry has not recorded it yet.
    #[cfg(test)]
    pub(super) fn forget_checkpoint(&mut self, origin: RegionId, bucket: u64) {
        if let Some(b) = self.buckets.get_mut(&origin) {
            b.remove(&bucket);
        }
    }

    /// Announces that (origin, seq) is about to be appended.
    fn announce(&mut self, origin: RegionId, seq: u64) {
        let a = self.announced.entry(origin).or_insert(0);
        *a = (*a).max(seq);
    }

    /// Records a recovered (hence durable) remote number.
    pub(super) fn recovered(&mut self, origin: RegionId, seq: u64) {
        self.announce(origin, seq);
        self.received.entry(origin).or_default().insert(seq);
        self.durable.entry(origin).or_default().insert(seq);
    }

    fn appended(&mut self, origin: RegionId, seq: u64, lsn: Lsn) {
        self.received.entry(origin).or_default().insert(seq);
        self.pending.push_back((origin, seq, lsn));
    }

    /// Adopts `mark` for `origin` (see [`Store::adopt_marks`]); durable once `lsn` is, or at
    /// once when `lsn` is `None` (recovery).
    pub(super) fn adopt(&mut self, origin: RegionId, mark: u64, lsn: Option<Lsn>) {
        self.announce(origin, mark);
        self.received.entry(origin).or_default().adopt(mark);
        let floor = self.adopted.entry(origin).or_insert(0);
        *floor = (*floor).max(mark);
        match lsn {
            Some(lsn) => self.pending_adoptions.push_back((lsn, origin, mark)),
            None => self.durable.entry(origin).or_default().adopt(mark),
        }
    }

    /// Moves what became durable into the durable sets.
    fn settle(&mut self, durable_lsn: Lsn) {
        while let Some(&(lsn, origin, mark)) = self.pending_adoptions.front() {
            if lsn > durable_lsn {
                break;
            }
            self.durable.entry(origin).or_default().adopt(mark);
            self.pending_adoptions.pop_front();
        }
        while let Some(&(origin, seq, lsn)) = self.pending.front() {
            if lsn > durable_lsn {
                break;
            }
            self.durable.entry(origin).or_default().insert(seq);
            self.pending.pop_front();
        }
    }

    /// Whether (origin, seq) is here, and if so whether it is known durable.
    fn holds(&self, origin: RegionId, seq: u64) -> Option<bool> {
        if !self.received.get(&origin).is_some_and(|s| s.contains(seq)) {
            return None;
        }
        Some(self.durable.get(&origin).is_some_and(|s| s.contains(seq)))
    }
}

/// A peer's key within the absolute limits.
fn check_remote_key(k: &RecordKey) -> Result<(), String> {
    if k.namespace().is_empty()
        || k.namespace().len() > policy::NAMESPACE_LEN_MAX
        || k.key().is_empty()
        || k.key().len() > policy::KEY_LEN_ABSOLUTE_MAX
        || k.principal().len() > policy::KEY_LEN_ABSOLUTE_MAX
    {
        return Err("key outside the absolute limits".into());
    }
    Ok(())
}

/// Highest sequence number a peer's mutation may carry (2^62): far beyond any real log, and
/// far enough from `u64::MAX` that arithmetic on numbers never overflows.
pub const SEQ_MAX: u64 = 1 << 62;

/// Most claims one record may hold: beyond it a peer's new claim is refused (a record that
/// large is a bug or an attack, and every decision on the key reads it whole).
pub const CLAIMS_PER_RECORD_MAX: usize = 1024;

impl<S: Storage> Store<S> {
    /// Checks a peer's mutation before anything is written: peers are untrusted.
    fn validate_remote(&self, m: &Mutation) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidMutation {
            origin: m.origin,
            seq: m.seq,
            reason,
        };
        if m.origin == self.region {
            return Err(invalid("a peer sent this region's own mutation".into()));
        }
        if m.seq == 0 || m.seq > SEQ_MAX {
            return Err(invalid(format!("sequence numbers run from 1 to {SEQ_MAX}")));
        }
        m.delta.validate().map_err(|e| invalid(e.to_string()))?;
        // Only a claim's owner writes its chain, and a region numbers only its own mutations.
        let author = match &m.delta {
            Delta::Claim { stamp, facts } => {
                if facts.origin_seq != m.seq {
                    return Err(invalid("claim's origin_seq differs from its seq".into()));
                }
                stamp.region
            }
            Delta::Extend { stamp, .. } | Delta::Finish { stamp, .. } => stamp.region,
            Delta::Resolve(r) => r.at.region,
        };
        if author != m.origin {
            return Err(invalid(format!(
                "a mutation of {author}'s claim or resolution numbered by {}",
                m.origin
            )));
        }
        check_remote_key(&m.key).map_err(invalid)
    }

    /// Merges a peer's mutation (applied on receipt: merges commute). The mutation is stored
    /// under its (origin, seq) so this region can serve it to others; a mutation already here
    /// is skipped. Peers are untrusted: the mutation is validated before anything is written.
    pub fn merge_remote(
        &self,
        now_ms: u64,
        mutation: Mutation,
    ) -> Result<Pending<Merged>, StoreError> {
        self.validate_remote(&mutation)?;
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        let digest = mutation.key.digest();
        // The key's entry lock serializes deliveries of the same (origin, seq): check for a
        // duplicate under it.
        let slot = self.index.entry(digest);
        let held = {
            let mut repl = lock(&self.replication);
            let held = repl.holds(mutation.origin, mutation.seq);
            if held.is_none() {
                // Before the append: stability checkpoints rely on it.
                repl.announce(mutation.origin, mutation.seq);
            }
            held
        };
        if let Some(durable) = held {
            return Ok(Pending {
                // Not yet durable: the answer waits for everything appended so far.
                lsn: if durable { 0 } else { self.log.appended_lsn() },
                value: Merged {
                    new: false,
                    changed: false,
                    drift_rejected: false,
                },
            });
        }
        // Keep the reservation current, or every peer stamp past a stale one would look too far
        // ahead on a region that has not claimed anything for a while.
        self.settle_clock(now_ms)?;
        let drift_rejected = matches!(
            self.clock.observe(now_ms, mutation.delta.stamp()),
            Observed::TooFarAhead { .. }
        );
        if drift_rejected {
            self.stats.drift_rejected.fetch_add(1, Ordering::Relaxed);
        }
        let mut slot = match slot {
            Entry::Occupied(o) => o.into_ref(),
            Entry::Vacant(v) => {
                // A key never seen here: build its record from this one delta and insert the
                // entry only once the append succeeded.
                let mut record = record_pool::fresh();
                let changed = record.apply(&mutation.delta)?;
                let expires_at_ms = self.newest_expiry(&record);
                let (lsn, loc) = self.append_remote(&mutation, None, expires_at_ms, now_ms)?;
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
        if let Delta::Claim { stamp, .. } = &mutation.delta {
            if record.claim(stamp).is_none() && record.claim_count() >= CLAIMS_PER_RECORD_MAX {
                e.hot = hot(record);
                return Err(StoreError::InvalidMutation {
                    origin: mutation.origin,
                    seq: mutation.seq,
                    reason: format!("the key already holds {CLAIMS_PER_RECORD_MAX} claims"),
                });
            }
        }
        let changed = record.apply(&mutation.delta)?;
        let expires_at_ms = self.newest_expiry(&record);
        // On error the record is dropped (it may hold the unwritten delta); the log is read
        // back next time.
        let (lsn, loc) = self.append_remote(&mutation, Some(e.loc), expires_at_ms, now_ms)?;
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

    fn append_remote(
        &self,
        m: &Mutation,
        prev: Option<Loc>,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(Lsn, Loc), StoreError> {
        let (lsn, loc) = entry::with_encoded_mutation(
            m.origin,
            m.seq,
            &m.key,
            &m.delta,
            prev,
            expires_at_ms,
            |bytes| self.log.append(bytes, AppendClass::Normal),
        )?
        .map_err(|err| self.log_error(err))?;
        let mut repl = lock(&self.replication);
        repl.appended(m.origin, m.seq, lsn);
        repl.checkpoint(m.origin, m.seq, loc, now_ms);
        Ok((lsn, loc))
    }

    /// Merges a peer's whole record of a key: a failover lookup's answer, or a chunk of a
    /// snapshot stream. The merged record is written as one image entry (which a read stops
    /// at), so it is durable with the next flush like any write. Per-origin marks do not move:
    /// the origins' logs still deliver these mutations, which then merge as no-ops.
    ///
    /// The record is untrusted: it is rebuilt from its deltas, each validated, and the key
    /// limits and the per-record claim limit apply. Returns whether anything was new.
    pub fn merge_record(
        &self,
        now_ms: u64,
        from: RegionId,
        key: &RecordKey,
        other: &Record,
    ) -> Result<Pending<bool>, StoreError> {
        // Like a peer's mutation, a peer's record is held to the absolute limits only: a
        // namespace configured elsewhere first (a rollout) is still replicated here.
        let invalid = |reason: String| StoreError::Invalid(format!("peer record: {reason}"));
        check_remote_key(key).map_err(invalid)?;
        let mut incoming = Record::new();
        for d in other.to_deltas() {
            d.validate().map_err(|e| invalid(e.to_string()))?;
            incoming.apply(&d).map_err(|e| invalid(e.to_string()))?;
        }
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        self.settle_clock(now_ms)?;
        // Before the append: the facts' numbers are unknown here, so stability waits for the
        // next digests of the sender and of the facts' origins.
        let origins = incoming
            .claims()
            .map(|(s, _)| s.region)
            .chain(incoming.resolutions().map(|r| r.at.region));
        lock(&self.stability).image_from(from, origins);
        if let Some((newest, _)) = incoming.claims().next_back() {
            if matches!(
                self.clock.observe(now_ms, *newest),
                Observed::TooFarAhead { .. }
            ) {
                self.stats.drift_rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        let digest = key.digest();
        let (mut slot, mut record) = match self.index.entry(digest) {
            Entry::Occupied(o) => {
                let mut slot = o.into_ref();
                let record = self.take_record(slot.value_mut(), key)?;
                (Some(slot), record)
            }
            Entry::Vacant(v) => {
                if incoming.is_empty() {
                    return Ok(Pending {
                        lsn: 0,
                        value: false,
                    });
                }
                let record = Box::new(incoming.clone());
                let expires_at_ms = self.newest_expiry(&record);
                let loc_lsn = self.append_image(key, &record, expires_at_ms)?;
                v.insert(IndexEntry {
                    loc: loc_lsn.1,
                    lsn: loc_lsn.0,
                    expires_at_ms,
                    hot: hot(record),
                });
                return Ok(Pending {
                    lsn: loc_lsn.0,
                    value: true,
                });
            }
        };
        let e = slot.as_mut().expect("occupied").value_mut();
        let before = record.claim_count();
        let changed = record.merge(&incoming);
        if record.claim_count() > CLAIMS_PER_RECORD_MAX && record.claim_count() > before {
            // Dropped: the log still holds the record as it was.
            return Err(invalid(format!(
                "the key would hold more than {CLAIMS_PER_RECORD_MAX} claims"
            )));
        }
        if !changed {
            let lsn = e.lsn;
            e.hot = hot(record);
            return Ok(Pending { lsn, value: false });
        }
        let expires_at_ms = self.newest_expiry(&record);
        let (lsn, loc) = self.append_image(key, &record, expires_at_ms)?;
        e.loc = loc;
        e.lsn = lsn;
        e.expires_at_ms = expires_at_ms;
        e.hot = hot(record);
        Ok(Pending { lsn, value: true })
    }

    /// Adopts the marks a snapshot stream from `from` carried, once every record of the stream
    /// was merged ([`Store::merge_record`]): per origin, every number up to the mark counts as
    /// held here, so anti-entropy asks only for what lies above. Written as a `Marks` log entry
    /// after the records (recovery adopts it again); digests advertise the new marks once it is
    /// durable. This region's own log and marks not above ours are left alone. Numbers held
    /// only in effect are never served: a peer asking for them gets `LogTruncated` and takes a
    /// snapshot in turn.
    pub fn adopt_marks(
        &self,
        from: RegionId,
        marks: &[(RegionId, u64)],
    ) -> Result<Pending<()>, StoreError> {
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        let new: Vec<(RegionId, u64)> = {
            let repl = lock(&self.replication);
            marks
                .iter()
                .filter(|(o, m)| {
                    *o != self.region
                        && *m > 0
                        && *m <= SEQ_MAX
                        && repl.received.get(o).map_or(0, |s| s.mark) < *m
                })
                .copied()
                .collect()
        };
        if new.is_empty() {
            return Ok(Pending { lsn: 0, value: () });
        }
        // The records' facts have unknown numbers: stability waits for the next digests of the
        // sender and of every origin it reported.
        lock(&self.stability).image_from(from, marks.iter().map(|(o, _)| *o));
        let bytes = entry::encode(&LogEntry::Marks { marks: new.clone() })?;
        let (lsn, _) = self
            .log
            .append(&bytes, AppendClass::Normal)
            .map_err(|e| self.log_error(e))?;
        let mut repl = lock(&self.replication);
        for (o, m) in new {
            repl.adopt(o, m, Some(lsn));
        }
        Ok(Pending { lsn, value: () })
    }

    fn append_image(
        &self,
        key: &RecordKey,
        record: &Record,
        expires_at_ms: u64,
    ) -> Result<(Lsn, Loc), StoreError> {
        let bytes = entry::encode(&LogEntry::Image {
            key: key.clone(),
            record: record.clone(),
            expires_at_ms,
        })?;
        self.log
            .append(&bytes, AppendClass::Normal)
            .map_err(|e| self.log_error(e))
    }

    /// Per origin, the contiguous prefix of its log held here *durably* (for this region's own
    /// log: the last durable sequence number). What a digest exchange advertises.
    pub fn marks(&self) -> BTreeMap<RegionId, u64> {
        let durable_lsn = self.log.durable_lsn();
        let mut out: BTreeMap<RegionId, u64> = {
            let mut repl = lock(&self.replication);
            repl.settle(durable_lsn);
            repl.durable.iter().map(|(r, s)| (*r, s.mark)).collect()
        };
        let own = self.log.durable_seq();
        out.insert(self.region, own);
        out
    }

    /// Per origin, what is held here durably: the contiguous mark, then up to `gaps_max` of the
    /// lowest missing ranges above it, and the highest number held. Origins in order; this
    /// region's own log is one contiguous prefix. What an anti-entropy digest advertises.
    pub fn holdings(&self, gaps_max: usize) -> Vec<Holding> {
        let durable_lsn = self.log.durable_lsn();
        let mut out: Vec<Holding> = {
            let mut repl = lock(&self.replication);
            repl.settle(durable_lsn);
            repl.durable
                .iter()
                .filter(|(r, _)| **r != self.region)
                .map(|(r, set)| set.holding(*r, gaps_max))
                .collect()
        };
        let own = self.log.durable_seq();
        let at = out.partition_point(|h| h.origin < self.region);
        out.insert(
            at,
            Holding {
                origin: self.region,
                mark: own,
                gaps: Vec::new(),
                head: own,
            },
        );
        out
    }

    /// Durable mutations of `origin` with sequence numbers in `from_seq..from_seq + max`, in
    /// sequence order (numbers this region does not hold are simply absent). Any region serves
    /// any origin's log, so partial partitions heal. Mutations older than the log retention are
    /// not served ([`StoreError::LogTruncated`]).
    pub fn log_from(
        &self,
        now_ms: u64,
        origin: RegionId,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<Mutation>, StoreError> {
        let from_seq = from_seq.max(1);
        let until = from_seq.saturating_add(max as u64);
        // No segment is deleted while this scans (see `gc`).
        let _gate = self.gc_read();
        let start = {
            let repl = lock(&self.replication);
            // Numbers adopted from a snapshot are held in effect only.
            let adopted = repl.adopted.get(&origin).map_or(1, |m| m + 1);
            if from_seq < adopted {
                return Err(StoreError::LogTruncated {
                    origin,
                    first_retained: adopted,
                });
            }
            let Some(buckets) = repl.buckets.get(&origin) else {
                return Ok(Vec::new());
            };
            if let Some(first_retained) = self.first_retained(&repl, origin, now_ms) {
                if from_seq < first_retained {
                    return Err(StoreError::LogTruncated {
                        origin,
                        first_retained,
                    });
                }
            }
            // Numbers may lie anywhere after the smallest position of any later bucket. The
            // bucket below is included too: a bucket's first checkpoint is recorded just after
            // its entry is appended, so for a moment entries of a bucket with no checkpoint yet
            // may be durable; they all lie after the previous bucket's position.
            let b = from_seq / repl.bucket_seqs;
            buckets
                .range(..b)
                .next_back()
                .into_iter()
                .chain(buckets.range(b..))
                .map(|(_, (loc, _))| *loc)
                .min()
        };
        let Some(start) = start else {
            return Ok(Vec::new());
        };
        let mut out = BTreeMap::new();
        self.log
            .scan_from(start, |loc, payload| -> Result<_, StoreError> {
                let entry = entry::decode_at(loc, payload)?;
                if let LogEntry::Mutation { mutation, .. } = entry {
                    if mutation.origin == origin && (from_seq..until).contains(&mutation.seq) {
                        out.insert(mutation.seq, mutation);
                        if out.len() as u64 >= until - from_seq {
                            return Ok(ControlFlow::Break(()));
                        }
                    }
                }
                Ok(ControlFlow::Continue(()))
            })?;
        Ok(out.into_values().collect())
    }

    /// The first number of `origin`'s log still within the retention at `now_ms`, if any
    /// bucket of it is (`None`: every number held is past it). A bucket is past retention
    /// when it, and the bucket after it (written later, so no older than any of its entries),
    /// were last written before the horizon. Local buckets record only their first entry's
    /// time, hence the look at the next one.
    pub(super) fn first_retained(
        &self,
        repl: &Replication,
        origin: RegionId,
        now_ms: u64,
    ) -> Option<u64> {
        let buckets = repl.buckets.get(&origin)?;
        let horizon = now_ms.saturating_sub(self.log_retention_ms);
        let times: Vec<(u64, u64)> = buckets.iter().map(|(b, (_, ms))| (*b, *ms)).collect();
        times
            .iter()
            .enumerate()
            .find(|(i, (_, ms))| {
                *ms >= horizon || times.get(i + 1).is_none_or(|(_, next)| *next >= horizon)
            })
            .map(|(_, (b, _))| (b * repl.bucket_seqs).max(1))
    }

    /// One chunk of a key-ordered snapshot stream: up to `max_keys` records with digests after
    /// `after`, in digest order. Resumable: pass the returned `next` back in. Like any answer,
    /// it may leave the process only once durable (it may hold entries just appended).
    pub fn snapshot_chunk(
        &self,
        after: Option<KeyDigest>,
        max_keys: usize,
    ) -> Result<Pending<SnapshotChunk>, StoreError> {
        let max_keys = max_keys.max(1);
        // Chains are read outside their index entries' locks: no segment may go meanwhile.
        let _gate = self.gc_read();
        let shards = self.index.shards().len();
        let mut shard = after.map_or(0, |d| index::shard_of(&self.index, &d));
        let mut records = Vec::new();
        let mut cursor = after;
        let mut lsn = 0;
        while shard < shards && records.len() < max_keys {
            for digest in index::shard_keys_after(&self.index, shard, cursor.as_ref()) {
                if records.len() >= max_keys {
                    break;
                }
                let Some(e) = self.index.get(&digest) else {
                    continue;
                };
                let (loc, hot_record) = (e.loc, e.hot.as_deref().cloned());
                lsn = lsn.max(e.lsn);
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
        Ok(Pending {
            lsn,
            value: SnapshotChunk { records, next },
        })
    }

    fn key_at(&self, loc: Loc) -> Result<RecordKey, StoreError> {
        let bytes = self.log.read(loc).map_err(|e| self.log_error(e))?;
        match entry::decode(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))? {
            LogEntry::Mutation { mutation, .. } => Ok(mutation.key),
            LogEntry::Image { key, .. } => Ok(key),
            _ => Err(StoreError::Corrupt(format!("no record entry at {loc:?}"))),
        }
    }

    /// Every compensation item of every key as of `now_ms` (a full scan; for reports and
    /// tests).
    pub fn all_items(&self, now_ms: u64) -> Result<Vec<(RecordKey, Item)>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        let retired = self.retired_view();
        loop {
            let chunk = self.wait(self.snapshot_chunk(after, 1024)?)?;
            for (_, key, record) in &chunk.records {
                let lsn = self.index.get(&key.digest()).map_or(Lsn::MAX, |e| e.lsn);
                let ctx = self.item_context(now_ms, lsn, &retired);
                out.extend(record.items(key, ctx).into_iter().map(|i| (key.clone(), i)));
            }
            match chunk.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holding_lists_the_lowest_gaps_above_the_mark() {
        let r = RegionId::new("a").unwrap();
        let mut set = SeqSet::default();
        assert_eq!(
            set.holding(r, 8),
            Holding {
                origin: r,
                mark: 0,
                gaps: vec![],
                head: 0
            }
        );
        for s in [1, 2, 3, 5, 6, 9, 12] {
            set.insert(s);
        }
        let h = set.holding(r, 8);
        assert_eq!((h.mark, h.head), (3, 12));
        assert_eq!(h.gaps, vec![(4, 4), (7, 8), (10, 11)]);
        assert_eq!(set.holding(r, 1).gaps, vec![(4, 4)]);
        assert_eq!(
            set.holding(r, 1).head,
            12,
            "the head stays the highest held"
        );
        set.insert(4);
        assert_eq!(set.holding(r, 8).gaps, vec![(7, 8), (10, 11)]);
        assert_eq!(set.holding(r, 8).mark, 6);
    }
}
