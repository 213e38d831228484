//! Opening an endpoint from its specification: the one place that knows every kind of
//! endpoint (raw files and block devices, NBD exports, QCOW2 images).
//!
//! A specification is `nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH` or a local
//! path. A path is routed by what it is ([`kind_of`]): a file that starts with the QCOW2 magic is
//! QCOW2, a target path ending in `.qcow2` that does not exist is a QCOW2 image to create, and
//! anything else is a raw file or block device. Callers get an `Arc<dyn Endpoint>` and never see
//! the concrete type; [`crate::endpoint`], the interface, knows none of the implementations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::endpoint::file::FileEndpoint;
use crate::endpoint::{blocking, Access, Endpoint, Kind, OpenOptions};
use crate::error::{MoverError, Result};
use crate::nbd::{NbdEndpoint, NbdOptions};
use crate::qcow2::{self, Backing, BackingFormat, Qcow2Source, Qcow2Target};

/// Each kind's own defaults: NBD's timeouts, QCOW2's cluster size.
impl Default for OpenOptions {
    fn default() -> Self {
        let nbd = NbdOptions::default();
        Self {
            reconnect_timeout: nbd.reconnect_timeout,
            connect_timeout: nbd.connect_timeout,
            request_timeout: nbd.request_timeout,
            backing: None,
            cluster_size: qcow2::DEFAULT_CLUSTER_SIZE,
            cancel: nbd.cancel,
            allowed_backing_roots: Vec::new(),
        }
    }
}

/// Classify `spec` for `access` (reads the first bytes of an existing file).
pub fn kind_of(spec: &str, access: Access) -> Result<Kind> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        return Ok(Kind::Nbd);
    }
    if spec.contains("://") {
        return Err(MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason: "unknown scheme: use nbd://, nbd+unix:// or a local path".into(),
        });
    }
    let path = Path::new(spec);
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let qcow2_name = path
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("qcow2"));
            Ok(match access {
                Access::Write { .. } if qcow2_name => Kind::NewQcow2,
                _ => Kind::Raw,
            })
        }
        Err(_) => Ok(Kind::Raw),
        Ok(meta) if meta.is_dir() => Err(MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason: "is a directory".into(),
        }),
        Ok(_) => Ok(if qcow2::is_qcow2(path)? {
            Kind::Qcow2
        } else {
            Kind::Raw
        }),
    }
}

/// Open an endpoint with the default [`OpenOptions`].
pub async fn open(spec: &str, access: Access) -> Result<Arc<dyn Endpoint>> {
    open_with(spec, access, &OpenOptions::default()).await
}

/// Open an endpoint from its specification: `nbd://host[:port]/export`,
/// `nbd+unix:///export?socket=PATH`, a QCOW2 image (with its backing chain), or a path to a raw
/// file or block device.
///
/// Routing: a file that starts with the QCOW2 magic is QCOW2; a target path ending in `.qcow2`
/// that does not exist is created as a new QCOW2 image of `create_size` bytes (an overlay when
/// `opts.backing` is set). An existing QCOW2 image is never opened for writing: backups are
/// written once, into new files. `opts.backing` with any other kind of target is refused.
pub async fn open_with(
    spec: &str,
    access: Access,
    opts: &OpenOptions,
) -> Result<Arc<dyn Endpoint>> {
    let kind = kind_of(spec, access)?;
    if opts.backing.is_some() && kind != Kind::NewQcow2 {
        return Err(MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason: "a backing file needs a new QCOW2 target (a path ending in .qcow2 that does not exist)"
                .into(),
        });
    }
    match (kind, access) {
        (Kind::Nbd, _) => {
            let nbd_opts = NbdOptions {
                reconnect_timeout: opts.reconnect_timeout,
                connect_timeout: opts.connect_timeout,
                request_timeout: opts.request_timeout,
                cancel: opts.cancel.clone(),
            };
            Ok(Arc::new(
                NbdEndpoint::open_with(spec, access, nbd_opts).await?,
            ))
        }
        (Kind::Raw, _) => Ok(Arc::new(FileEndpoint::open(spec, access).await?)),
        (Kind::Qcow2, Access::Read) => {
            let path = PathBuf::from(spec);
            let roots = opts.allowed_backing_roots.clone();
            let src = blocking(move || Qcow2Source::open_with(&path, &roots)).await?;
            Ok(Arc::new(src))
        }
        (Kind::Qcow2, Access::Write { .. }) => Err(MoverError::InvalidEndpoint {
            spec: spec.to_owned(),
            reason: "is an existing QCOW2 image; the mover writes QCOW2 only into new files \
                     (give a new path ending in .qcow2, with --backing for an overlay)"
                .into(),
        }),
        (Kind::NewQcow2, Access::Read) => Err(MoverError::Connect {
            endpoint: spec.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }),
        (Kind::NewQcow2, Access::Write { create_size }) => {
            let path = PathBuf::from(spec);
            let cluster = opts.cluster_size;
            let backing = match &opts.backing {
                None => None,
                Some(b) => {
                    let format = if qcow2::is_qcow2(b)? {
                        BackingFormat::Qcow2
                    } else {
                        BackingFormat::Raw
                    };
                    Some(Backing {
                        path: b.clone(),
                        format,
                    })
                }
            };
            // QEMU wants a virtual size in whole sectors.
            let size = create_size.div_ceil(512) * 512;
            let dst = blocking(move || Qcow2Target::create(&path, size, cluster, backing.as_ref()))
                .await?;
            Ok(Arc::new(dst))
        }
    }
}
