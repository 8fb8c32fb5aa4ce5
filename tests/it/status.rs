//! `status` and `runs`: the local view of a small plan, pinned by snapshots.

use serde_json::Value;

use crate::harness::{TestEnv, read, snapshot_settings};

#[tokio::test]
async fn small_plan_snapshots_run_json_and_status() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(
        family,
        &[
            "Check the coolant level before each shift.",
            "",
            "Bleed the brakes after replacing the master cylinder.",
            "Torque wheel nuts to 120 N·m in a star pattern.",
        ],
    )
    .await;
    let run = env.plan(family, &["--max-requests-per-batch", "2"]);
    let run_dir = run.run_dir();
    let run_dir_str = run_dir.display().to_string();

    let run_json: Value = serde_json::from_str(&read(run_dir.join("run.json"))).unwrap();
    let status_json = env.run(&["status", "--run-dir", &run_dir_str, "--json"]);
    assert_eq!(status_json.code, 0, "{status_json:#?}");
    let status_value: Value = serde_json::from_str(&status_json.stdout).unwrap();
    assert_eq!(status_value["totals"]["chunks"], 3);
    assert_eq!(status_value["totals"]["skipped"], 1);
    assert_eq!(status_value["totals"]["pending"], 3);
    assert_eq!(status_value["batches"][0]["state"], "planned");
    assert_eq!(status_value["batches"][0]["batch_id"], Value::Null);

    let table = env.run(&["status", "--run-dir", &run_dir_str]);
    assert_eq!(table.code, 0, "{table:#?}");
    assert!(
        !table.stdout.contains('\u{1b}'),
        "no colours when stdout is not a terminal"
    );

    // A narrow terminal (COLUMNS) gets a table that fits it; a pipe gets every column.
    assert!(table.stdout.contains("batch id"), "{table:#?}");
    let narrow = env
        .command()
        .env("COLUMNS", "80")
        .args(["status", "--run-dir", &run_dir_str])
        .output()
        .unwrap();
    let narrow = String::from_utf8(narrow.stdout).unwrap();
    assert!(!narrow.contains("batch id"), "{narrow}");
    for line in narrow.lines() {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line}");
    }

    let one = env.run(&[
        "status",
        "--batch-file",
        &run_dir
            .join("batches/batch_002/batch.json")
            .display()
            .to_string(),
        "--json",
    ]);
    let one_value: Value = serde_json::from_str(&one.stdout).unwrap();
    assert_eq!(one_value["batches"].as_array().unwrap().len(), 1);
    assert_eq!(one_value["batches"][0]["name"], "batch_002");

    let mut settings = snapshot_settings();
    settings.add_filter(r"\d{8}T\d{6}Z-[0-9a-f]{4}", "[run_id]");
    settings.add_filter(&regex_escape(&run_dir_str), "[run_dir]");
    settings.add_filter(r"run_\d{8}_\d{6}_[0-9a-f]{4}", "[run]");
    settings.bind(|| {
        insta::assert_json_snapshot!("small_plan_run_json", run_json, {
            ".run_id" => "[run_id]",
            ".created_at" => "[time]",
            ".updated_at" => "[time]",
            ".embatch_version" => "[version]",
            ".database.system_identifier" => "[system_identifier]",
            ".database.database" => "[database]",
        });
        insta::assert_json_snapshot!("small_plan_status_json", status_value, {
            ".run_id" => "[run_id]",
            ".run_dir" => "[run_dir]",
        });
        insta::assert_snapshot!("small_plan_status_table", table.stdout);
    });

    // `runs` lists it, in both forms.
    let runs = env.run(&["runs", "--json"]);
    let listed: Value = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["run_dir"], run_dir_str.as_str());
    assert_eq!(listed[0]["chunks"], 3);
    assert_eq!(listed[0]["finished"], false);
    assert_eq!(listed[0]["states"]["planned"], 2);
    let runs = env.run(&["runs", "--family-id", &family.to_string()]);
    assert!(runs.stdout.contains(&run_dir_str), "{runs:#?}");
    assert!(runs.stdout.contains("  in progress  "), "{runs:#?}");
    assert!(
        runs.stdout.contains("3 chunks in 2 batches (2 planned)"),
        "{runs:#?}"
    );
}

#[tokio::test]
async fn status_of_a_damaged_or_missing_run_says_what_to_do() {
    let env = TestEnv::new().await;
    let family = env.add_family(1).await;
    env.add_chunks(family, &["text"]).await;
    let run_dir = env.plan(family, &[]).run_dir();
    let run_dir_str = run_dir.display().to_string();

    let run = env.run(&["status", "--run-dir", env.dir.path().to_str().unwrap()]);
    run.assert_error("is not an embatch run");

    let full = read(run_dir.join("run.json"));
    fs_err::write(run_dir.join("run.json"), &full[..full.len() / 2]).unwrap();
    let run = env.run(&["status", "--run-dir", &run_dir_str]);
    run.assert_error("is damaged");
    assert!(run.stderr.contains("run.json.bak"), "{run:#?}");
    // Reading never rewrites the damaged file.
    assert_eq!(read(run_dir.join("run.json")), full[..full.len() / 2]);

    let newer = full.replacen("\"schema_version\": 1", "\"schema_version\": 9", 1);
    fs_err::write(run_dir.join("run.json"), newer).unwrap();
    env.run(&["status", "--run-dir", &run_dir_str])
        .assert_error("upgrade embatch");
}

fn regex_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
