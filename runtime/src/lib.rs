//! rivulet: a stream processor for the edge.
//!
//! Map of the crate:
//! - [`config`]: the pipeline file: serde structs, validation with line and
//!   column, compilation to a [`plan::Pipeline`].
//! - [`plan`]: the dataflow builder (what YAML compiles to; Rust users use it directly).
//! - [`expr`]: the expression language of `map`, `filter` and aggregates.
//! - [`decode`]: JSON payloads into slots; [`value`]: values and key encoding.
//! - [`time`]: clocks, durations, timestamps, the watermark rule.
//! - [`operators`]: steps (`map`, `filter`, your own), [`operators::window`] and
//!   [`operators::stateful`] (`deduplicate`, `deadband`, `alert`, `KeyedProcess`).
//! - [`sources`], [`sinks`]: where events come from and results go.
//! - [`msg`]: what travels between stages (data, watermarks, barriers).
//! - [`partition`]: key groups and their assignment to owners.
//! - [`context`], [`metrics`]: what every stage gets at start; counters per batch.
//! - [`observe`]: the HTTP endpoint (metrics, live page, API), logs, live
//!   state queries.
//! - [`cluster`]: peer mode (key groups across processes).
//! - [`exec`]: threads, bounded queues, deterministic output order, shutdown,
//!   and the stages after the first window (the tail).

pub mod cluster;
pub mod config;
pub mod context;
pub mod decode;
pub mod exec;
pub mod expr;
pub mod metrics;
pub mod mqtt;
pub mod msg;
pub mod observe;
pub mod operators;
pub mod partition;
pub mod plan;
pub mod sinks;
pub mod sources;
pub mod state;
pub mod time;
pub mod util;
pub mod value;

pub use exec::{RunOptions, RunStats};
pub use plan::Pipeline;

/// The README's Rust examples are compiled as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
