//! Images: a volume's metadata frozen at one moment, for snapshots and the
//! volumes restored or cloned from them.
//!
//! An image maps each metadata block's name (an inode, a directory shard,
//! the usage counter) to the structure it held. It is cut into parts of
//! consecutive names, each stored as one sealed immutable block, and an
//! index lists the first name of every part, so a lookup fetches one part.
//! Chunks are not in the image: inodes refer to them, and they stay shared.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FsError, decode, encode};
use crate::Address;

/// Bytes of entries per part: big enough that a volume of 10,000 files
/// needs a handful, small enough that one lookup fetches little.
pub const PART_BYTES: usize = 256 * 1024;

/// Consecutive entries of an image, by block name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePart {
    pub entries: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl ImagePart {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "image part")
    }
}

/// Where an image's parts are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Each part's first name and address, in name order.
    pub parts: Vec<(Vec<u8>, Address)>,
    /// Blocks the image holds.
    pub blocks: u64,
}

impl ImageIndex {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "image index")
    }

    /// The part that would hold `name`, if any part could.
    pub fn part_for(&self, name: &[u8]) -> Option<usize> {
        self.parts
            .partition_point(|(first, _)| first.as_slice() <= name)
            .checked_sub(1)
    }
}

/// Cuts an image's entries into parts of about [`PART_BYTES`] each, in
/// name order.
pub fn cut(entries: BTreeMap<Vec<u8>, Vec<u8>>, part_bytes: usize) -> Vec<ImagePart> {
    let mut parts = Vec::new();
    let mut part = ImagePart::default();
    let mut bytes = 0;
    for (name, body) in entries {
        let len = name.len() + body.len();
        if bytes + len > part_bytes && !part.entries.is_empty() {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += len;
        part.entries.insert(name, body);
    }
    if !part.entries.is_empty() {
        parts.push(part);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_found_in_the_part_that_holds_it() {
        let entries: BTreeMap<Vec<u8>, Vec<u8>> = (0u32..1000)
            .map(|i| (format!("inode{i:05}").into_bytes(), vec![i as u8; 100]))
            .collect();
        let parts = cut(entries.clone(), 4096);
        assert!(parts.len() > 20, "{} parts", parts.len());
        assert!(parts.iter().all(|p| {
            let size: usize = p.entries.iter().map(|(n, b)| n.len() + b.len()).sum();
            size <= 4096
        }));
        let index = ImageIndex {
            parts: parts
                .iter()
                .map(|p| {
                    let first = p.entries.keys().next().unwrap().clone();
                    (first, Address::of(&p.to_bytes()))
                })
                .collect(),
            blocks: entries.len() as u64,
        };
        for (name, body) in &entries {
            let part = &parts[index.part_for(name).unwrap()];
            assert_eq!(part.entries.get(name), Some(body));
        }
        // Names outside the image: before the first part, or in a gap.
        assert_eq!(index.part_for(b"a"), None);
        let gap = index.part_for(b"inode00010x").unwrap();
        assert!(!parts[gap].entries.contains_key(b"inode00010x".as_slice()));
        let index = ImageIndex::from_bytes(&index.to_bytes()).unwrap();
        assert_eq!(index.blocks, 1000);
        assert_eq!(
            ImagePart::from_bytes(&parts[0].to_bytes()).unwrap(),
            parts[0]
        );
    }

    #[test]
    fn an_empty_image_has_no_parts() {
        assert!(cut(BTreeMap::new(), PART_BYTES).is_empty());
        assert_eq!(ImageIndex::default().part_for(b"x"), None);
    }
}
