//! Volumes and the POSIX filesystem on them, mounted with FUSE inside the
//! peer: the peer is long-lived and owns the block traffic, so a mount is
//! served without any extra hop.

pub mod chunk_cache;
pub mod filesystem;
pub mod fuse;
pub mod handover;
pub mod image;
pub mod meta;
pub mod meta_cache;
pub mod mounts;
pub mod snapshots;
pub mod volumes;

pub use chunk_cache::ChunkCache;
pub use filesystem::VolumeFs;
pub use mounts::{MountError, Mounts};
pub use volumes::{NewVolume, VolumeError, VolumeInfo, Volumes};

use shoal_core::fs::Timestamp;
use shoal_core::fs::inode::ROOT_INO;

/// The current time as inodes record it.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        secs: d.as_secs() as i64,
        nanos: d.subsec_nanos(),
    }
}

/// A fresh inode number: random, so mounts never need to agree on one.
pub(crate) fn new_ino() -> u64 {
    loop {
        let ino: u64 = rand::random();
        if ino > ROOT_INO {
            return ino;
        }
    }
}

/// Random per start of this peer: tells a session of a mount that died
/// with an earlier run of the peer from a live one.
pub(crate) fn boot_id() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(rand::random)
}
