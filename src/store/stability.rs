//! Causal stability: which keys no region can still change behind this region's back.
//!
//! A key is *stable* here when every other (non-retired) region has durably seen every fact
//! this region holds for it, and this region holds everything those regions wrote before
//! saying so. After that no region can produce an earlier claim or a takeover this region does
//! not know (design section 2), so an item of the key may be acted upon.
//!
//! # How it is tracked
//!
//! Per key the store keeps only the log sequence number (lsn) of its newest entry. The store
//! takes **checkpoints**: an lsn `L` and, per origin, a bound `V[o]` on the sequence numbers
//! of every mutation this region appended at or below `L`. Remote numbers are *announced*
//! (under the replication lock) before their entry is appended, and `L` is read before `V`, so
//! the bound holds even while other threads append.
//!
//! A peer's anti-entropy digest says what it holds durably of every origin's log (durable: a
//! crash cannot take it back), its own log included. A digest from peer `r` is *usable* once
//! this region holds `r`'s log contiguously up to the head `r` advertised for itself: then every
//! fact `r` made before it is here too. The **frontier** is, per origin, the smallest
//! contiguous mark among the usable digests of all peers. A checkpoint whose bound lies within
//! the frontier is stable, and so is every key whose newest entry is at or below its lsn.
//!
//! A record merged whole (a failover lookup's answer, a snapshot chunk) carries facts whose
//! numbers are unknown here. The next checkpoint therefore also waits for a digest from the
//! region that sent it, received after the checkpoint; that region held the facts durably when
//! it sent them, so its digest's heads bound them.
//!
//! Everything here is in memory: after a restart stability starts again from nothing (the first
//! checkpoint covers all recovered entries), which only delays it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

use super::log::Lsn;
use super::replication::Holding;
use super::storage::Storage;
use super::{lock, Store};
use crate::clock::RegionId;

/// Checkpoints kept at most; beyond, the newest is replaced (which only delays stability).
pub const CHECKPOINTS_MAX: usize = 4096;
/// Digests kept per peer (newest last): an older one may be usable while a newer is not yet.
pub const DIGESTS_PER_PEER_MAX: usize = 8;

#[derive(Debug, Clone)]
struct Checkpoint {
    lsn: Lsn,
    bound: BTreeMap<RegionId, u64>,
    /// Regions whose first digest received after the checkpoint must raise `bound` first: a
    /// region that sent whole records (all its heads), and the origins of those records' facts
    /// (their own head, which bounds every fact they made before it).
    awaiting: BTreeMap<RegionId, Heads>,
}

/// Which heads of an awaited digest bound a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Heads {
    /// The sender's own log only.
    Own,
    /// Every origin's.
    All,
}

#[derive(Debug, Clone)]
struct PeerDigest {
    /// origin → (contiguous mark, head).
    holds: BTreeMap<RegionId, (u64, u64)>,
}

/// The stability bookkeeping of one store.
#[derive(Debug, Default)]
pub(super) struct Stability {
    pending: VecDeque<Checkpoint>,
    digests: BTreeMap<RegionId, VecDeque<PeerDigest>>,
    /// Regions awaited by the next checkpoint (whole records merged since the last one).
    images_from: BTreeMap<RegionId, Heads>,
    /// Every key whose newest entry is at or below this is stable (none before the first
    /// checkpoint is: recovered keys carry lsn 0).
    stable_lsn: Option<Lsn>,
    /// The lsn of the newest checkpoint taken (none is taken twice for the same lsn).
    last_lsn: Option<Lsn>,
}

impl Stability {
    /// A peer's digest arrived. It settles what the checkpoints taken before it await of this
    /// peer: the first digest after a checkpoint was sent after the records the checkpoint
    /// covers, so its heads bound them.
    pub(super) fn peer_digest(&mut self, peer: RegionId, holdings: &[Holding]) {
        let d = PeerDigest {
            holds: holdings
                .iter()
                .map(|h| (h.origin, (h.mark, h.head.max(h.mark))))
                .collect(),
        };
        for cp in &mut self.pending {
            let Some(heads) = cp.awaiting.remove(&peer) else {
                continue;
            };
            if !d.holds.contains_key(&peer) {
                // Cut short before the sender's own entry: not a bound yet.
                cp.awaiting.insert(peer, heads);
                continue;
            }
            for (o, (_, head)) in &d.holds {
                if heads == Heads::All || *o == peer {
                    let b = cp.bound.entry(*o).or_insert(0);
                    *b = (*b).max(*head);
                }
            }
        }
        let q = self.digests.entry(peer).or_default();
        if q.len() == DIGESTS_PER_PEER_MAX {
            q.pop_front();
        }
        q.push_back(d);
    }

