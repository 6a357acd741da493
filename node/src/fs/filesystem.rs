//! One mounted volume's POSIX operations, as async functions that return
//! errno values: the FUSE layer only translates requests and replies.
//!
//! - Metadata: inode and directory-shard blocks through [`Meta`], cached
//!   and validated by version; directory changes are compare-and-set and
//!   are re-applied to whichever version won a conflict.
//! - Data: writes are buffered per open file; full chunks are uploaded at
//!   once, in the background and in parallel, the rest at commit. A commit
//!   (flush, fsync, close) replaces the inode's content in one version, so
//!   a reader sees the old file or the new one, never a mix.
//! - Reads: chunks come from an in-memory cache (chunks are immutable, so
//!   it is never invalidated); sequential readers get the next chunks
//!   fetched ahead, in parallel.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fuser::Errno;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use shoal_core::Address;
use shoal_core::fs::crypt::NONCE_LEN;
use shoal_core::fs::dir::DirEntry;
use shoal_core::fs::inode::{
    CHUNK_SIZE, INLINE_MAX, NAME_MAX, ROOT_INO, chunk_span, copy_from_chunk,
};
use shoal_core::fs::{ChunkRef, Content, Inode, Kind, Shard, ShardId, Usage, VolumeRecord};
use shoal_core::mutable::{MutableBlock, PublicKey};
use tokio::task::JoinHandle;
use tracing::warn;

use super::chunk_cache::ChunkCache;
use super::meta::{Meta, MetaError, VolumeKeys};
use super::volumes::{USAGE, Volumes};
use crate::blocks::{BlockError, Blocks};

/// How long a cached inode or directory leaf answers without asking its
/// quorum again (the kernel caches attributes as long).
pub const ATTR_TTL: Duration = Duration::from_secs(1);
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD: u64 = 8;
/// Chunks of plaintext kept in memory.
const CHUNK_CACHE: usize = 256;
/// Dirty chunks an open file may buffer before it uploads the oldest
/// (256 MiB: random writes over a large region stay in memory until fsync).
const MAX_DIRTY: usize = 256;
/// Chunk uploads in flight per mount: enough to keep every replica busy,
/// few enough that each finishes well within the request timeout.
const UPLOADS_IN_FLIGHT: usize = 8;
/// Inode reads in flight when a directory listing prefetches attributes.
const PREFETCH_PARALLEL: usize = 64;

type ChunkFuture = Shared<BoxFuture<'static, Result<Bytes, Errno>>>;

/// A chunk on its way to the cluster: its plaintext, and the upload.
type Upload = (Arc<Vec<u8>>, JoinHandle<Result<ChunkRef, Errno>>);

/// A file open on this mount, shared by all its handles.
#[derive(Debug)]
struct OpenFile {
    /// The working copy: committed state plus buffered writes.
    inode: Inode,
    /// The version the working copy is based on (`None` until created).
    base: Option<MutableBlock>,
    /// Chunks written since the last commit: whole plaintext, by index.
    dirty: BTreeMap<u64, Vec<u8>>,
    /// Chunks on their way to the cluster, with their plaintext.
    uploading: BTreeMap<u64, Upload>,
    /// Whether the working copy differs from the committed version.
    changed: bool,
    handles: usize,
    /// Bytes the committed version stores (for usage accounting).
    committed_bytes: u64,
    /// Where the last read ended, to detect sequential reading.
    last_read_end: u64,
}

/// The directory listing an open directory handle walks through.
type Listing = Arc<Vec<(Vec<u8>, DirEntry)>>;

#[derive(Debug, Default)]
struct UsageState {
    /// The volume's usage when last read.
    total: Usage,
    /// This mount's changes not yet added to the usage block.
    pending: Usage,
}

/// A mounted volume.
pub struct VolumeFs {
    record: Mutex<VolumeRecord>,
    volumes: Volumes,
    meta: Meta<VolumeKeys>,
    blocks: Arc<Blocks>,
    disk_cache: Arc<ChunkCache>,
    read_only: bool,
    inodes: Mutex<HashMap<u64, (Inode, MutableBlock, Instant)>>,
    shards: Mutex<HashMap<ShardId, (Shard, MutableBlock, Instant)>>,
    chunks: Mutex<lru::LruCache<Address, Bytes>>,
    fetching: Mutex<HashMap<Address, ChunkFuture>>,
    files: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<OpenFile>>>>,
    handles: Mutex<HashMap<u64, u64>>,
    listings: Mutex<HashMap<u64, Listing>>,
    /// Inode versions whose data the kernel's page cache holds.
    page_cache: Mutex<HashMap<u64, u64>>,
    next_handle: AtomicU64,
    usage: Mutex<UsageState>,
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Who owns the chunks this volume writes: its writer key (deleting the
    /// volume drops every chunk it owns).
    owner: PublicKey,
}

impl std::fmt::Debug for VolumeFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("volume", &self.record.lock().expect("record").name)
            .finish()
    }
}

/// Attributes as the FUSE layer reports them.
#[derive(Debug, Clone)]
pub struct Attr {
    pub inode: Inode,
}

fn meta_errno(e: MetaError) -> Errno {
    warn!("metadata: {e}");
    Errno::EIO
}

