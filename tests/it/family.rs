//! One family, one identity, one plan at a time (DESIGN.md §9), and the plan's promises to
//! people coming from the Python script: no silent no-op after a dry run, `--limit` after
//! held chunks, a clean stop on SIGINT and SIGTERM.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use embatch::emulator::EmulatorConfig;
use embatch::run::state::StateKind;
use embatch::run::store;
use uuid::Uuid;

use crate::harness::{Run, TestEnv, family_of, read};

/// The chunk ids a run folder's batches hold (from `chunks.tsv`).
fn planned_ids(run_dir: &Path) -> Vec<String> {
    let saved = store::load(run_dir).expect("load run.json");
    let mut ids = Vec::new();
    for batch in &saved.batches {
        let tsv = read(run_dir.join("batches").join(&batch.name).join("chunks.tsv"));
        ids.extend(
            tsv.lines()
                .skip(1)
                .map(|l| l.split('\t').next().unwrap_or_default().to_owned()),
        );
    }
    ids
}

/// `33333333333333333333333333333333`-style spelling: upper case, no hyphens.
fn shouting(family: Uuid) -> String {
    family.simple().to_string().to_uppercase()
}

fn braced(family: Uuid) -> String {
    format!("{{{}}}", family.hyphenated())
}

#[tokio::test]
async fn spellings_of_one_family_share_one_folder_one_run_and_its_held_chunks() {
    let env = TestEnv::new().await;
    let (family, ids) = family_of(&env, 1, 3).await;
    let canonical = family.to_string();

    let first = env.run(&["plan", "--family-id", &shouting(family)]);
    let run_dir = first.run_dir();
    assert_eq!(run_dir.parent().unwrap(), env.runs_dir.join(&canonical));
    assert_eq!(store::load(&run_dir).unwrap().family_id, canonical);
    assert!(
        first.stderr.contains(&format!("family {canonical}:")),
        "{first:#?}"
    );
    assert_eq!(planned_ids(&run_dir).len(), ids.len());

    // Every other spelling is the same family: its chunks are held, nothing is planned twice.
    for spelling in [braced(family), canonical.to_uppercase(), canonical.clone()] {
        let again = env.run(&["plan", "--family-id", &spelling]);
        again.assert_error("planned but not submitted yet");
        assert!(
            again.stderr.contains(run_dir.to_str().unwrap()),
            "{again:#?}"
        );
    }
    assert_eq!(env.run_folders(), std::slice::from_ref(&run_dir));

    // `runs --family-id` finds it under any spelling.
    for spelling in [shouting(family), braced(family), canonical.clone()] {
        let listed = env.run(&["runs", "--family-id", &spelling]);
        assert_eq!(listed.code, 0, "{listed:#?}");
        assert!(
            listed.stdout.contains(run_dir.to_str().unwrap()),
            "{listed:#?}"
        );
    }

    // Not a uuid: one clear line, no SQL error text, no folder.
    let bad = env.run(&["plan", "--family-id", "3333-not-a-uuid"]);
    bad.assert_error("family id `3333-not-a-uuid` is not a valid uuid");
    assert!(!bad.stderr.contains("invalid input syntax"), "{bad:#?}");
    assert_eq!(bad.stderr.trim().lines().count(), 1, "{bad:#?}");
    assert_eq!(env.run_folders(), [run_dir]);
}

#[tokio::test]
async fn integer_families_are_known_by_their_canonical_number() {
    let env = TestEnv::empty().await;
    env.client
        .batch_execute(
            "CREATE TABLE parts (id bigint PRIMARY KEY, fam bigint, content text, embedding vector(8));
             INSERT INTO parts VALUES (1, 7, 'one', NULL), (2, 7, 'two', NULL), (3, 8, 'three', NULL);",
        )
        .await
        .unwrap();
    let plan = |family: &str| {
        env.run(&[
            "plan",
            "--family-id",
            family,
            "--table",
            "parts",
            "--family-column",
            "fam",
            "--family-table",
            "none",
        ])
    };
    let first = plan("007");
    let run_dir = first.run_dir();
    assert_eq!(run_dir.parent().unwrap(), env.runs_dir.join("7"));
    assert_eq!(store::load(&run_dir).unwrap().family_id, "7");
    assert_eq!(planned_ids(&run_dir), ["1", "2"]);
    plan(" +7").assert_error("planned but not submitted yet");
    plan("99999999999999999999").assert_error("is not a valid bigint");

    // With --scope-sql, the id is read as the type Postgres infers for its $1.
    let scoped = env.run(&[
        "plan",
        "--family-id",
        "0008",
        "--table",
        "parts",
        "--family-table",
        "none",
        "--scope-sql",
        "SELECT id FROM parts WHERE fam = $1",
    ]);
    let scoped_dir = scoped.run_dir();
    assert_eq!(scoped_dir.parent().unwrap(), env.runs_dir.join("8"));
    assert_eq!(planned_ids(&scoped_dir), ["3"]);
}

