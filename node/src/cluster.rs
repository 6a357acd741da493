//! `shoal cluster up`: a whole cluster on one machine. Each peer is its own
//! process with its own store and QUIC endpoint on loopback, spread over
//! zones; the supervisor waits until they see each other and stops them
//! cleanly on Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal_proto::admin::{
    CreateVolumeRequest, MountRequest, NodeState, StatusRequest, UnmountRequest,
};
use tokio::process::{Child, Command};

use crate::cli::{PolicyArgs, parse_size};
use crate::{admin, identity};

pub const DEFAULT_DATA_DIR: &str = "shoal-data";
/// The peer the CLI talks to by default: the first of `cluster up`.
pub const DEFAULT_PEER_DIR: &str = "shoal-data/node-1";
pub const DEFAULT_MOUNT: &str = "shoal-mnt";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

#[derive(Debug, Args)]
pub struct ClusterUp {
    /// Number of peers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    nodes: u16,
    /// Where the cluster CA and each peer's data dir (node-1, node-2, ...) live.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    dir: PathBuf,
    /// QUIC port of the first peer; the others take the next ones.
    #[arg(long, default_value_t = 7400)]
    base_port: u16,
    /// Bytes each peer offers for blocks.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    capacity: u64,
    /// Volume to create (if missing) and mount.
    #[arg(long, default_value = "default")]
    volume: String,
    /// Where to mount the volume.
    #[arg(long, default_value = DEFAULT_MOUNT)]
    mount: PathBuf,
    /// Start the peers only; mount nothing.
    #[arg(long)]
    no_mount: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// One peer process of the local cluster.
#[derive(Debug)]
struct LocalPeer {
    name: String,
    dir: PathBuf,
    child: Child,
}

pub async fn up(args: ClusterUp) -> anyhow::Result<()> {
    let nodes = usize::from(args.nodes);
    if nodes < usize::from(args.policy.replicas) {
        bail!(
            "{nodes} peers cannot hold {} replicas of each block: pass --replicas {nodes} or more --nodes",
            args.policy.replicas
        );
    }
    if !args.dir.join(identity::CA_CERT_FILE).exists() {
        identity::init_ca(&args.dir)?;
    }
    identity::ensure_keyring(&args.dir)?;
    let exe = std::env::current_exe().context("cannot find the shoal binary")?;
    let first = format!("127.0.0.1:{}", args.base_port);
    let mut peers = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let name = format!("node-{}", i + 1);
        let dir = args.dir.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("peer.log"))?;
        let port = args
            .base_port
            .checked_add(i as u16)
            .context("port out of range")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .arg("run")
            .arg("--dir")
            .arg(&dir)
            .arg("--ca")
            .arg(&args.dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--zone", ZONES[i % ZONES.len()]])
            .args(["--rack", &format!("rack-{}", i + 1)])
            .args(["--capacity", &args.capacity.to_string()])
            .args(["--replicas", &args.policy.replicas.to_string()])
            .args(["--failure-domain", args.policy.failure_domain.as_str()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(q) = args.policy.write_quorum {
            cmd.args(["--write-quorum", &q.to_string()]);
        }
        if i > 0 {
            cmd.args(["--join", &first]);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        peers.push(LocalPeer { name, dir, child });
        if i == 0 {
            // The others join the first: let it bind before they dial it.
            wait_for_socket(&mut peers[0], Duration::from_secs(20)).await?;
        }
    }

    let mut mounted = None;
    let result = async {
        wait_until_joined(&mut peers, Duration::from_secs(60)).await?;
        if !args.no_mount {
            mounted = Some(mount_volume(&args, &peers[0].dir).await?);
        }
        print_usage(&args, &peers, mounted.as_deref());
        tokio::select! {
            _ = crate::cli::shutdown_signal() => {
                println!("stopping {nodes} peers...");
                Ok(())
            }
            exited = first_exit(&mut peers) => Err(exited),
        }
    }
    .await;
    if let Some(target) = mounted
        && let Ok(mut client) = admin::connect(&peers[0].dir).await
        && let Err(e) = client
            .unmount(UnmountRequest {
                target: target.clone(),
            })
            .await
    {
        eprintln!("shoal: unmounting {target}: {}", e.message());
    }
    stop(&mut peers).await;
    if result.is_ok() {
        println!("stopped; data stays in {}", args.dir.display());
    }
    result
}

/// Creates the volume unless it exists and mounts it through `peer`;
/// returns the mount point.
async fn mount_volume(args: &ClusterUp, peer: &Path) -> anyhow::Result<String> {
    let mut client = admin::connect(peer).await?;
    match client
        .create_volume(CreateVolumeRequest {
            name: args.volume.clone(),
            size: args.volume_size(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => bail!("cannot create volume {}: {}", args.volume, s.message()),
    }
    std::fs::create_dir_all(&args.mount)
        .with_context(|| format!("cannot create mount point {}", args.mount.display()))?;
    let target = args.mount.canonicalize()?;
    let reply = client
        .mount(MountRequest {
            volume: args.volume.clone(),
            target: target.display().to_string(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("cannot mount volume {}: {}", args.volume, s.message()))?;
    Ok(reply.into_inner().target)
}

impl ClusterUp {
    /// The volume may use what the cluster can hold once replicated.
    fn volume_size(&self) -> u64 {
        self.capacity * u64::from(self.nodes) / u64::from(self.policy.replicas.max(1))
    }
}

async fn wait_for_socket(peer: &mut LocalPeer, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !admin::socket_path(&peer.dir).exists() {
        check_alive(peer)?;
        if Instant::now() > deadline {
            bail!(
                "{} did not start within {limit:?}; see {}",
                peer.name,
                peer.dir.join("peer.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn check_alive(peer: &mut LocalPeer) -> anyhow::Result<()> {
    if let Some(status) = peer.child.try_wait()? {
        let log = std::fs::read_to_string(peer.dir.join("peer.log")).unwrap_or_default();
        let last = log.lines().last().unwrap_or("").to_string();
        bail!("{} exited ({status}): {last}", peer.name);
    }
    Ok(())
}

/// Waits until every peer sees every other one alive.
async fn wait_until_joined(peers: &mut [LocalPeer], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let n = peers.len();
    loop {
        let mut ready = 0;
        for peer in peers.iter_mut() {
            check_alive(peer)?;
            if alive_members(&peer.dir).await == Some(n) {
                ready += 1;
            }
        }
        if ready == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {n} peers saw the whole cluster within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn alive_members(dir: &Path) -> Option<usize> {
    let mut client = admin::connect(dir).await.ok()?;
    let status = client.status(StatusRequest {}).await.ok()?.into_inner();
    Some(
        status
            .members
            .iter()
            .filter(|m| m.state() == NodeState::Alive)
            .count(),
    )
}

async fn first_exit(peers: &mut [LocalPeer]) -> anyhow::Error {
    loop {
        for peer in peers.iter_mut() {
            if let Err(e) = check_alive(peer) {
                return e;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM to every peer, then SIGKILL to any still running after 10 s.
async fn stop(peers: &mut [LocalPeer]) {
    for peer in peers.iter() {
        if let Some(pid) = peer.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for peer in peers.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), peer.child.wait())
            .await
            .is_err()
        {
            let _ = peer.child.kill().await;
        }
    }
}

fn print_usage(args: &ClusterUp, peers: &[LocalPeer], mounted: Option<&str>) {
    let first = &peers[0].dir;
    println!(
        "Shoal cluster up: {} peers on 127.0.0.1:{}-{}, replication {} across {}s.",
        peers.len(),
        args.base_port,
        args.base_port as usize + peers.len() - 1,
        args.policy.replicas,
        args.policy.failure_domain
    );
    println!("Data and logs: {}", args.dir.display());
    if let Some(target) = mounted {
        println!("Volume {} is mounted at {target}.", args.volume);
    }
    println!();
    println!("Try, in another terminal:");
    println!("  shoal status --dir {}", first.display());
    println!("  shoal volume list --dir {}", first.display());
    println!("  shoal block put README.md --dir {}", first.display());
    println!("  shoal block get ADDRESS --dir {}", first.display());
    println!();
    println!("Press Ctrl-C to stop the cluster.");
}
