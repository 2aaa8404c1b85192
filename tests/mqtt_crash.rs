//! Durable MQTT input: QoS 1 messages through a real Mosquitto, rivulet
//! killed with SIGKILL again and again while they arrive, and restarted
//! each time. The final window results equal those of an uninterrupted run
//! over the same events: the input journal loses nothing that was
//! acknowledged and replays nothing twice.

#![allow(clippy::unwrap_used)]

mod common;

use common::{eventually, publish_all, rivulet_cmd, Broker, Rivulet, Tmpfs};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Events in publish order, with a little disorder in event time.
fn events(n: usize) -> Vec<String> {
    let mut x = 11u64;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ts = i as i64 * 5 - (x % 200) as i64;
            format!("{{\"k\":\"k{}\",\"ts\":{ts},\"v\":{}}}", x % 40, x % 1000)
        })
        .collect()
}

fn pipeline(source: &str, out: &str, state: &str) -> String {
    format!(
        "name: mqtt-crash\nsource:\n{source}  event_time: {{ field: ts, max_out_of_orderness: 250ms, plausible_years: any }}\n\
         steps:\n  - key_by: k\n  - window:\n      tumbling: 1s\n      allowed_lateness: 200ms\n      \
         aggregate: {{ n: count(), total: sum(v), hi: max(v), first: first(v), last: last(v) }}\n\
         sink: {{ file: {{ path: {out} }} }}\nlate: {{ file: {{ path: {out}.late }} }}\n{state}"
    )
}

fn start(dir: &Path, file: &str) -> Rivulet {
    Rivulet::spawn(
        rivulet_cmd(dir, &["run", file])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("rivulet.log"))
                    .unwrap(),
            )),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn window_of(line: &str) -> (String, i64) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (
        v["k"].as_str().unwrap().to_string(),
        v["window_start"].as_i64().unwrap(),
    )
}

/// Runs `evs` from a file, uninterrupted: the results to expect. The end
/// of the file also closes the flush event's own window; over MQTT that
/// window stays open, so it is left out.
fn reference(d: &Path, evs: &[String]) -> BTreeSet<String> {
    std::fs::write(d.join("events.jsonl"), evs.join("\n") + "\n").unwrap();
    std::fs::write(
        d.join("reference.yaml"),
        pipeline("  file: { path: events.jsonl }\n", "reference.jsonl", ""),
    )
    .unwrap();
    assert!(start(d, "reference.yaml").wait().unwrap().success());
    lines(&d.join("reference.jsonl"))
        .into_iter()
        .filter(|l| window_of(l).0 != "flush")
        .collect()
}

/// Writes `file`: QoS 1 from `topic` (client id `<topic>-in`), the window
/// pipeline, and `state`; starts it and waits for its subscription.
fn start_mqtt(d: &Path, broker: &Broker, file: &str, topic: &str, state: &str) -> Rivulet {
    let source = format!(
        "  mqtt: {{ url: \"{}\", topics: [{topic}], topic_field: \"\", qos: 1, client_id: {}-in }}\n",
        broker.url(),
        topic.replace('/', "-")
    );
    std::fs::write(d.join(file), pipeline(&source, "out.jsonl", state)).unwrap();
    let child = start(d, file);
    eventually("rivulet's subscription", 20, || {
        broker.log().contains(topic)
    });
    child
}

fn on_topic(topic: &str, evs: &[String]) -> Vec<(String, String)> {
    evs.iter().map(|e| (topic.to_string(), e.clone())).collect()
}

