//! POSIX behaviour of a real FUSE mount of a volume on a 3-peer, R=3
//! cluster: files, directories, links, attributes, sparse files, a large
//! directory, git, and a real source tarball.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use shoal_e2e::{Mount, TestCluster, spread};

async fn cluster_with_volume(name: &str, size: &str) -> (TestCluster, Mount) {
    let cluster = TestCluster::start(&spread(3, 3), 3).await.expect("cluster");
    cluster.create_volume(0, name, size).expect("volume");
    let mount = cluster.mount(0, name, "mnt").expect("mount");
    (cluster, mount)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_directories_links_and_attributes() {
    let (_cluster, mount) = cluster_with_volume("posix", "10GiB").await;
    let m = &mount.dir;

    // Create, read, write, append, seek, truncate.
    let f = m.join("file.txt");
    fs::write(&f, b"hello world").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hello world");
    OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b", again")
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hello world, again");
    {
        let mut h = OpenOptions::new().read(true).write(true).open(&f).unwrap();
        h.seek(SeekFrom::Start(6)).unwrap();
        h.write_all(b"WORLD").unwrap();
        h.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        h.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello WORLD, again");
        h.set_len(5).unwrap();
    }
    assert_eq!(fs::read(&f).unwrap(), b"hello");
    assert_eq!(fs::metadata(&f).unwrap().len(), 5);
    // Growing a file by truncate leaves zeros.
    OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(8)
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"hello\0\0\0");

    // The kernel sends a close's release without waiting for it, so an
    // open races the release of the handle closed just before: every open
    // must still get a working handle.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let churn = m.join(format!("churn-{t}"));
            s.spawn(move || {
                fs::write(&churn, b"0123456789").unwrap();
                for i in 0..300u32 {
                    let h = OpenOptions::new().write(true).open(&churn).unwrap();
                    h.write_all_at(&[b'a' + (i % 26) as u8], 0).unwrap();
                    if i % 3 == 0 {
                        h.set_len(10).unwrap();
                    }
                    drop(h);
                    let back = fs::read(&churn).unwrap();
                    assert_eq!(back[0], b'a' + (i % 26) as u8);
                    assert_eq!(back.len(), 10);
                }
            });
        }
    });

    // A file larger than a chunk, written in odd pieces, reads back exact.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        let mut h = File::create(m.join("big")).unwrap();
        for piece in big.chunks(300_001) {
            h.write_all(piece).unwrap();
        }
        h.sync_all().unwrap();
    }
    assert_eq!(fs::read(m.join("big")).unwrap(), big);
    {
        // Overwrite across a chunk boundary.
        let mut h = OpenOptions::new().write(true).open(m.join("big")).unwrap();
        h.seek(SeekFrom::Start(1024 * 1024 - 3)).unwrap();
        h.write_all(b"abcdef").unwrap();
    }
    let back = fs::read(m.join("big")).unwrap();
    assert_eq!(&back[1024 * 1024 - 3..1024 * 1024 + 3], b"abcdef");
    assert_eq!(back.len(), big.len());

    // Rename: over an existing file, a directory into a directory, across
    // directories.
    fs::write(m.join("a"), b"A").unwrap();
    fs::write(m.join("b"), b"B").unwrap();
    fs::rename(m.join("a"), m.join("b")).unwrap();
    assert!(!m.join("a").exists());
    assert_eq!(fs::read(m.join("b")).unwrap(), b"A");
    fs::create_dir_all(m.join("d1/inner")).unwrap();
    fs::write(m.join("d1/inner/x"), b"X").unwrap();
    fs::create_dir(m.join("d2")).unwrap();
    fs::rename(m.join("d1"), m.join("d2/d1")).unwrap();
    assert_eq!(fs::read(m.join("d2/d1/inner/x")).unwrap(), b"X");
    fs::rename(m.join("d2/d1/inner/x"), m.join("moved")).unwrap();
    assert_eq!(fs::read(m.join("moved")).unwrap(), b"X");
    assert!(!m.join("d2/d1/inner/x").exists());
    // A directory cannot replace a non-empty one, nor be removed while full.
    fs::create_dir(m.join("full")).unwrap();
    fs::write(m.join("full/f"), b"").unwrap();
    fs::create_dir(m.join("empty")).unwrap();
    assert_eq!(
        errno(&fs::rename(m.join("empty"), m.join("full")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(&fs::remove_dir(m.join("full")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::rename(m.join("full"), m.join("empty")).unwrap();
    assert!(m.join("empty/f").exists());

    // Unlink while open: the open file stays readable and writable.
    fs::write(m.join("doomed"), b"still here").unwrap();
    let mut h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("doomed"))
        .unwrap();
    fs::remove_file(m.join("doomed")).unwrap();
    assert!(!m.join("doomed").exists());
    let mut s = String::new();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    h.write_all(b"!").unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here!");
    drop(h);

    // Hard links share content and count links.
    fs::write(m.join("orig"), b"shared").unwrap();
    fs::hard_link(m.join("orig"), m.join("link1")).unwrap();
    fs::create_dir(m.join("other")).unwrap();
    fs::hard_link(m.join("orig"), m.join("other/link2")).unwrap();
    assert_eq!(fs::metadata(m.join("orig")).unwrap().nlink(), 3);
    assert_eq!(
        fs::metadata(m.join("orig")).unwrap().ino(),
        fs::metadata(m.join("other/link2")).unwrap().ino()
    );
    fs::write(m.join("link1"), b"changed").unwrap();
    assert_eq!(fs::read(m.join("other/link2")).unwrap(), b"changed");
    fs::remove_file(m.join("orig")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::metadata(m.join("link1")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.join("link1")).unwrap(), b"changed");

    // Symlinks.
    std::os::unix::fs::symlink("other/link2", m.join("sym")).unwrap();
    assert_eq!(
        fs::read_link(m.join("sym")).unwrap(),
        PathBuf::from("other/link2")
    );
    assert_eq!(fs::read(m.join("sym")).unwrap(), b"changed");
    assert!(
        fs::symlink_metadata(m.join("sym"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::os::unix::fs::symlink("nowhere", m.join("dangling")).unwrap();
    assert_eq!(
        errno(&fs::read(m.join("dangling")).unwrap_err()),
        libc::ENOENT
    );

    // chmod, chown, utimens.
    let p = m.join("link1");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(when).set_accessed(when))
        .unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(md.mtime(), 1_000_000_000);
    assert_eq!(md.atime(), 1_000_000_000);

    // A write or truncate by an unprivileged user drops setuid, setgid
    // (when the group may execute) and file capabilities; root's keeps them.
    let suid = m.join("suid");
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    let as_nobody = |script: String| {
        let status = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["sh", "-c", &script])
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    };
    fs::write(&suid, b"x").unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o6777)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(&suid)
        .unwrap()
        .write_all(b"y")
        .unwrap();
    assert_eq!(mode(&suid), 0o6777);
    as_nobody(format!("echo a >> {}", suid.display()));
    assert_eq!(mode(&suid), 0o777);
    // A file capability (version 2, CAP_NET_RAW permitted).
    let capability = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    xattr::set(&suid, "security.capability", &capability).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o6767)).unwrap();
    as_nobody(format!("echo b >> {}", suid.display()));
    assert_eq!(mode(&suid), 0o2767);
    assert_eq!(xattr::get(&suid, "security.capability").unwrap(), None);
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4777)).unwrap();
    as_nobody(format!("truncate -s 2 {}", suid.display()));
    assert_eq!(mode(&suid), 0o777);
    assert_eq!(fs::read(&suid).unwrap(), b"xy");

    // Extended attributes.
    xattr::set(&p, "user.colour", b"blue").unwrap();
    xattr::set(&p, "user.size", b"9").unwrap();
    assert_eq!(
        xattr::get(&p, "user.colour").unwrap(),
        Some(b"blue".to_vec())
    );
    let mut names: Vec<_> = xattr::list(&p).unwrap().collect();
    names.sort();
    assert_eq!(names, ["user.colour", "user.size"]);
    xattr::remove(&p, "user.colour").unwrap();
    assert_eq!(xattr::get(&p, "user.colour").unwrap(), None);
    // The content survived all of that.
    assert_eq!(fs::read(&p).unwrap(), b"changed");

    // Sparse writes beyond 2 GiB: holes read as zeros, size is exact.
    let sparse = m.join("sparse");
    {
        let mut h = File::create(&sparse).unwrap();
        h.seek(SeekFrom::Start(3 << 30)).unwrap();
        h.write_all(b"far away").unwrap();
        h.seek(SeekFrom::Start(5)).unwrap();
        h.write_all(b"near").unwrap();
    }
    let md = fs::metadata(&sparse).unwrap();
    assert_eq!(md.len(), (3 << 30) + 8);
    assert!(md.blocks() * 512 < 8 << 20, "holes take no space");
    let mut h = File::open(&sparse).unwrap();
    let mut buf = vec![0u8; 16];
    h.seek(SeekFrom::Start((3 << 30) - 8)).unwrap();
    h.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"\0\0\0\0\0\0\0\0far away");
    h.seek(SeekFrom::Start(2 << 30)).unwrap();
    h.read_exact(&mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 16]);
    h.seek(SeekFrom::Start(0)).unwrap();
    h.read_exact(&mut buf[..9]).unwrap();
    assert_eq!(&buf[..9], b"\0\0\0\0\0near");

    // statfs reports the volume's size.
    let st = nix::sys::statvfs::statvfs(m).unwrap();
    assert_eq!(st.blocks() * st.fragment_size(), 10 << 30);
    assert_eq!(st.name_max(), 255);

    mount.unmount().expect("clean unmount");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_entry_directory() {
    let (_cluster, mount) = cluster_with_volume("bigdir", "10GiB").await;
    let dir = mount.dir.join("many");
    fs::create_dir(&dir).unwrap();
    const N: usize = 10_000;
    const THREADS: usize = 16;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dir = &dir;
            s.spawn(move || {
                for i in (t..N).step_by(THREADS) {
                    fs::write(dir.join(format!("entry-{i:05}")), i.to_string()).unwrap();
                }
            });
        }
    });
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..N).map(|i| format!("entry-{i:05}")).collect();
    assert_eq!(names, want);
    for i in (0..N).step_by(97) {
        let p = dir.join(format!("entry-{i:05}"));
        assert_eq!(fs::metadata(&p).unwrap().len(), i.to_string().len() as u64);
        assert_eq!(fs::read_to_string(&p).unwrap(), i.to_string());
    }
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let dir = &dir;
            s.spawn(move || {
                for i in (t..N).step_by(THREADS) {
                    fs::remove_file(dir.join(format!("entry-{i:05}"))).unwrap();
                }
            });
        }
    });
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    fs::remove_dir(&dir).unwrap();
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every regular file under `root`: path → (blake3, mode, size).
fn tree(root: &Path) -> BTreeMap<PathBuf, (String, u32, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let hash = blake3::hash(&fs::read(e.path()).unwrap())
                    .to_hex()
                    .to_string();
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, (hash, md.mode() & 0o777, md.len()));
            }
        }
    }
    out
}

