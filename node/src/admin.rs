//! The admin API: gRPC (tonic) on a unix socket in the peer's data dir. Only
//! local users who can reach the data dir can use it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use shoal_core::fs::{SnapshotRecord, Source};
use shoal_core::{Address, NodeInfo, NodeState};
use shoal_proto::admin::admin_client::AdminClient;
use shoal_proto::admin::admin_server::{Admin, AdminServer};
use shoal_proto::admin::{
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeReply,
    DeleteVolumeRequest, GetVolumeRequest, ListMountsReply, ListMountsRequest, ListSnapshotsReply,
    ListSnapshotsRequest, ListVolumesReply, ListVolumesRequest, MountInfo, MountReply,
    MountRequest, ResizeVolumeRequest, Snapshot, SnapshotReply, UnmountReply, UnmountRequest,
    Volume, VolumeReply,
};
use shoal_proto::admin::{
    GetBlockReply, GetBlockRequest, GetMutableReply, GetMutableRequest, IsolateReply,
    IsolateRequest, ListLocalBlocksReply, ListLocalBlocksRequest, LocateBlockReply,
    LocateBlockRequest, Member, PutBlockReply, PutBlockRequest, PutMutableReply, PutMutableRequest,
    SetDrainingReply, SetDrainingRequest, StatusReply, StatusRequest, put_mutable_reply,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::blocks::{BlockError, Blocks};
use crate::consensus::{Consensus, ConsensusError, PutOutcome};
use crate::fs::mounts::MountSpec;
use crate::fs::{MountError, Mounts, NewVolume, VolumeError, VolumeInfo};
use crate::gossip::Gossip;
use crate::wire;

pub const SOCKET_FILE: &str = "admin.sock";
/// Admin messages carry whole blocks.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_FILE)
}

#[derive(Debug)]
struct AdminService {
    blocks: Arc<Blocks>,
    consensus: Arc<Consensus>,
    gossip: Gossip,
    me: shoal_core::NodeId,
    mounts: Arc<Mounts>,
}

fn volume_status(e: VolumeError) -> Status {
    match e {
        VolumeError::NoKeyring => Status::failed_precondition(e.to_string()),
        VolumeError::Invalid(_) => Status::invalid_argument(e.to_string()),
        VolumeError::Exists(_) => Status::already_exists(e.to_string()),
        VolumeError::NotFound(_) | VolumeError::SnapshotNotFound(_) => {
            Status::not_found(e.to_string())
        }
        VolumeError::SnapshotExists(..) => Status::already_exists(e.to_string()),
        VolumeError::OutOfRange(_) => Status::out_of_range(e.to_string()),
        VolumeError::Meta(_) => Status::unavailable(e.to_string()),
    }
}

/// How long a mount may take to answer a `stat` before it counts as hung.
const MOUNT_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Why the mount at `target` does not answer, if it does not.
async fn mount_problem(target: PathBuf) -> Option<String> {
    let shown = target.display().to_string();
    let check = tokio::task::spawn_blocking(move || std::fs::metadata(&target).err());
    match tokio::time::timeout(MOUNT_CHECK, check).await {
        Ok(Ok(None)) => None,
        Ok(Ok(Some(e))) => Some(format!("{shown} does not answer: {e}")),
        Ok(Err(e)) => Some(format!("{shown}: {e}")),
        Err(_) => Some(format!("{shown} did not answer within {MOUNT_CHECK:?}")),
    }
}

fn snapshot(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        name: s.name.clone(),
        source: s.source.clone(),
        bytes: s.bytes,
        files: s.files,
        size: s.size,
        created: s.created,
        created_nanos: s.created_nanos,
    }
}

fn mount_status(e: MountError) -> Status {
    match e {
        MountError::Volume(e) => volume_status(e),
        MountError::NoTarget(_) | MountError::NotMounted(_) => Status::not_found(e.to_string()),
        MountError::NotDirectory(_) => Status::invalid_argument(e.to_string()),
        MountError::Busy(..) => Status::already_exists(e.to_string()),
        MountError::Io(..) => Status::internal(e.to_string()),
        MountError::Options(_) => Status::invalid_argument(e.to_string()),
    }
}

