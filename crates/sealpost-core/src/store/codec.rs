//! A compact binary encoding of serde's data model, for OpenMLS state in the client store.
//!
//! OpenMLS hands its storage provider values that only implement `serde` traits, and many of
//! them (HPKE keys, secrets, the ratchet tree) are mostly byte vectors, which JSON writes as
//! arrays of decimal numbers: 3–4 bytes and a number formatting per byte. This encoding keeps
//! JSON's data model exactly (structs are maps keyed by field name, `Some(x)` is `x`, enums
//! are a name or a one-entry map, integers are canonical whatever their width, the format
//! is self-describing and human-readable for `serde`'s purposes), so that:
//! - every value OpenMLS can write as JSON round-trips here, including types that need
//!   `deserialize_any` (untagged enums);
//! - JSON written by the old store (`openmls_sqlite_storage` with a JSON codec) converts
//!   without knowing its types ([`json_to_binary`]), and a converted key has exactly the
//!   bytes the typed key encodes to, so lookups find migrated rows.
//!
//! The one difference is compactness: a sequence whose elements are all integers 0–255 (a
//! `Vec<u8>`, whichever way it was produced) is stored as its raw bytes.
//!
//! Items: a tag byte, then
//! `NULL` | `FALSE` | `TRUE` | `UINT` varint | `NINT` varint of `-1 - n` | `F64` 8 bytes LE |
//! `STR` varint length, UTF-8 | `BYTES` u32 LE count, raw bytes | `SEQ` u32 LE count, items |
//! `MAP` u32 LE count, key and value items. Container counts have a fixed width so that they
//! can be written once the container is complete.

use serde::de::{self, DeserializeOwned, IntoDeserializer as _, Visitor};
use serde::ser::{self, Impossible, Serialize};

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const UINT: u8 = 3;
const NINT: u8 = 4;
const F64: u8 = 5;
const STR: u8 = 6;
const BYTES: u8 = 7;
const SEQ: u8 = 8;
const MAP: u8 = 9;

/// Nesting deeper than this is refused when decoding (corrupt or hostile input).
const MAX_DEPTH: usize = 128;

/// An encoding or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Message(String),
    #[error("the encoded value ends early")]
    Eof,
    #[error("unknown tag {0} in an encoded value")]
    Tag(u8),
    #[error("{0} bytes left over after the encoded value")]
    Trailing(usize),
    #[error("the encoded value is nested too deeply")]
    Depth,
    #[error("the value is too large to encode")]
    TooLarge,
}

impl ser::Error for CodecError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self::Message(msg.to_string())
    }
}

impl de::Error for CodecError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self::Message(msg.to_string())
    }
}

/// Encodes a value.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut encoder = Encoder { out: Vec::new() };
    value.serialize(&mut encoder)?;
    Ok(encoder.out)
}

/// Decodes a value; the whole input must be one value.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut decoder = Decoder {
        input: bytes,
        depth: 0,
    };
    let value = T::deserialize(&mut decoder)?;
    if !decoder.input.is_empty() {
        return Err(CodecError::Trailing(decoder.input.len()));
    }
    Ok(value)
}

/// Converts a JSON document into this encoding, keeping object entries in their order.
pub fn json_to_binary(json: &[u8]) -> Result<Vec<u8>, CodecError> {
    let value: Json = serde_json::from_slice(json).map_err(de::Error::custom)?;
    to_vec(&value)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn count_u32(count: usize) -> Result<[u8; 4], CodecError> {
    u32::try_from(count)
        .map(u32::to_le_bytes)
        .map_err(|_| CodecError::TooLarge)
}

struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    fn uint(&mut self, value: u64) {
        self.out.push(UINT);
        put_varint(&mut self.out, value);
    }

    fn int(&mut self, value: i64) {
        if value >= 0 {
            self.uint(value as u64);
        } else {
            self.out.push(NINT);
            put_varint(&mut self.out, !value as u64);
        }
    }

    fn str(&mut self, value: &str) {
        self.out.push(STR);
        put_varint(&mut self.out, value.len() as u64);
        self.out.extend_from_slice(value.as_bytes());
    }

    /// Opens a container: its tag and a count to fill in by [`Container::finish`].
    fn open(&mut self, tag: u8) -> Container<'_> {
        let start = self.out.len();
        self.out.extend_from_slice(&[tag, 0, 0, 0, 0]);
        Container {
            encoder: self,
            start,
            count: 0,
        }
    }

    /// A one-entry map `{variant: ...}` (how JSON writes non-unit enum variants).
    fn variant_key(&mut self, variant: &str) {
        self.out.extend_from_slice(&[MAP, 1, 0, 0, 0]);
        self.str(variant);
    }
}

