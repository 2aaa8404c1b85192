//! The real `rivulet` binary: validate, schema, run (file, stdin, generator),
//! clean stop on SIGTERM, clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use common::Rivulet;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rivulet"))
}

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json_lines(b: &[u8]) -> Vec<Value> {
    text(b)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn run_file(dir: &Path, yaml: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = bin();
    cmd.arg("run").arg(&file).args(args).current_dir(dir);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Rivulet::spawn(&mut cmd);
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn version_and_help() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).starts_with("rivulet "));
    let out = bin().arg("--help").output().unwrap();
    for cmd in ["run", "validate", "schema", "example-config"] {
        assert!(text(&out.stdout).contains(cmd), "help lists {cmd}");
    }
}

#[test]
fn validate_accepts_every_shipped_config() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let out = bin().arg("validate").args(&files).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), files.len());
}

#[test]
fn validate_reports_every_problem_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "name: bad
source:
  generator: { sensors: 3 }
  event_time:
    field: ts
    max_out_of_orderness: 2 seconds
steps:
  - map: { celsius: (temperature - 32 * 5 / 9 }
  - key_by: sensor
  - window:
      tumbling: 5s
      aggregate:
        avg: average(celsius)
sink:
  stdout: {}
sinks: oops
",
    )
    .unwrap();
    let out = bin().arg("validate").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("5 problems"), "{err}");
    for expected in [
        "bad.yaml:6:27: source.event_time.max_out_of_orderness: bad duration `2 seconds`",
        "bad.yaml:8:46: steps[0].map.celsius: bad expression",
        "bad.yaml:9:13: steps[1].key_by: unknown field `sensor`; did you mean `sensor_id`?",
        "bad.yaml:13:14: steps[2].window.aggregate.avg: unknown aggregate function `average`",
        "bad.yaml:16:1: unknown key `sinks`; did you mean `sink`?",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

/// `rivulet validate` of `yaml`, written as `name` in `dir`: the exit code
/// and what it printed on stderr.
fn validate_text(dir: &std::path::Path, name: &str, yaml: &str) -> (Option<i32>, String) {
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    let out = bin().arg("validate").arg(&f).output().unwrap();
    (out.status.code(), text(&out.stderr))
}

fn assert_lines(err: &str, expected: &[&str]) {
    for e in expected {
        assert!(err.contains(e), "missing {e:?} in:\n{err}");
    }
}

#[test]
fn validate_checks_stateful_steps_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = validate_text(
        dir.path(),
        "bad.yaml",
        "name: bad
source:
  generator: { sensors: 3 }
  event_time: { field: ts, max_out_of_orderness: 2s }
steps:
  - deadband: { field: temprature, delta: -1, max_silence: 0s }
  - key_by: sensor_id
  - alert: { name: hot, when: temperature >, for: 1 minute, max_keys: 0 }
sink:
  stdout: {}
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &[
        "bad.yaml:6:13: steps[0]: a stateful step keeps state per key: put a `key_by` before it",
        "bad.yaml:6:24: steps[0].deadband.field: unknown field `temprature`; did you mean `temperature`?",
        "bad.yaml:6:43: steps[0].deadband.delta: must be a number of at least 0",
        "bad.yaml:6:60: steps[0].deadband.max_silence: must be greater than zero",
        "bad.yaml:8:44: steps[2].alert.when: bad expression `temperature >`",
        "bad.yaml:8:51: steps[2].alert.for: bad duration `1 minute`",
        "steps[2].alert.max_keys: must be at least 1 (or left out: no bound)",
            ],
    );
    let (code, err) = validate_text(
        dir.path(),
        "ok.yaml",
        "name: ok
source:
  generator: { sensors: 3 }
  event_time: { field: ts, max_out_of_orderness: 2s }
steps:
  - key_by: sensor_id
  - alert: { name: hot, when: temperature > 80, for: 30s, clear: temperature < 75 }
sink:
  stdout: {}
",
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn validate_checks_what_steps_after_a_window_read() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = validate_text(
        dir.path(),
        "bad.yaml",
        "name: bad
source:
  generator: { sensors: 3 }
  event_time: { field: ts, max_out_of_orderness: 2s }
steps:
  - key_by: sensor_id
  - window: { tumbling: 10s, aggregate: { avg_t: avg(temperature) } }
  - filter: humidity > 3
  - window: { tumbling: 1m, aggregate: { hi: max(avg) } }
sink:
  mqtt: { url: mqtt://localhost:1883, topic: \"hot/{sensor_id}\" }
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &[
        // Window results have exactly these fields.
        "bad.yaml:8:13: steps[2].filter: unknown field `humidity` (fields known here: sensor_id, window_start, window_end, avg_t)",
        "steps[3]: the results of steps[1] are not keyed: put a `key_by` before this window",
        "steps[3].window.aggregate.hi: unknown field `avg`; did you mean `avg_t`?",
        // The last window's results have no sensor_id.
        "sink[0].mqtt.topic: the topic uses `{sensor_id}`, which window results lack",
            ],
    );
    // Peer mode does not run later stages yet: a clear refusal.
    let (code, err) = validate_text(
        dir.path(),
        "peers.yaml",
        "name: pm
source:
  mqtt: { url: \"mqtt://127.0.0.1:1883\", topics: [\"s/{id}/t\"], qos: 1 }
  event_time: { field: ts, max_out_of_orderness: 1s }
steps:
  - key_by: id
  - window: { tumbling: 2s, aggregate: { n: count() } }
  - filter: n > 1
sink: { stdout: {} }
state: { dir: st }
peers: { cluster: t }
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &["peers.yaml:8:11: steps[2]: steps after steps[1] (a window or stateful step) are not supported in peer mode yet"],
    );
}

#[test]
fn validate_checks_the_streams_of_a_job_graph() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = validate_text(
        dir.path(),
        "graph.yaml",
        "name: graph
sources:
  temps:
    generator: { sensors: 2 }
    event_time: { field: ts, max_out_of_orderness: 1s }
  unused:
    file: { path: more.jsonl }
streams:
  per_sensor:
    from: temps
    steps:
      - key_by: sensor_id
      - window: { tumbling: 10s, aggregate: { avg_t: avg(temperature) } }
    sink: { stdout: {} }
  hot:
    from: [per_sensor, calm]
    steps:
      - filter: avg_t > 30 && humidity > 3
  calm:
    from: hot
    steps:
      - deadband: { field: avg_t, delta: 1 }
    sink: { stdout: {} }
  lost:
    from: per_sensr
    steps:
      - deduplicate: { fields: [avg_t], within: 1m }
  per_site:
    from: per_sensor
    steps:
      - key_by: site
      - window: { tumbling: 1m, aggregate: { hi: max(avg_t) } }
    sink:
      mqtt: { url: mqtt://localhost:1883, topic: \"hi/{sensor_id}\" }
",
    );
    assert_eq!(code, Some(1), "{err}");
    assert_lines(
        &err,
        &[
            "graph.yaml:7:9: sources.unused: no stream reads source `unused`; name it in a `from`",
            "graph.yaml:16:11: streams.hot.from: a cycle: `hot` → `calm` → `hot` (a stream reads only streams before it)",
            "graph.yaml:25:11: streams.lost.from: unknown `per_sensr`: `from` names sources and streams; did you mean `per_sensor`?",
            "graph.yaml:27:20: streams.lost.steps[0]: a stateful step keeps state per key: put a `key_by` before it",
            "graph.yaml:24:3: streams.lost: this stream's records go nowhere",
            // Window results have exactly their key, window and aggregate fields.
            "graph.yaml:31:17: streams.per_site.steps[0].key_by: unknown field `site` (fields known here: sensor_id, window_start, window_end, avg_t)",
            "streams.per_site.sink[0].mqtt.topic: the topic uses `{sensor_id}`, which window results lack",
        ],
    );
    // Several streams may read the sources: those after the first read
    // events by field, and put out results.
    let (code, err) = validate_text(
        dir.path(),
        "two.yaml",
        "name: two
sources:
  temps:
    generator: { sensors: 2 }
    event_time: { field: ts, max_out_of_orderness: 1s }
  other:
    generator: { sensors: 2 }
    event_time: { field: ts, max_out_of_orderness: 1s }
streams:
  forward:
    from: temps
    steps:
      - key_by: sensor_id
      - deadband: { field: temperature, delta: 1 }
    sink: { stdout: {} }
  per_sensor:
    from: temps
    steps:
      - key_by: sensor_id
      - window: { tumbling: 10s, aggregate: { t: avg(temprature) } }
    sink: { stdout: {} }
  both:
    from: [temps, other]
    steps:
      - window: { tumbling: 10s, aggregate: { n: count() } }
    sink: { stdout: {} }
",
    );
    assert_eq!(code, Some(1), "{err}");
    assert_lines(
        &err,
        &[
            "two.yaml:10:3: streams.forward: `per_sensor` reads the sources, so this stream (which reads them too) needs a window or an `alert`",
            "two.yaml:20:50: streams.per_sensor.steps[1].window.aggregate.t: unknown field `temprature`; did you mean `temperature`?",
            "two.yaml:22:3: streams.both.from: streams that read sources read the same ones for now",
        ],
    );
    // A union's sources share a format and a kind of time.
    let (code, err) = validate_text(
        dir.path(),
        "union.yaml",
        "name: union
sources:
  a:
    generator: { sensors: 2 }
    event_time: { field: ts, max_out_of_orderness: 1s }
  b:
    file: { path: x.jsonl }
    format: text
    time: processing
streams:
  s:
    from: [a, b]
    steps:
      - key_by: sensor_id
      - window: { tumbling: 1s, aggregate: { n: count() } }
    sink: { stdout: {} }
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &[
            "union.yaml:7:9: sources.b.format: the sources of a union share a format: `a` reads `json`",
            "union.yaml:7:9: sources.b: the sources of a union share a kind of time: `a` has event time, this one processing time",
        ],
    );
    // Peer mode runs one stream of one source for now: a clear refusal.
    let (code, err) = validate_text(
        dir.path(),
        "graph-peers.yaml",
        "name: gp
sources:
  a:
    mqtt: { url: \"mqtt://127.0.0.1:1883\", topics: [\"s/{id}/t\"], qos: 1 }
    event_time: { field: ts, max_out_of_orderness: 1s }
  b:
    mqtt: { url: \"mqtt://127.0.0.1:1883\", topics: [\"r/{id}/t\"], qos: 1 }
    event_time: { field: ts, max_out_of_orderness: 1s }
streams:
  s:
    from: [a, b]
    steps:
      - key_by: id
      - window: { tumbling: 2s, aggregate: { n: count() } }
    sink: { stdout: {} }
  t:
    from: s
    steps: [ { filter: n > 1 } ]
    sink: { stdout: {} }
state: { dir: st }
peers: { cluster: t }
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &[
            "streams: job graphs of several streams are not supported in peer mode yet",
            "peers: a union of several sources is not supported in peer mode yet",
        ],
    );
    // The one-stream keys do not mix with the general form.
    let (code, err) = validate_text(
        dir.path(),
        "mixed.yaml",
        "name: mixed
source: { generator: {} }
sources: { g: { generator: {} } }
streams:
  s: { from: g, sink: { stdout: {} } }
",
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &["mixed.yaml:2:9: source: `source` belongs to a pipeline of one stream"],
    );
}

#[test]
fn validate_rejects_broken_yaml_and_structure_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("name: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "a pipeline file is a mapping"),
        ("name: x\nname: y\n", "duplicate key `name`"),
        ("name: x\nsource: {file: {path: a}}\nsink: {stdout: {}}\nsteps:\n  - key_by: k\n", "key_by without a window"),
        ("name: x\nsource: {file: {path: a}}\nsink: {stdout: {}}\nsteps:\n  - window: {tumbling: 5s, aggregate: {n: count()}}\n", "a window needs time"),
        ("name: x\nsource: {file: {path: a}, generator: {}}\nsink: {carrier_pigeon: {}}\n", "exactly one of `mqtt`, `file`, `generator`"),
        ("name: x\nsource: {file: {path: a}}\nsink: {carrier_pigeon: {}}\n", "unknown kind `carrier_pigeon`"),
        ("name: x\nsource: {file: {path: a}}\n", "missing `sink`"),
        ("name: x\nsource: {file: {path: a}, event_time: {field: ts}}\nsteps:\n  - key_by: sensor\n  - window: {tumbling: 5s, aggregate: {n: count()}}\nsink: {mqtt: {url: \"mqtt://h\", topic: \"out/{sensr}\"}}\n", "did you mean `sensor`?"),
        ("name: x\nsource: {mqtt: {url: \"http://h\", topics: [\"a/{b\"], qos: 2}}\nsink: {stdout: {}}\n", "expected `mqtt://host:port`"),
        ("name: x\nsource: {mqtt: {url: \"mqtt://h\", topics: [\"a/x{b}\"]}}\nsink: {stdout: {}}\n", "wildcards and bindings take a whole level"),
        ("name: x\nsource: {mqtt: {url: \"mqtt://h\", topics: [a], ca_file: ca.pem, password: p}}\nsink: {stdout: {}}\n", "TLS settings need an `mqtts://` URL"),
        ("name: x\nsource: {generator: {}, event_time: {field: ts}}\nsink: {stdout: {}}\nsteps:\n  - window: {tumbling: 5s, aggregate: {window_end: count()}}\n", "5:40: steps[0].window.aggregate.window_end: `window_end` is a reserved result field"),
        ("name: x\nsource: {generator: {}, event_time: {field: ts}}\nsink: {stdout: {}}\nsteps:\n  - window: {session: {gap: 0s}, max_keys: 0, aggregate: {n: count()}}\n", "steps[0].window.session.gap: window gap must be greater than zero"),
        ("name: x\nsource: {generator: {}, event_time: {field: ts}}\nsink: {stdout: {}}\nsteps:\n  - window: {tumbling: 5s, max_keys: 0, aggregate: {n: count()}}\n", "steps[0].window.max_keys: max_keys must be at least 1"),
        ("name: x\nsource: {generator: {}, event_time: {field: ts}}\nsink: {stdout: {}}\nsteps:\n  - window: {tumbling: 5s}\n", "a window needs at least one aggregate"),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let f = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let out = bin().arg("validate").arg(&f).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let err = text(&out.stderr);
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn schema_is_json_schema_of_the_pipeline_file() {
    let out = bin().arg("schema").output().unwrap();
    assert!(out.status.success());
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "rivulet pipeline");
    for key in [
        "name",
        "source",
        "steps",
        "sink",
        "late",
        "dead_letter",
        "state",
        "workers",
        "sources",
        "streams",
    ] {
        assert!(schema["properties"].get(key).is_some(), "schema has {key}");
    }
    let defs = schema["$defs"].as_object().unwrap();
    assert!(defs.contains_key("WindowConfig"));
    assert!(defs.contains_key("StreamConfig"));
    // `source` or `sources`: neither is required on its own.
    assert!(schema["required"]
        .as_array()
        .unwrap()
        .contains(&json!("name")));
}

#[test]
fn example_config_validates() {
    let out = bin().arg("example-config").output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ex.yaml");
    std::fs::write(&f, &out.stdout).unwrap();
    let v = bin().arg("validate").arg(&f).output().unwrap();
    assert!(v.status.success(), "{}", text(&v.stderr));
}

const EVENTS: &str = r#"{"sensor":"a","ts":1000,"t":10}
{"sensor":"b","ts":2000,"t":20}
{"sensor":"a","ts":4000,"t":30}
not json at all
{"sensor":"a","ts":6000,"t":40}
{"sensor":"b","ts":1500,"t":50}
"#;

#[test]
fn run_file_source_writes_results_late_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("events.jsonl"), EVENTS).unwrap();
    // Pre-existing output is appended to, never truncated.
    std::fs::write(dir.path().join("out.jsonl"), "{\"earlier\":true}\n").unwrap();
    let yaml = r#"
name: t
source:
  file: { path: events.jsonl }
  # The events are stamped with small numbers, in 1970.
  event_time: { field: ts, max_out_of_orderness: 0ms, plausible_years: any }
steps:
  - key_by: sensor
  - window:
      tumbling: 5s
      aggregate: { n: count(), total: sum(t) }
sink:
  file: { path: out.jsonl }
late:
  file: { path: late.jsonl }
dead_letter:
  file: { path: dead.jsonl }
"#;
    let out = run_file(dir.path(), yaml, &[], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = json_lines(&std::fs::read(dir.path().join("out.jsonl")).unwrap());
    // ts 6000 moves the watermark to 5999: [0,5000) fires for a and b; the
    // b event at 1500 is then late; the end of input fires [5000,10000).
    assert_eq!(
        results,
        vec![
            json!({"earlier": true}),
            json!({"sensor":"a","window_start":0,"window_end":5000,"n":2,"total":40}),
            json!({"sensor":"b","window_start":0,"window_end":5000,"n":1,"total":20}),
            json!({"sensor":"a","window_start":5000,"window_end":10000,"n":1,"total":40}),
        ]
    );
    let late = json_lines(&std::fs::read(dir.path().join("late.jsonl")).unwrap());
    assert_eq!(late, vec![json!({"sensor":"b","ts":1500,"t":50})]);
    let dead = json_lines(&std::fs::read(dir.path().join("dead.jsonl")).unwrap());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"], "not json at all");
    assert_eq!(dead[0]["position"], 4);
    assert_eq!(dead[0]["source"], "file events.jsonl");
    let log = text(&out.stderr);
    assert!(
        log.contains("dead_letters=1") && log.contains("late=1"),
        "{log}"
    );
}

#[test]
fn run_reads_stdin_and_writes_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"
name: t
source:
  file: { path: "-" }
  event_time: { field: ts, plausible_years: any }
steps:
  - key_by: sensor
  - window: { tumbling: 10s, aggregate: { n: count() } }
sink: { stdout: {} }
"#;
    let out = run_file(dir.path(), yaml, &[], Some(EVENTS));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        json_lines(&out.stdout),
        vec![
            json!({"sensor":"a","window_start":0,"window_end":10000,"n":3}),
            json!({"sensor":"b","window_start":0,"window_end":10000,"n":2}),
        ]
    );
}

fn bounded_demo() -> String {
    let demo = std::fs::read_to_string(configs().join("demo.yaml")).unwrap();
    let bounded = demo.replace(
        "    rate: 100 ",
        "    count: 20000\n    start: 1800000000000\n    rate: unlimited ",
    );
    assert_ne!(
        bounded, demo,
        "the demo config changed shape; update this test"
    );
    bounded
}

#[test]
fn the_demo_on_a_bounded_generator_gives_the_same_results_on_1_and_2_workers() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = bounded_demo();
    let one = run_file(dir.path(), &yaml, &["--workers", "1"], None);
    let two = run_file(dir.path(), &yaml, &["--workers", "2"], None);
    assert!(one.status.success(), "{}", text(&one.stderr));
    assert_eq!(one.stdout, two.stdout);
    let rows = json_lines(&one.stdout);
    // 20000 events 1 ms apart from the start (4 windows of 5 s), and the
    // first ones lag up to 500 ms into the window before: 5 windows for
    // each of 5 sensors.
    assert_eq!(rows.len(), 25);
    let total: i64 = rows.iter().map(|r| r["readings"].as_i64().unwrap()).sum();
    assert!(
        total > 19_000 && total <= 20_000,
        "almost all events are on time: {total}"
    );
    for r in &rows {
        let avg = r["avg_celsius"].as_f64().unwrap();
        assert!(avg > 0.0 && avg < 40.0, "{r}");
        assert!(r["max_celsius"].as_f64().unwrap() >= avg);
        assert_eq!(
            r["window_end"].as_i64().unwrap() - r["window_start"].as_i64().unwrap(),
            5000
        );
    }
}

#[test]
fn sigterm_stops_an_unbounded_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.yaml");
    std::fs::copy(configs().join("demo.yaml"), &file).unwrap();
    let child = Rivulet::spawn(
        bin()
            .arg("run")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // Wait until it is running (it logs once the pipeline is built).
    let pid = child.id();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("stopped"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stats_file_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.jsonl"), "{\"a\":1}\n{\"a\":2}\n").unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "name: s\nsource: { file: { path: e.jsonl } }\nsink: { stdout: {} }\n",
    )
    .unwrap();
    let out = bin()
        .arg("run")
        .arg(&file)
        .arg("--stats-file")
        .arg(dir.path().join("stats.json"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["events_read"], 2);
    assert!(stats["time_ms"].as_u64().unwrap() > 0);
    // Fresh: healthy. A stale or missing file: unhealthy.
    let ok = bin()
        .args(["health", "--stats-file"])
        .arg(dir.path().join("stats.json"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    std::fs::write(
        dir.path().join("old.json"),
        r#"{"events_read":1,"time_ms":1000}"#,
    )
    .unwrap();
    let stale = bin()
        .args(["health", "--stats-file"])
        .arg(dir.path().join("old.json"))
        .output()
        .unwrap();
    assert_eq!(stale.status.code(), Some(1));
    assert!(text(&stale.stderr).contains("last updated"));
    let missing = bin()
        .args(["health", "--stats-file", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn missing_input_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "name: t\nsource: { file: { path: nowhere.jsonl } }\nsink: { stdout: {} }\n";
    let out = run_file(dir.path(), yaml, &[], None);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("nowhere.jsonl") && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn run_refuses_an_invalid_file_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_file(dir.path(), "name: t\nsource: {}\n", &[], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing `sink`"));
}

#[test]
fn a_torn_last_line_from_an_interrupted_run_is_cut_not_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.jsonl"), "{\"a\":1}\n").unwrap();
    // A complete record, then half a record (a crash mid-write).
    std::fs::write(
        dir.path().join("out.jsonl"),
        "{\"earlier\":true}\n{\"half\":",
    )
    .unwrap();
    let yaml =
        "name: t\nsource: { file: { path: e.jsonl } }\nsink: { file: { path: out.jsonl } }\n";
    let out = run_file(dir.path(), yaml, &[], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("incomplete last line"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
        "{\"earlier\":true}\n{\"a\":1}\n"
    );
}

#[test]
fn device_timestamps_in_seconds_local_time_and_other_layouts() {
    let dir = tempfile::tempdir().unwrap();
    // OwnTracks-style epoch seconds; one reading in milliseconds by mistake.
    let yaml = r#"
name: owntracks
source:
  file: { path: "-" }
  event_time: { field: tst, unit: s }
steps:
  - key_by: tid
  - window: { tumbling: 1m, aggregate: { n: count() } }
sink: { stdout: {} }
dead_letter: { file: { path: dead.jsonl } }
"#;
    let input = "{\"tid\":\"ph\",\"tst\":1800000000}\n{\"tid\":\"ph\",\"tst\":1800000030.5}\n{\"tid\":\"ph\",\"tst\":1800000030000}\n";
    let out = run_file(dir.path(), yaml, &[], Some(input));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        json_lines(&out.stdout),
        vec![
            json!({"tid":"ph","window_start":1800000000000i64,"window_end":1800000060000i64,"n":2})
        ]
    );
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(
        dead.contains("looks like milliseconds: set `event_time.unit: ms`"),
        "{dead}"
    );

    // The default unit is milliseconds: seconds are refused, never 1970.
    let ms_yaml = yaml.replace(", unit: s }", " }");
    let out = run_file(dir.path(), &ms_yaml, &[], Some(input));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert!(
        dead.contains("looks like seconds: set `event_time.unit: s`"),
        "{dead}"
    );

    // Tasmota: local time without an offset; a layout with a day first.
    for (time, sample) in [
        (
            "{ field: Time, timezone: Europe/Berlin }",
            "2027-01-15T09:00:30",
        ),
        (
            "{ field: Time, timezone: Europe/Berlin, format: \"%d.%m.%Y %H:%M:%S\" }",
            "15.01.2027 09:00:30",
        ),
    ] {
        let yaml = format!(
            "name: tasmota\nsource:\n  file: {{ path: \"-\" }}\n  event_time: {time}\n\
             steps:\n  - key_by: d\n  - window: {{ tumbling: 1m, aggregate: {{ n: count() }} }}\nsink: {{ stdout: {{}} }}\n"
        );
        let input = format!("{{\"d\":\"plug\",\"Time\":\"{sample}\"}}\n");
        let out = run_file(dir.path(), &yaml, &[], Some(&input));
        assert!(out.status.success(), "{}", text(&out.stderr));
        // 09:00:30 in Berlin in January is 08:00:30 UTC (1800000030000).
        assert_eq!(
            json_lines(&out.stdout),
            vec![
                json!({"d":"plug","window_start":1800000000000i64,"window_end":1800000060000i64,"n":1})
            ],
            "{time}"
        );
    }

    // Without a zone a local time is a dead letter that says what to set.
    let yaml = "name: tasmota\nsource:\n  file: { path: \"-\" }\n  event_time: { field: Time }\n\
         steps:\n  - key_by: d\n  - window: { tumbling: 1m, aggregate: { n: count() } }\nsink: { stdout: {} }\ndead_letter: { file: { path: dead.jsonl } }\n";
    let out = run_file(
        dir.path(),
        yaml,
        &[],
        Some("{\"d\":\"plug\",\"Time\":\"2027-01-15T09:00:30\"}\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(json_lines(&out.stdout).is_empty());
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert!(
        dead.contains("has no UTC offset: set `event_time.timezone`"),
        "{dead}"
    );
}

#[test]
fn validate_checks_timestamp_units_formats_and_zones_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "name: x\nsource:\n  file: { path: a }\n  event_time:\n    field: ts\n    unit: sec\n    format: \"%H:%M\"\n    timezone: Mars/Olympus\n    plausible_years: 2100..2000\n\
         steps:\n  - key_by: k\n  - window: { tumbling: 5s, aggregate: { n: count() } }\nsink: { stdout: {} }\n",
    )
    .unwrap();
    let out = bin().arg("validate").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    for want in [
        "bad.yaml:6:11: source.event_time.unit: unknown unit `sec`; expected `s`, `ms`, `us` or `ns`",
        "bad.yaml:7:13: source.event_time.format: bad format `%H:%M`: it must hold at least a year, month and day",
        "bad.yaml:8:15: source.event_time.timezone: unknown time zone `Mars/Olympus`",
        "bad.yaml:9:22: source.event_time.plausible_years: bad range `2100..2000`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn validate_checks_the_status_topic() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, want) in [
        (
            "name: x\nsource: { mqtt: { url: \"mqtt://h\", topics: [a] } }\nstatus: { topic: \"a/+\" }\nsink: { stdout: {} }\n",
            "3:18: status.topic: a publish topic cannot hold wildcards: `a/+`",
        ),
        (
            "name: x\nsource: { mqtt: { url: \"mqtt://h\", topics: [a] } }\nstatus: { topic: \"s/{k}\" }\nsink: { stdout: {} }\n",
            "3:18: status.topic: `s/{k}` names fields; a status topic is one fixed topic",
        ),
        (
            "name: x\nsource: { file: { path: a } }\nstatus: { topic: a/b }\nsink: { stdout: {} }\n",
            "3:18: status.topic: a status topic needs an mqtt source or sink",
        ),
        (
            "name: x\nsource: { file: { path: a } }\nstatus: { enable: false }\nsink: { stdout: {} }\n",
            "3:11: status: unknown key `enable`; did you mean `enabled`?",
        ),
    ] {
        let f = dir.path().join("s.yaml");
        std::fs::write(&f, yaml).unwrap();
        let out = bin().arg("validate").arg(&f).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let err = text(&out.stderr);
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn ingestion_time_excludes_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("i.yaml");
    std::fs::write(
        &f,
        "name: x\nsource:\n  file: {path: a}\n  time: ingestion\n  event_time: {field: ts}\nsteps:\n  - key_by: k\n  - window: {tumbling: 1s, aggregate: {n: count()}}\nsink: {stdout: {}}\n",
    )
    .unwrap();
    let out = bin().arg("validate").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(
        "4:9: source.time: `time: ingestion` and `event_time` exclude each other; keep one"
    ));
    std::fs::write(
        &f,
        "name: x\nsource:\n  file: {path: a}\n  time: ingestion\nsteps:\n  - key_by: k\n  - window: {tumbling: 1s, aggregate: {n: count()}}\nsink: {stdout: {}}\n",
    )
    .unwrap();
    let out = bin().arg("validate").arg(&f).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_shared_preparation_stream_feeds_each_reader_as_its_own_steps_would() {
    // `clean` (a map and a filter, no sink) is read by two windowed
    // streams: each gives what a one-stream pipeline with `clean`'s steps
    // and its own gives.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut input = String::new();
    let mut x = 3u64;
    for i in 0..4000i64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        input.push_str(&format!(
            "{{\"sensor\":\"s{}\",\"site\":\"p{}\",\"ts\":{},\"f\":{}}}\n",
            x % 5,
            x % 2,
            1_800_000_000_000 + i * 50 - (x % 400) as i64,
            (x % 120) as i64 - 10
        ));
    }
    std::fs::write(d.join("in.jsonl"), input).unwrap();
    let source =
        "file: { path: in.jsonl }\n    event_time: { field: ts, max_out_of_orderness: 500ms }";
    let clean = "- map: { c: (f - 32) * 5 / 9 }\n      - filter: c > -20";
    let per_sensor = "- key_by: sensor\n      - window: { tumbling: 10s, aggregate: { avg_c: avg(c), n: count() } }";
    let per_site = "- key_by: site\n      - window: { tumbling: 30s, aggregate: { hi: max(c) } }";
    let run = |file: &str, yaml: String| {
        std::fs::write(d.join(file), yaml).unwrap();
        let out = bin().arg("run").arg(file).current_dir(d).output().unwrap();
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    };
    run(
        "graph.yaml",
        format!(
            "name: g\nsources:\n  events:\n    {source}\nstreams:\n  clean:\n    from: events\n    steps:\n      {clean}\n\
             \x20 per_sensor:\n    from: clean\n    steps:\n      {per_sensor}\n    sink: {{ file: {{ path: g-sensor.jsonl }} }}\n\
             \x20 per_site:\n    from: clean\n    steps:\n      {per_site}\n    sink: {{ file: {{ path: g-site.jsonl }} }}\n"
        ),
    );
    for (name, steps) in [("sensor", per_sensor), ("site", per_site)] {
        run(
            &format!("{name}.yaml"),
            format!(
                "name: {name}\nsource:\n  {}\nsteps:\n  {}\n  {}\nsink: {{ file: {{ path: alone-{name}.jsonl }} }}\n",
                source.replace("\n    ", "\n  "),
                clean.replace("\n      ", "\n  "),
                steps.replace("\n      ", "\n  ")
            ),
        );
        let read = |f: String| std::fs::read_to_string(d.join(f)).unwrap();
        let (graph, alone) = (
            read(format!("g-{name}.jsonl")),
            read(format!("alone-{name}.jsonl")),
        );
        assert!(alone.lines().count() > 5, "{name}: {alone}");
        assert_eq!(graph, alone, "{name}");
    }
    // A union cannot read it: its steps would apply to the other input.
    let (code, err) = validate_text(
        d,
        "union.yaml",
        &format!(
            "name: u\nsources:\n  events:\n    {source}\nstreams:\n  clean:\n    from: events\n    steps:\n      {clean}\n\
             \x20 per_sensor:\n    from: events\n    steps:\n      {per_sensor}\n    sink: {{ stdout: {{}} }}\n\
             \x20 both:\n    from: [per_sensor, clean]\n    sink: {{ stdout: {{}} }}\n"
        ),
    );
    assert_eq!(code, Some(1));
    assert_lines(
        &err,
        &["streams.both.from: `clean` has no window or `alert`, so a union cannot read it yet"],
    );
    // A problem in a preparation is reported once, where it is written;
    // a reader's own steps keep their own numbers.
    let (code, err) = validate_text(
        d,
        "typo.yaml",
        "name: t
sources:
  events: { generator: { sensors: 2 }, event_time: { field: ts, max_out_of_orderness: 1s } }
streams:
  clean:
    from: events
    steps:
      - map: { c: (temperature - 32) * 5 / 9 }
      - filter: humdity < 90
  a:
    from: clean
    steps:
      - key_by: sensor_id
      - window: { tumbling: 10s, aggregate: { avg_c: avg(cc) } }
    sink: { stdout: {} }
  b:
    from: clean
    steps:
      - key_by: sensor_id
      - window: { tumbling: 1m, aggregate: { hi: max(c) } }
    sink: { stdout: {} }
",
    );
    assert_eq!(code, Some(1));
    assert_eq!(err.matches("humdity").count(), 1, "{err}");
    assert_lines(
        &err,
        &[
            "typo.yaml:9:17: streams.clean.steps[1].filter: unknown field `humdity`; did you mean `humidity`?",
            "typo.yaml:14:54: streams.a.steps[1].window.aggregate.avg_c: unknown field `cc`",
        ],
    );
}
