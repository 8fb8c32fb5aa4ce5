//! `plan` and `submit --dry-run` against a real Postgres: the run folder, the limits, the
//! source flags and every bad input of the foundation issue.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use embatch::run::store;
use serde_json::Value;
use uuid::Uuid;

use crate::harness::{TestEnv, read, snapshot_settings, walk};

fn jsonl(path: &Path) -> Vec<Value> {
    read(path)
        .lines()
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

fn tsv_rows(path: &Path) -> Vec<Vec<String>> {
    read(path)
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[tokio::test]
async fn plan_writes_the_run_folder_and_skips_what_cannot_be_sent() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let other = env.add_family(2).await;
    let too_long = "word ".repeat(9000);
    let ids = env
        .add_chunks(
            family,
            &[
                "Hydraulic pump: check the oil level weekly.",
                "",
                "   \n\t ",
                &too_long,
                "Replace the filter cartridge every 500 hours.\nUse gloves.",
            ],
        )
        .await;
    env.add_chunks(other, &["another family's chunk"]).await;
    // An already embedded chunk is not pending.
    env.client
        .execute(
            "INSERT INTO knowledge_chunks VALUES ($1, $2, 'done', array_fill(0.5, ARRAY[1536])::vector)",
            &[&Uuid::from_u128(family.as_u128() + 99), &family],
        )
        .await
        .unwrap();

    let run = env.plan(family, &[]);
    let run_dir = run.run_dir();
    assert!(run_dir.starts_with(&env.runs_dir));
    assert!(run.stderr.contains("2 chunks to embed"), "{run:#?}");
    assert!(run.stderr.contains("skipped 3 chunks"), "{run:#?}");
    assert!(run.stderr.contains("empty: 2"), "{run:#?}");
    assert!(run.stderr.contains("too_long: 1"), "{run:#?}");
    assert!(run.stderr.contains("estimated cost $"), "{run:#?}");

    let folder = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(folder.starts_with("run_"), "{folder}");
    assert_eq!(
        run_dir.parent().unwrap(),
        env.runs_dir.join(family.to_string())
    );

    let batch = run_dir.join("batches/batch_001");
    let lines = jsonl(&batch.join("input.jsonl"));
    let custom_ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(custom_ids, [ids[0].to_string(), ids[4].to_string()]);
    assert_eq!(
        lines[1]["body"]["input"],
        "Replace the filter cartridge every 500 hours.\nUse gloves."
    );

    // chunks.tsv hashes are what Postgres computes for the same content.
    let chunks = tsv_rows(&batch.join("chunks.tsv"));
    assert_eq!(chunks.len(), 2);
    for row in &chunks {
        let id: Uuid = row[0].parse().unwrap();
        let db_hash: String = env
            .client
            .query_one(
                "SELECT encode(sha256(convert_to(content, 'UTF8')), 'hex') FROM knowledge_chunks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(row[1], db_hash);
        assert_eq!(
            row[2].parse::<usize>().unwrap(),
            embatch::plan::tokens::count_tokens(
                lines.iter().find(|l| l["custom_id"] == row[0]).unwrap()["body"]["input"]
                    .as_str()
                    .unwrap()
            )
        );
    }

    let skipped = tsv_rows(&run_dir.join("skipped.tsv"));
    let reasons: HashMap<String, String> = skipped
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    assert_eq!(reasons[&ids[1].to_string()], "empty");
    assert_eq!(reasons[&ids[2].to_string()], "empty");
    assert_eq!(reasons[&ids[3].to_string()], "too_long");

    let saved = store::load(&run_dir).unwrap();
    assert_eq!(saved.family_id, family.to_string());
    assert_eq!(saved.plan.chunks, 2);
    assert_eq!(saved.plan.skipped, 3);
    assert_eq!(saved.batches.len(), 1);
    assert_eq!(saved.batches[0].requests, 2);
    assert_eq!(
        saved.batches[0].bytes,
        fs_err::metadata(batch.join("input.jsonl")).unwrap().len()
    );
    assert_eq!(saved.settings.source.id_type.as_str(), "uuid");
    assert_eq!(saved.settings.dimensions, 1536);
    assert!(!saved.settings.send_dimensions);
    assert!(saved.database.system_identifier.is_some());
    assert!(!saved.database.database.is_empty());

    // Owner-only: folders 0700, files 0600.
    for entry in walk(&run_dir) {
        let mode = fs_err::metadata(&entry).unwrap().permissions().mode() & 0o777;
        let want = if entry.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", entry.display());
    }
    // Nothing partial left behind.
    assert_eq!(env.run_folders(), [run_dir]);
}

#[tokio::test]
async fn nothing_pending_is_not_an_error_and_creates_no_run() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let run = env.plan(family, &[]);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(run.stderr.contains("nothing to embed"), "{run:#?}");
    assert!(env.run_folders().is_empty(), "{:?}", env.run_folders());
}

#[tokio::test]
async fn bad_input_gets_one_clear_line_and_leaves_no_run_folder() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(family, &["some text"]).await;
    env.client
        .batch_execute(
            "CREATE TABLE wrong_type (id uuid PRIMARY KEY, equipment_family_id uuid, content text, embedding real[]);
             CREATE TABLE no_dims (id uuid PRIMARY KEY, equipment_family_id uuid, content text, embedding vector);
             CREATE TABLE y (id int);",
        )
        .await
        .unwrap();
    let unknown = Uuid::from_u128(42);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--family-id".into(), unknown.to_string()],
            "unknown family",
        ),
        (
            vec!["--family-id".into(), "not-a-uuid".into()],
            "not a valid uuid",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--table".into(),
                "missing".into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--text-column".into(),
                "body".into(),
            ],
            "has no column \"body\"",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--table".into(),
                "wrong_type".into(),
            ],
            "not a pgvector vector(N)",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--table".into(),
                "no_dims".into(),
            ],
            "without a declared dimension",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--dimensions".into(),
                "512".into(),
            ],
            "disagrees with the column",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--model".into(),
                "text-embedding-ada-002".into(),
                "--dimensions".into(),
                "1536".into(),
                "--table".into(),
                "no_dims".into(),
            ],
            "without a declared dimension",
        ),
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--family-table".into(),
                "nope".into(),
            ],
            "--family-table",
        ),
        // Hostile identifiers are quoted, never pasted.
        (
            vec![
                "--family-id".into(),
                family.to_string(),
                "--table".into(),
                "x\"; DROP TABLE y; --".into(),
            ],
            "does not exist",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["plan".to_owned()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let run = env.run(&refs);
        run.assert_error(needle);
        assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:#?}");
        assert!(env.run_folders().is_empty(), "{:?} left a folder", refs);
    }
    let y_exists: bool = env
        .client
        .query_one("SELECT to_regclass('y') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(y_exists, "table y was dropped");

    // An unreachable database names it, without the password.
    let run = env
        .command()
        .env(
            "DATABASE_URL",
            "postgres://someone:s3cr3t-pw@127.0.0.1:1/db",
        )
        .args(["plan", "--family-id", &family.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-pw"), "{stderr}");

    // No database at all.
    let run = env
        .command()
        .env_remove("DATABASE_URL")
        .args(["plan", "--family-id", &family.to_string()])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("DATABASE_URL"));

    // A runs dir that cannot be written.
    let blocker = env.dir.path().join("file-not-dir");
    fs_err::write(&blocker, "x").unwrap();
    let run = env
        .command()
        .env("EMBATCH_RUNS_DIR", &blocker)
        .args(["plan", "--family-id", &family.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the runs dir"), "{stderr}");

    // A usage error exits 2.
    let run = env.run(&["plan"]);
    assert_eq!(run.code, 2, "{run:#?}");
}

#[tokio::test]
async fn reembed_and_unfinished_runs_decide_what_is_pending() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let ids = env.add_chunks(family, &["one", "two", "three"]).await;
    env.client
        .execute(
            "UPDATE knowledge_chunks SET embedding = array_fill(0.1, ARRAY[1536])::vector WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();

    let first = env.plan(family, &["--limit", "1"]);
    let first_dir = first.run_dir();
    let first_run = store::load(&first_dir).unwrap();
    assert_eq!(first_run.plan.chunks, 1, "--limit 1");

    // The unfinished first run holds "two": a second plan takes only "three".
    let second = env.plan(family, &[]);
    let second_dir = second.run_dir();
    assert!(
        second
            .stderr
            .contains("left out 1 chunks held by the unfinished run"),
        "{second:#?}"
    );
    assert!(
        second.stderr.contains(first_dir.to_str().unwrap()),
        "{second:#?}"
    );
    let lines = jsonl(&second_dir.join("batches/batch_001/input.jsonl"));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["custom_id"], ids[2].to_string());

    // --force takes held chunks anyway; --reembed takes the embedded one too.
    let forced = env.plan(family, &["--force", "--reembed"]);
    let lines = jsonl(&forced.run_dir().join("batches/batch_001/input.jsonl"));
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        [ids[0].to_string(), ids[1].to_string(), ids[2].to_string()]
    );
    assert!(store::load(&forced.run_dir()).unwrap().settings.reembed);

    // Everything held now, by runs planned but never submitted: not a silent exit 0, but the
    // commands that submit them.
    let none = env.plan(family, &[]);
    none.assert_error("planned but not submitted yet");
    assert!(
        none.stderr.contains("embatch advance --run-dir "),
        "{none:#?}"
    );
}

#[tokio::test]
async fn sharding_obeys_every_limit_in_id_order() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..57)
        .map(|i| {
            format!(
                "Chunk {i}: {}",
                "pressure valve maintenance ".repeat(i % 7 + 1)
            )
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = env.add_chunks(family, &refs).await;
    let run = env.plan(
        family,
        &[
            "--max-requests-per-batch",
            "10",
            "--max-bytes-per-batch",
            "2000",
            "--max-tokens-per-batch",
            "300",
        ],
    );
    let run_dir = run.run_dir();
    let saved = store::load(&run_dir).unwrap();
    assert!(saved.batches.len() >= 6, "{}", saved.batches.len());
    let mut seen = Vec::new();
    for (idx, batch) in saved.batches.iter().enumerate() {
        assert_eq!(batch.name, format!("batch_{:03}", idx + 1));
        let dir = run_dir.join("batches").join(&batch.name);
        let input = read(dir.join("input.jsonl"));
        assert_eq!(input.len() as u64, batch.bytes);
        assert!(
            batch.bytes <= 2000 && batch.requests <= 10 && batch.tokens <= 300,
            "{batch:?}"
        );
        let chunks = tsv_rows(&dir.join("chunks.tsv"));
        assert_eq!(chunks.len() as u64, batch.requests);
        let tokens: u64 = chunks.iter().map(|r| r[2].parse::<u64>().unwrap()).sum();
        assert_eq!(tokens, batch.tokens);
        seen.extend(chunks.into_iter().map(|r| r[0].clone()));
    }
    let want: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(seen, want, "every chunk exactly once, in id order");
}

/// Every chunk of a batch file, in file order: (ids of `chunks.tsv`, custom ids of
/// `input.jsonl`), both checked to agree.
fn planned_ids(run_dir: &Path) -> Vec<String> {
    let saved = store::load(run_dir).unwrap();
    let mut ids = Vec::new();
    for batch in &saved.batches {
        let dir = run_dir.join("batches").join(&batch.name);
        let from_tsv: Vec<String> = tsv_rows(&dir.join("chunks.tsv"))
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let from_jsonl: Vec<String> = jsonl(&dir.join("input.jsonl"))
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(from_tsv, from_jsonl, "{}", batch.name);
        ids.extend(from_tsv);
    }
    ids
}

/// A chunk left out in the middle of the family (held by another run, or too large for any
/// batch) must not take the chunks after it along: the writer gathers consecutive rows of a
/// round and writes them at once, and a row left out breaks that run.
#[tokio::test]
async fn chunks_left_out_in_the_middle_keep_every_other_chunk() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let mut texts: Vec<String> = (0..12).map(|i| format!("valve note {i}")).collect();
    texts[8] = "a very long chunk ".repeat(200);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids: Vec<String> = env
        .add_chunks(family, &refs)
        .await
        .iter()
        .map(Uuid::to_string)
        .collect();

    // An unfinished run holds chunk 4 only.
    let scope = format!(
        "SELECT id FROM knowledge_chunks WHERE equipment_family_id = $1 AND id = '{}'::uuid",
        ids[4]
    );
    let holder = env.plan(family, &["--scope-sql", &scope]);
    assert_eq!(planned_ids(&holder.run_dir()), [ids[4].clone()]);

    // Chunk 8 is larger than a batch may be; chunk 4 is held: every other one is planned,
    // in id order.
    let run = env.plan(family, &["--max-bytes-per-batch", "2000"]);
    assert!(
        run.stderr
            .contains("left out 1 chunks held by the unfinished run"),
        "{run:#?}"
    );
    let run_dir = run.run_dir();
    let want: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 4 && *i != 8)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(planned_ids(&run_dir), want);
    let skipped = tsv_rows(&run_dir.join("skipped.tsv"));
    assert_eq!(
        skipped,
        [vec![ids[8].clone(), "too_large_for_batch".to_owned()]]
    );
}

