//! Events from an MQTT broker.
//!
//! One thread drives the connection ([`crate::mqtt::drive`]) and feeds a
//! bounded queue of messages; [`MqttSource::poll`] takes from it. Messages
//! are handed over in groups (what arrived together), which saves the
//! pipeline a wake-up per message. Without a journal, a full queue stops
//! the connection thread from reading, which pushes back on the broker
//! through TCP: memory stays bounded.
//!
//! With a journal (the pipeline has `state:`), every message is first made
//! durable in `<state.dir>/journal.redb` (group commit, see
//! [`super::journal`]) and only then acknowledged (QoS 1 PUBACK) and handed
//! on. The source's position is the journal number of the last message it
//! handed out; on restart it replays the journal after the checkpoint's
//! position before taking live messages, and a committed checkpoint trims
//! the journal. A message the broker redelivers (DUP) after it was
//! journaled but before its PUBACK arrived is recognised by packet id and
//! its journal entry, acknowledged again and not journaled twice.
//!
//! Without a journal, QoS 1 messages are acknowledged on receipt.
//!
//! Subscriptions are made on the first connection and again whenever the
//! broker has no session for us.

use super::journal::{self, Entry, Journal};
use super::{
    count_position, read_count_position, Poll, RawBatch, Source, SourceError, TopicBinder,
};
use crate::mqtt::topic::TopicPattern;
use crate::mqtt::{drive, Client, Connection, Endpoint, Ev, Step, Supervisor};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Groups of messages queued between the connection thread and the
/// pipeline. A group holds at most [`journal::GROUP`] messages, so at most
/// `QUEUE * GROUP` messages wait here. The queue's slots are allocated (and
/// touched) up front: groups keep it small where one slot per message took
/// 640 KiB of an idle pipeline's memory, and hand over one wake-up per
/// group instead of one per message.
const QUEUE: usize = 32;
/// Without a journal, the longest a message is held for the ones after it
/// while they keep coming (handing over in groups saves a wake-up per
/// message; a pause hands over at once).
const PLAIN_LINGER: Duration = Duration::from_millis(1);
/// How long a failed journal write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Journaled messages the pipeline may lag behind before the connection
/// thread slows its reading (the journal is the buffer up to there).
const MAX_LAG: u64 = 500_000;

#[derive(Clone, Debug)]
pub struct MqttSourceOptions {
    pub endpoint: Endpoint,
    pub patterns: Vec<TopicPattern>,
    pub qos: u8,
    /// Field that receives the whole topic.
    pub topic_field: Option<String>,
    /// Where the input journal lives (the pipeline's state directory);
    /// `None`: no journal, messages are acknowledged on receipt.
    pub journal_dir: Option<PathBuf>,
    /// Subscribe through the shared subscription `$share/<group>/…` (peer
    /// mode: the broker deals the messages among the group's members).
    /// Topics still bind against the patterns as written. Retained
    /// messages are then dropped: Mosquitto before 2.0.13 sends them to
    /// every member, which would count them once per member.
    pub share_group: Option<String>,
    /// Ingestion time: stamp each message when it arrives and keep the
    /// stamp in the journal, so a replay gives it the same time.
    pub stamp_arrivals: bool,
    /// Subscribe with MQTT 5's Retain As Published, so messages keep the
    /// retain flag they were published with (a sink has `retain: keep`).
    /// MQTT 3.1.1 has no such option: its brokers clear the flag.
    pub retain_as_published: bool,
}

/// Subscribes to every filter (queued: the connection writes them before
/// it reads again).
fn subscribe_all(client: &Client, url: &str, filters: &[String], qos: u8, rap: bool) {
    for f in filters {
        if let Err(e) = client.subscribe_with(f, qos, rap) {
            tracing::error!(broker = %url, filter = %f, error = %e, "cannot subscribe");
        }
    }
}

/// A message on its way to the pipeline, with its journal number (0 when
/// there is no journal).
struct Live {
    seq: u64,
    topic: String,
    payload: Bytes,
    /// The payload's size when `payload` is only its first bytes.
    oversize: Option<u64>,
    /// Arrival stamp (epoch ms) with `stamp_arrivals`, else 0.
    arrival: i64,
    retain: bool,
}

