//! The simulator's standing checks: a fixed block of seeds passes and exercises what it claims,
//! runs are deterministic, and every seed that once failed passes now.

use idem_sim::{run, Counts, Options, Profile};

fn opts(profile: Profile) -> Options {
    Options {
        regions: 3,
        clients_per_region: 4,
        duration_ms: 10_000,
        profile,
    }
}

fn block(profile: Profile, seeds: std::ops::Range<u64>) -> Counts {
    let mut totals = Counts::default();
    for seed in seeds {
        let r = run(seed, &opts(profile));
        assert!(
            r.passed(),
            "seed {seed} ({profile}) failed: converged {}, violations {:#?}\nlast events: {:#?}\nreplay: cargo run -p idem-sim --release -- run --seed {seed} --profile {profile} --duration 10000",
            r.converged,
            r.violations,
            r.last_events
        );
        totals.add(&r.counts);
    }
    totals
}

#[test]
fn a_block_of_swarm_seeds_passes_and_exercises_the_faults() {
    let t = block(Profile::Swarm, 0..200);
    // A run that exercised too little proves little: minimums about half of what the block
    // did when it was written (29k executes, 15k items, 146 partitions, 418 broken
    // connections, 1.5k clock-drift rejections).
    assert!(t.executes >= 15_000, "{t:?}");
    assert!(
        t.items >= 7_500,
        "duplicates and key reuses across partitions: {t:?}"
    );
    assert!(t.replays >= 90_000, "{t:?}");
    assert!(t.mismatches >= 5_000, "{t:?}");
    assert!(t.retries >= 1_500, "{t:?}");
    assert!(t.partitions >= 70, "{t:?}");
    assert!(t.connection_breaks >= 200, "{t:?}");
    assert!(t.messages_lost >= 450, "{t:?}");
    assert!(t.drift_rejected >= 700, "{t:?}");
    assert!(t.crashes >= 150, "{t:?}");
    // Slow executions, takeovers and late completions (781, 1168 when written), releases
    // (883), clients dying after the side effect (284) and the items they leave: duplicates
    // (5.7k), key reuses (298), verify items (182).
    assert!(t.slow >= 400, "{t:?}");
    assert!(t.takeovers >= 350, "{t:?}");
    assert!(t.late_completions >= 500, "{t:?}");
    assert!(t.releases >= 400, "{t:?}");
    assert!(t.abandoned >= 120, "{t:?}");
    assert!(t.duplicates >= 2_500, "{t:?}");
    assert!(t.key_reuses >= 120, "{t:?}");
    assert!(t.verify_items >= 80, "{t:?}");
    // Lookups on miss in the seeds whose namespace asks peers first (10.7k when written).
    assert!(t.miss_lookups >= 5_000, "{t:?}");
    // Process pauses (171 when written) and clock steps (57).
    assert!(t.pauses >= 80, "{t:?}");
    assert!(t.clock_steps >= 25, "{t:?}");
    // Items that became actionable during the runs (16.4k), which S11 then checks.
    assert!(t.actionable_seen >= 8_000, "{t:?}");
    // Regions lost for good (27 when written) or only cut off and taken for lost (25), each
    // retired by the operator (52); the claims cut-off regions made after their retirement
    // became orphans (890).
    assert!(t.regions_lost >= 12, "{t:?}");
    assert!(t.zombies >= 10, "{t:?}");
    assert!(t.retirements >= 25, "{t:?}");
    assert!(t.orphans >= 300, "{t:?}");
    // Log segments deleted by garbage collection in the seeds with a short retention (87).
    assert!(t.segments_deleted >= 40, "{t:?}");
}

#[test]
fn partition_heavy_and_clock_chaos_seeds_pass() {
    let p = block(Profile::PartitionHeavy, 100..110);
    assert!(p.partitions >= 20, "{p:?}");
    // Regions cut off for longer than their peers retain the log catch up from a snapshot
    // (28 when written).
    assert!(p.snapshot_catchups >= 10, "{p:?}");
    let c = block(Profile::ClockChaos, 200..210);
    assert!(c.executes >= 200, "{c:?}");
    // Regions whose clock is off the cluster's fence themselves; their clients fail over.
    assert!(c.failovers >= 10, "{c:?}");
    // ... asking the region they left about the key first (a failover lookup).
    assert!(c.lookups >= 5, "{c:?}");
    assert!(c.fences >= 1, "{c:?}");
}

#[test]
fn disk_chaos_seeds_lose_nothing_acknowledged() {
    // Frequent crashes, often between a flush's write and its sync: the unsynced writes are
    // dropped or torn, every answer not yet durable is lost, and S5 checks that every
    // acknowledged claim and completion is still there after convergence.
    let d = block(Profile::DiskChaos, 300..340);
    assert!(d.crashes >= 150, "{d:?}");
    assert!(d.dropped_writes + d.torn_writes >= 5, "{d:?}");
    assert!(d.retries >= 500, "{d:?}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    for seed in [1, 7, 42, 99, 1_234, 65_537, 1_000_003, u64::MAX] {
        let a = run(seed, &opts(Profile::Swarm));
        let b = run(seed, &opts(Profile::Swarm));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(a.counts, b.counts, "seed {seed}");
    }
    let x = run(1, &opts(Profile::Swarm));
    let y = run(2, &opts(Profile::Swarm));
    assert_ne!(
        x.trace_hash, y.trace_hash,
        "different seeds, different runs"
    );
}

#[test]
fn regression_seeds_pass() {
    let text = include_str!("../regressions.txt");
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 5, "regressions.txt: {line:?}");
        let o = Options {
            profile: f[1].parse().expect("profile"),
            regions: f[2].parse().expect("regions"),
            clients_per_region: f[3].parse().expect("clients"),
            duration_ms: f[4].parse().expect("duration"),
        };
        let seed: u64 = f[0].parse().expect("seed");
        let r = run(seed, &o);
        assert!(r.passed(), "regression seed {line}: {:#?}", r.violations);
    }
}
