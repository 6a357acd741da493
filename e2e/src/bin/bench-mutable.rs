//! Benchmark of mutable blocks on a 3-peer, R=3 loopback cluster of real
//! peer processes: uncontended compare-and-set write latency and rate (the
//! Multi-Paxos fast path: one round trip once the proposer leads), read
//! latency (a quorum read), and compare-and-set throughput with four
//! writers contending for one block. Prints a table, then one JSON line.

use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use shoal_core::mutable::WriterKey;
use shoal_e2e::{Put, Summary, TestCluster, put_mutable, spread};
use shoal_node::wire;

use shoal_proto::admin::GetMutableRequest;

#[derive(Debug, Parser)]
struct Args {
    /// Sequential writes (and reads) in the uncontended phases.
    #[arg(long, default_value_t = 1000)]
    ops: usize,
    /// Seconds of the contended phase.
    #[arg(long, default_value_t = 10)]
    contended_seconds: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    phase: &'static str,
    #[serde(flatten)]
    summary: Summary,
}

fn row(phase: &'static str, seconds: f64, micros: Vec<u64>) -> Row {
    Row {
        phase,
        summary: Summary::of(micros, seconds),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let mut clients = Vec::new();
    for peer in &cluster.peers {
        clients.push(peer.admin().await?);
    }
    let owner = WriterKey::from_secret([1; 32]);
    let writers: Vec<WriterKey> = (10..14).map(|n| WriterKey::from_secret([n; 32])).collect();
    let mut rows = Vec::new();

    // Uncontended writes through one peer: after the first (phase 1), each
    // write is one Accept round trip to the quorum.
    let mut block = owner.create(
        [1; 16],
        writers.iter().map(WriterKey::public).collect(),
        vec![0; 128],
    );
    let Put::Written(_) = put_mutable(&mut clients[0], &block).await? else {
        anyhow::bail!("create conflicted");
    };
    let started = Instant::now();
    let mut samples = Vec::with_capacity(args.ops);
    for i in 0..args.ops {
        let next = owner.write_after(&block, vec![i as u8; 128]);
        let t = Instant::now();
        match put_mutable(&mut clients[0], &next).await? {
            Put::Written(b) => block = *b,
            Put::Conflict(_) => anyhow::bail!("uncontended write conflicted"),
        }
        samples.push(t.elapsed().as_micros() as u64);
    }
    rows.push(row(
        "uncontended write",
        started.elapsed().as_secs_f64(),
        samples,
    ));

    // Linearizable reads through another peer.
    let started = Instant::now();
    let mut samples = Vec::with_capacity(args.ops);
    for _ in 0..args.ops {
        let t = Instant::now();
        clients[1]
            .get_mutable(GetMutableRequest {
                address: block.address.to_string(),
            })
            .await?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    rows.push(row("read", started.elapsed().as_secs_f64(), samples));

    // Four writers, one block, each through a different peer.
    let deadline = Instant::now() + Duration::from_secs(args.contended_seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, key) in writers.into_iter().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        let mut current = block.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut conflicts, mut uncertain) = (Vec::new(), 0usize, 0usize);
            while Instant::now() < deadline {
                let next = key.write_after(&current, vec![i as u8; 128]);
                let t = Instant::now();
                match put_mutable(&mut client, &next).await {
                    Ok(Put::Written(b)) => {
                        current = *b;
                        samples.push(t.elapsed().as_micros() as u64);
                    }
                    Ok(Put::Conflict(b)) => {
                        current = *b;
                        conflicts += 1;
                    }
                    // Outcome unknown (the history moved on past it): reread.
                    Err(_) => {
                        uncertain += 1;
                        let reply = client
                            .get_mutable(GetMutableRequest {
                                address: current.address.to_string(),
                            })
                            .await?
                            .into_inner();
                        current = wire::block_from_wire(
                            reply.block.ok_or_else(|| anyhow::anyhow!("no block"))?,
                        )?;
                    }
                }
            }
            anyhow::Ok((samples, conflicts, uncertain))
        }));
    }
    let (mut samples, mut conflicts, mut uncertain) = (Vec::new(), 0, 0);
    for t in tasks {
        let (s, c, u) = t.await??;
        samples.extend(s);
        conflicts += c;
        uncertain += u;
    }
    rows.push(row(
        "contended CAS, 4 writers",
        started.elapsed().as_secs_f64(),
        samples,
    ));

    println!("Shoal mutable blocks: 3 peers, R=3, loopback QUIC, 128-byte payloads");
    println!(
        "{:<26} {:>7} {:>9} {:>9} {:>9}",
        "phase", "ops", "ops/s", "p50 ms", "p99 ms"
    );
    for r in &rows {
        println!(
            "{:<26} {:>7} {:>9.0} {:>9.2} {:>9.2}",
            r.phase,
            r.summary.ops,
            r.summary.ops_per_s,
            r.summary.p50_us as f64 / 1000.0,
            r.summary.p99_us as f64 / 1000.0
        );
    }
    println!(
        "contended: {conflicts} compare-and-sets lost to another writer, {uncertain} of unknown outcome; all retried"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "mutable_blocks",
            "peers": 3,
            "replicas": 3,
            "results": rows,
            "contended_conflicts": conflicts,
            "contended_uncertain": uncertain,
        })
    );
    Ok(())
}
