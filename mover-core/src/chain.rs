//! Backup chains: checksum, verify, consolidate and describe QCOW2 images and their chains.
//!
//! A backup of a disk is a chain of QCOW2 files: a full (standalone) image and incremental
//! overlays on it, each with a BLAKE3 manifest beside it ([`crate::manifest`]) describing the
//! whole logical disk as seen through that file.
//!
//! # Checksum and verify
//!
//! [`checksum`] digests any source with [`checksum_endpoint`] (several workers in parallel;
//! chunks the allocation map reports as zeros are not read). [`verify`] compares the result
//! with the manifest and names each chunk that differs. [`verify_chain`] verifies every
//! file of a chain against its own manifest, each read through its own backing files, so a
//! flipped byte in any layer is found, even where newer layers hide it from the top.
//!
//! # Consolidate
//!
//! [`consolidate`] flattens a chain, or its oldest N layers, into a new standalone image. The
//! one rule: a crash at any step leaves every restore point readable. So the new image is never
//! written in place:
//!
//! 1. it is written to a temporary file beside its final name (`.NAME.consolidate-tmp`; left
//!    over ones from an earlier crash, for any layer of the chain, are removed first — they are
//!    never restore points), with its manifest computed inline;
//! 2. it is re-read from disk and checked against the manifest of the layer whose disk it holds
//!    (the logical disks must be identical: a damaged chain or a bad write stops here), or,
//!    when that layer has none, against the manifest computed inline while writing;
//! 3. file and directory are `fsync`ed, then it is renamed over its final name in one atomic
//!    step, the directory is `fsync`ed, and its manifest follows the same way;
//! 4. only then are the files it made redundant removed, newest first, so that each file still
//!    present at any moment still has its whole backing chain.
//!
//! Merging the oldest N layers (`layers = N`, the retention case being N = 2: the oldest
//! increment merged into the full) writes the merged disk under the name of the N-th oldest
//! layer. The layer above it names that file as its backing file, and the logical disk it finds
//! there is unchanged — the same bytes, now without a backing chain — so no header is rewritten
//! anywhere. Before the rename the old chain is intact; after it the new one is complete; the
//! N − 1 older files are then removed. With `output`, the flattened disk goes to a new file
//! (made visible with a hard link, which refuses to replace an existing file) and the chain is
//! left as it was.
//!
//! # Info
//!
//! [`info`] describes a chain as JSON-ready data: its files (format, virtual size, file size,
//! allocated bytes, cluster size, backing file and format, manifest) and its allocation map
//! (data by layer, zero, unallocated).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::copy::{self, CopyOptions};
use crate::endpoint::{blocking, Access, Endpoint};
use crate::error::{MoverError, Result};
use crate::manifest::{
    checksum_endpoint, ChunkMismatch, Digest, Manifest, ManifestBuilder, DEFAULT_CHUNK_SIZE,
};
use crate::open::open;
use crate::plan::PlanKind;
use crate::progress::{CancelToken, Progress};
use crate::qcow2::{Allocation, Qcow2Chain, Qcow2Source, Qcow2Target, DEFAULT_CLUSTER_SIZE};

fn hex(d: &Digest) -> String {
    blake3::Hash::from(*d).to_hex().to_string()
}

/// A manifest made for a source, and where it was saved.
#[derive(Clone, Debug)]
pub struct ChecksumReport {
    pub source: String,
    pub manifest: Option<PathBuf>,
    pub disk_size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub disk_digest: String,
    pub bytes_read: u64,
    pub seconds: f64,
}

