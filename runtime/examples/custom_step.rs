//! Building a dataflow in Rust, with a step of your own.
//!
//! The same pipeline as `configs/demo.yaml`, plus a custom `Step` that
//! converts °F to °C and rejects impossible readings to the dead-letter
//! output. Run it with:
//!
//! ```sh
//! cargo run --release --example custom_step
//! ```

use rivulet::operators::window::WindowDef;
use rivulet::operators::{Records, Step};
use rivulet::plan::Pipeline;
use rivulet::sinks::FileSink;
use rivulet::sources::generator::{Generator, GeneratorOptions};
use rivulet::value::Value;
use rivulet::RunOptions;
use std::time::Duration;

/// Writes `celsius` from `temperature` (°F); readings below absolute zero
/// are rejected with a reason.
#[derive(Clone, Default)]
struct FahrenheitToCelsius {
    /// Slots of `temperature` and `celsius`, given by the planner in `bind`.
    slots: [usize; 2],
}

impl Step for FahrenheitToCelsius {
    fn fields(&self) -> Vec<String> {
        vec!["temperature".into(), "celsius".into()]
    }

    fn bind(&mut self, slots: &[usize]) {
        self.slots = [slots[0], slots[1]];
    }

    fn process(&mut self, records: &mut Records<'_>) {
        let [t, c] = self.slots;
        for i in records.live() {
            match records.get(i)[t].as_f64() {
                Some(f) if f < -459.67 => {
                    records.reject(i, format!("{f} °F is below absolute zero"))
                }
                Some(f) => records.get_mut(i)[c] = Value::Float((f - 32.0) * 5.0 / 9.0),
                None => records.reject(i, "temperature is not a number"),
            }
        }
    }

    fn writes(&self) -> Vec<String> {
        vec!["celsius".into()]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source = Generator::new(GeneratorOptions {
        sensors: 5,
        rate: None,
        disorder_ms: 500,
        count: Some(50_000),
        start_ms: 0,
        ..Default::default()
    });
    let stats = Pipeline::builder("custom-step")
        .source(source)
        .event_time("ts", Duration::from_secs(1))
        .step(FahrenheitToCelsius::default())
        .filter("celsius > -60 && celsius < 90")
        .key_by(["sensor_id"])
        .window(
            WindowDef::tumbling(Duration::from_secs(5))
                .aggregate("avg_celsius", "avg(celsius)")
                .aggregate("max_celsius", "max(celsius)")
                .aggregate("readings", "count()"),
        )
        .sink(FileSink::stdout())
        .build()?
        .run(RunOptions::default())?;
    eprintln!("{} events, {} results", stats.events, stats.results);
    Ok(())
}
