//! Volumes: named filesystems. A volume's record (a mutable block named
//! after the volume, owned and sealed by the cluster keyring) holds its key,
//! size and replication; the catalogue block lists every volume's name.

use std::sync::Arc;

use shoal_core::fs::inode::ROOT_INO;
use shoal_core::fs::volume::check_name;
use shoal_core::fs::{Catalogue, Inode, Keyring, Kind, Usage, VolumeKey, VolumeRecord};

use super::meta::{Meta, MetaError, VolumeKeys};
use crate::blocks::Blocks;
use crate::consensus::Consensus;

const CATALOGUE: &[u8] = b"catalogue";
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

fn record_name(name: &str) -> Vec<u8> {
    format!("volume/{name}").into_bytes()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

    fn registry(&self) -> Result<&Meta<Keyring>, VolumeError> {
        self.registry.as_ref().ok_or(VolumeError::NoKeyring)
    }

    /// The blocks of an opened volume.
    pub fn meta(&self, record: &VolumeRecord) -> Meta<VolumeKeys> {
        Meta::new(
            self.consensus.clone(),
            VolumeKeys {
                key: VolumeKey::from_bytes(record.key),
                id: record.id,
            },
        )
        .with_replicas(record.replicas as usize)
    }

    /// Creates a volume with an empty root directory.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
    ) -> Result<VolumeRecord, VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        if size == 0 {
            return Err(VolumeError::Invalid(
                "volume size must be above zero".into(),
            ));
        }
        let replicas = replicas.unwrap_or(self.replicas as u32);
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
            id: [0; 16],
            key: [0; 32],
            size,
            replicas,
            created: now_secs(),
            deleted: false,
        };
        rand::fill(&mut record.id);
        rand::fill(&mut record.key);
        let (created, _) = registry
            .update::<VolumeRecord, _>(&record_name(name), None, |cur: Option<&VolumeRecord>| {
                match cur {
                    Some(r) if !r.deleted => (None, false),
                    _ => (Some(record.clone()), true),
                }
            })
            .await?;
        if !created {
            return Err(VolumeError::Exists(name.into()));
        }
        let meta = self.meta(&record);
        let root = Inode::new(ROOT_INO, Kind::Dir, 0o755, 0, 0, super::now());
        meta.create(&Meta::<VolumeKeys>::inode_name(ROOT_INO), &root)
            .await?;
        registry
            .update::<Catalogue, _>(CATALOGUE, None, |cur: Option<&Catalogue>| {
                let mut c = cur.cloned().unwrap_or_default();
                (c.names.insert(name.to_string()).then_some(c), ())
            })
            .await?;
        Ok(record)
    }

    /// The live record of volume `name`.
    pub async fn get(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        match self
            .registry()?
            .read::<VolumeRecord>(&record_name(name))
            .await?
        {
            Some((r, _)) if !r.deleted => Ok(r),
            _ => Err(VolumeError::NotFound(name.into())),
        }
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
        let names = self
            .registry()?
            .read::<Catalogue>(CATALOGUE)
            .await?
            .map(|(c, _)| c.names)
            .unwrap_or_default();
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

    /// Deletes a volume: its name is free again, and every peer that
    /// answers drops the volume's chunks. Returns the blocks and bytes
    /// freed.
    pub async fn delete(&self, name: &str) -> Result<(u64, u64), VolumeError> {
        check_name(name).map_err(VolumeError::Invalid)?;
        let registry = self.registry()?;
        let (found, _) = registry
            .update::<VolumeRecord, _>(&record_name(name), None, |cur: Option<&VolumeRecord>| {
                match cur {
                    Some(r) if !r.deleted => {
                        let mut r = r.clone();
                        r.deleted = true;
                        (Some(r.clone()), Some(r))
                    }
                    _ => (None, None),
                }
            })
            .await?;
        let Some(record) = found else {
            return Err(VolumeError::NotFound(name.into()));
        };
        registry
            .update::<Catalogue, _>(CATALOGUE, None, |cur: Option<&Catalogue>| {
                let mut c = cur.cloned().unwrap_or_default();
                (c.names.remove(name).then_some(c), ())
            })
            .await?;
        let writer = VolumeKey::from_bytes(record.key).writer();
        Ok(self.blocks.delete_owned(&writer).await)
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
