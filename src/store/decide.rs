//! The claim decision: a pure function of the key's record, the request and the time.
//!
//! Kept apart from the store's I/O so that it can be read (and tested) as the rules of design
//! section 1: replay a finished winner, refuse another fingerprint, report a live lease, take
//! over leases that ran out, resume the caller's own unanswered claim, or open a new claim.
//!
//! The decision is made against the *effective* winner: the first eligible claim of the
//! generation covering `now` whose lease has not run out (or that finished). Eligible claims
//! before it have run out and would be taken over by a new claim; deciding against the first
//! eligible claim alone could grant `Execute` while a later eligible claim had already
//! completed (which would then win, and the operation would run twice).

use crate::clock::{RegionId, Stamp};
use crate::record::{AttemptToken, ClaimStatus, Fingerprint, Generation, Record, Retirements};

/// What the store will do about a claim request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Grant a new claim, taking over `takes_over` (eligible claims whose leases ran out).
    New {
        /// Claims whose leases ran out, ascending.
        takes_over: Vec<Stamp>,
        /// Expiry of the generation the claim joins, if it joins one.
        generation_expires_at_ms: Option<u64>,
    },
    /// The caller re-sent the attempt token of its own unanswered claim: grant it again and
    /// refresh its lease.
    Resume(Stamp),
    /// A finished claim holds the key: replay its outcome.
    Replay(Stamp),
    /// A claim under a live lease holds the key.
    InFlight(Stamp),
    /// A claim with another fingerprint holds the key.
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
    /// Wall-clock time, for lease checks.
    pub now_ms: u64,
    /// The physical time a stamp issued now would carry (at least `now_ms`; more when the
    /// clock has seen a peer's stamp from a clock ahead of ours), and at least the newest claim
    /// the key holds (a grant below it is refused, see `Unavailable::ClockBehind`): picks the
    /// generation.
    pub stamp_ms: u64,
    pub max_drift_ms: u64,
    pub retired: &'a Retirements,
}

