//! Images through the cluster's blocks: writing one from a volume's
//! metadata, and looking names up in one (see [`shoal_core::fs::image`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use shoal_core::Address;
use shoal_core::fs::crypt::NONCE_LEN;
use shoal_core::fs::image::{PART_BYTES, cut};
use shoal_core::fs::{ImageIndex, ImagePart, VolumeKey};
use tokio::sync::OnceCell;

use super::meta::MetaError;
use crate::blocks::Blocks;

/// An image, its index and parts fetched on first use and kept: they are
/// immutable.
#[derive(Debug)]
pub struct Image {
    address: Address,
    blocks: Arc<Blocks>,
    /// The lineage's data key, which seals the image.
    key: VolumeKey,
    index: OnceCell<ImageIndex>,
    parts: OnceCell<Vec<OnceCell<ImagePart>>>,
}

fn corrupt(address: Address, e: impl std::fmt::Display) -> MetaError {
    MetaError::Corrupt(format!("image block {address}: {e}"))
}

impl Image {
    pub fn new(address: Address, blocks: Arc<Blocks>, key: VolumeKey) -> Self {
        Self {
            address,
            blocks,
            key,
            index: OnceCell::new(),
            parts: OnceCell::new(),
        }
    }

    async fn fetch(&self, address: Address) -> Result<Vec<u8>, MetaError> {
        let sealed = self.blocks.get(address).await?;
        self.key.open_data(&sealed).map_err(|e| corrupt(address, e))
    }

    pub async fn index(&self) -> Result<&ImageIndex, MetaError> {
        self.index
            .get_or_try_init(|| async {
                let plain = self.fetch(self.address).await?;
                ImageIndex::from_bytes(&plain).map_err(|e| corrupt(self.address, e))
            })
            .await
    }

    /// The body the image holds under `name`.
    pub async fn get(&self, name: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        let index = self.index().await?;
        let Some(i) = index.part_for(name) else {
            return Ok(None);
        };
        let parts = self
            .parts
            .get_or_init(|| async { index.parts.iter().map(|_| OnceCell::new()).collect() })
            .await;
        let address = index.parts[i].1;
        let part = parts[i]
            .get_or_try_init(|| async {
                let plain = self.fetch(address).await?;
                ImagePart::from_bytes(&plain).map_err(|e| corrupt(address, e))
            })
            .await?;
        Ok(part.entries.get(name).cloned())
    }

    /// Stores an image of `entries` (block name to body), sealed with the
    /// lineage's data key and owned by it; returns the index's address.
    pub async fn write(
        blocks: &Arc<Blocks>,
        key: &VolumeKey,
        replicas: usize,
        entries: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Address, MetaError> {
        let seal = |plain: &[u8]| {
            let mut nonce = [0u8; NONCE_LEN];
            rand::fill(&mut nonce);
            Bytes::from(key.seal_data(nonce, plain))
        };
        let owner = Some(key.writer().public());
        let count = entries.len() as u64;
        let parts = cut(entries, PART_BYTES);
        let firsts: Vec<Vec<u8>> = parts
            .iter()
            .map(|p| {
                p.entries
                    .keys()
                    .next()
                    .expect("parts are not empty")
                    .clone()
            })
            .collect();
        let sealed = parts.iter().map(|p| seal(&p.to_bytes())).collect();
        let mut index = ImageIndex {
            parts: Vec::with_capacity(firsts.len()),
            blocks: count,
        };
        for (first, stored) in firsts
            .into_iter()
            .zip(blocks.put_many(sealed, owner, Some(replicas)).await)
        {
            index.parts.push((first, stored?));
        }
        Ok(blocks
            .put_owned(seal(&index.to_bytes()), owner, Some(replicas))
            .await?)
    }
}
