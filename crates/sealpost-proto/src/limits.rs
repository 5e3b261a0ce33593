//! Limits that the server enforces on every input and that clients respect.
//!
//! Handshake messages must be large enough for big groups (design §4: with the hybrid
//! post-quantum suite a commit adding 1,000 members is about 2.7 MB and its Welcome about
//! 1.2 MB), while application messages stay small. Every number here is a cap checked
//! before the data is used; request bodies are capped before they are buffered.

/// Usernames are 3 to 32 characters.
pub const USERNAME_MIN_LEN: usize = 3;
pub const USERNAME_MAX_LEN: usize = 32;
/// Group display names, in characters.
pub const GROUP_NAME_MAX_CHARS: usize = 100;
/// Text of one message, in bytes of UTF-8.
pub const TEXT_MAX_BYTES: usize = 16 * 1024;

/// One MLS application message (PrivateMessage), serialized.
pub const APPLICATION_MESSAGE_MAX_BYTES: usize = 64 * 1024;
/// One MLS commit (PublicMessage), serialized: room for a 1,000-member hybrid-suite add.
pub const COMMIT_MAX_BYTES: usize = 4 * 1024 * 1024;
/// One MLS Welcome, serialized.
pub const WELCOME_MAX_BYTES: usize = 3 * 1024 * 1024;
/// One MLS proposal (PublicMessage), serialized.
pub const PROPOSAL_MAX_BYTES: usize = 64 * 1024;
/// One KeyPackage, serialized (ML-KEM-768 public keys make these ~1.5 KB).
pub const KEY_PACKAGE_MAX_BYTES: usize = 8 * 1024;
/// KeyPackages in one upload.
pub const KEY_PACKAGES_PER_UPLOAD: usize = 200;
/// One-time KeyPackages a device may keep on the server.
pub const KEY_PACKAGES_PER_DEVICE: usize = 500;
/// One device certificate, serialized.
pub const CERTIFICATE_MAX_BYTES: usize = 1024;
/// Devices in one account.
pub const DEVICES_PER_ACCOUNT: usize = 16;
/// Devices a single commit may add or remove.
pub const DEVICES_PER_COMMIT: usize = 2_000;
/// Envelopes returned by one mailbox fetch.
pub const MAILBOX_FETCH_MAX: usize = 500;
/// Envelope ids in one acknowledgement.
pub const ACK_MAX_IDS: usize = 1_000;
/// One inbound push-mode WebSocket frame (binary, see [`crate::ws`]): room for an
/// application message and its fields (at most 288 bytes), or an acknowledgement of
/// [`ACK_MAX_IDS`] ids (8 bytes each).
pub const WS_INBOUND_FRAME_MAX_BYTES: usize = APPLICATION_MESSAGE_MAX_BYTES + 1024;
/// Application messages one push-mode socket may have waiting to be sequenced; the server
/// stops reading the socket until answers are out.
pub const WS_SENDS_IN_FLIGHT: usize = 256;
/// Envelopes in one pushed frame.
pub const WS_ENVELOPES_PER_FRAME: usize = 64;

/// Body cap for ordinary JSON endpoints.
pub const SMALL_BODY_MAX_BYTES: usize = 256 * 1024;
/// Body cap for commit uploads: commit + welcome, base64-inflated (4/3), plus JSON framing.
pub const COMMIT_BODY_MAX_BYTES: usize = (COMMIT_MAX_BYTES + WELCOME_MAX_BYTES) * 4 / 3 + 64 * 1024;
/// Body cap for KeyPackage uploads.
pub const KEY_PACKAGE_BODY_MAX_BYTES: usize =
    (KEY_PACKAGES_PER_UPLOAD + 1) * KEY_PACKAGE_MAX_BYTES * 4 / 3 + 64 * 1024;

/// A device-link session lives this long.
pub const LINK_TTL_SECS: u64 = 600;
/// Wrong proofs a link session tolerates before it is destroyed.
pub const LINK_MAX_ATTEMPTS: i64 = 5;
/// A sealed link request or response.
pub const LINK_SEALED_MAX_BYTES: usize = 4 * 1024;
/// A sealed device name.
pub const DEVICE_NAME_SEALED_MAX_BYTES: usize = 512;
/// A device name, in characters.
pub const DEVICE_NAME_MAX_CHARS: usize = 64;
