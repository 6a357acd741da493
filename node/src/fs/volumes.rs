//! Volumes: named filesystems. A volume's record (a mutable block named
//! after the volume, owned and sealed by the cluster keyring) holds its key,
//! size and replication; the catalogue block lists every volume's name.

use std::sync::Arc;

use shoal_core::fs::inode::ROOT_INO;
use shoal_core::fs::volume::check_name;
use shoal_core::fs::{
    Catalogue, Inode, Keyring, Kind, Lineage, Source, Usage, VolumeKey, VolumeRecord,
};

use super::image::Image;
use super::meta::{Meta, MetaError, VolumeKeys};
use crate::blocks::Blocks;
use crate::consensus::Consensus;

const CATALOGUE: &[u8] = b"catalogue";
pub(super) const SNAPSHOT_CATALOGUE: &[u8] = b"snapshot-catalogue";
/// The name of a volume's usage counter block.
pub const USAGE: &[u8] = b"usage";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "this peer has no cluster keyring (keyring.key beside ca.crt), so it cannot manage or mount volumes"
    )]
    NoKeyring,
    #[error("{0}")]
    Invalid(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0} already exists, of volume {1}")]
    SnapshotExists(String, String),
    #[error("{0}")]
    OutOfRange(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// One volume as listed.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub usage: Usage,
}

#[derive(Debug, Clone)]
pub struct Volumes {
    consensus: Arc<Consensus>,
    blocks: Arc<Blocks>,
    registry: Option<Meta<Keyring>>,
    replicas: usize,
}

/// What a new volume is made of.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub size: u64,
    /// `None`: the cluster's replication.
    pub replicas: Option<u32>,
    /// Content to start from: a snapshot, or a copy of another volume.
    pub source: Option<Source>,
}

fn record_name(name: &str) -> Vec<u8> {
    format!("volume/{name}").into_bytes()
}

/// The block listing who shares a data key.
fn lineage_name(data: &[u8; 32]) -> Vec<u8> {
    let key = VolumeKey::from_bytes(*data).writer().public();
    format!("lineage/{}", hex::encode(key.0)).into_bytes()
}

/// Registry records that a delete leaves as tombstones (their blocks keep
/// their history, and a later create writes the next version).
pub(super) trait Record: super::meta::Sealed + Clone + Send + Sync {
    fn deleted(&self) -> bool;
    fn bury(&mut self);
}

impl Record for VolumeRecord {
    fn deleted(&self) -> bool {
        self.deleted
    }
    fn bury(&mut self) {
        self.deleted = true;
    }
}

impl Record for shoal_core::fs::SnapshotRecord {
    fn deleted(&self) -> bool {
        self.deleted
    }
    fn bury(&mut self) {
        self.deleted = true;
    }
}

