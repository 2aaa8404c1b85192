//! Publishing to an MQTT broker, with store-and-forward.
//!
//! Records go into an *outbox*: up to `memory` messages in memory, then (if
//! a buffer directory is set) up to `disk` messages in a redb file, oldest
//! first. While the broker is connected the outbox is written in order,
//! many messages per `write` (the connection has no event loop: rumqttc's
//! codec over our own socket, as the source's): by the pipeline's thread
//! after each batch when the connection is free and the socket takes it
//! at once, otherwise by the connection's thread. While the broker is
//! unreachable the outbox fills;
//! when it is full, `when_full: block` stops the pipeline until there is
//! room, `drop_oldest` drops the oldest message and counts it.
//!
//! Every message written is tracked until it is safe: a QoS 1 message
//! until the broker's PUBACK for its packet id, a QoS 0 message until it
//! is written to the network. After a reconnect the outbox puts what was
//! not finished back in front and sends it again. A clean shutdown waits until everything is delivered; if the
//! broker is away, what is left goes to the disk buffer, oldest first, and
//! is sent first by the next run. Delivery is at-least-once: after a
//! reconnect or a restart a message may arrive twice.

use super::{Sink, SinkError};
use crate::mqtt::direct::Conn;
use crate::mqtt::topic::TopicTemplate;
use crate::mqtt::{Client, Endpoint, Ev};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Messages moved between memory and disk at once, and the size of the
/// client's request queue.
const CHUNK: usize = 256;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop taking records until there is room (backpressure).
    #[default]
    Block,
    /// Drop the oldest buffered message, and count it.
    DropOldest,
}

#[derive(Clone, Debug)]
pub struct BufferOptions {
    /// Messages kept in memory.
    pub memory: usize,
    /// Directory of the disk buffer, and how many messages it may hold.
    pub disk: Option<(PathBuf, usize)>,
    pub when_full: WhenFull,
    /// How long a clean shutdown waits for the broker.
    pub drain_timeout: Duration,
}

impl Default for BufferOptions {
    fn default() -> Self {
        BufferOptions {
            memory: 10_000,
            disk: None,
            when_full: WhenFull::Block,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MqttSinkOptions {
    pub endpoint: Endpoint,
    pub topic: TopicTemplate,
    pub qos: u8,
    /// Publish with the retain flag (for messages that have none of their own).
    pub retain: bool,
    /// Pass-through events keep the retain flag they came with.
    pub keep_retain: bool,
    /// Announce results to Home Assistant (MQTT discovery).
    pub home_assistant: Option<super::home_assistant::Discovery>,
    pub buffer: BufferOptions,
    /// Names the disk buffer file (`<name>.redb`).
    pub name: String,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    /// Order of hand-over to the client (not stored).
    #[serde(skip)]
    seq: u64,
    /// The message's own retain flag (`None`: the sink's). On disk a byte
    /// after the encoded message; messages buffered by earlier versions
    /// have none.
    #[serde(skip)]
    retain: Option<bool>,
}

const OUTBOX: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("outbox");
/// Keys start mid-range so messages can be put back in front of the head.
const FIRST_KEY: u64 = 1 << 62;

/// The on-disk part of the outbox: a redb table of messages by sequence.
struct DiskQueue {
    db: redb::Database,
    path: PathBuf,
    head: u64,
    tail: u64,
    limit: usize,
}

fn db_err(path: &std::path::Path, e: impl std::fmt::Display) -> String {
    format!("outbox {}: {e}", path.display())
}

impl DiskQueue {
    fn open(dir: &std::path::Path, name: &str, limit: usize) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| db_err(dir, e))?;
        let path = dir.join(format!("{name}.redb"));
        let db = crate::util::dbfile::open(&redb::Builder::new(), &path)
            .map_err(|e| db_err(&path, e))?;
        let (mut head, mut tail) = (FIRST_KEY, FIRST_KEY);
        {
            use redb::ReadableTable;
            let txn = db.begin_write().map_err(|e| db_err(&path, e))?;
            {
                let t = txn.open_table(OUTBOX).map_err(|e| db_err(&path, e))?;
                let first = t
                    .first()
                    .map_err(|e| db_err(&path, e))?
                    .map(|f| f.0.value());
                let last = t.last().map_err(|e| db_err(&path, e))?.map(|l| l.0.value());
                if let (Some(first), Some(last)) = (first, last) {
                    head = first;
                    tail = last + 1;
                }
            }
            txn.commit().map_err(|e| db_err(&path, e))?;
        }
        Ok(DiskQueue {
            db,
            path,
            head,
            tail,
            limit,
        })
    }

    fn len(&self) -> usize {
        (self.tail - self.head) as usize
    }

    fn write(&mut self, at: u64, msgs: &[Msg]) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        {
            let mut t = txn.open_table(OUTBOX).map_err(|e| db_err(&self.path, e))?;
            for (i, m) in msgs.iter().enumerate() {
                let mut bytes = postcard::to_stdvec(m).map_err(|e| db_err(&self.path, e))?;
                if let Some(r) = m.retain {
                    bytes.push(r as u8);
                }
                t.insert(at + i as u64, bytes.as_slice())
                    .map_err(|e| db_err(&self.path, e))?;
            }
        }
        txn.commit().map_err(|e| db_err(&self.path, e))
    }

