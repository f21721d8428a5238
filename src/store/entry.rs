//! What the store writes into its log, and how it is encoded.
//!
//! One bincode configuration, fixed for the life of the format; a decode limit on every read.
//! Entries are a versioned enum: a variant never gains a field, new kinds are new variants.

use serde::{Deserialize, Serialize};

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
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<ENTRY_BYTES_MAX>()
}

/// Encodes an entry.
pub fn encode(entry: &LogEntry) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(entry, config())
}

/// Decodes an entry; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<LogEntry, bincode::error::DecodeError> {
    let (entry, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after a log entry",
            bytes.len() - used
        )));
    }
    Ok(entry)
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
    fn entries_round_trip() {
        let e = LogEntry::Reserve { until_ms: 42 };
        assert_eq!(decode(&encode(&e).unwrap()).unwrap(), e);
    }
}
