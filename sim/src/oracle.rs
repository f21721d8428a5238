//! The oracle: its own log of what clients did and saw, and the checks run against the
//! regions at the end of a run.
//!
//! It never calls the project's winner or item functions: the expected winner of a key is the
//! smallest stamp by the oracle's own comparison (physical-and-logical clock value, then region
//! name) among the claims neither released nor taken over by an unreleased claim, and the
//! expected items are the other claims that were not released.
//!
//! When a region is lost for good, each of its claims has a [`Fate`], read from the
//! survivors' records at the end: held (it counts), an orphan (numbered past the retirement:
//! never the winner, always an `Orphan` item), or lost with the region (no survivor ever got
//! it: nobody can know of it, so it neither wins nor is an item).

use std::collections::BTreeMap;

use idem::clock::Stamp;
use idem::record::{Fingerprint, Item, ItemKind, Outcome};

/// One violated check, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which check (S1, S3, S6, S7, L1, ...).
    pub check: &'static str,
    /// The key involved, if any.
    pub key: Option<u64>,
    /// What was expected and what was found.
    pub detail: String,
}

/// A claim the oracle knows of: granted to a client (which got `Execute`), or made durable by
/// a region whose answer a crash lost (a *ghost*: its client never ran it).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The claim.
    pub stamp: Stamp,
    /// The payload's fingerprint.
    pub fingerprint: Fingerprint,
    /// The region that granted it.
    pub region: usize,
    /// Whether a client got `Execute` for it.
    pub executed: bool,
    /// Whether its client performed the side effect (ran the operation).
    pub side_effect: bool,
    /// Whether its release was acknowledged.
    pub released: bool,
    /// The outcome the client stored, once its completion was acknowledged.
    pub completed: Option<Outcome>,
    /// Simulated time of that acknowledgement, ms.
    pub completed_at_ms: Option<u64>,
    /// Simulated time of the grant, ms.
    pub at_ms: u64,
    /// What became of it if its region was lost for good.
    pub fate: Fate,
}

/// What became of a claim of a region lost for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fate {
    /// Its region lives, or the survivors hold it within the retirement: it counts.
    #[default]
    Held,
    /// Survivors hold it, numbered past the retirement's last number.
    Orphan,
    /// No survivor holds it: it was lost with its region.
    Lost,
}

/// What the oracle knows.
#[derive(Debug, Default)]
pub struct Oracle {
    /// Grants per key.
    pub grants: BTreeMap<u64, Vec<Grant>>,
    /// Takeovers per key, as `Execute` answers listed them: (taker, victim).
    pub takeovers: BTreeMap<u64, Vec<(Stamp, Stamp)>>,
    /// Replays clients got: (key, region, outcome).
    pub replays: Vec<(u64, usize, Outcome)>,
    /// The last replay each region gave for each key: (claim, outcome).
    pub last_replay: BTreeMap<(u64, usize), (Stamp, Outcome, bool)>,
    /// Mismatch answers clients got: (key, region, fingerprint sent).
    pub mismatches: Vec<(u64, usize, Fingerprint)>,
    /// Items a region showed as actionable, by (key, claim, region): when first shown, and
    /// the winner the item named.
    pub actionable: BTreeMap<(u64, Stamp, usize), (u64, Option<Stamp>)>,
    /// Violations found so far.
    pub violations: Vec<Violation>,
    /// Outcomes whose acknowledged completion was lost with its region: replays of them before
    /// the loss were not invented.
    lost_outcomes: Vec<(u64, Outcome)>,
    /// S10 findings, with the claim replayed first and whether the finding may be excused:
    /// it stands unless that claim turns out an orphan and the region that replayed it had
    /// not heard of the retirement then (a region cut off and retired replays its own claims
    /// until it hears of it).
    s10: Vec<(u64, Stamp, bool, Violation)>,
}

/// The oracle's own order of stamps: clock value, then region name.
pub fn earlier(a: &Stamp, b: &Stamp) -> bool {
    (a.hlc, a.region.as_str()) < (b.hlc, b.region.as_str())
}

impl Oracle {
    fn grant_mut(&mut self, key: u64, stamp: &Stamp) -> Option<&mut Grant> {
        self.grants
            .get_mut(&key)
            .and_then(|gs| gs.iter_mut().find(|g| g.stamp == *stamp))
    }

    /// Whether the oracle knows `stamp` as a claim of `key`.
    pub fn knows(&self, key: u64, stamp: &Stamp) -> bool {
        self.grants
            .get(&key)
            .is_some_and(|gs| gs.iter().any(|g| g.stamp == *stamp))
    }