/// Runs planned before plans used the database's spelling live in a folder named after the
/// spelling given then: their chunks are still held.
#[tokio::test]
async fn runs_in_a_folder_of_an_old_spelling_still_hold_their_chunks() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 3).await;
    let run_dir = env.plan(family, &[]).run_dir();
    // Make it look like an old run planned as `--family-id 3333…` (upper case, no hyphens).
    let old_family_dir = env.runs_dir.join(shouting(family));
    fs_err::rename(run_dir.parent().unwrap(), &old_family_dir).unwrap();
    let old_run_dir = old_family_dir.join(run_dir.file_name().unwrap());
    let mut saved = store::load(&old_run_dir).unwrap();
    saved.family_id = shouting(family);
    store::save(&old_run_dir, &saved).unwrap();

    let again = env.plan(family, &[]);
    again.assert_error("planned but not submitted yet");
    assert!(
        again.stderr.contains(old_run_dir.to_str().unwrap()),
        "{again:#?}"
    );
}

/// Waits for a child and gives back what it produced.
async fn finish(child: tokio::process::Child) -> Run {
    let out = child.wait_with_output().await.expect("wait for embatch");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn spawn(env: &TestEnv, args: &[&str]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn().expect("spawn embatch")
}

#[tokio::test]
async fn overlapping_plans_of_one_family_never_take_a_chunk_twice() {
    let env = TestEnv::new().await;
    for round in 1..=4u128 {
        let (family, ids) = family_of(&env, round, 3000).await;
        let first_spelling = family.to_string();
        let second_spelling = if round % 2 == 0 {
            shouting(family)
        } else {
            first_spelling.clone()
        };
        let a = spawn(&env, &["plan", "--family-id", &first_spelling]);
        let b = spawn(&env, &["plan", "--family-id", &second_spelling]);
        let (a, b) = tokio::join!(finish(a), finish(b));
        let mut taken = Vec::new();
        let mut planned = 0;
        for run in [&a, &b] {
            match run.code {
                0 => {
                    planned += 1;
                    taken.extend(planned_ids(&run.run_dir()));
                }
                // The second waited, then found every chunk held by the first's run.
                1 => assert!(
                    run.stderr.contains("planned but not submitted yet"),
                    "{run:#?}"
                ),
                // The second gave up waiting for the first.
                75 => assert!(run.stderr.contains("another plan of family"), "{run:#?}"),
                _ => panic!("unexpected exit: {run:#?}"),
            }
        }
        assert_eq!(planned, 1, "round {round}: {a:#?}\n{b:#?}");
        let distinct: HashSet<&String> = taken.iter().collect();
        assert_eq!(
            distinct.len(),
            taken.len(),
            "round {round}: a chunk taken twice"
        );
        assert_eq!(taken.len(), ids.len());
    }
}

#[tokio::test]
async fn a_held_advisory_lock_makes_the_plan_wait_then_exit_75_naming_the_holder() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 2).await;
    let key =
        embatch::run::lock::plan_lock_key("\"public\".\"knowledge_chunks\"", &family.to_string());
    env.client
        .batch_execute("SET application_name = 'nightly cron on box 7'")
        .await
        .unwrap();
    env.client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let run = env.exec(&["plan", "--family-id", &shouting(family)]).await;
    let waited = started.elapsed();
    assert_eq!(run.code, 75, "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    assert!(
        run.stderr
            .contains(&format!("another plan of family {family}")),
        "{run:#?}"
    );
    assert!(run.stderr.contains("nightly cron on box 7"), "{run:#?}");
    assert!(waited >= embatch::run::lock::PLAN_LOCK_WAIT, "{waited:?}");
    assert!(env.run_folders().is_empty(), "{:?}", env.run_folders());

    env.client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .unwrap();
    env.exec(&["plan", "--family-id", &family.to_string()])
        .await
        .run_dir();
}

