//! Volumes across mounts and failures: managing volumes, two mounts of one
//! volume on two peers writing at once, a lone mount's write-back metadata
//! handed over to a second mount, fsync'd data surviving SIGKILL of the
//! mounting peer and of R−1 others, and the space of removed and
//! overwritten files coming back.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use shoal_core::Address;
use shoal_core::mutable::WriterKey;
use shoal_e2e::{TestCluster, shoal, spread};
use shoal_node::identity::NodeIdentity;
use shoal_node::transport::{Timeouts, Transport};
use shoal_proto::peer::{PeerRequest, ReleaseBlocks, peer_request, peer_response};

fn cli(cluster: &TestCluster, args: &[&str]) -> String {
    let dir = cluster.peers[0].dir.to_str().unwrap();
    let out = shoal(&[args, &["--dir", dir]].concat());
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_created_listed_resized_and_deleted() {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    cli(&cluster, &["volume", "create", "alpha", "--size", "1GiB"]);
    cli(&cluster, &["volume", "create", "beta", "--size", "2GiB"]);
    let mount = cluster.mount(1, "alpha", "mnt").unwrap();
    fs::write(mount.dir.join("one"), vec![1u8; 100_000]).unwrap();
    fs::write(mount.dir.join("two"), b"2").unwrap();
    // Usage reaches the volume's counter within a couple of seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = cli(&cluster, &["volume", "list"]);
        let line = list
            .lines()
            .find(|l| l.contains("alpha"))
            .unwrap()
            .to_string();
        if line.contains("97.7 KiB") && line.split_whitespace().any(|w| w == "2") {
            assert!(line.contains("1.0 GiB"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "usage never showed: {list}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(cli(&cluster, &["volume", "list"]).contains("beta"));

    // Growing is seen by statfs on the mount.
    cli(&cluster, &["volume", "resize", "alpha", "3GiB"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while nix::sys::statvfs::statvfs(&mount.dir).unwrap().blocks() * 4096 != 3 << 30 {
        assert!(Instant::now() < deadline, "resize not seen by statfs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Shrinking below what is used is refused.
    let dir = cluster.peers[0].dir.to_str().unwrap();
    let out = shoal(&["volume", "resize", "alpha", "10KiB", "--dir", dir]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot shrink"));

    // A volume its peer has mounted cannot be deleted; once unmounted it
    // can, and the name then starts a new, empty volume.
    let mounter = cluster.peers[1].dir.to_str().unwrap();
    let out = shoal(&["volume", "delete", "alpha", "--dir", mounter]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is mounted"));
    fs::write(mount.dir.join("three"), vec![3u8; 3 << 20]).unwrap();
    mount.unmount().unwrap();
    let before = stored_blocks(&cluster).await;
    // Deleting frees the volume's chunks on every peer: 4 chunks (one for
    // "one", three for "three") on 3 replicas each.
    let out = cli(&cluster, &["volume", "delete", "alpha"]);
    assert!(out.contains("in 12 blocks"), "{out}");
    assert_eq!(before - stored_blocks(&cluster).await, 12);
    assert!(!cli(&cluster, &["volume", "list"]).contains("alpha"));
    let out = shoal(&["volume", "delete", "alpha", "--dir", dir]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    cli(&cluster, &["volume", "create", "alpha", "--size", "1GiB"]);
    let mount = cluster.mount(2, "alpha", "mnt-again").unwrap();
    assert_eq!(fs::read_dir(&mount.dir).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_mounts_on_two_peers_write_one_directory() {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    cluster.create_volume(0, "shared", "10GiB").unwrap();
    let a = cluster.mount(0, "shared", "mnt-a").unwrap();
    let b = cluster.mount(1, "shared", "mnt-b").unwrap();
    fs::create_dir(a.dir.join("d")).unwrap();
    // Close-to-open: what A made is there for B.
    assert!(b.dir.join("d").is_dir());

    const PER_MOUNT: usize = 1000;
    const THREADS: usize = 4;
    std::thread::scope(|s| {
        for (tag, mount) in [("a", &a), ("b", &b)] {
            for t in 0..THREADS {
                let dir = mount.dir.join("d");
                s.spawn(move || {
                    for i in (t..PER_MOUNT).step_by(THREADS) {
                        fs::write(dir.join(format!("{tag}-{i:04}")), format!("{tag}{i}")).unwrap();
                    }
                });
            }
        }
    });
    let mut want: Vec<String> = (0..PER_MOUNT)
        .flat_map(|i| [format!("a-{i:04}"), format!("b-{i:04}")])
        .collect();
    want.sort();
    for mount in [&a, &b] {
        let mut names: Vec<String> = fs::read_dir(mount.dir.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2 * PER_MOUNT, "on {}", mount.dir.display());
        assert_eq!(names, want);
    }
    assert_eq!(fs::read_to_string(b.dir.join("d/a-0123")).unwrap(), "a123");
    assert_eq!(fs::read_to_string(a.dir.join("d/b-0456")).unwrap(), "b456");

    // Concurrent renames on A and unlinks on B in the same directory lose
    // nothing else.
    std::thread::scope(|s| {
        let (da, db) = (a.dir.join("d"), b.dir.join("d"));
        s.spawn(move || {
            for i in 0..200 {
                fs::rename(da.join(format!("a-{i:04}")), da.join(format!("r-{i:04}"))).unwrap();
            }
        });
        s.spawn(move || {
            for i in 0..200 {
                fs::remove_file(db.join(format!("b-{i:04}"))).unwrap();
            }
        });
    });
    let names: Vec<String> = fs::read_dir(b.dir.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2 * PER_MOUNT - 200);
    assert_eq!(names.iter().filter(|n| n.starts_with("r-")).count(), 200);
    assert_eq!(names.iter().filter(|n| n.starts_with("a-")).count(), 800);

    // Concurrent whole-file writes to one file end in one writer's data.
    let size = 3 * 1024 * 1024 + 17;
    for round in 0..3 {
        std::thread::scope(|s| {
            for (byte, mount) in [(b'A', &a), (b'B', &b)] {
                let path = mount.dir.join("contended");
                s.spawn(move || {
                    let mut f = File::create(path).unwrap();
                    for piece in vec![byte; size].chunks(200_000) {
                        f.write_all(piece).unwrap();
                    }
                    f.sync_all().unwrap();
                });
            }
        });
        // Both mounts agree, after the kernel's attribute cache expires.
        std::thread::sleep(Duration::from_millis(1100));
        let seen_a = fs::read(a.dir.join("contended")).unwrap();
        let seen_b = fs::read(b.dir.join("contended")).unwrap();
        assert_eq!(seen_a.len(), size, "round {round}");
        let first = seen_a[0];
        assert!(
            seen_a.iter().all(|&x| x == first),
            "round {round}: a mix of writers"
        );
        assert_eq!(seen_a, seen_b, "round {round}");
    }
}

/// How many times `line` appears in peer `i`'s log.
fn logged(cluster: &TestCluster, i: usize, line: &str) -> usize {
    cluster.peers[i].log().matches(line).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lone_mount_writes_back_and_hands_the_volume_over() {
    const WRITE_BACK: &str = "metadata is write-back";
    const WRITE_THROUGH: &str = "metadata is write-through";
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    cluster.create_volume(0, "solo", "10GiB").unwrap();
    let a = cluster.mount(0, "solo", "mnt-a").unwrap();
    assert_eq!(
        logged(&cluster, 0, WRITE_BACK),
        1,
        "the only mount holds it"
    );
    // Creates, writes, renames and unlinks, none fsynced: they sit in A's
    // copy of the metadata, at most a second, before they are committed.
    fs::create_dir_all(a.dir.join("tree/deep")).unwrap();
    for i in 0..300 {
        fs::write(a.dir.join(format!("tree/f{i:03}")), format!("file {i}")).unwrap();
    }
    fs::write(a.dir.join("tree/deep/big"), vec![7u8; 3 << 20]).unwrap();
    for i in 0..50 {
        fs::rename(
            a.dir.join(format!("tree/f{i:03}")),
            a.dir.join(format!("tree/deep/r{i:03}")),
        )
        .unwrap();
    }
    for i in 50..100 {
        fs::remove_file(a.dir.join(format!("tree/f{i:03}"))).unwrap();
    }

    // B joins on another peer: A commits everything and turns shared
    // before B sees the volume.
    let b = cluster.mount(1, "solo", "mnt-b").unwrap();
    assert_eq!(logged(&cluster, 0, WRITE_THROUGH), 1);
    assert_eq!(logged(&cluster, 1, WRITE_BACK), 0, "B shares the volume");
    let mut names: Vec<String> = fs::read_dir(b.dir.join("tree"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (100..300).map(|i| format!("f{i:03}")).collect();
    want.push("deep".into());
    want.sort();
    assert_eq!(names, want);
    assert_eq!(
        fs::read_to_string(b.dir.join("tree/f299")).unwrap(),
        "file 299"
    );
    assert_eq!(
        fs::read_to_string(b.dir.join("tree/deep/r007")).unwrap(),
        "file 7"
    );
    assert_eq!(
        fs::read(b.dir.join("tree/deep/big")).unwrap(),
        vec![7u8; 3 << 20]
    );
    assert_eq!(fs::read_dir(b.dir.join("tree/deep")).unwrap().count(), 51);

    // Shared, both see each other's changes, once what A cached of the
    // directory is older than the attribute timeout.
    fs::write(b.dir.join("tree/from-b"), "b wrote this").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        fs::read_to_string(a.dir.join("tree/from-b")).unwrap(),
        "b wrote this"
    );

    // B leaves: A is alone again and takes the volume back, with B's
    // changes in it.
    b.unmount().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while logged(&cluster, 0, WRITE_BACK) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        logged(&cluster, 0, WRITE_BACK),
        2,
        "A holds the volume again"
    );
    fs::write(a.dir.join("tree/after"), "written back").unwrap();
    assert_eq!(
        fs::read_to_string(a.dir.join("tree/from-b")).unwrap(),
        "b wrote this"
    );

    // Unmounting commits what is left; the next mount, elsewhere, has it.
    a.unmount().unwrap();
    let c = cluster.mount(2, "solo", "mnt-c").unwrap();
    assert_eq!(
        fs::read_to_string(c.dir.join("tree/after")).unwrap(),
        "written back"
    );
    assert_eq!(fs::read_dir(c.dir.join("tree")).unwrap().count(), 203);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_holder_keeps_what_it_fsynced_and_lets_others_in_once_its_session_expires() {
    let mut cluster = TestCluster::start(&spread(4, 4), 3).await.unwrap();
    cluster.create_volume(0, "held", "10GiB").unwrap();
    let a = cluster.mount(0, "held", "mnt-a").unwrap();
    {
        let mut f = File::create(a.dir.join("synced")).unwrap();
        f.write_all(b"made durable by fsync").unwrap();
        f.sync_all().unwrap();
    }
    // Killed while holding the volume, without a chance to commit more.
    cluster.kill(0);
    drop(a.abandon());
    let started = Instant::now();
    let b = cluster.mount(1, "held", "mnt-b").unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "the dead holder's session must expire, not block: {waited:?}"
    );
    assert_eq!(
        fs::read_to_string(b.dir.join("synced")).unwrap(),
        "made durable by fsync"
    );
    fs::write(b.dir.join("after"), "the volume is usable").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn fsynced_data_survives_sigkill_of_the_mount_and_two_more_peers() {
    let mut cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    cluster.create_volume(0, "durable", "10GiB").unwrap();
    let mount = cluster.mount(0, "durable", "mnt").unwrap();
    let big: Vec<u8> = (0..6_500_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    {
        let mut f = File::create(mount.dir.join("big")).unwrap();
        f.write_all(&big).unwrap();
        f.sync_all().unwrap();
        fs::create_dir(mount.dir.join("sub")).unwrap();
        let mut g = File::create(mount.dir.join("sub/small")).unwrap();
        g.write_all(b"small and synced").unwrap();
        g.sync_all().unwrap();
        // Kill while these files are still open.
        for i in 0..3 {
            cluster.kill(i);
        }
        drop((f, g));
    }
    let dir = mount.abandon();
    assert!(
        shoal_e2e::is_mounted(&dir),
        "the dead peer's mount stays behind"
    );
    for i in 0..3 {
        cluster.restart(i).await.unwrap();
    }
    cluster
        .wait_until_joined(Duration::from_secs(60))
        .await
        .unwrap();
    // The same directory, whose mount died with its peer, mounts again.
    let mount = cluster.mount_at(0, "durable", &dir).unwrap();
    assert_eq!(fs::read(mount.dir.join("big")).unwrap(), big);
    assert_eq!(
        fs::read(mount.dir.join("sub/small")).unwrap(),
        b"small and synced"
    );
    let other = cluster.mount(2, "durable", "mnt-other").unwrap();
    assert_eq!(fs::read(other.dir.join("big")).unwrap(), big);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_keeps_its_own_number_of_replicas() {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    let dir = cluster.peers[0].dir.to_str().unwrap();
    let out = shoal(&["volume", "create", "wide", "--replicas", "4", "--dir", dir]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("need 4 peers"));
    let out = cli(&cluster, &["volume", "create", "pair", "--replicas", "2"]);
    assert!(out.contains("2 replicas"), "{out}");
    let before = stored_blocks(&cluster).await;
    let mount = cluster.mount(0, "pair", "mnt").unwrap();
    let data: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i % 241) as u8).collect();
    fs::write(mount.dir.join("two-chunks"), &data).unwrap();
    mount.unmount().unwrap();
    // Two chunks, each on two peers (all copies written by now: the write
    // waits for a majority of 2, which is both).
    assert_eq!(stored_blocks(&cluster).await - before, 4);
    let other = cluster.mount(2, "pair", "mnt-other").unwrap();
    assert_eq!(fs::read(other.dir.join("two-chunks")).unwrap(), data);
    assert!(
        cli(&cluster, &["volume", "list"])
            .lines()
            .any(|l| l.contains("pair") && l.split_whitespace().any(|w| w == "2"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_and_overwritten_data_frees_its_chunks_unless_a_snapshot_names_them() {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.unwrap();
    // Two replicas: a write waits for both, so every copy is counted.
    cli(&cluster, &["volume", "create", "reuse", "--replicas", "2"]);
    let empty = stored_blocks(&cluster).await;
    let mount = cluster.mount(0, "reuse", "mnt").unwrap();
    let m = &mount.dir;
    let mib = 1 << 20;
    let data: Vec<u8> = (0..4 * mib as u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.join("removed"), &data).unwrap();
    fs::write(m.join("kept"), &data[..2 * mib]).unwrap();
    fs::write(m.join("cut"), &data[..3 * mib]).unwrap();
    fs::write(m.join("replaced"), &data[..mib]).unwrap();
    fs::write(m.join("over"), &data[..2 * mib]).unwrap();
    // One chunk of "kept" rewritten in place, "cut" truncated to one chunk,
    // "over" renamed over "replaced", "removed" unlinked, and "open"
    // unlinked while a handle still reads it.
    OpenOptions::new()
        .write(true)
        .open(m.join("kept"))
        .unwrap()
        .write_all_at(b"new", 5)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(m.join("cut"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    fs::rename(m.join("over"), m.join("replaced")).unwrap();
    fs::remove_file(m.join("removed")).unwrap();
    fs::write(m.join("open"), &data[..2 * mib]).unwrap();
    let mut reader = File::open(m.join("open")).unwrap();
    fs::remove_file(m.join("open")).unwrap();
    let mut back = Vec::new();
    reader.read_to_end(&mut back).unwrap();
    assert_eq!(back, data[..2 * mib]);
    drop(reader);

    // A peer with a real certificate cannot release what it does not own:
    // a forged signature is refused, and a stranger's own signed request
    // frees nothing.
    let scratch = tempfile::tempdir().unwrap();
    let rogue = NodeIdentity::load_or_issue(scratch.path(), cluster.root()).unwrap();
    let transport = Transport::client(&rogue, Timeouts::default()).unwrap();
    let held: Vec<Address> = cluster
        .local_blocks(1)
        .await
        .unwrap()
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert!(!held.is_empty());
    let stranger = WriterKey::from_secret([9; 32]);
    let issued_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let release = |owner: [u8; 32], signature: Vec<u8>| PeerRequest {
        kind: Some(peer_request::Kind::ReleaseBlocks(ReleaseBlocks {
            owner: owner.to_vec(),
            issued_ms,
            addresses: held.iter().map(|a| a.0.to_vec()).collect(),
            signature,
        })),
    };
    let genuine = stranger.sign_release(issued_ms, &held).0.to_vec();
    let forged = release([7; 32], genuine.clone());
    let peer = cluster.peers[1].addr.parse().unwrap();
    match transport.request(peer, &forged).await.unwrap().kind {
        Some(peer_response::Kind::Error(e)) => {
            assert!(e.message.contains("delete refused"), "{}", e.message)
        }
        other => panic!("forged release not refused: {other:?}"),
    }
    let own = release(stranger.public().0, genuine);
    match transport.request(peer, &own).await.unwrap().kind {
        Some(peer_response::Kind::ReleaseBlocks(r)) => assert_eq!((r.blocks, r.bytes), (0, 0)),
        other => panic!("unexpected answer: {other:?}"),
    }
    assert_eq!(cluster.local_blocks(1).await.unwrap().len(), held.len());

    mount.unmount().unwrap();
    // Named now: kept 2 chunks, cut 1, replaced (was over) 2; 2 copies each.
    assert_eq!(stored_blocks(&cluster).await - empty, 10);
    let mount = cluster.mount(1, "reuse", "mnt-again").unwrap();
    let mut kept = data[..2 * mib].to_vec();
    kept[5..8].copy_from_slice(b"new");
    assert_eq!(fs::read(mount.dir.join("kept")).unwrap(), kept);
    assert_eq!(fs::read(mount.dir.join("cut")).unwrap(), data[..1000]);
    assert_eq!(
        fs::read(mount.dir.join("replaced")).unwrap(),
        data[..2 * mib]
    );
    assert!(!mount.dir.join("removed").exists());

    // A snapshot names the volume's chunks: removing the file frees none of
    // them, and the snapshot still reads it whole.
    cli(
        &cluster,
        &["snapshot", "create", "before", "--volume", "reuse"],
    );
    fs::remove_file(mount.dir.join("kept")).unwrap();
    let holding = stored_blocks(&cluster).await;
    mount.unmount().unwrap();
    assert_eq!(stored_blocks(&cluster).await, holding);
    cli(
        &cluster,
        &["volume", "create", "back", "--from-snapshot", "before"],
    );
    let restored = cluster.mount(2, "back", "mnt-back").unwrap();
    assert_eq!(fs::read(restored.dir.join("kept")).unwrap(), kept);
}

/// Immutable blocks held by all peers together.
async fn stored_blocks(cluster: &TestCluster) -> usize {
    let mut n = 0;
    for i in 0..cluster.peers.len() {
        n += cluster.local_blocks(i).await.unwrap().len();
    }
    n
}
