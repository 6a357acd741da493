//! The Shoal storage peer: identity and transport, gossip membership, the
//! local block store, replicated immutable blocks, the admin API, and the
//! local cluster supervisor. The decisions themselves (placement, block
//! validation) live in the pure `shoal-core` crate.

pub mod admin;
pub mod blocks;
pub mod cli;
pub mod cluster;
pub mod consensus;
pub mod fs;
pub mod gossip;
pub mod identity;
pub mod peer;
pub mod repair;
pub mod status;
pub mod store;
pub mod transport;
pub mod wire;
