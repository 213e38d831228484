//! Writing a new QCOW2 image: standalone, or an overlay on an existing image.
//!
//! [`Qcow2Writer::create`] makes a version 3 image with 16-bit refcounts. An overlay records its
//! backing file by a path relative to the overlay's directory, and the backing format in a header
//! extension, as `qemu-img create -b base -F fmt` does.
//!
//! # Layout
//!
//! ```text
//! cluster 0            header, header extensions, backing file name
//! clusters 1..         L1 table (sized for the whole virtual disk, never grows)
//! then                 refcount table, sized for twice the virtual disk; moved to the end of
//!                      the file if it ever runs short
//! then                 refcount block 0
//! then, in order of allocation: data clusters; at each flush the L2 tables and refcount blocks
//!                      that do not have a place yet
//! ```
//!
//! Host clusters are handed out by bumping the end of the file, so the clusters of one request,
//! and of requests arriving in guest order, are contiguous: a request becomes one `pwrite` per
//! run of host-contiguous clusters. Clusters are never freed and reused while the writer is open,
//! which keeps every on-disk reference valid whatever happens to the in-memory tables.
//!
//! # Metadata and consistency
//!
//! The L1 and L2 tables live in memory (one L2 table per cluster of L2 entries, allocated when
//! first touched) behind one mutex. Refcounts are not kept at all: [`Qcow2Writer::flush`]
//! recomputes them from the tables — every host cluster is referenced once — then writes the
//! refcount blocks, the refcount table, the L2 tables and the L1 table, `fdatasync`s, and rewrites
//! the header. The header carries the *dirty* incompatible bit from creation until the first flush
//! and again from the start of each later flush until its end: an image left by a crash in the
//! middle says so, and QEMU rebuilds its refcounts before use. After a flush the file is a
//! complete, clean image; [`Qcow2Writer::finish`] is the last flush. Writes after a flush leave
//! it a valid image until the next one: its tables still describe the flushed state, and the
//! clusters allocated since lie past them with refcount 0. As on a disk after a power cut, the
//! bytes of clusters the tables already knew may be as flushed or as written (or zeroed) since.
//!
//! Runs of data of 256 KiB or more are handed to the kernel for writeback as soon as they are
//! written (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while the copy goes on
//! and the final `fdatasync` has little left to do.
//!
//! # Writes
//!
//! For each guest cluster a write touches:
//!
//! - allocated here (data): written in place;
//! - whole cluster, not allocated (or zero-flagged without a host cluster): a new host cluster;
//! - part of a cluster, not allocated, no backing file: a new host cluster; the rest of it is a
//!   hole of the file and reads as zeros;
//! - part of a cluster that reads through the backing file, or is zero-flagged: copy-on-write —
//!   the whole cluster is built in memory from the backing chain (or zeros), patched, and written.
//!
//! Only copy-on-write does its I/O under the metadata lock (so no other write can land in that
//! cluster between the read of the old contents and the write of the new); all other data is
//! written after the lock is released, and concurrent writers to distinct clusters proceed in
//! parallel.
//!
//! Zero writes: a whole cluster becomes unallocated when there is no backing file (its host
//! cluster, if any, is punched out and left unreferenced) and zero-flagged when there is one
//! (keeping its host cluster, punched out too); a part of a cluster that does not already read as
//! zeros is written as zero bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::format::{self, Header, COPIED, INCOMPAT_DIRTY, OFFSET_MASK, ZERO};
use super::reader::{push_entry, Allocation, BackingFormat, MapEntry, Qcow2Chain};
use crate::error::{errno, MoverError, Result};

/// The cluster size used unless the caller asks for another.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
/// Data runs at least this long are pushed to the disk as soon as they are written.
const WRITEBACK_MIN: u64 = 256 << 10;
/// 16-bit refcounts, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// The backing file of an overlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    pub format: BackingFormat,
}

/// Where a piece of a read comes from.
#[derive(Clone, Copy)]
enum ReadFrom {
    Zeros,
    Backing,
    Host(u64),
}

