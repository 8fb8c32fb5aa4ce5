//! embatch: embed Postgres text chunks in bulk through the OpenAI Batch API into pgvector.
//!
//! # Layout
//! Folders follow the pipeline, bottom up: the pure core (`models`, `output`, `tsv`, and
//! `plan`'s `tokens`, `request`, `sharder`); `run` (the state machine, `run.json`'s store, the
//! lock, the folder `layout`, the file `evidence`, the run `folders`); `pg` (connection and TLS,
//! the source, the sink) and `provider` (the `BatchProvider` seam and its OpenAI client);
//! `config`; then the stages: `plan`, `advance` (the loop, `decide`, ingest, retries) and the
//! realtime path (`realtime`: `embed`, `serve`), which never touches a run; `sync` plans and
//! advances every family of a table through those two; `status` reads a run back. `cli` turns arguments into a `config::Config` and [`run()`] dispatches; `emulator`
//! serves `embatch emulator`. `testkit` (only with the `testkit` feature, which the tests, the
//! demo and the benchmark enable) starts a throwaway Postgres and makes sample text.
//! `ARCHITECTURE.md` maps DESIGN.md's sections to these modules and lists the invariants;
//! `tests/it/layers.rs` checks that imports point down this order.

pub mod advance;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod emulator;
pub mod exit;
pub mod interrupt;
pub mod models;
pub mod output;
pub mod pg;
pub mod plan;
pub mod printer;
pub mod provider;
pub mod realtime;
pub mod run;
pub mod status;
pub mod sync;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tsv;

use anyhow::bail;

pub use crate::exit::ExitStatus;

use crate::config::{Command, Config, StatusTarget};
use crate::printer::Printer;

/// `plan`, then the run folder as the only stdout line (none when nothing is pending).
///
/// When every pending chunk is held by runs planned but never submitted (by `plan`, `submit
/// --dry-run`, or a `submit` whose advance stopped before creating anything), nothing new is
/// planned: with `continue_unsubmitted` (`submit`, `run`) those runs are the ones to go on
/// with, oldest first, and their folders are printed, one per line; otherwise (`plan`, `submit
/// --dry-run`) it is an error naming the command that submits each — never a silent exit 0.
async fn plan_and_print(
    config: &Config,
    plan_cfg: &config::PlanConfig,
    printer: &Printer,
    now: chrono::DateTime<chrono::Utc>,
    continue_unsubmitted: bool,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    match plan::plan(&config.global, plan_cfg, printer, now).await? {
        plan::PlanOutcome::Planned { run_dir } => {
            printer.data(&run_dir.display().to_string());
            Ok(vec![run_dir])
        }
        plan::PlanOutcome::NothingToDo => Ok(Vec::new()),
        plan::PlanOutcome::HeldByUnsubmitted {
            family_id,
            chunks,
            mut runs,
        } => match runs.as_slice() {
            _ if continue_unsubmitted => {
                // Oldest first by `created_at` (folder names only carry the second).
                runs.sort_by_cached_key(|dir| {
                    (
                        crate::run::store::load(dir).map(|run| run.created_at).ok(),
                        dir.clone(),
                    )
                });
                let dirs: Vec<String> = runs.iter().map(|d| d.display().to_string()).collect();
                let held_by = match dirs.as_slice() {
                    [one] => format!("the run {one}"),
                    _ => format!("the runs {}", dirs.join(", ")),
                };
                printer.info(&format!(
                    "nothing new to plan for family {family_id}: its {chunks} pending chunks are held by {held_by}, planned but not submitted yet; going on with {}",
                    if runs.len() == 1 { "that run" } else { "those runs, oldest first" }
                ));
                for dir in &dirs {
                    printer.data(dir);
                }
                Ok(runs)
            }
            [run_dir] => bail!(
                "nothing new to plan for family {family_id}: its {chunks} pending chunks are held by the run {}, planned but not submitted yet; submit it with: {}",
                run_dir.display(),
                plan::advance_command(run_dir)
            ),
            _ => {
                let dirs: Vec<String> = runs.iter().map(|d| d.display().to_string()).collect();
                let commands: Vec<String> = runs.iter().map(|d| plan::advance_command(d)).collect();
                bail!(
                    "nothing new to plan for family {family_id}: its {chunks} pending chunks are held by runs planned but not submitted yet ({}); submit them with: {}",
                    dirs.join(", "),
                    commands.join("; ")
                )
            }
        },
    }
}

