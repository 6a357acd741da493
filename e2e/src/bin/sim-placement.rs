//! Simulation of placement and membership at scale, with the real placement
//! code and the real gossip state machine (no network): for 10,000 nodes in
//! zones and racks it prints membership memory per node, max/mean blocks per
//! node over 1M placed blocks, the fraction of blocks that move when one node
//! joins and when one leaves, zone-distinctness violations, and gossip traffic
//! per node in simulated clusters of growing size. Table, then one JSON line.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use foca::{Foca, PostcardCodec, Timer};
use rand::SeedableRng;
use shoal_core::placement::{FailureDomain, Placement};
use shoal_core::{Address, NodeId, NodeInfo, NodeState, View};
use shoal_node::gossip::Member;

/// Counts live heap bytes, so memory figures are measured, not estimated.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 10)]
    zones: usize,
    #[arg(long, default_value_t = 20)]
    racks_per_zone: usize,
    #[arg(long, default_value_t = 1_000_000)]
    blocks: u32,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Cluster sizes for the gossip traffic simulation.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 400, 1000])]
    gossip_sizes: Vec<usize>,
    /// Simulated seconds of gossip per size.
    #[arg(long, default_value_t = 30)]
    gossip_seconds: u64,
}

fn node_id(i: usize) -> NodeId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(i as u64).to_le_bytes());
    NodeId(
        *blake3::hash(&id)
            .as_bytes()
            .first_chunk::<16>()
            .expect("16 bytes"),
    )
}

fn node(i: usize, args: &Args) -> NodeInfo {
    let zone = i % args.zones;
    let rack = (i / args.zones) % args.racks_per_zone;
    NodeInfo {
        id: node_id(i),
        addr: SocketAddr::from(([127, 0, 0, 1], (i % 60_000) as u16 + 1024)),
        zone: format!("zone-{zone}"),
        rack: format!("zone-{zone}-rack-{rack}"),
        capacity: 4 << 40,
        used: 0,
        state: NodeState::Alive,
    }
}

fn member(n: &NodeInfo) -> Member {
    Member {
        id: n.id,
        addr: n.addr,
        zone: n.zone.clone(),
        rack: n.rack.clone(),
        capacity: n.capacity,
        generation: 1,
    }
}

