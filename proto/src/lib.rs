//! Shoal's protocols, generated from the `.proto` files under `proto/`.
//!
//! - [`peer`]: messages storage peers exchange over QUIC.
//! - [`admin`]: the gRPC admin API each peer serves on a unix socket.
//! - [`csi`]: the Container Storage Interface (v1.10), which `shoal-csi`
//!   serves to Kubernetes.
//! - [`pluginregistration`]: kubelet's plugin registration API, through
//!   which `shoal-csi` can register itself with kubelet.

#![allow(missing_debug_implementations)]

pub mod unix;

/// Modules nested as the protobuf packages are, so generated code that
/// refers across packages resolves.
pub mod shoal {
    pub mod peer {
        pub mod v1 {
            tonic::include_proto!("shoal.peer.v1");
        }
    }
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("shoal.admin.v1");
        }
    }
}

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// Kubelet's plugin registration API (v1).
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

/// Messages storage peers exchange over QUIC.
pub use shoal::peer::v1 as peer;

/// The gRPC admin API a peer serves on the unix socket in its data dir.
pub use shoal::admin::v1 as admin;

/// The Container Storage Interface, v1.10.
pub use csi::v1 as csi_v1;
