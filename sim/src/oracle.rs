//! The oracle: its own log of what clients did and saw, and the checks run against the
//! regions at the end of a run.
//!
//! It never calls the project's winner or item functions: the expected winner of a key is the
//! grant with the smallest stamp by the oracle's own comparison (physical-and-logical clock
//! value, then region name), and the expected items are the other grants.

use std::collections::BTreeMap;

use idem::clock::Stamp;
use idem::record::{Fingerprint, ItemKind, Outcome};

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

/// A granted claim, as the client that got `Execute` saw it.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The claim.
    pub stamp: Stamp,
    /// The payload's fingerprint.
    pub fingerprint: Fingerprint,
    /// The region that granted it.
    pub region: usize,
    /// The outcome the client stored, once its completion was acknowledged.
    pub completed: Option<Outcome>,
    /// Simulated time of the grant, ms.
    pub at_ms: u64,
}

/// What the oracle knows.
#[derive(Debug, Default)]
pub struct Oracle {
    /// Grants per key.
    pub grants: BTreeMap<u64, Vec<Grant>>,
    /// Replays clients got: (key, region, outcome).
    pub replays: Vec<(u64, usize, Outcome)>,
    /// Mismatch answers clients got: (key, region, fingerprint sent).
    pub mismatches: Vec<(u64, usize, Fingerprint)>,
    /// Violations found so far.
    pub violations: Vec<Violation>,
}

/// The oracle's own order of stamps: clock value, then region name.
pub fn earlier(a: &Stamp, b: &Stamp) -> bool {
    (a.hlc, a.region.as_str()) < (b.hlc, b.region.as_str())
}

impl Oracle {
    /// Records an `Execute`.
    pub fn granted(&mut self, key: u64, g: Grant) {
        self.grants.entry(key).or_default().push(g);
    }

    /// Records an acknowledged completion.
    pub fn completed(&mut self, key: u64, stamp: Stamp, outcome: Outcome) {
        if let Some(g) = self
            .grants
            .get_mut(&key)
            .and_then(|gs| gs.iter_mut().find(|g| g.stamp == stamp))
        {
            g.completed = Some(outcome);
        }
    }

    /// The grant that must win `key`: the smallest stamp.
    pub fn winner(&self, key: u64) -> Option<&Grant> {
        let gs = self.grants.get(&key)?;
        let mut best = gs.first()?;
        for g in gs {
            if earlier(&g.stamp, &best.stamp) {
                best = g;
            }
        }
        Some(best)
    }

    /// The items `key` must show: every other grant, as a duplicate when it carried the
    /// winner's payload, else as a key reuse. Sorted by stamp.
    pub fn expected_items(&self, key: u64) -> Vec<(Stamp, ItemKind)> {
        let Some(w) = self.winner(key) else {
            return Vec::new();
        };
        let mut v: Vec<(Stamp, ItemKind)> = self.grants[&key]
            .iter()
            .filter(|g| g.stamp != w.stamp)
            .map(|g| {
                let kind = if g.fingerprint == w.fingerprint {
                    ItemKind::Duplicate
                } else {
                    ItemKind::KeyReuse
                };
                (g.stamp, kind)
            })
            .collect();
        v.sort();
        v
    }

    /// Checks made from the client log alone: every replay is the outcome of some grant of its
    /// key (S2: nothing invented), and a mismatch answer follows a grant of another payload
    /// (S6).
    pub fn check_client_log(&mut self) {
        let mut found = Vec::new();
        for (key, region, outcome) in &self.replays {
            let known = self
                .grants
                .get(key)
                .is_some_and(|gs| gs.iter().any(|g| g.completed.as_ref() == Some(outcome)));
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
