//! Ingest into pgvector end to end: exact vectors, retries, stale chunks, `--overwrite`,
//! damaged output, the index warning, and flat memory.

use std::path::Path;

use embatch::emulator::{EmulatorConfig, Faults, vectors};
use embatch::run::state::StateKind;
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::advance::advance_until_finished;
use crate::harness::{Run, TestEnv, assert_emulator_vector, read};

async fn advance(env: &TestEnv, run_dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["advance", "--run-dir", run_dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.exec(&args).await
}

fn load(run_dir: &Path) -> RunFile {
    store::load(run_dir).expect("run.json parses")
}

/// Every chunk of `family` holds exactly the emulator's vector for its current content.
async fn assert_embedded_exactly(env: &TestEnv, family: Uuid, dims: usize) -> usize {
    let rows = env
        .client
        .query(
            "SELECT id, content, embedding FROM knowledge_chunks WHERE equipment_family_id = $1",
            &[&family],
        )
        .await
        .unwrap();
    for row in &rows {
        let id: Uuid = row.get(0);
        let content: String = row.get(1);
        let stored: Option<pgvector::Vector> = row.get(2);
        let stored = stored.unwrap_or_else(|| panic!("chunk {id} has no embedding"));
        assert_emulator_vector(id, stored.as_slice(), &content, dims);
    }
    rows.len()
}

async fn family_with_chunks(env: &TestEnv, n_family: u128, n: usize) -> (Uuid, Vec<Uuid>) {
    let family = env.add_family(n_family).await;
    let texts: Vec<String> = (0..n)
        .map(|i| {
            format!("Family {n_family} chunk {i}: replace the seal of valve {i} after 400 hours.")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = env.add_chunks(family, &refs).await;
    (family, ids)
}

#[tokio::test]
async fn end_to_end_every_chunk_holds_its_exact_vector_and_other_families_are_untouched() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_with_chunks(&env, 1, 37).await;
    let (other, _) = family_with_chunks(&env, 2, 5).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "10"])
        .run_dir();
    advance_until_finished(&env, &run_dir, 5).await;
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 37);
    let untouched: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE equipment_family_id = $1 AND embedding IS NULL",
            &[&other],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(untouched, 5);
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    let view: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(view["finished"], true);
    assert_eq!(view["totals"]["ingested"], 37);
    assert_eq!(view["totals"]["pending"], 0);
    // A second advance of a finished run does nothing and says done.
    let again = advance(&env, &run_dir, &[]).await;
    assert_eq!(again.code, 0, "{again:#?}");
    assert_eq!(env.emu().counters().batch_creations, 4);
}

#[tokio::test]
async fn partial_failures_and_expiry_are_retried_until_embedded() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            seed: 5,
            stage_duration: std::time::Duration::from_millis(300),
            ..EmulatorConfig::default()
        })
        .await;
    let (family, _) = family_with_chunks(&env, 1, 30).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "15"])
        .run_dir();
    // The first batches: some requests fail, and the batches expire half done (faults are
    // fixed into a batch when it is created).
    env.emu().set_faults(Faults {
        request_failure_rate: 0.3,
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    let first = advance(&env, &run_dir, &[]).await;
    assert_eq!(first.code, 75, "still running: {first:#?}");
    // The retries go through.
    env.emu().set_faults(Faults::default());
    advance_until_finished(&env, &run_dir, 40).await;
    let run = load(&run_dir);
    assert!(run.batches.len() > 2, "a retry batch was planned");
    let retry = &run.batches[2];
    assert_eq!(retry.attempt, 2);
    assert_eq!(retry.retry_of, ["batch_001", "batch_002"]);
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    assert!(failed.starts_with("id\treason\tretryable\n"), "{failed}");
    assert!(failed.contains("\texpired\ttrue"), "{failed}");
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 30);
}

#[tokio::test]
async fn a_chunk_edited_after_plan_gets_the_vector_of_its_new_content() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_with_chunks(&env, 1, 6).await;
    let run_dir = env.plan(family, &[]).run_dir();
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = 'Rewritten: torque the flange bolts to 60 N·m.' WHERE id = $1",
            &[&ids[2]],
        )
        .await
        .unwrap();
    advance_until_finished(&env, &run_dir, 5).await;
    let run = load(&run_dir);
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    assert!(
        failed.contains(&format!("{}\tstale\ttrue", ids[2])),
        "{failed}"
    );
    let embatch::run::state::BatchState::Ingested(first) = &run.batches[0].state else {
        panic!()
    };
    assert_eq!((first.counts.ingested, first.counts.stale), (5, 1));
    assert_eq!(run.batches.len(), 2, "one retry batch from the new content");
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 6);
}

