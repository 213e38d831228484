//! One interface over every place disk bytes come from or go to.
//!
//! The copy engine sees only [`Endpoint`] and its [`Capabilities`], never the concrete type (the
//! idea of nbdcopy's `struct rw_ops`). Buffers are owned and handed back (`read` and `write` take
//! a `Vec<u8>` and return it), so an implementation may move the buffer into a blocking thread or
//! a socket reader task and the caller reuses it for the next request without allocating.
//!
//! This module is the interface and its types only: it imports no implementation. The
//! implementations are [`file`](mod@file) (raw files and block devices), [`crate::nbd`] and
//! [`crate::qcow2`]; [`crate::open`] turns a specification into one of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{MoverError, Result};
use crate::progress::CancelToken;

pub mod file;

/// A run of the disk and what it holds, as reported by the endpoint's allocation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// The run reads as zeros (a hole, or an area known to be zero). Such a run is never read or
    /// sent as data.
    pub zero: bool,
}

impl Extent {
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Append an extent, merging it with the previous one when they are of the same kind.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64, zero: bool) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.zero == zero && last.end() == offset {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        zero,
    });
}

/// What an endpoint can do, asked once when it is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Virtual size of the disk in bytes.
    pub size: u64,
    pub read_only: bool,
    /// Several independent connections see one consistent disk (NBD multi-conn, a local file).
    pub multi_conn: bool,
    /// `extents` reports real allocation rather than "all data".
    pub extents: bool,
    /// `extents` over the whole disk costs little next to the zero commands it can save (NBD
    /// block status, `SEEK_HOLE` on a file): before a copy writes into this endpoint, the
    /// engine asks which ranges already read as zeros and sends no zero command there. False
    /// where the map is dear (a QCOW2 image walks its tables and backing chain) or says "all
    /// data" anyway.
    pub cheap_extents: bool,
    /// Completed writes wait in a cache that only a flush writes back (an NBD server: its own
    /// write-back cache, or its host's page cache). A copy into it flushes as it goes, one
    /// flush at a time, so that the write-back overlaps the copy and the final flush finds
    /// little left to write. A local file starts its own write-back after each write instead.
    pub flush_ahead: bool,
    /// `write_zeroes` is cheaper than writing zero bytes.
    pub fast_zero: bool,
    /// Largest single request the endpoint accepts, in bytes.
    pub max_request: u64,
    /// Requests in flight that still help this endpoint, over all its connections; the copy
    /// engine runs no more slots than the smaller of its two ends allows.
    pub max_in_flight: usize,
}

/// Requests in flight worth having against one local file: positioned writes to one file
/// serialise on its inode lock, and more of them only contend (the reference workload: 64 in
/// flight copied a raw file about half as fast as 4 to 8). 8 rather than 4 leaves slots doing
/// I/O while others hash their chunk for an inline manifest (its cost fell from ~40% to ~6%).
pub const LOCAL_IN_FLIGHT: usize = 8;

#[async_trait]
pub trait Endpoint: Send + Sync {
    /// How the endpoint is named in messages (a URI or a path, never a secret).
    fn name(&self) -> &str;

    fn capabilities(&self) -> &Capabilities;

    /// A further handle on the same disk for another worker: a new connection where the
    /// endpoint allows several, else a handle sharing this one.
    async fn another(&self) -> Result<Arc<dyn Endpoint>>;

    /// Fill `buf` from `offset` (its whole length) and hand it back.
    async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>>;

    /// Write all of `buf` at `offset` and hand the buffer back.
    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>>;

    /// Make `length` bytes at `offset` read as zeros, deallocating where the endpoint can.
    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()>;

    /// The allocation map of `[offset, offset + length)`, in order, covering the whole range.
    /// Endpoints without allocation information report one data extent.
    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// Make every completed write durable, where the endpoint can (see
    /// [`flush_durable`](Self::flush_durable)).
    async fn flush(&self) -> Result<()>;

    /// [`flush`](Self::flush), and whether the completed writes are now on stable storage:
    /// `false` when the endpoint has no way to make them so (an NBD server that does not
    /// advertise flush), and the flush did nothing. The default, for endpoints whose flush
    /// always reaches stable storage (`fdatasync` of a file or image), answers `true`.
    async fn flush_durable(&self) -> Result<bool> {
        self.flush().await?;
        Ok(true)
    }

    /// End the session cleanly (NBD disconnect). Further requests fail.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// How an endpoint is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Open for writing; a local file that does not exist is created sparse with `create_size`
    /// bytes, and one that is smaller is extended to it.
    Write {
        create_size: u64,
    },
}

/// How an endpoint is opened beyond its access mode. Its defaults are those of each kind of
/// endpoint, so they are set where every kind is known: `impl Default` is in [`crate::open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// How long a network endpoint keeps trying to re-establish a lost connection.
    pub reconnect_timeout: Duration,
    /// How long one connection attempt of a network endpoint (connect and handshake) may take.
    pub connect_timeout: Duration,
    /// How long one request to a network endpoint may wait for its reply.
    pub request_timeout: Duration,
    /// A new QCOW2 target is an overlay on this image (QCOW2 or raw, probed by its magic).
    pub backing: Option<PathBuf>,
    /// Cluster size of a new QCOW2 target.
    pub cluster_size: u64,
    /// Cancellation of the work the endpoint serves: a network endpoint stops reconnecting.
    pub cancel: Option<Arc<CancelToken>>,
    /// Directories a QCOW2 source's backing files may lie in besides the image's own.
    pub allowed_backing_roots: Vec<PathBuf>,
}

/// What an endpoint specification names, decided before anything is opened or created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nbd,
    /// A raw file or block device.
    Raw,
    /// An existing QCOW2 image (its file starts with the QCOW2 magic).
    Qcow2,
    /// A QCOW2 image the mover is to create: a target path ending in `.qcow2` that does not
    /// exist yet.
    NewQcow2,
}

/// Run blocking file work (metadata, QCOW2 tables, manifests) on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MoverError::io("blocking worker", std::io::Error::other(e)))?
}
