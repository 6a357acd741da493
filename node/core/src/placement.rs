//! Placement: which nodes hold a block. A pure function of (address, view,
//! policy), so every peer finds a block's replicas with zero network hops.
//!
//! The nodes form a tree of failure domains (zone → rack → node, or a flatter
//! tree for weaker policies). At each level the children are ranked for the
//! block by weighted rendezvous hashing, and the replicas are dealt out over
//! the ranked children round-robin: R replicas land in R distinct zones when
//! there are R zones, else in as many zones as there are and distinct racks
//! inside them, else on distinct hosts. Because a child's rank for a block
//! depends only on that child, a node joining or leaving moves only the blocks
//! whose replica sets it enters or leaves.
//!
//! Weights follow free capacity, in coarse steps (eighths of a node's
//! capacity) so that ordinary writes do not reshuffle placement; a domain's
//! weight is the sum over all its nodes, whether or not they are eligible, so a
//! tree built for writes (healthy nodes only) ranks everything exactly as the
//! tree built for reads (every known node) does.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::{Address, NodeId, NodeInfo, NodeState, View};

/// The failure domain that replicas of one block must not share.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum FailureDomain {
    /// Distinct zones, else distinct racks, else distinct hosts.
    #[default]
    Zone,
    /// Distinct racks (zones ignored), else distinct hosts.
    Rack,
    /// Distinct hosts only.
    Host,
}

impl FailureDomain {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureDomain::Zone => "zone",
            FailureDomain::Rack => "rack",
            FailureDomain::Host => "host",
        }
    }
}

impl fmt::Display for FailureDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureDomain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zone" => Ok(Self::Zone),
            "rack" => Ok(Self::Rack),
            "host" => Ok(Self::Host),
            other => Err(format!(
                "unknown failure domain {other:?}: expected zone, rack or host"
            )),
        }
    }
}

/// How many copies of a block to keep, and how far apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub replicas: usize,
    pub failure_domain: FailureDomain,
}

impl Policy {
    /// Acknowledge a write once a majority of the replicas hold it.
    pub fn majority(&self) -> usize {
        self.replicas / 2 + 1
    }
}

/// The placement weight of a node: its capacity scaled by its free fraction,
/// rounded up to eighths (never below one eighth, so a full node keeps its
/// rank for reads while writes skip it).
pub fn node_weight(node: &NodeInfo) -> f64 {
    if node.capacity == 0 {
        return 0.0;
    }
    let free_eighths = node.free().saturating_mul(8).div_ceil(node.capacity).max(1);
    node.capacity as f64 * free_eighths as f64 / 8.0
}

/// Whether new blocks may be placed on the node now.
pub fn accepts_writes(node: &NodeInfo) -> bool {
    node.state == NodeState::Alive && node.free() > 0
}

/// A placement tree for one view, policy failure domain and node filter.
#[derive(Debug, Clone)]
pub struct Placement {
    roots: Vec<Domain>,
}

#[derive(Debug, Clone)]
struct Domain {
    seed: u64,
    weight: f64,
    /// Eligible nodes below this domain.
    size: usize,
    children: Children,
}

#[derive(Debug, Clone)]
enum Children {
    Domains(Vec<Domain>),
    Node(NodeId),
}

impl Placement {
    /// Builds the tree over the nodes of `view` for which `include` holds.
    pub fn new(
        view: &View,
        failure_domain: FailureDomain,
        include: impl Fn(&NodeInfo) -> bool,
    ) -> Self {
        let levels: &[fn(&NodeInfo) -> String] = match failure_domain {
            FailureDomain::Zone => &[|n| n.zone.clone(), |n| n.rack.clone()],
            FailureDomain::Rack => &[|n| format!("{}/{}", n.zone, n.rack)],
            FailureDomain::Host => &[],
        };
        let nodes: Vec<&NodeInfo> = view.nodes().iter().collect();
        let roots = build(&nodes, levels, &include);
        Self { roots }
    }

    /// The tree writes use: every node that accepts new blocks now.
    pub fn for_writes(view: &View, failure_domain: FailureDomain) -> Self {
        Self::new(view, failure_domain, accepts_writes)
    }

    /// The tree reads use: every known node, dead ones included, so that a
    /// block's candidates do not move when a holder goes down.
    pub fn for_reads(view: &View, failure_domain: FailureDomain) -> Self {
        Self::new(view, failure_domain, |_| true)
    }

