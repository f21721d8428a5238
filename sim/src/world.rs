//! The simulated world: regions running the real `Store` and `Replica`, a network, clients and
//! a virtual clock, driven by one event queue.
//!
//! Single-threaded; events at the same time run in the order they were scheduled (a sequence
//! number breaks ties). Every random choice comes from a `ChaCha8Rng` seeded with the run's
//! seed, one stream per subsystem (workload, network, clocks, faults), so a change in how often
//! one subsystem draws does not shift the others.

use std::collections::{BTreeMap, BTreeSet};

use idem::clock::{RegionId, Stamp};
use idem::record::{
    AttemptToken, ClaimStatus, Fingerprint, ItemKind, Outcome, RecordKey, Retirements, Terminal,
};
use idem::replica::{Event, Replica, ReplicaConfig};
use idem::store::storage::MemStorage;
use idem::store::{
    ClaimRequest, Collected, Completion, Decision, Pending, Store, StoreConfig, StoreError,
    Unavailable,
};
use idem::wire::frame::{self, FrameDecoder};
use idem::wire::ClusterId;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::oracle::{Fate, Grant, Oracle, Violation};
use crate::profile::Faults;
use crate::{Counts, Options, Report};

/// Simulated time starts here (Unix ms, 2027-01-15): well after 2024, where hlc-gen's epoch is.
pub const T0: u64 = 1_800_000_000_000;
const NAMESPACE: &str = "payments";
/// How often each region's store flushes and its replica is driven, ms.
const TICK_MS: u64 = 5;
/// Gaps per origin compared when checking that regions converged.
const HOLDING_GAPS: usize = 16;
/// How often each region runs garbage collection, ms.
const GC_EVERY_MS: u64 = 250;
/// The replica's timers run this long after each flush.
const REPLICA_OFFSET_MS: u64 = 2;
/// Clients move to a fresh key space this often, ms.
const KEY_EPOCH_MS: u64 = 3_000;
/// How long the liveness phase may take to converge, ms.
const LIVENESS_BOUND_MS: u64 = 60_000;
/// How often each region's actionable items are sampled (what an operator would be shown).
const SAMPLE_MS: u64 = 250;
/// After convergence, how long items with a completed winner may take to become actionable
/// everywhere (L3), ms.
const ACTIONABLE_BOUND_MS: u64 = 30_000;

/// Independent random streams.
struct Rngs {
    workload: ChaCha8Rng,
    network: ChaCha8Rng,
    faults: ChaCha8Rng,
}

fn stream(seed: u64, n: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(n);
    r
}

/// `lo..=hi`.
fn between(r: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        return lo;
    }
    lo + r.next_u64() % (hi - lo + 1)
}

fn chance(r: &mut ChaCha8Rng, ppm: u32) -> bool {
    (r.next_u64() % 1_000_000) < u64::from(ppm)
}

struct Region {
    id: RegionId,
    /// The region's disk: it outlives the process (crashes drop its unsynced writes).
    disk: MemStorage,
    store: Store<MemStorage>,
    replica: Replica,
    /// This region's clock minus true time at the start, ms.
    skew_ms: i64,
    /// Its clock's rate error, parts per million.
    drift_ppm: i64,
    /// The sum of the steps its clock took, ms.
    step_ms: i64,
    /// While paused (true time, ms), the process does nothing; its events wait.
    paused_until: u64,
    /// Bumped by each crash.
    incarnation: u64,
    replica_cfg: ReplicaConfig,
}

