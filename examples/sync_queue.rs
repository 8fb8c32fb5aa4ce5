//! How full `sync` keeps the provider's queue (issue 17): the share of wall time during which
//! the batches in flight held at least 80 % of the `--max-enqueued-tokens` budget while work
//! remained, and the total time against the ideal.
//!
//! `cargo run --release --example sync_queue -- [--families 15,45,90,180,270]
//! [--max-requests-per-batch 10] [--stage-ms 2000] [--gaps 1,3] [--share 0.1] [--json PATH]
//! [--log PATH] [-v] [--wait-poll SECONDS]`
//!
//! Starts a throwaway Postgres and the in-process emulator, loads families of the given sizes
//! (chunks of ~800 bytes), and measures the total work W: the sum over every batch of what a
//! batch counts for against the budget (the larger of its tokens and its input file's bytes / 4,
//! which is also what the emulator's limit counts), from a `plan` of each family in a scratch
//! runs dir. The emulator's enqueued-token limit and `sync --max-enqueued-tokens` are then both
//! `share` × W. Then, as a cron would, it calls `embatch sync` (in a child process, the
//! binary's own code path and exit codes) again and again, sleeping `gap` seconds after each
//! call, until a call exits 0; meanwhile it samples the emulator every 100 ms
//! (`Emulator::enqueued_tokens`). Each `--gaps` value is one scenario on a fresh database,
//! emulator and runs dir. `--log PATH` keeps the calls' stderr (`-v`: with their verbose
//! messages), each line stamped with the seconds since the first call started.
//!
//! Reported per scenario:
//! - `work_remained_s`: from the first call's start until every batch was created (after that
//!   the queue can only drain);
//! - `share_full_by_clock`: the share of that time with the tokens the provider is still
//!   working on (batches whose stages the clock has not ended, read or not) ≥ 80 % of the
//!   budget; `share_full_as_read`: the same with the emulator's own count (batches not finished
//!   as a client last read them, what its limit checks);
//! - where the time below 80 % fell: inside a sync call or in the gap between calls, and the
//!   fill each call left behind (as read, the moment it exited);
//! - the total wall time, the ideal (W ÷ limit × turnaround, turnaround = the emulator's three
//!   stages), their ratio, and the budget check (the emulator's highest enqueued count after a
//!   creation, and its refusals for the limit: 0 if sync kept within the budget);
//! - inside the calls that found finished batches: the mean time from the call's start to the
//!   first poll that read one finished, to the first creation, and to the queue back at 80 %.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use embatch::emulator::{EmulatorConfig, EnqueuedTokens, Faults};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use rand::SeedableRng;
use rand::rngs::StdRng;
use uuid::Uuid;

const CHILD: &str = "__embatch_child";
const FULL: f64 = 0.8;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

