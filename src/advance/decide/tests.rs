//! `decide` for every state and goal, from values alone: no database, no network, no clock.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

use super::*;

const GOALS: [Goal; 4] = [
    Goal::Done,
    Goal::Submitted,
    Goal::IngestOnly,
    Goal::RefreshOnly,
];

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000, 0).unwrap_or_default()
}

/// The released fixture with a batch in every state, as JSON to edit.
fn every_state() -> Value {
    serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/run-v1-every-state.json"
    )))
    .unwrap()
}

/// The fixture's batch in `state`, edited by `edit`.
fn batch(state: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let source = if state == "completed" {
        "expired"
    } else {
        state
    };
    let mut batch = every_state()["batches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["state"] == source)
        .unwrap_or_else(|| panic!("the fixture has no {source} batch"))
        .clone();
    batch["state"] = state.into();
    edit(&mut batch);
    batch
}

/// A run of `batches`, with `edit` applied to the whole run.
fn run_of(batches: Vec<Value>, edit: impl FnOnce(&mut Value)) -> RunFile {
    let mut run = every_state();
    run["batches"] = Value::Array(batches);
    edit(&mut run);
    serde_json::from_value(run).unwrap()
}

fn clocks() -> Clocks {
    Clocks {
        now: t0(),
        provider_now: t0(),
    }
}

/// The action for the first batch under each goal, in the order of `GOALS`.
fn actions(run: &RunFile) -> [Action; 4] {
    GOALS.map(|goal| decide(run, 0, goal, None, clocks()))
}

fn alone(batch: Value) -> RunFile {
    run_of(vec![batch], |_| {})
}

fn at(time: DateTime<Utc>) -> Value {
    json!(time.to_rfc3339())
}

use Action::*;

#[test]
fn planned_is_uploaded_by_the_goals_that_create() {
    let run = alone(batch("planned", |_| {}));
    assert_eq!(actions(&run), [Upload, Upload, Wait, Wait]);
}

#[test]
fn uploaded_is_created_or_its_expired_file_dropped() {
    // With the create mark of the fixture: adopt-or-create, whatever the file's expiry.
    let marked = alone(batch("uploaded", |b| {
        b["file_expires_at"] = at(t0() - Duration::hours(1));
    }));
    assert_eq!(actions(&marked), [Create, Create, Wait, Wait]);
    let fresh = alone(batch("uploaded", |b| {
        b["create_started"] = Value::Null;
        b["file_expires_at"] = at(t0() + Duration::hours(1));
    }));
    assert_eq!(actions(&fresh), [Create, Create, Wait, Wait]);
    let expired = alone(batch("uploaded", |b| {
        b["create_started"] = Value::Null;
        b["file_expires_at"] = at(t0());
    }));
    assert_eq!(actions(&expired), [ExpireInput, ExpireInput, Wait, Wait]);
}

#[test]
fn uploaded_waits_while_the_enqueued_tokens_are_full() {
    let uploaded = batch("uploaded", |b| b["create_started"] = Value::Null);
    let submitted = batch("submitted", |_| {});
    // Each batch counts as the larger of its tokens and bytes/4.
    let tokens = uploaded["tokens"]
        .as_u64()
        .unwrap()
        .max(uploaded["bytes"].as_u64().unwrap().div_ceil(4));
    let run = run_of(vec![uploaded.clone(), submitted.clone()], |_| {});
    // Room for one batch only: the submitted one holds it.
    assert_eq!(
        decide(&run, 0, Goal::Done, Some(tokens + 1), clocks()),
        Wait
    );
    assert!(!fits_in_flight(&run, 0, Some(tokens + 1)));
    assert_eq!(
        decide(&run, 0, Goal::Done, Some(2 * tokens), clocks()),
        Create
    );
    // The run's own bound applies when the command gives none.
    let bounded = run_of(vec![uploaded.clone(), submitted], |r| {
        r["settings"]["limits"]["max_enqueued_tokens"] = json!(tokens + 1);
    });
    assert_eq!(decide(&bounded, 0, Goal::Done, None, clocks()), Wait);
    // Alone over the bound, with nothing in flight, it is still created.
    let lonely = alone(uploaded);
    assert_eq!(decide(&lonely, 0, Goal::Done, Some(1), clocks()), Create);
}

#[test]
fn queued_waits_for_its_time_unless_nothing_is_in_flight() {
    let later = |b: &mut Value| b["not_before"] = at(t0() + Duration::minutes(5));
    let with_submitted = run_of(
        vec![batch("queued", later), batch("submitted", |_| {})],
        |_| {},
    );
    assert_eq!(actions(&with_submitted), [Wait, Wait, Wait, Wait]);
    // Nothing in flight would release it: it is created now.
    let idle = alone(batch("queued", later));
    assert_eq!(actions(&idle), [Create, Create, Wait, Wait]);
    let due = alone(batch("queued", |b| b["not_before"] = at(t0())));
    assert_eq!(actions(&due), [Create, Create, Wait, Wait]);
    let expired = alone(batch("queued", |b| {
        b["not_before"] = at(t0());
        b["file_expires_at"] = at(t0() - Duration::seconds(1));
    }));
    assert_eq!(actions(&expired), [ExpireInput, ExpireInput, Wait, Wait]);
    let marked = alone(batch("queued", |b| {
        b["file_expires_at"] = at(t0() - Duration::seconds(1));
        b["create_started"] = at(t0());
        later(b);
    }));
    assert_eq!(actions(&marked), [Create, Create, Wait, Wait]);
}

#[test]
fn expiry_is_read_on_the_providers_clock() {
    let run = alone(batch("uploaded", |b| {
        b["create_started"] = Value::Null;
        b["file_expires_at"] = at(t0() + Duration::minutes(30));
    }));
    let ahead = Clocks {
        now: t0(),
        provider_now: t0() + Duration::hours(1),
    };
    assert_eq!(decide(&run, 0, Goal::Done, None, ahead), ExpireInput);
    assert_eq!(decide(&run, 0, Goal::Done, None, clocks()), Create);
}

#[test]
fn submitted_is_polled_by_every_goal() {
    let run = alone(batch("submitted", |_| {}));
    assert_eq!(actions(&run), [Poll, Poll, Poll, Poll]);
    let cancelled = run_of(vec![batch("submitted", |_| {})], |r| {
        r["cancelled"] = true.into()
    });
    assert_eq!(actions(&cancelled), [Poll, Poll, Poll, Poll]);
}

#[test]
fn finished_remote_batches_are_downloaded_by_the_goals_that_ingest() {
    for state in ["completed", "expired"] {
        let run = alone(batch(state, |_| {}));
        assert_eq!(actions(&run), [Download, Wait, Download, Wait], "{state}");
    }
    let cancelled_remotely = alone(batch("cancelled", |b| {
        b["done"] = batch("expired", |_| {});
    }));
    assert_eq!(
        actions(&cancelled_remotely),
        [Download, Wait, Download, Wait]
    );
    // Cancelled before it was ever created: nothing to fetch.
    let cancelled_here = alone(batch("cancelled", |_| {}));
    assert_eq!(actions(&cancelled_here), [Wait, Wait, Wait, Wait]);
}

#[test]
fn downloaded_is_ingested_and_ingested_cleaned_up() {
    let downloaded = alone(batch("downloaded", |_| {}));
    assert_eq!(actions(&downloaded), [Ingest, Wait, Ingest, Wait]);
    let ingested = alone(batch("ingested", |b| {
        b["remote_files_deleted"] = false.into()
    }));
    assert_eq!(actions(&ingested), [CleanUp, Wait, CleanUp, Wait]);
    let clean = alone(batch("ingested", |b| {
        b["remote_files_deleted"] = true.into()
    }));
    assert_eq!(actions(&clean), [Wait, Wait, Wait, Wait]);
}

#[test]
fn failed_waits_under_every_goal() {
    let run = alone(batch("failed", |_| {}));
    assert_eq!(actions(&run), [Wait, Wait, Wait, Wait]);
}

#[test]
fn a_cancelled_run_creates_nothing() {
    for state in ["planned", "uploaded", "queued"] {
        let run = run_of(vec![batch(state, |_| {})], |r| r["cancelled"] = true.into());
        assert_eq!(actions(&run), [Wait, Wait, Wait, Wait], "{state}");
    }
}

/// Every state of the machine is covered above.
#[test]
fn every_state_kind_has_a_case() {
    let covered = [
        "planned",
        "uploaded",
        "submitted",
        "queued",
        "completed",
        "expired",
        "cancelled",
        "failed",
        "downloaded",
        "ingested",
    ];
    for state in covered {
        let run = alone(batch(state, |_| {}));
        assert_eq!(run.batches[0].state.kind().as_str(), state);
    }
}

#[test]
fn a_shared_budget_counts_the_other_runs_in_flight() {
    let uploaded = batch("uploaded", |b| b["create_started"] = Value::Null);
    let tokens = in_flight_estimate(&alone(uploaded.clone()).batches[0]);
    let lonely = alone(uploaded.clone());
    let shared = |others| {
        decide_shared(
            &lonely,
            0,
            Goal::Done,
            Some(tokens + 1),
            Some(others),
            clocks(),
        )
    };
    // Other runs hold the budget: wait; nothing anywhere in flight: create, even over it.
    assert_eq!(shared(2), Wait);
    assert_eq!(shared(1), Create);
    assert_eq!(shared(0), Create);
    assert_eq!(
        decide_shared(&lonely, 0, Goal::Done, Some(1), Some(0), clocks()),
        Create
    );
    // A queued batch past its time waits too while the others hold the budget, and is not
    // created at once merely because its own run has nothing in flight.
    let queued = alone(batch("queued", |b| {
        b["create_started"] = Value::Null;
        b["not_before"] = at(t0() - Duration::minutes(5));
    }));
    assert_eq!(
        decide_shared(
            &queued,
            0,
            Goal::Done,
            Some(tokens + 1),
            Some(tokens),
            clocks()
        ),
        Wait
    );
    assert_eq!(
        decide(&queued, 0, Goal::Done, Some(tokens + 1), clocks()),
        Create
    );
    // A batch whose creation was announced but never answered counts as in flight.
    let marked = run_of(vec![uploaded, batch("uploaded", |_| {})], |_| {});
    assert!(tokens_in_flight(&marked) > 0);
    assert_eq!(
        decide_shared(&marked, 0, Goal::Done, Some(tokens + 1), Some(0), clocks()),
        Wait
    );
}

#[test]
fn sharing_a_budget_uploads_ahead_only_one_batch_that_cannot_be_created_yet() {
    let planned = batch("planned", |_| {});
    let ready = batch("uploaded", |b| b["create_started"] = Value::Null);
    let tokens = in_flight_estimate(&alone(planned.clone()).batches[0]);
    // The other runs hold the whole budget; this run already has a batch ready to create.
    let run = run_of(vec![ready.clone(), planned.clone()], |_| {});
    let full = |others| decide_shared(&run, 1, Goal::Done, Some(tokens), Some(others), clocks());
    assert_eq!(full(tokens), Wait, "a second batch waits to be uploaded");
    // Room for it: it is uploaded, so that it is created at once.
    assert_eq!(full(0), Upload);
    // No batch ready in this run: one is uploaded ahead, even without room.
    let alone_planned = run_of(vec![planned.clone(), planned], |_| {});
    assert_eq!(
        decide_shared(
            &alone_planned,
            0,
            Goal::Done,
            Some(tokens),
            Some(tokens),
            clocks()
        ),
        Upload
    );
    // A run alone (advance, no shared budget) uploads everything as before.
    assert_eq!(decide(&run, 1, Goal::Done, Some(tokens), clocks()), Upload);
    // A batch whose creation was announced is not one ready to create.
    let announced = run_of(
        vec![batch("uploaded", |_| {}), batch("planned", |_| {})],
        |_| {},
    );
    assert_eq!(
        decide_shared(&announced, 1, Goal::Done, Some(u64::MAX), Some(0), clocks()),
        Upload
    );
}
