//! The key-by edge: senders hand each owner of key groups its frame;
//! receivers take frames from every sender.
//!
//! [`Outbox`] and [`Inbox`] are what the parse stage and the keyed
//! operators see. This file has the in-process implementation, a bounded
//! channel from every sender to every receiver ([`local`]); peer mode adds
//! one that crosses TCP links. Either way memory stays bounded: a full
//! channel blocks the sender (backpressure), it never queues without end.
//!
//! **Inputs.** A receiver's frames come from one or more *logical inputs*,
//! each a stream with its own watermarks and barriers (the keyed stage
//! combines them with a [`crate::time::valve::WatermarkValve`] and aligns
//! barriers across them). The local senders are parallel instances of one
//! logical stream — the reader deals input batches to them in rotation — so
//! the local receiver takes their frames in the same rotation and so rebuilds
//! that stream in source order: one logical input, and results that do not
//! depend on the number of workers.

use crate::msg::Frame;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The receiving side went away (the run is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// Sends frames to owners of key groups.
pub trait Outbox: Send {
    /// Number of owners.
    fn owners(&self) -> usize;
    /// Sends one frame to an owner, waiting while its queue is full.
    fn send(&mut self, owner: usize, frame: Frame) -> Result<(), Closed>;
}

/// Receives frames from every sender.
pub trait Inbox: Send {
    /// Number of logical inputs (see the module docs).
    fn inputs(&self) -> usize;
    /// The next frame from an input not marked in `blocked` (an input that
    /// delivered a barrier the others have not), with the input's index;
    /// `None` once every sender is gone.
    fn recv(&mut self, blocked: &[bool]) -> Option<(usize, Frame)>;
}

/// The sending side of the local exchange, one per sender.
pub struct LocalOutbox {
    to: Vec<SyncSender<Frame>>,
    /// Rung after each frame, for receivers that wait on several inputs.
    bells: Vec<Option<Arc<Doorbell>>>,
}

/// The receiving side of the local exchange, one per owner.
pub struct LocalInbox {
    from: Vec<Receiver<Frame>>,
    /// The sender whose frame comes next in the rotation.
    next: usize,
}

/// The in-process exchange between `senders` and `receivers`, each channel
/// holding `capacity` frames.
pub fn local(
    senders: usize,
    receivers: usize,
    capacity: usize,
) -> (Vec<LocalOutbox>, Vec<LocalInbox>) {
    let mut outs: Vec<LocalOutbox> = (0..senders)
        .map(|_| LocalOutbox {
            to: Vec::new(),
            bells: vec![None; receivers],
        })
        .collect();
    let mut ins: Vec<LocalInbox> = (0..receivers)
        .map(|_| LocalInbox {
            from: Vec::new(),
            next: 0,
        })
        .collect();
    for out in outs.iter_mut() {
        for inbox in ins.iter_mut() {
            let (tx, rx) = sync_channel(capacity);
            out.to.push(tx);
            inbox.from.push(rx);
        }
    }
    (outs, ins)
}

impl Outbox for LocalOutbox {
    fn owners(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, owner: usize, frame: Frame) -> Result<(), Closed> {
        self.to[owner].send(frame).map_err(|_| Closed)?;
        if let Some(bell) = &self.bells[owner] {
            bell.ring();
        }
        Ok(())
    }
}

impl LocalOutbox {
    /// Rings `bell` after every frame sent to `owner` (whose inbox waits on
    /// several inputs).
    pub fn ring_on_send(&mut self, owner: usize, bell: Arc<Doorbell>) {
        self.bells[owner] = Some(bell);
    }
}

impl Inbox for LocalInbox {
    fn inputs(&self) -> usize {
        1
    }

    fn recv(&mut self, _blocked: &[bool]) -> Option<(usize, Frame)> {
        // One logical input: it is never blocked by another's barrier.
        let rx = self.from.get(self.next)?;
        let frame = rx.recv().ok()?;
        self.next = (self.next + 1) % self.from.len();
        Some((0, frame))
    }
}

/// Wakes a receiver that waits on several inputs when any of them has
/// something: producers ring after each frame, the receiver waits for a
/// ring newer than the last it saw.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    pub fn ring(&self) {
        if let Ok(mut n) = self.rung.lock() {
            *n = n.wrapping_add(1);
        }
        self.cv.notify_all();
    }

    /// The rings so far (to wait for a newer one).
    pub fn seen(&self) -> u64 {
        self.rung.lock().map(|n| *n).unwrap_or(0)
    }

    /// Waits until rung after `seen`, or `timeout` passed.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let Ok(n) = self.rung.lock() else {
            return;
        };
        if *n != seen {
            return;
        }
        let _ = self.cv.wait_timeout_while(n, timeout, |n| *n == seen);
    }
}

/// One input of a [`MultiInbox`]: a logical stream of frames.
pub trait InputSource: Send {
    /// A frame if one is there now; `Err` once the input has ended.
    fn try_next(&mut self) -> Result<Option<Frame>, Closed>;
}

impl InputSource for LocalInbox {
    fn try_next(&mut self) -> Result<Option<Frame>, Closed> {
        let Some(rx) = self.from.get(self.next) else {
            return Err(Closed);
        };
        match rx.try_recv() {
            Ok(frame) => {
                self.next = (self.next + 1) % self.from.len();
                Ok(Some(frame))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Closed),
        }
    }
}

/// A receiver of several logical inputs (this process's own stream and one
/// per other peer). It never takes a frame of a blocked input, takes the
/// inputs in turn so none starves, and sleeps on a [`Doorbell`] that the
/// inputs' producers ring.
pub struct MultiInbox {
    inputs: Vec<Box<dyn InputSource>>,
    ended: Vec<bool>,
    bell: Arc<Doorbell>,
    /// Where the next round of looking starts.
    next: usize,
}

