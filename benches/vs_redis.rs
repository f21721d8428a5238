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
//! profiling the daemon), `IDEM_VS_REDIS_FLOOR=raw,raw-1,hyper,hyper-1` (also measure HTTP
//! servers that do no work: hand-parsed HTTP/1.1 or hyper, on a multi-thread runtime or on one
//! thread with `-1`; the ceiling any HTTP server reaches on this machine with this generator).
//!
//! The load generator speaks HTTP/1.1 by hand (one write per request, answers framed by
//! `Content-Length`) so that its CPU goes to the sockets rather than to a client library, as
//! the Redis client's does. Before the idem run, a probe times fdatasyncs of 4 KiB appends on
//! the same file system (the disk alone). The CPU each server and the generator used is
//! printed beside each run.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, TOKEN};

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

/// One keep-alive HTTP/1.1 connection driven by hand: the request is written in one call and
/// the answer read until its `Content-Length` is in, so the generator spends its CPU on the
/// sockets rather than on a client library (the daemon is what is measured).
struct IdemConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    req: Vec<u8>,
    outcome_body: String,
}

impl IdemConn {
    async fn connect(addr: SocketAddr) -> Box<dyn PairRunner> {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        // 100 bytes of JSON-safe text.
        let outcome_body = "x".repeat(common::OUTCOME_BYTES);
        Box::new(IdemConn {
            stream,
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(4096),
            outcome_body,
        })
    }

    /// POSTs `body` to `path`; returns the answer's body (asserting 200).
    async fn post(&mut self, path: &str, body: &str) -> &[u8] {
        use std::io::Write as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        self.req.clear();
        write!(
            self.req,
            "POST {path} HTTP/1.1\r\nhost: idem\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("format");
        self.stream.write_all(&self.req).await.expect("send");
        self.buf.clear();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf).expect("answer head") {
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .expect("content-length");
                let status = resp.code;
                if self.buf.len() >= head + len {
                    let answer = &self.buf[head..head + len];
                    assert_eq!(status, Some(200), "{}", String::from_utf8_lossy(answer));
                    return answer;
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            let n = self.stream.read_buf(&mut self.buf).await.expect("answer");
            assert!(n > 0, "daemon closed the connection");
        }
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
                    &format!(r#"{{"principal":"p","key":"{key}","fingerprint":"{fp}","attempt":"{attempt}"}}"#),
                )
                .await;
            let text = std::str::from_utf8(answer).expect("utf-8");
            assert!(text.contains(r#""decision":"execute""#), "{text}");
            let claim = text
                .split(r#""claim":""#)
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("claim id")
                .to_owned();
            let body = format!(
                r#"{{"principal":"p","key":"{key}","claim":"{claim}","outcome":{{"status":200,"body":"{}"}}}}"#,
                self.outcome_body
            );
            self.post("/v1/ns/bench/complete", &body).await;
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

// ---------------------------------------------------------------------------------------------
// Floor: an HTTP server that does no work
// ---------------------------------------------------------------------------------------------

/// The answers the floor server gives: a claim's shape, then an empty object.
const FLOOR_CLAIM: &str = r#"{"decision":"execute","claim":"00000000000000000000000000000001.0@bench","attempt":"0123456789abcdef0123456789abcdef"}"#;

/// Serves claim and complete answers without a store, with hand-parsed HTTP/1.1 (`raw`) or
/// hyper (`hyper`), on a multi-thread runtime: how fast any HTTP server on tokio can answer
/// this workload on this machine, with no store and no disk.
fn floor_serve(kind: &str) {
    let rt = if kind.ends_with("-1") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            stream.set_nodelay(true).expect("nodelay");
            if kind.starts_with("hyper") {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            use http_body_util::BodyExt as _;
                            let claim = req.uri().path().ends_with("/claim");
                            let _ = req.into_body().collect().await;
                            let body = if claim { FLOOR_CLAIM } else { "{}" };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from_static(
                                    body.as_bytes(),
                                )),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            } else {
                tokio::spawn(floor_raw_connection(stream));
            }
        }
    });
}

async fn floor_raw_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(1024);
    loop {
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let len: usize = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                        .unwrap_or(0);
                    let claim = req.path.is_some_and(|p| p.ends_with("/claim"));
                    (buf.len() >= head + len).then_some((head + len, claim))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return,
            }
        };
        if let Some((used, claim)) = parsed {
            buf.drain(..used);
            let body = if claim { FLOOR_CLAIM } else { "{}" };
            out.clear();
            out.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes(),
            );
            if stream.write_all(&out).await.is_err() {
                return;
            }
            continue;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8192);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The disk alone: appends of `bytes` each followed by fdatasync, on a file of zeros written
