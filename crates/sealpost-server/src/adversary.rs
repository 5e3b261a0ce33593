//! A deliberately malicious server, compiled only with the `adversarial` feature, so that
//! tests can show that clients detect each attack of the threat model. Handlers consult
//! [`Tamper`] at the points where a dishonest operator would lie.

use std::collections::HashMap;

use uuid::Uuid;

/// An account key and `(device id, certificate)` pairs.
pub type FakeEntry = ([u8; 32], Vec<(Uuid, Vec<u8>)>);

/// The lies the server currently tells.
#[derive(Debug, Default)]
pub struct Tamper {
    /// Answers `GET /v1/users/{name}` with this account key and these devices instead of
    /// the published ones (the proof stays the real one).
    pub substitute_devices: HashMap<String, FakeEntry>,
    /// Answers a KeyPackage claim for this user's devices with this (device id,
    /// certificate, KeyPackage) instead.
    pub substitute_claims: HashMap<String, (Uuid, Vec<u8>, Vec<u8>)>,
    /// Serves these root hashes (validly signed) for these epochs in `/v1/kt/roots`.
    pub forged_roots: HashMap<u64, Vec<u8>>,
    /// Serves the stored root of this older epoch as the current root.
    pub rollback_to: Option<u64>,
    /// Corrupts every commit before storing it for the recipients.
    pub corrupt_commits: bool,
    /// Corrupts application messages fetched by this device.
    pub corrupt_application_for: Option<Uuid>,
    /// Serves this device's mailbox in reverse order.
    pub reverse_mailbox_for: Option<Uuid>,
}

/// Flips one byte in the middle of a message.
pub fn corrupt(bytes: &mut [u8]) {
    let middle = bytes.len() / 2;
    if let Some(byte) = bytes.get_mut(middle) {
        *byte ^= 0x5a;
    }
}

/// The forged KeyPackage to hand out for `username`'s devices, if any.
pub fn forged_claim(
    state: &crate::api::AppState,
    username: &str,
) -> Option<sealpost_proto::api::ClaimedKeyPackage> {
    let tamper = state.tamper.lock().ok()?;
    let (device_id, certificate, key_package) = tamper.substitute_claims.get(username)?.clone();
    Some(sealpost_proto::api::ClaimedKeyPackage {
        device_id,
        certificate: sealpost_proto::Bytes64(certificate),
        key_package: sealpost_proto::Bytes64(key_package),
    })
}
