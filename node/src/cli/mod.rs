//! The `shoal` command line.

mod volume;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use shoal_core::Address;
use shoal_core::mutable::{MutableBlock, PublicKey, WriterKey};
use shoal_core::placement::{FailureDomain, Policy};
use shoal_proto::admin::{
    GetBlockRequest, GetMutableRequest, LocateBlockRequest, PutBlockRequest, PutMutableRequest,
    SetDrainingRequest, StatusRequest, put_mutable_reply,
};

use crate::cluster::{self, ClusterUp};
use crate::gossip::GossipConfig;
use crate::peer::{Peer, PeerConfig};
use crate::{admin, identity, wire};

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: leaderless, replicated storage for containers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or run a cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a storage peer.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show the cluster as a peer sees it.
    Status(PeerArgs),
    /// Store and fetch immutable and mutable blocks.
    #[command(subcommand)]
    Block(BlockCommand),
    /// Your writer key for mutable blocks.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Create, list, resize and delete volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Take, list and delete snapshots of volumes.
    #[command(subcommand)]
    Snapshot(volume::SnapshotCommand),
    /// Mount a volume at DIR through the local peer; Ctrl-C or SIGTERM
    /// unmounts.
    Mount {
        volume: String,
        #[arg(value_name = "DIR")]
        target: PathBuf,
        #[arg(long)]
        read_only: bool,
        /// Mount options: ro, rw, noexec, nosuid, nodev, noatime, sync,
        /// dirsync (comma-separated or repeated).
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Unmount a volume the local peer mounted at DIR.
    Umount {
        #[arg(value_name = "DIR")]
        target: PathBuf,
        #[command(flatten)]
        peer: PeerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Create a cluster CA (ca.crt, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start a local cluster of N peers on loopback; Ctrl-C stops it.
    Up(ClusterUp),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run one storage peer in the foreground.
    Run(Box<NodeRun>),
    /// Stop placing new blocks on a peer; it keeps serving what it holds.
    Drain(PeerArgs),
    /// Return a drained peer to service.
    Undrain(PeerArgs),
}

/// Replication policy flags, shared by `node run` and `cluster up`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Copies kept of every block (1-7).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub replicas: u8,
    /// What replicas of one block must not share: zone, rack or host.
    #[arg(long, default_value = "zone")]
    pub failure_domain: FailureDomain,
    /// Replicas that must hold a block before a write is acknowledged
    /// (default: a majority).
    #[arg(long)]
    pub write_quorum: Option<usize>,
}

impl PolicyArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            replicas: usize::from(self.replicas),
            failure_domain: self.failure_domain,
        }
    }
}

