use std::path::Path;

use super::*;

#[test]
fn clap_definition_is_consistent() {
    command().debug_assert();
}

#[test]
fn global_flags_work_after_the_subcommand_and_flags_beat_env() {
    let parsed = parse([
        "embatch",
        "plan",
        "--family-id",
        "f1",
        "--runs-dir",
        "/tmp/r",
        "--family-table",
        "none",
        "--api-key",
        "sk-x",
    ])
    .unwrap();
    assert!(parsed.api_key_on_command_line);
    assert_eq!(parsed.config.global.runs_dir, PathBuf::from("/tmp/r"));
    let Command::Plan(plan) = parsed.config.command else {
        panic!("expected plan");
    };
    assert_eq!(plan.source.family_table, None);
    assert_eq!(plan.limits.max_requests, 50_000);
}

#[test]
fn embed_takes_plan_source_flags_and_keeps_ids_as_given() {
    let parsed = parse([
        "embatch",
        "embed",
        "--chunk-id",
        "a",
        "--chunk-id",
        " a ",
        "--chunk-id",
        "b",
        "--table",
        "s.parts",
        "--dimensions",
        "512",
        "--model",
        "text-embedding-3-large",
        "--overwrite",
    ])
    .unwrap();
    let Command::Embed(embed) = parsed.config.command else {
        panic!("expected embed");
    };
    assert_eq!(embed.chunk_ids, ["a", "a", "b"]);
    assert!(embed.overwrite);
    assert_eq!(embed.realtime.source.table, "s.parts");
    assert_eq!(embed.realtime.dimensions, Some(512));
    assert_eq!(embed.realtime.model, "text-embedding-3-large");
    for bad in [
        vec!["embatch", "embed"],
        vec!["embatch", "embed", "--chunk-id", " "],
        vec!["embatch", "embed", "--chunk-id", "a", "--family-id", "f"],
        vec!["embatch", "serve", "--max-connections", "0"],
    ] {
        assert_eq!(parse(bad).err().unwrap().exit_code(), 2);
    }
}

#[test]
fn serve_config_never_shows_the_token() {
    let parsed = parse(["embatch", "serve", "--listen", "127.0.0.1:0"]).unwrap();
    let Command::Serve(mut serve) = parsed.config.command else {
        panic!("expected serve");
    };
    serve.token = Some("s3cret-token".to_owned());
    let shown = format!("{serve:?}");
    assert!(!shown.contains("s3cret-token"), "{shown}");
    assert_eq!(serve.max_connections, 16);
    assert_eq!(serve.max_http_connections, 512);
    assert_eq!(serve.header_timeout, std::time::Duration::from_secs(30));
    for bad in ["0s", "2h", "soon"] {
        let err = parse(["embatch", "serve", "--header-timeout", bad]).err();
        assert_eq!(err.map(|e| e.exit_code()), Some(2), "{bad}");
    }
}

#[test]
fn passwords_in_connection_strings_are_seen() {
    for with in [
        "postgres://u:pw@h/db",
        "postgresql://u:p%40w@h1:5432,h2/db?sslmode=require",
        "postgres://u@h/db?sslmode=require&password=pw",
        "host=h password=pw dbname=d",
        "password = 'p w' host=h",
        "host=h\tpassword=pw",
    ] {
        assert!(connection_string_has_password(with), "{with}");
    }
    for without in [
        "postgres://u@h/db",
        "postgres://h/db?sslmode=require",
        "host=h user=u dbname=password",
        "host=h passwordfile=x",
        "host=/tmp dbname=d",
    ] {
        assert!(!connection_string_has_password(without), "{without}");
    }
    let parsed = parse(["embatch", "runs", "--database-url", "postgres://u:pw@h/db"]).unwrap();
    assert!(parsed.database_password_on_command_line);
    assert!(!parsed.api_key_on_command_line);
    let parsed = parse(["embatch", "--database-url", "postgres://u@h/db", "runs"]).unwrap();
    assert!(!parsed.database_password_on_command_line);
}

