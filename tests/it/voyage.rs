//! `--provider voyage`: the OpenAI path's guarantees against the emulator speaking Voyage AI's
//! Batch API (`EmulatorConfig::provider`): every row embedded, SIGKILLs around upload and
//! creation and lost answers adopted by filename and metadata with no batch created twice,
//! 429s and 500s ridden out, partial results of an expired batch ingested and the rest
//! retried, and old runs' bytes unchanged.

use std::path::{Path, PathBuf};

use embatch::emulator::{Api, EmulatorConfig, Faults, LostAnswer};
use embatch::models::{InputType, Provider};
use embatch::run::state::StateKind;
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::harness::{Run, TestEnv, count_embedded_exactly, read};

const DIMS: usize = 1024;

fn voyage_config() -> EmulatorConfig {
    EmulatorConfig {
        api: Api::Voyage,
        ..EmulatorConfig::default()
    }
}

/// A test env with the Voyage emulator, a vector(1024) column and a family of `n` chunks,
/// planned for Voyage with `plan_args`.
async fn planned(n: usize, plan_args: &[&str]) -> (TestEnv, Uuid, PathBuf) {
    planned_with(n, plan_args, voyage_config()).await
}

async fn planned_with(
    n: usize,
    plan_args: &[&str],
    config: EmulatorConfig,
) -> (TestEnv, Uuid, PathBuf) {
    let env = TestEnv::new().await.with_emulator(config).await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector(1024)")
        .await
        .unwrap();
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Chunk {i}: check the hydraulic hose {i} for leaks."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let mut args = vec!["--provider", "voyage", "--model", "voyage-3.5"];
    args.extend_from_slice(plan_args);
    let plan = env.plan(family, &args);
    assert_eq!(plan.code, 0, "{plan:#?}");
    let run_dir = plan.run_dir();
    (env, family, run_dir)
}

/// `embatch advance` with Voyage's variables pointing at the emulator (and none of OpenAI's
/// that would work: the OpenAI key is the emulator's too, so a wrong provider would pass).
async fn advance(env: &TestEnv, run_dir: &Path, extra: &[(&str, &str)]) -> Run {
    let base = env.emu().base_url();
    let key = env.emu().api_key().to_owned();
    let mut vars: Vec<(&str, &str)> = vec![
        ("VOYAGE_BASE_URL", base.as_str()),
        ("VOYAGE_API_KEY", key.as_str()),
        ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
    ];
    vars.extend_from_slice(extra);
    env.exec_env(&["advance", "--run-dir", run_dir.to_str().unwrap()], &vars)
        .await
}

fn load(run_dir: &Path) -> RunFile {
    store::load(run_dir).expect("run.json parses")
}

