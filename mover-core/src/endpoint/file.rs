//! Raw files and block devices.
//!
//! Reads and writes are positioned (`pread`/`pwrite`) on one shared descriptor, each on a
//! blocking thread, so any number of workers use the same file without a lock. Zeros become
//! punched holes (`fallocate(PUNCH_HOLE)`), falling back to `ZERO_RANGE` and at last to written
//! zeros; whichever is refused once is not tried again. Allocation comes from
//! `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{push_extent, Access, Capabilities, Endpoint, Extent};
use crate::error::{MoverError, Result};

/// Which zeroing method works on this file; learnt on first refusal.
const ZERO_PUNCH: u8 = 0;
const ZERO_RANGE: u8 = 1;
const ZERO_WRITE: u8 = 2;

/// Largest zero buffer written when the file system can neither punch nor zero a range.
const ZERO_WRITE_CHUNK: u64 = 1 << 20;

pub struct FileEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    file: File,
    caps: Capabilities,
    block_device: bool,
    zero_method: AtomicU8,
}

impl FileEndpoint {
    pub async fn open(path: &str, access: Access) -> Result<Self> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(&path, access))
            .await
            .map_err(|e| MoverError::io("open worker", io::Error::other(e)))?
    }

    pub fn open_blocking(path: &str, access: Access) -> Result<Self> {
        let connect = |source| MoverError::Connect {
            endpoint: path.to_owned(),
            source,
        };
        let file = match access {
            Access::Read => OpenOptions::new().read(true).open(path).map_err(connect)?,
            Access::Write { .. } => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(connect)?,
        };
        let meta = file.metadata().map_err(connect)?;
        let block_device = meta.file_type().is_block_device();
        let mut size = if block_device {
            block_device_size(&file).map_err(connect)?
        } else {
            meta.len()
        };
        if let Access::Write { create_size } = access {
            if !block_device && size < create_size {
                file.set_len(create_size).map_err(connect)?;
                size = create_size;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                file,
                caps: Capabilities {
                    size,
                    read_only: access == Access::Read,
                    multi_conn: true,
                    extents: !block_device,
                    cheap_extents: !block_device,
                    flush_ahead: false,
                    fast_zero: true,
                    max_request: 1 << 30,
                    max_in_flight: super::LOCAL_IN_FLIGHT,
                },
                block_device,
                zero_method: AtomicU8::new(if block_device { ZERO_RANGE } else { ZERO_PUNCH }),
            }),
        })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| MoverError::io("file worker", io::Error::other(e)))?
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after offset.
        return if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(r.cast_unsigned()))
}

impl Inner {
    /// A failed read of `[offset, offset + length)`, with the OS error as the code.
    fn read_error(&self, offset: u64, length: u64, e: &io::Error) -> MoverError {
        MoverError::source_read(
            offset,
            length,
            e.raw_os_error().map(i32::cast_unsigned),
            format!("{}: {e}", self.path),
        )
    }

    /// A failed write, zeroing or flush of `[offset, offset + length)`.
    fn write_error(&self, offset: u64, length: u64, e: &io::Error) -> MoverError {
        MoverError::target_write(
            offset,
            length,
            e.raw_os_error().map(i32::cast_unsigned),
            format!("{}: {e}", self.path),
        )
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = (offset + length).min(self.caps.size);
        let mut out = Vec::new();
        let mut pos = offset;
        let err = |e| MoverError::io(format!("allocation map of {}", self.path), e);
        while pos < end {
            let data = lseek(&self.file, pos, libc::SEEK_DATA)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            if data > pos {
                push_extent(&mut out, pos, data - pos, true);
            }
            if data >= end {
                break;
            }
            let hole = lseek(&self.file, data, libc::SEEK_HOLE)
                .map_err(err)?
                .unwrap_or(end)
                .min(end);
            push_extent(&mut out, data, hole - data, false);
            pos = hole;
        }
        Ok(out)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        loop {
            let method = self.zero_method.load(Ordering::Relaxed);
            let mode = match method {
                ZERO_PUNCH => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                ZERO_RANGE => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                _ => return self.write_zero_bytes(offset, length),
            };
            let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
            let len = libc::off_t::try_from(length).map_err(io::Error::other)?;
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV) => {
                    let next = if method == ZERO_PUNCH && !self.block_device {
                        ZERO_RANGE
                    } else {
                        ZERO_WRITE
                    };
                    self.zero_method.store(next, Ordering::Relaxed);
                }
                _ => return Err(err),
            }
        }
    }

    fn write_zero_bytes(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeros = vec![0u8; length.min(ZERO_WRITE_CHUNK) as usize];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

#[async_trait]
impl Endpoint for FileEndpoint {
    fn name(&self) -> &str {
        &self.inner.path
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn another(&self) -> Result<Arc<dyn Endpoint>> {
        Ok(Arc::new(Self {
            inner: Arc::clone(&self.inner),
        }))
    }

    async fn read(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        self.blocking(move |inner| {
            inner
                .file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| inner.read_error(offset, len, &e))?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let len = buf.len() as u64;
        self.blocking(move |inner| {
            inner
                .file
                .write_all_at(&buf, offset)
                .map_err(|e| inner.write_error(offset, len, &e))?;
            Ok(buf)
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.blocking(move |inner| {
            inner
                .write_zeroes(offset, length)
                .map_err(|e| inner.write_error(offset, length, &e))
        })
        .await
    }

    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        if self.inner.block_device {
            let mut out = Vec::new();
            push_extent(
                &mut out,
                offset,
                length.min(self.inner.caps.size - offset),
                false,
            );
            return Ok(out);
        }
        self.blocking(move |inner| inner.extents(offset, length))
            .await
    }

    async fn flush(&self) -> Result<()> {
        if self.inner.caps.read_only {
            return Ok(());
        }
        self.blocking(|inner| {
            inner
                .file
                .sync_data()
                .map_err(|e| inner.write_error(0, 0, &e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holes_and_data_are_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let path = path.to_str().unwrap();
        let ep = FileEndpoint::open(
            path,
            Access::Write {
                create_size: 8 << 20,
            },
        )
        .await
        .unwrap();
        ep.write(2 << 20, vec![7u8; 1 << 20]).await.unwrap();
        let map = ep.extents(0, 8 << 20).await.unwrap();
        assert_eq!(
            map,
            vec![
                Extent {
                    offset: 0,
                    length: 2 << 20,
                    zero: true
                },
                Extent {
                    offset: 2 << 20,
                    length: 1 << 20,
                    zero: false
                },
                Extent {
                    offset: 3 << 20,
                    length: 5 << 20,
                    zero: true
                },
            ]
        );
        ep.write_zeroes(2 << 20, 1 << 20).await.unwrap();
        let back = ep.read(2 << 20, vec![1u8; 4096]).await.unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(ep.extents(0, 8 << 20).await.unwrap().iter().all(|e| e.zero));
    }

    #[tokio::test]
    async fn missing_file_is_a_connect_error() {
        let err = FileEndpoint::open("/nonexistent/dir/x.raw", Access::Read)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, MoverError::Connect { .. }), "{err}");
    }
}
