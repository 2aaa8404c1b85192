//! A subscriber's connection without an event loop: rumqttc's codec
//! (`rumqttc::mqttbytes`, both protocol versions) over a `std::net` socket,
//! with rustls for `mqtts://`.
//!
//! rumqttc's client hands over one event per message through its tokio
//! runtime: a wake-up, a `select!`, and a ~200-byte `Event` moved several
//! times, for every message. A subscriber needs none of that. Here one
//! `read` takes whatever the broker has sent (up to 64 KiB), every packet in
//! it is decoded at once, and the PUBACKs they call for leave in one
//! `write` before the next read. The connection thread sleeps in `poll(2)`
//! on the socket and on a wake-up socket that other threads use when they
//! queue a request (subscribe, unsubscribe, disconnect).
//!
//! The session logic a subscriber needs is small and lives here: packet ids
//! for SUBSCRIBE and UNSUBSCRIBE (nothing is published, so nothing else is
//! in flight), PINGREQ after a keep-alive interval without sending, and a
//! dropped connection when a ping goes unanswered for another interval.
//! [`super::drive`] reconnects as for rumqttc's connections; this type
//! answers its [`super::Step`]s.

use super::{io_reason, refusal4, refusal5, Endpoint, Ev, Step};
use crate::sources::OVERSIZE_PREFIX;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4 as p4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes as m5;
use rumqttc::v5::mqttbytes::v5 as p5;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes asked of the socket per read.
const READ: usize = 64 << 10;
/// How long connecting, the TLS handshake and the CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write may wait for room in the socket.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// While messages come closer together than this, the connection waits
/// this long for more instead of waking at each one (see [`Conn::exchange`]).
const COALESCE: Duration = Duration::from_micros(200);

/// What other threads (and the handler, on the connection's own thread)
/// ask of the connection.
#[derive(Debug)]
enum Request {
    Subscribe {
        filter: String,
        qos: u8,
        retain_as_published: bool,
    },
    Unsubscribe(String),
    /// PUBACK for an incoming QoS 1 message (manual acks).
    Ack(u16),
    Disconnect,
    /// Return from the wait: a publisher has something to write.
    Wake,
}

/// Shared between the connection and its [`Handle`]s.
struct Shared {
    requests: Mutex<Vec<Request>>,
    /// Set while the connection thread sleeps in `poll`: a request then
    /// writes a byte to `waker`.
    parked: AtomicBool,
    waker: UnixStream,
}

impl Shared {
    /// Marks the connection's thread as about to sleep, so a request from
    /// now on writes a wake-up byte: `false` (and not marked) when a
    /// request is already queued and the thread must not sleep.
    fn park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        let queued = !self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if queued {
            self.parked.store(false, Ordering::SeqCst);
        }
        !queued
    }
}

/// The request side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl Handle {
    fn push(&self, r: Request) {
        let mut q = self.0.requests.lock().unwrap_or_else(|e| e.into_inner());
        q.push(r);
        drop(q);
        // The connection thread sets `parked` before it looks at the queue
        // a last time and sleeps: either it sees this request, or it is
        // parked and the byte wakes it. A full wake-up socket already holds
        // a wake-up.
        if self.0.parked.load(Ordering::SeqCst) {
            let _ = (&self.0.waker).write(&[1]);
        }
    }

    pub fn subscribe(&self, filter: &str, qos: u8, retain_as_published: bool) {
        self.push(Request::Subscribe {
            filter: filter.to_string(),
            qos,
            retain_as_published,
        });
    }

    pub fn unsubscribe(&self, filter: &str) {
        self.push(Request::Unsubscribe(filter.to_string()));
    }

    pub fn ack(&self, pkid: u16) {
        self.push(Request::Ack(pkid));
    }

    pub fn disconnect(&self) {
        self.push(Request::Disconnect);
    }

    /// Ends the connection's current wait (a publisher has work for it):
    /// its step returns, or the next one does at once.
    pub fn wake(&self) {
        self.push(Request::Wake);
    }
}

/// The socket of one connection, in non-blocking mode once connected.
struct Link {
    sock: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
}

impl Link {
    /// Reads what is there into `scratch`: `Ok(0)` when the broker closed
    /// the connection, `WouldBlock` when nothing is waiting.
    fn read(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.read(scratch);
        };
        loop {
            match tls.reader().read(scratch) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // No plaintext buffered: take TLS records from the socket.
            if tls.read_tls(&mut self.sock)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Send the alert that says why, then give up.
                let _ = tls.write_tls(&mut self.sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if tls.wants_write() {
                flush_tls(tls, &mut self.sock)?;
            }
        }
    }

    /// Writes all of `data`, waiting for room when the socket is full.
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            tls.writer().write_all(data)?;
            return self.flush_tls();
        }
        let mut rest = data;
        while !rest.is_empty() {
            match self.sock.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_writable()?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes as much of `data` as the socket takes now, without waiting:
    /// how many bytes of it were taken. Under TLS the bytes taken may still
    /// be partly in rustls's buffer ([`Link::pending`]).
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(tls) = &mut self.tls {
            let n = tls.writer().write(data)?;
            while tls.wants_write() {
                match tls.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(n);
        }
        let mut n = 0;
        while n < data.len() {
            match self.sock.write(&data[n..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// TLS records encrypted and not yet written.
    fn pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    fn flush_tls(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(tls) => flush_tls(tls, &mut self.sock),
            None => Ok(()),
        }
    }

    fn wait_writable(&self) -> io::Result<()> {
        wait_fd(self.sock.as_raw_fd(), libc::POLLOUT, WRITE_TIMEOUT)
    }
}

/// Writes out the TLS records rustls holds, waiting for room.
fn flush_tls(tls: &mut rustls::ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), libc::POLLOUT, WRITE_TIMEOUT)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `fd` is ready for `events`, or fails with `TimedOut`.
fn wait_fd(fd: i32, events: libc::c_short, timeout: Duration) -> io::Result<()> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    match poll(&mut p, Some(timeout))? {
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the broker took no data for 10 s",
        )),
        _ => Ok(()),
    }
}

/// `poll(2)`; `None` waits without limit. Interruptions count as "nothing
/// ready" (the caller looks again).
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        // Round up, so a wait of 0.2 ms does not spin.
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    };
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the
    // length given.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// A packet from the broker, in the terms a subscriber needs.
