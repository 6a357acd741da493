//! Filling the peers to capacity gives the writer a clear error and loses no
//! block written before.

use rand::{RngExt, SeedableRng};
use shoal_e2e::{NodeSpec, TestCluster};
use shoal_proto::admin::{GetBlockRequest, PutBlockRequest, StatusRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_refuses_writes_clearly_and_keeps_every_block() -> anyhow::Result<()> {
    let specs: Vec<NodeSpec> = (0..3)
        .map(|i| NodeSpec::new(&format!("zone-{i}"), "rack").capacity("1MiB"))
        .collect();
    let cluster = TestCluster::start(&specs, 3).await?;
    let mut admin = cluster.peers[0].admin().await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut stored = Vec::new();
    let mut refusal = None;
    // 1 MiB of 64 KiB blocks is 16; a bounded number of attempts past that.
    for _ in 0..40 {
        let mut data = vec![0u8; 64 * 1024];
        rng.fill(&mut data[..]);
        match admin
            .put_block(PutBlockRequest { data: data.clone() })
            .await
        {
            Ok(reply) => stored.push((reply.into_inner().address, data)),
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("writes past capacity must be refused");
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    let message = refusal.message();
    assert!(
        message.contains("no space") || message.contains("full"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        stored.len() >= 8,
        "only {} blocks fit before the refusal",
        stored.len()
    );

    for (address, data) in &stored {
        let reply = admin
            .get_block(GetBlockRequest {
                address: address.clone(),
            })
            .await?;
        assert_eq!(&reply.into_inner().data, data, "block {address} changed");
    }
    let status = admin.status(StatusRequest {}).await?.into_inner();
    for m in &status.members {
        assert!(
            m.used <= m.capacity,
            "{} holds {} of {}",
            m.node_id,
            m.used,
            m.capacity
        );
    }
    Ok(())
}
