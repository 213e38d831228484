//! Resuming a copy into the QCOW2 image an interrupted run created: the image is consistent at
//! every checkpoint (`qemu-img check`), the resumed image equals the source (`qemu-img
//! compare`), and its manifest equals that of an uninterrupted copy. `qemu-img` must be on the
//! `PATH`: these tests fail, they do not pass, without it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mover_core::copy::{self, CopyOptions};
use mover_core::endpoint::OpenOptions;
use mover_core::manifest::Manifest;
use mover_core::plan::PlanKind;
use mover_core::progress::{CancelToken, Progress};
use mover_core::qcow2::{Qcow2Chain, Qcow2Writer};
use mover_core::MoverError;

const M: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img is required by this test and cannot run: {e}"))
}

fn assert_check_clean(img: &Path) {
    let out = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_same(img: &Path, raw: &Path) {
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Data, zeros written as data, and holes, in runs that do not line up with clusters.
fn source(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pos = 0usize;
    let mut k = 0usize;
    while pos < data.len() {
        let len = [12_288usize, 200_704, 65_536, 40_960, 1 << 20][k % 5].min(data.len() - pos);
        if k % 3 != 2 {
            for b in &mut data[pos..pos + len] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        pos += len;
        k += 1;
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn options(checkpoint: Option<&Path>) -> CopyOptions {
    CopyOptions {
        connections: 1,
        requests: 1,
        request_size: 64 << 10,
        checkpoint: checkpoint.map(Path::to_owned),
        checkpoint_interval: Duration::from_millis(20),
        ..CopyOptions::default()
    }
}

fn run(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    cancel_after: Option<u64>,
) -> mover_core::Result<copy::CopyOutcome> {
    let progress = Arc::new(Progress::default());
    let cancel = Arc::new(CancelToken::default());
    let watcher = cancel_after.map(|bytes| {
        let (p, c) = (Arc::clone(&progress), Arc::clone(&cancel));
        std::thread::spawn(move || loop {
            let s = p.snapshot();
            if s.bytes_written + s.bytes_zeroed >= bytes || s.finished {
                c.cancel();
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        })
    });
    let out = copy::runtime().block_on(copy::run(
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        &PlanKind::All,
        opts,
        &OpenOptions::default(),
        progress,
        cancel,
    ));
    if let Some(w) = watcher {
        w.join().unwrap();
    }
    out
}

#[test]
fn a_cancelled_qcow2_copy_resumes_to_the_same_image_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    source(&src, 48 * M);
    let dst = dir.path().join("dst.qcow2");
    let cp = dir.path().join("copy.checkpoint");

    let first = run(&src, &dst, &options(Some(&cp)), Some(8 * M));
    assert!(matches!(first, Err(MoverError::Cancelled)), "{first:?}");
    assert_check_clean(&dst);
    assert!(cp.exists(), "a cancelled copy leaves its checkpoint");

    let resumed = run(&src, &dst, &options(Some(&cp)), None).unwrap();
    let p = &resumed.progress;
    assert!(
        p.bytes_resumed > 0 && p.bytes_resumed < 48 * M,
        "resumed {}",
        p.bytes_resumed
    );
    assert_eq!(p.bytes_done(), p.bytes_planned);
    assert_check_clean(&dst);
    assert_same(&dst, &src);

    let reference = dir.path().join("ref.qcow2");
    let whole = run(&src, &reference, &options(None), None).unwrap();
    let (a, b) = (resumed.manifest.unwrap(), whole.manifest.unwrap());
    assert_eq!(a.disk_digest, b.disk_digest);
    assert_eq!(
        Manifest::load(&a.path).unwrap(),
        Manifest::load(&b.path).unwrap()
    );
}

#[test]
fn writes_after_the_last_flush_are_never_referenced_by_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.qcow2");
    let size = 8 * M;
    let mut want = vec![0u8; size as usize];
    {
        let w = Qcow2Writer::create(&path, size, 64 << 10, None).unwrap();
        w.write_at(0, &vec![1u8; 300_000]).unwrap();
        want[..300_000].fill(1);
        w.flush().unwrap();
        // Written after the last flush, then the process dies: not in the tables on disk.
        w.write_at(4 * M, &vec![2u8; 200_000]).unwrap();
    }
    assert_check_clean(&path);
    let w = Qcow2Writer::open_to_resume(&path).unwrap();
    let mut back = vec![9u8; 200_000];
    w.read_at(4 * M, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "an unflushed write is not part of the image"
    );
    // A partial write of a new cluster: the rest of that cluster must read as zeros, not as
    // what the dead run left in the file.
    w.write_at(4 * M + 4096, &vec![3u8; 4096]).unwrap();
    want[(4 * M + 4096) as usize..(4 * M + 8192) as usize].fill(3);
    w.write_at(7 * M, &vec![4u8; 65_536]).unwrap();
    want[(7 * M) as usize..(7 * M + 65_536) as usize].fill(4);
    w.finish().unwrap();
    drop(w);
    assert_check_clean(&path);
    let raw = dir.path().join("want.raw");
    std::fs::write(&raw, &want).unwrap();
    assert_same(&path, &raw);
    let mut ours = vec![0u8; size as usize];
    Qcow2Chain::open(&path)
        .unwrap()
        .read_exact_at(0, &mut ours)
        .unwrap();
    assert!(ours == want);
}

#[test]
fn an_image_left_dirty_before_its_first_flush_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    {
        let w = Qcow2Writer::create(&path, 4 * M, 64 << 10, None).unwrap();
        w.write_at(M, &vec![5u8; 70_000]).unwrap();
    }
    let w = Qcow2Writer::open_to_resume(&path).unwrap();
    w.write_at(2 * M, &vec![6u8; 4096]).unwrap();
    w.finish().unwrap();
    drop(w);
    assert_check_clean(&path);
    let mut want = vec![0u8; (4 * M) as usize];
    want[(2 * M) as usize..(2 * M + 4096) as usize].fill(6);
    let raw = dir.path().join("want.raw");
    std::fs::write(&raw, &want).unwrap();
    assert_same(&path, &raw);
}

#[test]
fn an_image_the_mover_did_not_write_is_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qemu.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "16M"]);
    assert!(out.status.success());
    let err = Qcow2Writer::open_to_resume(&path).err().expect("refused");
    assert!(err.to_string().contains("cannot resume"), "{err}");
    // Nor through a copy that has a checkpoint for it.
    let src = dir.path().join("src.raw");
    source(&src, 16 * M);
    let cp = dir.path().join("cp");
    std::fs::write(&cp, b"{}").unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(run(&src, &path, &options(Some(&cp)), None).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
