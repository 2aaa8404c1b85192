//! End-to-end tests of MQTT in and out, against real Mosquitto brokers that
//! each test starts on a free loopback port.

#![allow(clippy::unwrap_used)]

mod common;

use common::{eventually, publish_all, publish_raw, subscribe, subscribe_raw, Broker, Rivulet};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Readings for sensors s0..s4; the sensor id is only in the topic.
fn readings(n: usize) -> Vec<(String, i64, i64)> {
    (0..n)
        .map(|i| {
            (
                format!("s{}", i % 5),
                1_000 + i as i64 * 10 - (i as i64 * 7919 % 300),
                (i % 50) as i64,
            )
        })
        .collect()
}

const SENTINEL_TS: i64 = 10_000_000;

#[test]
fn window_results_over_mqtt_equal_those_of_the_file_source() {
    let broker = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let events = readings(3000);
    // The same events as a file, with the sensor id in the payload.
    let mut file = String::new();
    for (s, ts, v) in &events {
        file.push_str(&json!({"sensor_id": s, "ts": ts, "v": v}).to_string());
        file.push('\n');
    }
    file.push_str(&json!({"sensor_id": "s0", "ts": SENTINEL_TS, "v": 0}).to_string());
    std::fs::write(dir.path().join("events.jsonl"), file).unwrap();
    let steps = r#"
steps:
  - key_by: sensor_id
  - window:
      tumbling: 5s
      allowed_lateness: 1s
      aggregate: { n: count(), total: sum(v), hi: max(v) }
"#;
    let time = "  event_time: { field: ts, max_out_of_orderness: 200ms, plausible_years: any }\n";
    let from_file = Rivulet::start(
        dir.path(),
        &format!("name: f\nsource:\n  file: {{ path: events.jsonl }}\n{time}{steps}sink: {{ file: {{ path: file-out.jsonl }} }}\n"),
    );
    let (code, _, err) = from_file.finish();
    assert_eq!(code, Some(0), "{err}");
    let mut expected = parse(
        &std::fs::read_to_string(dir.path().join("file-out.jsonl"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
    );
    // The sentinel's own window fires only at the end of the file.
    expected.retain(|r| r["window_start"].as_i64().unwrap() < SENTINEL_TS - 5000);

    let yaml = format!(
        "name: m\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"sensors/{{sensor_id}}/reading\"], qos: 1 }}\n{time}{steps}sink: {{ file: {{ path: mqtt-out.jsonl }} }}\n",
        broker.url()
    );
    let run = Rivulet::start(dir.path(), &yaml);
    // Wait until it is subscribed: a probe message comes out as a dead letter... or simply
    // retry the first publish until the broker has a subscriber.
    eventually("rivulet to subscribe", 20, || {
        broker.log().contains("sensors/+/reading")
    });
    let mut msgs: Vec<(String, String)> = events
        .iter()
        .map(|(s, ts, v)| {
            (
                format!("sensors/{s}/reading"),
                json!({"ts": ts, "v": v}).to_string(),
            )
        })
        .collect();
    msgs.push((
        "sensors/s0/reading".into(),
        json!({"ts": SENTINEL_TS, "v": 0}).to_string(),
    ));
    publish_all(broker.port, &msgs);
    eventually("all results", 30, || {
        run.lines("mqtt-out.jsonl").len() >= expected.len()
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    let got = parse(
        &std::fs::read_to_string(dir.path().join("mqtt-out.jsonl"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
    );
    assert_eq!(got, expected);
    assert!(
        got.len() >= 5 * 6,
        "several windows per sensor: {}",
        got.len()
    );
}

#[test]
fn bridge_places_by_topic_fields_and_adds_only_what_steps_write() {
    let a = Broker::start("");
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
name: bridge
source:
  mqtt: {{ url: "{}", topics: ["plant/{{line}}/temp"], qos: 1 }}
  format: text
steps:
  - map: {{ celsius: round((value - 32) * 5 / 9), line_no: number(line) }}
  - filter: celsius > 0
sink:
  mqtt: {{ url: "{}", topic: "cloud/line/{{line_no}}", qos: 1 }}
dead_letter:
  file: {{ path: dead.jsonl }}
"#,
        a.url(),
        b.url()
    );
    let (inbox, _sub) = subscribe(b.port, "cloud/#", None);
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || {
        a.log().contains("plant/+/temp")
    });
    publish_all(
        a.port,
        &[
            ("plant/7/temp".into(), "212".into()),
            ("plant/8/temp".into(), "hot".into()),
            ("plant/9/temp".into(), "14".into()),
            ("plant/7/temp".into(), "98.6".into()),
        ],
    );
    eventually("two bridged messages", 20, || {
        inbox.lock().unwrap().len() >= 2
    });
    eventually("the dead letter", 20, || run.lines("dead.jsonl").len() == 1);
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    let got = inbox.lock().unwrap().clone();
    assert_eq!(got[0].0, "cloud/line/7");
    let first: Value = serde_json::from_str(&got[0].1).unwrap();
    // A pass-through event: the payload, and the fields `map` wrote. The
    // topic's fields placed it and filtered it, and are not added.
    assert_eq!(first, json!({"value": 212, "celsius": 100.0, "line_no": 7}));
    assert_eq!(got[1].0, "cloud/line/7");
    assert_eq!(got.len(), 2, "14 °F is filtered out: {got:?}");
    let dead: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap())
            .unwrap();
    assert_eq!(dead["payload"], "hot");
    assert_eq!(dead["topic"], "plant/8/temp");
    assert!(
        dead["reason"]
            .as_str()
            .unwrap()
            .contains("cannot apply `-`"),
        "{dead}"
    );
}

#[test]
fn qos1_no_loss_when_the_sink_broker_restarts_mid_stream() {
    let a = Broker::start("");
    // No limit on what B queues for the test's offline subscriber: rivulet
    // delivers its backlog at once after the restart, and Mosquitto's
    // default (1000) would drop part of it before the subscriber is back.
    let mut b = Broker::start(
        "persistence true\npersistence_location ./\nautosave_interval 1\nmax_queued_messages 0\n",
    );
    let dir = tempfile::tempdir().unwrap();
    // A persistent session on B: the broker keeps QoS 1 messages for it.
    let (inbox, sub) = subscribe(b.port, "out/#", Some("test-durable-sub"));
    let yaml = format!(
        r#"
name: relay
source:
  mqtt: {{ url: "{}", topics: ["in/#"], qos: 1 }}
sink:
  mqtt: {{ url: "{}", topic: "out/{{id}}", qos: 1 }}
"#,
        a.url(),
        b.url()
    );
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || a.log().contains("in/#"));
    let batch = |from: usize, to: usize| -> Vec<(String, String)> {
        (from..to)
            .map(|i| (format!("in/{i}"), json!({"id": i}).to_string()))
            .collect()
    };
    publish_all(a.port, &batch(0, 500));
    eventually("the first messages through", 20, || {
        inbox.lock().unwrap().len() >= 100
    });
    b.stop();
    // While B is away rivulet keeps what it receives.
    publish_all(a.port, &batch(500, 1500));
    std::thread::sleep(std::time::Duration::from_secs(3));
    b.restart();
    publish_all(a.port, &batch(1500, 2000));
    let distinct = || {
        inbox
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while distinct() < 2000 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, _, err) = run.stop();
    let have: BTreeSet<usize> = inbox
        .lock()
        .unwrap()
        .iter()
        .map(|(t, _)| t[4..].parse().unwrap())
        .collect();
    let missing: Vec<usize> = (0..2000).filter(|i| !have.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "missing {} of 2000: {:?}...\n{err}\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        b.log()
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("MQTT connection lost"), "{err}");
    drop(sub);
}

#[test]
fn clean_shutdown_delivers_every_qos1_message_and_buffers_survive_a_restart() {
    let mut b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&json!({"id": i}).to_string());
        lines.push('\n');
    }
    std::fs::write(dir.path().join("events.jsonl"), &lines).unwrap();
    let url = b.url();
    let yaml = |input: &str| {
        format!(
            r#"
name: outbox
source:
  file: {{ path: {input} }}
sink:
  mqtt:
    url: "{}"
    topic: "ids/{{id}}"
    qos: 1
    buffer: {{ memory: 500, dir: outbox, drain_timeout: 2s }}
"#,
            url
        )
    };
    // 1. Broker up: a bounded run ends only when every message is acknowledged.
    let (inbox, sub) = subscribe(b.port, "ids/#", None);
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("events.jsonl")).finish();
    assert_eq!(code, Some(0), "{err}");
    eventually("all delivered", 20, || inbox.lock().unwrap().len() >= 3000);
    assert_eq!(inbox.lock().unwrap().len(), 3000);
    drop(sub);

    // 2. Broker down for a whole run: the messages go to the disk buffer.
    b.stop();
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("events.jsonl")).finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("kept for the next run"), "{err}");

    // 3. Broker back: the next run sends them first, even with no new input.
    b.restart();
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    let (inbox, _sub) = subscribe(b.port, "ids/#", None);
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("empty.jsonl")).finish();
    assert_eq!(code, Some(0), "{err}");
    eventually("the buffered messages", 20, || {
        inbox.lock().unwrap().len() >= 3000
    });
    let got: Vec<i64> = inbox
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| {
            serde_json::from_str::<Value>(p).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(got, (0..3000).collect::<Vec<_>>(), "all, in order");
}