struct Args {
    families: Vec<usize>,
    max_requests_per_batch: usize,
    stage: Duration,
    gaps: Vec<f64>,
    share: f64,
    json: Option<PathBuf>,
    log: Option<PathBuf>,
    verbose: bool,
    /// `--wait-poll S`: one `sync --wait --poll-seconds S` instead of a cron loop.
    wait_poll: Option<u64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        families: vec![15, 45, 90, 180, 270],
        max_requests_per_batch: 10,
        stage: Duration::from_millis(2000),
        gaps: vec![1.0, 3.0],
        share: 0.1,
        json: None,
        log: None,
        verbose: false,
        wait_poll: None,
    };
    let list = |text: String| -> anyhow::Result<Vec<f64>> {
        text.split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .context("a comma-separated list of numbers")
            })
            .collect()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--families" => {
                args.families = list(value()?)?.into_iter().map(|v| v as usize).collect()
            }
            "--max-requests-per-batch" => {
                args.max_requests_per_batch =
                    value()?.parse().context("--max-requests-per-batch N")?
            }
            "--stage-ms" => {
                args.stage = Duration::from_millis(value()?.parse().context("--stage-ms MS")?)
            }
            "--gaps" => args.gaps = list(value()?)?,
            "--share" => args.share = value()?.parse().context("--share FRACTION")?,
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--log" => args.log = Some(PathBuf::from(value()?)),
            "-v" => args.verbose = true,
            "--wait-poll" => {
                args.wait_poll = Some(value()?.parse().context("--wait-poll SECONDS")?)
            }
            other => bail!(
                "unknown argument {other}; usage: sync_queue [--families N,N,…] [--max-requests-per-batch N] [--stage-ms MS] [--gaps S,S,…] [--share FRACTION] [--json PATH] [--log PATH] [-v] [--wait-poll SECONDS]"
            ),
        }
    }
    if args.families.is_empty() || args.families.contains(&0) || args.gaps.is_empty() {
        bail!("--families needs sizes of at least 1 and --gaps at least one value");
    }
    if !(args.share > 0.0 && args.share <= 1.0) {
        bail!("--share must be in (0, 1]");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD) {
        std::process::exit(child(&argv[2..]));
    }
    let args = parse_args()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(measure(args))
}

/// The child: an `embatch` command through the binary's own code path, with its exit codes.
fn child(args: &[String]) -> i32 {
    let parsed = match embatch::cli::parse(args.iter().cloned()) {
        Ok(parsed) => parsed,
        Err(err) => err.exit(),
    };
    let outcome = embatch::runtime(&parsed.config.command)
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(embatch::run(parsed.config)));
    match outcome {
        Ok(embatch::ExitStatus::Done) => 0,
        Ok(embatch::ExitStatus::NotYet) => 75,
        Err(err) => {
            eprintln!("error: {err:#}");
            let held = err
                .downcast_ref::<embatch::run::lock::LockError>()
                .is_some_and(embatch::run::lock::LockError::is_held);
            if held { 75 } else { 1 }
        }
    }
}

/// Runs this executable as an `embatch` child; returns its exit code. Its stderr lines go to
/// `log`, each stamped with the seconds since `epoch`.
async fn embatch(args: &[&str], api_key: &str, log: &Path, epoch: Instant) -> anyhow::Result<i32> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg(CHILD)
        .arg("embatch")
        .args(args)
        .env("OPENAI_API_KEY", api_key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    out.write_all(
        format!(
            "[{:8.3}] $ embatch {}\n",
            epoch.elapsed().as_secs_f64(),
            args.join(" ")
        )
        .as_bytes(),
    )
    .await?;
    while let Some(line) = lines.next_line().await? {
        out.write_all(format!("[{:8.3}] {line}\n", epoch.elapsed().as_secs_f64()).as_bytes())
            .await?;
    }
    let status = child.wait().await?;
    out.write_all(format!("[{:8.3}] exit {status}\n", epoch.elapsed().as_secs_f64()).as_bytes())
        .await?;
    status
        .code()
        .with_context(|| format!("embatch {} was killed: {status}", args.join(" ")))
}

#[derive(Clone, Copy)]
struct Sample {
    at: f64,
    tokens: EnqueuedTokens,
}

struct Call {
    start: f64,
    end: f64,
    code: i32,
    /// The emulator's counts the moment the call started.
    at_start: EnqueuedTokens,
    /// The emulator's count (as read) the moment the call exited.
    left_as_read: u64,
}

