//! Inodes: the attributes and content of one file, directory or symlink,
//! stored as one mutable block found from the inode number.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::{FsError, decode, encode};
use crate::Address;

/// File data is cut into chunks of this size. 1 MiB matches the largest
/// FUSE write, so sequential writes fill whole chunks one request at a
/// time; a random 4 KiB write rewrites at most 1 MiB; and a 1 GiB file
/// lists 1,024 chunks (about 48 KiB of inode).
pub const CHUNK_SIZE: u64 = 1024 * 1024;
/// Files up to this size live inline in their inode: one block per small
/// file, no chunk round trip (at 8 KiB, closing each of the one file in
/// twenty of a source tree that is larger waited for a chunk's three
/// replicas; at 32 KiB, one in a thousand does).
pub const INLINE_MAX: u64 = 32 * 1024;
/// The extended attribute that holds a file's capabilities.
const CAPABILITY_XATTR: &[u8] = b"security.capability";
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;
/// Longest name in a directory, as on Linux.
pub const NAME_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// One encrypted chunk of file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub address: Address,
    /// Plaintext bytes that count; the rest of the chunk reads as zeros.
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Small file data kept in the inode.
    Inline(Vec<u8>),
    /// Chunks by index; a missing index is a hole that reads as zeros.
    Chunks(BTreeMap<u64, ChunkRef>),
    Symlink(Vec<u8>),
    /// Children live in the directory's shards (see [`super::dir`]).
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (including setuid, setgid and sticky), no type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub size: u64,
    pub nlink: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Content,
}

impl Inode {
    /// Whether a write or truncate by an unprivileged caller takes
    /// something from this file (see [`Self::drop_privileges`]).
    pub fn has_privileges(&self) -> bool {
        self.mode & 0o4000 != 0
            || self.mode & 0o2010 == 0o2010
            || self.xattrs.contains_key(CAPABILITY_XATTR)
    }

    /// Takes what a write or truncate by an unprivileged caller takes from
    /// a file, as Linux does: setuid, setgid if the group may execute it,
    /// and file capabilities.
    pub fn drop_privileges(&mut self) {
        self.mode &= !0o4000;
        if self.mode & 0o010 != 0 {
            self.mode &= !0o2000;
        }
        self.xattrs.remove(CAPABILITY_XATTR);
    }

    pub fn new(ino: u64, kind: Kind, mode: u32, uid: u32, gid: u32, now: Timestamp) -> Self {
        let (content, nlink) = match kind {
            Kind::File => (Content::Inline(Vec::new()), 1),
            Kind::Dir => (Content::Dir, 2),
            Kind::Symlink => (Content::Symlink(Vec::new()), 1),
        };
        Self {
            ino,
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            size: 0,
            nlink,
            xattrs: BTreeMap::new(),
            content,
        }
    }

    pub fn symlink(ino: u64, target: Vec<u8>, uid: u32, gid: u32, now: Timestamp) -> Self {
        let mut inode = Self::new(ino, Kind::Symlink, 0o777, uid, gid, now);
        inode.size = target.len() as u64;
        inode.content = Content::Symlink(target);
        inode
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FsError> {
        decode(bytes, "inode")
    }

    /// The chunk holding file bytes from `index * CHUNK_SIZE`, if any (none
    /// for inline data or a hole).
    pub fn chunk(&self, index: u64) -> Option<ChunkRef> {
        match &self.content {
            Content::Chunks(c) => c.get(&index).copied(),
            _ => None,
        }
    }

    /// Every chunk the content refers to.
    pub fn chunk_addresses(&self) -> impl Iterator<Item = Address> + '_ {
        let chunks = match &self.content {
            Content::Chunks(c) => Some(c.values().map(|c| c.address)),
            _ => None,
        };
        chunks.into_iter().flatten()
    }

    /// The chunks this version refers to and `next` no longer does (its
    /// content replaced, cut off or gone).
    pub fn chunks_dropped_by(&self, next: &Inode) -> Vec<Address> {
        let kept: std::collections::HashSet<Address> = next.chunk_addresses().collect();
        self.chunk_addresses()
            .filter(|a| !kept.contains(a))
            .collect()
    }

    /// Bytes of storage the content takes, for usage accounting.
    pub fn stored_bytes(&self) -> u64 {
        match &self.content {
            Content::Inline(d) | Content::Symlink(d) => d.len() as u64,
            Content::Chunks(c) => c.values().map(|c| u64::from(c.len)).sum(),
            Content::Dir => 0,
        }
    }

    /// Sets the size; chunks wholly past the end go, the last one is cut.
    /// Bytes past the old end read as zeros (a hole).
    pub fn truncate(&mut self, size: u64) {
        match &mut self.content {
            Content::Inline(data) => data.resize(size.min(data.len() as u64) as usize, 0),
            Content::Chunks(chunks) => {
                chunks.retain(|&index, _| index * CHUNK_SIZE < size);
                if let Some((&index, last)) = chunks.iter_mut().next_back() {
                    let keep = size - index * CHUNK_SIZE;
                    last.len = last.len.min(keep.min(CHUNK_SIZE) as u32);
                }
            }
            Content::Symlink(_) | Content::Dir => {}
        }
        self.size = size;
    }
}

