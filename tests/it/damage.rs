//! Damaged local state (issue 6, item 2): a `run.json` that is truncated, not JSON, empty or
//! from a newer embatch, and a run folder that lost a batch's `input.jsonl` or `output.jsonl`.
//! Every command refuses with one line naming the file and the way out, never rewrites
//! `run.json` or `run.json.bak`, and following the way out finishes the run with nothing lost
//! and nothing paid twice.

use embatch::emulator::EmulatorConfig;
use embatch::run::state::StateKind;
use embatch::run::store;
use serde_json::Value;

use crate::advance::advance_until_finished;
use crate::harness::{Run, TestEnv, bytes_of, count_embedded_exactly, family_of, read};

/// A run whose only batch is downloaded but not ingested: the database was away.
async fn downloaded_run(n: usize) -> (TestEnv, uuid::Uuid, std::path::PathBuf) {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_of(&env, 1, n).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let away = env
        .exec_env(
            &["advance", "--run-dir", run_dir.to_str().unwrap()],
            &[("DATABASE_URL", "host=/nonexistent dbname=x")],
        )
        .await;
    assert_eq!(away.code, 1, "{away:#?}");
    assert_eq!(
        store::load(&run_dir).unwrap().batches[0].state.kind(),
        StateKind::Downloaded
    );
    (env, family, run_dir)
}

#[track_caller]
fn assert_one_line_error(run: &Run, needles: &[&str], what: &str) {
    assert_eq!(run.code, 1, "{what}: expected exit 1: {run:#?}");
    assert!(
        run.stdout.is_empty(),
        "{what}: stdout should be empty: {run:#?}"
    );
    assert!(!run.stderr.contains("panicked"), "{what}: {run:#?}");
    // Progress lines may come first; the error is one line, the last.
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: one error line: {run:#?}");
    assert_eq!(
        run.stderr.trim_end().lines().last(),
        Some(errors[0]),
        "{what}: the error comes last: {run:#?}"
    );
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "{what}: error lacks {needle:?}: {run:#?}"
        );
    }
}

