//! Durable state: a run killed with SIGKILL again and again, and restarted
//! each time, gives the same final window results as an uninterrupted run.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Rivulet, Tmpfs};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn write_input(path: &Path, n: usize) {
    let mut s = String::with_capacity(n * 48);
    let mut x = 7u64;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = x % 300;
        let ts = i as i64 * 2 - (x % 700) as i64;
        s.push_str(&format!(
            "{{\"k\":\"k{key}\",\"ts\":{ts},\"v\":{}}}\n",
            x % 100
        ));
    }
    std::fs::write(path, s).unwrap();
}

/// The aggregates of the fixtures' pipeline (state format 1).
const AGGREGATES: &str = "n: count(), total: sum(v), hi: max(v), first: first(v), last: last(v)";
/// With every statistical aggregate too.
const ALL_AGGREGATES: &str = "n: count(), total: sum(v), hi: max(v), first: first(v), last: last(v), var: variance(v), sd: stddev_pop(v), med: median(v), p90: \"percentile(v, 0.9)\", kinds: count_distinct(v)";

fn pipeline(dir: &Path, out: &str, state: bool) -> std::path::PathBuf {
    pipeline_of(dir, out, state, AGGREGATES)
}

fn pipeline_of(dir: &Path, out: &str, state: bool, aggregates: &str) -> std::path::PathBuf {
    let state = if state {
        "state:\n  dir: state\n  checkpoint_interval: 40ms\n"
    } else {
        ""
    };
    let yaml = format!(
        "name: crash\nsource:\n  file: {{ path: events.jsonl }}\n  event_time: {{ field: ts, max_out_of_orderness: 300ms, plausible_years: any }}\n\
         steps:\n  - key_by: k\n  - window:\n      tumbling: 1s\n      allowed_lateness: 500ms\n      aggregate: {{ {aggregates} }}\n\
         sink: {{ file: {{ path: {out} }} }}\nlate: {{ file: {{ path: {out}.late }} }}\n{state}"
    );
    let p = dir.join(format!("{out}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    p
}

/// The last result of each (key, window): what a consumer keeps.
fn finals(path: &Path) -> BTreeMap<(String, i64), serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                (
                    v["k"].as_str().unwrap().to_string(),
                    v["window_start"].as_i64().unwrap(),
                ),
                v,
            )
        })
        .collect()
}

fn rivulet(dir: &Path, file: &Path) -> Command {
    let mut c = common::rivulet_cmd(dir, &["run"]);
    c.arg(file).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

#[test]
fn kill_9_twenty_times_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 300_000);

    // Every aggregate function's accumulator is checkpointed and restored.
    let reference = pipeline_of(d, "reference.jsonl", false, ALL_AGGREGATES);
    let out = rivulet(d, &reference).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = finals(&d.join("reference.jsonl"));
    assert!(expected.len() > 1000, "{} windows", expected.len());

    let crashing = pipeline_of(d, "crashed.jsonl", true, ALL_AGGREGATES);
    let kills = 20;
    crash_until_done(d, &crashing, "crashed.jsonl", kills);
    let got = finals(&d.join("crashed.jsonl"));
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "windows missing after {kills} kills: {missing:?}"
    );
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(5)
        .map(|(k, v)| (k.clone(), v.clone(), got.get(k).cloned()))
        .collect();
    assert!(
        wrong.is_empty(),
        "after {kills} kills, results differ: {wrong:?}"
    );
    assert_eq!(got.len(), expected.len());
}

#[test]
fn a_finished_run_resumes_at_the_end_and_a_changed_pipeline_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 5_000);
    let p = pipeline(d, "out.jsonl", true);
    assert!(rivulet(d, &p).output().unwrap().status.success());
    let first = std::fs::read_to_string(d.join("out.jsonl")).unwrap();
    // Running again reads nothing new: the checkpoint is at the end of the file.
    assert!(rivulet(d, &p).output().unwrap().status.success());
    assert_eq!(std::fs::read_to_string(d.join("out.jsonl")).unwrap(), first);
    // A different window cannot take over this state.
    let yaml = std::fs::read_to_string(&p)
        .unwrap()
        .replace("tumbling: 1s", "tumbling: 2s");
    std::fs::write(&p, yaml).unwrap();
    let out = rivulet(d, &p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different pipeline"), "{err}");
}

