//! MQTT connections: options, TLS, the two protocol versions, and the
//! connection thread shared by the source and the sink.
//!
//! rumqttc drives a connection from a blocking iterator with its own tokio
//! runtime; each connection gets one thread running [`drive`], which turns
//! rumqttc's events into [`Ev`]s for a handler, reconnects forever with
//! exponential backoff and jitter, and logs each change of state once.
//! Errors that retrying cannot fix (a rejected certificate, refused
//! credentials) before the first successful connection are *fatal*: the
//! pipeline stops with a message naming the broker and the reason.

pub(crate) mod direct;
pub mod status;
pub mod topic;

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How to reach and log in to a broker.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// As written: `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub version: u8,
    pub client_id: String,
    pub clean_session: bool,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CAs to trust; the system's roots when `None`.
    pub ca_file: Option<String>,
    /// PEM files of a client certificate and its key (mutual TLS).
    pub client_cert: Option<(String, String)>,
    /// Largest packet accepted or sent.
    pub max_packet: usize,
    /// Published by the broker when the connection drops without a
    /// DISCONNECT (peer-mode presence).
    pub last_will: Option<LastWill>,
}

/// A message the broker publishes for a client that vanished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

impl Endpoint {
    /// Parses `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883);
    /// `tcp://` and `ssl://` are accepted as synonyms.
    pub fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
        let (tls, rest) = if let Some(r) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (true, r)
        } else if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (false, r)
        } else {
            return Err(format!(
                "bad broker URL `{url}`: expected `mqtt://host:port` or `mqtts://host:port`"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        // `[v6 address]:port`, or `host:port`, or `host`.
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let Some((h, after)) = r.split_once(']') else {
                return Err(format!("bad host in broker URL `{url}`"));
            };
            match after.strip_prefix(':') {
                Some(p) => (
                    h,
                    p.parse::<u16>()
                        .map_err(|_| format!("bad port in broker URL `{url}`"))?,
                ),
                None if after.is_empty() => (h, default_port),
                None => return Err(format!("bad host in broker URL `{url}`")),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse::<u16>()
                        .map_err(|_| format!("bad port in broker URL `{url}`"))?,
                ),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains('/') || (host.contains(':') && !rest.starts_with('[')) {
            return Err(format!("bad host in broker URL `{url}`"));
        }
        Ok((host.to_string(), port, tls))
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, String> {
        let roots = match &self.ca_file {
            Some(path) => crate::util::pem::roots(path, "ca_file")?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err("no system CA certificates found; set `ca_file`".into());
                }
                roots
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some((cert_path, key_path)) => {
                let certs = crate::util::pem::certs(cert_path, "client_cert")?;
                let key = crate::util::pem::key(key_path, "client_key")?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("client certificate {cert_path}: {e}"))
            }
        }
    }

    /// Opens a connection for a subscriber that never publishes: read in
    /// batches without an event loop (see [`direct`]). With `manual_acks`
    /// incoming QoS 1 messages are acknowledged only through
    /// [`Client::try_ack`].
    pub fn subscriber(&self, manual_acks: bool) -> Result<(Client, Connection), String> {
        let (conn, handle) = direct::Conn::new(self, manual_acks)?;
        Ok((Client::Direct(handle), Connection::Direct(Box::new(conn))))
    }

    /// Opens a connection for a publisher, which steps it on a thread of
    /// its own and may write through it from others
    /// ([`direct::Conn::write_some`], [`direct::Conn::park`]).
    pub(crate) fn publisher(&self) -> Result<(Client, direct::Conn), String> {
        let (conn, handle) = direct::Conn::new(self, false)?;
        Ok((Client::Direct(handle), conn))
    }

    /// Opens a client; the connection starts once [`drive`] iterates it.
    pub fn connect(&self, request_capacity: usize) -> Result<(Client, Connection), String> {
        self.connect_with(request_capacity, false)
    }

    /// Like [`Endpoint::connect`]; with `manual_acks` incoming QoS 1
    /// messages are acknowledged only through [`Client::try_ack`].
    pub fn connect_with(
        &self,
        request_capacity: usize,
        manual_acks: bool,
    ) -> Result<(Client, Connection), String> {
        // MQTT counts keep-alive in whole seconds (and rumqttc refuses
        // less than one): round up.
        let keep_alive = match self.keep_alive {
            d if d.is_zero() => d,
            d => Duration::from_secs(d.as_secs_f64().ceil().max(1.0) as u64),
        };
        let tls = if self.tls {
            Some(rumqttc::TlsConfiguration::Rustls(Arc::new(
                self.rustls_config()?,
            )))
        } else {
            None
        };
        if self.version == 5 {
            // rumqttc's MQTT 5 client takes no keep-alive below 5 s (it
            // would panic): a shorter one is raised to 5 s.
            let keep_alive = if !keep_alive.is_zero() && keep_alive < Duration::from_secs(5) {
                tracing::debug!(broker = %self.url, ?keep_alive, "MQTT 5: keep-alive raised to 5s");
                Duration::from_secs(5)
            } else {
                keep_alive
            };
            let mut o = rumqttc::v5::MqttOptions::new(&self.client_id, &self.host, self.port);
            o.set_keep_alive(keep_alive)
                .set_clean_start(self.clean_session)
                .set_max_packet_size(Some(self.max_packet as u32))
                .set_manual_acks(manual_acks);
            if !self.clean_session {
                // A persistent session must outlive the connection (MQTT 5
                // ends it at disconnect unless told otherwise).
                o.set_session_expiry_interval(Some(u32::MAX));
            }
            if let (Some(u), p) = (&self.username, &self.password) {
                o.set_credentials(u, p.clone().unwrap_or_default());
            }
            if let Some(t) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(t));
            }
            if let Some(w) = &self.last_will {
                o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    &w.topic,
                    w.payload.clone(),
                    qos5(w.qos),
                    w.retain,
                    None,
                ));
            }
            o.set_network_options(nodelay());
            let (c, conn) = rumqttc::v5::Client::new(o, request_capacity);
            Ok((Client::V5(c), Connection::V5(conn)))
        } else {
            let mut o = rumqttc::MqttOptions::new(&self.client_id, &self.host, self.port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(self.clean_session)
                .set_max_packet_size(self.max_packet, self.max_packet)
                .set_manual_acks(manual_acks);
            if let (Some(u), p) = (&self.username, &self.password) {
                o.set_credentials(u, p.clone().unwrap_or_default());
            }
            if let Some(t) = tls {
                o.set_transport(rumqttc::Transport::tls_with_config(t));
            }
            if let Some(w) = &self.last_will {
                o.set_last_will(rumqttc::LastWill::new(
                    &w.topic,
                    w.payload.clone(),
                    qos4(w.qos),
                    w.retain,
                ));
            }
            let (c, mut conn) = rumqttc::Client::new(o, request_capacity);
            conn.eventloop.set_network_options(nodelay());
            Ok((Client::V4(c), Connection::V4(conn)))
        }
    }
}

