//! The Python binding, `pyapp._mover`: plain data in, frozen reports out.
//!
//! Services never import this module; they use the typed facade `pyapp.mover`. Every long call
//! goes through [`detached`], which releases the GIL, runs the work on the mover's runtime and
//! turns a panic into a `MoverError` instead of a dead interpreter. Progress is read from the
//! copy's atomics by [`Copy::progress`] at any time, from any thread; the chain operations
//! (`checksum`, `verify`, `verify_chain`, `consolidate`) report through a [`Tracker`] the
//! caller may pass in and watch the same way.
//!
//! [`ImageReader`] is a read-only view of a disk image (a QCOW2 chain or a raw file) for
//! Python code that parses guest file systems: positioned reads, GIL released, safe to share
//! between threads.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::chain::{self, ConsolidateOptions};
use crate::copy::{self, CopyOptions, CopyOutcome};
use crate::endpoint::OpenOptions;
use crate::error::{MoverError, Result};
use crate::manifest::ChunkMismatch as CoreMismatch;
use crate::plan::PlanKind;
use crate::progress::{CancelToken, Progress, ProgressSnapshot};
use crate::qcow2::{BackingFormat, Qcow2Chain};

mod errors;

/// Release the GIL, run `work` to completion on the mover's runtime, and map its outcome (a
/// panic included) to Python.
fn detached<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send,
    F: std::future::Future<Output = Result<T>> + Send,
{
    py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| copy::runtime().block_on(work))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(MoverError::io(
                "internal error in the mover",
                std::io::Error::other(what),
            ))
        })
    })
    .map_err(PyErr::from)
}

/// Counters of a copy at one moment.
#[pyclass(frozen, get_all, module = "pyapp._mover")]
#[derive(Clone)]
pub struct CopyProgress {
    bytes_planned: u64,
    bytes_resumed: u64,
    bytes_read: u64,
    bytes_written: u64,
    bytes_zeroed: u64,
    extents_total: u64,
    extents_done: u64,
    seconds: f64,
    throughput_bytes_per_s: f64,
    eta_seconds: Option<f64>,
    percent: f64,
    finished: bool,
    /// The manifest written beside the target, once the copy is done.
    manifest: Option<String>,
    disk_digest: Option<String>,
    /// The final result of a copy whose every target flush reached stable storage (`fdatasync`,
    /// or an `NBD_CMD_FLUSH` the server acknowledged). False for a target that cannot be made
    /// durable (an NBD server that does not advertise flush), and in progress snapshots.
    durable: bool,
}

impl From<CopyOutcome> for CopyProgress {
    fn from(o: CopyOutcome) -> Self {
        let mut p = Self::from(o.progress);
        p.durable = o.durable;
        if let Some(m) = o.manifest {
            p.manifest = Some(m.path.display().to_string());
            p.disk_digest = Some(m.disk_digest);
        }
        p
    }
}

impl From<ProgressSnapshot> for CopyProgress {
    fn from(s: ProgressSnapshot) -> Self {
        Self {
            percent: s.percent(),
            bytes_planned: s.bytes_planned,
            bytes_resumed: s.bytes_resumed,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            bytes_zeroed: s.bytes_zeroed,
            extents_total: s.extents_total,
            extents_done: s.extents_done,
            seconds: s.seconds,
            throughput_bytes_per_s: s.throughput_bytes_per_s,
            eta_seconds: s.eta_seconds,
            finished: s.finished,
            manifest: None,
            disk_digest: None,
            durable: false,
        }
    }
}

#[pymethods]
impl CopyProgress {
    fn __repr__(&self) -> String {
        format!(
            "CopyProgress(planned={}, written={}, zeroed={}, resumed={}, percent={:.1}, finished={}, durable={})",
            self.bytes_planned, self.bytes_written, self.bytes_zeroed, self.bytes_resumed, self.percent, self.finished,
            self.durable
        )
    }
}

/// One copy from a source to a target. `run()` blocks (without the GIL) until it ends;
/// `progress()` and `cancel()` may be called from any other thread meanwhile.
#[pyclass(frozen, module = "pyapp._mover")]
pub struct Copy {
    source: String,
    target: String,
    kind: PlanKind,
    options: CopyOptions,
    open: OpenOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
}