#[test]
fn without_a_buffer_dir_undeliverable_messages_are_an_error_not_silence() {
    let mut b = Broker::start("");
    b.stop();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.jsonl"), "{\"id\":1}\n{\"id\":2}\n").unwrap();
    let yaml = format!(
        "name: x\nsource: {{ file: {{ path: e.jsonl }} }}\nsink:\n  mqtt: {{ url: \"{}\", topic: t, qos: 1, buffer: {{ drain_timeout: 500ms }} }}\n",
        b.url()
    );
    let (code, _, err) = Rivulet::start(dir.path(), &yaml).finish();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("2 messages could not be delivered"), "{err}");
}

#[test]
fn bad_credentials_fail_clearly_and_good_ones_from_env_work() {
    let probe = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["edge", "s3cret"])
        .status()
        .unwrap();
    assert!(ok.success());
    drop(probe);
    let b = Broker::start(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    let yaml = |password_line: &str| {
        format!(
            "name: auth\nsource:\n  mqtt:\n    url: \"{}\"\n    topics: [auth/topic]\n    username: edge\n    {password_line}\nsink: {{ stdout: {{}} }}\n",
            b.url()
        )
    };
    std::fs::write(dir.path().join("wrong"), "nope\n").unwrap();
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("password_file: wrong")).finish();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&b.url()) && err.contains("refused"), "{err}");

    let mut cmd_yaml = yaml("password_env: EDGE_PASSWORD");
    cmd_yaml.push('\n');
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, cmd_yaml).unwrap();
    let run = Rivulet::spawn(
        common::rivulet_cmd(dir.path(), &["run"])
            .arg(&file)
            .env("EDGE_PASSWORD", "s3cret")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    eventually("an authenticated subscription", 20, || {
        b.log().contains("auth/topic")
    });
    publish_all_auth(b.port);
    let (code, out, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"ok\":1"), "{out}\n{err}");
}

