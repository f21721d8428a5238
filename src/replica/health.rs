//! Peer health from heartbeats: a phi-accrual failure detector per peer (Hayashibara et al.,
//! 2004) and the clock-offset estimates that decide whether this region must fence itself.
//! Pure arithmetic over what the replica records; no clock of its own.

use std::collections::VecDeque;

/// Inter-arrival times kept per peer.
const WINDOW: usize = 64;
/// Offset samples kept per peer (their median is the peer's offset).
const OFFSET_WINDOW: usize = 8;

/// What a replica knows of one peer's liveness and clock.
#[derive(Debug, Clone, Default)]
pub(super) struct Health {
    last_heard_ms: Option<u64>,
    intervals: VecDeque<u64>,
    /// Whether the detector suspects the peer now.
    pub(super) suspect: bool,
    offsets: VecDeque<i64>,
}

impl Health {
    /// A message from the peer arrived.
    pub(super) fn heard(&mut self, now_ms: u64) {
        if let Some(last) = self.last_heard_ms {
            if self.intervals.len() == WINDOW {
                self.intervals.pop_front();
            }
            self.intervals.push_back(now_ms.saturating_sub(last));
        }
        self.last_heard_ms = Some(now_ms.max(self.last_heard_ms.unwrap_or(0)));
    }

    /// Phi: how unlikely this long a silence is, `-log10(P(silence >= elapsed))`, with
    /// inter-arrival times modelled as exponential with the window's mean (at least 1 ms).
    /// `None` until two messages have arrived.
    pub(super) fn phi(&self, now_ms: u64) -> Option<f64> {
        let last = self.last_heard_ms?;
        if self.intervals.is_empty() {
            return None;
        }
        let mean =
            (self.intervals.iter().sum::<u64>() as f64 / self.intervals.len() as f64).max(1.0);
        let elapsed = now_ms.saturating_sub(last) as f64;
        Some(elapsed / mean * std::f64::consts::LOG10_E)
    }

    /// How long since the peer was last heard, ms.
    pub(super) fn silent_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_heard_ms.unwrap_or(now_ms))
    }

    /// A clock-offset sample (the peer's clock minus ours, ms).
    pub(super) fn offset_sample(&mut self, offset_ms: i64) {
        if self.offsets.len() == OFFSET_WINDOW {
            self.offsets.pop_front();
        }
        self.offsets.push_back(offset_ms);
    }

    /// The peer's offset: the median of its recent samples.
    pub(super) fn offset_ms(&self) -> Option<i64> {
        median(self.offsets.iter().copied().collect())
    }

    /// Forgets the link's history (a new link starts afresh); offsets are kept, clocks do not
    /// change with links.
    pub(super) fn reset_link(&mut self) {
        self.last_heard_ms = None;
        self.intervals.clear();
        self.suspect = false;
    }
}

/// The lower median (an element, never an average), `None` for an empty list.
pub(super) fn median(mut v: Vec<i64>) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

/// This region's clock against the cluster's, for fencing: the median of the peers' offsets
/// and our own (zero). Positive when the others run ahead of us.
///
/// Returns `(offset, off)`: `off` when the median is beyond `bound` ms. With an even count of
/// clocks both middle values must be beyond it on the same side, so two regions never fence
/// each other (neither can tell whose clock is wrong). `None` until a majority of the `peers`
/// configured have been sampled: one slow peer must not fence us while the others are silent.
pub(super) fn cluster_offset(
    peer_offsets: impl Iterator<Item = i64>,
    peers: usize,
    bound: u64,
) -> Option<(i64, bool)> {
    let mut v: Vec<i64> = peer_offsets.collect();
    if v.is_empty() || v.len() * 2 <= peers {
        return None;
    }
    v.push(0);
    v.sort_unstable();
    let (lo, hi) = (v[(v.len() - 1) / 2], v[v.len() / 2]);
    let bound = i64::try_from(bound).unwrap_or(i64::MAX);
    let off = (lo > bound && hi > bound) || (lo < -bound && hi < -bound);
    // The middle value nearer our own clock.
    let offset = if lo.unsigned_abs() <= hi.unsigned_abs() {
        lo
    } else {
        hi
    };
    Some((offset, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_grows_with_silence_relative_to_the_usual_gap() {
        let mut h = Health::default();
        assert_eq!(h.phi(0), None);
        for t in (0..=1_000).step_by(100) {
            h.heard(t);
        }
        let at = |t| h.phi(t).unwrap();
        assert!(at(1_050) < 1.0, "half a usual gap");
        assert!((at(2_000) - 10.0 * std::f64::consts::LOG10_E).abs() < 1e-9);
        assert!(at(3_000) > 8.0, "twenty usual gaps");
    }

    #[test]
    fn offsets_are_medians_and_the_cluster_includes_us() {
        let mut h = Health::default();
        for o in [300, -5_000, 310, 290, 305] {
            h.offset_sample(o);
        }
        assert_eq!(h.offset_ms(), Some(300), "one wild sample does not move it");
        let fence = |offsets: &[i64], peers| cluster_offset(offsets.iter().copied(), peers, 250);
        // Both peers 300 ms ahead: we are the odd one out.
        assert_eq!(fence(&[300, 300], 2), Some((300, true)));
        // One peer off: the cluster's median is us and the good peer.
        assert_eq!(fence(&[300, 0], 2), Some((0, false)));
        assert_eq!(fence(&[-300, 5], 2), Some((0, false)));
        // Two regions: nobody can tell whose clock is wrong, nobody fences.
        assert_eq!(fence(&[-400], 1), Some((0, false)));
        assert_eq!(fence(&[400], 1), Some((0, false)));
        // A minority of the peers sampled decides nothing.
        assert_eq!(fence(&[400], 2), None);
        assert_eq!(fence(&[400, 400], 4), None);
        assert_eq!(fence(&[400, 400, 400], 4), Some((400, true)));
        // Four clocks (three peers): both middle values must be out, on the same side.
        assert_eq!(fence(&[400, 400, 0], 3), Some((0, false)));
        assert_eq!(fence(&[400, 400, 300], 3), Some((300, true)));
        assert_eq!(fence(&[], 2), None);
        assert_eq!(median(vec![3, 1, 2, 4]), Some(2));
    }
}
