//! Link codes typed by people, and sealed link messages relayed by the server.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_core::link::LinkCode;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = LinkCode::parse(text);
    }
    let code = LinkCode::parse("AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAA");
    if let Ok(code) = code {
        let _ = code.open_request(data);
        let _ = code.open_response(data);
    }
});