fn publish_all_auth(port: u16) {
    let mut o = rumqttc::MqttOptions::new("auth-pub", "127.0.0.1", port);
    o.set_credentials("edge", "s3cret");
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    client
        .publish(
            "auth/topic",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{\"ok\":1}".to_vec(),
        )
        .unwrap();
    for ev in conn.iter() {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Err(e) => panic!("{e}"),
            _ => {}
        }
    }
}

struct Pki {
    ca: String,
    cert: String,
    key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rivulet test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(rcgen::DnType::CommonName, "rivulet-client");
    let client_cert = cp.signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

#[test]
fn tls_with_the_right_ca_and_a_client_certificate_works_and_a_wrong_ca_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let good = pki();
    let other = pki();
    for (name, body) in [
        ("ca.pem", &good.ca),
        ("server.pem", &good.cert),
        ("server.key", &good.key),
        ("client.pem", &good.client_cert),
        ("client.key", &good.client_key),
        ("other-ca.pem", &other.ca),
    ] {
        std::fs::write(p.join(name), body).unwrap();
    }
    let b = Broker::start(&format!(
        "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true\n",
        p.display()
    ));
    let yaml = |ca: &str| {
        format!(
            "name: tls\nsource:\n  mqtt:\n    url: \"mqtts://localhost:{}\"\n    topics: [secure/#]\n    ca_file: {ca}\n    client_cert: client.pem\n    client_key: client.key\nsink: {{ stdout: {{}} }}\n",
            b.port
        )
    };
    let (code, _, err) = Rivulet::start(p, &yaml("other-ca.pem")).finish();
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("mqtts://localhost:{}", b.port)),
        "{err}"
    );
    assert!(err.contains("certificate was rejected"), "{err}");

    let run = Rivulet::start(p, &yaml("ca.pem"));
    eventually("a TLS subscription", 20, || b.log().contains("secure/#"));
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("MQTT connected"), "{err}");
}

