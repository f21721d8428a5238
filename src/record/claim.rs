//! One claim: its immutable facts, the owner's chain and its join.

use serde::{Deserialize, Serialize};

use super::key::{AttemptToken, Fingerprint};
use crate::clock::Stamp;

/// A stored response body, kept the way the namespace's policy says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Body {
    /// The body bytes as the handler produced them.
    Full(Vec<u8>),
    /// Only a digest: replays say what was returned without holding it.
    Digest {
        /// Length of the original body in bytes.
        len: u64,
        /// BLAKE3 of the original body.
        blake3: [u8; 32],
    },
    /// A JSON body with the policy's named fields replaced by `"[redacted]"`.
    Redacted(Vec<u8>),
}

impl Body {
    /// The digest form of a body (a digest stays as it is).
    pub fn digest_of(body: &Body) -> Body {
        match body {
            Body::Full(b) | Body::Redacted(b) => Body::Digest {
                len: b.len() as u64,
                blake3: *blake3::hash(b).as_bytes(),
            },
            d @ Body::Digest { .. } => d.clone(),
        }
    }
}

/// A stored response: status, allow-listed headers and body.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Outcome {
    /// HTTP status (or an application's equivalent).
    pub status: u16,
    /// Allow-listed response headers, in the order given.
    pub headers: Vec<(String, String)>,
    /// The body as stored.
    pub body: Body,
}

impl Outcome {
    /// An outcome with a full body and no headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Body::Full(body.into()),
        }
    }

    /// Bytes this outcome occupies (headers and body), the measure size limits apply to.
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let body = match &self.body {
            Body::Full(b) | Body::Redacted(b) => b.len(),
            Body::Digest { .. } => 40,
        };
        headers + body
    }
}

/// The owner's one durable terminal write.
///
/// Should two different terminal writes ever meet, `Indeterminate > Completed > Released` and
/// the claim raises an alarm ([`ClaimState::conflict`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Terminal {
    /// Nothing was executed; the key is free again within its generation.
    Released,
    /// Executed; the outcome is replayed to retries.
    Completed(Outcome),
    /// A stored failure after which a side effect may have happened (e.g. a 5xx).
    Indeterminate(Outcome),
}

impl Terminal {
    fn rank(&self) -> u8 {
        match self {
            Terminal::Released => 0,
            Terminal::Completed(_) => 1,
            Terminal::Indeterminate(_) => 2,
        }
    }

    /// The stored outcome, unless released.
    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Terminal::Released => None,
            Terminal::Completed(o) | Terminal::Indeterminate(o) => Some(o),
        }
    }

    /// Deterministic join of two terminal writes: the higher rank wins; equal ranks with
    /// different outcomes keep the larger outcome in byte order. Returns whether they differed.
    fn join(self, other: Terminal) -> (Terminal, bool) {
        if self == other {
            return (self, false);
        }
        let keep_self = match self.rank().cmp(&other.rank()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => self.outcome() >= other.outcome(),
        };
        (if keep_self { self } else { other }, true)
    }
}

/// What a claim's owner fixed when it created the claim. Written once; never changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClaimFacts {
    /// The request's fingerprint.
    pub fingerprint: Fingerprint,
    /// The caller's attempt token.
    pub attempt: AttemptToken,
    /// The key's time to live under the policy in force when the claim was made (ms).
    pub ttl_ms: u64,
    /// The in-flight lease granted with the claim (ms from the stamp's physical time).
    pub lease_ms: u64,
    /// The owner's per-origin log sequence number of the mutation that created the claim.
    pub origin_seq: u64,
    /// The claims this one took over (their leases had run out), ascending, no repeats. Usually
    /// empty or one; several when earlier claims of the generation all ran out.
    pub takes_over: Vec<Stamp>,
}

/// A claim's replicated state: a join-semilattice (facts written once, lease max-merged, one
/// terminal write with fixed precedence).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ClaimState {
    /// `None` for a placeholder: a claim known only because another claim took it over, or
    /// whose later writes arrived before the claim itself. Placeholders are never eligible.
    pub facts: Option<ClaimFacts>,
    /// The lease end, Unix ms (max-merged).
    pub lease_until_ms: u64,
    /// The owner's terminal write, if any.
    pub terminal: Option<Terminal>,
    /// Two different facts or terminal writes met: the owner broke its contract. An alarm.
    pub conflict: bool,
}

