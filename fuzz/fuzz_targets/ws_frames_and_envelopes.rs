//! What a client decodes from the server: WebSocket events and push-mode frames, mailbox
//! answers (stored envelopes), directory answers. A hostile server must not crash a client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_proto::api::{MailboxResponse, ServerEvent, UserDevicesResponse};
use sealpost_proto::kt::{AuditResponse, HistoryResponse, SignedRoot};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = sealpost_proto::ws::ServerFrame::decode(data) {
        assert_eq!(frame.encode().ok().as_deref(), Some(data));
    }
    let _ = serde_json::from_slice::<ServerEvent>(data);
    let _ = serde_json::from_slice::<MailboxResponse>(data);
    let _ = serde_json::from_slice::<UserDevicesResponse>(data);
    let _ = serde_json::from_slice::<SignedRoot>(data);
    let _ = serde_json::from_slice::<HistoryResponse>(data);
    let _ = serde_json::from_slice::<AuditResponse>(data);
    let _ = serde_json::from_slice::<sealpost_proto::ErrorBody>(data);
});
