//! What a run needs to be one peer of a cluster (the cluster layer,
//! [`crate::cluster::run`], sets it up for each view).
//!
//! In peer mode each stage has one worker. The parse worker's frames go to
//! the owner of their key groups: this peer's keyed worker through the
//! local exchange, another peer's through its link ([`PeerOutbox`]). The
//! keyed worker reads its own stream and one per other peer (a
//! [`super::exchange::MultiInbox`]), so its watermark is the minimum over
//! every peer's, and a checkpoint barrier is aligned across all of them.
//! Its part of each checkpoint goes to the cluster layer
//! ([`PeerCheckpoint`]), which makes it global.

use super::exchange::{Closed, Doorbell, InputSource, LocalOutbox, Outbox};
use crate::cluster::link::Link;
use crate::msg::Frame;
use crate::partition::Assignment;
use crate::sources::CheckpointHook;
use crate::state::Pending;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

/// The keyed state this peer starts from (its key groups only).
#[derive(Debug, Default)]
pub struct PeerRestored {
    pub keys: Vec<(Vec<u8>, Vec<u8>)>,
    pub watermark: i64,
    pub input_watermark: Option<i64>,
    /// This peer's source position at the checkpoint (`None`: it had none).
    pub position: Option<Vec<u8>>,
}

/// This peer's part of a checkpoint, once its keyed worker aligned the
/// barrier over every peer's stream and the outputs before it are written.
#[derive(Debug)]
pub struct PeerCheckpoint {
    pub id: u64,
    pub position: Arc<Vec<u8>>,
    pub watermark: i64,
    pub input_watermark: i64,
    /// The keys of this peer's groups changed since the last checkpoint.
    pub pending: Pending,
}

/// One view's run of a peer.
pub struct PeerRun {
    /// This peer's index among the view's members.
    pub me: usize,
    /// Key group → member index.
    pub assignment: Assignment,
    /// A link per member (`None` for this peer).
    pub links: Vec<Option<Arc<Link>>>,
    /// The links' inputs for the keyed worker, one per other member.
    pub inputs: Vec<Box<dyn InputSource>>,
    /// Rung by the links and the local exchange when a frame arrives for
    /// the keyed worker.
    pub bell: Arc<Doorbell>,
    pub restored: Option<PeerRestored>,
    /// Until when event time stays at the restored watermark: peers of
    /// the last checkpoint that are not in this view may come back with
    /// input from after it.
    pub hold_until: Option<std::time::Instant>,
    /// Set when this peer leaves the cluster: its source takes no new input.
    pub drain: Arc<std::sync::atomic::AtomicBool>,
    /// Where checkpoint parts go.
    pub checkpoints: Sender<PeerCheckpoint>,
    /// Filled by the run: trims the source's journal, called by the
    /// cluster layer with this peer's position once a checkpoint is global.
    pub source_hook: Arc<Mutex<Option<CheckpointHook>>>,
}

/// Frames to owners that are this peer (the local exchange) or others (a
/// link each).
pub struct PeerOutbox {
    me: usize,
    local: LocalOutbox,
    links: Vec<Option<Arc<Link>>>,
    /// Whether there is a keyed stage at all (else nothing is sent).
    keyed: bool,
}

impl PeerOutbox {
    pub fn new(me: usize, local: LocalOutbox, links: Vec<Option<Arc<Link>>>, keyed: bool) -> Self {
        PeerOutbox {
            me,
            local,
            links,
            keyed,
        }
    }
}

impl Outbox for PeerOutbox {
    fn owners(&self) -> usize {
        if self.keyed {
            self.links.len()
        } else {
            0
        }
    }

    fn send(&mut self, owner: usize, frame: Frame) -> Result<(), Closed> {
        if owner == self.me {
            return self.local.send(0, frame);
        }
        match self.links.get(owner) {
            Some(Some(link)) => link.send(0, frame).map_err(|_| Closed),
            _ => Err(Closed),
        }
    }
}
