//! BLAKE3 manifests: what a disk image must contain, chunk by chunk.
//!
//! QCOW2 carries no checksums of its data, so every image the mover writes gets a manifest file
//! beside it ([`Manifest::path_for`]): the BLAKE3 digest of each fixed-size chunk of the
//! *logical* disk (1 MiB by default; the last chunk may be shorter) and a disk digest, the
//! BLAKE3 of the chunk digests concatenated in order. An all-zero chunk has the well-known digest
//! of that many zero bytes ([`zero_digest`]), so a sparse disk costs nothing to describe.
//!
//! # File format (version 1, little-endian; do not modify — make a new magic instead)
//!
//! ```text
//! offset  size          field
//!      0     8          magic "MVB3MF\0\x01" (the last two bytes are the version)
//!      8     8          chunk_size        power of two, 4 KiB ..= 1 GiB
//!     16     8          disk_size         bytes of the logical disk
//!     24     8          chunk_count       = ceil(disk_size / chunk_size)
//!     32    32          disk_digest       BLAKE3(digest[0] || ... || digest[n-1])
//!     64    32 * count  chunk digests
//! ```
//!
//! A manifest is written to a temporary name beside its final one, `fsync`ed, renamed over it and
//! the directory `fsync`ed: a reader sees the old manifest or the new one, never a torn one. On
//! load the disk digest is recomputed, so a damaged manifest file is caught.
//!
//! # Building one while copying
//!
//! [`ManifestBuilder`] is fed by the copy engine from any number of workers (it is `Sync`): a
//! write covering whole chunks is digested at once from the buffer being written
//! ([`ManifestBuilder::record`]); whole chunks written as zeros take the zero digest
//! ([`ManifestBuilder::record_zero`]). A chunk only partly covered by a request is marked stale;
//! when the pass is done, [`ManifestBuilder::complete`] re-reads the stale chunks through the
//! image just written (its whole chain) and digests them. [`ManifestBuilder::save`] (streamed)
//! and [`ManifestBuilder::to_manifest`] refuse to produce a manifest while a chunk is stale.
//! The builder keeps digests in pages allocated when a chunk first differs from its starting
//! digest, so memory follows the data written, not the size of the disk.
//!
//! An overlay's manifest describes the disk as seen through its chain: the builder starts from
//! the parent's manifest ([`ManifestBuilder::from_parent`]) and only the chunks written by the
//! incremental pass are digested again; unchanged data is never re-read.
//!
//! # Verification
//!
//! [`Manifest::diff`] compares two manifests, [`Manifest::verify`] re-reads a disk against a
//! manifest and [`Manifest::verify_chunks`] re-reads only some chunks (an audit's sample, the
//! chunks an incremental pass wrote); all name the exact chunks that differ.
//!
//! # Digesting an endpoint
//!
//! [`checksum_endpoint`] digests any source chunk by chunk with several workers in parallel
//! (each reads a chunk with a positioned read and digests it on its own thread). Chunks that the
//! source's allocation map reports wholly as zeros (holes, zero clusters, clusters no layer
//! allocates) take the known zero digest without being read: the map comes from the same
//! metadata every read goes through, so this is what a read would return, and a damaged table
//! that turns data into a hole still shows up as a chunk that differs.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use crate::endpoint::Endpoint;
use crate::error::{MoverError, Result};
use crate::plan;
use crate::progress::{CancelToken, Progress};

/// Version 1 manifests. A new layout gets a new magic.
pub const MAGIC_V1: [u8; 8] = *b"MVB3MF\x00\x01";
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// The fixed part of a manifest file, as laid out on disk (all integers little-endian).
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    chunk_size: [u8; 8],
    disk_size: [u8; 8],
    chunk_count: [u8; 8],
    disk_digest: Digest,
}

const HEADER_SIZE: usize = 64;
const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_SIZE);

impl RawHeader {
    fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.magic);
        b[8..16].copy_from_slice(&self.chunk_size);
        b[16..24].copy_from_slice(&self.disk_size);
        b[24..32].copy_from_slice(&self.chunk_count);
        b[32..64].copy_from_slice(&self.disk_digest);
        b
    }

    fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let f = |at: usize| -> [u8; 8] { b[at..at + 8].try_into().expect("8 bytes") };
        Self {
            magic: f(0),
            chunk_size: f(8),
            disk_size: f(16),
            chunk_count: f(24),
            disk_digest: b[32..64].try_into().expect("32 bytes"),
        }
    }
}