/// A sequence or map being written.
struct Container<'a> {
    encoder: &'a mut Encoder,
    start: usize,
    count: usize,
}

impl Container<'_> {
    fn finish(self) -> Result<(), CodecError> {
        let count = count_u32(self.count)?;
        self.encoder.out[self.start + 1..self.start + 5].copy_from_slice(&count);
        Ok(())
    }

    fn bytes_mode(&self) -> bool {
        self.encoder.out[self.start] == BYTES
    }

    /// Leaves byte mode: the raw bytes so far become `UINT` items.
    fn leave_byte_mode(&mut self) {
        let raw = self.encoder.out.split_off(self.start + 5);
        self.encoder.out[self.start] = SEQ;
        for byte in raw {
            self.encoder.uint(u64::from(byte));
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        if self.bytes_mode() {
            match value.serialize(ByteProbe) {
                Ok(Some(byte)) => {
                    self.encoder.out.push(byte);
                    self.count += 1;
                    return Ok(());
                }
                _ => self.leave_byte_mode(),
            }
        }
        value.serialize(&mut *self.encoder)?;
        self.count += 1;
        Ok(())
    }
}

impl<'a> ser::Serializer for &'a mut Encoder {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Container<'a>;
    type SerializeTuple = Container<'a>;
    type SerializeTupleStruct = Container<'a>;
    type SerializeTupleVariant = Container<'a>;
    type SerializeMap = Container<'a>;
    type SerializeStruct = Container<'a>;
    type SerializeStructVariant = Container<'a>;

    fn is_human_readable(&self) -> bool {
        // The same representation as JSON, so that converted JSON decodes the same way.
        true
    }

