//! The `rivulet` command: argument parsing and logging; the work is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rivulet::config::{self, Overrides};
use rivulet::RunOptions;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A stream processor for the edge: MQTT in, event-time windows, MQTT out.
#[derive(Parser)]
#[command(name = "rivulet", version, about)]
struct Cli {
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
    },
    /// Check pipeline files without running them (no network, no files opened).
    Validate {
        /// Pipeline files (YAML).
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Print the JSON Schema of pipeline files (for editor completion).
    Schema,
    /// Print an example pipeline file.
    ExampleConfig,
}

const EXAMPLE: &str = include_str!("../../configs/demo.yaml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
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
        Command::ExampleConfig => {
            print!("{EXAMPLE}");
            ExitCode::SUCCESS
        }
        Command::Run { file, workers } => match run(&file, workers) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(file: &str, workers: Option<usize>) -> anyhow::Result<ExitCode> {
    let valid = match config::load(file) {
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
    if valid.state_dir.is_some() {
        tracing::warn!("`state:` is accepted, but this version keeps state in memory only");
    }
    let pipeline = valid
        .build(file, &Overrides { workers })?
        .build()
        .with_context(|| format!("{file}: cannot build the pipeline"))?;
    tracing::info!(
        pipeline = pipeline.name(),
        workers = pipeline.workers(),
        "running"
    );
    let stats = pipeline.run(RunOptions {
        shutdown,
        ..Default::default()
    })?;
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
