//! `--provider direct`: embatch runs the planned batch files itself against the emulator's
//! `/v1/embeddings`, behind the same seam, so advance, ingest, retries and status are those of
//! the OpenAI path. Happy path, faults, SIGKILLs with no answered request sent twice, a refused
//! input, an unknown model's dimension, the time budget, and old runs' bytes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use embatch::emulator::{EmulatorConfig, Faults};
use embatch::run::state::StateKind;
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::harness::{Run, TestEnv, count_embedded_exactly, read};

const DIMS: usize = 1536;

/// A test env with an emulator and a family of `n` chunks; returns the family and the texts.
async fn family(n: usize, config: EmulatorConfig) -> (TestEnv, Uuid, Vec<String>) {
    let env = TestEnv::new().await.with_emulator(config).await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Chunk {i}: check the hydraulic hose {i} for leaks."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    (env, family, texts)
}

/// The direct server's variables: the emulator, with its key.
fn direct_env(env: &TestEnv) -> Vec<(&'static str, String)> {
    vec![
        ("EMBATCH_DIRECT_BASE_URL", env.emu().base_url()),
        ("EMBATCH_DIRECT_API_KEY", env.emu().api_key().to_owned()),
    ]
}

async fn exec_direct(env: &TestEnv, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let vars = direct_env(env);
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    env.exec_env(args, &all).await
}

async fn advance(env: &TestEnv, run_dir: &Path, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let mut all = vec!["advance", "--run-dir", run_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    exec_direct(env, &all, extra).await
}

fn load(run_dir: &Path) -> RunFile {
    store::load(run_dir).expect("run.json parses")
}

fn answers_path(run_dir: &Path, batch: &str) -> PathBuf {
    embatch::run::layout::batch_dir(run_dir, batch).join(embatch::run::layout::DIRECT_ANSWERS_FILE)
}

/// The custom_ids of the complete lines of an answers file.
fn answered_ids(path: &Path) -> HashSet<String> {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a complete line");
            value["custom_id"].as_str().expect("custom_id").to_owned()
        })
        .collect()
}

/// Chunk id → content of the family.
async fn contents(env: &TestEnv, family: Uuid) -> std::collections::HashMap<String, String> {
    env.client
        .query(
            "SELECT id::text, content FROM knowledge_chunks WHERE equipment_family_id = $1",
            &[&family],
        )
        .await
        .expect("read chunks")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn a_direct_run_embeds_every_row_with_the_servers_vectors() {
    let (env, family, texts) = family(25, EmulatorConfig::default()).await;
    let run_dir = env
        .plan(
            family,
            &["--provider", "direct", "--max-requests-per-batch", "10"],
        )
        .run_dir();
    let plan_json = read(run_dir.join("run.json"));
    assert!(
        plan_json.contains("\"provider\": \"direct\""),
        "{plan_json}"
    );
    let run = advance(&env, &run_dir, &["--direct-batch-size", "4"], &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 25);
    let run_file = load(&run_dir);
    assert!(run_file.is_finished());
    assert!(
        run_file
            .batches
            .iter()
            .all(|b| b.state.kind() == StateKind::Ingested)
    );
    let counters = env.emu().counters();
    // No Batch API at all: the requests went to /v1/embeddings, 4 inputs each (10+10+5).
    assert_eq!((counters.uploads, counters.batch_creations), (0, 0));
    assert_eq!(counters.embedding_calls, 3 + 3 + 2);
    for text in &texts {
        assert_eq!(counters.embedding_inputs.get(text), Some(&1), "{text}");
    }
    // Ingested: the working file is gone, the output file stays as a batch's would.
    assert!(!answers_path(&run_dir, "batch_001").exists());
    assert!(
        embatch::run::layout::batch_dir(&run_dir, "batch_001")
            .join("output.jsonl")
            .exists()
    );
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    assert_eq!(status.code, 0, "{status:#?}");
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json["totals"]["ingested"], 25);
    assert_eq!(json["finished"], true);
}

