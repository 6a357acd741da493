//! The Node service: publishing a volume at a pod's target path (the local
//! peer mounts it and records the mount, so it survives restarts of this
//! process and of the peer), statistics and condition of published
//! volumes, and this node's identity and topology. No staging step: a
//! FUSE mount per target costs nothing a shared staging mount would save.

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_proto::admin::{ListMountsRequest, MountInfo, MountRequest, UnmountRequest};
use shoal_proto::csi_v1::node_server::Node;
use shoal_proto::csi_v1::node_service_capability::{Rpc, Type, rpc};
use shoal_proto::csi_v1::volume_capability::AccessType;
use shoal_proto::csi_v1::*;
use tonic::{Code, Request, Response, Status};
use tracing::info;

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

impl Driver {
    async fn mounts(&self) -> Result<Vec<MountInfo>, Status> {
        Ok(self
            .peer()
            .list_mounts(ListMountsRequest {})
            .await?
            .into_inner()
            .mounts)
    }

    /// The mount of `volume_id` at `path` on this node, if published there.
    async fn published(&self, volume_id: &str, path: &str) -> Result<MountInfo, Status> {
        let target = canonical(path);
        self.mounts()
            .await?
            .into_iter()
            .find(|m| Path::new(&m.target) == target && m.volume == volume_id)
            .ok_or_else(|| {
                Status::not_found(format!("volume {volume_id} is not published at {path}"))
            })
    }
}

#[tonic::async_trait]
impl Node for Driver {
    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("Shoal publishes without staging"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("Shoal publishes without staging"))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        required(&r.target_path, "target_path")?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let mode = request::capability(cap)?;
        let options = match &cap.access_type {
            Some(AccessType::Mount(m)) => m.mount_flags.clone(),
            _ => Vec::new(),
        };
        let volume = id(&r.volume_id, "volume_id")?;
        if !Path::new(&r.target_path).is_absolute() {
            return Err(Status::invalid_argument(format!(
                "target_path {:?} is not absolute",
                r.target_path
            )));
        }
        let _op = self.claim("volume", volume)?;
        let target = canonical(&r.target_path);
        if request::single_target(mode)
            && let Some(other) = self
                .mounts()
                .await?
                .into_iter()
                .find(|m| m.volume == volume && Path::new(&m.target) != target)
        {
            return Err(Status::failed_precondition(format!(
                "volume {volume} is already published at {} on this node, and its access mode \
                 allows one",
                other.target
            )));
        }
        match std::fs::create_dir_all(&r.target_path) {
            Ok(()) => {}
            // A mount left by a killed peer: the peer repairs it.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTCONN) => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot create target_path {}: {e}",
                    r.target_path
                )));
            }
        }
        self.peer()
            .mount(MountRequest {
                volume: volume.to_string(),
                target: r.target_path.clone(),
                read_only: r.readonly || request::read_only(mode),
                publish: true,
                options,
            })
            .await?;
        info!(volume, target = r.target_path, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        required(&r.target_path, "target_path")?;
        let _op = self.claim("volume", &r.volume_id)?;
        match self
            .peer()
            .unmount(UnmountRequest {
                target: r.target_path.clone(),
            })
            .await
        {
            Ok(_) => {}
            // Not mounted (any more): unpublishing is idempotent.
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s),
        }
        match std::fs::remove_dir(&r.target_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "cannot remove target_path {}: {e}",
                    r.target_path
                )));
            }
        }
        info!(volume = r.volume_id, target = r.target_path, "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        let mount = self.published(&r.volume_id, &r.volume_path).await?;
        let path = PathBuf::from(&mount.target);
        let stat = tokio::time::timeout(
            STATS_TIMEOUT,
            tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path)),
        )
        .await;
        let (usage, problem) = match stat {
            Ok(Ok(Ok(stat))) => (usage(&stat), mount.problem),
            Ok(Ok(Err(e))) => (Vec::new(), format!("statvfs {}: {e}", mount.target)),
            Ok(Err(e)) => (Vec::new(), e.to_string()),
            Err(_) => (
                Vec::new(),
                format!("{} did not answer within {STATS_TIMEOUT:?}", mount.target),
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
        self.published(&r.volume_id, &r.volume_path).await?;
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
