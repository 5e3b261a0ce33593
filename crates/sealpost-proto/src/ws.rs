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
//!   envelopes; if the client asks for it (`confirm`), the server answers
//!   [`ServerFrame::Acked`] when the deletion is durable, and otherwise only if the
//!   deletion failed ([`ServerFrame::Error`]). A client loses nothing by not asking: an
//!   envelope whose acknowledgement was lost is sent again and de-duplicated, so most
//!   clients need no answer, and not sending one saves a frame per acknowledgement;
//! - the client may send application messages with [`ClientFrame::Send`]; each is answered,
//!   once durable, by [`ServerFrame::Sent`] or [`ServerFrame::SendFailed`] carrying the
//!   client's `ref`. Handshake messages (commits, proposals) still go over HTTP.
//!
//! Delivery is at-least-once: an envelope not acknowledged before the socket closes is sent
//! again on the next connection, and clients de-duplicate by `message_id`.
//!
//! # Encoding
//!
//! Every frame is one binary WebSocket message: a type byte, then the fields in order.
//! Integers are little-endian and fixed-width (`u64`, `i64`, `u32`, `u8`); a message id is
//! its 16 bytes; a short string (group id, error code) is a `u8` length and UTF-8; a long
//! byte string (MLS message, error message) is a `u32` length and the bytes; a list is a
//! `u32` count and its items. Nothing may follow the last field.
//!
//! | type | frame | fields |
//! |---|---|---|
//! | `0x01` | [`ClientFrame::Send`] | ref `u64`, message id, group id, message |
//! | `0x02` | [`ClientFrame::Ack`] with `confirm` | list of mailbox ids (`u64`) |
//! | `0x03` | [`ClientFrame::Ack`] without `confirm` | list of mailbox ids (`u64`) |
//! | `0x81` | [`ServerFrame::Envelopes`] | list of envelopes: id `u64`, message id, group id, group seq `u64`, kind `u8`, server time `i64`, payload |
//! | `0x82` | [`ServerFrame::Sent`] | ref `u64`, group seq `u64`, epoch `u64` |
//! | `0x83` | [`ServerFrame::SendFailed`] | ref `u64`, error |
//! | `0x84` | [`ServerFrame::Acked`] | removed `u64` |
//! | `0x85` | [`ServerFrame::Error`] | error |
//!
//! An error is its code (short string, as in JSON error bodies), its message (long string)
//! and the current epoch (`u8` 0 or 1, then a `u64` if 1).
//!
//! Why a fixed layout written out here rather than JSON or a serialization crate: a
//! message is one frame each way, so the frame codec is on the hot path of every message
//! (JSON with base64 cost the server more than its sequencing statements); the layout is a
//! dozen fields, easy to read in any language (a browser's `DataView` included), and a
//! generic format would still need its own rules for byte strings, ids and error codes.
//! Inbound frames are capped at [`crate::limits::WS_INBOUND_FRAME_MAX_BYTES`].

use uuid::Uuid;

use crate::Bytes64;
use crate::api::{Envelope, EnvelopeKind, SequencedResponse};
use crate::error::{ErrorCode, ErrorDetail};

/// Frames a client sends on a push-mode socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// An application message (MLS PrivateMessage) for a group.
    Send {
        /// Chosen by the client; echoed in the answer.
        reference: u64,
        group_id: String,
        message_id: Uuid,
        message: Bytes64,
    },
    /// Envelopes processed durably; the server may forget them. With `confirm` the server
    /// answers [`ServerFrame::Acked`] once the deletion is durable; without, it answers
    /// only a refusal, and a deletion that fails later leaves the envelopes to come again.
    Ack { ids: Vec<u64>, confirm: bool },
}

