//! `advance` against a world that misbehaves: a provider whose clock is a month off (its
//! `Date` header and every timestamp it answers), upload answers that come back already
//! expired, database connections cut in the middle of an ingest, and a `statement_timeout`
//! too short for the writes. The run must never loop, never pay twice, and always resume.

use std::path::{Path, PathBuf};
use std::time::Duration;

use embatch::emulator::{EmulatorConfig, Faults};
use embatch::run::store::{self, RunFile};
use uuid::Uuid;

use crate::harness::{Run, TestEnv, count_embedded_exactly};

const MONTH_SECS: i64 = 31 * 24 * 3600;
const DIMS: usize = 1536;

/// A test env with an emulator, a family of `n` chunks, and a run planned for it.
async fn planned(n: usize, plan_args: &[&str]) -> (TestEnv, PathBuf, Uuid) {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Chunk {i}: torque the wheel nut {i} to 120 Nm."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let run_dir = env.plan(family, plan_args).run_dir();
    (env, run_dir, family)
}

async fn advance(env: &TestEnv, run_dir: &Path) -> Run {
    env.exec(&["advance", "--run-dir", run_dir.to_str().unwrap()])
        .await
}

fn load(run_dir: &Path) -> RunFile {
    store::load(run_dir).expect("run.json parses")
}

async fn advance_until_finished(env: &TestEnv, run_dir: &Path, max: usize) {
    for _ in 0..max {
        let run = advance(env, run_dir).await;
        assert!(run.code == 0 || run.code == 75, "{run:#?}");
        if run.code == 0 {
            assert!(load(run_dir).is_finished());
            return;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("not finished after {max} advances");
}

/// Every (batch, submission) of the run was created exactly once, and `n_batches` in all.
fn assert_created_once(env: &TestEnv, run_dir: &Path, n_batches: u64) {
    let run = load(run_dir);
    let counters = env.emu().counters();
    assert_eq!(counters.batch_creations, n_batches, "{counters:?}");
    for (key, n) in &counters.creations_by_metadata {
        assert_eq!(*n, 1, "{key} created {n} times: {counters:?}");
        assert!(key.starts_with(&run.run_id), "foreign creation {key}");
    }
}

async fn database_name(env: &TestEnv) -> String {
    env.client
        .query_one("SELECT current_database()", &[])
        .await
        .expect("read the database name")
        .get(0)
}

#[tokio::test]
async fn an_upload_that_comes_back_expired_is_uploaded_twice_then_explained() {
    // A mock that answers every upload with a fixed, long past expires_at (the kind of example
    // answer an API description carries), with a clock that agrees with ours.
    let (env, run_dir, family) = planned(5, &[]).await;
    env.emu().set_faults(Faults {
        upload_answer_expires_at: Some(1_680_202_602),
        ..Faults::default()
    });
    let run = advance(&env, &run_dir).await;
    run.assert_error("already past by the provider's own clock");
    assert!(
        run.stderr.contains("agrees with the provider's (Date: ")
            && run.stderr.contains("not even after its created_at")
            && run.stderr.contains("uploaded 2 times in this advance"),
        "{run:#?}"
    );
    let counters = env.emu().counters();
    assert_eq!(counters.uploads, 2, "bounded: {counters:?}");
    assert_eq!(counters.batch_creations, 0, "{counters:?}");
    // The run is saved: once the server answers properly, it finishes.
    env.emu().set_faults(Faults::default());
    advance_until_finished(&env, &run_dir, 4).await;
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 5);
    assert_created_once(&env, &run_dir, 1);

    // A server whose clock is a month behind, behind a proxy whose Date header is right: the
    // file's times are a month behind the very answer that carries them.
    let (env, run_dir, _) = planned(5, &[]).await;
    env.emu().set_faults(Faults {
        clock_offset_secs: -MONTH_SECS,
        date_offset_secs: Some(0),
        ..Faults::default()
    });
    let run = advance(&env, &run_dir).await;
    run.assert_error("already past by the provider's own clock");
    assert!(
        run.stderr.contains("is 31 days behind its own Date header")
            && run.stderr.contains("timedatectl"),
        "{run:#?}"
    );
    assert_eq!(env.emu().counters().uploads, 2);
    assert_eq!(env.emu().counters().batch_creations, 0);
}

#[tokio::test]
async fn a_provider_clock_a_month_off_finishes_and_adopts_without_paying_twice() {
    for offset in [MONTH_SECS, -MONTH_SECS] {
        // Plain: uploads are not mistaken for expired, batches are not reported stuck.
        let (env, run_dir, family) = planned(12, &["--max-requests-per-batch", "5"]).await;
        env.emu().set_faults(Faults {
            clock_offset_secs: offset,
            ..Faults::default()
        });
        advance_until_finished(&env, &run_dir, 4).await;
        assert_eq!(env.emu().counters().uploads, 3, "offset {offset}");
        assert_created_once(&env, &run_dir, 3);
        assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 12);

        // A crash between the create call and the save: the next advance must find the batch
        // the provider timed a month away from the run's creation, and adopt it.
        let (env, run_dir, family) = planned(12, &["--max-requests-per-batch", "5"]).await;
        env.emu().set_faults(Faults {
            clock_offset_secs: offset,
            ..Faults::default()
        });
        let run = env
            .exec_env(
                &["advance", "--run-dir", run_dir.to_str().unwrap()],
                &[("EMBATCH_CRASH_AT", "after_create:2")],
            )
            .await;
        assert!(run.killed(), "offset {offset}: {run:#?}");
        advance_until_finished(&env, &run_dir, 4).await;
        assert_eq!(env.emu().counters().uploads, 3, "offset {offset}");
        assert_created_once(&env, &run_dir, 3);
        assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 12);
    }
}

