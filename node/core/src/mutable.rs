//! Mutable blocks: a fixed address, a version that only moves forward, a
//! payload, and an access list, signed by a writer the access list allows.
//!
//! The address is derived from the owner's key and a random salt, so nobody
//! else can claim it. The owner signs the access list; each version is
//! signed by its writer. Replicas check a new version against the current
//! one before accepting it, and readers check every block they are given:
//! nothing is trusted because of where it came from.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use crate::Address;

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(&self.0[..6]))
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..4]))
    }
}

/// Who may write a block: its owner (who alone may change this list) and
/// the writers the owner names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Acl {
    pub owner: PublicKey,
    pub writers: Vec<PublicKey>,
    /// Grows with every change of the list, so an old list cannot be
    /// replayed.
    pub epoch: u64,
    /// The owner's signature over (address, epoch, writers).
    pub owner_signature: Signature,
}

impl Acl {
    pub fn allows(&self, key: &PublicKey) -> bool {
        self.owner == *key || self.writers.contains(key)
    }

    fn signed_bytes(address: &Address, epoch: u64, writers: &[PublicKey]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(64 + 32 * writers.len());
        bytes.extend_from_slice(b"shoal/acl/v1");
        bytes.extend_from_slice(address.as_bytes());
        bytes.extend_from_slice(&epoch.to_le_bytes());
        for w in writers {
            bytes.extend_from_slice(&w.0);
        }
        bytes
    }

    /// A digest of the whole list, signature included.
    fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.owner.0);
        h.update(&self.epoch.to_le_bytes());
        h.update(&(self.writers.len() as u64).to_le_bytes());
        for w in &self.writers {
            h.update(&w.0);
        }
        h.update(&self.owner_signature.0);
        *h.finalize().as_bytes()
    }
}

/// One version of a mutable block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MutableBlock {
    pub address: Address,
    /// With the owner's key, determines the address.
    pub salt: [u8; 16],
    pub version: u64,
    /// [`MutableBlock::digest`] of the version this one replaced (zeros for
    /// version 1): the versions form a hash chain, so a version attests
    /// which one it followed.
    pub prev: [u8; 32],
    pub payload: Vec<u8>,
    pub acl: Acl,
    pub signer: PublicKey,
    /// The signer's signature over (address, version, prev, payload hash,
    /// ACL).
    pub signature: Signature,
}

/// Why a mutable block is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutableError {
    #[error("address does not belong to the block's owner")]
    ForeignAddress,
    #[error("access list is not signed by the block's owner")]
    BadAclSignature,
    #[error("signature does not verify")]
    BadSignature,
    #[error("{0:?} may not write this block")]
    NotAllowed(PublicKey),
    #[error("only the owner may change the access list")]
    AclChangeByWriter,
    #[error("access list epoch {new} is older than {current}")]
    StaleAcl { new: u64, current: u64 },
    #[error("version {new} does not follow version {current}")]
    VersionNotNext { new: u64, current: u64 },
    #[error("a different block")]
    OtherBlock,
    #[error("version {0} was signed on top of another version than the current one")]
    ForkedHistory(u64),
    #[error("payload of {0} bytes is larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("malformed key or signature")]
    Malformed,
}

/// The largest payload of a mutable block (directories and inodes are
/// sharded well below this).
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// The address of the mutable block an owner creates with `salt`.
pub fn derive_address(owner: &PublicKey, salt: &[u8; 16]) -> Address {
    let mut h = blake3::Hasher::new();
    h.update(b"shoal/mutable-address/v1");
    h.update(&owner.0);
    h.update(salt);
    Address(*h.finalize().as_bytes())
}

fn verifying_key(key: &PublicKey) -> Result<VerifyingKey, MutableError> {
    VerifyingKey::from_bytes(&key.0).map_err(|_| MutableError::Malformed)
}

fn verify_signature(key: &PublicKey, message: &[u8], sig: &Signature) -> Result<(), MutableError> {
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    verifying_key(key)?
        .verify(message, &sig)
        .map_err(|_| MutableError::BadSignature)
}