#[test]
fn a_foreign_file_in_the_state_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 100);
    std::fs::create_dir(d.join("state")).unwrap();
    std::fs::write(d.join("state/state.redb"), b"not a database at all").unwrap();
    let p = pipeline(d, "out.jsonl", true);
    let out = rivulet(d, &p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state.redb") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn state_inspect_shows_the_open_windows_after_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("g.yaml");
    std::fs::write(
        &p,
        "name: g\nsource:\n  generator: { sensors: 3, rate: 2000, start: 0, seed: 5 }\n  event_time: { field: ts, plausible_years: any }\n\
         steps:\n  - key_by: sensor_id\n  - window: { tumbling: 1h, aggregate: { n: count(), hot: max(temperature) } }\n\
         sink: { stdout: {} }\nstate: { dir: st, checkpoint_interval: 100ms }\n",
    )
    .unwrap();
    let child = Rivulet::spawn(&mut rivulet(d, &p));
    std::thread::sleep(Duration::from_millis(1500));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(d.join("st"))
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&inspect.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "one open window per sensor: {rows:?}");
    let total: i64 = rows
        .iter()
        .map(|r| r["aggregates"]["n"].as_i64().unwrap())
        .sum();
    assert!(total > 100, "{total} events counted");
    for r in &rows {
        assert!(r["key"]["sensor_id"]
            .as_str()
            .unwrap()
            .starts_with("sensor-"));
        assert_eq!(r["window_start"], 0);
        assert!(r["aggregates"]["hot"].as_f64().unwrap() > 0.0);
    }
    let err = String::from_utf8_lossy(&inspect.stderr);
    assert!(err.contains("3 keys"), "{err}");
    // The stopped run resumes where it stopped: the counts only grow.
    let child = Rivulet::spawn(&mut rivulet(d, &p));
    std::thread::sleep(Duration::from_millis(800));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("resuming from the last checkpoint"), "{log}");
    let again = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(d.join("st"))
        .output()
        .unwrap();
    let total2: i64 = String::from_utf8_lossy(&again.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["aggregates"]["n"]
                .as_i64()
                .unwrap()
        })
        .sum();
    assert!(total2 > total, "{total2} > {total}");
}

#[test]
fn inspect_of_a_directory_without_state_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a state directory"));
}

#[test]
fn a_full_disk_fails_checkpoints_without_stopping_and_the_next_one_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk");
    let fs = Tmpfs::mount(&disk, "8m");
    let p = d.join("g.yaml");
    std::fs::write(
        &p,
        format!(
            "name: full\nsource:\n  generator: {{ sensors: 1000000, rate: 5000, start: 0, seed: 3 }}\n  event_time: {{ field: ts, plausible_years: any }}\n\
             steps:\n  - key_by: sensor_id\n  - window: {{ tumbling: 1h, aggregate: {{ n: count() }} }}\n\
             sink: {{ stdout: {{}} }}\nstate: {{ dir: {}, checkpoint_interval: 100ms }}\n",
            disk.join("st").display()
        ),
    )
    .unwrap();
    let child = Rivulet::spawn(&mut rivulet(d, &p));
    // Let it write a first checkpoint, then fill the disk.
    std::thread::sleep(Duration::from_millis(600));
    let filler = fs.fill();
    std::thread::sleep(Duration::from_millis(1500));
    // Room again: a later checkpoint succeeds and catches up.
    std::fs::remove_file(&filler).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("checkpoint failed"),
        "the full disk was reported:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let inspect = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(disk.join("st"))
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    // New sensors keep coming, so every checkpoint needs more room; the
    // last one holds the window of every sensor seen.
    let keys = String::from_utf8_lossy(&inspect.stdout).lines().count();
    let open: usize = log
        .split("open_windows=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no open_windows in the log:\n{log}"));
    assert!(open > 5000, "{open} sensors seen");
    assert_eq!(
        keys, open,
        "the final checkpoint holds every sensor's window"
    );
}

fn generator_pipeline(window: &str, extra_step: &str) -> String {
    format!(
        "name: sp\nsource:\n  generator: {{ sensors: 4, rate: 2000, start: 0, seed: 11 }}\n  event_time: {{ field: ts, plausible_years: any }}\n\
         steps:\n{extra_step}  - key_by: sensor_id\n  - window: {{ tumbling: {window}, aggregate: {{ n: count() }} }}\n\
         sink: {{ stdout: {{}} }}\nstate: {{ dir: st, checkpoint_interval: 1h }}\n"
    )
}

