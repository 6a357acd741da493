//! Registering with kubelet without the node-driver-registrar sidecar:
//! kubelet watches its `plugins_registry` directory, finds this socket,
//! asks what it is (GetInfo: a CSI plugin named `csi.shoal.io`, and where
//! its CSI socket is as kubelet sees it), then reports whether it
//! registered it.

use std::path::{Path, PathBuf};

use shoal_proto::pluginregistration::registration_server::{Registration, RegistrationServer};
use shoal_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::DRIVER_NAME;

/// The CSI versions kubelet may speak to this driver.
const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// What kubelet asks of a plugin.
#[derive(Debug)]
struct Registrar {
    /// The CSI socket, as a path on the node (kubelet's view).
    endpoint: String,
    /// Where a refusal goes: the process ends, to register anew when it
    /// restarts, as the upstream registrar does.
    refused: mpsc::Sender<String>,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".into(),
            name: DRIVER_NAME.into(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            info!(endpoint = self.endpoint, "kubelet registered the driver");
        } else {
            error!("kubelet refused the driver: {}", status.error);
            let _ = self.refused.send(status.error).await;
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

/// The registration socket's path in kubelet's `plugins_registry`
/// directory `dir`, named as the upstream registrar names it.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join(format!("{DRIVER_NAME}-reg.sock"))
}

/// Serves kubelet's plugin registration API in `dir`, announcing the CSI
/// socket at `endpoint` (a path on the node). Resolves when kubelet
/// refuses the driver, with its reason.
pub async fn serve(dir: &Path, endpoint: String) -> anyhow::Result<String> {
    let path = socket(dir);
    let incoming = shoal_proto::unix::listen(&path)?;
    let (refused, mut refusal) = mpsc::channel(1);
    info!(socket = %path.display(), endpoint, "registering with kubelet");
    let server = tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(Registrar { endpoint, refused }))
        .serve_with_incoming(incoming);
    let reason = tokio::select! {
        result = server => {
            result?;
            "the registration server stopped".to_string()
        }
        Some(reason) = refusal.recv() => reason,
    };
    let _ = std::fs::remove_file(&path);
    Ok(reason)
}
