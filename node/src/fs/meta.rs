//! A volume's mutable blocks, typed: read, create and compare-and-set
//! updates of sealed structures (inodes, directory shards, usage), with
//! conflicts resolved by re-applying the change to the version that won.

use std::sync::Arc;
use std::time::Duration;

use shoal_core::Address;
use shoal_core::fs::crypt::NONCE_LEN;
use shoal_core::fs::{Envelope, Keyring, VolumeKey};
use shoal_core::mutable::{MutableBlock, WriterKey, derive_address};

use super::image::Image;
use crate::consensus::{Consensus, ConsensusError, PutOutcome};

/// How many times a compare-and-set is re-applied before giving up.
const MAX_ATTEMPTS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("{0}")]
    Corrupt(String),
    #[error("gave up after {MAX_ATTEMPTS} conflicting updates of {0}")]
    Contended(Address),
    #[error(transparent)]
    Blocks(#[from] crate::blocks::BlockError),
}

/// A change to one block: given the current value (if the block exists),
/// return the new value, or `None` to leave the block as it is.
pub trait Change<T> {
    type Output;
    fn apply(&mut self, current: Option<&T>) -> (Option<T>, Self::Output);
}

impl<T, O, F: FnMut(Option<&T>) -> (Option<T>, O)> Change<T> for F {
    type Output = O;
    fn apply(&mut self, current: Option<&T>) -> (Option<T>, O) {
        self(current)
    }
}

/// Structures stored sealed in a volume's mutable blocks.
pub trait Sealed: Sized {
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Result<Self, shoal_core::fs::FsError>;
    /// When a batch of changed blocks is committed, blocks of a lower
    /// rank land first: a block never points at one not written yet.
    fn rank(&self) -> u8 {
        0
    }
    /// Whether a block in this state need not reach its quorum: nothing
    /// can refer to it any more. A mount that holds its volume alone then
    /// writes nothing of it (it keeps the state in its copy).
    fn vanished(&self) -> bool {
        false
    }
}

macro_rules! sealed {
    ($($t:ty $({ $($extra:item)* })?),* $(,)?) => {$(
        impl Sealed for $t {
            fn to_bytes(&self) -> Vec<u8> { <$t>::to_bytes(self) }
            fn from_bytes(bytes: &[u8]) -> Result<Self, shoal_core::fs::FsError> { <$t>::from_bytes(bytes) }
            $($($extra)*)?
        }
    )*};
}

sealed!(
    // An inode whose last link went: a file created and removed before
    // its mount committed it never reaches the cluster, and the removal of
    // one committed before is its directory entry's removal alone.
    shoal_core::fs::Inode {
        fn vanished(&self) -> bool {
            self.nlink == 0
        }
    },
    // Leaves name inodes, and a split shard names its leaves.
    shoal_core::fs::Shard {
        fn rank(&self) -> u8 {
            match self {
                shoal_core::fs::Shard::Leaf(_) => 1,
                shoal_core::fs::Shard::Split { .. } => 2,
            }
        }
    },
    shoal_core::fs::SessionTable,
    shoal_core::fs::Usage,
    shoal_core::fs::VolumeRecord,
    shoal_core::fs::SnapshotRecord,
    shoal_core::fs::Lineage,
    shoal_core::fs::Catalogue
);

/// Who owns a family of named blocks: the key that signs them, the salts
/// that place them and the key that seals them.
pub trait Keys: std::fmt::Debug + Clone + Send + Sync + 'static {
    fn writer(&self) -> WriterKey;
    fn salt(&self, what: &[u8]) -> [u8; 16];
    fn seal(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8>;
    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, shoal_core::fs::FsError>;
}

/// The blocks of one volume: its key, its id (so that a re-created volume
/// of the same name shares no block with the old one), and the data key of
/// its lineage, which seals and owns its chunks.
#[derive(Debug, Clone)]
pub struct VolumeKeys {
    pub key: VolumeKey,
    pub id: [u8; 16],
    pub data: VolumeKey,
}

impl Keys for VolumeKeys {
    fn writer(&self) -> WriterKey {
        self.key.writer()
    }
    fn salt(&self, what: &[u8]) -> [u8; 16] {
        let mut input = self.id.to_vec();
        input.extend_from_slice(what);
        self.key.salt(&input)
    }
    fn seal(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        self.key.seal_meta(nonce, plain)
    }
    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, shoal_core::fs::FsError> {
        self.key.open_meta(sealed)
    }
}

