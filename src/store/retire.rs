//! Retiring a region lost for good (design section 2).
//!
//! An operator writes `Retired{region, last_seq}` at a surviving region: nothing of the lost
//! region's log numbered above `last_seq` counts any more. Its claims numbered above it are
//! *orphans* (never eligible, always an `Orphan` item); stability stops waiting for its digests
//! and asks only that this region hold its log up to `last_seq`. The fact is a log entry
//! (`LogEntry::Retired`), replayed by recovery and hint files, and travels to every region in
//! the replica's `Retired` messages, sent with each anti-entropy round once durable.
//!
//! Two retirements of one region join by the larger `last_seq`: it orphans fewer claims, so a
//! claim some region already counted is never orphaned by a later, smaller one, and every
//! region ends with the same set (two operators retiring one region at two regions is the one
//! way to get there: retire at one region only). Locally, `last_seq` must be the contiguous
//! prefix of the region's log held here (numbers nobody holds would hold stability back for
//! ever; fewer would orphan claims this region holds), and a retirement is written once:
//! retire at the survivor that holds the most of it. Claims other survivors hold above that
//! number become orphans even if they replayed them: the number is the operator's to choose
//! well (the simulator's operator takes the largest mark of any survivor; then only claims a
//! survivor holds above a gap nobody can fill can be orphaned). Regions never raise a
//! retirement they hear of: a region wrongly taken for lost keeps writing its log, and raising
//! would follow that log and orphan nothing. A region that learns it was itself retired grants
//! no new claim again ([`Unavailable::Retired`]); it rejoins only as a new region, with a new
//! region id and an empty data directory.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::entry::{self, LogEntry};
use super::log::{AppendClass, Lsn};
use super::storage::Storage;
use super::{lock, Pending, Store, StoreError, Unavailable, SEQ_MAX};
use crate::clock::RegionId;
use crate::record::Retirements;

/// No region retired: what readers see until the first retirement.
static NONE: Retirements = Retirements(BTreeMap::new());

/// The store's retirements: the joined facts, and each entry that raised one.
#[derive(Debug, Default)]
pub(super) struct RetiredState {
    /// Every retirement appended here (durable or not), for decisions.
    pub(super) all: Arc<Retirements>,
    /// Per region, (lsn, last_seq) of each entry that raised it, in log order: the durable
    /// value is the last one at or below the durable lsn.
    raised: BTreeMap<RegionId, Vec<(Lsn, u64)>>,
}

impl RetiredState {
    /// Joins a retirement in; returns whether it changed anything.
    pub(super) fn join(&mut self, region: RegionId, last_seq: u64, lsn: Lsn) -> bool {
        if self.all.0.get(&region).is_some_and(|l| *l >= last_seq) {
            return false;
        }
        Arc::make_mut(&mut self.all).0.insert(region, last_seq);
        self.raised.entry(region).or_default().push((lsn, last_seq));
        true
    }

    /// The retirements durable at `durable_lsn`.
    fn durable(&self, durable_lsn: Lsn) -> Retirements {
        Retirements(
            self.raised
                .iter()
                .filter_map(|(region, v)| {
                    v.iter()
                        .rev()
                        .find(|(lsn, _)| *lsn <= durable_lsn)
                        .map(|(_, last)| (*region, *last))
                })
                .collect(),
        )
    }
}

/// A read-only view of the retirements, cheap when none exist (the common case): the claim
/// path takes no lock for it.
pub(super) enum RetiredView {
    /// No region retired.
    None,
    /// A snapshot of the retirements.
    Some(Arc<Retirements>),
}

impl Deref for RetiredView {
    type Target = Retirements;
    fn deref(&self) -> &Retirements {
        match self {
            RetiredView::None => &NONE,
            RetiredView::Some(r) => r,
        }
    }
}

