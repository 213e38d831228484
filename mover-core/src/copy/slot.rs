//! One slot of a copy: take the next work item, read it, scan it for zeros, then write it or
//! send it as zero commands.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::checkpoint::DoneSet;
use crate::endpoint::Endpoint;
use crate::error::{MoverError, Result};
use crate::manifest::ManifestBuilder;
use crate::plan::{self, Plan, WorkItem};
use crate::progress::{CancelToken, Progress};

use super::is_zero;

/// State every slot of one copy shares; only atomics on the hot path.
pub(super) struct Shared {
    pub(super) plan: Plan,
    pub(super) next: AtomicUsize,
    pub(super) done: DoneSet,
    pub(super) progress: Arc<Progress>,
    pub(super) cancel: Arc<CancelToken>,
    pub(super) stop: AtomicBool,
    pub(super) error: Mutex<Option<MoverError>>,
    pub(super) manifest: Option<Arc<ManifestBuilder>>,
    /// Every flush of the target so far reached stable storage.
    pub(super) durable: AtomicBool,
    /// What the target read as zeros before the copy began: no zero command goes there.
    pub(super) known_zeros: ZeroMap,
    /// Set when the target is flushed as the copy goes.
    pub(super) flush_ahead: Option<FlushAhead>,
}

impl Shared {
    pub(super) fn fail(&self, err: MoverError) {
        let mut slot = self.error.lock().expect("error slot");
        if slot.is_none() {
            *slot = Some(err);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.cancel.is_cancelled()
    }
}

pub(super) async fn run_slot(
    shared: Arc<Shared>,
    src: Arc<dyn Endpoint>,
    dst: Arc<dyn Endpoint>,
    request_size: usize,
) {
    let mut buf: Vec<u8> = Vec::new();
    while !shared.stopped() {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(&item) = shared.plan.items.get(i) else {
            break;
        };
        if shared.done.contains(i) {
            continue;
        }
        if buf.capacity() == 0 {
            buf = vec![0u8; request_size];
        }
        match copy_item(&shared, &*src, &*dst, item, buf).await {
            Ok(b) => {
                buf = b;
                shared.done.mark(i);
                Progress::add(&shared.progress.extents_done, 1);
                if let Some(f) = &shared.flush_ahead {
                    f.written(shared.progress.bytes_written.load(Ordering::Relaxed));
                }
            }
            Err(e) => {
                shared.fail(e);
                break;
            }
        }
    }
}

async fn copy_item(
    shared: &Shared,
    src: &dyn Endpoint,
    dst: &dyn Endpoint,
    item: WorkItem,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>> {
    let (progress, manifest) = (&*shared.progress, shared.manifest.as_deref());
    let WorkItem {
        offset,
        length,
        zero,
    } = item;
    if zero {
        zero_range(shared, dst, offset, length, manifest).await?;
        return Ok(buf);
    }
    buf.resize(length as usize, 0);
    let buf = src
        .read(offset, buf)
        .await
        .map_err(|e| e.on_source(offset, length))?;
    Progress::add(&progress.bytes_read, length);
    if is_zero(&buf) {
        zero_range(shared, dst, offset, length, manifest).await?;
        return Ok(buf);
    }
    let runs = zero_runs(offset, &buf);
    let buf = if runs.is_empty() {
        let buf = dst
            .write(offset, buf)
            .await
            .map_err(|e| e.on_target(offset, length))?;
        Progress::add(&progress.bytes_written, length);
        buf
    } else {
        write_around_zeros(shared, dst, offset, buf, &runs).await?
    };
    if let Some(m) = manifest {
        // The target now holds exactly `buf` here, zero runs included.
        m.record(offset, &buf);
    }
    Ok(buf)
}

/// Granularity of the zero scan inside a data request (nbdcopy's default `--sparse` size):
/// all-zero blocks of this size, aligned on the disk, go out as zero commands, so a zero
/// cluster of a QCOW2 target or a zero block of a raw file never becomes data, whatever the
/// request size.
const ZERO_BLOCK: u64 = 4096;

/// The runs of all-zero `ZERO_BLOCK`s (aligned on the disk, not on the buffer) in `buf`, read
/// at `offset`, as `(start, end)` within `buf`. Empty when there is none.
pub(super) fn zero_runs(offset: u64, buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut start = 0usize;
    while start < buf.len() {
        let block_end = ((offset + start as u64) / ZERO_BLOCK + 1) * ZERO_BLOCK - offset;
        let end = usize::try_from(block_end).map_or(buf.len(), |e| e.min(buf.len()));
        // Only whole blocks: a piece at an unaligned edge is written as data.
        let whole = end - start == ZERO_BLOCK as usize;
        if whole && is_zero(&buf[start..end]) {
            match runs.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => runs.push((start, end)),
            }
        }
        start = end;
    }
    runs
}

/// Write `buf` (read at `offset`) as data, except for `runs`, which become zero commands.
async fn write_around_zeros(
    shared: &Shared,
    dst: &dyn Endpoint,
    offset: u64,
    buf: Vec<u8>,
    runs: &[(usize, usize)],
) -> Result<Vec<u8>> {
    let mut scratch: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let mut pieces: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len() * 2 + 1);
    for &(s, e) in runs {
        if s > pos {
            pieces.push((pos, s, false));
        }
        pieces.push((s, e, true));
        pos = e;
    }
    if pos < buf.len() {
        pieces.push((pos, buf.len(), false));
    }
    for (s, e, zero) in pieces {
        let (at, len) = (offset + s as u64, (e - s) as u64);
        if zero {
            zero_range(shared, dst, at, len, None).await?;
        } else {
            scratch.clear();
            scratch.extend_from_slice(&buf[s..e]);
            scratch = dst
                .write(at, scratch)
                .await
                .map_err(|err| err.on_target(at, len))?;
            Progress::add(&shared.progress.bytes_written, len);
        }
    }
    Ok(buf)
}

