//! Decoding JSON payloads into slots.
//!
//! The planner registers every field path the pipeline uses in a
//! [`FieldTree`]. [`FieldTree::decode`] walks a JSON object once with
//! `serde_json`, stores the values of registered paths in their slots and
//! skips everything else without building it. Strings without escapes are
//! read in place; short ones are stored inline, so decoding a typical sensor
//! reading allocates nothing.
//!
//! A registered field that holds an object or array (where a value is
//! expected) is a decode error: such an event goes to the dead-letter output
//! with that reason.

use crate::value::Value;
use compact_str::CompactString;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;

/// The registered field paths, as a tree of path segments.
#[derive(Clone, Debug, Default)]
pub struct FieldTree {
    nodes: Vec<Node>,
    paths: Vec<String>,
}

#[derive(Clone, Debug, Default)]
struct Node {
    children: Vec<Child>,
}

#[derive(Clone, Debug)]
struct Child {
    name: Box<str>,
    /// Slot of this exact path, if it is read as a value.
    slot: Option<usize>,
    /// Node of this path's sub-fields, if any deeper path is registered.
    inner: Option<usize>,
}

impl FieldTree {
    pub fn new() -> Self {
        FieldTree {
            nodes: vec![Node::default()],
            paths: Vec::new(),
        }
    }

    /// Number of slots handed out so far.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Path of each slot, by slot index.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The slot of a dotted path, registering it on first use.
    pub fn slot(&mut self, path: &str) -> usize {
        if let Some(i) = self.paths.iter().position(|p| p == path) {
            return i;
        }
        let slot = self.paths.len();
        self.paths.push(path.to_string());
        let mut node = 0;
        let segments: Vec<&str> = path.split('.').collect();
        for (depth, seg) in segments.iter().enumerate() {
            let last = depth + 1 == segments.len();
            let pos = match self.nodes[node]
                .children
                .iter()
                .position(|c| &*c.name == *seg)
            {
                Some(p) => p,
                None => {
                    self.nodes[node].children.push(Child {
                        name: (*seg).into(),
                        slot: None,
                        inner: None,
                    });
                    self.nodes[node].children.len() - 1
                }
            };
            if last {
                self.nodes[node].children[pos].slot = Some(slot);
            } else {
                node = match self.nodes[node].children[pos].inner {
                    Some(n) => n,
                    None => {
                        self.nodes.push(Node::default());
                        let n = self.nodes.len() - 1;
                        self.nodes[node].children[pos].inner = Some(n);
                        n
                    }
                };
            }
        }
        slot
    }

    /// Decodes one JSON object into `slots` (which must hold `self.len()`
    /// values, all `Null` on entry).
    ///
    /// A fast scanner ([`fast`]) handles the common case: ASCII objects
    /// whose strings have no escapes. Anything else (escapes, non-ASCII,
    /// errors of any kind) is decoded again by serde_json, which gives the
    /// exact semantics and error messages. The two agree on every input the
    /// scanner accepts (a property test checks it).
    pub fn decode(&self, payload: &[u8], slots: &mut [Value]) -> Result<(), String> {
        if fast::decode(self, payload, slots).is_ok() {
            return Ok(());
        }
        slots.iter_mut().for_each(|s| *s = Value::Null);
        self.decode_serde(payload, slots)
    }

    /// The reference decoder: serde_json.
    pub fn decode_serde(&self, payload: &[u8], slots: &mut [Value]) -> Result<(), String> {
        // One UTF-8 check of the whole payload (fast for ASCII) lets
        // serde_json skip checking every string on its own.
        let text = std::str::from_utf8(payload)
            .map_err(|e| format!("invalid JSON: the payload is not UTF-8 ({e})"))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let seed = ObjectSeed {
            tree: self,
            node: 0,
            slots,
            top: true,
        };
        seed.deserialize(&mut de)
            .map_err(|e| format!("invalid JSON: {e}"))?;
        de.end().map_err(|e| format!("invalid JSON: {e}"))
    }
}