/// TCP without Nagle's delay: small MQTT packets would otherwise wait for
/// the peer's delayed ACK (tens of milliseconds).
fn nodelay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// Quality of service we use: 0 or 1.
fn qos4(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// The request side of a connection.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::Client),
    V5(rumqttc::v5::Client),
    /// A subscriber's connection ([`Endpoint::subscriber`]).
    Direct(direct::Handle),
}

/// What a subscriber's connection answers to a publish.
const SUBSCRIBER_ONLY: &str = "this MQTT connection only subscribes";

impl Client {
    /// Queues an UNSUBSCRIBE, waiting for room (never from the
    /// connection's own thread).
    pub fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c.unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V5(c) => c.unsubscribe(filter).map_err(|e| e.to_string()),
            Client::Direct(h) => {
                h.unsubscribe(filter);
                Ok(())
            }
        }
    }
    pub fn subscribe(&self, filter: &str, qos: u8) -> Result<(), String> {
        self.subscribe_with(filter, qos, false)
    }
    /// Subscribes; with `retain_as_published` (MQTT 5 only) messages keep
    /// the retain flag they were published with.
    pub fn subscribe_with(
        &self,
        filter: &str,
        qos: u8,
        retain_as_published: bool,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c.subscribe(filter, qos4(qos)).map_err(|e| e.to_string()),
            Client::V5(c) => {
                let mut f = rumqttc::v5::mqttbytes::v5::Filter::new(filter, qos5(qos));
                f.preserve_retain = retain_as_published;
                c.subscribe_many([f]).map_err(|e| e.to_string())
            }
            Client::Direct(h) => {
                h.subscribe(filter, qos, retain_as_published);
                Ok(())
            }
        }
    }
    /// Queues a publish, waiting for room in the client's request queue
    /// (never call it from the connection's own thread).
    pub fn publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .publish(topic, qos4(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .publish(topic, qos5(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Client::Direct(_) => Err(SUBSCRIBER_ONLY.into()),
        }
    }
    /// Queues a publish without waiting; `false` when the client's request
    /// queue is full.
    pub fn try_publish(&self, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Client::V4(c) => c.try_publish(topic, qos4(qos), retain, payload).is_ok(),
            Client::V5(c) => c.try_publish(topic, qos5(qos), retain, payload).is_ok(),
            Client::Direct(_) => false,
        }
    }
    /// Queues the PUBACK of an incoming QoS 1 message (with manual acks)
    /// without waiting; `false` when the request queue is full.
    pub fn try_ack(&self, pkid: u16) -> bool {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::Direct(h) => {
                h.ack(pkid);
                true
            }
        }
    }
    /// Wakes a sleeping subscriber's or publisher's connection.
    pub fn wake(&self) {
        if let Client::Direct(h) = self {
            h.wake();
        }
    }

    pub fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().map_err(|e| e.to_string()),
            Client::Direct(h) => {
                h.disconnect();
                Ok(())
            }
        };
    }
}

