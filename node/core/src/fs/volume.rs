//! Volume records: what a volume's name maps to.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{FsError, decode, encode};
use crate::Address;

/// The payload of a volume's named block (sealed under the keyring).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Distinguishes this volume from an earlier one of the same name: it
    /// is part of every block salt, so a re-created volume starts empty.
    pub id: [u8; 16],
    /// Signs, places and seals the volume's own mutable blocks.
    pub key: [u8; 32],
    /// Seals and owns file data: shared by a volume, its snapshots and the
    /// volumes restored or cloned from them (its lineage), so they share
    /// chunks without copying them.
    pub data: [u8; 32],
    /// The image this volume was restored or cloned from: metadata blocks
    /// the volume has not written yet read from it.
    pub base: Option<Address>,
    /// What the volume's content came from, as it was asked for.
    pub source: Option<Source>,
    pub size: u64,
    pub replicas: u32,
    /// Unix seconds.
    pub created: i64,
    /// A deleted volume leaves a tombstone: mutable blocks keep their
    /// history, and a later create writes the next version.
    pub deleted: bool,
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

impl VolumeRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "volume record")
    }
}

/// Space and files a volume uses, kept in one counter block per volume
/// that mounts add their changes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: i64,
    pub files: i64,
}

impl Usage {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "usage")
    }

    pub fn add(&mut self, other: Usage) {
        self.bytes += other.bytes;
        self.files += other.files;
    }
}

/// A point-in-time copy of a volume: an image of its metadata that refers
/// to the volume's chunks (no file data is copied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    pub id: [u8; 16],
    /// The volume it was taken of, and that volume's id then.
    pub source: String,
    pub source_id: [u8; 16],
    /// The source's data key (see [`VolumeRecord::data`]).
    pub data: [u8; 32],
    /// The image's index block.
    pub image: Address,
    /// Bytes and files the volume held.
    pub bytes: u64,
    pub files: u64,
    /// The volume's size when taken: the smallest volume it restores into.
    pub size: u64,
    pub replicas: u32,
    /// Unix seconds and nanoseconds.
    pub created: i64,
    pub created_nanos: u32,
    pub deleted: bool,
}

impl SnapshotRecord {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "snapshot record")
    }
}

/// The names of all volumes or of all snapshots (a named block of its own,
/// so that listing does not need a scan).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    pub names: BTreeSet<String>,
}

/// Who still uses a lineage's data (see [`VolumeRecord::data`]): volumes and
/// snapshots by kind and name. When the last one goes, the chunks go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub volumes: BTreeSet<String>,
    pub snapshots: BTreeSet<String>,
}

impl Lineage {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "lineage")
    }

    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty() && self.snapshots.is_empty()
    }
}

impl Catalogue {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "volume catalogue")
    }
}

/// Whether `name` can name a volume (it becomes a Kubernetes-style name
/// in CSI, so the same rules: lowercase alphanumerics and `-`, `.`, `_`).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "volume name must be 1 to 253 characters, not {}",
            name.len()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c))
    {
        return Err(format!(
            "volume name {name:?} may hold only lowercase letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("data-1.x_y").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Data").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn records_round_trip() {
        let r = VolumeRecord {
            name: "v".into(),
            id: [1; 16],
            key: [2; 32],
            data: [3; 32],
            base: Some(Address([4; 32])),
            source: Some(Source::Snapshot("s".into())),
            size: 10,
            replicas: 3,
            created: 5,
            deleted: false,
        };
        assert_eq!(VolumeRecord::from_bytes(&r.to_bytes()).unwrap(), r);
        let mut u = Usage { bytes: 5, files: 1 };
        u.add(Usage {
            bytes: -2,
            files: 3,
        });
        assert_eq!(Usage::from_bytes(&u.to_bytes()).unwrap(), u);
    }
}
