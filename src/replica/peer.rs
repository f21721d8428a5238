//! What a replica keeps per peer: the link's handshake state, the push queue, the schedule and
//! the range requests in flight.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::clock::RegionId;
use crate::store::entry::Mutation;
use crate::wire::{OriginDigest, SeqRange};

/// The handshake state of the link to a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Link {
    /// No link, or a refused one.
    #[default]
    Down,
    /// Our hello is sent; theirs has not come.
    HelloSent,
    /// Both hellos exchanged and accepted.
    Up {
        /// The version agreed.
        version: u16,
    },
}

/// A range request in flight.
#[derive(Debug, Clone)]
pub(super) struct Asked {
    /// Whose log.
    pub(super) origin: RegionId,
    /// Which numbers.
    pub(super) range: SeqRange,
    /// When to ask again if no answer came.
    pub(super) resend_at_ms: u64,
    /// How many times it was sent.
    pub(super) tries: u32,
}

/// Per-peer state.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) link: Link,
    /// Our durable mutations not yet sent to this peer, oldest first.
    pub(super) queue: VecDeque<Mutation>,
    /// Their size bound (see `approx_bytes`).
    pub(super) queue_bytes: usize,
    /// When the queued batch is sent even if not full.
    pub(super) push_deadline_ms: Option<u64>,
    pub(super) next_digest_ms: u64,
    pub(super) next_ping_ms: u64,
    /// The last ping's nonce (kept across links, so a late pong of an old link is ignored).
    pub(super) ping_nonce: u64,
    /// When the last ping was sent, until its pong came (one sample per ping).
    pub(super) ping_sent_ms: Option<u64>,
    /// Range requests in flight, by request id.
    pub(super) ranges: BTreeMap<u64, Asked>,
    /// The peer's last digest, per origin: what it can serve.
    pub(super) holds: BTreeMap<RegionId, OriginDigest>,
    /// Origins the peer answered `ResetRequired` for: not asked of it again on this link.
    pub(super) truncated: BTreeSet<RegionId>,
}

impl Peer {
    /// Back to no link: the queue and requests go (anti-entropy refetches what they held).
    pub(super) fn reset(&mut self) {
        self.link = Link::Down;
        self.queue.clear();
        self.queue_bytes = 0;
        self.push_deadline_ms = None;
        self.ranges.clear();
        self.holds.clear();
        self.truncated.clear();
        self.ping_sent_ms = None;
    }

    /// Appends `batch` to the queue, dropping the oldest mutations while the queue holds more
    /// than `cap` bytes (by `size`). Returns how many were dropped.
    pub(super) fn enqueue(
        &mut self,
        batch: &[Mutation],
        cap: usize,
        size: fn(&Mutation) -> usize,
    ) -> u64 {
        let mut dropped = 0;
        for m in batch {
            self.queue_bytes += size(m);
            self.queue.push_back(m.clone());
        }
        while self.queue_bytes > cap {
            let Some(old) = self.queue.pop_front() else {
                break;
            };
            self.queue_bytes -= size(&old);
            dropped += 1;
        }
        dropped
    }
}
