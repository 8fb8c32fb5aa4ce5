//! The one-line summary in each phase of a run, from values alone (the released fixture's
//! batches, edited), pinned by snapshots.

use std::path::Path;

use serde_json::{Value, json};

use super::*;

/// The released fixture with a batch in every state, as JSON to edit.
fn every_state() -> Value {
    serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/run-v1-every-state.json"
    )))
    .unwrap()
}

/// The fixture's batch in `state`, renamed `name`, with `requests` requests.
fn batch(state: &str, name: &str, requests: u64) -> Value {
    let mut batch = every_state()["batches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["state"] == state)
        .unwrap_or_else(|| panic!("the fixture has no {state} batch"))
        .clone();
    batch["name"] = name.into();
    batch["requests"] = requests.into();
    batch
}

/// A submitted batch that the provider reports in `status` with `completed` of `total` done.
fn remote(name: &str, status: &str, completed: u64, total: u64) -> Value {
    let mut b = batch("submitted", name, total);
    b["remote"]["status"] = status.into();
    b["remote"]["request_counts"] = json!({"total": total, "completed": completed, "failed": 0});
    b
}

fn run_of(batches: Vec<Value>, cancelled: bool) -> RunFile {
    let mut run = every_state();
    run["batches"] = Value::Array(batches);
    run["cancelled"] = cancelled.into();
    serde_json::from_value(run).unwrap()
}

fn settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings
}

const DIR: &str = "batches/fa000000/run_20261124_133644_d9c7";

/// The line of a call that began at `before` and ended at `after`.
fn line(before: &RunFile, after: &RunFile, ending: Next) -> String {
    one_line(&Snapshot::of(before), after, Path::new(DIR), ending)
}

#[test]
fn summary_in_each_phase() {
    let planned = run_of(
        (1..=3)
            .map(|i| batch("planned", &format!("batch_00{i}"), 50_000))
            .collect(),
        false,
    );
    let uploading = run_of(
        vec![
            batch("uploaded", "batch_001", 50_000),
            batch("uploaded", "batch_002", 50_000),
            batch("planned", "batch_003", 50_000),
        ],
        false,
    );
    let validating = run_of(
        (1..=3)
            .map(|i| remote(&format!("batch_00{i}"), "validating", 0, 0))
            .map(|mut b| {
                b["requests"] = 50_000.into();
                b
            })
            .collect(),
        false,
    );
    let mut in_progress_batches: Vec<Value> = (1..=3)
        .map(|i| batch("ingested", &format!("batch_0{i:02}"), 50_000))
        .collect();
    in_progress_batches.extend((4..=20).map(|i| {
        remote(
            &format!("batch_0{i:02}"),
            "in_progress",
            if i <= 12 { 45_776 } else { 0 },
            50_000,
        )
    }));
    let in_progress = run_of(in_progress_batches, false);
    let finalizing = run_of(
        vec![
            batch("ingested", "batch_001", 50_000),
            remote("batch_002", "finalizing", 50_000, 50_000),
            remote("batch_003", "in_progress", 31_000, 50_000),
        ],
        false,
    );
    let downloaded = run_of(
        vec![
            batch("ingested", "batch_001", 50_000),
            batch("downloaded", "batch_002", 50_000),
            batch("expired", "batch_003", 50_000),
        ],
        false,
    );
    let mut done_batches = vec![
        batch("ingested", "batch_001", 50_000),
        batch("ingested", "batch_002", 50_000),
    ];
    for b in &mut done_batches {
        b["retries_planned"] = true.into();
    }
    let done = run_of(done_batches.clone(), false);
    let mut with_retry = done_batches.clone();
    with_retry.push(batch("planned", "batch_004", 12));
    let retried = run_of(with_retry, false);
    let cancelling = run_of(
        vec![
            batch("ingested", "batch_001", 50_000),
            remote("batch_002", "cancelling", 20_000, 50_000),
            batch("cancelled", "batch_003", 50_000),
        ],
        true,
    );
    let cancelled = run_of(
        vec![
            batch("ingested", "batch_001", 50_000),
            batch("cancelled", "batch_002", 50_000),
        ],
        true,
    );
    let failed = run_of(
        vec![
            batch("ingested", "batch_001", 50_000),
            batch("failed", "batch_002", 50_000),
            batch("queued", "batch_003", 50_000),
        ],
        false,
    );

    let refreshed = run_of(
        vec![
            remote("batch_001", "in_progress", 12_000, 50_000),
            remote("batch_002", "validating", 0, 50_000),
            remote("batch_003", "validating", 0, 50_000),
        ],
        false,
    );

    let lines = [
        (
            "planned (submit --dry-run)",
            line(&planned, &planned, Next::Finished),
        ),
        (
            "uploading, stopped by an error",
            line(&planned, &uploading, Next::Stopped),
        ),
        ("submitted", line(&uploading, &validating, Next::Submitted)),
        (
            "validating, a cron call",
            line(&validating, &validating, Next::Waiting),
        ),
        (
            "in_progress, a cron call",
            line(&in_progress, &in_progress, Next::Waiting),
        ),
        ("finalizing", line(&finalizing, &finalizing, Next::Waiting)),
        (
            "downloaded and expired",
            line(&finalizing, &downloaded, Next::Stopped),
        ),
        (
            "ingested and done",
            line(&downloaded, &done, Next::Finished),
        ),
        (
            "a retry planned",
            line(&downloaded, &retried, Next::Waiting),
        ),
        ("cancelling", line(&finalizing, &cancelling, Next::Waiting)),
        ("cancelled", line(&cancelling, &cancelled, Next::Finished)),
        (
            "failed and queued",
            line(&finalizing, &failed, Next::Waiting),
        ),
        (
            "out of time",
            line(&in_progress, &in_progress, Next::OutOfTime),
        ),
        (
            "provider unavailable",
            line(&in_progress, &in_progress, Next::ProviderUnavailable),
        ),
        (
            "database lost",
            line(&downloaded, &downloaded, Next::DatabaseLost),
        ),
        ("refreshed", line(&validating, &refreshed, Next::Refreshed)),
        (
            "ctrl-c while waiting",
            line(&in_progress, &in_progress, Next::Interrupted(2)),
        ),
    ];
    let text: String = lines
        .iter()
        .map(|(phase, line)| format!("{phase}:\n  {line}\n"))
        .collect();
    settings().bind(|| insta::assert_snapshot!("advance_summary_each_phase", text));
}

#[test]
fn the_provider_moving_a_batch_on_is_not_what_the_call_did() {
    let before = run_of(vec![remote("batch_001", "validating", 0, 10)], false);
    let after = run_of(vec![remote("batch_001", "in_progress", 4, 10)], false);
    assert_eq!(did(&Snapshot::of(&before), &after), "nothing changed");
    let planned = run_of(vec![batch("planned", "batch_001", 10)], false);
    assert_eq!(did(&Snapshot::of(&planned), &after), "submitted 1");
}

#[test]
fn totals_add_the_in_flight_request_counts() {
    let run = run_of(
        vec![
            batch("ingested", "batch_001", 10),
            remote("batch_002", "in_progress", 1_500, 2_000),
            {
                let mut b = remote("batch_003", "validating", 0, 0);
                b["requests"] = 998.into();
                b
            },
        ],
        false,
    );
    // A batch the provider has not counted yet adds its own request count (the fixture's 998).
    assert_eq!(
        totals(&run),
        "3 batches: 1 ingested, 1 in_progress, 1 validating (1,500 / 2,998 requests)"
    );
}
