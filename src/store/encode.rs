//! A hand-written encoder for [`LogEntry::Mutation`](super::entry::LogEntry::Mutation), the
//! hot entry of the log.
//!
//! It writes exactly the bytes bincode's serde encoding writes with the log's configuration
//! (`bincode::config::standard()`: variable-length integers, little endian), so decoding stays
//! bincode and the on-disk format is unchanged. It exists because bincode's serde path goes
//! through generic code for every value, down to one call per byte of a response body.
//!
//! The layout, from the serde impls of the types involved and bincode 2's serde rules:
//!
//! * unsigned integers (`u16`, `u32`, `u64`, `u128`, `usize` lengths and enum variant indices)
//!   are varints: below 251 one byte, else a marker byte (251, 252, 253, 254) and the value as
//!   `u16`, `u32`, `u64` or `u128` little endian, whichever is the narrowest that holds it;
//! * `u8` is one raw byte, so fixed byte arrays (`[u8; N]`) are their N bytes, with no length;
//! * strings, `Vec<u8>` and other sequences are a varint length and then their elements;
//! * `Option` is byte 0, or byte 1 and the value;
//! * structs and tuples are their fields in order; newtypes are their content;
//! * enum variants are a varint index and then their content.
//!
//! Every type involved derives its serde impls, except [`RegionId`], which serializes as a
//! string.
//!
//! One generic walk ([`MutationEntry::emit`]) both measures an entry and writes it, so the two
//! never disagree: the caller learns the exact size before writing anything, refuses an entry
//! that could never be read back, and sizes the buffer once.
//!
//! # Local entries and the sequence trailer
//!
//! A local mutation's sequence number must follow log order, so it is known only under the log's
//! lock. To keep encoding (and most of the frame's CRC) out of that lock, the store writes its own
//! mutations as [`LogEntry::Local`](super::entry::LogEntry::Local), whose last field is the
//! sequence number: [`MutationEntry::local`] encodes everything before it, and the log appends
//! the number as a 9-byte varint ([`seq_trailer`]: marker 253, then 8 bytes, which bincode
//! decodes like any varint) under its lock, extending the CRC over those 9 bytes.

//! The layout is tied to the declarations: variant indices follow declaration order, fields
//! follow field order. Reordering a variant or a field, or changing a serde impl, must change
//! this encoder too; the property test here compares it with bincode on arbitrary entries
//! and catches any drift.

use super::log::Loc;
use crate::clock::{RegionId, Stamp};
use crate::record::{Body, ClaimFacts, Delta, Outcome, RecordKey, Resolution, Terminal};

/// Varint marker: a `u16` follows.
const U16_BYTE: u8 = 251;
/// Varint marker: a `u32` follows.
const U32_BYTE: u8 = 252;
/// Varint marker: a `u64` follows.
const U64_BYTE: u8 = 253;
/// Varint marker: a `u128` follows.
const U128_BYTE: u8 = 254;
/// Largest value a varint holds in its single byte.
const SINGLE_BYTE_MAX: u8 = 250;

/// [`LogEntry`](super::entry::LogEntry)'s variant index of `Mutation`.
const LOG_ENTRY_MUTATION: u32 = 0;
/// [`LogEntry`](super::entry::LogEntry)'s variant index of `Local`.
const LOG_ENTRY_LOCAL: u32 = 4;

/// Where encoded bytes go: a slice, or a counter that only measures.
trait Sink {
    /// Appends one byte.
    fn byte(&mut self, b: u8);
    /// Appends bytes.
    fn bytes(&mut self, b: &[u8]);
}

/// Bytes of the sequence trailer of a local entry.
pub(super) const SEQ_TRAILER_BYTES: usize = 9;

/// The trailer that ends a local entry: its sequence number as the 9-byte varint form.
pub(super) fn seq_trailer(seq: u64) -> [u8; SEQ_TRAILER_BYTES] {
    let mut t = [0u8; SEQ_TRAILER_BYTES];
    t[0] = U64_BYTE;
    t[1..].copy_from_slice(&seq.to_le_bytes());
    t
}