    /// `peer` sent whole records (their facts' numbers are unknown here) whose facts were
    /// made by `origins`.
    pub(super) fn image_from(
        &mut self,
        peer: RegionId,
        origins: impl IntoIterator<Item = RegionId>,
    ) {
        self.images_from.insert(peer, Heads::All);
        for o in origins {
            self.images_from.entry(o).or_insert(Heads::Own);
        }
    }

    /// Takes a checkpoint at `lsn` with `bound`, unless nothing was appended since the last.
    pub(super) fn checkpoint(&mut self, lsn: Lsn, bound: BTreeMap<RegionId, u64>) {
        if self.last_lsn.is_some_and(|l| lsn <= l) && self.images_from.is_empty() {
            return;
        }
        self.last_lsn = Some(self.last_lsn.map_or(lsn, |l| l.max(lsn)));
        let cp = Checkpoint {
            lsn,
            bound,
            awaiting: std::mem::take(&mut self.images_from),
        };
        if self.pending.len() == CHECKPOINTS_MAX {
            // Covering more with a larger bound is conservative; keep what the replaced one
            // awaited (a digest after the newer checkpoint is after the older one too).
            let last = self.pending.pop_back().expect("full");
            let mut cp = cp;
            for (p, h) in last.awaiting {
                let e = cp.awaiting.entry(p).or_insert(h);
                *e = (*e).max(h);
            }
            self.pending.push_back(cp);
        } else {
            self.pending.push_back(cp);
        }
    }

    /// Moves the stable point as far as the peers' usable digests allow. `peers` are the
    /// regions that must have seen a fact (every other non-retired region); `held` is, per
    /// origin, the contiguous mark this region holds durably.
    ///
    /// `retired` maps each retired region to its last number that counts: facts numbered
    /// above it are orphans, which can change no winner, so no checkpoint waits for them; and
    /// nothing becomes stable until this region holds each retired log up to that number (no
    /// digest of the retired region will ever say more).
    pub(super) fn advance(
        &mut self,
        peers: &[RegionId],
        held: &BTreeMap<RegionId, u64>,
        retired: &BTreeMap<RegionId, u64>,
    ) -> Option<Lsn> {
        if retired
            .iter()
            .any(|(r, last)| held.get(r).copied().unwrap_or(0) < *last)
        {
            return self.stable_lsn;
        }
        let mut frontier: Option<BTreeMap<RegionId, u64>> = None;
        for peer in peers {
            let have = held.get(peer).copied().unwrap_or(0);
            let usable = self.digests.get(peer).and_then(|q| {
                q.iter()
                    .rev()
                    .find(|d| d.holds.get(peer).is_some_and(|(_, head)| *head <= have))
            });
            let Some(d) = usable else {
                return self.stable_lsn; // a peer has said nothing usable yet
            };
            let f = frontier
                .get_or_insert_with(|| d.holds.iter().map(|(o, (m, _))| (*o, *m)).collect());
            f.retain(|o, m| match d.holds.get(o) {
                Some((mark, _)) => {
                    *m = (*m).min(*mark);
                    true
                }
                None => false,
            });
        }
        let frontier = frontier.unwrap_or_default();
        let alone = peers.is_empty();
        while let Some(cp) = self.pending.front_mut() {
            // Whole records merged before this checkpoint wait for digests after it; regions
            // that are not peers (retired, or this one) are not waited for.
            cp.awaiting.retain(|r, _| peers.contains(r));
            if !cp.awaiting.is_empty() {
                break;
            }
            let within = alone
                || cp.bound.iter().all(|(o, b)| {
                    let b = retired.get(o).map_or(*b, |last| (*b).min(*last));
                    b == 0 || frontier.get(o).is_some_and(|f| *f >= b)
                });
            if !within {
                break;
            }
            self.stable_lsn = Some(self.stable_lsn.map_or(cp.lsn, |s| s.max(cp.lsn)));
            self.pending.pop_front();
        }
        self.stable_lsn
    }
}

impl<S: Storage> Store<S> {
    /// A peer's anti-entropy digest arrived: what it holds durably of every origin's log (the
    /// replica passes it on; see the module doc).
    pub fn note_peer_digest(&self, peer: RegionId, holdings: &[Holding]) {
        if peer != self.region {
            lock(&self.stability).peer_digest(peer, holdings);
        }
    }