#[allow(clippy::large_enum_variant)] // one per connection, never moved after start
pub enum Connection {
    V4(rumqttc::Connection),
    V5(rumqttc::v5::Connection),
    Direct(Box<direct::Conn>),
}

/// What the connection thread reports to its handler.
pub enum Ev {
    Connected {
        session_present: bool,
    },
    Message {
        topic: String,
        /// The payload, or its first bytes when `size` is larger (a
        /// message larger than the connection takes).
        payload: Bytes,
        /// The payload's size.
        size: usize,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Set by the broker on a redelivery.
        dup: bool,
        /// A retained message (sent because of a subscription, not a
        /// publish now).
        retain: bool,
    },
    /// Nothing happened for the `tick` given to [`drive`].
    Tick,
    /// The broker acknowledged the QoS 1 publish with this packet id.
    PubAck(u16),
    /// A publish (packet id; 0 for QoS 0) was written to the network.
    Sent(u16),
    /// A PUBACK for an incoming message was written to the network (for a
    /// subscriber's connection: and processed by the broker, as a PINGRESP
    /// sent after it says).
    AckSent(u16),
    /// The connection dropped; the reason, and whether retrying cannot help.
    Disconnected {
        reason: String,
        permanent: bool,
    },
}

/// Outcome of waiting for one event.
pub(crate) enum Step {
    Ev(Ev),
    /// Nothing happened within the wait.
    Nothing,
    /// Something happened that no handler needs (pings, SUBACKs).
    Other,
    Closed,
}

