//! Garbage collection: deleting the oldest log segment (design section 3).
//!
//! Records expire by time, so the log's oldest segment holds mostly records that are dead or
//! long superseded. [`Store::collect_garbage`] takes the oldest sealed segment and:
//!
//! 1. reads which keys and which (origin, seq) numbers it holds;
//! 2. gives up for now if the segment was sealed less than the log retention ago (peers may
//!    still ask for what it holds; the store notes when it first sees each segment sealed, in
//!    memory, so after a restart a segment waits one more retention), or if a number in it lies
//!    above its origin's contiguous mark here (the segment would take numbers this region
//!    holds out of order with it, and marks could not say so);
//! 3. for each key with an entry there: *drops* the key when it is reducible and its newest
//!    entry lies in that segment (nothing later names it), else *copies it forward*: an
//!    `Image` of the whole record in the active segment ends the key's chain there, so no
//!    live chain reaches the old segment any more;
//! 4. appends a `Floor` entry, which says what the deleted segments held that recovery still
//!    needs (per origin, the numbers held in effect; the clock reservation and largest hlc;
//!    the retirements), and makes everything durable;
//! 5. deletes the segment and its hint file.
//!
//! A key is *reducible* when its newest generation expired on every clock (its expiry plus
//! twice the max drift lies behind us), it is stable here (every region has seen every fact of
//! it), and it has no open item: every item of it was resolved. Such a record is dropped
//! whole. The design shrinks a generation to a tombstone first and drops the tombstone once
//! every region holds it; this store drops the record at once (see `docs/architecture.md`,
//! departures): a region that still holds it may send it back (a snapshot, a lookup answer),
//! which only brings the same expired record back until the next collection.
//!
//! A crash at any step leaves a consistent log: before the `Floor` is durable nothing was
//! removed; after it, recovery adopts its floors whether or not the segment is gone yet.
//! Readers that follow a key's chain without holding the key's index entry (snapshot
//! streams, range answers, hint writing) hold the collector's gate for reading, so a segment
//! is never deleted under them.

use std::collections::BTreeMap;

use dashmap::mapref::entry::Entry;

use super::entry::{self, LogEntry};
use super::log::{AppendClass, Loc, SegmentRole};
use super::storage::{SegmentId, Storage};
use super::{hot, lock, Store, StoreError};
use crate::clock::RegionId;
use crate::record::{KeyDigest, Record, RecordKey};

/// What one call of [`Store::collect_garbage`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collected {
    /// The segment was deleted.
    Deleted {
        /// The segment.
        segment: SegmentId,
        /// Keys dropped (reducible, and named by nothing later).
        dropped: usize,
        /// Keys copied forward (an image in the active segment).
        copied: usize,
    },
    /// Nothing was deleted, and why.
    Kept(KeptBecause),
}

/// Why the oldest segment was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeptBecause {
    /// No segment is sealed and older than the one holding the durable end of the log.
    NothingSealed,
    /// It was sealed less than the log retention ago: peers may still ask for what it holds.
    WithinRetention {
        /// The segment.
        segment: SegmentId,
        /// When it may go (Unix ms).
        until_ms: u64,
    },
    /// A number in it lies above its origin's contiguous mark here (the origin not retired).
    AboveMark {
        /// The segment.
        segment: SegmentId,
        /// The origin.
        origin: RegionId,
        /// The number.
        seq: u64,
    },
}

/// What the oldest segment holds.
struct Contents {
    keys: BTreeMap<KeyDigest, RecordKey>,
    /// Per origin, the largest number it holds.
    numbered: BTreeMap<RegionId, u64>,
}

