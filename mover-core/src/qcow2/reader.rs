//! Reading a QCOW2 image through its whole backing chain.
//!
//! [`Qcow2Chain::open`] opens an image and follows `backing_file` links to any depth; each link
//! is a QCOW2 image or a raw file (the backing format extension says which; without it the magic
//! is probed, as QEMU does). Relative backing names are relative to the directory of the image
//! that names them. A chain that loops back on itself is refused.
//!
//! A backing file name is data inside the image, chosen by whoever made it, so it is confined:
//! every backing file of the chain, symlinks resolved, must lie inside the directory of the top
//! image (the file the caller named) or inside one of the caller's allowed roots
//! ([`Qcow2Chain::open_with`]). An absolute name, a name climbing out with `..` or a symlink
//! leading elsewhere is refused before the file is opened. A chain deeper than
//! [`MAX_CHAIN_DEPTH`] is refused too.
//!
//! A read walks the layers top-down: a run of guest clusters that the top image maps is served
//! from it (data with one `pread` per run of host-contiguous clusters, zero clusters as zeros,
//! compressed clusters inflated); a run it leaves unallocated falls through to the next layer,
//! and past the bottom layer — or past the end of a shorter backing file — reads as zeros. A raw
//! backing file is mapped with `SEEK_DATA`/`SEEK_HOLE`: its holes are neither read nor reported
//! as data.
//!
//! With extended L2 entries (128 bits: the usual descriptor and a bitmap saying, for each of the
//! 32 subclusters, "allocated" or "reads as zeros") the unit of the map is the subcluster rather
//! than the cluster; nothing else changes.
//!
//! The active L1 table of each image is loaded at open. L2 tables are read on demand and kept in
//! a per-image cache of bounded size (first in, first out: the copy engine reads in order, so a
//! smarter policy buys nothing). The last inflated compressed cluster is kept too, since a
//! reader asking for less than a cluster reads the same one several times (deflate or zstd, as
//! the header's compression type says). All reads are
//! positioned (`pread`), so one chain is shared by any number of threads; the caches are behind
//! short-held mutexes.
//!
//! [`Qcow2Chain::map`] gives the allocation map of the chain: which runs are data (and in which
//! layer), which are explicitly zero, and which no layer allocates.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};

use super::format::{self, Compression, Header, L2Entry};
use crate::error::{errno, MoverError, Result};

/// Bytes of L2 tables each image keeps in memory: 32 MiB maps 256 GiB with 64 KiB clusters.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// Most files in one backing chain, the top image included.
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// Largest zstd window a compressed cluster may ask for: 16 MiB, eight times the largest
/// cluster. QEMU compresses one cluster per frame, so its frames need at most the cluster size.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// The format of a backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingFormat {
    Raw,
    Qcow2,
}

impl BackingFormat {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// What a run of the chain holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer (0 is the top image).
    Data { layer: usize },
    /// Marked zero by a layer (zero clusters): reads as zeros, hides the layers below.
    Zero,
    /// No layer allocates it: reads as zeros.
    Unallocated,
}

/// One run of the allocation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub offset: u64,
    pub length: u64,
    pub allocation: Allocation,
}

impl MapEntry {
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// The run reads as zeros.
    #[must_use]
    pub fn reads_zero(&self) -> bool {
        !matches!(self.allocation, Allocation::Data { .. })
    }
}

/// Append a run to a map, merging it with the previous one when they are alike.
pub(crate) fn push_entry(
    out: &mut Vec<MapEntry>,
    offset: u64,
    length: u64,
    allocation: Allocation,
) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.allocation == allocation && last.end() == offset {
            last.length += length;
            return;
        }
    }
    out.push(MapEntry {
        offset,
        length,
        allocation,
    });
}

