//! Conversions between the pure core's types and their protobuf form.
//! Decoding checks shapes (lengths, required fields) and verifies every
//! mutable block it meets, so nothing unverified travels further inside a
//! peer.

use shoal_core::mutable::{Acl, MutableBlock, PublicKey, Signature};
use shoal_core::paxos::{Acceptor, Ballot, Chosen, Config, Entry, Proposal, Reply, Request};
use shoal_core::{Address, NodeId};
use shoal_proto::peer as pb;

/// A malformed message, or a block in it that does not verify.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WireError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("refused: block {address} does not verify: {reason}")]
    Unverified { address: Address, reason: String },
}

fn bad(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], WireError> {
    bytes
        .try_into()
        .map_err(|_| bad(format!("{what}: expected {N} bytes, got {}", bytes.len())))
}

fn required<T>(field: Option<T>, what: &str) -> Result<T, WireError> {
    field.ok_or_else(|| bad(format!("{what} is missing")))
}

pub fn node_to_wire(id: &NodeId) -> Vec<u8> {
    id.0.to_vec()
}

pub fn node_from_wire(bytes: &[u8]) -> Result<NodeId, WireError> {
    Ok(NodeId(fixed(bytes, "node id")?))
}

pub fn address_from_wire(bytes: &[u8]) -> Result<Address, WireError> {
    Ok(Address(fixed(bytes, "address")?))
}

pub fn block_to_wire(b: &MutableBlock) -> pb::MutableBlock {
    pb::MutableBlock {
        address: b.address.0.to_vec(),
        salt: b.salt.to_vec(),
        version: b.version,
        payload: b.payload.clone(),
        acl: Some(pb::Acl {
            owner: b.acl.owner.0.to_vec(),
            writers: b.acl.writers.iter().map(|w| w.0.to_vec()).collect(),
            epoch: b.acl.epoch,
            owner_signature: b.acl.owner_signature.0.to_vec(),
        }),
        signer: b.signer.0.to_vec(),
        signature: b.signature.0.to_vec(),
        prev: b.prev.to_vec(),
    }
}

/// Decodes a block and verifies it (address, access list, signature).
pub fn block_from_wire(b: pb::MutableBlock) -> Result<MutableBlock, WireError> {
    let block = unverified_block_from_wire(b)?;
    verified(&block)?;
    Ok(block)
}

fn verified(block: &MutableBlock) -> Result<(), WireError> {
    block.verify().map_err(|e| WireError::Unverified {
        address: block.address,
        reason: e.to_string(),
    })
}

/// The block a message carries, its signatures not checked yet: for a
/// caller that checks many at once, or one this peer checked before it
/// stored it.
fn unverified_block_from_wire(b: pb::MutableBlock) -> Result<MutableBlock, WireError> {
    let acl = required(b.acl, "access list")?;
    let block = MutableBlock {
        address: address_from_wire(&b.address)?,
        salt: fixed(&b.salt, "salt")?,
        version: b.version,
        prev: fixed(&b.prev, "previous version digest")?,
        payload: b.payload,
        acl: Acl {
            owner: PublicKey(fixed(&acl.owner, "owner key")?),
            writers: acl
                .writers
                .iter()
                .map(|w| fixed(w, "writer key").map(PublicKey))
                .collect::<Result<_, _>>()?,
            epoch: acl.epoch,
            owner_signature: Signature(fixed(&acl.owner_signature, "access list signature")?),
        },
        signer: PublicKey(fixed(&b.signer, "signer key")?),
        signature: Signature(fixed(&b.signature, "signature")?),
    };
    Ok(block)
}

fn ballot_to_wire(b: &Ballot) -> pb::Ballot {
    pb::Ballot {
        round: b.round,
        node: node_to_wire(&b.node),
    }
}

