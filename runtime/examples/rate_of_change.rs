//! A keyed process function of your own: the per-sensor rate of change of
//! the temperature, which the YAML steps cannot say.
//!
//! For each sensor it keeps the last reading (value state) and the time of
//! the last reading (map state), emits a record when the temperature moves
//! faster than a limit per second, and sets an event-time timer to forget a
//! sensor that has been silent for a minute (so state does not grow with
//! sensors that went away). State and timers are checkpointed with the
//! pipeline when it has `state:`. Run it with:
//!
//! ```sh
//! cargo run --release --example rate_of_change
//! ```

use rivulet::operators::stateful::{KeyContext, KeyedProcess, Timer};
use rivulet::plan::Pipeline;
use rivulet::sinks::FileSink;
use rivulet::sources::generator::{Generator, GeneratorOptions};
use rivulet::value::Value;
use rivulet::RunOptions;
use std::time::Duration;

/// Emits `{sensor_id, rate_per_s, from, to, at}` when a sensor's
/// temperature changes faster than `limit` per second.
pub struct RateOfChange {
    pub limit: f64,
    /// A sensor silent this long (event time) is forgotten.
    pub forget_after_ms: i64,
}

impl KeyedProcess for RateOfChange {
    fn name(&self) -> &str {
        "rate_of_change"
    }

    fn fields(&self) -> Vec<String> {
        vec!["temperature".into()]
    }

    fn output(&self) -> Vec<String> {
        ["rate_per_s", "from", "to", "at"]
            .map(String::from)
            .to_vec()
    }

    fn process(&self, ctx: &mut KeyContext<'_>, values: &[Value]) {
        let Some(t) = values[0].as_f64() else {
            return;
        };
        let now = ctx.time();
        // The last reading: [temperature, time].
        if let (Some(prev), Some(Value::Int(at))) =
            (ctx.value().and_then(Value::as_f64), ctx.get("at"))
        {
            let dt = (now - *at) as f64 / 1000.0;
            if dt > 0.0 {
                let rate = (t - prev) / dt;
                if rate.abs() > self.limit {
                    ctx.emit(vec![
                        Value::Float(rate),
                        Value::Float(prev),
                        Value::Float(t),
                        Value::Int(now),
                    ]);
                }
            }
        }
        ctx.set_value(Value::Float(t));
        ctx.insert("at", Value::Int(now));
        ctx.timer(now + self.forget_after_ms);
    }

    fn on_timer(&self, ctx: &mut KeyContext<'_>, timer: Timer) {
        // Forget the sensor if nothing came since this timer was set.
        if let (Timer::EventTime(at), Some(Value::Int(last))) = (timer, ctx.get("at")) {
            if at >= last + self.forget_after_ms {
                ctx.clear();
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source = Generator::new(GeneratorOptions {
        sensors: 5,
        rate: None,
        disorder_ms: 500,
        count: Some(20_000),
        start_ms: 1_800_000_000_000,
        ..Default::default()
    });
    let stats = Pipeline::builder("rate-of-change")
        .source(source)
        .event_time("ts", Duration::from_secs(1))
        .key_by(["sensor_id"])
        // The generator's readings of a sensor are 5 ms apart when it runs
        // unpaced: their rates are large.
        .process(RateOfChange {
            limit: 1000.0,
            forget_after_ms: 60_000,
        })
        .sink(FileSink::stdout())
        .build()?
        .run(RunOptions::default())?;
    eprintln!("{} events, {} warnings", stats.events, stats.results);
    Ok(())
}