impl<S: Storage> Store<S> {
    /// Deletes the oldest log segment if it can go (see the module docs); call it regularly,
    /// e.g. after the log rolls to a new segment. `now_ms` is the wall clock. Returns what it
    /// did; an error leaves the segment in place, with nothing lost.
    pub fn collect_garbage(&self, now_ms: u64) -> Result<Collected, StoreError> {
        let mut sealed_seen = lock(&self.gc);
        let durable_segment = self.log.durable_end().segment;
        let sealed: Vec<SegmentId> = self
            .log
            .segments()
            .iter()
            .filter(|s| s.role == SegmentRole::Sealed && s.id < durable_segment)
            .map(|s| s.id)
            .collect();
        for id in &sealed {
            sealed_seen.entry(*id).or_insert(now_ms);
        }
        let oldest = self.log.segments().first().map(|s| s.id);
        let Some(segment) = oldest.filter(|id| sealed.contains(id)) else {
            return Ok(Collected::Kept(KeptBecause::NothingSealed));
        };
        let until_ms = sealed_seen[&segment].saturating_add(self.log_retention_ms);
        if now_ms < until_ms {
            return Ok(Collected::Kept(KeptBecause::WithinRetention {
                segment,
                until_ms,
            }));
        }
        // The segment after it (sealed or active: the durable end lies beyond it).
        let next_segment = self.log.segments().get(1).map_or(segment + 1, |s| s.id);
        let contents = self.contents_of(segment)?;
        if let Some(keep) = self.above_mark(segment, &contents.numbered) {
            return Ok(Collected::Kept(keep));
        }
        let (mut dropped, mut copied) = (0, 0);
        for (digest, key) in &contents.keys {
            let Entry::Occupied(mut o) = self.index.entry(*digest) else {
                continue; // dropped before
            };
            let e = o.get_mut();
            if !self.chain_reaches(e.loc, segment)? {
                continue; // its entry there is no longer part of its record
            }
            let record = self.take_record(e, key)?;
            if e.loc.segment <= segment
                && self.reducible(now_ms, e.lsn, e.expires_at_ms, key, &record)
            {
                o.remove();
                super::record_pool::recycle(record);
                dropped += 1;
                continue;
            }
            match self.copy_forward(e.loc, e.expires_at_ms, key, &record) {
                Ok(loc) => {
                    e.loc = loc;
                    e.hot = hot(record);
                    copied += 1;
                }
                Err(err) => {
                    // What was copied so far stays copied (images only cap chains); the
                    // segment stays.
                    e.hot = hot(record);
                    return Err(err);
                }
            }
        }
        // Per origin, the numbers held in effect from now on: up to the largest in the segment,
        // never past the contiguous mark (a retired region's numbers above a gap that can no
        // longer be filled are forgotten; their facts live on in the copies).
        let marks = self.marks();
        let floors: BTreeMap<RegionId, u64> = contents
            .numbered
            .iter()
            .map(|(o, seq)| (*o, (*seq).min(marks.get(o).copied().unwrap_or(0))))
            .collect();
        self.write_floor(&floors)?;
        self.log.flush().map_err(|e| self.log_error(e))?;
        {
            let mut repl = lock(&self.replication);
            for (origin, seq) in &floors {
                if *origin == self.region {
                    let f = repl.adopted.entry(*origin).or_insert(0);
                    *f = (*f).max(*seq);
                } else {
                    repl.adopt(*origin, *seq, None);
                }
            }
            // A bucket whose first entry was there may have later ones past it: scans of it
            // start where the next segment does.
            let next = Loc {
                segment: next_segment,
                offset: 0,
            };
            for buckets in repl.buckets.values_mut() {
                for (loc, _) in buckets.values_mut() {
                    if loc.segment <= segment {
                        *loc = next;
                    }
                }
            }
        }
        let _no_readers = self.gc_gate.write().unwrap_or_else(|p| p.into_inner());
        // A hint only speeds up recovery; one left behind names a segment that is gone.
        let _ = self.log.storage().remove_hint(segment);
        self.log
            .remove_segment(segment)
            .map_err(|e| self.log_error(e))?;
        sealed_seen.remove(&segment);
        Ok(Collected::Deleted {
            segment,
            dropped,
            copied,
        })
    }

    /// The keys and numbers of one segment.
    fn contents_of(&self, segment: SegmentId) -> Result<Contents, StoreError> {
        let mut c = Contents {
            keys: BTreeMap::new(),
            numbered: BTreeMap::new(),
        };
        super::recovery::for_each_entry(&self.log, segment, |_, _, entry| match entry {
            LogEntry::Mutation { mutation, .. } => {
                let n = c.numbered.entry(mutation.origin).or_insert(0);
                *n = (*n).max(mutation.seq);
                c.keys.insert(mutation.key.digest(), mutation.key);
            }
            LogEntry::Image { key, .. } => {
                c.keys.insert(key.digest(), key);
            }
            // The floor written before the deletion keeps what these say.
            LogEntry::Reserve { .. }
            | LogEntry::Marks { .. }
            | LogEntry::Retired { .. }
            | LogEntry::Floor(_)
            | LogEntry::Local { .. } => {}
        })?;
        Ok(c)
    }

    /// A number of the segment above its origin's contiguous mark here, if any.
    fn above_mark(
        &self,
        segment: SegmentId,
        numbered: &BTreeMap<RegionId, u64>,
    ) -> Option<KeptBecause> {
        let marks = self.marks();
        let retired = self.retired_view();
        numbered
            .iter()
            .filter(|(origin, _)| !retired.0.contains_key(*origin))
            .find(|(origin, seq)| marks.get(*origin).copied().unwrap_or(0) < **seq)
            .map(|(origin, seq)| KeptBecause::AboveMark {
                segment,
                origin: *origin,
                seq: *seq,
            })
    }

