//! The NBD client against real servers: `qemu-nbd` and `nbdkit`, started by each test on a Unix
//! socket or a free loopback port in a temporary directory, killed when the test ends (the
//! guard's `Drop`, and `PR_SET_PDEATHSIG` should the test process die first). libnbd's `nbdinfo`
//! is the oracle for allocation maps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mover_core::endpoint::{Access, Endpoint, Extent};
use mover_core::nbd::{NbdEndpoint, NbdOptions};
use mover_core::MoverError;

mod common;

use common::{
    free_port, nbdkit_unix, pattern, qemu_unix, sparse_file, unix_uri, wait_for_port,
    wait_for_unix, Server, MIB,
};

fn write_access(size: u64) -> Access {
    Access::Write { create_size: size }
}

fn assert_target_write_code(err: &MoverError, code: i32) {
    match err {
        MoverError::TargetWrite { code: c, .. } => {
            assert_eq!(*c, Some(code.unsigned_abs()), "{err}");
        }
        other => panic!("expected TargetWrite, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_unix_handshake_write_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 16 * MIB);
    let socket = dir.path().join("nbd.sock");
    let _server = qemu_unix(&socket, &file, &[]);

    let err = NbdEndpoint::open(&unix_uri(&socket, "exp"), write_access(16 * MIB + 1))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, MoverError::InvalidEndpoint { .. }), "{err}");
    let ep = NbdEndpoint::open(&unix_uri(&socket, "exp"), write_access(16 * MIB))
        .await
        .unwrap();
    let caps = ep.capabilities().clone();
    assert_eq!(caps.size, 16 * MIB);
    assert!(!caps.read_only && caps.multi_conn && caps.extents && caps.fast_zero);
    assert_eq!(caps.max_request, 32 * MIB);
    let info = ep.export_info();
    assert!(info.structured_replies);
    assert_eq!(info.block_size.map(|b| b.preferred), Some(4096));

    let data = pattern(12_345, 300_000, 1);
    let back = ep.write(12_345, data.clone()).await.unwrap();
    assert_eq!(back, data, "the buffer comes back");
    ep.flush().await.unwrap();
    let read = ep.read(12_345, vec![0xaa; 300_000]).await.unwrap();
    assert!(read == data, "read back differs");
    // Around the data: holes read as zeros (OFFSET_HOLE chunks zero-fill the caller's buffer).
    let read = ep.read(0, vec![0xaa; 12_345]).await.unwrap();
    assert!(read.iter().all(|&b| b == 0));
    ep.close().await.unwrap();
    let err = ep.read(0, vec![0; 512]).await.unwrap_err();
    assert!(matches!(err, MoverError::Connect { .. }), "{err}");

    // What reached the file is what was written.
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[12_345..312_345] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tcp_and_another_connection() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 8 * MIB);
    let port = free_port();
    let port_s = port.to_string();
    let _server = Server::spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port_s,
            "-x",
            "disk",
            "--shared=4",
            "-t",
            file.to_str().unwrap(),
        ],
    );
    wait_for_port(port);

    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let ep = NbdEndpoint::open(&uri, write_access(0)).await.unwrap();
    assert_eq!(ep.capabilities().size, 8 * MIB);
    assert!(ep.capabilities().multi_conn);
    let other = ep.another().await.unwrap();
    let data = pattern(MIB, 65_536, 2);
    other.write(MIB, data.clone()).await.unwrap();
    other.flush().await.unwrap();
    assert!(ep.read(MIB, vec![0; 65_536]).await.unwrap() == data);

    // The same server through its IPv4 address only: an unknown export is a clear error.
    let err = NbdEndpoint::open(&format!("nbd://127.0.0.1:{port}/nope"), Access::Read)
        .await
        .err()
        .unwrap();
    match &err {
        MoverError::Connect { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert!(err.to_string().contains("\"nope\""), "{err}");
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_then_extents_show_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 8 * MIB);
    let socket = dir.path().join("q.sock");
    let _qemu = qemu_unix(&socket, &file, &["--discard=unmap"]);
    let socket2 = dir.path().join("k.sock");
    let _kit = nbdkit_unix(&socket2, &["memory", "8M"]);

    for uri in [unix_uri(&socket, "exp"), unix_uri(&socket2, "")] {
        let ep = NbdEndpoint::open(&uri, write_access(0)).await.unwrap();
        ep.write(2 * MIB, pattern(2 * MIB, 2 * MIB as usize, 3))
            .await
            .unwrap();
        let map = ep.extents(0, 8 * MIB).await.unwrap();
        assert!(
            map.iter()
                .any(|e| !e.zero && e.offset <= 2 * MIB && e.end() >= 4 * MIB),
            "{uri}: {map:?}"
        );
        ep.write_zeroes(2 * MIB, 2 * MIB).await.unwrap();
        let map = ep.extents(0, 8 * MIB).await.unwrap();
        assert_eq!(
            map,
            vec![Extent {
                offset: 0,
                length: 8 * MIB,
                zero: true
            }],
            "{uri}"
        );
        let back = ep.read(2 * MIB, vec![1; MIB as usize]).await.unwrap();
        assert!(back.iter().all(|&b| b == 0), "{uri}");
        // Part of the disk only, and a range running past its end, is clipped.
        let map = ep.extents(7 * MIB, 4 * MIB).await.unwrap();
        assert_eq!(map.first().map(|e| e.offset), Some(7 * MIB));
        assert_eq!(map.last().map(Extent::end), Some(8 * MIB));
        ep.close().await.unwrap();
    }
}

