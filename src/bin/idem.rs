//! The `idem` command line: `serve` runs a region's daemon, `init` writes a starter config,
//! `demo` walks through what a region guarantees, `inspect` reports what a data directory
//! holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use idem::clock::{wall_clock_ms, RegionId};
use idem::record::{AttemptToken, ClaimStatus, Fingerprint, Outcome, RecordKey};
use idem::store::storage::FsStorage;
use idem::store::{ClaimRequest, Decision, Store, StoreConfig};

#[derive(Parser)]
#[command(name = "idem", version, about = "Multi-region idempotency-key store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run this region's daemon: the store API over HTTP. Without --config, a development
    /// store on 127.0.0.1:7070 with data under ./idem-data.
    Serve {
        /// The config file (TOML; see docs/operations.md).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen here instead (e.g. 127.0.0.1:0 for any free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Keep data here instead.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Put the idempotency layer in front of any HTTP API as a reverse proxy (a sidecar):
    /// POST and PATCH requests with an Idempotency-Key run once, retries get the stored
    /// response. Keys are kept in an embedded store under --data-dir.
    Proxy(Box<ProxyArgs>),
    /// Print a starter config with fresh random tokens.
    Init {
        /// The region id.
        #[arg(long)]
        region: String,
        /// Namespaces to create (repeatable).
        #[arg(long = "namespace", default_value = "default")]
        namespaces: Vec<String>,
    },
    /// Walk through a region's guarantees on a real data directory: one execution among
    /// concurrent identical requests, replays, mismatches, recovery after restart, takeover of
    /// an expired lease, and a partition between two regions flagged for compensation.
    Demo {
        /// Where to keep the demo's data (default: a temporary directory, removed afterwards).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Report what a region's data directory holds: keys, claims by status, compensation items.
    Inspect {
        /// The region's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The region id the directory belongs to.
        #[arg(long)]
        region: String,
    },
}

/// `idem proxy`'s flags.
#[derive(clap::Args)]
struct ProxyArgs {
    /// Listen here (e.g. 127.0.0.1:8080; 127.0.0.1:0 for any free port).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The API behind the proxy, e.g. http://127.0.0.1:3000.
    #[arg(long)]
    upstream: String,
    /// Keep keys in an embedded store here (default ./idem-proxy-data). Only this proxy
    /// process deduplicates with it.
    #[arg(long, conflicts_with = "store")]
    data_dir: Option<PathBuf>,
    /// Keep keys in a region daemon shared by every replica of the API: REGION=URL, e.g.
    /// eu1=https://idem.eu1.internal:7070 (repeat for other regions, for failover).
    #[arg(long)]
    store: Vec<String>,
    /// The daemon's namespace for this API.
    #[arg(long, default_value = "default", requires = "store")]
    store_namespace: String,
    /// The namespace's token (default: the IDEM_STORE_TOKEN environment variable, which
    /// keeps it out of process listings).
    #[arg(long, requires = "store")]
    store_token: Option<String>,
    /// Take the principal (whose keys these are) from this request header; without it
    /// every request has one principal.
    #[arg(long)]
    principal_header: Option<String>,
    /// Peers (CIDR) whose principal header is believed; from others it is stripped.
    /// Repeatable. Default: loopback only.
    #[arg(long = "trusted-peer")]
    trusted_peers: Vec<String>,
    /// Require a key on POST and PATCH under this path prefix (400 without). Repeatable.
    #[arg(long = "require-key")]
    require_key: Vec<String>,
    /// Wait up to this many ms for a request in flight instead of answering 409.
    #[arg(long)]
    wait_ms: Option<u64>,
    /// How long the upstream may take to begin its answer (and to pause within it) before
    /// 504, which is stored as indeterminate.
    #[arg(long, default_value_t = 60_000)]
    upstream_timeout_ms: u64,
    /// Decide and report (logs, metrics) what the proxy would do, but never block a
    /// request.
    #[arg(long)]
    shadow: bool,
    /// What is stored on a route, by status, instead of the default (2xx stored; 502 and
    /// 504 indeterminate; others release the key): "[METHOD] PREFIX store=RANGES
    /// [indeterminate=RANGES]", e.g. "POST /charges store=200-299,402
    /// indeterminate=500-599". The most specific rule decides. Repeatable.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Status of the answer to a key reused with another request.
    #[arg(long, default_value_t = 422)]
    mismatch_status: u16,
    /// Body of that answer, from this file, instead of problem+json; {key}, {claim} and
    /// {status} in it are filled in.
    #[arg(long)]
    mismatch_body: Option<PathBuf>,
    /// Content-Type of --mismatch-body.
    #[arg(long, default_value = "application/json", requires = "mismatch_body")]
    mismatch_content_type: String,
    /// Serve the proxy's metrics (what it decided, or in shadow mode would have decided)
    /// at GET /metrics on this address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// An answer whose body is still going this many ms after its head is passed on as a
    /// stream, unrecorded (the key is released).
    #[arg(long, default_value_t = 10_000)]
    stream_after_ms: u64,
    /// Connections served at once; more wait until one closes.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections_max: u32,
    /// Replay this response header too (repeatable; besides Content-Type, Location, ETag).
    /// Set-Cookie, Date, rate-limit and CORS headers are never replayed.
    #[arg(long = "replay-header")]
    replay_headers: Vec<String>,
    /// Let clients upgrade GET requests to this protocol (repeatable; default websocket). h2c
    /// is always refused.
    #[arg(long = "allow-upgrade")]
    allow_upgrade: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate from one of these CAs (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Take the principal from the client certificate: "uri:" and its first URI name (a SPIFFE
    /// id), else "dns:" and its first non-wildcard DNS name. Needs --tls-client-ca; not with
    /// --principal-header.
    #[arg(long, requires = "tls_client_ca", conflicts_with = "principal_header")]
    principal_from_cert: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse().command) {
        // One line with the chain of causes; no backtrace: errors here are the user's to fix.
        eprintln!("idem: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir),
        Command::Proxy(args) => {
            let ProxyArgs {
                listen,
                upstream,
                data_dir,
                store,
                store_namespace,
                store_token,
                principal_header,
                trusted_peers,
                require_key,
                wait_ms,
                upstream_timeout_ms,
                shadow,
                routes,
                mismatch_status,
                mismatch_body,
                mismatch_content_type,
                metrics_listen,
                tls_cert,
                tls_key,
                tls_client_ca,
                principal_from_cert,
                stream_after_ms,
                allow_upgrade,
                replay_headers,
                connections_max,
            } = *args;
            use idem::face::proxy::{self, ProxyConfig};
            let upstream: reqwest::Url = upstream
                .parse()
                .with_context(|| format!("--upstream {upstream:?} is not a URL"))?;
            if !matches!(upstream.scheme(), "http" | "https") {
                anyhow::bail!("--upstream must be an http or https URL, not {upstream}");
            }
            let store = if store.is_empty() {
                proxy::ProxyStore::Embedded(
                    data_dir.unwrap_or_else(|| PathBuf::from("idem-proxy-data")),
                )
            } else {
                let endpoints = store
                    .iter()
                    .map(|s| {
                        let (region, url) = s.split_once('=').with_context(|| {
                            format!("--store {s:?}: expected REGION=URL, e.g. eu1=http://127.0.0.1:7070")
                        })?;
                        idem::client::Endpoint::new(region, url)
                            .with_context(|| format!("--store {s:?}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let token = match store_token {
                    Some(t) => t,
                    None => std::env::var("IDEM_STORE_TOKEN").context(
                        "--store needs the namespace's token: --store-token or IDEM_STORE_TOKEN",
                    )?,
                };
                proxy::ProxyStore::Remote {
                    endpoints,
                    namespace: store_namespace,
                    token,
                }
            };
            let embedded = matches!(store, proxy::ProxyStore::Embedded(_));
            let mut config = ProxyConfig::new(listen, upstream, store);
            config.principal_header = principal_header
                .map(|h| {
                    h.parse::<axum::http::HeaderName>()
                        .with_context(|| format!("--principal-header {h:?} is not a header name"))
                })
                .transpose()?;
            if !trusted_peers.is_empty() {
                config.trusted = trusted_peers
                    .iter()
                    .map(|n| {
                        n.parse()
                            .with_context(|| format!("--trusted-peer {n:?} is not a CIDR network"))
                    })
                    .collect::<Result<_>>()?;
            }
            config.required = require_key;
            config.in_flight_wait = wait_ms.map(std::time::Duration::from_millis);
            config.upstream_timeout = std::time::Duration::from_millis(upstream_timeout_ms);
            config.shadow = shadow;
            config.routes = routes
                .iter()
                .map(|r| {
                    idem::face::RoutePolicy::parse(r).with_context(|| format!("--route {r:?}"))
                })
                .collect::<Result<_>>()?;
            config.mismatch_status = axum::http::StatusCode::from_u16(mismatch_status)
                .ok()
                .filter(|s| (400..=599).contains(&s.as_u16()))
                .with_context(|| {
                    format!("--mismatch-status {mismatch_status}: an error status (400 to 599)")
                })?;
            if let Some(path) = mismatch_body {
                let body = std::fs::read_to_string(&path)
                    .with_context(|| format!("--mismatch-body {}", path.display()))?;
                let content_type = mismatch_content_type.parse().with_context(|| {
                    format!("--mismatch-content-type {mismatch_content_type:?}")
                })?;
                config.mismatch_body = Some(idem::face::AnswerTemplate { content_type, body });
            }
            config.metrics_listen = metrics_listen;
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                config.tls = Some(idem::face::listener::TlsFiles {
                    cert,
                    key,
                    client_ca: tls_client_ca,
                });
            }
            config.principal_from_cert = principal_from_cert;
            config.stream_after = std::time::Duration::from_millis(stream_after_ms);
            if let Some(p) = allow_upgrade.iter().find(|p| {
                idem::face::upgrade::NEVER_UPGRADED
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(p))
            }) {
                bail!("--allow-upgrade {p}: an HTTP/2 upgrade would let requests bypass the proxy's checks");
            }
            if !allow_upgrade.is_empty() {
                config.upgrades = allow_upgrade;
            }
            for h in &replay_headers {
                h.parse::<axum::http::HeaderName>()
                    .with_context(|| format!("--replay-header {h:?} is not a header name"))?;
            }
            config.replay_headers = replay_headers;
            config.connections_max = connections_max as usize;
            init_logging(&Default::default());
            if let (true, proxy::ProxyStore::Embedded(dir)) = (embedded, &config.store) {
                tracing::warn!(
                    data_dir = %dir.display(),
                    "EMBEDDED STORE: only this one proxy process deduplicates. Replicas of the \
                     API behind other proxies do not see these keys: run one proxy per API, or \
                     share a region daemon (`idem serve`, then --store REGION=URL)"
                );
            }
            if shadow {
                tracing::warn!("shadow mode: every request runs; the proxy only reports what it would have done");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(proxy::run(config, idem::daemon::shutdown_signal()))
        }
        Command::Init { region, namespaces } => {
            print!("{}", init_config(&region, &namespaces)?);
            Ok(())
        }
        Command::Demo { data_dir } => match data_dir {
            Some(dir) => demo(&dir),
            None => {
                let tmp = tempdir()?;
                let r = demo(&tmp);
                let _ = std::fs::remove_dir_all(&tmp);
                r
            }
        },
        Command::Inspect { data_dir, region } => inspect(&data_dir, &region),
    }
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("idem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn open(dir: &Path, region: &str, now_ms: u64) -> Result<Store<FsStorage>> {
    let dir = dir.join(region);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let storage = FsStorage::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let config = StoreConfig::new(RegionId::new(region)?, &["payments"]);
    Store::open(storage, config, now_ms).with_context(|| format!("recovering {}", dir.display()))
}

fn charge(key: &str, amount: u32, attempt: u128) -> ClaimRequest {
    ClaimRequest {
        key: RecordKey::new("payments", "acct_42", key),
        fingerprint: Fingerprint::of(format!("POST /charges {{\"amount\":{amount}}}").as_bytes()),
        attempt: AttemptToken(attempt),
    }
}

fn step(n: u32, text: &str) {
    println!("\n{n}. {text}");
}

fn demo(dir: &Path) -> Result<()> {
    println!("idem demo: data in {}", dir.display());
    let eu1 = Arc::new(open(dir, "eu1", wall_clock_ms())?);

    step(1, "16 clients send the same charge at the same moment");
    let barrier = Arc::new(Barrier::new(16));
    let answers: Vec<Decision> = (0..16u128)
        .map(|i| {
            let (store, barrier) = (eu1.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<Decision> {
                barrier.wait();
                Ok(store.wait(store.claim(wall_clock_ms(), &charge("order-7", 10, i))?)?)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
        })
        .collect::<Result<_>>()?;
    let executes: Vec<_> = answers
        .iter()
        .filter_map(|d| match d {
            Decision::Execute { claim, .. } => Some(*claim),
            _ => None,
        })
        .collect();
    let in_flight = answers
        .iter()
        .filter(|d| matches!(d, Decision::InFlight { .. }))
        .count();
    println!(
        "   -> {} Execute, {in_flight} InFlight (retry later)",
        executes.len()
    );
    let [claim] = executes[..] else {
        bail!("expected exactly one Execute, got {}", executes.len());
    };

    step(
        2,
        "the owner charges the card and stores the response; a client retries",
    );
    let response = Outcome::new(201, r#"{"id":"ch_1","amount":10}"#);
    let key = charge("order-7", 10, 0).key;
    eu1.wait(eu1.complete(wall_clock_ms(), &key, claim, response.clone())?)?;
    match eu1.wait(eu1.claim(wall_clock_ms(), &charge("order-7", 10, 100))?)? {
        Decision::Replay { outcome, .. } => {
            println!("   -> Replay: {} {}", outcome.status, body_text(&outcome));
        }
        other => bail!("expected a replay, got {other:?}"),
    }

    step(3, "a client reuses the key for a different charge");
    let d = eu1.wait(eu1.claim(wall_clock_ms(), &charge("order-7", 99, 101))?)?;
    println!("   -> {}", summary(&d));

    step(4, "the region restarts: the index is rebuilt from its log");
    drop(answers);
    let eu1 = match Arc::try_unwrap(eu1) {
        Ok(s) => s,
        Err(_) => bail!("store still shared"),
    };
    drop(eu1);
    let started = Instant::now();
    let eu1 = open(dir, "eu1", wall_clock_ms())?;
    println!(
        "   -> recovered {} key(s) in {:?}",
        eu1.key_count(),
        started.elapsed()
    );
    let d = eu1.wait(eu1.claim(wall_clock_ms(), &charge("order-7", 10, 102))?)?;
    println!("   -> the retry after restart: {}", summary(&d));
    let d = eu1.wait(eu1.claim(wall_clock_ms(), &charge("order-10", 10, 1))?)?;
    println!("   -> a new key at once: {}", summary(&d));
    let waited = wait_for_clock(&eu1);
    println!(
        "   -> new claims resume once the wall clock passes the recovered reservation ({waited:?}),"
    );
    println!("      so no stamp issued before the restart can be issued again");

    step(
        5,
        "a partition: us1 cannot reach eu1 and executes order-8 too",
    );
    let now = wall_clock_ms();
    let us1 = open(dir, "us1", now)?;
    let a = execute(&eu1, now, &charge("order-8", 25, 1))?;
    let b = execute(&us1, now + 5, &charge("order-8", 25, 2))?;
    let key8 = charge("order-8", 25, 0).key;
    eu1.wait(eu1.complete(now + 10, &key8, a, Outcome::new(201, r#"{"id":"ch_eu"}"#))?)?;
    us1.wait(us1.complete(now + 12, &key8, b, Outcome::new(201, r#"{"id":"ch_us"}"#))?)?;
    println!("   -> eu1 ran claim {a}, us1 ran claim {b}: the card was charged twice");

    step(6, "the partition heals: the regions exchange their logs");
    let (eu_region, us_region) = (eu1.region(), us1.region());
    for m in eu1.log_from(now + 20, eu_region, 1, 10_000)? {
        us1.wait(us1.merge_remote(now + 20, m)?)?;
    }
    for m in us1.log_from(now + 20, us_region, 1, 10_000)? {
        eu1.wait(eu1.merge_remote(now + 20, m)?)?;
    }
    for store in [&eu1, &us1] {
        let d = store.wait(store.claim(now + 30, &charge("order-8", 25, 3))?)?;
        println!("   -> {}: {}", store.region(), summary(&d));
    }
    for (k, item) in us1.all_items(now + 30)? {
        println!(
            "   -> item {} on {:?}: {:?} of claim {} (winner {}), to compensate once stable",
            item.id,
            k,
            item.kind,
            item.claim,
            item.winner.map(|w| w.to_string()).unwrap_or_default()
        );
    }

    step(
        7,
        "a client crashes mid-request; after its lease runs out another takes over",
    );
    let slow = execute(&eu1, now + 40, &charge("order-9", 5, 1))?;
    let lease_and_drift = 30_000 + 500;
    let d = eu1.wait(eu1.claim(now + 1_000, &charge("order-9", 5, 2))?)?;
    println!("   -> while the lease runs: {}", summary(&d));
    let d = eu1.wait(eu1.claim(now + 40 + lease_and_drift + 1, &charge("order-9", 5, 2))?)?;
    println!("   -> after it ran out: {}", summary(&d));
    if let Decision::Execute { took_over, .. } = d {
        if took_over != [slow] {
            bail!("expected a takeover of {slow}");
        }
    }
    println!("\ndone.");
    Ok(())
}

/// Sleeps until the store's restart fence is behind the wall clock; returns how long it took.
fn wait_for_clock(store: &Store<FsStorage>) -> std::time::Duration {
    let started = Instant::now();
    while wall_clock_ms() <= store.clock().restart_fence_ms() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    started.elapsed()
}

fn execute(store: &Store<FsStorage>, now: u64, req: &ClaimRequest) -> Result<idem::Stamp> {
    match store.wait(store.claim(now, req)?)? {
        Decision::Execute { claim, .. } => Ok(claim),
        other => bail!("expected Execute, got {other:?}"),
    }
}

fn body_text(o: &Outcome) -> String {
    match &o.body {
        idem::record::Body::Full(b) | idem::record::Body::Redacted(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        idem::record::Body::Digest { len, .. } => format!("<{len} bytes, digest only>"),
    }
}

fn summary(d: &Decision) -> String {
    match d {
        Decision::Execute {
            claim, took_over, ..
        } => match took_over.as_slice() {
            [] => format!("Execute as {claim}"),
            taken => format!("Execute as {claim}, taking over {taken:?}"),
        },
        Decision::Replay { claim, outcome, .. } => {
            format!(
                "Replay of {claim}: {} {}",
                outcome.status,
                body_text(outcome)
            )
        }
        Decision::InFlight {
            region,
            lease_expires_at_ms,
            ..
        } => format!("InFlight in {region}, lease until {lease_expires_at_ms}"),
        Decision::Mismatch { claim } => format!("Mismatch: the key belongs to {claim}"),
        Decision::Unavailable { reason, .. } => format!("Unavailable: {reason}"),
    }
}

fn inspect(dir: &Path, region: &str) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let storage = FsStorage::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let started = Instant::now();
    let store = Store::open(
        storage,
        StoreConfig::new(RegionId::new(region)?, &[]),
        wall_clock_ms(),
    )
    .with_context(|| format!("recovering {}", dir.display()))?;
    println!(
        "region {region}: {} keys, recovered in {:?}",
        store.key_count(),
        started.elapsed()
    );
    let mut by_status = std::collections::BTreeMap::<String, u64>::new();
    let mut after = None;
    loop {
        let chunk = store.wait(store.snapshot_chunk(after, 4096)?)?;
        for (_, _, record) in &chunk.records {
            for (_, c) in record.claims() {
                let s: ClaimStatus = c.status();
                *by_status.entry(format!("{s:?}")).or_default() += 1;
            }
        }
        match chunk.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    for (status, n) in by_status {
        println!("  claims {status}: {n}");
    }
    let items = store.all_items(wall_clock_ms())?;
    println!("  compensation items: {}", items.len());
    for (k, item) in items {
        println!(
            "    {} {:?} {:?} claim {}",
            item.id, k, item.kind, item.claim
        );
    }
    for (origin, mark) in store.marks() {
        println!("  log of {origin}: held up to seq {mark}");
    }
    Ok(())
}

fn serve(
    config_path: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    use idem::daemon::config::{self, Config};
    let mut config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::development(),
    };
    if let Some(l) = listen {
        config.http.listen = l;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    init_logging(&config.log);
    if config_path.is_none() && !config.http.listen.ip().is_loopback() {
        bail!(
            "without --config the development store listens on loopback only (its tokens are public); {} is not a loopback address: write a config (`idem init`)",
            config.http.listen
        );
    }
    if config_path.is_none() {
        tracing::warn!(
            region = config::DEV_REGION,
            data_dir = %config.data_dir.display(),
            listen = %config.http.listen,
            namespace = config::DEV_NAMESPACE,
            token = config::DEV_TOKEN,
            operator_token = config::DEV_OPERATOR_TOKEN,
            "no --config: development store (well-known tokens; for production write a config, see `idem init`)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = runtime.block_on(idem::daemon::serve(config));
    // A recovery interrupted by a signal is still running on a blocking thread: do not wait
    // for it (it starts over at the next start).
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    served
}

fn init_logging(log: &idem::daemon::config::LogSection) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        idem::daemon::config::LogFormat::Json => builder.json().init(),
        idem::daemon::config::LogFormat::Text => builder.init(),
    }
}

/// A starter config: the region, a data dir, loopback, fresh random tokens.
fn init_config(region: &str, namespaces: &[String]) -> Result<String> {
    use rand::RngCore;
    RegionId::new(region).with_context(|| format!("--region {region:?}"))?;
    let token = || {
        let mut b = [0u8; 24];
        rand::rng().fill_bytes(&mut b);
        idem::http::api::hex(&b)
    };
    let mut out = format!(
        "# idem config for region {region}: every field and its default is in docs/operations.md.\n\
         # Keep this file private (chmod 600): it holds bearer tokens.\n\
         region = \"{region}\"\n\
         data_dir = \"idem-data\"\n\n\
         [http]\n\
         listen = \"127.0.0.1:7070\"\n\
         # tls = {{ cert = \"server.pem\", key = \"server.key\" }}\n\n\
         [operator]\n\
         tokens = [\"{}\"]\n",
        token()
    );
    for ns in namespaces {
        out.push_str(&format!(
            "\n[[namespaces]]\nname = \"{ns}\"\ntokens = [\"{}\"]\n\
             # policy = {{ ttl_ms = 86400000, lease_ms = 30000, indeterminate_statuses = [{{ from = 500, to = 599 }}] }}\n",
            token()
        ));
    }
    // What `init` prints must load.
    idem::daemon::config::Config::parse(Path::new("<init>"), &out)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(out)
}
