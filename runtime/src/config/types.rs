//! The pipeline file as written: serde structs whose doc comments are the
//! user documentation (they become the descriptions in `rivulet schema`).
//!
//! These types only describe shape. Meaning (durations, expressions, which
//! fields exist, step order) is checked in [`super::validate`].

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use std::borrow::Cow;

/// A value with the line and column where it was written.
/// A sink's `retain:`: a flag, or `keep`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RetainConfig {
    Flag(bool),
    Word(String),
}

#[derive(Clone, Debug)]
pub struct Sp<T> {
    pub value: T,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
}

impl<T> std::ops::Deref for Sp<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Sp<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}
impl<T: Eq> Eq for Sp<T> {}
impl<T: std::hash::Hash> std::hash::Hash for Sp<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.hash(state)
    }
}

impl<'de, T: Deserialize<'de> + Clone> Deserialize<'de> for Sp<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = marked_yaml::Spanned::<T>::deserialize(d)?;
        let (line, column) = s
            .span()
            .start()
            .map(|m| (m.line(), m.column()))
            .unwrap_or((0, 0));
        Ok(Sp {
            value: (*s).clone(),
            line,
            column,
        })
    }
}

impl<T: JsonSchema> JsonSchema for Sp<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(g)
    }
}

/// A number or a word, as YAML scalars arrive (`1000`, `unlimited`, `64KiB`).
///
/// YAML scalars reach serde as strings; keeping the text lets validation
/// give one precise message for every malformed value.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "NumberOrString".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["number", "string"] })
    }
}

/// A duration: a whole number and a unit, `ms`, `s`, `m` or `h` (`250ms`, `5s`).
pub type DurationText = Sp<String>;

/// A rivulet pipeline file.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "rivulet pipeline")]
pub struct PipelineFile {
    /// Name of the pipeline, shown in logs.
    pub name: String,
    /// The source of a pipeline of one stream (or use `sources` and
    /// `streams`, a job graph).
    pub source: Option<SourceConfig>,
    /// Processing steps, applied in order.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Where results go: one sink or a list of sinks.
    pub sink: Option<OneOrMany<SinkConfig>>,
    /// A job graph's named sources (with `streams`, instead of `source`).
    pub sources: Option<std::collections::BTreeMap<String, SourceConfig>>,
    /// A job graph's named streams: each reads sources or other streams.
    pub streams: Option<std::collections::BTreeMap<String, StreamConfig>>,
    /// Where events too late for their window go (the late side output).
    /// Without it late events are counted and dropped.
    pub late: Option<OneOrMany<SinkConfig>>,
    /// Where events that cannot be processed go, each with the reason.
    /// Without it they are counted and logged.
    pub dead_letter: Option<OneOrMany<SinkConfig>>,
    pub state: Option<StateConfig>,
    /// Worker threads that own disjoint key groups (default: number of cores).
    pub workers: Option<usize>,
    pub peers: Option<PeersConfig>,
    /// Availability on MQTT: a retained `online` on a status topic while
    /// the pipeline runs, `offline` (a Last Will) when it stops or vanishes.
    /// On by default when the source or a sink is MQTT.
    pub status: Option<StatusConfig>,
    /// The HTTP endpoint: Prometheus metrics, the live page, the API.
    pub http: Option<HttpConfig>,
}

/// A stream of a job graph.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The sources it reads, or the streams (their results): one name or
    /// a list (a union).
    pub from: OneOrMany<String>,
    /// Its steps, applied in order.
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Where its records go (optional when another stream reads it).
    pub sink: Option<OneOrMany<SinkConfig>>,
}

/// The `http` section.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on, e.g. `127.0.0.1:9464` (port 0: any free
    /// port, logged at start).
    pub listen: Sp<String>,
    /// Credentials asked of clients that are not on loopback, and of every
    /// `POST`.
    pub auth: Option<HttpAuthConfig>,
    /// Keep serving this long after a bounded input ended (e.g. `30s`), so
    /// that the final figures are scraped. Default `0s`.
    pub linger: Option<Sp<String>>,
    /// `GET /health` answers 503 when batches have waited this long with
    /// none written (the pipeline is stuck). Default `30s`.
    pub stuck_after: Option<Sp<String>>,
}

