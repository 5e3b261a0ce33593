//! Key-transparency verification: signed roots, lookup and history proofs, append-only
//! audits, and root gossip.
//!
//! Every answer about someone's keys carries an akd proof against a root hash the server
//! signed with its KT key; the client pinned that key (and the directory's VRF key) when
//! it registered. These functions are pure: they take the pinned keys and the server's
//! answer and return what was proven, or why not.

use akd::{AkdLabel, HistoryVerificationParams, LookupProof};
use ed25519_dalek::{Signature, VerifyingKey};
use sealpost_proto::kt::{DirectoryEntry, LookupEnvelope, SignedRoot, root_signed_bytes};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Must match the server's domain label and configuration.
#[derive(Clone)]
pub struct SealpostDomain;

impl akd::DomainLabel for SealpostDomain {
    fn domain_label() -> &'static [u8] {
        sealpost_proto::kt::DOMAIN_LABEL
    }
}

pub type KtConfiguration = akd::ExperimentalConfiguration<SealpostDomain>;

/// The server keys a client pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtKeys {
    pub signing_key: [u8; 32],
    pub vrf_public_key: Vec<u8>,
}

fn fail(why: impl Into<String>) -> CoreError {
    CoreError::Transparency(why.into())
}

fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CoreError> {
    ciborium::from_reader(bytes).map_err(|_| fail(format!("the {what} does not parse")))
}

/// Checks the server's signature on a root and returns its hash.
pub fn verify_root(keys: &KtKeys, root: &SignedRoot) -> Result<[u8; 32], CoreError> {
    let hash: [u8; 32] = root
        .root_hash
        .as_ref()
        .try_into()
        .map_err(|_| fail("a directory root hash is not 32 bytes"))?;
    let signature: [u8; 64] = root
        .signature
        .as_ref()
        .try_into()
        .map_err(|_| fail("a directory root signature is not 64 bytes"))?;
    let key = VerifyingKey::from_bytes(&keys.signing_key)
        .map_err(|_| fail("the pinned directory key is invalid"))?;
    key.verify_strict(
        &root_signed_bytes(root.epoch, &hash, &keys.vrf_public_key),
        &Signature::from_bytes(&signature),
    )
    .map_err(|_| {
        fail(format!(
            "the directory root of epoch {} is not signed by the server key this device pinned",
            root.epoch
        ))
    })?;
    Ok(hash)
}

/// Verifies a lookup proof for `username` and returns the proven directory entry.
pub fn verify_lookup(
    keys: &KtKeys,
    username: &str,
    envelope: &LookupEnvelope,
) -> Result<DirectoryEntry, CoreError> {
    let root_hash = verify_root(keys, &envelope.root)?;
    let proof: LookupProof = from_cbor(envelope.proof.as_ref(), "lookup proof")?;
    let result = akd::client::lookup_verify::<KtConfiguration>(
        &keys.vrf_public_key,
        root_hash,
        envelope.root.epoch,
        AkdLabel::from(username),
        proof,
    )
    .map_err(|e| {
        fail(format!(
            "the key directory proof for {username} does not verify: {e}"
        ))
    })?;
    DirectoryEntry::decode(&result.value.0).map_err(|e| {
        fail(format!(
            "the directory entry of {username} is malformed: {e}"
        ))
    })
}

/// One proven version of a username's directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenVersion {
    pub epoch: u64,
    pub version: u64,
    pub entry: DirectoryEntry,
}

/// Verifies a complete key history of `username`.
pub fn verify_history(
    keys: &KtKeys,
    username: &str,
    response: &sealpost_proto::kt::HistoryResponse,
) -> Result<Vec<ProvenVersion>, CoreError> {
    let root_hash = verify_root(keys, &response.root)?;
    let proof = from_cbor(response.proof.as_ref(), "history proof")?;
    let results = akd::client::key_history_verify::<KtConfiguration>(
        &keys.vrf_public_key,
        root_hash,
        response.root.epoch,
        AkdLabel::from(username),
        proof,
        HistoryVerificationParams::default(),
    )
    .map_err(|e| {
        fail(format!(
            "the key history of {username} does not verify: {e}"
        ))
    })?;
    results
        .into_iter()
        .map(|result| {
            Ok(ProvenVersion {
                epoch: result.epoch,
                version: result.version,
                entry: DirectoryEntry::decode(&result.value.0).map_err(|e| {
                    fail(format!("a directory entry of {username} is malformed: {e}"))
                })?,
            })
        })
        .collect()
}

/// Verifies that the directory only grew from the first root to the last, through every
/// epoch in between.
pub async fn verify_audit(
    keys: &KtKeys,
    response: &sealpost_proto::kt::AuditResponse,
) -> Result<(), CoreError> {
    let mut hashes = Vec::with_capacity(response.roots.len());
    for pair in response.roots.windows(2) {
        if pair[1].epoch != pair[0].epoch + 1 {
            return Err(fail(format!(
                "directory epochs are not consecutive: {} then {}",
                pair[0].epoch, pair[1].epoch
            )));
        }
    }
    for root in &response.roots {
        hashes.push(verify_root(keys, root)?);
    }
    let proof = from_cbor(response.proof.as_ref(), "append-only proof")?;
    akd::auditor::audit_verify::<KtConfiguration>(hashes, proof)
        .await
        .map_err(|e| fail(format!("the directory was not append-only: {e}")))
}

/// What a sender puts in the authenticated data of every application message: the latest
/// directory root it has seen, so receivers can spot a server showing people different
/// directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gossip {
    pub v: u8,
    pub epoch: u64,
    pub root_hash: Vec<u8>,
}

impl Gossip {
    pub fn new(epoch: u64, root_hash: [u8; 32]) -> Self {
        Self {
            v: 1,
            epoch,
            root_hash: root_hash.to_vec(),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, CoreError> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| CoreError::Codec(e.to_string()))?;
        Ok(out)
    }

    /// `None` for empty or unknown authenticated data.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > 512 {
            return None;
        }
        let gossip: Self = crate::payload::cbor_from_slice(bytes).ok()?;
        (gossip.root_hash.len() == 32).then_some(gossip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_round_trips_and_ignores_garbage() {
        let gossip = Gossip::new(7, [9; 32]);
        assert_eq!(Gossip::decode(&gossip.encode().unwrap()), Some(gossip));
        assert_eq!(Gossip::decode(b""), None);
        assert_eq!(Gossip::decode(b"\xff\x00"), None);
    }
}