/// A bridge forwards a topic tree with a prefix swapped (as Mosquitto's
/// `topic # out 1 local/ remote/`), payloads byte for byte in every
/// format, and retained flags with `retain: keep`.
#[test]
fn a_bridge_keeps_topic_levels_payload_bytes_and_retained_flags() {
    let binary: Vec<u8> = vec![0, 0xff, 0xfe, b'{', 10, 13, 0x80];
    let spaced_json = br#"{ "a" :  1.50 , "b":[1,2] }"#.to_vec();
    let text = b" 21.5 \n".to_vec();
    let msgs = vec![
        ("local/a/b/c".to_string(), binary.clone(), false),
        ("local/x".to_string(), spaced_json.clone(), true),
        ("local/y/z".to_string(), text.clone(), false),
        ("local/skip/me".to_string(), b"1".to_vec(), false),
        ("elsewhere/q".to_string(), b"2".to_vec(), false),
    ];
    for format in ["raw", "text", "json"] {
        let a = Broker::start("");
        let b = Broker::start("");
        let dir = tempfile::tempdir().unwrap();
        // JSON cannot read the binary, text or number payloads: those are
        // dead letters there, and the object still passes unchanged.
        let yaml = format!(
            r#"
name: bridge-{format}
source:
  mqtt: {{ url: "{}", topics: ["local/#", "elsewhere/#"], qos: 1, version: 5 }}
  format: {format}
steps:
  - filter: starts_with(topic, "local/") && !contains(topic, "/skip/")
  - map:
      topic: concat("remote/", substr(topic, len("local/")))
sink:
  mqtt: {{ url: "{}", topic: "{{topic}}", qos: 1, retain: keep }}
dead_letter:
  file: {{ path: dead.jsonl }}
"#,
            a.url(),
            b.url()
        );
        let (inbox, _sub) = subscribe_raw(b.port, "#");
        let run = Rivulet::start(dir.path(), &yaml);
        eventually("rivulet to subscribe", 20, || {
            a.log().contains("elsewhere/#")
        });
        publish_raw(a.port, &msgs);
        let expected: Vec<(&str, &[u8])> = if format == "json" {
            vec![("remote/x", &spaced_json)]
        } else {
            vec![
                ("remote/a/b/c", &binary),
                ("remote/x", &spaced_json),
                ("remote/y/z", &text),
            ]
        };
        eventually("the bridged messages", 20, || {
            inbox.lock().unwrap().len() >= expected.len()
        });
        if format == "json" {
            // Every payload that is not a JSON object, filtered or not
            // (decoding comes first).
            eventually("four dead letters", 20, || {
                run.lines("dead.jsonl").len() == 4
            });
        }
        let (code, _, err) = run.stop();
        assert_eq!(code, Some(0), "{err}");
        let got = inbox.lock().unwrap().clone();
        let got: Vec<(&str, &[u8])> = got
            .iter()
            .map(|(t, p, _)| (t.as_str(), p.as_slice()))
            .collect();
        assert_eq!(got, expected, "format {format}");
        // A new subscriber sees what was retained: only the retained one.
        let (late, _sub) = subscribe_raw(b.port, "remote/#");
        eventually("the retained message", 20, || {
            !late.lock().unwrap().is_empty()
        });
        let late = late.lock().unwrap().clone();
        assert_eq!(late.len(), 1, "{late:?}");
        assert_eq!((late[0].0.as_str(), late[0].2), ("remote/x", true));
        assert_eq!(late[0].1, spaced_json);
    }
}

