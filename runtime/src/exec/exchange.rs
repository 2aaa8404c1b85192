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
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

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
        .map(|_| LocalOutbox { to: Vec::new() })
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
        self.to[owner].send(frame).map_err(|_| Closed)
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