#[tokio::test]
async fn a_damaged_run_json_is_refused_by_every_command_and_never_rewritten() {
    let (env, family, run_dir) = downloaded_run(6).await;
    let dir = run_dir.to_str().unwrap();
    let run_json = run_dir.join("run.json");
    let backup = run_dir.join("run.json.bak");
    let path = run_json.display().to_string();
    let backup_path = backup.display().to_string();
    let good = read(&run_json);
    let good_backup = bytes_of(&backup).expect("advance kept the previous run.json");
    let previous = store::parse(&good_backup, &backup).expect("the backup is a valid run.json");
    let current = store::load(&run_dir).unwrap();
    assert!(previous.updated_at <= current.updated_at);
    assert_ne!(
        previous, current,
        "the backup is the state before the last save"
    );
    let family = family.to_string();
    let batch_json = run_dir.join("batches/batch_001/batch.json");
    let batch_json = batch_json.to_str().unwrap();

    let newer = good.replacen("\"schema_version\": 1", "\"schema_version\": 9", 1);
    assert_ne!(newer, good);
    let damages: [(&str, Vec<u8>, &str); 4] = [
        (
            "truncated",
            good.as_bytes()[..good.len() / 2].to_vec(),
            "restore it from",
        ),
        (
            "not json",
            b"this is not json\n".to_vec(),
            "restore it from",
        ),
        ("empty", Vec::new(), "restore it from"),
        ("newer schema", newer.into_bytes(), "upgrade embatch"),
    ];
    let commands: Vec<Vec<&str>> = vec![
        vec!["advance", "--run-dir", dir],
        vec!["advance", "--run-dir", dir, "--wait", "--poll-seconds", "1"],
        vec!["ingest", "--run-dir", dir],
        vec!["ingest", "--run-dir", dir, "--redownload"],
        vec!["cancel", "--run-dir", dir],
        vec!["status", "--run-dir", dir],
        vec!["status", "--run-dir", dir, "--json"],
        vec!["status", "--run-dir", dir, "--refresh"],
        vec!["status", "--batch-file", batch_json],
        // New runs of the family: an unreadable run may hold its chunks.
        vec!["plan", "--family-id", &family],
        vec!["submit", "--family-id", &family],
        vec!["run", "--family-id", &family, "--poll-seconds", "1"],
    ];
    let counters = env.emu().counters();
    for (damage, bytes, way_out) in &damages {
        fs_err::write(&run_json, bytes).unwrap();
        for args in &commands {
            let what = format!("{damage}: {}", args.join(" "));
            let run = env.exec(args).await;
            let mut needles = vec![path.as_str(), *way_out];
            if *way_out == "restore it from" {
                needles.push(&backup_path);
            }
            assert_one_line_error(&run, &needles, &what);
            assert_eq!(
                bytes_of(&run_json).as_deref(),
                Some(bytes.as_slice()),
                "{what} rewrote run.json"
            );
            assert_eq!(
                bytes_of(&backup).as_deref(),
                Some(good_backup.as_slice()),
                "{what} rewrote run.json.bak"
            );
            assert_eq!(
                env.run_folders(),
                std::slice::from_ref(&run_dir),
                "{what} made a run"
            );
        }
        // `runs` lists it as unreadable instead of failing on it.
        let runs = env.exec(&["runs"]).await;
        assert_eq!(runs.code, 0, "{runs:#?}");
        assert!(runs.stdout.contains("unreadable"), "{runs:#?}");
    }
    assert_eq!(
        env.emu().counters(),
        counters,
        "a refused command called the API"
    );

    // The way out the message gives: restore the backup, run again. Nothing lost, nothing
    // paid twice.
    fs_err::copy(&backup, &run_json).unwrap();
    advance_until_finished(&env, &run_dir, 5).await;
    let family: uuid::Uuid = family.parse().unwrap();
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 6);
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn a_damaged_run_json_without_a_backup_says_to_plan_again() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 2).await;
    let run_dir = env.plan(family, &[]).run_dir();
    assert!(
        !run_dir.join("run.json.bak").exists(),
        "a plan writes run.json once"
    );
    let run_json = run_dir.join("run.json");
    fs_err::write(&run_json, b"{\"schema_version\": 1, \"run_id\": ").unwrap();
    let run = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap()])
        .await;
    assert_one_line_error(
        &run,
        &[
            &run_json.display().to_string(),
            "there is no",
            "plan the run again",
        ],
        "status",
    );
    assert!(!run_dir.join("run.json.bak").exists());
}

#[tokio::test]
async fn a_lost_output_file_is_named_and_redownload_recovers_it() {
    let (env, family, run_dir) = downloaded_run(30).await;
    let dir = run_dir.to_str().unwrap();
    // Half ingested, then killed: the saved position points into the file about to be lost.
    let killed = env
        .exec_env(
            &["advance", "--run-dir", dir, "--update-chunk-size", "10"],
            &[("EMBATCH_CRASH_AT", "ingest_commit:1")],
        )
        .await;
    assert!(killed.killed(), "{killed:#?}");
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 10);

    let output = run_dir.join("batches/batch_001/output.jsonl");
    fs_err::remove_file(&output).unwrap();
    let run_json = bytes_of(run_dir.join("run.json"));
    let backup = bytes_of(run_dir.join("run.json.bak"));
    let output_path = output.display().to_string();
    let way_out = format!("embatch ingest --run-dir {dir} --redownload");
    for args in [
        vec!["advance", "--run-dir", dir],
        vec!["ingest", "--run-dir", dir],
    ] {
        let run = env.exec(&args).await;
        assert_one_line_error(&run, &[&output_path, &way_out], &args.join(" "));
        assert_eq!(bytes_of(run_dir.join("run.json")), run_json, "{args:?}");
        assert_eq!(bytes_of(run_dir.join("run.json.bak")), backup, "{args:?}");
    }
    // status only reads: it still shows the run, and warns about the lost file.
    let status = env.exec(&["status", "--run-dir", dir, "--json"]).await;
    assert_eq!(status.code, 0, "{status:#?}");
    serde_json::from_str::<Value>(&status.stdout).expect("status --json still prints JSON");
    assert!(
        status.stderr.starts_with("warning: ") && status.stderr.contains(&way_out),
        "{status:#?}"
    );

    // The way out, end to end against the emulator.
    let downloads = env.emu().counters().downloads;
    let run = env
        .exec(&["ingest", "--run-dir", dir, "--redownload"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(output.exists());
    assert!(env.emu().counters().downloads > downloads);
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 30);
    let status = env.exec(&["status", "--run-dir", dir, "--json"]).await;
    let status: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["totals"]["ingested"], 30, "{status}");
    assert_eq!(status["totals"]["failed"], 0, "{status}");
    assert_eq!(status["totals"]["pending"], 0, "{status}");
    advance_until_finished(&env, &run_dir, 3).await;
    assert_eq!(env.emu().counters().batch_creations, 1);
}