#[pymethods]
impl Copy {
    #[new]
    #[pyo3(signature = (source, target, *, extents=None, allocated_only=false, connections=4, requests=16,
                        request_size=1_048_576, checkpoint=None, target_is_zero=false,
                        checkpoint_interval=5.0, reconnect_timeout=60.0, backing=None,
                        cluster_size=65_536, manifest=None, write_manifest=true, zero_unlisted=false,
                        request_timeout=60.0, connect_timeout=30.0, allowed_backing_roots=None))]
    // Mirrors Python's keyword arguments one to one.
    #[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
    fn new(
        source: String,
        target: String,
        extents: Option<Vec<(u64, u64)>>,
        allocated_only: bool,
        connections: usize,
        requests: usize,
        request_size: usize,
        checkpoint: Option<PathBuf>,
        target_is_zero: bool,
        checkpoint_interval: f64,
        reconnect_timeout: f64,
        backing: Option<PathBuf>,
        cluster_size: u64,
        manifest: Option<PathBuf>,
        write_manifest: bool,
        zero_unlisted: bool,
        request_timeout: f64,
        connect_timeout: f64,
        allowed_backing_roots: Option<Vec<PathBuf>>,
    ) -> PyResult<Self> {
        let seconds = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    MoverError::InvalidPlan(format!("{name} must be a positive number of seconds"))
                })
        };
        let kind = match (extents, allocated_only, zero_unlisted) {
            (Some(_), true, _) => {
                return Err(MoverError::InvalidPlan(
                    "give either extents or allocated_only, not both".into(),
                )
                .into())
            }
            (None, _, true) => {
                return Err(MoverError::InvalidPlan("zero_unlisted needs extents".into()).into())
            }
            (Some(list), false, false) => PlanKind::Explicit(list),
            (Some(list), false, true) => PlanKind::ExplicitZeroRest(list),
            (None, true, false) => PlanKind::Allocated,
            (None, false, false) => PlanKind::All,
        };
        Ok(Self {
            source,
            target,
            kind,
            options: CopyOptions {
                connections,
                requests,
                request_size,
                checkpoint,
                target_is_zero,
                checkpoint_interval: seconds("checkpoint_interval", checkpoint_interval)?,
                manifest,
                skip_manifest: !write_manifest,
                ..CopyOptions::default()
            },
            open: OpenOptions {
                reconnect_timeout: seconds("reconnect_timeout", reconnect_timeout)?,
                connect_timeout: seconds("connect_timeout", connect_timeout)?,
                request_timeout: seconds("request_timeout", request_timeout)?,
                backing,
                cluster_size,
                cancel: None, // the copy's own token, set by copy::run
                allowed_backing_roots: allowed_backing_roots.unwrap_or_default(),
            },
            progress: Arc::default(),
            cancel: Arc::default(),
        })
    }

    /// Run the copy to its end and return the final counters (and the manifest written).
    fn run(&self, py: Python<'_>) -> PyResult<CopyProgress> {
        let work = copy::run(
            &self.source,
            &self.target,
            &self.kind,
            &self.options,
            &self.open,
            Arc::clone(&self.progress),
            Arc::clone(&self.cancel),
        );
        detached(py, work).map(CopyProgress::from)
    }

    fn progress(&self) -> CopyProgress {
        self.progress.snapshot().into()
    }

    /// Ask the copy to stop; `run()` then raises `CancelledError` once in-flight requests drain.
    fn cancel(&self) {
        self.cancel.cancel();
    }

    #[getter]
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Progress and cancellation of a chain operation, watched from another thread.
#[pyclass(frozen, module = "pyapp._mover")]
#[derive(Default)]
pub struct Tracker {
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
}

#[pymethods]
impl Tracker {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn progress(&self) -> CopyProgress {
        self.progress.snapshot().into()
    }

    fn cancel(&self) {
        self.cancel.cancel();
    }