enum Incoming {
    ConnAck {
        session_present: bool,
        refused: Option<(String, bool)>,
        /// MQTT 5: how many QoS 1 publishes the broker takes unacknowledged.
        receive_max: Option<u16>,
    },
    Publish {
        topic: String,
        /// The payload, or its first [`OVERSIZE_PREFIX`] bytes when it is
        /// larger than the connection takes (`size` says how large).
        payload: Bytes,
        size: usize,
        pkid: u16,
        qos: QoS,
        dup: bool,
        retain: bool,
    },
    PubAck(u16),
    /// Packet id and whether any filter was refused.
    SubAck(u16, bool),
    PingResp,
    /// MQTT 5: the broker ends the connection, with its reason.
    Disconnect(String),
    Other,
}

/// One subscriber connection; see the module's documentation.
pub struct Conn {
    ep: Endpoint,
    manual_acks: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
    shared: Arc<Shared>,
    wake_rx: UnixStream,
    link: Option<Link>,
    scratch: Box<[u8]>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    events: VecDeque<Ev>,
    /// Requests taken from the queue, kept across a reconnect (subscribes).
    taken: Vec<Request>,
    /// PUBACKs in `wbuf` (manual acks).
    acks_in_wbuf: Vec<u16>,
    /// Manual PUBACKs written and not yet known to be processed, oldest
    /// first; the first `acks_pinged` of them were written before the
    /// outstanding PINGREQ.
    acks_written: Vec<u16>,
    acks_pinged: usize,
    last_pkid: u16,
    /// SUBSCRIBE packet ids → their filters, to name a refused one.
    subscribing: HashMap<u16, String>,
    last_write: Instant,
    awaiting_ping: bool,
    ping_sent: Instant,
    closing: bool,
    /// The stream is busy: the last wait for data ended within
    /// [`COALESCE`].
    busy: bool,
    /// Bytes of an oversized message still to be discarded as they come.
    skip: usize,
    /// QoS 1 publishes the broker takes unacknowledged (MQTT 5's Receive
    /// Maximum; no limit of its own in 3.1.1).
    receive_max: u16,
    /// A [`Request::Wake`] came: the step returns.
    woken: bool,
    /// The last read found the socket empty (and no TLS plaintext
    /// buffered): sleeping in `poll` on it cannot miss data.
    read_dry: bool,
    /// A write from another thread ([`Conn::write_some`]) failed: the next
    /// step reports the connection lost.
    failed: Option<String>,
}