impl<S: Storage> Store<S> {
    /// The retirements decisions and item derivation use (appended ones, durable or not).
    pub(super) fn retired_view(&self) -> RetiredView {
        if !self.any_retired.load(Ordering::Acquire) {
            return RetiredView::None;
        }
        RetiredView::Some(lock(&self.retired).all.clone())
    }

    /// Every retirement appended here (durable or not).
    pub fn retirements(&self) -> Retirements {
        (*self.retired_view()).clone()
    }

    /// The retirements that are durable here: what the replica tells its peers.
    pub fn durable_retirements(&self) -> Retirements {
        lock(&self.retired).durable(self.log.durable_lsn())
    }

    /// Whether a peer told this region that it was itself retired: it grants no new claim.
    pub fn is_retired_here(&self) -> bool {
        self.retired_here.load(Ordering::Acquire)
    }

    /// Retires `region`, lost for good: its log counts up to `last_seq`, its later claims are
    /// orphans and stability stops waiting for it. For the operator, once, at the surviving
    /// region that holds the most of the lost region's log. `last_seq` must be exactly the
    /// contiguous prefix of that log held here ([`StoreError::RetireNotAtMark`] says it): a
    /// smaller number would orphan claims this region holds, which may already have won
    /// here, and a larger one names numbers nobody may hold. A region retired already is
    /// refused ([`StoreError::RetireAgain`]) unless at the same number (then nothing
    /// changes): raising a retirement would turn orphans whose items were shown actionable
    /// back into claims. Returns whether it changed anything; like every answer, it counts
    /// once the log is durable up to the returned lsn.
    pub fn retire(&self, region: RegionId, last_seq: u64) -> Result<Pending<bool>, StoreError> {
        if region == self.region {
            return Err(StoreError::RetireSelf);
        }
        if let Some(existing) = self.retired_view().0.get(&region).copied() {
            if existing == last_seq {
                return Ok(Pending {
                    lsn: 0,
                    value: false,
                });
            }
            return Err(StoreError::RetireAgain {
                region,
                last_seq: existing,
            });
        }
        let held = self.marks().get(&region).copied().unwrap_or(0);
        if last_seq != held {
            return Err(StoreError::RetireNotAtMark {
                region,
                last_seq,
                held,
            });
        }
        self.append_retired(region, last_seq)
    }

    /// A peer's `Retired` fact. Joined in like a local one, without the holding check (the
    /// region that wrote it held the log up to `last_seq`; this one fetches the rest). When it
    /// names this region, the region stops granting claims for good.
    pub fn retire_from_peer(
        &self,
        region: RegionId,
        last_seq: u64,
    ) -> Result<Pending<bool>, StoreError> {
        self.append_retired(region, last_seq)
    }

    fn append_retired(&self, region: RegionId, last_seq: u64) -> Result<Pending<bool>, StoreError> {
        if last_seq > SEQ_MAX {
            return Err(StoreError::Invalid(format!(
                "retirement of {region} at seq {last_seq} beyond {SEQ_MAX}"
            )));
        }
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        if self
            .retired_view()
            .0
            .get(&region)
            .is_some_and(|l| *l >= last_seq)
        {
            return Ok(Pending {
                lsn: 0,
                value: false,
            });
        }
        let bytes = entry::encode(&LogEntry::Retired { region, last_seq })?;
        // Under the lock, so entries and the joined state follow the same order.
        let mut r = lock(&self.retired);
        let (lsn, _) = self
            .log
            .append(&bytes, AppendClass::Reserved)
            .map_err(|e| self.log_error(e))?;
        let changed = r.join(region, last_seq, lsn);
        drop(r);
        self.note_retired(region);
        Ok(Pending {
            lsn,
            value: changed,
        })
    }

    /// After a retirement was joined in (appended or recovered).
    pub(super) fn note_retired(&self, region: RegionId) {
        self.any_retired.store(true, Ordering::Release);
        if region == self.region {
            self.retired_here.store(true, Ordering::Release);
        }
    }
}
