//! Daemon restart time against key count, and resident memory per key.
//!
//! For each key count (default 1M and 10M; `IDEM_RESTART_KEYS=1000000,10000000`): fills a data
//! directory with that many completed keys (claim + complete, 100-byte outcomes) through the
//! library, then starts a real `idem serve` on it and times spawn-to-`/readyz` 200, first with
//! the hint files the daemon writes at shutdown, then with the hint files removed (the whole log
//! is replayed). Memory per key is the daemon's VmRSS when ready, minus an empty daemon's, over
//! the key count. Run: `cargo bench --bench restart`.

mod common;

use std::path::Path;
use std::time::Instant;

use common::daemon::{self, Daemon};
use idem::store::storage::{FsStorage, HINT_SUFFIX};
use idem::store::Store;

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn fill(data: &Path, n: u64) {
    std::fs::create_dir_all(data).expect("data dir");
    let store = Store::open(
        FsStorage::open(data).expect("storage"),
        common::config("bench"),
        common::now_ms(),
    )
    .expect("open");
    let mut rng = common::Rng::new(11);
    let body = common::outcome(&mut rng);
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1 << 20);
        let reqs = common::requests(&mut rng, k, 1);
        common::drive(&store, 1024, &reqs[0], &body);
        left -= k;
    }
    store.flush().expect("flush");
    store.write_hints().expect("hints");
    let bytes: u64 = store.log().segments().iter().map(|s| s.size).sum();
    println!(
        "  filled {n} keys in {:.1} s; log {:.0} MiB in {} segments",
        t.elapsed().as_secs_f64(),
        mib(bytes),
        store.log().segments().len()
    );
}

/// Starts a daemon on `dir`, returns (seconds to ready, VmRSS when ready, keys it reports).
fn timed_start(dir: &Path) -> (f64, u64, u64, Daemon) {
    let d = Daemon::spawn(dir, &daemon::config("bench", &dir.join("data")));
    let ready = d.wait_ready();
    let (rss, _) = d.rss();
    let keys = daemon::get(d.addr, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix("idem_keys "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    (ready.as_secs_f64(), rss, keys, d)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let counts: Vec<u64> = std::env::var("IDEM_RESTART_KEYS")
        .unwrap_or_else(|_| "1000000,10000000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let base = common::bench_dir();
    println!(
        "restart: daemon spawn to /readyz 200, data in {} ({})",
        base.path().display(),
        common::fs_type(base.path())
    );
    let empty = base.path().join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let (t0, rss0, _, d) = timed_start(&empty);
    d.stop();
    println!(
        "empty store: ready in {t0:.3} s, VmRSS {:.1} MiB",
        mib(rss0)
    );
    for n in counts {
        let dir = base.path().join(format!("keys-{n}"));
        println!("{n} keys:");
        fill(&dir.join("data"), n);
        let (t, rss, keys, d) = timed_start(&dir);
        assert_eq!(keys, n, "the daemon must hold every key");
        println!(
            "  restart with hint files: ready in {t:.2} s; VmRSS {:.0} MiB = {:.1} B/key over an empty daemon",
            mib(rss),
            (rss.saturating_sub(rss0)) as f64 / n as f64
        );
        d.stop();
        let mut removed = 0;
        for e in std::fs::read_dir(dir.join("data"))
            .expect("read dir")
            .flatten()
        {
            if e.file_name().to_string_lossy().ends_with(HINT_SUFFIX) {
                std::fs::remove_file(e.path()).expect("remove hint");
                removed += 1;
            }
        }
        let (t, rss, keys, d) = timed_start(&dir);
        assert_eq!(keys, n);
        println!(
            "  restart without hint files ({removed} removed, the log replayed): ready in {t:.2} s; VmRSS {:.0} MiB",
            mib(rss)
        );
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
