//! Shared by the integration tests and the benches (`benches/crypto.rs` includes this file):
//! engines wired together without a server.
//!
//! [`World`] plays the server's part that the engine checks cryptographically: a real akd
//! key directory (in memory) whose roots are signed with a KT key every engine pins, so
//! engines add each other only after verifying real lookup proofs, exactly as with a
//! server. Everything else a server does (sequencing, mailboxes) is left out: the caller
//! hands the engines' outgoing requests over as [`Envelope`]s.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use akd::directory::Directory;
use akd::ecvrf::{HardCodedAkdVRF, VRFKeyStorage as _};
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AkdLabel, AkdValue, AzksParallelismConfig};
use ed25519_dalek::{Signer as _, SigningKey};
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, CredentialType, CredentialWithKey, ExtensionType, KeyPackage,
    MlsMessageOut,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use sealpost_core::engine::conversations::{OutgoingCommit, OutgoingMessage};
use sealpost_core::engine::{CIPHERSUITE, Engine};
use sealpost_core::identity::AccountKey;
use sealpost_core::kt::{KtConfiguration, KtKeys};
use sealpost_core::payload::{CONVERSATION_INFO_EXTENSION, ConversationInfo};
use sealpost_proto::Bytes64;
use sealpost_proto::api::{
    ClaimKeyPackagesResponse, ClaimedKeyPackage, DeviceInfo, Envelope, EnvelopeKind,
    UserDevicesResponse,
};
use sealpost_proto::kt::{DirectoryEntry, LookupEnvelope, SignedRoot, root_signed_bytes};
use uuid::Uuid;

/// A fixed clock (Unix seconds): the engine reads none.
pub const NOW: i64 = 1_800_000_000;

/// A key directory in memory with a signing key for its roots.
pub struct World {
    runtime: tokio::runtime::Runtime,
    directory: Directory<KtConfiguration, AsyncInMemoryDatabase, HardCodedAkdVRF>,
    signing: SigningKey,
    vrf_public: Vec<u8>,
    entries: BTreeMap<String, DirectoryEntry>,
}

