//! One conformance suite for every endpoint implementation (the way restic runs one backend
//! suite against every backend): what the copy engine relies on must hold for a local file,
//! `qemu-nbd` and `nbdkit` alike.

mod common;

use std::path::Path;
use std::sync::Arc;

use mover_core::endpoint::{Access, Endpoint};
use mover_core::MoverError;

use common::{nbdkit_unix, pattern, qemu_unix, sparse_file, unix_uri, Server, MIB};

const SIZE: u64 = 8 * MIB;

/// An endpoint under test, with whatever keeps it alive.
struct Subject {
    name: &'static str,
    spec: String,
    _server: Option<Server>,
}

fn subjects(dir: &Path) -> Vec<Subject> {
    let file = sparse_file(dir, SIZE);
    let qemu_file = dir.join("qemu.raw");
    std::fs::File::create(&qemu_file)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let qemu_sock = dir.join("qemu.sock");
    let kit_sock = dir.join("kit.sock");
    vec![
        Subject {
            name: "file",
            spec: file.to_str().unwrap().to_owned(),
            _server: None,
        },
        Subject {
            name: "qemu-nbd",
            spec: unix_uri(&qemu_sock, "exp"),
            _server: Some(qemu_unix(&qemu_sock, &qemu_file, &["--discard=unmap"])),
        },
        Subject {
            name: "nbdkit memory",
            spec: unix_uri(&kit_sock, ""),
            _server: Some(nbdkit_unix(&kit_sock, &["memory", &format!("size={SIZE}")])),
        },
    ]
}

async fn open(s: &Subject) -> Arc<dyn Endpoint> {
    mover_core::open::open(&s.spec, Access::Write { create_size: SIZE })
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", s.name))
}

async fn read(ep: &dyn Endpoint, offset: u64, len: usize) -> Vec<u8> {
    ep.read(offset, vec![0xee; len]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_conforms() {
    let dir = tempfile::tempdir().unwrap();
    for s in subjects(dir.path()) {
        let ep = open(&s).await;
        let name = s.name;
        let caps = ep.capabilities().clone();
        assert_eq!(caps.size, SIZE, "{name}: size");
        assert!(!caps.read_only, "{name}: opened for writing");
        assert!(
            caps.max_request >= 1 << 16,
            "{name}: max request {}",
            caps.max_request
        );

        // Unwritten space reads as zeros; unaligned writes read back exactly.
        assert!(
            read(&*ep, 3 * MIB, 4096).await.iter().all(|&b| b == 0),
            "{name}: fresh disk"
        );
        let data = pattern(12_345, 300_001, 1);
        ep.write(12_345, data.clone()).await.unwrap();
        assert_eq!(
            read(&*ep, 12_345, data.len()).await,
            data,
            "{name}: read back"
        );

        // The allocation map covers the range in order, without gaps.
        let map = ep.extents(0, SIZE).await.unwrap();
        let mut pos = 0;
        for e in &map {
            assert_eq!(e.offset, pos, "{name}: map gap at {pos}: {map:?}");
            assert!(e.length > 0, "{name}: empty extent");
            pos = e.end();
        }
        assert_eq!(pos, SIZE, "{name}: map covers the disk");

        // Zeroing makes the range read as zeros, and the map says so where it can.
        ep.write_zeroes(0, MIB).await.unwrap();
        assert!(
            read(&*ep, 0, MIB as usize).await.iter().all(|&b| b == 0),
            "{name}: zeroed"
        );
        if caps.extents {
            let map = ep.extents(0, MIB).await.unwrap();
            assert!(
                map.iter().all(|e| e.zero),
                "{name}: zeroed range mapped as zero: {map:?}"
            );
        }

        // Another handle sees completed writes.
        ep.write(5 * MIB, pattern(5 * MIB, 65_536, 2))
            .await
            .unwrap();
        ep.flush().await.unwrap();
        // Each of these can make its writes durable (fdatasync, an acknowledged NBD flush).
        assert!(
            ep.flush_durable().await.unwrap(),
            "{name}: flush is durable"
        );
        let other = ep.another().await.unwrap();
        assert_eq!(
            read(&*other, 5 * MIB, 65_536).await,
            pattern(5 * MIB, 65_536, 2),
            "{name}: another"
        );

        // Reading past the end is an error, not a hang or a short read.
        assert!(
            ep.read(SIZE - 10, vec![0; 20]).await.is_err(),
            "{name}: read past the end"
        );

        other.close().await.unwrap();
        ep.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_endpoints_refuse_writes_with_a_target_error() {
    let dir = tempfile::tempdir().unwrap();
    for s in subjects(dir.path()) {
        let ep = mover_core::open::open(&s.spec, Access::Read).await.unwrap();
        let Err(err) = ep.write(0, vec![1; 4096]).await else {
            panic!("{}: a read-only endpoint accepted a write", s.name);
        };
        assert!(
            matches!(err, MoverError::TargetWrite { .. }),
            "{}: {err:?}",
            s.name
        );
        ep.close().await.unwrap();
    }
}
