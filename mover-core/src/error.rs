//! The one error type of the data plane.
//!
//! Every fallible function of the crate returns [`Result`]. The Python binding maps each variant
//! to one exception class of the hierarchy rooted at `MoverError` (see `py/errors.rs`), so the
//! variants are chosen by what a caller does about them, not by where they arise.

use std::io;

pub type Result<T, E = MoverError> = std::result::Result<T, E>;

/// The errno of an I/O error, as the error variants carry it (`code`).
pub(crate) fn errno(e: &io::Error) -> Option<u32> {
    e.raw_os_error().and_then(|c| u32::try_from(c).ok())
}

#[derive(Debug, thiserror::Error)]
pub enum MoverError {
    /// An endpoint specification (URI or path) that cannot be understood.
    #[error("invalid endpoint {spec:?}: {reason}")]
    InvalidEndpoint { spec: String, reason: String },

    /// The endpoint could not be reached or opened (refused, missing socket, missing file).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },

    /// The peer broke the protocol, or refused an option we need.
    #[error("protocol error with {endpoint}: {message}")]
    Protocol { endpoint: String, message: String },

    /// Reading the source failed at this range. `code` is the NBD error (an errno value) the
    /// server replied with, when the failure is a server reply.
    #[error("source read failed at offset {offset} length {length}: {message}")]
    SourceRead {
        offset: u64,
        length: u64,
        code: Option<u32>,
        message: String,
    },

    /// Writing, zeroing or flushing the target failed at this range.
    #[error("target write failed at offset {offset} length {length}: {message}")]
    TargetWrite {
        offset: u64,
        length: u64,
        code: Option<u32>,
        message: String,
    },

    /// The extent plan does not fit the disk (past the end, bad options): found before any byte
    /// is written.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),

    /// An image file is not in the format it claims, or is corrupt.
    #[error("bad image {path}: {message}")]
    Format { path: String, message: String },

    /// The caller cancelled the operation.
    #[error("cancelled")]
    Cancelled,

    /// Local I/O outside a read or write of disk data (checkpoint files, metadata).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl MoverError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub fn source_read(
        offset: u64,
        length: u64,
        code: Option<u32>,
        message: impl Into<String>,
    ) -> Self {
        Self::SourceRead {
            offset,
            length,
            code,
            message: message.into(),
        }
    }

    pub fn target_write(
        offset: u64,
        length: u64,
        code: Option<u32>,
        message: impl Into<String>,
    ) -> Self {
        Self::TargetWrite {
            offset,
            length,
            code,
            message: message.into(),
        }
    }

    /// The side of a failed data request, as the copy engine reports it: an endpoint's own error
    /// for a request (`Connect`, `Protocol`, `Io`) is re-labelled as a source read or target
    /// write failure of that range. Errors that already name their range are kept.
    #[must_use]
    pub fn on_source(self, offset: u64, length: u64) -> Self {
        match self {
            e @ (Self::SourceRead { .. } | Self::Cancelled | Self::InvalidPlan(_)) => e,
            other => Self::source_read(offset, length, None, other.to_string()),
        }
    }

    #[must_use]
    pub fn on_target(self, offset: u64, length: u64) -> Self {
        match self {
            e @ (Self::TargetWrite { .. } | Self::Cancelled | Self::InvalidPlan(_)) => e,
            other => Self::target_write(offset, length, None, other.to_string()),
        }
    }
}
