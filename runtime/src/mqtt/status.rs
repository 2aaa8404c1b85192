//! The pipeline's availability on MQTT: a retained `online` on its status
//! topic while it runs, and `offline` when it stops or vanishes (a Last
//! Will), the convention Tasmota and Home Assistant use.
//!
//! It has a connection of its own (clean session, QoS 1), so the will
//! speaks for the whole process: a crash, a power cut or a lost network
//! all end in `offline` within the broker's keep-alive.

use super::{drive, Client, Endpoint, Ev, LastWill};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

pub const ONLINE: &[u8] = b"online";
pub const OFFLINE: &[u8] = b"offline";

/// Keeps the status topic up to date until [`Status::stop`].
pub struct Status {
    client: Client,
    topic: String,
    stop: Arc<AtomicBool>,
    acks: Receiver<()>,
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
        let (ack_tx, acks) = channel();
        let thread =
            {
                let (client, stop, topic, url) = (
                    client.clone(),
                    stop.clone(),
                    topic.to_string(),
                    ep.url.clone(),
                );
                std::thread::Builder::new()
                .name("rivulet-status".into())
                .spawn(move || {
                    drive(conn, &url, stop, || Duration::from_millis(500), |ev| {
                        match ev {
                            Ev::Connected { .. }
                                if !client.try_publish(&topic, 1, true, ONLINE.to_vec()) =>
                            {
                                tracing::warn!(%topic, "could not queue the status message");
                            }
                            Ev::PubAck(_) => {
                                let _ = ack_tx.send(());
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
            acks,
            thread: Some(thread),
        })
    }

    /// A clean stop: `offline`, retained, acknowledged by the broker (or
    /// the will says it once the connection is gone), then disconnects.
    pub fn stop(mut self) {
        while self.acks.try_recv().is_ok() {}
        if self
            .client
            .publish(&self.topic, 1, true, OFFLINE.to_vec())
            .is_ok()
        {
            let _ = self.acks.recv_timeout(Duration::from_secs(2));
        }
        self.shut();
    }

    fn shut(&mut self) {
        self.client.disconnect();
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
