//! Directories as extendible hash tables of shards, so that one create
//! rewrites one small block, never the whole directory.
//!
//! A directory starts as a single leaf shard. When a leaf grows past
//! [`SPLIT_BYTES`], its entries are dealt to two children by the next bit of
//! each name's keyed hash, and the leaf becomes `Split`, pointing at them.
//! Children are named after the parent's version that was split (the
//! generation), so two mounts splitting the same version write identical
//! entries to the same children, and a split that lost its race leaves only
//! unreferenced blocks. A split shard never changes again, so it can be
//! cached forever.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inode::Kind;
use super::{FsError, decode, encode};

/// A leaf larger than this splits: a few hundred entries, so that a
/// create copies and rewrites little.
pub const SPLIT_BYTES: usize = 8 * 1024;
/// Hash bits available for splitting.
pub const MAX_DEPTH: u8 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
}

/// Which shard of which directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardId {
    pub dir: u64,
    pub depth: u8,
    /// The low `depth` hash bits every name in this shard has.
    pub prefix: u64,
    /// Version of the parent when it split (0 for the root shard).
    pub generation: u64,
}

impl ShardId {
    pub fn root(dir: u64) -> Self {
        Self {
            dir,
            depth: 0,
            prefix: 0,
            generation: 0,
        }
    }

    /// The logical name the shard's block salt derives from.
    pub fn salt_input(&self) -> Vec<u8> {
        let mut v = b"shard".to_vec();
        v.extend_from_slice(&self.dir.to_le_bytes());
        v.push(self.depth);
        v.extend_from_slice(&self.prefix.to_le_bytes());
        v.extend_from_slice(&self.generation.to_le_bytes());
        v
    }

    /// The child of this (split) shard that a name hashing to `hash` is in.
    pub fn child(&self, hash: u64, generation: u64) -> Self {
        let bit = (hash >> self.depth) & 1;
        Self {
            dir: self.dir,
            depth: self.depth + 1,
            prefix: self.prefix | (bit << self.depth),
            generation,
        }
    }

    /// Both children of this shard split at `generation`.
    pub fn children(&self, generation: u64) -> [Self; 2] {
        [
            self.child(0, generation),
            self.child(1 << self.depth, generation),
        ]
    }
}

/// The content of one shard block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shard {
    Leaf(BTreeMap<Vec<u8>, DirEntry>),
    Split { generation: u64 },
}

impl Default for Shard {
    fn default() -> Self {
        Shard::Leaf(BTreeMap::new())
    }
}

impl Shard {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "directory shard")
    }

    pub fn entries(&self) -> Option<&BTreeMap<Vec<u8>, DirEntry>> {
        match self {
            Shard::Leaf(e) => Some(e),
            Shard::Split { .. } => None,
        }
    }

    /// Whether this leaf, at `depth`, is due to split.
    pub fn should_split(&self, depth: u8) -> bool {
        match self {
            Shard::Leaf(e) => {
                depth < MAX_DEPTH && e.keys().map(|k| k.len() + 12).sum::<usize>() > SPLIT_BYTES
            }
            Shard::Split { .. } => false,
        }
    }

    /// The two children of this leaf at `id`, by the next hash bit.
    pub fn split(&self, id: &ShardId, hash: impl Fn(&[u8]) -> u64) -> [Shard; 2] {
        let mut halves = [BTreeMap::new(), BTreeMap::new()];
        if let Shard::Leaf(entries) = self {
            for (name, entry) in entries {
                let bit = ((hash(name) >> id.depth) & 1) as usize;
                halves[bit].insert(name.clone(), *entry);
            }
        }
        halves.map(Shard::Leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(name: &[u8]) -> u64 {
        u64::from_le_bytes(blake3::hash(name).as_bytes()[..8].try_into().unwrap())
    }

    #[test]
    fn split_deals_entries_by_hash_bit_and_children_find_them() {
        let mut entries = BTreeMap::new();
        for i in 0..3000u64 {
            let e = DirEntry {
                ino: i,
                kind: Kind::File,
            };
            entries.insert(format!("file-{i:06}").into_bytes(), e);
        }
        let leaf = Shard::Leaf(entries.clone());
        let root = ShardId::root(1);
        assert!(leaf.should_split(0));
        let halves = leaf.split(&root, hash);
        let children = root.children(7);
        let total: usize = halves.iter().map(|h| h.entries().unwrap().len()).sum();
        assert_eq!(total, 3000);
        for (name, entry) in &entries {
            let child = root.child(hash(name), 7);
            let at = children.iter().position(|c| *c == child).unwrap();
            assert_eq!(halves[at].entries().unwrap()[name], *entry);
        }
        // Children differ, and differ from the root, in the block they name.
        assert_ne!(children[0].salt_input(), children[1].salt_input());
        assert_ne!(children[0].salt_input(), root.salt_input());
        assert_ne!(root.children(8)[0].salt_input(), children[0].salt_input());
    }

    #[test]
    fn small_leaves_do_not_split_and_shards_round_trip() {
        let mut leaf = Shard::default();
        if let Shard::Leaf(e) = &mut leaf {
            e.insert(
                b"a".to_vec(),
                DirEntry {
                    ino: 2,
                    kind: Kind::Dir,
                },
            );
        }
        assert!(!leaf.should_split(0));
        assert_eq!(Shard::from_bytes(&leaf.to_bytes()).unwrap(), leaf);
        let split = Shard::Split { generation: 3 };
        assert!(!split.should_split(0));
        assert_eq!(Shard::from_bytes(&split.to_bytes()).unwrap(), split);
    }
}