/// What the connection thread needs; taken when it starts (first poll).
struct Start {
    conn: Connection,
    tx: SyncSender<Vec<Live>>,
    filters: Vec<String>,
    /// Shared subscription: retained messages are dropped.
    drop_retained: bool,
    stamp_arrivals: bool,
    retain_as_published: bool,
    qos: u8,
    journal: Option<(Journal, journal::Opened)>,
}

/// Without a journal, in a pipeline run on one thread
/// ([`Source::poll_on_caller`]), the thread that polls the source drives
/// its connection itself: no connection thread, no hand-over.
struct Polled {
    conn: Connection,
    sup: Supervisor,
    filters: Vec<String>,
    qos: u8,
    retain_as_published: bool,
    /// Shared subscription: retained messages are dropped.
    drop_retained: bool,
    dropped_retained: u64,
    stamp_arrivals: bool,
    ever_connected: bool,
    /// After a failed attempt: when to try again.
    retry_at: Option<Instant>,
}

pub struct MqttSource {
    url: String,
    /// Without a journal: the connection, driven by `poll`.
    polled: Option<Polled>,
    /// The subscription filters (with the share prefix in peer mode).
    filters: Vec<String>,
    rx: Option<Receiver<Vec<Live>>>,
    start: Option<Start>,
    /// A reason the connection can never succeed, set by its thread.
    fatal: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    client: Client,
    binder: TopicBinder,
    journal: Option<Journal>,
    /// Entries held in the journal (`rivulet_journal_entries`), set by the
    /// connection thread after each group commit.
    journal_entries: crate::metrics::Gauge,
    /// Journal number of the last message handed out (a count without a journal).
    position: u64,
    /// Journal entries still to replay: `(next, through)`.
    replay: Option<(u64, u64)>,
    /// Live messages taken from the queue and not yet handed out: what did
    /// not fit in the last batch, or what comes after entries still to be
    /// read from the journal.
    held: VecDeque<Live>,
    /// The last number handed out, for the connection thread's lag check.
    handed: Arc<AtomicU64>,
    /// The last number journaled, so a quiet queue does not hide entries
    /// that did not fit in it.
    committed: Arc<AtomicU64>,
    /// Trim requests from committed checkpoints, for the connection thread.
    trim: Arc<AtomicU64>,
}

impl MqttSource {
    /// Opens the journal and prepares the connection; connecting starts
    /// with the first poll (see `poll` for connection failures).
    pub fn start(opts: MqttSourceOptions) -> Result<Self, SourceError> {
        let url = opts.endpoint.url.clone();
        let journal = match &opts.journal_dir {
            Some(dir) => Some(Journal::open(dir).map_err(SourceError::Other)?),
            None => None,
        };
        let (client, conn) = opts
            .endpoint
            .subscriber(journal.is_some())
            .map_err(|e| SourceError::Other(format!("MQTT source {url}: {e}")))?;
        if journal.is_some() && opts.qos == 1 && opts.endpoint.clean_session {
            tracing::warn!(
                broker = %url,
                "`clean_session: true` with a journal: messages published while rivulet is down are dropped by the broker; use `clean_session: false` for at-least-once input"
            );
        }
        let (tx, rx) = sync_channel(QUEUE);
        let filters: Vec<String> = opts
            .patterns
            .iter()
            .map(|p| match &opts.share_group {
                Some(g) => format!("$share/{g}/{}", p.filter),
                None => p.filter.clone(),
            })
            .collect();
        let (position, replay) = match &journal {
            // Everything still in the journal is replayed unless a
            // checkpoint says it was processed (see `seek`).
            Some((_, o)) if o.first < o.next => (o.first - 1, Some((o.first, o.next - 1))),
            Some((_, o)) => (o.next - 1, None),
            None => (0, None),
        };
        Ok(MqttSource {
            polled: None,
            url,
            filters: filters.clone(),
            rx: Some(rx),
            journal: journal.as_ref().map(|(j, _)| j.clone()),
            journal_entries: crate::metrics::Gauge::default(),
            start: Some(Start {
                conn,
                tx,
                filters,
                drop_retained: opts.share_group.is_some(),
                stamp_arrivals: opts.stamp_arrivals,
                retain_as_published: opts.retain_as_published,
                qos: opts.qos,
                journal,
            }),
            fatal: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            client,
            binder: TopicBinder {
                patterns: opts.patterns,
                topic_field: opts.topic_field,
            },
            position,
            replay,
            held: VecDeque::new(),
            handed: Arc::new(AtomicU64::new(position)),
            committed: Arc::new(AtomicU64::new(0)),
            trim: Arc::new(AtomicU64::new(0)),
        })
    }

