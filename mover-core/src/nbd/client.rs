//! One NBD session: handshake, many requests in flight, and reconnection.
//!
//! # Handshake
//!
//! Fixed newstyle only. Options, in order: `NBD_OPT_STRUCTURED_REPLY`, then (when structured
//! replies were accepted) `NBD_OPT_SET_META_CONTEXT` for `base:allocation`, then `NBD_OPT_GO`
//! asking for `NBD_INFO_BLOCK_SIZE`. A server that does not know `NBD_OPT_GO` is served with
//! `NBD_OPT_EXPORT_NAME`.
//!
//! # Transmission
//!
//! A `Conn` is one socket. Its write half sits behind an async mutex: a request takes the lock
//! just long enough to send its header and payload with one vectored write. Its read half
//! belongs to a reader task that decodes replies and hands each to the request waiting for its
//! handle, through a map of handle → `Slot` (holding a oneshot sender). A read request moves
//! its buffer into its slot; the reader task reads the data straight from the socket into it
//! (holes are zero-filled in place) and sends the buffer back with the reply, so a payload is
//! never copied between buffers, except the few KiB the reader's read-ahead already holds. The
//! map's mutex is only held to insert or take a slot, never across an await. TCP sockets run
//! with `TCP_NODELAY` and keepalive; Unix sockets get a send buffer that takes a whole request.
//!
//! # Reconnection
//!
//! When a connection fails (EOF, reset, a failed send), the reader task marks it lost and hands
//! every waiting request its buffer back with the loss. Each such request asks
//! `Client::reconnect` for a connection newer than the one it lost; the first one in dials
//! (exponential backoff from 100 ms to 5 s, each attempt within
//! [`NbdOptions::connect_timeout`], all within [`NbdOptions::reconnect_timeout`]) and the
//! others find the generation already moved on, so a drop seen by many requests costs one
//! reconnect. The requests are then sent again: reads and writes at fixed offsets are
//! idempotent. A request that keeps losing fresh connections (a server that hangs up on it, or
//! answers `ESHUTDOWN`) is re-sent with the same backoff and given up after the reconnection
//! timeout. Giving up, or [`Client::close`], leaves the client terminal: every later request
//! fails at once with `MoverError::Connect`.
//!
//! # Deadlines
//!
//! Nothing waits on the server without a bound. A connection attempt (connect and handshake)
//! has [`NbdOptions::connect_timeout`]; a request, from sending it to the last chunk of its
//! reply, has [`NbdOptions::request_timeout`]. A request past its deadline (a stopped server
//! process, a hung backend: the kernel still acknowledges the bytes, so TCP keepalive sees
//! nothing wrong) gives its connection up as lost: the socket is shut down, which also frees a
//! send blocked on a full socket, every request of the connection is handed the loss, naming
//! the command, offset and length that timed out, and they are sent again on a new connection
//! as above, all within the reconnection window. A server that keeps not answering therefore
//! fails the request after about two request timeouts plus the reconnection window.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::proto::{self, Descriptor, Malformed};
use super::uri::{Address, NbdUri};
use super::NbdOptions;
use crate::error::{MoverError, Result};

/// First pause between reconnection attempts; doubled after each failure up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Longest wait in [`Client::close`] for the requests in flight to be answered.
pub const CLOSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Read-ahead of the reply stream. Reply headers come out of it; payloads larger than what it
/// holds are read from the socket directly into the request's buffer.
const READ_BUFFER: usize = 4 << 10;

/// TCP keepalive: first probe after this much silence, then every interval, giving up after
/// this many unanswered probes.
const KEEPALIVE_IDLE_SECS: libc::c_int = 10;
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 5;
const KEEPALIVE_PROBES: libc::c_int = 3;
/// Longest time sent data may stay unacknowledged before the connection counts as dead.
const UNACKED_TIMEOUT_MS: libc::c_int = 30_000;

/// Send buffer asked for on Unix sockets (see [`widen_send_buffer`]).
const UNIX_SEND_BUFFER: libc::c_int = 2 << 20;

type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

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

/// An error the server replied with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// The NBD error value.
    pub code: u32,
    pub message: String,
    /// Where the error lies, when the server said (`NBD_REPLY_TYPE_ERROR_OFFSET`).
    pub offset: Option<u64>,
}

/// A completed request.
#[derive(Debug)]
pub struct Reply {
    /// The read buffer, handed back.
    pub buf: Option<Vec<u8>>,
    pub error: Option<ServerError>,
    /// Block status runs for `base:allocation`.
    pub descriptors: Vec<Descriptor>,
}

/// A request as the transmission code sends it.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    /// Sent after the header (`NBD_CMD_WRITE`).
    pub payload: &'a [u8],
}

/// Why a connection stopped serving its requests.
#[derive(Clone, Debug)]
enum Loss {
    /// The socket failed; the requests are worth sending again on a new connection.
    Io(String),
    /// The server broke the protocol; sending again would not help.
    Protocol(String),
}

/// A request whose connection was lost before its reply, with its buffer handed back.
struct Lost {
    buf: Option<Vec<u8>>,
    loss: Loss,
}

type Outcome = std::result::Result<Reply, Lost>;

/// A request waiting for its reply.
struct Slot {
    tx: oneshot::Sender<Outcome>,
    command: u16,
    offset: u64,
    length: u32,
    /// Read data lands in `buf[start..start + length]`.
    buf: Option<Vec<u8>>,
    start: usize,
    /// Bytes of a read covered by data and hole chunks so far.
    covered: u64,
    error: Option<ServerError>,
    descriptors: Vec<Descriptor>,
    /// The `base:allocation` context id of this connection.
    context: Option<u32>,
}

