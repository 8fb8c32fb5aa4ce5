//! `advance`, `submit`, `cancel` and `status --refresh` against the emulator: every
//! transition up to `downloaded`, each fault, and exactly-once creation whatever the crash.

use std::path::{Path, PathBuf};

use embatch::emulator::{EmulatorConfig, Faults, LostAnswer};
use embatch::run::state::{BatchState, StateKind};
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::harness::{Run, TestEnv, read};

/// A test env with an emulator, a family of `n` chunks, and a run planned for it.
async fn planned(n: usize, plan_args: &[&str], config: EmulatorConfig) -> (TestEnv, PathBuf) {
    let env = TestEnv::new().await.with_emulator(config).await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Chunk {i}: check the hydraulic hose {i} for leaks."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let run_dir = env.plan(family, plan_args).run_dir();
    (env, run_dir)
}

async fn advance(env: &TestEnv, run_dir: &Path) -> Run {
    env.exec(&["advance", "--run-dir", run_dir.to_str().unwrap()])
        .await
}

fn states(run_dir: &Path) -> Vec<StateKind> {
    load(run_dir)
        .batches
        .iter()
        .map(|b| b.state.kind())
        .collect()
}

fn load(run_dir: &Path) -> RunFile {
    store::load(run_dir).expect("run.json parses")
}

