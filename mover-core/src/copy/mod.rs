//! The copy engine.
//!
//! A copy is `connections × requests` slots, no more than its buffer budget allows
//! ([`CopyOptions::buffer_budget`]). Each slot owns one request buffer and the endpoint handles
//! of its connection, and loops: take the next work item (one shared atomic index), read it,
//! scan it for zeros, then write it or send it as one zero command. Nothing on that path takes
//! a lock; memory is bounded by the budget whatever the disk's size. Items are taken in disk
//! order, so reads stay nearly sequential.
//!
//! # Inline manifests
//!
//! When the copy is given a [`ManifestBuilder`] (always for a QCOW2 image the mover creates, on
//! request for any other target), each slot feeds it what it wrote: a written buffer is digested
//! right after the write returns, on the slot's own thread, and a zero command takes the known
//! zero digest. The builder takes one short lock per chunk to store a digest; nothing else is
//! shared. Requests are cut on the request-size grid, so with the default 1 MiB requests and
//! 1 MiB chunks every data request covers whole chunks; a chunk only partly covered (an extent
//! edge, a smaller request size, a resumed range) is read back through the target after the
//! final flush. An overlay's builder starts from its parent's manifest, so unchanged chunks are
//! neither read nor digested again. [`run`] is the whole job: route and open both endpoints,
//! copy, flush, complete and save the manifest beside the image.
//!
//! When a checkpoint file is given, a background task periodically snapshots the done set,
//! flushes the target, and only then records the snapshot: a checkpoint never names a range that
//! is not on stable storage. A restarted copy with the same plan skips what it names. [`run`]
//! resumes into the QCOW2 image an interrupted copy created (reopened from the tables of its
//! last flush, [`Qcow2Writer::open_to_resume`](crate::qcow2::Qcow2Writer::open_to_resume)) when
//! the checkpoint exists; the chunks the checkpoint names are read back for the manifest, which
//! thus equals an uninterrupted copy's.
//!
//! # Zeros
//!
//! A request that reads as zeros is one zero command. A request holding data is scanned in
//! 4 KiB blocks aligned on the disk, and its runs of zero blocks are zero commands too, so a
//! zero cluster of the target never becomes data whatever the request size. No zero command
//! goes where the target already reads as zeros: a target whose allocation map is cheap
//! ([`Capabilities::cheap_extents`]) is asked for it before the copy writes anything.
//!
//! # Write-back
//!
//! A target whose completed writes wait in a cache that only a flush writes back
//! ([`Capabilities::flush_ahead`], an NBD server) is flushed every [`CopyOptions::flush_ahead`]
//! bytes written, one flush at a time, by a task beside the slots: its write-back overlaps the
//! copy, and the final flush, the one that decides success, finds little left to write.
//!
//! # Files
//!
//! This file holds the options and [`copy_reporting`], which plans, starts the slots and
//! drives them to the final flush; `slot` is what one slot does with a work item (read, scan,
//! write, zero) and the flush-ahead task; `job` is the whole `mover copy` job around it
//! ([`run`]: opening, creating a QCOW2 target, the manifest).
//!
//! [`Capabilities::cheap_extents`]: crate::endpoint::Capabilities::cheap_extents
//! [`Capabilities::flush_ahead`]: crate::endpoint::Capabilities::flush_ahead

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::checkpoint::{self, CheckpointKey, DoneSet};
use crate::endpoint::Endpoint;
use crate::error::{MoverError, Result};
use crate::manifest::{ManifestBuilder, DEFAULT_CHUNK_SIZE};
use crate::plan::{self, Plan, PlanKind};
use crate::progress::{CancelToken, Progress, ProgressSnapshot};

mod job;
mod slot;
#[cfg(test)]
mod tests;

pub(crate) use job::complete_manifest;
pub use job::{run, CopyOutcome, ManifestReport};
use slot::{flush_ahead, run_slot, FlushAhead, Shared, ZeroMap, MAX_ZERO_RUNS};

/// The default [`CopyOptions::buffer_budget`]. On the reference disk, NBD to NBD through
/// `qemu-nbd`, 16 or 32 slots of 1 MiB copied as fast as 64, with less CPU; 64 slots cost
/// 79 MiB of peak RSS for the whole `mover copy` process, 32 cost 47 MiB.
pub const BUFFER_BUDGET: usize = 32 << 20;

/// The default [`CopyOptions::flush_ahead`]. On the reference disk through
/// `qemu-nbd --cache=writeback`, 32 to 128 MiB hid most of the final flush (0.2 s for 512 MiB
/// on this machine's disk) behind the copy; 256 MiB hid less of it.
pub const FLUSH_AHEAD: u64 = 64 << 20;

