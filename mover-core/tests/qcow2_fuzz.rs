//! A time-bounded fuzzer of the QCOW2 metadata parser and reader.
//!
//! cargo-fuzz needs a nightly compiler; this is proptest driving a mutation loop instead. The
//! seed corpus is real images made by `qemu-img` and `qemu-io` (versions 2 and 3, 512 B to
//! 2 MiB clusters, deflate and zstd compressed clusters, extended L2 entries, zero clusters, an
//! internal snapshot, overlays on QCOW2 and raw backing files). Each case takes a seed, changes
//! a few bytes, words or double words — mostly in the header, the header extensions, the L1,
//! L2, refcount and snapshot tables, sometimes anywhere — with values chosen to hit limits
//! (0, 2^31, the file length, `u64::MAX`, the L2 flag bits...), maybe truncates the file, and
//! then parses the header and opens, maps and reads the image. Any result is fine except a
//! panic (proptest catches it and shrinks the case), an abort or a huge allocation (the slow
//! test `tests/mover/test_fuzz.py` runs this binary under an address-space limit).
//!
//! `MOVER_FUZZ_SECONDS` bounds the run (default 3: a smoke test in the normal `cargo test`);
//! `MOVER_FUZZ_SEED` varies the sequence of cases (default 0: every run is the same).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::run;
use mover_core::qcow2::format::{self, Header};
use mover_core::qcow2::Qcow2Chain;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// A seed image and the byte ranges worth mutating (header, tables).
struct Seed {
    name: String,
    bytes: Vec<u8>,
    regions: Vec<(usize, usize)>,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) {
    run("qemu-img", args);
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(s(img));
    run("qemu-io", &args);
}

/// Make the corpus in `dir`; returns the file names of the seeds.
fn make_corpus(dir: &Path) -> Vec<String> {
    let raw = dir.join("data.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, chunk) in data.chunks_mut(40 << 10).enumerate() {
        match i % 3 {
            0 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j.wrapping_mul(31) ^ i) as u8),
            1 => {}
            _ => chunk[..1000].fill(0x5a),
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let convert = |name: &str, compress: bool, opts: &str| {
        let mut args = vec!["convert", "-O", "qcow2"];
        if compress {
            args.push("-c");
        }
        args.extend_from_slice(&["-o", opts, s(&raw)]);
        let out = dir.join(name);
        args.push(s(&out));
        qemu_img(&args);
        out
    };
    let mut names = Vec::new();
    let mut add = |p: PathBuf| names.push(p.file_name().unwrap().to_str().unwrap().to_owned());
    add(convert("v3.qcow2", false, "compat=1.1"));
    add(convert("v2.qcow2", false, "compat=0.10"));
    add(convert("small.qcow2", false, "cluster_size=512"));
    add(convert("big.qcow2", false, "cluster_size=2M"));
    add(convert("deflate.qcow2", true, "compat=1.1"));
    add(convert("zstd.qcow2", true, "compression_type=zstd"));
    add(convert(
        "zstd-ext.qcow2",
        true,
        "compression_type=zstd,extended_l2=on,cluster_size=32k",
    ));
    let ext = convert("ext.qcow2", false, "extended_l2=on");
    qemu_io(&ext, &["write -P 0x11 8k 3k", "write -z 200k 8k"]);
    add(ext);
    let snap = convert("snap.qcow2", false, "compat=1.1");
    qemu_img(&["snapshot", "-c", "first", s(&snap)]);
    qemu_io(&snap, &["write -P 0x22 0 64k"]);
    add(snap);
    let over = dir.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "v3.qcow2",
        "-F",
        "qcow2",
        s(&over),
        "1M",
    ]);
    qemu_io(
        &over,
        &[
            "write -P 0x33 64k 64k",
            "write -z 512k 128k",
            "discard 832k 64k",
        ],
    );
    add(over);
    let over_raw = dir.join("overlay-raw.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "data.raw",
        "-F",
        "raw",
        s(&over_raw),
        "1M",
    ]);
    qemu_io(&over_raw, &["write -P 0x44 768k 4k"]);
    add(over_raw);
    names
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes(b[at..at + 4].try_into().unwrap()))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The regions of a real image worth mutating, from its header and L1 table.
fn regions(bytes: &[u8]) -> Vec<(usize, usize)> {
    let len = bytes.len();
    let h = Header::parse(bytes, "seed").expect("a seed image parses");
    let cs = h.cluster_size() as usize;
    let clip = |start: u64, n: u64| -> Option<(usize, usize)> {
        let start = usize::try_from(start).ok().filter(|&s| s < len)?;
        Some((start, (n as usize).clamp(1, len - start)))
    };
    // The header three times over: most of the interesting fields are there.
    let mut out = vec![(0, len.min(512)); 3];
    out.push((0, len.min(cs)));
    out.extend(clip(h.l1_table_offset, u64::from(h.l1_size) * 8));
    out.extend(clip(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs as u64,
    ));
    if h.nb_snapshots > 0 {
        out.extend(clip(h.snapshots_offset, 1024));
    }
    let l1 = h.l1_table_offset as usize;
    for i in 0..(h.l1_size as usize).min(4) {
        let l2 = be64(bytes, l1 + 8 * i) & format::OFFSET_MASK;
        if l2 != 0 {
            out.extend(clip(l2, cs as u64));
        }
    }
    out.push((0, len));
    out
}

