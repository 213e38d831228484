//! The QCOW2 on-disk format: header, header extensions, table entries.
//!
//! Everything here is pure: bytes in, values out (and back). The layout follows QEMU's
//! `docs/interop/qcow2.txt`; all numbers on disk are big-endian.
//!
//! ```text
//! offset  size  field                     version
//!      0     4  magic "QFI\xfb"
//!      4     4  version (2 or 3)
//!      8     8  backing_file_offset       (0: no backing file)
//!     16     4  backing_file_size         (at most 1023)
//!     20     4  cluster_bits              (9..=21: 512 B .. 2 MiB clusters)
//!     24     8  size                      virtual disk size in bytes
//!     32     4  crypt_method              (0: none; anything else is refused)
//!     36     4  l1_size                   entries in the active L1 table
//!     40     8  l1_table_offset
//!     48     8  refcount_table_offset
//!     56     4  refcount_table_clusters
//!     60     4  nb_snapshots
//!     64     8  snapshots_offset
//!     72     8  incompatible_features     3 only (v2 headers end at 72)
//!     80     8  compatible_features       3
//!     88     8  autoclear_features        3
//!     96     4  refcount_order            3 (v2: always 4, 16-bit refcounts)
//!    100     4  header_length             3
//!    104     1  compression_type          3, when header_length > 104
//! ```
//!
//! Header extensions follow the header (`type: u32, length: u32, data` padded to 8 bytes, ended
//! by type 0); the backing file name is stored after them, not NUL-terminated.
//!
//! A guest offset is split into an L1 index, an L2 index and an offset in the cluster; an L2
//! table fills exactly one cluster of 8-byte entries. Entry bits:
//!
//! ```text
//! L1:  63 COPIED | 9..=55 L2 table offset (0: table not allocated)
//! L2:  63 COPIED | 62 COMPRESSED | 9..=55 host cluster offset | 0 ZERO (v3)
//! L2, compressed (x = 62 - (cluster_bits - 8)):
//!      x..=61 additional 512-byte sectors | 0..x host byte offset of the deflate stream
//! ```
//!
//! With the extended L2 feature an entry is 128 bits: the descriptor above (bit 0 unused) and a
//! bitmap over the 32 subclusters, bits 0..32 "allocated in this image", bits 32..64 "reads as
//! zeros"; a subcluster with neither reads through to the backing file.
//!
//! Refcounts are kept in a two-level table too: the refcount table lists refcount blocks, each one
//! cluster of `1 << refcount_order`-bit big-endian counters, one per host cluster.
//!
//! Incompatible features this implementation does not understand are refused by name; so are the
//! known ones it does not implement (external data files) and images marked corrupt. Compressed
//! clusters are deflate or zstd streams (compression type 0 or 1). The dirty bit is accepted for
//! reading: it only says the refcounts may be stale, which a reader does not use.
//!
//! An image is untrusted input. Every size the header gives is bounded before anything is
//! allocated from it: by QEMU's own limits ([`MAX_L1_BYTES`], [`MAX_SNAPSHOTS`],
//! [`MAX_BACKING_NAME`]) or looser ones ([`MAX_REFCOUNT_TABLE_BYTES`]), by the first cluster (header, extensions, backing
//! name) and, through [`Header::check_file`], by the length of the file (L1 table, refcount
//! table, snapshot table). A field out of bounds is a [`MoverError::Format`] naming it.

