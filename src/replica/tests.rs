//! Regions wired together in one thread: real stores (in memory), real replicas, every message
//! through the wire codec, links that can be cut one way or both, virtual time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::*;
use crate::record::{AttemptToken, Delta, Fingerprint, ItemKind, Outcome, RecordKey};
use crate::store::storage::VolatileStorage;
use crate::store::{ClaimRequest, Decision, StoreConfig};
use crate::wire::frame::{self, FrameDecoder};
use crate::wire::OriginDigest;

const T0: u64 = 1_800_000_000_000;

struct Region {
    store: Store<VolatileStorage>,
    replica: Replica,
    events: Vec<Event>,
}

struct Net {
    regions: BTreeMap<RegionId, Region>,
    now: u64,
    /// Directed links that drop everything.
    cut: BTreeSet<(RegionId, RegionId)>,
    wire: VecDeque<(RegionId, RegionId, Vec<u8>)>,
    delivered: u64,
}

fn rid(name: &str) -> RegionId {
    RegionId::new(name).unwrap()
}

fn cluster() -> ClusterId {
    ClusterId::new("test").unwrap()
}

impl Net {
    fn new(names: &[&str], tweak: impl Fn(&mut ReplicaConfig)) -> Self {
        Self::with_stores(names, tweak, |_| {})
    }

    fn with_stores(
        names: &[&str],
        tweak: impl Fn(&mut ReplicaConfig),
        store_tweak: impl Fn(&mut StoreConfig),
    ) -> Self {
        let ids: Vec<RegionId> = names.iter().map(|n| rid(n)).collect();
        let regions = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let mut store_cfg = StoreConfig::new(*id, &["payments"]);
                store_tweak(&mut store_cfg);
                let store = Store::open(VolatileStorage::new(), store_cfg, T0).unwrap();
                let mut cfg = ReplicaConfig::new(cluster());
                tweak(&mut cfg);
                let replica = Replica::new(*id, &ids, cfg, i as u64 + 1, 0);
                (
                    *id,
                    Region {
                        store,
                        replica,
                        events: Vec::new(),
                    },
                )
            })
            .collect();
        Self {
            regions,
            now: T0,
            cut: BTreeSet::new(),
            wire: VecDeque::new(),
            delivered: 0,
        }
    }

    fn ids(&self) -> Vec<RegionId> {
        self.regions.keys().copied().collect()
    }

    fn region(&mut self, name: &str) -> &mut Region {
        self.regions.get_mut(&rid(name)).unwrap()
    }

    /// Brings every link up (both ends see it) and runs the handshakes.
    fn connect_all(&mut self) {
        let ids = self.ids();
        for a in &ids {
            for b in &ids {
                if a != b {
                    let now = self.now;
                    self.regions.get_mut(a).unwrap().replica.connected(now, *b);
                }
            }
        }
        self.pump();
    }

    /// Moves messages until none is left: each goes through the frame codec.
    fn pump(&mut self) {
        loop {
            let ids = self.ids();
            for id in &ids {
                let r = self.regions.get_mut(id).unwrap();
                while let Some((to, msg)) = r.replica.poll_transmit() {
                    if !self.cut.contains(&(*id, to)) {
                        self.wire.push_back((*id, to, frame::encode(&msg).unwrap()));
                    }
                }
                while let Some(e) = r.replica.poll_event() {
                    r.events.push(e);
                }
            }
            let Some((from, to, bytes)) = self.wire.pop_front() else {
                return;
            };
            let mut d = FrameDecoder::new();
            d.push(&bytes).unwrap();
            let msg = d.next().unwrap().unwrap();
            self.delivered += 1;
            let now = self.now;
            let r = self.regions.get_mut(&to).unwrap();
            r.replica.receive(&r.store, now, from, msg);
            r.store.flush().unwrap();
        }
    }

    /// Advances virtual time in steps of `step` ms, flushing stores and running timeouts.
    fn run(&mut self, ms: u64, step: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += step;
            let now = self.now;
            for r in self.regions.values_mut() {
                r.store.flush().unwrap();
                r.replica.handle_timeout(&r.store, now);
            }
            self.pump();
        }
    }

    fn cut_both(&mut self, a: &str, b: &str) {
        self.cut.insert((rid(a), rid(b)));
        self.cut.insert((rid(b), rid(a)));
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn marks(&mut self, name: &str) -> BTreeMap<RegionId, u64> {
        self.region(name).store.marks()
    }
}

fn request(key: &str, body: &str) -> ClaimRequest {
    ClaimRequest {
        key: RecordKey::new("payments", "acct", key),
        fingerprint: Fingerprint::of(body.as_bytes()),
        attempt: AttemptToken(1),
    }
}

/// Claims and completes `key` in `region`, returning the outcome stored.
fn pair(net: &mut Net, region: &str, key: &str, result: &str) -> Outcome {
    let now = net.now;
    let r = net.region(region);
    let req = request(key, "POST /charge");
    let Decision::Execute { claim, .. } = r.store.wait(r.store.claim(now, &req).unwrap()).unwrap()
    else {
        panic!("a fresh key in {region} is ours to execute");
    };
    let outcome = Outcome::new(201, result.as_bytes().to_vec());
    r.store
        .wait(
            r.store
                .complete(now, &req.key, claim, outcome.clone())
                .unwrap(),
        )
        .unwrap();
    outcome
}

