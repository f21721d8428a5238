//! Durable answers for async callers: a dedicated flusher thread group-commits a store's log
//! and publishes how far it is durable; an async caller appends (the store's calls never sync),
//! then awaits that position. One fdatasync serves every request appended before it, and no
//! async worker ever blocks in a sync.
//!
//! The daemon and the HTTP face's embedded store share this. A failed sync is never retried:
//! the log is poisoned, the flusher publishes `failed`, and every waiter hears so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::log::Lsn;
use crate::store::storage::Storage;
use crate::store::{Pending, Store};

/// How far the log is durable, published by the flusher thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    /// Everything up to here is on disk.
    pub lsn: Lsn,
    /// The log failed: nothing will become durable again.
    pub failed: bool,
}

/// Why an answer could not be given out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    /// A sync failed before the answer's write was covered: it is not on disk and never will
    /// be from this process.
    #[error("the log failed before this write was durable")]
    LogFailed,
    /// The flusher stopped (shutdown) before publishing the answer's write: it may yet be
    /// durable, so this is not an answer about the key.
    #[error("stopped before this write was known to be durable")]
    Stopped,
}

/// Waits for durable positions; cheap to clone.
#[derive(Debug, Clone)]
pub struct DurableWaiter {
    rx: watch::Receiver<Durable>,
}

impl DurableWaiter {
    /// Waits until `pending` is durable, then gives out its answer. Durable means covered by a
    /// successful sync, even if a later one failed.
    pub async fn wait<T>(&self, pending: Pending<T>) -> Result<T, NotDurable> {
        let lsn = pending.lsn();
        let mut rx = self.rx.clone();
        let durable = rx
            .wait_for(|d| d.failed || d.lsn >= lsn)
            .await
            .map(|d| d.lsn >= lsn);
        match durable {
            Ok(true) => Ok(pending.into_value_unchecked()),
            Ok(false) => Err(NotDurable::LogFailed),
            Err(_) => Err(NotDurable::Stopped),
        }
    }

    /// The latest published position.
    pub fn current(&self) -> Durable {
        *self.rx.borrow()
    }
}

/// The publishing side: owned by whoever runs the flusher.
#[derive(Debug, Clone)]
pub struct DurablePublisher {
    tx: Arc<watch::Sender<Durable>>,
}

impl DurablePublisher {
    /// A publisher starting at `lsn` (what recovery found durable) and its waiter.
    pub fn new(lsn: Lsn) -> (Self, DurableWaiter) {
        let (tx, rx) = watch::channel(Durable { lsn, failed: false });
        (Self { tx: Arc::new(tx) }, DurableWaiter { rx })
    }

    /// Publishes that everything up to `lsn` is durable (positions only move forward).
    pub fn durable_to(&self, lsn: Lsn) {
        self.tx.send_if_modified(|d| {
            let moved = d.lsn < lsn;
            d.lsn = d.lsn.max(lsn);
            moved
        });
    }

    /// Publishes that the log failed.
    pub fn failed(&self) {
        self.tx.send_modify(|d| d.failed = true);
    }

    /// A waiter on this publisher.
    pub fn waiter(&self) -> DurableWaiter {
        DurableWaiter {
            rx: self.tx.subscribe(),
        }
    }
}

/// A running flusher thread; [`Flusher::stop`] makes it flush once more and return.
#[derive(Debug)]
pub struct Flusher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Starts the flusher thread for `store`, publishing through `publisher`.
    pub fn start<S: Storage + Send + Sync + 'static>(
        store: Arc<Store<S>>,
        publisher: DurablePublisher,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("idem-flusher".into())
            .spawn({
                let stop = stop.clone();
                move || flush_loop(&store, &publisher, &stop)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread after one last flush (blocking until it returns).
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Group-commits whatever callers appended and publishes the durable position, until stopped.
fn flush_loop<S: Storage>(store: &Store<S>, publisher: &DurablePublisher, stop: &AtomicBool) {
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let flushed = if stopping {
            store.flush()
        } else {
            store.flush_appended(Duration::from_millis(50))
        };
        match flushed {
            Ok(lsn) => publisher.durable_to(lsn),
            Err(e) => {
                tracing::error!(error = %e, "log failed: answering 503 until restarted");
                publisher.failed();
                return;
            }
        }
        if stopping {
            return;
        }
    }
}
