//! Safety numbers: a 60-digit fingerprint of two accounts' keys (design §3).
//!
//! Each account's half is 30 digits computed from its username and account key:
//!
//! ```text
//! h = SHA-512("sealpost safety number v1" | 0x00 | account_key | username)
//! repeat 5,199 times: h = SHA-512(h | account_key)
//! take h[0..30] as six 5-byte big-endian integers; each mod 100000, zero-padded to 5 digits
//! ```
//!
//! The safety number is the two halves sorted as strings and concatenated, so both people
//! see the same 60 digits. The iterations make finding a different key with the same
//! number (a second preimage for 100 bits) more expensive. The QR code encodes the same
//! digits prefixed with `sealpost-safety:1:`.

use sha2::{Digest as _, Sha512};

const ITERATIONS: usize = 5_200;
const CONTEXT: &[u8] = b"sealpost safety number v1";

/// One account's 30-digit half.
pub fn fingerprint(username: &str, account_key: &[u8]) -> String {
    let mut hasher = Sha512::new();
    hasher.update(CONTEXT);
    hasher.update([0u8]);
    hasher.update(account_key);
    hasher.update(username.as_bytes());
    let mut hash = hasher.finalize();
    for _ in 1..ITERATIONS {
        let mut hasher = Sha512::new();
        hasher.update(hash);
        hasher.update(account_key);
        hash = hasher.finalize();
    }
    hash[..30]
        .chunks(5)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", value % 100_000)
        })
        .collect()
}

/// The 60-digit safety number of two accounts; the same whichever is "mine".
pub fn safety_number(a: (&str, &[u8]), b: (&str, &[u8])) -> String {
    let mut halves = [fingerprint(a.0, a.1), fingerprint(b.0, b.1)];
    halves.sort();
    halves.concat()
}

/// Groups of five digits separated by spaces, for reading aloud.
pub fn format_groups(number: &str) -> String {
    number
        .as_bytes()
        .chunks(5)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a person typed, reduced to its digits.
pub fn normalize(input: &str) -> String {
    input.chars().filter(char::is_ascii_digit).collect()
}

/// The text a QR code of the safety number carries.
pub fn qr_payload(number: &str) -> String {
    format!("sealpost-safety:1:{number}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_compute_the_same_sixty_digits() {
        let alice = ("alice", [1u8; 32]);
        let bob = ("bob", [2u8; 32]);
        let one = safety_number((alice.0, &alice.1), (bob.0, &bob.1));
        let other = safety_number((bob.0, &bob.1), (alice.0, &alice.1));
        assert_eq!(one, other);
        assert_eq!(one.len(), 60);
        assert!(one.chars().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn any_key_or_name_change_changes_the_number() {
        let base = safety_number(("alice", &[1; 32]), ("bob", &[2; 32]));
        assert_ne!(base, safety_number(("alice", &[1; 32]), ("bob", &[3; 32])));
        assert_ne!(base, safety_number(("alice", &[1; 32]), ("bob2", &[2; 32])));
        let mut key = [1u8; 32];
        key[31] ^= 1;
        assert_ne!(base, safety_number(("alice", &key), ("bob", &[2; 32])));
    }

    #[test]
    fn fingerprint_is_stable() {
        // Pinned so that an accidental change of the algorithm is caught: other
        // implementations must produce the same digits (docs/PROTOCOL.md).
        // Test vectors, computed by an independent implementation of the algorithm in
        // docs/PROTOCOL.md (Python hashlib).
        assert_eq!(
            fingerprint("alice", &[0u8; 32]),
            "485525894527743880387814085386"
        );
        assert_eq!(
            safety_number(("alice", &[1; 32]), ("bob", &[2; 32])),
            "899152093343304584607053941502965678963130647527275030169657"
        );
        assert_eq!(format_groups("0123456789"), "01234 56789");
        assert_eq!(normalize(" 01234-56789 x"), "0123456789");
    }
}
