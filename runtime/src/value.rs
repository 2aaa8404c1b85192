//! Field values and the compact key encoding.
//!
//! An event inside rivulet is not a JSON tree: the planner knows every field
//! path a pipeline reads or writes and gives each a *slot*. A record is a
//! slice of [`Value`]s indexed by slot. Decoding fills only those slots
//! (see [`crate::decode`]), so an event costs one small vector, not a map.
//!
//! Keys are encoded to bytes ([`encode_key`]) once, in the parse stage; the
//! window stage hashes and compares those bytes and decodes them again only
//! to print a result.

use compact_str::CompactString;
use std::fmt;

/// One scalar value of an event field or an expression result.
///
/// `Int` and `Float` are kept apart so that counts and integer sums print as
/// integers; arithmetic mixes them as numbers (see [`crate::expr`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// A missing field, JSON `null`, or the result of an operation on null.
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Strings up to 24 bytes live inline, so typical ids never allocate.
    Str(CompactString),
}

impl Value {
    /// The name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) | Value::Float(_) => "number",
            Value::Str(_) => "string",
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Appends the value as JSON. Non-finite floats have no JSON form and
    /// are written as `null`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(true) => out.extend_from_slice(b"true"),
            Value::Bool(false) => out.extend_from_slice(b"false"),
            Value::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(*i).as_bytes()),
            Value::Float(f) if f.is_finite() => {
                out.extend_from_slice(ryu::Buffer::new().format_finite(*f).as_bytes())
            }
            Value::Float(_) => out.extend_from_slice(b"null"),
            Value::Str(s) => write_json_str(s, out),
        }
    }

    /// Converts to a `serde_json` value (used off the hot path: pass-through
    /// records and tests).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.write_json(&mut out);
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaper is correct and fast; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

const TAG_NULL: u8 = 0;
const TAG_BOOL: u8 = 1;
const TAG_INT: u8 = 2;
const TAG_FLOAT: u8 = 3;
const TAG_STR: u8 = 4;

/// Appends the canonical byte form of one key value.
///
/// The encoding is self-delimiting, so a compound key is the concatenation
/// of its parts, and equal keys have equal bytes.
pub fn encode_key(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(TAG_NULL),
        Value::Bool(b) => {
            out.push(TAG_BOOL);
            out.push(*b as u8);
        }
        Value::Int(i) => {
            out.push(TAG_INT);
            out.extend_from_slice(&i.to_be_bytes());
        }
        Value::Float(f) => {
            out.push(TAG_FLOAT);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        Value::Str(s) => {
            out.push(TAG_STR);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// Decodes bytes written by [`encode_key`] back into values.
///
/// Returns `None` on bytes that are not a valid encoding (only possible for
/// bytes that did not come from `encode_key`, e.g. a corrupt state file).
pub fn decode_key(mut bytes: &[u8]) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        let v = match tag {
            TAG_NULL => Value::Null,
            TAG_BOOL => {
                let (&b, rest) = bytes.split_first()?;
                bytes = rest;
                Value::Bool(b != 0)
            }
            TAG_INT | TAG_FLOAT => {
                let (head, rest) = bytes.split_at_checked(8)?;
                bytes = rest;
                let raw = u64::from_be_bytes(head.try_into().ok()?);
                if tag == TAG_INT {
                    Value::Int(raw as i64)
                } else {
                    Value::Float(f64::from_bits(raw))
                }
            }
            TAG_STR => {
                let (len, rest) = bytes.split_at_checked(4)?;
                let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
                let (s, rest) = rest.split_at_checked(len)?;
                bytes = rest;
                Value::Str(CompactString::from(std::str::from_utf8(s).ok()?))
            }
            _ => return None,
        };
        out.push(v);
    }
    Some(out)
}

/// The stable 64-bit hash of encoded key bytes.
///
/// xxh3 is specified and does not change between versions, so the key group
/// of a key is the same on every device and in every release; state and
/// peer partitioning rely on that.
#[inline]
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let vals = vec![
            Value::Str("sensor-1".into()),
            Value::Int(-7),
            Value::Float(2.5),
            Value::Bool(true),
            Value::Null,
        ];
        let mut buf = Vec::new();
        for v in &vals {
            encode_key(v, &mut buf);
        }
        assert_eq!(decode_key(&buf), Some(vals));
        assert_eq!(decode_key(&[9]), None);
        assert_eq!(decode_key(&[TAG_STR, 5, 0, 0, 0, b'a']), None);
    }

    #[test]
    fn json_forms() {
        let mut out = Vec::new();
        for v in [
            Value::Int(3),
            Value::Float(2.0),
            Value::Float(f64::NAN),
            Value::Str("a\"b".into()),
        ] {
            v.write_json(&mut out);
            out.push(b' ');
        }
        assert_eq!(String::from_utf8(out).unwrap(), r#"3 2.0 null "a\"b" "#);
    }
}
