//! Device linking: the link code and the two messages sealed with keys derived from it.
//!
//! The existing device (E) makes a [`LinkCode`]: an 8-byte link id (the server's handle
//! for the session) and a 16-byte secret `S` (128 bits; never sent to the server). From
//! `S` both sides derive, with HKDF-SHA-256 (salt = link id):
//!
//! - `K_auth` (`"sealpost link v1 auth"`): the new device proves knowledge of the code by
//!   sending it; the server stores only `SHA-256(K_auth)` to check it.
//! - `K_n2e`, `K_e2n` (`"sealpost link v1 new-to-existing"` / `"… existing-to-new"`):
//!   ChaCha20-Poly1305 keys for the [`LinkRequest`] (new device → existing) and the
//!   [`LinkResponse`] (existing → new, carrying the account key). Each sealed message is
//!   `nonce (12 random bytes) | ciphertext`, with associated data
//!   `"sealpost link v1" | link id | direction`.
//!
//! The server relays both messages but, lacking `S`, can neither read them nor forge
//! them: it cannot substitute its own device key for the new device's, and it cannot learn
//! the account key.

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use data_encoding::BASE32_NOPAD;
use hkdf::Hkdf;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::CoreError;

const LINK_ID_LEN: usize = 8;
const SECRET_LEN: usize = 16;

/// What the new device sends (sealed) to the existing device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    pub device_id: Uuid,
    /// The new device's Ed25519 MLS signature key.
    pub device_key: Vec<u8>,
    pub name: String,
}

/// What the existing device sends (sealed) back: the account key and the new device's
/// certificate. Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct LinkResponse {
    pub username: String,
    pub account_secret: Vec<u8>,
    pub certificate: Vec<u8>,
    /// The key-directory keys the existing device pinned, so the new one trusts the same.
    #[serde(default)]
    pub kt_signing_key: Vec<u8>,
    #[serde(default)]
    pub kt_vrf_key: Vec<u8>,
}

impl std::fmt::Debug for LinkResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkResponse")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A one-time link code.
pub struct LinkCode {
    link_id: [u8; LINK_ID_LEN],
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

struct LinkKeys {
    auth: Zeroizing<[u8; 32]>,
    new_to_existing: Zeroizing<[u8; 32]>,
    existing_to_new: Zeroizing<[u8; 32]>,
}

#[derive(Clone, Copy)]
enum Direction {
    NewToExisting,
    ExistingToNew,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Self::NewToExisting => b"new-to-existing",
            Self::ExistingToNew => b"existing-to-new",
        }
    }
}

fn bad_code() -> CoreError {
    CoreError::InvalidInput("that is not a valid link code (check for typos)".into())
}