/// The allocation map as `nbdinfo --map` prints it, as zero/non-zero runs.
fn nbdinfo_map(uri: &str) -> Vec<Extent> {
    let out = Command::new(common::require_tool("nbdinfo"))
        .args(["--map", uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut runs: Vec<Extent> = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (offset, length, kind): (u64, u64, u32) = (
            fields[0].parse().unwrap(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        );
        let zero = kind & 2 != 0;
        match runs.last_mut() {
            Some(last) if last.zero == zero && last.end() == offset => last.length += length,
            _ => runs.push(Extent {
                offset,
                length,
                zero,
            }),
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_file_extents_match_nbdinfo() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 64 * MIB);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        for (offset, len) in [(MIB, MIB), (5 * MIB, MIB / 2), (40 * MIB, 3 * MIB)] {
            f.write_all_at(&pattern(offset, len as usize, 4), offset)
                .unwrap();
        }
    }
    let q_sock = dir.path().join("q.sock");
    let _qemu = qemu_unix(&q_sock, &file, &["-r"]);
    let k_sock = dir.path().join("k.sock");
    let _kit = nbdkit_unix(&k_sock, &["-r", "file", file.to_str().unwrap()]);

    for uri in [unix_uri(&q_sock, "exp"), unix_uri(&k_sock, "")] {
        let ep = NbdEndpoint::open(&uri, Access::Read).await.unwrap();
        let ours = ep.extents(0, 64 * MIB).await.unwrap();
        assert_eq!(ours, nbdinfo_map(&uri), "{uri}");
        assert!(ours.iter().any(|e| e.zero) && ours.iter().any(|e| !e.zero));
        for e in ours.iter().filter(|e| !e.zero) {
            let data = ep.read(e.offset, vec![0; e.length as usize]).await.unwrap();
            assert!(data.iter().any(|&b| b != 0), "{uri}: {e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_flag_decides_what_another_is() {
    let dir = tempfile::tempdir().unwrap();
    let on = dir.path().join("on.sock");
    let _on = nbdkit_unix(&on, &["memory", "1M"]);
    let off = dir.path().join("off.sock");
    let _off = nbdkit_unix(
        &off,
        &[
            "--filter=multi-conn",
            "--filter=log",
            "memory",
            "1M",
            "multi-conn-mode=disable",
            &format!("logfile={}", dir.path().join("off.log").display()),
        ],
    );
    let ep = NbdEndpoint::open(&unix_uri(&on, ""), write_access(0))
        .await
        .unwrap();
    assert!(ep.capabilities().multi_conn);

    let ep = NbdEndpoint::open(&unix_uri(&off, ""), write_access(0))
        .await
        .unwrap();
    assert!(!ep.capabilities().multi_conn);
    let shared = ep.another().await.unwrap();
    shared.write(0, vec![9; 4096]).await.unwrap();
    assert_eq!(ep.read(0, vec![0; 4096]).await.unwrap(), vec![9; 4096]);
    let log = std::fs::read_to_string(dir.path().join("off.log")).unwrap();
    assert_eq!(
        log.matches(" Connect ").count(),
        1,
        "another() must share the connection: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 4 * MIB);
    let socket = dir.path().join("ro.sock");
    let _server = qemu_unix(&socket, &file, &["-r"]);

    let ep = NbdEndpoint::open(&unix_uri(&socket, "exp"), write_access(0))
        .await
        .unwrap();
    assert!(ep.capabilities().read_only);
    assert!(!ep.capabilities().fast_zero);
    let err = ep.write(0, vec![1; 4096]).await.unwrap_err();
    assert_target_write_code(&err, libc::EPERM);
    assert!(err.to_string().contains("read-only"), "{err}");
    let err = ep.write_zeroes(0, 4096).await.unwrap_err();
    assert_target_write_code(&err, libc::EPERM);
    assert!(ep
        .read(0, vec![1; 4096])
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // A writable export opened for reading refuses writes the same way.
    let socket = dir.path().join("rw.sock");
    let _rw = qemu_unix(&socket, &file, &[]);
    let ep = NbdEndpoint::open(&unix_uri(&socket, "exp"), Access::Read)
        .await
        .unwrap();
    assert!(ep.capabilities().read_only);
    let err = ep.write(0, vec![1; 4096]).await.unwrap_err();
    assert_target_write_code(&err, libc::EPERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_carry_their_errno() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("err.sock");
    let _server = nbdkit_unix(
        &socket,
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pwrite=EPERM",
            "error-pwrite-rate=100%",
            "error-pread=EIO",
            "error-pread-rate=100%",
            "error-extents=EIO",
            "error-extents-rate=100%",
        ],
    );
    let ep = NbdEndpoint::open(&unix_uri(&socket, ""), write_access(0))
        .await
        .unwrap();
    let err = ep.write(4096, vec![1; 4096]).await.unwrap_err();
    assert_target_write_code(&err, libc::EPERM);
    match ep.read(8192, vec![0; 4096]).await.unwrap_err() {
        MoverError::SourceRead {
            offset,
            length,
            code,
            ..
        } => {
            assert_eq!((offset, length), (8192, 4096));
            assert_eq!(code, Some(libc::EIO.unsigned_abs()));
        }
        other => panic!("expected SourceRead, got {other:?}"),
    }
    let err = ep.extents(0, MIB).await.unwrap_err();
    assert!(
        matches!(err, MoverError::SourceRead { code: Some(c), .. } if c == libc::EIO.unsigned_abs()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutting_down_is_left_and_rejoined() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("shutting-down");
    std::fs::write(&trigger, b"").unwrap();
    let socket = dir.path().join("sd.sock");
    let log = dir.path().join("sd.log");
    let _server = nbdkit_unix(
        &socket,
        &[
            "--filter=log",
            "--filter=error",
            "memory",
            "1M",
            "error-pread=ESHUTDOWN",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", trigger.display()),
            &format!("logfile={}", log.display()),
        ],
    );
    let ep = Arc::new(
        NbdEndpoint::open(&unix_uri(&socket, ""), write_access(0))
            .await
            .unwrap(),
    );
    ep.write(0, vec![5; 4096]).await.unwrap();
    let reader = Arc::clone(&ep);
    let read = tokio::spawn(async move { reader.read(0, vec![0; 4096]).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::remove_file(&trigger).unwrap();
    assert_eq!(read.await.unwrap().unwrap(), vec![5; 4096]);
    assert!(ep.reconnections() >= 1);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.matches(" Disconnect ").count() >= 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_and_bad_uris() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let err = NbdEndpoint::open(&unix_uri(&missing, ""), Access::Read)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, MoverError::Connect { .. }), "{err}");

    let refused = format!("nbd://127.0.0.1:{}/x", free_port());
    let err = NbdEndpoint::open(&refused, Access::Read)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, MoverError::Connect { .. }), "{err}");

    for bad in ["nbd://", "nbd+unix:///x", "nbd://h:99999/", "nbds://h/x"] {
        let err = NbdEndpoint::open(bad, Access::Read).await.err().unwrap();
        assert!(
            matches!(err, MoverError::InvalidEndpoint { .. }),
            "{bad}: {err}"
        );
    }

    // A server that does not offer the fixed newstyle handshake is named as such.
    let socket = dir.path().join("old.sock");
    let _server = nbdkit_unix(&socket, &["--mask-handshake=0", "memory", "1M"]);
    let err = NbdEndpoint::open(&unix_uri(&socket, ""), Access::Read)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, MoverError::Protocol { message, .. } if message.contains("fixed newstyle")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_without_structured_reply_support() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nosr.sock");
    let _server = nbdkit_unix(&socket, &["--no-sr", "memory", "4M"]);
    let ep = NbdEndpoint::open(&unix_uri(&socket, ""), write_access(0))
        .await
        .unwrap();
    assert!(!ep.export_info().structured_replies);
    assert!(!ep.capabilities().extents);
    let data = pattern(1000, 100_000, 5);
    ep.write(1000, data.clone()).await.unwrap();
    assert!(ep.read(1000, vec![0; 100_000]).await.unwrap() == data);
    assert_eq!(
        ep.extents(0, 4 * MIB).await.unwrap(),
        vec![Extent {
            offset: 0,
            length: 4 * MIB,
            zero: false
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroing_falls_back_and_large_requests_are_split() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("small.sock");
    let log = dir.path().join("small.log");
    let _server = nbdkit_unix(
        &socket,
        &[
            "--filter=nozero",
            "--filter=blocksize-policy",
            "--filter=log",
            "memory",
            "8M",
            "blocksize-maximum=1M",
            "blocksize-preferred=64K",
            &format!("logfile={}", log.display()),
        ],
    );
    let ep = NbdEndpoint::open(&unix_uri(&socket, ""), write_access(0))
        .await
        .unwrap();
    assert!(!ep.capabilities().fast_zero);
    assert_eq!(ep.capabilities().max_request, MIB);

    let data = pattern(4096, 3 * MIB as usize + 100, 6);
    ep.write(4096, data.clone()).await.unwrap();
    assert!(ep.read(4096, vec![0; data.len()]).await.unwrap() == data);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches(" Write id=").count(), 4, "{text}");
    assert_eq!(text.matches(" Read id=").count(), 4, "{text}");

    ep.write_zeroes(4096, 2 * MIB).await.unwrap();
    let back = ep.read(0, vec![1; 3 * MIB as usize]).await.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..4096 + 2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(back[4096 + 2 * MIB as usize..] == data[2 * MIB as usize..3 * MIB as usize - 4096]);
    let trimmed = ep.trim(0, MIB);
    trimmed.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 64 * MIB);
    let socket = dir.path().join("nbd.sock");
    let _server = qemu_unix(&socket, &file, &[]);
    let ep: Arc<dyn Endpoint> = Arc::new(
        NbdEndpoint::open(&unix_uri(&socket, "exp"), write_access(0))
            .await
            .unwrap(),
    );
    let chunk = 256 * 1024;
    let count = 128u64;
    let writes: Vec<_> = (0..count)
        .map(|i| {
            let ep = Arc::clone(&ep);
            tokio::spawn(async move {
                let offset = i * chunk as u64;
                ep.write(offset, pattern(offset, chunk, 7)).await.unwrap();
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    let reads: Vec<_> = (0..count)
        .map(|i| {
            let ep = Arc::clone(&ep);
            tokio::spawn(async move {
                let offset = i * chunk as u64;
                let back = ep.read(offset, vec![0; chunk]).await.unwrap();
                assert!(back == pattern(offset, chunk, 7), "chunk {i}");
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
}

/// `nbdkit file` with every read delayed, so requests are surely in flight when it dies.
fn slow_file_server(socket: &Path, file: &Path, log: &Path) -> Server {
    nbdkit_unix(
        socket,
        &[
            "--filter=log",
            "--filter=delay",
            "file",
            file.to_str().unwrap(),
            "rdelay=500ms",
            &format!("logfile={}", log.display()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_survive_a_server_restart() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 16 * MIB);
    let data = pattern(0, 16 * MIB as usize, 8);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut server = slow_file_server(&socket, &file, &dir.path().join("first.log"));
    let nbd = Arc::new(
        NbdEndpoint::open(&unix_uri(&socket, ""), Access::Read)
            .await
            .unwrap(),
    );
    let ep: Arc<dyn Endpoint> = nbd.clone();
    let chunk = 256 * 1024;
    let reads: Vec<_> = (0..32u64)
        .map(|i| {
            let ep = Arc::clone(&ep);
            tokio::spawn(async move {
                let offset = i * chunk as u64;
                ep.read(offset, vec![0; chunk]).await.unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second_log = dir.path().join("second.log");
    let _server = slow_file_server(&socket, &file, &second_log);
    for (i, r) in reads.into_iter().enumerate() {
        let back = r.await.unwrap();
        assert!(back[..] == data[i * chunk..(i + 1) * chunk], "chunk {i}");
    }
    // All 32 requests saw the drop; one reconnection served them (the readiness probe of the
    // test connects too, but never completes a handshake).
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert_eq!(log.matches(" Connect ").count(), 1, "{log}");
    assert_eq!(nbd.reconnections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_a_qemu_nbd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 64 * MIB);
    let socket = dir.path().join("nbd.sock");
    let mut server = qemu_unix(&socket, &file, &[]);
    let nbd = Arc::new(
        NbdEndpoint::open(&unix_uri(&socket, "exp"), write_access(0))
            .await
            .unwrap(),
    );
    let ep: Arc<dyn Endpoint> = nbd.clone();
    let chunk = MIB as usize;
    let writes: Vec<_> = (0..64u64)
        .map(|i| {
            let ep = Arc::clone(&ep);
            tokio::spawn(async move {
                let offset = i * chunk as u64;
                ep.write(offset, pattern(offset, chunk, 9)).await.unwrap();
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = qemu_unix(&socket, &file, &[]);
    for w in writes {
        w.await.unwrap();
    }
    ep.flush().await.unwrap();
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk == pattern(0, 64 * MIB as usize, 9));
    assert_eq!(nbd.reconnections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_gives_up_with_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gone.sock");
    let mut server = nbdkit_unix(&socket, &["memory", "1M"]);
    let ep = NbdEndpoint::open_with(
        &unix_uri(&socket, ""),
        Access::Read,
        NbdOptions {
            reconnect_timeout: Duration::from_secs(1),
            ..NbdOptions::default()
        },
    )
    .await
    .unwrap();
    ep.read(0, vec![0; 4096]).await.unwrap();
    server.kill();
    let started = Instant::now();
    let err = ep.read(0, vec![0; 4096]).await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, MoverError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("gave up"), "{err}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    // Terminal: the next request fails at once.
    let started = Instant::now();
    assert!(ep.read(0, vec![0; 4096]).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// What the scripted server does with the first request of each connection.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Close the connection without replying.
    Hangup,
    /// Answer with a reply magic that does not exist.
    BadMagic,
}

/// A minimal NBD server on loopback, for failures real servers do not produce on demand:
/// fixed newstyle, no structured replies, one 1 MiB export; each connection's first request is
/// met with `how`. Returns the port and a counter of connections that reached transmission.
fn scripted_server(how: Misbehaviour) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&sessions);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut handshake = || -> std::io::Result<()> {
                s.write_all(b"NBDMAGICIHAVEOPT\x00\x03")?;
                let mut flags = [0u8; 4];
                s.read_exact(&mut flags)?;
                loop {
                    let mut header = [0u8; 16];
                    s.read_exact(&mut header)?;
                    let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
                    let len = u32::from_be_bytes(header[12..16].try_into().unwrap());
                    std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink())?;
                    let reply = |kind: u32, data: &[u8]| {
                        let mut out = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec();
                        out.extend_from_slice(&option.to_be_bytes());
                        out.extend_from_slice(&kind.to_be_bytes());
                        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
                        out.extend_from_slice(data);
                        out
                    };
                    if option == 7 {
                        let mut info = vec![0, 0];
                        info.extend_from_slice(&MIB.to_be_bytes());
                        info.extend_from_slice(&1u16.to_be_bytes());
                        s.write_all(&reply(3, &info))?;
                        s.write_all(&reply(1, &[]))?;
                        return Ok(());
                    }
                    s.write_all(&reply(0x8000_0001, &[]))?;
                }
            };
            if handshake().is_err() {
                continue;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = [0u8; 28];
            if s.read_exact(&mut request).is_err() {
                continue;
            }
            if let Misbehaviour::BadMagic = how {
                let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
                let _ = s.write_all(&request[8..16]);
            }
        }
    });
    (port, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_always_kills_the_connection_fails_in_time() {
    let (port, sessions) = scripted_server(Misbehaviour::Hangup);
    let ep = NbdEndpoint::open_with(
        &format!("nbd://127.0.0.1:{port}/"),
        Access::Read,
        NbdOptions {
            reconnect_timeout: Duration::from_secs(1),
            ..NbdOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ep.capabilities().size, MIB);
    let started = Instant::now();
    let err = ep.read(0, vec![0; 512]).await.unwrap_err();
    assert!(
        matches!(&err, MoverError::Connect { source, .. }
            if source.to_string().contains("kept losing")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(sessions.load(std::sync::atomic::Ordering::SeqCst) > 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_reply_is_a_protocol_error() {
    let (port, _) = scripted_server(Misbehaviour::BadMagic);
    let ep = NbdEndpoint::open(&format!("nbd://127.0.0.1:{port}/"), Access::Read)
        .await
        .unwrap();
    assert!(!ep.export_info().structured_replies);
    let err = ep.read(0, vec![0; 512]).await.unwrap_err();
    assert!(
        matches!(&err, MoverError::Protocol { message, .. } if message.contains("reply magic")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback() {
    // A host without IPv6 loopback fails this test rather than passing it unrun.
    let probe = std::net::TcpListener::bind("[::1]:0").unwrap_or_else(|e| {
        panic!("no IPv6 loopback here ([::1]: {e}): enable it to run this test")
    });
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let port_s = port.to_string();
    let _server = Server::spawn(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-i",
            "::1",
            "-p",
            &port_s,
            "memory",
            "2M",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("::1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nbdkit did not listen on [::1]:{port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ep = NbdEndpoint::open(&format!("nbd://[::1]:{port}/"), write_access(0))
        .await
        .unwrap();
    assert_eq!(ep.capabilities().size, 2 * MIB);
    ep.write(4096, vec![3; 4096]).await.unwrap();
    assert_eq!(ep.read(4096, vec![0; 4096]).await.unwrap(), vec![3; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_at_its_client_limit_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), MIB);
    let socket = dir.path().join("one.sock");
    let _ = std::fs::remove_file(&socket);
    let _server = Server::spawn(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "-k",
            socket.to_str().unwrap(),
            "-x",
            "exp",
            "--shared=1",
            "-t",
            file.to_str().unwrap(),
        ],
    );
    wait_for_unix(&socket);
    let uri = unix_uri(&socket, "exp");
    let opts = NbdOptions {
        connect_timeout: Duration::from_millis(500),
        ..NbdOptions::default()
    };
    let _first = NbdEndpoint::open_with(&uri, Access::Read, opts.clone())
        .await
        .unwrap();
    let started = Instant::now();
    let err = NbdEndpoint::open_with(&uri, Access::Read, opts)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, MoverError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::TimedOut),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lets_requests_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), MIB);
    std::fs::write(&file, pattern(0, MIB as usize, 10)).unwrap();
    let socket = dir.path().join("slow.sock");
    let log = dir.path().join("slow.log");
    let _server = slow_file_server(&socket, &file, &log);
    let ep = Arc::new(
        NbdEndpoint::open(&unix_uri(&socket, ""), Access::Read)
            .await
            .unwrap(),
    );
    let reads: Vec<_> = (0..4u64)
        .map(|i| {
            let ep = Arc::clone(&ep);
            tokio::spawn(async move { ep.read(i * 4096, vec![0; 4096]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ep.close().await.unwrap();
    for (i, r) in reads.into_iter().enumerate() {
        let back = r.await.unwrap().unwrap();
        assert!(back == pattern(i as u64 * 4096, 4096, 10), "read {i}");
    }
    let err = ep.read(0, vec![0; 4096]).await.unwrap_err();
    assert!(matches!(err, MoverError::Connect { .. }), "{err}");
    assert_eq!(ep.reconnections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_copy_stops_waiting_for_a_lost_server() {
    use mover_core::copy::{self, CopyOptions};
    use mover_core::endpoint::OpenOptions;
    use mover_core::plan::PlanKind;
    use mover_core::progress::{CancelToken, Progress};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("slow.sock");
    let image = sparse_file(dir.path(), 256 * MIB);
    // A slow source (nbdkit's delay filter), killed mid-copy: the copy's requests then wait for
    // a reconnection the 60-s window would allow.
    let mut server = Server::spawn(
        "nbdkit",
        &[
            "-f",
            "-U",
            socket.to_str().unwrap(),
            "--filter=delay",
            "file",
            image.to_str().unwrap(),
            "rdelay=200ms",
        ],
    );
    wait_for_unix(&socket);
    let target = dir.path().join("target.raw");
    let cancel = Arc::new(CancelToken::default());
    let copy = tokio::spawn({
        let (source, target, cancel) = (unix_uri(&socket, ""), target.clone(), Arc::clone(&cancel));
        async move {
            copy::run(
                &source,
                target.to_str().unwrap(),
                &PlanKind::All,
                &CopyOptions::default(),
                &OpenOptions::default(),
                Arc::new(Progress::default()),
                cancel,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), copy)
        .await
        .expect("the cancelled copy ended within 10 s")
        .unwrap();
    assert!(matches!(result, Err(MoverError::Cancelled)), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// An `nbdkit` export that is writable but cannot flush: the `eval` plugin over a file, with
/// no `can_flush` (so nbdkit does not advertise `NBD_FLAG_SEND_FLUSH`).
fn flushless_server(socket: &Path, file: &Path, size: u64) -> Server {
    let f = file.to_str().unwrap();
    let get_size = format!("get_size=echo {size}");
    let pread =
        format!("pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none");
    let pwrite = format!("pwrite=dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none");
    nbdkit_unix(
        socket,
        &["eval", &get_size, &pread, &pwrite, "can_write=exit 0"],
    )
}

/// A sparse `source.raw` of `size` bytes holding `pattern(offset, len, seed)` at each
/// `(offset, len, seed)` of `data`, and its contents.
fn source_with_data(dir: &Path, size: u64, data: &[(u64, usize, u64)]) -> (PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let source = dir.join("source.raw");
    let f = std::fs::File::create(&source).unwrap();
    f.set_len(size).unwrap();
    for &(offset, len, seed) in data {
        f.write_all_at(&pattern(offset, len, seed), offset).unwrap();
    }
    let contents = std::fs::read(&source).unwrap();
    (source, contents)
}

/// Copy `source` to `target` with `copy::run` and default options (plus `checkpoint`).
async fn run_copy(
    source: &str,
    target: &str,
    checkpoint: Option<&Path>,
) -> mover_core::Result<mover_core::copy::CopyOutcome> {
    let opts = mover_core::copy::CopyOptions {
        checkpoint: checkpoint.map(Path::to_owned),
        request_size: 256 << 10,
        ..mover_core::copy::CopyOptions::default()
    };
    run_copy_with(source, target, &opts).await
}

/// Copy what `source` reports allocated to `target` with `copy::run` and `opts`.
async fn run_copy_with(
    source: &str,
    target: &str,
    opts: &mover_core::copy::CopyOptions,
) -> mover_core::Result<mover_core::copy::CopyOutcome> {
    use mover_core::endpoint::OpenOptions;
    use mover_core::plan::PlanKind;
    mover_core::copy::run(
        source,
        target,
        &PlanKind::Allocated,
        opts,
        &OpenOptions::default(),
        Arc::default(),
        Arc::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_a_server_without_flush_is_not_durable() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (source, want) = source_with_data(dir.path(), size, &[(MIB, 512 << 10, 5)]);
    let source = source.to_str().unwrap();

    // nbdkit without flush: the bytes arrive, but the copy says they are not durable, with a
    // checkpoint (whose flushes say the same) and without.
    let kit_file = dir.path().join("kit.raw");
    std::fs::File::create(&kit_file)
        .unwrap()
        .set_len(size)
        .unwrap();
    let kit_sock = dir.path().join("kit.sock");
    let _kit = flushless_server(&kit_sock, &kit_file, size);
    let ep = NbdEndpoint::open(&unix_uri(&kit_sock, ""), write_access(size))
        .await
        .unwrap();
    assert!(!ep
        .export_info()
        .has(mover_core::nbd::proto::TFLAG_SEND_FLUSH));
    assert!(!ep.flush_durable().await.unwrap());
    ep.close().await.unwrap();
    let outcome = run_copy(source, &unix_uri(&kit_sock, ""), None)
        .await
        .unwrap();
    assert!(!outcome.durable, "no flush, yet reported durable");
    assert!(std::fs::read(&kit_file).unwrap() == want);
    let checkpoint = dir.path().join("kit.checkpoint");
    let outcome = run_copy(source, &unix_uri(&kit_sock, ""), Some(&checkpoint))
        .await
        .unwrap();
    assert!(!outcome.durable, "no flush, yet reported durable");

    // qemu-nbd advertises flush and acknowledges it: durable. So is a raw file (fdatasync).
    let qemu_file = sparse_file(dir.path(), size);
    let qemu_sock = dir.path().join("qemu.sock");
    let _qemu = qemu_unix(&qemu_sock, &qemu_file, &[]);
    let outcome = run_copy(source, &unix_uri(&qemu_sock, "exp"), None)
        .await
        .unwrap();
    assert!(outcome.durable);
    assert!(std::fs::read(&qemu_file).unwrap() == want);
    let checkpoint = dir.path().join("qemu.checkpoint");
    let outcome = run_copy(source, &unix_uri(&qemu_sock, "exp"), Some(&checkpoint))
        .await
        .unwrap();
    assert!(outcome.durable);
    let raw = dir.path().join("copy.raw");
    let outcome = run_copy(source, raw.to_str().unwrap(), None).await.unwrap();
    assert!(outcome.durable);
}

/// The requests `nbdkit --filter=log` logged of one kind (`Zero`, `Flush`, `Write`), in order,
/// as `(offset, count)` (zero for a flush); replies are logged as `...Zero id=`, not matched.
fn logged(log: &Path, kind: &str) -> Vec<(u64, u64)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map_or(0, |v| {
                u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
            })
    };
    let text = std::fs::read_to_string(log).unwrap();
    let wanted = format!(" {kind} id=");
    text.lines()
        .filter(|l| l.contains(&wanted))
        .map(|l| (field(l, "offset="), field(l, "count=")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_zeroes_only_what_does_not_read_as_zeros_and_flushes_as_it_goes() {
    use mover_core::copy::CopyOptions;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    // The source: data at 1 MiB and 6 MiB, holes elsewhere.
    let data = [(MIB, MIB as usize, 8), (6 * MIB, MIB as usize, 8)];
    let (source, want) = source_with_data(dir.path(), size, &data);
    // Targets: a fresh sparse file, and one with stale data at 3-4 MiB (a hole of the source).
    let stale = dir.path().join("stale.raw");
    std::fs::File::create(&stale)
        .unwrap()
        .set_len(size)
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stale)
        .unwrap()
        .write_all_at(&vec![0xa5; MIB as usize], 3 * MIB)
        .unwrap();
    let fresh = sparse_file(dir.path(), size);
    let opts = CopyOptions {
        request_size: 256 << 10,
        flush_ahead: 256 << 10,
        ..CopyOptions::default()
    };
    for (file, zeroed) in [(&fresh, vec![]), (&stale, vec![(3 * MIB, MIB)])] {
        let (sock, log) = (dir.path().join("k.sock"), dir.path().join("k.log"));
        let _ = std::fs::remove_file(&log);
        let kit = nbdkit_unix(
            &sock,
            &[
                "--filter=log",
                "file",
                file.to_str().unwrap(),
                &format!("logfile={}", log.display()),
            ],
        );
        let target = unix_uri(&sock, "");
        let ep = NbdEndpoint::open(&target, write_access(size))
            .await
            .unwrap();
        let caps = ep.capabilities().clone();
        ep.close().await.unwrap();
        assert!(caps.cheap_extents && caps.flush_ahead, "{caps:?}");
        let outcome = run_copy_with(source.to_str().unwrap(), &target, &opts)
            .await
            .unwrap();
        drop(kit);
        assert!(std::fs::read(file).unwrap() == want, "{}", file.display());
        assert!(outcome.durable);
        // The holes of the source still count as zeroed.
        assert_eq!(outcome.progress.bytes_zeroed, size - 2 * MIB);
        assert_eq!(logged(&log, "Zero"), zeroed, "{}", file.display());
        // 2 MiB of data in 256 KiB requests, a flush due every 256 KiB written (one at a
        // time): more than the final flush.
        let flushes = logged(&log, "Flush").len();
        assert!(flushes >= 2, "{flushes} flushes into {}", file.display());
    }
}

/// Options with short deadlines, for servers that stop answering.
fn short_deadlines() -> NbdOptions {
    NbdOptions {
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        reconnect_timeout: Duration::from_secs(1),
        ..NbdOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_fails_the_request_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("silent.sock");
    // The handshake is answered at once; reads are answered in an hour.
    let _server = nbdkit_unix(&socket, &["--filter=delay", "memory", "1M", "rdelay=3600"]);
    let ep = NbdEndpoint::open_with(&unix_uri(&socket, ""), Access::Read, short_deadlines())
        .await
        .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), ep.read(4096, vec![0; 4096]))
        .await
        .expect("the read waited for the silent server for 20 s")
        .unwrap_err();
    let waited = started.elapsed();
    let text = err.to_string();
    assert!(matches!(err, MoverError::Connect { .. }), "{text}");
    assert!(
        text.contains("NBD_CMD_READ at offset 4096 (4096 bytes): no reply within 1s"),
        "{text}"
    );
    // One timeout, a reconnection, the request again and its timeout: about 2 s.
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    assert!(ep.reconnections() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_fails_writes_and_flushes_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let file = sparse_file(dir.path(), 64 * MIB);
    let socket = dir.path().join("stopped.sock");
    let server = qemu_unix(&socket, &file, &[]);
    let ep = NbdEndpoint::open_with(
        &unix_uri(&socket, "exp"),
        write_access(0),
        short_deadlines(),
    )
    .await
    .unwrap();
    ep.write(0, vec![1; 4096]).await.unwrap();
    server.stop();
    // 32 MiB: more than the socket takes, so the send itself blocks on the stopped server.
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), ep.write(0, vec![2; 32 << 20]))
        .await
        .expect("the write waited for the stopped server for 20 s")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("NBD_CMD_WRITE at offset 0 (33554432 bytes): no reply within 1s"),
        "{text}"
    );
    // The timeout, then a reconnection that finds no handshake within the window.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // The client gave up: a flush fails at once rather than waiting again.
    let started = Instant::now();
    assert!(ep.flush().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    server.resume();
}