fn block_errno(e: BlockError) -> Errno {
    warn!("data: {e}");
    match e {
        BlockError::NotEnoughNodes { full, .. } if full > 0 => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

impl VolumeFs {
    pub fn new(
        record: VolumeRecord,
        volumes: Volumes,
        blocks: Arc<Blocks>,
        disk_cache: Arc<ChunkCache>,
        read_only: bool,
    ) -> Arc<Self> {
        let meta = volumes.meta(&record);
        let owner = meta.keys().key.writer().public();
        Arc::new(Self {
            record: Mutex::new(record),
            volumes,
            meta,
            blocks,
            disk_cache,
            read_only,
            inodes: Mutex::default(),
            shards: Mutex::default(),
            chunks: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CHUNK_CACHE).expect("nonzero"),
            )),
            fetching: Mutex::default(),
            files: Mutex::default(),
            handles: Mutex::default(),
            listings: Mutex::default(),
            page_cache: Mutex::default(),
            next_handle: AtomicU64::new(1),
            usage: Mutex::default(),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT)),
            owner,
        })
    }

    pub fn name(&self) -> String {
        self.record.lock().expect("record").name.clone()
    }

    /// Checks the volume is readable (its root exists) and loads usage.
    pub async fn start(&self) -> Result<(), Errno> {
        self.inode(ROOT_INO).await?;
        self.sync_usage().await;
        Ok(())
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    // ---- usage -----------------------------------------------------------

    fn add_usage(&self, delta: Usage) {
        self.usage.lock().expect("usage").pending.add(delta);
    }

    /// Adds this mount's pending changes to the volume's usage block and
    /// rereads the volume's size (it may have been resized).
    pub async fn sync_usage(&self) {
        let pending = std::mem::take(&mut self.usage.lock().expect("usage").pending);
        let result = if pending == Usage::default() {
            self.meta
                .read::<Usage>(USAGE)
                .await
                .map(|r| r.map(|(u, _)| u))
        } else {
            self.meta
                .update::<Usage, _>(USAGE, None, |cur: Option<&Usage>| {
                    let mut u = cur.copied().unwrap_or_default();
                    u.add(pending);
                    (Some(u), ())
                })
                .await
                .map(|(_, now)| now.map(|(u, _)| u))
        };
        match result {
            Ok(total) => self.usage.lock().expect("usage").total = total.unwrap_or_default(),
            Err(e) => {
                warn!("volume usage: {e}");
                self.usage.lock().expect("usage").pending.add(pending);
            }
        }
        let name = self.name();
        match self.volumes.get(&name).await {
            Ok(r) => *self.record.lock().expect("record") = r,
            Err(e) => warn!("volume {name}: {e}"),
        }
    }

    /// Bytes used, as this mount knows it.
    fn used(&self) -> (u64, u64) {
        let u = self.usage.lock().expect("usage");
        let bytes = (u.total.bytes + u.pending.bytes).max(0) as u64;
        let files = (u.total.files + u.pending.files).max(0) as u64;
        (bytes, files)
    }

    /// Size, used bytes and files, for statfs.
    pub fn statfs(&self) -> (u64, u64, u64) {
        let size = self.record.lock().expect("record").size;
        let (used, files) = self.used();
        (size, used, files)
    }

    fn check_space(&self, growth: u64) -> Result<(), Errno> {
        let size = self.record.lock().expect("record").size;
        if growth > 0 && self.used().0 + growth > size {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    // ---- inodes ----------------------------------------------------------

    fn inode_name(ino: u64) -> Vec<u8> {
        Meta::<VolumeKeys>::inode_name(ino)
    }

    fn cache_inode(&self, inode: &Inode, block: &MutableBlock) {
        self.inodes
            .lock()
            .expect("inodes")
            .insert(inode.ino, (inode.clone(), block.clone(), Instant::now()));
    }

    /// The committed inode, fresh from its quorum.
    async fn read_inode(&self, ino: u64) -> Result<(Inode, MutableBlock), Errno> {
        match self
            .meta
            .read::<Inode>(&Self::inode_name(ino))
            .await
            .map_err(meta_errno)?
        {
            Some((inode, block)) => {
                self.cache_inode(&inode, &block);
                Ok((inode, block))
            }
            None => Err(Errno::ENOENT),
        }
    }

    /// The inode as this mount sees it: an open file's working copy, else a
    /// cached copy younger than [`ATTR_TTL`], else fresh.
    pub async fn inode(&self, ino: u64) -> Result<Inode, Errno> {
        let open = self.files.lock().expect("files").get(&ino).cloned();
        if let Some(file) = open {
            return Ok(file.lock().await.inode.clone());
        }
        if let Some((inode, _, at)) = self.inodes.lock().expect("inodes").get(&ino)
            && at.elapsed() < ATTR_TTL
        {
            return Ok(inode.clone());
        }
        self.read_inode(ino).await.map(|(i, _)| i)
    }

    /// Applies `change` to the committed inode (and to the open file's
    /// working copy, which keeps its own content).
    async fn update_inode(
        &self,
        ino: u64,
        change: impl Fn(&mut Inode) -> Result<(), Errno>,
    ) -> Result<Inode, Errno> {
        self.writable()?;
        // A file created here and not yet committed has no block yet.
        let open = self.files.lock().expect("files").get(&ino).cloned();
        if let Some(file) = &open {
            self.commit_file(ino, file).await?;
        }
        let known = self
            .inodes
            .lock()
            .expect("inodes")
            .get(&ino)
            .map(|(_, b, _)| b.clone());
        let (result, now) = self
            .meta
            .update::<Inode, _>(&Self::inode_name(ino), known, |cur: Option<&Inode>| {
                let Some(cur) = cur else {
                    return (None, Err(Errno::ENOENT));
                };
                let mut next = cur.clone();
                match change(&mut next) {
                    Ok(()) => {
                        next.ctime = super::now();
                        (Some(next), Ok(()))
                    }
                    Err(e) => (None, Err(e)),
                }
            })
            .await
            .map_err(meta_errno)?;
        result?;
        let (inode, block) = now.ok_or(Errno::ENOENT)?;
        self.cache_inode(&inode, &block);
        if let Some(file) = open {
            let mut f = file.lock().await;
            let mut next = inode.clone();
            if f.changed {
                // A write landed since the commit above: keep its content.
                next.content = std::mem::replace(&mut f.inode.content, Content::Dir);
                next.size = f.inode.size;
            }
            f.inode = next;
            f.base = Some(block);
            return Ok(f.inode.clone());
        }
        Ok(inode)
    }

    /// Fetches many inodes in parallel into the cache (directory prefetch).
    async fn prefetch_inodes(&self, inos: Vec<u64>) -> HashMap<u64, Inode> {
        use futures::StreamExt;
        futures::stream::iter(inos)
            .map(|ino| async move { (ino, self.inode(ino).await) })
            .buffer_unordered(PREFETCH_PARALLEL)
            .filter_map(|(ino, r)| async move { r.ok().map(|i| (ino, i)) })
            .collect()
            .await
    }

    // ---- directories -----------------------------------------------------

    fn name_hash(&self, name: &[u8]) -> u64 {
        self.meta.keys().key.name_hash(name)
    }

    /// The leaf shard a name belongs to, as far as cached splits tell.
    fn leaf_id(&self, dir: u64, hash: u64) -> ShardId {
        let shards = self.shards.lock().expect("shards");
        let mut id = ShardId::root(dir);
        while let Some((Shard::Split { generation }, _, _)) = shards.get(&id) {
            id = id.child(hash, *generation);
        }
        id
    }

    fn cache_shard(&self, id: ShardId, shard: &Shard, block: &MutableBlock) {
        self.shards
            .lock()
            .expect("shards")
            .insert(id, (shard.clone(), block.clone(), Instant::now()));
    }

    /// Reads one shard, from cache when allowed (split shards never change).
    async fn shard(&self, id: ShardId, fresh: bool) -> Result<Option<Shard>, Errno> {
        if let Some((shard, _, at)) = self.shards.lock().expect("shards").get(&id)
            && (matches!(shard, Shard::Split { .. }) || (!fresh && at.elapsed() < ATTR_TTL))
        {
            return Ok(Some(shard.clone()));
        }
        match self
            .meta
            .read::<Shard>(&id.salt_input())
            .await
            .map_err(meta_errno)?
        {
            Some((shard, block)) => {
                self.cache_shard(id, &shard, &block);
                Ok(Some(shard))
            }
            None => Ok(None),
        }
    }

    /// The entry `name` in directory `dir`.
    async fn entry(&self, dir: u64, name: &[u8], fresh: bool) -> Result<Option<DirEntry>, Errno> {
        let hash = self.name_hash(name);
        for _ in 0..64 {
            let id = self.leaf_id(dir, hash);
            match self.shard(id, fresh).await? {
                Some(Shard::Split { .. }) => continue,
                Some(Shard::Leaf(entries)) => return Ok(entries.get(name).copied()),
                None => return Ok(None),
            }
        }
        Err(Errno::EIO)
    }

    /// Applies `change` to the entries of the leaf holding `name`, re-applied
    /// on conflicts; splits the leaf afterwards if it grew too large.
    async fn update_dir<R>(
        &self,
        dir: u64,
        name: &[u8],
        change: impl Fn(&mut BTreeMap<Vec<u8>, DirEntry>) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        self.writable()?;
        let hash = self.name_hash(name);
        for _ in 0..64 {
            let id = self.leaf_id(dir, hash);
            let known = self
                .shards
                .lock()
                .expect("shards")
                .get(&id)
                .map(|(_, b, _)| b.clone());
            let (result, now) = self
                .meta
                .update::<Shard, _>(&id.salt_input(), known, |cur: Option<&Shard>| match cur {
                    Some(Shard::Split { .. }) => (None, None),
                    cur => {
                        let mut entries = cur.and_then(Shard::entries).cloned().unwrap_or_default();
                        match change(&mut entries) {
                            Ok(r) => (Some(Shard::Leaf(entries)), Some(Ok(r))),
                            Err(e) => (None, Some(Err(e))),
                        }
                    }
                })
                .await
                .map_err(meta_errno)?;
            if let Some((shard, block)) = &now {
                self.cache_shard(id, shard, block);
            }
            match result {
                // The leaf split under us: follow it.
                None => continue,
                Some(result) => {
                    if let Some((shard, block)) = now
                        && shard.should_split(id.depth)
                    {
                        self.split(id, shard, block).await?;
                    }
                    return result;
                }
            }
        }
        Err(Errno::EIO)
    }

    /// Splits a leaf in two (see [`shoal_core::fs::dir`]).
    async fn split(&self, id: ShardId, leaf: Shard, block: MutableBlock) -> Result<(), Errno> {
        let generation = block.version;
        let halves = leaf.split(&id, |n| self.name_hash(n));
        let children = id.children(generation);
        let names = children.map(|c| c.salt_input());
        let created = futures::future::join_all(
            names
                .iter()
                .zip(&halves)
                .map(|(name, half)| self.meta.create(name, half)),
        )
        .await;
        for c in created {
            c.map_err(meta_errno)?;
        }
        let (_, now) = self
            .meta
            .update::<Shard, _>(&id.salt_input(), Some(block), |cur: Option<&Shard>| {
                if cur == Some(&leaf) {
                    (Some(Shard::Split { generation }), ())
                } else {
                    (None, ())
                }
            })
            .await
            .map_err(meta_errno)?;
        if let Some((shard, block)) = now {
            self.cache_shard(id, &shard, &block);
        }
        Ok(())
    }

    /// Every entry of a directory, fresh from its shards.
    async fn list(&self, dir: u64) -> Result<Vec<(Vec<u8>, DirEntry)>, Errno> {
        let mut out = Vec::new();
        let mut level = vec![ShardId::root(dir)];
        for _ in 0..=shoal_core::fs::dir::MAX_DEPTH {
            if level.is_empty() {
                break;
            }
            let shards =
                futures::future::join_all(level.iter().map(|id| self.shard(*id, true))).await;
            let mut next = Vec::new();
            for (id, shard) in level.iter().zip(shards) {
                match shard? {
                    Some(Shard::Leaf(entries)) => out.extend(entries),
                    Some(Shard::Split { generation }) => next.extend(id.children(generation)),
                    None => {}
                }
            }
            level = next;
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    // ---- namespace operations -------------------------------------------

    /// Looks up `name` in `parent`; an entry whose inode was never
    /// committed does not exist yet.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Inode, Errno> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let entry = self
            .entry(parent, name, false)
            .await?
            .ok_or(Errno::ENOENT)?;
        self.inode(entry.ino).await
    }

    fn insert_entry(
        name: &[u8],
        entry: DirEntry,
    ) -> impl Fn(&mut BTreeMap<Vec<u8>, DirEntry>) -> Result<(), Errno> {
        move |entries| {
            if let Some(e) = entries.get(name) {
                return if e.ino == entry.ino {
                    Ok(())
                } else {
                    Err(Errno::EEXIST)
                };
            }
            entries.insert(name.to_vec(), entry);
            Ok(())
        }
    }

    /// Creates a directory, symlink or (unopened) file.
    pub async fn make(&self, parent: u64, name: &[u8], inode: Inode) -> Result<Inode, Errno> {
        self.writable()?;
        check_name(name)?;
        self.check_space(inode.stored_bytes())?;
        self.add_entry_and_inode(parent, name, &inode).await?;
        self.add_usage(Usage {
            bytes: inode.stored_bytes() as i64,
            files: 1,
        });
        Ok(inode)
    }

    /// Writes a new inode and its entry in `parent`; returns the inode's
    /// first version.
    async fn add_entry_and_inode(
        &self,
        parent: u64,
        name: &[u8],
        inode: &Inode,
    ) -> Result<MutableBlock, Errno> {
        let entry = DirEntry {
            ino: inode.ino,
            kind: inode.kind,
        };
        // Both writes go out together: an entry whose inode is missing reads
        // as absent, so the order in which they land does not matter.
        let inode_name = Self::inode_name(inode.ino);
        let (created, inserted) = futures::join!(
            self.meta.create_unique(&inode_name, inode),
            self.update_dir(parent, name, Self::insert_entry(name, entry))
        );
        inserted?;
        created.map_err(meta_errno)?.ok_or(Errno::EIO)
    }

    /// Creates and opens a regular file; its inode is written at the first
    /// commit.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
        truncate: bool,
    ) -> Result<(Inode, u64), Errno> {
        self.writable()?;
        check_name(name)?;
        let inode = Inode::new(super::new_ino(), Kind::File, mode, uid, gid, super::now());
        let block = match self.add_entry_and_inode(parent, name, &inode).await {
            Ok(block) => block,
            // Someone else made the file first: open theirs, as a local
            // filesystem would without O_EXCL.
            Err(Errno::EEXIST) if !exclusive => {
                let existing = self.entry(parent, name, true).await?.ok_or(Errno::ENOENT)?;
                if existing.kind != Kind::File {
                    return Err(Errno::EISDIR);
                }
                let (fh, _) = self.open(existing.ino, true).await?;
                let inode = if truncate {
                    self.truncate(existing.ino, 0).await?
                } else {
                    self.inode(existing.ino).await?
                };
                return Ok((inode, fh));
            }
            Err(e) => return Err(e),
        };
        self.add_usage(Usage { bytes: 0, files: 1 });
        let file = OpenFile {
            inode: inode.clone(),
            base: Some(block.clone()),
            dirty: BTreeMap::new(),
            uploading: BTreeMap::new(),
            changed: false,
            handles: 0,
            committed_bytes: 0,
            last_read_end: 0,
        };
        self.cache_inode(&inode, &block);
        self.files
            .lock()
            .expect("files")
            .insert(inode.ino, Arc::new(tokio::sync::Mutex::new(file)));
        let fh = self.open_handle(inode.ino).await?;
        Ok((inode, fh))
    }

    /// Drops one link to `ino` (an unlink, or a rename over it).
    async fn drop_link(&self, ino: u64) -> Result<(), Errno> {
        let inode = self
            .update_inode(ino, |i| {
                i.nlink = i.nlink.saturating_sub(1);
                Ok(())
            })
            .await;
        match inode {
            Ok(inode) if inode.nlink == 0 => {
                self.add_usage(Usage {
                    bytes: -(inode.stored_bytes() as i64),
                    files: -1,
                });
                Ok(())
            }
            Ok(_) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        check_name(name)?;
        let removed = self
            .update_dir(parent, name, |entries| match entries.get(name) {
                None => Err(Errno::ENOENT),
                Some(e) if e.kind == Kind::Dir => Err(Errno::EISDIR),
                Some(_) => Ok(entries.remove(name).expect("present")),
            })
            .await?;
        self.drop_link(removed.ino).await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        check_name(name)?;
        let entry = self.entry(parent, name, true).await?.ok_or(Errno::ENOENT)?;
        if entry.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !self.list(entry.ino).await?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.update_dir(parent, name, |entries| match entries.get(name) {
            Some(e) if e.ino == entry.ino => Ok(entries.remove(name)),
            _ => Err(Errno::ENOENT),
        })
        .await?;
        self.add_usage(Usage {
            bytes: 0,
            files: -1,
        });
        Ok(())
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`, replacing
    /// a file there (or an empty directory, if `name` is one).
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> Result<(), Errno> {
        self.writable()?;
        check_name(name)?;
        check_name(new_name)?;
        let source = self.entry(parent, name, true).await?.ok_or(Errno::ENOENT)?;
        let target = self.entry(new_parent, new_name, true).await?;
        if let Some(target) = target {
            if target.ino == source.ino {
                return Ok(());
            }
            if no_replace {
                return Err(Errno::EEXIST);
            }
            match (source.kind == Kind::Dir, target.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.list(target.ino).await?.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                _ => {}
            }
        }
        let same_leaf = parent == new_parent
            && self.leaf_id(parent, self.name_hash(name))
                == self.leaf_id(parent, self.name_hash(new_name));
        // Put the new name in place (replacing the target), then drop the
        // old one: the destination always exists, as POSIX asks.
        let replace = move |entries: &mut BTreeMap<Vec<u8>, DirEntry>| {
            if same_leaf && entries.get(name).map(|e| e.ino) != Some(source.ino) {
                return Err(Errno::ENOENT);
            }
            if no_replace && entries.contains_key(new_name) {
                return Err(Errno::EEXIST);
            }
            let replaced = entries.insert(new_name.to_vec(), source);
            if same_leaf {
                entries.remove(name);
            }
            Ok(replaced)
        };
        let replaced = self.update_dir(new_parent, new_name, replace).await?;
        if !same_leaf {
            self.update_dir(parent, name, |entries| {
                if entries.get(name).map(|e| e.ino) == Some(source.ino) {
                    entries.remove(name);
                }
                Ok(())
            })
            .await?;
        }
        if let Some(old) = replaced.filter(|old| old.ino != source.ino) {
            if old.kind == Kind::Dir {
                self.add_usage(Usage {
                    bytes: 0,
                    files: -1,
                });
            } else {
                self.drop_link(old.ino).await?;
            }
        }
        Ok(())
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Inode, Errno> {
        check_name(new_name)?;
        let inode = self
            .update_inode(ino, |i| {
                if i.kind == Kind::Dir {
                    return Err(Errno::EPERM);
                }
                i.nlink += 1;
                Ok(())
            })
            .await?;
        let entry = DirEntry {
            ino,
            kind: inode.kind,
        };
        if let Err(e) = self
            .update_dir(new_parent, new_name, Self::insert_entry(new_name, entry))
            .await
        {
            self.update_inode(ino, |i| {
                i.nlink = i.nlink.saturating_sub(1);
                Ok(())
            })
            .await?;
            return Err(e);
        }
        Ok(inode)
    }

    /// A directory handle with the listing it will return.
    pub async fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let inode = self.inode(ino).await?;
        if inode.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let listing = self.list(ino).await?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.listings
            .lock()
            .expect("listings")
            .insert(fh, Arc::new(listing));
        Ok(fh)
    }

    /// Entries of an open directory from `offset` on, with their inodes
    /// fetched in parallel batches (directory prefetch). Entries whose
    /// inode does not exist (yet) are left out.
    pub async fn readdir(
        &self,
        fh: u64,
        offset: usize,
        count: usize,
        with_attrs: bool,
    ) -> Result<Vec<(Vec<u8>, DirEntry, Option<Inode>)>, Errno> {
        let listing = self
            .listings
            .lock()
            .expect("listings")
            .get(&fh)
            .cloned()
            .ok_or(Errno::EBADF)?;
        let page: Vec<_> = listing.iter().skip(offset).take(count).cloned().collect();
        if !with_attrs {
            return Ok(page.into_iter().map(|(n, e)| (n, e, None)).collect());
        }
        let inodes = self
            .prefetch_inodes(page.iter().map(|(_, e)| e.ino).collect())
            .await;
        Ok(page
            .into_iter()
            .map(|(n, e)| {
                let inode = inodes.get(&e.ino).cloned();
                (n, e, inode)
            })
            .collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.listings.lock().expect("listings").remove(&fh);
    }

    // ---- attributes --------------------------------------------------------

    pub async fn setattr(
        &self,
        ino: u64,
        change: impl Fn(&mut Inode) -> Result<(), Errno>,
    ) -> Result<Inode, Errno> {
        self.update_inode(ino, change).await
    }

    /// Sets a file's size through its open state, or directly.
    pub async fn truncate(&self, ino: u64, size: u64) -> Result<Inode, Errno> {
        self.writable()?;
        let file = self.open_file(ino).await?;
        {
            let mut f = file.lock().await;
            if f.inode.kind != Kind::File {
                return Err(Errno::EISDIR);
            }
            f.dirty.retain(|&i, _| i * CHUNK_SIZE < size);
            f.uploading.retain(|&i, _| i * CHUNK_SIZE < size);
            let keep = size % CHUNK_SIZE;
            let last = size / CHUNK_SIZE;
            if let Some(chunk) = f.dirty.get_mut(&last) {
                chunk.truncate(keep as usize);
            }
            if let Some((data, _)) = f.uploading.remove(&last) {
                let mut data = data.to_vec();
                data.truncate(keep as usize);
                f.dirty.insert(last, data);
            }
            f.inode.truncate(size);
            f.inode.mtime = super::now();
            f.changed = true;
        }
        let result = self.commit_file(ino, &file).await;
        self.release_file(ino, &file).await;
        result?;
        let inode = file.lock().await.inode.clone();
        Ok(inode)
    }

    // ---- files ---------------------------------------------------------------

    /// The open state of `ino`, loaded fresh from its quorum if no handle
    /// has it open (close-to-open: an open sees every close before it).
    async fn open_file(&self, ino: u64) -> Result<Arc<tokio::sync::Mutex<OpenFile>>, Errno> {
        let open = self.files.lock().expect("files").get(&ino).cloned();
        if let Some(f) = open {
            f.lock().await.handles += 1;
            return Ok(f);
        }
        let (inode, block) = self.read_inode(ino).await?;
        let file = Arc::new(tokio::sync::Mutex::new(OpenFile {
            committed_bytes: inode.stored_bytes(),
            inode,
            base: Some(block),
            dirty: BTreeMap::new(),
            uploading: BTreeMap::new(),
            changed: false,
            handles: 1,
            last_read_end: 0,
        }));
        let existing = self
            .files
            .lock()
            .expect("files")
            .entry(ino)
            .or_insert(file.clone())
            .clone();
        if !Arc::ptr_eq(&existing, &file) {
            // Another open won the race: share its state.
            existing.lock().await.handles += 1;
        }
        Ok(existing)
    }

    /// Drops one use of an open file; the last one forgets it.
    async fn release_file(&self, ino: u64, file: &Arc<tokio::sync::Mutex<OpenFile>>) {
        let mut f = file.lock().await;
        f.handles = f.handles.saturating_sub(1);
        if f.handles == 0 && !f.changed {
            self.files.lock().expect("files").remove(&ino);
            if let Some(base) = &f.base {
                self.cache_inode(&f.inode, base);
            }
        }
    }

    async fn open_handle(&self, ino: u64) -> Result<u64, Errno> {
        let file = self.files.lock().expect("files").get(&ino).cloned();
        if let Some(file) = file {
            file.lock().await.handles += 1;
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handles").insert(fh, ino);
        Ok(fh)
    }

    /// Opens a file; returns the handle and whether the kernel may keep
    /// the pages it cached (the file has not changed since).
    pub async fn open(&self, ino: u64, write: bool) -> Result<(u64, bool), Errno> {
        if write {
            self.writable()?;
        }
        let file = self.open_file(ino).await?;
        let (kind, version) = {
            let f = file.lock().await;
            (f.inode.kind, f.base.as_ref().map_or(0, |b| b.version))
        };
        if kind == Kind::Dir {
            self.release_file(ino, &file).await;
            return Err(Errno::EISDIR);
        }
        let keep = self
            .page_cache
            .lock()
            .expect("page cache")
            .insert(ino, version)
            == Some(version);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handles").insert(fh, ino);
        Ok((fh, keep))
    }

    fn handle(&self, fh: u64) -> Result<(u64, Arc<tokio::sync::Mutex<OpenFile>>), Errno> {
        let ino = *self
            .handles
            .lock()
            .expect("handles")
            .get(&fh)
            .ok_or(Errno::EBADF)?;
        let file = self
            .files
            .lock()
            .expect("files")
            .get(&ino)
            .cloned()
            .ok_or(Errno::EBADF)?;
        Ok((ino, file))
    }

    /// Encrypts and stores one chunk in the background, once one of the
    /// mount's upload slots is free (writers wait: backpressure).
    async fn upload(&self, data: Arc<Vec<u8>>) -> JoinHandle<Result<ChunkRef, Errno>> {
        let blocks = self.blocks.clone();
        let key = self.meta.keys().key.clone();
        let owner = self.owner;
        let slot = self.upload_slots.clone().acquire_owned().await;
        tokio::spawn(async move {
            let _slot = slot;
            let mut nonce = [0u8; NONCE_LEN];
            rand::fill(&mut nonce);
            let sealed = Bytes::from(key.seal_data(nonce, &data));
            let address = blocks
                .put_owned(sealed, Some(owner))
                .await
                .map_err(block_errno)?;
            Ok(ChunkRef {
                address,
                len: data.len() as u32,
            })
        })
    }

    /// The plaintext of a chunk, from cache or its replicas; concurrent
    /// requests for one chunk share a fetch.
    fn chunk(&self, chunk: ChunkRef) -> ChunkFuture {
        if let Some(data) = self.chunks.lock().expect("chunks").get(&chunk.address) {
            let data = data.clone();
            return async move { Ok(data) }.boxed().shared();
        }
        let mut fetching = self.fetching.lock().expect("fetching");
        if let Some(f) = fetching.get(&chunk.address) {
            return f.clone();
        }
        let blocks = self.blocks.clone();
        let key = self.meta.keys().key.clone();
        let disk = self.disk_cache.clone();
        let fetch = async move {
            let address = chunk.address;
            let cached = {
                let disk = disk.clone();
                tokio::task::spawn_blocking(move || disk.get(&address))
                    .await
                    .ok()
                    .flatten()
            };
            let sealed = match cached {
                Some(sealed) => Bytes::from(sealed),
                None => {
                    let sealed = blocks.get(address).await.map_err(block_errno)?;
                    let copy = sealed.clone();
                    tokio::task::spawn_blocking(move || disk.put(&address, &copy));
                    sealed
                }
            };
            let plain = key.open_data(&sealed).map_err(|e| {
                warn!("chunk {}: {e}", chunk.address);
                Errno::EIO
            })?;
            Ok(Bytes::from(plain))
        }
        .boxed()
        .shared();
        fetching.insert(chunk.address, fetch.clone());
        fetch
    }

    async fn chunk_data(&self, chunk: ChunkRef) -> Result<Bytes, Errno> {
        let result = self.chunk(chunk).await;
        self.fetching
            .lock()
            .expect("fetching")
            .remove(&chunk.address);
        if let Ok(data) = &result {
            self.chunks
                .lock()
                .expect("chunks")
                .put(chunk.address, data.clone());
        }
        result
    }

    /// Starts fetching chunks a sequential reader will want next.
    fn read_ahead(self: &Arc<Self>, refs: Vec<ChunkRef>) {
        for chunk in refs {
            if self.chunks.lock().expect("chunks").contains(&chunk.address) {
                continue;
            }
            let fs = self.clone();
            tokio::spawn(async move {
                let _ = fs.chunk_data(chunk).await;
            });
        }
    }

    pub async fn read(self: &Arc<Self>, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (_, file) = self.handle(fh)?;
        let mut out;
        let mut fetch = Vec::new();
        {
            let mut f = file.lock().await;
            let end = (offset + u64::from(size)).min(f.inode.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            out = vec![0u8; (end - offset) as usize];
            match &f.inode.content {
                Content::Inline(data) => copy_from_chunk(0, Some(data), offset, &mut out),
                Content::Chunks(chunks) => {
                    for index in chunk_span(offset, out.len() as u64) {
                        if let Some(data) = f.dirty.get(&index) {
                            copy_from_chunk(index, Some(data), offset, &mut out);
                        } else if let Some((data, _)) = f.uploading.get(&index) {
                            copy_from_chunk(index, Some(data), offset, &mut out);
                        } else if let Some(chunk) = chunks.get(&index) {
                            fetch.push((index, *chunk));
                        }
                    }
                    if offset == f.last_read_end && offset > 0 {
                        let next = chunk_span(end, READ_AHEAD * CHUNK_SIZE);
                        let ahead = chunks.range(next).map(|(_, c)| *c).collect();
                        self.read_ahead(ahead);
                    }
                }
                Content::Symlink(_) | Content::Dir => return Err(Errno::EINVAL),
            }
            f.last_read_end = end;
        }
        let fetched =
            futures::future::join_all(fetch.iter().map(|(index, chunk)| async move {
                (*index, *chunk, self.chunk_data(*chunk).await)
            }))
            .await;
        for (index, chunk, data) in fetched {
            let data = data?;
            let valid = &data[..(chunk.len as usize).min(data.len())];
            copy_from_chunk(index, Some(valid), offset, &mut out);
        }
        Ok(out)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        self.writable()?;
        let (_, file) = self.handle(fh)?;
        let end = offset + data.len() as u64;
        // Committed chunks this write changes only in part are read first,
        // without holding the file: other writes and reads go on meanwhile.
        let partial = |index: u64| {
            let start = index * CHUNK_SIZE;
            offset > start || end < start + CHUNK_SIZE
        };
        let needed: Vec<ChunkRef> = {
            let f = file.lock().await;
            chunk_span(offset, data.len() as u64)
                .filter(|&i| {
                    partial(i) && !f.dirty.contains_key(&i) && !f.uploading.contains_key(&i)
                })
                .filter_map(|i| f.inode.chunks().find(|(j, _)| **j == i).map(|(_, c)| *c))
                .collect()
        };
        for fetched in
            futures::future::join_all(needed.into_iter().map(|c| self.chunk_data(c))).await
        {
            fetched?;
        }
        let mut f = file.lock().await;
        // Buffered data counts against the volume before it is committed.
        let buffered: u64 = f.dirty.values().map(|d| d.len() as u64).sum::<u64>()
            + f.uploading
                .values()
                .map(|(d, _)| d.len() as u64)
                .sum::<u64>();
        self.check_space(buffered + end.saturating_sub(f.inode.size).min(data.len() as u64))?;
        if let Content::Inline(inline) = &mut f.inode.content {
            if end <= INLINE_MAX {
                if inline.len() < end as usize {
                    inline.resize(end as usize, 0);
                }
                inline[offset as usize..end as usize].copy_from_slice(data);
                f.inode.size = f.inode.size.max(end);
                f.inode.mtime = super::now();
                f.changed = true;
                return Ok(data.len() as u32);
            }
            let inline = std::mem::take(inline);
            f.inode.content = Content::Chunks(BTreeMap::new());
            if !inline.is_empty() {
                f.dirty.insert(0, inline);
            }
        }
        for index in chunk_span(offset, data.len() as u64) {
            let chunk_start = index * CHUNK_SIZE;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + CHUNK_SIZE);
            if !f.dirty.contains_key(&index) {
                let existing = if let Some((d, _)) = f.uploading.remove(&index) {
                    d.to_vec()
                } else if !partial(index) {
                    Vec::new()
                } else if let Some(chunk) = f
                    .inode
                    .chunks()
                    .find(|(i, _)| **i == index)
                    .map(|(_, c)| *c)
                {
                    let d = self.chunk_data(chunk).await?;
                    d[..(chunk.len as usize).min(d.len())].to_vec()
                } else {
                    Vec::new()
                };
                f.dirty.insert(index, existing);
            }
            let buf = f.dirty.get_mut(&index).expect("inserted");
            let (a, b) = ((from - chunk_start) as usize, (to - chunk_start) as usize);
            if buf.len() < b {
                buf.resize(b, 0);
            }
            buf[a..b].copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            // A full chunk goes out now, in parallel with further writes.
            if buf.len() as u64 == CHUNK_SIZE && to == chunk_start + CHUNK_SIZE {
                let data = Arc::new(f.dirty.remove(&index).expect("present"));
                let task = self.upload(data.clone()).await;
                f.uploading.insert(index, (data, task));
            }
        }
        while f.dirty.len() > MAX_DIRTY {
            let (index, data) = f.dirty.pop_first().expect("non-empty");
            let data = Arc::new(data);
            let task = self.upload(data.clone()).await;
            f.uploading.insert(index, (data, task));
        }
        f.inode.size = f.inode.size.max(end);
        f.inode.mtime = super::now();
        f.changed = true;
        Ok(data.len() as u32)
    }

    /// Makes an open file's changes durable: uploads what is buffered, then
    /// writes the inode's new content in one version, re-applied on top of
    /// any attribute change another mount made meanwhile.
    async fn commit_file(
        &self,
        ino: u64,
        file: &Arc<tokio::sync::Mutex<OpenFile>>,
    ) -> Result<(), Errno> {
        let mut f = file.lock().await;
        if !f.changed {
            return Ok(());
        }
        let dirty: Vec<(u64, Arc<Vec<u8>>)> = std::mem::take(&mut f.dirty)
            .into_iter()
            .map(|(i, d)| (i, Arc::new(d)))
            .collect();
        for (index, data) in dirty {
            let task = self.upload(data.clone()).await;
            f.uploading.insert(index, (data, task));
        }
        let uploading = std::mem::take(&mut f.uploading);
        let mut uploaded = BTreeMap::new();
        let mut failed = None;
        for (index, (data, task)) in uploading {
            match task.await {
                Ok(Ok(chunk)) => {
                    uploaded.insert(index, chunk);
                }
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(Errno::EIO),
            }
            if failed.is_some() {
                // Keep the data buffered so that a retry can commit it.
                f.dirty.insert(index, data.to_vec());
            }
        }
        if let Content::Chunks(chunks) = &mut f.inode.content {
            chunks.extend(uploaded);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if f.inode.nlink == 0 {
            f.changed = false;
            return Ok(());
        }
        let ours = f.inode.clone();
        let (_, now) = self
            .meta
            .update::<Inode, _>(
                &Self::inode_name(ino),
                f.base.clone(),
                |cur: Option<&Inode>| {
                    let next = match cur {
                        None => ours.clone(),
                        Some(cur) => {
                            let mut next = cur.clone();
                            next.content = ours.content.clone();
                            next.size = ours.size;
                            next.mtime = ours.mtime;
                            next.ctime = super::now();
                            next
                        }
                    };
                    (Some(next), ())
                },
            )
            .await
            .map_err(meta_errno)?;
        let (inode, block) = now.ok_or(Errno::EIO)?;
        let stored = inode.stored_bytes();
        self.add_usage(Usage {
            bytes: stored as i64 - f.committed_bytes as i64,
            files: 0,
        });
        f.committed_bytes = stored;
        self.cache_inode(&inode, &block);
        self.page_cache
            .lock()
            .expect("page cache")
            .insert(ino, block.version);
        f.inode = inode;
        f.base = Some(block);
        f.changed = false;
        Ok(())
    }

    /// flush and fsync: commit the file behind a handle.
    pub async fn commit(&self, fh: u64) -> Result<(), Errno> {
        let (ino, file) = self.handle(fh)?;
        self.commit_file(ino, &file).await
    }

    /// Closes a handle, committing what is left.
    pub async fn release(&self, fh: u64) -> Result<(), Errno> {
        let Some(ino) = self.handles.lock().expect("handles").remove(&fh) else {
            return Err(Errno::EBADF);
        };
        let file = self.files.lock().expect("files").get(&ino).cloned();
        let Some(file) = file else {
            return Ok(());
        };
        let result = self.commit_file(ino, &file).await;
        self.release_file(ino, &file).await;
        result
    }

    /// Commits every open file (before an unmount).
    pub async fn commit_all(&self) {
        let files: Vec<_> = self
            .files
            .lock()
            .expect("files")
            .iter()
            .map(|(i, f)| (*i, f.clone()))
            .collect();
        for (ino, file) in files {
            if let Err(e) = self.commit_file(ino, &file).await {
                warn!("commit of inode {ino} before unmount: {e:?}");
            }
        }
        self.sync_usage().await;
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match self.inode(ino).await?.content {
            Content::Symlink(target) => Ok(target),
            _ => Err(Errno::EINVAL),
        }
    }
}
