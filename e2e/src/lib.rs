//! Harness for end-to-end tests and benchmarks: real `shoal` peer processes
//! on 127.0.0.1, each with its own data dir, QUIC endpoint and RocksDB,
//! driven through their admin sockets. Every process a harness starts, it
//! stops (SIGKILL on drop).

pub mod csi;
pub mod linearizability;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_core::Address;
use shoal_core::mutable::MutableBlock;
use shoal_node::wire;
use shoal_proto::admin::admin_client::AdminClient;
use shoal_proto::admin::{
    GetMutableRequest, ListLocalBlocksRequest, NodeState, PutMutableRequest, StatusRequest,
    put_mutable_reply,
};
use tonic::transport::Channel;

/// The `shoal` binary under test: `$SHOAL_BIN`, else the one cargo built
/// next to this test or benchmark.
pub fn shoal_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("shoal")
}

/// Runs `shoal ARGS` to completion.
pub fn shoal(args: &[&str]) -> Output {
    Command::new(shoal_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shoal")
}

/// Where and how one peer runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub zone: String,
    pub rack: String,
    pub capacity: String,
}

impl NodeSpec {
    pub fn new(zone: &str, rack: &str) -> Self {
        Self {
            zone: zone.into(),
            rack: rack.into(),
            capacity: "4GiB".into(),
        }
    }

    pub fn capacity(mut self, capacity: &str) -> Self {
        self.capacity = capacity.into();
        self
    }
}

/// `n` peers spread round-robin over `zones` zones, one rack each.
pub fn spread(n: usize, zones: usize) -> Vec<NodeSpec> {
    (0..n)
        .map(|i| NodeSpec::new(&format!("zone-{}", i % zones), &format!("rack-{i}")))
        .collect()
}

#[derive(Debug)]
pub struct PeerProcess {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    pub addr: String,
    child: Option<Child>,
}

impl PeerProcess {
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("peer.log")).unwrap_or_default()
    }

    pub async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        shoal_node::admin::connect(&self.dir).await
    }
}

/// A cluster of real peer processes in a temporary directory.
#[derive(Debug)]
pub struct TestCluster {
    root: tempfile::TempDir,
    pub peers: Vec<PeerProcess>,
    replicas: usize,
    /// More `shoal node run` flags for every peer.
    extra_args: Vec<String>,
}

impl TestCluster {
    /// Starts one peer per spec (all joining the first) with the given
    /// replication, and waits until every peer sees all of them alive.
    pub async fn start(specs: &[NodeSpec], replicas: usize) -> anyhow::Result<Self> {
        Self::start_with(specs, replicas, &[]).await
    }