#[tokio::test]
async fn submit_ingest_and_status_refresh_send_nothing_only_advance_does() {
    let (env, family, _) = family(6, EmulatorConfig::default()).await;
    let family = family.to_string();
    let run = exec_direct(
        &env,
        &["submit", "--family-id", &family, "--provider", "direct"],
        &[],
    )
    .await;
    let run_dir = run.run_dir();
    for args in [
        vec!["ingest", "--run-dir", run_dir.to_str().unwrap()],
        vec![
            "status",
            "--refresh",
            "--run-dir",
            run_dir.to_str().unwrap(),
        ],
    ] {
        let run = exec_direct(&env, &args, &[]).await;
        assert!(run.code == 0 || run.code == 75, "{run:#?}");
    }
    assert_eq!(env.emu().counters().embedding_calls, 0);
    let run = advance(&env, &run_dir, &[], &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(env.emu().counters().embedding_calls, 1);
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_honouring_retry_after() {
    let (env, family, texts) = family(12, EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        rate_429: 0.3,
        rate_500: 0.2,
        retry_after_secs: 1,
        ..Faults::default()
    });
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let started = std::time::Instant::now();
    let run = advance(
        &env,
        &run_dir,
        &["--direct-batch-size", "2", "--direct-concurrency", "1"],
        &[("EMBATCH_API_RETRIES", "10")],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 12);
    let counters = env.emu().counters();
    assert!(counters.injected_errors > 0, "{counters:?}");
    // Each answered request was answered once: no input reached the server twice.
    for text in &texts {
        assert_eq!(counters.embedding_inputs.get(text), Some(&1), "{text}");
    }
    // One retry batch at most would mean the retries happened inside the requests.
    assert_eq!(load(&run_dir).batches.len(), 1);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

#[tokio::test]
async fn errors_left_after_the_retries_become_error_lines_retried_by_attempts() {
    let (env, family, _) = family(8, EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        rate_500: 0.5,
        ..Faults::default()
    });
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let run = advance(
        &env,
        &run_dir,
        &[
            "--direct-batch-size",
            "1",
            "--direct-concurrency",
            "1",
            "--max-attempts",
            "20",
        ],
        &[("EMBATCH_API_RETRIES", "0")],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 8);
    let run_file = load(&run_dir);
    assert!(
        run_file.batches.len() > 1,
        "server errors should have been retried in retry batches"
    );
    assert!(run_file.batches.iter().skip(1).all(|b| b.attempt > 1));
    let first = embatch::run::layout::batch_dir(&run_dir, "batch_001");
    assert!(read(first.join("failed_chunk_ids.tsv")).contains("server_error"));
}

#[tokio::test]
async fn a_sigkill_resumes_from_the_saved_answers_and_never_resends_them() {
    for (point, torn) in [
        ("direct_after_answer:2", false),
        ("direct_torn_answer:3", true),
    ] {
        let (env, family, texts) = family(15, EmulatorConfig::default()).await;
        let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
        let args = ["--direct-batch-size", "3", "--direct-concurrency", "1"];
        let run = advance(&env, &run_dir, &args, &[("EMBATCH_CRASH_AT", point)]).await;
        assert!(run.killed(), "{point}: {run:#?}");
        let answers = answers_path(&run_dir, "batch_001");
        let text = read(&answers);
        assert_eq!(!text.ends_with('\n'), torn, "{point}: {text}");
        let on_disk = answered_ids(&answers);
        // Two requests of 3 answered and synced; a torn third keeps its complete lines.
        if torn {
            assert!(
                (6..9).contains(&on_disk.len()),
                "{point}: {}",
                on_disk.len()
            );
        } else {
            assert_eq!(on_disk.len(), 6, "{point}");
        }
        let sent_before = env.emu().counters().embedding_inputs.len();
        assert_eq!(sent_before, if torn { 9 } else { 6 }, "{point}");

        let run = advance(&env, &run_dir, &args, &[]).await;
        assert_eq!(run.code, 0, "{point}: {run:#?}");
        assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 15);
        let counters = env.emu().counters();
        let by_id = contents(&env, family).await;
        for id in &on_disk {
            let content = &by_id[id];
            assert_eq!(
                counters.embedding_inputs.get(content),
                Some(&1),
                "{point}: {content} was answered on disk and sent again"
            );
        }
        for text in &texts {
            let n = counters.embedding_inputs.get(text).copied().unwrap_or(0);
            // Only the torn request's inputs may have gone twice.
            assert!(n == 1 || (torn && n == 2), "{point}: {text} sent {n} times");
        }
        let twice = texts
            .iter()
            .filter(|t| counters.embedding_inputs.get(*t) == Some(&2))
            .count();
        // Exactly the inputs sent but not on disk went again.
        assert_eq!(twice, sent_before - on_disk.len(), "{point}");
    }
}

#[tokio::test]
async fn a_refused_input_is_split_out_and_reported_the_rest_embedded() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let family = env.add_family(1).await;
    let mut texts: Vec<String> = (0..7)
        .map(|i| format!("Chunk {i}: oil the chain."))
        .collect();
    texts.insert(3, "REFUSE-ME: a chunk the server will not take".to_owned());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = env.add_chunks(family, &refs).await;
    let refused = ids[3];
    env.emu().set_faults(Faults {
        refuse_inputs_containing: Some("REFUSE-ME".to_owned()),
        ..Faults::default()
    });
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let run = advance(&env, &run_dir, &["--direct-batch-size", "8"], &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 7);
    let failed =
        read(embatch::run::layout::batch_dir(&run_dir, "batch_001").join("failed_chunk_ids.tsv"));
    assert!(
        failed.contains(&format!("{refused}\tinvalid_request\tfalse")),
        "{failed}"
    );
    // Refused: reported, never retried.
    assert_eq!(load(&run_dir).batches.len(), 1);
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json["totals"]["failed"], 1);
}

