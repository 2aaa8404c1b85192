//! What travels between the stages of a run.
//!
//! A stage sends its downstream a [`Frame`] per input batch: the
//! [`Msg`]s that batch produced for that receiver, in order. Control
//! travels with the data, as Flink's stream elements and Arroyo's
//! `SignalMessage` do:
//!
//! - [`Msg::Data`]: a [`KeyedBatch`] of records for one owner of key groups;
//! - [`Msg::Watermark`]: event time (or processing time) has reached a point;
//! - [`Msg::Idle`]: the input has been quiet (see [`crate::time::valve`]);
//! - [`Msg::Barrier`]: checkpoint `n` is cut here (the source injected it at
//!   a source position; every record before it belongs to checkpoint `n`);
//! - [`Msg::End`]: the input ended, or the run was stopped.
//!
//! A [`KeyedBatch`] is self-contained: keys, aggregate inputs and (when an
//! output needs them) payloads are owned by it, with no index into a buffer
//! held elsewhere, so it encodes with postcard and can cross a process
//! boundary unchanged.
//!
//! [`Output`] is what operators produce for the sinks, with its place in the
//! output order.

use crate::value::{write_json_str, Value};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Why an input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// A bounded input ended: the watermark goes to +infinity and every
    /// open window fires.
    Flush,
    /// Stopped: what was read is processed, nothing more fires.
    Stop,
}

/// One element of a stream between stages.
#[derive(Debug, Serialize, Deserialize)]
pub enum Msg {
    Data(KeyedBatch),
    /// The input's watermark (ms): no later record of it is expected to be
    /// older. Event time, or processing time in processing-time pipelines.
    Watermark(i64),
    /// The input has been quiet for `quiet_ms` of processing time.
    Idle {
        quiet_ms: i64,
    },
    /// Checkpoint barrier with the checkpoint's id.
    Barrier(u64),
    End(End),
}

/// The messages one input batch produced for one receiver, in order.
pub type Frame = Vec<Msg>;

/// One record of a [`KeyedBatch`]. Ranges index the batch's own buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedRec {
    /// Index of the event in its input batch: its place in the output order.
    pub idx: u32,
    /// Event (or arrival) time in ms.
    pub ts: i64,
    /// Hash of the encoded key ([`crate::value::hash_key`]).
    pub hash: u64,
    /// Position in the source: ties of equal timestamps for `first`/`last`,
    /// and dead letters.
    pub position: u64,
    /// The encoded key in [`KeyedBatch::keys`].
    pub key: (u32, u32),
    /// First of the record's aggregate inputs in [`KeyedBatch::vals`].
    pub vals: u32,
}

/// Records of one input batch for one owner of key groups, in input order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyedBatch {
    pub recs: Vec<KeyedRec>,
    /// Encoded keys, back to back.
    pub keys: Vec<u8>,
    /// Aggregate inputs, one row of the operator's width per record.
    pub vals: Vec<Value>,
    /// Event-time watermarks reached inside the input batch: `(i, w)` means
    /// the watermark is `w` once the event with index `i` is processed.
    /// Every owner gets them all (windows of any key may fire); within one
    /// process they are shared, not copied.
    pub watermarks: Arc<Vec<(u32, i64)>>,
    /// For a union of sources: the source of each of `watermarks` (empty:
    /// all are source 0's). The keyed stage takes the least of the
    /// sources' watermarks.
    #[serde(default)]
    pub watermark_parts: Arc<Vec<u16>>,
    /// Payloads and topics of the records, back to back; filled only when a
    /// late or dead-letter output may need them.
    pub payloads: Vec<u8>,
    /// Per record (same index as `recs`), when payloads are carried: where
    /// its payload starts, where its topic starts (= the payload's end) and
    /// where the topic ends, in `payloads`.
    pub carried: Vec<[u32; 3]>,
    /// Per record (same index as `recs`), when the keyed stage passes
    /// events on (`deduplicate`, `deadband`): the event as it goes out.
    #[serde(default)]
    pub events: Vec<Event>,
}

impl KeyedBatch {
    #[inline]
    pub fn key(&self, r: &KeyedRec) -> &[u8] {
        &self.keys[r.key.0 as usize..r.key.1 as usize]
    }

    #[inline]
    pub fn vals(&self, r: &KeyedRec, width: usize) -> &[Value] {
        &self.vals[r.vals as usize..r.vals as usize + width]
    }

    /// The payload of record `i` (empty when payloads are not carried).
    pub fn payload(&self, i: usize) -> &[u8] {
        match self.carried.get(i) {
            Some(&[p, t, _]) => &self.payloads[p as usize..t as usize],
            None => &[],
        }
    }

