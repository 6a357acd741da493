//! A linearizability checker for histories of one versioned register (a
//! mutable block), after Wing & Gong with Lowe's memoisation (the algorithm
//! Knossos and Porcupine use). Histories of different blocks are checked
//! separately: linearizability is local to each object.
//!
//! Operations whose outcome the client never learned (a timeout) may take
//! effect at any time after they began, or never.

use std::collections::HashSet;

/// The register's state: version and value (version 0: not yet created).
pub type State = (u64, u64);

/// What a client did and saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read that returned this state.
    Read(State),
    /// A compare-and-set from version `expected` to `value` that succeeded.
    Written { expected: u64, value: u64 },
    /// A compare-and-set that lost: `current` was the state instead.
    Refused { expected: u64, current: State },
    /// A compare-and-set whose outcome is unknown.
    Unknown { expected: u64, value: u64 },
}

/// One operation with its invocation and completion times (any monotonic
/// unit); unknown operations have no completion.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub op: Op,
    pub invoked: u64,
    pub completed: Option<u64>,
}

/// Applies `op` to `state`: the next state, or `None` if the op could not
/// have seen `state`.
fn step(state: State, op: Op) -> Option<State> {
    match op {
        Op::Read(seen) => (seen == state).then_some(state),
        Op::Written { expected, value } | Op::Unknown { expected, value } => {
            (state.0 == expected).then_some((expected + 1, value))
        }
        Op::Refused { expected, current } => {
            (state.0 != expected && current == state).then_some(state)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    time: u64,
    /// Index of the matching call or return entry.
    pair: usize,
}

/// Whether the history is linearizable from `initial`. Bounded: gives up
/// (returns `None`) after `budget` search steps.
pub fn check(initial: State, events: &[Event], budget: u64) -> Option<bool> {
    // Calls and returns in time order; returns before calls at equal times
    // are not concurrent with them. Unknown ops return after everything.
    let end = u64::MAX;
    let mut entries: Vec<Entry> = Vec::with_capacity(events.len() * 2);
    for (i, e) in events.iter().enumerate() {
        entries.push(Entry {
            op: i,
            call: true,
            time: e.invoked,
            pair: 0,
        });
        entries.push(Entry {
            op: i,
            call: false,
            time: e.completed.unwrap_or(end),
            pair: 0,
        });
    }
    entries.sort_by_key(|e| (e.time, e.call));
    let mut call_at = vec![0; events.len()];
    let mut ret_at = vec![0; events.len()];
    for (i, e) in entries.iter().enumerate() {
        if e.call {
            call_at[e.op] = i;
        } else {
            ret_at[e.op] = i;
        }
    }
    for e in entries.iter_mut() {
        e.pair = if e.call { ret_at[e.op] } else { call_at[e.op] };
    }
    let n = entries.len();
    // A doubly linked list over entries, so lifting and unlifting is O(1).
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let head = n; // sentinel
    next.push(0);
    prev.push(usize::MAX);
    if n == 0 {
        return Some(true);
    }
    prev[0] = head;
    let definite = events.iter().filter(|e| e.completed.is_some()).count();

    let words = events.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut done_definite = 0;
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = initial;
    let mut cursor = next[head];
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx < n {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx < n {
            prev[nx] = i;
        }
    };
    for _ in 0..budget {
        if done_definite == definite {
            return Some(true);
        }
        match entries.get(cursor).copied() {
            Some(entry) if entry.call => {
                let op = entry.op;
                if let Some(after) = step(state, events[op].op) {
                    let mut key = linearized.clone();
                    key[op / 64] |= 1 << (op % 64);
                    if cache.insert((key.clone(), after)) {
                        stack.push((cursor, state));
                        linearized = key;
                        if events[op].completed.is_some() {
                            done_definite += 1;
                        }
                        state = after;
                        unlink(&mut next, &mut prev, entry.pair);
                        unlink(&mut next, &mut prev, cursor);
                        cursor = next[head];
                        continue;
                    }
                }
                cursor = next[cursor];
            }
            // A completed op was not linearized before it returned (or the
            // list ran out with some left): undo the last choice.
            _ => {
                let Some((call, before)) = stack.pop() else {
                    return Some(false);
                };
                let op = entries[call].op;
                linearized[op / 64] &= !(1 << (op % 64));
                if events[op].completed.is_some() {
                    done_definite -= 1;
                }
                state = before;
                relink(&mut next, &mut prev, entries[call].pair);
                relink(&mut next, &mut prev, call);
                cursor = next[call];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(expected: u64, value: u64, invoked: u64, completed: u64) -> Event {
        ev(Op::Written { expected, value }, invoked, completed)
    }

    fn ev(op: Op, invoked: u64, completed: u64) -> Event {
        Event {
            op,
            invoked,
            completed: Some(completed),
        }
    }

    #[test]
    fn concurrent_writes_and_reads_in_some_order_are_linearizable() {
        let history = [
            written(0, 1, 0, 10),
            ev(
                Op::Refused {
                    expected: 0,
                    current: (1, 1),
                },
                1,
                12,
            ),
            ev(Op::Read((1, 1)), 2, 5),
            written(1, 2, 11, 20),
            ev(Op::Read((2, 2)), 15, 25),
        ];
        assert_eq!(check((0, 0), &history, 100_000), Some(true));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = [written(0, 1, 0, 10), ev(Op::Read((0, 0)), 11, 12)];
        assert_eq!(check((0, 0), &history, 100_000), Some(false));
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let history = [written(0, 1, 0, 10), written(0, 2, 11, 20)];
        assert_eq!(check((0, 0), &history, 100_000), Some(false));
    }

    #[test]
    fn unknown_writes_may_land_late_or_never() {
        let landed = [
            Event {
                op: Op::Unknown {
                    expected: 0,
                    value: 7,
                },
                invoked: 0,
                completed: None,
            },
            ev(Op::Read((0, 0)), 5, 6),
            ev(Op::Read((1, 7)), 50, 60),
        ];
        assert_eq!(check((0, 0), &landed, 100_000), Some(true));
        let never = [
            Event {
                op: Op::Unknown {
                    expected: 0,
                    value: 7,
                },
                invoked: 0,
                completed: None,
            },
            written(0, 3, 5, 6),
        ];
        assert_eq!(check((0, 0), &never, 100_000), Some(true));
    }
}
