//! Disk space promised to granted claims, so their completions succeed when the disk fills.
//!
//! Granting a claim reserves, in the log, room for the largest completion entry the
//! namespace allows (`outcome_bytes_max` plus framing). The promise is returned when the claim
//! finishes here, or once its lease has run out (by the clock plus the max drift): a client
//! that vanished must not hold space forever, and a claim can only be taken over after that
//! point. A late completion after that draws from the log's small general reserve, best effort.
//!
//! Promises are accounted per second of lease end, not per claim: a claim's promise is found
//! again from its lease end, which the store always has at hand, so the hot path costs one map
//! update and no allocation. Only claims stamped in this incarnation of the region hold
//! promises (promises live in memory): claims granted before a restart finish from the general
//! reserve.

use std::collections::BTreeMap;

use crate::record::{limits, RecordKey};

/// Bytes to promise for a claim's completion entry: the outcome limit, the key, up to the
/// header limit's length prefixes, and the entry's fixed fields, all with room to spare.
pub(super) fn completion_bytes(outcome_bytes_max: usize, key: &RecordKey) -> usize {
    let key_len = key.namespace().len() + key.principal().len() + key.key().len();
    outcome_bytes_max + key_len + limits::HEADERS_MAX * 20 + 512
}

/// What [`Promises::extend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Extended {
    /// The promise now ends with the new lease.
    Moved,
    /// The claim held no promise (it had expired).
    HadNone,
    /// The new lease end is already past: the promise was dropped; give its bytes back.
    Dropped,
}

/// Outstanding promises, as bytes per second of lease end.
#[derive(Debug, Default)]
pub(super) struct Promises {
    by_second: BTreeMap<u64, u64>,
    /// Seconds before this one are expired: their promises went back to the log.
    swept_before: u64,
    count: usize,
}

fn second(lease_until_ms: u64) -> u64 {
    lease_until_ms / 1000
}

impl Promises {
    /// Records a promise of `bytes` for a claim whose lease ends at `lease_until_ms`. Returns
    /// false, recording nothing, if that lease end is already expired: the caller gives the
    /// bytes back to the log at once.
    #[must_use]
    pub(super) fn add(&mut self, lease_until_ms: u64, bytes: u64) -> bool {
        let s = second(lease_until_ms);
        if s < self.swept_before {
            return false;
        }
        *self.by_second.entry(s).or_insert(0) += bytes;
        self.count += 1;
        true
    }

    /// Takes back the promise of a claim whose lease ends at `lease_until_ms`, if it still
    /// holds one; its bytes go back to the log.
    pub(super) fn take(&mut self, lease_until_ms: u64, bytes: u64) -> Option<u64> {
        let s = second(lease_until_ms);
        if s < self.swept_before {
            return None; // expired with its second: already given back
        }
        let held = self.by_second.get_mut(&s)?;
        if *held < bytes {
            return None;
        }
        // An emptied second stays until it expires: the next claim usually books into the same
        // second, and removing it would free and allocate a tree node per claim.
        *held -= bytes;
        self.count = self.count.saturating_sub(1);
        Some(bytes)
    }

    /// Moves a claim's promise to its new lease end (an extension or a resume). Returns false
    /// if the claim held no promise any more (it had expired), or the new lease end is already
    /// expired (then the promise is dropped and the caller gives its bytes back).
    pub(super) fn extend(&mut self, old_until_ms: u64, new_until_ms: u64, bytes: u64) -> Extended {
        if self.take(old_until_ms, bytes).is_none() {
            return Extended::HadNone;
        }
        if self.add(new_until_ms, bytes) {
            Extended::Moved
        } else {
            Extended::Dropped
        }
    }

    /// Expires every promise whose lease ended before `before_ms`; returns their total bytes.
    pub(super) fn expire(&mut self, before_ms: u64) -> u64 {
        let horizon = second(before_ms);
        if horizon <= self.swept_before {
            return 0;
        }
        let keep = self.by_second.split_off(&horizon);
        let expired: u64 = std::mem::replace(&mut self.by_second, keep).values().sum();
        self.swept_before = horizon;
        expired
    }

    /// Bytes promised and not yet returned.
    /// Seconds of lease end before this one are swept (their promises went back).
    pub(super) fn swept_before(&self) -> u64 {
        self.swept_before
    }

    pub(super) fn bytes(&self) -> u64 {
        self.by_second.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promises_expire_move_and_are_taken_once() {
        let mut p = Promises::default();
        assert!(p.add(10_500, 10));
        assert!(p.add(20_000, 20));
        assert_eq!(p.extend(10_500, 30_000, 10), Extended::Moved);
        assert_eq!(p.expire(25_000), 20, "only the promise whose lease ended");
        assert_eq!(p.take(20_000, 20), None, "expired: nothing to return");
        assert!(
            p.add(26_000, 20),
            "a live promise in a second not yet swept"
        );
        assert_eq!(
            p.take(3_000, 20),
            None,
            "an old lease never takes a live promise"
        );
        assert_eq!(p.take(30_000, 10), Some(10));
        assert_eq!(p.take(30_000, 10), None, "taken once");
        assert_eq!(p.extend(30_000, 40_000, 10), Extended::HadNone);
        assert!(!p.add(1_000, 5), "a lease already expired records nothing");
        assert_eq!(p.take(26_000, 20), Some(20));
        assert_eq!(p.bytes(), 0);
    }
}
