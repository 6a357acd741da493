//! Replicated immutable blocks: `put` writes a block to the replicas that
//! placement names, in parallel, and acknowledges once a write quorum holds
//! it durably (the others finish in the background); `get` reads from the
//! closest live replica, verifies the content against the address, and falls
//! back to the next replica on error or timeout. Both come in batched forms
//! that send one request per replica for many blocks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_core::mutable::{
    MutableError, PublicKey, Signature, WriterKey, verify_delete_owned, verify_release,
};
use shoal_core::placement::{Placement, Policy};
use shoal_core::{Address, NodeId, NodeInfo, NodeState, View, block};
use shoal_proto::peer::{
    BlockResult, DeleteOwned, DeleteOwnedReply, ErrorCode, GetBlocks, GetBlocksReply, HasBlocks,
    HasBlocksReply, PeerRequest, PeerResponse, PutBlocks, PutBlocksReply, ReleaseBlocks,
    block_result, peer_request, peer_response,
};
use tokio::sync::mpsc;
use tracing::debug;

use crate::gossip::Gossip;
use crate::store::{BlockStore, Claim, StoreError};
use crate::transport::Transport;

/// Why a block operation failed, as the caller should read it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} not found on any of its replicas")]
    NotFound(Address),
    #[error("block {address}: no replica could serve it ({})", .errors.join("; "))]
    Unavailable {
        address: Address,
        errors: Vec<String>,
    },
    #[error(
        "block {address} stored on {acks} of {replicas} replicas, {needed} needed ({})",
        .errors.join("; ")
    )]
    NoQuorum {
        address: Address,
        acks: usize,
        needed: usize,
        replicas: usize,
        errors: Vec<String>,
    },
    #[error(
        "only {available} nodes can take new blocks ({full} full, {unavailable} down or draining), a write needs {needed}"
    )]
    NotEnoughNodes {
        available: usize,
        needed: usize,
        full: usize,
        unavailable: usize,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Tuning of replicated block operations.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub policy: Policy,
    /// Replicas that must hold a block before a put is acknowledged.
    pub write_quorum: usize,
    /// How long one replica may take to answer a get before the next is
    /// asked.
    pub read_attempt_timeout: Duration,
    /// Keep a copy of every block this peer writes, beyond its R replicas
    /// (not counted for acknowledgement), and read from it first.
    pub local_copy: bool,
}

/// How long a signed delete request is good for (it may travel, and
/// clocks differ a little).
const DELETE_VALIDITY: Duration = Duration::from_secs(300);
/// Addresses one release request lists at most.
const RELEASE_BATCH: usize = 4096;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads spread beyond the R placed replicas by this many candidates, to find
/// blocks written while a node was down or fuller than now.
const EXTRA_READ_CANDIDATES: usize = 2;

type Trees = (Arc<View>, Arc<Placement>, Arc<Placement>);

/// The replicated block service of one peer: serves other peers' requests
/// and performs this peer's own puts and gets across the cluster.
#[derive(Debug)]
pub struct Blocks {
    me: NodeId,
    config: BlockConfig,
    store: Arc<BlockStore>,
    transport: Arc<Transport>,
    gossip: Gossip,
    trees: Mutex<Option<Trees>>,
    /// Nodes that failed a request recently: asked last until they answer
    /// again, so reads fail over at once instead of waiting for the failure
    /// detector to declare them dead.
    failed: Mutex<HashMap<NodeId, Instant>>,
}

/// How long a failed request demotes a node among read candidates.
const FAILURE_MEMORY: Duration = Duration::from_secs(15);

impl Blocks {
    pub fn new(
        me: NodeId,
        config: BlockConfig,
        store: Arc<BlockStore>,
        transport: Arc<Transport>,
        gossip: Gossip,
    ) -> Arc<Self> {
        Arc::new(Self {
            me,
            config,
            store,
            transport,
            gossip,
            trees: Mutex::new(None),
            failed: Mutex::new(HashMap::new()),
        })
    }