async fn measure(args: Args) -> anyhow::Result<()> {
    let load_before = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    let pg = ThrowawayPostgres::start().context("could not start the throwaway Postgres")?;
    let mut results = Vec::new();
    for &gap in &args.gaps {
        results.push(scenario(&pg, &args, gap).await?);
    }
    let load_after = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "sync_queue: families {:?}, --max-requests-per-batch {}, stage {:.1}s (turnaround {:.1}s), budget {} of the work; load average before {} / after {}",
        args.families,
        args.max_requests_per_batch,
        args.stage.as_secs_f64(),
        3.0 * args.stage.as_secs_f64(),
        args.share,
        load_before.trim(),
        load_after.trim()
    );
    for r in &results {
        println!("{}", serde_json::to_string_pretty(r)?);
    }
    if let Some(path) = &args.json {
        fs_err::write(path, serde_json::to_string_pretty(&results)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

async fn scenario(
    pg: &ThrowawayPostgres,
    args: &Args,
    gap: f64,
) -> anyhow::Result<serde_json::Value> {
    let (url, client) = pg.create_default_database().await?;
    let emulator = embatch::emulator::Emulator::start(EmulatorConfig {
        stage_duration: args.stage,
        ..EmulatorConfig::default()
    })
    .await?;
    let work = tempfile::Builder::new()
        .prefix("embatch-sync-queue-")
        .tempdir()?;
    let log = args
        .log
        .clone()
        .unwrap_or_else(|| work.path().join("sync.log"));

    // The families: sizes as given, ~800 bytes of manual-like text per chunk.
    let mut rng = StdRng::seed_from_u64(17);
    let mut family_ids = Vec::new();
    for (i, &size) in args.families.iter().enumerate() {
        let family = Uuid::from_u128(0xfa00_0000_0000_0000_0000_0000_0000_0000 + i as u128 + 1);
        family_ids.push(family.to_string());
        client
            .execute(
                "INSERT INTO equipment_families (id, name) VALUES ($1, $2)",
                &[&family, &format!("family {}", i + 1)],
            )
            .await?;
        let template =
            &embatch::testkit::sample::FAMILIES[i % embatch::testkit::sample::FAMILIES.len()];
        let contents: Vec<String> = (0..size)
            .map(|_| embatch::testkit::sample::chunk_text(template, &mut rng))
            .collect();
        let ids: Vec<Uuid> = (0..size).map(|_| Uuid::new_v4()).collect();
        let families = vec![family; size];
        client
            .execute(
                "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[])",
                &[&ids, &families, &contents],
            )
            .await?;
    }
    client
        .batch_execute("VACUUM ANALYZE knowledge_chunks")
        .await?;

    let max_requests = args.max_requests_per_batch.to_string();
    let base_url = emulator.base_url();
    let api_key = emulator.api_key().to_owned();

    // W: what every batch counts for against the budget, from a plan of each family in a
    // scratch runs dir (the plans of sync are the same: same rows, same options).
    let scratch = work.path().join("scratch-runs");
    let scratch_text = scratch.display().to_string();
    let (mut total_work, mut n_batches) = (0u64, 0usize);
    for family in &family_ids {
        let code = embatch(
            &[
                "--database-url",
                &url,
                "--runs-dir",
                &scratch_text,
                "-q",
                "--no-progress",
                "plan",
                "--family-id",
                family,
                "--max-requests-per-batch",
                &max_requests,
            ],
            &api_key,
            &log,
            Instant::now(),
        )
        .await?;
        if code != 0 {
            bail!(
                "plan of family {family} exited {code}; see {}",
                log.display()
            );
        }
        let run_dir = embatch::run::folders::find_runs(&scratch, Some(family))?
            .pop()
            .map(|found| found.dir)
            .context("the plan created no run")?;
        let run = embatch::run::store::load(&run_dir)?;
        n_batches += run.batches.len();
        total_work += run
            .batches
            .iter()
            .map(embatch::advance::in_flight_estimate)
            .sum::<u64>();
    }
    fs_err::remove_dir_all(&scratch)?;
    let limit = (total_work as f64 * args.share).floor() as u64;
    emulator.set_faults(Faults {
        enqueued_token_limit: Some(limit),
        ..Faults::default()
    });
    eprintln!(
        "gap {gap}s: {} families, {n_batches} batches, work W = {total_work} tokens, budget and emulator limit {limit}",
        family_ids.len()
    );

    // The sampler.
    let emulator = Arc::new(emulator);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (emulator, stop) = (Arc::clone(&emulator), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                samples.push(Sample {
                    at: started.elapsed().as_secs_f64(),
                    tokens: emulator.enqueued_tokens(),
                });
            }
            samples
        })
    };

    // The cron: sync, sleep `gap`, until a call exits 0.
    let runs_dir = work.path().join("runs").display().to_string();
    let limit_text = limit.to_string();
    let mut sync_args = vec![
        "--database-url",
        url.as_str(),
        "--runs-dir",
        runs_dir.as_str(),
        "--base-url",
        base_url.as_str(),
        "--no-progress",
    ];
    if args.verbose {
        sync_args.push("-v");
    }
    sync_args.extend([
        "sync",
        "--max-requests-per-batch",
        max_requests.as_str(),
        "--max-enqueued-tokens",
        limit_text.as_str(),
    ]);
    let poll_text = args.wait_poll.map(|s| s.to_string()).unwrap_or_default();
    if args.wait_poll.is_some() {
        sync_args.extend(["--wait", "--poll-seconds", poll_text.as_str()]);
    }
    let mut calls: Vec<Call> = Vec::new();
    loop {
        let start = started.elapsed().as_secs_f64();
        let at_start = emulator.enqueued_tokens();
        let code = embatch(&sync_args, &api_key, &log, started).await?;
        let end = started.elapsed().as_secs_f64();
        calls.push(Call {
            start,
            end,
            code,
            at_start,
            left_as_read: emulator.enqueued_tokens().as_last_read,
        });
        match code {
            0 => break,
            75 => {}
            other => bail!("sync exited {other}; see {}", log.display()),
        }
        if calls.len() > 2_000 {
            bail!("sync did not finish in 2,000 calls; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await?;

    // Every chunk embedded?
    let embedded: i64 = client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let chunks: usize = args.families.iter().sum();
    if embedded != chunks as i64 {
        bail!("{embedded} of {chunks} chunks embedded");
    }
    let counters = emulator.counters();
    let created = emulator.enqueued_tokens().created;

    // While work remained: until the sample that first saw every batch created.
    let work_remained_s = samples
        .iter()
        .find(|s| s.tokens.created >= total_work)
        .map_or(total_s, |s| s.at);
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at < work_remained_s).collect();
    let threshold = FULL * limit as f64;
    let share = |count: fn(&EnqueuedTokens) -> u64| {
        during
            .iter()
            .filter(|s| count(&s.tokens) as f64 >= threshold)
            .count() as f64
            / during.len().max(1) as f64
    };
    let share_by_clock = share(|t| t.by_clock);
    let share_as_read = share(|t| t.as_last_read);
    let in_call = |at: f64| calls.iter().any(|c| c.start <= at && at <= c.end);
    let low: Vec<&&Sample> = during
        .iter()
        .filter(|s| (s.tokens.by_clock as f64) < threshold)
        .collect();
    let low_in_calls = low.iter().filter(|s| in_call(s.at)).count();
    let low_between = low.len() - low_in_calls;
    let mean_by_clock = during
        .iter()
        .map(|s| s.tokens.by_clock as f64 / limit as f64)
        .sum::<f64>()
        / during.len().max(1) as f64;
    // The fill each call left behind, while work remained.
    let fills: Vec<f64> = calls
        .iter()
        .filter(|c| c.end < work_remained_s)
        .map(|c| c.left_as_read as f64 / limit as f64)
        .collect();
    let min_fill = fills.iter().copied().fold(f64::INFINITY, f64::min);
    let mean_fill = fills.iter().sum::<f64>() / fills.len().max(1) as f64;
    // Inside the calls that found work done (a poll read a finished batch), while work
    // remained: how long after the call's start the first poll read a finished batch, the
    // first batch was created, and the queue (as read) was back at 80 %.
    let (mut to_poll, mut to_create, mut to_refill) = (Vec::new(), Vec::new(), Vec::new());
    for call in calls.iter().filter(|c| c.end < work_remained_s) {
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| call.start <= s.at && s.at <= call.end)
            .collect();
        let Some(polled) = inside
            .iter()
            .find(|s| s.tokens.as_last_read < call.at_start.as_last_read)
        else {
            continue;
        };
        to_poll.push(polled.at - call.start);
        if let Some(s) = inside
            .iter()
            .find(|s| s.tokens.created > call.at_start.created)
        {
            to_create.push(s.at - call.start);
        }
        if let Some(s) = inside
            .iter()
            .filter(|s| s.at >= polled.at)
            .find(|s| s.tokens.as_last_read as f64 >= threshold)
        {
            to_refill.push(s.at - call.start);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let call_s: Vec<f64> = calls.iter().map(|c| c.end - c.start).collect();
    let mean_call_s = call_s.iter().sum::<f64>() / call_s.len().max(1) as f64;
    let max_call_s = call_s.iter().copied().fold(0.0, f64::max);
    let turnaround = 3.0 * args.stage.as_secs_f64();
    let ideal_s = total_work as f64 / limit as f64 * turnaround;
    let max_as_read = samples
        .iter()
        .map(|s| s.tokens.as_last_read)
        .max()
        .unwrap_or(0);
    let exits: Vec<i32> = calls.iter().map(|c| c.code).collect();
    eprintln!(
        "gap {gap}s: {} calls, {total_s:.1}s (ideal {ideal_s:.1}s); full ≥ 80 % {:.1} % of {work_remained_s:.1}s by the clock, {:.1} % as read",
        calls.len(),
        share_by_clock * 100.0,
        share_as_read * 100.0
    );

    drop(client);
    pg.drop_database(&url).await?;
    if let Ok(emulator) = Arc::try_unwrap(emulator) {
        emulator.shutdown().await;
    }
    Ok(serde_json::json!({
        "gap_s": gap,
        "families": args.families,
        "chunks": chunks,
        "batches": n_batches,
        "max_requests_per_batch": args.max_requests_per_batch,
        "stage_s": args.stage.as_secs_f64(),
        "turnaround_s": turnaround,
        "work_tokens": total_work,
        "work_created_on_emulator": created,
        "budget_tokens": limit,
        "calls": calls.len(),
        "exit_codes_last": exits.last(),
        "mean_call_s": mean_call_s,
        "max_call_s": max_call_s,
        "work_remained_s": work_remained_s,
        "share_full_by_clock": share_by_clock,
        "share_full_as_read": share_as_read,
        "mean_fill_by_clock": mean_by_clock,
        "below_80_in_calls_s": low_in_calls as f64 * SAMPLE_EVERY.as_secs_f64(),
        "below_80_between_calls_s": low_between as f64 * SAMPLE_EVERY.as_secs_f64(),
        "fill_left_by_calls_mean": mean_fill,
        "fill_left_by_calls_min": if fills.is_empty() { 0.0 } else { min_fill },
        "calls_that_found_work_done": to_poll.len(),
        "in_call_to_first_completion_read_s": mean(&to_poll),
        "in_call_to_first_creation_s": mean(&to_create),
        "in_call_to_refilled_80_s": mean(&to_refill),
        "calls_refilled_80": to_refill.len(),
        "total_s": total_s,
        "ideal_s": ideal_s,
        "total_vs_ideal": total_s / ideal_s,
        "emulator_max_enqueued_tokens": counters.max_enqueued_tokens,
        "sampled_max_enqueued_as_read": max_as_read,
        "enqueued_limit_refusals": counters.enqueued_limit_refusals,
        "budget_kept": counters.max_enqueued_tokens <= limit && counters.enqueued_limit_refusals == 0,
        "batch_creations": counters.batch_creations,
    }))
}
