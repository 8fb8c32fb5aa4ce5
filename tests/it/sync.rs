//! `embatch sync`: every family of a table, one shared enqueued-token budget, one cost bound
//! per call, the sync lock, failing families, `--dry-run`, edited chunks re-embedded
//! (`--content-hash-column`), a model upgrade into a second column, and a long run of calls
//! with SIGKILLs and provider faults between them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use embatch::emulator::{EmulatorConfig, Faults};
use embatch::run::folders;
use embatch::run::store::RunFile;
use uuid::Uuid;

use crate::harness::{Run, TestEnv, count_embedded_exactly, family_of};

/// Every run under the runs dir.
fn all_runs(env: &TestEnv) -> Vec<(PathBuf, RunFile)> {
    folders::find_runs(&env.runs_dir, None)
        .expect("read the runs dir")
        .into_iter()
        .map(|found| (found.dir, found.run.expect("run.json loads")))
        .collect()
}

/// `embatch sync <args…>`, checked to end in 0 or 75 (no panic).
async fn sync(env: &TestEnv, args: &[&str]) -> Run {
    let mut all = vec!["sync"];
    all.extend_from_slice(args);
    let run = env.exec(&all).await;
    assert!(run.code == 0 || run.code == 75, "{run:#?}");
    assert!(!run.stderr.contains("panicked"), "{run:#?}");
    run
}

/// Calls sync until it exits 0, at most `max` times.
async fn sync_until_done(env: &TestEnv, args: &[&str], max: usize) -> usize {
    for call in 1..=max {
        if sync(env, args).await.code == 0 {
            return call;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("sync not done after {max} calls");
}

/// Each chunk id in at most one batch of one run (retries of a run aside: a retry batch
/// takes a chunk again only in the run that held it).
fn assert_no_chunk_in_two_runs(env: &TestEnv) {
    let mut holder: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (dir, run) in all_runs(env) {
        for batch in &run.batches {
            let tsv = embatch::run::layout::batch_dir(&dir, &batch.name)
                .join(embatch::run::layout::CHUNKS_FILE);
            for line in crate::harness::read(&tsv).lines().skip(1) {
                let id = line.split('\t').next().unwrap_or_default().to_owned();
                if let Some(other) = holder.insert(id.clone(), dir.clone()) {
                    assert_eq!(other, dir, "chunk {id} is in two runs");
                }
            }
        }
    }
}

/// One remote batch per (run, batch, submission).
fn assert_no_duplicate_remote_batch(env: &TestEnv) {
    let counters = env.emu().counters();
    for (key, n) in &counters.creations_by_metadata {
        assert_eq!(*n, 1, "remote batch {key} created {n} times");
    }
}

#[tokio::test]
async fn sync_embeds_every_family_under_one_budget() {
    // Batches stay in flight for a while, so runs meet at the budget.
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_millis(150),
            ..EmulatorConfig::default()
        })
        .await;
    let mut families = Vec::new();
    for (n_family, size) in [(1u128, 1usize), (2, 5), (3, 13), (4, 30)] {
        families.push((family_of(&env, n_family, size).await.0, size));
    }
    // Each request line is ~260 bytes (~65 estimated tokens); 4 per batch: ~260 per batch.
    let budget = "700";
    env.emu()
        .update_faults(|f| f.enqueued_token_limit = Some(700));
    let args = [
        "--max-requests-per-batch",
        "4",
        "--max-enqueued-tokens",
        budget,
        "--json",
    ];
    let calls = sync_until_done(&env, &args, 60).await;
    for (family, size) in &families {
        assert_eq!(count_embedded_exactly(&env, *family, 1536).await, *size);
    }
    let counters = env.emu().counters();
    eprintln!("calls {calls}, counters {counters:?}");
    assert!(
        counters.max_enqueued_tokens <= 700,
        "the budget was exceeded: {counters:?}"
    );
    assert_eq!(counters.enqueued_limit_refusals, 0, "{counters:?}");
    assert_no_chunk_in_two_runs(&env);
    assert_no_duplicate_remote_batch(&env);
    // Nothing left: one more call is a quiet exit 0 that plans nothing.
    let last = sync(&env, &["--json"]).await;
    assert_eq!(last.code, 0, "{last:#?}");
    let json: serde_json::Value = serde_json::from_str(&last.stdout).expect("json");
    assert_eq!(json["totals"]["planned_runs"], 0, "{json}");
    assert_eq!(json["outcome"], "done");
}

