//! Shoal's protocols, generated from the `.proto` files under `proto/`.
//!
//! - [`peer`]: messages storage peers exchange over QUIC.
//! - [`admin`]: the gRPC admin API each peer serves on a unix socket.

#![allow(missing_debug_implementations)]

/// Messages storage peers exchange over QUIC.
pub mod peer {
    tonic::include_proto!("shoal.peer.v1");
}

/// The gRPC admin API a peer serves on the unix socket in its data dir.
pub mod admin {
    tonic::include_proto!("shoal.admin.v1");
}