#[tokio::test]
async fn an_unknown_models_size_is_checked_on_the_first_answer_before_writing() {
    let (env, family, _) = family(5, EmulatorConfig::default()).await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector(768)")
        .await
        .unwrap();
    let plan = env.plan(
        family,
        &["--provider", "direct", "--model", "my-local-model"],
    );
    assert!(
        plan.stderr
            .contains("its dimension is taken from the server's first answer"),
        "{plan:#?}"
    );
    assert!(
        plan.stderr
            .contains("estimated cost: not applicable for --provider direct"),
        "{plan:#?}"
    );
    let run_dir = plan.run_dir();
    let run = advance(&env, &run_dir, &[], &[]).await;
    run.assert_error("answered 1536-dimensional vectors but the run writes vector(768)");
    assert_eq!(count_embedded_exactly(&env, family, 768).await, 0);
    assert!(answered_ids(&answers_path(&run_dir, "batch_001")).is_empty());
    // The same unknown model into a column of its size: taken as the server answers it.
    let (env, family, _) = family_again(5).await;
    let run_dir = env
        .plan(
            family,
            &["--provider", "direct", "--model", "my-local-model"],
        )
        .run_dir();
    let run = advance(&env, &run_dir, &[], &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 5);
}

async fn family_again(n: usize) -> (TestEnv, Uuid, Vec<String>) {
    family(n, EmulatorConfig::default()).await
}

#[tokio::test]
async fn a_time_budget_returns_75_while_work_remains_and_resumes() {
    let (env, family, _) = family(10, EmulatorConfig::default()).await;
    env.emu().set_faults(Faults {
        latency: std::time::Duration::from_millis(400),
        ..Faults::default()
    });
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let args = [
        "--direct-batch-size",
        "1",
        "--direct-concurrency",
        "1",
        "--direct-time-budget",
        "600ms",
    ];
    let run = advance(&env, &run_dir, &args, &[]).await;
    assert_eq!(run.code, 75, "{run:#?}");
    let done = answered_ids(&answers_path(&run_dir, "batch_001")).len();
    assert!((1..10).contains(&done), "{done} answered");
    let run = advance(&env, &run_dir, &["--wait", "--poll-seconds", "1"], &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 10);
    let counters = env.emu().counters();
    assert_eq!(counters.embedding_inputs.len(), 10);
    assert!(
        counters.embedding_inputs.values().all(|n| *n == 1),
        "{counters:?}"
    );
}

#[tokio::test]
async fn no_server_for_direct_is_a_clear_error_and_openais_key_is_never_sent() {
    let (env, family, _) = family(2, EmulatorConfig::default()).await;
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let run = env
        .exec(&["advance", "--run-dir", run_dir.to_str().unwrap()])
        .await;
    run.assert_error("EMBATCH_DIRECT_BASE_URL");
    // Pointed at the emulator without a key: OPENAI_API_KEY (set by the harness) is not sent.
    let run = env
        .exec_env(
            &["advance", "--run-dir", run_dir.to_str().unwrap()],
            &[("EMBATCH_DIRECT_BASE_URL", &env.emu().base_url())],
        )
        .await;
    run.assert_error("check EMBATCH_DIRECT_API_KEY");
    // A server that does not answer: nothing lost, exit 75, the direct variable named.
    let run = env
        .exec_env(
            &["advance", "--run-dir", run_dir.to_str().unwrap()],
            &[
                ("EMBATCH_DIRECT_BASE_URL", "http://127.0.0.1:9/v1"),
                ("EMBATCH_API_RETRIES", "0"),
            ],
        )
        .await;
    assert_eq!(run.code, 75, "{run:#?}");
    assert!(
        run.stderr.contains("--base-url / EMBATCH_DIRECT_BASE_URL"),
        "{run:#?}"
    );
    assert!(!run.stderr.contains("OPENAI"), "{run:#?}");
}

