//! The Controller service: provisioning (create, delete, expand), content
//! sources (snapshots and clones, which share chunks and copy no file
//! data), listing with pagination, capacity per topology segment, and
//! volume condition. Shoal needs no attach step: any node's peer can mount
//! any volume, so Controller(Un)PublishVolume is not offered.

use shoal_proto::admin::{
    CreateSnapshotRequest as PeerSnapshotRequest, CreateVolumeRequest as PeerCreateRequest,
    DeleteSnapshotRequest as PeerDeleteSnapshot, DeleteVolumeRequest as PeerDeleteRequest,
    GetVolumeRequest, ListSnapshotsRequest as PeerListSnapshots, ListVolumesRequest as PeerList,
    Member, NodeState, ResizeVolumeRequest, Snapshot as PeerSnapshot, Volume as PeerVolume,
};
use shoal_proto::csi_v1::controller_server::Controller;
use shoal_proto::csi_v1::controller_service_capability::{Rpc, Type, rpc};
use shoal_proto::csi_v1::validate_volume_capabilities_response::Confirmed;
use shoal_proto::csi_v1::volume_content_source::{SnapshotSource, VolumeSource};
use shoal_proto::csi_v1::*;
use tonic::{Code, Request, Response, Status};

use crate::Driver;
use crate::request::{self, id, required, shoal_name};
use crate::topology;

/// What a volume started from, in CSI's terms.
fn content_source(v: &PeerVolume) -> Option<VolumeContentSource> {
    let source = if !v.from_snapshot.is_empty() {
        volume_content_source::Type::Snapshot(SnapshotSource {
            snapshot_id: v.from_snapshot.clone(),
        })
    } else if !v.from_volume.is_empty() {
        volume_content_source::Type::Volume(VolumeSource {
            volume_id: v.from_volume.clone(),
        })
    } else {
        return None;
    };
    Some(VolumeContentSource {
        r#type: Some(source),
    })
}

fn csi_volume(v: &PeerVolume, accessible: Vec<Topology>) -> Volume {
    Volume {
        capacity_bytes: v.size as i64,
        volume_id: v.name.clone(),
        volume_context: [("replicas".to_string(), v.replicas.to_string())].into(),
        content_source: content_source(v),
        accessible_topology: accessible,
    }
}

