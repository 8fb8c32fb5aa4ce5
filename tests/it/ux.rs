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

fn spawn(env: &TestEnv, args: &[&str]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().expect("spawn embatch")
}

async fn finish(child: tokio::process::Child) -> crate::harness::Run {
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("embatch stops soon after the signal")
        .expect("wait for embatch");
    crate::harness::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits until every batch of the run is created (the `advance --wait` child is then sleeping
/// between polls, holding the run's lock).
async fn until_submitted(run_dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let submitted = embatch::run::store::load(run_dir).is_ok_and(|run| {
            run.batches
                .iter()
                .all(|b| b.state.kind() == embatch::run::state::StateKind::Submitted)
        });
        if submitted {
            // The save comes before the sleep begins.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never submitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ctrl_c_while_waiting_says_how_to_resume_and_cancel_names_the_holder() {
    let (env, run_dir) = planned(3, Duration::from_secs(60)).await;
    let dir = run_dir.to_str().unwrap();
    for (signal, code) in [
        (nix::sys::signal::Signal::SIGINT, 130),
        (nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let child = spawn(
            &env,
            &[
                "advance",
                "--run-dir",
                dir,
                "--wait",
                "--poll-seconds",
                "30",
            ],
        );
        let pid = child.id().expect("running");
        until_submitted(&run_dir).await;

        // `cancel` while the wait holds the lock: it names the process and says to stop it.
        let cancel = env.exec(&["cancel", "--run-dir", dir]).await;
        assert_eq!(cancel.code, 75, "{cancel:#?}");
        assert!(
            cancel.stderr.contains(&format!("(pid {pid} on "))
                && cancel.stderr.contains("stop that process first")
                && cancel.stderr.contains(&format!("`kill {pid}`"))
                && cancel
                    .stderr
                    .contains(&format!("then run `embatch cancel --run-dir {dir}` again")),
            "{cancel:#?}"
        );

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
        let run = finish(child).await;
        assert_eq!(run.code, code, "{run:#?}");
        assert!(
            run.stderr.contains(&format!(
                "the run is saved, resume it with: embatch advance --run-dir {dir} --wait"
            )),
            "{run:#?}"
        );
        assert!(
            summary_line(&run.stderr).ends_with(&format!("the run is saved (exit {code})")),
            "{run:#?}"
        );
    }

    // Cancelled now (nothing holds the lock): `status` and `runs` say so.
    let cancel = env.exec(&["cancel", "--run-dir", dir]).await;
    assert!(cancel.code == 0 || cancel.code == 75, "{cancel:#?}");
    let status = env.run(&["status", "--run-dir", dir]);
    assert!(
        status
            .stdout
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(" · cancelled")
                || l.ends_with(" · cancelled, batches still ending")),
        "{status:#?}"
    );
    let runs = env.run(&["runs"]);
    assert!(runs.stdout.contains("  cancelled"), "{runs:#?}");
}

#[tokio::test]
async fn runs_json_is_one_array_even_when_empty() {
    let env = TestEnv::new().await;
    let runs = env.run(&["runs", "--json"]);
    assert_eq!(runs.code, 0, "{runs:#?}");
    assert_eq!(runs.stdout.trim(), "[]");
}

#[tokio::test]
async fn a_database_without_pgvector_is_told_to_install_it() {
    let env = TestEnv::empty().await;
    env.client
        .batch_execute(
            "DROP EXTENSION vector;
             CREATE TABLE equipment_families (id uuid PRIMARY KEY);
             CREATE TABLE knowledge_chunks (id uuid PRIMARY KEY, equipment_family_id uuid,
                                            content text, embedding real[]);",
        )
        .await
        .unwrap();
    let plan = env.run(&[
        "plan",
        "--family-id",
        "3f8e0c9a-0000-4000-8000-000000000001",
    ]);
    plan.assert_error("install pgvector: `CREATE EXTENSION vector`");
}

#[tokio::test]
async fn run_dir_at_a_family_folder_lists_its_runs() {
    let (env, run_dir) = planned(3, Duration::ZERO).await;
    let family_dir = run_dir.parent().unwrap();
    let status = env.run(&["status", "--run-dir", family_dir.to_str().unwrap()]);
    status.assert_error("is a family folder, not a run; point --run-dir at one of its runs:");
    assert!(
        status
            .stderr
            .contains(&format!("\n  {}", run_dir.display())),
        "{status:#?}"
    );
    let advance = env
        .exec(&["advance", "--run-dir", family_dir.to_str().unwrap()])
        .await;
    advance.assert_error("is a family folder, not a run");
}

#[tokio::test]
async fn plan_shows_the_vector_size_with_thousands_separated() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..1_200)
        .map(|i| format!("Chunk {i} of the manual."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    env.add_chunks(family, &refs).await;
    let plan = env.plan(family, &[]);
    assert_eq!(plan.code, 0, "{plan:#?}");
    assert!(
        plan.stderr.contains("1,200 chunks to embed (")
            && plan
                .stderr
                .contains(" in 1 batch, text-embedding-3-small, 1536 dims"),
        "{plan:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_warns_at_start_when_the_api_refuses_the_key() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let refused = env
        .serve(&[], &[("OPENAI_API_KEY", "sk-not-the-emulators")])
        .await;
    let text = refused.stderr_text();
    assert!(
        text.contains("the API rejected the key (HTTP 401)") && text.contains("serving anyway"),
        "{text}"
    );
    let accepted = env.serve(&[], &[]).await;
    assert!(
        !accepted.stderr_text().contains("rejected"),
        "{}",
        accepted.stderr_text()
    );
}

/// ctrl-c or SIGTERM in the middle of a step (here an upload the provider is slow to answer):
/// the step stops as a crash there would, the user is told how to resume, and resuming pays for
/// nothing twice (the upload is adopted or made once more, one batch is created).
#[tokio::test]
async fn ctrl_c_during_a_step_says_how_to_resume_and_nothing_is_paid_twice() {
    let (env, run_dir) = planned(3, Duration::ZERO).await;
    let dir = run_dir.to_str().unwrap();
    env.emu().set_faults(embatch::emulator::Faults {
        latency: Duration::from_secs(4),
        ..embatch::emulator::Faults::default()
    });
    let child = spawn(
        &env,
        &["advance", "--run-dir", dir, "--wait", "--poll-seconds", "1"],
    );
    let pid = child.id().expect("running");
    // The upload is under way (its mark saved, the answer 4 s away).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let run = finish(child).await;
    assert_eq!(run.code, 130, "{run:#?}");
    assert!(
        run.stderr.contains(&format!(
            "the run is saved, resume it with: embatch advance --run-dir {dir} --wait"
        )),
        "{run:#?}"
    );

    env.emu().set_faults(embatch::emulator::Faults::default());
    let resumed = env.exec(&["advance", "--run-dir", dir, "--wait"]).await;
    assert_eq!(resumed.code, 0, "{resumed:#?}");
    let counters = env.emu().counters();
    let batches = embatch::run::store::load(&run_dir).unwrap().batches.len() as u64;
    assert_eq!(counters.batch_creations, batches, "{counters:?}");
    assert!(
        counters.creations_by_metadata.values().all(|&n| n == 1),
        "{counters:?}"
    );
    assert!(counters.uploads <= batches + 1, "{counters:?}");
}