use crate::error::{MoverError, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header, and of the fields common to both versions.
pub const V2_HEADER_LENGTH: usize = 72;
/// Smallest version 3 header (without the compression type byte).
pub const V3_MIN_HEADER_LENGTH: usize = 104;
/// The version 3 header this crate writes: with the compression type byte, padded to 8.
pub const V3_HEADER_LENGTH: usize = 112;
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// Largest active L1 table QEMU accepts (`QCOW_MAX_L1_SIZE`): 4 Mi entries, 2 PiB of 64 KiB
/// clusters.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted. QEMU's limit (`QCOW_MAX_REFTABLE_SIZE`) is 8 MiB, but the
/// mover's writer preallocates a table for twice the disk, over 8 MiB for disks past 64 GiB
/// with 512-byte clusters (4 TiB with 4 KiB ones); the reader never loads the table, so it
/// accepts those images, up to 64 MiB.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 64 << 20;
/// Most internal snapshots QEMU accepts (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65_536;
/// Bytes of a snapshot table entry without its variable parts: the least each one takes.
const MIN_SNAPSHOT_ENTRY: u64 = 40;
/// Extended L2 entries need clusters of at least 16 KiB (subclusters of at least 512 bytes).
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Compression type byte (offset 104): deflate, the default and the only one of version 2.
pub const COMPRESSION_DEFLATE: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Bits 9..=55: offset of an L2 table, a data cluster, a refcount block.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The refcount of the cluster is exactly one: it may be written in place.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros (with or without a preallocated host cluster).
pub const ZERO: u64 = 1;
/// Bits an uncompressed L2 entry must leave clear: 1..=8 and 56..=61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits an L1 entry must leave clear: 0..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// The fields of a QCOW2 header that matter here. Version 2 headers read as version 3 with no
/// feature bits and 16-bit refcounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(path: &str, message: impl Into<String>) -> MoverError {
    MoverError::Format {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Names of the incompatible feature bits, for messages.
fn incompatible_name(bit: u32) -> String {
    match bit {
        0 => "dirty".into(),
        1 => "corrupt".into(),
        2 => "external data file".into(),
        3 => "compression type".into(),
        4 => "extended L2 entries".into(),
        n => format!("unknown bit {n}"),
    }
}

impl Header {
    /// Parse and validate a header from the first bytes of an image (at least the first
    /// cluster, or the whole file when it is shorter). `path` names the image in errors.
    pub fn parse(buf: &[u8], path: &str) -> Result<Self> {
        if buf.len() < V2_HEADER_LENGTH || be32(buf, 0) != MAGIC {
            return Err(bad(path, "not a QCOW2 image (no QFI\\xfb magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(bad(
                path,
                format!("QCOW2 version {version} is not supported"),
            ));
        }
        let mut h = Self {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH as u32,
        };
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(bad(
                path,
                format!("encrypted images are not supported (crypt method {crypt_method})"),
            ));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(bad(
                path,
                format!("cluster_bits {} is out of range", h.cluster_bits),
            ));
        }
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LENGTH {
                return Err(bad(path, "truncated version 3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let len = h.header_length as usize;
            if len < V3_MIN_HEADER_LENGTH
                || len > buf.len()
                || len as u64 > h.cluster_size()
                || !len.is_multiple_of(8) && len != 104
            {
                return Err(bad(path, format!("bad header_length {len}")));
            }
            if h.refcount_order > 6 {
                return Err(bad(
                    path,
                    format!("refcount order {} > 6", h.refcount_order),
                ));
            }
            compression_type(&h, buf, path)?;
            h.check_features(path)?;
            if h.extended_l2() && h.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
                return Err(bad(
                    path,
                    format!(
                        "extended L2 entries need clusters of 16 KiB or more (cluster_bits {})",
                        h.cluster_bits
                    ),
                ));
            }
        }
        h.check_sizes(path)?;
        Ok(h)
    }

    /// The bounds that hold whatever the file: QEMU's limits and the first cluster.
    fn check_sizes(&self, path: &str) -> Result<()> {
        let h = self;
        if h.size > i64::MAX as u64 {
            return Err(bad(
                path,
                format!("size {} (the virtual size) is too large", h.size),
            ));
        }
        let cluster = h.cluster_size();
        if !h.l1_table_offset.is_multiple_of(cluster) {
            return Err(bad(path, "l1_table_offset is not cluster aligned"));
        }
        if !h.refcount_table_offset.is_multiple_of(cluster) {
            return Err(bad(path, "refcount_table_offset is not cluster aligned"));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(
                path,
                format!(
                    "l1_size {} is larger than QEMU's limit of {} entries",
                    h.l1_size,
                    MAX_L1_BYTES / 8
                ),
            ));
        }
        if u64::from(h.l1_size) < h.l1_entries_for_size() {
            return Err(bad(
                path,
                format!(
                    "l1_size {} is too small for the virtual size {} (needs {} entries)",
                    h.l1_size,
                    h.size,
                    h.l1_entries_for_size()
                ),
            ));
        }
        if u64::from(h.refcount_table_clusters) * h.cluster_size() > MAX_REFCOUNT_TABLE_BYTES {
            return Err(bad(
                path,
                format!(
                    "refcount_table_clusters {} is larger than the limit of {MAX_REFCOUNT_TABLE_BYTES} bytes",
                    h.refcount_table_clusters
                ),
            ));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(
                path,
                format!(
                    "nb_snapshots {} is larger than QEMU's limit of {MAX_SNAPSHOTS}",
                    h.nb_snapshots
                ),
            ));
        }
        if h.nb_snapshots > 0 && !h.snapshots_offset.is_multiple_of(h.cluster_size()) {
            return Err(bad(path, "snapshots_offset is not cluster aligned"));
        }
        if h.backing_file_size as usize > MAX_BACKING_NAME {
            return Err(bad(
                path,
                format!(
                    "backing_file_size {} is longer than {MAX_BACKING_NAME} bytes",
                    h.backing_file_size
                ),
            ));
        }
        if h.backing_file_offset
            .checked_add(u64::from(h.backing_file_size))
            .is_none_or(|end| end > h.cluster_size())
        {
            return Err(bad(
                path,
                format!(
                    "backing_file_offset {:#x} puts the backing file name outside the first cluster",
                    h.backing_file_offset
                ),
            ));
        }
        Ok(())
    }

    /// The tables the header places lie inside a file of `file_len` bytes (its last cluster may
    /// be short: QEMU ends a new image right after its L1 table). Call before reading any of
    /// them, so that no allocation is sized by a number the file cannot back.
    pub fn check_file(&self, file_len: u64, path: &str) -> Result<()> {
        let end_of_file = file_len.next_multiple_of(self.cluster_size());
        let within =
            |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= end_of_file);
        if self.l1_size > 0 && !within(self.l1_table_offset, u64::from(self.l1_size) * 8) {
            return Err(bad(
                path,
                format!(
                    "L1 table (l1_table_offset {:#x}, l1_size {}) ends past the end of the file ({file_len} bytes)",
                    self.l1_table_offset, self.l1_size
                ),
            ));
        }
        let refcount_bytes = u64::from(self.refcount_table_clusters) * self.cluster_size();
        if !within(self.refcount_table_offset, refcount_bytes) {
            return Err(bad(
                path,
                format!(
                    "refcount table (refcount_table_offset {:#x}, refcount_table_clusters {}) ends past the end of the file ({file_len} bytes)",
                    self.refcount_table_offset, self.refcount_table_clusters
                ),
            ));
        }
        let snapshot_bytes = u64::from(self.nb_snapshots) * MIN_SNAPSHOT_ENTRY;
        if self.nb_snapshots > 0 && !within(self.snapshots_offset, snapshot_bytes) {
            return Err(bad(
                path,
                format!(
                    "snapshot table (snapshots_offset {:#x}, nb_snapshots {}) ends past the end of the file ({file_len} bytes)",
                    self.snapshots_offset, self.nb_snapshots
                ),
            ));
        }
        Ok(())
    }

    fn check_features(&self, path: &str) -> Result<()> {
        let refused = self.incompatible_features
            & !(INCOMPAT_DIRTY | INCOMPAT_EXTENDED_L2 | INCOMPAT_COMPRESSION_TYPE);
        if refused == 0 {
            return Ok(());
        }
        let names: Vec<String> = (0..64)
            .filter(|b| refused & (1 << b) != 0)
            .map(incompatible_name)
            .collect();
        Err(bad(
            path,
            format!("unsupported incompatible features: {}", names.join(", ")),
        ))
    }

    #[must_use]
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L1 entries needed to map the whole virtual disk.
    #[must_use]
    pub fn l1_entries_for_size(&self) -> u64 {
        let mapped_by_table =
            (self.cluster_size() / (8 * self.l2_entry_words())) << self.cluster_bits;
        self.size.div_ceil(mapped_by_table)
    }

    /// L2 entries are 128 bits with a subcluster bitmap.
    #[must_use]
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    #[must_use]
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2() {
            32
        } else {
            1
        }
    }

    /// 64-bit words per L2 entry.
    #[must_use]
    pub fn l2_entry_words(&self) -> u64 {
        if self.extended_l2() {
            2
        } else {
            1
        }
    }

    /// Where header extensions start.
    #[must_use]
    pub fn extensions_offset(&self) -> usize {
        self.header_length as usize
    }

    /// The header bytes (`header_length` of them). Only version 3 headers of
    /// [`V3_HEADER_LENGTH`] are written by this crate; the compression type is deflate.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; V3_HEADER_LENGTH];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put32(&mut b, 36, self.l1_size);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put32(&mut b, 96, self.refcount_order);
        put32(&mut b, 100, V3_HEADER_LENGTH as u32);
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put64(&mut b, 8, self.backing_file_offset);
        put64(&mut b, 24, self.size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put64(&mut b, 64, self.snapshots_offset);
        put64(&mut b, 72, self.incompatible_features);
        put64(&mut b, 80, self.compatible_features);
        put64(&mut b, 88, self.autoclear_features);
        b
    }
}

