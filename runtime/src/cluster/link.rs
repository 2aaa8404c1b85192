//! Links between peers: the exchange across processes.
//!
//! One TCP connection per pair of peers carries frames both ways
//! ([`crate::msg::Frame`], postcard-encoded, length-prefixed) addressed to
//! a keyed worker of the other side.
//!
//! **Handshake.** The dialing peer sends [`Wire::Hello`] (cluster, its id,
//! the pipeline's fingerprint, its view); the other answers
//! [`Wire::Welcome`] or [`Wire::Refused`] with the reason, which the dialer
//! returns as an error. Peers of another cluster or another pipeline can
//! never exchange a frame.
//!
//! **Flow control.** Credits per destination: a sender may have at most
//! `window` frames to one keyed worker that its consumer has not taken yet;
//! the consumer returns a credit with each frame it takes
//! ([`LinkInput::recv`]). The reading thread therefore never blocks, so a
//! keyed worker that holds an input back (barrier alignment) does not stall
//! frames to the other workers on the same connection, and memory stays
//! bounded: `window` frames per destination and link.
//!
//! **Fencing.** Every frame carries the sender's view number; a frame of
//! another view than the receiver's is dropped and counted, so a peer that
//! was removed from the cluster cannot feed it.

use super::tls::{PeerTls, Shared, TlsReader, TlsWriter};
use crate::exec::exchange::{Closed, Doorbell, InputSource};
use crate::msg::Frame;
use serde::{Deserialize, Serialize};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The largest message accepted from a link (a frame of a full batch with
/// its payloads is far smaller).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Everything that travels on a link.
#[derive(Debug, Serialize, Deserialize)]
pub enum Wire {
    Hello {
        cluster: String,
        peer: String,
        fingerprint: String,
        view: u64,
        /// Peers the sender waits for (see [`Identity::missing`]).
        missing: Vec<String>,
        /// The last global checkpoint decision the sender knows.
        decision: Vec<u8>,
    },
    Welcome {
        peer: String,
        missing: Vec<String>,
        decision: Vec<u8>,
    },
    Refused {
        reason: String,
    },
    /// A frame for keyed worker `to` of the receiving peer.
    Frame {
        view: u64,
        to: u16,
        frame: Frame,
    },
    /// `n` more frames may be sent to keyed worker `to` of the sender of
    /// this message.
    Credit {
        to: u16,
        n: u32,
    },
    /// The sender's part of a global checkpoint (a postcard
    /// [`crate::state::global::Delta`]).
    Delta {
        view: u64,
        body: Vec<u8>,
    },
    /// Asks for the whole last global checkpoint (the asker lacks it).
    SnapshotRequest {
        view: u64,
    },
    /// The answer: a postcard [`crate::state::global::Snapshot`].
    Snapshot {
        view: u64,
        body: Vec<u8>,
    },
    Bye,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer link {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("peer link {addr}: refused by the other peer: {reason}")]
    Refused { addr: String, reason: String },
    #[error("peer link {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("peer link {addr} is closed")]
    Closed { addr: String },
}

/// Writes one message: its length (u32, little-endian), then postcard.
pub fn write_wire(out: &mut impl Write, msg: &Wire, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    let mut body = postcard::to_extend(msg, std::mem::take(buf))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let len = (body.len() - 4) as u32;
    body[..4].copy_from_slice(&len.to_le_bytes());
    out.write_all(&body)?;
    *buf = body;
    Ok(())
}

/// Reads one message; a length over [`MAX_MESSAGE`] or bytes that do not
/// decode are an `InvalidData` error, never a panic.
pub fn read_wire(input: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<Wire> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {MAX_MESSAGE})"),
        ));
    }
    buf.clear();
    buf.resize(len, 0);
    input.read_exact(buf)?;
    postcard::from_bytes(buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("undecodable message: {e}"),
        )
    })
}

