//! The storage interface under the write-ahead log, a real directory-backed implementation and a
//! deterministic in-memory one with fault injection.
//!
//! The log never touches the file system directly: everything goes through [`Storage`] so that the
//! single-threaded simulator can swap in [`MemStorage`], crash it at any point and check that no
//! acknowledged write is lost.
//!
//! # Durability contract
//!
//! * Bytes passed to [`Storage::write_at`] are durable only once a later [`Storage::sync`] of the same
//!   segment returned `Ok`. Until then a power loss may drop any subset of them and tear any write.
//! * Size changes ([`Storage::truncate`], [`Storage::allocate`]) are durable after the next `sync` of
//!   the segment, like data.
//! * A newly created or removed segment is durable only after a later [`Storage::sync_dir`]
//!   (POSIX: the directory entry lives in the directory, not in the file). [`FsStorage::create`] syncs
//!   the directory itself, but callers must not rely on that: [`MemStorage`] models the weaker contract.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::splitmix::SplitMix64;

/// Identifies a log segment; segments are ordered by id, which is also their order in time.
pub type SegmentId = u32;

/// File-name suffix of segment files in an [`FsStorage`] directory.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// File-name suffix of hint files in an [`FsStorage`] directory.
pub const HINT_SUFFIX: &str = ".hint";
/// The file an [`FsStorage`] locks in its directory.
pub const LOCK_FILE: &str = "LOCK";

