//! From a checked file to a runnable pipeline: sources, steps and sinks
//! built with their options; the JSON Schema of the file.

#[allow(unused_imports)]
use super::*;

/// Parses a byte size: `4096`, `64KiB`, `1MiB`, `1MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "bad size `{s}`: expected bytes, or a number with B, KiB, MiB, KB or MB"
            ))
        }
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad size `{s}`: expected a positive number of bytes, like `64KiB`"))
}

/// Run-time choices that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub workers: Option<usize>,
}

impl ValidPipeline {
    /// Opens the source and sinks and builds the dataflow.
    pub fn build(&self, file: &str, overrides: &Overrides) -> Result<PipelineBuilder, ConfigError> {
        let err = |message: String| ConfigError::Build {
            file: file.to_string(),
            message,
        };
        let mut b = Pipeline::builder(&self.name).max_payload(self.max_payload);
        if self.union.len() > 1 {
            // Each MQTT source of a union journals in its own directory.
            let mut parts = Vec::new();
            for u in &self.union {
                let journal = self
                    .state_dir
                    .as_ref()
                    .map(|d| std::path::Path::new(d).join("sources").join(&u.name));
                parts.push(crate::plan::UnionPart {
                    name: u.name.clone(),
                    source: self.open_source(&u.source, journal, &u.name, err)?,
                    time: u.time.clone(),
                    max_payload: u.max_payload,
                });
            }
            b = b.union(parts);
        } else {
            let journal = self.state_dir.as_ref().map(std::path::PathBuf::from);
            b = b.boxed_source(self.open_source(&self.source, journal, "in", err)?);
            b = match &self.time {
                TimeSpec::None => b,
                TimeSpec::Processing => b.processing_time(),
                TimeSpec::Ingestion => b.ingestion_time(),
                TimeSpec::Event {
                    field,
                    max_out_of_orderness,
                    idle_timeout,
                    stamps,
                } => {
                    let b = b
                        .event_time(field, Duration::from_millis(*max_out_of_orderness as u64))
                        .timestamps(stamps.clone());
                    match idle_timeout {
                        Some(ms) => b.idle_timeout(Duration::from_millis(*ms as u64)),
                        None => b,
                    }
                }
            };
        }
        b = add_steps(b, &self.steps);
        // A field holding the whole incoming topic keeps its levels in sink topics.
        let topic_field = match &self.source {
            SourceSpec::Mqtt(m) => m.topic_field.as_deref(),
            _ => None,
        };
        let open = |s: &SinkSpec, role: &str, i: usize| -> Result<Box<dyn Sink>, ConfigError> {
            match s {
                SinkSpec::File { path } => Ok(Box::new(
                    FileSink::open(path).map_err(|e| err(e.to_string()))?,
                )),
                SinkSpec::Stdout => Ok(Box::new(FileSink::stdout())),
                SinkSpec::Mqtt(m) => {
                    let name = format!("{role}-{i}");
                    let dir = m.dir.clone().map(std::path::PathBuf::from).or_else(|| {
                        self.state_dir
                            .as_ref()
                            .map(|d| std::path::Path::new(d).join("outbox"))
                    });
                    let sink = MqttSink::start(MqttSinkOptions {
                        endpoint: endpoint(&m.conn, &self.client_prefix(), &name, 1 << 28, true)
                            .map_err(err)?,
                        topic: m.topic.clone().with_whole_topic(topic_field),
                        qos: m.qos,
                        retain: m.retain,
                        keep_retain: m.keep_retain,
                        // Availability is the status topic, when Home
                        // Assistant can see it (the same broker).
                        home_assistant: m.home_assistant.clone().map(|mut d| {
                            d.pipeline = self.name.clone();
                            d.availability = self
                                .status
                                .as_ref()
                                .filter(|s| {
                                    s.conn.host == m.conn.host && s.conn.port == m.conn.port
                                })
                                .map(|s| s.topic.clone());
                            d
                        }),
                        buffer: BufferOptions {
                            memory: m.memory,
                            disk: dir.map(|d| (d, m.disk)),
                            when_full: m.when_full,
                            drain_timeout: Duration::from_millis(m.drain_timeout_ms as u64),
                        },
                        name,
                    })
                    .map_err(|e| err(e.to_string()))?;
                    Ok(Box::new(sink))
                }
            }
        };
        for (i, s) in self.sinks.iter().enumerate() {
            b = b.boxed_sink(open(s, "sink", i)?);
        }
        if let Some(g) = &self.graph {
            b = b.stream_name(&g.head);
            for st in &g.streams {
                let mut sb = add_steps(Pipeline::builder(&st.name), &st.steps);
                for (i, s) in st.sinks.iter().enumerate() {
                    sb = sb.boxed_sink(open(s, &format!("{}-sink", st.name), i)?);
                }
                let from: Vec<&str> = st.from.iter().map(String::as_str).collect();
                b = match st.reads_sources {
                    true => b.source_stream(&st.name, sb),
                    false => b.stream(&st.name, &from, sb),
                };
            }
        }
        for (i, s) in self.late.iter().enumerate() {
            b = b.late(open(s, "late", i)?);
        }
        for (i, s) in self.dead_letter.iter().enumerate() {
            b = b.dead_letter(open(s, "dead_letter", i)?);
        }
        b = b.format(self.format);
        if let Some(dir) = &self.state_dir {
            let every = self.checkpoint_interval.unwrap_or(10_000);
            b = b.state(dir, Duration::from_millis(every as u64));
        }
        if let Some(w) = overrides.workers.or(self.workers) {
            b = b.workers(w);
        }
        if self.peers.is_some() {
            // A peer runs one worker of each stage: the links carry one
            // stream per peer (more devices, not more threads, scale it).
            b = b.workers(1);
        }
        Ok(b)
    }