#[tokio::test]
async fn a_second_sync_exits_75_naming_the_first() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    family_of(&env, 1, 2).await;
    fs_err::create_dir_all(&env.runs_dir).unwrap();
    let lock = embatch::run::lock::RunLock::acquire_sync(&env.runs_dir, "embatch sync (test)")
        .expect("take the sync lock");
    let run = env.exec(&["sync"]).await;
    assert_eq!(run.code, 75, "{run:#?}");
    assert!(run.stderr.contains("another embatch sync"), "{run:#?}");
    assert!(run.stderr.contains("embatch sync (test)"), "{run:#?}");
    assert!(all_runs(&env).is_empty());
    drop(lock);
    sync_until_done(&env, &[], 5).await;
}

#[tokio::test]
async fn a_failing_family_does_not_stop_the_others() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (good, _) = family_of(&env, 1, 3).await;
    // A family value that the family table does not know: its plan fails.
    env.client
        .batch_execute(
            "ALTER TABLE knowledge_chunks DROP CONSTRAINT knowledge_chunks_equipment_family_id_fkey",
        )
        .await
        .unwrap();
    let stray = Uuid::from_u128(99 << 64);
    env.add_chunks(stray, &["an orphan chunk"]).await;
    let (other, _) = family_of(&env, 2, 4).await;
    let run = env.exec(&["sync"]).await;
    run.assert_error(&format!("family {stray}"));
    assert!(run.stderr.contains("unknown family"), "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, good, 1536).await, 3);
    assert_eq!(count_embedded_exactly(&env, other, 1536).await, 4);
}

#[tokio::test]
async fn max_cost_plans_what_fits_and_the_rest_waits_for_a_later_call() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (small, _) = family_of(&env, 1, 2).await;
    let (big, _) = family_of(&env, 2, 40).await;
    // A price that makes the big family cost more than the bound, the small one less.
    let args = [
        "--price-per-million-tokens",
        "1000",
        "--max-cost",
        "0.1",
        "--json",
    ];
    let first = sync(&env, &args).await;
    assert_eq!(first.code, 75, "{first:#?}");
    assert!(
        first.stderr.contains("over what is left of --max-cost"),
        "{first:#?}"
    );
    assert_eq!(count_embedded_exactly(&env, small, 1536).await, 2);
    assert_eq!(count_embedded_exactly(&env, big, 1536).await, 0);
    let json: serde_json::Value = serde_json::from_str(&first.stdout).expect("json");
    assert_eq!(json["outcome"], "not_yet");
    let big_report = json["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family_id"] == big.to_string())
        .expect("the big family is reported");
    assert_eq!(big_report["status"], "waiting", "{json}");
    assert!(big_report["waits"].is_string(), "{json}");
    // A higher bound later plans it.
    sync_until_done(
        &env,
        &["--price-per-million-tokens", "1000", "--max-cost", "5"],
        5,
    )
    .await;
    assert_eq!(count_embedded_exactly(&env, big, 1536).await, 40);
}

#[tokio::test]
async fn dry_run_writes_nothing_and_says_what_it_would_do() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (a, _) = family_of(&env, 1, 3).await;
    let (b, _) = family_of(&env, 2, 6).await;
    let run = env.exec(&["sync", "--dry-run", "--json"]).await;
    assert_eq!(run.code, 75, "{run:#?}");
    assert!(!env.runs_dir.exists(), "a dry run wrote the runs dir");
    assert_eq!(env.emu().counters().uploads, 0);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["totals"]["planned_chunks"], 9, "{json}");
    let families: BTreeSet<String> = json["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["family_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(families, BTreeSet::from([a.to_string(), b.to_string()]));
    assert!(run.stderr.contains("would plan 6 chunks"), "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, a, 1536).await, 0);
}

/// The sha256 of `content` as `--content-hash-column` holds it in a bytea column.
fn digest(content: &str) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(content.as_bytes()).to_vec()
}

/// Every chunk of the table holds the emulator's vector of its current content and, in
/// `hash_column` (bytea), that content's sha256.
async fn assert_all_current(env: &TestEnv, hash_column: &str) {
    let rows = env
        .client
        .query(
            &format!("SELECT id, content, embedding, {hash_column} FROM knowledge_chunks"),
            &[],
        )
        .await
        .unwrap();
    for row in &rows {
        let id: Uuid = row.get(0);
        let content: String = row.get(1);
        let stored: Option<pgvector::Vector> = row.get(2);
        let stored = stored.unwrap_or_else(|| panic!("chunk {id} has no embedding"));
        crate::harness::assert_emulator_vector(id, stored.as_slice(), &content, 1536);
        let hash: Option<Vec<u8>> = row.get(3);
        assert_eq!(hash, Some(digest(&content)), "chunk {id}: stored hash");
    }
}

