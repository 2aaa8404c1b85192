//! Running a pipeline as one peer of a cluster.
//!
//! The peer joins the membership ([`super::membership`]) and then runs one
//! **view** after another: a view is the member list (ids and incarnations)
//! once it has been stable for a moment. For each view the peer
//! 1. settles its state file on the cluster's last global checkpoint (the
//!    decision retained on the broker): applies that checkpoint's pending
//!    deltas, drops deltas of checkpoints that never completed, and takes
//!    a whole snapshot from another peer when it lacks the checkpoint;
//! 2. connects a link to every other member (the lower id dials);
//! 3. restores the key groups it owns in this view from the checkpoint,
//!    rewinds its source's journal to its own position there, and runs the
//!    dataflow ([`crate::exec::peer`]);
//! 4. coordinates checkpoints while the view lasts: its part of checkpoint
//!    `n` (a delta) goes to every peer, which keeps it pending; a peer that
//!    holds every member's delta of `n` reports `ready`; a peer that sees
//!    every member ready publishes the decision (retained); every peer
//!    applies `n` when the broker delivers the decision, and only then
//!    trims its journal.
//!
//! Any change of the member list (a join, a leave, a crash, a restart)
//! ends the view: the run stops without firing anything, and the next view
//! starts again from the last global checkpoint. Results published since
//! that checkpoint are published again (outputs are at-least-once, state
//! exactly-once, as in a single process after a crash).

use super::assign::PeerTable;
use super::link::{Identity, Link, Wire};
use super::membership::{control_topics, JoinOptions, MemberEvent, Membership, Presence};
use super::tls::PeerTls;
use crate::config::{ConfigError, Overrides, PeersSpec, ValidPipeline};
use crate::exec::exchange::{Doorbell, InputSource};
use crate::exec::peer::{PeerCheckpoint, PeerRestored, PeerRun};
use crate::exec::{RunError, RunOptions, RunStats};
use crate::partition::KeyGroup;
use crate::sources::CheckpointHook;
use crate::state::global::{Delta, Mark, Snapshot};
use crate::state::{StateError, StateStore};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames in flight per link and destination.
const WINDOW: u32 = 8;
/// How long the member list must stay unchanged to make a view.
const SETTLE: Duration = Duration::from_millis(400);
/// How long connecting the links of a view may take before the peer looks
/// at the member list again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a link may be down while its peer is still a member before
/// this peer forces a new view.
const LINK_GRACE: Duration = Duration::from_secs(3);
/// A leaving peer's last checkpoint comes at least this long after it
/// unsubscribed (messages already on their way arrive meanwhile).
const DRAIN_LINGER: Duration = Duration::from_secs(1);
/// How long a leaving peer waits for its last checkpoint.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a peer that lacks the last checkpoint waits for a snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(20);
/// In `state.dir`: the peers that may hold input no global checkpoint
/// holds yet, as this peer last knew them ([`Peer::remember_members`]).
const MEMBERS_FILE: &str = "cluster-members.json";

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Membership(#[from] super::membership::MembershipError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    State(#[from] StateError),
    /// A setting that cannot work (exit 2): an address in use, bad TLS files.
    #[error("{0}")]
    Setup(String),
}

/// The retained decision: checkpoint `id` of `view` is global.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Decision {
    id: u64,
    view: u64,
    members: Vec<String>,
    /// Peers the view waited for ([`Peer::hold`]): a peer that restarts
    /// learns from here whom to wait for.
    #[serde(default)]
    missing: Vec<String>,
}

