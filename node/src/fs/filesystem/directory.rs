//! Directories and the namespace: shards, lookups, creates, links,
//! renames and listings.

use super::*;

impl VolumeFs {
    // ---- directories -----------------------------------------------------

    pub(super) fn name_hash(&self, name: &[u8]) -> u64 {
        self.meta.keys().key.name_hash(name)
    }

    /// The leaf shard a name belongs to, as far as cached splits tell.
    pub(super) fn leaf_id(&self, dir: u64, hash: u64) -> ShardId {
        let shards = self.shards.lock().expect("shards");
        let mut id = ShardId::root(dir);
        while let Some((shard, _, _)) = shards.get(&id)
            && let Shard::Split { generation } = **shard
        {
            id = id.child(hash, generation);
        }
        id
    }

    pub(super) fn cache_shard(&self, id: ShardId, shard: &Arc<Shard>, version: u64) {
        let mut shards = self.shards.lock().expect("shards");
        if shards
            .insert(id, (shard.clone(), version, Instant::now()))
            .is_none()
        {
            // Split shards never change, and lead lookups to their leaves.
            prune(&mut shards, |s| matches!(**s, Shard::Split { .. }));
        }
    }

    /// Reads one shard, from cache when allowed (split shards never change).
    pub(super) async fn shard(
        &self,
        id: ShardId,
        fresh: bool,
    ) -> Result<Option<Arc<Shard>>, Errno> {
        if let Some((shard, _, at)) = self.shards.lock().expect("shards").get(&id)
            && (matches!(**shard, Shard::Split { .. }) || (!fresh && at.elapsed() < ATTR_TTL))
        {
            return Ok(Some(shard.clone()));
        }
        match self
            .cache
            .read::<Shard>(&id.salt_input())
            .await
            .map_err(meta_errno)?
        {
            Some((shard, version)) => {
                self.cache_shard(id, &shard, version);
                Ok(Some(shard))
            }
            None => Ok(None),
        }
    }

    /// The entry `name` in directory `dir`.
    pub(super) async fn entry(
        &self,
        dir: u64,
        name: &[u8],
        fresh: bool,
    ) -> Result<Option<DirEntry>, Errno> {
        let hash = self.name_hash(name);
        for _ in 0..64 {
            let id = self.leaf_id(dir, hash);
            match self.shard(id, fresh).await?.as_deref() {
                Some(Shard::Split { .. }) => continue,
                Some(Shard::Leaf(entries)) => return Ok(entries.get(name).copied()),
                None => return Ok(None),
            }
        }
        Err(Errno::EIO)
    }

