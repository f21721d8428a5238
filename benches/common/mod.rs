//! Helpers shared by the bench binaries: request generation, the caller model, a side channel
//! recording every sample, and a few `/proc` and `statfs` probes. See `docs/perf.md`.

#![allow(dead_code)]

pub mod daemon;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem::clock::{RegionId, Stamp};
use idem::record::{AttemptToken, Fingerprint, Outcome, RecordKey};
use idem::store::storage::Storage;
use idem::store::{ClaimRequest, Completion, Decision, Pending, Store, StoreConfig};

/// The one namespace every bench uses.
pub const NS: &str = "bench";
/// Size of every outcome body, bytes (the "100-byte outcomes").
pub const OUTCOME_BYTES: usize = 100;

/// splitmix64: keys and fingerprints only need to be distinct and spread, not secure.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6a09_e667_f3bc_c908)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Wall clock, Unix ms: the store is fed the real time, like the daemon does.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A store config with the library defaults (64 MiB segments, 256 index shards) and the one
/// bench namespace.
pub fn config(region: &str) -> StoreConfig {
    StoreConfig::new(RegionId::new(region).expect("region id"), &[NS])
}

/// A claim request for a random, distinct key (128 random bits, as 32 hex digits).
pub fn request(rng: &mut Rng) -> ClaimRequest {
    let mut fp = [0u8; 32];
    rng.fill(&mut fp);
    ClaimRequest {
        key: RecordKey::new(NS, "principal-1", format!("{:032x}", rng.next_u128())),
        fingerprint: Fingerprint(fp),
        attempt: AttemptToken(rng.next_u128()),
    }
}

/// `n` requests split round-robin into `parts` vectors (one per driver thread).
pub fn requests(rng: &mut Rng, n: u64, parts: usize) -> Vec<Vec<ClaimRequest>> {
    let mut out: Vec<Vec<ClaimRequest>> = (0..parts)
        .map(|_| Vec::with_capacity((n as usize).div_ceil(parts)))
        .collect();
    for i in 0..n {
        out[(i % parts as u64) as usize].push(request(rng));
    }
    out
}

/// A 200 outcome with a 100-byte body and no headers.
pub fn outcome(rng: &mut Rng) -> Outcome {
    let mut body = vec![0u8; OUTCOME_BYTES];
    rng.fill(&mut body);
    Outcome::new(200, body)
}

/// The numbers among the command-line arguments, in order (`cargo bench` adds `--bench`): the
/// diagnostic benches take their sizes from them.
pub fn numeric_args() -> Vec<u64> {
    std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// A fresh directory on the file system of the cargo target dir (not tmpfs: fdatasync is real).
pub fn bench_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("idem-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("bench tempdir")
}

/// The file-system type of `path`, from statfs (`ext4`, `tmpfs`, ... or the magic number).
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return format!("unknown ({})", std::io::Error::last_os_error());
    }
    match st.f_type as i64 {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        other => format!("magic {other:#x}"),
    }
}

/// Resident set size of this process, bytes (VmRSS from /proc/self/status).
pub fn vm_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes the allocator has handed out and not got back (glibc mallinfo2: arena + mmapped).
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads allocator statistics.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

// ---------------------------------------------------------------------------------------------
// The caller model
// ---------------------------------------------------------------------------------------------

/// One logical caller: at most one operation outstanding, like an async task awaiting its answer.
enum Slot {
    /// Nothing outstanding: the caller's next move is a new claim (if any requests are left).
    Idle,
    /// A claim was issued; its answer is not yet durable.
    Claiming(usize, Pending<Decision>),
    /// The claim was answered Execute (durably); the caller completes it in the next round.
    Executing(usize, Stamp),
    /// A completion was issued; its answer is not yet durable.
    Completing(Pending<Completion>),
}

/// Issues the claim of the next request, if any is left.
fn claim_next<S: Storage>(
    store: &Store<S>,
    reqs: &[ClaimRequest],
    next: &mut usize,
) -> Option<Slot> {
    let i = *next;
    let r = reqs.get(i)?;
    *next += 1;
    Some(Slot::Claiming(i, store.claim(now_ms(), r).expect("claim")))
}

/// The claim a durable answer granted: every bench key is fresh, so it must be Execute.
fn won(p: Pending<Decision>) -> Stamp {
    match p.into_value_unchecked() {
        Decision::Execute { claim, .. } => claim,
        other => panic!("a fresh key must be Execute, got {other:?}"),
    }
}

