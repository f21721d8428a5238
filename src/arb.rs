//! Proptest generators for the crate's data types, shared by the property tests of every
//! module (the log encoder's, the wire codec's). They lean on the edges of bincode's varints and
//! on multi-byte UTF-8, where encoders go wrong.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::clock::{RegionId, Stamp};
use crate::record::{
    AttemptToken, Body, ClaimFacts, Delta, Fingerprint, ItemId, Outcome, Record, RecordKey,
    Resolution, Terminal,
};

/// Values on both sides of every varint boundary, and the extremes.
pub(crate) const U64_EDGES: &[u64] = &[
    0,
    1,
    250,
    251,
    252,
    65_535,
    65_536,
    (1 << 32) - 1,
    1 << 32,
    u64::MAX - 1,
    u64::MAX,
];

/// Values on both sides of the `u64`/`u128` boundary, and the extremes.
pub(crate) const U128_EDGES: &[u128] = &[
    u64::MAX as u128,
    u64::MAX as u128 + 1,
    u128::MAX - 1,
    u128::MAX,
];

/// Any `u64`, often one at a varint boundary.
pub(crate) fn u64s() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => proptest::sample::select(U64_EDGES),
        1 => 0u64..300,
        1 => 60_000u64..70_000,
        2 => any::<u64>(),
    ]
}

/// Any `u32`, often one at a varint boundary.
pub(crate) fn u32s() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => proptest::sample::select(&[0, 250, 251, 65_535, 65_536, u32::MAX - 1, u32::MAX][..]),
        2 => any::<u32>(),
    ]
}

/// Any `u16`, often one at a varint boundary.
pub(crate) fn u16s() -> impl Strategy<Value = u16> {
    prop_oneof![
        1 => proptest::sample::select(&[0, 200, 250, 251, 500, u16::MAX][..]),
        1 => any::<u16>(),
    ]
}

/// Any `u128`: small, at the `u64`/`u128` boundary, or anything.
pub(crate) fn u128s() -> impl Strategy<Value = u128> {
    prop_oneof![
        2 => u64s().prop_map(u128::from),
        1 => proptest::sample::select(U128_EDGES),
        2 => any::<u128>(),
    ]
}

/// Byte lengths around the varint boundaries (mostly short).
pub(crate) fn lens() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 0usize..40,
        2 => proptest::sample::select(&[0usize, 1, 100, 250, 251, 252][..]),
        1 => proptest::sample::select(&[65_535usize, 65_536][..]),
    ]
}

/// Any string: arbitrary (empty, multi-byte UTF-8), or one of a boundary byte length that
/// starts with an arbitrary character.
pub(crate) fn strings() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => (lens(), any::<char>()).prop_map(|(n, c)| {
            let mut s = String::with_capacity(n);
            if c.len_utf8() <= n {
                s.push(c);
            }
            while s.len() < n {
                s.push('a');
            }
            s
        }),
    ]
}

/// Any byte string, of an arbitrary or a boundary length.
pub(crate) fn byte_strings() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => vec(any::<u8>(), 0..300),
        1 => (lens(), any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

pub(crate) fn regions() -> impl Strategy<Value = RegionId> {
    "[a-z0-9_-]{1,15}".prop_map(|s| RegionId::new(&s).unwrap())
}

pub(crate) fn stamps() -> impl Strategy<Value = Stamp> {
    (u64s(), regions()).prop_map(|(hlc, r)| Stamp::new(hlc, r))
}

pub(crate) fn keys() -> impl Strategy<Value = RecordKey> {
    (strings(), strings(), strings()).prop_map(|(n, p, k)| RecordKey::new(n, p, k))
}

/// A few takeovers, or (rarely) more than fit a one-byte length.
pub(crate) fn takeovers() -> impl Strategy<Value = Vec<Stamp>> {
    prop_oneof![
        8 => vec(stamps(), 0..4),
        1 => vec(stamps(), 250..253),
    ]
}

pub(crate) fn facts() -> impl Strategy<Value = ClaimFacts> {
    (
        any::<[u8; 32]>(),
        u128s(),
        u64s(),
        u64s(),
        u64s(),
        takeovers(),
    )
        .prop_map(
            |(fp, attempt, ttl_ms, lease_ms, origin_seq, takes_over)| ClaimFacts {
                fingerprint: Fingerprint(fp),
                attempt: AttemptToken(attempt),
                ttl_ms,
                lease_ms,
                origin_seq,
                takes_over,
            },
        )
}

pub(crate) fn bodies() -> impl Strategy<Value = Body> {
    prop_oneof![
        byte_strings().prop_map(Body::Full),
        (u64s(), any::<[u8; 32]>()).prop_map(|(len, blake3)| Body::Digest { len, blake3 }),
        byte_strings().prop_map(Body::Redacted),
    ]
}

/// A few headers, or (rarely) more than fit a one-byte length.
pub(crate) fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop_oneof![
        8 => vec((strings(), strings()), 0..4),
        1 => vec(("[a-z]{0,3}", "\\PC{0,3}"), 250..253),
    ]
}

pub(crate) fn outcomes() -> impl Strategy<Value = Outcome> {
    (u16s(), headers(), bodies()).prop_map(|(status, headers, body)| Outcome {
        status,
        headers,
        body,
    })
}

pub(crate) fn terminals() -> impl Strategy<Value = Terminal> {
    prop_oneof![
        Just(Terminal::Released),
        outcomes().prop_map(Terminal::Completed),
        outcomes().prop_map(Terminal::Indeterminate),
    ]
}

pub(crate) fn resolutions() -> impl Strategy<Value = Resolution> {
    (
        any::<[u8; 16]>(),
        stamps(),
        strings(),
        strings(),
        proptest::option::of(strings()),
        proptest::option::of(strings()),
    )
        .prop_map(
            |(item, at, by, note, hook_result, provider_ref)| Resolution {
                item: ItemId(item),
                at,
                by,
                note,
                hook_result,
                provider_ref,
            },
        )
}

/// Every delta variant. Deltas are not validated: the encoder takes whatever it is given.
pub(crate) fn deltas() -> impl Strategy<Value = Delta> {
    prop_oneof![
        (stamps(), facts()).prop_map(|(stamp, facts)| Delta::Claim { stamp, facts }),
        (stamps(), u64s()).prop_map(|(stamp, lease_until_ms)| Delta::Extend {
            stamp,
            lease_until_ms
        }),
        (stamps(), terminals()).prop_map(|(stamp, terminal)| Delta::Finish { stamp, terminal }),
        resolutions().prop_map(Delta::Resolve),
    ]
}

/// A record made of a few deltas (those it refuses are left out): claims, terminals and
/// resolutions of arbitrary shape.
pub(crate) fn records() -> impl Strategy<Value = Record> {
    vec(deltas(), 0..4).prop_map(|ds| {
        let mut r = Record::new();
        for d in &ds {
            let _ = r.apply(d);
        }
        r
    })
}
