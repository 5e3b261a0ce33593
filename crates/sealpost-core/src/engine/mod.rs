//! The protocol engine: identity, conversations as MLS groups, history.
//!
//! The engine owns the local store and makes every protocol decision, but performs no
//! network I/O and reads no clock. Front ends (through [`crate::client`]) feed it server
//! answers and envelopes, and get back typed requests to send and history entries to show.
//!
//! Every operation that changes MLS state runs in one SQLite transaction that also records
//! its outcome (an outbox row, a history row, a processed-envelope marker): OpenMLS writes
//! through the same connection, so the change and its product commit or roll back together.
//!
//! Submodules: [`conversations`] (create, add, remove, leave, send), [`inbound`]
//! (processing envelopes), [`queries`] (listing conversations and history).

pub mod contacts;
pub mod conversations;
pub mod inbound;
pub mod queries;
mod signer;
pub mod transparency;

use std::cell::RefCell;
use std::path::Path;

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, CredentialType, CredentialWithKey, ExtensionType,
    KeyPackage, MlsGroupJoinConfig, MlsMessageOut, PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
    SenderRatchetConfiguration,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider as _;
use rusqlite::Connection;
use sealpost_proto::Bytes64;
use sealpost_proto::api::{RegisterRequest, UploadKeyPackagesRequest, login_signed_bytes};
use sealpost_proto::certificate::DeviceCertificate;
use sealpost_proto::names::validate_username;
use serde::Serialize;
use uuid::Uuid;

use self::signer::DeviceSigner;
use crate::error::CoreError;
use crate::identity::AccountKey;
use crate::payload::CONVERSATION_INFO_EXTENSION;
use crate::store::{self, GroupCache, Provider};

pub use queries::{ConversationKind, ConversationSummary, HistoryEntry};

/// The default ciphersuite: hybrid post-quantum KEM (ML-KEM-768 + X25519), AES-128-GCM,
/// SHA-256, Ed25519 signatures (see docs/PROTOCOL.md for why).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;
/// Epochs whose secrets are kept to decrypt late application messages.
const MAX_PAST_EPOCHS: usize = 3;
/// Sender ratchet: out-of-order tolerance and maximum forward distance.
const OUT_OF_ORDER_TOLERANCE: u32 = 32;
const MAX_FORWARD_DISTANCE: u32 = 10_000;

/// How many one-time KeyPackages a device keeps on the server.
pub const KEY_PACKAGE_TARGET: usize = 100;

/// The MLS capabilities every Sealpost leaf advertises.
pub(crate) fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        // Listing LastResort is what lets a last-resort KeyPackage validate.
        Some(&[
            ExtensionType::Unknown(CONVERSATION_INFO_EXTENSION),
            ExtensionType::LastResort,
        ]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// The configuration used to join and run every group.
pub(crate) fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .build()
}

/// Who this device is.
pub struct Identity {
    pub username: String,
    pub device_id: Uuid,
    pub server_url: String,
    pub(crate) account: AccountKey,
    pub(crate) signer: DeviceSigner,
    pub(crate) credential: CredentialWithKey,
}

impl Identity {
    /// The account's public key.
    pub fn account_key(&self) -> [u8; 32] {
        self.account.public()
    }
}

/// The client engine over one home directory.
pub struct Engine {
    pub(crate) conn: Connection,
    crypto: RustCrypto,
    pub(crate) identity: Option<Identity>,
    /// MLS groups in memory between transactions (see [`GroupCache`]).
    groups: RefCell<GroupCache>,
}

/// Rolls back the connection's open transaction when dropped armed.
struct RollbackGuard<'a> {
    conn: &'a Connection,
    armed: bool,
}

