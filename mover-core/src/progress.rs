//! Progress counters and cancellation, shared between the copy and whoever watches it.
//!
//! Workers only add to relaxed atomics; a reader takes a [`ProgressSnapshot`] at any moment
//! without taking a lock or slowing the copy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_planned: AtomicU64,
    /// Bytes already done by an earlier run, found in the checkpoint.
    pub bytes_resumed: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Bytes sent as zero commands (never as data): zero runs of the source and all-zero
    /// requests found by scanning.
    pub bytes_zeroed: AtomicU64,
    pub extents_total: AtomicU64,
    pub extents_done: AtomicU64,
    times: Mutex<(Option<Instant>, Option<Instant>)>,
}

/// A consistent-enough copy of the counters, with rates derived from them.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressSnapshot {
    pub bytes_planned: u64,
    pub bytes_resumed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub extents_total: u64,
    pub extents_done: u64,
    pub seconds: f64,
    /// Bytes of the plan done per second in this run (data written plus zeroed).
    pub throughput_bytes_per_s: f64,
    /// Seconds left at the current rate; `None` before anything is done.
    pub eta_seconds: Option<f64>,
    pub finished: bool,
}

impl ProgressSnapshot {
    #[must_use]
    pub fn bytes_done(&self) -> u64 {
        self.bytes_written + self.bytes_zeroed + self.bytes_resumed
    }

    #[must_use]
    pub fn percent(&self) -> f64 {
        if self.bytes_planned == 0 {
            return if self.finished { 100.0 } else { 0.0 };
        }
        100.0 * self.bytes_done() as f64 / self.bytes_planned as f64
    }
}

impl Progress {
    pub(crate) fn start(&self) {
        let mut t = self.times.lock().expect("progress clock");
        *t = (Some(Instant::now()), None);
    }

    pub(crate) fn finish(&self) {
        let mut t = self.times.lock().expect("progress clock");
        if t.1.is_none() {
            t.1 = Some(Instant::now());
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn snapshot(&self) -> ProgressSnapshot {
        let (started, finished) = *self.times.lock().expect("progress clock");
        let elapsed = match (started, finished) {
            (Some(s), Some(f)) => f - s,
            (Some(s), None) => s.elapsed(),
            _ => Duration::ZERO,
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut snap = ProgressSnapshot {
            bytes_planned: get(&self.bytes_planned),
            bytes_resumed: get(&self.bytes_resumed),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            bytes_zeroed: get(&self.bytes_zeroed),
            extents_total: get(&self.extents_total),
            extents_done: get(&self.extents_done),
            seconds: elapsed.as_secs_f64(),
            throughput_bytes_per_s: 0.0,
            eta_seconds: None,
            finished: finished.is_some(),
        };
        let moved = (snap.bytes_written + snap.bytes_zeroed) as f64;
        if snap.seconds > 0.0 && moved > 0.0 {
            snap.throughput_bytes_per_s = moved / snap.seconds;
            let left = snap.bytes_planned.saturating_sub(snap.bytes_done()) as f64;
            snap.eta_seconds = Some(if snap.finished {
                0.0
            } else {
                left / snap.throughput_bytes_per_s
            });
        }
        snap
    }
}

/// Cancellation shared with the caller: set once, seen by every worker before its next request.
#[derive(Debug, Default)]
pub struct CancelToken {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Resolves once [`cancel`](Self::cancel) has been called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}
