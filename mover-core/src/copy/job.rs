//! The whole `mover copy` job: route and open both endpoints, create a QCOW2 target (or reopen
//! the one an interrupted copy created), copy, flush, and complete and save the manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{copy_reporting, Copied, CopyOptions};
use crate::endpoint::{blocking, Access, Endpoint, Kind, OpenOptions};
use crate::error::{MoverError, Result};
use crate::manifest::{checksum_endpoint, Manifest, ManifestBuilder};
use crate::open::{kind_of, open, open_with};
use crate::plan::{self, PlanKind};
use crate::progress::{CancelToken, Progress, ProgressSnapshot};
use crate::qcow2::{Qcow2Target, Qcow2Writer};

/// The manifest a copy wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestReport {
    pub path: PathBuf,
    pub disk_digest: String,
    pub chunks: u64,
    /// Chunks read back through the target because no request covered them whole.
    pub chunks_read_back: u64,
}

/// What [`run`] did.
#[derive(Clone, Debug)]
pub struct CopyOutcome {
    pub progress: ProgressSnapshot,
    pub manifest: Option<ManifestReport>,
    /// Every flush of the target reached stable storage; see [`Copied::durable`].
    pub durable: bool,
}

/// The manifest of the disk an overlay is created on: the one saved beside it (whose chunk size
/// the overlay's manifest keeps), or, when there is none, one computed by reading the backing
/// chain in `chunk_size` chunks.
async fn parent_manifest(
    backing: &Path,
    disk_size: u64,
    chunk_size: u64,
    cancel: &Arc<CancelToken>,
) -> Result<ManifestBuilder> {
    let saved = Manifest::path_for(backing);
    let parent = if saved.exists() {
        let p = saved.clone();
        tokio::task::spawn_blocking(move || Manifest::load(&p))
            .await
            .map_err(|e| MoverError::io("manifest reader", std::io::Error::other(e)))??
    } else {
        let spec = backing.display().to_string();
        let src = open(&spec, Access::Read).await?;
        checksum_endpoint(&src, chunk_size, &Arc::default(), cancel).await?
    };
    ManifestBuilder::from_parent(&parent, disk_size)
}

/// Read back the chunks no request covered whole, through the target (and its chain).
pub(crate) async fn complete_manifest(
    builder: &ManifestBuilder,
    target: &dyn Endpoint,
) -> Result<u64> {
    let stale = builder.stale_chunks();
    let mut buf = Vec::new();
    for &index in &stale {
        let (offset, length) = builder.chunk_range(index);
        buf.resize(length as usize, 0);
        buf = target
            .read(offset, buf)
            .await
            .map_err(|e| e.on_source(offset, length))?;
        builder.record(offset, &buf);
    }
    Ok(stale.len() as u64)
}

/// The whole copy job from two endpoint specifications: route and open them (a new QCOW2
/// target is created, as an overlay when `open.backing` is set), copy, flush, and write the
/// manifest beside a new QCOW2 image (or where `opts.manifest` says).
///
/// A new standalone QCOW2 image reads as zeros, so zero runs of the source are skipped
/// (`target_is_zero`); an overlay never is, since its unwritten clusters read the backing file.
pub async fn run(
    source: &str,
    target: &str,
    kind: &PlanKind,
    opts: &CopyOptions,
    open: &OpenOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
) -> Result<CopyOutcome> {
    let target_kind = kind_of(target, Access::Write { create_size: 0 })?;
    // Bad options are refused before anything is opened, let alone created.
    opts.check()?;
    // An existing QCOW2 image is written only to finish the copy its checkpoint describes.
    let resume_qcow2 =
        target_kind == Kind::Qcow2 && opts.checkpoint.as_deref().is_some_and(Path::exists);
    // A raw file that does not exist yet is created sparse: it reads as zeros.
    let new_raw = target_kind == Kind::Raw && !Path::new(target).exists();
    // A cancelled copy must not wait for a lost NBD server to come back.
    let open = &OpenOptions {
        cancel: Some(Arc::clone(&cancel)),
        ..open.clone()
    };
    let src_open = OpenOptions {
        backing: None,
        ..open.clone()
    };
    let src = open_with(source, Access::Read, &src_open).await?;
    let size = src.capabilities().size;
    // An explicit plan that does not fit the source is refused before the target is created.
    let opened = match plan::check(kind, size) {
        Err(e) => Err(e),
        Ok(()) if resume_qcow2 => reopen_qcow2(target, size, open).await,
        Ok(()) => open_with(target, Access::Write { create_size: size }, open).await,
    };
    let dst = match opened {
        Ok(d) => d,
        Err(e) => {
            let _ = src.close().await;
            return Err(e);
        }
    };
    let result = run_open(
        &src,
        &dst,
        target,
        target_kind == Kind::NewQcow2 || resume_qcow2,
        new_raw,
        kind,
        opts,
        open,
        progress,
        cancel,
    )
    .await;
    let _ = src.close().await;
    let closed = dst.close().await;
    let outcome = result?;
    closed.map_err(|e| e.on_target(0, 0))?;
    Ok(outcome)
}