/// EPERM, the NBD error code for writes to a read-only export.
const EPERM: u32 = 1;

#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Connections per endpoint, used only where the endpoint allows several (multi-conn).
    pub connections: usize,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Bytes per request; a power of two.
    pub request_size: usize,
    /// Where to record progress for a resumable copy.
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_interval: Duration,
    /// The target already reads as zeros (a new image): zero runs of the source need no
    /// command at all.
    pub target_is_zero: bool,
    /// How long in-flight requests may take to drain after cancellation before they are
    /// abandoned.
    pub cancel_grace: Duration,
    /// Write a manifest for this target here ([`run`] always writes one beside a QCOW2 image
    /// it creates; this asks for one for any other target too).
    pub manifest: Option<PathBuf>,
    /// Chunk size of the manifest.
    pub manifest_chunk_size: u64,
    /// Write no manifest, not even beside a new QCOW2 image (scratch conversions, and the
    /// benchmark that measures what the inline digests cost).
    pub skip_manifest: bool,
    /// Most bytes of request buffers the copy holds: no more slots than
    /// `buffer_budget / request_size` (but at least one per connection), whatever
    /// `connections × requests` asks.
    pub buffer_budget: usize,
    /// Bytes written between two flushes of a target whose completed writes wait in a cache
    /// that only a flush writes back ([`Capabilities::flush_ahead`]): the write-back then
    /// overlaps the copy instead of all coming at the final flush. 0 flushes only at the end.
    ///
    /// [`Capabilities::flush_ahead`]: crate::endpoint::Capabilities::flush_ahead
    pub flush_ahead: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            requests: 16,
            request_size: 1 << 20,
            checkpoint: None,
            checkpoint_interval: Duration::from_secs(5),
            target_is_zero: false,
            cancel_grace: Duration::from_secs(30),
            manifest: None,
            manifest_chunk_size: DEFAULT_CHUNK_SIZE,
            skip_manifest: false,
            buffer_budget: BUFFER_BUDGET,
            flush_ahead: FLUSH_AHEAD,
        }
    }
}

impl CopyOptions {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(MoverError::InvalidPlan(m));
        if !(1..=64).contains(&self.connections) {
            return bad(format!(
                "connections must be 1 to 64, not {}",
                self.connections
            ));
        }
        if !(1..=1024).contains(&self.requests) {
            return bad(format!("requests must be 1 to 1024, not {}", self.requests));
        }
        if !self.request_size.is_power_of_two() || !(4096..=32 << 20).contains(&self.request_size) {
            return bad(format!(
                "request size must be a power of two from 4 KiB to 32 MiB, not {}",
                self.request_size
            ));
        }
        Ok(())
    }
}

/// The process-wide runtime every blocking entry point runs its copy on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("mover")
            .enable_all()
            .build()
            .expect("the mover runtime starts")
    })
}

/// True when every byte of `buf` is zero. Word-wise, stopping at the first non-zero block.
#[must_use]
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(32)
            .all(|c| c.iter().fold(0, |acc, w| acc | w) == 0)
}

/// Flush the target, then record what was done before the flush began.
async fn record(
    path: &std::path::Path,
    key: &CheckpointKey,
    shared: &Shared,
    dst: &dyn Endpoint,
) -> Result<()> {
    let words = shared.done.snapshot();
    if !dst.flush_durable().await? {
        shared.durable.store(false, Ordering::SeqCst);
    }
    let (path, key) = (path.to_owned(), key.clone());
    tokio::task::spawn_blocking(move || checkpoint::save(&path, &key, &words))
        .await
        .map_err(|e| MoverError::io("checkpoint writer", std::io::Error::other(e)))?
}

/// Check the endpoints against each other, build the plan and ask the target which ranges
/// already read as zeros (both at once, each on its own endpoint); nothing is written yet.
async fn prepare(
    source: &dyn Endpoint,
    target: &dyn Endpoint,
    kind: &PlanKind,
    opts: &CopyOptions,
) -> Result<(Plan, usize, ZeroMap)> {
    opts.check()?;
    let (src_caps, dst_caps) = (source.capabilities(), target.capabilities());
    if dst_caps.read_only {
        return Err(MoverError::target_write(
            0,
            0,
            Some(EPERM),
            format!("{} is read-only", target.name()),
        ));
    }
    if dst_caps.size < src_caps.size {
        return Err(MoverError::InvalidPlan(format!(
            "target {} ({} bytes) is smaller than source {} ({} bytes)",
            target.name(),
            dst_caps.size,
            source.name(),
            src_caps.size
        )));
    }
    let limit = src_caps.max_request.min(dst_caps.max_request);
    let request_size = opts
        .request_size
        .min(usize::try_from(limit).unwrap_or(usize::MAX))
        .max(4096);
    // A target known to be zero gets no zero command at all; an explicit plan (the changed
    // areas of an incremental pass) writes where the target already holds data.
    let ask_zeros =
        dst_caps.cheap_extents && !opts.target_is_zero && !matches!(kind, PlanKind::Explicit(_));
    let known_zeros = async {
        if ask_zeros {
            ZeroMap::of(target, MAX_ZERO_RUNS).await
        } else {
            Ok(ZeroMap::default())
        }
    };
    let (plan, known_zeros) = tokio::try_join!(
        plan::build(source, kind, request_size as u64, opts.target_is_zero),
        known_zeros
    )?;
    Ok((plan, request_size, known_zeros))
}