/// The cluster's named blocks: volume records and the volume list.
impl Keys for Keyring {
    fn writer(&self) -> WriterKey {
        Keyring::writer(self)
    }
    fn salt(&self, what: &[u8]) -> [u8; 16] {
        self.name_salt(&String::from_utf8_lossy(what))
    }
    fn seal(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        Keyring::seal(self, nonce, plain)
    }
    fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, shoal_core::fs::FsError> {
        Keyring::open(self, sealed)
    }
}

/// Typed access to the mutable blocks one [`Keys`] owns.
#[derive(Debug, Clone)]
pub struct Meta<K> {
    consensus: Arc<Consensus>,
    keys: K,
    writer: WriterKey,
    /// Replicas of these blocks, if not the cluster's number.
    replicas: Option<usize>,
    /// The image the blocks start from: a block never written reads as
    /// the image holds it (a restored or cloned volume).
    base: Option<Arc<Image>>,
}

impl<K: Keys> Meta<K> {
    pub fn new(consensus: Arc<Consensus>, keys: K) -> Self {
        let writer = keys.writer();
        Self {
            consensus,
            keys,
            writer,
            replicas: None,
            base: None,
        }
    }

    /// The same blocks, starting from `image`.
    pub fn with_base(mut self, image: Arc<Image>) -> Self {
        self.base = Some(image);
        self
    }