/// Where log segments live. Object-safe and shareable so the log can hand reads to many threads.
///
/// Differences from a plain file API, and why:
/// * [`Storage::allocate`] exists (beyond `create`) so recovery can cut a torn tail with `truncate`
///   and then reserve the segment's space again: zeroes must follow the valid data, or a stale
///   frame beyond a new, shorter write could be replayed after the next crash.
pub trait Storage: Send + Sync + 'static {
    /// Segment ids present, sorted ascending.
    fn list(&self) -> io::Result<Vec<SegmentId>>;
    /// Creates a new, empty segment with `prealloc_bytes` of zeroed space reserved up front, so a
    /// full disk shows up here as `ENOSPC` and not later in the middle of a write. Fails if the
    /// segment exists. The directory entry is durable only after [`Storage::sync_dir`].
    fn create(&self, id: SegmentId, prealloc_bytes: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`, growing the segment if needed.
    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every earlier write and size change of this segment durable (fdatasync).
    fn sync(&self, id: SegmentId) -> io::Result<()>;
    /// Reads into `buf` from `offset`; returns fewer bytes than `buf.len()` only at end of segment.
    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Segment size in bytes, preallocated zeroes included.
    fn size(&self, id: SegmentId) -> io::Result<u64>;
    /// Grows the segment to `len` bytes of reserved, zeroed space; never shrinks it.
    fn allocate(&self, id: SegmentId, len: u64) -> io::Result<()>;
    /// Cuts the segment to `len` bytes.
    fn truncate(&self, id: SegmentId, len: u64) -> io::Result<()>;
    /// Deletes the segment; durable after [`Storage::sync_dir`].
    fn remove(&self, id: SegmentId) -> io::Result<()>;
    /// Makes segment creations and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Stores a segment's hint file (a compact summary of a sealed segment, for fast restart),
    /// atomically and durably: after a crash it is either absent or complete.
    fn put_hint(&self, id: SegmentId, bytes: &[u8]) -> io::Result<()>;
    /// A segment's hint file, if one was stored.
    fn get_hint(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>>;
    /// Removes a segment's hint file, if any.
    fn remove_hint(&self, id: SegmentId) -> io::Result<()>;
    /// How far ahead of its writes the log should zero-fill a segment, in one step: storages
    /// whose preallocated but never written space makes a sync slow (ext4 converts unwritten
    /// extents inside fdatasync, a journal commit) return a window, so most syncs touch only
    /// blocks written before. 0, the default, turns it off.
    fn zero_ahead_bytes(&self) -> u64 {
        0
    }
    /// Whether a write and sync take microseconds (memory), not a disk's hundreds: then a
    /// thread waiting for a flush in progress spins briefly instead of sleeping at once. Default
    /// false.
    fn syncs_in_microseconds(&self) -> bool {
        false
    }
}

/// Shared handles are storages too, so a test can keep one and give the log another.
impl<T: Storage + ?Sized> Storage for Arc<T> {
    fn list(&self) -> io::Result<Vec<SegmentId>> {
        (**self).list()
    }
    fn create(&self, id: SegmentId, prealloc_bytes: u64) -> io::Result<()> {
        (**self).create(id, prealloc_bytes)
    }
    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(id, offset, data)
    }
    fn sync(&self, id: SegmentId) -> io::Result<()> {
        (**self).sync(id)
    }
    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_at(id, offset, buf)
    }
    fn size(&self, id: SegmentId) -> io::Result<u64> {
        (**self).size(id)
    }
    fn allocate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        (**self).allocate(id, len)
    }
    fn truncate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        (**self).truncate(id, len)
    }
    fn remove(&self, id: SegmentId) -> io::Result<()> {
        (**self).remove(id)
    }
    fn sync_dir(&self) -> io::Result<()> {
        (**self).sync_dir()
    }
    fn put_hint(&self, id: SegmentId, bytes: &[u8]) -> io::Result<()> {
        (**self).put_hint(id, bytes)
    }
    fn get_hint(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>> {
        (**self).get_hint(id)
    }
    fn remove_hint(&self, id: SegmentId) -> io::Result<()> {
        (**self).remove_hint(id)
    }
    fn zero_ahead_bytes(&self) -> u64 {
        (**self).zero_ahead_bytes()
    }
    fn syncs_in_microseconds(&self) -> bool {
        (**self).syncs_in_microseconds()
    }
}

/// Locks a mutex even if a panicking thread poisoned it: the protected data here stays consistent
/// across panics (every update is a single assignment or a completed I/O call), and an I/O path
/// must not panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

/// Whether an error means "the disk is full", however the platform reports it.
pub fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}

fn not_found(id: SegmentId) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("segment {id} does not exist"),
    )
}

// ---------------------------------------------------------------------------------------------
// FsStorage
// ---------------------------------------------------------------------------------------------

/// Segments as files `{id:08x}.seg` in one directory.
///
/// File handles stay open in a map so reads are a single `pread` on a shared handle: readers never
/// wait for the log's writer, only for the map lock held for a lookup.
///
/// One process at a time: opening takes an exclusive lock on the directory's [`LOCK_FILE`],
/// held while the storage lives (the system drops it when the process dies, even by kill -9).
/// Two writers appending to one log would interleave their frames.
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
    dir_file: File,
    /// Holds the directory's lock.
    _lock: File,
    files: Mutex<HashMap<SegmentId, Arc<File>>>,
    zero_ahead: u64,
}

impl FsStorage {
    /// Default for [`FsStorage::with_zero_ahead`].
    pub const ZERO_AHEAD_BYTES: u64 = 4 << 20;

    /// Opens (creating if missing) the segment directory and locks it; an error of kind
    /// `WouldBlock` when another process (or another `FsStorage` in this one) has it open.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let dir_file = File::open(&dir)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another process (it holds the lock on {LOCK_FILE}); one directory serves one process at a time",
                        dir.display()
                    ),
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(FsStorage {
            dir,
            dir_file,
            _lock: lock,
            files: Mutex::new(HashMap::new()),
            zero_ahead: Self::ZERO_AHEAD_BYTES,
        })
    }

    /// Sets how far ahead of its writes the log zero-fills segments (see
    /// [`Storage::zero_ahead_bytes`]; 0 turns it off). Default [`FsStorage::ZERO_AHEAD_BYTES`]:
    /// fallocated blocks on ext4 are unwritten extents, and the first sync of each one costs a
    /// journal commit (figures in `docs/perf.md`).
    pub fn with_zero_ahead(mut self, bytes: u64) -> Self {
        self.zero_ahead = bytes;
        self
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a segment's hint file.
    pub fn hint_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(format!("{id:08x}{HINT_SUFFIX}"))
    }

    /// Path of a segment's file; fixed-width hex so that names sort like ids.
    pub fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(format!("{id:08x}{SEGMENT_SUFFIX}"))
    }

    fn file(&self, id: SegmentId) -> io::Result<Arc<File>> {
        let mut files = lock(&self.files);
        if let Some(f) = files.get(&id) {
            return Ok(Arc::clone(f));
        }
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.segment_path(id))
        {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(id)),
            Err(e) => return Err(e),
        };
        files.insert(id, Arc::clone(&f));
        Ok(f)
    }

    /// Parses a directory entry name; `Ok(None)` for files that are not segments.
    fn parse_name(&self, name: &str) -> io::Result<Option<SegmentId>> {
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            return Ok(None);
        };
        let parsed = if stem.len() == 8 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            u32::from_str_radix(stem, 16).ok()
        } else {
            None
        };
        match parsed {
            Some(id) => Ok(Some(id)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "file {} looks like a log segment but its name is not 8 hex digits + {SEGMENT_SUFFIX}",
                    self.dir.join(name).display()
                ),
            )),
        }
    }
}

/// Reserves `len` bytes for `f` (fallocate mode 0: allocates and extends the size). Falls back to a
/// sparse `set_len` where the file system cannot preallocate, which loses only the early ENOSPC.
fn fallocate(f: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let len_off = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        if len_off == 0 {
            return Ok(());
        }
        loop {
            // SAFETY: plain syscall on a valid, open file descriptor owned by `f`.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len_off) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) => break,
                _ => return Err(err),
            }
        }
    }
    if f.metadata()?.len() < len {
        f.set_len(len)?;
    }
    Ok(())
}

impl Storage for FsStorage {
    fn list(&self) -> io::Result<Vec<SegmentId>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            // Names that are not UTF-8 cannot be ours: ignore them like any unknown file.
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = self.parse_name(name)? {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn create(&self, id: SegmentId, prealloc_bytes: u64) -> io::Result<()> {
        let path = self.segment_path(id);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let res = fallocate(&f, prealloc_bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| self.dir_file.sync_all());
        if let Err(e) = res {
            // Do not leave a half-made segment behind; the original error is what matters.
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        lock(&self.files).insert(id, Arc::new(f));
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file(id)?.write_all_at(data, offset)
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        self.file(id)?.sync_data()
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.file(id)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        Ok(self.file(id)?.metadata()?.len())
    }

    fn allocate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        let f = self.file(id)?;
        let old = f.metadata()?.len();
        if old >= len {
            return Ok(());
        }
        fallocate(&f, len)
    }

    fn truncate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        self.file(id)?.set_len(len)
    }

    fn remove(&self, id: SegmentId) -> io::Result<()> {
        lock(&self.files).remove(&id);
        match fs::remove_file(self.segment_path(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(id)),
            r => r,
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.dir_file.sync_all()
    }

    fn put_hint(&self, id: SegmentId, bytes: &[u8]) -> io::Result<()> {
        // Write aside, sync, rename over, sync the directory: all or nothing after a crash.
        let path = self.hint_path(id);
        let tmp = path.with_extension("hint.tmp");
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all_at(bytes, 0)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        self.dir_file.sync_all()
    }

    fn get_hint(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.hint_path(id)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove_hint(&self, id: SegmentId) -> io::Result<()> {
        match fs::remove_file(self.hint_path(id)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn zero_ahead_bytes(&self) -> u64 {
        self.zero_ahead
    }
}

/// Hint files held in memory (both in-memory storages): each put is atomic and durable.
#[derive(Debug, Default)]
struct MemHints(BTreeMap<SegmentId, Vec<u8>>);

impl MemHints {
    fn put(&mut self, id: SegmentId, bytes: &[u8]) -> io::Result<()> {
        self.0.insert(id, bytes.to_vec());
        Ok(())
    }

    fn get(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(&id).cloned())
    }

    fn remove(&mut self, id: SegmentId) -> io::Result<()> {
        self.0.remove(&id);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// MemStorage
// ---------------------------------------------------------------------------------------------

/// Contents of one segment: `data` holds the written prefix, bytes in `data.len()..len` read as zero.
/// Keeping preallocated space implicit lets the simulator use 64 MiB segments without 64 MiB of RAM.
#[derive(Debug, Clone, Default)]
struct Image {
    data: Vec<u8>,
    len: u64,
}

impl Image {
    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let start = offset as usize;
        let end = start + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        self.len = self.len.max(end as u64);
    }

    fn set_len(&mut self, len: u64) {
        if (self.data.len() as u64) > len {
            self.data.truncate(len as usize);
        }
        self.len = len;
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> usize {
        if offset >= self.len {
            return 0;
        }
        let n = buf.len().min((self.len - offset) as usize);
        let start = offset as usize;
        let have = self.data.len().saturating_sub(start).min(n);
        if have > 0 {
            buf[..have].copy_from_slice(&self.data[start..start + have]);
        }
        buf[have..n].fill(0);
        n
    }
}

/// A change since the segment's last sync, kept so a crash can drop or tear it.
#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct MemSegment {
    /// What survives a crash for sure.
    durable: Image,
    /// What reads see now.
    current: Image,
    /// Changes since the last successful sync, in issue order.
    pending: Vec<Pending>,
    /// Whether a `sync_dir` followed the creation.
    dir_durable: bool,
}

/// Counters of a [`MemStorage`], for tests and benches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// `sync` calls, failed ones included (a test checks that a poisoned log stops calling).
    pub syncs: u64,
    /// `sync` calls that returned an injected error.
    pub failed_syncs: u64,
    /// `sync_dir` calls.
    pub dir_syncs: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// Bytes passed to `write_at`.
    pub bytes_written: u64,
}

/// What one [`MemStorage::crash`] did, so a simulator run can report that it exercised torn writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Unsynced writes that survived, torn ones included.
    pub kept_writes: u64,
    /// Unsynced writes that were lost entirely.
    pub dropped_writes: u64,
    /// Surviving writes that were cut short.
    pub torn_writes: u64,
    /// Segments whose creation was not yet durable and that vanished.
    pub vanished_segments: u64,
    /// Removed segments whose removal was not yet durable and that came back.
    pub revived_segments: u64,
}

#[derive(Debug, Default)]
struct MemInner {
    segments: BTreeMap<SegmentId, MemSegment>,
    /// Removed segments whose removal is not yet durable: a crash may bring them back.
    removed: BTreeMap<SegmentId, MemSegment>,
    capacity: Option<u64>,
    fail_next_sync: bool,
    fail_syncs: bool,
    stats: MemStats,
    /// Hint files: written atomically and durably, so a crash leaves them as they are.
    hints: MemHints,
    zero_ahead: u64,
}

impl MemInner {
    fn used(&self) -> u64 {
        self.segments.values().map(|s| s.current.len).sum()
    }

    /// Refuses growth by `extra` bytes beyond the capacity limit.
    fn reserve(&self, extra: u64) -> io::Result<()> {
        match self.capacity {
            Some(cap) if self.used().saturating_add(extra) > cap => Err(enospc()),
            _ => Ok(()),
        }
    }
}

/// In-memory, deterministic storage with fault injection; a cheap clonable handle.
///
/// Keep a clone, drop the log, [`MemStorage::crash`] the handle and open a new log on it to test
/// recovery. Segments are kept in ordered maps so every run with the same seed is identical.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

/// Crash outcomes drawn from the crate's seeded generator.
impl SplitMix64 {
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// Uniform-ish in `0..=max`.
    fn upto(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            self.next()
        } else {
            self.next() % (max + 1)
        }
    }
}

impl MemStorage {
    /// An empty disk without a capacity limit.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, MemInner> {
        lock(&self.inner)
    }

    /// Asks logs on this disk to zero-fill ahead of their writes (see
    /// [`Storage::zero_ahead_bytes`]), so crash tests cover those writes too. Default 0 (off).
    pub fn set_zero_ahead(&self, bytes: u64) {
        self.inner().zero_ahead = bytes;
    }

    /// Simulates power loss and reboot.
    ///
    /// Per segment, synced state survives; of the writes and size changes issued since the last
    /// sync, a seeded arbitrary subset survives (in issue order), and one surviving write is torn:
    /// only a prefix of it lands, sometimes followed by garbage. Segments whose creation no
    /// `sync_dir` followed may vanish; removed segments whose removal no `sync_dir` followed may
    /// come back. Fault switches and the capacity limit stay as they were.
    ///
    /// Drop every log using this storage first: a log still running would keep writing into the
    /// "rebooted" disk.
    pub fn crash(&self, seed: u64) -> CrashReport {
        let mut rng = SplitMix64(seed ^ 0x5eed_c7a5_4000_0001);
        let mut inner = self.inner();
        let mut report = CrashReport::default();
        let ids: Vec<SegmentId> = inner.segments.keys().copied().collect();
        for id in ids {
            let Some(mut seg) = inner.segments.remove(&id) else {
                continue;
            };
            if !seg.dir_durable && rng.coin() {
                report.vanished_segments += 1;
                continue;
            }
            let pending = std::mem::take(&mut seg.pending);
            let mut kept: Vec<Pending> = Vec::new();
            for p in pending {
                let keep = rng.coin();
                match (&p, keep) {
                    (Pending::Write { .. }, true) => report.kept_writes += 1,
                    (Pending::Write { .. }, false) => report.dropped_writes += 1,
                    _ => {}
                }
                if keep {
                    kept.push(p);
                }
            }
            let writes: Vec<usize> = kept
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Pending::Write { .. }))
                .map(|(i, _)| i)
                .collect();
            if !writes.is_empty() {
                let victim = writes[rng.upto(writes.len() as u64 - 1) as usize];
                if let Pending::Write { data, .. } = &mut kept[victim] {
                    let cut = rng.upto(data.len() as u64) as usize;
                    if cut < data.len() {
                        report.torn_writes += 1;
                        if rng.coin() {
                            for b in &mut data[cut..] {
                                *b = rng.next() as u8;
                            }
                        } else {
                            data.truncate(cut);
                        }
                    }
                }
            }
            for p in kept {
                match p {
                    Pending::Write { offset, data } => seg.durable.write(offset, &data),
                    Pending::SetLen(len) => seg.durable.set_len(len),
                }
            }
            seg.current = seg.durable.clone();
            seg.dir_durable = true;
            inner.segments.insert(id, seg);
        }
        let removed = std::mem::take(&mut inner.removed);
        for (id, mut seg) in removed {
            if rng.coin() && !inner.segments.contains_key(&id) {
                seg.pending.clear();
                seg.current = seg.durable.clone();
                seg.dir_durable = true;
                inner.segments.insert(id, seg);
                report.revived_segments += 1;
            }
        }
        report
    }

    /// Makes the next `sync` fail with EIO (and leave its writes unsynced).
    pub fn fail_next_sync(&self) {
        self.inner().fail_next_sync = true;
    }

    /// While on, every `sync` fails with EIO. Turning it off also disarms [`Self::fail_next_sync`].
    pub fn set_fail_syncs(&self, on: bool) {
        let mut inner = self.inner();
        inner.fail_syncs = on;
        if !on {
            inner.fail_next_sync = false;
        }
    }

    /// Limits the total size of all segments; `create`, `allocate` and growing writes beyond it
    /// fail with ENOSPC. `None` removes the limit.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.inner().capacity = bytes;
    }

    /// Total size of all segments, preallocated space included.
    pub fn used_bytes(&self) -> u64 {
        self.inner().used()
    }

    /// Counters since creation (not reset by a crash).
    pub fn stats(&self) -> MemStats {
        self.inner().stats
    }
}

impl Storage for MemStorage {
    fn list(&self) -> io::Result<Vec<SegmentId>> {
        Ok(self.inner().segments.keys().copied().collect())
    }

    fn create(&self, id: SegmentId, prealloc_bytes: u64) -> io::Result<()> {
        let mut inner = self.inner();
        if inner.segments.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("segment {id} already exists"),
            ));
        }
        inner.reserve(prealloc_bytes)?;
        inner.removed.remove(&id);
        // Like FsStorage::create, the allocation itself is synced; only the name is not durable.
        let image = Image {
            data: Vec::new(),
            len: prealloc_bytes,
        };
        inner.segments.insert(
            id,
            MemSegment {
                durable: image.clone(),
                current: image,
                pending: Vec::new(),
                dir_durable: false,
            },
        );
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut inner = self.inner();
        let cur_len = inner
            .segments
            .get(&id)
            .ok_or_else(|| not_found(id))?
            .current
            .len;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > cur_len {
            inner.reserve(end - cur_len)?;
        }
        inner.stats.writes += 1;
        inner.stats.bytes_written += data.len() as u64;
        let seg = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        seg.current.write(offset, data);
        seg.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        let mut inner = self.inner();
        inner.stats.syncs += 1;
        if !inner.segments.contains_key(&id) {
            return Err(not_found(id));
        }
        if inner.fail_next_sync || inner.fail_syncs {
            inner.fail_next_sync = false;
            inner.stats.failed_syncs += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let seg = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        for p in std::mem::take(&mut seg.pending) {
            match p {
                Pending::Write { offset, data } => seg.durable.write(offset, &data),
                Pending::SetLen(len) => seg.durable.set_len(len),
            }
        }
        Ok(())
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let inner = self.inner();
        let seg = inner.segments.get(&id).ok_or_else(|| not_found(id))?;
        Ok(seg.current.read(offset, buf))
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        let inner = self.inner();
        Ok(inner
            .segments
            .get(&id)
            .ok_or_else(|| not_found(id))?
            .current
            .len)
    }

    fn allocate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        let mut inner = self.inner();
        let cur = inner
            .segments
            .get(&id)
            .ok_or_else(|| not_found(id))?
            .current
            .len;
        if cur >= len {
            return Ok(());
        }
        inner.reserve(len - cur)?;
        let seg = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        seg.current.set_len(len);
        seg.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn truncate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        let mut inner = self.inner();
        let cur = inner
            .segments
            .get(&id)
            .ok_or_else(|| not_found(id))?
            .current
            .len;
        if len > cur {
            inner.reserve(len - cur)?;
        }
        let seg = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        seg.current.set_len(len);
        seg.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn remove(&self, id: SegmentId) -> io::Result<()> {
        let mut inner = self.inner();
        let seg = inner.segments.remove(&id).ok_or_else(|| not_found(id))?;
        if seg.dir_durable {
            inner.removed.insert(id, seg);
        }
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut inner = self.inner();
        inner.stats.dir_syncs += 1;
        inner.removed.clear();
        for seg in inner.segments.values_mut() {
            seg.dir_durable = true;
        }
        Ok(())
    }

    fn put_hint(&self, id: SegmentId, bytes: &[u8]) -> io::Result<()> {
        self.inner().hints.put(id, bytes)
    }

    fn get_hint(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>> {
        self.inner().hints.get(id)
    }

    fn remove_hint(&self, id: SegmentId) -> io::Result<()> {
        self.inner().hints.remove(id)
    }

    fn zero_ahead_bytes(&self) -> u64 {
        self.inner().zero_ahead
    }

    fn syncs_in_microseconds(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// VolatileStorage
// ---------------------------------------------------------------------------------------------

/// In-memory storage with no durability and no fault model: for a store that must not touch the
/// disk (development, embedded caches, the in-memory benchmarks). A crash loses everything, so
/// never use it where acknowledged data must survive; [`MemStorage`] is the one that models
/// crashes.
#[derive(Debug, Clone, Default)]
pub struct VolatileStorage {
    inner: Arc<Mutex<VolatileInner>>,
}

#[derive(Debug, Default)]
struct VolatileInner {
    /// Written bytes, and the segment's size (zeroes past the written bytes are implicit).
    segments: BTreeMap<SegmentId, (Vec<u8>, u64)>,
    hints: MemHints,
}

impl VolatileStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, VolatileInner> {
        lock(&self.inner)
    }
}

/// Asks the kernel to back `buf`'s spare capacity with transparent huge pages (a hint; the
/// kernel may ignore it): a segment is filled front to back, and a 2 MiB fault instead of 512
/// small ones takes most of the page-fault cost out of copying frames in.
fn advise_huge_pages(buf: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let spare = buf.spare_capacity_mut();
        let addr = spare.as_mut_ptr() as usize;
        let start = addr.next_multiple_of(PAGE);
        let end = (addr + spare.len()) & !(PAGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside memory this Vec owns (its spare capacity);
            // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
            };
            // A hint: a kernel without transparent huge pages refuses it, and that is fine.
            let _ = rc;
        }
    }
}

impl Storage for VolatileStorage {
    fn list(&self) -> io::Result<Vec<SegmentId>> {
        Ok(self.inner().segments.keys().copied().collect())
    }

    fn create(&self, id: SegmentId, prealloc_bytes: u64) -> io::Result<()> {
        let mut inner = self.inner();
        if inner.segments.contains_key(&id) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("segment {id} exists"),
            ));
        }
        inner.segments.insert(id, (Vec::new(), prealloc_bytes));
        Ok(())
    }

    fn write_at(&self, id: SegmentId, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut inner = self.inner();
        let (seg, size) = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        let start = offset as usize;
        let end = start + data.len();
        if seg.capacity() < end {
            // Reserve the whole preallocated size at once: the pages are only touched as
            // frames land, and the segment is never copied by a growing reallocation.
            let want = end.max(usize::try_from(*size).unwrap_or(end));
            seg.reserve_exact(want - seg.len());
            advise_huge_pages(seg);
        }
        if seg.len() < start {
            seg.resize(start, 0);
        }
        // Overwrite what is there, append the rest (no zero-fill of bytes about to be written).
        let overlap = seg.len().min(end) - start.min(seg.len());
        let (old, new) = data.split_at(overlap);
        seg[start..start + overlap].copy_from_slice(old);
        seg.extend_from_slice(new);
        *size = (*size).max(end as u64);
        Ok(())
    }

    fn sync(&self, id: SegmentId) -> io::Result<()> {
        if self.inner().segments.contains_key(&id) {
            Ok(())
        } else {
            Err(not_found(id))
        }
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let inner = self.inner();
        let (seg, size) = inner.segments.get(&id).ok_or_else(|| not_found(id))?;
        let end = offset.saturating_add(buf.len() as u64).min(*size);
        let n = end.saturating_sub(offset) as usize;
        let start = offset as usize;
        let have = seg.len().saturating_sub(start).min(n);
        if have > 0 {
            buf[..have].copy_from_slice(&seg[start..start + have]);
        }
        buf[have..n].fill(0);
        Ok(n)
    }

    fn size(&self, id: SegmentId) -> io::Result<u64> {
        let inner = self.inner();
        inner
            .segments
            .get(&id)
            .map(|(_, size)| *size)
            .ok_or_else(|| not_found(id))
    }

    fn allocate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        let mut inner = self.inner();
        let (_, size) = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        *size = (*size).max(len);
        Ok(())
    }

    fn truncate(&self, id: SegmentId, len: u64) -> io::Result<()> {
        let mut inner = self.inner();
        let (seg, size) = inner.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        seg.truncate(len as usize);
        *size = len;
        Ok(())
    }

    fn remove(&self, id: SegmentId) -> io::Result<()> {
        self.inner()
            .segments
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| not_found(id))
    }

    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }

    fn put_hint(&self, id: SegmentId, bytes: &[u8]) -> io::Result<()> {
        self.inner().hints.put(id, bytes)
    }

    fn get_hint(&self, id: SegmentId) -> io::Result<Option<Vec<u8>>> {
        self.inner().hints.get(id)
    }

    fn remove_hint(&self, id: SegmentId) -> io::Result<()> {
        self.inner().hints.remove(id)
    }

    fn syncs_in_microseconds(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn Storage) {
        assert!(s.list().unwrap().is_empty());
        s.create(2, 4096).unwrap();
        s.create(1, 0).unwrap();
        s.sync_dir().unwrap();
        assert_eq!(s.list().unwrap(), vec![1, 2]);
        assert_eq!(s.size(2).unwrap(), 4096);
        s.write_at(2, 10, b"hello").unwrap();
        s.sync(2).unwrap();
        let mut buf = [9u8; 8];
        assert_eq!(s.read_at(2, 8, &mut buf).unwrap(), 8);
        assert_eq!(&buf, b"\0\0hello\0");
        assert_eq!(s.read_at(2, 4094, &mut buf).unwrap(), 2);
        s.write_at(1, 0, b"abc").unwrap();
        assert_eq!(s.size(1).unwrap(), 3);
        s.truncate(2, 12).unwrap();
        s.allocate(2, 100).unwrap();
        assert_eq!(s.size(2).unwrap(), 100);
        let mut buf = [9u8; 6];
        assert_eq!(s.read_at(2, 10, &mut buf).unwrap(), 6);
        assert_eq!(&buf, b"he\0\0\0\0");
        s.remove(1).unwrap();
        s.sync_dir().unwrap();
        assert_eq!(s.list().unwrap(), vec![2]);
        assert!(s.create(2, 0).is_err());
        assert_eq!(
            s.read_at(7, 0, &mut buf).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn fs_storage_basics() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::open(dir.path()).unwrap();
        exercise(&s);
        // Unknown files are ignored, malformed segment names are errors naming the file.
        fs::write(dir.path().join("README"), b"x").unwrap();
        assert_eq!(s.list().unwrap(), vec![2]);
        fs::write(dir.path().join("zz.seg"), b"x").unwrap();
        let err = s.list().unwrap_err();
        assert!(err.to_string().contains("zz.seg"), "{err}");
    }

    #[test]
    fn a_directory_serves_one_storage_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = FsStorage::open(dir.path()).unwrap();
        let err = FsStorage::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        drop(first);
        FsStorage::open(dir.path()).expect("free again once the first is gone");
    }

    #[test]
    fn mem_storage_basics() {
        exercise(&MemStorage::new());
    }

    #[test]
    fn mem_crash_keeps_synced_and_may_drop_unsynced() {
        let mut lost = 0;
        let mut torn = 0;
        for seed in 0..64 {
            let s = MemStorage::new();
            s.create(1, 64).unwrap();
            s.sync_dir().unwrap();
            s.write_at(1, 0, b"durable!").unwrap();
            s.sync(1).unwrap();
            s.write_at(1, 8, b"volatile").unwrap();
            s.create(2, 64).unwrap();
            let r = s.crash(seed);
            torn += r.torn_writes;
            let mut buf = [0u8; 16];
            assert_eq!(s.read_at(1, 0, &mut buf).unwrap(), 16);
            assert_eq!(&buf[..8], b"durable!");
            if &buf[8..] != b"volatile" {
                lost += 1;
            }
            assert_eq!(s.list().unwrap().len() as u64, 2 - r.vanished_segments);
            // Determinism: same seed, same outcome.
            let again = MemStorage::new();
            again.create(1, 64).unwrap();
            again.sync_dir().unwrap();
            again.write_at(1, 0, b"durable!").unwrap();
            again.sync(1).unwrap();
            again.write_at(1, 8, b"volatile").unwrap();
            again.create(2, 64).unwrap();
            assert_eq!(again.crash(seed), r);
        }
        assert!(lost > 0 && lost < 64, "lost {lost}");
        assert!(torn > 0);
    }

    #[test]
    fn mem_capacity_and_sync_failures() {
        let s = MemStorage::new();
        s.set_capacity(Some(100));
        s.create(1, 80).unwrap();
        assert!(is_no_space(&s.create(2, 30).unwrap_err()));
        assert!(is_no_space(&s.write_at(1, 120, b"x").unwrap_err()));
        s.write_at(1, 79, b"y").unwrap();
        s.fail_next_sync();
        assert_eq!(s.sync(1).unwrap_err().raw_os_error(), Some(libc::EIO));
        s.sync(1).unwrap();
        assert_eq!(s.stats().syncs, 2);
        assert_eq!(s.stats().failed_syncs, 1);
    }
}