fn refusal4(code: rumqttc::ConnectReturnCode) -> (String, bool) {
    use rumqttc::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword => ("the broker refused the user name or password".into(), true),
        C::NotAuthorized => ("the broker refused: not authorized".into(), true),
        C::BadClientId => ("the broker refused the client id".into(), true),
        C::RefusedProtocolVersion => (
            "the broker refused MQTT 3.1.1 (try `version: 5`)".into(),
            true,
        ),
        other => (
            format!("the broker refused the connection ({other:?})"),
            false,
        ),
    }
}

fn refusal5(code: rumqttc::v5::mqttbytes::v5::ConnectReturnCode) -> (String, bool) {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    match code {
        C::BadUserNamePassword | C::BadAuthenticationMethod => {
            ("the broker refused the user name or password".into(), true)
        }
        C::NotAuthorized | C::Banned => (format!("the broker refused: {code:?}"), true),
        C::UnsupportedProtocolVersion | C::RefusedProtocolVersion => {
            ("the broker refused MQTT 5 (try `version: 3`)".into(), true)
        }
        C::ClientIdentifierNotValid | C::BadClientId => {
            ("the broker refused the client id".into(), true)
        }
        other => (
            format!("the broker refused the connection ({other:?})"),
            false,
        ),
    }
}

/// Describes an I/O error, finding a TLS reason inside it when there is one.
fn io_reason(e: &std::io::Error) -> (String, bool) {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return (
            tls_reason(tls),
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_)
            ),
        );
    }
    (e.to_string(), false)
}

fn tls_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!(
            "TLS: the broker's certificate was rejected ({c:?}); check `ca_file` and the host name"
        ),
        rustls::Error::AlertReceived(a) => {
            format!("TLS: the broker rejected us ({a:?}); check the client certificate")
        }
        other => format!("TLS: {other}"),
    }
}

fn conn_error4(e: &rumqttc::ConnectionError) -> (String, bool) {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => refusal4(*code),
        E::Io(io) => io_reason(io),
        E::Tls(rumqttc::TlsError::TLS(t)) => (tls_reason(t), true),
        E::Tls(rumqttc::TlsError::Io(io)) => io_reason(io),
        E::Tls(other) => (format!("TLS: {other}"), true),
        other => (other.to_string(), false),
    }
}

fn conn_error5(e: &rumqttc::v5::ConnectionError) -> (String, bool) {
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => refusal5(*code),
        E::Io(io) => io_reason(io),
        E::Tls(rumqttc::TlsError::TLS(t)) => (tls_reason(t), true),
        E::Tls(rumqttc::TlsError::Io(io)) => io_reason(io),
        E::Tls(other) => (format!("TLS: {other}"), true),
        other => (other.to_string(), false),
    }
}

/// One wait on a connection of either protocol version: `$m` is the
/// rumqttc module (`rumqttc` or `rumqttc::v5`), `$packet` its packet module,
/// `$code` its CONNACK return code type, `$topic` turns a publish's topic
/// into a `String`, `$refusal` and `$error` describe failures.
macro_rules! step_on {
    ($c:expr, $wait:expr, $m:path, $packet:path, $code:path, $topic:expr, $refusal:expr, $error:expr) => {{
        use $code as code;
        use $m as m;
        use $packet as packet;
        // A zero wait polls once (a timer would round it up to the
        // runtime's millisecond); `Err(true)`: the client side is gone.
        let got = if $wait.is_zero() {
            $c.try_recv()
                .map_err(|e| matches!(e, m::TryRecvError::Disconnected))
        } else {
            $c.recv_timeout($wait)
                .map_err(|e| matches!(e, m::RecvTimeoutError::Disconnected))
        };
        match got {
            Err(false) => Step::Nothing,
            Err(true) => Step::Closed,
            Ok(Ok(ev)) => match ev {
                m::Event::Incoming(packet::Packet::ConnAck(a)) => {
                    if a.code == code::Success {
                        Step::Ev(Ev::Connected {
                            session_present: a.session_present,
                        })
                    } else {
                        let (reason, permanent) = $refusal(a.code);
                        Step::Ev(Ev::Disconnected { reason, permanent })
                    }
                }
                m::Event::Incoming(packet::Packet::Publish(p)) => Step::Ev(Ev::Message {
                    topic: $topic(p.topic),
                    size: p.payload.len(),
                    payload: p.payload,
                    pkid: p.pkid,
                    dup: p.dup,
                    retain: p.retain,
                }),
                m::Event::Incoming(packet::Packet::PubAck(a)) => Step::Ev(Ev::PubAck(a.pkid)),
                m::Event::Outgoing(rumqttc::Outgoing::Publish(id)) => Step::Ev(Ev::Sent(id)),
                m::Event::Outgoing(rumqttc::Outgoing::PubAck(id)) => Step::Ev(Ev::AckSent(id)),
                _ => Step::Other,
            },
            Ok(Err(e)) => {
                let (reason, permanent) = $error(&e);
                Step::Ev(Ev::Disconnected { reason, permanent })
            }
        }
    }};
}