/// Make a range known (from the allocation map) or found (scanned) to be zeros on the source
/// read as zeros on the target: one zero command, except where the target already did.
async fn zero_range(
    shared: &Shared,
    dst: &dyn Endpoint,
    offset: u64,
    length: u64,
    manifest: Option<&ManifestBuilder>,
) -> Result<()> {
    for (at, len) in shared.known_zeros.gaps(offset, length) {
        dst.write_zeroes(at, len)
            .await
            .map_err(|e| e.on_target(at, len))?;
    }
    if let Some(m) = manifest {
        m.record_zero(offset, length);
    }
    Progress::add(&shared.progress.bytes_zeroed, length);
    Ok(())
}

/// The ranges of a target that read as zeros, asked once before the copy writes anything, as
/// sorted, disjoint `(start, end)` runs. Nothing else writes the target while the engine copies
/// into it, and no work item overlaps another, so a range in the map still reads as zeros when
/// the item that covers it comes: its zero command would change nothing.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ZeroMap(pub(super) Vec<(u64, u64)>);

/// Most zero runs a [`ZeroMap`] keeps (16 MiB): a target fragmented beyond that is known as far
/// as they reach, and zeroed by command past it, as if nothing were known.
pub(super) const MAX_ZERO_RUNS: usize = 1 << 20;

impl ZeroMap {
    /// The zero runs of `target`'s allocation map, at most `limit` of them (the engine asks for
    /// [`MAX_ZERO_RUNS`]).
    pub(super) async fn of(target: &dyn Endpoint, limit: usize) -> Result<Self> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        plan::visit_allocation(target, |e| {
            if e.zero {
                match runs.last_mut() {
                    Some(last) if last.1 == e.offset => last.1 = e.end(),
                    _ => runs.push((e.offset, e.end())),
                }
            }
            runs.len() < limit
        })
        .await?;
        Ok(Self(runs))
    }

    /// The parts of `[offset, offset + length)` not known to read as zeros, as
    /// `(offset, length)`, in order.
    pub(super) fn gaps(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        let first = self.0.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &self.0[first..] {
            if s >= end || pos >= end {
                break;
            }
            if s > pos {
                out.push((pos, s - pos));
            }
            pos = pos.max(e);
        }
        if pos < end {
            out.push((pos, end - pos));
        }
        out
    }
}

/// When the next flush of a target flushed as the copy goes is due
/// ([`CopyOptions::flush_ahead`](super::CopyOptions::flush_ahead)), and the signal to the task
/// that sends it.
pub(super) struct FlushAhead {
    every: u64,
    /// `bytes_written` at which the next flush is due.
    due: AtomicU64,
    wanted: Notify,
    done: AtomicBool,
}

impl FlushAhead {
    pub(super) fn new(every: u64) -> Self {
        Self {
            every,
            due: AtomicU64::new(every),
            wanted: Notify::new(),
            done: AtomicBool::new(false),
        }
    }

    /// A slot finished an item; `written` bytes are written so far.
    fn written(&self, written: u64) {
        if written >= self.due.load(Ordering::Relaxed) {
            self.due.store(written + self.every, Ordering::Relaxed);
            // Stored as a permit if the flusher is busy: at most one flush follows.
            self.wanted.notify_one();
        }
    }

    /// The slots are done: the flusher stops (the final flush is the engine's).
    pub(super) fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.wanted.notify_one();
    }
}

/// Flush `target` whenever [`FlushAhead`] says, one flush at a time, until the slots are done.
/// A failed flush fails the copy, as the final one would.
pub(super) async fn flush_ahead(shared: Arc<Shared>, target: Arc<dyn Endpoint>) {
    let Some(f) = &shared.flush_ahead else {
        return;
    };
    loop {
        f.wanted.notified().await;
        if f.done.load(Ordering::SeqCst) || shared.stopped() {
            return;
        }
        if let Err(e) = target.flush().await {
            shared.fail(e.on_target(0, 0));
            return;
        }
    }
}
