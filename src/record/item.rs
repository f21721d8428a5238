//! Compensation items, derived from a record, and the resolutions operators write for them.
//!
//! An item is an executed claim (Completed or Indeterminate) that is not its generation's
//! winner, a taken-over claim that never reported back, an orphan of a retired region, or a
//! resolved claim that became a winner anyway. Items are never replicated as facts: every
//! region derives the same set from the same record.

use serde::{Deserialize, Serialize};

use super::{ClaimStatus, Generation, ItemId, Record, RecordKey, Retirements};
use crate::clock::Stamp;

/// What kind of divergence an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ItemKind {
    /// Same fingerprint as the winner: the operation ran twice. Compensate (e.g. refund).
    Duplicate,
    /// Different fingerprint: two distinct requests shared a key across a partition. Reported,
    /// never compensated automatically.
    KeyReuse,
    /// Unknown whether a side effect happened (a taken-over claim that never reported back, a
    /// losing claim whose lease ran out with no report, or any loser under an Indeterminate
    /// winner): a person must check.
    Verify,
    /// A claim of a retired region that arrived after its retirement; never eligible.
    Orphan,
    /// Alarm: a claim whose item was resolved became its generation's winner anyway.
    Reversed,
}

/// One compensation item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// digest(namespace, principal, key, claim stamp).
    pub id: ItemId,
    /// The claim the item is about.
    pub claim: Stamp,
    /// Its kind.
    pub kind: ItemKind,
    /// The claim's status.
    pub claim_status: ClaimStatus,
    /// The anchor of the generation the claim is in.
    pub generation: Stamp,
    /// The generation's winner, if any.
    pub winner: Option<Stamp>,
    /// The winner's status, if any.
    pub winner_status: Option<ClaimStatus>,
    /// Whether someone acknowledged handling it.
    pub resolved: bool,
    /// Whether acting on it is safe now: the winner is Completed and the key is stable here.
    pub actionable: bool,
}

/// What item derivation needs besides the record.
#[derive(Debug, Clone, Copy)]
pub struct ItemContext<'a> {
    /// Regions retired for good.
    pub retired: &'a Retirements,
    /// Whether the key is causally stable at this region (no region can still produce an
    /// earlier claim or a takeover this region does not know). Until replication tracks
    /// stability, callers pass `false`: nothing is actionable.
    pub stable: bool,
    /// Unix ms before which a lease has surely run out everywhere, and before which every
    /// region's clock has moved (the deriving region's clock minus the max drift). A claim that
    /// is not the winner, never reported back and whose lease ended before this is a `Verify`
    /// item: its client may have run it and died. An item is actionable only once the key's
    /// newest claim is older than this. Pass 0 to derive only what holds at any time.
    pub lapsed_before_ms: u64,
}

/// An acknowledgement that an item was handled. Union-merged by (item, stamp).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resolution {
    /// The item handled.
    pub item: ItemId,
    /// When, and by which region (a stamp from the resolving region's clock).
    pub at: Stamp,
    /// Who handled it (operator or hook name).
    pub by: String,
    /// Free text.
    pub note: String,
    /// What a compensation hook returned, if one ran.
    pub hook_result: Option<String>,
    /// A payment provider's reference (refund id), if any.
    pub provider_ref: Option<String>,
}

impl Record {
    /// Every compensation item of this record, in claim order.
    pub fn items(&self, key: &RecordKey, ctx: ItemContext<'_>) -> Vec<Item> {
        let mut out = Vec::new();
        for g in self.generations(ctx.retired) {
            self.generation_items(key, &g, ctx, &mut out);
        }
        out
    }

    /// What stability alone does not settle: a claim below the winner that lost only to a
    /// takeover wins again if every taker in force is later released (a taker still in flight
    /// may be, or may have been with the release still on its way), so each needs a taker that
    /// executed, which is never released; and no region may
    /// still stamp a claim below the newest one, which holds once the newest claim is older
    /// than the max drift (a stamp too far ahead does not move a region's clock).
    fn settled(&self, g: &Generation, ctx: ItemContext<'_>) -> bool {
        let Some(w) = g.winner else {
            return false;
        };
        let newest_old_enough = self
            .claims()
            .next_back()
            .is_none_or(|(s, _)| s.physical_ms() <= ctx.lapsed_before_ms);
        newest_old_enough
            && g.taken_over.keys().filter(|v| **v < w).all(|v| {
                g.stamps.iter().any(|t| {
                    self.claim(t).is_some_and(|c| {
                        c.executed()
                            && !g.orphans.contains(t)
                            && c.facts.as_ref().is_some_and(|f| f.takes_over.contains(v))
                    })
                })
            })
    }

    fn generation_items(
        &self,
        key: &RecordKey,
        g: &Generation,
        ctx: ItemContext<'_>,
        out: &mut Vec<Item>,
    ) {
        let winner = g.winner.and_then(|w| self.claim(&w).map(|c| (w, c)));
        let winner_status = winner.map(|(_, c)| c.status());
        let winner_fp = winner.and_then(|(_, c)| c.facts.as_ref().map(|f| f.fingerprint));
        let completed = winner_status == Some(ClaimStatus::Completed)
            || crate::mutants::active(crate::mutants::Mutant::ActionableWhileInFlight);
        let stable = (ctx.stable && self.settled(g, ctx))
            || crate::mutants::active(crate::mutants::Mutant::ActionableBeforeStable);
        let actionable = completed && stable;
        for s in &g.stamps {
            let Some(c) = self.claim(s) else { continue };
            let id = ItemId::of(key, s);
            let resolved = self.resolutions_of(id).next().is_some();
            let kind = if Some(*s) == g.winner {
                if !resolved {
                    continue;
                }
                ItemKind::Reversed
            } else if c.facts.is_none() || c.released() {
                continue;
            } else if g.orphans.contains(s) {
                ItemKind::Orphan
            } else if !c.executed() {
                // In flight: a divergence once it was taken over, or once its lease ran out
                // with no word from its client; until then, not (yet).
                let lapsed = c.lease_until_ms < ctx.lapsed_before_ms;
                if !(g.taken_over.contains_key(s) || lapsed)
                    || crate::mutants::active(crate::mutants::Mutant::CrashedLoserNoItem)
                {
                    continue;
                }
                ItemKind::Verify
            } else if winner_status != Some(ClaimStatus::Completed)
                && winner_status != Some(ClaimStatus::InFlight)
            {
                ItemKind::Verify
            } else if c.facts.as_ref().map(|f| f.fingerprint) == winner_fp {
                ItemKind::Duplicate
            } else {
                ItemKind::KeyReuse
            };
            out.push(Item {
                id,
                claim: *s,
                kind,
                claim_status: c.status(),
                generation: g.anchor,
                winner: g.winner,
                winner_status,
                resolved,
                actionable,
            });
        }
    }
}
