//! Replication between regions as a sans-IO state machine.
//!
//! A [`Replica`] holds one region's view of its peers: the handshake state of each link, the
//! per-peer push queues, the anti-entropy schedule and the range requests in flight. It reads
//! and writes the region's [`Store`] (merging what peers send, serving ranges of any origin's
//! log) but owns no socket, no timer and no clock: the driver (the daemon over QUIC, or the
//! simulator) feeds it inputs and carries out what it asks for.
//!
//! # Driving a replica
//!
//! The call and poll order, the way quinn-proto documents its `Connection`:
//!
//! 1. Feed every input as it happens, with the current time: [`Replica::connected`] and
//!    [`Replica::disconnected`] when the transport's link to a peer comes up (authenticated as
//!    that region) or goes down, [`Replica::receive`] for each message that arrives, and
//!    [`Replica::handle_timeout`] once the time from [`Replica::poll_timeout`] has come.
//! 2. After any input, drain [`Replica::poll_transmit`] (send each message to its peer, in
//!    order) and [`Replica::poll_event`] (metrics, logs, alarms).
//! 3. Then ask [`Replica::poll_timeout`] again: the earliest time the replica wants
//!    `handle_timeout`, which may have moved.
//!
//! The store must be flushed by its own driver (a flusher thread in the daemon, explicit
//! flushes in the simulator): the replica only pushes and serves *durable* mutations, and what
//! it merges becomes durable with the store's next group commit.
//!
//! Randomness (the jitter of anti-entropy rounds) comes from a seed given at creation, so a
//! simulator run replays exactly. Peers are kept in a B-tree: no hash order decides anything.

mod health;
mod peer;
mod sync;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use crate::clock::RegionId;
use crate::record::{Body, Delta, KeyDigest, RecordKey, Terminal};
use crate::store::entry::Mutation;
use crate::store::storage::Storage;
use crate::store::{Holding, Store, StoreError};
use crate::wire::{
    self, Busy, ClusterId, Digest, Hello, Lookup, LookupReply, Message, Ping, Pong, Push, Range,
    RangeRequest, Reject, RejectReason, ResetRequired, SeqRange, SnapshotChunk, SnapshotRequest,
    VersionRange, BATCH_MUTATIONS_MAX, FRAME_BYTES_MAX, GAPS_MAX, ORIGINS_MAX,
    SNAPSHOT_RECORDS_MAX,
};

use crate::splitmix::SplitMix64;
use health::Health;
use peer::{Link, Peer};

/// Most range requests in flight to one peer: a digest naming many origins cannot make the
/// replica keep (or resend) more.
pub const RANGES_PER_PEER_MAX: usize = 16;
/// What each range answer costs the serving budget besides its bytes, bytes.
pub const SERVE_REQUEST_COST_BYTES: u64 = 1 << 10;
/// Times a range request is sent before it is given up (the next digest round asks again).
pub const RANGE_TRIES_MAX: u32 = 3;

/// How a replica paces and bounds its work. Times in ms, sizes in bytes.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The cluster this region belongs to.
    pub cluster: ClusterId,
    /// Digest of this region's namespace policies (compared in the handshake, never refused).
    pub policy_digest: [u8; 32],
    /// The protocol versions spoken.
    pub versions: VersionRange,
    /// Longest a new mutation waits in a push queue for others to share its message.
    pub push_delay_ms: u64,
    /// A push queue holding this much is sent at once.
    pub push_batch_bytes: usize,
    /// Most bytes a push queue holds; beyond it the oldest mutations are dropped (and counted):
    /// anti-entropy fetches them later.
    pub push_queue_bytes: usize,
    /// Anti-entropy rounds with each peer are `digest_min_ms..=digest_max_ms` apart, jittered.
    pub digest_min_ms: u64,
    /// See `digest_min_ms`.
    pub digest_max_ms: u64,
    /// Most numbers asked for in one range request.
    pub range_chunk: u64,
    /// Answer budget asked for in a range request.
    pub range_bytes: u32,
    /// How long a range request may go unanswered before it is asked again.
    pub range_timeout_ms: u64,
    /// Bytes of ranges served per second to all peers together; beyond it askers get [`Busy`].
    pub serve_bytes_per_s: u64,
    /// Heartbeat period.
    pub ping_every_ms: u64,
    /// The cluster's max clock drift: a region whose clock is off the cluster's median by more
    /// than half of it fences itself (no new claims) until it is back within bounds.
    pub max_drift_ms: u64,
    /// Phi above which a silent peer is suspected (reported; the link is the driver's call).
    pub phi_suspect: f64,
    /// How long a failover lookup waits for its answer.
    pub lookup_timeout_ms: u64,
}

impl ReplicaConfig {
    /// Defaults for a cluster: pushes batched up to 5 ms or 64 KiB, 4 MiB queues, anti-entropy
    /// every 1-5 s, ranges of up to 1024 mutations or 1 MiB, 64 MiB/s served, a ping a second.
    pub fn new(cluster: ClusterId) -> Self {
        Self {
            cluster,
            policy_digest: [0; 32],
            versions: wire::PROTOCOL_VERSIONS,
            push_delay_ms: 5,
            push_batch_bytes: 64 << 10,
            push_queue_bytes: 4 << 20,
            digest_min_ms: 1_000,
            digest_max_ms: 5_000,
            range_chunk: 1024,
            range_bytes: 1 << 20,
            range_timeout_ms: 10_000,
            serve_bytes_per_s: 64 << 20,
            ping_every_ms: 1_000,
            max_drift_ms: crate::clock::MAX_DRIFT_MS_DEFAULT,
            phi_suspect: 8.0,
            lookup_timeout_ms: 500,
        }
    }
}