/// How compressed clusters of an image are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// The compression type of an image whose header (already parsed as `h`) is at the start of
/// `buf`. A type other than deflate needs the compression type feature bit, and the bit a type.
pub fn compression_type(h: &Header, buf: &[u8], path: &str) -> Result<Compression> {
    let flagged = h.incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0;
    let byte = if h.header_length as usize > 104 {
        buf.get(104).copied().unwrap_or(0)
    } else {
        COMPRESSION_DEFLATE
    };
    let kind = match byte {
        COMPRESSION_DEFLATE => Compression::Deflate,
        COMPRESSION_ZSTD => Compression::Zstd,
        other => {
            return Err(bad(
                path,
                format!("compression type {other} is not supported (only deflate and zstd)"),
            ))
        }
    };
    if (kind != Compression::Deflate) != flagged {
        return Err(bad(
            path,
            format!("compression type {byte} disagrees with the compression type feature bit"),
        ));
    }
    Ok(kind)
}

/// L1 entries needed to map `size` bytes with clusters of `1 << cluster_bits`.
#[must_use]
pub fn l1_entries(size: u64, cluster_bits: u32) -> u64 {
    let l2_bytes = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(l2_bytes)
}

/// Header extensions and the backing file reference of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file name as stored (relative names are relative to the image's directory).
    pub backing_file: Option<String>,
    /// The backing format extension ("raw", "qcow2", ...), when present.
    pub backing_format: Option<String>,
}

