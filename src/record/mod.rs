//! The replicated record of one key: claims, takeovers and resolutions, merged as a
//! join-semilattice, with generations, winners and compensation items derived from it.
//!
//! Pure: nothing here reads a clock, the arrival time or does I/O. Every region that holds the
//! same set of facts derives the same generations, winners and items.
//!
//! * [`key`]: what a record is keyed by and the digests derived from it.
//! * [`claim`]: one claim's facts, owner's chain and join.
//! * [`generation`]: derived generations and their winners.
//! * [`item`]: compensation items and resolutions.

pub mod claim;
mod claim_map;
pub mod generation;
pub mod item;
pub mod key;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use claim::{Body, ClaimFacts, ClaimState, ClaimStatus, Outcome, Terminal};
pub use generation::{Generation, Retirements};
pub use item::{Item, ItemContext, ItemKind, Resolution};
pub use key::{AttemptToken, Fingerprint, ItemId, KeyDigest, RecordKey};

/// Absolute bounds every delta must respect, whatever a namespace's policy says: peers are
/// untrusted, and every delta must fit in one log entry.
pub mod limits {
    /// Largest stored outcome (headers and body), bytes.
    pub const OUTCOME_BYTES_MAX: usize = 8 << 20;
    /// Most headers on a stored outcome.
    pub const HEADERS_MAX: usize = 64;
    /// Longest TTL a claim may carry (30 days), ms.
    pub const TTL_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
    /// Longest lease past its claim's stamp a claim may carry or be extended to (7 days), ms.
    pub const LEASE_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
    /// Most claims one claim may take over.
    pub const TAKEOVERS_MAX: usize = 64;
    /// Longest `by` and `provider_ref` of a resolution, bytes.
    pub const RESOLUTION_NAME_MAX: usize = 256;
    /// Longest `note` and `hook_result` of a resolution, bytes.
    pub const RESOLUTION_TEXT_MAX: usize = 4096;
}

use crate::clock::Stamp;

/// One replicated change to a record. A record is the join of all its deltas.
///
/// bincode has no field defaults: an existing variant never gains a field; new kinds of change
/// are new variants at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    /// A new claim, written by its owner (which also fixes its takeover, if any).
    Claim {
        /// The claim's identity.
        stamp: Stamp,
        /// What the owner fixed.
        facts: ClaimFacts,
    },
    /// The owner extended the lease.
    Extend {
        /// The claim.
        stamp: Stamp,
        /// New lease end, Unix ms.
        lease_until_ms: u64,
    },
    /// The owner's terminal write.
    Finish {
        /// The claim.
        stamp: Stamp,
        /// Released, Completed or Indeterminate.
        terminal: Terminal,
    },
    /// An operator or hook handled a compensation item.
    Resolve(Resolution),
}

impl Delta {
    /// The claim this delta is about (for a resolution: the stamp of the resolution itself).
    pub fn stamp(&self) -> Stamp {
        match self {
            Delta::Claim { stamp, .. }
            | Delta::Extend { stamp, .. }
            | Delta::Finish { stamp, .. } => *stamp,
            Delta::Resolve(r) => r.at,
        }
    }