fn inspect_total(path: &Path) -> (usize, i64) {
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        rows.len(),
        rows.iter()
            .map(|r| r["aggregates"]["n"].as_i64().unwrap())
            .sum(),
    )
}

#[test]
fn savepoint_round_trip_and_the_incompatible_change_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("sp.yaml");
    std::fs::write(&p, generator_pipeline("1h", "")).unwrap();
    // A checkpoint interval of an hour: only the savepoint writes state.
    let child = Rivulet::spawn(&mut rivulet(d, &p));
    std::thread::sleep(Duration::from_millis(800));
    let sp = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .arg("savepoint")
        .arg(&p)
        .args(["--out", "saved.redb"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        sp.status.success(),
        "{}",
        String::from_utf8_lossy(&sp.stderr)
    );
    assert!(String::from_utf8_lossy(&sp.stdout)
        .trim()
        .ends_with("saved.redb"));
    Command::new("kill")
        .arg("-KILL")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let _ = child.wait_with_output();
    let (keys, counted) = inspect_total(&d.join("saved.redb"));
    assert_eq!(keys, 4);
    assert!(counted > 100, "{counted}");

    // A compatible change (a new filter) starts from the savepoint.
    std::fs::remove_dir_all(d.join("st")).unwrap();
    std::fs::write(
        &p,
        generator_pipeline("1h", "  - filter: temperature > -1000\n"),
    )
    .unwrap();
    let child = Rivulet::spawn(
        rivulet(d, &p)
            .arg("--from-savepoint")
            .arg(d.join("saved.redb")),
    );
    std::thread::sleep(Duration::from_millis(800));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("starting from a savepoint"),
        "{log}"
    );
    let (_, after) = inspect_total(&d.join("st"));
    assert!(
        after > counted,
        "the restored counts went on: {after} > {counted}"
    );

    // An incompatible change (another window size) is refused...
    std::fs::write(&p, generator_pipeline("2h", "")).unwrap();
    let out = rivulet(d, &p)
        .arg("--from-savepoint")
        .arg(d.join("saved.redb"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("different pipeline") && err.contains("--allow-non-restored-state"),
        "{err}"
    );
    // ...unless asked to drop the state it cannot use.
    let child = Rivulet::spawn(
        rivulet(d, &p)
            .arg("--from-savepoint")
            .arg(d.join("saved.redb"))
            .arg("--allow-non-restored-state"),
    );
    std::thread::sleep(Duration::from_millis(600));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("dropping the saved keyed state"), "{log}");
}

#[test]
fn savepoint_without_a_running_pipeline_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("sp.yaml");
    std::fs::write(&p, generator_pipeline("1h", "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .arg("savepoint")
        .arg(&p)
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach a running pipeline"));
}

#[test]
fn inspect_reads_the_state_a_killed_run_left_without_changing_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("k.yaml");
    std::fs::write(
        &p,
        generator_pipeline("1h", "")
            .replace("checkpoint_interval: 1h", "checkpoint_interval: 50ms"),
    )
    .unwrap();
    let mut child = Rivulet::spawn(&mut rivulet(d, &p));
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read(d.join("st/state.redb")).unwrap();
    let (keys, counted) = inspect_total(&d.join("st"));
    assert_eq!(keys, 4);
    assert!(counted > 0);
    assert_eq!(
        std::fs::read(d.join("st/state.redb")).unwrap(),
        before,
        "inspect changed the file"
    );
}