#[test]
fn dotenv_errors_name_the_file_and_never_quote_a_line() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(load_dotenv(dir.path()), Ok(()), "no .env is fine");
    let secret = "pw-in-a-broken-line";
    fs_err::write(
        dir.path().join(".env"),
        format!("DATABASE_URL=\"postgres://u:{secret}@h/db\n"),
    )
    .unwrap();
    let err = load_dotenv(dir.path()).unwrap_err();
    assert!(err.contains(".env is not a valid .env file"), "{err}");
    assert!(!err.contains(secret), "{err}");
    fs_err::write(dir.path().join(".env"), b"KEY=\xff\xfe\n").unwrap();
    let err = load_dotenv(dir.path()).unwrap_err();
    assert!(err.contains("not UTF-8"), "{err}");
    assert_eq!(dotenv_key("export A_B.c = 'x"), Some("A_B.c"));
    assert_eq!(dotenv_key("'quoted=x"), None);
}

#[test]
fn too_many_requests_per_batch_is_a_usage_error() {
    let err = parse([
        "embatch",
        "plan",
        "--family-id",
        "f",
        "--max-requests-per-batch",
        "50001",
    ])
    .err()
    .unwrap();
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn bytes_per_batch_above_the_providers_cap_is_a_usage_error() {
    let with = |bytes: &str| {
        parse([
            "embatch",
            "submit",
            "--family-id",
            "f",
            "--max-bytes-per-batch",
            bytes,
        ])
    };
    let err = with("209715201").err().unwrap();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("1..=209715200"), "{err}");
    assert!(with("209715200").is_ok());
}

/// The help of `args` (e.g. `["plan", "--help"]`) as the binary prints it, at 100 columns.
fn help_of(args: &[&str]) -> String {
    let err = command()
        .term_width(100)
        .try_get_matches_from(std::iter::once("embatch").chain(args.iter().copied()))
        .expect_err("--help ends parsing");
    assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
    err.render().to_string()
}

const SUBCOMMANDS: [&str; 12] = [
    "plan", "status", "runs", "advance", "ingest", "run", "cancel", "emulator", "submit", "embed",
    "serve", "sync",
];

#[test]
fn every_commands_help_is_pinned() {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.bind(|| {
        insta::assert_snapshot!("help_embatch", help_of(&["--help"]));
        for name in SUBCOMMANDS {
            insta::assert_snapshot!(format!("help_{name}"), help_of(&[name, "--help"]));
        }
    });
}

#[test]
fn help_lists_only_the_options_a_command_uses() {
    let listed = |name: &str, flag: &str| help_of(&[name, "--help"]).contains(flag);
    for name in ["plan", "runs", "emulator"] {
        // The option's own line (other help text may name it).
        assert!(!listed(name, "--base-url <"), "{name} lists --base-url");
        assert!(
            !listed(name, "--api-retries <"),
            "{name} lists --api-retries"
        );
    }
    assert!(!listed("runs", "--database-url"));
    assert!(!listed("emulator", "--database-url"));
    assert!(!listed("status", "--database-url"));
    assert!(listed("plan", "--database-url"));
    assert!(listed("emulator", "--api-key"));
    assert!(listed("advance", "--base-url"));
    // The exit-code footer only where 75 can happen.
    assert!(!listed("runs", "75"));
    assert!(!listed("emulator", "75"));
    assert!(listed("advance", "75"));
    // No empty environment values, whatever the environment holds.
    for name in SUBCOMMANDS {
        assert!(!help_of(&[name, "--help"]).contains("=]"), "{name}");
    }
}