/// The fast path: a strict scanner for the common subset of JSON.
///
/// It fills the registered slots of an object made of ASCII text with no
/// string escapes, skipping other fields without building them. It gives up
/// (`Err(GiveUp)`) on anything outside that subset and on any error, leaving
/// the verdict to serde_json; it never accepts what serde_json would reject.
mod fast {
    use super::{FieldTree, Value};
    use compact_str::CompactString;

    pub struct GiveUp;
    type R<T> = Result<T, GiveUp>;

    const MAX_DEPTH: usize = 64;

    /// Exact powers of ten as f64 (all below 2^53).
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];

    struct Scan<'a> {
        b: &'a [u8],
        i: usize,
    }

    impl<'a> Scan<'a> {
        #[inline]
        fn ws(&mut self) {
            while let Some(&c) = self.b.get(self.i) {
                if c == b' ' || c == b'\n' || c == b'\t' || c == b'\r' {
                    self.i += 1;
                } else {
                    break;
                }
            }
        }
        #[inline]
        fn peek(&self) -> R<u8> {
            self.b.get(self.i).copied().ok_or(GiveUp)
        }
        #[inline]
        fn eat(&mut self, c: u8) -> R<()> {
            if self.peek()? == c {
                self.i += 1;
                Ok(())
            } else {
                Err(GiveUp)
            }
        }
        /// A string without escapes, control or non-ASCII bytes; returns
        /// its contents. The opening quote is the current byte.
        #[inline]
        fn string(&mut self) -> R<&'a [u8]> {
            let start = self.i + 1;
            let rest = self.b.get(start..).ok_or(GiveUp)?;
            let len = rest
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c))
                .ok_or(GiveUp)?;
            if rest[len] != b'"' {
                return Err(GiveUp);
            }
            self.i = start + len + 1;
            Ok(&rest[..len])
        }
        /// Consumes digits; returns their value (saturating past 19 digits) and count.
        #[inline]
        fn digits(&mut self) -> (u64, usize) {
            let start = self.i;
            let mut v: u64 = 0;
            while let Some(&c) = self.b.get(self.i) {
                if !c.is_ascii_digit() {
                    break;
                }
                v = v.wrapping_mul(10).wrapping_add((c - b'0') as u64);
                self.i += 1;
            }
            (v, self.i - start)
        }
        /// A number, by JSON's grammar; converted only when `want`.
        fn number(&mut self, want: bool) -> R<Value> {
            let start = self.i;
            let neg = self.peek()? == b'-';
            if neg {
                self.i += 1;
            }
            let int_start = self.i;
            let (int, n) = self.digits();
            if n == 0 || (n > 1 && self.b[int_start] == b'0') {
                return Err(GiveUp);
            }
            let (mut frac, mut nfrac) = (0, 0);
            if self.b.get(self.i) == Some(&b'.') {
                self.i += 1;
                (frac, nfrac) = self.digits();
                if nfrac == 0 {
                    return Err(GiveUp);
                }
            }
            let mut exp = false;
            if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
                self.i += 1;
                if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                    self.i += 1;
                }
                if self.digits().1 == 0 {
                    return Err(GiveUp);
                }
                exp = true;
            }
            if !want {
                return Ok(Value::Null);
            }
            if nfrac == 0 && !exp {
                // Up to 18 digits always fits an i64; longer ones, and `-0`
                // (a float for serde_json), are left to serde_json.
                if n > 18 || (neg && int == 0) {
                    return Err(GiveUp);
                }
                return Ok(Value::Int(if neg { -(int as i64) } else { int as i64 }));
            }
            if !exp && n + nfrac <= 15 {
                // Clinger's fast path: an integer below 2^53 divided by an
                // exact power of ten is correctly rounded.
                let mantissa = (int * POW10[nfrac] as u64 + frac) as f64;
                let v = mantissa / POW10[nfrac];
                return Ok(Value::Float(if neg { -v } else { v }));
            }
            let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| GiveUp)?;
            text.parse::<f64>().map(Value::Float).map_err(|_| GiveUp)
        }
        fn literal(&mut self, word: &[u8]) -> R<()> {
            if self.b[self.i..].starts_with(word) {
                self.i += word.len();
                Ok(())
            } else {
                Err(GiveUp)
            }
        }
        /// A scalar value (the current byte starts it).
        fn scalar(&mut self) -> R<Value> {
            match self.peek()? {
                b'"' => {
                    let s = self.string()?;
                    // The scanner admits ASCII only, so this cannot fail.
                    let s = std::str::from_utf8(s).map_err(|_| GiveUp)?;
                    Ok(Value::Str(CompactString::from(s)))
                }
                b't' => self.literal(b"true").map(|_| Value::Bool(true)),
                b'f' => self.literal(b"false").map(|_| Value::Bool(false)),
                b'n' => self.literal(b"null").map(|_| Value::Null),
                _ => self.number(true),
            }
        }
        /// Skips any value.
        fn skip(&mut self, depth: usize) -> R<()> {
            if depth > MAX_DEPTH {
                return Err(GiveUp);
            }
            match self.peek()? {
                b'{' => {
                    self.i += 1;
                    self.ws();
                    if self.peek()? == b'}' {
                        self.i += 1;
                        return Ok(());
                    }
                    loop {
                        self.ws();
                        if self.peek()? != b'"' {
                            return Err(GiveUp);
                        }
                        self.string()?;
                        self.ws();
                        self.eat(b':')?;
                        self.ws();
                        self.skip(depth + 1)?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b'}' => {
                                self.i += 1;
                                return Ok(());
                            }
                            _ => return Err(GiveUp),
                        }
                    }
                }
                b'[' => {
                    self.i += 1;
                    self.ws();
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Ok(());
                    }
                    loop {
                        self.ws();
                        self.skip(depth + 1)?;
                        self.ws();
                        match self.peek()? {
                            b',' => self.i += 1,
                            b']' => {
                                self.i += 1;
                                return Ok(());
                            }
                            _ => return Err(GiveUp),
                        }
                    }
                }
                b'"' => self.string().map(|_| ()),
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                b'n' => self.literal(b"null"),
                _ => self.number(false).map(|_| ()),
            }
        }
        /// An object whose registered fields are in `node`.
        fn object(
            &mut self,
            tree: &FieldTree,
            node: usize,
            slots: &mut [Value],
            depth: usize,
        ) -> R<()> {
            if depth > MAX_DEPTH {
                return Err(GiveUp);
            }
            self.eat(b'{')?;
            self.ws();
            if self.peek()? == b'}' {
                self.i += 1;
                return Ok(());
            }
            let children = &tree.nodes[node].children;
            loop {
                self.ws();
                if self.peek()? != b'"' {
                    return Err(GiveUp);
                }
                let key = self.string()?;
                self.ws();
                self.eat(b':')?;
                self.ws();
                match children.iter().find(|c| c.name.as_bytes() == key) {
                    None => self.skip(depth + 1)?,
                    Some(child) => match self.peek()? {
                        b'{' => match child.inner {
                            Some(inner) => self.object(tree, inner, slots, depth + 1)?,
                            // A value field holding an object: an error,
                            // reported by serde_json.
                            None => return Err(GiveUp),
                        },
                        b'[' => {
                            if child.slot.is_some() {
                                return Err(GiveUp);
                            }
                            self.skip(depth + 1)?;
                        }
                        _ => {
                            let v = self.scalar()?;
                            if let Some(s) = child.slot {
                                slots[s] = v;
                            }
                        }
                    },
                }
                self.ws();
                match self.peek()? {
                    b',' => self.i += 1,
                    b'}' => {
                        self.i += 1;
                        return Ok(());
                    }
                    _ => return Err(GiveUp),
                }
            }
        }
    }

    pub fn decode(tree: &FieldTree, payload: &[u8], slots: &mut [Value]) -> R<()> {
        let mut s = Scan { b: payload, i: 0 };
        s.ws();
        s.object(tree, 0, slots, 0)?;
        s.ws();
        if s.i == payload.len() {
            Ok(())
        } else {
            Err(GiveUp)
        }
    }
}