    /// Takes a stability checkpoint of everything appended so far and moves the stable point
    /// as far as the digests of `peers` allow (retired regions are left out). Call it regularly
    /// (the replica does, on every timeout). Returns the stable lsn, once there is one.
    pub fn advance_stability(&self, peers: &[RegionId]) -> Option<Lsn> {
        // The lsn first, then the bound: every entry at or below the lsn was announced (remote)
        // or numbered (local) before it was appended, so the bound read after covers it.
        let lsn = self.log.appended_lsn();
        let mut bound = lock(&self.replication).announced.clone();
        bound.insert(self.region, self.log.appended_seq());
        let held = self.marks();
        // Only durable retirements count: one a crash could take back must not have let a
        // checkpoint pass.
        let retired = self.durable_retirements().0;
        let peers: Vec<RegionId> = peers
            .iter()
            .filter(|p| **p != self.region && !retired.contains_key(p))
            .copied()
            .collect();
        let mut st = lock(&self.stability);
        st.checkpoint(lsn, bound);
        let stable = st.advance(&peers, &held, &retired);
        if let Some(s) = stable {
            // Readers check it without the lock: lsn + 1, 0 while nothing is stable.
            self.stable_lsn_plus1
                .fetch_max(s.saturating_add(1), Ordering::Release);
        }
        stable
    }

    /// Whether a key whose newest log entry has `lsn` is stable here.
    pub(super) fn is_stable(&self, lsn: Lsn) -> bool {
        lsn < self.stable_lsn_plus1.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        RegionId::new(s).unwrap()
    }

    fn holding(origin: &str, mark: u64, head: u64) -> Holding {
        Holding {
            origin: r(origin),
            mark,
            gaps: Vec::new(),
            head,
        }
    }

    fn bound(v: &[(&str, u64)]) -> BTreeMap<RegionId, u64> {
        v.iter().map(|(o, s)| (r(o), *s)).collect()
    }

    fn none() -> BTreeMap<RegionId, u64> {
        BTreeMap::new()
    }

    #[test]
    fn a_checkpoint_is_stable_once_every_peer_has_seen_its_bound() {
        let mut s = Stability::default();
        s.checkpoint(10, bound(&[("a", 5), ("b", 3)]));
        let peers = [r("b"), r("c")];
        let held = bound(&[("b", 3), ("c", 2)]);
        assert_eq!(s.advance(&peers, &held, &none()), None, "no digest yet");
        s.peer_digest(
            r("b"),
            &[holding("a", 5, 5), holding("b", 3, 3), holding("c", 2, 2)],
        );
        assert_eq!(
            s.advance(&peers, &held, &none()),
            None,
            "c said nothing yet"
        );
        s.peer_digest(
            r("c"),
            &[holding("a", 4, 9), holding("b", 3, 3), holding("c", 2, 2)],
        );
        assert_eq!(
            s.advance(&peers, &held, &none()),
            None,
            "c holds a only up to 4 contiguously"
        );
        s.peer_digest(
            r("c"),
            &[holding("a", 5, 9), holding("b", 3, 3), holding("c", 2, 2)],
        );
        assert_eq!(s.advance(&peers, &held, &none()), Some(10));
    }

    #[test]
    fn a_digest_is_usable_only_once_we_hold_what_its_sender_wrote_before_it() {
        let mut s = Stability::default();
        s.checkpoint(10, bound(&[("a", 5)]));
        let peers = [r("b")];
        s.peer_digest(r("b"), &[holding("a", 5, 5), holding("b", 7, 7)]);
        // b wrote up to 7 before its digest; we hold b only up to 6: b may have claimed
        // something we do not know yet.
        assert_eq!(s.advance(&peers, &bound(&[("b", 6)]), &none()), None);
        assert_eq!(s.advance(&peers, &bound(&[("b", 7)]), &none()), Some(10));
    }

    #[test]
    fn an_older_digest_serves_while_the_newest_is_not_usable_yet() {
        let mut s = Stability::default();
        s.checkpoint(10, bound(&[("a", 5)]));
        let peers = [r("b")];
        s.peer_digest(r("b"), &[holding("a", 5, 5), holding("b", 7, 7)]);
        s.peer_digest(r("b"), &[holding("a", 9, 9), holding("b", 20, 20)]);
        assert_eq!(s.advance(&peers, &bound(&[("b", 7)]), &none()), Some(10));
    }