/// A peer holds every member's delta of checkpoint `id`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ready {
    peer: String,
    id: u64,
    view: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The members written by [`Peer::remember_members`] (none when the file
/// is missing or unreadable: a peer that never ran a view).
fn remembered_members(state_dir: &Path) -> Vec<String> {
    let path = state_dir.join(MEMBERS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "the remembered member list is unreadable; ignored");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// The view of a member list: a hash of ids and incarnations, so a peer
/// that restarted makes a new view even with the same ids.
pub fn view_of(members: &[Presence]) -> u64 {
    let mut parts: Vec<String> = members
        .iter()
        .map(|p| format!("{}#{:x}", p.id, p.incarnation))
        .collect();
    parts.sort();
    xxhash_rust::xxh3::xxh3_64(parts.join(",").as_bytes())
}

/// What the acceptor thread needs to shake hands in the current view.
type Current = Arc<Mutex<Option<(Identity, Arc<Doorbell>)>>>;

/// TLS handshakes that failed on this peer's links: how many, and the
/// last reason.
type TlsFailures = Arc<Mutex<(usize, String)>>;

fn tls_failure(e: &super::link::LinkError) -> bool {
    e.to_string().contains("TLS handshake")
}

/// How long a peer whose every link fails its TLS handshake keeps trying
/// before it stops (exit 2).
const TLS_GIVE_UP: Duration = Duration::from_secs(4);

/// Runs `valid` (which has a `peers:` section) as one peer until
/// `opts.shutdown` is set; then leaves the cluster cleanly.
pub fn run(valid: &ValidPipeline, file: &str, opts: RunOptions) -> Result<RunStats, PeerError> {
    let spec = valid
        .peers
        .clone()
        .ok_or_else(|| PeerError::Setup(format!("{file} has no `peers:` section")))?;
    let state_dir = valid
        .state_dir
        .clone()
        .ok_or_else(|| PeerError::Setup(format!("{file}: peer mode needs `state:`")))?;
    let tls = match &spec.tls {
        Some((ca, cert, key)) => Some(
            PeerTls::from_files(ca, cert, key)
                .map_err(|e| PeerError::Setup(format!("peers.tls: {e}")))?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(spec.listen).map_err(|e| {
        PeerError::Setup(format!(
            "peers.listen {}: cannot listen there: {e}",
            spec.listen
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| PeerError::Setup(format!("peers.listen {}: {e}", spec.listen)))?;
    let fingerprint = valid.peer_fingerprint();
    let incarnation = fastrand::u64(..);
    let broker = valid.source_broker().map_err(PeerError::Setup)?;
    let advertise = advertised(&spec, &broker);
    let membership = Membership::join(JoinOptions {
        cluster: spec.cluster.clone(),
        me: Presence {
            id: spec.id.clone(),
            addr: advertise.clone(),
            fingerprint: fingerprint.clone(),
            incarnation,
            version: env!("CARGO_PKG_VERSION").into(),
            leaving: false,
        },
        endpoint: broker,
        keep_alive: Duration::from_millis(spec.keep_alive_ms as u64),
    })?;
    tracing::info!(cluster = %spec.cluster, peer = %spec.id, listen = %spec.listen, %advertise, "joined the cluster");

    let current: Current = Arc::new(Mutex::new(None));
    let tls_failures: TlsFailures = Arc::new(Mutex::new((0, String::new())));
    let (accepted_tx, accepted) = channel::<Link>();
    let accepting = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let current = current.clone();
        let tls_failures = tls_failures.clone();
        let stop = accepting.clone();
        std::thread::Builder::new()
            .name("rivulet-peer-accept".into())
            .spawn(move || accept_loop(listener, current, accepted_tx, stop, tls_failures))
            .map_err(|e| PeerError::Setup(format!("cannot start a thread: {e}")))?
    };
    let remembered = remembered_members(Path::new(&state_dir));
    let mut peer = Peer {
        valid,
        file,
        spec,
        fingerprint,
        tls,
        state_dir: std::path::PathBuf::from(state_dir),
        membership,
        current,
        accepted,
        tls_failures,
        tls_trouble: None,
        leaving: None,
        left_cleanly: false,
        opts,
        decision: None,
        departed: BTreeMap::new(),
        last_members: remembered,
        gone: BTreeSet::new(),
        left: BTreeSet::new(),
        totals: RunStats::default(),
    };
    let result = peer.views();
    let Peer {
        membership,
        current,
        ..
    } = peer;
    if let Ok(mut c) = current.lock() {
        *c = None;
    }
    membership.leave();
    accepting.store(true, Ordering::SeqCst);
    let _ = acceptor.join();
    result
}

/// The address other peers dial: `peers.advertise` when set, else the
/// listen address when it is a specific one, else the address this machine
/// reaches the broker from (with the listen port), which the other peers,
/// clients of the same broker, can reach too. A host name is not used: a
/// container's resolves only inside it, and many LANs resolve none.
fn advertised(spec: &PeersSpec, broker: &crate::mqtt::Endpoint) -> String {
    use std::net::ToSocketAddrs;
    if !spec.advertise_derived {
        return spec.advertise.clone();
    }
    if !spec.listen.ip().is_unspecified() {
        return spec.listen.to_string();
    }
    // The broker may not resolve yet (a container starting next to it):
    // try for a while, as joining would.
    let reach = || {
        let to = (broker.host.as_str(), broker.port)
            .to_socket_addrs()
            .ok()?
            .next()?;
        let s =
            std::net::UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        s.connect(to).ok()?;
        s.local_addr().ok()
    };
    let mut local = reach();
    for _ in 0..60 {
        if local.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        local = reach();
    }
    match local {
        Some(a) => {
            let addr = std::net::SocketAddr::new(a.ip(), spec.listen.port()).to_string();
            tracing::debug!(%addr, "advertising the address this peer reaches the broker from");
            addr
        }
        None => {
            tracing::warn!(advertise = %spec.advertise, broker = %broker.url, "cannot tell the address this peer reaches the broker from: advertising the host name (set peers.advertise)");
            spec.advertise.clone()
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    current: Current,
    to: Sender<Link>,
    stop: Arc<AtomicBool>,
    tls_failures: TlsFailures,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                let me = current.lock().ok().and_then(|c| c.clone());
                let Some((me, bell)) = me else {
                    // Between views: the dialer tries again.
                    continue;
                };
                match Link::serve(stream, from, &me, &[bell], WINDOW) {
                    Ok(link) => {
                        if to.send(link).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if tls_failure(&e) {
                            tracing::warn!(error = %e, "a peer link failed its TLS handshake");
                            if let Ok(mut f) = tls_failures.lock() {
                                f.0 += 1;
                                f.1 = e.to_string();
                            }
                        } else {
                            tracing::debug!(error = %e, "refused a peer link");
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting peer links");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Everything a peer keeps across views.
struct Peer<'a> {
    valid: &'a ValidPipeline,
    file: &'a str,
    spec: PeersSpec,
    fingerprint: String,
    tls: Option<PeerTls>,
    state_dir: std::path::PathBuf,
    membership: Membership,
    current: Current,
    accepted: Receiver<Link>,
    tls_failures: TlsFailures,
    /// Since when every link of this peer fails its TLS handshake.
    tls_trouble: Option<Instant>,
    /// Leaving (SIGTERM): since when, and the first checkpoint id that
    /// holds everything this peer read (see [`Peer::quitting`]).
    leaving: Option<(Instant, u64)>,
    /// The clean leave is done (or there was nobody to leave).
    left_cleanly: bool,
    opts: RunOptions,
    /// The last decision seen (retained or live).
    decision: Option<Decision>,
    /// Peers of the last checkpoint that are not in the view, with the
    /// time until which the view waits for them ([`Peer::hold`]).
    departed: BTreeMap<String, Instant>,
    /// The members of the previous view (they may have read input that no
    /// global checkpoint holds yet).
    last_members: Vec<String>,
    /// Peers waited for until `failure_timeout` passed: not waited for
    /// again until they are back.
    gone: BTreeSet<String>,
    /// Peers that announced a clean leave: not waited for.
    left: BTreeSet<String>,
    totals: RunStats,
}

/// How a view ended.
enum Ended {
    /// The member list changed: start the next view.
    Changed,
    /// Shutdown was asked for.
    Stopped,
    /// The source ended (a bounded input; not in normal peer use).
    Finished,
}

impl Peer<'_> {
    fn stopping(&self) -> bool {
        self.opts.shutdown.load(Ordering::SeqCst)
    }

    /// Shutdown was asked for and this peer is not (or no longer) leaving
    /// cleanly: a clean leave (begun at the first look after the signal)
    /// goes on through view changes until its last checkpoint is global or
    /// [`DRAIN_TIMEOUT`] passes.
    fn quitting(&mut self) -> bool {
        if !self.stopping() {
            return false;
        }
        if self.leaving.is_none() && !self.left_cleanly {
            // No new input from here; the first checkpoint after the
            // messages on their way have arrived holds all this peer read.
            let after_ms = now_ms() + DRAIN_LINGER.as_millis() as u64;
            let every = self.checkpoint_every_ms().max(1);
            self.leaving = Some((Instant::now(), after_ms.div_ceil(every)));
            tracing::info!("leaving: taking no new input, waiting for a last global checkpoint");
        }
        self.leaving
            .is_none_or(|(since, _)| since.elapsed() > DRAIN_TIMEOUT)
    }

    /// Runs views until shutdown.
    fn views(&mut self) -> Result<RunStats, PeerError> {
        if let Some(d) = self.membership.retained_decision() {
            self.note_decision(&d);
        }
        loop {
            if self.quitting() {
                if self.leaving.is_some() {
                    tracing::warn!("leaving without a last global checkpoint (the others wait for this peer up to their failure_timeout)");
                }
                let mut s = self.totals.clone();
                s.stopped = true;
                return Ok(s);
            }
            let Some(members) = self.wait_for_view() else {
                continue;
            };
            match self.view(&members)? {
                Ended::Changed => continue,
                Ended::Stopped => {
                    let mut s = self.totals.clone();
                    s.stopped = true;
                    return Ok(s);
                }
                Ended::Finished => return Ok(self.totals.clone()),
            }
        }
    }

    fn note_decision(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        match serde_json::from_slice::<Decision>(payload) {
            // The newest wins (ids grow across views).
            Ok(d) => {
                if self.decision.as_ref().is_none_or(|k| d.id >= k.id) {
                    self.decision = Some(d);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring an unreadable checkpoint decision"),
        }
    }

    /// Waits until the member list (with this peer in it) has not changed
    /// for [`SETTLE`]; `None` on shutdown.
    fn wait_for_view(&mut self) -> Option<Vec<Presence>> {
        let me = self.spec.id.clone();
        let mut last = Vec::new();
        let mut since = Instant::now();
        loop {
            if self.quitting() {
                return None;
            }
            self.member_events(None);
            self.drain_control();
            let members = self.membership.members();
            let ours: Vec<Presence> = members
                .into_iter()
                .filter(|p| p.fingerprint == self.fingerprint)
                .collect();
            let key: Vec<(String, u64)> =
                ours.iter().map(|p| (p.id.clone(), p.incarnation)).collect();
            if key != last {
                last = key;
                since = Instant::now();
            } else if since.elapsed() >= SETTLE && ours.iter().any(|p| p.id == me) {
                return Some(ours);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Takes the membership's events: notes peers leaving cleanly, and
    /// whether the member list differs from `key` (any event, without one).
    fn member_events(&mut self, key: Option<&[(String, u64)]>) -> bool {
        let mut changed = false;
        while let Ok(ev) = self.membership.events().try_recv() {
            match ev {
                MemberEvent::Joined(p) => {
                    if p.leaving {
                        self.left.insert(p.id.clone());
                    } else {
                        self.left.remove(&p.id);
                    }
                    changed |= key.is_none_or(|k| !k.contains(&(p.id.clone(), p.incarnation)));
                }
                MemberEvent::Left(_) => changed = true,
            }
        }
        changed
    }

    fn checkpoint_every_ms(&self) -> u64 {
        self.valid.checkpoint_interval.unwrap_or(10_000).max(1) as u64
    }

    /// Reads the control topics between views: only decisions matter then.
    fn drain_control(&mut self) {
        let (decision_topic, _) = control_topics(&self.spec.cluster);
        let msgs: Vec<(String, Vec<u8>)> = self.membership.control().try_iter().collect();
        for (topic, payload) in msgs {
            if topic == decision_topic {
                self.note_decision(&payload);
            }
        }
    }

    /// Runs one view to its end.
    /// The view and assignment this peer now runs, for metrics.
    fn count_view(&self, table: &PeerTable, me: usize) {
        use crate::metrics::names;
        let m = &self.opts.metrics;
        let low48 = |v: u64| (v & ((1 << 48) - 1)) as i64;
        let labels = [("pipeline", self.valid.name.as_str())];
        m.counter(names::PEER_VIEWS, "views this peer has started", &labels)
            .add(1);
        m.gauge(
            names::PEER_VIEW,
            "the membership view (low 48 bits of its id)",
            &labels,
        )
        .set(low48(table.epoch()));
        m.gauge(
            names::PEER_ASSIGNMENT,
            "the key-group assignment epoch (low 48 bits)",
            &labels,
        )
        .set(low48(table.assignment().map_or(0, |a| a.epoch())));
        m.gauge(names::PEER_MEMBERS, "members of the view", &labels)
            .set(table.members().len() as i64);
        m.gauge(names::PEER_GROUPS, "key groups this peer owns", &labels)
            .set(table.owned_by(me).len() as i64);
    }

    fn view(&mut self, members: &[Presence]) -> Result<Ended, PeerError> {
        let view = view_of(members);
        let ids: Vec<String> = members.iter().map(|p| p.id.clone()).collect();
        let table = PeerTable::compute(view, &ids);
        let Some(me) = table.index_of(&self.spec.id) else {
            return Ok(Ended::Changed);
        };
        let Some(assignment) = table.assignment() else {
            return Err(PeerError::Setup("no assignment for the view".into()));
        };
        self.count_view(&table, me);
        tracing::info!(
            view = format!("{view:016x}"),
            members = ?table.members(),
            owns = table.owned_by(me).len(),
            results_so_far = self.opts.metrics.sum(crate::metrics::names::SINK_RECORDS, &[("sink", "main")]),
            "starting a view"
        );
        let pipeline = self
            .valid
            .build(self.file, &Overrides::default())?
            .build()
            .map_err(|e| {
                PeerError::Setup(format!("{}: cannot build the pipeline: {e}", self.file))
            })?;
        let decls = pipeline.state_decls();
        let (mut store, _) = StateStore::open(&self.state_dir, &decls, false)?;
        self.drain_control();

        // Links: the lower id dials, the other accepts.
        let bell = Arc::new(Doorbell::default());
        let (ctl_tx, ctl_rx) = channel::<(String, Wire)>();
        let missing = self.expect(&ids, &[]);
        let identity = Identity {
            cluster: self.spec.cluster.clone(),
            peer: self.spec.id.clone(),
            fingerprint: self.fingerprint.clone(),
            view,
            tls: self.tls.clone(),
            missing,
            decision: self
                .decision
                .as_ref()
                .and_then(|d| serde_json::to_vec(d).ok())
                .unwrap_or_default(),
            control: Some(ctl_tx),
        };
        if let Ok(mut c) = self.current.lock() {
            *c = Some((identity.clone(), bell.clone()));
        }
        let Some(links) = self.connect(members, &table, &identity, &bell)? else {
            return Ok(if self.quitting() {
                Ended::Stopped
            } else {
                Ended::Changed
            });
        };
        let others: Vec<Arc<Link>> = links.iter().flatten().cloned().collect();
        let told: Vec<String> = others.iter().flat_map(|l| l.missing.clone()).collect();
        let missing = self.expect(&ids, &told);
        self.last_members = ids.clone();
        self.remember_members();

        // Every member now knows every member's last decision: all settle
        // on the newest, applying its deltas if they are pending here, or
        // taking it from a peer that has it.
        for l in &others {
            self.note_decision(&l.decision);
        }
        self.settle(&mut store)?;
        let want = self.decision.as_ref().map(|d| Mark {
            id: d.id,
            view: d.view,
        });
        if want.is_some()
            && store.global_mark()? != want
            && !self.fetch_snapshot(&mut store, want, &others, &ctl_rx)?
        {
            abort(&others);
            return Ok(Ended::Changed);
        }

        // What this peer starts from: its groups of the checkpoint.
        let positions = store.positions()?;
        drop(store);
        let (store, restored) = StateStore::open(&self.state_dir, &decls, false)?;
        let restored = restored.map(|r| {
            let mine = |k: &[u8]| assignment.owner(KeyGroup::of_key(k)) == me;
            PeerRestored {
                keys: r
                    .keys
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| mine(k))
                    .collect(),
                watermark: r.watermark,
                input_watermark: r.input_watermark.filter(|&w| w != i64::MIN),
                position: positions.get(&self.spec.id).cloned(),
            }
        });
        if let Some(r) = &restored {
            tracing::debug!(
                keys = r.keys.len(),
                position = ?r.position,
                input_watermark = ?r.input_watermark,
                mark = ?self.decision.as_ref().map(|d| d.id),
                "restoring"
            );
        }
        let inputs: Vec<Box<dyn InputSource>> = others
            .iter()
            .filter_map(|l| l.take_input(0))
            .map(|i| Box::new(i) as Box<dyn InputSource>)
            .collect();
        let hold_until = self.hold_until();
        let (cp_tx, cp_rx) = channel::<PeerCheckpoint>();
        let drain = Arc::new(AtomicBool::new(false));
        let source_hook: Arc<Mutex<Option<CheckpointHook>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let run_opts = RunOptions {
            shutdown: stop.clone(),
            metrics: self.opts.metrics.clone(),
            ..Default::default()
        };
        let peer_run = PeerRun {
            me,
            assignment,
            links: links.clone(),
            inputs,
            bell,
            restored,
            hold_until,
            drain: drain.clone(),
            checkpoints: cp_tx,
            source_hook: source_hook.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("rivulet-peer-run".into())
            .spawn(move || pipeline.run_peer(run_opts, peer_run))
            .map_err(|e| PeerError::Setup(format!("cannot start a thread: {e}")))?;

        let mut coord = Coordinator {
            me: self.spec.id.clone(),
            view,
            ids: ids.clone(),
            store,
            links: others.clone(),
            deltas: BTreeMap::new(),
            readies: BTreeMap::new(),
            positions: BTreeMap::new(),
            decided: BTreeSet::new(),
            missing,
            applied: None,
            broken: false,
            source_hook,
        };
        if self.leaving.is_some() {
            // Still leaving, in a new view: still no new input.
            drain.store(true, Ordering::SeqCst);
        }
        let members_key: Vec<(String, u64)> = members
            .iter()
            .map(|p| (p.id.clone(), p.incarnation))
            .collect();
        // Since when a link is down while the broker still sees its peer.
        let mut link_down: Option<Instant> = None;
        let mut rejoined = false;
        let mut hold_until = hold_until;
        let ended = loop {
            if hold_until.is_some_and(|t| Instant::now() >= t) {
                hold_until = None;
                let gave_up: Vec<String> = self.departed.keys().cloned().collect();
                tracing::warn!(
                    peers = ?gave_up,
                    "gave up waiting for a peer: event time goes on without it; its input since the last checkpoint will be late if it comes back"
                );
                self.departed.clear();
                self.gone.extend(gave_up);
            }
            if self.quitting() {
                break Ended::Stopped;
            }
            if let Some((_, last)) = self.leaving {
                drain.store(true, Ordering::SeqCst);
                if coord.applied.is_some_and(|id| id >= last) {
                    self.membership.announce_leaving();
                    tracing::info!(
                        checkpoint = coord.applied,
                        "left with every event read in a global checkpoint"
                    );
                    self.leaving = None;
                    self.left_cleanly = true;
                    break Ended::Stopped;
                }
                if ids.len() < 2 {
                    // Alone: nobody to hand anything to.
                    self.leaving = None;
                    self.left_cleanly = true;
                    break Ended::Stopped;
                }
            }
            if handle.is_finished() {
                break Ended::Finished;
            }
            // A change of the member list ends the view.
            let changed = self.member_events(Some(&members_key));
            if changed {
                tracing::info!(
                    "the member list changed: rolling back to the last global checkpoint"
                );
                break Ended::Changed;
            }
            // A link that failed without a change of the member list (a
            // network fault between two peers): a new view starts over.
            if others.iter().any(|l| l.is_closed()) {
                let since = *link_down.get_or_insert_with(Instant::now);
                if !rejoined && since.elapsed() > LINK_GRACE {
                    tracing::warn!("a peer link failed while the broker still sees its peer: starting a new view");
                    self.membership.rejoin();
                    rejoined = true;
                }
            }
            let mut idle = true;
            while let Ok(cp) = cp_rx.try_recv() {
                idle = false;
                coord.local(cp, &self.membership, &self.spec.cluster);
            }
            while let Ok((from, msg)) = ctl_rx.try_recv() {
                idle = false;
                coord.remote(&from, msg, &self.membership, &self.spec.cluster);
            }
            let msgs: Vec<(String, Vec<u8>)> = self.membership.control().try_iter().collect();
            for (topic, payload) in msgs {
                idle = false;
                // Only this view's: a late one of an earlier view must not
                // move the checkpoint this view restored from.
                if let Some(d) =
                    coord.control(&topic, &payload, &self.membership, &self.spec.cluster)
                {
                    if d.view == view {
                        self.decision = Some(d);
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        stop.store(true, Ordering::SeqCst);
        abort(&others);
        drop(links);
        drop(others);
        let result = handle
            .join()
            .map_err(|_| RunError::Internal("the peer's run panicked".into()))?;
        drop(coord);
        let ended = match (ended, result) {
            (Ended::Finished, Err(e)) => {
                // The run stopped by itself: a link failed under it, or
                // its source or a sink did. Every peer starts a new view
                // (this one's new incarnation tells them), from the last
                // global checkpoint.
                tracing::warn!(error = %e, "this peer's run stopped; starting a new view");
                std::thread::sleep(Duration::from_millis(500));
                self.membership.rejoin();
                Ended::Changed
            }
            (ended, Ok(s)) => {
                self.totals.events += s.events;
                self.totals.results += s.results;
                self.totals.late += s.late;
                self.totals.dead_letters += s.dead_letters;
                self.totals.filtered += s.filtered;
                ended
            }
            // An aborted run ends with its channels cut: not an error.
            (ended, Err(e)) => {
                tracing::debug!(error = %e, "the view's run ended");
                ended
            }
        };
        Ok(ended)
    }

    /// Keeps on disk, before this view's source reads anything, the peers
    /// that may hold input no global checkpoint holds yet: this view's
    /// members and the departed peers it waits for. A peer that restarts
    /// reads them back ([`remembered_members`]), so that it still waits for
    /// them even before the first global checkpoint (which would tell it
    /// in its decision) and when every survivor restarted too.
    fn remember_members(&self) {
        let mut ids: BTreeSet<&String> = self.last_members.iter().collect();
        ids.extend(self.departed.keys());
        let path = self.state_dir.join(MEMBERS_FILE);
        let tmp = self.state_dir.join(format!("{MEMBERS_FILE}.tmp"));
        let written = serde_json::to_vec(&ids)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&json)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the member list on disk: after a restart this peer may not wait for peers that hold input");
        }
    }

    /// Notes the peers this view waits for, before event time passes the
    /// last global checkpoint: a peer of that checkpoint, of the previous
    /// view, or one that another peer (`told`) or the decision waits for,
    /// while it is missing (crashed, rebooting, stopped, or not started yet
    /// after a cold start) and `failure_timeout` has not passed since it
    /// was first missed. Its journal may hold input from after the
    /// checkpoint; firing windows without it would make that input late
    /// when it comes back. Returns the peers waited for.
    fn expect(&mut self, ids: &[String], told: &[String]) -> Vec<String> {
        let timeout = Duration::from_millis(self.spec.failure_timeout_ms.max(0) as u64);
        let now = Instant::now();
        let mut expected: Vec<String> = told.to_vec();
        if let Some(d) = &self.decision {
            expected.extend(d.members.iter().cloned());
            expected.extend(d.missing.iter().cloned());
        }
        expected.extend(self.last_members.iter().cloned());
        self.departed.retain(|id, _| !ids.contains(id));
        self.gone.retain(|id| !ids.contains(id));
        for id in expected {
            if !ids.contains(&id) && !self.gone.contains(&id) && !self.left.contains(&id) {
                self.departed.entry(id).or_insert(now + timeout);
            }
        }
        let expired: Vec<String> = self
            .departed
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::warn!(peer = %id, "gave up waiting for a peer: its input since the last checkpoint will be late if it comes back");
            self.departed.remove(&id);
            self.gone.insert(id);
        }
        tracing::debug!(
            ?ids,
            ?told,
            last = ?self.last_members,
            decision = ?self.decision.as_ref().map(|d| (&d.members, &d.missing)),
            gone = ?self.gone,
            left = ?self.left,
            departed = ?self.departed.keys().collect::<Vec<_>>(),
            "peers to wait for"
        );
        self.departed.keys().cloned().collect()
    }

    /// Until when this view waits (see [`Peer::expect`]).
    fn hold_until(&self) -> Option<Instant> {
        if !self.departed.is_empty() {
            tracing::info!(
                missing = ?self.departed.keys().collect::<Vec<_>>(),
                "waiting for peers of the last checkpoint before event time passes it"
            );
        }
        self.departed.values().max().copied()
    }

    /// Settles the state file on the last decision: applies its pending
    /// deltas when they are here, drops every other pending delta.
    fn settle(&mut self, store: &mut StateStore) -> Result<(), PeerError> {
        if let Some(d) = &self.decision {
            let mark = Mark {
                id: d.id,
                view: d.view,
            };
            if store.global_mark()? != Some(mark) && store.apply_pending(mark, &d.members)? {
                tracing::info!(
                    checkpoint = d.id,
                    "applied the last global checkpoint, kept pending here"
                );
            }
        }
        store.discard_pending()?;
        Ok(())
    }

    /// Connects a link to every other member; `None` if the view changed
    /// or the time ran out first.
    fn connect(
        &mut self,
        members: &[Presence],
        table: &PeerTable,
        me: &Identity,
        bell: &Arc<Doorbell>,
    ) -> Result<Option<Vec<Option<Arc<Link>>>>, PeerError> {
        let mut links: Vec<Option<Arc<Link>>> = vec![None; table.members().len()];
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut next_dial = Instant::now();
        let count = table.members().len() - 1;
        let mut got = 0usize;
        let mut tls_seen = self.tls_failures.lock().map(|f| f.0).unwrap_or(0);
        let mut last_tls = String::new();
        while got < count {
            if self.quitting() || Instant::now() > deadline {
                return Ok(None);
            }
            if self.member_events(None) {
                // Something changed: look at the member list again.
                return Ok(None);
            }
            // Every link failing its TLS handshake and none made: this
            // peer's certificate (or CA) is not the cluster's. It stops
            // rather than hold the cluster up.
            if let Ok(f) = self.tls_failures.lock() {
                if f.0 > tls_seen {
                    tls_seen = f.0;
                    last_tls = f.1.clone();
                }
            }
            if !last_tls.is_empty() && got == 0 {
                let since = *self.tls_trouble.get_or_insert_with(Instant::now);
                if since.elapsed() > TLS_GIVE_UP {
                    return Err(PeerError::Setup(format!(
                        "peers.tls: every other peer's link failed its TLS handshake, so this peer cannot join cluster `{}`: {last_tls}",
                        self.spec.cluster
                    )));
                }
            }
            while let Ok(link) = self.accepted.try_recv() {
                if link.view() != me.view {
                    continue;
                }
                if let Some(i) = table.index_of(&link.peer) {
                    if links[i].is_none() && link.peer < me.peer {
                        links[i] = Some(Arc::new(link));
                        got += 1;
                    }
                }
            }
            if Instant::now() >= next_dial {
                next_dial = Instant::now() + Duration::from_millis(200);
                for p in members {
                    let Some(i) = table.index_of(&p.id) else {
                        continue;
                    };
                    if p.id <= me.peer || links[i].is_some() {
                        continue;
                    }
                    match Link::dial(&p.addr, me, std::slice::from_ref(bell), WINDOW) {
                        Ok(link) => {
                            links[i] = Some(Arc::new(link));
                            got += 1;
                        }
                        Err(e) if tls_failure(&e) => {
                            tracing::warn!(peer = %p.id, error = %e, "a peer link failed its TLS handshake");
                            last_tls = e.to_string();
                        }
                        Err(e) => tracing::debug!(peer = %p.id, error = %e, "dialing a peer"),
                    }
                }
            }
            if got > 0 {
                self.tls_trouble = None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.tls_trouble = None;
        Ok(Some(links))
    }

    /// Asks the other peers for the whole checkpoint `want` and imports it
    /// from the first that has it; serves their requests meanwhile. When
    /// no peer has it (the cluster's files were lost or replaced), every
    /// peer settles on the newest checkpoint any of them holds, the same
    /// choice everywhere. `false`: not every peer answered in time (the
    /// view is tried again).
    fn fetch_snapshot(
        &mut self,
        store: &mut StateStore,
        want: Option<Mark>,
        others: &[Arc<Link>],
        ctl: &Receiver<(String, Wire)>,
    ) -> Result<bool, PeerError> {
        let Some(want) = want else {
            return Ok(true);
        };
        let view = others.first().map(|l| l.view()).unwrap_or_default();
        let mine = store.global_mark()?.unwrap_or_default();
        if others.is_empty() {
            tracing::warn!(
                checkpoint = want.id,
                "this peer lacks the cluster's last checkpoint and no other peer is here to give it: starting from what it has"
            );
            return Ok(true);
        }
        tracing::info!(
            checkpoint = want.id,
            "asking the other peers for the last global checkpoint"
        );
        for l in others {
            let _ = l.send_control(&Wire::SnapshotRequest { view });
        }
        let mut answers: BTreeMap<String, Snapshot> = BTreeMap::new();
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        while Instant::now() < deadline && !self.quitting() {
            if answers.len() == others.len() {
                // Nobody has it: the newest any peer holds.
                let best = answers.values().max_by_key(|s| s.mark);
                match best {
                    Some(s) if s.mark > mine => {
                        tracing::warn!(wanted = want.id, took = s.mark.id, "no peer holds the cluster's last checkpoint; taking the newest one there is");
                        store.import_snapshot(s)?;
                    }
                    _ => tracing::warn!(
                        wanted = want.id,
                        "no peer holds the cluster's last checkpoint; going on from this peer's own"
                    ),
                }
                return Ok(true);
            }
            let Ok((from, msg)) = ctl.recv_timeout(Duration::from_millis(50)) else {
                continue;
            };
            match msg {
                Wire::Snapshot { body, .. } => match postcard::from_bytes::<Snapshot>(&body) {
                    Ok(s) if s.mark == want => {
                        store.import_snapshot(&s)?;
                        tracing::info!(from = %from, keys = s.keys.iter().map(Vec::len).sum::<usize>(), "took the checkpoint");
                        return Ok(true);
                    }
                    Ok(s) => {
                        answers.insert(from, s);
                    }
                    Err(e) => tracing::warn!(from = %from, error = %e, "an unreadable snapshot"),
                },
                Wire::SnapshotRequest { .. } => serve_snapshot(store, &from, others, view),
                _ => {}
            }
        }
        Ok(false)
    }
}

/// Answers a snapshot request with this peer's last global checkpoint
/// (an empty one, mark 0, when it has none).
fn serve_snapshot(store: &StateStore, to: &str, links: &[Arc<Link>], view: u64) {
    let body = match store.export_snapshot().map(|s| postcard::to_stdvec(&s)) {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return tracing::warn!(error = %e, "cannot encode a snapshot"),
        Err(e) => return tracing::warn!(error = %e, "cannot read the checkpoint for a peer"),
    };
    if let Some(l) = links.iter().find(|l| l.peer == to) {
        if let Err(e) = l.send_control(&Wire::Snapshot { view, body }) {
            tracing::warn!(peer = %to, error = %e, "cannot send a snapshot");
        }
    }
}

fn abort(links: &[Arc<Link>]) {
    for l in links {
        l.abort();
    }
}

/// The checkpoints of one view.
struct Coordinator {
    me: String,
    view: u64,
    ids: Vec<String>,
    store: StateStore,
    links: Vec<Arc<Link>>,
    /// Checkpoint id → peers whose deltas are pending here.
    deltas: BTreeMap<u64, BTreeSet<String>>,
    /// Checkpoint id → peers that reported ready.
    readies: BTreeMap<u64, BTreeSet<String>>,
    /// This peer's source position in each checkpoint not yet applied.
    positions: BTreeMap<u64, Vec<u8>>,
    /// Checkpoints whose decision this peer published.
    decided: BTreeSet<u64>,
    /// The last checkpoint applied in this view.
    applied: Option<u64>,
    /// A part could not be kept: this view's checkpoints can no longer
    /// complete here (a new view is on its way).
    broken: bool,
    /// The peers this view waits for (told in each decision).
    missing: Vec<String>,
    source_hook: Arc<Mutex<Option<CheckpointHook>>>,
}

impl Coordinator {
    /// This peer's part of checkpoint `cp.id`.
    fn local(&mut self, cp: PeerCheckpoint, m: &Membership, cluster: &str) {
        let delta = Delta {
            mark: Mark {
                id: cp.id,
                view: self.view,
            },
            peer: self.me.clone(),
            position: cp.position.to_vec(),
            watermark: cp.watermark,
            input_watermark: cp.input_watermark,
            changes: cp
                .pending
                .keys
                .into_iter()
                .map(|((op, k), v)| (op, k.into_vec(), v))
                .collect(),
        };
        let body = match postcard::to_stdvec(&delta) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a checkpoint delta; starting a new view");
                self.broken = true;
                m.rejoin();
                return;
            }
        };
        if self.broken {
            return;
        }
        if let Err(e) = self.store.write_pending(&delta) {
            // Later deltas of this peer build on this one: without it no
            // later checkpoint of the view may complete. A new view rolls
            // every peer back to the last global checkpoint instead.
            tracing::error!(error = %e, "checkpoint failed: cannot keep this peer's part; starting a new view");
            self.broken = true;
            m.rejoin();
            return;
        }
        for l in &self.links {
            if let Err(e) = l.send_control(&Wire::Delta {
                view: self.view,
                body: body.clone(),
            }) {
                tracing::warn!(peer = %l.peer, error = %e, "cannot send a checkpoint delta");
            }
        }
        tracing::debug!(checkpoint = cp.id, changes = delta.changes.len(), position = ?delta.position, "this peer's part of a checkpoint");
        self.positions.insert(cp.id, delta.position);
        self.got_delta(cp.id, self.me.clone(), m, cluster);
    }

    /// A message from another peer's link.
    fn remote(&mut self, from: &str, msg: Wire, m: &Membership, cluster: &str) {
        match msg {
            Wire::Delta { body, .. } => {
                let d: Delta = match postcard::from_bytes(&body) {
                    Ok(d) => d,
                    Err(e) => {
                        return tracing::warn!(peer = %from, error = %e, "an unreadable checkpoint delta")
                    }
                };
                if d.peer != from || d.mark.view != self.view {
                    return tracing::warn!(peer = %from, "a checkpoint delta of another peer or view; dropped");
                }
                if let Err(e) = self.store.write_pending(&d) {
                    // As for this peer's own part: roll back, lose nothing.
                    tracing::error!(error = %e, "checkpoint failed: cannot keep a peer's part; starting a new view");
                    self.broken = true;
                    m.rejoin();
                    return;
                }
                self.got_delta(d.mark.id, d.peer, m, cluster);
            }
            Wire::SnapshotRequest { .. } => {
                serve_snapshot(&self.store, from, &self.links, self.view)
            }
            _ => {}
        }
    }

    fn got_delta(&mut self, id: u64, peer: String, m: &Membership, cluster: &str) {
        let got = self.deltas.entry(id).or_default();
        got.insert(peer);
        if got.len() == self.ids.len() && !self.broken {
            let (_, ready_topic) = control_topics(cluster);
            let body = serde_json::to_vec(&Ready {
                peer: self.me.clone(),
                id,
                view: self.view,
            })
            .unwrap_or_default();
            if !m.publish(&ready_topic, false, body) {
                tracing::warn!("cannot report a checkpoint ready: the broker connection is full");
            }
        }
    }

    /// A message on the cluster's control topics; returns a decision seen.
    fn control(
        &mut self,
        topic: &str,
        payload: &[u8],
        m: &Membership,
        cluster: &str,
    ) -> Option<Decision> {
        let (decision_topic, ready_topic) = control_topics(cluster);
        if topic == ready_topic {
            let r: Ready = serde_json::from_slice(payload).ok()?;
            if r.view != self.view || !self.ids.contains(&r.peer) {
                return None;
            }
            let got = self.readies.entry(r.id).or_default();
            got.insert(r.peer);
            if got.len() == self.ids.len() && self.decided.insert(r.id) {
                // Every peer holds every delta: the checkpoint is global.
                // Any peer may say so; the broker keeps the last word.
                let body = serde_json::to_vec(&Decision {
                    id: r.id,
                    view: self.view,
                    members: self.ids.clone(),
                    missing: self.missing.clone(),
                })
                .unwrap_or_default();
                if !m.publish(&decision_topic, true, body) {
                    tracing::warn!(
                        "cannot publish a checkpoint decision: the broker connection is full"
                    );
                }
            }
            return None;
        }
        if topic != decision_topic || payload.is_empty() {
            return None;
        }
        let d: Decision = serde_json::from_slice(payload).ok()?;
        if d.view == self.view {
            self.apply(d.id);
        }
        Some(d)
    }

    /// Checkpoint `id` is global: fold it into the state, trim the journal.
    fn apply(&mut self, id: u64) {
        let mark = Mark {
            id,
            view: self.view,
        };
        if self.store.global_mark().ok().flatten() == Some(mark) {
            return;
        }
        match self.store.apply_pending(mark, &self.ids) {
            Ok(true) => {
                tracing::debug!(checkpoint = id, "global checkpoint applied");
                self.applied = Some(id);
                let position = self.positions.remove(&id);
                self.positions.retain(|&k, _| k > id);
                self.deltas.retain(|&k, _| k > id);
                self.readies.retain(|&k, _| k > id);
                if let (Some(pos), Ok(hook)) = (position, self.source_hook.lock()) {
                    if let Some(hook) = hook.as_ref() {
                        hook(&pos);
                    }
                }
            }
            Ok(false) => tracing::warn!(checkpoint = id, "a decided checkpoint lacks deltas here"),
            Err(e) => {
                tracing::error!(checkpoint = id, error = %e, "cannot apply a global checkpoint")
            }
        }
    }
}