#[tokio::test]
async fn a_held_plan_lock_file_makes_the_plan_exit_75_naming_the_holder() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 2).await;
    let family_dir = env.runs_dir.join(family.to_string());
    fs_err::create_dir_all(&family_dir).unwrap();
    let mut file =
        fs_err::File::create(family_dir.join(embatch::run::layout::PLAN_LOCK_FILE)).unwrap();
    file.file().lock().unwrap();
    file.write_all(b"pid 4242 on otherhost: embatch plan --family-id x\n")
        .unwrap();

    let run = env.exec(&["plan", "--family-id", &braced(family)]).await;
    assert_eq!(run.code, 75, "{run:#?}");
    assert!(run.stderr.contains("pid 4242 on otherhost"), "{run:#?}");
    assert!(env.run_folders().is_empty(), "{:?}", env.run_folders());
    drop(file);
    env.exec(&["plan", "--family-id", &family.to_string()])
        .await
        .run_dir();
}

#[tokio::test]
async fn after_a_dry_run_plan_names_the_command_and_submit_submits_that_run() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_of(&env, 1, 3).await;
    let family = family.to_string();

    let dry = env
        .exec(&["submit", "--family-id", &family, "--dry-run"])
        .await;
    let run_dir = dry.run_dir();
    let command = format!("embatch advance --run-dir {}", run_dir.display());
    assert!(
        dry.stderr.trim_end().ends_with(&command),
        "the last line says how to submit: {dry:#?}"
    );

    // A plan has nothing new to take: it says which run holds the chunks and how to submit it.
    let plan = env.exec(&["plan", "--family-id", &family]).await;
    plan.assert_error(&format!(
        "its {} pending chunks are held by the run {}, planned but not submitted yet; submit it with: {command}",
        ids.len(),
        run_dir.display()
    ));
    // So does another dry run.
    env.exec(&["submit", "--family-id", &family, "--dry-run"])
        .await
        .assert_error("planned but not submitted yet");

    // `submit` goes on with the dry run's run.
    let submit = env.exec(&["submit", "--family-id", &family]).await;
    assert_eq!(submit.run_dir(), run_dir, "{submit:#?}");
    let saved = store::load(&run_dir).unwrap();
    assert!(
        saved
            .batches
            .iter()
            .all(|b| b.state.kind() != StateKind::Planned),
        "{:?}",
        saved.batches
    );
    assert_eq!(env.emu().counters().batch_creations, 1);
    assert_eq!(env.run_folders(), [run_dir]);

    // Once submitted, the chunks are in flight: nothing to do, exit 0, as before.
    let again = env.exec(&["plan", "--family-id", &family]).await;
    assert_eq!(again.code, 0, "{again:#?}");
    assert!(again.stderr.contains("nothing to embed"), "{again:#?}");
}

#[tokio::test]
async fn submit_goes_on_with_every_unsubmitted_run_that_holds_the_chunks_oldest_first() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_of(&env, 1, 3).await;
    let family_text = family.to_string();
    let dry_run = ["submit", "--family-id", &family_text, "--dry-run"];
    let first = env.exec(&dry_run).await.run_dir();
    // New chunks arrive and are planned by a second dry run: two runs now wait for `advance`.
    env.client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
             VALUES ($1, $2, 'Chunk added later: check the belt tension.')",
            &[&Uuid::from_u128(family.as_u128() + 100), &family],
        )
        .await
        .unwrap();
    let second = env.exec(&dry_run).await.run_dir();
    assert_ne!(first, second);

    // `plan` names both and the command for each.
    let plan = env.exec(&["plan", "--family-id", &family_text]).await;
    plan.assert_error("held by runs planned but not submitted yet");
    for dir in [&first, &second] {
        assert!(
            plan.stderr
                .contains(&format!("embatch advance --run-dir {}", dir.display())),
            "{plan:#?}"
        );
    }

    // `submit` goes on with both, oldest first, and submits every batch of each.
    let submit = env.exec(&["submit", "--family-id", &family_text]).await;
    assert_eq!(submit.code, 0, "{submit:#?}");
    let printed: Vec<PathBuf> = submit.stdout.lines().map(PathBuf::from).collect();
    assert_eq!(printed, [first.clone(), second.clone()], "{submit:#?}");
    for dir in [&first, &second] {
        let saved = store::load(dir).unwrap();
        assert!(
            saved
                .batches
                .iter()
                .all(|b| b.state.kind() != StateKind::Planned),
            "{}: {:?}",
            dir.display(),
            saved.batches
        );
    }
    assert_eq!(env.emu().counters().batch_creations, 2);
    let mut folders = env.run_folders();
    folders.sort();
    let mut expected = [first, second];
    expected.sort();
    assert_eq!(folders, expected);
}

