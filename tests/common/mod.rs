//! Helpers for end-to-end tests: a real Mosquitto on a free loopback port,
//! the real `rivulet` binary, and an MQTT test client.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on, below the kernel's range of
/// ephemeral ports (32768–60999 by default): a port a test frees and binds
/// again (a peer or broker it restarts) cannot be taken meanwhile by some
/// connection's local end. Ports go up from a random start, so the tests
/// of one binary never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static START: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| fastrand::u16(20_000..28_000));
    for _ in 0..4000 {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed) % 4000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Every port of the range taken: let the kernel choose.
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until `f` holds; the assertion is on the outcome.
pub fn eventually(what: &str, secs: u64, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Mosquitto broker of the test's own, stopped when dropped.
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts `mosquitto` with a listener on a free loopback port and the
    /// given extra configuration lines.
    pub fn start(extra: &str) -> Broker {
        assert!(
            Command::new("mosquitto")
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "these tests need Mosquitto: apt-get install mosquitto"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        writeln!(f, "listener {port} 127.0.0.1").unwrap();
        writeln!(f, "set_tcp_nodelay true").unwrap();
        // Subscriptions appear in the log, so tests can wait for them.
        for t in ["error", "warning", "notice", "information", "subscribe"] {
            writeln!(f, "log_type {t}").unwrap();
        }
        // Running as root, mosquitto would switch to its own user.
        writeln!(f, "user root").unwrap();
        if !extra.contains("allow_anonymous") {
            writeln!(f, "allow_anonymous true").unwrap();
        }
        writeln!(f, "{extra}").unwrap();
        drop(f);
        let mut b = Broker {
            port,
            dir,
            conf,
            child: None,
        };
        b.launch();
        b
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        eventually("mosquitto to listen", 10, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM, so it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Kills the broker (SIGKILL: what it had saved last is all it keeps)
    /// and starts it again on the same port.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.launch();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Messages received by a test subscriber: (topic, payload).
pub type Inbox = Arc<Mutex<Vec<(String, String)>>>;

/// Messages with their bytes and retain flag: (topic, payload, retain).
pub type RawInbox = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// Subscribes to `filter` and collects messages until dropped. With a
/// `session` id the session is persistent (QoS 1 messages wait for it).
pub fn subscribe(port: u16, filter: &str, session: Option<&str>) -> (Inbox, rumqttc::Client) {
    let inbox: Inbox = Arc::default();
    let kept = inbox.clone();
    let client = subscribe_with(port, filter, session, move |p| {
        kept.lock().unwrap().push((
            p.topic.clone(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ))
    });
    (inbox, client)
}

/// Like [`subscribe`], keeping payload bytes and the retain flag.
pub fn subscribe_raw(port: u16, filter: &str) -> (RawInbox, rumqttc::Client) {
    let inbox: RawInbox = Arc::default();
    let kept = inbox.clone();
    let client = subscribe_with(port, filter, None, move |p| {
        kept.lock()
            .unwrap()
            .push((p.topic.clone(), p.payload.to_vec(), p.retain))
    });
    (inbox, client)
}

fn subscribe_with(
    port: u16,
    filter: &str,
    session: Option<&str>,
    mut on: impl FnMut(&rumqttc::Publish) + Send + 'static,
) -> rumqttc::Client {
    let id = session
        .map(str::to_string)
        .unwrap_or_else(|| format!("test-sub-{}", fastrand::u32(..)));
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(session.is_none());
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = rumqttc::Client::new(o, 100);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let client = client.clone();
        let filter = filter.to_string();
        std::thread::spawn(move || {
            let mut told = false;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.subscribe(&filter, rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) if !told => {
                        told = true;
                        let _ = tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => on(&p),
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    _ => {}
                }
            }
        });
    }
    rx.recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    client
}

/// A plain MQTT 3.1.1 endpoint on `127.0.0.1:port` (clean session,
/// keep-alive `keep_alive`), for library-level tests.
pub fn endpoint(port: u16, client_id: &str, keep_alive: Duration) -> rivulet::mqtt::Endpoint {
    rivulet::mqtt::Endpoint {
        url: format!("mqtt://127.0.0.1:{port}"),
        host: "127.0.0.1".into(),
        port,
        tls: false,
        version: 4,
        client_id: client_id.into(),
        clean_session: true,
        keep_alive,
        username: None,
        password: None,
        ca_file: None,
        client_cert: None,
        max_packet: 1 << 20,
        last_will: None,
    }
}

/// Publishes messages (QoS 1) and waits until the broker acknowledged all.
pub fn publish_all(port: u16, msgs: &[(String, String)]) {
    let msgs: Vec<(String, Vec<u8>, bool)> = msgs
        .iter()
        .map(|(t, p)| (t.clone(), p.clone().into_bytes(), false))
        .collect();
    publish_raw(port, &msgs);
}

/// Publishes (topic, payload bytes, retain) messages at QoS 1 and waits
/// until the broker acknowledged all.
pub fn publish_raw(port: u16, msgs: &[(String, Vec<u8>, bool)]) {
    let mut o =
        rumqttc::MqttOptions::new(format!("test-pub-{}", fastrand::u32(..)), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(100);
    // Room for the large payloads of the oversize tests.
    o.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut conn) = rumqttc::Client::new(o, 1000);
    let n = msgs.len();
    let msgs = msgs.to_vec();
    let sender = std::thread::spawn(move || {
        for (t, p, retain) in msgs {
            client
                .publish(t, rumqttc::QoS::AtLeastOnce, retain, p)
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    for ev in conn.iter() {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                acked += 1;
                if acked == n {
                    break;
                }
            }
            Err(e) => panic!("test publisher: {e}"),
            _ => {}
        }
    }
    let client = sender.join().unwrap();
    let _ = client.disconnect();
}

/// The one way tests start the `rivulet` binary. The process is killed
/// (SIGKILL) when this is dropped while it still runs, so a failing test
/// leaves nothing behind. Derefs to the [`Child`].
pub struct Rivulet {
    child: Option<Child>,
    /// The working directory it runs in.
    pub dir: PathBuf,
}

/// `rivulet` with `args`, run in `dir` with no standard input; the caller
/// may change it before [`Rivulet::spawn`]. `RIVULET_TEST_BIN` runs the
/// tests against another build (an earlier release, say, to tell a
/// regression from a test that is wrong).
pub fn rivulet_cmd(dir: &Path, args: &[&str]) -> Command {
    let bin = std::env::var("RIVULET_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_rivulet").to_string());
    let mut c = Command::new(bin);
    c.args(args).current_dir(dir).stdin(Stdio::null());
    c
}

impl Rivulet {
    /// Starts a prepared command (see [`rivulet_cmd`]).
    pub fn spawn(cmd: &mut Command) -> Rivulet {
        let dir = cmd
            .get_current_dir()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Rivulet {
            child: Some(cmd.spawn().expect("the rivulet binary starts")),
            dir,
        }
    }

    /// `rivulet run pipeline.yaml` in `dir`, the file written from `yaml`;
    /// stdout and stderr captured.
    pub fn start(dir: &Path, yaml: &str) -> Rivulet {
        let file = dir.join("pipeline.yaml");
        std::fs::write(&file, yaml).unwrap();
        Rivulet::spawn(
            rivulet_cmd(dir, &["run"])
                .arg(&file)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
    }

    fn take(&mut self) -> Child {
        self.child.take().expect("the process is still ours")
    }

    /// SIGTERM, then the exit code, stdout and stderr.
    pub fn stop(self) -> (Option<i32>, String, String) {
        sigterm(&self);
        self.finish()
    }

    /// Waits for the exit; the exit code, stdout and stderr.
    pub fn finish(self) -> (Option<i32>, String, String) {
        let out = self.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits for the exit, collecting what it printed (as
    /// [`Child::wait_with_output`]).
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        self.take().wait_with_output()
    }

    pub fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl std::ops::Deref for Rivulet {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("the process is still ours")
    }
}

impl std::ops::DerefMut for Rivulet {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the process is still ours")
    }
}

impl Drop for Rivulet {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A small tmpfs of the test's own (CI runs as root; mounting needs it).
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Fills the file system up with a file; returns its path (remove it
    /// to make room again).
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", filler.display()))
            .args(["bs=4k", "status=none"])
            .stderr(Stdio::null())
            .status();
        filler
    }

    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "this test mounts a small tmpfs to fill a disk: run it as root (CI does)"
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Asks a process to stop (SIGTERM), as a service manager would.
pub fn sigterm(child: &Child) {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
}
