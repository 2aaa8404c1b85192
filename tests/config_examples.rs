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

#[test]
fn the_job_graph_of_the_docs_is_the_issues_contract_and_valid() {
    // docs/pipeline.md shows the general form exactly as the job-graph
    // issue gives it; it must validate, with every stream in place.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/pipeline.md"))
            .expect("docs/pipeline.md");
    let start = doc
        .find("```yaml\nname: plant\n")
        .expect("the job graph example")
        + 8;
    let end = start + doc[start..].find("```").expect("its end");
    let v = config::validate(&doc[start..end])
        .map_err(|p| format!("{p:?}"))
        .unwrap();
    let g = v.graph.expect("a job graph");
    assert_eq!(g.head, "per_sensor");
    let names: Vec<&str> = g.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["hot", "per_site"]);
    assert_eq!(v.union.len(), 2, "temps and more_temps");
}
