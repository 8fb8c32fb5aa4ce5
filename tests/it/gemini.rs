//! `--provider gemini`: the OpenAI path's guarantees against the emulator speaking the Gemini
//! API (`EmulatorConfig::api`): every row embedded with the normalised vector, SIGKILLs around
//! upload and creation adopted by the deterministic file id and the batch's display name with
//! no batch created twice, lost answers adopted, partial results of an expired batch ingested
//! and the rest retried, 429/500 faults ridden out, realtime `embed`, and old runs' bytes
//! unchanged.

use std::path::{Path, PathBuf};

use embatch::emulator::{Api, EmulatorConfig, Faults, LostAnswer};
use embatch::models::{Provider, TaskType};
use embatch::run::state::{BatchState, StateKind};
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::harness::{Run, TestEnv, read};

/// Below 3,072: Gemini's vectors come unnormalised, and the emulator's too.
const DIMS: usize = 768;

fn gemini_config() -> EmulatorConfig {
    EmulatorConfig {
        api: Api::Gemini,
        ..EmulatorConfig::default()
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Chunk {i}: check the hydraulic hose {i} for leaks."))
        .collect()
}

/// A test env with the Gemini emulator, a vector(768) column and a family of `n` chunks,
/// planned for Gemini with `plan_args`.
async fn planned(n: usize, plan_args: &[&str]) -> (TestEnv, Uuid, PathBuf) {
    planned_with(&texts(n), plan_args, gemini_config()).await
}

async fn planned_with(
    texts: &[String],
    plan_args: &[&str],
    config: EmulatorConfig,
) -> (TestEnv, Uuid, PathBuf) {
    let env = TestEnv::new().await.with_emulator(config).await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector(768)")
        .await
        .unwrap();
    let family = env.add_family(1).await;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let mut args = vec!["--provider", "gemini", "--model", "gemini-embedding-001"];
    args.extend_from_slice(plan_args);
    let plan = env.plan(family, &args);
    assert_eq!(plan.code, 0, "{plan:#?}");
    let run_dir = plan.run_dir();
    (env, family, run_dir)
}

/// Gemini's variables pointing at the emulator, and OpenAI's at nothing that answers (the
/// OpenAI key is the emulator's too, so a wrong provider would otherwise pass).
fn gemini_vars(env: &TestEnv) -> Vec<(&'static str, String)> {
    vec![
        ("GEMINI_BASE_URL", env.emu().base_url()),
        ("GEMINI_API_KEY", env.emu().api_key().to_owned()),
        ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1".to_owned()),
    ]
}

async fn exec_gemini(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let vars = gemini_vars(env);
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    env.exec_env(args, &all).await
}

async fn advance(env: &TestEnv, run_dir: &Path, extra: &[(&str, &str)]) -> Run {
    exec_gemini(
        env,
        &["advance", "--run-dir", run_dir.to_str().unwrap()],
        extra,
    )
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

/// Panics unless `stored` is the emulator's vector of `content` (unit length) to within
/// rounding: the emulator sends it three times as long, and embatch scales it back.
#[track_caller]
fn assert_normalised_emulator_vector(stored: &[f32], content: &str, dims: usize) {
    let want = embatch::emulator::vectors::embedding(content, dims);
    assert_eq!(stored.len(), want.len(), "{content}");
    let norm: f64 = stored
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "{content}: norm {norm}");
    for (got, want) in stored.iter().zip(&want) {
        assert!((got - want).abs() < 1e-6, "{content}: {got} vs {want}");
    }
}

/// The number of the family's rows with an embedding, each checked against the emulator's
/// normalised vector of its content.
async fn count_embedded(env: &TestEnv, family: Uuid) -> usize {
    let rows = env
        .client
        .query(
            "SELECT content, embedding FROM knowledge_chunks
             WHERE equipment_family_id = $1 AND embedding IS NOT NULL",
            &[&family],
        )
        .await
        .unwrap();
    for row in &rows {
        let content: String = row.get(0);
        let stored: pgvector::Vector = row.get(1);
        assert_normalised_emulator_vector(stored.as_slice(), &content, DIMS);
    }
    rows.len()
}

#[tokio::test]
async fn gemini_plan_advance_embeds_every_row() {
    // One chunk over Gemini's bound (2,048 tokens counted as UTF-8 bytes + 8) although far
    // under cl100k_base's 8,191: skipped, never sent.
    let mut chunks = texts(12);
    chunks.push("word ".repeat(420));
    let (env, family, run_dir) =
        planned_with(&chunks, &["--max-requests-per-batch", "5"], gemini_config()).await;
    let run = load(&run_dir);
    assert_eq!(run.settings.provider, Provider::Gemini);
    assert_eq!(run.settings.task_type, Some(TaskType::RetrievalDocument));
    assert_eq!(run.settings.input_type, None);
    assert_eq!(run.plan.skipped, 1);
    assert_eq!(run.batches.len(), 3);
    let input = read(run_dir.join("batches/batch_001/input.jsonl"));
    let first = input.lines().next().unwrap();
    assert!(first.starts_with("{\"key\":\""), "{first}");
    assert!(
        first.ends_with(
            "\"request\":{\"content\":{\"parts\":[{\"text\":\"Chunk 0: check the hydraulic hose 0 for leaks.\"}]},\"taskType\":\"RETRIEVAL_DOCUMENT\",\"outputDimensionality\":768}}"
        ),
        "{first}"
    );
    advance_until_finished(&env, &run_dir, 6).await;
    assert_eq!(count_embedded(&env, family).await, 12);
    let batches = env.emu().batches();
    assert_eq!(batches.len(), 3);
    for batch in &batches {
        assert_eq!(batch["request_params"]["model"], "gemini-embedding-001");
        let name = batch["request_params"]["displayName"].as_str().unwrap();
        assert!(name.starts_with("embatch embatch_batch=batch_00"), "{name}");
    }
    let saved = load(&run_dir);
    assert!(
        saved
            .batches
            .iter()
            .all(|b| b.state.kind() == StateKind::Ingested)
    );
    let record = read(run_dir.join("batches/batch_001/batch.json"));
    assert!(record.contains("\"BATCH_STATE_SUCCEEDED\""), "{record}");
    // The input files were deleted after ingest.
    assert!(
        env.emu().files().iter().all(|f| f["purpose"] != "batch"),
        "{:?}",
        env.emu().files()
    );
    assert_created_once(&env);
}

#[tokio::test]
async fn gemini_plan_says_the_cost_is_approximate_and_records_the_task_type() {
    let env = TestEnv::new().await.with_emulator(gemini_config()).await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector(768)")
        .await
        .unwrap();
    let family = env.add_family(1).await;
    env.add_chunks(family, &["A pump.", "A valve."]).await;
    let plan = env.plan(
        family,
        &[
            "--provider",
            "gemini",
            "--model",
            "gemini-embedding-001",
            "--task-type",
            "semantic_similarity",
        ],
    );
    assert_eq!(plan.code, 0, "{plan:#?}");
    assert!(
        plan.stderr.contains("per 1M tokens), approximate"),
        "{}",
        plan.stderr
    );
    assert!(plan.stderr.contains("$0.0750 per 1M"), "{}", plan.stderr);
    let run = load(&plan.run_dir());
    assert_eq!(run.settings.task_type, Some(TaskType::SemanticSimilarity));
    let input = read(plan.run_dir().join("batches/batch_001/input.jsonl"));
    assert!(
        input.contains("\"taskType\":\"SEMANTIC_SIMILARITY\""),
        "{input}"
    );
    // Another provider's run records no task type, as Voyage's `input_type` (its bytes stay
    // as before).
    let other = env.add_family(2).await;
    env.add_chunks(other, &["A hose."]).await;
    let openai = env.plan(other, &["--task-type", "CLASSIFICATION"]);
    assert_eq!(openai.code, 0, "{openai:#?}");
    assert_eq!(load(&openai.run_dir()).settings.task_type, None);
    assert!(!read(openai.run_dir().join("run.json")).contains("task_type"));
}

#[tokio::test]
async fn gemini_sigkills_around_upload_and_creation_never_create_twice() {
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
        assert_eq!(count_embedded(&env, family).await, 8, "{crash}");
    }
}

