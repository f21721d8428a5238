//! Segmented, CRC-framed, group-committed write-ahead log of opaque payloads.
//!
//! # Layout
//!
//! A log is a sequence of segments (see [`Storage`]), ordered by [`SegmentId`]. Each holds frames
//! `[len: u32 LE][crc32c(len bytes ++ payload): u32 LE][payload]` back to back from offset 0,
//! followed by preallocated zeroes. A zero `len`, fewer than 8 bytes left, a CRC mismatch or a frame
//! running past the segment marks the end of valid data. Empty payloads are refused so that a zero
//! `len` can only mean "end".
//!
//! # Durability and ordering
//!
//! [`Log::append`] only buffers. [`Log::flush`] / [`Log::wait_durable`] write and fdatasync; many
//! appenders share one sync (group commit, leader/follower). When a flush spans a segment roll, the
//! older segment is written *and synced* before the first byte of the newer one is written. Hence
//! on disk, if a segment holds any frame, every earlier segment is complete and synced: only the
//! last segment that holds a frame can have a torn tail. Recovery relies on that.
//!
//! # Failure
//!
//! The first failed write or sync poisons the log for good: every later append, flush and wait
//! returns [`LogError::Poisoned`], and the log never retries the sync. After a failed fsync Linux
//! may already have dropped the dirty pages and marked them clean, so a retry that "succeeds" would
//! acknowledge data that is not on disk. Restarting (which runs recovery) is the only way on.
//!
//! # Space for work already promised
//!
//! Segments are preallocated, so "the disk is full" shows up as a failure to create the next
//! segment, never in the middle of a write. The log keeps the *preallocated free space* (the rest of
//! the active segment plus every spare segment, oldest first) large enough for what it promised:
//! [`Log::reserve_space`] promises bytes of future [`AppendClass::Reserved`] appends and creates
//! spare segments until they are covered (or fails with [`LogError::NoSpace`] and promises
//! nothing); [`Log::release_space`] returns a promise. A [`AppendClass::Normal`] append is refused
//! when, after it, the free space would no longer cover the outstanding promises plus
//! [`LogConfig::reserve_bytes`] and no further segment can be created. Because a frame never spans
//! two segments, each segment is counted without the largest promised frame's worth of bytes, which
//! is the most a roll can leave unused (see [`Log::reserve_space`]).
//!
//! # Who flushes
//!
//! Either the callers themselves ([`Log::wait_durable`]: the first waiter leads a flush of
//! everything buffered, the others wait for it and share its sync), or a dedicated flusher thread
//! looping on [`Log::flush_appended`] while callers only wait ([`Log::wait_durable_for`]): then
//! the next group builds up while the current one syncs, and no caller's thread ever blocks in
//! fdatasync. Both may run at once; one flush runs at a time.
//!
//! # Lsn
//!
//! An [`Lsn`] counts frames appended through this `Log` value: the first append after
//! [`Log::open`] gets 1, and 0 means "nothing appended yet". It is not persisted and restarts at 0 on
//! every open; frames found at open are all durable and have no Lsn. Use [`Loc`] for anything that
//! must survive a restart; use Lsn only to ask "is this append durable yet".

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::crc;
use super::encode;
use super::reserve;

use serde::{Deserialize, Serialize};

use super::storage::{is_no_space, SegmentId, Storage};

/// A frame count since the log was opened; see the module docs for why it is not persistent.
pub type Lsn = u64;

/// Bytes of frame header: length and CRC.
pub const FRAME_HEADER_BYTES: u64 = 8;

/// Where a frame starts. Stable across restarts (until its segment is removed), so the store's
/// index can point into the log with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Loc {
    /// Segment holding the frame.
    pub segment: SegmentId,
    /// Byte offset of the frame header within the segment.
    pub offset: u32,
}

impl Loc {
    fn pack(self) -> u64 {
        (u64::from(self.segment) << 32) | u64::from(self.offset)
    }

    fn unpack(v: u64) -> Loc {
        Loc {
            segment: (v >> 32) as u32,
            offset: v as u32,
        }
    }
}

/// Whether an append may use the space held back for when the disk is full.
///
/// Finishing work already promised (completing or releasing a granted claim) must not fail because
/// new claims filled the disk, so new work is refused first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppendClass {
    /// New work (a new claim): refused once only the reserve is left.
    Normal,
    /// Work that finishes something already granted: may use the reserve.
    Reserved,
}

/// Tuning of a [`Log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Size of each segment, preallocated when the segment is created. At most `u32::MAX`, since
    /// [`Loc::offset`] is 32 bits.
    pub segment_bytes: u64,
    /// Largest payload accepted; bounds memory when reading a frame whose header is damaged.
    pub max_payload_bytes: u32,
    /// Preallocated bytes that only [`AppendClass::Reserved`] appends may use, on top of the
    /// outstanding [`Log::reserve_space`] promises: a floor for small finishing writes that hold
    /// no promise of their own (clock reservations, lease extensions, releases). Best effort: such
    /// writes beyond the floor eat into the promises of others.
    pub reserve_bytes: u64,
    /// PLANTED BUG for crash tests, never set it otherwise: the log acknowledges a flush after
    /// writing but *before* syncing its last segment (the sync is deferred to the next flush), so a
    /// crash loses acknowledged frames. Exists to prove that crash tests can fail.
    #[doc(hidden)]
    pub ack_before_sync_for_tests: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 64 << 20,
            max_payload_bytes: 16 << 20,
            reserve_bytes: 1 << 20,
            ack_before_sync_for_tests: false,
        }
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), LogError> {
        let bad = |why: &str| Err(LogError::Config(why.to_string()));
        if self.segment_bytes > u64::from(u32::MAX) {
            return bad("segment_bytes must fit in u32 offsets");
        }
        if self.max_payload_bytes == 0 {
            return bad("max_payload_bytes must be positive");
        }
        if u64::from(self.max_payload_bytes) + FRAME_HEADER_BYTES > self.segment_bytes {
            return bad("a frame of max_payload_bytes must fit in an empty segment");
        }
        if self.reserve_bytes >= self.segment_bytes {
            return bad("reserve_bytes must be smaller than segment_bytes");
        }
        Ok(())
    }
}

/// Everything that can go wrong in the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The storage failed; `context` says what the log was doing.
    #[error("log I/O error while {context}: {source}")]
    Io {
        /// What the log was doing, with the segment involved.
        context: String,
        /// The storage error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed; the log refuses all further work (see module docs).
    #[error("log is poisoned by an earlier write or sync failure; restart to recover")]
    Poisoned,
    /// The disk is full: no space for this append (outside the reserve, for normal appends).
    #[error("log has no space left for this append")]
    NoSpace,
    /// The payload exceeds [`LogConfig::max_payload_bytes`].
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// Configured limit.
        max: u32,
    },
    /// Empty payloads cannot be framed: a zero length marks the end of a segment.
    #[error("empty payloads cannot be appended")]
    EmptyPayload,
    /// A sealed segment (or already validated data) does not hold a valid frame where it must.
    #[error("corrupt log segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        /// Segment holding the damage.
        segment: SegmentId,
        /// Offset of the frame that does not check out.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// No frame starts at this location (never appended, or its segment was removed).
    #[error("no frame at {loc:?}: {reason}")]
    BadLoc {
        /// The location asked for.
        loc: Loc,
        /// Why it is not readable.
        reason: String,
    },
    /// `wait_durable` for an Lsn this log never handed out: it would wait forever.
    #[error("lsn {lsn} was never appended (last appended: {appended})")]
    LsnNotAppended {
        /// The Lsn asked for.
        lsn: Lsn,
        /// The last Lsn handed out.
        appended: Lsn,
    },
    /// The segment cannot be removed now.
    #[error("segment {segment} cannot be removed: {reason}")]
    SegmentBusy {
        /// The segment.
        segment: SegmentId,
        /// Why not.
        reason: &'static str,
    },
    /// The configuration is inconsistent.
    #[error("invalid log config: {0}")]
    Config(String),
}

/// Wraps a storage error with what the log was doing; the context is built only on failure.
fn io_err<C: FnOnce() -> String>(context: C) -> impl FnOnce(io::Error) -> LogError {
    move |source| LogError::Io {
        context: context(),
        source,
    }
}

/// Role of a segment in [`Log::segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentRole {
    /// Complete; a candidate for removal once nothing needs its frames.
    Sealed,
    /// Receiving appends.
    Active,
    /// Preallocated and empty, next to become active.
    Spare,
}

/// A segment as seen by [`Log::segments`], for garbage collection and inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The segment.
    pub id: SegmentId,
    /// Role now.
    pub role: SegmentRole,
    /// Allocated size in bytes.
    pub size: u64,
    /// Start of the first frame, if it has one and it is known.
    pub first: Option<Loc>,
    /// Start of the last frame, if known: sealed segments found at open are known only after
    /// [`Log::replay`] has scanned them.
    pub last: Option<Loc>,
    /// End of the frames (where the next one would go), if known.
    pub end: Option<Loc>,
}

/// A function told the duration of each data sync (see [`Log::set_sync_observer`]).
pub type SyncObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// Counters for benches and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Data syncs (fdatasync) issued.
    pub syncs: u64,
    /// Flushes that wrote something (each is one group commit).
    pub flushes: u64,
    /// Frames written to storage.
    pub frames_written: u64,
    /// Bytes written to storage.
    pub bytes_written: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Bytes promised by [`Log::reserve_space`] and not yet released.
    pub reserved_bytes: u64,
    /// Preallocated empty segments waiting to become active.
    pub spares: u64,
    /// Preallocated bytes not yet used: the rest of the active segment plus the spares.
    pub free_bytes: u64,
    /// Zero-fill steps written ahead of the frames (see [`Storage::zero_ahead_bytes`]).
    pub zero_fills: u64,
}

/// Frames buffered for one segment, contiguous from `offset`.
#[derive(Debug)]
struct Chunk {
    segment: SegmentId,
    /// The segment's allocated size when the chunk was started (bounds zero-filling ahead).
    segment_size: u64,
    offset: u64,
    data: Vec<u8>,
    frames: u64,
}

impl Chunk {
    /// The payload of the frame at `loc`, if it lies in this chunk.
    fn payload(&self, loc: Loc) -> Option<&[u8]> {
        let off = u64::from(loc.offset);
        if loc.segment != self.segment || off < self.offset {
            return None;
        }
        let rel = usize::try_from(off - self.offset).ok()?;
        let hdr = self.data.get(rel..rel.checked_add(8)?)?;
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        self.data.get(rel + 8..rel + 8 + len)
    }
}

/// What [`Log::append_inner`] appends.
enum Payload<'a> {
    /// Bytes as they are.
    Plain(&'a [u8]),
    /// A local mutation entry without its sequence-number trailer, and the CRC of its frame
    /// so far (length, then these bytes), computed before taking the lock.
    Sequenced(&'a [u8], u32),
}

impl Payload<'_> {
    /// The payload's length in the frame (with the trailer a sequenced entry gets).
    fn len(&self) -> usize {
        match self {
            Payload::Plain(b) => b.len(),
            Payload::Sequenced(b, _) => b.len() + encode::SEQ_TRAILER_BYTES,
        }
    }
}

/// Local sequence numbers: the next one, and the log positions of recent ones, so the durable
/// prefix of this region's own log can be reported ([`Log::durable_seq`]).
#[derive(Debug)]
struct Sequencer {
    next: u64,
    /// (seq, lsn) of recent appends, oldest first. Appends happen under the log's lock, so both
    /// columns ascend together.
    recent: VecDeque<(u64, Lsn)>,
    /// The newest (seq, lsn) pushed out of `recent` when it was full.
    dropped: Option<(u64, Lsn)>,
    /// The largest seq known durable.
    durable: u64,
}

impl Sequencer {
    const RECENT_MAX: usize = 4096;

    fn new(next: u64) -> Self {
        let next = next.max(1);
        Self {
            next,
            recent: VecDeque::new(),
            durable: next - 1,
            dropped: None,
        }
    }

