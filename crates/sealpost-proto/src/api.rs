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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `[a-z0-9_.]{3,32}`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_.]{3,32}$"))]
    pub username: String,
    /// Ed25519 public account key (32 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<32, 32>))]
    pub account_key: Bytes64,
    /// The first device's certificate (`certificate::DeviceCertificate`), signed by the
    /// account key (at most 1,024 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<0, { crate::limits::CERTIFICATE_MAX_BYTES }>))]
    pub device_certificate: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_.]{3,32}$"))]
    pub username: String,
    pub device_id: Uuid,
}

/// Asks for a login challenge for one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    pub device_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChallengeResponse {
    pub challenge_id: Uuid,
    /// 32 random bytes to sign: the login signature covers
    /// `"sealpost login v1" | device_id | nonce` (`login_signed_bytes`).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<32, 32>))]
    pub nonce: Bytes64,
    pub expires_in_secs: u64,
}

/// Answers a challenge with the device key's Ed25519 signature over
/// `"sealpost login v1" | device_id | nonce` (`login_signed_bytes`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub challenge_id: Uuid,
    /// Ed25519 signature (64 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<64, 64>))]
    pub signature: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmIResponse {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_.]{3,32}$"))]
    pub username: String,
    pub device_id: Uuid,
}

/// Uploads one-time KeyPackages and optionally replaces the last-resort one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UploadKeyPackagesRequest {
    /// One-time KeyPackages, each 1 to 8,192 bytes; at most 200 per upload and 500 stored
    /// per device.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(schema_with = crate::bytes::sized_list::<
            0,
            { crate::limits::KEY_PACKAGES_PER_UPLOAD },
            1,
            { crate::limits::KEY_PACKAGE_MAX_BYTES },
        >)
    )]
    pub key_packages: Vec<Bytes64>,
    /// Replaces the device's last-resort KeyPackage (1 to 8,192 bytes).
    #[serde(default)]
    pub last_resort: Option<Bytes64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyPackageCountResponse {
    pub one_time: u64,
    pub last_resort: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceInfo {
    pub device_id: Uuid,
    pub certificate: Bytes64,
    /// Day the device was registered, `YYYY-MM-DD`; empty when the directory still lists
    /// a device that has just been removed.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = "^([0-9]{4}-[0-9]{2}-[0-9]{2})?$")
    )]
    pub created: String,
    /// The device's name, sealed with a key only the account's devices hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_sealed: Option<Bytes64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenameDeviceRequest {
    /// The sealed name, 1 to 512 bytes.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<1, { crate::limits::DEVICE_NAME_SEALED_MAX_BYTES }>))]
    pub name_sealed: Bytes64,
}

/// Opens a device-link session. The server keeps `verifier` (SHA-256 of a key derived
/// from the link code) and never learns the code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateLinkRequest {
    /// 16 lowercase hex characters.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{16}$"))]
    pub link_id: String,
    /// SHA-256 of `K_auth` (32 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<32, 32>))]
    pub verifier: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateLinkResponse {
    pub expires_in_secs: u64,
}

/// The new device's first message: proof of the link code and its sealed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinLinkRequest {
    /// `K_auth`, whose SHA-256 is the session's verifier.
    pub proof: Bytes64,
    /// The new device's request sealed for the existing device, 1 to 4,096 bytes.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<1, { crate::limits::LINK_SEALED_MAX_BYTES }>))]
    pub sealed_request: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkStatusResponse {
    /// `open`, `joined` or `completed`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^(open|joined|completed)$"))]
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_request: Option<Bytes64>,
}

