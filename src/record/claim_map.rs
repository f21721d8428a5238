//! The claims of one record, ordered by stamp.
//!
//! Almost every record holds one or two claims, so a sorted vector beats a B-tree here: one
//! small allocation instead of a node sized for eleven entries, and a scan of one or two
//! stamps instead of a tree walk. A record holds at most a bounded number of claims (the
//! store caps it), so inserting in the middle stays cheap.
//!
//! On the wire and on disk it is encoded exactly as the `BTreeMap<Stamp, ClaimState>` it
//! replaced (a map); decoding goes through a `BTreeMap`, so untrusted input can never produce
//! an unsorted or duplicated vector.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::claim::ClaimState;
use crate::clock::Stamp;

/// Claims by stamp, ascending, no repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClaimMap {
    entries: Vec<(Stamp, ClaimState)>,
}

impl ClaimMap {
    /// Removes every claim, keeping the allocation.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Claims the allocation holds room for.
    pub(crate) fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    fn position(&self, stamp: &Stamp) -> Result<usize, usize> {
        // Newest claims are looked up most: check the last one before searching.
        match self.entries.last() {
            Some((s, _)) if s == stamp => Ok(self.entries.len() - 1),
            Some((s, _)) if s < stamp => Err(self.entries.len()),
            _ => self.entries.binary_search_by(|(s, _)| s.cmp(stamp)),
        }
    }

    /// The claim with this stamp.
    pub(crate) fn get(&self, stamp: &Stamp) -> Option<&ClaimState> {
        self.position(stamp).ok().map(|i| &self.entries[i].1)
    }

    /// The claim with this stamp, mutably.
    pub(crate) fn get_mut(&mut self, stamp: &Stamp) -> Option<&mut ClaimState> {
        self.position(stamp).ok().map(|i| &mut self.entries[i].1)
    }

    /// The claim with this stamp, inserted empty if absent; and whether it was inserted.
    pub(crate) fn get_or_default(&mut self, stamp: Stamp) -> (&mut ClaimState, bool) {
        match self.position(&stamp) {
            Ok(i) => (&mut self.entries[i].1, false),
            Err(i) => {
                self.entries.insert(i, (stamp, ClaimState::default()));
                (&mut self.entries[i].1, true)
            }
        }
    }

    /// Inserts a claim that is absent (replaces it if present).
    pub(crate) fn insert(&mut self, stamp: Stamp, state: ClaimState) {
        match self.position(&stamp) {
            Ok(i) => self.entries[i].1 = state,
            Err(i) => self.entries.insert(i, (stamp, state)),
        }
    }

    /// The claims in stamp order.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&Stamp, &ClaimState)> {
        self.entries.iter().map(|(s, c)| (s, c))
    }

    /// The number of claims.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no claim.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Serialize for ClaimMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for ClaimMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<Stamp, ClaimState>::deserialize(deserializer)?;
        Ok(Self {
            entries: map.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::RegionId;

    fn stamp(hlc: u64, region: &str) -> Stamp {
        Stamp::new(hlc, RegionId::new(region).unwrap())
    }

    #[test]
    fn keeps_stamp_order_whatever_the_insertion_order() {
        let mut m = ClaimMap::default();
        for (h, r) in [(5, "b"), (1, "a"), (5, "a"), (9, "a"), (3, "c")] {
            let (_, fresh) = m.get_or_default(stamp(h, r));
            assert!(fresh);
        }
        let (_, fresh) = m.get_or_default(stamp(5, "a"));
        assert!(!fresh, "a present stamp is not inserted twice");
        let order: Vec<Stamp> = m.iter().map(|(s, _)| *s).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        assert_eq!(m.len(), 5);
        assert!(m.get(&stamp(3, "c")).is_some());
        assert!(m.get_mut(&stamp(3, "a")).is_none());
        assert!(m.get(&stamp(4, "a")).is_none());
    }

    #[test]
    fn encodes_exactly_as_the_btree_map_it_replaced() {
        let cfg = bincode::config::standard();
        let mut m = ClaimMap::default();
        let mut b = BTreeMap::new();
        for (h, r) in [(7, "z"), (2, "a"), (7, "a")] {
            let c = ClaimState {
                lease_until_ms: h * 10,
                ..ClaimState::default()
            };
            m.insert(stamp(h, r), c.clone());
            b.insert(stamp(h, r), c);
        }
        let ours = bincode::serde::encode_to_vec(&m, cfg).unwrap();
        assert_eq!(ours, bincode::serde::encode_to_vec(&b, cfg).unwrap());
        let (back, _): (ClaimMap, usize) = bincode::serde::decode_from_slice(&ours, cfg).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn decoding_sorts_and_deduplicates_untrusted_input() {
        // A hand-made map with keys out of order and one repeated: decoded sorted, no repeat.
        let cfg = bincode::config::standard();
        let entries = vec![
            (stamp(9, "a"), ClaimState::default()),
            (stamp(1, "a"), ClaimState::default()),
            (stamp(9, "a"), ClaimState::default()),
        ];
        let bytes = bincode::serde::encode_to_vec(&entries, cfg).unwrap();
        let (m, _): (ClaimMap, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        let order: Vec<Stamp> = m.iter().map(|(s, _)| *s).collect();
        assert_eq!(order, vec![stamp(1, "a"), stamp(9, "a")]);
    }
}
