//! The copy engine.
//!
//! A copy is `connections × requests` slots. Each slot owns one request buffer and the
//! endpoint handles of its connection, and loops: take the next work item (one shared atomic
//! index), read it, scan it for zeros, then write it or send it as one zero command. Nothing on
//! that path takes a lock; memory is bounded by `connections × requests × request_size` whatever
//! the disk's size. Items are taken in disk order, so reads stay nearly sequential.
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
//! last flush, [`Qcow2Writer::open_to_resume`]) when the checkpoint exists; the chunks the
//! checkpoint names are read back for the manifest, which thus equals an uninterrupted copy's.
//!
//! # Zeros
//!
//! A request that reads as zeros is one zero command. A request holding data is scanned in
//! 4 KiB blocks aligned on the disk, and its runs of zero blocks are zero commands too, so a
//! zero cluster of the target never becomes data whatever the request size.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::checkpoint::{self, CheckpointKey, DoneSet};
use crate::endpoint::{blocking, Access, Endpoint, Kind, OpenOptions};
use crate::error::{MoverError, Result};
use crate::manifest::{checksum_endpoint, Manifest, ManifestBuilder, DEFAULT_CHUNK_SIZE};
use crate::open::{kind_of, open, open_with};
use crate::plan::{self, Plan, PlanKind, WorkItem};
use crate::progress::{CancelToken, Progress, ProgressSnapshot};
use crate::qcow2::{Qcow2Target, Qcow2Writer};

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

/// State every slot of one copy shares; only atomics on the hot path.
struct Shared {
    plan: Plan,
    next: AtomicUsize,
    done: DoneSet,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
    stop: AtomicBool,
    error: Mutex<Option<MoverError>>,
    manifest: Option<Arc<ManifestBuilder>>,
    /// Every flush of the target so far reached stable storage.
    durable: AtomicBool,
}