    fn appended(&mut self, seq: u64, lsn: Lsn) {
        self.next = seq + 1;
        if self.recent.len() >= Self::RECENT_MAX {
            self.dropped = self.recent.pop_front();
        }
        self.recent.push_back((seq, lsn));
    }

    /// The largest local seq whose entry is durable, given the durable lsn.
    fn durable_mark(&mut self, durable_lsn: Lsn) -> u64 {
        if let Some((seq, lsn)) = self.dropped {
            if lsn <= durable_lsn {
                self.durable = self.durable.max(seq);
                self.dropped = None;
            }
        }
        while let Some(&(seq, lsn)) = self.recent.front() {
            if lsn > durable_lsn {
                break;
            }
            self.durable = self.durable.max(seq);
            self.recent.pop_front();
        }
        self.durable
    }
}

/// A promise of space for one later frame, kept until its claim's lease ends (see the store's
/// `reserve` module): the log books promises per second of lease end, so a promise is found
/// again from its lease end and expires with it ([`Log::expire_promises`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promise {
    /// Bytes promised (at least the frame's [`Log::frame_bytes`]).
    pub bytes: u64,
    /// When the claim's lease ends, Unix ms.
    pub lease_until_ms: u64,
}

/// Disk-space promises that travel with an append ([`Log::append_with_space`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    /// A promise to make for a later [`AppendClass::Reserved`] frame (as
    /// [`Log::reserve_space`], and booked by lease end).
    pub reserve: Option<Promise>,
    /// The promise this frame fulfils: returned if it is still booked.
    pub release: Option<Promise>,
}

/// Per-segment bookkeeping.
#[derive(Debug, Clone, Copy)]
struct SegMeta {
    size: u64,
    last: Option<u32>,
    end: Option<u32>,
}

/// Checks of the durable Lsn a follower makes before sleeping on a flush in progress (a few
/// microseconds), on storages that sync in microseconds.
const SPIN_ROUNDS: u32 = 400;

/// Retry creating the spare segment after this many flushes while the disk is full.
const SPARE_RETRY_FLUSHES: u32 = 64;

#[derive(Debug)]
struct State {
    appended: Lsn,
    /// Frames appended but not yet taken by a flusher, in order.
    chunks: Vec<Chunk>,
    /// Frames taken by the flusher in progress, readable until their write has completed.
    inflight: Option<Arc<Vec<Chunk>>>,
    /// The list of chunks the last flush wrote, emptied, kept for the next flush.
    written: Option<Arc<Vec<Chunk>>>,
    flushing: bool,
    /// Threads waiting on the condition variable for the flush in progress.
    waiters: usize,
    /// A flusher waits in [`Log::flush_appended`] for the next append.
    flusher_idle: bool,
    /// Local sequence numbers ([`Log::append_sequenced`]).
    seq: Sequencer,
    /// Promises booked by lease end ([`Space`]).
    leases: reserve::Promises,
    active: SegmentId,
    /// Allocated size of the active segment.
    active_size: u64,
    /// Where the next frame goes in the active segment.
    end: u64,
    /// Preallocated, empty segments (each `segment_bytes` long, directory entry synced), next to
    /// become active first. Ids increase along the queue and exceed `active`.
    spares: VecDeque<SegmentId>,
    /// A thread is creating a spare outside the lock; whoever needs one meanwhile waits.
    creating: bool,
    /// The last attempt to create a spare failed (normally ENOSPC): until a retry succeeds,
    /// appends and reservations that need one more segment get [`LogError::NoSpace`] at once.
    grow_failed: bool,
    spare_retry_in: u32,
    next_id: SegmentId,
    /// Bytes promised by [`Log::reserve_space`], outstanding.
    reserved: u64,
    /// Outstanding promises by size (capped at the largest frame): size -> count, with up to
    /// [`PROMISE_CLASSES_KEPT`] sizes kept at count zero. The largest size with a nonzero count
    /// bounds what a roll can leave unused at the end of a segment.
    promises: BTreeMap<u64, u64>,
    segs: BTreeMap<SegmentId, SegMeta>,
    /// Test knob only: a segment written but not yet synced by an acknowledged flush.
    deferred_sync: Option<SegmentId>,
    /// Buffer reused for the next chunk, to avoid reallocating on every flush.
    recycled: Vec<u8>,
}

/// Size classes of [`State::promises`] kept at count zero, so a store whose claims come and go
/// one at a time does not allocate and free a tree node for every claim.
const PROMISE_CLASSES_KEPT: usize = 8;

/// Bytes of a segment with `free` bytes left that frames of at most `slack + 1` bytes are sure to
/// fill: frames are placed in order and a roll happens only when the next one does not fit, so a
/// roll leaves at most `slack` bytes unused.
fn usable(free: u64, slack: u64) -> u64 {
    free.saturating_sub(slack)
}

impl State {
    /// The most a roll can leave unused at a segment's end while the promised frames come in.
    fn slack(&self) -> u64 {
        self.promises
            .iter()
            .rev()
            .find(|&(_, &n)| n > 0)
            .map_or(0, |(&f, _)| f.saturating_sub(1))
    }

    /// Preallocated free space promised frames are sure to fit in (`seg`: size of a spare).
    fn guaranteed(&self, seg: u64, slack: u64) -> u64 {
        let active = usable(self.active_size.saturating_sub(self.end), slack);
        let spares = (self.spares.len() as u64).saturating_mul(usable(seg, slack));
        active.saturating_add(spares)
    }

    /// [`State::guaranteed`] once a frame of `frame` bytes is placed; `None` if placing it needs
    /// a segment that does not exist yet.
    fn guaranteed_after(&self, frame: u64, seg: u64, slack: u64) -> Option<u64> {
        if self.end + frame <= self.active_size {
            let active = usable(self.active_size - self.end - frame, slack);
            let spares = (self.spares.len() as u64).saturating_mul(usable(seg, slack));
            Some(active.saturating_add(spares))
        } else if self.spares.is_empty() {
            None
        } else {
            let active = usable(seg.saturating_sub(frame), slack);
            let spares = (self.spares.len() as u64 - 1).saturating_mul(usable(seg, slack));
            Some(active.saturating_add(spares))
        }
    }

    /// Returns a promise of `bytes` counted under size class `key`.
    fn release(&mut self, bytes: u64, key: u64) {
        debug_assert!(
            bytes <= self.reserved,
            "releasing {bytes} bytes, only {} promised",
            self.reserved
        );
        self.reserved = self.reserved.saturating_sub(bytes);
        if let Some(n) = self.promises.get_mut(&key) {
            *n = n.saturating_sub(1);
            // A size class that drops to zero stays (a claim of the same size usually follows:
            // removing and re-inserting would free and allocate a tree node per claim) unless
            // stale classes pile up.
            if *n == 0 && self.promises.len() > PROMISE_CLASSES_KEPT {
                self.promises.remove(&key);
            }
        }
        if self.reserved == 0 {
            // Releases that did not match a promise's size leave stale counts behind; zero them.
            if self.promises.len() > PROMISE_CLASSES_KEPT {
                self.promises.clear();
            } else {
                self.promises.values_mut().for_each(|n| *n = 0);
            }
        }
    }

    /// Preallocated bytes not yet used, counted plainly.
    fn free_bytes(&self, seg: u64) -> u64 {
        self.active_size
            .saturating_sub(self.end)
            .saturating_add((self.spares.len() as u64).saturating_mul(seg))
    }
}

/// The write-ahead log. Share it by reference or `Arc`; every method takes `&self`.
pub struct Log<S: Storage> {
    storage: S,
    cfg: LogConfig,
    state: Mutex<State>,
    cv: Condvar,
    /// Wakes a flusher idle in [`Log::flush_appended`].
    appended_cv: Condvar,
    durable: AtomicU64,
    /// Packed [`Loc`] just past the last durable frame; scans stop there.
    durable_end: AtomicU64,
    poisoned: AtomicBool,
    syncs: AtomicU64,
    /// Told how long each data sync took (metrics only: it decides nothing).
    sync_observer: std::sync::OnceLock<SyncObserver>,
    flushes: AtomicU64,
    frames_written: AtomicU64,
    bytes_written: AtomicU64,
    segments_created: AtomicU64,
    /// Zero-filling ahead (see [`Storage::zero_ahead_bytes`]): the segment and the offset up to
    /// which it is known written. Touched only by the flush leader.
    zeroed: Mutex<(SegmentId, u64)>,
    zero_fills: AtomicU64,
    /// The booked promises' sweep mark, readable without the lock.
    leases_swept: AtomicU64,
}

impl<S: Storage> std::fmt::Debug for Log<S> {
    // Buffered payloads can be large and sensitive: show positions and counters only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("durable_lsn", &self.durable_lsn())
            .field("durable_end", &self.durable_end())
            .field("poisoned", &self.is_poisoned())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex even if a panicking thread poisoned it: every update under it is completed
/// before anything can fail, and an I/O path must not panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc::frame(len_bytes, payload)
}

/// Outcome of decoding one frame at an offset.
enum Frame<'a> {
    Valid(&'a [u8]),
    /// Clean end: zero length or not enough room for a header.
    End,
    /// Something that is neither a frame nor a clean end.
    Invalid(String),
}

/// Reads a segment front to back in large chunks so recovery and scans cost one pread per MiB,
/// not two per frame; or, for a point read of one frame, in a small chunk that holds most
/// frames whole.
struct SegReader<'s, S: Storage> {
    storage: &'s S,
    seg: SegmentId,
    size: u64,
    max_payload: u32,
    /// Least bytes read at once.
    chunk: usize,
    buf: Vec<u8>,
    buf_off: u64,
}

/// Read size of scans.
const READ_CHUNK: usize = 1 << 20;
/// Read size of a point read: one pread for a frame up to this size, header included.
const POINT_READ_CHUNK: usize = 4 << 10;

impl<'s, S: Storage> SegReader<'s, S> {
    fn new(storage: &'s S, seg: SegmentId, max_payload: u32) -> Result<Self, LogError> {
        let size = storage
            .size(seg)
            .map_err(io_err(|| format!("reading the size of segment {seg}")))?;
        Ok(SegReader {
            storage,
            seg,
            size,
            max_payload,
            chunk: READ_CHUNK,
            buf: Vec::new(),
            buf_off: 0,
        })
    }

    /// A reader for one frame (see [`POINT_READ_CHUNK`]).
    fn point(storage: &'s S, seg: SegmentId, max_payload: u32) -> Result<Self, LogError> {
        let mut r = Self::new(storage, seg, max_payload)?;
        r.chunk = POINT_READ_CHUNK;
        Ok(r)
    }

    /// Ensures `[off, off + len)` is buffered (clamped to the segment size) and returns it.
    fn get(&mut self, off: u64, len: usize) -> Result<&[u8], LogError> {
        let have_end = self.buf_off + self.buf.len() as u64;
        let want_end = (off + len as u64).min(self.size);
        if off < self.buf_off || want_end > have_end {
            let n = (want_end.saturating_sub(off) as usize).max(
                self.chunk
                    .min(usize::try_from(self.size.saturating_sub(off)).unwrap_or(self.chunk)),
            );
            self.buf.resize(n, 0);
            let got = self
                .storage
                .read_at(self.seg, off, &mut self.buf)
                .map_err(io_err(|| format!("reading segment {} at {off}", self.seg)))?;
            self.buf.truncate(got);
            self.buf_off = off;
        }
        let start = (off - self.buf_off) as usize;
        let end = (start + len).min(self.buf.len());
        Ok(&self.buf[start.min(end)..end])
    }

