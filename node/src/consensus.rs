//! Mutable blocks across the cluster: the async driver of the pure Paxos
//! core. Each block is decided by its own quorum (its replicas from
//! placement); this peer serves as acceptor for the blocks it replicates and
//! as proposer for the writes and reads its clients make.
//!
//! Clients sign versions themselves ([`PreSigned`]); the proposer only
//! checks, at the moment it knows the current version, that the signed one
//! follows it. A proposer that won phase 1 for a block keeps its ballot (and
//! so pays one round trip per write) until another proposer preempts it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use rand::RngExt;
use shoal_core::mutable::MutableBlock;
use shoal_core::paxos::{
    Acceptor, Action, Chosen, Config, Op, Outcome, Proposer, Reply, Request, Update,
};
use shoal_core::{Address, NodeId, NodeState};
use shoal_proto::peer::{self as pb, PeerRequest, PeerResponse, peer_request, peer_response};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::blocks::Blocks;
use crate::wire;

/// A version the client signed; it applies only on top of the version
/// before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreSigned(pub MutableBlock);

impl Update<MutableBlock> for PreSigned {
    fn apply(&self, current: Option<&MutableBlock>) -> Result<MutableBlock, String> {
        let expected = self.0.version.saturating_sub(1);
        let have = current.map_or(0, |c| c.version);
        if have != expected {
            return Err(format!("version {have} is current, not {expected}"));
        }
        self.0.check_successor(current).map_err(|e| e.to_string())?;
        Ok(self.0.clone())
    }
}

impl PreSigned {
    /// Whether this version was chosen, given the version now current (a
    /// retry may find its earlier attempt finished by another proposer):
    /// `Some(true)` it was, `Some(false)` it was not, `None` the history
    /// has moved too far past it to tell.
    fn landed(&self, current: &MutableBlock) -> Option<bool> {
        let ours = &self.0;
        match current.version.checked_sub(ours.version) {
            None => Some(false),
            Some(0) => Some(current == ours),
            Some(1) => Some(current.prev == ours.digest()),
            Some(_) => None,
        }
    }
}

/// How a put of a signed version ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The version is now current.
    Written(MutableBlock),
    /// The version it expected to follow is not current; this one is.
    Conflict(MutableBlock),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsensusError {
    #[error("mutable block {0} not found")]
    NotFound(Address),
    #[error("refused: {0}")]
    Invalid(String),
    #[error("mutable block {address}: no quorum answered within {after:?}")]
    Unavailable { address: Address, after: Duration },
    #[error(
        "mutable block {address}: the write may or may not have landed (version {current} is now current); read it to find out"
    )]
    Indeterminate { address: Address, current: u64 },
}

/// Tuning of the driver.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusConfig {
    /// How long a quorum member must be dead before it is replaced.
    pub eviction_delay: Duration,
    /// Replicas (and so acceptors) per block.
    pub replicas: usize,
    /// How long a phase waits for a quorum before it is retried.
    pub round_timeout: Duration,
    /// How long an operation may take in all.
    pub deadline: Duration,
}

type SharedProposer = Arc<tokio::sync::Mutex<Proposer<MutableBlock, PreSigned>>>;

/// A reply on its way back, or `None` if none will come (lost, refused,
/// unreachable).
pub type ReplyFuture = Pin<Box<dyn Future<Output = Option<Reply<MutableBlock>>> + Send>>;

/// What the driver needs of the world: where a block's quorum starts, and a
/// way to ask an acceptor. The cluster provides it over QUIC; a simulation
/// provides it in memory, under virtual time.
pub trait Network: Send + Sync + 'static {
    /// The quorum a block with `replicas` replicas starts with (its
    /// replicas by placement).
    fn initial_members(&self, address: &Address, replicas: usize) -> Vec<NodeId>;
    /// Sends `request` about `address` to `to`.
    fn request(&self, to: NodeId, address: Address, request: Request<MutableBlock>) -> ReplyFuture;
}

/// Most Paxos requests one message to an acceptor carries.
const MAX_BATCH: usize = 256;

/// A request waiting for its batch, and where its reply goes.
type Queued = (
    Address,
    Request<MutableBlock>,
    oneshot::Sender<Reply<MutableBlock>>,
);