    fn launch(&mut self) -> Result<(), SourceError> {
        let Some(start) = self.start.take() else {
            return Ok(());
        };
        let mut inbound = Inbound::new(start, self);
        let (stop, url) = (self.stop.clone(), self.url.clone());
        // While messages are held, a pause hands them over: with a journal
        // after 1 ms (fewer, larger commits), without one as soon as
        // nothing more is waiting. Idle, wake rarely.
        let holding = inbound.holding.clone();
        let pause = if inbound.journal.is_some() {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        let tick = move || {
            if holding.load(Ordering::Relaxed) {
                pause
            } else {
                Duration::from_millis(200)
            }
        };
        let conn = inbound.conn.take();
        let thread = std::thread::Builder::new()
            .name("rivulet-mqtt-in".into())
            .spawn(move || {
                if let Some(conn) = conn {
                    drive(conn, &url, "source", stop, tick, |ev| inbound.on_event(ev));
                }
                inbound.finish();
            })
            .map_err(|e| SourceError::Other(format!("cannot start the MQTT thread: {e}")))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Hands out held messages while the batch has room (`max_items` more
    /// than `before`); stops at a message that must wait for the journal
    /// entries before it (the connection thread skips the queue when it is
    /// full: those messages are read back from the journal).
    fn push_held(
        &mut self,
        batch: &mut RawBatch,
        before: usize,
        max_items: usize,
        max_payload: usize,
    ) {
        while batch.len() - before < max_items {
            let Some(msg) = self.held.pop_front() else {
                return;
            };
            if let Some(msg) = self.push(batch, msg, max_payload) {
                self.held.push_front(msg);
                return;
            }
        }
    }

    /// Hands out a live message, or gives it back when it must wait for
    /// the journal entries before it (see [`MqttSource::push_held`]).
    fn push(&mut self, batch: &mut RawBatch, msg: Live, max_payload: usize) -> Option<Live> {
        if self.journal.is_some() && msg.seq <= self.position {
            return None; // read from the journal already
        }
        if self.journal.is_some() && msg.seq > self.position + 1 {
            self.replay = Some((self.position + 1, msg.seq - 1));
            return Some(msg);
        }
        self.position = if self.journal.is_some() {
            msg.seq
        } else {
            self.position + 1
        };
        let size = msg.oversize.map_or(msg.payload.len(), |s| s as usize);
        batch.push_sized(&msg.topic, &msg.payload, size, self.position, max_payload);
        if let Some(it) = batch.items.last_mut() {
            it.arrival_ms = msg.arrival;
            it.retain = msg.retain;
        }
        None
    }

    fn fatal_error(&self) -> Option<SourceError> {
        self.fatal
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .map(|reason| SourceError::Other(format!("MQTT broker {}: {reason}", self.url)))
    }

    /// Hands out journal entries left from before the restart.
    fn poll_replay(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
    ) -> Result<(), SourceError> {
        let (Some((next, through)), Some(j)) = (self.replay, &self.journal) else {
            return Ok(());
        };
        let mut last = self.position;
        let after = j
            .read(next, through, max_items, |seq, e| {
                let size = e.oversize.map_or(e.payload.len(), |s| s as usize);
                batch.push_sized(e.topic, e.payload, size, seq, max_payload);
                if let Some(it) = batch.items.last_mut() {
                    // 0 (not stamped): the reader stamps it now.
                    it.arrival_ms = e.arrival;
                    it.retain = e.retain;
                }
                last = seq;
            })
            .map_err(SourceError::Other)?;
        self.position = last;
        self.replay = (after <= through).then_some((after, through));
        if self.replay.is_none() {
            self.position = through;
        }
        Ok(())
    }
}

impl Source for MqttSource {
    fn describe(&self) -> String {
        format!("mqtt {}", self.url)
    }

    fn runs_inline(&self) -> bool {
        true
    }

    fn poll_on_caller(&mut self) {
        // Without a journal there is nothing for a thread of its own to
        // do between polls: the caller drives the connection.
        if self.journal.is_some() || self.polled.is_some() {
            return;
        }
        if let Some(st) = self.start.take() {
            self.rx = None;
            self.polled = Some(Polled {
                conn: st.conn,
                sup: Supervisor::new(&self.url, "source"),
                filters: st.filters,
                qos: st.qos,
                retain_as_published: st.retain_as_published,
                drop_retained: st.drop_retained,
                dropped_retained: 0,
                stamp_arrivals: st.stamp_arrivals,
                ever_connected: false,
                retry_at: None,
            });
        }
    }

    fn start(&mut self, ctx: &crate::context::RunContext) {
        if self.journal.is_some() {
            self.journal_entries = ctx.gauge(
                crate::metrics::names::JOURNAL_ENTRIES,
                "messages held in the MQTT input journal (not yet trimmed by a checkpoint)",
                &[],
            );
        }
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        if let Some(e) = self.fatal_error() {
            return Err(e);
        }
        if self.polled.is_some() {
            return self.poll_polled(batch, max_items, max_payload, wait);
        }
        self.launch()?;
        let result = self.poll_inner(batch, max_items, max_payload, wait);
        self.handed.store(self.position, Ordering::Relaxed);
        result
    }

    fn topic_binder(&self) -> Option<TopicBinder> {
        Some(self.binder.clone())
    }

    fn position(&self) -> Option<Vec<u8>> {
        self.journal.as_ref().map(|_| count_position(self.position))
    }

    fn stop_input(&mut self) {
        for f in &self.filters {
            if let Err(e) = self.client.unsubscribe(f) {
                tracing::warn!(broker = %self.url, filter = %f, error = %e, "cannot unsubscribe");
            }
        }
        tracing::info!(broker = %self.url, "unsubscribed: the broker deals new input to the other peers");
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), SourceError> {
        self.seek_to(position)
    }

    fn checkpoint_hook(&mut self) -> Option<super::CheckpointHook> {
        self.journal.as_ref()?;
        let trim = self.trim.clone();
        Some(Box::new(move |position: &[u8]| {
            if let Ok(pos) = read_count_position(position) {
                trim.fetch_max(pos, Ordering::Relaxed);
            }
        }))
    }
}

impl MqttSource {
    /// Without a journal: reads the connection on this thread. Waits up to
    /// `wait` for the first message, then takes what has arrived, and
    /// while a busy stream keeps coming, what comes within
    /// [`PLAIN_LINGER`] of the first (the connection reads it in slices).
    fn poll_polled(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        let Some(p) = self.polled.as_mut() else {
            return Ok(Poll::Finished);
        };
        let before = batch.len();
        let started = Instant::now();
        let mut first_at: Option<Instant> = None;
        loop {
            let left = wait.saturating_sub(started.elapsed());
            if let Some(at) = p.retry_at {
                let now = Instant::now();
                if now < at {
                    if left.is_zero() || batch.len() > before {
                        return Ok(Poll::Open);
                    }
                    std::thread::sleep(left.min(at - now));
                    continue;
                }
                p.retry_at = None;
            }
            if batch.len() - before >= max_items
                || first_at.is_some_and(|t| t.elapsed() >= PLAIN_LINGER)
            {
                return Ok(Poll::Open);
            }
            let w = if batch.len() > before {
                Duration::ZERO
            } else {
                left
            };
            let ev = match p.conn.step(w) {
                Step::Nothing => return Ok(Poll::Open),
                Step::Closed => return Ok(Poll::Finished),
                Step::Other => continue,
                Step::Ev(ev) => ev,
            };
            match ev {
                Ev::Connected { session_present } => {
                    p.sup.connected();
                    // As with a journal (see `Inbound::on_event`).
                    if !p.ever_connected || !session_present || p.drop_retained {
                        subscribe_all(
                            &self.client,
                            &self.url,
                            &p.filters,
                            p.qos,
                            p.retain_as_published,
                        );
                    }
                    p.ever_connected = true;
                }
                Ev::Disconnected { reason, permanent } => {
                    if permanent && !p.ever_connected {
                        return Err(SourceError::Other(format!(
                            "MQTT broker {}: {reason}",
                            self.url
                        )));
                    }
                    let pause = p.sup.lost(&reason);
                    p.retry_at = Some(Instant::now() + pause);
                }
                Ev::Message { retain: true, .. } if p.drop_retained => {
                    p.dropped_retained += 1;
                    if p.dropped_retained == 1 {
                        tracing::warn!(broker = %self.url, "ignoring retained messages on the shared subscription (each member would count them)");
                    }
                }
                Ev::Message {
                    topic,
                    payload,
                    size,
                    retain,
                    ..
                } => {
                    self.position += 1;
                    first_at.get_or_insert_with(Instant::now);
                    batch.push_sized(&topic, &payload, size, self.position, max_payload);
                    if let Some(it) = batch.items.last_mut() {
                        it.retain = retain;
                        if p.stamp_arrivals {
                            it.arrival_ms = crate::time::Clock::now_ms(&crate::time::SystemClock);
                        }
                    }
                }
                Ev::Tick | Ev::PubAck(_) | Ev::Sent(_) | Ev::AckSent(_) => {}
            }
        }
    }

    fn poll_inner(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        let before = batch.len();
        if self.replay.is_some() {
            self.poll_replay(batch, max_items, max_payload)?;
            if self.replay.is_some() || batch.len() - before >= max_items {
                return Ok(Poll::Open);
            }
        }
        if !self.held.is_empty() {
            self.push_held(batch, before, max_items, max_payload);
            return Ok(Poll::Open);
        }
        let Some(rx) = self.rx.take() else {
            return Ok(Poll::Finished);
        };
        // Wait as asked unless this poll already has something to give
        // (the reader lingers by asking again with what is left).
        let wait = if batch.len() > before {
            Duration::ZERO
        } else {
            wait
        };
        let result = match rx.recv_timeout(wait) {
            Ok(group) => {
                self.held.extend(group);
                loop {
                    self.push_held(batch, before, max_items, max_payload);
                    if !self.held.is_empty() || batch.len() - before >= max_items {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(group) => self.held.extend(group),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                Ok(Poll::Open)
            }
            Err(RecvTimeoutError::Timeout) => {
                // Journaled messages that skipped the full queue, with
                // nothing after them to reveal the gap.
                let committed = self.committed.load(Ordering::Acquire);
                if self.journal.is_some() && committed > self.position {
                    self.replay = Some((self.position + 1, committed));
                }
                Ok(Poll::Open)
            }
            // The connection thread ended: a fatal error.
            Err(RecvTimeoutError::Disconnected) => Err(self.fatal_error().unwrap_or_else(|| {
                SourceError::Other(format!(
                    "MQTT broker {}: the connection thread stopped",
                    self.url
                ))
            })),
        };
        self.rx = Some(rx);
        result
    }

    fn seek_to(&mut self, position: &[u8]) -> Result<(), SourceError> {
        if self.journal.is_none() {
            return Err(SourceError::Other(format!(
                "{} has no input journal to resume from",
                self.describe()
            )));
        }
        let pos = read_count_position(position)?;
        tracing::debug!(pos, replay = ?self.replay, "resuming the input journal");
        match self.replay {
            Some((next, through)) if pos < through => {
                self.replay = Some((next.max(pos + 1), through));
                self.position = pos.max(self.position);
            }
            _ => {
                // Everything journaled was processed. Numbering goes on
                // after the checkpoint even if the journal was lost.
                self.replay = None;
                self.position = self.position.max(pos);
            }
        }
        if pos > 0 {
            self.trim.fetch_max(pos, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        if let Some(p) = self.polled.as_mut() {
            p.conn.close();
        }
        self.stop.store(true, Ordering::SeqCst);
        // Unblock a connection thread waiting on a full queue, then wait for it.
        self.rx = None;
        self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A message waiting for its group commit.
struct Held {
    topic: String,
    payload: Bytes,
    /// The payload's size when `payload` is only its first bytes.
    oversize: Option<u64>,
    pkid: u16,
    /// Arrival stamp (epoch ms) with `stamp_arrivals`, else 0.
    arrival: i64,
    retain: bool,
}

/// The connection thread's side: subscribes, journals, acknowledges, and
/// hands messages to the pipeline.
struct Inbound {
    conn: Option<Connection>,
    client: Client,
    tx: SyncSender<Vec<Live>>,
    filters: Vec<String>,
    qos: u8,
    url: String,
    fatal: Arc<Mutex<Option<String>>>,
    ever_connected: bool,
    /// Drop retained messages (shared subscriptions).
    drop_retained: bool,
    /// Stamp arrivals (ingestion time).
    stamp_arrivals: bool,
    /// Subscribe with Retain As Published (MQTT 5).
    retain_as_published: bool,
    /// Retained messages dropped so far.
    dropped_retained: u64,
    journal: Option<Journal>,
    /// Journal number of the next message.
    next: u64,
    group: Vec<Held>,
    group_since: Instant,
    /// PUBACKs not yet taken by the client's request queue: packet id and
    /// the journal number of the message.
    acks: VecDeque<(u16, u64)>,
    /// Journal numbers of PUBACKs in the client's queue, not yet known to
    /// be processed by the broker (see [`Ev::AckSent`]; in order).
    acks_in_client: VecDeque<u64>,
    /// The first entry left by an earlier run or connection (the oldest
    /// whose PUBACK the broker may not have processed), while its
    /// redeliveries may still come: the broker sends them first after
    /// resuming the session, so the first new message (or a connection
    /// without a session) ends it. Nothing from there on is trimmed before.
    earlier_run: Option<u64>,
    /// Packet id → journal number of the latest journaled message with it
    /// (a redelivery is compared with that entry).
    recent: HashMap<u16, u64>,
    trim: Arc<AtomicU64>,
    trimmed: u64,
    /// The journal's first entry when it was opened, less one: nothing
    /// below it is held.
    journal_floor: u64,
    journal_entries: crate::metrics::Gauge,
    /// The last number the pipeline took.
    handed: Arc<AtomicU64>,
    /// The last number journaled.
    committed: Arc<AtomicU64>,
    /// Set while messages are held: the connection thread then waits for
    /// more only briefly.
    holding: Arc<AtomicBool>,
    /// When the last journal write failed (retries wait [`RETRY`]).
    failed_at: Option<Instant>,
}

impl Inbound {
    fn new(start: Start, src: &MqttSource) -> Inbound {
        let earlier_run = start
            .journal
            .as_ref()
            .and_then(|(_, o)| (o.first < o.next).then_some(o.first));
        let journal_floor = start
            .journal
            .as_ref()
            .map(|(_, o)| o.first.saturating_sub(1))
            .unwrap_or(0);
        let (journal, recent, next) = match start.journal {
            // Live messages are numbered after everything journaled, and
            // after the checkpoint's position even if the journal was lost.
            Some((j, o)) => (
                Some(j),
                o.recent.into_iter().collect(),
                o.next.max(src.position + 1),
            ),
            None => (None, HashMap::new(), 0),
        };
        Inbound {
            conn: Some(start.conn),
            client: src.client.clone(),
            tx: start.tx,
            filters: start.filters,
            qos: start.qos,
            url: src.url.clone(),
            fatal: src.fatal.clone(),
            ever_connected: false,
            drop_retained: start.drop_retained,
            stamp_arrivals: start.stamp_arrivals,
            retain_as_published: start.retain_as_published,
            dropped_retained: 0,
            journal,
            next,
            group: Vec::new(),
            group_since: Instant::now(),
            acks: VecDeque::new(),
            acks_in_client: VecDeque::new(),
            recent,
            earlier_run,
            trim: src.trim.clone(),
            trimmed: 0,
            journal_floor,
            journal_entries: src.journal_entries.clone(),
            handed: src.handed.clone(),
            committed: src.committed.clone(),
            failed_at: None,
            holding: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Handles one connection event; `false` ends the connection thread.
    fn on_event(&mut self, ev: Ev) -> bool {
        // A pause in the stream commits at once: with the broker's limit on
        // unacknowledged messages, waiting longer would only stall it.
        let quiet = matches!(ev, Ev::Tick);
        let go_on = match ev {
            Ev::Connected { session_present } => {
                // Mosquitto (2.0.11) keeps a persistent session's
                // subscriptions across its own restart, but not shared ones:
                // peers subscribe again on every connect (a shared
                // subscription drops retained messages anyway).
                if !self.ever_connected || !session_present || self.drop_retained {
                    subscribe_all(
                        &self.client,
                        &self.url,
                        &self.filters,
                        self.qos,
                        self.retain_as_published,
                    );
                }
                self.ever_connected = true;
                if !session_present {
                    self.earlier_run = None; // nothing will be redelivered
                }
                true
            }
            Ev::Message {
                pkid, retain: true, ..
            } if self.drop_retained => self.drop_retained_message(pkid),
            Ev::Message {
                topic,
                payload,
                size,
                pkid,
                dup,
                retain,
            } => {
                let oversize = (size > payload.len()).then_some(size as u64);
                self.on_message(topic, payload, oversize, pkid, dup, retain)
            }
            Ev::Disconnected { reason, permanent } => {
                if permanent && !self.ever_connected {
                    if let Ok(mut f) = self.fatal.lock() {
                        *f = Some(reason);
                    }
                    return false;
                }
                // Keep what arrived, but acknowledge nothing of the old
                // connection: the broker redelivers it (with DUP) first
                // thing after reconnecting, and the redelivery is recognised
                // (the journal always keeps more than a group's worth).
                let ok = self.commit(false);
                // So are messages whose PUBACK the broker may not have
                // processed: their entries are kept until the first new
                // message shows the redeliveries are over (a broker that
                // stopped with our PUBACKs unread sends those messages
                // again after its restart, however old they are).
                self.earlier_run = self.oldest_unconfirmed();
                self.acks.clear();
                // The client drops what it held for the old connection.
                self.acks_in_client.clear();
                ok
            }
            Ev::AckSent(_) => {
                self.acks_in_client.pop_front();
                true
            }
            Ev::PubAck(_) | Ev::Sent(_) | Ev::Tick => true,
        };
        let linger = if self.journal.is_some() {
            journal::LINGER
        } else {
            PLAIN_LINGER
        };
        let due = !self.group.is_empty() && (quiet || self.group_since.elapsed() >= linger);
        let ok = if due || self.trim_through().is_some() {
            self.commit(true)
        } else {
            true
        };
        self.send_acks();
        go_on && ok
    }

    /// A retained message on a shared subscription: acknowledged (after
    /// what came before), never handed on.
    fn drop_retained_message(&mut self, pkid: u16) -> bool {
        self.dropped_retained += 1;
        if self.dropped_retained == 1 {
            tracing::warn!(broker = %self.url, "ignoring retained messages on the shared subscription (each member would count them)");
        }
        if self.journal.is_none() || pkid == 0 {
            return true; // acknowledged on receipt, or QoS 0
        }
        let ok = self.commit(true);
        // Trimming waits for this PUBACK as for the last journaled message.
        self.acks.push_back((pkid, self.next.saturating_sub(1)));
        ok
    }

    fn on_message(
        &mut self,
        topic: String,
        payload: Bytes,
        oversize: Option<u64>,
        pkid: u16,
        dup: bool,
        retain: bool,
    ) -> bool {
        if !dup {
            self.earlier_run = None;
        }
        if let (Some(j), true, true) = (&self.journal, dup, pkid != 0) {
            let held = self
                .group
                .iter()
                .any(|m| m.pkid == pkid && m.topic == topic && m.payload == payload);
            if held {
                // Journaled with the group, and acknowledged with it.
                return self.commit(true);
            }
            if let Some(&seq) = self.recent.get(&pkid) {
                // A redelivery is rare: compare it with the entry itself. A
                // failed read journals it again (a duplicate, never a loss).
                if j.holds(seq, &topic, &payload).unwrap_or(false) {
                    // Journaled already; acknowledge it (after what came before).
                    tracing::debug!(pkid, seq, "redelivered message already journaled");
                    let ok = self.commit(true);
                    self.acks.push_back((pkid, seq));
                    return ok;
                }
            }
        }
        if self.group.is_empty() {
            self.group_since = Instant::now();
        }
        let arrival = if self.stamp_arrivals {
            crate::time::Clock::now_ms(&crate::time::SystemClock)
        } else {
            0
        };
        self.group.push(Held {
            topic,
            payload,
            oversize,
            pkid,
            arrival,
            retain,
        });
        self.holding.store(true, Ordering::Relaxed);
        if self.group.len() >= journal::GROUP {
            return self.commit(true);
        }
        true
    }

    /// Through which number the journal may be trimmed now, if further than
    /// before: what the last checkpoint covers, keeping a tail for
    /// recognising redeliveries.
    /// The oldest entry whose PUBACK the broker may not have processed
    /// (queued, written and unconfirmed, or from an earlier connection).
    fn oldest_unconfirmed(&self) -> Option<u64> {
        [
            self.acks.front().map(|a| a.1),
            self.acks_in_client.front().copied(),
            self.earlier_run,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn trim_through(&self) -> Option<u64> {
        self.journal.as_ref()?;
        // Never past a message whose PUBACK may not have reached the broker:
        // after a crash the broker sends it again, and only the journal can
        // tell it was counted already.
        let unacked = self.oldest_unconfirmed().unwrap_or(self.next);
        let keep_from = self
            .next
            .saturating_sub(journal::KEEP_FOR_DEDUP)
            .min(unacked);
        let t = self
            .trim
            .load(Ordering::Relaxed)
            .min(keep_from.saturating_sub(1));
        (t > self.trimmed).then_some(t)
    }

    /// Writes the held group (and any trim) to the journal; on success
    /// queues the PUBACKs (when `ack`) and hands the messages on. A failed
    /// write keeps the group, acknowledges nothing, and is retried.
    /// `false` when the pipeline is gone.
    fn commit(&mut self, ack: bool) -> bool {
        let ok = self.commit_group(ack);
        self.holding
            .store(!self.group.is_empty(), Ordering::Relaxed);
        ok
    }

    fn commit_group(&mut self, ack: bool) -> bool {
        let Some(j) = &self.journal else {
            // No journal: hand the group over as it is, waiting for room
            // (which pushes back on the broker through TCP).
            let group = std::mem::take(&mut self.group)
                .into_iter()
                .map(|m| Live {
                    seq: 0,
                    topic: m.topic,
                    payload: m.payload,
                    oversize: m.oversize,
                    arrival: m.arrival,
                    retain: m.retain,
                })
                .collect::<Vec<_>>();
            return group.is_empty() || self.tx.send(group).is_ok();
        };
        let trim = self.trim_through();
        if self.group.is_empty() && trim.is_none() {
            return true;
        }
        if self.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
            return true;
        }
        let entries: Vec<Entry<'_>> = self
            .group
            .iter()
            .map(|m| Entry {
                pkid: m.pkid,
                topic: &m.topic,
                payload: &m.payload,
                oversize: m.oversize,
                arrival: m.arrival,
                retain: m.retain,
            })
            .collect();
        if let Err(e) = j.append(self.next, &entries, trim) {
            if self.failed_at.is_none() {
                tracing::error!(error = %e, held = self.group.len(), "cannot write the input journal; nothing is acknowledged until it works again (retrying every second)");
            }
            self.failed_at = Some(Instant::now());
            return true;
        }
        if self.failed_at.take().is_some() {
            tracing::info!(journal = %j.path().display(), "the input journal works again");
        }
        if let Some(t) = trim {
            self.trimmed = t;
        }
        let last = (self.next + self.group.len() as u64).saturating_sub(1);
        self.journal_entries
            .set(last.saturating_sub(self.trimmed.max(self.journal_floor)) as i64);
        tracing::trace!(first = self.next, n = self.group.len(), trim = ?trim, "journaled");
        for (i, m) in self.group.iter().enumerate() {
            if m.pkid != 0 {
                let seq = self.next + i as u64;
                self.recent.insert(m.pkid, seq);
                if ack {
                    self.acks.push_back((m.pkid, seq));
                }
            }
        }
        self.send_acks();
        self.committed
            .store(self.next + self.group.len() as u64 - 1, Ordering::Release);
        // Never wait for the pipeline here: PUBACKs go out only while this
        // thread drives the connection. What does not fit in the queue is
        // read back from the journal.
        let first = self.next;
        let group = std::mem::take(&mut self.group)
            .into_iter()
            .enumerate()
            .map(|(i, m)| Live {
                seq: first + i as u64,
                topic: m.topic,
                payload: m.payload,
                oversize: m.oversize,
                arrival: m.arrival,
                retain: m.retain,
            })
            .collect::<Vec<_>>();
        self.next += group.len() as u64;
        if let Err(TrySendError::Disconnected(_)) = self.tx.try_send(group) {
            return false;
        }
        let lag = self.next - 1 - self.handed.load(Ordering::Relaxed).min(self.next - 1);
        if lag > MAX_LAG {
            // The pipeline is far behind: read the network more slowly
            // (the connection, and its PUBACKs and pings, still go on).
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn send_acks(&mut self) {
        while let Some(&(pkid, seq)) = self.acks.front() {
            if !self.client.try_ack(pkid) {
                break; // the request queue is full; the next event retries
            }
            self.acks_in_client.push_back(seq);
            self.acks.pop_front();
        }
    }

    /// At the end: journal what is held (it is replayed on the next start).
    fn finish(&mut self) {
        if !self.group.is_empty() {
            self.failed_at = None;
            // The pipeline is gone; keeping the messages is what matters.
            let _ = self.commit(false);
        }
    }
}