fn format_err(path: &str, message: impl Into<String>) -> MoverError {
    MoverError::Format {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn read_err(path: &str, offset: u64, len: usize, e: &std::io::Error) -> MoverError {
    MoverError::source_read(offset, len as u64, errno(e), format!("{path}: {e}"))
}

/// `pread` all of `buf`, zero-filling what lies past the end of the file.
pub(crate) fn read_fill(file: &File, path: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(path, offset, buf.len(), &e)),
        }
    }
    Ok(())
}

/// Where a run of guest bytes of one image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// At this host offset (the run is host-contiguous).
    Data(u64),
    /// Inside one compressed cluster.
    Compressed {
        host: u64,
        length: u64,
    },
    Zero,
    Unallocated,
}

/// First-in-first-out cache of L2 tables keyed by their host offset.
struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    capacity: usize,
}

/// One QCOW2 image, without its backing file.
pub struct Qcow2Image {
    path: String,
    file: File,
    header: Header,
    compression: Compression,
    extensions: format::Extensions,
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    /// Guest cluster index and contents of the last inflated compressed cluster.
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Qcow2Image {
    /// Open a QCOW2 image read-only; its backing file is not opened.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_named(path, path.display().to_string())
    }

    /// Open the file at `path`, named `name` in errors and by [`Qcow2Chain::layer_path`].
    fn open_named(path: &Path, name: String) -> Result<Self> {
        let file = File::open(path).map_err(|source| MoverError::Connect {
            endpoint: name.clone(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|e| MoverError::io(format!("size of {name}"), e))?
            .len();
        let mut first = vec![0u8; 1 << format::MAX_CLUSTER_BITS];
        let n = read_prefix(&file, &name, &mut first)?;
        first.truncate(n);
        let header = Header::parse(&first, &name)?;
        // Every table is bounded by QEMU's limits (`parse`) and by the file before any of it is
        // allocated: a header is untrusted input.
        header.check_file(file_len, &name)?;
        first.truncate((header.cluster_size() as usize).min(first.len()));
        let compression = format::compression_type(&header, &first, &name)?;
        let extensions = format::parse_extensions(&header, &first, &name)?;
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        read_fill(&file, &name, header.l1_table_offset, &mut l1_bytes)?;
        let l1 = format::table_from_bytes(&l1_bytes);
        let capacity = (L2_CACHE_BYTES / header.cluster_size()).max(16) as usize;
        Ok(Self {
            path: name,
            file,
            header,
            compression,
            extensions,
            l1,
            l2_cache: Mutex::new(L2Cache {
                tables: HashMap::new(),
                order: VecDeque::new(),
                capacity,
            }),
            inflated: Mutex::new(None),
        })
    }

    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    #[must_use]
    pub fn size(&self) -> u64 {
        self.header.size
    }

    #[must_use]
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The backing file name as stored, and the recorded backing format.
    #[must_use]
    pub fn backing(&self) -> (Option<&str>, Option<&str>) {
        (
            self.extensions.backing_file.as_deref(),
            self.extensions.backing_format.as_deref(),
        )
    }

    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>> {
        if let Some(t) = self.l2_cache.lock().expect("L2 cache").tables.get(&offset) {
            return Ok(Arc::clone(t));
        }
        let mut bytes = vec![0u8; self.cluster_size() as usize];
        read_fill(&self.file, &self.path, offset, &mut bytes)?;
        let table: Arc<[u64]> = format::table_from_bytes(&bytes).into();
        let mut cache = self.l2_cache.lock().expect("L2 cache");
        if !cache.tables.contains_key(&offset) {
            if cache.order.len() >= cache.capacity {
                if let Some(old) = cache.order.pop_front() {
                    cache.tables.remove(&old);
                }
            }
            cache.order.push_back(offset);
            cache.tables.insert(offset, Arc::clone(&table));
        }
        Ok(table)
    }

    /// The unit the L2 tables map: a cluster, or a subcluster (1/32 of one) with extended L2
    /// entries.
    fn unit(&self) -> u64 {
        self.cluster_size() / self.header.subclusters()
    }

    /// L2 entries from unit `index` to the end of its L2 table, at most `max`.
    fn entries(&self, index: u64, max: u64) -> Result<Vec<L2Entry>> {
        let h = &self.header;
        let sub = h.subclusters();
        let words = h.l2_entry_words();
        let units_per_table = self.cluster_size() / (8 * words) * sub;
        let l1_index = index / units_per_table;
        let first = index % units_per_table;
        let count = (units_per_table - first).min(max);
        let raw_l1 = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        let l2_offset = format::decode_l1(raw_l1, h.cluster_bits, &self.path)?;
        if l2_offset == 0 {
            return Ok(vec![L2Entry::Unallocated; count as usize]);
        }
        let table = self.l2_table(l2_offset)?;
        (first..first + count)
            .map(|u| {
                let at = ((u / sub) * words) as usize;
                if sub == 1 {
                    L2Entry::decode(table[at], h.cluster_bits, h.version, &self.path)
                } else {
                    L2Entry::decode_extended(
                        table[at],
                        table[at + 1],
                        (u % sub) as u32,
                        h.cluster_bits,
                        &self.path,
                    )
                }
            })
            .collect()
    }

    /// How the run of `max_len` guest bytes from `offset` starts: the mapping of its first byte
    /// and the length of the longest prefix mapped alike (at least one byte, at most `max_len`).
    pub(crate) fn lookup(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let unit = self.unit();
        let index = offset / unit;
        let in_unit = offset % unit;
        let units = (in_unit + max_len).div_ceil(unit);
        let entries = self.entries(index, units)?;
        let first = match entries[0] {
            L2Entry::Unallocated => Mapping::Unallocated,
            L2Entry::Zero { .. } => Mapping::Zero,
            L2Entry::Data { host } => Mapping::Data(host + in_unit),
            L2Entry::Compressed { host, length } => {
                return Ok((
                    Mapping::Compressed { host, length },
                    (cs - offset % cs).min(max_len),
                ));
            }
        };
        let mut run = 1u64;
        for (i, e) in entries.iter().enumerate().skip(1) {
            let same = match (first, e) {
                (Mapping::Unallocated, L2Entry::Unallocated)
                | (Mapping::Zero, L2Entry::Zero { .. }) => true,
                (Mapping::Data(start), L2Entry::Data { host }) => {
                    *host == start - in_unit + i as u64 * unit
                }
                _ => false,
            };
            if !same {
                break;
            }
            run += 1;
        }
        Ok((first, (run * unit - in_unit).min(max_len)))
    }

    /// The contents of the compressed guest cluster `index`.
    fn inflate(&self, index: u64, host: u64, length: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((i, data)) = &*self.inflated.lock().expect("inflate cache") {
            if *i == index {
                return Ok(Arc::clone(data));
            }
        }
        let cs = self.cluster_size() as usize;
        let mut input = vec![0u8; length as usize];
        read_fill(&self.file, &self.path, host, &mut input)?;
        let mut out = vec![0u8; cs];
        match self.compression {
            Compression::Deflate => {
                let mut state = DecompressorOxide::new();
                let (status, _, written) = decompress(
                    &mut state,
                    &input,
                    &mut out,
                    0,
                    inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
                );
                if (status as i8) < 0 || written != cs {
                    return Err(format_err(
                        &self.path,
                        format!("compressed cluster at host offset {host:#x} does not inflate ({status:?}, {written} bytes)"),
                    ));
                }
            }
            Compression::Zstd => unzstd(&input, &mut out).map_err(|e| {
                format_err(
                    &self.path,
                    format!("zstd cluster at host offset {host:#x} does not decompress: {e}"),
                )
            })?,
        }
        let data = Arc::new(out);
        *self.inflated.lock().expect("inflate cache") = Some((index, Arc::clone(&data)));
        Ok(data)
    }

    /// Fill `buf` from a compressed cluster, starting at guest `offset`.
    fn read_compressed(&self, offset: u64, host: u64, length: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let data = self.inflate(offset / cs, host, length)?;
        let start = (offset % cs) as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }
}

/// Fill `out` from the zstd frame at the start of `input`. As in QEMU, the stored length is only
/// a bound (it runs to a sector boundary, past the frame), so decoding stops once `out` is full
/// and what follows the frame is never looked at.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::io::Result<()> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input)?.single_frame();
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    decoder.read_exact(out)
}

fn read_prefix(file: &File, path: &str, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(path, 0, buf.len(), &e)),
        }
    }
    Ok(done)
}

