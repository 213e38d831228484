//! Connecting to an NBD server and negotiating an export: the socket, its options, and the
//! handshake up to transmission.
//!
//! Fixed newstyle only. Options, in order: `NBD_OPT_STRUCTURED_REPLY`, then (when structured
//! replies were accepted) `NBD_OPT_SET_META_CONTEXT` for `base:allocation`, then `NBD_OPT_GO`
//! asking for `NBD_INFO_BLOCK_SIZE`. A server that does not know `NBD_OPT_GO` is served with
//! `NBD_OPT_EXPORT_NAME`. TCP sockets run with `TCP_NODELAY` and keepalive; Unix sockets get a
//! send buffer that takes a whole request.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::proto::{self, Malformed};
use super::uri::{Address, NbdUri};
use crate::error::{MoverError, Result};

/// TCP keepalive: first probe after this much silence, then every interval, giving up after
/// this many unanswered probes.
const KEEPALIVE_IDLE_SECS: libc::c_int = 10;
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 5;
const KEEPALIVE_PROBES: libc::c_int = 3;
/// Longest time sent data may stay unacknowledged before the connection counts as dead.
const UNACKED_TIMEOUT_MS: libc::c_int = 30_000;

/// Send buffer asked for on Unix sockets (see [`widen_send_buffer`]).
const UNIX_SEND_BUFFER: libc::c_int = 2 << 20;

pub(super) type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
pub(super) type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

/// What the handshake agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`proto::TFLAG_*`).
    pub flags: u16,
    pub structured_replies: bool,
    /// The id the server gave `base:allocation`, when negotiated.
    pub base_allocation: Option<u32>,
    pub block_size: Option<BlockSize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl ExportInfo {
    #[must_use]
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A socket that finished its handshake, split for transmission.
pub(super) struct Negotiated {
    pub(super) read: ReadStream,
    pub(super) write: WriteStream,
    pub(super) info: ExportInfo,
    /// The socket, open as long as `write` holds its half.
    pub(super) socket: RawFd,
}

/// Connect to the server `uri` names (`name` in errors) and negotiate its export.
pub(super) async fn connect(uri: &NbdUri, name: &str) -> Result<Negotiated> {
    let connect = |source| MoverError::Connect {
        endpoint: name.to_owned(),
        source,
    };
    let socket;
    let (read, write, info): (ReadStream, WriteStream, ExportInfo) = match &uri.address {
        Address::Tcp { host, port } => {
            let mut stream = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect)?;
            stream.set_nodelay(true).map_err(connect)?;
            keep_alive(&stream);
            let info = handshake(&mut stream, &uri.export, name).await?;
            socket = stream.as_raw_fd();
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w), info)
        }
        Address::Unix { path } => {
            let mut stream = UnixStream::connect(path).await.map_err(connect)?;
            widen_send_buffer(&stream);
            let info = handshake(&mut stream, &uri.export, name).await?;
            socket = stream.as_raw_fd();
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w), info)
        }
    };
    Ok(Negotiated {
        read,
        write,
        info,
        socket,
    })
}

/// Probe an idle TCP connection, and bound how long sent data may stay unacknowledged, so that
/// a peer that vanished without closing (a dead host, a dropped tunnel) is noticed within about
/// half a minute and the connection replaced, instead of requests waiting forever. Failing to set it only loses that, so it is not an error.
fn keep_alive(stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    for (level, option, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL_SECS,
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        (
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            UNACKED_TIMEOUT_MS,
        ),
    ] {
        set_int_option(fd, level, option, value);
    }
}