fn csi_snapshot(s: &PeerSnapshot) -> Snapshot {
    Snapshot {
        size_bytes: s.bytes as i64,
        snapshot_id: s.name.clone(),
        source_volume_id: s.source.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created,
            nanos: s.created_nanos as i32,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// A volume is abnormal while fewer peers are live than it keeps replicas
/// of: new writes cannot reach all of them.
fn condition(v: &PeerVolume, members: &[Member]) -> VolumeCondition {
    let live = members
        .iter()
        .filter(|m| m.state == NodeState::Alive as i32)
        .count();
    if live < v.replicas as usize {
        VolumeCondition {
            abnormal: true,
            message: format!(
                "{live} live peers for {} replicas: the volume is under-replicated",
                v.replicas
            ),
        }
    } else {
        VolumeCondition {
            abnormal: false,
            message: format!("{} replicas on {live} live peers", v.replicas),
        }
    }
}

/// Content source as the peer takes it: (snapshot, volume).
fn source_names(source: Option<&VolumeContentSource>) -> Result<(String, String), Status> {
    Ok(match source.and_then(|s| s.r#type.as_ref()) {
        None => Default::default(),
        Some(volume_content_source::Type::Snapshot(s)) => (
            id(&s.snapshot_id, "snapshot_id")?.to_string(),
            String::new(),
        ),
        Some(volume_content_source::Type::Volume(v)) => (
            String::new(),
            id(&v.volume_id, "source volume_id")?.to_string(),
        ),
    })
}

impl Driver {
    async fn get_volume(&self, name: &str) -> Result<Option<PeerVolume>, Status> {
        match self
            .peer()
            .get_volume(GetVolumeRequest { name: name.into() })
            .await
        {
            Ok(r) => Ok(r.into_inner().volume),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// The volume `volume_id` names, or NOT_FOUND.
    pub(crate) async fn volume(&self, volume_id: &str) -> Result<PeerVolume, Status> {
        self.get_volume(id(volume_id, "volume_id")?)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {volume_id} does not exist")))
    }

    async fn snapshots(&self) -> Result<Vec<PeerSnapshot>, Status> {
        Ok(self
            .peer()
            .list_snapshots(PeerListSnapshots {})
            .await?
            .into_inner()
            .snapshots)
    }
}

#[tonic::async_trait]
impl Controller for Driver {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = shoal_name(required(&r.name, "name")?, "vol")?;
        request::capabilities(&r.volume_capabilities)?;
        let size = request::size(r.capacity_range.as_ref())?;
        let params = request::parameters(&r.parameters)?;
        let (from_snapshot, from_volume) = source_names(r.volume_content_source.as_ref())?;
        let _op = self.claim("volume", &name)?;
        let status = self.status().await?;
        let accessible =
            topology::accessible(&status.members, r.accessibility_requirements.as_ref())?;
        let replicas = params.replicas.unwrap_or(status.replication);
        if let Some(domain) = params.failure_domain {
            let cluster = status
                .failure_domain
                .parse()
                .map_err(|e: String| Status::internal(e))?;
            topology::check_spread(&status.members, cluster, domain, replicas)?;
        }
        let compatible = |v: &PeerVolume| {
            request::fits(v.size, r.capacity_range.as_ref())
                && params.replicas.is_none_or(|want| want == v.replicas)
                && v.from_snapshot == from_snapshot
                && v.from_volume == from_volume
        };
        let existing = match self.get_volume(&name).await? {
            Some(v) => Some(v),
            None => {
                let created = self
                    .peer()
                    .create_volume(PeerCreateRequest {
                        name: name.clone(),
                        size,
                        replicas,
                        from_snapshot: from_snapshot.clone(),
                        from_volume: from_volume.clone(),
                    })
                    .await;
                match created {
                    Ok(reply) => {
                        let v = reply.into_inner().volume.unwrap_or_default();
                        return Ok(Response::new(CreateVolumeResponse {
                            volume: Some(csi_volume(&v, accessible)),
                        }));
                    }
                    // Made meanwhile by another controller: compare below.
                    Err(s) if s.code() == Code::AlreadyExists => self.get_volume(&name).await?,
                    Err(s) => return Err(s),
                }
            }
        };
        match existing {
            Some(v) if compatible(&v) => Ok(Response::new(CreateVolumeResponse {
                volume: Some(csi_volume(&v, accessible)),
            })),
            Some(v) => Err(Status::already_exists(format!(
                "volume {name} exists with {} bytes, {} replicas and another content source or size",
                v.size, v.replicas
            ))),
            None => Err(Status::aborted(format!(
                "volume {name} was deleted while being created; try again"
            ))),
        }
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let volume_id = request.into_inner().volume_id;
        required(&volume_id, "volume_id")?;
        // An id Shoal never issued names no volume: deleting it is done.
        if id(&volume_id, "volume_id").is_err() {
            return Ok(Response::new(DeleteVolumeResponse {}));
        }
        let _op = self.claim("volume", &volume_id)?;
        match self
            .peer()
            .delete_volume(PeerDeleteRequest {
                name: volume_id.clone(),
            })
            .await
        {
            Ok(_) => Ok(Response::new(DeleteVolumeResponse {})),
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(DeleteVolumeResponse {})),
            Err(s) => Err(s),
        }
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Shoal volumes need no attach step: every node's peer mounts them",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Shoal volumes need no attach step: every node's peer mounts them",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.volume(&r.volume_id).await?;
        let unsupported = request::capabilities(&r.volume_capabilities)
            .and_then(|()| request::parameters(&r.parameters).map(|_| ()))
            .err();
        Ok(Response::new(match unsupported {
            Some(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            },
            None => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let volumes = self
            .peer()
            .list_volumes(PeerList {})
            .await?
            .into_inner()
            .volumes;
        let (page, next_token) =
            request::page(volumes, |v| &v.name, &r.starting_token, r.max_entries)?;
        let status = self.status().await?;
        let accessible = topology::accessible(&status.members, None)?;
        Ok(Response::new(ListVolumesResponse {
            entries: page
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(csi_volume(v, accessible.clone())),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: Vec::new(),
                        volume_condition: Some(condition(v, &status.members)),
                    }),
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = request.into_inner();
        if !r.volume_capabilities.is_empty() {
            request::capabilities(&r.volume_capabilities)?;
        }
        let params = request::parameters(&r.parameters)?;
        let status = self.status().await?;
        let replicas = params.replicas.unwrap_or(status.replication);
        let available =
            topology::capacity(&status.members, r.accessible_topology.as_ref(), replicas) as i64;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::GetVolume,
            rpc::Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        required(&r.source_volume_id, "source_volume_id")?;
        let name = shoal_name(required(&r.name, "name")?, "snap")?;
        let source = id(&r.source_volume_id, "source_volume_id")?;
        let _op = self.claim("snapshot", &name)?;
        let snapshot = self
            .peer()
            .create_snapshot(PeerSnapshotRequest {
                name,
                source: source.to_string(),
            })
            .await?
            .into_inner()
            .snapshot
            .unwrap_or_default();
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&snapshot)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let snapshot_id = request.into_inner().snapshot_id;
        required(&snapshot_id, "snapshot_id")?;
        if id(&snapshot_id, "snapshot_id").is_err() {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        }
        let _op = self.claim("snapshot", &snapshot_id)?;
        match self
            .peer()
            .delete_snapshot(PeerDeleteSnapshot { name: snapshot_id })
            .await
        {
            Ok(_) => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(s) => Err(s),
        }
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let snapshots: Vec<PeerSnapshot> = self
            .snapshots()
            .await?
            .into_iter()
            .filter(|s| r.snapshot_id.is_empty() || s.name == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.source == r.source_volume_id)
            .collect();
        let (page, next_token) =
            request::page(snapshots, |s| &s.name, &r.starting_token, r.max_entries)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        if let Some(cap) = &r.volume_capability {
            request::capability(cap)?;
        }
        let wanted = request::size(Some(&range))?;
        let _op = self.claim("volume", &r.volume_id)?;
        let volume = self.volume(&r.volume_id).await?;
        if range.limit_bytes > 0 && volume.size > range.limit_bytes as u64 {
            return Err(Status::out_of_range(format!(
                "volume {} already holds {} bytes, above limit_bytes {}",
                volume.name, volume.size, range.limit_bytes
            )));
        }
        let size = if wanted > volume.size {
            self.peer()
                .resize_volume(ResizeVolumeRequest {
                    name: volume.name.clone(),
                    size: wanted,
                })
                .await?
                .into_inner()
                .volume
                .map_or(wanted, |v| v.size)
        } else {
            volume.size
        };
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            // The peer's statfs reports the new size at once.
            node_expansion_required: false,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let volume_id = request.into_inner().volume_id;
        required(&volume_id, "volume_id")?;
        let volume = self.volume(&volume_id).await?;
        let status = self.status().await?;
        let accessible = topology::accessible(&status.members, None)?;
        Ok(Response::new(ControllerGetVolumeResponse {
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition(&volume, &status.members)),
            }),
            volume: Some(csi_volume(&volume, accessible)),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Shoal volumes have no mutable parameters",
        ))
    }
}