    fn push_back(&mut self, msgs: &[Msg]) -> Result<(), String> {
        self.write(self.tail, msgs)?;
        self.tail += msgs.len() as u64;
        Ok(())
    }

    fn push_front(&mut self, msgs: &[Msg]) -> Result<(), String> {
        let at = self.head - msgs.len() as u64;
        self.write(at, msgs)?;
        self.head = at;
        Ok(())
    }

    fn pop_front(&mut self, n: usize) -> Result<Vec<Msg>, String> {
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        let mut out = Vec::new();
        {
            let mut t = txn.open_table(OUTBOX).map_err(|e| db_err(&self.path, e))?;
            while out.len() < n {
                let Some((_, v)) = t.pop_first().map_err(|e| db_err(&self.path, e))? else {
                    break;
                };
                match postcard::take_from_bytes::<Msg>(v.value()) {
                    Ok((mut m, rest)) => {
                        m.retain = rest.first().map(|&b| b == 1);
                        out.push(m)
                    }
                    Err(e) => {
                        tracing::error!(file = %self.path.display(), error = %e, "skipping an unreadable buffered message")
                    }
                }
            }
        }
        txn.commit().map_err(|e| db_err(&self.path, e))?;
        self.head = (self.head + n as u64).min(self.tail);
        if self.len() == 0 {
            (self.head, self.tail) = (FIRST_KEY, FIRST_KEY);
        }
        Ok(out)
    }
}

struct State {
    /// Oldest messages, taken from disk or put back after a reconnect;
    /// sent before `disk` and `mem`.
    staged: VecDeque<Msg>,
    disk: Option<DiskQueue>,
    mem: VecDeque<Msg>,
    /// QoS 0 messages encoded, not yet written to the network, in order.
    handed: VecDeque<Msg>,
    /// QoS 1 messages written and awaiting PUBACK, by packet id.
    inflight: std::collections::HashMap<u16, Msg>,
    next_seq: u64,
    connected: bool,
    ever_connected: bool,
    fatal: Option<String>,
    dropped: u64,
    /// `close` waits for everything to be delivered.
    closing: bool,
    /// Home Assistant configs published so far, by config topic: sent
    /// again when Home Assistant restarts or a config is purged.
    discovery: std::collections::HashMap<String, Vec<u8>>,
}

impl State {
    /// Messages not yet confirmed: staged, on disk, in memory, handed to
    /// the client, in flight.
    fn pending(&self) -> usize {
        self.staged.len()
            + self.disk_len()
            + self.mem.len()
            + self.handed.len()
            + self.inflight.len()
    }

    /// Messages not yet handed to the connection.
    fn waiting(&self) -> bool {
        !(self.staged.is_empty() && self.mem.is_empty() && self.disk_len() == 0)
    }

