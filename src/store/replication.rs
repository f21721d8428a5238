//! The store's side of replication: merging peers' mutations, per-origin marks and log reads,
//! and key-ordered snapshot chunks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;

use super::entry::{self, LogEntry, Mutation};
use super::index::{self, IndexEntry};
use super::log::{AppendClass, Loc, Lsn};
use super::storage::Storage;
use super::{
    hot, lock, policy, Merged, Pending, SnapshotChunk, Store, StoreError, Unavailable,
    SEQ_CHECKPOINT_EVERY,
};
use crate::clock::{Observed, RegionId};
use crate::record::{Delta, Item, ItemContext, KeyDigest, Record, RecordKey};

/// Per-origin received sequence numbers: the contiguous mark and what lies above it.
#[derive(Debug, Clone, Default)]
pub(super) struct SeqSet {
    pub(super) mark: u64,
    above: BTreeSet<u64>,
}

impl SeqSet {
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
}

#[derive(Debug, Default)]
pub(super) struct Replication {
    /// origin → bucket (seq / SEQ_CHECKPOINT_EVERY) → (smallest log position of any of its
    /// numbers, newest time one was written, Unix ms). Remote numbers may arrive out of order,
    /// hence the smallest position per bucket.
    pub(super) buckets: BTreeMap<RegionId, BTreeMap<u64, (Loc, u64)>>,
    pub(super) received: BTreeMap<RegionId, SeqSet>,
}

impl Replication {
    pub(super) fn checkpoint(&mut self, origin: RegionId, seq: u64, loc: Loc, ms: u64) {
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

impl<S: Storage> Store<S> {
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