fn claim(net: &mut Net, region: &str, key: &str) -> Decision {
    let now = net.now;
    let r = net.region(region);
    let mut req = request(key, "POST /charge");
    req.attempt = AttemptToken(99);
    r.store.wait(r.store.claim(now, &req).unwrap()).unwrap()
}

#[test]
fn pushes_carry_a_completed_claim_to_every_peer_who_then_replays_it() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    for id in net.ids() {
        let r = &net.regions[&id];
        for peer in net.ids().into_iter().filter(|p| *p != id) {
            assert!(r.replica.is_up(peer), "{id} -> {peer}");
        }
    }
    let outcome = pair(&mut net, "a", "order-1", "charged once");
    net.run(10, 1);
    for name in ["b", "c"] {
        assert_eq!(
            net.marks(name)[&rid("a")],
            2,
            "{name} holds a's claim and completion"
        );
        match claim(&mut net, name, "order-1") {
            Decision::Replay { outcome: o, .. } => assert_eq!(o, outcome),
            other => panic!("{name} should replay a's outcome, got {other:?}"),
        }
    }
    let a = net.region("a").replica.stats().clone();
    assert_eq!(a.pushed, 4, "two mutations to each of two peers");
    assert_eq!(a.ranges_asked, 0, "nothing was missing: no pull");
}

#[test]
fn anti_entropy_fetches_what_a_cut_link_lost() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    net.cut.insert((rid("a"), rid("b")));
    for i in 0..50 {
        pair(&mut net, "a", &format!("k{i}"), "ok");
    }
    net.run(20, 1);
    assert_eq!(net.marks("c")[&rid("a")], 100);
    assert_eq!(net.marks("b").get(&rid("a")).copied().unwrap_or(0), 0);
    net.heal();
    // Within one anti-entropy period (at most 5 s) b asks a peer for the range.
    net.run(6_000, 50);
    assert_eq!(net.marks("b")[&rid("a")], 100);
    assert!(net.region("b").replica.stats().ranges_asked >= 1);
}

#[test]
fn a_partial_partition_heals_through_a_third_region() {
    let mut net = Net::new(&["a", "b", "c"], |c| c.range_chunk = 16);
    net.connect_all();
    net.cut_both("a", "b");
    for i in 0..40 {
        pair(&mut net, "a", &format!("k{i}"), "ok");
    }
    net.run(12_000, 50);
    assert_eq!(
        net.marks("b")[&rid("a")],
        80,
        "b got a's log from c, in chunks of 16"
    );
    assert!(net.region("c").replica.stats().served >= 80);
}

#[test]
fn claims_made_on_both_sides_of_a_partition_converge_to_one_winner_and_a_duplicate() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    net.cut_both("a", "b");
    let from_a = pair(&mut net, "a", "order-9", "charge ch_A");
    net.now += 3;
    let from_b = pair(&mut net, "b", "order-9", "charge ch_B");
    assert_ne!(from_a, from_b);
    net.heal();
    net.run(6_000, 50);
    // a claimed first (lower stamp): both regions now replay a's outcome.
    for name in ["a", "b"] {
        match claim(&mut net, name, "order-9") {
            Decision::Replay { outcome, .. } => assert_eq!(outcome, from_a, "{name}"),
            other => panic!("{name}: expected a replay, got {other:?}"),
        }
    }
    // ... and both flag b's execution as a duplicate to compensate, with the same id.
    let items = |net: &mut Net, name: &str| {
        let mut v: Vec<_> = net
            .region(name)
            .store
            .all_items(T0)
            .unwrap()
            .into_iter()
            .map(|(_, item)| (item.kind, item.id))
            .collect();
        v.sort();
        v
    };
    let (ia, ib) = (items(&mut net, "a"), items(&mut net, "b"));
    assert_eq!(ia, ib);
    assert_eq!(ia.len(), 1);
    assert_eq!(ia[0].0, ItemKind::Duplicate);
}

#[test]
fn a_full_push_queue_drops_the_oldest_and_anti_entropy_makes_up_for_them() {
    let mut net = Net::new(&["a", "b"], |c| {
        c.push_delay_ms = 1_000_000;
        c.push_batch_bytes = 1 << 30;
        c.push_queue_bytes = 2_000;
    });
    net.connect_all();
    for i in 0..30 {
        pair(&mut net, "a", &format!("k{i}"), "ok");
    }
    net.run(5, 1);
    let dropped = net.region("a").replica.stats().push_dropped;
    assert!(dropped > 0);
    assert!(net
        .region("a")
        .events
        .iter()
        .any(|e| matches!(e, Event::PushDropped { peer, .. } if *peer == rid("b"))));
    net.run(6_000, 50);
    assert_eq!(net.marks("b")[&rid("a")], 60);
}

#[test]
fn a_serving_budget_answers_busy_and_the_asker_comes_back() {
    let mut net = Net::new(&["a", "b"], |c| {
        c.range_chunk = 4;
        c.serve_bytes_per_s = 1_000;
    });
    net.connect_all();
    net.cut.insert((rid("a"), rid("b")));
    for i in 0..20 {
        pair(&mut net, "a", &format!("k{i}"), "ok");
    }
    net.run(20, 1);
    assert_eq!(
        net.region("b").replica.stats().merged_new,
        0,
        "pushes were lost"
    );
    net.heal();
    net.run(30_000, 50);
    assert_eq!(net.marks("b")[&rid("a")], 40);
    let a = net.region("a").replica.stats().clone();
    assert!(a.busy_sent > 0, "{a:?}");
    assert_eq!(a.served, 40, "each mutation served once: {a:?}");
}