    /// Records an `Execute` that is not a resumed claim, with the claims it took over.
    ///
    /// Checks S4 (no second live `Execute` for a key in one region: every earlier claim of the
    /// key granted by the same region was completed, released or taken over) and S9 (a region never
    /// issues a stamp twice).
    pub fn granted(&mut self, key: u64, g: Grant, took_over: &[Stamp]) {
        for (k, gs) in &self.grants {
            if gs.iter().any(|o| o.stamp == g.stamp) {
                self.violations.push(Violation {
                    check: "S9",
                    key: Some(key),
                    detail: format!(
                        "region {} issued {:?} again (first for key {k})",
                        g.region, g.stamp
                    ),
                });
            }
        }
        let takes = self.takeovers.entry(key).or_default();
        for v in took_over {
            takes.push((g.stamp, *v));
        }
        let takes = &self.takeovers[&key];
        let live: Vec<Stamp> = self
            .grants
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|o| o.region == g.region && !o.released && o.completed.is_none())
            .filter(|o| !takes.iter().any(|(_, v)| *v == o.stamp))
            .map(|o| o.stamp)
            .collect();
        for o in live {
            self.violations.push(Violation {
                check: "S4",
                key: Some(key),
                detail: format!(
                    "region {} granted {:?} while its claim {o:?} was neither released nor \
                     taken over",
                    g.region, g.stamp
                ),
            });
        }
        for v in took_over {
            if !self.knows(key, v) {
                self.violations.push(Violation {
                    check: "S4",
                    key: Some(key),
                    detail: format!("{:?} took over {v:?}, which no region granted", g.stamp),
                });
            }
        }
        self.grants.entry(key).or_default().push(g);
    }

    /// Records a ghost: a claim a region made durable whose answer a crash lost (found in the
    /// region's recovered store by its attempt token).
    pub fn ghost(&mut self, key: u64, g: Grant) {
        if !self.knows(key, &g.stamp) {
            self.grants.entry(key).or_default().push(g);
        }
    }

    /// A client got `Execute` for a claim the oracle knew as a ghost (it re-sent the attempt
    /// token after a crash lost the first answer).
    pub fn resumed(&mut self, key: u64, stamp: &Stamp) {
        if let Some(g) = self.grant_mut(key, stamp) {
            g.executed = true;
        }
    }

    /// The client of a granted claim performed its side effect.
    pub fn side_effect(&mut self, key: u64, stamp: &Stamp) {
        if let Some(g) = self.grant_mut(key, stamp) {
            g.side_effect = true;
        }
    }

    /// Records an acknowledged completion.
    pub fn completed(&mut self, key: u64, stamp: Stamp, outcome: Outcome, at_ms: u64) {
        if let Some(g) = self.grant_mut(key, &stamp) {
            g.completed = Some(outcome);
            g.completed_at_ms.get_or_insert(at_ms);
        }
    }

    /// A client got a replay of `claim` from `region`. Checks S10: a region's replayed claim
    /// of a key changes only to a smaller claim (one arrived from elsewhere) or away from a
    /// claim that was taken over, and a claim's replayed outcome never changes.
    /// `excusable`: whether the region had not heard of a retirement of the replayed claim's
    /// region when it replayed it.
    pub fn replayed(
        &mut self,
        key: u64,
        region: usize,
        claim: Stamp,
        outcome: Outcome,
        excusable: bool,
    ) {
        if let Some((before, was, before_excusable)) = self.last_replay.get(&(key, region)) {
            let detail = if *before == claim && *was != outcome {
                Some(format!(
                    "region {region} replayed {claim:?} with another outcome: {was:?}, then \
                     {outcome:?}"
                ))
            } else if *before != claim && !earlier(&claim, before) && !self.taken_over(key, before)
            {
                Some(format!(
                    "region {region} replayed {before:?}, then the later {claim:?}, though \
                     {before:?} was not taken over"
                ))
            } else {
                None
            };
            if let Some(detail) = detail {
                let v = Violation {
                    check: "S10",
                    key: Some(key),
                    detail,
                };
                self.s10.push((key, *before, *before_excusable, v));
            }
        }
        self.replays.push((key, region, outcome.clone()));
        self.last_replay
            .insert((key, region), (claim, outcome, excusable));
    }

    /// Region `region` showed `item` of `key` as actionable at `at_ms`.
    pub fn actionable_seen(&mut self, key: u64, region: usize, at_ms: u64, item: &Item) {
        self.actionable
            .entry((key, item.claim, region))
            .or_insert((at_ms, item.winner));
    }

    /// S11, once the run converged: no item shown as actionable belongs to a claim that ends up
    /// winning, names a winner other than the final one, or was shown before that winner's
    /// completion was acknowledged.
    pub fn check_actionable(&mut self) {
        let mut found = Vec::new();
        for ((key, claim, region), (at, named)) in &self.actionable {
            let fin = self.winner(*key).map(|w| (w.stamp, w.completed_at_ms));
            let detail = match fin {
                Some((w, _)) if w == *claim => Some(format!(
                    "region {region} showed the item of {claim:?} as actionable at {at}; it wins"
                )),
                Some((w, _)) if Some(w) != *named => Some(format!(
                    "region {region} showed {claim:?} as actionable at {at} under winner \
                     {named:?}; the winner is {w:?}"
                )),
                Some((w, done)) if done.is_none_or(|d| d > *at) => Some(format!(
                    "region {region} showed {claim:?} as actionable at {at}, before its winner \
                     {w:?} completed ({done:?})"
                )),
                None => Some(format!(
                    "region {region} showed {claim:?} as actionable at {at}; no claim wins"
                )),
                _ => None,
            };
            if let Some(detail) = detail {
                found.push(Violation {
                    check: "S11",
                    key: Some(*key),
                    detail,
                });
            }
        }
        self.violations.extend(found);
    }

    /// Sets what became of a claim of a region lost for good.
    pub fn set_fate(&mut self, key: u64, stamp: &Stamp, fate: Fate) {
        if let Some(g) = self.grant_mut(key, stamp) {
            g.fate = fate;
        }
    }

    /// A claim's acknowledged completion or release was lost with its region (never shipped
    /// before the region was lost for good): the claim counts as still in flight.
    pub fn forget_finish(&mut self, key: u64, stamp: &Stamp) {
        let mut lost = None;
        if let Some(g) = self.grant_mut(key, stamp) {
            lost = g.completed.take();
            g.completed_at_ms = None;
            g.released = false;
        }
        if let Some(o) = lost {
            self.lost_outcomes.push((key, o));
        }
    }

    /// Records an acknowledged release.
    pub fn released(&mut self, key: u64, stamp: Stamp) {
        if let Some(g) = self.grant_mut(key, &stamp) {
            g.released = true;
        }
    }

    /// Whether `stamp` is taken over by a claim of `key` that was not released (a released
    /// taker never ran: its takeover is void), nor an orphan or lost with its region.
    pub fn taken_over(&self, key: u64, stamp: &Stamp) -> bool {
        self.takeovers.get(&key).is_some_and(|ts| {
            ts.iter().any(|(t, v)| {
                v == stamp
                    && !self.grants.get(&key).is_some_and(|gs| {
                        gs.iter()
                            .any(|g| g.stamp == *t && (g.released || g.fate != Fate::Held))
                    })
            })
        })
    }

    /// The grant that must win `key`: the smallest stamp that was neither released nor taken
    /// over, nor an orphan or lost with its region.
    pub fn winner(&self, key: u64) -> Option<&Grant> {
        let mut best: Option<&Grant> = None;
        for g in self.grants.get(&key)? {
            if g.released || g.fate != Fate::Held || self.taken_over(key, &g.stamp) {
                continue;
            }
            if best.is_none_or(|b| earlier(&g.stamp, &b.stamp)) {
                best = Some(g);
            }
        }
        best
    }

    /// The items `key` must show once every lease has run out, sorted by stamp: every
    /// completed claim but the winner, as a duplicate when it carried the winner's payload and
    /// a key reuse otherwise (as `Verify` when no claim wins); and every other claim that was
    /// neither released nor completed (taken over, or its lease ran out with no word from its
    /// client), as `Verify`. Orphans that were not released are `Orphan` items; claims lost
    /// with their region are nobody's items.
    pub fn expected_items(&self, key: u64) -> Vec<(Stamp, ItemKind)> {
        let Some(gs) = self.grants.get(&key) else {
            return Vec::new();
        };
        let w = self.winner(key);
        let mut v: Vec<(Stamp, ItemKind)> = Vec::new();
        for g in gs {
            if Some(g.stamp) == w.map(|w| w.stamp) || g.released || g.fate == Fate::Lost {
                continue;
            }
            let kind = if g.fate == Fate::Orphan {
                ItemKind::Orphan
            } else if g.completed.is_none() {
                ItemKind::Verify
            } else {
                match w {
                    None => ItemKind::Verify,
                    Some(w) if w.fingerprint == g.fingerprint => ItemKind::Duplicate,
                    Some(_) => ItemKind::KeyReuse,
                }
            };
            v.push((g.stamp, kind));
        }
        v.sort();
        v
    }

    /// Checks made from the client log alone: every replay is the outcome of some grant of its
    /// key (S2: nothing invented), and a mismatch answer follows a grant of another payload
    /// (S6).
    pub fn check_client_log(&mut self) {
        let mut found = Vec::new();
        for (key, before, excusable, v) in std::mem::take(&mut self.s10) {
            let orphan = self.grants.get(&key).is_some_and(|gs| {
                gs.iter()
                    .any(|g| g.stamp == before && g.fate == Fate::Orphan)
            });
            if !(orphan && excusable) {
                found.push(v);
            }
        }
        for (key, region, outcome) in &self.replays {
            let known = self
                .grants
                .get(key)
                .is_some_and(|gs| gs.iter().any(|g| g.completed.as_ref() == Some(outcome)))
                || self.lost_outcomes.contains(&(*key, outcome.clone()));
            if !known {
                found.push(Violation {
                    check: "S2",
                    key: Some(*key),
                    detail: format!(
                        "region {region} replayed an outcome no client stored: {outcome:?}"
                    ),
                });
            }
        }
        for (key, region, fp) in &self.mismatches {
            let other = self
                .grants
                .get(key)
                .is_some_and(|gs| gs.iter().any(|g| g.fingerprint != *fp));
            if !other {
                found.push(Violation {
                    check: "S6",
                    key: Some(*key),
                    detail: format!(
                        "region {region} answered mismatch with no claim of another payload"
                    ),
                });
            }
        }
        self.violations.extend(found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem::clock::RegionId;

    fn stamp(hlc: u64, region: &str) -> Stamp {
        Stamp::new(hlc, RegionId::new(region).unwrap())
    }

    fn grant(s: Stamp) -> Grant {
        Grant {
            stamp: s,
            fingerprint: Fingerprint([1; 32]),
            region: 0,
            executed: true,
            side_effect: true,
            released: false,
            completed: Some(Outcome::new(201, "x")),
            completed_at_ms: Some(0),
            at_ms: 0,
            fate: Fate::Held,
        }
    }

    #[test]
    fn s10_allows_a_smaller_claim_or_a_takeover_and_nothing_else() {
        let (a, b, c) = (stamp(10, "r0"), stamp(20, "r1"), stamp(30, "r2"));
        let mut o = Oracle::default();
        o.granted(1, grant(a), &[]);
        o.granted(1, grant(b), &[]);
        o.replayed(1, 0, b, Outcome::new(201, "b"), true);
        o.replayed(1, 0, a, Outcome::new(201, "a"), true);
        assert!(o.s10.is_empty(), "a smaller claim arrived: {:?}", o.s10);
        o.replayed(1, 0, b, Outcome::new(201, "b"), true);
        assert_eq!(o.s10.len(), 1, "back to a larger claim");
        o.replayed(1, 0, b, Outcome::new(201, "other bytes"), true);
        assert_eq!(o.s10.len(), 2, "a stored outcome changed");
        // c took d over: moving from d to the larger c is fine.
        let d = stamp(5, "r1");
        o.granted(2, grant(d), &[]);
        o.granted(2, grant(c), &[d]);
        o.replayed(2, 1, d, Outcome::new(201, "d"), true);
        o.replayed(2, 1, c, Outcome::new(201, "c"), true);
        assert_eq!(o.s10.len(), 2, "{:?}", o.s10);
        assert!(o.s10.iter().all(|(_, _, _, v)| v.check == "S10"));
        // A claim replayed first that turns out an orphan excuses the change.
        o.set_fate(1, &b, Fate::Orphan);
        o.check_client_log();
        let s10 = o.violations.iter().filter(|v| v.check == "S10").count();
        assert_eq!(s10, 1, "only the outcome change stands: {:?}", o.violations);
    }

    #[test]
    fn orphans_and_claims_lost_with_their_region_never_win() {
        let (a, b, c) = (stamp(10, "r0"), stamp(20, "r1"), stamp(30, "r2"));
        let mut o = Oracle::default();
        o.granted(1, grant(a), &[]);
        o.granted(1, grant(b), &[]);
        o.granted(1, grant(c), &[]);
        assert_eq!(o.winner(1).map(|g| g.stamp), Some(a));
        o.set_fate(1, &a, Fate::Lost);
        o.set_fate(1, &b, Fate::Orphan);
        assert_eq!(o.winner(1).map(|g| g.stamp), Some(c));
        assert_eq!(o.expected_items(1), vec![(b, ItemKind::Orphan)]);
        // A takeover by an orphan is void.
        let (d, e) = (stamp(5, "r0"), stamp(40, "r1"));
        let mut late = grant(d);
        late.completed = None;
        o.granted(2, late, &[]);
        o.granted(2, grant(e), &[d]);
        o.set_fate(2, &e, Fate::Orphan);
        assert_eq!(o.winner(2).map(|g| g.stamp), Some(d));
    }
}