#[tokio::test]
async fn existing_embeddings_are_kept_unless_overwrite() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_with_chunks(&env, 1, 3).await;
    let marker = pgvector::Vector::from(vec![0.25f32; 1536]);
    let plan_then_mark = || async {
        let run_dir = env.plan(family, &["--reembed", "--force"]).run_dir();
        env.client
            .execute(
                "UPDATE knowledge_chunks SET embedding = $1 WHERE id = $2",
                &[&marker, &ids[0]],
            )
            .await
            .unwrap();
        run_dir
    };
    // --reembed plans every chunk; an embedding written meanwhile by someone else is
    // overwritten, because the run was planned to re-embed.
    let run_dir = plan_then_mark().await;
    advance_until_finished(&env, &run_dir, 5).await;
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 3);

    // A plain plan, then an embedding appears before ingest: kept without --overwrite…
    env.client
        .execute("UPDATE knowledge_chunks SET embedding = NULL", &[])
        .await
        .unwrap();
    let run_dir = env.plan(family, &[]).run_dir();
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = $1 WHERE id = $2",
            &[&marker, &ids[0]],
        )
        .await
        .unwrap();
    advance_until_finished(&env, &run_dir, 5).await;
    let kept: pgvector::Vector = env
        .client
        .query_one(
            "SELECT embedding FROM knowledge_chunks WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, marker);
    let embatch::run::state::BatchState::Ingested(i) = &load(&run_dir).batches[0].state else {
        panic!()
    };
    assert_eq!((i.counts.ingested, i.counts.already_present), (2, 1));

    // …and rewritten with it.
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = NULL WHERE id <> $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let run_dir = env.plan(family, &["--reembed"]).run_dir();
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = $1 WHERE id = $2",
            &[&marker, &ids[0]],
        )
        .await
        .unwrap();
    let run = advance(&env, &run_dir, &["--overwrite"]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 3);
}

#[tokio::test]
async fn damaged_output_is_reported_and_the_good_lines_still_ingested() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_with_chunks(&env, 1, 8).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    // The database is away when the batch completes: it stops at `downloaded`.
    let away = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("DATABASE_URL", "host=/nonexistent dbname=x")],
        )
        .await;
    assert_eq!(away.code, 1, "{away:#?}");
    assert_eq!(
        load(&run_dir).batches[0].state.kind(),
        StateKind::Downloaded
    );

    let output_path = run_dir.join("batches/batch_001/output.jsonl");
    let output = read(&output_path);
    let mut lines: Vec<String> = output.lines().map(str::to_owned).collect();
    lines.sort_by_key(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["custom_id"].as_str().unwrap().to_owned()
    });
    // ids[0]: good. ids[1]: good, then repeated. ids[2]: wrong dimension. ids[3]: infinite
    // value. ids[4]: its line names an id not in the run. ids[5]: truncated line.
    // ids[6], ids[7]: good.
    let mut damaged = vec![lines[0].clone(), lines[1].clone(), lines[1].clone()];
    let mut short: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    short["response"]["body"]["data"][0]["embedding"] = serde_json::json!([0.5, 0.5]);
    damaged.push(short.to_string());
    damaged.push(lines[3].replacen("[", "[1e999,", 1).replacen(",", "", 0));
    damaged.push(lines[4].replace(&ids[4].to_string(), "not-a-chunk-of-this-run"));
    damaged.push(lines[6].clone());
    damaged.push(lines[7].clone());
    let mut text = damaged.join("\n");
    text.push('\n');
    text.push_str(&lines[5][..lines[5].len() / 2]);
    fs_err::write(&output_path, text).unwrap();

    let run = env
        .exec(&["advance", "--run-dir", dir, "--max-attempts", "1"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr
            .contains("1 lines with a custom_id not in this batch"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("1 repeated custom_ids"), "{run:#?}");
    assert!(run.stderr.contains("1 unparseable lines"), "{run:#?}");
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    for id in [ids[2], ids[3], ids[4], ids[5]] {
        assert!(
            failed.contains(&format!("{id}\t")),
            "{id} not reported: {failed}"
        );
    }
    let embedded: Vec<Uuid> = env
        .client
        .query(
            "SELECT id FROM knowledge_chunks WHERE embedding IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        embedded,
        [ids[0], ids[1], ids[6], ids[7]],
        "only the good lines are written"
    );
    // …and those hold exactly their vectors.
    for id in &embedded {
        let row = env
            .client
            .query_one(
                "SELECT content, embedding FROM knowledge_chunks WHERE id = $1",
                &[id],
            )
            .await
            .unwrap();
        let stored: pgvector::Vector = row.get(1);
        assert_eq!(
            stored.to_vec(),
            vectors::embedding(&row.get::<_, String>(0), 1536)
        );
    }
}

#[tokio::test]
async fn an_indexed_embedding_column_is_warned_about_before_ingest() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_with_chunks(&env, 1, 2).await;
    env.client
        .batch_execute(
            "CREATE INDEX chunks_hnsw ON knowledge_chunks USING hnsw (embedding vector_cosine_ops)",
        )
        .await
        .unwrap();
    // Warned at plan, where the user decides, and again before the writes.
    let plan = env.plan(family, &[]);
    let warning = "knowledge_chunks.embedding has the hnsw index public.chunks_hnsw";
    assert!(plan.stderr.contains(warning), "{plan:#?}");
    let run_dir = plan.run_dir();
    let run = advance(&env, &run_dir, &[]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains(warning), "{run:#?}");
    assert!(run.stderr.contains("100 times slower"), "{run:#?}");
    assert!(run.stderr.contains("build it afterwards"), "{run:#?}");
}

