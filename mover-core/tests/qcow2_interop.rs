//! QCOW2 against QEMU, the reference implementation.
//!
//! Images made by `qemu-img`/`qemu-io` are read by [`Qcow2Chain`] and compared byte for byte with
//! `qemu-img convert -O raw` of the same image; images made by [`Qcow2Writer`] must pass
//! `qemu-img check` (no errors, no leaks), equal the expected contents under `qemu-img compare`
//! and be served by `qemu-nbd`. The tests need `qemu-img`, `qemu-io`, `qemu-nbd` and `nbdcopy`
//! on the `PATH`; without `qemu-img` they say so and pass vacuously.

mod common;

use common::{assert_check_clean, have_qemu, run, s};

use std::path::{Path, PathBuf};

use mover_core::endpoint::Endpoint;
use mover_core::manifest::{Manifest, ManifestBuilder, DEFAULT_CHUNK_SIZE};
use mover_core::qcow2::{
    Allocation, Backing, BackingFormat, Qcow2Chain, Qcow2Source, Qcow2Target, Qcow2Writer,
};
use mover_core::MoverError;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// `qemu-io` commands on an image, in one process.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

/// The disk as QEMU reads it.
fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("qemu.raw");
    run("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn our_raw(img: &Path) -> Vec<u8> {
    our_raw_with(img, &[])
}

/// The disk as the mover reads it, backing files also allowed under `roots`.
fn our_raw_with(img: &Path, roots: &[PathBuf]) -> Vec<u8> {
    let chain = Qcow2Chain::open_with(img, BackingFormat::Qcow2, roots).unwrap();
    let mut buf = vec![0u8; chain.size() as usize];
    assert_eq!(chain.read_at(0, &mut buf).unwrap(), buf.len());
    buf
}

fn assert_reads_like_qemu(img: &Path) {
    assert_reads_like_qemu_with(img, &[]);
}

fn assert_reads_like_qemu_with(img: &Path, roots: &[PathBuf]) {
    let ours = our_raw_with(img, roots);
    let theirs = qemu_raw(img);
    assert_eq!(ours.len(), theirs.len(), "size of {}", img.display());
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!(
            "{}: first difference at byte {i} (ours {:#x}, qemu {:#x})",
            img.display(),
            ours[i],
            theirs[i]
        );
    }
}

/// `qemu-img check`: exit 0, no corruptions, no leaks.
/// `qemu-img compare` of the image with the expected disk contents.
fn assert_compare(img: &Path, want: &[u8]) {
    let raw = img.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(img), s(&raw)],
    );
    std::fs::remove_file(&raw).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn create(img: &Path, opts: &str, size: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, s(img), size],
    );
}

#[test]
fn reads_v2_and_v3_images_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        for cluster in ["64k", "512k"] {
            let img = dir.path().join(format!("v{compat}-{cluster}.qcow2"));
            create(
                &img,
                &format!("compat={compat},cluster_size={cluster}"),
                "9M",
            );
            qemu_io(
                &img,
                &[
                    "write -P 0xab 0 64k",
                    "write -P 0xcd 1000k 100k",
                    "write -P 0x11 2M 3M",
                    "write -z 2176k 512k",
                    "discard 3M 64k",
                    "write -P 0x22 8M 1M",
                    "write -z 7M 1M",
                ],
            );
            assert_reads_like_qemu(&img);
            // After an internal snapshot, clusters are shared (refcount 2) and rewritten by
            // copy-on-write; the active L1 table is what is read.
            run("qemu-img", &["snapshot", "-c", "snap1", s(&img)]);
            qemu_io(&img, &["write -P 0x33 0 32k", "write -z 2M 64k"]);
            assert_reads_like_qemu(&img);
        }
    }
}

