//! Secrets, privacy and hostile input (issue 6, items 3 and 4): the API key and the database
//! password never reach a file, a log line or `--json`; run folders are the owner's only;
//! identifiers from flags are quoted end to end; `--scope-sql` cannot change data; output
//! lines with hostile fields neither panic nor write a chunk outside the batch.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use embatch::emulator::{EmulatorConfig, Faults};
use embatch::pgtemp::ThrowawayPostgres;
use embatch::store;
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
    let plan = captured.keep("plan", env.plan(family, &[]));
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

    captured.assert_nowhere(
        &env.runs_dir,
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