/// Advances until the run is finished (exit 0), at most `max` times.
pub async fn advance_until_finished(env: &TestEnv, run_dir: &Path, max: usize) {
    for _ in 0..max {
        let run = advance(env, run_dir).await;
        assert!(run.code == 0 || run.code == 75, "{run:#?}");
        if run.code == 0 {
            assert!(load(run_dir).is_finished());
            return;
        }
        // Batches may be running on an emulator with timed stages.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    panic!("not finished after {max} advances: {:?}", states(run_dir));
}

/// Every (batch, submission) was created exactly once on the emulator.
fn assert_created_once(env: &TestEnv, run: &RunFile) {
    let counters = env.emu().counters();
    for (key, n) in &counters.creations_by_metadata {
        assert_eq!(*n, 1, "{key} created {n} times: {counters:?}");
        assert!(key.starts_with(&run.run_id), "foreign creation {key}");
    }
}

#[tokio::test]
async fn advance_takes_every_batch_to_ingested_exactly_once() {
    let (env, run_dir) = planned(
        25,
        &["--max-requests-per-batch", "10"],
        EmulatorConfig::default(),
    )
    .await;
    assert_eq!(states(&run_dir), [StateKind::Planned; 3]);
    advance_until_finished(&env, &run_dir, 5).await;
    let run = load(&run_dir);
    assert_eq!(states(&run_dir), [StateKind::Ingested; 3]);
    let counters = env.emu().counters();
    assert_eq!(counters.uploads, 3);
    assert_eq!(counters.batch_creations, 3);
    assert_created_once(&env, &run);
    for batch in &run.batches {
        let dir = run_dir.join("batches").join(&batch.name);
        let output = read(dir.join("output.jsonl"));
        assert_eq!(output.lines().count() as u64, batch.requests);
        let seen: serde_json::Value = serde_json::from_str(&read(dir.join("batch.json"))).unwrap();
        assert_eq!(seen["status"], "completed");
        assert_eq!(seen["metadata"]["embatch_batch"], batch.name.as_str());
        assert_eq!(seen["metadata"]["embatch_submission"], "1");
        let BatchState::Ingested(i) = &batch.state else {
            unreachable!()
        };
        assert_eq!(i.counts.ingested, batch.requests);
        assert_eq!(i.terminal, embatch::run::state::Terminal::Completed);
        assert!(i.remote_files_deleted);
    }
    // Once ingested, every remote file of the run is deleted: nothing private stays there.
    assert!(env.emu().files().is_empty(), "{:?}", env.emu().files());
    assert_eq!(
        env.emu().counters().file_deletions,
        6,
        "3 inputs and 3 outputs"
    );
}

#[tokio::test]
async fn a_lost_answer_to_upload_or_create_ends_in_adoption() {
    for lost in [LostAnswer::Upload, LostAnswer::CreateBatch] {
        let (env, run_dir) = planned(5, &[], EmulatorConfig::default()).await;
        env.emu().set_faults(Faults {
            lose_answers: vec![lost],
            ..Faults::default()
        });
        advance_until_finished(&env, &run_dir, 5).await;
        let counters = env.emu().counters();
        assert_eq!(counters.lost_answers, 1, "{lost:?}: {counters:?}");
        assert_eq!(counters.uploads, 1, "{lost:?}: one upload");
        assert_eq!(counters.batch_creations, 1, "{lost:?}: one creation");
        assert_created_once(&env, &load(&run_dir));
    }
}

#[tokio::test]
async fn crash_at_every_step_never_creates_twice() {
    let points: &[(&str, u32)] = &[
        ("before_upload", 1),
        ("after_upload", 1),
        ("before_create", 1),
        ("after_create", 1),
        ("before_download", 1),
        ("after_download", 1),
        ("before_save", 1),
        ("after_save", 1),
        ("before_save", 2),
        ("after_save", 2),
        ("before_save", 3),
        ("after_save", 3),
        ("before_save", 4),
        ("after_save", 4),
        ("before_save", 5),
        ("after_save", 6),
    ];
    for (point, nth) in points {
        let (env, run_dir) = planned(
            12,
            &["--max-requests-per-batch", "5"],
            EmulatorConfig::default(),
        )
        .await;
        let crash = format!("{point}:{nth}");
        let run = env
            .exec_env(
                &["advance", "--run-dir", run_dir.to_str().unwrap()],
                &[("EMBATCH_CRASH_AT", &crash)],
            )
            .await;
        assert!(run.killed(), "{crash}: expected a SIGKILL, got {run:#?}");
        // run.json is always readable after a crash.
        load(&run_dir);
        advance_until_finished(&env, &run_dir, 6).await;
        let run_file = load(&run_dir);
        let counters = env.emu().counters();
        assert_eq!(counters.batch_creations, 3, "{crash}: {counters:?}");
        assert_eq!(counters.uploads, 3, "{crash}: {counters:?}");
        assert_created_once(&env, &run_file);
        assert_eq!(states(&run_dir), [StateKind::Ingested; 3], "{crash}");
    }
}

#[tokio::test]
async fn a_second_advance_exits_75_naming_the_holder() {
    let (env, run_dir) = planned(3, &[], EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        latency: std::time::Duration::from_millis(1500),
        ..Faults::default()
    });
    let dir = run_dir.to_str().unwrap().to_owned();
    let first = {
        let mut cmd = tokio::process::Command::from(env.command());
        cmd.args(["advance", "--run-dir", &dir]).spawn().unwrap()
    };
    // Let the first take the lock (it is then waiting on the slow emulator).
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let second = advance(&env, &run_dir).await;
    assert_eq!(second.code, 75, "{second:#?}");
    assert!(
        second.stderr.contains("locked by another embatch"),
        "{second:#?}"
    );
    assert!(
        second
            .stderr
            .contains(&format!("pid {}", first.id().unwrap())),
        "{second:#?}"
    );
    assert!(second.stderr.contains("embatch advance"), "{second:#?}");
    let out = first.wait_with_output().await.unwrap();
    assert!(matches!(out.status.code(), Some(0 | 75)), "{out:?}");
}