/// Paxos requests waiting to go to one acceptor. One batch to it is out at
/// a time and the next gathers meanwhile, so a busy proposer (a mount
/// committing thousands of blocks) sends a few large messages that the
/// acceptor syncs once each, and an idle one waits for nothing.
type Outboxes = Arc<Mutex<HashMap<NodeId, Vec<Queued>>>>;

/// The cluster: acceptors are the peers, reached over the QUIC transport
/// (or directly, for this peer itself).
#[derive(Debug)]
pub struct ClusterNetwork {
    me: NodeId,
    blocks: Arc<Blocks>,
    /// Requests waiting for the batch in flight to each acceptor; an
    /// acceptor with an entry has a batch in flight.
    outboxes: Outboxes,
}

impl ClusterNetwork {
    pub fn new(me: NodeId, blocks: Arc<Blocks>) -> Self {
        Self {
            me,
            blocks,
            outboxes: Arc::default(),
        }
    }
}

impl Network for ClusterNetwork {
    fn initial_members(&self, address: &Address, replicas: usize) -> Vec<NodeId> {
        self.blocks.placement_for_reads(address, replicas)
    }

    fn request(&self, to: NodeId, address: Address, request: Request<MutableBlock>) -> ReplyFuture {
        let alive = self
            .blocks
            .view()
            .get(&to)
            .is_some_and(|n| n.state != NodeState::Dead);
        if !alive {
            return Box::pin(async { None });
        }
        let (tx, rx) = oneshot::channel();
        let idle = {
            let mut outboxes = self.outboxes.lock().expect("outboxes");
            let idle = !outboxes.contains_key(&to);
            outboxes.entry(to).or_default().push((address, request, tx));
            idle
        };
        if idle {
            let (me, blocks, outboxes) = (self.me, self.blocks.clone(), self.outboxes.clone());
            tokio::spawn(send_batches(me, to, blocks, outboxes));
        }
        Box::pin(async move { rx.await.ok() })
    }
}

/// Sends what waits for acceptor `to`, a batch at a time, until nothing
/// does.
async fn send_batches(me: NodeId, to: NodeId, blocks: Arc<Blocks>, outboxes: Outboxes) {
    loop {
        let batch: Vec<Queued> = {
            let mut outboxes = outboxes.lock().expect("outboxes");
            let Some(queued) = outboxes.get_mut(&to) else {
                return;
            };
            if queued.is_empty() {
                outboxes.remove(&to);
                return;
            }
            let n = queued.len().min(MAX_BATCH);
            queued.drain(..n).collect()
        };
        let (wires, senders): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(address, request, tx)| (wire::request_to_wire(&address, &request), tx))
            .unzip();
        let sent = wires.len();
        match exchange(me, to, &blocks, pb::PaxosBatch { requests: wires }).await {
            Ok(reply) if reply.replies.len() == sent => {
                for (tx, reply) in senders.into_iter().zip(reply.replies) {
                    // Kindless: the acceptor could not answer this one.
                    if let Ok(reply) = wire::reply_from_wire(reply) {
                        let _ = tx.send(reply);
                    }
                }
            }
            Ok(reply) => {
                debug!(%to, "paxos batch: {} replies to {sent} requests", reply.replies.len())
            }
            Err(e) => debug!(%to, "paxos batch: {e}"),
        }
    }
}

