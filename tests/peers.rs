//! Peer mode against a real Mosquitto: membership through retained
//! presence and Last Will.

#![allow(clippy::unwrap_used)]

mod common;

use common::Broker;
use rivulet::cluster::membership::{
    presence_topic, JoinOptions, MemberEvent, Membership, MembershipError, Presence,
};
use rivulet::mqtt::Endpoint;
use std::time::Duration;

const KEEP_ALIVE: Duration = Duration::from_secs(2);

fn endpoint(b: &Broker) -> Endpoint {
    endpoint_for_port(b.port)
}

fn options(b: &Broker, id: &str, fingerprint: &str, incarnation: u64) -> JoinOptions {
    JoinOptions {
        cluster: "line-3".into(),
        me: Presence {
            id: id.into(),
            addr: format!("127.0.0.1:74{incarnation:02}"),
            fingerprint: fingerprint.into(),
            incarnation,
            version: "test".into(),
            leaving: false,
        },
        endpoint: endpoint(b),
        keep_alive: KEEP_ALIVE,
    }
}

fn ids(m: &Membership) -> Vec<String> {
    m.members().into_iter().map(|p| p.id).collect()
}

#[test]
fn peers_see_each_other_join_leave_and_vanish() {
    let b = Broker::start("");
    let p1 = Membership::join(options(&b, "p1", "fp", 1)).unwrap();
    let p2 = Membership::join(options(&b, "p2", "fp", 2)).unwrap();
    assert!(p2.wait_for_members(&["p1", "p2"], Duration::from_secs(5)));
    assert!(p1.wait_for_members(&["p1", "p2"], Duration::from_secs(5)));
    let p3 = Membership::join(options(&b, "p3", "fp", 3)).unwrap();
    assert!(p1.wait_for_members(&["p1", "p2", "p3"], Duration::from_secs(5)));
    // The presence carries the advertised address and the fingerprint.
    let seen = p1.members();
    let three = seen.iter().find(|p| p.id == "p3").unwrap();
    assert_eq!(
        (three.addr.as_str(), three.fingerprint.as_str()),
        ("127.0.0.1:7403", "fp")
    );

    // A clean leave clears the presence at once.
    p2.leave();
    assert!(p1.wait_for_members(&["p1", "p3"], Duration::from_secs(3)));
    // A vanished peer (no goodbye) is cleared by its will.
    p3.vanish();
    assert!(p1.wait_for_members(&["p1"], Duration::from_secs(3)));
    let events: Vec<MemberEvent> = p1.events().try_iter().collect();
    assert!(
        events.contains(&MemberEvent::Left("p2".into())),
        "{events:?}"
    );
    assert!(
        events.contains(&MemberEvent::Left("p3".into())),
        "{events:?}"
    );
    assert_eq!(ids(&p1), vec!["p1"]);
    // A newcomer reads the retained list: only the live peer.
    let p4 = Membership::join(options(&b, "p4", "fp", 4)).unwrap();
    assert!(p4.wait_for_members(&["p1", "p4"], Duration::from_secs(5)));
}

#[test]
fn a_second_process_with_a_live_peers_id_is_refused() {
    let b = Broker::start("");
    let _p1 = Membership::join(options(&b, "p1", "fp", 1)).unwrap();
    let err = Membership::join(options(&b, "p1", "fp", 9)).err().unwrap();
    assert!(
        matches!(err, MembershipError::DuplicateId { ref id, .. } if id == "p1"),
        "{err}"
    );
    assert!(err.to_string().contains("already running"), "{err}");
    assert!(err.to_string().contains("127.0.0.1:7401"), "{err}");
}

/// Publishes a retained message (empty: clears it) with `mosquitto_pub`.
fn retain(b: &Broker, topic: &str, payload: Option<&str>) {
    let mut c = std::process::Command::new("mosquitto_pub");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &b.port.to_string(),
        "-q",
        "1",
        "-r",
        "-t",
        topic,
    ]);
    match payload {
        Some(m) => c.args(["-m", m]),
        None => c.arg("-n"),
    };
    assert!(c
        .status()
        .expect("mosquitto_pub (mosquitto-clients)")
        .success());
}

#[test]
fn a_restarted_peer_replaces_the_presence_of_its_earlier_life() {
    let b = Broker::start("");
    let watcher = Membership::join(options(&b, "w", "fp", 7)).unwrap();
    // An earlier life of p1 whose presence is still retained, as after a
    // power cut the broker has not noticed yet.
    let stale = serde_json::to_string(&Presence {
        id: "p1".into(),
        addr: "old:1".into(),
        fingerprint: "fp".into(),
        incarnation: 1,
        version: "test".into(),
        leaving: false,
    })
    .unwrap();
    let topic = presence_topic("line-3", "p1");
    retain(&b, &topic, Some(&stale));
    assert!(watcher.wait_for_members(&["p1", "w"], Duration::from_secs(5)));
    // The stale presence goes (as the broker's will clears it) while the
    // new life waits its grace period (2.5 keep-alives).
    let clear = {
        let port = b.port;
        let topic = topic.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let ok = std::process::Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-q",
                    "1",
                    "-r",
                    "-n",
                    "-t",
                    &topic,
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok);
        })
    };
    let p1 = Membership::join(options(&b, "p1", "fp", 2)).unwrap();
    clear.join().unwrap();
    assert!(p1.wait_for_members(&["p1", "w"], Duration::from_secs(5)));
    let me = p1.members().into_iter().find(|p| p.id == "p1").unwrap();
    assert_eq!((me.incarnation, me.addr.as_str()), (2, "127.0.0.1:7402"));
}