/// Keys need no time-to-live of their own: a key that goes silent leaves
/// the checkpointed state once the watermark passes its last window.
#[test]
fn a_key_that_goes_silent_leaves_the_state() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("s.yaml");
    std::fs::write(
        &p,
        "name: s\nsource:\n  file: { path: \"-\" }\n  event_time: { field: ts, max_out_of_orderness: 0s, plausible_years: any }\n\
         steps:\n  - key_by: k\n  - window: { tumbling: 1s, allowed_lateness: 1s, aggregate: { n: count() } }\n\
         sink: { file: { path: out.jsonl } }\nstate: { dir: st, checkpoint_interval: 50ms }\n",
    )
    .unwrap();
    let mut child = Rivulet::spawn(rivulet(d, &p).stdin(Stdio::piped()));
    let mut stdin = child.stdin.take().unwrap();
    let keys = |d: &Path| -> Vec<String> {
        let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
            .args(["state", "inspect"])
            .arg(d.join("st"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["key"]["k"].as_str().unwrap().to_string()
            })
            .collect()
    };
    // Both keys, then only "busy" for a while of event time.
    for ts in (0..900).step_by(100) {
        writeln!(stdin, "{{\"k\":\"quiet\",\"ts\":{ts}}}").unwrap();
        writeln!(stdin, "{{\"k\":\"busy\",\"ts\":{ts}}}").unwrap();
    }
    stdin.flush().unwrap();
    common::eventually("both keys in the state", 20, || {
        let k = keys(d);
        k.contains(&"quiet".to_string()) && k.contains(&"busy".to_string())
    });
    for ts in (1000..5000).step_by(100) {
        writeln!(stdin, "{{\"k\":\"busy\",\"ts\":{ts}}}").unwrap();
    }
    stdin.flush().unwrap();
    common::eventually("the quiet key to leave the state", 20, || {
        let k = keys(d);
        !k.contains(&"quiet".to_string()) && k.contains(&"busy".to_string())
    });
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// The state fixtures in `tests/fixtures/state-v1/` were written by the
/// first state format (one `keys` table under one fingerprint):
/// `checkpoint.redb` by `checkpoint.yaml` (the pipeline of the kill test)
/// killed with SIGKILL mid-file, `savepoint.redb` by `rivulet savepoint`
/// of `savepoint.yaml`. Every later version must still restore them.
fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/state-v1")
        .join(name)
}

#[test]
fn a_checkpoint_of_state_format_1_still_restores_and_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 300_000);
    let reference = pipeline(d, "reference.jsonl", false);
    assert!(rivulet(d, &reference).output().unwrap().status.success());
    let expected = finals(&d.join("reference.jsonl"));

    std::fs::create_dir_all(d.join("state")).unwrap();
    std::fs::copy(fixture("checkpoint.redb"), d.join("state/state.redb")).unwrap();
    let p = pipeline(d, "out.jsonl", true);
    let out = rivulet(d, &p).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from the last checkpoint"), "{log}");
    let got = finals(&d.join("out.jsonl"));
    // The fixture's checkpoint stands at watermark 148496 (`state inspect`):
    // every window still open there is emitted by the resumed run, and
    // every result it emits is the uninterrupted run's final one.
    let open: Vec<_> = expected
        .iter()
        .filter(|(_, v)| v["window_end"].as_i64().unwrap() - 1 > 148_496)
        .collect();
    assert!(open.len() > 1000, "{} windows", open.len());
    for (k, v) in &open {
        assert_eq!(got.get(*k), Some(*v), "window {k:?}");
    }
    for (k, v) in &got {
        assert_eq!(expected.get(k), Some(v), "window {k:?}");
    }
    // The run upgraded the file to the current format; the fixture is a
    // format-1 file, which inspect reads as it is.
    let header = |path: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
            .args(["state", "inspect"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(header(&d.join("state")).contains("state format 2"));
    assert!(header(&fixture("checkpoint.redb")).contains("(state format 1)"));
}

#[test]
fn a_savepoint_of_state_format_1_still_restores() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sp = fixture("savepoint.redb");
    assert_eq!(inspect_total(&sp), (4, 1605));
    let p = d.join("sp.yaml");
    std::fs::copy(fixture("savepoint.yaml"), &p).unwrap();
    let child = Rivulet::spawn(rivulet(d, &p).arg("--from-savepoint").arg(&sp));
    std::thread::sleep(Duration::from_millis(600));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("starting from a savepoint"), "{log}");
    let (keys, after) = inspect_total(&d.join("st"));
    assert_eq!(keys, 4);
    assert!(after > 1605, "the restored counts went on: {after}");
}

/// Regression: a pipeline without a window keeps only its input position;
/// its format-1 state must load too (the first format-2 build refused it as
/// "written by a different pipeline").
#[test]
fn a_format_1_state_of_a_pipeline_without_a_window_still_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("stateless.yaml"), d.join("p.yaml")).unwrap();
    // The input the fixture's run read to the end, and one line more.
    std::fs::write(d.join("in.jsonl"), "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n").unwrap();
    std::fs::create_dir_all(d.join("st")).unwrap();
    std::fs::copy(fixture("stateless.redb"), d.join("st/state.redb")).unwrap();
    let out = rivulet(d, &d.join("p.yaml")).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("resuming from the last checkpoint"), "{log}");
    // Only the line after the saved position is read.
    assert_eq!(
        std::fs::read_to_string(d.join("out.jsonl")).unwrap(),
        "{\"a\":3}\n"
    );
}