/// One batch to acceptor `to` and its replies.
async fn exchange(
    me: NodeId,
    to: NodeId,
    blocks: &Arc<Blocks>,
    batch: pb::PaxosBatch,
) -> Result<pb::PaxosBatchReply, String> {
    if to == me {
        let blocks = blocks.clone();
        return tokio::task::spawn_blocking(move || serve(&blocks, me, batch))
            .await
            .map_err(|e| e.to_string())?;
    }
    let addr = blocks
        .view()
        .get(&to)
        .map(|n| n.addr)
        .ok_or("no longer a member")?;
    let request = PeerRequest {
        kind: Some(peer_request::Kind::Paxos(batch)),
    };
    match blocks.transport().request(addr, &request).await {
        Ok(PeerResponse {
            kind: Some(peer_response::Kind::Paxos(reply)),
        }) => Ok(reply),
        Ok(_) => Err("unexpected answer".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// How a block's proposer starts, should it not exist yet.
#[derive(Debug, Clone, Copy, Default)]
struct Start {
    /// The caller just drew the block's address at random.
    creator: bool,
    /// Replicas of the block, if not the cluster's number.
    replicas: Option<usize>,
}

/// Bound on cached proposers (one per block this peer wrote or read);
/// idle ones are dropped past it.
const MAX_PROPOSERS: usize = 10_000;

/// The proposer side of mutable blocks on one node, over a [`Network`].
pub struct Consensus<N = ClusterNetwork> {
    me: NodeId,
    config: ConsensusConfig,
    network: Arc<N>,
    proposers: Mutex<HashMap<Address, SharedProposer>>,
    /// Backoff jitter; seeded, so a simulation replays exactly.
    rng: Mutex<rand::rngs::StdRng>,
}

impl<N> std::fmt::Debug for Consensus<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consensus").field("me", &self.me).finish()
    }
}

impl<N: Network> Consensus<N> {
    pub fn new(me: NodeId, config: ConsensusConfig, network: Arc<N>, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            me,
            config,
            network,
            proposers: Mutex::new(HashMap::new()),
            rng: Mutex::new(rand::SeedableRng::seed_from_u64(seed)),
        })
    }

    /// The quorum a block starts with: its replicas from placement over
    /// every known node (stable while nodes come and go).
    fn initial_config(&self, address: &Address, replicas: Option<usize>) -> Config {
        let replicas = replicas.unwrap_or(self.config.replicas);
        Config {
            epoch: 1,
            members: self.network.initial_members(address, replicas),
        }
    }

    fn proposer(&self, address: Address, start: Start) -> SharedProposer {
        let mut proposers = self.proposers.lock().expect("proposer cache");
        if proposers.len() >= MAX_PROPOSERS {
            proposers.retain(|_, p| p.try_lock().map(|p| !p.is_idle()).unwrap_or(true));
        }
        proposers
            .entry(address)
            .or_insert_with(|| {
                let known = Chosen::empty(self.initial_config(&address, start.replicas));
                Arc::new(tokio::sync::Mutex::new(if start.creator {
                    Proposer::creator(self.me, known)
                } else {
                    Proposer::new(self.me, known)
                }))
            })
            .clone()
    }

    /// Proposes a signed version: version 1 creates the block, version N+1
    /// replaces version N if N is current.
    pub async fn put(&self, block: MutableBlock) -> Result<PutOutcome, ConsensusError> {
        self.put_as(block, Start::default()).await
    }

    /// [`Self::put`] for a block kept on `replicas` replicas rather than
    /// the cluster's number.
    pub async fn put_in(
        &self,
        block: MutableBlock,
        replicas: Option<usize>,
    ) -> Result<PutOutcome, ConsensusError> {
        let start = Start {
            creator: false,
            replicas,
        };
        self.put_as(block, start).await
    }

    /// Creates a block whose address this node has just drawn at random
    /// (no one else can know it): one round trip instead of two (see
    /// [`Proposer::creator`]).
    pub async fn create_unique(
        &self,
        block: MutableBlock,
        replicas: Option<usize>,
    ) -> Result<PutOutcome, ConsensusError> {
        if block.version != 1 {
            return Err(ConsensusError::Invalid(
                "a new block starts at version 1".into(),
            ));
        }
        let start = Start {
            creator: true,
            replicas,
        };
        self.put_as(block, start).await
    }

    async fn put_as(
        &self,
        block: MutableBlock,
        start: Start,
    ) -> Result<PutOutcome, ConsensusError> {
        block
            .verify()
            .map_err(|e| ConsensusError::Invalid(e.to_string()))?;
        if block.version == 0 {
            return Err(ConsensusError::Invalid("versions start at 1".into()));
        }
        let address = block.address;
        let update = PreSigned(block);
        // Any chosen version an acceptor reports on the way may settle
        // whether this write landed, should the outcome alone not tell.
        let mut witness = None;
        let outcome = self
            .run(address, start, Op::Write(update.clone()), |reply| {
                for chosen in reported_states(reply) {
                    // Only versions at or past ours say anything about it.
                    if let Some(v) = chosen
                        .value
                        .as_ref()
                        .filter(|v| v.version >= update.0.version)
                    {
                        witness = witness.or(update.landed(v));
                    }
                }
            })
            .await?;
        match outcome {
            Outcome::Done(_) => Ok(PutOutcome::Written(update.0)),
            Outcome::Refused {
                current, attempted, ..
            } => {
                let current = current.value.ok_or(ConsensusError::NotFound(address))?;
                // Never sent out: no one else can have chosen it.
                let landed = if attempted {
                    update.landed(&current).or(witness)
                } else {
                    Some(false)
                };
                match landed {
                    Some(true) => Ok(PutOutcome::Written(update.0)),
                    Some(false) => Ok(PutOutcome::Conflict(current)),
                    None => Err(ConsensusError::Indeterminate {
                        address,
                        current: current.version,
                    }),
                }
            }
            Outcome::Invalid(reason) => Err(ConsensusError::Invalid(reason)),
        }
    }

    /// A linearizable read of the block's current version.
    pub async fn get(&self, address: Address) -> Result<MutableBlock, ConsensusError> {
        self.get_with_quorum(address).await.map(|(block, _)| block)
    }

    /// [`Self::get`] for a block kept on `replicas` replicas.
    pub async fn get_in(
        &self,
        address: Address,
        replicas: Option<usize>,
    ) -> Result<MutableBlock, ConsensusError> {
        self.read(address, replicas).await.map(|(block, _)| block)
    }

    /// A linearizable read that also tells which quorum decides the block.
    pub async fn get_with_quorum(
        &self,
        address: Address,
    ) -> Result<(MutableBlock, Config), ConsensusError> {
        self.read(address, None).await
    }

    async fn read(
        &self,
        address: Address,
        replicas: Option<usize>,
    ) -> Result<(MutableBlock, Config), ConsensusError> {
        let start = Start {
            creator: false,
            replicas,
        };
        match self.run(address, start, Op::Read, |_| {}).await? {
            Outcome::Done(chosen)
            | Outcome::Refused {
                current: chosen, ..
            } => {
                let block = chosen.value.ok_or(ConsensusError::NotFound(address))?;
                Ok((block, chosen.config))
            }
            Outcome::Invalid(reason) => Err(ConsensusError::Invalid(reason)),
        }
    }

    /// Drives one operation of the block's proposer to its outcome.
    async fn run(
        &self,
        address: Address,
        start: Start,
        op: Op<PreSigned>,
        mut observe: impl FnMut(&Reply<MutableBlock>),
    ) -> Result<Outcome<MutableBlock>, ConsensusError> {
        let shared = self.proposer(address, start);
        let mut proposer = shared.lock().await;
        if !proposer.is_idle() {
            // The caller of an earlier operation went away mid-way (its
            // future was dropped): that operation is over.
            proposer.abandon();
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let mut backoffs = 0u32;
        let mut actions = proposer.start(op);
        loop {
            let mut next = Vec::new();
            for action in actions {
                match action {
                    Action::Send(to, request) => self.send(address, to, request, tx.clone()),
                    Action::Backoff => {
                        // Contention: wait a random, growing time so that
                        // competing proposers stop preempting each other.
                        backoffs += 1;
                        let ceiling = 4u64 << backoffs.min(7);
                        let wait = self.rng.lock().expect("rng").random_range(1..=ceiling);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                        next.extend(proposer.retry());
                    }
                    Action::Finished(outcome) => return Ok(outcome),
                }
            }
            if !next.is_empty() {
                actions = next;
                continue;
            }
            if started.elapsed() > self.config.deadline {
                proposer.abandon();
                return Err(ConsensusError::Unavailable {
                    address,
                    after: self.config.deadline,
                });
            }
            actions = tokio::select! {
                biased;
                Some((from, reply)) = rx.recv() => {
                    observe(&reply);
                    proposer.on_reply(from, reply)
                }
                _ = tokio::time::sleep(self.config.round_timeout) => proposer.retry(),
            };
        }
    }

    /// Sends one request and feeds the reply, if any, back to the loop.
    fn send(
        &self,
        address: Address,
        to: NodeId,
        request: Request<MutableBlock>,
        replies: mpsc::UnboundedSender<(NodeId, Reply<MutableBlock>)>,
    ) {
        let reply = self.network.request(to, address, request);
        tokio::spawn(async move {
            if let Some(reply) = reply.await {
                let _ = replies.send((to, reply));
            }
        });
    }
}

