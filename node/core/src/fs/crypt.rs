//! Keys. The cluster keyring wraps each volume's key; a volume key derives
//! everything the volume needs: the key that signs its mutable blocks, the
//! key that encrypts its data and metadata, and the salts that place its
//! blocks. Peers that only store blocks hold none of these: they see
//! ciphertext under unpredictable addresses and cannot sign a version.

use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::FsError;
use crate::mutable::WriterKey;

/// Nonce bytes the caller supplies for each sealing (random; 24 bytes make
/// random nonces safe).
pub const NONCE_LEN: usize = 24;
/// What sealing adds to a plaintext: nonce and tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

/// Symmetric key material with the derivations Shoal uses.
#[derive(Clone)]
struct Secret([u8; 32]);

impl Secret {
    fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }

    fn cipher(&self, context: &str) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.derive(context).into())
    }

    /// Nonce, ciphertext and tag, encrypted in place in the one buffer
    /// (a chunk is copied once, not twice).
    fn seal(&self, context: &str, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plain.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .cipher(context)
            .encrypt_inout_detached(&XNonce::from(nonce), b"", (&mut out[NONCE_LEN..]).into())
            .expect("plaintext within the AEAD's limits");
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, FsError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(FsError::Decrypt);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        self.cipher(context)
            .decrypt(&XNonce::from(nonce), body)
            .map_err(|_| FsError::Decrypt)
    }

    fn salt(&self, context: &str, what: &[u8]) -> [u8; 16] {
        let h = blake3::keyed_hash(&self.derive(context), what);
        h.as_bytes()[..16].try_into().expect("16 of 32 bytes")
    }
}

/// The cluster's keyring: the key that wraps volume keys and signs volume
/// records. Held by the peers that mount volumes and by administrators.
#[derive(Clone)]
pub struct Keyring(Secret);

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyring(..)")
    }
}

impl Keyring {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret(bytes))
    }

    /// The key that owns and signs volume records and the volume list.
    pub fn writer(&self) -> WriterKey {
        WriterKey::from_secret(self.0.derive("shoal keyring writer v1"))
    }

    /// Salt of a named block (a volume record, the volume list).
    pub fn name_salt(&self, name: &str) -> [u8; 16] {
        self.0.salt("shoal keyring names v1", name.as_bytes())
    }

    pub fn seal(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        self.0.seal("shoal keyring seal v1", nonce, plain)
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, FsError> {
        self.0.open("shoal keyring seal v1", sealed)
    }
}

/// One volume's key.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeKey(Secret);

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Secret {}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(..)")
    }
}

impl VolumeKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Secret(bytes))
    }

    pub fn bytes(&self) -> [u8; 32] {
        self.0.0
    }

    /// Signs every mutable block of the volume (inodes, shards, usage).
    pub fn writer(&self) -> WriterKey {
        WriterKey::from_secret(self.0.derive("shoal volume writer v1"))
    }

    /// Salt of one of the volume's mutable blocks, from its logical name.
    pub fn salt(&self, what: &[u8]) -> [u8; 16] {
        self.0.salt("shoal volume salts v1", what)
    }

    /// A 64-bit keyed hash that spreads directory entries over shards;
    /// keyed so that no one can craft names that pile into one shard.
    pub fn name_hash(&self, name: &[u8]) -> u64 {
        let s = self.0.salt("shoal volume names v1", name);
        u64::from_le_bytes(s[..8].try_into().expect("8 of 16 bytes"))
    }

    /// Encrypts a chunk of file data.
    pub fn seal_data(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        self.0.seal("shoal volume data v1", nonce, plain)
    }

    pub fn open_data(&self, sealed: &[u8]) -> Result<Vec<u8>, FsError> {
        self.0.open("shoal volume data v1", sealed)
    }

    /// Encrypts metadata: inodes and directory shards.
    pub fn seal_meta(&self, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
        self.0.seal("shoal volume meta v1", nonce, plain)
    }

    pub fn open_meta(&self, sealed: &[u8]) -> Result<Vec<u8>, FsError> {
        self.0.open("shoal volume meta v1", sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_its_key_and_context() {
        let key = VolumeKey::from_bytes([7; 32]);
        let sealed = key.seal_data([1; NONCE_LEN], b"hello");
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(key.open_data(&sealed).unwrap(), b"hello");
        assert_eq!(key.open_meta(&sealed), Err(FsError::Decrypt));
        let other = VolumeKey::from_bytes([8; 32]);
        assert_eq!(other.open_data(&sealed), Err(FsError::Decrypt));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(key.open_data(&tampered), Err(FsError::Decrypt));
        assert_eq!(key.open_data(&sealed[..10]), Err(FsError::Decrypt));
    }

    #[test]
    fn derivations_are_distinct_and_stable() {
        let key = VolumeKey::from_bytes([7; 32]);
        assert_eq!(key.salt(b"a"), key.salt(b"a"));
        assert_ne!(key.salt(b"a"), key.salt(b"b"));
        assert_ne!(
            key.writer().public(),
            VolumeKey::from_bytes([8; 32]).writer().public()
        );
        let ring = Keyring::from_bytes([7; 32]);
        assert_ne!(ring.writer().public(), key.writer().public());
    }
}