    fn serialize_bool(self, v: bool) -> Result<(), CodecError> {
        self.out.push(if v { TRUE } else { FALSE });
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<(), CodecError> {
        self.int(i64::from(v));
        Ok(())
    }

    fn serialize_i16(self, v: i16) -> Result<(), CodecError> {
        self.int(i64::from(v));
        Ok(())
    }

    fn serialize_i32(self, v: i32) -> Result<(), CodecError> {
        self.int(i64::from(v));
        Ok(())
    }

    fn serialize_i64(self, v: i64) -> Result<(), CodecError> {
        self.int(v);
        Ok(())
    }

    fn serialize_i128(self, v: i128) -> Result<(), CodecError> {
        if let Ok(v) = u64::try_from(v) {
            self.uint(v);
        } else {
            self.int(i64::try_from(v).map_err(|_| CodecError::TooLarge)?);
        }
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result<(), CodecError> {
        self.uint(u64::from(v));
        Ok(())
    }

    fn serialize_u16(self, v: u16) -> Result<(), CodecError> {
        self.uint(u64::from(v));
        Ok(())
    }

    fn serialize_u32(self, v: u32) -> Result<(), CodecError> {
        self.uint(u64::from(v));
        Ok(())
    }

    fn serialize_u64(self, v: u64) -> Result<(), CodecError> {
        self.uint(v);
        Ok(())
    }

    fn serialize_u128(self, v: u128) -> Result<(), CodecError> {
        self.uint(u64::try_from(v).map_err(|_| CodecError::TooLarge)?);
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), CodecError> {
        self.serialize_f64(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Result<(), CodecError> {
        self.out.push(F64);
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), CodecError> {
        self.str(v.encode_utf8(&mut [0; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), CodecError> {
        self.str(v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), CodecError> {
        // JSON writes bytes as an array of numbers: the same as a `Vec<u8>` here.
        self.out.push(BYTES);
        self.out.extend_from_slice(&count_u32(v.len())?);
        self.out.extend_from_slice(v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), CodecError> {
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CodecError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), CodecError> {
        self.out.push(NULL);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CodecError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), CodecError> {
        self.str(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        self.variant_key(variant);
        value.serialize(self)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Container<'a>, CodecError> {
        // Starts as raw bytes; the first element that is not an integer 0–255 switches
        // the sequence to items.
        Ok(self.open(BYTES))
    }

    fn serialize_tuple(self, len: usize) -> Result<Container<'a>, CodecError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Container<'a>, CodecError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Container<'a>, CodecError> {
        self.variant_key(variant);
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Container<'a>, CodecError> {
        Ok(self.open(MAP))
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Container<'a>, CodecError> {
        Ok(self.open(MAP))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Container<'a>, CodecError> {
        self.variant_key(variant);
        Ok(self.open(MAP))
    }
}

impl ser::SerializeSeq for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        self.element(value)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeTuple for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        self.element(value)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        self.element(value)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        self.element(value)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeMap for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CodecError> {
        key.serialize(&mut *self.encoder)
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CodecError> {
        value.serialize(&mut *self.encoder)?;
        self.count += 1;
        Ok(())
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeStruct for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        self.encoder.str(key);
        value.serialize(&mut *self.encoder)?;
        self.count += 1;
        Ok(())
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Container<'_> {
    type Ok = ();
    type Error = CodecError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), CodecError> {
        ser::SerializeStruct::serialize_field(self, key, value)
    }

    fn end(self) -> Result<(), CodecError> {
        self.finish()
    }
}

/// Tells whether a value is an integer 0–255 (as JSON would write it: through newtypes
/// and `Some`), without writing anything.
struct ByteProbe;

impl ByteProbe {
    fn byte(value: impl TryInto<u8>) -> Result<Option<u8>, CodecError> {
        Ok(value.try_into().ok())
    }
}

impl ser::Serializer for ByteProbe {
    type Ok = Option<u8>;
    type Error = CodecError;
    type SerializeSeq = Impossible<Option<u8>, CodecError>;
    type SerializeTuple = Impossible<Option<u8>, CodecError>;
    type SerializeTupleStruct = Impossible<Option<u8>, CodecError>;
    type SerializeTupleVariant = Impossible<Option<u8>, CodecError>;
    type SerializeMap = Impossible<Option<u8>, CodecError>;
    type SerializeStruct = Impossible<Option<u8>, CodecError>;
    type SerializeStructVariant = Impossible<Option<u8>, CodecError>;

    fn is_human_readable(&self) -> bool {
        true
    }

    fn serialize_bool(self, _: bool) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_i8(self, v: i8) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_i16(self, v: i16) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_i32(self, v: i32) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_i64(self, v: i64) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_i128(self, v: i128) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_u8(self, v: u8) -> Result<Option<u8>, CodecError> {
        Ok(Some(v))
    }

    fn serialize_u16(self, v: u16) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_u32(self, v: u32) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_u64(self, v: u64) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_u128(self, v: u128) -> Result<Option<u8>, CodecError> {
        Self::byte(v)
    }

    fn serialize_f32(self, _: f32) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_f64(self, _: f64) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_char(self, _: char) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_str(self, _: &str) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_bytes(self, _: &[u8]) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_none(self) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Option<u8>, CodecError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_unit_struct(self, _: &'static str) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<Option<u8>, CodecError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<Option<u8>, CodecError> {
        Ok(None)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, CodecError> {
        Err(CodecError::Message("not a byte".into()))
    }
}

struct Decoder<'de> {
    input: &'de [u8],
    depth: usize,
}

impl<'de> Decoder<'de> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let (&first, rest) = self.input.split_first().ok_or(CodecError::Eof)?;
        self.input = rest;
        Ok(first)
    }

    fn peek(&self) -> Result<u8, CodecError> {
        self.input.first().copied().ok_or(CodecError::Eof)
    }

    fn take(&mut self, len: usize) -> Result<&'de [u8], CodecError> {
        if self.input.len() < len {
            return Err(CodecError::Eof);
        }
        let (taken, rest) = self.input.split_at(len);
        self.input = rest;
        Ok(taken)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::Message("overlong integer".into()))
    }

    fn count(&mut self) -> Result<usize, CodecError> {
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| CodecError::Eof)?;
        Ok(u32::from_le_bytes(bytes) as usize)
    }

    fn str(&mut self) -> Result<&'de str, CodecError> {
        let len = usize::try_from(self.varint()?).map_err(|_| CodecError::Eof)?;
        std::str::from_utf8(self.take(len)?).map_err(de::Error::custom)
    }

    fn enter(&mut self) -> Result<(), CodecError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(CodecError::Depth);
        }
        Ok(())
    }

    /// Skips one item.
    fn skip(&mut self) -> Result<(), CodecError> {
        match self.byte()? {
            NULL | FALSE | TRUE => {}
            UINT | NINT => {
                self.varint()?;
            }
            F64 => {
                self.take(8)?;
            }
            STR => {
                self.str()?;
            }
            BYTES => {
                let len = self.count()?;
                self.take(len)?;
            }
            tag @ (SEQ | MAP) => {
                self.enter()?;
                let items = self.count()? * if tag == MAP { 2 } else { 1 };
                for _ in 0..items {
                    self.skip()?;
                }
                self.depth -= 1;
            }
            tag => return Err(CodecError::Tag(tag)),
        }
        Ok(())
    }

    /// A string that JSON would have written as a map key for an integer.
    fn integer_from_str<V: Visitor<'de>>(&mut self, visitor: V) -> Result<V::Value, CodecError> {
        self.byte()?;
        let text = self.str()?;
        if let Ok(value) = text.parse::<u64>() {
            visitor.visit_u64(value)
        } else if let Ok(value) = text.parse::<i64>() {
            visitor.visit_i64(value)
        } else {
            visitor.visit_borrowed_str(text)
        }
    }
}

