//! What the store writes into its log, and how it is encoded.
//!
//! One bincode configuration, fixed for the life of the format; a decode limit on every read.
//! Entries are a versioned enum: a variant never gains a field, new kinds are new variants.

use serde::{Deserialize, Serialize};

use super::encode::MutationEntry;
use super::log::Loc;
use crate::clock::RegionId;
use crate::record::{Delta, Record, RecordKey};

/// Largest encoded entry the store decodes (a stored outcome is at most 8 MiB).
pub const ENTRY_BYTES_MAX: usize = 9 << 20;

/// A replicated mutation: one delta of one key, numbered densely per origin region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutation {
    /// The region whose log numbered it.
    pub origin: RegionId,
    /// Its number in the origin's log (from 1, dense).
    pub seq: u64,
    /// The key.
    pub key: RecordKey,
    /// The change.
    pub delta: Delta,
}

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEntry {
    /// A mutation (local or received), with local bookkeeping that is never replicated.
    Mutation {
        /// The replicated part.
        mutation: Mutation,
        /// The key's previous log entry: a record is read back by following these.
        prev: Option<Loc>,
        /// Expiry of the key's newest generation after this mutation (Unix ms), so recovery
        /// rebuilds the index without reading records.
        expires_at_ms: u64,
    },
    /// The clock's durable reservation: no stamp above `until_ms` is issued before this entry
    /// is durable.
    Reserve {
        /// Unix ms.
        until_ms: u64,
    },
    /// A key's whole record, written when its back-pointer chain grows long, so reads stay
    /// short. Local only: it ends the chain.
    Image {
        /// The key.
        key: RecordKey,
        /// The record at that point.
        record: Record,
        /// Expiry of its newest generation (Unix ms).
        expires_at_ms: u64,
    },
    /// Per-origin marks: the contiguous prefix of each origin's log held here.
    Marks {
        /// (origin, contiguous mark).
        marks: Vec<(RegionId, u64)>,
    },
    /// A mutation of this region's own, as the store writes it: the same facts as
    /// [`LogEntry::Mutation`], with the sequence number last so the log can take it under its
    /// lock and append it after everything else is encoded (a claim's `origin_seq` is written
    /// as 0: it equals `seq`). [`decode`] returns it as [`LogEntry::Mutation`], with a claim's
    /// `origin_seq` set to `seq`, so no reader ever sees this variant.
    Local {
        /// This region.
        origin: RegionId,
        /// The key.
        key: RecordKey,
        /// The change.
        delta: Delta,
        /// The key's previous log entry.
        prev: Option<Loc>,
        /// Expiry of the key's newest generation after this mutation (Unix ms).
        expires_at_ms: u64,
        /// Its number in this region's log.
        seq: u64,
    },
    /// A region retired for good (see the store's `retire` module): its log counts up to
    /// `last_seq`. Joined by the largest `last_seq`.
    Retired {
        /// The retired region.
        region: RegionId,
        /// Its last sequence number that counts.
        last_seq: u64,
    },
    /// Written before a segment is deleted (see the store's `gc` module).
    Floor(Floor),
}

/// What deleted segments held that recovery still needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// Per origin (this region's own included), every number up to here is held in effect and
    /// no longer served.
    pub marks: Vec<(RegionId, u64)>,
    /// The clock's reservation when it was written (Unix ms).
    pub reservation_ms: u64,
    /// The largest hlc value issued or seen when it was written.
    pub max_hlc: u64,
    /// Every retirement, joined.
    pub retired: Vec<(RegionId, u64)>,
}

/// Decodes the entry read at `loc`; damage is [`super::StoreError::Corrupt`], naming where.
pub(super) fn decode_at(loc: Loc, bytes: &[u8]) -> Result<LogEntry, super::StoreError> {
    decode(bytes).map_err(|e| {
        super::StoreError::Corrupt(format!(
            "segment {} offset {}: {e}",
            loc.segment, loc.offset
        ))
    })
}