    fn disk_len(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| d.len())
    }

    /// Nothing waiting and nothing unconfirmed.
    fn drained(&self) -> bool {
        self.staged.is_empty()
            && self.disk_len() == 0
            && self.mem.is_empty()
            && self.handed.is_empty()
            && self.inflight.is_empty()
    }

    /// After a reconnect: what was not finished goes back in front.
    fn requeue_unfinished(&mut self) {
        let mut back: Vec<Msg> = self.inflight.drain().map(|(_, m)| m).collect();
        back.extend(self.handed.drain(..));
        back.sort_by_key(|m| m.seq);
        for m in back.into_iter().rev() {
            self.staged.push_front(m);
        }
    }

    /// The next message to send, oldest first.
    fn next(&mut self) -> Result<Option<Msg>, String> {
        if self.staged.is_empty() {
            if let Some(d) = self.disk.as_mut().filter(|d| d.len() > 0) {
                self.staged.extend(d.pop_front(CHUNK)?);
            }
        }
        Ok(self.staged.pop_front().or_else(|| self.mem.pop_front()))
    }
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// The connection. Its thread holds it while it steps it (reads,
    /// writes, reconnects), never while it waits for the broker; the
    /// pipeline's thread writes through it when it is free. Lock order:
    /// `state`, then `conn` with `try_lock` only; the connection's thread
    /// takes `conn` first and then `state`, so neither ever waits for the
    /// other in a cycle.
    conn: Mutex<Conn>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the state
        // itself stays consistent, so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        // As for `lock`: the connection is consistent between calls.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct MqttSink {
    url: String,
    opts: MqttSinkOptions,
    shared: Arc<Shared>,
    client: Client,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    warned_topic: bool,
    /// Messages waiting or unconfirmed, set after every batch.
    outbox: Option<crate::metrics::Gauge>,
    /// Result topics announced to Home Assistant.
    announced: std::collections::HashSet<String>,
}

impl MqttSink {
    pub fn start(opts: MqttSinkOptions) -> Result<Self, SinkError> {
        let url = opts.endpoint.url.clone();
        let err = |e: String| SinkError::Other(format!("MQTT sink {url}: {e}"));
        let disk = match &opts.buffer.disk {
            Some((dir, limit)) => Some(DiskQueue::open(dir, &opts.name, *limit).map_err(err)?),
            None => None,
        };
        if let Some(d) = &disk {
            if d.len() > 0 {
                tracing::info!(broker = %url, messages = d.len(), "sending messages buffered by an earlier run first");
            }
        }
        let (client, conn) = opts.endpoint.publisher().map_err(err)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                staged: VecDeque::new(),
                disk,
                mem: VecDeque::new(),
                handed: VecDeque::new(),
                inflight: std::collections::HashMap::new(),
                next_seq: 0,
                connected: false,
                ever_connected: false,
                fatal: None,
                dropped: 0,
                closing: false,
                discovery: std::collections::HashMap::new(),
            }),
            cv: Condvar::new(),
            conn: Mutex::new(conn),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let conn_thread = {
            let (shared, stop, url, qos, retain) = (
                shared.clone(),
                stop.clone(),
                url.clone(),
                opts.qos,
                opts.retain,
            );
            let ha = opts
                .home_assistant
                .as_ref()
                .map(|d| (d.birth_topic(), d.config_filter()));
            let subscriber = client.clone();
            std::thread::Builder::new()
                .name("rivulet-mqtt-out".into())
                .spawn(move || run_connection(&shared, &stop, &url, qos, retain, ha, &subscriber))
                .map_err(|e| err(format!("cannot start a thread: {e}")))?
        };
        Ok(MqttSink {
            url,
            opts,
            shared,
            client,
            stop,
            threads: vec![conn_thread],
            warned_topic: false,
            outbox: None,
            announced: std::collections::HashSet::new(),
        })
    }

    fn fatal(&self, st: &State) -> Result<(), SinkError> {
        match &st.fatal {
            Some(reason) => Err(SinkError::Other(format!(
                "MQTT broker {}: {reason}",
                self.url
            ))),
            None => Ok(()),
        }
    }

    /// Messages waiting in the outbox or not yet confirmed.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending()
    }
}

/// Subscribes (QoS 0; queued for the connection, which writes it before
/// it reads again) to Home Assistant's birth topic and to the sensor
/// configs, to announce again after a restart or a purge.
fn listen_to_home_assistant(client: &Client, url: &str, birth: &str, configs: &str) {
    for f in [birth, configs] {
        if let Err(e) = client.subscribe(f, 0) {
            tracing::warn!(broker = %url, filter = %f, error = %e, "cannot subscribe for Home Assistant");
        }
    }
}

