//! The claim path: decide under the key's index lock, stamp, append.

use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;

use super::decide::{self, Ask, Plan};
use super::index::IndexEntry;
use super::log::{AppendClass, Loc, Log, Lsn, Promise, Space};
use super::storage::Storage;
use super::{
    hot, record_pool, reserve, ClaimRequest, Decision, NamespacePolicy, Pending, Store, StoreError,
    Unavailable,
};
use crate::clock::{hlc_physical_ms, ClockError, Stamp};
use crate::record::{ClaimFacts, Delta, Record, Terminal};

/// A granted claim: where its entry went, the key's newest expiry, the answer.
struct Granted {
    lsn: Lsn,
    loc: Loc,
    expires_at_ms: u64,
    decision: Decision,
}

impl<S: Storage> Store<S> {
    /// Claims a key. See [`Decision`] for the answers; the answer may be given out once
    /// durable (see [`Store::wait`]).
    pub fn claim(&self, now_ms: u64, req: &ClaimRequest) -> Result<Pending<Decision>, StoreError> {
        let policy = self.policy(&req.key)?;
        if self.log.is_poisoned() {
            return self.unavailable(Unavailable::LogFailed);
        }
        if let Err(e) = self.settle_clock(now_ms) {
            return match e {
                StoreError::Unavailable(u) => self.unavailable(u),
                other => Err(other),
            };
        }
        self.expire_promises(now_ms);
        let digest = req.key.digest();
        match self.index.entry(digest) {
            Entry::Vacant(v) => {
                let mut record = record_pool::fresh();
                let g =
                    match self.grant(now_ms, req, policy, &mut record, None, Vec::new(), None)? {
                        Ok(g) => g,
                        Err(u) => return self.unavailable(u),
                    };
                v.insert(IndexEntry {
                    loc: g.loc,
                    lsn: g.lsn,
                    expires_at_ms: g.expires_at_ms,
                    hot: Some(record),
                });
                Ok(Pending {
                    lsn: g.lsn,
                    value: g.decision,
                })
            }
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                let mut record = self.take_record(e, &req.key)?;
                let result = self.claim_existing(now_ms, req, policy, e, &mut record);
                // After an error or an Unavailable answer the record may hold a claim that was
                // never appended: drop it, the log is read back next time.
                if matches!(&result, Ok(p) if !matches!(p.value, Decision::Unavailable { .. })) {
                    e.hot = hot(record);
                }
                result
            }
        }
    }

    fn claim_existing(
        &self,
        now_ms: u64,
        req: &ClaimRequest,
        policy: &NamespacePolicy,
        e: &mut IndexEntry,
        record: &mut Record,
    ) -> Result<Pending<Decision>, StoreError> {
        // A claim on the key stamped by a clock ahead of ours, within the max drift (a peer's
        // stamp our clock could not adopt yet), still decides: the key is not free because our
        // clock is behind. Try to catch up with it first; whatever we grant must be stamped
        // after it. A claim further ahead comes from a broken clock and decides nothing
        // (design section 4: counted and alarmed, data still merged).
        let newest = newest_within_drift(record, now_ms, self.clock.config().max_drift_ms);
        if let Some(n) = newest.filter(|n| n.hlc > self.clock.last_hlc()) {
            let _ = self.clock.observe(now_ms, n);
        }
        let planned = decide::plan(
            record,
            &Ask {
                region: self.region,
                fingerprint: &req.fingerprint,
                attempt: req.attempt,
                now_ms,
                stamp_ms: now_ms
                    .max(hlc_physical_ms(self.clock.last_hlc()))
                    .max(newest.map_or(0, |n| n.physical_ms())),
                max_drift_ms: self.clock.config().max_drift_ms,
                retired: &self.retired_view(),
            },
        );
        if let Some(stale) = planned.release_stale {
            let lease = record.claim(&stale).map_or(0, |c| c.lease_until_ms);
            self.write_reserved(e, &req.key, record, now_ms, || Delta::Finish {
                stamp: stale,
                terminal: Terminal::Released,
            })?;
            self.return_promise(&req.key, &stale, lease);
        }
        let value = match planned.plan {
            Plan::New {
                takes_over,
                generation_expires_at_ms,
            } => match self.grant(
                now_ms,
                req,
                policy,
                record,
                Some(e.loc),
                takes_over,
                generation_expires_at_ms,
            )? {
                Ok(g) => {
                    e.loc = g.loc;
                    e.lsn = g.lsn;
                    e.expires_at_ms = g.expires_at_ms;
                    g.decision
                }
                Err(u) => return self.unavailable(u),
            },
            Plan::Resume(claim) => {
                let lease_until_ms = now_ms + policy.lease_ms();
                let old_lease = record.claim(&claim).map_or(0, |c| c.lease_until_ms);
                self.write_reserved(e, &req.key, record, now_ms, || Delta::Extend {
                    stamp: claim,
                    lease_until_ms,
                })?;
                self.stats.executes.fetch_add(1, Ordering::Relaxed);
                let c = record.claim(&claim);
                if let Some(c) = c {
                    self.move_promise(&req.key, &claim, old_lease, c.lease_until_ms);
                }
                Decision::Execute {
                    claim,
                    lease_until_ms: c.map_or(lease_until_ms, |c| c.lease_until_ms),
                    took_over: c
                        .and_then(|c| c.facts.as_ref())
                        .map(|f| f.takes_over.clone())
                        .unwrap_or_default(),
                    resumed: true,
                    expires_at_ms: e.expires_at_ms,
                }
            }
            Plan::Replay(claim) => {
                self.stats.replays.fetch_add(1, Ordering::Relaxed);
                match record.claim(&claim).and_then(|c| c.terminal.as_ref()) {
                    Some(t @ (Terminal::Completed(o) | Terminal::Indeterminate(o))) => {
                        Decision::Replay {
                            claim,
                            outcome: o.clone(),
                            indeterminate: matches!(t, Terminal::Indeterminate(_)),
                            expires_at_ms: e.expires_at_ms,
                        }
                    }
                    _ => return Err(StoreError::Corrupt("replay of an unfinished claim".into())),
                }
            }
            Plan::InFlight(claim) => {
                self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                Decision::InFlight {
                    claim,
                    region: claim.region,
                    lease_expires_at_ms: record.claim(&claim).map_or(0, |c| c.lease_until_ms),
                }
            }
            Plan::Mismatch(claim) => {
                self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                Decision::Mismatch { claim }
            }
        };
        Ok(Pending { lsn: e.lsn, value })
    }

    /// Grants a new claim: fence check, stamp, append. `Ok(Err(_))` is an Unavailable answer;
    /// after any error `record` must be dropped (it may hold the unwritten claim).
    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        now_ms: u64,
        req: &ClaimRequest,
        policy: &NamespacePolicy,
        record: &mut Record,
        prev: Option<Loc>,
        takes_over: Vec<Stamp>,
        generation_expires_at_ms: Option<u64>,
    ) -> Result<Result<Granted, Unavailable>, StoreError> {
        if self.is_fenced() {
            return Ok(Err(Unavailable::Fenced));
        }
        if self.is_retired_here() {
            return Ok(Err(Unavailable::Retired));
        }
        let stamp = match self.clock.stamp(now_ms) {
            // Granting below a claim the key already holds would take the key from it.
            Ok(s)
                if newest_within_drift(record, now_ms, self.clock.config().max_drift_ms)
                    .is_some_and(|n| n >= s) =>
            {
                return Ok(Err(Unavailable::ClockBehind));
            }
            Ok(s) => s,
            Err(ClockError::RestartFence { .. }) => return Ok(Err(Unavailable::RestartFence)),
            Err(ClockError::ReservationPending { .. }) => {
                return Ok(Err(Unavailable::ClockReservation))
            }
            Err(ClockError::Exhausted(_)) => return Ok(Err(Unavailable::ClockExhausted)),
        };
        // A takeover is in force only within its victims' generation: if the new stamp lies
        // past that generation's expiry, it simply opens the next generation.
        let takes_over = match generation_expires_at_ms {
            Some(x) if stamp.physical_ms() >= x => Vec::new(),
            _ => takes_over,
        };
        let lease_ms = policy.lease_ms();
        let took_over = takes_over.clone();
        // Promise the space of the completion before granting: a full disk refuses the claim,
        // never its completion.
        let lease_until_ms = stamp.physical_ms() + lease_ms;
        let promise = Promise {
            bytes: Log::<S>::frame_bytes(reserve::completion_bytes(
                policy.config().outcome_bytes_max,
                &req.key,
            )),
            lease_until_ms,
        };
        debug_assert_eq!(
            Some(promise),
            self.promise_of(&req.key, &stamp, lease_until_ms)
        );
        // The promise is made by the claim's own append: both fit, or neither is written.
        // Victims' promises (if ours) expired with their leases, before any takeover is allowed.
        let space = Space {
            reserve: Some(promise),
            release: None,
        };
        let appended = self.append_local(
            &req.key,
            prev,
            record,
            AppendClass::Normal,
            space,
            now_ms,
            || Delta::Claim {
                stamp,
                facts: ClaimFacts {
                    fingerprint: req.fingerprint,
                    attempt: req.attempt,
                    ttl_ms: policy.ttl_ms(),
                    lease_ms,
                    // Filled in by the append, which takes the sequence number.
                    origin_seq: 0,
                    takes_over,
                },
            },
        );
        let (lsn, loc, expires_at_ms) = match appended {
            Ok(x) => x,
            Err(e) => {
                return match e {
                    StoreError::Unavailable(u) => Ok(Err(u)),
                    e => Err(e),
                };
            }
        };
        self.stats.executes.fetch_add(1, Ordering::Relaxed);
        if !took_over.is_empty() {
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(Granted {
            lsn,
            loc,
            expires_at_ms,
            decision: Decision::Execute {
                claim: stamp,
                lease_until_ms,
                took_over,
                resumed: false,
                expires_at_ms,
            },
        }))
    }
}

/// The key's newest claim stamped at most `max_drift_ms` ahead of `now_ms`: the one a new
/// claim must sort after (see `Unavailable::ClockBehind`). Bounds how long `ClockBehind` can
/// last: until our clock passes a stamp at most the max drift ahead.
fn newest_within_drift(record: &Record, now_ms: u64, max_drift_ms: u64) -> Option<Stamp> {
    let horizon = now_ms.saturating_add(max_drift_ms);
    record
        .claims()
        .rev()
        .map(|(s, _)| *s)
        .find(|s| s.physical_ms() <= horizon)
}