/// Issues the completion of a won claim with the bench outcome.
fn complete_won<S: Storage>(
    store: &Store<S>,
    reqs: &[ClaimRequest],
    i: usize,
    claim: Stamp,
    body: &Outcome,
) -> Slot {
    let p = store
        .complete(now_ms(), &reqs[i].key, claim, body.clone())
        .expect("complete");
    Slot::Completing(p)
}

/// Checks a durable completion's answer: the pair is done.
fn finished(p: Pending<Completion>) {
    let c = p.into_value_unchecked();
    assert!(!c.superseded, "completion superseded: {c:?}");
}

/// Runs claim+complete pairs for every request in `reqs` with `callers` logical callers on the
/// current thread.
///
/// Each round: every caller without an outstanding operation issues its next one (claim, or
/// complete of the claim it won); then the driver waits once for durability ([`Store::flush`],
/// group commit shared with the other driver threads); then every answer that is durable is
/// released to its caller. A pair is counted when its completion's answer is released.
/// Returns the number of pairs completed.
pub fn drive<S: Storage>(
    store: &Store<S>,
    callers: usize,
    reqs: &[ClaimRequest],
    body: &Outcome,
) -> u64 {
    let mut slots: Vec<Slot> = (0..callers.max(1)).map(|_| Slot::Idle).collect();
    let mut next = 0usize;
    let mut done = 0u64;
    loop {
        let mut issued = 0usize;
        for slot in slots.iter_mut() {
            *slot = match std::mem::replace(slot, Slot::Idle) {
                Slot::Idle => match claim_next(store, reqs, &mut next) {
                    Some(s) => {
                        issued += 1;
                        s
                    }
                    None => Slot::Idle,
                },
                Slot::Executing(i, stamp) => {
                    issued += 1;
                    complete_won(store, reqs, i, stamp, body)
                }
                other => other,
            };
        }
        if issued == 0 {
            return done;
        }
        store.flush().expect("flush");
        for slot in slots.iter_mut() {
            *slot = match std::mem::replace(slot, Slot::Idle) {
                Slot::Claiming(i, p) => {
                    assert!(
                        p.is_durable(store),
                        "flush returned before the claim was durable"
                    );
                    Slot::Executing(i, won(p))
                }
                Slot::Completing(p) => {
                    assert!(
                        p.is_durable(store),
                        "flush returned before the completion was durable"
                    );
                    finished(p);
                    done += 1;
                    Slot::Idle
                }
                other => other,
            };
        }
    }
}

/// Runs `parts.len()` driver threads (one per part), splitting `callers` evenly among them.
pub fn drive_threads<S: Storage>(
    store: &Store<S>,
    callers: usize,
    parts: &[Vec<ClaimRequest>],
    body: &Outcome,
) -> u64 {
    let threads = parts.len();
    if threads == 1 {
        return drive(store, callers, &parts[0], body);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(t, reqs)| {
                let mine = callers / threads + usize::from(t < callers % threads);
                s.spawn(move || drive(store, mine, reqs, body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("driver")).sum()
    })
}

/// The caller model of an async daemon: worker threads run their callers' operations and never
/// block in a sync; one dedicated flusher thread ([`Store::flush_appended`]) does every group
/// commit, so the next group builds up while the current one syncs.
///
/// Each worker owns `callers / workers` callers and loops over them: a caller whose answer is
/// durable gets it and issues its next operation at once (a won claim is completed, a finished
/// pair is followed by the next claim); when no caller could move, the worker sleeps until the
/// oldest outstanding answer is durable ([`Store::wait_durable_for`]). Returns the pairs done.
pub fn drive_with_flusher<S: Storage>(
    store: &Store<S>,
    callers: usize,
    parts: &[Vec<ClaimRequest>],
    body: &Outcome,
) -> u64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    let workers = parts.len();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                store
                    .flush_appended(Duration::from_millis(1))
                    .expect("flush");
            }
        });
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(t, reqs)| {
                let mine = callers / workers + usize::from(t < callers % workers);
                s.spawn(move || poll_callers(store, mine, reqs, body))
            })
            .collect();
        let done = handles.into_iter().map(|h| h.join().expect("worker")).sum();
        stop.store(true, Ordering::Relaxed);
        flusher.join().expect("flusher");
        done
    })
}