impl Shared {
    fn fail(&self, err: MoverError) {
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

async fn run_slot(
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
        let manifest = shared.manifest.as_deref();
        match copy_item(&shared.progress, &*src, &*dst, item, buf, manifest).await {
            Ok(b) => {
                buf = b;
                shared.done.mark(i);
                Progress::add(&shared.progress.extents_done, 1);
            }
            Err(e) => {
                shared.fail(e);
                break;
            }
        }
    }
}

async fn copy_item(
    progress: &Progress,
    src: &dyn Endpoint,
    dst: &dyn Endpoint,
    item: WorkItem,
    mut buf: Vec<u8>,
    manifest: Option<&ManifestBuilder>,
) -> Result<Vec<u8>> {
    let WorkItem {
        offset,
        length,
        zero,
    } = item;
    if zero {
        zero_range(progress, dst, offset, length, manifest).await?;
        return Ok(buf);
    }
    buf.resize(length as usize, 0);
    let buf = src
        .read(offset, buf)
        .await
        .map_err(|e| e.on_source(offset, length))?;
    Progress::add(&progress.bytes_read, length);
    if is_zero(&buf) {
        zero_range(progress, dst, offset, length, manifest).await?;
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
        write_around_zeros(progress, dst, offset, buf, &runs).await?
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
fn zero_runs(offset: u64, buf: &[u8]) -> Vec<(usize, usize)> {
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
    progress: &Progress,
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
            zero_range(progress, dst, at, len, None).await?;
        } else {
            scratch.clear();
            scratch.extend_from_slice(&buf[s..e]);
            scratch = dst
                .write(at, scratch)
                .await
                .map_err(|err| err.on_target(at, len))?;
            Progress::add(&progress.bytes_written, len);
        }
    }
    Ok(buf)
}

/// One zero command for a range known (from the allocation map) or found (scanned) to be zeros.
async fn zero_range(
    progress: &Progress,
    dst: &dyn Endpoint,
    offset: u64,
    length: u64,
    manifest: Option<&ManifestBuilder>,
) -> Result<()> {
    dst.write_zeroes(offset, length)
        .await
        .map_err(|e| e.on_target(offset, length))?;
    if let Some(m) = manifest {
        m.record_zero(offset, length);
    }
    Progress::add(&progress.bytes_zeroed, length);
    Ok(())
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

/// Check the endpoints against each other and build the plan; nothing is written yet.
async fn prepare(
    source: &dyn Endpoint,
    target: &dyn Endpoint,
    kind: &PlanKind,
    opts: &CopyOptions,
) -> Result<(Plan, usize)> {
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
    let plan = plan::build(source, kind, request_size as u64, opts.target_is_zero).await?;
    Ok((plan, request_size))
}

/// One handle pair per connection; an endpoint without multi-conn shares its one handle.
async fn connect_pairs(
    source: &Arc<dyn Endpoint>,
    target: &Arc<dyn Endpoint>,
    connections: usize,
) -> Result<Vec<(Arc<dyn Endpoint>, Arc<dyn Endpoint>)>> {
    let mut pairs = vec![(Arc::clone(source), Arc::clone(target))];
    for _ in 1..connections {
        let s = if source.capabilities().multi_conn {
            source.another().await?
        } else {
            Arc::clone(source)
        };
        let d = if target.capabilities().multi_conn {
            target.another().await?
        } else {
            Arc::clone(target)
        };
        pairs.push((s, d));
    }
    Ok(pairs)
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
    let (plan, request_size) = prepare(&*source, &*target, kind, opts).await?;
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
    });
    // As many slots as asked, but no more than the plan has items or either end can use.
    let in_flight = (opts.connections * opts.requests)
        .min(item_count)
        .min(source.capabilities().max_in_flight)
        .min(target.capabilities().max_in_flight);
    let pairs = connect_pairs(&source, &target, opts.connections.min(in_flight)).await?;
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
    for (s, d) in pairs.iter().skip(1) {
        if !Arc::ptr_eq(s, &source) {
            let _ = s.close().await;
        }
        if !Arc::ptr_eq(d, &target) {
            let _ = d.close().await;
        }
    }
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

/// The manifest a copy wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestReport {
    pub path: PathBuf,
    pub disk_digest: String,
    pub chunks: u64,
    /// Chunks read back through the target because no request covered them whole.
    pub chunks_read_back: u64,
}

/// What [`run`] did.
#[derive(Clone, Debug)]
pub struct CopyOutcome {
    pub progress: ProgressSnapshot,
    pub manifest: Option<ManifestReport>,
    /// Every flush of the target reached stable storage; see [`Copied::durable`].
    pub durable: bool,
}

/// The manifest of the disk an overlay is created on: the one saved beside it (whose chunk size
/// the overlay's manifest keeps), or, when there is none, one computed by reading the backing
/// chain in `chunk_size` chunks.
async fn parent_manifest(
    backing: &Path,
    disk_size: u64,
    chunk_size: u64,
    cancel: &Arc<CancelToken>,
) -> Result<ManifestBuilder> {
    let saved = Manifest::path_for(backing);
    let parent = if saved.exists() {
        let p = saved.clone();
        tokio::task::spawn_blocking(move || Manifest::load(&p))
            .await
            .map_err(|e| MoverError::io("manifest reader", std::io::Error::other(e)))??
    } else {
        let spec = backing.display().to_string();
        let src = open(&spec, Access::Read).await?;
        checksum_endpoint(&src, chunk_size, &Arc::default(), cancel).await?
    };
    ManifestBuilder::from_parent(&parent, disk_size)
}

/// Read back the chunks no request covered whole, through the target (and its chain).
pub(crate) async fn complete_manifest(
    builder: &ManifestBuilder,
    target: &dyn Endpoint,
) -> Result<u64> {
    let stale = builder.stale_chunks();
    let mut buf = Vec::new();
    for &index in &stale {
        let (offset, length) = builder.chunk_range(index);
        buf.resize(length as usize, 0);
        buf = target
            .read(offset, buf)
            .await
            .map_err(|e| e.on_source(offset, length))?;
        builder.record(offset, &buf);
    }
    Ok(stale.len() as u64)
}

