//! Shoal's CSI driver: the Identity, Controller and Node services of the
//! Container Storage Interface, served on a unix socket.
//!
//! The driver holds no state of its own: volumes, snapshots and mounts
//! live in the storage peer on the same node, reached through its admin
//! API. A published volume's FUSE session belongs to that long-lived peer,
//! so restarting `shoal-csi` never disturbs a mounted volume, and the peer
//! records what it published and mounts it again when it restarts.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use shoal_proto::admin::admin_client::AdminClient;
use shoal_proto::admin::{Member, StatusReply, StatusRequest};
use tonic::Status;
use tonic::transport::Channel;

pub mod controller;
pub mod health;
pub mod identity;
pub mod node;
pub mod registration;
pub mod request;
pub mod topology;

/// The driver's name, as Kubernetes' CSIDriver object names it.
pub const DRIVER_NAME: &str = "csi.shoal.io";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// What the services share: the way to the local peer, and the names of
/// the volumes and snapshots an operation is running on.
#[derive(Debug, Clone)]
pub struct Driver {
    peer: AdminClient<Channel>,
    pub node_id: String,
    pub mode: Mode,
    busy: Arc<Mutex<HashSet<String>>>,
}

/// An operation in flight on one volume or snapshot; dropping it ends it.
#[derive(Debug)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.busy.lock().expect("busy").remove(&self.key);
    }
}

impl Driver {
    /// A driver for the peer whose data dir is `peer_dir`.
    pub fn new(peer_dir: PathBuf, node_id: String, mode: Mode) -> Self {
        let channel = shoal_proto::unix::channel(peer_dir.join("admin.sock"));
        Self {
            peer: AdminClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            node_id,
            mode,
            busy: Arc::default(),
        }
    }

    pub fn peer(&self) -> AdminClient<Channel> {
        self.peer.clone()
    }

    /// Claims `key` for one operation; a second one on the same key while
    /// the first runs is ABORTED, as the specification asks.
    pub fn claim(&self, kind: &str, name: &str) -> Result<InFlight, Status> {
        let key = format!("{kind}/{name}");
        if !self.busy.lock().expect("busy").insert(key.clone()) {
            return Err(Status::aborted(format!(
                "an operation on {kind} {name} is already in progress"
            )));
        }
        Ok(InFlight {
            busy: self.busy.clone(),
            key,
        })
    }

    /// The local peer's view of the cluster.
    pub async fn status(&self) -> Result<StatusReply, Status> {
        Ok(self.peer().status(StatusRequest {}).await?.into_inner())
    }

    /// This node's own entry in the membership.
    pub async fn me(&self) -> Result<Member, Status> {
        let status = self.status().await?;
        status
            .members
            .into_iter()
            .find(|m| m.node_id == status.node_id)
            .ok_or_else(|| Status::unavailable("the local peer does not list itself yet"))
    }
}
