//! QCOW2 images as copy sources and targets.
//!
//! - [`format`](mod@format): the on-disk structures (header, extensions, L1/L2 entries), pure functions;
//! - [`reader`]: [`Qcow2Chain`], an image and its backing chain of any depth (QCOW2 versions 2
//!   and 3, raw or QCOW2 backing files, zero, unallocated and compressed clusters (deflate or
//!   zstd), extended L2 entries with subclusters), its backing files confined to the top image's
//!   directory and the caller's allowed roots, read with a
//!   blocking, thread-safe `read_at` and mapped with `map`;
//! - [`writer`]: [`Qcow2Writer`], a new version 3 image, standalone or an overlay, written in any
//!   order by several tasks at once, made consistent by `flush`.
//!
//! [`Qcow2Source`] and [`Qcow2Target`] put them behind the [`Endpoint`] interface. Both are
//! local files, so every handle of a disk shares one reader or writer (`another` is cheap and
//! `multi_conn` is true); blocking I/O runs on tokio's blocking threads.
//!
//! What is not supported, and refused with a [`MoverError::Format`] naming it: encryption,
//! external data files and images marked corrupt. Internal snapshots are ignored: the active L1
//! table is what is read. An image is untrusted input: a header field that does not fit the
//! file or QEMU's limits, or a backing file outside the allowed directories, is a
//! [`MoverError::Format`] naming it, before anything is allocated or opened from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::endpoint::blocking;
use crate::endpoint::{Capabilities, Endpoint, Extent};
use crate::error::{MoverError, Result};

pub mod format;
pub mod reader;
pub mod writer;

pub use reader::{Allocation, BackingFormat, MapEntry, Qcow2Chain};
pub use writer::{Backing, Qcow2Writer, DEFAULT_CLUSTER_SIZE};

/// The file at `path` starts with the QCOW2 magic.
pub fn is_qcow2(path: &Path) -> Result<bool> {
    reader::probe_qcow2(path)
}

/// Largest request either endpoint takes at once.
const MAX_REQUEST: u64 = 32 << 20;

fn to_extents(map: Vec<MapEntry>) -> Vec<Extent> {
    map.into_iter()
        .map(|e| Extent {
            offset: e.offset,
            length: e.length,
            zero: e.reads_zero(),
        })
        .collect()
}

/// A QCOW2 chain as a read-only copy source.
pub struct Qcow2Source {
    name: String,
    chain: Arc<Qcow2Chain>,
    caps: Capabilities,
}

impl Qcow2Source {
    /// Open an image and its backing chain (blocking), the backing files confined to the
    /// image's directory.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &[])
    }

    /// Open an image and its backing chain (blocking); backing files may also lie in
    /// `allowed_backing_roots` (see [`Qcow2Chain::open_with`]).
    pub fn open_with(path: &Path, allowed_backing_roots: &[PathBuf]) -> Result<Self> {
        let chain = Qcow2Chain::open_with(path, BackingFormat::Qcow2, allowed_backing_roots)?;
        Ok(Self::from_chain(
            path.display().to_string(),
            Arc::new(chain),
        ))
    }

    #[must_use]
    pub fn from_chain(name: String, chain: Arc<Qcow2Chain>) -> Self {
        let caps = Capabilities {
            size: chain.size(),
            read_only: true,
            multi_conn: true,
            extents: true,
            cheap_extents: false,
            flush_ahead: false,
            fast_zero: false,
            max_request: MAX_REQUEST,
            max_in_flight: crate::endpoint::LOCAL_IN_FLIGHT,
        };
        Self { name, chain, caps }
    }

    #[must_use]
    pub fn chain(&self) -> &Arc<Qcow2Chain> {
        &self.chain
    }
}

#[async_trait]
impl Endpoint for Qcow2Source {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn another(&self) -> Result<Arc<dyn Endpoint>> {
        Ok(Arc::new(Self::from_chain(
            self.name.clone(),
            Arc::clone(&self.chain),
        )))
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        if offset.saturating_add(buf.len() as u64) > self.caps.size {
            return Err(MoverError::source_read(
                offset,
                buf.len() as u64,
                None,
                format!("{}: read past the end of the disk", self.name),
            ));
        }
        let chain = Arc::clone(&self.chain);
        blocking(move || {
            chain.read_exact_at(offset, &mut buf)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        Err(MoverError::target_write(
            offset,
            buf.len() as u64,
            None,
            format!("{} is opened read-only", self.name),
        ))
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        Err(MoverError::target_write(
            offset,
            length,
            None,
            format!("{} is opened read-only", self.name),
        ))
    }

    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let chain = Arc::clone(&self.chain);
        blocking(move || Ok(to_extents(chain.map(offset, length)?))).await
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A QCOW2 image being written, as a copy target. `flush` (and `close`) write the metadata and
/// leave a clean, durable image.
pub struct Qcow2Target {
    writer: Arc<Qcow2Writer>,
    caps: Capabilities,
}

impl Qcow2Target {
    /// Create the image (blocking); see [`Qcow2Writer::create`].
    pub fn create(
        path: &Path,
        size: u64,
        cluster_size: u64,
        backing: Option<&Backing>,
    ) -> Result<Self> {
        let writer = Qcow2Writer::create(path, size, cluster_size, backing)?;
        Ok(Self::from_writer(Arc::new(writer)))
    }

    #[must_use]
    pub fn from_writer(writer: Arc<Qcow2Writer>) -> Self {
        let caps = Capabilities {
            size: writer.size(),
            read_only: false,
            multi_conn: true,
            extents: true,
            cheap_extents: false,
            flush_ahead: false,
            fast_zero: true,
            max_request: MAX_REQUEST,
            max_in_flight: crate::endpoint::LOCAL_IN_FLIGHT,
        };
        Self { writer, caps }
    }

    #[must_use]
    pub fn writer(&self) -> &Arc<Qcow2Writer> {
        &self.writer
    }
}

#[async_trait]
impl Endpoint for Qcow2Target {
    fn name(&self) -> &str {
        self.writer.path()
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn another(&self) -> Result<Arc<dyn Endpoint>> {
        Ok(Arc::new(Self::from_writer(Arc::clone(&self.writer))))
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let w = Arc::clone(&self.writer);
        blocking(move || {
            w.read_at(offset, &mut buf)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let w = Arc::clone(&self.writer);
        blocking(move || {
            w.write_at(offset, &buf)?;
            Ok(buf)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let w = Arc::clone(&self.writer);
        blocking(move || w.write_zeroes(offset, length)).await
    }

    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let w = Arc::clone(&self.writer);
        blocking(move || Ok(to_extents(w.map(offset, length)?))).await
    }

    async fn flush(&self) -> Result<()> {
        let w = Arc::clone(&self.writer);
        blocking(move || w.flush()).await
    }

    async fn close(&self) -> Result<()> {
        self.flush().await
    }
}
