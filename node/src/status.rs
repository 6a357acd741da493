//! A peer's status over HTTP (`shoal node run --status-listen ADDR`,
//! `GET /status`): the membership as this peer sees it (with each peer's
//! capacity and use) and how many blocks this peer counts as
//! under-replicated. The operator reads it to report a StorageCluster's
//! capacity, use and health. Read-only JSON; nothing here changes state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use shoal_core::{NodeId, NodeState};
use tracing::warn;

use crate::blocks::Blocks;

/// How often a peer recounts its under-replicated blocks.
const RECOUNT: Duration = Duration::from_secs(60);
/// Addresses read from the store at a time while counting.
const PAGE: usize = 10_000;

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub replication: usize,
    pub failure_domain: String,
    pub members: Vec<MemberStatus>,
    /// Blocks whose home replicas (the first R in placement order, dead
    /// peers included) are not all alive, counted by the first live one
    /// of them, so that summing over peers counts each block once.
    pub under_replicated_blocks: u64,
    /// Blocks this peer looked at in its last count.
    pub checked_blocks: u64,
}

#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub node_id: String,
    pub zone: String,
    pub rack: String,
    pub state: String,
    pub capacity: u64,
    pub used: u64,
}

/// The last count of under-replicated blocks.
#[derive(Debug, Default)]
struct Counts {
    under: AtomicU64,
    checked: AtomicU64,
}

/// Whether this peer (`me`) counts the block whose home replicas are
/// `home`: some of them are not alive, and `me` is the first live one.
pub fn counts_as_under_replicated(
    home: &[NodeId],
    replicas: usize,
    alive: impl Fn(&NodeId) -> bool,
    me: NodeId,
) -> bool {
    let live: Vec<&NodeId> = home.iter().filter(|n| alive(n)).collect();
    (home.len() < replicas || live.len() < home.len()) && live.first() == Some(&&me)
}

fn count(blocks: &Blocks, me: NodeId) -> (u64, u64) {
    let view = blocks.view();
    let replicas = blocks.config().policy.replicas;
    let alive = |n: &NodeId| view.get(n).is_some_and(|i| i.state == NodeState::Alive);
    let (mut under, mut checked) = (0, 0);
    let mut after = None;
    // Bounded: at most a million pages of PAGE addresses.
    for _ in 0..1_000_000 {
        let page = match blocks.store().list(after.as_ref(), PAGE) {
            Ok(page) => page,
            Err(e) => {
                warn!("counting under-replicated blocks: {e}");
                break;
            }
        };
        for address in &page {
            checked += 1;
            let home = blocks.placement_for_reads(address, replicas);
            if counts_as_under_replicated(&home, replicas, alive, me) {
                under += 1;
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(*last),
            _ => break,
        }
    }
    (under, checked)
}

fn status(blocks: &Blocks, me: NodeId, counts: &Counts) -> PeerStatus {
    let view = blocks.view();
    let policy = blocks.config().policy;
    PeerStatus {
        node_id: me.to_string(),
        replication: policy.replicas,
        failure_domain: policy.failure_domain.to_string(),
        members: view
            .nodes()
            .iter()
            .map(|n| MemberStatus {
                node_id: n.id.to_string(),
                zone: n.zone.clone(),
                rack: n.rack.clone(),
                state: format!("{:?}", n.state).to_lowercase(),
                capacity: n.capacity,
                used: n.used,
            })
            .collect(),
        under_replicated_blocks: counts.under.load(Ordering::Relaxed),
        checked_blocks: counts.checked.load(Ordering::Relaxed),
    }
}

/// Serves `GET /status` on `addr` until the task is dropped, recounting
/// under-replicated blocks in the background.
pub async fn serve(addr: SocketAddr, blocks: Arc<Blocks>, me: NodeId) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for status on {addr}: {e}"))?;
    let counts = Arc::new(Counts::default());
    {
        let (blocks, counts) = (blocks.clone(), counts.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RECOUNT);
            loop {
                tick.tick().await;
                let b = blocks.clone();
                if let Ok((under, checked)) =
                    tokio::task::spawn_blocking(move || count(&b, me)).await
                {
                    counts.under.store(under, Ordering::Relaxed);
                    counts.checked.store(checked, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (blocks, counts) = (blocks.clone(), counts.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let response = if req.method() == Method::GET && req.uri().path() == "/status" {
                        let body = serde_json::to_vec(&status(&blocks, me, &counts))
                            .expect("status serialises");
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"GET /status\n")))
                    };
                    async move { Ok::<_, Infallible>(response.expect("a valid response")) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_under_replicated_block_is_counted_once() {
        let ids: Vec<NodeId> = (0..4u8).map(|i| NodeId([i; 16])).collect();
        let home = [ids[0], ids[1], ids[2]];
        let dead = ids[1];
        let alive = |n: &NodeId| *n != dead;
        let counters: Vec<&NodeId> = ids
            .iter()
            .filter(|me| counts_as_under_replicated(&home, 3, alive, **me))
            .collect();
        assert_eq!(counters, [&ids[0]]);
        // All home replicas alive: nobody counts it.
        assert!(
            !ids.iter()
                .any(|me| counts_as_under_replicated(&home, 3, |_| true, *me))
        );
        // Fewer nodes than replicas: under-replicated even if all are alive.
        assert!(counts_as_under_replicated(&home[..2], 3, |_| true, ids[0]));
    }
}
