//! Five peer processes in three zones store 1,000 random blocks with R=3;
//! every block sits in three distinct zones; two peers die by SIGKILL; every
//! block reads back bit-exact.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::{RngExt, SeedableRng};
use shoal_e2e::{TestCluster, spread};
use shoal_proto::admin::{GetBlockRequest, PutBlockRequest};

const BLOCKS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_survive_two_sigkilled_peers_and_sit_in_distinct_zones() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(&spread(5, 3), 3).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5_0a1);
    let blocks: Vec<Vec<u8>> = (0..BLOCKS)
        .map(|_| {
            let len = rng.random_range(1024..=1024 * 1024);
            let mut data = vec![0u8; len];
            rng.fill(&mut data[..]);
            data
        })
        .collect();

    // Write through every peer, eight at a time.
    let cluster_ref = &cluster;
    let addresses: Vec<String> = futures::stream::iter(blocks.iter().enumerate())
        .map(|(i, data)| async move {
            let mut admin = cluster_ref.peers[i % 5].admin().await?;
            let reply = admin
                .put_block(PutBlockRequest { data: data.clone() })
                .await?;
            anyhow::Ok(reply.into_inner().address)
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    for (data, address) in blocks.iter().zip(&addresses) {
        assert_eq!(address, &blake3::hash(data).to_hex().to_string());
    }

    // Acknowledged at a write quorum of two; the third copy lands in the
    // background. Wait (bounded) for all three, then check their zones.
    let deadline = Instant::now() + Duration::from_secs(60);
    let holders = loop {
        let mut holders: HashMap<String, Vec<usize>> = HashMap::new();
        for i in 0..5 {
            for a in cluster.local_blocks(i).await? {
                holders.entry(a).or_default().push(i);
            }
        }
        let copies: usize = holders.values().map(Vec::len).sum();
        if copies >= BLOCKS * 3 || Instant::now() > deadline {
            break holders;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for address in &addresses {
        let on = holders.get(address).map(Vec::as_slice).unwrap_or_default();
        let zones: HashSet<&str> = on
            .iter()
            .map(|&i| cluster.peers[i].spec.zone.as_str())
            .collect();
        assert_eq!(on.len(), 3, "block {address} is on peers {on:?}");
        assert_eq!(
            zones.len(),
            3,
            "block {address} is on peers {on:?} in zones {zones:?}"
        );
    }

    cluster.kill(1);
    cluster.kill(2);

    let cluster_ref = &cluster;
    let survivors = [0usize, 3, 4];
    let mismatches: Vec<String> = futures::stream::iter(addresses.iter().zip(&blocks).enumerate())
        .map(|(i, (address, data))| async move {
            let mut admin = cluster_ref.peers[survivors[i % 3]].admin().await?;
            let reply = admin
                .get_block(GetBlockRequest {
                    address: address.clone(),
                })
                .await?;
            anyhow::Ok((reply.into_inner().data != *data).then(|| address.clone()))
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .filter_map(|r| r.transpose())
        .collect::<Result<_, _>>()?;
    assert!(
        mismatches.is_empty(),
        "blocks read back wrong: {mismatches:?}"
    );
    Ok(())
}
