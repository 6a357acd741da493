//! `shoal-csi`: Shoal's CSI driver process.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use shoal_csi::{Driver, Mode};
use shoal_proto::csi_v1::controller_server::ControllerServer;
use shoal_proto::csi_v1::identity_server::IdentityServer;
use shoal_proto::csi_v1::node_server::NodeServer;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "shoal-csi",
    version,
    about = "Shoal's CSI driver (csi.shoal.io)"
)]
struct Args {
    /// Where to serve CSI: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// This node's name as Kubernetes knows it (NodeGetInfo's node_id).
    #[arg(long, env = "NODE_ID", required_if_eq_any([("mode", "node"), ("mode", "all")]))]
    node_id: Option<String>,
    /// Data dir of the storage peer on this node (its admin socket is
    /// there).
    #[arg(long, env = "SHOAL_PEER_DIR", default_value = "/var/lib/shoal")]
    peer_dir: PathBuf,
}

/// The socket path of a `unix://` endpoint.
fn socket(endpoint: &str) -> anyhow::Result<PathBuf> {
    let Some(path) = endpoint.strip_prefix("unix://") else {
        bail!("endpoint {endpoint:?} is not a unix:// address");
    };
    if !path.starts_with('/') {
        bail!("endpoint {endpoint:?} needs an absolute path (unix:///…)");
    }
    Ok(PathBuf::from(path))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let path = socket(&args.endpoint)?;
    let driver = Driver::new(args.peer_dir, args.node_id.unwrap_or_default(), args.mode);
    let incoming = shoal_proto::unix::listen(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    let mut router =
        tonic::transport::Server::builder().add_service(IdentityServer::new(driver.clone()));
    if args.mode.controller() {
        router = router.add_service(ControllerServer::new(driver.clone()));
    }
    if args.mode.node() {
        router = router.add_service(NodeServer::new(driver.clone()));
    }
    info!(endpoint = %args.endpoint, mode = ?args.mode, "serving CSI");
    let mut term = signal(SignalKind::terminate())?;
    router
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    let _ = std::fs::remove_file(&path);
    info!("stopped; published volumes stay mounted by the peer");
    Ok(())
}
