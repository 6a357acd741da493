//! Block addresses: 32 bytes, shown as 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

/// The address of a block. For an immutable block it is blake3 of the block's
/// bytes, so any holder of the bytes can check them against it.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Address(pub [u8; 32]);

impl Address {
    /// The content address of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the 32 raw bytes of an address as carried on the wire.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, AddressParseError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| AddressParseError::Length(bytes.len() * 2))
    }

    /// The first 8 bytes as an integer: addresses are uniform, so this is
    /// a well-spread key for hashing decisions such as placement.
    pub fn prefix_u64(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", &hex::encode(&self.0[..6]))
    }
}

/// Why a string is not a block address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressParseError {
    #[error("malformed address: expected 64 hex digits, got {0}")]
    Length(usize),
    #[error("malformed address: {0:?} is not a hex digit")]
    NotHex(char),
}

impl FromStr for Address {
    type Err = AddressParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(AddressParseError::NotHex(c));
        }
        if s.len() != 64 {
            return Err(AddressParseError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| AddressParseError::Length(s.len()))?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let a = Address::of(b"shoal");
        let parsed: Address = a.to_string().parse().unwrap();
        assert_eq!(a, parsed);
        assert_eq!(a.to_string().len(), 64);
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_reason() {
        assert_eq!("abc".parse::<Address>(), Err(AddressParseError::Length(3)));
        let bad = format!("{}z", "0".repeat(63));
        assert_eq!(bad.parse::<Address>(), Err(AddressParseError::NotHex('z')));
        assert!(Address::from_slice(&[0; 31]).is_err());
    }
}
