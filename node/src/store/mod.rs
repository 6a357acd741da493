//! The local block store: one RocksDB per peer under its data dir.
//!
//! A block is acknowledged only once its write-ahead log record is synced.
//! Large blocks (file data chunks) are appended to segment files, written
//! and synced once, instead of passing through RocksDB's write-ahead log
//! and then again into its blob files; RocksDB records where they lie,
//! after their bytes are durable.
//! Capacity is enforced before anything is written, and every read is checked
//! against the block's address, so a flipped bit on disk is reported as
//! corruption rather than served.

mod segments;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{ColumnFamilyDescriptor, DB, MergeOperands, Options, WriteBatch, WriteOptions};
use shoal_core::Address;
use shoal_core::block::{self, BlockError};

use segments::{Extent, Segments};

const CF_BLOCKS: &str = "blocks";
const CF_META: &str = "meta";
/// Paxos acceptor state of mutable blocks, by address.
const CF_PAXOS: &str = "paxos";
const KEY_USED: &[u8] = b"used_bytes";
/// `owned/OWNER/ADDRESS` → when the claim was made (ms): an owner's blocks.
const OWNED: &[u8] = b"owned/";
/// `claim/ADDRESS/OWNER` → the replicas the owner keeps (u32; 0 or absent:
/// the cluster's number): a block's owners.
const CLAIM: &[u8] = b"claim/";

/// An owner's claim on a block (see [`BlockStore::put_owned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub owner: [u8; 32],
    /// When the claim was made (ms): a delete issued earlier spares it.
    pub at_ms: u64,
    /// Replicas the owner keeps of the block (0: the cluster's number).
    pub replicas: u32,
}

fn owned_key(owner: &[u8; 32], address: &Address) -> Vec<u8> {
    [OWNED, owner.as_slice(), address.as_bytes().as_slice()].concat()
}

fn claim_key(address: &Address, owner: &[u8; 32]) -> Vec<u8> {
    [CLAIM, address.as_bytes().as_slice(), owner.as_slice()].concat()
}
/// Blocks this large or larger (file data chunks) are kept in segment
/// files, not in RocksDB.
const SEGMENT_MIN: usize = 64 * 1024;
/// What the index entry of a block kept in a segment starts with; its
/// [`Extent`] follows.
const SEGMENT_MARKER: &[u8; 8] = b"shoal:sg";

fn segment_marker(extent: &Extent) -> Vec<u8> {
    [SEGMENT_MARKER.as_slice(), &extent.encode()].concat()
}

/// Where the block at `address` lies if `value`, its index entry, is the
/// marker of a block kept in a segment. A block whose content is a marker's
/// bytes is its own address's content, so it is never taken for one.
fn extent(address: &Address, value: &[u8]) -> Option<Extent> {
    value
        .strip_prefix(SEGMENT_MARKER.as_slice())
        .and_then(Extent::decode)
        .filter(|_| Address::of(value) != *address)
}

/// Writers of the same address are serialised (so a block is counted once);
/// writers of different addresses proceed in parallel and share WAL syncs.
const STRIPES: usize = 64;

/// The writer lock of `address`.
fn stripe(address: &Address) -> usize {
    usize::from(address.0[0]) % STRIPES
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "no space: this peer holds {used} of {capacity} bytes, a {needed}-byte block does not fit"
    )]
    NoSpace {
        needed: u64,
        used: u64,
        capacity: u64,
    },
    #[error("the disk under the data dir is full: {0}")]
    DiskFull(String),
    #[error("block {0} is corrupt on this peer's disk")]
    Corrupt(Address),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("block store: {0}")]
    Db(String),
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::DiskFull(e.to_string())
        } else {
            StoreError::Db(e.to_string())
        }
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let msg = e.into_string();
        if msg.contains("No space left") {
            StoreError::DiskFull(msg)
        } else {
            StoreError::Db(msg)
        }
    }
}