#[derive(Debug, Args)]
struct NodeRun {
    /// Data dir: the peer's store, certificate and admin socket.
    #[arg(long)]
    dir: PathBuf,
    /// Dir holding the cluster CA (default: DIR if it has ca.crt, else its parent).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// QUIC address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Address of a peer already in the cluster (repeatable).
    #[arg(long)]
    join: Vec<String>,
    /// Start even if no --join address answers, and keep trying them until
    /// another peer is seen (for peers that all start at once).
    #[arg(long)]
    retry_join: bool,
    /// Socket of a keeper (`shoal-csi --fuse-keeper`) that holds this
    /// peer's FUSE connections while it restarts: mounts then outlive the
    /// peer, and SIGTERM hands them over instead of unmounting.
    #[arg(long)]
    fuse_keeper: Option<PathBuf>,
    #[arg(long, default_value = "default")]
    zone: String,
    #[arg(long, default_value = "default")]
    rack: String,
    /// Bytes offered for blocks, e.g. 10GiB.
    #[arg(long, default_value = "10GiB", value_parser = parse_size)]
    capacity: u64,
    /// How long a dead peer stays in mutable blocks' quorums before it is
    /// replaced, e.g. 10m.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    eviction_delay: std::time::Duration,
    /// Serve this peer's status as JSON (`GET /status`) on this address.
    #[arg(long)]
    status_listen: Option<SocketAddr>,
    /// How often to check that this peer's blocks are on all their
    /// replicas and copy them where they are missing (0s: never).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    repair_interval: std::time::Duration,
    /// Keep a copy of every block this peer writes (file data of the
    /// volumes it mounts) beyond the R replicas, and read it locally.
    #[arg(long)]
    local_copy: bool,
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Data dir of the local peer to ask.
    #[arg(long, env = "SHOAL_DIR", default_value = cluster::DEFAULT_PEER_DIR)]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum BlockCommand {
    /// Store FILE as an immutable block; prints its address.
    Put {
        file: PathBuf,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Fetch the block at ADDRESS (to stdout, or to FILE with -o).
    Get {
        address: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Show which nodes hold the block at ADDRESS.
    Locate {
        address: String,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Create a mutable block (owned by your key) holding FILE (or
    /// nothing); prints its address.
    Create {
        file: Option<PathBuf>,
        /// Public key (hex) of another writer allowed to write it (repeatable).
        #[arg(long = "writer")]
        writers: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Replace a mutable block's content with FILE if its version is still
    /// V (compare-and-set); prints the new version. Exits 3 on a conflict.
    Write {
        address: String,
        #[arg(long)]
        expect_version: u64,
        file: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Read a mutable block's current content (linearizable).
    Read {
        address: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print version, owner, writers and signer instead of the content.
        #[arg(long)]
        meta: bool,
        #[command(flatten)]
        peer: PeerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Print your public key (creating the key on first use): give it to an
    /// owner who should let you write.
    Show {
        #[command(flatten)]
        key: KeyArgs,
    },
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// Your writer key (ed25519 secret, hex); created on first use.
    #[arg(long = "key", env = "SHOAL_KEY", default_value_os_t = default_key_path())]
    path: PathBuf,
}

fn default_key_path() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".shoal")
        .join("writer.key")
}

/// Loads the writer key at `path`, creating it (mode 0600) if missing.
fn load_key(path: &Path) -> anyhow::Result<WriterKey> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create key {}", path.display()))?;
        writeln!(f, "{}", hex::encode(secret))?;
        eprintln!("created writer key {}", path.display());
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret)
        .map_err(|_| anyhow::anyhow!("{}: not a writer key (64 hex digits)", path.display()))?;
    Ok(WriterKey::from_secret(secret))
}

fn parse_public_key(s: &str) -> anyhow::Result<PublicKey> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("{s:?} is not a public key (64 hex digits)"))?;
    Ok(PublicKey(key))
}

/// A compare-and-set lost: exit status 3, so scripts can retry.
#[derive(Debug, thiserror::Error)]
#[error("conflict: {0}")]
struct Conflict(String);

pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?}: {e} (examples: 512MiB, 10GiB)"))
}

