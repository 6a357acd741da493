//! Mutable blocks on real peer processes: signed compare-and-set through any
//! peer, refusals of forged, unauthorised and replayed versions, concurrent
//! writers that lose no acknowledged write while a replica dies, and
//! acceptor state that survives SIGKILL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_core::mutable::{MutableBlock, WriterKey};
use shoal_e2e::{Put, TestCluster, counter, get_mutable, put_mutable, spread};
use shoal_node::identity::NodeIdentity;
use shoal_node::transport::{Timeouts, Transport};
use shoal_node::{admin, wire};
use shoal_proto::admin::{GetMutableRequest, LocateBlockRequest};
use shoal_proto::peer::{self as pb, PeerRequest, paxos_reply, peer_request, peer_response};
use tonic::Code;

async fn put(dir: &Path, block: &MutableBlock) -> Result<Put, tonic::Status> {
    let mut client = admin::connect(dir)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    put_mutable(&mut client, block).await
}

async fn get(dir: &Path, block: &MutableBlock) -> Result<MutableBlock, tonic::Status> {
    let mut client = admin::connect(dir)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    get_mutable(&mut client, &block.address).await
}

/// A Paxos Accept as a rogue proposer would send it: the highest ballot,
/// any base, any entry.
fn accept(
    address: &shoal_core::Address,
    base: pb::ChosenState,
    entry: pb::MutableBlock,
) -> PeerRequest {
    PeerRequest {
        kind: Some(peer_request::Kind::Paxos(pb::PaxosBatch {
            requests: vec![pb::PaxosRequest {
                address: address.0.to_vec(),
                kind: Some(pb::paxos_request::Kind::Accept(pb::Accept {
                    ballot: Some(pb::Ballot {
                        round: u64::MAX,
                        node: vec![0xEE; 16],
                    }),
                    base: Some(base),
                    entry: Some(pb::LogEntry {
                        kind: Some(pb::log_entry::Kind::Write(entry)),
                    }),
                })),
            }],
        })),
    }
}

/// The one reply to a batch of one Paxos request.
fn only_reply(response: shoal_proto::peer::PeerResponse) -> Option<pb::paxos_reply::Kind> {
    match response.kind {
        Some(peer_response::Kind::Paxos(mut batch)) if batch.replies.len() == 1 => {
            batch.replies.pop().and_then(|r| r.kind)
        }
        _ => None,
    }
}

/// The peers (indexes) of a block's first quorum: its replicas by placement.
async fn quorum_of(cluster: &TestCluster, block: &MutableBlock) -> anyhow::Result<Vec<usize>> {
    let located = cluster.peers[0]
        .admin()
        .await?
        .locate_block(LocateBlockRequest {
            address: block.address.to_string(),
        })
        .await?
        .into_inner();
    Ok(located
        .replicas
        .iter()
        .filter_map(|m| cluster.peers.iter().position(|p| p.addr == m.address))
        .collect())
}