fn address(i: u32) -> Address {
    Address::of(&i.to_le_bytes())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nodes: Vec<NodeInfo> = (0..args.nodes).map(|i| node(i, &args)).collect();

    // Memory a peer holds for membership: the gossip state machine with
    // every member, and the published view.
    let before = LIVE.load(Ordering::Relaxed);
    let mut runtime = foca::AccumulatingRuntime::new();
    let mut foca = Foca::new(
        member(&nodes[0]),
        foca::Config::new_lan(NonZeroU32::new(args.nodes as u32).expect("nodes > 0")),
        rand::rngs::StdRng::seed_from_u64(1),
        PostcardCodec,
    );
    foca.apply_many(
        nodes[1..].iter().map(|n| foca::Member::alive(member(n))),
        false,
        &mut runtime,
    )?;
    let view = View::new(nodes.clone());
    let membership_bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(runtime);

    let before = LIVE.load(Ordering::Relaxed);
    let placement = Placement::for_writes(&view, FailureDomain::Zone);
    let placement_bytes = LIVE.load(Ordering::Relaxed) - before;

    // 1M blocks: balance and zone distinctness.
    let r = args.replicas;
    let mut per_node: HashMap<NodeId, u64> = HashMap::new();
    let mut violations = 0u64;
    let mut before_sets: Vec<[NodeId; 8]> = Vec::with_capacity(args.blocks as usize);
    for i in 0..args.blocks {
        let ids = placement.place(&address(i), r);
        let zones: HashSet<&str> = ids
            .iter()
            .map(|id| view.get(id).expect("known").zone.as_str())
            .collect();
        if ids.len() < r || (args.zones >= r && zones.len() < r) {
            violations += 1;
        }
        for id in &ids {
            *per_node.entry(*id).or_default() += 1;
        }
        before_sets.push(set_of(&ids));
    }
    let max = per_node.values().copied().max().unwrap_or(0);
    let mean = (u64::from(args.blocks) * r as u64) as f64 / args.nodes as f64;

    // One node joins.
    let mut grown = nodes.clone();
    grown.push(node(args.nodes, &args));
    let joined = Placement::for_writes(&View::new(grown), FailureDomain::Zone);
    let moved_join = moved(&joined, &before_sets, args.blocks, r);
    // One node leaves (declared dead).
    let mut shrunk = nodes.clone();
    shrunk[args.nodes / 2].state = NodeState::Dead;
    let left = Placement::for_writes(&View::new(shrunk), FailureDomain::Zone);
    let moved_leave = moved(&left, &before_sets, args.blocks, r);
    let ideal = r as f64 / args.nodes as f64;

    // Gossip traffic per node, simulated.
    let traffic: Vec<(usize, f64, f64)> = args
        .gossip_sizes
        .iter()
        .map(|&n| simulate_gossip(n, Duration::from_secs(args.gossip_seconds)))
        .collect::<anyhow::Result<_>>()?;

    println!(
        "Shoal placement and membership simulation: {} nodes, {} zones x {} racks, {} blocks, R={r}",
        args.nodes, args.zones, args.racks_per_zone, args.blocks
    );
    println!(
        "  membership memory per node      {:>12}",
        human(membership_bytes)
    );
    println!(
        "  placement tree per node         {:>12}",
        human(placement_bytes)
    );
    println!(
        "  blocks per node: mean {mean:.1}, max {max} (max/mean {:.3})",
        max as f64 / mean
    );
    println!(
        "  blocks moved when a node joins  {:>11.4}% (ideal {:.4}%)",
        moved_join * 100.0,
        ideal * 100.0
    );
    println!(
        "  blocks moved when a node leaves {:>11.4}% (ideal {:.4}%)",
        moved_leave * 100.0,
        ideal * 100.0
    );
    println!("  zone-distinctness violations    {violations:>12}");
    for (n, mean, max) in &traffic {
        println!("  gossip, {n:>5} nodes: sent per node {mean:>8.0} B/s mean, {max:>8.0} B/s max");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "placement_membership",
            "nodes": args.nodes,
            "zones": args.zones,
            "racks_per_zone": args.racks_per_zone,
            "blocks": args.blocks,
            "replicas": r,
            "membership_bytes_per_node": membership_bytes,
            "placement_tree_bytes": placement_bytes,
            "blocks_per_node_mean": mean,
            "blocks_per_node_max": max,
            "moved_fraction_join": moved_join,
            "moved_fraction_leave": moved_leave,
            "ideal_moved_fraction": ideal,
            "zone_violations": violations,
            "gossip": traffic.iter().map(|(n, mean, max)| serde_json::json!({
                "nodes": n, "bytes_per_s_mean": mean, "bytes_per_s_max": max
            })).collect::<Vec<_>>(),
        })
    );
    anyhow::ensure!(
        violations == 0 || args.zones < r,
        "zone-distinctness violated"
    );
    Ok(())
}

/// A replica set as a sorted, fixed-size array (unused slots zero).
fn set_of(ids: &[NodeId]) -> [NodeId; 8] {
    let mut set = [NodeId([0; 16]); 8];
    for (slot, id) in set.iter_mut().zip(ids) {
        *slot = *id;
    }
    set[..ids.len().min(8)].sort();
    set
}

fn moved(after: &Placement, before: &[[NodeId; 8]], blocks: u32, r: usize) -> f64 {
    let changed = (0..blocks)
        .filter(|&i| set_of(&after.place(&address(i), r)) != before[i as usize])
        .count();
    changed as f64 / f64::from(blocks)
}

enum Event {
    Deliver { to: usize, data: Vec<u8> },
    Timer { node: usize, timer: Timer<Member> },
}