/// Why an entry could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Larger than [`ENTRY_BYTES_MAX`]: it could never be read back.
    #[error("log entry of {0} bytes exceeds the {ENTRY_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    /// bincode refused it.
    #[error("encoding a log entry: {0}")]
    Bincode(#[from] bincode::error::EncodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<ENTRY_BYTES_MAX>()
}

fn checked(bytes: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
    // bincode enforces its limit only when decoding: refuse here what could never be read back.
    if bytes.len() > ENTRY_BYTES_MAX {
        return Err(EncodeError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Encodes an entry.
pub fn encode(entry: &LogEntry) -> Result<Vec<u8>, EncodeError> {
    checked(bincode::serde::encode_to_vec(entry, config())?)
}

thread_local! {
    /// Per-thread scratch buffer the hot path encodes mutation entries into.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scratch capacity above which the buffer is dropped after use, so a thread does not keep a
/// huge buffer for its lifetime.
const SCRATCH_KEEP_MAX: usize = 1 << 20;

/// Encodes a mutation entry from borrowed parts (the bytes equal those of the owned entry)
/// into a per-thread scratch buffer, and hands them to `f`: the hot path neither clones the
/// key and delta nor allocates an output buffer per entry.
///
/// The bytes come from a hand-written encoder (the store's `encode` module), not from
/// bincode's serde path, which costs several times more. An entry over [`ENTRY_BYTES_MAX`] is
/// refused before `f` sees it, so before anything reaches the log.
pub fn with_encoded_mutation<R>(
    origin: RegionId,
    seq: u64,
    key: &RecordKey,
    delta: &Delta,
    prev: Option<Loc>,
    expires_at_ms: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, EncodeError> {
    let entry = MutationEntry {
        origin,
        seq,
        key,
        delta,
        prev,
        expires_at_ms,
        local: false,
    };
    with_scratch(&entry, f)
}

/// Encodes a local mutation as [`LogEntry::Local`] *without* its final sequence number, into the
/// per-thread scratch buffer, for [`Log::append_sequenced`](super::log::Log::append_sequenced),
/// which appends the number under the log's lock. A claim's `origin_seq` must be 0 here.
pub fn with_local_mutation<R>(
    origin: RegionId,
    key: &RecordKey,
    delta: &Delta,
    prev: Option<Loc>,
    expires_at_ms: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, EncodeError> {
    debug_assert!(!matches!(delta, Delta::Claim { facts, .. } if facts.origin_seq != 0));
    let entry = MutationEntry {
        origin,
        seq: 0,
        key,
        delta,
        prev,
        expires_at_ms,
        local: true,
    };
    with_scratch(&entry, f)
}

/// Encodes `entry` into the per-thread scratch buffer, refuses it if it could never be read
/// back, and hands the bytes to `f`.
fn with_scratch<R>(
    entry: &MutationEntry<'_>,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, EncodeError> {
    SCRATCH.with(|cell| {
        // A re-entrant use (never expected) falls back to a fresh buffer.
        let mut fresh = Vec::new();
        let mut guard = cell.try_borrow_mut().ok();
        let buf = guard.as_deref_mut().unwrap_or(&mut fresh);
        buf.clear();
        entry.encode_into(buf);
        // bincode enforces its limit only when decoding: refuse here what could never be read
        // back (a local entry gets its 9-byte sequence trailer in the log). Nothing has reached
        // the log yet.
        let full = buf.len()
            + if entry.local {
                super::encode::SEQ_TRAILER_BYTES
            } else {
                0
            };
        if full > ENTRY_BYTES_MAX {
            if buf.capacity() > SCRATCH_KEEP_MAX {
                *buf = Vec::new();
            }
            return Err(EncodeError::TooLarge(full));
        }
        let out = f(buf);
        if buf.capacity() > SCRATCH_KEEP_MAX {
            *buf = Vec::new();
        }
        Ok(out)
    })
}

/// Encodes a mutation entry from borrowed parts; the bytes equal those of the owned entry.
pub fn encode_mutation(
    origin: RegionId,
    seq: u64,
    key: &RecordKey,
    delta: &Delta,
    prev: Option<Loc>,
    expires_at_ms: u64,
) -> Result<Vec<u8>, EncodeError> {
    with_encoded_mutation(origin, seq, key, delta, prev, expires_at_ms, |b| b.to_vec())
}

/// Decodes an entry; trailing bytes are an error. A [`LogEntry::Local`] comes back as the
/// [`LogEntry::Mutation`] it stands for.
pub fn decode(bytes: &[u8]) -> Result<LogEntry, bincode::error::DecodeError> {
    let (entry, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after a log entry",
            bytes.len() - used
        )));
    }
    Ok(match entry {
        LogEntry::Local {
            origin,
            key,
            mut delta,
            prev,
            expires_at_ms,
            seq,
        } => {
            if let Delta::Claim { facts, .. } = &mut delta {
                facts.origin_seq = seq;
            }
            LogEntry::Mutation {
                mutation: Mutation {
                    origin,
                    seq,
                    key,
                    delta,
                },
                prev,
                expires_at_ms,
            }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics_the_decoder() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn borrowed_and_owned_mutations_encode_alike() {
        use crate::clock::Stamp;
        use crate::record::Terminal;
        let region = RegionId::new("a").unwrap();
        let key = RecordKey::new("ns", "p", "k");
        let delta = Delta::Finish {
            stamp: Stamp::new(7, region),
            terminal: Terminal::Released,
        };
        let prev = Some(Loc {
            segment: 1,
            offset: 8,
        });
        let owned = LogEntry::Mutation {
            mutation: Mutation {
                origin: region,
                seq: 3,
                key: key.clone(),
                delta: delta.clone(),
            },
            prev,
            expires_at_ms: 99,
        };
        let borrowed = encode_mutation(region, 3, &key, &delta, prev, 99).unwrap();
        assert_eq!(borrowed, encode(&owned).unwrap());
        assert_eq!(decode(&borrowed).unwrap(), owned);
    }

    #[test]
    fn the_scratch_buffer_never_keeps_a_huge_entry_and_tolerates_reentry() {
        use crate::clock::Stamp;
        use crate::record::{Outcome, Terminal};
        let region = RegionId::new("a").unwrap();
        let key = RecordKey::new("ns", "p", "k");
        let finish = |body: Vec<u8>| Delta::Finish {
            stamp: Stamp::new(7, region),
            terminal: Terminal::Completed(Outcome::new(200, body)),
        };
        let scratch = || SCRATCH.with(|c| c.borrow().capacity());
        let big = finish(vec![7; 2 * SCRATCH_KEEP_MAX]);
        let n = with_encoded_mutation(region, 1, &key, &big, None, 0, |b| b.len()).unwrap();
        assert!(n > 2 * SCRATCH_KEEP_MAX);
        assert!(scratch() <= SCRATCH_KEEP_MAX);
        let huge = finish(vec![0; ENTRY_BYTES_MAX]);
        let refused = with_encoded_mutation(region, 1, &key, &huge, None, 0, |b| b.len());
        assert!(matches!(refused, Err(EncodeError::TooLarge(_))));
        assert!(scratch() <= SCRATCH_KEEP_MAX);
        let small = finish(b"ok".to_vec());
        let (outer, inner) = with_encoded_mutation(region, 2, &key, &small, None, 9, |outer| {
            let inner = encode_mutation(region, 2, &key, &small, None, 9).unwrap();
            (outer.to_vec(), inner)
        })
        .unwrap();
        assert_eq!(outer, inner);
    }

    #[test]
    fn oversized_entries_are_refused_before_they_are_written() {
        let e = LogEntry::Marks {
            marks: vec![(RegionId::new("a").unwrap(), 1); ENTRY_BYTES_MAX / 2],
        };
        assert!(matches!(encode(&e), Err(EncodeError::TooLarge(_))));
    }

    #[test]
    fn entries_round_trip() {
        let e = LogEntry::Reserve { until_ms: 42 };
        assert_eq!(decode(&encode(&e).unwrap()).unwrap(), e);
    }
}