    /// Checks what merge relies on, and the absolute [`limits`]. Peers are untrusted: a delta
    /// that fails is rejected whole.
    pub fn validate(&self) -> Result<(), InvalidDelta> {
        match self {
            Delta::Claim { stamp, facts } => {
                if facts.ttl_ms == 0 || facts.ttl_ms > limits::TTL_MS_MAX {
                    return Err(InvalidDelta::Limit("ttl_ms"));
                }
                if facts.lease_ms == 0 || facts.lease_ms > limits::LEASE_MS_MAX {
                    return Err(InvalidDelta::Limit("lease_ms"));
                }
                if facts.takes_over.len() > limits::TAKEOVERS_MAX {
                    return Err(InvalidDelta::Limit("takes_over"));
                }
                if !facts.takes_over.windows(2).all(|w| w[0] < w[1]) {
                    return Err(InvalidDelta::TakeoversUnordered);
                }
                if let Some(victim) = facts.takes_over.last() {
                    if victim >= stamp {
                        return Err(InvalidDelta::TakeoverNotLater {
                            taker: *stamp,
                            victim: *victim,
                        });
                    }
                }
                Ok(())
            }
            Delta::Extend {
                stamp,
                lease_until_ms,
            } => {
                if *lease_until_ms > stamp.physical_ms().saturating_add(limits::LEASE_MS_MAX) {
                    return Err(InvalidDelta::Limit("lease_until_ms"));
                }
                Ok(())
            }
            Delta::Finish { terminal, .. } => match terminal.outcome() {
                Some(o) if o.size_bytes() > limits::OUTCOME_BYTES_MAX => {
                    Err(InvalidDelta::Limit("outcome"))
                }
                Some(o) if o.headers.len() > limits::HEADERS_MAX => {
                    Err(InvalidDelta::Limit("headers"))
                }
                _ => Ok(()),
            },
            Delta::Resolve(r) => {
                if r.by.len() > limits::RESOLUTION_NAME_MAX
                    || r.provider_ref
                        .as_ref()
                        .is_some_and(|p| p.len() > limits::RESOLUTION_NAME_MAX)
                {
                    return Err(InvalidDelta::Limit("resolution name"));
                }
                if r.note.len() > limits::RESOLUTION_TEXT_MAX
                    || r.hook_result
                        .as_ref()
                        .is_some_and(|h| h.len() > limits::RESOLUTION_TEXT_MAX)
                {
                    return Err(InvalidDelta::Limit("resolution text"));
                }
                Ok(())
            }
        }
    }
}

/// Why a delta was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDelta {
    /// A takeover must have a larger stamp than its victim (so takeovers never form cycles).
    #[error("takeover by {taker:?} of {victim:?}: the taker must be later")]
    TakeoverNotLater {
        /// The taking claim.
        taker: Stamp,
        /// The claim it names.
        victim: Stamp,
    },
    /// A claim's takeovers must be listed ascending, without repeats (so equal facts encode
    /// equally).
    #[error("takeovers must be ascending and distinct")]
    TakeoversUnordered,
    /// A value is outside the absolute limits (see [`limits`]).
    #[error("{0} outside the absolute limits")]
    Limit(&'static str),
}

/// A key's whole replicated state: every claim of every generation, and the resolutions.
///
/// Merge ([`Record::merge`], [`Record::apply`]) is commutative, associative and idempotent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    claims: claim_map::ClaimMap,
    resolutions: BTreeMap<(ItemId, Stamp), Resolution>,
}

