//! Per-block Multi-Paxos, as a pure state machine: no sockets, clocks or
//! disks. Inputs are requests, replies and timeouts; outputs are replies and
//! [`Action`]s the driver carries out. Every mutable block has its own log of
//! slots decided by its own quorum (its replicas), so there is no leader
//! anywhere but per block, and only while it writes.
//!
//! - **Slots.** Slot `s` holds an [`Entry`]: a new version of the block, or a
//!   new quorum [`Config`]. The state after slot `s` is [`Chosen`]. An
//!   acceptor accepts for slot `s + 1` only on top of a state at `s` it knows
//!   to be chosen, so it needs no log: the latest chosen state and at most one
//!   accepted proposal.
//! - **Multi-Paxos.** A proposer whose ballot a quorum promised keeps it for
//!   the following slots: each further write is one round trip (Accept).
//!   Competing proposers preempt each other with higher ballots; the loser
//!   backs off for a random time the driver picks, and retries.
//! - **Reconfiguration.** A new quorum is itself an entry, chosen by the old
//!   quorum; slots after it are decided by the new one. Acceptors learn the
//!   chosen state from every Accept (its base) and Commit, and members of an
//!   old quorum answer `NotMember` with the state that replaced them, which
//!   redirects a client talking to a stale quorum.
//! - **Reads** are linearizable by quorum: a majority of the quorum reports
//!   its chosen state and accepted proposal; if any proposal beyond the
//!   highest chosen slot may be in flight, the reader finishes it with a full
//!   Paxos round before answering. Leases would save that round only while a
//!   leader is stable and would make correctness depend on clocks; quorum
//!   reads do not.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use crate::NodeId;

/// A proposal number: higher wins; the node breaks ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ballot {
    pub round: u64,
    pub node: NodeId,
}

/// The acceptors that decide a block's slots.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Config {
    pub epoch: u64,
    pub members: Vec<NodeId>,
}

impl Config {
    pub fn quorum(&self) -> usize {
        self.members.len() / 2 + 1
    }

    pub fn contains(&self, node: &NodeId) -> bool {
        self.members.contains(node)
    }
}

/// What a slot decides.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entry<V> {
    /// The block's next version.
    Write(V),
    /// The acceptors of every later slot.
    Reconfigure(Config),
}

/// The state of a block after its first `slot` entries were chosen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chosen<V> {
    pub slot: u64,
    pub value: Option<V>,
    pub config: Config,
}

impl<V: Clone> Chosen<V> {
    /// The state of a block nobody has written, decided by `config`.
    pub fn empty(config: Config) -> Self {
        Self {
            slot: 0,
            value: None,
            config,
        }
    }

    /// The state once `entry` is chosen for the next slot.
    pub fn apply(&self, entry: &Entry<V>) -> Self {
        match entry {
            Entry::Write(v) => Self {
                slot: self.slot + 1,
                value: Some(v.clone()),
                config: self.config.clone(),
            },
            Entry::Reconfigure(c) => Self {
                slot: self.slot + 1,
                value: self.value.clone(),
                config: c.clone(),
            },
        }
    }
}

/// An entry proposed for a slot under a ballot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Proposal<V> {
    pub ballot: Ballot,
    pub slot: u64,
    pub entry: Entry<V>,
}

/// Proposer to acceptor.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Request<V> {
    /// Phase 1: promise to ignore lower ballots, for this slot and after.
    Prepare { ballot: Ballot },
    /// Phase 2: accept `entry` for slot `base.slot + 1`; `base` is chosen.
    Accept {
        ballot: Ballot,
        base: Chosen<V>,
        entry: Entry<V>,
    },
    /// Learn a chosen state.
    Commit { chosen: Chosen<V> },
    /// Report what you hold (for quorum reads).
    Read,
}

