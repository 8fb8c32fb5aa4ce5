//! `sync` with nothing to do on a large table (issue 17): how long a cron call takes when every
//! row is embedded, without and with the partial index the README recommends, and with
//! `--content-hash-column`.
//!
//! `cargo run --release --example sync_idle -- [--rows 1000000] [--families 2000]
//! [--pending 20] [--runs 3] [--json PATH]`
//!
//! Starts a throwaway Postgres and the in-process emulator, and seeds the default schema with
//! `--rows` rows over `--families` families in one `INSERT … SELECT generate_series` (content of
//! ~280 bytes; the embedding column is `vector(8)` to keep the table small, every row embedded
//! with a constant vector and its `content_sha256` filled, except `--pending` rows, one in each
//! of that many families). A `sync --dimensions 8 --content-hash-column content_sha256` loop
//! then embeds those through the emulator, so that nothing is pending. Then, each the median
//! of `--runs` runs (child processes, the binary's own code path):
//! (a) `sync --dry-run` and `sync` with nothing to do, without any extra index;
//! (b) the same after
//!     `CREATE INDEX CONCURRENTLY knowledge_chunks_pending ON knowledge_chunks (equipment_family_id) WHERE embedding IS NULL`;
//! (c) one run of each with `--content-hash-column content_sha256` (index still there).
//! (d) with `--content-hash-column` again, after trying a partial index whose predicate is
//!     that case's pending condition (Postgres refuses it unless its functions are immutable).
//! For each it prints `EXPLAIN (ANALYZE, BUFFERS)` of the family query, built as
//! `pg::source::Source::families_with_pending` builds it (same `pending_sql`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use embatch::emulator::{Emulator, EmulatorConfig};
use embatch::pg::source::{Source, SourceConfig};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use tokio_postgres::Client;

const CHILD: &str = "__embatch_child";
const DIMENSIONS: usize = 8;
const HASH_COLUMN: &str = "content_sha256";
const PARTIAL_INDEX: &str = "CREATE INDEX CONCURRENTLY knowledge_chunks_pending ON knowledge_chunks (equipment_family_id) WHERE embedding IS NULL";