impl Consensus<ClusterNetwork> {
    /// Keeps the quorums of the blocks this peer is an acceptor for where
    /// they belong: a member dead for the eviction delay is replaced by the
    /// next eligible node from placement, and once membership has been
    /// settled (no change) for the eviction delay, a quorum that differs
    /// from the block's placement (a node joined, or one drains) moves
    /// there. Each block is handled by the first live member of its quorum
    /// (by node id), so peers rarely race; when they do, Paxos picks one new
    /// quorum. Returns how many blocks got a new quorum.
    pub async fn maintain_quorums(&self, state: &mut QuorumMaintenance) -> usize {
        let view = self.network.blocks.view();
        let now = Instant::now();
        state
            .dead_since
            .retain(|id, _| view.get(id).is_some_and(|n| n.state == NodeState::Dead));
        for n in view.nodes().iter().filter(|n| n.state == NodeState::Dead) {
            state.dead_since.entry(n.id).or_insert(now);
        }
        let shape: Vec<(NodeId, NodeState)> =
            view.nodes().iter().map(|n| (n.id, n.state)).collect();
        if state.settled.as_ref().is_none_or(|(s, _)| *s != shape) {
            state.settled = Some((shape, now));
        }
        let delay = self.config.eviction_delay;
        let evicted: Vec<NodeId> = state
            .dead_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= delay)
            .map(|(id, _)| *id)
            .collect();
        let settled = state
            .settled
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) >= delay);
        if evicted.is_empty() && !settled {
            return 0;
        }
        let mut replaced = 0;
        let mut start_after = None;
        // Bounded: pages of at most 1,000 blocks, at most 1,000 pages a sweep.
        for _ in 0..1000 {
            let store = self.network.blocks.store().clone();
            let after = start_after;
            let page = match tokio::task::spawn_blocking(move || {
                store.list_acceptors(after.as_ref(), 1000)
            })
            .await
            {
                Ok(Ok(page)) => page,
                _ => return replaced,
            };
            for address in &page {
                let Some(members) = self.better_quorum(address, &evicted, settled, &view) else {
                    continue;
                };
                match self
                    .run(
                        *address,
                        Start::default(),
                        Op::Reconfigure(members.clone()),
                        |_| {},
                    )
                    .await
                {
                    Ok(Outcome::Done(chosen)) => {
                        replaced += 1;
                        tracing::info!(%address, epoch = chosen.config.epoch, to = ?members, dead = evicted.len(), "moved quorum to new members");
                    }
                    Ok(other) => debug!(%address, "reconfiguration not done: {other:?}"),
                    Err(e) => debug!(%address, "reconfiguration failed: {e}"),
                }
            }
            match page.last() {
                Some(last) if page.len() == 1000 => start_after = Some(*last),
                _ => break,
            }
        }
        replaced
    }

    /// The quorum that should replace `address`'s current one, if any and
    /// if this peer is the one to act.
    fn better_quorum(
        &self,
        address: &Address,
        evicted: &[NodeId],
        settled: bool,
        view: &shoal_core::View,
    ) -> Option<Vec<NodeId>> {
        let chosen = self
            .network
            .blocks
            .store()
            .with_acceptors(&[*address], true, |_, stored| {
                let state = stored
                    .and_then(|b| pb::AcceptorState::decode(b).ok())
                    .and_then(|s| wire::acceptor_from_wire(s).ok());
                (None, state.and_then(|a| a.chosen))
            })
            .ok()?
            .pop()??;
        chosen.value.as_ref()?;
        let config = chosen.config;
        let alive = |id: &NodeId| view.get(id).is_some_and(|n| n.state == NodeState::Alive);
        // The first live member acts.
        if config.members.iter().copied().filter(|m| alive(m)).min() != Some(self.me) {
            return None;
        }
        // A block keeps the number of replicas it was created with.
        let want = config.members.len();
        let placed = self
            .network
            .blocks
            .placement_for_writes(address, want + config.members.len());
        let target: Vec<NodeId> = if config.members.iter().any(|m| evicted.contains(m)) {
            // Keep the live members; fill up from placement.
            let mut kept: Vec<NodeId> = config
                .members
                .iter()
                .filter(|m| !evicted.contains(m))
                .copied()
                .collect();
            for id in placed {
                if kept.len() >= want {
                    break;
                }
                if !kept.contains(&id) && alive(&id) {
                    kept.push(id);
                }
            }
            kept
        } else if settled {
            placed.into_iter().take(want).collect()
        } else {
            return None;
        };
        let same =
            target.len() == config.members.len() && target.iter().all(|m| config.contains(m));
        // Never shrink a quorum, and only move onto live nodes.
        (!same && target.len() >= want && target.iter().all(alive)).then_some(target)
    }
}