#[test]
fn handshakes_refuse_another_cluster_and_versions_in_common_but_not_a_policy_difference() {
    // Another cluster.
    let mut net = Net::new(&["a", "b"], |_| {});
    net.region("b").replica.cfg.cluster = ClusterId::new("other").unwrap();
    net.connect_all();
    assert!(!net.region("a").replica.is_up(rid("b")));
    assert!(!net.region("b").replica.is_up(rid("a")));
    assert!(net.region("a").events.iter().any(|e| matches!(
        e,
        Event::Rejected {
            reason: RejectReason::ClusterMismatch { .. },
            ..
        }
    )));
    assert!(net.region("a").events.iter().any(|e| matches!(
        e,
        Event::RejectedBy {
            reason: RejectReason::ClusterMismatch { .. },
            ..
        }
    )));

    // No version in common.
    let mut net = Net::new(&["a", "b"], |_| {});
    net.region("b").replica.cfg.versions = VersionRange { min: 7, max: 9 };
    net.connect_all();
    assert!(!net.region("a").replica.is_up(rid("b")));
    assert!(net.region("b").events.iter().any(|e| matches!(
        e,
        Event::Rejected {
            reason: RejectReason::NoCommonVersion { .. },
            ..
        }
    )));

    // A policy difference: reported on both sides, the link is up and data flows.
    let mut net = Net::new(&["a", "b"], |_| {});
    net.region("b").replica.cfg.policy_digest = [1; 32];
    net.connect_all();
    assert!(net.region("a").replica.is_up(rid("b")));
    for name in ["a", "b"] {
        assert!(net
            .region(name)
            .events
            .iter()
            .any(|e| matches!(e, Event::PolicyMismatch { .. })));
    }
    pair(&mut net, "a", "k", "ok");
    net.run(10, 1);
    assert_eq!(net.marks("b")[&rid("a")], 2);
}

#[test]
fn messages_out_of_place_are_ignored_and_reported() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    let now = net.now;
    let r = net.region("a");
    // Before any handshake.
    r.replica.receive(
        &r.store,
        now,
        rid("b"),
        Message::Ping(Ping {
            nonce: 1,
            sent_ms: now,
        }),
    );
    // From a region that is not a peer.
    r.replica.receive(
        &r.store,
        now,
        rid("zz"),
        Message::Ping(Ping {
            nonce: 1,
            sent_ms: now,
        }),
    );
    while let Some(e) = r.replica.poll_event() {
        r.events.push(e);
    }
    assert_eq!(
        r.events
            .iter()
            .filter(|e| matches!(e, Event::ProtocolViolation { .. }))
            .count(),
        2
    );
    assert!(r.replica.poll_transmit().is_none(), "nothing answered");

    // A push of someone else's log.
    net.connect_all();
    let now = net.now;
    let r = net.region("a");
    r.events.clear();
    let foreign = Message::Push(Push {
        origin: rid("c"),
        mutations: vec![],
    });
    r.replica.receive(&r.store, now, rid("b"), foreign);
    // A range nobody asked for (an answer to a request asked again, or delivered twice): not
    // a violation; its mutations are merged like any others.
    let c = Store::open(
        VolatileStorage::new(),
        StoreConfig::new(rid("c"), &["payments"]),
        now,
    )
    .unwrap();
    let p = c.claim(now, &request("late", "POST /charge")).unwrap();
    c.wait(p).unwrap();
    let mutations = c.log_from(now, rid("c"), 1, 10).unwrap();
    let unasked = Message::Range(Range {
        request: 999,
        origin: rid("c"),
        mutations,
        next: None,
    });
    r.replica.receive(&r.store, now, rid("b"), unasked);
    r.store.flush().unwrap();
    assert_eq!(r.store.marks()[&rid("c")], 1, "the late range was merged");
    assert_eq!(r.replica.stats().stale_answers, 1);
    let mut v = Vec::new();
    while let Some(e) = r.replica.poll_event() {
        v.push(e);
    }
    assert_eq!(
        v.iter()
            .filter(|e| matches!(e, Event::ProtocolViolation { .. }))
            .count(),
        1,
        "only the foreign push: {v:?}"
    );
}

#[test]
fn heartbeats_estimate_the_round_trip_and_offset() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let now = net.now + 1_000;
    let r = net.region("a");
    r.replica.handle_timeout(&r.store, now);
    while r.replica.poll_transmit().is_some() {}
    // b answers a ping sent at `now`, received at now+5 by b's clock that runs 40 ms ahead,
    // and the pong arrives at now+10 by a's clock.
    assert_eq!(r.replica.peers[&rid("b")].ping_sent_ms, Some(now));
    let ping_nonce = r.replica.peers[&rid("b")].ping_nonce;
    r.replica.receive(
        &r.store,
        now + 10,
        rid("b"),
        Message::Pong(Pong {
            nonce: ping_nonce,
            ping_sent_ms: now,
            received_ms: now + 45,
            sent_ms: now + 45,
        }),
    );
    let mut samples = Vec::new();
    while let Some(e) = r.replica.poll_event() {
        if let Event::ClockSample {
            rtt_ms, offset_ms, ..
        } = e
        {
            samples.push((rtt_ms, offset_ms));
        }
    }
    assert_eq!(samples, vec![(10, 40)]);
}