#[tokio::test]
async fn edited_chunks_are_embedded_again_with_their_new_content() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ADD COLUMN content_sha256 bytea")
        .await
        .unwrap();
    let (_, a) = family_of(&env, 1, 4).await;
    let (_, b) = family_of(&env, 2, 3).await;
    let args = ["--content-hash-column", "content_sha256"];
    sync_until_done(&env, &args, 5).await;
    assert_all_current(&env, "content_sha256").await;
    // The flag is recorded in run.json, so advance and ingest of the run write the hash.
    for (_, run) in all_runs(&env) {
        assert_eq!(
            run.settings.source.content_hash_column.as_deref(),
            Some("content_sha256")
        );
    }
    // Edits between calls: the next sync embeds exactly those again.
    for id in [a[1], b[2]] {
        env.client
            .execute(
                "UPDATE knowledge_chunks SET content = content || ' (revised)' WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
    }
    let creations = env.emu().counters().batch_creations;
    let run = sync(&env, &["--content-hash-column", "content_sha256", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(json["totals"]["planned_chunks"], 2, "{json}");
    sync_until_done(&env, &args, 5).await;
    assert_all_current(&env, "content_sha256").await;
    assert!(env.emu().counters().batch_creations > creations);
    // Without the flag, edited chunks are not pending (their embedding is not NULL).
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = content || ' again' WHERE id = $1",
            &[&a[0]],
        )
        .await
        .unwrap();
    let plain = sync(&env, &["--json"]).await;
    assert_eq!(plain.code, 0, "{plain:#?}");
}

#[tokio::test]
async fn a_text_hash_column_holds_the_lowercase_hex_and_embed_writes_it_too() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ADD COLUMN h text")
        .await
        .unwrap();
    let (_, ids) = family_of(&env, 1, 3).await;
    sync_until_done(&env, &["--content-hash-column", "h"], 5).await;
    let check = |expect_all: bool| {
        let env = &env;
        async move {
            let rows = env
                .client
                .query("SELECT id, content, h FROM knowledge_chunks", &[])
                .await
                .unwrap();
            for row in rows {
                let id: Uuid = row.get(0);
                let content: String = row.get(1);
                let h: Option<String> = row.get(2);
                if expect_all || h.is_some() {
                    assert_eq!(h, Some(hex::encode(digest(&content))), "chunk {id}");
                }
            }
        }
    };
    check(true).await;
    // `embed` (the realtime path) re-embeds an edited chunk without --overwrite, and writes
    // the new content's hash with its vector.
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = 'rewritten by hand' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let id = ids[0].to_string();
    let embed = env
        .exec(&["embed", "--chunk-id", &id, "--content-hash-column", "h"])
        .await;
    assert_eq!(embed.code, 0, "{embed:#?}");
    check(true).await;
    let stored = env.embedding_of(ids[0]).await.expect("embedded");
    crate::harness::assert_emulator_vector(&id, &stored, "rewritten by hand", 1536);
    // A column of another type is refused at the catalog check.
    let wrong = env
        .exec(&["sync", "--content-hash-column", "embedding"])
        .await;
    wrong.assert_error("must be bytea");
}

/// The nearest neighbour of `content`'s emulator vector in `column` (cosine distance).
async fn nearest(
    client: &tokio_postgres::Client,
    column: &str,
    content: &str,
    dims: usize,
) -> Uuid {
    let probe = pgvector::Vector::from(embatch::emulator::vectors::embedding(content, dims));
    client
        .query_one(
            &format!("SELECT id FROM knowledge_chunks ORDER BY {column} <=> $1 LIMIT 1"),
            &[&probe],
        )
        .await
        .expect("nearest-neighbour query")
        .get(0)
}