fn endpoint_for_port(port: u16) -> Endpoint {
    common::endpoint(port, "", KEEP_ALIVE)
}

#[test]
fn a_peer_running_another_pipeline_is_refused() {
    let b = Broker::start("");
    let _p1 = Membership::join(options(&b, "p1", "keys=[a]", 1)).unwrap();
    let err = Membership::join(options(&b, "p2", "keys=[b]", 2))
        .err()
        .unwrap();
    assert!(
        matches!(err, MembershipError::OtherPipeline { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("runs another pipeline") && text.contains("keys=[a]"),
        "{text}"
    );
}

#[test]
fn no_broker_is_a_clear_error_within_the_wait() {
    let port = common::free_port();
    let mut o = JoinOptions {
        cluster: "c".into(),
        me: Presence {
            id: "p".into(),
            addr: "x:1".into(),
            fingerprint: "fp".into(),
            incarnation: 1,
            version: "t".into(),
            leaving: false,
        },
        endpoint: endpoint_for_port(port),
        keep_alive: Duration::from_millis(500),
    };
    o.endpoint.client_id = "x".into();
    let err = Membership::join(o).err().unwrap();
    assert!(matches!(err, MembershipError::NoBroker { .. }), "{err}");
}

/// Polls every source once, adding what each got to `got[i]`.
fn take(
    sources: &mut [rivulet::sources::mqtt::MqttSource],
    got: &mut [Vec<(String, String)>],
    wait: Duration,
) {
    use rivulet::sources::{RawBatch, Source};
    for (i, s) in sources.iter_mut().enumerate() {
        let mut batch = RawBatch::default();
        s.poll(&mut batch, 100, 1 << 20, wait).unwrap();
        for item in &batch.items {
            let topic = batch.topic(item).unwrap_or("").to_string();
            let payload = String::from_utf8_lossy(batch.payload(item)).into_owned();
            got[i].push((topic, payload));
        }
    }
}

/// A journaled QoS 1 source in the share group `g`, for `sensors/{id}/t`.
fn shared_source(
    b: &Broker,
    client_id: &str,
    journal: &std::path::Path,
) -> rivulet::sources::mqtt::MqttSource {
    let mut endpoint = endpoint(b);
    endpoint.client_id = client_id.into();
    endpoint.clean_session = false;
    rivulet::sources::mqtt::MqttSource::start(rivulet::sources::mqtt::MqttSourceOptions {
        endpoint,
        patterns: vec![rivulet::mqtt::topic::TopicPattern::parse("sensors/{id}/t").unwrap()],
        qos: 1,
        topic_field: Some("topic".into()),
        journal_dir: Some(journal.to_path_buf()),
        stamp_arrivals: false,
        retain_as_published: false,
        share_group: Some("rivulet-line-3".into()),
    })
    .unwrap()
}

#[test]
fn a_shared_subscription_deals_messages_once_and_drops_retained_ones() {
    let b = Broker::start("");
    // Retained before anyone subscribes: Mosquitto 2.0.11 would send it to
    // every member of the share.
    retain(&b, "sensors/r1/t", Some(r#"{"v":-1}"#));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut sources = [
        shared_source(&b, "member-1", dirs[0].path()),
        shared_source(&b, "member-2", dirs[1].path()),
    ];
    let mut got: Vec<Vec<(String, String)>> = vec![Vec::new(), Vec::new()];
    // Both subscribed (the first polls start the connections).
    take(&mut sources, &mut got, Duration::from_millis(10));
    common::eventually("both members subscribed", 20, || {
        b.log().matches("$share/rivulet-line-3/sensors/+/t").count() >= 2
    });
    let msgs: Vec<(String, String)> = (0..60)
        .map(|i| (format!("sensors/s{}/t", i % 7), format!("{{\"v\":{i}}}")))
        .collect();
    common::publish_all(b.port, &msgs);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        take(&mut sources, &mut got, Duration::from_millis(20));
        let n: usize = got.iter().map(Vec::len).sum();
        if n >= 60 || std::time::Instant::now() > deadline {
            break;
        }
    }
    // Anything more (a retained message would come now at the latest).
    take(&mut sources, &mut got, Duration::from_millis(300));
    // Each member took a share; together every message once, none retained,
    // with the original topic (no `$share/` prefix) for the bindings.
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "{:?}",
        (got[0].len(), got[1].len())
    );
    let mut all: Vec<(String, String)> = got.concat();
    all.sort();
    let mut want = msgs.clone();
    want.sort();
    assert_eq!(all, want);
}

fn peer_pipeline(b: &Broker, peers: &str) -> String {
    format!(
        "name: p\nsource:\n  mqtt: {{ url: \"{}\", topics: [\"sensors/{{id}}/t\"], qos: 1 }}\n  event_time: {{ field: ts }}\n\
         steps:\n  - key_by: id\n  - window: {{ tumbling: 5s, aggregate: {{ n: count() }} }}\n\
         sink: {{ stdout: {{}} }}\nstate: {{ dir: st }}\n{peers}",
        b.url()
    )
}

#[test]
fn rivulet_peers_lists_the_members_and_who_owns_each_group() {
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        peer_pipeline(
            &b,
            "peers: { cluster: line-3, id: watcher, keep_alive: 2s }\n",
        ),
    )
    .unwrap();
    let fp = rivulet::config::load(file.to_str().unwrap())
        .unwrap()
        .peer_fingerprint();
    let _p1 = Membership::join(options(&b, "p1", &fp, 1)).unwrap();
    let _p2 = Membership::join(options(&b, "p2", &fp, 2)).unwrap();
    // A peer of another pipeline is refused, so it is no member.
    assert!(Membership::join(options(&b, "odd", "another", 3)).is_err());
    assert!(_p2.wait_for_members(&["p1", "p2"], Duration::from_secs(5)));
    let out = common::rivulet_cmd(dir.path(), &["peers", "p.yaml", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["p1", "p2"], "{v}");
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 256);
    for g in groups {
        let (o, s) = (g["owner"].as_str().unwrap(), g["standby"].as_str().unwrap());
        assert!(ids.contains(&o) && ids.contains(&s) && o != s, "{g}");
    }
    let owned: u64 = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["owns"].as_u64().unwrap())
        .sum();
    assert_eq!(owned, 256);
    // The watcher left nothing behind: still exactly two peers.
    assert!(_p1.wait_for_members(&["p1", "p2"], Duration::from_secs(2)));
    // The table form.
    let out = common::rivulet_cmd(dir.path(), &["peers", "p.yaml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cluster line-3: 2 peers"), "{text}");
    // `run` as a second p1 (p1 is live) is refused: exit 2, with why.
    std::fs::write(
        dir.path().join("p1.yaml"),
        peer_pipeline(
            &b,
            "peers: { cluster: line-3, id: p1, listen: \"127.0.0.1:0\", keep_alive: 1s }\n",
        ),
    )
    .unwrap();
    let out = common::rivulet_cmd(dir.path(), &["run", "p1.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer `p1` is already running"), "{err}");
}

