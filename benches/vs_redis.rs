//! idem against Redis on loopback: the same workload, one load generator, 50 connections, no
//! pipelining, random keys, 100-byte outcomes.
//!
//! One operation is a pair. idem: `claim` then `complete` over HTTP/1.1 keep-alive, each
//! acknowledged after fdatasync. Redis: `SET k v NX EX 86400` then `SET k outcome XX KEEPTTL`,
//! once with `appendfsync everysec` and once with `appendfsync always`. Prints pairs per
//! second, p50/p99 pair latency and the ratios against the targets (idem >= 1.0x Redis
//! everysec, >= 2x Redis always, p99 <= 2 ms).
//!
//! `cargo bench --bench vs_redis` installs `redis-server` (apt-get) if it is missing and starts
//! its own on a free port. Settings: `IDEM_VS_REDIS_SECS` (measured seconds per run, default
//! 10), `IDEM_VS_REDIS_CONNECTIONS` (default 50), `IDEM_VS_REDIS_ONLY=idem` (skip Redis, for
//! profiling the daemon).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, TOKEN};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const WARMUP: Duration = Duration::from_secs(2);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one run measured.
struct Run {
    name: String,
    pairs: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.pairs as f64 / self.secs
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn print(&self) {
        println!(
            "{:<28} {:>9.0} pairs/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} pairs in {:.1} s)",
            self.name,
            self.rate(),
            self.percentile(0.50),
            self.percentile(0.99),
            self.pairs,
            self.secs
        );
    }
}

/// Runs `connections` workers for warm-up plus `secs`; each worker loops `pair` on its own
/// connection. Pairs finished during the warm-up are not counted.
async fn measure<C, Fut>(name: &str, connections: usize, secs: u64, connect: C) -> Run
where
    C: Fn() -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = Box<dyn PairRunner>> + 'static,
{
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..connections {
        let connect = connect.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut runner = connect().await;
            let mut rng = common::Rng::new(0x5eed + w as u64);
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                runner.pair(&mut rng).await;
                if t >= measure_from && Instant::now() <= end {
                    lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            lat
        }));
    }
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.expect("worker"));
    }
    latencies_us.sort_unstable();
    Run {
        name: name.to_owned(),
        pairs: latencies_us.len() as u64,
        secs: secs as f64,
        latencies_us,
    }
}

/// One connection's pair loop.
trait PairRunner {
    fn pair<'a>(
        &'a mut self,
        rng: &'a mut common::Rng,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;
}

// ---------------------------------------------------------------------------------------------
// idem over HTTP/1.1
// ---------------------------------------------------------------------------------------------

struct IdemConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    outcome_body: String,
}

impl IdemConn {
    async fn connect(addr: SocketAddr) -> Box<dyn PairRunner> {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        // 100 bytes of JSON-safe text.
        let outcome_body = "x".repeat(common::OUTCOME_BYTES);
        Box::new(IdemConn {
            sender,
            outcome_body,
        })
    }

    async fn post(&mut self, path: &str, body: String) -> Bytes {
        let req = hyper::Request::post(path)
            .header("host", "idem")
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        self.sender.ready().await.expect("connection ready");
        let resp = self.sender.send_request(req).await.expect("answer");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        bytes
    }
}

