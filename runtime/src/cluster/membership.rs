//! Who is in the cluster, as the MQTT broker sees it.
//!
//! Each peer keeps a control connection to the broker of its source (clean
//! session, short keep-alive) and a **retained presence** message on
//! `rivulet/<cluster>/peers/<id>`: a JSON object with its id, advertised
//! address, pipeline fingerprint and incarnation (random per start). The
//! connection's **Last Will** is an empty retained message on the same
//! topic, so the broker clears the presence of a peer that vanishes: at
//! once when its process dies (the kernel closes the socket), within 1.5–2.5
//! keep-alives when it hangs or loses power. A peer that leaves cleanly
//! clears its presence itself. Every peer subscribes to
//! `rivulet/<cluster>/peers/+` and so sees the same member list.
//!
//! **Joining.** A peer first reads the presences already retained (a probe
//! message it publishes to itself arrives after them), then:
//! - refuses to start if a live peer has the same id (another incarnation
//!   that does not go away within 2.5 keep-alives: a stale presence of this
//!   peer's own earlier life, cut off by a power loss, does);
//! - refuses to start if a peer runs another pipeline (fingerprint);
//! - then publishes its own presence.
//!
//! After a reconnect the presence is published again (the will has cleared
//! it).

use crate::mqtt::{drive, Client, Endpoint, Ev, LastWill};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a peer announces about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub id: String,
    /// Where other peers dial it (`host:port`).
    pub addr: String,
    /// The pipeline's fingerprint: peers of one cluster run one pipeline.
    pub fingerprint: String,
    /// Random per process start: tells a restarted peer from its old self.
    pub incarnation: u64,
    /// The rivulet version that announced it.
    pub version: String,
    /// Leaving cleanly: its input is all in the last global checkpoint, so
    /// the others need not wait for it once it is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// A change of the member list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Joined(Presence),
    Left(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("peer `{id}` is already running (at {addr}, started as incarnation {incarnation}); give each peer its own `peers.id`")]
    DuplicateId {
        id: String,
        addr: String,
        incarnation: u64,
    },
    #[error("peer `{peer}` of cluster `{cluster}` runs another pipeline ({theirs}; this one is {ours}); peers of one cluster must run the same pipeline file")]
    OtherPipeline {
        cluster: String,
        peer: String,
        theirs: String,
        ours: String,
    },
    #[error("cluster `{cluster}`: no answer from the MQTT broker {url} within {waited:?} (presence of the other peers unknown)")]
    NoBroker {
        cluster: String,
        url: String,
        waited: Duration,
    },
    #[error("cluster `{cluster}`: {message}")]
    Broker { cluster: String, message: String },
}

/// How to join.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    pub cluster: String,
    pub me: Presence,
    /// The broker (its url, credentials and TLS are used; the client id,
    /// session and will are set here).
    pub endpoint: Endpoint,
    /// Keep-alive of the control connection: failures are seen within 1.5
    /// to 2.5 times it.
    pub keep_alive: Duration,
}

/// The topic of the cluster's retained checkpoint decision, and the one on
/// which peers report a checkpoint ready.
pub fn control_topics(cluster: &str) -> (String, String) {
    (
        format!("rivulet/{cluster}/checkpoint"),
        format!("rivulet/{cluster}/ready"),
    )
}

/// The presence topic of a peer.
pub fn presence_topic(cluster: &str, id: &str) -> String {
    format!("rivulet/{cluster}/peers/{id}")
}

#[derive(Default)]
struct View {
    members: BTreeMap<String, Presence>,
    /// The probe came back: the retained presences have all arrived.
    synced: bool,
    /// The last connection error, for the join timeout message.
    error: Option<String>,
    /// The last global checkpoint decision retained on the broker.
    decision: Option<Vec<u8>>,
}

struct Shared {
    view: Mutex<View>,
    changed: Condvar,
}

/// This peer's membership: alive until [`Membership::leave`].
pub struct Membership {
    cluster: String,
    me: Presence,
    /// The presence as announced now (its incarnation changes on each
    /// re-announcement, see [`Membership::rejoin`]).
    announced_as: Arc<Mutex<Presence>>,
    client: Client,
    shared: Arc<Shared>,
    events: Receiver<MemberEvent>,
    /// Messages of the cluster's control topics ([`control_topics`]).
    control: Receiver<(String, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Set by [`Membership::leave`]: nothing more to do on drop.
    left: bool,
}

impl Membership {
    /// Joins the cluster (see the module docs); waits at most about three
    /// keep-alives for the broker.
    pub fn join(opts: JoinOptions) -> Result<Membership, MembershipError> {
        let (m, announced) = Membership::open(&opts, true)?;
        m.check_and_announce(&opts, announced)
    }