    /// The topic of record `i`, if it came with one and payloads are carried.
    pub fn topic(&self, i: usize) -> Option<&str> {
        match self.carried.get(i) {
            Some(&[_, t, e]) if t < e => {
                std::str::from_utf8(&self.payloads[t as usize..e as usize]).ok()
            }
            _ => None,
        }
    }

    /// Carries the payload and topic of the record pushed last.
    pub fn carry(&mut self, payload: &[u8], topic: Option<&str>) {
        let p = self.payloads.len() as u32;
        self.payloads.extend_from_slice(payload);
        let t = self.payloads.len() as u32;
        if let Some(topic) = topic {
            self.payloads.extend_from_slice(topic.as_bytes());
        }
        self.carried.push([p, t, self.payloads.len() as u32]);
    }
}

/// Which output a record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    Main,
    Late,
    Dead,
    /// Not written anywhere: the keyed operator's watermark rose to
    /// `start` here (for steps after it, see [`Output::mark`]).
    Mark,
    /// The records of a further stream of a job graph: written to that
    /// stream's sinks (their index in the pipeline's graph sinks).
    Graph(u16),
    /// Not written anywhere: an event as decoded (the fields of the plan's
    /// `side`), for the streams of a job graph that read the sources
    /// besides the first.
    Side,
}

/// When, within an input batch, an output was produced: outputs are
/// written in this order, then by window end, start and key, so the output
/// is the same for any number of workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// While processing the event (or before the batch's first event).
    During = 0,
    /// After the event, when the watermark rose with it (or after the
    /// batch's last event).
    After = 1,
    /// At the end of the input, when every window fires.
    Flush = 2,
}

/// Where in the output order a watermark's results go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    pub idx: u32,
    pub phase: Phase,
}

impl Order {
    /// Before any event of the batch.
    pub const START: Order = Order {
        idx: 0,
        phase: Phase::During,
    };
    /// After every event of the batch.
    pub const END: Order = Order {
        idx: u32::MAX,
        phase: Phase::After,
    };
    /// The end of the input.
    pub const FLUSH: Order = Order {
        idx: u32::MAX,
        phase: Phase::Flush,
    };

    /// After event `idx`, when the watermark rose with it.
    #[inline]
    pub fn after(idx: u32) -> Order {
        Order {
            idx,
            phase: Phase::After,
        }
    }
}

/// What an output carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A finished JSON line: pass-through events, late events, dead letters.
    Line(Vec<u8>),
    /// A record, in the order of its stream's [`Schema`]; written as JSON
    /// only by the sink stage.
    Row(Box<[Value]>),
    /// A pass-through event with what its sinks place it by.
    Event(Box<Event>),
}

/// A pass-through event for the main sinks: the record as it goes out, the
/// values of the fields the sinks' topics name (in the order of the
/// plan's `carry`), and the message's retain flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub record: Vec<u8>,
    pub fields: Box<[Value]>,
    pub retain: bool,
}

/// The field names of a stream's records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    pub names: Vec<String>,
}

impl Schema {
    /// Writes a row as a JSON object, fields in schema order (a dotted name
    /// is written as it is, not nested).
    pub fn write_json(&self, row: &[Value], out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (name, v)) in self.names.iter().zip(row).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(name, out);
            out.push(b':');
            v.write_json(out);
        }
        out.push(b'}');
    }
}

/// A record for a sink, with its place in the output order.
#[derive(Debug)]
pub struct Output {
    pub idx: u32,
    pub phase: Phase,
    pub end: i64,
    pub start: i64,
    pub key: Box<[u8]>,
    pub stream: Stream,
    pub body: Body,
}

impl Output {
    /// An output that is not a window result, produced by event `idx`.
    pub fn plain(idx: u32, stream: Stream, line: Vec<u8>) -> Output {
        Output {
            idx,
            phase: Phase::During,
            end: 0,
            start: 0,
            key: Box::new([]),
            stream,
            body: Body::Line(line),
        }
    }

    /// A pass-through event for the main sinks, produced by event `idx`.
    pub fn event(idx: u32, event: Event) -> Output {
        Output {
            body: Body::Event(Box::new(event)),
            ..Output::plain(idx, Stream::Main, Vec::new())
        }
    }

    /// A watermark mark: after the outputs of `order`, the operator's
    /// watermark is `watermark`. Sorts after every output of the same
    /// `order`.
    pub fn mark(order: Order, watermark: i64) -> Output {
        Output {
            idx: order.idx,
            phase: order.phase,
            end: i64::MAX,
            start: watermark,
            key: Box::new([]),
            stream: Stream::Mark,
            body: Body::Line(Vec::new()),
        }
    }

    /// The output as a JSON line: its own, or its row written with `schema`
    /// into `buf`.
    pub fn json<'a>(&'a self, schema: &Schema, buf: &'a mut Vec<u8>) -> &'a [u8] {
        match &self.body {
            Body::Line(l) => l,
            Body::Event(e) => &e.record,
            Body::Row(r) => {
                buf.clear();
                schema.write_json(r, buf);
                buf
            }
        }
    }