/// As many slots as asked, but no more than the plan has items, either end can use, or the
/// buffer budget holds (at least one per connection).
fn slot_count(
    opts: &CopyOptions,
    request_size: usize,
    items: usize,
    source: &dyn Endpoint,
    target: &dyn Endpoint,
) -> usize {
    (opts.connections * opts.requests)
        .min((opts.buffer_budget / request_size).max(opts.connections))
        .min(items)
        .min(source.capabilities().max_in_flight)
        .min(target.capabilities().max_in_flight)
}

/// The source and target handles of one connection.
type Pair = (Arc<dyn Endpoint>, Arc<dyn Endpoint>);

/// One handle pair per connection; an endpoint without multi-conn shares its one handle. The
/// further connections are dialled all at once: each costs a handshake of several round trips.
async fn connect_pairs(
    source: &Arc<dyn Endpoint>,
    target: &Arc<dyn Endpoint>,
    connections: usize,
) -> Result<Vec<Pair>> {
    let another = |end: &Arc<dyn Endpoint>| {
        let end = Arc::clone(end);
        async move {
            if end.capabilities().multi_conn {
                end.another().await
            } else {
                Ok(end)
            }
        }
    };
    let mut dialling = JoinSet::new();
    for i in 1..connections {
        let (s, d) = (another(source), another(target));
        dialling.spawn(async move { (i, tokio::try_join!(s, d)) });
    }
    let mut pairs = vec![(Arc::clone(source), Arc::clone(target))];
    let mut dialled = Vec::with_capacity(connections);
    let mut failure = None;
    while let Some(joined) = dialling.join_next().await {
        match joined {
            Ok((i, Ok(pair))) => dialled.push((i, pair)),
            Ok((_, Err(e))) => failure = failure.or(Some(e)),
            Err(e) => {
                let e = MoverError::io("connection dialler", std::io::Error::other(e));
                failure = failure.or(Some(e));
            }
        }
    }
    dialled.sort_by_key(|(i, _)| *i);
    pairs.extend(dialled.into_iter().map(|(_, pair)| pair));
    match failure {
        None => Ok(pairs),
        Some(e) => {
            close_pairs(&pairs, source, target).await;
            Err(e)
        }
    }
}

/// Close the connections `connect_pairs` dialled (not `source` and `target` themselves).
async fn close_pairs(pairs: &[Pair], source: &Arc<dyn Endpoint>, target: &Arc<dyn Endpoint>) {
    for (s, d) in pairs.iter().skip(1) {
        if !Arc::ptr_eq(s, source) {
            let _ = s.close().await;
        }
        if !Arc::ptr_eq(d, target) {
            let _ = d.close().await;
        }
    }
}

/// Wait for every slot, recording checkpoints on the way; abandon the slots only when a
/// cancellation's grace period has run out.
async fn drive(
    mut slots: JoinSet<()>,
    shared: &Shared,
    opts: &CopyOptions,
    key: &CheckpointKey,
    target: &dyn Endpoint,
) {
    let mut ticker = tokio::time::interval(opts.checkpoint_interval);
    ticker.tick().await;
    let cancelled_then_grace = async {
        shared.cancel.cancelled().await;
        tokio::time::sleep(opts.cancel_grace).await;
    };
    tokio::pin!(cancelled_then_grace);
    loop {
        tokio::select! {
            joined = slots.join_next() => match joined {
                None => break,
                Some(Err(e)) => shared.fail(MoverError::io("copy worker", std::io::Error::other(e))),
                Some(Ok(())) => {}
            },
            _ = ticker.tick(), if opts.checkpoint.is_some() => {
                let path = opts.checkpoint.as_deref().expect("checked by the guard");
                if let Err(e) = record(path, key, shared, target).await {
                    shared.fail(e);
                }
            }
            () = &mut cancelled_then_grace => {
                slots.abort_all();
                break;
            }
        }
    }
}

