//! The region's hybrid logical clock: hlc-gen driven by an injected wall clock, with a durable
//! high-water mark so that no stamp is ever issued twice, even across a crash and a clock that
//! went backwards.
//!
//! # Reservation protocol
//!
//! The clock may only issue stamps whose physical part lies at or below the *reservation* `R`:
//! a wall-clock time recorded in the store's log. The store asks [`Clock::reservation_due`]
//! on every operation; when the wall clock comes within half of the reservation window of `R`,
//! it returns a new value (`now + max_drift / 2`, never more), the store appends it to its log
//! and then calls [`Clock::reservation_logged`]. Only then may stamps above the old `R` be issued.
//!
//! Why "appended" and not "durable" suffices: a stamp leaves the region only inside a log entry
//! (an answer to a caller waits for that entry to be durable; replication ships durable entries
//! only), and that entry follows the reservation in the same log. A crash keeps a prefix of the
//! log, so whenever a stamp was ever seen outside, its reservation is durable. A stamp whose
//! entry a crash took away was never seen by anyone; handing out the same value again is
//! harmless. "Issued" below means exactly that: acknowledged or shipped.
//!
//! After a restart the clock is built with the recovered reservation and refuses to issue stamps
//! ([`ClockError::RestartFence`]) until the wall clock has passed it. Every stamp issued before the
//! crash was at or below that reservation, so every stamp issued after it is larger, even if the
//! wall clock went backwards.
//!
//! The clock never reads the system time itself: every call takes `now_ms` (Unix milliseconds)
//! from the caller, which is the wall clock in the daemon and virtual time in the simulator.

mod stamp;

use std::sync::atomic::{AtomicU64, Ordering};

use hlc_gen::source::ManualClock;
use hlc_gen::{HlcGenerator, HlcTimestamp};

pub use stamp::{
    hlc_floor_of_ms, hlc_physical_ms, RegionId, RegionIdError, Stamp, StampParseError,
    HLC_EPOCH_UNIX_MS, HLC_LOGICAL_BITS, REGION_ID_LEN_MAX,
};

/// The system's wall clock in Unix milliseconds. For the I/O shell (daemon, CLI, examples)
/// only: the core never calls it, it takes `now_ms` from its caller.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Default bound on how far a peer's stamp may run ahead of our wall clock.
pub const MAX_DRIFT_MS_DEFAULT: u64 = 500;

/// Clock settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockConfig {
    /// How far (ms) a received stamp may be ahead of the local wall clock and still advance the
    /// clock. The reservation window is half of it.
    pub max_drift_ms: u64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            max_drift_ms: MAX_DRIFT_MS_DEFAULT,
        }
    }
}

impl ClockConfig {
    /// How far ahead of the wall clock a reservation may reach.
    pub fn reservation_window_ms(&self) -> u64 {
        (self.max_drift_ms / 2).max(2)
    }
}

/// Why the clock cannot issue a stamp now. Every variant leaves the clock consistent; the store
/// answers `Unavailable` and the caller retries later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// The region restarted and its wall clock has not yet passed the reservation recovered from
    /// the log: a stamp now could repeat one issued before the crash.
    #[error(
        "restarted: waiting for the wall clock to pass the recovered reservation ({until_ms} ms)"
    )]
    RestartFence {
        /// Unix ms the wall clock must pass.
        until_ms: u64,
    },
    /// The next stamp would exceed the reservation and no renewal has been logged.
    #[error("clock reservation not logged yet (reserved up to {reserved_ms} ms)")]
    ReservationPending {
        /// The durable reservation, Unix ms.
        reserved_ms: u64,
    },
    /// hlc-gen's 22-bit logical counter ran out within one millisecond, or the time cannot be
    /// encoded (before hlc-gen's 2024 epoch or past its range).
    #[error("hlc cannot issue a stamp: {0}")]
    Exhausted(&'static str),
}