#[test]
fn a_link_that_drops_and_returns_resumes_with_a_digest() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let (a, b) = (rid("a"), rid("b"));
    let now = net.now;
    net.region("a").replica.disconnected(now, b);
    net.region("b").replica.disconnected(now, a);
    assert!(net
        .region("a")
        .events
        .iter()
        .all(|e| !matches!(e, Event::PeerDown { .. })));
    net.pump();
    assert!(net
        .region("a")
        .events
        .iter()
        .any(|e| matches!(e, Event::PeerDown { .. })));
    // Written while down: not pushed (no link), fetched after the reconnect's digest.
    for i in 0..5 {
        pair(&mut net, "a", &format!("k{i}"), "ok");
    }
    net.run(5, 1);
    assert_eq!(net.marks("b").get(&a).copied().unwrap_or(0), 0);
    net.connect_all();
    net.run(5, 1);
    assert_eq!(
        net.marks("b")[&a],
        10,
        "the digest on reconnect, not the 1-5 s timer"
    );
}

#[test]
fn the_same_seeds_give_the_same_traffic() {
    let run = || {
        let mut net = Net::new(&["a", "b", "c"], |c| c.range_chunk = 8);
        net.connect_all();
        net.cut_both("a", "c");
        for i in 0..20 {
            pair(&mut net, "a", &format!("k{i}"), "ok");
            pair(&mut net, "c", &format!("j{i}"), "ok");
        }
        net.run(9_000, 37);
        let stats: Vec<_> = net
            .ids()
            .iter()
            .map(|id| net.regions[id].replica.stats().clone())
            .collect();
        (net.delivered, stats)
    };
    assert_eq!(run(), run());
}

#[test]
fn a_digest_naming_many_origins_keeps_few_requests_and_gives_them_up() {
    let mut net = Net::new(&["a", "b"], |c| c.range_timeout_ms = 100);
    net.connect_all();
    let now = net.now;
    let origins: Vec<OriginDigest> = (0..1000)
        .map(|i| OriginDigest {
            origin: rid(&format!("x{i:04}")),
            mark: 10,
            gaps: vec![],
            head: 10,
        })
        .collect();
    let mut origins = origins;
    origins.sort_by_key(|o| o.origin);
    let r = net.region("a");
    // b stays silent: nothing answers a's requests.
    for _ in 0..5 {
        r.replica.receive(
            &r.store,
            now,
            rid("b"),
            Message::Digest(Digest {
                origins: origins.clone(),
            }),
        );
    }
    assert_eq!(r.replica.peers[&rid("b")].ranges.len(), RANGES_PER_PEER_MAX);
    let mut sent = 0;
    for step in 1..=10 {
        r.replica.handle_timeout(&r.store, now + step * 100);
        while let Some((_, m)) = r.replica.poll_transmit() {
            if matches!(m, Message::RangeRequest(_)) {
                sent += 1;
            }
        }
    }
    // Each request is sent RANGE_TRIES_MAX times in all, then given up.
    assert_eq!(sent, RANGES_PER_PEER_MAX * RANGE_TRIES_MAX as usize);
    assert!(r.replica.peers[&rid("b")].ranges.is_empty());
}

#[test]
fn a_pong_gives_one_sample_for_the_ping_actually_sent() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let now = net.now;
    let r = net.region("a");
    r.replica.handle_timeout(&r.store, now + 1_000);
    while r.replica.poll_transmit().is_some() {}
    let p = &r.replica.peers[&rid("b")];
    let (nonce, sent) = (p.ping_nonce, p.ping_sent_ms.unwrap());
    let pong = |ping_sent_ms| {
        Message::Pong(Pong {
            nonce,
            ping_sent_ms,
            received_ms: sent + 5,
            sent_ms: sent + 5,
        })
    };
    // A made-up send time, then the right one twice: one sample.
    for m in [pong(sent - 500), pong(sent), pong(sent)] {
        r.replica.receive(&r.store, sent + 10, rid("b"), m);
    }
    let mut samples = 0;
    while let Some(e) = r.replica.poll_event() {
        samples += usize::from(matches!(e, Event::ClockSample { .. }));
    }
    assert_eq!(samples, 1);
}

#[test]
fn numbers_near_the_top_of_the_range_are_refused_before_any_arithmetic() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let now = net.now;
    let b = net.region("b");
    let p = b.store.claim(now, &request("x", "POST /charge")).unwrap();
    b.store.wait(p).unwrap();
    let mut m = b.store.log_from(now, rid("b"), 1, 1).unwrap().remove(0);
    for seq in [u64::MAX, crate::store::SEQ_MAX + 1] {
        m.seq = seq;
        if let Delta::Claim { facts, .. } = &mut m.delta {
            facts.origin_seq = seq;
        }
        let push = Message::Push(Push {
            origin: rid("b"),
            mutations: vec![m.clone()],
        });
        assert!(matches!(
            Message::decode(&push.encode().unwrap()),
            Err(crate::wire::WireError::Invalid(_))
        ));
        // Were it to get past the wire, the store refuses it too.
        let a = net.region("a");
        assert!(matches!(
            a.store.merge_remote(now, m.clone()),
            Err(StoreError::InvalidMutation { .. })
        ));
        a.store.holdings(8);
    }
}

