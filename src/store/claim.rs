//! The claim path: decide under the key's index lock, stamp, append.

use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry;

use super::decide::{self, Ask, Plan};
use super::index::IndexEntry;
use super::log::{AppendClass, Loc, Lsn};
use super::storage::Storage;
use super::{
    hot, ClaimRequest, Decision, NamespacePolicy, Pending, Store, StoreError, Unavailable,
};
use crate::clock::{ClockError, Stamp};
use crate::record::{ClaimFacts, Delta, Record, Terminal};

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
        let digest = req.key.digest();
        match self.index.entry(digest) {
            Entry::Vacant(v) => {
                let mut record = Record::new();
                let decision = match self.grant(now_ms, req, policy, &mut record, None, None)? {
                    Ok(x) => x,
                    Err(u) => return self.unavailable(u),
                };
                let (lsn, loc, value) = decision;
                v.insert(IndexEntry {
                    loc,
                    lsn,
                    expires_at_ms: self.newest_expiry(&record),
                    hot: Some(Box::new(record)),
                });
                Ok(Pending { lsn, value })
            }
            Entry::Occupied(mut o) => {
                let e = o.get_mut();
                let mut record = self.take_record(e, &req.key)?;
                let result = self.claim_existing(now_ms, req, policy, e, &mut record);
                if result.is_ok() {
                    e.expires_at_ms = self.newest_expiry(&record);
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
        let planned = decide::plan(
            record,
            &Ask {
                region: self.region,
                fingerprint: &req.fingerprint,
                attempt: req.attempt,
                now_ms,
                max_drift_ms: self.clock.config().max_drift_ms,
                retired: &self.retired,
            },
        );
        if let Some(stale) = planned.release_stale {
            let (lsn, loc) = self.append_local(
                &req.key,
                Some(e.loc),
                record,
                AppendClass::Reserved,
                now_ms,
                |_| Delta::Finish {
                    stamp: stale,
                    terminal: Terminal::Released,
                },
            )?;
            e.loc = loc;
            e.lsn = lsn;
        }
        let expires_at_ms = self.newest_expiry(record);
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
                takes_over.map(|t| (t, generation_expires_at_ms)),
            )? {
                Ok((lsn, loc, decision)) => {
                    e.loc = loc;
                    e.lsn = lsn;
                    decision
                }
                Err(u) => return self.unavailable(u),
            },
            Plan::Resume(claim) => {
                let lease_until_ms = now_ms + policy.lease_ms();
                let (lsn, loc) = self.append_local(
                    &req.key,
                    Some(e.loc),
                    record,
                    AppendClass::Reserved,
                    now_ms,
                    |_| Delta::Extend {
                        stamp: claim,
                        lease_until_ms,
                    },
                )?;
                e.loc = loc;
                e.lsn = lsn;
                self.stats.executes.fetch_add(1, Ordering::Relaxed);
                let c = record.claim(&claim);
                Decision::Execute {
                    claim,
                    lease_until_ms: c.map(|c| c.lease_until_ms).unwrap_or(lease_until_ms),
                    took_over: c.and_then(|c| c.facts.as_ref()).and_then(|f| f.takes_over),
                    resumed: true,
                    expires_at_ms,
                }
            }
            Plan::Replay(claim) => {
                self.stats.replays.fetch_add(1, Ordering::Relaxed);
                let terminal = record.claim(&claim).and_then(|c| c.terminal.as_ref());
                match terminal {
                    Some(t @ (Terminal::Completed(o) | Terminal::Indeterminate(o))) => {
                        Decision::Replay {
                            claim,
                            outcome: o.clone(),
                            indeterminate: matches!(t, Terminal::Indeterminate(_)),
                            expires_at_ms,
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

    /// Grants a new claim: fence check, stamp, append. `Ok(Err(_))` is an Unavailable answer.
    #[allow(clippy::type_complexity)]
    fn grant(
        &self,
        now_ms: u64,
        req: &ClaimRequest,
        policy: &NamespacePolicy,
        record: &mut Record,
        prev: Option<Loc>,
        takeover: Option<(Stamp, Option<u64>)>,
    ) -> Result<Result<(Lsn, Loc, Decision), Unavailable>, StoreError> {
        if self.is_fenced() {
            return Ok(Err(Unavailable::Fenced));
        }
        let stamp = match self.clock.stamp(now_ms) {
            Ok(s) => s,
            Err(ClockError::RestartFence { .. }) => return Ok(Err(Unavailable::RestartFence)),
            Err(ClockError::ReservationPending { .. }) => {
                return Ok(Err(Unavailable::ClockReservation))
            }
            Err(ClockError::Exhausted(_)) => return Ok(Err(Unavailable::ClockExhausted)),
        };
        // A takeover is in force only within its victim's generation: if the new stamp lies
        // past that generation's expiry, it simply opens the next generation.
        let takes_over = takeover.and_then(|(victim, expiry)| {
            expiry
                .is_none_or(|x| stamp.physical_ms() < x)
                .then_some(victim)
        });
        let lease_ms = policy.lease_ms();
        let before = record.clone();
        let appended =
            self.append_local(&req.key, prev, record, AppendClass::Normal, now_ms, |seq| {
                Delta::Claim {
                    stamp,
                    facts: ClaimFacts {
                        fingerprint: req.fingerprint,
                        attempt: req.attempt,
                        ttl_ms: policy.ttl_ms(),
                        lease_ms,
                        origin_seq: seq,
                        takes_over,
                    },
                }
            });
        let (lsn, loc) = match appended {
            Ok(x) => x,
            Err(StoreError::Unavailable(u)) => {
                *record = before;
                return Ok(Err(u));
            }
            Err(e) => {
                *record = before;
                return Err(e);
            }
        };
        self.stats.executes.fetch_add(1, Ordering::Relaxed);
        if takes_over.is_some() {
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok((
            lsn,
            loc,
            Decision::Execute {
                claim: stamp,
                lease_until_ms: stamp.physical_ms() + lease_ms,
                took_over: takes_over,
                resumed: false,
                expires_at_ms: self.newest_expiry(record),
            },
        )))
    }
}
