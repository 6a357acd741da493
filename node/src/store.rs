//! The local block store: one RocksDB per peer under its data dir.
//!
//! A block is acknowledged only once its write-ahead log record is synced.
//! Large blocks (file data chunks) are kept in files of their own, written
//! and synced once, instead of passing through RocksDB's write-ahead log
//! and then again into its blob files; RocksDB records a small marker for
//! them, written after the file is durable.
//! Capacity is enforced before anything is written, and every read is checked
//! against the block's address, so a flipped bit on disk is reported as
//! corruption rather than served.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{ColumnFamilyDescriptor, DB, MergeOperands, Options, WriteBatch, WriteOptions};
use shoal_core::Address;
use shoal_core::block::{self, BlockError};

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
/// Blocks this large or larger are kept in files of their own.
const FILE_MIN: usize = 64 * 1024;
/// What a marker of a block kept in a file starts with; its length follows.
const FILE_MARKER: &[u8; 8] = b"shoal:fb";

fn file_marker(len: u64) -> Vec<u8> {
    [FILE_MARKER.as_slice(), &len.to_le_bytes()].concat()
}

/// The length of the block at `address` if `value` is the marker of a
/// block kept in a file. A block whose content is a marker's bytes is its
/// own address's content, so it is never taken for one.
fn file_len(address: &Address, value: &[u8]) -> Option<u64> {
    (value.len() == 16 && value.starts_with(FILE_MARKER) && Address::of(value) != *address)
        .then(|| u64::from_le_bytes(value[8..].try_into().expect("8 bytes")))
}