impl MutableBlock {
    /// Identifies this version: a hash of its signature, which covers all
    /// of its content.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.signature.0).as_bytes()
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(b"shoal/mutable-block/v1");
        bytes.extend_from_slice(self.address.as_bytes());
        bytes.extend_from_slice(&self.version.to_le_bytes());
        bytes.extend_from_slice(&self.prev);
        bytes.extend_from_slice(blake3::hash(&self.payload).as_bytes());
        bytes.extend_from_slice(&self.acl.digest());
        bytes
    }

    /// Checks the block on its own: the address is the owner's, the owner
    /// signed the access list, the signer is allowed by it, and the
    /// signature holds. What a reader checks of any block it is served.
    pub fn verify(&self) -> Result<(), MutableError> {
        // A block is decoded many times on its way through a quorum (in a
        // request, in each reply, as the base of the next version); the
        // signature checks, by far the dearest part, are done once.
        let key = self.verification_key();
        if verified::contains(&key) {
            return Ok(());
        }
        self.verify_uncached()?;
        verified::insert(key);
        Ok(())
    }

    /// A hash of everything [`Self::verify_uncached`] looks at.
    fn verification_key(&self) -> [u8; 32] {
        self.verification_key_of(&self.signed_bytes())
    }

    /// [`Self::verification_key`], given the block's signed bytes.
    fn verification_key_of(&self, signed: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(signed);
        h.update(&self.salt);
        h.update(&(self.payload.len() as u64).to_le_bytes());
        h.update(&self.acl.owner.0);
        h.update(&self.acl.owner_signature.0);
        h.update(&self.signer.0);
        h.update(&self.signature.0);
        *h.finalize().as_bytes()
    }

    fn verify_uncached(&self) -> Result<(), MutableError> {
        self.check_unsigned()?;
        // The owner's signature of a version covers its access list (by
        // digest); only another writer needs the owner's word on the list.
        if self.signer != self.acl.owner {
            let acl_bytes = Acl::signed_bytes(&self.address, self.acl.epoch, &self.acl.writers);
            verify_signature(&self.acl.owner, &acl_bytes, &self.acl.owner_signature)
                .map_err(|_| MutableError::BadAclSignature)?;
        }
        verify_signature(&self.signer, &self.signed_bytes(), &self.signature)
    }

    /// Checks many blocks at once, as an acceptor serving a batch does: one
    /// check of all their signatures costs about half of checking each. The
    /// blocks that hold are remembered as [`Self::verify`] remembers them;
    /// if any does not, none is, and each is checked on its own when used.
    /// Only versions their owner signed take part (one signature each).
    pub fn verify_all<'a>(blocks: impl IntoIterator<Item = &'a MutableBlock>) {
        let mut keys = Vec::new();
        let mut messages = Vec::new();
        let mut signatures = Vec::new();
        let mut verifying = Vec::new();
        for block in blocks {
            let signed = block.signed_bytes();
            let key = block.verification_key_of(&signed);
            if block.signer != block.acl.owner
                || verified::contains(&key)
                || block.check_unsigned().is_err()
            {
                continue;
            }
            let Ok(verifying_key) = verifying_key(&block.signer) else {
                continue;
            };
            keys.push(key);
            messages.push(signed);
            signatures.push(ed25519_dalek::Signature::from_bytes(&block.signature.0));
            verifying.push(verifying_key);
        }
        if keys.len() < 2 {
            return;
        }
        let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &verifying).is_ok() {
            keys.into_iter().for_each(verified::insert);
        }
    }

    /// What [`Self::verify`] checks besides signatures.
    fn check_unsigned(&self) -> Result<(), MutableError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(MutableError::TooLarge(self.payload.len()));
        }
        if derive_address(&self.acl.owner, &self.salt) != self.address {
            return Err(MutableError::ForeignAddress);
        }
        if !self.acl.allows(&self.signer) {
            return Err(MutableError::NotAllowed(self.signer));
        }
        Ok(())
    }

    /// Checks that `self` may follow `current` (the block's latest version,
    /// or none for a new block): what a replica checks before accepting.
    pub fn check_successor(&self, current: Option<&MutableBlock>) -> Result<(), MutableError> {
        self.verify()?;
        let Some(current) = current else {
            return match self.version {
                1 if self.prev != [0; 32] => Err(MutableError::ForkedHistory(1)),
                1 if self.signer == self.acl.owner => Ok(()),
                1 => Err(MutableError::NotAllowed(self.signer)),
                v => Err(MutableError::VersionNotNext { new: v, current: 0 }),
            };
        };
        if self.address != current.address || self.acl.owner != current.acl.owner {
            return Err(MutableError::OtherBlock);
        }
        if self.version != current.version + 1 {
            return Err(MutableError::VersionNotNext {
                new: self.version,
                current: current.version,
            });
        }
        if self.prev != current.digest() {
            return Err(MutableError::ForkedHistory(self.version));
        }
        // Authority comes from the version in force, not the new one.
        if !current.acl.allows(&self.signer) {
            return Err(MutableError::NotAllowed(self.signer));
        }
        if self.acl != current.acl {
            if self.signer != current.acl.owner {
                return Err(MutableError::AclChangeByWriter);
            }
            if self.acl.epoch <= current.acl.epoch {
                return Err(MutableError::StaleAcl {
                    new: self.acl.epoch,
                    current: current.acl.epoch,
                });
            }
        }
        Ok(())
    }
}