#[tokio::test]
async fn run_and_embed_work_with_the_direct_provider() {
    let (env, family, _) = family(4, EmulatorConfig::default()).await;
    let family_id = family.to_string();
    let run = exec_direct(
        &env,
        &["run", "--family-id", &family_id, "--provider", "direct"],
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 4);
    // The realtime path: one more chunk, embedded now through the direct server.
    let ids = env
        .add_chunks(env.add_family(2).await, &["A chunk for now."])
        .await;
    let id = ids[0].to_string();
    let embed = exec_direct(
        &env,
        &["embed", "--chunk-id", &id, "--provider", "direct"],
        &[("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")],
    )
    .await;
    assert_eq!(embed.code, 0, "{embed:#?}");
    let row = env
        .client
        .query_one(
            "SELECT embedding FROM knowledge_chunks WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let stored: pgvector::Vector = row.get(0);
    crate::harness::assert_emulator_vector(&id, stored.as_slice(), "A chunk for now.", DIMS);
}

#[test]
fn old_runs_load_and_save_byte_for_byte() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["run-v1-every-state.json", "run-v1-ingested.json"] {
        let original = fs_err::read(fixtures.join(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("run.json"), &original).unwrap();
        let run = store::load(dir.path()).expect("the fixture loads");
        assert_eq!(run.settings.provider, embatch::models::Provider::Openai);
        store::save(dir.path(), &run).unwrap();
        let saved = fs_err::read_to_string(dir.path().join("run.json")).unwrap();
        let original = String::from_utf8(original).unwrap();
        // The store ends the file with a newline; the fixtures were saved without one.
        assert_eq!(
            saved,
            format!("{}\n", original.trim_end()),
            "{name} changed on a load and save"
        );
        assert!(!saved.contains("provider"), "{name}");
        // And a file the store wrote comes back byte for byte.
        let again = store::load(dir.path()).unwrap();
        store::save(dir.path(), &again).unwrap();
        assert_eq!(
            fs_err::read_to_string(dir.path().join("run.json")).unwrap(),
            saved
        );
    }
}

#[tokio::test]
async fn max_requests_per_minute_paces_the_requests() {
    let (env, family, _) = family(5, EmulatorConfig::default()).await;
    let run_dir = env.plan(family, &["--provider", "direct"]).run_dir();
    let started = std::time::Instant::now();
    let run = advance(
        &env,
        &run_dir,
        &[
            "--direct-batch-size",
            "1",
            "--direct-concurrency",
            "4",
            "--max-requests-per-minute",
            "300",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    // One request every 200 ms: the fifth leaves 800 ms after the first.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(800),
        "{elapsed:?}"
    );
    assert_eq!(env.emu().counters().embedding_calls, 5);
}

#[tokio::test]
async fn a_sigkill_at_every_step_ends_with_every_input_sent_once() {
    let points = [
        "before_upload:1",
        "after_upload:1",
        "before_create:1",
        "after_create:1",
        "direct_after_answer:1",
        "before_download:1",
        "after_download:2",
        "ingest_commit:1",
        "before_save:4",
        "after_save:6",
        "after_save:9",
    ];
    for point in points {
        let (env, family, texts) = family(6, EmulatorConfig::default()).await;
        let run_dir = env
            .plan(
                family,
                &["--provider", "direct", "--max-requests-per-batch", "3"],
            )
            .run_dir();
        let args = ["--direct-batch-size", "2", "--direct-concurrency", "1"];
        let run = advance(&env, &run_dir, &args, &[("EMBATCH_CRASH_AT", point)]).await;
        assert!(run.killed(), "{point}: {run:#?}");
        let run = advance(&env, &run_dir, &args, &[]).await;
        assert_eq!(run.code, 0, "{point}: {run:#?}");
        assert_eq!(
            count_embedded_exactly(&env, family, DIMS).await,
            6,
            "{point}"
        );
        let counters = env.emu().counters();
        for text in &texts {
            assert_eq!(
                counters.embedding_inputs.get(text),
                Some(&1),
                "{point}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn embed_refuses_a_known_direct_model_of_another_size_before_sending() {
    let (env, family, _) = family(1, EmulatorConfig::default()).await;
    let id = Uuid::from_u128(family.as_u128() + 1).to_string();
    // bge-small answers 384 dimensions; the column is vector(1536).
    let embed = exec_direct(
        &env,
        &[
            "embed",
            "--chunk-id",
            &id,
            "--provider",
            "direct",
            "--model",
            "BAAI/bge-small-en-v1.5",
        ],
        &[],
    )
    .await;
    embed.assert_error("model BAAI/bge-small-en-v1.5 produces 384 dimensions");
    assert_eq!(env.emu().counters().embedding_calls, 0);
}

/// `sync --provider direct` sends the requests of its runs, and needs no OpenAI key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_the_requests_of_direct_runs() {
    let (env, family, _) = family(6, EmulatorConfig::default()).await;
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.env_remove("OPENAI_API_KEY");
    for (key, value) in direct_env(&env) {
        cmd.env(key, value);
    }
    let out = cmd
        .args([
            "sync",
            "--family-id",
            &family.to_string(),
            "--provider",
            "direct",
            "--max-requests-per-batch",
            "4",
        ])
        .output()
        .await
        .expect("run embatch");
    let sync = Run::from_output(out);
    assert_eq!(sync.code, 0, "{sync:#?}");
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 6);
}
