//! The filesystem model: how a volume's directories, inodes and file data
//! map onto blocks, as plain data and functions. The peer's FUSE layer does
//! the I/O; everything it decides with is here and tested without a mount.
//!
//! Layout: a volume record (a named mutable block) holds the volume key;
//! from it derive the addresses of every inode block (one mutable block per
//! inode, found from the inode number alone) and every directory shard.
//! File data lives in encrypted immutable chunks listed by the inode; small
//! files stay inline in the inode.

pub mod crypt;
pub mod dir;
pub mod image;
pub mod inode;
pub mod session;
pub mod volume;

pub use crypt::{Keyring, VolumeKey};
pub use dir::{DirEntry, Shard, ShardId};
pub use image::{ImageIndex, ImagePart};
pub use inode::{ChunkRef, Content, Inode, Kind, Timestamp};
pub use session::{Session, SessionTable};
pub use volume::{Catalogue, Lineage, SnapshotRecord, Source, Usage, VolumeRecord};

/// Why a filesystem structure is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("cannot decrypt: wrong key or tampered data")]
    Decrypt,
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// Changes remembered per block by [`Envelope`].
pub const RECENT_CHANGES: usize = 32;

/// What a volume's mutable block holds: the structure, and the ids of the
/// latest changes applied to it. A writer whose compare-and-set lost sight
/// of its own write (a conflict reported after the write landed) finds its
/// id here and does not apply the change twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    pub changes: Vec<u64>,
    pub body: Vec<u8>,
}

impl Envelope {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "block envelope")
    }

    /// The envelope of the next version: `body`, with change `id` recorded.
    pub fn next(&self, id: u64, body: Vec<u8>) -> Self {
        let mut changes = self.changes.clone();
        changes.push(id);
        let excess = changes.len().saturating_sub(RECENT_CHANGES);
        changes.drain(..excess);
        Self { changes, body }
    }
}

/// The bytes of a structure stored in a block.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("in-memory encoding cannot fail")
}

pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, FsError> {
    postcard::from_bytes(bytes).map_err(|_| FsError::Malformed(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_remember_the_latest_changes() {
        let mut e = Envelope::default();
        for id in 0..100 {
            e = e.next(id, vec![id as u8]);
        }
        assert_eq!(e.changes.len(), RECENT_CHANGES);
        assert!(e.changes.contains(&99) && !e.changes.contains(&0));
        assert_eq!(Envelope::from_bytes(&e.to_bytes()).unwrap(), e);
    }
}