/// A raw backing file: its data runs are data, its holes and what lies past its end zeros.
struct RawImage {
    path: String,
    file: File,
    size: u64,
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `None` when there is no such offset (`ENXIO`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::unix::io::AsRawFd;
    let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(u64::try_from(r).ok())
}

impl RawImage {
    /// Data or hole from `offset`, and for how long (at most `max_len`). File systems without
    /// `SEEK_DATA` report all data, which is always correct.
    fn lookup(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let end = offset + max_len;
        let err = |e: &std::io::Error| read_err(&self.path, offset, max_len as usize, e);
        let data = match seek(&self.file, offset, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(end).min(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => offset,
            Err(e) => return Err(err(&e)),
        };
        if data > offset {
            return Ok((Mapping::Unallocated, data - offset));
        }
        let hole = match seek(&self.file, offset, libc::SEEK_HOLE) {
            Ok(h) => h.unwrap_or(end).min(end),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
            Err(e) => return Err(err(&e)),
        };
        Ok((Mapping::Data(offset), (hole - offset).max(1).min(max_len)))
    }
}

enum Layer {
    Qcow2(Box<Qcow2Image>),
    Raw(RawImage),
}

impl Layer {
    fn size(&self) -> u64 {
        match self {
            Self::Qcow2(q) => q.size(),
            Self::Raw(r) => r.size,
        }
    }