/// Read the header extensions and backing file name from the image's first cluster.
pub fn parse_extensions(h: &Header, buf: &[u8], path: &str) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let mut at = h.extensions_offset();
    let buf = &buf[..buf.len().min(h.cluster_size() as usize)];
    let limit = if h.backing_file_offset > 0 {
        usize::try_from(h.backing_file_offset).map_or(buf.len(), |o| o.min(buf.len()))
    } else {
        buf.len()
    };
    while at + 8 <= limit {
        let kind = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        at += 8;
        if kind == EXT_END {
            break;
        }
        if len > limit - at {
            return Err(bad(
                path,
                format!("header extension {kind:#x} of {len} bytes overruns the first cluster"),
            ));
        }
        if kind == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(&buf[at..at + len])
                .map_err(|_| bad(path, "backing format is not UTF-8"))?;
            ext.backing_format = Some(name.to_owned());
        }
        at = at.saturating_add(len.next_multiple_of(8));
    }
    if h.backing_file_offset > 0 && h.backing_file_size > 0 {
        let range = usize::try_from(h.backing_file_offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(h.backing_file_size as usize)?))
            .filter(|r| r.end <= buf.len());
        let Some(range) = range else {
            return Err(bad(
                path,
                format!(
                    "backing file name (backing_file_offset {:#x}, backing_file_size {}) lies outside the file's first cluster",
                    h.backing_file_offset, h.backing_file_size
                ),
            ));
        };
        let (start, end) = (range.start, range.end);
        let name = std::str::from_utf8(&buf[start..end])
            .map_err(|_| bad(path, "backing file name is not UTF-8"))?;
        ext.backing_file = Some(name.to_owned());
    }
    Ok(ext)
}

