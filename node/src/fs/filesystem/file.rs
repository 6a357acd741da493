//! Open files: buffered writes, chunk uploads and fetches, read-ahead and
//! the commit that makes a file's new content current.

use super::*;

impl VolumeFs {
    // ---- files ---------------------------------------------------------------

    /// The open state of `ino`, loaded fresh from its quorum if no handle
    /// has it open (close-to-open: an open sees every close before it).
    pub(super) async fn open_file(&self, ino: u64) -> Result<SharedFile, Errno> {
        if let Some((uses, file)) = self.files.lock().expect("files").get_mut(&ino) {
            *uses += 1;
            return Ok(file.clone());
        }
        let (inode, version) = self.read_inode(ino).await?;
        let file = Arc::new(tokio::sync::Mutex::new(OpenFile::at(inode, version)));
        // Another open may have won the race: then share its state.
        let mut files = self.files.lock().expect("files");
        let (uses, file) = files.entry(ino).or_insert((0, file));
        *uses += 1;
        Ok(file.clone())
    }

    /// The state of `ino` if it is open here.
    pub(super) fn open_state(&self, ino: u64) -> Option<SharedFile> {
        let files = self.files.lock().expect("files");
        files.get(&ino).map(|(_, file)| file.clone())
    }

    /// Drops one use of an open file; the last one forgets it, unless it
    /// holds changes not yet committed.
    pub(super) async fn release_file(&self, ino: u64, file: &SharedFile) {
        let mut f = file.lock().await;
        let mut files = self.files.lock().expect("files");
        let Some((uses, _)) = files.get_mut(&ino) else {
            return;
        };
        *uses = uses.saturating_sub(1);
        if *uses == 0 && !f.changed {
            files.remove(&ino);
            drop(files);
            self.cache_inode(&f.inode, f.version);
            if f.inode.nlink == 0 {
                // The last handle on an unlinked file: nothing names its
                // chunks any more.
                let mut gone = std::mem::take(&mut f.dropped);
                gone.extend(f.inode.chunk_addresses());
                self.unreferenced(gone);
            }
        }
    }