impl Record {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the record holds nothing.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.resolutions.is_empty()
    }

    /// Applies one delta. Returns whether the record changed (false for a duplicate).
    pub fn apply(&mut self, delta: &Delta) -> Result<bool, InvalidDelta> {
        delta.validate()?;
        Ok(match delta {
            Delta::Claim { stamp, facts } => {
                if crate::mutants::active(crate::mutants::Mutant::MergeKeepsOnlyWinner)
                    && self
                        .claims()
                        .any(|(s, c)| s < stamp && c.facts.is_some() && !c.released())
                {
                    return Ok(false);
                }
                let mut changed = false;
                for victim in &facts.takes_over {
                    changed |= self.claims.get_or_default(*victim).1;
                }
                changed
                    | self
                        .claims
                        .get_or_default(*stamp)
                        .0
                        .set_facts(stamp, facts.clone())
            }
            Delta::Extend {
                stamp,
                lease_until_ms,
            } => {
                let (c, fresh) = self.claims.get_or_default(*stamp);
                fresh | c.raise_lease(*lease_until_ms)
            }
            Delta::Finish { stamp, terminal } => {
                let (c, fresh) = self.claims.get_or_default(*stamp);
                fresh | c.set_terminal(terminal.clone())
            }
            Delta::Resolve(r) => match self.resolutions.get(&(r.item, r.at)) {
                // Same rule as merge: keep the larger of two resolutions with one (item, stamp).
                Some(old) if old >= r => false,
                _ => {
                    self.resolutions.insert((r.item, r.at), r.clone());
                    true
                }
            },
        })
    }

    /// Joins another replica's record of the same key into this one. Returns whether this
    /// record changed.
    pub fn merge(&mut self, other: &Record) -> bool {
        let mut changed = false;
        for (stamp, state) in other.claims.iter() {
            match self.claims.get_mut(stamp) {
                Some(mine) => changed |= mine.join(stamp, state),
                None => {
                    self.claims.insert(*stamp, state.clone());
                    changed = true;
                }
            }
        }
        for (k, r) in &other.resolutions {
            match self.resolutions.get(k) {
                // Two resolutions with the same (item, stamp) come from the same write; keep
                // the larger if a buggy peer sent two, so merge stays order-free.
                Some(mine) if mine >= r => {}
                _ => {
                    self.resolutions.insert(*k, r.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// Sets the `origin_seq` of a claim's facts: the store numbers a local claim only once its
    /// log entry is placed, after applying it. Nothing else may change facts.
    pub(crate) fn set_origin_seq(&mut self, stamp: &Stamp, seq: u64) {
        if let Some(f) = self.claims.get_mut(stamp).and_then(|c| c.facts.as_mut()) {
            f.origin_seq = seq;
        }
    }

    /// The claims, in stamp order.
    pub fn claims(&self) -> impl DoubleEndedIterator<Item = (&Stamp, &ClaimState)> {
        self.claims.iter()
    }

    /// One claim.
    pub fn claim(&self, stamp: &Stamp) -> Option<&ClaimState> {
        self.claims.get(stamp)
    }

    /// Empties the record, keeping its claims' allocation for reuse.
    pub fn clear(&mut self) {
        self.claims.clear();
        self.resolutions.clear();
    }

    /// Claims the record can hold without allocating.
    pub fn claim_capacity(&self) -> usize {
        self.claims.capacity()
    }

    /// The number of claims, placeholders included.
    pub fn claim_count(&self) -> usize {
        self.claims.len()
    }

    /// All resolutions, by item then stamp.
    pub fn resolutions(&self) -> impl Iterator<Item = &Resolution> {
        self.resolutions.values()
    }

    /// Resolutions of one item.
    pub fn resolutions_of(&self, item: ItemId) -> impl Iterator<Item = &Resolution> {
        self.resolutions
            .iter()
            .filter(move |((i, _), _)| *i == item)
            .map(|(_, r)| r)
    }

    /// Claims whose owners wrote two different facts or terminal writes: each is an alarm.
    pub fn alarms(&self) -> impl Iterator<Item = &Stamp> {
        self.claims
            .iter()
            .filter(|(_, c)| c.conflict)
            .map(|(s, _)| s)
    }

    /// The record as the list of deltas that rebuild it (claims first, then their later writes,
    /// then resolutions): what a snapshot stream ships.
    pub fn to_deltas(&self) -> Vec<Delta> {
        let mut out = Vec::new();
        for (stamp, c) in self.claims.iter() {
            if let Some(f) = &c.facts {
                out.push(Delta::Claim {
                    stamp: *stamp,
                    facts: f.clone(),
                });
            }
            let initial = c
                .facts
                .as_ref()
                .map(|f| stamp.physical_ms().saturating_add(f.lease_ms))
                .unwrap_or(0);
            if c.lease_until_ms > initial || c.facts.is_none() {
                out.push(Delta::Extend {
                    stamp: *stamp,
                    lease_until_ms: c.lease_until_ms,
                });
            }
            if let Some(t) = &c.terminal {
                out.push(Delta::Finish {
                    stamp: *stamp,
                    terminal: t.clone(),
                });
            }
        }
        out.extend(self.resolutions.values().cloned().map(Delta::Resolve));
        out
    }
}

#[cfg(test)]
mod tests;
