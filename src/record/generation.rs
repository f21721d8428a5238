//! Generations and winners, derived from a record and never stored.
//!
//! The anchor of a generation is its smallest stamp; it expires at the anchor's physical time
//! plus the anchor's TTL; the first stamp at or past that expiry anchors the next generation.
//! The winner of a generation is its smallest *eligible* claim: not a placeholder, not
//! released, not an orphan of a retired region, and not taken over by a takeover in force.
//!
//! A takeover (taker `t` names victim `v`) is in force when `t` is not released, `t` is not an
//! orphan, and `t` and `v` fall in the same generation. A takeover that spans generations is
//! void: the victim's generation must keep an eligible claim if it executed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{ClaimState, Record};
use crate::clock::{RegionId, Stamp};

/// Regions an operator retired for good, with the last sequence number of theirs that counts.
/// Claims of a retired region created after that point are orphans: never eligible.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retirements(pub BTreeMap<RegionId, u64>);

impl Retirements {
    /// No region retired.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether a claim of `region` created at its sequence number `seq` is an orphan.
    pub fn is_orphan(&self, region: &RegionId, seq: u64) -> bool {
        self.0.get(region).is_some_and(|last| seq > *last)
    }
}

/// One derived generation of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Its smallest stamp.
    pub anchor: Stamp,
    /// Unix ms at which it expires: anchor's physical time plus the anchor's TTL.
    pub expires_at_ms: u64,
    /// Every stamp in it, ascending (placeholders included).
    pub stamps: Vec<Stamp>,
    /// Claims taken over by a takeover in force, with their (smallest) taker.
    pub taken_over: BTreeMap<Stamp, Stamp>,
    /// Orphan claims of retired regions.
    pub orphans: BTreeSet<Stamp>,
    /// The smallest eligible claim, if any.
    pub winner: Option<Stamp>,
}

impl Generation {
    /// Whether `stamp` is eligible to win in this generation.
    pub fn eligible(&self, record: &Record, stamp: &Stamp) -> bool {
        record
            .claim(stamp)
            .is_some_and(|c| self.eligible_state(stamp, c))
    }

    fn eligible_state(&self, stamp: &Stamp, c: &ClaimState) -> bool {
        c.facts.is_some()
            && !c.released()
            && !self.orphans.contains(stamp)
            && (!self.taken_over.contains_key(stamp)
                || (crate::mutants::active(crate::mutants::Mutant::LateCompletionWins)
                    && c.executed()))
    }

    /// Whether a claim at physical time `ms` would still fall in this generation.
    pub fn covers_ms(&self, ms: u64) -> bool {
        ms < self.expires_at_ms
    }
}