/// Appends to a buffer (the per-thread scratch buffer keeps its capacity, so it seldom grows).
impl Sink for Vec<u8> {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.push(b);
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Counts the bytes an encoding would take, writing nothing.
#[cfg(test)]
#[derive(Default)]
struct Measure(usize);

#[cfg(test)]
impl Sink for Measure {
    #[inline(always)]
    fn byte(&mut self, _: u8) {
        self.0 += 1;
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

/// A varint of a `u64` (also `usize` lengths, `u32` and `u16`: for a value that fits, each
/// narrower type's varint is the same bytes).
#[inline(always)]
fn varint<S: Sink>(out: &mut S, v: u64) {
    if v <= u64::from(SINGLE_BYTE_MAX) {
        out.byte(v as u8);
    } else if v <= u64::from(u16::MAX) {
        out.byte(U16_BYTE);
        out.bytes(&(v as u16).to_le_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.byte(U32_BYTE);
        out.bytes(&(v as u32).to_le_bytes());
    } else {
        out.byte(U64_BYTE);
        out.bytes(&v.to_le_bytes());
    }
}

/// A varint of a `u128`: a `u64` varint unless the value needs more than 64 bits.
#[inline(always)]
fn varint_u128<S: Sink>(out: &mut S, v: u128) {
    match u64::try_from(v) {
        Ok(v) => varint(out, v),
        Err(_) => {
            out.byte(U128_BYTE);
            out.bytes(&v.to_le_bytes());
        }
    }
}

/// A sequence length (bincode encodes `usize` as `u64`).
#[inline(always)]
fn len<S: Sink>(out: &mut S, n: usize) {
    varint(out, n as u64);
}

/// A byte sequence (`&str` or `Vec<u8>`): its length, then its bytes.
#[inline(always)]
fn byte_seq<S: Sink>(out: &mut S, b: &[u8]) {
    len(out, b.len());
    out.bytes(b);
}

/// An optional string.
#[inline(always)]
fn opt_str<S: Sink>(out: &mut S, s: Option<&str>) {
    match s {
        None => out.byte(0),
        Some(s) => {
            out.byte(1);
            byte_seq(out, s.as_bytes());
        }
    }
}

/// A region id: its serde impl writes it as a string. `as_bytes` is that string's bytes: a
/// region id holds only validated ASCII.
#[inline(always)]
fn region<S: Sink>(out: &mut S, r: &RegionId) {
    byte_seq(out, r.as_bytes());
}

/// A stamp: `hlc`, then `region`.
#[inline(always)]
fn stamp<S: Sink>(out: &mut S, s: &Stamp) {
    varint(out, s.hlc);
    region(out, &s.region);
}

/// A record key: `namespace`, `principal`, `key`.
#[inline(always)]
fn record_key<S: Sink>(out: &mut S, k: &RecordKey) {
    byte_seq(out, k.namespace().as_bytes());
    byte_seq(out, k.principal().as_bytes());
    byte_seq(out, k.key().as_bytes());
}

/// A claim's facts, in field order.
#[inline(always)]
fn claim_facts<S: Sink>(out: &mut S, f: &ClaimFacts) {
    out.bytes(&f.fingerprint.0);
    varint_u128(out, f.attempt.0);
    varint(out, f.ttl_ms);
    varint(out, f.lease_ms);
    varint(out, f.origin_seq);
    len(out, f.takes_over.len());
    for s in &f.takes_over {
        stamp(out, s);
    }
}

/// A stored response body: variant index, then `Full`/`Redacted` bytes or `Digest` fields.
#[inline(always)]
fn body<S: Sink>(out: &mut S, b: &Body) {
    match b {
        Body::Full(bytes) => {
            varint(out, 0);
            byte_seq(out, bytes);
        }
        Body::Digest { len, blake3 } => {
            varint(out, 1);
            varint(out, *len);
            out.bytes(blake3);
        }
        Body::Redacted(bytes) => {
            varint(out, 2);
            byte_seq(out, bytes);
        }
    }
}

/// A stored response: `status`, `headers` (a sequence of string pairs), `body`.
#[inline(always)]
fn outcome<S: Sink>(out: &mut S, o: &Outcome) {
    varint(out, u64::from(o.status));
    len(out, o.headers.len());
    for (name, value) in &o.headers {
        byte_seq(out, name.as_bytes());
        byte_seq(out, value.as_bytes());
    }
    body(out, &o.body);
}

/// A terminal write: variant index, then the outcome unless released.
#[inline(always)]
fn terminal<S: Sink>(out: &mut S, t: &Terminal) {
    match t {
        Terminal::Released => varint(out, 0),
        Terminal::Completed(o) => {
            varint(out, 1);
            outcome(out, o);
        }
        Terminal::Indeterminate(o) => {
            varint(out, 2);
            outcome(out, o);
        }
    }
}

/// A resolution, in field order.
fn resolution<S: Sink>(out: &mut S, r: &Resolution) {
    out.bytes(&r.item.0);
    stamp(out, &r.at);
    byte_seq(out, r.by.as_bytes());
    byte_seq(out, r.note.as_bytes());
    opt_str(out, r.hook_result.as_deref());
    opt_str(out, r.provider_ref.as_deref());
}

/// A delta: variant index, then the variant's fields.
#[inline(always)]
fn delta<S: Sink>(out: &mut S, d: &Delta) {
    match d {
        Delta::Claim { stamp: s, facts } => {
            varint(out, 0);
            stamp(out, s);
            claim_facts(out, facts);
        }
        Delta::Extend {
            stamp: s,
            lease_until_ms,
        } => {
            varint(out, 1);
            stamp(out, s);
            varint(out, *lease_until_ms);
        }
        Delta::Finish {
            stamp: s,
            terminal: t,
        } => {
            varint(out, 2);
            stamp(out, s);
            terminal(out, t);
        }
        Delta::Resolve(r) => {
            varint(out, 3);
            resolution(out, r);
        }
    }
}

/// A log position: `segment`, then `offset`.
#[inline(always)]
fn loc<S: Sink>(out: &mut S, l: &Loc) {
    varint(out, u64::from(l.segment));
    varint(out, u64::from(l.offset));
}

/// A mutation log entry from borrowed parts: the fields of `LogEntry::Mutation`, with those of
/// its [`Mutation`](super::entry::Mutation) inline.
#[derive(Debug, Clone, Copy)]
pub(super) struct MutationEntry<'a> {
    /// The region whose log numbered the mutation.
    pub origin: RegionId,
    /// Its number in the origin's log.
    pub seq: u64,
    /// The key.
    pub key: &'a RecordKey,
    /// The change.
    pub delta: &'a Delta,
    /// The key's previous log entry.
    pub prev: Option<Loc>,
    /// Expiry of the key's newest generation after this mutation (Unix ms).
    pub expires_at_ms: u64,
    /// Encode as [`LogEntry::Local`](super::entry::LogEntry::Local) without its final `seq`
    /// (the log appends it, [`seq_trailer`]); `seq` is then ignored.
    pub local: bool,
}

impl MutationEntry<'_> {
    /// Exact size of the encoding, in bytes.
    #[cfg(test)]
    pub(super) fn encoded_len(&self) -> usize {
        let mut m = Measure::default();
        self.emit(&mut m);
        m.0
    }

    /// Appends the encoding, the bytes bincode writes for the owned `LogEntry`, to `out`.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        self.emit(out);
    }

