//! Disk space promised to granted claims, so their completions succeed when the disk fills.
//!
//! Granting a claim reserves, in the log, room for the largest completion entry the
//! namespace allows (`outcome_bytes_max` plus framing). The promise is returned when the claim
//! finishes here, when this region takes it over, or when its lease has run out (by the clock
//! plus the max drift) and nobody finished it: a client that vanished must not hold space
//! forever. A late completion after that draws from the log's small general reserve, best
//! effort. Promises live in memory only: after a restart, claims granted before it finish from
//! the general reserve too.

use std::collections::{BTreeSet, HashMap};

use crate::clock::Stamp;
use crate::record::{limits, RecordKey};

/// Bytes to promise for a claim's completion entry: the outcome limit, the key, up to the
/// header limit's length prefixes, and the entry's fixed fields, all with room to spare.
pub(super) fn completion_bytes(outcome_bytes_max: usize, key: &RecordKey) -> usize {
    let key_len = key.namespace.len() + key.principal.len() + key.key.len();
    outcome_bytes_max + key_len + limits::HEADERS_MAX * 20 + 512
}

/// The outstanding promises, by claim and by when their lease ends.
#[derive(Debug, Default)]
pub(super) struct Promises {
    by_claim: HashMap<Stamp, (u64, u64)>,
    by_lease: BTreeSet<(u64, Stamp)>,
}

impl Promises {
    /// Records a promise of `bytes` for `claim`, whose lease ends at `lease_until_ms`.
    pub(super) fn add(&mut self, claim: Stamp, lease_until_ms: u64, bytes: u64) {
        if let Some((old_lease, old_bytes)) = self.by_claim.insert(claim, (lease_until_ms, bytes)) {
            // Never two promises for one claim: keep the accounting exact.
            debug_assert_eq!(old_bytes, bytes);
            self.by_lease.remove(&(old_lease, claim));
        }
        self.by_lease.insert((lease_until_ms, claim));
    }

    /// Takes the promise of `claim`, if any: its bytes go back to the log.
    pub(super) fn take(&mut self, claim: &Stamp) -> Option<u64> {
        let (lease, bytes) = self.by_claim.remove(claim)?;
        self.by_lease.remove(&(lease, *claim));
        Some(bytes)
    }

    /// Moves a promise's lease end (an extension or a resume).
    pub(super) fn extend(&mut self, claim: &Stamp, lease_until_ms: u64) {
        if let Some((lease, _)) = self.by_claim.get_mut(claim) {
            if lease_until_ms > *lease {
                self.by_lease.remove(&(*lease, *claim));
                *lease = lease_until_ms;
                self.by_lease.insert((lease_until_ms, *claim));
            }
        }
    }

    /// Takes every promise whose lease ended before `before_ms`; returns their total bytes.
    pub(super) fn expire(&mut self, before_ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(lease, claim)) = self.by_lease.first() {
            if lease >= before_ms {
                break;
            }
            self.by_lease.pop_first();
            if let Some((_, bytes)) = self.by_claim.remove(&claim) {
                out.push(bytes);
            }
        }
        out
    }

    /// Whether any promise's lease ended before `before_ms` (cheap: the hot path asks often).
    pub(super) fn any_expired(&self, before_ms: u64) -> bool {
        self.by_lease.first().is_some_and(|(l, _)| *l < before_ms)
    }

    /// Outstanding promises.
    pub(super) fn len(&self) -> usize {
        self.by_claim.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::RegionId;

    #[test]
    fn promises_expire_extend_and_are_taken_once() {
        let r = RegionId::new("a").unwrap();
        let (a, b) = (Stamp::new(1, r), Stamp::new(2, r));
        let mut p = Promises::default();
        p.add(a, 100, 10);
        p.add(b, 200, 20);
        p.extend(&a, 300);
        assert!(!p.any_expired(150));
        assert_eq!(p.expire(250), vec![20]);
        assert_eq!(p.take(&b), None);
        assert_eq!(p.take(&a), Some(10));
        assert_eq!(p.len(), 0);
    }
}