/// One mutation: which region, where in it, what kind of change, and a value.
type Mutation = (u8, u64, u8, u64);

/// Values at the edges of what the fields and entries may hold.
fn interesting(value: u64, file_len: u64) -> u64 {
    const FIXED: [u64; 20] = [
        0,
        1,
        2,
        7,
        8,
        9,
        21,
        22,
        0x200,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        1 << 40,
        1 << 56,
        format::COPIED,
        format::COMPRESSED,
        i64::MAX as u64,
        u64::MAX,
    ];
    let pick = value % (FIXED.len() as u64 + 4);
    match pick {
        p if p < FIXED.len() as u64 => FIXED[p as usize],
        p if p == FIXED.len() as u64 => file_len,
        p if p == FIXED.len() as u64 + 1 => file_len / 8,
        p if p == FIXED.len() as u64 + 2 => file_len.next_multiple_of(0x1_0000),
        _ => format::COPIED | (file_len & format::OFFSET_MASK & !0xffff),
    }
}

/// Store the low `width` bytes of `v`, big-endian, at `at` rounded down to `width`.
fn put(b: &mut [u8], at: usize, width: usize, v: u64) {
    let at = at / width * width;
    if at + width <= b.len() {
        b[at..at + width].copy_from_slice(&v.to_be_bytes()[8 - width..]);
    }
}

fn mutate(seed: &Seed, muts: &[Mutation], cut: Option<u64>) -> Vec<u8> {
    let mut b = seed.bytes.clone();
    let file_len = b.len() as u64;
    for &(region, pos, kind, value) in muts {
        let (start, n) = seed.regions[region as usize % seed.regions.len()];
        let at = start + (pos % n as u64) as usize;
        match kind % 7 {
            0 => put(&mut b, at, 1, value & 0xff),
            1 => put(&mut b, at, 4, interesting(value, file_len) & 0xffff_ffff),
            2 => put(&mut b, at, 8, interesting(value, file_len)),
            3 => {
                if at < b.len() {
                    b[at] ^= 1 << (value % 8);
                }
            }
            4 => put(&mut b, at, 4, value & 0xffff_ffff),
            5 => put(&mut b, at, 8, value),
            _ => {
                // A small step up or down of the 32-bit word there.
                let w = at / 4 * 4;
                if w + 4 <= b.len() {
                    let v = be32(&b, w).wrapping_add(value % 17).wrapping_sub(8);
                    put(&mut b, w, 4, v & 0xffff_ffff);
                }
            }
        }
    }
    if let Some(c) = cut.filter(|c| c % 4 == 0) {
        b.truncate((c / 4 % file_len) as usize);
    }
    b
}

