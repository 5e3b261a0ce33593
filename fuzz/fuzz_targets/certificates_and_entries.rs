//! Device certificates and key-directory entries: strict, canonical decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost_proto::certificate::DeviceCertificate;
use sealpost_proto::kt::DirectoryEntry;

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = DeviceCertificate::decode(data) {
        assert_eq!(cert.encode(), data, "a certificate has one encoding");
        let _ = sealpost_core::identity::verify_certificate(&cert);
    }
    if let Ok(entry) = DirectoryEntry::decode(data) {
        assert_eq!(entry.encode(), data, "a directory entry has one encoding");
    }
});