    /// Opens one source; an MQTT source journals in `journal` (when
    /// there is state) and names its client `client`.
    fn open_source(
        &self,
        source: &SourceSpec,
        journal: Option<std::path::PathBuf>,
        client: &str,
        err: impl Fn(String) -> ConfigError,
    ) -> Result<Box<dyn crate::sources::Source>, ConfigError> {
        Ok(match source {
            SourceSpec::File { path } => {
                Box::new(FileSource::open(path).map_err(|e| err(e.to_string()))?)
            }
            SourceSpec::Generator(g) => Box::new(Generator::new(GeneratorOptions {
                sensors: g.sensors,
                rate: g.rate,
                disorder_ms: g.disorder_ms,
                seed: g.seed,
                count: g.count,
                start_ms: g
                    .start_ms
                    .unwrap_or_else(|| crate::time::Clock::now_ms(&crate::time::SystemClock)),
            })),
            SourceSpec::Mqtt(m) => Box::new(
                MqttSource::start(MqttSourceOptions {
                    // With state, input is journaled and the broker keeps
                    // a session for us while we are away.
                    endpoint: endpoint(
                        &m.conn,
                        &self.client_prefix(),
                        client,
                        self.max_payload,
                        self.state_dir.is_none(),
                    )
                    .map_err(&err)?,
                    patterns: m.topics.clone(),
                    qos: m.qos,
                    topic_field: m.topic_field.clone(),
                    journal_dir: journal,
                    stamp_arrivals: self.time == TimeSpec::Ingestion,
                    // The first stream's sinks, and a job graph's tees,
                    // may keep each message's retain flag.
                    retain_as_published: self
                        .sinks
                        .iter()
                        .chain(self.graph.iter().flat_map(|g| {
                            g.streams
                                .iter()
                                .filter(|s| s.reads_sources)
                                .flat_map(|s| &s.sinks)
                        }))
                        .any(|s| matches!(s, SinkSpec::Mqtt(m) if m.keep_retain)),
                    // Peers share the input: each gets a part of it.
                    share_group: self
                        .peers
                        .as_ref()
                        .map(|p| format!("rivulet-{}", p.cluster)),
                })
                .map_err(|e| err(e.to_string()))?,
            ),
        })
    }