/// The digest of one chunk's bytes.
#[must_use]
pub fn chunk_digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// The digest of `len` zero bytes.
#[must_use]
pub fn zero_digest(len: u64) -> Digest {
    static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

fn check_geometry(disk_size: u64, chunk_size: u64) -> Result<()> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(MoverError::InvalidPlan(format!(
            "manifest chunk size {chunk_size} is not a power of two from 4 KiB to 1 GiB"
        )));
    }
    if disk_size.div_ceil(chunk_size) > usize::MAX as u64 / 32 {
        return Err(MoverError::InvalidPlan(format!(
            "disk of {disk_size} bytes has too many chunks"
        )));
    }
    Ok(())
}

/// One chunk whose contents are not what the manifest says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMismatch {
    pub index: u64,
    pub offset: u64,
    pub length: u64,
    pub expected: Digest,
    pub found: Digest,
}

impl std::fmt::Display for ChunkMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chunk {} (offset {}, {} bytes): expected {}, found {}",
            self.index,
            self.offset,
            self.length,
            blake3::Hash::from(self.expected).to_hex(),
            blake3::Hash::from(self.found).to_hex()
        )
    }
}

/// The digests of a disk, chunk by chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u64,
    disk_size: u64,
    digests: Vec<Digest>,
}

impl Manifest {
    /// The manifest of an all-zero disk.
    pub fn zero(disk_size: u64, chunk_size: u64) -> Result<Self> {
        check_geometry(disk_size, chunk_size)?;
        let count = disk_size.div_ceil(chunk_size);
        let full = zero_digest(chunk_size);
        let digests = (0..count)
            .map(|i| {
                let len = chunk_size.min(disk_size - i * chunk_size);
                if len == chunk_size {
                    full
                } else {
                    zero_digest(len)
                }
            })
            .collect();
        Ok(Self {
            chunk_size,
            disk_size,
            digests,
        })
    }

    /// A manifest from digests computed elsewhere (in parallel, say): one per chunk, in order.
    pub fn from_digests(disk_size: u64, chunk_size: u64, digests: Vec<Digest>) -> Result<Self> {
        check_geometry(disk_size, chunk_size)?;
        if digests.len() as u64 != disk_size.div_ceil(chunk_size) {
            return Err(MoverError::InvalidPlan(format!(
                "{} digests for a {disk_size}-byte disk in {chunk_size}-byte chunks",
                digests.len()
            )));
        }
        Ok(Self {
            chunk_size,
            disk_size,
            digests,
        })
    }

