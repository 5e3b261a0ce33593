//! Request and response bodies of the `/v1` HTTP API and the WebSocket events.
//!
//! Routes (all JSON; `Authorization: Bearer TOKEN` where marked *auth*):
//!
//! | method and path | body → answer |
//! |---|---|
//! | `POST /v1/accounts` | [`RegisterRequest`] → [`RegisterResponse`] |
//! | `POST /v1/auth/challenge` | [`ChallengeRequest`] → [`ChallengeResponse`] |
//! | `POST /v1/auth/login` | [`LoginRequest`] → [`LoginResponse`] |
//! | `GET /v1/me` *auth* | → [`WhoAmIResponse`] |
//! | `POST /v1/keypackages` *auth* | [`UploadKeyPackagesRequest`] → [`KeyPackageCountResponse`] |
//! | `GET /v1/keypackages` *auth* | → [`KeyPackageCountResponse`] |
//! | `GET /v1/users/{username}` *auth* | → [`UserDevicesResponse`] |
//! | `POST /v1/users/{username}/keypackages/claim` *auth* | → [`ClaimKeyPackagesResponse`] |
//! | `POST /v1/groups` *auth* | [`CreateGroupRequest`] → [`GroupStateResponse`] |
//! | `GET /v1/groups/{group_id}` *auth* | → [`GroupStateResponse`] |
//! | `POST /v1/groups/{group_id}/commits` *auth* | [`PostCommitRequest`] → [`SequencedResponse`] |
//! | `POST /v1/groups/{group_id}/proposals` *auth* | [`PostProposalRequest`] → [`SequencedResponse`] |
//! | `POST /v1/groups/{group_id}/messages` *auth* | [`PostMessageRequest`] → [`SequencedResponse`] |
//! | `GET /v1/mailbox?limit=N` *auth* | → [`MailboxResponse`] |
//! | `POST /v1/mailbox/ack` *auth* | [`AckRequest`] → [`AckResponse`] |
//! | `GET /v1/ws` *auth* | WebSocket of [`ServerEvent`] |
//! | `DELETE /v1/accounts/me` *auth* | deletes the account and all its devices |
//! | `PUT /v1/devices/{device_id}/name` *auth* | [`RenameDeviceRequest`] |
//! | `DELETE /v1/devices/{device_id}` *auth* | revokes another device of the account |
//! | `POST /v1/devices/{device_id}/keypackages/claim` *auth* | → [`ClaimKeyPackagesResponse`] (one entry) |
//! | `POST /v1/links` *auth* | [`CreateLinkRequest`] → [`CreateLinkResponse`] |
//! | `GET /v1/links/{link_id}` *auth* | → [`LinkStatusResponse`] |
//! | `POST /v1/links/{link_id}/join` | [`JoinLinkRequest`] |
//! | `POST /v1/links/{link_id}/complete` *auth* | [`CompleteLinkRequest`] |
//! | `POST /v1/links/{link_id}/result` | [`LinkResultRequest`] → [`LinkResultResponse`] |
//!
//! Link ids are 16 lowercase hex characters (8 random bytes chosen by the existing device).
//!
//! Group ids are 32 lowercase hex characters (16 random bytes chosen by the creator).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Bytes64;

/// Registers an account and its first device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub username: String,
    /// Ed25519 public account key (32 bytes).
    pub account_key: Bytes64,
    /// The first device's certificate ([`crate::certificate::DeviceCertificate`]), signed
    /// by the account key.
    pub device_certificate: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub username: String,
    pub device_id: Uuid,
}

/// Asks for a login challenge for one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    pub device_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChallengeResponse {
    pub challenge_id: Uuid,
    /// 32 random bytes to sign, with [`login_signed_bytes`].
    pub nonce: Bytes64,
    pub expires_in_secs: u64,
}

/// Answers a challenge with the device key's signature over [`login_signed_bytes`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub challenge_id: Uuid,
    pub signature: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginResponse {
    /// Bearer token; the server keeps only its hash.
    pub token: String,
    pub expires_in_secs: u64,
}