#[tokio::test]
async fn on_too_long_truncate_and_fail() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let long = "déjà vu ".repeat(5000);
    env.add_chunks(family, &[&long, "short"]).await;

    let run = env.plan(family, &["--on-too-long", "fail"]);
    run.assert_error("over the model's limit of 8191");
    assert!(env.run_folders().is_empty());

    let run = env.plan(family, &["--on-too-long", "truncate"]);
    assert!(run.stderr.contains("truncated 1 chunk to"), "{run:#?}");
    let lines = jsonl(&run.run_dir().join("batches/batch_001/input.jsonl"));
    let input = lines[0]["body"]["input"].as_str().unwrap();
    assert!(long.starts_with(input));
    let n = embatch::plan::tokens::count_tokens(input);
    assert!(n <= 8191 && n > 8000, "{n}");
}

#[tokio::test]
async fn max_cost_refuses_an_expensive_plan() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(family, &["a few tokens of text"]).await;
    let run = env.plan(family, &["--max-cost", "0"]);
    run.assert_error("over --max-cost");
    assert!(env.run_folders().is_empty());
    env.plan(family, &["--max-cost", "1"]).run_dir();
}

#[tokio::test]
async fn custom_schemas_text_and_bigint_ids_and_scope_sql() {
    let env = TestEnv::empty().await;
    env.client
        .batch_execute(
            "CREATE SCHEMA kb;
             CREATE TABLE kb.docs (doc_id text PRIMARY KEY, body text, vec vector(256), fam text);
             INSERT INTO kb.docs VALUES ('b', 'second', NULL, 'f'), ('B', 'upper', NULL, 'f'), ('a', 'first', NULL, 'f'), ('z', 'other', NULL, 'g');
             CREATE TABLE parts (pid bigint PRIMARY KEY, txt text, e vector(256), model_id int);
             CREATE TABLE models (id int PRIMARY KEY, family_id int);
             INSERT INTO models VALUES (1, 7), (2, 8);
             INSERT INTO parts VALUES (10, 'ten', NULL, 1), (9, 'nine', NULL, 1), (100, 'hundred', NULL, 2);",
        )
        .await
        .unwrap();
    let run = env.run(&[
        "plan",
        "--family-id",
        "f",
        "--table",
        "kb.docs",
        "--id-column",
        "doc_id",
        "--text-column",
        "body",
        "--embedding-column",
        "vec",
        "--family-column",
        "fam",
        "--family-table",
        "none",
    ]);
    let dir = run.run_dir();
    let lines = jsonl(&dir.join("batches/batch_001/input.jsonl"));
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ["B", "a", "b"],
        "text ids in byte order (COLLATE \"C\")"
    );
    assert_eq!(lines[0]["body"]["dimensions"], 256);
    assert_eq!(
        store::load(&dir).unwrap().settings.source.id_type.as_str(),
        "text"
    );

    let scope =
        "SELECT p.pid FROM parts p JOIN models m ON m.id = p.model_id WHERE m.family_id = $1";
    let run = env.run(&[
        "plan",
        "--family-id",
        "7",
        "--table",
        "parts",
        "--id-column",
        "pid",
        "--text-column",
        "txt",
        "--embedding-column",
        "e",
        "--family-table",
        "none",
        "--scope-sql",
        scope,
    ]);
    let lines = jsonl(&run.run_dir().join("batches/batch_001/input.jsonl"));
    let got: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ["9", "10"],
        "bigint ids in numeric order, only family 7"
    );

    // --scope-sql runs read-only: a query that tries to write fails and changes nothing.
    // Through a function: a data-modifying WITH inside a subquery is refused even outside a
    // read-only transaction, so it would prove nothing.
    env.client
        .batch_execute(
            "CREATE FUNCTION gone(fam int) RETURNS SETOF bigint LANGUAGE sql AS $$ DELETE FROM parts RETURNING pid $$",
        )
        .await
        .unwrap();
    let evil = "SELECT * FROM gone($1)";
    let run = env.run(&[
        "plan",
        "--family-id",
        "8",
        "--table",
        "parts",
        "--id-column",
        "pid",
        "--text-column",
        "txt",
        "--embedding-column",
        "e",
        "--family-table",
        "none",
        "--scope-sql",
        evil,
    ]);
    run.assert_error("read-only");
    let count: i64 = env
        .client
        .query_one("SELECT count(*) FROM parts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
}