/// Reopen the QCOW2 image an interrupted copy created, to finish that copy from its checkpoint.
/// The image must be what the same command would create: the same size and the same backing
/// file (`open.backing`).
async fn reopen_qcow2(target: &str, size: u64, open: &OpenOptions) -> Result<Arc<dyn Endpoint>> {
    let path = PathBuf::from(target);
    let backing = open.backing.clone();
    let spec = target.to_owned();
    let writer = blocking(move || {
        let writer = Qcow2Writer::open_to_resume(&path)?;
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        let matches = match (&backing, writer.backing()) {
            (None, None) => true,
            (Some(b), Some(chain)) => same(b, Path::new(chain.layer_path(0))),
            _ => false,
        };
        if !matches {
            return Err(MoverError::InvalidEndpoint {
                spec,
                reason: "its backing file is not the one --backing names; resume with the same \
                         command as the interrupted copy"
                    .into(),
            });
        }
        Ok(writer)
    })
    .await?;
    let want = size.div_ceil(512) * 512;
    if writer.size() != want {
        return Err(MoverError::InvalidPlan(format!(
            "{target} holds a {}-byte disk, the source {size} bytes: it is not the image this \
             copy was creating",
            writer.size()
        )));
    }
    Ok(Arc::new(Qcow2Target::from_writer(Arc::new(writer))))
}

#[allow(clippy::too_many_arguments)]
async fn run_open(
    src: &Arc<dyn Endpoint>,
    dst: &Arc<dyn Endpoint>,
    target: &str,
    own_qcow2: bool,
    new_raw: bool,
    kind: &PlanKind,
    opts: &CopyOptions,
    open: &OpenOptions,
    progress: Arc<Progress>,
    cancel: Arc<CancelToken>,
) -> Result<CopyOutcome> {
    // A QCOW2 image this copy creates, or created before it was interrupted.
    let new_qcow2 = own_qcow2;
    let manifest_path = match (&opts.manifest, new_qcow2) {
        _ if opts.skip_manifest => None,
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(Manifest::path_for(Path::new(target))),
        (None, false) => None,
    };
    let disk_size = dst.capabilities().size;
    let chunk = opts.manifest_chunk_size;
    let builder = match (&manifest_path, &open.backing) {
        (None, _) => None,
        (Some(_), Some(backing)) => Some(Arc::new(
            parent_manifest(backing, disk_size, chunk, &cancel).await?,
        )),
        (Some(_), None) if new_qcow2 => Some(Arc::new(ManifestBuilder::new(disk_size, chunk)?)),
        // A raw file this copy creates reads as zeros.
        (Some(_), None) if new_raw => Some(Arc::new(ManifestBuilder::new(disk_size, chunk)?)),
        // An existing target of unknown contents: whatever the copy does not write is read back.
        (Some(_), None) => {
            let b = ManifestBuilder::new(disk_size, chunk)?;
            b.invalidate(0, disk_size);
            Some(Arc::new(b))
        }
    };
    let mut opts = opts.clone();
    if new_qcow2 {
        opts.target_is_zero = open.backing.is_none();
    }
    let Copied {
        progress: snapshot,
        durable,
    } = copy_reporting(
        Arc::clone(src),
        Arc::clone(dst),
        kind,
        &opts,
        progress,
        cancel,
        builder.clone(),
    )
    .await?;
    let (Some(path), Some(builder)) = (manifest_path, builder) else {
        return Ok(CopyOutcome {
            progress: snapshot,
            manifest: None,
            durable,
        });
    };
    let read_back = complete_manifest(&builder, &**dst).await?;
    // Streamed from the builder: a manifest of a large disk is never held in memory whole.
    let (b, p) = (Arc::clone(&builder), path.clone());
    let disk_digest = blocking(move || b.save(&p)).await?;
    Ok(CopyOutcome {
        progress: snapshot,
        manifest: Some(ManifestReport {
            path,
            disk_digest: blake3::Hash::from(disk_digest).to_hex().to_string(),
            chunks: builder.chunk_count(),
            chunks_read_back: read_back,
        }),
        durable,
    })
}
