//! Real NBD servers for the integration tests: `qemu-nbd` and `nbdkit` on Unix sockets or
//! loopback ports, killed when their guard drops (and by `PR_SET_PDEATHSIG` should the test
//! process die first), plus test data helpers.

#![allow(dead_code)] // each test crate uses its own subset

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// A server process, killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    /// Start `program` (which must be on the `PATH`: see [`require_tool`]).
    pub fn spawn(program: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(require_tool(program));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Self { child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stop the process (`SIGSTOP`): its sockets stay open and the kernel keeps accepting and
    /// acknowledging bytes, but nothing answers. `kill` still ends it.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: a signal to our own child, which has not been waited for (so its pid is ours).
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn wait_for_unix(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "server did not listen on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// `qemu-nbd` serving a raw file on a Unix socket as export `exp`, four clients at most,
/// persistent. `extra` comes before the file name.
pub fn qemu_unix(socket: &Path, file: &Path, extra: &[&str]) -> Server {
    let _ = std::fs::remove_file(socket);
    let (socket_s, file_s) = (socket.to_str().unwrap(), file.to_str().unwrap());
    let mut args = vec!["-f", "raw", "-k", socket_s, "-x", "exp", "--shared=4", "-t"];
    args.extend_from_slice(extra);
    args.push(file_s);
    let server = Server::spawn("qemu-nbd", &args);
    wait_for_unix(socket);
    server
}

/// `nbdkit` in the foreground on a Unix socket; `args` are filters, plugin and parameters.
pub fn nbdkit_unix(socket: &Path, args: &[&str]) -> Server {
    let _ = std::fs::remove_file(socket);
    let mut all = vec!["-f", "--exit-with-parent", "-U", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let server = Server::spawn("nbdkit", &all);
    wait_for_unix(socket);
    server
}

pub fn sparse_file(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Bytes that differ from offset to offset and from seed to seed.
pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            (x >> 29) as u8
        })
        .collect()
}

/// Where `tool` is on the `PATH`. A test that needs a tool never passes without it: a missing
/// one fails the test, naming the tool and the package that has it.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            let package = match tool {
                "qemu-img" | "qemu-nbd" | "qemu-io" => "qemu-utils",
                "nbdinfo" | "nbdcopy" => "libnbd-bin",
                "nbdkit" => "nbdkit",
                _ => "its package",
            };
            panic!(
                "{tool} is not on the PATH ({}): this test needs it and never passes without \
                 it; install {package} (./scripts/bootstrap.sh does)",
                path.to_string_lossy()
            )
        })
}

/// `qemu-img` is on the `PATH`, else the test fails ([`require_tool`]); always true. Kept as a
/// predicate for the tests written `if !have_qemu() { return; }`, which can no longer return
/// early as a pass.
pub fn have_qemu() -> bool {
    require_tool("qemu-img");
    true
}

/// Run a command, fail the test with its output unless it exits 0; return stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(require_tool(cmd)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` passes with no corruption, leak or check error.
pub fn assert_check_clean(img: &Path) {
    let out = Command::new(require_tool("qemu-img"))
        .args(["check", "--output=json", s(img)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {report}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert!(
            v.get(key).is_none_or(|n| n == 0),
            "{key} in {}: {report}",
            img.display()
        );
    }
}