fn ballot_from_wire(b: Option<pb::Ballot>) -> Result<Ballot, WireError> {
    let b = required(b, "ballot")?;
    Ok(Ballot {
        round: b.round,
        node: node_from_wire(&b.node)?,
    })
}

fn config_to_wire(c: &Config) -> pb::QuorumConfig {
    pb::QuorumConfig {
        epoch: c.epoch,
        members: c.members.iter().map(node_to_wire).collect(),
    }
}

fn config_from_wire(c: Option<pb::QuorumConfig>) -> Result<Config, WireError> {
    let c = required(c, "quorum")?;
    if c.members.is_empty() || c.members.len() > 15 {
        return Err(bad(format!("a quorum of {} members", c.members.len())));
    }
    Ok(Config {
        epoch: c.epoch,
        members: c
            .members
            .iter()
            .map(|m| node_from_wire(m))
            .collect::<Result<_, _>>()?,
    })
}

pub fn chosen_to_wire(c: &Chosen<MutableBlock>) -> pb::ChosenState {
    pb::ChosenState {
        slot: c.slot,
        value: c.value.as_ref().map(block_to_wire),
        config: Some(config_to_wire(&c.config)),
    }
}

/// Decodes a block a message carries: [`block_from_wire`] checks it, and
/// [`unverified_block_from_wire`] leaves that to a caller that checks many
/// at once or checked the block before it stored it.
type BlockDecoder = fn(pb::MutableBlock) -> Result<MutableBlock, WireError>;

pub fn chosen_from_wire(c: pb::ChosenState) -> Result<Chosen<MutableBlock>, WireError> {
    chosen_with(c, block_from_wire)
}

fn chosen_with(c: pb::ChosenState, block: BlockDecoder) -> Result<Chosen<MutableBlock>, WireError> {
    Ok(Chosen {
        slot: c.slot,
        value: c.value.map(block).transpose()?,
        config: config_from_wire(c.config)?,
    })
}

fn opt_chosen(c: Option<pb::ChosenState>) -> Result<Option<Chosen<MutableBlock>>, WireError> {
    c.map(chosen_from_wire).transpose()
}

fn entry_to_wire(e: &Entry<MutableBlock>) -> pb::LogEntry {
    pb::LogEntry {
        kind: Some(match e {
            Entry::Write(b) => pb::log_entry::Kind::Write(block_to_wire(b)),
            Entry::Reconfigure(c) => pb::log_entry::Kind::Reconfigure(config_to_wire(c)),
        }),
    }
}

fn entry_with(
    e: Option<pb::LogEntry>,
    block: BlockDecoder,
) -> Result<Entry<MutableBlock>, WireError> {
    match required(required(e, "log entry")?.kind, "log entry")? {
        pb::log_entry::Kind::Write(b) => Ok(Entry::Write(block(b)?)),
        pb::log_entry::Kind::Reconfigure(c) => Ok(Entry::Reconfigure(config_from_wire(Some(c))?)),
    }
}

pub fn proposal_to_wire(p: &Proposal<MutableBlock>) -> pb::Proposal {
    pb::Proposal {
        ballot: Some(ballot_to_wire(&p.ballot)),
        slot: p.slot,
        entry: Some(entry_to_wire(&p.entry)),
    }
}

pub fn proposal_from_wire(
    p: Option<pb::Proposal>,
) -> Result<Option<Proposal<MutableBlock>>, WireError> {
    proposal_with(p, block_from_wire)
}

fn proposal_with(
    p: Option<pb::Proposal>,
    block: BlockDecoder,
) -> Result<Option<Proposal<MutableBlock>>, WireError> {
    p.map(|p| {
        Ok(Proposal {
            ballot: ballot_from_wire(p.ballot)?,
            slot: p.slot,
            entry: entry_with(p.entry, block)?,
        })
    })
    .transpose()
}

