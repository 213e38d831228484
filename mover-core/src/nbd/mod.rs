//! A native NBD client as an [`Endpoint`].
//!
//! Layers, each in its own file:
//!
//! - [`uri`]: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`;
//! - [`proto`]: the wire format, pure functions over byte slices;
//! - `handshake`: dialling the server (socket options included) and negotiating the export;
//! - `pipeline`: one connection carrying many requests at once, replies read straight into
//!   the callers' buffers;
//! - [`client`]: one session with an export, made of those two: a lost connection replaced and
//!   the unfinished requests sent again;
//! - this module: [`NbdEndpoint`], which maps the endpoint interface onto NBD commands, splits
//!   requests larger than the server takes, and turns server errors into source read or target
//!   write errors carrying the errno value.
//!
//! Choices:
//!
//! - An export opened for writing that the server offers read-only opens fine (its
//!   capabilities say `read_only`); the first write fails with `TargetWrite` and `EPERM`
//!   without a round trip, as does any write through an endpoint opened with [`Access::Read`].
//!   An export's size is the server's: `Access::Write { create_size }` asks that it hold at
//!   least `create_size` bytes, and opening a smaller one fails with `InvalidEndpoint` before
//!   anything is written.
//! - `write_zeroes` sends `NBD_CMD_WRITE_ZEROES` without `NBD_CMD_FLAG_NO_HOLE`, so the server
//!   may deallocate. A server without the command, or one that answers it with `ENOTSUP`
//!   (remembered), gets zero buffers written instead.
//! - `another()` dials a new connection when the server allows multi-conn, else shares this
//!   one (which already carries many requests at once).
//! - An export reports `cheap_extents` when it offers `base:allocation` (a copy into it asks
//!   which ranges already read as zeros and sends no zero command there) and `flush_ahead`
//!   when it can be written and flushed (a copy flushes it as it goes, so that the server's
//!   write-back overlaps the copy).
//! - A server that does not advertise `NBD_FLAG_SEND_FLUSH` is never sent a flush; `flush`
//!   then succeeds without making anything durable, and `flush_durable` says so (`false`), so
//!   a copy into such a server reports `durable: false`.
//! - Every request has a deadline ([`NbdOptions::request_timeout`]), and so has every
//!   connection attempt ([`NbdOptions::connect_timeout`]): a server that stops answering fails
//!   the request, after the reconnection window, instead of hanging it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::endpoint::{push_extent, Access, Capabilities, Endpoint, Extent};
use crate::error::{MoverError, Result};

pub mod client;
mod handshake;
mod pipeline;
pub mod proto;
pub mod uri;

#[cfg(test)]
mod tests;

pub use client::NbdOptions;
use client::{Client, Command, ServerError};
use uri::NbdUri;

/// Largest request sent when the server states no maximum block size (and the cap on what it
/// states): the common server limit.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Largest zeroing, trim or block status request: these carry no payload, so they may be far
/// larger than a read or write, within the 32-bit length field.
const MAX_EFFECT_REQUEST: u64 = 1 << 30;

/// Largest zero buffer written when the server cannot zero by itself.
const ZERO_BUFFER: u64 = 4 << 20;

pub struct NbdEndpoint {
    spec: String,
    access: Access,
    opts: NbdOptions,
    caps: Capabilities,
    client: Arc<Client>,
    /// The server refused `NBD_CMD_WRITE_ZEROES` once: write zero buffers from then on.
    zeroes_unsupported: Arc<AtomicBool>,
}

impl NbdEndpoint {
    pub async fn open(spec: &str, access: Access) -> Result<Self> {
        Self::open_with(spec, access, NbdOptions::default()).await
    }