impl World {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (directory, vrf_public) = runtime.block_on(async {
            let vrf = HardCodedAkdVRF;
            let vrf_public = vrf.get_vrf_public_key().await.unwrap().to_bytes().to_vec();
            let directory = Directory::new(
                StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
                vrf,
                AzksParallelismConfig::disabled(),
            )
            .await
            .unwrap();
            (directory, vrf_public)
        });
        Self {
            runtime,
            directory,
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
            vrf_public,
            entries: BTreeMap::new(),
        }
    }

    /// The keys an engine pins at registration.
    pub fn keys(&self) -> KtKeys {
        KtKeys {
            signing_key: self.signing.verifying_key().to_bytes(),
            vrf_public_key: self.vrf_public.clone(),
        }
    }

    /// Publishes the entries as one new directory epoch.
    pub fn publish(&mut self, entries: impl IntoIterator<Item = (String, DirectoryEntry)>) {
        let updates: Vec<(AkdLabel, AkdValue)> = entries
            .into_iter()
            .map(|(name, entry)| {
                let update = (AkdLabel::from(name.as_str()), AkdValue(entry.encode()));
                self.entries.insert(name, entry);
                update
            })
            .collect();
        if !updates.is_empty() {
            self.runtime
                .block_on(self.directory.publish(updates))
                .unwrap();
        }
    }

    fn sign(&self, epoch: u64, root_hash: &[u8]) -> SignedRoot {
        SignedRoot {
            epoch,
            root_hash: Bytes64(root_hash.to_vec()),
            signature: Bytes64(
                self.signing
                    .sign(&root_signed_bytes(epoch, root_hash, &self.vrf_public))
                    .to_bytes()
                    .to_vec(),
            ),
        }
    }

    /// What the server answers to `GET /v1/users/{name}`: the devices with a lookup proof.
    pub fn lookup(&self, username: &str) -> UserDevicesResponse {
        let (proof, root) = self
            .runtime
            .block_on(self.directory.lookup(AkdLabel::from(username)))
            .unwrap();
        let mut encoded = Vec::new();
        ciborium::into_writer(&proof, &mut encoded).unwrap();
        let entry = &self.entries[username];
        UserDevicesResponse {
            username: username.to_owned(),
            account_key: Bytes64(entry.account_key.to_vec()),
            devices: entry
                .devices
                .iter()
                .map(|(device_id, certificate)| DeviceInfo {
                    device_id: *device_id,
                    certificate: Bytes64(certificate.clone()),
                    created: "2026-01-01".into(),
                    name_sealed: None,
                })
                .collect(),
            kt: LookupEnvelope {
                root: self.sign(root.0, &root.1),
                proof: Bytes64(encoded),
            },
        }
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// A registered device with its own engine (and SQLite file).
pub struct User {
    pub engine: Engine,
    pub name: String,
    pub account_key: [u8; 32],
    pub device_id: Uuid,
    pub certificate: Vec<u8>,
}

impl User {
    /// Registers `name` with a new store at `path` and publishes its device.
    pub fn register(world: &mut World, path: &Path, name: &str) -> Self {
        let mut engine = Engine::open(path).unwrap();
        let request = engine.create_identity(name, "http://127.0.0.1:1").unwrap();
        engine.confirm_registration().unwrap();
        engine.pin_kt_keys(&world.keys()).unwrap();
        let user = Self {
            device_id: engine.device_id().unwrap().unwrap(),
            engine,
            name: name.to_owned(),
            account_key: request.account_key.as_ref().try_into().unwrap(),
            certificate: request.device_certificate.as_ref().to_vec(),
        };
        world.publish([(name.to_owned(), user.entry())]);
        user
    }

    pub fn entry(&self) -> DirectoryEntry {
        DirectoryEntry::new(
            self.account_key,
            vec![(self.device_id, self.certificate.clone())],
        )
    }

    /// A fresh one-time KeyPackage, as the server hands it out.
    pub fn claim(&mut self) -> ClaimKeyPackagesResponse {
        let upload = self.engine.generate_key_packages(1, false).unwrap();
        ClaimKeyPackagesResponse {
            username: self.name.clone(),
            account_key: Bytes64(self.account_key.to_vec()),
            key_packages: vec![ClaimedKeyPackage {
                device_id: self.device_id,
                certificate: Bytes64(self.certificate.clone()),
                key_package: upload.key_packages[0].clone(),
            }],
        }
    }

    /// Looks `username` up in the directory (verifying the proof), as before adding them.
    pub fn learn(&mut self, world: &World, username: &str) {
        self.engine
            .observe_directory(&world.lookup(username), NOW)
            .unwrap();
    }
}

/// A device that only hands out KeyPackages (it never runs an engine): the other members
/// of a large group.
pub struct Phantom {
    pub name: String,
    account: AccountKey,
    device_id: Uuid,
    signer: SignatureKeyPair,
    certificate: Vec<u8>,
}

/// The capabilities a Sealpost leaf advertises (as the engine's KeyPackages do).
pub fn sealpost_capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[
            ExtensionType::Unknown(CONVERSATION_INFO_EXTENSION),
            ExtensionType::LastResort,
        ]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

impl Phantom {
    pub fn new(name: &str) -> Self {
        let account = AccountKey::generate();
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        let device_id = Uuid::new_v4();
        let certificate = account
            .certify(name, device_id, signer.public().try_into().unwrap())
            .encode();
        Self {
            name: name.to_owned(),
            account,
            device_id,
            signer,
            certificate,
        }
    }

    pub fn entry(&self) -> DirectoryEntry {
        DirectoryEntry::new(
            self.account.public(),
            vec![(self.device_id, self.certificate.clone())],
        )
    }

    /// A KeyPackage (its private keys go to a scratch store and are never used).
    pub fn key_package(&self) -> KeyPackage {
        let scratch = OpenMlsRustCrypto::default();
        KeyPackage::builder()
            .leaf_node_capabilities(sealpost_capabilities())
            .build(
                CIPHERSUITE,
                &scratch,
                &self.signer,
                CredentialWithKey {
                    credential: BasicCredential::new(self.certificate.clone()).into(),
                    signature_key: self.signer.public().into(),
                },
            )
            .unwrap()
            .key_package()
            .clone()
    }

    pub fn claim(&self) -> ClaimKeyPackagesResponse {
        let bytes = MlsMessageOut::from(self.key_package())
            .tls_serialize_detached()
            .unwrap();
        ClaimKeyPackagesResponse {
            username: self.name.clone(),
            account_key: Bytes64(self.account.public().to_vec()),
            key_packages: vec![ClaimedKeyPackage {
                device_id: self.device_id,
                certificate: Bytes64(self.certificate.clone()),
                key_package: Bytes64(bytes),
            }],
        }
    }
}

/// The envelope a member receives for an accepted commit that carries a Welcome for it.
pub fn welcome_envelope(commit: &OutgoingCommit, mailbox_id: u64) -> Envelope {
    Envelope {
        id: mailbox_id,
        message_id: commit.request.message_id,
        group_id: commit.group_id.clone(),
        group_seq: 0,
        kind: EnvelopeKind::Welcome,
        server_time: NOW,
        payload: commit.request.welcome.clone().unwrap(),
    }
}

/// The envelope a member receives for an accepted commit (for the existing members).
pub fn commit_envelope(commit: &OutgoingCommit, mailbox_id: u64) -> Envelope {
    Envelope {
        id: mailbox_id,
        message_id: commit.request.message_id,
        group_id: commit.group_id.clone(),
        group_seq: 0,
        kind: EnvelopeKind::Commit,
        server_time: NOW,
        payload: commit.request.commit.clone(),
    }
}

/// The envelope a member receives for an application message.
pub fn message_envelope(message: &OutgoingMessage, mailbox_id: u64) -> Envelope {
    Envelope {
        id: mailbox_id,
        message_id: message.request.message_id,
        group_id: message.group_id.clone(),
        group_seq: 0,
        kind: EnvelopeKind::Application,
        server_time: NOW,
        payload: message.request.message.clone(),
    }
}

/// `from` starts a 1:1 with `to` (who processes the Welcome); returns the group id.
pub fn start_direct(world: &World, from: &mut User, to: &mut User) -> String {
    from.learn(world, &to.name);
    let claim = to.claim();
    let commit = from
        .engine
        .create_conversation(ConversationInfo::Direct, &[claim], NOW)
        .unwrap();
    from.engine.commit_accepted(&commit, NOW).unwrap();
    to.engine
        .process_envelope(&welcome_envelope(&commit, 1), NOW)
        .unwrap();
    commit.group_id
}

/// A text of `len` bytes (ASCII), different for every `n`.
pub fn text_of_len(n: usize, len: usize) -> String {
    let mut text = format!("message {n} ");
    while text.len() < len {
        text.push_str("lorem ipsum ");
    }
    text.truncate(len);
    text
}