/// A member of a lineage: a volume or a snapshot, by name.
#[derive(Debug, Clone, Copy)]
pub(super) enum Member<'a> {
    Volume(&'a str),
    Snapshot(&'a str),
}

impl Volumes {
    pub fn new(
        consensus: Arc<Consensus>,
        blocks: Arc<Blocks>,
        keyring: Option<Keyring>,
        replicas: usize,
    ) -> Self {
        Self {
            registry: keyring.map(|k| Meta::new(consensus.clone(), k)),
            consensus,
            blocks,
            replicas,
        }
    }

    pub(super) fn registry(&self) -> Result<&Meta<Keyring>, VolumeError> {
        self.registry.as_ref().ok_or(VolumeError::NoKeyring)
    }

    pub(super) fn blocks(&self) -> &Arc<Blocks> {
        &self.blocks
    }

    /// The blocks of an opened volume.
    pub fn meta(&self, record: &VolumeRecord) -> Meta<VolumeKeys> {
        let data = VolumeKey::from_bytes(record.data);
        let meta = Meta::new(
            self.consensus.clone(),
            VolumeKeys {
                key: VolumeKey::from_bytes(record.key),
                id: record.id,
                data: data.clone(),
            },
        )
        .with_replicas(record.replicas as usize);
        match record.base {
            Some(image) => meta.with_base(Arc::new(Image::new(image, self.blocks.clone(), data))),
            None => meta,
        }
    }

    /// Adds `member` to the lineage of data key `data`, or removes it;
    /// when the last member leaves, every peer drops the lineage's chunks.
    /// Returns the blocks and bytes freed.
    pub(super) async fn lineage(
        &self,
        data: &[u8; 32],
        member: Member<'_>,
        join: bool,
    ) -> Result<(u64, u64), VolumeError> {
        let (_, now) = self
            .registry()?
            .update::<Lineage, _>(&lineage_name(data), None, |cur: Option<&Lineage>| {
                let mut l = cur.cloned().unwrap_or_default();
                let set = match member {
                    Member::Volume(_) => &mut l.volumes,
                    Member::Snapshot(_) => &mut l.snapshots,
                };
                let (Member::Volume(name) | Member::Snapshot(name)) = member;
                let changed = if join {
                    set.insert(name.to_string())
                } else {
                    set.remove(name)
                };
                (changed.then_some(l), ())
            })
            .await?;
        if join || !now.is_none_or(|(l, _)| l.is_empty()) {
            return Ok((0, 0));
        }
        let writer = VolumeKey::from_bytes(*data).writer();
        Ok(self.blocks.delete_owned(&writer).await)
    }

    /// Whether `volume` is the only member of its lineage: no snapshot or
    /// other volume shares its chunks. A quorum read, so a member that
    /// joined before it is seen.
    pub async fn alone_in_lineage(&self, volume: &VolumeRecord) -> Result<bool, VolumeError> {
        let lineage = self
            .registry()?
            .read::<Lineage>(&lineage_name(&volume.data))
            .await?;
        Ok(lineage.is_some_and(|(l, _)| {
            l.snapshots.is_empty() && l.volumes.len() == 1 && l.volumes.contains(&volume.name)
        }))
    }

    /// Adds or removes `name` in a catalogue block.
    pub(super) async fn catalogue(
        &self,
        block: &[u8],
        name: &str,
        add: bool,
    ) -> Result<(), VolumeError> {
        self.registry()?
            .update::<Catalogue, _>(block, None, |cur: Option<&Catalogue>| {
                let mut c = cur.cloned().unwrap_or_default();
                let changed = if add {
                    c.names.insert(name.to_string())
                } else {
                    c.names.remove(name)
                };
                (changed.then_some(c), ())
            })
            .await?;
        Ok(())
    }

    /// The names a catalogue block lists.
    pub(super) async fn names(
        &self,
        block: &[u8],
    ) -> Result<std::collections::BTreeSet<String>, VolumeError> {
        Ok(self
            .registry()?
            .read::<Catalogue>(block)
            .await?
            .map(|(c, _)| c.names)
            .unwrap_or_default())
    }

    /// Creates a volume: empty, or starting from a snapshot or a copy of
    /// another volume (sharing their chunks: no file data is copied).
    pub async fn create(&self, new: NewVolume) -> Result<VolumeRecord, VolumeError> {
        let name = new.name.as_str();
        check_name(name).map_err(VolumeError::Invalid)?;
        if new.size == 0 {
            return Err(VolumeError::Invalid(
                "volume size must be above zero".into(),
            ));
        }
        let replicas = new.replicas.unwrap_or(self.replicas as u32);
        if !(1..=7).contains(&replicas) {
            return Err(VolumeError::Invalid(format!(
                "replicas must be between 1 and 7, not {replicas}"
            )));
        }
        let nodes = self.blocks.view().reachable().count();
        if replicas as usize > nodes {
            return Err(VolumeError::Invalid(format!(
                "{replicas} replicas need {replicas} peers; the cluster has {nodes}"
            )));
        }
        let registry = self.registry()?;
        let mut record = VolumeRecord {
            name: name.to_string(),
            id: rand::random(),
            key: rand::random(),
            data: rand::random(),
            base: None,
            source: new.source.clone(),
            size: new.size,
            replicas,
            created: super::now().secs,
            deleted: false,
        };
        let too_small = |used: u64| {
            (new.size < used).then(|| {
                VolumeError::OutOfRange(format!(
                    "the source holds {used} bytes; a volume of {} bytes cannot hold it",
                    new.size
                ))
            })
        };
        // Join the source's lineage before reading it, so that deleting
        // the source meanwhile cannot free the chunks this volume shares.
        match &new.source {
            None => {
                self.lineage(&record.data, Member::Volume(name), true)
                    .await?;
            }
            Some(Source::Snapshot(snapshot)) => {
                let snap = self.snapshot(snapshot).await?;
                if let Some(e) = too_small(snap.bytes) {
                    return Err(e);
                }
                self.lineage(&snap.data, Member::Volume(name), true).await?;
                // Still there now that the lineage holds its chunks?
                let snap = match self.snapshot(snapshot).await {
                    Ok(s) => s,
                    Err(e) => {
                        self.lineage(&snap.data, Member::Volume(name), false)
                            .await?;
                        return Err(e);
                    }
                };
                record.data = snap.data;
                record.base = Some(snap.image);
            }
            Some(Source::Volume(volume)) => {
                let source = self.get(volume).await?;
                if let Some(e) = too_small(self.usage(&source).await?.bytes.max(0) as u64) {
                    return Err(e);
                }
                self.lineage(&source.data, Member::Volume(name), true)
                    .await?;
                record.data = source.data;
                record.base = Some(self.capture(&source).await?.0);
            }
        }
        let (created, _) = registry
            .update::<VolumeRecord, _>(&record_name(name), None, |cur: Option<&VolumeRecord>| {
                match cur {
                    Some(r) if !r.deleted => (None, Some(r.data)),
                    _ => (Some(record.clone()), None),
                }
            })
            .await?;
        if let Some(existing) = created {
            if existing != record.data {
                self.lineage(&record.data, Member::Volume(name), false)
                    .await?;
            }
            return Err(VolumeError::Exists(name.into()));
        }
        if record.base.is_none() {
            let meta = self.meta(&record);
            let root = Inode::new(ROOT_INO, Kind::Dir, 0o755, 0, 0, super::now());
            meta.create(&Meta::<VolumeKeys>::inode_name(ROOT_INO), &root)
                .await?;
        }
        self.catalogue(CATALOGUE, name, true).await?;
        Ok(record)
    }

    /// The live record of volume `name`.
    pub async fn get(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        self.live(&record_name(name))
            .await?
            .ok_or_else(|| VolumeError::NotFound(name.into()))
    }

    /// The record in `block`, unless it is a tombstone or missing.
    pub(super) async fn live<T: Record>(&self, block: &[u8]) -> Result<Option<T>, VolumeError> {
        Ok(match self.registry()?.read::<T>(block).await? {
            Some((r, _)) if !r.deleted() => Some(r),
            _ => None,
        })
    }

    /// Turns the live record in `block` into a tombstone; returns it, or
    /// `None` if there was none.
    pub(super) async fn bury<T: Record>(&self, block: &[u8]) -> Result<Option<T>, VolumeError> {
        let (found, _) = self
            .registry()?
            .update::<T, _>(block, None, |cur: Option<&T>| match cur {
                Some(r) if !r.deleted() => {
                    let mut r = r.clone();
                    r.bury();
                    (Some(r.clone()), Some(r))
                }
                _ => (None, None),
            })
            .await?;
        Ok(found)
    }

    pub async fn usage(&self, record: &VolumeRecord) -> Result<Usage, VolumeError> {
        Ok(self
            .meta(record)
            .read::<Usage>(USAGE)
            .await?
            .map(|(u, _)| u)
            .unwrap_or_default())
    }

    /// Every volume, by name.
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let names = self.names(CATALOGUE).await?;
        let found = futures::future::join_all(names.iter().map(|name| async move {
            let record = match self.get(name).await {
                Ok(r) => r,
                Err(VolumeError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let usage = self.usage(&record).await?;
            Ok(Some(VolumeInfo { record, usage }))
        }))
        .await;
        found.into_iter().filter_map(Result::transpose).collect()
    }

    /// Deletes a volume: its name is free again, and unless snapshots or
    /// volumes made from it still share its data, every peer that answers
    /// drops its chunks. Returns the blocks and bytes freed.
    pub async fn delete(&self, name: &str) -> Result<(u64, u64), VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        let Some(record) = self.bury::<VolumeRecord>(&record_name(name)).await? else {
            return Err(VolumeError::NotFound(name.into()));
        };
        self.catalogue(CATALOGUE, name, false).await?;
        self.lineage(&record.data, Member::Volume(name), false)
            .await
    }

    /// Changes a volume's size; it may not shrink below what is used.
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeRecord, VolumeError> {
        let record = self.get(name).await?;
        let used = self.usage(&record).await?.bytes.max(0) as u64;
        if size < used {
            return Err(VolumeError::Invalid(format!(
                "volume {name} uses {} bytes; it cannot shrink to {size}",
                used
            )));
        }
        let (resized, now) = self
            .registry()?
            .update::<VolumeRecord, _>(&record_name(name), None, |cur: Option<&VolumeRecord>| {
                match cur {
                    Some(r) if !r.deleted && r.id == record.id => {
                        let mut r = r.clone();
                        r.size = size;
                        (Some(r), true)
                    }
                    _ => (None, false),
                }
            })
            .await?;
        match now {
            Some((r, _)) if resized => Ok(r),
            _ => Err(VolumeError::NotFound(name.into())),
        }
    }
}