impl Conn {
    pub fn new(ep: &Endpoint, manual_acks: bool) -> Result<(Conn, Handle), String> {
        let tls = if ep.tls {
            Some(Arc::new(ep.rustls_config()?))
        } else {
            None
        };
        let (waker, wake_rx) =
            UnixStream::pair().map_err(|e| format!("cannot make a wake-up socket: {e}"))?;
        for s in [&waker, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|e| format!("cannot make a wake-up socket: {e}"))?;
        }
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            parked: AtomicBool::new(false),
            waker,
        });
        let conn = Conn {
            ep: ep.clone(),
            manual_acks,
            tls,
            shared: shared.clone(),
            wake_rx,
            link: None,
            scratch: vec![0; READ].into_boxed_slice(),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            events: VecDeque::new(),
            taken: Vec::new(),
            acks_in_wbuf: Vec::new(),
            acks_written: Vec::new(),
            acks_pinged: 0,
            last_pkid: 0,
            subscribing: HashMap::new(),
            last_write: Instant::now(),
            awaiting_ping: false,
            ping_sent: Instant::now(),
            closing: false,
            busy: false,
            skip: 0,
            receive_max: u16::MAX,
            woken: false,
            read_dry: false,
            failed: None,
        };
        Ok((conn, Handle(shared)))
    }

    fn v5(&self) -> bool {
        self.ep.version == 5
    }

    /// The keep-alive as sent in CONNECT (whole seconds; MQTT 5 at least 5
    /// s, as for rumqttc's connections).
    fn keep_alive(&self) -> Duration {
        let k = self.ep.keep_alive;
        if k.is_zero() {
            return k;
        }
        let secs = k.as_secs_f64().ceil().max(1.0) as u64;
        let secs = if self.v5() { secs.max(5) } else { secs };
        Duration::from_secs(secs.min(u16::MAX as u64))
    }

    fn next_pkid(&mut self) -> u16 {
        self.last_pkid = self.last_pkid.checked_add(1).unwrap_or(1);
        self.last_pkid
    }

    /// One step for [`super::drive`]: the next event, waiting up to `wait`
    /// for one.
    pub(crate) fn step(&mut self, wait: Duration) -> Step {
        if let Some(ev) = self.events.pop_front() {
            return Step::Ev(ev);
        }
        if self.closing {
            return Step::Closed;
        }
        if self.link.is_none() {
            self.take_requests();
            if self.closing {
                return Step::Closed;
            }
            return match self.connect() {
                Ok(session_present) => Step::Ev(Ev::Connected { session_present }),
                Err((reason, permanent)) => Step::Ev(Ev::Disconnected { reason, permanent }),
            };
        }
        match self.exchange(wait) {
            Ok(()) => match self.events.pop_front() {
                Some(ev) => Step::Ev(ev),
                None if self.closing => Step::Closed,
                None => Step::Nothing,
            },
            Err(reason) => {
                self.drop_link();
                // What was read before the error still counts.
                self.events.push_back(Ev::Disconnected {
                    reason,
                    permanent: false,
                });
                match self.events.pop_front() {
                    Some(ev) => Step::Ev(ev),
                    None => Step::Other,
                }
            }
        }
    }

    fn drop_link(&mut self) {
        if let Some(l) = self.link.take() {
            let _ = l.sock.shutdown(std::net::Shutdown::Both);
        }
        self.rbuf.clear();
        self.skip = 0;
        self.wbuf.clear();
        self.acks_in_wbuf.clear();
        self.acks_written.clear();
        self.acks_pinged = 0;
        self.subscribing.clear();
        self.awaiting_ping = false;
        self.read_dry = false;
        self.failed = None;
    }

    /// Moves queued requests to `taken`, dropping PUBACKs meant for a
    /// connection that is gone (the broker sends those messages again).
    fn take_requests(&mut self) {
        let mut q = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.taken.append(&mut q);
        drop(q);
        if self.link.is_none() {
            self.taken.retain(|r| !matches!(r, Request::Ack(_)));
            if self.taken.iter().any(|r| matches!(r, Request::Disconnect)) {
                self.closing = true;
            }
        }
    }

    /// Connects, logs in and waits for the CONNACK: whether the broker
    /// kept a session, or why it failed and whether retrying can help.
    fn connect(&mut self) -> Result<bool, (String, bool)> {
        self.drop_link();
        let addrs = (self.ep.host.as_str(), self.ep.port)
            .to_socket_addrs()
            .map_err(|e| (format!("cannot resolve {}: {e}", self.ep.host), false))?;
        let mut last = None;
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = sock.ok_or_else(|| match last {
            Some(e) => io_reason(&e),
            None => (format!("{} has no address", self.ep.host), false),
        })?;
        let io = |e: io::Error| io_reason(&e);
        sock.set_nodelay(true).map_err(io)?;
        sock.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
        sock.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
        let tls = match &self.tls {
            None => None,
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.ep.host.clone())
                    .map_err(|e| (format!("TLS: bad server name: {e}"), true))?;
                let mut c = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| (super::tls_reason(&e), true))?;
                let mut s = &sock;
                while c.is_handshaking() {
                    c.complete_io(&mut s).map_err(io)?;
                }
                Some(Box::new(c))
            }
        };
        let mut link = Link { sock, tls };
        let connect = self.encode_connect().map_err(|e| (e, true))?;
        link.write_all(&connect).map_err(io)?;
        // The CONNACK, read blocking (with the timeout above).
        let ack = loop {
            match self.decode_one() {
                Ok(Some(p)) => break p,
                Ok(None) => {}
                Err(e) => return Err((e, false)),
            }
            let n = link.read(&mut self.scratch).map_err(|e| {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    (
                        "the broker did not answer CONNECT within 5 s".to_string(),
                        false,
                    )
                } else {
                    io_reason(&e)
                }
            })?;
            if n == 0 {
                return Err(("the broker closed the connection".into(), false));
            }
            self.rbuf.extend_from_slice(&self.scratch[..n]);
        };
        let Incoming::ConnAck {
            session_present,
            refused,
            receive_max,
        } = ack
        else {
            return Err(("the broker sent something other than CONNACK".into(), false));
        };
        if let Some(r) = refused {
            return Err(r);
        }
        link.sock.set_read_timeout(None).map_err(io)?;
        link.sock.set_write_timeout(None).map_err(io)?;
        link.sock.set_nonblocking(true).map_err(io)?;
        self.receive_max = receive_max.unwrap_or(u16::MAX);
        self.link = Some(link);
        self.last_write = Instant::now();
        // What came in the same read as the CONNACK (a session's queued
        // messages): handed on after `Connected`.
        if let Err(e) = self.decode_all() {
            self.drop_link();
            self.events.clear();
            return Err((e, false));
        }
        Ok(session_present)
    }

    fn encode_connect(&self) -> Result<BytesMut, String> {
        let mut buf = BytesMut::new();
        let keep_alive = self.keep_alive().as_secs() as u16;
        let login = self
            .ep
            .username
            .as_ref()
            .map(|u| (u.clone(), self.ep.password.clone().unwrap_or_default()));
        let r = if self.v5() {
            let mut props = p5::ConnectProperties::new();
            props.max_packet_size = Some(self.ep.max_packet as u32);
            if !self.ep.clean_session {
                props.session_expiry_interval = Some(u32::MAX);
            }
            let c = p5::Connect {
                keep_alive,
                client_id: self.ep.client_id.clone(),
                clean_start: self.ep.clean_session,
                properties: Some(props),
            };
            let will = self.ep.last_will.as_ref().map(|w| {
                p5::LastWill::new(&w.topic, w.payload.clone(), qos5(w.qos), w.retain, None)
            });
            let login = login.map(|(u, p)| p5::Login::new(u, p));
            p5::Packet::Connect(c, will, login)
                .write(&mut buf, None)
                .map_err(|e| e.to_string())
        } else {
            let mut c = p4::Connect::new(self.ep.client_id.clone());
            c.keep_alive = keep_alive;
            c.clean_session = self.ep.clean_session;
            c.last_will = self
                .ep
                .last_will
                .as_ref()
                .map(|w| p4::LastWill::new(&w.topic, w.payload.clone(), qos(w.qos), w.retain));
            if let Some((u, p)) = login {
                c.set_login(u, p);
            }
            p4::Packet::Connect(c)
                .write(&mut buf, usize::MAX)
                .map_err(|e| e.to_string())
        };
        r.map(|_| buf)
    }

    /// Decodes the next whole packet in `rbuf`, if there is one.
    fn decode_one(&mut self) -> Result<Option<Incoming>, String> {
        if self.skip > 0 {
            let n = self.skip.min(self.rbuf.len());
            let _ = self.rbuf.split_to(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        let max = self.ep.max_packet;
        if let Some((byte0, header, remaining)) = fixed_header(&self.rbuf) {
            if remaining > max && byte0 >> 4 == 3 {
                return self.oversized(byte0, header, remaining);
            }
        }
        if self.v5() {
            match p5::Packet::read(&mut self.rbuf, Some(max as u32)) {
                Ok(p) => Ok(Some(incoming5(p))),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(bad_packet(&e, max)),
            }
        } else {
            match p4::Packet::read(&mut self.rbuf, max) {
                Ok(p) => Ok(Some(incoming4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(bad_packet(&e, max)),
            }
        }
    }

    /// A PUBLISH larger than the connection takes: its head (topic, packet
    /// id, the payload's first [`OVERSIZE_PREFIX`] bytes) is decoded and
    /// handed on with its size, so the pipeline dead-letters it and a QoS 1
    /// message is acknowledged, not sent again forever; the rest is
    /// discarded as it comes, never held.
    fn oversized(
        &mut self,
        byte0: u8,
        header: usize,
        remaining: usize,
    ) -> Result<Option<Incoming>, String> {
        // Topic (at most 65,535 bytes), packet id, MQTT 5 properties, and
        // the payload's first bytes.
        let keep = remaining.min(HEAD);
        if self.rbuf.len() < header + keep {
            return Ok(None);
        }
        let mut head = BytesMut::with_capacity(keep + 5);
        head.extend_from_slice(&[byte0]);
        let mut n = keep;
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            head.extend_from_slice(&[if n > 0 { b | 0x80 } else { b }]);
            if n == 0 {
                break;
            }
        }
        head.extend_from_slice(&self.rbuf[header..header + keep]);
        let _ = self.rbuf.split_to(header + keep);
        self.skip = remaining - keep;
        let decoded = if self.v5() {
            p5::Packet::read(&mut head, None)
                .map(incoming5)
                .map_err(|e| e.to_string())
        } else {
            p4::Packet::read(&mut head, usize::MAX)
                .map(incoming4)
                .map_err(|e| e.to_string())
        };
        match decoded {
            Ok(Incoming::Publish {
                topic,
                payload,
                pkid,
                qos,
                dup,
                retain,
                ..
            }) => {
                let size = remaining - (keep - payload.len());
                tracing::debug!(topic = %topic, size, max = self.ep.max_packet, "message larger than the connection takes: handed on as oversized");
                Ok(Some(Incoming::Publish {
                    topic,
                    payload: payload.slice(..payload.len().min(OVERSIZE_PREFIX)),
                    size,
                    pkid,
                    qos,
                    dup,
                    retain,
                }))
            }
            Ok(_) | Err(_) => Err(format!(
                "the broker sent a message of {remaining} bytes, more than {} and with a head that cannot be read",
                self.ep.max_packet
            )),
        }
    }

    /// Writes what is queued, then reads what is there; waits up to `wait`
    /// when there is nothing. `Err`: the connection is lost.
    ///
    /// A quiet stream is read as each message comes: the thread sleeps in
    /// `poll` and wakes at once. A busy one (the last wait ended within
    /// [`COALESCE`]) is read in slices: when the socket is empty the thread
    /// sleeps [`COALESCE`] on a timer, not in `poll`, and then reads what
    /// came meanwhile, so dozens of messages cost one wake-up instead of
    /// one each; even with `wait` zero it looks once more after such a
    /// pause before it reports that nothing came.
    fn exchange(&mut self, wait: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut coalesced = false;
        if let Some(reason) = self.failed.take() {
            return Err(reason);
        }
        loop {
            self.take_requests();
            self.encode_requests()?;
            self.flush()?;
            if self.closing || std::mem::take(&mut self.woken) {
                return Ok(());
            }
            // A PINGREQ after a keep-alive without writing, and after
            // PUBACKs: its PINGRESP says the broker processed them.
            let keep_alive = self.keep_alive();
            if self.awaiting_ping {
                if !keep_alive.is_zero() && self.ping_sent.elapsed() >= keep_alive {
                    return Err(format!(
                        "the broker did not answer a ping within {} s",
                        keep_alive.as_secs()
                    ));
                }
            } else if !self.acks_written.is_empty()
                || (!keep_alive.is_zero() && self.last_write.elapsed() >= keep_alive)
            {
                self.awaiting_ping = true;
                self.acks_pinged = self.acks_written.len();
                self.encode(Out::Ping)?;
                self.flush()?;
                self.ping_sent = self.last_write;
            }
            let Some(link) = &mut self.link else {
                return Err("not connected".into());
            };
            // A socket known to be empty is not asked again (a `recv` that
            // fails with EAGAIN costs as much as one that reads).
            let read = if self.read_dry {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                link.read(&mut self.scratch)
            };
            match read {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(n) => {
                    coalesced = false;
                    // A plain socket that filled less than the buffer had
                    // nothing more (TLS may hold decrypted bytes back).
                    self.read_dry = n < self.scratch.len() && link.tls.is_none();
                    self.rbuf.extend_from_slice(&self.scratch[..n]);
                    self.decode_all()?;
                    if !self.events.is_empty() {
                        return Ok(());
                    }
                    // Only pings or SUBACKs: go on reading.
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.read_dry = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_reason(&e).0),
            }
            // Nothing to read.
            let left = wait.saturating_sub(started.elapsed());
            if self.busy && !coalesced {
                coalesced = true;
                std::thread::sleep(if left.is_zero() {
                    COALESCE
                } else {
                    left.min(COALESCE)
                });
                self.read_dry = false;
                continue;
            }
            if left.is_zero() {
                self.busy = false;
                return Ok(());
            }
            let until_ping = if keep_alive.is_zero() {
                left
            } else if self.awaiting_ping {
                keep_alive.saturating_sub(self.ping_sent.elapsed())
            } else {
                keep_alive.saturating_sub(self.last_write.elapsed())
            };
            self.sleep(left.min(until_ping).max(Duration::from_micros(1)))?;
        }
    }

    /// Sleeps until the socket is readable, a request wakes us, or
    /// `timeout` passes.
    fn sleep(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        // `exchange` sleeps only after a read found nothing: no TLS
        // plaintext is buffered.
        if !self.shared.park() {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: link.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let slept = Instant::now();
        let r = poll(&mut fds, Some(timeout));
        self.shared.parked.store(false, Ordering::SeqCst);
        self.read_dry = fds[0].revents == 0;
        r.map_err(|e| format!("poll: {e}"))?;
        self.busy = fds[0].revents != 0 && slept.elapsed() < COALESCE;
        if fds[1].revents != 0 {
            let mut drain = [0u8; 64];
            while matches!((&self.wake_rx).read(&mut drain), Ok(n) if n > 0) {}
        }
        Ok(())
    }

    /// Decodes every whole packet read so far into events (and PUBACKs).
    fn decode_all(&mut self) -> Result<(), String> {
        while let Some(p) = self.decode_one()? {
            match p {
                Incoming::Publish {
                    topic,
                    payload,
                    size,
                    pkid,
                    qos,
                    dup,
                    retain,
                } => {
                    if qos == QoS::ExactlyOnce {
                        // Subscriptions ask for at most QoS 1, and the
                        // broker sends at most what was granted.
                        return Err(
                            "the broker sent a QoS 2 message to a QoS 1 subscription".into()
                        );
                    }
                    if qos == QoS::AtLeastOnce && !self.manual_acks {
                        self.encode(Out::PubAck(pkid))?;
                    }
                    self.events.push_back(Ev::Message {
                        topic,
                        payload,
                        size,
                        pkid,
                        dup,
                        retain,
                    });
                }
                Incoming::PubAck(id) => self.events.push_back(Ev::PubAck(id)),
                Incoming::SubAck(id, refused) => {
                    let filter = self.subscribing.remove(&id);
                    if refused {
                        tracing::error!(
                            broker = %self.ep.url,
                            filter = filter.as_deref().unwrap_or("?"),
                            "the broker refused the subscription (check its ACL and the filter)"
                        );
                    }
                }
                Incoming::PingResp => {
                    // The broker handles a connection's packets in order:
                    // the PUBACKs written before this ping are processed.
                    self.awaiting_ping = false;
                    for id in self.acks_written.drain(..self.acks_pinged) {
                        self.events.push_back(Ev::AckSent(id));
                    }
                    self.acks_pinged = 0;
                }
                Incoming::Disconnect(reason) => return Err(reason),
                Incoming::ConnAck { .. } => {
                    return Err("the broker sent a second CONNACK".into());
                }
                Incoming::Other => {}
            }
        }
        Ok(())
    }

    fn encode_requests(&mut self) -> Result<(), String> {
        for r in std::mem::take(&mut self.taken) {
            match r {
                Request::Subscribe {
                    filter,
                    qos,
                    retain_as_published,
                } => {
                    let pkid = self.next_pkid();
                    self.encode(Out::Subscribe {
                        pkid,
                        filter: &filter,
                        qos,
                        retain_as_published,
                    })?;
                    self.subscribing.insert(pkid, filter);
                }
                Request::Unsubscribe(filter) => {
                    let pkid = self.next_pkid();
                    self.encode(Out::Unsubscribe {
                        pkid,
                        filter: &filter,
                    })?;
                }
                Request::Ack(pkid) => {
                    self.encode(Out::PubAck(pkid))?;
                    self.acks_in_wbuf.push(pkid);
                }
                Request::Disconnect => {
                    self.encode(Out::Disconnect)?;
                    self.closing = true;
                }
                Request::Wake => self.woken = true,
            }
        }
        Ok(())
    }

    fn encode(&mut self, out: Out<'_>) -> Result<(), String> {
        let max = self.ep.max_packet;
        let r = if self.v5() {
            let p = match out {
                Out::PubAck(id) => p5::Packet::PubAck(p5::PubAck::new(id, None)),
                Out::Ping => p5::Packet::PingReq(p5::PingReq),
                Out::Disconnect => p5::Packet::Disconnect(p5::Disconnect::new(
                    p5::DisconnectReasonCode::NormalDisconnection,
                )),
                Out::Subscribe {
                    pkid,
                    filter,
                    qos: q,
                    retain_as_published,
                } => {
                    let mut f = p5::Filter::new(filter, qos5(q));
                    f.preserve_retain = retain_as_published;
                    let mut s = p5::Subscribe::new(f, None);
                    s.pkid = pkid;
                    p5::Packet::Subscribe(s)
                }
                Out::Unsubscribe { pkid, filter } => {
                    let mut u = p5::Unsubscribe::new(filter, None);
                    u.pkid = pkid;
                    p5::Packet::Unsubscribe(u)
                }
            };
            p.write(&mut self.wbuf, Some(max as u32))
                .map_err(|e| e.to_string())
        } else {
            let p = match out {
                Out::PubAck(id) => p4::Packet::PubAck(p4::PubAck::new(id)),
                Out::Ping => p4::Packet::PingReq,
                Out::Disconnect => p4::Packet::Disconnect,
                Out::Subscribe {
                    pkid,
                    filter,
                    qos: q,
                    ..
                } => {
                    let mut s = p4::Subscribe::new(filter, qos(q));
                    s.pkid = pkid;
                    p4::Packet::Subscribe(s)
                }
                Out::Unsubscribe { pkid, filter } => {
                    let mut u = p4::Unsubscribe::new(filter);
                    u.pkid = pkid;
                    p4::Packet::Unsubscribe(u)
                }
            };
            p.write(&mut self.wbuf, max).map_err(|e| e.to_string())
        };
        r.map(|_| ())
            .map_err(|e| format!("cannot encode a packet: {e}"))
    }

    /// Writes `wbuf` out (and TLS records left by [`Conn::write_some`]);
    /// reports manual PUBACKs as sent.
    fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            if let Some(link) = self.link.as_mut().filter(|l| l.pending()) {
                link.flush_tls().map_err(|e| io_reason(&e).0)?;
            }
            return Ok(());
        }
        let Some(link) = &mut self.link else {
            return Err("not connected".into());
        };
        link.write_all(&self.wbuf).map_err(|e| io_reason(&e).0)?;
        self.wbuf.clear();
        self.last_write = Instant::now();
        self.acks_written.append(&mut self.acks_in_wbuf);
        if self.closing {
            self.drop_link();
        }
        Ok(())
    }
}

impl Conn {
    /// Whether the connection is up (publishes can be written).
    pub(crate) fn is_up(&self) -> bool {
        self.link.is_some() && !self.closing
    }

    /// QoS 1 publishes the broker takes unacknowledged.
    pub(crate) fn receive_max(&self) -> usize {
        self.receive_max as usize
    }

    /// A packet id not in `used`, for a QoS 1 publish.
    pub(crate) fn publish_id(&mut self, used: impl Fn(u16) -> bool) -> u16 {
        loop {
            let id = self.next_pkid();
            if !used(id) {
                return id;
            }
        }
    }

    /// Encodes a PUBLISH; it leaves with [`Conn::flush_now`] or the next
    /// step.
    pub(crate) fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        q: u8,
        retain: bool,
        pkid: u16,
    ) -> Result<(), String> {
        let max = self.ep.max_packet;
        let r = if self.v5() {
            let mut p = p5::Publish::new(topic, qos5(q), payload.to_vec(), None);
            p.retain = retain;
            p.pkid = pkid;
            p5::Packet::Publish(p)
                .write(&mut self.wbuf, Some(max as u32))
                .map_err(|e| e.to_string())
        } else {
            let mut p = p4::Publish::new(topic, qos(q), payload.to_vec());
            p.retain = retain;
            p.pkid = pkid;
            p4::Packet::Publish(p)
                .write(&mut self.wbuf, max)
                .map_err(|e| e.to_string())
        };
        r.map(|_| ())
            .map_err(|e| format!("cannot encode a message for {topic}: {e}"))
    }

    /// Writes what is encoded. `false`: the connection is lost (the next
    /// step reports it).
    pub(crate) fn flush_now(&mut self) -> bool {
        match self.flush() {
            Ok(()) => true,
            Err(reason) => {
                self.drop_link();
                self.events.push_back(Ev::Disconnected {
                    reason,
                    permanent: false,
                });
                false
            }
        }
    }

    /// Writes what is encoded as far as the socket takes it now, without
    /// waiting (for a thread other than the connection's, which must not
    /// block): `true` when all of it left. What is left leaves with the
    /// connection's next step. A failed write never closes the link here
    /// (the connection's thread may be waiting on its socket): the next
    /// step reports the connection lost.
    pub(crate) fn write_some(&mut self) -> bool {
        let Some(link) = self.link.as_mut().filter(|_| self.failed.is_none()) else {
            return false;
        };
        if !self.wbuf.is_empty() {
            match link.try_write(&self.wbuf) {
                Ok(n) => {
                    use bytes::Buf;
                    self.wbuf.advance(n);
                    if n > 0 {
                        self.last_write = Instant::now();
                    }
                }
                Err(e) => {
                    self.failed = Some(io_reason(&e).0);
                    return false;
                }
            }
        }
        self.wbuf.is_empty() && !link.pending()
    }

    /// Nothing encoded waits to be written.
    pub(crate) fn written(&self) -> bool {
        self.wbuf.is_empty() && !self.link.as_ref().is_some_and(|l| l.pending())
    }

    /// Prepares to wait for the broker away from the connection (so other
    /// threads can publish through it meanwhile): `None` when a step must
    /// come first (requests queued, data possibly buffered, output left,
    /// not connected).
    pub(crate) fn park(&mut self) -> Option<Park> {
        let link = self.link.as_ref()?;
        if !self.read_dry || !self.events.is_empty() || !self.written() || self.failed.is_some() {
            return None;
        }
        if !self.shared.park() {
            return None;
        }
        let park = Park {
            shared: self.shared.clone(),
            sock: link.sock.as_raw_fd(),
            wake: self.wake_rx.as_raw_fd(),
        };
        // The step after the wait reads.
        self.read_dry = false;
        Some(park)
    }

    /// Says DISCONNECT (a clean end: no Last Will) and closes, now.
    pub(crate) fn close(&mut self) {
        if self.link.is_some() && self.encode(Out::Disconnect).is_ok() {
            let _ = self.flush();
        }
        self.closing = true;
        self.drop_link();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.drop_link();
    }
}