/// Runs `file` again and again, killing it with SIGKILL `kills_wanted`
/// times at random moments, then lets a run finish (starting afresh, state
/// and output removed, when one finishes before enough kills).
fn crash_until_done(d: &Path, file: &Path, out: &str, kills_wanted: u32) {
    let mut kills = 0;
    let mut rng = 31u64;
    for attempt in 0..2000 {
        let mut child = Rivulet::spawn(&mut rivulet(d, file));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = if kills < kills_wanted {
            20 + rng % 150
        } else {
            2000
        };
        std::thread::sleep(Duration::from_millis(wait));
        match child.try_wait().unwrap() {
            Some(status) => {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "attempt {attempt}: {err}");
                if kills >= kills_wanted {
                    return;
                }
                std::fs::remove_dir_all(d.join("state")).unwrap();
                std::fs::remove_file(d.join(out)).unwrap();
                kills = 0;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    panic!("only {kills} kills");
}

#[test]
fn stateful_steps_killed_again_and_again_lose_no_event_and_invent_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 200_000);
    for (name, step) in [
        (
            "deadband",
            "deadband: { field: v, delta: 30, max_silence: 3s }",
        ),
        (
            "alert",
            // Each key's `v` is the same in every event (`write_input`
            // derives both from one number): the condition is on time.
            "alert: { name: high, when: \"ts % 2000 > 1000\", for: 100ms, clear: \"ts % 2000 < 500\" }",
        ),
    ] {
        let yaml = |out: &str, state: bool| {
            let state = if state {
                "state: { dir: state, checkpoint_interval: 40ms }\n"
            } else {
                ""
            };
            let p = d.join(format!("{name}-{out}.yaml"));
            std::fs::write(
                &p,
                format!(
                    "name: {name}\nsource:\n  file: {{ path: events.jsonl }}\n  event_time: {{ field: ts, max_out_of_orderness: 300ms, plausible_years: any }}\n\
                     steps:\n  - key_by: k\n  - {step}\nsink: {{ file: {{ path: {out} }} }}\n{state}"
                ),
            )
            .unwrap();
            p
        };
        let lines = |out: &str| -> std::collections::BTreeSet<String> {
            std::fs::read_to_string(d.join(out))
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        };
        // Each step writes files of its own: a restart from scratch in
        // `crash_until_done` removes only this step's output.
        let (reference_out, crashed_out) = (
            format!("{name}-reference.jsonl"),
            format!("{name}-crashed.jsonl"),
        );
        let reference = yaml(&reference_out, false);
        assert!(rivulet(d, &reference).output().unwrap().status.success());
        let expected = lines(&reference_out);
        assert!(expected.len() > 500, "{name}: {} outputs", expected.len());
        let crashing = yaml(&crashed_out, true);
        crash_until_done(d, &crashing, &crashed_out, 10);
        // Outputs after the last checkpoint come again after a crash: as
        // a set they equal the uninterrupted run's.
        let got = lines(&crashed_out);
        let missing: Vec<_> = expected.difference(&got).take(3).collect();
        let invented: Vec<_> = got.difference(&expected).take(3).collect();
        assert!(
            missing.is_empty() && invented.is_empty(),
            "{name}: missing {missing:?}, not expected {invented:?}"
        );
        std::fs::remove_dir_all(d.join("state")).unwrap();
    }
}

