//! The Node service: a volume is mounted once per node, at the staging
//! path (the local peer mounts it and records the mount, so it survives
//! restarts of this process and of the peer), and each pod's target is a
//! bind mount of it, so the pods of a node share one cache and one
//! write-back session. Also statistics and condition of published
//! volumes, and this node's identity and topology.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use shoal_keeper::mountinfo;
use shoal_proto::admin::{ListMountsRequest, MountInfo, MountRequest, UnmountRequest};
use shoal_proto::csi_v1::node_server::Node;
use shoal_proto::csi_v1::node_service_capability::{Rpc, Type, rpc};
use shoal_proto::csi_v1::volume_capability::AccessType;
use shoal_proto::csi_v1::volume_capability::access_mode::Mode;
use shoal_proto::csi_v1::*;
use tonic::{Code, Request, Response, Status};
use tracing::{info, warn};

use crate::Driver;
use crate::request::{self, id, required};
use crate::topology;

/// How long a published volume may take to answer `statvfs`.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// A path as the peer records it (targets are canonical there; a stale
/// mount cannot be resolved, so it is taken as given).
fn canonical(path: &str) -> PathBuf {
    Path::new(path)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(path))
}

fn absolute<'a>(path: &'a str, field: &str) -> Result<&'a str, Status> {
    required(path, field)?;
    if !Path::new(path).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} {path:?} is not absolute"
        )));
    }
    Ok(path)
}

fn usage(stat: &nix::sys::statvfs::Statvfs) -> Vec<VolumeUsage> {
    let frsize = stat.fragment_size() as i64;
    let total = stat.blocks() as i64 * frsize;
    vec![
        VolumeUsage {
            available: stat.blocks_available() as i64 * frsize,
            total,
            used: total - stat.blocks_free() as i64 * frsize,
            unit: volume_usage::Unit::Bytes as i32,
        },
        VolumeUsage {
            available: stat.files_available() as i64,
            total: stat.files() as i64,
            used: stat.files() as i64 - stat.files_free() as i64,
            unit: volume_usage::Unit::Inodes as i32,
        },
    ]
}

/// The access mode and mount options of a request's capability.
fn mount_capability(cap: Option<&VolumeCapability>) -> Result<(Mode, Vec<String>), Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    let mode = request::capability(cap)?;
    let options = match &cap.access_type {
        Some(AccessType::Mount(m)) => m.mount_flags.clone(),
        _ => Vec::new(),
    };
    Ok((mode, options))
}

/// Makes a directory for a mount; one holding a mount that lost its server
/// ("transport endpoint is not connected") counts as made.
fn make_dir(path: &str, field: &str) -> Result<(), Status> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTCONN) => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "cannot create {field} {path}: {e}"
        ))),
    }
}

/// Removes a mount's directory once nothing is mounted there (kubelet
/// removes it too; either may come first).
fn remove_dir(path: &str, field: &str) -> Result<(), Status> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "cannot remove {field} {path}: {e}"
        ))),
    }
}

/// The per-mount flags a pod's bind mount gets: those of the staging mount
/// (every Shoal mount is nodev and noatime), the requested options, and
/// read-only when asked.
fn bind_flags(options: &[String], read_only: bool) -> Result<MsFlags, Status> {
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    for option in options.iter().flat_map(|o| o.split(',')) {
        flags |= match option.trim() {
            "" | "rw" | "defaults" | "nodev" | "noatime" | "relatime" | "nodiratime" | "exec"
            | "suid" => MsFlags::empty(),
            "ro" => MsFlags::MS_RDONLY,
            "noexec" => MsFlags::MS_NOEXEC,
            "nosuid" => MsFlags::MS_NOSUID,
            // Filesystem behaviour, set on the staging mount.
            "sync" | "dirsync" => MsFlags::empty(),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unsupported mount option {other:?}"
                )));
            }
        };
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    Ok(flags)
}

impl Driver {
    async fn mounts(&self) -> Result<Vec<MountInfo>, Status> {
        Ok(self
            .peer()
            .list_mounts(ListMountsRequest {})
            .await?
            .into_inner()
            .mounts)
    }

    /// The peer's mount of `volume_id` at `path` on this node.
    async fn staged(&self, volume_id: &str, path: &str) -> Result<MountInfo, Status> {
        let target = canonical(path);
        self.mounts()
            .await?
            .into_iter()
            .find(|m| Path::new(&m.target) == target && m.volume == volume_id)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volume {volume_id} is not staged at {path} on this node"
                ))
            })
    }

    /// The peer's mount of `volume_id` that `path` shows: its staging
    /// mount, or a pod's bind mount of it.
    async fn serving(&self, volume_id: &str, path: &str) -> Result<MountInfo, Status> {
        let not_found =
            || Status::not_found(format!("volume {volume_id} is not published at {path}"));
        let device = mountinfo::device_of(&canonical(path)).ok_or_else(not_found)?;
        self.mounts()
            .await?
            .into_iter()
            .filter(|m| m.volume == volume_id)
            .find(|m| mountinfo::device_of(Path::new(&m.target)) == Some(device))
            .ok_or_else(not_found)
    }
}