    /// [`Self::start`] with more `shoal node run` flags for every peer
    /// (`{dir}` in one stands for the peer's data dir).
    pub async fn start_with(
        specs: &[NodeSpec],
        replicas: usize,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let root = tempfile::Builder::new().prefix("shoal-e2e-").tempdir()?;
        let out = shoal(&[
            "cluster",
            "init",
            "--dir",
            root.path().to_str().expect("utf-8 path"),
        ]);
        if !out.status.success() {
            bail!("cluster init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut cluster = Self {
            root,
            peers: Vec::new(),
            replicas,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        for spec in specs {
            let join = cluster.peers.first().map(|p| p.addr.clone());
            cluster.spawn(spec.clone(), join.as_deref()).await?;
        }
        cluster.wait_until_joined(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Starts one more peer, joining `join` if given; returns its index.
    pub async fn spawn(&mut self, spec: NodeSpec, join: Option<&str>) -> anyhow::Result<usize> {
        let index = self.peers.len();
        let dir = self.root.path().join(format!("node-{}", index + 1));
        let peer = self.launch(spec, dir, join).await?;
        self.peers.push(peer);
        Ok(index)
    }

    async fn launch(
        &self,
        spec: NodeSpec,
        dir: PathBuf,
        join: Option<&str>,
    ) -> anyhow::Result<PeerProcess> {
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("peer.log"))?;
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["node", "run", "--listen", "127.0.0.1:0"])
            .arg("--dir")
            .arg(&dir)
            .arg("--ca")
            .arg(self.root.path())
            .args(["--zone", &spec.zone, "--rack", &spec.rack])
            .args(["--capacity", &spec.capacity])
            .args(["--replicas", &self.replicas.to_string()])
            .args(
                self.extra_args
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.to_string_lossy())),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(join) = join {
            cmd.args(["--join", join]);
        }
        let child = cmd.spawn().context("start shoal node run")?;
        let mut peer = PeerProcess {
            spec,
            dir,
            addr: String::new(),
            child: Some(child),
        };
        peer.addr = own_address(&mut peer, Duration::from_secs(30)).await?;
        Ok(peer)
    }

    /// Waits until every running peer sees every running peer alive.
    pub async fn wait_until_joined(&mut self, limit: Duration) -> anyhow::Result<()> {
        let mut want = 0;
        for peer in self.peers.iter_mut() {
            want += usize::from(peer.is_running());
        }
        self.wait_for_alive(want, limit).await
    }

    /// Waits until every running peer counts exactly `alive` alive members.
    pub async fn wait_for_alive(&mut self, alive: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let mut ok = true;
            for peer in self.peers.iter_mut() {
                if !peer.is_running() {
                    continue;
                }
                let seen = match peer.admin().await {
                    Ok(mut c) => match c.status(StatusRequest {}).await {
                        Ok(s) => s
                            .into_inner()
                            .members
                            .iter()
                            .filter(|m| m.state() == NodeState::Alive)
                            .count(),
                        Err(_) => 0,
                    },
                    Err(_) => 0,
                };
                ok &= seen == alive;
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("peers did not all see {alive} alive members within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts peer `i` again on its data dir (after [`Self::kill`]), joining
    /// another running peer, and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.peers[i].child.is_none(), "peer {i} is running");
        let mut join = None;
        for (j, p) in self.peers.iter_mut().enumerate() {
            if j != i && p.is_running() {
                join = Some(p.addr.clone());
                break;
            }
        }
        let spec = self.peers[i].spec.clone();
        let dir = self.peers[i].dir.clone();
        let mut peer = self.launch(spec, dir, join.as_deref()).await?;
        std::mem::swap(&mut self.peers[i], &mut peer);
        Ok(())
    }

    /// Stops peer `i` with SIGTERM and waits (at most `limit`) until it
    /// has exited; SIGKILL after that.
    pub async fn stop(&mut self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.peers[i].child.take() else {
            return Ok(());
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + limit;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("peer {i} did not stop within {limit:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Kills peer `i` with SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.peers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every block address held in peer `i`'s own store.
    pub async fn local_blocks(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let mut client = self.peers[i].admin().await?;
        let mut all = Vec::new();
        let mut start_after = String::new();
        // Bounded: a page is at most 10,000 addresses.
        for _ in 0..10_000 {
            let page = client
                .list_local_blocks(ListLocalBlocksRequest {
                    start_after: start_after.clone(),
                    limit: 0,
                })
                .await?
                .into_inner();
            all.extend(page.addresses);
            if page.next_start_after.is_empty() {
                return Ok(all);
            }
            start_after = page.next_start_after;
        }
        bail!("too many pages")
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Mounts inside the cluster's dir go first: a FUSE mount whose peer
        // died would otherwise stay behind.
        for target in mounts_under(self.root.path()) {
            detach(&target);
        }
        for i in 0..self.peers.len() {
            self.kill(i);
        }
    }
}

/// FUSE mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

pub fn is_mounted(dir: &Path) -> bool {
    mounts_under(dir).iter().any(|p| p == dir)
}

/// Lazily unmounts `target` (works on a mount whose server died).
pub fn detach(target: &Path) {
    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
}

/// A volume mounted by a `shoal mount` process through one peer; dropping
/// it stops that process (which unmounts) and detaches what is left.
#[derive(Debug)]
pub struct Mount {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Kills `shoal mount` and leaves the mount as it is (for a mount whose
    /// peer died: it stays behind, stale).
    pub fn abandon(mut self) -> PathBuf {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::mem::take(&mut self.dir)
    }

    /// Stops `shoal mount` with SIGTERM and checks it unmounted cleanly.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let signalled = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = wait_child(&mut child, Duration::from_secs(30))?;
        signalled?;
        anyhow::ensure!(status.success(), "shoal mount exited with {status}");
        anyhow::ensure!(
            !is_mounted(&self.dir),
            "{} still mounted",
            self.dir.display()
        );
        Ok(())
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = wait_child(&mut child, Duration::from_secs(30));
        }
        if !self.dir.as_os_str().is_empty() && is_mounted(&self.dir) {
            detach(&self.dir);
        }
    }
}

impl TestCluster {
    /// `shoal volume create NAME --size SIZE` through peer `peer`.
    pub fn create_volume(&self, peer: usize, name: &str, size: &str) -> anyhow::Result<()> {
        let dir = self.peers[peer].dir.to_str().expect("utf-8 path");
        let out = shoal(&["volume", "create", name, "--size", size, "--dir", dir]);
        anyhow::ensure!(
            out.status.success(),
            "volume create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Mounts `volume` through peer `peer` at a new directory `name` in the
    /// cluster's dir, with `shoal mount`, and waits for the mount.
    pub fn mount(&self, peer: usize, volume: &str, name: &str) -> anyhow::Result<Mount> {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        self.mount_at(peer, volume, &dir)
    }

    /// Mounts `volume` through peer `peer` at an existing directory.
    pub fn mount_at(&self, peer: usize, volume: &str, dir: &Path) -> anyhow::Result<Mount> {
        let log_path = self.root.path().join(format!(
            "mount-{}.log",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("mnt")
        ));
        let log = std::fs::File::create(&log_path)?;
        let why = || {
            let mount_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let peer_log = self.peers[peer].log();
            let tail: Vec<&str> = peer_log.lines().rev().take(5).collect();
            format!("shoal mount said: {mount_log}; peer log ends: {tail:?}")
        };
        let child = Command::new(shoal_bin())
            .arg("mount")
            .arg(volume)
            .arg(dir)
            .arg("--dir")
            .arg(&self.peers[peer].dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start shoal mount")?;
        let mut mount = Mount {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        // `shoal mount` says when the volume is mounted (a stale mount at
        // `dir` stays listed until then).
        let said_mounted =
            || std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(" mounted at "));
        while !(said_mounted() && is_mounted(dir)) {
            let child = mount.child.as_mut().expect("running");
            if let Some(status) = child.try_wait()? {
                mount.child = None;
                bail!(
                    "shoal mount exited with {status} before mounting; {}",
                    why()
                );
            }
            if Instant::now() > deadline {
                bail!("{} not mounted within 30 s; {}", dir.display(), why());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(mount)
    }
}

/// Waits for the peer's admin socket and reads its QUIC address from status.
async fn own_address(peer: &mut PeerProcess, limit: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if !peer.is_running() {
            bail!("peer exited during start: {}", peer.log());
        }
        if let Ok(mut client) = peer.admin().await
            && let Ok(status) = client.status(StatusRequest {}).await
        {
            let status = status.into_inner();
            if let Some(me) = status.members.iter().find(|m| m.node_id == status.node_id) {
                return Ok(me.address.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("peer did not start within {limit:?}: {}", peer.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How a put of a signed mutable version ended.
#[derive(Debug)]
pub enum Put {
    /// The version is now current.
    Written(Box<MutableBlock>),
    /// The version it expected to follow was not current: this one is.
    Conflict(Box<MutableBlock>),
}

fn malformed(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(format!("malformed answer: {e}"))
}

/// Proposes a signed version of a mutable block through a peer.
pub async fn put_mutable(
    client: &mut AdminClient<Channel>,
    block: &MutableBlock,
) -> Result<Put, tonic::Status> {
    let reply = client
        .put_mutable(PutMutableRequest {
            block: Some(wire::block_to_wire(block)),
        })
        .await?
        .into_inner();
    let decode = |b| wire::block_from_wire(b).map(Box::new).map_err(malformed);
    match reply.outcome.ok_or_else(|| malformed("no outcome"))? {
        put_mutable_reply::Outcome::Written(b) => decode(b).map(Put::Written),
        put_mutable_reply::Outcome::Conflict(b) => decode(b).map(Put::Conflict),
    }
}

/// Reads the current version of the mutable block at `address` through a
/// peer.
pub async fn get_mutable(
    client: &mut AdminClient<Channel>,
    address: &Address,
) -> Result<MutableBlock, tonic::Status> {
    let reply = client
        .get_mutable(GetMutableRequest {
            address: address.to_string(),
        })
        .await?
        .into_inner();
    wire::block_from_wire(reply.block.ok_or_else(|| malformed("no block"))?).map_err(malformed)
}

/// The 8-byte counter that tests and benchmarks keep in mutable blocks.
pub fn counter(block: &MutableBlock) -> u64 {
    u64::from_le_bytes(block.payload.as_slice().try_into().expect("8-byte counter"))
}

/// What a benchmark phase measured: operations, their rate, and latency
/// percentiles (microseconds).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub ops: usize,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Summary {
    /// Summarises per-operation latencies taken over `seconds`.
    pub fn of(mut micros: Vec<u64>, seconds: f64) -> Self {
        micros.sort_unstable();
        let percentile = |p: f64| {
            let rank = ((p / 100.0) * micros.len().saturating_sub(1) as f64).round() as usize;
            micros.get(rank).copied().unwrap_or(0)
        };
        Self {
            ops: micros.len(),
            ops_per_s: micros.len() as f64 / seconds,
            p50_us: percentile(50.0),
            p99_us: percentile(99.0),
        }
    }
}