/// The header extension area this crate writes: the backing format (when there is a backing
/// file) and the end marker.
#[must_use]
pub fn extensions_to_bytes(backing_format: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    if let Some(fmt) = backing_format {
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        b.extend_from_slice(fmt.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b.extend_from_slice(&EXT_END.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b
}

/// What an L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read through to the backing file (or zeros without one).
    Unallocated,
    /// Reads as zeros; `host` is the preallocated cluster, if any.
    Zero { host: Option<u64> },
    /// Data at this cluster-aligned host offset.
    Data { host: u64 },
    /// A deflate stream of at most `length` bytes at `host` (not aligned).
    Compressed { host: u64, length: u64 },
}

impl L2Entry {
    /// Decode a raw L2 entry of an image with `cluster_bits`.
    pub fn decode(raw: u64, cluster_bits: u32, version: u32, path: &str) -> Result<Self> {
        if raw & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = (raw & !(COPIED | COMPRESSED)) >> x;
            let length = (sectors + 1) * 512 - (host & 511);
            return Ok(Self::Compressed { host, length });
        }
        if raw & L2_RESERVED != 0 {
            return Err(bad(
                path,
                format!("L2 entry {raw:#018x} has reserved bits set"),
            ));
        }
        let host = raw & OFFSET_MASK;
        if host & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(bad(
                path,
                format!("L2 entry {raw:#018x} is not cluster aligned"),
            ));
        }
        if raw & ZERO != 0 {
            if version < 3 {
                return Err(bad(path, "zero cluster flag in a version 2 image"));
            }
            return Ok(Self::Zero {
                host: (host != 0).then_some(host),
            });
        }
        Ok(if host == 0 {
            Self::Unallocated
        } else {
            Self::Data { host }
        })
    }
}

impl L2Entry {
    /// Decode subcluster `sub` of an extended L2 entry: the descriptor `raw` and the bitmap
    /// (bits 0..32: subcluster allocated; bits 32..64: subcluster reads as zeros). A compressed
    /// cluster is one unit whatever the subcluster.
    pub fn decode_extended(
        raw: u64,
        bitmap: u64,
        sub: u32,
        cluster_bits: u32,
        path: &str,
    ) -> Result<Self> {
        if raw & COMPRESSED != 0 {
            return Self::decode(raw, cluster_bits, 3, path);
        }
        let host = match Self::decode(raw & !ZERO, cluster_bits, 3, path)? {
            Self::Data { host } => Some(host),
            _ => None,
        };
        let allocated = bitmap & (1 << sub) != 0;
        let zero = bitmap & (1 << (32 + sub)) != 0;
        match (allocated, zero, host) {
            (true, true, _) => Err(bad(
                path,
                format!("subcluster {sub} of L2 entry {raw:#018x} is both allocated and zero"),
            )),
            (true, false, None) => Err(bad(
                path,
                format!("subcluster {sub} is allocated in an L2 entry without a host cluster"),
            )),
            (true, false, Some(h)) => Ok(Self::Data {
                host: h + (u64::from(sub) << (cluster_bits - 5)),
            }),
            (false, true, _) => Ok(Self::Zero { host }),
            (false, false, _) => Ok(Self::Unallocated),
        }
    }
}

/// Offset of the L2 table an L1 entry points to (0: none).
pub fn decode_l1(raw: u64, cluster_bits: u32, path: &str) -> Result<u64> {
    if raw & L1_RESERVED != 0 {
        return Err(bad(
            path,
            format!("L1 entry {raw:#018x} has reserved bits set"),
        ));
    }
    let off = raw & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(bad(
            path,
            format!("L1 entry {raw:#018x} is not cluster aligned"),
        ));
    }
    Ok(off)
}