/// `rivulet validate` on a file: exit code and standard error.
fn validate(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["validate", "p.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_refuses_fields_on_raw_payloads_and_retain_keep_without_mqtt5() {
    let source = |extra: &str| {
        format!("name: r\nsource:\n  mqtt: {{ url: \"mqtt://127.0.0.1:1\", topics: [\"a/#\"]{extra} }}\n")
    };
    let sink = "sink:\n  mqtt: { url: \"mqtt://127.0.0.1:1\", topic: \"{topic}\", retain: keep }\n";
    let (code, err) = validate(&format!(
        "{}  format: raw\nsteps:\n  - map: {{ n: 1 }}\nsink:\n  stdout: {{}}\n",
        source("")
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("steps[0].map.n: `format: raw` forwards payloads unchanged"),
        "{err}"
    );
    // An unquoted call in a flow mapping is split at its comma: the error
    // says so.
    let (code, err) = validate(&format!(
        "{}steps:\n  - map: {{ t: concat('b/', topic) }}\nsink:\n  stdout: {{}}\n",
        source("")
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("a comma ends the value: quote the expression"),
        "{err}"
    );
    // Writing the topic is rewriting the destination: allowed.
    let (code, err) = validate(&format!(
        "{}  format: raw\nsteps:\n  - map: {{ topic: \"concat('b/', topic)\" }}\n{sink}",
        source(", version: 5")
    ));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = validate(&format!("{}{sink}", source("")));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`keep` needs an MQTT source with `version: 5`"),
        "{err}"
    );
    let (code, err) = validate(&format!(
        "{}  event_time: {{ field: ts }}\nsteps:\n  - key_by: topic\n  - window: {{ tumbling: 5s, aggregate: {{ n: count() }} }}\n{sink}",
        source(", version: 5")
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("window results have none"), "{err}");
    let (code, err) = validate(&format!(
        "{}sink:\n  mqtt: {{ url: \"mqtt://127.0.0.1:1\", topic: t, retain: maybe }}\n",
        source("")
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("expected `true`, `false` or `keep`"), "{err}");
}

/// Results announce themselves to Home Assistant: retained configs per key
/// and field before the key's first result, sent again after a purge and
/// when Home Assistant says it started.
#[test]
fn home_assistant_discovery_announces_each_key_and_comes_back_after_a_purge() {
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"
name: ha-averages
source:
  mqtt: {{ url: "{url}", topics: ["ha/{{sensor_id}}/t"], qos: 1 }}
  event_time: {{ field: ts }}
steps:
  - key_by: sensor_id
  - window:
      tumbling: 1s
      aggregate: {{ avg_celsius: avg(t), readings: count() }}
sink:
  mqtt:
    url: "{url}"
    topic: "averages/{{sensor_id}}"
    qos: 1
    home_assistant:
      name: "{{sensor_id}} average"
      fields:
        avg_celsius: {{ unit: "°C", device_class: temperature, state_class: measurement }}
        readings: {{}}
"#,
        url = b.url()
    );
    let (inbox, _sub) = subscribe_raw(b.port, "#");
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || b.log().contains("ha/+/t"));
    const T0: i64 = 1_800_000_000_000;
    let ev = |s: &str, ts: i64, t: f64| (format!("ha/{s}/t"), format!("{{\"ts\":{ts},\"t\":{t}}}"));
    publish_all(
        b.port,
        &[
            ev("s1", T0, 20.0),
            ev("s2", T0 + 100, 30.0),
            ev("s1", T0 + 200, 22.0),
        ],
    );
    publish_all(
        b.port,
        &[ev("s1", T0 + 5000, 1.0), ev("s2", T0 + 5000, 1.0)],
    );
    eventually("both keys' results", 20, || {
        let got = inbox.lock().unwrap();
        ["averages/s1", "averages/s2"]
            .iter()
            .all(|t| got.iter().any(|m| m.0 == *t))
    });
    let got = inbox.lock().unwrap().clone();
    let configs = |got: &[(String, Vec<u8>, bool)]| -> Vec<(String, Value)> {
        got.iter()
            .filter(|m| m.0.starts_with("homeassistant/sensor/") && !m.1.is_empty())
            .map(|m| (m.0.clone(), serde_json::from_slice(&m.1).unwrap()))
            .collect()
    };
    let announced = configs(&got);
    assert_eq!(
        announced.len(),
        4,
        "two fields for each of two keys: {announced:?}"
    );
    for key in ["s1", "s2"] {
        let state_topic = format!("averages/{key}");
        let first_result = got.iter().position(|m| m.0 == state_topic).unwrap();
        let result: Value = serde_json::from_slice(&got[first_result].1).unwrap();
        let mine: Vec<&(String, Value)> = announced
            .iter()
            .filter(|(_, c)| c["state_topic"] == state_topic.as_str())
            .collect();
        assert_eq!(mine.len(), 2, "{key}: {mine:?}");
        for (topic, c) in &mine {
            let at = got.iter().position(|m| &m.0 == topic).unwrap();
            assert!(
                at < first_result,
                "{key}: announced before its first result"
            );
            assert_eq!(
                topic,
                &format!(
                    "homeassistant/sensor/{}/config",
                    c["unique_id"].as_str().unwrap()
                )
            );
            assert_eq!(c["availability_topic"], "rivulet/ha-averages/status");
            assert_eq!(c["device"]["name"], format!("{key} average"));
            assert_eq!(
                c["device"]["identifiers"],
                mine[0].1["device"]["identifiers"]
            );
            // The value template reads a field the result has.
            let field = c["value_template"]
                .as_str()
                .unwrap()
                .split('"')
                .nth(1)
                .unwrap()
                .to_string();
            assert!(result.get(&field).is_some(), "{field} in {result}");
        }
        let avg = mine
            .iter()
            .find(|(_, c)| c["name"] == "avg_celsius")
            .unwrap();
        assert_eq!(avg.1["unit_of_measurement"], "°C");
        assert_eq!(avg.1["device_class"], "temperature");
    }
    // The configs are retained: a subscriber that comes later gets them.
    let (late, _late_sub) = subscribe_raw(b.port, "homeassistant/#");
    eventually("the retained configs", 20, || {
        late.lock().unwrap().len() >= 4
    });
    assert!(late.lock().unwrap().iter().all(|m| m.2), "retained");
    // A purged config comes back.
    let purged = announced[0].0.clone();
    let before = inbox.lock().unwrap().len();
    publish_raw(b.port, &[(purged.clone(), Vec::new(), true)]);
    eventually("the purged config again", 20, || {
        inbox.lock().unwrap()[before..]
            .iter()
            .any(|m| m.0 == purged && !m.1.is_empty())
    });
    // Home Assistant's birth message brings all of them again.
    let before = inbox.lock().unwrap().len();
    publish_raw(
        b.port,
        &[("homeassistant/status".into(), b"online".to_vec(), false)],
    );
    eventually("every config again", 20, || {
        configs(&inbox.lock().unwrap()[before..]).len() >= 4
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn home_assistant_fields_are_checked_against_the_results() {
    let sink = |fields: &str| {
        format!(
            "name: h\nsource:\n  mqtt: {{ url: \"mqtt://127.0.0.1:1\", topics: [\"a/{{id}}\"] }}\n  event_time: {{ field: ts }}\nsteps:\n  - key_by: id\n  - window: {{ tumbling: 5s, aggregate: {{ avg_t: avg(t) }} }}\nsink:\n  mqtt:\n    url: \"mqtt://127.0.0.1:1\"\n    topic: \"avg/{{id}}\"\n    home_assistant:\n      fields: {fields}\n"
        )
    };
    let (code, err) = validate(&sink("{ avg_t: { device_class: temperature } }"));
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = validate(&sink("{ avg_tt: {} }"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`avg_tt` is not a field of the results"),
        "{err}"
    );
    assert!(err.contains("did you mean `avg_t`?"), "{err}");
    let (code, err) = validate(&sink(
        "{ avg_t: { device_class: temprature, state_class: sometimes } }",
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("did you mean `temperature`?"), "{err}");
    assert!(
        err.contains("`sometimes` is not a Home Assistant sensor state_class"),
        "{err}"
    );
}

#[test]
fn mqtt5_source_and_sink() {
    let a = Broker::start("");
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: v5\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"v5/{{id}}\"], qos: 1, version: 5 }}\nsink:\n  mqtt: {{ url: \"{}\", topic: \"five/{{id}}\", qos: 1, version: 5 }}\n",
        a.url(),
        b.url()
    );
    let (inbox, _sub) = subscribe(b.port, "five/#", None);
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("a v5 subscription", 20, || a.log().contains("v5/+"));
    publish_all(a.port, &[("v5/x".into(), "{\"n\":1}".into())]);
    eventually("the message", 20, || !inbox.lock().unwrap().is_empty());
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        b.log().contains("(p5,"),
        "the sink spoke MQTT 5:\n{}",
        b.log()
    );
    let got = inbox.lock().unwrap()[0].clone();
    assert_eq!(got.0, "five/x");
    // The payload as it came: the topic's fields only place it.
    assert_eq!(got.1, "{\"n\":1}");
}

#[test]
fn a_sink_under_a_small_receive_maximum_delivers_every_message_in_order() {
    // Mosquitto announces its `max_inflight_messages` to MQTT 5 clients as
    // Receive Maximum: the sink's QoS 1 window is 5, so it fills again and
    // again, and the connection's thread must take the PUBACKs each time
    // the pipeline's thread finds it full.
    let a = Broker::start("");
    let b = Broker::start("max_inflight_messages 5\nmax_queued_messages 0");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: window\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"in/#\"], qos: 1 }}\n  format: raw\nsink:\n  mqtt: {{ url: \"{}\", topic: \"{{topic}}\", qos: 1, version: 5 }}\n",
        a.url(),
        b.url()
    );
    let (inbox, _sub) = subscribe(b.port, "in/#", None);
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || a.log().contains("in/#"));
    let sent: Vec<(String, String)> = (0..2000)
        .map(|i| ("in/x".to_string(), format!("m{i}")))
        .collect();
    publish_all(a.port, &sent);
    eventually("every message", 60, || inbox.lock().unwrap().len() >= 2000);
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        b.log().contains("(p5,"),
        "the sink spoke MQTT 5:\n{}",
        b.log()
    );
    let got: Vec<String> = inbox
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    let want: Vec<String> = sent.into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, want, "in order, each once");
}

#[test]
fn a_full_outbox_drops_the_oldest_and_keeps_the_newest_in_order() {
    let mut b = Broker::start("");
    b.stop();
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..100 {
        lines.push_str(&json!({"id": i}).to_string());
        lines.push('\n');
    }
    std::fs::write(dir.path().join("events.jsonl"), lines).unwrap();
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    let url = b.url();
    let yaml = |input: &str| {
        format!(
            "name: full\nsource: {{ file: {{ path: {input} }} }}\nsink:\n  mqtt:\n    url: \"{url}\"\n    topic: \"ids/{{id}}\"\n    qos: 1\n    buffer: {{ memory: 10, disk: 20, dir: outbox, when_full: drop_oldest, drain_timeout: 300ms }}\n"
        )
    };
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("events.jsonl")).finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("dropped"), "{err}");
    b.restart();
    let (inbox, _sub) = subscribe(b.port, "ids/#", None);
    let (code, _, err) = Rivulet::start(dir.path(), &yaml("empty.jsonl")).finish();
    assert_eq!(code, Some(0), "{err}");
    eventually("the kept messages", 20, || {
        inbox.lock().unwrap().len() >= 30
    });
    let ids: Vec<i64> = inbox
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| {
            serde_json::from_str::<Value>(p).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        (70..100).collect::<Vec<_>>(),
        "the newest 30, in order"
    );
}