#[tokio::test]
async fn wrong_key_and_dead_server_stop_cleanly_and_resume() {
    let (env, run_dir) = planned(3, &[], EmulatorConfig::default()).await;
    let dir = run_dir.to_str().unwrap();
    let run = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("OPENAI_API_KEY", "sk-wrong-SECRET")],
        )
        .await;
    run.assert_error("OPENAI_API_KEY");
    assert!(!run.stderr.contains("sk-wrong-SECRET"), "{run:#?}");
    assert_eq!(states(&run_dir), [StateKind::Planned]);

    let run = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
                ("EMBATCH_API_RETRIES", "1"),
            ],
        )
        .await;
    assert_eq!(run.code, 75, "a dead server is 'not done yet': {run:#?}");
    assert!(run.stderr.contains("run advance again later"), "{run:#?}");
    load(&run_dir);

    advance_until_finished(&env, &run_dir, 5).await;
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn a_batch_that_fails_validation_is_failed_with_its_errors() {
    let (env, run_dir) = planned(3, &[], EmulatorConfig::default()).await;
    // Make the input invalid the way a provider sees it: a repeated custom_id.
    let input = run_dir.join("batches/batch_001/input.jsonl");
    let text = read(&input);
    let first = text.lines().next().unwrap().to_owned();
    let broken: String = format!("{first}\n{}", text);
    fs_err::write(&input, &broken).unwrap();
    let mut run_file = load(&run_dir);
    run_file.batches[0].bytes = broken.len() as u64;
    // As if plan had written it so: embatch never uploads a file other than the one planned.
    if let Some(files) = run_file.batches[0].files.as_mut() {
        files.input = store::FileDigest::of_file(&input, 0).unwrap();
    }
    store::save(&run_dir, &run_file).unwrap();

    let run = advance(&env, &run_dir).await;
    assert_eq!(states(&run_dir), [StateKind::Failed]);
    assert_eq!(run.code, 0, "a failed batch is done: {run:#?}");
    let BatchState::Failed(failed) = &load(&run_dir).batches[0].state else {
        unreachable!()
    };
    assert!(
        failed.errors.iter().any(|e| e.line == Some(2)),
        "{failed:?}"
    );
}

#[tokio::test]
async fn an_expired_batch_downloads_its_partial_output_and_errors() {
    let (env, run_dir) = planned(10, &[], EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 5).await;
    let run = load(&run_dir);
    let BatchState::Ingested(i) = &run.batches[0].state else {
        panic!("{:?}", run.batches[0].state)
    };
    assert_eq!(i.terminal, embatch::run::state::Terminal::Expired);
    assert_eq!(i.counts.ingested, 5, "half the requests were done");
    assert_eq!(i.to_retry, 5, "the other half is retried");
    let errors = read(run_dir.join("batches/batch_001/errors.jsonl"));
    assert!(errors.contains("batch_expired"), "{errors}");
    assert_eq!(run.batches[1].retry_of, ["batch_001"]);
    assert_eq!(run.batches[1].attempt, 2);
}

#[tokio::test]
async fn token_limit_exceeded_queues_and_recreates_with_a_new_submission() {
    let (env, run_dir) = planned(4, &[], EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        token_limit_failures: 1,
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 5).await;
    let run = load(&run_dir);
    let counters = env.emu().counters();
    assert_eq!(counters.batch_creations, 2, "{counters:?}");
    let keys: Vec<&String> = counters.creations_by_metadata.keys().collect();
    assert!(keys.iter().any(|k| k.ends_with("/batch_001/1")), "{keys:?}");
    assert!(keys.iter().any(|k| k.ends_with("/batch_001/2")), "{keys:?}");
    assert_created_once(&env, &run);
}

