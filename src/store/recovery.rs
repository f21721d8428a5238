//! Recovery: rebuilds the index, sequence numbers, replication marks and the clock's
//! high-water mark from the log, segment by segment: from a segment's hint file where one is
//! valid, else by decoding its frames (and then writing the hint it lacked, when the segment
//! can never grow again).

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use super::entry::{self, Floor, LogEntry};
use super::hint::{self, Effect};
use super::index::{IndexEntry, IndexMap};
use super::log::{Loc, Log, SegmentRole, FRAME_HEADER_BYTES};
use super::replication::Replication;
use super::storage::{SegmentId, Storage};
use super::StoreError;
use crate::clock::{hlc_physical_ms, RegionId};

/// What recovery found.
#[derive(Debug)]
pub(super) struct Recovered {
    /// Next local sequence number.
    pub next_seq: u64,
    /// The largest clock reservation logged.
    pub reservation_ms: Option<u64>,
    /// The largest hlc value in any entry.
    pub max_hlc: u64,
    /// Received marks and log checkpoints.
    pub replication: Replication,
    /// Retired regions, joined by the largest last number.
    pub retired: BTreeMap<RegionId, u64>,
    /// Segments restored from hints, and segments decoded.
    pub hinted_segments: usize,
    /// Segments whose frames were decoded.
    pub scanned_segments: usize,
}

struct State<'a> {
    index: &'a IndexMap,
    region: RegionId,
    out: Recovered,
}

impl State<'_> {
    fn retire(&mut self, region: RegionId, last_seq: u64) {
        let r = self.out.retired.entry(region).or_insert(last_seq);
        *r = (*r).max(last_seq);
    }

    fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::Record {
                digest,
                loc,
                expires_at_ms,
                numbered,
            } => {
                if let Some((origin, seq, hlc)) = numbered {
                    let out = &mut self.out;
                    out.max_hlc = out.max_hlc.max(*hlc);
                    if *origin == self.region {
                        out.next_seq = out.next_seq.max(seq + 1);
                    } else {
                        out.replication.recovered(*origin, *seq);
                    }
                    out.replication
                        .checkpoint(*origin, *seq, *loc, hlc_physical_ms(*hlc));
                }
                self.index.insert(
                    *digest,
                    IndexEntry {
                        loc: *loc,
                        lsn: 0,
                        expires_at_ms: *expires_at_ms,
                        hot: None,
                    },
                );
            }
            Effect::Reserve { until_ms } => {
                let r = &mut self.out.reservation_ms;
                *r = Some(r.unwrap_or(0).max(*until_ms));
            }
            Effect::Adopt { marks } => {
                for (origin, mark) in marks {
                    if *origin != self.region {
                        self.out.replication.adopt(*origin, *mark, None);
                    }
                }
            }
            Effect::Retire { region, last_seq } => self.retire(*region, *last_seq),
            Effect::Floor(Floor {
                marks,
                reservation_ms,
                max_hlc,
                retired,
            }) => {
                for (origin, mark) in marks {
                    let out = &mut self.out;
                    if *origin == self.region {
                        // Numbers up to the mark were issued: never again.
                        out.next_seq = out.next_seq.max(mark.saturating_add(1));
                        let f = out.replication.adopted.entry(*origin).or_insert(0);
                        *f = (*f).max(*mark);
                    } else {
                        out.replication.adopt(*origin, *mark, None);
                    }
                }
                let r = &mut self.out.reservation_ms;
                *r = Some(r.unwrap_or(0).max(*reservation_ms));
                self.out.max_hlc = self.out.max_hlc.max(*max_hlc);
                for (region, last_seq) in retired {
                    self.retire(*region, *last_seq);
                }
            }
        }
    }
}