/// Acceptor to proposer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reply<V> {
    Promised {
        ballot: Ballot,
        accepted: Option<Proposal<V>>,
        chosen: Option<Chosen<V>>,
    },
    Accepted {
        ballot: Ballot,
        slot: u64,
    },
    /// A higher ballot was promised, or the proposer is behind.
    Rejected {
        promised: Ballot,
        chosen: Option<Chosen<V>>,
    },
    /// This acceptor is not in the block's current quorum.
    NotMember {
        chosen: Chosen<V>,
    },
    /// The entry breaks the block's rules (signature, version, access).
    Invalid {
        reason: String,
    },
    Committed {
        slot: u64,
    },
    State {
        accepted: Option<Proposal<V>>,
        chosen: Option<Chosen<V>>,
    },
}

/// One acceptor's durable state for one block. The driver persists it
/// (synced) whenever [`Acceptor::handle`] reports a change, before sending
/// the reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Acceptor<V> {
    pub promised: Ballot,
    /// Accepted for slot `chosen.slot + 1`, if anything.
    pub accepted: Option<Proposal<V>>,
    /// The latest state this acceptor knows was chosen.
    pub chosen: Option<Chosen<V>>,
}

impl<V> Default for Acceptor<V> {
    fn default() -> Self {
        Self {
            promised: Ballot::default(),
            accepted: None,
            chosen: None,
        }
    }
}

impl<V: Clone + Eq + Debug> Acceptor<V> {
    /// Handles one request. `validate(current, next)` says whether a written
    /// value may follow the current one. Returns the reply and whether the
    /// state changed (and so must be persisted before replying).
    pub fn handle(
        &mut self,
        me: NodeId,
        request: Request<V>,
        validate: impl Fn(Option<&V>, &V) -> Result<(), String>,
    ) -> (Reply<V>, bool) {
        let before = (self.promised, self.accepted.clone(), self.chosen.clone());
        let reply = self.reply(me, request, validate);
        let changed = before != (self.promised, self.accepted.clone(), self.chosen.clone());
        (reply, changed)
    }

    fn learn(&mut self, chosen: &Chosen<V>) {
        if self.chosen.as_ref().is_none_or(|c| c.slot < chosen.slot) {
            self.chosen = Some(chosen.clone());
            if self
                .accepted
                .as_ref()
                .is_some_and(|a| a.slot <= chosen.slot)
            {
                self.accepted = None;
            }
        }
    }

    fn not_member(&self, me: &NodeId) -> Option<Reply<V>> {
        let chosen = self.chosen.as_ref()?;
        (!chosen.config.contains(me)).then(|| Reply::NotMember {
            chosen: chosen.clone(),
        })
    }

    fn reply(
        &mut self,
        me: NodeId,
        request: Request<V>,
        validate: impl Fn(Option<&V>, &V) -> Result<(), String>,
    ) -> Reply<V> {
        match request {
            Request::Prepare { ballot } => {
                if let Some(reply) = self.not_member(&me) {
                    return reply;
                }
                if ballot < self.promised {
                    return Reply::Rejected {
                        promised: self.promised,
                        chosen: self.chosen.clone(),
                    };
                }
                self.promised = ballot;
                Reply::Promised {
                    ballot,
                    accepted: self.accepted.clone(),
                    chosen: self.chosen.clone(),
                }
            }
            Request::Accept {
                ballot,
                base,
                entry,
            } => {
                if ballot < self.promised {
                    return Reply::Rejected {
                        promised: self.promised,
                        chosen: self.chosen.clone(),
                    };
                }
                if self.chosen.as_ref().is_some_and(|c| c.slot > base.slot) {
                    // The proposer is behind: tell it what was chosen.
                    return Reply::Rejected {
                        promised: self.promised,
                        chosen: self.chosen.clone(),
                    };
                }
                self.learn(&base);
                if !base.config.contains(&me) {
                    return Reply::NotMember { chosen: base };
                }
                let valid = match &entry {
                    Entry::Write(v) => validate(base.value.as_ref(), v),
                    Entry::Reconfigure(c)
                        if c.epoch == base.config.epoch + 1 && !c.members.is_empty() =>
                    {
                        Ok(())
                    }
                    Entry::Reconfigure(_) => Err("a new quorum must follow the current one".into()),
                };
                if let Err(reason) = valid {
                    return Reply::Invalid { reason };
                }
                let slot = base.slot + 1;
                self.promised = ballot;
                self.accepted = Some(Proposal {
                    ballot,
                    slot,
                    entry,
                });
                Reply::Accepted { ballot, slot }
            }
            Request::Commit { chosen } => {
                let slot = chosen.slot;
                self.learn(&chosen);
                Reply::Committed { slot }
            }
            Request::Read => self.not_member(&me).unwrap_or_else(|| Reply::State {
                accepted: self.accepted.clone(),
                chosen: self.chosen.clone(),
            }),
        }
    }
}

