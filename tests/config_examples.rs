//! Every pipeline file shipped in `configs/` validates, and so does the
//! example the CLI prints.

#![allow(clippy::unwrap_used)]

use rivulet::config;
use std::path::Path;

#[test]
fn every_config_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let p = path.to_string_lossy().into_owned();
        if let Err(e) = config::load(&p) {
            panic!("{e}");
        }
        seen += 1;
    }
    assert!(seen >= 5, "expected the example configs, found {seen}");
}

#[test]
fn the_design_example_is_shipped_verbatim_and_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sensor-averages.yaml");
    let v = config::load(&dir.to_string_lossy()).expect("valid");
    assert_eq!(v.name, "sensor-averages");
    assert_eq!(v.steps.len(), 4);
    assert_eq!(v.checkpoint_interval, Some(10_000));
}