/// The existing device registers the new device and leaves a sealed response for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CompleteLinkRequest {
    /// The new device's certificate, signed by the account key (at most 1,024 bytes).
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<0, { crate::limits::CERTIFICATE_MAX_BYTES }>))]
    pub device_certificate: Bytes64,
    /// The response sealed for the new device, 1 to 4,096 bytes.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<1, { crate::limits::LINK_SEALED_MAX_BYTES }>))]
    pub sealed_response: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LinkResultRequest {
    /// `K_auth`, whose SHA-256 is the session's verifier.
    pub proof: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserDevicesResponse {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_.]{3,32}$"))]
    pub username: String,
    pub account_key: Bytes64,
    pub devices: Vec<DeviceInfo>,
    /// Proof that this account key and these certificates are what the key directory
    /// holds for the username.
    pub kt: crate::kt::LookupEnvelope,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimedKeyPackage {
    pub device_id: Uuid,
    pub certificate: Bytes64,
    pub key_package: Bytes64,
}

/// One KeyPackage for every device of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimKeyPackagesResponse {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9_.]{3,32}$"))]
    pub username: String,
    pub account_key: Bytes64,
    pub key_packages: Vec<ClaimedKeyPackage>,
}

/// Registers a new group whose only member is the calling device, at epoch 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// 32 lowercase hex characters.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{32}$"))]
    pub group_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupStateResponse {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{32}$"))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PostCommitRequest {
    /// Chosen by the client; resending the same id is idempotent.
    pub message_id: Uuid,
    /// The MLS commit, at most 4 MiB.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<0, { crate::limits::COMMIT_MAX_BYTES }>))]
    pub commit: Bytes64,
    /// The Welcome for `added_devices`, at most 3 MiB; required exactly when devices are
    /// added.
    #[serde(default)]
    pub welcome: Option<Bytes64>,
    /// At most 2,000 devices added and removed together.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 2000))]
    pub added_devices: Vec<Uuid>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 2000))]
    pub removed_devices: Vec<Uuid>,
}

/// A standalone proposal (MLS PublicMessage), used to leave a group: the server stops
/// delivering to `leaving_devices` (which must belong to the caller's account) and
/// the remaining members commit the removal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PostProposalRequest {
    pub message_id: Uuid,
    /// Exactly one proposal, at most 64 KiB.
    #[cfg_attr(
        feature = "openapi",
        schema(schema_with = crate::bytes::sized_list::<
            1,
            1,
            0,
            { crate::limits::PROPOSAL_MAX_BYTES },
        >)
    )]
    pub proposals: Vec<Bytes64>,
    #[serde(default)]
    pub leaving_devices: Vec<Uuid>,
}

/// An application message (MLS PrivateMessage) for the group's current epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PostMessageRequest {
    pub message_id: Uuid,
    /// The MLS PrivateMessage, at most 64 KiB.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::bytes::sized::<0, { crate::limits::APPLICATION_MESSAGE_MAX_BYTES }>))]
    pub message: Bytes64,
}

/// The server's answer to an accepted commit, proposal or message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SequencedResponse {
    /// Position in the group's total order.
    pub group_seq: u64,
    /// The group's epoch after this message.
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Envelope {
    /// Mailbox position; acknowledge with this.
    pub id: u64,
    /// The sender's message id (idempotency key; clients de-duplicate by it).
    pub message_id: Uuid,
    #[cfg_attr(feature = "openapi", schema(pattern = "^[0-9a-f]{32}$"))]
    pub group_id: String,
    pub group_seq: u64,
    pub kind: EnvelopeKind,
    /// Unix seconds when the server accepted the message.
    pub server_time: i64,
    /// The MLS message (TLS-serialized MlsMessageOut).
    pub payload: Bytes64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MailboxResponse {
    pub envelopes: Vec<Envelope>,
    /// True when more envelopes are waiting after these.
    pub more: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    /// Envelope ids (at most 1,000); unknown ids are ignored.
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub ids: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AckResponse {
    pub removed: u64,
}

/// Events the server pushes on the WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The device's mailbox has envelopes; fetch them.
    MailboxReady,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct MailboxQuery {
    /// Most envelopes to return; values above 500 mean 500 and 0 means 1. Default 500.
    #[cfg_attr(feature = "openapi", param(maximum = 18446744073709551615_u64))]
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