    fn path(&self) -> &str {
        match self {
            Self::Qcow2(q) => &q.path,
            Self::Raw(r) => &r.path,
        }
    }
}

/// A QCOW2 image and its backing files, read as one disk.
pub struct Qcow2Chain {
    layers: Vec<Layer>,
}

/// The magic at the start of `path` says QCOW2.
pub(crate) fn probe_qcow2(path: &Path) -> Result<bool> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| MoverError::Connect {
        endpoint: name.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let n = read_prefix(&file, &name, &mut magic)?;
    Ok(n == 4 && u32::from_be_bytes(magic) == format::MAGIC)
}

/// The directory of `path` ("." for a bare file name).
fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Where the backing files of a chain may be: the directory of its top image and the caller's
/// allowed roots, all canonical (symlinks resolved).
struct BackingRoots(Vec<PathBuf>);

impl BackingRoots {
    fn new(top: &Path, allowed: &[PathBuf]) -> Result<Self> {
        let canonical = |dir: &Path| {
            dir.canonicalize().map_err(|e| MoverError::InvalidEndpoint {
                spec: dir.display().to_string(),
                reason: format!("backing root: {e}"),
            })
        };
        let mut roots = vec![canonical(directory_of(top))?];
        for root in allowed {
            roots.push(canonical(root)?);
        }
        Ok(Self(roots))
    }