/// What [`Consensus::maintain_quorums`] remembers between sweeps.
#[derive(Debug, Default)]
pub struct QuorumMaintenance {
    /// When each dead node was first seen dead.
    dead_since: HashMap<NodeId, Instant>,
    /// The membership (ids and states) and since when it has not changed.
    settled: Option<(Vec<(NodeId, NodeState)>, Instant)>,
}

/// The chosen states a reply carries.
fn reported_states(reply: &Reply<MutableBlock>) -> Vec<&Chosen<MutableBlock>> {
    match reply {
        Reply::Promised { chosen, .. }
        | Reply::Rejected { chosen, .. }
        | Reply::State { chosen, .. } => chosen.iter().collect(),
        Reply::NotMember { chosen } => vec![chosen],
        Reply::Accepted { .. } | Reply::Invalid { .. } | Reply::Committed { .. } => Vec::new(),
    }
}

/// Serves a batch of Paxos requests as the blocks' acceptor: the state
/// changes are synced to disk, together, before the replies are returned.
/// A malformed or forged request is answered `Invalid`; a block whose
/// stored state cannot be read gets no answer, and a local failure (the
/// disk) is an error, so the proposer hears nothing from us and carries on
/// with the others.
pub fn serve(
    blocks: &Blocks,
    me: NodeId,
    batch: pb::PaxosBatch,
) -> Result<pb::PaxosBatchReply, String> {
    let mut replies = vec![pb::PaxosReply::default(); batch.requests.len()];
    let mut addresses = Vec::new();
    let mut requests = Vec::new();
    for (i, decoded) in wire::requests_from_wire(batch.requests)
        .into_iter()
        .enumerate()
    {
        match decoded {
            Ok((address, request)) => {
                addresses.push(address);
                requests.push((i, Some(request)));
            }
            Err(e) => {
                replies[i] = wire::reply_to_wire(&Reply::Invalid {
                    reason: e.to_string(),
                });
            }
        }
    }
    // A learned chosen state may be lost in a crash: the acceptor then
    // holds the (synced) proposal it accepted, an earlier valid state, and
    // learns the choice again from the next request. Promises and accepted
    // proposals are synced before the reply.
    let durable = requests
        .iter()
        .any(|(_, r)| !matches!(r, Some(Request::Commit { .. })));
    let answered = blocks
        .store()
        .with_acceptors(&addresses, durable, |k, stored| {
            let (address, request) = (addresses[k], requests[k].1.take().expect("once"));
            let acceptor = match stored.map(pb::AcceptorState::decode) {
                None => Ok(Acceptor::default()),
                Some(Ok(state)) => wire::acceptor_from_wire(state).map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e.to_string()),
            };
            let mut acceptor = match acceptor {
                Ok(a) => a,
                Err(e) => {
                    debug!("stored state of {address} is unreadable: {e}");
                    return (None, None);
                }
            };
            let (reply, changed) = acceptor.handle(me, request, |current, next| {
                next.check_successor(current).map_err(|e| e.to_string())
            });
            let stored = changed.then(|| wire::acceptor_to_wire(&acceptor).encode_to_vec());
            (stored, Some(reply))
        })
        .map_err(|e| e.to_string())?;
    for ((i, _), reply) in requests.iter().zip(answered) {
        if let Some(reply) = reply {
            replies[*i] = wire::reply_to_wire(&reply);
        }
    }
    Ok(pb::PaxosBatchReply { replies })
}