    /// The sort key of the output order.
    #[inline]
    pub fn order_key(&self) -> (u32, Phase, i64, i64, &[u8], Stream) {
        (
            self.idx,
            self.phase,
            self.end,
            self.start,
            &self.key,
            self.stream,
        )
    }
}

/// Where a dead event came from, for its dead-letter record.
pub struct DeadSource<'a> {
    /// The pipeline's source name.
    pub source: &'a str,
    pub position: u64,
    pub topic: Option<&'a str>,
    pub payload: &'a [u8],
    /// The full size of a payload cut at `max_payload`.
    pub oversize: Option<u64>,
}

/// A dead-letter record: the reason, where the event came from and the
/// original payload (as text, or hex when it is not UTF-8).
pub fn dead_letter_line(reason: &str, from: &DeadSource) -> Vec<u8> {
    let payload = from.payload;
    let mut line = Vec::with_capacity(payload.len() + reason.len() + 64);
    line.extend_from_slice(b"{\"reason\":");
    write_json_str(reason, &mut line);
    line.extend_from_slice(b",\"source\":");
    write_json_str(from.source, &mut line);
    line.extend_from_slice(b",\"position\":");
    Value::Int(from.position as i64).write_json(&mut line);
    if let Some(t) = from.topic {
        line.extend_from_slice(b",\"topic\":");
        write_json_str(t, &mut line);
    }
    match std::str::from_utf8(payload) {
        Ok(s) => {
            line.extend_from_slice(b",\"payload\":");
            write_json_str(s, &mut line);
        }
        Err(_) => {
            line.extend_from_slice(b",\"payload_hex\":\"");
            for b in payload {
                line.extend_from_slice(format!("{b:02x}").as_bytes());
            }
            line.push(b'"');
        }
    }
    if let Some(size) = from.oversize {
        line.extend_from_slice(b",\"payload_truncated\":true,\"payload_size\":");
        Value::Int(size as i64).write_json(&mut line);
    }
    line.push(b'}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_survives_postcard_unchanged() {
        let mut b = KeyedBatch {
            keys: b"\x03k-1".to_vec(),
            vals: vec![Value::Float(1.5), Value::Str("x".into())],
            watermarks: Arc::new(vec![(0u32, 99i64)]),
            ..Default::default()
        };
        b.recs.push(KeyedRec {
            idx: 0,
            ts: 100,
            hash: 42,
            position: 7,
            key: (0, 4),
            vals: 0,
        });
        b.carry(br#"{"t":1}"#, Some("a/b"));
        let frame: Frame = vec![
            Msg::Watermark(5),
            Msg::Data(b),
            Msg::Idle { quiet_ms: 30 },
            Msg::Barrier(3),
            Msg::End(End::Flush),
        ];
        let bytes = postcard::to_stdvec(&frame).expect("encodes");
        let back: Frame = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(format!("{frame:?}"), format!("{back:?}"));
        let Msg::Data(b) = &back[1] else {
            panic!("data second")
        };
        let r = &b.recs[0];
        assert_eq!(b.key(r), b"\x03k-1");
        assert_eq!(b.vals(r, 2)[1], Value::Str("x".into()));
        assert_eq!(b.payload(0), br#"{"t":1}"#);
        assert_eq!(b.topic(0), Some("a/b"));
        assert_eq!(b.payload(1), b"", "not carried");
        assert_eq!(&b.watermarks[..], &[(0, 99)]);
    }

    #[test]
    fn rows_are_written_in_schema_order() {
        let schema = Schema {
            names: vec!["k".into(), "loc.site".into(), "n".into()],
        };
        let o = Output {
            idx: 0,
            phase: Phase::After,
            end: 0,
            start: 0,
            key: Box::new([]),
            stream: Stream::Main,
            body: Body::Row(vec![Value::Str("a\"b".into()), Value::Null, Value::Int(3)].into()),
        };
        let mut buf = Vec::new();
        assert_eq!(
            o.json(&schema, &mut buf),
            br#"{"k":"a\"b","loc.site":null,"n":3}"#
        );
    }

    #[test]
    fn dead_letters_keep_the_payload_as_text_or_hex() {
        let from = DeadSource {
            source: "mqtt",
            position: 3,
            topic: Some("s/1"),
            payload: b"\xff\x00",
            oversize: Some(2_000_000),
        };
        let line = String::from_utf8(dead_letter_line("bad \"json\"", &from)).expect("utf-8");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["reason"], "bad \"json\"");
        assert_eq!(v["payload_hex"], "ff00");
        assert_eq!(v["payload_size"], 2_000_000);
        assert_eq!(v["topic"], "s/1");
    }
}