/// What happened to a received stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The clock advanced past (or was already past) the stamp.
    Advanced,
    /// The stamp is further ahead of our wall clock than the max drift, or beyond what our
    /// durable reservation allows: it did not move the clock. The data it came with is still
    /// merged; the caller counts and alarms.
    TooFarAhead {
        /// How far the stamp's physical time is ahead of our wall clock, in ms.
        ahead_ms: u64,
    },
}

/// A region's hybrid logical clock. Thread-safe; one per store, no global state.
pub struct Clock {
    region: RegionId,
    config: ClockConfig,
    hlc: HlcGenerator<ManualClock>,
    /// Logged reservation, Unix ms: no stamp's physical part may exceed it.
    reserved_ms: AtomicU64,
    /// A reservation handed out by `reservation_due` and not yet logged (0 if none).
    pending_ms: AtomicU64,
    /// After a restart: no stamp until the wall clock is past this (Unix ms).
    restart_fence_ms: u64,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("region", &self.region)
            .field("last", &self.last_hlc())
            .field("reserved_ms", &self.reserved_ms())
            .field("restart_fence_ms", &self.restart_fence_ms)
            .finish()
    }
}

impl Clock {
    /// A clock for `region`. `recovered_reservation_ms` is the largest reservation found in the
    /// log (None for a brand-new region); `max_hlc_seen` the largest hlc value found there.
    pub fn new(
        region: RegionId,
        config: ClockConfig,
        recovered_reservation_ms: Option<u64>,
        max_hlc_seen: u64,
    ) -> Self {
        let hlc = HlcGenerator::manual(config.max_drift_ms as usize);
        let floor = recovered_reservation_ms.unwrap_or(0);
        let clock = Self {
            region,
            config,
            hlc,
            reserved_ms: AtomicU64::new(floor),
            pending_ms: AtomicU64::new(0),
            restart_fence_ms: floor,
        };
        // Seed the generator with what the log proves was seen, clamped to the reservation: a
        // peer's stamp too far ahead must not drag the clock past what it may issue (stamps
        // issued after the fence are above the reservation anyway, so above every own stamp).
        let max_hlc_seen = match recovered_reservation_ms {
            Some(r) => max_hlc_seen.min(hlc_floor_of_ms(r.saturating_add(1)).saturating_sub(1)),
            None => 0,
        };
        if max_hlc_seen > 0 {
            if let Ok(ts) = HlcTimestamp::try_from(max_hlc_seen) {
                clock
                    .hlc
                    .set_current_timestamp(ts.timestamp().max(floor as i64));
                let _ = clock.hlc.update(&ts);
            }
        }
        clock
    }

    /// The region this clock stamps for.
    pub fn region(&self) -> RegionId {
        self.region
    }

    /// The clock's settings.
    pub fn config(&self) -> ClockConfig {
        self.config
    }

    /// The logged reservation (Unix ms): no stamp exceeds it.
    pub fn reserved_ms(&self) -> u64 {
        self.reserved_ms.load(Ordering::Acquire)
    }

    /// The reservation the clock was restarted with; stamps wait until the wall clock passes it.
    pub fn restart_fence_ms(&self) -> u64 {
        self.restart_fence_ms
    }

    /// The last hlc value issued or observed.
    pub fn last_hlc(&self) -> u64 {
        self.hlc.timestamp().as_u64()
    }

    fn feed(&self, now_ms: u64) {
        // max(wall clock, restart floor): a wall clock that went back never drags the clock down.
        let fed = now_ms.max(self.restart_fence_ms);
        self.hlc
            .set_current_timestamp(i64::try_from(fed).unwrap_or(i64::MAX));
    }

