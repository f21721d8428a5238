//! Runs real `idem serve` processes for integration tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const PAYMENTS_TOKEN: &str = "payments-token-0123456789";
pub const ORDERS_TOKEN: &str = "orders-token-0123456789";
pub const OPERATOR_TOKEN: &str = "operator-token-0123456789";
/// Payments namespace: small outcomes, a short lease (takeover tests).
pub const LEASE_MS: u64 = 800;
pub const OUTCOME_MAX: usize = 4096;

/// A config for `region` with namespaces `payments` and `orders`; `extra` is appended.
pub fn config(region: &str, extra: &str) -> String {
    format!(
        r#"
region = "{region}"

[store]
max_drift_ms = 50

[operator]
tokens = ["{OPERATOR_TOKEN}"]

[[namespaces]]
name = "payments"
tokens = ["{PAYMENTS_TOKEN}"]
policy = {{ lease_ms = {LEASE_MS}, outcome_bytes_max = {OUTCOME_MAX} }}

[[namespaces]]
name = "orders"
tokens = ["{ORDERS_TOKEN}"]
{extra}
"#
    )
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// Starts a daemon on `dir` (which holds `idem.toml` and `data/`) and waits for the
    /// listening line; does not wait for readiness.
    pub fn spawn(dir: &Path, config_text: &str) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let config_path = dir.join("idem.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let stderr_path = dir.join(format!("stderr-{}.log", unique()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawning idem serve");
        let url = listening_url(&mut child, &stderr_path);
        Daemon {
            child,
            url,
            dir: dir.to_owned(),
            config_path,
            stderr_path,
        }
    }

    /// Starts a daemon and waits until it is ready.
    pub async fn start(dir: &Path, config_text: &str) -> Daemon {
        let d = Daemon::spawn(dir, config_text);
        d.wait_ready().await;
        d
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http().get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts on the same directory and config.
    pub async fn restart(&mut self) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        *self = Daemon::start(&self.dir, &text).await;
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        post(&format!("{}{path}", self.url), token, body).await
    }

    /// Claims `key` with an attempt token made from `attempt` (see [`tok`]).
    pub async fn claim(&self, key: &str, fingerprint: &str, attempt: &str) -> (u16, Value) {
        self.post(
            "/v1/ns/payments/claim",
            PAYMENTS_TOKEN,
            &json!({"principal": "acct_1", "key": key, "fingerprint": fingerprint, "attempt": tok(attempt)}),
        )
        .await
    }

    pub async fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn post(url: &str, token: &str, body: &Value) -> (u16, Value) {
    let r = http()
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("daemon answers");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An attempt token (32 hex digits) made from a short hex string.
pub fn tok(short: &str) -> String {
    format!("{short:0>32}")
}

/// A fingerprint of 64 hex digits made from `n`.
pub fn fp(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn listening_url(child: &mut Child, stderr: &Path) -> String {
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("idem: listening on ")
        .unwrap_or_else(|| {
            panic!(
                "no listening line: {line:?}; stderr: {}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            )
        })
        .to_owned()
}

/// An HTTP client for tests (the crate's reqwest has TLS without a process-wide provider;
/// tests install ring as that provider once).
pub fn http() -> reqwest::Client {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::new()
}

/// A temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("idem-it-")
        .tempdir()
        .unwrap()
}

/// A port with nothing listening on it (a stopped region).
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A proxy to `target` (`http://host:port`) that loses the answer to the first request: it
/// forwards the request, waits until the daemon has answered, and closes the client's
/// connection without passing the answer on. Later connections pass through.
pub async fn answer_losing_proxy(target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = target.strip_prefix("http://").unwrap().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            if !std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                continue;
            }
            tokio::spawn(async move {
                // Read one whole request: headers, then Content-Length bytes of body.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = client.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                server.write_all(&req).await.unwrap();
                // The daemon answered (and made its write durable first): lose the answer.
                let _ = server.read(&mut buf).await;
                drop(client);
            });
        }
    });
    format!("http://{addr}")
}

/// Writes `n` completed keys (`orders`, principal `p`, keys `key-0`...) into `dir/data`
/// through the library, with the store config `config_text` gives: a data directory whose
/// index takes a while to rebuild (no hint files are written).
pub fn fill_orders(dir: &Path, config_text: &str, n: u32) {
    let cfg = idem::daemon::config::Config::parse(&dir.join("idem.toml"), config_text).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store = idem::Store::open(
        idem::store::storage::FsStorage::open(&data).unwrap(),
        cfg.store_config(),
        idem::clock::wall_clock_ms(),
    )
    .unwrap();
    for i in 0..n {
        let req = idem::ClaimRequest {
            key: idem::RecordKey::new("orders", "p", format!("key-{i}")),
            fingerprint: idem::Fingerprint::of(&i.to_le_bytes()),
            attempt: idem::AttemptToken(u128::from(i)),
        };
        let now = idem::clock::wall_clock_ms();
        let pending = store.claim(now, &req).unwrap();
        let idem::Decision::Execute { claim, .. } = pending.peek().clone() else {
            panic!("{:?}", pending.peek());
        };
        let done = store
            .complete(now, &req.key, claim, idem::Outcome::new(200, "ok"))
            .unwrap();
        if i % 1000 == 999 {
            // Flushing now and then keeps the clock's reservation durable ahead of use.
            store.wait(done).unwrap();
        }
    }
    store.flush().unwrap();
}

/// An address where connections are never completed, like a region whose packets are
/// dropped: a listener with a full accept queue (the kernel then drops further SYNs). Keep the
/// returned guard alive while the address is used.
pub fn silent_url() -> (String, Vec<std::net::TcpStream>, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is fully initialised.
    let (fd, addr) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut got_len = len;
        libc::getsockname(fd, &mut got as *mut _ as *mut libc::sockaddr, &mut got_len);
        let port = u16::from_be(got.sin_port);
        (
            std::os::fd::OwnedFd::from_raw_fd(fd),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        )
    };
    // Fill the accept queue; connections beyond it hang in SYN-SENT.
    let mut held = Vec::new();
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    (format!("http://{addr}"), held, fd)
}

/// What a caller of an API behind the idempotency layer got: status, headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// POSTs a JSON `body` to `url`, with an `Idempotency-Key` if `key`, and `extra` headers.
pub async fn post_keyed(
    url: &str,
    key: Option<&str>,
    body: &str,
    extra: &[(&str, &str)],
) -> Answer {
    let mut r = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    for (n, v) in extra {
        r = r.header(*n, *v);
    }
    let r = r.send().await.unwrap();
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

/// Server-sent events that never end, one every 50 ms: `data: 0`, `data: 1`, ...
pub fn endless_events() -> axum::response::Response {
    endless("text/event-stream")
}

/// A body that never ends, `data: 0\n\n`, `data: 1\n\n`, ... every 50 ms, as `content_type`.
pub fn endless(content_type: &'static str) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let events = futures_util::stream::unfold(0u64, |i| async move {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(format!("data: {i}\n\n"))),
            i + 1,
        ))
    });
    (
        [("content-type", content_type)],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// POSTs with `headers` and returns the answer's first chunk, which must come within 5 s
/// (so a stream that never ends must be passed on as it runs, not buffered).
pub async fn first_chunk(url: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = http().post(url);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    let mut r = r.send().await.unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("the first events arrive while the stream runs")
        .unwrap()
        .unwrap()
        .to_vec()
}
