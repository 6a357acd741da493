//! One mounted volume's POSIX operations, as async functions that return
//! errno values: the FUSE layer only translates requests and replies.
//!
//! - Metadata: inode and directory-shard blocks through the mount's
//!   [`MetaCache`]: write-back while the mount has the volume alone, else
//!   compare-and-set on each block's quorum, re-applied to whichever
//!   version won a conflict.
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
use shoal_core::mutable::PublicKey;
use tokio::task::JoinHandle;
use tracing::{info, warn};

mod directory;
mod file;
mod reclaim;

use super::chunk_cache::ChunkCache;
use super::meta::{Meta, MetaError, VolumeKeys};
use super::meta_cache::MetaCache;
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

/// A file handle the kernel holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Handle {
    ino: u64,
    /// Opened through a peer that died before it handed the connection
    /// over: what it had not committed is lost, which the next flush or
    /// fsync reports.
    lost: bool,
}

/// Who served a mount's FUSE connection before this peer took it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predecessor {
    /// Nobody: this peer mounted it.
    None,
    /// A peer that committed everything before it handed the connection
    /// over.
    HandedOver,
    /// A peer that died: the handles it opened may have lost writes.
    Died,
}

/// The first file handle of a mount: random high bits, so a mount that
/// takes a connection over never gives out a handle its predecessor gave.
fn first_handle() -> u64 {
    (u64::from(rand::random::<u32>()) << 32) | 1
}

/// An open file's state, shared by all its handles.
type SharedFile = Arc<tokio::sync::Mutex<OpenFile>>;

/// A file open on this mount, shared by all its handles.
#[derive(Debug)]
struct OpenFile {
    /// The working copy: committed state plus buffered writes.
    inode: Inode,
    /// The version the working copy is based on.
    version: u64,
    /// Chunks written since the last commit: whole plaintext, by index.
    dirty: BTreeMap<u64, Vec<u8>>,
    /// Chunks on their way to the cluster, with their plaintext.
    uploading: BTreeMap<u64, Upload>,
    /// Whether the working copy differs from the committed version.
    changed: bool,
    /// Uploads that a later write or a truncate made useless: their chunks
    /// go once they land (see [`reclaim`]).
    discarded: Vec<JoinHandle<Result<ChunkRef, Errno>>>,
    /// Chunks the working copy stopped naming that its next commit frees.
    dropped: Vec<Address>,
    /// Bytes the committed version stores (for usage accounting).
    committed_bytes: u64,
    /// Where the last read ended, to detect sequential reading.
    last_read_end: u64,
}

impl OpenFile {
    /// Records a write that ended at `end`.
    fn written(&mut self, end: u64) {
        self.inode.size = self.inode.size.max(end);
        self.inode.mtime = super::now();
        self.changed = true;
    }

    /// A file opened at its committed version.
    fn at(inode: Inode, version: u64) -> Self {
        Self {
            committed_bytes: inode.stored_bytes(),
            inode,
            version,
            dirty: BTreeMap::new(),
            uploading: BTreeMap::new(),
            changed: false,
            discarded: Vec::new(),
            dropped: Vec::new(),
            last_read_end: 0,
        }
    }
}

/// A structure as last read or written: its version, and when.
type Cached<T> = (T, u64, Instant);

/// Entries a cache of inodes or shards grows to before those older than
/// [`ATTR_TTL`] (which nothing answers from) are dropped.
const CACHED: usize = 16_384;

