//! Snapshots: a volume's metadata frozen into an image that refers to the
//! volume's chunks. Taking one reads every inode and directory shard once
//! (in parallel) and copies no file data, so its cost follows the number
//! of files, not their size.
//!
//! A snapshot is consistent per file (each inode as last committed), not
//! across files that change while it is taken: like a crash, it sees what
//! writers had committed by then.

use std::collections::{BTreeMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use shoal_core::Address;
use shoal_core::fs::inode::ROOT_INO;
use shoal_core::fs::volume::check_name;
use shoal_core::fs::{Inode, Kind, Shard, ShardId, SnapshotRecord, Usage, VolumeKey, VolumeRecord};

use super::image::Image;
use super::meta::{Meta, VolumeKeys};
use super::volumes::{Member, SNAPSHOT_CATALOGUE, USAGE, VolumeError, Volumes};

/// Blocks read at once while capturing a volume.
const CAPTURE_PARALLEL: usize = 64;

fn snapshot_name(name: &str) -> Vec<u8> {
    format!("snapshot/{name}").into_bytes()
}

impl Volumes {
    /// The live snapshot `name`.
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotRecord, VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        self.live(&snapshot_name(name))
            .await?
            .ok_or_else(|| VolumeError::SnapshotNotFound(name.into()))
    }

    /// Every live snapshot, by name.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, VolumeError> {
        let names = self.names(SNAPSHOT_CATALOGUE).await?;
        let found = futures::future::join_all(names.iter().map(|n| self.snapshot(n))).await;
        found
            .into_iter()
            .filter_map(|r| match r {
                Err(VolumeError::SnapshotNotFound(_)) => None,
                other => Some(other),
            })
            .collect()
    }

    /// Takes snapshot `name` of volume `source`. Taking it again of the same
    /// volume returns the first one.
    pub async fn create_snapshot(
        &self,
        name: &str,
        source: &str,
    ) -> Result<SnapshotRecord, VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        match self.snapshot(name).await {
            Ok(s) if s.source == source => return Ok(s),
            Ok(s) => return Err(VolumeError::SnapshotExists(name.into(), s.source)),
            Err(VolumeError::SnapshotNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let volume = self.get(source).await?;
        // Held by the lineage first, so deleting the volume meanwhile
        // cannot free the chunks the image refers to.
        self.lineage(&volume.data, Member::Snapshot(name), true)
            .await?;
        let (image, usage) = self.capture(&volume).await?;
        let now = super::now();
        let record = SnapshotRecord {
            name: name.to_string(),
            id: rand::random(),
            source: source.to_string(),
            source_id: volume.id,
            data: volume.data,
            image,
            bytes: usage.bytes.max(0) as u64,
            files: usage.files.max(0) as u64,
            size: volume.size,
            replicas: volume.replicas,
            created: now.secs,
            created_nanos: now.nanos,
            deleted: false,
        };
        let (winner, _) = self
            .registry()?
            .update::<SnapshotRecord, _>(
                &snapshot_name(name),
                None,
                |cur: Option<&SnapshotRecord>| match cur {
                    Some(s) if !s.deleted => (None, Some(s.clone())),
                    _ => (Some(record.clone()), None),
                },
            )
            .await?;
        match winner {
            // Someone took it at the same time.
            Some(s) if s.source == source => return Ok(s),
            Some(s) => return Err(VolumeError::SnapshotExists(name.into(), s.source)),
            None => {}
        }
        self.catalogue(SNAPSHOT_CATALOGUE, name, true).await?;
        Ok(record)
    }

    /// Deletes snapshot `name`; its chunks go when nothing else in its
    /// lineage uses them. Returns the blocks and bytes freed.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(u64, u64), VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        let found = self.bury::<SnapshotRecord>(&snapshot_name(name)).await?;
        let Some(snapshot) = found else {
            return Err(VolumeError::SnapshotNotFound(name.into()));
        };
        self.catalogue(SNAPSHOT_CATALOGUE, name, false).await?;
        self.lineage(&snapshot.data, Member::Snapshot(name), false)
            .await
    }

    /// Writes an image of `volume`'s metadata as it is now: every inode
    /// reachable from the root, every directory shard, and the usage
    /// counter. Returns the image's address and the usage it holds.
    pub(super) async fn capture(
        &self,
        volume: &VolumeRecord,
    ) -> Result<(Address, Usage), VolumeError> {
        // Join the volume's mounts for the walk: a mount that holds the
        // volume alone commits what it keeps write-back, and shares it.
        let session = super::meta_cache::MetaCache::new(
            volume.name.clone(),
            self.meta(volume),
            self.blocks().me().0,
            super::boot_id(),
        );
        session.start().await?;
        let captured = self.walk(volume).await;
        session.stop().await;
        captured
    }

    /// Every metadata block of the volume, frozen into an image.
    async fn walk(&self, volume: &VolumeRecord) -> Result<(Address, Usage), VolumeError> {
        let meta = self.meta(volume);
        let mut entries = BTreeMap::new();
        let usage = match meta.read::<Usage>(USAGE).await? {
            Some((usage, _)) => {
                entries.insert(USAGE.to_vec(), usage.to_bytes());
                usage
            }
            None => Usage::default(),
        };
        let mut seen = HashSet::from([ROOT_INO]);
        let mut inodes = vec![ROOT_INO];
        while !inodes.is_empty() {
            let mut shards = Vec::new();
            for (ino, inode) in read_all::<Inode, _>(&meta, inodes.drain(..), |ino| {
                Meta::<VolumeKeys>::inode_name(*ino)
            })
            .await?
            {
                if inode.kind == Kind::Dir {
                    shards.push(ShardId::root(ino));
                }
                entries.insert(Meta::<VolumeKeys>::inode_name(ino), inode.to_bytes());
            }
            while !shards.is_empty() {
                let read =
                    read_all::<Shard, _>(&meta, shards.drain(..), ShardId::salt_input).await?;
                for (id, shard) in read {
                    match &shard {
                        Shard::Split { generation } => shards.extend(id.children(*generation)),
                        Shard::Leaf(children) => inodes.extend(
                            children
                                .values()
                                .filter(|entry| seen.insert(entry.ino))
                                .map(|entry| entry.ino),
                        ),
                    }
                    entries.insert(id.salt_input(), shard.to_bytes());
                }
            }
        }
        let data = VolumeKey::from_bytes(volume.data);
        let image = Image::write(self.blocks(), &data, volume.replicas as usize, entries).await?;
        Ok((image, usage))
    }
}

/// Reads the blocks named by `keys` in parallel; those that exist, by key.
async fn read_all<T: super::meta::Sealed, K: Send>(
    meta: &Meta<VolumeKeys>,
    keys: impl Iterator<Item = K>,
    name: impl Fn(&K) -> Vec<u8>,
) -> Result<Vec<(K, T)>, VolumeError> {
    let found: Vec<Option<(K, T)>> = futures::stream::iter(keys.map(|key| {
        let what = name(&key);
        async move {
            let read = meta.read::<T>(&what).await?;
            Ok::<_, VolumeError>(read.map(|(value, _)| (key, value)))
        }
    }))
    .buffer_unordered(CAPTURE_PARALLEL)
    .try_collect()
    .await?;
    Ok(found.into_iter().flatten().collect())
}
