//! Membership as the status table shows it: a drained peer receives no new
//! blocks, and a killed peer is declared dead by the others.

use std::time::{Duration, Instant};

use shoal_e2e::{TestCluster, shoal, spread};
use shoal_proto::admin::{NodeState, PutBlockRequest, StatusRequest};

/// Waits (bounded) until every running peer reports `peer`'s state as `want`.
async fn wait_for_state(cluster: &TestCluster, peer: usize, want: NodeState, observers: &[usize]) {
    let addr = cluster.peers[peer].addr.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for &i in observers {
            let status = cluster.peers[i]
                .admin()
                .await
                .unwrap()
                .status(StatusRequest {})
                .await
                .unwrap();
            let state = status
                .into_inner()
                .members
                .into_iter()
                .find(|m| m.address == addr)
                .map(|m| m.state());
            all &= state == Some(want);
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "peer {peer} never became {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_peer_gets_no_new_blocks_and_can_return() -> anyhow::Result<()> {
    let cluster = TestCluster::start(&spread(4, 2), 2).await?;
    let drained = cluster.peers[3].dir.to_str().unwrap().to_string();
    assert!(
        shoal(&["node", "drain", "--dir", &drained])
            .status
            .success()
    );
    wait_for_state(&cluster, 3, NodeState::Draining, &[0, 1, 2, 3]).await;

    let mut admin = cluster.peers[0].admin().await?;
    for i in 0..40u32 {
        let data = format!("block {i} written while peer 4 drains").into_bytes();
        admin.put_block(PutBlockRequest { data }).await?;
    }
    // Give background replication time to land anywhere it would.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        cluster.local_blocks(3).await?.is_empty(),
        "a draining peer received blocks"
    );
    let held: usize = [0, 1, 2].len();
    let mut copies = 0;
    for i in 0..held {
        copies += cluster.local_blocks(i).await?.len();
    }
    assert_eq!(
        copies, 80,
        "40 blocks, two copies each, all on the other three peers"
    );

    assert!(
        shoal(&["node", "undrain", "--dir", &drained])
            .status
            .success()
    );
    wait_for_state(&cluster, 3, NodeState::Alive, &[0, 1, 2, 3]).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_is_declared_dead_by_the_others() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(&spread(3, 3), 3).await?;
    cluster.kill(2);
    wait_for_state(&cluster, 2, NodeState::Dead, &[0, 1]).await;
    Ok(())
}