/// A real source tarball every machine that built Shoal has: tokio's crate
/// from cargo's registry cache.
fn source_tarball() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let cache = home.join("registry/cache");
    for index in fs::read_dir(&cache).unwrap() {
        for f in fs::read_dir(index.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("tokio-1.") && name.ends_with(".crate") {
                return p;
            }
        }
    }
    panic!("no tokio crate in {}", cache.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn git_and_a_source_tarball() {
    let (cluster, mount) = cluster_with_volume("work", "10GiB").await;
    let m = &mount.dir;

    let repo = m.join("repo");
    fs::create_dir(&repo).unwrap();
    run(&repo, "git", &["init", "-q", "-b", "main"]);
    fs::write(repo.join("README"), "Shoal test\n").unwrap();
    fs::create_dir(repo.join("src")).unwrap();
    fs::write(repo.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    run(&repo, "git", &["add", "."]);
    let id = [
        "-c",
        "user.name=Shoal",
        "-c",
        "user.email=shoal@example.invalid",
    ];
    run(
        &repo,
        "git",
        &[&id[..], &["commit", "-q", "-m", "first"]].concat(),
    );
    fs::write(repo.join("README"), "Shoal test, again\n").unwrap();
    run(
        &repo,
        "git",
        &[&id[..], &["commit", "-q", "-am", "second"]].concat(),
    );
    let log = run(&repo, "git", &["log", "--format=%s"]);
    assert_eq!(log, "second\nfirst\n");
    run(&repo, "git", &["fsck", "--strict"]);
    assert_eq!(run(&repo, "git", &["status", "--porcelain"]), "");

    let tarball = source_tarball();
    let local = cluster.root().join("local-tree");
    fs::create_dir(&local).unwrap();
    let tb = tarball.to_str().unwrap();
    run(&local, "tar", &["xzf", tb]);
    let unpacked = m.join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    run(&unpacked, "tar", &["xzf", tb]);
    let want = tree(&local);
    assert!(want.len() > 300, "tarball has {} files", want.len());
    // Read back cold, through a fresh mount on another peer.
    mount.unmount().unwrap();
    let again = cluster.mount(1, "work", "mnt2").unwrap();
    assert_eq!(tree(&again.dir.join("unpacked")), want);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors() {
    let (cluster, mount) = cluster_with_volume("small", "8MiB").await;
    let m = &mount.dir;
    let peer = cluster.peers[0].dir.to_str().unwrap().to_string();

    // Mounting on a missing directory, or an unknown volume.
    let missing = cluster.root().join("no-such-dir");
    let out = shoal_e2e::shoal(&["mount", "small", missing.to_str().unwrap(), "--dir", &peer]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    let dir = cluster.root().join("spare");
    fs::create_dir(&dir).unwrap();
    let out = shoal_e2e::shoal(&["mount", "nope", dir.to_str().unwrap(), "--dir", &peer]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("volume nope not found"), "{err}");
    let out = shoal_e2e::shoal(&["volume", "create", "Bad/Name", "--dir", &peer]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("may hold only"));
    let out = shoal_e2e::shoal(&["volume", "create", "small", "--dir", &peer]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // A name over 255 bytes.
    let long = "n".repeat(256);
    assert_eq!(
        errno(&fs::write(m.join(&long), b"x").unwrap_err()),
        libc::ENAMETOOLONG
    );
    fs::write(m.join("n".repeat(255)), b"ok").unwrap();

    // Writing past the volume's size: ENOSPC, and what was there survives.
    let keep: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(m.join("keep"), &keep).unwrap();
    // Let the usage reach the volume's counter.
    std::thread::sleep(Duration::from_millis(2500));
    let mut h = File::create(m.join("overflow")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut failed = None;
    for _ in 0..16 {
        if let Err(e) = h.write_all(&chunk) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("writes beyond 8 MiB must fail");
    assert_eq!(errno(&e), libc::ENOSPC, "{e}");
    drop(h);
    assert_eq!(fs::read(m.join("keep")).unwrap(), keep);
    fs::remove_file(m.join("overflow")).unwrap();
}