#[test]
fn a_window_of_windows_killed_again_and_again_gives_the_same_final_results() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 200_000);
    let yaml = |out: &str, state: bool| {
        let state = if state {
            "state: { dir: state, checkpoint_interval: 40ms }\n"
        } else {
            ""
        };
        let p = d.join(format!("{out}.yaml"));
        std::fs::write(
            &p,
            format!(
                "name: graph\nsource:\n  file: {{ path: events.jsonl }}\n  event_time: {{ field: ts, max_out_of_orderness: 300ms, plausible_years: any }}\n\
                 steps:\n  - key_by: k\n  - window: {{ tumbling: 1s, aggregate: {{ n: count(), total: sum(v) }} }}\n  - filter: n > 0\n  - key_by: k\n  - window: {{ tumbling: 5s, aggregate: {{ windows: count(), events: sum(n), hi: max(total), med: median(total) }} }}\n\
                 sink: {{ file: {{ path: {out} }} }}\n{state}"
            ),
        )
        .unwrap();
        p
    };
    let reference = yaml("reference.jsonl", false);
    let out = rivulet(d, &reference).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = finals(&d.join("reference.jsonl"));
    assert!(expected.len() > 500, "{} windows", expected.len());
    let crashing = yaml("crashed.jsonl", true);
    crash_until_done(d, &crashing, "crashed.jsonl", 12);
    let got = finals(&d.join("crashed.jsonl"));
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(3)
        .map(|(k, v)| (k.clone(), v.clone(), got.get(k).cloned()))
        .collect();
    assert!(wrong.is_empty(), "results differ: {wrong:?}");
    assert_eq!(got.len(), expected.len());
}

#[test]
fn killed_again_and_again_while_it_starts_it_always_starts_again() {
    // Kills in the first milliseconds land while the state file and the
    // journal are being created: the next start must still open them.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 20_000);
    let p = pipeline(d, "out.jsonl", true);
    let mut rng = 5u64;
    for attempt in 0..200 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut child = Rivulet::spawn(&mut rivulet(d, &p));
        std::thread::sleep(Duration::from_millis(rng % 25));
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(status.success(), "attempt {attempt}: {err}");
        } else {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        if attempt % 3 == 0 {
            // A fresh state directory: the next kill may land in its creation.
            let _ = std::fs::remove_dir_all(d.join("state"));
        }
    }
    let out = rivulet(d, &p).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn state_inspect_shows_every_stage_with_its_own_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("g.yaml");
    std::fs::write(
        &p,
        "name: g\nsource:\n  generator: { sensors: 3, rate: 2000, start: 0, seed: 5 }\n  event_time: { field: ts, plausible_years: any }\n\
         steps:\n  - key_by: sensor_id\n  - window: { tumbling: 100ms, aggregate: { n: count() } }\n\
         \x20 - key_by: sensor_id\n  - window: { tumbling: 300ms, aggregate: { windows: count(), events: sum(n) } }\n\
         \x20 - key_by: sensor_id\n  - alert: { name: busy, when: events > 0, for: 1h }\n\
         sink: { stdout: {} }\nstate: { dir: st, checkpoint_interval: 100ms }\n",
    )
    .unwrap();
    let child = Rivulet::spawn(&mut rivulet(d, &p));
    std::thread::sleep(Duration::from_millis(1500));
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["state", "inspect"])
        .arg(d.join("st"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&inspect.stderr);
    assert!(inspect.status.success(), "{err}");
    assert!(err.contains("more in later stages"), "{err}");
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&inspect.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The second stage: an open 300 ms window per sensor, counting the
    // 100 ms windows in it so far.
    let open: Vec<&serde_json::Value> = rows.iter().filter(|r| r["operator"] == 1).collect();
    assert_eq!(open.len(), 3, "{rows:?}");
    for w in &open {
        assert!(w["key"]["sensor_id"]
            .as_str()
            .unwrap()
            .starts_with("sensor-"));
        assert!(w["aggregates"]["windows"].as_i64().unwrap() >= 1, "{w}");
        assert!(w["aggregates"]["events"].as_i64().unwrap() > 10, "{w}");
        assert_eq!(w["stage"], 2);
    }
    // The alert: each sensor holds `events > 0` since its first 300 ms
    // result and has a timer an hour after that.
    let alerts: Vec<&serde_json::Value> = rows.iter().filter(|r| r["step"] == "alert").collect();
    assert_eq!(alerts.len(), 3, "{rows:?}");
    for a in &alerts {
        let since = a["state"]["holding_since"].as_i64().unwrap();
        assert_eq!(
            a["state"]["timers"],
            serde_json::json!([since + 3_600_000]),
            "{a}"
        );
    }
}