/// QoS 1 messages written and not yet acknowledged, at most (or the
/// broker's Receive Maximum when lower).
const MAX_INFLIGHT: usize = 100;

/// How long the connection's thread waits at most between steps (pings,
/// Home Assistant's messages, a broker that went away, PUBACKs while the
/// window has room).
const IDLE_STEP: Duration = Duration::from_millis(200);

/// With the QoS 1 window full, how long PUBACKs gather in the socket before
/// they are read together (the source reads a busy stream in slices as
/// long).
const ACK_SLICE: Duration = Duration::from_micros(200);

/// QoS 1 messages the broker takes unacknowledged now.
fn window(conn: &Conn) -> usize {
    MAX_INFLIGHT.min(conn.receive_max()).max(1)
}

/// Whether [`encode_waiting`] would encode something now.
fn can_send(st: &State, conn: &Conn, qos: u8) -> bool {
    st.connected && conn.is_up() && st.waiting() && (qos == 0 || st.inflight.len() < window(conn))
}

/// Encodes what waits, oldest first, while connected and (at QoS 1) the
/// broker's window has room: up to [`CHUNK`] messages, to leave in one
/// `write`. Messages are tracked until safe: QoS 0 ones in `handed` until
/// written, QoS 1 ones in `inflight` until their PUBACK. How many it
/// encoded.
fn encode_waiting(st: &mut State, conn: &mut Conn, qos: u8, retain: bool) -> Result<usize, String> {
    if !st.connected || !conn.is_up() {
        return Ok(0);
    }
    let window = window(conn);
    let mut n = 0;
    while n < CHUNK && (qos == 0 || st.inflight.len() < window) {
        let Some(mut msg) = st.next()? else {
            break;
        };
        let r = msg.retain.unwrap_or(retain);
        let pkid = if qos > 0 {
            conn.publish_id(|id| st.inflight.contains_key(&id))
        } else {
            0
        };
        if let Err(e) = conn.publish(&msg.topic, &msg.payload, qos, r, pkid) {
            // Larger than the broker takes: it can never be sent.
            st.dropped += 1;
            tracing::error!(error = %e, "dropping a message the broker cannot take");
            continue;
        }
        msg.seq = st.next_seq;
        st.next_seq += 1;
        if qos > 0 {
            st.inflight.insert(pkid, msg);
        } else {
            st.handed.push_back(msg);
        }
        n += 1;
    }
    Ok(n)
}

