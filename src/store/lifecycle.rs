//! Finishing claims (complete, release), extending leases, resolving items, reading keys.

use super::log::{AppendClass, Lsn, Space};
use super::storage::Storage;
use super::{Completion, Disposition, KeyView, Pending, Store, StoreError, Unavailable};
use crate::clock::{ClockError, Stamp};
use crate::record::{
    ClaimStatus, Delta, ItemContext, ItemId, Outcome, Record, RecordKey, Resolution, Retirements,
    Terminal,
};

impl<S: Storage> Store<S> {
    /// What item derivation needs at `now_ms` for a key whose newest entry has `lsn`: the
    /// retired regions, whether the key is stable here, and the time before which every lease
    /// has run out on every clock within the max drift.
    pub(super) fn item_context<'a>(
        &self,
        now_ms: u64,
        lsn: Lsn,
        retired: &'a Retirements,
    ) -> ItemContext<'a> {
        ItemContext {
            retired,
            stable: self.is_stable(lsn),
            lapsed_before_ms: now_ms.saturating_sub(self.clock.config().max_drift_ms),
        }
    }

    fn own_claim<'r>(
        &self,
        record: &'r Record,
        claim: Stamp,
    ) -> Result<&'r crate::record::ClaimState, StoreError> {
        let c = record
            .claim(&claim)
            .filter(|c| c.facts.is_some())
            .ok_or(StoreError::UnknownClaim(claim))?;
        if claim.region != self.region {
            return Err(StoreError::NotOwner {
                claim,
                owner: claim.region,
            });
        }
        Ok(c)
    }

    /// Finishes a claim with its outcome. The namespace's policy decides by status whether the
    /// outcome is stored, stored as indeterminate, or not stored (the claim is released so a
    /// corrected retry runs); headers are allow-listed and the body kept as the policy says.
    ///
    /// A claim that was taken over may still complete (a late completion): the execution is
    /// recorded and flagged, never lost. Completing twice with the same outcome is idempotent.
    pub fn complete(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        outcome: Outcome,
    ) -> Result<Pending<Completion>, StoreError> {
        self.complete_as(now_ms, key, claim, outcome, None)
    }

    /// [`complete`](Self::complete), with the caller deciding what the outcome becomes
    /// (`Some`) instead of the namespace's status table (`None`): for callers whose policy is
    /// finer than the namespace's, such as an HTTP layer storing by route. Headers and body are
    /// still kept as the namespace says.
    pub fn complete_as(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        outcome: Outcome,
        disposition: Option<Disposition>,
    ) -> Result<Pending<Completion>, StoreError> {
        let policy = self.policy(key)?;
        let max = policy.config().outcome_bytes_max;
        if outcome.size_bytes() > max {
            return Err(StoreError::OutcomeTooLarge {
                len: outcome.size_bytes(),
                max,
            });
        }
        let shaped = |o: Outcome| {
            let mut o = policy.shape_outcome(o);
            if o.size_bytes() > max {
                // Redaction can lengthen a body: keep its digest rather than exceed the space
                // promised to the completion.
                o.body = crate::record::Body::digest_of(&o.body);
            }
            o
        };
        let disposition = disposition.unwrap_or_else(|| policy.disposition(outcome.status));
        let terminal = match disposition {
            Disposition::Store => Terminal::Completed(shaped(outcome)),
            Disposition::Indeterminate => Terminal::Indeterminate(shaped(outcome)),
            Disposition::Release => Terminal::Released,
        };
        self.finish(now_ms, key, claim, terminal)
    }

    /// Releases a claim without executing: the key is free again within its generation.
    pub fn release(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
    ) -> Result<Pending<Completion>, StoreError> {
        self.policy(key)?;
        self.finish(now_ms, key, claim, Terminal::Released)
    }

    fn finish(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        terminal: Terminal,
    ) -> Result<Pending<Completion>, StoreError> {
        self.with_key(key, |e, record| {
            let c = self.own_claim(record, claim)?;
            if c.terminal.is_none() && terminal == Terminal::Released && now_ms > c.lease_until_ms {
                // Past its lease a claim may have been taken over, and its takeover of others
                // relied on: a release would void it.
                return Err(StoreError::LeaseRanOut {
                    claim,
                    lease_until_ms: c.lease_until_ms,
                });
            }
            match &c.terminal {
                Some(t) if *t == terminal => {}
                Some(_) => return Err(StoreError::AlreadyFinished(claim)),
                None if record.claim_count() == 1 && terminal != Terminal::Released => {
                    // The common case: the key's only claim completes. Its generation, expiry
                    // and win do not change, and the record leaves the cache anyway (nothing
                    // is in flight any more): append the completion without applying it.
                    let space = Space {
                        reserve: None,
                        release: self.promise_of(key, &claim, c.lease_until_ms),
                    };
                    let status = match &terminal {
                        Terminal::Indeterminate(_) => ClaimStatus::Indeterminate,
                        _ => ClaimStatus::Completed,
                    };
                    let delta = Delta::Finish {
                        stamp: claim,
                        terminal,
                    };
                    delta.validate()?;
                    #[cfg(debug_assertions)]
                    {
                        // What applying would have given.
                        let mut applied = record.clone();
                        applied.apply(&delta)?;
                        debug_assert_eq!(applied.newest_expiry_ms(), Some(e.expires_at_ms));
                        debug_assert_eq!(applied.claim(&claim).map(|c| c.status()), Some(status));
                    }
                    let (lsn, loc, _) = self.append_delta(
                        key,
                        Some(e.loc),
                        &delta,
                        e.expires_at_ms,
                        AppendClass::Reserved,
                        space,
                        now_ms,
                    )?;
                    e.loc = loc;
                    e.lsn = lsn;
                    // Not applied, so not cached: the next reader reads the log. (Emptied in
                    // place: its allocation goes back to the pool of records.)
                    record.clear();
                    return Ok(Pending {
                        lsn,
                        value: Completion {
                            terminal: status,
                            superseded: false,
                        },
                    });
                }
                None => {
                    // The finishing append itself returns the claim's promise to the log.
                    let space = Space {
                        reserve: None,
                        release: self.promise_of(key, &claim, c.lease_until_ms),
                    };
                    // The terminal is moved into the delta: nothing needs it past this point.
                    self.write_local(e, key, record, AppendClass::Reserved, space, now_ms, || {
                        Delta::Finish {
                            stamp: claim,
                            terminal,
                        }
                    })?;
                }
            }
            let status = record
                .claim(&claim)
                .map_or(ClaimStatus::InFlight, |c| c.status());
            // A lone claim wins its generation: skip deriving the generations (the common case).
            let superseded = status != ClaimStatus::Released
                && record.claim_count() > 1
                && record
                    .generation_of(&self.retired_view(), &claim)
                    .is_none_or(|g| g.winner != Some(claim));
            Ok(Pending {
                lsn: e.lsn,
                value: Completion {
                    terminal: status,
                    superseded,
                },
            })
        })
    }

    /// Extends a claim's lease to `now + lease_ms` (never shortens it). Refused once the claim
    /// was taken over or finished.
    pub fn extend(
        &self,
        now_ms: u64,
        key: &RecordKey,
        claim: Stamp,
        lease_ms: u64,
    ) -> Result<Pending<u64>, StoreError> {
        let policy = self.policy(key)?;
        let max_ms = policy.config().lease_max_ms;
        if lease_ms > max_ms {
            return Err(StoreError::LeaseTooLong {
                asked_ms: lease_ms,
                max_ms,
            });
        }
        self.with_key(key, |e, record| {
            let c = self.own_claim(record, claim)?;
            if c.terminal.is_some() {
                return Err(StoreError::AlreadyFinished(claim));
            }
            if let Some(g) = record.generation_of(&self.retired_view(), &claim) {
                if let Some(by) = g.taken_over.get(&claim) {
                    return Err(StoreError::TakenOver { claim, by: *by });
                }
            }
            if now_ms > c.lease_until_ms {
                return Err(StoreError::LeaseRanOut {
                    claim,
                    lease_until_ms: c.lease_until_ms,
                });
            }
            let until = now_ms.saturating_add(lease_ms);
            let old_lease = c.lease_until_ms;
            if until > old_lease {
                self.write_reserved(e, key, record, now_ms, || Delta::Extend {
                    stamp: claim,
                    lease_until_ms: until,
                })?;
                self.move_promise(key, &claim, old_lease, until);
            }
            let lease = record.claim(&claim).map_or(until, |c| c.lease_until_ms);
            Ok(Pending {
                lsn: e.lsn,
                value: lease,
            })
        })
    }

    /// Records that a compensation item was handled.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &self,
        now_ms: u64,
        key: &RecordKey,
        item: ItemId,
        by: &str,
        note: &str,
        hook_result: Option<String>,
        provider_ref: Option<String>,
    ) -> Result<Pending<Resolution>, StoreError> {
        self.policy(key)?;
        if self.log.is_poisoned() {
            return Err(StoreError::Unavailable(Unavailable::LogFailed));
        }
        let check = Resolution {
            item,
            at: crate::clock::Stamp::new(0, self.region),
            by: by.to_owned(),
            note: note.to_owned(),
            hook_result,
            provider_ref,
        };
        Delta::Resolve(check.clone())
            .validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.settle_clock(now_ms)?;
        self.with_key(key, |e, record| {
            let retired = self.retired_view();
            let ctx = self.item_context(now_ms, e.lsn, &retired);
            if !record.items(key, ctx).iter().any(|i| i.id == item) {
                return Err(StoreError::UnknownItem);
            }
            let at = self.clock.stamp(now_ms).map_err(|err| {
                StoreError::Unavailable(match err {
                    ClockError::RestartFence { .. } => Unavailable::RestartFence,
                    ClockError::ReservationPending { .. } => Unavailable::ClockReservation,
                    ClockError::Exhausted(_) => Unavailable::ClockExhausted,
                })
            })?;
            let resolution = Resolution { at, ..check };
            self.write_reserved(e, key, record, now_ms, || {
                Delta::Resolve(resolution.clone())
            })?;
            Ok(Pending {
                lsn: e.lsn,
                value: resolution,
            })
        })
    }

    /// Reads a key: its record and its items as of `now_ms` (an item is actionable once its
    /// winner completed and the key is stable here). Returns `None` for a key never seen. Wait
    /// on the answer like any other.
    pub fn read(
        &self,
        now_ms: u64,
        key: &RecordKey,
    ) -> Result<Pending<Option<KeyView>>, StoreError> {
        self.policy(key)?;
        let digest = key.digest();
        let Some(mut e) = self.index.get_mut(&digest) else {
            return Ok(Pending {
                lsn: 0,
                value: None,
            });
        };
        let record = match &e.hot {
            Some(r) => (**r).clone(),
            None => *self.take_record(&mut e, key)?,
        };
        let retired = self.retired_view();
        let items = record.items(key, self.item_context(now_ms, e.lsn, &retired));
        Ok(Pending {
            lsn: e.lsn,
            value: Some(KeyView {
                key: key.clone(),
                record,
                items,
            }),
        })
    }
}
