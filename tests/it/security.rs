//! Secrets, privacy and hostile input (issue 6, items 3 and 4): the API key and the database
//! password never reach a file, a log line or `--json`; run folders are the owner's only;
//! identifiers from flags are quoted end to end; `--scope-sql` cannot change data; output
//! lines with hostile fields neither panic nor write a chunk outside the batch.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use embatch::emulator::{EmulatorConfig, Faults};
use embatch::run::store;
use embatch::testkit::pgtemp::ThrowawayPostgres;
use uuid::Uuid;

use crate::harness::{Run, TestEnv, count_embedded_exactly, family_of, walk};

/// Everything one scenario printed, to grep for secrets at the end.
#[derive(Default)]
struct Captured(Vec<(String, Run)>);

impl Captured {
    fn keep(&mut self, what: &str, run: Run) -> &Run {
        self.0.push((what.to_owned(), run));
        &self.0.last().expect("just pushed").1
    }

    /// Asserts that no captured output and no file under `dir` contains any of `secrets`.
    fn assert_nowhere(&self, dir: &Path, secrets: &[&str]) {
        for (what, run) in &self.0 {
            for secret in secrets {
                assert!(
                    !run.stdout.contains(secret) && !run.stderr.contains(secret),
                    "{what} printed a secret: {run:#?}"
                );
            }
        }
        for path in walk(dir) {
            if path.is_dir() {
                continue;
            }
            let bytes = fs_err::read(&path).unwrap();
            for secret in secrets {
                let found = bytes
                    .windows(secret.len())
                    .any(|window| window == secret.as_bytes());
                assert!(!found, "{} holds a secret", path.display());
            }
        }
    }
}

/// A command that must fail: what it is, its arguments, extra environment, a part of its
/// message.
type Failure<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, String)>, &'a str);

/// A distinctive secret: nothing else in a run could contain it by chance.
fn secret(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

/// A test env whose binary talks to the emulator with a distinctive API key and to the
/// database as a role with a distinctive password that the server really checks.
async fn env_with_secrets(api_key: &str, password: &str, faults: Faults) -> TestEnv {
    let mut env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            api_key: api_key.to_owned(),
            ..EmulatorConfig::default()
        })
        .await;
    env.emu().set_faults(faults);
    let pg = ThrowawayPostgres::shared().unwrap();
    env.db_url = pg
        .create_password_role(&env.db_url, password)
        .await
        .expect("create a role with a password");
    env
}

/// Plan and advance a family until finished, with a failing request (so an error file, a
/// failure report and retry batches appear), a chunk deleted before its retry (so
/// `retry_skipped.tsv` appears) and an empty chunk (`skipped.tsv`). Every output is kept.
async fn full_cycle(env: &TestEnv, captured: &mut Captured) -> PathBuf {
    let (family, ids) = family_of(env, 1, 6).await;
    env.client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content) VALUES ($1, $2, '')",
            &[&Uuid::from_u128(family.as_u128() + 50), &family],
        )
        .await
        .unwrap();
    env.emu().set_faults(Faults {
        fail_custom_ids: vec![ids[0].to_string(), ids[1].to_string()],
        ..Faults::default()
    });
    let plan = captured.keep("plan -v", env.plan(family, &["-v"]));
    let run_dir = plan.run_dir();
    let dir = run_dir.to_str().unwrap().to_owned();
    // Deleted before its retry is planned: the retry cannot send it again.
    env.client
        .execute("DELETE FROM knowledge_chunks WHERE id = $1", &[&ids[1]])
        .await
        .unwrap();
    captured.keep(
        "status --json (planned)",
        env.exec(&["status", "--run-dir", &dir, "--json"]).await,
    );
    let mut finished = false;
    for round in 0..6 {
        let run = env.exec(&["advance", "--run-dir", &dir, "-v"]).await;
        let code = run.code;
        captured.keep(&format!("advance #{round}"), run);
        assert!(code == 0 || code == 75, "advance #{round} exited {code}");
        if code == 0 {
            finished = true;
            break;
        }
    }
    assert!(finished, "the run did not finish");
    for args in [
        vec!["status", "--run-dir", &dir],
        vec!["status", "--run-dir", &dir, "--json"],
        vec!["status", "--run-dir", &dir, "--refresh", "-v"],
        vec!["runs"],
        vec!["runs", "--json"],
    ] {
        let run = env.exec(&args).await;
        assert_eq!(run.code, 0, "{args:?}: {run:#?}");
        captured.keep(&args.join(" "), run);
    }
    assert_eq!(count_embedded_exactly(env, family, 1536).await, 4);
    run_dir
}