#[test]
fn hidden_options_are_still_accepted_before_or_after_the_command() {
    for args in [
        &[
            "embatch",
            "runs",
            "--database-url",
            "postgres://h/db",
            "--api-key",
            "k",
        ][..],
        &["embatch", "--database-url", "postgres://h/db", "runs"][..],
        &[
            "embatch",
            "plan",
            "--family-id",
            "f",
            "--base-url",
            "http://x/v1",
            "--api-retries",
            "2",
        ][..],
        &[
            "embatch",
            "emulator",
            "--runs-dir",
            "/tmp/r",
            "--organization",
            "o",
        ][..],
        &[
            "embatch",
            "status",
            "--run-dir",
            "r",
            "--database-url",
            "postgres://h/db",
        ][..],
    ] {
        let parsed = parse(args.iter().copied()).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(parsed.config.global.api.max_retries >= 2, "{args:?}");
    }
    let parsed = parse([
        "embatch",
        "plan",
        "--family-id",
        "f",
        "--api-retries",
        "2",
        "--runs-dir",
        "/r",
    ])
    .unwrap();
    assert_eq!(parsed.config.global.api.max_retries, 2);
    assert_eq!(parsed.config.global.runs_dir, PathBuf::from("/r"));
    let parsed = parse(["embatch", "--api-retries", "3", "runs"]).unwrap();
    assert_eq!(parsed.config.global.api.max_retries, 3);
    let parsed = parse(["embatch", "runs", "--api-retries", "4"]).unwrap();
    assert_eq!(parsed.config.global.api.max_retries, 4);
}

#[test]
fn provider_and_direct_flags_reach_the_config() {
    let parsed = parse([
        "embatch",
        "run",
        "--family-id",
        "f1",
        "--provider",
        "direct",
        "--base-url",
        "http://127.0.0.1:8080/v1/",
        "--direct-batch-size",
        "16",
        "--direct-concurrency",
        "2",
        "--max-requests-per-minute",
        "600",
        "--max-tokens-per-minute",
        "100000",
    ])
    .unwrap();
    // `--base-url` on the command line is the direct server's too; OpenAI's never is.
    assert_eq!(
        parsed.config.global.api.direct.base_url.as_deref(),
        Some("http://127.0.0.1:8080/v1")
    );
    let Command::Run(run) = parsed.config.command else {
        panic!("expected run");
    };
    assert_eq!(run.plan.provider, Provider::Direct);
    let direct = &run.opts.direct;
    assert!(direct.send, "run sends its direct requests");
    assert_eq!((direct.inputs_per_request, direct.concurrency), (16, 2));
    assert_eq!(direct.max_requests_per_minute.map(|n| n.get()), Some(600));
    assert_eq!(direct.max_tokens_per_minute.map(|n| n.get()), Some(100_000));

    let parsed = parse(["embatch", "submit", "--family-id", "f1"]).unwrap();
    let Command::Submit(submit) = parsed.config.command else {
        panic!("expected submit");
    };
    assert_eq!(submit.plan.provider, Provider::Openai);
    assert!(
        !submit.opts.direct.send,
        "submit never sends direct requests"
    );

    let parsed = parse(["embatch", "serve", "--provider", "direct"]).unwrap();
    let Command::Serve(serve) = parsed.config.command else {
        panic!("expected serve");
    };
    assert_eq!(serve.realtime.provider, Provider::Direct);
}

#[test]
fn a_direct_time_budget_is_for_a_plain_advance() {
    let parsed = parse([
        "embatch",
        "advance",
        "--run-dir",
        "r",
        "--direct-time-budget",
        "10m",
    ])
    .unwrap();
    let Command::Advance(advance) = parsed.config.command else {
        panic!("expected advance");
    };
    assert_eq!(
        advance.opts.direct.time_budget,
        Some(std::time::Duration::from_secs(600))
    );
    let err = parse([
        "embatch",
        "advance",
        "--run-dir",
        "r",
        "--wait",
        "--direct-time-budget",
        "10m",
    ])
    .err()
    .expect("--wait and a time budget conflict");
    assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    assert!(
        parse([
            "embatch",
            "plan",
            "--family-id",
            "f",
            "--provider",
            "cohere"
        ])
        .is_err()
    );
}

#[test]
fn sync_sends_direct_runs_with_its_direct_flags() {
    let parsed = parse([
        "embatch",
        "sync",
        "--provider",
        "direct",
        "--direct-batch-size",
        "8",
        "--max-requests-per-minute",
        "120",
    ])
    .unwrap();
    let Command::Sync(sync) = parsed.config.command else {
        panic!("expected sync");
    };
    assert!(
        sync.opts.direct.send,
        "sync sends its direct runs' requests"
    );
    assert_eq!(sync.opts.direct.inputs_per_request, 8);
    assert_eq!(
        sync.opts.direct.max_requests_per_minute.map(|n| n.get()),
        Some(120)
    );
}