/// The whole copy job from two endpoint specifications: route and open them (a new QCOW2
/// target is created, as an overlay when `open.backing` is set), copy, flush, and write the
/// manifest beside a new QCOW2 image (or where `opts.manifest` says).
///
/// A new standalone QCOW2 image reads as zeros, so zero runs of the source are skipped
/// (`target_is_zero`); an overlay never is, since its unwritten clusters read the backing file.
pub async fn run(
    source: &str,
    target: &str,
    kind: &PlanKind,
    opts: &CopyOptions,
    open: &OpenOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
) -> Result<CopyOutcome> {
    let target_kind = kind_of(target, Access::Write { create_size: 0 })?;
    // Bad options are refused before anything is opened, let alone created.
    opts.check()?;
    // An existing QCOW2 image is written only to finish the copy its checkpoint describes.
    let resume_qcow2 =
        target_kind == Kind::Qcow2 && opts.checkpoint.as_deref().is_some_and(Path::exists);
    // A raw file that does not exist yet is created sparse: it reads as zeros.
    let new_raw = target_kind == Kind::Raw && !Path::new(target).exists();
    // A cancelled copy must not wait for a lost NBD server to come back.
    let open = &OpenOptions {
        cancel: Some(Arc::clone(&cancel)),
        ..open.clone()
    };
    let src_open = OpenOptions {
        backing: None,
        ..open.clone()
    };
    let src = open_with(source, Access::Read, &src_open).await?;
    let size = src.capabilities().size;
    // An explicit plan that does not fit the source is refused before the target is created.
    let opened = match plan::check(kind, size) {
        Err(e) => Err(e),
        Ok(()) if resume_qcow2 => reopen_qcow2(target, size, open).await,
        Ok(()) => open_with(target, Access::Write { create_size: size }, open).await,
    };
    let dst = match opened {
        Ok(d) => d,
        Err(e) => {
            let _ = src.close().await;
            return Err(e);
        }
    };
    let result = run_open(
        &src,
        &dst,
        target,
        target_kind == Kind::NewQcow2 || resume_qcow2,
        new_raw,
        kind,
        opts,
        open,
        progress,
        cancel,
    )
    .await;
    let _ = src.close().await;
    let closed = dst.close().await;
    let outcome = result?;
    closed.map_err(|e| e.on_target(0, 0))?;
    Ok(outcome)
}

/// Reopen the QCOW2 image an interrupted copy created, to finish that copy from its checkpoint.
/// The image must be what the same command would create: the same size and the same backing
/// file (`open.backing`).
async fn reopen_qcow2(target: &str, size: u64, open: &OpenOptions) -> Result<Arc<dyn Endpoint>> {
    let path = PathBuf::from(target);
    let backing = open.backing.clone();
    let spec = target.to_owned();
    let writer = blocking(move || {
        let writer = Qcow2Writer::open_to_resume(&path)?;
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        let matches = match (&backing, writer.backing()) {
            (None, None) => true,
            (Some(b), Some(chain)) => same(b, Path::new(chain.layer_path(0))),
            _ => false,
        };
        if !matches {
            return Err(MoverError::InvalidEndpoint {
                spec,
                reason: "its backing file is not the one --backing names; resume with the same \
                         command as the interrupted copy"
                    .into(),
            });
        }
        Ok(writer)
    })
    .await?;
    let want = size.div_ceil(512) * 512;
    if writer.size() != want {
        return Err(MoverError::InvalidPlan(format!(
            "{target} holds a {}-byte disk, the source {size} bytes: it is not the image this \
             copy was creating",
            writer.size()
        )));
    }
    Ok(Arc::new(Qcow2Target::from_writer(Arc::new(writer))))
}