/// Waits (bounded) until `out.jsonl` holds a result for every window of
/// `want`; on timeout, fails with rivulet's log.
fn wait_for_windows(d: &Path, want: &BTreeSet<String>) {
    let want: BTreeSet<(String, i64)> = want.iter().map(|l| window_of(l)).collect();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<(String, i64)> = lines(&d.join("out.jsonl"))
            .iter()
            .map(|l| window_of(l))
            .collect();
        if want.is_subset(&got) {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{} of {} windows:\n{}",
            got.len(),
            want.len(),
            std::fs::read_to_string(d.join("rivulet.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn qos1_input_killed_twenty_times_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut evs = events(12_000);
    // Far ahead in event time: closes every window of the events above.
    evs.push("{\"k\":\"flush\",\"ts\":100000000,\"v\":0}".to_string());

    // The uninterrupted run: the same events from a file.
    let reference = reference(d, &evs);
    assert!(reference.len() > 1000, "{} results", reference.len());

    // The broker queues everything for the persistent session while
    // rivulet is down (Mosquitto's default drops beyond 1000). The first
    // start makes the session and its subscription.
    let broker = Broker::start("max_queued_messages 0\nmax_inflight_messages 100");
    let state = "state: { dir: state, checkpoint_interval: 50ms }\n";
    let mut child = start_mqtt(d, &broker, "crash.yaml", "crash/in", state);

    let port = broker.port;
    let msgs = on_topic("crash/in", &evs);
    let publisher = std::thread::spawn(move || {
        for chunk in msgs.chunks(400) {
            publish_all(port, chunk);
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let mut kills = 0;
    let mut rng = fastrand::Rng::with_seed(5);
    while kills < 20 || !publisher.is_finished() {
        std::thread::sleep(Duration::from_millis(rng.u64(30..300)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        child = start(d, "crash.yaml");
    }
    publisher.join().unwrap();

    // The last run goes on until every window is out.
    wait_for_windows(d, &reference);
    common::sigterm(&child);
    assert!(child.wait().unwrap().success());

    let got = lines(&d.join("out.jsonl"));
    let mut by_window: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    for l in &got {
        by_window.entry(window_of(l)).or_default().insert(l.clone());
    }
    // Results emitted again after a restart are byte-identical; none differs
    // from the uninterrupted run (a lost or doubled event would).
    let wrong: Vec<_> = by_window
        .values()
        .flatten()
        .filter(|l| !reference.contains(*l))
        .take(5)
        .collect();
    let expected: Vec<_> = wrong
        .iter()
        .map(|l| reference.iter().find(|r| window_of(r) == window_of(l)))
        .collect();
    assert!(
        wrong.is_empty(),
        "after {kills} kills, results differ: {wrong:?}, expected {expected:?}"
    );
    // Late records too: the same set.
    let late_ref: BTreeSet<String> = lines(&d.join("reference.jsonl.late")).into_iter().collect();
    let late_got: BTreeSet<String> = lines(&d.join("out.jsonl.late")).into_iter().collect();
    assert_eq!(late_got, late_ref);
}

fn inspect_header(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_quiet_input_is_checkpointed_and_an_idle_pipeline_gives_a_savepoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Broker::start("");
    let state = "state: { dir: state, checkpoint_interval: 100ms }\n";
    let mut child = start_mqtt(d, &broker, "p.yaml", "quiet/in", state);
    publish_all(broker.port, &on_topic("quiet/in", &events(300)));
    // Nothing more arrives; the checkpoint still catches up with the input.
    eventually("a checkpoint of all 300 messages", 20, || {
        inspect_header(&d.join("state")).contains("input position 300")
    });
    // A savepoint of a pipeline with no input.
    let sp = d.join("idle.redb");
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .arg("savepoint")
        .arg("p.yaml")
        .current_dir(d)
        .arg("--out")
        .arg(&sp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inspect_header(&sp).contains("input position 300"));

    // Killed now, restarted: the journal holds nothing unprocessed, so no
    // result comes out again.
    let before = lines(&d.join("out.jsonl"));
    assert!(!before.is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    let child = start(d, "p.yaml");
    publish_all(
        broker.port,
        &[(
            "quiet/in".to_string(),
            "{\"k\":\"flush\",\"ts\":100000000,\"v\":0}".to_string(),
        )],
    );
    eventually("the flush event's checkpoint", 20, || {
        inspect_header(&d.join("state")).contains("input position 301")
    });
    common::sigterm(&child);
    let mut child = child;
    assert!(child.wait().unwrap().success());
    let after = lines(&d.join("out.jsonl"));
    let new: Vec<_> = after[before.len()..].to_vec();
    // Only windows the flush event closed; none of them was emitted before.
    let old: BTreeSet<(String, i64)> = before.iter().map(|l| window_of(l)).collect();
    assert!(!new.is_empty());
    for l in &new {
        assert!(!old.contains(&window_of(l)), "emitted again: {l}");
    }
}

#[test]
fn a_full_disk_holds_back_acknowledgements_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk");
    let fs = Tmpfs::mount(&disk, "8m");
    // Padded payloads, so the journal must grow while the disk is full.
    let pad = "x".repeat(300);
    let mut evs: Vec<String> = events(6000)
        .into_iter()
        .map(|e| format!("{},\"pad\":\"{pad}\"}}", &e[..e.len() - 1]))
        .collect();
    evs.push("{\"k\":\"flush\",\"ts\":100000000,\"v\":0}".to_string());
    let reference = reference(d, &evs);
    let broker = Broker::start("max_queued_messages 0");
    let state = format!(
        "state: {{ dir: {}, checkpoint_interval: 100ms }}\n",
        disk.join("state").display()
    );
    let child = start_mqtt(d, &broker, "p.yaml", "full/in", &state);
    let msgs = on_topic("full/in", &evs);
    publish_all(broker.port, &msgs[..1000]);
    eventually("a checkpoint of the first 1000 messages", 20, || {
        inspect_header(&disk.join("state")).contains("input position 1000")
    });

    let filler = fs.fill();
    // The broker takes the rest; rivulet cannot journal it.
    publish_all(broker.port, &msgs[1000..msgs.len() - 1]);
    let log = || std::fs::read_to_string(d.join("rivulet.log")).unwrap_or_default();
    eventually("the journal failure to be reported", 20, || {
        log().contains("cannot write the input journal")
    });
    // Room again: everything held at the broker comes through.
    std::fs::remove_file(&filler).unwrap();
    publish_all(broker.port, &msgs[msgs.len() - 1..]);
    wait_for_windows(d, &reference);
    common::sigterm(&child);
    let mut child = child;
    assert!(child.wait().unwrap().success(), "{}", log());
    assert!(log().contains("the input journal works again"), "{}", log());
    let got: BTreeSet<String> = lines(&d.join("out.jsonl")).into_iter().collect();
    assert_eq!(got, reference, "nothing lost, nothing counted twice");
}

/// The source on its own: messages that do not fit in the queue to the
/// pipeline are read back from the journal, in order, none twice; a restart
/// replays what no checkpoint covered.
#[test]
fn a_source_far_behind_reads_the_overflow_from_the_journal() {
    use rivulet::sources::mqtt::MqttSource;
    use rivulet::sources::{RawBatch, Source};

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start("max_queued_messages 0\nmax_inflight_messages 1000");
    let open = || {
        rivulet::sources::mqtt::MqttSource::start(source_options(broker.port, Some(dir.path())))
            .unwrap()
    };
    let mut src = open();
    let mut batch = RawBatch::default();
    // The first poll connects; nothing is taken for a while after it.
    src.poll(&mut batch, 1024, 1 << 20, Duration::ZERO).unwrap();
    eventually("the subscription", 20, || broker.log().contains("ov/in"));
    let n = 20_000; // more than the queue to the pipeline holds (8192)
    let msgs: Vec<(String, String)> = (0..n).map(|i| ("ov/in".into(), format!("{i}"))).collect();
    publish_all(broker.port, &msgs);

    let mut got: Vec<(u64, String)> = Vec::new();
    let take = |src: &mut MqttSource, got: &mut Vec<(u64, String)>, until: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.len() < until {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {until}",
                got.len()
            );
            let mut b = RawBatch::default();
            src.poll(&mut b, 1024, 1 << 20, Duration::from_millis(50))
                .unwrap();
            assert!(b.len() <= 1024);
            for it in &b.items {
                got.push((
                    it.position,
                    String::from_utf8_lossy(b.payload(it)).into_owned(),
                ));
            }
        }
    };
    take(&mut src, &mut got, 15_000);
    drop(src); // stopped without a checkpoint: the rest stays in the journal
    let mut src = open();
    let taken = got.last().unwrap().0;
    src.seek(&taken.to_le_bytes()).unwrap();
    take(&mut src, &mut got, n);
    let want: Vec<(u64, String)> = (0..n).map(|i| (i as u64 + 1, format!("{i}"))).collect();
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    if let Some(i) = first_bad {
        panic!(
            "out of order or repeated at {i} (taken before the restart: {taken}): {:?}",
            &got[i.saturating_sub(2)..(i + 3).min(got.len())]
        );
    }
    assert_eq!(got.len(), want.len());
    drop(src);
}

/// MQTT 5 ends a session at disconnect unless told otherwise: the source
/// asks for a persistent one, so what is published while rivulet is down
/// still arrives.
#[test]
fn mqtt5_messages_published_while_rivulet_is_down_arrive_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Broker::start("max_queued_messages 0");
    let source = format!(
        "  mqtt: {{ url: \"{}\", version: 5, topics: [v5/in], topic_field: \"\", qos: 1, client_id: v5-in }}\n",
        broker.url()
    );
    let state = "state: { dir: state, checkpoint_interval: 50ms }\n";
    std::fs::write(d.join("p.yaml"), pipeline(&source, "out.jsonl", state)).unwrap();
    let mut child = start(d, "p.yaml");
    eventually("rivulet's subscription", 20, || {
        broker.log().contains("v5/in")
    });
    let evs = events(400);
    publish_all(broker.port, &on_topic("v5/in", &evs[..200]));
    eventually("200 messages checkpointed", 20, || {
        inspect_header(&d.join("state")).contains("input position 200")
    });
    child.kill().unwrap();
    child.wait().unwrap();
    publish_all(broker.port, &on_topic("v5/in", &evs[200..]));
    let mut child = start(d, "p.yaml");
    eventually("all 400 messages checkpointed", 20, || {
        inspect_header(&d.join("state")).contains("input position 400")
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_foreign_journal_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("state")).unwrap();
    std::fs::write(d.join("state/journal.redb"), b"not a database at all").unwrap();
    // No broker is needed: the journal is opened before connecting.
    let source = "  mqtt: { url: \"mqtt://127.0.0.1:9\", topics: [x], qos: 1 }\n";
    let state = "state: { dir: state }\n";
    std::fs::write(d.join("p.yaml"), pipeline(source, "out.jsonl", state)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["run", "p.yaml"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("journal.redb") && !err.contains("panicked"),
        "{err}"
    );
}

/// A journaled QoS 1 source on `ov/in` at `127.0.0.1:port`.
fn source_options(port: u16, journal: Option<&Path>) -> rivulet::sources::mqtt::MqttSourceOptions {
    rivulet::sources::mqtt::MqttSourceOptions {
        endpoint: rivulet::mqtt::Endpoint {
            clean_session: false,
            ..common::endpoint(port, "overflow-in", Duration::from_secs(30))
        },
        patterns: vec![rivulet::mqtt::topic::TopicPattern::parse("ov/in").unwrap()],
        qos: 1,
        topic_field: None,
        journal_dir: journal.map(Path::to_path_buf),
        stamp_arrivals: false,
        retain_as_published: false,
        share_group: None,
    }
}

/// The reader lingers for more events by polling again with what is left of
/// its millisecond: the source must wait, not return at once (which made the
/// reader spin). A lower bound on the time taken, so no flakiness.
#[test]
fn a_poll_asked_to_wait_waits_even_when_the_batch_has_events() {
    use rivulet::sources::{RawBatch, Source};
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port(); // nothing listens: no message comes
    for journal in [None, Some(dir.path())] {
        let mut src =
            rivulet::sources::mqtt::MqttSource::start(source_options(port, journal)).unwrap();
        let mut batch = RawBatch::default();
        batch.push(b"{}", 1);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            src.poll(&mut batch, 100, 1 << 20, Duration::from_millis(20))
                .unwrap();
            assert!(
                t.elapsed() >= Duration::from_millis(20),
                "returned after {:?} (journal: {})",
                t.elapsed(),
                journal.is_some()
            );
            assert_eq!(batch.len(), 1);
        }
    }
}

/// The journal reports what it holds through the run context's registry.
#[test]
fn the_journal_counts_its_entries_in_the_metrics() {
    use rivulet::sources::{RawBatch, Source};
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let mut src =
        rivulet::sources::mqtt::MqttSource::start(source_options(b.port, Some(dir.path())))
            .unwrap();
    let ctx = rivulet::context::RunContext::new("j", Default::default(), Default::default());
    src.start(&ctx.for_operator("source"));
    let mut batch = RawBatch::default();
    src.poll(&mut batch, 100, 1 << 20, Duration::from_millis(10))
        .unwrap();
    eventually("the subscription", 20, || b.log().contains("ov/in"));
    let msgs: Vec<(String, String)> = (0..25)
        .map(|i| ("ov/in".to_string(), format!("{{\"i\":{i}}}")))
        .collect();
    publish_all(b.port, &msgs);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while batch.len() < 25 && std::time::Instant::now() < deadline {
        src.poll(&mut batch, 100, 1 << 20, Duration::from_millis(20))
            .unwrap();
    }
    assert_eq!(batch.len(), 25);
    // Nothing was checkpointed, so nothing was trimmed: all 25 are held.
    assert_eq!(
        ctx.metrics.total(rivulet::metrics::names::JOURNAL_ENTRIES),
        25
    );
}

/// Wall-clock milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn ingestion_time_survives_kill_9_the_replay_windows_each_message_as_the_first_time() {
    let broker = Broker::start("max_queued_messages 0");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Payloads without a timestamp. No checkpoint before the kill (the
    // interval is long): everything comes back from the journal.
    let yaml = format!(
        "name: ingest\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"dev/{{k}}\"], qos: 1 }}\n  time: ingestion\n\
         steps:\n  - key_by: k\n  - window: {{ tumbling: 1s, aggregate: {{ n: count() }} }}\n\
         sink: {{ file: {{ path: out.jsonl }} }}\nstate: {{ dir: st, checkpoint_interval: 1h }}\n",
        broker.url()
    );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let mut run = start(d, "p.yaml");
    eventually("rivulet's subscription", 20, || {
        broker.log().contains("dev/+")
    });
    // Four bursts, each in the middle of its own second: the window of
    // every message is the second it was published in.
    let mut want: BTreeMap<i64, u64> = BTreeMap::new();
    for burst in 0..4 {
        while now_ms() % 1000 < 400 || now_ms() % 1000 > 450 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let second = now_ms() - now_ms() % 1000;
        let msgs: Vec<(String, String)> = (0..30)
            .map(|i| {
                (
                    "dev/a".to_string(),
                    format!("{{\"i\":{}}}", burst * 100 + i),
                )
            })
            .collect();
        publish_all(broker.port, &msgs);
        assert!(now_ms() - second < 950, "a burst took too long to publish");
        want.insert(second, 30);
        std::thread::sleep(Duration::from_millis(600));
    }
    // Journaled (acknowledged), then killed before a checkpoint; restarted
    // seconds later.
    run.kill().unwrap();
    run.wait().unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let restarted = now_ms();
    let run = start(d, "p.yaml");
    let got = || {
        let mut by_window: BTreeMap<i64, u64> = BTreeMap::new();
        for l in lines(&d.join("out.jsonl")) {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            let (start, n) = (
                v["window_start"].as_i64().unwrap(),
                v["n"].as_u64().unwrap(),
            );
            // A window fired before the kill fires again after it: with
            // the same count.
            let before = by_window.insert(start, n);
            assert!(
                before.is_none_or(|b| b == n),
                "window {start}: {b:?} then {n}",
                b = before
            );
        }
        by_window
    };
    eventually("every window after the restart", 30, || {
        got().len() >= want.len()
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        got(),
        want,
        "{}",
        std::fs::read_to_string(d.join("rivulet.log")).unwrap_or_default()
    );
    assert!(want.keys().all(|w| *w < restarted));
}

/// The source's broker stops (saving its sessions) and starts again twice
/// while QoS 1 messages arrive, for MQTT 3.1.1 and 5: rivulet reconnects,
/// the broker redelivers what it had sent and not seen acknowledged, and
/// every message comes out exactly once. At QoS 0, and without `state:`
/// (the pipeline's own thread then drives the connection), rivulet
/// reconnects and what is published after that arrives.
#[test]
fn the_source_broker_restarting_mid_stream_loses_and_doubles_nothing() {
    for (version, qos, state) in [(3, 0, true), (3, 1, true), (5, 1, true), (3, 0, false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut broker = Broker::start(
            "persistence true\npersistence_location ./\nmax_queued_messages 0\nmax_inflight_messages 50\n",
        );
        let yaml = format!(
            "name: broker-restart\nsource:\n  mqtt: {{ url: \"{}\", topics: [in/#], qos: {qos}, version: {version}, client_id: restart-{version}-{qos}, clean_session: false }}\n\
             sink: {{ file: {{ path: out.jsonl }} }}\n{}",
            broker.url(),
            if state {
                "state: { dir: state, checkpoint_interval: 100ms }\n"
            } else {
                ""
            }
        );
        std::fs::write(d.join("p.yaml"), yaml).unwrap();
        let run = start(d, "p.yaml");
        eventually("rivulet's subscription", 20, || {
            broker.log().contains("in/#")
        });
        let msgs = |from: usize, to: usize| -> Vec<(String, String)> {
            (from..to)
                .map(|i| (format!("in/{}", i % 7), format!("{{\"id\":{i}}}")))
                .collect()
        };
        let ids = || -> Vec<u64> {
            lines(&d.join("out.jsonl"))
                .iter()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        let client = format!("restart-{version}-{qos}");
        let mut sent = 0;
        for round in 0..3 {
            publish_all(broker.port, &msgs(sent, sent + 1000));
            sent += 1000;
            if round < 2 {
                // Stop while messages may still be on their way to rivulet.
                broker.restart();
                eventually("rivulet to connect again", 30, || {
                    broker.log().contains(&format!("as {client} ("))
                });
            }
        }
        let want: Vec<u64> = if qos == 1 {
            (0..sent as u64).collect()
        } else {
            // QoS 0: what was published after the last reconnect.
            (2000..sent as u64).collect()
        };
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < until {
            let got: BTreeSet<u64> = ids().into_iter().collect();
            if want.iter().all(|i| got.contains(i)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let got = ids();
        let log = std::fs::read_to_string(d.join("rivulet.log")).unwrap_or_default();
        let mut seen = BTreeSet::new();
        let doubled: Vec<u64> = got.iter().filter(|i| !seen.insert(**i)).copied().collect();
        let missing: Vec<u64> = want.iter().filter(|i| !seen.contains(i)).copied().collect();
        assert!(
            missing.is_empty(),
            "v{version} QoS {qos}: {} missing, e.g. {:?}\n{log}\nbroker:\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            broker.log()
        );
        if qos == 1 {
            assert!(
                doubled.is_empty(),
                "v{version}: doubled {:?}\n{log}",
                &doubled[..doubled.len().min(10)]
            );
        }
        assert!(log.contains("MQTT connection lost"), "{log}");
        let (code, _, err) = run.stop();
        assert_eq!(code, Some(0), "{err}");
    }
}

/// A message larger than the source's connection takes (`max_payload` plus
/// 64 KiB) becomes a dead letter with its topic and size, is acknowledged
/// (not redelivered forever), and the messages after it flow: with and
/// without `state:`.
#[test]
fn a_message_too_large_for_the_connection_is_a_dead_letter_and_the_stream_goes_on() {
    for state in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let broker = Broker::start("");
        let yaml = format!(
            "name: too-large\nsource:\n  mqtt: {{ url: \"{}\", topics: [big/#], qos: 1 }}\n  max_payload: 1KiB\n\
             sink: {{ file: {{ path: out.jsonl }} }}\ndead_letter: {{ file: {{ path: dead.jsonl }} }}\n{}",
            broker.url(),
            if state { "state: { dir: state, checkpoint_interval: 100ms }\n" } else { "" }
        );
        std::fs::write(d.join("p.yaml"), yaml).unwrap();
        let run = start(d, "p.yaml");
        eventually("rivulet's subscription", 20, || {
            broker.log().contains("big/#")
        });
        common::publish_raw(
            broker.port,
            &[
                ("big/camera".into(), vec![b'x'; 300_000], false),
                ("big/after".into(), br#"{"n":1}"#.to_vec(), false),
            ],
        );
        eventually("the message after it", 20, || {
            lines(&d.join("out.jsonl"))
                .iter()
                .any(|l| l.contains("\"n\":1"))
        });
        let dead = lines(&d.join("dead.jsonl"));
        let log = std::fs::read_to_string(d.join("rivulet.log")).unwrap_or_default();
        assert_eq!(dead.len(), 1, "state: {state}: {dead:?}\n{log}");
        assert!(dead[0].contains("300000 bytes"), "{}", dead[0]);
        assert!(dead[0].contains("big/camera"), "{}", dead[0]);
        assert!(!log.contains("connection lost"), "{log}");
        let (code, _, _) = run.stop();
        assert_eq!(code, Some(0), "{log}");
    }
}
