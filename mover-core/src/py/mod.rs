//! The Python binding, `pyapp._mover`: plain data in, frozen reports out.
//!
//! Services never import this module; they use the typed facade `pyapp.mover`. Every long call
//! goes through [`detached`], which releases the GIL, runs the work on the mover's runtime and
//! turns a panic into a `MoverError` instead of a dead interpreter. Progress is read from the
//! copy's atomics by [`Copy::progress`] at any time, from any thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::copy::{self, CopyOptions};
use crate::endpoint::{self, Access, OpenOptions};
use crate::error::{MoverError, Result};
use crate::plan::PlanKind;
use crate::progress::{CancelToken, Progress, ProgressSnapshot};

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
        }
    }
}

#[pymethods]
impl CopyProgress {
    fn __repr__(&self) -> String {
        format!(
            "CopyProgress(planned={}, written={}, zeroed={}, resumed={}, percent={:.1}, finished={})",
            self.bytes_planned, self.bytes_written, self.bytes_zeroed, self.bytes_resumed, self.percent, self.finished
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
                        checkpoint_interval=5.0, reconnect_timeout=60.0))]
    #[allow(clippy::too_many_arguments)]
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
    ) -> PyResult<Self> {
        let seconds = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    MoverError::InvalidPlan(format!("{name} must be a positive number of seconds"))
                })
        };
        let kind = match (extents, allocated_only) {
            (Some(_), true) => {
                return Err(MoverError::InvalidPlan(
                    "give either extents or allocated_only, not both".into(),
                )
                .into())
            }
            (Some(list), false) => PlanKind::Explicit(list),
            (None, true) => PlanKind::Allocated,
            (None, false) => PlanKind::All,
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
                ..CopyOptions::default()
            },
            open: OpenOptions {
                reconnect_timeout: seconds("reconnect_timeout", reconnect_timeout)?,
            },
            progress: Arc::default(),
            cancel: Arc::default(),
        })
    }

    /// Run the copy to its end and return the final counters.
    fn run(&self, py: Python<'_>) -> PyResult<CopyProgress> {
        let work = async {
            let src = endpoint::open_with(&self.source, Access::Read, &self.open).await?;
            let size = src.capabilities().size;
            let dst = endpoint::open_with(
                &self.target,
                Access::Write { create_size: size },
                &self.open,
            )
            .await?;
            let result = copy::copy(
                Arc::clone(&src),
                Arc::clone(&dst),
                &self.kind,
                &self.options,
                Arc::clone(&self.progress),
                Arc::clone(&self.cancel),
            )
            .await;
            let _ = src.close().await;
            let _ = dst.close().await;
            result
        };
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

#[pymodule]
fn _mover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<Copy>()?;
    m.add_class::<CopyProgress>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