    /// Applies `change` to the entries of the leaf holding `name`, re-applied
    /// on conflicts; splits the leaf afterwards if it grew too large.
    pub(super) async fn update_dir<R>(
        &self,
        dir: u64,
        name: &[u8],
        change: impl Fn(&mut BTreeMap<Vec<u8>, DirEntry>) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        self.writable()?;
        let hash = self.name_hash(name);
        for _ in 0..64 {
            let id = self.leaf_id(dir, hash);
            let (result, now) = self
                .cache
                .update::<Shard, _>(&id.salt_input(), |cur: Option<&Shard>| match cur {
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
            if let Some((shard, version)) = &now {
                self.cache_shard(id, shard, *version);
            }
            match result {
                // The leaf split under us: follow it.
                None => continue,
                Some(result) => {
                    if let Some((shard, version)) = now
                        && shard.should_split(id.depth)
                    {
                        self.split(id, shard, version).await?;
                    }
                    return result;
                }
            }
        }
        Err(Errno::EIO)
    }

    /// Splits a leaf in two (see [`shoal_core::fs::dir`]).
    pub(super) async fn split(
        &self,
        id: ShardId,
        leaf: Arc<Shard>,
        generation: u64,
    ) -> Result<(), Errno> {
        let halves = leaf.split(&id, |n| self.name_hash(n));
        let children = id.children(generation);
        let names = children.map(|c| c.salt_input());
        let created = futures::future::join_all(
            names
                .iter()
                .zip(&halves)
                .map(|(name, half)| self.cache.create(name, half)),
        )
        .await;
        for c in created {
            c.map_err(meta_errno)?;
        }
        let (_, now) = self
            .cache
            .update::<Shard, _>(&id.salt_input(), |cur: Option<&Shard>| {
                if cur == Some(&*leaf) {
                    (Some(Shard::Split { generation }), ())
                } else {
                    (None, ())
                }
            })
            .await
            .map_err(meta_errno)?;
        if let Some((shard, version)) = now {
            self.cache_shard(id, &shard, version);
        }
        Ok(())
    }

    /// Every entry of a directory, fresh from its shards.
    pub(super) async fn list(&self, dir: u64) -> Result<Vec<(Vec<u8>, DirEntry)>, Errno> {
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
                match shard?.as_deref() {
                    Some(Shard::Leaf(entries)) => {
                        out.extend(entries.iter().map(|(n, e)| (n.clone(), *e)))
                    }
                    Some(Shard::Split { generation }) => next.extend(id.children(*generation)),
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
    /// [`Self::lookup`] if memory answers for it now, without waiting.
    pub fn lookup_held(&self, parent: u64, name: &[u8]) -> Option<Result<Inode, Errno>> {
        if name.len() > NAME_MAX {
            return Some(Err(Errno::ENAMETOOLONG));
        }
        let id = self.leaf_id(parent, self.name_hash(name));
        let fresh = self
            .shards
            .lock()
            .expect("shards")
            .get(&id)
            .filter(|(_, _, at)| at.elapsed() < ATTR_TTL)
            .map(|(shard, _, _)| shard.clone());
        let shard = match fresh {
            Some(shard) => shard,
            None => {
                let (shard, version) = self.cache.held::<Shard>(&id.salt_input())??;
                self.cache_shard(id, &shard, version);
                shard
            }
        };
        match &*shard {
            Shard::Leaf(entries) => match entries.get(name) {
                Some(entry) => self.inode_held(entry.ino),
                None => Some(Err(Errno::ENOENT)),
            },
            // Split since it was cached: the slow path follows it.
            Shard::Split { .. } => None,
        }
    }

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

    pub(super) fn insert_entry(
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
    pub(super) async fn add_entry_and_inode(
        &self,
        parent: u64,
        name: &[u8],
        inode: &Inode,
    ) -> Result<u64, Errno> {
        let entry = DirEntry {
            ino: inode.ino,
            kind: inode.kind,
        };
        // Both writes go out together: an entry whose inode is missing reads
        // as absent, so the order in which they land does not matter.
        let inode_name = Self::inode_name(inode.ino);
        let (created, inserted) = futures::join!(
            self.cache.create_unique(&inode_name, inode),
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
        let inode = Inode::new(
            crate::fs::new_ino(),
            Kind::File,
            mode,
            uid,
            gid,
            crate::fs::now(),
        );
        let version = match self.add_entry_and_inode(parent, name, &inode).await {
            Ok(version) => version,
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
        self.cache_inode(&inode, version);
        let file = OpenFile::at(inode.clone(), version);
        self.files
            .lock()
            .expect("files")
            .insert(inode.ino, (1, Arc::new(tokio::sync::Mutex::new(file))));
        let fh = self.new_handle(inode.ino);
        Ok((inode, fh))
    }

    /// Drops one link to `ino` (an unlink, or a rename over it).
    pub(super) async fn drop_link(&self, ino: u64) -> Result<(), Errno> {
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
                // An open file keeps its chunks until its last handle goes.
                if self.open_state(ino).is_none() {
                    self.unreferenced(inode.chunk_addresses().collect());
                }
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
            // The new name lands before the old one goes, even when the
            // mount commits in batches: a crash leaves both, never neither.
            self.barrier().await?;
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
        let listing = self.listing(ino).await?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.listings.lock().expect("listings").insert(fh, listing);
        Ok(fh)
    }

    /// What listing directory `ino` returns, as of now.
    async fn listing(&self, ino: u64) -> Result<Listing, Errno> {
        let inode = self.inode(ino).await?;
        if inode.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(Arc::new(self.list(ino).await?))
    }

    /// The listing of directory handle `fh` on `ino`. One this mount does
    /// not know, on a connection taken over from an earlier peer, was
    /// opened through that peer: the directory is listed afresh.
    async fn open_listing(&self, ino: u64, fh: u64) -> Result<Listing, Errno> {
        if let Some(listing) = self.listings.lock().expect("listings").get(&fh) {
            return Ok(listing.clone());
        }
        if self.predecessor == Predecessor::None {
            return Err(Errno::EBADF);
        }
        let listing = self.listing(ino).await?;
        Ok(self
            .listings
            .lock()
            .expect("listings")
            .entry(fh)
            .or_insert(listing)
            .clone())
    }

    /// Entries of an open directory from `offset` on, with their inodes
    /// fetched in parallel batches (directory prefetch). Entries whose
    /// inode does not exist (yet) are left out.
    pub async fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: usize,
        count: usize,
        with_attrs: bool,
    ) -> Result<Vec<(Vec<u8>, DirEntry, Option<Inode>)>, Errno> {
        let listing = self.open_listing(ino, fh).await?;
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
}