/// Who this peer is, for handshakes.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cluster: String,
    pub peer: String,
    pub fingerprint: String,
    pub view: u64,
    /// Mutual TLS with the cluster's CA; `None`: plain TCP.
    pub tls: Option<PeerTls>,
    /// Peers this one waits for before event time passes the last
    /// checkpoint (they may come back with input from after it); each side
    /// of a link learns the other's.
    pub missing: Vec<String>,
    /// The last global checkpoint decision this peer knows (opaque here);
    /// each side of a link learns the other's.
    pub decision: Vec<u8>,
    /// Where control messages of the view (deltas, snapshot requests and
    /// snapshots) go, with the sending peer's id; `None`: they are dropped.
    pub control: Option<std::sync::mpsc::Sender<(String, Wire)>>,
}

/// The writing half of a link (plain, or TLS records).
type Out = Arc<Mutex<Box<dyn Write + Send>>>;
/// The reading half of a link.
type In = Box<dyn Read + Send>;

/// Both halves over `stream`, through TLS when `tls` holds a session.
fn halves(stream: &TcpStream, tls: Option<Shared>) -> std::io::Result<(In, Out)> {
    Ok(match tls {
        None => (
            Box::new(BufReader::new(stream.try_clone()?)),
            Arc::new(Mutex::new(Box::new(BufWriter::new(stream.try_clone()?)))),
        ),
        Some(conn) => (
            Box::new(BufReader::new(TlsReader::new(
                conn.clone(),
                stream.try_clone()?,
            ))),
            Arc::new(Mutex::new(Box::new(BufWriter::new(TlsWriter {
                conn,
                sock: stream.try_clone()?,
            })))),
        ),
    })
}

/// Per-destination credits of the sending side.
struct Credits {
    left: Mutex<Vec<u32>>,
    changed: Condvar,
}

/// One connection to another peer, both directions.
pub struct Link {
    addr: String,
    /// The other peer's id.
    pub peer: String,
    /// The peers the other one waits for ([`Identity::missing`]).
    pub missing: Vec<String>,
    /// The other one's last decision ([`Identity::decision`]).
    pub decision: Vec<u8>,
    view: u64,
    writer: Out,
    credits: Arc<Credits>,
    closed: Arc<AtomicBool>,
    /// Frames dropped because they carried another view.
    pub fenced: Arc<AtomicU64>,
    /// Taken once each, by the local keyed workers.
    inputs: Mutex<Vec<Option<LinkInput>>>,
    stream: TcpStream,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The frames a link delivers to one local keyed worker.
pub struct LinkInput {
    to: u16,
    rx: Receiver<Frame>,
    writer: Out,
    buf: Vec<u8>,
}

impl LinkInput {
    /// The next frame, waiting for it; returns its credit to the sender.
    /// `None` once the link is closed.
    pub fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().ok()?;
        self.give_credit();
        Some(frame)
    }

    /// A frame if one is there now (its credit returned).
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.give_credit();
        Some(frame)
    }

    fn give_credit(&mut self) {
        let msg = Wire::Credit { to: self.to, n: 1 };
        if let Ok(mut w) = self.writer.lock() {
            // A failed write means the link is gone; its reader notices.
            let _ = write_wire(&mut *w, &msg, &mut self.buf).and_then(|_| w.flush());
        }
    }
}

