//! The copy engine writing QCOW2 images with inline manifests, and the chain operations
//! (verify, consolidate, info), checked against `qemu-img`. Without `qemu-img` on the `PATH`
//! the tests say so and pass vacuously.

mod common;

use common::{assert_check_clean, have_qemu, run, s};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mover_core::chain::{self, ConsolidateOptions};
use mover_core::copy::{self, CopyOptions};
use mover_core::endpoint::OpenOptions;
use mover_core::manifest::Manifest;
use mover_core::plan::PlanKind;

const M: u64 = 1 << 20;

fn compare_raw(img: &Path, raw: &Path) {
    run("qemu-img", &["compare", "-F", "raw", s(img), s(raw)]);
}

/// Deterministic bytes (xorshift).
fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A sparse raw disk with data at these ranges.
fn raw_disk(path: &Path, size: u64, data: &[(u64, usize)], seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for (k, &(off, len)) in data.iter().enumerate() {
        d[off as usize..off as usize + len].copy_from_slice(&bytes(seed + k as u64, len));
    }
    write_sparse(path, &d);
    d
}

fn write_sparse(path: &Path, d: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(d.len() as u64).unwrap();
    for (i, c) in d.chunks(64 << 10).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * (64 << 10)) as u64).unwrap();
        }
    }
}

fn copy_to(src: &Path, dst: &Path, kind: &PlanKind, backing: Option<&Path>) -> copy::CopyOutcome {
    let open = OpenOptions {
        backing: backing.map(Path::to_owned),
        ..OpenOptions::default()
    };
    copy::runtime()
        .block_on(copy::run(
            s(src),
            s(dst),
            kind,
            &CopyOptions::default(),
            &open,
            Arc::default(),
            Arc::default(),
        ))
        .unwrap()
}

fn fresh_manifest(d: &[u8]) -> Manifest {
    Manifest::compute(d.len() as u64, M, |off, buf| {
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    })
    .unwrap()
}

fn verify(img: &Path) -> chain::VerifyReport {
    copy::runtime()
        .block_on(chain::verify(
            s(img),
            None,
            &Arc::default(),
            &Arc::default(),
        ))
        .unwrap()
}

/// A chain of `n` layers made by the mover: a full then incrementals, each from a raw
/// snapshot of the disk. Returns the images and the snapshots, oldest first.
fn backup_chain(dir: &Path, n: usize, size: u64) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut images: Vec<PathBuf> = Vec::new();
    let mut snaps = Vec::new();
    let snap0 = dir.join("snap0.raw");
    let mut d = raw_disk(
        &snap0,
        size,
        &[
            (0, 3 * M as usize),
            (5 * M, 1000),
            (9 * M + 4096, 2 * M as usize),
        ],
        1,
    );
    let full = dir.join("b0.qcow2");
    copy_to(&snap0, &full, &PlanKind::Allocated, None);
    images.push(full);
    snaps.push(snap0);
    for i in 1..n {
        // Changes: an unaligned data write, a zeroed range, a whole new chunk.
        let off = (i as u64 * 777_777) % (size - 2 * M);
        let new = bytes(100 + i as u64, 300_000);
        d[off as usize..off as usize + new.len()].copy_from_slice(&new);
        let z = ((i as u64 * 3) % (size / M - 1)) * M;
        d[z as usize..(z + M) as usize].fill(0);
        let snap = dir.join(format!("snap{i}.raw"));
        write_sparse(&snap, &d);
        let img = dir.join(format!("b{i}.qcow2"));
        let changed = vec![(off, new.len() as u64), (z, M)];
        copy_to(
            &snap,
            &img,
            &PlanKind::Explicit(changed),
            Some(images.last().unwrap()),
        );
        images.push(img);
        snaps.push(snap);
    }
    (images, snaps)
}

#[test]
fn new_image_gets_a_manifest_computed_inline() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let d = raw_disk(
        &src,
        16 * M,
        &[
            (0, M as usize),
            (3 * M + 12345, 700_000),
            (15 * M, M as usize),
        ],
        7,
    );
    let img = dir.path().join("full.qcow2");
    let out = copy_to(&src, &img, &PlanKind::Allocated, None);
    assert_check_clean(&img);
    compare_raw(&img, &src);
    let report = out.manifest.unwrap();
    assert_eq!(report.path, Manifest::path_for(&img));
    let m = Manifest::load(&report.path).unwrap();
    assert_eq!(m, fresh_manifest(&d));
    assert!(verify(&img).ok());
    // An existing QCOW2 image is never a target.
    let err = copy::runtime()
        .block_on(copy::run(
            s(&src),
            s(&img),
            &PlanKind::All,
            &CopyOptions::default(),
            &OpenOptions::default(),
            Arc::default(),
            Arc::default(),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("existing QCOW2"), "{err}");
}