/// A change to the block's value, decided against its current value.
pub trait Update<V> {
    /// The next value, or why the update does not apply to `current`
    /// (for example, a compare-and-set whose expected version is not current).
    fn apply(&self, current: Option<&V>) -> Result<V, String>;
}

/// The plainest update: set `new` if the value is `expected`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CompareAndSet<T> {
    pub expected: Option<T>,
    pub new: T,
}

impl<T: Clone + Eq + Debug> Update<T> for CompareAndSet<T> {
    fn apply(&self, current: Option<&T>) -> Result<T, String> {
        if current == self.expected.as_ref() {
            Ok(self.new.clone())
        } else {
            Err(format!("expected {:?}, found {current:?}", self.expected))
        }
    }
}

/// What a client asks of a block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op<U> {
    Read,
    Write(U),
    /// Replace the quorum by these members.
    Reconfigure(Vec<NodeId>),
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome<V> {
    /// Read: the current state. Write or reconfiguration: the state it made.
    Done(Chosen<V>),
    /// The update did not apply to the current state, which is given.
    /// `attempted` says whether an earlier round of this operation had
    /// already sent it out for acceptance: if so, another proposer may have
    /// finished it, so it may be in the history behind `current`.
    Refused {
        current: Chosen<V>,
        reason: String,
        attempted: bool,
    },
    /// An acceptor refused the entry itself (bad signature, no permission).
    Invalid(String),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action<V> {
    Send(NodeId, Request<V>),
    /// Wait a random, growing time (contention), then call
    /// [`Proposer::retry`].
    Backoff,
    Finished(Outcome<V>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase<V> {
    Idle,
    Reading {
        replies: BTreeMap<NodeId, Option<Proposal<V>>>,
    },
    Preparing {
        promises: BTreeMap<NodeId, Option<Proposal<V>>>,
    },
    Accepting {
        proposal: Proposal<V>,
        base: Chosen<V>,
        acks: BTreeSet<NodeId>,
        /// Finishing a proposal found in flight, not our own.
        recovering: bool,
    },
    /// Waiting for the driver to call `retry`.
    BackingOff,
}

/// One node's proposer for one block. Between operations it keeps its
/// ballot and, while no one preempts it, its leadership.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proposer<V, U> {
    me: NodeId,
    ballot: Ballot,
    max_round: u64,
    /// Phase 1 succeeded with `ballot` and nothing preempted it since.
    leading: bool,
    /// Phase 1 succeeded during the current operation: `known` is as fresh
    /// as a quorum can make it, so a refusal may be reported.
    confirmed: bool,
    /// The current operation's own entry was sent out for acceptance.
    attempted: bool,
    known: Chosen<V>,
    op: Option<Op<U>>,
    phase: Phase<V>,
}

impl<V: Clone + Eq + Debug, U: Update<V> + Clone> Proposer<V, U> {
    /// A proposer that presumes `known` (for a block it has never seen: the
    /// empty state with the quorum placement gives it).
    pub fn new(me: NodeId, known: Chosen<V>) -> Self {
        Self {
            me,
            ballot: Ballot::default(),
            max_round: 0,
            leading: false,
            confirmed: false,
            attempted: false,
            known,
            op: None,
            phase: Phase::Idle,
        }
    }

    /// A proposer for a block whose address this node has just drawn at
    /// random, so that no other node can know of it yet. It may skip phase
    /// 1: round 0 is reserved for such creators (every other ballot has
    /// round 1 or more), and a block has at most one creator. If any
    /// acceptor has promised a higher ballot (someone read the block
    /// meanwhile), the Accept is refused and it falls back to phase 1.
    pub fn creator(me: NodeId, known: Chosen<V>) -> Self {
        let mut proposer = Self::new(me, known);
        proposer.ballot = Ballot { round: 0, node: me };
        proposer.leading = true;
        proposer
    }

    pub fn known(&self) -> &Chosen<V> {
        &self.known
    }

    pub fn is_leading(&self) -> bool {
        self.leading
    }

    pub fn is_idle(&self) -> bool {
        self.op.is_none()
    }

    /// Starts an operation; the proposer runs one at a time.
    pub fn start(&mut self, op: Op<U>) -> Vec<Action<V>> {
        debug_assert!(self.op.is_none(), "one operation at a time");
        self.confirmed = false;
        self.attempted = false;
        let read = matches!(op, Op::Read);
        self.op = Some(op);
        if read {
            self.read()
        } else if self.leading {
            self.propose()
        } else {
            self.prepare()
        }
    }

    /// Gives up the current operation (the driver's deadline passed); the
    /// next operation starts from phase 1.
    pub fn abandon(&mut self) {
        self.op = None;
        self.phase = Phase::Idle;
        self.leading = false;
    }

    /// After a backoff, or when the driver gives up waiting: start over
    /// from phase 1 (or the quorum read).
    pub fn retry(&mut self) -> Vec<Action<V>> {
        match self.op {
            None => Vec::new(),
            Some(Op::Read) if !self.confirmed => self.read(),
            Some(_) => self.prepare(),
        }
    }

    fn broadcast(&self, request: Request<V>) -> Vec<Action<V>> {
        self.known
            .config
            .members
            .iter()
            .map(|m| Action::Send(*m, request.clone()))
            .collect()
    }

    fn read(&mut self) -> Vec<Action<V>> {
        self.phase = Phase::Reading {
            replies: BTreeMap::new(),
        };
        self.broadcast(Request::Read)
    }

    fn prepare(&mut self) -> Vec<Action<V>> {
        self.max_round += 1;
        self.ballot = Ballot {
            round: self.max_round,
            node: self.me,
        };
        self.leading = false;
        self.phase = Phase::Preparing {
            promises: BTreeMap::new(),
        };
        self.broadcast(Request::Prepare {
            ballot: self.ballot,
        })
    }

    fn accept(&mut self, entry: Entry<V>, recovering: bool) -> Vec<Action<V>> {
        self.attempted |= !recovering;
        let proposal = Proposal {
            ballot: self.ballot,
            slot: self.known.slot + 1,
            entry: entry.clone(),
        };
        self.phase = Phase::Accepting {
            proposal,
            base: self.known.clone(),
            acks: BTreeSet::new(),
            recovering,
        };
        self.broadcast(Request::Accept {
            ballot: self.ballot,
            base: self.known.clone(),
            entry,
        })
    }

    fn finish(&mut self, outcome: Outcome<V>) -> Vec<Action<V>> {
        self.op = None;
        self.phase = Phase::Idle;
        vec![Action::Finished(outcome)]
    }

    /// With phase 1 won and nothing in flight: propose our own entry.
    fn propose(&mut self) -> Vec<Action<V>> {
        let entry = match self.op.as_ref() {
            None => return Vec::new(),
            Some(Op::Read) => return self.finish(Outcome::Done(self.known.clone())),
            Some(Op::Write(update)) => match update.apply(self.known.value.as_ref()) {
                Ok(v) => Entry::Write(v),
                // Only a quorum-fresh state may refuse; else refresh first.
                Err(_) if !self.confirmed => return self.prepare(),
                Err(reason) => {
                    return self.finish(Outcome::Refused {
                        current: self.known.clone(),
                        reason,
                        attempted: self.attempted,
                    });
                }
            },
            Some(Op::Reconfigure(members)) => Entry::Reconfigure(Config {
                epoch: self.known.config.epoch + 1,
                members: members.clone(),
            }),
        };
        self.accept(entry, false)
    }

    /// Adopts a newer chosen state; says whether the quorum changed.
    fn learn(&mut self, chosen: Option<&Chosen<V>>) -> bool {
        match chosen {
            Some(c) if c.slot > self.known.slot => {
                let reconfigured = c.config != self.known.config;
                self.known = c.clone();
                reconfigured
            }
            _ => false,
        }
    }

    fn preempted(&mut self, promised: Ballot) -> Vec<Action<V>> {
        self.max_round = self.max_round.max(promised.round);
        self.leading = false;
        self.phase = Phase::BackingOff;
        vec![Action::Backoff]
    }

    /// Handles an acceptor's reply.
    pub fn on_reply(&mut self, from: NodeId, reply: Reply<V>) -> Vec<Action<V>> {
        if self.op.is_none() {
            return Vec::new();
        }
        let member = self.known.config.contains(&from);
        match reply {
            Reply::NotMember { chosen } => {
                // Redirected: the quorum we used was replaced.
                if self.learn(Some(&chosen)) {
                    return self.retry();
                }
                Vec::new()
            }
            Reply::Invalid { reason } => match &self.phase {
                Phase::Accepting {
                    recovering: false, ..
                } => self.finish(Outcome::Invalid(reason)),
                _ => Vec::new(),
            },
            Reply::Rejected { promised, chosen } => {
                let reconfigured = self.learn(chosen.as_ref());
                match &self.phase {
                    Phase::Preparing { .. } | Phase::Accepting { .. }
                        if promised > self.ballot || reconfigured =>
                    {
                        self.preempted(promised)
                    }
                    // Behind: an Accept for a slot already chosen.
                    Phase::Accepting { base, .. } if self.known.slot > base.slot => self.retry(),
                    _ => Vec::new(),
                }
            }
            Reply::State { accepted, chosen } => {
                let reconfigured = self.learn(chosen.as_ref());
                let Phase::Reading { replies } = &mut self.phase else {
                    return Vec::new();
                };
                if reconfigured {
                    return self.read();
                }
                if member {
                    replies.insert(from, accepted);
                }
                if replies.len() < self.known.config.quorum() {
                    return Vec::new();
                }
                let slot = self.known.slot;
                let in_flight = replies.values().flatten().any(|p| p.slot > slot);
                if in_flight {
                    // A write may be chosen that no one reported chosen:
                    // finish it before answering.
                    self.prepare()
                } else {
                    self.finish(Outcome::Done(self.known.clone()))
                }
            }
            Reply::Promised {
                ballot,
                accepted,
                chosen,
            } => {
                if ballot != self.ballot {
                    return Vec::new();
                }
                let reconfigured = self.learn(chosen.as_ref());
                if reconfigured {
                    return self.prepare();
                }
                let Phase::Preparing { promises } = &mut self.phase else {
                    return Vec::new();
                };
                if member {
                    promises.insert(from, accepted);
                }
                if promises.len() < self.known.config.quorum() {
                    return Vec::new();
                }
                let next = self.known.slot + 1;
                let in_flight = promises
                    .values()
                    .flatten()
                    .filter(|p| p.slot == next)
                    .max_by_key(|p| p.ballot)
                    .map(|p| p.entry.clone());
                self.leading = true;
                self.confirmed = true;
                match in_flight {
                    Some(entry) => self.accept(entry, true),
                    None => self.propose(),
                }
            }
            Reply::Accepted { ballot, slot } => {
                let Phase::Accepting {
                    proposal,
                    base,
                    acks,
                    recovering,
                } = &mut self.phase
                else {
                    return Vec::new();
                };
                if ballot != proposal.ballot
                    || slot != proposal.slot
                    || !base.config.contains(&from)
                {
                    return Vec::new();
                }
                acks.insert(from);
                if acks.len() < base.config.quorum() {
                    return Vec::new();
                }
                let recovering = *recovering;
                let old_config = base.config.clone();
                let chosen = base.apply(&proposal.entry);
                self.known = chosen.clone();
                let mut actions: Vec<Action<V>> = old_config
                    .members
                    .iter()
                    .chain(
                        chosen
                            .config
                            .members
                            .iter()
                            .filter(|m| !old_config.contains(m)),
                    )
                    .map(|m| {
                        Action::Send(
                            *m,
                            Request::Commit {
                                chosen: chosen.clone(),
                            },
                        )
                    })
                    .collect();
                if chosen.config != old_config {
                    // Phase 1 was won with the old quorum only.
                    self.leading = false;
                }
                let next = if recovering {
                    if self.leading {
                        self.propose()
                    } else {
                        self.prepare()
                    }
                } else {
                    self.finish(Outcome::Done(chosen))
                };
                actions.extend(next);
                actions
            }
            Reply::Committed { .. } => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cas = CompareAndSet<u8>;

    fn id(n: u8) -> NodeId {
        NodeId([n; 16])
    }

    fn config(ids: &[u8]) -> Config {
        Config {
            epoch: 1,
            members: ids.iter().map(|&n| id(n)).collect(),
        }
    }

    /// Delivers every message at once, in order, until nothing is left:
    /// returns how the operation finished and the round trips it took.
    fn run(
        p: &mut Proposer<u8, Cas>,
        acceptors: &mut BTreeMap<NodeId, Acceptor<u8>>,
        actions: Vec<Action<u8>>,
    ) -> (Outcome<u8>, usize) {
        let mut pending = actions;
        let mut rounds = 0;
        for _ in 0..100 {
            let mut next = Vec::new();
            let mut sent_request = false;
            for action in pending {
                match action {
                    Action::Send(to, request) => {
                        sent_request |= !matches!(request, Request::Commit { .. });
                        if let Some(a) = acceptors.get_mut(&to) {
                            let (reply, _) = a.handle(to, request, |_, _| Ok(()));
                            next.extend(p.on_reply(to, reply));
                        }
                    }
                    Action::Backoff => next.extend(p.retry()),
                    Action::Finished(outcome) => return (outcome, rounds),
                }
            }
            rounds += usize::from(sent_request);
            pending = next;
        }
        panic!("no outcome");
    }

    fn cluster(ids: &[u8]) -> BTreeMap<NodeId, Acceptor<u8>> {
        ids.iter().map(|&n| (id(n), Acceptor::default())).collect()
    }

    #[test]
    fn a_leader_pays_one_round_trip_per_write_after_the_first() {
        let mut acceptors = cluster(&[1, 2, 3]);
        let mut p = Proposer::new(id(9), Chosen::empty(config(&[1, 2, 3])));
        let first = p.start(Op::Write(Cas {
            expected: None,
            new: 1,
        }));
        let (outcome, rounds) = run(&mut p, &mut acceptors, first);
        assert!(matches!(
            outcome,
            Outcome::Done(Chosen {
                slot: 1,
                value: Some(1),
                ..
            })
        ));
        assert_eq!(rounds, 2, "prepare + accept");
        for n in 1..5u8 {
            let actions = p.start(Op::Write(Cas {
                expected: Some(n),
                new: n + 1,
            }));
            let (outcome, rounds) = run(&mut p, &mut acceptors, actions);
            assert!(matches!(outcome, Outcome::Done(Chosen { value: Some(v), .. }) if v == n + 1));
            assert_eq!(rounds, 1, "accept only");
        }
    }

    #[test]
    fn a_stale_compare_and_set_is_refused_with_the_current_value() {
        let mut acceptors = cluster(&[1, 2, 3]);
        let mut a = Proposer::new(id(8), Chosen::empty(config(&[1, 2, 3])));
        let mut b = Proposer::new(id(9), Chosen::empty(config(&[1, 2, 3])));
        let actions = a.start(Op::Write(Cas {
            expected: None,
            new: 1,
        }));
        run(&mut a, &mut acceptors, actions);
        let actions = b.start(Op::Write(Cas {
            expected: Some(1),
            new: 2,
        }));
        run(&mut b, &mut acceptors, actions);
        // `a` still believes it leads with value 1; its CAS from 1 must not
        // overwrite b's 2, and the refusal must report 2.
        let actions = a.start(Op::Write(Cas {
            expected: Some(1),
            new: 3,
        }));
        let (outcome, _) = run(&mut a, &mut acceptors, actions);
        match outcome {
            Outcome::Refused { current, .. } => assert_eq!(current.value, Some(2)),
            other => panic!("{other:?}"),
        }
        let actions = a.start(Op::Read);
        let (outcome, _) = run(&mut a, &mut acceptors, actions);
        assert!(matches!(
            outcome,
            Outcome::Done(Chosen { value: Some(2), .. })
        ));
    }

    #[test]
    fn reconfiguration_moves_the_block_to_a_new_quorum() {
        let mut acceptors = cluster(&[1, 2, 3, 4]);
        let mut p = Proposer::new(id(9), Chosen::empty(config(&[1, 2, 3])));
        let actions = p.start(Op::Write(Cas {
            expected: None,
            new: 1,
        }));
        run(&mut p, &mut acceptors, actions);
        let actions = p.start(Op::Reconfigure(vec![id(1), id(2), id(4)]));
        let (outcome, _) = run(&mut p, &mut acceptors, actions);
        assert!(matches!(outcome, Outcome::Done(Chosen { slot: 2, .. })));
        // The removed member redirects; the new one holds the state.
        let (reply, _) = acceptors
            .get_mut(&id(3))
            .unwrap()
            .handle(id(3), Request::Read, |_, _| Ok(()));
        assert!(matches!(reply, Reply::NotMember { .. }));
        assert_eq!(acceptors[&id(4)].chosen.as_ref().unwrap().value, Some(1));
        // A proposer still on the old quorum is redirected and succeeds.
        let mut stale = Proposer::new(id(7), Chosen::empty(config(&[1, 2, 3])));
        let actions = stale.start(Op::Write(Cas {
            expected: Some(1),
            new: 2,
        }));
        let (outcome, _) = run(&mut stale, &mut acceptors, actions);
        match outcome {
            Outcome::Done(c) => {
                assert_eq!(c.value, Some(2));
                assert_eq!(c.config.members, vec![id(1), id(2), id(4)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_value_accepted_by_a_majority_survives_its_proposer() {
        let mut acceptors = cluster(&[1, 2, 3]);
        let validate = |_: Option<&u8>, _: &u8| Ok(());
        // p1 wins phase 1 and gets its write accepted by 1 and 2 only, then
        // falls silent before anyone learns the value is chosen.
        let mut p1 = Proposer::new(id(8), Chosen::empty(config(&[1, 2, 3])));
        let mut actions = p1.start(Op::Write(Cas {
            expected: None,
            new: 1,
        }));
        let mut accepts = Vec::new();
        for _ in 0..4 {
            let mut next = Vec::new();
            for action in actions.drain(..) {
                if let Action::Send(to, request) = action {
                    if to == id(3) {
                        continue;
                    }
                    if matches!(request, Request::Accept { .. }) {
                        accepts.push((to, request));
                        continue;
                    }
                    let (reply, _) = acceptors
                        .get_mut(&to)
                        .unwrap()
                        .handle(to, request, validate);
                    next.extend(p1.on_reply(to, reply));
                }
            }
            actions = next;
        }
        for (to, request) in accepts {
            let (reply, _) = acceptors
                .get_mut(&to)
                .unwrap()
                .handle(to, request, validate);
            assert!(matches!(reply, Reply::Accepted { .. }));
        }
        // p2 must find the value and keep it: its own create conflicts.
        let mut p2 = Proposer::new(id(9), Chosen::empty(config(&[1, 2, 3])));
        let actions = p2.start(Op::Write(Cas {
            expected: None,
            new: 2,
        }));
        let (outcome, _) = run(&mut p2, &mut acceptors, actions);
        match outcome {
            Outcome::Refused { current, .. } => assert_eq!(current.value, Some(1)),
            other => panic!("{other:?}"),
        }
    }
}