    #[test]
    fn a_whole_record_waits_for_its_senders_next_digest() {
        let mut s = Stability::default();
        s.peer_digest(r("b"), &[holding("a", 5, 5), holding("b", 7, 7)]);
        s.image_from(r("b"), [r("a")]);
        s.checkpoint(10, bound(&[("a", 5)]));
        let peers = [r("b")];
        let held = bound(&[("b", 30)]);
        assert_eq!(
            s.advance(&peers, &held, &none()),
            None,
            "b's digest predates the record"
        );
        // b's next digest: its heads (a up to 12) bound the record's facts; b itself holds a
        // contiguously only up to 8, so not yet.
        s.peer_digest(r("b"), &[holding("a", 8, 12), holding("b", 30, 30)]);
        assert_eq!(s.advance(&peers, &held, &none()), None);
        s.peer_digest(r("b"), &[holding("a", 12, 12), holding("b", 30, 30)]);
        assert_eq!(s.advance(&peers, &held, &none()), Some(10));
    }

    #[test]
    fn checkpoints_are_stable_in_order_and_bounded_in_number() {
        let mut s = Stability::default();
        for i in 1..=(CHECKPOINTS_MAX as u64 + 10) {
            s.checkpoint(i, bound(&[("a", i)]));
        }
        assert_eq!(s.pending.len(), CHECKPOINTS_MAX);
        s.checkpoint(CHECKPOINTS_MAX as u64 + 10, bound(&[("a", 1)]));
        assert_eq!(
            s.pending.len(),
            CHECKPOINTS_MAX,
            "same lsn: no new checkpoint"
        );
        let peers = [r("b")];
        s.peer_digest(r("b"), &[holding("a", 3, 3), holding("b", 0, 0)]);
        assert_eq!(s.advance(&peers, &BTreeMap::new(), &none()), Some(3));
        // The last checkpoint was replaced by the newest: it needs the newest bound.
        s.peer_digest(
            r("b"),
            &[
                holding("a", CHECKPOINTS_MAX as u64 + 9, 0),
                holding("b", 0, 0),
            ],
        );
        assert!(s.advance(&peers, &BTreeMap::new(), &none()) < Some(CHECKPOINTS_MAX as u64 + 10));
        s.peer_digest(
            r("b"),
            &[
                holding("a", CHECKPOINTS_MAX as u64 + 10, 0),
                holding("b", 0, 0),
            ],
        );
        assert_eq!(
            s.advance(&peers, &BTreeMap::new(), &none()),
            Some(CHECKPOINTS_MAX as u64 + 10)
        );
    }

    #[test]
    fn a_region_alone_is_stable_at_once() {
        let mut s = Stability::default();
        s.image_from(r("x"), []);
        s.checkpoint(4, bound(&[("a", 5)]));
        assert_eq!(s.advance(&[], &BTreeMap::new(), &none()), Some(4));
    }

    #[test]
    fn a_digest_cut_short_before_its_senders_own_entry_is_not_usable() {
        let mut s = Stability::default();
        s.checkpoint(10, bound(&[("a", 5)]));
        s.peer_digest(r("z"), &[holding("a", 5, 5)]);
        assert_eq!(s.advance(&[r("z")], &BTreeMap::new(), &none()), None);
    }

    #[test]
    fn records_from_several_peers_are_bounded_by_their_next_digests_without_falling_behind() {
        let mut s = Stability::default();
        let peers = [r("b"), r("c")];
        let mut stable = None;
        for round in 1..=50u64 {
            // Every round: records merged from b with facts of c, a checkpoint, then one
            // digest from each peer, holding everything so far.
            s.image_from(r("b"), [r("c")]);
            s.checkpoint(round, bound(&[("a", round)]));
            let heads = [
                holding("a", round, round),
                holding("b", round, round),
                holding("c", round, round),
            ];
            s.peer_digest(r("b"), &heads);
            s.peer_digest(r("c"), &heads);
            stable = s.advance(&peers, &bound(&[("b", round), ("c", round)]), &none());
        }
        assert_eq!(stable, Some(50), "each round's digests settle that round");
        assert!(s.pending.is_empty());
    }

    #[test]
    fn records_from_a_region_that_is_no_peer_do_not_hold_stability_back() {
        let mut s = Stability::default();
        s.image_from(r("gone"), [r("gone")]);
        s.checkpoint(3, bound(&[("a", 1)]));
        s.peer_digest(r("b"), &[holding("a", 1, 1), holding("b", 0, 0)]);
        assert_eq!(s.advance(&[r("b")], &BTreeMap::new(), &none()), Some(3));
    }
}
