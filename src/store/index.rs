//! The in-memory index: one compact entry per key, pointing at the key's latest log entry.
//!
//! A dashmap keyed by the 16-byte key digest, with a fixed shard count and a hasher that is a
//! pure function of the digest (no random state), so the simulator replays runs exactly. The
//! hasher puts the digest's leading bits where dashmap picks its shard, so shard `i` holds
//! exactly the digests whose top bits equal `i`: iterating shards in order, sorting within
//! each, walks keys in digest order without a second ordered structure (snapshot streams).

use std::hash::{BuildHasher, Hash, Hasher};

use dashmap::DashMap;

use super::log::Loc;
use crate::record::{KeyDigest, Record};

/// Default number of index shards (a power of two).
pub const SHARDS_DEFAULT: usize = 256;

/// A key's entry in the index.
///
/// Kept small (the index holds hundreds of millions of keys): the location of the key's newest
/// log entry (from which the rest of the record is reached through back-pointers), the log
/// position a reader must wait for, the expiry of the key's newest generation, and — only while
/// the key has a claim in flight — the decoded record, so the hot path of a claim and its
/// completion never reads the disk.
#[derive(Debug)]
pub struct IndexEntry {
    /// Newest log entry of the key.
    pub loc: Loc,
    /// Log sequence number of that entry: answers derived from it wait until it is durable.
    pub lsn: u64,
    /// Expiry (Unix ms) of the key's newest generation.
    pub expires_at_ms: u64,
    /// The record, while a claim is in flight (a cache; `None` means "read it from the log").
    pub hot: Option<Box<Record>>,
}

/// Builds [`DigestHasher`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct DigestHash;

/// A hasher for [`KeyDigest`]s: the digest is already uniformly random, so it only rearranges
/// bits (see the module doc). Any other input falls back to FNV-1a, deterministically.
#[derive(Debug, Default)]
pub struct DigestHasher {
    words: [u64; 2],
    n: usize,
    fnv: u64,
}

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        if self.fnv == 0 {
            self.fnv = 0xcbf2_9ce4_8422_2325;
        }
        for b in bytes {
            self.fnv = (self.fnv ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.n = usize::MAX;
    }

    fn write_u64(&mut self, v: u64) {
        if self.n < 2 {
            self.words[self.n] = v;
            self.n += 1;
        } else {
            self.write(&v.to_le_bytes());
        }
    }

    fn finish(&self) -> u64 {
        if self.n == 2 {
            // dashmap takes its shard from the bits just below the top 7, which hashbrown uses
            // as its tag: leading digest bits go there, other random bits go on top.
            (self.words[0] >> 7) | (self.words[1] << 57)
        } else {
            self.fnv
        }
    }
}

impl BuildHasher for DigestHash {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher::default()
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (a, b) = self.0.split_at(8);
        let mut w = [0u8; 8];
        w.copy_from_slice(a);
        state.write_u64(u64::from_be_bytes(w));
        w.copy_from_slice(b);
        state.write_u64(u64::from_be_bytes(w));
    }
}

/// The index map.
pub type IndexMap = DashMap<KeyDigest, IndexEntry, DigestHash>;

/// A new, empty index with `shards` shards (rounded up to a power of two, at least 2).
pub fn new_index(shards: usize) -> IndexMap {
    DashMap::with_hasher_and_shard_amount(DigestHash, shards.max(2).next_power_of_two())
}

/// The digests of one shard greater than `after`, sorted. Holds the shard's read lock only
/// while copying the digests out.
pub fn shard_keys_after(
    index: &IndexMap,
    shard: usize,
    after: Option<&KeyDigest>,
) -> Vec<KeyDigest> {
    let mut keys: Vec<KeyDigest> = {
        let guard = index.shards()[shard].read();
        // SAFETY: the shard's read lock is held for the whole iteration, so no bucket is moved
        // or freed while we copy digests out of it, and the references do not outlive it.
        unsafe { guard.iter() }
            .map(|bucket| unsafe { bucket.as_ref() }.0)
            .filter(|k| after.is_none_or(|a| k > a))
            .collect()
    };
    keys.sort_unstable();
    keys
}

/// The shard a digest lives in.
pub fn shard_of(index: &IndexMap, digest: &KeyDigest) -> usize {
    index.determine_map(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordKey;

    #[test]
    fn shards_follow_digest_order() {
        let index = new_index(64);
        let mut digests: Vec<KeyDigest> = (0..2000)
            .map(|i| RecordKey::new("ns", "p", format!("k{i}")).digest())
            .collect();
        digests.sort();
        let shards: Vec<usize> = digests.iter().map(|d| shard_of(&index, d)).collect();
        assert!(
            shards.windows(2).all(|w| w[0] <= w[1]),
            "shard order = digest order"
        );
        assert!(
            shards.iter().any(|s| *s > 32),
            "keys spread over the shards"
        );
    }

    #[test]
    fn shard_keys_are_sorted_and_filtered() {
        let index = new_index(4);
        for i in 0..500 {
            let d = RecordKey::new("ns", "p", format!("k{i}")).digest();
            index.insert(
                d,
                IndexEntry {
                    loc: Loc {
                        segment: 0,
                        offset: 0,
                    },
                    lsn: 0,
                    expires_at_ms: 0,
                    hot: None,
                },
            );
        }
        let mut all = Vec::new();
        for s in 0..index.shards().len() {
            all.extend(shard_keys_after(&index, s, None));
        }
        assert_eq!(all.len(), 500);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let mid = all[250];
        let shard = shard_of(&index, &mid);
        let rest = shard_keys_after(&index, shard, Some(&mid));
        assert!(rest.iter().all(|k| *k > mid));
    }
}