struct ObjectSeed<'t, 's> {
    tree: &'t FieldTree,
    node: usize,
    slots: &'s mut [Value],
    top: bool,
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let node = &self.tree.nodes[self.node];
        while let Some(idx) = map.next_key_seed(KeySeed(node))? {
            match idx {
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
                Some(i) => {
                    let child = &node.children[i];
                    map.next_value_seed(FieldSeed {
                        tree: self.tree,
                        child,
                        slots: &mut *self.slots,
                    })?;
                }
            }
        }
        Ok(())
    }

    // A nested path under a non-object value simply does not exist; at the
    // top level the payload itself must be an object.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_object()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_object()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_object()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_object()
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.top {
            return Err(de::Error::custom("the payload is an array, not an object"));
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

impl ObjectSeed<'_, '_> {
    fn not_object<E: de::Error>(&self) -> Result<(), E> {
        if self.top {
            Err(E::custom("the payload is not a JSON object"))
        } else {
            Ok(())
        }
    }
}

/// Matches an object key against a node's children without allocating.
struct KeySeed<'t>(&'t Node);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.children.iter().position(|c| &*c.name == v))
    }
}

/// Reads the value of one registered field.
struct FieldSeed<'t, 's> {
    tree: &'t FieldTree,
    child: &'t Child,
    slots: &'s mut [Value],
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_, '_> {
    fn set<E: de::Error>(self, v: Value) -> Result<(), E> {
        if let Some(s) = self.child.slot {
            self.slots[s] = v;
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.set(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.set(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.set(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match i64::try_from(v) {
            Ok(i) => self.set(Value::Int(i)),
            Err(_) => self.set(Value::Float(v as f64)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.set(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.set(Value::Str(CompactString::from(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        match (self.child.inner, self.child.slot) {
            (Some(node), _) => ObjectSeed {
                tree: self.tree,
                node,
                slots: self.slots,
                top: false,
            }
            .visit_map(map),
            (None, _) => Err(de::Error::custom(format_args!(
                "field `{}` is an object; a number, string, boolean or null was expected",
                self.child.name
            ))),
        }
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.child.slot.is_none() {
            // Only deeper paths are wanted: they do not exist under an array.
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        }
        Err(de::Error::custom(format_args!(
            "field `{}` is an array; a number, string, boolean or null was expected",
            self.child.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(tree: &FieldTree, s: &str) -> Result<Vec<Value>, String> {
        let mut slots = vec![Value::Null; tree.len()];
        tree.decode(s.as_bytes(), &mut slots).map(|_| slots)
    }

    #[test]
    fn reads_only_registered_fields() {
        let mut t = FieldTree::new();
        let a = t.slot("id");
        let b = t.slot("loc.room");
        let c = t.slot("t");
        let v = decode(
            &t,
            r#"{"skip":[1,{"x":2}],"id":"s\u0031","loc":{"room":4,"floor":1},"t":1.5,"n":null}"#,
        )
        .unwrap();
        assert_eq!(v[a], Value::Str("s1".into()));
        assert_eq!(v[b], Value::Int(4));
        assert_eq!(v[c], Value::Float(1.5));
    }

    #[test]
    fn missing_and_non_object_parents_are_null() {
        let mut t = FieldTree::new();
        t.slot("loc.room");
        assert_eq!(decode(&t, r#"{"loc":3}"#).unwrap(), vec![Value::Null]);
        assert_eq!(decode(&t, r#"{}"#).unwrap(), vec![Value::Null]);
    }

    /// Random JSON-like lines, some broken on purpose.
    fn random_line(rng: &mut u64) -> String {
        let mut next = |n: u64| {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % n
        };
        let keys = ["a", "b", "id", "loc", "room", "t", "x"];
        let scalars = [
            "1",
            "-1",
            "0",
            "-0",
            "12.5",
            "0.1",
            "-3.14159",
            "71.25",
            "123456.789012345",
            "9007199.254740993",
            "1e3",
            "-2.5E-3",
            "007",
            "1.",
            "99999999999999999999",
            "123456789012345678",
            "true",
            "false",
            "null",
            "nul",
            "\"s\"",
            "\"é\"",
            "\"a\\\"b\"",
            "\"\\u0041\"",
            "\"tab\\t\"",
            "[]",
            "[1, {\"a\": 2}]",
            "{}",
            "{\"room\": 3}",
            "{\"room\": {\"x\": 1}}",
            "\"unterminated",
        ];
        let mut s = String::from("{");
        for i in 0..next(5) {
            if i > 0 {
                s.push_str(if next(20) == 0 { " ,, " } else { ", " });
            }
            s.push_str(&format!(
                "\"{}\": {}",
                keys[next(7) as usize],
                scalars[next(scalars.len() as u64) as usize]
            ));
        }
        s.push('}');
        match next(12) {
            0 => {
                s.pop();
            }
            1 => s.push_str(" x"),
            2 => s = format!(" \n{s}\t "),
            3 => s = s.replace(':', ""),
            _ => {}
        }
        s
    }

    #[test]
    fn fast_path_agrees_with_serde_json() {
        let mut t = FieldTree::new();
        for p in ["a", "id", "loc.room", "loc", "t", "x.y"] {
            t.slot(p);
        }
        let mut rng = 0x2545F4914F6CDD1Du64;
        let (mut fast_ok, mut total) = (0, 0);
        for _ in 0..50_000 {
            let line = random_line(&mut rng);
            let mut a = vec![Value::Null; t.len()];
            let mut b = vec![Value::Null; t.len()];
            let reference = t.decode_serde(line.as_bytes(), &mut b);
            total += 1;
            if fast::decode(&t, line.as_bytes(), &mut a).is_ok() {
                fast_ok += 1;
                assert!(
                    reference.is_ok(),
                    "fast path accepted what serde_json rejects: {line}"
                );
                for (x, y) in a.iter().zip(&b) {
                    match (x, y) {
                        (Value::Float(p), Value::Float(q)) => {
                            assert_eq!(p.to_bits(), q.to_bits(), "{line}")
                        }
                        _ => assert_eq!(x, y, "{line}"),
                    }
                }
            }
            // Whatever path is taken, decode() agrees with the reference.
            let mut c = vec![Value::Null; t.len()];
            assert_eq!(
                t.decode(line.as_bytes(), &mut c).is_ok(),
                reference.is_ok(),
                "{line}"
            );
        }
        assert!(
            fast_ok > total / 5,
            "the fast path handles the common case ({fast_ok}/{total})"
        );
    }

    #[test]
    fn errors_are_reasons() {
        let mut t = FieldTree::new();
        t.slot("a");
        assert!(decode(&t, "[1]").unwrap_err().contains("array"));
        assert!(decode(&t, "7").unwrap_err().contains("not a JSON object"));
        assert!(decode(&t, r#"{"a":{"b":1}}"#)
            .unwrap_err()
            .contains("`a` is an object"));
        assert!(decode(&t, r#"{"a":1} x"#)
            .unwrap_err()
            .contains("invalid JSON"));
        assert!(decode(&t, r#"{"a":"#).unwrap_err().contains("invalid JSON"));
    }
}
