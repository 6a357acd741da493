//! Re-replication. Now and then each peer walks the blocks it holds and
//! makes sure each is on its home replicas: the first R nodes placement
//! picks for it under the current membership and policy, where R is what
//! the block's owners keep (else the cluster's replication). A replica that
//! lacks the block gets a copy, with its owners' claims. So a block that
//! lost a replica (a dead peer, a new replication factor or failure domain,
//! a peer that joined) gets back to R copies without anyone asking.
//!
//! One holder does the work for each block: its first home replica, or any
//! holder outside the home set (a copy left where placement used to put
//! it). Holders ask before they copy, so a settled cluster costs one small
//! request per peer and page.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use shoal_core::mutable::PublicKey;
use shoal_core::{Address, NodeId, NodeInfo};
use tracing::{debug, info, warn};

use crate::blocks::Blocks;

/// Blocks examined per step.
const PAGE: usize = 256;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RepairStats {
    pub checked: u64,
    pub copied: u64,
    pub failed: u64,
    /// Blocks this peer repairs that were still short of their replicas
    /// when it was done: too few peers to place them on, or copies that
    /// failed.
    pub under_replicated: u64,
}

/// The last pass's counts, for the status endpoint (`None` before the
/// first pass).
#[derive(Debug, Default)]
pub struct LastPass {
    passes: AtomicU64,
    checked: AtomicU64,
    under_replicated: AtomicU64,
}

impl LastPass {
    fn record(&self, stats: &RepairStats) {
        self.checked.store(stats.checked, Ordering::Relaxed);
        self.under_replicated
            .store(stats.under_replicated, Ordering::Relaxed);
        self.passes.fetch_add(1, Ordering::Release);
    }

    /// (blocks checked, blocks under-replicated) of the last pass.
    pub fn counts(&self) -> Option<(u64, u64)> {
        (self.passes.load(Ordering::Acquire) > 0).then(|| {
            (
                self.checked.load(Ordering::Relaxed),
                self.under_replicated.load(Ordering::Relaxed),
            )
        })
    }
}

/// Whether this peer (`me`) repairs a block whose home replicas are `home`.
pub fn repairs(me: NodeId, home: &[NodeId]) -> bool {
    home.first() == Some(&me) || !home.contains(&me)
}

/// Runs a pass every `interval` until the task is dropped, recording each
/// in `last`.
pub async fn run(blocks: Arc<Blocks>, interval: Duration, last: Arc<LastPass>) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let stats = pass(&blocks).await;
        last.record(&stats);
        if stats.copied > 0 || stats.failed > 0 {
            info!(?stats, "repair pass");
        } else {
            debug!(?stats, "repair pass");
        }
    }
}

/// One walk over every block this peer holds.
pub async fn pass(blocks: &Arc<Blocks>) -> RepairStats {
    let mut stats = RepairStats::default();
    let mut after: Option<Address> = None;
    // Bounded: at most a million pages.
    for _ in 0..1_000_000 {
        let store = blocks.store().clone();
        let start = after;
        let page = match tokio::task::spawn_blocking(move || store.list(start.as_ref(), PAGE)).await
        {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                warn!("repair: cannot list blocks: {e}");
                break;
            }
            Err(e) => {
                warn!("repair: {e}");
                break;
            }
        };
        step(blocks, &page, &mut stats).await;
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(*last),
            _ => break,
        }
    }
    stats
}

/// Repairs one page of blocks.
async fn step(blocks: &Arc<Blocks>, page: &[Address], stats: &mut RepairStats) {
    let me = blocks.me();
    let default = blocks.config().policy.replicas;
    let mut wanted: HashMap<NodeId, (NodeInfo, Vec<Address>)> = HashMap::new();
    let mut short: HashSet<Address> = HashSet::new();
    for address in page {
        stats.checked += 1;
        let claims = blocks.store().claims(address).unwrap_or_default();
        let replicas = claims
            .iter()
            .map(|&(_, r)| r as usize)
            .max()
            .filter(|&r| r > 0)
            .unwrap_or(default);
        let home = blocks.replicas_for_write(address, replicas);
        let ids: Vec<NodeId> = home.iter().map(|n| n.id).collect();
        if !repairs(me, &ids) {
            continue;
        }
        // Too few peers take writes to hold every copy.
        if home.len() < replicas {
            short.insert(*address);
        }
        for node in home.into_iter().filter(|n| n.id != me) {
            wanted
                .entry(node.id)
                .or_insert_with(|| (node, Vec::new()))
                .1
                .push(*address);
        }
    }
    for (_, (node, addresses)) in wanted {
        let missing: Vec<Address> = match blocks.has_on(&node, &addresses).await {
            Ok(present) => addresses
                .into_iter()
                .zip(present)
                .filter(|(_, here)| !here)
                .map(|(a, _)| a)
                .collect(),
            Err(e) => {
                debug!(node = %node.id, "repair: cannot ask: {e}");
                stats.failed += addresses.len() as u64;
                short.extend(addresses);
                continue;
            }
        };
        for address in missing {
            match copy(blocks, &node, &address).await {
                Ok(()) => stats.copied += 1,
                Err(e) => {
                    debug!(node = %node.id, %address, "repair: {e}");
                    stats.failed += 1;
                    short.insert(address);
                }
            }
        }
    }
    stats.under_replicated += short.len() as u64;
}

/// Copies one block to `node` with every owner's claim.
async fn copy(blocks: &Arc<Blocks>, node: &NodeInfo, address: &Address) -> Result<(), String> {
    let store = blocks.store().clone();
    let a = *address;
    let (data, claims) = tokio::task::spawn_blocking(move || {
        let data = store.get(&a).map_err(|e| e.to_string())?;
        let claims = store.claims(&a).map_err(|e| e.to_string())?;
        Ok::<_, String>((data, claims))
    })
    .await
    .map_err(|e| e.to_string())??;
    // Deleted meanwhile: nothing to restore.
    let Some(data) = data else {
        return Ok(());
    };
    let data = [Bytes::from(data)];
    let owners: Vec<(Option<PublicKey>, u32)> = if claims.is_empty() {
        vec![(None, 0)]
    } else {
        claims
            .into_iter()
            .map(|(owner, replicas)| (Some(PublicKey(owner)), replicas))
            .collect()
    };
    for (owner, replicas) in owners {
        if let Some(Err(e)) = blocks
            .put_on(node, &data, &[0], owner, replicas)
            .await
            .pop()
        {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_repairs_each_block() {
        let ids: Vec<NodeId> = (0..5u8).map(|i| NodeId([i; 16])).collect();
        let home = &ids[..3];
        let repairers: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|me| home.contains(me) && repairs(*me, home))
            .collect();
        assert_eq!(
            repairers,
            [ids[0]],
            "the first home replica, not the others"
        );
        // A holder outside the home set (a stale copy) repairs too.
        assert!(repairs(ids[4], home));
        assert!(!repairs(ids[1], home));
    }
}