macro_rules! integer {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
                if self.peek()? == STR {
                    self.integer_from_str(visitor)
                } else {
                    self.deserialize_any(visitor)
                }
            }
        )*
    };
}

macro_rules! any {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
                self.deserialize_any(visitor)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = CodecError;

    fn is_human_readable(&self) -> bool {
        true
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        match self.byte()? {
            NULL => visitor.visit_unit(),
            FALSE => visitor.visit_bool(false),
            TRUE => visitor.visit_bool(true),
            UINT => visitor.visit_u64(self.varint()?),
            NINT => visitor.visit_i64(!(self.varint()? as i64)),
            F64 => {
                let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| CodecError::Eof)?;
                visitor.visit_f64(f64::from_le_bytes(bytes))
            }
            STR => visitor.visit_borrowed_str(self.str()?),
            BYTES => {
                let len = self.count()?;
                visitor.visit_seq(ByteSeq(self.take(len)?.iter()))
            }
            SEQ => {
                self.enter()?;
                let remaining = self.count()?;
                let value = visitor.visit_seq(Items {
                    decoder: &mut *self,
                    remaining,
                })?;
                self.depth -= 1;
                Ok(value)
            }
            MAP => {
                self.enter()?;
                let remaining = self.count()?;
                let value = visitor.visit_map(Items {
                    decoder: &mut *self,
                    remaining,
                })?;
                self.depth -= 1;
                Ok(value)
            }
            tag => Err(CodecError::Tag(tag)),
        }
    }

    integer! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    any! {
        deserialize_bool deserialize_f32 deserialize_f64 deserialize_char deserialize_str
        deserialize_string deserialize_seq deserialize_map deserialize_identifier
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if self.peek()? == BYTES {
            self.byte()?;
            let len = self.count()?;
            visitor.visit_borrowed_bytes(self.take(len)?)
        } else {
            self.deserialize_any(visitor)
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        if self.peek()? == NULL {
            self.byte()?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        match self.byte()? {
            NULL => visitor.visit_unit(),
            tag => Err(CodecError::Tag(tag)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        match self.peek()? {
            STR => {
                self.byte()?;
                visitor.visit_enum(self.str()?.into_deserializer())
            }
            MAP => {
                self.byte()?;
                if self.count()? != 1 {
                    return Err(CodecError::Message(
                        "an enum variant is a map of one entry".into(),
                    ));
                }
                self.enter()?;
                let value = visitor.visit_enum(Variant(&mut *self))?;
                self.depth -= 1;
                Ok(value)
            }
            tag => Err(CodecError::Tag(tag)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        self.skip()?;
        visitor.visit_unit()
    }
}

/// The elements of a `BYTES` item.
struct ByteSeq<'de>(std::slice::Iter<'de, u8>);

impl<'de> de::SeqAccess<'de> for ByteSeq<'de> {
    type Error = CodecError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        match self.0.next() {
            Some(&byte) => seed.deserialize(Byte(byte)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// One element of a `BYTES` item: an integer, seen through newtypes and `Option` as JSON
/// would see a number.
struct Byte(u8);

impl<'de> de::Deserializer<'de> for Byte {
    type Error = CodecError;

    fn is_human_readable(&self) -> bool {
        true
    }

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_u8(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CodecError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// The items of a `SEQ` (one per element) or a `MAP` (key, value).
struct Items<'a, 'de> {
    decoder: &'a mut Decoder<'de>,
    remaining: usize,
}

impl<'de> de::SeqAccess<'de> for Items<'_, 'de> {
    type Error = CodecError;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, CodecError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        // Never more than the input could hold (a corrupt count must not make a caller
        // reserve gigabytes).
        Some(self.remaining.min(self.decoder.input.len()))
    }
}

impl<'de> de::MapAccess<'de> for Items<'_, 'de> {
    type Error = CodecError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, CodecError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        seed.deserialize(&mut *self.decoder).map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, CodecError> {
        seed.deserialize(&mut *self.decoder)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.remaining.min(self.decoder.input.len()))
    }
}

/// An enum variant written as `{name: value}`.
struct Variant<'a, 'de>(&'a mut Decoder<'de>);

impl<'de> de::EnumAccess<'de> for Variant<'_, 'de> {
    type Error = CodecError;
    type Variant = Self;

    fn variant_seed<T: de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self), CodecError> {
        let variant = seed.deserialize(&mut *self.0)?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, 'de> {
    type Error = CodecError;

    fn unit_variant(self) -> Result<(), CodecError> {
        de::Deserialize::deserialize(&mut *self.0)
    }

    fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, CodecError> {
        seed.deserialize(&mut *self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        de::Deserializer::deserialize_any(&mut *self.0, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CodecError> {
        de::Deserializer::deserialize_any(&mut *self.0, visitor)
    }
}

/// A JSON document with object entries in their written order (what `serde_json`'s own
/// `Value` does not keep without a feature).
enum Json {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Json>),
    Map(Vec<(String, Json)>),
}

impl<'de> de::Deserialize<'de> for Json {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct JsonVisitor;

        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }

            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }

            fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
                de::Deserialize::deserialize(d)
            }

            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Bool(v))
            }

            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Unsigned(v))
            }

            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(if v >= 0 {
                    Json::Unsigned(v as u64)
                } else {
                    Json::Signed(v)
                })
            }

            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Float(v))
            }

            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Str(v.to_owned()))
            }

            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Str(v))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Seq(items))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Json::Map(entries))
            }
        }

        deserializer.deserialize_any(JsonVisitor)
    }
}