impl PairRunner for IdemConn {
    fn pair<'a>(
        &'a mut self,
        rng: &'a mut common::Rng,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
        Box::pin(async move {
            let key = format!("{:032x}", rng.next_u128());
            let fp = format!("{:032x}{:032x}", rng.next_u128(), rng.next_u128());
            let attempt = format!("{:032x}", rng.next_u128());
            let answer = self
                .post(
                    "/v1/ns/bench/claim",
                    format!(r#"{{"principal":"p","key":"{key}","fingerprint":"{fp}","attempt":"{attempt}"}}"#),
                )
                .await;
            let text = std::str::from_utf8(&answer).expect("utf-8");
            assert!(text.contains(r#""decision":"execute""#), "{text}");
            let claim = text
                .split(r#""claim":""#)
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("claim id");
            let body = format!(
                r#"{{"principal":"p","key":"{key}","claim":"{claim}","outcome":{{"status":200,"body":"{}"}}}}"#,
                self.outcome_body
            );
            self.post("/v1/ns/bench/complete", body).await;
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

struct RedisConn {
    con: redis::aio::MultiplexedConnection,
    outcome: Vec<u8>,
}

impl RedisConn {
    async fn connect(addr: SocketAddr) -> Box<dyn PairRunner> {
        let client = redis::Client::open(format!("redis://{addr}/")).expect("redis url");
        let con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connect");
        Box::new(RedisConn {
            con,
            outcome: vec![b'x'; common::OUTCOME_BYTES],
        })
    }
}

impl PairRunner for RedisConn {
    fn pair<'a>(
        &'a mut self,
        rng: &'a mut common::Rng,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
        Box::pin(async move {
            let key = format!("{:032x}", rng.next_u128());
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg("in-flight")
                .arg("NX")
                .arg("EX")
                .arg(86_400)
                .query_async(&mut self.con)
                .await
                .expect("SET NX");
            assert_eq!(set.as_deref(), Some("OK"));
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&self.outcome[..])
                .arg("XX")
                .arg("KEEPTTL")
                .query_async(&mut self.con)
                .await
                .expect("SET XX");
            assert_eq!(set.as_deref(), Some("OK"));
        })
    }
}

/// `redis-server`, installed with apt-get when missing.
fn redis_server() -> String {
    let found = |p: &str| Command::new(p).arg("--version").output().is_ok();
    for p in [
        "redis-server",
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
    ] {
        if found(p) {
            return p.to_owned();
        }
    }
    println!("redis-server not found: installing it with apt-get");
    let root = unsafe { libc::geteuid() } == 0;
    let run = |args: &[&str]| {
        let mut c = if root {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg("-n").arg(args[0]);
            c
        };
        let status = c
            .args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("run apt-get");
        assert!(status.success(), "{args:?} failed");
    };
    run(&["apt-get", "update", "-qq"]);
    run(&["apt-get", "install", "-y", "-qq", "redis-server"]);
    assert!(found("redis-server"), "redis-server still missing");
    "redis-server".into()
}

struct Redis {
    child: Child,
    addr: SocketAddr,
}

impl Redis {
    fn start(bin: &str, dir: &Path, appendfsync: &str) -> Redis {
        let port = free_port();
        std::fs::create_dir_all(dir).expect("redis dir");
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", appendfsync])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, addr }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User plus system CPU seconds a process has used (/proc/<pid>/stat).
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are the 12th
    // and 13th of them.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs = env_u64("IDEM_VS_REDIS_SECS", 10);
    let connections = env_u64("IDEM_VS_REDIS_CONNECTIONS", 50) as usize;
    let only_idem = std::env::var("IDEM_VS_REDIS_ONLY").as_deref() == Ok("idem");
    let redis_bin = if only_idem {
        String::new()
    } else {
        redis_server()
    };
    let version = Command::new(&redis_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let dir = common::bench_dir();
    println!(
        "vs_redis: {connections} connections, no pipelining, random keys, {}-byte outcomes, {secs} s measured after {} s warm-up; data in {} ({}); {version}",
        common::OUTCOME_BYTES,
        WARMUP.as_secs(),
        dir.path().display(),
        common::fs_type(dir.path())
    );
    // One load generator: a single thread drives every connection.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();

    let mut runs = Vec::new();
    let modes: &[&str] = if only_idem {
        &[]
    } else {
        &["everysec", "always"]
    };
    for mode in modes {
        let redis = Redis::start(&redis_bin, &dir.path().join(format!("redis-{mode}")), mode);
        let addr = redis.addr;
        let run = local.block_on(
            &rt,
            measure(
                &format!("redis appendfsync {mode}"),
                connections,
                secs,
                move || RedisConn::connect(addr),
            ),
        );
        run.print();
        runs.push(run);
        drop(redis);
    }

    let idem_dir = dir.path().join("idem");
    std::fs::create_dir_all(&idem_dir).expect("idem dir");
    let daemon = Daemon::spawn(
        &idem_dir,
        &common::daemon::config("bench", &idem_dir.join("data")),
    );
    daemon.wait_ready();
    let addr = daemon.addr;
    let cpu_before = process_cpu_secs(daemon.child.id());
    let gen_before = process_cpu_secs(std::process::id());
    let run = local.block_on(
        &rt,
        measure("idem (fdatasync per ack)", connections, secs, move || {
            IdemConn::connect(addr)
        }),
    );
    run.print();
    let cpu = process_cpu_secs(daemon.child.id()) - cpu_before;
    let gen = process_cpu_secs(std::process::id()) - gen_before;
    println!(
        "load generator CPU: {:.2} cores",
        gen / (secs as f64 + WARMUP.as_secs_f64())
    );
    println!(
        "idem daemon CPU: {:.2} cores over the run ({:.1} us per pair, warm-up included)",
        cpu / (secs as f64 + WARMUP.as_secs_f64()),
        1e6 * cpu / (run.rate() * (secs as f64 + WARMUP.as_secs_f64()))
    );
    if let Some((_, metrics)) = common::daemon::get(daemon.addr, "/metrics") {
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let (syncs, sync_secs) = (
            value("idem_fsync_seconds_count "),
            value("idem_fsync_seconds_sum "),
        );
        let acks = value("idem_claims_total{decision=\"execute\"} ")
            + value("idem_finished_total{terminal=\"completed\"} ");
        println!(
            "idem: {syncs:.0} fdatasyncs (warm-up included), mean {:.2} ms, {:.1} acknowledgements per sync",
            1000.0 * sync_secs / syncs.max(1.0),
            acks / syncs.max(1.0)
        );
    }
    let (rss, _) = daemon.rss();
    println!(
        "idem daemon VmRSS after the run: {:.1} MiB",
        rss as f64 / (1 << 20) as f64
    );
    daemon.stop();

    if runs.len() < 2 {
        return;
    }
    let (everysec, always, idem) = (&runs[0], &runs[1], &run);
    let vs_everysec = idem.rate() / everysec.rate();
    let vs_always = idem.rate() / always.rate();
    let p99 = idem.percentile(0.99);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "idem / redis everysec: {vs_everysec:.2}x (target >= 1.0x: {})",
        verdict(vs_everysec >= 1.0)
    );
    println!(
        "idem / redis always:   {vs_always:.2}x (target >= 2.0x: {})",
        verdict(vs_always >= 2.0)
    );
    println!(
        "idem p99: {p99:.2} ms (target <= 2 ms: {})",
        verdict(p99 <= 2.0)
    );
}