    /// Digest a whole disk, reading it chunk by chunk with `read(offset, buf)`.
    pub fn compute<F>(disk_size: u64, chunk_size: u64, mut read: F) -> Result<Self>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        let mut m = Self::zero(disk_size, chunk_size)?;
        let mut buf = vec![0u8; chunk_size as usize];
        for i in 0..m.chunk_count() {
            let (offset, len) = m.chunk_range(i);
            let part = &mut buf[..len as usize];
            read(offset, part)?;
            m.digests[i as usize] = chunk_digest(part);
        }
        Ok(m)
    }

    /// Where the manifest of `image` lives: `IMAGE.manifest` beside it.
    #[must_use]
    pub fn path_for(image: &Path) -> PathBuf {
        let mut name = image.as_os_str().to_owned();
        name.push(".manifest");
        PathBuf::from(name)
    }

    #[must_use]
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    #[must_use]
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Offset and length of chunk `index`.
    #[must_use]
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        let offset = index * self.chunk_size;
        (offset, self.chunk_size.min(self.disk_size - offset))
    }

    #[must_use]
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// BLAKE3 of the chunk digests in order.
    #[must_use]
    pub fn disk_digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        for d in &self.digests {
            h.update(d);
        }
        *h.finalize().as_bytes()
    }

    /// Chunks whose digests differ between two manifests of the same geometry; `self` is the
    /// expectation.
    pub fn diff(&self, other: &Self) -> Result<Vec<ChunkMismatch>> {
        if (self.chunk_size, self.disk_size) != (other.chunk_size, other.disk_size) {
            return Err(MoverError::InvalidPlan(format!(
                "manifests differ in geometry: {} bytes in {}-byte chunks against {} bytes in {}-byte chunks",
                self.disk_size, self.chunk_size, other.disk_size, other.chunk_size
            )));
        }
        Ok((0..self.chunk_count())
            .filter(|&i| self.digests[i as usize] != other.digests[i as usize])
            .map(|i| self.mismatch(i, other.digests[i as usize]))
            .collect())
    }

    /// Re-read the disk with `read(offset, buf)` and name every chunk that does not match.
    pub fn verify<F>(&self, read: F) -> Result<Vec<ChunkMismatch>>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        let all: Vec<u64> = (0..self.chunk_count()).collect();
        self.verify_chunks(&all, read)
    }

    /// Re-read only the chunks listed (a sample, or the chunks an incremental pass wrote) and
    /// name those that do not match.
    pub fn verify_chunks<F>(&self, chunks: &[u64], mut read: F) -> Result<Vec<ChunkMismatch>>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut bad = Vec::new();
        for &index in chunks {
            if index >= self.chunk_count() {
                return Err(MoverError::InvalidPlan(format!(
                    "chunk {index} is past the end of a {}-chunk manifest",
                    self.chunk_count()
                )));
            }
            let (offset, len) = self.chunk_range(index);
            let part = &mut buf[..len as usize];
            read(offset, part)?;
            let found = chunk_digest(part);
            if found != self.digests[index as usize] {
                bad.push(self.mismatch(index, found));
            }
        }
        Ok(bad)
    }

    fn mismatch(&self, index: u64, found: Digest) -> ChunkMismatch {
        let (offset, length) = self.chunk_range(index);
        ChunkMismatch {
            index,
            offset,
            length,
            expected: self.digests[index as usize],
            found,
        }
    }

    /// The file contents.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = RawHeader {
            magic: MAGIC_V1,
            chunk_size: self.chunk_size.to_le_bytes(),
            disk_size: self.disk_size.to_le_bytes(),
            chunk_count: self.chunk_count().to_le_bytes(),
            disk_digest: self.disk_digest(),
        };
        let mut b = Vec::with_capacity(HEADER_SIZE + self.digests.len() * 32);
        b.extend_from_slice(&header.to_bytes());
        for d in &self.digests {
            b.extend_from_slice(d);
        }
        b
    }

    /// Parse a manifest file's contents; `path` names it in errors.
    pub fn from_bytes(b: &[u8], path: &str) -> Result<Self> {
        let bad = |message: String| MoverError::Format {
            path: path.to_owned(),
            message,
        };
        let head: &[u8; HEADER_SIZE] = b
            .get(..HEADER_SIZE)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad("truncated manifest header".into()))?;
        let h = RawHeader::from_bytes(head);
        if h.magic != MAGIC_V1 {
            return Err(bad("not a version 1 BLAKE3 manifest (bad magic)".into()));
        }
        let chunk_size = u64::from_le_bytes(h.chunk_size);
        let disk_size = u64::from_le_bytes(h.disk_size);
        let count = u64::from_le_bytes(h.chunk_count);
        check_geometry(disk_size, chunk_size).map_err(|e| bad(e.to_string()))?;
        if count != disk_size.div_ceil(chunk_size) || (b.len() - HEADER_SIZE) as u64 != count * 32 {
            return Err(bad(format!(
                "{count} chunks and {} bytes do not fit a {disk_size}-byte disk",
                b.len()
            )));
        }
        let m = Self {
            chunk_size,
            disk_size,
            digests: b[HEADER_SIZE..]
                .chunks_exact(32)
                .map(|d| d.try_into().expect("32 bytes"))
                .collect(),
        };
        if m.disk_digest() != h.disk_digest {
            return Err(bad("disk digest does not match the chunk digests".into()));
        }
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let b = std::fs::read(path).map_err(|e| MoverError::io(format!("read {name}"), e))?;
        Self::from_bytes(&b, &name)
    }

    /// Write the manifest into `path` (created or truncated) and `fsync` it, in place: for a
    /// file that is itself a temporary, which the caller renames into place (see
    /// [`crate::chain`]); [`save`](Self::save) for anything else.
    pub fn write_synced(&self, path: &Path) -> Result<()> {
        let err = |what: &str, e| MoverError::io(format!("{what} {}", path.display()), e);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| err("create", e))?;
        f.write_all(&self.to_bytes()).map_err(|e| err("write", e))?;
        f.sync_all().map_err(|e| err("fsync", e))
    }

    /// Write the manifest to `path` atomically: temporary file, `fsync`, rename, `fsync` of the
    /// directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_atomically(path, |tmp| self.write_synced(tmp))
    }
}

