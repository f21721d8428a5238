//! What regions say to each other: the replication protocol's messages and their framing.
//!
//! * One versioned enum, [`Message`]. Its variants and their fields are the format: a new kind
//!   of message is a new variant at the end, an existing struct never gains a field (bincode has
//!   no field defaults). [`PROTOCOL_VERSIONS`] is what this build speaks; peers agree on a version
//!   in the handshake ([`Hello`]).
//! * bincode 2.0.1 with one fixed configuration (variable-length integers, little endian) and a
//!   decode limit equal to the frame cap, so a forged length inside a frame cannot make the
//!   decoder allocate more than the frame could hold.
//! * Frames ([`frame`]): a 4-byte big-endian length, then the encoded message. A frame longer
//!   than [`FRAME_BYTES_MAX`] is refused as soon as its length is read, before it is buffered.
//!
//! Peer bytes are untrusted. Decoding never panics, and every decoded message is checked
//! ([`Message::validate`]) against the limits below and its own structure (sorted lists,
//! ranges in order, mutations of the origin they claim) before any field is used. The store
//! checks each mutation's content again when it merges it.

pub mod frame;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::clock::RegionId;
use crate::record::{KeyDigest, Record, RecordKey};
use crate::store::entry::Mutation;
use crate::store::SEQ_MAX;

/// Largest message (frame body) sent or accepted, bytes. A stored outcome is at most 8 MiB, so
/// one mutation always fits.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Most mutations in one [`Push`] or [`Range`].
pub const BATCH_MUTATIONS_MAX: usize = 4096;
/// Most origins in one [`Digest`], [`Marks`] or [`SnapshotChunk`].
pub const ORIGINS_MAX: usize = 1024;
/// Most gaps reported for one origin in a [`Digest`]; a receiver with more reports the lowest.
pub const GAPS_MAX: usize = 256;
/// Most records in one [`SnapshotChunk`].
pub const SNAPSHOT_RECORDS_MAX: usize = 4096;
/// Longest [`ClusterId`], bytes.
pub const CLUSTER_ID_LEN_MAX: usize = 64;
/// Longest wait a [`Busy`] answer may ask for, ms.
pub const RETRY_AFTER_MS_MAX: u32 = 60_000;

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// The newest version both ranges contain, if any.
    pub fn highest_common(&self, other: &VersionRange) -> Option<u16> {
        let hi = self.max.min(other.max);
        (hi >= self.min.max(other.min)).then_some(hi)
    }
}

/// The name of a cluster of regions: peers of different clusters never exchange data.
///
/// 1 to [`CLUSTER_ID_LEN_MAX`] bytes of `a-z`, `0-9`, `-`, `_` and `.`; checked when built and
/// when decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ClusterId(String);

impl ClusterId {
    /// Checks and wraps a cluster name.
    pub fn new(name: &str) -> Result<Self, WireError> {
        let ok = !name.is_empty()
            && name.len() <= CLUSTER_ID_LEN_MAX
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(WireError::Invalid(format!(
                "cluster id {name:?}: 1 to {CLUSTER_ID_LEN_MAX} bytes of a-z, 0-9, '-', '_', '.'"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ClusterId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An inclusive range of sequence numbers of one origin's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    /// First number (at least 1).
    pub first: u64,
    /// Last number (at least `first`).
    pub last: u64,
}

/// Every message between two regions. New kinds of message are new variants **at the end**.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of each side of a connection.
    Hello(Hello),
    /// The handshake was refused; the sender closes the connection.
    Reject(Reject),
    /// New durable mutations of the sender's own log (latency path).
    Push(Push),
    /// What the sender holds of each origin's log (anti-entropy).
    Digest(Digest),
    /// Asks for part of an origin's log.
    RangeRequest(RangeRequest),
    /// Part of an origin's log, answering a [`RangeRequest`].
    Range(Range),
    /// The sender has no sync permit free: ask again later.
    Busy(Busy),
    /// The asked range is no longer retained: catch up from a snapshot.
    ResetRequired(ResetRequired),
    /// Asks for a chunk of the key-ordered snapshot stream.
    SnapshotRequest(SnapshotRequest),
    /// A chunk of the snapshot stream.
    SnapshotChunk(SnapshotChunk),
    /// Heartbeat, for liveness and clock-offset estimation.
    Ping(Ping),
    /// Answer to a [`Ping`].
    Pong(Pong),
    /// The sender's durable per-origin marks (stability).
    Marks(Marks),
    /// Asks what the receiver knows of a key (failover lookup).
    Lookup(Lookup),
    /// Answer to a [`Lookup`].
    LookupReply(LookupReply),
    /// An operator released a region lost for good.
    Retired(Retired),
}

/// Handshake: who the sender is and what it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's cluster; a peer of another cluster is rejected.
    pub cluster: ClusterId,
    /// The sender's region.
    pub region: RegionId,
    /// The protocol versions the sender speaks.
    pub versions: VersionRange,
    /// Digest of the sender's namespace policies: a mismatch is reported, never refused.
    pub policy_digest: [u8; 32],
}

/// Why a handshake was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The peers belong to different clusters.
    ClusterMismatch {
        /// The rejecting side's cluster.
        ours: ClusterId,
    },
    /// No protocol version in common.
    NoCommonVersion {
        /// What the rejecting side speaks.
        ours: VersionRange,
    },
    /// The peer presented the rejecting side's own region id.
    SameRegion,
    /// The peer is not the region the rejecting side expected on this connection.
    UnexpectedRegion {
        /// The region expected.
        expected: RegionId,
    },
}

/// A refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Why.
    pub reason: RejectReason,
}