#[tokio::test]
async fn the_api_key_and_the_database_password_reach_no_file_and_no_output() {
    let api_key = secret("sk-secret-");
    let password = secret("pw-secret-");
    let env = env_with_secrets(&api_key, &password, Faults::default()).await;
    let mut captured = Captured::default();

    // The role really needs its password: without it the login is refused.
    let without = env.db_url.replace(&format!("password={password}"), "");
    assert_ne!(without, env.db_url);
    let (family, _) = family_of(&env, 7, 2).await;
    let family = family.to_string();
    let run = env
        .exec_env(
            &["plan", "--family-id", &family],
            &[("DATABASE_URL", &without)],
        )
        .await;
    let run = captured.keep("plan without the password", run);
    run.assert_error("refused the login");

    full_cycle(&env, &mut captured).await;

    let second = captured.keep("plan family 7", env.plan(family.parse().unwrap(), &[]));
    let second_dir = second.run_dir();
    let second_dir = second_dir.to_str().unwrap().to_owned();
    // Failures that involve the secrets.
    let wrong_key = secret("sk-wrong-");
    let wrong_password = secret("pw-wrong-");
    let dir = second_dir.as_str();
    let failures: Vec<Failure> = vec![
        (
            "wrong api key",
            vec!["advance", "--run-dir", dir],
            vec![("OPENAI_API_KEY", wrong_key.clone())],
            "OPENAI_API_KEY",
        ),
        (
            "wrong database password",
            vec!["plan", "--family-id", &family, "--force"],
            vec![(
                "DATABASE_URL",
                env.db_url.replace(&password, &wrong_password),
            )],
            "refused the login",
        ),
        (
            "unreachable database (key=value)",
            vec!["plan", "--family-id", &family, "--force"],
            vec![(
                "DATABASE_URL",
                format!("host=127.0.0.1 port=1 user=someone password={password} dbname=x"),
            )],
            "could not connect",
        ),
        (
            "unreachable database (url)",
            vec!["plan", "--family-id", &family, "--force"],
            vec![(
                "DATABASE_URL",
                format!("postgres://someone:{password}@127.0.0.1:1/x?sslmode=require"),
            )],
            "could not connect",
        ),
        (
            "malformed database url",
            vec!["plan", "--family-id", &family, "--force"],
            vec![(
                "DATABASE_URL",
                format!("postgres://someone:{password}@127.0.0.1:notaport/x"),
            )],
            "not valid",
        ),
        (
            "unreachable api",
            vec!["advance", "--run-dir", dir],
            vec![
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1".to_owned()),
                ("EMBATCH_API_RETRIES", "0".to_owned()),
            ],
            "",
        ),
    ];
    for (what, args, vars, needle) in failures {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let run = env.exec_env(&args, &vars).await;
        assert!(run.code != 0, "{what} succeeded: {run:#?}");
        assert!(run.stderr.contains(needle), "{what}: {run:#?}");
        assert!(!run.stderr.contains("panicked"), "{what}: {run:#?}");
        captured.keep(what, run);
    }

    // Secrets given as flags: warned about, still kept out of files and output.
    let run = env
        .exec(&[
            "advance",
            "--run-dir",
            &second_dir,
            "--api-key",
            &api_key,
            "--database-url",
            &env.db_url,
            "-v",
        ])
        .await;
    let run = captured.keep("advance with secrets as flags", run);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains(
            "warning: --api-key on the command line shows in the process list; set OPENAI_API_KEY in the environment or .env instead"
        ),
        "{run:#?}"
    );
    // …but not when the key comes from the environment.
    for (what, run) in &captured.0 {
        if !what.contains("flags") {
            assert!(
                !run.stderr.contains("--api-key on the command line"),
                "{what}"
            );
        }
    }

    // The whole working folder of the binary, runs dir included.
    captured.assert_nowhere(
        env.dir.path(),
        &[&api_key, &password, &wrong_key, &wrong_password],
    );
}

