//! Account keys and device certificates (design §3).
//!
//! An account has an Ed25519 account key. Each device has its own MLS signature key and a
//! certificate binding (username, device id, device key) to the account key. The
//! certificate is the device's MLS BasicCredential identity, and every client checks it
//! for every group member with [`verify_member`].

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use openmls::prelude::{BasicCredential, Credential};
use sealpost_proto::certificate::DeviceCertificate;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::CoreError;

/// The account's signing key. Zeroized on drop (ed25519-dalek's `zeroize` feature).
pub struct AccountKey(SigningKey);

impl AccountKey {
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_secret(secret: &[u8]) -> Result<Self, CoreError> {
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            secret
                .try_into()
                .map_err(|_| CoreError::Codec("stored account key is not 32 bytes".into()))?,
        );
        Ok(Self(SigningKey::from_bytes(&secret)))
    }

    pub fn secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// The key that seals device names, so that only the account's devices read them.
    fn name_key(&self) -> Zeroizing<[u8; 32]> {
        let secret = self.secret();
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, secret.as_slice());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is within HKDF-SHA-256's output limit; this cannot fail.
        let _ = hkdf.expand(b"sealpost device names v1", key.as_mut());
        key
    }

    /// Seals a device name (ChaCha20-Poly1305, random nonce, the device id as associated
    /// data) for the server to store.
    pub fn seal_device_name(&self, device_id: Uuid, name: &str) -> Result<Vec<u8>, CoreError> {
        use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
        let key = self.name_key();
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.as_ref().into());
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let sealed = cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: name.as_bytes(),
                    aad: device_id.as_bytes(),
                },
            )
            .map_err(|_| CoreError::Codec("sealing the device name failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a sealed device name; `None` if it was not sealed by this account.
    pub fn open_device_name(&self, device_id: Uuid, sealed: &[u8]) -> Option<String> {
        use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(12);
        let key = self.name_key();
        let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.as_ref().into());
        let plain = cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: device_id.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }

    /// Issues a certificate for a device of this account.
    pub fn certify(
        &self,
        username: &str,
        device_id: Uuid,
        device_key: [u8; 32],
    ) -> DeviceCertificate {
        let account_key = self.public();
        let signed =
            DeviceCertificate::signed_bytes(username, &device_id, &device_key, &account_key);
        DeviceCertificate {
            username: username.to_owned(),
            device_id,
            device_key,
            account_key,
            signature: self.0.sign(&signed).to_bytes(),
        }
    }
}

/// Checks a certificate's signature by the account key it names.
pub fn verify_certificate(cert: &DeviceCertificate) -> Result<(), CoreError> {
    let key = VerifyingKey::from_bytes(&cert.account_key)
        .map_err(|_| CoreError::InvalidCertificate("account key is not valid".into()))?;
    key.verify_strict(
        &cert.to_be_signed(),
        &Signature::from_bytes(&cert.signature),
    )
    .map_err(|_| {
        CoreError::InvalidCertificate(format!(
            "certificate of {} is not signed by its account key",
            cert.username
        ))
    })
}

/// Checks an MLS member: its credential must be a valid certificate whose device key is
/// the key the member signs with. Returns the certificate.
pub fn verify_member(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<DeviceCertificate, CoreError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| CoreError::InvalidCertificate("not a basic credential".into()))?;
    let cert = DeviceCertificate::decode(basic.identity())
        .map_err(|e| CoreError::InvalidCertificate(e.to_string()))?;
    if cert.device_key.as_slice() != signature_key {
        return Err(CoreError::InvalidCertificate(format!(
            "device {} of {} signs with a key its certificate does not name",
            cert.device_id, cert.username
        )));
    }
    verify_certificate(&cert)?;
    Ok(cert)
}

/// Reads the certificate out of a credential without verifying it (for display only).
pub fn certificate_of(credential: &Credential) -> Option<DeviceCertificate> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    DeviceCertificate::decode(basic.identity()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_verify_and_forgeries_do_not() {
        let account = AccountKey::generate();
        let device = Uuid::new_v4();
        let cert = account.certify("alice", device, [7; 32]);
        verify_certificate(&cert).unwrap();

        let mut forged = cert.clone();
        forged.device_key = [8; 32];
        assert!(verify_certificate(&forged).is_err());

        let other = AccountKey::generate();
        let mut swapped = cert.clone();
        swapped.account_key = other.public();
        assert!(verify_certificate(&swapped).is_err());

        let credential: Credential = BasicCredential::new(cert.encode()).into();
        assert!(verify_member(&credential, &[7; 32]).is_ok());
        assert!(verify_member(&credential, &[9; 32]).is_err());
    }

    #[test]
    fn device_names_open_only_for_the_same_account_and_device() {
        let key = AccountKey::generate();
        let device = Uuid::new_v4();
        let sealed = key.seal_device_name(device, "laptop").unwrap();
        assert_eq!(
            key.open_device_name(device, &sealed).as_deref(),
            Some("laptop")
        );
        assert_eq!(key.open_device_name(Uuid::new_v4(), &sealed), None);
        assert_eq!(
            AccountKey::generate().open_device_name(device, &sealed),
            None
        );
        assert_eq!(key.open_device_name(device, &sealed[..8]), None);
    }

    #[test]
    fn account_key_round_trips_through_its_secret() {
        let key = AccountKey::generate();
        let again = AccountKey::from_secret(key.secret().as_slice()).unwrap();
        assert_eq!(key.public(), again.public());
        assert!(AccountKey::from_secret(&[1, 2, 3]).is_err());
    }
}