fn volume(info: &VolumeInfo) -> Volume {
    Volume {
        name: info.record.name.clone(),
        size: info.record.size,
        used: info.usage.bytes.max(0) as u64,
        replicas: info.record.replicas,
        files: info.usage.files.max(0) as u64,
        created: info.record.created,
        from_snapshot: match &info.record.source {
            Some(Source::Snapshot(s)) => s.clone(),
            _ => String::new(),
        },
        from_volume: match &info.record.source {
            Some(Source::Volume(v)) => v.clone(),
            _ => String::new(),
        },
    }
}

fn member(n: &NodeInfo) -> Member {
    use shoal_proto::admin::NodeState as S;
    Member {
        node_id: n.id.to_string(),
        address: n.addr.to_string(),
        zone: n.zone.clone(),
        rack: n.rack.clone(),
        state: match n.state {
            NodeState::Alive => S::Alive,
            NodeState::Suspect => S::Suspect,
            NodeState::Dead => S::Dead,
            NodeState::Draining => S::Draining,
        }
        .into(),
        capacity: n.capacity,
        used: n.used,
    }
}

fn parse_address(s: &str) -> Result<Address, Status> {
    s.parse()
        .map_err(|e: shoal_core::AddressParseError| Status::invalid_argument(e.to_string()))
}