/// and synced beforehand (no extent conversion, no allocation), one after another for `secs`.
/// Prints the sync time's distribution: a bound under any store that acknowledges after
/// fdatasync on this disk.
fn disk_probe(dir: &Path, bytes: usize, secs: u64) {
    use std::io::{Seek as _, Write as _};
    use std::os::unix::io::AsRawFd as _;
    let path = dir.join("disk-probe");
    let size = 256usize << 20;
    let mut file = std::fs::File::create(&path).expect("probe file");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(size >> 20) {
        file.write_all(&zeros).expect("zero-fill");
    }
    file.sync_all().expect("sync zero-fill");
    file.seek(std::io::SeekFrom::Start(0)).expect("seek");
    let chunk = vec![b'x'; bytes];
    let mut times_us = Vec::new();
    let (start, mut written) = (Instant::now(), 0usize);
    while start.elapsed() < Duration::from_secs(secs) && written + bytes <= size {
        file.write_all(&chunk).expect("append");
        written += bytes;
        let t = Instant::now();
        // SAFETY: fdatasync on an open file descriptor.
        assert_eq!(unsafe { libc::fdatasync(file.as_raw_fd()) }, 0, "fdatasync");
        times_us.push(t.elapsed().as_micros() as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    times_us.sort_unstable();
    let n = times_us.len().max(1);
    let pct = |p: f64| times_us[((times_us.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    let over = |us: u64| 100.0 * times_us.iter().filter(|&&t| t > us).count() as f64 / n as f64;
    println!(
        "disk alone: {} fdatasyncs of {bytes}-byte appends, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; over 0.8 ms: {:.2}%, over 1.6 ms: {:.2}%",
        times_us.len(),
        pct(0.5),
        pct(0.99),
        pct(0.999),
        over(800),
        over(1600)
    );
}

/// Starts this bench binary again as a floor server; returns it and its address.
fn spawn_floor(kind: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("IDEM_VS_REDIS_FLOOR_SERVE", kind)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn floor server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("floor address");
    (child, line.trim().parse().expect("floor address"))
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

/// Measures one server (process `pid`) and prints the run with the CPU it and the generator
/// used.
fn measure_server<C, Fut>(
    (local, rt): (&tokio::task::LocalSet, &tokio::runtime::Runtime),
    (name, server_name): (&str, &str),
    pid: u32,
    (connections, secs): (usize, u64),
    connect: C,
) -> Run
where
    C: Fn() -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = Box<dyn PairRunner>> + 'static,
{
    let cpu = CpuWatch::start(pid);
    let run = local.block_on(rt, measure(name, connections, secs, connect));
    run.print();
    cpu.print(server_name, &run, secs);
    run
}

/// CPU used by a server process and by this process (the load generator) over a run.
struct CpuWatch {
    server: u32,
    server_before: f64,
    generator_before: f64,
}

impl CpuWatch {
    fn start(server: u32) -> Self {
        Self {
            server,
            server_before: process_cpu_secs(server),
            generator_before: process_cpu_secs(std::process::id()),
        }
    }

    /// Prints both, in cores over the run (warm-up included) and server µs per pair.
    fn print(&self, server_name: &str, run: &Run, secs: u64) {
        let total = secs as f64 + WARMUP.as_secs_f64();
        let server = process_cpu_secs(self.server) - self.server_before;
        let generator = process_cpu_secs(std::process::id()) - self.generator_before;
        println!(
            "  {server_name} CPU {:.2} cores ({:.1} us per pair), load generator CPU {:.2} cores",
            server / total,
            1e6 * server / (run.rate() * total),
            generator / total,
        );
    }
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
    if let Ok(kind) = std::env::var("IDEM_VS_REDIS_FLOOR_SERVE") {
        floor_serve(&kind);
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
        let run = measure_server(
            (&local, &rt),
            (&format!("redis appendfsync {mode}"), "redis-server"),
            redis.child.id(),
            (connections, secs),
            move || RedisConn::connect(addr),
        );
        runs.push(run);
        drop(redis);
    }

    // The floor: what an HTTP server that does no work reaches here (`IDEM_VS_REDIS_FLOOR=raw,hyper`).
    for kind in std::env::var("IDEM_VS_REDIS_FLOOR")
        .unwrap_or_default()
        .split(',')
        .filter(|k| !k.is_empty())
    {
        let (mut child, addr) = spawn_floor(kind);
        measure_server(
            (&local, &rt),
            (&format!("floor: {kind} HTTP, no work"), "server"),
            child.id(),
            (connections, secs),
            move || IdemConn::connect(addr),
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    // Appends the size of a typical group commit in the idem run (~8 pairs' records).
    disk_probe(dir.path(), 4096, 5);

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
        // The histogram's buckets double from 50 us: 0.8 ms and 1.6 ms are bucket bounds.
        let over = |le: &str| {
            100.0 * (syncs - value(&format!("idem_fsync_seconds_bucket{{le=\"{le}\"}} ")))
                / syncs.max(1.0)
        };
        println!(
            "idem: fdatasyncs over 0.8 ms: {:.2}%, over 1.6 ms: {:.2}%, over 3.2 ms: {:.2}%",
            over("0.0008"),
            over("0.0016"),
            over("0.0032")
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
