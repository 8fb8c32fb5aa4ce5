//! The `status` table at 80, 100 and 160 columns, from the released fixture (a batch in every
//! state, one of them in flight), pinned by snapshots.

use std::path::Path;

use serde_json::Value;

use super::*;

fn fixture() -> RunFile {
    let mut run: Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/run-v1-every-state.json"
    )))
    .unwrap();
    // A provider's count for the batch in flight, and a thousand-sized batch.
    run["batches"][2]["remote"]["request_counts"] =
        serde_json::json!({"total": 998, "completed": 412, "failed": 3});
    run["batches"][8]["counts"]["failed"] = 1_204.into();
    run["batches"][8]["requests"] = 51_204.into();
    serde_json::from_value(run).unwrap()
}

fn settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings
}

fn table_at(width: usize) -> String {
    let run = fixture();
    let view = view(
        &run,
        Path::new("batches/fa000000-0000-0000-0000-000000000001/run_20261124_133644_d9c7"),
        None,
    );
    render_table(&view, false, Some(width))
}

#[test]
fn status_fits_80_100_and_160_columns() {
    for width in [80, 100, 160] {
        let table = table_at(width);
        for line in table.lines() {
            assert!(
                line.chars().count() <= width,
                "a line of {} columns at {width}: {line}",
                line.chars().count()
            );
        }
        settings().bind(|| insta::assert_snapshot!(format!("status_table_{width}_columns"), table));
    }
}

#[test]
fn a_cancelled_run_says_cancelled() {
    assert_eq!(run_state(true, true), "cancelled");
    assert_eq!(run_state(false, true), "cancelled, batches still ending");
    assert_eq!(run_state(true, false), "finished");
}
