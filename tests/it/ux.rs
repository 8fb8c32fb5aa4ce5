//! What a user watches (issue 16): the one-line summary of every `advance`, and the help and
//! messages around it, through the real binary.

use std::path::PathBuf;
use std::time::Duration;

use embatch::emulator::EmulatorConfig;

use crate::harness::TestEnv;

/// An env with an emulator whose batches spend `stage` in each phase, and a planned run of
/// `n` chunks in batches of 2.
async fn planned(n: usize, stage: Duration) -> (TestEnv, PathBuf) {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig {
            stage_duration: stage,
            ..EmulatorConfig::default()
        })
        .await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Chunk {i}: check the hydraulic hose {i} for leaks."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "2"])
        .run_dir();
    (env, run_dir)
}

/// The summary line of a call's stderr (the line that ends with the exit code).
fn summary_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("; this call: "))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"))
}

#[tokio::test]
async fn every_advance_says_where_the_run_stands_without_verbose() {
    let (env, run_dir) = planned(3, Duration::from_secs(30)).await;
    let dir = run_dir.to_str().unwrap();

    let first = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(first.code, 75, "{first:#?}");
    assert_eq!(
        summary_line(&first.stderr),
        "2 batches: 2 validating (0 / 3 requests); this call: submitted 2; waiting on the provider — run again later (exit 75)"
    );

    // A cron call while the provider works: nothing moved, and it says so.
    let again = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(again.code, 75, "{again:#?}");
    assert_eq!(
        summary_line(&again.stderr),
        "2 batches: 2 validating (0 / 3 requests); this call: nothing changed; waiting on the provider — run again later (exit 75)"
    );

    // `-q` keeps stderr for errors only.
    let quiet = env.exec(&["advance", "--run-dir", dir, "-q"]).await;
    assert_eq!(quiet.code, 75, "{quiet:#?}");
    assert_eq!(quiet.stderr, "");
}

#[tokio::test]
async fn the_last_advance_says_finished() {
    let (env, run_dir) = planned(3, Duration::ZERO).await;
    let dir = run_dir.to_str().unwrap();
    let done = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(done.code, 0, "{done:#?}");
    assert_eq!(
        summary_line(&done.stderr),
        "2 batches: 2 ingested; this call: ingested 2; finished (exit 0)"
    );
}