/// Images compressed with zstd (`compression_type=zstd`) by `qemu-img convert -c`, in several
/// cluster sizes, with and without extended L2 entries, and partly rewritten by `qemu-io`.
#[test]
fn reads_zstd_compressed_images_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut rng = Rng(11);
    let mut data = vec![0u8; (6 * M) as usize];
    for (i, chunk) in data.chunks_mut((96 * K) as usize).enumerate() {
        match i % 4 {
            0 => chunk.copy_from_slice(&rng.bytes(chunk.len())),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 13) as u8),
            2 => {}
            _ => chunk[..777].fill(0xa5),
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k",
        "cluster_size=2M",
        "cluster_size=64k,extended_l2=on",
    ] {
        let img = dir
            .path()
            .join(format!("z-{}.qcow2", opts.replace([',', '='], "-")));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type=zstd,{opts}"),
                s(&raw),
                s(&img),
            ],
        );
        let info = run("qemu-img", &["info", "--output=json", s(&img)]);
        assert!(info.contains("\"compression-type\": \"zstd\""), "{info}");
        assert!(our_raw(&img) == data, "{} reads differently", img.display());
        assert_compare(&img, &our_raw(&img));
        qemu_io(&img, &["write -P 0x77 4k 4k"]);
        assert_reads_like_qemu(&img);
    }
}

#[test]
fn reads_compressed_images_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut rng = Rng(7);
    let mut data = vec![0u8; (6 * M) as usize];
    for (i, chunk) in data.chunks_mut((128 * K) as usize).enumerate() {
        match i % 4 {
            0 => chunk.copy_from_slice(&rng.bytes(chunk.len())),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 7) as u8),
            2 => {}
            _ => chunk[..1000].fill(0x5a),
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for compat in ["0.10", "1.1"] {
        for cluster in ["64k", "512k"] {
            let img = dir.path().join(format!("c{compat}-{cluster}.qcow2"));
            run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compat={compat},cluster_size={cluster}"),
                    s(&raw),
                    s(&img),
                ],
            );
            assert_eq!(our_raw(&img), data, "{}", img.display());
            // A write over part of a compressed cluster turns it into a plain one.
            qemu_io(&img, &["write -P 0x77 4k 4k"]);
            assert_reads_like_qemu(&img);
        }
    }
}

/// A chain of `layers` QCOW2 images on a raw base, each layer writing its own pattern,
/// zeroing and discarding. Returns the top image.
fn make_chain(dir: &Path, layers: usize, cluster: &str) -> PathBuf {
    let base = dir.join("base.raw");
    let mut rng = Rng(99);
    let mut data = rng.bytes((4 * M) as usize);
    data[(M as usize)..(2 * M as usize)].fill(0);
    std::fs::write(&base, &data).unwrap();
    let mut below = (base, "raw");
    for i in 0..layers {
        let img = dir.join(format!("layer{i}.qcow2"));
        // Each layer a little larger than the one below: the tail reads as zeros.
        let size = format!("{}k", 4096 + 64 * i);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                "-b",
                below.0.file_name().unwrap().to_str().unwrap(),
                "-F",
                below.1,
                s(&img),
                &size,
            ],
        );
        let off = (i as u64 * 300 * K) % (3 * M);
        qemu_io(
            &img,
            &[
                &format!("write -P {:#x} {off} 100k", 0x30 + i),
                &format!("write -z {} 64k", (off + 700 * K) % (4 * M - 64 * K)),
                &format!("discard {} 64k", (off + 1500 * K) % (4 * M - 64 * K)),
                // Across the end of the layer below.
                &format!(
                    "write -P {:#x} {} 5000",
                    0x60 + i,
                    4 * M + 64 * K * i as u64 - 5000 - 100 * i as u64
                ),
            ],
        );
        below = (img, "qcow2");
    }
    below.0
}

#[test]
fn reads_backing_chains_of_1_2_and_10_layers_like_qemu() {
    if !have_qemu() {
        return;
    }
    for (layers, cluster) in [(1, "64k"), (2, "512k"), (10, "64k")] {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path(), layers, cluster);
        let chain = Qcow2Chain::open(&top).unwrap();
        assert_eq!(chain.depth(), layers + 1);
        assert_reads_like_qemu(&top);
    }
}

