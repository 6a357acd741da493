//! Re-replication with real peer processes: when a peer dies for good, the
//! blocks it held get their third copy back on the peers that remain, with
//! nobody asking; blocks a volume keeps fewer copies of stay at that count.
//! And a peer with `--local-copy` keeps what it writes beyond the replicas.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shoal_e2e::{TestCluster, shoal, spread};
use shoal_proto::admin::PutBlockRequest;

/// How many of the peers `live` hold each block any of them holds.
async fn all_copies(cluster: &TestCluster, live: &[usize]) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for &i in live {
        for held in cluster.local_blocks(i).await.unwrap() {
            *count.entry(held).or_insert(0) += 1;
        }
    }
    count
}

/// How many of the peers `live` hold each of `addresses`.
async fn copies(
    cluster: &TestCluster,
    live: &[usize],
    addresses: &[String],
) -> HashMap<String, usize> {
    let mut count: HashMap<String, usize> = addresses.iter().map(|a| (a.clone(), 0)).collect();
    for &i in live {
        for held in cluster.local_blocks(i).await.unwrap() {
            if let Some(c) = count.get_mut(&held) {
                *c += 1;
            }
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_a_dead_peer_get_their_replicas_back() {
    let mut cluster = TestCluster::start_with(&spread(4, 4), 3, &["--repair-interval", "1s"])
        .await
        .unwrap();
    let mut admin = cluster.peers[0].admin().await.unwrap();
    let mut addresses = Vec::new();
    for i in 0..40u32 {
        let data = format!("block {i} ").repeat(100).into_bytes();
        let reply = admin.put_block(PutBlockRequest { data }).await.unwrap();
        addresses.push(reply.into_inner().address);
    }
    // A volume that keeps two copies of its chunks.
    let dir = cluster.peers[0].dir.to_str().unwrap().to_string();
    let out = shoal(&["volume", "create", "pair", "--replicas", "2", "--dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mount = cluster.mount(0, "pair", "mnt").unwrap();
    std::fs::write(mount.dir.join("data"), vec![7u8; 5 << 20]).unwrap();
    mount.unmount().unwrap();
    let all = [0, 1, 2, 3];
    let before = copies(&cluster, &all, &addresses).await;
    assert!(before.values().all(|&c| c == 3), "{before:?}");
    let chunks: Vec<String> = all_copies(&cluster, &all)
        .await
        .into_iter()
        .filter(|(a, _)| !before.contains_key(a))
        .map(|(a, c)| {
            assert_eq!(c, 2, "chunk {a} of the two-copy volume");
            a
        })
        .collect();
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());

    // Peer 3 goes for good: SIGKILL, and the others see it dead.
    let lost: Vec<String> = cluster.local_blocks(3).await.unwrap();
    assert!(!lost.is_empty(), "peer 3 held none of the 40 blocks");
    cluster.kill(3);
    cluster
        .wait_for_alive(3, Duration::from_secs(60))
        .await
        .unwrap();

    let live = [0, 1, 2];
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    loop {
        let now = copies(&cluster, &live, &addresses).await;
        if now.values().all(|&c| c == 3) {
            break;
        }
        let short: Vec<_> = now.iter().filter(|(_, c)| **c < 3).collect();
        assert!(
            Instant::now() < deadline,
            "still under-replicated: {short:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The two-copy volume's chunks are back to two, not three.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = copies(&cluster, &live, &chunks).await;
        if now.values().all(|&c| c == 2) {
            break;
        }
        assert!(now.values().all(|&c| c <= 2), "over-replicated: {now:?}");
        assert!(
            Instant::now() < deadline,
            "chunks short of two copies: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{} blocks of the dead peer back to 3 copies {:.1} s after it was seen dead",
        lost.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_local_copy_keeps_what_it_writes() {
    let cluster = TestCluster::start_with(&spread(5, 5), 2, &["--local-copy"])
        .await
        .unwrap();
    let mut admin = cluster.peers[0].admin().await.unwrap();
    let mut addresses = Vec::new();
    for i in 0..30u32 {
        let data = format!("written through peer 0: {i} ")
            .repeat(50)
            .into_bytes();
        let reply = admin.put_block(PutBlockRequest { data }).await.unwrap();
        addresses.push(reply.into_inner().address);
    }
    // The local copy is written beside the acknowledged replicas: wait
    // (bounded) for the last ones to land.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = cluster.local_blocks(0).await.unwrap();
        if addresses.iter().all(|a| held.contains(a)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peer 0 lacks some of what it wrote"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each block is also on its two replicas elsewhere: three copies for
    // the blocks peer 0 is not a replica of, two for the others.
    let all = [0, 1, 2, 3, 4];
    let count = copies(&cluster, &all, &addresses).await;
    let extra = count.values().filter(|&&c| c == 3).count();
    assert!(count.values().all(|&c| c == 2 || c == 3), "{count:?}");
    assert!(
        extra > 10,
        "only {extra} of 30 blocks got a local copy beyond their replicas"
    );
    // Reads through peer 0 are served from its own store, so they work
    // with every other peer that holds them unreachable.
    let others: Vec<String> = cluster.peers[1..].iter().map(|p| p.addr.clone()).collect();
    admin
        .isolate(shoal_proto::admin::IsolateRequest {
            unreachable: others,
        })
        .await
        .unwrap();
    for address in &addresses {
        let reply = admin
            .get_block(shoal_proto::admin::GetBlockRequest {
                address: address.clone(),
            })
            .await
            .unwrap();
        assert!(!reply.into_inner().data.is_empty());
    }
}

/// The address peer `i` serves its status on (from its log).
fn status_addr(cluster: &TestCluster, i: usize) -> String {
    let log = cluster.peers[i].log();
    let line = log
        .lines()
        .find(|l| l.contains("serving status"))
        .unwrap_or_else(|| panic!("peer {i} serves no status: {log}"));
    let addr = line.split("addr=").nth(1).unwrap();
    addr.split_whitespace().next().unwrap().to_string()
}

/// `GET /status` over a plain TCP connection.
async fn get_status(addr: &str) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_report_their_view_and_under_replicated_blocks() {
    let mut cluster = TestCluster::start_with(
        &spread(3, 3),
        3,
        &["--repair-interval", "1s", "--status-listen", "127.0.0.1:0"],
    )
    .await
    .unwrap();
    let mut admin = cluster.peers[0].admin().await.unwrap();
    for i in 0..20u32 {
        let data = format!("counted {i} ").repeat(64).into_bytes();
        admin.put_block(PutBlockRequest { data }).await.unwrap();
    }
    let addrs: Vec<String> = (0..3).map(|i| status_addr(&cluster, i)).collect();

    // Settled: three live peers offering 4 GiB each, holding the blocks,
    // nothing under-replicated.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = get_status(&addrs[0]).await;
        let members = s["members"].as_array().unwrap();
        let alive = members.iter().filter(|m| m["state"] == "alive").count();
        let used: u64 = members.iter().map(|m| m["used"].as_u64().unwrap()).sum();
        let capacity: u64 = members
            .iter()
            .map(|m| m["capacity"].as_u64().unwrap())
            .sum();
        if alive == 3 && used > 0 && s["under_replicated_blocks"] == 0 {
            assert_eq!(capacity, 3 * (4 << 30));
            assert_eq!(s["replication"], 3);
            break;
        }
        assert!(Instant::now() < deadline, "status never settled: {s}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // One of three peers gone with R=3: every block is short of a copy,
    // and the two peers left count each once between them.
    cluster.kill(2);
    cluster
        .wait_for_alive(2, Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut total = 0;
        for addr in &addrs[..2] {
            total += get_status(addr).await["under_replicated_blocks"]
                .as_u64()
                .unwrap_or(0);
        }
        if total == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{total} of 20 blocks counted under-replicated"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