impl Serialize for Json {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use ser::{SerializeMap as _, SerializeSeq as _};
        match self {
            Self::Null => serializer.serialize_unit(),
            Self::Bool(v) => serializer.serialize_bool(*v),
            Self::Unsigned(v) => serializer.serialize_u64(*v),
            Self::Signed(v) => serializer.serialize_i64(*v),
            Self::Float(v) => serializer.serialize_f64(*v),
            Self::Str(v) => serializer.serialize_str(v),
            Self::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Self::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Unit,
        Newtype(u32),
        Tuple(i8, String),
        Struct { a: Option<u16>, b: Vec<u8> },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Inner(Vec<u8>);

    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    struct Index(u32);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        indexes: Vec<Index>,
        optional_bytes: Vec<Option<u8>>,
        bytes: Vec<u8>,
        wide: Vec<u16>,
        mixed: Vec<u32>,
        inner: Inner,
        nested: Vec<Vec<u8>>,
        signed: i64,
        option: Option<Option<u8>>,
        kinds: Vec<Kind>,
        by_number: BTreeMap<u32, String>,
        text: String,
        flag: bool,
        tuple: (u8, u64, ()),
        array: [u8; 4],
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        Int(u64),
        Named { name: String },
    }

    fn sample_strategy() -> impl Strategy<Value = Sample> {
        let kind = prop_oneof![
            Just(Kind::Unit),
            any::<u32>().prop_map(Kind::Newtype),
            (any::<i8>(), ".{0,8}").prop_map(|(a, b)| Kind::Tuple(a, b)),
            (
                any::<Option<u16>>(),
                prop::collection::vec(any::<u8>(), 0..40)
            )
                .prop_map(|(a, b)| Kind::Struct { a, b }),
        ];
        (
            (
                prop::collection::vec(any::<u8>(), 0..300),
                prop::collection::vec(any::<u16>(), 0..20),
                prop::collection::vec(0u32..300, 0..20),
                prop::collection::vec(any::<u8>(), 0..20),
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..5), 0..4),
                any::<i64>(),
            ),
            (
                any::<Option<u8>>(),
                prop::collection::vec(kind, 0..5),
                prop::collection::btree_map(any::<u32>(), ".{0,4}", 0..4),
                ".{0,20}",
                any::<bool>(),
                (any::<u8>(), any::<u64>()),
                any::<[u8; 4]>(),
            ),
        )
            .prop_map(
                |(
                    (bytes, wide, mixed, inner, nested, signed),
                    (option, kinds, by_number, text, flag, (t0, t1), array),
                )| Sample {
                    indexes: mixed.iter().map(|&i| Index(i)).collect(),
                    optional_bytes: bytes.iter().map(|&b| Some(b)).collect(),
                    bytes,
                    wide,
                    mixed,
                    inner: Inner(inner),
                    nested,
                    signed,
                    // `Some(None)` reads back as `None`, as in JSON.
                    option: option.map(Some),
                    kinds,
                    by_number,
                    text,
                    flag,
                    tuple: (t0, t1, ()),
                    array,
                },
            )
    }

    proptest! {
        #[test]
        fn values_round_trip(sample in sample_strategy()) {
            let bytes = to_vec(&sample).unwrap();
            prop_assert_eq!(from_slice::<Sample>(&bytes).unwrap(), sample);
        }

        #[test]
        fn converted_json_is_what_the_typed_value_encodes_to(sample in sample_strategy()) {
            // Except for maps with integer keys (JSON makes them strings, which still
            // decode), a value converted from its JSON has the very bytes of the value.
            let mut sample = sample;
            sample.by_number.clear();
            let json = serde_json::to_vec(&sample).unwrap();
            prop_assert_eq!(json_to_binary(&json).unwrap(), to_vec(&sample).unwrap());
        }

        #[test]
        fn converted_json_decodes_to_the_value(sample in sample_strategy()) {
            let json = serde_json::to_vec(&sample).unwrap();
            prop_assert_eq!(from_slice::<Sample>(&json_to_binary(&json).unwrap()).unwrap(), sample);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = from_slice::<Sample>(&bytes);
        }
    }

    #[test]
    fn byte_vectors_are_stored_raw() {
        let bytes: Vec<u8> = (0..=255).collect();
        let encoded = to_vec(&bytes).unwrap();
        assert_eq!(encoded.len(), 5 + 256);
        assert_eq!(encoded[0], BYTES);
        // A sequence of small numbers that turns out not to be bytes.
        let mixed: Vec<u32> = vec![1, 2, 300];
        let encoded = to_vec(&mixed).unwrap();
        assert_eq!(encoded[0], SEQ);
        assert_eq!(from_slice::<Vec<u32>>(&encoded).unwrap(), mixed);
    }

    #[test]
    fn untagged_enums_decode() {
        assert_eq!(
            from_slice::<Untagged>(&to_vec(&7u8).unwrap()).unwrap(),
            Untagged::Int(7)
        );
        let named = BTreeMap::from([("name", "x")]);
        assert_eq!(
            from_slice::<Untagged>(&to_vec(&named).unwrap()).unwrap(),
            Untagged::Named { name: "x".into() }
        );
    }

    #[test]
    fn truncated_and_trailing_input_is_refused() {
        let encoded = to_vec(&vec![1u32, 2, 3000]).unwrap();
        for len in 0..encoded.len() {
            assert!(from_slice::<Vec<u32>>(&encoded[..len]).is_err(), "{len}");
        }
        let mut longer = encoded.clone();
        longer.push(NULL);
        assert!(matches!(
            from_slice::<Vec<u32>>(&longer),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut encoded = Vec::new();
        for _ in 0..1000 {
            encoded.extend_from_slice(&[SEQ, 1, 0, 0, 0]);
        }
        encoded.push(NULL);
        assert!(matches!(
            from_slice::<Json>(&encoded),
            Err(CodecError::Depth)
        ));
    }
}