#[test]
fn reads_extended_l2_subclusters_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["64k", "512k"] {
        let base = dir.path().join(format!("base-{cluster}.qcow2"));
        create(&base, "cluster_size=64k", "4M");
        qemu_io(&base, &["write -P 0x21 0 4M"]);
        let img = dir.path().join(format!("ext-{cluster}.qcow2"));
        create(
            &img,
            &format!(
                "extended_l2=on,cluster_size={cluster},backing_file={},backing_fmt=qcow2",
                base.file_name().unwrap().to_str().unwrap()
            ),
            "4M",
        );
        qemu_io(
            &img,
            &[
                "write -P 0xab 4k 4k",
                "write -P 0xac 70k 30k",
                "write -z 200k 16k",
                "write -P 0xad 1M 1M",
                "write -z 1200k 64k",
                "discard 3M 128k",
            ],
        );
        assert_reads_like_qemu(&img);
        // Mapped by subcluster (1/32 of a cluster), not by cluster.
        let subcluster = if cluster == "64k" { 2 * K } else { 16 * K };
        let map = Qcow2Chain::open(&img).unwrap().map(0, 64 * K).unwrap();
        let first = map
            .iter()
            .find(|e| e.allocation == Allocation::Data { layer: 0 })
            .unwrap();
        assert_eq!(
            (first.offset, first.length),
            (4 * K / subcluster * subcluster, (4 * K).max(subcluster))
        );
    }
}

#[test]
fn qcow2_backing_without_format_extension_is_probed() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create(&base, "cluster_size=64k", "2M");
    qemu_io(&base, &["write -P 0x42 0 1M"]);
    let top = dir.path().join("top.qcow2");
    create(
        &top,
        "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
        "2M",
    );
    // Drop the backing format extension: it follows the 72-byte v2 header.
    let mut bytes = std::fs::read(&top).unwrap();
    assert_eq!(&bytes[72..76], &0xe279_2acau32.to_be_bytes());
    bytes[72..76].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&top, bytes).unwrap();
    let chain = Qcow2Chain::open(&top).unwrap();
    assert_eq!(chain.depth(), 2);
    let mut buf = vec![0u8; 4096];
    chain.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

#[test]
fn allocation_map_follows_the_chain() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create(&base, "cluster_size=64k", "4M");
    qemu_io(&base, &["write -P 1 0 1M"]);
    let top = dir.path().join("top.qcow2");
    create(&top, "backing_file=base.qcow2,backing_fmt=qcow2", "4M");
    qemu_io(&top, &["write -P 2 512k 1M", "write -z 256k 64k"]);
    let map = Qcow2Chain::open(&top).unwrap().map(0, 4 * M).unwrap();
    let got: Vec<(u64, u64, Allocation)> = map
        .iter()
        .map(|e| (e.offset, e.length, e.allocation))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 256 * K, Allocation::Data { layer: 1 }),
            (256 * K, 64 * K, Allocation::Zero),
            (320 * K, 192 * K, Allocation::Data { layer: 1 }),
            (512 * K, M, Allocation::Data { layer: 0 }),
            (1536 * K, 4 * M - 1536 * K, Allocation::Unallocated),
        ]
    );
}

#[test]
fn holes_of_a_raw_base_are_mapped_as_unallocated() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(4 * M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 2 * M).unwrap();
    let top = dir.path().join("top.qcow2");
    create(&top, "backing_file=base.raw,backing_fmt=raw", "4M");
    qemu_io(&top, &["write -P 1 0 64k"]);
    let map = Qcow2Chain::open(&top).unwrap().map(0, 4 * M).unwrap();
    let got: Vec<(u64, u64, Allocation)> = map
        .iter()
        .map(|e| (e.offset, e.length, e.allocation))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 64 * K, Allocation::Data { layer: 0 }),
            (64 * K, 2 * M - 64 * K, Allocation::Unallocated),
            (2 * M, 4 * K, Allocation::Data { layer: 1 }),
            (2 * M + 4 * K, 2 * M - 4 * K, Allocation::Unallocated),
        ]
    );
    assert_reads_like_qemu(&top);
}