/// New durable mutations of `origin` (the sender), numbers strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    /// The sender's region: every mutation's origin.
    pub origin: RegionId,
    /// At most [`BATCH_MUTATIONS_MAX`].
    pub mutations: Vec<Mutation>,
}

/// What the sender holds of one origin's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginDigest {
    /// The origin.
    pub origin: RegionId,
    /// Every number up to here is held.
    pub mark: u64,
    /// Ranges above `mark` that are missing, in order, disjoint, below `head`; at most
    /// [`GAPS_MAX`].
    pub gaps: Vec<SeqRange>,
    /// Highest number held (`mark` when nothing is held above it).
    pub head: u64,
}

/// Anti-entropy digest: per origin, in origin order, at most [`ORIGINS_MAX`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// One entry per origin, sorted by origin, no repeats.
    pub origins: Vec<OriginDigest>,
}

/// Asks for the mutations `range` of `origin` (any peer may serve any origin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// Chosen by the asker, echoed in the answer.
    pub request: u64,
    /// Whose log.
    pub origin: RegionId,
    /// Which numbers.
    pub range: SeqRange,
    /// Answer size budget, bytes: at most [`FRAME_BYTES_MAX`] (the answer carries at least one
    /// mutation if any is held, whatever its size).
    pub max_bytes: u32,
}

/// Mutations of one origin answering a [`RangeRequest`], numbers strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// The request answered.
    pub request: u64,
    /// Whose log.
    pub origin: RegionId,
    /// At most [`BATCH_MUTATIONS_MAX`], all of `origin`.
    pub mutations: Vec<Mutation>,
    /// Where to ask again when the budget cut the answer short (above every number sent).
    pub next: Option<u64>,
}

/// No sync permit free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Busy {
    /// The request refused.
    pub request: u64,
    /// When to ask again, ms (at most [`RETRY_AFTER_MS_MAX`]).
    pub retry_after_ms: u32,
}

/// The asked range is older than what the sender retains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRequired {
    /// The request answered.
    pub request: u64,
    /// Whose log.
    pub origin: RegionId,
    /// The oldest number the sender still holds (at least 1).
    pub retained_from: u64,
}

/// Asks for the snapshot stream from just after `after` (the start when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Chosen by the asker, echoed in the answer.
    pub request: u64,
    /// Resume point: the last key digest received.
    pub after: Option<KeyDigest>,
    /// Most records wanted, 1 to [`SNAPSHOT_RECORDS_MAX`].
    pub max_records: u32,
}

/// A chunk of the key-ordered snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The request answered.
    pub request: u64,
    /// Keys and records, in strictly increasing key-digest order, all after the request's
    /// resume point; at most [`SNAPSHOT_RECORDS_MAX`].
    pub records: Vec<(RecordKey, Record)>,
    /// Where to resume (`None`: the stream is complete); not below the last record's digest.
    pub next: Option<KeyDigest>,
    /// The sender's durable per-origin marks when the stream began: what the receiver holds
    /// once the stream is complete. Sorted by origin, no repeats.
    pub marks: Vec<(RegionId, u64)>,
}

/// Heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed in the [`Pong`].
    pub nonce: u64,
    /// The sender's clock when sent, Unix ms.
    pub sent_ms: u64,
}

/// Answer to a [`Ping`]: with the ping's send time, the round trip and the peer's clock offset
/// follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// The ping's `sent_ms`.
    pub ping_sent_ms: u64,
    /// The answering side's clock when the ping arrived, Unix ms.
    pub received_ms: u64,
    /// The answering side's clock when the pong left, Unix ms (not before `received_ms`).
    pub sent_ms: u64,
}

/// The sender's durable per-origin marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// (origin, contiguous mark), sorted by origin, no repeats, at most [`ORIGINS_MAX`].
    pub marks: Vec<(RegionId, u64)>,
}

/// Asks what the receiver knows of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    /// Chosen by the asker, echoed in the answer.
    pub request: u64,
    /// The key.
    pub key: RecordKey,
}

/// Answer to a [`Lookup`]: the key's record, if the receiver holds any of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReply {
    /// The request answered.
    pub request: u64,
    /// The key asked about.
    pub key: RecordKey,
    /// Its record (`None`: never seen).
    pub record: Option<Record>,
}

/// A region released for good: nothing numbered above `last_seq` will ever come from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    /// The region.
    pub region: RegionId,
    /// Its last number anyone holds.
    pub last_seq: u64,
}

/// Why bytes could not become a message, or a message bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame's length prefix (or an encoded message) exceeds [`FRAME_BYTES_MAX`].
    #[error("frame of {len} bytes exceeds the {FRAME_BYTES_MAX}-byte limit")]
    FrameTooLarge {
        /// The length announced or encoded.
        len: u64,
    },
    /// The frame body is not a message of this protocol.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// The message ended before its frame did.
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
    /// The message decoded but breaks a limit or its own structure.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The message could not be encoded.
    #[error("unencodable message: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

impl Message {
    /// Encodes the message as a frame body (no length prefix; see [`frame::encode`]).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = bincode::serde::encode_to_vec(self, config())
            .map_err(|e| WireError::Encode(e.to_string()))?;
        if bytes.len() > FRAME_BYTES_MAX {
            return Err(WireError::FrameTooLarge {
                len: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Decodes and validates a frame body.
    pub fn decode(body: &[u8]) -> Result<Message, WireError> {
        if body.len() > FRAME_BYTES_MAX {
            return Err(WireError::FrameTooLarge {
                len: body.len() as u64,
            });
        }
        let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(body, config())
            .map_err(|e| WireError::Decode(e.to_string()))?;
        if used != body.len() {
            return Err(WireError::TrailingBytes(body.len() - used));
        }
        msg.validate()?;
        Ok(msg)
    }

    /// The variant's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Reject(_) => "reject",
            Message::Push(_) => "push",
            Message::Digest(_) => "digest",
            Message::RangeRequest(_) => "range_request",
            Message::Range(_) => "range",
            Message::Busy(_) => "busy",
            Message::ResetRequired(_) => "reset_required",
            Message::SnapshotRequest(_) => "snapshot_request",
            Message::SnapshotChunk(_) => "snapshot_chunk",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::Marks(_) => "marks",
            Message::Lookup(_) => "lookup",
            Message::LookupReply(_) => "lookup_reply",
            Message::Retired(_) => "retired",
        }
    }

    /// Checks the message against the protocol's limits and its own structure. [`decode`]
    /// calls it; a sender may call it before sending.
    ///
    /// [`decode`]: Message::decode
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => check(
                h.versions.min <= h.versions.max,
                "hello: version range upside down",
            ),
            Message::Reject(_) => Ok(()),
            Message::Push(p) => batch(&p.origin, &p.mutations, None),
            Message::Digest(d) => digest(d),
            Message::RangeRequest(r) => {
                seq_range(&r.range)?;
                check(
                    r.max_bytes as usize <= FRAME_BYTES_MAX,
                    "range request: byte budget above the frame limit",
                )
            }
            Message::Range(r) => {
                batch(&r.origin, &r.mutations, Some(r))?;
                Ok(())
            }
            Message::Busy(b) => check(
                b.retry_after_ms <= RETRY_AFTER_MS_MAX,
                "busy: retry-after above the limit",
            ),
            Message::ResetRequired(r) => check(
                (1..=SEQ_MAX).contains(&r.retained_from),
                "reset required: sequence numbers start at 1",
            ),
            Message::SnapshotRequest(r) => check(
                (1..=SNAPSHOT_RECORDS_MAX as u32).contains(&r.max_records),
                "snapshot request: record count outside 1..=limit",
            ),
            Message::SnapshotChunk(c) => snapshot_chunk(c),
            Message::Ping(_) => Ok(()),
            Message::Pong(p) => check(
                p.sent_ms >= p.received_ms,
                "pong: sent before the ping arrived",
            ),
            Message::Marks(m) => marks(&m.marks, "marks"),
            Message::Lookup(_) | Message::LookupReply(_) => Ok(()),
            Message::Retired(r) => check(
                r.last_seq <= SEQ_MAX,
                "retired: last number beyond the sequence range",
            ),
        }
    }
}

