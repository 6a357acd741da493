//! Only holders of a certificate from this cluster's CA get past the QUIC
//! handshake: a client or a peer from another CA is refused.

use std::time::Duration;

use shoal_e2e::{TestCluster, shoal_bin, spread};
use shoal_node::identity::{NodeIdentity, init_ca};
use shoal_node::transport::{Timeouts, Transport, TransportError};
use shoal_proto::admin::StatusRequest;
use shoal_proto::peer::{GetBlocks, PeerRequest, peer_request, peer_response};

fn get_request() -> PeerRequest {
    PeerRequest {
        kind: Some(peer_request::Kind::GetBlocks(GetBlocks {
            addresses: vec![vec![7u8; 32]],
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_from_another_ca_is_refused_and_one_from_ours_is_served() -> anyhow::Result<()> {
    let cluster = TestCluster::start(&spread(1, 1), 1).await?;
    let addr = cluster.peers[0].addr.parse()?;
    let scratch = tempfile::tempdir()?;
    let timeouts = Timeouts {
        connect: Duration::from_secs(3),
        request: Duration::from_secs(5),
    };

    // Control: a client certificate from the cluster's own CA is served.
    let ours_dir = scratch.path().join("ours");
    std::fs::create_dir_all(&ours_dir)?;
    let ours = NodeIdentity::load_or_issue(&ours_dir, cluster.root())?;
    let reply = Transport::client(&ours, timeouts)?
        .request(addr, &get_request())
        .await?;
    assert!(matches!(
        reply.kind,
        Some(peer_response::Kind::GetBlocks(_))
    ));

    // The same request with a certificate from another CA never gets in.
    let other_ca = scratch.path().join("other-ca");
    init_ca(&other_ca)?;
    let theirs_dir = scratch.path().join("theirs");
    std::fs::create_dir_all(&theirs_dir)?;
    let theirs = NodeIdentity::load_or_issue(&theirs_dir, &other_ca)?;
    let refused = Transport::client(&theirs, timeouts)?
        .request(addr, &get_request())
        .await;
    match refused {
        Err(TransportError::Connect { reason, .. })
        | Err(TransportError::Stream { reason, .. }) => {
            assert!(!reason.is_empty())
        }
        other => panic!("a foreign client got through: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_ca_cannot_join() -> anyhow::Result<()> {
    let cluster = TestCluster::start(&spread(1, 1), 1).await?;
    let scratch = tempfile::tempdir()?;
    let other_ca = scratch.path().join("other-ca");
    init_ca(&other_ca)?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(shoal_bin())
            .args(["node", "run", "--listen", "127.0.0.1:0", "--replicas", "1"])
            .arg("--dir")
            .arg(scratch.path().join("intruder"))
            .arg("--ca")
            .arg(&other_ca)
            .args(["--join", &cluster.peers[0].addr])
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot join the cluster"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let status = cluster.peers[0]
        .admin()
        .await?
        .status(StatusRequest {})
        .await?
        .into_inner();
    assert_eq!(
        status.members.len(),
        1,
        "the intruder must not appear in membership"
    );
    Ok(())
}