#[tokio::test]
async fn a_lost_input_file_is_named_and_a_new_plan_finishes_the_family() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_of(&env, 1, 4).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "2"])
        .run_dir();
    let dir = run_dir.to_str().unwrap();
    let input = run_dir.join("batches/batch_002/input.jsonl");
    fs_err::remove_file(&input).unwrap();

    let cancel = format!("embatch cancel --run-dir {dir}");
    let status = env.exec(&["status", "--run-dir", dir]).await;
    assert_eq!(status.code, 0, "{status:#?}");
    assert!(status.stderr.contains(&cancel), "{status:#?}");
    let run = env.exec(&["advance", "--run-dir", dir]).await;
    assert_one_line_error(
        &run,
        &[&input.display().to_string(), &cancel, "plan again"],
        "advance",
    );
    // The batch that could go went, and was saved; the other was never uploaded.
    let saved = store::load(&run_dir).unwrap();
    assert_eq!(saved.batches[0].state.kind(), StateKind::Ingested);
    assert_eq!(saved.batches[1].state.kind(), StateKind::Planned);
    assert_eq!(env.emu().counters().uploads, 1);
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 2);
    // Again: the same refusal, nothing uploaded.
    let again = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(again.code, 1, "{again:#?}");
    assert_eq!(env.emu().counters().uploads, 1);

    // The way out: cancel, plan again, finish.
    let run = env.exec(&["cancel", "--run-dir", dir]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    let second = env.plan(family, &[]).run_dir();
    assert_eq!(store::load(&second).unwrap().plan.chunks, 2);
    advance_until_finished(&env, &second, 5).await;
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 4);
    assert_eq!(env.emu().counters().batch_creations, 2);
}

/// `status` of a run folder whose path is given wrong stays a clear error too.
#[tokio::test]
async fn a_folder_without_run_json_is_not_taken_for_a_run() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let empty = env.dir.path().join("not-a-run");
    fs_err::create_dir_all(&empty).unwrap();
    let dir = empty.to_str().unwrap();
    for args in [
        vec!["advance", "--run-dir", dir],
        vec!["ingest", "--run-dir", dir],
        vec!["cancel", "--run-dir", dir],
        vec!["status", "--run-dir", dir],
    ] {
        let run = env.exec(&args).await;
        assert_one_line_error(&run, &["is not an embatch run"], &args.join(" "));
        assert!(
            !empty.join("run.json").exists(),
            "{args:?} created a run.json"
        );
        assert!(!empty.join("run.lock").exists(), "{args:?} left a run.lock");
    }
}