fn check(ok: bool, what: &str) -> Result<(), WireError> {
    if ok {
        Ok(())
    } else {
        Err(WireError::Invalid(what.to_owned()))
    }
}

fn seq_range(r: &SeqRange) -> Result<(), WireError> {
    check(
        r.first >= 1 && r.first <= r.last && r.last <= SEQ_MAX,
        "sequence range empty, starting at 0, or above the limit",
    )
}

/// Mutations of one origin, numbers strictly increasing from 1 up; for a [`Range`], inside the
/// range and below its resume point.
fn batch(
    origin: &RegionId,
    mutations: &[Mutation],
    range: Option<&Range>,
) -> Result<(), WireError> {
    check(
        mutations.len() <= BATCH_MUTATIONS_MAX,
        "more mutations than a batch may hold",
    )?;
    let mut prev = 0u64;
    for m in mutations {
        check(
            &m.origin == origin,
            "a mutation of another origin in a batch",
        )?;
        check(
            m.seq > prev && m.seq <= SEQ_MAX,
            "batch numbers not strictly increasing from 1, or above the limit",
        )?;
        prev = m.seq;
    }
    if let Some(Range { next: Some(n), .. }) = range {
        check(*n > prev, "range resume point not above the numbers sent")?;
    }
    Ok(())
}

fn digest(d: &Digest) -> Result<(), WireError> {
    check(d.origins.len() <= ORIGINS_MAX, "digest: too many origins")?;
    check(
        d.origins.windows(2).all(|w| w[0].origin < w[1].origin),
        "digest: origins not sorted or repeated",
    )?;
    for o in &d.origins {
        check(o.mark <= o.head, "digest: mark above head")?;
        check(o.head <= SEQ_MAX, "digest: head above the limit")?;
        check(o.gaps.len() <= GAPS_MAX, "digest: too many gaps")?;
        // Gaps lie above the mark, in order, with at least one held number between two of
        // them, and below the head (which is held).
        let mut after = None;
        for g in &o.gaps {
            seq_range(g)?;
            let floor = after.map_or(o.mark, |last: u64| last.saturating_add(1));
            check(
                g.first > floor,
                "digest: gaps out of order, touching, or not above the mark",
            )?;
            check(g.last < o.head, "digest: gap reaches the head")?;
            after = Some(g.last);
        }
    }
    Ok(())
}

fn marks(marks: &[(RegionId, u64)], what: &str) -> Result<(), WireError> {
    check(
        marks.len() <= ORIGINS_MAX,
        &format!("{what}: too many origins"),
    )?;
    check(
        marks.windows(2).all(|w| w[0].0 < w[1].0),
        &format!("{what}: origins not sorted or repeated"),
    )
}

fn snapshot_chunk(c: &SnapshotChunk) -> Result<(), WireError> {
    check(
        c.records.len() <= SNAPSHOT_RECORDS_MAX,
        "snapshot chunk: too many records",
    )?;
    marks(&c.marks, "snapshot chunk marks")?;
    let mut last: Option<KeyDigest> = None;
    for (key, _) in &c.records {
        let d = key.digest();
        check(
            last.is_none_or(|l| l < d),
            "snapshot chunk: keys not in strictly increasing digest order",
        )?;
        last = Some(d);
    }
    if let (Some(next), Some(last)) = (c.next, last) {
        check(
            next >= last,
            "snapshot chunk: resume point below the last key",
        )?;
    }
    Ok(())
}
