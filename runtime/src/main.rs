//! The `rivulet` command: argument parsing and logging; the work is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rivulet::config::{self, Overrides};
use rivulet::metrics::names;
use rivulet::observe::logs::LogFormat;
use rivulet::observe::{Observed, Phase};
use rivulet::RunOptions;
use std::io::IsTerminal;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A stream processor for the edge: MQTT in, event-time windows, MQTT out.
#[derive(Parser)]
#[command(name = "rivulet", version, about)]
struct Cli {
    /// Log lines as `text`, `json`, `journald`, or `auto` (the journal
    /// when stderr is connected to it, else text). Also RIVULET_LOG_FORMAT.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until its input ends or SIGINT/SIGTERM.
    Run {
        /// The pipeline file (YAML).
        file: String,
        /// Worker threads (overrides `workers:` in the file).
        #[arg(long)]
        workers: Option<usize>,
        /// Write live counters as JSON to this file (every 200 ms).
        #[arg(long, value_name = "PATH")]
        stats_file: Option<std::path::PathBuf>,
        /// Start from a savepoint (written by `rivulet savepoint`).
        #[arg(long, value_name = "PATH")]
        from_savepoint: Option<std::path::PathBuf>,
        /// With --from-savepoint: start even if the pipeline changed so
        /// that the saved keyed state cannot be used (it is dropped).
        #[arg(long, requires = "from_savepoint")]
        allow_non_restored_state: bool,
        /// Serve metrics, the live page and the API on ADDR (host:port;
        /// overrides `http.listen` in the file).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// Show a running pipeline's live figures in the terminal, refreshed
    /// every second (from its HTTP endpoint).
    Top {
        /// The pipeline file (its `http.listen` says where to ask).
        #[arg(required_unless_present = "http")]
        file: Option<String>,
        /// The endpoint's URL or address instead, e.g. http://127.0.0.1:9464.
        #[arg(long, value_name = "URL")]
        http: Option<String>,
        /// Stop after this many refreshes.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Ask a running pipeline (by its pipeline file) for a savepoint.
    Savepoint {
        /// The pipeline file of the running pipeline (for its `state.dir`).
        file: String,
        /// Where to write the savepoint (default: <state.dir>/savepoints/<time>.redb).
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
    },
    /// Check pipeline files without running them (no network, no files opened).
    Validate {
        /// Pipeline files (YAML).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Print the JSON Schema of pipeline files (for editor completion).
    Schema,
    /// Exit 0 if a running pipeline's stats file (`run --stats-file`) is fresh.
    Health {
        /// The stats file written by `rivulet run --stats-file`.
        #[arg(long, value_name = "PATH")]
        stats_file: std::path::PathBuf,
        /// Oldest acceptable update, in seconds.
        #[arg(long, default_value_t = 10)]
        max_age: u64,
    },
    /// Print an example pipeline file.
    ExampleConfig,
    /// Look into a state directory.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Show a peer-mode cluster: its members (from the broker) and which
    /// peer owns and which stands by for each key group.
    Peers {
        /// The pipeline file (with a `peers:` section).
        file: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// List the keys, windows and current aggregate values the last
    /// checkpoint holds, one JSON object per window (read-only).
    Inspect {
        /// The pipeline's `state.dir`.
        dir: std::path::PathBuf,
    },
}

const EXAMPLE: &str = include_str!("../../configs/demo.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli
        .log_format
        .clone()
        .or_else(|| std::env::var("RIVULET_LOG_FORMAT").ok())
        .map(|f| f.parse::<LogFormat>())
        .transpose();
    let format = match format {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    rivulet::observe::logs::init(format);
    match cli.command {
        Command::Top { file, http, count } => top(file.as_deref(), http.as_deref(), count),
        Command::Validate { files } => {
            let mut ok = true;
            for f in &files {
                match config::load(f) {
                    Ok(_) => println!("{f}: ok"),
                    Err(e) => {
                        ok = false;
                        eprintln!("{e}");
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&config::json_schema()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Health {
            stats_file,
            max_age,
        } => health(&stats_file, max_age),
        Command::Savepoint { file, out } => match savepoint(&file, out) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::State {
            command: StateCommand::Inspect { dir },
        } => match inspect(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Peers { file, json } => match peers(&file, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::ExampleConfig => {
            print!("{EXAMPLE}");
            ExitCode::SUCCESS
        }
        Command::Run {
            file,
            workers,
            stats_file,
            from_savepoint,
            allow_non_restored_state,
            http,
        } => match run(
            &file,
            workers,
            stats_file,
            from_savepoint,
            allow_non_restored_state,
            http,
        ) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(
    file: &str,
    workers: Option<usize>,
    stats_file: Option<std::path::PathBuf>,
    from_savepoint: Option<std::path::PathBuf>,
    allow_non_restored_state: bool,
    http: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut valid = match config::load(file) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal exits at once; the first asks for a clean stop.
        signal_hook::flag::register_conditional_shutdown(sig, 130, shutdown.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(sig, shutdown.clone()).context("installing signal handlers")?;
    }
    if let Some(listen) = http {
        if let Err(e) = rivulet::observe::http::check_listen(&listen) {
            eprintln!("--http: {e}");
            return Ok(ExitCode::from(2));
        }
        let stuck_default = rivulet::observe::STALL_AFTER.as_millis() as i64;
        let (auth, linger_ms, stuck_after_ms) =
            valid.http.take().map_or((None, 0, stuck_default), |h| {
                (h.auth, h.linger_ms, h.stuck_after_ms)
            });
        valid.http = Some(config::HttpSpec {
            listen,
            auth,
            linger_ms,
            stuck_after_ms,
        });
    }
    if valid.peers.is_some() {
        run_peer(&valid, file, shutdown, stats_file, from_savepoint.is_some())
    } else {
        run_single(
            &valid,
            file,
            workers,
            shutdown,
            stats_file,
            from_savepoint,
            allow_non_restored_state,
        )
    }
}

/// The status topic, once the pipeline is ready to run (a pipeline that
/// cannot start never says `online`); `Err` is the exit code.
fn start_status(
    valid: &config::ValidPipeline,
    file: &str,
) -> Result<Option<rivulet::mqtt::status::Status>, ExitCode> {
    valid.start_status().map_err(|e| {
        eprintln!("{file}: status topic: {e}");
        ExitCode::from(2)
    })
}

/// The HTTP endpoint, when the file or `--http` asks for one; `Err` is the
/// exit code (an address in use, a secret that cannot be read).
fn start_http(
    valid: &config::ValidPipeline,
    file: &str,
    opts: &RunOptions,
) -> Result<Option<Arc<Observed>>, ExitCode> {
    let Some(spec) = &valid.http else {
        return Ok(None);
    };
    let mut observed = Observed::new(
        &valid.name,
        opts.metrics.clone(),
        opts.queries.clone(),
        rivulet::observe::graph::Graph::of(valid),
    );
    observed.state_dir = valid.state_dir.as_ref().map(std::path::PathBuf::from);
    observed.stall_after = std::time::Duration::from_millis(spec.stuck_after_ms.max(0) as u64);
    if let Some(p) = &valid.peers {
        observed.peer = Some(p.id.clone());
        opts.metrics.set_constant_labels(&[("peer", &p.id)]);
    }
    let auth = match spec.auth.as_ref().map(|a| a.resolve()).transpose() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{file}: {e}");
            return Err(ExitCode::from(2));
        }
    };
    let observed = Arc::new(observed);
    match rivulet::observe::http::start(&spec.listen, auth, observed.clone()) {
        Ok(ep) => {
            tracing::info!(url = %format!("http://{}/", ep.addr), "HTTP endpoint listening");
            Ok(Some(observed))
        }
        Err(e) => {
            eprintln!("{file}: http: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// After a bounded input ended: the endpoint keeps serving for
/// `http.linger` (a signal ends the wait), so the last figures are scraped.
fn linger(valid: &config::ValidPipeline, opts: &RunOptions) {
    let ms = valid.http.as_ref().map_or(0, |h| h.linger_ms);
    if ms <= 0 || opts.shutdown.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    tracing::info!(
        seconds = ms as f64 / 1000.0,
        "input ended; the HTTP endpoint stays up (http.linger)"
    );
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms as u64);
    while std::time::Instant::now() < until
        && !opts.shutdown.load(std::sync::atomic::Ordering::SeqCst)
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `rivulet run` of a pipeline that is not a peer of a cluster.
fn run_single(
    valid: &config::ValidPipeline,
    file: &str,
    workers: Option<usize>,
    shutdown: Arc<AtomicBool>,
    stats_file: Option<std::path::PathBuf>,
    from_savepoint: Option<std::path::PathBuf>,
    allow_non_restored_state: bool,
) -> anyhow::Result<ExitCode> {
    let pipeline = valid
        .build(file, &Overrides { workers })?
        .build()
        .with_context(|| format!("{file}: cannot build the pipeline"))?;
    tracing::info!(
        pipeline = pipeline.name(),
        workers = pipeline.workers(),
        "running"
    );
    if from_savepoint.is_some() && valid.state_dir.is_none() {
        anyhow::bail!("{file}: --from-savepoint needs a `state:` section (state.dir)");
    }
    let opts = RunOptions {
        shutdown,
        restore_from: from_savepoint,
        allow_non_restored_state,
        ..Default::default()
    };
    let observed = match start_http(valid, file, &opts) {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    let status = match start_status(valid, file) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if let Some(o) = &observed {
        o.set_phase(Phase::Running);
    }
    let writer = stats_file.map(|path| spawn_stats_writer(path, opts.clone()));
    // Once the pipeline has started, its start-up code need not stay
    // mapped (see rivulet::util::memory).
    let _ = std::thread::Builder::new()
        .name("rivulet-trim".into())
        .spawn(|| {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let kib = rivulet::util::memory::release_startup_pages();
            tracing::debug!(kib, "released start-up pages");
        });
    let result = pipeline.run(opts.clone());
    if let Some(o) = &observed {
        o.set_phase(if result.is_ok() {
            Phase::Stopped
        } else {
            Phase::Failed
        });
        linger(valid, &opts);
    }
    if let Some((done, handle)) = writer {
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = handle.join();
    }
    // `offline` once the pipeline has stopped (the will says it if this
    // process dies before).
    if let Some(s) = status {
        s.stop();
    }
    let stats = result?;
    tracing::info!(
        events = stats.events,
        results = stats.results,
        dead_letters = stats.dead_letters,
        late = stats.late,
        filtered = stats.filtered,
        "{}",
        if stats.stopped {
            "stopped"
        } else {
            "input ended"
        }
    );
    if stats.stopped && stats.open_windows > 0 {
        tracing::warn!(
            open_windows = stats.open_windows,
            "stopped with open windows; their partial results were not emitted"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `rivulet run` of a pipeline with a `peers:` section: one peer of its
/// cluster until SIGTERM or SIGINT, which leave the cluster cleanly.
fn run_peer(
    valid: &config::ValidPipeline,
    file: &str,
    shutdown: Arc<AtomicBool>,
    stats_file: Option<std::path::PathBuf>,
    from_savepoint: bool,
) -> anyhow::Result<ExitCode> {
    use rivulet::cluster::run::PeerError;
    if from_savepoint {
        eprintln!("{file}: --from-savepoint is not supported in peer mode (the cluster restores from its global checkpoints)");
        return Ok(ExitCode::from(2));
    }
    let opts = RunOptions {
        shutdown,
        ..Default::default()
    };
    let observed = match start_http(valid, file, &opts) {
        Ok(o) => o,
        Err(code) => return Ok(code),
    };
    let status = match start_status(valid, file) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    if let Some(o) = &observed {
        o.set_phase(Phase::Running);
    }
    let writer = stats_file.map(|path| spawn_stats_writer(path, opts.clone()));
    let result = rivulet::cluster::run::run(valid, file, opts);
    if let Some(o) = &observed {
        o.set_phase(if result.is_ok() {
            Phase::Stopped
        } else {
            Phase::Failed
        });
    }
    if let Some((done, handle)) = writer {
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = handle.join();
    }
    if let Some(s) = status {
        s.stop();
    }
    match result {
        Ok(stats) => {
            tracing::info!(
                events = stats.events,
                results = stats.results,
                "left the cluster"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ (PeerError::Membership(_) | PeerError::Setup(_))) => {
            eprintln!("{file}: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the live counters to `path` every 200 ms (and once at the end),
/// replacing the file atomically, for monitoring and benchmarks.
fn spawn_stats_writer(
    path: std::path::PathBuf,
    opts: RunOptions,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let handle = std::thread::spawn(move || loop {
        let finished = stop.load(std::sync::atomic::Ordering::SeqCst);
        let m = &opts.metrics;
        let body = serde_json::json!({
            "events_read": m.total(names::SOURCE_EVENTS),
            "batches_written": m.total(names::BATCHES_WRITTEN),
            "results": m.sum(names::SINK_RECORDS, &[("sink", "main")]),
            "late": m.total(names::LATE_EVENTS),
            "dead_letters": m.total(names::DEAD_LETTERS),
            "filtered": m.total(names::FILTERED_EVENTS),
            "journal_entries": m.total(names::JOURNAL_ENTRIES),
            "time_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        });
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, body.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
        if finished {
            return;
        }
        for _ in 0..4 {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    (done, handle)
}

/// `rivulet top`: the live figures, redrawn every second (appended when
/// stdout is not a terminal).
fn top(file: Option<&str>, http: Option<&str>, count: Option<u64>) -> ExitCode {
    let base = match (http, file) {
        (Some(u), _) => u.to_string(),
        (None, Some(f)) => match config::load(f) {
            Ok(v) => match v.http {
                Some(h) => h.listen,
                None => {
                    eprintln!("error: {f} has no `http:` section; give --http URL");
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        (None, None) => {
            eprintln!("error: give the pipeline file or --http URL");
            return ExitCode::from(2);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let mut shown = 0u64;
    loop {
        let frame = match rivulet::observe::top::fetch_status(&base) {
            Ok(st) => rivulet::observe::top::render(&st),
            Err(e) => format!("cannot reach {base}: {e}\n"),
        };
        let mut out = std::io::stdout().lock();
        // Home and clear on a terminal; one block after the other otherwise.
        let _ = if tty {
            write!(out, "\x1b[H\x1b[2J{frame}")
        } else {
            writeln!(out, "{frame}")
        };
        let _ = out.flush();
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// For container health checks: is the pipeline still making its rounds?
fn health(path: &std::path::Path, max_age_s: u64) -> ExitCode {
    let stats: Option<serde_json::Value> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(stats) = stats else {
        eprintln!("unhealthy: cannot read {}", path.display());
        return ExitCode::from(1);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let at = stats["time_ms"].as_u64().unwrap_or(0);
    let age = now.saturating_sub(at) / 1000;
    if age > max_age_s {
        eprintln!("unhealthy: {} was last updated {age} s ago", path.display());
        return ExitCode::from(1);
    }
    println!("healthy: {} events read", stats["events_read"]);
    ExitCode::SUCCESS
}

fn inspect(dir: &std::path::Path) -> Result<(), rivulet::state::StateError> {
    use rivulet::value::decode_key;
    let st = rivulet::state::inspect(dir)?;
    // The names the state file records for its key fields and aggregates.
    let names = |what: &str| -> Vec<String> {
        st.layout[what]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (key_names, agg_names) = (names("keys"), names("aggregates"));
    let position = <[u8; 8]>::try_from(st.position.as_slice())
        .map(|b| format!(", input position {}", u64::from_le_bytes(b)))
        .unwrap_or_default();
    // Keys of the first keyed stage, and of the stages after it.
    let first = st.keys.len() + st.steps.iter().filter(|s| s.0 == 0).count();
    let later = st.later_windows.len() + st.steps.iter().filter(|s| s.0 > 0).count();
    let later = if later > 0 {
        format!(" ({later} more in later stages)")
    } else {
        String::new()
    };
    eprintln!(
        "checkpoint {} (state format {}) of `{}`: {first} keys{later}, watermark {}{position}",
        st.epoch, st.version, st.fingerprint, st.watermark
    );
    let n = agg_names.len().max(1);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (key, snap) in &st.keys {
        let vals = decode_key(key).unwrap_or_default();
        let mut k = serde_json::Map::new();
        for (i, v) in vals.iter().enumerate() {
            let name = key_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("key{i}"));
            k.insert(name, v.to_json());
        }
        for (w, (start, end)) in snap.windows.iter().enumerate() {
            let mut aggs = serde_json::Map::new();
            for (i, acc) in snap.accs.iter().skip(w * n).take(n).enumerate() {
                let name = agg_names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("agg{i}"));
                aggs.insert(name, acc.result().to_json());
            }
            let row = serde_json::json!({"key": k, "window_start": start, "window_end": end, "aggregates": aggs});
            // A reader that went away (`| head`) ends the listing quietly.
            if writeln!(out, "{row}").is_err() {
                return Ok(());
            }
        }
    }
    // Later stages and stateful steps, each with its operator's own names.
    let layout_of = |id: u16| -> serde_json::Value {
        st.operators
            .iter()
            .find(|o| o.id == id)
            .and_then(|o| serde_json::from_str(&o.layout).ok())
            .unwrap_or_default()
    };
    let key_json = |key: &[u8], layout: &serde_json::Value| {
        let names = layout["keys"].as_array().cloned().unwrap_or_default();
        let mut k = serde_json::Map::new();
        for (i, v) in decode_key(key).unwrap_or_default().iter().enumerate() {
            let name = names
                .get(i)
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("key{i}"));
            k.insert(name, v.to_json());
        }
        k
    };
    for (id, key, snap) in &st.later_windows {
        let layout = layout_of(*id);
        let n = snap.accs.len() / snap.windows.len().max(1);
        let agg_names = layout["aggregates"].as_array().cloned().unwrap_or_default();
        for (w, (start, end)) in snap.windows.iter().enumerate() {
            let mut aggs = serde_json::Map::new();
            for (i, acc) in snap.accs.iter().skip(w * n).take(n).enumerate() {
                let name = agg_names
                    .get(i)
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("agg{i}"));
                aggs.insert(name, acc.result().to_json());
            }
            let row = serde_json::json!({"operator": id, "stage": layout["stage"], "key": key_json(key, &layout), "window_start": start, "window_end": end, "aggregates": aggs});
            if writeln!(out, "{row}").is_err() {
                return Ok(());
            }
        }
    }
    for (id, key, record) in &st.steps {
        let layout = layout_of(*id);
        let row = serde_json::json!({
            "operator": id,
            "step": layout["step"],
            "key": key_json(key, &layout),
            "state": rivulet::operators::stateful::describe(record),
        });
        if writeln!(out, "{row}").is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
}

fn savepoint(file: &str, out: Option<std::path::PathBuf>) -> Result<std::path::PathBuf, String> {
    let valid = config::load(file).map_err(|e| e.to_string())?;
    let dir = valid
        .state_dir
        .map(std::path::PathBuf::from)
        .ok_or_else(|| format!("{file} has no `state:` section: a savepoint needs state.dir"))?;
    let out = out.unwrap_or_else(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        dir.join("savepoints").join(format!("savepoint-{ms}.redb"))
    });
    rivulet::state::control::request_savepoint(&dir, &out)
}

/// `rivulet peers FILE`: the members the broker knows and the table every
/// peer computes from them.
fn peers(file: &str, json: bool) -> Result<(), String> {
    use rivulet::cluster::assign::PeerTable;
    use rivulet::cluster::membership::{JoinOptions, Membership, Presence};
    let valid = config::load(file).map_err(|e| e.to_string())?;
    let spec = valid
        .peers
        .clone()
        .ok_or_else(|| format!("{file} has no `peers:` section"))?;
    let fingerprint = valid.peer_fingerprint();
    let members = Membership::observe(JoinOptions {
        cluster: spec.cluster.clone(),
        me: Presence {
            id: spec.id.clone(),
            addr: spec.advertise.clone(),
            fingerprint: fingerprint.clone(),
            incarnation: fastrand::u64(..),
            version: env!("CARGO_PKG_VERSION").into(),
            leaving: false,
        },
        endpoint: valid.source_broker()?,
        keep_alive: std::time::Duration::from_millis(spec.keep_alive_ms as u64),
    })
    .map_err(|e| e.to_string())?;
    let (ours, others): (Vec<&Presence>, Vec<&Presence>) =
        members.iter().partition(|p| p.fingerprint == fingerprint);
    let ids: Vec<&str> = ours.iter().map(|p| p.id.as_str()).collect();
    // The view: the hash of the member list (ids and incarnations) the
    // peers log when they start it.
    let view =
        rivulet::cluster::run::view_of(&ours.iter().map(|p| (*p).clone()).collect::<Vec<_>>());
    let table = PeerTable::compute(view, &ids);
    let groups: Vec<(u8, String, Option<String>)> = rivulet::partition::KeyGroup::all()
        .map(|g| {
            (
                g.0,
                table.owner_id(g).to_string(),
                table.standby_id(g).map(str::to_string),
            )
        })
        .collect();
    if json {
        let body = serde_json::json!({
            "cluster": spec.cluster,
            "view": format!("{view:016x}"),
            "fingerprint": fingerprint,
            "members": ours.iter().map(|p| serde_json::json!({
                "id": p.id, "addr": p.addr, "version": p.version,
                "owns": table.index_of(&p.id).map(|i| table.owned_by(i).len()).unwrap_or(0),
            })).collect::<Vec<_>>(),
            "other_pipelines": others.iter().map(|p| serde_json::json!({
                "id": p.id, "addr": p.addr, "fingerprint": p.fingerprint,
            })).collect::<Vec<_>>(),
            "groups": if ids.is_empty() { Vec::new() } else {
                groups.iter().map(|(g, o, s)| serde_json::json!({
                    "group": g, "owner": o, "standby": s,
                })).collect::<Vec<_>>()
            },
        });
        println!("{body}");
        return Ok(());
    }
    println!(
        "cluster {}: {} peer{}, view {view:016x}, pipeline {fingerprint}",
        spec.cluster,
        ours.len(),
        if ours.len() == 1 { "" } else { "s" }
    );
    for p in &ours {
        let owns = table
            .index_of(&p.id)
            .map(|i| table.owned_by(i).len())
            .unwrap_or(0);
        println!("  {:<20} {:<24} owns {owns} groups", p.id, p.addr);
    }
    for p in &others {
        println!(
            "  {:<20} {:<24} runs another pipeline ({})",
            p.id, p.addr, p.fingerprint
        );
    }
    if ids.is_empty() {
        return Ok(());
    }
    // Runs of consecutive groups with the same owner and standby.
    println!("  groups     owner                standby");
    let mut start = 0usize;
    for i in 1..=groups.len() {
        let same =
            i < groups.len() && groups[i].1 == groups[start].1 && groups[i].2 == groups[start].2;
        if !same {
            let (_, o, s) = &groups[start];
            let range = if i - 1 == start {
                format!("{start}")
            } else {
                format!("{start}-{}", i - 1)
            };
            println!("  {range:<10} {o:<20} {}", s.as_deref().unwrap_or("-"));
            start = i;
        }
    }
    Ok(())
}