    /// The one walk both `encoded_len` (tests) and [`encode_into`](Self::encode_into) run: `LogEntry::Mutation { mutation: Mutation {
    /// origin, seq, key, delta }, prev, expires_at_ms }`.
    #[inline(always)]
    fn emit<S: Sink>(&self, out: &mut S) {
        if self.local {
            // `Local { origin, key, delta, prev, expires_at_ms, seq }`, `seq` left to the log.
            varint(out, u64::from(LOG_ENTRY_LOCAL));
            region(out, &self.origin);
            record_key(out, self.key);
            delta(out, self.delta);
        } else {
            varint(out, u64::from(LOG_ENTRY_MUTATION));
            region(out, &self.origin);
            varint(out, self.seq);
            record_key(out, self.key);
            delta(out, self.delta);
        }
        match &self.prev {
            None => out.byte(0),
            Some(l) => {
                out.byte(1);
                loc(out, l);
            }
        }
        varint(out, self.expires_at_ms);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::arb::{deltas, keys, regions, u32s, u64s, U128_EDGES, U64_EDGES};
    use crate::store::entry::{self, LogEntry, Mutation};

    fn locs() -> impl Strategy<Value = Loc> {
        (u32s(), u32s()).prop_map(|(segment, offset)| Loc { segment, offset })
    }

    fn hand_encoded(e: &MutationEntry<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        e.encode_into(&mut buf);
        assert_eq!(
            buf.len(),
            e.encoded_len(),
            "measured and written sizes agree"
        );
        buf
    }

    proptest! {
        #[test]
        fn hand_encoded_mutations_are_bincodes_bytes_and_decode_back(
            origin in regions(),
            seq in u64s(),
            key in keys(),
            delta in deltas(),
            prev in proptest::option::of(locs()),
            expires_at_ms in u64s(),
        ) {
            let e = MutationEntry {
                origin, seq, key: &key, delta: &delta, prev, expires_at_ms, local: false,
            };
            let owned = LogEntry::Mutation {
                mutation: Mutation { origin, seq, key: key.clone(), delta: delta.clone() },
                prev,
                expires_at_ms,
            };
            let bincode = entry::encode(&owned).unwrap();
            let hand = hand_encoded(&e);
            prop_assert_eq!(e.encoded_len(), hand.len());
            prop_assert_eq!(&hand, &bincode);
            let via_scratch = entry::encode_mutation(origin, seq, &key, &delta, prev, expires_at_ms)
                .unwrap();
            prop_assert_eq!(&via_scratch, &bincode);
            prop_assert_eq!(entry::decode(&hand).unwrap(), owned);
        }

        #[test]
        fn local_entries_with_their_trailer_decode_to_the_numbered_mutation(
            origin in regions(),
            seq in u64s(),
            key in keys(),
            delta in deltas(),
            prev in proptest::option::of(locs()),
            expires_at_ms in u64s(),
        ) {
            // The store writes a claim's origin_seq as 0; decoding sets it to the trailer's seq.
            let mut delta = delta;
            if let Delta::Claim { facts, .. } = &mut delta {
                facts.origin_seq = 0;
            }
            let mut bytes = entry::with_local_mutation(origin, &key, &delta, prev, expires_at_ms,
                |b| b.to_vec()).unwrap();
            bytes.extend_from_slice(&seq_trailer(seq));
            let local = LogEntry::Local {
                origin, key: key.clone(), delta: delta.clone(), prev, expires_at_ms, seq,
            };
            // bincode's own bytes differ only in the trailer's varint form, which is the same
            // 9-byte form once seq needs more than 32 bits.
            let canonical = entry::encode(&local).unwrap();
            let prefix = &bytes[..bytes.len() - SEQ_TRAILER_BYTES];
            prop_assert!(canonical.starts_with(prefix));
            let mut seq_varint = Measure::default();
            varint(&mut seq_varint, seq);
            prop_assert_eq!(canonical.len(), prefix.len() + seq_varint.0);
            if seq > u64::from(u32::MAX) {
                prop_assert_eq!(&bytes, &canonical);
            }
            let mut numbered = delta;
            if let Delta::Claim { facts, .. } = &mut numbered {
                facts.origin_seq = seq;
            }
            let mutation = LogEntry::Mutation {
                mutation: Mutation { origin, seq, key, delta: numbered },
                prev,
                expires_at_ms,
            };
            prop_assert_eq!(entry::decode(&bytes).unwrap(), mutation.clone());
            prop_assert_eq!(entry::decode(&canonical).unwrap(), mutation);
        }
    }

    /// A varint through both sinks (a `u64` one when the value fits, as [`emit`] does).
    fn hand_varint(v: u128) -> Vec<u8> {
        let mut measure = Measure::default();
        varint_u128(&mut measure, v);
        let mut out = Vec::new();
        varint_u128(&mut out, v);
        assert_eq!(out.len(), measure.0);
        if let Ok(v) = u64::try_from(v) {
            let mut narrow = Measure::default();
            varint(&mut narrow, v);
            assert_eq!(narrow.0, measure.0);
        }
        out
    }

    #[test]
    fn varints_are_bincodes_at_every_boundary() {
        let config = bincode::config::standard();
        for &v in U64_EDGES {
            let hand = hand_varint(v.into());
            assert_eq!(
                hand,
                bincode::serde::encode_to_vec(v, config).unwrap(),
                "{v}"
            );
            if let Ok(v32) = u32::try_from(v) {
                assert_eq!(hand, bincode::serde::encode_to_vec(v32, config).unwrap());
            }
            if let Ok(v16) = u16::try_from(v) {
                assert_eq!(hand, bincode::serde::encode_to_vec(v16, config).unwrap());
            }
        }
        for v in U64_EDGES
            .iter()
            .map(|&v| u128::from(v))
            .chain(U128_EDGES.iter().copied())
        {
            let hand = hand_varint(v);
            assert_eq!(
                hand,
                bincode::serde::encode_to_vec(v, config).unwrap(),
                "{v}"
            );
        }
    }

    #[test]
    fn oversized_mutations_are_refused_with_their_size() {
        let origin = RegionId::new("a").unwrap();
        let key = RecordKey::new("ns", "p", "k");
        let delta = Delta::Finish {
            stamp: Stamp::new(7, origin),
            terminal: Terminal::Completed(Outcome::new(200, vec![0u8; entry::ENTRY_BYTES_MAX])),
        };
        let e = MutationEntry {
            origin,
            seq: 1,
            key: &key,
            delta: &delta,
            prev: None,
            expires_at_ms: 0,
            local: false,
        };
        let len = e.encoded_len();
        assert!(len > entry::ENTRY_BYTES_MAX);
        match entry::with_encoded_mutation(origin, 1, &key, &delta, None, 0, |b| b.len()) {
            Err(entry::EncodeError::TooLarge(n)) => assert_eq!(n, len),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}
