//! mover-core: the data plane of the mover that moves `VMware` disks into `CloudStack` and backs them up.
//!
//! Everything that touches disk bytes at volume goes through this crate:
//!
//! - [`endpoint`]: one interface ([`endpoint::Endpoint`]) over NBD exports, raw files and block
//!   devices and QCOW2 images, with capability queries (size, multi-conn, extents, fast zeroing);
//! - [`open`]: an endpoint from its specification (a URI or a path; QCOW2 routed by its magic),
//!   the one module that knows every kind;
//! - [`nbd`]: a native NBD client (fixed newstyle, `NBD_OPT_GO`, structured replies, block
//!   status) over TCP and Unix sockets;
//! - [`qcow2`]: QCOW2 images read natively (v2/v3, backing chains of any depth, zero and
//!   compressed clusters) and written (standalone or as an overlay);
//! - [`manifest`]: BLAKE3 digests per chunk of the logical disk, stored beside each image;
//! - [`chain`]: backup chains — checksum and verify against manifests, crash-safe
//!   consolidation (synthetic fulls, merging the oldest increment), chain info;
//! - [`plan`]: which byte ranges a copy covers (all, allocated-only, or an explicit CBT list);
//! - [`copy`]: the copy engine — workers owning their connections and buffers, many requests
//!   in flight, zero runs sent as zero commands, progress counters, cancellation, checkpoints.
//!
//! The Python binding lives in `py/` behind the `python` feature; nothing else here knows pyo3,
//! so `cargo test --no-default-features` runs without Python.

pub mod chain;
pub mod checkpoint;
pub mod copy;
pub mod endpoint;
pub mod error;
pub mod manifest;
pub mod nbd;
pub mod open;
pub mod plan;
pub mod progress;
pub mod qcow2;

pub use error::{MoverError, Result};

#[cfg(feature = "python")]
mod py;
