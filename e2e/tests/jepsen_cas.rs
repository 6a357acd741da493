//! Jepsen-style test of mutable blocks: five peer processes, R=3; four
//! clients run compare-and-set increments (and reads) on 20 blocks for 60 s
//! (`SHOAL_JEPSEN_SECONDS` to change) while a nemesis kills peers with
//! SIGKILL and restarts them, and partitions peers from the rest (fault
//! injection in the transport). Every block's recorded history is then
//! checked for linearizability (Wing–Gong search), and every acknowledged
//! increment must be in the final value.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use shoal_core::mutable::{MutableBlock, WriterKey};
use shoal_e2e::linearizability::{self, Event, Op};
use shoal_e2e::{Put, TestCluster, counter, get_mutable, put_mutable, spread};
use shoal_node::admin;
use shoal_proto::admin::IsolateRequest;

const BLOCKS: usize = 20;
const CLIENTS: usize = 4;
const PEERS: usize = 5;

async fn put(dir: &Path, block: &MutableBlock) -> anyhow::Result<Put> {
    Ok(put_mutable(&mut admin::connect(dir).await?, block).await?)
}

async fn get(dir: &Path, block: &MutableBlock) -> anyhow::Result<MutableBlock> {
    Ok(get_mutable(&mut admin::connect(dir).await?, &block.address).await?)
}

async fn isolate(cluster: &TestCluster, peer: usize, unreachable: Vec<String>) {
    if let Ok(mut c) = cluster.peers[peer].admin().await {
        let _ = c.isolate(IsolateRequest { unreachable }).await;
    }
}

/// Cuts `victim` off from every other peer (both directions), or heals all.
async fn partition(cluster: &mut TestCluster, victim: Option<usize>) {
    let addrs: Vec<String> = cluster.peers.iter().map(|p| p.addr.clone()).collect();
    for i in 0..cluster.peers.len() {
        if !cluster.peers[i].is_running() {
            continue;
        }
        let cut = match victim {
            None => Vec::new(),
            Some(v) if v == i => addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != v)
                .map(|(_, a)| a.clone())
                .collect(),
            Some(v) => vec![addrs[v].clone()],
        };
        isolate(cluster, i, cut).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_histories_are_linearizable_under_kills_and_partitions()
-> anyhow::Result<()> {
    let seconds: u64 = std::env::var("SHOAL_JEPSEN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut cluster = TestCluster::start(&spread(PEERS, 3), 3).await?;
    let dirs: Arc<Vec<PathBuf>> = Arc::new(cluster.peers.iter().map(|p| p.dir.clone()).collect());
    let keys: Vec<WriterKey> = (0..CLIENTS)
        .map(|i| WriterKey::from_secret([10 + i as u8; 32]))
        .collect();
    let owner = WriterKey::from_secret([1; 32]);
    let mut blocks = Vec::new();
    for b in 0..BLOCKS {
        let block = owner.create(
            [b as u8; 16],
            keys.iter().map(WriterKey::public).collect(),
            0u64.to_le_bytes().to_vec(),
        );
        anyhow::ensure!(matches!(put(&dirs[0], &block).await?, Put::Written(_)));
        blocks.push(block);
    }
    let blocks = Arc::new(blocks);
    let histories: Arc<Mutex<Vec<Vec<Event>>>> = Arc::new(Mutex::new(vec![Vec::new(); BLOCKS]));
    let start = Instant::now();
    let now = move || start.elapsed().as_micros() as u64;
    let deadline = start + Duration::from_secs(seconds);
    let op_timeout = Duration::from_secs(10);

    let mut clients = Vec::new();
    for (c, key) in keys.into_iter().enumerate() {
        let (dirs, blocks, histories) = (dirs.clone(), blocks.clone(), histories.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut peer = c % PEERS;
            let record = |b: usize, e: Event| histories.lock().expect("history")[b].push(e);
            // Bounded by time and by count.
            for _ in 0..1_000_000 {
                if Instant::now() > deadline {
                    break;
                }
                let b = rng.random_range(0..BLOCKS);
                let invoked = now();
                let current =
                    match tokio::time::timeout(op_timeout, get(&dirs[peer], &blocks[b])).await {
                        Ok(Ok(current)) => {
                            record(
                                b,
                                Event {
                                    op: Op::Read((current.version, counter(&current))),
                                    invoked,
                                    completed: Some(now()),
                                },
                            );
                            current
                        }
                        // A failed read has no effect: nothing to record.
                        _ => {
                            peer = (peer + 1) % PEERS;
                            continue;
                        }
                    };
                let (expected, value) = (current.version, counter(&current) + 1);
                let next = key.write_after(&current, value.to_le_bytes().to_vec());
                let invoked = now();
                let op = match tokio::time::timeout(op_timeout, put(&dirs[peer], &next)).await {
                    Ok(Ok(Put::Written(_))) => Some(Op::Written { expected, value }),
                    Ok(Ok(Put::Conflict(c))) => Some(Op::Refused {
                        expected,
                        current: (c.version, counter(&c)),
                    }),
                    _ => None,
                };
                match op {
                    Some(op) => record(
                        b,
                        Event {
                            op,
                            invoked,
                            completed: Some(now()),
                        },
                    ),
                    None => {
                        record(
                            b,
                            Event {
                                op: Op::Unknown { expected, value },
                                invoked,
                                completed: None,
                            },
                        );
                        peer = (peer + 1) % PEERS;
                    }
                }
            }
        }));
    }

    // The nemesis: one fault at a time, each lasting a few seconds.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfa17);
    let mut faults = Vec::new();
    while Instant::now() + Duration::from_secs(8) < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = rng.random_range(0..PEERS);
        if rng.random_bool(0.5) {
            faults.push(format!("kill peer {victim}"));
            cluster.kill(victim);
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.restart(victim).await?;
        } else {
            faults.push(format!("partition peer {victim}"));
            partition(&mut cluster, Some(victim)).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            partition(&mut cluster, None).await;
        }
    }
    for c in clients {
        c.await?;
    }
    partition(&mut cluster, None).await;

    // Final reads, then the checks.
    let mut histories = std::mem::take(&mut *histories.lock().expect("history"));
    let mut finals = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        let invoked = now();
        let last = get(&dirs[0], block).await?;
        histories[b].push(Event {
            op: Op::Read((last.version, counter(&last))),
            invoked,
            completed: Some(now()),
        });
        finals.push(last);
    }
    let mut ops = 0;
    for (b, history) in histories.iter().enumerate() {
        ops += history.len();
        let acked = history
            .iter()
            .filter(|e| matches!(e.op, Op::Written { .. }))
            .count() as u64;
        let unknown = history
            .iter()
            .filter(|e| matches!(e.op, Op::Unknown { .. }))
            .count() as u64;
        let value = counter(&finals[b]);
        assert!(
            value >= acked && value <= acked + unknown,
            "block {b}: final {value}, acknowledged {acked}, unknown {unknown}"
        );
        let verdict = linearizability::check((1, 0), history, 50_000_000);
        assert_eq!(
            verdict,
            Some(true),
            "block {b}: history of {} ops is not linearizable",
            history.len()
        );
    }
    eprintln!(
        "jepsen: {ops} operations on {BLOCKS} blocks in {seconds} s, faults: {}; 0 anomalies",
        faults.join(", ")
    );
    assert!(ops > BLOCKS * 10, "too few operations ran: {ops}");
    Ok(())
}