/// Runs `n` real foca state machines over a simulated 1 ms network for
/// `length` of simulated time; returns (n, mean, max) bytes sent per node per
/// second, measured after a warm-up.
fn simulate_gossip(n: usize, length: Duration) -> anyhow::Result<(usize, f64, f64)> {
    let infos: Vec<NodeInfo> = (0..n)
        .map(|i| NodeInfo {
            id: node_id(i),
            addr: SocketAddr::from(([127, 0, 0, 1], (i % 60_000) as u16 + 1024)),
            zone: format!("zone-{}", i % 3),
            rack: format!("rack-{}", i % 40),
            capacity: 4 << 40,
            used: 0,
            state: NodeState::Alive,
        })
        .collect();
    let members: Vec<Member> = infos.iter().map(member).collect();
    let index: HashMap<NodeId, usize> =
        members.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
    let mut config = foca::Config::new_lan(NonZeroU32::new(n as u32).expect("n > 0"));
    config.max_packet_size = std::num::NonZeroUsize::new(1100).expect("non-zero");
    let mut nodes: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Foca::new(
                m.clone(),
                config.clone(),
                rand::rngs::StdRng::seed_from_u64(i as u64),
                PostcardCodec,
            )
        })
        .collect();
    let warmup = 5_000_000u64;
    let end = warmup + length.as_micros() as u64;
    let mut net = Network {
        index,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        seq: 0,
        sent: vec![0; n],
        warmup,
    };
    let mut runtime = foca::AccumulatingRuntime::new();

    // Start converged: every node knows every other.
    for (i, foca) in nodes.iter_mut().enumerate() {
        foca.apply_many(
            members
                .iter()
                .filter(|m| m.id != members[i].id)
                .cloned()
                .map(foca::Member::alive),
            false,
            &mut runtime,
        )?;
        net.drain(i, 0, &mut runtime);
    }
    // Bounded by simulated time; each event schedules finitely many more.
    while let Some(Reverse((now, id))) = net.queue.pop() {
        if now > end {
            break;
        }
        let node = match net.events.remove(&id).expect("event") {
            Event::Deliver { to, data } => {
                let _ = nodes[to].handle_data(&data, &mut runtime);
                to
            }
            Event::Timer { node, timer } => {
                let _ = nodes[node].handle_timer(timer, &mut runtime);
                node
            }
        };
        net.drain(node, now, &mut runtime);
    }
    let secs = length.as_secs_f64();
    let mean = net.sent.iter().sum::<u64>() as f64 / n as f64 / secs;
    let max = *net.sent.iter().max().unwrap_or(&0) as f64 / secs;
    Ok((n, mean, max))
}

/// A simulated network and clock: events ordered by delivery time (µs).
struct Network {
    index: HashMap<NodeId, usize>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    /// Bytes each node sent after the warm-up.
    sent: Vec<u64>,
    warmup: u64,
}

impl Network {
    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.events.insert(self.seq, event);
        self.queue.push(Reverse((at, self.seq)));
    }

    /// Carries out what node `from` asked for at time `now`: datagrams
    /// arrive 1 ms later, timers when due.
    fn drain(&mut self, from: usize, now: u64, runtime: &mut foca::AccumulatingRuntime<Member>) {
        while let Some((to, data)) = runtime.to_send() {
            if now >= self.warmup {
                self.sent[from] += data.len() as u64;
            }
            if let Some(&to) = self.index.get(&to.id) {
                let data = data.to_vec();
                self.push(now + 1000, Event::Deliver { to, data });
            }
        }
        while let Some((after, timer)) = runtime.to_schedule() {
            self.push(
                now + after.as_micros() as u64,
                Event::Timer { node: from, timer },
            );
        }
        while runtime.to_notify().is_some() {}
    }
}

fn human(bytes: usize) -> String {
    bytesize::ByteSize(bytes as u64).display().iec().to_string()
}