/// Chunks per page of a builder's digests: 32 KiB of digests, 1 GiB of disk at 1 MiB chunks.
const PAGE: u64 = 1024;

/// What a chunk's digest is until something is recorded for it.
enum Base {
    /// A new disk: zeros everywhere.
    Zero,
    /// An overlay: the parent's digests for its first chunks, zeros past the parent's end.
    Parent(Vec<Digest>),
}

struct BuilderState {
    /// Digests by page of [`PAGE`] chunks; a page is allocated when a chunk in it first takes a
    /// digest other than its base one, so a sparse disk costs memory for its data only.
    pages: Vec<Option<Box<[Digest]>>>,
    /// Bit set of the chunks that must be read back.
    stale: Vec<u64>,
}

/// A manifest being built while a disk is written; see the module documentation.
///
/// Memory grows with the data written, not with the disk: digests live in pages allocated on
/// first use (a sparse 2 TiB disk needs a few pages), [`save`](Self::save) streams the file
/// instead of building it in memory, and only [`to_manifest`](Self::to_manifest) makes the
/// whole list.
pub struct ManifestBuilder {
    chunk_size: u64,
    disk_size: u64,
    count: u64,
    base: Base,
    /// Digest of a whole chunk of zeros, and of the (possibly short) last chunk of zeros.
    zero_full: Digest,
    zero_last: Digest,
    state: Mutex<BuilderState>,
}

impl ManifestBuilder {
    /// For a new disk that starts all zeros.
    pub fn new(disk_size: u64, chunk_size: u64) -> Result<Self> {
        Self::start(disk_size, chunk_size, Base::Zero)
    }

    /// For an overlay of `disk_size` bytes on a disk described by `parent`: unwritten chunks keep
    /// the parent's digests, chunks past the parent's end are zeros, and a chunk whose length
    /// changes with the disk size (the parent's last one) is stale.
    pub fn from_parent(parent: &Manifest, disk_size: u64) -> Result<Self> {
        let chunk = parent.chunk_size;
        let count = disk_size.div_ceil(chunk);
        let keep = (count as usize).min(parent.digests.len());
        let builder = Self::start(
            disk_size,
            chunk,
            Base::Parent(parent.digests[..keep].to_vec()),
        )?;
        if keep > 0 {
            let last = (keep - 1) as u64;
            if parent.chunk_range(last).1 != builder.chunk_len(last) {
                set_bit(&mut builder.lock().stale, last);
            }
        }
        Ok(builder)
    }