/// Replays every durable log entry into `index`.
pub(super) fn replay<S: Storage>(
    log: &Log<S>,
    index: &IndexMap,
    region: RegionId,
    bucket_seqs: u64,
) -> Result<Recovered, StoreError> {
    let mut st = State {
        index,
        region,
        out: Recovered {
            next_seq: 1,
            reservation_ms: None,
            max_hlc: 0,
            replication: Replication::new(bucket_seqs),
            retired: BTreeMap::new(),
            hinted_segments: 0,
            scanned_segments: 0,
        },
    };
    let durable_segment = log.durable_end().segment;
    for seg in log.segments() {
        if seg.role == SegmentRole::Spare {
            continue;
        }
        let sealed = seg.role == SegmentRole::Sealed;
        if sealed {
            if let Some(effects) = valid_hint(log, seg.id)? {
                effects.iter().for_each(|e| st.apply(e));
                st.out.hinted_segments += 1;
                continue;
            }
        }
        let (effects, end) = scan_segment(log, seg.id)?;
        effects.iter().for_each(|e| st.apply(e));
        st.out.scanned_segments += 1;
        if sealed && seg.id < durable_segment {
            if let Some(bytes) = hint::encode(seg.id, end, effects) {
                // A hint only speeds up the next start; failing to write one is not an error.
                let _ = log.storage().put_hint(seg.id, &bytes);
            }
        }
    }
    Ok(st.out)
}

/// Decodes one segment's frames into their effects; returns them and where the frames end.
fn scan_segment<S: Storage>(
    log: &Log<S>,
    segment: SegmentId,
) -> Result<(Vec<Effect>, Loc), StoreError> {
    let mut effects = Vec::new();
    let start = Loc { segment, offset: 0 };
    let mut end = start;
    for_each_entry(log, segment, |loc, len, entry| {
        effects.extend(hint::effect_of(loc, &entry));
        end = Loc {
            segment,
            offset: loc.offset + (len as u64 + FRAME_HEADER_BYTES) as u32,
        };
    })?;
    Ok((effects, end))
}

/// Visits the decoded entries of one segment (durable frames only), in order, with each
/// frame's payload length.
pub(super) fn for_each_entry<S: Storage>(
    log: &Log<S>,
    segment: SegmentId,
    mut f: impl FnMut(Loc, usize, LogEntry),
) -> Result<(), StoreError> {
    log.scan_from(
        Loc { segment, offset: 0 },
        |loc, payload| -> Result<_, StoreError> {
            if loc.segment != segment {
                return Ok(ControlFlow::Break(()));
            }
            f(loc, payload.len(), entry::decode_at(loc, payload)?);
            Ok(ControlFlow::Continue(()))
        },
    )?;
    Ok(())
}

/// Writes the hint of every segment that can never grow again and has none yet. Returns how
/// many were written.
pub(super) fn write_missing_hints<S: Storage>(log: &Log<S>) -> Result<usize, StoreError> {
    let durable_segment = log.durable_end().segment;
    let mut written = 0;
    for seg in log.segments() {
        if seg.role != SegmentRole::Sealed || seg.id >= durable_segment {
            continue;
        }
        if valid_hint(log, seg.id)?.is_some() {
            continue;
        }
        let (effects, end) = scan_segment(log, seg.id)?;
        if let Some(bytes) = hint::encode(seg.id, end, effects) {
            log.storage()
                .put_hint(seg.id, &bytes)
                .map_err(|e| StoreError::Corrupt(format!("writing hint {}: {e}", seg.id)))?;
            written += 1;
        }
    }
    Ok(written)
}

/// A sealed segment's hint, if present, intact and covering the whole segment.
fn valid_hint<S: Storage>(
    log: &Log<S>,
    segment: SegmentId,
) -> Result<Option<Vec<Effect>>, StoreError> {
    let Ok(Some(bytes)) = log.storage().get_hint(segment) else {
        return Ok(None);
    };
    let Some((end, effects)) = hint::decode(segment, &bytes) else {
        return Ok(None);
    };
    if end.segment != segment || !log.ends_at(end).unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some(effects))
}
