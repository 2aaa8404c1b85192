//! The run context: what every source, operator and sink of a run gets at
//! start (as vector's `SourceContext` does): the shutdown flag, the metrics
//! registry, and its own operator id, which labels its metrics and its log
//! lines.
//!
//! Operator ids are stable names from the plan: `source`, `window`,
//! `sink_main`, `sink_late`, `sink_dead_letter`; workers add a `worker`
//! label to what they count.

use crate::metrics::{Counter, Gauge, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct RunContext {
    /// The pipeline's name (a label of every series).
    pub pipeline: Arc<str>,
    /// The operator this context was given to.
    pub operator: Arc<str>,
    /// Set when the run is asked to stop.
    pub shutdown: Arc<AtomicBool>,
    pub metrics: Arc<Registry>,
}

impl RunContext {
    /// The context of a run, for the operator `run` (the runtime itself).
    pub fn new(pipeline: &str, shutdown: Arc<AtomicBool>, metrics: Arc<Registry>) -> Self {
        RunContext {
            pipeline: pipeline.into(),
            operator: "run".into(),
            shutdown,
            metrics,
        }
    }

    /// The same run's context for another operator.
    pub fn for_operator(&self, operator: &str) -> RunContext {
        RunContext {
            operator: operator.into(),
            ..self.clone()
        }
    }

    pub fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    fn labels<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut l = vec![("pipeline", &*self.pipeline), ("operator", &*self.operator)];
        l.extend_from_slice(extra);
        l
    }

    /// A counter labelled with the pipeline, this operator and `extra`.
    pub fn counter(&self, name: &str, help: &str, extra: &[(&str, &str)]) -> Counter {
        self.metrics.counter(name, help, &self.labels(extra))
    }

    /// A gauge labelled with the pipeline, this operator and `extra`.
    pub fn gauge(&self, name: &str, help: &str, extra: &[(&str, &str)]) -> Gauge {
        self.metrics.gauge(name, help, &self.labels(extra))
    }

    /// A gauge kept in milliseconds, shown in seconds.
    pub fn gauge_ms(&self, name: &str, help: &str, extra: &[(&str, &str)]) -> Gauge {
        self.metrics.gauge_ms(name, help, &self.labels(extra))
    }

    /// `rivulet_operator_records_total` of this operator, `direction="in"`
    /// and `"out"`, with `extra` labels (`stream`, `worker`).
    pub fn records_in_out(&self, extra: &[(&str, &str)]) -> (Counter, Counter) {
        let one = |dir: &str| {
            let mut labels = extra.to_vec();
            labels.push(("direction", dir));
            self.counter(
                crate::metrics::names::OPERATOR_RECORDS,
                "records into or out of an operator",
                &labels,
            )
        };
        (one("in"), one("out"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_pipeline_and_operator() {
        let ctx = RunContext::new("p", Arc::default(), Arc::default());
        let w = ctx.for_operator("window");
        w.counter("rivulet_x_total", "x", &[("worker", "1")]).add(3);
        assert_eq!(
            ctx.metrics.value(
                "rivulet_x_total",
                &[("pipeline", "p"), ("operator", "window"), ("worker", "1")]
            ),
            Some(3)
        );
        assert!(!w.stopping());
        ctx.shutdown.store(true, Ordering::SeqCst);
        assert!(w.stopping(), "one flag for the whole run");
    }
}
