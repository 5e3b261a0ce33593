//! Deliberately malicious client behaviour, compiled only with the `adversarial` feature,
//! for tests that show honest clients detect it.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, CredentialWithKey, KeyPackage, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut,
    ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider as _;
use sealpost_proto::certificate::DeviceCertificate;
use uuid::Uuid;

use crate::engine::conversations::{Outgoing, OutgoingCommit};
use crate::engine::{CIPHERSUITE, Engine, capabilities};
use crate::error::CoreError;
use crate::identity::AccountKey;
use crate::store::Provider;

/// Makes a device key, a certificate for it (from `certify`) and a KeyPackage carrying
/// that certificate, in a scratch store.
fn device_with_key_package(
    certify: impl FnOnce([u8; 32]) -> DeviceCertificate,
    last_resort: bool,
) -> Result<(DeviceCertificate, Vec<u8>), CoreError> {
    let conn = crate::store::open_in_memory()?;
    let crypto = RustCrypto::default();
    let provider = Provider::new(&crypto, &conn);
    let signer =
        SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(CoreError::mls)?;
    let device_key: [u8; 32] = signer
        .public()
        .try_into()
        .map_err(|_| CoreError::Mls("not an Ed25519 key".into()))?;
    let cert = certify(device_key);
    let credential = CredentialWithKey {
        credential: BasicCredential::new(cert.encode()).into(),
        signature_key: device_key.to_vec().into(),
    };
    let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(CIPHERSUITE, &provider, &signer, credential)
        .map_err(CoreError::mls)?;
    let bytes = MlsMessageOut::from(bundle.key_package().clone())
        .tls_serialize_detached()
        .map_err(CoreError::mls)?;
    Ok((cert, bytes))
}

/// A KeyPackage for a "device of `victim`" whose certificate names the victim's real
/// account key but is signed by a key the forger made up. Returns the serialized
/// KeyPackage (as `MlsMessageOut`) and the certificate.
pub fn forged_key_package(
    victim: &str,
    victim_account_key: [u8; 32],
) -> Result<(Vec<u8>, DeviceCertificate), CoreError> {
    let forger = AccountKey::generate();
    let (cert, bytes) = device_with_key_package(
        |device_key| {
            let mut cert = forger.certify(victim, Uuid::new_v4(), device_key);
            cert.account_key = victim_account_key;
            cert
        },
        false,
    )?;
    Ok((bytes, cert))
}

/// A device for `victim` under a brand-new account key the attacker holds: everything
/// about it is valid except that the account key is not the victim's. Returns the
/// attacker's account public key, the certificate and a KeyPackage.
pub fn impostor_device(victim: &str) -> Result<([u8; 32], DeviceCertificate, Vec<u8>), CoreError> {
    let attacker = AccountKey::generate();
    let (cert, bytes) = device_with_key_package(
        |device_key| attacker.certify(victim, Uuid::new_v4(), device_key),
        true,
    )?;
    Ok((attacker.public(), cert, bytes))
}

impl Engine {
    /// A malicious member: commits an add of KeyPackages without checking their
    /// certificates.
    pub fn begin_add_unverified(
        &mut self,
        group_id: &str,
        packages: &[(Uuid, Vec<u8>)],
        now: i64,
    ) -> Result<OutgoingCommit, CoreError> {
        self.transact(|provider, tx, identity| {
            let identity = identity.ok_or(CoreError::NotRegistered)?;
            let mut group = crate::engine::conversations::require_group(provider, group_id)?;
            let mut parsed = Vec::new();
            for (_, bytes) in packages {
                let MlsMessageBodyIn::KeyPackage(package) =
                    MlsMessageIn::tls_deserialize_exact(bytes)
                        .map_err(CoreError::mls)?
                        .extract()
                else {
                    return Err(CoreError::Mls("not a KeyPackage".into()));
                };
                parsed.push(
                    package
                        .validate(provider.crypto(), ProtocolVersion::Mls10)
                        .map_err(CoreError::mls)?,
                );
            }
            let (commit, welcome, _) = group
                .add_members(provider, &identity.signer, &parsed)
                .map_err(CoreError::mls)?;
            let request = crate::engine::conversations::commit_request(
                &group,
                &commit,
                Some(&welcome),
                packages.iter().map(|(id, _)| *id).collect(),
            )?;
            let outgoing = OutgoingCommit {
                group_id: group_id.to_owned(),
                create_group: false,
                request,
                notice: None,
                announce: false,
            };
            crate::engine::conversations::insert_outbox(
                tx,
                &Outgoing::Commit(outgoing.clone()),
                group_id,
                now,
            )?;
            Ok(outgoing)
        })
    }
}