struct L2Table {
    /// Host offset, 0 until the first flush that finds the table not empty.
    host: u64,
    entries: Box<[u64]>,
    dirty: bool,
}

struct Meta {
    header: Header,
    l2: Vec<Option<L2Table>>,
    /// End of the allocated part of the file: the next free host cluster.
    next_free: u64,
    /// Host offsets of the refcount blocks by index, 0 where none is placed yet.
    refcount_blocks: Vec<u64>,
    /// The header on disk is without the dirty bit.
    clean_on_disk: bool,
}

/// A QCOW2 image being written. All methods take `&self`: the writer is shared by every task
/// writing to it.
pub struct Qcow2Writer {
    path: String,
    file: File,
    cluster_bits: u32,
    size: u64,
    backing: Option<Qcow2Chain>,
    meta: Mutex<Meta>,
}

fn write_err(path: &str, offset: u64, length: u64, e: &std::io::Error) -> MoverError {
    MoverError::target_write(offset, length, errno(e), format!("{path}: {e}"))
}

/// `target` relative to the directory `base`, both absolute and free of `..`.
fn relative_path(base: &Path, target: &Path) -> PathBuf {
    let b: Vec<Component> = base.components().collect();
    let t: Vec<Component> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Open the backing chain of a new overlay at `path`, and name the backing file relative to the
/// overlay's directory.
fn open_backing(path: &Path, b: &Backing) -> Result<(Qcow2Chain, String)> {
    let name = path.display().to_string();
    let chain = Qcow2Chain::open_as(&b.path, b.format)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .map_err(|e| MoverError::io(format!("directory of {name}"), e))?;
    let target = b
        .path
        .canonicalize()
        .map_err(|e| MoverError::io(format!("backing file of {name}"), e))?;
    let rel = relative_path(&dir, &target);
    let rel = rel.to_str().ok_or_else(|| {
        MoverError::InvalidPlan(format!("backing path {} is not UTF-8", rel.display()))
    })?;
    Ok((chain, rel.to_owned()))
}

/// The header of a new image, with the layout of its first clusters: header, L1 table, then a
/// refcount table sized for twice the disk (block 0 follows it).
fn initial_header(
    size: u64,
    cluster_bits: u32,
    backing_file_offset: u64,
    backing_file_size: usize,
) -> Result<Header> {
    let cs = 1u64 << cluster_bits;
    let l1_entries = format::l1_entries(size, cluster_bits);
    let l1_size = u32::try_from(l1_entries).map_err(|_| {
        MoverError::InvalidPlan(format!(
            "disk of {size} bytes is too large for {cs}-byte clusters"
        ))
    })?;
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    let estimate = 2 * (1 + l1_clusters + size.div_ceil(cs) + l1_entries) + 16;
    let table_clusters = (estimate.div_ceil(per_block) * 8).div_ceil(cs).max(1);
    Ok(Header {
        version: 3,
        backing_file_offset,
        backing_file_size: backing_file_size as u32,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset: if l1_entries == 0 { 0 } else { cs },
        refcount_table_offset: cs + l1_clusters * cs,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: INCOMPAT_DIRTY,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: format::V3_HEADER_LENGTH as u32,
    })
}

/// The header of an image [`Qcow2Writer::create`] could have made, and the chain below it
/// (opened as the reader resolves it); `refuse` makes the error for anything else.
fn resumable(
    path: &Path,
    refuse: &dyn Fn(&str) -> MoverError,
) -> Result<(Header, Option<Qcow2Chain>)> {
    let chain = Qcow2Chain::open(path)?;
    let top = chain.top().ok_or_else(|| refuse("not a QCOW2 image"))?;
    let header = top.header().clone();
    let cs = 1u64 << header.cluster_bits;
    let l1_entries = format::l1_entries(header.size, header.cluster_bits);
    if header.version != 3
        || header.refcount_order != REFCOUNT_ORDER
        || header.header_length != format::V3_HEADER_LENGTH as u32
        || header.nb_snapshots != 0
        || header.incompatible_features & !INCOMPAT_DIRTY != 0
        || header.compatible_features != 0
        || header.autoclear_features != 0
        || u64::from(header.l1_size) != l1_entries
        || (l1_entries != 0 && header.l1_table_offset != cs)
    {
        return Err(refuse("it was not written by the mover"));
    }
    let backing = if chain.depth() > 1 {
        let format = if chain.layer_image(1).is_some() {
            BackingFormat::Qcow2
        } else {
            BackingFormat::Raw
        };
        Some(Qcow2Chain::open_as(Path::new(chain.layer_path(1)), format)?)
    } else {
        None
    };
    Ok((header, backing))
}

impl Qcow2Writer {
    /// Create a new image of `size` bytes (a multiple of 512, as QEMU requires) at `path`, which
    /// must not exist. `cluster_size` is a power of two from 512 B to 2 MiB. With `backing`, the
    /// image is an overlay whose unallocated clusters read from that file (its whole chain is
    /// opened, for reads and for copy-on-write).
    pub fn create(
        path: &Path,
        size: u64,
        cluster_size: u64,
        backing: Option<&Backing>,
    ) -> Result<Self> {
        let name = path.display().to_string();
        if !cluster_size.is_power_of_two()
            || !(1u64 << format::MIN_CLUSTER_BITS..=1u64 << format::MAX_CLUSTER_BITS)
                .contains(&cluster_size)
        {
            return Err(MoverError::InvalidPlan(format!(
                "cluster size {cluster_size} is not a power of two from 512 B to 2 MiB"
            )));
        }
        if !size.is_multiple_of(512) {
            return Err(MoverError::InvalidPlan(format!(
                "disk size {size} is not a multiple of 512 bytes"
            )));
        }
        let cluster_bits = cluster_size.trailing_zeros();

        let (chain, backing_name) = match backing {
            None => (None, None),
            Some(b) => {
                let (chain, rel) = open_backing(path, b)?;
                (Some(chain), Some((rel, b.format.as_str())))
            }
        };

        let ext = format::extensions_to_bytes(backing_name.as_ref().map(|(_, f)| *f));
        let name_bytes = backing_name.as_ref().map_or(&[][..], |(n, _)| n.as_bytes());
        let backing_offset = format::V3_HEADER_LENGTH + ext.len();
        if name_bytes.len() > format::MAX_BACKING_NAME
            || (backing_offset + name_bytes.len()) as u64 > cluster_size
        {
            return Err(MoverError::InvalidPlan(
                "backing file name does not fit in the image header".into(),
            ));
        }

        let backing_file_offset = if name_bytes.is_empty() {
            0
        } else {
            backing_offset as u64
        };
        let header = initial_header(size, cluster_bits, backing_file_offset, name_bytes.len())?;
        let l1_entries = u64::from(header.l1_size);
        let block0 =
            header.refcount_table_offset + u64::from(header.refcount_table_clusters) * cluster_size;
        let next_free = block0 + cluster_size;

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
            .map_err(|source| MoverError::Connect {
                endpoint: name.clone(),
                source,
            })?;
        let mut first = header.to_bytes();
        first.extend_from_slice(&ext);
        first.extend_from_slice(name_bytes);
        let werr = |e: std::io::Error| write_err(&name, 0, 0, &e);
        file.write_all_at(&first, 0).map_err(werr)?;
        file.set_len(next_free).map_err(werr)?;

        let writer = Self {
            path: name,
            file,
            cluster_bits,
            size,
            backing: chain,
            meta: Mutex::new(Meta {
                header,
                l2: (0..l1_entries).map(|_| None).collect(),
                next_free,
                refcount_blocks: vec![block0],
                clean_on_disk: false,
            }),
        };
        // A valid (empty, dirty) image from the start: refcount table and block 0.
        writer.write_refcounts(&writer.lock())?;
        Ok(writer)
    }

    /// Open an image an earlier, interrupted copy created with [`create`](Self::create), to
    /// continue writing into it (a copy resumed from its checkpoint).
    ///
    /// The tables are read back as the last flush left them: every cluster they name keeps its
    /// place, and new clusters are allocated past the end of the file, so whatever the
    /// interrupted run wrote after its last flush is never referenced by mistake. Refcounts are
    /// recomputed from the tables at the next flush, as always. An image this writer could not
    /// have made (another version, refcount width, header length, snapshots, compressed
    /// clusters, feature bits), or whose tables reference a cluster twice, is refused.
    pub fn open_to_resume(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let refuse = |why: &str| MoverError::Format {
            path: name.clone(),
            message: format!("cannot resume into this image: {why}"),
        };
        let (header, backing) = resumable(path, &refuse)?;
        let cluster_bits = header.cluster_bits;
        let cs = 1u64 << cluster_bits;
        let l1_entries = u64::from(header.l1_size);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MoverError::Connect {
                endpoint: name.clone(),
                source,
            })?;
        let read = |offset: u64, len: u64| -> Result<Vec<u64>> {
            let mut b = vec![0u8; len as usize];
            super::reader::read_fill(&file, &name, offset, &mut b)?;
            Ok(format::table_from_bytes(&b))
        };
        let mut l2 = Vec::with_capacity(l1_entries as usize);
        let mut end = header.l1_table_offset + (l1_entries * 8).div_ceil(cs) * cs;
        for raw in read(header.l1_table_offset, l1_entries * 8)? {
            let host = format::decode_l1(raw, cluster_bits, &name)?;
            if host == 0 {
                l2.push(None);
                continue;
            }
            let entries = read(host, cs)?;
            for &e in &entries {
                if e & format::COMPRESSED != 0 {
                    return Err(refuse("it holds compressed clusters"));
                }
                format::L2Entry::decode(e, cluster_bits, 3, &name)?;
                end = end.max((e & OFFSET_MASK) + cs);
            }
            end = end.max(host + cs);
            l2.push(Some(L2Table {
                host,
                entries: entries.into_boxed_slice(),
                dirty: false,
            }));
        }
        let table_clusters = u64::from(header.refcount_table_clusters);
        let mut refcount_blocks = read(header.refcount_table_offset, table_clusters * cs)?;
        let used = refcount_blocks
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        refcount_blocks.truncate(used);
        for b in &mut refcount_blocks {
            *b &= OFFSET_MASK;
            end = end.max(*b + cs);
        }
        end = end.max(header.refcount_table_offset + table_clusters * cs);
        let file_len = file
            .metadata()
            .map_err(|e| MoverError::io(format!("size of {name}"), e))?
            .len();
        let meta = Meta {
            clean_on_disk: header.incompatible_features & INCOMPAT_DIRTY == 0,
            header,
            l2,
            next_free: end.max(file_len.div_ceil(cs) * cs),
            refcount_blocks,
        };
        // Every cluster named once, none past the end: the tables are self-consistent.
        meta.refcounts(cs, &name)
            .map_err(|e| refuse(&e.to_string()))?;
        Ok(Self {
            path: name,
            file,
            cluster_bits,
            size: meta.header.size,
            backing,
            meta: Mutex::new(meta),
        })
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    #[must_use]
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The backing chain of an overlay.
    #[must_use]
    pub fn backing(&self) -> Option<&Qcow2Chain> {
        self.backing.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().expect("qcow2 metadata lock")
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(MoverError::target_write(
                offset,
                length,
                None,
                format!(
                    "{}: request past the end of the {}-byte disk",
                    self.path, self.size
                ),
            ));
        }
        Ok(())
    }

    fn pwrite(&self, host: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, host)
            .map_err(|e| write_err(&self.path, host, data.len() as u64, &e))
    }

    /// Bytes of guest cluster `index` (the last cluster may be short).
    fn cluster_len(&self, index: u64) -> u64 {
        self.cluster_size()
            .min(self.size - index * self.cluster_size())
    }

    /// Write all of `data` at guest `offset`. Blocking; callable from several threads at once.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let cs = self.cluster_size();
        // (host offset, start in data, end in data), host-contiguous runs merged.
        let mut ios: Vec<(u64, usize, usize)> = Vec::new();
        {
            let mut m = self.lock();
            let mut pos = 0usize;
            while pos < data.len() {
                let off = offset + pos as u64;
                let index = off / cs;
                let in_cluster = off % cs;
                let cl_len = self.cluster_len(index);
                let n = (cl_len - in_cluster).min((data.len() - pos) as u64) as usize;
                let full = in_cluster == 0 && n as u64 == cl_len;
                let raw = m.entry(index, self.cluster_bits);
                let host = raw & OFFSET_MASK;
                let zero = raw & ZERO != 0;
                let target = if host != 0 && (!zero || full) {
                    if zero {
                        m.set_entry(index, host | COPIED, self.cluster_bits);
                    }
                    Some(host)
                } else if host == 0 && (full || (!zero && self.backing.is_none())) {
                    let h = m.alloc(1, cs);
                    m.set_entry(index, h | COPIED, self.cluster_bits);
                    Some(h)
                } else {
                    let mut cluster = vec![0u8; cl_len as usize];
                    if let (false, Some(chain)) = (zero, &self.backing) {
                        chain.read_exact_at(index * cs, &mut cluster)?;
                    }
                    let start = in_cluster as usize;
                    cluster[start..start + n].copy_from_slice(&data[pos..pos + n]);
                    let h = if host == 0 { m.alloc(1, cs) } else { host };
                    self.pwrite(h, &cluster)?;
                    m.set_entry(index, h | COPIED, self.cluster_bits);
                    None
                };
                if let Some(h) = target {
                    let h = h + in_cluster;
                    match ios.last_mut() {
                        Some(last) if last.0 + (last.2 - last.1) as u64 == h && last.2 == pos => {
                            last.2 = pos + n;
                        }
                        _ => ios.push((h, pos, pos + n)),
                    }
                }
                pos += n;
            }
        }
        for (host, start, end) in ios {
            self.pwrite(host, &data[start..end])?;
            self.start_writeback(host, (end - start) as u64);
        }
        Ok(())
    }

    /// Ask the kernel to start writing a large run out now rather than at the next flush, so the
    /// final `fdatasync` finds little left to do. Best effort: it only changes timing.
    fn start_writeback(&self, host: u64, length: u64) {
        if length < WRITEBACK_MIN {
            return;
        }
        let (Ok(host), Ok(length)) = (
            libc::off64_t::try_from(host),
            libc::off64_t::try_from(length),
        ) else {
            return;
        };
        // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                host,
                length,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Make `[offset, offset + length)` read as zeros, deallocating whole clusters.
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.check_range(offset, length)?;
        let cs = self.cluster_size();
        let mut partial = Vec::new();
        {
            let mut m = self.lock();
            let end = offset + length;
            let mut off = offset;
            while off < end {
                let index = off / cs;
                let in_cluster = off % cs;
                let cl_len = self.cluster_len(index);
                let n = (cl_len - in_cluster).min(end - off);
                let raw = m.entry(index, self.cluster_bits);
                let host = raw & OFFSET_MASK;
                let zero = raw & ZERO != 0;
                if in_cluster == 0 && n == cl_len {
                    let new = match (&self.backing, host) {
                        (Some(_), 0) => ZERO,
                        (Some(_), h) => h | COPIED | ZERO,
                        (None, _) => 0,
                    };
                    if new != raw {
                        m.set_entry(index, new, self.cluster_bits);
                    }
                    if host != 0 && !zero {
                        self.punch(host, cs);
                    }
                } else if !(zero || (host == 0 && self.backing.is_none())) {
                    partial.push((off, n));
                }
                off += n;
            }
        }
        for (off, n) in partial {
            self.write_at(off, &vec![0u8; n as usize])?;
        }
        Ok(())
    }

    /// Give the bytes of a host cluster that no longer holds data back to the file system. Best
    /// effort: the tables already say the cluster reads as zeros.
    fn punch(&self, host: u64, length: u64) {
        let (Ok(host), Ok(length)) = (libc::off_t::try_from(host), libc::off_t::try_from(length))
        else {
            return;
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                host,
                length,
            );
        }
    }

    /// Read `buf.len()` bytes at guest `offset` as the image now stands.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(MoverError::source_read(
                offset,
                buf.len() as u64,
                None,
                format!("{}: read past the end of the disk", self.path),
            ));
        }
        let cs = self.cluster_size();
        // (guest offset, start in buf, end in buf, where the bytes are)
        let mut parts: Vec<(u64, usize, usize, ReadFrom)> = Vec::new();
        {
            let m = self.lock();
            let mut pos = 0usize;
            while pos < buf.len() {
                let off = offset + pos as u64;
                let index = off / cs;
                let n = (cs - off % cs).min((buf.len() - pos) as u64) as usize;
                let raw = m.entry(index, self.cluster_bits);
                let host = raw & OFFSET_MASK;
                let source = if raw & ZERO != 0 {
                    ReadFrom::Zeros
                } else if host != 0 {
                    ReadFrom::Host(host + off % cs)
                } else if self.backing.is_some() {
                    ReadFrom::Backing
                } else {
                    ReadFrom::Zeros
                };
                parts.push((off, pos, pos + n, source));
                pos += n;
            }
        }
        for (off, start, end, source) in parts {
            let part = &mut buf[start..end];
            match source {
                ReadFrom::Zeros => part.fill(0),
                ReadFrom::Backing => self
                    .backing
                    .as_ref()
                    .expect("backing chain")
                    .read_exact_at(off, part)?,
                ReadFrom::Host(host) => {
                    super::reader::read_fill(&self.file, &self.path, host, part)?;
                }
            }
        }
        Ok(())
    }

    /// The allocation map of `[offset, offset + length)` as the image now stands: layer 0 is
    /// this image, layers below are its backing chain.
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<MapEntry>> {
        let end = offset.saturating_add(length).min(self.size);
        let cs = self.cluster_size();
        // Runs of this image, with `None` for "read through to the backing chain".
        let mut runs: Vec<(u64, u64, Option<Allocation>)> = Vec::new();
        {
            let m = self.lock();
            let mut off = offset;
            while off < end {
                let index = off / cs;
                let n = (cs - off % cs).min(end - off);
                let raw = m.entry(index, self.cluster_bits);
                let kind = if raw & ZERO != 0 {
                    Some(Allocation::Zero)
                } else if raw & OFFSET_MASK != 0 {
                    Some(Allocation::Data { layer: 0 })
                } else if self.backing.is_some() {
                    None
                } else {
                    Some(Allocation::Unallocated)
                };
                match runs.last_mut() {
                    Some(last) if last.2 == kind => last.1 += n,
                    _ => runs.push((off, n, kind)),
                }
                off += n;
            }
        }
        let mut out: Vec<MapEntry> = Vec::new();
        for (off, n, kind) in runs {
            match (kind, &self.backing) {
                (Some(allocation), _) => push_entry(&mut out, off, n, allocation),
                (None, Some(chain)) => {
                    let mut covered = off;
                    for mut e in chain.map(off, n)? {
                        if let Allocation::Data { layer } = e.allocation {
                            e.allocation = Allocation::Data { layer: layer + 1 };
                        }
                        covered = e.end();
                        push_entry(&mut out, e.offset, e.length, e.allocation);
                    }
                    // Past the end of a shorter backing disk.
                    push_entry(
                        &mut out,
                        covered,
                        off + n - covered,
                        Allocation::Unallocated,
                    );
                }
                (None, None) => unreachable!("no backing chain to read through"),
            }
        }
        Ok(out)
    }

    /// Write all metadata and make the image durable and consistent: after it returns the file
    /// is a clean QCOW2 image holding every completed write. Further writes may follow.
    pub fn flush(&self) -> Result<()> {
        let mut m = self.lock();
        let cs = self.cluster_size();
        let sync = |what: &str| {
            self.file.sync_data().map_err(|e| {
                write_err(
                    &self.path,
                    0,
                    0,
                    &std::io::Error::new(e.kind(), format!("{what}: {e}")),
                )
            })
        };
        if m.clean_on_disk {
            m.header.incompatible_features |= INCOMPAT_DIRTY;
            self.pwrite(0, &m.header.to_bytes())?;
        }
        // The data written so far reaches the disk before any table that points at it: a
        // crash in the middle of this flush leaves tables naming only durable clusters.
        sync("data and dirty mark")?;
        m.clean_on_disk = false;
        for i in 0..m.l2.len() {
            let place =
                matches!(&m.l2[i], Some(t) if t.host == 0 && t.entries.iter().any(|&e| e != 0));
            if place {
                let h = m.alloc(1, cs);
                let t = m.l2[i].as_mut().expect("L2 table");
                t.host = h;
                t.dirty = true;
            }
        }
        m.place_refcount_structures(cs);
        self.write_refcounts(&m)?;
        for t in m.l2.iter_mut().flatten() {
            if t.host != 0 && t.dirty {
                self.pwrite(t.host, &format::table_to_bytes(&t.entries))?;
                t.dirty = false;
            }
        }
        let l1: Vec<u64> =
            m.l2.iter()
                .map(|t| match t {
                    Some(t) if t.host != 0 => t.host | COPIED,
                    _ => 0,
                })
                .collect();
        self.pwrite(m.header.l1_table_offset, &format::table_to_bytes(&l1))?;
        let len = self
            .file
            .metadata()
            .map_err(|e| write_err(&self.path, 0, 0, &e))?
            .len();
        if len < m.next_free {
            self.file
                .set_len(m.next_free)
                .map_err(|e| write_err(&self.path, 0, 0, &e))?;
        }
        sync("metadata")?;
        m.header.incompatible_features &= !INCOMPAT_DIRTY;
        self.pwrite(0, &m.header.to_bytes())?;
        sync("header")?;
        m.clean_on_disk = true;
        Ok(())
    }

    /// The final flush, when the copy is done.
    pub fn finish(&self) -> Result<()> {
        self.flush()
    }

    /// Write the refcount blocks and table as computed from the tables in `m`.
    fn write_refcounts(&self, m: &Meta) -> Result<()> {
        let cs = self.cluster_size();
        let counts = m.refcounts(cs, &self.path)?;
        let per_block = (cs / 2) as usize;
        for (b, &host) in m.refcount_blocks.iter().enumerate() {
            if host == 0 {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            for (i, &c) in counts.iter().skip(first).take(per_block).enumerate() {
                block[i * 2..i * 2 + 2].copy_from_slice(&c.to_be_bytes());
            }
            self.pwrite(host, &block)?;
        }
        let mut table = m.refcount_blocks.clone();
        table.resize(
            (u64::from(m.header.refcount_table_clusters) * cs / 8) as usize,
            0,
        );
        self.pwrite(
            m.header.refcount_table_offset,
            &format::table_to_bytes(&table),
        )?;
        if m.clean_on_disk {
            return Ok(());
        }
        self.pwrite(0, &m.header.to_bytes())
    }
}

