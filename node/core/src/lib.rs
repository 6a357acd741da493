//! The pure core of Shoal: the data and decisions every peer shares, with no
//! sockets, clocks, threads or disks inside, so each piece is testable alone.
//!
//! - [`address`]: 32-byte block addresses (blake3).
//! - [`membership`]: a peer's view of the cluster: nodes, topology, state.
//! - [`placement`]: which nodes hold a block, computed locally by any peer.
//! - [`block`]: validation of immutable blocks.
//! - [`mutable`]: signed, versioned mutable blocks and their rules.
//! - [`paxos`]: per-block Multi-Paxos as a pure state machine.
//! - [`fs`]: the filesystem model: volumes, inodes, directory shards, keys.

pub mod address;
pub mod block;
pub mod ca;
pub mod fs;
pub mod membership;
pub mod mutable;
pub mod paxos;
pub mod placement;

pub use address::{Address, AddressParseError};
pub use membership::{NodeId, NodeInfo, NodeState, View};
pub use placement::{FailureDomain, Placement, Policy};