/// Feeds region `name` a pong from `peer` answering its last ping, as if `peer`'s clock ran
/// `offset` ms ahead (zero network delay).
fn pong_with_offset(net: &mut Net, name: &str, peer: &str, offset: i64) {
    let now = net.now;
    let r = net.region(name);
    r.replica.handle_timeout(&r.store, now);
    while r.replica.poll_transmit().is_some() {}
    let p = &r.replica.peers[&rid(peer)];
    let (nonce, sent) = (p.ping_nonce, p.ping_sent_ms.unwrap());
    let theirs = sent.saturating_add_signed(offset);
    r.replica.receive(
        &r.store,
        now,
        rid(peer),
        Message::Pong(Pong {
            nonce,
            ping_sent_ms: sent,
            received_ms: theirs,
            sent_ms: theirs,
        }),
    );
    net.now += 1_000;
}

#[test]
fn a_region_whose_clock_is_off_the_cluster_fences_itself_until_it_is_back() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    // Both peers' clocks run 300 ms ahead of a's: more than half the 500 ms max drift.
    for _ in 0..3 {
        pong_with_offset(&mut net, "a", "b", 300);
        pong_with_offset(&mut net, "a", "c", 300);
    }
    let now = net.now;
    let r = net.region("a");
    r.replica.handle_timeout(&r.store, now);
    assert!(r.replica.is_fenced() && r.store.is_fenced());
    let mut events = Vec::new();
    while let Some(e) = r.replica.poll_event() {
        events.push(e);
    }
    assert!(events.contains(&Event::FenceChanged {
        fenced: true,
        offset_ms: 300
    }));
    match claim(&mut net, "a", "k") {
        Decision::Unavailable { reason, .. } => {
            assert_eq!(reason, crate::store::Unavailable::Fenced)
        }
        other => panic!("a fenced region grants nothing: {other:?}"),
    }
    // The clock comes back (the median of the recent samples moves under 250 ms).
    for _ in 0..8 {
        pong_with_offset(&mut net, "a", "b", 100);
        pong_with_offset(&mut net, "a", "c", 100);
    }
    let now = net.now;
    let r = net.region("a");
    r.replica.handle_timeout(&r.store, now);
    assert!(!r.store.is_fenced());
    assert!(matches!(
        claim(&mut net, "a", "k"),
        Decision::Execute { .. }
    ));
}

#[test]
fn one_peer_with_a_bad_clock_fences_nobody_else() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    for _ in 0..3 {
        pong_with_offset(&mut net, "a", "b", 400);
        pong_with_offset(&mut net, "a", "c", 0);
    }
    let now = net.now;
    let r = net.region("a");
    r.replica.handle_timeout(&r.store, now);
    assert!(
        !r.store.is_fenced(),
        "the cluster's median is a's and c's clock"
    );
}

#[test]
fn a_silent_peer_is_suspected_and_trusted_again_when_heard() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    // Regular heartbeats both ways for a while.
    net.run(10_000, 50);
    assert!(
        !net.region("a")
            .events
            .iter()
            .any(|e| matches!(e, Event::PeerSuspect { .. })),
        "no suspicion while heartbeats flow"
    );
    net.cut.insert((rid("b"), rid("a")));
    net.run(30_000, 100);
    let suspected = net
        .region("a")
        .events
        .iter()
        .any(|e| matches!(e, Event::PeerSuspect { peer, silent_ms } if *peer == rid("b") && *silent_ms >= 1_000));
    assert!(suspected);
    net.heal();
    net.run(3_000, 50);
    assert!(net
        .region("a")
        .events
        .iter()
        .any(|e| matches!(e, Event::PeerTrusted { peer } if *peer == rid("b"))));
}

#[test]
fn a_failover_lookup_brings_the_prior_regions_facts_before_deciding() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    // a's pushes to b are lost: b knows nothing of the key a completed.
    net.cut.insert((rid("a"), rid("b")));
    let outcome = pair(&mut net, "a", "order-1", "charged");
    net.run(20, 1);
    assert_eq!(net.marks("b").get(&rid("a")).copied().unwrap_or(0), 0);
    net.heal();
    // The client failed over from a to b: b asks a first.
    let now = net.now;
    let b = net.region("b");
    let request = b
        .replica
        .lookup(now, rid("a"), RecordKey::new("payments", "acct", "order-1"))
        .expect("the link is up");
    let unknown = b
        .replica
        .lookup(now, rid("a"), RecordKey::new("payments", "acct", "never"))
        .unwrap();
    net.pump();
    let events = &net.region("b").events;
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::LookupDone { request: r, found: true, .. } if *r == request)));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::LookupDone { request: r, found: false, .. } if *r == unknown)));
    match claim(&mut net, "b", "order-1") {
        Decision::Replay { outcome: o, .. } => assert_eq!(o, outcome),
        other => panic!("b should replay a's outcome, got {other:?}"),
    }
}

