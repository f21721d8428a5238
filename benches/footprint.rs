//! Memory per key of the index, and restart time, for 1M keys on `FsStorage`
//! (`cargo bench --bench footprint`; `IDEM_FOOTPRINT_KEYS` changes the key count).
//!
//! Plain timing printouts, no criterion: each figure is one measurement of one process.

mod common;

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Rng;
use idem::record::KeyDigest;
use idem::store::index::IndexEntry;
use idem::store::storage::{FsStorage, SEGMENT_SUFFIX};
use idem::store::Store;

/// Requests generated (and dropped) per chunk, so the generator's memory stays small.
const CHUNK: u64 = 1 << 16;

fn open(dir: &Path) -> Store<FsStorage> {
    Store::open(
        FsStorage::open(dir).expect("fs storage"),
        common::config("a"),
        common::now_ms(),
    )
    .expect("open store")
}

fn timed_open(dir: &Path, n: u64) -> (Store<FsStorage>, Duration) {
    let t = Instant::now();
    let store = open(dir);
    let d = t.elapsed();
    assert_eq!(store.key_count() as u64, n);
    (store, d)
}

fn report(what: &str, store: &Store<FsStorage>, t: Duration) {
    let (hinted, decoded) = store.recovery_stats();
    println!(
        "restart (Store::open), {what}: {:.3} s ({hinted} segments from hints, {decoded} decoded)",
        t.as_secs_f64()
    );
}

/// Copies the segment files (not the hint files) and syncs them, so they can be evicted.
fn copy_segments(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(SEGMENT_SUFFIX) {
            let dst = to.join(&name);
            std::fs::copy(e.path(), &dst).expect("copy segment");
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .expect("sync copy");
        }
    }
}

fn mib(b: i64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Drops the page cache of every segment file (they are all synced), so the next open reads
/// from the disk.
fn evict(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let f = std::fs::File::open(e.path()).expect("open segment");
        // SAFETY: advisory syscall on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` and friends: nothing to list.
        return;
    }
    let n: u64 = std::env::var("IDEM_FOOTPRINT_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = common::bench_dir();
    println!(
        "footprint: {n} keys (claim + complete, 100-byte outcomes) on FsStorage in {} ({})",
        dir.path().display(),
        common::fs_type(dir.path())
    );
    println!(
        "index entry: {} B key digest + {} B IndexEntry = {} B per bucket (+1 control byte)",
        std::mem::size_of::<KeyDigest>(),
        std::mem::size_of::<IndexEntry>(),
        std::mem::size_of::<(KeyDigest, IndexEntry)>()
    );
    let mut rng = Rng::new(7);
    let body = common::outcome(&mut rng);

    let (heap0, rss0) = (common::heap_in_use(), common::vm_rss_bytes());
    let store = open(dir.path());
    let (heap1, rss1) = (common::heap_in_use(), common::vm_rss_bytes());
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        let reqs = common::requests(&mut rng, k, 1);
        common::drive(&store, 1024, &reqs[0], &body);
        left -= k;
    }
    let fill = t.elapsed();
    assert_eq!(store.key_count() as u64, n);
    let (heap2, rss2) = (common::heap_in_use(), common::vm_rss_bytes());
    let stats = store.log().stats();
    println!(
        "filled in {:.2} s ({:.0} pairs/s, 1 thread, 1024 callers); log: {:.1} MiB written in {} frames, {} fdatasyncs",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        mib(stats.bytes_written as i64),
        stats.frames_written,
        stats.syncs
    );
    println!(
        "empty store: heap {:+.1} MiB, RSS {:+.1} MiB",
        mib(heap1 as i64 - heap0 as i64),
        mib(rss1 as i64 - rss0 as i64)
    );
    println!(
        "after {n} keys: heap {:+.1} MiB = {:.1} B/key; VmRSS {:+.1} MiB = {:.1} B/key",
        mib(heap2 as i64 - heap1 as i64),
        (heap2 as f64 - heap1 as f64) / n as f64,
        mib(rss2 as i64 - rss1 as i64),
        (rss2 as f64 - rss1 as f64) / n as f64
    );
    drop(store);
    let heap3 = common::heap_in_use();

    // A copy of the log to restart from a cold page cache without hint files.
    let cold_dir = common::bench_dir();
    copy_segments(dir.path(), cold_dir.path());
    evict(cold_dir.path());

    let (store, t) = timed_open(dir.path(), n);
    let heap4 = common::heap_in_use();
    report("warm page cache, no hint files", &store, t);
    println!(
        "index after restart: heap {:+.1} MiB = {:.1} B/key",
        mib(heap4 as i64 - heap3 as i64),
        (heap4 as f64 - heap3 as f64) / n as f64
    );
    drop(store);
    let (store, t) = timed_open(dir.path(), n);
    report("warm page cache, hint files", &store, t);
    drop(store);
    evict(dir.path());
    let (store, t) = timed_open(dir.path(), n);
    report("cold page cache, hint files", &store, t);
    drop(store);
    let (store, t) = timed_open(cold_dir.path(), n);
    report("cold page cache, no hint files", &store, t);
    drop(store);
    println!(
        "VmRSS at the end: {:.1} MiB",
        mib(common::vm_rss_bytes() as i64)
    );
}