#[test]
fn unsupported_features_are_refused_by_name() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("x.data");
    let refused = |img: &Path, what: &str| {
        let err = Qcow2Chain::open(img).err().unwrap();
        assert!(
            matches!(err, MoverError::Format { .. }) && err.to_string().contains(what),
            "{what}: {err}"
        );
    };
    for (i, (opts, what)) in [
        (
            format!("data_file={}", data_file.display()),
            "external data file",
        ),
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_owned(),
            "encrypted",
        ),
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("x{i}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "--object",
                "secret,id=sec0,data=123456",
                "-f",
                "qcow2",
                "-o",
                opts,
                s(&img),
                "1M",
            ],
        );
        refused(&img, what);
    }
    // A compression type other than deflate (0) and zstd (1), patched into byte 104 with the
    // compression type feature bit.
    let img = dir.path().join("patched.qcow2");
    create(&img, "compression_type=zstd", "1M");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[104] = 2;
    std::fs::write(&img, bytes).unwrap();
    refused(&img, "compression type 2");
    std::fs::remove_file(&img).unwrap();
    // Feature bits patched into the header (incompatible features at byte 72).
    for (bits, what) in [(2u64, "corrupt"), (1 << 9, "unknown bit 9")] {
        let img = dir.path().join("patched.qcow2");
        create(&img, "compat=1.1", "1M");
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[72..80].copy_from_slice(&bits.to_be_bytes());
        std::fs::write(&img, bytes).unwrap();
        refused(&img, what);
        std::fs::remove_file(&img).unwrap();
    }
}

/// Random writes, overwrites, zero writes and partial clusters on a model of the disk.
fn scribble(w: &Qcow2Writer, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let size = model.len() as u64;
    for _ in 0..ops {
        let off = rng.below(size);
        let len = (1 + rng.below(300 * K)).min(size - off);
        let (o, l) = (off as usize, len as usize);
        if rng.below(4) == 0 {
            w.write_zeroes(off, len).unwrap();
            model[o..o + l].fill(0);
        } else {
            let data = rng.bytes(l);
            w.write_at(off, &data).unwrap();
            model[o..o + l].copy_from_slice(&data);
        }
    }
}

#[test]
fn written_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [(64 * K, 13 * M + 4096), (512 * K, 9 * M), (4 * K, 5 * M)] {
        let img = dir.path().join(format!("w{cluster}.qcow2"));
        let w = Qcow2Writer::create(&img, size, cluster, None).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(cluster);
        // Aligned full chunks, as a copy writes them, then random damage.
        for chunk in (0..size / M).step_by(2) {
            let data = rng.bytes(M as usize);
            w.write_at(chunk * M, &data).unwrap();
            model[(chunk * M) as usize..((chunk + 1) * M) as usize].copy_from_slice(&data);
        }
        scribble(&w, &mut model, &mut rng, 200);
        w.flush().unwrap();
        assert_check_clean(&img);
        // More writes after a flush, then the final one.
        scribble(&w, &mut model, &mut rng, 50);
        w.finish().unwrap();
        drop(w);
        assert_check_clean(&img);
        assert_compare(&img, &model);
        assert_eq!(our_raw(&img), model);
    }
}

#[test]
fn refcount_structures_grow_past_their_first_placement() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.qcow2");
    // 512-byte clusters: one refcount block covers 128 KiB of file, one table cluster 8 MiB.
    let size = 3 * M;
    let w = Qcow2Writer::create(&img, size, 512, None).unwrap();
    let mut rng = Rng(11);
    let mut model = vec![0u8; size as usize];
    // Zeroed clusters are not reused, so each round grows the file by the whole disk.
    for _ in 0..4 {
        let data = rng.bytes(size as usize);
        w.write_at(0, &data).unwrap();
        w.flush().unwrap();
        w.write_zeroes(0, size).unwrap();
    }
    scribble(&w, &mut model, &mut rng, 40);
    w.finish().unwrap();
    drop(w);
    assert!(std::fs::metadata(&img).unwrap().len() > 4 * size);
    assert_check_clean(&img);
    assert_compare(&img, &model);
}