/// The chunk indices that bytes `offset..offset + len` touch.
pub fn chunk_span(offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return offset / CHUNK_SIZE..offset / CHUNK_SIZE;
    }
    offset / CHUNK_SIZE..(offset + len - 1) / CHUNK_SIZE + 1
}

/// Copies `src` (the plaintext of chunk `index`, `None` for a hole) into
/// `out`, which holds file bytes from `offset`; the part of the chunk
/// outside `out` is skipped, bytes past the chunk's data are zeros.
pub fn copy_from_chunk(index: u64, src: Option<&[u8]>, offset: u64, out: &mut [u8]) {
    let chunk_start = index * CHUNK_SIZE;
    let from = offset.max(chunk_start);
    let to = (offset + out.len() as u64).min(chunk_start + CHUNK_SIZE);
    if from >= to {
        return;
    }
    let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
    dst.fill(0);
    if let Some(src) = src {
        let s_from = (from - chunk_start) as usize;
        let s_to = ((to - chunk_start) as usize).min(src.len());
        if s_from < s_to {
            dst[..s_to - s_from].copy_from_slice(&src[s_from..s_to]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Inode {
        Inode::new(5, Kind::File, 0o100644, 1, 2, Timestamp::default())
    }

    #[test]
    fn inode_round_trips_and_keeps_permission_bits_only() {
        let mut i = file();
        assert_eq!(i.mode, 0o644);
        i.xattrs.insert(b"user.a".to_vec(), b"1".to_vec());
        assert_eq!(Inode::from_bytes(&i.to_bytes()).unwrap(), i);
        assert!(Inode::from_bytes(b"\xff\xff").is_err());
    }

    #[test]
    fn chunk_span_covers_touched_chunks() {
        assert_eq!(chunk_span(0, 1), 0..1);
        assert_eq!(chunk_span(CHUNK_SIZE - 1, 2), 0..2);
        assert_eq!(chunk_span(CHUNK_SIZE, CHUNK_SIZE), 1..2);
        assert_eq!(chunk_span(3 * CHUNK_SIZE, 0), 3..3);
    }

    #[test]
    fn chunks_dropped_by_a_new_version_are_the_ones_it_no_longer_names() {
        let r = |n: u8| ChunkRef {
            address: Address([n; 32]),
            len: CHUNK_SIZE as u32,
        };
        let mut old = file();
        old.content = Content::Chunks([(0, r(1)), (1, r(2)), (2, r(3))].into());
        let mut next = old.clone();
        next.content = Content::Chunks([(0, r(1)), (1, r(4))].into());
        assert_eq!(
            old.chunks_dropped_by(&next),
            [Address([2; 32]), Address([3; 32])]
        );
        assert!(next.chunks_dropped_by(&next).is_empty());
        // A chunk that moved to another index is still named.
        next.content = Content::Chunks([(5, r(2)), (6, r(1)), (7, r(3))].into());
        assert!(old.chunks_dropped_by(&next).is_empty());
        next.content = Content::Inline(b"small now".to_vec());
        assert_eq!(old.chunks_dropped_by(&next).len(), 3);
        assert!(next.chunks_dropped_by(&old).is_empty());
    }

    #[test]
    fn truncate_drops_and_cuts_chunks() {
        let mut i = file();
        let r = ChunkRef {
            address: Address([1; 32]),
            len: CHUNK_SIZE as u32,
        };
        i.content = Content::Chunks([(0, r), (1, r), (3000, r)].into());
        i.size = 3001 * CHUNK_SIZE;
        i.truncate(CHUNK_SIZE + 10);
        let Content::Chunks(c) = &i.content else {
            panic!()
        };
        assert_eq!(c.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(c[&1].len, 10);
        assert_eq!(c[&0].len, CHUNK_SIZE as u32);
        assert_eq!(i.size, CHUNK_SIZE + 10);
        i.truncate(5 * CHUNK_SIZE);
        assert_eq!(i.size, 5 * CHUNK_SIZE);
        assert_eq!(i.stored_bytes(), CHUNK_SIZE + 10);
    }

    #[test]
    fn copy_from_chunk_fills_holes_and_tails_with_zeros() {
        let mut out = vec![9u8; 8];
        // Chunk 0 holds 4 bytes; the read covers bytes 2..10.
        copy_from_chunk(0, Some(b"abcd"), 2, &mut out);
        assert_eq!(&out, b"cd\0\0\0\0\0\0");
        let mut out = vec![9u8; 4];
        copy_from_chunk(1, None, CHUNK_SIZE - 2, &mut out);
        assert_eq!(&out, &[9, 9, 0, 0]);
    }
}
