//! Key transparency on the wire: directory entries, signed roots and proof envelopes.
//!
//! The server keeps an `akd` directory whose label is a username and whose value is the
//! canonical encoding of a [`DirectoryEntry`]: the account key and every device
//! certificate. Each epoch's root hash is signed by the server's KT key
//! ([`root_signed_bytes`]). Proofs (akd's `LookupProof`, `HistoryProof`,
//! `AppendOnlyProof`) travel as CBOR inside base64 fields; this crate does not interpret
//! them.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::Bytes64;

const ENTRY_VERSION: u8 = 1;

/// The domain separator of Sealpost's akd directory hashes; server and clients must use
/// the same one.
pub const DOMAIN_LABEL: &[u8] = b"sealpost key transparency v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("the directory entry is malformed")]
    Malformed,
    #[error("unsupported directory entry version {0}")]
    UnsupportedVersion(u8),
}

/// What the directory commits to for one username.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// The account key; all zero for a deleted account.
    pub account_key: [u8; 32],
    /// `(device id, certificate)`, sorted by device id.
    pub devices: Vec<(Uuid, Vec<u8>)>,
}

impl DirectoryEntry {
    pub fn new(account_key: [u8; 32], mut devices: Vec<(Uuid, Vec<u8>)>) -> Self {
        devices.sort_by_key(|(id, _)| *id);
        Self {
            account_key,
            devices,
        }
    }

    /// The entry of a deleted account: no key, no devices.
    pub fn deleted() -> Self {
        Self {
            account_key: [0; 32],
            devices: Vec::new(),
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.account_key == [0; 32]
    }

    /// `version:u8 | account_key:32 | count:u16 | (device_id:16 | len:u16 | certificate)*`
    /// with devices sorted by id: one byte string per entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(35 + self.devices.len() * 170);
        out.push(ENTRY_VERSION);
        out.extend_from_slice(&self.account_key);
        out.extend_from_slice(&(self.devices.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for (id, cert) in &self.devices {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&(cert.len().min(u16::MAX as usize) as u16).to_be_bytes());
            out.extend_from_slice(cert);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let (&version, rest) = bytes.split_first().ok_or(EntryError::Malformed)?;
        if version != ENTRY_VERSION {
            return Err(EntryError::UnsupportedVersion(version));
        }
        let (key, rest) = split(rest, 32)?;
        let (count, mut rest) = split(rest, 2)?;
        let count = u16::from_be_bytes([count[0], count[1]]) as usize;
        let mut devices = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let (id, tail) = split(rest, 16)?;
            let (len, tail) = split(tail, 2)?;
            let (cert, tail) = split(tail, u16::from_be_bytes([len[0], len[1]]) as usize)?;
            let id = Uuid::from_slice(id).map_err(|_| EntryError::Malformed)?;
            devices.push((id, cert.to_vec()));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(EntryError::Malformed);
        }
        let mut account_key = [0u8; 32];
        account_key.copy_from_slice(key);
        let entry = Self::new(account_key, devices);
        // Only the canonical (sorted) form is accepted, so one entry has one encoding.
        if entry.encode() != bytes {
            return Err(EntryError::Malformed);
        }
        Ok(entry)
    }
}

fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), EntryError> {
    if bytes.len() < n {
        return Err(EntryError::Malformed);
    }
    Ok(bytes.split_at(n))
}

/// What the server's KT key signs for each epoch.
pub fn root_signed_bytes(epoch: u64, root_hash: &[u8], vrf_public_key: &[u8]) -> Vec<u8> {
    let mut out = b"sealpost kt root v1".to_vec();
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(root_hash);
    out.extend_from_slice(vrf_public_key);
    out
}

/// An epoch's root hash with the server's signature over it (`root_signed_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignedRoot {
    pub epoch: u64,
    /// The directory's root hash (32 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<32, 32>))]
    pub root_hash: Bytes64,
    /// Ed25519 signature (64 bytes) by the KT signing key over `"sealpost kt root v1" |
    /// epoch (u64, big-endian) | root_hash | vrf_public_key`.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<64, 64>))]
    pub signature: Bytes64,
}

/// The server's KT public keys, pinned by clients at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KtKeysResponse {
    /// Ed25519 key that signs roots (32 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<32, 32>))]
    pub signing_key: Bytes64,
    /// The directory's VRF public key.
    pub vrf_public_key: Bytes64,
}

/// A lookup proof for one username against a signed root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LookupEnvelope {
    pub root: SignedRoot,
    /// CBOR of akd's `LookupProof`.
    pub proof: Bytes64,
}

/// A username's complete key history against a signed root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryResponse {
    pub root: SignedRoot,
    /// CBOR of akd's `HistoryProof`.
    pub proof: Bytes64,
}

/// Signed roots of a range of epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RootsResponse {
    pub roots: Vec<SignedRoot>,
}

/// An append-only proof between two epochs, with the signed roots of every epoch in
/// between.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditResponse {
    pub roots: Vec<SignedRoot>,
    /// CBOR of akd's `AppendOnlyProof`.
    pub proof: Bytes64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct EpochRange {
    /// First epoch of the range.
    pub from: u64,
    /// Last epoch of the range (inclusive).
    pub to: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_canonically() {
        let a = Uuid::from_u128(2);
        let b = Uuid::from_u128(1);
        let entry = DirectoryEntry::new([7; 32], vec![(a, vec![1, 2]), (b, vec![3])]);
        assert_eq!(entry.devices[0].0, b);
        let bytes = entry.encode();
        assert_eq!(DirectoryEntry::decode(&bytes).unwrap(), entry);
        assert!(
            DirectoryEntry::decode(&DirectoryEntry::deleted().encode())
                .unwrap()
                .is_deleted()
        );
        // Truncations, trailing bytes and non-canonical order are refused.
        for cut in 0..bytes.len() {
            assert!(DirectoryEntry::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(DirectoryEntry::decode(&longer).is_err());
        let unsorted = DirectoryEntry {
            account_key: [7; 32],
            devices: vec![(a, vec![1, 2]), (b, vec![3])],
        };
        assert!(DirectoryEntry::decode(&unsorted.encode()).is_err());
    }

    #[test]
    fn signed_bytes_bind_every_field() {
        let base = root_signed_bytes(1, &[2; 32], &[3; 32]);
        assert_ne!(base, root_signed_bytes(2, &[2; 32], &[3; 32]));
        assert_ne!(base, root_signed_bytes(1, &[4; 32], &[3; 32]));
        assert_ne!(base, root_signed_bytes(1, &[2; 32], &[5; 32]));
    }
}
