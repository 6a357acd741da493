//! A peer's status over HTTP (`shoal node run --status-listen ADDR`,
//! `GET /status`): the membership as this peer sees it (with each peer's
//! capacity and use) and how many of the blocks it repairs its last
//! repair pass left short of their replicas. The operator reads it to report a StorageCluster's
//! capacity, use and health. Read-only JSON; nothing here changes state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use shoal_core::NodeId;
use tracing::info;

use crate::blocks::Blocks;
use crate::repair::LastPass;

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub replication: usize,
    pub failure_domain: String,
    pub members: Vec<MemberStatus>,
    /// Blocks short of their replicas after this peer's last repair pass,
    /// among those it repairs (each block has one repairing peer, so the
    /// sum over peers counts each once); `None` before the first pass.
    pub under_replicated_blocks: Option<u64>,
    /// Blocks that pass looked at.
    pub checked_blocks: Option<u64>,
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

fn status(blocks: &Blocks, me: NodeId, last: &LastPass) -> PeerStatus {
    let counts = last.counts();
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
        under_replicated_blocks: counts.map(|(_, under)| under),
        checked_blocks: counts.map(|(checked, _)| checked),
    }
}

/// Serves `GET /status` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    blocks: Arc<Blocks>,
    me: NodeId,
    last: Arc<LastPass>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for status on {addr}: {e}"))?;
    info!(addr = %listener.local_addr()?, "serving status");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (blocks, last) = (blocks.clone(), last.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let response = if req.method() == Method::GET && req.uri().path() == "/status" {
                        let body = serde_json::to_vec(&status(&blocks, me, &last))
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