    /// Resolve the backing name stored in `image` (relative names against the directory of
    /// `image`) and check that the file it leads to, symlinks followed, is inside a root.
    /// Returns the path as named and its canonical form.
    fn resolve(&self, image: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
        let image_name = image.display().to_string();
        if name.contains("://") || name.starts_with("json:") {
            return Err(format_err(
                &image_name,
                format!("backing file {name:?} is not a local file"),
            ));
        }
        let named = directory_of(image).join(name);
        let canonical = named.canonicalize().map_err(|source| MoverError::Connect {
            endpoint: named.display().to_string(),
            source,
        })?;
        if !self.0.iter().any(|root| canonical.starts_with(root)) {
            return Err(format_err(
                &image_name,
                format!(
                    "backing file {name:?} resolves to {}, outside the image's directory {} \
                     (an allowed backing root admits another directory)",
                    canonical.display(),
                    self.0[0].display()
                ),
            ));
        }
        Ok((named, canonical))
    }
}

impl Qcow2Chain {
    /// Open a QCOW2 image and its whole backing chain, confined to the image's directory.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, BackingFormat::Qcow2)
    }

    /// Open a chain whose top is in format `top` (a raw top is a chain of one raw file), its
    /// backing files confined to the top image's directory.
    pub fn open_as(path: &Path, top: BackingFormat) -> Result<Self> {
        Self::open_with(path, top, &[])
    }