    pub async fn open_with(spec: &str, access: Access, opts: NbdOptions) -> Result<Self> {
        let uri = NbdUri::parse(spec)?;
        let client = Client::connect(uri, spec, opts.clone()).await?;
        let info = client.info();
        if let Access::Write { create_size } = access {
            if create_size > info.size {
                return Err(MoverError::InvalidEndpoint {
                    spec: spec.to_owned(),
                    reason: format!(
                        "the export holds {} bytes, {create_size} are to be written",
                        info.size
                    ),
                });
            }
        }
        let max_request = info
            .block_size
            .map_or(MAX_REQUEST, |b| b.maximum.min(MAX_REQUEST));
        let caps = Capabilities {
            size: info.size,
            read_only: access == Access::Read || info.has(proto::TFLAG_READ_ONLY),
            multi_conn: info.has(proto::TFLAG_CAN_MULTI_CONN),
            extents: info.base_allocation.is_some(),
            cheap_extents: info.base_allocation.is_some(),
            flush_ahead: access != Access::Read
                && !info.has(proto::TFLAG_READ_ONLY)
                && info.has(proto::TFLAG_SEND_FLUSH),
            fast_zero: info.has(proto::TFLAG_SEND_WRITE_ZEROES),
            max_request: u64::from(max_request),
            // The server decides how much it serves at once.
            max_in_flight: usize::MAX,
        };
        Ok(Self {
            spec: spec.to_owned(),
            access,
            opts,
            caps,
            client: Arc::new(client),
            zeroes_unsupported: Arc::new(AtomicBool::new(false)),
        })
    }

    /// What the handshake agreed (block sizes, transmission flags).
    #[must_use]
    pub fn export_info(&self) -> &client::ExportInfo {
        self.client.info()
    }

    /// How many times a lost connection was replaced (shared by handles that share it).
    #[must_use]
    pub fn reconnections(&self) -> u64 {
        self.client.reconnections()
    }

    fn refuse_write(&self, offset: u64, length: u64) -> Result<()> {
        if !self.caps.read_only {
            return Ok(());
        }
        let why = if self.access == Access::Read {
            "opened for reading"
        } else {
            "the export is read-only"
        };
        Err(MoverError::target_write(
            offset,
            length,
            Some(libc::EPERM.unsigned_abs()),
            format!("{}: {why}", self.spec),
        ))
    }

    fn server_error(&self, e: &ServerError, command: &str) -> (Option<u32>, String) {
        let code = proto::errno(e.code);
        let errno = i32::try_from(code).unwrap_or(libc::EINVAL);
        let mut message = format!(
            "{}: {command} failed: {}",
            self.spec,
            std::io::Error::from_raw_os_error(errno)
        );
        if !e.message.is_empty() {
            message.push_str(": ");
            message.push_str(&e.message);
        }
        (Some(code), message)
    }

    /// Send a command that changes the disk (write, zero, trim, flush) and map its failure.
    async fn modify(&self, cmd: &Command<'_>, what: &str) -> Result<()> {
        let reply = self.client.call(cmd, None, 0).await?;
        match reply.error {
            None => Ok(()),
            Some(e) => {
                let (code, message) = self.server_error(&e, what);
                Err(MoverError::target_write(
                    e.offset.unwrap_or(cmd.offset),
                    u64::from(cmd.length),
                    code,
                    message,
                ))
            }
        }
    }

    /// Send a payload-free command that changes a range (zero, trim), in pieces its 32-bit
    /// length field takes.
    async fn over_range(&self, command: u16, what: &str, offset: u64, length: u64) -> Result<()> {
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (end - pos).min(MAX_EFFECT_REQUEST) as u32;
            let cmd = Command {
                command,
                flags: 0,
                offset: pos,
                length: n,
                payload: &[],
            };
            self.modify(&cmd, what).await?;
            pos += u64::from(n);
        }
        Ok(())
    }

    /// Tell the server that `length` bytes at `offset` are no longer needed
    /// (`NBD_CMD_TRIM`). What they read as afterwards is up to the server; without trim
    /// support this does nothing, which is always allowed.
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.refuse_write(offset, length)?;
        if !self.client.info().has(proto::TFLAG_SEND_TRIM) {
            return Ok(());
        }
        self.over_range(proto::CMD_TRIM, "NBD_CMD_TRIM", offset, length)
            .await
    }

    async fn write_zero_buffers(&self, offset: u64, length: u64) -> Result<()> {
        let chunk = length.min(ZERO_BUFFER).min(self.caps.max_request);
        let mut zeros = vec![0u8; chunk as usize];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (end - pos).min(chunk) as usize;
            zeros.truncate(n);
            zeros = self.write(pos, zeros).await?;
            pos += n as u64;
        }
        Ok(())
    }
}