/// Frames the server sends on a push-mode socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// Envelopes in mailbox order.
    Envelopes { envelopes: Vec<Envelope> },
    /// A [`ClientFrame::Send`] was sequenced and is durable.
    Sent {
        reference: u64,
        result: SequencedResponse,
    },
    /// A [`ClientFrame::Send`] was refused.
    SendFailed { reference: u64, error: ErrorDetail },
    /// A [`ClientFrame::Ack`] with `confirm` is durable; `removed` envelopes were deleted.
    Acked { removed: u64 },
    /// A frame could not be used; the socket stays open unless the error says otherwise.
    Error { error: ErrorDetail },
}

/// Why a frame does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the frame is empty")]
    Empty,
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("the frame ends inside a field")]
    Truncated,
    #[error("{0} bytes follow the last field")]
    TrailingBytes(usize),
    #[error("a string is not UTF-8")]
    NotUtf8,
    #[error("unknown envelope kind {0}")]
    UnknownKind(u8),
    #[error("unknown error code {0:?}")]
    UnknownErrorCode(String),
    #[error("a field is longer than its length prefix allows")]
    TooLong,
    #[error("a flag is {0}, not 0 or 1")]
    BadFlag(u8),
}

const SEND: u8 = 0x01;
const ACK: u8 = 0x02;
const ACK_QUIETLY: u8 = 0x03;
const ENVELOPES: u8 = 0x81;
const SENT: u8 = 0x82;
const SEND_FAILED: u8 = 0x83;
const ACKED: u8 = 0x84;
const ERROR: u8 = 0x85;

impl ClientFrame {
    /// The frame as a binary WebSocket message.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Writer::default();
        match self {
            Self::Send {
                reference,
                group_id,
                message_id,
                message,
            } => {
                out.reserve(1 + 8 + 16 + 1 + group_id.len() + 4 + message.len());
                out.u8(SEND);
                out.u64(*reference);
                out.id(message_id);
                out.short(group_id)?;
                out.long(message.as_ref())?;
            }
            Self::Ack { ids, confirm } => {
                out.reserve(1 + 4 + 8 * ids.len());
                out.u8(if *confirm { ACK } else { ACK_QUIETLY });
                out.count(ids.len())?;
                for id in ids {
                    out.u64(*id);
                }
            }
        }
        Ok(out.0)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut input = Reader(bytes);
        let frame = match input.frame_type()? {
            SEND => Self::Send {
                reference: input.u64()?,
                message_id: input.id()?,
                group_id: input.short()?,
                message: Bytes64(input.long()?.to_vec()),
            },
            kind @ (ACK | ACK_QUIETLY) => {
                let n = input.count(8)?;
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(input.u64()?);
                }
                Self::Ack {
                    ids,
                    confirm: kind == ACK,
                }
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        input.end()?;
        Ok(frame)
    }
}