#[tokio::test]
async fn submit_dry_run_writes_files_only() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(family, &["alpha", "beta"]).await;
    let run = env.run(&["submit", "--family-id", &family.to_string(), "--dry-run"]);
    let dir = run.run_dir();
    assert!(run.stderr.contains("dry run"), "{run:#?}");
    let saved = store::load(&dir).unwrap();
    assert!(
        saved
            .batches
            .iter()
            .all(|b| b.state.kind() == embatch::run::state::StateKind::Planned)
    );
}

#[tokio::test]
async fn request_lines_snapshot() {
    let env = TestEnv::empty().await;
    env.client
        .batch_execute(
            "CREATE TABLE c (id bigint PRIMARY KEY, fam int, content text, embedding vector(1536), small vector(256));
             INSERT INTO c VALUES (1, 1, 'Torque the bolts to 40 N·m.', NULL, NULL), (2, 1, 'Line one\nline \"two\"', NULL, NULL);",
        )
        .await
        .unwrap();
    let common = [
        "plan",
        "--family-id",
        "1",
        "--table",
        "c",
        "--family-column",
        "fam",
        "--family-table",
        "none",
        "--force",
    ];
    let read_input =
        |run: crate::harness::Run| read(run.run_dir().join("batches/batch_001/input.jsonl"));
    let float = read_input(env.run(&common));
    let base64 = read_input(env.run(&[&common[..], &["--encoding-format", "base64"]].concat()));
    let dims = read_input(env.run(&[&common[..], &["--embedding-column", "small"]].concat()));
    snapshot_settings().bind(|| {
        insta::assert_snapshot!("request_lines_float", float);
        insta::assert_snapshot!("request_lines_base64", base64);
        insta::assert_snapshot!("request_lines_dimensions", dims);
    });
}