#[tokio::test]
async fn status_refresh_and_cancel_follow_the_remote_batch() {
    let config = EmulatorConfig {
        stage_duration: std::time::Duration::from_secs(600),
        ..EmulatorConfig::default()
    };
    let (env, run_dir) = planned(4, &[], config).await;
    let dir = run_dir.to_str().unwrap();
    let first = advance(&env, &run_dir).await;
    assert_eq!(first.code, 75, "{first:#?}");
    assert_eq!(states(&run_dir), [StateKind::Submitted]);
    let batch_id = load(&run_dir).batches[0]
        .state
        .batch_id()
        .unwrap()
        .to_owned();

    env.emu().force_status(&batch_id, "in_progress");
    let refreshed = env
        .exec(&["status", "--run-dir", dir, "--refresh", "--json"])
        .await;
    assert_eq!(refreshed.code, 0, "{refreshed:#?}");
    let view: serde_json::Value = serde_json::from_str(&refreshed.stdout).unwrap();
    assert_eq!(view["batches"][0]["remote_status"], "in_progress");

    let cancelled = env.exec(&["cancel", "--run-dir", dir]).await;
    assert!(matches!(cancelled.code, 0 | 75), "{cancelled:#?}");
    assert!(load(&run_dir).cancelled);
    env.emu().force_status(&batch_id, "cancelled");
    advance_until_finished(&env, &run_dir, 3).await;
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn submit_plans_and_submits_without_waiting() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_secs(600),
            ..EmulatorConfig::default()
        })
        .await;
    let family: Uuid = env.add_family(1).await;
    env.add_chunks(family, &["one", "two"]).await;
    let run = env
        .exec(&["submit", "--family-id", &family.to_string()])
        .await;
    let run_dir = run.run_dir();
    assert_eq!(states(&run_dir), [StateKind::Submitted]);
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn a_flaky_api_still_creates_each_batch_once() {
    let (env, run_dir) = planned(
        12,
        &["--max-requests-per-batch", "4"],
        EmulatorConfig {
            seed: 11,
            ..EmulatorConfig::default()
        },
    )
    .await;
    env.emu().set_faults(Faults {
        rate_429: 0.3,
        rate_500: 0.3,
        retry_after_secs: 0,
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 30).await;
    let counters = env.emu().counters();
    assert!(counters.injected_errors > 0, "{counters:?}");
    assert_eq!(counters.batch_creations, 3, "{counters:?}");
    assert_eq!(counters.uploads, 3, "{counters:?}");
    assert_created_once(&env, &load(&run_dir));
}

#[tokio::test]
async fn per_request_failures_land_in_the_error_file() {
    let (env, run_dir) = planned(6, &[], EmulatorConfig::default()).await;
    let first_id = read(run_dir.join("batches/batch_001/chunks.tsv"))
        .lines()
        .nth(1)
        .and_then(|l| l.split('\t').next().map(str::to_owned))
        .unwrap();
    env.emu().set_faults(Faults {
        fail_custom_ids: vec![first_id.clone()],
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 5).await;
    let run = load(&run_dir);
    let BatchState::Ingested(i) = &run.batches[0].state else {
        panic!("not ingested")
    };
    assert_eq!((i.counts.ingested, i.to_retry), (5, 1));
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    assert!(
        failed.contains(&format!("{first_id}\tserver_error\ttrue")),
        "{failed}"
    );
    // It fails at every attempt: the third reports it given up.
    assert_eq!(run.batches.len(), 3);
    let last = run_dir.join("batches/batch_003/failed_chunk_ids.tsv");
    assert!(read(last).contains(&format!("{first_id}\tattempts_exhausted\tfalse")));
    let errors = read(run_dir.join("batches/batch_001/errors.jsonl"));
    assert_eq!(errors.lines().count(), 1);
    assert!(errors.contains(&first_id));
    assert_eq!(
        read(run_dir.join("batches/batch_001/output.jsonl"))
            .lines()
            .count(),
        5
    );
}

#[tokio::test]
async fn an_input_file_gone_before_creation_is_uploaded_again() {
    let (env, run_dir) = planned(3, &[], EmulatorConfig::default()).await;
    let dir = run_dir.to_str().unwrap();
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("EMBATCH_CRASH_AT", "before_create:1")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    let file_id = load(&run_dir).batches[0]
        .state
        .input_file_id()
        .unwrap()
        .to_owned();
    // The provider dropped the file (it expired, or someone deleted it).
    let api = embatch::provider::openai::ApiClient::new(
        embatch::provider::openai::ClientOptions::new(env.emu().base_url(), env.emu().api_key()),
    )
    .unwrap();
    api.delete_file(&file_id).await.unwrap();
    let run = advance(&env, &run_dir).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains("is gone"), "{run:#?}");
    assert!(run.stderr.contains("uploading it again"), "{run:#?}");
    let counters = env.emu().counters();
    assert_eq!(
        (counters.uploads, counters.batch_creations),
        (2, 1),
        "{counters:?}"
    );
    assert_created_once(&env, &load(&run_dir));
}

#[tokio::test]
async fn a_lost_answer_to_cancel_is_retried_harmlessly() {
    let config = EmulatorConfig {
        stage_duration: std::time::Duration::from_secs(600),
        ..EmulatorConfig::default()
    };
    let (env, run_dir) = planned(3, &[], config).await;
    let dir = run_dir.to_str().unwrap();
    assert_eq!(advance(&env, &run_dir).await.code, 75);
    env.emu().set_faults(Faults {
        lose_answers: vec![LostAnswer::Cancel],
        ..Faults::default()
    });
    let cancelled = env.exec(&["cancel", "--run-dir", dir]).await;
    assert!(matches!(cancelled.code, 0 | 75), "{cancelled:#?}");
    assert_eq!(env.emu().counters().lost_answers, 1);
    let run = load(&run_dir);
    assert!(run.cancelled);
    let remote = run.batches[0].state.remote().unwrap();
    assert!(
        matches!(remote.status.as_str(), "cancelling" | "cancelled"),
        "{remote:?}"
    );
}

/// Issue 14: `cancel` after a kill that left an upload unrecorded (`planned` with its upload
/// mark) or a batch uploaded but never created: the uploaded file is found and deleted, so
/// none of the run's text stays on the provider.
#[tokio::test]
async fn cancel_deletes_uploads_of_batches_never_created() {
    for crash in ["after_upload:1", "before_create:1"] {
        let (env, run_dir) = planned(3, &[], EmulatorConfig::default()).await;
        let dir = run_dir.to_str().unwrap();
        let killed = env
            .exec_env(
                &["advance", "--run-dir", dir],
                &[("EMBATCH_CRASH_AT", crash)],
            )
            .await;
        assert!(killed.killed(), "{crash}: {killed:#?}");
        assert_eq!(env.emu().files().len(), 1, "{crash}: the upload happened");
        let cancelled = env.exec(&["cancel", "--run-dir", dir]).await;
        assert_eq!(cancelled.code, 0, "{crash}: {cancelled:#?}");
        let run = load(&run_dir);
        assert!(run.cancelled && run.is_finished(), "{crash}");
        assert_eq!(states(&run_dir), [StateKind::Cancelled], "{crash}");
        assert!(
            env.emu().files().is_empty(),
            "{crash}: the run's upload was left on the provider: {:?}",
            env.emu().files()
        );
        let counters = env.emu().counters();
        assert_eq!(
            (counters.uploads, counters.batch_creations),
            (1, 0),
            "{crash}: {counters:?}"
        );
    }
}

/// Issue 14: `cancel` of a run whose submitted batch completed remotely since the last poll.
/// The provider refuses that cancel (HTTP 400); `cancel` records the batch as completed, goes
/// on with the other batches in the same call, and a later `advance` ingests the output.
#[tokio::test]
async fn cancel_records_a_batch_that_finished_since_the_last_poll_and_cancels_the_rest() {
    let config = EmulatorConfig {
        stage_duration: std::time::Duration::from_secs(600),
        ..EmulatorConfig::default()
    };
    let (env, run_dir) = planned(9, &["--max-requests-per-batch", "3"], config).await;
    let dir = run_dir.to_str().unwrap();
    // batch_001 is created; the kill lands when batch_002 is about to be uploaded.
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("EMBATCH_CRASH_AT", "before_upload:2")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    assert_eq!(
        states(&run_dir),
        [StateKind::Submitted, StateKind::Planned, StateKind::Planned]
    );
    let batch_id = load(&run_dir).batches[0]
        .state
        .batch_id()
        .unwrap()
        .to_owned();
    env.emu().force_status(&batch_id, "completed");

    let cancelled = env.exec(&["cancel", "--run-dir", dir]).await;
    // Not an error; 75: the completed batch's output still waits for advance.
    assert_eq!(cancelled.code, 75, "{cancelled:#?}");
    assert!(!cancelled.stderr.contains("error"), "{cancelled:#?}");
    assert_eq!(
        states(&run_dir),
        [
            StateKind::Completed,
            StateKind::Cancelled,
            StateKind::Cancelled
        ]
    );
    assert!(load(&run_dir).cancelled);

    advance_until_finished(&env, &run_dir, 3).await;
    let run = load(&run_dir);
    let BatchState::Ingested(ingested) = &run.batches[0].state else {
        panic!("{:?}", run.batches[0].state)
    };
    assert_eq!(ingested.counts.ingested, 3);
    assert_eq!(run.batches.len(), 3, "no retry batch after a cancel");
    let counters = env.emu().counters();
    assert_eq!(counters.batch_creations, 1, "{counters:?}");
    assert!(env.emu().files().is_empty(), "{:?}", env.emu().files());
}

/// Issue 14: a batch whose remote cancel fails does not stop `cancel` from cancelling the
/// others in the same call; the call exits 1 naming it, and running `cancel` again finishes.
#[tokio::test]
async fn a_failed_remote_cancel_leaves_the_others_cancelled_and_cancel_runs_again() {
    let config = EmulatorConfig {
        stage_duration: std::time::Duration::from_secs(600),
        ..EmulatorConfig::default()
    };
    let (env, run_dir) = planned(9, &["--max-requests-per-batch", "3"], config).await;
    let dir = run_dir.to_str().unwrap();
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("EMBATCH_CRASH_AT", "before_upload:2")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    // The provider does not know batch_001's remote batch (as if deleted): its cancel fails.
    let mut run = load(&run_dir);
    let BatchState::Submitted(submitted) = &mut run.batches[0].state else {
        panic!("{:?}", run.batches[0].state)
    };
    let real_id = std::mem::replace(&mut submitted.batch_id, "batch_unknown".to_owned());
    store::save(&run_dir, &run).unwrap();

    let failed = env.exec(&["cancel", "--run-dir", dir]).await;
    failed.assert_error(
        "could not cancel 1 batch of the run (batch_001: could not cancel batch batch_unknown",
    );
    assert!(
        failed
            .stderr
            .contains(&format!("run `embatch cancel --run-dir {dir}` again")),
        "{failed:#?}"
    );
    assert_eq!(
        states(&run_dir),
        [
            StateKind::Submitted,
            StateKind::Cancelled,
            StateKind::Cancelled
        ]
    );
    assert!(load(&run_dir).cancelled);

    let mut run = load(&run_dir);
    let BatchState::Submitted(submitted) = &mut run.batches[0].state else {
        unreachable!()
    };
    submitted.batch_id = real_id;
    store::save(&run_dir, &run).unwrap();
    let again = env.exec(&["cancel", "--run-dir", dir]).await;
    assert_eq!(again.code, 75, "{again:#?}");
    let remote = load(&run_dir).batches[0].state.remote().cloned().unwrap();
    assert_eq!(remote.status.as_str(), "cancelling");
    assert_eq!(env.emu().counters().batch_creations, 1);
}

/// Issue 14 (found by the campaign): a run cancelled while an ingested batch's retryable
/// failures had no retry batch yet never finished — a cancelled run plans no retries, and the
/// batch waited for one. They are given up instead (reported with their reason, not
/// retryable), and the run finishes.
#[tokio::test]
async fn cancel_gives_up_retries_not_yet_planned_and_the_run_finishes() {
    let (env, run_dir) = planned(10, &[], EmulatorConfig::default()).await;
    let dir = run_dir.to_str().unwrap();
    env.emu().set_faults(Faults {
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("EMBATCH_CRASH_AT", "before_download:1")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    // `ingest` never plans retries: the expired half waits for a retry batch.
    let ingested = env.exec(&["ingest", "--run-dir", dir]).await;
    assert_eq!(ingested.code, 0, "{ingested:#?}");
    let BatchState::Ingested(before) = &load(&run_dir).batches[0].state else {
        panic!("{:?}", load(&run_dir).batches[0].state)
    };
    assert_eq!((before.to_retry, before.retries_planned), (5, false));

    let cancelled = env.exec(&["cancel", "--run-dir", dir]).await;
    assert_eq!(cancelled.code, 0, "{cancelled:#?}");
    let run = load(&run_dir);
    assert!(run.cancelled && run.is_finished());
    assert_eq!(run.batches.len(), 1, "no retry batch after a cancel");
    let BatchState::Ingested(after) = &run.batches[0].state else {
        unreachable!()
    };
    assert_eq!(
        (after.counts.ingested, after.counts.failed, after.to_retry),
        (5, 5, 0)
    );
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    let lines: Vec<&str> = failed.lines().skip(1).collect();
    assert_eq!(lines.len(), 5, "{failed}");
    assert!(
        lines.iter().all(|l| l.ends_with("\texpired\tfalse")),
        "{failed}"
    );
    let status = env.exec(&["status", "--run-dir", dir, "--json"]).await;
    let view: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(view["finished"], true, "{view}");
    assert_eq!(view["totals"]["failed"], 5, "{view}");
    assert_eq!(view["totals"]["pending"], 0, "{view}");
    assert_eq!(advance(&env, &run_dir).await.code, 0);
    assert_eq!(env.emu().counters().batch_creations, 1);
}
