//! # idem: a multi-region idempotency-key store
//!
//! API clients retry. idem makes retries safe: before executing a request that carries an
//! idempotency key, an API server *claims* the key and gets one of: execute (you own it), replay
//! (here is the stored response), in flight (retry later), mismatch (same key, different
//! request) or unavailable (the store cannot answer safely now).
//!
//! This crate is the core every region runs:
//!
//! * [`clock`]: the hybrid logical clock (hlc-gen through its manual clock) with a durable
//!   high-water mark, so no stamp is ever issued twice, even across crashes.
//! * [`record`]: the replicated record of a key, a join-semilattice whose merge is order-free;
//!   generations, first-writer-wins winners and compensation items are derived from it.
//! * [`store`]: the region's linearizable key map over a crash-safe, group-committed log.
//! * [`replica`]: replication between regions as a sans-IO state machine (handshake, push,
//!   pull anti-entropy, heartbeats, clock fencing), driven by the daemon or the simulator.
//! * [`wire`]: the messages regions exchange, their framing and limits.
//! * [`daemon`], [`http`]: the region daemon (`idem serve`) and its store API over HTTP+JSON.
//! * [`durable`]: the flusher thread and async waits for durable answers (daemon, HTTP face).
//! * [`client`]: a Rust client for that API, with the retry and failover rules every client
//!   follows.
//! * [`mutants`]: known bugs the simulator's tests plant to prove their checks fail (compiled in
//!   only with the `mutants` feature).
//!
//! The core takes time from its caller (`now_ms` arguments) and does I/O only through the
//! [`store::storage::Storage`] interface, so a deterministic simulator drives the very same
//! code the daemon runs.
//!
//! ## Example: claim, complete, replay
//!
//! ```
//! use idem::clock::{wall_clock_ms, RegionId};
//! use idem::record::{AttemptToken, Fingerprint, Outcome, RecordKey};
//! use idem::store::storage::FsStorage;
//! use idem::store::{ClaimRequest, Decision, Store, StoreConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let config = StoreConfig::new(RegionId::new("eu1")?, &["payments"]);
//! let store = Store::open(FsStorage::open(dir.path())?, config, wall_clock_ms())?;
//!
//! let charge = ClaimRequest {
//!     key: RecordKey::new("payments", "acct_42", "order-7"),
//!     fingerprint: Fingerprint::of(br#"POST /charges {"amount":10}"#),
//!     attempt: AttemptToken(1),
//! };
//! // Every answer is given out only once the log is durable: `wait` shares one fdatasync with
//! // every concurrent caller.
//! let Decision::Execute { claim, .. } = store.wait(store.claim(wall_clock_ms(), &charge)?)? else {
//!     panic!("a fresh key is ours to execute");
//! };
//!
//! // ... charge the card, then store the response ...
//! let response = Outcome::new(201, r#"{"id":"ch_1"}"#);
//! store.wait(store.complete(wall_clock_ms(), &charge.key, claim, response.clone())?)?;
//!
//! // The client retries (its reply was lost): the stored response is replayed, nothing runs twice.
//! let retry = ClaimRequest { attempt: AttemptToken(2), ..charge.clone() };
//! match store.wait(store.claim(wall_clock_ms(), &retry)?)? {
//!     Decision::Replay { outcome, .. } => assert_eq!(outcome, response),
//!     other => panic!("expected a replay, got {other:?}"),
//! }
//!
//! // The same key with another request is refused.
//! let reuse = ClaimRequest { fingerprint: Fingerprint::of(b"POST /charges {\"amount\":99}"), ..retry };
//! assert!(matches!(store.wait(store.claim(wall_clock_ms(), &reuse)?)?, Decision::Mismatch { .. }));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

#[cfg(test)]
mod arb;
pub mod client;
pub mod clock;
pub mod daemon;
pub mod durable;
pub mod face;
pub mod http;
pub mod mutants;
pub mod record;
pub mod replica;
mod splitmix;
pub mod store;
pub mod wire;

pub use clock::{RegionId, Stamp};
pub use record::{AttemptToken, Fingerprint, Outcome, RecordKey};
pub use store::{ClaimRequest, Decision, Store, StoreConfig, StoreError};
