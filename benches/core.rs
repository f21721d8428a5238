//! Criterion benchmarks of the store core, all in one run (`cargo bench --bench core`), with a
//! summary of figures against the targets at the end. See `docs/perf.md` for the caller model and
//! the recorded results.
//!
//! Every pair is a claim (a fresh random key, answered `Execute`) and the completion of that claim
//! with a 100-byte outcome, each answer released only once durable.

mod common;

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Rng, Sample};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use dashmap::DashMap;
use idem::clock::RegionId;
use idem::store::entry::Mutation;
use idem::store::storage::{FsStorage, MemStorage, Storage};
use idem::store::Store;

/// Samples per benchmark (criterion's minimum): every figure is a median of these.
const SAMPLES: usize = 10;
/// Durable callers counts, and how many driver threads model them.
const DURABLE_CALLERS: [(usize, usize); 3] = [(1, 1), (64, 2), (1024, 2)];
/// Size of the reference append: about one claim entry (the run prints the real average frame).
const REF_APPEND_BYTES: usize = 150;
/// Size of the files of the fdatasync reference: one log segment (`LogConfig::default`).
const REF_FILE_BYTES: u64 = 64 << 20;
/// Mutations a merge batch holds before the receiver flushes (512 pairs).
const MERGE_BATCH: usize = 1024;

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    measure_s: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(measure_s))
        .throughput(Throughput::Elements(1));
    g
}

fn open_fs(dir: &Path, region: &str) -> Store<FsStorage> {
    Store::open(
        FsStorage::open(dir).expect("fs storage"),
        common::config(region),
        common::now_ms(),
    )
    .expect("open store")
}

fn open_mem(region: &str) -> Store<MemStorage> {
    Store::open(MemStorage::new(), common::config(region), common::now_ms()).expect("open store")
}