    /// A new handle on `ino`, whose open state already counts it.
    pub(super) fn new_handle(&self, ino: u64) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .expect("handles")
            .insert(fh, Handle { ino, lost: false });
        fh
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
            (f.inode.kind, f.version)
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
        Ok((self.new_handle(ino), keep))
    }

    /// The open file behind a handle this mount knows.
    pub(super) fn known_handle(&self, fh: u64) -> Result<(u64, SharedFile), Errno> {
        let ino = self
            .handles
            .lock()
            .expect("handles")
            .get(&fh)
            .ok_or(Errno::EBADF)?
            .ino;
        let file = self.open_state(ino).ok_or(Errno::EBADF)?;
        Ok((ino, file))
    }

    /// The open file behind handle `fh` on `ino`. A handle this mount does
    /// not know, on a connection taken over from an earlier peer, was
    /// opened through that peer: it is adopted, the file opened afresh.
    pub(super) async fn handle(&self, ino: u64, fh: u64) -> Result<(u64, SharedFile), Errno> {
        match self.known_handle(fh) {
            Err(Errno::EBADF) if self.predecessor != Predecessor::None => {}
            known => return known,
        }
        let file = self.open_file(ino).await?;
        let lost = self.predecessor == Predecessor::Died;
        let adopted = {
            let mut handles = self.handles.lock().expect("handles");
            match handles.get(&fh) {
                // Adopted meanwhile by a concurrent request.
                Some(h) => Some(h.ino),
                None => {
                    handles.insert(fh, Handle { ino, lost });
                    None
                }
            }
        };
        if let Some(theirs) = adopted {
            self.release_file(ino, &file).await;
            return Ok((theirs, self.open_state(theirs).ok_or(Errno::EBADF)?));
        }
        info!(ino, fh, lost, "adopted a file handle of the previous peer");
        Ok((ino, file))
    }

    /// Whether what was written through `fh` before the peer that opened
    /// it died may be lost; reported once, as the kernel reports a
    /// write-back error.
    fn take_lost(&self, fh: u64) -> bool {
        let mut handles = self.handles.lock().expect("handles");
        handles
            .get_mut(&fh)
            .is_some_and(|h| std::mem::take(&mut h.lost))
    }

    /// Encrypts and stores one chunk in the background, once one of the
    /// mount's upload slots is free (writers wait: backpressure).
    pub(super) async fn upload(&self, data: Arc<Vec<u8>>) -> JoinHandle<Result<ChunkRef, Errno>> {
        let blocks = self.blocks.clone();
        let key = self.meta.keys().data.clone();
        let owner = self.owner;
        let replicas = self.record.lock().expect("record").replicas as usize;
        let slot = self.upload_slots.clone().acquire_owned().await;
        tokio::spawn(async move {
            let _slot = slot;
            let mut nonce = [0u8; NONCE_LEN];
            rand::fill(&mut nonce);
            let sealed = Bytes::from(key.seal_data(nonce, &data));
            let address = blocks
                .put_owned(sealed, Some(owner), Some(replicas))
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
    pub(super) fn chunk(&self, chunk: ChunkRef) -> ChunkFuture {
        if let Some(data) = self.chunks.lock().expect("chunks").get(&chunk.address) {
            let data = data.clone();
            return async move { Ok(data) }.boxed().shared();
        }
        let mut fetching = self.fetching.lock().expect("fetching");
        if let Some(f) = fetching.get(&chunk.address) {
            return f.clone();
        }
        let blocks = self.blocks.clone();
        let key = self.meta.keys().data.clone();
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

    pub(super) async fn chunk_data(&self, chunk: ChunkRef) -> Result<Bytes, Errno> {
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
    pub(super) fn read_ahead(self: &Arc<Self>, refs: Vec<ChunkRef>) {
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

    /// Copies into `out` (file bytes from `offset`) what memory holds:
    /// inline data, buffered writes and cached chunks. Returns the chunks
    /// still to fetch, by index.
    fn copy_held(
        &self,
        f: &OpenFile,
        offset: u64,
        out: &mut [u8],
    ) -> Result<Vec<(u64, ChunkRef)>, Errno> {
        let mut fetch = Vec::new();
        match &f.inode.content {
            Content::Inline(data) => copy_from_chunk(0, Some(data), offset, out),
            Content::Chunks(chunks) => {
                let mut cache = self.chunks.lock().expect("chunks");
                for index in chunk_span(offset, out.len() as u64) {
                    if let Some(data) = f.dirty.get(&index) {
                        copy_from_chunk(index, Some(data), offset, out);
                    } else if let Some((data, _)) = f.uploading.get(&index) {
                        copy_from_chunk(index, Some(data), offset, out);
                    } else if let Some(chunk) = chunks.get(&index) {
                        match cache.get(&chunk.address) {
                            Some(data) => {
                                let valid = &data[..(chunk.len as usize).min(data.len())];
                                copy_from_chunk(index, Some(valid), offset, out);
                            }
                            None => fetch.push((index, *chunk)),
                        }
                    }
                }
            }
            Content::Symlink(_) | Content::Dir => return Err(Errno::EINVAL),
        }
        Ok(fetch)
    }

    /// A read answered at once from memory, without a task: `None` if it
    /// needs a fetch, starts a sequential run (read-ahead), or the file is
    /// busy.
    pub fn read_held(&self, fh: u64, offset: u64, size: u32) -> Option<Vec<u8>> {
        let (_, file) = self.known_handle(fh).ok()?;
        let mut f = file.try_lock().ok()?;
        let end = (offset + u64::from(size)).min(f.inode.size);
        if offset >= end {
            return Some(Vec::new());
        }
        if offset == f.last_read_end && offset > 0 {
            return None;
        }
        let mut out = vec![0u8; (end - offset) as usize];
        if !self.copy_held(&f, offset, &mut out).ok()?.is_empty() {
            return None;
        }
        f.last_read_end = end;
        Some(out)
    }

    pub async fn read(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let (_, file) = self.handle(ino, fh).await?;
        let mut out;
        let fetch;
        {
            let mut f = file.lock().await;
            let end = (offset + u64::from(size)).min(f.inode.size);
            if offset >= end {
                return Ok(Vec::new());
            }
            out = vec![0u8; (end - offset) as usize];
            fetch = self.copy_held(&f, offset, &mut out)?;
            if let Content::Chunks(chunks) = &f.inode.content
                && offset == f.last_read_end
                && offset > 0
            {
                let next = chunk_span(end, READ_AHEAD * CHUNK_SIZE);
                let ahead = chunks.range(next).map(|(_, c)| *c).collect();
                self.read_ahead(ahead);
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

    pub async fn write(&self, ino: u64, fh: u64, offset: u64, data: Vec<u8>) -> Result<u32, Errno> {
        self.writable()?;
        let (_, file) = self.handle(ino, fh).await?;
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
                .filter_map(|i| f.inode.chunk(i))
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
                inline[offset as usize..end as usize].copy_from_slice(&data);
                f.written(end);
                return Ok(data.len() as u32);
            }
            let inline = std::mem::take(inline);
            f.inode.content = Content::Chunks(BTreeMap::new());
            if !inline.is_empty() {
                f.dirty.insert(0, inline);
            }
        }
        if offset.is_multiple_of(CHUNK_SIZE) && data.len() as u64 == CHUNK_SIZE {
            // One whole chunk (a sequential writer's usual request): it goes
            // out as it came, with no copy into a buffer.
            let index = offset / CHUNK_SIZE;
            f.dirty.remove(&index);
            self.start_upload(&mut f, index, Arc::new(data)).await;
            f.written(end);
            return Ok(CHUNK_SIZE as u32);
        }
        for index in chunk_span(offset, data.len() as u64) {
            let chunk_start = index * CHUNK_SIZE;
            let from = offset.max(chunk_start);
            let to = end.min(chunk_start + CHUNK_SIZE);
            if !f.dirty.contains_key(&index) {
                let existing = if let Some((d, task)) = f.uploading.remove(&index) {
                    f.discarded.push(task);
                    d.to_vec()
                } else if !partial(index) {
                    Vec::new()
                } else if let Some(chunk) = f.inode.chunk(index) {
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
                self.start_upload(&mut f, index, data).await;
            }
        }
        while f.dirty.len() > MAX_DIRTY {
            let (index, data) = f.dirty.pop_first().expect("non-empty");
            self.start_upload(&mut f, index, Arc::new(data)).await;
        }
        f.written(end);
        Ok(data.len() as u32)
    }

    /// Starts the upload of chunk `index` of an open file; an upload of
    /// the same chunk still on its way is of no use any more.
    async fn start_upload(&self, f: &mut OpenFile, index: u64, data: Arc<Vec<u8>>) {
        let task = self.upload(data.clone()).await;
        if let Some((_, stale)) = f.uploading.insert(index, (data, task)) {
            f.discarded.push(stale);
        }
    }

    /// Makes an open file's changes durable: uploads what is buffered, then
    /// writes the inode's new content in one version, re-applied on top of
    /// any attribute change another mount made meanwhile.
    pub(super) async fn commit_file(&self, ino: u64, file: &SharedFile) -> Result<(), Errno> {
        let mut f = file.lock().await;
        if !f.changed {
            return Ok(());
        }
        let dirty: Vec<(u64, Arc<Vec<u8>>)> = std::mem::take(&mut f.dirty)
            .into_iter()
            .map(|(i, d)| (i, Arc::new(d)))
            .collect();
        for (index, data) in dirty {
            self.start_upload(&mut f, index, data).await;
        }
        let mut dropped = std::mem::take(&mut f.dropped);
        for task in std::mem::take(&mut f.discarded) {
            if let Ok(Ok(chunk)) = task.await {
                dropped.push(chunk.address);
            }
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
            for (index, chunk) in uploaded {
                if let Some(replaced) = chunks.insert(index, chunk) {
                    dropped.push(replaced.address);
                }
            }
        }
        if let Some(e) = failed {
            f.dropped = dropped;
            return Err(e);
        }
        if f.inode.nlink == 0 {
            // Unlinked: its chunks go with its last handle.
            f.dropped = dropped;
            f.changed = false;
            return Ok(());
        }
        let ours = f.inode.clone();
        let committed = self
            .cache
            .update::<Inode, _>(&Self::inode_name(ino), |cur: Option<&Inode>| {
                let Some(cur) = cur else {
                    return (Some(ours.clone()), Vec::new());
                };
                let mut next = cur.clone();
                next.content = ours.content.clone();
                next.size = ours.size;
                next.mtime = ours.mtime;
                next.ctime = crate::fs::now();
                let replaced = cur.chunks_dropped_by(&next);
                (Some(next), replaced)
            })
            .await;
        let (replaced, now) = match committed {
            Ok((replaced, Some(now))) => (replaced, now),
            failed => {
                f.dropped = dropped;
                return Err(failed.map_or_else(meta_errno, |_| Errno::EIO));
            }
        };
        let (inode, version) = now;
        let inode = Arc::unwrap_or_clone(inode);
        dropped.extend(replaced);
        if !dropped.is_empty() {
            let named: std::collections::HashSet<Address> = inode.chunk_addresses().collect();
            dropped.retain(|a| !named.contains(a));
            dropped.sort_unstable();
            dropped.dedup();
            self.unreferenced(dropped);
        }
        let stored = inode.stored_bytes();
        self.add_usage(Usage {
            bytes: stored as i64 - f.committed_bytes as i64,
            files: 0,
        });
        f.committed_bytes = stored;
        self.cache_inode(&inode, version);
        self.page_cache
            .lock()
            .expect("page cache")
            .insert(ino, version);
        f.inode = inode;
        f.version = version;
        f.changed = false;
        Ok(())
    }

    /// flush: commit the file behind a handle.
    pub async fn commit(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        let (ino, file) = self.handle(ino, fh).await?;
        self.commit_file(ino, &file).await?;
        if self.take_lost(fh) {
            warn!(ino, "writes made before the previous peer died may be lost");
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// fsync: commit the file and make it durable, with every metadata
    /// change before it (its name included).
    pub async fn fsync(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        self.commit(ino, fh).await?;
        self.barrier().await
    }

    /// Closes a handle, committing what is left.
    pub async fn release(&self, ino: u64, fh: u64) -> Result<(), Errno> {
        if self.predecessor != Predecessor::None {
            // A handle of the previous peer is adopted to be closed.
            self.handle(ino, fh).await?;
        }
        let Some(Handle { ino, .. }) = self.handles.lock().expect("handles").remove(&fh) else {
            return Err(Errno::EBADF);
        };
        let Some(file) = self.open_state(ino) else {
            return Ok(());
        };
        let result = self.commit_file(ino, &file).await;
        self.release_file(ino, &file).await;
        result
    }

    /// Commits every open file and makes every change durable (before an
    /// unmount or a snapshot); returns whether all of it is.
    pub async fn commit_all(&self) -> bool {
        let mut ok = true;
        let files: Vec<_> = self
            .files
            .lock()
            .expect("files")
            .iter()
            .map(|(i, (_, f))| (*i, f.clone()))
            .collect();
        for (ino, file) in files {
            if let Err(e) = self.commit_file(ino, &file).await {
                warn!("commit of inode {ino} before unmount: {e:?}");
                ok = false;
            }
        }
        self.sync_usage().await;
        if let Err(e) = self.barrier().await {
            warn!("metadata commit: {e:?}");
            ok = false;
        }
        ok
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match self.inode(ino).await?.content {
            Content::Symlink(target) => Ok(target),
            _ => Err(Errno::EINVAL),
        }
    }
}