    /// Eligible nodes in the tree.
    pub fn size(&self) -> usize {
        self.roots.iter().map(|d| d.size).sum()
    }

    /// The first `count` nodes for `address`, in order: the first replicas
    /// are spread over the most distinct domains.
    pub fn place(&self, address: &Address, count: usize) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(count);
        pick(&self.roots, address.prefix_u64(), count, &mut out);
        out
    }
}

fn build(
    nodes: &[&NodeInfo],
    levels: &[fn(&NodeInfo) -> String],
    include: &impl Fn(&NodeInfo) -> bool,
) -> Vec<Domain> {
    match levels.split_first() {
        None => nodes
            .iter()
            .filter(|n| include(n))
            .map(|n| Domain {
                seed: mix(n.id.seed()),
                weight: node_weight(n),
                size: 1,
                children: Children::Node(n.id),
            })
            .filter(|d| d.weight > 0.0)
            .collect(),
        Some((level, rest)) => {
            let mut groups: BTreeMap<String, Vec<&NodeInfo>> = BTreeMap::new();
            for n in nodes {
                groups.entry(level(n)).or_default().push(n);
            }
            groups
                .into_iter()
                .filter_map(|(name, members)| {
                    let weight = members.iter().map(|n| node_weight(n)).sum();
                    let children = build(&members, rest, include);
                    let size = children.iter().map(|c| c.size).sum();
                    (size > 0).then(|| Domain {
                        seed: mix(u64::from_le_bytes(
                            blake3::hash(name.as_bytes()).as_bytes()[..8]
                                .try_into()
                                .expect("8 bytes"),
                        )),
                        weight,
                        size,
                        children: Children::Domains(children),
                    })
                })
                .collect()
        }
    }
}

/// Deals `count` replicas over `domains` ranked for `key`, appending the
/// chosen nodes to `out` interleaved across domains.
fn pick(domains: &[Domain], key: u64, count: usize, out: &mut Vec<NodeId>) {
    if count == 0 || domains.is_empty() {
        return;
    }
    let mut ranked: Vec<(f64, &Domain)> = domains
        .iter()
        .map(|d| (score(key, d.seed, d.weight), d))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));

    // Round-robin over the ranked domains, each taking at most its size.
    let mut shares = vec![0usize; ranked.len()];
    let mut left = count.min(domains.iter().map(|d| d.size).sum());
    while left > 0 {
        for (share, (_, d)) in shares.iter_mut().zip(&ranked) {
            if left > 0 && *share < d.size {
                *share += 1;
                left -= 1;
            }
        }
    }

    let mut per_domain: Vec<Vec<NodeId>> = Vec::new();
    for (&share, (_, d)) in shares.iter().zip(&ranked) {
        if share == 0 {
            break;
        }
        match &d.children {
            Children::Node(id) => per_domain.push(vec![*id]),
            Children::Domains(children) => {
                let mut chosen = Vec::with_capacity(share);
                pick(children, key, share, &mut chosen);
                per_domain.push(chosen);
            }
        }
    }
    let longest = per_domain.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        out.extend(per_domain.iter().filter_map(|ids| ids.get(i)));
    }
}

/// Weighted rendezvous score (the logarithmic method): the domain with the
/// highest score wins, each with probability proportional to its weight.
fn score(key: u64, seed: u64, weight: f64) -> f64 {
    let h = mix(key ^ seed);
    let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -unit.ln()
}

