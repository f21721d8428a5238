//! `idem-sim run`: run seeds of the deterministic simulator and report.
//!
//! Exit status: 0 every seed passed, 1 a safety violation, 2 a run that did not converge, 3 a
//! seed that gave two different runs (with `--check-determinism`).

use indicatif::{ProgressBar, ProgressStyle};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use idem_sim::{Counts, Options, Profile, Report};

#[derive(Parser)]
#[command(name = "idem-sim", about = "Deterministic simulator for idem")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one seed (`--seed`) or a block of seeds (`--seeds N [--start-seed S]`).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Run this one seed and print its report.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of a block.
    #[arg(long, default_value_t = 0)]
    start_seed: u64,
    /// Fault profile: calm, swarm, partition-heavy, clock-chaos, disk-chaos.
    #[arg(long, default_value = "swarm")]
    profile: Profile,
    /// Regions.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=16))]
    regions: u64,
    /// Clients per region.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Safety phase length, simulated ms.
    #[arg(long, default_value_t = 20_000)]
    duration: u64,
    /// Run every seed twice and compare the traces.
    #[arg(long)]
    check_determinism: bool,
    /// One JSON object per seed instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let Cmd::Run(args) = Cli::parse().cmd;
    let opts = Options {
        regions: args.regions as usize,
        clients_per_region: args.clients,
        duration_ms: args.duration,
        profile: args.profile,
    };
    let (first, n) = match (args.seed, args.seeds) {
        (Some(s), _) => (s, 1),
        (None, Some(n)) => (args.start_seed, n),
        (None, None) => (args.start_seed, 1),
    };
    let started = Instant::now();
    let mut totals = Counts::default();
    let (mut failed, mut violations, mut worst) = (0u64, 0u64, 0u8);
    let mut sim_ms = 0u64;
    // A progress bar on stderr for a block of seeds (drawn only on a terminal).
    let bar = if n > 1 && !args.json {
        let bar = ProgressBar::new(n);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} seeds, {msg} [{elapsed}<{eta}]")
                .expect("a valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    for seed in first..first.saturating_add(n) {
        let report = idem_sim::run(seed, &opts);
        let mut code = if !report.violations.is_empty() {
            1
        } else if !report.converged || !report.liveness.is_empty() {
            2
        } else {
            0
        };
        if args.check_determinism {
            let again = idem_sim::run(seed, &opts);
            if again.trace_hash != report.trace_hash {
                code = 3;
                println!(
                    "seed {seed}: NON-DETERMINISTIC (trace {:016x} then {:016x})",
                    report.trace_hash, again.trace_hash
                );
            }
        }
        totals.add(&report.counts);
        sim_ms += report.sim_ms;
        violations += report.violations.len() as u64;
        if code != 0 {
            failed += 1;
            worst = worst.max(code);
        }
        if args.json {
            println!("{}", json(&report, code));
        } else if n == 1 || code != 0 {
            bar.suspend(|| print_report(&report, &opts, code));
        }
        bar.set_message(format!("{failed} failed"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    if n > 1 {
        println!(
            "totals: requests {}, executes {}, replays {}, mismatches {}, retries {}, items {} (duplicates and key reuses), partitions {}, messages lost {}, connection breaks {}, push drops {}, drift rejections {}, failovers {} (lookups {}), crashes {} (unsynced writes dropped {}, torn {})",
            totals.requests, totals.executes, totals.replays, totals.mismatches, totals.retries,
            totals.items, totals.partitions, totals.messages_lost, totals.connection_breaks,
            totals.push_dropped, totals.drift_rejected, totals.failovers, totals.lookups, totals.crashes, totals.dropped_writes,
            totals.torn_writes
        );
        println!(
            "client faults: slow executions {}, abandoned {}, releases {}; clock steps {}, pauses {}; items shown actionable during runs {}",
            totals.slow, totals.abandoned, totals.releases, totals.clock_steps, totals.pauses, totals.actionable_seen
        );
        println!(
            "speed: {:.0} client requests per wall second, {:.0}x simulated time",
            totals.requests as f64 / wall,
            sim_ms as f64 / 1000.0 / wall
        );
        println!(
            "exercised: duplicates {}, key reuses {}, verify items {}, takeovers {}, late completions {}, crashes {}, torn writes {}, partitions {}, clock fences {}, snapshot catch-ups {}, failover lookups {}, lookups on miss {}, regions lost {} (of which only cut off {}; retired {}, orphans {}, side effects lost with them {}, completions or releases lost with them {}), segments deleted {}",
            totals.duplicates,
            totals.key_reuses,
            totals.verify_items,
            totals.takeovers,
            totals.late_completions,
            totals.crashes,
            totals.torn_writes,
            totals.partitions,
            totals.fences,
            totals.snapshot_catchups,
            totals.lookups,
            totals.miss_lookups,
            totals.regions_lost + totals.zombies,
            totals.zombies,
            totals.retirements,
            totals.orphans,
            totals.lost_with_region,
            totals.finishes_lost_with_region,
            totals.segments_deleted
        );
        println!("seeds: {n}, failed: {failed}, violations: {violations}");
    }
    ExitCode::from(worst)
}

fn print_report(r: &Report, opts: &Options, code: u8) {
    let verdict = match code {
        0 => "pass",
        1 => "SAFETY VIOLATION",
        2 => "DID NOT CONVERGE",
        _ => "NON-DETERMINISTIC",
    };
    println!(
        "seed {}: {verdict}; {} requests, {} executes, {} replays, {} items, {} partitions, {} ms simulated, trace {:016x}",
        r.seed, r.counts.requests, r.counts.executes, r.counts.replays, r.counts.items,
        r.counts.partitions, r.sim_ms, r.trace_hash
    );
    for v in r.violations.iter().chain(&r.liveness) {
        let key = v.key.map(|k| format!(" key k{k}")).unwrap_or_default();
        println!("  {}{key}: {}", v.check, v.detail);
    }
    if code != 0 {
        println!("  last events:");
        for e in r.last_events.iter().rev().take(20).rev() {
            println!("    {e}");
        }
        println!(
            "  replay: cargo run -p idem-sim --release -- run --seed {} --profile {} --regions {} --clients {} --duration {}",
            r.seed, opts.profile, opts.regions, opts.clients_per_region, opts.duration_ms
        );
    }
}

fn json(r: &Report, code: u8) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let violations: Vec<String> = r
        .violations
        .iter()
        .chain(&r.liveness)
        .map(|v| {
            format!(
                "{{\"check\":\"{}\",\"key\":{},\"detail\":\"{}\"}}",
                v.check,
                v.key.map_or("null".into(), |k| k.to_string()),
                esc(&v.detail)
            )
        })
        .collect();
    format!(
        "{{\"seed\":{},\"exit\":{code},\"converged\":{},\"trace\":\"{:016x}\",\"requests\":{},\"executes\":{},\"replays\":{},\"items\":{},\"partitions\":{},\"violations\":[{}]}}",
        r.seed, r.converged, r.trace_hash, r.counts.requests, r.counts.executes,
        r.counts.replays, r.counts.items, r.counts.partitions, violations.join(",")
    )
}
