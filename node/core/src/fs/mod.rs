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
pub mod inode;
pub mod volume;

pub use crypt::{Keyring, VolumeKey};
pub use dir::{DirEntry, Shard, ShardId};
pub use inode::{ChunkRef, Content, Inode, Kind, Timestamp};
pub use volume::{Catalogue, Usage, VolumeRecord};

/// Why a filesystem structure is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("cannot decrypt: wrong key or tampered data")]
    Decrypt,
    #[error("malformed {0}")]
    Malformed(&'static str),
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
