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
    pub fn decode(&self, payload: &[u8], slots: &mut [Value]) -> Result<(), String> {
        let mut de = serde_json::Deserializer::from_slice(payload);
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
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
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