impl Link {
    /// Dials `addr` and shakes hands. `bells`: one per keyed worker here,
    /// rung when a frame for it arrives (each gets a [`LinkInput`]);
    /// `window`: credits granted per destination.
    pub fn dial(
        addr: &str,
        me: &Identity,
        bells: &[Arc<Doorbell>],
        window: u32,
    ) -> Result<Link, LinkError> {
        let io = |source| LinkError::Io {
            addr: addr.to_string(),
            source,
        };
        let stream = TcpStream::connect(addr).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let session = match &me.tls {
            None => None,
            Some(tls) => {
                let host = addr
                    .rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_matches(|c| c == '[' || c == ']');
                Some(tls.connect(host, &stream).map_err(io)?)
            }
        };
        let (mut r, w) = halves(&stream, session).map_err(io)?;
        let mut buf = Vec::new();
        {
            let mut w = w.lock().map_err(|_| LinkError::Closed {
                addr: addr.to_string(),
            })?;
            write_wire(
                &mut *w,
                &Wire::Hello {
                    cluster: me.cluster.clone(),
                    peer: me.peer.clone(),
                    fingerprint: me.fingerprint.clone(),
                    view: me.view,
                    missing: me.missing.clone(),
                    decision: me.decision.clone(),
                },
                &mut buf,
            )
            .and_then(|_| w.flush())
            .map_err(io)?;
        }
        let (peer, missing, decision) = match read_wire(&mut r, &mut buf).map_err(io)? {
            Wire::Welcome {
                peer,
                missing,
                decision,
            } => (peer, missing, decision),
            Wire::Refused { reason } => {
                return Err(LinkError::Refused {
                    addr: addr.to_string(),
                    reason,
                })
            }
            other => {
                return Err(LinkError::Protocol {
                    addr: addr.to_string(),
                    message: format!("expected a welcome, got {other:?}"),
                })
            }
        };
        Link::start(
            addr.to_string(),
            (peer, missing, decision),
            me,
            stream,
            (r, w),
            bells,
            window,
        )
    }

    /// Accepts one connection from `listener` and shakes hands: refuses a
    /// peer of another cluster or pipeline (it gets the reason).
    pub fn accept(
        listener: &TcpListener,
        me: &Identity,
        bells: &[Arc<Doorbell>],
        window: u32,
    ) -> Result<Link, LinkError> {
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (stream, from) = listener.accept().map_err(|source| LinkError::Io {
            addr: local.clone(),
            source,
        })?;
        Link::serve(stream, from, me, bells, window)
    }