    /// This peer's node id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn config(&self) -> BlockConfig {
        self.config
    }

    pub fn view(&self) -> Arc<View> {
        self.gossip.view()
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    fn note_outcome(&self, node: NodeId, ok: bool) {
        let mut failed = self.failed.lock().expect("failure memory");
        if ok {
            failed.remove(&node);
        } else {
            failed.insert(node, Instant::now());
        }
    }

    fn recently_failed(&self) -> Vec<NodeId> {
        let mut failed = self.failed.lock().expect("failure memory");
        failed.retain(|_, at| at.elapsed() < FAILURE_MEMORY);
        failed.keys().copied().collect()
    }

    /// The write and read placement trees for the current view, rebuilt only
    /// when the view changes.
    fn trees(&self) -> Trees {
        let view = self.gossip.view();
        let mut cached = self.trees.lock().expect("placement cache");
        if let Some(trees) = cached.as_ref().filter(|t| Arc::ptr_eq(&t.0, &view)) {
            return trees.clone();
        }
        let fd = self.config.policy.failure_domain;
        let trees = (
            view.clone(),
            Arc::new(Placement::for_writes(&view, fd)),
            Arc::new(Placement::for_reads(&view, fd)),
        );
        *cached = Some(trees.clone());
        trees
    }

    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    /// The first `n` nodes for `address` over every known node, dead ones
    /// included: stable while nodes come and go.
    pub fn placement_for_reads(&self, address: &Address, n: usize) -> Vec<NodeId> {
        self.trees().2.place(address, n)
    }

    /// The first `n` nodes that accept new data for `address`.
    pub fn placement_for_writes(&self, address: &Address, n: usize) -> Vec<NodeId> {
        self.trees().1.place(address, n)
    }

    /// The nodes a new block goes to.
    pub fn replicas_for_write(&self, address: &Address, replicas: usize) -> Vec<NodeInfo> {
        let (view, writes, _) = self.trees();
        writes
            .place(address, replicas)
            .iter()
            .filter_map(|id| view.get(id).cloned())
            .collect()
    }

    /// The nodes to ask for a block, closest live one first.
    pub fn read_candidates(&self, address: &Address) -> Vec<NodeInfo> {
        let (view, writes, reads) = self.trees();
        let r = self.config.policy.replicas;
        let mut ids = writes.place(address, r);
        if self.config.local_copy && !ids.contains(&self.me) {
            ids.insert(0, self.me);
        }
        for id in reads.place(address, r + EXTRA_READ_CANDIDATES) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let me = view.get(&self.me);
        let failed = self.recently_failed();
        let mut nodes: Vec<(usize, NodeInfo)> = ids
            .iter()
            .filter_map(|id| view.get(id))
            .filter(|n| n.state != NodeState::Dead)
            .map(|n| {
                (
                    distance(me, n) + usize::from(failed.contains(&n.id)) * 20,
                    n.clone(),
                )
            })
            .collect();
        // Stable: equally close candidates keep placement order.
        nodes.sort_by_key(|(d, _)| *d);
        nodes.into_iter().map(|(_, n)| n).collect()
    }

    pub async fn put(self: &Arc<Self>, data: Bytes) -> Result<Address, BlockError> {
        self.put_owned(data, None, None).await
    }

    /// Stores a block on behalf of `owner` (see [`Blocks::delete_owned`]),
    /// on `replicas` replicas if not the cluster's number (acknowledged by
    /// a majority of them).
    pub async fn put_owned(
        self: &Arc<Self>,
        data: Bytes,
        owner: Option<PublicKey>,
        replicas: Option<usize>,
    ) -> Result<Address, BlockError> {
        self.put_many(vec![data], owner, replicas)
            .await
            .pop()
            .expect("one result per block")
    }

    /// Stores many blocks, one request per replica; each block is
    /// acknowledged on its own write quorum.
    pub async fn put_many(
        self: &Arc<Self>,
        blocks: Vec<Bytes>,
        owner: Option<PublicKey>,
        replicas: Option<usize>,
    ) -> Vec<Result<Address, BlockError>> {
        let needed = replicas.map_or(self.config.write_quorum, |r| r / 2 + 1);
        // Recorded with the owner's claim, so that repair keeps as many.
        let kept = replicas.map_or(0, |r| r as u32);
        let mut results: Vec<Option<Result<Address, BlockError>>> = vec![None; blocks.len()];
        let mut tallies: Vec<(Address, usize, usize, Vec<String>)> = Vec::new();
        let mut per_node: HashMap<NodeId, (NodeInfo, Vec<usize>)> = HashMap::new();
        // Blocks this peer keeps a local copy of on top of their replicas.
        let mut local_extra = Vec::new();
        for (i, data) in blocks.iter().enumerate() {
            let address = match block::check_new(data) {
                Ok(a) => a,
                Err(e) => {
                    results[i] = Some(Err(BlockError::Invalid(e.to_string())));
                    tallies.push((Address([0; 32]), 0, 0, Vec::new()));
                    continue;
                }
            };
            let replicas =
                self.replicas_for_write(&address, replicas.unwrap_or(self.config.policy.replicas));
            if replicas.len() < needed {
                let view = self.view();
                let full = view.reachable().filter(|n| n.free() == 0).count();
                results[i] = Some(Err(BlockError::NotEnoughNodes {
                    available: replicas.len(),
                    needed,
                    full,
                    unavailable: view.len()
                        - view
                            .reachable()
                            .filter(|n| n.state == NodeState::Alive)
                            .count(),
                }));
            }
            tallies.push((address, 0, replicas.len(), Vec::new()));
            if results[i].is_none() {
                if self.config.local_copy && !replicas.iter().any(|n| n.id == self.me) {
                    local_extra.push(i);
                }
                for node in replicas {
                    per_node
                        .entry(node.id)
                        .or_insert_with(|| (node, Vec::new()))
                        .1
                        .push(i);
                }
            }
        }

        let blocks = Arc::new(blocks);
        if let Some(me) = self.view().get(&self.me).cloned()
            && !local_extra.is_empty()
        {
            let (this, blocks) = (self.clone(), blocks.clone());
            tokio::spawn(async move {
                for result in this.put_on(&me, &blocks, &local_extra, owner, kept).await {
                    if let Err(e) = result {
                        debug!("local copy: {e}");
                    }
                }
            });
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, NodeId, Result<(), String>)>();
        for (_, (node, indices)) in per_node {
            let (this, blocks, tx) = (self.clone(), blocks.clone(), tx.clone());
            // Spawned, so replicas beyond the quorum complete in the
            // background after the caller has its answer.
            tokio::spawn(async move {
                let outcome = this.put_on(&node, &blocks, &indices, owner, kept).await;
                for (i, result) in indices.into_iter().zip(outcome) {
                    let _ = tx.send((i, node.id, result));
                }
            });
        }
        drop(tx);

        let mut open = results.iter().filter(|r| r.is_none()).count();
        while open > 0 {
            let Some((i, node, result)) = rx.recv().await else {
                break;
            };
            if results[i].is_some() {
                continue;
            }
            let (address, acks, replicas, errors) = &mut tallies[i];
            match result {
                Ok(()) => *acks += 1,
                Err(e) => errors.push(format!("{node}: {e}")),
            }
            if *acks >= needed {
                results[i] = Some(Ok(*address));
                open -= 1;
            } else if *replicas - errors.len() < needed {
                results[i] = Some(Err(BlockError::NoQuorum {
                    address: *address,
                    acks: *acks,
                    needed,
                    replicas: *replicas,
                    errors: std::mem::take(errors),
                }));
                open -= 1;
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every block decided"))
            .collect()
    }

    /// Stores the blocks at `indices` on one node, claimed by `owner` (who
    /// keeps `replicas` of them; 0: the cluster's number); one result per
    /// index.
    pub(crate) async fn put_on(
        &self,
        node: &NodeInfo,
        blocks: &[Bytes],
        indices: &[usize],
        owner: Option<PublicKey>,
        replicas: u32,
    ) -> Vec<Result<(), String>> {
        if node.id == self.me {
            let store = self.store.clone();
            let chosen: Vec<Bytes> = indices.iter().map(|&i| blocks[i].clone()).collect();
            let claim = owner.map(|o| Claim {
                owner: o.0,
                at_ms: now_ms(),
                replicas,
            });
            return tokio::task::spawn_blocking(move || {
                chosen
                    .iter()
                    .map(|b| {
                        store
                            .put_owned(b, claim)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            })
            .await
            .unwrap_or_else(|e| vec![Err(e.to_string()); indices.len()]);
        }
        let request = PeerRequest {
            kind: Some(peer_request::Kind::PutBlocks(PutBlocks {
                blocks: indices.iter().map(|&i| blocks[i].clone()).collect(),
                owner: owner.map(|o| o.0.to_vec()).unwrap_or_default(),
                replicas,
            })),
        };
        let reply = self.transport.request(node.addr, &request).await;
        self.note_outcome(node.id, reply.is_ok());
        match reply {
            Ok(PeerResponse {
                kind: Some(peer_response::Kind::PutBlocks(reply)),
            }) if reply.results.len() == indices.len() => reply
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(block_result::Result::Error(e)) => Err(e.message),
                    _ => Ok(()),
                })
                .collect(),
            Ok(other) => vec![Err(unexpected(&other)); indices.len()],
            Err(e) => vec![Err(e.to_string()); indices.len()],
        }
    }

    pub async fn get(&self, address: Address) -> Result<Bytes, BlockError> {
        self.get_many(&[address])
            .await
            .pop()
            .expect("one result per address")
    }

    /// Fetches many blocks: each round sends one request per node for the
    /// blocks whose current candidate it is; misses move to the next
    /// candidate.
    pub async fn get_many(&self, addresses: &[Address]) -> Vec<Result<Bytes, BlockError>> {
        struct Pending {
            candidates: Vec<NodeInfo>,
            next: usize,
            errors: Vec<String>,
            all_not_found: bool,
        }
        let mut results: Vec<Option<Result<Bytes, BlockError>>> = vec![None; addresses.len()];
        let mut pending: Vec<Pending> = addresses
            .iter()
            .map(|a| Pending {
                candidates: self.read_candidates(a),
                next: 0,
                errors: Vec::new(),
                all_not_found: true,
            })
            .collect();
        loop {
            let mut round: HashMap<NodeId, (NodeInfo, Vec<usize>)> = HashMap::new();
            for (i, p) in pending.iter().enumerate() {
                if results[i].is_some() {
                    continue;
                }
                if let Some(node) = p.candidates.get(p.next) {
                    round
                        .entry(node.id)
                        .or_insert_with(|| (node.clone(), Vec::new()))
                        .1
                        .push(i);
                }
            }
            if round.is_empty() {
                break;
            }
            let fetches = round.into_values().map(|(node, indices)| async move {
                let wanted: Vec<Address> = indices.iter().map(|&i| addresses[i]).collect();
                let outcome = self.get_from(&node, &wanted).await;
                (node, indices, outcome)
            });
            for (node, indices, outcome) in futures::future::join_all(fetches).await {
                for (i, result) in indices.into_iter().zip(outcome) {
                    let p = &mut pending[i];
                    p.next += 1;
                    match result {
                        Ok(data) => results[i] = Some(Ok(data)),
                        Err(Miss::NotFound) => p.errors.push(format!("{}: not found", node.id)),
                        Err(Miss::Failed(e)) => {
                            p.all_not_found = false;
                            p.errors.push(format!("{}: {e}", node.id));
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(pending)
            .zip(addresses)
            .map(|((r, p), &address)| {
                r.unwrap_or_else(|| {
                    Err(if p.all_not_found {
                        BlockError::NotFound(address)
                    } else {
                        BlockError::Unavailable {
                            address,
                            errors: p.errors,
                        }
                    })
                })
            })
            .collect()
    }

    /// Asks one node for blocks; every answer is verified here, whatever
    /// the node claims.
    async fn get_from(&self, node: &NodeInfo, addresses: &[Address]) -> Vec<Result<Bytes, Miss>> {
        if node.id == self.me {
            let store = self.store.clone();
            let wanted = addresses.to_vec();
            return tokio::task::spawn_blocking(move || {
                wanted
                    .iter()
                    .map(|a| match store.get(a) {
                        Ok(Some(data)) => Ok(Bytes::from(data)),
                        Ok(None) => Err(Miss::NotFound),
                        Err(e) => Err(Miss::Failed(e.to_string())),
                    })
                    .collect()
            })
            .await
            .unwrap_or_else(|e| vec![Err(Miss::Failed(e.to_string())); addresses.len()]);
        }
        let request = PeerRequest {
            kind: Some(peer_request::Kind::GetBlocks(GetBlocks {
                addresses: addresses.iter().map(|a| a.0.to_vec()).collect(),
            })),
        };
        let timeout = self.config.read_attempt_timeout;
        let reply = match tokio::time::timeout(timeout, self.transport.request(node.addr, &request))
            .await
        {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(PeerResponse {
                kind: Some(peer_response::Kind::GetBlocks(reply)),
            })) if reply.results.len() == addresses.len() => Ok(reply),
            Ok(Ok(other)) => Err(unexpected(&other)),
        };
        self.note_outcome(node.id, reply.is_ok());
        match reply {
            Err(e) => vec![Err(Miss::Failed(e)); addresses.len()],
            Ok(reply) => reply
                .results
                .into_iter()
                .zip(addresses)
                .map(|(r, address)| match r.result {
                    Some(block_result::Result::Data(data)) => match block::verify(address, &data) {
                        Ok(()) => Ok(data),
                        Err(e) => Err(Miss::Failed(format!("served a forged block: {e}"))),
                    },
                    Some(block_result::Result::Error(e)) if e.code() == ErrorCode::NotFound => {
                        Err(Miss::NotFound)
                    }
                    Some(block_result::Result::Error(e)) => Err(Miss::Failed(e.message)),
                    None => Err(Miss::Failed("empty answer".into())),
                })
                .collect(),
        }
    }

    /// Serves a put from another peer.
    pub(crate) fn serve_put(&self, request: PutBlocks) -> PutBlocksReply {
        let owner: Option<[u8; 32]> = request.owner.as_slice().try_into().ok();
        if owner.is_none() && !request.owner.is_empty() {
            let e = error_result(ErrorCode::Unspecified, "owner must be 32 bytes".into());
            return PutBlocksReply {
                results: vec![e; request.blocks.len()],
            };
        }
        let claim = owner.map(|owner| Claim {
            owner,
            at_ms: now_ms(),
            replicas: request.replicas,
        });
        let results = request
            .blocks
            .iter()
            .map(|data| match self.store.put_owned(data, claim) {
                Ok(_) => BlockResult { result: None },
                Err(e) => error_result(store_error_code(&e), e.to_string()),
            })
            .collect();
        PutBlocksReply { results }
    }

    /// Serves a question from another peer: which of these blocks are here.
    pub(crate) fn serve_has(&self, request: HasBlocks) -> Result<HasBlocksReply, String> {
        let present = request
            .addresses
            .iter()
            .map(|a| {
                let address = Address::from_slice(a).map_err(|e| e.to_string())?;
                self.store.contains(&address).map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(HasBlocksReply { present })
    }

    /// Which of `addresses` `node` holds.
    pub(crate) async fn has_on(
        &self,
        node: &NodeInfo,
        addresses: &[Address],
    ) -> Result<Vec<bool>, String> {
        let request = PeerRequest {
            kind: Some(peer_request::Kind::HasBlocks(HasBlocks {
                addresses: addresses.iter().map(|a| a.0.to_vec()).collect(),
            })),
        };
        match self.transport.request(node.addr, &request).await {
            Ok(PeerResponse {
                kind: Some(peer_response::Kind::HasBlocks(reply)),
            }) if reply.present.len() == addresses.len() => Ok(reply.present),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Asks every live peer to drop `owner`'s claims on its blocks (signed
    /// by the owner; see [`shoal_core::mutable::verify_delete_owned`]);
    /// returns the blocks and bytes freed by those that answered.
    pub async fn delete_owned(&self, owner: &WriterKey) -> (u64, u64) {
        self.release_on_all(owner, None).await
    }

    /// Asks every live peer to drop `owner`'s claims on `addresses` (a
    /// volume's chunks no file refers to any more); returns the blocks and
    /// bytes freed by those that answered. Every peer is asked, not only
    /// the block's placement: a copy may sit elsewhere since a move.
    pub async fn release_owned(&self, owner: &WriterKey, addresses: &[Address]) -> (u64, u64) {
        let mut freed = (0, 0);
        for batch in addresses.chunks(RELEASE_BATCH) {
            let (b, n) = self.release_on_all(owner, Some(batch)).await;
            freed = (freed.0 + b, freed.1 + n);
        }
        freed
    }

    /// One signed request to every live peer: drop `owner`'s claims on
    /// `only` those blocks, or on all it claims.
    async fn release_on_all(&self, owner: &WriterKey, only: Option<&[Address]>) -> (u64, u64) {
        let issued_ms = now_ms();
        let public = owner.public();
        let kind = match only {
            None => peer_request::Kind::DeleteOwned(DeleteOwned {
                owner: public.0.to_vec(),
                issued_ms,
                signature: owner.sign_delete_owned(issued_ms).0.to_vec(),
            }),
            Some(addresses) => peer_request::Kind::ReleaseBlocks(ReleaseBlocks {
                owner: public.0.to_vec(),
                issued_ms,
                addresses: addresses.iter().map(|a| a.0.to_vec()).collect(),
                signature: owner.sign_release(issued_ms, addresses).0.to_vec(),
            }),
        };
        let request = PeerRequest { kind: Some(kind) };
        let view = self.view();
        let asked = view.reachable().map(|node| {
            let request = request.clone();
            async move {
                if node.id == self.me {
                    let store = self.store.clone();
                    let only = only.map(<[Address]>::to_vec);
                    return tokio::task::spawn_blocking(move || match only {
                        None => store.delete_owned(&public.0, issued_ms),
                        Some(addresses) => store.release(&public.0, issued_ms, &addresses),
                    })
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                }
                match self.transport.request(node.addr, &request).await {
                    Ok(PeerResponse {
                        kind:
                            Some(
                                peer_response::Kind::DeleteOwned(r)
                                | peer_response::Kind::ReleaseBlocks(r),
                            ),
                    }) => (r.blocks, r.bytes),
                    _ => (0, 0),
                }
            }
        });
        futures::future::join_all(asked)
            .await
            .into_iter()
            .fold((0, 0), |(b, n), (b2, n2)| (b + b2, n + n2))
    }

    /// Serves a signed request to drop an owner's block claims.
    pub(crate) fn serve_delete_owned(
        &self,
        request: DeleteOwned,
    ) -> Result<DeleteOwnedReply, String> {
        let owner = signed_by(
            &request.owner,
            &request.signature,
            request.issued_ms,
            |owner, signature| verify_delete_owned(owner, request.issued_ms, signature),
        )?;
        let (blocks, bytes) = self
            .store
            .delete_owned(&owner, request.issued_ms)
            .map_err(|e| e.to_string())?;
        Ok(DeleteOwnedReply { blocks, bytes })
    }

    /// Serves a signed request to drop an owner's claims on listed blocks.
    pub(crate) fn serve_release(&self, request: ReleaseBlocks) -> Result<DeleteOwnedReply, String> {
        if request.addresses.len() > RELEASE_BATCH {
            return Err(format!(
                "release refused: {} addresses, at most {RELEASE_BATCH} a request",
                request.addresses.len()
            ));
        }
        let addresses = request
            .addresses
            .iter()
            .map(|a| Address::from_slice(a).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let owner = signed_by(
            &request.owner,
            &request.signature,
            request.issued_ms,
            |owner, signature| verify_release(owner, request.issued_ms, &addresses, signature),
        )?;
        let (blocks, bytes) = self
            .store
            .release(&owner, request.issued_ms, &addresses)
            .map_err(|e| e.to_string())?;
        Ok(DeleteOwnedReply { blocks, bytes })
    }

    /// Serves a get from another peer.
    pub(crate) fn serve_get(&self, request: GetBlocks) -> GetBlocksReply {
        let results = request
            .addresses
            .iter()
            .map(|raw| {
                let address = match Address::from_slice(raw) {
                    Ok(a) => a,
                    Err(e) => return error_result(ErrorCode::Invalid, e.to_string()),
                };
                match self.store.get(&address) {
                    Ok(Some(data)) => BlockResult {
                        result: Some(block_result::Result::Data(Bytes::from(data))),
                    },
                    Ok(None) => {
                        error_result(ErrorCode::NotFound, format!("block {address} not found"))
                    }
                    Err(e) => error_result(store_error_code(&e), e.to_string()),
                }
            })
            .collect();
        GetBlocksReply { results }
    }
}

#[derive(Debug, Clone)]
enum Miss {
    NotFound,
    Failed(String),
}

/// Topological distance from this node: itself, its rack, its zone, others.
fn distance(me: Option<&NodeInfo>, other: &NodeInfo) -> usize {
    let suspect = usize::from(other.state == NodeState::Suspect) * 10;
    suspect
        + match me {
            Some(me) if me.id == other.id => 0,
            Some(me) if me.zone == other.zone && me.rack == other.rack => 1,
            Some(me) if me.zone == other.zone => 2,
            _ => 3,
        }
}

/// The owner of a signed, recent request to drop claims, once `verify`
/// accepts its signature.
fn signed_by(
    owner: &[u8],
    signature: &[u8],
    issued_ms: u64,
    verify: impl FnOnce(&PublicKey, &Signature) -> Result<(), MutableError>,
) -> Result<[u8; 32], String> {
    let owner: [u8; 32] = owner
        .try_into()
        .map_err(|_| "owner must be 32 bytes".to_string())?;
    let signature: [u8; 64] = signature
        .try_into()
        .map_err(|_| "signature must be 64 bytes".to_string())?;
    verify(&PublicKey(owner), &Signature(signature)).map_err(|e| format!("delete refused: {e}"))?;
    let age = now_ms().abs_diff(issued_ms);
    if age > DELETE_VALIDITY.as_millis() as u64 {
        return Err(format!("delete refused: issued {age} ms away from now"));
    }
    Ok(owner)
}

fn unexpected(response: &PeerResponse) -> String {
    match &response.kind {
        Some(peer_response::Kind::Error(e)) => e.message.clone(),
        _ => "unexpected answer".to_string(),
    }
}

fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::NoSpace { .. } | StoreError::DiskFull(_) => ErrorCode::NoSpace,
        StoreError::Corrupt(_) => ErrorCode::Corrupt,
        StoreError::Block(_) => ErrorCode::Invalid,
        StoreError::Db(_) => ErrorCode::Internal,
    }
}

fn error_result(code: ErrorCode, message: String) -> BlockResult {
    BlockResult {
        result: Some(block_result::Result::Error(shoal_proto::peer::Error {
            code: code.into(),
            message,
        })),
    }
}

/// A whole-request error answer.
pub fn error_response(code: ErrorCode, message: String) -> PeerResponse {
    PeerResponse {
        kind: Some(peer_response::Kind::Error(shoal_proto::peer::Error {
            code: code.into(),
            message,
        })),
    }
}