/// A wait for the broker (or a request) made without holding the
/// connection: see [`Conn::park`]. Invariant: only the thread that waits
/// here steps the connection, so the socket cannot be closed (and its
/// descriptor reused) during the wait; other threads only write to it
/// ([`Conn::write_some`] never closes it).
pub(crate) struct Park {
    shared: Arc<Shared>,
    sock: i32,
    wake: i32,
}

impl Park {
    /// Sleeps until the socket is readable, a request is queued, or
    /// `timeout` passes.
    pub(crate) fn wait(self, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.sock,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        self.poll(&mut fds, timeout);
    }

    /// Sleeps until a request is queued or `timeout` passes, leaving what
    /// the broker sends in the socket meanwhile (to be read together).
    pub(crate) fn nap(self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.wake,
            events: libc::POLLIN,
            revents: 0,
        }];
        self.poll(&mut fds, timeout);
    }

    /// `fds`' last entry is the wake-up socket. The timeout is kept to the
    /// microsecond (`ppoll`), not rounded up to a millisecond.
    fn poll(&self, fds: &mut [libc::pollfd], timeout: Duration) {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for
        // the length given; `ts` outlives the call; no signal mask. An error
        // (EINTR, or EINVAL or ENOMEM here) ends the wait; the step that
        // follows finds what is wrong.
        let _ = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        self.shared.parked.store(false, Ordering::SeqCst);
        if fds.last().is_some_and(|f| f.revents != 0) {
            let mut drain = [0u8; 64];
            // SAFETY: `wake` is the connection's wake-up socket, which
            // lives as long as the connection (and `shared`); reading into
            // a local buffer of the length given.
            while unsafe { libc::read(self.wake, drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        }
    }
}

/// What of an oversized PUBLISH is read: up to the longest topic, the
/// packet id, some properties and the payload's kept prefix.
const HEAD: usize = (64 << 10) + 1024 + OVERSIZE_PREFIX;

/// A packet's first byte, the length of its fixed header and its
/// remaining length, once the header is all there.
fn fixed_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let byte0 = *b.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let c = *b.get(1 + i)?;
        len |= ((c & 0x7f) as usize) << (7 * i);
        if c & 0x80 == 0 {
            return Some((byte0, 2 + i, len));
        }
    }
    None
}