    /// Shakes hands on a connection accepted from `from` (see
    /// [`Link::accept`]).
    pub fn serve(
        stream: TcpStream,
        from: std::net::SocketAddr,
        me: &Identity,
        bells: &[Arc<Doorbell>],
        window: u32,
    ) -> Result<Link, LinkError> {
        let addr = from.to_string();
        let io = |source| LinkError::Io {
            addr: addr.clone(),
            source,
        };
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        // A dialer that says nothing must not hold the listener forever.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        let session = match &me.tls {
            None => None,
            Some(tls) => Some(tls.accept(&stream).map_err(io)?),
        };
        let (mut r, w) = halves(&stream, session).map_err(io)?;
        let mut buf = Vec::new();
        let hello = read_wire(&mut r, &mut buf).map_err(io)?;
        let Wire::Hello {
            cluster,
            peer,
            fingerprint,
            view,
            missing,
            decision,
        } = hello
        else {
            return Err(LinkError::Protocol {
                addr,
                message: "the first message was not a hello".into(),
            });
        };
        let refusal = if cluster != me.cluster {
            Some(format!(
                "peer `{peer}` belongs to cluster `{cluster}`, this is `{}`",
                me.cluster
            ))
        } else if fingerprint != me.fingerprint {
            Some(format!(
                "peer `{peer}` runs another pipeline ({fingerprint}; this one is {})",
                me.fingerprint
            ))
        } else if peer == me.peer {
            Some(format!("peer id `{peer}` is this peer's own id"))
        } else if view != me.view {
            Some(format!(
                "peer `{peer}` is in view {view:x}, this peer in {:x} (membership is changing; try again)",
                me.view
            ))
        } else {
            None
        };
        {
            let mut out = w
                .lock()
                .map_err(|_| LinkError::Closed { addr: addr.clone() })?;
            if let Some(reason) = refusal {
                let _ = write_wire(
                    &mut *out,
                    &Wire::Refused {
                        reason: reason.clone(),
                    },
                    &mut buf,
                )
                .and_then(|_| out.flush());
                return Err(LinkError::Refused { addr, reason });
            }
            write_wire(
                &mut *out,
                &Wire::Welcome {
                    peer: me.peer.clone(),
                    missing: me.missing.clone(),
                    decision: me.decision.clone(),
                },
                &mut buf,
            )
            .and_then(|_| out.flush())
            .map_err(io)?;
        }
        stream.set_read_timeout(None).map_err(io)?;
        Link::start(
            addr,
            (peer, missing, decision),
            me,
            stream,
            (r, w),
            bells,
            window,
        )
    }

    fn start(
        addr: String,
        (peer, missing, decision): (String, Vec<String>, Vec<u8>),
        me: &Identity,
        stream: TcpStream,
        (reader, writer): (In, Out),
        bells: &[Arc<Doorbell>],
        window: u32,
    ) -> Result<Link, LinkError> {
        let view = me.view;
        let workers = bells.len();
        let io = |source| LinkError::Io {
            addr: addr.clone(),
            source,
        };
        // The other side's workers are granted `window` credits each as
        // soon as they send (the count is learned from the first credit).
        let credits = Arc::new(Credits {
            left: Mutex::new(Vec::new()),
            changed: Condvar::new(),
        });
        let closed = Arc::new(AtomicBool::new(false));
        let fenced = Arc::new(AtomicU64::new(0));
        let mut queues: Vec<SyncSender<Frame>> = Vec::new();
        let mut inputs = Vec::new();
        for to in 0..workers {
            // Never full: the sender has at most `window` frames out.
            let (tx, rx) = sync_channel(window.max(1) as usize);
            queues.push(tx);
            inputs.push(Some(LinkInput {
                to: to as u16,
                rx,
                writer: writer.clone(),
                buf: Vec::new(),
            }));
        }
        // Grant the first credits.
        {
            let mut w = writer
                .lock()
                .map_err(|_| LinkError::Closed { addr: addr.clone() })?;
            let mut buf = Vec::new();
            for to in 0..workers {
                write_wire(
                    &mut *w,
                    &Wire::Credit {
                        to: to as u16,
                        n: window,
                    },
                    &mut buf,
                )
                .map_err(io)?;
            }
            w.flush().map_err(io)?;
        }
        let reader = {
            let credits = credits.clone();
            let closed = closed.clone();
            let fenced = fenced.clone();
            let addr = addr.clone();
            let bells = bells.to_vec();
            let control = me.control.clone().map(|tx| (peer.clone(), tx));
            std::thread::Builder::new()
                .name(format!("rivulet-link-{peer}"))
                .spawn(move || {
                    let to = Deliver {
                        view,
                        queues: &queues,
                        bells: &bells,
                        control,
                    };
                    read_loop(reader, &to, &credits, &fenced, &addr);
                    closed.store(true, Ordering::SeqCst);
                    credits.changed.notify_all();
                    // Receivers waiting on a closed link wake and see it.
                    drop(queues);
                    bells.iter().for_each(|b| b.ring());
                })
                .map_err(io)?
        };
        Ok(Link {
            addr,
            peer,
            missing,
            decision,
            view,
            writer,
            credits,
            closed,
            fenced,
            inputs: Mutex::new(inputs),
            stream,
            reader: Some(reader),
        })
    }

    /// The input of local keyed worker `to` (taken once).
    pub fn take_input(&self, to: usize) -> Option<LinkInput> {
        self.inputs.lock().ok()?.get_mut(to)?.take()
    }

    /// Sends a frame to keyed worker `to` of the other peer, waiting while
    /// that worker has taken none of the last `window` frames.
    pub fn send(&self, to: u16, frame: Frame) -> Result<(), LinkError> {
        let closed = || LinkError::Closed {
            addr: self.addr.clone(),
        };
        {
            let mut left = self.credits.left.lock().map_err(|_| closed())?;
            loop {
                if self.closed.load(Ordering::SeqCst) {
                    return Err(closed());
                }
                if left.get(to as usize).copied().unwrap_or(0) > 0 {
                    left[to as usize] -= 1;
                    break;
                }
                left = self
                    .credits
                    .changed
                    .wait_timeout(left, Duration::from_millis(100))
                    .map_err(|_| closed())?
                    .0;
            }
        }
        let msg = Wire::Frame {
            view: self.view,
            to,
            frame,
        };
        let mut w = self.writer.lock().map_err(|_| closed())?;
        let mut buf = Vec::new();
        write_wire(&mut *w, &msg, &mut buf)
            .and_then(|_| w.flush())
            .map_err(|source| LinkError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Sends a control message (a checkpoint delta, a snapshot request or
    /// a snapshot).
    pub fn send_control(&self, msg: &Wire) -> Result<(), LinkError> {
        let mut w = self.writer.lock().map_err(|_| LinkError::Closed {
            addr: self.addr.clone(),
        })?;
        write_wire(&mut *w, msg, &mut Vec::new())
            .and_then(|_| w.flush())
            .map_err(|source| LinkError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    /// The view this link belongs to.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// Closes the connection without consuming the link (other holders of
    /// it see it closed): its reader ends, sends fail.
    pub fn abort(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.credits.changed.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Whether the other side closed or failed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Says goodbye and closes both directions.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            let _ = write_wire(&mut *w, &Wire::Bye, &mut Vec::new()).and_then(|_| w.flush());
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Where a link's reader delivers what arrives.
struct Deliver<'a> {
    view: u64,
    queues: &'a [SyncSender<Frame>],
    bells: &'a [Arc<Doorbell>],
    /// The other peer's id and the control channel.
    control: Option<(String, std::sync::mpsc::Sender<(String, Wire)>)>,
}

fn read_loop(mut r: In, to_: &Deliver, credits: &Credits, fenced: &AtomicU64, addr: &str) {
    let Deliver {
        view,
        queues,
        bells,
        control,
    } = to_;
    let view = *view;
    let mut buf = Vec::new();
    loop {
        match read_wire(&mut r, &mut buf) {
            Ok(
                msg @ (Wire::Delta { .. } | Wire::SnapshotRequest { .. } | Wire::Snapshot { .. }),
            ) => {
                let v = match &msg {
                    Wire::Delta { view, .. }
                    | Wire::SnapshotRequest { view }
                    | Wire::Snapshot { view, .. } => *view,
                    _ => view,
                };
                if v != view {
                    fenced.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some((peer, tx)) = control {
                    let _ = tx.send((peer.clone(), msg));
                }
            }
            Ok(Wire::Frame { view: v, to, frame }) => {
                if v != view {
                    fenced.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(q) = queues.get(to as usize) else {
                    tracing::warn!(peer = %addr, to, "a frame for a worker this peer does not have");
                    continue;
                };
                // Within the credit window the queue has room; a sender
                // beyond it broke the protocol, so drop the link.
                if q.try_send(frame).is_err() {
                    tracing::warn!(peer = %addr, "a peer sent beyond its credit; closing the link");
                    break;
                }
                if let Some(b) = bells.get(to as usize) {
                    b.ring();
                }
            }
            Ok(Wire::Credit { to, n }) => {
                if let Ok(mut left) = credits.left.lock() {
                    let i = to as usize;
                    if left.len() <= i {
                        left.resize(i + 1, 0);
                    }
                    left[i] = left[i].saturating_add(n);
                }
                credits.changed.notify_all();
            }
            Ok(Wire::Bye) => break,
            Ok(other) => {
                tracing::warn!(peer = %addr, message = ?other, "unexpected message on a link; closing it");
                break;
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::warn!(peer = %addr, error = %e, "peer link failed");
                }
                break;
            }
        }
    }
}

impl InputSource for LinkInput {
    fn try_next(&mut self) -> Result<Option<Frame>, Closed> {
        match self.rx.try_recv() {
            Ok(frame) => {
                self.give_credit();
                Ok(Some(frame))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(None),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cluster::tls::PeerTls;
    use crate::msg::{KeyedBatch, Msg};

    fn me(peer: &str, fingerprint: &str) -> Identity {
        Identity {
            cluster: "line-3".into(),
            peer: peer.into(),
            fingerprint: fingerprint.into(),
            view: 1,
            tls: None,
            missing: Vec::new(),
            decision: Vec::new(),
            control: None,
        }
    }

    fn bells(n: usize) -> Vec<Arc<Doorbell>> {
        (0..n).map(|_| Arc::new(Doorbell::default())).collect()
    }

    /// A connected pair: (dialer's link, acceptor's link).
    fn pair(workers: usize, window: u32) -> (Link, Link) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acc =
            std::thread::spawn(move || Link::accept(&l, &me("b", "fp"), &bells(workers), window));
        let a = Link::dial(&addr, &me("a", "fp"), &bells(workers), window).unwrap();
        let b = acc.join().unwrap().unwrap();
        (a, b)
    }

    fn barrier(id: u64) -> Frame {
        vec![Msg::Barrier(id)]
    }

    fn id_of(f: &Frame) -> u64 {
        match f[..] {
            [Msg::Barrier(id)] => id,
            _ => u64::MAX,
        }
    }

    #[test]
    fn frames_arrive_in_order_at_their_worker_both_ways() {
        let (a, b) = pair(2, 4);
        assert_eq!((a.peer.as_str(), b.peer.as_str()), ("b", "a"));
        let mut b0 = b.take_input(0).unwrap();
        let mut b1 = b.take_input(1).unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..50 {
                a.send((i % 2) as u16, barrier(i)).unwrap();
            }
            a
        });
        let (mut evens, mut odds) = (Vec::new(), Vec::new());
        for _ in 0..25 {
            evens.push(id_of(&b0.recv().unwrap()));
            odds.push(id_of(&b1.recv().unwrap()));
        }
        assert_eq!(evens, (0..50).step_by(2).collect::<Vec<_>>());
        assert_eq!(odds, (1..50).step_by(2).collect::<Vec<_>>());
        let a = sender.join().unwrap();
        // The other direction on the same connection, with a real batch.
        let batch = KeyedBatch {
            keys: b"k".to_vec(),
            ..Default::default()
        };
        b.send(1, vec![Msg::Data(batch), Msg::Watermark(7)])
            .unwrap();
        let got = a.take_input(1).unwrap().recv().unwrap();
        assert!(matches!(&got[..], [Msg::Data(d), Msg::Watermark(7)] if d.keys == b"k"));
    }

    #[test]
    fn a_worker_that_takes_nothing_holds_back_only_its_own_frames() {
        let (a, b) = pair(2, 2);
        let _held = b.take_input(0).unwrap(); // never read: an aligning worker
        let mut b1 = b.take_input(1).unwrap();
        let a = Arc::new(a);
        let sent = Arc::new(AtomicU64::new(0));
        let stuck = {
            let (a, sent) = (a.clone(), sent.clone());
            std::thread::spawn(move || {
                for i in 0..3 {
                    if a.send(0, barrier(i)).is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // Frames to worker 1 pass although worker 0's window is used up.
        for i in 0..10 {
            a.send(1, barrier(100 + i)).unwrap();
            assert_eq!(id_of(&b1.recv().unwrap()), 100 + i);
        }
        // The two frames the window allows go out (however slow the
        // machine), the third then waits for a credit that never comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sent.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            sent.load(Ordering::SeqCst),
            2,
            "the third frame waits for credit"
        );
        drop(b);
        stuck.join().unwrap();
        assert_eq!(
            sent.load(Ordering::SeqCst),
            2,
            "and fails once the link closes"
        );
    }

    #[test]
    fn a_peer_of_another_pipeline_or_cluster_is_refused_with_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acc = std::thread::spawn(move || {
            let first = Link::accept(&l, &me("b", "fp-1"), &bells(1), 2).err();
            let mut other = me("b", "fp-2");
            other.cluster = "line-9".into();
            let second = Link::accept(&l, &other, &bells(1), 2).err();
            (first, second)
        });
        let err = Link::dial(&addr, &me("a", "fp-2"), &bells(1), 2)
            .err()
            .unwrap();
        assert!(err.to_string().contains("runs another pipeline"), "{err}");
        let err = Link::dial(&addr, &me("a", "fp-2"), &bells(1), 2)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("belongs to cluster `line-3`"),
            "{err}"
        );
        let (first, second) = acc.join().unwrap();
        assert!(matches!(first, Some(LinkError::Refused { .. })));
        assert!(matches!(second, Some(LinkError::Refused { .. })));
    }

    #[test]
    fn a_peer_of_another_view_is_refused_with_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acc = std::thread::spawn(move || Link::accept(&l, &me("b", "fp"), &bells(1), 4));
        let mut old = me("a", "fp");
        old.view = 0;
        let err = Link::dial(&addr, &old, &bells(1), 4).err().unwrap();
        assert!(err.to_string().contains("membership is changing"), "{err}");
        assert!(acc.join().unwrap().is_err());
    }

    #[test]
    fn control_messages_reach_the_control_channel_with_the_senders_id() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut b_id = me("b", "fp");
        b_id.control = Some(tx);
        let acc = std::thread::spawn(move || Link::accept(&l, &b_id, &bells(1), 4).unwrap());
        let a = Link::dial(&addr, &me("a", "fp"), &bells(1), 4).unwrap();
        let _b = acc.join().unwrap();
        a.send_control(&Wire::Delta {
            view: 0,
            body: vec![9],
        })
        .unwrap();
        a.send_control(&Wire::Delta {
            view: 1,
            body: vec![1, 2],
        })
        .unwrap();
        let (from, msg) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(from, "a");
        assert!(
            matches!(msg, Wire::Delta { body, .. } if body == vec![1, 2]),
            "the delta of another view was dropped"
        );
    }

    #[test]
    fn a_keyed_worker_takes_its_own_and_a_peers_stream_as_two_inputs() {
        use crate::exec::exchange::{local, Inbox, MultiInbox, Outbox};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Peer b's one keyed worker: its own parse output plus a's link.
        let bell = Arc::new(Doorbell::default());
        let b_bells = vec![bell.clone()];
        let acc = std::thread::spawn(move || Link::accept(&l, &me("b", "fp"), &b_bells, 2));
        let a = Link::dial(&addr, &me("a", "fp"), &bells(1), 2).unwrap();
        let b = acc.join().unwrap().unwrap();
        let (mut outs, ins) = local(1, 1, 4);
        outs[0].ring_on_send(0, bell.clone());
        let own = ins.into_iter().next().unwrap();
        let mut inbox = MultiInbox::new(
            vec![Box::new(own), Box::new(b.take_input(0).unwrap())],
            bell,
        );
        assert_eq!(inbox.inputs(), 2);
        let remote = std::thread::spawn(move || {
            for id in 0..5 {
                a.send(0, barrier(100 + id)).unwrap();
            }
            a
        });
        let own_sender = std::thread::spawn(move || {
            for id in 0..5 {
                outs[0].send(0, barrier(id)).unwrap();
            }
            outs
        });
        let mut from = [Vec::new(), Vec::new()];
        for _ in 0..10 {
            let (i, f) = inbox.recv(&[false, false]).unwrap();
            from[i].push(id_of(&f));
        }
        let mut outs = own_sender.join().unwrap();
        assert_eq!(from[0], vec![0, 1, 2, 3, 4]);
        assert_eq!(from[1], vec![100, 101, 102, 103, 104]);
        // The peer leaves: its input ends, the own input goes on.
        remote.join().unwrap().close();
        outs[0].send(0, barrier(5)).unwrap();
        assert_eq!(
            inbox.recv(&[false, false]).map(|(i, f)| (i, id_of(&f))),
            Some((0, 5))
        );
        drop(outs);
        assert!(inbox.recv(&[false, false]).is_none());
        drop(b);
    }

    /// A CA and, per name, a certificate (for 127.0.0.1) and key signed by
    /// it, written as PEM files into `dir`; returns the CA's path.
    fn pki(dir: &std::path::Path, ca_name: &str, peers: &[&str]) -> String {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, ca_name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let ca_path = dir.join(format!("{ca_name}.pem"));
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        for p in peers {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.join(format!("{p}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{p}.key")), key.serialize_pem()).unwrap();
        }
        ca_path.display().to_string()
    }

    fn tls_me(dir: &std::path::Path, ca: &str, peer: &str) -> Identity {
        let mut me = me(peer, "fp");
        let file = |ext: &str| dir.join(format!("{peer}.{ext}")).display().to_string();
        me.tls = Some(PeerTls::from_files(ca, &file("pem"), &file("key")).unwrap());
        me
    }

    #[test]
    fn peers_of_one_ca_talk_over_mutual_tls_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = pki(d, "cluster-ca", &["a", "b"]);
        let other = pki(d, "other-ca", &["x"]);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let b_id = tls_me(d, &ca, "b");
        let acc = std::thread::spawn(move || {
            let good = Link::accept(&l, &b_id, &bells(1), 2);
            let bad = Link::accept(&l, &b_id, &bells(1), 2);
            (good, bad)
        });
        let a = Link::dial(&addr, &tls_me(d, &ca, "a"), &bells(1), 2).unwrap();
        // A peer that trusts the cluster's CA but whose own certificate
        // comes from another CA cannot get in: the cluster says why, and
        // so does the intruder.
        let mut x_id = tls_me(d, &other, "x");
        let file = |ext: &str| d.join(format!("x.{ext}")).display().to_string();
        x_id.tls = Some(PeerTls::from_files(&ca, &file("pem"), &file("key")).unwrap());
        let x = Link::dial(&addr, &x_id, &bells(1), 2);
        let (good, bad) = acc.join().unwrap();
        let b = good.unwrap();
        let refused = bad.err().expect("the foreign peer is refused").to_string();
        assert!(
            refused.contains("not from this cluster's CA (peers.tls.ca_file)"),
            "{refused}"
        );
        let x_err = x.err().expect("the foreign peer fails").to_string();
        assert!(
            x_err.contains("refused this peer's certificate") || x_err.contains("closed"),
            "{x_err}"
        );
        // Frames both ways through TLS, in order, with credits.
        let mut ins = b.take_input(0).unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..20 {
                a.send(0, barrier(i)).unwrap();
            }
            a
        });
        let got: Vec<u64> = (0..20).map(|_| id_of(&ins.recv().unwrap())).collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        let a = sender.join().unwrap();
        b.send(0, barrier(99)).unwrap();
        assert_eq!(id_of(&a.take_input(0).unwrap().recv().unwrap()), 99);
    }

    #[test]
    fn unreadable_tls_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = pki(d, "ca", &["a"]);
        let key = d.join("a.key").display().to_string();
        let cert = d.join("a.pem").display().to_string();
        let e = PeerTls::from_files("/nonexistent/ca.pem", &cert, &key).unwrap_err();
        assert!(e.contains("peers.tls.ca_file /nonexistent/ca.pem"), "{e}");
        let e = PeerTls::from_files(&ca, &key, &key).unwrap_err();
        assert!(e.contains("peers.tls.cert_file"), "{e}");
        let e = PeerTls::from_files(&ca, &cert, &cert).unwrap_err();
        assert!(e.contains("peers.tls.key_file"), "{e}");
    }

    #[test]
    fn garbage_on_the_wire_is_an_error_not_a_panic() {
        let mut huge = std::io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
        let e = read_wire(&mut huge, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let mut junk = std::io::Cursor::new(vec![3, 0, 0, 0, 0xff, 0xff, 0xff]);
        let e = read_wire(&mut junk, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let mut short = std::io::Cursor::new(vec![9, 0, 0, 0, 1]);
        assert!(read_wire(&mut short, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_closed_link_fails_senders_instead_of_hanging() {
        let (a, b) = pair(1, 1);
        b.close();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !a.is_closed() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(a.is_closed());
        // The first credit may still be there; past it, sending fails.
        let _ = a.send(0, barrier(1));
        assert!(matches!(
            a.send(0, barrier(2)),
            Err(LinkError::Closed { .. })
        ));
    }
}