impl ServerFrame {
    /// The frame as a binary WebSocket message.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Writer::default();
        match self {
            Self::Envelopes { envelopes } => {
                let size: usize = envelopes
                    .iter()
                    .map(|e| 8 + 16 + 1 + e.group_id.len() + 8 + 1 + 8 + 4 + e.payload.len())
                    .sum();
                out.reserve(1 + 4 + size);
                out.u8(ENVELOPES);
                out.count(envelopes.len())?;
                for envelope in envelopes {
                    out.u64(envelope.id);
                    out.id(&envelope.message_id);
                    out.short(&envelope.group_id)?;
                    out.u64(envelope.group_seq);
                    out.u8(envelope.kind.as_i64() as u8);
                    out.u64(envelope.server_time as u64);
                    out.long(envelope.payload.as_ref())?;
                }
            }
            Self::Sent { reference, result } => {
                out.u8(SENT);
                out.u64(*reference);
                out.u64(result.group_seq);
                out.u64(result.epoch);
            }
            Self::SendFailed { reference, error } => {
                out.u8(SEND_FAILED);
                out.u64(*reference);
                out.error(error)?;
            }
            Self::Acked { removed } => {
                out.u8(ACKED);
                out.u64(*removed);
            }
            Self::Error { error } => {
                out.u8(ERROR);
                out.error(error)?;
            }
        }
        Ok(out.0)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut input = Reader(bytes);
        let frame = match input.frame_type()? {
            ENVELOPES => {
                // The smallest envelope is 46 bytes: a count cannot make us allocate more
                // than the frame could hold.
                let n = input.count(46)?;
                let mut envelopes = Vec::with_capacity(n);
                for _ in 0..n {
                    envelopes.push(Envelope {
                        id: input.u64()?,
                        message_id: input.id()?,
                        group_id: input.short()?,
                        group_seq: input.u64()?,
                        kind: {
                            let kind = input.u8()?;
                            EnvelopeKind::from_i64(kind.into())
                                .ok_or(FrameError::UnknownKind(kind))?
                        },
                        server_time: input.u64()? as i64,
                        payload: Bytes64(input.long()?.to_vec()),
                    });
                }
                Self::Envelopes { envelopes }
            }
            SENT => Self::Sent {
                reference: input.u64()?,
                result: SequencedResponse {
                    group_seq: input.u64()?,
                    epoch: input.u64()?,
                },
            },
            SEND_FAILED => Self::SendFailed {
                reference: input.u64()?,
                error: input.error()?,
            },
            ACKED => Self::Acked {
                removed: input.u64()?,
            },
            ERROR => Self::Error {
                error: input.error()?,
            },
            other => return Err(FrameError::UnknownType(other)),
        };
        input.end()?;
        Ok(frame)
    }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn reserve(&mut self, n: usize) {
        self.0.reserve_exact(n);
    }

    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn count(&mut self, n: usize) -> Result<(), FrameError> {
        let n = u32::try_from(n).map_err(|_| FrameError::TooLong)?;
        self.0.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    fn id(&mut self, id: &Uuid) {
        self.0.extend_from_slice(id.as_bytes());
    }

    fn short(&mut self, text: &str) -> Result<(), FrameError> {
        let n = u8::try_from(text.len()).map_err(|_| FrameError::TooLong)?;
        self.0.push(n);
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }

    fn long(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.count(bytes.len())?;
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn error(&mut self, error: &ErrorDetail) -> Result<(), FrameError> {
        self.short(error.code.as_str())?;
        self.long(error.message.as_bytes())?;
        match error.current_epoch {
            Some(epoch) => {
                self.u8(1);
                self.u64(epoch);
            }
            None => self.u8(0),
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn frame_type(&mut self) -> Result<u8, FrameError> {
        if self.0.is_empty() {
            return Err(FrameError::Empty);
        }
        self.u8()
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        match self.take(1)? {
            [byte] => Ok(*byte),
            _ => Err(FrameError::Truncated),
        }
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(
            bytes.try_into().map_err(|_| FrameError::Truncated)?,
        ))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(
            bytes.try_into().map_err(|_| FrameError::Truncated)?,
        ))
    }

    /// A list count, checked against what the rest of the frame can hold when each item
    /// takes at least `item_size` bytes.
    fn count(&mut self, item_size: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_size) > self.0.len() {
            return Err(FrameError::Truncated);
        }
        Ok(n)
    }

    fn id(&mut self) -> Result<Uuid, FrameError> {
        Uuid::from_slice(self.take(16)?).map_err(|_| FrameError::Truncated)
    }

    fn short(&mut self) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8)
    }

    fn long(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn error(&mut self) -> Result<ErrorDetail, FrameError> {
        let code = self.short()?;
        let code = ErrorCode::from_wire(&code).ok_or(FrameError::UnknownErrorCode(code))?;
        let message = String::from_utf8(self.long()?.to_vec()).map_err(|_| FrameError::NotUtf8)?;
        let current_epoch = match self.u8()? {
            0 => None,
            1 => Some(self.u64()?),
            other => return Err(FrameError::BadFlag(other)),
        };
        Ok(ErrorDetail {
            code,
            message,
            current_epoch,
        })
    }

    fn end(&self) -> Result<(), FrameError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(FrameError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(id: u64, payload: &[u8]) -> Envelope {
        Envelope {
            id,
            message_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            group_id: "ab".repeat(16),
            group_seq: 3,
            kind: EnvelopeKind::Application,
            server_time: 1_800_000_000,
            payload: Bytes64(payload.to_vec()),
        }
    }

    fn client_frames() -> Vec<ClientFrame> {
        vec![
            ClientFrame::Send {
                reference: 7,
                group_id: "ab".repeat(16),
                message_id: Uuid::nil(),
                message: Bytes64(vec![1, 2, 3]),
            },
            ClientFrame::Ack {
                ids: vec![1, 2],
                confirm: true,
            },
            ClientFrame::Ack {
                ids: vec![],
                confirm: true,
            },
            ClientFrame::Ack {
                ids: vec![3],
                confirm: false,
            },
        ]
    }

    fn server_frames() -> Vec<ServerFrame> {
        vec![
            ServerFrame::Envelopes {
                envelopes: vec![envelope(1, &[9]), envelope(u64::MAX, &[])],
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
            ServerFrame::Error {
                error: ErrorDetail {
                    code: ErrorCode::BadRequest,
                    message: "ü".into(),
                    current_epoch: None,
                },
            },
        ]
    }

    #[test]
    fn frames_round_trip() {
        for frame in client_frames() {
            let bytes = frame.encode().unwrap();
            assert_eq!(ClientFrame::decode(&bytes).unwrap(), frame);
        }
        for frame in server_frames() {
            let bytes = frame.encode().unwrap();
            assert_eq!(ServerFrame::decode(&bytes).unwrap(), frame);
        }
    }

    /// The layout of the module documentation, byte for byte.
    #[test]
    fn layout_is_the_documented_one() {
        let send = ClientFrame::Send {
            reference: 0x0102,
            group_id: "g".into(),
            message_id: Uuid::from_bytes([0xee; 16]),
            message: Bytes64(vec![0xaa, 0xbb]),
        };
        let mut expected = vec![0x01, 0x02, 0x01, 0, 0, 0, 0, 0, 0];
        expected.extend([0xee; 16]);
        expected.extend([1, b'g', 2, 0, 0, 0, 0xaa, 0xbb]);
        assert_eq!(send.encode().unwrap(), expected);

        let sent = ServerFrame::Sent {
            reference: 1,
            result: SequencedResponse {
                group_seq: 2,
                epoch: 3,
            },
        };
        let mut expected = vec![0x82];
        for n in [1u64, 2, 3] {
            expected.extend(n.to_le_bytes());
        }
        assert_eq!(sent.encode().unwrap(), expected);

        let failed = ServerFrame::Error {
            error: ErrorDetail {
                code: ErrorCode::MailboxFull,
                message: "x".into(),
                current_epoch: Some(9),
            },
        };
        let mut expected = vec![0x85, 12];
        expected.extend(b"mailbox_full");
        expected.extend([1, 0, 0, 0, b'x', 1]);
        expected.extend(9u64.to_le_bytes());
        assert_eq!(failed.encode().unwrap(), expected);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for frame in client_frames() {
            let bytes = frame.encode().unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    ClientFrame::decode(&bytes[..cut]).is_err(),
                    "{frame:?} cut at {cut}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(
                ClientFrame::decode(&longer),
                Err(FrameError::TrailingBytes(1))
            );
        }
        for frame in server_frames() {
            let bytes = frame.encode().unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    ServerFrame::decode(&bytes[..cut]).is_err(),
                    "{frame:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn hostile_frames_are_refused_without_large_allocations() {
        // A count of 2^32 - 1 ids in a 5-byte frame.
        assert_eq!(
            ClientFrame::decode(&[ACK, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            ServerFrame::decode(&[ENVELOPES, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Truncated)
        );
        assert_eq!(ClientFrame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(ServerFrame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(
            ClientFrame::decode(&[0x7f]),
            Err(FrameError::UnknownType(0x7f))
        );
        // A server frame is not a client frame.
        let acked = ServerFrame::Acked { removed: 1 }.encode().unwrap();
        assert_eq!(
            ClientFrame::decode(&acked),
            Err(FrameError::UnknownType(ACKED))
        );
        let mut bad_kind = ServerFrame::Envelopes {
            envelopes: vec![envelope(1, &[])],
        }
        .encode()
        .unwrap();
        let kind_at = 1 + 4 + 8 + 16 + 1 + 32 + 8;
        bad_kind[kind_at] = 9;
        assert_eq!(
            ServerFrame::decode(&bad_kind),
            Err(FrameError::UnknownKind(9))
        );
        let mut bad_code = ServerFrame::Error {
            error: ErrorDetail {
                code: ErrorCode::Internal,
                message: String::new(),
                current_epoch: None,
            },
        }
        .encode()
        .unwrap();
        bad_code[2] = b'X';
        assert!(matches!(
            ServerFrame::decode(&bad_code),
            Err(FrameError::UnknownErrorCode(_))
        ));
    }

    #[test]
    fn strings_must_fit_their_length_prefix() {
        let send = ClientFrame::Send {
            reference: 0,
            group_id: "g".repeat(256),
            message_id: Uuid::nil(),
            message: Bytes64(Vec::new()),
        };
        assert_eq!(send.encode(), Err(FrameError::TooLong));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn kind() -> impl Strategy<Value = EnvelopeKind> {
            prop_oneof![
                Just(EnvelopeKind::Application),
                Just(EnvelopeKind::Commit),
                Just(EnvelopeKind::Proposal),
                Just(EnvelopeKind::Welcome),
            ]
        }

        fn envelope() -> impl Strategy<Value = Envelope> {
            (
                any::<u64>(),
                any::<u128>(),
                "[0-9a-f]{0,40}",
                any::<u64>(),
                kind(),
                any::<i64>(),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(
                    |(id, message_id, group_id, group_seq, kind, server_time, payload)| Envelope {
                        id,
                        message_id: Uuid::from_u128(message_id),
                        group_id,
                        group_seq,
                        kind,
                        server_time,
                        payload: Bytes64(payload),
                    },
                )
        }

        proptest! {
            #[test]
            fn any_send_or_ack_round_trips(
                reference in any::<u64>(),
                group_id in "\\PC{0,60}",
                message in proptest::collection::vec(any::<u8>(), 0..2_000),
                ids in proptest::collection::vec(any::<u64>(), 0..100),
                confirm in any::<bool>(),
            ) {
                let send = ClientFrame::Send {
                    reference,
                    group_id,
                    message_id: Uuid::from_u128(u128::from(reference) << 7),
                    message: Bytes64(message),
                };
                prop_assert_eq!(ClientFrame::decode(&send.encode().unwrap()).unwrap(), send);
                let ack = ClientFrame::Ack { ids, confirm };
                prop_assert_eq!(ClientFrame::decode(&ack.encode().unwrap()).unwrap(), ack);
            }

            #[test]
            fn any_envelope_frame_round_trips(envelopes in proptest::collection::vec(envelope(), 0..20)) {
                let frame = ServerFrame::Envelopes { envelopes };
                prop_assert_eq!(ServerFrame::decode(&frame.encode().unwrap()).unwrap(), frame);
            }

            /// Whatever a peer sends, decoding returns (an error or a frame), and a frame it
            /// returns encodes back to the same bytes: there is one encoding per frame.
            #[test]
            fn any_bytes_decode_without_panic_and_canonically(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(frame) = ClientFrame::decode(&bytes) {
                    prop_assert_eq!(frame.encode().unwrap(), bytes.clone());
                }
                if let Ok(frame) = ServerFrame::decode(&bytes) {
                    prop_assert_eq!(frame.encode().unwrap(), bytes);
                }
            }
        }
    }
}