#[allow(clippy::too_many_arguments)]
async fn run_open(
    src: &Arc<dyn Endpoint>,
    dst: &Arc<dyn Endpoint>,
    target: &str,
    own_qcow2: bool,
    new_raw: bool,
    kind: &PlanKind,
    opts: &CopyOptions,
    open: &OpenOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
) -> Result<CopyOutcome> {
    // A QCOW2 image this copy creates, or created before it was interrupted.
    let new_qcow2 = own_qcow2;
    let manifest_path = match (&opts.manifest, new_qcow2) {
        _ if opts.skip_manifest => None,
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(Manifest::path_for(Path::new(target))),
        (None, false) => None,
    };
    let disk_size = dst.capabilities().size;
    let chunk = opts.manifest_chunk_size;
    let builder = match (&manifest_path, &open.backing) {
        (None, _) => None,
        (Some(_), Some(backing)) => Some(Arc::new(
            parent_manifest(backing, disk_size, chunk, &cancel).await?,
        )),
        (Some(_), None) if new_qcow2 => Some(Arc::new(ManifestBuilder::new(disk_size, chunk)?)),
        // A raw file this copy creates reads as zeros.
        (Some(_), None) if new_raw => Some(Arc::new(ManifestBuilder::new(disk_size, chunk)?)),
        // An existing target of unknown contents: whatever the copy does not write is read back.
        (Some(_), None) => {
            let b = ManifestBuilder::new(disk_size, chunk)?;
            b.invalidate(0, disk_size);
            Some(Arc::new(b))
        }
    };
    let mut opts = opts.clone();
    if new_qcow2 {
        opts.target_is_zero = open.backing.is_none();
    }
    let Copied {
        progress: snapshot,
        durable,
    } = copy_reporting(
        Arc::clone(src),
        Arc::clone(dst),
        kind,
        &opts,
        progress,
        cancel,
        builder.clone(),
    )
    .await?;
    let (Some(path), Some(builder)) = (manifest_path, builder) else {
        return Ok(CopyOutcome {
            progress: snapshot,
            manifest: None,
            durable,
        });
    };
    let read_back = complete_manifest(&builder, &**dst).await?;
    // Streamed from the builder: a manifest of a large disk is never held in memory whole.
    let (b, p) = (Arc::clone(&builder), path.clone());
    let disk_digest = blocking(move || b.save(&p)).await?;
    Ok(CopyOutcome {
        progress: snapshot,
        manifest: Some(ManifestReport {
            path,
            disk_digest: blake3::Hash::from(disk_digest).to_hex().to_string(),
            chunks: builder.chunk_count(),
            chunks_read_back: read_back,
        }),
        durable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{file::FileEndpoint, Access};

    #[test]
    fn zero_scan() {
        let mut b = vec![0u8; 1 << 20];
        assert!(is_zero(&b));
        assert!(is_zero(&b[3..1001]));
        b[(1 << 20) - 1] = 1;
        assert!(!is_zero(&b));
        b[(1 << 20) - 1] = 0;
        b[1] = 1;
        assert!(!is_zero(&b[1..]));
        assert!(is_zero(&b[2..]));
    }

    #[test]
    fn zero_runs_are_whole_aligned_blocks() {
        let mut b = vec![0u8; 6 * 4096];
        b[100] = 1; // block 0 (unaligned start below) holds data
        b[3 * 4096 + 5] = 1; // block 3 holds data
                             // Read at an offset 512 bytes past a block boundary: the first and last pieces are
                             // partial blocks and are never zero runs.
        let runs = zero_runs(4096 + 512, &b);
        let aligned = |o: u64| usize::try_from(o - (4096 + 512)).unwrap();
        assert_eq!(
            runs,
            vec![
                (aligned(2 * 4096), aligned(4 * 4096)),
                (aligned(5 * 4096), aligned(7 * 4096)),
            ]
        );
        assert!(zero_runs(0, &[1u8; 8192]).is_empty());
    }

    async fn sparse_source(dir: &std::path::Path) -> (String, Vec<u8>) {
        let path = dir.join("src.raw").to_str().unwrap().to_owned();
        let size = 16 << 20;
        let src = FileEndpoint::open(&path, Access::Write { create_size: size })
            .await
            .unwrap();
        let mut expect = vec![0u8; size as usize];
        for (k, off) in [0u64, 5 << 20, (15 << 20) + 4096].into_iter().enumerate() {
            let data: Vec<u8> = (0..300_000u32).map(|x| (x as u8) ^ (k as u8 + 1)).collect();
            let end = (off as usize + data.len()).min(size as usize);
            expect[off as usize..end].copy_from_slice(&data[..end - off as usize]);
            src.write(off, data[..end - off as usize].to_vec())
                .await
                .unwrap();
        }
        (path, expect)
    }

    async fn run(
        src: &str,
        dst: &str,
        kind: PlanKind,
        opts: &CopyOptions,
    ) -> Result<ProgressSnapshot> {
        let s: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open(src, Access::Read).await?);
        let size = s.capabilities().size;
        let d: Arc<dyn Endpoint> =
            Arc::new(FileEndpoint::open(dst, Access::Write { create_size: size }).await?);
        copy(s, d, &kind, opts, Arc::default(), Arc::default()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn allocated_copy_moves_only_data() {
        let dir = tempfile::tempdir().unwrap();
        let (src, expect) = sparse_source(dir.path()).await;
        let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
        let opts = CopyOptions {
            request_size: 1 << 16,
            ..CopyOptions::default()
        };
        let snap = run(&src, &dst, PlanKind::Allocated, &opts).await.unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), expect);
        assert!(
            snap.bytes_read < 2 << 20,
            "read {} bytes of a mostly sparse disk",
            snap.bytes_read
        );
        assert_eq!(snap.bytes_done(), snap.bytes_planned);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn explicit_zero_rest_overwrites_stale_target_data() {
        let dir = tempfile::tempdir().unwrap();
        let (src, expect) = sparse_source(dir.path()).await;
        let dst = dir.path().join("stale.raw");
        std::fs::write(&dst, vec![0xa5u8; expect.len()]).unwrap();
        let dst = dst.to_str().unwrap().to_owned();
        let data = vec![
            (0, 300_000),
            (5 << 20, 300_000),
            ((15 << 20) + 4096, (1 << 20) - 4096),
        ];
        let opts = CopyOptions {
            request_size: 1 << 16,
            ..CopyOptions::default()
        };
        let snap = run(&src, &dst, PlanKind::ExplicitZeroRest(data), &opts)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), expect);
        assert_eq!(snap.bytes_done(), expect.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn explicit_extents_past_the_end_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = sparse_source(dir.path()).await;
        let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
        let err = run(
            &src,
            &dst,
            PlanKind::Explicit(vec![(0, 4096), (16 << 20, 1)]),
            &CopyOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, MoverError::InvalidPlan(_)), "{err}");
        assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoint_resume_skips_done_items() {
        let dir = tempfile::tempdir().unwrap();
        let (src, expect) = sparse_source(dir.path()).await;
        let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
        let cp = dir.path().join("cp.json");
        let opts = CopyOptions {
            request_size: 1 << 16,
            checkpoint: Some(cp.clone()),
            ..CopyOptions::default()
        };
        let first = run(&src, &dst, PlanKind::All, &opts).await.unwrap();
        assert_eq!(first.bytes_resumed, 0);
        let again = run(&src, &dst, PlanKind::All, &opts).await.unwrap();
        assert_eq!(again.bytes_resumed, again.bytes_planned);
        assert_eq!(again.bytes_read, 0);
        assert_eq!(std::fs::read(&dst).unwrap(), expect);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = sparse_source(dir.path()).await;
        let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
        let opts = CopyOptions {
            request_size: 3000,
            ..CopyOptions::default()
        };
        assert!(matches!(
            run(&src, &dst, PlanKind::All, &opts).await,
            Err(MoverError::InvalidPlan(_))
        ));
    }
}
