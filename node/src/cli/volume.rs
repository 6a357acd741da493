//! `shoal volume …`, `shoal snapshot …`, `shoal mount` and `shoal umount`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use shoal_proto::admin::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    ListSnapshotsRequest, ListVolumesRequest, MountRequest, ResizeVolumeRequest, UnmountRequest,
    Volume,
};

use super::{PeerArgs, parse_size, shutdown_signal, status_error};
use crate::admin;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (an empty POSIX filesystem).
    Create {
        name: String,
        /// Size limit, e.g. 10GiB.
        #[arg(long, default_value = "10GiB", value_parser = parse_size)]
        size: u64,
        /// Replicas of every block (default: the cluster's).
        #[arg(long)]
        replicas: Option<u32>,
        /// Start with this snapshot's content.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Start with a copy of this volume's content (no data is copied:
        /// the volumes share chunks).
        #[arg(long)]
        from_volume: Option<String>,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// List volumes with their size, use and files.
    List {
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Delete a volume (it must not be mounted).
    Delete {
        name: String,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Change a volume's size limit.
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        peer: PeerArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume (its files as committed now; no file
    /// data is copied).
    Create {
        name: String,
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// Delete a snapshot.
    Delete {
        name: String,
        #[command(flatten)]
        peer: PeerArgs,
    },
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

fn print_volume(v: &Volume) {
    println!(
        "volume {}: {} (used {}), {} replicas, {} files",
        v.name,
        size(v.size),
        size(v.used),
        v.replicas,
        v.files
    );
}

pub async fn run(command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            from_snapshot,
            from_volume,
            peer,
        } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .create_volume(CreateVolumeRequest {
                    name,
                    size,
                    replicas: replicas.unwrap_or(0),
                    from_snapshot: from_snapshot.unwrap_or_default(),
                    from_volume: from_volume.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?;
            if let Some(v) = reply.into_inner().volume {
                print_volume(&v);
            }
        }
        VolumeCommand::List { peer } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .list_volumes(ListVolumesRequest {})
                .await
                .map_err(status_error)?;
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header(["NAME", "SIZE", "USED", "REPLICAS", "FILES"]);
            for v in reply.into_inner().volumes {
                table.add_row([
                    v.name.clone(),
                    size(v.size),
                    size(v.used),
                    v.replicas.to_string(),
                    v.files.to_string(),
                ]);
            }
            println!("{table}");
        }
        VolumeCommand::Delete { name, peer } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .delete_volume(DeleteVolumeRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "deleted volume {name}; peers freed {} in {} blocks",
                size(reply.freed_bytes),
                reply.freed_blocks
            );
        }
        VolumeCommand::Resize { name, size, peer } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .resize_volume(ResizeVolumeRequest { name, size })
                .await
                .map_err(status_error)?;
            if let Some(v) = reply.into_inner().volume {
                print_volume(&v);
            }
        }
    }
    Ok(())
}

pub async fn snapshot(command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create { name, volume, peer } => {
            let s = admin::connect(&peer.dir)
                .await?
                .create_snapshot(CreateSnapshotRequest {
                    name,
                    source: volume,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            println!(
                "snapshot {} of volume {}: {} in {} files",
                s.name,
                s.source,
                size(s.bytes),
                s.files
            );
        }
        SnapshotCommand::List { peer } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .list_snapshots(ListSnapshotsRequest {})
                .await
                .map_err(status_error)?;
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header(["NAME", "VOLUME", "USED", "FILES", "TAKEN"]);
            for s in reply.into_inner().snapshots {
                let taken =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.created.max(0) as u64);
                table.add_row([
                    s.name.clone(),
                    s.source.clone(),
                    size(s.bytes),
                    s.files.to_string(),
                    humantime::format_rfc3339_seconds(taken).to_string(),
                ]);
            }
            println!("{table}");
        }
        SnapshotCommand::Delete { name, peer } => {
            let reply = admin::connect(&peer.dir)
                .await?
                .delete_snapshot(DeleteSnapshotRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "deleted snapshot {name}; peers freed {} in {} blocks",
                size(reply.freed_bytes),
                reply.freed_blocks
            );
        }
    }
    Ok(())
}

/// The absolute form of a mount point the user named (a stale mount left
/// by a dead peer cannot be resolved, but the peer repairs it).
fn absolute(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    match dir.canonicalize() {
        Ok(p) => Ok(p),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(std::path::absolute(dir)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("mount point {} does not exist", dir.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot resolve {}", dir.display())),
    }
}

/// Asks the local peer to mount `volume` at `dir`, keeps it mounted until
/// Ctrl-C or SIGTERM, then unmounts.
pub async fn mount(
    volume: String,
    dir: PathBuf,
    read_only: bool,
    options: Vec<String>,
    peer: PeerArgs,
) -> anyhow::Result<()> {
    let target = absolute(&dir)?;
    let mut client = admin::connect(&peer.dir).await?;
    let reply = client
        .mount(MountRequest {
            volume: volume.clone(),
            target: target.display().to_string(),
            read_only,
            options,
            publish: false,
        })
        .await
        .map_err(status_error)?;
    let target = reply.into_inner().target;
    eprintln!("volume {volume} mounted at {target}; Ctrl-C unmounts");
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = unmounted_elsewhere(&target) => {
            eprintln!("{target} was unmounted");
            return Ok(());
        }
    }
    client
        .unmount(UnmountRequest {
            target: target.clone(),
        })
        .await
        .map_err(status_error)?;
    eprintln!("unmounted {target}");
    Ok(())
}

/// Resolves once nothing is mounted at `target` any more (`shoal umount`,
/// or the peer stopped).
async fn unmounted_elsewhere(target: &str) {
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
            info.lines().any(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|p| p.replace("\\040", " ") == target)
            })
        })
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        if !mounted() {
            return;
        }
    }
}

pub async fn umount(dir: PathBuf, peer: PeerArgs) -> anyhow::Result<()> {
    let target = absolute(&dir)?;
    admin::connect(&peer.dir)
        .await?
        .unmount(UnmountRequest {
            target: target.display().to_string(),
        })
        .await
        .map_err(status_error)?;
    println!("unmounted {}", target.display());
    Ok(())
}