async fn advance_until_finished(env: &TestEnv, run_dir: &Path, max: usize) {
    for _ in 0..max {
        let run = advance(env, run_dir, &[]).await;
        assert!(run.code == 0 || run.code == 75, "{run:#?}");
        if run.code == 0 {
            assert!(load(run_dir).is_finished());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    panic!("not finished after {max} advances");
}

/// Every (run, batch, submission) was created exactly once on the emulator.
fn assert_created_once(env: &TestEnv) {
    let counters = env.emu().counters();
    for (key, n) in &counters.creations_by_metadata {
        assert_eq!(*n, 1, "{key} created {n} times: {counters:?}");
    }
}

#[tokio::test]
async fn voyage_plan_advance_embeds_every_row() {
    let (env, family, run_dir) = planned(12, &["--max-requests-per-batch", "5"]).await;
    let run = load(&run_dir);
    assert_eq!(run.settings.provider, Provider::Voyage);
    assert_eq!(run.settings.input_type, Some(InputType::Document));
    assert_eq!(run.batches.len(), 3);
    let input = read(run_dir.join("batches/batch_001/input.jsonl"));
    let first = input.lines().next().unwrap();
    assert!(first.starts_with("{\"custom_id\":\""), "{first}");
    assert!(
        first.ends_with(
            "\"body\":{\"input\":[\"Chunk 0: check the hydraulic hose 0 for leaks.\"]}}"
        ),
        "{first}"
    );
    advance_until_finished(&env, &run_dir, 6).await;
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 12);
    let batches = env.emu().batches();
    assert_eq!(batches.len(), 3);
    for batch in &batches {
        assert_eq!(
            batch["request_params"],
            serde_json::json!({"model": "voyage-3.5", "output_dtype": "float", "input_type": "document"})
        );
    }
    assert!(
        load(&run_dir)
            .batches
            .iter()
            .all(|b| b.state.kind() == StateKind::Ingested)
    );
    // The input files were deleted after ingest.
    assert!(
        env.emu().files().iter().all(|f| f["purpose"] != "batch"),
        "{:?}",
        env.emu().files()
    );
    assert_created_once(&env);
}

#[tokio::test]
async fn voyage_sigkills_around_upload_and_creation_never_create_twice() {
    for crash in [
        "before_upload:1",
        "after_upload:1",
        "before_create:1",
        "after_create:1",
        "after_upload:2",
        "after_create:2",
    ] {
        let (env, family, run_dir) = planned(8, &["--max-requests-per-batch", "4"]).await;
        let run = advance(&env, &run_dir, &[("EMBATCH_CRASH_AT", crash)]).await;
        assert!(run.killed(), "{crash}: expected a SIGKILL, got {run:#?}");
        load(&run_dir);
        advance_until_finished(&env, &run_dir, 6).await;
        let counters = env.emu().counters();
        assert_eq!(counters.batch_creations, 2, "{crash}: {counters:?}");
        assert_eq!(counters.uploads, 2, "{crash}: {counters:?}");
        assert_created_once(&env);
        assert_eq!(
            count_embedded_exactly(&env, family, DIMS).await,
            8,
            "{crash}"
        );
    }
}

#[tokio::test]
async fn voyage_partial_results_at_expiry_are_ingested_and_the_rest_retried() {
    // Timed stages, so that the first advance leaves the batch running: the expiry fault is
    // frozen into that batch only, and the retry runs without it.
    let stages = EmulatorConfig {
        stage_duration: std::time::Duration::from_millis(300),
        ..voyage_config()
    };
    let (env, family, run_dir) = planned_with(10, &[], stages).await;
    env.emu().set_faults(Faults {
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    let first = advance(&env, &run_dir, &[]).await;
    assert_eq!(first.code, 75, "{first:#?}");
    env.emu().set_faults(Faults::default());
    advance_until_finished(&env, &run_dir, 40).await;
    // Voyage has no `expired` status: the batch completed with half its requests done and
    // `batch_expired` lines for the rest.
    let record = read(run_dir.join("batches/batch_001/batch.json"));
    assert!(record.contains("\"status\": \"completed\""), "{record}");
    assert!(record.contains("\"expected_completion_at\""), "{record}");
    let run = load(&run_dir);
    assert_eq!(run.batches.len(), 2, "one retry batch");
    assert_eq!(run.batches[1].retry_of, ["batch_001"]);
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    assert_eq!(failed.matches("\texpired\ttrue").count(), 5, "{failed}");
    // The retry carried only the five not done.
    let retry = read(run_dir.join("batches/batch_002/input.jsonl"));
    assert_eq!(retry.lines().count(), 5, "{retry}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 10);
    assert_created_once(&env);
}

#[test]
fn old_runs_keep_their_bytes_with_voyage_known() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["run-v1-every-state.json", "run-v1-ingested.json"] {
        let original = fs_err::read_to_string(fixtures.join(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("run.json"), &original).unwrap();
        let run = store::load(dir.path()).expect("the fixture loads");
        assert_eq!(run.settings.provider, Provider::Openai);
        assert_eq!(run.settings.input_type, None);
        store::save(dir.path(), &run).unwrap();
        let saved = fs_err::read_to_string(dir.path().join("run.json")).unwrap();
        assert_eq!(saved, format!("{}\n", original.trim_end()), "{name}");
        assert!(!saved.contains("input_type"), "{name}");
    }
}

#[tokio::test]
async fn voyage_lost_answers_on_upload_and_creation_are_adopted() {
    let (env, family, run_dir) = planned(8, &["--max-requests-per-batch", "4"]).await;
    env.emu().set_faults(Faults {
        lose_answers: vec![LostAnswer::Upload, LostAnswer::CreateBatch],
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 8).await;
    let counters = env.emu().counters();
    assert_eq!(counters.lost_answers, 2, "{counters:?}");
    assert_eq!(counters.uploads, 2, "{counters:?}");
    assert_eq!(counters.batch_creations, 2, "{counters:?}");
    assert_created_once(&env);
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 8);
}

#[tokio::test]
async fn voyage_429_and_500_faults_are_ridden_out() {
    let (env, family, run_dir) = planned(9, &["--max-requests-per-batch", "3"]).await;
    env.emu().set_faults(Faults {
        rate_429: 0.2,
        rate_500: 0.2,
        retry_after_secs: 0,
        ..Faults::default()
    });
    advance_until_finished(&env, &run_dir, 30).await;
    let counters = env.emu().counters();
    assert!(counters.injected_errors > 0, "{counters:?}");
    assert_eq!(counters.batch_creations, 3, "{counters:?}");
    assert_eq!(counters.uploads, 3, "{counters:?}");
    assert_created_once(&env);
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 9);
}
