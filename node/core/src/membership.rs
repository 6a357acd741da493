//! A peer's view of the cluster: who is in it, where they sit (zone, rack),
//! how much they hold and whether they are up. Gossip fills it; placement and
//! the status table read it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

/// A node's identity: the first 16 bytes of blake3 of its TLS public key, so a
/// node id is bound to the certificate the cluster CA signed.
#[derive(
    Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    pub fn from_public_key(spki_der: &[u8]) -> Self {
        let hash = blake3::hash(spki_der);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        Self(id)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// A stable 64-bit seed for hashing decisions that involve this node.
    pub fn seed(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for NodeId {
    /// The short form people read in tables and logs (12 hex digits).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..6]))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// What the cluster believes about a node's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Answers probes.
    Alive,
    /// Missed probes; not yet declared dead. Still read from, not written to.
    Suspect,
    /// Declared dead by the failure detector, or left.
    Dead,
    /// Up, but being emptied: read from, never chosen for new data.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Suspect => "suspect",
            NodeState::Dead => "dead",
            NodeState::Draining => "draining",
        }
    }

    /// Whether a request to the node may succeed now.
    pub fn is_reachable(self) -> bool {
        matches!(
            self,
            NodeState::Alive | NodeState::Draining | NodeState::Suspect
        )
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the cluster as this peer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub zone: String,
    pub rack: String,
    /// Bytes this node offers for blocks.
    pub capacity: u64,
    /// Bytes of blocks it holds (as last gossiped).
    pub used: u64,
    pub state: NodeState,
}

impl NodeInfo {
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }
}

/// A snapshot of the membership: every known node, by id. Cheap to share
/// (peers keep it behind an `Arc`) and rebuilt when gossip changes it.
#[derive(Clone, Debug, Default)]
pub struct View {
    nodes: Vec<NodeInfo>,
    index: HashMap<NodeId, usize>,
}

impl View {
    pub fn new(mut nodes: Vec<NodeInfo>) -> Self {
        nodes.sort_by(|a, b| (&a.zone, &a.rack, a.id).cmp(&(&b.zone, &b.rack, b.id)));
        nodes.dedup_by_key(|n| n.id);
        let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        Self { nodes, index }
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn get(&self, id: &NodeId) -> Option<&NodeInfo> {
        self.index.get(id).map(|&i| &self.nodes[i])
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Nodes that answer requests now.
    pub fn reachable(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(|n| n.state.is_reachable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u8, zone: &str, state: NodeState) -> NodeInfo {
        NodeInfo {
            id: NodeId([i; 16]),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(i))),
            zone: zone.into(),
            rack: "r".into(),
            capacity: 100,
            used: 10,
            state,
        }
    }

    #[test]
    fn view_indexes_dedups_and_filters_reachable_nodes() {
        let view = View::new(vec![
            node(1, "b", NodeState::Alive),
            node(2, "a", NodeState::Dead),
            node(1, "b", NodeState::Alive),
        ]);
        assert_eq!(view.len(), 2);
        assert_eq!(view.get(&NodeId([2; 16])).unwrap().zone, "a");
        assert_eq!(view.reachable().count(), 1);
        assert_eq!(view.nodes()[0].free(), 90);
    }
}
