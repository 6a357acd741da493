//! Topology: where Shoal volumes can be reached from, and how much room
//! each part of the cluster has. Every peer can mount every volume, so a
//! volume is accessible from every zone and rack that has a live peer;
//! what placement decides is where its replicas live, not who can use it.

use std::collections::BTreeSet;

use shoal_core::placement::FailureDomain;
use shoal_proto::admin::{Member, NodeState};
use shoal_proto::csi_v1::{Topology, TopologyRequirement};
use tonic::Status;

pub const ZONE_KEY: &str = "topology.shoal.io/zone";
pub const RACK_KEY: &str = "topology.shoal.io/rack";

fn live(m: &Member) -> bool {
    m.state == NodeState::Alive as i32
}

/// The topology segment of one peer.
pub fn segment(m: &Member) -> Topology {
    Topology {
        segments: [
            (ZONE_KEY.to_string(), m.zone.clone()),
            (RACK_KEY.to_string(), m.rack.clone()),
        ]
        .into(),
    }
}

/// Whether a peer lies in `topology` (every key it names matches; keys
/// Shoal does not know match nothing).
fn within(m: &Member, topology: &Topology) -> bool {
    topology.segments.iter().all(|(k, v)| match k.as_str() {
        ZONE_KEY => *v == m.zone,
        RACK_KEY => *v == m.rack,
        _ => false,
    })
}

/// Where a new volume is accessible from: every segment with a live peer.
/// A requirement must name at least one segment Shoal has (its requisite
/// list, else its preferred list); otherwise the volume cannot be
/// provisioned there.
pub fn accessible(
    members: &[Member],
    requirement: Option<&TopologyRequirement>,
) -> Result<Vec<Topology>, Status> {
    let all: BTreeSet<(String, String)> = members
        .iter()
        .filter(|m| live(m))
        .map(|m| (m.zone.clone(), m.rack.clone()))
        .collect();
    let topologies: Vec<Topology> = all
        .into_iter()
        .map(|(zone, rack)| Topology {
            segments: [(ZONE_KEY.to_string(), zone), (RACK_KEY.to_string(), rack)].into(),
        })
        .collect();
    if let Some(req) = requirement {
        let wanted = if req.requisite.is_empty() {
            &req.preferred
        } else {
            &req.requisite
        };
        let reachable = wanted
            .iter()
            .any(|t| members.iter().any(|m| live(m) && within(m, t)));
        if !wanted.is_empty() && !reachable {
            return Err(Status::resource_exhausted(format!(
                "no live Shoal peer in any of the required topologies {:?}",
                wanted.iter().map(|t| &t.segments).collect::<Vec<_>>()
            )));
        }
    }
    Ok(topologies)
}

/// Checks that the cluster can keep `replicas` copies `domain` apart: its
/// placement spreads at least that far, and it has enough such domains.
pub fn check_spread(
    members: &[Member],
    cluster_domain: FailureDomain,
    domain: FailureDomain,
    replicas: u32,
) -> Result<(), Status> {
    if crate::request::spread(cluster_domain) < crate::request::spread(domain) {
        return Err(Status::invalid_argument(format!(
            "failureDomain {domain} asks for more than the cluster's placement gives \
             ({cluster_domain}); change it in the StorageCluster"
        )));
    }
    let domains: BTreeSet<String> = members
        .iter()
        .filter(|m| live(m))
        .map(|m| match domain {
            FailureDomain::Zone => m.zone.clone(),
            FailureDomain::Rack => format!("{}/{}", m.zone, m.rack),
            FailureDomain::Host => m.node_id.clone(),
        })
        .collect();
    if domains.len() < replicas as usize {
        return Err(Status::resource_exhausted(format!(
            "{replicas} replicas in distinct {domain}s need {replicas} {domain}s with live peers; \
             the cluster has {}",
            domains.len()
        )));
    }
    Ok(())
}

/// Bytes a volume of `replicas` copies can still take from the live peers
/// within `topology` (all peers if none is given).
pub fn capacity(members: &[Member], topology: Option<&Topology>, replicas: u32) -> u64 {
    let free: u64 = members
        .iter()
        .filter(|m| live(m) && topology.is_none_or(|t| within(m, t)))
        .map(|m| m.capacity.saturating_sub(m.used))
        .sum();
    free / u64::from(replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn member(id: &str, zone: &str, rack: &str, state: NodeState) -> Member {
        Member {
            node_id: id.into(),
            zone: zone.into(),
            rack: rack.into(),
            state: state as i32,
            capacity: 1000,
            used: 100,
            ..Default::default()
        }
    }

    fn topo(pairs: &[(&str, &str)]) -> Topology {
        Topology {
            segments: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn cluster() -> Vec<Member> {
        vec![
            member("a", "z1", "r1", NodeState::Alive),
            member("b", "z1", "r2", NodeState::Alive),
            member("c", "z2", "r1", NodeState::Alive),
            member("d", "z3", "r1", NodeState::Dead),
        ]
    }

    #[test]
    fn volumes_are_accessible_wherever_a_peer_lives() {
        let all = accessible(&cluster(), None).unwrap();
        assert_eq!(all.len(), 3, "one per live zone and rack: {all:?}");
        let req = TopologyRequirement {
            requisite: vec![topo(&[(ZONE_KEY, "z9")]), topo(&[(ZONE_KEY, "z2")])],
            preferred: vec![],
        };
        assert!(accessible(&cluster(), Some(&req)).is_ok());
        for wanted in [
            topo(&[(ZONE_KEY, "z3")]),
            topo(&[(ZONE_KEY, "z1"), (RACK_KEY, "r9")]),
            topo(&[("kubernetes.io/hostname", "x")]),
        ] {
            let req = TopologyRequirement {
                requisite: vec![wanted],
                preferred: vec![],
            };
            assert_eq!(
                accessible(&cluster(), Some(&req)).unwrap_err().code(),
                Code::ResourceExhausted
            );
        }
    }

    #[test]
    fn spread_needs_policy_and_domains() {
        let m = cluster();
        assert!(check_spread(&m, FailureDomain::Zone, FailureDomain::Zone, 2).is_ok());
        assert_eq!(
            check_spread(&m, FailureDomain::Zone, FailureDomain::Zone, 3)
                .unwrap_err()
                .code(),
            Code::ResourceExhausted
        );
        assert!(check_spread(&m, FailureDomain::Zone, FailureDomain::Rack, 3).is_ok());
        assert_eq!(
            check_spread(&m, FailureDomain::Host, FailureDomain::Zone, 1)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn capacity_counts_live_peers_in_the_segment() {
        let m = cluster();
        assert_eq!(capacity(&m, None, 3), 900);
        assert_eq!(capacity(&m, Some(&topo(&[(ZONE_KEY, "z1")])), 1), 1800);
        assert_eq!(capacity(&m, Some(&topo(&[(ZONE_KEY, "z3")])), 1), 0);
    }
}