#[tokio::test]
async fn gemini_lost_answers_on_upload_and_creation_are_adopted() {
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
    assert_eq!(count_embedded(&env, family).await, 8);
}

#[tokio::test]
async fn gemini_partial_results_at_expiry_are_ingested_and_the_rest_retried() {
    // Timed stages, so that the first advance leaves the batch running: the expiry fault is
    // frozen into that batch only, and the retry runs without it.
    let stages = EmulatorConfig {
        stage_duration: std::time::Duration::from_millis(300),
        ..gemini_config()
    };
    let (env, family, run_dir) = planned_with(&texts(10), &[], stages).await;
    env.emu().set_faults(Faults {
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    let first = advance(&env, &run_dir, &[]).await;
    assert_eq!(first.code, 75, "{first:#?}");
    env.emu().set_faults(Faults::default());
    advance_until_finished(&env, &run_dir, 40).await;
    let record = read(run_dir.join("batches/batch_001/batch.json"));
    assert!(record.contains("\"BATCH_STATE_EXPIRED\""), "{record}");
    let run = load(&run_dir);
    assert_eq!(run.batches.len(), 2, "one retry batch");
    assert_eq!(run.batches[1].retry_of, ["batch_001"]);
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    assert_eq!(failed.matches("\texpired\ttrue").count(), 5, "{failed}");
    // The retry carried only the five not done.
    let retry = read(run_dir.join("batches/batch_002/input.jsonl"));
    assert_eq!(retry.lines().count(), 5, "{retry}");
    assert_eq!(count_embedded(&env, family).await, 10);
    assert_created_once(&env);
}

#[tokio::test]
async fn gemini_429_and_500_faults_are_ridden_out() {
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
    assert_eq!(count_embedded(&env, family).await, 9);
}

#[tokio::test]
async fn gemini_realtime_embed_writes_the_normalised_vector() {
    let env = TestEnv::new().await.with_emulator(gemini_config()).await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector(768)")
        .await
        .unwrap();
    let family = env.add_family(1).await;
    // The second chunk is over Gemini's bound (bytes + 8 > 2,048) though only a few hundred
    // cl100k tokens: reported, never sent to be refused or cut by the provider.
    let wide = "lubricate the bearing ".repeat(100);
    let ids = env.add_chunks(family, &["A chunk for now.", &wide]).await;
    let id = ids[0].to_string();
    let wide_id = ids[1].to_string();
    let embed = exec_gemini(
        &env,
        &[
            "embed",
            "--chunk-id",
            &id,
            "--chunk-id",
            &wide_id,
            "--provider",
            "gemini",
            "--model",
            "gemini-embedding-001",
        ],
        &[],
    )
    .await;
    assert_eq!(embed.code, 1, "{embed:#?}");
    assert!(
        embed.stdout.contains(&format!("{wide_id}\ttoo_long")),
        "{embed:#?}"
    );
    assert!(
        embed
            .stderr
            .contains("over Gemini's limit of 2048 tokens per input"),
        "{embed:#?}"
    );
    assert!(env.embedding_of(ids[1]).await.is_none());
    let stored = env.embedding_of(ids[0]).await.unwrap();
    assert_normalised_emulator_vector(&stored, "A chunk for now.", DIMS);
    assert_eq!(env.emu().counters().embedding_calls, 1);
    assert_eq!(env.emu().counters().embedding_inputs.len(), 1);
}

#[test]
fn old_runs_keep_their_bytes_with_gemini_known() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["run-v1-every-state.json", "run-v1-ingested.json"] {
        let original = fs_err::read_to_string(fixtures.join(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("run.json"), &original).unwrap();
        let run = store::load(dir.path()).expect("the fixture loads");
        assert_eq!(run.settings.provider, Provider::Openai);
        assert_eq!(run.settings.task_type, None);
        store::save(dir.path(), &run).unwrap();
        let saved = fs_err::read_to_string(dir.path().join("run.json")).unwrap();
        assert_eq!(saved, format!("{}\n", original.trim_end()), "{name}");
        assert!(!saved.contains("task_type"), "{name}");
    }
}

#[tokio::test]
async fn gemini_an_input_file_gone_before_creation_is_uploaded_again_under_its_name() {
    let (env, family, run_dir) = planned(4, &[]).await;
    // Files live 48 h on Gemini; here one second, and the run stops right after its upload.
    env.emu().set_faults(Faults {
        input_file_ttl: Some(std::time::Duration::from_secs(1)),
        ..Faults::default()
    });
    let run = advance(&env, &run_dir, &[("EMBATCH_CRASH_AT", "after_upload:1")]).await;
    assert!(run.killed(), "{run:#?}");
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    env.emu().set_faults(Faults::default());
    advance_until_finished(&env, &run_dir, 6).await;
    let counters = env.emu().counters();
    // The same deterministic name, free again once the first file expired.
    assert_eq!(counters.uploads, 2, "{counters:?}");
    assert_eq!(counters.batch_creations, 1, "{counters:?}");
    assert_created_once(&env);
    assert_eq!(count_embedded(&env, family).await, 4);
}

#[tokio::test]
async fn gemini_a_crash_mid_ingest_resumes_without_failing_the_lines_before_it() {
    let (env, family, run_dir) = planned(40, &[]).await;
    let dir = run_dir.to_str().unwrap();
    // Killed right before the second checkpoint: the first (10 rows) is saved, and the resume
    // starts after its lines, which are Gemini's (`key`, not `custom_id`).
    let killed = exec_gemini(
        &env,
        &["advance", "--run-dir", dir, "--update-chunk-size", "10"],
        &[("EMBATCH_CRASH_AT", "ingest_commit:2")],
    )
    .await;
    assert!(killed.killed(), "{killed:#?}");
    let run = exec_gemini(
        &env,
        &["advance", "--run-dir", dir, "--update-chunk-size", "10"],
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let run = load(&run_dir);
    assert_eq!(run.batches.len(), 1, "no retry batch: nothing failed");
    let BatchState::Ingested(done) = &run.batches[0].state else {
        panic!("{:?}", run.batches[0].state)
    };
    assert_eq!(done.counts.ingested + done.counts.already_present, 40);
    assert_eq!(done.counts.failed, 0);
    let status = exec_gemini(&env, &["status", "--run-dir", dir, "--json"], &[]).await;
    let json: serde_json::Value = serde_json::from_str(&status.stdout).expect("status json");
    assert_eq!(json["totals"]["ingested"], 40, "{json}");
    assert_eq!(json["totals"]["chunks"], 40, "{json}");
    assert_eq!(count_embedded(&env, family).await, 40);
    assert_created_once(&env);
}