/// Something the driver should know (metrics, logs, alarms). Nothing here needs an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake with a peer completed.
    PeerUp {
        /// The peer.
        peer: RegionId,
        /// The protocol version agreed.
        version: u16,
    },
    /// The link to a peer went down.
    PeerDown {
        /// The peer.
        peer: RegionId,
    },
    /// This side refused a peer's handshake (and told it why).
    Rejected {
        /// The peer.
        peer: RegionId,
        /// Why.
        reason: RejectReason,
    },
    /// The peer refused this side's handshake.
    RejectedBy {
        /// The peer.
        peer: RegionId,
        /// Why.
        reason: RejectReason,
    },
    /// The peer's namespace policies differ from ours (reported and alarmed, not refused).
    PolicyMismatch {
        /// The peer.
        peer: RegionId,
    },
    /// A peer sent something the protocol does not allow at that point; it was ignored.
    ProtocolViolation {
        /// The peer.
        peer: RegionId,
        /// What.
        what: String,
    },
    /// A peer's mutation was refused by the store.
    InvalidMutation {
        /// The peer that sent it.
        peer: RegionId,
        /// The store's reason.
        error: String,
    },
    /// A merged mutation carried a stamp too far ahead to move the clock.
    DriftRejected {
        /// The peer that sent it.
        peer: RegionId,
        /// Its origin.
        origin: RegionId,
        /// Its number.
        seq: u64,
    },
    /// The store could not take a peer's mutations now; anti-entropy retries later.
    MergeUnavailable {
        /// The peer.
        peer: RegionId,
        /// The store's reason.
        error: String,
    },
    /// Mutations were dropped from a full push queue.
    PushDropped {
        /// The peer.
        peer: RegionId,
        /// How many.
        count: u64,
    },
    /// A peer no longer retains the range asked for: this region needs a snapshot of it.
    ResetRequired {
        /// The peer.
        peer: RegionId,
        /// The origin whose log was truncated.
        origin: RegionId,
        /// The oldest number the peer still has.
        retained_from: u64,
    },
    /// A heartbeat answer: the round trip and the peer's clock offset (peer minus us).
    ClockSample {
        /// The peer.
        peer: RegionId,
        /// Round trip, ms.
        rtt_ms: u64,
        /// The peer's clock minus ours, ms (NTP-style estimate).
        offset_ms: i64,
    },
    /// The failure detector suspects a peer: nothing heard for much longer than usual.
    PeerSuspect {
        /// The peer.
        peer: RegionId,
        /// How long it has been silent, ms.
        silent_ms: u64,
    },
    /// A suspected peer was heard from again.
    PeerTrusted {
        /// The peer.
        peer: RegionId,
    },
    /// This region fenced or unfenced itself: its clock against the median of the cluster's
    /// (peers' estimated offsets and its own) crossed half the max drift. While fenced the store
    /// grants no new claims.
    FenceChanged {
        /// Whether the region is now fenced.
        fenced: bool,
        /// The cluster's median clock minus ours, ms.
        offset_ms: i64,
    },
    /// A snapshot stream from a peer completed: its records are merged and its marks adopted,
    /// so anti-entropy goes on from there.
    SnapshotDone {
        /// The peer.
        peer: RegionId,
        /// Records received.
        records: u64,
    },
    /// A failover lookup was answered; what the peer knew of the key is merged into the store
    /// (durable with its next flush).
    LookupDone {
        /// The lookup.
        request: u64,
        /// The key.
        key: RecordKey,
        /// Whether the peer knew the key.
        found: bool,
    },
    /// A failover lookup got no answer in time (or its link went down).
    LookupTimedOut {
        /// The lookup.
        request: u64,
        /// The key.
        key: RecordKey,
    },
    /// A peer's answer to a lookup could not be merged.
    LookupRefused {
        /// The peer.
        peer: RegionId,
        /// The store's reason.
        error: String,
    },
    /// A message kind this version does not act on yet was received and ignored.
    Unhandled {
        /// The peer.
        peer: RegionId,
        /// The message's kind.
        kind: &'static str,
    },
    /// A peer reported a retirement this region did not hold (or held with a smaller number):
    /// it is now logged here. When `region` is this region, it grants no new claim again.
    Retired {
        /// The peer that reported it.
        peer: RegionId,
        /// The retired region.
        region: RegionId,
        /// Its last number that counts.
        last_seq: u64,
    },
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Mutations sent in pushes.
    pub pushed: u64,
    /// Mutations dropped from full push queues.
    pub push_dropped: u64,
    /// Mutations received (push or range) that were new here.
    pub merged_new: u64,
    /// Mutations received that were already here.
    pub merged_dup: u64,
    /// Range requests sent.
    pub ranges_asked: u64,
    /// Mutations served in ranges.
    pub served: u64,
    /// Range requests answered Busy.
    pub busy_sent: u64,
    /// Answers to requests no longer in flight (asked again, or delivered twice).
    pub stale_answers: u64,
    /// Snapshot streams completed (this region caught up from a peer's snapshot).
    pub snapshots_done: u64,
    /// Records received in snapshot chunks.
    pub snapshot_records: u64,
    /// Snapshot chunks served.
    pub snapshot_chunks_served: u64,
}

/// A snapshot stream being pulled from a peer.
#[derive(Debug, Clone)]
struct SnapshotPull {
    peer: RegionId,
    request: u64,
    after: Option<KeyDigest>,
    /// The peer's durable marks when the stream began (from its first chunk).
    marks: Option<Vec<(RegionId, u64)>>,
    resend_at_ms: u64,
    /// Asks of the current chunk so far.
    tries: u32,
    records: u64,
}

/// One region's replication state machine. See the module docs for the driving protocol.
#[derive(Debug)]
pub struct Replica {
    region: RegionId,
    cfg: ReplicaConfig,
    peers: BTreeMap<RegionId, Peer>,
    rng: SplitMix64,
    transmits: VecDeque<(RegionId, Message)>,
    events: VecDeque<Event>,
    next_request: u64,
    /// This region's own log: the last number queued for pushing.
    pushed_up_to: u64,
    /// Liveness and clock estimates per peer (kept across links).
    health: BTreeMap<RegionId, Health>,
    /// Lookups this region asked: request → (peer, key, deadline).
    lookups: BTreeMap<u64, (RegionId, RecordKey, u64)>,
    /// Lookups peers asked whose answer is not durable here yet: (peer, request, key).
    to_answer: Vec<(RegionId, u64, RecordKey)>,
    /// The snapshot stream this region is pulling, if any (one at a time).
    snapshot: Option<SnapshotPull>,
    /// Snapshot chunks peers asked for whose records are not durable here yet.
    to_serve: Vec<(RegionId, SnapshotRequest)>,
    /// Whether this replica has fenced the store.
    fenced: bool,
    /// Serving budget: bytes still allowed in the current second, and that second.
    serve_left: u64,
    serve_second: u64,
    stats: ReplicaStats,
}