impl Meta {
    fn entry(&self, index: u64, cluster_bits: u32) -> u64 {
        let per = 1u64 << (cluster_bits - 3);
        self.l2[(index / per) as usize]
            .as_ref()
            .map_or(0, |t| t.entries[(index % per) as usize])
    }

    fn set_entry(&mut self, index: u64, raw: u64, cluster_bits: u32) {
        let per = 1u64 << (cluster_bits - 3);
        let t = self.l2[(index / per) as usize].get_or_insert_with(|| L2Table {
            host: 0,
            entries: vec![0u64; per as usize].into_boxed_slice(),
            dirty: true,
        });
        t.entries[(index % per) as usize] = raw;
        t.dirty = true;
    }

    fn alloc(&mut self, clusters: u64, cs: u64) -> u64 {
        let h = self.next_free;
        self.next_free += clusters * cs;
        h
    }

    /// Give every refcount block the file needs a place, moving the refcount table to the end
    /// of the file when it has too few entries. Placing blocks grows the file, hence the loop.
    fn place_refcount_structures(&mut self, cs: u64) {
        let per_block = cs / 2;
        loop {
            let blocks = (self.next_free / cs).div_ceil(per_block) as usize;
            let capacity = (u64::from(self.header.refcount_table_clusters) * cs / 8) as usize;
            if blocks > capacity {
                let clusters = ((blocks * 2 * 8) as u64).div_ceil(cs);
                self.header.refcount_table_offset = self.alloc(clusters, cs);
                self.header.refcount_table_clusters = clusters as u32;
                continue;
            }
            if self.refcount_blocks.len() < blocks {
                self.refcount_blocks.resize(blocks, 0);
            }
            match self.refcount_blocks.iter().position(|&h| h == 0) {
                Some(i) => self.refcount_blocks[i] = self.alloc(1, cs),
                None => break,
            }
        }
    }

