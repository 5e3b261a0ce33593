//! The server's reading of MLS framing on every commit, proposal, message and Welcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_server::mls::{Expected, inspect, inspect_welcome};

fuzz_target!(|data: &[u8]| {
    for expected in [Expected::Commit, Expected::Proposal, Expected::Application] {
        let _ = inspect(data, expected, &[0u8; 16]);
    }
    let _ = inspect_welcome(data);
});