#[tokio::test]
async fn a_lost_chunk_list_of_an_unfinished_run_blocks_a_new_plan_with_the_way_out() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 4).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    let input = run_dir.join("batches/batch_001/input.jsonl");
    fs_err::remove_file(&chunks).unwrap();
    let planned_input = bytes_of(&input).unwrap();
    fs_err::write(&input, &planned_input[..planned_input.len() / 2]).unwrap();
    let before = bytes_of(run_dir.join("run.json"));

    // The unfinished run may hold every chunk of the family: planning them again could pay
    // twice, and neither of its evidence files tells which it holds.
    let again = env.plan(family, &[]);
    assert_one_line_error(
        &again,
        &[
            &format!("{} is missing", chunks.display()),
            &format!("{} differs from the file planned", input.display()),
            &format!("embatch cancel --run-dir {dir}"),
            "--force",
        ],
        "plan beside a run that lost chunks.tsv and input.jsonl",
    );
    assert_eq!(bytes_of(run_dir.join("run.json")), before);
    assert_eq!(env.run_folders().len(), 1, "no second run folder");

    // --force plans anyway, as the message says.
    let forced = env.plan(family, &["--force"]).run_dir();
    assert_eq!(store::load(&forced).unwrap().plan.chunks, 4);
}

/// Issue 14: plan's held-chunk check reads another run's `chunks.tsv` only when it is the
/// file planned; a truncated or garbled one is not trusted, the ids come from that batch's
/// intact `input.jsonl`, and nothing is written into that run's folder.
#[tokio::test]
async fn a_damaged_chunk_list_of_an_unfinished_run_still_holds_all_its_chunks() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 8).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "4"])
        .run_dir();
    let chunks = run_dir.join("batches/batch_002/chunks.tsv");
    let planned = bytes_of(&chunks).unwrap();
    // The header and one record: three of the batch's chunks are no longer listed.
    let cut = planned
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .map(|(i, _)| i + 1)
        .unwrap();
    let mut garbled = planned.clone();
    // Inside the last id: one chunk of the batch is listed under an id no chunk has.
    let at = planned.len() - 80;
    garbled[at] = if garbled[at] == b'0' { b'1' } else { b'0' };
    for damaged in [planned[..cut].to_vec(), garbled] {
        fs_err::write(&chunks, &damaged).unwrap();
        let again = env.plan(family, &[]);
        assert_one_line_error(
            &again,
            &[
                "nothing new to plan",
                "8 pending chunks are held by the run",
            ],
            "plan beside a run whose chunks.tsv is damaged",
        );
        assert_eq!(env.run_folders().len(), 1, "no second run folder");
        assert_eq!(bytes_of(&chunks), Some(damaged), "left as found");
    }
}

/// A run planned before the digests were recorded: a short `chunks.tsv` cannot be checked
/// against anything, so a new plan beside it is refused with the way out.
#[tokio::test]
async fn a_short_chunk_list_of_an_unfinished_run_without_digests_blocks_a_new_plan() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 5).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    let run_json = run_dir.join("run.json");
    let mut value: Value = serde_json::from_str(&read(&run_json)).unwrap();
    value["batches"][0]
        .as_object_mut()
        .unwrap()
        .remove("files")
        .expect("the digests were recorded");
    fs_err::write(&run_json, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    let short: String = read(&chunks)
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    fs_err::write(&chunks, short).unwrap();

    let again = env.plan(family, &[]);
    assert_one_line_error(
        &again,
        &[
            &chunks.display().to_string(),
            "lists 2 chunks; the batch has 5 requests",
            "planned before embatch recorded digests",
            &format!("embatch cancel --run-dir {dir}"),
            "--force",
        ],
        "plan beside an old run with a short chunks.tsv",
    );
    assert_eq!(env.run_folders().len(), 1, "no second run folder");
}

// ------------------------------------------------------------------------------------------
// The evidence files (issue 14, item 3): `chunks.tsv` and `input.jsonl` checked against the
// digests `plan` recorded in run.json.

/// Every vector of the family written exactly, by one batch creation, and the run finished.
async fn assert_finished_with_every_vector(
    env: &TestEnv,
    family: uuid::Uuid,
    run_dir: &std::path::Path,
    n: usize,
) {
    advance_until_finished(env, run_dir, 5).await;
    assert_eq!(count_embedded_exactly(env, family, 1536).await, n);
    assert_eq!(env.emu().counters().batch_creations, 1, "paid twice");
    let status = env
        .exec(&["status", "--run-dir", run_dir.to_str().unwrap(), "--json"])
        .await;
    let status: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["totals"]["ingested"], n, "{status}");
    assert_eq!(status["totals"]["failed"], 0, "{status}");
}