    /// Reads the members without joining (for `rivulet peers`): nothing is
    /// announced and nothing is left behind.
    pub fn observe(opts: JoinOptions) -> Result<Vec<Presence>, MembershipError> {
        let (mut m, _) = Membership::open(&opts, false)?;
        let members = m.members();
        m.left = true;
        m.shut();
        Ok(members)
    }

    /// Connects and reads the presences already there. `member`: connect
    /// as this peer (with the will that clears its presence), else as an
    /// observer.
    fn open(
        opts: &JoinOptions,
        member: bool,
    ) -> Result<(Membership, Arc<AtomicBool>), MembershipError> {
        let cluster = opts.cluster.clone();
        let me = opts.me.clone();
        let topic = presence_topic(&cluster, &me.id);
        let filter = format!("rivulet/{cluster}/peers/+");
        let probe = format!("rivulet/{cluster}/probe/{}/{}", me.id, me.incarnation);
        let mut ep = opts.endpoint.clone();
        // The incarnation keeps a second process with the same id from
        // taking over this connection (which would fire its will).
        ep.client_id = if member {
            format!("rivulet-{cluster}-{}-ctl-{:x}", me.id, me.incarnation)
        } else {
            format!("rivulet-{cluster}-observer-{:x}", me.incarnation)
        };
        ep.clean_session = true;
        ep.keep_alive = opts.keep_alive;
        ep.last_will = member.then(|| LastWill {
            topic: topic.clone(),
            payload: Vec::new(),
            qos: 1,
            retain: true,
        });
        let broker = |message: String| MembershipError::Broker {
            cluster: cluster.clone(),
            message,
        };
        let (client, conn) = ep.connect(64).map_err(broker)?;
        let shared = Arc::new(Shared {
            view: Mutex::new(View::default()),
            changed: Condvar::new(),
        });
        let announced_as = Arc::new(Mutex::new(me.clone()));
        let (events_tx, events) = channel();
        let (control_tx, control) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        // Whether our presence is out: re-announced after every reconnect.
        let announced = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop, client) = (shared.clone(), stop.clone(), client.clone());
            let (url, topic) = (ep.url.clone(), topic.clone());
            let me = announced_as.clone();
            let announced = announced.clone();
            let me_cluster = cluster.clone();
            std::thread::Builder::new()
                .name("rivulet-members".into())
                .spawn(move || {
                    drive(
                        conn,
                        &url,
                        "membership",
                        stop,
                        || Duration::from_millis(200),
                        |ev| {
                            on_event(
                                ev,
                                &Ctx {
                                    shared: &shared,
                                    client: &client,
                                    events: &events_tx,
                                    control: &control_tx,
                                    controls: &control_topics(&me_cluster),
                                    me: &me,
                                    topic: &topic,
                                    filter: &filter,
                                    probe: &probe,
                                    announced: &announced,
                                },
                            )
                        },
                    )
                })
                .map_err(|e| broker(format!("cannot start a thread: {e}")))?
        };
        let mut m = Membership {
            cluster: cluster.clone(),
            me: me.clone(),
            announced_as,
            client,
            shared,
            events,
            control,
            stop,
            thread: Some(thread),
            left: false,
        };
        let waited = opts.keep_alive * 3;
        if !m.wait_until(waited, |v| v.synced) {
            let err = MembershipError::NoBroker {
                cluster: cluster.clone(),
                url: ep.url.clone(),
                waited,
            };
            m.shut();
            return Err(err);
        }
        Ok((m, announced))
    }

    fn check_and_announce(
        mut self,
        opts: &JoinOptions,
        announced: Arc<AtomicBool>,
    ) -> Result<Membership, MembershipError> {
        let m = &mut self;
        let cluster = opts.cluster.clone();
        let me = opts.me.clone();
        let topic = presence_topic(&cluster, &me.id);
        // Another live process with this id: wait for a stale presence of
        // an earlier life of this peer to go (its will), then refuse.
        let grace = opts.keep_alive.mul_f64(2.5);
        let clash = |v: &View| {
            v.members
                .get(&me.id)
                .filter(|p| p.incarnation != me.incarnation)
                .cloned()
        };
        if !m.wait_until(grace, |v| clash(v).is_none()) {
            let other = m.view(clash);
            m.shut();
            if let Some(p) = other {
                return Err(MembershipError::DuplicateId {
                    id: p.id,
                    addr: p.addr,
                    incarnation: p.incarnation,
                });
            }
        }
        let foreign = m.view(|v| {
            v.members
                .values()
                .find(|p| p.id != me.id && p.fingerprint != me.fingerprint)
                .cloned()
        });
        if let Some(p) = foreign {
            m.shut();
            return Err(MembershipError::OtherPipeline {
                cluster,
                peer: p.id,
                theirs: p.fingerprint,
                ours: me.fingerprint,
            });
        }
        announce_waiting(&m.client, &topic, &me);
        announced.store(true, Ordering::SeqCst);
        // Return once the broker holds our presence (it comes back to us):
        // a process started right after this one then sees it and, with
        // the same id, is refused.
        let seen = m.wait_until(opts.keep_alive, |v| {
            v.members
                .get(&me.id)
                .is_some_and(|p| p.incarnation == me.incarnation)
        });
        if !seen {
            tracing::debug!(peer = %me.id, "own presence not seen back yet");
        }
        Ok(self)
    }

    fn view<T>(&self, f: impl FnOnce(&View) -> T) -> T {
        let v = self.shared.view.lock().unwrap_or_else(|e| e.into_inner());
        f(&v)
    }

    /// Waits until `ready` holds, at most `timeout`; whether it held.
    fn wait_until(&self, timeout: Duration, ready: impl Fn(&View) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut v = self.shared.view.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if ready(&v) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            v = self
                .shared
                .changed
                .wait_timeout(v, left)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// This peer's presence.
    pub fn me(&self) -> &Presence {
        &self.me
    }

    /// The members now (this peer included once it is announced), by id.
    pub fn members(&self) -> Vec<Presence> {
        self.view(|v| v.members.values().cloned().collect())
    }

    /// Waits until the member ids are exactly `ids` (sorted or not), at
    /// most `timeout`; whether they became so.
    pub fn wait_for_members(&self, ids: &[&str], timeout: Duration) -> bool {
        let mut want: Vec<&str> = ids.to_vec();
        want.sort_unstable();
        self.wait_until(timeout, |v| {
            v.members
                .keys()
                .map(String::as_str)
                .eq(want.iter().copied())
        })
    }

    /// Changes of the member list, in the order seen.
    pub fn events(&self) -> &Receiver<MemberEvent> {
        &self.events
    }

    /// Messages on the cluster's control topics, as (topic, payload).
    pub fn control(&self) -> &Receiver<(String, Vec<u8>)> {
        &self.control
    }

    /// The checkpoint decision retained on the broker when this peer
    /// joined or last reconnected (later ones come through [`Self::control`]).
    pub fn retained_decision(&self) -> Option<Vec<u8>> {
        self.view(|v| v.decision.clone())
    }

    /// Publishes on a control topic (QoS 1); whether it was queued.
    pub fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> bool {
        self.client.try_publish(topic, 1, retain, payload)
    }

    /// Announces this peer again under a new incarnation, so every peer
    /// (this one too) sees a new member list and starts a new view: for a
    /// view that cannot go on (a link to a member failed while the broker
    /// still sees it).
    pub fn rejoin(&self) {
        let me = {
            let mut me = self.announced_as.lock().unwrap_or_else(|e| e.into_inner());
            me.incarnation = fastrand::u64(..);
            me.clone()
        };
        announce(
            &self.client,
            &presence_topic(&self.cluster, &self.me.id),
            &me,
        );
    }

    /// Announces that this peer is leaving cleanly (see
    /// [`Presence::leaving`]); the same incarnation, so no new view.
    pub fn announce_leaving(&self) {
        let me = {
            let mut me = self.announced_as.lock().unwrap_or_else(|e| e.into_inner());
            me.leaving = true;
            me.clone()
        };
        announce(
            &self.client,
            &presence_topic(&self.cluster, &self.me.id),
            &me,
        );
    }

    /// Leaves cleanly: clears the presence, then disconnects.
    pub fn leave(mut self) {
        let topic = presence_topic(&self.cluster, &self.me.id);
        // Retained and empty: the presence is gone for everyone, now and
        // for peers that subscribe later.
        let _ = self.client.try_publish(&topic, 1, true, Vec::new());
        // Give the publish a moment to be written before the DISCONNECT.
        std::thread::sleep(Duration::from_millis(100));
        self.left = true;
        self.shut();
    }

    /// Drops the control connection without a goodbye, as a crash would:
    /// the broker publishes the will. For tests of failure handling.
    pub fn vanish(mut self) {
        self.left = true;
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn shut(&mut self) {
        self.client.disconnect();
        std::thread::sleep(Duration::from_millis(50));
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if !self.left && self.thread.is_some() {
            // Dropped without leave(): still leave cleanly, so no stale
            // presence stays behind.
            let topic = presence_topic(&self.cluster, &self.me.id);
            let _ = self.client.try_publish(&topic, 1, true, Vec::new());
            std::thread::sleep(Duration::from_millis(100));
            self.shut();
        }
    }
}

fn announce(client: &Client, topic: &str, me: &Presence) {
    let body = serde_json::to_vec(me).unwrap_or_default();
    if !client.try_publish(topic, 1, true, body) {
        tracing::warn!(%topic, "could not queue the presence message");
    }
}

/// [`announce`], waiting for room in the client's queue: for the threads
/// that may wait (never the connection's own). After a reconnect the queue
/// can be full of what waited for the broker, and a presence that is not
/// sent leaves the other peers on a view this peer no longer has.
fn announce_waiting(client: &Client, topic: &str, me: &Presence) {
    let body = serde_json::to_vec(me).unwrap_or_default();
    if let Err(e) = client.publish(topic, 1, true, body) {
        tracing::warn!(%topic, error = %e, "could not send the presence message");
    }
}

/// What the connection thread's handler works with.
struct Ctx<'a> {
    shared: &'a Shared,
    client: &'a Client,
    events: &'a Sender<MemberEvent>,
    control: &'a Sender<(String, Vec<u8>)>,
    controls: &'a (String, String),
    me: &'a Mutex<Presence>,
    topic: &'a str,
    filter: &'a str,
    probe: &'a str,
    announced: &'a AtomicBool,
}

