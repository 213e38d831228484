//! Hostile QCOW2 images: backing names that point at host files, and header fields that claim
//! tables far larger than the file. Each must be refused with a `MoverError::Format` that names
//! what is wrong — never a read outside the image's directory, never a huge allocation, never a
//! panic. The images are made by `qemu-img` (the test fails when it is missing) and patched.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::run;
use mover_core::qcow2::format::MAGIC;
use mover_core::qcow2::reader::MAX_CHAIN_DEPTH;
use mover_core::qcow2::{BackingFormat, Qcow2Chain, Qcow2Writer};
use mover_core::MoverError;

const SECRET: &[u8] = b"host secret: this file must never reach a target disk";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A host file outside the image's directory, with recognisable contents.
fn secret(dir: &Path) -> PathBuf {
    let p = dir.join("secret.raw");
    let mut bytes = SECRET.to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// An overlay at `image` whose backing name is stored exactly as `name` (raw backing, 1 MiB).
fn overlay(image: &Path, name: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            name,
            "-F",
            "raw",
            s(image),
            "1M",
        ],
    );
}

fn assert_refused(result: mover_core::Result<Qcow2Chain>, what: &str) {
    match result {
        Err(e @ MoverError::Format { .. }) => {
            assert!(e.to_string().contains(what), "expected {what:?} in: {e}");
        }
        Err(e) => panic!("expected a format error naming {what:?}, got {e:?}"),
        Ok(chain) => {
            let mut buf = vec![0u8; SECRET.len()];
            chain.read_exact_at(0, &mut buf).unwrap();
            panic!(
                "opened (depth {}); first bytes read: {:?}",
                chain.depth(),
                String::from_utf8_lossy(&buf)
            );
        }
    }
}

#[test]
fn absolute_backing_name_is_refused() {
    let images = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let target = secret(host.path());
    let top = images.path().join("top.qcow2");
    overlay(&top, s(&target));
    assert_refused(Qcow2Chain::open(&top), "outside");
}

#[test]
fn backing_name_climbing_out_with_dotdot_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("repo").join("vm");
    std::fs::create_dir_all(&images).unwrap();
    let host = root.path().join("host");
    std::fs::create_dir(&host).unwrap();
    secret(&host);
    let top = images.join("top.qcow2");
    overlay(&top, "../../host/secret.raw");
    assert_refused(Qcow2Chain::open(&top), "outside");
}

#[test]
fn backing_symlink_leading_out_of_the_directory_is_refused() {
    let images = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let target = secret(host.path());
    symlink(&target, images.path().join("base.raw")).unwrap();
    let top = images.path().join("top.qcow2");
    overlay(&top, "base.raw");
    assert_refused(Qcow2Chain::open(&top), "outside");
}

#[test]
fn backing_inside_the_directory_and_its_subdirectories_is_read() {
    let images = tempfile::tempdir().unwrap();
    let sub = images.path().join("bases");
    std::fs::create_dir(&sub).unwrap();
    let base = secret(&sub);
    let mid = sub.join("mid.qcow2");
    overlay(&mid, "secret.raw");
    let top = images.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "bases/mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "1M",
        ],
    );
    let chain = Qcow2Chain::open(&top).unwrap();
    assert_eq!(chain.depth(), 3);
    assert_eq!(chain.layer_path(2), s(&base));
    let mut buf = vec![0u8; SECRET.len()];
    chain.read_exact_at(0, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
}

#[test]
fn allowed_roots_admit_backing_files_outside_the_directory() {
    let images = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    let target = secret(host.path());
    let top = images.path().join("top.qcow2");
    overlay(&top, s(&target));
    let roots = [host.path().to_owned()];
    let chain = Qcow2Chain::open_with(&top, BackingFormat::Qcow2, &roots).unwrap();
    let mut buf = vec![0u8; SECRET.len()];
    chain.read_exact_at(0, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
    // A root elsewhere admits nothing here.
    let other = tempfile::tempdir().unwrap();
    assert_refused(
        Qcow2Chain::open_with(&top, BackingFormat::Qcow2, &[other.path().to_owned()]),
        "outside",
    );
}

/// A real standalone image (1 GiB virtual, 64 KiB clusters) with a few clusters written.
fn real_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("real.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            s(&p),
            "1G",
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 192k", s(&p)],
    );
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(u32::from_be_bytes(bytes[0..4].try_into().unwrap()), MAGIC);
    (p, bytes)
}

/// Write `bytes` with `patch` applied and open the result.
fn patched(
    path: &Path,
    bytes: &[u8],
    patch: impl FnOnce(&mut Vec<u8>),
) -> mover_core::Result<Qcow2Chain> {
    let mut b = bytes.to_vec();
    patch(&mut b);
    std::fs::write(path, &b).unwrap();
    Qcow2Chain::open(path)
}

