//! Events from an MQTT broker.
//!
//! One thread drives the connection ([`crate::mqtt::drive`]) and feeds a
//! bounded queue of messages; [`MqttSource::poll`] takes from it. A full
//! queue stops the connection thread from reading, which pushes back on the
//! broker through TCP: memory stays bounded.
//!
//! Subscriptions are made again after every reconnect. QoS 1 messages are
//! acknowledged by the client when received (see docs/mqtt.md for what that
//! promises across a crash).

use super::{Poll, RawBatch, Source, SourceError, TopicBinder};
use crate::mqtt::topic::TopicPattern;
use crate::mqtt::{drive, Client, Endpoint, Ev};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Messages queued between the connection thread and the pipeline.
const QUEUE: usize = 8192;

#[derive(Clone, Debug)]
pub struct MqttSourceOptions {
    pub endpoint: Endpoint,
    pub patterns: Vec<TopicPattern>,
    pub qos: u8,
    /// Field that receives the whole topic.
    pub topic_field: Option<String>,
}

pub struct MqttSource {
    url: String,
    rx: Option<Receiver<(String, Bytes)>>,
    /// A reason the connection can never succeed, set by its thread.
    fatal: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    client: Client,
    binder: TopicBinder,
    position: u64,
}

impl MqttSource {
    /// Starts connecting (in the background; see `poll` for failures).
    pub fn start(opts: MqttSourceOptions) -> Result<Self, SourceError> {
        let url = opts.endpoint.url.clone();
        let (client, conn) = opts
            .endpoint
            .connect(64)
            .map_err(|e| SourceError::Other(format!("MQTT source {url}: {e}")))?;
        let (tx, rx) = sync_channel(QUEUE);
        let fatal = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let filters: Vec<String> = opts.patterns.iter().map(|p| p.filter.clone()).collect();
        let thread = {
            let (client, fatal, stop, url, qos) = (
                client.clone(),
                fatal.clone(),
                stop.clone(),
                url.clone(),
                opts.qos,
            );
            std::thread::Builder::new()
                .name("rivulet-mqtt-in".into())
                .spawn(move || {
                    let mut ever_connected = false;
                    drive(conn, &url, stop, |ev| match ev {
                        Ev::Connected { .. } => {
                            ever_connected = true;
                            for f in &filters {
                                if let Err(e) = client.subscribe(f, qos) {
                                    tracing::error!(broker = %url, filter = %f, error = %e, "cannot subscribe");
                                }
                            }
                            true
                        }
                        Ev::Message { topic, payload } => tx.send((topic, payload)).is_ok(),
                        Ev::Disconnected { reason, permanent } => {
                            if permanent && !ever_connected {
                                if let Ok(mut f) = fatal.lock() {
                                    *f = Some(reason);
                                }
                                return false;
                            }
                            true
                        }
                        Ev::PubAck(_) | Ev::Sent(_) => true,
                    });
                })
                .map_err(|e| SourceError::Other(format!("cannot start the MQTT thread: {e}")))?
        };
        Ok(MqttSource {
            url,
            rx: Some(rx),
            fatal,
            stop,
            thread: Some(thread),
            client,
            binder: TopicBinder {
                patterns: opts.patterns,
                topic_field: opts.topic_field,
            },
            position: 0,
        })
    }

    fn push(&mut self, batch: &mut RawBatch, msg: (String, Bytes), max_payload: usize) {
        self.position += 1;
        batch.push_message(&msg.0, &msg.1, self.position, max_payload);
    }
}

impl Source for MqttSource {
    fn describe(&self) -> String {
        format!("mqtt {}", self.url)
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        if let Some(reason) = self.fatal.lock().ok().and_then(|f| f.clone()) {
            return Err(SourceError::Other(format!(
                "MQTT broker {}: {reason}",
                self.url
            )));
        }
        let Some(rx) = self.rx.take() else {
            return Ok(Poll::Finished);
        };
        let result = match rx.recv_timeout(wait) {
            Ok(first) => {
                self.push(batch, first, max_payload);
                let mut n = 1;
                while n < max_items {
                    match rx.try_recv() {
                        Ok(m) => {
                            self.push(batch, m, max_payload);
                            n += 1;
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => break,
                    }
                }
                Ok(Poll::Open)
            }
            Err(RecvTimeoutError::Timeout) => Ok(Poll::Open),
            Err(RecvTimeoutError::Disconnected) => {
                // The connection thread ended: a fatal error, reported next poll.
                match self.fatal.lock().ok().and_then(|f| f.clone()) {
                    Some(reason) => Err(SourceError::Other(format!(
                        "MQTT broker {}: {reason}",
                        self.url
                    ))),
                    None => Err(SourceError::Other(format!(
                        "MQTT broker {}: the connection thread stopped",
                        self.url
                    ))),
                }
            }
        };
        self.rx = Some(rx);
        result
    }

    fn topic_binder(&self) -> Option<TopicBinder> {
        Some(self.binder.clone())
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock a connection thread waiting on a full queue, then wait for it.
        self.rx = None;
        self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
