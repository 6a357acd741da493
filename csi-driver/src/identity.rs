//! The Identity service: who the driver is, what it offers, and whether it
//! is ready (its peer answers and is a live member of the cluster).

use shoal_proto::admin::{Member, NodeState};
use shoal_proto::csi_v1::identity_server::Identity;
use shoal_proto::csi_v1::plugin_capability::{
    Service, Type, VolumeExpansion, service, volume_expansion,
};
use shoal_proto::csi_v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};
use tonic::{Request, Response, Status};
use tracing::debug;

use crate::{DRIVER_NAME, Driver};

#[tonic::async_trait]
impl Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: [(
                "mode".to_string(),
                format!("{:?}", self.mode).to_lowercase(),
            )]
            .into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let service = |t: service::Type| PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        let mut capabilities = vec![
            service(service::Type::VolumeAccessibilityConstraints),
            PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        if self.mode.controller() {
            capabilities.insert(0, service(service::Type::ControllerService));
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// The controller is ready once the local peer is a live member of a
    /// cluster in which a majority of the replicas of a block can be
    /// reached: then volumes can be created, written and mounted. The node
    /// service is ready while it serves: the livenessprobe sidecar restarts
    /// a plugin that is not, and a node service restarted because its peer
    /// is away would drop the FUSE connections it keeps for that peer.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        if self.mode == crate::Mode::Node {
            return Ok(Response::new(ProbeResponse { ready: Some(true) }));
        }
        let ready = match self.status().await {
            Ok(status) => {
                let alive = |m: &&Member| m.state == NodeState::Alive as i32;
                let me = status
                    .members
                    .iter()
                    .filter(alive)
                    .any(|m| m.node_id == status.node_id);
                let live = status.members.iter().filter(alive).count();
                me && live > status.replication as usize / 2
            }
            Err(e) => {
                debug!("probe: the local peer does not answer: {}", e.message());
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