#[tokio::test]
async fn plan_records_the_digests_of_its_evidence_files() {
    let env = TestEnv::new().await;
    let (family, _) = family_of(&env, 1, 5).await;
    let run_dir = env
        .plan(family, &["--max-requests-per-batch", "3"])
        .run_dir();
    let run = store::load(&run_dir).unwrap();
    assert_eq!(run.batches.len(), 2);
    for batch in &run.batches {
        let files = batch.files.as_ref().expect("plan records the digests");
        let dir = run_dir.join("batches").join(&batch.name);
        assert_eq!(files.input.rows, batch.requests);
        assert_eq!(files.chunks.rows, batch.requests);
        assert_eq!(
            files.input,
            store::FileDigest::of_file(&dir.join("input.jsonl"), 0).unwrap()
        );
        assert_eq!(
            files.chunks.sha256,
            sha256_hex(&bytes_of(dir.join("chunks.tsv")).unwrap())
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn a_truncated_chunk_list_is_rebuilt_from_its_intact_input() {
    let (env, family, run_dir) = downloaded_run(8).await;
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    let planned = bytes_of(&chunks).unwrap();
    // Cut after the third record: the five other paid vectors would have had no chunk.
    let cut = planned
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(3)
        .map(|(i, _)| i + 1)
        .unwrap();
    fs_err::write(&chunks, &planned[..cut]).unwrap();

    let run = env
        .exec(&["advance", "--run-dir", run_dir.to_str().unwrap()])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(
        run.stderr.contains(&format!(
            "warning: {} differs from the file planned",
            chunks.display()
        )) && run.stderr.contains("rebuilt it from"),
        "{run:#?}"
    );
    assert_eq!(bytes_of(&chunks).unwrap(), planned, "rebuilt byte for byte");
    assert_finished_with_every_vector(&env, family, &run_dir, 8).await;
}

#[tokio::test]
async fn a_damaged_chunk_list_beside_a_damaged_input_stops_ingest_and_keeps_the_output() {
    let (env, family, run_dir) = downloaded_run(8).await;
    let dir = run_dir.to_str().unwrap();
    let batch = run_dir.join("batches/batch_001");
    let (chunks, input, output) = (
        batch.join("chunks.tsv"),
        batch.join("input.jsonl"),
        batch.join("output.jsonl"),
    );
    let planned_chunks = bytes_of(&chunks).unwrap();
    let planned_input = bytes_of(&input).unwrap();
    let downloaded = bytes_of(&output).unwrap();
    // Garbled in place (same length): an id no longer matches its line.
    let mut garbled = planned_chunks.clone();
    let at = garbled.len() / 2;
    garbled[at] ^= 0x01;
    fs_err::write(&chunks, &garbled).unwrap();
    fs_err::write(&input, &planned_input[..planned_input.len() - 10]).unwrap();

    for args in [
        vec!["advance", "--run-dir", dir],
        vec!["ingest", "--run-dir", dir],
    ] {
        let run = env.exec(&args).await;
        assert_one_line_error(
            &run,
            &[
                &chunks.display().to_string(),
                &input.display().to_string(),
                "restore",
                &format!("{} is kept", output.display()),
            ],
            &args.join(" "),
        );
        assert_eq!(bytes_of(&output).as_deref(), Some(downloaded.as_slice()));
        assert_eq!(
            bytes_of(&chunks).as_deref(),
            Some(garbled.as_slice()),
            "left as found"
        );
        assert_eq!(
            store::load(&run_dir).unwrap().batches[0].state.kind(),
            StateKind::Downloaded
        );
    }
    assert_eq!(count_embedded_exactly(&env, family, 1536).await, 0);

    // The way out: restore the file, run again.
    fs_err::write(&chunks, &planned_chunks).unwrap();
    assert_finished_with_every_vector(&env, family, &run_dir, 8).await;
}

/// A run planned before the digests were recorded: a short `chunks.tsv` is refused (it was
/// silently taken before), and cannot be rebuilt.
#[tokio::test]
async fn a_short_chunk_list_of_a_run_without_digests_is_refused() {
    let (env, family, run_dir) = downloaded_run(6).await;
    let dir = run_dir.to_str().unwrap();
    let run_json = run_dir.join("run.json");
    let mut value: Value = serde_json::from_str(&read(&run_json)).unwrap();
    value["batches"][0]
        .as_object_mut()
        .unwrap()
        .remove("files")
        .expect("the digests were recorded");
    fs_err::write(&run_json, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    let planned = read(&chunks);
    let short: String = planned.lines().take(4).map(|l| format!("{l}\n")).collect();
    fs_err::write(&chunks, short).unwrap();

    let run = env.exec(&["ingest", "--run-dir", dir]).await;
    assert_one_line_error(
        &run,
        &[
            &chunks.display().to_string(),
            "lists 3 chunks; the batch has 6 requests",
            "planned before embatch recorded digests",
        ],
        "ingest",
    );
    fs_err::write(&chunks, planned).unwrap();
    assert_finished_with_every_vector(&env, family, &run_dir, 6).await;
}

#[tokio::test]
async fn an_input_file_changed_after_plan_is_never_uploaded() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let (family, _) = family_of(&env, 1, 4).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let dir = run_dir.to_str().unwrap();
    let input = run_dir.join("batches/batch_001/input.jsonl");
    let planned = read(&input);
    // Same rows, same size: one input text edited by hand.
    let edited = planned.replacen("grease bearing", "grease BEARING", 1);
    assert_ne!(edited, planned);
    fs_err::write(&input, &edited).unwrap();

    for _ in 0..2 {
        let run = env.exec(&["advance", "--run-dir", dir]).await;
        assert_one_line_error(
            &run,
            &[
                &input.display().to_string(),
                "differs from the file planned",
                "was not uploaded",
                &format!("embatch cancel --run-dir {dir}"),
            ],
            "advance",
        );
        let counters = env.emu().counters();
        assert_eq!((counters.uploads, counters.batch_creations), (0, 0));
        assert_eq!(
            store::load(&run_dir).unwrap().batches[0].state.kind(),
            StateKind::Planned
        );
    }
    // A damaged chunks.tsv beside the restored input is rebuilt before the upload.
    fs_err::write(&input, &planned).unwrap();
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    fs_err::write(&chunks, "id\tsha256\ttokens\n").unwrap();
    let run = env.exec(&["advance", "--run-dir", dir]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.contains("rebuilt it from"), "{run:#?}");
    assert_finished_with_every_vector(&env, family, &run_dir, 4).await;
}

/// With `--on-too-long truncate`, chunks.tsv holds the hash of a truncated chunk's whole
/// content, which input.jsonl does not hold: the rebuild is refused, never guessed.
#[tokio::test]
async fn a_chunk_list_with_truncated_inputs_is_not_rebuilt() {
    let env = TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await;
    let family = env.add_family(1).await;
    let long = "pump seal bearing valve ".repeat(3000);
    env.add_chunks(family, &["a short chunk", &long]).await;
    let run_dir = env.plan(family, &["--on-too-long", "truncate"]).run_dir();
    let dir = run_dir.to_str().unwrap();
    assert_eq!(store::load(&run_dir).unwrap().plan.truncated, 1);
    let chunks = run_dir.join("batches/batch_001/chunks.tsv");
    fs_err::write(&chunks, "id\tsha256\ttokens\n").unwrap();
    let run = env.exec(&["advance", "--run-dir", dir]).await;
    assert_one_line_error(
        &run,
        &[
            &chunks.display().to_string(),
            "does not give back the file planned",
            "truncates inputs",
        ],
        "advance",
    );
    assert_eq!(env.emu().counters().uploads, 0);
}