#[test]
fn a_lookup_without_an_answer_times_out() {
    let mut net = Net::new(&["a", "b"], |c| c.lookup_timeout_ms = 300);
    net.connect_all();
    net.cut.insert((rid("a"), rid("b")));
    let now = net.now;
    let b = net.region("b");
    let request = b
        .replica
        .lookup(now, rid("a"), RecordKey::new("payments", "acct", "k"))
        .unwrap();
    net.run(200, 10);
    assert!(!net
        .region("b")
        .events
        .iter()
        .any(|e| matches!(e, Event::LookupTimedOut { .. })));
    net.run(200, 10);
    assert!(net
        .region("b")
        .events
        .iter()
        .any(|e| matches!(e, Event::LookupTimedOut { request: r, .. } if *r == request)));
    // A region whose link is down cannot be asked.
    let now = net.now;
    net.region("b").replica.disconnected(now, rid("a"));
    assert_eq!(
        net.region("b")
            .replica
            .lookup(now, rid("a"), RecordKey::new("payments", "acct", "k")),
        None
    );
}

#[test]
fn a_lookup_is_answered_only_with_durable_facts() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let now = net.now;
    let a = net.region("a");
    // A claim appended but not yet flushed.
    let p = a.store.claim(now, &request("k", "POST /charge")).unwrap();
    assert!(!p.is_durable(&a.store));
    let lookup = Message::Lookup(Lookup {
        request: 5,
        key: RecordKey::new("payments", "acct", "k"),
    });
    a.replica.receive(&a.store, now, rid("b"), lookup);
    assert!(
        a.replica.poll_transmit().is_none(),
        "not before it is durable"
    );
    a.store.flush().unwrap();
    a.replica.handle_timeout(&a.store, now + 1);
    let mut replies = Vec::new();
    while let Some((to, m)) = a.replica.poll_transmit() {
        if let Message::LookupReply(r) = m {
            replies.push((to, r));
        }
    }
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, rid("b"));
    assert!(replies[0]
        .1
        .record
        .as_ref()
        .is_some_and(|r| r.claim_count() == 1));
}

/// Every item a region shows now: (kind, actionable).
fn shown_items(net: &mut Net, name: &str) -> Vec<(ItemKind, bool)> {
    let now = net.now;
    net.region(name)
        .store
        .all_items(now)
        .unwrap()
        .into_iter()
        .map(|(_, item)| (item.kind, item.actionable))
        .collect()
}

#[test]
fn an_item_becomes_actionable_only_once_every_region_has_seen_the_key() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    net.cut_both("a", "b");
    net.cut_both("a", "c");
    pair(&mut net, "a", "order-1", "charge ch_A");
    net.now += 3;
    pair(&mut net, "b", "order-1", "charge ch_B");
    // b and c exchange digests, but a, cut off, may still hold an earlier claim (it does).
    net.run(8_000, 50);
    assert_eq!(
        shown_items(&mut net, "b"),
        Vec::new(),
        "b's claim is the only one it knows"
    );
    // c heals with a only one way round: a's claim arrives through c, yet a has not said
    // what it holds to b, so b's item (its own execution) waits.
    net.cut.remove(&(rid("a"), rid("c")));
    net.cut.remove(&(rid("c"), rid("a")));
    net.connect_all();
    net.run(8_000, 50);
    assert_eq!(
        shown_items(&mut net, "b"),
        vec![(ItemKind::Duplicate, false)]
    );
    net.heal();
    net.connect_all();
    net.run(12_000, 50);
    for name in ["a", "b", "c"] {
        assert_eq!(
            shown_items(&mut net, name),
            vec![(ItemKind::Duplicate, true)],
            "{name}"
        );
    }
}

#[test]
fn a_region_behind_the_retained_log_catches_up_from_a_snapshot() {
    let mut net = behind_net(|_| {}, 40);
    net.heal();
    net.connect_all();
    net.run(10_000, 50);
    let done = net
        .region("c")
        .events
        .iter()
        .filter(|e| matches!(e, Event::SnapshotDone { .. }))
        .count();
    assert!(done >= 1, "c caught up from a snapshot");
    assert!(
        net.region("c")
            .events
            .iter()
            .any(|e| matches!(e, Event::ResetRequired { .. })),
        "because its peers no longer retained what it lacked"
    );
    let held = |net: &mut Net, name: &str| {
        let mut m = net.marks(name);
        m.retain(|_, s| *s > 0);
        m
    };
    assert_eq!(held(&mut net, "c"), held(&mut net, "a"));
    assert_eq!(held(&mut net, "c"), held(&mut net, "b"));
    for i in 0..40 {
        let k = RecordKey::new("payments", "acct", format!("order-{i}"));
        let now = net.now;
        let read = |net: &mut Net, name: &str| {
            let s = &net.region(name).store;
            s.wait(s.read(now, &k).unwrap()).unwrap().unwrap().record
        };
        assert_eq!(read(&mut net, "c"), read(&mut net, "a"), "order-{i}");
    }
    // c now serves what it adopted as truncated: a fourth region would snapshot from it too.
    let now = net.now;
    let c = &net.region("c").store;
    assert!(matches!(
        c.log_from(now, rid("a"), 1, 10),
        Err(StoreError::LogTruncated { .. })
    ));
}