#[test]
fn concurrent_partial_writes_to_shared_clusters_of_an_overlay() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create(&base, "cluster_size=64k", "16M");
    qemu_io(&base, &["write -P 0x5b 0 16M"]);
    let img = dir.path().join("over.qcow2");
    // 2 MiB clusters written in 1 MiB requests: two threads share every cluster, one of them
    // copying the other half from the backing file.
    let w = Qcow2Writer::create(
        &img,
        16 * M,
        2 * M,
        Some(&Backing {
            path: base,
            format: BackingFormat::Qcow2,
        }),
    )
    .unwrap();
    let mut model = vec![0x5bu8; (16 * M) as usize];
    let chunks: Vec<Vec<u8>> = (0..16).map(|i| Rng(i + 1).bytes(M as usize)).collect();
    for (i, c) in chunks.iter().enumerate().filter(|(i, _)| i % 3 != 0) {
        model[i * M as usize..(i + 1) * M as usize].copy_from_slice(c);
    }
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (w, chunks) = (&w, &chunks);
            sc.spawn(move || {
                for i in (0..16u64).filter(|i| i % 2 == t && i % 3 != 0) {
                    w.write_at(i * M, &chunks[i as usize]).unwrap();
                }
            });
        }
    });
    w.finish().unwrap();
    drop(w);
    assert_check_clean(&img);
    assert_compare(&img, &model);
}

#[test]
fn an_unfinished_image_is_consistent() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    let size = 4 * M;
    let w = Qcow2Writer::create(&img, size, 64 * K, None).unwrap();
    // Before any flush the image is marked dirty: QEMU knows not to trust its refcounts.
    let info = run("qemu-img", &["info", "--output=json", "-U", s(&img)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    let mut model = vec![0u8; size as usize];
    scribble(&w, &mut model, &mut Rng(21), 40);
    w.flush().unwrap();
    // Writes after the flush, then the process "dies": the writer is dropped unfinished.
    let mut later = model.clone();
    scribble(&w, &mut later, &mut Rng(22), 40);
    drop(w);
    assert_check_clean(&img);
    // Like a disk after a power cut: each byte is as flushed, as written since, or zero from a
    // zero write that a later write had overwritten.
    let got = qemu_raw(&img);
    let torn = (0..got.len()).find(|&i| got[i] != model[i] && got[i] != later[i] && got[i] != 0);
    assert_eq!(torn, None);
}

#[test]
fn concurrent_writers_share_one_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("conc.qcow2");
    let size = 32 * M;
    let w = Qcow2Writer::create(&img, size, 64 * K, None).unwrap();
    let parts: Vec<Vec<u8>> = (0..4)
        .map(|t| Rng(t + 1).bytes((size / 4) as usize))
        .collect();
    std::thread::scope(|sc| {
        for (t, part) in parts.iter().enumerate() {
            let w = &w;
            sc.spawn(move || {
                // Interleaved 1 MiB requests with unaligned edges.
                let base = t as u64 * size / 4;
                let mut off = 0u64;
                while off < size / 4 {
                    let len = (M - 1000).min(size / 4 - off);
                    w.write_at(base + off, &part[off as usize..(off + len) as usize])
                        .unwrap();
                    off += len;
                }
            });
        }
    });
    w.finish().unwrap();
    assert_check_clean(&img);
    assert_compare(&img, &parts.concat());
}

#[test]
fn overlays_on_qemu_images_pass_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mid = make_chain(dir.path(), 2, "64k");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for (i, cluster) in [64 * K, 128 * K, 4 * K].into_iter().enumerate() {
        let img = sub.join(format!("overlay{i}.qcow2"));
        let mut model = qemu_raw(&mid);
        let w = Qcow2Writer::create(
            &img,
            model.len() as u64,
            cluster,
            Some(&Backing {
                path: mid.clone(),
                format: BackingFormat::Qcow2,
            }),
        )
        .unwrap();
        scribble(&w, &mut model, &mut Rng(5 + i as u64), 150);
        w.finish().unwrap();
        drop(w);
        assert_check_clean(&img);
        assert_compare(&img, &model);
        // The overlay names its backing file "../layer1.qcow2": outside its own directory, so
        // it is read only when the caller allows that directory.
        let err = Qcow2Chain::open(&img)
            .err()
            .expect("a backing name with .. is refused");
        assert!(err.to_string().contains("outside"), "{err}");
        assert_reads_like_qemu_with(&img, &[dir.path().to_owned()]);
        let info = run("qemu-img", &["info", "--output=json", s(&img)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["backing-filename"], "../layer1.qcow2");
        assert_eq!(v["backing-filename-format"], "qcow2");
    }
    // An overlay on a raw file.
    let img = dir.path().join("on-raw.qcow2");
    let base = dir.path().join("base.raw");
    let mut model = std::fs::read(&base).unwrap();
    let w = Qcow2Writer::create(
        &img,
        model.len() as u64,
        64 * K,
        Some(&Backing {
            path: base,
            format: BackingFormat::Raw,
        }),
    )
    .unwrap();
    scribble(&w, &mut model, &mut Rng(77), 100);
    w.finish().unwrap();
    drop(w);
    assert_check_clean(&img);
    assert_compare(&img, &model);
}

