//! The claim decision: a pure function of the key's record, the request and the time.
//!
//! Kept apart from the store's I/O so that it can be read (and tested) as the rules of design
//! section 1: replay a finished winner, refuse another fingerprint, report a live lease, take
//! over a lease that ran out, resume the caller's own unanswered claim, or open a new claim.

use crate::clock::{RegionId, Stamp};
use crate::record::{AttemptToken, ClaimStatus, Fingerprint, Generation, Record, Retirements};

/// What the store will do about a claim request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Grant a new claim (taking over `takes_over`, whose lease ran out).
    New {
        /// A claim whose lease ran out.
        takes_over: Option<Stamp>,
        /// Expiry of the generation the claim joins, if it joins one.
        generation_expires_at_ms: Option<u64>,
    },
    /// The caller re-sent the attempt token of its own unanswered claim: grant it again and
    /// refresh its lease.
    Resume(Stamp),
    /// The winner finished: replay its outcome.
    Replay(Stamp),
    /// The winner is in flight under a live lease.
    InFlight(Stamp),
    /// The winner has another fingerprint.
    Mismatch(Stamp),
}

/// A plan, plus a claim of ours to release first: the caller re-sent the token of a claim that
/// meanwhile lost, so it never executed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub plan: Plan,
    pub release_stale: Option<Stamp>,
}

/// What a claim request brings to the decision.
pub(crate) struct Ask<'a> {
    pub region: RegionId,
    pub fingerprint: &'a Fingerprint,
    pub attempt: AttemptToken,
    pub now_ms: u64,
    pub max_drift_ms: u64,
    pub retired: &'a Retirements,
}

/// Decides a claim request against `record`.
pub(crate) fn plan(record: &Record, ask: &Ask<'_>) -> Planned {
    let gens = record.generations(ask.retired);
    let Some(g) = gens.last().filter(|g| g.covers_ms(ask.now_ms)) else {
        return Planned {
            plan: Plan::New {
                takes_over: None,
                generation_expires_at_ms: None,
            },
            release_stale: None,
        };
    };
    let mut release_stale = None;
    if let Some(mine) = own_unanswered(record, g, ask) {
        if g.winner == Some(mine) {
            return Planned {
                plan: Plan::Resume(mine),
                release_stale: None,
            };
        }
        release_stale = Some(mine);
    }
    let plan = match g.winner {
        None => Plan::New {
            takes_over: None,
            generation_expires_at_ms: Some(g.expires_at_ms),
        },
        Some(w) => {
            let c = record.claim(&w).expect("the winner is in the record");
            let same = c.facts.as_ref().map(|f| &f.fingerprint) == Some(ask.fingerprint);
            match c.status() {
                _ if !same => Plan::Mismatch(w),
                ClaimStatus::Completed | ClaimStatus::Indeterminate => Plan::Replay(w),
                _ if lease_ran_out(c.lease_until_ms, ask) => Plan::New {
                    takes_over: Some(w),
                    generation_expires_at_ms: Some(g.expires_at_ms),
                },
                _ => Plan::InFlight(w),
            }
        }
    };
    Planned {
        plan,
        release_stale,
    }
}

/// A lease has run out by our clock plus the max drift (the owner's clock may be behind ours).
fn lease_ran_out(lease_until_ms: u64, ask: &Ask<'_>) -> bool {
    ask.now_ms > lease_until_ms.saturating_add(ask.max_drift_ms)
}

/// Our own claim in this generation with the caller's attempt token and fingerprint, still in
/// flight and not taken over.
fn own_unanswered(record: &Record, g: &Generation, ask: &Ask<'_>) -> Option<Stamp> {
    g.stamps.iter().copied().find(|s| {
        s.region == ask.region
            && !g.taken_over.contains_key(s)
            && record.claim(s).is_some_and(|c| {
                c.status() == ClaimStatus::InFlight
                    && c.facts.as_ref().is_some_and(|f| {
                        f.attempt == ask.attempt && f.fingerprint == *ask.fingerprint
                    })
            })
    })
}