#[tonic::async_trait]
impl Node for Driver {
    /// "This RPC is called by the CO prior to the volume being consumed by
    /// any workloads on the node by `NodePublishVolume`." The peer mounts
    /// the volume at the staging path, once for every pod of this node.
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = id(&r.volume_id, "volume_id")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let (mode, options) = mount_capability(r.volume_capability.as_ref())?;
        bind_flags(&options, false)?;
        let _op = self.claim("volume", volume)?;
        make_dir(staging, "staging_target_path")?;
        match self
            .peer()
            .mount(MountRequest {
                volume: volume.to_string(),
                target: staging.to_string(),
                read_only: request::read_only(mode),
                publish: true,
                options,
            })
            .await
        {
            Ok(_) => {}
            // Staged there already, another way.
            Err(s) if s.code() == Code::AlreadyExists || s.code() == Code::FailedPrecondition => {
                return Err(Status::already_exists(s.message().to_string()));
            }
            Err(s) => return Err(s),
        }
        info!(volume, staging, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    /// "It MUST be called by the CO once all workloads using the volume
    /// are done (NodeUnpublishVolume)." The peer unmounts the staging path
    /// and forgets it.
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let _op = self.claim("volume", &r.volume_id)?;
        match self
            .peer()
            .unmount(UnmountRequest {
                target: staging.to_string(),
            })
            .await
        {
            Ok(_) => {}
            // Not staged (any more): unstaging is idempotent.
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s),
        }
        remove_dir(staging, "staging_target_path")?;
        info!(volume = r.volume_id, staging, "unstaged");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    /// "The CO SHALL ensure ... NodeStageVolume has been called" first. The
    /// pod's target is a bind mount of the staging mount, read-only when
    /// asked.
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = id(&r.volume_id, "volume_id")?;
        let target = absolute(&r.target_path, "target_path")?;
        let staging = absolute(&r.staging_target_path, "staging_target_path")?;
        let (mode, options) = mount_capability(r.volume_capability.as_ref())?;
        let read_only = r.readonly || request::read_only(mode);
        let flags = bind_flags(&options, read_only)?;
        let _op = self.claim("volume", volume)?;
        let stage = match self.staged(volume, staging).await {
            Ok(stage) => stage,
            Err(not_staged) => {
                // A volume that does not exist is NOT_FOUND, as the
                // specification asks; one that exists is not staged here.
                self.volume(volume).await?;
                return Err(not_staged);
            }
        };
        let staging = canonical(staging);
        let device = mountinfo::device_of(&staging).ok_or_else(|| {
            Status::failed_precondition(format!(
                "nothing is mounted at staging_target_path {}",
                staging.display()
            ))
        })?;
        let target_path = canonical(target);
        let table = mountinfo::read();
        if let Some(here) = table.iter().rev().find(|m| m.point == target_path) {
            if here.device != device {
                return Err(Status::already_exists(format!(
                    "{target} has another filesystem mounted"
                )));
            }
            let mounted_ro = here.options.split(',').any(|o| o == "ro");
            if mounted_ro != read_only {
                return Err(Status::already_exists(format!(
                    "volume {volume} is published at {target} {}",
                    if mounted_ro {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        if request::single_target(mode)
            && let Some(other) = table
                .iter()
                .find(|m| m.device == device && m.point != staging && m.point != target_path)
        {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is already published at {} on this node, and its access mode \
                 allows one",
                other.point.display()
            )));
        }
        make_dir(target, "target_path")?;
        let bind = |flags: MsFlags| {
            nix::mount::mount(
                Some(&staging),
                Path::new(target),
                None::<&str>,
                flags,
                None::<&str>,
            )
        };
        bind(MsFlags::MS_BIND).map_err(|e| {
            Status::internal(format!("bind mount of {} at {target}: {e}", stage.target))
        })?;
        // A bind mount takes its per-mount flags on a second call.
        if let Err(e) = bind(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags) {
            let _ = nix::mount::umount2(Path::new(target), MntFlags::MNT_DETACH);
            return Err(Status::internal(format!(
                "setting {flags:?} on {target}: {e}"
            )));
        }
        info!(volume, target, read_only, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    /// "It MUST be idempotent": the pod's bind mount goes; a target with
    /// nothing mounted counts as unpublished.
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let target = absolute(&r.target_path, "target_path")?;
        let _op = self.claim("volume", &r.volume_id)?;
        let point = canonical(target);
        // Every mount stacked there (a retried publish may have left two).
        while mountinfo::device_of(&point).is_some() {
            if let Err(e) = nix::mount::umount2(&point, MntFlags::empty()) {
                warn!(target, "unmount failed ({e}); detaching");
                nix::mount::umount2(&point, MntFlags::MNT_DETACH)
                    .map_err(|e| Status::internal(format!("cannot unmount {target}: {e}")))?;
            }
        }
        remove_dir(target, "target_path")?;
        info!(volume = r.volume_id, target, "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        let mount = self.serving(&r.volume_id, &r.volume_path).await?;
        let path = PathBuf::from(&r.volume_path);
        let stat = tokio::time::timeout(
            STATS_TIMEOUT,
            tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path)),
        )
        .await;
        let (usage, problem) = match stat {
            Ok(Ok(Ok(stat))) => (usage(&stat), mount.problem),
            Ok(Ok(Err(e))) => (Vec::new(), format!("statvfs {}: {e}", r.volume_path)),
            Ok(Err(e)) => (Vec::new(), e.to_string()),
            Err(_) => (
                Vec::new(),
                format!("{} did not answer within {STATS_TIMEOUT:?}", r.volume_path),
            ),
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: !problem.is_empty(),
                message: if problem.is_empty() {
                    "mounted and answering".into()
                } else {
                    problem
                },
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        if let Some(cap) = &r.volume_capability {
            request::capability(cap)?;
        }
        self.serving(&r.volume_id, &r.volume_path).await?;
        let volume = self.volume(&r.volume_id).await?;
        if let Some(range) = &r.capacity_range
            && range.required_bytes > volume.size as i64
        {
            return Err(Status::out_of_range(format!(
                "volume {} is {} bytes; expand it through the controller to {} first",
                volume.name, volume.size, range.required_bytes
            )));
        }
        // The mount's statfs reports the volume's size as it is now.
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: volume.size as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let me = self.me().await?;
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology::segment(&me)),
        }))
    }
}
