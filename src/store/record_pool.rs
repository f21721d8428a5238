//! Emptied records kept for reuse, per thread.
//!
//! Every claim of a new key caches its record in the index until the claim finishes; the
//! completion then drops it. With many callers in flight the allocator sees bursts of
//! same-sized allocations and frees that overflow its per-thread caches (glibc's holds seven
//! per size), and each pair paid for two allocations and two frees in its slow paths. Records
//! leaving the cache come back here instead, emptied, with their claim vector's allocation,
//! and the next new key takes one.
//!
//! The pool is bounded ([`POOL_RECORDS_MAX`] records a thread, each with room for at most
//! [`POOL_CLAIMS_MAX`] claims), holds only empty records, and decides nothing: which record
//! object a key gets has no effect on any answer, so determinism is untouched.

use std::cell::RefCell;

use crate::record::Record;

/// Emptied records a thread keeps at most: a round of 1024 callers finds one for every claim.
pub(crate) const POOL_RECORDS_MAX: usize = 1024;
/// A record whose claim vector grew beyond this many claims is freed, not kept.
pub(crate) const POOL_CLAIMS_MAX: usize = 4;

thread_local! {
    // The boxes are what is reused: the index holds records boxed.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<Record>>> = const { RefCell::new(Vec::new()) };
}

/// An empty record, reused if this thread has one.
pub(crate) fn fresh() -> Box<Record> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Box::new(Record::new()))
}

/// Gives a record back: emptied and kept if the pool has room and its claim allocation is
/// small, freed otherwise.
pub(crate) fn recycle(mut record: Box<Record>) {
    if record.claim_capacity() > POOL_CLAIMS_MAX {
        return;
    }
    record.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_RECORDS_MAX {
            p.push(record);
        }
    });
}

/// Records this thread's pool holds (tests).
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{hlc_floor_of_ms, RegionId, Stamp};
    use crate::record::{AttemptToken, ClaimFacts, Delta, Fingerprint};

    fn claim_delta(i: u64) -> Delta {
        Delta::Claim {
            stamp: Stamp::new(
                hlc_floor_of_ms(1_900_000_000_000 + i),
                RegionId::new("a").unwrap(),
            ),
            facts: ClaimFacts {
                fingerprint: Fingerprint([1; 32]),
                attempt: AttemptToken(u128::from(i)),
                ttl_ms: 1_000,
                lease_ms: 100,
                origin_seq: i,
                takes_over: Vec::new(),
            },
        }
    }

    #[test]
    fn a_recycled_record_comes_back_empty_and_the_pool_is_bounded() {
        let mut r = fresh();
        r.apply(&claim_delta(1)).unwrap();
        assert_eq!(r.claim_count(), 1);
        let before = pooled();
        recycle(r);
        assert_eq!(pooled(), before + 1);
        let again = fresh();
        assert!(again.is_empty(), "a pooled record is handed out empty");
        assert!(again.claim_capacity() >= 1, "with its claim allocation");
        for _ in 0..POOL_RECORDS_MAX + 10 {
            recycle(Box::new(Record::new()));
        }
        assert_eq!(pooled(), POOL_RECORDS_MAX);
        let mut big = Box::new(Record::new());
        for i in 0..=POOL_CLAIMS_MAX as u64 {
            big.apply(&claim_delta(i + 1)).unwrap();
        }
        let n = pooled();
        while pooled() > 0 {
            drop(fresh());
        }
        recycle(big);
        assert_eq!(
            pooled(),
            0,
            "a record with a large claim allocation is freed ({n} before)"
        );
    }
}