impl Replica {
    /// A replica for `region`, replicating with `peers` (fixed membership), its jitter drawn
    /// from `seed`. `pushed_up_to` is the last local number peers are known to have been sent
    /// (0 on a fresh region; anti-entropy covers anything sent before a restart).
    pub fn new(
        region: RegionId,
        peers: &[RegionId],
        cfg: ReplicaConfig,
        seed: u64,
        pushed_up_to: u64,
    ) -> Self {
        let peers: BTreeMap<RegionId, Peer> = peers
            .iter()
            .filter(|p| **p != region)
            .map(|p| (*p, Peer::default()))
            .collect();
        let health = peers.keys().map(|p| (*p, Health::default())).collect();
        Self {
            region,
            cfg,
            peers,
            rng: SplitMix64::new(seed),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_request: 1,
            pushed_up_to,
            health,
            lookups: BTreeMap::new(),
            to_answer: Vec::new(),
            snapshot: None,
            to_serve: Vec::new(),
            fenced: false,
            serve_left: 0,
            serve_second: u64::MAX,
            stats: ReplicaStats::default(),
        }
    }

    /// This region.
    pub fn region(&self) -> RegionId {
        self.region
    }

    /// Counters.
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// Whether the handshake with `peer` has completed and the link is up.
    pub fn is_up(&self, peer: RegionId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| matches!(p.link, Link::Up { .. }))
    }

    /// The transport's link to `peer` is up: the handshake starts. A region that is not a
    /// configured peer is refused.
    pub fn connected(&mut self, _now_ms: u64, peer: RegionId) {
        let hello = self.hello();
        let Some(p) = self.peers.get_mut(&peer) else {
            self.reject(peer, RejectReason::UnexpectedRegion { expected: peer });
            return;
        };
        if matches!(p.link, Link::Up { .. }) {
            // A new link replaces one we thought up.
            self.events.push_back(Event::PeerDown { peer });
        }
        p.reset();
        p.link = Link::HelloSent;
        if let Some(h) = self.health.get_mut(&peer) {
            h.reset_link();
        }
        self.transmits.push_back((peer, Message::Hello(hello)));
    }

    /// The transport's link to `peer` went down: its queue and requests are dropped (what they
    /// carried is fetched again by anti-entropy).
    pub fn disconnected(&mut self, _now_ms: u64, peer: RegionId) {
        if self.snapshot.as_ref().is_some_and(|s| s.peer == peer) {
            // Started again, from the start, when a peer next answers ResetRequired.
            self.drop_snapshot();
        }
        self.to_serve.retain(|(p, _)| *p != peer);
        if let Some(p) = self.peers.get_mut(&peer) {
            let was_up = matches!(p.link, Link::Up { .. });
            p.reset();
            if was_up {
                self.events.push_back(Event::PeerDown { peer });
            }
        }
    }

    /// A message from `peer` arrived (already decoded and validated by [`wire`]).
    pub fn receive<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        msg: Message,
    ) {
        let Some(p) = self.peers.get(&peer) else {
            self.violation(peer, format!("{} from an unknown region", msg.kind()));
            return;
        };
        // The failure detector times the peer's heartbeats: its other traffic comes in bursts.
        if matches!(msg, Message::Ping(_)) {
            if let Some(h) = self.health.get_mut(&peer) {
                h.heard(now_ms);
                if h.suspect {
                    h.suspect = false;
                    self.events.push_back(Event::PeerTrusted { peer });
                }
            }
        }
        match (&p.link, msg) {
            (_, Message::Hello(h)) => self.on_hello(now_ms, peer, h),
            (_, Message::Reject(r)) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    if matches!(p.link, Link::Up { .. }) {
                        self.events.push_back(Event::PeerDown { peer });
                    }
                    p.reset();
                }
                self.events.push_back(Event::RejectedBy {
                    peer,
                    reason: r.reason,
                });
            }
            (Link::Up { .. }, msg) => self.on_message(store, now_ms, peer, msg),
            (_, msg) => self.violation(peer, format!("{} before the handshake", msg.kind())),
        }
    }

    /// Time-driven work: new durable local mutations are queued for every peer, due push
    /// batches are sent, anti-entropy rounds and heartbeats start, stale range requests are
    /// asked again.
    pub fn handle_timeout<S: Storage>(&mut self, store: &Store<S>, now_ms: u64) {
        self.queue_local(store, now_ms);
        self.check_health(store, now_ms);
        let due: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for request in due {
            let (_, key, _) = self.lookups.remove(&request).expect("listed");
            self.events
                .push_back(Event::LookupTimedOut { request, key });
        }
        for (peer, request, key) in std::mem::take(&mut self.to_answer) {
            self.answer_lookup(store, now_ms, peer, request, key);
        }
        for (peer, r) in std::mem::take(&mut self.to_serve) {
            self.serve_snapshot(store, now_ms, peer, r);
        }
        if self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.resend_at_ms <= now_ms)
        {
            // No chunk in time: ask again from the same resume point.
            self.ask_snapshot(now_ms);
        }
        let ids: Vec<RegionId> = self.peers.keys().copied().collect();
        store.advance_stability(&ids);
        for id in ids {
            if !self.is_up(id) {
                continue;
            }
            self.flush_push(id, now_ms, false);
            let p = &self.peers[&id];
            if p.next_digest_ms <= now_ms {
                self.send_digest(store, now_ms, id);
            }
            let p = &self.peers[&id];
            if p.next_ping_ms <= now_ms {
                let p = self.peers.get_mut(&id).expect("peer");
                p.next_ping_ms = now_ms + self.cfg.ping_every_ms;
                p.ping_nonce += 1;
                p.ping_sent_ms = Some(now_ms);
                let nonce = p.ping_nonce;
                self.transmits.push_back((
                    id,
                    Message::Ping(Ping {
                        nonce,
                        sent_ms: now_ms,
                    }),
                ));
            }
            self.retry_ranges(id, now_ms);
        }
    }

    /// Suspects silent peers, and fences the store while this region's clock is off the
    /// cluster's median by more than half the max drift.
    fn check_health<S: Storage>(&mut self, store: &Store<S>, now_ms: u64) {
        for (peer, p) in &self.peers {
            if !matches!(p.link, Link::Up { .. }) {
                continue;
            }
            let h = self.health.get_mut(peer).expect("health of a peer");
            if !h.suspect && h.phi(now_ms).is_some_and(|phi| phi >= self.cfg.phi_suspect) {
                h.suspect = true;
                self.events.push_back(Event::PeerSuspect {
                    peer: *peer,
                    silent_ms: h.silent_ms(now_ms),
                });
            }
        }
        let Some((offset_ms, fenced)) = health::cluster_offset(
            self.health.values().filter_map(Health::offset_ms),
            self.peers.len(),
            self.cfg.max_drift_ms / 2,
        ) else {
            return;
        };
        if fenced != self.fenced {
            self.fenced = fenced;
            store.set_fenced(fenced);
            self.events
                .push_back(Event::FenceChanged { fenced, offset_ms });
        }
    }

    /// Whether this replica has fenced its store (clock off the cluster's median).
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The next message to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(RegionId, Message)> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Replica::handle_timeout`] has work, if any. Local mutations that
    /// became durable are picked up at each call, so a driver that has just flushed the store
    /// may call it early.
    pub fn poll_timeout(&self) -> Option<u64> {
        let lookups = self.lookups.values().map(|(_, _, d)| *d).min();
        let answers = (!self.to_answer.is_empty()).then_some(0);
        let links = self
            .peers
            .values()
            .filter(|p| matches!(p.link, Link::Up { .. }))
            .flat_map(|p| {
                let ranges = p.ranges.values().map(|r| r.resend_at_ms).min().into_iter();
                [
                    Some(p.next_digest_ms),
                    Some(p.next_ping_ms),
                    p.push_deadline_ms,
                ]
                .into_iter()
                .flatten()
                .chain(ranges)
            })
            .min();
        [lookups, answers, links].into_iter().flatten().min()
    }

    /// Asks `peer` what it knows of `key` (failover: a claim arrived with `peer` as its prior
    /// region, or the namespace looks up keys never seen here). The answer is merged into the
    /// store and reported as [`Event::LookupDone`]; none within `lookup_timeout_ms` gives
    /// [`Event::LookupTimedOut`]. Returns the request id, or `None` when the link is not up.
    pub fn lookup(&mut self, now_ms: u64, peer: RegionId, key: RecordKey) -> Option<u64> {
        if !self.is_up(peer) {
            return None;
        }
        let request = self.next_request;
        self.next_request += 1;
        self.lookups.insert(
            request,
            (peer, key.clone(), now_ms + self.cfg.lookup_timeout_ms),
        );
        self.transmits
            .push_back((peer, Message::Lookup(Lookup { request, key })));
        Some(request)
    }

    /// [`Replica::lookup`] of `key` at every peer whose link is up (lookup on miss). Returns
    /// the request ids (none when no link is up).
    pub fn lookup_everywhere(&mut self, now_ms: u64, key: &RecordKey) -> Vec<u64> {
        let ids: Vec<RegionId> = self.peers.keys().copied().collect();
        ids.into_iter()
            .filter_map(|p| self.lookup(now_ms, p, key.clone()))
            .collect()
    }

    /// Answers a peer's lookup with what is durable here (later, if the key's newest write is
    /// not durable yet: a peer must never learn a fact a crash here could take back).
    fn answer_lookup<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        request: u64,
        key: RecordKey,
    ) {
        let record = match store.read(now_ms, &key) {
            Ok(p) => match p.try_into_value(store) {
                Ok(view) => view.map(|v| v.record),
                Err(_) => {
                    self.to_answer.push((peer, request, key));
                    return;
                }
            },
            // Unknown namespace or a key outside the limits: nothing to tell.
            Err(_) => None,
        };
        self.transmits.push_back((
            peer,
            Message::LookupReply(LookupReply {
                request,
                key,
                record,
            }),
        ));
    }

    fn on_lookup_reply<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        r: LookupReply,
    ) {
        match self.lookups.get(&r.request) {
            Some((p, k, _)) if *p == peer && *k == r.key => {}
            _ => {
                self.stats.stale_answers += 1;
                return;
            }
        }
        self.lookups.remove(&r.request);
        let found = r.record.is_some();
        if let Some(record) = &r.record {
            if let Err(e) = store.merge_record(now_ms, peer, &r.key, record) {
                self.events.push_back(Event::LookupRefused {
                    peer,
                    error: e.to_string(),
                });
                return;
            }
        }
        self.events.push_back(Event::LookupDone {
            request: r.request,
            key: r.key,
            found,
        });
    }

    fn hello(&self) -> Hello {
        Hello {
            cluster: self.cfg.cluster.clone(),
            region: self.region,
            versions: self.cfg.versions,
            policy_digest: self.cfg.policy_digest,
        }
    }

    fn reject(&mut self, peer: RegionId, reason: RejectReason) {
        self.transmits.push_back((
            peer,
            Message::Reject(Reject {
                reason: reason.clone(),
            }),
        ));
        self.events.push_back(Event::Rejected { peer, reason });
        if let Some(p) = self.peers.get_mut(&peer) {
            p.reset();
        }
    }

    fn violation(&mut self, peer: RegionId, what: String) {
        self.events
            .push_back(Event::ProtocolViolation { peer, what });
    }

    fn on_hello(&mut self, now_ms: u64, peer: RegionId, h: Hello) {
        let reason = if h.cluster != self.cfg.cluster {
            Some(RejectReason::ClusterMismatch {
                ours: self.cfg.cluster.clone(),
            })
        } else if h.region == self.region {
            Some(RejectReason::SameRegion)
        } else if h.region != peer {
            Some(RejectReason::UnexpectedRegion { expected: peer })
        } else {
            None
        };
        let version = self.cfg.versions.highest_common(&h.versions);
        let reason = reason.or_else(|| {
            version.is_none().then_some(RejectReason::NoCommonVersion {
                ours: self.cfg.versions,
            })
        });
        if let Some(reason) = reason {
            self.reject(peer, reason);
            return;
        }
        let version = version.expect("checked above");
        let hello = self.hello();
        let p = self.peers.get_mut(&peer).expect("a configured peer");
        match p.link {
            Link::Up { .. } => {
                self.violation(peer, "a second hello".into());
                return;
            }
            Link::Down => {
                // The peer spoke first on a link we had not seen come up: answer it.
                p.reset();
                self.transmits.push_back((peer, Message::Hello(hello)));
            }
            Link::HelloSent => {}
        }
        let p = self.peers.get_mut(&peer).expect("a configured peer");
        p.link = Link::Up { version };
        // Anti-entropy at once on (re)connect, then on the jittered schedule.
        p.next_digest_ms = now_ms;
        p.next_ping_ms = now_ms;
        if h.policy_digest != self.cfg.policy_digest {
            self.events.push_back(Event::PolicyMismatch { peer });
        }
        self.events.push_back(Event::PeerUp { peer, version });
    }

    fn on_message<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        msg: Message,
    ) {
        match msg {
            Message::Push(push) => {
                if push.origin != peer {
                    self.violation(peer, format!("push of {}'s log", push.origin));
                    return;
                }
                self.merge(store, now_ms, peer, push.mutations);
            }
            Message::Digest(d) => self.on_digest(store, now_ms, peer, d),
            Message::RangeRequest(r) => self.on_range_request(store, now_ms, peer, r),
            Message::Range(r) => self.on_range(store, now_ms, peer, r),
            Message::Busy(b) => {
                let p = self.peers.get_mut(&peer).expect("peer");
                if let Some(r) = p.ranges.get_mut(&b.request) {
                    r.resend_at_ms = now_ms + u64::from(b.retry_after_ms);
                }
                if let Some(s) = self
                    .snapshot
                    .as_mut()
                    .filter(|s| s.peer == peer && s.request == b.request)
                {
                    s.resend_at_ms = now_ms + u64::from(b.retry_after_ms);
                }
            }
            Message::ResetRequired(r) => {
                let p = self.peers.get_mut(&peer).expect("peer");
                if p.ranges.remove(&r.request).is_none() {
                    self.stats.stale_answers += 1;
                    return;
                }
                p.truncated.insert(r.origin);
                self.events.push_back(Event::ResetRequired {
                    peer,
                    origin: r.origin,
                    retained_from: r.retained_from,
                });
                if self.snapshot.is_none() {
                    let request = self.next_request;
                    self.next_request += 1;
                    self.snapshot = Some(SnapshotPull {
                        peer,
                        request,
                        after: None,
                        marks: None,
                        resend_at_ms: 0,
                        tries: 0,
                        records: 0,
                    });
                    self.ask_snapshot(now_ms);
                }
            }
            Message::Ping(ping) => self.transmits.push_back((
                peer,
                Message::Pong(Pong {
                    nonce: ping.nonce,
                    ping_sent_ms: ping.sent_ms,
                    received_ms: now_ms,
                    sent_ms: now_ms,
                }),
            )),
            Message::Pong(pong) => {
                let p = self.peers.get_mut(&peer).expect("peer");
                // One sample per ping, for the ping actually sent.
                if pong.nonce != p.ping_nonce
                    || p.ping_sent_ms != Some(pong.ping_sent_ms)
                    || pong.ping_sent_ms > now_ms
                {
                    return;
                }
                p.ping_sent_ms = None;
                let rtt =
                    (now_ms - pong.ping_sent_ms).saturating_sub(pong.sent_ms - pong.received_ms);
                let ours_mid = (i128::from(pong.ping_sent_ms) + i128::from(now_ms)) / 2;
                let theirs_mid = (i128::from(pong.received_ms) + i128::from(pong.sent_ms)) / 2;
                let offset = (theirs_mid - ours_mid).clamp(i64::MIN.into(), i64::MAX.into());
                if let Some(h) = self.health.get_mut(&peer) {
                    h.offset_sample(offset as i64);
                }
                self.events.push_back(Event::ClockSample {
                    peer,
                    rtt_ms: rtt,
                    offset_ms: offset as i64,
                });
            }
            Message::Lookup(l) => self.answer_lookup(store, now_ms, peer, l.request, l.key),
            Message::LookupReply(r) => self.on_lookup_reply(store, now_ms, peer, r),
            Message::SnapshotRequest(r) => self.serve_snapshot(store, now_ms, peer, r),
            Message::SnapshotChunk(c) => self.on_snapshot_chunk(store, now_ms, peer, c),
            // A retirement of a region outside the cluster would hold stability back for ever.
            Message::Retired(r)
                if r.region != self.region && !self.peers.contains_key(&r.region) =>
            {
                self.violation(
                    peer,
                    format!("retirement of {}, not in the cluster", r.region),
                );
            }
            Message::Retired(r) => match store.retire_from_peer(r.region, r.last_seq) {
                Ok(p) if *p.peek() => self.events.push_back(Event::Retired {
                    peer,
                    region: r.region,
                    last_seq: r.last_seq,
                }),
                Ok(_) => {}
                // The next round sends it again.
                Err(e) => self.events.push_back(Event::MergeUnavailable {
                    peer,
                    error: e.to_string(),
                }),
            },
            other => {
                let kind = other.kind();
                self.events.push_back(Event::Unhandled { peer, kind });
            }
        }
    }

    /// Merges mutations a peer sent; stops at the first the store cannot take now.
    fn merge<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        mutations: Vec<Mutation>,
    ) {
        for m in mutations {
            if m.origin == self.region {
                // Our own log comes back through a peer's range: we hold all of it.
                self.stats.merged_dup += 1;
                continue;
            }
            let (origin, seq) = (m.origin, m.seq);
            match store.merge_remote(now_ms, m) {
                Ok(p) => {
                    let merged = p.peek();
                    if merged.new {
                        self.stats.merged_new += 1;
                    } else {
                        self.stats.merged_dup += 1;
                    }
                    if merged.drift_rejected {
                        self.events
                            .push_back(Event::DriftRejected { peer, origin, seq });
                    }
                }
                Err(StoreError::InvalidMutation { .. }) | Err(StoreError::Corrupt(_)) => {
                    // Corrupt here means a delta that contradicts the record: the peer's fault.
                    let error = format!("{origin} seq {seq} refused");
                    self.events
                        .push_back(Event::InvalidMutation { peer, error });
                }
                Err(e) => {
                    self.events.push_back(Event::MergeUnavailable {
                        peer,
                        error: e.to_string(),
                    });
                    return;
                }
            }
        }
    }

    /// Queues this region's new durable mutations for every peer that is up.
    fn queue_local<S: Storage>(&mut self, store: &Store<S>, now_ms: u64) {
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::PushBeforeSync) {
            let ahead = store.mutant_unsynced_after(self.pushed_up_to);
            if let Some(last) = ahead.last() {
                self.pushed_up_to = last.seq;
                self.enqueue_local(&ahead, now_ms);
                // ... and at once.
                let ids: Vec<RegionId> = self.peers.keys().copied().collect();
                for id in ids {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.push_deadline_ms = p.push_deadline_ms.map(|_| now_ms);
                    }
                    self.flush_push(id, now_ms, false);
                }
            }
        }
        loop {
            let durable = store.log().durable_seq();
            if durable <= self.pushed_up_to {
                return;
            }
            let want = (durable - self.pushed_up_to).min(BATCH_MUTATIONS_MAX as u64) as usize;
            let batch = match store.log_from(now_ms, self.region, self.pushed_up_to + 1, want) {
                Ok(b) if !b.is_empty() => b,
                // Not readable now (or beyond retention): anti-entropy covers it.
                _ => {
                    self.pushed_up_to = durable;
                    return;
                }
            };
            self.pushed_up_to = batch.last().map_or(durable, |m| m.seq);
            self.enqueue_local(&batch, now_ms);
        }
    }

    /// Queues this region's mutations for every peer whose link is up.
    fn enqueue_local(&mut self, batch: &[Mutation], now_ms: u64) {
        let ids: Vec<RegionId> = self.peers.keys().copied().collect();
        for id in ids {
            if !self.is_up(id) {
                continue;
            }
            let p = self.peers.get_mut(&id).expect("peer");
            let dropped = p.enqueue(batch, self.cfg.push_queue_bytes, approx_bytes);
            if p.push_deadline_ms.is_none() && !p.queue.is_empty() {
                p.push_deadline_ms = Some(now_ms + self.cfg.push_delay_ms);
            }
            if dropped > 0 {
                self.stats.push_dropped += dropped;
                self.events.push_back(Event::PushDropped {
                    peer: id,
                    count: dropped,
                });
            }
            self.flush_push(id, now_ms, true);
        }
    }

    /// Sends `peer`'s queued mutations if its batch is due (or full, when `only_full`).
    fn flush_push(&mut self, peer: RegionId, now_ms: u64, only_full: bool) {
        let batch_bytes = self.cfg.push_batch_bytes;
        let p = self.peers.get_mut(&peer).expect("peer");
        loop {
            let full = p.queue_bytes >= batch_bytes || p.queue.len() >= BATCH_MUTATIONS_MAX;
            let due = p.push_deadline_ms.is_some_and(|d| d <= now_ms);
            if p.queue.is_empty() || !(full || (!only_full && due)) {
                break;
            }
            let mut mutations = Vec::new();
            let mut bytes = 0;
            while let Some(m) = p.queue.front() {
                let b = approx_bytes(m);
                if !mutations.is_empty()
                    && (bytes + b > batch_bytes.min(FRAME_BYTES_MAX / 2)
                        || mutations.len() == BATCH_MUTATIONS_MAX)
                {
                    break;
                }
                bytes += b;
                p.queue_bytes -= b;
                mutations.push(p.queue.pop_front().expect("front"));
            }
            self.stats.pushed += mutations.len() as u64;
            self.transmits.push_back((
                peer,
                Message::Push(Push {
                    origin: self.region,
                    mutations,
                }),
            ));
        }
        p.push_deadline_ms = (!p.queue.is_empty())
            .then(|| {
                p.push_deadline_ms
                    .unwrap_or(now_ms + self.cfg.push_delay_ms)
            })
            .map(|d| d.max(now_ms));
    }

    fn send_digest<S: Storage>(&mut self, store: &Store<S>, now_ms: u64, peer: RegionId) {
        let mut holdings = store.holdings(GAPS_MAX);
        if holdings.len() > ORIGINS_MAX {
            // Cut to the limit, always keeping our own log's entry: without it a peer cannot
            // use the digest for stability.
            let own = holdings.iter().position(|h| h.origin == self.region);
            let own = own.map(|i| holdings.remove(i));
            holdings.truncate(ORIGINS_MAX - usize::from(own.is_some()));
            holdings.extend(own);
            holdings.sort_by_key(|h| h.origin);
        }
        let origins: Vec<_> = holdings.iter().map(sync::digest_entry).collect();
        let jitter = self.rng.below(
            self.cfg
                .digest_max_ms
                .saturating_sub(self.cfg.digest_min_ms)
                + 1,
        );
        let p = self.peers.get_mut(&peer).expect("peer");
        p.next_digest_ms = now_ms + self.cfg.digest_min_ms + jitter;
        // Retirements travel with every round (there are few, and a region that was down
        // must hear of them), durable ones only like every other fact, and *before* the
        // digest: the link delivers in order, so a peer that uses this digest for stability
        // already holds every retirement it was sent after (otherwise it could show an item
        // actionable under a winner the retirement makes an orphan).
        for (region, last_seq) in store.durable_retirements().0 {
            self.transmits
                .push_back((peer, Message::Retired(wire::Retired { region, last_seq })));
        }
        self.transmits
            .push_back((peer, Message::Digest(Digest { origins })));
    }

    /// A peer's digest: ask it for what it holds and we lack, one range per origin at a time.
    fn on_digest<S: Storage>(&mut self, store: &Store<S>, now_ms: u64, peer: RegionId, d: Digest) {
        let ours: BTreeMap<RegionId, _> = store
            .holdings(GAPS_MAX)
            .into_iter()
            .map(|h| (h.origin, h))
            .collect();
        // What the peer holds durably also tells which keys it can no longer change behind
        // our back (stability).
        let theirs: Vec<Holding> = d.origins.iter().map(sync::holding_of).collect();
        store.note_peer_digest(peer, &theirs);
        let p = self.peers.get_mut(&peer).expect("peer");
        p.holds = d.origins.iter().map(|o| (o.origin, o.clone())).collect();
        for theirs in &d.origins {
            let p = &self.peers[&peer];
            if p.ranges.len() >= RANGES_PER_PEER_MAX {
                break;
            }
            if theirs.origin == self.region
                || p.truncated.contains(&theirs.origin)
                || p.ranges.values().any(|r| r.origin == theirs.origin)
            {
                continue;
            }
            if let Some(range) =
                sync::next_missing(ours.get(&theirs.origin), theirs, self.cfg.range_chunk)
            {
                self.ask_range(now_ms, peer, theirs.origin, range);
            }
        }
    }

    /// After a range of `origin` up to `done` arrived: the next chunk the peer's digest says it
    /// holds, at once (what was merged is not durable yet, so our holdings cannot tell).
    fn continue_ranges<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        origin: RegionId,
        done: u64,
    ) {
        let Some(theirs) = self.peers[&peer].holds.get(&origin).cloned() else {
            return;
        };
        let ours = store
            .holdings(GAPS_MAX)
            .into_iter()
            .find(|h| h.origin == origin);
        let ours = sync::held_through(ours, origin, done);
        if let Some(range) = sync::next_missing(Some(&ours), &theirs, self.cfg.range_chunk) {
            self.ask_range(now_ms, peer, origin, range);
        }
    }

    fn ask_range(&mut self, now_ms: u64, peer: RegionId, origin: RegionId, range: SeqRange) {
        self.ask_range_try(now_ms, peer, origin, range, 1);
    }

    fn ask_range_try(
        &mut self,
        now_ms: u64,
        peer: RegionId,
        origin: RegionId,
        range: SeqRange,
        tries: u32,
    ) {
        let request = self.next_request;
        self.next_request += 1;
        let p = self.peers.get_mut(&peer).expect("peer");
        p.ranges.insert(
            request,
            peer::Asked {
                origin,
                range,
                resend_at_ms: now_ms + self.cfg.range_timeout_ms,
                tries,
            },
        );
        self.stats.ranges_asked += 1;
        self.transmits.push_back((
            peer,
            Message::RangeRequest(RangeRequest {
                request,
                origin,
                range,
                max_bytes: self.cfg.range_bytes,
            }),
        ));
    }

    fn retry_ranges(&mut self, peer: RegionId, now_ms: u64) {
        let due: Vec<u64> = self.peers[&peer]
            .ranges
            .iter()
            .filter(|(_, r)| r.resend_at_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let p = self.peers.get_mut(&peer).expect("peer");
            let asked = p.ranges.remove(&id).expect("listed");
            if asked.tries < RANGE_TRIES_MAX {
                self.ask_range_try(now_ms, peer, asked.origin, asked.range, asked.tries + 1);
            }
        }
    }

    /// Gives the snapshot stream up and lets every peer be asked for ranges again, so that the
    /// next `ResetRequired` (from whichever peer) starts another stream.
    fn drop_snapshot(&mut self) {
        self.snapshot = None;
        for p in self.peers.values_mut() {
            p.truncated.clear();
        }
    }

    /// Whether the serving budget of the current second has bytes left; if not, answers the
    /// peer's `request` with `Busy` until the next second.
    fn serve_budget_left(&mut self, now_ms: u64, peer: RegionId, request: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.serve_second {
            self.serve_second = second;
            self.serve_left = self.cfg.serve_bytes_per_s;
        }
        if self.serve_left > 0 {
            return true;
        }
        self.stats.busy_sent += 1;
        self.transmits.push_back((
            peer,
            Message::Busy(Busy {
                request,
                retry_after_ms: (1000 - now_ms % 1000) as u32,
            }),
        ));
        false
    }

    /// Asks the snapshot stream's peer for its next chunk.
    fn ask_snapshot(&mut self, now_ms: u64) {
        // A fresh request id per ask: a late answer to an earlier ask is then merely stale.
        let request = self.next_request;
        let Some(s) = self.snapshot.as_mut() else {
            return;
        };
        if s.tries >= RANGE_TRIES_MAX {
            // The peer does not answer: give the stream up; the next ResetRequired, from any
            // peer, starts another.
            self.drop_snapshot();
            return;
        }
        self.next_request += 1;
        s.request = request;
        s.tries += 1;
        s.resend_at_ms = now_ms + self.cfg.range_timeout_ms;
        self.transmits.push_back((
            s.peer,
            Message::SnapshotRequest(SnapshotRequest {
                request: s.request,
                after: s.after,
                max_records: SNAPSHOT_CHUNK_RECORDS,
            }),
        ));
    }

    /// Serves a chunk of this region's key-ordered snapshot: durable records only (later, if
    /// the newest write of one is not durable yet), within the serving budget and the byte
    /// budget of a frame, with this region's durable marks.
    fn serve_snapshot<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        r: SnapshotRequest,
    ) {
        if !self.serve_budget_left(now_ms, peer, r.request) {
            return;
        }
        let max = (r.max_records as usize).min(SNAPSHOT_RECORDS_MAX);
        // The marks first: every record read after them holds at least what they cover.
        let marks: Vec<(RegionId, u64)> = store.marks().into_iter().take(ORIGINS_MAX).collect();
        let chunk = match store.snapshot_chunk(r.after, max) {
            Ok(p) => match p.try_into_value(store) {
                Ok(c) => c,
                Err(_) => {
                    // Answered once durable; one deferred answer per peer (a re-ask replaces it).
                    self.to_serve.retain(|(p, _)| *p != peer);
                    self.to_serve.push((peer, r));
                    return;
                }
            },
            // Unreadable now: the asker asks again after its timeout.
            Err(_) => return,
        };
        let budget = (self.cfg.range_bytes as usize).min(FRAME_BYTES_MAX / 2);
        let mut bytes = 0;
        let mut records = Vec::new();
        let total = chunk.records.len();
        for (digest, key, record) in chunk.records {
            let b = approx_record_bytes(&key, &record) + 64;
            if !records.is_empty() && bytes + b > budget {
                break;
            }
            bytes += b;
            records.push((digest, key, record));
        }
        self.serve_left = self.serve_left.saturating_sub(bytes as u64);
        self.stats.snapshot_chunks_served += 1;
        // Cut short by the byte budget: resume after the last record sent.
        let next = if records.len() < total {
            records.last().map(|(d, _, _)| *d)
        } else {
            chunk.next
        };
        self.transmits.push_back((
            peer,
            Message::SnapshotChunk(SnapshotChunk {
                request: r.request,
                records: records.into_iter().map(|(_, k, rec)| (k, rec)).collect(),
                next,
                marks,
            }),
        ));
    }

    /// A chunk of the snapshot stream this region pulls: merge its records, then ask for the
    /// next; once complete, adopt the marks of the stream's first chunk.
    fn on_snapshot_chunk<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        c: SnapshotChunk,
    ) {
        let Some(s) = self
            .snapshot
            .as_mut()
            .filter(|s| s.peer == peer && s.request == c.request)
        else {
            self.stats.stale_answers += 1;
            return;
        };
        if c.records
            .first()
            .is_some_and(|(k, _)| s.after.is_some_and(|a| k.digest() <= a))
            || c.records
                .iter()
                .any(|(k, _)| c.next.is_some_and(|n| k.digest() > n))
        {
            self.violation(peer, "snapshot chunk out of order".into());
            return;
        }
        for (key, record) in &c.records {
            match store.merge_record(now_ms, peer, key, record) {
                Ok(_) => {}
                Err(e @ (StoreError::Invalid(_) | StoreError::InvalidMutation { .. })) => {
                    // Never mergeable: give this peer's stream up (it stays marked truncated
                    // on this link, so it is not asked again until the link comes back).
                    self.snapshot = None;
                    self.violation(peer, format!("snapshot record refused: {e}"));
                    return;
                }
                Err(e) => {
                    // Asked again from the same point after the timeout.
                    self.events.push_back(Event::MergeUnavailable {
                        peer,
                        error: e.to_string(),
                    });
                    return;
                }
            }
        }
        let s = self.snapshot.as_mut().expect("checked");
        s.tries = 0;
        s.records += c.records.len() as u64;
        self.stats.snapshot_records += c.records.len() as u64;
        if s.marks.is_none() {
            s.marks = Some(c.marks);
        }
        match c.next {
            Some(next) => {
                s.after = Some(next);
                self.ask_snapshot(now_ms);
            }
            None => {
                let s = self.snapshot.take().expect("checked");
                let marks = s.marks.unwrap_or_default();
                if let Err(e) = store.adopt_marks(peer, &marks) {
                    self.events.push_back(Event::MergeUnavailable {
                        peer,
                        error: e.to_string(),
                    });
                    return;
                }
                self.stats.snapshots_done += 1;
                for p in self.peers.values_mut() {
                    p.truncated.clear();
                }
                self.events.push_back(Event::SnapshotDone {
                    peer,
                    records: s.records,
                });
            }
        }
    }

    fn on_range_request<S: Storage>(
        &mut self,
        store: &Store<S>,
        now_ms: u64,
        peer: RegionId,
        r: RangeRequest,
    ) {
        if !self.serve_budget_left(now_ms, peer, r.request) {
            return;
        }
        let count = (r.range.last - r.range.first + 1).min(BATCH_MUTATIONS_MAX as u64) as usize;
        let found = match store.log_from(now_ms, r.origin, r.range.first, count) {
            Ok(found) => found,
            Err(StoreError::LogTruncated { first_retained, .. }) => {
                self.transmits.push_back((
                    peer,
                    Message::ResetRequired(ResetRequired {
                        request: r.request,
                        origin: r.origin,
                        retained_from: first_retained.max(1),
                    }),
                ));
                return;
            }
            Err(_) => {
                // Unreadable now: the asker's timeout asks again.
                return;
            }
        };
        let budget = (r.max_bytes as usize).min(FRAME_BYTES_MAX / 2);
        let mut mutations = Vec::new();
        let mut bytes = 0;
        let mut next = None;
        for m in found {
            if m.seq > r.range.last {
                break;
            }
            let b = approx_bytes(&m);
            if !mutations.is_empty() && bytes + b > budget {
                next = Some(m.seq);
                break;
            }
            bytes += b;
            mutations.push(m);
        }
        if next.is_none() {
            // Cut short by the count cap: resume above what was sent.
            if let Some(last) = mutations.last() {
                if last.seq < r.range.last && mutations.len() == count {
                    next = Some(last.seq + 1);
                }
            }
        }
        // Every answer costs its bytes plus a fixed share for the log scan behind it, so
        // requests for nothing are not free.
        self.serve_left = self
            .serve_left
            .saturating_sub(bytes as u64 + SERVE_REQUEST_COST_BYTES);
        self.stats.served += mutations.len() as u64;
        self.transmits.push_back((
            peer,
            Message::Range(Range {
                request: r.request,
                origin: r.origin,
                mutations,
                next,
            }),
        ));
    }

    fn on_range<S: Storage>(&mut self, store: &Store<S>, now_ms: u64, peer: RegionId, r: Range) {
        let p = self.peers.get_mut(&peer).expect("peer");
        let Some(asked) = p.ranges.remove(&r.request) else {
            // The answer to a request already asked again (or a duplicated delivery): its
            // mutations are as good as any, merges commute; nothing more to ask.
            self.stats.stale_answers += 1;
            self.merge(store, now_ms, peer, r.mutations);
            return;
        };
        if asked.origin != r.origin
            || r.mutations
                .iter()
                .any(|m| m.seq < asked.range.first || m.seq > asked.range.last)
        {
            self.violation(peer, "a range outside what was asked".into());
            return;
        }
        self.merge(store, now_ms, peer, r.mutations);
        match r.next.filter(|n| *n <= asked.range.last) {
            Some(next) => self.ask_range(
                now_ms,
                peer,
                asked.origin,
                SeqRange {
                    first: next,
                    last: asked.range.last,
                },
            ),
            None => self.continue_ranges(store, now_ms, peer, asked.origin, asked.range.last),
        }
    }
}

/// An upper bound on a mutation's encoded size, for batching (bincode: a varint is at most 9
/// bytes for a `u64`, 17 for a `u128`; lengths are varints too).
fn approx_bytes(m: &Mutation) -> usize {
    approx_delta_bytes(&m.key, &m.delta)
}

/// Records asked for per snapshot chunk (the server also cuts a chunk at its byte budget).
const SNAPSHOT_CHUNK_RECORDS: u32 = 512;

/// Rough encoded size of a record in a snapshot chunk.
fn approx_record_bytes(key: &RecordKey, record: &crate::record::Record) -> usize {
    record
        .to_deltas()
        .iter()
        .map(|d| approx_delta_bytes(key, d))
        .sum()
}

fn approx_delta_bytes(k: &RecordKey, d: &Delta) -> usize {
    let key = k.namespace().len() + k.principal().len() + k.key().len() + 3 * 9;
    let stamp = 9 + 16;
    let outcome = |o: &crate::record::Outcome| {
        let body = match &o.body {
            Body::Full(b) | Body::Redacted(b) => b.len() + 9,
            Body::Digest { .. } => 9 + 32,
        };
        4 + 9
            + o.headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 18)
                .sum::<usize>()
            + 1
            + body
    };
    let delta = match d {
        Delta::Claim { facts, .. } => stamp + 32 + 17 + 3 * 9 + 9 + facts.takes_over.len() * stamp,
        Delta::Extend { .. } => stamp + 9,
        Delta::Finish { terminal, .. } => {
            stamp
                + 1
                + match terminal {
                    Terminal::Released => 0,
                    Terminal::Completed(o) | Terminal::Indeterminate(o) => outcome(o),
                }
        }
        Delta::Resolve(r) => {
            16 + stamp
                + r.by.len()
                + r.note.len()
                + r.hook_result.as_ref().map_or(0, String::len)
                + r.provider_ref.as_ref().map_or(0, String::len)
                + 4 * 10
        }
    };
    16 + 9 + key + 1 + delta
}