pub fn request_to_wire(address: &Address, r: &Request<MutableBlock>) -> pb::PaxosRequest {
    use pb::paxos_request::Kind;
    pb::PaxosRequest {
        address: address.0.to_vec(),
        kind: Some(match r {
            Request::Prepare { ballot } => Kind::Prepare(ballot_to_wire(ballot)),
            Request::Accept {
                ballot,
                base,
                entry,
            } => Kind::Accept(pb::Accept {
                ballot: Some(ballot_to_wire(ballot)),
                base: Some(chosen_to_wire(base)),
                entry: Some(entry_to_wire(entry)),
            }),
            Request::Commit { chosen } => Kind::Commit(chosen_to_wire(chosen)),
            Request::Read => Kind::Read(pb::ReadState {}),
        }),
    }
}

/// Decodes a batch of Paxos requests, one result per request. The
/// signatures of every block they carry are checked together
/// ([`MutableBlock::verify_all`]), at about half the cost of one by one.
pub fn requests_from_wire(
    batch: Vec<pb::PaxosRequest>,
) -> Vec<Result<(Address, Request<MutableBlock>), WireError>> {
    let decoded: Vec<_> = batch.into_iter().map(unverified_request).collect();
    MutableBlock::verify_all(decoded.iter().flatten().flat_map(|(_, r)| carried(r)));
    decoded
        .into_iter()
        .map(|decoded| {
            let (address, request) = decoded?;
            carried(&request).try_for_each(verified)?;
            Ok((address, request))
        })
        .collect()
}

/// The blocks a request carries.
fn carried(request: &Request<MutableBlock>) -> impl Iterator<Item = &MutableBlock> {
    let (chosen, entry) = match request {
        Request::Accept { base, entry, .. } => (Some(base), Some(entry)),
        Request::Commit { chosen } => (Some(chosen), None),
        Request::Prepare { .. } | Request::Read => (None, None),
    };
    let written = entry.and_then(|e| match e {
        Entry::Write(b) => Some(b),
        Entry::Reconfigure(_) => None,
    });
    chosen
        .and_then(|c| c.value.as_ref())
        .into_iter()
        .chain(written)
}

fn unverified_request(r: pb::PaxosRequest) -> Result<(Address, Request<MutableBlock>), WireError> {
    use pb::paxos_request::Kind;
    let block: BlockDecoder = unverified_block_from_wire;
    let address = address_from_wire(&r.address)?;
    let request = match required(r.kind, "request")? {
        Kind::Prepare(b) => Request::Prepare {
            ballot: ballot_from_wire(Some(b))?,
        },
        Kind::Accept(a) => Request::Accept {
            ballot: ballot_from_wire(a.ballot)?,
            base: chosen_with(required(a.base, "base state")?, block)?,
            entry: entry_with(a.entry, block)?,
        },
        Kind::Commit(c) => Request::Commit {
            chosen: chosen_with(c, block)?,
        },
        Kind::Read(_) => Request::Read,
    };
    Ok((address, request))
}

pub fn reply_to_wire(r: &Reply<MutableBlock>) -> pb::PaxosReply {
    use pb::paxos_reply::Kind;
    pb::PaxosReply {
        kind: Some(match r {
            Reply::Promised {
                ballot,
                accepted,
                chosen,
            } => Kind::Promised(pb::Promised {
                ballot: Some(ballot_to_wire(ballot)),
                accepted: accepted.as_ref().map(proposal_to_wire),
                chosen: chosen.as_ref().map(chosen_to_wire),
            }),
            Reply::Accepted { ballot, slot } => Kind::Accepted(pb::AcceptedReply {
                ballot: Some(ballot_to_wire(ballot)),
                slot: *slot,
            }),
            Reply::Rejected { promised, chosen } => Kind::Rejected(pb::Rejected {
                promised: Some(ballot_to_wire(promised)),
                chosen: chosen.as_ref().map(chosen_to_wire),
            }),
            Reply::NotMember { chosen } => Kind::NotMember(chosen_to_wire(chosen)),
            Reply::Invalid { reason } => Kind::Invalid(reason.clone()),
            Reply::Committed { slot } => Kind::Committed(*slot),
            Reply::State { accepted, chosen } => Kind::State(pb::StateReply {
                accepted: accepted.as_ref().map(proposal_to_wire),
                chosen: chosen.as_ref().map(chosen_to_wire),
            }),
        }),
    }
}

