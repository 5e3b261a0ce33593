//! The application payload inside MLS application messages.
//!
//! Every application message carries one [`AppMessage`]: a version, a message id chosen
//! by the sender (receivers de-duplicate by it), the sender's clock and a typed body.
//! It is encoded as CBOR (RFC 8949): compact, schema'd by these types, and
//! self-describing, so a newer client can add body types and fields that older clients
//! skip ([`Body::Unsupported`]) instead of failing.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::CoreError;

/// Current payload version.
pub const VERSION: u16 = 1;
/// Largest payload a client accepts to decode.
pub const MAX_ENCODED_BYTES: usize = 60 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppMessage {
    pub v: u16,
    pub id: Uuid,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub sent_at_ms: i64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Body {
    Text {
        text: String,
    },
    /// A body type this client does not know.
    #[serde(other)]
    Unsupported,
}

impl AppMessage {
    pub fn text(id: Uuid, sent_at_ms: i64, text: String) -> Self {
        Self {
            v: VERSION,
            id,
            sent_at_ms,
            body: Body::Text { text },
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, CoreError> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| CoreError::Codec(e.to_string()))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        if bytes.len() > MAX_ENCODED_BYTES {
            return Err(CoreError::Codec("application payload too large".into()));
        }
        cbor_from_slice(bytes).map_err(|e| CoreError::Codec(e.to_string()))
    }
}

/// Decodes CBOR with a small scratch buffer: `ciborium::from_reader` zeroes a 4 KiB one on
/// every call (twice per received message). Longer strings are read in pieces.
pub(crate) fn cbor_from_slice<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, ciborium::de::Error<std::io::Error>> {
    ciborium::de::from_reader_with_buffer(bytes, &mut [0u8; 256])
}

/// Conversation metadata, carried in a private MLS group-context extension so that it
/// reaches members inside the (encrypted) Welcome and never appears in clear to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConversationInfo {
    Direct,
    Group { name: String },
}

/// The private-use MLS extension type of [`ConversationInfo`].
pub const CONVERSATION_INFO_EXTENSION: u16 = 0xF5A1;

impl ConversationInfo {
    pub fn encode(&self) -> Result<Vec<u8>, CoreError> {
        let mut out = Vec::new();
        ciborium::into_writer(self, &mut out).map_err(|e| CoreError::Codec(e.to_string()))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CoreError> {
        cbor_from_slice(bytes).map_err(|e| CoreError::Codec(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unknown_body_types_decode_as_unsupported() {
        #[derive(Serialize)]
        struct Future {
            v: u16,
            id: Uuid,
            sent_at_ms: i64,
            body: FutureBody,
        }
        #[derive(Serialize)]
        #[serde(tag = "t", rename_all = "snake_case")]
        enum FutureBody {
            Reaction { emoji: String },
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &Future {
                v: 2,
                id: Uuid::nil(),
                sent_at_ms: 5,
                body: FutureBody::Reaction {
                    emoji: "👍".into()
                },
            },
            &mut bytes,
        )
        .unwrap();
        let decoded = AppMessage::decode(&bytes).unwrap();
        assert_eq!(decoded.body, Body::Unsupported);
        assert_eq!(decoded.v, 2);
    }

    #[test]
    fn the_longest_text_decodes_past_the_scratch_buffer() {
        let text = "é".repeat(sealpost_proto::limits::TEXT_MAX_BYTES / 2);
        let message = AppMessage::text(Uuid::nil(), 1, text.clone());
        assert_eq!(
            AppMessage::decode(&message.encode().unwrap()).unwrap().body,
            Body::Text { text }
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(AppMessage::decode(b"\xff\x00garbage").is_err());
        assert!(AppMessage::decode(&vec![0; MAX_ENCODED_BYTES + 1]).is_err());
    }

    #[test]
    fn conversation_info_round_trips() {
        for info in [
            ConversationInfo::Direct,
            ConversationInfo::Group {
                name: "Book club".into(),
            },
        ] {
            assert_eq!(
                ConversationInfo::decode(&info.encode().unwrap()).unwrap(),
                info
            );
        }
    }

    proptest! {
        #[test]
        fn text_messages_round_trip(text in ".{0,200}", ms in any::<i64>(), id in any::<u128>()) {
            let message = AppMessage::text(Uuid::from_u128(id), ms, text);
            prop_assert_eq!(AppMessage::decode(&message.encode().unwrap()).unwrap(), message);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = AppMessage::decode(&bytes);
        }
    }
}
