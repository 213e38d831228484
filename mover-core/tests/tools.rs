//! The interop suites never pass without their peers: a test that needs `qemu-img`,
//! `qemu-nbd`, `nbdkit` or `nbdinfo` and does not find it fails, naming the tool, instead of
//! returning early as a pass.

mod common;

use std::process::Command;

/// Every peer the interop suites start is on the `PATH`. The first line is how the QCOW2
/// suites guard their tests; it used to return early, as a pass, without `qemu-img`.
#[test]
fn interop_tools_are_on_the_path() {
    if !common::have_qemu() {
        return;
    }
    for tool in ["qemu-img", "qemu-nbd", "nbdkit", "nbdinfo"] {
        assert!(common::require_tool(tool).is_file(), "{tool}");
    }
}

/// The test above, run again by this test binary with an empty `PATH`, fails and says which
/// tool is missing.
#[test]
fn a_missing_tool_fails_the_test_that_needs_it() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "interop_tools_are_on_the_path",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("PATH", "")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "passed without its tools:\n{text}");
    assert!(
        text.contains("qemu-img is not on the PATH"),
        "the failure names the tool:\n{text}"
    );
    assert!(
        text.contains("1 failed"),
        "one test ran and failed:\n{text}"
    );
}