/// Runs the CLI; errors are printed on one line.
pub fn main() -> ExitCode {
    keep_freed_buffers();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shoal: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            if e.is::<Conflict>() {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Keeps freed buffers in the process for the next chunk. By default glibc
/// maps every buffer over 128 KiB afresh and unmaps it when freed, so each
/// MiB of file data was faulted in and zeroed page by page, several times
/// over on its way through the mount, the transport and the store.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn keep_freed_buffers() {
    // SAFETY: mallopt only sets allocator thresholds; it takes the
    // allocator's own lock and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
fn keep_freed_buffers() {}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Cluster(ClusterCommand::Init { dir }) => {
            identity::init_ca(&dir)?;
            println!("created cluster CA in {}", dir.display());
            println!(
                "start peers with: shoal node run --dir DATA_DIR --ca {} --listen 127.0.0.1:7400 ...",
                dir.display()
            );
            Ok(())
        }
        Command::Cluster(ClusterCommand::Up(up)) => cluster::up(up).await,
        Command::Node(NodeCommand::Run(args)) => {
            init_logging();
            run_node(*args).await
        }
        Command::Node(NodeCommand::Drain(peer)) => set_draining(&peer.dir, true).await,
        Command::Node(NodeCommand::Undrain(peer)) => set_draining(&peer.dir, false).await,
        Command::Status(peer) => status(&peer.dir).await,
        Command::Volume(command) => volume::run(command).await,
        Command::Snapshot(command) => volume::snapshot(command).await,
        Command::Mount {
            volume,
            target,
            read_only,
            options,
            peer,
        } => volume::mount(volume, target, read_only, options, peer).await,
        Command::Umount { target, peer } => volume::umount(target, peer).await,
        Command::Block(BlockCommand::Put { file, peer }) => {
            let data =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let reply = admin::connect(&peer.dir)
                .await?
                .put_block(PutBlockRequest { data })
                .await
                .map_err(status_error)?;
            println!("{}", reply.into_inner().address);
            Ok(())
        }
        Command::Block(BlockCommand::Get {
            address,
            output,
            peer,
        }) => {
            let address: Address = address.parse()?;
            let reply = admin::connect(&peer.dir)
                .await?
                .get_block(GetBlockRequest {
                    address: address.to_string(),
                })
                .await
                .map_err(status_error)?;
            let data = reply.into_inner().data;
            match output {
                Some(path) => std::fs::write(&path, data)
                    .with_context(|| format!("cannot write {}", path.display())),
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&data)?;
                    Ok(())
                }
            }
        }
        Command::Key(KeyCommand::Show { key }) => {
            println!("{}", hex::encode(load_key(&key.path)?.public().0));
            Ok(())
        }
        Command::Block(BlockCommand::Create {
            file,
            writers,
            key,
            peer,
        }) => {
            let payload = match file {
                Some(f) => {
                    std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?
                }
                None => Vec::new(),
            };
            let writers = writers
                .iter()
                .map(|w| parse_public_key(w))
                .collect::<Result<_, _>>()?;
            let key = load_key(&key.path)?;
            let mut salt = [0u8; 16];
            rand::fill(&mut salt);
            let block = key.create(salt, writers, payload);
            put_mutable(&peer.dir, &block).await?;
            println!("{}", block.address);
            Ok(())
        }
        Command::Block(BlockCommand::Write {
            address,
            expect_version,
            file,
            key,
            peer,
        }) => {
            let address: Address = address.parse()?;
            let payload =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let key = load_key(&key.path)?;
            let current = get_mutable(&peer.dir, &address).await?;
            if current.version != expect_version {
                return Err(Conflict(format!(
                    "version {} is current, not {expect_version}",
                    current.version
                ))
                .into());
            }
            let next = key.write_after(&current, payload);
            let written = put_mutable(&peer.dir, &next).await?;
            println!("{}", written.version);
            Ok(())
        }
        Command::Block(BlockCommand::Read {
            address,
            output,
            meta,
            peer,
        }) => {
            let address: Address = address.parse()?;
            let block = get_mutable(&peer.dir, &address).await?;
            if meta {
                println!("address  {}", block.address);
                println!("version  {}", block.version);
                println!("size     {}", block.payload.len());
                println!("owner    {}", hex::encode(block.acl.owner.0));
                for w in &block.acl.writers {
                    println!("writer   {}", hex::encode(w.0));
                }
                println!("signer   {}", hex::encode(block.signer.0));
                return Ok(());
            }
            match output {
                Some(path) => std::fs::write(&path, &block.payload)
                    .with_context(|| format!("cannot write {}", path.display())),
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&block.payload)?;
                    Ok(())
                }
            }
        }
        Command::Block(BlockCommand::Locate { address, peer }) => {
            let address: Address = address.parse()?;
            let reply = admin::connect(&peer.dir)
                .await?
                .locate_block(LocateBlockRequest {
                    address: address.to_string(),
                })
                .await
                .map_err(status_error)?;
            for m in reply.into_inner().replicas {
                println!("{} {} {} {}", m.node_id, m.address, m.zone, m.rack);
            }
            Ok(())
        }
    }
}

