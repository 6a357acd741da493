//! Benchmark of replicated immutable blocks on a 3-peer, R=3 loopback
//! cluster of real peer processes: puts/s, gets/s, MiB/s and p50/p99 latency
//! for 4 KiB and 1 MiB blocks, through the peers' admin API. Prints a table,
//! then one JSON line.

use std::time::Instant;

use clap::Parser;
use futures::StreamExt;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use shoal_e2e::{Summary, TestCluster, spread};
use shoal_proto::admin::{GetBlockRequest, PutBlockRequest};

#[derive(Debug, Parser)]
struct Args {
    /// Operations per phase for 4 KiB blocks.
    #[arg(long, default_value_t = 3000)]
    small_ops: usize,
    /// Operations per phase for 1 MiB blocks.
    #[arg(long, default_value_t = 300)]
    large_ops: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    op: &'static str,
    block_bytes: usize,
    mib_per_s: f64,
    #[serde(flatten)]
    summary: Summary,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let mut clients = Vec::new();
    for peer in &cluster.peers {
        clients.push(peer.admin().await?);
    }
    let mut rows = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (size, ops) in [(4096usize, args.small_ops), (1 << 20, args.large_ops)] {
        let blocks: Vec<Vec<u8>> = (0..ops)
            .map(|_| {
                let mut b = vec![0u8; size];
                rng.fill(&mut b[..]);
                b
            })
            .collect();

        let started = Instant::now();
        let clients_ref = &clients;
        let puts: Vec<(u64, String)> = futures::stream::iter(blocks.into_iter().enumerate())
            .map(|(i, data)| async move {
                let mut c = clients_ref[i % clients_ref.len()].clone();
                let t = Instant::now();
                let address = c
                    .put_block(PutBlockRequest { data })
                    .await?
                    .into_inner()
                    .address;
                anyhow::Ok((t.elapsed().as_micros() as u64, address))
            })
            .buffer_unordered(args.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        rows.push(row(
            "put",
            size,
            started.elapsed().as_secs_f64(),
            puts.iter().map(|p| p.0).collect(),
        ));

        let started = Instant::now();
        let gets: Vec<u64> = futures::stream::iter(puts.iter().enumerate())
            .map(|(i, (_, address))| async move {
                // A different peer than the writer: a mix of local and
                // remote reads, as clients see them.
                let mut c = clients_ref[(i + 1) % clients_ref.len()].clone();
                let t = Instant::now();
                let data = c
                    .get_block(GetBlockRequest {
                        address: address.clone(),
                    })
                    .await?
                    .into_inner()
                    .data;
                anyhow::ensure!(data.len() == size, "short read");
                anyhow::Ok(t.elapsed().as_micros() as u64)
            })
            .buffer_unordered(args.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        rows.push(row("get", size, started.elapsed().as_secs_f64(), gets));
    }

    println!(
        "Shoal immutable blocks: 3 peers, R=3 (write quorum 2), loopback QUIC, {} in flight",
        args.concurrency
    );
    println!(
        "{:<4} {:>9} {:>7} {:>10} {:>9} {:>10} {:>10}",
        "op", "block", "ops", "ops/s", "MiB/s", "p50 ms", "p99 ms"
    );
    for r in &rows {
        println!(
            "{:<4} {:>9} {:>7} {:>10.0} {:>9.1} {:>10.2} {:>10.2}",
            r.op,
            if r.block_bytes >= 1 << 20 {
                "1 MiB"
            } else {
                "4 KiB"
            },
            r.summary.ops,
            r.summary.ops_per_s,
            r.mib_per_s,
            r.summary.p50_us as f64 / 1000.0,
            r.summary.p99_us as f64 / 1000.0
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "immutable_blocks",
            "peers": 3,
            "replicas": 3,
            "concurrency": args.concurrency,
            "results": rows,
        })
    );
    Ok(())
}

fn row(op: &'static str, size: usize, seconds: f64, micros: Vec<u64>) -> Row {
    let summary = Summary::of(micros, seconds);
    Row {
        op,
        block_bytes: size,
        mib_per_s: summary.ops_per_s * size as f64 / (1 << 20) as f64,
        summary,
    }
}
