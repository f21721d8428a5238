//! Hint files: a compact summary of a sealed log segment, so a restart rebuilds the index
//! without decoding every entry (Bitcask's hint files).
//!
//! A hint lists, per frame that matters to recovery, its *effect*: where a key's newest entry
//! lies and when its generation expires, which (origin, seq) it carries, which clock
//! reservation it logged. Recovery applies the effects of a hinted segment exactly as it would
//! apply the decoded frames, so both paths produce the same state (a test checks this).
//!
//! Hints are written only for segments that can never grow again: sealed, and older than the
//! segment holding the durable end of the log (a crash can drop a newer segment whose first
//! frame was never durable, which would make its predecessor the tail again). Each hint also
//! records where the segment's frames end; recovery checks that no frame starts there, and
//! falls back to scanning the segment if the check or the hint's checksum fails.

use serde::{Deserialize, Serialize};

use super::entry::{Floor, LogEntry};
use super::log::Loc;
use super::storage::SegmentId;
use crate::clock::RegionId;
use crate::record::KeyDigest;

/// Version 2: key digests are keyed BLAKE3 with LEB128 length prefixes (version 1 hints hold
/// digests of the old definition and are ignored: those segments are scanned).
const HINT_VERSION: u32 = 2;
/// Largest hint file read back (a 64 MiB segment of the smallest entries is far below this).
const HINT_BYTES_MAX: usize = 256 << 20;

/// What one log frame contributes to recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Effect {
    /// A key's newest entry (a mutation or an image).
    Record {
        /// The key's digest.
        digest: KeyDigest,
        /// Where the entry lies.
        loc: Loc,
        /// Expiry of the key's newest generation after it (Unix ms).
        expires_at_ms: u64,
        /// For a mutation: its origin, sequence number and stamp's hlc value.
        numbered: Option<(RegionId, u64, u64)>,
    },
    /// A clock reservation.
    Reserve {
        /// Unix ms.
        until_ms: u64,
    },
    /// Marks adopted from a snapshot: (origin, mark).
    Adopt {
        /// Per origin, every number up to the mark counts as held.
        marks: Vec<(RegionId, u64)>,
    },
    /// A region retired: its log counts up to `last_seq`.
    Retire {
        /// The region.
        region: RegionId,
        /// Its last number that counts.
        last_seq: u64,
    },
    /// What deleted segments held.
    Floor(Floor),
}

/// The effect of a decoded log entry at `loc`, if it has one.
pub(super) fn effect_of(loc: Loc, entry: &LogEntry) -> Option<Effect> {
    match entry {
        LogEntry::Mutation {
            mutation,
            expires_at_ms,
            ..
        } => Some(Effect::Record {
            digest: mutation.key.digest(),
            loc,
            expires_at_ms: *expires_at_ms,
            numbered: Some((mutation.origin, mutation.seq, mutation.delta.stamp().hlc)),
        }),
        LogEntry::Image {
            key, expires_at_ms, ..
        } => Some(Effect::Record {
            digest: key.digest(),
            loc,
            expires_at_ms: *expires_at_ms,
            numbered: None,
        }),
        // `decode` returns local entries as mutations; the same effect if one is built by hand.
        LogEntry::Local {
            origin,
            key,
            delta,
            expires_at_ms,
            seq,
            ..
        } => Some(Effect::Record {
            digest: key.digest(),
            loc,
            expires_at_ms: *expires_at_ms,
            numbered: Some((*origin, *seq, delta.stamp().hlc)),
        }),
        LogEntry::Reserve { until_ms } => Some(Effect::Reserve {
            until_ms: *until_ms,
        }),
        LogEntry::Marks { marks } => Some(Effect::Adopt {
            marks: marks.clone(),
        }),
        LogEntry::Retired { region, last_seq } => Some(Effect::Retire {
            region: *region,
            last_seq: *last_seq,
        }),
        LogEntry::Floor(f) => Some(Effect::Floor(f.clone())),
    }
}

#[derive(Serialize, Deserialize)]
struct HintFile {
    version: u32,
    segment: SegmentId,
    /// Where the segment's frames end.
    end: Loc,
    effects: Vec<Effect>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HINT_BYTES_MAX>()
}

/// Encodes a segment's hint: bincode, then a CRC32C of it.
pub(super) fn encode(segment: SegmentId, end: Loc, effects: Vec<Effect>) -> Option<Vec<u8>> {
    let file = HintFile {
        version: HINT_VERSION,
        segment,
        end,
        effects,
    };
    let mut bytes = bincode::serde::encode_to_vec(&file, config()).ok()?;
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Some(bytes)
}

/// Decodes a hint for `segment`; `None` if it is damaged, of another version or segment.
pub(super) fn decode(segment: SegmentId, bytes: &[u8]) -> Option<(Loc, Vec<Effect>)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let (file, used): (HintFile, usize) = bincode::serde::decode_from_slice(body, config()).ok()?;
    (used == body.len() && file.version == HINT_VERSION && file.segment == segment)
        .then_some((file.end, file.effects))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let loc = Loc {
            segment: 3,
            offset: 16,
        };
        let effects = vec![Effect::Reserve { until_ms: 9 }];
        let bytes = encode(3, loc, effects.clone()).unwrap();
        assert_eq!(decode(3, &bytes), Some((loc, effects)));
        assert_eq!(decode(4, &bytes), None, "another segment's hint");
        let mut bad = bytes.clone();
        bad[2] ^= 1;
        assert_eq!(decode(3, &bad), None);
        assert_eq!(decode(3, &bytes[..3]), None);
        assert_eq!(decode(3, &[]), None);
    }
}
