//! Device certificates: the MLS credential of every Sealpost device (design §3).
//!
//! A certificate binds (username, device id, device signature key) to the account key and
//! is signed by the account key. It is the `identity` of the device's MLS BasicCredential,
//! so every member of every group can check it. This module only encodes and decodes; the
//! signature is made and checked with Ed25519 by the client and the server.
//!
//! The encoding is a fixed layout, so the signed bytes are canonical by construction:
//!
//! ```text
//! version:u8 (=1) | username_len:u8 | username | device_id:16 | device_key:32
//!     | account_key:32 | signature:64
//! ```
//!
//! The signature covers [`DeviceCertificate::signed_bytes`]: the context string
//! `"sealpost device certificate v1"`, then every field above except the signature.

use thiserror::Error;
use uuid::Uuid;

use crate::names::validate_username;

const VERSION: u8 = 1;
const CONTEXT: &[u8] = b"sealpost device certificate v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("the certificate is truncated or has trailing bytes")]
    Malformed,
    #[error("unsupported certificate version {0}")]
    UnsupportedVersion(u8),
    #[error("the certificate names an invalid username")]
    InvalidUsername,
}

/// A device certificate, signed by the account key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    pub username: String,
    pub device_id: Uuid,
    /// Ed25519 public key the device signs MLS messages with.
    pub device_key: [u8; 32],
    /// Ed25519 public account key that signed this certificate.
    pub account_key: [u8; 32],
    pub signature: [u8; 64],
}

impl std::fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("username", &self.username)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl DeviceCertificate {
    /// The bytes the account key signs.
    pub fn signed_bytes(
        username: &str,
        device_id: &Uuid,
        device_key: &[u8; 32],
        account_key: &[u8; 32],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONTEXT.len() + 2 + username.len() + 16 + 64);
        out.extend_from_slice(CONTEXT);
        out.push(VERSION);
        // Usernames are at most 32 bytes (validated), so the length fits in a u8.
        out.push(username.len().min(u8::MAX as usize) as u8);
        out.extend_from_slice(username.as_bytes());
        out.extend_from_slice(device_id.as_bytes());
        out.extend_from_slice(device_key);
        out.extend_from_slice(account_key);
        out
    }

    /// The signed bytes of this certificate.
    pub fn to_be_signed(&self) -> Vec<u8> {
        Self::signed_bytes(
            &self.username,
            &self.device_id,
            &self.device_key,
            &self.account_key,
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.username.len() + 16 + 32 + 32 + 64);
        out.push(VERSION);
        out.push(self.username.len().min(u8::MAX as usize) as u8);
        out.extend_from_slice(self.username.as_bytes());
        out.extend_from_slice(self.device_id.as_bytes());
        out.extend_from_slice(&self.device_key);
        out.extend_from_slice(&self.account_key);
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CertificateError> {
        let mut reader = Reader(bytes);
        let version = reader.take::<1>()?[0];
        if version != VERSION {
            return Err(CertificateError::UnsupportedVersion(version));
        }
        let username_len = reader.take::<1>()?[0] as usize;
        let username = reader.take_slice(username_len)?;
        let username = std::str::from_utf8(username)
            .map_err(|_| CertificateError::InvalidUsername)?
            .to_owned();
        validate_username(&username).map_err(|_| CertificateError::InvalidUsername)?;
        let device_id = Uuid::from_bytes(reader.take::<16>()?);
        let device_key = reader.take::<32>()?;
        let account_key = reader.take::<32>()?;
        let signature = reader.take::<64>()?;
        if !reader.0.is_empty() {
            return Err(CertificateError::Malformed);
        }
        Ok(Self {
            username,
            device_id,
            device_key,
            account_key,
            signature,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take_slice(&mut self, n: usize) -> Result<&[u8], CertificateError> {
        if self.0.len() < n {
            return Err(CertificateError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], CertificateError> {
        let slice = self.take_slice(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceCertificate {
        DeviceCertificate {
            username: "alice".into(),
            device_id: Uuid::from_bytes([9; 16]),
            device_key: [1; 32],
            account_key: [2; 32],
            signature: [3; 64],
        }
    }

    #[test]
    fn round_trip() {
        let cert = sample();
        let bytes = cert.encode();
        assert_eq!(bytes.len(), 2 + 5 + 16 + 32 + 32 + 64);
        assert_eq!(DeviceCertificate::decode(&bytes), Ok(cert));
    }

    #[test]
    fn rejects_truncation_trailing_bytes_and_bad_names() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(
                DeviceCertificate::decode(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            DeviceCertificate::decode(&longer),
            Err(CertificateError::Malformed)
        );
        let mut bad = bytes.clone();
        bad[2] = b'A';
        assert_eq!(
            DeviceCertificate::decode(&bad),
            Err(CertificateError::InvalidUsername)
        );
        let mut version = bytes;
        version[0] = 2;
        assert_eq!(
            DeviceCertificate::decode(&version),
            Err(CertificateError::UnsupportedVersion(2))
        );
    }

    #[test]
    fn signed_bytes_cover_every_field() {
        let cert = sample();
        let base = cert.to_be_signed();
        let mut other = cert.clone();
        other.device_key[0] ^= 1;
        assert_ne!(other.to_be_signed(), base);
        let mut other = cert.clone();
        other.account_key[0] ^= 1;
        assert_ne!(other.to_be_signed(), base);
        let mut other = cert;
        other.username = "alicf".into();
        assert_ne!(other.to_be_signed(), base);
    }
}
