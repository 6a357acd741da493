//! A real `shoal-csi` process for tests: started against one peer of a
//! [`crate::TestCluster`], reached over its unix socket the way kubelet and
//! the CSI sidecars reach it. Tests that play kubelet's part (creating pod
//! directories, calling NodePublishVolume) say so in their names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_proto::csi_v1::controller_client::ControllerClient;
use shoal_proto::csi_v1::identity_client::IdentityClient;
use shoal_proto::csi_v1::node_client::NodeClient;
use shoal_proto::csi_v1::volume_capability::access_mode::Mode;
use shoal_proto::csi_v1::volume_capability::{AccessMode, AccessType, MountVolume};
use shoal_proto::csi_v1::{ProbeRequest, VolumeCapability};
use tonic::transport::Channel;

/// The `shoal-csi` binary: `$SHOAL_CSI_BIN`, else the one next to `shoal`.
pub fn csi_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_CSI_BIN") {
        return bin.into();
    }
    crate::shoal_bin().with_file_name("shoal-csi")
}

/// A mount capability in `mode` with `flags`.
pub fn mount_capability(mode: Mode, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// Where the driver keeps the FUSE connections of the peer in `peer_dir`,
/// as the Kubernetes DaemonSets have it: the peers of a cluster that uses
/// it start with [`KEEPER_ARGS`].
pub fn keeper_socket(peer_dir: &Path) -> PathBuf {
    peer_dir.join("fuse-keeper.sock")
}

/// The `shoal node run` flags that hand a peer's FUSE connections to the
/// keeper of the driver beside it (for [`crate::TestCluster::start_with`]).
pub const KEEPER_ARGS: &[&str] = &["--fuse-keeper", "{dir}/fuse-keeper.sock"];

/// A `shoal-csi --mode all` process that also keeps its peer's FUSE
/// connections.
#[derive(Debug)]
pub struct CsiDriver {
    pub socket: PathBuf,
    peer_dir: PathBuf,
    node_id: String,
    log: PathBuf,
    child: Option<Child>,
}

impl CsiDriver {
    /// Starts `shoal-csi --mode all` for the peer in `peer_dir`, serving on
    /// `socket`, and waits until it answers Probe.
    pub async fn start(peer_dir: &Path, socket: &Path, node_id: &str) -> anyhow::Result<Self> {
        let mut driver = Self {
            socket: socket.to_path_buf(),
            peer_dir: peer_dir.to_path_buf(),
            node_id: node_id.to_string(),
            log: socket.with_extension("log"),
            child: None,
        };
        driver.launch().await?;
        Ok(driver)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(csi_bin())
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--mode", "all", "--node-id", &self.node_id, "--peer-dir"])
            .arg(&self.peer_dir)
            .arg("--fuse-keeper")
            .arg(keeper_socket(&self.peer_dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", csi_bin().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.socket.exists()
                && let Ok(r) = self.identity().probe(ProbeRequest {}).await
                && r.into_inner().ready == Some(true)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("shoal-csi did not become ready: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`Self::kill`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "shoal-csi is running");
        self.launch().await
    }

    fn channel(&self) -> Channel {
        shoal_proto::unix::channel(&self.socket)
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }
}

impl Drop for CsiDriver {
    fn drop(&mut self) {
        self.kill();
    }
}