/// Big-endian `u64` table (L1, L2, refcount table) from its bytes.
#[must_use]
pub fn table_from_bytes(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Bytes of a big-endian `u64` table.
#[must_use]
pub fn table_to_bytes(t: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(t.len() * 8);
    for v in t {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 10 << 30,
            l1_size: 20,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH as u32,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let mut b = h.to_bytes();
        b.extend_from_slice(&extensions_to_bytes(None));
        assert_eq!(Header::parse(&b, "t").unwrap(), h);
    }

    #[test]
    fn unknown_incompatible_features_are_refused_by_name() {
        let mut h = sample();
        h.incompatible_features = INCOMPAT_EXTERNAL_DATA | (1 << 9) | INCOMPAT_DIRTY;
        let err = Header::parse(&h.to_bytes(), "t").unwrap_err().to_string();
        assert!(err.contains("external data file"), "{err}");
        assert!(err.contains("unknown bit 9"), "{err}");
        assert!(!err.contains("dirty"), "{err}");
    }

    #[test]
    fn compressed_descriptor_decodes() {
        // 64 KiB clusters: x = 54; two additional sectors at host 0x12345.
        let raw = COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            L2Entry::decode(raw, 16, 3, "t").unwrap(),
            L2Entry::Compressed {
                host: 0x12345,
                length: 3 * 512 - 0x145
            }
        );
    }

    #[test]
    fn l2_entries_decode() {
        let d = |raw| L2Entry::decode(raw, 16, 3, "t").unwrap();
        assert_eq!(d(0), L2Entry::Unallocated);
        assert_eq!(d(ZERO), L2Entry::Zero { host: None });
        assert_eq!(
            d(COPIED | 0x50000 | ZERO),
            L2Entry::Zero {
                host: Some(0x50000)
            }
        );
        assert_eq!(d(COPIED | 0x50000), L2Entry::Data { host: 0x50000 });
        assert!(L2Entry::decode(0x50200, 16, 3, "t").is_err());
        assert!(L2Entry::decode(ZERO, 16, 2, "t").is_err());
    }

    #[test]
    fn extended_l2_subclusters_decode() {
        // 64 KiB clusters: 2 KiB subclusters. Subcluster 1 allocated, 2 zero, 3 neither.
        let raw = COPIED | 0x70000;
        let bitmap = (1 << 1) | (1 << (32 + 2));
        let d = |sub| L2Entry::decode_extended(raw, bitmap, sub, 16, "t");
        assert_eq!(d(1).unwrap(), L2Entry::Data { host: 0x70800 });
        assert_eq!(
            d(2).unwrap(),
            L2Entry::Zero {
                host: Some(0x70000)
            }
        );
        assert_eq!(d(3).unwrap(), L2Entry::Unallocated);
        assert!(L2Entry::decode_extended(0, 1, 0, 16, "t").is_err());
        assert!(L2Entry::decode_extended(raw, 1 | (1 << 32), 0, 16, "t").is_err());
    }

    #[test]
    fn compression_type_needs_its_feature_bit() {
        let mut h = sample();
        let mut b = h.to_bytes();
        assert_eq!(compression_type(&h, &b, "t").unwrap(), Compression::Deflate);
        b[104] = COMPRESSION_ZSTD;
        let err = compression_type(&h, &b, "t").unwrap_err().to_string();
        assert!(err.contains("feature bit"), "{err}");
        h.incompatible_features = INCOMPAT_COMPRESSION_TYPE;
        assert_eq!(compression_type(&h, &b, "t").unwrap(), Compression::Zstd);
        b[104] = 2;
        let err = compression_type(&h, &b, "t").unwrap_err().to_string();
        assert!(err.contains("compression type 2"), "{err}");
    }

    #[test]
    fn tables_must_fit_the_file() {
        let h = sample();
        // L1 at 0x30000 (20 entries), refcount table at 0x10000 (one cluster).
        h.check_file(0x30000 + 160, "t").unwrap();
        // The last cluster may be short, but not missing.
        h.check_file(0x30001, "t").unwrap();
        let err = h.check_file(0x30000, "t").unwrap_err().to_string();
        assert!(err.contains("l1_size 20"), "{err}");
        let mut h = sample();
        h.l1_size = 0;
        h.refcount_table_clusters = 3;
        let err = h.check_file(0x30000, "t").unwrap_err().to_string();
        assert!(err.contains("refcount_table_clusters 3"), "{err}");
    }

    #[test]
    fn sizes_past_qemus_limits_are_refused_by_name() {
        for (field, patch) in [
            ("l1_size", (36, 4, (MAX_L1_BYTES / 8 + 1))),
            ("refcount_table_clusters", (56, 4, 1025)),
            ("nb_snapshots", (60, 4, u64::from(MAX_SNAPSHOTS) + 1)),
            ("backing_file_size", (16, 4, 1024)),
            ("backing_file_offset", (8, 8, 0x1_0000)),
            ("size", (24, 8, u64::MAX)),
        ] {
            let mut b = sample().to_bytes();
            b.extend_from_slice(&extensions_to_bytes(None));
            let (at, width, value) = patch;
            b[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
            if field == "backing_file_offset" {
                b[16..20].copy_from_slice(&1u32.to_be_bytes());
            }
            let err = Header::parse(&b, "t").unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn backing_name_and_format_are_read() {
        let mut h = sample();
        let ext = extensions_to_bytes(Some("qcow2"));
        h.backing_file_offset = (V3_HEADER_LENGTH + ext.len()) as u64;
        h.backing_file_size = 8;
        let mut b = h.to_bytes();
        b.extend_from_slice(&ext);
        b.extend_from_slice(b"base.img");
        let h = Header::parse(&b, "t").unwrap();
        let e = parse_extensions(&h, &b, "t").unwrap();
        assert_eq!(e.backing_file.as_deref(), Some("base.img"));
        assert_eq!(e.backing_format.as_deref(), Some("qcow2"));
    }
}