/// One worker of [`drive_with_flusher`].
fn poll_callers<S: Storage>(
    store: &Store<S>,
    callers: usize,
    reqs: &[ClaimRequest],
    body: &Outcome,
) -> u64 {
    let mut slots: Vec<Slot> = (0..callers.max(1)).map(|_| Slot::Idle).collect();
    let mut next = 0usize;
    let mut done = 0u64;
    loop {
        let mut moved = false;
        let mut oldest: Option<u64> = None;
        for slot in slots.iter_mut() {
            *slot = match std::mem::replace(slot, Slot::Idle) {
                Slot::Idle if next < reqs.len() => {
                    moved = true;
                    claim_next(store, reqs, &mut next).unwrap_or(Slot::Idle)
                }
                Slot::Claiming(i, p) if p.is_durable(store) => {
                    moved = true;
                    complete_won(store, reqs, i, won(p), body)
                }
                Slot::Completing(p) if p.is_durable(store) => {
                    moved = true;
                    finished(p);
                    done += 1;
                    claim_next(store, reqs, &mut next).unwrap_or(Slot::Idle)
                }
                other => {
                    let lsn = match &other {
                        Slot::Claiming(_, p) => Some(p.lsn()),
                        Slot::Completing(p) => Some(p.lsn()),
                        _ => None,
                    };
                    if let Some(l) = lsn {
                        oldest = Some(oldest.map_or(l, |o: u64| o.min(l)));
                    }
                    other
                }
            };
        }
        match oldest {
            None if !moved && next >= reqs.len() => return done,
            Some(lsn) if !moved => {
                store
                    .wait_durable_for(lsn, Duration::from_millis(10))
                    .expect("wait");
            }
            _ => {}
        }
    }
}

/// Claims and completes every request with a blocking [`Store::wait`] after each operation:
/// a caller that is its own OS thread.
pub fn blocking_pairs<S: Storage>(store: &Store<S>, reqs: &[ClaimRequest], body: &Outcome) -> u64 {
    for r in reqs {
        let d = store
            .wait(store.claim(now_ms(), r).expect("claim"))
            .expect("wait");
        let Decision::Execute { claim, .. } = d else {
            panic!("a fresh key must be Execute, got {d:?}");
        };
        let c = store
            .wait(
                store
                    .complete(now_ms(), &r.key, claim, body.clone())
                    .expect("complete"),
            )
            .expect("wait");
        assert!(!c.superseded);
    }
    reqs.len() as u64
}

// ---------------------------------------------------------------------------------------------
// Side channel: every sample criterion asked for, so the summary can compute its own figures
// ---------------------------------------------------------------------------------------------

/// One call of an `iter_custom` routine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Elements (pairs, inserts, syncs) done in the call.
    pub iters: u64,
    /// Timed part of the call.
    pub elapsed: Duration,
    /// Log frames written during the call.
    pub frames: u64,
    /// fdatasyncs the log issued during the call.
    pub syncs: u64,
    /// Bytes the log wrote during the call.
    pub bytes: u64,
}

static SAMPLES: Mutex<BTreeMap<String, Vec<Sample>>> = Mutex::new(BTreeMap::new());
static LATENCIES: Mutex<BTreeMap<String, Vec<Vec<u64>>>> = Mutex::new(BTreeMap::new());

/// Records one call of a routine.
pub fn record(id: &str, s: Sample) {
    SAMPLES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.to_owned())
        .or_default()
        .push(s);
}

/// Records the per-operation latencies (ns) of one call.
pub fn record_latencies(id: &str, ns: Vec<u64>) {
    LATENCIES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.to_owned())
        .or_default()
        .push(ns);
}

/// The last `n` calls of `id` (criterion's measurement samples follow its warm-up calls).
pub fn samples(id: &str, n: usize) -> Vec<Sample> {
    let all = SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    all.get(id)
        .map(|v| v[v.len().saturating_sub(n)..].to_vec())
        .unwrap_or_default()
}

/// Elements per second: median over the last `n` samples of each sample's rate (criterion's
/// median of the per-sample times, as a rate).
pub fn median_rate(id: &str, n: usize) -> Option<f64> {
    median(
        samples(id, n)
            .iter()
            .filter(|s| s.iters > 0 && !s.elapsed.is_zero())
            .map(|s| s.iters as f64 / s.elapsed.as_secs_f64())
            .collect(),
    )
}