    fn frame(&mut self, off: u64) -> Result<Frame<'_>, LogError> {
        if off + FRAME_HEADER_BYTES > self.size {
            return Ok(Frame::End);
        }
        let max = self.max_payload;
        let size = self.size;
        let hdr = self.get(off, 8)?;
        if hdr.len() < 8 {
            return Ok(Frame::Invalid("short read of the frame header".into()));
        }
        let len_bytes = [hdr[0], hdr[1], hdr[2], hdr[3]];
        let len = u32::from_le_bytes(len_bytes);
        let crc = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if len == 0 {
            return Ok(Frame::End);
        }
        if len > max {
            return Ok(Frame::Invalid(format!(
                "length {len} exceeds the payload limit {max}"
            )));
        }
        if off + FRAME_HEADER_BYTES + u64::from(len) > size {
            return Ok(Frame::Invalid(format!(
                "frame of {len} bytes runs past the segment end {size}"
            )));
        }
        let all = self.get(off, 8 + len as usize)?;
        if all.len() < 8 + len as usize {
            return Ok(Frame::Invalid("short read of the payload".into()));
        }
        let payload = &all[8..];
        if frame_crc(len_bytes, payload) != crc {
            return Ok(Frame::Invalid("checksum mismatch".into()));
        }
        Ok(Frame::Valid(payload))
    }
}

impl<S: Storage> Log<S> {
    /// Opens the log, recovering after a crash, and makes it ready for appends.
    ///
    /// Recovery: the last segment holding a valid first frame is the tail (later segments are
    /// empty spares, as many as promises had called for, or torn first writes: all are removed,
    /// and promises are made afresh by whoever holds claims after the restart). The tail is scanned to its first
    /// invalid frame, cut there and re-preallocated so that zeroes follow the valid data, and
    /// synced, before any append is accepted. Earlier segments are not read here: [`Log::replay`]
    /// checks them and reports damage as [`LogError::Corrupt`].
    pub fn open(storage: S, cfg: LogConfig) -> Result<Self, LogError> {
        cfg.validate()?;
        let ids = storage
            .list()
            .map_err(io_err(|| "listing segments".into()))?;
        let mut segs = BTreeMap::new();
        let (active, end, active_size, next_id) = if ids.is_empty() {
            Self::create_segment(&storage, 1, cfg.segment_bytes)
                .map_err(io_err(|| "creating the first segment".into()))?;
            segs.insert(
                1,
                SegMeta {
                    size: cfg.segment_bytes,
                    last: None,
                    end: Some(0),
                },
            );
            (1, 0, cfg.segment_bytes, 2)
        } else {
            let max_id = ids.iter().copied().max().unwrap_or(0);
            let mut tail = ids[0];
            for &id in ids.iter().rev() {
                let mut r = SegReader::new(&storage, id, cfg.max_payload_bytes)?;
                if matches!(r.frame(0)?, Frame::Valid(_)) {
                    tail = id;
                    break;
                }
            }
            let mut removed = false;
            for &id in ids.iter().filter(|&&id| id > tail) {
                storage.remove(id).map_err(io_err(|| {
                    format!("removing empty segment {id} after the tail")
                }))?;
                removed = true;
            }
            if removed {
                storage
                    .sync_dir()
                    .map_err(io_err(|| "syncing the directory after recovery".into()))?;
            }
            for &id in ids.iter().filter(|&&id| id < tail) {
                let size = storage
                    .size(id)
                    .map_err(io_err(|| format!("reading the size of segment {id}")))?;
                segs.insert(
                    id,
                    SegMeta {
                        size,
                        last: None,
                        end: None,
                    },
                );
            }
            // Scan the tail to its end of valid data.
            let mut r = SegReader::new(&storage, tail, cfg.max_payload_bytes)?;
            let mut off = 0u64;
            let mut last = None;
            while let Frame::Valid(p) = r.frame(off)? {
                last = Some(off as u32);
                off += FRAME_HEADER_BYTES + p.len() as u64;
            }
            drop(r);
            // Cut whatever follows (torn frames, kept-but-unsynced later writes) and reserve the
            // space again as zeroes, so no stale frame can reappear behind future shorter writes.
            storage.truncate(tail, off).map_err(io_err(|| {
                format!("cutting the torn tail of segment {tail}")
            }))?;
            let mut size = off;
            if off < cfg.segment_bytes {
                match storage.allocate(tail, cfg.segment_bytes) {
                    Ok(()) => size = cfg.segment_bytes,
                    // Disk full: the tail stays cut at its data and the next append rolls.
                    Err(e) if is_no_space(&e) => {}
                    Err(e) => {
                        return Err(io_err(|| format!("reallocating segment {tail}"))(e));
                    }
                }
            }
            storage
                .sync(tail)
                .map_err(io_err(|| format!("syncing recovered segment {tail}")))?;
            segs.insert(
                tail,
                SegMeta {
                    size,
                    last,
                    end: Some(off as u32),
                },
            );
            let next_id = max_id.checked_add(1).ok_or_else(|| {
                LogError::Config("segment ids exhausted; the directory needs a new log".into())
            })?;
            (tail, off, size, next_id)
        };
        let created = u64::from(ids.is_empty());
        let log = Log {
            storage,
            state: Mutex::new(State {
                appended: 0,
                chunks: Vec::new(),
                inflight: None,
                written: None,
                flushing: false,
                waiters: 0,
                flusher_idle: false,
                seq: Sequencer::new(1),
                leases: reserve::Promises::default(),
                active,
                active_size,
                end,
                spares: VecDeque::new(),
                creating: false,
                grow_failed: false,
                spare_retry_in: 0,
                next_id,
                reserved: 0,
                promises: BTreeMap::new(),
                segs,
                deferred_sync: None,
                recycled: Vec::new(),
            }),
            cfg,
            cv: Condvar::new(),
            appended_cv: Condvar::new(),
            durable: AtomicU64::new(0),
            durable_end: AtomicU64::new(
                Loc {
                    segment: active,
                    offset: end as u32,
                }
                .pack(),
            ),
            poisoned: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            sync_observer: std::sync::OnceLock::new(),
            flushes: AtomicU64::new(0),
            frames_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            segments_created: AtomicU64::new(created),
            zeroed: Mutex::new((0, 0)),
            zero_fills: AtomicU64::new(0),
            leases_swept: AtomicU64::new(0),
        };
        log.ensure_spares(true);
        Ok(log)
    }

    /// Creates a preallocated segment and makes its name durable, so frames in it can be
    /// acknowledged after a plain data sync.
    fn create_segment(storage: &S, id: SegmentId, bytes: u64) -> io::Result<()> {
        storage.create(id, bytes)?;
        if let Err(e) = storage.sync_dir() {
            let _ = storage.remove(id);
            return Err(e);
        }
        Ok(())
    }

