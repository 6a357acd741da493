//! Deterministic simulation of the mutable-block driver (`Consensus`, the
//! same code peers run) over an in-memory network under virtual time. Each
//! seed fixes one schedule: message delays, losses and duplicates, acceptors
//! that crash and come back (their state on "disk" survives), partitions
//! between proposers and acceptors, and proposers that crash mid-operation.
//! Three clients run reads and compare-and-set increments on one block; the
//! history of every seed must be linearizable. A failing seed is printed;
//! `SHOAL_SIM_SEED=N` replays just that one, `SHOAL_SIM_SEEDS=N` runs more.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shoal_core::mutable::{MutableBlock, WriterKey};
use shoal_core::paxos::{Acceptor, Request};
use shoal_core::{Address, NodeId};
use shoal_e2e::linearizability::{self, Event, Op};
use shoal_node::consensus::{Consensus, ConsensusConfig, Network, PutOutcome, ReplyFuture};

const ACCEPTORS: u8 = 3;
const CLIENTS: u8 = 3;
const OPS_PER_CLIENT: usize = 12;

/// Everything outside the proposers: acceptors' disks and the faults.
struct World {
    members: Vec<NodeId>,
    disks: Mutex<HashMap<NodeId, HashMap<Address, Acceptor<MutableBlock>>>>,
    faults: Mutex<Faults>,
}

struct Faults {
    rng: StdRng,
    down: HashSet<NodeId>,
    cut: HashSet<(NodeId, NodeId)>,
}

/// One proposer node's view of the network.
struct Link {
    from: NodeId,
    world: Arc<World>,
}

impl Network for Link {
    fn initial_members(&self, _: &Address, _: usize) -> Vec<NodeId> {
        self.world.members.clone()
    }

    fn request(&self, to: NodeId, address: Address, request: Request<MutableBlock>) -> ReplyFuture {
        let (world, from) = (self.world.clone(), self.from);
        Box::pin(async move {
            let (lost, duplicated, there, back) = {
                let mut f = world.faults.lock().unwrap();
                let lost = f.rng.random_bool(0.05);
                let duplicated = f.rng.random_bool(0.05);
                (
                    lost,
                    duplicated,
                    f.rng.random_range(0..20u64),
                    f.rng.random_range(0..20u64),
                )
            };
            let reachable = |w: &World| {
                let f = w.faults.lock().unwrap();
                !f.down.contains(&to) && !f.cut.contains(&(from, to))
            };
            tokio::time::sleep(Duration::from_millis(there)).await;
            if lost || !reachable(&world) {
                return None;
            }
            let reply = {
                let mut disks = world.disks.lock().unwrap();
                let acceptor = disks.entry(to).or_default().entry(address).or_default();
                let validate = |current: Option<&MutableBlock>, next: &MutableBlock| {
                    next.check_successor(current).map_err(|e| e.to_string())
                };
                if duplicated {
                    acceptor.handle(to, request.clone(), validate);
                }
                acceptor.handle(to, request, validate).0
            };
            tokio::time::sleep(Duration::from_millis(back)).await;
            reachable(&world).then_some(reply)
        })
    }
}

fn node(n: u8) -> NodeId {
    NodeId([n; 16])
}

fn counter(block: &MutableBlock) -> u64 {
    u64::from_le_bytes(block.payload.as_slice().try_into().expect("8-byte counter"))
}

fn config() -> ConsensusConfig {
    ConsensusConfig {
        eviction_delay: Duration::from_secs(3600),
        replicas: usize::from(ACCEPTORS),
        round_timeout: Duration::from_millis(100),
        deadline: Duration::from_secs(2),
    }
}