impl LinkCode {
    pub fn generate() -> Self {
        let mut link_id = [0u8; LINK_ID_LEN];
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut link_id);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        Self { link_id, secret }
    }

    /// Parses a code as shown by [`Self::display`]; case, spaces and dashes are ignored.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = Zeroizing::new(
            BASE32_NOPAD
                .decode(cleaned.as_bytes())
                .map_err(|_| bad_code())?,
        );
        if bytes.len() != LINK_ID_LEN + SECRET_LEN {
            return Err(bad_code());
        }
        let mut link_id = [0u8; LINK_ID_LEN];
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        link_id.copy_from_slice(&bytes[..LINK_ID_LEN]);
        secret.copy_from_slice(&bytes[LINK_ID_LEN..]);
        Ok(Self { link_id, secret })
    }

    /// The code for people: base32 in groups of four, e.g. `ABCD-EFGH-…`.
    pub fn display(&self) -> String {
        let mut bytes = Zeroizing::new(Vec::with_capacity(LINK_ID_LEN + SECRET_LEN));
        bytes.extend_from_slice(&self.link_id);
        bytes.extend_from_slice(self.secret.as_ref());
        let text = Zeroizing::new(BASE32_NOPAD.encode(&bytes));
        text.as_bytes()
            .chunks(4)
            .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    /// The session handle the server knows, as 16 hex characters.
    pub fn link_id(&self) -> String {
        hex::encode(self.link_id)
    }

    fn keys(&self) -> LinkKeys {
        let hkdf = Hkdf::<Sha256>::new(Some(&self.link_id), self.secret.as_ref());
        let expand = |info: &[u8]| {
            let mut out = Zeroizing::new([0u8; 32]);
            // 32 bytes is far below HKDF-SHA-256's output limit, so this cannot fail.
            let _ = hkdf.expand(info, out.as_mut());
            out
        };
        LinkKeys {
            auth: expand(b"sealpost link v1 auth"),
            new_to_existing: expand(b"sealpost link v1 new-to-existing"),
            existing_to_new: expand(b"sealpost link v1 existing-to-new"),
        }
    }

    /// What the new device presents to the server.
    pub fn proof(&self) -> Zeroizing<[u8; 32]> {
        self.keys().auth
    }

    /// What the existing device registers with the server: `SHA-256(proof)`.
    pub fn verifier(&self) -> [u8; 32] {
        Sha256::digest(self.keys().auth.as_ref()).into()
    }

    fn aad(&self, direction: Direction) -> Vec<u8> {
        let mut aad = b"sealpost link v1".to_vec();
        aad.extend_from_slice(&self.link_id);
        aad.extend_from_slice(direction.label());
        aad
    }

    fn seal(&self, direction: Direction, plaintext: &[u8]) -> Result<Vec<u8>, CoreError> {
        let keys = self.keys();
        let key = match direction {
            Direction::NewToExisting => &keys.new_to_existing,
            Direction::ExistingToNew => &keys.existing_to_new,
        };
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()));
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = self.aad(direction);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CoreError::Codec("sealing the link message failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        Ok(out)
    }

    fn open(&self, direction: Direction, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CoreError> {
        let keys = self.keys();
        let key = match direction {
            Direction::NewToExisting => &keys.new_to_existing,
            Direction::ExistingToNew => &keys.existing_to_new,
        };
        if sealed.len() < 12 {
            return Err(CoreError::InvalidCertificate(
                "the link message is truncated".into(),
            ));
        }
        let (nonce, ciphertext) = sealed.split_at(12);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()));
        let aad = self.aad(direction);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| {
                CoreError::InvalidCertificate(
                    "the link message does not open with this code: it was not sent by the \
                     other device"
                        .into(),
                )
            })
    }

    pub fn seal_request(&self, request: &LinkRequest) -> Result<Vec<u8>, CoreError> {
        let plain = serde_json::to_vec(request).map_err(|e| CoreError::Codec(e.to_string()))?;
        self.seal(Direction::NewToExisting, &plain)
    }

    pub fn open_request(&self, sealed: &[u8]) -> Result<LinkRequest, CoreError> {
        let plain = self.open(Direction::NewToExisting, sealed)?;
        serde_json::from_slice(&plain).map_err(|e| CoreError::Codec(e.to_string()))
    }

    pub fn seal_response(&self, response: &LinkResponse) -> Result<Vec<u8>, CoreError> {
        let plain = Zeroizing::new(
            serde_json::to_vec(response).map_err(|e| CoreError::Codec(e.to_string()))?,
        );
        self.seal(Direction::ExistingToNew, &plain)
    }

    pub fn open_response(&self, sealed: &[u8]) -> Result<LinkResponse, CoreError> {
        let plain = self.open(Direction::ExistingToNew, sealed)?;
        serde_json::from_slice(&plain).map_err(|e| CoreError::Codec(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LinkRequest {
        LinkRequest {
            device_id: Uuid::new_v4(),
            device_key: vec![5; 32],
            name: "laptop".into(),
        }
    }

    #[test]
    fn code_round_trips_through_its_display_form() {
        let code = LinkCode::generate();
        let shown = code.display();
        assert_eq!(shown.replace('-', "").len(), 39);
        let parsed = LinkCode::parse(&shown.to_lowercase().replace('-', " ")).unwrap();
        assert_eq!(parsed.link_id(), code.link_id());
        assert_eq!(parsed.verifier(), code.verifier());
        assert_eq!(
            Sha256::digest(parsed.proof().as_ref()).as_slice(),
            code.verifier()
        );
    }

    #[test]
    fn malformed_codes_are_rejected() {
        for text in ["", "ABCD", "!!!!-????", &"A".repeat(60)] {
            assert!(LinkCode::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn sealed_messages_open_only_with_the_same_code_and_direction() {
        let code = LinkCode::generate();
        let same = LinkCode::parse(&code.display()).unwrap();
        let other = LinkCode::generate();
        let sealed = code.seal_request(&request()).unwrap();
        assert_eq!(same.open_request(&sealed).unwrap().name, "laptop");
        assert!(other.open_request(&sealed).is_err());
        // A request cannot be replayed as a response (direction-bound keys and AAD).
        assert!(same.open_response(&sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(same.open_request(&tampered).is_err());
        assert!(same.open_request(&sealed[..5]).is_err());

        let response = LinkResponse {
            username: "alice".into(),
            account_secret: vec![1; 32],
            certificate: vec![2; 10],
            kt_signing_key: vec![3; 32],
            kt_vrf_key: vec![4; 32],
        };
        let sealed = same.seal_response(&response).unwrap();
        assert_eq!(code.open_response(&sealed).unwrap(), response);
        assert!(!format!("{response:?}").contains("account_secret"));
    }
}