    /// The storage under this log.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The configuration in use.
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// Whether a write or sync failed; a poisoned log accepts nothing more.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Highest Lsn known durable; lock-free so the hot path can check before waiting.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable.load(Ordering::Acquire)
    }

    /// Highest Lsn handed out by [`Log::append`].
    pub fn appended_lsn(&self) -> Lsn {
        lock(&self.state).appended
    }

    /// Position just past the last durable frame: scans stop there.
    pub fn durable_end(&self) -> Loc {
        Loc::unpack(self.durable_end.load(Ordering::Acquire))
    }

    /// Counters for benches: `frames_written / syncs` is the group-commit factor.
    pub fn stats(&self) -> LogStats {
        let (reserved_bytes, spares, free_bytes) = {
            let st = lock(&self.state);
            (
                st.reserved,
                st.spares.len() as u64,
                st.free_bytes(self.cfg.segment_bytes),
            )
        };
        LogStats {
            reserved_bytes,
            spares,
            free_bytes,
            syncs: self.syncs.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            frames_written: self.frames_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            segments_created: self.segments_created.load(Ordering::Relaxed),
            zero_fills: self.zero_fills.load(Ordering::Relaxed),
        }
    }

    fn check_poison(&self) -> Result<(), LogError> {
        if self.is_poisoned() {
            Err(LogError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Buffers a frame and returns its Lsn and future location; durable only after a flush
    /// covering the Lsn.
    ///
    /// Normally no system call happens here: rolling into the next spare segment is a switch in
    /// memory. The slow path: when the frame needs a segment that does not exist yet, the append
    /// creates one (or waits for the thread creating one). A `Normal` append is refused with
    /// [`LogError::NoSpace`] when the preallocated free space left after it would not cover the
    /// outstanding [`Log::reserve_space`] promises plus [`LogConfig::reserve_bytes`] and no further
    /// segment can be created. A `Reserved` append may use any preallocated space; the caller
    /// holding a promise for it releases the promise afterwards ([`Log::release_space`]).
    pub fn append(&self, payload: &[u8], class: AppendClass) -> Result<(Lsn, Loc), LogError> {
        self.append_with_space(payload, class, Space::default())
    }

    /// [`Log::append`] together with, under the same lock, a [`Log::reserve_space`] of
    /// `space.reserve` bytes for a later frame and a [`Log::release_space`] of `space.release`
    /// bytes (the promise this frame fulfils). With a reservation the append is refused with
    /// [`LogError::NoSpace`], promising nothing, unless the frame and the promise both fit; the
    /// release happens only once the frame is placed. One lock round instead of three on the
    /// claim and completion paths.
    pub fn append_with_space(
        &self,
        payload: &[u8],
        class: AppendClass,
        space: Space,
    ) -> Result<(Lsn, Loc), LogError> {
        let (lsn, loc, _) = self.append_inner(Payload::Plain(payload), class, space)?;
        Ok((lsn, loc))
    }

    /// [`Log::append_with_space`] of a local mutation entry
    /// ([`entry::with_local_mutation`](super::entry::with_local_mutation)), which ends with its
    /// sequence number: under the log's lock, the next local number is taken and written as the
    /// entry's last 9 bytes, so local numbers are dense and follow log order. Everything else,
    /// the CRC of the frame up to the trailer included, is computed before taking the lock
    /// (CRC-32C extends over the trailer). Returns the Lsn, location and sequence number.
    pub fn append_sequenced(
        &self,
        payload: &[u8],
        class: AppendClass,
        space: Space,
    ) -> Result<(Lsn, Loc, u64), LogError> {
        let len = payload.len() + encode::SEQ_TRAILER_BYTES;
        let crc = crc::frame((len as u32).to_le_bytes(), payload);
        let (lsn, loc, seq) = self.append_inner(Payload::Sequenced(payload, crc), class, space)?;
        Ok((lsn, loc, seq.unwrap_or(0)))
    }

    /// Sets the next local sequence number ([`Log::append_sequenced`]), after recovery found the
    /// last one. Numbers already handed out are never reissued: it only moves forward.
    pub fn set_next_seq(&self, next: u64) {
        let mut st = lock(&self.state);
        if next > st.seq.next {
            st.seq = Sequencer::new(next);
        }
    }

    /// The largest local sequence number handed out (durable or not).
    pub fn appended_seq(&self) -> u64 {
        lock(&self.state).seq.next - 1
    }

    /// The largest local sequence number whose entry, and every one before it, is durable.
    pub fn durable_seq(&self) -> u64 {
        let durable = self.durable_lsn();
        lock(&self.state).seq.durable_mark(durable)
    }

    fn append_inner(
        &self,
        payload: Payload<'_>,
        class: AppendClass,
        space: Space,
    ) -> Result<(Lsn, Loc, Option<u64>), LogError> {
        if payload.len() == 0 {
            return Err(LogError::EmptyPayload);
        }
        let payload_len = payload.len();
        if payload_len > self.cfg.max_payload_bytes as usize {
            return Err(LogError::PayloadTooLarge {
                len: payload_len,
                max: self.cfg.max_payload_bytes,
            });
        }
        let frame_len = Self::frame_bytes(payload_len);
        let seg = self.cfg.segment_bytes;
        let reserve = space.reserve.map_or(0, |p| p.bytes);
        let promise_key = self.promise_key(reserve);
        let mut st = lock(&self.state);
        loop {
            self.check_poison()?;
            let fits = st.end + frame_len <= st.active_size;
            // Only the space checks below need it, and a reserved append without a promise has
            // none (a completion: the common case).
            let slack = if class == AppendClass::Normal || reserve > 0 {
                st.slack()
            } else {
                0
            };
            let placeable = match class {
                AppendClass::Reserved => fits || !st.spares.is_empty(),
                AppendClass::Normal => {
                    let needed = st.reserved.saturating_add(self.cfg.reserve_bytes);
                    st.guaranteed_after(frame_len, seg, slack)
                        .is_some_and(|g| g >= needed)
                }
            };
            // The promise must hold once the frame is placed, as `reserve_space` would require.
            let promisable = reserve == 0 || {
                let slack = slack.max(promise_key.saturating_sub(1));
                let needed = st
                    .reserved
                    .saturating_add(reserve)
                    .saturating_add(self.cfg.reserve_bytes);
                st.guaranteed_after(frame_len, seg, slack)
                    .is_some_and(|g| g >= needed)
            };
            if placeable && promisable {
                if !fits {
                    Self::roll(&mut st);
                }
                break;
            }
            // Rare: the flusher normally keeps enough spares ready.
            st = self.grow(st, false)?;
        }
        let loc = Loc {
            segment: st.active,
            offset: st.end as u32,
        };
        // From here on the lock is held to the end: the sequence number taken is the next one.
        let len_bytes = (payload_len as u32).to_le_bytes();
        let (bytes, crc, seq, trailer) = match payload {
            Payload::Plain(b) => (b, frame_crc(len_bytes, b), None, None),
            Payload::Sequenced(b, crc) => {
                let seq = st.seq.next;
                let trailer = encode::seq_trailer(seq);
                (b, crc::extend(crc, &trailer), Some(seq), Some(trailer))
            }
        };
        let contiguous = matches!(st.chunks.last(),
            Some(c) if c.segment == loc.segment && c.offset + c.data.len() as u64 == st.end);
        if !contiguous {
            let data = std::mem::take(&mut st.recycled);
            let offset = st.end;
            let segment_size = st.active_size;
            st.chunks.push(Chunk {
                segment: loc.segment,
                segment_size,
                offset,
                data,
                frames: 0,
            });
        }
        if let Some(c) = st.chunks.last_mut() {
            c.data.extend_from_slice(&len_bytes);
            c.data.extend_from_slice(&crc.to_le_bytes());
            c.data.extend_from_slice(bytes);
            if let Some(t) = &trailer {
                c.data.extend_from_slice(t);
            }
            c.frames += 1;
        }
        st.end += frame_len;
        st.appended += 1;
        let lsn = st.appended;
        let end = st.end as u32;
        if let Some(m) = st.segs.get_mut(&loc.segment) {
            m.last = Some(loc.offset);
            m.end = Some(end);
        }
        // A lease already swept (ended before the last expiry) books nothing.
        if let Some(p) = space.reserve.filter(|p| p.bytes > 0) {
            if st.leases.add(p.lease_until_ms, p.bytes) {
                st.reserved += p.bytes;
                *st.promises.entry(promise_key).or_insert(0) += 1;
            }
        }
        if let Some(p) = space.release {
            self.return_booked(&mut st, p);
        }
        if let Some(seq) = seq {
            st.seq.appended(seq, lsn);
        }
        if st.flusher_idle {
            st.flusher_idle = false;
            self.appended_cv.notify_one();
        }
        Ok((lsn, loc, seq))
    }

    /// Returns a booked promise, if it is still booked (not expired, not returned before).
    fn return_booked(&self, st: &mut State, p: Promise) {
        if let Some(bytes) = st.leases.take(p.lease_until_ms, p.bytes) {
            st.release(bytes, self.promise_key(bytes));
        }
    }

    /// Returns a promise booked by an append's [`Space::reserve`] whose frame will never come
    /// (its claim finished otherwise); nothing if it expired or was returned already.
    pub fn return_promise(&self, p: Promise) {
        let mut st = lock(&self.state);
        self.return_booked(&mut st, p);
    }

    /// Moves a booked promise to a new lease end. A promise no longer booked (it expired) is
    /// booked again if the disk allows: best effort, its claim is granted already.
    pub fn move_promise(&self, p: Promise, new_lease_until_ms: u64) {
        let mut st = lock(&self.state);
        match st
            .leases
            .extend(p.lease_until_ms, new_lease_until_ms, p.bytes)
        {
            reserve::Extended::Moved => {}
            reserve::Extended::Dropped => st.release(p.bytes, self.promise_key(p.bytes)),
            reserve::Extended::HadNone => {
                drop(st);
                if self.reserve_space(p.bytes).is_ok()
                    && !lock(&self.state).leases.add(new_lease_until_ms, p.bytes)
                {
                    self.release_space(p.bytes);
                }
            }
        }
    }

    /// Returns every booked promise whose lease ended before `before_ms`. Takes the lock only
    /// when a new second has passed since the last sweep.
    pub fn expire_promises(&self, before_ms: u64) {
        if before_ms / 1000 <= self.leases_swept.load(Ordering::Relaxed) {
            return;
        }
        let mut st = lock(&self.state);
        let expired = st.leases.expire(before_ms);
        self.leases_swept
            .store(st.leases.swept_before(), Ordering::Relaxed);
        if expired > 0 {
            st.release(expired, self.promise_key(expired));
        }
    }

    /// Bytes booked by promises and not yet returned or expired.
    pub fn promised_bytes(&self) -> u64 {
        lock(&self.state).leases.bytes()
    }

    /// The size class a promise of `bytes` is counted under (capped at the largest frame).
    fn promise_key(&self, bytes: u64) -> u64 {
        bytes.min(Self::frame_bytes(self.cfg.max_payload_bytes as usize))
    }

    /// Makes the oldest spare the active segment: no system call.
    fn roll(st: &mut State) {
        if let Some(id) = st.spares.pop_front() {
            st.active = id;
            st.active_size = st.segs.get(&id).map_or(0, |m| m.size);
            st.end = 0;
        }
    }

    /// Writes and syncs everything appended so far; returns the durable Lsn.
    pub fn flush(&self) -> Result<Lsn, LogError> {
        let target = lock(&self.state).appended;
        self.wait_durable(target)
    }

    /// Returns once `lsn` is durable, sharing flushes with concurrent callers: if nobody is
    /// flushing, this thread leads a flush of everything buffered; otherwise it waits for the
    /// flush in progress and checks again.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<Lsn, LogError> {
        self.check_poison()?;
        let d = self.durable_lsn();
        if d >= lsn {
            return Ok(d);
        }
        let mut st = lock(&self.state);
        let mut spun = false;
        loop {
            self.check_poison()?;
            let d = self.durable_lsn();
            if d >= lsn {
                return Ok(d);
            }
            if lsn > st.appended {
                return Err(LogError::LsnNotAppended {
                    lsn,
                    appended: st.appended,
                });
            }
            if st.flushing && !spun && self.storage.syncs_in_microseconds() {
                // A flush in progress may be about to cover `lsn`, and this storage flushes in
                // microseconds (in memory): sooner over than a sleep and a wake-up. Spin
                // briefly, once, outside the lock. Never for a disk: with many waiters the
                // spinning would take the CPU the flush needs.
                spun = true;
                drop(st);
                for _ in 0..SPIN_ROUNDS {
                    if self.durable_lsn() >= lsn {
                        break;
                    }
                    std::hint::spin_loop();
                }
                st = lock(&self.state);
            } else if st.flushing {
                st.waiters += 1;
                st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.waiters -= 1;
            } else {
                st = self.lead_flush(st)?;
            }
        }
    }

    /// For a dedicated flusher thread: waits up to `idle` until frames are appended past the
    /// durable Lsn, then flushes them (group commit, as [`Log::flush`]). Returns the durable Lsn,
    /// unchanged if nothing was appended in time. Call it in a loop.
    pub fn flush_appended(&self, idle: Duration) -> Result<Lsn, LogError> {
        let deadline = Instant::now() + idle;
        let mut st = lock(&self.state);
        loop {
            self.check_poison()?;
            if st.appended > self.durable_lsn() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                st.flusher_idle = false;
                return Ok(self.durable_lsn());
            }
            st.flusher_idle = true;
            st = self
                .appended_cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.flusher_idle = false;
        let target = st.appended;
        drop(st);
        self.wait_durable(target)
    }

    /// Waits up to `timeout` for `lsn` to become durable, never leading a flush itself: for
    /// callers of a log that a dedicated flusher thread flushes ([`Log::flush_appended`]).
    /// Returns the durable Lsn, which is below `lsn` if the time ran out.
    pub fn wait_durable_for(&self, lsn: Lsn, timeout: Duration) -> Result<Lsn, LogError> {
        self.check_poison()?;
        let d = self.durable_lsn();
        if d >= lsn {
            return Ok(d);
        }
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            self.check_poison()?;
            let d = self.durable_lsn();
            let now = Instant::now();
            if d >= lsn || now >= deadline {
                return Ok(d);
            }
            if lsn > st.appended {
                return Err(LogError::LsnNotAppended {
                    lsn,
                    appended: st.appended,
                });
            }
            st.waiters += 1;
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.waiters -= 1;
        }
    }

    /// Leader side of group commit: take the buffer, write and sync it without the lock (appends
    /// go on into a fresh buffer), then publish the new durable Lsn and wake followers.
    fn lead_flush<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, LogError> {
        st.flushing = true;
        // The list the last flush wrote (emptied, its allocations kept) takes the appended
        // chunks' place: no allocation per flush.
        let mut chunks = st.written.take().unwrap_or_default();
        match Arc::get_mut(&mut chunks) {
            Some(list) => std::mem::swap(list, &mut st.chunks),
            None => chunks = Arc::new(std::mem::take(&mut st.chunks)),
        }
        let target = st.appended;
        let end = Loc {
            segment: st.active,
            offset: st.end as u32,
        };
        let deferred = st.deferred_sync.take();
        st.inflight = Some(Arc::clone(&chunks));
        drop(st);

        let res = self.write_out(&chunks, deferred);

        let mut st = lock(&self.state);
        st.inflight = None;
        st.flushing = false;
        let outcome = match res {
            Ok(new_deferred) => {
                st.deferred_sync = new_deferred;
                self.durable_end.fetch_max(end.pack(), Ordering::AcqRel);
                self.durable.fetch_max(target, Ordering::AcqRel);
                if !chunks.is_empty() {
                    self.flushes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
        };
        // Reuse the largest written buffer for the next chunk, and the emptied list for the next
        // flush.
        if let Some(list) = Arc::get_mut(&mut chunks) {
            if let Some(c) = list.iter_mut().max_by_key(|c| c.data.capacity()) {
                if c.data.capacity() <= 4 * READ_CHUNK && st.recycled.capacity() == 0 {
                    c.data.clear();
                    st.recycled = std::mem::take(&mut c.data);
                }
            }
            list.clear();
            st.written = Some(chunks);
        }
        // Waking nobody still costs a system call: skip it when no follower waits.
        if st.waiters > 0 {
            self.cv.notify_all();
        }
        outcome?;
        let due = if st.grow_failed {
            st.spare_retry_in = st.spare_retry_in.saturating_sub(1);
            st.spare_retry_in == 0
        } else {
            true
        };
        if due && !st.creating && self.wants_spare(&st) {
            drop(st);
            self.ensure_spares(true);
            st = lock(&self.state);
        }
        Ok(st)
    }

    /// Writes the chunks in order, syncing each segment before the next one is written (the
    /// ordering recovery relies on). Returns the segment whose sync the test knob deferred.
    fn write_out(
        &self,
        chunks: &[Chunk],
        deferred: Option<SegmentId>,
    ) -> Result<Option<SegmentId>, LogError> {
        if let Some(seg) = deferred {
            self.sync_segment(seg)?;
        }
        for (i, c) in chunks.iter().enumerate() {
            self.storage
                .write_at(c.segment, c.offset, &c.data)
                .map_err(io_err(|| {
                    format!(
                        "writing {} bytes to segment {} at {}",
                        c.data.len(),
                        c.segment,
                        c.offset
                    )
                }))?;
            self.bytes_written
                .fetch_add(c.data.len() as u64, Ordering::Relaxed);
            self.zero_ahead(c);
            self.frames_written.fetch_add(c.frames, Ordering::Relaxed);
            let last = i + 1 == chunks.len();
            if last
                && (self.cfg.ack_before_sync_for_tests
                    || crate::mutants::active(crate::mutants::Mutant::AckBeforeSync))
            {
                return Ok(Some(c.segment));
            }
            self.sync_segment(c.segment)?;
        }
        Ok(None)
    }

    /// Zero-fills the segment ahead of a chunk just written, in one step of
    /// [`Storage::zero_ahead_bytes`] whenever less than half a step is left, so the syncs in
    /// between touch only blocks already written (on ext4, the first write into a preallocated
    /// block converts an unwritten extent, which costs a journal commit inside fdatasync). The
    /// zeroes go where no frame is yet (the flush leader writes alone, in log order), and read
    /// back as the clean end a preallocated segment already shows, so recovery is unchanged. A
    /// failed zero-fill is not an error: it only stops zero-filling that segment.
    fn zero_ahead(&self, c: &Chunk) {
        let step = self.storage.zero_ahead_bytes();
        if step == 0 {
            return;
        }
        let end = c.offset + c.data.len() as u64;
        let mut z = lock(&self.zeroed);
        if z.0 != c.segment {
            *z = (c.segment, end);
        }
        let from = z.1.max(end);
        if from >= end.saturating_add(step / 2) || from >= c.segment_size {
            return;
        }
        let to = end.saturating_add(step).min(c.segment_size);
        // Written in pieces from one static buffer of zeroes.
        static ZEROES: [u8; 256 << 10] = [0; 256 << 10];
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROES.len() as u64) as usize;
            if self.storage.write_at(c.segment, at, &ZEROES[..n]).is_err() {
                z.1 = c.segment_size;
                return;
            }
            at += n as u64;
        }
        z.1 = to;
        self.zero_fills.fetch_add(1, Ordering::Relaxed);
    }

    fn sync_segment(&self, seg: SegmentId) -> Result<(), LogError> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        let observer = self.sync_observer.get();
        let started = observer.map(|_| Instant::now());
        let synced = self
            .storage
            .sync(seg)
            .map_err(io_err(|| format!("syncing segment {seg}")));
        if let (Some(observe), Some(started)) = (observer, started) {
            observe(started.elapsed());
        }
        synced
    }

    /// Sets the function told how long each data sync took (a daemon's fsync latency
    /// histogram). Only the first call takes effect; returns whether this one did. The timing
    /// is for metrics only and decides nothing.
    pub fn set_sync_observer(&self, observe: SyncObserver) -> bool {
        self.sync_observer.set(observe).is_ok()
    }

    /// Whether the background should create another spare: none is left, or the preallocated
    /// free space covers the promises with less than half a segment to spare for `Normal`
    /// appends (which would then have to create one themselves).
    fn wants_spare(&self, st: &State) -> bool {
        let seg = self.cfg.segment_bytes;
        let target = st
            .reserved
            .saturating_add(self.cfg.reserve_bytes)
            .saturating_add(seg / 2);
        st.spares.is_empty() || st.guaranteed(seg, st.slack()) < target
    }

    /// Creates spares outside the lock while [`Log::wants_spare`] says so (a few at most per call,
    /// the rest is left to the next flush), unless another thread is creating one. Retries after a
    /// failed attempt only with `retry_failed`. Failures are remembered in the state; appends and
    /// reservations that then need a segment get [`LogError::NoSpace`].
    fn ensure_spares(&self, retry_failed: bool) {
        const MAX_PER_CALL: usize = 4;
        let mut st = lock(&self.state);
        for _ in 0..MAX_PER_CALL {
            if self.is_poisoned() || st.creating || !self.wants_spare(&st) {
                return;
            }
            if st.grow_failed && !retry_failed {
                return;
            }
            match self.grow(st, true) {
                Ok(g) => st = g,
                Err(_) => return,
            }
        }
    }

    /// One step towards one more spare segment: if a thread is creating one, waits for it;
    /// otherwise creates one, preallocated, outside the lock and appends it to the spares (ids
    /// increase: one creation runs at a time). The caller re-checks what it needed.
    ///
    /// Fails with [`LogError::NoSpace`] when creation fails for lack of space, or failed lately and
    /// `retry_failed` is off (no system call then); other storage errors are [`LogError::Io`].
    fn grow<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        retry_failed: bool,
    ) -> Result<MutexGuard<'a, State>, LogError> {
        if st.creating {
            st.waiters += 1;
            let mut st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.waiters -= 1;
            return Ok(st);
        }
        if st.grow_failed && !retry_failed {
            return Err(LogError::NoSpace);
        }
        let id = st.next_id;
        let Some(next) = id.checked_add(1) else {
            st.grow_failed = true;
            st.spare_retry_in = SPARE_RETRY_FLUSHES;
            return Err(LogError::NoSpace);
        };
        st.next_id = next;
        st.creating = true;
        drop(st);
        let res = Self::create_segment(&self.storage, id, self.cfg.segment_bytes);
        let mut st = lock(&self.state);
        st.creating = false;
        self.cv.notify_all();
        match res {
            Ok(()) => {
                self.segments_created.fetch_add(1, Ordering::Relaxed);
                st.segs.insert(
                    id,
                    SegMeta {
                        size: self.cfg.segment_bytes,
                        last: None,
                        end: Some(0),
                    },
                );
                st.spares.push_back(id);
                st.grow_failed = false;
                Ok(st)
            }
            Err(e) => {
                // Usually ENOSPC. Other errors are remembered alike: without another segment the
                // log goes on in the space it has, and the promises keep theirs.
                st.grow_failed = true;
                st.spare_retry_in = SPARE_RETRY_FLUSHES;
                if is_no_space(&e) {
                    Err(LogError::NoSpace)
                } else {
                    Err(io_err(|| format!("creating segment {id}"))(e))
                }
            }
        }
    }

    /// Bytes a payload of `payload_len` bytes takes in the log, frame header included: what
    /// [`Log::reserve_space`] must be given for one future append of it.
    pub const fn frame_bytes(payload_len: usize) -> u64 {
        FRAME_HEADER_BYTES + payload_len as u64
    }

    /// Promises that `bytes` more of [`AppendClass::Reserved`] appends will find preallocated
    /// space, even once the disk is full; `Normal` appends can no longer take that space.
    ///
    /// Reserve once per future frame, with at least its [`Log::frame_bytes`]: the largest
    /// outstanding promise is taken as the largest promised frame, which bounds the space a roll
    /// can leave unused at a segment's end (so each segment counts `largest - 1` bytes less).
    /// Larger amounts are fine (counted as frames of at most the largest payload); splitting one
    /// frame over several calls is not.
    ///
    /// No system call unless the preallocated free space does not cover all promises plus
    /// [`LogConfig::reserve_bytes`]: then spare segments are created, synchronously, one segment
    /// at a time. If that fails for lack of space (or failed lately and no retry is due), returns
    /// [`LogError::NoSpace`] and promises nothing; segments created on the way stay as spares for
    /// later appends.
    pub fn reserve_space(&self, bytes: u64) -> Result<(), LogError> {
        if bytes == 0 {
            return Ok(());
        }
        let key = self.promise_key(bytes);
        let seg = self.cfg.segment_bytes;
        let mut st = lock(&self.state);
        loop {
            self.check_poison()?;
            let slack = st.slack().max(key - 1);
            let needed = st
                .reserved
                .saturating_add(bytes)
                .saturating_add(self.cfg.reserve_bytes);
            if st.guaranteed(seg, slack) >= needed {
                st.reserved += bytes;
                *st.promises.entry(key).or_insert(0) += 1;
                return Ok(());
            }
            st = self.grow(st, false)?;
        }
    }

    /// Returns a promise made by [`Log::reserve_space`] with the same `bytes`: after the append it
    /// was for, or when that append will never come (claim finished otherwise, or abandoned).
    pub fn release_space(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let key = self.promise_key(bytes);
        lock(&self.state).release(bytes, key);
    }

    /// The payload of the frame at `loc`, durable or not: from the in-memory buffer if it has not
    /// been written yet, else by pread without taking the writer's path.
    pub fn read(&self, loc: Loc) -> Result<Vec<u8>, LogError> {
        {
            let st = lock(&self.state);
            for c in st
                .chunks
                .iter()
                .chain(st.inflight.iter().flat_map(|v| v.iter()))
            {
                if let Some(p) = c.payload(loc) {
                    return Ok(p.to_vec());
                }
            }
            let written_end = Loc {
                segment: st.active,
                offset: st.end as u32,
            };
            if loc >= written_end || !st.segs.contains_key(&loc.segment) {
                return Err(LogError::BadLoc {
                    loc,
                    reason: "not appended, or its segment was removed".into(),
                });
            }
        }
        let mut r = SegReader::point(&self.storage, loc.segment, self.cfg.max_payload_bytes)?;
        match r.frame(u64::from(loc.offset))? {
            Frame::Valid(p) => Ok(p.to_vec()),
            Frame::End => Err(LogError::BadLoc {
                loc,
                reason: "no frame starts here".into(),
            }),
            Frame::Invalid(reason) => Err(LogError::Corrupt {
                segment: loc.segment,
                offset: u64::from(loc.offset),
                reason,
            }),
        }
    }

    /// Whether the frames of a sealed segment end exactly at `loc` (no frame starts there): how
    /// a hint file's claim to cover a whole segment is checked without reading the segment.
    pub fn ends_at(&self, loc: Loc) -> Result<bool, LogError> {
        let mut r = SegReader::point(&self.storage, loc.segment, self.cfg.max_payload_bytes)?;
        Ok(matches!(r.frame(u64::from(loc.offset))?, Frame::End))
    }

    /// Location of the first frame of the oldest segment: where a full replay starts.
    pub fn start(&self) -> Loc {
        let st = lock(&self.state);
        Loc {
            segment: st.segs.keys().next().copied().unwrap_or(st.active),
            offset: 0,
        }
    }

    /// Visits every durable frame from the oldest segment on, in log order; run once at recovery
    /// to rebuild the index. Damage in a sealed segment is [`LogError::Corrupt`], never skipped.
    pub fn replay<E, F>(&self, mut f: F) -> Result<Loc, E>
    where
        E: From<LogError>,
        F: FnMut(Loc, &[u8]) -> Result<(), E>,
    {
        self.scan_from(self.start(), |loc, p| {
            f(loc, p).map(|()| ControlFlow::Continue(()))
        })
    }

    /// Visits durable frames from `from` (a frame start, or the end of a segment) in log order,
    /// until the durable end as of the call or until `f` breaks. Frames not yet durable are never
    /// shown, so a replica can never ship data a crash could take back. Returns where to resume.
    pub fn scan_from<E, F>(&self, from: Loc, mut f: F) -> Result<Loc, E>
    where
        E: From<LogError>,
        F: FnMut(Loc, &[u8]) -> Result<ControlFlow<()>, E>,
    {
        let stop = self.durable_end();
        if from >= stop {
            return Ok(from);
        }
        let segs: Vec<SegmentId> = {
            let st = lock(&self.state);
            if !st.segs.contains_key(&from.segment) {
                return Err(LogError::BadLoc {
                    loc: from,
                    reason: "segment does not exist (removed?)".into(),
                }
                .into());
            }
            st.segs
                .range(from.segment..=stop.segment)
                .map(|(&id, _)| id)
                .collect()
        };
        let mut pos = from;
        for (i, &seg) in segs.iter().enumerate() {
            let mut off = if i == 0 { u64::from(from.offset) } else { 0 };
            let mut r = SegReader::new(&self.storage, seg, self.cfg.max_payload_bytes)?;
            let mut last = None;
            loop {
                pos = Loc {
                    segment: seg,
                    offset: off as u32,
                };
                if pos >= stop {
                    break;
                }
                match r.frame(off)? {
                    Frame::Valid(p) => {
                        last = Some(off as u32);
                        let len = p.len() as u64;
                        if f(pos, p)?.is_break() {
                            return Ok(Loc {
                                segment: seg,
                                offset: (off + FRAME_HEADER_BYTES + len) as u32,
                            });
                        }
                        off += FRAME_HEADER_BYTES + len;
                    }
                    // A clean end is expected only in segments before the durable one.
                    Frame::End if seg < stop.segment => break,
                    Frame::End => {
                        return Err(LogError::Corrupt {
                            segment: seg,
                            offset: off,
                            reason: "frames end before the durable end".into(),
                        }
                        .into())
                    }
                    Frame::Invalid(reason) => {
                        return Err(LogError::Corrupt {
                            segment: seg,
                            offset: off,
                            reason,
                        }
                        .into())
                    }
                }
            }
            if seg < stop.segment {
                let mut st = lock(&self.state);
                if let Some(m) = st.segs.get_mut(&seg) {
                    if m.end.is_none() {
                        m.end = Some(off as u32);
                        m.last = last;
                    }
                }
            }
        }
        Ok(pos)
    }

    /// All segments, oldest first, with what is known about their frames.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let st = lock(&self.state);
        st.segs
            .iter()
            .map(|(&id, m)| {
                let role = if id == st.active {
                    SegmentRole::Active
                } else if id > st.active {
                    SegmentRole::Spare
                } else {
                    SegmentRole::Sealed
                };
                let at = |o: u32| Loc {
                    segment: id,
                    offset: o,
                };
                SegmentInfo {
                    id,
                    role,
                    size: m.size,
                    first: m.last.map(|_| at(0)),
                    last: m.last.map(at),
                    end: m.end.map(at),
                }
            })
            .collect()
    }

    /// Deletes a sealed segment (garbage collection), and retries preallocating spares since
    /// space was freed. Frames in it become unreadable; a scan running over it may fail.
    pub fn remove_segment(&self, id: SegmentId) -> Result<(), LogError> {
        self.check_poison()?;
        {
            let mut st = lock(&self.state);
            if id == st.active {
                return Err(LogError::SegmentBusy {
                    segment: id,
                    reason: "it is the active segment",
                });
            }
            if id > st.active {
                return Err(LogError::SegmentBusy {
                    segment: id,
                    reason: "it is the spare segment",
                });
            }
            if !st.segs.contains_key(&id) {
                return Err(LogError::BadLoc {
                    loc: Loc {
                        segment: id,
                        offset: 0,
                    },
                    reason: "no such segment".into(),
                });
            }
            st.segs.remove(&id);
        }
        self.storage
            .remove(id)
            .map_err(io_err(|| format!("removing segment {id}")))?;
        self.storage.sync_dir().map_err(io_err(|| {
            format!("syncing the directory after removing {id}")
        }))?;
        self.ensure_spares(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::storage::{FsStorage, MemStorage};
    use super::*;
    use proptest::prelude::*;

    /// A crash between write and sync: the flush issues its writes and its sync fails.
    /// Returns the durable lsn if the flush had nothing to sync and succeeded.
    fn flush_failing_sync(log: &Log<MemStorage>, storage: &MemStorage) -> Option<Lsn> {
        storage.fail_next_sync();
        let flushed = log.flush().ok();
        storage.set_fail_syncs(false);
        flushed
    }

    fn small_cfg() -> LogConfig {
        LogConfig {
            segment_bytes: 1024,
            max_payload_bytes: 200,
            reserve_bytes: 256,
            ack_before_sync_for_tests: false,
        }
    }

    fn replay_all<S: Storage>(log: &Log<S>) -> Result<Vec<(Loc, Vec<u8>)>, LogError> {
        let mut out = Vec::new();
        log.replay(|loc, p| {
            out.push((loc, p.to_vec()));
            Ok::<(), LogError>(())
        })?;
        Ok(out)
    }

    fn payload(i: u64, len: usize) -> Vec<u8> {
        let mut p = i.to_le_bytes().to_vec();
        p.extend((0..len).map(|j| (i as usize * 31 + j) as u8));
        p
    }

    fn round_trip<S: Storage + Clone>(storage: S) {
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        let mut written = Vec::new();
        for i in 0..100u64 {
            let p = payload(i, (i as usize * 7) % 150);
            let (lsn, loc) = log.append(&p, AppendClass::Normal).unwrap();
            assert_eq!(lsn, i + 1);
            // Readable before it is durable.
            assert_eq!(log.read(loc).unwrap(), p);
            written.push((loc, p));
            if i % 9 == 0 {
                assert_eq!(log.flush().unwrap(), lsn);
            }
        }
        log.flush().unwrap();
        for (loc, p) in &written {
            assert_eq!(&log.read(*loc).unwrap(), p);
        }
        assert_eq!(replay_all(&log).unwrap(), written);
        assert!(log.segments().len() > 3, "rolled through segments");
        drop(log);
        let log = Log::open(storage, small_cfg()).unwrap();
        assert_eq!(replay_all(&log).unwrap(), written);
        assert_eq!(log.durable_lsn(), 0);
        let (lsn, loc) = log.append(b"after", AppendClass::Normal).unwrap();
        assert_eq!(lsn, 1);
        assert!(loc > written.last().unwrap().0);
        log.flush().unwrap();
        assert_eq!(log.read(loc).unwrap(), b"after");
    }

    #[test]
    fn round_trip_mem() {
        round_trip(MemStorage::new());
    }

    #[test]
    fn round_trip_fs() {
        let dir = tempfile::tempdir().unwrap();
        round_trip(Arc::new(FsStorage::open(dir.path()).unwrap()));
    }

    #[test]
    fn round_trip_with_zero_fill_ahead() {
        // Steps both smaller and larger than the frames and than one flush's chunk.
        for step in [64, 300, 700] {
            let storage = MemStorage::new();
            storage.set_zero_ahead(step);
            round_trip(storage.clone());
            assert!(Log::open(storage, small_cfg()).is_ok());
        }
        let dir = tempfile::tempdir().unwrap();
        round_trip(Arc::new(
            FsStorage::open(dir.path()).unwrap().with_zero_ahead(300),
        ));
    }

    #[test]
    fn zero_fill_ahead_clears_stale_bytes_in_steps() {
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        log.append(b"alpha", AppendClass::Normal).unwrap();
        log.flush().unwrap();
        let end = log.durable_end();
        drop(log);
        // Stale bytes past the end (as a torn write could leave before a cut).
        storage
            .write_at(end.segment, u64::from(end.offset) + 40, &[0xee; 16])
            .unwrap();
        storage.sync(end.segment).unwrap();
        storage.set_zero_ahead(200);
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        let (_, loc) = log.append(b"bravo", AppendClass::Normal).unwrap();
        log.flush().unwrap();
        assert_eq!(log.stats().zero_fills, 1);
        let mut buf = [0xffu8; 16];
        storage
            .read_at(end.segment, u64::from(end.offset) + 40, &mut buf)
            .unwrap();
        assert_eq!(buf, [0; 16], "the step past the new frame is zeroes");
        // Frames within the first half of the step need no new zero-fill; past it, one more.
        let frame = Log::<MemStorage>::frame_bytes(5);
        let mut fills_seen = vec![];
        for _ in 0..12 {
            log.append(b"charl", AppendClass::Normal).unwrap();
            log.flush().unwrap();
            fills_seen.push(log.stats().zero_fills);
        }
        assert_eq!(
            fills_seen[0], 1,
            "{frame}-byte frames: still inside the step"
        );
        assert!(fills_seen.last().unwrap() > &1, "{fills_seen:?}");
        assert_eq!(log.read(loc).unwrap(), b"bravo");
        drop(log);
        let log = Log::open(storage, small_cfg()).unwrap();
        assert_eq!(replay_all(&log).unwrap().len(), 14);
    }

    #[test]
    fn rejects_bad_payloads_and_lsns() {
        let log = Log::open(MemStorage::new(), small_cfg()).unwrap();
        assert!(matches!(
            log.append(&[], AppendClass::Normal),
            Err(LogError::EmptyPayload)
        ));
        assert!(matches!(
            log.append(&[1; 201], AppendClass::Normal),
            Err(LogError::PayloadTooLarge { len: 201, max: 200 })
        ));
        assert!(matches!(
            log.wait_durable(5),
            Err(LogError::LsnNotAppended { .. })
        ));
        assert!(log
            .read(Loc {
                segment: 1,
                offset: 0
            })
            .is_err());
        assert!(Log::open(
            MemStorage::new(),
            LogConfig {
                reserve_bytes: 1024,
                ..small_cfg()
            }
        )
        .is_err());
    }

    #[test]
    fn scan_sees_only_durable_frames() {
        let log = Log::open(MemStorage::new(), small_cfg()).unwrap();
        let mut locs = Vec::new();
        for i in 0..30 {
            locs.push(log.append(&payload(i, 40), AppendClass::Normal).unwrap().1);
        }
        log.flush().unwrap();
        for i in 30..40 {
            log.append(&payload(i, 40), AppendClass::Normal).unwrap();
        }
        let mut seen = Vec::new();
        let resume = log
            .scan_from(locs[5], |loc, _| {
                seen.push(loc);
                Ok::<_, LogError>(ControlFlow::Continue(()))
            })
            .unwrap();
        assert_eq!(seen, locs[5..]);
        assert_eq!(resume, log.durable_end());
        // Stop early, then resume.
        let mut n = 0;
        let resume = log
            .scan_from(locs[0], |_, _| {
                n += 1;
                Ok::<_, LogError>(if n == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            })
            .unwrap();
        assert_eq!(resume, locs[3]);
    }

    /// Payload bytes of frame `i` of a crash run (unique, so "nothing invented" is checkable).
    fn crash_payload(run: u64, i: u64, len: u8) -> Vec<u8> {
        payload(run * 1_000_000 + i, len as usize)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![3 => (1u8..160).prop_map(Op::Append), 1 => Just(Op::Flush)]
    }

    /// Frames appended, frames acknowledged durable, frames replayed after the crash.
    type CrashOutcome = (Vec<Vec<u8>>, usize, Vec<Vec<u8>>);

    /// Runs `ops`, crashes, reopens and replays.
    fn crash_run(
        storage: &MemStorage,
        cfg: &LogConfig,
        run: u64,
        ops: &[Op],
        fail_last_flush: bool,
        seed: u64,
    ) -> Result<CrashOutcome, LogError> {
        let log = Log::open(storage.clone(), cfg.clone())?;
        let mut appended = Vec::new();
        let mut acked = 0usize;
        for op in ops {
            match op {
                Op::Append(len) => {
                    let p = crash_payload(run, appended.len() as u64, *len);
                    let (lsn, _) = log.append(&p, AppendClass::Normal)?;
                    assert_eq!(lsn as usize, appended.len() + 1);
                    appended.push(p);
                }
                Op::Flush => acked = log.flush()? as usize,
            }
        }
        if fail_last_flush {
            // A crash between write and sync: the writes are issued, never synced.
            if let Some(d) = flush_failing_sync(&log, storage) {
                acked = d as usize;
            }
        }
        drop(log);
        storage.crash(seed);
        let log = Log::open(storage.clone(), cfg.clone())?;
        let replayed = replay_all(&log)?.into_iter().map(|(_, p)| p).collect();
        Ok((appended, acked, replayed))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn crash_keeps_acknowledged_prefix(
            ops in proptest::collection::vec(op(), 1..80),
            ops2 in proptest::collection::vec(op(), 1..20),
            fail_last in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let storage = MemStorage::new();
            let cfg = small_cfg();
            let (appended, acked, replayed) =
                crash_run(&storage, &cfg, 0, &ops, fail_last, seed).unwrap();
            // Prefix, byte-identical, nothing invented; everything acknowledged survives.
            prop_assert!(replayed.len() <= appended.len());
            prop_assert_eq!(&replayed[..], &appended[..replayed.len()]);
            prop_assert!(replayed.len() >= acked, "lost acked: {} < {}", replayed.len(), acked);

            // After recovery the log accepts appends, and they survive a further crash.
            let log = Log::open(storage.clone(), cfg.clone()).unwrap();
            let mut more = Vec::new();
            for (i, op) in ops2.iter().enumerate() {
                if let Op::Append(len) = op {
                    let p = crash_payload(1, i as u64, *len);
                    log.append(&p, AppendClass::Normal).unwrap();
                    more.push(p);
                }
            }
            log.flush().unwrap();
            drop(log);
            storage.crash(seed.wrapping_add(1));
            let log = Log::open(storage.clone(), cfg).unwrap();
            let after: Vec<Vec<u8>> = replay_all(&log).unwrap().into_iter().map(|(_, p)| p).collect();
            let mut expect = replayed.clone();
            expect.extend(more);
            prop_assert_eq!(after, expect);
        }
    }

    /// The planted bug must be caught: acknowledging before syncing loses an acknowledged frame
    /// for some seed, which the property above would report.
    #[test]
    fn ack_before_sync_loses_acknowledged_frames() {
        let cfg = LogConfig {
            ack_before_sync_for_tests: true,
            ..small_cfg()
        };
        let ops: Vec<Op> = (0..12)
            .flat_map(|i| [Op::Append(20 + i), Op::Append(50), Op::Flush])
            .collect();
        let mut caught = None;
        for seed in 0..64 {
            let storage = MemStorage::new();
            let (appended, acked, replayed) =
                crash_run(&storage, &cfg, 0, &ops, false, seed).unwrap();
            assert_eq!(acked, appended.len());
            if replayed.len() < acked {
                caught = Some(seed);
                break;
            }
        }
        assert!(caught.is_some(), "planted bug not detected");
        // And the correct log never loses them with the same schedule.
        for seed in 0..64 {
            let storage = MemStorage::new();
            let (_, acked, replayed) =
                crash_run(&storage, &small_cfg(), 0, &ops, false, seed).unwrap();
            assert!(replayed.len() >= acked);
        }
    }

    #[test]
    fn group_commit_on_fs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_bytes: 64 << 10,
            max_payload_bytes: 1024,
            reserve_bytes: 1024,
            ack_before_sync_for_tests: false,
        };
        let log = Arc::new(Log::open(FsStorage::open(dir.path()).unwrap(), cfg.clone()).unwrap());
        const THREADS: u64 = 16;
        const PER: u64 = 500;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..PER {
                        let p = payload(t * PER + i, 16);
                        let (lsn, loc) = log.append(&p, AppendClass::Normal).unwrap();
                        assert!(log.wait_durable(lsn).unwrap() >= lsn);
                        assert!(log.durable_lsn() >= lsn);
                        assert_eq!(log.read(loc).unwrap(), p);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let stats = log.stats();
        let frames = THREADS * PER;
        assert_eq!(stats.frames_written, frames);
        assert_eq!(log.durable_lsn(), frames);
        assert!(
            stats.syncs < frames,
            "group commit: {} syncs for {frames} frames",
            stats.syncs
        );
        eprintln!(
            "group commit: {frames} frames, {} syncs, {:.1} frames/sync",
            stats.syncs,
            frames as f64 / stats.syncs as f64
        );
        drop(log);
        let log = Log::open(FsStorage::open(dir.path()).unwrap(), cfg).unwrap();
        let mut got: Vec<u64> = replay_all(&log)
            .unwrap()
            .into_iter()
            .map(|(_, p)| u64::from_le_bytes(p[..8].try_into().unwrap()))
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..frames).collect::<Vec<_>>());
    }

    #[test]
    fn a_dedicated_flusher_makes_waiting_callers_durable() {
        let storage = MemStorage::new();
        let log = Arc::new(Log::open(storage.clone(), small_cfg()).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    log.flush_appended(Duration::from_millis(5)).unwrap();
                }
            })
        };
        // Nothing appended: an idle flusher leaves the durable lsn alone, and a caller's wait
        // for an lsn never appended is an error, not a hang.
        assert!(matches!(
            log.wait_durable_for(1, Duration::from_millis(1)),
            Err(LogError::LsnNotAppended { .. })
        ));
        let callers: Vec<_> = (0..4u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let (lsn, _) = log
                            .append(&payload(t * 50 + i, 20), AppendClass::Normal)
                            .unwrap();
                        // Only ever waits: the flusher thread does every write and sync.
                        while log.wait_durable_for(lsn, Duration::from_secs(1)).unwrap() < lsn {}
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        flusher.join().unwrap();
        assert_eq!(log.durable_lsn(), 200);
        assert_eq!(log.stats().frames_written, 200);
        drop(log);
        storage.crash(7);
        let log = Log::open(storage, small_cfg()).unwrap();
        assert_eq!(replay_all(&log).unwrap().len(), 200, "all of it was synced");
    }

    #[test]
    fn sequenced_appends_end_with_dense_numbers_and_valid_frames() {
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        log.set_next_seq(41);
        log.set_next_seq(7); // never moves back
        let mut expected = Vec::new();
        for i in 0..30u64 {
            let p = payload(i, (i as usize * 5) % 120 + 1);
            let (lsn, loc, seq) = if i % 3 == 0 {
                // Plain appends in between take no number.
                let (lsn, loc) = log.append(&p, AppendClass::Normal).unwrap();
                (lsn, loc, None)
            } else {
                let (lsn, loc, seq) = log
                    .append_sequenced(&p, AppendClass::Normal, Space::default())
                    .unwrap();
                (lsn, loc, Some(seq))
            };
            let mut whole = p.clone();
            if let Some(seq) = seq {
                whole.extend_from_slice(&encode::seq_trailer(seq));
            }
            assert_eq!(log.read(loc).unwrap(), whole, "readable before the flush");
            expected.push((loc, whole, seq, lsn));
        }
        let seqs: Vec<u64> = expected.iter().filter_map(|e| e.2).collect();
        assert_eq!(seqs, (41..41 + seqs.len() as u64).collect::<Vec<_>>());
        log.flush().unwrap();
        assert_eq!(log.durable_seq(), 40 + seqs.len() as u64);
        drop(log);
        // The CRC covers the trailer: recovery accepts every frame and reads it back whole.
        let log = Log::open(storage, small_cfg()).unwrap();
        let replayed = replay_all(&log).unwrap();
        let want: Vec<(Loc, Vec<u8>)> = expected.into_iter().map(|e| (e.0, e.1)).collect();
        assert_eq!(replayed, want);
    }

    #[test]
    fn an_idle_flusher_returns_after_its_timeout() {
        let log = Log::open(MemStorage::new(), small_cfg()).unwrap();
        assert_eq!(log.flush_appended(Duration::from_millis(2)).unwrap(), 0);
        log.append(b"x", AppendClass::Normal).unwrap();
        assert_eq!(log.flush_appended(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(log.wait_durable_for(1, Duration::ZERO).unwrap(), 1);
    }

    #[test]
    fn sync_failure_poisons_for_good() {
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        log.append(b"one", AppendClass::Normal).unwrap();
        log.flush().unwrap();
        let (lsn, _) = log.append(b"two", AppendClass::Normal).unwrap();
        storage.fail_next_sync();
        assert!(matches!(log.flush(), Err(LogError::Io { .. })));
        let syncs = storage.stats().syncs;
        assert!(log.is_poisoned());
        assert!(matches!(
            log.append(b"three", AppendClass::Reserved),
            Err(LogError::Poisoned)
        ));
        assert!(matches!(log.flush(), Err(LogError::Poisoned)));
        assert!(matches!(log.wait_durable(lsn), Err(LogError::Poisoned)));
        assert!(matches!(log.wait_durable(1), Err(LogError::Poisoned)));
        assert_eq!(log.durable_lsn(), 1);
        assert_eq!(storage.stats().syncs, syncs, "no sync retried");
    }

    #[test]
    fn disk_full_keeps_reserve_for_reserved_appends() {
        let storage = MemStorage::new();
        let cfg = small_cfg(); // 1024-byte segments, 256 reserve
                               // Room for the first segment and one spare only.
        storage.set_capacity(Some(2048));
        let log = Log::open(storage.clone(), cfg).unwrap();
        let p = [7u8; 56]; // 64-byte frames: 16 per segment
        for _ in 0..16 {
            log.append(&p, AppendClass::Normal).unwrap();
        }
        // Rolls into the spare; creating the next spare fails for lack of space.
        let (_, loc) = log.append(&p, AppendClass::Normal).unwrap();
        assert_eq!(loc.segment, 2);
        log.flush().unwrap();
        // 768 bytes usable by Normal appends in segment 2: 11 more frames after the first.
        let mut normal = 1;
        loop {
            match log.append(&p, AppendClass::Normal) {
                Ok(_) => normal += 1,
                Err(LogError::NoSpace) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(normal <= 12);
        }
        assert_eq!(normal, 12);
        let mut reserved = 0;
        while log.append(&p, AppendClass::Reserved).is_ok() {
            reserved += 1;
        }
        assert_eq!(reserved, 4);
        assert!(matches!(
            log.append(&p, AppendClass::Reserved),
            Err(LogError::NoSpace)
        ));
        assert_eq!(log.flush().unwrap(), 16 + 12 + 4);
        // Garbage collection frees space: normal appends work again.
        assert!(matches!(
            log.remove_segment(2),
            Err(LogError::SegmentBusy { .. })
        ));
        log.remove_segment(1).unwrap();
        let (_, loc) = log.append(&p, AppendClass::Normal).unwrap();
        assert!(loc.segment > 2, "{loc:?}");
        log.flush().unwrap();
    }

    #[test]
    fn torn_tail_is_cut_and_overwritten() {
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        let (_, a) = log.append(b"alpha", AppendClass::Normal).unwrap();
        let (_, b) = log.append(b"bravo", AppendClass::Normal).unwrap();
        log.flush().unwrap();
        let end = log.durable_end();
        drop(log);
        // A torn frame: plausible header, half a payload, then a stale valid-looking frame.
        let mut torn = 100u32.to_le_bytes().to_vec();
        torn.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        storage
            .write_at(end.segment, u64::from(end.offset), &torn)
            .unwrap();
        let stale = {
            let mut f = 5u32.to_le_bytes().to_vec();
            f.extend_from_slice(&frame_crc(5u32.to_le_bytes(), b"ghost").to_le_bytes());
            f.extend_from_slice(b"ghost");
            f
        };
        storage
            .write_at(end.segment, u64::from(end.offset) + 30, &stale)
            .unwrap();
        storage.sync(end.segment).unwrap();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        let frames = replay_all(&log).unwrap();
        assert_eq!(frames, vec![(a, b"alpha".to_vec()), (b, b"bravo".to_vec())]);
        // The tail is zeroes again, so the stale frame cannot come back behind a short append.
        let mut buf = [1u8; 64];
        storage
            .read_at(end.segment, u64::from(end.offset), &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        let (_, c) = log.append(b"c", AppendClass::Normal).unwrap();
        assert_eq!(c, end);
        log.flush().unwrap();
        drop(log);
        let log = Log::open(storage, small_cfg()).unwrap();
        assert_eq!(replay_all(&log).unwrap().len(), 3);
    }

    #[test]
    fn damage_in_sealed_segment_is_corrupt() {
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), small_cfg()).unwrap();
        let mut locs = Vec::new();
        for i in 0..40 {
            locs.push(log.append(&payload(i, 60), AppendClass::Normal).unwrap().1);
        }
        log.flush().unwrap();
        drop(log);
        let victim = locs[3];
        assert_eq!(victim.segment, 1);
        assert!(locs.last().unwrap().segment > 2);
        storage
            .write_at(victim.segment, u64::from(victim.offset) + 12, &[0xff])
            .unwrap();
        storage.sync(victim.segment).unwrap();
        let log = Log::open(storage, small_cfg()).unwrap();
        match replay_all(&log) {
            Err(LogError::Corrupt {
                segment, offset, ..
            }) => {
                assert_eq!((segment, offset), (1, u64::from(victim.offset)));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(log.read(victim), Err(LogError::Corrupt { .. })));
    }

    /// A frame of `FRAME` bytes: what a completion of a granted claim writes in these tests.
    const W: usize = 92;
    const FRAME: u64 = FRAME_HEADER_BYTES + W as u64;
    /// A Normal frame of 64 bytes: new work.
    const N: usize = 56;

    /// Appends Normal frames (flushing now and then, so the background tops up spares) until the
    /// log refuses one with NoSpace; returns how many it took.
    fn fill_with_normal<S: Storage>(log: &Log<S>) -> usize {
        let mut n = 0;
        loop {
            match log.append(&payload(n as u64, N - 8), AppendClass::Normal) {
                Ok(_) => n += 1,
                Err(LogError::NoSpace) => return n,
                Err(e) => panic!("{e}"),
            }
            if n % 4 == 0 {
                log.flush().unwrap();
            }
            assert!(n < 100_000, "never filled");
        }
    }

    #[test]
    fn promised_space_survives_a_full_disk() {
        let cfg = small_cfg(); // 1024-byte segments, 256-byte floor
        let storage = MemStorage::new();
        storage.set_capacity(Some(5 * 1024));
        let log = Log::open(storage.clone(), cfg.clone()).unwrap();
        // Grant 20 claims: one promise per completion frame.
        for _ in 0..20 {
            log.reserve_space(FRAME).unwrap();
        }
        let s = log.stats();
        assert_eq!(s.reserved_bytes, 20 * FRAME);
        assert!(s.free_bytes >= 20 * FRAME + cfg.reserve_bytes, "{s:?}");
        // New claims fill the disk and are refused first.
        let normal = fill_with_normal(&log);
        assert!(normal > 20, "{normal}");
        assert!(
            storage.used_bytes() + cfg.segment_bytes > 5 * 1024,
            "refused only once no segment can be created"
        );
        let s = log.stats();
        let promised = 20 * FRAME + cfg.reserve_bytes;
        assert!(s.free_bytes >= promised, "promises kept: {s:?}");
        // Refused at the right point: at most one frame plus the roll allowance per segment more.
        let slack = (FRAME - 1) * (s.spares + 1);
        assert!(s.free_bytes < promised + 64 + slack, "{s:?}");
        // A new promise is refused too, and takes nothing.
        assert!(matches!(log.reserve_space(FRAME), Err(LogError::NoSpace)));
        assert_eq!(log.stats().reserved_bytes, 20 * FRAME);
        // Every granted claim completes.
        for i in 0..20 {
            log.append(&payload(1_000 + i, W - 8), AppendClass::Reserved)
                .unwrap();
            log.release_space(FRAME);
            if i % 3 == 0 {
                log.flush().unwrap();
            }
        }
        assert_eq!(log.stats().reserved_bytes, 0);
        // The floor is left for the store's own small finishing writes.
        let mut floor = 0;
        while log
            .append(&payload(2_000 + floor, N - 8), AppendClass::Reserved)
            .is_ok()
        {
            floor += 1;
        }
        assert!(floor >= 3, "{floor}");
        let total = log.flush().unwrap();
        assert_eq!(total, normal as u64 + 20 + floor);
        drop(log);
        let log = Log::open(storage, cfg).unwrap();
        assert_eq!(replay_all(&log).unwrap().len() as u64, total);
    }

    #[test]
    fn promises_beyond_the_disk_are_refused_and_release_returns_space() {
        let cfg = small_cfg();
        let storage = MemStorage::new();
        storage.set_capacity(Some(3 * 1024));
        let log = Log::open(storage.clone(), cfg.clone()).unwrap();
        let mut granted = 0u64;
        while log.reserve_space(FRAME).is_ok() {
            granted += 1;
            assert!(granted < 1000);
        }
        // Three segments of 1024 bytes, each counted without 99 bytes of roll allowance, hold
        // 25 promised frames besides the floor.
        assert_eq!(granted, 25);
        assert_eq!(log.stats().reserved_bytes, granted * FRAME);
        assert!(matches!(log.reserve_space(10_000), Err(LogError::NoSpace)));
        assert_eq!(log.stats().reserved_bytes, granted * FRAME);
        // Everything is promised: new work is refused outright.
        assert!(matches!(
            log.append(&[1; N - 8], AppendClass::Normal),
            Err(LogError::NoSpace)
        ));
        // Ten claims are abandoned: their space is free for new work again.
        for _ in 0..10 {
            log.release_space(FRAME);
        }
        granted -= 10;
        let normal = fill_with_normal(&log);
        assert!(normal >= 10, "{normal}");
        for i in 0..granted {
            log.append(&payload(i, W - 8), AppendClass::Reserved)
                .unwrap();
            log.release_space(FRAME);
        }
        assert_eq!(log.flush().unwrap(), normal as u64 + granted);
    }

    #[test]
    fn roll_allowance_follows_the_largest_outstanding_promise() {
        let log = Log::open(MemStorage::new(), small_cfg()).unwrap();
        let slack = || lock(&log.state).slack();
        log.reserve_space(100).unwrap();
        log.reserve_space(60).unwrap();
        assert_eq!(slack(), 99);
        log.release_space(100);
        assert_eq!(
            slack(),
            59,
            "a size class with nothing outstanding no longer counts"
        );
        log.reserve_space(100).unwrap();
        assert_eq!(slack(), 99, "and counts again once promised again");
        log.release_space(100);
        log.release_space(60);
        assert_eq!(slack(), 0);
        assert_eq!(log.stats().reserved_bytes, 0);
        // Many different sizes come and go: the classes kept at zero stay few.
        for b in 1..=100 {
            log.reserve_space(b).unwrap();
            log.reserve_space(200).unwrap();
            log.release_space(b);
            log.release_space(200);
        }
        assert!(lock(&log.state).promises.len() <= PROMISE_CLASSES_KEPT + 1);
        assert_eq!(slack(), 0);
    }

    #[test]
    fn promises_spread_over_several_spares_and_survive_reopen() {
        let cfg = small_cfg();
        let storage = MemStorage::new();
        let log = Log::open(storage.clone(), cfg.clone()).unwrap();
        for _ in 0..60 {
            log.reserve_space(FRAME).unwrap();
        }
        let spares: Vec<SegmentId> = log
            .segments()
            .iter()
            .filter(|s| s.role == SegmentRole::Spare)
            .map(|s| s.id)
            .collect();
        assert!(spares.len() >= 6, "{spares:?}");
        assert!(spares.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(log.stats().spares, spares.len() as u64);
        // Clean close with several empty spares: they are dropped at open.
        drop(log);
        let log = Log::open(storage.clone(), cfg.clone()).unwrap();
        assert!(replay_all(&log).unwrap().is_empty());
        assert_eq!(log.stats().reserved_bytes, 0);
        // Promise again, then roll through the spares with both kinds of appends.
        for _ in 0..60 {
            log.reserve_space(FRAME).unwrap();
        }
        let mut written = Vec::new();
        for i in 0..60u64 {
            let p = payload(i, W - 8);
            written.push((log.append(&p, AppendClass::Reserved).unwrap().1, p));
            log.release_space(FRAME);
            let p = payload(100 + i, N - 8);
            written.push((log.append(&p, AppendClass::Normal).unwrap().1, p));
            if i % 7 == 0 {
                log.flush().unwrap();
            }
        }
        log.flush().unwrap();
        assert!(written.windows(2).all(|w| w[0].0 < w[1].0));
        let segs: std::collections::BTreeSet<_> = written.iter().map(|(l, _)| l.segment).collect();
        assert!(segs.len() >= 9, "{segs:?}");
        assert_eq!(replay_all(&log).unwrap(), written);
        drop(log);
        let log = Log::open(storage, cfg).unwrap();
        assert_eq!(replay_all(&log).unwrap(), written);
    }

    #[test]
    fn crash_with_several_spares_keeps_acknowledged_frames() {
        let cfg = small_cfg();
        for seed in 0..48u64 {
            let storage = MemStorage::new();
            let log = Log::open(storage.clone(), cfg.clone()).unwrap();
            let mut appended = Vec::new();
            let mut acked = 0;
            for i in 0..40u64 {
                if i % 5 == 0 {
                    // Promises grow ahead of the appends: several spares stay ahead.
                    for _ in 0..10 {
                        log.reserve_space(FRAME).unwrap();
                    }
                }
                let p = crash_payload(seed, i, W as u8 - 8);
                log.append(&p, AppendClass::Reserved).unwrap();
                log.release_space(FRAME);
                appended.push(p);
                if (i + seed) % 6 == 0 {
                    acked = log.flush().unwrap() as usize;
                }
            }
            assert!(log.stats().spares >= 3, "{:?}", log.stats());
            if seed % 2 == 0 {
                if let Some(d) = flush_failing_sync(&log, &storage) {
                    acked = d as usize;
                }
            }
            drop(log);
            storage.crash(seed);
            let log = Log::open(storage.clone(), cfg.clone()).unwrap();
            let replayed: Vec<Vec<u8>> = replay_all(&log)
                .unwrap()
                .into_iter()
                .map(|(_, p)| p)
                .collect();
            assert!(
                replayed.len() >= acked,
                "seed {seed}: lost acknowledged frames"
            );
            assert_eq!(&replayed[..], &appended[..replayed.len()], "seed {seed}");
            // And the recovered log goes on, promises included.
            for _ in 0..30 {
                log.reserve_space(FRAME).unwrap();
            }
            let mut more = Vec::new();
            for i in 0..30u64 {
                let p = crash_payload(seed + 1_000, i, W as u8 - 8);
                log.append(&p, AppendClass::Reserved).unwrap();
                log.release_space(FRAME);
                more.push(p);
            }
            log.flush().unwrap();
            drop(log);
            storage.crash(seed ^ 0xabc);
            let log = Log::open(storage.clone(), cfg.clone()).unwrap();
            let after: Vec<Vec<u8>> = replay_all(&log)
                .unwrap()
                .into_iter()
                .map(|(_, p)| p)
                .collect();
            let mut expect = replayed;
            expect.extend(more);
            assert_eq!(after, expect, "seed {seed}");
        }
    }

    /// Grants race with new work while the disk fills: no promised append ever fails, even
    /// without a floor and with frames that leave space unused at every segment's end.
    #[test]
    fn concurrent_promises_hold_when_the_disk_fills() {
        let cfg = LogConfig {
            reserve_bytes: 0,
            ..small_cfg()
        };
        const PAYLOAD: usize = 190; // 198-byte frames: 5 fit a segment, 34 bytes left over
        const BATCH: u64 = 4;
        let frame = Log::<MemStorage>::frame_bytes(PAYLOAD);
        for round in 0..4u64 {
            let storage = MemStorage::new();
            storage.set_capacity(Some(12 * 1024));
            let log = Arc::new(Log::open(storage.clone(), cfg.clone()).unwrap());
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let log = Arc::clone(&log);
                    std::thread::spawn(move || {
                        let (mut done, mut refused) = (0u64, 0u64);
                        for i in 0..100u64 {
                            // Grant a few claims: promise each completion, then log the claim.
                            let mut granted = 0;
                            for _ in 0..BATCH {
                                if log.reserve_space(frame).is_err() {
                                    refused += 1;
                                    continue;
                                }
                                let len = 8 + ((t + i + round) as usize * 37) % 150;
                                match log.append(&payload(t, len), AppendClass::Normal) {
                                    Ok(_) => granted += 1,
                                    Err(LogError::NoSpace) => {
                                        log.release_space(frame);
                                        refused += 1;
                                    }
                                    Err(e) => panic!("{e}"),
                                }
                                std::thread::yield_now();
                            }
                            // Complete them.
                            let mut lsn = 0;
                            for _ in 0..granted {
                                let p = payload(t * 10_000 + i, PAYLOAD - 8);
                                lsn = log
                                    .append(&p, AppendClass::Reserved)
                                    .expect("a promised completion must succeed")
                                    .0;
                                log.release_space(frame);
                                done += 1;
                            }
                            if lsn > 0 {
                                log.wait_durable(lsn).unwrap();
                            }
                        }
                        (done, refused)
                    })
                })
                .collect();
            let (mut done, mut refused) = (0, 0);
            for h in handles {
                let (d, r) = h.join().unwrap();
                done += d;
                refused += r;
            }
            assert!(done > 0 && refused > 0, "{done} done, {refused} refused");
            assert_eq!(log.stats().reserved_bytes, 0);
            assert_eq!(log.flush().unwrap(), 2 * done);
        }
    }
}