#[test]
fn the_peers_section_is_checked_with_positions() {
    let b = Broker::start("");
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: String, expected: &[&str]| {
        let f = dir.path().join("v.yaml");
        std::fs::write(&f, yaml).unwrap();
        let out = common::rivulet_cmd(dir.path(), &["validate", "v.yaml"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        for e in expected {
            assert!(err.contains(e), "missing {e:?} in:\n{err}");
        }
        out.status.code()
    };
    let code = check(
        peer_pipeline(
            &b,
            "peers:\n  cluster: \"line 3\"\n  id: pi/1\n  listen: nowhere\n  advertise: host\n  keep_alive: 500ms\n  colour: red\n",
        ),
        &["unknown key `colour`"],
    );
    assert_eq!(code, Some(1));
    check(
        peer_pipeline(
            &b,
            "peers:\n  cluster: \"line 3\"\n  id: pi/1\n  listen: nowhere\n  advertise: host\n  keep_alive: 500ms\n",
        ),
        &[
            "peers.cluster: use letters",
            "peers.id: use letters",
            "peers.listen: `nowhere` is not an address",
            "peers.advertise: expected `host:port`",
            "peers.keep_alive: must be at least 1s",
        ],
    );
    let no_state =
        peer_pipeline(&b, "peers: { cluster: c, id: a }\n").replace("state: { dir: st }\n", "");
    check(no_state, &["peer mode needs a `state:` section"]);
    let qos0 = peer_pipeline(&b, "peers: { cluster: c, id: a }\n").replace("qos: 1", "qos: 0");
    check(qos0, &["peer mode needs `qos: 1`"]);
    let ok = peer_pipeline(
        &b,
        "peers: { cluster: c, id: a, advertise: \"pi-1.lan:7450\" }\n",
    );
    assert_eq!(check(ok, &[]), Some(0));
}

#[test]
fn a_state_dir_may_name_the_host_so_replicas_share_a_volume() {
    let b = Broker::start("");
    let text = peer_pipeline(&b, "peers: { cluster: c, id: a }\n")
        .replace("state: { dir: st }", "state: { dir: \"/data/{host}/st\" }");
    let valid = rivulet::config::validate(&text)
        .map_err(|p| format!("{p:?}"))
        .unwrap();
    let host = rivulet::util::host_name().unwrap();
    assert_eq!(valid.state_dir, Some(format!("/data/{host}/st")));
}