/// Copy `source` into `target` according to `kind`.
///
/// Returns the final progress; on failure or cancellation the checkpoint (if any) records what
/// was done, and the error names the range that failed.
pub async fn copy(
    source: Arc<dyn Endpoint>,
    target: Arc<dyn Endpoint>,
    kind: &PlanKind,
    opts: &CopyOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
) -> Result<ProgressSnapshot> {
    copy_reporting(source, target, kind, opts, progress, cancel, None)
        .await
        .map(|c| c.progress)
}

/// What [`copy_reporting`] did.
#[derive(Clone, Debug)]
pub struct Copied {
    pub progress: ProgressSnapshot,
    /// Every flush of the target reached stable storage (`fdatasync`, or an acknowledged
    /// `NBD_CMD_FLUSH`): false when the target cannot be made durable (an NBD server without
    /// flush), so what was written may still be lost with the server's cache.
    pub durable: bool,
}

/// [`copy`], feeding every write and zero command to `manifest` (ranges skipped because a
/// checkpoint names them are marked for reading back), and saying whether the target was made
/// durable.
pub async fn copy_reporting(
    source: Arc<dyn Endpoint>,
    target: Arc<dyn Endpoint>,
    kind: &PlanKind,
    opts: &CopyOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
    manifest: Option<Arc<ManifestBuilder>>,
) -> Result<Copied> {
    let (plan, request_size, known_zeros) = prepare(&*source, &*target, kind, opts).await?;
    let key = CheckpointKey {
        source: source.name().to_owned(),
        target: target.name().to_owned(),
        disk_size: plan.disk_size,
        items: plan.items.len(),
        plan: plan.fingerprint() ^ request_size as u64,
    };
    let done = match &opts.checkpoint {
        Some(path) => checkpoint::load(path, &key)?,
        None => DoneSet::new(plan.items.len()),
    };
    let resumed: u64 = (0..plan.items.len())
        .filter(|&i| done.contains(i))
        .map(|i| plan.items[i].length)
        .sum();
    if let Some(m) = &manifest {
        for (i, item) in plan.items.iter().enumerate() {
            if done.contains(i) {
                m.invalidate(item.offset, item.length);
            }
        }
    }
    progress
        .bytes_planned
        .store(plan.bytes(), Ordering::Relaxed);
    progress.bytes_resumed.store(resumed, Ordering::Relaxed);
    progress
        .extents_total
        .store(plan.items.len() as u64, Ordering::Relaxed);
    progress.start();

    let item_count = plan.items.len().max(1);
    let shared = Arc::new(Shared {
        plan,
        next: AtomicUsize::new(0),
        done,
        progress: Arc::clone(&progress),
        cancel: Arc::clone(&cancel),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        manifest,
        durable: AtomicBool::new(true),
        known_zeros,
        flush_ahead: (target.capabilities().flush_ahead && opts.flush_ahead > 0)
            .then(|| FlushAhead::new(opts.flush_ahead)),
    });
    let in_flight = slot_count(opts, request_size, item_count, &*source, &*target);
    let pairs = connect_pairs(&source, &target, opts.connections.min(in_flight)).await?;
    let flusher = tokio::spawn(flush_ahead(Arc::clone(&shared), Arc::clone(&target)));
    let mut slots = JoinSet::new();
    for i in 0..in_flight {
        let (s, d) = &pairs[i % pairs.len()];
        slots.spawn(run_slot(
            Arc::clone(&shared),
            Arc::clone(s),
            Arc::clone(d),
            request_size,
        ));
    }
    drive(slots, &shared, opts, &key, &*target).await;
    if let Some(f) = &shared.flush_ahead {
        f.finish();
    }
    if cancel.is_cancelled() {
        flusher.abort();
    }
    let _ = flusher.await;

    // Whatever happened, make what was written durable and say so in the checkpoint.
    let failure = shared.error.lock().expect("error slot").take();
    let outcome = match &opts.checkpoint {
        Some(path) => record(path, &key, &shared, &*target).await,
        None => target.flush_durable().await.map(|durable| {
            if !durable {
                shared.durable.store(false, Ordering::SeqCst);
            }
        }),
    };
    progress.finish();
    close_pairs(&pairs, &source, &target).await;
    if let Some(e) = failure {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(MoverError::Cancelled);
    }
    outcome.map_err(|e| e.on_target(0, 0))?;
    Ok(Copied {
        progress: progress.snapshot(),
        durable: shared.durable.load(Ordering::SeqCst),
    })
}