impl Connection {
    /// Ends a subscriber's connection cleanly, now (the others end when
    /// their client disconnects).
    pub(crate) fn close(&mut self) {
        if let Connection::Direct(c) = self {
            c.close();
        }
    }

    pub(crate) fn step(&mut self, wait: Duration) -> Step {
        match self {
            Connection::V4(c) => step_on!(
                c,
                wait,
                rumqttc,
                rumqttc,
                rumqttc::ConnectReturnCode,
                |t: String| t,
                refusal4,
                conn_error4
            ),
            Connection::V5(c) => step_on!(
                c,
                wait,
                rumqttc::v5,
                rumqttc::v5::mqttbytes::v5,
                rumqttc::v5::mqttbytes::v5::ConnectReturnCode,
                |t: bytes::Bytes| String::from_utf8_lossy(&t).into_owned(),
                refusal5,
                conn_error5
            ),
            Connection::Direct(c) => c.step(wait),
        }
    }
}

/// The state of one MQTT connection of this process, for metrics and the
/// live page.
#[derive(Debug)]
pub struct ConnState {
    /// `host:port` of the broker.
    pub broker: String,
    /// `source`, `sink`, `status` or `membership`.
    pub role: &'static str,
    pub connected: AtomicBool,
    /// Connections lost and made again.
    pub reconnects: std::sync::atomic::AtomicU64,
    /// When the state last changed (ms since 1970).
    pub since_ms: std::sync::atomic::AtomicI64,
}

/// Every connection being driven now (one process runs one pipeline).
static CONNECTIONS: std::sync::Mutex<Vec<Arc<ConnState>>> = std::sync::Mutex::new(Vec::new());

/// The connections being driven now.
pub fn connections() -> Vec<Arc<ConnState>> {
    CONNECTIONS
        .lock()
        .map(|c| c.clone())
        .unwrap_or_else(|e| e.into_inner().clone())
}

/// Takes a connection off the list when its loop ends.
struct Listed(Arc<ConnState>);

impl Listed {
    fn new(url: &str, role: &'static str) -> Self {
        let broker = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .trim_end_matches('/')
            .to_string();
        let st = Arc::new(ConnState {
            broker,
            role,
            connected: AtomicBool::new(false),
            reconnects: Default::default(),
            since_ms: std::sync::atomic::AtomicI64::new(now_ms()),
        });
        let mut all = CONNECTIONS.lock().unwrap_or_else(|e| e.into_inner());
        all.push(st.clone());
        Listed(st)
    }

    fn set(&self, up: bool) {
        if self.0.connected.swap(up, Ordering::Relaxed) != up {
            self.0.since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut all = CONNECTIONS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|c| !Arc::ptr_eq(c, &self.0));
    }
}

fn now_ms() -> i64 {
    use crate::time::Clock;
    crate::time::SystemClock.now_ms()
}