#[tokio::test]
async fn terminated_backends_mid_ingest_reconnect_and_every_vector_is_right() {
    const N: usize = 400;
    let (env, run_dir, family) = planned(N, &[]).await;
    // Each row's write sleeps, so the ingest lasts long enough to be cut twice.
    env.client
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END $$;
             CREATE TRIGGER slow_row BEFORE UPDATE ON knowledge_chunks
               FOR EACH ROW EXECUTE FUNCTION slow_row();",
        )
        .await
        .expect("slow down the writes");
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.args([
        "-v",
        "advance",
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--update-chunk-size",
        "25",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn embatch advance");
    // Cut every connection of the advance once some rows are committed, and again later.
    let cut_at = [50i64, 200];
    let mut cuts = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while cuts < cut_at.len()
        && matches!(child.try_wait(), Ok(None))
        && std::time::Instant::now() < deadline
    {
        let written: i64 = env
            .client
            .query_one(
                "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL",
                &[],
            )
            .await
            .expect("count the vectors")
            .get(0);
        if written >= cut_at[cuts] {
            let rows = env
                .client
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .expect("terminate the advance's backends");
            assert!(!rows.is_empty(), "no backend to terminate");
            cuts += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("advance ends")
        .expect("wait for advance");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 75)),
        "a lost connection must not be exit 1 (it stops a cron loop): {code:?} {stderr}"
    );
    assert_eq!(cuts, 2, "the ingest ended before both cuts: {stderr}");
    assert!(stderr.contains("database connection lost"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    advance_until_finished(&env, &run_dir, 3).await;
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, N);
}

#[tokio::test]
async fn a_statement_timeout_is_named_with_the_setting_to_raise() {
    let (env, run_dir, family) = planned(20, &[]).await;
    let db = database_name(&env).await;
    env.client
        .batch_execute(&format!(
            "CREATE FUNCTION slow_statement() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
             CREATE TRIGGER slow_statement BEFORE UPDATE ON knowledge_chunks
               FOR EACH STATEMENT EXECUTE FUNCTION slow_statement();
             ALTER ROLE CURRENT_USER IN DATABASE \"{db}\" SET statement_timeout = '200ms';"
        ))
        .await
        .expect("set a tiny statement_timeout");
    let run = advance(&env, &run_dir).await;
    run.assert_error("statement_timeout");
    assert!(
        run.stderr.contains("ALTER ROLE") && run.stderr.contains("run advance again"),
        "{run:#?}"
    );
    // Resumable once the setting is raised.
    env.client
        .batch_execute(&format!(
            "ALTER ROLE CURRENT_USER IN DATABASE \"{db}\" RESET statement_timeout;"
        ))
        .await
        .expect("reset statement_timeout");
    advance_until_finished(&env, &run_dir, 3).await;
    assert_eq!(count_embedded_exactly(&env, family, DIMS).await, 20);
}
