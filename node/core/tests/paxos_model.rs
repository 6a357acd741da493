//! Exhaustive small-scope model check of the pure Paxos core (stateright):
//! four acceptors (three in the first quorum), two proposers running
//! compare-and-set writes and one quorum reconfiguration, over a network
//! that loses, duplicates and reorders messages, with proposers retrying at
//! any moment. Checked in every reachable state: no two different states are
//! ever chosen for the same slot.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shoal_core::NodeId;
use shoal_core::paxos::{
    Acceptor, Action, Chosen, CompareAndSet, Config, Entry, Op, Outcome, Proposal, Proposer, Reply,
    Request,
};
use stateright::actor::{Actor, ActorModel, ActorModelState, Id, LossyNetwork, Network, Out};
use stateright::{Checker, Expectation, Model};

/// Compare-and-set on a small integer.
type Cas = CompareAndSet<u8>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Msg {
    Request(Request<u8>),
    Reply(Reply<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum State {
    Acceptor {
        acceptor: Acceptor<u8>,
        /// Ghost state for the checker: every proposal this acceptor ever
        /// accepted (the acceptor itself keeps only the latest).
        ever_accepted: BTreeSet<Proposal<u8>>,
    },
    Proposer {
        proposer: Proposer<u8, Cas>,
        /// Operations still to run, in order.
        script: Vec<Op<Cas>>,
        outcomes: Vec<Outcome<u8>>,
        /// Times this proposer restarted a phase; bounds the state space.
        retries: u8,
    },
}

#[derive(Clone, Debug)]
enum Node {
    Acceptor,
    /// `creator`: the block's creator, which skips phase 1 with the
    /// reserved round 0 ([`Proposer::creator`]).
    Proposer {
        ops: Vec<Op<Cas>>,
        max_retries: u8,
        creator: bool,
    },
}

fn node_id(id: Id) -> NodeId {
    NodeId([usize::from(id) as u8; 16])
}

fn actor_id(node: NodeId) -> Id {
    Id::from(usize::from(node.0[0]))
}

fn first_quorum() -> Config {
    Config {
        epoch: 1,
        members: (0..3).map(|i| node_id(Id::from(i))).collect(),
    }
}

fn carry_out(actions: Vec<Action<u8>>, state: &mut State, o: &mut Out<Node>) {
    let State::Proposer {
        proposer,
        script,
        outcomes,
        ..
    } = state
    else {
        return;
    };
    let mut queue = actions;
    // Bounded: each finished operation starts at most one more.
    for _ in 0..8 {
        let mut next = Vec::new();
        for action in queue {
            match action {
                Action::Send(to, request) => o.send(actor_id(to), Msg::Request(request)),
                Action::Backoff => o.set_timer((), Duration::ZERO..Duration::from_millis(1)),
                Action::Finished(outcome) => {
                    outcomes.push(outcome);
                    if !script.is_empty() {
                        next.extend(proposer.start(script.remove(0)));
                    }
                }
            }
        }
        if next.is_empty() {
            return;
        }
        queue = next;
    }
}

impl Actor for Node {
    type Msg = Msg;
    type State = State;
    type Timer = ();
    type Random = ();
    type Storage = ();

    fn on_start(&self, id: Id, _: &Option<()>, o: &mut Out<Self>) -> State {
        match self {
            Node::Acceptor => State::Acceptor {
                acceptor: Acceptor::default(),
                ever_accepted: BTreeSet::new(),
            },
            Node::Proposer { ops, creator, .. } => {
                let mut script = ops.clone();
                let known = Chosen::empty(first_quorum());
                let mut proposer = if *creator {
                    Proposer::creator(node_id(id), known)
                } else {
                    Proposer::new(node_id(id), known)
                };
                let first = proposer.start(script.remove(0));
                let mut state = State::Proposer {
                    proposer,
                    script,
                    outcomes: Vec::new(),
                    retries: 0,
                };
                // A proposer may give up waiting and retry at any time.
                o.set_timer((), Duration::ZERO..Duration::from_millis(1));
                carry_out(first, &mut state, o);
                state
            }
        }
    }

    fn on_msg(&self, id: Id, state: &mut Cow<State>, src: Id, msg: Msg, o: &mut Out<Self>) {
        match (state.to_mut(), msg) {
            (
                State::Acceptor {
                    acceptor,
                    ever_accepted,
                },
                Msg::Request(request),
            ) => {
                let (reply, _) = acceptor.handle(node_id(id), request, |_, _| Ok(()));
                if let Reply::Accepted { .. } = reply {
                    ever_accepted.extend(acceptor.accepted.clone());
                }
                o.send(src, Msg::Reply(reply));
            }
            (s @ State::Proposer { .. }, Msg::Reply(reply)) => {
                let State::Proposer { proposer, .. } = s else {
                    unreachable!()
                };
                let actions = proposer.on_reply(node_id(src), reply);
                carry_out(actions, s, o);
            }
            _ => {}
        }
    }

    fn on_timeout(&self, _: Id, state: &mut Cow<State>, _: &(), o: &mut Out<Self>) {
        let Node::Proposer { max_retries, .. } = self else {
            return;
        };
        let s = state.to_mut();
        let State::Proposer {
            proposer, retries, ..
        } = s
        else {
            return;
        };
        if proposer.is_idle() || *retries >= *max_retries {
            return;
        }
        *retries += 1;
        let actions = proposer.retry();
        o.set_timer((), Duration::ZERO..Duration::from_millis(1));
        carry_out(actions, s, o);
    }
}

/// Entries accepted by a majority under one ballot: chosen, whether or not
/// anyone learned it. (Both quorums of the scope, {0, 1, 2} and {0, 1},
/// have a majority of two.)
fn chosen_entries(state: &ActorModelState<Node>) -> BTreeMap<u64, BTreeSet<Entry<u8>>> {
    let mut votes: BTreeMap<&Proposal<u8>, usize> = BTreeMap::new();
    for s in &state.actor_states {
        if let State::Acceptor { ever_accepted, .. } = &**s {
            for p in ever_accepted {
                *votes.entry(p).or_default() += 1;
            }
        }
    }
    let mut chosen: BTreeMap<u64, BTreeSet<Entry<u8>>> = BTreeMap::new();
    for (p, n) in votes {
        if n >= 2 {
            chosen.entry(p.slot).or_default().insert(p.entry.clone());
        }
    }
    chosen
}

/// Every chosen state any actor knows of, or was told in an outcome.
fn chosen_states(state: &ActorModelState<Node>) -> Vec<Chosen<u8>> {
    let mut all = Vec::new();
    for s in &state.actor_states {
        match &**s {
            State::Acceptor { acceptor, .. } => all.extend(acceptor.chosen.clone()),
            State::Proposer {
                proposer, outcomes, ..
            } => {
                all.push(proposer.known().clone());
                for o in outcomes {
                    match o {
                        Outcome::Done(c) | Outcome::Refused { current: c, .. } => {
                            all.push(c.clone())
                        }
                        Outcome::Invalid(_) => {}
                    }
                }
            }
        }
    }
    all
}

/// The scope: three acceptors (0, 1, 2) and two proposers, the first of
/// which creates the block without phase 1 (round 0). `deep` adds a
/// second operation to each proposer, message loss, and proposers that
/// restart a phase at any moment (up to twice).
fn model(deep: bool) -> ActorModel<Node, bool> {
    let mut first = vec![Op::Write(Cas {
        expected: None,
        new: 1,
    })];
    // Quorum {0, 1, 2} becomes {0, 1}.
    let mut second = vec![Op::Reconfigure(
        (0..2).map(|i| node_id(Id::from(i))).collect(),
    )];
    if deep {
        first.push(Op::Write(Cas {
            expected: Some(1),
            new: 3,
        }));
        second.push(Op::Write(Cas {
            expected: None,
            new: 2,
        }));
    }
    ActorModel::new(deep, ())
        .actors([Node::Acceptor, Node::Acceptor, Node::Acceptor])
        .actor(Node::Proposer {
            ops: first,
            max_retries: if deep { 2 } else { 0 },
            creator: true,
        })
        .actor(Node::Proposer {
            ops: second,
            max_retries: if deep { 2 } else { 0 },
            creator: false,
        })
        .init_network(Network::new_unordered_duplicating([]))
        .lossy_network(if deep {
            LossyNetwork::Yes
        } else {
            LossyNetwork::No
        })
        .property(Expectation::Always, "one state per slot", |_, state| {
            let all = chosen_states(state);
            let learned_agree = all
                .iter()
                .all(|a| all.iter().all(|b| a.slot != b.slot || a == b));
            learned_agree
                && chosen_entries(state)
                    .values()
                    .all(|entries| entries.len() == 1)
        })
        .property(Expectation::Sometimes, "a write is chosen", |_, state| {
            chosen_states(state).iter().any(|c| c.value.is_some())
        })
        .property(
            Expectation::Sometimes,
            "the quorum is replaced",
            |_, state| chosen_states(state).iter().any(|c| c.config.epoch == 2),
        )
}

/// Every interleaving up to the depth bound (default 14 steps: enough for
/// one proposer to get a value accepted by a majority unnoticed and the
/// other to win phase 1 over it and propose, in any order, with any message
/// delivered any number of times; a proposer that ignored the value it found
/// in flight is caught at this depth). Message loss is covered
/// without modelling it: in a duplicating network any message may also never
/// be delivered, and dropping one reaches no actor state that not delivering
/// it does not.
#[test]
fn no_two_states_are_chosen_for_one_slot_exhaustively() {
    let depth: usize = std::env::var("SHOAL_MODEL_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(14);
    let checker = model(false)
        .checker()
        .threads(1)
        .target_max_depth(depth)
        .spawn_bfs()
        .join();
    eprintln!(
        "paxos model: {} unique states to depth {depth}",
        checker.unique_state_count()
    );
    checker.assert_properties();
}

/// Long random walks through the deeper scope: more operations, lossy
/// network, restarts; each step is checked.
#[test]
fn no_two_states_are_chosen_for_one_slot_on_random_walks() {
    let checker = model(true)
        .checker()
        .threads(1)
        .target_max_depth(30)
        .target_state_count(3_000_000)
        .spawn_simulation(0x5ea1, stateright::UniformChooser)
        .join();
    eprintln!(
        "paxos random walks: {} states visited",
        checker.unique_state_count()
    );
    checker.assert_no_discovery("one state per slot");
}
