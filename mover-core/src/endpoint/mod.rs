//! One interface over every place disk bytes come from or go to.
//!
//! The copy engine sees only [`Endpoint`] and its [`Capabilities`], never the concrete type (the
//! idea of nbdcopy's `struct rw_ops`). Buffers are owned and handed back (`read` and `write` take
//! a `Vec<u8>` and return it), so an implementation may move the buffer into a blocking thread or
//! a socket reader task and the caller reuses it for the next request without allocating.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{MoverError, Result};

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
    /// `write_zeroes` is cheaper than writing zero bytes.
    pub fast_zero: bool,
    /// Largest single request the endpoint accepts, in bytes.
    pub max_request: u64,
}

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

    /// Make every completed write durable.
    async fn flush(&self) -> Result<()>;

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

/// How hard an endpoint tries before it gives up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// How long a network endpoint keeps trying to re-establish a lost connection.
    pub reconnect_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            reconnect_timeout: Duration::from_secs(60),
        }
    }
}

/// Open an endpoint with the default [`OpenOptions`].
pub async fn open(spec: &str, access: Access) -> Result<Arc<dyn Endpoint>> {
    open_with(spec, access, &OpenOptions::default()).await
}

/// Open an endpoint from its specification: `nbd://host[:port]/export`,
/// `nbd+unix:///export?socket=PATH`, or a path to a raw file or block device.
pub async fn open_with(
    spec: &str,
    access: Access,
    opts: &OpenOptions,
) -> Result<Arc<dyn Endpoint>> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        let nbd_opts = crate::nbd::NbdOptions {
            reconnect_timeout: opts.reconnect_timeout,
            ..crate::nbd::NbdOptions::default()
        };
        return Ok(Arc::new(
            crate::nbd::NbdEndpoint::open_with(spec, access, nbd_opts).await?,
        ));
    }
    if spec.contains("://") {
        return Err(MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason: "unknown scheme: use nbd://, nbd+unix:// or a local path".into(),
        });
    }
    Ok(Arc::new(file::FileEndpoint::open(spec, access).await?))
}