    /// Issues the next stamp at wall time `now_ms`.
    pub fn stamp(&self, now_ms: u64) -> Result<Stamp, ClockError> {
        if now_ms <= self.restart_fence_ms {
            return Err(ClockError::RestartFence {
                until_ms: self.restart_fence_ms,
            });
        }
        if now_ms < HLC_EPOCH_UNIX_MS {
            return Err(ClockError::Exhausted("wall clock is before the 2024 epoch"));
        }
        self.feed(now_ms);
        let ts = self.hlc.next_timestamp().ok_or(ClockError::Exhausted(
            "logical counter exhausted or time out of range",
        ))?;
        let reserved = self.reserved_ms();
        if ts.timestamp() as u64 > reserved {
            // The generator moved past the reservation; the stamp is discarded unissued, which
            // only skips values and never repeats one.
            return Err(ClockError::ReservationPending {
                reserved_ms: reserved,
            });
        }
        Ok(Stamp::new(ts.as_u64(), self.region))
    }

    /// A new reservation to log, if one is due at `now_ms` and none is pending.
    ///
    /// Due once the wall clock is within half a window of the logged reservation. The value is
    /// `now_ms + window`, which keeps the reservation at most half the max drift ahead.
    pub fn reservation_due(&self, now_ms: u64) -> Option<u64> {
        let window = self.config.reservation_window_ms();
        if now_ms + window / 2 < self.reserved_ms() {
            return None;
        }
        let want = now_ms + window;
        self.pending_ms
            .compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| want)
    }

    /// Tells the clock that the reservation `until_ms` was appended to the log, ahead of any
    /// entry that will carry a stamp above the previous one.
    pub fn reservation_logged(&self, until_ms: u64) {
        self.reserved_ms.fetch_max(until_ms, Ordering::AcqRel);
        let _ = self
            .pending_ms
            .compare_exchange(until_ms, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Drops a pending reservation that could not be logged, so a later call to [`Clock::reservation_due`] hands out a fresh one.
    pub fn reservation_abandoned(&self, until_ms: u64) {
        let _ = self
            .pending_ms
            .compare_exchange(until_ms, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Feeds a stamp received from a peer (or found in merged data) through hlc `update`, with
    /// the max-drift check. A stamp that is too far ahead, or beyond the reservation, is not used
    /// to advance the clock.
    pub fn observe(&self, now_ms: u64, remote: Stamp) -> Observed {
        let remote_ms = remote.physical_ms();
        let ahead_ms = remote_ms.saturating_sub(now_ms);
        if ahead_ms > self.config.max_drift_ms || remote_ms > self.reserved_ms() {
            if remote.hlc <= self.last_hlc() {
                return Observed::Advanced;
            }
            return Observed::TooFarAhead { ahead_ms };
        }
        let Ok(ts) = HlcTimestamp::try_from(remote.hlc) else {
            return Observed::TooFarAhead { ahead_ms };
        };
        self.feed(now_ms);
        match self.hlc.update(&ts) {
            Ok(_) => Observed::Advanced,
            Err(_) => Observed::TooFarAhead { ahead_ms },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_900_000_000_000; // 2030-03-17, well after hlc-gen's epoch

    fn region(s: &str) -> RegionId {
        RegionId::new(s).unwrap()
    }

    fn ready_clock(now: u64) -> Clock {
        let c = Clock::new(region("a"), ClockConfig::default(), None, 0);
        let r = c.reservation_due(now).unwrap();
        c.reservation_logged(r);
        c
    }

    #[test]
    fn a_new_clock_waits_for_its_first_reservation() {
        let c = Clock::new(region("a"), ClockConfig::default(), None, 0);
        assert!(matches!(
            c.stamp(T0),
            Err(ClockError::ReservationPending { .. })
        ));
        let r = c.reservation_due(T0).expect("due");
        assert_eq!(r, T0 + 250, "half the max drift ahead, no more");
        assert!(c.reservation_due(T0).is_none(), "one pending at a time");
        c.reservation_logged(r);
        assert!(c.stamp(T0).is_ok());
    }

    #[test]
    fn stamps_strictly_increase_even_when_the_wall_clock_stalls_or_goes_back() {
        let c = ready_clock(T0);
        let mut last = c.stamp(T0).unwrap();
        for now in [T0, T0, T0 - 50, T0 + 1, T0 - 10] {
            let s = c.stamp(now).unwrap();
            assert!(s > last, "{s:?} after {last:?}");
            last = s;
        }
    }

    #[test]
    fn no_stamp_exceeds_the_logged_reservation() {
        let c = ready_clock(T0);
        let reserved = c.reserved_ms();
        // Wall clock jumps past the reservation before the renewal is logged.
        let err = c.stamp(reserved + 1).unwrap_err();
        assert_eq!(
            err,
            ClockError::ReservationPending {
                reserved_ms: reserved
            }
        );
        let r = c.reservation_due(reserved + 1).unwrap();
        c.reservation_logged(r);
        let s = c.stamp(reserved + 1).unwrap();
        assert!(s.physical_ms() <= c.reserved_ms());
    }

    #[test]
    fn renewal_is_due_before_the_reservation_is_reached() {
        let c = ready_clock(T0);
        let reserved = c.reserved_ms();
        assert!(c.reservation_due(T0 + 10).is_none());
        let due = c
            .reservation_due(reserved - 100)
            .expect("due within half a window");
        assert!(due > reserved);
        // Until the renewal is logged, stamps up to the old reservation still flow.
        assert!(c.stamp(reserved - 100).is_ok());
    }

    #[test]
    fn restart_fences_until_the_wall_clock_passes_the_recovered_reservation() {
        let before = ready_clock(T0);
        let issued = before.stamp(T0).unwrap();
        let reserved = before.reserved_ms();
        // Crash; the wall clock went back by a second.
        let after = Clock::new(
            region("a"),
            ClockConfig::default(),
            Some(reserved),
            issued.hlc,
        );
        let back = T0 - 1_000;
        assert_eq!(
            after.stamp(back),
            Err(ClockError::RestartFence { until_ms: reserved })
        );
        let r = after.reservation_due(reserved + 1).unwrap();
        after.reservation_logged(r);
        let s = after.stamp(reserved + 1).unwrap();
        assert!(s > issued);
    }

    #[test]
    fn observing_a_peer_stamp_moves_the_clock_past_it() {
        let c = ready_clock(T0);
        let peer = Stamp::new(hlc_floor_of_ms(T0 + 100) + 5, region("b"));
        assert_eq!(c.observe(T0, peer), Observed::Advanced);
        let s = c.stamp(T0).unwrap();
        assert!(s.hlc > peer.hlc);
    }

    #[test]
    fn a_stamp_beyond_the_max_drift_does_not_move_the_clock() {
        let c = ready_clock(T0);
        let before = c.last_hlc();
        let peer = Stamp::new(hlc_floor_of_ms(T0 + 10_000), region("b"));
        assert_eq!(
            c.observe(T0, peer),
            Observed::TooFarAhead { ahead_ms: 10_000 }
        );
        assert_eq!(c.last_hlc(), before);
    }

    #[test]
    fn a_stamp_within_drift_but_beyond_the_reservation_does_not_move_the_clock() {
        let c = ready_clock(T0);
        let peer = Stamp::new(hlc_floor_of_ms(c.reserved_ms() + 100), region("b"));
        assert!(matches!(c.observe(T0, peer), Observed::TooFarAhead { .. }));
        assert!(c.stamp(T0).unwrap().physical_ms() <= c.reserved_ms());
    }

    #[test]
    fn an_exhausted_logical_counter_is_an_error_not_a_panic() {
        let c = ready_clock(T0);
        let mut exhausted = false;
        for _ in 0..(1u32 << HLC_LOGICAL_BITS) + 2 {
            match c.stamp(T0) {
                Ok(_) => {}
                Err(ClockError::Exhausted(_)) => {
                    exhausted = true;
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(exhausted);
    }

    #[test]
    fn a_time_before_the_epoch_is_an_error() {
        let c = Clock::new(region("a"), ClockConfig::default(), None, 0);
        c.reservation_logged(HLC_EPOCH_UNIX_MS - 1);
        assert!(matches!(
            c.stamp(HLC_EPOCH_UNIX_MS - 1_000),
            Err(ClockError::Exhausted(_))
        ));
    }
}