pub fn reply_from_wire(r: pb::PaxosReply) -> Result<Reply<MutableBlock>, WireError> {
    use pb::paxos_reply::Kind;
    Ok(match required(r.kind, "reply")? {
        Kind::Promised(p) => Reply::Promised {
            ballot: ballot_from_wire(p.ballot)?,
            accepted: proposal_from_wire(p.accepted)?,
            chosen: opt_chosen(p.chosen)?,
        },
        Kind::Accepted(a) => Reply::Accepted {
            ballot: ballot_from_wire(a.ballot)?,
            slot: a.slot,
        },
        Kind::Rejected(r) => Reply::Rejected {
            promised: ballot_from_wire(r.promised)?,
            chosen: opt_chosen(r.chosen)?,
        },
        Kind::NotMember(c) => Reply::NotMember {
            chosen: chosen_from_wire(c)?,
        },
        Kind::Invalid(reason) => Reply::Invalid { reason },
        Kind::Committed(slot) => Reply::Committed { slot },
        Kind::State(s) => Reply::State {
            accepted: proposal_from_wire(s.accepted)?,
            chosen: opt_chosen(s.chosen)?,
        },
    })
}

pub fn acceptor_to_wire(a: &Acceptor<MutableBlock>) -> pb::AcceptorState {
    pb::AcceptorState {
        promised: Some(ballot_to_wire(&a.promised)),
        accepted: a.accepted.as_ref().map(proposal_to_wire),
        chosen: a.chosen.as_ref().map(chosen_to_wire),
    }
}

/// An acceptor's stored state. This peer checked every block in it before
/// storing it, and RocksDB checksums what it stores, so the blocks are not
/// checked again on every request that reads the state.
pub fn acceptor_from_wire(a: pb::AcceptorState) -> Result<Acceptor<MutableBlock>, WireError> {
    Ok(Acceptor {
        promised: ballot_from_wire(a.promised)?,
        accepted: proposal_with(a.accepted, unverified_block_from_wire)?,
        chosen: a
            .chosen
            .map(|c| chosen_with(c, unverified_block_from_wire))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::mutable::WriterKey;

    #[test]
    fn a_reply_carrying_a_forged_block_is_rejected() {
        let key = WriterKey::from_secret([7; 32]);
        let block = key.create([1; 16], vec![], b"hello".to_vec());
        let chosen = Chosen {
            slot: 1,
            value: Some(block),
            config: Config {
                epoch: 1,
                members: vec![NodeId([1; 16])],
            },
        };
        let honest = reply_to_wire(&Reply::State {
            accepted: None,
            chosen: Some(chosen),
        });
        assert!(reply_from_wire(honest.clone()).is_ok());
        let mut forged = honest;
        if let Some(pb::paxos_reply::Kind::State(s)) = forged.kind.as_mut() {
            s.chosen.as_mut().unwrap().value.as_mut().unwrap().payload = b"forged".to_vec();
        }
        assert!(matches!(
            reply_from_wire(forged),
            Err(WireError::Unverified { .. })
        ));
    }

    #[test]
    fn blocks_round_trip_and_tampering_is_caught_on_decode() {
        let key = WriterKey::from_secret([7; 32]);
        let block = key.create([1; 16], vec![], b"hello".to_vec());
        let wire = block_to_wire(&block);
        assert_eq!(block_from_wire(wire.clone()).unwrap(), block);
        let mut tampered = wire;
        tampered.payload = b"jello".to_vec();
        assert!(block_from_wire(tampered).is_err());
    }
}