    #[getter]
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

fn tracked(tracker: Option<&Bound<'_, Tracker>>) -> (Arc<Progress>, Arc<CancelToken>) {
    tracker.map_or_else(
        || (Arc::default(), Arc::default()),
        |t| {
            let t = t.get();
            (Arc::clone(&t.progress), Arc::clone(&t.cancel))
        },
    )
}

/// One chunk whose contents differ from the manifest (digests in hex).
#[pyclass(frozen, get_all, module = "pyapp._mover")]
#[derive(Clone)]
pub struct ChunkMismatch {
    index: u64,
    offset: u64,
    length: u64,
    expected: String,
    found: String,
}

impl From<&CoreMismatch> for ChunkMismatch {
    fn from(m: &CoreMismatch) -> Self {
        let hex = |d: &[u8; 32]| blake3::Hash::from(*d).to_hex().to_string();
        Self {
            index: m.index,
            offset: m.offset,
            length: m.length,
            expected: hex(&m.expected),
            found: hex(&m.found),
        }
    }
}

#[pymethods]
impl ChunkMismatch {
    fn __repr__(&self) -> String {
        format!(
            "ChunkMismatch(index={}, offset={}, length={})",
            self.index, self.offset, self.length
        )
    }
}

/// The outcome of verifying one image against its manifest.
#[pyclass(frozen, get_all, module = "pyapp._mover")]
pub struct VerifyReport {
    image: String,
    manifest: String,
    chunks: u64,
    bytes_read: u64,
    expected_digest: String,
    found_digest: String,
    mismatches: Vec<ChunkMismatch>,
    seconds: f64,
}

impl From<chain::VerifyReport> for VerifyReport {
    fn from(r: chain::VerifyReport) -> Self {
        Self {
            mismatches: r.mismatches.iter().map(ChunkMismatch::from).collect(),
            image: r.image,
            manifest: r.manifest.display().to_string(),
            chunks: r.chunks,
            bytes_read: r.bytes_read,
            expected_digest: r.expected_digest,
            found_digest: r.found_digest,
            seconds: r.seconds,
        }
    }
}

#[pymethods]
impl VerifyReport {
    #[getter]
    fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }

    fn __repr__(&self) -> String {
        format!(
            "VerifyReport(image={:?}, chunks={}, mismatches={})",
            self.image,
            self.chunks,
            self.mismatches.len()
        )
    }
}

/// A manifest made for a source.
#[pyclass(frozen, get_all, module = "pyapp._mover")]
pub struct ChecksumReport {
    source: String,
    manifest: Option<String>,
    disk_size: u64,
    chunk_size: u64,
    chunks: u64,
    disk_digest: String,
    bytes_read: u64,
    seconds: f64,
}

/// What a consolidation did.
#[pyclass(frozen, get_all, module = "pyapp._mover")]
pub struct ConsolidateReport {
    image: String,
    merged: Vec<String>,
    removed: Vec<String>,
    disk_size: u64,
    disk_digest: String,
    bytes_written: u64,
    seconds: f64,
}

/// Make a manifest of any source, saved to `output` when given.
#[pyfunction]
#[pyo3(signature = (source, *, output=None, chunk_size=1_048_576, tracker=None))]
fn checksum(
    py: Python<'_>,
    source: String,
    output: Option<PathBuf>,
    chunk_size: u64,
    tracker: Option<&Bound<'_, Tracker>>,
) -> PyResult<ChecksumReport> {
    let (progress, cancel) = tracked(tracker);
    let work = async move {
        chain::checksum(&source, output.as_deref(), chunk_size, &progress, &cancel).await
    };
    let r = detached(py, work)?;
    Ok(ChecksumReport {
        source: r.source,
        manifest: r.manifest.map(|p| p.display().to_string()),
        disk_size: r.disk_size,
        chunk_size: r.chunk_size,
        chunks: r.chunks,
        disk_digest: r.disk_digest,
        bytes_read: r.bytes_read,
        seconds: r.seconds,
    })
}