/// Parse, open, map and read one image. Errors are fine; panics are what the fuzzer looks for.
fn exercise(dir: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(h) = Header::parse(bytes, "fuzz") {
        let _ = h.check_file(bytes.len() as u64, "fuzz");
        let first = &bytes[..bytes.len().min(h.cluster_size() as usize)];
        let _ = format::compression_type(&h, first, "fuzz");
        let _ = format::parse_extensions(&h, first, "fuzz");
    }
    let path = dir.join("fuzz.qcow2");
    std::fs::write(&path, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let Ok(chain) = Qcow2Chain::open(&path) else {
        return Ok(());
    };
    let size = chain.size();
    let span = size.min(64 << 20);
    if let Ok(map) = chain.map(0, span) {
        let mut at = 0;
        for e in &map {
            prop_assert_eq!(e.offset, at, "the map has a gap or overlap: {:?}", map);
            prop_assert!(e.length > 0);
            at = e.end();
        }
        prop_assert_eq!(at, span, "the map does not cover the disk");
    }
    let mut buf = vec![0u8; 192 << 10];
    for offset in [0, size / 2 / 512 * 512, size.saturating_sub(100_000)] {
        if let Ok(n) = chain.read_at(offset, &mut buf) {
            prop_assert!(n as u64 <= size - offset.min(size));
        }
    }
    Ok(())
}

fn seconds() -> f64 {
    std::env::var("MOVER_FUZZ_SECONDS")
        .ok()
        .map_or(3.0, |v| v.parse().expect("MOVER_FUZZ_SECONDS is a number"))
}

#[test]
fn fuzz_qcow2_metadata() {
    let budget = Duration::from_secs_f64(seconds());
    let base_seed: u64 = std::env::var("MOVER_FUZZ_SEED")
        .ok()
        .map_or(0, |v| v.parse().expect("MOVER_FUZZ_SEED is a number"));
    // Every case writes its image: on tmpfs when there is one, a disk file system is slower.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let seeds: Vec<Seed> = make_corpus(dir.path())
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.path().join(&name)).unwrap();
            // Every seed opens and reads before it is mutated.
            let chain = Qcow2Chain::open(&dir.path().join(&name)).unwrap();
            let mut buf = vec![0u8; 4096];
            chain.read_at(0, &mut buf).unwrap();
            Seed {
                regions: regions(&bytes),
                name,
                bytes,
            }
        })
        .collect();
    let strategy = (
        0..seeds.len(),
        proptest::collection::vec((any::<u8>(), any::<u64>(), any::<u8>(), any::<u64>()), 1..8),
        proptest::option::of(any::<u64>()),
    );
    let start = Instant::now();
    let mut cases = 0u64;
    let mut round = 0u64;
    while start.elapsed() < budget {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&base_seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        let config = Config {
            cases: 64,
            failure_persistence: None,
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let result = runner.run(&strategy, |(i, muts, cut)| {
            exercise(dir.path(), &mutate(&seeds[i], &muts, cut))
        });
        if let Err(e) = result {
            let detail = match &e {
                TestError::Fail(why, (i, muts, cut)) => {
                    let kept = std::env::temp_dir().join("qcow2-fuzz-failure.qcow2");
                    std::fs::write(&kept, mutate(&seeds[*i], muts, *cut)).unwrap();
                    format!(
                        "{why}\nseed image {} with mutations {muts:?}, cut {cut:?}; the image is kept at {}",
                        seeds[*i].name,
                        kept.display()
                    )
                }
                TestError::Abort(why) => why.to_string(),
            };
            panic!("fuzz round {round} (MOVER_FUZZ_SEED={base_seed}) failed: {detail}");
        }
        cases += 64;
        round += 1;
    }
    println!(
        "fuzz: {cases} images from {} seeds in {:.1} s, no panic",
        seeds.len(),
        start.elapsed().as_secs_f64()
    );
}
