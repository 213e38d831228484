//! One NBD session: a connection that is replaced when it is lost, with the requests it had
//! not answered sent again.
//!
//! The session is made of the other layers: `super::handshake` dials and negotiates a
//! connection, `super::pipeline` carries many requests on it at once.
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

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::pipeline::{Conn, Loss, Lost};
use super::proto;
use super::uri::NbdUri;
use crate::error::{MoverError, Result};
use crate::progress::CancelToken;

pub use super::handshake::{BlockSize, ExportInfo};
pub use super::pipeline::{Command, Reply, ServerError};

/// First pause between reconnection attempts; doubled after each failure up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Longest wait in [`Client::close`] for the requests in flight to be answered.
pub const CLOSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How an NBD endpoint behaves beyond what its URI says.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// How long to keep trying to reconnect after the connection drops before requests fail
    /// with `MoverError::Connect`.
    pub reconnect_timeout: Duration,
    /// How long one connection attempt (connect and handshake) may take. A server at its
    /// client limit (`qemu-nbd --shared`) accepts the socket but never greets.
    pub connect_timeout: Duration,
    /// How long one request (sending it and its whole reply) may take. A server that stops
    /// answering (a stopped process, a hung storage backend) then costs this long, not
    /// forever: the request's connection is given up as lost, and the request is sent again on
    /// a new one within `reconnect_timeout`, or fails naming the request.
    pub request_timeout: Duration,
    /// The work this endpoint serves was cancelled: stop reconnecting at once, and fail the
    /// requests waiting for a connection with `MoverError::Cancelled` rather than after
    /// `reconnect_timeout`.
    pub cancel: Option<Arc<CancelToken>>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            reconnect_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            cancel: None,
        }
    }
}

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

    pub(super) fn with_connection(uri: NbdUri, name: &str, opts: NbdOptions, conn: Conn) -> Self {
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
        loop {
            let conn = self.connection()?;
            let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
            let rx = match conn.register(handle, cmd, buf.take(), start) {
                Ok(rx) => rx,
                Err(refused) => {
                    buf = refused;
                    self.reconnect(conn.generation, "connection lost").await?;
                    continue;
                }
            };
            let outcome = conn
                .exchange(cmd, handle, rx, self.opts.request_timeout)
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
    /// ([`NbdOptions::cancel`]): then `MoverError::Cancelled`, so a
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