#[async_trait]
impl Endpoint for NbdEndpoint {
    fn name(&self) -> &str {
        &self.spec
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn another(&self) -> Result<Arc<dyn Endpoint>> {
        if self.caps.multi_conn {
            return Ok(Arc::new(
                Self::open_with(&self.spec, self.access, self.opts.clone()).await?,
            ));
        }
        Ok(Arc::new(Self {
            spec: self.spec.clone(),
            access: self.access,
            opts: self.opts.clone(),
            caps: self.caps.clone(),
            client: Arc::clone(&self.client),
            zeroes_unsupported: Arc::clone(&self.zeroes_unsupported),
        }))
    }

    async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let mut buf = Some(buf);
        let len = buf.as_ref().map_or(0, Vec::len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.caps.max_request as usize);
            let cmd = Command {
                command: proto::CMD_READ,
                flags: 0,
                offset: offset + done as u64,
                length: n as u32,
                payload: &[],
            };
            let reply = self.client.call(&cmd, buf.take(), done).await?;
            if let Some(e) = reply.error {
                let (code, message) = self.server_error(&e, "NBD_CMD_READ");
                return Err(MoverError::source_read(
                    e.offset.unwrap_or(cmd.offset),
                    n as u64,
                    code,
                    message,
                ));
            }
            buf = reply.buf;
            done += n;
        }
        Ok(buf.expect("the buffer comes back with each reply"))
    }

    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.refuse_write(offset, buf.len() as u64)?;
        for (i, part) in buf.chunks(self.caps.max_request as usize).enumerate() {
            let cmd = Command {
                command: proto::CMD_WRITE,
                flags: 0,
                offset: offset + (i as u64) * self.caps.max_request,
                length: part.len() as u32,
                payload: part,
            };
            self.modify(&cmd, "NBD_CMD_WRITE").await?;
        }
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.refuse_write(offset, length)?;
        if self.caps.fast_zero && !self.zeroes_unsupported.load(Ordering::Relaxed) {
            let zeroed = self
                .over_range(
                    proto::CMD_WRITE_ZEROES,
                    "NBD_CMD_WRITE_ZEROES",
                    offset,
                    length,
                )
                .await;
            match zeroed {
                Err(MoverError::TargetWrite {
                    code: Some(code), ..
                }) if code == libc::EOPNOTSUPP.unsigned_abs() => {
                    self.zeroes_unsupported.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.write_zero_buffers(offset, length).await
    }

    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.caps.size);
        let mut out = Vec::new();
        if !self.caps.extents {
            push_extent(&mut out, offset, end.saturating_sub(offset), false);
            return Ok(out);
        }
        let mut pos = offset;
        while pos < end {
            let cmd = Command {
                command: proto::CMD_BLOCK_STATUS,
                flags: 0,
                offset: pos,
                length: (end - pos).min(MAX_EFFECT_REQUEST) as u32,
                payload: &[],
            };
            let reply = self.client.call(&cmd, None, 0).await?;
            if let Some(e) = reply.error {
                let (code, message) = self.server_error(&e, "NBD_CMD_BLOCK_STATUS");
                return Err(MoverError::source_read(
                    pos,
                    u64::from(cmd.length),
                    code,
                    message,
                ));
            }
            if reply.descriptors.is_empty() {
                return Err(MoverError::Protocol {
                    endpoint: self.spec.clone(),
                    message: format!("block status at {pos} without base:allocation runs"),
                });
            }
            for d in &reply.descriptors {
                let n = u64::from(d.length).min(end - pos);
                push_extent(&mut out, pos, n, d.flags & proto::STATE_ZERO != 0);
                pos += n;
                if pos >= end {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        self.flush_durable().await.map(drop)
    }

    /// `NBD_CMD_FLUSH`, acknowledged by the server: durable. A server that does not advertise
    /// `NBD_FLAG_SEND_FLUSH` must not be sent one, so nothing can be made durable: `false`.
    async fn flush_durable(&self) -> Result<bool> {
        if self.caps.read_only {
            // Nothing was written through this endpoint.
            return Ok(true);
        }
        if !self.client.info().has(proto::TFLAG_SEND_FLUSH) {
            return Ok(false);
        }
        let cmd = Command {
            command: proto::CMD_FLUSH,
            flags: 0,
            offset: 0,
            length: 0,
            payload: &[],
        };
        self.modify(&cmd, "NBD_CMD_FLUSH").await?;
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        self.client.close().await;
        Ok(())
    }
}