/// A claim's state as one word, for answers and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClaimStatus {
    /// Known only by reference.
    Placeholder,
    /// Running (or crashed, or slow): no terminal write yet.
    InFlight,
    /// Released without executing.
    Released,
    /// Executed with a stored outcome.
    Completed,
    /// Stored failure; a side effect may have happened.
    Indeterminate,
}

impl ClaimState {
    /// The claim's status.
    pub fn status(&self) -> ClaimStatus {
        match (&self.facts, &self.terminal) {
            (_, Some(Terminal::Released)) => ClaimStatus::Released,
            (_, Some(Terminal::Completed(_))) => ClaimStatus::Completed,
            (_, Some(Terminal::Indeterminate(_))) => ClaimStatus::Indeterminate,
            (None, None) => ClaimStatus::Placeholder,
            (Some(_), None) => ClaimStatus::InFlight,
        }
    }

    /// Whether the claim ran its operation (Completed or Indeterminate).
    pub fn executed(&self) -> bool {
        matches!(
            self.terminal,
            Some(Terminal::Completed(_)) | Some(Terminal::Indeterminate(_))
        )
    }

    /// Whether the claim was released.
    pub fn released(&self) -> bool {
        matches!(self.terminal, Some(Terminal::Released))
    }

    pub(crate) fn set_facts(&mut self, stamp: &Stamp, facts: ClaimFacts) -> bool {
        let lease = stamp.physical_ms().saturating_add(facts.lease_ms);
        let mut changed = self.raise_lease(lease);
        match &self.facts {
            None => {
                self.facts = Some(facts);
                changed = true;
            }
            Some(old) if *old == facts => {}
            Some(old) => {
                // Deterministic whatever the arrival order: keep the larger, raise the alarm.
                if facts > *old {
                    self.facts = Some(facts);
                    changed = true;
                }
                changed |= !self.conflict;
                self.conflict = true;
            }
        }
        changed
    }

    pub(crate) fn raise_lease(&mut self, until_ms: u64) -> bool {
        if until_ms > self.lease_until_ms {
            self.lease_until_ms = until_ms;
            true
        } else {
            false
        }
    }

    pub(crate) fn set_terminal(&mut self, terminal: Terminal) -> bool {
        match self.terminal.take() {
            None => {
                self.terminal = Some(terminal);
                true
            }
            Some(old) => {
                let before = old.clone();
                let (joined, differed) = old.join(terminal);
                let changed = joined != before || (differed && !self.conflict);
                self.terminal = Some(joined);
                self.conflict |= differed;
                changed
            }
        }
    }

    /// Joins another replica's view of the same claim into this one.
    pub fn join(&mut self, stamp: &Stamp, other: &ClaimState) -> bool {
        let mut changed = false;
        if let Some(f) = &other.facts {
            changed |= self.set_facts(stamp, f.clone());
        }
        changed |= self.raise_lease(other.lease_until_ms);
        if let Some(t) = &other.terminal {
            changed |= self.set_terminal(t.clone());
        }
        if other.conflict && !self.conflict {
            self.conflict = true;
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_precedence_and_alarm() {
        let mut c = ClaimState::default();
        c.set_terminal(Terminal::Completed(Outcome::new(200, "a")));
        c.set_terminal(Terminal::Released);
        assert_eq!(c.status(), ClaimStatus::Completed);
        assert!(c.conflict);
        c.set_terminal(Terminal::Indeterminate(Outcome::new(500, "x")));
        assert_eq!(c.status(), ClaimStatus::Indeterminate);
    }

    #[test]
    fn the_same_terminal_twice_is_no_conflict() {
        let mut c = ClaimState::default();
        c.set_terminal(Terminal::Completed(Outcome::new(200, "a")));
        assert!(!c.set_terminal(Terminal::Completed(Outcome::new(200, "a"))));
        assert!(!c.conflict);
    }
}