struct Args {
    rows: u64,
    families: u64,
    pending: u64,
    runs: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        rows: 1_000_000,
        families: 2_000,
        pending: 20,
        runs: 3,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rows" => args.rows = value()?.parse().context("--rows N")?,
            "--families" => args.families = value()?.parse().context("--families N")?,
            "--pending" => args.pending = value()?.parse().context("--pending N")?,
            "--runs" => args.runs = value()?.parse().context("--runs N")?,
            "--json" => args.json = Some(PathBuf::from(value()?)),
            other => bail!(
                "unknown argument {other}; usage: sync_idle [--rows N] [--families N] [--pending N] [--runs N] [--json PATH]"
            ),
        }
    }
    if args.families == 0 || args.rows < args.families || args.pending > args.families {
        bail!("need 1 <= --families <= --rows and --pending <= --families");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
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
    runtime.block_on(bench(args))
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

/// Runs this executable as an `embatch` child; returns its exit code and wall time.
fn embatch(args: &[&str], api_key: &str, log: &Path) -> anyhow::Result<(i32, f64)> {
    let stderr = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?
        .into_parts()
        .0;
    let started = Instant::now();
    let status = std::process::Command::new(std::env::current_exe()?)
        .arg(CHILD)
        .arg("embatch")
        .args(args)
        .env("OPENAI_API_KEY", api_key)
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .status()?;
    let elapsed = started.elapsed().as_secs_f64();
    let code = status
        .code()
        .with_context(|| format!("embatch {} was killed: {status}", args.join(" ")))?;
    Ok((code, elapsed))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The family query of `sync`, as `Source::families_with_pending` builds it, explained.
async fn explain(client: &Client, hash: bool) -> anyhow::Result<String> {
    let config = SourceConfig {
        content_hash_column: hash.then(|| HASH_COLUMN.to_owned()),
        ..SourceConfig::default()
    };
    let source = Source::inspect(client, &config).await?;
    let sql = format!(
        "SELECT t.equipment_family_id::text, count(*) FROM knowledge_chunks AS t WHERE t.equipment_family_id IS NOT NULL AND {} GROUP BY 1 ORDER BY 1",
        source.pending_sql()
    );
    let rows = client
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"), &[])
        .await?;
    let plan: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    Ok(format!("{sql}\n{}", plan.join("\n")))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let load_before = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    let pg = ThrowawayPostgres::start().context("could not start the throwaway Postgres")?;
    let (url, client) = pg.create_default_database().await?;
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let work = tempfile::Builder::new()
        .prefix("embatch-sync-idle-")
        .tempdir()?;
    let log = work.path().join("embatch.log");
    let runs_dir = work.path().join("runs").display().to_string();
    let base_url = emulator.base_url();
    let api_key = emulator.api_key().to_owned();

    // The table: N rows over F families, all embedded but `pending`.
    let started = Instant::now();
    let vector = format!("[{}]", ["0.1"; DIMENSIONS].join(","));
    client
        .batch_execute(&format!(
            "ALTER TABLE knowledge_chunks ALTER COLUMN embedding TYPE vector({DIMENSIONS});
             ALTER TABLE knowledge_chunks ADD COLUMN {HASH_COLUMN} bytea;
             INSERT INTO equipment_families (id, name)
               SELECT ('fa000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, 'family ' || g
               FROM generate_series(1, {families}) AS g;
             ALTER TABLE knowledge_chunks DROP CONSTRAINT knowledge_chunks_pkey;
             DROP INDEX knowledge_chunks_family;
             SET maintenance_work_mem = '256MB';
             INSERT INTO knowledge_chunks (id, equipment_family_id, content, embedding, {HASH_COLUMN})
               SELECT gen_random_uuid(), s.family, s.content,
                      CASE WHEN s.g <= {pending} THEN NULL ELSE '{vector}'::vector END,
                      CASE WHEN s.g <= {pending} THEN NULL ELSE sha256(convert_to(s.content, 'UTF8')) END
               FROM (SELECT g,
                            ('fa000000-0000-0000-0000-' || lpad(to_hex(g % {families} + 1), 12, '0'))::uuid AS family,
                            'Service manual, chunk ' || g || ': ' || repeat(md5(g::text) || ' ', 7) AS content
                     FROM generate_series(1, {rows}) AS g) AS s;
             ALTER TABLE knowledge_chunks ADD PRIMARY KEY (id);
             CREATE INDEX knowledge_chunks_family ON knowledge_chunks (equipment_family_id);",
            families = args.families,
            pending = args.pending,
            rows = args.rows,
        ))
        .await?;
    // Not in the batch above: a multi-statement batch is one transaction.
    client
        .batch_execute("VACUUM ANALYZE knowledge_chunks")
        .await?;
    let table_size: String = client
        .query_one(
            "SELECT pg_size_pretty(pg_total_relation_size('knowledge_chunks'))",
            &[],
        )
        .await?
        .get(0);
    let seed_s = started.elapsed().as_secs_f64();
    eprintln!(
        "seeded {} rows over {} families ({table_size} with indexes) in {seed_s:.1}s",
        args.rows, args.families
    );

    let common = [
        "--database-url",
        url.as_str(),
        "--runs-dir",
        runs_dir.as_str(),
        "--base-url",
        base_url.as_str(),
        "--no-progress",
        "sync",
        "--dimensions",
        "8",
    ];
    let with_hash = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = common.to_vec();
        args.extend(["--content-hash-column", HASH_COLUMN]);
        args.extend(extra);
        args
    };

    // The pending rows: planned and embedded, so that nothing is pending.
    let started = Instant::now();
    let fill = with_hash(&[]);
    let mut calls = 0;
    loop {
        calls += 1;
        let (code, _) = embatch(&fill, &api_key, &log)?;
        match code {
            0 => break,
            75 if calls < 50 => std::thread::sleep(std::time::Duration::from_millis(200)),
            other => bail!("the filling sync exited {other}; see {}", log.display()),
        }
    }
    let pending_left: i64 = client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NULL",
            &[],
        )
        .await?
        .get(0);
    if pending_left != 0 {
        bail!("{pending_left} rows still pending after the filling sync");
    }
    client
        .batch_execute("VACUUM ANALYZE knowledge_chunks")
        .await?;
    eprintln!(
        "embedded the {} pending rows in {calls} sync calls ({:.1}s)",
        args.pending,
        started.elapsed().as_secs_f64()
    );

    // Timed: idle calls, each must exit 0.
    let timed = |argv: Vec<&str>, runs: usize| -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::new();
        for _ in 0..runs {
            let (code, time) = embatch(&argv, &api_key, &log)?;
            if code != 0 {
                bail!(
                    "embatch {} exited {code}; see {}",
                    argv.join(" "),
                    log.display()
                );
            }
            times.push(time);
        }
        Ok(times)
    };
    let dry = |hash: bool| {
        let mut argv = if hash {
            with_hash(&[])
        } else {
            common.to_vec()
        };
        argv.push("--dry-run");
        argv
    };
    let real = |hash: bool| {
        if hash {
            with_hash(&[])
        } else {
            common.to_vec()
        }
    };

    // One warm-up call (caches, as a cron's calls after the first have them).
    timed(real(false), 1)?;
    let a_dry = timed(dry(false), args.runs)?;
    let a_real = timed(real(false), args.runs)?;
    let a_explain = explain(&client, false).await?;
    eprintln!("(a) no extra index: dry-run {a_dry:.3?}, sync {a_real:.3?}\n{a_explain}\n");

    let started = Instant::now();
    client.batch_execute(PARTIAL_INDEX).await?;
    let index_s = started.elapsed().as_secs_f64();
    client.batch_execute("ANALYZE knowledge_chunks").await?;
    let index_size: String = client
        .query_one(
            "SELECT pg_size_pretty(pg_relation_size('knowledge_chunks_pending'))",
            &[],
        )
        .await?
        .get(0);
    let b_dry = timed(dry(false), args.runs)?;
    let b_real = timed(real(false), args.runs)?;
    let b_explain = explain(&client, false).await?;
    eprintln!(
        "(b) partial index ({index_size}, built in {index_s:.1}s): dry-run {b_dry:.3?}, sync {b_real:.3?}\n{b_explain}\n"
    );

    let c_dry = timed(dry(true), 1)?;
    let c_real = timed(real(true), 1)?;
    let c_explain = explain(&client, true).await?;
    eprintln!("(c) --content-hash-column: dry-run {c_dry:.3?}, sync {c_real:.3?}\n{c_explain}\n");

    // (d) A partial index whose predicate is the hash case's pending condition, if Postgres
    // takes it (index predicates need immutable functions).
    let volatility: String = client
        .query_one(
            "SELECT string_agg(proname || ' ' || provolatile::text, ', ' ORDER BY proname)
             FROM pg_proc WHERE proname IN ('sha256', 'convert_to')",
            &[],
        )
        .await?
        .get(0);
    let hash_index = format!(
        "CREATE INDEX CONCURRENTLY knowledge_chunks_pending_hash ON knowledge_chunks (equipment_family_id) WHERE embedding IS NULL OR {HASH_COLUMN} IS DISTINCT FROM sha256(convert_to(content, 'UTF8'))"
    );
    let d = match client.batch_execute(&hash_index).await {
        Ok(()) => {
            let d_dry = timed(dry(true), 1)?;
            let d_real = timed(real(true), 1)?;
            let d_explain = explain(&client, true).await?;
            eprintln!(
                "(d) hash partial index: dry-run {d_dry:.3?}, sync {d_real:.3?}\n{d_explain}\n"
            );
            serde_json::json!({"dry_run_s": d_dry, "sync_s": d_real, "explain": d_explain})
        }
        Err(err) => {
            let message = err
                .as_db_error()
                .map_or_else(|| err.to_string(), |e| e.message().to_owned());
            eprintln!("(d) hash partial index refused ({volatility}): {message}");
            serde_json::json!({"refused": message})
        }
    };

    drop(client);
    pg.drop_database(&url).await?;
    emulator.shutdown().await;
    drop(work);
    let load_after = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();

    let json = serde_json::json!({
        "rows": args.rows,
        "families": args.families,
        "pending": args.pending,
        "table_size": table_size,
        "seed_s": seed_s,
        "no_index_dry_run_s": a_dry,
        "no_index_sync_s": a_real,
        "partial_index_size": index_size,
        "partial_index_build_s": index_s,
        "partial_index_dry_run_s": b_dry,
        "partial_index_sync_s": b_real,
        "content_hash_dry_run_s": c_dry,
        "content_hash_sync_s": c_real,
        "explain_no_index": a_explain,
        "explain_partial_index": b_explain,
        "explain_content_hash": c_explain,
        "hash_partial_index": d,
        "volatility": volatility,
        "load_average_before": load_before.trim(),
        "load_average_after": load_after.trim(),
    });
    println!(
        "sync with nothing to do: {} rows, {} families ({table_size}); load average before {} / after {}",
        args.rows,
        args.families,
        load_before.trim(),
        load_after.trim()
    );
    println!("{:<52} {:>14} {:>14}", "", "--dry-run", "sync");
    let row = |what: &str, dry: &[f64], real: &[f64]| {
        println!(
            "{what:<52} {:>12.3}s {:>12.3}s",
            median(dry.to_vec()),
            median(real.to_vec())
        );
    };
    row(
        &format!("(a) no extra index, median of {}", args.runs),
        &a_dry,
        &a_real,
    );
    row(
        &format!("(b) partial index, median of {}", args.runs),
        &b_dry,
        &b_real,
    );
    row("(c) --content-hash-column, one run", &c_dry, &c_real);
    if let Some(path) = &args.json {
        fs_err::write(path, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