/// Runs one sample of `iters` pairs on a fresh store; only the pairs are timed.
fn pairs_sample<S: Storage>(
    id: &str,
    store: Store<S>,
    iters: u64,
    threads: usize,
    callers: usize,
    rng: &mut Rng,
    blocking: bool,
) -> Duration {
    let body = common::outcome(rng);
    let parts = common::requests(rng, iters, threads);
    let before = store.log().stats();
    let t = Instant::now();
    let done = if blocking {
        std::thread::scope(|s| {
            let hs: Vec<_> = parts
                .iter()
                .map(|p| {
                    let (store, body) = (&store, &body);
                    s.spawn(move || common::blocking_pairs(store, p, body))
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("caller")).sum()
        })
    } else {
        common::drive_threads(&store, callers, &parts, &body)
    };
    let elapsed = t.elapsed();
    assert_eq!(done, iters);
    let after = store.log().stats();
    common::record(
        id,
        Sample {
            iters,
            elapsed,
            frames: after.frames_written - before.frames_written,
            syncs: after.syncs - before.syncs,
            bytes: after.bytes_written - before.bytes_written,
        },
    );
    elapsed
}

fn durable(c: &mut Criterion) {
    let mut g = group(c, "durable", 5);
    let mut rng = Rng::new(1);
    for (callers, threads) in DURABLE_CALLERS {
        let id = format!("durable/pairs/{callers}");
        g.bench_function(BenchmarkId::new("pairs", callers), |b| {
            b.iter_custom(|iters| {
                let dir = common::bench_dir();
                let store = open_fs(dir.path(), "a");
                pairs_sample(&id, store, iters, threads, callers, &mut rng, false)
            })
        });
    }
    // Cross-check of the caller model: 64 real OS threads, each blocking in Store::wait.
    let id = "durable/os_threads/64";
    g.bench_function(BenchmarkId::new("os_threads", 64), |b| {
        b.iter_custom(|iters| {
            let dir = common::bench_dir();
            let store = open_fs(dir.path(), "a");
            pairs_sample(id, store, iters, 64, 64, &mut rng, true)
        })
    });
    g.finish();
    for (callers, _) in DURABLE_CALLERS {
        print_frames_per_sync(&format!("durable/pairs/{callers}"));
    }
    print_frames_per_sync(id);
}

fn print_frames_per_sync(id: &str) {
    if let Some((fps, frame_bytes)) = common::frames_per_sync(id, SAMPLES) {
        println!(
            "{id}: {fps:.1} log records per fdatasync (average frame {frame_bytes:.0} B incl. 8 B header)"
        );
    }
}

/// In-memory variants: (bench name, driver threads, callers, blocking OS-thread callers).
const MEMORY: [(&str, usize, usize, bool); 4] = [
    ("t1_c1", 1, 1, false),
    ("t1_c1024", 1, 1024, false),
    ("t2_c2", 2, 2, true),
    ("t2_c1024", 2, 1024, false),
];

fn memory(c: &mut Criterion) {
    let mut g = group(c, "memory", 3);
    let mut rng = Rng::new(2);
    for (name, threads, callers, blocking) in MEMORY {
        let id = format!("memory/pairs/{name}");
        g.bench_function(BenchmarkId::new("pairs", name), |b| {
            b.iter_custom(|iters| {
                let store = open_mem("a");
                pairs_sample(&id, store, iters, threads, callers, &mut rng, blocking)
            })
        });
    }
    g.finish();
    for (name, ..) in MEMORY {
        print_frames_per_sync(&format!("memory/pairs/{name}"));
    }
}

/// `iters` pairs made by a fresh origin region, as `log_from` serves them.
fn remote_mutations(n: u64, origin: &str, rng: &mut Rng) -> Vec<Mutation> {
    let src = open_mem(origin);
    let body = common::outcome(rng);
    let reqs = common::requests(rng, n, 1);
    common::drive(&src, 1024, &reqs[0], &body);
    let region = RegionId::new(origin).expect("region");
    let muts = src
        .log_from(common::now_ms(), region, 1, usize::MAX)
        .expect("log_from");
    assert_eq!(muts.len() as u64, 2 * n, "a claim and a finish per pair");
    muts
}

/// One merge sample: a fresh origin makes `iters` pairs (untimed), then `target` merges their
/// mutations, flushing after every [`MERGE_BATCH`] of them like a replication receiver.
fn merge_sample(
    id: &str,
    target: &dyn MergeTarget,
    iters: u64,
    rng: &mut Rng,
    origin_no: &mut u64,
) -> Duration {
    *origin_no += 1;
    let muts = remote_mutations(iters, &format!("o{origin_no}"), rng);
    let before = target.stats();
    let t = Instant::now();
    let mut in_batch = 0;
    for m in muts {
        target.merge(m);
        in_batch += 1;
        if in_batch == MERGE_BATCH {
            target.flush();
            in_batch = 0;
        }
    }
    target.flush();
    let elapsed = t.elapsed();
    let after = target.stats();
    common::record(
        id,
        Sample {
            iters,
            elapsed,
            frames: after.0 - before.0,
            syncs: after.1 - before.1,
            bytes: after.2 - before.2,
        },
    );
    elapsed
}

fn merge(c: &mut Criterion) {
    let mut g = group(c, "merge", 3);
    let mut rng = Rng::new(3);
    let mut origin_no = 0u64;
    g.bench_function("pairs_durable", |b| {
        b.iter_custom(|iters| {
            let dir = common::bench_dir();
            let target = open_fs(dir.path(), "a");
            let id = "merge/pairs_durable";
            merge_sample(id, &target, iters, &mut rng, &mut origin_no)
        })
    });
    g.bench_function("pairs_memory", |b| {
        b.iter_custom(|iters| {
            let target = open_mem("a");
            let id = "merge/pairs_memory";
            merge_sample(id, &target, iters, &mut rng, &mut origin_no)
        })
    });
    g.finish();
    print_frames_per_sync("merge/pairs_durable");
}

/// A store of either storage, as far as the merge bench needs it.
trait MergeTarget {
    fn merge(&self, m: Mutation);
    fn flush(&self);
    /// (frames written, syncs, bytes written)
    fn stats(&self) -> (u64, u64, u64);
}

impl<S: Storage> MergeTarget for Store<S> {
    fn merge(&self, m: Mutation) {
        let merged = self.merge_remote(common::now_ms(), m).expect("merge");
        assert!(merged.peek().new);
        if merged.peek().drift_rejected {
            DRIFT_REJECTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    fn flush(&self) {
        Store::flush(self).expect("flush");
    }
    fn stats(&self) -> (u64, u64, u64) {
        let s = self.log().stats();
        (s.frames_written, s.syncs, s.bytes_written)
    }
}

static DRIFT_REJECTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn dashmap_insert(c: &mut Criterion) {
    let mut g = group(c, "reference", 2);
    for threads in [1usize, 2] {
        let id = format!("reference/dashmap_insert/{threads}");
        g.bench_function(BenchmarkId::new("dashmap_insert", threads), |b| {
            b.iter_custom(|iters| {
                let map: DashMap<[u8; 16], [u8; 48]> = DashMap::new();
                let t = Instant::now();
                std::thread::scope(|s| {
                    for th in 0..threads {
                        let map = &map;
                        let n = iters / threads as u64
                            + u64::from((th as u64) < iters % threads as u64);
                        s.spawn(move || {
                            let mut rng = Rng::new(iters ^ (th as u64) << 40);
                            for _ in 0..n {
                                let mut k = [0u8; 16];
                                k[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
                                k[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
                                let mut v = [0u8; 48];
                                v[..16].copy_from_slice(&k);
                                black_box(map.insert(k, v));
                            }
                        });
                    }
                });
                let elapsed = t.elapsed();
                assert_eq!(map.len() as u64, iters);
                common::record(
                    &id,
                    Sample {
                        iters,
                        elapsed,
                        ..Sample::default()
                    },
                );
                elapsed
            })
        });
    }
    g.finish();
}

/// The kinds of file the fdatasync reference appends to.
#[derive(Clone, Copy)]
enum FileKind {
    /// fallocate(mode 0) of a whole segment, then fsync: what `FsStorage::create` does.
    Fallocated,
    /// A segment's worth of zeroes written and fsynced first.
    ZeroFilled,
    /// An empty file that every append grows.
    Appended,
}

impl FileKind {
    fn name(self) -> &'static str {
        match self {
            FileKind::Fallocated => "fallocate",
            FileKind::ZeroFilled => "zero_filled",
            FileKind::Appended => "appended",
        }
    }

    fn create(self, path: &Path) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .expect("create reference file");
        match self {
            FileKind::Fallocated => {
                use std::os::unix::io::AsRawFd;
                // SAFETY: plain syscall on a valid descriptor we own.
                let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, REF_FILE_BYTES as i64) };
                assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
            }
            FileKind::ZeroFilled => {
                let zeroes = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < REF_FILE_BYTES {
                    f.write_all_at(&zeroes, off).expect("zero fill");
                    off += zeroes.len() as u64;
                }
            }
            FileKind::Appended => {}
        }
        f.sync_all().expect("fsync");
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .expect("dir fsync");
        }
        f
    }
}