/// Plan of 200,000 chunks (~160 MB of text) keeps the process under 64 MiB resident.
#[tokio::test]
async fn plan_memory_stays_flat_on_a_large_family() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
             SELECT gen_random_uuid(), $1,
                    repeat('Inspect the hydraulic hose number ' || g || ' for cracks and leaks. ', 12)
             FROM generate_series(1, 200000) AS g",
            &[&family],
        )
        .await
        .unwrap();
    let mut cmd = env.command();
    cmd.args(["plan", "--family-id", &family.to_string(), "--no-progress"]);
    let (status, max_rss_kib) = run_with_peak_rss(cmd);
    assert_eq!(status, 0);
    let run_dir = env.run_folders().pop().unwrap();
    let saved = store::load(&run_dir).unwrap();
    assert_eq!(saved.plan.chunks, 200_000);
    for batch in &saved.batches {
        assert!(
            batch.requests <= 50_000 && batch.bytes <= 188_743_680,
            "{batch:?}"
        );
    }
    // A real process holds a few MiB: 0 would mean the sampling measured nothing.
    assert!(
        max_rss_kib > 1024,
        "no peak RSS measured ({max_rss_kib} KiB)"
    );
    assert!(max_rss_kib < 64 * 1024, "peak RSS {max_rss_kib} KiB");
    eprintln!(
        "plan of 200,000 chunks: peak RSS {} KiB, {} batches",
        max_rss_kib,
        saved.batches.len()
    );
}

/// Runs `cmd` and returns its exit code and its peak resident memory in KiB
/// (see [`embatch::testkit::measure::wait_with_peak_rss`]).
pub fn run_with_peak_rss(mut cmd: std::process::Command) -> (i32, u64) {
    let mut child = cmd.spawn().expect("start embatch");
    let (exit, peak_kib) =
        embatch::testkit::measure::wait_with_peak_rss(&mut child).expect("wait for embatch");
    (exit.code().unwrap_or(-1), peak_kib)
}