/// The sink's connection thread: writes from the outbox (see
/// [`encode_waiting`]) when the pipeline's thread did not, takes PUBACKs
/// and Home Assistant's messages, reconnects. It holds the connection only
/// while it steps it, not while it waits for the broker, so the pipeline's
/// thread can write through it meanwhile ([`MqttSink::flush`]). After a
/// reconnect, what was written and not acknowledged is sent again
/// (at-least-once).
#[allow(clippy::too_many_arguments)]
fn run_connection(
    shared: &Shared,
    stop: &AtomicBool,
    url: &str,
    qos: u8,
    retain: bool,
    ha: Option<(String, String)>,
    subscriber: &Client,
) {
    use crate::mqtt::Step;
    let mut sup = crate::mqtt::Supervisor::new(url, "sink");
    loop {
        let mut conn = shared.conn();
        if stop.load(Ordering::SeqCst) {
            conn.close();
            return;
        }
        let more = {
            let mut st = shared.lock();
            if conn.is_up() && conn.written() && !st.handed.is_empty() {
                // The pipeline's thread left them encoded; the last step
                // wrote them.
                st.handed.clear();
                shared.cv.notify_all();
            }
            match encode_waiting(&mut st, &mut conn, qos, retain) {
                Ok(0) => {}
                Ok(_) => {
                    if conn.flush_now() {
                        // Written: QoS 0 messages are done.
                        st.handed.clear();
                    }
                    shared.cv.notify_all();
                }
                Err(e) => {
                    st.fatal = Some(e);
                    shared.cv.notify_all();
                    return;
                }
            }
            can_send(&st, &conn, qos)
        };
        let ev = match conn.step(Duration::ZERO) {
            Step::Ev(ev) => ev,
            Step::Closed => return,
            Step::Other => continue,
            Step::Nothing if more => continue,
            Step::Nothing => {
                // Wait for the broker without holding the connection.
                if let Some(park) = conn.park() {
                    // PUBACKs are only needed for room in the window, and
                    // the pipeline's thread asks when it finds the window
                    // full (or anything else left for this thread): until
                    // then they wait in the socket and are read together,
                    // not at a wake-up each. Closing waits for them.
                    // With the window full, the PUBACKs that free it are
                    // taken a slice at a time too, not at a wake-up each.
                    let (room, closing) = {
                        let st = shared.lock();
                        (st.inflight.len() < window(&conn), st.closing)
                    };
                    drop(conn);
                    if closing {
                        park.wait(IDLE_STEP);
                    } else if room {
                        park.nap(IDLE_STEP);
                    } else {
                        park.nap(ACK_SLICE);
                    }
                }
                continue;
            }
        };
        drop(conn);
        let mut st = shared.lock();
        match ev {
            Ev::Connected { .. } => {
                sup.connected();
                st.connected = true;
                st.ever_connected = true;
                // Written and not acknowledged on the old connection:
                // again, in order (the broker may have some of them).
                st.requeue_unfinished();
                shared.cv.notify_all();
                if let Some((birth, configs)) = &ha {
                    listen_to_home_assistant(subscriber, url, birth, configs);
                }
            }
            Ev::Message { topic, payload, .. } => {
                if let Some((birth, _)) = &ha {
                    // Home Assistant started (its birth message), or a
                    // config was purged.
                    let again: Vec<(String, Vec<u8>)> =
                        if topic == *birth && &payload[..] == b"online" {
                            st.discovery.clone().into_iter().collect()
                        } else if payload.is_empty() {
                            st.discovery
                                .get(&topic)
                                .map(|p| vec![(topic.clone(), p.clone())])
                                .unwrap_or_default()
                        } else {
                            Vec::new()
                        };
                    if !again.is_empty() {
                        tracing::info!(broker = %url, configs = again.len(), "announcing results to Home Assistant again");
                    }
                    for (topic, payload) in again {
                        st.mem.push_back(Msg {
                            topic,
                            payload,
                            seq: 0,
                            retain: Some(true),
                        });
                    }
                }
            }
            Ev::Disconnected { reason, permanent } => {
                st.connected = false;
                if permanent && !st.ever_connected {
                    st.fatal = Some(reason);
                    shared.cv.notify_all();
                    return;
                }
                shared.cv.notify_all();
                drop(st);
                let pause = sup.lost(&reason);
                // Sleep in slices so a stop request is seen promptly.
                let until = Instant::now() + pause;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20).min(pause));
                }
            }
            Ev::PubAck(pkid) => {
                st.inflight.remove(&pkid);
                if st.closing && st.drained() {
                    shared.cv.notify_all();
                }
            }
            Ev::Sent(_) | Ev::AckSent(_) | Ev::Tick => {}
        }
    }
}

impl MqttSink {
    /// Writes this batch's messages from the pipeline's thread when the
    /// connection is free, without waiting for room in the socket: one
    /// wake-up less per batch than handing them to the connection's
    /// thread. `false` when something is left for that thread (the
    /// connection is busy or down, the socket is full, or the QoS 1 window
    /// is).
    fn write_here(&self, st: &mut State) -> bool {
        let Ok(mut conn) = self.shared.conn.try_lock() else {
            return false;
        };
        loop {
            match encode_waiting(st, &mut conn, self.opts.qos, self.opts.retain) {
                Ok(0) => break,
                Ok(_) => {
                    if !conn.write_some() {
                        return false;
                    }
                    st.handed.clear();
                }
                Err(e) => {
                    st.fatal = Some(e);
                    return false;
                }
            }
        }
        // Written; anything still waiting is for the connection's thread.
        !st.waiting()
    }

    fn warn_topic(&mut self, e: &str) {
        if !self.warned_topic {
            tracing::warn!(broker = %self.url, error = %e, "publishing to the topic with `_unknown` for missing fields");
            self.warned_topic = true;
        }
    }