    /// Whether a key may be dropped: its newest generation expired on every clock, it is
    /// stable here, and every item of it was resolved.
    fn reducible(
        &self,
        now_ms: u64,
        lsn: super::log::Lsn,
        expires_at_ms: u64,
        key: &RecordKey,
        record: &Record,
    ) -> bool {
        let drift = self.clock.config().max_drift_ms;
        if expires_at_ms.saturating_add(2 * drift) >= now_ms || !self.is_stable(lsn) {
            return false;
        }
        // No claim may still be running: each finished, or its lease ran out on every clock
        // (a lease can be extended past its generation's expiry).
        let running = record.claims().any(|(_, c)| {
            c.terminal.is_none() && c.lease_until_ms.saturating_add(2 * drift) >= now_ms
        });
        if running {
            return false;
        }
        let retired = self.retired_view();
        // The index's expiry ignores retirements; the generations are what counts.
        let newest = record
            .generations(&retired)
            .iter()
            .map(|g| g.expires_at_ms)
            .max();
        if newest.is_some_and(|x| x.saturating_add(2 * drift) >= now_ms) {
            return false;
        }
        record
            .items(key, self.item_context(now_ms, lsn, &retired))
            .iter()
            .all(|i| i.resolved)
    }

    /// Whether the chain from a key's newest entry at `loc` reaches `segment` (segments below
    /// it are gone already).
    fn chain_reaches(&self, mut loc: Loc, segment: SegmentId) -> Result<bool, StoreError> {
        loop {
            if loc.segment <= segment {
                return Ok(true);
            }
            match self.entry_at(loc)? {
                LogEntry::Mutation { prev: Some(p), .. } => loc = p,
                _ => return Ok(false),
            }
        }
    }

    /// Copies a live record forward into the active segment: one image when it fits in an
    /// entry, else its chain entry by entry (a record grown past the entry limit, say by many
    /// generations of large outcomes), relinked. Returns where its newest entry now lies.
    fn copy_forward(
        &self,
        loc: Loc,
        expires_at_ms: u64,
        key: &RecordKey,
        record: &Record,
    ) -> Result<Loc, StoreError> {
        let max = self.log.config().max_payload_bytes as usize;
        let image = entry::encode(&LogEntry::Image {
            key: key.clone(),
            record: record.clone(),
            expires_at_ms,
        });
        match image {
            Ok(bytes) if bytes.len() <= max => self.append_copy(&bytes),
            Ok(_) | Err(entry::EncodeError::TooLarge(_)) => {
                // The chain, newest first, then appended oldest first with new back-pointers.
                let mut chain = Vec::new();
                let mut at = Some(loc);
                while let Some(l) = at {
                    let e = self.entry_at(l)?;
                    at = match &e {
                        LogEntry::Mutation { prev, .. } => *prev,
                        _ => None,
                    };
                    chain.push(e);
                }
                let mut prev = None;
                for mut e in chain.into_iter().rev() {
                    if let LogEntry::Mutation { prev: p, .. } = &mut e {
                        *p = prev;
                    }
                    prev = Some(self.append_copy(&entry::encode(&e)?)?);
                }
                prev.ok_or_else(|| StoreError::Corrupt("an empty chain".into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn append_copy(&self, bytes: &[u8]) -> Result<Loc, StoreError> {
        self.log
            .append(bytes, AppendClass::Normal)
            .map(|(_, loc)| loc)
            .map_err(|e| self.log_error(e))
    }

    /// Appends the `Floor` entry that keeps, for recovery, what the deleted segments said.
    fn write_floor(&self, numbered: &BTreeMap<RegionId, u64>) -> Result<(), StoreError> {
        let mut marks: BTreeMap<RegionId, u64> = lock(&self.replication).adopted.clone();
        for (origin, seq) in numbered {
            let m = marks.entry(*origin).or_insert(0);
            *m = (*m).max(*seq);
        }
        let bytes = entry::encode(&LogEntry::Floor(entry::Floor {
            marks: marks.into_iter().collect(),
            reservation_ms: self.clock.reserved_ms(),
            max_hlc: self.clock.last_hlc(),
            retired: self.retirements().0.into_iter().collect(),
        }))?;
        self.log
            .append(&bytes, AppendClass::Reserved)
            .map_err(|e| self.log_error(e))?;
        Ok(())
    }
}
