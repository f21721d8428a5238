//! `idem-sim`: a deterministic simulator for idem.
//!
//! One seed builds a world of regions (each the real [`idem::store::Store`] over
//! [`idem::store::storage::MemStorage`] and the real [`idem::replica::Replica`]), clients that
//! claim and complete keys from a small Zipf key space with retries, and a network with
//! latency, jitter, loss, duplication and partitions, in virtual time on one thread. A run has a
//! safety phase with faults, then a liveness phase (links healed, no new requests) that must
//! converge within a bound; then an oracle that keeps its own log of grants, completions and
//! replies checks the regions (see [`oracle`]). The same seed gives the same run, which
//! [`Report::trace_hash`] lets a caller verify.
//!
//! Regions also crash: unsynced writes are dropped or torn, the store recovers from its disk,
//! and answers not yet durable are lost (clients retry with the same attempt token).
//!
//! A region whose clock is off the cluster's fences itself; its clients fail over to another
//! region, which first looks the key up in the region they left.
//!
//! Clients also run slow (past their lease: takeovers and late completions), release, or die
//! after their side effect.
//!
//! Clocks drift and step, processes pause, regions fall behind retention and catch up from
//! snapshots. In some seeds a region is lost for good: its clients fail over and an operator
//! retires it. `docs/simulation.md` keeps the list of what is not simulated yet.

pub mod oracle;
pub mod profile;
mod world;

pub use oracle::Violation;
pub use profile::Profile;

/// What a run simulates.
#[derive(Debug, Clone)]
pub struct Options {
    /// Regions (at least 2).
    pub regions: usize,
    /// Clients per region.
    pub clients_per_region: usize,
    /// Length of the safety phase, simulated ms.
    pub duration_ms: u64,
    /// Fault profile.
    pub profile: Profile,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            regions: 3,
            clients_per_region: 4,
            duration_ms: 20_000,
            profile: Profile::Swarm,
        }
    }
}

/// What a run exercised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Logical requests started by clients.
    pub requests: u64,
    /// Execute answers.
    pub executes: u64,
    /// Replay answers.
    pub replays: u64,
    /// Mismatch answers.
    pub mismatches: u64,
    /// Claims retried after InFlight or Unavailable.
    pub retries: u64,
    /// Keys granted at least once.
    pub keys: u64,
    /// Compensation items shown by all regions together at the end.
    pub items: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Messages lost (loss or a cut link).
    pub messages_lost: u64,
    /// Connections broken (by a loss or a partition) and redialled.
    pub connection_breaks: u64,
    /// Messages delivered.
    pub messages_delivered: u64,
    /// Mutations dropped from full push queues.
    pub push_dropped: u64,
    /// Received stamps too far ahead to move a clock.
    pub drift_rejected: u64,
    /// Requests that failed over to another region (theirs was fenced).
    pub failovers: u64,
    /// Failover lookups sent (the new region asks the prior one before claiming).
    pub lookups: u64,
    /// Process crashes.
    pub crashes: u64,
    /// Unsynced writes the crashes dropped.
    pub dropped_writes: u64,
    /// Unsynced writes the crashes tore.
    pub torn_writes: u64,
    /// Executions that outlived their lease.
    pub slow: u64,
    /// Grants that took over claims whose leases had run out.
    pub takeovers: u64,
    /// Completions of claims that no longer won (taken over, or an earlier claim arrived).
    pub late_completions: u64,
    /// Acknowledged releases.
    pub releases: u64,
    /// Clients that died after the side effect without reporting back.
    pub abandoned: u64,
    /// Items of one region (the first) by kind, at the end: the operation ran twice.
    pub duplicates: u64,
    /// ... two different requests shared a key.
    pub key_reuses: u64,
    /// ... nobody knows whether it ran (taken over or lease ran out with no report).
    pub verify_items: u64,
    /// Times a region fenced itself (its clock off the cluster's median).
    pub fences: u64,
    /// Peers brought back by a snapshot stream after falling behind the retained log.
    pub snapshot_catchups: u64,
    /// Items shown as actionable during the run (distinct per region), sampled every 250 ms.
    pub actionable_seen: u64,
    /// Clock steps (forwards or backwards).
    pub clock_steps: u64,
    /// Process pauses.
    pub pauses: u64,
    /// Releases refused because the claim's lease had run out (it stays in flight).
    pub late_releases: u64,
    /// Claims of keys never seen in their region that first asked every reachable peer
    /// (lookup on miss).
    pub miss_lookups: u64,
    /// Regions lost for good (their disk with them).
    pub regions_lost: u64,
    /// Retirements of lost regions acknowledged to the operator.
    pub retirements: u64,
    /// Claims of a lost region that survivors hold past its retirement: `Orphan` items.
    pub orphans: u64,
    /// Executions with a side effect whose claim no survivor ever got: lost with their region,
    /// and beyond any store's reach (an honest limit, not a violation).
    pub lost_with_region: u64,
    /// Completions and releases a lost region acknowledged but never shipped: the survivors
    /// see those claims in flight (then `Verify` items, or taken over).
    pub finishes_lost_with_region: u64,
    /// Regions an operator took for lost and retired while they were only cut off: they
    /// rejoin, and their claims after the retirement are orphans.
    pub zombies: u64,
    /// Log segments deleted by garbage collection.
    pub segments_deleted: u64,
}

