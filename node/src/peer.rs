//! A storage peer: the data dir lock, identity, block store, QUIC transport,
//! gossip, replicated blocks and admin API, wired together and run until
//! shut down.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use shoal_core::NodeId;
use shoal_core::placement::Policy;
use shoal_proto::peer::{ErrorCode, PeerRequest, PeerResponse, peer_request, peer_response};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::blocks::{BlockConfig, Blocks, error_response};
use crate::consensus::{self, ClusterNetwork, Consensus, ConsensusConfig, QuorumMaintenance};
use crate::fs::handover::Handover;
use crate::fs::{ChunkCache, Mounts, Volumes};
use crate::gossip::{Gossip, GossipConfig, Member};
use crate::identity::NodeIdentity;
use crate::store::BlockStore;
use crate::transport::{self, Handler, Timeouts, Transport};

/// Everything a peer needs to start.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    pub join: Vec<String>,
    pub zone: String,
    pub rack: String,
    pub capacity: u64,
    pub policy: Policy,
    pub write_quorum: Option<usize>,
    /// How long a dead node stays in mutable blocks' quorums.
    pub eviction_delay: Duration,
    pub gossip: GossipConfig,
    /// Where to serve `GET /status` over HTTP, if anywhere.
    pub status_listen: Option<SocketAddr>,
    /// How often this peer checks that its blocks are on their replicas
    /// (zero: never).
    pub repair_interval: Duration,
    /// Keep a copy of what this peer writes, beyond the R replicas.
    pub local_copy: bool,
    /// Start even when no join address answers, and keep trying them in
    /// the background until another peer is seen (peers that start at
    /// once, as a DaemonSet's do, find each other this way).
    pub retry_join: bool,
    /// The socket of the keeper that holds this peer's FUSE connections
    /// while it restarts (see [`crate::fs::handover`]); without one,
    /// mounts end with the peer.
    pub fuse_keeper: Option<PathBuf>,
}

/// The file in the data dir that records published mounts.
const PUBLISHED_MOUNTS: &str = "published-mounts.json";
/// Bytes of file chunks a peer keeps on disk for the volumes it mounts.
const CHUNK_CACHE: u64 = 1 << 30;

/// A running peer.
#[derive(Debug)]
pub struct Peer {
    dir: PathBuf,
    pub blocks: Arc<Blocks>,
    pub consensus: Arc<Consensus>,
    pub mounts: Arc<Mounts>,
    gossip: Gossip,
    transport: Arc<Transport>,
    me: shoal_core::NodeId,
    _lock: File,
}

/// Takes the data dir's lock, so two peers never share one store.
fn lock_dir(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let path = dir.join("peer.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "data dir {} is in use by another shoal peer (pid {})",
            dir.display(),
            pid.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

impl Peer {
    pub async fn start(config: PeerConfig) -> anyhow::Result<Self> {
        let policy = config.policy;
        if policy.replicas == 0 || policy.replicas > 7 {
            bail!(
                "replication must be between 1 and 7, got {}",
                policy.replicas
            );
        }
        let write_quorum = config.write_quorum.unwrap_or(policy.majority());
        if write_quorum == 0 || write_quorum > policy.replicas {
            bail!(
                "write quorum must be between 1 and the replication factor {}, got {write_quorum}",
                policy.replicas
            );
        }
        let lock = lock_dir(&config.dir)?;
        let identity = NodeIdentity::load_or_issue(&config.dir, &config.ca_dir)?;
        let me = identity.node_id;
        let store_dir = config.dir.join("blocks");
        let store = Arc::new(
            tokio::task::spawn_blocking(move || BlockStore::open(&store_dir, config.capacity))
                .await??,
        );
        let transport = Transport::bind(&identity, config.listen, Timeouts::default())?;
        let addr = transport.local_addr();
        let generation = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
        let member = Member {
            id: me,
            addr,
            zone: config.zone.clone(),
            rack: config.rack.clone(),
            capacity: config.capacity,
            generation,
        };
        let (datagram_tx, datagram_rx) = mpsc::channel(4096);
        let used = {
            let store = store.clone();
            move || store.used()
        };
        let gossip = Gossip::start(
            member,
            config.gossip.clone(),
            transport.clone(),
            datagram_rx,
            used,
        );
        let blocks = Blocks::new(
            me,
            BlockConfig {
                policy,
                write_quorum,
                read_attempt_timeout: Duration::from_secs(2),
                local_copy: config.local_copy,
            },
            store,
            transport.clone(),
            gossip.clone(),
        );
        let consensus = Consensus::new(
            me,
            ConsensusConfig {
                eviction_delay: config.eviction_delay,
                replicas: policy.replicas,
                round_timeout: Duration::from_millis(500),
                deadline: Duration::from_secs(30),
            },
            Arc::new(ClusterNetwork::new(me, blocks.clone())),
            rand::random(),
        );
        {
            // Keep mutable blocks' quorums on live, placed nodes.
            let consensus = consensus.clone();
            tokio::spawn(async move {
                let mut state = QuorumMaintenance::default();
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tick.tick().await;
                    consensus.maintain_quorums(&mut state).await;
                }
            });
        }
        {
            let handler = Arc::new(PeerService {
                me,
                blocks: blocks.clone(),
            });
            let transport = transport.clone();
            tokio::spawn(async move { transport.serve(handler, datagram_tx).await });
        }
        let keyring = crate::identity::load_keyring(&config.ca_dir)?;
        let volumes = Volumes::new(consensus.clone(), blocks.clone(), keyring, policy.replicas);
        let chunk_cache = ChunkCache::open(&config.dir.join("chunk-cache"), CHUNK_CACHE)
            .context("cannot open the chunk cache")?;
        let mounts = Arc::new(Mounts::new(
            volumes,
            blocks.clone(),
            Arc::new(chunk_cache),
            config.dir.join(PUBLISHED_MOUNTS),
            Handover::new(config.fuse_keeper.clone()),
        ));
        let peer = Self {
            dir: config.dir.clone(),
            blocks,
            consensus,
            mounts,
            gossip,
            transport,
            me,
            _lock: lock,
        };
        match join_cluster(&peer.gossip, &peer.transport, me, &config.join).await {
            Err(e) if config.retry_join => {
                warn!("{e}; starting alone and trying again");
                tokio::spawn(retry_join(
                    peer.gossip.clone(),
                    peer.transport.clone(),
                    me,
                    config.join.clone(),
                ));
            }
            result => result?,
        }
        peer.mounts.restore().await;
        let last_repair = Arc::new(crate::repair::LastPass::default());
        if !config.repair_interval.is_zero() {
            tokio::spawn(crate::repair::run(
                peer.blocks.clone(),
                config.repair_interval,
                last_repair.clone(),
            ));
        }
        if let Some(addr) = config.status_listen {
            crate::status::serve(addr, peer.blocks.clone(), me, last_repair).await?;
        }
        info!(node = %me, %addr, zone = %config.zone, rack = %config.rack, "peer started");
        Ok(peer)
    }

    pub fn node_id(&self) -> shoal_core::NodeId {
        self.me
    }

    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    /// Serves the admin API until `shutdown` resolves, then leaves the
    /// cluster cleanly.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let result = crate::admin::serve(
            &self.dir,
            self.blocks.clone(),
            self.consensus.clone(),
            self.gossip.clone(),
            self.me,
            self.mounts.clone(),
            shutdown,
        )
        .await;
        self.mounts.stop_all().await;
        info!("leaving the cluster");
        self.gossip.leave().await;
        self.transport.close().await;
        result
    }
}