#[test]
fn the_status_topic_says_online_while_running_and_offline_after_a_stop_or_a_crash() {
    let broker = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: st\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"in/#\"], qos: 1 }}\nsink: {{ file: {{ path: out.jsonl }} }}\n",
        broker.url()
    );
    let (inbox, _sub) = subscribe(broker.port, "rivulet/st/status", None);
    let last = || {
        inbox
            .lock()
            .unwrap()
            .last()
            .map(|(t, p)| (t.clone(), p.clone()))
    };
    let is = |want: &str| {
        let want = ("rivulet/st/status".to_string(), want.to_string());
        move || last().as_ref() == Some(&want)
    };
    // A pipeline that cannot start (its sink is a directory) never says
    // online.
    std::fs::create_dir(dir.path().join("a-dir")).unwrap();
    let broken = Rivulet::start(dir.path(), &yaml.replace("out.jsonl", "a-dir"));
    let (code, _, err) = broken.finish();
    assert_ne!(code, Some(0), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        inbox.lock().unwrap().is_empty(),
        "{:?}",
        inbox.lock().unwrap()
    );
    // A crash: the broker publishes the will.
    let mut run = Rivulet::start(dir.path(), &yaml);
    eventually("online", 20, is("online"));
    run.kill().unwrap();
    run.wait().unwrap();
    eventually("offline after kill -9", 20, is("offline"));
    // A clean stop says offline itself, before exiting 0.
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("online again", 20, is("online"));
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    eventually("offline after SIGTERM", 20, is("offline"));
    // Retained: a subscriber that comes later learns the state at once.
    let (later, _sub2) = subscribe(broker.port, "rivulet/st/status", None);
    eventually("the retained status", 20, || {
        later.lock().unwrap().first().map(|(_, p)| p.as_str()) == Some("offline")
    });
    // `status: { enabled: false }` publishes nothing; a topic may be set.
    let custom = yaml.replace(
        "sink:",
        "status: { topic: plant/rivulet/availability }\nsink:",
    );
    let (avail, _sub3) = subscribe(broker.port, "plant/rivulet/availability", None);
    let run = Rivulet::start(dir.path(), &custom);
    eventually("online on the custom topic", 20, || {
        avail.lock().unwrap().last().map(|(_, p)| p.as_str()) == Some("online")
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    let off = yaml.replace("sink:", "status: { enabled: false }\nsink:");
    inbox.lock().unwrap().clear();
    let run = Rivulet::start(dir.path(), &off);
    // Three runs subscribed before this one.
    eventually("the source to subscribe", 20, || {
        broker.log().matches(" in/#").count() >= 4
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        inbox.lock().unwrap().is_empty(),
        "{:?}",
        inbox.lock().unwrap()
    );
}

#[test]
fn a_job_graph_unions_a_live_topic_with_a_backlog_file_and_publishes_each_stream() {
    // `live` (MQTT) is far ahead of `backlog` (a file a gateway stored
    // while offline); with a watermark per source the backlog's windows
    // are on time. `per_sensor` publishes every 5 s count to MQTT; `busy`
    // (a filter on its results) writes a file.
    let broker = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let backlog: Vec<(String, i64)> = (0..500)
        .map(|i| (format!("s{}", i % 5), 1_000 + i as i64 * 50))
        .collect();
    let live: Vec<(String, i64)> = (0..500)
        .map(|i| (format!("s{}", i % 5), 100_000 + i as i64 * 40))
        .collect();
    let mut file = String::new();
    for (s, ts) in &backlog {
        file.push_str(&json!({"sensor_id": s, "ts": ts}).to_string());
        file.push('\n');
    }
    std::fs::write(dir.path().join("backlog.jsonl"), file).unwrap();
    let (published, _sub) = subscribe(broker.port, "avg/#", None);
    let yaml = format!(
        "name: g\nsources:\n  live:\n    mqtt: {{ url: \"{url}\", topics: [\"sensors/{{sensor_id}}/reading\"], qos: 1 }}\n    event_time: {{ field: ts, max_out_of_orderness: 200ms, plausible_years: any }}\n\
         \x20 backlog:\n    file: {{ path: backlog.jsonl }}\n    event_time: {{ field: ts, max_out_of_orderness: 1s, plausible_years: any }}\n\
         streams:\n  per_sensor:\n    from: [live, backlog]\n    steps:\n      - key_by: sensor_id\n      - window: {{ tumbling: 5s, aggregate: {{ n: count() }} }}\n    sink: {{ mqtt: {{ url: \"{url}\", topic: \"avg/{{sensor_id}}\", qos: 1 }} }}\n\
         \x20 busy:\n    from: per_sensor\n    steps: [ {{ filter: n >= 20 }} ]\n    sink: {{ file: {{ path: busy.jsonl }} }}\n\
         late: {{ file: {{ path: late.jsonl }} }}\nstate: {{ dir: state }}\n",
        url = broker.url()
    );
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || {
        broker.log().contains("sensors/+/reading")
    });
    let mut msgs: Vec<(String, String)> = live
        .iter()
        .map(|(s, ts)| {
            (
                format!("sensors/{s}/reading"),
                json!({"ts": ts}).to_string(),
            )
        })
        .collect();
    // Moves the live watermark past every window above.
    msgs.push((
        "sensors/s0/reading".into(),
        json!({"ts": SENTINEL_TS}).to_string(),
    ));
    publish_all(broker.port, &msgs);
    // Expected: a count per sensor and 5 s window, over both sources.
    let mut expected: std::collections::BTreeMap<(String, i64), i64> = Default::default();
    for (s, ts) in backlog.iter().chain(&live) {
        *expected.entry((s.clone(), ts - ts % 5000)).or_default() += 1;
    }
    eventually("every window published", 30, || {
        published.lock().unwrap().len() >= expected.len()
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    let mut got: std::collections::BTreeMap<(String, i64), i64> = Default::default();
    for (topic, payload) in published.lock().unwrap().iter() {
        let v: Value = serde_json::from_str(payload).unwrap();
        let s = v["sensor_id"].as_str().unwrap().to_string();
        assert_eq!(topic, &format!("avg/{s}"));
        let start = v["window_start"].as_i64().unwrap();
        if start < SENTINEL_TS - 5000 {
            got.insert((s, start), v["n"].as_i64().unwrap());
        }
    }
    assert_eq!(got, expected);
    let late = std::fs::read_to_string(dir.path().join("late.jsonl")).unwrap_or_default();
    assert!(late.is_empty(), "nothing is late: {late}");
    let busy = parse(&run_lines(&dir.path().join("busy.jsonl")));
    let want_busy = expected.values().filter(|n| **n >= 20).count();
    assert_eq!(busy.len(), want_busy);
    assert!(want_busy > 0 && want_busy < expected.len());
}

fn run_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_job_graph_bridges_every_reading_and_windows_them_in_one_process() {
    // `per_sensor` windows the readings; `forward` (a tee: a filter of its
    // own) republishes the readings it keeps, payload unchanged, under
    // `copy/` with the incoming topic's levels (`{topic}`).
    let broker = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let (copied, _sub) = subscribe(broker.port, "copy/#", None);
    let yaml = format!(
        "name: bw\nsources:\n  live:\n    mqtt: {{ url: \"{url}\", topics: [\"sensors/{{sensor_id}}/reading\"], qos: 1 }}\n    event_time: {{ field: ts, max_out_of_orderness: 300ms, plausible_years: any }}\n\
         streams:\n  per_sensor:\n    from: live\n    steps:\n      - key_by: sensor_id\n      - window: {{ tumbling: 5s, aggregate: {{ n: count() }} }}\n    sink: {{ file: {{ path: windows.jsonl }} }}\n\
         \x20 forward:\n    from: live\n    steps: [ {{ filter: v >= 10 }} ]\n    sink: {{ mqtt: {{ url: \"{url}\", topic: \"copy/{{topic}}\", qos: 1 }} }}\n",
        url = broker.url()
    );
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || {
        broker.log().contains("sensors/+/reading")
    });
    let events = readings(1000);
    let mut msgs: Vec<(String, String)> = events
        .iter()
        .map(|(s, ts, v)| {
            (
                format!("sensors/{s}/reading"),
                json!({"ts": ts, "v": v}).to_string(),
            )
        })
        .collect();
    msgs.push((
        "sensors/s0/reading".into(),
        json!({"ts": SENTINEL_TS, "v": 0}).to_string(),
    ));
    publish_all(broker.port, &msgs);
    let want_copies: Vec<(String, String)> = msgs
        .iter()
        .filter(|(_, p)| serde_json::from_str::<Value>(p).unwrap()["v"].as_i64() >= Some(10))
        .map(|(t, p)| (format!("copy/{t}"), p.clone()))
        .collect();
    eventually("every kept reading copied", 30, || {
        copied.lock().unwrap().len() >= want_copies.len()
    });
    // Every reading (not only the copied ones) is in a window; the
    // sentinel's own window is still open.
    let counted = || -> i64 {
        parse(&run_lines(&dir.path().join("windows.jsonl")))
            .iter()
            .map(|r| r["n"].as_i64().unwrap())
            .sum()
    };
    eventually("every reading windowed", 30, || {
        counted() >= events.len() as i64
    });
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    let mut got = copied.lock().unwrap().clone();
    let mut want = want_copies;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(counted(), events.len() as i64);
}

#[test]
fn a_tee_keeps_each_messages_retained_flag() {
    let a = Broker::start("");
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: tee-retain\nsources:\n  live:\n    mqtt: {{ url: \"{}\", topics: [\"local/{{id}}\"], qos: 1, version: 5 }}\n    event_time: {{ field: ts, max_out_of_orderness: 0ms, plausible_years: any }}\n\
         streams:\n  count:\n    from: live\n    steps: [ {{ key_by: id }}, {{ window: {{ tumbling: 1s, aggregate: {{ n: count() }} }} }} ]\n    sink: {{ file: {{ path: counts.jsonl }} }}\n\
         \x20 forward:\n    from: live\n    sink: {{ mqtt: {{ url: \"{}\", topic: \"remote/{{id}}\", qos: 1, retain: keep }} }}\n",
        a.url(),
        b.url()
    );
    let (inbox, _sub) = subscribe_raw(b.port, "#");
    let run = Rivulet::start(dir.path(), &yaml);
    eventually("rivulet to subscribe", 20, || a.log().contains("local/+"));
    let msgs: Vec<(String, Vec<u8>, bool)> = vec![
        ("local/x".into(), br#"{"ts":1000}"#.to_vec(), true),
        ("local/y".into(), br#"{"ts":1100}"#.to_vec(), false),
    ];
    publish_raw(a.port, &msgs);
    eventually("both forwarded", 20, || inbox.lock().unwrap().len() >= 2);
    let (code, _, err) = run.stop();
    assert_eq!(code, Some(0), "{err}");
    // A new subscriber sees what was retained: only the retained one.
    let (late, _sub) = subscribe_raw(b.port, "remote/#");
    eventually("the retained message", 20, || {
        !late.lock().unwrap().is_empty()
    });
    let late = late.lock().unwrap().clone();
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!((late[0].0.as_str(), late[0].2), ("remote/x", true));
    assert_eq!(late[0].1, br#"{"ts":1000}"#.to_vec());
}
