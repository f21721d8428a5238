//! Recovery: rebuilds the index, sequence numbers, replication marks and the clock's
//! high-water mark from the log.

use super::entry::{self, LogEntry};
use super::index::{IndexEntry, IndexMap};
use super::log::Log;
use super::replication::Replication;
use super::storage::Storage;
use super::StoreError;
use crate::clock::RegionId;

/// What recovery found.
pub(super) struct Recovered {
    /// Next local sequence number.
    pub next_seq: u64,
    /// The largest clock reservation logged.
    pub reservation_ms: Option<u64>,
    /// The largest hlc value in any entry.
    pub max_hlc: u64,
    /// Received marks and log checkpoints.
    pub replication: Replication,
}

/// Replays every durable log entry into `index`.
pub(super) fn replay<S: Storage>(
    log: &Log<S>,
    index: &IndexMap,
    region: RegionId,
) -> Result<Recovered, StoreError> {
    let mut next_seq = 1u64;
    let mut reservation: Option<u64> = None;
    let mut max_hlc = 0u64;
    let mut repl = Replication::default();
    log.replay(|loc, payload| -> Result<(), StoreError> {
        let entry = entry::decode(payload).map_err(|e| {
            StoreError::Corrupt(format!(
                "segment {} offset {}: {e}",
                loc.segment, loc.offset
            ))
        })?;
        match entry {
            LogEntry::Mutation {
                mutation,
                expires_at_ms,
                ..
            } => {
                max_hlc = max_hlc.max(mutation.delta.stamp().hlc);
                if mutation.origin == region {
                    next_seq = next_seq.max(mutation.seq + 1);
                } else {
                    repl.received
                        .entry(mutation.origin)
                        .or_default()
                        .insert(mutation.seq);
                }
                repl.checkpoint(
                    mutation.origin,
                    mutation.seq,
                    loc,
                    mutation.delta.stamp().physical_ms(),
                );
                index.insert(
                    mutation.key.digest(),
                    IndexEntry {
                        loc,
                        lsn: 0,
                        expires_at_ms,
                        hot: None,
                    },
                );
            }
            LogEntry::Image {
                key, expires_at_ms, ..
            } => {
                index.insert(
                    key.digest(),
                    IndexEntry {
                        loc,
                        lsn: 0,
                        expires_at_ms,
                        hot: None,
                    },
                );
            }
            LogEntry::Reserve { until_ms } => {
                reservation = Some(reservation.unwrap_or(0).max(until_ms));
            }
            LogEntry::Marks { .. } => {}
        }
        Ok(())
    })?;
    Ok(Recovered {
        next_seq,
        reservation_ms: reservation,
        max_hlc,
        replication: repl,
    })
}
