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

    #[test]
    fn debug_hides_content() {
        assert_eq!(format!("{:?}", Bytes64(vec![7; 3])), "Bytes64(3 bytes)");
    }
}
