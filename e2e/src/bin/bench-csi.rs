//! Benchmark of the CSI driver's provisioning path on a 3-peer loopback
//! cluster (R=3), through a real `shoal-csi` socket: CreateVolume,
//! NodePublishVolume, and CreateSnapshot of volumes holding the same
//! 10,000 files with 100 times more data in one than in the other (a
//! snapshot copies metadata, never file data, so its time follows the
//! number of files). Prints a table and one JSON line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use shoal_e2e::csi::{CsiDriver, mount_capability};
use shoal_e2e::{Summary, TestCluster, spread};
use shoal_proto::csi_v1::volume_capability::access_mode::Mode;
use shoal_proto::csi_v1::volume_content_source::SnapshotSource;
use shoal_proto::csi_v1::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest, VolumeContentSource, volume_content_source,
};

#[derive(Debug, Parser)]
#[command(about = "Benchmark Shoal's CSI provisioning, publishing and snapshots")]
struct Args {
    /// Files in each snapshotted volume.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Bytes in the large volume (spread evenly over its files).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Volumes created and published to time those calls.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Threads writing files into a volume.
    #[arg(long, default_value_t = 8)]
    writers: usize,
}

fn seconds(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Writes `files` files of `size` bytes under `dir`, 100 to a directory,
/// from `writers` threads.
fn fill(dir: &Path, files: usize, size: usize, writers: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            s.spawn(move || {
                let data: Vec<u8> = (0..size).map(|i| (i * 31 + w) as u8).collect();
                for i in (w..files).step_by(writers) {
                    let sub = dir.join(format!("d{:03}", i / 100));
                    std::fs::create_dir_all(&sub).expect("mkdir");
                    std::fs::write(sub.join(format!("f{i:05}")), &data).expect("write");
                }
            });
        }
    });
    seconds(start)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = TestCluster::start(&spread(3, 3), 3).await?;
    let root = cluster.root().to_path_buf();
    let csi = CsiDriver::start(&cluster.peers[0].dir, &root.join("csi.sock"), "node-0").await?;
    let (ctl, mut node) = (csi.controller(), csi.node());
    let cap = mount_capability(Mode::MultiNodeMultiWriter, &[]);
    let create = |name: String, size: u64, source: Option<VolumeContentSource>| {
        let mut ctl = ctl.clone();
        let request = CreateVolumeRequest {
            name,
            capacity_range: Some(CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            volume_content_source: source,
            ..Default::default()
        };
        async move {
            let start = Instant::now();
            ctl.create_volume(request).await?;
            anyhow::Ok(start.elapsed())
        }
    };
    let publish = |volume: &str, target: &Path| NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let target = |name: &str| -> PathBuf {
        let dir = root.join("pods").join(name);
        std::fs::create_dir_all(&dir).expect("pod dir");
        dir.join("mount")
    };

    // CreateVolume and NodePublishVolume of empty volumes.
    let (mut creates, mut publishes, mut unpublishes) = (Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..args.rounds {
        let name = format!("pvc-round-{i}");
        creates.push(create(name.clone(), 1 << 30, None).await?.as_micros() as u64);
        let t = target(&name);
        let start = Instant::now();
        node.node_publish_volume(publish(&name, &t)).await?;
        publishes.push(start.elapsed().as_micros() as u64);
        let start = Instant::now();
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: name,
            target_path: t.display().to_string(),
        })
        .await?;
        unpublishes.push(start.elapsed().as_micros() as u64);
    }
    let total = seconds(started);
    let (creates, publishes, unpublishes) = (
        Summary::of(creates, total),
        Summary::of(publishes, total),
        Summary::of(unpublishes, total),
    );

    // Two volumes with the same files, one with 100 times the data.
    let mut snapshots = Vec::new();
    for (name, bytes) in [("pvc-small", args.bytes / 100), ("pvc-large", args.bytes)] {
        let size = (bytes / args.files as u64) as usize;
        create(name.into(), bytes * 2 + (1 << 30), None).await?;
        let t = target(name);
        node.node_publish_volume(publish(name, &t)).await?;
        let fill_s = fill(&t, args.files, size, args.writers);
        let start = Instant::now();
        let snapshot = ctl
            .clone()
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: name.into(),
                name: format!("snap-{name}"),
                ..Default::default()
            })
            .await?
            .into_inner()
            .snapshot
            .unwrap_or_default();
        let snapshot_s = seconds(start);
        let restore = create(
            format!("{name}-restored"),
            bytes * 2 + (1 << 30),
            Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: snapshot.snapshot_id.clone(),
                })),
            }),
        )
        .await?
        .as_secs_f64();
        // The restored volume lists and reads like the original.
        let restored = target(&format!("{name}-restored"));
        node.node_publish_volume(publish(&format!("{name}-restored"), &restored))
            .await?;
        let start = Instant::now();
        let listed: usize = std::fs::read_dir(&restored)?
            .map(|d| std::fs::read_dir(d.map(|d| d.path())?).map(|e| e.count()))
            .sum::<std::io::Result<usize>>()?;
        let list_s = seconds(start);
        anyhow::ensure!(
            listed == args.files,
            "restored {listed} of {} files",
            args.files
        );
        snapshots.push(serde_json::json!({
            "volume": name,
            "files": args.files,
            "bytes": size as u64 * args.files as u64,
            "fill_s": fill_s,
            "snapshot_s": snapshot_s,
            "snapshot_size_bytes": snapshot.size_bytes,
            "restore_create_volume_s": restore,
            "restored_listing_s": list_s,
        }));
    }

    println!(
        "Shoal CSI: 3 peers, R=3, loopback, shoal-csi on a unix socket; {} rounds",
        args.rounds
    );
    for (what, s) in [
        ("CreateVolume", creates),
        ("NodePublishVolume", publishes),
        ("NodeUnpublishVolume", unpublishes),
    ] {
        println!(
            "  {what:<20} p50 {:>8.1} ms   p99 {:>8.1} ms",
            s.p50_us as f64 / 1000.0,
            s.p99_us as f64 / 1000.0
        );
    }
    for s in &snapshots {
        println!(
            "  CreateSnapshot of {} files, {:>6.0} MiB: {:>6.2} s  (restore CreateVolume {:.3} s, \
             listing the restored volume {:.2} s; filling it took {:.0} s)",
            s["files"],
            s["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
            s["snapshot_s"].as_f64().unwrap_or(0.0),
            s["restore_create_volume_s"].as_f64().unwrap_or(0.0),
            s["restored_listing_s"].as_f64().unwrap_or(0.0),
            s["fill_s"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "csi",
            "create_volume": creates,
            "node_publish_volume": publishes,
            "node_unpublish_volume": unpublishes,
            "snapshots": snapshots,
        })
    );
    Ok(())
}