/// Announces `me` to every reachable join address; fails only if none can
/// be reached.
async fn join_cluster(
    gossip: &Gossip,
    transport: &Transport,
    me: NodeId,
    join: &[String],
) -> anyhow::Result<()> {
    let own = transport.local_addr();

    let mut errors = Vec::new();
    let mut joined = false;
    for target in join {
        let addrs = match tokio::net::lookup_host(target.as_str()).await {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => {
                errors.push(format!("{target}: {e}"));
                continue;
            }
        };
        for addr in addrs.into_iter().filter(|a| *a != own) {
            match transport.connection(addr).await {
                Ok(conn) => match transport::remote_node_id(&conn) {
                    Some(id) if id == me => {}
                    Some(id) => {
                        gossip.announce(id, addr).await;
                        joined = true;
                    }
                    None => errors.push(format!("{addr}: presented no certificate")),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    if !join.is_empty() && !joined && !errors.is_empty() {
        bail!("cannot join the cluster: {}", errors.join("; "));
    }
    for e in errors {
        warn!("join: {e}");
    }
    Ok(())
}

/// How long apart a peer started with `retry_join` tries its join
/// addresses again, and for how long at most.
const RETRY_JOIN_EVERY: Duration = Duration::from_secs(2);
const RETRY_JOIN_FOR: Duration = Duration::from_secs(24 * 3600);

/// Tries the join addresses until the membership holds another peer (it
/// may have come to us meanwhile).
async fn retry_join(gossip: Gossip, transport: Arc<Transport>, me: NodeId, join: Vec<String>) {
    let deadline = tokio::time::Instant::now() + RETRY_JOIN_FOR;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(RETRY_JOIN_EVERY).await;
        if gossip.view().nodes().iter().any(|n| n.id != me) {
            info!("joined the cluster");
            return;
        }
        if let Err(e) = join_cluster(&gossip, &transport, me, &join).await {
            debug!("retrying join: {e}");
        }
    }
}

/// What a peer serves to other peers: immutable blocks and the acceptor side
/// of mutable blocks. RocksDB calls block, so requests run on the blocking
/// pool.
#[derive(Debug)]
struct PeerService {
    me: NodeId,
    blocks: Arc<Blocks>,
}

impl Handler for PeerService {
    async fn handle(&self, from: NodeId, request: PeerRequest) -> PeerResponse {
        let (blocks, me) = (self.blocks.clone(), self.me);
        let served = tokio::task::spawn_blocking(move || match request.kind {
            Some(peer_request::Kind::PutBlocks(put)) => {
                Ok(peer_response::Kind::PutBlocks(blocks.serve_put(put)))
            }
            Some(peer_request::Kind::GetBlocks(get)) => {
                Ok(peer_response::Kind::GetBlocks(blocks.serve_get(get)))
            }
            Some(peer_request::Kind::Paxos(paxos)) => {
                consensus::serve(&blocks, me, paxos).map(peer_response::Kind::Paxos)
            }
            Some(peer_request::Kind::DeleteOwned(delete)) => blocks
                .serve_delete_owned(delete)
                .map(peer_response::Kind::DeleteOwned),
            Some(peer_request::Kind::ReleaseBlocks(release)) => blocks
                .serve_release(release)
                .map(peer_response::Kind::ReleaseBlocks),
            Some(peer_request::Kind::HasBlocks(has)) => {
                blocks.serve_has(has).map(peer_response::Kind::HasBlocks)
            }
            None => Err("empty request".to_string()),
        })
        .await;
        match served {
            Ok(Ok(kind)) => PeerResponse { kind: Some(kind) },
            Ok(Err(e)) => {
                debug!(%from, "request failed: {e}");
                error_response(ErrorCode::Internal, e)
            }
            Err(e) => error_response(ErrorCode::Internal, e.to_string()),
        }
    }
}
