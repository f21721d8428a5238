//! The store's errors and its `Unavailable` reasons.

use serde::{Deserialize, Serialize};

use super::log::LogError;
use super::policy::PolicyError;
use crate::clock::{RegionId, RegionIdError, Stamp};
use crate::record::InvalidDelta;

/// Why the store cannot answer safely right now. The caller retries later (HTTP 503 with
/// `Retry-After`); nothing was granted and nothing was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Unavailable {
    /// The region is fenced (clock skew against its peers): no new claims or takeovers.
    #[error("region fenced: no new claims")]
    Fenced,
    /// Restarted; waiting for the wall clock to pass the recovered clock reservation.
    #[error("restarted: waiting for the clock to pass its reservation")]
    RestartFence,
    /// The clock's next reservation is not durable yet.
    #[error("clock reservation not yet durable")]
    ClockReservation,
    /// The hlc cannot issue a stamp (counter exhausted, or time out of range).
    #[error("hlc exhausted or time out of range")]
    ClockExhausted,
    /// The disk is full: new claims are refused so that granted claims can still finish.
    #[error("disk full: new claims refused")]
    DiskFull,
    /// The log failed (a failed fsync is never retried): the store answers nothing new.
    #[error("log failed; restart the region")]
    LogFailed,
    /// The key holds a claim stamped by a clock ahead of ours (within the max drift), further
    /// than ours may advance yet: a new claim would sort before it and take the key from it.
    /// Answered until our clock passes that stamp, at most the max drift; claims stamped
    /// further ahead than the max drift decide nothing.
    #[error("a claim on this key is stamped ahead of our clock")]
    ClockBehind,
    /// A peer reported that an operator retired this region for good: it grants no new
    /// claims again. It rejoins only as a new region with an empty data directory.
    #[error("region retired by an operator: no new claims")]
    Retired,
}

impl Unavailable {
    /// A hint for `Retry-After`, in ms.
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Unavailable::ClockReservation | Unavailable::ClockExhausted => 5,
            Unavailable::ClockBehind => 50,
            Unavailable::RestartFence => 250,
            Unavailable::Fenced | Unavailable::DiskFull => 1_000,
            Unavailable::LogFailed | Unavailable::Retired => 5_000,
        }
    }
}

/// The store's errors. After any of them the store is consistent: nothing was written, unless
/// the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such namespace in the config.
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    /// The idempotency key is empty or longer than the namespace allows.
    #[error("key is {len} bytes; namespace allows 1 to {max}")]
    BadKeyLength {
        /// Its length.
        len: usize,
        /// The namespace's limit.
        max: usize,
    },
    /// The principal is longer than the namespace allows.
    #[error("principal is {len} bytes; namespace allows at most {max}")]
    PrincipalTooLong {
        /// Its length.
        len: usize,
        /// The namespace's limit.
        max: usize,
    },
    /// The outcome is larger than the namespace stores.
    #[error("outcome is {len} bytes; namespace stores at most {max}")]
    OutcomeTooLarge {
        /// Its size.
        len: usize,
        /// The namespace's limit.
        max: usize,
    },
    /// A value is outside the absolute limits every delta must respect (see
    /// [`crate::record::limits`]).
    #[error("{0}")]
    Invalid(String),
    /// An entry could not be encoded (a record or outcome too large to store).
    #[error(transparent)]
    Encode(#[from] super::entry::EncodeError),
    /// A lease extension longer than the namespace allows.
    #[error("lease of {asked_ms} ms asked; namespace allows at most {max_ms} ms")]
    LeaseTooLong {
        /// Asked for.
        asked_ms: u64,
        /// Allowed.
        max_ms: u64,
    },
    /// This region holds nothing for the key.
    #[error("unknown key")]
    UnknownKey,
    /// The key has no such claim.
    #[error("no claim {0:?} on this key")]
    UnknownClaim(Stamp),
    /// Only the region that made a claim writes its chain.
    #[error("claim {claim:?} belongs to region {owner}")]
    NotOwner {
        /// The claim.
        claim: Stamp,
        /// Its owner.
        owner: RegionId,
    },
    /// The claim already has a different terminal write.
    #[error("claim {0:?} is already finished differently")]
    AlreadyFinished(Stamp),
    /// The claim's lease ran out: it can no longer be released or extended (only completed:
    /// once a lease is over, other regions may rely on the claim staying as it is).
    #[error("the lease of claim {claim:?} ran out at {lease_until_ms}")]
    LeaseRanOut {
        /// The claim.
        claim: Stamp,
        /// When its lease ended, Unix ms.
        lease_until_ms: u64,
    },
    /// The claim was taken over; its lease can no longer be extended.
    #[error("claim {claim:?} was taken over by {by:?}")]
    TakenOver {
        /// The claim.
        claim: Stamp,
        /// Its taker.
        by: Stamp,
    },
    /// The key has no such compensation item.
    #[error("no such item on this key")]
    UnknownItem,
    /// A peer's mutation failed validation; it was not applied.
    #[error("invalid mutation from {origin} seq {seq}: {reason}")]
    InvalidMutation {
        /// Its origin.
        origin: RegionId,
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// The replication log no longer holds what was asked for (beyond retention).
    #[error("log of {origin} is retained from seq {first_retained}")]
    LogTruncated {
        /// The origin asked for.
        origin: RegionId,
        /// The first sequence number still served.
        first_retained: u64,
    },
    /// The store cannot answer safely now.
    #[error("unavailable: {0}")]
    Unavailable(Unavailable),
    /// Bad configuration.
    #[error("config: {0}")]
    Config(String),
    /// A namespace policy was refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A region id was refused.
    #[error(transparent)]
    Region(#[from] RegionIdError),
    /// The log failed; see [`LogError`].
    #[error("log: {0}")]
    Log(LogError),
    /// A log entry could not be decoded, or a back-pointer led to another key: the data
    /// directory is damaged. Nothing was changed.
    #[error("corrupt log entry: {0}")]
    Corrupt(String),
    /// A region cannot retire itself: retire it at a surviving region.
    #[error("a region cannot retire itself; retire it at a surviving region")]
    RetireSelf,
    /// A retirement must name exactly the contiguous prefix of the region's log held here.
    #[error("cannot retire {region} at seq {last_seq}: this region holds its log up to {held}, the number to retire it at; retire it at the region that holds the most")]
    RetireNotAtMark {
        /// The region.
        region: RegionId,
        /// The number asked.
        last_seq: u64,
        /// The contiguous prefix of its log held here.
        held: u64,
    },
    /// The region was retired already, at another number: a retirement is written once.
    #[error("{region} is retired already, at seq {last_seq}")]
    RetireAgain {
        /// The region.
        region: RegionId,
        /// The number it was retired at.
        last_seq: u64,
    },
}

impl From<LogError> for StoreError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Poisoned => StoreError::Unavailable(Unavailable::LogFailed),
            LogError::NoSpace => StoreError::Unavailable(Unavailable::DiskFull),
            other => StoreError::Log(other),
        }
    }
}

impl From<InvalidDelta> for StoreError {
    fn from(e: InvalidDelta) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}
