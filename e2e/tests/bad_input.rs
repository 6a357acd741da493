//! Bad input from the command line gets a one-line error, never a panic.

use std::process::Output;

use shoal_e2e::{TestCluster, shoal, spread};

/// The last line of stderr (logs may precede it), checked to be a clean
/// one-line error.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("shoal: "), "{stderr}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_and_data_dirs_get_one_line_errors() -> anyhow::Result<()> {
    let cluster = TestCluster::start(&spread(1, 1), 1).await?;
    let dir = cluster.peers[0].dir.to_str().unwrap().to_string();

    let line = error_line(&shoal(&["block", "get", "not-an-address", "--dir", &dir]));
    assert!(line.contains("malformed address"), "{line}");
    let line = error_line(&shoal(&["block", "get", &"ab".repeat(31), "--dir", &dir]));
    assert!(line.contains("expected 64 hex digits, got 62"), "{line}");

    let unknown = blake3::hash(b"never stored").to_hex().to_string();
    let line = error_line(&shoal(&["block", "get", &unknown, "--dir", &dir]));
    assert!(line.contains("not found"), "{line}");

    let line = error_line(&shoal(&[
        "node",
        "run",
        "--dir",
        &dir,
        "--listen",
        "127.0.0.1:0",
        "--replicas",
        "1",
    ]));
    assert!(line.contains("in use by another shoal peer"), "{line}");

    let line = error_line(&shoal(&["status", "--dir", "/nonexistent/shoal"]));
    assert!(line.contains("no shoal peer is running"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_join_address_is_reported() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let root = scratch.path().to_str().unwrap();
    assert!(shoal(&["cluster", "init", "--dir", root]).status.success());
    let node = scratch.path().join("node");
    // Port 9 (discard) on loopback: nothing of ours listens there.
    let line = error_line(&shoal(&[
        "node",
        "run",
        "--dir",
        node.to_str().unwrap(),
        "--ca",
        root,
        "--listen",
        "127.0.0.1:0",
        "--join",
        "127.0.0.1:9",
    ]));
    assert!(line.contains("cannot join the cluster"), "{line}");
    assert!(line.contains("127.0.0.1:9"), "{line}");
    Ok(())
}
