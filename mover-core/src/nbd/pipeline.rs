//! One connection's request pipeline: many requests in flight on one socket, replies read
//! straight into the callers' buffers.
//!
//! A `Conn` is one socket. Its write half sits behind an async mutex: a request takes the lock
//! just long enough to send its header and payload with one vectored write. Its read half
//! belongs to a reader task that decodes replies and hands each to the request waiting for its
//! handle, through a map of handle → `Slot` (holding a oneshot sender). A read request moves
//! its buffer into its slot; the reader task reads the data straight from the socket into it
//! (holes are zero-filled in place) and sends the buffer back with the reply, so a payload is
//! never copied between buffers, except the few KiB the reader's read-ahead already holds. The
//! map's mutex is only held to insert or take a slot, never across an await.
//!
//! When the connection fails (EOF, reset, a failed send), the reader task marks it lost and
//! hands every waiting request its buffer back with the loss; a request past its deadline gives
//! the connection up the same way (the socket is shut down, which also frees a send blocked on
//! a full socket). What happens next, a new connection and the requests sent again, is the
//! client's (`super::client`).

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::handshake::{self, ExportInfo, ReadStream, WriteStream};
use super::proto::{self, Descriptor, Malformed};
use super::uri::NbdUri;
use crate::error::Result;

/// Read-ahead of the reply stream. Reply headers come out of it; payloads larger than what it
/// holds are read from the socket directly into the request's buffer.
const READ_BUFFER: usize = 4 << 10;

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
pub(super) enum Loss {
    /// The socket failed; the requests are worth sending again on a new connection.
    Io(String),
    /// The server broke the protocol; sending again would not help.
    Protocol(String),
}

/// A request whose connection was lost before its reply, with its buffer handed back.
pub(super) struct Lost {
    pub(super) buf: Option<Vec<u8>>,
    pub(super) loss: Loss,
}

pub(super) type Outcome = std::result::Result<Reply, Lost>;

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
pub(super) struct Inflight {
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

    pub(super) fn is_lost(&self) -> bool {
        self.state().lost
    }

    /// Wait until every registered request is answered or the connection is lost.
    pub(super) async fn settle(&self) {
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
pub(super) struct Conn {
    pub(super) generation: u64,
    pub(super) info: ExportInfo,
    writer: Mutex<Writer>,
    pub(super) inflight: Arc<Inflight>,
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
    /// Dial the server `uri` names and enter transmission.
    pub(super) async fn open(uri: &NbdUri, name: &str, generation: u64) -> Result<Self> {
        let n = handshake::connect(uri, name).await?;
        let mut conn = Self::start(n.read, n.write, n.info, generation);
        conn.socket = Some(n.socket);
        Ok(conn)
    }

    /// Enter transmission on a socket that finished its handshake: start its reader task.
    pub(super) fn start(
        read: ReadStream,
        write: WriteStream,
        info: ExportInfo,
        generation: u64,
    ) -> Self {
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

    /// Register a request before it is sent: a read passes its buffer in `buf` (data lands at
    /// `buf[start..]`). Once the connection is lost the request is refused and `buf` handed back.
    pub(super) fn register(
        &self,
        handle: u64,
        cmd: &Command<'_>,
        buf: Option<Vec<u8>>,
        start: usize,
    ) -> std::result::Result<oneshot::Receiver<Outcome>, Option<Vec<u8>>> {
        let (tx, rx) = oneshot::channel();
        let slot = Slot {
            tx,
            command: cmd.command,
            offset: cmd.offset,
            length: cmd.length,
            buf,
            start,
            covered: 0,
            error: None,
            descriptors: Vec::new(),
            context: self.info.base_allocation,
        };
        match self.inflight.insert(handle, slot) {
            None => Ok(rx),
            Some(slot) => Err(slot.buf),
        }
    }

    /// Send a request registered as `handle` and wait for its outcome, both within the request
    /// deadline (a server that stops reading fills the socket, one that stops answering never
    /// replies). Past the deadline the connection is given up as lost: this request, and every
    /// other of the connection, is handed a loss naming it.
    pub(super) async fn exchange(
        &self,
        cmd: &Command<'_>,
        handle: u64,
        mut rx: oneshot::Receiver<Outcome>,
        request_timeout: Duration,
    ) -> std::result::Result<Outcome, oneshot::error::RecvError> {
        let header = proto::encode_request(&proto::Request {
            flags: cmd.flags,
            command: cmd.command,
            handle,
            offset: cmd.offset,
            length: cmd.length,
        });
        let unsent = Unsent {
            inflight: &self.inflight,
            handle,
        };
        let deadline = Instant::now() + request_timeout;
        let silent = || {
            Loss::Io(format!(
                "{} at offset {} ({} bytes): no reply within {:?}",
                proto::command_name(cmd.command),
                cmd.offset,
                cmd.length,
                request_timeout
            ))
        };
        let sent = tokio::time::timeout_at(deadline, self.send(&header, cmd.payload)).await;
        unsent.disarm();
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.abandon(&Loss::from(e)).await,
            Err(_) => self.abandon(&silent()).await,
        }
        if let Ok(outcome) = tokio::time::timeout_at(deadline, &mut rx).await {
            return outcome;
        }
        self.abandon(&silent()).await;
        rx.await
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
    pub(super) async fn disconnect(&self) {
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