/// Decides a claim request against `record`.
pub(crate) fn plan(record: &Record, ask: &Ask<'_>) -> Planned {
    let gens = record.generations(ask.retired);
    // The generation a new stamp would fall in (a peer's claim from a clock further ahead than
    // our clock accepted may have opened a later one; it does not decide for now).
    let Some(g) = gens
        .iter()
        .rev()
        .find(|g| g.anchor.physical_ms() <= ask.stamp_ms && g.covers_ms(ask.stamp_ms))
    else {
        return Planned {
            plan: Plan::New {
                takes_over: Vec::new(),
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
    let mut ran_out = Vec::new();
    let mut plan = None;
    for s in &g.stamps {
        if Some(*s) == release_stale || !g.eligible(record, s) {
            continue;
        }
        let Some(c) = record.claim(s) else { continue };
        let same = c.facts.as_ref().map(|f| &f.fingerprint) == Some(ask.fingerprint);
        plan = Some(match c.status() {
            _ if !same => Plan::Mismatch(*s),
            ClaimStatus::Completed | ClaimStatus::Indeterminate => Plan::Replay(*s),
            _ if lease_ran_out(c.lease_until_ms, ask) => {
                ran_out.push(*s);
                continue;
            }
            _ => Plan::InFlight(*s),
        });
        break;
    }
    Planned {
        plan: plan.unwrap_or(Plan::New {
            takes_over: ran_out,
            generation_expires_at_ms: Some(g.expires_at_ms),
        }),
        release_stale,
    }
}

/// A lease has run out by our clock plus the max drift (the owner's clock may be behind ours).
fn lease_ran_out(lease_until_ms: u64, ask: &Ask<'_>) -> bool {
    ask.now_ms > lease_until_ms.saturating_add(ask.max_drift_ms)
}

/// Our own claim in this generation with the caller's attempt token and fingerprint, still in
/// flight, within its lease and not taken over.
fn own_unanswered(record: &Record, g: &Generation, ask: &Ask<'_>) -> Option<Stamp> {
    g.stamps.iter().copied().find(|s| {
        s.region == ask.region
            && !g.taken_over.contains_key(s)
            && record.claim(s).is_some_and(|c| {
                c.status() == ClaimStatus::InFlight
                    && ask.now_ms <= c.lease_until_ms
                    && c.facts.as_ref().is_some_and(|f| {
                        f.attempt == ask.attempt && f.fingerprint == *ask.fingerprint
                    })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::hlc_floor_of_ms;
    use crate::record::{ClaimFacts, Delta, Outcome, Terminal};

    const T0: u64 = 1_900_000_000_000;

    fn stamp(ms: u64, r: &str) -> Stamp {
        Stamp::new(hlc_floor_of_ms(T0 + ms), RegionId::new(r).unwrap())
    }

    fn claim(r: &mut Record, s: Stamp, fp: u8) {
        r.apply(&Delta::Claim {
            stamp: s,
            facts: ClaimFacts {
                fingerprint: Fingerprint([fp; 32]),
                attempt: AttemptToken(0),
                ttl_ms: 100_000,
                lease_ms: 1_000,
                origin_seq: 1,
                takes_over: Vec::new(),
            },
        })
        .unwrap();
    }

    fn ask(now: u64) -> Ask<'static> {
        static FP: Fingerprint = Fingerprint([1; 32]);
        static NONE: Retirements = Retirements(std::collections::BTreeMap::new());
        Ask {
            region: RegionId::new("a").unwrap(),
            fingerprint: &FP,
            attempt: AttemptToken(9),
            now_ms: T0 + now,
            stamp_ms: T0 + now,
            max_drift_ms: 500,
            retired: &NONE,
        }
    }

    #[test]
    fn expired_claims_before_a_completed_one_lead_to_its_replay_not_a_new_execution() {
        let (w, x) = (stamp(0, "a"), stamp(10, "b"));
        let mut r = Record::new();
        claim(&mut r, w, 1);
        claim(&mut r, x, 1);
        r.apply(&Delta::Finish {
            stamp: x,
            terminal: Terminal::Completed(Outcome::new(200, "x")),
        })
        .unwrap();
        assert_eq!(plan(&r, &ask(5_000)).plan, Plan::Replay(x));
    }

    #[test]
    fn all_expired_claims_are_taken_over_together() {
        let (w, x) = (stamp(0, "a"), stamp(10, "b"));
        let mut r = Record::new();
        claim(&mut r, w, 1);
        claim(&mut r, x, 1);
        assert_eq!(plan(&r, &ask(1_000)).plan, Plan::InFlight(w));
        assert_eq!(
            plan(&r, &ask(5_000)).plan,
            Plan::New {
                takes_over: vec![w, x],
                generation_expires_at_ms: Some(T0 + 100_000)
            }
        );
    }

    #[test]
    fn a_live_later_claim_is_reported_in_flight() {
        let (w, x) = (stamp(0, "a"), stamp(3_000, "b"));
        let mut r = Record::new();
        claim(&mut r, w, 1);
        claim(&mut r, x, 1);
        assert_eq!(plan(&r, &ask(1_200)).plan, Plan::InFlight(w));
        assert_eq!(plan(&r, &ask(3_600)).plan, Plan::InFlight(x));
    }

    #[test]
    fn a_generation_opened_by_a_future_claim_does_not_decide_for_now() {
        let (w, future) = (stamp(0, "a"), stamp(250_000, "b"));
        let mut r = Record::new();
        claim(&mut r, w, 1);
        r.apply(&Delta::Finish {
            stamp: w,
            terminal: Terminal::Completed(Outcome::new(200, "w")),
        })
        .unwrap();
        claim(&mut r, future, 2);
        assert_eq!(plan(&r, &ask(50_000)).plan, Plan::Replay(w));
    }
}
