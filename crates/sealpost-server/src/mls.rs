//! The little the server reads of MLS: the framing of handshake and application messages.
//!
//! The server is the MLS Delivery Service. It must know which group and epoch a message is
//! for, and whether it is a commit, a proposal, an application message or a Welcome, to
//! sequence commits (first commit for the current epoch wins). It reads only the
//! unencrypted framing: it never decrypts or interprets application content.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{ContentType, MlsMessageBodyIn, MlsMessageIn, Sender};

use crate::error::ApiError;
use sealpost_proto::ErrorCode;

/// What kind of MLS message a request must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Commit,
    Proposal,
    Application,
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidMessage, message)
}

/// Checks that `bytes` is an MLS message of the expected kind for `group_id` and returns
/// the epoch it was made for.
pub fn inspect(bytes: &[u8], expected: Expected, group_id: &[u8]) -> Result<u64, ApiError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| invalid("the payload is not a well-formed MLS message"))?;
    let (message_group, epoch) = match (message.extract(), expected) {
        (MlsMessageBodyIn::PublicMessage(public), Expected::Commit | Expected::Proposal) => {
            let want = if expected == Expected::Commit {
                ContentType::Commit
            } else {
                ContentType::Proposal
            };
            if public.content_type() != want {
                return Err(invalid("the handshake message has the wrong content type"));
            }
            if !matches!(public.sender(), Sender::Member(_)) {
                return Err(invalid("handshake messages must come from a group member"));
            }
            (
                public.group_id().as_slice().to_vec(),
                public.epoch().as_u64(),
            )
        }
        (MlsMessageBodyIn::PrivateMessage(private), Expected::Application) => {
            if private.content_type() != ContentType::Application {
                return Err(invalid(
                    "handshake messages must be sent as PublicMessage, not PrivateMessage",
                ));
            }
            (
                private.group_id().as_slice().to_vec(),
                private.epoch().as_u64(),
            )
        }
        _ => {
            return Err(invalid(
                "the MLS message has the wrong wire format for this endpoint",
            ));
        }
    };
    if message_group != group_id {
        return Err(invalid("the MLS message belongs to another group"));
    }
    Ok(epoch)
}

/// Checks that `bytes` is an MLS Welcome.
pub fn inspect_welcome(bytes: &[u8]) -> Result<(), ApiError> {
    let message = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|_| invalid("the Welcome is not a well-formed MLS message"))?;
    match message.extract() {
        MlsMessageBodyIn::Welcome(_) => Ok(()),
        _ => Err(invalid("the Welcome field does not hold an MLS Welcome")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for bytes in [&b""[..], b"\x00", b"\x00\x01\x00\x01", &[0xff; 300]] {
            let err = inspect(bytes, Expected::Commit, b"g").unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidMessage);
            assert!(inspect_welcome(bytes).is_err());
        }
    }
}
