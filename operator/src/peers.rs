//! What the storage peers say about themselves: each serves `GET /status`
//! (see `shoal node run --status-listen`) with the membership as it sees
//! it (every peer's capacity and use) and the under-replicated blocks it
//! counts. Summed here into a StorageCluster's capacity, use and health.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// The port peers serve their status on.
pub const STATUS_PORT: u16 = 7701;
/// How long one peer may take to answer.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Deserialize)]
pub struct PeerStatus {
    pub members: Vec<Member>,
    /// `None` until the peer has made a repair pass.
    pub under_replicated_blocks: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    pub node_id: String,
    pub state: String,
    pub capacity: u64,
    pub used: u64,
}

/// The cluster as its peers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Bytes the live peers offer, and hold.
    pub capacity: u64,
    pub used: u64,
    /// Known only when every peer asked answered.
    pub under_replicated: Option<u64>,
}

/// Sums what `answers` say, out of `asked` peers. Capacity and use come
/// from the largest membership any peer reported (each peer gossips its
/// own figures to all); under-replicated blocks add up, since each block
/// has one repairing peer, which counts it.
pub fn summarise(answers: &[PeerStatus], asked: usize) -> Option<Reported> {
    let view = answers.iter().max_by_key(|s| s.members.len())?;
    let live = view.members.iter().filter(|m| m.state == "alive");
    let (capacity, used) = live.fold((0, 0), |(c, u), m| (c + m.capacity, u + m.used));
    Some(Reported {
        capacity,
        used,
        under_replicated: (answers.len() == asked)
            .then(|| answers.iter().map(|s| s.under_replicated_blocks).sum())
            .flatten(),
    })
}

/// Asks the peer at `ip` for its status.
pub async fn fetch(ip: &str) -> Result<PeerStatus, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let uri: hyper::Uri = format!("http://{host}:{STATUS_PORT}/status")
        .parse()
        .map_err(|e| format!("{ip}: {e}"))?;
    let response = tokio::time::timeout(TIMEOUT, client.get(uri))
        .await
        .map_err(|_| format!("{ip} did not answer within {TIMEOUT:?}"))?
        .map_err(|e| format!("{ip}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{ip}: HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| format!("{ip}: body not sent within {TIMEOUT:?}"))?
        .map_err(|e| format!("{ip}: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{ip}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(members: &[(&str, &str, u64, u64)], under: u64) -> PeerStatus {
        PeerStatus {
            members: members
                .iter()
                .map(|(id, state, capacity, used)| Member {
                    node_id: id.to_string(),
                    state: state.to_string(),
                    capacity: *capacity,
                    used: *used,
                })
                .collect(),
            under_replicated_blocks: Some(under),
        }
    }

    #[test]
    fn reports_add_up() {
        let full = [
            ("a", "alive", 100, 10),
            ("b", "alive", 100, 20),
            ("c", "dead", 100, 30),
        ];
        let answers = [peer(&full, 2), peer(&full[..2], 3)];
        assert_eq!(
            summarise(&answers, 2),
            Some(Reported {
                capacity: 200,
                used: 30,
                under_replicated: Some(5)
            })
        );
        // A peer that did not answer leaves the count unknown.
        assert_eq!(summarise(&answers, 3).unwrap().under_replicated, None);
        assert_eq!(summarise(&[], 3), None);
    }
}