fn append_fdatasync(c: &mut Criterion) {
    let mut g = group(c, "reference", 2);
    let dir = common::bench_dir();
    println!(
        "reference files in {} ({})",
        dir.path().display(),
        common::fs_type(dir.path())
    );
    let payload = vec![0xa5u8; REF_APPEND_BYTES];
    for kind in [
        FileKind::Fallocated,
        FileKind::ZeroFilled,
        FileKind::Appended,
    ] {
        let id = format!("reference/append_fdatasync/{}", kind.name());
        let mut n_file = 0u32;
        let mut new_file = || {
            n_file += 1;
            kind.create(&dir.path().join(format!("{}-{n_file}", kind.name())))
        };
        let mut file = new_file();
        let mut off = 0u64;
        g.bench_function(BenchmarkId::new("append_fdatasync", kind.name()), |b| {
            b.iter_custom(|iters| {
                let mut lat = Vec::with_capacity(iters as usize);
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if off + REF_APPEND_BYTES as u64 > REF_FILE_BYTES {
                        file = new_file();
                        off = 0;
                    }
                    let t = Instant::now();
                    file.write_all_at(&payload, off).expect("write");
                    file.sync_data().expect("fdatasync");
                    let d = t.elapsed();
                    off += REF_APPEND_BYTES as u64;
                    total += d;
                    lat.push(d.as_nanos() as u64);
                }
                common::record_latencies(&id, lat);
                common::record(
                    &id,
                    Sample {
                        iters,
                        elapsed: total,
                        ..Sample::default()
                    },
                );
                total
            })
        });
    }
    g.finish();
    drop(dir);
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// Bytes the log writes for one claim and for its completion.
fn entry_sizes() -> (u64, u64) {
    let mut rng = Rng::new(9);
    let store = open_mem("a");
    store.flush().expect("flush");
    let b0 = store.log().stats().bytes_written;
    let req = common::request(&mut rng);
    let d = store
        .wait(store.claim(common::now_ms(), &req).expect("claim"))
        .expect("wait");
    let b1 = store.log().stats().bytes_written;
    let idem::store::Decision::Execute { claim, .. } = d else {
        panic!("{d:?}")
    };
    let p = store
        .complete(common::now_ms(), &req.key, claim, common::outcome(&mut rng))
        .expect("complete");
    store.wait(p).expect("wait");
    let b2 = store.log().stats().bytes_written;
    (b1 - b0, b2 - b1)
}