    /// The refcount of every host cluster up to `next_free`: each referenced cluster once.
    fn refcounts(&self, cs: u64, path: &str) -> Result<Vec<u16>> {
        let mut counts = vec![0u16; (self.next_free / cs) as usize];
        let mut mark = |offset: u64, clusters: u64| -> Result<()> {
            for c in offset / cs..offset / cs + clusters {
                let slot = counts
                    .get_mut(c as usize)
                    .ok_or_else(|| MoverError::Format {
                        path: path.to_owned(),
                        message: format!("cluster {c} lies past the end of the allocated file"),
                    })?;
                if *slot != 0 {
                    return Err(MoverError::Format {
                        path: path.to_owned(),
                        message: format!("host cluster {c} is referenced twice"),
                    });
                }
                *slot = 1;
            }
            Ok(())
        };
        mark(0, 1)?;
        let h = &self.header;
        mark(h.l1_table_offset, (u64::from(h.l1_size) * 8).div_ceil(cs))?;
        mark(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters),
        )?;
        for &b in self.refcount_blocks.iter().filter(|&&b| b != 0) {
            mark(b, 1)?;
        }
        for t in self.l2.iter().flatten() {
            if t.host != 0 {
                mark(t.host, 1)?;
            }
            for &e in &t.entries {
                if e & OFFSET_MASK != 0 {
                    mark(e & OFFSET_MASK, 1)?;
                }
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative_path(Path::new(a), Path::new(b));
        assert_eq!(r("/a/b", "/a/b/base.qcow2"), PathBuf::from("base.qcow2"));
        assert_eq!(
            r("/a/b", "/a/c/base.qcow2"),
            PathBuf::from("../c/base.qcow2")
        );
        assert_eq!(r("/x", "/a/base"), PathBuf::from("../a/base"));
    }

    #[test]
    fn writes_read_back_before_and_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.qcow2");
        let w = Qcow2Writer::create(&path, 1 << 20, 4096, None).unwrap();
        w.write_at(5000, &[7u8; 10000]).unwrap();
        w.write_zeroes(8192, 4096).unwrap();
        w.flush().unwrap();
        let mut buf = vec![1u8; 20000];
        w.read_at(0, &mut buf).unwrap();
        let mut want = vec![0u8; 20000];
        want[5000..15000].fill(7);
        want[8192..12288].fill(0);
        assert_eq!(buf, want);
        let chain = Qcow2Chain::open(&path).unwrap();
        let mut back = vec![1u8; 20000];
        chain.read_exact_at(0, &mut back).unwrap();
        assert_eq!(back, want);
    }

    #[test]
    fn refcount_table_moves_when_it_runs_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grow.qcow2");
        // 512-byte clusters: a refcount block covers 256 clusters, a table cluster 64 blocks.
        let w = Qcow2Writer::create(&path, 4 << 20, 512, None).unwrap();
        let first_table = w.lock().header.refcount_table_offset;
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        // Overwrite after zeroing: freed clusters are not reused, the file outgrows the disk.
        for _ in 0..3 {
            w.write_at(0, &data).unwrap();
            w.write_zeroes(0, 4 << 20).unwrap();
        }
        w.write_at(0, &data).unwrap();
        w.finish().unwrap();
        assert_ne!(w.lock().header.refcount_table_offset, first_table);
        let mut back = vec![0u8; data.len()];
        Qcow2Chain::open(&path)
            .unwrap()
            .read_exact_at(0, &mut back)
            .unwrap();
        assert_eq!(back, data);
    }
}
