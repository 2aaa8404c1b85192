//! The pipeline's availability on MQTT: a retained `online` on its status
//! topic while it runs, and `offline` when it stops or vanishes (a Last
//! Will), the convention Tasmota and Home Assistant use.
//!
//! It has a connection of its own (clean session, QoS 1), so the will
//! speaks for the whole process: a crash, a power cut or a lost network
//! all end in `offline` within the broker's keep-alive.

use super::{drive, Client, Endpoint, Ev, LastWill};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const ONLINE: &[u8] = b"online";
pub const OFFLINE: &[u8] = b"offline";

/// Keeps the status topic up to date until [`Status::stop`].
pub struct Status {
    client: Client,
    topic: String,
    stop: Arc<AtomicBool>,
    /// Status messages queued and acknowledged (QoS 1) on any connection.
    published: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Status {
    /// Connects to `ep` with the will `offline` on `topic` and publishes
    /// `online` there on every (re)connect. Connecting goes on in the
    /// background: a broker that is down now is not an error.
    pub fn start(mut ep: Endpoint, topic: &str) -> Result<Status, String> {
        ep.clean_session = true;
        ep.last_will = Some(LastWill {
            topic: topic.to_string(),
            payload: OFFLINE.to_vec(),
            qos: 1,
            retain: true,
        });
        let (client, conn) = ep.connect(16)?;
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (client, stop, topic, url) = (
                client.clone(),
                stop.clone(),
                topic.to_string(),
                ep.url.clone(),
            );
            let (published, acked) = (published.clone(), acked.clone());
            std::thread::Builder::new()
                .name("rivulet-status".into())
                .spawn(move || {
                    drive(conn, &url, "status", stop, || Duration::from_millis(500), |ev| {
                        match ev {
                            Ev::Connected { .. } => {
                                if client.try_publish(&topic, 1, true, ONLINE.to_vec()) {
                                    published.fetch_add(1, Ordering::SeqCst);
                                } else {
                                    tracing::warn!(%topic, "could not queue the status message");
                                }
                            }
                            Ev::PubAck(_) => {
                                acked.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {}
                        }
                        true
                    })
                })
                .map_err(|e| format!("cannot start the status thread: {e}"))?
        };
        tracing::debug!(%topic, "status topic");
        Ok(Status {
            client,
            topic: topic.to_string(),
            stop,
            published,
            acked,
            thread: Some(thread),
        })
    }

    /// A clean stop: `offline`, retained. Disconnects cleanly only once the
    /// broker acknowledged every status message; otherwise (a broker away,
    /// an `online` of an earlier connection never confirmed) the connection
    /// is dropped without a DISCONNECT, so the broker's will says `offline`.
    pub fn stop(mut self) {
        let sent = self
            .client
            .publish(&self.topic, 1, true, OFFLINE.to_vec())
            .is_ok();
        if sent {
            let all = self.published.fetch_add(1, Ordering::SeqCst) + 1;
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while self.acked.load(Ordering::SeqCst) < all && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if self.acked.load(Ordering::SeqCst) >= all {
                self.client.disconnect();
            }
        }
        self.shut();
    }

    /// Ends the connection thread; without a DISCONNECT before it, the
    /// broker publishes the will.
    fn shut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Status {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shut();
        }
    }
}