fn summary() {
    let rate = |id: &str| common::median_rate(id, SAMPLES);
    println!();
    println!("==================== idem core bench summary ====================");
    println!(
        "machine: {} cores; bench dir file system: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        common::fs_type(Path::new(env!("CARGO_TARGET_TMPDIR")))
    );
    println!(
        "-- fdatasync reference: {REF_APPEND_BYTES} B append + fdatasync, per-op latency (us)"
    );
    let mut fallocate_median = None;
    for kind in ["fallocate", "zero_filled", "appended"] {
        let id = format!("reference/append_fdatasync/{kind}");
        if let Some((n, p)) = common::latency_percentiles(&id, SAMPLES, &[0.5, 0.9, 0.99]) {
            let us = |ns: u64| ns as f64 / 1000.0;
            println!(
                "  {kind:<12} median {:>7.1}  p90 {:>7.1}  p99 {:>7.1}  ({n} ops){}",
                us(p[0]),
                us(p[1]),
                us(p[2]),
                if kind == "fallocate" {
                    "  <- the kind FsStorage::create makes"
                } else {
                    ""
                }
            );
            if kind == "fallocate" {
                fallocate_median = Some(us(p[0]));
            }
        }
    }
    let (claim_b, finish_b) = entry_sizes();
    println!(
        "  log frames of one pair: claim {claim_b} B, completion {finish_b} B (8 B frame header included)"
    );
    println!("-- figures (elements/s = pairs/s, inserts/s)");
    let mut rows: Vec<(String, f64)> = Vec::new();
    for id in [
        "durable/pairs/1",
        "durable/pairs/64",
        "durable/pairs/1024",
        "durable/os_threads/64",
        "memory/pairs/t1_c1",
        "memory/pairs/t1_c1024",
        "memory/pairs/t2_c2",
        "memory/pairs/t2_c1024",
        "merge/pairs_durable",
        "merge/pairs_memory",
        "reference/dashmap_insert/1",
        "reference/dashmap_insert/2",
    ] {
        if let Some(r) = rate(id) {
            let fps = common::frames_per_sync(id, SAMPLES)
                .map(|(f, _)| format!("  ({f:.1} records/fdatasync)"))
                .unwrap_or_default();
            println!("  {id:<28} {r:>12.0} /s{fps}");
            rows.push((id.to_owned(), r));
        }
    }
    let drift = DRIFT_REJECTED.load(std::sync::atomic::Ordering::Relaxed);
    if drift > 0 {
        println!("  note: {drift} merged mutations reported drift_rejected");
    }
    println!("-- targets");
    if let (Some(f), Some(r)) = (fallocate_median, rate("durable/pairs/1")) {
        let limit = 1e6 / (2.0 * f);
        let target = 0.8 * limit;
        println!(
            "  durable 1 caller     {r:>10.0} pairs/s vs 0.8 x 1/(2 x {f:.1} us) = {target:>8.0}  ratio to limit {:.2}  {}",
            r / limit,
            verdict(r >= target)
        );
    }
    if let Some(r) = rate("durable/pairs/1024") {
        println!(
            "  durable 1024 callers {r:>10.0} pairs/s vs 500000                       ratio {:.2}  {}",
            r / 500_000.0,
            verdict(r >= 500_000.0)
        );
    }
    for (name, threads, ..) in MEMORY {
        let id = format!("memory/pairs/{name}");
        let refid = format!("reference/dashmap_insert/{threads}");
        if let (Some(r), Some(d)) = (rate(&id), rate(&refid)) {
            println!(
                "  memory {name:<13} {r:>10.0} pairs/s vs 0.25 x dashmap/{threads} {d:>10.0} = {:>9.0}  ratio {:.3}  {}",
                0.25 * d,
                r / d,
                verdict(r >= 0.25 * d)
            );
        }
    }
    println!("==================================================================");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    println!(
        "bench dir: {} ({})",
        env!("CARGO_TARGET_TMPDIR"),
        common::fs_type(Path::new(env!("CARGO_TARGET_TMPDIR")))
    );
    append_fdatasync(&mut c);
    dashmap_insert(&mut c);
    durable(&mut c);
    memory(&mut c);
    merge(&mut c);
    c.final_summary();
    summary();
}
