//! Where the time of the durable 1024-caller bench goes: a diagnostic, not a benchmark with a
//! target (`docs/perf.md`, "Why the durable 1024-caller target is out of reach").
//!
//! ```text
//! cargo bench --bench durable_probe                      # 1M pairs, 1024 callers, 2 rounds
//! cargo bench --bench durable_probe -- 400000 64 3 1     # pairs, callers, rounds, workers
//! IDEM_ZERO_AHEAD=0 cargo bench --bench durable_probe    # zero-fill ahead off (bytes; default 4 MiB)
//! ```
//!
//! Runs the daemon's shape of `durable/pairs/1024` (two worker threads unless a fourth number
//! says otherwise, a dedicated flusher,
//! `FsStorage` under `target/tmp`) and prints, per round: pairs per second, records per
//! fdatasync and the sync cycle; the machine's CPU split over the round from `/proc/stat`
//! (user, system, idle, iowait, softirq, steal); the process's CPU in cores; and, sampled every
//! ~300 us by a side thread, how many operations are appended but not yet durable (at most one
//! per caller: when the sample reads 1024, every caller waits for the disk and the workers are
//! idle).

mod common;

use std::time::{Duration, Instant};

use common::Rng;
use idem::store::storage::FsStorage;
use idem::store::Store;

/// Jiffies of the machine's first `/proc/stat` line: user nice system idle iowait irq softirq
/// steal.
fn cpu_jiffies() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// This process's user and system CPU, in clock ticks.
fn process_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rfind(')').map_or("", |i| &s[i + 2..]);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (
        f.get(11).copied().unwrap_or(0),
        f.get(12).copied().unwrap_or(0),
    )
}

fn main() {
    let numbers = common::numeric_args();
    let pairs = numbers.first().copied().unwrap_or(1_000_000);
    let callers = numbers.get(1).copied().unwrap_or(1024) as usize;
    let rounds = numbers.get(2).copied().unwrap_or(2);
    let workers = numbers.get(3).copied().unwrap_or(2).max(1) as usize;
    let zero_ahead = std::env::var("IDEM_ZERO_AHEAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FsStorage::ZERO_AHEAD_BYTES);
    let dir = common::bench_dir();
    let storage = FsStorage::open(dir.path())
        .expect("open bench dir")
        .with_zero_ahead(zero_ahead);
    let store = Store::open(storage, common::config("a"), common::now_ms()).expect("open store");
    let mut rng = Rng::new(7);
    let body = common::outcome(&mut rng);
    println!(
        "{pairs} pairs a round, {callers} callers on {workers} workers and a flusher, zero-fill ahead {zero_ahead} B, {}",
        common::fs_type(dir.path())
    );
    for round in 0..rounds {
        let reqs = common::requests(&mut rng, pairs, workers);
        let log0 = store.log().stats();
        let cpu0 = cpu_jiffies();
        let proc0 = process_ticks();
        let t = Instant::now();
        let (done, mut pending) = std::thread::scope(|s| {
            let store = &store;
            let sampler = s.spawn(move || {
                let mut v = Vec::new();
                std::thread::sleep(Duration::from_millis(100));
                while v.len() < 4000 {
                    let l = store.log();
                    v.push(l.appended_lsn().saturating_sub(l.durable_lsn()));
                    std::thread::sleep(Duration::from_micros(300));
                }
                v
            });
            let done = common::drive_with_flusher(store, callers, &reqs, &body);
            (done, sampler.join().expect("sampler"))
        });
        let secs = t.elapsed().as_secs_f64();
        let proc1 = process_ticks();
        let cpu1 = cpu_jiffies();
        let log1 = store.log().stats();
        let syncs = (log1.syncs - log0.syncs).max(1) as f64;
        let frames = (log1.frames_written - log0.frames_written) as f64;
        let d: Vec<u64> = cpu0.iter().zip(&cpu1).map(|(a, b)| b - a).collect();
        let total = d.iter().sum::<u64>().max(1) as f64;
        let pct = |i: usize| 100.0 * d.get(i).copied().unwrap_or(0) as f64 / total;
        println!(
            "round {round}: {:.0} pairs/s; {:.1} records per fdatasync, one every {:.0} us",
            done as f64 / secs,
            frames / syncs,
            secs * 1e6 / syncs
        );
        println!(
            "  machine: user {:.1}% system {:.1}% idle {:.1}% iowait {:.1}% softirq {:.1}% steal {:.1}%",
            pct(0),
            pct(2),
            pct(3),
            pct(4),
            pct(6),
            pct(7)
        );
        println!(
            "  process: user {:.2} cores, system {:.2} cores",
            (proc1.0 - proc0.0) as f64 / 100.0 / secs,
            (proc1.1 - proc0.1) as f64 / 100.0 / secs
        );
        pending.sort_unstable();
        if !pending.is_empty() {
            let q = |p: f64| pending[((pending.len() - 1) as f64 * p) as usize];
            let all = pending.iter().filter(|&&n| n >= callers as u64).count();
            println!(
                "  operations appended, not yet durable: p10 {} p50 {} p90 {} max {}; every caller waiting in {:.0}% of samples",
                q(0.1),
                q(0.5),
                q(0.9),
                q(1.0),
                100.0 * all as f64 / pending.len() as f64
            );
        }
    }
}