#[tokio::test]
async fn a_model_upgrade_fills_a_second_column_while_searches_use_the_first() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_millis(100),
            ..EmulatorConfig::default()
        })
        .await;
    let (f1, _) = family_of(&env, 1, 12).await;
    let (f2, _) = family_of(&env, 2, 7).await;
    sync_until_done(&env, &[], 30).await;
    env.client
        .batch_execute(
            "CREATE INDEX knowledge_chunks_embedding_hnsw ON knowledge_chunks USING hnsw (embedding vector_cosine_ops);
             ALTER TABLE knowledge_chunks ADD COLUMN embedding_next vector(3072);",
        )
        .await
        .unwrap();
    let rows: Vec<(Uuid, String)> = env
        .client
        .query("SELECT id, content FROM knowledge_chunks ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The fill, in its own runs dir, with small batches so that it takes several calls.
    let next_runs = env.dir.path().join("batches-next");
    let next_runs = next_runs.to_str().unwrap().to_owned();
    let fill_args = [
        "sync",
        "--runs-dir",
        next_runs.as_str(),
        "--embedding-column",
        "embedding_next",
        "--model",
        "text-embedding-3-large",
        "--max-requests-per-batch",
        "3",
    ];
    let done = std::sync::atomic::AtomicBool::new(false);
    let fill = async {
        for _ in 0..60 {
            let run = env.exec(&fill_args).await;
            assert!(run.code == 0 || run.code == 75, "{run:#?}");
            if run.code == 0 {
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the fill did not finish");
    };
    let searches = async {
        let mut n = 0usize;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let (id, content) = &rows[n % rows.len()];
            assert_eq!(
                nearest(&env.client, "embedding", content, 1536).await,
                *id,
                "the old column stopped answering during the fill"
            );
            n += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        n
    };
    let ((), n_searches) = tokio::join!(fill, searches);
    assert!(
        n_searches > 5,
        "only {n_searches} searches ran during the fill"
    );
    // The old column is untouched; the new one is full.
    assert_eq!(count_embedded_exactly(&env, f1, 1536).await, 12);
    // Index the new column, then swap the columns in one short transaction.
    env.client
        .batch_execute(
            "CREATE INDEX CONCURRENTLY knowledge_chunks_embedding_next_hnsw ON knowledge_chunks
               USING hnsw ((embedding_next::halfvec(3072)) halfvec_cosine_ops);",
        )
        .await
        .unwrap();
    env.client
        .batch_execute(
            "BEGIN;
             SET LOCAL lock_timeout = '5s';
             ALTER TABLE knowledge_chunks RENAME COLUMN embedding TO embedding_old;
             ALTER TABLE knowledge_chunks RENAME COLUMN embedding_next TO embedding;
             COMMIT;",
        )
        .await
        .unwrap();
    assert_eq!(count_embedded_exactly(&env, f1, 3072).await, 12);
    assert_eq!(count_embedded_exactly(&env, f2, 3072).await, 7);
    for (id, content) in &rows {
        let probe = embatch::emulator::vectors::embedding(content, 3072);
        let found: Uuid = env
            .client
            .query_one(
                "SELECT id FROM knowledge_chunks ORDER BY embedding::halfvec(3072) <=> $1::vector::halfvec(3072) LIMIT 1",
                &[&pgvector::Vector::from(probe)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, *id);
    }
}

/// How one chaos call ended.
#[derive(Debug)]
struct ChaosExit {
    code: Option<i32>,
    stderr: String,
}

/// `embatch sync <args>` as a child, SIGKILLed after `kill_after` if given.
async fn sync_child(
    env: &TestEnv,
    args: &[&str],
    extra_env: &[(&str, String)],
    kill_after: Option<std::time::Duration>,
) -> ChaosExit {
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.arg("sync")
        .args(args)
        // No retries inside the client: a 429 or 5xx ends the call with 75 sooner.
        .env("EMBATCH_API_RETRIES", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in extra_env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("spawn embatch sync");
    if let Some(after) = kill_after
        && tokio::time::timeout(after, child.wait()).await.is_err()
    {
        let _ = child.start_kill();
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("sync hung")
    .expect("wait for sync");
    ChaosExit {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// No chunk is held by two unfinished runs at once.
fn assert_no_chunk_held_twice(env: &TestEnv) {
    let mut holder: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (dir, run) in all_runs(env) {
        if run.is_finished() {
            continue;
        }
        for batch in &run.batches {
            let tsv = embatch::run::layout::batch_dir(&dir, &batch.name)
                .join(embatch::run::layout::CHUNKS_FILE);
            for line in crate::harness::read(&tsv).lines().skip(1) {
                let id = line.split('\t').next().unwrap_or_default().to_owned();
                if let Some(other) = holder.insert(id.clone(), dir.clone()) {
                    assert_eq!(other, dir, "chunk {id} is held by two unfinished runs");
                }
            }
        }
    }
}

/// Four families of different sizes, 24 `sync` calls with SIGKILLs (at random moments and at
/// named crash points) and provider faults (429, 500, expiry, token-limit refusals, the
/// enqueued-token limit) between them, and edits of hashed chunks; then calls without faults
/// until sync says done. Every family ends fully embedded with its current content's vector
/// and hash, no chunk is ever held by two unfinished runs, no remote batch is created twice,
/// and the provider never holds more than the budget.
#[tokio::test]
async fn sync_survives_kills_and_faults_and_keeps_every_promise() {
    use rand::{Rng as _, SeedableRng as _};

    let seed: u64 = std::env::var("EMBATCH_SYNC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(17);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_millis(150),
            seed,
            ..EmulatorConfig::default()
        })
        .await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ADD COLUMN content_sha256 bytea")
        .await
        .unwrap();
    let mut ids: Vec<Uuid> = Vec::new();
    let mut family_ids: Vec<Uuid> = Vec::new();
    for (n_family, size) in [(1u128, 2usize), (2, 9), (3, 33), (4, 90)] {
        let (family, chunk_ids) = family_of(&env, n_family, size).await;
        family_ids.push(family);
        ids.extend(chunk_ids);
    }
    let budget: u64 = 800;
    let budget_text = budget.to_string();
    let args = [
        "--content-hash-column",
        "content_sha256",
        "--max-requests-per-batch",
        "3",
        "--max-enqueued-tokens",
        budget_text.as_str(),
        "--max-attempts",
        "20",
        "--no-progress",
    ];
    const CRASH_POINTS: [&str; 7] = [
        "after_upload",
        "before_create",
        "after_create",
        "after_download",
        "before_save",
        "after_save",
        "ingest_commit",
    ];
    let mut trace: Vec<String> = Vec::new();
    let mut n_edits = 0;
    for call in 0..24 {
        // Faults for this call: each on with some probability.
        let mut faults = Faults::default();
        let mut on = Vec::new();
        if rng.random_bool(0.25) {
            faults.rate_429 = 0.15;
            on.push("429");
        }
        if rng.random_bool(0.25) {
            faults.rate_500 = 0.15;
            on.push("500");
        }
        if rng.random_bool(0.25) {
            faults.expire_after_fraction = Some(0.5);
            on.push("expiry");
        }
        if rng.random_bool(0.2) {
            faults.token_limit_failures = 2;
            on.push("token-limit");
        }
        if rng.random_bool(0.3) {
            // The provider's own limit below the budget: its refusals send batches to queued.
            faults.enqueued_token_limit = Some(budget / 4);
            on.push("enqueued-limit");
        }
        env.emu().set_faults(faults);
        let (extra_env, kill_after, how) = match rng.random_range(0..4) {
            0 => {
                let point = CRASH_POINTS[rng.random_range(0..CRASH_POINTS.len())];
                let nth = rng.random_range(1..4);
                (
                    vec![("EMBATCH_CRASH_AT", format!("{point}:{nth}"))],
                    None,
                    format!("crash at {point}:{nth}"),
                )
            }
            1 => {
                let ms = rng.random_range(20..700);
                (
                    Vec::new(),
                    Some(std::time::Duration::from_millis(ms)),
                    format!("SIGKILL after {ms} ms"),
                )
            }
            _ => (Vec::new(), None, "plain".to_owned()),
        };
        let exit = sync_child(&env, &args, &extra_env, kill_after).await;
        trace.push(format!(
            "call {call}: {how}, faults {on:?} -> {:?}",
            exit.code
        ));
        // 0 and 75 always; 1 only when a fault reached a command that does not wait it out,
        // and then it names the family; a kill has no code.
        match exit.code {
            Some(0 | 75) | None => {}
            Some(1) => assert!(
                exit.stderr.contains("family "),
                "exit 1 without naming a family: {}\n{}",
                exit.stderr,
                trace.join("\n")
            ),
            Some(other) => panic!("exit {other}: {}\n{}", exit.stderr, trace.join("\n")),
        }
        assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
        assert_no_chunk_held_twice(&env);
        // Edits of hashed chunks between calls.
        if rng.random_bool(0.5) {
            for _ in 0..rng.random_range(1..4) {
                let id = ids[rng.random_range(0..ids.len())];
                n_edits += 1;
                env.client
                    .execute(
                        "UPDATE knowledge_chunks SET content = $2 WHERE id = $1",
                        &[
                            &id,
                            &format!("Edit {n_edits}: replace the seal of pump {id}."),
                        ],
                    )
                    .await
                    .unwrap();
            }
        }
        // New chunks arrive between calls too.
        if rng.random_bool(0.3) {
            let family = family_ids[rng.random_range(0..family_ids.len())];
            let id = Uuid::from_u128(family.as_u128() + 10_000 + ids.len() as u128);
            env.client
                .execute(
                    "INSERT INTO knowledge_chunks (id, equipment_family_id, content) VALUES ($1, $2, $3)",
                    &[&id, &family, &format!("New chunk {id}: torque the bolts of flange {id}.")],
                )
                .await
                .unwrap();
            ids.push(id);
        }
        tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..150))).await;
    }
    // Calm: no faults, no kills, until sync says everything is done.
    env.emu().set_faults(Faults::default());
    let mut calm_calls = 0;
    loop {
        calm_calls += 1;
        let exit = sync_child(&env, &args, &[], None).await;
        assert_no_chunk_held_twice(&env);
        match exit.code {
            Some(0) => break,
            Some(75) => {}
            other => panic!(
                "calm call ended {other:?}: {}\n{}",
                exit.stderr,
                trace.join("\n")
            ),
        }
        assert!(
            calm_calls < 300,
            "sync not done after {calm_calls} calm calls:\n{}",
            trace.join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "chaos seed {seed}: 24 calls, {n_edits} edits, {calm_calls} calm calls, counters {:?}\n{}",
        {
            let c = env.emu().counters();
            (
                c.batch_creations,
                c.max_enqueued_tokens,
                c.enqueued_limit_refusals,
                c.injected_errors,
            )
        },
        trace.join("\n")
    );
    assert_all_current(&env, "content_sha256").await;
    assert_no_duplicate_remote_batch(&env);
    let counters = env.emu().counters();
    assert!(
        counters.max_enqueued_tokens <= budget,
        "the provider held {} tokens, over the budget {budget}",
        counters.max_enqueued_tokens
    );
    for (dir, run) in all_runs(&env) {
        assert!(run.is_finished(), "{} is not finished", dir.display());
    }
    assert!(n_edits > 0);
}

#[tokio::test]
async fn chunks_let_go_by_a_run_that_finishes_in_the_call_are_not_reported_done() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    env.client
        .batch_execute("ALTER TABLE knowledge_chunks ADD COLUMN h bytea")
        .await
        .unwrap();
    let (family, ids) = family_of(&env, 1, 4).await;
    // A run whose first batch is ingested and whose second is committed but not recorded.
    let run_dir = env
        .plan(
            family,
            &[
                "--content-hash-column",
                "h",
                "--max-requests-per-batch",
                "2",
            ],
        )
        .run_dir();
    let dir = run_dir.to_str().unwrap();
    let crashed = env
        .exec_env(
            &["advance", "--run-dir", dir],
            &[("EMBATCH_CRASH_AT", "ingest_commit:2")],
        )
        .await;
    assert!(crashed.killed(), "{crashed:#?}");
    // A chunk of the ingested batch is edited: pending again, but held by that run.
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = 'a new text' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let first = sync(&env, &["--content-hash-column", "h"]).await;
    assert_eq!(
        first.code, 75,
        "the edited chunk is still pending: {first:#?}"
    );
    assert!(
        first.stderr.contains("let go of chunks it held"),
        "{first:#?}"
    );
    sync_until_done(&env, &["--content-hash-column", "h"], 5).await;
    assert_all_current(&env, "h").await;
}

#[tokio::test]
async fn runs_take_turns_so_a_huge_family_does_not_starve_a_small_one() {
    // Batches stay in flight for the whole test.
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_secs(30),
            ..EmulatorConfig::default()
        })
        .await;
    let (huge, _) = family_of(&env, 1, 40).await;
    let (small, _) = family_of(&env, 2, 3).await;
    // The huge family's run is the older one, with many batches waiting.
    let huge_run = env.plan(huge, &["--max-requests-per-batch", "3"]).run_dir();
    // Room for about two batches of three requests (~150 estimated tokens each).
    let run = sync(
        &env,
        &[
            "--max-requests-per-batch",
            "3",
            "--max-enqueued-tokens",
            "330",
        ],
    )
    .await;
    assert_eq!(run.code, 75, "{run:#?}");
    let submitted = |dir: &std::path::Path| {
        embatch::run::store::load(dir)
            .unwrap()
            .count_in(embatch::run::state::StateKind::Submitted)
    };
    let small_run = all_runs(&env)
        .into_iter()
        .find(|(_, r)| r.family_id == small.to_string())
        .expect("the small family was planned")
        .0;
    assert_eq!(submitted(&huge_run), 1, "the older run took its turn");
    assert_eq!(
        submitted(&small_run),
        1,
        "the small family got its turn in the same call"
    );
}

#[tokio::test]
async fn family_id_restricts_and_families_sql_finds_families_through_joins() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (a, _) = family_of(&env, 1, 3).await;
    let (b, _) = family_of(&env, 2, 4).await;
    let (c, _) = family_of(&env, 3, 2).await;
    // --family-id (repeatable, any spelling Postgres reads): only those families.
    let upper_b = b.to_string().to_uppercase();
    let a_text = a.to_string();
    let run = sync(
        &env,
        &["--family-id", &a_text, "--family-id", &upper_b, "--json"],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, a, 1536).await, 3);
    assert_eq!(count_embedded_exactly(&env, b, 1536).await, 4);
    assert_eq!(count_embedded_exactly(&env, c, 1536).await, 0);
    // A schema where chunks reach their family through a join: --scope-sql and --families-sql.
    env.client
        .batch_execute(
            "CREATE TABLE documents (id int PRIMARY KEY, family uuid NOT NULL);
             INSERT INTO documents VALUES (1, '00000000-0000-0003-0000-000000000000');
             ALTER TABLE knowledge_chunks ADD COLUMN document_id int;
             UPDATE knowledge_chunks SET document_id = 1 WHERE equipment_family_id = '00000000-0000-0003-0000-000000000000';",
        )
        .await
        .unwrap();
    let scope = "SELECT k.id FROM knowledge_chunks k JOIN documents d ON d.id = k.document_id WHERE d.family = $1";
    let without = env.exec(&["sync", "--scope-sql", scope]).await;
    assert_eq!(without.code, 2, "{without:#?}");
    assert!(without.stderr.contains("--families-sql"), "{without:#?}");
    let run = sync(
        &env,
        &[
            "--scope-sql",
            scope,
            "--families-sql",
            "SELECT DISTINCT family FROM documents",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(count_embedded_exactly(&env, c, 1536).await, 2);
}

#[tokio::test]
async fn sync_wait_serves_every_family_in_one_call_and_max_cost_bounds_the_whole_call() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            // Long enough that the first pass ends with batches in flight, and others follow.
            stage_duration: std::time::Duration::from_millis(1000),
            ..EmulatorConfig::default()
        })
        .await;
    let (first, _) = family_of(&env, 1, 10).await;
    let (second, _) = family_of(&env, 2, 5).await;
    let priced = [
        "--price-per-million-tokens",
        "1000",
        "--max-requests-per-batch",
        "2",
        "--max-enqueued-tokens",
        "300",
        "--wait",
        "--poll-seconds",
        "1",
    ];
    // What each family's plan would cost.
    let dry = env
        .exec(&[
            "sync",
            "--dry-run",
            "--json",
            "--price-per-million-tokens",
            "1000",
        ])
        .await;
    let dry: serde_json::Value = serde_json::from_str(&dry.stdout).expect("json");
    let cost = |family: Uuid| {
        dry["families"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["family_id"] == family.to_string())
            .and_then(|f| f["planned"]["estimated_cost_usd"].as_f64())
            .expect("a cost")
    };
    // The first family's plan takes most of --max-cost; the second's no longer fits, though
    // alone it would. Every pass of the one call counts against the same bound, so no later
    // pass plans it.
    let max_cost = format!("{:.6}", cost(first) + cost(second) / 2.0);
    let mut args = priced.to_vec();
    args.extend(["--max-cost", max_cost.as_str(), "--json"]);
    let bounded = env.exec(&[&["sync"], args.as_slice()].concat()).await;
    assert_eq!(bounded.code, 75, "{bounded:#?}");
    assert_eq!(count_embedded_exactly(&env, first, 1536).await, 10);
    assert_eq!(count_embedded_exactly(&env, second, 1536).await, 0);
    let json: serde_json::Value = serde_json::from_str(&bounded.stdout).expect("json");
    assert_eq!(json["outcome"], "not_yet", "{json}");
    assert_eq!(json["totals"]["planned_runs"], 1, "{json}");
    assert!(
        bounded.stderr.contains("over what is left of --max-cost"),
        "{bounded:#?}"
    );
    // Without the bound, one call serves what is left to the end: exit 0.
    let done = env.exec(&[&["sync"], &priced[..]].concat()).await;
    assert_eq!(done.code, 0, "{done:#?}");
    assert_eq!(count_embedded_exactly(&env, second, 1536).await, 5);
    let counters = env.emu().counters();
    assert!(counters.max_enqueued_tokens <= 300, "{counters:?}");
    assert_no_chunk_in_two_runs(&env);
    assert_no_duplicate_remote_batch(&env);
    // --wait is a loop, --dry-run writes nothing: not both; --poll-seconds needs --wait.
    let both = env.exec(&["sync", "--wait", "--dry-run"]).await;
    assert_eq!(both.code, 2, "{both:#?}");
    let alone = env.exec(&["sync", "--poll-seconds", "5"]).await;
    assert_eq!(alone.code, 2, "{alone:#?}");
}