/// A packet to send.
enum Out<'a> {
    PubAck(u16),
    Ping,
    Disconnect,
    Subscribe {
        pkid: u16,
        filter: &'a str,
        qos: u8,
        retain_as_published: bool,
    },
    Unsubscribe {
        pkid: u16,
        filter: &'a str,
    },
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn qos5(q: u8) -> m5::QoS {
    if q == 0 {
        m5::QoS::AtMostOnce
    } else {
        m5::QoS::AtLeastOnce
    }
}

fn bad_packet(e: &dyn std::fmt::Display, max: usize) -> String {
    let s = e.to_string();
    if s.contains("limit") || s.contains("Size") || s.contains("size") {
        format!("the broker sent a packet larger than {max} bytes ({s})")
    } else {
        format!("malformed packet from the broker: {s}")
    }
}

fn incoming4(p: p4::Packet) -> Incoming {
    match p {
        p4::Packet::ConnAck(a) => Incoming::ConnAck {
            session_present: a.session_present,
            refused: (a.code != p4::ConnectReturnCode::Success).then(|| refusal4(a.code)),
            receive_max: None,
        },
        p4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            size: p.payload.len(),
            payload: p.payload,
            pkid: p.pkid,
            qos: p.qos,
            dup: p.dup,
            retain: p.retain,
        },
        p4::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        p4::Packet::SubAck(a) => Incoming::SubAck(
            a.pkid,
            a.return_codes
                .iter()
                .any(|c| matches!(c, p4::SubscribeReasonCode::Failure)),
        ),
        p4::Packet::PingResp => Incoming::PingResp,
        _ => Incoming::Other,
    }
}

