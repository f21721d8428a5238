//! Fault profiles: the ranges a seed draws its faults from.

use std::fmt;
use std::str::FromStr;

/// A named set of fault ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Low latency, rare loss, no partitions, small skew.
    Calm,
    /// Every fault, at rates drawn per seed (the default).
    Swarm,
    /// Frequent and long partitions.
    PartitionHeavy,
    /// Large clock offsets between regions (within the max drift).
    ClockChaos,
    /// Frequent process crashes, each dropping or tearing unsynced writes.
    DiskChaos,
}

impl Profile {
    /// Every profile, for help texts.
    pub const ALL: [Profile; 5] = [
        Profile::Calm,
        Profile::Swarm,
        Profile::PartitionHeavy,
        Profile::ClockChaos,
        Profile::DiskChaos,
    ];
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Calm => "calm",
            Profile::Swarm => "swarm",
            Profile::PartitionHeavy => "partition-heavy",
            Profile::ClockChaos => "clock-chaos",
            Profile::DiskChaos => "disk-chaos",
        })
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Profile::ALL
            .into_iter()
            .find(|p| p.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Profile::ALL.iter().map(|p| p.to_string()).collect();
                format!("unknown profile {s:?}; one of {}", names.join(", "))
            })
    }
}

/// Fault rates for one run, drawn from the profile's ranges by the seed.
#[derive(Debug, Clone)]
pub struct Faults {
    /// One-way latency between two regions: base per link in this range, ms.
    pub latency_ms: (u64, u64),
    /// Extra latency per message, up to this many ms (reorders messages).
    pub jitter_ms: u64,
    /// Probability (per million) that a message is lost; the transport delivers in order or
    /// not at all, so a loss breaks the connection, which is redialled.
    pub loss_ppm: u32,
    /// Mean time between partition starts in the safety phase, ms (0: none).
    pub partition_every_ms: u64,
    /// Partition duration range, ms.
    pub partition_ms: (u64, u64),
    /// Largest clock offset of a region from true time, ms (either sign).
    pub skew_ms: u64,
    /// Mean time between process crashes (of a random region) in the safety phase, ms (0:
    /// none). A crash drops or tears what the region's disk had not synced.
    pub crash_every_ms: u64,
    /// Probability (per million) per logical request of reusing its key with another payload.
    pub reuse_ppm: u32,
    /// Keys in the Zipf key space.
    pub keys: u64,
    /// In-flight lease of the simulated namespace, ms: short, so that slow operations outlive
    /// it and are taken over.
    pub lease_ms: u64,
    /// Probability (per million) per execution that it runs longer than its lease (then
    /// completes late, perhaps after a takeover).
    pub slow_ppm: u32,
    /// Probability (per million) per execution that its client performs the side effect and
    /// then dies without reporting back: the claim stays in flight until taken over.
    pub abandon_ppm: u32,
    /// Probability (per million) per execution that it fails before any side effect and its
    /// client releases the claim.
    pub release_ppm: u32,
    /// How long each region serves its log to peers, ms: short in some profiles, so that a
    /// region cut off for longer must catch up from a snapshot.
    pub log_retention_ms: u64,
    /// Largest clock rate error of a region, parts per million (either sign).
    pub drift_ppm: u64,
    /// Mean time between clock steps (a region's clock jumps, forwards or backwards) in the
    /// safety phase, ms (0: none).
    pub step_every_ms: u64,
    /// Largest clock step, ms.
    pub step_ms: u64,
    /// Mean time between process pauses (a region stops for a while: no flush, no timer, no
    /// message handled; its clock runs on) in the safety phase, ms (0: none).
    pub pause_every_ms: u64,
    /// Pause length range, ms.
    pub pause_ms: (u64, u64),
    /// Whether the namespace looks keys never seen in a region up at every reachable peer
    /// before granting them.
    pub lookup_on_miss: bool,
    /// Whether one region is lost for good during the safety phase (its disk with it): its
    /// clients fail over, and an operator retires it at the survivor holding most of its log.
    pub lose_region: bool,
}

impl Faults {
    /// Draws the rates of `profile` with `draw(lo, hi)` (inclusive).
    pub fn draw(profile: Profile, mut draw: impl FnMut(u64, u64) -> u64) -> Self {
        let (lat_hi, loss, parts, skew) = match profile {
            Profile::Calm => (5, 100, 0, 20),
            Profile::Swarm => (draw(5, 120), draw(0, 5_000), draw(0, 1), draw(0, 200)),
            Profile::PartitionHeavy => (draw(5, 80), draw(0, 2_000), 1, draw(0, 100)),
            Profile::ClockChaos => (draw(5, 60), draw(0, 1_000), draw(0, 1), draw(150, 240)),
            Profile::DiskChaos => (draw(5, 60), draw(0, 1_000), draw(0, 1), draw(0, 100)),
        };
        let lo = 1 + lat_hi / 4;
        Faults {
            latency_ms: (lo, lat_hi.max(lo)),
            jitter_ms: draw(0, lat_hi / 2 + 1),
            loss_ppm: loss as u32,
            partition_every_ms: match (profile, parts) {
                (_, 0) => 0,
                (Profile::PartitionHeavy, _) => draw(1_000, 4_000),
                _ => draw(3_000, 15_000),
            },
            partition_ms: (
                500,
                if profile == Profile::PartitionHeavy {
                    12_000
                } else {
                    6_000
                },
            ),
            skew_ms: skew,
            crash_every_ms: match profile {
                Profile::Calm => 0,
                Profile::DiskChaos => draw(500, 2_000),
                _ => draw(2_000, 10_000),
            },
            reuse_ppm: draw(0, 60_000) as u32,
            keys: draw(8, 60),
            lease_ms: draw(600, 2_000),
            slow_ppm: if profile == Profile::Calm {
                0
            } else {
                draw(10_000, 60_000) as u32
            },
            abandon_ppm: if profile == Profile::Calm {
                0
            } else {
                draw(0, 20_000) as u32
            },
            release_ppm: draw(10_000, 50_000) as u32,
            drift_ppm: match profile {
                Profile::ClockChaos => 200,
                Profile::Swarm => 50,
                _ => 20,
            },
            step_every_ms: match profile {
                Profile::ClockChaos => draw(2_000, 8_000),
                Profile::Swarm if draw(0, 2) == 0 => draw(5_000, 20_000),
                _ => 0,
            },
            step_ms: if profile == Profile::ClockChaos {
                400
            } else {
                200
            },
            pause_every_ms: match profile {
                Profile::Calm | Profile::ClockChaos => 0,
                _ if draw(0, 1) == 0 => 0,
                _ => draw(3_000, 12_000),
            },
            pause_ms: (50, 3_000),
            lookup_on_miss: profile != Profile::Calm && draw(0, 1) == 1,
            log_retention_ms: match profile {
                Profile::PartitionHeavy => draw(1_000, 5_000),
                Profile::Swarm if draw(0, 1) == 1 => draw(2_000, 8_000),
                _ => 7 * 24 * 3_600_000,
            },
            lose_region: profile == Profile::Swarm && draw(0, 3) == 0,
        }
    }
}
