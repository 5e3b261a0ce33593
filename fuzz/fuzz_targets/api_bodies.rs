//! Every request body the server accepts (JSON bodies, binary push-mode frames): decoding
//! arbitrary bytes must never panic, and a frame that decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_proto::api::*;
use sealpost_proto::kt::EpochRange;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<RegisterRequest>(data);
    let _ = serde_json::from_slice::<ChallengeRequest>(data);
    let _ = serde_json::from_slice::<LoginRequest>(data);
    let _ = serde_json::from_slice::<UploadKeyPackagesRequest>(data);
    let _ = serde_json::from_slice::<CreateGroupRequest>(data);
    let _ = serde_json::from_slice::<PostCommitRequest>(data);
    let _ = serde_json::from_slice::<PostProposalRequest>(data);
    let _ = serde_json::from_slice::<PostMessageRequest>(data);
    let _ = serde_json::from_slice::<AckRequest>(data);
    let _ = serde_json::from_slice::<RenameDeviceRequest>(data);
    let _ = serde_json::from_slice::<CreateLinkRequest>(data);
    let _ = serde_json::from_slice::<JoinLinkRequest>(data);
    let _ = serde_json::from_slice::<CompleteLinkRequest>(data);
    let _ = serde_json::from_slice::<LinkResultRequest>(data);
    let _ = serde_json::from_slice::<EpochRange>(data);
    if let Ok(frame) = sealpost_proto::ws::ClientFrame::decode(data) {
        assert_eq!(frame.encode().ok().as_deref(), Some(data));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = is_valid_group_id(text);
        let _ = is_valid_link_id(text);
        let _ = sealpost_proto::names::validate_username(text);
        let _ = sealpost_proto::names::validate_group_name(text);
    }
});