fn on_event(ev: Ev, c: &Ctx) -> bool {
    match ev {
        Ev::Connected { .. } => {
            // A new incarnation after a reconnect: the others (and this
            // peer) see a new member list even if they never saw the will.
            let me = {
                let mut me = c.me.lock().unwrap_or_else(|e| e.into_inner());
                if c.announced.load(Ordering::SeqCst) {
                    me.incarnation = fastrand::u64(..);
                }
                me.clone()
            };
            // Subscribing waits for room in the client's queue, which only
            // this (the connection's) thread empties: do it from another.
            let client = c.client.clone();
            let filters = [
                c.filter.to_string(),
                c.controls.0.clone(),
                c.controls.1.clone(),
                c.probe.to_string(),
            ];
            let (probe, topic) = (c.probe.to_string(), c.topic.to_string());
            let announce_too = c.announced.load(Ordering::SeqCst);
            let _ = std::thread::Builder::new()
                .name("rivulet-members-sub".into())
                .spawn(move || {
                    for f in &filters {
                        if let Err(e) = client.subscribe(f, 1) {
                            tracing::warn!(error = %e, "cannot subscribe to the cluster's presence topics");
                            return;
                        }
                    }
                    // Arrives after the retained presences: then the list
                    // is whole.
                    let _ = client.publish(&probe, 1, false, b"probe".to_vec());
                    if announce_too {
                        announce_waiting(&client, &topic, &me);
                    }
                });
        }
        Ev::Message { topic, payload, .. } => {
            let mut v = c.shared.view.lock().unwrap_or_else(|e| e.into_inner());
            if topic == c.probe {
                v.synced = true;
            } else if topic == c.controls.0 || topic == c.controls.1 {
                if topic == c.controls.0 {
                    v.decision = Some(payload.to_vec());
                }
                let _ = c.control.send((topic, payload.to_vec()));
            } else if let Some(id) = topic.rsplit('/').next() {
                if payload.is_empty() {
                    if v.members.remove(id).is_some() {
                        let _ = c.events.send(MemberEvent::Left(id.to_string()));
                    }
                } else {
                    match serde_json::from_slice::<Presence>(&payload) {
                        Ok(p) if p.id == id => {
                            if v.members.get(id) != Some(&p) {
                                v.members.insert(id.to_string(), p.clone());
                                let _ = c.events.send(MemberEvent::Joined(p));
                            }
                        }
                        _ => tracing::warn!(%topic, "ignoring a presence message that is not one"),
                    }
                }
            }
            drop(v);
            c.shared.changed.notify_all();
        }
        Ev::Disconnected { reason, .. } => {
            let mut v = c.shared.view.lock().unwrap_or_else(|e| e.into_inner());
            v.error = Some(reason);
            drop(v);
            c.shared.changed.notify_all();
        }
        _ => {}
    }
    true
}