impl Slot {
    fn complete(self) {
        let reply = Reply {
            buf: self.buf,
            error: self.error,
            descriptors: self.descriptors,
        };
        // The requester may have given up waiting; its reply is then of no use.
        let _ = self.tx.send(Ok(reply));
    }

    fn lose(self, loss: Loss) {
        let _ = self.tx.send(Err(Lost {
            buf: self.buf,
            loss,
        }));
    }
}

#[derive(Default)]
struct InflightState {
    lost: bool,
    slots: HashMap<u64, Slot>,
    /// Requests registered whose final reply has not been delivered (a slot whose reply is
    /// being read is out of `slots` but still counted).
    unanswered: usize,
}

/// The requests of one connection that still wait for their replies.
#[derive(Default)]
struct Inflight {
    state: SyncMutex<InflightState>,
    /// Signalled when the last unanswered request is answered, or the connection is lost.
    settled: Notify,
}

impl Inflight {
    fn state(&self) -> std::sync::MutexGuard<'_, InflightState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a request before it is sent. Once the connection is lost the slot is refused:
    /// handed back.
    fn insert(&self, handle: u64, slot: Slot) -> Option<Slot> {
        let mut state = self.state();
        if state.lost {
            return Some(slot);
        }
        state.slots.insert(handle, slot);
        state.unanswered += 1;
        None
    }

    /// Take a slot to deliver a reply chunk into it; it is then put back or answered.
    fn take(&self, handle: u64) -> Option<Slot> {
        self.state().slots.remove(&handle)
    }

    fn put_back(&self, handle: u64, slot: Slot) {
        let mut state = self.state();
        if state.lost {
            drop(state);
            slot.lose(Loss::Io("connection lost".into()));
        } else {
            state.slots.insert(handle, slot);
        }
    }

    /// A taken slot got its final reply.
    fn answered(&self) {
        let mut state = self.state();
        state.unanswered = state.unanswered.saturating_sub(1);
        if state.unanswered == 0 {
            self.settled.notify_waiters();
        }
    }

    /// A registered request will not be sent after all.
    fn withdraw(&self, handle: u64) {
        if self.take(handle).is_some() {
            self.answered();
        }
    }

    /// Mark the connection lost and hand every waiting request (and `held`, the one whose reply
    /// was being read) its loss.
    fn lose(&self, held: Option<Slot>, loss: &Loss) {
        let slots = {
            let mut state = self.state();
            state.lost = true;
            state.unanswered = 0;
            std::mem::take(&mut state.slots)
        };
        self.settled.notify_waiters();
        for slot in held.into_iter().chain(slots.into_values()) {
            slot.lose(loss.clone());
        }
    }

    fn is_lost(&self) -> bool {
        self.state().lost
    }

    /// Wait until every registered request is answered or the connection is lost.
    async fn settle(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state();
                if state.lost || state.unanswered == 0 {
                    return;
                }
            }
            notified.await;
        }
    }
}

struct Writer {
    stream: WriteStream,
    /// A send was interrupted (its future dropped) part-way: the stream is out of step.
    torn: bool,
}

/// One connection.
struct Conn {
    generation: u64,
    info: ExportInfo,
    writer: Mutex<Writer>,
    inflight: Arc<Inflight>,
    reader: JoinHandle<()>,
    /// The socket, to cut it off while a send or the reader is blocked on it (`None` for the
    /// in-memory pipes of the unit tests). Open as long as `writer` holds its half.
    socket: Option<RawFd>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    async fn open(uri: &NbdUri, name: &str, generation: u64) -> Result<Self> {
        let connect = |source| MoverError::Connect {
            endpoint: name.to_owned(),
            source,
        };
        let fd;
        let (read, write, info): (ReadStream, WriteStream, ExportInfo) = match &uri.address {
            Address::Tcp { host, port } => {
                let mut stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect)?;
                stream.set_nodelay(true).map_err(connect)?;
                keep_alive(&stream);
                let info = handshake(&mut stream, &uri.export, name).await?;
                fd = stream.as_raw_fd();
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w), info)
            }
            Address::Unix { path } => {
                let mut stream = UnixStream::connect(path).await.map_err(connect)?;
                widen_send_buffer(&stream);
                let info = handshake(&mut stream, &uri.export, name).await?;
                fd = stream.as_raw_fd();
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w), info)
            }
        };
        let mut conn = Self::start(read, write, info, generation);
        conn.socket = Some(fd);
        Ok(conn)
    }

    /// Enter transmission on a socket that finished its handshake: start its reader task.
    fn start(read: ReadStream, write: WriteStream, info: ExportInfo, generation: u64) -> Self {
        let inflight = Arc::new(Inflight::default());
        let reader = tokio::spawn(read_replies(
            BufReader::with_capacity(READ_BUFFER, read),
            Arc::clone(&inflight),
        ));
        Self {
            generation,
            info,
            writer: Mutex::new(Writer {
                stream: write,
                torn: false,
            }),
            inflight,
            reader,
            socket: None,
        }
    }

    /// Send a request header and its payload.
    async fn send(
        &self,
        header: &[u8; proto::REQUEST_HEADER_LEN],
        payload: &[u8],
    ) -> io::Result<()> {
        let mut w = self.writer.lock().await;
        if w.torn {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was left, or an earlier request abandoned half-sent",
            ));
        }
        w.torn = true;
        write_all_vectored(&mut w.stream, header, payload).await?;
        w.torn = false;
        Ok(())
    }

    /// Give up on a connection whose sending failed or whose server stopped answering: its
    /// requests are handed their loss, and the socket is shut down both ways, which fails a
    /// send blocked on it and ends the reader task (whose request being read, if any, is then
    /// handed the loss too). Without a socket (a unit test's pipe), shutting down our side
    /// makes the peer close.
    async fn abandon(&self, loss: &Loss) {
        self.inflight.lose(None, loss);
        match self.socket {
            Some(fd) => {
                // SAFETY: the descriptor stays open while `self.writer` holds its half; a
                // shutdown only changes the state of the connection, never of the descriptor.
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
            }
            None => {
                let _ = self.writer.lock().await.stream.shutdown().await;
            }
        }
    }

    /// Leave this connection with `NBD_CMD_DISC` (a soft disconnect). The server still answers
    /// the requests in flight before it closes, and the reader task delivers those replies;
    /// anything sent after the disconnect fails and goes to the next connection.
    async fn disconnect(&self) {
        let mut w = self.writer.lock().await;
        if !w.torn {
            let header = proto::encode_request(&proto::Request {
                flags: 0,
                command: proto::CMD_DISC,
                handle: 0,
                offset: 0,
                length: 0,
            });
            let _ = write_all_vectored(&mut w.stream, &header, &[]).await;
            let _ = w.stream.shutdown().await;
            w.torn = true;
        }
    }
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