/// A gRPC error as a one-line message.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

async fn run_node(args: NodeRun) -> anyhow::Result<()> {
    let ca_dir = args.ca.clone().unwrap_or_else(|| default_ca_dir(&args.dir));
    let config = PeerConfig {
        dir: args.dir,
        ca_dir,
        listen: args.listen,
        join: args.join,
        zone: args.zone,
        rack: args.rack,
        capacity: args.capacity,
        policy: args.policy.policy(),
        write_quorum: args.policy.write_quorum,
        eviction_delay: args.eviction_delay,
        gossip: GossipConfig::default(),
        status_listen: args.status_listen,
        repair_interval: args.repair_interval,
        local_copy: args.local_copy,
        retry_join: args.retry_join,
        fuse_keeper: args.fuse_keeper,
    };
    let peer = Peer::start(config).await?;
    peer.run(shutdown_signal()).await
}

fn default_ca_dir(dir: &Path) -> PathBuf {
    if dir.join(identity::CA_CERT_FILE).exists() {
        return dir.to_path_buf();
    }
    dir.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.to_path_buf())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Proposes a signed version through the local peer; a lost
/// compare-and-set is a [`Conflict`].
async fn put_mutable(dir: &Path, block: &MutableBlock) -> anyhow::Result<MutableBlock> {
    let reply = admin::connect(dir)
        .await?
        .put_mutable(PutMutableRequest {
            block: Some(wire::block_to_wire(block)),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match reply.outcome {
        Some(put_mutable_reply::Outcome::Written(b)) => Ok(wire::block_from_wire(b)?),
        Some(put_mutable_reply::Outcome::Conflict(b)) => {
            let current = wire::block_from_wire(b)?;
            Err(Conflict(format!(
                "version {} is current, not {}",
                current.version,
                block.version - 1
            ))
            .into())
        }
        None => anyhow::bail!("the peer gave no outcome"),
    }
}

/// Reads a mutable block through the local peer, verifying it here too.
async fn get_mutable(dir: &Path, address: &Address) -> anyhow::Result<MutableBlock> {
    let reply = admin::connect(dir)
        .await?
        .get_mutable(GetMutableRequest {
            address: address.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let block = wire::block_from_wire(reply.block.context("the peer gave no block")?)?;
    anyhow::ensure!(
        block.address == *address,
        "the peer answered with another block"
    );
    Ok(block)
}

async fn set_draining(dir: &Path, draining: bool) -> anyhow::Result<()> {
    admin::connect(dir)
        .await?
        .set_draining(SetDrainingRequest { draining })
        .await
        .map_err(status_error)?;
    println!(
        "{}",
        if draining {
            "draining: no new blocks will be placed on this peer"
        } else {
            "back in service"
        }
    );
    Ok(())
}

async fn status(dir: &Path) -> anyhow::Result<()> {
    let reply = admin::connect(dir)
        .await?
        .status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "node", "address", "zone", "rack", "state", "capacity", "used",
    ]);
    for m in &reply.members {
        let marker = if m.node_id == reply.node_id { " *" } else { "" };
        table.add_row([
            format!("{}{marker}", m.node_id),
            m.address.clone(),
            m.zone.clone(),
            m.rack.clone(),
            m.state()
                .as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_lowercase(),
            bytesize::ByteSize(m.capacity).display().iec().to_string(),
            bytesize::ByteSize(m.used).display().iec().to_string(),
        ]);
    }
    println!("{table}");
    println!(
        "replication {} across distinct {}s; * marks the peer answering",
        reply.replication, reply.failure_domain
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