/// The median of `v` (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Log frames per fdatasync and average frame bytes over the last `n` samples.
pub fn frames_per_sync(id: &str, n: usize) -> Option<(f64, f64)> {
    let s = samples(id, n);
    let frames: u64 = s.iter().map(|x| x.frames).sum();
    let syncs: u64 = s.iter().map(|x| x.syncs).sum();
    let bytes: u64 = s.iter().map(|x| x.bytes).sum();
    (syncs > 0 && frames > 0).then(|| (frames as f64 / syncs as f64, bytes as f64 / frames as f64))
}

/// Timed microseconds per fdatasync over the last `n` samples (for one caller: the latency of
/// an operation; with more, the interval between group commits).
pub fn time_per_sync(id: &str, n: usize) -> Option<f64> {
    let s = samples(id, n);
    let syncs: u64 = s.iter().map(|x| x.syncs).sum();
    let secs: f64 = s.iter().map(|x| x.elapsed.as_secs_f64()).sum();
    (syncs > 0).then(|| secs * 1e6 / syncs as f64)
}

/// Percentiles (ns) of the per-operation latencies of the last `n` calls of `id`.
pub fn latency_percentiles(id: &str, n: usize, ps: &[f64]) -> Option<(usize, Vec<u64>)> {
    let all = LATENCIES.lock().unwrap_or_else(|p| p.into_inner());
    let v = all.get(id)?;
    let mut ns: Vec<u64> = v[v.len().saturating_sub(n)..]
        .iter()
        .flatten()
        .copied()
        .collect();
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let pick = |p: f64| ns[((ns.len() - 1) as f64 * p).round() as usize];
    Some((ns.len(), ps.iter().map(|&p| pick(p)).collect()))
}

// ---------------------------------------------------------------------------------------------
// Interference: CPU used by other processes while a bench ran
// ---------------------------------------------------------------------------------------------

/// Clock ticks: user and system time of all CPUs (from /proc/stat; interrupts excluded), of
/// this process, and of kernel threads (the block layer and the journal work for our I/O too).
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    busy: u64,
    /// Time the hypervisor ran something else while this VM wanted the CPU (all CPUs).
    steal: u64,
    own: u64,
    kernel_threads: u64,
    at: std::time::Instant,
}

/// Fields of /proc/PID/stat after the command name: (ppid, utime + stime).
fn proc_stat(path: &Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces: fields resume after the last ')'.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    // f[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    Some((
        ppid,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// Takes a [`CpuSnapshot`].
pub fn cpu_snapshot() -> CpuSnapshot {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal ...
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse::<u64>().ok())
                .collect()
        })
        .unwrap_or_default();
    let busy = fields.iter().take(3).sum();
    let steal = fields.get(7).copied().unwrap_or(0);
    let own = proc_stat(Path::new("/proc/self/stat")).map_or(0, |(_, t)| t);
    let mut kernel_threads = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = proc_stat(&e.path().join("stat")) {
                if pid == 2 || ppid == 2 {
                    kernel_threads += t;
                }
            }
        }
    }
    CpuSnapshot {
        busy,
        steal,
        own,
        kernel_threads,
        at: std::time::Instant::now(),
    }
}

/// Cores' worth of CPU that other user processes used between two snapshots (this process and
/// kernel threads excluded).
pub fn other_cpu(a: &CpuSnapshot, b: &CpuSnapshot) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let secs = (b.at - a.at).as_secs_f64().max(1e-3);
    let other = b.busy.saturating_sub(a.busy) as f64
        - b.own.saturating_sub(a.own) as f64
        - b.kernel_threads.saturating_sub(a.kernel_threads) as f64;
    (other / hz / secs).max(0.0)
}

/// Cores' worth of CPU time the hypervisor took from this VM between two snapshots (steal): on a
/// shared host the same code runs slower then, and no process here shows it.
pub fn steal_cpu(a: &CpuSnapshot, b: &CpuSnapshot) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let secs = (b.at - a.at).as_secs_f64().max(1e-3);
    b.steal.saturating_sub(a.steal) as f64 / hz / secs
}

/// Waits (at most `max`) until other processes use under 0.1 cores for two seconds in a row.
/// Returns how long it waited and whether the machine became quiet.
pub fn wait_quiet(max: Duration) -> (Duration, bool) {
    let start = std::time::Instant::now();
    loop {
        let a = cpu_snapshot();
        std::thread::sleep(Duration::from_secs(2));
        if other_cpu(&a, &cpu_snapshot()) < 0.1 {
            return (start.elapsed(), true);
        }
        if start.elapsed() >= max {
            return (start.elapsed(), false);
        }
    }
}

/// /proc/loadavg's first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