/// Credentials of the HTTP endpoint: a bearer token, or a user and password
/// (basic auth). Secrets come from an environment variable or a file, never
/// from the pipeline file.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpAuthConfig {
    /// The bearer token is in this environment variable.
    pub token_env: Option<Sp<String>>,
    /// The bearer token is in this file (trailing newline ignored).
    pub token_file: Option<Sp<String>>,
    /// Basic auth: the user name.
    pub user: Option<Sp<String>>,
    /// Basic auth: the password is in this environment variable.
    pub password_env: Option<Sp<String>>,
    /// Basic auth: the password is in this file.
    pub password_file: Option<Sp<String>>,
}

/// The `status` section.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Default `rivulet/<name>/status` (`rivulet/<name>/<peer id>/status` in
    /// peer mode).
    pub topic: Option<Sp<String>>,
    /// `false` turns the status topic off. Default `true`.
    pub enabled: Option<bool>,
}

/// One item or a list of items.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Where events come from, how they are decoded and how they are timed.
/// Exactly one of `mqtt`, `file` and `generator`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub mqtt: Option<MqttSourceConfig>,
    pub file: Option<FileSourceConfig>,
    pub generator: Option<GeneratorConfig>,
    /// Payload format: `json` (one JSON object per event; the default),
    /// `text` (the payload is the field `value`, a number where it parses as
    /// one) or `raw` (not read; forwarded byte for byte).
    pub format: Option<Sp<String>>,
    /// Use the time carried by each event (event time).
    pub event_time: Option<EventTimeConfig>,
    /// `processing` to window by arrival time instead of `event_time`;
    /// `ingestion` to use the arrival time as event time (kept in the MQTT
    /// input journal, so a replay windows each message as the first time).
    pub time: Option<Sp<String>>,
    /// Largest accepted event, in bytes or with a unit (`64KiB`, `1MiB`).
    /// Larger events go to the dead-letter output. Default 1MiB.
    #[schemars(with = "Scalar")]
    pub max_payload: Option<Sp<Scalar>>,
}

macro_rules! connection_of {
    ($t:ty) => {
        impl $t {
            pub fn connection(&self) -> ConnectionConfig {
                ConnectionConfig {
                    version: self.version.clone(),
                    client_id: self.client_id.clone(),
                    clean_session: self.clean_session,
                    keep_alive: self.keep_alive.clone(),
                    username: self.username.clone(),
                    password: self.password.clone(),
                    password_env: self.password_env.clone(),
                    password_file: self.password_file.clone(),
                    ca_file: self.ca_file.clone(),
                    client_cert: self.client_cert.clone(),
                    client_key: self.client_key.clone(),
                }
            }
        }
    };
}
/// Declares an MQTT source or sink config: its own fields, then the
/// connection settings both share (serde's `flatten` would lose the
/// positions that validation reports).
macro_rules! with_connection {
    ($(#[$m:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        pub struct $name {
            $($body)*
            /// MQTT protocol version: 3 (3.1.1, the default) or 5.
            pub version: Option<Sp<u8>>,
            /// Client id (default: `rivulet-<pipeline>-<host>-<role>`).
            pub client_id: Option<String>,
            /// Start a clean session (default true); false keeps the session, and
            /// QoS 1 messages, on the broker while rivulet is away.
            pub clean_session: Option<bool>,
            /// Keep-alive interval (default 30s).
            pub keep_alive: Option<DurationText>,
            pub username: Option<String>,
            /// A password written here; prefer `password_env` or `password_file`.
            pub password: Option<String>,
            /// Name of an environment variable holding the password.
            pub password_env: Option<Sp<String>>,
            /// File holding the password (trailing newline removed).
            pub password_file: Option<Sp<String>>,
            /// PEM file of the CA certificates to trust (default: the system's).
            pub ca_file: Option<Sp<String>>,
            /// PEM client certificate, for mutual TLS (with `client_key`).
            pub client_cert: Option<Sp<String>>,
            /// PEM private key of `client_cert`.
            pub client_key: Option<Sp<String>>,
        }
        connection_of!($name);
    };
}