    /// What default MQTT client ids start with: the pipeline's name, and in
    /// peer mode the peer's id (several peers may share a host).
    fn client_prefix(&self) -> String {
        match &self.peers {
            Some(p) => format!("{}-{}", self.name, p.id),
            None => self.name.clone(),
        }
    }
}

/// The client's endpoint: the checked settings, the password read from
/// where it is kept, and a default client id.
/// Adds checked steps to a builder.
fn add_steps(mut b: PipelineBuilder, steps: &[StepSpec]) -> PipelineBuilder {
    for s in steps {
        b = match s {
            StepSpec::Map(a) => b.map(a.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            StepSpec::Filter(f) => b.filter(f),
            StepSpec::KeyBy(k) => b.key_by(k),
            StepSpec::Window(w) => b.window(w.clone()),
            StepSpec::Stateful(st, max_keys) => b.stateful_limited(st.clone(), *max_keys),
        };
    }
    b
}

pub(super) fn endpoint(
    c: &ConnSpec,
    pipeline: &str,
    role: &str,
    max_payload: usize,
    default_clean: bool,
) -> Result<Endpoint, String> {
    let password = match &c.password {
        PasswordSpec::None => None,
        PasswordSpec::Inline(p) => Some(p.clone()),
        PasswordSpec::Env(var) => Some(std::env::var(var).map_err(|_| {
            format!(
                "{}: the environment variable `{var}` (password_env) is not set",
                c.url
            )
        })?),
        PasswordSpec::File(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("{}: cannot read password_file {f}: {e}", c.url))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
    };
    let client_id = c.client_id.clone().unwrap_or_else(|| {
        let host = crate::util::host_name().unwrap_or_else(|| {
                if !default_clean && c.clean_session != Some(true) {
                    tracing::warn!(
                        broker = %c.url,
                        "no host name to build a stable MQTT client id from: the broker cannot find this client's session after a restart; set `client_id`"
                    );
                }
                format!("{:08x}", fastrand::u32(..))
            });
        format!("rivulet-{pipeline}-{host}-{role}")
    });
    Ok(Endpoint {
        url: c.url.clone(),
        host: c.host.clone(),
        port: c.port,
        tls: c.tls,
        version: c.version,
        client_id,
        clean_session: c.clean_session.unwrap_or(default_clean),
        keep_alive: Duration::from_millis(c.keep_alive_ms as u64),
        username: c.username.clone(),
        password,
        ca_file: c.ca_file.clone(),
        client_cert: c.client_cert.clone(),
        // Room for the payload and the packet's own headers.
        max_packet: max_payload.saturating_add(64 << 10),
        last_will: None,
    })
}

/// The JSON Schema of pipeline files.
impl ValidPipeline {
    /// Starts the status topic (when there is one): `online` now, `offline`
    /// when stopped with [`crate::mqtt::status::Status::stop`] or when the
    /// process vanishes.
    pub fn start_status(&self) -> Result<Option<crate::mqtt::status::Status>, String> {
        let Some(s) = &self.status else {
            return Ok(None);
        };
        let mut ep = endpoint(&s.conn, &self.client_prefix(), "status", 4096, true)?;
        // A client id set for the source or sink is theirs: the broker
        // would drop one of two connections with the same id.
        if let Some(id) = &s.conn.client_id {
            ep.client_id = format!("{id}-status");
        }
        crate::mqtt::status::Status::start(ep, &s.topic).map(Some)
    }

    /// The broker of the MQTT source (peer mode's membership goes through
    /// it), with this pipeline's credentials and TLS.
    pub fn source_broker(&self) -> Result<Endpoint, String> {
        match &self.source {
            SourceSpec::Mqtt(m) => endpoint(
                &m.conn,
                &self.client_prefix(),
                "peers",
                self.max_payload,
                true,
            ),
            _ => Err("the source is not `mqtt`".into()),
        }
    }
}

pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PipelineFile)).unwrap_or_default()
}
