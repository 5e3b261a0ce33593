//! The WebSocket delivery protocol (`GET /v1/ws?mode=push`).
//!
//! In the default *wake* mode the socket only carries [`crate::api::ServerEvent`]s and the
//! client fetches and acknowledges over HTTP. In *push* mode the socket is the whole
//! delivery path, which is what makes one message cost one frame each way instead of three
//! HTTP requests:
//!
//! - the server first sends everything already waiting in the device's mailbox, then every
//!   new envelope as soon as it is durable, in mailbox order, batched into
//!   [`ServerFrame::Envelopes`] frames;
//! - the client acknowledges with [`ClientFrame::Ack`] once it has durably processed
//!   envelopes; the server answers [`ServerFrame::Acked`] when the deletion is durable;
//! - the client may send application messages with [`ClientFrame::Send`]; each is answered,
//!   once durable, by [`ServerFrame::Sent`] or [`ServerFrame::SendFailed`] carrying the
//!   client's `ref`. Handshake messages (commits, proposals) still go over HTTP.
//!
//! Delivery is at-least-once: an envelope not acknowledged before the socket closes is sent
//! again on the next connection, and clients de-duplicate by `message_id`.
//!
//! Every frame is a JSON text frame. Inbound frames are capped at
//! [`crate::limits::WS_INBOUND_FRAME_MAX_BYTES`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Bytes64;
use crate::api::{Envelope, SequencedResponse};
use crate::error::ErrorDetail;

/// Frames a client sends on a push-mode socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// An application message (MLS PrivateMessage) for a group.
    Send {
        /// Chosen by the client; echoed in the answer.
        #[serde(rename = "ref")]
        reference: u64,
        group_id: String,
        message_id: Uuid,
        message: Bytes64,
    },
    /// Envelopes processed durably; the server may forget them.
    Ack { ids: Vec<u64> },
}

/// Frames the server sends on a push-mode socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Envelopes in mailbox order.
    Envelopes { envelopes: Vec<Envelope> },
    /// A [`ClientFrame::Send`] was sequenced and is durable.
    Sent {
        #[serde(rename = "ref")]
        reference: u64,
        #[serde(flatten)]
        result: SequencedResponse,
    },
    /// A [`ClientFrame::Send`] was refused.
    SendFailed {
        #[serde(rename = "ref")]
        reference: u64,
        error: ErrorDetail,
    },
    /// An [`ClientFrame::Ack`] is durable; `removed` envelopes were deleted.
    Acked { removed: u64 },
    /// A frame could not be used; the socket stays open unless the error says otherwise.
    Error { error: ErrorDetail },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use crate::api::EnvelopeKind;

    #[test]
    fn client_frames_round_trip() {
        let send = ClientFrame::Send {
            reference: 7,
            group_id: "ab".repeat(16),
            message_id: Uuid::nil(),
            message: Bytes64(vec![1, 2, 3]),
        };
        let json = serde_json::to_string(&send).unwrap();
        assert!(json.starts_with(r#"{"type":"send","ref":7,"#), "{json}");
        assert_eq!(serde_json::from_str::<ClientFrame>(&json).unwrap(), send);
        let ack: ClientFrame = serde_json::from_str(r#"{"type":"ack","ids":[1,2]}"#).unwrap();
        assert_eq!(ack, ClientFrame::Ack { ids: vec![1, 2] });
    }

    #[test]
    fn client_frames_reject_unknown_types_and_fields() {
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"ack","ids":[],"x":1}"#).is_err());
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Envelopes {
                envelopes: vec![Envelope {
                    id: 1,
                    message_id: Uuid::nil(),
                    group_id: "ab".repeat(16),
                    group_seq: 3,
                    kind: EnvelopeKind::Application,
                    server_time: 10,
                    payload: Bytes64(vec![9]),
                }],
            },
            ServerFrame::Sent {
                reference: 1,
                result: SequencedResponse {
                    group_seq: 2,
                    epoch: 3,
                },
            },
            ServerFrame::SendFailed {
                reference: 2,
                error: ErrorDetail {
                    code: ErrorCode::EpochConflict,
                    message: "stale".into(),
                    current_epoch: Some(4),
                },
            },
            ServerFrame::Acked { removed: 5 },
        ];
        for frame in frames {
            let json = serde_json::to_string(&frame).unwrap();
            assert_eq!(serde_json::from_str::<ServerFrame>(&json).unwrap(), frame);
        }
    }
}