fn set_int_option(
    fd: std::os::unix::io::RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) {
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

async fn write_all_vectored(w: &mut WriteStream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let (mut h, mut p) = (0, 0);
    while h < header.len() || p < payload.len() {
        let n = if h < header.len() {
            w.write_vectored(&[IoSlice::new(&header[h..]), IoSlice::new(&payload[p..])])
                .await?
        } else {
            w.write(&payload[p..]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let into_header = n.min(header.len() - h);
        h += into_header;
        p += n - into_header;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

async fn handshake<S>(s: &mut S, export: &str, name: &str) -> Result<ExportInfo>
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

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// The reader task of a connection: decode replies until the connection fails.
async fn read_replies(mut r: BufReader<ReadStream>, inflight: Arc<Inflight>) {
    let mut held = None;
    let loss = loop {
        if let Err(loss) = read_reply(&mut r, &inflight, &mut held).await {
            break loss;
        }
    };
    inflight.lose(held.map(|(_, slot)| slot), &loss);
}

impl From<io::Error> for Loss {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Io("the server closed the connection".into())
        } else {
            Self::Io(e.to_string())
        }
    }
}

impl From<Malformed> for Loss {
    fn from(m: Malformed) -> Self {
        Self::Protocol(m.0)
    }
}

fn violation<T>(message: String) -> std::result::Result<T, Loss> {
    Err(Loss::Protocol(message))
}

/// Read one simple reply or structured reply chunk and deliver it. While its payload is read
/// the request's slot is out of the map, in `held`, so a failure can still hand it back.
async fn read_reply(
    r: &mut BufReader<ReadStream>,
    inflight: &Inflight,
    held: &mut Option<(u64, Slot)>,
) -> std::result::Result<(), Loss> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).await?;
    match proto::parse_reply_magic(magic)? {
        proto::ReplyKind::Simple => {
            let mut rest = [0u8; proto::SIMPLE_REST_LEN];
            r.read_exact(&mut rest).await?;
            let (error, handle) = proto::parse_simple_reply(&rest);
            let Some(slot) = inflight.take(handle) else {
                return violation(format!("simple reply for unknown handle {handle}"));
            };
            let (_, slot) = held.insert((handle, slot));
            if error != 0 {
                slot.error = Some(ServerError {
                    code: error,
                    message: String::new(),
                    offset: None,
                });
            } else if let Some(buf) = &mut slot.buf {
                let start = slot.start;
                r.read_exact(&mut buf[start..start + slot.length as usize])
                    .await?;
                slot.covered = u64::from(slot.length);
            }
            let (_, slot) = held.take().expect("held above");
            let delivered = finish(slot);
            inflight.answered();
            delivered
        }
        proto::ReplyKind::Structured => {
            let mut rest = [0u8; proto::STRUCTURED_REST_LEN];
            r.read_exact(&mut rest).await?;
            let chunk = proto::parse_chunk_header(&rest)?;
            let Some(slot) = inflight.take(chunk.handle) else {
                return violation(format!("reply chunk for unknown handle {}", chunk.handle));
            };
            let (_, slot) = held.insert((chunk.handle, slot));
            read_chunk(r, &chunk, slot).await?;
            let (handle, slot) = held.take().expect("held above");
            if chunk.done() {
                let delivered = finish(slot);
                inflight.answered();
                delivered
            } else {
                inflight.put_back(handle, slot);
                Ok(())
            }
        }
    }
}

/// Deliver a completed reply, checking that a successful read was covered in full.
fn finish(slot: Slot) -> std::result::Result<(), Loss> {
    if slot.command == proto::CMD_READ
        && slot.error.is_none()
        && slot.covered != u64::from(slot.length)
    {
        let message = format!(
            "read of {} bytes at {} answered with {} bytes",
            slot.length, slot.offset, slot.covered
        );
        slot.lose(Loss::Protocol(message.clone()));
        return violation(message);
    }
    slot.complete();
    Ok(())
}

async fn read_payload(
    r: &mut BufReader<ReadStream>,
    length: u32,
) -> std::result::Result<Vec<u8>, Loss> {
    let mut payload = vec![0u8; length as usize];
    r.read_exact(&mut payload).await?;
    Ok(payload)
}

async fn read_chunk(
    r: &mut BufReader<ReadStream>,
    chunk: &proto::ChunkHeader,
    slot: &mut Slot,
) -> std::result::Result<(), Loss> {
    let is_read = slot.command == proto::CMD_READ;
    match chunk.kind {
        proto::CHUNK_OFFSET_DATA if is_read => {
            if chunk.length <= proto::OFFSET_DATA_PREFIX {
                return violation(format!("data chunk of {} bytes", chunk.length));
            }
            let mut prefix = [0u8; 8];
            r.read_exact(&mut prefix).await?;
            let offset = proto::parse_offset_data_prefix(&prefix);
            let length = u64::from(chunk.length - proto::OFFSET_DATA_PREFIX);
            let at = proto::chunk_range(slot.offset, slot.length as usize, offset, length)?;
            let start = slot.start + at;
            let buf = slot.buf.as_mut().expect("reads carry a buffer");
            r.read_exact(&mut buf[start..start + length as usize])
                .await?;
            slot.covered += length;
        }
        proto::CHUNK_OFFSET_HOLE if is_read => {
            let payload = read_payload(r, chunk.length).await?;
            let (offset, length) = proto::parse_offset_hole(&payload)?;
            let at = proto::chunk_range(slot.offset, slot.length as usize, offset, length.into())?;
            let start = slot.start + at;
            let buf = slot.buf.as_mut().expect("reads carry a buffer");
            buf[start..start + length as usize].fill(0);
            slot.covered += u64::from(length);
        }
        proto::CHUNK_BLOCK_STATUS if slot.command == proto::CMD_BLOCK_STATUS => {
            let payload = read_payload(r, chunk.length).await?;
            let (id, descriptors) = proto::parse_block_status(&payload)?;
            if Some(id) == slot.context {
                slot.descriptors = descriptors;
            }
        }
        proto::CHUNK_NONE => {
            if chunk.length != 0 || !chunk.done() {
                return violation("NBD_REPLY_TYPE_NONE with a payload or not final".into());
            }
        }
        kind if kind & proto::CHUNK_ERROR_BIT != 0 => {
            let payload = read_payload(r, chunk.length).await?;
            let e = proto::parse_error_chunk(kind, &payload)?;
            slot.error.get_or_insert(ServerError {
                code: e.code,
                message: e.message,
                offset: e.offset,
            });
        }
        kind => {
            return violation(format!(
                "reply chunk of type {kind} to command {}",
                slot.command
            ))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// A session with one export that survives lost connections.
pub struct Client {
    uri: NbdUri,
    /// The endpoint's name in errors (its URI).
    name: String,
    opts: NbdOptions,
    /// What the first connection agreed; later connections must agree the same.
    info: ExportInfo,
    current: SyncMutex<Arc<Conn>>,
    /// Held while dialling, so one lost connection is replaced once.
    reconnecting: Mutex<()>,
    /// Set when the client is closed or gave up reconnecting: why it no longer works.
    terminal: SyncMutex<Option<String>>,
    next_handle: AtomicU64,
}

impl Client {
    pub async fn connect(uri: NbdUri, name: &str, opts: NbdOptions) -> Result<Self> {
        let conn = tokio::time::timeout(opts.connect_timeout, Conn::open(&uri, name, 0))
            .await
            .map_err(|_| MoverError::Connect {
                endpoint: name.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no NBD session within {:?} (a server at its client limit, or not an \
                         NBD server?)",
                        opts.connect_timeout
                    ),
                ),
            })??;
        Ok(Self::with_connection(uri, name, opts, conn))
    }

    fn with_connection(uri: NbdUri, name: &str, opts: NbdOptions, conn: Conn) -> Self {
        Self {
            uri,
            name: name.to_owned(),
            opts,
            info: conn.info.clone(),
            current: SyncMutex::new(Arc::new(conn)),
            reconnecting: Mutex::new(()),
            terminal: SyncMutex::new(None),
            next_handle: AtomicU64::new(1),
        }
    }

    #[must_use]
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// How many times a lost connection was replaced.
    #[must_use]
    pub fn reconnections(&self) -> u64 {
        self.current().generation
    }

    fn terminal(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.terminal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Arc<Conn> {
        Arc::clone(
            &self
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn not_connected(&self, why: &str) -> MoverError {
        MoverError::Connect {
            endpoint: self.name.clone(),
            source: io::Error::new(io::ErrorKind::NotConnected, why.to_owned()),
        }
    }

    /// The live connection, unless the client is closed or gave up.
    fn connection(&self) -> Result<Arc<Conn>> {
        if let Some(why) = self.terminal().as_deref() {
            return Err(self.not_connected(why));
        }
        Ok(self.current())
    }

    /// Send a request and wait for its reply, on a new connection if the current one is lost.
    /// A read passes its buffer in `buf` (data lands at `buf[start..]`) and gets it back in
    /// the reply.
    pub async fn call(
        &self,
        cmd: &Command<'_>,
        mut buf: Option<Vec<u8>>,
        start: usize,
    ) -> Result<Reply> {
        let buf_len = buf.as_ref().map(Vec::len);
        let mut failing_since: Option<Instant> = None;
        let mut pause = BACKOFF_START;
        let header_for = |handle| {
            proto::encode_request(&proto::Request {
                flags: cmd.flags,
                command: cmd.command,
                handle,
                offset: cmd.offset,
                length: cmd.length,
            })
        };
        loop {
            let conn = self.connection()?;
            let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            let slot = Slot {
                tx,
                command: cmd.command,
                offset: cmd.offset,
                length: cmd.length,
                buf: buf.take(),
                start,
                covered: 0,
                error: None,
                descriptors: Vec::new(),
                context: conn.info.base_allocation,
            };
            if let Some(slot) = conn.inflight.insert(handle, slot) {
                buf = slot.buf;
                self.reconnect(conn.generation, "connection lost").await?;
                continue;
            }
            let outcome = self
                .exchange(&conn, cmd, &header_for(handle), handle, rx)
                .await;
            let (cause, returned) = match outcome {
                Ok(Ok(reply)) if reply.error.as_ref().map(|e| e.code) == Some(proto::ESHUTDOWN) => {
                    // The server is going away: leave it politely and try its successor.
                    conn.disconnect().await;
                    ("the server is shutting down".to_owned(), reply.buf)
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(Lost {
                    loss: Loss::Protocol(message),
                    ..
                })) => {
                    return Err(MoverError::Protocol {
                        endpoint: self.name.clone(),
                        message,
                    })
                }
                Ok(Err(Lost {
                    buf,
                    loss: Loss::Io(cause),
                })) => (cause, buf),
                Err(_) => ("the reply reader stopped".to_owned(), None),
            };
            // A request that keeps losing fresh connections (a server that drops the connection
            // on this very request, or keeps shutting down) is sent again ever more slowly,
            // and not beyond the reconnection timeout.
            match failing_since {
                None => failing_since = Some(Instant::now()),
                Some(since) if since.elapsed() > self.opts.reconnect_timeout => {
                    return Err(MoverError::Connect {
                        endpoint: self.name.clone(),
                        source: io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!(
                                "{} at offset {} kept losing the connection for {:?}: {cause}",
                                proto::command_name(cmd.command),
                                cmd.offset,
                                self.opts.reconnect_timeout
                            ),
                        ),
                    });
                }
                Some(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(BACKOFF_CAP);
                }
            }
            buf = returned.or_else(|| buf_len.map(|n| vec![0u8; n]));
            self.reconnect(conn.generation, &cause).await?;
        }
    }

    /// Send a registered request on `conn` and wait for its outcome, both within the request
    /// deadline (a server that stops reading fills the socket, one that stops answering never
    /// replies). Past the deadline the connection is given up as lost: this request, and every
    /// other of the connection, is handed a loss naming it.
    async fn exchange(
        &self,
        conn: &Conn,
        cmd: &Command<'_>,
        header: &[u8; proto::REQUEST_HEADER_LEN],
        handle: u64,
        mut rx: oneshot::Receiver<Outcome>,
    ) -> std::result::Result<Outcome, oneshot::error::RecvError> {
        let unsent = Unsent {
            inflight: &conn.inflight,
            handle,
        };
        let deadline = Instant::now() + self.opts.request_timeout;
        let silent = || {
            Loss::Io(format!(
                "{} at offset {} ({} bytes): no reply within {:?}",
                proto::command_name(cmd.command),
                cmd.offset,
                cmd.length,
                self.opts.request_timeout
            ))
        };
        let sent = tokio::time::timeout_at(deadline, conn.send(header, cmd.payload)).await;
        unsent.disarm();
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => conn.abandon(&Loss::from(e)).await,
            Err(_) => conn.abandon(&silent()).await,
        }
        if let Ok(outcome) = tokio::time::timeout_at(deadline, &mut rx).await {
            return outcome;
        }
        conn.abandon(&silent()).await;
        rx.await
    }

    /// Replace connection `lost_generation` by a new one, unless another request already did.
    async fn reconnect(&self, lost_generation: u64, cause: &str) -> Result<()> {
        let _dialling = self.reconnecting.lock().await;
        if self.current().generation != lost_generation {
            return Ok(());
        }
        let deadline = Instant::now() + self.opts.reconnect_timeout;
        let mut pause = BACKOFF_START;
        loop {
            if let Some(why) = self.terminal().as_deref() {
                // Closed while dialling.
                return Err(self.not_connected(why));
            }
            let attempt = self
                .unless_cancelled(tokio::time::timeout_at(
                    deadline.min(Instant::now() + self.opts.connect_timeout),
                    Conn::open(&self.uri, &self.name, lost_generation + 1),
                ))
                .await?;
            let failure = match attempt {
                Ok(Ok(conn)) => {
                    if let Err(e) = self.check_same_export(&conn.info) {
                        *self.terminal() = Some(e.to_string());
                        return Err(e);
                    }
                    *self
                        .current
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(conn);
                    return Ok(());
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            let now = Instant::now();
            if now >= deadline {
                let why = format!(
                    "connection lost ({cause}); gave up reconnecting after {:?}: {failure}",
                    self.opts.reconnect_timeout
                );
                *self.terminal() = Some(why.clone());
                return Err(MoverError::Connect {
                    endpoint: self.name.clone(),
                    source: io::Error::new(io::ErrorKind::TimedOut, why),
                });
            }
            self.unless_cancelled(tokio::time::sleep(pause.min(deadline - now)))
                .await?;
            pause = (pause * 2).min(BACKOFF_CAP);
        }
    }

    /// `work`, unless the work this endpoint serves is cancelled first
    /// ([`NbdOptions::cancel`](super::NbdOptions::cancel)): then `MoverError::Cancelled`, so a
    /// cancelled copy does not wait out the reconnection window of a server that is gone.
    async fn unless_cancelled<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T> {
        match &self.opts.cancel {
            None => Ok(work.await),
            Some(token) => tokio::select! {
                out = work => Ok(out),
                () = token.cancelled() => Err(MoverError::Cancelled),
            },
        }
    }

    /// A new connection must serve the same disk the same way, or the requests sent again
    /// would mean something else.
    fn check_same_export(&self, info: &ExportInfo) -> Result<()> {
        let was = &self.info;
        let changed = if info.size != was.size {
            Some(format!("size changed from {} to {}", was.size, info.size))
        } else if info.has(proto::TFLAG_READ_ONLY) && !was.has(proto::TFLAG_READ_ONLY) {
            Some("the export became read-only".to_owned())
        } else if was.base_allocation.is_some() && info.base_allocation.is_none() {
            Some("base:allocation is no longer offered".to_owned())
        } else {
            None
        };
        match changed {
            Some(what) => Err(MoverError::Protocol {
                endpoint: self.name.clone(),
                message: format!("the export changed across a reconnection: {what}"),
            }),
            None => Ok(()),
        }
    }

    /// End the session: refuse new requests, let those in flight be answered (for at most
    /// [`CLOSE_SETTLE_TIMEOUT`]), then leave with `NBD_CMD_DISC`.
    pub async fn close(&self) {
        *self.terminal() = Some("the endpoint was closed".to_owned());
        let _dialling = self.reconnecting.lock().await;
        let conn = self.current();
        let _ = tokio::time::timeout(CLOSE_SETTLE_TIMEOUT, conn.inflight.settle()).await;
        if !conn.inflight.is_lost() {
            conn.disconnect().await;
        }
    }
}

/// Removes a registered request from the map if its sender is dropped before the request was
/// sent, so an abandoned request does not linger until the connection ends.
struct Unsent<'a> {
    inflight: &'a Inflight,
    handle: u64,
}

impl Unsent<'_> {
    /// The request went out (or its loss was recorded): its reply or loss will come.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.inflight.withdraw(self.handle);
    }
}

#[cfg(test)]
mod tests {
    //! The client against a scripted peer on an in-memory pipe: handshake variants and reply
    //! shapes that real servers do not produce on demand.

    use tokio::io::{duplex, DuplexStream};

    use super::*;

    const SIZE: u64 = 1 << 20;

    fn u16b(v: u16) -> [u8; 2] {
        v.to_be_bytes()
    }

    fn u32b(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    fn u64b(v: u64) -> [u8; 8] {
        v.to_be_bytes()
    }

    /// The server side of an option reply.
    fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
        let mut out = u64b(proto::OPTION_REPLY_MAGIC).to_vec();
        out.extend_from_slice(&u32b(option));
        out.extend_from_slice(&u32b(reply));
        out.extend_from_slice(&u32b(data.len() as u32));
        out.extend_from_slice(data);
        out
    }

    /// Read one option from the client: its number and data.
    async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
        let mut header = [0u8; 16];
        s.read_exact(&mut header).await.unwrap();
        assert_eq!(header[..8], u64b(proto::IHAVEOPT));
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(header[12..].try_into().unwrap()) as usize];
        s.read_exact(&mut data).await.unwrap();
        (option, data)
    }

    async fn greet(s: &mut DuplexStream, flags: u16) -> u32 {
        let mut greeting = u64b(proto::NBDMAGIC).to_vec();
        greeting.extend_from_slice(&u64b(proto::IHAVEOPT));
        greeting.extend_from_slice(&u16b(flags));
        s.write_all(&greeting).await.unwrap();
        let mut client_flags = [0u8; 4];
        s.read_exact(&mut client_flags).await.unwrap();
        u32::from_be_bytes(client_flags)
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut info = u16b(proto::INFO_EXPORT).to_vec();
        info.extend_from_slice(&u64b(size));
        info.extend_from_slice(&u16b(flags));
        info
    }

    #[tokio::test]
    async fn handshake_negotiates_everything_a_modern_server_offers() {
        let (mut ours, mut theirs) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            let flags = greet(
                &mut theirs,
                proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
            )
            .await;
            assert_eq!(
                flags,
                proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES
            );
            let (option, _) = read_option(&mut theirs).await;
            assert_eq!(option, proto::OPT_STRUCTURED_REPLY);
            theirs
                .write_all(&option_reply(option, proto::REP_ACK, &[]))
                .await
                .unwrap();
            let (option, data) = read_option(&mut theirs).await;
            assert_eq!(option, proto::OPT_SET_META_CONTEXT);
            assert_eq!(
                data,
                proto::encode_set_meta_context("disk", &[proto::BASE_ALLOCATION])
            );
            let mut context = u32b(3).to_vec();
            context.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
            theirs
                .write_all(&option_reply(option, proto::REP_META_CONTEXT, &context))
                .await
                .unwrap();
            theirs
                .write_all(&option_reply(option, proto::REP_ACK, &[]))
                .await
                .unwrap();
            let (option, data) = read_option(&mut theirs).await;
            assert_eq!(option, proto::OPT_GO);
            assert_eq!(data, proto::encode_go("disk", &[proto::INFO_BLOCK_SIZE]));
            let mut block = u16b(proto::INFO_BLOCK_SIZE).to_vec();
            for v in [512u32, 4096, 1 << 20] {
                block.extend_from_slice(&u32b(v));
            }
            let flags = proto::TFLAG_HAS_FLAGS | proto::TFLAG_CAN_MULTI_CONN;
            for reply in [
                option_reply(option, proto::REP_INFO, &block),
                option_reply(option, proto::REP_INFO, &[0, 1, b'x']),
                option_reply(option, proto::REP_INFO, &export_info(SIZE, flags)),
                option_reply(option, proto::REP_ACK, &[]),
            ] {
                theirs.write_all(&reply).await.unwrap();
            }
        });
        let info = handshake(&mut ours, "disk", "test").await.unwrap();
        server.await.unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: SIZE,
                flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_CAN_MULTI_CONN,
                structured_replies: true,
                base_allocation: Some(3),
                block_size: Some(BlockSize {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 20
                }),
            }
        );
    }

    #[tokio::test]
    async fn handshake_falls_back_to_export_name() {
        let (mut ours, mut theirs) = duplex(1 << 16);
        let server = tokio::spawn(async move {
            // No NO_ZEROES: the export name reply carries its 124 reserved bytes.
            let flags = greet(&mut theirs, proto::FLAG_FIXED_NEWSTYLE).await;
            assert_eq!(flags, proto::FLAG_C_FIXED_NEWSTYLE);
            loop {
                let (option, data) = read_option(&mut theirs).await;
                if option == proto::OPT_EXPORT_NAME {
                    assert_eq!(data, b"old");
                    let mut reply = u64b(SIZE).to_vec();
                    reply.extend_from_slice(&u16b(proto::TFLAG_HAS_FLAGS));
                    reply.extend_from_slice(&[0u8; proto::EXPORT_NAME_ZEROES]);
                    theirs.write_all(&reply).await.unwrap();
                    return;
                }
                theirs
                    .write_all(&option_reply(option, proto::REP_ERR_UNSUP, &[]))
                    .await
                    .unwrap();
            }
        });
        let info = handshake(&mut ours, "old", "test").await.unwrap();
        server.await.unwrap();
        assert_eq!(info.size, SIZE);
        assert!(!info.structured_replies);
        assert_eq!(info.base_allocation, None);
        assert_eq!(info.block_size, None);
    }

    #[tokio::test]
    async fn handshake_names_a_missing_export() {
        let (mut ours, mut theirs) = duplex(1 << 16);
        tokio::spawn(async move {
            greet(&mut theirs, proto::FLAG_FIXED_NEWSTYLE).await;
            loop {
                let (option, _) = read_option(&mut theirs).await;
                let reply = if option == proto::OPT_GO {
                    option_reply(option, proto::REP_ERR_UNKNOWN, b"no such thing")
                } else {
                    option_reply(option, proto::REP_ERR_UNSUP, &[])
                };
                theirs.write_all(&reply).await.unwrap();
            }
        });
        let err = handshake(&mut ours, "gone", "test").await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, MoverError::Connect { source, .. }
                if source.kind() == io::ErrorKind::NotFound),
            "{text}"
        );
        assert!(
            text.contains("\"gone\"") && text.contains("no such thing"),
            "{text}"
        );
    }

    /// A client whose connection is an in-memory pipe, and the server end of the pipe.
    fn piped_client(structured: bool, context: Option<u32>) -> (Client, DuplexStream) {
        let (ours, theirs) = duplex(1 << 20);
        let (r, w) = tokio::io::split(ours);
        let info = ExportInfo {
            size: SIZE,
            flags: proto::TFLAG_HAS_FLAGS,
            structured_replies: structured,
            base_allocation: context,
            block_size: None,
        };
        let conn = Conn::start(Box::new(r), Box::new(w), info, 0);
        let uri = NbdUri::parse("nbd+unix:///?socket=/nonexistent/nbd.sock").unwrap();
        let opts = NbdOptions {
            reconnect_timeout: Duration::ZERO,
            ..NbdOptions::default()
        };
        (Client::with_connection(uri, "test", opts, conn), theirs)
    }

    /// Read one request from the client: command, handle, offset, length (payload skipped).
    async fn read_request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
        let mut b = [0u8; proto::REQUEST_HEADER_LEN];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[..4], u32b(proto::REQUEST_MAGIC));
        let command = u16::from_be_bytes(b[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(b[16..24].try_into().unwrap());
        let length = u32::from_be_bytes(b[24..28].try_into().unwrap());
        if command == proto::CMD_WRITE {
            let mut payload = vec![0u8; length as usize];
            s.read_exact(&mut payload).await.unwrap();
        }
        (command, handle, offset, length)
    }

    fn chunk(done: bool, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = u32b(proto::STRUCTURED_REPLY_MAGIC).to_vec();
        out.extend_from_slice(&u16b(if done { proto::REPLY_FLAG_DONE } else { 0 }));
        out.extend_from_slice(&u16b(kind));
        out.extend_from_slice(&u64b(handle));
        out.extend_from_slice(&u32b(payload.len() as u32));
        out.extend_from_slice(payload);
        out
    }

    fn data_chunk(done: bool, handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut payload = u64b(offset).to_vec();
        payload.extend_from_slice(data);
        chunk(done, proto::CHUNK_OFFSET_DATA, handle, &payload)
    }

    fn hole_chunk(done: bool, handle: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut payload = u64b(offset).to_vec();
        payload.extend_from_slice(&u32b(length));
        chunk(done, proto::CHUNK_OFFSET_HOLE, handle, &payload)
    }

    fn read_command(offset: u64, length: u32) -> Command<'static> {
        Command {
            command: proto::CMD_READ,
            flags: 0,
            offset,
            length,
            payload: &[],
        }
    }

    #[tokio::test]
    async fn read_chunks_in_any_order_fill_the_buffer() {
        let (client, mut server) = piped_client(true, None);
        let peer = tokio::spawn(async move {
            let (command, handle, offset, length) = read_request(&mut server).await;
            assert_eq!((command, offset, length), (proto::CMD_READ, 4096, 12288));
            let replies = [
                data_chunk(false, handle, 12288, &[0xab; 4096]),
                hole_chunk(false, handle, 4096, 4096),
                data_chunk(true, handle, 8192, &[0xcd; 4096]),
            ];
            for reply in replies {
                server.write_all(&reply).await.unwrap();
            }
            server
        });
        // The data lands at `start` of a larger buffer; bytes around it are left alone.
        let reply = client
            .call(
                &read_command(4096, 12288),
                Some(vec![0xff; 12288 + 100]),
                100,
            )
            .await
            .unwrap();
        peer.await.unwrap();
        assert_eq!(reply.error, None);
        let buf = reply.buf.unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0xff));
        assert!(buf[100..4196].iter().all(|&b| b == 0));
        assert!(buf[4196..8292].iter().all(|&b| b == 0xcd));
        assert!(buf[8292..].iter().all(|&b| b == 0xab));
    }

    #[tokio::test]
    async fn error_chunks_become_server_errors() {
        let (client, mut server) = piped_client(true, None);
        let peer = tokio::spawn(async move {
            let (_, handle, _, _) = read_request(&mut server).await;
            let mut payload = u32b(proto::EIO).to_vec();
            payload.extend_from_slice(&u16b(3));
            payload.extend_from_slice(b"bad");
            payload.extend_from_slice(&u64b(5000));
            server
                .write_all(&data_chunk(false, handle, 4096, &[1; 512]))
                .await
                .unwrap();
            server
                .write_all(&chunk(true, proto::CHUNK_ERROR_OFFSET, handle, &payload))
                .await
                .unwrap();
            server
        });
        let reply = client
            .call(&read_command(4096, 4096), Some(vec![0; 4096]), 0)
            .await
            .unwrap();
        peer.await.unwrap();
        assert_eq!(
            reply.error,
            Some(ServerError {
                code: proto::EIO,
                message: "bad".into(),
                offset: Some(5000)
            })
        );
        assert!(
            reply.buf.is_some(),
            "the buffer comes back with an error too"
        );
    }

    #[tokio::test]
    async fn a_read_answered_in_part_is_a_protocol_error() {
        let (client, mut server) = piped_client(true, None);
        let peer = tokio::spawn(async move {
            let (_, handle, _, _) = read_request(&mut server).await;
            server
                .write_all(&data_chunk(true, handle, 0, &[1; 100]))
                .await
                .unwrap();
            server
        });
        let err = client
            .call(&read_command(0, 4096), Some(vec![0; 4096]), 0)
            .await
            .unwrap_err();
        let _server = peer.await.unwrap();
        assert!(
            matches!(&err, MoverError::Protocol { message, .. } if message.contains("100 bytes")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_data_chunk_outside_the_request_is_a_protocol_error() {
        let (client, mut server) = piped_client(true, None);
        let peer = tokio::spawn(async move {
            let (_, handle, _, _) = read_request(&mut server).await;
            server
                .write_all(&data_chunk(true, handle, 4000, &[1; 4096]))
                .await
                .unwrap();
            server
        });
        let err = client
            .call(&read_command(4096, 4096), Some(vec![0; 4096]), 0)
            .await
            .unwrap_err();
        let _server = peer.await.unwrap();
        assert!(matches!(err, MoverError::Protocol { .. }), "{err}");
    }

    #[tokio::test]
    async fn block_status_keeps_only_base_allocation() {
        let (client, mut server) = piped_client(true, Some(1));
        let peer = tokio::spawn(async move {
            let (command, handle, _, _) = read_request(&mut server).await;
            assert_eq!(command, proto::CMD_BLOCK_STATUS);
            for (done, id, flags) in [(false, 9, 0), (true, 1, proto::STATE_ZERO)] {
                let mut payload = u32b(id).to_vec();
                payload.extend_from_slice(&u32b(65536));
                payload.extend_from_slice(&u32b(flags));
                server
                    .write_all(&chunk(done, proto::CHUNK_BLOCK_STATUS, handle, &payload))
                    .await
                    .unwrap();
            }
            server
        });
        let cmd = Command {
            command: proto::CMD_BLOCK_STATUS,
            flags: 0,
            offset: 0,
            length: 65536,
            payload: &[],
        };
        let reply = client.call(&cmd, None, 0).await.unwrap();
        peer.await.unwrap();
        assert_eq!(
            reply.descriptors,
            vec![Descriptor {
                length: 65536,
                flags: proto::STATE_ZERO
            }]
        );
    }

    #[tokio::test]
    async fn simple_replies_complete_requests_out_of_order() {
        let (client, mut server) = piped_client(false, None);
        let peer = tokio::spawn(async move {
            let first = read_request(&mut server).await;
            let second = read_request(&mut server).await;
            let (write, read) = if first.0 == proto::CMD_WRITE {
                (first, second)
            } else {
                (second, first)
            };
            // The read is answered first, then the write fails with ENOSPC.
            let mut reply = u32b(proto::SIMPLE_REPLY_MAGIC).to_vec();
            reply.extend_from_slice(&u32b(0));
            reply.extend_from_slice(&u64b(read.1));
            reply.extend_from_slice(&[7; 512]);
            reply.extend_from_slice(&u32b(proto::SIMPLE_REPLY_MAGIC));
            reply.extend_from_slice(&u32b(proto::ENOSPC));
            reply.extend_from_slice(&u64b(write.1));
            server.write_all(&reply).await.unwrap();
            server
        });
        let payload = [1u8; 512];
        let write = Command {
            command: proto::CMD_WRITE,
            flags: 0,
            offset: 0,
            length: 512,
            payload: &payload,
        };
        let read = read_command(512, 512);
        let (written, read) = tokio::join!(
            client.call(&write, None, 0),
            client.call(&read, Some(vec![0; 512]), 0)
        );
        peer.await.unwrap();
        assert_eq!(written.unwrap().error.map(|e| e.code), Some(proto::ENOSPC));
        assert_eq!(read.unwrap().buf.unwrap(), vec![7; 512]);
    }

    #[tokio::test]
    async fn a_reply_for_an_unknown_handle_is_a_protocol_error() {
        let (client, mut server) = piped_client(false, None);
        let peer = tokio::spawn(async move {
            let (_, handle, _, _) = read_request(&mut server).await;
            let mut reply = u32b(proto::SIMPLE_REPLY_MAGIC).to_vec();
            reply.extend_from_slice(&u32b(0));
            reply.extend_from_slice(&u64b(handle + 1000));
            server.write_all(&reply).await.unwrap();
            server
        });
        let err = client
            .call(&read_command(0, 512), Some(vec![0; 512]), 0)
            .await
            .unwrap_err();
        let _server = peer.await.unwrap();
        assert!(
            matches!(&err, MoverError::Protocol { message, .. } if message.contains("unknown handle")),
            "{err}"
        );
    }
}