#[test]
fn a_job_graph_killed_again_and_again_gives_the_same_final_results_in_every_stream() {
    // `per_second` feeds `big` (a filter) and `per_5s` (a window of its
    // windows); `raw_3s` reads the events too; each stream writes its own
    // file.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("events.jsonl"), 200_000);
    let yaml = |tag: &str, state: bool| {
        let state = if state {
            "state: { dir: state, checkpoint_interval: 40ms }\n"
        } else {
            ""
        };
        let p = d.join(format!("{tag}.yaml"));
        std::fs::write(
            &p,
            format!(
                "name: graph\nsources:\n  events:\n    file: {{ path: events.jsonl }}\n    event_time: {{ field: ts, max_out_of_orderness: 300ms, plausible_years: any }}\n\
                 streams:\n  per_second:\n    from: events\n    steps:\n      - key_by: k\n      - window: {{ tumbling: 1s, aggregate: {{ n: count(), total: sum(v) }} }}\n    sink: {{ file: {{ path: {tag}-a.jsonl }} }}\n\
                 \x20 big:\n    from: per_second\n    steps: [ {{ filter: total > 250 }} ]\n    sink: {{ file: {{ path: {tag}-b.jsonl }} }}\n\
                 \x20 per_5s:\n    from: per_second\n    steps:\n      - key_by: k\n      - window: {{ tumbling: 5s, aggregate: {{ windows: count(), events: sum(n), hi: max(total) }} }}\n    sink: {{ file: {{ path: {tag}-c.jsonl }} }}\n\
                 \x20 raw_3s:\n    from: events\n    steps:\n      - key_by: k\n      - window: {{ tumbling: 3s, aggregate: {{ n: count(), hi: max(v) }} }}\n    sink: {{ file: {{ path: {tag}-d.jsonl }} }}\n{state}"
            ),
        )
        .unwrap();
        p
    };
    let reference = yaml("reference", false);
    let out = rivulet(d, &reference).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crashing = yaml("crashed", true);
    crash_until_done(d, &crashing, "crashed-c.jsonl", 12);
    for part in ["a", "b", "c", "d"] {
        let expected = finals(&d.join(format!("reference-{part}.jsonl")));
        assert!(expected.len() > 100, "{part}: {} results", expected.len());
        let got = finals(&d.join(format!("crashed-{part}.jsonl")));
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .take(3)
            .map(|(k, v)| (k.clone(), v.clone(), got.get(k).cloned()))
            .collect();
        assert!(wrong.is_empty(), "{part}: results differ: {wrong:?}");
        assert_eq!(got.len(), expected.len(), "{part}");
    }
}

#[test]
fn a_union_of_two_files_killed_again_and_again_gives_the_same_final_results() {
    // The union's position is both files' positions: a restart resumes
    // each where the last checkpoint left it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_input(&d.join("one.jsonl"), 120_000);
    write_input(&d.join("two.jsonl"), 80_000);
    let yaml = |out: &str, state: bool| {
        let state = if state {
            "state: { dir: state, checkpoint_interval: 40ms }\n"
        } else {
            ""
        };
        let p = d.join(format!("{out}.yaml"));
        std::fs::write(
            &p,
            format!(
                "name: union\nsources:\n  one:\n    file: {{ path: one.jsonl }}\n    event_time: {{ field: ts, max_out_of_orderness: 700ms, plausible_years: any }}\n\
                 \x20 two:\n    file: {{ path: two.jsonl }}\n    event_time: {{ field: ts, max_out_of_orderness: 1s, plausible_years: any }}\n\
                 streams:\n  both:\n    from: [one, two]\n    steps:\n      - key_by: k\n      - window: {{ tumbling: 1s, aggregate: {{ n: count(), total: sum(v) }} }}\n    sink: {{ file: {{ path: {out} }} }}\n{state}"
            ),
        )
        .unwrap();
        p
    };
    let reference = yaml("reference.jsonl", false);
    let out = rivulet(d, &reference).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = finals(&d.join("reference.jsonl"));
    assert!(expected.len() > 500, "{} windows", expected.len());
    // Both files' events are counted: 200 000 in all.
    let total: i64 = expected.values().map(|v| v["n"].as_i64().unwrap()).sum();
    assert_eq!(total, 200_000);
    let crashing = yaml("crashed.jsonl", true);
    crash_until_done(d, &crashing, "crashed.jsonl", 12);
    let got = finals(&d.join("crashed.jsonl"));
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .take(3)
        .map(|(k, v)| (k.clone(), v.clone(), got.get(k).cloned()))
        .collect();
    assert!(wrong.is_empty(), "results differ: {wrong:?}");
    assert_eq!(got.len(), expected.len());
}
