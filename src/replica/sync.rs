//! Anti-entropy arithmetic: from what this region holds of an origin's log and what a peer's
//! digest says it holds, the next range worth asking that peer for. Pure functions.

use crate::clock::RegionId;
use crate::store::Holding;
use crate::wire::{OriginDigest, SeqRange};

/// A digest entry for what this region holds.
/// A digest entry as a holding (what a peer holds of one origin).
pub(crate) fn holding_of(d: &OriginDigest) -> Holding {
    Holding {
        origin: d.origin,
        mark: d.mark,
        gaps: d.gaps.iter().map(|g| (g.first, g.last)).collect(),
        head: d.head,
    }
}

pub(crate) fn digest_entry(h: &Holding) -> OriginDigest {
    OriginDigest {
        origin: h.origin,
        mark: h.mark,
        gaps: h
            .gaps
            .iter()
            .map(|&(first, last)| SeqRange { first, last })
            .collect(),
        head: h.head,
    }
}

/// `ours` (`None`: nothing held) with every number up to `done` counted as held: what this
/// region will hold once the range it just received is durable.
pub(crate) fn held_through(ours: Option<Holding>, origin: RegionId, done: u64) -> Holding {
    let mut h = ours.unwrap_or(Holding {
        origin,
        mark: 0,
        gaps: Vec::new(),
        head: 0,
    });
    if h.mark >= done {
        return h;
    }
    h.gaps.retain(|&(_, last)| last > done);
    match h.gaps.first_mut() {
        Some(g) if g.0 <= done => {
            g.0 = done.saturating_add(1);
            h.mark = done;
        }
        Some(_) => {
            // Numbers from done+1 to the first gap are held: the mark runs up to it.
            h.mark = h.gaps[0].0 - 1;
        }
        None => {
            h.mark = h.head.max(done);
        }
    }
    h.head = h.head.max(done);
    h
}

/// Whether `theirs` holds every number of `r`.
fn holds_all(theirs: &OriginDigest, r: SeqRange) -> bool {
    r.last <= theirs.head
        && !theirs
            .gaps
            .iter()
            .any(|g| g.first <= r.last && r.first <= g.last)
}

/// The first number at or above `from` that `theirs` holds, up to `to`.
fn first_held(theirs: &OriginDigest, from: u64, to: u64) -> Option<u64> {
    let mut at = from;
    for g in &theirs.gaps {
        if g.last < at {
            continue;
        }
        if g.first > at {
            break;
        }
        at = g.last.saturating_add(1);
    }
    (at <= to.min(theirs.head)).then_some(at)
}

/// The lowest range of at most `chunk` numbers that this region lacks (`ours`: `None` when it
/// holds nothing of the origin) and the peer holds in full: its first number is held by the
/// peer, and it stops before the next number the peer lacks or this region holds.
pub(crate) fn next_missing(
    ours: Option<&Holding>,
    theirs: &OriginDigest,
    chunk: u64,
) -> Option<SeqRange> {
    let chunk = chunk.max(1);
    let (mark, gaps, head) = match ours {
        Some(h) => (h.mark, h.gaps.as_slice(), h.head),
        None => (0, &[][..], 0),
    };
    // What we lack, lowest first: our gaps (only the lowest are listed), then above our head.
    let lacking = gaps
        .iter()
        .copied()
        .chain(std::iter::once((head.saturating_add(1), u64::MAX)))
        .filter(|&(first, _)| first > mark);
    for (first, last) in lacking {
        let last = last.min(theirs.head);
        let Some(start) = first_held(theirs, first, last) else {
            continue;
        };
        let mut end = start.saturating_add(chunk - 1).min(last);
        // Stop before the peer's next gap.
        if let Some(g) = theirs
            .gaps
            .iter()
            .find(|g| g.first > start && g.first <= end)
        {
            end = g.first - 1;
        }
        let r = SeqRange {
            first: start,
            last: end,
        };
        debug_assert!(holds_all(theirs, r));
        return Some(r);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> RegionId {
        RegionId::new("o").unwrap()
    }

    fn ours(mark: u64, gaps: &[(u64, u64)], head: u64) -> Holding {
        Holding {
            origin: region(),
            mark,
            gaps: gaps.to_vec(),
            head,
        }
    }

    fn theirs(mark: u64, gaps: &[(u64, u64)], head: u64) -> OriginDigest {
        digest_entry(&ours(mark, gaps, head))
    }

    fn r(first: u64, last: u64) -> Option<SeqRange> {
        Some(SeqRange { first, last })
    }

    #[test]
    fn asks_for_what_lies_above_our_head_in_chunks() {
        assert_eq!(next_missing(None, &theirs(10, &[], 10), 4), r(1, 4));
        assert_eq!(
            next_missing(Some(&ours(8, &[], 8)), &theirs(10, &[], 10), 4),
            r(9, 10)
        );
        assert_eq!(
            next_missing(Some(&ours(10, &[], 10)), &theirs(10, &[], 10), 4),
            None
        );
        assert_eq!(
            next_missing(Some(&ours(12, &[], 12)), &theirs(10, &[], 10), 4),
            None
        );
    }

    #[test]
    fn fills_our_gaps_first() {
        let us = ours(3, &[(4, 5), (8, 8)], 20);
        assert_eq!(next_missing(Some(&us), &theirs(30, &[], 30), 100), r(4, 5));
        // The peer lacks 4 too: start at 5.
        assert_eq!(
            next_missing(Some(&us), &theirs(3, &[(4, 4)], 30), 100),
            r(5, 5)
        );
        // The peer lacks all of our first gap: our second one.
        assert_eq!(
            next_missing(Some(&us), &theirs(3, &[(4, 5)], 30), 100),
            r(8, 8)
        );
    }

    #[test]
    fn never_asks_for_what_the_peer_lacks() {
        let them = theirs(2, &[(3, 5), (9, 9)], 12);
        assert_eq!(next_missing(None, &them, 100), r(1, 2));
        assert_eq!(next_missing(Some(&ours(2, &[], 2)), &them, 100), r(6, 8));
        assert_eq!(next_missing(Some(&ours(8, &[], 8)), &them, 100), r(10, 12));
        assert_eq!(
            next_missing(Some(&ours(2, &[], 2)), &theirs(2, &[(3, 5)], 6), 1),
            r(6, 6)
        );
    }

    #[test]
    fn a_received_range_counts_as_held() {
        let o = region();
        assert_eq!(held_through(None, o, 16), ours(16, &[], 16));
        assert_eq!(
            held_through(Some(ours(20, &[], 20)), o, 16),
            ours(20, &[], 20)
        );
        // Up to the first gap that survives.
        assert_eq!(
            held_through(Some(ours(3, &[(4, 10), (14, 15)], 30)), o, 8),
            ours(8, &[(9, 10), (14, 15)], 30)
        );
        assert_eq!(
            held_through(Some(ours(3, &[(4, 10), (14, 15)], 30)), o, 10),
            ours(13, &[(14, 15)], 30)
        );
        assert_eq!(
            held_through(Some(ours(3, &[(4, 5)], 9)), o, 12),
            ours(12, &[], 12)
        );
    }
}
