//! What a checked pipeline file says: the specs the builder turns into a
//! running pipeline.

#[allow(unused_imports)]
use super::*;

/// A checked source.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    File { path: String },
    Generator(GeneratorSpec),
    Mqtt(MqttSourceSpec),
}

/// Where a password comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum PasswordSpec {
    None,
    Inline(String),
    Env(String),
    File(String),
}

/// Checked connection settings of an MQTT source or sink.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnSpec {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// 4 (MQTT 3.1.1) or 5.
    pub version: u8,
    pub client_id: Option<String>,
    /// `None`: not set; a journaled source defaults to a persistent session.
    pub clean_session: Option<bool>,
    pub keep_alive_ms: i64,
    pub username: Option<String>,
    pub password: PasswordSpec,
    pub ca_file: Option<String>,
    pub client_cert: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttSourceSpec {
    pub conn: ConnSpec,
    pub topics: Vec<TopicPattern>,
    pub qos: u8,
    pub topic_field: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttSinkSpec {
    pub conn: ConnSpec,
    pub topic: TopicTemplate,
    pub qos: u8,
    pub retain: bool,
    /// `retain: keep`.
    pub keep_retain: bool,
    /// Home Assistant discovery (its availability and pipeline are set
    /// when the sink is built).
    pub home_assistant: Option<crate::sinks::home_assistant::Discovery>,
    pub memory: usize,
    pub disk: usize,
    pub dir: Option<String>,
    pub when_full: WhenFull,
    pub drain_timeout_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorSpec {
    pub sensors: u32,
    pub rate: Option<f64>,
    pub disorder_ms: i64,
    pub seed: u64,
    pub count: Option<u64>,
    pub start_ms: Option<i64>,
}

/// A checked sink.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkSpec {
    File { path: String },
    Stdout,
    Mqtt(Box<MqttSinkSpec>),
}

/// A checked step.
#[derive(Clone, Debug)]
pub enum StepSpec {
    Map(Vec<(String, String)>),
    Filter(String),
    KeyBy(Vec<String>),
    Window(WindowDef),
    /// A stateful step and its `max_keys`.
    Stateful(crate::operators::stateful::StatefulDef, Option<usize>),
}

/// A pipeline file that passed validation.
#[derive(Clone, Debug)]
pub struct ValidPipeline {
    pub name: String,
    pub source: SourceSpec,
    pub format: Format,
    pub time: TimeSpec,
    pub max_payload: usize,
    pub steps: Vec<StepSpec>,
    pub sinks: Vec<SinkSpec>,
    pub late: Vec<SinkSpec>,
    pub dead_letter: Vec<SinkSpec>,
    pub state_dir: Option<String>,
    pub checkpoint_interval: Option<i64>,
    pub workers: Option<usize>,
    pub peers: Option<PeersSpec>,
    /// The status topic and the broker connection that carries it.
    pub status: Option<StatusSpec>,
    /// The HTTP endpoint, when the file asks for one.
    pub http: Option<HttpSpec>,
    /// The general form (`sources`, `streams`): the stream the source
    /// feeds (its steps and sinks are `steps` and `sinks`) and the others.
    pub graph: Option<GraphSpec>,
    /// A union of several sources (`from: [a, b]` in a job graph): each
    /// one's name, source, time and largest payload. `source`, `time` and
    /// `max_payload` are then the first one's.
    pub union: Vec<UnionSpec>,
}

/// One source of a union.
#[derive(Clone, Debug, PartialEq)]
pub struct UnionSpec {
    pub name: String,
    pub source: SourceSpec,
    pub time: TimeSpec,
    pub max_payload: usize,
}

/// A job graph's streams.
#[derive(Clone, Debug)]
pub struct GraphSpec {
    /// The name of the stream that reads the sources.
    pub head: String,
    /// The other streams, each after the streams it reads.
    pub streams: Vec<StreamSpec>,
}

/// A stream that reads other streams.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub name: String,
    pub from: Vec<String>,
    /// It reads the sources (events as decoded), like the first stream.
    pub reads_sources: bool,
    pub steps: Vec<StepSpec>,
    pub sinks: Vec<SinkSpec>,
}

/// A checked `http` section.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpSpec {
    /// As written: a host name is resolved when the endpoint starts.
    pub listen: String,
    pub auth: Option<crate::observe::http::AuthSource>,
    /// How long to keep serving after a bounded input ended, ms.
    pub linger_ms: i64,
    /// How long batches may wait unwritten before `/health` says stuck, ms.
    pub stuck_after_ms: i64,
}

/// A checked `status` section (or the default one).
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSpec {
    pub conn: ConnSpec,
    pub topic: String,
}

/// A checked `peers:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct PeersSpec {
    pub cluster: String,
    pub id: String,
    pub listen: std::net::SocketAddr,
    pub advertise: String,
    /// `advertise` was derived, not set: peer mode may replace an
    /// unresolvable host name with the address it reaches the broker from.
    pub advertise_derived: bool,
    pub keep_alive_ms: i64,
    pub failure_timeout_ms: i64,
    /// CA, certificate and key files.
    pub tls: Option<(String, String, String)>,
}

impl ValidPipeline {
    /// What peers of one cluster must share: the pipeline's name, input,
    /// time and steps (a short hash; sinks, state and peers settings may
    /// differ per device).
    pub fn peer_fingerprint(&self) -> String {
        let topics = match &self.source {
            SourceSpec::Mqtt(m) => m.topics.iter().map(|t| t.filter.clone()).collect(),
            _ => Vec::new(),
        };
        let canonical = format!(
            "{}|{:?}|{:?}|{:?}|{:?}",
            self.name, topics, self.format, self.time, self.steps
        );
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(canonical.as_bytes()))
    }
}

impl SourceSpec {
    /// The fields every event has, where the source says.
    pub fn known_fields(&self) -> Option<Vec<String>> {
        match self {
            SourceSpec::Generator(_) => {
                Some(generator::FIELDS.iter().map(|s| s.to_string()).collect())
            }
            _ => None,
        }
    }
}