#[tokio::test]
async fn run_after_a_dry_run_finishes_that_run() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, ids) = family_of(&env, 1, 3).await;
    let family = family.to_string();
    let run_dir = env
        .exec(&["submit", "--family-id", &family, "--dry-run"])
        .await
        .run_dir();
    let run = env
        .exec(&["run", "--family-id", &family, "--poll-seconds", "1"])
        .await;
    assert_eq!(run.run_dir(), run_dir, "{run:#?}");
    assert!(store::load(&run_dir).unwrap().is_finished());
    let embedded =
        crate::harness::count_embedded_exactly(&env, family.parse().unwrap(), 1536).await;
    assert_eq!(embedded, ids.len());
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn limit_counts_the_chunks_no_other_run_holds() {
    let env = TestEnv::new().await;
    let (family, ids) = family_of(&env, 1, 5).await;
    let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let first = env.plan(family, &["--limit", "2"]).run_dir();
    assert_eq!(planned_ids(&first), ids[..2]);
    let second = env.plan(family, &["--limit", "2"]);
    assert!(
        second
            .stderr
            .contains("left out 2 chunks held by the unfinished run"),
        "{second:#?}"
    );
    assert_eq!(planned_ids(&second.run_dir()), ids[2..4]);
    let third = env.plan(family, &["--limit", "2"]).run_dir();
    assert_eq!(planned_ids(&third), ids[4..]);
}

#[tokio::test]
async fn skipped_tsv_is_named_only_when_it_exists() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(family, &["", "  "]).await;
    let nothing = env.plan(family, &[]);
    assert_eq!(nothing.code, 0, "{nothing:#?}");
    assert!(nothing.stderr.contains("skipped 2 chunks"), "{nothing:#?}");
    assert!(!nothing.stderr.contains("skipped.tsv"), "{nothing:#?}");

    let other = env.add_family(2).await;
    env.add_chunks(other, &["", "text"]).await;
    let run = env.plan(other, &[]);
    let listed = run.run_dir().join("skipped.tsv");
    assert!(
        run.stderr
            .contains(&format!("listed in {}", listed.display())),
        "{run:#?}"
    );
    assert!(listed.exists());
}

/// The backends running a query of `application_name`, as Postgres shows them.
async fn active_queries_of(env: &TestEnv, application_name: &str) -> i64 {
    env.client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'",
            &[&application_name],
        )
        .await
        .unwrap()
        .get(0)
}

fn partial_folders(env: &TestEnv) -> Vec<PathBuf> {
    env.run_folders()
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".partial-"))
        })
        .collect()
}

#[tokio::test]
async fn a_signal_during_plan_removes_the_partial_folder_and_cancels_the_query() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 2).await;
    let application_name = format!("embatch plan {family}");
    // A scope whose query sleeps in the database: the plan waits on it with its partial
    // folder made.
    let scope = "SELECT id FROM knowledge_chunks, pg_sleep(120) WHERE equipment_family_id = $1";
    for (signal, code) in [
        (nix::sys::signal::Signal::SIGTERM, 143),
        (nix::sys::signal::Signal::SIGINT, 130),
    ] {
        let child = spawn(
            &env,
            &[
                "plan",
                "--family-id",
                &family.to_string(),
                "--scope-sql",
                scope,
            ],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while active_queries_of(&env, &application_name).await == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the plan's query never started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(partial_folders(&env).len(), 1, "{:?}", env.run_folders());
        let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let run = tokio::time::timeout(Duration::from_secs(20), finish(child))
            .await
            .expect("the plan stops soon after the signal");
        assert_eq!(run.code, code, "{run:#?}");
        assert!(run.stderr.contains(signal.as_str()), "{run:#?}");
        assert!(run.stdout.is_empty(), "{run:#?}");
        assert!(partial_folders(&env).is_empty(), "{:?}", env.run_folders());
        // The query was cancelled, not left sleeping in the database.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while active_queries_of(&env, &application_name).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the plan's query still runs in the database"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(env.run_folders().is_empty(), "{:?}", env.run_folders());
}

#[tokio::test]
async fn a_family_id_too_long_for_a_folder_name_says_so() {
    let env = TestEnv::empty().await;
    env.client
        .batch_execute(
            "CREATE TABLE notes (id bigint PRIMARY KEY, fam text, content text, embedding vector(8));",
        )
        .await
        .unwrap();
    let family = "f".repeat(300);
    env.client
        .execute("INSERT INTO notes VALUES (1, $1, 'text', NULL)", &[&family])
        .await
        .unwrap();
    let run = env.run(&[
        "plan",
        "--family-id",
        &family,
        "--table",
        "notes",
        "--family-column",
        "fam",
        "--family-table",
        "none",
    ]);
    run.assert_error("the family id is too long to name its folder under the runs dir");
    assert!(run.stderr.contains("--scope-sql"), "{run:#?}");
}
