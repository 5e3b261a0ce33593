//! Binary values on the JSON wire.
//!
//! Every byte string in the API travels as unpadded URL-safe base64 inside a JSON string.
//! [`Bytes64`] is the one type that does that encoding, so no handler ever decodes base64
//! by hand.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes that serialize as unpadded URL-safe base64.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Bytes64(pub Vec<u8>);

impl Bytes64 {
    /// Encodes the bytes as the API's base64 form.
    pub fn encode(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes the API's base64 form.
    pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        URL_SAFE_NO_PAD.decode(text)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl From<Vec<u8>> for Bytes64 {
    fn from(value: Vec<u8>) -> Self {
        Self(value)
    }
}

impl AsRef<[u8]> for Bytes64 {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes64 {
    // Never print the content: it may be ciphertext or key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes64({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes64 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&Self::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::decode(&text)
            .map(Self)
            .map_err(|_| serde::de::Error::custom("expected unpadded URL-safe base64"))
    }
}

/// What [`Bytes64`] accepts, as an ECMA-262 regular expression: canonical unpadded URL-safe
/// base64. Groups of four characters, then optionally two or three more whose unused low
/// bits are zero (`"AB"` is refused because its last character carries a stray bit), so a
/// string matches exactly when it decodes.
pub const BASE64URL_PATTERN: &str =
    "^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-][AQgw]|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048])?$";

/// Length of the unpadded base64 text of `bytes` bytes.
pub const fn encoded_len(bytes: usize) -> usize {
    (4 * bytes).div_ceil(3)
}

#[cfg(feature = "openapi")]
fn base64_schema() -> utoipa::openapi::ObjectBuilder {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .pattern(Some(BASE64URL_PATTERN))
        .content_encoding("base64url")
}

/// The OpenAPI schema of [`Bytes64`]: a string of canonical unpadded URL-safe base64.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Bytes64 {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        base64_schema()
            .description(Some(
                "Bytes as unpadded URL-safe base64 (RFC 4648 section 5, no `=`); unused bits of \
                 the last character must be zero.",
            ))
            .into()
    }
}

/// The OpenAPI schema of a [`Bytes64`] field of `MIN` to `MAX` bytes (for
/// `#[schema(schema_with = ...)]`): base64 text of `encoded_len(MIN)` to
/// `encoded_len(MAX)` characters, which for canonical base64 is exactly that many bytes.
/// An exact size is written into the pattern instead ([`exact_pattern`]), which generators
/// can satisfy directly.
#[cfg(feature = "openapi")]
pub fn sized<const MIN: usize, const MAX: usize>() -> utoipa::openapi::Object {
    // The field's own doc comment does not reach the document through `schema_with`.
    if MIN == MAX {
        return base64_schema()
            .pattern(Some(exact_pattern(MIN)))
            .description(Some(format!("{MIN} bytes as unpadded URL-safe base64.")))
            .build();
    }
    base64_schema()
        .min_length(Some(encoded_len(MIN)))
        .max_length(Some(encoded_len(MAX)))
        .description(Some(format!(
            "{MIN} to {MAX} bytes as unpadded URL-safe base64."
        )))
        .build()
}

/// The canonical unpadded URL-safe base64 texts of exactly `bytes` bytes, as an ECMA-262
/// regular expression.
pub fn exact_pattern(bytes: usize) -> String {
    let full = bytes / 3 * 4;
    match bytes % 3 {
        0 => format!("^[A-Za-z0-9_-]{{{full}}}$"),
        1 => format!("^[A-Za-z0-9_-]{{{}}}[AQgw]$", full + 1),
        _ => format!("^[A-Za-z0-9_-]{{{}}}[AEIMQUYcgkosw048]$", full + 2),
    }
}

/// Like [`sized`], for a list of `MIN_ITEMS` to `MAX_ITEMS` such fields.
#[cfg(feature = "openapi")]
pub fn sized_list<
    const MIN_ITEMS: usize,
    const MAX_ITEMS: usize,
    const MIN: usize,
    const MAX: usize,
>() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(sized::<MIN, MAX>())
        .min_items(Some(MIN_ITEMS))
        .max_items(Some(MAX_ITEMS))
        .build()
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Bytes64 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let value = Bytes64(vec![0, 1, 2, 250, 255]);
        let json = serde_json::to_string(&value).unwrap();
        assert_eq!(json, "\"AAEC-v8\"");
        let back: Bytes64 = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn rejects_invalid_base64() {
        assert!(serde_json::from_str::<Bytes64>("\"***\"").is_err());
        assert!(serde_json::from_str::<Bytes64>("12").is_err());
    }

    /// The pattern published in the OpenAPI document accepts exactly the strings that
    /// decode: checked on every string of up to three characters over the alphabet plus
    /// `=`, `+` and `/`, and on four- to seven-character strings with a valid prefix.
    #[test]
    fn pattern_matches_exactly_what_decodes() {
        let pattern = regex::Regex::new(BASE64URL_PATTERN).unwrap();
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"
                .chars()
                .collect();
        let mut texts = vec![String::new()];
        let mut previous = vec![String::new()];
        for _ in 0..3 {
            previous = previous
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            texts.extend(previous.iter().cloned());
        }
        for prefix in ["AAA", "AAAA", "AAAAB", "AAAABC"] {
            texts.extend(alphabet.iter().map(|c| format!("{prefix}{c}")));
        }
        for text in texts {
            assert_eq!(
                pattern.is_match(&text),
                Bytes64::decode(&text).is_ok(),
                "{text:?}"
            );
        }
    }

    /// An exact-size pattern accepts exactly the texts that decode to that many bytes:
    /// checked on every text that is a prefix of a valid one plus any last character.
    #[test]
    fn exact_patterns() {
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"
                .chars()
                .collect();
        for bytes in 0..8 {
            let pattern = regex::Regex::new(&exact_pattern(bytes)).unwrap();
            let valid = Bytes64::encode(&vec![0xa5; bytes]);
            assert!(pattern.is_match(&valid), "{bytes}: {valid}");
            for prefix in valid.len().saturating_sub(2)..=valid.len() {
                for last in &alphabet {
                    let text = format!("{}{last}", &valid[..prefix]);
                    let decodes = Bytes64::decode(&text).is_ok_and(|b| b.len() == bytes);
                    assert_eq!(pattern.is_match(&text), decodes, "{bytes}: {text:?}");
                }
            }
        }
    }

    #[test]
    fn encoded_lengths() {
        for n in 0..100 {
            assert_eq!(encoded_len(n), Bytes64::encode(&vec![0; n]).len());
        }
    }

    #[test]
    fn debug_hides_content() {
        assert_eq!(format!("{:?}", Bytes64(vec![7; 3])), "Bytes64(3 bytes)");
    }
}