#[tokio::test]
async fn ingest_never_spends_and_a_crash_mid_ingest_resumes() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_with_chunks(&env, 1, 40).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    // `ingest` on a planned run: nothing to do, nothing created.
    let run = env.exec(&["ingest", "--run-dir", dir]).await;
    assert_eq!(run.code, 75, "{run:#?}");
    assert_eq!(env.emu().counters().uploads, 0);
    // Killed right after the second committed transaction of 10 rows.
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir, "--update-chunk-size", "10"],
            &[("EMBATCH_CRASH_AT", "ingest_commit:2")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    let written: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 20, "two transactions were committed");
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--update-chunk-size", "10"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let embatch::run::state::BatchState::Ingested(i) = &load(&run_dir).batches[0].state else {
        panic!()
    };
    assert_eq!(
        i.counts.ingested, 40,
        "a redone transaction counts as written once"
    );
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 40);
    assert_eq!(env.emu().counters().batch_creations, 1);
}

/// Ingest of a 50,000-line output file keeps the process under 64 MiB resident.
#[tokio::test]
async fn ingest_memory_stays_flat_on_a_large_output() {
    let env = TestEnv::empty()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    env.client
        .batch_execute(
            "CREATE TABLE knowledge_chunks (id uuid PRIMARY KEY, equipment_family_id uuid, content text, embedding vector(256));
             INSERT INTO knowledge_chunks
             SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'Check pump ' || g || ' for leaks and wear.', NULL
             FROM generate_series(1, 50000) AS g;",
        )
        .await
        .unwrap();
    let run_dir = env
        .run(&[
            "plan",
            "--family-id",
            "00000000-0000-0000-0000-000000000001",
            "--family-table",
            "none",
        ])
        .run_dir();
    let dir = run_dir.to_str().unwrap().to_owned();
    // Download first (no database), then measure the ingest alone.
    let away = env
        .exec_env(
            &["advance", "--run-dir", &dir],
            &[("DATABASE_URL", "host=/nonexistent dbname=x")],
        )
        .await;
    assert_eq!(away.code, 1, "{away:#?}");
    let output = fs_err::metadata(run_dir.join("batches/batch_001/output.jsonl"))
        .unwrap()
        .len();
    let mut cmd = env.command();
    cmd.args(["ingest", "--run-dir", &dir, "--no-progress"]);
    // Waited for off the runtime's thread: the in-process emulator must keep answering.
    let (status, max_rss_kib) =
        tokio::task::spawn_blocking(move || crate::plan::run_with_peak_rss(cmd))
            .await
            .unwrap();
    assert_eq!(status, 0);
    let embedded: i64 = env
        .client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(embedded, 50_000);
    eprintln!(
        "ingest of 50,000 lines ({} MB): peak RSS {} KiB",
        output / 1_000_000,
        max_rss_kib
    );
    // A real process holds a few MiB: 0 would mean the sampling measured nothing.
    assert!(
        max_rss_kib > 1024,
        "no peak RSS measured ({max_rss_kib} KiB)"
    );
    assert!(max_rss_kib < 64 * 1024, "peak RSS {max_rss_kib} KiB");
}

