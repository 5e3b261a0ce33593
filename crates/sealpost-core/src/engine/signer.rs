//! The device's MLS signer: its stored key pair, with the Ed25519 signing key expanded once.
//!
//! `openmls_basic_credential::SignatureKeyPair` keeps only the 32-byte seed and rebuilds
//! `ed25519_dalek::SigningKey` for every signature, which hashes the seed and derives the
//! public key (a scalar multiplication) before it signs. That is about a quarter of the
//! CPU of encrypting one application message (docs/BENCHMARKS-LOG.md, *Client crypto*), and
//! every message, commit and KeyPackage the device makes is signed. [`DeviceSigner`] builds
//! the signing key when the identity is loaded and signs with it; the signatures are the
//! same bytes (Ed25519 is deterministic). The key pair stays the stored form: the engine
//! still reads and writes it through OpenMLS's storage.

use ed25519_dalek::Signer as _;
use openmls::prelude::SignatureScheme;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::signatures::{Signer, SignerError};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::CoreError;

/// The device's signing key, ready to sign (see the module documentation).
/// `ed25519_dalek::SigningKey` zeroizes itself when dropped, as the key pair does.
pub(crate) struct DeviceSigner {
    key: ed25519_dalek::SigningKey,
}

impl DeviceSigner {
    /// Expands the stored key pair, which must be an Ed25519 pair whose public half
    /// matches its seed (a mismatch means a damaged store, and signatures made with it
    /// would not verify against the device's credential).
    pub(crate) fn new(pair: &SignatureKeyPair) -> Result<Self, CoreError> {
        if pair.signature_scheme() != SignatureScheme::ED25519 {
            return Err(CoreError::Mls(format!(
                "device key is a {:?} key; this client signs with Ed25519",
                pair.signature_scheme()
            )));
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&*seed(pair)?);
        if key.verifying_key().as_bytes().as_slice() != pair.public() {
            return Err(CoreError::Codec(
                "stored device signing key does not match its public key".into(),
            ));
        }
        Ok(Self { key })
    }
}

/// The pair's private half. `SignatureKeyPair` shows it only to its own tests, but its
/// serde form is a stable storage format (`{"private": [bytes], ...}`, kept by
/// `openmls_basic_credential` for stored key pairs), so it is read from there. The
/// buffers this fills are zeroized when dropped (best effort: serde's own intermediate
/// copies are not ours to clear).
fn seed(pair: &SignatureKeyPair) -> Result<Zeroizing<[u8; 32]>, CoreError> {
    #[derive(Deserialize)]
    struct Stored {
        private: Vec<u8>,
    }
    let malformed = || CoreError::Codec("stored device signing key is malformed".into());
    let encoded = Zeroizing::new(serde_json::to_vec(pair).map_err(|_| malformed())?);
    let stored: Stored = serde_json::from_slice(&encoded).map_err(|_| malformed())?;
    let private = Zeroizing::new(stored.private);
    let seed: [u8; 32] = private.as_slice().try_into().map_err(|_| malformed())?;
    Ok(Zeroizing::new(seed))
}

impl Signer for DeviceSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same bytes as the key pair's own signer, for several payloads, and they verify
    /// against the pair's public key.
    #[test]
    fn signs_exactly_as_the_key_pair_does() {
        let pair = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let signer = DeviceSigner::new(&pair).unwrap();
        let public =
            ed25519_dalek::VerifyingKey::try_from(pair.public()).expect("an Ed25519 public key");
        for payload in [&b""[..], b"one", &[7u8; 1000]] {
            let ours = signer.sign(payload).unwrap();
            assert_eq!(ours, pair.sign(payload).unwrap());
            let signature = ed25519_dalek::Signature::from_slice(&ours).unwrap();
            public.verify_strict(payload, &signature).unwrap();
        }
        assert_eq!(signer.signature_scheme(), SignatureScheme::ED25519);
    }

    /// A pair whose public half belongs to another seed is refused (and the same public
    /// half with its own seed is taken).
    #[test]
    fn refuses_a_pair_whose_halves_do_not_match() {
        let other = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let mixed = SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            vec![1; 32],
            other.verifying_key().to_bytes().to_vec(),
        );
        assert!(matches!(
            DeviceSigner::new(&mixed),
            Err(CoreError::Codec(_))
        ));
        let matching = SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            vec![2; 32],
            other.verifying_key().to_bytes().to_vec(),
        );
        assert!(DeviceSigner::new(&matching).is_ok());
    }

    /// Only Ed25519 pairs are taken.
    #[test]
    fn refuses_other_schemes() {
        let pair = SignatureKeyPair::new(SignatureScheme::ECDSA_SECP256R1_SHA256).unwrap();
        assert!(matches!(DeviceSigner::new(&pair), Err(CoreError::Mls(_))));
    }
}