#[test]
fn overlay_manifest_is_derived_from_the_parent() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (images, snaps) = backup_chain(dir.path(), 3, 12 * M);
    for (img, snap) in images.iter().zip(&snaps) {
        assert_check_clean(img);
        compare_raw(img, snap);
        let d = std::fs::read(snap).unwrap();
        assert_eq!(
            Manifest::load(&Manifest::path_for(img)).unwrap(),
            fresh_manifest(&d),
            "{}",
            img.display()
        );
    }
    let info = run("qemu-img", &["info", "--output=json", s(&images[2])]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "b1.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
}

#[test]
fn a_flipped_byte_in_any_layer_is_found() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (images, _) = backup_chain(dir.path(), 3, 12 * M);
    // Flip a byte of the first data cluster of the full: chunk 0 of the full, and of every
    // layer above that does not overwrite it.
    let full = &images[0];
    let map = chain::info(full).unwrap();
    assert_eq!(map.map[0].kind, "data");
    let host = {
        let out = run("qemu-img", &["map", "--output=json", s(full)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["offset"].as_u64().unwrap()
    };
    let mut raw = std::fs::read(full).unwrap();
    raw[(host + 10) as usize] ^= 0x01;
    std::fs::write(full, &raw).unwrap();
    let r = verify(full);
    assert_eq!(
        r.mismatches.iter().map(|m| m.index).collect::<Vec<_>>(),
        vec![0]
    );
    let (reports, unverified) = copy::runtime()
        .block_on(chain::verify_chain(
            &images[2],
            &Arc::default(),
            &Arc::default(),
        ))
        .unwrap();
    assert!(unverified.is_empty());
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|r| r.mismatches.len() == 1));
}

#[test]
fn merging_the_oldest_layers_keeps_every_newer_restore_point() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (images, snaps) = backup_chain(dir.path(), 4, 12 * M);
    let report = copy::runtime()
        .block_on(chain::consolidate(
            &images[3],
            &ConsolidateOptions {
                layers: Some(2),
                ..ConsolidateOptions::default()
            },
            &Arc::default(),
            &Arc::default(),
        ))
        .unwrap();
    assert_eq!(report.image, images[1]);
    assert_eq!(report.removed, vec![images[0].display().to_string()]);
    assert!(!images[0].exists());
    assert!(!Manifest::path_for(&images[0]).exists());
    for i in 1..4 {
        assert_check_clean(&images[i]);
        compare_raw(&images[i], &snaps[i]);
        assert!(verify(&images[i]).ok());
    }
    let info = chain::info(&images[3]).unwrap();
    assert_eq!(info.depth, 3);
    assert_eq!(info.layers[2].backing_file, None);
    // Nothing is left behind in the directory but the images, manifests and snapshots.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A synthetic full of the whole chain, into a new file; without the top's manifest the
    // new image is checked against the manifest made while writing it.
    std::fs::remove_file(Manifest::path_for(&images[3])).unwrap();
    let out = dir.path().join("synthetic.qcow2");
    copy::runtime()
        .block_on(chain::consolidate(
            &images[3],
            &ConsolidateOptions {
                output: Some(out.clone()),
                ..ConsolidateOptions::default()
            },
            &Arc::default(),
            &Arc::default(),
        ))
        .unwrap();
    assert_check_clean(&out);
    compare_raw(&out, &snaps[3]);
    assert_eq!(chain::info(&out).unwrap().depth, 1);
    assert!(verify(&out).ok());
}

#[test]
fn a_damaged_chain_is_not_consolidated() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (images, _) = backup_chain(dir.path(), 3, 12 * M);
    let host = {
        let out = run("qemu-img", &["map", "--output=json", s(&images[0])]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["offset"].as_u64().unwrap()
    };
    let mut raw = std::fs::read(&images[0]).unwrap();
    raw[(host + 99) as usize] ^= 0x80;
    std::fs::write(&images[0], &raw).unwrap();
    let before: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let err = copy::runtime()
        .block_on(chain::consolidate(
            &images[2],
            &ConsolidateOptions {
                layers: Some(2),
                ..ConsolidateOptions::default()
            },
            &Arc::default(),
            &Arc::default(),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("chunks differ"), "{err}");
    let after: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after, "a failed consolidation changed the chain");
    assert!(!chain::temporary_name(&images[1]).exists());
}