fn key(n: u8) -> WriterKey {
    WriterKey::from_secret([n; 32])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_through_any_peer_and_refusals() -> anyhow::Result<()> {
    let cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let (owner, writer, stranger) = (key(1), key(2), key(3));
    let v1 = owner.create([7; 16], vec![writer.public()], b"one".to_vec());
    assert!(matches!(put(&cluster.peers[0].dir, &v1).await?, Put::Written(b) if *b == v1));
    for peer in 0..3 {
        assert_eq!(
            get(&cluster.peers[peer].dir, &v1).await?,
            v1,
            "read through peer {peer}"
        );
    }

    // A permitted writer's compare-and-set lands; a stale one conflicts and
    // is told the current version.
    let v2 = writer.write_after(&v1, b"two".to_vec());
    assert!(matches!(
        put(&cluster.peers[2].dir, &v2).await?,
        Put::Written(_)
    ));
    let stale = owner.write_after(&v1, b"late".to_vec());
    match put(&cluster.peers[1].dir, &stale).await? {
        Put::Conflict(current) => assert_eq!(*current, v2),
        other => panic!("stale write was not refused: {other:?}"),
    }
    // Replaying an older version is a conflict, not a rollback.
    assert!(matches!(put(&cluster.peers[0].dir, &v1).await?, Put::Conflict(c) if *c == v2));
    assert_eq!(get(&cluster.peers[1].dir, &v1).await?, v2);

    // Someone the access list does not name is refused.
    let intruder = stranger.write_after(&v2, b"mine".to_vec());
    let refused = put(&cluster.peers[0].dir, &intruder).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A version changed after signing is refused.
    let mut forged = owner.write_after(&v2, b"three".to_vec());
    forged.payload = b"tampered".to_vec();
    let refused = put(&cluster.peers[1].dir, &forged).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // An unknown block is reported as such.
    let unknown = owner.create([8; 16], vec![], vec![]);
    assert_eq!(
        get(&cluster.peers[2].dir, &unknown)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(get(&cluster.peers[0].dir, &v1).await?, v2);
    Ok(())
}

/// A peer that skips its own checks and speaks Paxos straight to an
/// acceptor is refused by the acceptor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_peer_cannot_get_forged_or_unauthorised_versions_accepted() -> anyhow::Result<()>
{
    let cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let owner = key(1);
    let v1 = owner.create([3; 16], vec![], b"genuine".to_vec());
    assert!(matches!(
        put(&cluster.peers[0].dir, &v1).await?,
        Put::Written(_)
    ));

    // The malicious peer holds a real certificate of this cluster.
    let scratch = tempfile::tempdir()?;
    let rogue = NodeIdentity::load_or_issue(scratch.path(), cluster.root())?;
    let transport = Transport::client(&rogue, Timeouts::default())?;
    // The block's quorum: all three peers (their ids from their certificates).
    let members: Vec<shoal_core::NodeId> = cluster
        .peers
        .iter()
        .map(|p| NodeIdentity::load_or_issue(&p.dir, cluster.root()).map(|i| i.node_id))
        .collect::<Result<_, _>>()?;
    let base = wire::chosen_to_wire(&shoal_core::paxos::Chosen {
        slot: 1,
        value: Some(v1.clone()),
        config: shoal_core::paxos::Config {
            epoch: 1,
            members: members.clone(),
        },
    });

    let stranger = key(9).write_after(&v1, b"not yours".to_vec());
    let mut tampered = wire::block_to_wire(&owner.write_after(&v1, b"honest".to_vec()));
    tampered.payload = b"tampered".to_vec();
    for forged in [wire::block_to_wire(&stranger), tampered] {
        for peer in &cluster.peers {
            let reply = transport
                .request(
                    peer.addr.parse()?,
                    &accept(&v1.address, base.clone(), forged.clone()),
                )
                .await?;
            match only_reply(reply) {
                Some(paxos_reply::Kind::Invalid(reason)) => {
                    assert!(reason.contains("does not verify"), "{reason}")
                }
                other => panic!("forged version not refused: {other:?}"),
            }
        }
    }
    assert_eq!(
        get(&cluster.peers[1].dir, &v1).await?,
        v1,
        "the block is untouched"
    );

    // Once version 2 is chosen, replaying version 1 on top of it (or on
    // top of the state before it) gets nowhere either.
    let v2 = owner.write_after(&v1, b"second".to_vec());
    assert!(matches!(
        put(&cluster.peers[0].dir, &v2).await?,
        Put::Written(_)
    ));
    let on_v2 = wire::chosen_to_wire(&shoal_core::paxos::Chosen {
        slot: 2,
        value: Some(v2.clone()),
        config: shoal_core::paxos::Config {
            epoch: 1,
            members: members.clone(),
        },
    });
    for base in [on_v2, base] {
        for peer in &cluster.peers {
            let reply = transport
                .request(
                    peer.addr.parse()?,
                    &accept(&v1.address, base.clone(), wire::block_to_wire(&v1)),
                )
                .await?;
            let reply = only_reply(reply);
            let refused = matches!(
                reply,
                Some(paxos_reply::Kind::Invalid(_) | paxos_reply::Kind::Rejected(_))
            );
            assert!(refused, "replayed version not refused: {reply:?}");
        }
    }
    assert_eq!(get(&cluster.peers[2].dir, &v1).await?, v2, "no rollback");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_lose_no_acknowledged_write_while_a_replica_dies()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(&spread(5, 3), 3).await?;
    let clients: Vec<WriterKey> = (10..14).map(key).collect();
    let owner = key(1);
    let start = owner.create(
        [5; 16],
        clients.iter().map(WriterKey::public).collect(),
        0u64.to_le_bytes().to_vec(),
    );
    assert!(matches!(
        put(&cluster.peers[0].dir, &start).await?,
        Put::Written(_)
    ));

    // The replica to kill: one of the block's quorum, not peer 0.
    let quorum = quorum_of(&cluster, &start).await?;
    let victim = (1..5)
        .find(|i| quorum.contains(i))
        .expect("a replica besides peer 0");

    let dirs: Arc<Vec<PathBuf>> = Arc::new(cluster.peers.iter().map(|p| p.dir.clone()).collect());
    let acked = Arc::new(AtomicUsize::new(0));
    let uncertain = Arc::new(AtomicUsize::new(0));
    const PER_CLIENT: usize = 15;
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let (dirs, acked, uncertain, start) = (
            dirs.clone(),
            acked.clone(),
            uncertain.clone(),
            start.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut current = start;
            let mut peer = c % 4 + 1;
            let mut mine = 0;
            let deadline = Instant::now() + Duration::from_secs(90);
            // Bounded in attempts and time.
            for _ in 0..2000 {
                if mine == PER_CLIENT || Instant::now() > deadline {
                    break;
                }
                let next =
                    client.write_after(&current, (counter(&current) + 1).to_le_bytes().to_vec());
                let outcome =
                    tokio::time::timeout(Duration::from_secs(40), put(&dirs[peer], &next)).await;
                match outcome {
                    Ok(Ok(Put::Written(b))) => {
                        current = *b;
                        mine += 1;
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(Put::Conflict(b))) => current = *b,
                    Ok(Err(_)) | Err(_) => {
                        // The write may or may not have landed; move to
                        // another peer and reread.
                        uncertain.fetch_add(1, Ordering::SeqCst);
                        peer = peer % 4 + 1;
                        if let Ok(b) = get(&dirs[0], &current).await {
                            current = b;
                        }
                    }
                }
            }
            mine
        }));
    }
    // Kill a replica once the writers are well under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(victim);
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    let last = get(&cluster.peers[0].dir, &start).await?;
    let acked = acked.load(Ordering::SeqCst);
    let uncertain = uncertain.load(Ordering::SeqCst);
    assert_eq!(total, acked);
    assert_eq!(acked, 4 * PER_CLIENT, "every client finished");
    // Every acknowledged increment is there; at most the uncertain ones
    // (timed out, outcome unknown) may have landed on top.
    let value = counter(&last) as usize;
    assert!(
        value >= acked && value <= acked + uncertain,
        "counter {value}, acked {acked}, uncertain {uncertain}"
    );
    assert_eq!(
        last.version as usize,
        value + 1,
        "one version per increment"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptors_keep_their_state_across_sigkill() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let owner = key(1);
    let mut block = owner.create([4; 16], vec![], b"v1".to_vec());
    assert!(matches!(
        put(&cluster.peers[0].dir, &block).await?,
        Put::Written(_)
    ));
    for v in 2..=5 {
        block = owner.write_after(&block, format!("v{v}").into_bytes());
        assert!(matches!(
            put(&cluster.peers[0].dir, &block).await?,
            Put::Written(_)
        ));
    }
    // Kill two acceptors, bring them back, then take away the only one that
    // never went down: the quorum left must remember version 5.
    cluster.kill(1);
    cluster.kill(2);
    cluster.restart(1).await?;
    cluster.restart(2).await?;
    cluster.wait_until_joined(Duration::from_secs(60)).await?;
    cluster.kill(0);
    let read = get(&cluster.peers[1].dir, &block).await?;
    assert_eq!(read, block);
    let v6 = owner.write_after(&block, b"v6".to_vec());
    assert!(matches!(
        put(&cluster.peers[2].dir, &v6).await?,
        Put::Written(_)
    ));
    assert_eq!(get(&cluster.peers[1].dir, &block).await?, v6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_quorum_member_is_replaced_so_a_second_loss_is_survived() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start_with(&spread(5, 3), 3, &["--eviction-delay", "2s"]).await?;
    let owner = key(1);
    let v1 = owner.create([6; 16], vec![], b"v1".to_vec());
    assert!(matches!(
        put(&cluster.peers[0].dir, &v1).await?,
        Put::Written(_)
    ));
    let quorum = quorum_of(&cluster, &v1).await?;
    assert_eq!(quorum.len(), 3);
    let client = (0..5)
        .find(|i| !quorum.contains(i))
        .expect("a peer outside the quorum");
    let (first, second) = (quorum[0], quorum[1]);

    // One member dies for good: after the eviction delay the block moves to
    // a new quorum (found by the first live member; a log line says so).
    cluster.kill(first);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster
        .peers
        .iter()
        .any(|p| p.log().contains("moved quorum to new members"))
    {
        assert!(
            Instant::now() < deadline,
            "no peer replaced the dead member"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let v2 = owner.write_after(&v1, b"v2".to_vec());
    assert!(matches!(
        put(&cluster.peers[client].dir, &v2).await?,
        Put::Written(_)
    ));

    // A second original member dies: the old quorum would have lost its
    // majority; the new one has not.
    cluster.kill(second);
    let v3 = owner.write_after(&v2, b"v3".to_vec());
    assert!(matches!(
        put(&cluster.peers[client].dir, &v3).await?,
        Put::Written(_)
    ));
    assert_eq!(get(&cluster.peers[client].dir, &v1).await?, v3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorums_follow_placement_when_a_node_joins() -> anyhow::Result<()> {
    let mut cluster =
        TestCluster::start_with(&spread(3, 3), 3, &["--eviction-delay", "2s"]).await?;
    let owner = key(1);
    let blocks: Vec<MutableBlock> = (0..8u8)
        .map(|i| owner.create([i; 16], vec![], vec![i]))
        .collect();
    for b in &blocks {
        assert!(matches!(
            put(&cluster.peers[0].dir, b).await?,
            Put::Written(_)
        ));
    }
    let first = cluster.peers[0].addr.clone();
    let joined = cluster
        .spawn(shoal_e2e::NodeSpec::new("zone-0", "rack-new"), Some(&first))
        .await?;
    cluster.wait_until_joined(Duration::from_secs(60)).await?;
    let ids: Vec<String> = cluster
        .peers
        .iter()
        .map(|p| NodeIdentity::load_or_issue(&p.dir, cluster.root()).map(|i| i.node_id.to_string()))
        .collect::<Result<_, _>>()?;

    // Once membership has settled for the eviction delay, blocks whose
    // placement now includes the new node move their quorum onto it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (moved, quorum) = loop {
        let mut found = None;
        for b in &blocks {
            let reply = admin::connect(&cluster.peers[0].dir)
                .await?
                .get_mutable(GetMutableRequest {
                    address: b.address.to_string(),
                })
                .await?
                .into_inner();
            if reply.quorum.contains(&ids[joined]) {
                found = Some((b.clone(), reply.quorum));
                break;
            }
        }
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no quorum moved to the new node");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Kill the original member the block left, and one it kept: the old
    // quorum would be down to one; the new one keeps a majority.
    let left = (0..3)
        .find(|&i| !quorum.contains(&ids[i]))
        .expect("a member left");
    let kept = (0..3)
        .find(|&i| i != left && quorum.contains(&ids[i]))
        .expect("a member kept");
    let client = (0..3)
        .find(|&i| i != left && i != kept)
        .expect("a third peer");
    cluster.kill(left);
    cluster.kill(kept);
    let next = owner.write_after(&moved, b"after the move".to_vec());
    assert!(matches!(
        put(&cluster.peers[client].dir, &next).await?,
        Put::Written(_)
    ));
    assert_eq!(get(&cluster.peers[joined].dir, &moved).await?, next);
    Ok(())
}