/// Advances each run in turn (those `submit` or `run` planned or goes on with): done only when
/// every one is; the first error stops the rest, which the next call takes up again.
async fn advance_each(
    config: &Config,
    run_dirs: &[std::path::PathBuf],
    goal: advance::Goal,
    opts: &advance::AdvanceOptions,
    command: &str,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let mut status = ExitStatus::Done;
    for run_dir in run_dirs {
        if advance::advance(&config.global, run_dir, goal, opts, command, printer).await?
            == ExitStatus::NotYet
        {
            status = ExitStatus::NotYet;
        }
    }
    Ok(status)
}

/// The async runtime `command` runs on.
///
/// `plan` runs on one thread: its CPU work is on threads of its own (the tokenizer workers),
/// and its async part is one database connection streaming rows, which is cheaper when the
/// rows do not hop between threads (bench at 100,000 rows, median of 5 plan runs back to back:
/// 1.02 s against 1.07 s on the multi-threaded runtime). Every other command gets a thread per
/// core: ingest's two writer connections encode their vectors in parallel there (on one thread,
/// base64 ingest of 400,000 rows took 18.2 s against 16.9 s), and the servers answer many
/// requests at once. `submit` and `run` plan on that runtime too, for their ingest's sake.
pub fn runtime(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Plan(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// Runs one command. Errors carry their own message; `main` prints them and exits 1 (or 75
/// for a lock held by another process).
pub async fn run(config: Config) -> anyhow::Result<ExitStatus> {
    let printer = Printer::new(config.global.output);
    let now = chrono::Utc::now();
    match &config.command {
        Command::Plan(plan_cfg) => {
            plan_and_print(&config, plan_cfg, &printer, now, false).await?;
            Ok(ExitStatus::Done)
        }
        Command::Submit(submit) => {
            if !submit.dry_run {
                // Fail on a missing key before planning, not after.
                provider::connect::check(&config.global.api, submit.plan.provider)?;
            }
            let run_dirs =
                plan_and_print(&config, &submit.plan, &printer, now, !submit.dry_run).await?;
            if submit.dry_run {
                for run_dir in &run_dirs {
                    printer.info(&format!(
                        "dry run: batch files written, no API called; submit this run with: {}",
                        plan::advance_command(run_dir)
                    ));
                }
                return Ok(ExitStatus::Done);
            }
            advance_each(
                &config,
                &run_dirs,
                advance::Goal::Submitted,
                &submit.opts,
                "embatch submit",
                &printer,
            )
            .await
        }
        Command::Run(run_cfg) => {
            provider::connect::check(&config.global.api, run_cfg.plan.provider)?;
            let run_dirs = plan_and_print(&config, &run_cfg.plan, &printer, now, true).await?;
            advance_each(
                &config,
                &run_dirs,
                advance::Goal::Done,
                &run_cfg.opts,
                "embatch run",
                &printer,
            )
            .await
        }
        Command::Ingest(ingest_cfg) => {
            advance::advance(
                &config.global,
                &ingest_cfg.run_dir,
                advance::Goal::IngestOnly,
                &ingest_cfg.opts,
                "embatch ingest",
                &printer,
            )
            .await
        }
        Command::Status(status_cfg) => status_command(&config, status_cfg, &printer).await,
        Command::Advance(adv) => {
            advance::advance(
                &config.global,
                &adv.run_dir,
                advance::Goal::Done,
                &adv.opts,
                "embatch advance",
                &printer,
            )
            .await
        }
        Command::Cancel(c) => advance::cancel(&config.global, &c.run_dir, &printer).await,
        Command::Emulator(e) => emulator_command(&config, e).await,
        Command::Embed(embed_cfg) => {
            realtime::embed::embed_command(&config.global, embed_cfg, &printer).await?;
            Ok(ExitStatus::Done)
        }
        Command::Serve(serve_cfg) => {
            realtime::serve::serve_command(&config.global, serve_cfg, &printer).await?;
            Ok(ExitStatus::Done)
        }
        Command::Sync(sync_cfg) => sync::sync(&config.global, sync_cfg, &printer).await,
        Command::Runs(runs_cfg) => runs_command(&config, runs_cfg, &printer),
    }
}

/// `embatch status`: the run (or one batch) as a table fitted to the terminal, or JSON;
/// `--refresh` asks the provider first.
async fn status_command(
    config: &Config,
    status_cfg: &config::StatusConfig,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let (run_dir, only) = match &status_cfg.target {
        StatusTarget::Run(dir) => (dir.clone(), None),
        StatusTarget::Batch(file) => match run::layout::locate_batch(file) {
            Some((dir, name)) => (dir, Some(name)),
            None => bail!(
                "{} is not inside a run folder (expected …/run_…/batches/batch_NNN/batch.json)",
                file.display()
            ),
        },
    };
    if status_cfg.refresh {
        advance::advance(
            &config.global,
            &run_dir,
            advance::Goal::RefreshOnly,
            &advance::AdvanceOptions::default(),
            "embatch status --refresh",
            printer,
        )
        .await?;
    }
    let run = run::store::load(&run_dir)?;
    if let Some(name) = &only
        && !run.batches.iter().any(|b| &b.name == name)
    {
        bail!("run {} has no batch {name}", run_dir.display());
    }
    let view = status::view(&run, &run_dir, only.as_deref());
    for message in status::missing_files(&run, &run_dir) {
        printer.warn(&message);
    }
    if status_cfg.json {
        printer.data(&serde_json::to_string_pretty(&view)?);
    } else {
        printer.data(&status::render_table(
            &view,
            printer.colour(),
            printer.width(),
        ));
    }
    Ok(ExitStatus::Done)
}

/// `embatch emulator`: serves the OpenAI emulator until stopped.
async fn emulator_command(
    config: &Config,
    e: &config::EmulatorCommandConfig,
) -> anyhow::Result<ExitStatus> {
    // A key of the user's own may be a real one: the emulator accepts it but never
    // prints it; only the built-in `sk-emulator` is shown.
    let user_key = config.global.api.api_key.clone();
    let show_key = user_key.is_none();
    let emu_config = emulator::EmulatorConfig {
        api_key: user_key.unwrap_or_else(|| emulator::EmulatorConfig::default().api_key),
        stage_duration: std::time::Duration::from_secs(e.stage_seconds),
        api: match e.provider {
            crate::models::Provider::Voyage => emulator::Api::Voyage,
            crate::models::Provider::Gemini => emulator::Api::Gemini,
            _ => emulator::Api::Openai,
        },
        ..emulator::EmulatorConfig::default()
    };
    emulator::serve_forever(e.listen, emu_config, show_key).await?;
    Ok(ExitStatus::Done)
}

/// `embatch runs`: every run under the runs dir, one line each, or one JSON array.
fn runs_command(
    config: &Config,
    runs_cfg: &config::RunsConfig,
    printer: &Printer,
) -> anyhow::Result<ExitStatus> {
    let found = run::folders::find_runs(&config.global.runs_dir, runs_cfg.family_id.as_deref())?;
    let summaries: Vec<run::folders::RunSummary> =
        found.iter().map(run::folders::summarize).collect();
    if runs_cfg.json {
        printer.data(&serde_json::to_string_pretty(&summaries)?);
    } else if summaries.is_empty() {
        printer.info(&format!(
            "no runs under {}",
            config.global.runs_dir.display()
        ));
    } else {
        for s in &summaries {
            printer.data(&run::folders::summary_line(s));
        }
    }
    Ok(ExitStatus::Done)
}
