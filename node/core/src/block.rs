//! Validation of immutable blocks: the rules every peer and reader applies.

use crate::Address;

/// The largest immutable block a peer accepts. Filesystem chunks are at most
/// 4 MiB; the margin leaves room for encryption framing and small batches of
/// metadata.
pub const MAX_BLOCK_SIZE: usize = 16 * 1024 * 1024;

/// Why a block is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block of {0} bytes is larger than the {MAX_BLOCK_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("block content does not match its address {expected} (got {actual})")]
    Mismatch { expected: Address, actual: Address },
}

/// Checks a block about to be stored; returns its address.
pub fn check_new(bytes: &[u8]) -> Result<Address, BlockError> {
    if bytes.len() > MAX_BLOCK_SIZE {
        return Err(BlockError::TooLarge(bytes.len()));
    }
    Ok(Address::of(bytes))
}

/// Checks that bytes read from anywhere (a disk, a peer) are the block at
/// `expected`. Nothing is trusted because of where it came from.
pub fn verify(expected: &Address, bytes: &[u8]) -> Result<(), BlockError> {
    let actual = Address::of(bytes);
    if &actual == expected {
        Ok(())
    } else {
        Err(BlockError::Mismatch {
            expected: *expected,
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_the_block_and_refuses_any_other_bytes() {
        let addr = check_new(b"payload").unwrap();
        assert!(verify(&addr, b"payload").is_ok());
        assert!(matches!(
            verify(&addr, b"Payload"),
            Err(BlockError::Mismatch { .. })
        ));
    }

    #[test]
    fn oversized_blocks_are_refused() {
        let big = vec![0u8; MAX_BLOCK_SIZE + 1];
        assert_eq!(
            check_new(&big),
            Err(BlockError::TooLarge(MAX_BLOCK_SIZE + 1))
        );
    }
}