#[tokio::test]
async fn a_chunk_emptied_after_plan_is_given_up_and_counted_failed() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_with_chunks(&env, 1, 4).await;
    let run_dir = env.plan(family, &[]).run_dir();
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = '   ' WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    advance_until_finished(&env, &run_dir, 5).await;
    let skipped = read(run_dir.join("retry_skipped.tsv"));
    assert!(skipped.contains(&format!("{}\tempty", ids[1])), "{skipped}");
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    let view: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(view["finished"], true);
    assert_eq!(view["totals"]["ingested"], 3);
    assert_eq!(view["totals"]["failed"], 1, "{view}");
    assert_eq!(view["totals"]["pending"], 0, "{view}");
}

/// A run of `n` chunks whose only batch is downloaded, not ingested (the database was away).
async fn downloaded(env: &TestEnv, n: usize) -> (Uuid, Vec<Uuid>, std::path::PathBuf) {
    let (family, ids) = family_with_chunks(env, 1, n).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let away = env
        .exec_env(
            &["advance", "--run-dir", run_dir.to_str().unwrap()],
            &[("DATABASE_URL", "host=/nonexistent dbname=x")],
        )
        .await;
    assert_eq!(away.code, 1, "{away:#?}");
    assert_eq!(
        load(&run_dir).batches[0].state.kind(),
        StateKind::Downloaded
    );
    (family, ids, run_dir)
}

/// The output lines of a downloaded batch, by custom_id.
fn output_lines(run_dir: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    read(run_dir.join("batches/batch_001/output.jsonl"))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["custom_id"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// Issue 14, item 8: every output line is accounted for. A line that is not UTF-8, an
/// all-zero vector and a response with two vectors of index 0 are `bad_output` and retried,
/// never skipped or written; of several items the one of index 0 is taken.
#[tokio::test]
async fn odd_output_lines_are_bad_output_and_retried_never_skipped_or_written() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids, run_dir) = downloaded(&env, 6).await;
    let lines = output_lines(&run_dir);
    let line = |i: usize| lines[&ids[i].to_string()].clone();
    let embedding = |v: &serde_json::Value| v["response"]["body"]["data"][0].clone();
    let mut out: Vec<Vec<u8>> = Vec::new();
    // ids[0]: a stray byte inside the vector; its custom_id is still readable.
    let text = line(0).to_string();
    let at = text.find("\"embedding\":[").unwrap() + "\"embedding\":[".len();
    let mut bytes = text.into_bytes();
    bytes.insert(at, 0xff);
    out.push(bytes);
    // ids[1]: a broken byte inside the custom_id: unparseable, its chunk has no line.
    let text = line(1).to_string();
    let at = text.find(&ids[1].to_string()).unwrap() + 4;
    let mut bytes = text.into_bytes();
    bytes.insert(at, 0xc3);
    out.push(bytes);
    // ids[2]: the zero vector.
    let mut zero = line(2);
    zero["response"]["body"]["data"][0]["embedding"] = serde_json::json!(vec![0.0f32; 1536]);
    out.push(zero.to_string().into_bytes());
    // ids[3]: two items, the one of index 0 second: it is taken.
    let mut two = line(3);
    let mut decoy = embedding(&two);
    decoy["index"] = serde_json::json!(1);
    decoy["embedding"] = serde_json::json!(vec![0.5f32; 1536]);
    two["response"]["body"]["data"] = serde_json::json!([decoy, embedding(&line(3))]);
    out.push(two.to_string().into_bytes());
    // ids[4]: two items of index 0: which one is this chunk's is unknown.
    let mut twice = line(4);
    let mut other = embedding(&twice);
    other["embedding"] = serde_json::json!(vec![0.5f32; 1536]);
    twice["response"]["body"]["data"] = serde_json::json!([other, embedding(&line(4))]);
    out.push(twice.to_string().into_bytes());
    // ids[5]: good.
    out.push(line(5).to_string().into_bytes());
    let mut file = out.join(&b'\n');
    file.push(b'\n');
    fs_err::write(run_dir.join("batches/batch_001/output.jsonl"), file).unwrap();

    let run = env
        .exec(&["ingest", "--run-dir", run_dir.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains("1 unparseable lines"), "{run:#?}");
    assert!(run.stderr.contains("output.jsonl"), "{run:#?}");
    let failed = read(run_dir.join("batches/batch_001/failed_chunk_ids.tsv"));
    for i in [0, 1, 2, 4] {
        assert!(
            failed.contains(&format!("{}\tbad_output\ttrue", ids[i])),
            "ids[{i}] not reported as bad_output: {failed}"
        );
    }
    assert_eq!(failed.lines().count(), 5, "{failed}");
    let written: Vec<Uuid> = env
        .client
        .query(
            "SELECT id FROM knowledge_chunks WHERE embedding IS NOT NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        written,
        [ids[3], ids[5]],
        "only the good vectors are written"
    );
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    let view: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        view["batches"][0]["line_anomalies"]["unparseable"], 1,
        "{view}"
    );
    assert_eq!(view["totals"]["pending"], 4, "{view}");

    // The four are retried, and every chunk ends with exactly its vector.
    advance_until_finished(&env, &run_dir, 5).await;
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 6);
    let run = load(&run_dir);
    assert_eq!(run.batches[1].requests, 4);
    // The retry batch's evidence files are recorded like a planned batch's.
    let files = run.batches[1]
        .files
        .as_ref()
        .expect("retry digests recorded");
    let retry_dir = run_dir.join("batches/batch_002");
    assert_eq!(
        files.input,
        store::FileDigest::of_file(&retry_dir.join("input.jsonl"), 0).unwrap()
    );
    assert_eq!(
        files.chunks,
        store::FileDigest::of_file(&retry_dir.join("chunks.tsv"), 1).unwrap()
    );
    assert_eq!(files.chunks.rows, 4);
}