impl Record {
    /// The generations of this record, oldest first, with their winners.
    ///
    /// Orphans of retired regions shape nothing: generations are partitioned from the other
    /// claims alone, then each orphan joins the generation that covers its stamp, else the
    /// next generation if the orphan's TTL reaches that generation's anchor, else a generation
    /// of orphans only (no winner: its items are never actionable). Placeholders of a retired
    /// region are placed the same way. An orphan arriving late (from a region that was
    /// cut off and retired) therefore never moves another claim to another generation, so it
    /// cannot change a key that was already stable.
    pub fn generations(&self, retired: &Retirements) -> Vec<Generation> {
        let orphan = |stamp: &Stamp, c: &ClaimState| {
            c.facts
                .as_ref()
                .is_some_and(|f| retired.is_orphan(&stamp.region, f.origin_seq))
        };
        // A placeholder anchors with the smallest TTL among the claims that took it over
        // (orphans' takeovers never count).
        let mut taker_ttl: BTreeMap<Stamp, u64> = BTreeMap::new();
        for (stamp, c) in self.claims() {
            if let Some(f) = c.facts.as_ref().filter(|_| !orphan(stamp, c)) {
                for v in &f.takes_over {
                    let t = taker_ttl.entry(*v).or_insert(f.ttl_ms);
                    *t = (*t).min(f.ttl_ms);
                }
            }
        }
        let new_generation = |anchor: Stamp, ttl: u64| Generation {
            anchor,
            expires_at_ms: anchor.physical_ms().saturating_add(ttl),
            stamps: Vec::new(),
            taken_over: BTreeMap::new(),
            orphans: BTreeSet::new(),
            winner: None,
        };
        // Partition the other stamps greedily by anchor + TTL.
        let mut gens: Vec<Generation> = Vec::new();
        // Stamps placed afterwards: (stamp, ttl, whether an orphan).
        let mut placed: Vec<(Stamp, u64, bool)> = Vec::new();
        for (stamp, c) in self.claims() {
            let ttl = match &c.facts {
                Some(f) if orphan(stamp, c) => {
                    placed.push((*stamp, f.ttl_ms, true));
                    continue;
                }
                Some(f) => f.ttl_ms,
                None => match taker_ttl.get(stamp) {
                    // A placeholder of a retired region shapes nothing either: once this region
                    // holds that log up to the retirement (stability waits for it), a claim
                    // whose facts are still missing can only be an orphan.
                    Some(t) if retired.0.contains_key(&stamp.region) => {
                        placed.push((*stamp, *t, false));
                        continue;
                    }
                    Some(t) => *t,
                    None => continue, // later writes of a claim not yet known: invisible for now
                },
            };
            let opens = gens
                .last()
                .is_none_or(|g| !g.covers_ms(stamp.physical_ms()));
            if opens {
                gens.push(new_generation(*stamp, ttl));
            }
            gens.last_mut().expect("pushed").stamps.push(*stamp);
        }
        // Orphans join the generation covering them, else generations of orphans only.
        let mut orphan_gens: Vec<Generation> = Vec::new();
        for (stamp, ttl, is_orphan) in placed {
            let ms = stamp.physical_ms();
            // The generation covering it; else the next one, if the orphan's own TTL reaches
            // its anchor (the generation it would have opened had it counted).
            let covering = gens
                .iter()
                .rposition(|g| g.anchor <= stamp)
                .filter(|i| gens[*i].covers_ms(ms));
            let next = || {
                gens.iter().position(|g| {
                    g.anchor > stamp && g.anchor.physical_ms() < ms.saturating_add(ttl)
                })
            };
            let home = covering.or_else(next).map(|i| &mut gens[i]);
            let g = match home {
                Some(g) => g,
                None => {
                    if orphan_gens.last().is_none_or(|g| !g.covers_ms(ms)) {
                        orphan_gens.push(new_generation(stamp, ttl));
                    }
                    orphan_gens.last_mut().expect("pushed")
                }
            };
            g.stamps.push(stamp);
            if is_orphan {
                g.orphans.insert(stamp);
            }
        }
        if !orphan_gens.is_empty() {
            gens.extend(orphan_gens);
            gens.sort_by_key(|g| g.anchor);
        }
        let mut gen_of: BTreeMap<Stamp, usize> = BTreeMap::new();
        for (i, g) in gens.iter_mut().enumerate() {
            g.stamps.sort_unstable();
            for s in &g.stamps {
                gen_of.insert(*s, i);
            }
        }
        // Takeovers in force.
        for (taker, c) in self.claims() {
            let Some(f) = &c.facts else { continue };
            let Some(&gt) = gen_of.get(taker) else {
                continue;
            };
            let released = c.released()
                && !crate::mutants::active(crate::mutants::Mutant::TakeoverOutlivesRelease);
            if released || gens[gt].orphans.contains(taker) {
                continue;
            }
            for victim in &f.takes_over {
                if gen_of.get(victim) == Some(&gt) {
                    gens[gt].taken_over.entry(*victim).or_insert(*taker);
                }
            }
        }
        for g in &mut gens {
            let eligible = |s: &&Stamp| self.claim(s).is_some_and(|c| g.eligible_state(s, c));
            g.winner = if crate::mutants::active(crate::mutants::Mutant::WinnerLargestStamp) {
                g.stamps.iter().rev().find(eligible).copied()
            } else {
                g.stamps.iter().find(eligible).copied()
            };
        }
        gens
    }

    /// Expiry (Unix ms) of the newest generation, without building the generations: what the
    /// index keeps per key, computed on every write. Same partition rule as
    /// [`Record::generations`] (a test checks they agree).
    pub fn newest_expiry_ms(&self) -> Option<u64> {
        let placeholders = self.claims().any(|(_, c)| c.facts.is_none());
        let mut expiry: Option<u64> = None;
        for (stamp, c) in self.claims() {
            let ttl = match &c.facts {
                Some(f) => f.ttl_ms,
                None if placeholders => match self
                    .claims()
                    .filter_map(|(_, t)| t.facts.as_ref())
                    .filter(|f| f.takes_over.contains(stamp))
                    .map(|f| f.ttl_ms)
                    .min()
                {
                    Some(t) => t,
                    None => continue,
                },
                None => continue,
            };
            if expiry.is_none_or(|x| stamp.physical_ms() >= x) {
                expiry = Some(stamp.physical_ms().saturating_add(ttl));
            }
        }
        expiry
    }

    /// The generation holding `stamp`, if the stamp is in the record.
    pub fn generation_of(&self, retired: &Retirements, stamp: &Stamp) -> Option<Generation> {
        self.generations(retired)
            .into_iter()
            .find(|g| g.stamps.binary_search(stamp).is_ok())
    }
}