    /// Before the first result on `topic`: its Home Assistant configs.
    fn announce<'a>(
        &mut self,
        topic: &str,
        get: impl Fn(&str) -> crate::mqtt::topic::Piece<'a>,
    ) -> Result<(), SinkError> {
        let Some(d) = &self.opts.home_assistant else {
            return Ok(());
        };
        if self.announced.contains(topic) {
            return Ok(());
        }
        let configs = d.configs(topic, get);
        self.announced.insert(topic.to_string());
        for (t, p) in configs {
            self.shared.lock().discovery.insert(t.clone(), p.clone());
            self.enqueue(Msg {
                topic: t,
                payload: p,
                seq: 0,
                retain: Some(true),
            })?;
        }
        Ok(())
    }

    fn enqueue(&mut self, msg: Msg) -> Result<(), SinkError> {
        let mut st = self.shared.lock();
        self.fatal(&st)?;
        if st.mem.len() >= self.opts.buffer.memory {
            st = self.make_room(st)?;
        }
        // The publisher is told once per batch, by `flush`.
        st.mem.push_back(msg);
        Ok(())
    }
}

impl Sink for MqttSink {
    fn describe(&self) -> String {
        format!("mqtt {}", self.url)
    }

    fn topic_fields(&self) -> Vec<String> {
        let mut f = self.opts.topic.fields();
        if let Some(d) = &self.opts.home_assistant {
            f.extend(d.name_fields());
        }
        f
    }

    fn keeps_retain(&self) -> bool {
        self.opts.keep_retain
    }

    fn write_event(
        &mut self,
        record: &[u8],
        event: &crate::sinks::EventMeta,
    ) -> Result<(), SinkError> {
        use crate::mqtt::topic::Piece;
        use crate::value::Value;
        let piece = |f: &str| match event.get(f) {
            Some(Value::Str(s)) => Piece::Str(s),
            Some(Value::Null) | None => Piece::Missing,
            Some(v) => Piece::Other(v.to_json().to_string()),
        };
        let topic = match self.opts.topic.fill(false, piece) {
            Ok(t) => t,
            Err(e) => {
                self.warn_topic(&e);
                self.opts.topic.fill(true, piece).unwrap_or_default()
            }
        };
        self.announce(&topic, piece)?;
        let retain = self.opts.keep_retain.then_some(event.retain);
        self.enqueue(Msg {
            topic,
            payload: record.to_vec(),
            seq: 0,
            retain,
        })
    }

    fn write(&mut self, record: &[u8]) -> Result<(), SinkError> {
        let topic = if self.opts.topic.is_static() {
            self.opts
                .topic
                .render(&serde_json::Value::Null)
                .unwrap_or_default()
        } else {
            let v: serde_json::Value = serde_json::from_slice(record).unwrap_or_default();
            match self.opts.topic.render(&v) {
                Ok(t) => t,
                Err(e) => {
                    self.warn_topic(&e);
                    self.opts.topic.render_lenient(&v)
                }
            }
        };
        if self.opts.home_assistant.is_some() && !self.announced.contains(&topic) {
            let v: serde_json::Value = serde_json::from_slice(record).unwrap_or_default();
            self.announce(&topic, |f| crate::mqtt::topic::json_piece(&v, f))?;
        }
        self.enqueue(Msg {
            topic,
            payload: record.to_vec(),
            seq: 0,
            retain: None,
        })
    }

    fn start(&mut self, ctx: &crate::context::RunContext) {
        let sink = ctx.operator.strip_prefix("sink_").unwrap_or(&ctx.operator);
        self.outbox = Some(ctx.gauge(
            crate::metrics::names::OUTBOX_MESSAGES,
            "messages in the MQTT sink's outbox or not yet confirmed",
            &[("sink", sink)],
        ));
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        let mut st = self.shared.lock();
        self.fatal(&st)?;
        if !st.mem.is_empty() && !self.write_here(&mut st) {
            // The connection's thread writes the rest.
            self.client.wake();
        }
        if let Some(g) = &self.outbox {
            g.set(st.pending() as i64);
        }
        self.fatal(&st)
    }