/// Issue 14, item 9: `ingest --redownload --overwrite` of an ingested run writes its vectors
/// again — from the provider's copy, or from the local one when the provider's is gone — or
/// says why it cannot; never "done" with nothing written.
#[tokio::test]
async fn ingest_redownload_overwrite_writes_an_ingested_run_again() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_with_chunks(&env, 1, 5).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    let keep = advance(&env, &run_dir, &["--keep-remote-files"]).await;
    assert_eq!(keep.code, 0, "{keep:#?}");
    let marker = pgvector::Vector::from(vec![0.25f32; 1536]);
    let spoil = || async {
        env.client
            .execute("UPDATE knowledge_chunks SET embedding = $1", &[&marker])
            .await
            .unwrap();
    };

    // The provider still has the output: fetched again and written over the spoiled vectors.
    spoil().await;
    let downloads = env.emu().counters().downloads;
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--redownload", "--overwrite"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains("5 written"), "{run:#?}");
    assert!(env.emu().counters().downloads > downloads);
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 5);
    let embatch::run::state::BatchState::Ingested(i) = &load(&run_dir).batches[0].state else {
        panic!()
    };
    assert_eq!(i.counts.ingested, 5);
    assert!(
        i.remote_files_deleted,
        "this ingest cleaned up the remote files"
    );

    // The provider's copy is gone now: the local copy is used, and the run says so.
    spoil().await;
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--redownload", "--overwrite"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains("ingesting the local copy"), "{run:#?}");
    assert_eq!(assert_embedded_exactly(&env, family, 1536).await, 5);

    // Without --overwrite, a missing vector is written and another one present is kept
    // (a chunk already holding its own vector counts as written).
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = NULL WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = $1 WHERE id = $2",
            &[&marker, &ids[1]],
        )
        .await
        .unwrap();
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--redownload"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains("4 written, 1 already present"),
        "{run:#?}"
    );
    assert_eq!(env.embedding_of(ids[1]).await, Some(marker.to_vec()));
    assert!(env.embedding_of(ids[0]).await.is_some());

    // Gone everywhere: refused with the reason, and the run is left as it was.
    let output = run_dir.join("batches/batch_001/output.jsonl");
    fs_err::remove_file(&output).unwrap();
    let before = read(run_dir.join("run.json"));
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--redownload", "--overwrite"])
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert!(
        run.stderr.contains("cannot be ingested again") && run.stderr.contains("output.jsonl"),
        "{run:#?}"
    );
    assert_eq!(read(run_dir.join("run.json")), before);
    // Nothing was planned twice, nothing paid twice.
    assert_eq!(load(&run_dir).batches.len(), 1);
    assert_eq!(env.emu().counters().batch_creations, 1);
}