/// Memo of blocks whose signatures verified: verification is a pure
/// function of the block, so remembering its result changes nothing but
/// the cost. Two generations bound the memory.
mod verified {
    use std::collections::HashSet;
    use std::sync::{LazyLock, Mutex};

    const GENERATION: usize = 16 * 1024;

    type Generations = (HashSet<[u8; 32]>, HashSet<[u8; 32]>);
    static MEMO: LazyLock<Mutex<Generations>> = LazyLock::new(Mutex::default);

    pub(super) fn contains(key: &[u8; 32]) -> bool {
        let memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
        memo.0.contains(key) || memo.1.contains(key)
    }

    #[cfg(test)]
    pub(super) fn forget(keys: impl IntoIterator<Item = [u8; 32]>) {
        let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            memo.0.remove(&key);
            memo.1.remove(&key);
        }
    }

    pub(super) fn insert(key: [u8; 32]) {
        let mut memo = MEMO.lock().unwrap_or_else(|e| e.into_inner());
        if memo.0.len() >= GENERATION {
            memo.1 = std::mem::take(&mut memo.0);
        }
        memo.0.insert(key);
    }
}

fn delete_owned_message(owner: &PublicKey, issued_ms: u64) -> Vec<u8> {
    let mut m = b"shoal/delete-owned/v1".to_vec();
    m.extend_from_slice(&owner.0);
    m.extend_from_slice(&issued_ms.to_le_bytes());
    m
}

/// Whether `owner` signed a request to drop its block claims at `issued_ms`.
pub fn verify_delete_owned(
    owner: &PublicKey,
    issued_ms: u64,
    signature: &Signature,
) -> Result<(), MutableError> {
    verify_signature(owner, &delete_owned_message(owner, issued_ms), signature)
}

/// A request to drop claims on the listed blocks only: its own domain, so
/// that no list, not even an empty one, reads as "every block".
fn release_message(owner: &PublicKey, issued_ms: u64, blocks: &[Address]) -> Vec<u8> {
    let mut listed = blake3::Hasher::new();
    for address in blocks {
        listed.update(address.as_bytes());
    }
    let mut m = b"shoal/release-blocks/v1".to_vec();
    m.extend_from_slice(&owner.0);
    m.extend_from_slice(&issued_ms.to_le_bytes());
    m.extend_from_slice(listed.finalize().as_bytes());
    m
}

/// Whether `owner` signed a request, at `issued_ms`, to drop its claims on
/// exactly `blocks`.
pub fn verify_release(
    owner: &PublicKey,
    issued_ms: u64,
    blocks: &[Address],
    signature: &Signature,
) -> Result<(), MutableError> {
    verify_signature(owner, &release_message(owner, issued_ms, blocks), signature)
}

/// A key that signs mutable blocks.
#[derive(Clone)]
pub struct WriterKey(SigningKey);

impl fmt::Debug for WriterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriterKey({:?})", self.public())
    }
}