    fn start(disk_size: u64, chunk_size: u64, base: Base) -> Result<Self> {
        check_geometry(disk_size, chunk_size)?;
        let count = disk_size.div_ceil(chunk_size);
        let last_len = if count == 0 {
            chunk_size
        } else {
            disk_size - (count - 1) * chunk_size
        };
        Ok(Self {
            chunk_size,
            disk_size,
            count,
            base,
            zero_full: zero_digest(chunk_size),
            zero_last: zero_digest(last_len),
            state: Mutex::new(BuilderState {
                pages: (0..count.div_ceil(PAGE)).map(|_| None).collect(),
                stale: vec![0u64; count.div_ceil(64) as usize],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BuilderState> {
        self.state.lock().expect("manifest builder")
    }

    fn chunk_len(&self, index: u64) -> u64 {
        self.chunk_size
            .min(self.disk_size - index * self.chunk_size)
    }

    /// The digest of chunk `index` while nothing was recorded for it.
    fn base_digest(&self, index: u64) -> Digest {
        match &self.base {
            Base::Parent(d) if (index as usize) < d.len() => d[index as usize],
            _ if index + 1 == self.count => self.zero_last,
            _ => self.zero_full,
        }
    }

    fn digest_in(&self, st: &BuilderState, index: u64) -> Digest {
        st.pages[(index / PAGE) as usize]
            .as_ref()
            .map_or_else(|| self.base_digest(index), |p| p[(index % PAGE) as usize])
    }

    /// Chunk `index` now holds data with digest `d`.
    fn set(&self, st: &mut BuilderState, index: u64, d: Digest) {
        clear_bit(&mut st.stale, index);
        let page = (index / PAGE) as usize;
        if st.pages[page].is_none() {
            if d == self.base_digest(index) {
                return;
            }
            let first = page as u64 * PAGE;
            let filled: Box<[Digest]> = (first..(first + PAGE).min(self.count))
                .map(|i| self.base_digest(i))
                .collect();
            st.pages[page] = Some(filled);
        }
        if let Some(p) = st.pages[page].as_mut() {
            p[(index % PAGE) as usize] = d;
        }
    }

    /// Chunks of `[offset, offset + length)`: (index, start of the chunk's bytes in the range,
    /// whether the range covers the whole chunk).
    fn chunks(&self, offset: u64, length: u64) -> Vec<(u64, u64, bool)> {
        let end = (offset + length).min(self.disk_size);
        let mut out = Vec::new();
        let mut off = offset;
        while off < end {
            let index = off / self.chunk_size;
            let start = index * self.chunk_size;
            let chunk_end = start + self.chunk_len(index);
            let whole = off == start && end >= chunk_end;
            out.push((index, off - offset, whole));
            off = chunk_end.min(end);
        }
        out
    }

    /// `data` was written at `offset`: whole chunks are digested from it, partly covered ones
    /// become stale.
    pub fn record(&self, offset: u64, data: &[u8]) {
        for (index, start, whole) in self.chunks(offset, data.len() as u64) {
            if whole {
                let s = start as usize;
                let d = chunk_digest(&data[s..s + self.chunk_len(index) as usize]);
                let mut st = self.lock();
                self.set(&mut st, index, d);
            } else {
                set_bit(&mut self.lock().stale, index);
            }
        }
    }

    /// `[offset, offset + length)` was made zero.
    pub fn record_zero(&self, offset: u64, length: u64) {
        for (index, _, whole) in self.chunks(offset, length) {
            let mut st = self.lock();
            if whole {
                let d = if index + 1 == self.count {
                    self.zero_last
                } else {
                    self.zero_full
                };
                self.set(&mut st, index, d);
            } else {
                set_bit(&mut st.stale, index);
            }
        }
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.count
    }

    /// Offset and length of chunk `index`.
    #[must_use]
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        (index * self.chunk_size, self.chunk_len(index))
    }

    /// `[offset, offset + length)` was written by other means (a copy resumed from a
    /// checkpoint): every chunk it touches must be read back.
    pub fn invalidate(&self, offset: u64, length: u64) {
        if length == 0 || offset >= self.disk_size {
            return;
        }
        let first = offset / self.chunk_size;
        let last = ((offset + length).min(self.disk_size) - 1) / self.chunk_size;
        let mut st = self.lock();
        for index in first..=last {
            set_bit(&mut st.stale, index);
        }
    }

    /// Chunks that must still be read back before the manifest is complete.
    #[must_use]
    pub fn stale_chunks(&self) -> Vec<u64> {
        let st = self.lock();
        let mut out = Vec::new();
        for (w, &word) in st.stale.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Digest the stale chunks by reading them with `read(offset, buf)` from the written image
    /// (through its whole chain).
    pub fn complete<F>(&self, mut read: F) -> Result<()>
    where
        F: FnMut(u64, &mut [u8]) -> Result<()>,
    {
        let mut buf = vec![0u8; self.chunk_size as usize];
        for index in self.stale_chunks() {
            let part = &mut buf[..self.chunk_len(index) as usize];
            read(index * self.chunk_size, part)?;
            let d = chunk_digest(part);
            let mut st = self.lock();
            self.set(&mut st, index, d);
        }
        Ok(())
    }

    /// The error while a chunk is stale.
    fn check_complete(st: &BuilderState) -> Result<()> {
        match st.stale.iter().position(|&w| w != 0) {
            None => Ok(()),
            Some(w) => Err(MoverError::InvalidPlan(format!(
                "manifest chunk {} was partly written and not read back",
                w as u64 * 64 + u64::from(st.stale[w].trailing_zeros())
            ))),
        }
    }

    /// The disk digest of the manifest as it stands; an error while chunks are stale.
    pub fn disk_digest(&self) -> Result<Digest> {
        let st = self.lock();
        Self::check_complete(&st)?;
        let mut h = blake3::Hasher::new();
        for i in 0..self.count {
            h.update(&self.digest_in(&st, i));
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Write the manifest to `path` atomically (as [`Manifest::save`] does) without building
    /// it in memory; returns its disk digest. An error while chunks are stale.
    pub fn save(&self, path: &Path) -> Result<Digest> {
        let disk_digest = self.disk_digest()?;
        let header = RawHeader {
            magic: MAGIC_V1,
            chunk_size: self.chunk_size.to_le_bytes(),
            disk_size: self.disk_size.to_le_bytes(),
            chunk_count: self.count.to_le_bytes(),
            disk_digest,
        };
        save_atomically(path, |tmp| {
            let err = |what: &str, e| MoverError::io(format!("{what} {}", tmp.display()), e);
            let f = File::create(tmp).map_err(|e| err("create", e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&header.to_bytes())
                .map_err(|e| err("write", e))?;
            let st = self.lock();
            for i in 0..self.count {
                w.write_all(&self.digest_in(&st, i))
                    .map_err(|e| err("write", e))?;
            }
            drop(st);
            let f = w.into_inner().map_err(|e| err("write", e.into_error()))?;
            f.sync_all().map_err(|e| err("fsync", e))
        })?;
        Ok(disk_digest)
    }

    /// The manifest as it stands, as one list in memory; an error while chunks are stale.
    pub fn to_manifest(&self) -> Result<Manifest> {
        let st = self.lock();
        Self::check_complete(&st)?;
        Ok(Manifest {
            chunk_size: self.chunk_size,
            disk_size: self.disk_size,
            digests: (0..self.count).map(|i| self.digest_in(&st, i)).collect(),
        })
    }
}

/// Chunks read and digested at once by a checksum or a verification.
pub const DEFAULT_WORKERS: usize = 8;

/// Which chunks must be read: those touched by a data run of the allocation map.
async fn chunks_to_read(ep: &dyn Endpoint, chunk_size: u64) -> Result<Vec<bool>> {
    let size = ep.capabilities().size;
    let count = size.div_ceil(chunk_size) as usize;
    if !ep.capabilities().extents {
        return Ok(vec![true; count]);
    }
    let mut read = vec![false; count];
    for e in plan::allocation_map(ep).await? {
        if !e.zero && e.length > 0 {
            for c in e.offset / chunk_size..=(e.end() - 1) / chunk_size {
                read[c as usize] = true;
            }
        }
    }
    Ok(read)
}

/// Digest every chunk of `ep`'s disk, several chunks at once; see the module documentation.
pub async fn checksum_endpoint(
    ep: &Arc<dyn Endpoint>,
    chunk_size: u64,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<Manifest> {
    let size = ep.capabilities().size;
    let zero = Manifest::zero(size, chunk_size)?;
    let read = chunks_to_read(&**ep, chunk_size).await?;
    let pending: Arc<Vec<u64>> = Arc::new(
        (0..read.len() as u64)
            .filter(|&i| read[i as usize])
            .collect(),
    );
    let skipped: u64 = (0..zero.chunk_count())
        .filter(|&i| !read[i as usize])
        .map(|i| zero.chunk_range(i).1)
        .sum();
    // A fresh start of the counters: consolidation runs a copy and then this on one tracker.
    for counter in [
        &progress.bytes_read,
        &progress.bytes_written,
        &progress.bytes_zeroed,
        &progress.bytes_resumed,
        &progress.extents_done,
    ] {
        counter.store(0, Ordering::Relaxed);
    }
    progress.bytes_planned.store(size, Ordering::Relaxed);
    progress
        .extents_total
        .store(zero.chunk_count(), Ordering::Relaxed);
    progress.start();
    Progress::add(&progress.bytes_zeroed, skipped);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..DEFAULT_WORKERS.min(pending.len().max(1)) {
        let handle = if ep.capabilities().multi_conn {
            ep.another().await?
        } else {
            Arc::clone(ep)
        };
        let (pending, next, progress, cancel) = (
            Arc::clone(&pending),
            Arc::clone(&next),
            Arc::clone(progress),
            Arc::clone(cancel),
        );
        tasks.spawn(async move {
            let mut out: Vec<(u64, Digest)> = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            loop {
                if cancel.is_cancelled() {
                    return Err(MoverError::Cancelled);
                }
                let Some(&index) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let offset = index * chunk_size;
                let length = chunk_size.min(size - offset);
                buf.resize(length as usize, 0);
                buf = handle
                    .read(offset, buf)
                    .await
                    .map_err(|e| e.on_source(offset, length))?;
                out.push((index, chunk_digest(&buf)));
                Progress::add(&progress.bytes_read, length);
                Progress::add(&progress.extents_done, 1);
            }
            Ok(out)
        });
    }
    let mut digests: Vec<Digest> = zero.digests().to_vec();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(part)) => {
                for (i, d) in part {
                    digests[i as usize] = d;
                }
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                cancel.cancel();
            }
            Err(e) => {
                failure.get_or_insert(MoverError::io("checksum worker", std::io::Error::other(e)));
            }
        }
    }
    progress.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    Manifest::from_digests(size, chunk_size, digests)
}

fn set_bit(bits: &mut [u64], i: u64) {
    bits[(i / 64) as usize] |= 1 << (i % 64);
}

fn clear_bit(bits: &mut [u64], i: u64) {
    bits[(i / 64) as usize] &= !(1 << (i % 64));
}

/// Write a file through `write(tmp)` under a temporary name beside `path`, then rename it into
/// place and `fsync` the directory. `write` must `fsync` the file.
fn save_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.display().to_string();
    let err = |what: &str, e| MoverError::io(format!("{what} {name}"), e);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| MoverError::InvalidPlan(format!("{name} is not a file path")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write(&tmp)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| err("atomic rename of", e)));
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("fsync the directory of", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i * 31 % 253) as u8).collect()
    }

    fn read_from(d: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<()> + '_ {
        move |off, buf| {
            let o = off as usize;
            buf.copy_from_slice(&d[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn zero_manifest_uses_the_zero_digest() {
        let m = Manifest::zero(10 << 20 | 4096, 1 << 20).unwrap();
        assert_eq!(m.chunk_count(), 11);
        assert_eq!(
            m.digests()[0],
            *blake3::hash(&vec![0u8; 1 << 20]).as_bytes()
        );
        assert_eq!(m.digests()[10], *blake3::hash(&[0u8; 4096]).as_bytes());
        let data = vec![0u8; (10 << 20) + 4096];
        let computed = Manifest::compute(data.len() as u64, 1 << 20, read_from(&data)).unwrap();
        assert_eq!(computed, m);
    }

    #[test]
    fn file_round_trips_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let data = disk(5 << 20);
        let m = Manifest::compute(data.len() as u64, 1 << 20, read_from(&data)).unwrap();
        let path = Manifest::path_for(&dir.path().join("disk.qcow2"));
        assert!(path.ends_with("disk.qcow2.manifest"));
        m.save(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_SIZE + 40] ^= 1;
        let err = Manifest::from_bytes(&bytes, "m").unwrap_err().to_string();
        assert!(err.contains("disk digest"), "{err}");
        bytes[0] = b'X';
        assert!(Manifest::from_bytes(&bytes, "m").is_err());
    }

    #[test]
    fn builder_digests_whole_chunks_and_reads_back_partial_ones() {
        let size = (4 << 20) + 12345;
        let mut d = vec![0u8; size];
        let b = ManifestBuilder::new(size as u64, 1 << 20).unwrap();
        let data = disk(3 << 20);
        d[(1 << 20)..(4 << 20)].copy_from_slice(&data);
        b.record(1 << 20, &data);
        let tail = disk(5000);
        d[(4 << 20) + 100..(4 << 20) + 5100].copy_from_slice(&tail);
        b.record((4 << 20) + 100, &tail);
        d[(2 << 20) + 7..(2 << 20) + 9].fill(0);
        b.record_zero((2 << 20) + 7, 2);
        assert_eq!(b.stale_chunks(), vec![2, 4]);
        b.complete(read_from(&d)).unwrap();
        let m = b.to_manifest().unwrap();
        let want = Manifest::compute(size as u64, 1 << 20, read_from(&d)).unwrap();
        assert_eq!(m, want);
    }

    #[test]
    fn a_sparse_disk_allocates_pages_only_where_data_is_and_saves_like_a_manifest() {
        let chunk = 64 << 10;
        let size = 3 * PAGE * chunk + 4096; // four pages, the last one short
        let b = ManifestBuilder::new(size, chunk).unwrap();
        let data = disk(chunk as usize);
        b.record(2 * PAGE * chunk + 5 * chunk, &data);
        b.record_zero(0, PAGE * chunk);
        b.record_zero(3 * PAGE * chunk, 4096);
        let pages = b.lock().pages.iter().filter(|p| p.is_some()).count();
        assert_eq!(pages, 1, "only the page holding data is allocated");
        assert!(b.stale_chunks().is_empty());
        let mut d = vec![0u8; size as usize];
        let at = (2 * PAGE * chunk + 5 * chunk) as usize;
        d[at..at + data.len()].copy_from_slice(&data);
        let want = Manifest::compute(size, chunk, read_from(&d)).unwrap();
        assert_eq!(b.to_manifest().unwrap(), want);
        assert_eq!(b.disk_digest().unwrap(), want.disk_digest());
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("a"), dir.path().join("b"));
        assert_eq!(b.save(&ours).unwrap(), want.disk_digest());
        want.save(&theirs).unwrap();
        assert_eq!(std::fs::read(ours).unwrap(), std::fs::read(theirs).unwrap());
        b.invalidate(chunk + 1, 1);
        assert_eq!(b.stale_chunks(), vec![1]);
        assert!(
            b.save(&dir.path().join("c")).is_err(),
            "stale chunks refuse to save"
        );
    }

    #[test]
    fn unfinished_chunks_refuse_to_finish() {
        let b = ManifestBuilder::new(2 << 20, 1 << 20).unwrap();
        b.record(10, &[1, 2, 3]);
        assert!(b.to_manifest().is_err());
    }

    #[test]
    fn derived_manifest_equals_a_fresh_one() {
        let mut d = disk((3 << 20) + 500);
        let parent = Manifest::compute(d.len() as u64, 1 << 20, read_from(&d)).unwrap();
        // The overlay is larger: the parent's short last chunk grows, new chunks are zeros.
        d.resize((5 << 20) + 100, 0);
        let b = ManifestBuilder::from_parent(&parent, d.len() as u64).unwrap();
        assert_eq!(b.stale_chunks(), vec![3]);
        let new = vec![9u8; 1 << 20];
        d[(1 << 20)..(2 << 20)].copy_from_slice(&new);
        b.record(1 << 20, &new);
        b.complete(read_from(&d)).unwrap();
        let derived = b.to_manifest().unwrap();
        let fresh = Manifest::compute(d.len() as u64, 1 << 20, read_from(&d)).unwrap();
        assert_eq!(derived, fresh);
        assert_eq!(derived.disk_digest(), fresh.disk_digest());
    }

    #[test]
    fn verification_names_the_chunk_that_differs() {
        let mut d = disk(4 << 20);
        let m = Manifest::compute(d.len() as u64, 1 << 20, read_from(&d)).unwrap();
        d[(2 << 20) + 77] ^= 0x40;
        let bad = m.verify(read_from(&d)).unwrap();
        assert_eq!(bad.len(), 1);
        assert_eq!(
            (bad[0].index, bad[0].offset, bad[0].length),
            (2, 2 << 20, 1 << 20)
        );
        assert!(bad[0].to_string().starts_with("chunk 2 (offset 2097152"));
        let sampled = m.verify_chunks(&[0, 2, 3], read_from(&d)).unwrap();
        assert_eq!(sampled, bad);
        assert!(m.verify_chunks(&[0, 1], read_from(&d)).unwrap().is_empty());
        assert!(m.verify_chunks(&[4], read_from(&d)).is_err());
        let other = Manifest::zero(4 << 20, 1 << 20).unwrap();
        assert_eq!(m.diff(&other).unwrap().len(), 4);
        assert!(m.diff(&Manifest::zero(4 << 20, 64 << 10).unwrap()).is_err());
    }
}