    /// A block not written since the image was taken, as the image holds
    /// it: an unsigned stand-in at version 0, which updates replace by
    /// creating version 1.
    async fn in_base(&self, what: &[u8]) -> Result<Option<MutableBlock>, MetaError> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let Some(body) = base.get(what).await? else {
            return Ok(None);
        };
        let envelope = Envelope {
            changes: Vec::new(),
            body,
        };
        let mut block = self.writer.create(
            self.salt(what),
            vec![self.writer.public()],
            self.seal(&envelope),
        );
        block.version = 0;
        Ok(Some(block))
    }

    /// The current version of a block: written, or from the image.
    async fn current(&self, what: &[u8]) -> Result<Option<MutableBlock>, MetaError> {
        match self
            .consensus
            .get_in(self.address(what), self.replicas)
            .await
        {
            Ok(block) => Ok(Some(block)),
            Err(ConsensusError::NotFound(_)) => self.in_base(what).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The same blocks, kept on `replicas` replicas each.
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    pub fn keys(&self) -> &K {
        &self.keys
    }

    fn salt(&self, what: &[u8]) -> [u8; 16] {
        self.keys.salt(what)
    }

    /// The address of the block named `what` in this volume.
    pub fn address(&self, what: &[u8]) -> Address {
        derive_address(&self.writer.public(), &self.salt(what))
    }

    pub fn inode_name(ino: u64) -> Vec<u8> {
        let mut v = b"inode".to_vec();
        v.extend_from_slice(&ino.to_le_bytes());
        v
    }

    fn open<T: Sealed>(&self, block: &MutableBlock) -> Result<(T, Envelope), MetaError> {
        let corrupt = |e: shoal_core::fs::FsError| {
            MetaError::Corrupt(format!("block {}: {e}", block.address))
        };
        let plain = self.keys.open(&block.payload).map_err(corrupt)?;
        let envelope = Envelope::from_bytes(&plain).map_err(corrupt)?;
        let value = T::from_bytes(&envelope.body).map_err(corrupt)?;
        Ok((value, envelope))
    }

    fn seal(&self, envelope: &Envelope) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        self.keys.seal(nonce, &envelope.to_bytes())
    }

    /// A linearizable read: the value and the version it came from.
    pub async fn read<T: Sealed>(
        &self,
        what: &[u8],
    ) -> Result<Option<(T, MutableBlock)>, MetaError> {
        match self.current(what).await? {
            Some(block) => Ok(Some((self.open(&block)?.0, block))),
            None => Ok(None),
        }
    }

    /// Creates the block with `value`: its first version, or `None` if the
    /// block already exists.
    pub async fn create<T: Sealed>(
        &self,
        what: &[u8],
        value: &T,
    ) -> Result<Option<MutableBlock>, MetaError> {
        self.create_as(what, value, false).await
    }

    /// [`Self::create`] for a block whose name holds a number this node
    /// just drew at random (a new inode): no one else can be creating it,
    /// so the write skips a round trip.
    pub async fn create_unique<T: Sealed>(
        &self,
        what: &[u8],
        value: &T,
    ) -> Result<Option<MutableBlock>, MetaError> {
        self.create_as(what, value, true).await
    }

    async fn create_as<T: Sealed>(
        &self,
        what: &[u8],
        value: &T,
        unique: bool,
    ) -> Result<Option<MutableBlock>, MetaError> {
        if let Some(base) = &self.base
            && base.get(what).await?.is_some()
        {
            return Ok(None);
        }
        let id = rand::random();
        let envelope = Envelope::default().next(id, value.to_bytes());
        let block = self.writer.create(
            self.salt(what),
            vec![self.writer.public()],
            self.seal(&envelope),
        );
        match self.put_new(block, unique).await? {
            PutOutcome::Written(b) => Ok(Some(b)),
            // Ours, if the version that won carries our change.
            PutOutcome::Conflict(current) => Ok(self
                .open::<T>(&current)
                .is_ok_and(|(_, e)| e.changes.contains(&id))
                .then_some(current)),
        }
    }

    /// Writes a block's first version; `unique` if its name holds a
    /// number this node just drew at random.
    async fn put_new(&self, block: MutableBlock, unique: bool) -> Result<PutOutcome, MetaError> {
        // On error, the general path sorts out unclear outcomes.
        if unique
            && let Ok(outcome) = self
                .consensus
                .create_unique(block.clone(), self.replicas)
                .await
        {
            return Ok(outcome);
        }
        self.put(block).await
    }

    /// Writes `body` as the version after `known` (the block's first
    /// version if `None`), without re-reading the block: the commit of a
    /// mount that holds its volume alone. `unique` as for
    /// [`Self::create_unique`].
    pub async fn put_body(
        &self,
        what: &[u8],
        known: Option<&MutableBlock>,
        body: Vec<u8>,
        unique: bool,
    ) -> Result<PutOutcome, MetaError> {
        let payload = self.seal(&Envelope::default().next(rand::random(), body));
        match known {
            Some(c) if c.version > 0 => self.put(self.writer.write_after(c, payload)).await,
            _ => {
                let block =
                    self.writer
                        .create(self.salt(what), vec![self.writer.public()], payload);
                self.put_new(block, unique && known.is_none()).await
            }
        }
    }

    async fn put(&self, block: MutableBlock) -> Result<PutOutcome, MetaError> {
        let address = block.address;
        for _ in 0..3 {
            match self.consensus.put_in(block.clone(), self.replicas).await {
                // The write may have landed: read what is current and let
                // the caller's comparison decide.
                Err(ConsensusError::Indeterminate { .. }) => {
                    let current = self.consensus.get_in(address, self.replicas).await?;
                    return Ok(if current == block {
                        PutOutcome::Written(block)
                    } else {
                        PutOutcome::Conflict(current)
                    });
                }
                Err(ConsensusError::Unavailable { .. }) => continue,
                other => return Ok(other?),
            }
        }
        Ok(self.consensus.put_in(block, self.replicas).await?)
    }

    /// Applies `change` to the block, starting from `known` (the version the
    /// caller last saw, if any) and re-applying it to whichever version won
    /// each conflict. Returns the change's output and the version now
    /// current (`None` if the block does not exist and was not created).
    pub async fn update<T: Sealed, C: Change<T>>(
        &self,
        what: &[u8],
        known: Option<MutableBlock>,
        mut change: C,
    ) -> Result<(C::Output, Option<(T, MutableBlock)>), MetaError> {
        let address = self.address(what);
        let mut current: Option<MutableBlock> = match known {
            Some(b) => Some(b),
            None => self.current(what).await?,
        };
        let id: u64 = rand::random();
        let mut landed_output = None;
        for attempt in 0..MAX_ATTEMPTS {
            let opened = current.as_ref().map(|b| self.open::<T>(b)).transpose()?;
            let (value, envelope) = match opened {
                Some((v, e)) => (Some(v), e),
                None => (None, Envelope::default()),
            };
            // Our write landed, and was reported lost: its output stands.
            if envelope.changes.contains(&id)
                && let Some(output) = landed_output.take()
            {
                return Ok((output, value.zip(current)));
            }
            let (new, output) = change.apply(value.as_ref());
            let Some(new) = new else {
                return Ok((output, value.zip(current)));
            };
            let payload = self.seal(&envelope.next(id, new.to_bytes()));
            let block = match &current {
                Some(c) if c.version > 0 => self.writer.write_after(c, payload),
                _ => self
                    .writer
                    .create(self.salt(what), vec![self.writer.public()], payload),
            };
            match self.put(block).await? {
                PutOutcome::Written(b) => return Ok((output, Some((new, b)))),
                PutOutcome::Conflict(now) => {
                    landed_output = Some(output);
                    current = Some(now);
                    if attempt > 2 {
                        let ms = rand::random_range(1..(attempt as u64 * 2).min(50));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
            }
        }
        Err(MetaError::Contended(address))
    }
}