/// A 64-bit finaliser (splitmix64) that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::SocketAddr;

    fn node(i: u16, zone: usize, rack: usize) -> NodeInfo {
        let mut id = [0u8; 16];
        id[..2].copy_from_slice(&i.to_le_bytes());
        id[15] = 0xAA;
        NodeInfo {
            id: NodeId(id),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i)),
            zone: format!("z{zone}"),
            rack: format!("r{rack}"),
            capacity: 1 << 40,
            used: 0,
            state: NodeState::Alive,
        }
    }

    fn cluster(zones: usize, racks: usize, per_rack: usize) -> Vec<NodeInfo> {
        let mut nodes = Vec::new();
        for z in 0..zones {
            for r in 0..racks {
                for _ in 0..per_rack {
                    let i = nodes.len() as u16;
                    nodes.push(node(i, z, r));
                }
            }
        }
        nodes
    }

    fn addr(i: u32) -> Address {
        Address::of(&i.to_le_bytes())
    }

    #[test]
    fn replicas_go_to_distinct_zones_when_there_are_enough() {
        let view = View::new(cluster(5, 2, 2));
        let p = Placement::for_writes(&view, FailureDomain::Zone);
        for i in 0..2000 {
            let ids = p.place(&addr(i), 3);
            let zones: HashSet<_> = ids.iter().map(|id| &view.get(id).unwrap().zone).collect();
            assert_eq!(zones.len(), 3);
        }
    }

    #[test]
    fn with_two_zones_replicas_use_both_and_distinct_racks() {
        let view = View::new(cluster(2, 3, 2));
        let p = Placement::for_writes(&view, FailureDomain::Zone);
        for i in 0..2000 {
            let ids = p.place(&addr(i), 3);
            let nodes: Vec<_> = ids.iter().map(|id| view.get(id).unwrap()).collect();
            let zones: HashSet<_> = nodes.iter().map(|n| &n.zone).collect();
            let racks: HashSet<_> = nodes.iter().map(|n| (&n.zone, &n.rack)).collect();
            assert_eq!(zones.len(), 2);
            assert_eq!(racks.len(), 3);
            // The first two replicas already cover both zones.
            assert_ne!(nodes[0].zone, nodes[1].zone);
        }
    }

    #[test]
    fn placement_is_deterministic_and_never_repeats_a_node() {
        let view = View::new(cluster(3, 1, 1));
        let p = Placement::for_writes(&view, FailureDomain::Host);
        let a = p.place(&addr(7), 10);
        assert_eq!(a.len(), 3, "at most every node once");
        assert_eq!(
            a,
            Placement::for_writes(&view, FailureDomain::Host).place(&addr(7), 10)
        );
    }

    #[test]
    fn a_join_moves_only_a_fair_share_of_blocks() {
        let nodes = cluster(4, 3, 3);
        let before = Placement::for_writes(&View::new(nodes.clone()), FailureDomain::Zone);
        let mut grown = nodes.clone();
        grown.push(node(999, 1, 1));
        let after = Placement::for_writes(&View::new(grown), FailureDomain::Zone);
        let blocks = 20_000;
        let moved = (0..blocks)
            .filter(|&i| {
                let a: HashSet<_> = before.place(&addr(i), 3).into_iter().collect();
                let b: HashSet<_> = after.place(&addr(i), 3).into_iter().collect();
                a != b
            })
            .count();
        // 3 of 37 nodes' worth of replicas is about 8% of blocks; allow slack
        // for the domain constraints, but nothing like a reshuffle.
        let fraction = moved as f64 / blocks as f64;
        assert!(fraction < 0.2, "moved {fraction}");
        assert!(fraction > 0.0);
    }

    #[test]
    fn write_tree_skips_dead_and_full_nodes_and_moves_nothing_else() {
        let healthy = cluster(3, 1, 2);
        let healthy_view = View::new(healthy.clone());
        let reads = Placement::for_reads(&healthy_view, FailureDomain::Zone);
        let mut degraded = healthy.clone();
        degraded[0].state = NodeState::Dead;
        degraded[2].used = degraded[2].capacity;
        let writes = Placement::for_writes(&View::new(degraded.clone()), FailureDomain::Zone);
        assert_eq!(reads.size(), 6);
        assert_eq!(writes.size(), 4);
        let (dead, full) = (degraded[0].id, degraded[2].id);
        for i in 0..2000 {
            let before = reads.place(&addr(i), 3);
            let after = writes.place(&addr(i), 3);
            assert!(!after.contains(&dead) && !after.contains(&full));
            if !before.contains(&dead) && !before.contains(&full) {
                // The full node's lower weight may reorder replicas, but no
                // unaffected block changes holders.
                let (b, a): (HashSet<_>, HashSet<_>) =
                    (before.into_iter().collect(), after.into_iter().collect());
                assert_eq!(b, a, "an unaffected block moved");
            }
        }
    }

    #[test]
    fn weights_favour_nodes_with_more_free_space() {
        let mut nodes = cluster(1, 1, 2);
        nodes[0].used = nodes[0].capacity / 8 * 7;
        let view = View::new(nodes.clone());
        let p = Placement::for_writes(&view, FailureDomain::Host);
        let firsts = (0..8000)
            .filter(|&i| p.place(&addr(i), 1)[0] == nodes[1].id)
            .count();
        // Weight 8 against 1: the emptier node leads about 8/9 of the time.
        assert!(firsts > 6500, "{firsts}");
    }
}