with_connection! {
/// Read events from an MQTT broker.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Broker URL, `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: Sp<String>,
    /// Topic filters (`+` and `#` wildcards); `{name}` as a whole level
    /// subscribes to `+` and binds that level to the field `name`.
    pub topics: Vec<Sp<String>>,
    /// Quality of service: 0 or 1 (default 0).
    pub qos: Option<Sp<u8>>,
    /// Field that receives the full topic (default `topic`; `""` for none).
    pub topic_field: Option<String>,
}
}

/// Read JSON Lines from a file; `-` reads standard input. A bounded stream:
/// when the input ends every open window fires.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    pub path: Sp<String>,
}

/// Synthetic sensor readings: `{"sensor_id": "sensor-7", "ts": <epoch ms>,
/// "temperature": <°F>, "humidity": <%>}`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Number of distinct sensors (keys). Default 10.
    pub sensors: Option<u32>,
    /// Events per second (paced in real time), or `unlimited`. Default 1000.
    #[schemars(with = "Scalar")]
    pub rate: Option<Sp<Scalar>>,
    /// Each event's timestamp lags by a random amount up to this duration.
    /// Default `0ms` (in order).
    pub disorder: Option<DurationText>,
    /// Random seed; the same seed gives the same events. Default 1.
    pub seed: Option<u64>,
    /// Total number of events, then the stream ends. Default: unbounded.
    pub count: Option<u64>,
    /// Event time of the first event: epoch milliseconds or RFC 3339.
    /// Default: the wall clock at start.
    #[schemars(with = "Scalar")]
    pub start: Option<Sp<Scalar>>,
}

/// Event time: where each event's timestamp is and how out of order events may arrive.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Field holding the timestamp: an epoch number (in `unit`), an RFC 3339
    /// string, or a string laid out as `format` says.
    pub field: Sp<String>,
    /// Unit of numeric timestamps: `s`, `ms`, `us` or `ns`. Default `ms`.
    pub unit: Option<Sp<String>>,
    /// Layout of string timestamps, strftime-style (`%d.%m.%Y %H:%M:%S`).
    /// Default: RFC 3339, or ISO 8601 without an offset.
    pub format: Option<Sp<String>>,
    /// Zone of timestamps written without a UTC offset: an IANA name
    /// (`Europe/Berlin`, `UTC`) or `local`. Without it such timestamps are
    /// dead letters.
    pub timezone: Option<Sp<String>>,
    /// Years a numeric timestamp must fall in, `FROM..UNTIL` (UTC), or
    /// `any`. Default `2000..2100`: a number outside is a dead letter whose
    /// reason names the unit it would fit.
    pub plausible_years: Option<Sp<String>>,
    /// How far behind the largest timestamp seen an event may be and still be on time.
    pub max_out_of_orderness: Option<DurationText>,
    /// After this long without events, the watermark advances with the wall
    /// clock so that open windows still fire.
    pub idle_timeout: Option<DurationText>,
}

/// One processing step: exactly one of `map`, `filter`, `key_by`, `window`,
/// `deduplicate`, `deadband`, `alert`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
pub enum StepConfig {
    /// New or replaced fields: `name: expression`, evaluated in order.
    Map(IndexMap<Sp<String>, Sp<Scalar>>),
    /// Keep only events for which the expression is `true`.
    Filter(Sp<Scalar>),
    /// Partition by one field or a list of fields.
    #[schemars(with = "OneOrMany<String>")]
    KeyBy(Sp<FieldList>),
    /// An event-time (or processing-time) window with aggregates.
    Window(WindowConfig),
    /// After `key_by`: drop repeats of an event within a time.
    Deduplicate(DeduplicateConfig),
    /// After `key_by`: pass an event only when a field changed enough
    /// (report by exception).
    Deadband(DeadbandConfig),
    /// After `key_by`: raise an alert when a condition held for a time,
    /// clear it when another holds.
    Alert(AlertConfig),
}