/// Re-read `image` and compare it with its manifest (by default the one beside it).
#[pyfunction]
#[pyo3(signature = (image, *, manifest=None, tracker=None))]
fn verify(
    py: Python<'_>,
    image: String,
    manifest: Option<PathBuf>,
    tracker: Option<&Bound<'_, Tracker>>,
) -> PyResult<VerifyReport> {
    let (progress, cancel) = tracked(tracker);
    let work = async move { chain::verify(&image, manifest.as_deref(), &progress, &cancel).await };
    detached(py, work).map(VerifyReport::from)
}

/// Verify every file of the chain of `top` that has a manifest; also return the files that
/// have none.
#[pyfunction]
#[pyo3(signature = (top, *, tracker=None))]
fn verify_chain(
    py: Python<'_>,
    top: PathBuf,
    tracker: Option<&Bound<'_, Tracker>>,
) -> PyResult<(Vec<VerifyReport>, Vec<String>)> {
    let (progress, cancel) = tracked(tracker);
    let work = async move { chain::verify_chain(&top, &progress, &cancel).await };
    let (reports, unverified) = detached(py, work)?;
    Ok((
        reports.into_iter().map(VerifyReport::from).collect(),
        unverified,
    ))
}

/// Flatten the chain of `top` into `output`, or merge its oldest `layers` layers in place.
#[pyfunction]
#[pyo3(signature = (top, *, layers=None, output=None, cluster_size=65_536, tracker=None))]
fn consolidate(
    py: Python<'_>,
    top: PathBuf,
    layers: Option<usize>,
    output: Option<PathBuf>,
    cluster_size: u64,
    tracker: Option<&Bound<'_, Tracker>>,
) -> PyResult<ConsolidateReport> {
    let (progress, cancel) = tracked(tracker);
    let opts = ConsolidateOptions {
        layers,
        output,
        cluster_size,
        ..ConsolidateOptions::default()
    };
    let work = async move { chain::consolidate(&top, &opts, &progress, &cancel).await };
    let r = detached(py, work)?;
    Ok(ConsolidateReport {
        image: r.image.display().to_string(),
        merged: r.merged,
        removed: r.removed,
        disk_size: r.disk_size,
        disk_digest: r.disk_digest,
        bytes_written: r.bytes_written,
        seconds: r.seconds,
    })
}

/// The chain of `image` and its allocation map, as a JSON document.
#[pyfunction]
fn info(py: Python<'_>, image: PathBuf) -> PyResult<String> {
    let work = async move {
        let i = chain::info(&image)?;
        serde_json::to_string(&i).map_err(|e| MoverError::io("info", std::io::Error::other(e)))
    };
    detached(py, work)
}

/// A disk image read-only: a QCOW2 image through its whole backing chain, or a raw file.
#[pyclass(frozen, module = "pyapp._mover")]
pub struct ImageReader {
    chain: Qcow2Chain,
    path: String,
}

#[pymethods]
impl ImageReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let name = path.display().to_string();
        let chain = py
            .detach(move || {
                if crate::qcow2::is_qcow2(&path)? {
                    Qcow2Chain::open(&path)
                } else {
                    Qcow2Chain::open_as(&path, BackingFormat::Raw)
                }
            })
            .map_err(PyErr::from)?;
        Ok(Self { chain, path: name })
    }

    /// Virtual size of the disk in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.chain.size()
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Up to `length` bytes at `offset`, fewer only at the end of the disk.
    fn read_at<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        length: usize,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let mut buf = vec![0u8; length];
        let n = py
            .detach(|| self.chain.read_at(offset, &mut buf))
            .map_err(PyErr::from)?;
        Ok(pyo3::types::PyBytes::new(py, &buf[..n]))
    }

    fn __repr__(&self) -> String {
        format!(
            "ImageReader({:?}, size={}, depth={})",
            self.path,
            self.chain.size(),
            self.chain.depth()
        )
    }
}

#[pymodule]
fn _mover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<Copy>()?;
    m.add_class::<CopyProgress>()?;
    m.add_class::<Tracker>()?;
    m.add_class::<ChunkMismatch>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<ChecksumReport>()?;
    m.add_class::<ConsolidateReport>()?;
    m.add_class::<ImageReader>()?;
    m.add_function(wrap_pyfunction!(checksum, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(verify_chain, m)?)?;
    m.add_function(wrap_pyfunction!(consolidate, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
