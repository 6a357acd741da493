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
    /// Keep the local peer's FUSE connections on this socket (the peer's
    /// `--fuse-keeper`), so mounts outlive restarts of the peer (node mode).
    #[arg(long)]
    fuse_keeper: Option<PathBuf>,
    /// Register with kubelet through its plugin registration API in this
    /// directory (kubelet's plugins_registry), instead of a
    /// node-driver-registrar sidecar (node mode).
    #[arg(long, requires = "kubelet_endpoint")]
    registration_dir: Option<PathBuf>,
    /// The CSI socket's path as kubelet sees it, e.g.
    /// /var/lib/kubelet/plugins/csi.shoal.io/csi.sock.
    #[arg(long)]
    kubelet_endpoint: Option<String>,
    /// Serve `GET /healthz` for kubelet's liveness probe on this address,
    /// instead of a livenessprobe sidecar.
    #[arg(long)]
    healthz_listen: Option<std::net::SocketAddr>,
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
    if !args.mode.node() && (args.fuse_keeper.is_some() || args.registration_dir.is_some()) {
        bail!("--fuse-keeper and --registration-dir are for --mode node or all");
    }
    // Held until the process ends: the peer's mounts live while it does.
    let _keeper = args
        .fuse_keeper
        .as_deref()
        .map(shoal_keeper::Keeper::serve)
        .transpose()
        .context("cannot keep FUSE connections")?;
    if let Some(addr) = args.healthz_listen {
        tokio::spawn(async move {
            if let Err(e) = shoal_csi::health::serve(addr).await {
                tracing::error!("healthz: {e}");
            }
        });
    }
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
    let registration = async {
        match (&args.registration_dir, &args.kubelet_endpoint) {
            (Some(dir), Some(endpoint)) => {
                shoal_csi::registration::serve(dir, endpoint.clone()).await
            }
            _ => std::future::pending().await,
        }
    };
    let mut refused = None;
    router
        .serve_with_incoming_shutdown(incoming, async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                reason = registration => refused = Some(reason),
            }
        })
        .await?;
    if let Some(reason) = refused {
        let _ = std::fs::remove_file(&path);
        bail!("not registered with kubelet: {}", reason?);
    }
    let _ = std::fs::remove_file(&path);
    info!("stopped; published volumes stay mounted by the peer");
    Ok(())
}