/// Waits (at most 30 s) until every batch of some run under the runs dir is submitted.
async fn until_a_run_is_submitted(env: &TestEnv) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !all_runs(env).iter().any(|(_, run)| {
        run.batches
            .iter()
            .all(|b| b.state.kind() == embatch::run::state::StateKind::Submitted)
    }) {
        assert!(std::time::Instant::now() < deadline, "never submitted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ctrl_c_stops_sync_wait_and_says_how_to_go_on() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_secs(60),
            ..EmulatorConfig::default()
        })
        .await;
    let (family, _) = family_of(&env, 1, 3).await;
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.args(["sync", "--wait", "--poll-seconds", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn embatch");
    let pid = child.id().expect("running");
    // Until its run is submitted: the call is then sleeping between passes.
    until_a_run_is_submitted(&env).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // A second sync meanwhile: the first holds the sync lock.
    let second = env.exec(&["sync"]).await;
    assert_eq!(second.code, 75, "{second:#?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("sync stops soon after the signal")
        .expect("wait for embatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr
            .contains("interrupted by SIGINT; every run is saved, go on with: embatch sync --wait"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing lost: the one run is there with every batch submitted once.
    let runs = all_runs(&env);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1.family_id, family.to_string());
    assert!(
        runs[0]
            .1
            .batches
            .iter()
            .all(|b| b.state.kind() == embatch::run::state::StateKind::Submitted)
    );
    assert_no_duplicate_remote_batch(&env);
}

/// A TCP port forwarded to the test Postgres's unix socket, that can be cut (every connection
/// closed, new ones closed at once) and restored.
async fn cuttable_database(
    env: &TestEnv,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::Ordering::SeqCst;
    let field = |key: &str| {
        env.db_url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .expect("a key=value DATABASE_URL")
            .to_owned()
    };
    let socket = PathBuf::from(field("host")).join(format!(".s.PGSQL.{}", field("port")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = up.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            if !flag.load(SeqCst) {
                continue;
            }
            let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await else {
                continue;
            };
            let flag = flag.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix) => {}
                    () = async {
                        while flag.load(SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    } => {}
                }
            });
        }
    });
    let url = format!(
        "host=127.0.0.1 port={port} user={} dbname={}",
        field("user"),
        field("dbname")
    );
    (url, up)
}

#[tokio::test]
async fn sync_wait_rides_out_a_database_that_goes_away_between_passes() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: std::time::Duration::from_millis(1500),
            ..EmulatorConfig::default()
        })
        .await;
    let (family, _) = family_of(&env, 1, 4).await;
    let (url, up) = cuttable_database(&env).await;
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.env("DATABASE_URL", &url)
        .args(["sync", "--wait", "--poll-seconds", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn embatch");
    // The first pass reached the database and submitted the run; then the database goes away
    // for a few passes.
    until_a_run_is_submitted(&env).await;
    up.store(false, SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    up.store(true, SeqCst);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sync ends once the work is done")
        .expect("wait for embatch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("every run is saved, trying again in 1s"),
        "{stderr}"
    );
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 4);
    assert_no_duplicate_remote_batch(&env);
}