fn set_int_option(fd: RawFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on a descriptor owned by a live stream, with a pointer to a live
    // c_int and its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Let one write request of the usual sizes fit in the socket at once: a Unix socket's send
/// buffer (about 200 KiB by default) is otherwise smaller than a 256 KiB request, and each write
/// takes several system calls and wake-ups. The kernel caps the size at `net.core.wmem_max`;
/// failing to widen costs only speed, so it is not an error. TCP is left to the kernel's own
/// buffer tuning, which a fixed size would turn off.
fn widen_send_buffer(stream: &UnixStream) {
    set_int_option(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        UNIX_SEND_BUFFER,
    );
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

pub(super) async fn handshake<S>(s: &mut S, export: &str, name: &str) -> Result<ExportInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = Handshake { s, name };
    let mut greeting = [0u8; proto::GREETING_LEN];
    h.read(&mut greeting).await?;
    let flags = proto::parse_greeting(&greeting).map_err(|m| m.at(name))?;
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    h.write(&client_flags.to_be_bytes()).await?;

    let (reply, _) = h.option(proto::OPT_STRUCTURED_REPLY, &[]).await?;
    let structured_replies = reply == proto::REP_ACK;

    let mut base_allocation = None;
    if structured_replies {
        let data = proto::encode_set_meta_context(export, &[proto::BASE_ALLOCATION]);
        let (mut reply, mut payload) = h.option(proto::OPT_SET_META_CONTEXT, &data).await?;
        while reply == proto::REP_META_CONTEXT {
            let (id, context) = proto::parse_meta_context(&payload).map_err(|m| m.at(name))?;
            if context == proto::BASE_ALLOCATION {
                base_allocation = Some(id);
            }
            (reply, payload) = h.reply(proto::OPT_SET_META_CONTEXT).await?;
        }
    }

    let data = proto::encode_go(export, &[proto::INFO_BLOCK_SIZE]);
    let (mut reply, mut payload) = h.option(proto::OPT_GO, &data).await?;
    let mut export_info = None;
    let mut block_size = None;
    while reply == proto::REP_INFO {
        match proto::parse_info(&payload).map_err(|m| m.at(name))? {
            proto::Info::Export { size, flags } => export_info = Some((size, flags)),
            proto::Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                block_size = Some(BlockSize {
                    minimum,
                    preferred,
                    maximum,
                });
            }
            proto::Info::Other(_) => {}
        }
        (reply, payload) = h.reply(proto::OPT_GO).await?;
    }
    let (size, flags) = match reply {
        proto::REP_ACK => export_info.ok_or_else(|| {
            Malformed("NBD_OPT_GO succeeded without export information".into()).at(name)
        })?,
        proto::REP_ERR_UNSUP => h.export_name(export, no_zeroes).await?,
        proto::REP_ERR_UNKNOWN => {
            return Err(MoverError::Connect {
                endpoint: name.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the server has no export {export:?}{}",
                        server_message(&payload)
                    ),
                ),
            })
        }
        other => {
            return Err(Malformed(format!(
                "the server refused export {export:?}: {}{}",
                proto::option_error_name(other),
                server_message(&payload)
            ))
            .at(name))
        }
    };
    Ok(ExportInfo {
        size,
        flags,
        structured_replies,
        base_allocation,
        block_size,
    })
}

fn server_message(payload: &[u8]) -> String {
    if payload.is_empty() {
        String::new()
    } else {
        format!(" ({})", String::from_utf8_lossy(payload))
    }
}

struct Handshake<'a, S> {
    s: &'a mut S,
    name: &'a str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handshake<'_, S> {
    fn io_error(&self, source: io::Error) -> MoverError {
        MoverError::Connect {
            endpoint: self.name.to_owned(),
            source,
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.s.read_exact(buf).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.io_error(e)),
        }
    }

    async fn write(&mut self, buf: &[u8]) -> Result<()> {
        match self.s.write_all(buf).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_error(e)),
        }
    }

    /// Send an option and read its first reply.
    async fn option(&mut self, option: u32, data: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = Vec::with_capacity(16 + data.len());
        proto::encode_option(&mut out, option, data);
        self.write(&out).await?;
        self.reply(option).await
    }

    /// Read one reply to `option`: its type and payload.
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.read(&mut header).await?;
        let header = proto::parse_option_reply(&header, option).map_err(|m| m.at(self.name))?;
        let mut payload = vec![0u8; header.length as usize];
        self.read(&mut payload).await?;
        Ok((header.reply, payload))
    }

    /// The pre-`NBD_OPT_GO` way into transmission.
    async fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(u64, u16)> {
        let mut out = Vec::new();
        proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, export.as_bytes());
        self.write(&out).await?;
        let mut reply = [0u8; proto::EXPORT_NAME_REPLY_LEN];
        self.read(&mut reply).await?;
        if !no_zeroes {
            self.read(&mut [0u8; proto::EXPORT_NAME_ZEROES]).await?;
        }
        Ok(proto::parse_export_name_reply(&reply))
    }
}