fn incoming5(p: p5::Packet) -> Incoming {
    match p {
        p5::Packet::ConnAck(a) => Incoming::ConnAck {
            session_present: a.session_present,
            refused: (a.code != p5::ConnectReturnCode::Success).then(|| refusal5(a.code)),
            receive_max: a.properties.and_then(|p| p.receive_max),
        },
        p5::Packet::Publish(p) => Incoming::Publish {
            topic: match String::from_utf8(p.topic.to_vec()) {
                Ok(t) => t,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            },
            size: p.payload.len(),
            payload: p.payload,
            pkid: p.pkid,
            qos: match p.qos {
                m5::QoS::AtMostOnce => QoS::AtMostOnce,
                m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
                m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
            },
            dup: p.dup,
            retain: p.retain,
        },
        p5::Packet::PubAck(a) => Incoming::PubAck(a.pkid),
        p5::Packet::SubAck(a) => Incoming::SubAck(
            a.pkid,
            a.return_codes
                .iter()
                .any(|c| !matches!(c, p5::SubscribeReasonCode::Success(_))),
        ),
        p5::Packet::PingResp(_) => Incoming::PingResp,
        p5::Packet::Disconnect(d) => Incoming::Disconnect(format!(
            "the broker ended the connection ({:?}{})",
            d.reason_code,
            d.properties
                .and_then(|p| p.reason_string)
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::TcpListener;

    fn endpoint(port: u16, max_packet: usize) -> Endpoint {
        Endpoint {
            url: format!("mqtt://127.0.0.1:{port}"),
            host: "127.0.0.1".into(),
            port,
            tls: false,
            version: 4,
            client_id: "direct-test".into(),
            clean_session: true,
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            max_packet,
            last_will: None,
        }
    }

    /// A broker that accepts one connection, reads the CONNECT and then
    /// runs `script` on the socket.
    fn broker(script: impl FnOnce(TcpStream) + Send + 'static) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = [0u8; 2];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head[0], 0x10, "CONNECT first");
            let mut rest = vec![0u8; head[1] as usize];
            s.read_exact(&mut rest).unwrap();
            script(s);
        });
        port
    }

    /// Steps until `want` says an event is the one, for at most 10 s.
    fn until(conn: &mut Conn, mut want: impl FnMut(&Ev) -> bool) -> Vec<Ev> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Step::Ev(ev) = conn.step(Duration::from_millis(50)) {
                let done = want(&ev);
                seen.push(ev);
                if done {
                    return seen;
                }
            }
        }
        panic!("not seen within 10 s");
    }

    #[test]
    fn a_message_split_across_reads_arrives_whole_and_its_puback_counts_once_a_ping_confirms_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            // QoS 1 PUBLISH to "a/b", packet id 7, payload "hello", in two
            // writes with a pause between.
            let publish = [
                0x32, 12, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'e', b'l', b'l', b'o',
            ];
            s.write_all(&publish[..6]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(&publish[6..]).unwrap();
            // The PUBACK, then a PINGREQ; the PINGRESP is held back until
            // the test has looked.
            let mut got = [0u8; 6];
            s.read_exact(&mut got).unwrap();
            tx.send(got).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(&[0xD0, 0x00]).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let (mut conn, handle) = Conn::new(&endpoint(port, 1024), true).unwrap();
        let seen = until(&mut conn, |e| matches!(e, Ev::Connected { .. }));
        assert!(matches!(
            seen.last(),
            Some(Ev::Connected {
                session_present: false
            })
        ));
        let seen = until(&mut conn, |e| matches!(e, Ev::Message { .. }));
        match seen.last() {
            Some(Ev::Message {
                topic,
                payload,
                size,
                pkid,
                dup,
                retain,
            }) => {
                assert_eq!(topic, "a/b");
                assert_eq!(*size, 5);
                assert_eq!(&payload[..], b"hello");
                assert_eq!((*pkid, *dup, *retain), (7, false, false));
            }
            _ => unreachable!(),
        }
        handle.ack(7);
        // Written with a PINGREQ after it, but not yet confirmed: no
        // AckSent before the PINGRESP.
        let early = conn.step(Duration::from_millis(100));
        assert!(!matches!(early, Step::Ev(Ev::AckSent(_))));
        let written = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(written, [0x40, 0x02, 0x00, 0x07, 0xC0, 0x00]);
        let seen = until(&mut conn, |e| matches!(e, Ev::AckSent(_)));
        assert!(matches!(seen.last(), Some(Ev::AckSent(7))));
    }

    #[test]
    fn messages_in_the_same_read_as_the_connack_come_after_connected() {
        let port = broker(|mut s| {
            // CONNACK (session present) and two QoS 0 messages, one write.
            let mut all = vec![0x20, 0x02, 0x01, 0x00];
            all.extend_from_slice(&[0x30, 0x04, 0, 1, b'a', b'1']);
            all.extend_from_slice(&[0x30, 0x04, 0, 1, b'b', b'2']);
            s.write_all(&all).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let (mut conn, _h) = Conn::new(&endpoint(port, 1024), false).unwrap();
        let seen = until(
            &mut conn,
            |e| matches!(e, Ev::Message { topic, .. } if topic == "b"),
        );
        let order: Vec<String> = seen
            .iter()
            .map(|e| match e {
                Ev::Connected { session_present } => format!("connected {session_present}"),
                Ev::Message { topic, payload, .. } => {
                    format!("{topic}={}", String::from_utf8_lossy(payload))
                }
                _ => "other".into(),
            })
            .collect();
        assert_eq!(order, ["connected true", "a=1", "b=2"]);
    }

    #[test]
    fn a_refused_login_says_why_and_is_permanent() {
        // CONNACK with return code 4: bad user name or password.
        let port = broker(|mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x04]).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let (mut conn, _h) = Conn::new(&endpoint(port, 1024), false).unwrap();
        match conn.step(Duration::from_millis(10)) {
            Step::Ev(Ev::Disconnected { reason, permanent }) => {
                assert!(permanent);
                assert!(reason.contains("user name or password"), "{reason}");
            }
            _ => panic!("expected a refusal"),
        }
    }

    #[test]
    fn a_message_over_the_limit_is_handed_on_as_its_head_and_size_and_acknowledged() {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            // A QoS 1 PUBLISH to "t", packet id 5, of 5,000 bytes after the
            // fixed header (remaining length 0x88 0x27): 4,995 of payload,
            // more than the client's 1,024. Then a small QoS 0 message.
            s.write_all(&[0x32, 0x88, 0x27, 0, 1, b't', 0, 5]).unwrap();
            s.write_all(&[b'x'; 4995]).unwrap();
            s.write_all(&[0x30, 0x04, 0, 1, b'u', b'!']).unwrap();
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).unwrap();
            tx.send(ack).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let (mut conn, _h) = Conn::new(&endpoint(port, 1024), false).unwrap();
        let seen = until(
            &mut conn,
            |e| matches!(e, Ev::Message { topic, .. } if topic == "u"),
        );
        let msgs: Vec<(String, usize, usize, u16)> = seen
            .iter()
            .filter_map(|e| match e {
                Ev::Message {
                    topic,
                    payload,
                    size,
                    pkid,
                    ..
                } => Some((topic.clone(), payload.len(), *size, *pkid)),
                _ => None,
            })
            .collect();
        assert_eq!(
            msgs,
            [
                ("t".to_string(), OVERSIZE_PREFIX, 4995, 5),
                ("u".to_string(), 1, 1, 0)
            ]
        );
        assert!(!seen.iter().any(|e| matches!(e, Ev::Disconnected { .. })));
        // Acknowledged, so the broker does not send it again.
        conn.step(Duration::from_millis(50));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            [0x40, 0x02, 0x00, 0x05]
        );
    }

    #[test]
    fn a_subscribe_request_from_another_thread_wakes_the_connection() {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            let mut head = [0u8; 2];
            s.read_exact(&mut head).unwrap();
            let mut body = vec![0u8; head[1] as usize];
            s.read_exact(&mut body).unwrap();
            tx.send((head[0], body)).unwrap();
            // SUBACK, then a message on the new subscription.
            s.write_all(&[0x90, 0x03, 0x00, 0x01, 0x01]).unwrap();
            s.write_all(&[0x30, 0x06, 0, 3, b'x', b'/', b'y', b'!'])
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let (mut conn, handle) = Conn::new(&endpoint(port, 1024), false).unwrap();
        until(&mut conn, |e| matches!(e, Ev::Connected { .. }));
        let h = handle.clone();
        let asker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            h.subscribe("x/#", 1, false);
        });
        // One long wait, asleep in `poll`: only the request's wake-up lets
        // the SUBSCRIBE out, and the message that answers it ends the wait.
        let started = Instant::now();
        let step = conn.step(Duration::from_secs(30));
        asker.join().unwrap();
        let (kind, body) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(kind, 0x82, "SUBSCRIBE");
        assert_eq!(&body[2..], &[0, 3, b'x', b'/', b'#', 1]);
        assert!(
            matches!(&step, Step::Ev(Ev::Message { topic, .. }) if topic == "x/y"),
            "the message after the SUBACK"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_published_message_leaves_as_one_packet_and_its_puback_comes_back() {
        let (tx, rx) = std::sync::mpsc::channel();
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            let mut got = [0u8; 11];
            s.read_exact(&mut got).unwrap();
            tx.send(got).unwrap();
            s.write_all(&[0x40, 0x02, got[7], got[8]]).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let (mut conn, handle) = Conn::new(&endpoint(port, 1024), false).unwrap();
        until(&mut conn, |e| matches!(e, Ev::Connected { .. }));
        assert!(conn.is_up());
        let id = conn.publish_id(|id| id == 1);
        assert_ne!(id, 1, "an id in use is skipped");
        conn.publish("o/k", b"hi", 1, true, id).unwrap();
        assert!(conn.flush_now());
        // QoS 1, retained: 0x33; topic "o/k", the packet id, "hi".
        let [hi, lo] = id.to_be_bytes();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            [0x33, 9, 0, 3, b'o', b'/', b'k', hi, lo, b'h', b'i']
        );
        let seen = until(&mut conn, |e| matches!(e, Ev::PubAck(_)));
        assert!(matches!(seen.last(), Some(Ev::PubAck(p)) if *p == id));
        // A wake from another thread ends a long wait.
        handle.wake();
        let t = Instant::now();
        assert!(matches!(conn.step(Duration::from_secs(30)), Step::Nothing));
        assert!(t.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_write_that_finds_the_socket_full_never_waits_and_the_next_step_finishes_it_in_order() {
        const N: usize = 32 << 10;
        let (tx, rx) = std::sync::mpsc::channel();
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            // Read nothing for a while: the socket fills.
            std::thread::sleep(Duration::from_millis(500));
            let mut payloads = Vec::new();
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            while payloads.len() < N {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "closed early");
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some((byte0, header, len)) = fixed_header(&buf[at..]) {
                    if buf.len() < at + header + len {
                        break;
                    }
                    assert_eq!(byte0, 0x30, "QoS 0 PUBLISH");
                    let body = &buf[at + header..at + header + len];
                    // Topic "t" (3 bytes with its length), then the payload.
                    payloads.push(u32::from_be_bytes(body[3..7].try_into().unwrap()));
                    at += header + len;
                }
                buf.drain(..at);
            }
            tx.send(payloads).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let (mut conn, _handle) = Conn::new(&endpoint(port, 1 << 20), false).unwrap();
        until(&mut conn, |e| matches!(e, Ev::Connected { .. }));
        let mut payload = vec![0u8; 1024];
        let mut left_over = false;
        for i in 0..N as u32 {
            payload[..4].copy_from_slice(&i.to_be_bytes());
            conn.publish("t", &payload, 0, false, 0).unwrap();
            let t = Instant::now();
            if !conn.write_some() {
                left_over = true;
            }
            assert!(
                t.elapsed() < Duration::from_millis(400),
                "a write waited for room"
            );
        }
        assert!(
            left_over,
            "32 MiB fit in the socket: the test proves nothing"
        );
        assert!(!conn.written());
        assert!(conn.park().is_none(), "no wait while output is left");
        // The connection's own step writes the rest, waiting for room.
        while !conn.written() {
            let _ = conn.step(Duration::ZERO);
        }
        let got = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(got, (0..N as u32).collect::<Vec<_>>());
    }

    #[test]
    fn a_wait_away_from_the_connection_ends_when_the_broker_sends_or_a_request_comes() {
        let port = broker(move |mut s| {
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // PUBACK for packet id 9.
            s.write_all(&[0x40, 0x02, 0, 9]).unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let (mut conn, handle) = Conn::new(&endpoint(port, 1024), false).unwrap();
        until(&mut conn, |e| matches!(e, Ev::Connected { .. }));
        // A step that finds nothing makes a wait possible.
        let park = loop {
            assert!(matches!(conn.step(Duration::ZERO), Step::Nothing));
            if let Some(p) = conn.park() {
                break p;
            }
        };
        let t = Instant::now();
        park.wait(Duration::from_secs(5));
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "the PUBACK did not end the wait"
        );
        let seen = until(&mut conn, |e| matches!(e, Ev::PubAck(9)));
        assert!(matches!(seen.last(), Some(Ev::PubAck(9))));
        // Now a request from another thread ends it.
        let park = loop {
            let _ = conn.step(Duration::ZERO);
            if let Some(p) = conn.park() {
                break p;
            }
        };
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            handle.wake();
        });
        let t = Instant::now();
        park.wait(Duration::from_secs(5));
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "the wake did not end the wait"
        );
        waker.join().unwrap();
        assert!(
            conn.park().is_none(),
            "the wake request is for the next step"
        );
    }
}