/// Runs one schedule; returns the history and whether it is linearizable.
fn simulate(seed: u64) -> (Vec<Event>, Option<bool>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let world = Arc::new(World {
            members: (0..ACCEPTORS).map(node).collect(),
            disks: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults {
                rng: StdRng::seed_from_u64(seed),
                down: HashSet::new(),
                cut: HashSet::new(),
            }),
        });
        let keys: Vec<WriterKey> = (0..CLIENTS)
            .map(|c| WriterKey::from_secret([20 + c; 32]))
            .collect();
        let owner = WriterKey::from_secret([1; 32]);
        let start = owner.create(
            [9; 16],
            keys.iter().map(WriterKey::public).collect(),
            0u64.to_le_bytes().to_vec(),
        );
        let creator = Consensus::new(
            node(100),
            config(),
            Arc::new(Link {
                from: node(100),
                world: world.clone(),
            }),
            seed,
        );
        assert!(matches!(
            creator.put(start.clone()).await,
            Ok(PutOutcome::Written(_))
        ));

        let history = Arc::new(Mutex::new(Vec::new()));
        let crash = Arc::new(Mutex::new(HashSet::<u8>::new()));
        let epoch = tokio::time::Instant::now();
        let now = move || epoch.elapsed().as_micros() as u64;
        let mut clients = Vec::new();
        for (c, key) in keys.into_iter().enumerate() {
            let c = c as u8;
            let (world, history, crash, start) =
                (world.clone(), history.clone(), crash.clone(), start.clone());
            clients.push(tokio::spawn(async move {
                let me = node(10 + c);
                let fresh = |incarnation: u64| {
                    Consensus::new(
                        me,
                        config(),
                        Arc::new(Link {
                            from: me,
                            world: world.clone(),
                        }),
                        seed ^ (u64::from(c) << 32) ^ incarnation,
                    )
                };
                let mut incarnation = 0;
                let mut consensus = fresh(incarnation);
                let mut current = start;
                for _ in 0..OPS_PER_CLIENT {
                    if crash.lock().unwrap().remove(&c) {
                        // The proposer crashed: it restarts with no memory.
                        incarnation += 1;
                        consensus = fresh(incarnation);
                    }
                    let invoked = now();
                    if let Ok(Ok(b)) =
                        tokio::time::timeout(Duration::from_secs(3), consensus.get(current.address))
                            .await
                    {
                        history.lock().unwrap().push(Event {
                            op: Op::Read((b.version, counter(&b))),
                            invoked,
                            completed: Some(now()),
                        });
                        current = b;
                    }
                    let (expected, value) = (current.version, counter(&current) + 1);
                    let next = key.write_after(&current, value.to_le_bytes().to_vec());
                    let invoked = now();
                    let op = match tokio::time::timeout(Duration::from_secs(3), consensus.put(next))
                        .await
                    {
                        Ok(Ok(PutOutcome::Written(b))) => {
                            current = b;
                            Some(Op::Written { expected, value })
                        }
                        Ok(Ok(PutOutcome::Conflict(b))) => {
                            let op = Op::Refused {
                                expected,
                                current: (b.version, counter(&b)),
                            };
                            current = b;
                            Some(op)
                        }
                        _ => None,
                    };
                    let event = match op {
                        Some(op) => Event {
                            op,
                            invoked,
                            completed: Some(now()),
                        },
                        None => Event {
                            op: Op::Unknown { expected, value },
                            invoked,
                            completed: None,
                        },
                    };
                    history.lock().unwrap().push(event);
                }
            }));
        }

        // The nemesis: one fault at a time, while the clients run.
        let nemesis = {
            let (world, crash) = (world.clone(), crash.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    let (wait, kind, acceptor, client) = {
                        let mut f = world.faults.lock().unwrap();
                        (
                            f.rng.random_range(50..300u64),
                            f.rng.random_range(0..3u8),
                            node(f.rng.random_range(0..ACCEPTORS)),
                            f.rng.random_range(0..CLIENTS),
                        )
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    {
                        let mut f = world.faults.lock().unwrap();
                        match kind {
                            0 => {
                                f.down.insert(acceptor);
                            }
                            1 => {
                                f.cut.insert((node(10 + client), acceptor));
                            }
                            _ => {
                                crash.lock().unwrap().insert(client);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    let mut f = world.faults.lock().unwrap();
                    f.down.clear();
                    f.cut.clear();
                }
            })
        };
        for c in clients {
            c.await.expect("client");
        }
        nemesis.abort();
        {
            let mut f = world.faults.lock().unwrap();
            f.down.clear();
            f.cut.clear();
        }
        let reader = Consensus::new(
            node(101),
            config(),
            Arc::new(Link {
                from: node(101),
                world: world.clone(),
            }),
            seed,
        );
        let invoked = now();
        let last = reader.get(start.address).await.expect("final read");
        let mut history = std::mem::take(&mut *history.lock().unwrap());
        history.push(Event {
            op: Op::Read((last.version, counter(&last))),
            invoked,
            completed: Some(now()),
        });
        let verdict = linearizability::check((1, 0), &history, 10_000_000);
        (history, verdict)
    })
}

#[test]
fn every_simulated_schedule_is_linearizable() {
    let seeds: Vec<u64> = match std::env::var("SHOAL_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SHOAL_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("SHOAL_SIM_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(2000);
            (0..n).collect()
        }
    };
    let mut operations = 0;
    for &seed in &seeds {
        let Ok((history, verdict)) = std::panic::catch_unwind(|| simulate(seed)) else {
            panic!("seed {seed} panicked; replay with SHOAL_SIM_SEED={seed}");
        };
        operations += history.len();
        assert_eq!(
            verdict,
            Some(true),
            "seed {seed}: history not linearizable; replay with SHOAL_SIM_SEED={seed}\n{history:#?}"
        );
    }
    eprintln!(
        "simulation: {} schedules, {operations} operations, all linearizable",
        seeds.len()
    );
}

#[test]
fn a_seed_replays_exactly() {
    let (a, _) = simulate(7);
    let (b, _) = simulate(7);
    let shape = |h: &[Event]| {
        h.iter()
            .map(|e| (format!("{:?}", e.op), e.invoked, e.completed))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&a), shape(&b));
}