#[test]
fn a_lookup_on_miss_asks_every_peer_whose_link_is_up() {
    let mut net = Net::new(&["a", "b", "c"], |_| {});
    net.connect_all();
    // c's pushes to b are lost: b knows nothing of the key c completed.
    net.cut.insert((rid("c"), rid("b")));
    let outcome = pair(&mut net, "c", "order-7", "charged");
    net.run(20, 1);
    net.heal();
    let now = net.now;
    let key = RecordKey::new("payments", "acct", "order-7");
    let b = net.region("b");
    let asked = b.replica.lookup_everywhere(now, &key);
    assert_eq!(asked.len(), 2, "a and c");
    net.pump();
    let done = net
        .region("b")
        .events
        .iter()
        .filter(|e| matches!(e, Event::LookupDone { request, .. } if asked.contains(request)))
        .count();
    assert_eq!(done, 2);
    match claim(&mut net, "b", "order-7") {
        Decision::Replay { outcome: o, .. } => assert_eq!(o, outcome),
        other => panic!("b should replay c's outcome, got {other:?}"),
    }
    // With every link down there is no one to ask.
    let ids = net.ids();
    let b = net.region("b");
    for p in ids {
        b.replica.disconnected(now, p);
    }
    assert!(b.replica.lookup_everywhere(now, &key).is_empty());
}

impl Net {
    /// Like `pump`, but every snapshot chunk is delivered twice (a resend after a timeout
    /// whose first answer was only late).
    fn pump_dup_chunks(&mut self) {
        loop {
            let ids = self.ids();
            for id in &ids {
                let r = self.regions.get_mut(id).unwrap();
                while let Some((to, msg)) = r.replica.poll_transmit() {
                    if !self.cut.contains(&(*id, to)) {
                        let dup = matches!(msg, Message::SnapshotChunk(_));
                        let bytes = frame::encode(&msg).unwrap();
                        if dup {
                            self.wire.push_back((*id, to, bytes.clone()));
                        }
                        self.wire.push_back((*id, to, bytes));
                    }
                }
                while let Some(e) = r.replica.poll_event() {
                    r.events.push(e);
                }
            }
            let Some((from, to, bytes)) = self.wire.pop_front() else {
                return;
            };
            let mut d = FrameDecoder::new();
            d.push(&bytes).unwrap();
            let msg = d.next().unwrap().unwrap();
            let now = self.now;
            let r = self.regions.get_mut(&to).unwrap();
            r.replica.receive(&r.store, now, from, msg);
            r.store.flush().unwrap();
        }
    }
}

/// Three regions with a 1 s retention; `c` is cut off while `a` and `b` complete `keys` keys,
/// then long enough for their logs of them to be past retention.
fn behind_net(tweak: impl Fn(&mut ReplicaConfig), keys: usize) -> Net {
    let mut net = Net::with_stores(&["a", "b", "c"], tweak, |s| {
        s.log_retention_ms = 1_000;
        s.log_bucket_seqs = 4;
    });
    net.connect_all();
    net.cut_both("c", "a");
    net.cut_both("c", "b");
    for i in 0..keys {
        pair(
            &mut net,
            ["a", "b"][i % 2],
            &format!("order-{i}"),
            "charged",
        );
        net.run(100, 50);
    }
    net.run(3_000, 50);
    net
}

#[test]
fn a_snapshot_chunk_delivered_twice_is_merely_stale() {
    let mut net = behind_net(|c| c.range_bytes = 1, 20);
    net.heal();
    net.connect_all();
    let end = net.now + 10_000;
    while net.now < end {
        net.now += 50;
        let now = net.now;
        for r in net.regions.values_mut() {
            r.store.flush().unwrap();
            r.replica.handle_timeout(&r.store, now);
        }
        net.pump_dup_chunks();
    }
    let c = net.region("c");
    let v: Vec<_> = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::ProtocolViolation { .. }))
        .collect();
    let done = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::SnapshotDone { .. }))
        .count();
    assert!(
        v.is_empty(),
        "a duplicated chunk is stale, not a violation: {:?}",
        v.first()
    );
    assert!(done >= 1, "and the catch-up completes");
}

#[test]
fn losing_the_snapshot_peer_lets_another_peer_serve_the_catch_up() {
    let mut net = behind_net(
        |c| {
            c.range_bytes = 1;
            c.serve_bytes_per_s = 1;
        },
        20,
    );
    net.heal();
    net.connect_all();
    // Let ResetRequired come from both, and the stream start.
    let mut streaming = None;
    for _ in 0..200 {
        net.run(50, 50);
        if let Some(s) = &net.region("c").replica.snapshot {
            let p = s.peer;
            let other = if p == rid("a") { rid("b") } else { rid("a") };
            if !net.region("c").replica.peers[&other].truncated.is_empty() {
                streaming = Some((p, other));
                break;
            }
        }
    }
    let (p, _other) = streaming.expect("a stream, and the other peer truncated");
    let now = net.now;
    net.region("c").replica.disconnected(now, p);
    net.cut.insert((rid("c"), p));
    net.cut.insert((p, rid("c")));
    net.run(60_000, 50);
    let c = net.region("c");
    let done = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::SnapshotDone { .. }))
        .count();
    assert!(done > 0, "c catches up from the peer it still reaches");
}