/// Immutable blocks stored on this peer.
pub struct BlockStore {
    db: DB,
    /// Where large blocks live.
    segments: Segments,
    capacity: u64,
    used: AtomicU64,
    stripes: Vec<Mutex<()>>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .finish()
    }
}

fn add_counters(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let decode = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let total = operands.iter().fold(existing.map_or(0, decode), |acc, op| {
        acc.saturating_add(decode(op))
    });
    Some(total.to_le_bytes().to_vec())
}

impl BlockStore {
    /// Opens (or creates) the store in `dir` with room for `capacity` bytes
    /// of blocks.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);

        // Block content is large, mostly ciphertext: keep it out of the LSM
        // tree (blob files) so compaction does not rewrite it, and do not try
        // to compress it.
        let mut blocks = Options::default();
        blocks.set_enable_blob_files(true);
        blocks.set_min_blob_size(4096);
        blocks.set_compression_type(rocksdb::DBCompressionType::None);
        blocks.set_blob_compression_type(rocksdb::DBCompressionType::None);

        let mut meta = Options::default();
        meta.set_merge_operator_associative("add_i64", add_counters);

        let db = DB::open_cf_descriptors(
            &opts,
            dir,
            [
                ColumnFamilyDescriptor::new(CF_BLOCKS, blocks),
                ColumnFamilyDescriptor::new(CF_META, meta),
                ColumnFamilyDescriptor::new(CF_PAXOS, Options::default()),
            ],
        )?;
        let used = {
            let cf = db.cf_handle(CF_META).expect("meta column family");
            db.get_cf(cf, KEY_USED)?.map_or(0, |v| {
                i64::from_le_bytes(v.try_into().unwrap_or([0; 8])).max(0) as u64
            })
        };
        Ok(Self {
            db,
            segments: Segments::open(&dir.join("segments"))?,
            capacity,
            used: AtomicU64::new(used),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The writer lock of stripe `s` (see [`stripe`]).
    fn writer(&self, s: usize) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[s]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Stores an immutable block durably; returns its address. Storing a
    /// block this peer already holds is a no-op that succeeds.
    pub fn put(&self, data: &[u8]) -> Result<Address, StoreError> {
        self.put_owned(data, None)
    }

    /// [`Self::put`], recording an owner's claim on the block: the block
    /// then goes only when every owner has dropped its claim.
    pub fn put_owned(&self, data: &[u8], claim: Option<Claim>) -> Result<Address, StoreError> {
        let address = block::check_new(data)?;
        let _writer = self.writer(stripe(&address));
        let blocks = self.db.cf_handle(CF_BLOCKS).expect("blocks column family");
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let record = |batch: &mut WriteBatch| {
            if let Some(c) = claim {
                batch.put_cf(meta, owned_key(&c.owner, &address), c.at_ms.to_le_bytes());
                batch.put_cf(
                    meta,
                    claim_key(&address, &c.owner),
                    c.replicas.to_le_bytes(),
                );
            }
        };
        if self.db.get_pinned_cf(blocks, address.as_bytes())?.is_some() {
            if claim.is_some() {
                let mut batch = WriteBatch::default();
                record(&mut batch);
                self.db.write_opt(batch, &sync)?;
            }
            return Ok(address);
        }
        let needed = data.len() as u64;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + needed <= self.capacity).then_some(used + needed)
            })
            .map_err(|used| StoreError::NoSpace {
                needed,
                used,
                capacity: self.capacity,
            })?;
        let in_segment = data.len() >= SEGMENT_MIN;
        let written = if in_segment {
            self.segments
                .append(data)
                .map(|e| (segment_marker(&e), Some(e)))
        } else {
            Ok((data.to_vec(), None))
        };
        let result = written
            .map_err(StoreError::from)
            .and_then(|(value, extent)| {
                let mut batch = WriteBatch::default();
                batch.put_cf(blocks, address.as_bytes(), value);
                batch.merge_cf(meta, KEY_USED, (needed as i64).to_le_bytes());
                record(&mut batch);
                self.db.write_opt(batch, &sync).map_err(|e| {
                    if let Some(extent) = extent {
                        let _ = self.segments.free(&extent);
                    }
                    StoreError::from(e)
                })
            });
        if let Err(e) = result {
            self.used.fetch_sub(needed, Ordering::AcqRel);
            return Err(e);
        }
        Ok(address)
    }

    /// Drops `owner`'s claims made at or before `issued_ms`, and deletes
    /// every block left without a claim. Returns blocks and bytes freed.
    pub fn delete_owned(&self, owner: &[u8; 32], issued_ms: u64) -> Result<(u64, u64), StoreError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let prefix = owned_key(owner, &Address([0; 32]));
        let prefix = &prefix[..OWNED.len() + 32];
        let mut claimed = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, prefix) {
            let (key, _) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            if let Ok(address) = Address::from_slice(&key[prefix.len()..]) {
                claimed.push(address);
            }
        }
        self.release(owner, issued_ms, &claimed)
    }

    /// Drops `owner`'s claims made by `issued_ms` on `addresses`, deleting
    /// the blocks no one else claims; returns the blocks and bytes freed.
    /// The index changes reach the disk with one sync at the end, and only
    /// then are the blocks' bytes punched out of their segments: a crash
    /// before it leaves blocks claimed and whole, never an entry whose
    /// bytes are gone.
    pub fn release(
        &self,
        owner: &[u8; 32],
        issued_ms: u64,
        addresses: &[Address],
    ) -> Result<(u64, u64), StoreError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let blocks = self.db.cf_handle(CF_BLOCKS).expect("blocks column family");
        let (mut freed_blocks, mut freed_bytes) = (0, 0);
        let (mut dropped, mut punched) = (false, Vec::new());
        for address in addresses {
            let _writer = self.writer(stripe(address));
            // A claim made after the request (the block stored again) stands.
            let Some(at) = self.db.get_pinned_cf(meta, owned_key(owner, address))? else {
                continue;
            };
            if u64::from_le_bytes(at.as_ref().try_into().unwrap_or([0; 8])) > issued_ms {
                continue;
            }
            let mut batch = WriteBatch::default();
            batch.delete_cf(meta, owned_key(owner, address));
            batch.delete_cf(meta, claim_key(address, owner));
            let claims = claim_key(address, &[0; 32]);
            let claims = &claims[..CLAIM.len() + 32];
            let others = self
                .db
                .prefix_iterator_cf(meta, claims)
                .filter_map(Result::ok)
                .take_while(|(k, _)| k.starts_with(claims))
                .any(|(k, _)| &k[claims.len()..] != owner.as_slice());
            let mut freed = 0;
            if !others && let Some(value) = self.db.get_pinned_cf(blocks, address.as_bytes())? {
                let in_segment = extent(address, &value);
                freed = in_segment.map_or(value.len() as u64, |e| e.len);
                punched.extend(in_segment.map(|e| (*address, e)));
                batch.delete_cf(blocks, address.as_bytes());
                batch.merge_cf(meta, KEY_USED, (-(freed as i64)).to_le_bytes());
            }
            self.db.write(batch)?;
            dropped = true;
            if freed > 0 {
                self.used.fetch_sub(freed, Ordering::AcqRel);
                freed_blocks += 1;
                freed_bytes += freed;
            }
        }
        if dropped {
            self.db.flush_wal(true)?;
        }
        for (address, extent) in punched {
            if let Err(e) = self.segments.free(&extent) {
                tracing::warn!("cannot give back the space of block {address}: {e}");
            }
        }
        Ok((freed_blocks, freed_bytes))
    }

    /// Reads a block, verified against its address.
    pub fn get(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        let blocks = self.db.cf_handle(CF_BLOCKS).expect("blocks column family");
        let Some(value) = self.db.get_cf(blocks, address.as_bytes())? else {
            return Ok(None);
        };
        let data = match extent(address, &value) {
            None => value,
            Some(extent) => match self.segments.read(&extent) {
                Ok(data) => data,
                // Cut short: deleted meanwhile, or damaged.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return self.gone_or_corrupt(address);
                }
                Err(e) => return Err(e.into()),
            },
        };
        if block::verify(address, &data).is_err() {
            return self.gone_or_corrupt(address);
        }
        Ok(Some(data))
    }

    /// A block whose bytes did not check out: deleted while it was read
    /// (its range already punched out), or corrupt.
    fn gone_or_corrupt(&self, address: &Address) -> Result<Option<Vec<u8>>, StoreError> {
        if self.contains(address)? {
            Err(StoreError::Corrupt(*address))
        } else {
            Ok(None)
        }
    }

    /// The owners that claim a block, with the replicas each keeps.
    pub fn claims(&self, address: &Address) -> Result<Vec<([u8; 32], u32)>, StoreError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let prefix = [CLAIM, address.as_bytes().as_slice()].concat();
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, &prefix) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Ok(owner) = <[u8; 32]>::try_from(&key[prefix.len()..]) else {
                continue;
            };
            let replicas = value
                .get(..4)
                .map_or(0, |v| u32::from_le_bytes(v.try_into().expect("4 bytes")));
            out.push((owner, replicas));
        }
        Ok(out)
    }

    pub fn contains(&self, address: &Address) -> Result<bool, StoreError> {
        let blocks = self.db.cf_handle(CF_BLOCKS).expect("blocks column family");
        Ok(self.db.get_pinned_cf(blocks, address.as_bytes())?.is_some())
    }

    /// Reads and updates the acceptor states of the mutable blocks at
    /// `addresses`, in order, atomically with respect to other updates of
    /// them: `update` gets each block's index and stored bytes (if any, as
    /// left by the updates before it) and returns new bytes to store or
    /// `None` to leave them, plus a result. The new states are written in
    /// one batch, synced before this returns if `durable`.
    pub fn with_acceptors<R>(
        &self,
        addresses: &[Address],
        durable: bool,
        mut update: impl FnMut(usize, Option<&[u8]>) -> (Option<Vec<u8>>, R),
    ) -> Result<Vec<R>, StoreError> {
        let mut stripes: Vec<usize> = addresses.iter().map(stripe).collect();
        stripes.sort_unstable();
        stripes.dedup();
        // In ascending order, as every writer takes them: no deadlock.
        let _writers: Vec<_> = stripes.into_iter().map(|s| self.writer(s)).collect();
        let cf = self.db.cf_handle(CF_PAXOS).expect("paxos column family");
        let mut written: HashMap<Address, Vec<u8>> = HashMap::new();
        let mut batch = WriteBatch::default();
        let mut results = Vec::with_capacity(addresses.len());
        for (i, address) in addresses.iter().enumerate() {
            let (new, result) = match written.get(address) {
                Some(earlier) => update(i, Some(earlier)),
                None => update(i, self.db.get_pinned_cf(cf, address.as_bytes())?.as_deref()),
            };
            if let Some(new) = new {
                batch.put_cf(cf, address.as_bytes(), &new);
                written.insert(*address, new);
            }
            results.push(result);
        }
        if !batch.is_empty() {
            let mut sync = WriteOptions::default();
            sync.set_sync(durable);
            self.db.write_opt(batch, &sync)?;
        }
        Ok(results)
    }

    /// Addresses of stored blocks after `start_after`, in order, at most
    /// `limit` of them.
    pub fn list(
        &self,
        start_after: Option<&Address>,
        limit: usize,
    ) -> Result<Vec<Address>, StoreError> {
        self.list_cf(CF_BLOCKS, start_after, limit)
    }

    /// Addresses of the mutable blocks this peer is (or was) an acceptor
    /// for, after `start_after`, in order, at most `limit` of them.
    pub fn list_acceptors(
        &self,
        start_after: Option<&Address>,
        limit: usize,
    ) -> Result<Vec<Address>, StoreError> {
        self.list_cf(CF_PAXOS, start_after, limit)
    }

    fn list_cf(
        &self,
        cf: &str,
        start_after: Option<&Address>,
        limit: usize,
    ) -> Result<Vec<Address>, StoreError> {
        let cf = self.db.cf_handle(cf).expect("column family");
        let mut iter = self.db.raw_iterator_cf(cf);
        match start_after {
            Some(a) => {
                iter.seek(a.as_bytes());
                if iter.key() == Some(a.as_bytes().as_slice()) {
                    iter.next();
                }
            }
            None => iter.seek_to_first(),
        }
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit {
            let Some(key) = iter.key() else { break };
            if let Ok(a) = Address::from_slice(key) {
                out.push(a);
            }
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    /// Overwrites a stored block's bytes without any check: lets tests model
    /// a disk that flipped bits.
    #[cfg(test)]
    fn corrupt_for_test(&self, address: &Address, data: &[u8]) {
        let blocks = self.db.cf_handle(CF_BLOCKS).unwrap();
        self.db.put_cf(blocks, address.as_bytes(), data).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_survive_reopen_and_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = {
            let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
            let a = store.put(b"hello").unwrap();
            store.put(b"hello").unwrap();
            assert_eq!(store.used(), 5);
            a
        };
        let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.used(), 5);
        assert_eq!(store.get(&a).unwrap().unwrap(), b"hello");
        assert!(store.get(&Address::of(b"other")).unwrap().is_none());
        let b = store.put(b"world").unwrap();
        let mut all = vec![a, b];
        all.sort();
        assert_eq!(store.list(None, 10).unwrap(), all);
        assert_eq!(store.list(Some(&all[0]), 10).unwrap(), vec![all[1]]);
        assert_eq!(store.list(None, 1).unwrap(), vec![all[0]]);
    }

    #[test]
    fn blocks_go_when_their_last_owner_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
        let (x, y) = ([1u8; 32], [2u8; 32]);
        let claim = |owner: [u8; 32], at_ms, replicas| {
            Some(Claim {
                owner,
                at_ms,
                replicas,
            })
        };
        let mine = store.put_owned(b"only x", claim(x, 10, 0)).unwrap();
        let shared = store.put_owned(b"x and y", claim(x, 10, 2)).unwrap();
        store.put_owned(b"x and y", claim(y, 10, 5)).unwrap();
        let late = store.put_owned(b"x, later", claim(x, 50, 0)).unwrap();
        let mut claims = store.claims(&shared).unwrap();
        claims.sort();
        assert_eq!(claims, [(x, 2), (y, 5)]);
        assert!(store.claims(&Address::of(b"none")).unwrap().is_empty());
        let nobody = store.put(b"unowned").unwrap();
        let used = store.used();
        // A request issued before a claim does not touch it.
        assert_eq!(store.delete_owned(&x, 20).unwrap(), (1, 6));
        assert!(!store.contains(&mine).unwrap());
        assert!(store.contains(&shared).unwrap() && store.contains(&late).unwrap());
        assert!(store.contains(&nobody).unwrap());
        assert_eq!(store.used(), used - 6);
        assert_eq!(store.delete_owned(&y, 20).unwrap(), (1, 7));
        assert!(!store.contains(&shared).unwrap());
        assert_eq!(store.delete_owned(&x, 60).unwrap(), (1, 8));
        assert_eq!(store.delete_owned(&x, 60).unwrap(), (0, 0));
        assert!(store.contains(&nobody).unwrap());
        drop(store);
        let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.used(), 7);
    }

    #[test]
    fn a_release_drops_only_the_listed_claims() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
        let (x, y) = ([1u8; 32], [2u8; 32]);
        let claim = |owner: [u8; 32], at_ms| {
            Some(Claim {
                owner,
                at_ms,
                replicas: 0,
            })
        };
        let gone = store.put_owned(b"gone", claim(x, 10)).unwrap();
        let kept = store.put_owned(b"kept", claim(x, 10)).unwrap();
        let shared = store.put_owned(b"shared", claim(x, 10)).unwrap();
        store.put_owned(b"shared", claim(y, 10)).unwrap();
        let late = store.put_owned(b"late", claim(x, 50)).unwrap();
        let unowned = store.put(b"unowned").unwrap();
        let listed = [gone, shared, late, unowned, Address::of(b"never stored")];
        assert_eq!(store.release(&x, 20, &listed).unwrap(), (1, 4));
        assert!(!store.contains(&gone).unwrap());
        // Unlisted, claimed by another owner, claimed after the request, or
        // claimed by no one: all kept.
        for address in [kept, shared, late, unowned] {
            assert!(store.contains(&address).unwrap());
        }
        assert_eq!(store.claims(&shared).unwrap(), [(y, 0)]);
        assert_eq!(store.release(&x, 20, &listed).unwrap(), (0, 0));
    }

    #[test]
    fn a_full_store_refuses_new_blocks_and_keeps_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 100).unwrap();
        let kept = store.put(&[1u8; 60]).unwrap();
        let err = store.put(&[2u8; 60]).unwrap_err();
        assert!(matches!(
            err,
            StoreError::NoSpace {
                needed: 60,
                used: 60,
                capacity: 100
            }
        ));
        assert!(err.to_string().starts_with("no space"));
        assert_eq!(store.get(&kept).unwrap().unwrap(), vec![1u8; 60]);
        assert_eq!(store.used(), 60);
    }

    #[test]
    fn large_blocks_live_in_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 1 << 30).unwrap();
        let owner = [9u8; 32];
        let claim = Some(Claim {
            owner,
            at_ms: 1,
            replicas: 0,
        });
        let big: Vec<u8> = (0..SEGMENT_MIN as u32 * 3)
            .map(|i| (i % 251) as u8)
            .collect();
        let a = store.put_owned(&big, claim).unwrap();
        let blocks = store.db.cf_handle(CF_BLOCKS).unwrap();
        let entry = store.db.get_cf(blocks, a.as_bytes()).unwrap().unwrap();
        let at = extent(&a, &entry).expect("kept in a segment");
        assert_eq!(store.segments.read(&at).unwrap(), big);
        assert_eq!(store.get(&a).unwrap().unwrap(), big);
        assert_eq!(store.used(), big.len() as u64);
        // A block whose bytes are a marker is plain data, not an extent.
        let lookalike = store.put(&segment_marker(&at)).unwrap();
        assert_eq!(store.get(&lookalike).unwrap().unwrap(), segment_marker(&at));
        // A flipped bit in the segment is reported, not served.
        let mut flipped = big.clone();
        flipped[7] ^= 1;
        store.segments.corrupt_for_test(&at, &flipped);
        assert!(matches!(store.get(&a), Err(StoreError::Corrupt(_))));
        store.segments.corrupt_for_test(&at, &big);
        // Reopened, then deleted: the range is given back.
        drop(store);
        let store = BlockStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(store.get(&a).unwrap().unwrap(), big);
        assert_eq!(
            store.delete_owned(&owner, 2).unwrap(),
            (1, big.len() as u64)
        );
        assert_eq!(store.segments.read(&at).unwrap(), vec![0; big.len()]);
        assert_eq!(store.get(&a).unwrap(), None);
        assert_eq!(
            store.used(),
            (SEGMENT_MARKER.len() + Extent::ENCODED_LEN) as u64
        );
    }

    #[test]
    fn corrupt_bytes_on_disk_are_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 1 << 20).unwrap();
        let a = store.put(b"precious").unwrap();
        store.corrupt_for_test(&a, b"prec1ous");
        assert!(matches!(store.get(&a), Err(StoreError::Corrupt(_))));
    }
}