impl Counts {
    /// Adds another run's counts.
    pub fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.executes += o.executes;
        self.replays += o.replays;
        self.mismatches += o.mismatches;
        self.retries += o.retries;
        self.keys += o.keys;
        self.items += o.items;
        self.partitions += o.partitions;
        self.messages_lost += o.messages_lost;
        self.connection_breaks += o.connection_breaks;
        self.messages_delivered += o.messages_delivered;
        self.push_dropped += o.push_dropped;
        self.drift_rejected += o.drift_rejected;
        self.failovers += o.failovers;
        self.lookups += o.lookups;
        self.crashes += o.crashes;
        self.dropped_writes += o.dropped_writes;
        self.torn_writes += o.torn_writes;
        self.slow += o.slow;
        self.takeovers += o.takeovers;
        self.late_completions += o.late_completions;
        self.releases += o.releases;
        self.abandoned += o.abandoned;
        self.duplicates += o.duplicates;
        self.key_reuses += o.key_reuses;
        self.verify_items += o.verify_items;
        self.fences += o.fences;
        self.snapshot_catchups += o.snapshot_catchups;
        self.actionable_seen += o.actionable_seen;
        self.clock_steps += o.clock_steps;
        self.pauses += o.pauses;
        self.late_releases += o.late_releases;
        self.miss_lookups += o.miss_lookups;
        self.regions_lost += o.regions_lost;
        self.retirements += o.retirements;
        self.orphans += o.orphans;
        self.lost_with_region += o.lost_with_region;
        self.finishes_lost_with_region += o.finishes_lost_with_region;
        self.zombies += o.zombies;
        self.segments_deleted += o.segments_deleted;
    }
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Whether the liveness phase converged within its bound.
    pub converged: bool,
    /// Safety violations found.
    pub violations: Vec<Violation>,
    /// Liveness failures (L1 records still apart, L2 requests without a final answer, L3 items
    /// not actionable in time), with their evidence.
    pub liveness: Vec<Violation>,
    /// What the run exercised.
    pub counts: Counts,
    /// A hash of every event in order: the same seed must give the same hash.
    pub trace_hash: u64,
    /// The last events before the end, for a failure report.
    pub last_events: Vec<String>,
    /// Simulated time the run took, ms.
    pub sim_ms: u64,
}

impl Report {
    /// Whether the run passed: converged, no violation.
    pub fn passed(&self) -> bool {
        self.converged && self.violations.is_empty() && self.liveness.is_empty()
    }
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Report {
    world::World::new(seed, opts).run(seed)
}