    fn close(&mut self) -> Result<(), SinkError> {
        let deadline = Instant::now() + self.opts.buffer.drain_timeout;
        let mut st = self.shared.lock();
        st.closing = true;
        // The connection's thread reads the PUBACKs left at once.
        self.client.wake();
        // Wait until everything is delivered, while the broker is there.
        while !st.drained() && Instant::now() < deadline {
            self.fatal(&st)?;
            st = self
                .shared
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        self.fatal(&st)?;
        self.stop.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        self.client.wake();
        // What is left, oldest first: unfinished, staged, then the disk part, then memory.
        st.requeue_unfinished();
        let front: Vec<Msg> = st.staged.drain(..).collect();
        let mem: Vec<Msg> = st.mem.drain(..).collect();
        let left = front.len() + mem.len();
        let result = if left == 0 {
            Ok(())
        } else if let Some(d) = st.disk.as_mut() {
            d.push_front(&front)
                .and_then(|_| d.push_back(&mem))
                .map(|_| {
                    tracing::warn!(broker = %self.url, messages = d.len(), file = %d.path.display(),
                        "broker unreachable at shutdown; messages kept for the next run");
                })
                .map_err(|e| SinkError::Other(format!("MQTT sink {}: {e}", self.url)))
        } else {
            Err(SinkError::Other(format!(
                "MQTT broker {}: {left} messages could not be delivered before shutdown and are lost \
                 (set `buffer.dir` to keep them for the next run)",
                self.url
            )))
        };
        if st.dropped > 0 {
            tracing::warn!(broker = %self.url, dropped = st.dropped, "messages dropped because the outbox was full");
        }
        drop(st);
        self.client.disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        result
    }
}

impl MqttSink {
    /// The outbox is full in memory: move the oldest to disk, or apply
    /// `when_full`. Memory and disk together never hold more than their
    /// bounds.
    fn make_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, SinkError> {
        let err = |e: String| SinkError::Other(format!("MQTT sink {}: {e}", self.url));
        loop {
            self.fatal(&st)?;
            if st.mem.len() < self.opts.buffer.memory {
                return Ok(st);
            }
            let disk_room = st
                .disk
                .as_ref()
                .map(|d| d.limit.saturating_sub(d.len()))
                .unwrap_or(0);
            if disk_room > 0 {
                let n = disk_room.min((self.opts.buffer.memory / 2).max(1));
                let oldest: Vec<Msg> = st.mem.drain(..n).collect();
                if let Some(d) = st.disk.as_mut() {
                    d.push_back(&oldest).map_err(err)?;
                }
                return Ok(st);
            }
            match self.opts.buffer.when_full {
                WhenFull::DropOldest => {
                    // The oldest message is on disk when there is a disk part.
                    if st.disk_len() > 0 {
                        if let Some(d) = st.disk.as_mut() {
                            d.pop_front(1).map_err(err)?;
                        }
                    } else {
                        st.mem.pop_front();
                    }
                    st.dropped += 1;
                    if st.dropped.is_power_of_two() {
                        tracing::warn!(broker = %self.url, dropped = st.dropped, "outbox full: dropping the oldest messages");
                    }
                }
                WhenFull::Block => {
                    // The per-batch figure does not come while this wait
                    // lasts: the outbox is full now.
                    if let Some(g) = &self.outbox {
                        g.set(st.pending() as i64);
                    }
                    self.client.wake();
                    st = self
                        .shared
                        .cv
                        .wait_timeout(st, Duration::from_millis(100))
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.cv.notify_all();
        self.client.disconnect();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u32) -> Msg {
        Msg {
            topic: format!("t/{i}"),
            payload: vec![i as u8],
            seq: 0,
            retain: None,
        }
    }

    #[test]
    fn disk_queue_keeps_order_across_reopen_and_front_pushes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut q = DiskQueue::open(dir.path(), "out", 100).unwrap();
            q.push_back(&[msg(3), msg(4)]).unwrap();
            q.push_front(&[msg(1), msg(2)]).unwrap();
            assert_eq!(q.len(), 4);
        }
        let mut q = DiskQueue::open(dir.path(), "out", 100).unwrap();
        assert_eq!(q.len(), 4);
        let got: Vec<String> = q
            .pop_front(3)
            .unwrap()
            .into_iter()
            .map(|m| m.topic)
            .collect();
        assert_eq!(got, ["t/1", "t/2", "t/3"]);
        q.push_back(&[msg(5)]).unwrap();
        let got: Vec<String> = q
            .pop_front(10)
            .unwrap()
            .into_iter()
            .map(|m| m.topic)
            .collect();
        assert_eq!(got, ["t/4", "t/5"]);
        assert_eq!(q.len(), 0);
    }
}