fn block_status(e: BlockError) -> Status {
    match e {
        BlockError::NotFound(_) => Status::not_found(e.to_string()),
        BlockError::Invalid(_) => Status::invalid_argument(e.to_string()),
        BlockError::NoQuorum { .. } if e.to_string().contains("no space") => {
            Status::resource_exhausted(e.to_string())
        }
        BlockError::NotEnoughNodes { full, .. } if full > 0 => {
            Status::resource_exhausted(e.to_string())
        }
        BlockError::NotEnoughNodes { .. }
        | BlockError::NoQuorum { .. }
        | BlockError::Unavailable { .. } => Status::unavailable(e.to_string()),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let view = self.blocks.view();
        let policy = self.blocks.config().policy;
        Ok(Response::new(StatusReply {
            node_id: self.me.to_string(),
            replication: policy.replicas as u32,
            failure_domain: policy.failure_domain.to_string(),
            members: view.nodes().iter().map(member).collect(),
        }))
    }

    async fn put_block(
        &self,
        request: Request<PutBlockRequest>,
    ) -> Result<Response<PutBlockReply>, Status> {
        let data = Bytes::from(request.into_inner().data);
        let address = self.blocks.put(data).await.map_err(block_status)?;
        Ok(Response::new(PutBlockReply {
            address: address.to_string(),
        }))
    }

    async fn get_block(
        &self,
        request: Request<GetBlockRequest>,
    ) -> Result<Response<GetBlockReply>, Status> {
        let address = parse_address(&request.into_inner().address)?;
        let data = self.blocks.get(address).await.map_err(block_status)?;
        Ok(Response::new(GetBlockReply {
            data: data.to_vec(),
        }))
    }

    async fn locate_block(
        &self,
        request: Request<LocateBlockRequest>,
    ) -> Result<Response<LocateBlockReply>, Status> {
        let address = parse_address(&request.into_inner().address)?;
        let replicas = self
            .blocks
            .read_candidates(&address)
            .iter()
            .take(self.blocks.config().policy.replicas)
            .map(member)
            .collect();
        Ok(Response::new(LocateBlockReply { replicas }))
    }

    async fn list_local_blocks(
        &self,
        request: Request<ListLocalBlocksRequest>,
    ) -> Result<Response<ListLocalBlocksReply>, Status> {
        let request = request.into_inner();
        let start_after = match request.start_after.as_str() {
            "" => None,
            s => Some(parse_address(s)?),
        };
        let limit = match request.limit as usize {
            0 => LIST_PAGE,
            n => n.min(LIST_PAGE),
        };
        let store = self.blocks.store().clone();
        let page = tokio::task::spawn_blocking(move || store.list(start_after.as_ref(), limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let next_start_after = if page.len() == limit {
            page.last().map(|a| a.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListLocalBlocksReply {
            addresses: page.iter().map(|a| a.to_string()).collect(),
            next_start_after,
        }))
    }

    async fn set_draining(
        &self,
        request: Request<SetDrainingRequest>,
    ) -> Result<Response<SetDrainingReply>, Status> {
        self.gossip
            .set_draining(request.into_inner().draining)
            .await;
        Ok(Response::new(SetDrainingReply {}))
    }

    async fn put_mutable(
        &self,
        request: Request<PutMutableRequest>,
    ) -> Result<Response<PutMutableReply>, Status> {
        let block = request
            .into_inner()
            .block
            .ok_or_else(|| Status::invalid_argument("no block given"))?;
        let block = wire::block_from_wire(block).map_err(|e| match e {
            wire::WireError::Malformed(_) => Status::invalid_argument(e.to_string()),
            wire::WireError::Unverified { .. } => Status::permission_denied(e.to_string()),
        })?;
        let outcome = match self.consensus.put(block).await.map_err(consensus_status)? {
            PutOutcome::Written(b) => put_mutable_reply::Outcome::Written(wire::block_to_wire(&b)),
            PutOutcome::Conflict(b) => {
                put_mutable_reply::Outcome::Conflict(wire::block_to_wire(&b))
            }
        };
        Ok(Response::new(PutMutableReply {
            outcome: Some(outcome),
        }))
    }

    async fn get_mutable(
        &self,
        request: Request<GetMutableRequest>,
    ) -> Result<Response<GetMutableReply>, Status> {
        let address = parse_address(&request.into_inner().address)?;
        let (block, quorum) = self
            .consensus
            .get_with_quorum(address)
            .await
            .map_err(consensus_status)?;
        Ok(Response::new(GetMutableReply {
            block: Some(wire::block_to_wire(&block)),
            quorum: quorum.members.iter().map(|m| m.to_string()).collect(),
        }))
    }

    async fn isolate(
        &self,
        request: Request<IsolateRequest>,
    ) -> Result<Response<IsolateReply>, Status> {
        let peers = request
            .into_inner()
            .unreachable
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| Status::invalid_argument(format!("{a:?} is not a peer address")))
            })
            .collect::<Result<_, _>>()?;
        self.blocks.transport().set_unreachable(peers);
        Ok(Response::new(IsolateReply {}))
    }

    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let r = request.into_inner();
        let volumes = self.mounts.volumes();
        let source = match (r.from_snapshot.is_empty(), r.from_volume.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Source::Snapshot(r.from_snapshot)),
            (true, false) => {
                self.mounts.sync(&r.from_volume).await;
                Some(Source::Volume(r.from_volume))
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "a volume starts from a snapshot or from a volume, not both",
                ));
            }
        };
        let record = volumes
            .create(NewVolume {
                name: r.name,
                size: r.size,
                replicas: (r.replicas != 0).then_some(r.replicas),
                source,
            })
            .await
            .map_err(volume_status)?;
        let usage = volumes.usage(&record).await.map_err(volume_status)?;
        let info = VolumeInfo { record, usage };
        Ok(Response::new(VolumeReply {
            volume: Some(volume(&info)),
        }))
    }

    async fn list_volumes(
        &self,
        _: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesReply>, Status> {
        let list = self.mounts.volumes().list().await.map_err(volume_status)?;
        Ok(Response::new(ListVolumesReply {
            volumes: list.iter().map(volume).collect(),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeReply>, Status> {
        let name = request.into_inner().name;
        if let Some((target, _)) = self
            .mounts
            .list()
            .into_iter()
            .find(|(_, spec)| spec.volume == name)
        {
            return Err(Status::failed_precondition(format!(
                "volume {name} is mounted at {}; unmount it first",
                target.display()
            )));
        }
        let (freed_blocks, freed_bytes) = self
            .mounts
            .volumes()
            .delete(&name)
            .await
            .map_err(volume_status)?;
        Ok(Response::new(DeleteVolumeReply {
            freed_blocks,
            freed_bytes,
        }))
    }

    async fn resize_volume(
        &self,
        request: Request<ResizeVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let r = request.into_inner();
        let volumes = self.mounts.volumes();
        let record = volumes
            .resize(&r.name, r.size)
            .await
            .map_err(volume_status)?;
        let usage = volumes.usage(&record).await.map_err(volume_status)?;
        Ok(Response::new(VolumeReply {
            volume: Some(volume(&VolumeInfo { record, usage })),
        }))
    }

    async fn mount(&self, request: Request<MountRequest>) -> Result<Response<MountReply>, Status> {
        let r = request.into_inner();
        let target = PathBuf::from(&r.target);
        if !target.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "mount point {:?} is not an absolute path",
                r.target
            )));
        }
        let spec = MountSpec {
            volume: r.volume,
            read_only: r.read_only,
            options: r.options,
            publish: r.publish,
        };
        let target = self
            .mounts
            .mount(&target, spec)
            .await
            .map_err(mount_status)?;
        Ok(Response::new(MountReply {
            target: target.display().to_string(),
        }))
    }

    async fn unmount(
        &self,
        request: Request<UnmountRequest>,
    ) -> Result<Response<UnmountReply>, Status> {
        let target = PathBuf::from(request.into_inner().target);
        self.mounts.unmount(&target).await.map_err(mount_status)?;
        Ok(Response::new(UnmountReply {}))
    }

    async fn get_volume(
        &self,
        request: Request<GetVolumeRequest>,
    ) -> Result<Response<VolumeReply>, Status> {
        let volumes = self.mounts.volumes();
        let record = volumes
            .get(&request.into_inner().name)
            .await
            .map_err(volume_status)?;
        let usage = volumes.usage(&record).await.map_err(volume_status)?;
        Ok(Response::new(VolumeReply {
            volume: Some(volume(&VolumeInfo { record, usage })),
        }))
    }

    async fn list_mounts(
        &self,
        _: Request<ListMountsRequest>,
    ) -> Result<Response<ListMountsReply>, Status> {
        let list = self.mounts.list();
        let problems =
            futures::future::join_all(list.iter().map(|(t, _)| mount_problem(t.clone()))).await;
        Ok(Response::new(ListMountsReply {
            mounts: list
                .into_iter()
                .zip(problems)
                .map(|((target, spec), problem)| MountInfo {
                    volume: spec.volume,
                    target: target.display().to_string(),
                    read_only: spec.read_only,
                    published: spec.publish,
                    options: spec.options,
                    problem: problem.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let r = request.into_inner();
        self.mounts.sync(&r.source).await;
        let s = self
            .mounts
            .volumes()
            .create_snapshot(&r.name, &r.source)
            .await
            .map_err(volume_status)?;
        Ok(Response::new(SnapshotReply {
            snapshot: Some(snapshot(&s)),
        }))
    }

    async fn list_snapshots(
        &self,
        _: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsReply>, Status> {
        let list = self
            .mounts
            .volumes()
            .snapshots()
            .await
            .map_err(volume_status)?;
        Ok(Response::new(ListSnapshotsReply {
            snapshots: list.iter().map(snapshot).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteVolumeReply>, Status> {
        let (freed_blocks, freed_bytes) = self
            .mounts
            .volumes()
            .delete_snapshot(&request.into_inner().name)
            .await
            .map_err(volume_status)?;
        Ok(Response::new(DeleteVolumeReply {
            freed_blocks,
            freed_bytes,
        }))
    }
}

fn consensus_status(e: ConsensusError) -> Status {
    match e {
        ConsensusError::NotFound(_) => Status::not_found(e.to_string()),
        ConsensusError::Invalid(_) => Status::permission_denied(e.to_string()),
        ConsensusError::Unavailable { .. } => Status::unavailable(e.to_string()),
        ConsensusError::Indeterminate { .. } => Status::aborted(e.to_string()),
    }
}

/// Page size of `ListLocalBlocks` when the caller sets none, and its cap.
const LIST_PAGE: usize = 10_000;

/// Serves the admin API on `dir/admin.sock` until `shutdown` resolves.
pub async fn serve(
    dir: &Path,
    blocks: Arc<Blocks>,
    consensus: Arc<Consensus>,
    gossip: Gossip,
    me: shoal_core::NodeId,
    mounts: Arc<Mounts>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let path = socket_path(dir);
    // The caller holds the data dir lock, so a socket file here is stale.
    let incoming = shoal_proto::unix::listen(&path)
        .map_err(|e| anyhow::anyhow!("cannot bind admin socket {}: {e}", path.display()))?;
    let service = AdminServer::new(AdminService {
        blocks,
        consensus,
        gossip,
        me,
        mounts,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Connects to the admin API of the peer whose data dir is `dir`.
pub async fn connect(dir: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let path = socket_path(dir);
    if !path.exists() {
        anyhow::bail!(
            "no shoal peer is running with data dir {} (no {SOCKET_FILE}); start one with `shoal cluster up` or `shoal node run`",
            dir.display()
        );
    }
    let channel = shoal_proto::unix::channel(&path);
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}
