//! A cluster's secrets: the CA that signs every peer's certificate and the
//! keyring that wraps volume keys. `shoal cluster init` writes them to
//! files; the operator keeps them in a Secret.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// The CA certificate and key (PEM) and the keyring (64 hex digits).
#[derive(Clone)]
pub struct ClusterSecrets {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub keyring_hex: String,
}

impl std::fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecrets(..)")
    }
}

impl ClusterSecrets {
    /// A new CA (ed25519, valid for a century, may sign only leaf
    /// certificates) and a new keyring.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Shoal cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_after = rcgen::date_time_ymd(2126, 1, 1);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_cert_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            keyring_hex: new_keyring_hex(),
        })
    }
}

/// A new cluster keyring, as its file holds it.
pub fn new_keyring_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_well_formed() {
        let a = ClusterSecrets::generate().unwrap();
        let b = ClusterSecrets::generate().unwrap();
        assert!(a.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.ca_key_pem.contains("PRIVATE KEY"));
        assert_eq!(a.keyring_hex.len(), 64);
        assert_ne!(a.keyring_hex, b.keyring_hex);
        assert_ne!(a.ca_key_pem, b.ca_key_pem);
    }
}