/// Writers of the same address are serialised (so a block is counted once);
/// writers of different addresses proceed in parallel and share WAL syncs.
const STRIPES: usize = 64;

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
    /// Where blocks kept in files live, by the first byte of the address.
    files: PathBuf,
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
            files: dir.join("files"),
            capacity,
            used: AtomicU64::new(used),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        })
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
        let _writer = self.stripes[usize::from(address.0[0]) % STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
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
        let in_file = data.len() >= FILE_MIN;
        let written = if in_file {
            self.write_file(&address, data)
                .map(|()| file_marker(needed))
        } else {
            Ok(data.to_vec())
        };
        let result = written.and_then(|value| {
            let mut batch = WriteBatch::default();
            batch.put_cf(blocks, address.as_bytes(), value);
            batch.merge_cf(meta, KEY_USED, (needed as i64).to_le_bytes());
            record(&mut batch);
            Ok(self.db.write_opt(batch, &sync)?)
        });
        if let Err(e) = result {
            self.used.fetch_sub(needed, Ordering::AcqRel);
            if in_file {
                let _ = std::fs::remove_file(self.file_path(&address));
            }
            return Err(e);
        }
        Ok(address)
    }

    fn file_path(&self, address: &Address) -> PathBuf {
        let hex = address.to_string();
        self.files.join(&hex[..2]).join(hex)
    }

    /// Writes a block's file; returns once its content and its name are
    /// durable.
    fn write_file(&self, address: &Address, data: &[u8]) -> Result<(), StoreError> {
        let path = self.file_path(address);
        let dir = path.parent().expect("a file lives in a directory");
        std::fs::create_dir_all(dir)?;
        let mut file = std::fs::File::create(&path)?;
        file.write_all(data)?;
        file.sync_data()?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Drops `owner`'s claims made at or before `issued_ms`, and deletes
    /// every block left without a claim. Returns blocks and bytes freed.
    pub fn delete_owned(&self, owner: &[u8; 32], issued_ms: u64) -> Result<(u64, u64), StoreError> {
        let meta = self.db.cf_handle(CF_META).expect("meta column family");
        let blocks = self.db.cf_handle(CF_BLOCKS).expect("blocks column family");
        let prefix = owned_key(owner, &Address([0; 32]));
        let prefix = &prefix[..OWNED.len() + 32];
        let mut claimed = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, prefix) {
            let (key, at) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            let at = u64::from_le_bytes(at.as_ref().try_into().unwrap_or([0; 8]));
            if at <= issued_ms
                && let Ok(address) = Address::from_slice(&key[prefix.len()..])
            {
                claimed.push(address);
            }
        }
        let (mut freed_blocks, mut freed_bytes) = (0, 0);
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        for address in claimed {
            let _writer = self.stripes[usize::from(address.0[0]) % STRIPES]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut batch = WriteBatch::default();
            batch.delete_cf(meta, owned_key(owner, &address));
            batch.delete_cf(meta, claim_key(&address, owner));
            let claims = claim_key(&address, &[0; 32]);
            let claims = &claims[..CLAIM.len() + 32];
            let others = self
                .db
                .prefix_iterator_cf(meta, claims)
                .filter_map(Result::ok)
                .take_while(|(k, _)| k.starts_with(claims))
                .any(|(k, _)| &k[claims.len()..] != owner.as_slice());
            let mut freed = 0;
            let mut in_file = false;
            if !others && let Some(value) = self.db.get_pinned_cf(blocks, address.as_bytes())? {
                let len = file_len(&address, &value);
                in_file = len.is_some();
                freed = len.unwrap_or(value.len() as u64);
                batch.delete_cf(blocks, address.as_bytes());
                batch.merge_cf(meta, KEY_USED, (-(freed as i64)).to_le_bytes());
            }
            self.db.write_opt(batch, &sync)?;
            if in_file {
                // Gone from the index first: a crash between leaves a file
                // no one reads, never a marker without its file.
                let _ = std::fs::remove_file(self.file_path(&address));
            }
            if freed > 0 {
                self.used.fetch_sub(freed, Ordering::AcqRel);
                freed_blocks += 1;
                freed_bytes += freed;
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
        let data = match file_len(address, &value) {
            None => value,
            Some(_) => match std::fs::read(self.file_path(address)) {
                Ok(data) => data,
                // Deleted meanwhile.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound && !self.contains(address)? =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Corrupt(*address));
                }
                Err(e) => return Err(e.into()),
            },
        };
        block::verify(address, &data).map_err(|_| StoreError::Corrupt(*address))?;
        Ok(Some(data))
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

    /// Reads and updates the acceptor state of the mutable block at
    /// `address` atomically with respect to other updates of it: `update`
    /// gets the stored bytes (if any) and returns new bytes to store (synced
    /// before this returns if `durable`, else only written) or `None` to
    /// leave them, plus a result.
    pub fn with_acceptor<R>(
        &self,
        address: &Address,
        durable: bool,
        update: impl FnOnce(Option<&[u8]>) -> (Option<Vec<u8>>, R),
    ) -> Result<R, StoreError> {
        let _writer = self.stripes[usize::from(address.0[0]) % STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let cf = self.db.cf_handle(CF_PAXOS).expect("paxos column family");
        let current = self.db.get_pinned_cf(cf, address.as_bytes())?;
        let (new, result) = update(current.as_deref());
        if let Some(new) = new {
            let mut sync = WriteOptions::default();
            sync.set_sync(durable);
            self.db.put_cf_opt(cf, address.as_bytes(), new, &sync)?;
        }
        Ok(result)
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
    fn large_blocks_live_in_files_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path(), 1 << 30).unwrap();
        let owner = [9u8; 32];
        let claim = Some(Claim {
            owner,
            at_ms: 1,
            replicas: 0,
        });
        let big: Vec<u8> = (0..FILE_MIN as u32 * 3).map(|i| (i % 251) as u8).collect();
        let a = store.put_owned(&big, claim).unwrap();
        let path = store.file_path(&a);
        assert_eq!(std::fs::read(&path).unwrap(), big);
        assert_eq!(store.get(&a).unwrap().unwrap(), big);
        assert_eq!(store.used(), big.len() as u64);
        // A block whose bytes are a marker is plain data, not a file.
        let lookalike = store.put(&file_marker(5)).unwrap();
        assert_eq!(store.get(&lookalike).unwrap().unwrap(), file_marker(5));
        // A flipped bit in the file is reported, not served.
        let mut flipped = big.clone();
        flipped[7] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(store.get(&a), Err(StoreError::Corrupt(_))));
        std::fs::write(&path, &big).unwrap();
        // Reopened, then deleted: the file goes with the block.
        drop(store);
        let store = BlockStore::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(store.get(&a).unwrap().unwrap(), big);
        assert_eq!(
            store.delete_owned(&owner, 2).unwrap(),
            (1, big.len() as u64)
        );
        assert!(!path.exists());
        assert_eq!(store.get(&a).unwrap(), None);
        assert_eq!(store.used(), 16);
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