/// Make a manifest for any source (NBD URI, raw file, QCOW2 chain), saving it to `output` when
/// given.
pub async fn checksum(
    source: &str,
    output: Option<&Path>,
    chunk_size: u64,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<ChecksumReport> {
    let start = Instant::now();
    let ep = open(source, Access::Read).await?;
    let result = checksum_endpoint(&ep, chunk_size, progress, cancel).await;
    let _ = ep.close().await;
    let m = result?;
    if let Some(out) = output {
        let (m2, out2) = (m.clone(), out.to_owned());
        blocking(move || m2.save(&out2)).await?;
    }
    Ok(ChecksumReport {
        source: source.to_owned(),
        manifest: output.map(Path::to_owned),
        disk_size: m.disk_size(),
        chunk_size: m.chunk_size(),
        chunks: m.chunk_count(),
        disk_digest: hex(&m.disk_digest()),
        bytes_read: progress.snapshot().bytes_read,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The outcome of verifying one image against its manifest.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub image: String,
    pub manifest: PathBuf,
    pub chunks: u64,
    pub bytes_read: u64,
    /// Disk digest recorded in the manifest.
    pub expected_digest: String,
    /// Disk digest of what was read.
    pub found_digest: String,
    pub mismatches: Vec<ChunkMismatch>,
    pub seconds: f64,
}

impl VerifyReport {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Re-read `image` (through its chain) and compare it with `manifest` (by default the one
/// beside it).
pub async fn verify(
    image: &str,
    manifest: Option<&Path>,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<VerifyReport> {
    let start = Instant::now();
    let mpath = manifest.map_or_else(|| Manifest::path_for(Path::new(image)), Path::to_owned);
    let mp = mpath.clone();
    let expected = blocking(move || Manifest::load(&mp)).await?;
    let ep = open(image, Access::Read).await?;
    if ep.capabilities().size != expected.disk_size() {
        let size = ep.capabilities().size;
        let _ = ep.close().await;
        return Err(MoverError::Format {
            path: image.to_owned(),
            message: format!(
                "disk of {size} bytes, but its manifest {} describes {} bytes",
                mpath.display(),
                expected.disk_size()
            ),
        });
    }
    let found = checksum_endpoint(&ep, expected.chunk_size(), progress, cancel).await;
    let _ = ep.close().await;
    let found = found?;
    Ok(VerifyReport {
        image: image.to_owned(),
        manifest: mpath,
        chunks: expected.chunk_count(),
        bytes_read: progress.snapshot().bytes_read,
        expected_digest: hex(&expected.disk_digest()),
        found_digest: hex(&found.disk_digest()),
        mismatches: expected.diff(&found)?,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Verify every file of the chain of `top` that has a manifest, each through its own backing
/// files, oldest last. Files without a manifest are listed in the second vector.
pub async fn verify_chain(
    top: &Path,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<(Vec<VerifyReport>, Vec<String>)> {
    let t = top.to_owned();
    let paths: Vec<String> = blocking(move || {
        let chain = Qcow2Chain::open(&t)?;
        Ok((0..chain.depth())
            .map(|i| chain.layer_path(i).to_owned())
            .collect())
    })
    .await?;
    let mut reports = Vec::new();
    let mut unverified = Vec::new();
    for p in paths {
        if Manifest::path_for(Path::new(&p)).exists() {
            reports.push(verify(&p, None, progress, cancel).await?);
        } else {
            unverified.push(p);
        }
    }
    Ok((reports, unverified))
}

/// How to consolidate.
#[derive(Clone, Debug)]
pub struct ConsolidateOptions {
    /// Merge the oldest N layers (2 ..= depth) into one standalone image under the name of the
    /// N-th oldest, removing the older ones. `None`: the whole chain (requires `output`).
    pub layers: Option<usize>,
    /// Write the flattened disk to this new file and leave the chain as it is.
    pub output: Option<PathBuf>,
    pub cluster_size: u64,
    /// Manifest chunk size when the replaced layer has no manifest to follow.
    pub chunk_size: u64,
    pub copy: CopyOptions,
}

impl Default for ConsolidateOptions {
    fn default() -> Self {
        Self {
            layers: None,
            output: None,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            chunk_size: DEFAULT_CHUNK_SIZE,
            copy: CopyOptions::default(),
        }
    }
}

/// What a consolidation did.
#[derive(Clone, Debug)]
pub struct ConsolidateReport {
    /// The new standalone image.
    pub image: PathBuf,
    /// The files whose data it holds, newest first.
    pub merged: Vec<String>,
    /// The files removed because nothing needs them any more.
    pub removed: Vec<String>,
    pub disk_size: u64,
    pub disk_digest: String,
    pub bytes_written: u64,
    pub seconds: f64,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> MoverError {
    MoverError::io(format!("{what} {}", path.display()), e)
}

fn dir_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned()
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync the directory", dir, e))
}

/// The temporary name a consolidation writes `dest` under.
#[must_use]
pub fn temporary_name(dest: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(dest.file_name().unwrap_or_default());
    name.push(".consolidate-tmp");
    dir_of(dest).join(name)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", path, e)),
        _ => Ok(()),
    }
}

/// Flatten a chain, or its oldest layers; see the module documentation.
pub async fn consolidate(
    top: &Path,
    opts: &ConsolidateOptions,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<ConsolidateReport> {
    let start = Instant::now();
    let t = top.to_owned();
    let chain = blocking(move || Qcow2Chain::open(&t)).await?;
    let depth = chain.depth();
    let layers: Vec<String> = (0..depth).map(|i| chain.layer_path(i).to_owned()).collect();
    drop(chain);
    // `keep`: the layer whose logical disk the new image holds.
    let keep = match (opts.layers, &opts.output) {
        (None, None) => {
            return Err(MoverError::InvalidPlan(
                "consolidate needs the number of oldest layers to merge, or an output file".into(),
            ))
        }
        (None, Some(_)) => 0,
        (Some(n), _) if !(2..=depth).contains(&n) => {
            return Err(MoverError::InvalidPlan(format!(
                "cannot merge the oldest {n} layers of a chain of {depth}"
            )))
        }
        (Some(n), _) => depth - n,
    };
    let source = PathBuf::from(&layers[keep]);
    let (dest, replace) = match &opts.output {
        Some(out) => {
            if out.exists() {
                return Err(MoverError::InvalidEndpoint {
                    spec: out.display().to_string(),
                    reason: "already exists; consolidate writes only new files".into(),
                });
            }
            (out.clone(), false)
        }
        None => (source.clone(), true),
    };
    let tmp = temporary_name(&dest);
    let tmp_manifest = Manifest::path_for(&tmp);
    // Leftovers of a consolidation killed earlier, whichever layer it was writing: a temporary
    // file is never a restore point.
    for name in layers.iter().map(PathBuf::from).chain([dest.clone()]) {
        let stale = temporary_name(&name);
        remove_if_present(&Manifest::path_for(&stale))?;
        remove_if_present(&stale)?;
    }

    // The manifest the source chain should have, when it has one: the new image must match it.
    let source_manifest = Manifest::path_for(&source);
    let expected = if source_manifest.exists() {
        let p = source_manifest.clone();
        Some(blocking(move || Manifest::load(&p)).await?)
    } else {
        None
    };
    let chunk_size = expected
        .as_ref()
        .map_or(opts.chunk_size, Manifest::chunk_size);

    // With the source's manifest at hand the new image is checked against it, and digesting
    // inline while writing would only digest the same data twice.
    let inline = expected.is_none();
    let written = write_flat(&source, &tmp, opts, chunk_size, inline, progress, cancel).await;
    let (made, bytes_written) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let manifest = made
        .or(expected)
        .expect("a manifest is made inline when the source has none");
    let checked = check_written(&tmp, &manifest, progress, cancel).await;
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }

    let (tmp2, dest2, tm2) = (tmp.clone(), dest.clone(), tmp_manifest.clone());
    let m2 = manifest.clone();
    blocking(move || publish(&tmp2, &tm2, &dest2, &m2, replace)).await?;

    // The older layers are no longer anyone's backing file: remove them, newest first.
    let mut removed = Vec::new();
    if replace {
        for old in &layers[keep + 1..] {
            let p = PathBuf::from(old);
            remove_if_present(&p)?;
            remove_if_present(&Manifest::path_for(&p))?;
            removed.push(old.clone());
        }
        if !removed.is_empty() {
            fsync_dir(&dir_of(&dest))?;
        }
    }
    Ok(ConsolidateReport {
        image: dest,
        merged: layers[keep..].to_vec(),
        removed,
        disk_size: manifest.disk_size(),
        disk_digest: hex(&manifest.disk_digest()),
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Copy the logical disk of `source` into a new standalone image at `tmp`, with its manifest
/// computed inline when `inline`.
async fn write_flat(
    source: &Path,
    tmp: &Path,
    opts: &ConsolidateOptions,
    chunk_size: u64,
    inline: bool,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<(Option<Manifest>, u64)> {
    let s = source.to_owned();
    let src: Arc<dyn Endpoint> = Arc::new(blocking(move || Qcow2Source::open(&s)).await?);
    let size = src.capabilities().size.div_ceil(512) * 512;
    let (t, cs) = (tmp.to_owned(), opts.cluster_size);
    let dst: Arc<dyn Endpoint> =
        Arc::new(blocking(move || Qcow2Target::create(&t, size, cs, None)).await?);
    let builder = if inline {
        Some(Arc::new(ManifestBuilder::new(size, chunk_size)?))
    } else {
        None
    };
    let copy_opts = CopyOptions {
        target_is_zero: true,
        checkpoint: None,
        ..opts.copy.clone()
    };
    let snap = copy::copy_reporting(
        Arc::clone(&src),
        Arc::clone(&dst),
        &PlanKind::Allocated,
        &copy_opts,
        Arc::clone(progress),
        Arc::clone(cancel),
        builder.clone(),
    )
    .await?
    .progress;
    let manifest = match builder {
        Some(b) => {
            copy::complete_manifest(&b, &*dst).await?;
            Some(b.to_manifest()?)
        }
        None => None,
    };
    dst.close().await?;
    Ok((manifest, snap.bytes_written))
}

/// Re-read the new image from disk and compare it with `manifest`: the one of the layer it
/// replaces, or the one made while writing it.
async fn check_written(
    tmp: &Path,
    manifest: &Manifest,
    progress: &Arc<Progress>,
    cancel: &Arc<CancelToken>,
) -> Result<()> {
    let t = tmp.to_owned();
    let ep: Arc<dyn Endpoint> = Arc::new(blocking(move || Qcow2Source::open(&t)).await?);
    let found = checksum_endpoint(&ep, manifest.chunk_size(), progress, cancel).await?;
    let bad = manifest.diff(&found).map_err(|e| MoverError::Format {
        path: tmp.display().to_string(),
        message: e.to_string(),
    })?;
    if let Some(first) = bad.first() {
        return Err(MoverError::Format {
            path: tmp.display().to_string(),
            message: format!(
                "the consolidated image does not match the manifest of the chain: {} chunks differ, first {first}",
                bad.len()
            ),
        });
    }
    Ok(())
}

/// Make the verified temporary image durable and give it its final name, then its manifest.
fn publish(
    tmp: &Path,
    tmp_manifest: &Path,
    dest: &Path,
    m: &Manifest,
    replace: bool,
) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("fsync", tmp, e))?;
    // Written in place: the temporary manifest is itself what a later run cleans up when this
    // one is killed. (`save` would add its own temporary, named by this process's id, which a
    // later run could not know.)
    m.write_synced(tmp_manifest)?;
    let dir = dir_of(dest);
    fsync_dir(&dir)?;
    let dest_manifest = Manifest::path_for(dest);
    if replace {
        std::fs::rename(tmp, dest).map_err(|e| io_err("atomic rename onto", dest, e))?;
        fsync_dir(&dir)?;
        std::fs::rename(tmp_manifest, &dest_manifest)
            .map_err(|e| io_err("atomic rename onto", &dest_manifest, e))?;
    } else {
        std::fs::hard_link(tmp, dest).map_err(|e| io_err("link", dest, e))?;
        std::fs::remove_file(tmp).map_err(|e| io_err("remove", tmp, e))?;
        remove_if_present(&dest_manifest)?;
        std::fs::hard_link(tmp_manifest, &dest_manifest)
            .map_err(|e| io_err("link", &dest_manifest, e))?;
        std::fs::remove_file(tmp_manifest).map_err(|e| io_err("remove", tmp_manifest, e))?;
    }
    fsync_dir(&dir)
}

/// One file of a chain.
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    pub path: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub file_size: u64,
    /// Bytes the file occupies on disk.
    pub allocated_bytes: u64,
    pub cluster_size: Option<u64>,
    pub version: Option<u32>,
    /// The backing file as stored in the header, and its recorded format.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The manifest beside the file, when there is one.
    pub manifest: Option<String>,
}

/// One run of the allocation map.
#[derive(Clone, Debug, Serialize)]
pub struct MapRun {
    pub offset: u64,
    pub length: u64,
    /// `data`, `zero` or `unallocated`.
    pub kind: &'static str,
    /// The layer holding the data (0 is the top image).
    pub layer: Option<usize>,
}

/// A chain and its allocation map.
#[derive(Clone, Debug, Serialize)]
pub struct ChainInfo {
    pub image: String,
    pub virtual_size: u64,
    pub depth: usize,
    pub layers: Vec<LayerInfo>,
    /// Bytes of the disk stored as data in any layer.
    pub data_bytes: u64,
    pub map: Vec<MapRun>,
}

/// Describe the chain of `image` (a QCOW2 image or a raw file). Blocking.
pub fn info(image: &Path) -> Result<ChainInfo> {
    use std::os::unix::fs::MetadataExt;
    let chain = if crate::qcow2::is_qcow2(image)? {
        Qcow2Chain::open(image)?
    } else {
        Qcow2Chain::open_as(image, crate::qcow2::BackingFormat::Raw)?
    };
    let mut layers = Vec::new();
    for i in 0..chain.depth() {
        let path = chain.layer_path(i).to_owned();
        let meta = std::fs::metadata(&path).map_err(|e| io_err("stat", Path::new(&path), e))?;
        let manifest = Manifest::path_for(Path::new(&path));
        let img = chain.layer_image(i);
        let (backing_file, backing_format) = img.map_or((None, None), |q| {
            let (f, fmt) = q.backing();
            (f.map(str::to_owned), fmt.map(str::to_owned))
        });
        layers.push(LayerInfo {
            format: if img.is_some() { "qcow2" } else { "raw" },
            virtual_size: chain.layer_size(i),
            file_size: meta.len(),
            allocated_bytes: meta.blocks() * 512,
            cluster_size: img.map(crate::qcow2::reader::Qcow2Image::cluster_size),
            version: img.map(|q| q.header().version),
            backing_file,
            backing_format,
            manifest: manifest.exists().then(|| manifest.display().to_string()),
            path,
        });
    }
    let mut map = Vec::new();
    let mut data_bytes = 0;
    for e in chain.map(0, chain.size())? {
        let (kind, layer) = match e.allocation {
            Allocation::Data { layer } => {
                data_bytes += e.length;
                ("data", Some(layer))
            }
            Allocation::Zero => ("zero", None),
            Allocation::Unallocated => ("unallocated", None),
        };
        map.push(MapRun {
            offset: e.offset,
            length: e.length,
            kind,
            layer,
        });
    }
    Ok(ChainInfo {
        image: image.display().to_string(),
        virtual_size: chain.size(),
        depth: chain.depth(),
        layers,
        data_bytes,
        map,
    })
}
