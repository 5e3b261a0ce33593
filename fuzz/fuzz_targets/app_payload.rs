//! The application payload inside MLS, the conversation info extension and the root
//! gossip in authenticated data: all come from other members.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_core::kt::Gossip;
use sealpost_core::payload::{AppMessage, ConversationInfo};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = AppMessage::decode(data) {
        // What decodes must encode again.
        let _ = message.encode();
    }
    let _ = ConversationInfo::decode(data);
    let _ = Gossip::decode(data);
});