/// A change to an image's bytes.
type Patch = Box<dyn Fn(&mut Vec<u8>)>;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// On today's main this allocates 16 GiB and fills it (the kernel kills the mover after a
/// minute); run it under `ulimit -v` to see it abort instead.
#[test]
fn huge_l1_size_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = real_image(dir.path());
    let bad = dir.path().join("bad.qcow2");
    assert_refused(patched(&bad, &bytes, |b| put32(b, 36, 1 << 31)), "l1_size");
    // Within QEMU's limit of 32 MiB but still far past the end of the file.
    assert_refused(patched(&bad, &bytes, |b| put32(b, 36, 1 << 20)), "l1_size");
}

#[test]
fn tables_and_names_outside_the_file_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = real_image(dir.path());
    let bad = dir.path().join("bad.qcow2");
    let len = bytes.len() as u64;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "l1_table_offset",
            Box::new(move |b| put64(b, 40, (len + (1 << 30)) & !0xffff)),
        ),
        (
            "refcount_table_clusters",
            Box::new(|b| put32(b, 56, u32::MAX)),
        ),
        (
            "refcount_table_offset",
            Box::new(move |b| put64(b, 48, (len + (1 << 30)) & !0xffff)),
        ),
        ("nb_snapshots", Box::new(|b| put32(b, 60, u32::MAX))),
        (
            "snapshots_offset",
            Box::new(move |b| {
                put32(b, 60, 1);
                put64(b, 64, len + (1 << 20));
            }),
        ),
        (
            "backing_file_offset",
            Box::new(|b| {
                put64(b, 8, u64::MAX - 3);
                put32(b, 16, 100);
            }),
        ),
        (
            "backing_file_size",
            Box::new(|b| {
                put64(b, 8, 0x200);
                put32(b, 16, 0x10000);
            }),
        ),
        ("header_length", Box::new(|b| put32(b, 100, 0x20000))),
        (
            "header extension",
            Box::new(|b| {
                // The first extension (after the 112-byte header) claims 4 GiB of data.
                put32(b, 112, 0x6803_f857);
                put32(b, 116, u32::MAX);
            }),
        ),
        ("size", Box::new(|b| put64(b, 24, u64::MAX))),
    ];
    for (what, patch) in cases {
        let r = patched(&bad, &bytes, |b| patch(b));
        assert_refused(r, what);
    }
    // The unpatched image still opens and reads (the checks do not refuse real images).
    let chain = patched(&bad, &bytes, |_| {}).unwrap();
    let mut buf = vec![0u8; 4096];
    chain.read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
}

/// A chain of `depth` overlays with 512-byte clusters over a raw base holding `SECRET`, all
/// in `dir`: one image made by `qemu-img`, copied with its backing name patched.
fn deep_chain(dir: &Path, depth: usize) -> PathBuf {
    secret(dir);
    let name = |i: usize| format!("l{i:05}.qcow2");
    let first = dir.join(name(0));
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-u",
            "-b",
            "secret.raw",
            "-F",
            "raw",
            s(&first),
            "1M",
        ],
    );
    let template = dir.join("template.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-u",
            "-b",
            &name(0),
            "-F",
            "qcow2",
            s(&template),
            "1M",
        ],
    );
    let bytes = std::fs::read(&template).unwrap();
    std::fs::remove_file(&template).unwrap();
    let at = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    for i in 1..depth {
        let mut b = bytes.clone();
        b[at..at + name(0).len()].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(dir.join(name(i)), b).unwrap();
    }
    dir.join(name(depth - 1))
}

#[test]
fn chains_are_read_to_the_depth_limit_and_refused_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let top = deep_chain(dir.path(), MAX_CHAIN_DEPTH - 1);
    let chain = Qcow2Chain::open(&top).unwrap();
    assert_eq!(chain.depth(), MAX_CHAIN_DEPTH);
    // Reads and maps recurse layer by layer: they must not run out of stack at the limit.
    let mut buf = vec![0u8; SECRET.len()];
    chain.read_exact_at(0, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
    assert!(!chain.map(0, 1 << 20).unwrap().is_empty());
    let deeper = tempfile::tempdir().unwrap();
    let top = deep_chain(deeper.path(), MAX_CHAIN_DEPTH);
    assert_refused(Qcow2Chain::open(&top), "deeper than");
}

/// The writer preallocates a refcount table for twice the disk: 13 MiB for 100 GiB of 512-byte
/// clusters, past QEMU's 8 MiB limit. The reader, which never loads that table, still opens it.
#[test]
fn large_refcount_tables_of_the_writer_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let w = Qcow2Writer::create(&img, 100 << 30, 512, None).unwrap();
    w.write_at(5 << 30, SECRET).unwrap();
    w.finish().unwrap();
    drop(w);
    let chain = Qcow2Chain::open(&img).unwrap();
    let clusters = chain.top().unwrap().header().refcount_table_clusters;
    assert!(u64::from(clusters) * 512 > 8 << 20, "{clusters} clusters");
    let mut buf = vec![0u8; SECRET.len()];
    chain.read_exact_at(5 << 30, &mut buf).unwrap();
    assert_eq!(buf, SECRET);
}