impl Region {
    /// This region's clock at true time `now`: its offset, its steps, and its rate error since
    /// the start.
    fn clock(&self, now: u64) -> u64 {
        let drift = (now.saturating_sub(T0) as i64).saturating_mul(self.drift_ppm) / 1_000_000;
        now.saturating_add_signed(self.skew_ms + self.step_ms + drift)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// Claim (again).
    Claim,
    /// Complete the won claim.
    Complete,
    /// Release the won claim (the operation failed before any side effect).
    Release,
}

/// A logical request a client is working on.
#[derive(Debug, Clone)]
struct Work {
    key: u64,
    fingerprint: Fingerprint,
    attempt: AttemptToken,
    attempts: u32,
    step: Step,
    claim: Option<Stamp>,
    /// The region serving this request: the client's own, until it answers that it is fenced
    /// (then the client fails over to the next region, as the design's failover policy says).
    region: usize,
    /// After a failover: the region it came from, which the new region asks about the key
    /// (a failover lookup) before the claim is sent.
    prior: Option<usize>,
    /// The lookups in flight (failover, or on miss), by request id at the serving region.
    lookups: Vec<u64>,
    /// Whether the serving region already checked the key for a lookup on miss.
    miss_checked: bool,
}

/// An answer the store gave but has not made durable yet: the client gets it once it is.
enum Awaiting {
    /// With the retirements the region had appended when it decided.
    Claim(Pending<Decision>, Retirements),
    Complete(Pending<Completion>, Outcome),
    Release(Pending<Completion>),
}

struct Client {
    region: usize,
    work: Option<Work>,
    /// The answer in flight, and the incarnation of the region's process that gave it (a
    /// crash loses it: the client retries).
    awaiting: Option<(u64, Awaiting)>,
    done: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Group commit: the region's store syncs what was appended, and the answers that became
    /// durable go out.
    Flush(usize),
    /// The region's replica timers (pushes, digests, pings, stability), between flushes: what
    /// was appended since the last flush is not durable yet.
    Tick(usize),
    Client(usize),
    Deliver {
        from: usize,
        to: usize,
        /// The connection it was sent on: a message outlives no connection.
        conn: u64,
        bytes: Vec<u8>,
    },
    /// Try to (re)connect two regions.
    Connect(usize, usize),
    /// Region `at` notices that `peer`'s process is gone (its connection timed out).
    PeerLost {
        at: usize,
        peer: usize,
    },
    PartitionStart,
    /// A region's clock jumps.
    ClockStep,
    /// A region's process stops for a while.
    Pause,
    PartitionEnd(Vec<(usize, usize)>),
    Crash,
    /// A region is lost for good, with its disk.
    Lose,
    /// The operator retires the lost region at the survivor holding most of its log.
    Retire,
    Liveness,
}

/// The operator's retirement of a region lost for good.
struct Retirement {
    /// The survivor it was written at.
    at: usize,
    /// Its last number that counts.
    last_seq: u64,
    /// Until the survivor made it durable.
    pending: Option<Pending<bool>>,
}

/// One run.
pub struct World {
    opts: Options,
    faults: Faults,
    rngs: Rngs,
    now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    regions: Vec<Region>,
    clients: Vec<Client>,
    /// Base one-way latency per directed link, ms.
    latency: BTreeMap<(usize, usize), u64>,
    /// Directed links cut (with a count: partitions may overlap).
    cut: BTreeMap<(usize, usize), u32>,
    /// Live connections, by region pair (lower index first), with their id.
    conns: BTreeMap<(usize, usize), u64>,
    /// Connections whose end at a crashed region is gone, with that region and the other end's
    /// incarnation: what it sent before the crash is still delivered, to that incarnation.
    draining: BTreeMap<u64, (usize, u64)>,
    next_conn: u64,
    /// Per directed link, the latest delivery time scheduled: a connection delivers in order.
    last_delivery: BTreeMap<(usize, usize), u64>,
    oracle: Oracle,
    counts: Counts,
    trace: u64,
    liveness: bool,
    log: Vec<String>,
    /// Print every event to stderr (`IDEM_SIM_TRACE=1`), to follow a failing seed.
    trace_all: bool,
    /// Liveness failures found (see [`Report::liveness`]).
    stalls: Vec<Violation>,
    /// The region lost for good, if one was.
    lost: Option<usize>,
    /// The region an operator took for lost while it was only cut off (it keeps serving its
    /// clients, and rejoins later), if one was.
    zombie: Option<usize>,
    /// Its retirement, once written.
    retirement: Option<Retirement>,
    /// Claims of the region lost for good that a survivor held durably when it was lost: none
    /// may be lost with it.
    held_at_loss: BTreeSet<Stamp>,
}

/// A region pair, lower index first.
fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn region_name(i: usize) -> RegionId {
    RegionId::new(&format!("r{i}")).expect("region name")
}

/// A region's store settings: one namespace, whose lease the profile draws.
fn store_config(id: RegionId, faults: &Faults) -> StoreConfig {
    let mut cfg = StoreConfig::new(id, &[NAMESPACE]);
    for ns in &mut cfg.namespaces {
        ns.lease_ms = faults.lease_ms;
    }
    cfg.log_retention_ms = faults.log_retention_ms;
    for ns in &mut cfg.namespaces {
        ns.lookup_on_miss = faults.lookup_on_miss;
    }
    // Fine-grained retention, so that a short retention truncates within a run.
    cfg.log_bucket_seqs = 16;
    // Small segments, so the log rolls and garbage collection deletes segments within a run
    // (when the retention is short).
    cfg.log.segment_bytes = 32 << 10;
    cfg.log.max_payload_bytes = 16 << 10;
    cfg.log.reserve_bytes = 4 << 10;
    for ns in &mut cfg.namespaces {
        ns.outcome_bytes_max = 1 << 10;
    }
    cfg
}

fn key_of(k: u64) -> RecordKey {
    RecordKey::new(NAMESPACE, "acct", format!("k{k}"))
}

impl World {
    /// Builds the world of `seed`.
    pub fn new(seed: u64, opts: &Options) -> Self {
        let mut rngs = Rngs {
            workload: stream(seed, 1),
            network: stream(seed, 2),
            faults: stream(seed, 4),
        };
        let mut clocks = stream(seed, 3);
        let faults = Faults::draw(opts.profile, |lo, hi| between(&mut rngs.faults, lo, hi));
        let ids: Vec<RegionId> = (0..opts.regions).map(region_name).collect();
        let cluster = ClusterId::new("sim").expect("cluster id");
        let regions: Vec<Region> = ids
            .iter()
            .map(|id| {
                let skew =
                    between(&mut clocks, 0, 2 * faults.skew_ms) as i64 - faults.skew_ms as i64;
                let drift_ppm =
                    between(&mut clocks, 0, 2 * faults.drift_ppm) as i64 - faults.drift_ppm as i64;
                let now = T0.saturating_add_signed(skew);
                let disk = MemStorage::new();
                let store = Store::open(disk.clone(), store_config(*id, &faults), now)
                    .expect("a fresh store opens");
                let mut cfg = ReplicaConfig::new(cluster.clone());
                cfg.range_timeout_ms = 2_000;
                let replica = Replica::new(*id, &ids, cfg.clone(), clocks.next_u64(), 0);
                Region {
                    id: *id,
                    disk,
                    store,
                    replica,
                    skew_ms: skew,
                    drift_ppm,
                    step_ms: 0,
                    paused_until: 0,
                    incarnation: 0,
                    replica_cfg: cfg,
                }
            })
            .collect();
        let mut latency = BTreeMap::new();
        for a in 0..opts.regions {
            for b in 0..opts.regions {
                if a != b {
                    let l = between(&mut rngs.network, faults.latency_ms.0, faults.latency_ms.1);
                    latency.insert((a, b), l);
                }
            }
        }
        let clients = (0..opts.regions * opts.clients_per_region)
            .map(|i| Client {
                region: i % opts.regions,
                work: None,
                awaiting: None,
                done: 0,
            })
            .collect();
        World {
            opts: opts.clone(),
            faults,
            rngs,
            now: T0,
            seq: 0,
            queue: BTreeMap::new(),
            regions,
            clients,
            latency,
            cut: BTreeMap::new(),
            conns: BTreeMap::new(),
            draining: BTreeMap::new(),
            next_conn: 1,
            last_delivery: BTreeMap::new(),
            oracle: Oracle::default(),
            counts: Counts::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            liveness: false,
            log: Vec::new(),
            trace_all: std::env::var_os("IDEM_SIM_TRACE").is_some_and(|v| v == "1"),
            stalls: Vec::new(),
            lost: None,
            zombie: None,
            retirement: None,
            held_at_loss: BTreeSet::new(),
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn note(&mut self, what: String) {
        for b in what.as_bytes().iter().chain(&self.now.to_le_bytes()) {
            self.trace = (self.trace ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        if self.trace_all {
            eprintln!("{} {what}", self.now - T0);
        }
        if self.log.len() == 64 {
            self.log.remove(0);
        }
        self.log.push(format!("{} {what}", self.now - T0));
    }

    /// Region `i`'s clock.
    fn clock(&self, i: usize) -> u64 {
        self.regions[i].clock(self.now)
    }

    /// The region an event needs running (its process), if any.
    fn runs_on(&self, ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Flush(i) | Ev::Tick(i) => Some(*i),
            Ev::Deliver { to, .. } => Some(*to),
            Ev::PeerLost { at, .. } => Some(*at),
            Ev::Client(c) => Some(
                self.clients[*c]
                    .work
                    .as_ref()
                    .map_or(self.clients[*c].region, |w| w.region),
            ),
            Ev::Connect(a, b) => {
                let (a, b) = (*a, *b);
                Some(
                    if self.regions[a].paused_until > self.regions[b].paused_until {
                        a
                    } else {
                        b
                    },
                )
            }
            _ => None,
        }
    }

    /// Runs the seed to the end and checks it.
    pub fn run(mut self, seed: u64) -> Report {
        for i in 0..self.regions.len() {
            for j in i + 1..self.regions.len() {
                self.at(T0, Ev::Connect(i, j));
            }
            self.at(T0 + TICK_MS, Ev::Flush(i));
            self.at(T0 + TICK_MS + REPLICA_OFFSET_MS, Ev::Tick(i));
        }
        for c in 0..self.clients.len() {
            let t = T0 + between(&mut self.rngs.workload, 0, 50);
            self.at(t, Ev::Client(c));
        }
        if self.faults.partition_every_ms > 0 {
            let t = T0 + between(&mut self.rngs.faults, 0, self.faults.partition_every_ms);
            self.at(t, Ev::PartitionStart);
        }
        if self.faults.crash_every_ms > 0 {
            let t = T0 + between(&mut self.rngs.faults, 0, self.faults.crash_every_ms);
            self.at(t, Ev::Crash);
        }
        if self.faults.step_every_ms > 0 {
            let t = T0 + between(&mut self.rngs.faults, 0, self.faults.step_every_ms);
            self.at(t, Ev::ClockStep);
        }
        if self.faults.pause_every_ms > 0 {
            let t = T0 + between(&mut self.rngs.faults, 0, self.faults.pause_every_ms);
            self.at(t, Ev::Pause);
        }
        if self.faults.lose_region && self.opts.regions >= 3 {
            let d = self.opts.duration_ms;
            let t = T0 + between(&mut self.rngs.faults, d / 4, d / 2);
            self.at(t, Ev::Lose);
        }
        let end_safety = T0 + self.opts.duration_ms;
        self.at(end_safety, Ev::Liveness);
        let deadline = end_safety + LIVENESS_BOUND_MS;
        let mut converged = false;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            self.now = t;
            if self.now > deadline {
                break;
            }
            self.handle(ev);
            if self.liveness && matches!(self.now % 100, 0..TICK_MS) && self.quiet() {
                converged = true;
                break;
            }
        }
        if converged {
            // Let every lease run out on every clock before the checks: a losing claim whose
            // client never reported back is an item only then.
            let offset = self
                .regions
                .iter()
                .map(|r| r.clock(self.now).abs_diff(self.now))
                .max()
                .unwrap_or(0);
            let settled = self.now + self.faults.lease_ms + 2 * offset + 1_000;
            self.run_until(settled);
            // L3: items whose winner completed become actionable everywhere within a bound.
            let bound = self.now + ACTIONABLE_BOUND_MS;
            while !self.not_actionable().is_empty() && self.now < bound {
                self.run_until(self.now + 500);
            }
            for (i, k, claim) in self.not_actionable() {
                self.stalls.push(Violation {
                    check: "L3",
                    key: Some(k),
                    detail: format!(
                        "region {i}: the item of {claim:?} is not actionable {} ms after \
                         convergence, though its winner completed",
                        ACTIONABLE_BOUND_MS
                    ),
                });
            }
        }
        self.finish(seed, converged)
    }

    /// Runs the events due up to `t` (inclusive).
    fn run_until(&mut self, t: u64) {
        while self
            .queue
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= t)
        {
            let ((at, _), ev) = self.queue.pop_first().expect("peeked");
            self.now = at;
            self.handle(ev);
        }
        self.now = self.now.max(t);
    }

    /// Items, by (region, key, claim), whose winner completed but that are not actionable, on
    /// keys whose every claim finished (a claim left in flight for good, by a client that died,
    /// may still be released or completed: it can hold an item back for as long).
    fn not_actionable(&self) -> Vec<(usize, u64, Stamp)> {
        let mut out = Vec::new();
        for i in self.survivors() {
            let r = &self.regions[i];
            let now = r.clock(self.now);
            for (key, it) in r.store.all_items(now).unwrap_or_default() {
                if it.winner_status == Some(ClaimStatus::Completed) && !it.actionable {
                    let k = key.key()[1..].parse().unwrap_or(u64::MAX);
                    let finished =
                        self.oracle.grants.get(&k).is_some_and(|gs| {
                            gs.iter().all(|g| g.completed.is_some() || g.released)
                        });
                    if finished {
                        out.push((i, k, it.claim));
                    }
                }
            }
        }
        out
    }

    /// A region picked by the faults stream.
    fn random_region(&mut self) -> usize {
        between(&mut self.rngs.faults, 0, self.opts.regions as u64 - 1) as usize
    }

    /// Schedules the next fault of a kind, `every` ms apart on average (jittered ±50%).
    fn again(&mut self, every: u64, ev: Ev) {
        let next = between(&mut self.rngs.faults, every / 2, every * 3 / 2);
        self.at(self.now + next.max(1), ev);
    }

    fn handle(&mut self, ev: Ev) {
        if let Some(i) = self.runs_on(&ev) {
            if self.lost == Some(i) {
                self.on_lost_region(ev);
                return;
            }
            let until = self.regions[i].paused_until;
            if until > self.now {
                // A paused process handles nothing; in order, once it runs again.
                self.at(until, ev);
                return;
            }
        }
        match ev {
            Ev::Flush(i) => {
                self.regions[i].store.flush().expect("in-memory flush");
                self.answer(i);
                self.check_retirement(i);
                if (self.now - T0) % GC_EVERY_MS < TICK_MS {
                    self.collect_garbage(i);
                }
                self.at(self.now + TICK_MS, Ev::Flush(i));
            }
            Ev::Tick(i) => {
                let now = self.clock(i);
                let r = &mut self.regions[i];
                r.replica.handle_timeout(&r.store, now);
                self.drain(i);
                if (self.now - T0) % SAMPLE_MS < TICK_MS {
                    self.sample_actionable(i);
                }
                self.at(self.now + TICK_MS, Ev::Tick(i));
            }
            Ev::Client(c) => self.client(c),
            Ev::Deliver {
                from,
                to,
                conn,
                bytes,
            } => {
                let live = self.conns.get(&pair(from, to)) == Some(&conn);
                // After a crash, what the dead process had sent still arrives; nothing reaches
                // the dead process.
                // (Only while no new connection has replaced the old one.)
                let sent_before_crash = self.draining.get(&conn)
                    == Some(&(from, self.regions[to].incarnation))
                    && !self.conns.contains_key(&pair(from, to));
                if !live && !sent_before_crash {
                    // Its connection broke while it was on the way.
                    self.counts.messages_lost += 1;
                    return;
                }
                let mut d = FrameDecoder::new();
                let msg = d.push(&bytes).and_then(|_| d.next());
                let Ok(Some(msg)) = msg else {
                    self.oracle.violations.push(Violation {
                        check: "W1",
                        key: None,
                        detail: format!("a frame the replica sent did not decode: {msg:?}"),
                    });
                    return;
                };
                self.counts.messages_delivered += 1;
                self.note(format!("deliver {from}->{to} {}", msg.kind()));
                let now = self.clock(to);
                let from_id = self.regions[from].id;
                let r = &mut self.regions[to];
                r.replica.receive(&r.store, now, from_id, msg);
                self.drain(to);
            }
            Ev::Connect(a, b) => self.connect(a, b),
            Ev::PeerLost { at, peer } => {
                // Unless a new connection has come up since.
                if !self.conns.contains_key(&pair(at, peer)) {
                    let now = self.clock(at);
                    let id = self.regions[peer].id;
                    self.regions[at].replica.disconnected(now, id);
                    self.note(format!("r{at} lost r{peer}"));
                }
            }
            Ev::PartitionStart => self.partition(),
            Ev::ClockStep => {
                if !self.liveness {
                    let i = self.random_region();
                    let step = between(&mut self.rngs.faults, 1, 2 * self.faults.step_ms) as i64
                        - self.faults.step_ms as i64;
                    // Steps add up, but a clock stays within the largest step of true time (plus
                    // its offset and drift).
                    let limit = self.faults.step_ms as i64;
                    let r = &mut self.regions[i];
                    r.step_ms = (r.step_ms + step).clamp(-limit, limit);
                    self.counts.clock_steps += 1;
                    self.note(format!("clock of r{i} steps {step} ms"));
                    self.again(self.faults.step_every_ms, Ev::ClockStep);
                }
            }
            Ev::Pause => {
                if !self.liveness {
                    let i = self.random_region();
                    let (lo, hi) = self.faults.pause_ms;
                    let len = between(&mut self.rngs.faults, lo, hi);
                    let r = &mut self.regions[i];
                    r.paused_until = r.paused_until.max(self.now + len);
                    self.counts.pauses += 1;
                    self.note(format!("r{i} pauses for {len} ms"));
                    self.again(self.faults.pause_every_ms, Ev::Pause);
                }
            }
            Ev::Crash => {
                if !self.liveness {
                    let i = self.random_region();
                    if self.lost != Some(i) {
                        self.crash(i);
                    }
                    self.again(self.faults.crash_every_ms, Ev::Crash);
                }
            }
            Ev::Lose => {
                let i = self.random_region();
                if chance(&mut self.rngs.faults, 500_000) {
                    self.cut_off(i);
                } else {
                    self.lose_region(i);
                }
            }
            Ev::Retire => self.retire(),
            Ev::PartitionEnd(links) => {
                for l in links {
                    if let Some(n) = self.cut.get_mut(&l) {
                        *n -= 1;
                        if *n == 0 {
                            self.cut.remove(&l);
                        }
                    }
                }
                self.note("partition end".into());
            }
            Ev::Liveness => {
                self.liveness = true;
                self.cut.clear();
                // Clocks are put right (a last step each); no new pause starts (one under way
                // runs its course).
                for r in &mut self.regions {
                    r.step_ms = 0;
                }
                self.note("liveness phase: heal, no new requests".into());
            }
        }
    }

    fn is_cut(&self, from: usize, to: usize) -> bool {
        self.cut.contains_key(&(from, to))
    }

    /// Opens a connection between `a` and `b` unless a cut stands between them (then tries
    /// again in a second, like a transport redialling).
    fn connect(&mut self, a: usize, b: usize) {
        if self.conns.contains_key(&pair(a, b)) || self.lost == Some(a) || self.lost == Some(b) {
            return;
        }
        if self.is_cut(a, b) || self.is_cut(b, a) {
            self.at(self.now + 1_000, Ev::Connect(a, b));
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(pair(a, b), id);
        self.note(format!("connect {a}-{b}"));
        for (x, y) in [(a, b), (b, a)] {
            let now = self.clock(x);
            let peer = self.regions[y].id;
            self.regions[x].replica.connected(now, peer);
        }
        self.drain(a);
        self.drain(b);
    }

    /// Breaks the connection between `a` and `b` (what is on the way is lost); both ends are
    /// told, and redial after a while.
    fn break_link(&mut self, a: usize, b: usize) {
        if self.conns.remove(&pair(a, b)).is_none() {
            return;
        }
        self.counts.connection_breaks += 1;
        self.note(format!("break {a}-{b}"));
        for (x, y) in [(a, b), (b, a)] {
            let now = self.clock(x);
            let peer = self.regions[y].id;
            self.regions[x].replica.disconnected(now, peer);
        }
        let redial = between(&mut self.rngs.network, 200, 2_000);
        self.at(self.now + redial, Ev::Connect(a.min(b), a.max(b)));
    }
    /// Region `i`'s process died: its end of the link with `j` is gone at once, but what it
    /// had sent is already in the network and still arrives; `j` learns of the loss after
    /// that, and both redial later.
    fn lose_process(&mut self, i: usize, j: usize) {
        let Some(conn) = self.conns.remove(&pair(i, j)) else {
            return;
        };
        self.counts.connection_breaks += 1;
        self.draining.insert(conn, (i, self.regions[j].incarnation));
        let last = self.last_delivery.get(&(i, j)).copied().unwrap_or(0);
        self.at(last.max(self.now) + 1, Ev::PeerLost { at: j, peer: i });
        let redial = between(&mut self.rngs.network, 200, 2_000);
        self.at(self.now + redial, Ev::Connect(i.min(j), i.max(j)));
    }

    /// Sends what region `i`'s replica has to send, through the faulty network.
    fn drain(&mut self, i: usize) {
        while let Some(ev) = self.regions[i].replica.poll_event() {
            match ev {
                Event::ProtocolViolation { what, .. } => {
                    self.note(format!("r{i} protocol violation: {what}"));
                    self.oracle.violations.push(Violation {
                        check: "W2",
                        key: None,
                        detail: format!("region {i} saw a protocol violation: {what}"),
                    })
                }
                Event::InvalidMutation { error, .. } => self.oracle.violations.push(Violation {
                    check: "W3",
                    key: None,
                    detail: format!("region {i} refused a peer's mutation: {error}"),
                }),
                Event::DriftRejected { .. } => self.counts.drift_rejected += 1,
                Event::FenceChanged { fenced: true, .. } => self.counts.fences += 1,
                Event::SnapshotDone { records, .. } => {
                    self.counts.snapshot_catchups += 1;
                    self.note(format!(
                        "r{i} caught up from a snapshot of {records} records"
                    ));
                }
                Event::ResetRequired { peer, origin, .. } => {
                    self.note(format!("r{i}: {peer} no longer retains {origin}'s range"));
                }
                Event::PushDropped { count, .. } => self.counts.push_dropped += count,
                Event::LookupDone { request, .. } | Event::LookupTimedOut { request, .. } => {
                    self.lookup_answered(i, request)
                }
                Event::LookupRefused { error, .. } => self.oracle.violations.push(Violation {
                    check: "W3",
                    key: None,
                    detail: format!("region {i} refused a lookup answer: {error}"),
                }),
                _ => {}
            }
        }
        while let Some((to, msg)) = self.regions[i].replica.poll_transmit() {
            let Some(j) = self.regions.iter().position(|r| r.id == to) else {
                continue;
            };
            let bytes = match frame::encode(&msg) {
                Ok(b) => b,
                Err(e) => {
                    self.oracle.violations.push(Violation {
                        check: "W1",
                        key: None,
                        detail: format!("region {i} could not encode a {}: {e}", msg.kind()),
                    });
                    continue;
                }
            };
            let Some(&conn) = self.conns.get(&pair(i, j)) else {
                // No connection: the message has nowhere to go (the replica was told).
                self.counts.messages_lost += 1;
                continue;
            };
            if chance(&mut self.rngs.network, self.faults.loss_ppm) {
                // A transport delivers in order or not at all: a loss breaks the connection.
                self.counts.messages_lost += 1;
                self.break_link(i, j);
                continue;
            }
            let jitter = between(&mut self.rngs.network, 0, self.faults.jitter_ms);
            let t = (self.now + self.latency[&(i, j)] + jitter)
                .max(self.last_delivery.get(&(i, j)).copied().unwrap_or(0));
            self.last_delivery.insert((i, j), t);
            self.at(
                t,
                Ev::Deliver {
                    from: i,
                    to: j,
                    conn,
                    bytes,
                },
            );
        }
    }

    fn partition(&mut self) {
        if self.liveness {
            return;
        }
        let n = self.regions.len();
        let r = &mut self.rngs.faults;
        let mut links = Vec::new();
        match between(r, 0, 2) {
            // Isolate one region, both ways.
            0 => {
                let a = between(r, 0, n as u64 - 1) as usize;
                for b in (0..n).filter(|b| *b != a) {
                    links.push((a, b));
                    links.push((b, a));
                }
            }
            // Cut one pair, both ways (a partial partition when there are three or more).
            1 => {
                let a = between(r, 0, n as u64 - 1) as usize;
                let b = (a + 1 + between(r, 0, n as u64 - 2) as usize) % n;
                links.push((a, b));
                links.push((b, a));
            }
            // One way only.
            _ => {
                let a = between(r, 0, n as u64 - 1) as usize;
                let b = (a + 1 + between(r, 0, n as u64 - 2) as usize) % n;
                links.push((a, b));
            }
        }
        let len = between(r, self.faults.partition_ms.0, self.faults.partition_ms.1);
        let next = between(
            r,
            self.faults.partition_every_ms / 2,
            self.faults.partition_every_ms * 3 / 2,
        );
        for l in &links {
            *self.cut.entry(*l).or_default() += 1;
        }
        // A cut link kills its connection (a one-way cut too: nothing is acknowledged).
        for &(a, b) in &links {
            self.break_link(a, b);
        }
        self.counts.partitions += 1;
        self.note(format!("partition {links:?} for {len} ms"));
        self.at(self.now + len, Ev::PartitionEnd(links));
        self.at(self.now + next.max(1), Ev::PartitionStart);
    }

    /// Zipf-like key choice over the key space (s = 1): small keys are hot.
    fn pick_key(&mut self) -> u64 {
        let n = self.faults.keys;
        let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
        let mut u = (self.rngs.workload.next_u64() as f64 / u64::MAX as f64) * h;
        for k in 1..=n {
            u -= 1.0 / k as f64;
            if u <= 0.0 {
                return k;
            }
        }
        n
    }

    /// A client's turn: start a logical request if it has none, then issue its next
    /// operation. The answer is given once the store made it durable (at the region's next
    /// flush), unless the region crashes first.
    fn client(&mut self, c: usize) {
        if self.clients[c].awaiting.is_some() {
            return;
        }
        if self.clients[c].work.is_none() {
            if self.liveness {
                return;
            }
            // A fresh key space every few seconds, hot keys within it: requests in different
            // regions collide on the same keys, during partitions too.
            let key = (self.now - T0) / KEY_EPOCH_MS * 1_000 + self.pick_key();
            let reuse = chance(&mut self.rngs.workload, self.faults.reuse_ppm);
            let payload = if reuse {
                format!(
                    "POST /charge k{key} v{}",
                    self.rngs.workload.next_u64() % 1000
                )
            } else {
                format!("POST /charge k{key}")
            };
            self.clients[c].work = Some(Work {
                key,
                fingerprint: Fingerprint::of(payload.as_bytes()),
                attempt: AttemptToken(u128::from(self.rngs.workload.next_u64())),
                attempts: 0,
                step: Step::Claim,
                claim: None,
                region: self.clients[c].region,
                prior: None,
                lookups: Vec::new(),
                miss_checked: false,
            });
            self.counts.requests += 1;
        }
        let region = self.clients[c].work.as_ref().expect("work").region;
        let now = self.clock(region);
        if let Some(w) = self.clients[c].work.as_mut() {
            if w.step == Step::Claim && w.lookups.is_empty() {
                if let Some(prior) = w.prior {
                    // The claim carries a prior-region hint: ask that region first (bounded
                    // wait); the answer's facts are merged before the claim is decided.
                    let peer = self.regions[prior].id;
                    let key = key_of(w.key);
                    if let Some(id) = self.regions[region].replica.lookup(now, peer, key) {
                        w.lookups = vec![id];
                        self.counts.lookups += 1;
                        self.drain(region);
                        return;
                    }
                    // The link is down: decide without it (the namespace grants).
                    w.prior = None;
                } else if self.faults.lookup_on_miss && !w.miss_checked {
                    // A key never seen here: ask every reachable peer first (lookup on miss).
                    w.miss_checked = true;
                    let key = key_of(w.key);
                    let store = &self.regions[region].store;
                    let unseen = store.read(now, &key).is_ok_and(|p| p.peek().is_none());
                    if unseen {
                        let ids = self.regions[region].replica.lookup_everywhere(now, &key);
                        if !ids.is_empty() {
                            let w = self.clients[c].work.as_mut().expect("work");
                            w.lookups = ids;
                            self.counts.miss_lookups += 1;
                            self.drain(region);
                            return;
                        }
                    }
                }
            }
        }
        let w = self.clients[c].work.as_mut().expect("work");
        w.attempts += 1;
        let w = w.clone();
        let r = &self.regions[region];
        let issued = match w.step {
            Step::Claim => {
                let req = ClaimRequest {
                    key: key_of(w.key),
                    fingerprint: w.fingerprint,
                    attempt: w.attempt,
                };
                let retired = r.store.retirements();
                r.store
                    .claim(now, &req)
                    .map(|p| Awaiting::Claim(p, retired))
            }
            Step::Complete => {
                let claim = w.claim.expect("a won claim");
                let outcome = Outcome::new(201, format!("charge k{} by {claim:?}", w.key));
                r.store
                    .complete(now, &key_of(w.key), claim, outcome.clone())
                    .map(|p| Awaiting::Complete(p, outcome))
            }
            Step::Release => {
                let claim = w.claim.expect("a won claim");
                r.store
                    .release(now, &key_of(w.key), claim)
                    .map(Awaiting::Release)
            }
        };
        match issued {
            Ok(a) => {
                self.clients[c].awaiting = Some((r.incarnation, a));
            }
            Err(StoreError::LeaseRanOut { .. }) if w.step == Step::Release => {
                // Too late to release (its process was paused, say): the claim stays in
                // flight, and once it loses or is taken over it is a Verify item.
                self.counts.late_releases += 1;
                self.note(format!("c{c} r{region} too late to release k{}", w.key));
                self.finish_work(c);
            }
            Err(e) => {
                self.oracle.violations.push(Violation {
                    check: if w.step == Step::Claim { "E1" } else { "E2" },
                    key: Some(w.key),
                    detail: format!("region {region} refused the operation: {e}"),
                });
                self.finish_work(c);
            }
        }
    }

    /// A lookup at region `i` ended (answered or timed out): once all of its client's have,
    /// the client sends the claim.
    fn lookup_answered(&mut self, i: usize, request: u64) {
        let waiting = self.clients.iter().position(|cl| {
            cl.work
                .as_ref()
                .is_some_and(|w| w.region == i && w.lookups.contains(&request))
        });
        if let Some(c) = waiting {
            let w = self.clients[c].work.as_mut().expect("work");
            w.lookups.retain(|r| *r != request);
            if w.lookups.is_empty() {
                // Every answer is in (or timed out): the claim goes ahead.
                w.prior = None;
                self.at(self.now, Ev::Client(c));
            }
        }
    }

    /// Records the items region `i` would show an operator as actionable now, for the keys of
    /// the last few key epochs that more than one claim touched (S11 checks them at the end).
    fn sample_actionable(&mut self, i: usize) {
        let now = self.clock(i);
        let recent = (self.now - T0) / KEY_EPOCH_MS;
        let keys: Vec<u64> = self
            .oracle
            .grants
            .iter()
            .filter(|(k, gs)| gs.len() > 1 && **k / 1_000 + 4 >= recent)
            .map(|(k, _)| *k)
            .collect();
        let store = &self.regions[i].store;
        for k in keys {
            let Ok(p) = store.read(now, &key_of(k)) else {
                continue;
            };
            if !p.is_durable(store) {
                continue; // not shown before it is durable
            }
            let Some(view) = p.into_value_unchecked() else {
                continue;
            };
            for it in view.items.iter().filter(|it| it.actionable) {
                self.oracle.actionable_seen(k, i, self.now, it);
            }
        }
    }

    /// Gives region `i`'s clients the answers that became durable.
    /// Answers go out in the order the store wrote them (log sequence number), so that the
    /// oracle sees, say, a release before the grant it made possible.
    fn answer(&mut self, i: usize) {
        let mut ready: Vec<(u64, usize)> = Vec::new();
        for (c, cl) in self.clients.iter().enumerate() {
            if cl.work.as_ref().is_none_or(|w| w.region != i) {
                continue;
            }
            let store = &self.regions[i].store;
            let lsn = match &cl.awaiting {
                Some((_, Awaiting::Claim(p, _))) if p.is_durable(store) => p.lsn(),
                Some((_, Awaiting::Complete(p, _) | Awaiting::Release(p)))
                    if p.is_durable(store) =>
                {
                    p.lsn()
                }
                _ => continue,
            };
            ready.push((lsn, c));
        }
        ready.sort_unstable();
        for (_, c) in ready {
            let Some((inc, a)) = self.clients[c].awaiting.take() else {
                continue;
            };
            let store = &self.regions[i].store;
            match a {
                Awaiting::Claim(p, retired) => match p.try_into_value(store) {
                    Ok(d) => self.on_claim_answer(c, d, &retired),
                    Err(p) => self.clients[c].awaiting = Some((inc, Awaiting::Claim(p, retired))),
                },
                Awaiting::Complete(p, o) => match p.try_into_value(store) {
                    Ok(done) => self.on_completed(c, o, done.superseded),
                    Err(p) => self.clients[c].awaiting = Some((inc, Awaiting::Complete(p, o))),
                },
                Awaiting::Release(p) => match p.try_into_value(store) {
                    Ok(_) => self.on_released(c),
                    Err(p) => self.clients[c].awaiting = Some((inc, Awaiting::Release(p))),
                },
            }
        }
    }

    /// `retired`: the retirements the region had appended when it decided.
    fn on_claim_answer(&mut self, c: usize, d: Decision, retired: &Retirements) {
        let mut w = self.clients[c].work.clone().expect("work");
        let region = w.region;
        match d {
            Decision::Execute {
                claim,
                took_over,
                resumed,
                ..
            } => {
                self.counts.executes += 1;
                self.note(format!(
                    "c{c} r{region} execute k{} {claim:?} took over {took_over:?}",
                    w.key
                ));
                if resumed && self.oracle.knows(w.key, &claim) {
                    self.oracle.resumed(w.key, &claim);
                } else if !resumed {
                    if !took_over.is_empty() {
                        self.counts.takeovers += 1;
                    }
                    // S9: no stamp beyond the clock reservation the region's log holds.
                    let reserved = self.regions[region].store.clock().reserved_ms();
                    if claim.physical_ms() > reserved {
                        self.oracle.violations.push(Violation {
                            check: "S9",
                            key: Some(w.key),
                            detail: format!(
                                "region {region} granted {claim:?} beyond its reservation \
                                 ({reserved})"
                            ),
                        });
                    }
                    let g = Grant {
                        stamp: claim,
                        fingerprint: w.fingerprint,
                        region,
                        executed: true,
                        side_effect: false,
                        released: false,
                        completed: None,
                        completed_at_ms: None,
                        at_ms: self.now,
                        fate: Fate::Held,
                    };
                    self.oracle.granted(w.key, g, &took_over);
                } else {
                    self.oracle.violations.push(Violation {
                        check: "S4",
                        key: Some(w.key),
                        detail: format!("region {region} resumed {claim:?}, which it never made"),
                    });
                }
                w.claim = Some(claim);
                // What the execution does: usually runs briefly and completes; sometimes
                // outlives its lease (and completes late, perhaps after a takeover), fails
                // before any side effect (release), or its client dies after the side effect.
                let lease = self.faults.lease_ms;
                let roll = self.rngs.workload.next_u64() % 1_000_000;
                let (abandon, release, slow) = (
                    u64::from(self.faults.abandon_ppm),
                    u64::from(self.faults.release_ppm),
                    u64::from(self.faults.slow_ppm),
                );
                let exec = if roll < abandon {
                    self.counts.abandoned += 1;
                    self.oracle.side_effect(w.key, &claim);
                    self.note(format!("c{c} dies after running k{}", w.key));
                    self.clients[c].work = Some(w);
                    self.finish_work(c);
                    return;
                } else if roll < abandon + release {
                    w.step = Step::Release;
                    between(&mut self.rngs.workload, 1, 40)
                } else if roll < abandon + release + slow {
                    self.counts.slow += 1;
                    self.oracle.side_effect(w.key, &claim);
                    w.step = Step::Complete;
                    between(&mut self.rngs.workload, lease + 600, 3 * lease + 600)
                } else {
                    self.oracle.side_effect(w.key, &claim);
                    w.step = Step::Complete;
                    between(&mut self.rngs.workload, 1, 40)
                };
                self.clients[c].work = Some(w);
                self.at(self.now + exec, Ev::Client(c));
            }
            Decision::Replay { outcome, claim, .. } => {
                self.counts.replays += 1;
                self.note(format!("c{c} r{region} replay k{} {claim:?}", w.key));
                // Replaying a claim of a region it knew retired when it decided is never
                // excused if that claim turns out an orphan; one it had not heard of yet may be.
                let knew = retired.0.contains_key(&claim.region);
                self.oracle.replayed(w.key, region, claim, outcome, !knew);
                self.finish_work(c);
            }
            Decision::Mismatch { .. } => {
                self.counts.mismatches += 1;
                self.note(format!("c{c} r{region} mismatch k{}", w.key));
                self.oracle.mismatches.push((w.key, region, w.fingerprint));
                self.finish_work(c);
            }
            Decision::Unavailable {
                reason: Unavailable::Retired,
                ..
            } => {
                // The region heard that it was retired: its clients move on for good.
                self.counts.failovers += 1;
                let next = (region + 1) % self.opts.regions;
                if self.clients[c].region == region {
                    self.clients[c].region = next;
                }
                w.prior = Some(region);
                w.region = next;
                self.note(format!("c{c} r{region} retired: fails over to r{next}"));
                self.retry(c, w);
            }
            Decision::Unavailable {
                reason: Unavailable::Fenced,
                ..
            } => {
                // The region refused to grant (its clock is off the cluster's): fail over to
                // the next region with the same request.
                self.counts.failovers += 1;
                w.prior = Some(w.region);
                w.region = (w.region + 1) % self.opts.regions;
                self.note(format!(
                    "c{c} r{region} fenced: fails over to r{}",
                    w.region
                ));
                self.retry(c, w);
            }
            Decision::InFlight { .. } | Decision::Unavailable { .. } => {
                self.counts.retries += 1;
                self.retry(c, w);
            }
        }
    }

    fn on_completed(&mut self, c: usize, outcome: Outcome, superseded: bool) {
        let w = self.clients[c].work.clone().expect("work");
        let region = w.region;
        let claim = w.claim.expect("a won claim");
        self.note(format!(
            "c{c} r{region} complete k{} (superseded: {superseded})",
            w.key
        ));
        if superseded {
            self.counts.late_completions += 1;
        }
        self.oracle.completed(w.key, claim, outcome, self.now);
        self.finish_work(c);
    }

    fn on_released(&mut self, c: usize) {
        let w = self.clients[c].work.clone().expect("work");
        let claim = w.claim.expect("a won claim");
        self.note(format!("c{c} r{} release k{}", w.region, w.key));
        self.counts.releases += 1;
        self.oracle.released(w.key, claim);
        self.finish_work(c);
    }

    /// Region `i`'s process dies: its disk loses (or tears) what was not synced, the store is
    /// reopened from the disk (recovery) with a new replica, its connections break, and the
    /// answers it had not made durable are lost (their clients retry).
    fn crash(&mut self, i: usize) {
        let now = self.clock(i);
        let cfg = store_config(self.regions[i].id, &self.faults);
        // Often the crash strikes between a flush's write and its sync: unsynced writes reach
        // the disk, and the crash drops or tears them.
        if between(&mut self.rngs.faults, 0, 2) != 0 {
            self.regions[i].disk.fail_next_sync();
            let _ = self.regions[i].store.flush();
            self.regions[i].disk.set_fail_syncs(false);
        }
        let placeholder =
            Store::open(MemStorage::new(), cfg.clone(), now).expect("a fresh store opens");
        drop(std::mem::replace(&mut self.regions[i].store, placeholder));
        let seed = self.rngs.faults.next_u64();
        let report = self.regions[i].disk.crash(seed);
        self.counts.crashes += 1;
        self.counts.dropped_writes += report.dropped_writes;
        self.counts.torn_writes += report.torn_writes;
        match Store::open(self.regions[i].disk.clone(), cfg, now) {
            Ok(store) => self.regions[i].store = store,
            Err(e) => {
                self.oracle.violations.push(Violation {
                    check: "S5",
                    key: None,
                    detail: format!("region {i} did not recover after a crash: {e}"),
                });
                return;
            }
        }
        self.retirement_after_crash(i);
        let r = &mut self.regions[i];
        r.incarnation += 1;
        // The new process is not paused.
        r.paused_until = r.paused_until.min(self.now);
        let ids: Vec<RegionId> = (0..self.opts.regions).map(region_name).collect();
        let pushed = r.store.log().durable_seq();
        r.replica = Replica::new(
            r.id,
            &ids,
            r.replica_cfg.clone(),
            self.rngs.faults.next_u64(),
            pushed,
        );
        self.note(format!(
            "crash r{i}: {} writes dropped, {} torn",
            report.dropped_writes, report.torn_writes
        ));
        for j in 0..self.opts.regions {
            if j != i {
                self.lose_process(i, j);
            }
        }
        for c in 0..self.clients.len() {
            let here = self.clients[c].work.as_ref().is_some_and(|w| w.region == i);
            let lookup = self.clients[c]
                .work
                .as_mut()
                .filter(|w| w.region == i && !w.lookups.is_empty())
                .map(|w| std::mem::take(&mut w.lookups));
            let lost = if here {
                self.clients[c].awaiting.take()
            } else {
                None
            };
            if let Some((_, Awaiting::Claim(..))) = &lost {
                self.find_ghost(i, c);
            }
            if lost.is_some() || lookup.is_some() {
                // No answer came: the client sends the same operation again (same attempt
                // token for a claim), after a while.
                let wait = between(&mut self.rngs.workload, 1, 300);
                self.at(self.now + wait, Ev::Client(c));
            }
        }
    }

    /// A crash lost region `i`'s answer to client `c`'s claim. If the claim was durable all
    /// the same (the disk's ground truth, read back after recovery, by attempt token), the
    /// oracle learns it as a ghost: a claim no client has run yet.
    fn find_ghost(&mut self, i: usize, c: usize) {
        let w = self.clients[c].work.clone().expect("work");
        let now = self.clock(i);
        let store = &self.regions[i].store;
        let Ok(Some(view)) = store.read(now, &key_of(w.key)).and_then(|p| store.wait(p)) else {
            return;
        };
        let id = self.regions[i].id;
        let found = view.record.claims().find(|(s, cl)| {
            s.region == id && cl.facts.as_ref().is_some_and(|f| f.attempt == w.attempt)
        });
        if let Some((stamp, _)) = found {
            self.note(format!("ghost k{} {stamp:?}", w.key));
            let g = Grant {
                stamp: *stamp,
                fingerprint: w.fingerprint,
                region: i,
                executed: false,
                side_effect: false,
                released: false,
                completed: None,
                completed_at_ms: None,
                at_ms: self.now,
                fate: Fate::Held,
            };
            self.oracle.ghost(w.key, g);
        }
    }

    /// Exponential backoff with full jitter: 10 ms doubling to 1 s.
    fn retry(&mut self, c: usize, w: Work) {
        let cap = 10u64.saturating_mul(1 << w.attempts.min(7)).min(1_000);
        let wait = between(&mut self.rngs.workload, 1, cap);
        self.clients[c].work = Some(w);
        self.at(self.now + wait, Ev::Client(c));
    }

    fn finish_work(&mut self, c: usize) {
        self.clients[c].work = None;
        self.clients[c].done += 1;
        let think = between(&mut self.rngs.workload, 1, 200);
        self.at(self.now + think, Ev::Client(c));
    }

    /// Liveness: every client idle and every region holding the same log of every origin.
    fn quiet(&self) -> bool {
        if self
            .clients
            .iter()
            .any(|c| c.work.is_some() || c.awaiting.is_some())
        {
            return false;
        }
        if self.retiring().is_some() && self.retirement.as_ref().is_none_or(|r| r.pending.is_some())
        {
            return false; // the operator has not retired the lost region yet
        }
        self.apart().is_empty()
    }

    /// The regions still running (all but one lost for good).
    fn survivors(&self) -> Vec<usize> {
        (0..self.regions.len())
            .filter(|i| self.lost != Some(*i))
            .collect()
    }

    /// Survivors whose holdings differ from the first survivor's, or that miss numbers of a
    /// live origin's log (a lost region's log may keep gaps nobody can fill), with what they
    /// hold.
    fn apart(&self) -> Vec<(usize, Vec<idem::store::Holding>)> {
        let survivors = self.survivors();
        let lost = self.lost.map(|l| self.regions[l].id);
        let first = self.regions[survivors[0]].store.holdings(HOLDING_GAPS);
        survivors
            .into_iter()
            .map(|i| (i, self.regions[i].store.holdings(HOLDING_GAPS)))
            .filter(|(_, h)| {
                *h != first
                    || h.iter()
                        .any(|h| !h.gaps.is_empty() && Some(h.origin) != lost)
            })
            .collect()
    }

    /// Region `i` collects garbage: deletes its oldest log segment if it can go.
    fn collect_garbage(&mut self, i: usize) {
        let now = self.clock(i);
        match self.regions[i].store.collect_garbage(now) {
            Ok(Collected::Deleted {
                segment,
                dropped,
                copied,
            }) => {
                self.counts.segments_deleted += 1;
                self.note(format!(
                    "r{i} deleted segment {segment}: {dropped} keys dropped, {copied} copied"
                ));
            }
            Ok(Collected::Kept(_)) => {}
            Err(e) => self.oracle.violations.push(Violation {
                check: "E3",
                key: None,
                detail: format!("region {i} failed to collect garbage: {e}"),
            }),
        }
    }

    /// Region `i` is lost for good, with its disk: its connections die (what it had sent is
    /// still delivered), it never runs again, its clients' claims fail over to the next
    /// region (naming `i` as the prior region), and executions under way there give up (their
    /// claims stay in flight). An operator retires it a little later.
    fn lose_region(&mut self, i: usize) {
        self.lost = Some(i);
        self.counts.regions_lost += 1;
        self.note(format!("r{i} lost for good"));
        self.note_held_at_loss(i);
        for j in 0..self.opts.regions {
            if j != i {
                self.lose_process(i, j);
            }
        }
        let next = (i + 1) % self.opts.regions;
        for c in 0..self.clients.len() {
            if self.clients[c].region == i {
                self.clients[c].region = next;
            }
            if self.clients[c].work.as_ref().is_none_or(|w| w.region != i) {
                continue;
            }
            if let Some((_, Awaiting::Claim(..))) = self.clients[c].awaiting.take() {
                // Its fate (held by a survivor or lost) is read at the end.
                self.find_ghost(i, c);
            }
            self.fail_over_from(c, i);
        }
        let wait = between(&mut self.rngs.faults, 50, 3_000);
        self.at(self.now + wait, Ev::Retire);
    }

    /// The region the operator retires: lost for good, or taken for lost.
    fn retiring(&self) -> Option<usize> {
        self.lost.or(self.zombie)
    }

    /// Region `i` is cut off from every peer for several seconds, long enough for an operator
    /// to take it for lost and retire it; it goes on serving its own clients, whose new claims
    /// become orphans once its log rejoins the others, and it grants nothing new once it hears
    /// that it was retired (its clients then fail over).
    fn cut_off(&mut self, i: usize) {
        self.zombie = Some(i);
        self.counts.zombies += 1;
        let mut links = Vec::new();
        for j in (0..self.opts.regions).filter(|j| *j != i) {
            links.push((i, j));
            links.push((j, i));
        }
        for l in &links {
            *self.cut.entry(*l).or_default() += 1;
        }
        for &(a, b) in &links {
            self.break_link(a, b);
        }
        let len = between(&mut self.rngs.faults, 3_000, 8_000);
        self.note(format!(
            "r{i} cut off for {len} ms: an operator will take it for lost"
        ));
        self.at(self.now + len, Ev::PartitionEnd(links));
        let wait = between(&mut self.rngs.faults, 50, 2_000);
        self.at(self.now + wait, Ev::Retire);
    }

    /// Records which claims of region `i`, about to be lost, some survivor holds durably (by
    /// their number in `i`'s log, read from `i`'s own store).
    fn note_held_at_loss(&mut self, i: usize) {
        let id = self.regions[i].id;
        let holdings: Vec<idem::store::Holding> = (0..self.regions.len())
            .filter(|j| *j != i)
            .filter_map(|j| {
                let h = self.regions[j].store.holdings(1024);
                h.into_iter().find(|h| h.origin == id)
            })
            .collect();
        let held = |seq: u64| {
            holdings.iter().any(|h| {
                seq <= h.mark
                    || (seq <= h.head && !h.gaps.iter().any(|(a, b)| (*a..=*b).contains(&seq)))
            })
        };
        let now = self.clock(i);
        let store = &self.regions[i].store;
        for (k, gs) in &self.oracle.grants {
            for g in gs.iter().filter(|g| g.region == i) {
                let seq = store
                    .read(now, &key_of(*k))
                    .ok()
                    .and_then(|p| p.into_value_unchecked())
                    .and_then(|v| {
                        v.record
                            .claim(&g.stamp)
                            .and_then(|c| c.facts.as_ref())
                            .map(|f| f.origin_seq)
                    });
                if seq.is_some_and(held) {
                    self.held_at_loss.insert(g.stamp);
                }
            }
        }
    }

    /// Client `c`'s request was at the lost region `i`: a claim goes to the next region with
    /// `i` as its prior region; an execution under way gives up, as it can no longer report.
    fn fail_over_from(&mut self, c: usize, i: usize) {
        let mut w = self.clients[c].work.clone().expect("work");
        self.clients[c].awaiting = None;
        if w.step != Step::Claim {
            self.note(format!("c{c} gives up k{} with r{i}", w.key));
            self.finish_work(c);
            return;
        }
        self.counts.failovers += 1;
        w.prior = Some(i);
        w.region = (i + 1) % self.opts.regions;
        w.lookups.clear();
        self.note(format!("c{c} fails over from lost r{i} to r{}", w.region));
        self.retry(c, w);
    }

    /// An event of the lost region: nothing runs there any more.
    fn on_lost_region(&mut self, ev: Ev) {
        let lost = self.lost.expect("a lost region");
        match ev {
            Ev::Client(c)
                if self.clients[c]
                    .work
                    .as_ref()
                    .is_some_and(|w| w.region == lost) =>
            {
                self.fail_over_from(c, lost)
            }
            Ev::Deliver { .. } => self.counts.messages_lost += 1,
            _ => {}
        }
    }

    /// The operator retires the lost region at the survivor that holds the most of its log, at
    /// that survivor's contiguous mark of it (a paused survivor answers once it runs again).
    fn retire(&mut self) {
        let Some(lost) = self.retiring() else {
            return;
        };
        let id = self.regions[lost].id;
        let mark = |j: usize| self.regions[j].store.marks().get(&id).copied().unwrap_or(0);
        let at = self
            .survivors()
            .into_iter()
            .filter(|j| *j != lost)
            .max_by_key(|j| (mark(*j), std::cmp::Reverse(*j)))
            .expect("survivors");
        let last_seq = mark(at);
        let until = self.regions[at].paused_until;
        if until > self.now {
            self.at(until, Ev::Retire);
            return;
        }
        match self.regions[at].store.retire(id, last_seq) {
            Ok(p) => {
                self.note(format!(
                    "operator retires r{lost} at r{at}, last seq {last_seq}"
                ));
                self.retirement = Some(Retirement {
                    at,
                    last_seq,
                    pending: Some(p),
                });
            }
            Err(e) => self.oracle.violations.push(Violation {
                check: "E3",
                key: None,
                detail: format!("region {at} refused to retire r{lost} at {last_seq}: {e}"),
            }),
        }
    }

    /// After region `i` flushed: the operator's retirement there is acknowledged once durable.
    fn check_retirement(&mut self, i: usize) {
        let store = &self.regions[i].store;
        if let Some(r) = self.retirement.as_mut().filter(|r| r.at == i) {
            if r.pending.as_ref().is_some_and(|p| p.is_durable(store)) {
                r.pending = None;
                self.counts.retirements += 1;
            }
        }
    }

    /// Region `i` crashed: an unacknowledged retirement written there is written again unless
    /// it survived.
    fn retirement_after_crash(&mut self, i: usize) {
        let Some(lost) = self.retiring() else {
            return;
        };
        let id = self.regions[lost].id;
        let Some(r) = self
            .retirement
            .as_mut()
            .filter(|r| r.at == i && r.pending.is_some())
        else {
            return;
        };
        let kept = self.regions[i].store.durable_retirements();
        if kept.0.get(&id).is_some_and(|l| *l >= r.last_seq) {
            r.pending = None;
            self.counts.retirements += 1;
        } else {
            self.retirement = None;
            self.at(self.now + 500, Ev::Retire);
        }
    }

    /// After convergence, what became of each claim of the lost region, read from the first
    /// survivor's records: beyond the retirement's last number, an orphan; nowhere, lost. A
    /// completion or release the lost region acknowledged but never shipped is lost with it
    /// too: the survivors see the claim still in flight.
    fn classify_lost_claims(&mut self) {
        let (Some(lost), Some(r)) = (self.retiring(), self.retirement.as_ref()) else {
            return;
        };
        // The number the survivors agreed on: the operator's (checked to be the same
        // everywhere).
        let id = self.regions[lost].id;
        let agreed: Vec<Option<u64>> = self
            .survivors()
            .iter()
            .filter(|i| **i != lost)
            .map(|&i| self.regions[i].store.retirements().0.get(&id).copied())
            .collect();
        if agreed
            .iter()
            .any(|a| *a != agreed[0] || a.is_none_or(|a| a < r.last_seq))
        {
            self.oracle.violations.push(Violation {
                check: "L1",
                key: None,
                detail: format!(
                    "survivors retired r{lost} at {agreed:?}; the operator at {}",
                    r.last_seq
                ),
            });
        }
        let last_seq = agreed[0].unwrap_or(r.last_seq);
        let at = self
            .survivors()
            .into_iter()
            .find(|i| *i != lost)
            .expect("survivors");
        let mut fates = Vec::new();
        for (k, gs) in &self.oracle.grants {
            for g in gs.iter().filter(|g| g.region == lost) {
                let now = self.regions[at].clock(self.now);
                let store = &self.regions[at].store;
                let view = store.read(now, &key_of(*k)).and_then(|p| store.wait(p));
                let held = view.ok().flatten().and_then(|v| {
                    v.record
                        .claim(&g.stamp)
                        .and_then(|c| c.facts.as_ref().map(|f| (f.origin_seq, c.status())))
                });
                let fate = match held {
                    None => Fate::Lost,
                    Some((s, _)) if s > last_seq => Fate::Orphan,
                    Some(_) => Fate::Held,
                };
                let status = held.map(|(_, st)| st);
                let lost_finish = (g.completed.is_some() && status != Some(ClaimStatus::Completed))
                    || (g.released && status != Some(ClaimStatus::Released));
                fates.push((*k, g.stamp, fate, g.side_effect, lost_finish));
            }
        }
        for (k, stamp, fate, side_effect, lost_finish) in fates {
            if fate == Fate::Lost && (self.zombie.is_some() || self.held_at_loss.contains(&stamp)) {
                self.oracle.violations.push(Violation {
                    check: "S5",
                    key: Some(k),
                    detail: format!(
                        "no survivor holds {stamp:?}, which {}",
                        if self.zombie.is_some() {
                            "a region only cut off made"
                        } else {
                            "a survivor held durably when its region was lost"
                        }
                    ),
                });
            }
            match fate {
                Fate::Lost if side_effect => self.counts.lost_with_region += 1,
                Fate::Orphan => self.counts.orphans += 1,
                _ => {}
            }
            if fate != Fate::Lost && lost_finish {
                self.counts.finishes_lost_with_region += 1;
                self.oracle.forget_finish(k, &stamp);
            }
            self.oracle.set_fate(k, &stamp, fate);
        }
    }

    fn finish(mut self, seed: u64, converged: bool) -> Report {
        if converged {
            self.classify_lost_claims();
            self.check_regions();
            self.oracle.check_actionable();
        } else {
            self.stall_evidence();
        }
        self.oracle.check_client_log();
        let mut counts = std::mem::take(&mut self.counts);
        let first = self.survivors()[0];
        for i in self.survivors() {
            let r = &self.regions[i];
            let now = r.clock(self.now);
            let Ok(items) = r.store.all_items(now) else {
                continue;
            };
            counts.items += items.len() as u64;
            if i == first {
                for (_, it) in &items {
                    match it.kind {
                        ItemKind::Duplicate => counts.duplicates += 1,
                        ItemKind::KeyReuse => counts.key_reuses += 1,
                        ItemKind::Verify => counts.verify_items += 1,
                        _ => {}
                    }
                }
            }
        }
        counts.keys = self.oracle.grants.len() as u64;
        counts.actionable_seen = self.oracle.actionable.len() as u64;
        Report {
            seed,
            converged,
            violations: std::mem::take(&mut self.oracle.violations),
            liveness: std::mem::take(&mut self.stalls),
            counts,
            trace_hash: self.trace,
            last_events: std::mem::take(&mut self.log),
            sim_ms: self.now - T0,
        }
    }

    /// Why the liveness phase did not converge: requests still without a final answer (L2),
    /// regions still holding different logs (L1).
    fn stall_evidence(&mut self) {
        for (c, cl) in self.clients.iter().enumerate() {
            if let Some(w) = &cl.work {
                self.stalls.push(Violation {
                    check: "L2",
                    key: Some(w.key),
                    detail: format!(
                        "client {c} still has no final answer at r{} after {} attempts ({:?})",
                        w.region, w.attempts, w.step
                    ),
                });
            }
        }
        if self.retiring().is_some() && self.retirement.as_ref().is_none_or(|r| r.pending.is_some())
        {
            self.stalls.push(Violation {
                check: "L1",
                key: None,
                detail: "the lost region's retirement was never acknowledged".into(),
            });
        }
        let first = self.survivors()[0];
        let first_holds = self.regions[first].store.holdings(HOLDING_GAPS);
        for (i, holds) in self.apart() {
            self.stalls.push(Violation {
                check: "L1",
                key: None,
                detail: format!("region {i} holds {holds:?}, region {first} {first_holds:?}"),
            });
        }
    }

    /// After convergence: L1 (identical records), S1/S7 (the oracle's winner is replayed
    /// everywhere, with its bytes), S3/S8 (exactly the other grants are items, of the right
    /// kind).
    fn check_regions(&mut self) {
        let keys: BTreeSet<u64> = self.oracle.grants.keys().copied().collect();
        for k in keys {
            let key = key_of(k);
            if self.oracle.grants[&k].iter().all(|g| g.fate == Fate::Lost) {
                continue; // every claim of the key was lost with its region: nobody knows it
            }
            let mut views = Vec::new();
            let survivors = self.survivors();
            for &i in &survivors {
                let r = &self.regions[i];
                let now = r.clock(self.now);
                match r.store.read(now, &key).and_then(|p| r.store.wait(p)) {
                    Ok(Some(v)) => views.push(v),
                    other => {
                        // Every claim the oracle knows was acknowledged, or found durable.
                        self.oracle.violations.push(Violation {
                            check: "S5",
                            key: Some(k),
                            detail: format!("region {i} cannot show the key: {other:?}"),
                        });
                    }
                }
            }
            if views.len() < survivors.len() {
                continue;
            }
            if views.iter().any(|v| v.record != views[0].record) {
                self.oracle.violations.push(Violation {
                    check: "L1",
                    key: Some(k),
                    detail: "regions hold different records after convergence".into(),
                });
            }
            // S5: every acknowledged claim, completion and release survived every crash, in
            // every region (but those lost with a region lost for good).
            for (&i, v) in survivors.iter().zip(&views) {
                for g in self.oracle.grants[&k]
                    .iter()
                    .filter(|g| g.fate != Fate::Lost)
                {
                    let held = v.record.claim(&g.stamp);
                    let lost = match (&g.completed, held) {
                        (_, None) => Some("the acknowledged claim"),
                        (Some(o), Some(c))
                            if c.terminal != Some(Terminal::Completed(o.clone())) =>
                        {
                            Some("the acknowledged completion")
                        }
                        (None, Some(c)) if g.released && c.terminal != Some(Terminal::Released) => {
                            Some("the acknowledged release")
                        }
                        _ => None,
                    };
                    if let Some(what) = lost {
                        self.oracle.violations.push(Violation {
                            check: "S5",
                            key: Some(k),
                            detail: format!("region {i}: {what} of {:?} is gone", g.stamp),
                        });
                    }
                }
            }
            let winner = self.oracle.winner(k).cloned();
            let want_items = self.oracle.expected_items(k);
            // S8: every execution with a side effect is the winner or covered by an item.
            let effects: Vec<Stamp> = self.oracle.grants[&k]
                .iter()
                .filter(|g| g.side_effect && g.fate != Fate::Lost)
                .map(|g| g.stamp)
                .collect();
            let winner_effect = winner.as_ref().is_some_and(|w| w.side_effect);
            for (&i, v) in survivors.iter().zip(&views) {
                let mut got: Vec<_> = v.items.iter().map(|it| (it.claim, it.kind)).collect();
                got.sort();
                if got != want_items {
                    self.oracle.violations.push(Violation {
                        check: "S3",
                        key: Some(k),
                        detail: format!(
                            "region {i} shows items {got:?}, the grants make {want_items:?}"
                        ),
                    });
                }
                let covered = effects
                    .iter()
                    .filter(|s| v.items.iter().any(|it| it.claim == **s))
                    .count();
                if effects.len() != covered + usize::from(winner_effect) {
                    self.oracle.violations.push(Violation {
                        check: "S8",
                        key: Some(k),
                        detail: format!(
                            "region {i}: {} executions with a side effect, {covered} covered by \
                             items, winner ran: {winner_effect}",
                            effects.len()
                        ),
                    });
                }
            }
            let Some(winner) = winner else {
                continue;
            };
            let Some(want) = winner.completed.clone() else {
                continue;
            };
            for &i in &survivors {
                let now = self.clock(i);
                let store = &self.regions[i].store;
                let probe = ClaimRequest {
                    key: key.clone(),
                    fingerprint: winner.fingerprint,
                    attempt: AttemptToken(u128::MAX - i as u128),
                };
                match store.claim(now, &probe).and_then(|p| store.wait(p)) {
                    Ok(Decision::Replay { outcome, claim, .. }) => {
                        if claim != winner.stamp || outcome != want {
                            self.oracle.violations.push(Violation {
                                check: "S1",
                                key: Some(k),
                                detail: format!(
                                    "region {i} replays {claim:?}, the oracle's winner is {:?}",
                                    winner.stamp
                                ),
                            });
                        }
                    }
                    other => self.oracle.violations.push(Violation {
                        check: "S7",
                        key: Some(k),
                        detail: format!("region {i} answered {other:?} instead of a replay"),
                    }),
                }
            }
        }
    }
}