/// Every file kind a run folder can hold, after a full cycle with failures and retries.
const EVERY_FILE_KIND: [&str; 11] = [
    "run.json",
    "run.json.bak",
    "run.lock",
    "skipped.tsv",
    "retry_skipped.tsv",
    "input.jsonl",
    "chunks.tsv",
    "batch.json",
    "output.jsonl",
    "errors.jsonl",
    "failed_chunk_ids.tsv",
];

#[tokio::test]
async fn every_folder_and_file_of_a_full_cycle_is_the_owners_only() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let mut captured = Captured::default();
    // The test process's umask (022) is what a user's shell usually has: the binary must not
    // rely on it.
    let run_dir = full_cycle(&env, &mut captured).await;
    let mut kinds = BTreeSet::new();
    for path in walk(&env.runs_dir) {
        let mode = fs_err::metadata(&path).unwrap().permissions().mode() & 0o777;
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", path.display());
        if path.is_file() {
            kinds.insert(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    let missing: Vec<&str> = EVERY_FILE_KIND
        .iter()
        .copied()
        .filter(|kind| !kinds.contains(*kind))
        .collect();
    assert!(
        missing.is_empty(),
        "the cycle made no {missing:?}: {kinds:?}"
    );
    assert!(store::load(&run_dir).unwrap().is_finished());
}

/// A name that would end the statement and drop table `y` if it were pasted into SQL.
fn hostile(name: &str) -> String {
    format!("{name}\"; DROP TABLE y; --")
}

/// `name` quoted as Postgres does, for the test's own setup SQL.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn y_rows(env: &TestEnv) -> i64 {
    env.client
        .query_one("SELECT count(*) FROM y", &[])
        .await
        .expect("table y still exists")
        .get(0)
}

#[tokio::test]
async fn hostile_identifiers_from_every_flag_are_quoted_end_to_end() {
    let env = TestEnv::empty()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (schema, table, family_table) = (hostile("sch"), hostile("tab"), hostile("fam"));
    let (id, family, text, embedding) = (
        hostile("i\"d"),
        hostile("fa'm"),
        hostile("te xt"),
        hostile("em;b"),
    );
    let qualified = |t: &str| format!("{}.{}", quoted(&schema), quoted(t));
    env.client
        .batch_execute(&format!(
            "CREATE TABLE y (id int); INSERT INTO y VALUES (1);
             CREATE SCHEMA {schema_q};
             CREATE TABLE {fam_q} (id bigint PRIMARY KEY);
             INSERT INTO {fam_q} VALUES (1), (2);
             CREATE TABLE {tab_q} ({id_q} bigint PRIMARY KEY, {family_q} bigint, {text_q} text, {emb_q} vector(1536));
             INSERT INTO {tab_q} VALUES
               (1, 1, 'Drain the hydraulic tank.', NULL),
               (2, 1, 'Replace the return filter.', NULL),
               (3, 1, 'Check the pump coupling.', NULL),
               (4, 2, 'Another family: not in this run.', NULL);",
            schema_q = quoted(&schema),
            fam_q = qualified(&family_table),
            tab_q = qualified(&table),
            id_q = quoted(&id),
            family_q = quoted(&family),
            text_q = quoted(&text),
            emb_q = quoted(&embedding),
        ))
        .await
        .unwrap();
    let table_flag = format!("{schema}.{table}");
    let family_table_flag = format!("{schema}.{family_table}");
    let run = env
        .exec(&[
            "plan",
            "--family-id",
            "1",
            "--table",
            &table_flag,
            "--id-column",
            &id,
            "--text-column",
            &text,
            "--embedding-column",
            &embedding,
            "--family-column",
            &family,
            "--family-table",
            &family_table_flag,
        ])
        .await;
    let run_dir = run.run_dir();
    assert_eq!(store::load(&run_dir).unwrap().plan.chunks, 3);
    let run = env
        .exec(&["advance", "--run-dir", run_dir.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(y_rows(&env).await, 1);

    let rows = env
        .client
        .query(
            &format!(
                "SELECT {}, {}, {} FROM {} ORDER BY 1",
                quoted(&id),
                quoted(&text),
                quoted(&embedding),
                qualified(&table)
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 4, "no row deleted");
    for row in rows {
        let id: i64 = row.get(0);
        let content: String = row.get(1);
        let stored: Option<pgvector::Vector> = row.get(2);
        if id == 4 {
            assert!(stored.is_none(), "a chunk of another family was written");
        } else {
            let want = embatch::emulator::vectors::embedding(&content, 1536);
            assert_eq!(stored.expect("embedded").as_slice(), want.as_slice());
        }
    }
}

#[tokio::test]
async fn scope_sql_cannot_change_data() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 3).await;
    let (other, _) = family_of(&env, 2, 2).await;
    env.client
        .batch_execute(
            "CREATE TABLE y (id int); INSERT INTO y VALUES (1);
             CREATE SEQUENCE s;
             CREATE FUNCTION wipe(fam uuid) RETURNS SETOF uuid LANGUAGE sql AS
               $$ DELETE FROM knowledge_chunks WHERE equipment_family_id <> fam RETURNING id $$;
             CREATE FUNCTION scribble(fam uuid) RETURNS SETOF uuid LANGUAGE sql AS
               $$ UPDATE knowledge_chunks SET content = 'pwned' WHERE equipment_family_id = fam RETURNING id $$;
             CREATE FUNCTION escape_read_only(fam uuid) RETURNS SETOF uuid LANGUAGE plpgsql AS
               $$ BEGIN
                    PERFORM set_config('transaction_read_only', 'off', true);
                    RETURN QUERY DELETE FROM knowledge_chunks RETURNING id;
                  END $$;",
        )
        .await
        .unwrap();
    let snapshot = || async {
        let row = env
            .client
            .query_one(
                "SELECT (SELECT md5(string_agg(k::text, ',' ORDER BY id)) FROM knowledge_chunks k),
                        (SELECT count(*) FROM y),
                        (SELECT is_called FROM s)",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, bool>(2),
        )
    };
    let before = snapshot().await;
    let other = other.to_string();
    let evil = [
        "SELECT * FROM wipe($1)".to_owned(),
        "SELECT * FROM scribble($1)".to_owned(),
        "SELECT * FROM escape_read_only($1)".to_owned(),
        "SELECT id FROM knowledge_chunks WHERE equipment_family_id = $1 AND nextval('s') > 0"
            .to_owned(),
        format!(
            "SELECT id FROM knowledge_chunks WHERE equipment_family_id = $1 AND '{other}' IN (SELECT * FROM wipe('{other}'))"
        ),
        "SELECT id FROM knowledge_chunks WHERE equipment_family_id = $1); DROP TABLE y; --"
            .to_owned(),
    ];
    for scope in &evil {
        let run = env.plan(family, &["--family-table", "none", "--scope-sql", scope]);
        run.assert_error("--scope-sql failed");
        assert!(run.stderr.contains("read-only"), "{scope}: {run:#?}");
        assert!(env.run_folders().is_empty(), "{scope} left a run folder");
        assert_eq!(snapshot().await, before, "{scope} changed data");
    }
    // A well-behaved scope still plans.
    let run = env.plan(
        family,
        &[
            "--scope-sql",
            "SELECT id FROM knowledge_chunks WHERE equipment_family_id = $1",
        ],
    );
    assert_eq!(store::load(&run.run_dir()).unwrap().plan.chunks, 3);
}

/// A valid output line for `custom_id` with `embedding` as its raw JSON.
fn output_line(custom_id: &str, status: &str, embedding: &str) -> String {
    format!(
        r#"{{"id":"r","custom_id":{custom_id},"response":{{"status_code":{status},"request_id":"q","body":{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{embedding}}}],"model":"m","usage":{{"prompt_tokens":1,"total_tokens":1}}}}}},"error":null}}"#
    )
}

/// The parser's answer is sane: a vector only of the asked size and finite, and never a
/// panic (a panic fails the test).
fn assert_sane(line: &str, dims: usize) {
    use embatch::output::{LineOutcome, parse_line};
    if let LineOutcome::Vector { vector, .. } = parse_line(line, dims) {
        assert_eq!(vector.len(), dims);
        assert!(vector.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn output_lines_with_huge_or_malformed_fields_never_panic() {
    use embatch::output::{FailReason, LineOutcome, parse_line};
    let ten_mb = 10 << 20;
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let deep_object = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
    let huge_digits = format!("1{}", "0".repeat(100_000));
    let many = format!("[{}0.5]", "0.5,".repeat(ten_mb / 4));
    let cases: Vec<(&str, String)> = vec![
        ("10 MB of garbage", "x".repeat(ten_mb)),
        (
            "10 MB custom_id",
            output_line(&format!("\"{}\"", "a".repeat(ten_mb)), "200", "[0.5]"),
        ),
        ("10 MB embedding", output_line("\"a\"", "200", &many)),
        (
            "10 MB string embedding",
            output_line("\"a\"", "200", &format!("\"{}\"", "A".repeat(ten_mb))),
        ),
        (
            "deep nesting in the embedding",
            output_line("\"a\"", "200", &deep(1_000_000)),
        ),
        (
            "deep nesting in the custom_id",
            output_line(&deep(1_000_000), "200", "[0.5]"),
        ),
        (
            "deep objects in the body",
            output_line("\"a\"", "200", &deep_object(1_000_000)),
        ),
        ("deep nesting as the line", deep(1_000_000)),
        ("huge status", output_line("\"a\"", &huge_digits, "[0.5]")),
        ("negative status", output_line("\"a\"", "-200", "[0.5]")),
        (
            "status out of range",
            output_line("\"a\"", "70000", "[0.5]"),
        ),
        ("fractional status", output_line("\"a\"", "200.5", "[0.5]")),
        (
            "huge number",
            output_line("\"a\"", "200", &format!("[{huge_digits}]")),
        ),
        (
            "huge exponent",
            output_line("\"a\"", "200", "[1e99999999999999999999]"),
        ),
        (
            "tiny exponent",
            output_line("\"a\"", "200", "[1e-99999999999999999999]"),
        ),
        ("overflowing f32", output_line("\"a\"", "200", "[3.5e38]")),
        ("not a number", output_line("\"a\"", "200", "[1.2.3]")),
        ("lone minus", output_line("\"a\"", "200", "[-]")),
        ("empty element", output_line("\"a\"", "200", "[0.5,,0.5]")),
        ("numeric custom_id", output_line("123", "200", "[0.5]")),
        ("null custom_id", output_line("null", "200", "[0.5]")),
        ("bad base64", output_line("\"a\"", "200", "\"!!!!\"")),
        ("base64 of 3 bytes", output_line("\"a\"", "200", "\"AAAA\"")),
        (
            "invalid utf-8 escape",
            output_line("\"\\udc00\"", "200", "[0.5]"),
        ),
        (
            "nul in custom_id",
            output_line("\"a\\u0000b\"", "200", "[0.5]"),
        ),
    ];
    for (what, line) in &cases {
        let outcome = parse_line(line, 1);
        match outcome {
            LineOutcome::Vector { vector, .. } => {
                assert_eq!(vector.len(), 1, "{what}");
                assert!(vector[0].is_finite(), "{what}");
            }
            LineOutcome::Failed { reason, detail, .. } => {
                assert!(
                    !matches!(reason, FailReason::Cancelled | FailReason::Stale),
                    "{what}: {reason:?}"
                );
                assert!(detail.len() < 10_000, "{what}: the detail quotes the line");
            }
        }
    }
    // Numbers that round to infinity are refused, not stored.
    for what in ["huge number", "huge exponent", "overflowing f32"] {
        let line = &cases.iter().find(|(w, _)| w == &what).unwrap().1;
        assert!(
            matches!(
                parse_line(line, 1),
                LineOutcome::Failed {
                    reason: FailReason::BadOutput,
                    ..
                }
            ),
            "{what}"
        );
    }
}

proptest::proptest! {
    /// Lines built from hostile pieces in every field: never a panic, never an insane vector.
    #[test]
    fn output_lines_from_hostile_pieces_never_panic(
        custom_id in proptest::prop_oneof![3 => proptest::strategy::Just("\"a\"".to_owned()), 1 => hostile_json()],
        status in proptest::prop_oneof![3 => proptest::strategy::Just("200".to_owned()), 1 => hostile_json()],
        embedding in hostile_json(),
        dims in proptest::prop_oneof![3 => proptest::strategy::Just(1usize), 1 => 0usize..4],
    ) {
        assert_sane(&output_line(&custom_id, &status, &embedding), dims);
    }
}

/// JSON-ish fragments meant to break a parser: huge and odd numbers, deep nesting, long
/// strings, escapes, wrong types, and plain garbage.
fn hostile_json() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        Just("200".to_owned()),
        Just("\"a\"".to_owned()),
        Just("[0.5]".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:e}")),
        (1usize..5000).prop_map(|n| format!("1{}", "9".repeat(n))),
        (1usize..5000).prop_map(|n| format!("[1{}]", "9".repeat(n))),
        (any::<f32>(), 1usize..400).prop_map(|(x, e)| format!("[{x}e{e}]")),
        (1usize..5000).prop_map(|n| format!("-0.{}1e-{n}", "0".repeat(n))),
        (1usize..200_000).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        (1usize..200_000).prop_map(|n| "[".repeat(n)),
        (1usize..100_000).prop_map(|n| format!("\"{}\"", "\\u0041".repeat(n))),
        (0usize..2000).prop_map(|n| format!("[{}]", "1e38,".repeat(n) + "1e38")),
        "[\\[\\]{}\",:0-9a-zA-Z.eE+\\-\\\\ ]{0,64}",
    ]
}

#[tokio::test]
async fn an_output_line_for_a_chunk_outside_the_batch_is_refused_and_counted() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_of(&env, 1, 3).await;
    let (_, other_ids) = family_of(&env, 2, 1).await;
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

    // A line for ids[0] turned into one for a real chunk of another family (so its vector
    // would land on the wrong chunk), one naming a hostile non-id, and a 10 MB line.
    let output_path = run_dir.join("batches/batch_001/output.jsonl");
    let output = fs_err::read_to_string(&output_path).unwrap();
    let mut lines: Vec<String> = Vec::new();
    for line in output.lines() {
        if line.contains(&ids[0].to_string()) {
            lines.push(line.replace(&ids[0].to_string(), &other_ids[0].to_string()));
            lines.push(line.replace(&format!("\"{}\"", ids[0]), "\"'; DROP TABLE y; --\""));
        } else {
            lines.push(line.to_owned());
        }
    }
    lines.push("x".repeat(10 << 20));
    fs_err::write(&output_path, lines.join("\n") + "\n").unwrap();

    let run = env
        .exec(&["advance", "--run-dir", dir, "--max-attempts", "1"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr
            .contains("2 lines with a custom_id not in this batch (refused)"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("1 unparseable lines"), "{run:#?}");
    let other: Option<pgvector::Vector> = env
        .client
        .query_one(
            "SELECT embedding FROM knowledge_chunks WHERE id = $1",
            &[&other_ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(other.is_none(), "a chunk of another family was written");
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 2);
    let saved = store::load(&run_dir).unwrap();
    let embatch::run::state::BatchState::Ingested(ingested) = &saved.batches[0].state else {
        panic!("not ingested: {:?}", saved.batches[0].state.kind());
    };
    assert_eq!(ingested.anomalies.unknown_custom_id, 2);
    assert_eq!(ingested.anomalies.unparseable, 1);
    // The chunk whose line was taken is reported, not silently lost.
    let failed =
        fs_err::read_to_string(run_dir.join("batches/batch_001/failed_chunk_ids.tsv")).unwrap();
    assert!(failed.contains(&format!("{}\t", ids[0])), "{failed}");
}

/// The binary in `folder`, with only PATH and `vars` in its environment.
fn command_in(folder: &Path, vars: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_embatch"));
    cmd.current_dir(folder)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (key, value) in vars {
        cmd.env(key, value);
    }
    cmd
}

async fn run_in(folder: &Path, args: &[&str], vars: &[(&str, &str)]) -> Run {
    let out = command_in(folder, vars)
        .args(args)
        .output()
        .await
        .expect("run embatch");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn dotenv_is_read_from_the_working_folder_only() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_of(&env, 1, 1).await;
    let family = family.to_string();
    let runs_dir = env.runs_dir.to_str().unwrap().to_owned();
    // A `.env` planted one folder above the working folder, naming a real database and an API
    // that would collect the key: neither may be used.
    let work = env.dir.path().join("work");
    fs_err::create_dir(&work).unwrap();
    fs_err::write(
        env.dir.path().join(".env"),
        format!(
            "DATABASE_URL='{}'\nOPENAI_BASE_URL={}\n",
            env.db_url,
            env.emu().base_url()
        ),
    )
    .unwrap();
    let vars = [("EMBATCH_RUNS_DIR", runs_dir.as_str())];
    let run = run_in(&work, &["plan", "--family-id", &family], &vars).await;
    run.assert_error("no database given");
    assert!(env.run_folders().is_empty(), "{run:#?}");

    // With the database and key from the environment, the API is the default one, not the
    // planted emulator (which receives nothing).
    let chunk = ids[0].to_string();
    let vars = [
        ("DATABASE_URL", env.db_url.as_str()),
        ("OPENAI_API_KEY", env.emu().api_key()),
        ("EMBATCH_API_RETRIES", "0"),
    ];
    let run = run_in(&work, &["embed", "--chunk-id", &chunk], &vars).await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(env.emu().counters().embedding_calls, 0, "{run:#?}");
    assert_eq!(env.embedding_of(ids[0]).await, None);

    // The working folder's own `.env` is read, and the environment still beats it.
    fs_err::write(
        work.join(".env"),
        format!(
            "DATABASE_URL=\"{}\"\nOPENAI_BASE_URL={}\nOPENAI_API_KEY=sk-wrong\n",
            env.db_url,
            env.emu().base_url()
        ),
    )
    .unwrap();
    let vars = [("OPENAI_API_KEY", env.emu().api_key())];
    let run = run_in(&work, &["embed", "--chunk-id", &chunk], &vars).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(env.emu().counters().embedding_calls, 1);

    // A broken one is an error that names it (exit 2) and never quotes its lines.
    let password = secret("pw-dotenv-");
    fs_err::write(
        work.join(".env"),
        format!("DATABASE_URL=\"postgres://u:{password}@h/db\nOPENAI_API_KEY=x\n"),
    )
    .unwrap();
    let run = run_in(&work, &["runs"], &[]).await;
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(
        run.stderr.contains("./.env is not a valid .env file")
            && run.stderr.contains("DATABASE_URL"),
        "{run:#?}"
    );
    assert!(!run.stderr.contains(&password), "{run:#?}");
}

#[tokio::test]
async fn secrets_in_urls_and_the_emulators_key_are_never_echoed() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_of(&env, 1, 1).await;
    let family = family.to_string();
    let chunk = ids[0].to_string();
    let password = secret("pw-proxy-");
    let base_url = format!("https://user:{password}@proxy.example/v1?key={password}");
    let plain_base_url = format!("https://user:{password}@proxy.example/v1");
    let mut captured = Captured::default();

    // A base URL with credentials is refused, and shown masked, wherever it is used.
    let run_dir = env.plan(family.parse().unwrap(), &[]).run_dir();
    let dir = run_dir.to_str().unwrap().to_owned();
    for args in [
        vec!["advance", "--run-dir", &dir, "-v"],
        vec!["embed", "--chunk-id", &chunk, "-v"],
        vec!["submit", "--family-id", &family, "--force", "-v"],
        vec![
            "advance",
            "--run-dir",
            &dir,
            "--base-url",
            &plain_base_url,
            "-v",
        ],
    ] {
        let run = env.exec_env(&args, &[("OPENAI_BASE_URL", &base_url)]).await;
        let run = captured.keep(&args.join(" "), run);
        assert_eq!(run.code, 1, "{run:#?}");
        assert!(
            run.stderr
                .contains("\"https://***@proxy.example/v1?…\" is not usable (not a base URL)")
                || run.stderr.contains(
                    "\"https://***@proxy.example/v1\" is not usable (credentials do not belong"
                ),
            "{run:#?}"
        );
    }
    let served = env
        .try_serve(&["-v"], &[("OPENAI_BASE_URL", &base_url)])
        .await
        .err()
        .expect("serve refuses it");
    assert!(served.contains("https://***@proxy.example"), "{served}");
    assert!(!served.contains(&password), "{served}");

    // A password in --database-url on the command line is warned about, never printed.
    let db_password = secret("pw-db-");
    let db_url = format!("postgres://someone:{db_password}@127.0.0.1:1/x");
    let run = env.exec(&["runs", "--database-url", &db_url]).await;
    let run = captured.keep("runs --database-url", run);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains(
            "warning: --database-url with a password on the command line shows in the process list; set DATABASE_URL in the environment or .env instead"
        ),
        "{run:#?}"
    );
    let run = env
        .exec(&["plan", "--family-id", &family, "--database-url", &db_url])
        .await;
    let run = captured.keep("plan --database-url", run);
    run.assert_error("could not connect");
    let run = env.exec_env(&["runs"], &[("DATABASE_URL", &db_url)]).await;
    let run = captured.keep("runs with DATABASE_URL", run);
    assert!(!run.stderr.contains("warning"), "{run:#?}");

    // The emulator accepts a key from OPENAI_API_KEY but never prints it.
    let api_key = secret("sk-real-looking-");
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.env("OPENAI_API_KEY", &api_key)
        .args(["emulator", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut printed = String::new();
    let base = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut base = None;
        while let Ok(Some(line)) = lines.next_line().await {
            printed.push_str(&line);
            printed.push('\n');
            if let Some(url) = line.trim().strip_prefix("OPENAI_BASE_URL=") {
                base = Some(url.to_owned());
            } else if base.is_some() {
                break;
            }
        }
        base
    })
    .await
    .expect("the emulator starts")
    .expect("it prints its base URL");
    assert!(!printed.contains(&api_key), "{printed}");
    assert!(printed.contains("OPENAI_API_KEY"), "{printed}");
    let http = reqwest::Client::new();
    let with_key = http
        .get(format!("{base}/batches"))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status().as_u16(), 200, "it accepts the key");
    child.kill().await.unwrap();

    captured.assert_nowhere(env.dir.path(), &[&password, &db_password, &api_key]);
}
