//! A fixed, single-threaded claim+complete workload for counting instructions, the one figure
//! on this shared VM that does not move from run to run (wall-clock figures spread by ±20–40%).
//!
//! ```text
//! cargo bench --bench instructions --no-run
//! B=$(ls -t target/release/deps/instructions-* | grep -v '\.d$' | head -1)
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p $B 20000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p $B 40000
//! ```
//!
//! The difference of the two totals (`Collected` in callgrind's summary) divided by the
//! difference in pairs is the instruction count of one pair, set-up excluded; `docs/perf.md`
//! records it. Without valgrind it prints the wall-clock time per pair. Same store as the
//! memory benches (`VolatileStorage`, library defaults), 1024 logical callers (or as many as a
//! second number says) on one thread,
//! keys and the clock derived from fixed seeds.

mod common;

use std::time::Instant;

use common::Rng;
use idem::store::storage::VolatileStorage;
use idem::store::Store;

fn main() {
    // `cargo bench` passes `--bench`; the first number sets the pairs, a second the callers.
    let numbers = common::numeric_args();
    let pairs = numbers.first().copied().unwrap_or(200_000);
    let callers = numbers.get(1).copied().unwrap_or(1024) as usize;
    let mut rng = Rng::new(7);
    let body = common::outcome(&mut rng);
    let reqs = common::requests(&mut rng, pairs, 1);
    let store = Store::open(
        VolatileStorage::new(),
        common::config("a"),
        common::now_ms(),
    )
    .expect("open store");
    let t = Instant::now();
    let done = common::drive(&store, callers, &reqs[0], &body);
    let elapsed = t.elapsed();
    assert_eq!(done, pairs);
    println!(
        "{pairs} pairs, {callers} callers on one thread, in memory: {:.0} ns per pair",
        elapsed.as_nanos() as f64 / pairs as f64
    );
}
