//! Which mounts have a volume open: the table that decides whether a
//! mount may keep the volume's metadata write-back.
//!
//! Every mount of a volume holds a *session* in the volume's session table
//! (a mutable block) and renews it before it expires. A mount that finds
//! itself the only live session may mark its session *exclusive*: it then
//! answers from, and writes to, its own copy of the metadata and commits in
//! batches. A mount that joins a table holding another's exclusive session
//! waits until that mount has committed everything and cleared the mark,
//! or until the session expired (its mount is gone with whatever it had
//! not committed, like a crashed local filesystem's page cache).
//!
//! Times are milliseconds since the Unix epoch: peers' clocks must agree
//! far better than [`SESSION_LEASE_MS`] minus the holder's safety margin.

use serde::{Deserialize, Serialize};

use super::{FsError, decode, encode};

/// How long a session lives after its last renewal.
pub const SESSION_LEASE_MS: u64 = 5_000;

/// One mount's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Random per mount.
    pub id: u64,
    /// The peer that hosts the mount.
    pub peer: [u8; 16],
    /// Random per start of that peer: a session of the same peer with
    /// another boot belongs to a mount that died with the peer.
    pub boot: u64,
    pub expires_ms: u64,
    /// Whether the mount keeps the volume's metadata write-back.
    pub exclusive: bool,
}

impl Session {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms >= now_ms
    }
}

/// The sessions of one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTable {
    pub sessions: Vec<Session>,
}

impl SessionTable {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "session table")
    }

    /// Adds (or renews) `me`, dropping expired sessions and those of
    /// `me`'s peer from an earlier boot.
    pub fn join(&mut self, me: Session, now_ms: u64) {
        self.sessions.retain(|s| {
            s.id != me.id && s.live(now_ms) && !(s.peer == me.peer && s.boot != me.boot)
        });
        self.sessions.push(me);
    }

    /// Extends `id`'s session to `now_ms` plus the lease; false if it is
    /// gone (expired and dropped by another mount).
    pub fn renew(&mut self, id: u64, now_ms: u64) -> bool {
        match self.sessions.iter_mut().find(|s| s.id == id) {
            Some(s) => {
                s.expires_ms = now_ms + SESSION_LEASE_MS;
                true
            }
            None => false,
        }
    }

    pub fn leave(&mut self, id: u64) {
        self.sessions.retain(|s| s.id != id);
    }

    /// Whether any live session but `id`'s exists.
    pub fn others(&self, id: u64, now_ms: u64) -> bool {
        self.sessions.iter().any(|s| s.id != id && s.live(now_ms))
    }

    /// Whether a live session but `id`'s holds the volume exclusively.
    pub fn held_by_other(&self, id: u64, now_ms: u64) -> bool {
        self.sessions
            .iter()
            .any(|s| s.id != id && s.exclusive && s.live(now_ms))
    }

    /// Marks `id`'s session exclusive (or not). Exclusive only if it is
    /// the only live one; returns whether the session now is.
    pub fn set_exclusive(&mut self, id: u64, exclusive: bool, now_ms: u64) -> bool {
        let alone = !self.others(id, now_ms);
        match self.sessions.iter_mut().find(|s| s.id == id) {
            Some(s) => {
                s.exclusive = exclusive && alone;
                s.exclusive
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, peer: u8, boot: u64, now: u64) -> Session {
        Session {
            id,
            peer: [peer; 16],
            boot,
            expires_ms: now + SESSION_LEASE_MS,
            exclusive: false,
        }
    }

    #[test]
    fn a_lone_mount_may_hold_the_volume_and_a_second_one_ends_that() {
        let mut t = SessionTable::default();
        t.join(session(1, 1, 7, 1000), 1000);
        assert!(t.set_exclusive(1, true, 1000));
        t.join(session(2, 2, 9, 1100), 1100);
        assert!(t.held_by_other(2, 1100), "the newcomer must wait");
        assert!(t.others(1, 1100), "the holder sees the newcomer");
        assert!(!t.set_exclusive(1, true, 1100), "not alone any more");
        assert!(!t.held_by_other(2, 1100));
        t.leave(2);
        assert!(t.set_exclusive(1, true, 1200));
    }

    #[test]
    fn expired_sessions_and_earlier_boots_of_a_peer_are_dropped() {
        let mut t = SessionTable::default();
        t.join(session(1, 1, 7, 0), 0);
        assert!(t.set_exclusive(1, true, 0));
        // Peer 1 restarted (boot 8): its old mount is gone at once.
        t.join(session(2, 1, 8, 100), 100);
        assert_eq!(t.sessions.len(), 1);
        assert!(!t.held_by_other(2, 100));
        // Another peer's session holds until it expires.
        t.join(session(3, 2, 1, 100), 100);
        assert!(!t.set_exclusive(3, false, 100));
        assert!(t.others(2, 100));
        let later = 100 + SESSION_LEASE_MS + 1;
        assert!(!t.others(2, later));
        assert!(!t.renew(9, later));
        assert!(t.renew(2, later));
        t.join(session(4, 3, 1, later), later);
        assert_eq!(
            t.sessions.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![2, 4]
        );
    }

    #[test]
    fn tables_round_trip() {
        let mut t = SessionTable::default();
        t.join(session(5, 4, 2, 10), 10);
        assert_eq!(SessionTable::from_bytes(&t.to_bytes()).unwrap(), t);
        assert!(SessionTable::from_bytes(&[0xff; 3]).is_err());
    }
}
