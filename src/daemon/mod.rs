//! The region daemon (`idem serve`): config, wiring, metrics and signals around the store.
//!
//! Start-up binds the listener first, then rebuilds the index on a blocking thread while the
//! API answers 503 (`/readyz` says `recovering`). Once the store is open a dedicated flusher
//! thread group-commits the log and publishes the durable position; handlers await it. On
//! SIGTERM or ctrl-c the daemon stops accepting, lets requests in progress finish (bounded),
//! flushes the log, writes hint files for a fast next start, and exits.

pub mod config;
pub mod metrics;
pub(crate) mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::clock::wall_clock_ms;
use crate::durable::{DurablePublisher, Flusher};
use crate::http::auth::{Access, Tokens};
use crate::http::{self, ApiState, DaemonStore, RouterLimits};
use crate::store::storage::FsStorage;
use crate::store::Store;
use config::Config;
use metrics::Metrics;

/// How long a client may take to send a request's headers, and how long an idle keep-alive
/// connection is kept.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the housekeeping task runs (stability, hint files, garbage collection timer).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// How often hint files for newly sealed segments are written.
const HINTS_EVERY: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM or ctrl-c. `stdout` gets one line, `idem: listening on
/// <url>`, once the listener is bound (scripts and tests read the port from it).
pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let tls = config.http.tls.as_ref().map(tls::acceptor).transpose()?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("listening on {}", config.http.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("idem: listening on {scheme}://{addr}");
    tracing::info!(%addr, tls = tls.is_some(), region = %config.region, "listening");

    let (publisher, waiter) = DurablePublisher::new(Default::default());
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(ApiState::new(
        config.region,
        waiter,
        tokens(&config),
        metrics.clone(),
        config.http.metrics_need_token,
    ));
    let request_timeout = Duration::from_millis(config.limits.request_timeout_ms);
    let app = http::ApiService::new(
        state.clone(),
        RouterLimits {
            request_bytes_max: config.limits.request_bytes_max,
            request_timeout,
            concurrent_requests_max: config.limits.concurrent_requests_max,
        },
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(accept_loop(
        listener,
        tls,
        app,
        stop_rx,
        Accepting {
            connections_max: config.limits.connections_max,
            // Requests in progress may use their whole time limit before the daemon stops.
            drain: request_timeout + Duration::from_secs(1),
        },
    ));
    // One signal future for the daemon's whole life: a signal during recovery or during
    // serving is never lost between two registrations.
    let signal = shutdown_signal();
    tokio::pin!(signal);

    // Rebuild the index while the API answers 503.
    let started = Instant::now();
    let recovery = tokio::task::spawn_blocking({
        let config = config.clone();
        move || open_store(&config)
    });
    let store = tokio::select! {
        r = recovery => r.context("recovery thread")??,
        _ = &mut signal => {
            tracing::info!("signal during recovery: stopping (recovery starts over at the next start)");
            let _ = stop_tx.send(true);
            let _ = server.await;
            return Ok(());
        }
    };
    let store = Arc::new(store);
    {
        let metrics = metrics.clone();
        store.log().set_sync_observer(Box::new(move |d| {
            metrics.fsync_seconds.observe(d.as_secs_f64());
        }));
    }
    publisher.durable_to(store.log().durable_lsn());
    let flusher =
        Flusher::start(store.clone(), publisher.clone()).context("starting the flusher thread")?;
    state.set_store(store.clone());
    tracing::info!(
        keys = store.key_count(),
        recovery_ms = started.elapsed().as_millis() as u64,
        "index rebuilt; serving"
    );
    let (stop_housekeeping, housekeeping_stopped) = watch::channel(false);
    let housekeeping = tokio::spawn(housekeeping(
        store.clone(),
        Duration::from_millis(config.store.gc_interval_ms),
        housekeeping_stopped,
    ));

    (&mut signal).await;
    tracing::info!("shutting down: draining requests");
    state.set_draining();
    let _ = stop_tx.send(true);
    // Requests still running keep being flushed by the flusher while they drain.
    let _ = server.await;
    let _ = stop_housekeeping.send(true);
    let _ = housekeeping.await;
    let flushed = tokio::task::spawn_blocking({
        let store = store.clone();
        move || {
            flusher.stop();
            store.flush()
        }
    })
    .await
    .context("final flush")?;
    match flushed {
        Ok(lsn) => {
            // Answers still waiting (past the drain) see their writes durable.
            publisher.durable_to(lsn);
            let hints = tokio::task::spawn_blocking(move || store.write_hints())
                .await
                .context("writing hint files")?;
            match hints {
                Ok(hints) => tracing::info!(hints, "log flushed; stopped"),
                Err(e) => {
                    tracing::warn!(error = %e, "log flushed; writing hint files failed; stopped")
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "final flush failed"),
    }
    Ok(())
}

/// Opens the data directory and rebuilds the index.
fn open_store(config: &Config) -> anyhow::Result<DaemonStore> {
    let dir = &config.data_dir;
    let storage =
        FsStorage::open(dir).with_context(|| format!("opening data dir {}", dir.display()))?;
    Store::open(storage, config.store_config(), wall_clock_ms())
        .with_context(|| format!("recovering {}", dir.display()))
}

fn tokens(config: &Config) -> Tokens {
    let mut t = Tokens::default();
    for token in &config.operator.tokens {
        t.insert(token, Access::Operator);
    }
    for ns in &config.namespaces {
        for token in &ns.tokens {
            t.insert(token, Access::Namespace(ns.name.clone()));
        }
    }
    t
}

/// Periodic work: stability (a single region is its own quorum), hint files, garbage
/// collection.
async fn housekeeping(
    store: Arc<DaemonStore>,
    gc_every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_gc = Instant::now();
    let mut last_hints = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        store.advance_stability(&[]);
        let gc_due = last_gc.elapsed() >= gc_every;
        let hints_due = last_hints.elapsed() >= HINTS_EVERY;
        if !(gc_due || hints_due) {
            continue;
        }
        let s = store.clone();
        let done = tokio::task::spawn_blocking(move || {
            let gc = gc_due.then(|| s.collect_garbage(wall_clock_ms()));
            let hints = hints_due.then(|| s.write_hints());
            (gc, hints)
        })
        .await;
        if gc_due {
            last_gc = Instant::now();
        }
        if hints_due {
            last_hints = Instant::now();
        }
        match done {
            Ok((gc, hints)) => {
                if let Some(Err(e)) = gc {
                    tracing::warn!(error = %e, "garbage collection failed");
                }
                if let Some(Err(e)) = hints {
                    tracing::warn!(error = %e, "writing hint files failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "housekeeping task failed"),
        }
    }
}

/// How the accept loop bounds connections.
struct Accepting {
    /// Connections open at once; more wait in the kernel's backlog.
    connections_max: usize,
    /// How long shutdown waits for requests in progress.
    drain: Duration,
}

/// An HTTP/1.1 connection builder with header and idle timeouts (a slow or idle client holds
/// a connection at most this long between requests).
fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b
}

/// Accepts connections until told to stop, then waits (bounded) for open ones to finish.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: http::ApiService,
    mut stop: watch::Receiver<bool>,
    limits: Accepting,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = tls::accept(&listener) => accepted,
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = match tls {
                None => {
                    let conn = http1().serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let Some(stream) = tls::handshake(&acceptor, stream, peer).await else {
                        return;
                    };
                    let conn = http1().serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain) => {
            tracing::warn!("requests still running after the drain timeout; stopping anyway");
        }
    }
}

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