#[test]
fn written_images_are_served_by_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("served.qcow2");
    let mut model = vec![0u8; (6 * M) as usize];
    let w = Qcow2Writer::create(&img, 6 * M, 64 * K, None).unwrap();
    scribble(&w, &mut model, &mut Rng(3), 60);
    w.finish().unwrap();
    drop(w);
    let sock = dir.path().join("nbd.sock");
    // Not persistent: the server exits when its one client disconnects.
    run(
        "qemu-nbd",
        &["--fork", "-r", "-f", "qcow2", "--socket", s(&sock), s(&img)],
    );
    let out = dir.path().join("out.raw");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run("nbdcopy", &[&uri, s(&out)]);
    assert_eq!(std::fs::read(&out).unwrap(), model);
}

/// The copy a copy engine does, through the endpoint interface: extents first, zero runs as
/// zero requests, data in requests of at most 1 MiB ending on chunk boundaries; the manifest is
/// fed inline.
async fn copy(src: &dyn Endpoint, dst: &dyn Endpoint, manifest: &ManifestBuilder) {
    let size = src.capabilities().size;
    for e in src.extents(0, size).await.unwrap() {
        let mut off = e.offset;
        while off < e.end() {
            let len = (M - off % M).min(e.end() - off);
            if e.zero {
                dst.write_zeroes(off, len).await.unwrap();
                manifest.record_zero(off, len);
            } else {
                let buf = src.read(off, vec![0u8; len as usize]).await.unwrap();
                manifest.record(off, &buf);
                dst.write(off, buf).await.unwrap();
            }
            off += len;
        }
    }
    dst.flush().await.unwrap();
}

#[tokio::test]
async fn endpoints_copy_a_chain_into_a_standalone_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path(), 3, "64k");
    let src = Qcow2Source::open(&top).unwrap();
    let size = src.capabilities().size;
    let out = dir.path().join("full.qcow2");
    let dst = Qcow2Target::create(&out, size, 64 * K, None).unwrap();
    let another = dst.another().await.unwrap();
    let builder = ManifestBuilder::new(size, DEFAULT_CHUNK_SIZE).unwrap();
    copy(&src, another.as_ref(), &builder).await;
    assert!(!builder.stale_chunks().is_empty());
    builder.complete(|o, b| dst.writer().read_at(o, b)).unwrap();
    let manifest = builder.to_manifest().unwrap();
    dst.close().await.unwrap();
    assert_check_clean(&out);
    run("qemu-img", &["compare", s(&top), s(&out)]);
    let written = Qcow2Chain::open(&out).unwrap();
    assert!(manifest
        .verify(|o, b| written.read_exact_at(o, b))
        .unwrap()
        .is_empty());
    let source = src.chain();
    let fresh =
        Manifest::compute(size, DEFAULT_CHUNK_SIZE, |o, b| source.read_exact_at(o, b)).unwrap();
    assert_eq!(manifest, fresh);
}