/// After an insert that grew a cache: drops, each time its size reaches a
/// power of two past [`CACHED`], the entries too old to answer from,
/// except those `keep` says never change.
fn prune<K, T>(cache: &mut HashMap<K, Cached<T>>, keep: impl Fn(&T) -> bool) {
    if cache.len() > CACHED && cache.len().is_power_of_two() {
        cache.retain(|_, (value, _, at)| keep(value) || at.elapsed() < ATTR_TTL);
    }
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
    /// The mount's copy of the metadata blocks, write-back while it has
    /// the volume alone.
    cache: Arc<MetaCache>,
    blocks: Arc<Blocks>,
    disk_cache: Arc<ChunkCache>,
    read_only: bool,
    inodes: Mutex<HashMap<u64, Cached<Inode>>>,
    shards: Mutex<HashMap<ShardId, Cached<Arc<Shard>>>>,
    chunks: Mutex<lru::LruCache<Address, Bytes>>,
    fetching: Mutex<HashMap<Address, ChunkFuture>>,
    /// Open files, with how many uses hold each: counted under this lock,
    /// so an open never joins a state that its last release is forgetting.
    files: Mutex<HashMap<u64, (usize, SharedFile)>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Who served this mount's FUSE connection before this peer.
    predecessor: Predecessor,
    listings: Mutex<HashMap<u64, Listing>>,
    /// Inode versions whose data the kernel's page cache holds.
    page_cache: Mutex<HashMap<u64, u64>>,
    next_handle: AtomicU64,
    usage: Mutex<UsageState>,
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Chunks no file names any more, until they can be released.
    unreferenced: Mutex<reclaim::Unreferenced>,
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
        predecessor: Predecessor,
    ) -> Arc<Self> {
        let meta = volumes.meta(&record);
        let owner = meta.keys().data.writer().public();
        let cache = MetaCache::new(
            record.name.clone(),
            meta.clone(),
            blocks.me().0,
            super::boot_id(),
        );
        Arc::new(Self {
            record: Mutex::new(record),
            volumes,
            meta,
            cache,
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
            predecessor,
            listings: Mutex::default(),
            page_cache: Mutex::default(),
            next_handle: AtomicU64::new(first_handle()),
            usage: Mutex::default(),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT)),
            unreferenced: Mutex::default(),
            owner,
        })
    }

    pub fn name(&self) -> String {
        self.record.lock().expect("record").name.clone()
    }

    /// Joins the volume's mounts, checks the volume is readable (its root
    /// exists) and loads usage.
    pub async fn start(&self) -> Result<(), Errno> {
        self.cache.start().await.map_err(meta_errno)?;
        self.inode(ROOT_INO).await?;
        self.sync_usage().await;
        Ok(())
    }

    /// Commits everything, frees the chunks that leaves unnamed, and
    /// leaves the volume's mounts (unmount).
    /// Commits everything and leaves the volume's session table; returns
    /// whether everything acknowledged is committed.
    pub async fn stop(&self) -> bool {
        let committed = self.commit_all().await;
        self.reclaim().await;
        self.cache.stop().await && committed
    }

    /// Makes every change made so far durable on its quorum.
    pub async fn barrier(&self) -> Result<(), Errno> {
        self.cache.barrier().await.map_err(meta_errno)
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
            self.cache
                .read::<Usage>(USAGE)
                .await
                .map(|r| r.map(|(u, _)| u))
        } else {
            self.cache
                .update::<Usage, _>(USAGE, |cur: Option<&Usage>| {
                    let mut u = cur.copied().unwrap_or_default();
                    u.add(pending);
                    (Some(u), ())
                })
                .await
                .map(|(_, now)| now.map(|(u, _)| u))
        };
        match result {
            Ok(total) => {
                self.usage.lock().expect("usage").total = total.map(|u| *u).unwrap_or_default()
            }
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

    fn cache_inode(&self, inode: &Inode, version: u64) {
        let mut inodes = self.inodes.lock().expect("inodes");
        if inodes
            .insert(inode.ino, (inode.clone(), version, Instant::now()))
            .is_none()
        {
            prune(&mut inodes, |_| false);
        }
    }

    /// The committed inode and its version, fresh from its quorum (or the
    /// mount's copy, while it holds the volume).
    async fn read_inode(&self, ino: u64) -> Result<(Inode, u64), Errno> {
        match self
            .cache
            .read::<Inode>(&Self::inode_name(ino))
            .await
            .map_err(meta_errno)?
        {
            Some((inode, version)) => {
                let inode = Arc::unwrap_or_clone(inode);
                self.cache_inode(&inode, version);
                Ok((inode, version))
            }
            None => Err(Errno::ENOENT),
        }
    }

    /// The inode as this mount sees it: an open file's working copy, else a
    /// cached copy younger than [`ATTR_TTL`], else fresh.
    /// [`Self::inode`] if memory answers for it now, without waiting.
    pub fn inode_held(&self, ino: u64) -> Option<Result<Inode, Errno>> {
        let open = self.open_state(ino);
        if let Some(file) = open {
            return Some(Ok(file.try_lock().ok()?.inode.clone()));
        }
        if let Some((inode, _, at)) = self.inodes.lock().expect("inodes").get(&ino)
            && at.elapsed() < ATTR_TTL
        {
            return Some(Ok(inode.clone()));
        }
        Some(match self.cache.held::<Inode>(&Self::inode_name(ino))? {
            Some((inode, version)) => {
                let inode = Arc::unwrap_or_clone(inode);
                self.cache_inode(&inode, version);
                Ok(inode)
            }
            None => Err(Errno::ENOENT),
        })
    }

    pub async fn inode(&self, ino: u64) -> Result<Inode, Errno> {
        let open = self.open_state(ino);
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
        let open = self.open_state(ino);
        if let Some(file) = &open {
            self.commit_file(ino, file).await?;
        }
        let (result, now) = self
            .cache
            .update::<Inode, _>(&Self::inode_name(ino), |cur: Option<&Inode>| {
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
        let (inode, version) = now.ok_or(Errno::ENOENT)?;
        let inode = Arc::unwrap_or_clone(inode);
        self.cache_inode(&inode, version);
        if let Some(file) = open {
            let mut f = file.lock().await;
            let mut next = inode.clone();
            if f.changed {
                // A write landed since the commit above: keep its content.
                next.content = std::mem::replace(&mut f.inode.content, Content::Dir);
                next.size = f.inode.size;
            }
            f.inode = next;
            f.version = version;
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

    // ---- attributes --------------------------------------------------------

    pub async fn setattr(
        &self,
        ino: u64,
        change: impl Fn(&mut Inode) -> Result<(), Errno>,
    ) -> Result<Inode, Errno> {
        self.update_inode(ino, change).await
    }

    /// After a write or truncate by an unprivileged caller (the kernel
    /// leaves this to Shoal, so that it need not ask for the file's
    /// capabilities before every write): drops the file's setuid, setgid
    /// and capabilities, if it has any. Whether it had.
    pub async fn drop_privileges(&self, ino: u64) -> Result<bool, Errno> {
        let open = self.open_state(ino);
        let privileged = match open {
            Some(file) => file.lock().await.inode.has_privileges(),
            None => self.inode(ino).await?.has_privileges(),
        };
        if privileged {
            self.update_inode(ino, |i| {
                i.drop_privileges();
                Ok(())
            })
            .await?;
        }
        Ok(privileged)
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
            let keep = size % CHUNK_SIZE;
            let last = size / CHUNK_SIZE;
            let cut = f.uploading.split_off(&last);
            for (index, (data, task)) in cut {
                f.discarded.push(task);
                if index == last && keep > 0 {
                    let mut data = data.to_vec();
                    data.truncate(keep as usize);
                    f.dirty.insert(last, data);
                }
            }
            if let Some(chunk) = f.dirty.get_mut(&last) {
                chunk.truncate(keep as usize);
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
}