/// How long a receiver sleeps at most without a ring (a safety net: every
/// producer rings).
const DOORBELL_TIMEOUT: Duration = Duration::from_millis(50);

impl MultiInbox {
    pub fn new(inputs: Vec<Box<dyn InputSource>>, bell: Arc<Doorbell>) -> Self {
        let n = inputs.len();
        MultiInbox {
            inputs,
            ended: vec![false; n],
            bell,
            next: 0,
        }
    }
}

impl Inbox for MultiInbox {
    fn inputs(&self) -> usize {
        self.inputs.len()
    }

    fn recv(&mut self, blocked: &[bool]) -> Option<(usize, Frame)> {
        let n = self.inputs.len();
        loop {
            let seen = self.bell.seen();
            for k in 0..n {
                let i = (self.next + k) % n;
                if self.ended[i] || blocked.get(i).copied().unwrap_or(false) {
                    continue;
                }
                match self.inputs[i].try_next() {
                    Ok(Some(frame)) => {
                        self.next = (i + 1) % n;
                        return Some((i, frame));
                    }
                    Ok(None) => {}
                    Err(Closed) => self.ended[i] = true,
                }
            }
            // Every input ended, or only held-back ones are left, whose
            // barrier can never be matched now: nothing more will come.
            let stuck = |i: usize| self.ended[i] || blocked.get(i).copied().unwrap_or(false);
            if (0..n).all(stuck) {
                return None;
            }
            self.bell.wait(seen, DOORBELL_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Msg;

    #[test]
    fn a_receiver_rebuilds_the_rotation_of_its_senders() {
        let (mut outs, mut ins) = local(3, 2, 4);
        // Batches 0..6 dealt in rotation to the three senders; each sends
        // a frame for batch k to both owners, senders finishing out of order.
        for k in (0..6u64).rev() {
            let s = (k % 3) as usize;
            outs[s].send(0, vec![Msg::Barrier(k)]).expect("open");
            outs[s].send(1, vec![Msg::Barrier(100 + k)]).expect("open");
        }
        for (owner, base) in [(0, 0), (1, 100)] {
            let got: Vec<u64> = (0..6)
                .map(|_| {
                    let (input, frame) = ins[owner].recv(&[false]).expect("a frame");
                    assert_eq!(input, 0);
                    match frame[..] {
                        [Msg::Barrier(id)] => id - base,
                        _ => u64::MAX,
                    }
                })
                .collect();
            // Each sender's channel holds its batches in the order sent
            // (descending here), and the rotation visits senders 0, 1, 2.
            assert_eq!(got, vec![3, 4, 5, 0, 1, 2]);
        }
        drop(outs);
        assert!(ins[0].recv(&[false]).is_none(), "senders gone: the end");
    }

    /// An input fed by hand.
    struct Manual(Receiver<Frame>);

    impl InputSource for Manual {
        fn try_next(&mut self) -> Result<Option<Frame>, Closed> {
            match self.0.try_recv() {
                Ok(f) => Ok(Some(f)),
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(Closed),
            }
        }
    }

    #[test]
    fn several_inputs_are_taken_in_turn_and_a_blocked_one_is_left_alone() {
        let bell = Arc::new(Doorbell::default());
        let (mut outs, ins) = local(1, 1, 8);
        outs[0].ring_on_send(0, bell.clone());
        let (tx, rx) = sync_channel(8);
        let local_in = ins.into_iter().next().expect("one inbox");
        let mut inbox =
            MultiInbox::new(vec![Box::new(local_in), Box::new(Manual(rx))], bell.clone());
        assert_eq!(inbox.inputs(), 2);
        for id in 0..3 {
            outs[0].send(0, vec![Msg::Barrier(id)]).expect("open");
            tx.send(vec![Msg::Barrier(10 + id)]).expect("open");
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            let (i, f) = inbox.recv(&[false, false]).expect("frames");
            got.push((i, f.len()));
        }
        assert_eq!(got, vec![(0, 1), (1, 1), (0, 1), (1, 1)], "in turn");
        // Input 0 blocked: only input 1's frame comes.
        let (i, f) = inbox.recv(&[true, false]).expect("input 1");
        assert_eq!(i, 1);
        assert!(matches!(f[..], [Msg::Barrier(12)]));
        // A frame sent later wakes the waiting receiver through the bell.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(vec![Msg::Barrier(99)]).expect("open");
            bell.ring();
            tx
        });
        let (i, f) = inbox.recv(&[true, false]).expect("the late frame");
        assert_eq!(i, 1);
        assert!(matches!(f[..], [Msg::Barrier(99)]));
        drop(late.join());
        drop(outs);
        let (i, _) = inbox.recv(&[false, false]).expect("input 0's last frame");
        assert_eq!(i, 0);
        assert!(inbox.recv(&[false, false]).is_none(), "both ended");
    }

    #[test]
    fn a_full_channel_holds_the_sender_back() {
        let (mut outs, mut ins) = local(1, 1, 1);
        outs[0].send(0, Vec::new()).expect("room for one");
        let sender = std::thread::spawn(move || {
            // Blocks until the receiver takes the first frame.
            outs[0].send(0, vec![Msg::Barrier(2)]).expect("open");
        });
        assert_eq!(ins[0].recv(&[false]).map(|f| f.1.len()), Some(0));
        let (_, second) = ins[0].recv(&[false]).expect("second frame");
        assert!(matches!(second[..], [Msg::Barrier(2)]));
        sender.join().expect("sender finished");
    }
}