/// `(guest start, length, host offset)` of the data runs `qemu-img map` finds in layer `depth`.
fn data_runs_in_layer(top: &Path, depth: u64) -> Vec<(u64, u64, u64)> {
    let out = run("qemu-img", &["map", "--output=json", s(top)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == depth && e["zero"] == false)
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn incremental_overlay_manifest_is_derived_and_verified() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * M + 1536;
    let mut rng = Rng(1);
    // The source disk: half of its chunks random, the rest holes.
    let src_path = dir.path().join("source.raw");
    let mut disk = vec![0u8; size as usize];
    for c in (0..size.div_ceil(M)).filter(|c| c % 2 == 0) {
        let (a, b) = (c * M, ((c + 1) * M).min(size));
        disk[a as usize..b as usize].copy_from_slice(&rng.bytes((b - a) as usize));
    }
    std::fs::write(&src_path, &disk).unwrap();

    // Full backup.
    let full = dir.path().join("full.qcow2");
    let src = mover_core::open::open(s(&src_path), mover_core::endpoint::Access::Read)
        .await
        .unwrap();
    let dst = Qcow2Target::create(&full, size, 64 * K, None).unwrap();
    let builder = ManifestBuilder::new(size, DEFAULT_CHUNK_SIZE).unwrap();
    copy(src.as_ref(), &dst, &builder).await;
    builder.complete(|o, b| dst.writer().read_at(o, b)).unwrap();
    let m0 = builder.to_manifest().unwrap();
    dst.close().await.unwrap();
    m0.save(&Manifest::path_for(&full)).unwrap();

    // The guest writes: whole chunks, unaligned pieces, a zeroed range.
    let changes: Vec<(u64, u64, bool)> = vec![
        (M, M, false),
        (3 * M + 1000, 70_000, false),
        (5 * M - 10, 20, false),
        (6 * M + 4096, 2 * M - 4096, true),
        (8 * M + 512, 1024, false),
    ];
    for &(off, len, zero) in &changes {
        let (o, l) = (off as usize, len as usize);
        if zero {
            disk[o..o + l].fill(0);
        } else {
            disk[o..o + l].copy_from_slice(&rng.bytes(l));
        }
    }

    // Incremental: an overlay on the full backup, only the changed ranges copied.
    let inc = dir.path().join("inc1.qcow2");
    let w = Qcow2Writer::create(
        &inc,
        size,
        64 * K,
        Some(&Backing {
            path: full.clone(),
            format: BackingFormat::Qcow2,
        }),
    )
    .unwrap();
    let parent = Manifest::load(&Manifest::path_for(&full)).unwrap();
    let builder = ManifestBuilder::from_parent(&parent, size).unwrap();
    for &(off, len, zero) in &changes {
        if zero {
            w.write_zeroes(off, len).unwrap();
            builder.record_zero(off, len);
        } else {
            let data = &disk[off as usize..(off + len) as usize];
            w.write_at(off, data).unwrap();
            builder.record(off, data);
        }
    }
    w.finish().unwrap();
    assert_eq!(builder.stale_chunks(), vec![3, 4, 5, 6, 8]);
    builder.complete(|o, b| w.read_at(o, b)).unwrap();
    let m1 = builder.to_manifest().unwrap();
    drop(w);
    assert_check_clean(&inc);
    assert_compare(&inc, &disk);

    // Derived equals computed from scratch, over the chain and over the source.
    let chain = Qcow2Chain::open(&inc).unwrap();
    let fresh =
        Manifest::compute(size, DEFAULT_CHUNK_SIZE, |o, b| chain.read_exact_at(o, b)).unwrap();
    assert_eq!(m1, fresh);
    let of_source = Manifest::compute(size, DEFAULT_CHUNK_SIZE, |o, b| {
        b.copy_from_slice(&disk[o as usize..o as usize + b.len()]);
        Ok(())
    })
    .unwrap();
    assert_eq!(m1.disk_digest(), of_source.disk_digest());
    let differing: Vec<u64> = m0.diff(&m1).unwrap().iter().map(|c| c.index).collect();
    assert_eq!(differing, vec![1, 3, 4, 5, 6, 8]);

    // A flipped byte in either layer is found, by chunk.
    drop(chain);
    for (depth, file) in [(0, &inc), (1, &full)] {
        let runs = data_runs_in_layer(&inc, depth);
        let (start, len, host) = runs[runs.len() / 2];
        let guest = start + len / 2;
        let at = host + len / 2;
        let mut bytes = std::fs::read(file).unwrap();
        bytes[at as usize] ^= 0x01;
        std::fs::write(file, &bytes).unwrap();
        let chain = Qcow2Chain::open(&inc).unwrap();
        let bad = m1.verify(|o, b| chain.read_exact_at(o, b)).unwrap();
        assert_eq!(bad.len(), 1, "layer {depth}");
        assert_eq!(bad[0].index, guest / DEFAULT_CHUNK_SIZE, "layer {depth}");
        bytes[at as usize] ^= 0x01;
        std::fs::write(file, &bytes).unwrap();
    }
}