/// `deduplicate: { fields: [msg_id], within: 10m }`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeduplicateConfig {
    /// The fields that make two events the same (one or a list).
    #[schemars(with = "OneOrMany<String>")]
    pub fields: Sp<FieldList>,
    /// How long after an event its repeats are dropped (event time).
    pub within: DurationText,
    /// Most keys with state (a bound on its size). Events of new keys
    /// beyond it go to the dead-letter output. Default: no bound.
    pub max_keys: Option<usize>,
}

/// `deadband: { field: temperature, delta: 0.5, max_silence: 5m }`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadbandConfig {
    /// The number watched.
    pub field: Sp<String>,
    /// The smallest change that passes an event.
    pub delta: Sp<f64>,
    /// Pass an event anyway after this long without one (optional).
    pub max_silence: Option<DurationText>,
    /// Most keys with state (a bound on its size). Events of new keys
    /// beyond it go to the dead-letter output. Default: no bound.
    pub max_keys: Option<usize>,
}

/// `alert: { name: overheat, when: temperature > 80, for: 30s, clear: temperature < 75 }`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The alert's name, in each record it emits.
    pub name: Sp<String>,
    /// The condition that raises it.
    pub when: Sp<Scalar>,
    /// How long `when` must hold first (default 0s).
    #[serde(rename = "for")]
    pub for_: Option<DurationText>,
    /// The condition that clears it (default `!(when)`).
    pub clear: Option<Sp<Scalar>>,
    /// Most keys with state (a bound on its size). Events of new keys
    /// beyond it go to the dead-letter output. Default: no bound.
    pub max_keys: Option<usize>,
}

/// A window: exactly one of `tumbling`, `sliding`, `session`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Fixed, non-overlapping windows of this size, aligned to the epoch.
    pub tumbling: Option<DurationText>,
    /// Overlapping windows of `size`, one starting every `slide`.
    pub sliding: Option<SlidingConfig>,
    /// Windows of activity separated by at least `gap` of silence.
    pub session: Option<SessionConfig>,
    /// How long after a window fires late events still update it (default 0ms).
    pub allowed_lateness: Option<DurationText>,
    /// Most keys with open windows (a bound on state size). Events of new
    /// keys beyond it go to the dead-letter output. Default: no bound.
    pub max_keys: Option<usize>,
    /// Result fields: `name: count() | count(e) | sum(e) | avg(e) | min(e) | max(e) |
    /// first(e) | last(e) | variance(e) | variance_pop(e) | stddev(e) | stddev_pop(e) |
    /// median(e) | percentile(e, p) | count_distinct(e)`.
    pub aggregate: Option<IndexMap<Sp<String>, Sp<Scalar>>>,
}

#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlidingConfig {
    pub size: DurationText,
    pub slide: DurationText,
}

#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub gap: DurationText,
}

/// An output: exactly one of `file`, `stdout`, `mqtt`.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
pub enum SinkConfig {
    /// JSON Lines appended to a file; `-` is standard output.
    File(FileSinkConfig),
    /// JSON Lines on standard output.
    Stdout(StdoutSinkConfig),
    /// Publish each result to an MQTT broker.
    Mqtt(MqttSinkConfig),
}

#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub path: Sp<String>,
}

#[derive(Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