impl WriterKey {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }

    /// A request that peers drop this key's claim on its blocks, issued at
    /// `issued_ms` (see [`verify_delete_owned`]).
    pub fn sign_delete_owned(&self, issued_ms: u64) -> Signature {
        self.sign(&delete_owned_message(&self.public(), issued_ms))
    }

    /// A request that peers drop this key's claims on `blocks` only (see
    /// [`verify_release`]).
    pub fn sign_release(&self, issued_ms: u64, blocks: &[Address]) -> Signature {
        self.sign(&release_message(&self.public(), issued_ms, blocks))
    }

    /// An access list for `address` owned by this key.
    pub fn sign_acl(&self, address: &Address, epoch: u64, writers: Vec<PublicKey>) -> Acl {
        // A list of no one but the owner is only ever carried by versions
        // the owner signs, whose signature covers it: it needs none of its
        // own (a new block then costs one signature and one check, not two).
        let owner_signature = if writers.iter().all(|w| *w == self.public()) {
            Signature([0; 64])
        } else {
            self.sign(&Acl::signed_bytes(address, epoch, &writers))
        };
        Acl {
            owner: self.public(),
            writers,
            epoch,
            owner_signature,
        }
    }

    /// Version 1 of a new block owned by this key.
    pub fn create(
        &self,
        salt: [u8; 16],
        writers: Vec<PublicKey>,
        payload: Vec<u8>,
    ) -> MutableBlock {
        let address = derive_address(&self.public(), &salt);
        let acl = self.sign_acl(&address, 1, writers);
        self.sign_block(address, salt, 1, [0; 32], payload, acl)
    }

    /// The version after `current` with `payload`, same access list.
    pub fn write_after(&self, current: &MutableBlock, payload: Vec<u8>) -> MutableBlock {
        self.sign_block(
            current.address,
            current.salt,
            current.version + 1,
            current.digest(),
            payload,
            current.acl.clone(),
        )
    }

    pub fn sign_block(
        &self,
        address: Address,
        salt: [u8; 16],
        version: u64,
        prev: [u8; 32],
        payload: Vec<u8>,
        acl: Acl,
    ) -> MutableBlock {
        let mut block = MutableBlock {
            address,
            salt,
            version,
            prev,
            payload,
            acl,
            signer: self.public(),
            signature: Signature([0; 64]),
        };
        block.signature = self.sign(&block.signed_bytes());
        // A version its owner just signed holds by construction: checking
        // its signature again (as the proposer and a local acceptor would)
        // only repeats the signing's work.
        if block.signer == block.acl.owner && block.check_unsigned().is_ok() {
            verified::insert(block.verification_key());
        }
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_requests_verify_only_for_their_owner_and_time() {
        let (owner, other) = (key(1), key(2));
        let sig = owner.sign_delete_owned(1000);
        assert!(verify_delete_owned(&owner.public(), 1000, &sig).is_ok());
        assert!(verify_delete_owned(&owner.public(), 1001, &sig).is_err());
        assert!(verify_delete_owned(&other.public(), 1000, &sig).is_err());
        let forged = other.sign_delete_owned(1000);
        assert!(verify_delete_owned(&owner.public(), 1000, &forged).is_err());
    }

    #[test]
    fn release_requests_verify_only_for_their_owner_time_and_list() {
        let (owner, other) = (key(1), key(2));
        let (a, b) = (Address::of(b"a"), Address::of(b"b"));
        let sig = owner.sign_release(1000, &[a, b]);
        assert!(verify_release(&owner.public(), 1000, &[a, b], &sig).is_ok());
        assert!(verify_release(&owner.public(), 1000, &[a], &sig).is_err());
        assert!(verify_release(&owner.public(), 1000, &[b, a], &sig).is_err());
        assert!(verify_release(&owner.public(), 1001, &[a, b], &sig).is_err());
        assert!(verify_release(&other.public(), 1000, &[a, b], &sig).is_err());
        // Neither kind of request passes for the other.
        let all = owner.sign_delete_owned(1000);
        assert!(verify_release(&owner.public(), 1000, &[], &all).is_err());
        let none = owner.sign_release(1000, &[]);
        assert!(verify_delete_owned(&owner.public(), 1000, &none).is_err());
    }

    fn key(n: u8) -> WriterKey {
        WriterKey::from_secret([n; 32])
    }

    #[test]
    fn a_created_block_verifies_and_its_successors_chain() {
        let owner = key(1);
        let writer = key(2);
        let v1 = owner.create([9; 16], vec![writer.public()], b"one".to_vec());
        v1.check_successor(None).unwrap();
        let v2 = writer.write_after(&v1, b"two".to_vec());
        v2.check_successor(Some(&v1)).unwrap();
        let v3 = owner.write_after(&v2, b"three".to_vec());
        v3.check_successor(Some(&v2)).unwrap();
    }

    #[test]
    fn forged_unauthorised_and_replayed_versions_are_refused() {
        let owner = key(1);
        let stranger = key(3);
        let v1 = owner.create([9; 16], vec![], b"one".to_vec());
        let v2 = owner.write_after(&v1, b"two".to_vec());

        // A stranger's write.
        let bad = stranger.write_after(&v1, b"mine".to_vec());
        assert_eq!(
            bad.check_successor(Some(&v1)),
            Err(MutableError::NotAllowed(stranger.public()))
        );
        // Payload changed after signing.
        let mut forged = v2.clone();
        forged.payload = b"tampered".to_vec();
        assert_eq!(forged.verify(), Err(MutableError::BadSignature));
        // An old version replayed over a newer one.
        assert!(matches!(
            v1.check_successor(Some(&v2)),
            Err(MutableError::VersionNotNext { new: 1, current: 2 })
        ));
        // A version signed on top of another branch of history.
        let other_v2 = owner.write_after(&v1, b"other".to_vec());
        let v3_on_other = owner.write_after(&other_v2, b"three".to_vec());
        assert_eq!(
            v3_on_other.check_successor(Some(&v2)),
            Err(MutableError::ForkedHistory(3))
        );
        // A stranger claiming the owner's address with its own access list.
        let mut claimed = stranger.create([9; 16], vec![], b"x".to_vec());
        claimed.address = v1.address;
        assert_eq!(claimed.verify(), Err(MutableError::ForeignAddress));
    }

    #[test]
    fn a_batch_check_remembers_what_holds_and_nothing_of_a_batch_with_a_forgery() {
        let owner = key(7);
        let good: Vec<MutableBlock> = (0..4u8)
            .map(|i| owner.create([i; 16], vec![], vec![i]))
            .collect();
        // Signed here, so known good already: forget that to test the batch.
        verified::forget(good.iter().map(MutableBlock::verification_key));
        MutableBlock::verify_all(&good);
        assert!(
            good.iter()
                .all(|b| verified::contains(&b.verification_key()))
        );

        let mut batch: Vec<MutableBlock> = (10..14u8)
            .map(|i| owner.create([i; 16], vec![], vec![i]))
            .collect();
        batch[2].payload = b"tampered".to_vec();
        verified::forget(batch.iter().map(MutableBlock::verification_key));
        MutableBlock::verify_all(&batch);
        assert!(
            !batch
                .iter()
                .any(|b| verified::contains(&b.verification_key()))
        );
        // Each is then checked on its own.
        assert!(batch[0].verify().is_ok());
        assert_eq!(batch[2].verify(), Err(MutableError::BadSignature));
    }

    #[test]
    fn only_versions_by_others_than_the_owner_need_a_signed_access_list() {
        let (owner, writer) = (key(1), key(2));
        // The owner's own block: one signature covers version and list.
        let own = owner.create([3; 16], vec![owner.public()], b"x".to_vec());
        assert_eq!(own.acl.owner_signature, Signature([0; 64]));
        own.verify().unwrap();
        owner.write_after(&own, b"y".to_vec()).verify().unwrap();
        // Changing the unsigned list breaks the owner's signature.
        let mut widened = own.clone();
        widened.acl.writers.push(writer.public());
        assert_eq!(widened.verify(), Err(MutableError::BadSignature));
        // A writer carrying an unsigned list that names it is refused.
        let unsigned = Acl {
            writers: vec![writer.public()],
            ..own.acl.clone()
        };
        let sneaked = writer.sign_block(own.address, own.salt, 2, own.digest(), vec![], unsigned);
        assert_eq!(
            sneaked.check_successor(Some(&own)),
            Err(MutableError::BadAclSignature)
        );
        // With the owner's signed list, the writer's version holds.
        let shared = owner.create([4; 16], vec![writer.public()], vec![]);
        assert_ne!(shared.acl.owner_signature, Signature([0; 64]));
        writer
            .write_after(&shared, b"w".to_vec())
            .check_successor(Some(&shared))
            .unwrap();
    }

    #[test]
    fn only_the_owner_changes_the_access_list_and_never_back() {
        let owner = key(1);
        let writer = key(2);
        let v1 = owner.create([5; 16], vec![writer.public()], vec![]);
        // A writer may not add itself another writer.
        let acl = Acl {
            writers: vec![writer.public(), key(4).public()],
            ..v1.acl.clone()
        };
        let grab = writer.sign_block(v1.address, v1.salt, 2, v1.digest(), vec![], acl);
        assert!(grab.check_successor(Some(&v1)).is_err());
        // The owner revokes the writer; the revoked writer is then refused,
        // and the old list cannot be replayed.
        let revoked = owner.sign_acl(&v1.address, 2, vec![]);
        let v2 = owner.sign_block(v1.address, v1.salt, 2, v1.digest(), vec![], revoked);
        v2.check_successor(Some(&v1)).unwrap();
        let late = writer.sign_block(v1.address, v1.salt, 3, v2.digest(), vec![], v1.acl.clone());
        assert_eq!(
            late.check_successor(Some(&v2)),
            Err(MutableError::NotAllowed(writer.public()))
        );
    }
}