/// What a device signs to log in: a context string, its id and the server's nonce.
pub fn login_signed_bytes(device_id: &Uuid, nonce: &[u8]) -> Vec<u8> {
    let mut out = b"sealpost login v1".to_vec();
    out.extend_from_slice(device_id.as_bytes());
    out.extend_from_slice(nonce);
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAmIResponse {
    pub username: String,
    pub device_id: Uuid,
}

/// Uploads one-time KeyPackages and optionally replaces the last-resort one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadKeyPackagesRequest {
    #[serde(default)]
    pub key_packages: Vec<Bytes64>,
    #[serde(default)]
    pub last_resort: Option<Bytes64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyPackageCountResponse {
    pub one_time: u64,
    pub last_resort: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: Uuid,
    pub certificate: Bytes64,
    /// Day the device was registered, `YYYY-MM-DD`.
    pub created: String,
    /// The device's name, sealed with a key only the account's devices hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_sealed: Option<Bytes64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameDeviceRequest {
    pub name_sealed: Bytes64,
}

/// Opens a device-link session. The server keeps `verifier` (SHA-256 of a key derived
/// from the link code) and never learns the code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateLinkRequest {
    pub link_id: String,
    pub verifier: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateLinkResponse {
    pub expires_in_secs: u64,
}

/// The new device's first message: proof of the link code and its sealed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinLinkRequest {
    pub proof: Bytes64,
    pub sealed_request: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatusResponse {
    /// `open`, `joined` or `completed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_request: Option<Bytes64>,
}

/// The existing device registers the new device and leaves a sealed response for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteLinkRequest {
    pub device_certificate: Bytes64,
    pub sealed_response: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkResultRequest {
    pub proof: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkResultResponse {
    pub sealed_response: Bytes64,
}

/// Checks a link id: 16 lowercase hex characters.
pub fn is_valid_link_id(link_id: &str) -> bool {
    link_id.len() == 16
        && link_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserDevicesResponse {
    pub username: String,
    pub account_key: Bytes64,
    pub devices: Vec<DeviceInfo>,
    /// Proof that this account key and these certificates are what the key directory
    /// holds for the username.
    pub kt: crate::kt::LookupEnvelope,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    pub device_id: Uuid,
    pub certificate: Bytes64,
    pub key_package: Bytes64,
}

/// One KeyPackage for every device of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimKeyPackagesResponse {
    pub username: String,
    pub account_key: Bytes64,
    pub key_packages: Vec<ClaimedKeyPackage>,
}

/// Registers a new group whose only member is the calling device, at epoch 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    pub group_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStateResponse {
    pub group_id: String,
    pub epoch: u64,
    pub members: Vec<Uuid>,
}

/// A commit (MLS PublicMessage) for the group's current epoch.
///
/// The commit's own framing says the epoch; the server accepts only the current epoch
/// (first wins) and answers `409 epoch_conflict` otherwise. `added_devices` get the
/// Welcome; `removed_devices` stop receiving after this commit (they still receive the
/// commit itself, so they learn they were removed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostCommitRequest {
    /// Chosen by the client; resending the same id is idempotent.
    pub message_id: Uuid,
    pub commit: Bytes64,
    #[serde(default)]
    pub welcome: Option<Bytes64>,
    #[serde(default)]
    pub added_devices: Vec<Uuid>,
    #[serde(default)]
    pub removed_devices: Vec<Uuid>,
}

/// A standalone proposal (MLS PublicMessage), used to leave a group: the server stops
/// delivering to `leaving_devices` (which must belong to the caller's account) and
/// the remaining members commit the removal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostProposalRequest {
    pub message_id: Uuid,
    pub proposals: Vec<Bytes64>,
    #[serde(default)]
    pub leaving_devices: Vec<Uuid>,
}

/// An application message (MLS PrivateMessage) for the group's current epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostMessageRequest {
    pub message_id: Uuid,
    pub message: Bytes64,
}

/// The server's answer to an accepted commit, proposal or message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencedResponse {
    /// Position in the group's total order.
    pub group_seq: u64,
    /// The group's epoch after this message.
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeKind {
    Commit,
    Welcome,
    Proposal,
    Application,
}

impl EnvelopeKind {
    pub fn as_i64(self) -> i64 {
        match self {
            Self::Commit => 1,
            Self::Welcome => 2,
            Self::Proposal => 3,
            Self::Application => 4,
        }
    }

    pub fn from_i64(value: i64) -> Option<Self> {
        match value {
            1 => Some(Self::Commit),
            2 => Some(Self::Welcome),
            3 => Some(Self::Proposal),
            4 => Some(Self::Application),
            _ => None,
        }
    }
}

/// One message waiting in a device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Mailbox position; acknowledge with this.
    pub id: u64,
    /// The sender's message id (idempotency key; clients de-duplicate by it).
    pub message_id: Uuid,
    pub group_id: String,
    pub group_seq: u64,
    pub kind: EnvelopeKind,
    /// Unix seconds when the server accepted the message.
    pub server_time: i64,
    /// The MLS message (TLS-serialized MlsMessageOut).
    pub payload: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxResponse {
    pub envelopes: Vec<Envelope>,
    /// True when more envelopes are waiting after these.
    pub more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckResponse {
    pub removed: u64,
}

/// Events the server pushes on the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The device's mailbox has envelopes; fetch them.
    MailboxReady,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MailboxQuery {
    pub limit: Option<usize>,
}

/// Checks a group id: 32 lowercase hex characters.
pub fn is_valid_group_id(group_id: &str) -> bool {
    group_id.len() == 32
        && group_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_kind_codes_round_trip() {
        for kind in [
            EnvelopeKind::Commit,
            EnvelopeKind::Welcome,
            EnvelopeKind::Proposal,
            EnvelopeKind::Application,
        ] {
            assert_eq!(EnvelopeKind::from_i64(kind.as_i64()), Some(kind));
        }
        assert_eq!(EnvelopeKind::from_i64(0), None);
    }

    #[test]
    fn envelope_round_trips() {
        let envelope = Envelope {
            id: 7,
            message_id: Uuid::nil(),
            group_id: "00".repeat(16),
            group_seq: 3,
            kind: EnvelopeKind::Application,
            server_time: 1_700_000_000,
            payload: Bytes64(vec![1, 2, 3]),
        };
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["kind"], "application");
        assert_eq!(json["payload"], "AQID");
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
    }

    #[test]
    fn server_event_shape() {
        let json = serde_json::to_string(&ServerEvent::MailboxReady).unwrap();
        assert_eq!(json, r#"{"type":"mailbox_ready"}"#);
    }

    #[test]
    fn requests_reject_unknown_fields() {
        let err = serde_json::from_str::<AckRequest>(r#"{"ids":[1],"extra":true}"#);
        assert!(err.is_err());
    }

    #[test]
    fn group_ids() {
        assert!(is_valid_group_id(&"ab".repeat(16)));
        assert!(!is_valid_group_id(&"AB".repeat(16)));
        assert!(!is_valid_group_id("abc"));
        assert!(!is_valid_group_id(&"zz".repeat(16)));
    }
}