impl Drop for RollbackGuard<'_> {
    fn drop(&mut self) {
        if self.armed && !self.conn.is_autocommit() {
            // Nothing better to do with a failed rollback here: the next BEGIN reports it.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

fn tls_bytes(message: &MlsMessageOut) -> Result<Vec<u8>, CoreError> {
    message.tls_serialize_detached().map_err(CoreError::mls)
}

fn to_json<T: Serialize>(value: &T) -> Result<String, CoreError> {
    serde_json::to_string(value).map_err(|e| CoreError::Codec(e.to_string()))
}

impl Engine {
    /// Opens the store at `path` (created if missing) and loads the identity if any.
    pub fn open(path: &Path) -> Result<Self, CoreError> {
        let conn = store::open(path)?;
        let mut engine = Self {
            conn,
            crypto: RustCrypto::default(),
            identity: None,
            groups: RefCell::default(),
        };
        engine.identity = engine.load_identity()?;
        Ok(engine)
    }

    fn load_identity(&self) -> Result<Option<Identity>, CoreError> {
        let Some(username) = store::meta_text(&self.conn, "username")? else {
            return Ok(None);
        };
        let missing = |what: &str| CoreError::Codec(format!("identity is missing its {what}"));
        let device_id = store::meta_text(&self.conn, "device_id")?
            .and_then(|text| Uuid::parse_str(&text).ok())
            .ok_or_else(|| missing("device id"))?;
        let server_url =
            store::meta_text(&self.conn, "server_url")?.ok_or_else(|| missing("server url"))?;
        let account = AccountKey::from_secret(
            &store::meta_get(&self.conn, "account_secret")?
                .ok_or_else(|| missing("account key"))?,
        )?;
        let device_public =
            store::meta_get(&self.conn, "device_public")?.ok_or_else(|| missing("device key"))?;
        let certificate =
            store::meta_get(&self.conn, "certificate")?.ok_or_else(|| missing("certificate"))?;
        let provider = Provider::new(&self.crypto, &self.conn);
        let signer = SignatureKeyPair::read(
            provider.storage(),
            &device_public,
            CIPHERSUITE.signature_algorithm(),
        )
        .ok_or_else(|| missing("device signing key"))?;
        let signer = DeviceSigner::new(&signer)?;
        Ok(Some(Identity {
            username,
            device_id,
            server_url,
            account,
            credential: CredentialWithKey {
                credential: BasicCredential::new(certificate).into(),
                signature_key: device_public.into(),
            },
            signer,
        }))
    }

    /// The identity, or [`CoreError::NotRegistered`].
    pub fn identity(&self) -> Result<&Identity, CoreError> {
        self.identity.as_ref().ok_or(CoreError::NotRegistered)
    }

    pub fn is_registered(&self) -> bool {
        self.identity.is_some()
    }

    /// Runs `f` in one IMMEDIATE transaction with an OpenMLS provider on it; commits when
    /// `f` succeeds and rolls back otherwise. Groups `f` keeps in the provider stay in
    /// memory only if the transaction commits.
    ///
    /// `BEGIN` and `COMMIT` are cached statements (rusqlite's `Transaction` compiles both
    /// on every call, a tenth of the SQLite work of sending a message); a guard rolls back
    /// whatever did not commit, also on a panic.
    pub(crate) fn transact<T>(
        &mut self,
        f: impl FnOnce(&Provider<'_>, &Connection, Option<&Identity>) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        let conn = &self.conn;
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let mut guard = RollbackGuard { conn, armed: true };
        let begun = self.groups.borrow_mut().begin(conn);
        let result = begun.and_then(|()| {
            let provider = Provider::with_cache(&self.crypto, conn, &self.groups);
            let value = f(&provider, conn, self.identity.as_ref())?;
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(value)
        });
        match result {
            Ok(value) => {
                guard.armed = false;
                self.groups.borrow_mut().commit();
                Ok(value)
            }
            Err(err) => {
                drop(guard);
                self.groups.borrow_mut().rollback();
                Err(err)
            }
        }
    }

    /// Makes this device's MLS signature key and id.
    fn new_device_key() -> Result<(Uuid, SignatureKeyPair, [u8; 32]), CoreError> {
        let signer =
            SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(CoreError::mls)?;
        let device_key: [u8; 32] = signer
            .public()
            .try_into()
            .map_err(|_| CoreError::Mls("device key is not an Ed25519 key".into()))?;
        Ok((Uuid::new_v4(), signer, device_key))
    }

    /// Creates the account key, the first device and its certificate, and stores them.
    /// Returns the registration request for the server.
    pub fn create_identity(
        &mut self,
        username: &str,
        server_url: &str,
    ) -> Result<RegisterRequest, CoreError> {
        if let Some(identity) = &self.identity {
            return Err(CoreError::AlreadyRegistered(identity.username.clone()));
        }
        validate_username(username).map_err(|e| CoreError::InvalidInput(e.to_string()))?;
        let account = AccountKey::generate();
        let (device_id, signer, device_key) = Self::new_device_key()?;
        let certificate = account.certify(username, device_id, device_key).encode();
        let request = RegisterRequest {
            username: username.to_owned(),
            account_key: Bytes64(account.public().to_vec()),
            device_certificate: Bytes64(certificate.clone()),
        };
        self.transact(|provider, tx, _| {
            signer.store(provider.storage())?;
            store::meta_set(tx, "pending_username", username.as_bytes())?;
            store::meta_set(tx, "device_id", device_id.to_string().as_bytes())?;
            store::meta_set(tx, "server_url", server_url.as_bytes())?;
            store::meta_set(tx, "account_secret", account.secret().as_slice())?;
            store::meta_set(tx, "device_public", &device_key)?;
            store::meta_set(tx, "certificate", &certificate)?;
            Ok(())
        })?;
        Ok(request)
    }

    /// New device, step 1 of linking: makes this device's key and the request to seal for
    /// the existing device.
    pub fn prepare_link_device(
        &mut self,
        name: &str,
        server_url: &str,
    ) -> Result<crate::link::LinkRequest, CoreError> {
        if let Some(identity) = &self.identity {
            return Err(CoreError::AlreadyRegistered(identity.username.clone()));
        }
        let (device_id, signer, device_key) = Self::new_device_key()?;
        self.transact(|provider, tx, _| {
            signer.store(provider.storage())?;
            store::meta_set(tx, "device_id", device_id.to_string().as_bytes())?;
            store::meta_set(tx, "server_url", server_url.as_bytes())?;
            store::meta_set(tx, "device_public", &device_key)?;
            Ok(())
        })?;
        Ok(crate::link::LinkRequest {
            device_id,
            device_key: device_key.to_vec(),
            name: name.to_owned(),
        })
    }

    /// New device, last step of linking: checks the existing device's response (the
    /// certificate must be for this device, signed by the account key it brings) and
    /// becomes a registered device of that account.
    pub fn finish_link(&mut self, response: &crate::link::LinkResponse) -> Result<(), CoreError> {
        let device_id = self.device_id()?.ok_or(CoreError::NotRegistered)?;
        let device_public =
            store::meta_get(&self.conn, "device_public")?.ok_or(CoreError::NotRegistered)?;
        let account = AccountKey::from_secret(&response.account_secret)?;
        let cert = DeviceCertificate::decode(&response.certificate)
            .map_err(|e| CoreError::InvalidCertificate(e.to_string()))?;
        crate::identity::verify_certificate(&cert)?;
        if cert.device_id != device_id
            || cert.device_key.as_slice() != device_public.as_slice()
            || cert.account_key != account.public()
            || cert.username != response.username
        {
            return Err(CoreError::InvalidCertificate(
                "the certificate from the other device is not for this device".into(),
            ));
        }
        if response.kt_signing_key.len() != 32 || response.kt_vrf_key.is_empty() {
            return Err(CoreError::Transparency(
                "the other device sent no key-directory keys to pin".into(),
            ));
        }
        self.transact(|_, tx, _| {
            store::meta_set(tx, "account_secret", account.secret().as_slice())?;
            store::meta_set(tx, "certificate", &response.certificate)?;
            store::meta_set(tx, "kt_signing_key", &response.kt_signing_key)?;
            store::meta_set(tx, "kt_vrf_key", &response.kt_vrf_key)?;
            store::meta_set(tx, "username", response.username.as_bytes())?;
            Ok(())
        })?;
        self.identity = self.load_identity()?;
        Ok(())
    }

    /// Existing device: certifies a new device of this account and builds the response to
    /// seal for it (it carries the account key).
    pub fn certify_device(
        &self,
        request: &crate::link::LinkRequest,
    ) -> Result<(Vec<u8>, crate::link::LinkResponse), CoreError> {
        let identity = self.identity()?;
        let device_key: [u8; 32] =
            request.device_key.as_slice().try_into().map_err(|_| {
                CoreError::InvalidInput("the new device's key is not 32 bytes".into())
            })?;
        ed25519_dalek::VerifyingKey::from_bytes(&device_key)
            .map_err(|_| CoreError::InvalidInput("the new device's key is not valid".into()))?;
        let certificate = identity
            .account
            .certify(&identity.username, request.device_id, device_key)
            .encode();
        let kt = self.kt_keys()?;
        let response = crate::link::LinkResponse {
            username: identity.username.clone(),
            account_secret: identity.account.secret().to_vec(),
            certificate: certificate.clone(),
            kt_signing_key: kt.signing_key.to_vec(),
            kt_vrf_key: kt.vrf_public_key,
        };
        Ok((certificate, response))
    }

    /// Seals a device name for the server (readable by this account's devices only).
    pub fn seal_device_name(&self, device_id: Uuid, name: &str) -> Result<Vec<u8>, CoreError> {
        let chars = name.chars().count();
        if chars == 0
            || chars > sealpost_proto::limits::DEVICE_NAME_MAX_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(CoreError::InvalidInput(format!(
                "a device name is 1 to {} characters without control characters",
                sealpost_proto::limits::DEVICE_NAME_MAX_CHARS
            )));
        }
        self.identity()?.account.seal_device_name(device_id, name)
    }

    /// Marks the identity created by [`Self::create_identity`] as registered.
    pub fn confirm_registration(&mut self) -> Result<(), CoreError> {
        let username =
            store::meta_text(&self.conn, "pending_username")?.ok_or(CoreError::NotRegistered)?;
        store::meta_set(&self.conn, "username", username.as_bytes())?;
        self.conn
            .execute("DELETE FROM meta WHERE key = 'pending_username'", [])?;
        self.identity = self.load_identity()?;
        Ok(())
    }

    /// A registration that was started but not confirmed (e.g. interrupted).
    pub fn pending_registration(&self) -> Result<Option<RegisterRequest>, CoreError> {
        let Some(username) = store::meta_text(&self.conn, "pending_username")? else {
            return Ok(None);
        };
        let account = AccountKey::from_secret(
            &store::meta_get(&self.conn, "account_secret")?.unwrap_or_default(),
        )?;
        let certificate = store::meta_get(&self.conn, "certificate")?.unwrap_or_default();
        Ok(Some(RegisterRequest {
            username,
            account_key: Bytes64(account.public().to_vec()),
            device_certificate: Bytes64(certificate),
        }))
    }

    /// The server URL of a registered or pending identity.
    pub fn server_url(&self) -> Result<Option<String>, CoreError> {
        store::meta_text(&self.conn, "server_url")
    }

    /// The device id of a registered or pending identity.
    pub fn device_id(&self) -> Result<Option<Uuid>, CoreError> {
        Ok(store::meta_text(&self.conn, "device_id")?.and_then(|t| Uuid::parse_str(&t).ok()))
    }

    /// Signs a login challenge with the device key.
    pub fn sign_login(&self, nonce: &[u8]) -> Result<Vec<u8>, CoreError> {
        let device_public =
            store::meta_get(&self.conn, "device_public")?.ok_or(CoreError::NotRegistered)?;
        let device_id = self.device_id()?.ok_or(CoreError::NotRegistered)?;
        let provider = Provider::new(&self.crypto, &self.conn);
        let signer = SignatureKeyPair::read(
            provider.storage(),
            &device_public,
            CIPHERSUITE.signature_algorithm(),
        )
        .ok_or(CoreError::NotRegistered)?;
        openmls_traits::signatures::Signer::sign(&signer, &login_signed_bytes(&device_id, nonce))
            .map_err(|e| CoreError::Mls(format!("signing failed: {e:?}")))
    }

    /// The stored bearer token, if any.
    pub fn token(&self) -> Result<Option<String>, CoreError> {
        store::meta_text(&self.conn, "token")
    }

    pub fn set_token(&self, token: &str) -> Result<(), CoreError> {
        store::meta_set(&self.conn, "token", token.as_bytes())
    }

    /// Generates `count` one-time KeyPackages (and a last-resort one if asked) and
    /// returns the upload request. Their private keys are stored before this returns.
    pub fn generate_key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
    ) -> Result<UploadKeyPackagesRequest, CoreError> {
        self.transact(|provider, _, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let build = |last_resort: bool| -> Result<Bytes64, CoreError> {
                let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
                if last_resort {
                    builder = builder.mark_as_last_resort();
                }
                let bundle = builder
                    .build(
                        CIPHERSUITE,
                        provider,
                        &identity.signer,
                        identity.credential.clone(),
                    )
                    .map_err(CoreError::mls)?;
                let message = MlsMessageOut::from(bundle.key_package().clone());
                Ok(Bytes64(tls_bytes(&message)?))
            };
            let key_packages = (0..count)
                .map(|_| build(false))
                .collect::<Result<Vec<_>, _>>()?;
            let last_resort = if last_resort {
                Some(build(true)?)
            } else {
                None
            };
            Ok(UploadKeyPackagesRequest {
                key_packages,
                last_resort,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use openmls::prelude::tls_codec::Deserialize as _;
    use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};

    use super::*;

    #[test]
    fn generated_key_packages_verify_including_the_last_resort_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(&dir.path().join("db")).unwrap();
        engine
            .create_identity("alice", "http://127.0.0.1:1")
            .unwrap();
        engine.confirm_registration().unwrap();
        let upload = engine.generate_key_packages(2, true).unwrap();
        let crypto = RustCrypto::default();
        let all = upload.key_packages.iter().chain(upload.last_resort.iter());
        let mut last_resort = 0;
        for bytes in all {
            let MlsMessageBodyIn::KeyPackage(package) =
                MlsMessageIn::tls_deserialize_exact(bytes.as_ref())
                    .unwrap()
                    .extract()
            else {
                panic!("not a KeyPackage");
            };
            let package = package.validate(&crypto, ProtocolVersion::Mls10).unwrap();
            last_resort += usize::from(package.last_resort());
        }
        assert_eq!(last_resort, 1);
    }

    #[test]
    fn a_failed_or_panicking_transaction_leaves_nothing_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(&dir.path().join("db")).unwrap();
        let write = |conn: &Connection, key: &str| store::meta_set(conn, key, b"x");
        let failed: Result<(), CoreError> = engine.transact(|_, conn, _| {
            write(conn, "failed")?;
            Err(CoreError::InvalidInput("no".into()))
        });
        assert!(failed.is_err());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _: Result<(), CoreError> = engine.transact(|_, conn, _| {
                write(conn, "panicked").unwrap();
                panic!("in the middle of a transaction");
            });
        }));
        assert!(panicked.is_err());
        assert!(engine.conn.is_autocommit(), "no transaction left open");
        engine.transact(|_, conn, _| write(conn, "kept")).unwrap();
        for (key, present) in [("failed", false), ("panicked", false), ("kept", true)] {
            assert_eq!(
                store::meta_get(&engine.conn, key).unwrap().is_some(),
                present,
                "{key}"
            );
        }
    }
}