#[test]
fn a_snapshot_with_a_namespace_unknown_here_still_completes() {
    let mut net = Net::with_stores(
        &["a", "b", "c"],
        |_| {},
        |s| {
            s.log_retention_ms = 1_000;
            s.log_bucket_seqs = 4;
            if s.region != rid("c") {
                let mut ns = s.namespaces[0].clone();
                ns.name = "refunds".into();
                s.namespaces.push(ns);
            }
        },
    );
    net.connect_all();
    net.cut_both("c", "a");
    net.cut_both("c", "b");
    for i in 0..20 {
        pair(
            &mut net,
            ["a", "b"][i % 2],
            &format!("order-{i}"),
            "charged",
        );
        net.run(100, 50);
    }
    // One key in a namespace c does not know (a config rollout in progress).
    {
        let now = net.now;
        let r = net.region("a");
        let mut req = request("r-1", "POST /refund");
        req.key = RecordKey::new("refunds", "acct", "r-1");
        let d = r.store.wait(r.store.claim(now, &req).unwrap()).unwrap();
        assert!(matches!(d, Decision::Execute { .. }));
    }
    net.run(3_000, 50);
    net.heal();
    net.connect_all();
    net.run(30_000, 50);
    let c = net.region("c");
    let done = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::SnapshotDone { .. }))
        .count();
    let unavailable = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::MergeUnavailable { .. }))
        .count();
    assert_eq!(unavailable, 0, "no record was refused for its namespace");
    assert!(done > 0, "c catches up");
}

#[test]
fn retiring_a_lost_region_spreads_releases_stability_and_stops_the_region_if_it_returns() {
    let mut net = Net::new(&["a", "b", "l"], |_| {});
    net.connect_all();
    pair(&mut net, "l", "order-1", "charge ch_L");
    net.run(200, 50);
    assert_eq!(
        net.marks("a")[&rid("l")],
        2,
        "l's claim and completion arrived"
    );
    // l is lost for good. a and b each charge order-2 across a partition between them.
    for peer in ["a", "b"] {
        net.cut_both("l", peer);
    }
    net.cut_both("a", "b");
    pair(&mut net, "a", "order-2", "charge ch_A");
    net.now += 3;
    pair(&mut net, "b", "order-2", "charge ch_B");
    net.cut.remove(&(rid("a"), rid("b")));
    net.cut.remove(&(rid("b"), rid("a")));
    net.run(12_000, 50);
    for name in ["a", "b"] {
        assert_eq!(
            shown_items(&mut net, name),
            vec![(ItemKind::Duplicate, false)],
            "{name} waits for l, which may hold an earlier claim"
        );
    }
    // The operator retires l at a, at everything a holds of its log.
    let held = net.marks("a")[&rid("l")];
    let r = net.region("a");
    r.store
        .wait(r.store.retire(rid("l"), held).unwrap())
        .unwrap();
    net.run(12_000, 50);
    assert!(
        net.region("b").events.iter().any(|e| matches!(
            e,
            Event::Retired { peer, region, last_seq: 2 } if *peer == rid("a") && *region == rid("l")
        )),
        "b heard of it from a"
    );
    for name in ["a", "b"] {
        assert_eq!(
            net.region(name).store.retirements().0.get(&rid("l")),
            Some(&2)
        );
        assert_eq!(
            shown_items(&mut net, name),
            vec![(ItemKind::Duplicate, true)],
            "{name}: l no longer holds stability back"
        );
    }
    // l comes back from the dead: it hears it was retired and grants nothing new.
    net.heal();
    net.connect_all();
    net.run(6_000, 50);
    assert!(net.region("l").store.is_retired_here());
    assert!(matches!(
        claim(&mut net, "l", "order-3"),
        Decision::Unavailable {
            reason: crate::store::Unavailable::Retired,
            ..
        }
    ));
}

#[test]
fn retirements_go_out_before_each_digest() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let r = net.region("a");
    r.store
        .wait(r.store.retire_from_peer(rid("z"), 0).unwrap())
        .unwrap();
    let mut kinds = Vec::new();
    for _ in 0..100 {
        net.now += 100;
        let now = net.now;
        let r = net.region("a");
        r.replica.handle_timeout(&r.store, now);
        while let Some((to, msg)) = r.replica.poll_transmit() {
            assert_eq!(to, rid("b"));
            kinds.push(msg.kind());
        }
        if kinds.contains(&"digest") {
            break;
        }
    }
    let at = kinds
        .iter()
        .position(|k| *k == "digest")
        .expect("a digest round");
    assert!(at > 0 && kinds[at - 1] == "retired", "{kinds:?}");
}

#[test]
fn a_retirement_of_a_region_outside_the_cluster_is_refused() {
    let mut net = Net::new(&["a", "b"], |_| {});
    net.connect_all();
    let now = net.now;
    let r = net.region("b");
    r.replica.receive(
        &r.store,
        now,
        rid("a"),
        Message::Retired(wire::Retired {
            region: rid("nobody"),
            last_seq: crate::store::SEQ_MAX,
        }),
    );
    net.pump();
    let b = net.region("b");
    assert!(b.store.retirements().0.is_empty());
    assert!(b
        .events
        .iter()
        .any(|e| matches!(e, Event::ProtocolViolation { what, .. } if what.contains("nobody"))));
}
