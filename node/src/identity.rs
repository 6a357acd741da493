//! Cluster identity: the cluster CA, each peer's certificate, and the mutual
//! TLS configurations QUIC uses. A peer or client whose certificate was not
//! signed by this cluster's CA is refused during the handshake.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shoal_core::NodeId;
use shoal_core::ca::{ClusterSecrets, new_keyring_hex};
use shoal_core::fs::Keyring;

/// The name every peer certificate carries and every peer expects: trust
/// comes from the CA's signature; the node id comes from the key.
pub const PEER_SERVER_NAME: &str = "peer.shoal.internal";
/// ALPN protocol id of Shoal's peer protocol.
pub const ALPN: &[u8] = b"shoal/1";

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
/// The cluster keyring (wraps volume keys), beside the CA.
pub const KEYRING_FILE: &str = "keyring.key";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a cluster CA already exists in {0}")]
    AlreadyInitialised(PathBuf),
    #[error("no cluster CA in {0}: run `shoal cluster init --dir DIR` and pass --ca DIR")]
    NoCa(PathBuf),
    #[error("{path}: not a valid certificate or key: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.into(),
        source,
    })
}

fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| IdentityError::Io {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Creates a new cluster CA (ed25519) in `dir`: `ca.crt` and `ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), IdentityError> {
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(IdentityError::AlreadyInitialised(dir.into()));
    }
    fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
        path: dir.into(),
        source,
    })?;
    let secrets = ClusterSecrets::generate()?;
    write_private(&dir.join(CA_KEY_FILE), &secrets.ca_key_pem, 0o600)?;
    if !dir.join(KEYRING_FILE).exists() {
        write_private(&dir.join(KEYRING_FILE), &secrets.keyring_hex, 0o600)?;
    }
    write_private(&cert_path, &secrets.ca_cert_pem, 0o644)
}

/// Creates the cluster keyring in `dir` unless there is one (clusters made
/// before volumes existed get theirs here).
pub fn ensure_keyring(dir: &Path) -> Result<(), IdentityError> {
    let path = dir.join(KEYRING_FILE);
    if path.exists() {
        return Ok(());
    }
    write_private(&path, &new_keyring_hex(), 0o600)
}

/// The cluster keyring in `dir`, if this cluster has one (peers without it
/// store blocks but cannot create or mount volumes).
pub fn load_keyring(dir: &Path) -> Result<Option<Keyring>, IdentityError> {
    let path = dir.join(KEYRING_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = read(&path)?;
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| IdentityError::Invalid {
            path: path.clone(),
            reason: "expected 64 hex digits".into(),
        })?;
    Ok(Some(Keyring::from_bytes(bytes)))
}

/// A peer's TLS identity: its certificate chain, key, and the CA it trusts.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl NodeIdentity {
    /// Loads the peer certificate from `node_dir`, first issuing one signed by
    /// the CA in `ca_dir` if the peer has none yet.
    pub fn load_or_issue(node_dir: &Path, ca_dir: &Path) -> Result<Self, IdentityError> {
        let ca_cert_path = ca_dir.join(CA_CERT_FILE);
        if !ca_cert_path.exists() {
            return Err(IdentityError::NoCa(ca_dir.into()));
        }
        let ca_pem = read(&ca_cert_path)?;
        let (cert_path, key_path) = (node_dir.join(NODE_CERT_FILE), node_dir.join(NODE_KEY_FILE));
        if !cert_path.exists() {
            let ca_key = KeyPair::from_pem(&read(&ca_dir.join(CA_KEY_FILE))?).map_err(|e| {
                IdentityError::Invalid {
                    path: ca_dir.join(CA_KEY_FILE),
                    reason: e.to_string(),
                }
            })?;
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            let mut params = CertificateParams::new(vec![PEER_SERVER_NAME.to_string()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, "Shoal peer");
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.not_after = rcgen::date_time_ymd(2126, 1, 1);
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&key_path, &key.serialize_pem(), 0o600)?;
            write_private(&cert_path, &cert.pem(), 0o644)?;
        }
        Self::from_pem(&ca_pem, &read(&cert_path)?, &read(&key_path)?, &cert_path)
    }

    fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        path: &Path,
    ) -> Result<Self, IdentityError> {
        let invalid = |reason: String| IdentityError::Invalid {
            path: path.into(),
            reason,
        };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let node_id = node_id_of(&cert).map_err(invalid)?;
        Ok(Self {
            node_id,
            ca,
            cert,
            key_der: key.secret_der().to_vec(),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, IdentityError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        Ok(Arc::new(roots))
    }

    /// Server side: only clients with a certificate from the cluster CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: only servers with a certificate from the cluster CA, and
    /// our own certificate presented in return.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node id bound to a certificate: derived from its public key.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    Ok(NodeId::from_public_key(parsed.public_key().raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_gives_a_stable_node_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let node = dir.path().join("node");
        fs::create_dir_all(&node).unwrap();
        init_ca(&ca).unwrap();
        assert!(matches!(
            init_ca(&ca),
            Err(IdentityError::AlreadyInitialised(_))
        ));
        let first = NodeIdentity::load_or_issue(&node, &ca).unwrap();
        let again = NodeIdentity::load_or_issue(&node, &ca).unwrap();
        assert_eq!(first.node_id, again.node_id);
        first.server_config().unwrap();
        first.client_config().unwrap();
    }

    #[test]
    fn missing_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeIdentity::load_or_issue(dir.path(), dir.path()).unwrap_err();
        assert!(err.to_string().contains("shoal cluster init"), "{err}");
    }
}