    /// Open a chain whose top is in format `top`; its backing files may lie in the directory of
    /// `path` (at any depth below it) or in one of `allowed_roots`, and nowhere else.
    pub fn open_with(path: &Path, top: BackingFormat, allowed_roots: &[PathBuf]) -> Result<Self> {
        let roots = BackingRoots::new(path, allowed_roots)?;
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let top_canonical = path.canonicalize().map_err(|source| MoverError::Connect {
            endpoint: path.display().to_string(),
            source,
        })?;
        let mut next = Some((path.to_owned(), top_canonical, top));
        while let Some((path, canonical, fmt)) = next.take() {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(format_err(
                    &path.display().to_string(),
                    format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} files"),
                ));
            }
            if !seen.insert(canonical.clone()) {
                return Err(format_err(
                    &path.display().to_string(),
                    "the backing chain loops back to this image",
                ));
            }
            match fmt {
                // The canonical path is opened, the one that was checked against the roots: a
                // symlink swapped in meanwhile is not followed.
                BackingFormat::Raw => {
                    let name = path.display().to_string();
                    let file = File::open(&canonical).map_err(|source| MoverError::Connect {
                        endpoint: name.clone(),
                        source,
                    })?;
                    let size = file
                        .metadata()
                        .map_err(|e| MoverError::io(format!("size of {name}"), e))?
                        .len();
                    layers.push(Layer::Raw(RawImage {
                        path: name,
                        file,
                        size,
                    }));
                }
                BackingFormat::Qcow2 => {
                    let img = Qcow2Image::open_named(&canonical, path.display().to_string())?;
                    if let (Some(name), fmt) = img.backing() {
                        let (backing, canonical) = roots.resolve(&path, name)?;
                        let fmt = match fmt {
                            Some("raw") => BackingFormat::Raw,
                            Some("qcow2") => BackingFormat::Qcow2,
                            Some(other) => {
                                return Err(format_err(
                                    &img.path,
                                    format!("backing format {other:?} is not supported"),
                                ))
                            }
                            None if probe_qcow2(&canonical)? => BackingFormat::Qcow2,
                            None => BackingFormat::Raw,
                        };
                        next = Some((backing, canonical, fmt));
                    }
                    layers.push(Layer::Qcow2(Box::new(img)));
                }
            }
        }
        Ok(Self { layers })
    }

    /// Virtual size of the disk (that of the top image).
    #[must_use]
    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    /// Number of files in the chain, the top image included.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Path of layer `i` (0 is the top image).
    #[must_use]
    pub fn layer_path(&self, i: usize) -> &str {
        self.layers[i].path()
    }

    /// Layer `i` when it is a QCOW2 image (0 is the top image; a raw layer gives `None`).
    #[must_use]
    pub fn layer_image(&self, i: usize) -> Option<&Qcow2Image> {
        match &self.layers[i] {
            Layer::Qcow2(q) => Some(q.as_ref()),
            Layer::Raw(_) => None,
        }
    }

    /// Virtual size of layer `i` (a raw layer's file size).
    #[must_use]
    pub fn layer_size(&self, i: usize) -> u64 {
        self.layers[i].size()
    }

    /// The top image, when it is QCOW2.
    #[must_use]
    pub fn top(&self) -> Option<&Qcow2Image> {
        match &self.layers[0] {
            Layer::Qcow2(q) => Some(q.as_ref()),
            Layer::Raw(_) => None,
        }
    }

    /// Read up to `buf.len()` bytes at `offset`, like `pread`: returns how many were read, fewer
    /// only at the end of the disk, 0 at or past it. Blocking; safe from any thread.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        self.read_exact_at(offset, &mut buf[..n])?;
        Ok(n)
    }

    /// Fill all of `buf` from `offset`; bytes past the end of the disk read as zeros.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let length = buf.len() as u64;
        // A failed `pread` names the host offset in a layer file; the caller asked for a guest
        // range, which is what the error reports (the message keeps the file).
        self.read_layer(0, offset, buf).map_err(|e| match e {
            MoverError::SourceRead { code, message, .. } => MoverError::SourceRead {
                offset,
                length,
                code,
                message,
            },
            other => other,
        })
    }

    fn read_layer(&self, i: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let layer = &self.layers[i];
        let size = layer.size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            if off >= size {
                buf[pos..].fill(0);
                break;
            }
            let max = (size - off).min((buf.len() - pos) as u64);
            let (mapping, n) = match layer {
                Layer::Raw(r) => r.lookup(off, max)?,
                Layer::Qcow2(q) => q.lookup(off, max)?,
            };
            let part = &mut buf[pos..pos + n as usize];
            match (mapping, layer) {
                (Mapping::Data(host), Layer::Raw(r)) => read_fill(&r.file, &r.path, host, part)?,
                (Mapping::Data(host), Layer::Qcow2(q)) => read_fill(&q.file, &q.path, host, part)?,
                (Mapping::Compressed { host, length }, Layer::Qcow2(q)) => {
                    q.read_compressed(off, host, length, part)?;
                }
                (Mapping::Unallocated, _) if i + 1 < self.layers.len() => {
                    self.read_layer(i + 1, off, part)?;
                }
                _ => part.fill(0),
            }
            pos += n as usize;
        }
        Ok(())
    }

    /// The allocation map of `[offset, offset + length)` (clipped to the disk), in order,
    /// adjacent runs of one kind merged.
    pub fn map(&self, offset: u64, length: u64) -> Result<Vec<MapEntry>> {
        let end = offset.saturating_add(length).min(self.size());
        let mut out = Vec::new();
        if offset < end {
            self.map_layer(0, offset, end - offset, &mut out)?;
        }
        Ok(out)
    }

    fn map_layer(&self, i: usize, offset: u64, length: u64, out: &mut Vec<MapEntry>) -> Result<()> {
        let layer = &self.layers[i];
        let size = layer.size();
        let end = offset + length;
        let mut off = offset;
        while off < end {
            if off >= size {
                push_entry(out, off, end - off, Allocation::Unallocated);
                break;
            }
            let max = (size - off).min(end - off);
            let (mapping, n) = match layer {
                Layer::Raw(r) => r.lookup(off, max)?,
                Layer::Qcow2(q) => q.lookup(off, max)?,
            };
            match mapping {
                Mapping::Data(_) | Mapping::Compressed { .. } => {
                    push_entry(out, off, n, Allocation::Data { layer: i });
                }
                Mapping::Zero => push_entry(out, off, n, Allocation::Zero),
                Mapping::Unallocated if i + 1 < self.layers.len() => {
                    self.map_layer(i + 1, off, n, out)?;
                }
                Mapping::Unallocated => push_entry(out, off, n, Allocation::Unallocated),
            }
            off += n;
        }
        Ok(())
    }
}