/// What a connection's driver remembers between events: whether it is
/// connected, the backoff before the next attempt, the last error logged.
/// It logs each change of state once and keeps the connection's line in
/// [`connections`].
pub(crate) struct Supervisor {
    url: String,
    role: &'static str,
    listed: Listed,
    backoff: Duration,
    connected: bool,
    ever: bool,
    last_error: Option<String>,
    rng: fastrand::Rng,
}

impl Supervisor {
    pub(crate) fn new(url: &str, role: &'static str) -> Supervisor {
        Supervisor {
            url: url.to_string(),
            role,
            listed: Listed::new(url, role),
            backoff: Duration::from_millis(100),
            connected: false,
            ever: false,
            last_error: None,
            rng: fastrand::Rng::new(),
        }
    }

    /// The connection is up.
    pub(crate) fn connected(&mut self) {
        tracing::info!(broker = %self.url, role = self.role, "MQTT connected");
        if self.ever {
            self.listed.0.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.ever = true;
        self.listed.set(true);
        self.connected = true;
        self.last_error = None;
        self.backoff = Duration::from_millis(100);
    }

    /// The connection is down (or could not be made): how long to wait
    /// before the next attempt (0.1 s doubling to 30 s, with ±25 %
    /// jitter).
    pub(crate) fn lost(&mut self, reason: &str) -> Duration {
        if self.connected {
            tracing::warn!(broker = %self.url, role = self.role, %reason, "MQTT connection lost; reconnecting");
        } else if self.last_error.as_deref() != Some(reason) {
            tracing::warn!(broker = %self.url, role = self.role, %reason, "cannot connect to the MQTT broker; retrying");
        }
        self.last_error = Some(reason.to_string());
        self.connected = false;
        self.listed.set(false);
        let pause = self.backoff.mul_f64(0.75 + self.rng.f64() * 0.5);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        pause
    }
}

/// Runs a connection until `stop` is set or the client side is dropped:
/// hands every event to `on_event`, reconnects with exponential backoff
/// (see [`Supervisor::lost`]) and logs each change of state once. When
/// nothing happens for `tick()` (asked before each wait), `on_event` gets
/// [`Ev::Tick`]. `on_event` returns `false` to end the loop.
pub fn drive(
    mut conn: Connection,
    url: &str,
    role: &'static str,
    stop: Arc<AtomicBool>,
    tick: impl Fn() -> Duration,
    mut on_event: impl FnMut(Ev) -> bool,
) {
    let mut sup = Supervisor::new(url, role);
    while !stop.load(Ordering::Relaxed) {
        match conn.step(tick()) {
            Step::Nothing => {
                if !on_event(Ev::Tick) {
                    return;
                }
            }
            Step::Other => {}
            Step::Closed => return,
            Step::Ev(ev) => match ev {
                Ev::Connected { .. } => {
                    sup.connected();
                    if !on_event(ev) {
                        return;
                    }
                }
                Ev::Disconnected { ref reason, .. } => {
                    let pause = sup.lost(reason);
                    if !on_event(ev) {
                        return;
                    }
                    // Sleep in slices so a stop request is seen promptly.
                    let until = std::time::Instant::now() + pause;
                    while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20).min(pause));
                    }
                }
                other => {
                    if !on_event(other) {
                        return;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Endpoint::parse_url("mqtt://localhost"),
            Ok(("localhost".into(), 1883, false))
        );
        assert_eq!(
            Endpoint::parse_url("mqtts://broker.example:8884/"),
            Ok(("broker.example".into(), 8884, true))
        );
        assert_eq!(
            Endpoint::parse_url("tcp://10.0.0.1:1884"),
            Ok(("10.0.0.1".into(), 1884, false))
        );
        assert_eq!(
            Endpoint::parse_url("mqtts://h"),
            Ok(("h".into(), 8883, true))
        );
        assert!(Endpoint::parse_url("http://h").is_err());
        assert!(Endpoint::parse_url("mqtt://:1883").is_err());
        assert!(Endpoint::parse_url("mqtt://h:port").is_err());
    }
}