with_connection! {
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Broker URL, `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: Sp<String>,
    /// Topic template; `{field}` is replaced by the record's field.
    pub topic: Sp<String>,
    /// Quality of service: 0 or 1 (default 0).
    pub qos: Option<Sp<u8>>,
    /// Publish with the retain flag: `true`, `false` (the default), or
    /// `keep` (a pass-through event keeps the flag it came with).
    pub retain: Option<Sp<RetainConfig>>,
    /// Store-and-forward while the broker is unreachable.
    pub buffer: Option<BufferConfig>,
    /// Announce the results to Home Assistant (MQTT discovery).
    pub home_assistant: Option<HomeAssistantConfig>,
}
}

/// A sink's `home_assistant:` block.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Home Assistant's discovery prefix (default `homeassistant`).
    pub discovery_prefix: Option<Sp<String>>,
    /// The device's name; `{field}` from each result (default: its topic).
    pub name: Option<Sp<String>>,
    /// The result fields to announce, each a sensor.
    pub fields: IndexMap<Sp<String>, HomeAssistantField>,
}

/// One announced field.
#[derive(Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantField {
    /// The entity's name (default: the field's).
    pub name: Option<String>,
    /// Unit of measurement, e.g. `°C`.
    pub unit: Option<String>,
    /// A Home Assistant sensor device class, e.g. `temperature`.
    pub device_class: Option<Sp<String>>,
    /// `measurement`, `total` or `total_increasing` (long-term statistics).
    pub state_class: Option<Sp<String>>,
    /// An icon, e.g. `mdi:thermometer`.
    pub icon: Option<String>,
}

/// The outbox of an MQTT sink.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Messages kept in memory (default 10000).
    pub memory: Option<usize>,
    /// Messages kept on disk once memory is full (default 1000000; needs a directory).
    pub disk: Option<usize>,
    /// Directory of the disk buffer (default: `<state.dir>/outbox` when `state` is set).
    pub dir: Option<Sp<String>>,
    /// `block` (default) stops the pipeline while full; `drop_oldest` drops and counts.
    pub when_full: Option<Sp<String>>,
    /// How long a clean shutdown waits to deliver what is buffered (default 10s).
    pub drain_timeout: Option<DurationText>,
}

/// Peer mode: several devices running this pipeline share its key groups.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// Peers with the same cluster name and pipeline form one cluster
    /// (letters, digits, `-`, `_`, `.`).
    pub cluster: Sp<String>,
    /// This peer's id, unique in the cluster (default: the host name).
    pub id: Option<Sp<String>>,
    /// Where other peers connect (default `0.0.0.0:7450`).
    pub listen: Option<Sp<String>>,
    /// What other peers dial, `host:port` (default: the host name and the
    /// listen port).
    pub advertise: Option<Sp<String>>,
    /// Keep-alive of the membership connection to the broker: a vanished
    /// peer is noticed within 1.5–2.5 times it (default 5s, at least 1s).
    pub keep_alive: Option<DurationText>,
    /// How long the others wait for a peer that went away (a crash, a
    /// reboot, a stop) before going on without it: until then event time
    /// does not pass the last global checkpoint, so its input since then is
    /// not late when it comes back (default 30s).
    pub failure_timeout: Option<DurationText>,
    /// Mutual TLS between peers: the cluster's CA, this peer's certificate
    /// and key (PEM files).
    pub tls: Option<PeersTlsConfig>,
}

/// Mutual TLS between peers.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeersTlsConfig {
    pub ca_file: Sp<String>,
    pub cert_file: Sp<String>,
    pub key_file: Sp<String>,
}

/// Where keyed state and checkpoints are kept.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the state files.
    pub dir: Sp<String>,
    /// How often state is checkpointed (default 10s).
    pub checkpoint_interval: Option<DurationText>,
}

/// One field name or a list of them (`key_by: sensor_id`, `key_by: [site, id]`).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldList(pub Vec<String>);

impl<'de> Deserialize<'de> for FieldList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name or a list of field names")
            }
            fn visit_str<E>(self, v: &str) -> Result<FieldList, E> {
                Ok(FieldList(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FieldList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(FieldList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// The connection settings of an MQTT source or sink.
#[derive(Clone, Default)]
pub struct ConnectionConfig {
    pub version: Option<Sp<u8>>,
    pub client_id: Option<String>,
    pub clean_session: Option<bool>,
    pub keep_alive: Option<DurationText>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_env: Option<Sp<String>>,
    pub password_file: Option<Sp<String>>,
    pub ca_file: Option<Sp<String>>,
    pub client_cert: Option<Sp<String>>,
    pub client_key: Option<Sp<String>>,
}
