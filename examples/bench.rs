//! The benchmark: plan and ingest side by side with what Postgres itself can do on this machine
//! (issue 7).
//!
//! `cargo run --release --example bench -- --chunks 100000 [--json PATH] [--runs 3]
//! [--plan-only] [--corpus prose|templates] [--direct-latency-ms 50] [--skip-direct]`
//!
//! Starts a throwaway Postgres with pgvector, loads one family of N chunks of ~800 bytes of
//! manual-like text, and measures in the same run:
//! - `plan` (the real `embatch plan`, in a child process) against `COPY (SELECT id, content …)
//!   TO STDOUT` and against tokenizers alone counting the same texts on two threads:
//!   bpe-openai's own `count` (the yardstick of issue 7) and embatch's `count_tokens` (the
//!   same library's encoding behind a faster pre-tokenizer and a memory of piece counts, what
//!   plan uses);
//! - parsing output lines alone (`embatch::output::parse_line`, one core), float and base64;
//! - ingest (the real `embatch ingest`, in a child process, on a run whose batches were made
//!   `downloaded` with a synthetic, shuffled provider output) of float and base64 output,
//!   against the seed script's way (one `UPDATE … SET embedding = $1 WHERE id = $2` per row,
//!   text vectors, 1,000 rows per commit) and the physical limit (binary `COPY` of the same ids
//!   and vectors into a fresh empty table);
//! - the peak resident memory of the plan and ingest children (`VmHWM`, sampled; see
//!   `tests/it/plan.rs::run_with_peak_rss` for why not `wait4`);
//! - ingest into a column with an HNSW index, on a smaller table;
//! - `direct` (issue 18): the real `embatch advance` of a `--provider direct` run of the same
//!   N chunks against the emulator's `/v1/embeddings`, in-process, each request answered after
//!   `--direct-latency-ms` (default 50 ms, the emulator's `Faults::latency`), at the default
//!   `--direct-batch-size` and `--direct-concurrency`: requests/s, inputs/s and tokens/s
//!   (cl100k_base, as planned) of the whole advance (sending, then writing the vectors), beside
//!   the bound the latency alone sets (concurrency / latency). The emulator computes its vectors
//!   on the same two cores. `--skip-direct` leaves it out.
//!
//! Phases that write the table start from a table whose embeddings were all reset to NULL and
//! vacuumed. Plan, both ingests and the binary COPY reference are the median of `--runs` runs
//! (default 3); COPY out and parsing the median of three; the tokenizer alone the median of
//! five (it swings most with other load on the machine); the seed-style reference runs once,
//! on at most `--seed-rows` rows (its rate does not depend on N).
//!
//! The text is prose whose vocabulary grows as a real manual's (`testkit::sample::Vocabulary`: about
//! 60,000 distinct pre-tokenizer pieces in 10 MB, like the vim manual); `--corpus templates`
//! uses the demo's template sentences instead, a few hundred words repeated, the text of the
//! figures before the token counter remembered pieces. `--plan-only` stops after
//! plan and prints its ratios (for working on plan). Nothing here asserts a time. Big temp
//! files are deleted at the end.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use embatch::run::state::{
    BatchState, Downloaded, RemoteDone, RemoteSnapshot, RequestCounts, Terminal,
};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Kind, Type};
use uuid::Uuid;

const DIMENSIONS: usize = 1536;
const CHILD: &str = "__embatch_child";
const FAMILY: &str = "fa000000-0000-0000-0000-000000000001";
const HNSW_FAMILY: &str = "fa000000-0000-0000-0000-000000000002";

struct Args {
    chunks: usize,
    json: Option<PathBuf>,
    seed_rows: usize,
    hnsw_rows: usize,
    runs: usize,
    plan_only: bool,
    templates: bool,
    /// The emulator's answer time per `/v1/embeddings` request in the `direct` phase.
    direct_latency: Duration,
    skip_direct: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        chunks: 100_000,
        json: None,
        seed_rows: 20_000,
        hnsw_rows: 1_000,
        runs: 3,
        plan_only: false,
        templates: false,
        direct_latency: Duration::from_millis(50),
        skip_direct: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--chunks" => args.chunks = value()?.parse().context("--chunks N")?,
            "--json" => args.json = Some(PathBuf::from(value()?)),
            "--seed-rows" => args.seed_rows = value()?.parse().context("--seed-rows N")?,
            "--hnsw-rows" => args.hnsw_rows = value()?.parse().context("--hnsw-rows N")?,
            "--runs" => args.runs = value()?.parse().context("--runs N")?,
            "--plan-only" => args.plan_only = true,
            "--direct-latency-ms" => {
                args.direct_latency =
                    Duration::from_millis(value()?.parse().context("--direct-latency-ms N")?)
            }
            "--skip-direct" => args.skip_direct = true,
            "--corpus" => {
                args.templates = match value()?.as_str() {
                    "prose" => false,
                    "templates" => true,
                    other => bail!("--corpus prose|templates, not {other}"),
                }
            }
            other => bail!(
                "unknown argument {other}; usage: bench [--chunks N] [--json PATH] [--seed-rows N] [--hnsw-rows N] [--runs N] [--plan-only] [--corpus prose|templates] [--direct-latency-ms N] [--skip-direct]"
            ),
        }
    }
    if args.chunks == 0 || args.runs == 0 {
        bail!("--chunks and --runs must be at least 1");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD) {
        // A phase measured on its own: the real command, in a fresh process, on the runtime
        // `main` would give it.
        let parsed =
            embatch::cli::parse(argv[2..].iter().cloned()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let runtime = embatch::runtime(&parsed.config.command)?;
        return runtime.block_on(async { embatch::run(parsed.config).await.map(|_| ()) });
    }
    let args = parse_args()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(bench(args))
}

/// Runs this executable as a child with `embatch` arguments; returns its wall time and peak
/// resident memory in MiB.
fn run_child(args: &[&str]) -> anyhow::Result<(Duration, f64)> {
    let exe = std::env::current_exe()?;
    let cpu_before = children_cpu();
    let started = Instant::now();
    let mut child = std::process::Command::new(exe)
        .arg(CHILD)
        .arg("embatch")
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let (exit, peak_kib) = embatch::testkit::measure::wait_with_peak_rss(&mut child)?;
    let elapsed = started.elapsed();
    if !exit.success() {
        bail!("embatch {} failed: {exit}", args.join(" "));
    }
    eprintln!(
        "  child: {:.2}s wall, {:.2}s CPU",
        elapsed.as_secs_f64(),
        children_cpu() - cpu_before
    );
    Ok((elapsed, peak_kib as f64 / 1024.0))
}

/// CPU seconds (user + system) of the children waited for so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A deterministic vector for a chunk id, values in (-0.1, 0.1) like a real unit vector's.
fn vector_for(id: &str) -> Vec<f32> {
    let mut state = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (0..DIMENSIONS)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn output_line(n: usize, id: &str, embedding_json: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(
        format!(
            r#"{{"id":"batch_req_{n:08}","custom_id":"{id}","response":{{"status_code":200,"request_id":"req_{n:08}","body":{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{embedding_json}}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":180,"total_tokens":180}}}}}},"error":null}}"#
        )
        .as_bytes(),
    );
    out.push(b'\n');
}

fn float_json(vector: &[f32]) -> String {
    let mut s = String::with_capacity(vector.len() * 13);
    s.push('[');
    for (i, v) in vector.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Shortest form that reads back exactly, as the provider and the emulator print.
        s.push_str(&v.to_string());
    }
    s.push(']');
    s
}

fn base64_json(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The batch folders of a run and the chunk ids of each (from `chunks.tsv`).
fn batches_of(run_dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<String>)>> {
    let run = embatch::run::store::load(run_dir)?;
    let mut out = Vec::new();
    for batch in &run.batches {
        let dir = embatch::run::layout::batch_dir(run_dir, &batch.name);
        let reader = BufReader::new(fs_err::File::open(dir.join("chunks.tsv"))?);
        let mut ids = Vec::new();
        embatch::tsv::for_each_record(reader, |fields| {
            if let Some(id) = fields.into_iter().next() {
                ids.push(id);
            }
            Ok(())
        })?;
        out.push((dir, ids));
    }
    Ok(out)
}

/// Writes `output.float.jsonl` and `output.base64.jsonl` beside each batch's `chunks.tsv`, in
/// shuffled order. Returns the bytes of each kind.
fn write_outputs(run_dir: &Path, seed: u64) -> anyhow::Result<(u64, u64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut float_bytes, mut base64_bytes) = (0u64, 0u64);
    let mut line = Vec::with_capacity(32 * 1024);
    for (dir, mut ids) in batches_of(run_dir)? {
        ids.shuffle(&mut rng);
        let mut float = BufWriter::with_capacity(
            1 << 20,
            fs_err::File::create(dir.join("output.float.jsonl"))?,
        );
        let mut b64 = BufWriter::with_capacity(
            1 << 20,
            fs_err::File::create(dir.join("output.base64.jsonl"))?,
        );
        for (n, id) in ids.iter().enumerate() {
            let vector = vector_for(id);
            line.clear();
            output_line(n, id, &float_json(&vector), &mut line);
            float.write_all(&line)?;
            float_bytes += line.len() as u64;
            line.clear();
            output_line(n, id, &base64_json(&vector), &mut line);
            b64.write_all(&line)?;
            base64_bytes += line.len() as u64;
        }
        float.flush()?;
        b64.flush()?;
    }
    Ok((float_bytes, base64_bytes))
}

/// Makes every batch of the run `downloaded` (completed) with `output.<kind>.jsonl` as its
/// output file, as if the provider had finished and the files had been fetched.
fn make_downloaded(run_dir: &Path, kind: &str) -> anyhow::Result<()> {
    let mut run = embatch::run::store::load(run_dir)?;
    for batch in &mut run.batches {
        let dir = embatch::run::layout::batch_dir(run_dir, &batch.name);
        let output = dir.join("output.jsonl");
        let _ = fs_err::remove_file(&output);
        fs_err::hard_link(dir.join(format!("output.{kind}.jsonl")), &output)?;
        let _ = fs_err::remove_file(dir.join("failed_chunk_ids.tsv"));
        batch.state = BatchState::Downloaded(Downloaded {
            terminal: Terminal::Completed,
            done: RemoteDone {
                input_file_id: format!("file-in-{}", batch.name),
                batch_id: format!("batch_{}", batch.name),
                submission: 1,
                remote: RemoteSnapshot {
                    status: embatch::run::state::RemoteStatus::Completed,
                    request_counts: RequestCounts {
                        total: batch.requests,
                        completed: batch.requests,
                        failed: 0,
                    },
                    output_file_id: Some(format!("file-out-{}", batch.name)),
                    error_file_id: None,
                    expires_at: None,
                    errors: Vec::new(),
                },
            },
            has_output: true,
            has_errors: false,
            progress: None,
            retries_planned: false,
        });
    }
    embatch::run::store::save(run_dir, &run)?;
    Ok(())
}

fn ingest_args<'a>(common: &'a [&'a str], run_dir: &'a str) -> Vec<&'a str> {
    let mut args = common.to_vec();
    args.extend([
        // Ingest never needs the API for a downloaded batch with the remote files kept.
        "--api-key",
        "sk-bench",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--api-retries",
        "0",
        "ingest",
        "--run-dir",
        run_dir,
        "--keep-remote-files",
    ]);
    args
}

async fn count_where(client: &Client, table: &str, cond: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {table} WHERE {cond}"), &[])
        .await?
        .get(0))
}

/// Every embedding back to NULL, and the table vacuumed, so each writing phase starts alike.
async fn reset_embeddings(client: &Client, table: &str) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "UPDATE {table} SET embedding = NULL WHERE embedding IS NOT NULL"
        ))
        .await?;
    client
        .batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await?;
    Ok(())
}

async fn load_family(
    client: &Client,
    table: &str,
    family: &str,
    texts: &[String],
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    let family = Uuid::parse_str(family)?;
    for part in texts.chunks(5_000) {
        let ids: Vec<Uuid> = part
            .iter()
            .map(|_| Uuid::from_u128(rng.random::<u128>()))
            .collect();
        let families = vec![family; part.len()];
        let contents: Vec<&str> = part.iter().map(String::as_str).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {table} (id, equipment_family_id, content)
                     SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[])"
                ),
                &[&ids, &families, &contents],
            )
            .await?;
    }
    Ok(())
}

/// The seed script's way: one UPDATE per row with the vector as text, 1,000 rows per commit.
async fn seed_style(client: &mut Client, ids: &[String]) -> anyhow::Result<Duration> {
    let statement = client
        .prepare(
            "UPDATE knowledge_chunks SET embedding = $1::text::vector WHERE id = $2::text::uuid",
        )
        .await?;
    let started = Instant::now();
    for part in ids.chunks(1_000) {
        let tx = client.transaction().await?;
        for id in part {
            let text = float_json(&vector_for(id));
            tx.execute(&statement, &[&text, id]).await?;
        }
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

/// The physical reference: binary COPY of the same ids and vectors into a fresh empty table.
async fn copy_reference(client: &Client, ids: &[String]) -> anyhow::Result<Duration> {
    client
        .batch_execute(
            "DROP TABLE IF EXISTS copy_reference;
             CREATE TABLE copy_reference (id uuid, embedding vector(1536));",
        )
        .await?;
    let oid: u32 = client
        .query_one("SELECT 'vector'::regtype::oid", &[])
        .await?
        .get(0);
    let vector_type = Type::new("vector".to_owned(), oid, Kind::Simple, "public".to_owned());
    let started = Instant::now();
    let sink = client
        .copy_in("COPY copy_reference (id, embedding) FROM STDIN (FORMAT binary)")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::UUID, vector_type]);
    let mut writer = std::pin::pin!(writer);
    for id in ids {
        let uuid = Uuid::parse_str(id)?;
        let vector = pgvector::Vector::from(vector_for(id));
        writer.as_mut().write(&[&uuid, &vector]).await?;
    }
    writer.finish().await?;
    Ok(started.elapsed())
}

/// `COPY (SELECT id, content …) TO STDOUT` of the planned rows; returns the time.
async fn copy_out(client: &Client) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT t.id::text, t.content FROM knowledge_chunks AS t
                   WHERE t.equipment_family_id = '{FAMILY}' AND t.embedding IS NULL
                   ORDER BY t.id) TO STDOUT"
        ))
        .await?;
    let mut stream = std::pin::pin!(stream);
    let mut n_bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        n_bytes += chunk?.len();
    }
    std::hint::black_box(n_bytes);
    Ok(started.elapsed())
}

/// A tokenizer alone counting every text, on two fresh threads (so that embatch's counter
/// starts with an empty memory of pieces, as in a plan).
fn tokenize_two_threads(texts: &[String], count: fn(&str) -> usize) -> Duration {
    let started = Instant::now();
    let half = texts.len().div_ceil(2);
    std::thread::scope(|scope| {
        let workers: Vec<_> = texts
            .chunks(half.max(1))
            .map(|part| scope.spawn(move || part.iter().map(|t| count(t)).sum::<usize>()))
            .collect();
        for worker in workers {
            std::hint::black_box(worker.join().unwrap_or(0));
        }
    });
    started.elapsed()
}

/// Parses up to `max_lines` lines of the output files of `kind` on this thread; returns
/// (lines, bytes, time).
fn parse_alone(
    batches: &[(PathBuf, Vec<String>)],
    kind: &str,
    max_lines: usize,
) -> anyhow::Result<(u64, u64, Duration)> {
    // Read first, so that only parsing is timed.
    let mut lines: Vec<Vec<u8>> = Vec::new();
    'files: for (dir, _) in batches {
        let mut reader = BufReader::new(fs_err::File::open(
            dir.join(format!("output.{kind}.jsonl")),
        )?);
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            lines.push(line);
            if lines.len() >= max_lines {
                break 'files;
            }
        }
    }
    let n_bytes: u64 = lines.iter().map(|l| l.len() as u64).sum();
    let started = Instant::now();
    let mut ok = 0u64;
    for line in &lines {
        let text = std::str::from_utf8(line).unwrap_or("");
        if let embatch::output::LineOutcome::Vector { .. } =
            embatch::output::parse_line(text.trim_end(), DIMENSIONS)
        {
            ok += 1;
        }
    }
    let elapsed = started.elapsed();
    if ok != lines.len() as u64 {
        bail!(
            "{} of {} {kind} lines did not parse",
            lines.len() as u64 - ok,
            lines.len()
        );
    }
    Ok((ok, n_bytes, elapsed))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// What the `direct` phase measured.
struct DirectFigures {
    latency: Duration,
    inputs_per_request: usize,
    concurrency: usize,
    /// `/v1/embeddings` calls of one run, as the emulator counted them.
    requests: u64,
    /// The cl100k_base tokens of the run, as planned.
    tokens: u64,
    /// The advance's wall time of each run, and their median.
    times: Vec<f64>,
    time: f64,
}

impl DirectFigures {
    /// The requests per second the latency alone allows: requests in flight / latency (none
    /// without a latency).
    fn latency_bound(&self) -> Option<f64> {
        (!self.latency.is_zero()).then(|| self.concurrency as f64 / self.latency.as_secs_f64())
    }
}

/// The `direct` phase: for each of `--runs`, a fresh `plan --provider direct` of the family
/// (untimed) and the real `advance` that sends its requests to the in-process emulator and
/// writes the vectors (timed), from a table whose embeddings were reset.
async fn direct_phase(
    client: &Client,
    common: &[&str],
    runs_dir: &Path,
    n: usize,
    args: &Args,
) -> anyhow::Result<DirectFigures> {
    use embatch::emulator::{Emulator, EmulatorConfig, Faults};
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    emulator.set_faults(Faults {
        latency: args.direct_latency,
        ..Faults::default()
    });
    let base_url = emulator.base_url();
    let api_key = emulator.api_key().to_owned();
    let (mut times, mut requests, mut tokens) = (Vec::new(), 0u64, 0u64);
    for _ in 0..args.runs {
        reset_embeddings(client, "knowledge_chunks").await?;
        let mut plan = common.to_vec();
        plan.extend(["plan", "--family-id", FAMILY, "--provider", "direct"]);
        run_child(&plan)?;
        let run_dir = embatch::run::folders::find_runs(runs_dir, Some(FAMILY))?
            .pop()
            .map(|found| found.dir)
            .context("the direct plan created no run")?;
        let run = embatch::run::store::load(&run_dir)?;
        tokens = run.batches.iter().map(|batch| batch.tokens).sum();
        let run_dir_text = run_dir.display().to_string();
        let mut advance = common.to_vec();
        advance.extend([
            "advance",
            "--run-dir",
            run_dir_text.as_str(),
            "--base-url",
            base_url.as_str(),
            "--api-key",
            api_key.as_str(),
        ]);
        let calls_before = emulator.counters().embedding_calls;
        let (time, _) = run_child(&advance)?;
        requests = emulator.counters().embedding_calls - calls_before;
        let written = count_where(client, "knowledge_chunks", "embedding IS NOT NULL").await?;
        if written != n as i64 {
            bail!("the direct advance wrote {written} of {n} vectors");
        }
        times.push(time.as_secs_f64());
        fs_err::remove_dir_all(&run_dir)?;
    }
    emulator.shutdown().await;
    let time = median(times.clone());
    eprintln!(
        "direct: median {time:.2}s of {times:.2?}, {requests} requests, latency {} ms",
        args.direct_latency.as_millis()
    );
    Ok(DirectFigures {
        latency: args.direct_latency,
        inputs_per_request: embatch::provider::direct::DEFAULT_INPUTS_PER_REQUEST,
        concurrency: embatch::provider::direct::DEFAULT_CONCURRENCY,
        requests,
        tokens,
        times,
        time,
    })
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let n = args.chunks;
    let uptime = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("bench: {n} chunks; load average {}", uptime.trim());

    let pg = ThrowawayPostgres::start().context("could not start the throwaway Postgres")?;
    let (url, mut client) = pg.create_default_database().await?;
    client
        .execute(
            "INSERT INTO equipment_families VALUES ($1::text::uuid, 'bench')",
            &[&FAMILY],
        )
        .await?;
    let work = tempfile::Builder::new()
        .prefix("embatch-bench-")
        .tempdir()?;
    let runs_dir = work.path().join("runs");
    let runs = runs_dir.display().to_string();

    // The family: N chunks of ~800 bytes of manual-like text.
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let corpus = if args.templates { "templates" } else { "prose" };
    let vocabulary = embatch::testkit::sample::Vocabulary::new(1_000_000);
    let texts: Vec<String> = (0..n)
        .map(|i| {
            let family =
                &embatch::testkit::sample::FAMILIES[i % embatch::testkit::sample::FAMILIES.len()];
            if args.templates {
                embatch::testkit::sample::chunk_text(family, &mut rng)
            } else {
                vocabulary.chunk(family, &mut rng)
            }
        })
        .collect();
    let text_bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
    load_family(&client, "knowledge_chunks", FAMILY, &texts, &mut rng).await?;
    client
        .batch_execute("VACUUM ANALYZE knowledge_chunks")
        .await?;
    eprintln!(
        "loaded {n} chunks, {:.1} MB of text, in {:.1}s",
        mb(text_bytes),
        started.elapsed().as_secs_f64()
    );

    let common = [
        "--database-url",
        url.as_str(),
        "--runs-dir",
        runs.as_str(),
        "-q",
        "--no-progress",
    ];

    // References for plan: COPY out and the tokenizer alone.
    let mut copy_out_times = Vec::new();
    for _ in 0..3 {
        copy_out_times.push(copy_out(&client).await?.as_secs_f64());
    }
    let copy_out_s = median(copy_out_times);
    // The tables are built first (plan builds them while it connects); the first of the runs
    // is the one a fresh process like plan's sees, reported besides the median.
    embatch::plan::tokens::warm_up();
    let library_count: fn(&str) -> usize = |text| bpe_openai::cl100k_base().count(text);
    let tokenize_runs: Vec<f64> = (0..5)
        .map(|_| tokenize_two_threads(&texts, library_count).as_secs_f64())
        .collect();
    let tokenize_first_s = tokenize_runs[0];
    let tokenize_s = median(tokenize_runs);
    let counter_s = median(
        (0..5)
            .map(|_| {
                tokenize_two_threads(&texts, embatch::plan::tokens::count_tokens).as_secs_f64()
            })
            .collect(),
    );
    drop(texts);

    // Plan, the real command: the median of `--runs` runs, each into an empty runs
    // folder (the run of the one before is removed, so that it holds no chunk).
    let mut plan_args = common.to_vec();
    plan_args.extend(["plan", "--family-id", FAMILY]);
    let (mut plan_times, mut plan_rss) = (Vec::new(), 0.0f64);
    let mut run_dir = PathBuf::new();
    for i in 0..args.runs {
        if i > 0 {
            fs_err::remove_dir_all(&run_dir)?;
        }
        let (time, rss) = run_child(&plan_args)?;
        plan_times.push(time.as_secs_f64());
        plan_rss = plan_rss.max(rss);
        run_dir = embatch::run::folders::find_runs(&runs_dir, Some(FAMILY))?
            .pop()
            .map(|found| found.dir)
            .context("the plan created no run")?;
    }
    let plan_time = Duration::from_secs_f64(median(plan_times.clone()));
    let run_dir_text = run_dir.display().to_string();
    eprintln!(
        "plan: median {:.2}s of {plan_times:.2?}, peak RSS {plan_rss:.1} MiB",
        plan_time.as_secs_f64()
    );
    if args.plan_only {
        let plan_mb_per_s = mb(text_bytes) / plan_time.as_secs_f64();
        let tokenize_mb_per_s = mb(text_bytes) / tokenize_s;
        let counter_mb_per_s = mb(text_bytes) / counter_s;
        println!(
            "plan {plan_mb_per_s:.1} MB/s; bpe-openai alone {tokenize_mb_per_s:.1} MB/s, ratio {:.3}; embatch's counter alone {counter_mb_per_s:.1} MB/s, ratio {:.3}; COPY out {:.1} MB/s, ratio {:.3}",
            plan_mb_per_s / tokenize_mb_per_s,
            plan_mb_per_s / counter_mb_per_s,
            mb(text_bytes) / copy_out_s,
            plan_mb_per_s / (mb(text_bytes) / copy_out_s),
        );
        drop(client);
        pg.drop_database(&url).await?;
        return Ok(());
    }

    // The provider's output, float and base64, shuffled.
    let started = Instant::now();
    let (float_bytes, base64_bytes) = write_outputs(&run_dir, 11)?;
    eprintln!(
        "wrote {:.0} MB of float and {:.0} MB of base64 output in {:.1}s",
        mb(float_bytes),
        mb(base64_bytes),
        started.elapsed().as_secs_f64()
    );
    let batches = batches_of(&run_dir)?;
    let ids: Vec<String> = batches
        .iter()
        .flat_map(|(_, ids)| ids.iter().cloned())
        .collect();

    // Parsing alone, one core.
    let parse_lines = n.min(20_000);
    let parse = |kind: &str| -> anyhow::Result<(f64, f64)> {
        let mut rates = Vec::new();
        let mut mbs = Vec::new();
        for _ in 0..3 {
            let (lines, bytes, time) = parse_alone(&batches, kind, parse_lines)?;
            rates.push(lines as f64 / time.as_secs_f64());
            mbs.push(mb(bytes) / time.as_secs_f64());
        }
        Ok((median(rates), median(mbs)))
    };
    let (parse_float_lps, parse_float_mbps) = parse("float")?;
    let (parse_base64_lps, parse_base64_mbps) = parse("base64")?;

    // Ingest, the real command, float then base64: the median of `--runs` runs, each from a
    // table whose embeddings were reset and vacuumed.
    let ingest = |kind: &'static str| {
        let run_dir_text = run_dir_text.clone();
        let run_dir = run_dir.clone();
        let client = &client;
        async move {
            let (mut times, mut peak) = (Vec::new(), 0.0f64);
            for _ in 0..args.runs {
                reset_embeddings(client, "knowledge_chunks").await?;
                make_downloaded(&run_dir, kind)?;
                let (time, rss) = run_child(&ingest_args(&common, &run_dir_text))?;
                let written =
                    count_where(client, "knowledge_chunks", "embedding IS NOT NULL").await?;
                if written != n as i64 {
                    bail!("{kind} ingest wrote {written} of {n} vectors");
                }
                times.push(time.as_secs_f64());
                peak = peak.max(rss);
            }
            let time = Duration::from_secs_f64(median(times.clone()));
            eprintln!(
                "ingest {kind}: median {:.2}s of {times:.2?}, peak RSS {peak:.1} MiB",
                time.as_secs_f64()
            );
            anyhow::Ok((time, peak))
        }
    };
    let (ingest_float_time, ingest_float_rss) = ingest("float").await?;
    let (ingest_base64_time, ingest_base64_rss) = ingest("base64").await?;

    // The references for ingest.
    reset_embeddings(&client, "knowledge_chunks").await?;
    let seed_ids = &ids[..ids.len().min(args.seed_rows)];
    let seed_time = seed_style(&mut client, seed_ids).await?;
    let mut copy_times = Vec::new();
    for _ in 0..args.runs {
        copy_times.push(copy_reference(&client, &ids).await?.as_secs_f64());
    }
    let copy_time = Duration::from_secs_f64(median(copy_times.clone()));
    eprintln!(
        "binary COPY reference: median {:.2}s of {copy_times:.2?}",
        copy_time.as_secs_f64()
    );
    client.batch_execute("DROP TABLE copy_reference").await?;

    // Output files are big (400k float lines are ~7 GB): gone before the HNSW phase.
    for (dir, _) in &batches {
        for name in ["output.jsonl", "output.float.jsonl", "output.base64.jsonl"] {
            let _ = fs_err::remove_file(dir.join(name));
        }
    }

    // Ingest into a column with an HNSW index, on a table of its own (smaller: it is slow).
    let hnsw_rows = args.hnsw_rows.min(n);
    client
        .batch_execute(&format!(
            "CREATE TABLE hnsw_chunks (LIKE knowledge_chunks INCLUDING ALL);
             CREATE INDEX hnsw_chunks_embedding ON hnsw_chunks USING hnsw (embedding vector_cosine_ops);
             INSERT INTO equipment_families VALUES ('{HNSW_FAMILY}', 'hnsw');"
        ))
        .await?;
    let mut rng = StdRng::seed_from_u64(8);
    let hnsw_texts: Vec<String> = (0..hnsw_rows)
        .map(|_| {
            embatch::testkit::sample::chunk_text(&embatch::testkit::sample::FAMILIES[0], &mut rng)
        })
        .collect();
    load_family(&client, "hnsw_chunks", HNSW_FAMILY, &hnsw_texts, &mut rng).await?;
    client.batch_execute("VACUUM ANALYZE hnsw_chunks").await?;
    let mut hnsw_plan = common.to_vec();
    hnsw_plan.extend([
        "plan",
        "--family-id",
        HNSW_FAMILY,
        "--table",
        "hnsw_chunks",
        "--family-table",
        "none",
        "--encoding-format",
        "base64",
    ]);
    run_child(&hnsw_plan)?;
    let hnsw_run = embatch::run::folders::find_runs(&runs_dir, Some(HNSW_FAMILY))?
        .pop()
        .map(|found| found.dir)
        .context("the HNSW plan created no run")?;
    write_outputs(&hnsw_run, 12)?;
    make_downloaded(&hnsw_run, "base64")?;
    let hnsw_run_text = hnsw_run.display().to_string();
    let (hnsw_time, _) = run_child(&ingest_args(&common, &hnsw_run_text))?;
    let hnsw_written = count_where(&client, "hnsw_chunks", "embedding IS NOT NULL").await?;
    if hnsw_written != hnsw_rows as i64 {
        bail!("the HNSW ingest wrote {hnsw_written} of {hnsw_rows} vectors");
    }

    // `direct` against the emulator's embeddings endpoint: the plan's run is removed first,
    // so that it holds no chunk.
    let direct = if args.skip_direct {
        None
    } else {
        fs_err::remove_dir_all(&run_dir)?;
        Some(direct_phase(&client, &common, &runs_dir, n, &args).await?)
    };

    drop(client);
    pg.drop_database(&url).await?;
    drop(pg);
    drop(work);

    // Figures.
    let secs = |d: Duration| d.as_secs_f64();
    let plan_rows_per_s = n as f64 / secs(plan_time);
    let plan_mb_per_s = mb(text_bytes) / secs(plan_time);
    let copy_out_mb_per_s = mb(text_bytes) / copy_out_s;
    let tokenize_only_mb_per_s = mb(text_bytes) / tokenize_s;
    let counter_mb_per_s = mb(text_bytes) / counter_s;
    let copy_reference_rows_per_s = n as f64 / secs(copy_time);
    let seed_style_rows_per_s = seed_ids.len() as f64 / secs(seed_time);
    let ingest_float_rows_per_s = n as f64 / secs(ingest_float_time);
    let ingest_base64_rows_per_s = n as f64 / secs(ingest_base64_time);
    let hnsw_rows_per_s = hnsw_rows as f64 / secs(hnsw_time);
    let load_after = fs_err::read_to_string("/proc/loadavg").unwrap_or_default();
    let direct_json = direct.as_ref().map(|d| {
        serde_json::json!({
            "latency_ms": d.latency.as_millis() as u64,
            "inputs_per_request": d.inputs_per_request,
            "concurrency": d.concurrency,
            "requests": d.requests,
            "inputs": n,
            "tokens": d.tokens,
            "advance_s": d.time,
            "advance_s_runs": d.times,
            "requests_per_s": d.requests as f64 / d.time,
            "inputs_per_s": n as f64 / d.time,
            "tokens_per_s": d.tokens as f64 / d.time,
            "latency_bound_requests_per_s": d.latency_bound(),
        })
    });

    let json = serde_json::json!({
        "n": n,
        "corpus": corpus,
        "plan_rows_per_s": plan_rows_per_s,
        "plan_mb_per_s": plan_mb_per_s,
        "copy_out_mb_per_s": copy_out_mb_per_s,
        "plan_vs_copy_out": plan_mb_per_s / copy_out_mb_per_s,
        "tokenize_only_mb_per_s": tokenize_only_mb_per_s,
        "plan_vs_tokenize": plan_mb_per_s / tokenize_only_mb_per_s,
        "tokenize_only_first_run_mb_per_s": mb(text_bytes) / tokenize_first_s,
        "tokenize_embatch_mb_per_s": counter_mb_per_s,
        "plan_vs_tokenize_embatch": plan_mb_per_s / counter_mb_per_s,
        "copy_reference_rows_per_s": copy_reference_rows_per_s,
        "seed_style_rows_per_s": seed_style_rows_per_s,
        "seed_style_rows": seed_ids.len(),
        "ingest_float_rows_per_s": ingest_float_rows_per_s,
        "ingest_base64_rows_per_s": ingest_base64_rows_per_s,
        "ingest_float_vs_copy": ingest_float_rows_per_s / copy_reference_rows_per_s,
        "ingest_base64_vs_copy": ingest_base64_rows_per_s / copy_reference_rows_per_s,
        "ingest_float_vs_seed": ingest_float_rows_per_s / seed_style_rows_per_s,
        "ingest_base64_vs_seed": ingest_base64_rows_per_s / seed_style_rows_per_s,
        "parse_float_lines_per_s": parse_float_lps,
        "parse_float_mb_per_s": parse_float_mbps,
        "parse_base64_lines_per_s": parse_base64_lps,
        "parse_base64_mb_per_s": parse_base64_mbps,
        "peak_rss_mib_plan": plan_rss,
        "peak_rss_mib_ingest": ingest_float_rss.max(ingest_base64_rss),
        "peak_rss_mib_ingest_float": ingest_float_rss,
        "peak_rss_mib_ingest_base64": ingest_base64_rss,
        "hnsw_rows": hnsw_rows,
        "hnsw_ingest_rows_per_s": hnsw_rows_per_s,
        "hnsw_vs_ingest_base64": hnsw_rows_per_s / ingest_base64_rows_per_s,
        "output_float_mb": mb(float_bytes),
        "output_base64_mb": mb(base64_bytes),
        "direct": direct_json,
        "load_average_before": uptime.trim(),
        "load_average_after": load_after.trim(),
    });

    let row = |what: &str, figure: String, ratio: String, target: &str| {
        println!("{what:<44} {figure:>22} {ratio:>22} {target:>10}");
    };
    println!(
        "embatch bench: {n} chunks ({:.1} MB of text, corpus {corpus}), {DIMENSIONS} dimensions; load average before {} / after {}",
        mb(text_bytes),
        uptime.trim(),
        load_after.trim()
    );
    row("phase", "figure".into(), "ratio".into(), "target");
    row(
        "plan (select+tokenize+shard+write)",
        format!("{plan_rows_per_s:.0} rows/s {plan_mb_per_s:.1} MB/s"),
        format!("{:.2}x bpe-openai", plan_mb_per_s / tokenize_only_mb_per_s),
        ">= 0.70x",
    );
    row(
        "",
        String::new(),
        format!("{:.2}x own counter", plan_mb_per_s / counter_mb_per_s),
        "",
    );
    row(
        "",
        String::new(),
        format!("{:.2}x COPY out", plan_mb_per_s / copy_out_mb_per_s),
        "",
    );
    row(
        "  ref: COPY (SELECT id, content) TO STDOUT",
        format!("{copy_out_mb_per_s:.1} MB/s"),
        String::new(),
        "",
    );
    row(
        "  ref: bpe-openai count alone, 2 threads",
        format!(
            "{tokenize_only_mb_per_s:.1} MB/s (1st {:.1})",
            mb(text_bytes) / tokenize_first_s
        ),
        String::new(),
        "",
    );
    row(
        "  ref: embatch count_tokens alone, 2 threads",
        format!("{counter_mb_per_s:.1} MB/s"),
        String::new(),
        "",
    );
    row(
        "parse float output (1 core)",
        format!("{parse_float_lps:.0} l/s {parse_float_mbps:.0} MB/s"),
        String::new(),
        ">= 400",
    );
    row(
        "parse base64 output (1 core)",
        format!("{parse_base64_lps:.0} l/s {parse_base64_mbps:.0} MB/s"),
        String::new(),
        ">= 1000",
    );
    row(
        "ingest float (parse+write)",
        format!("{ingest_float_rows_per_s:.0} rows/s"),
        format!(
            "{:.2}x COPY {:.1}x seed",
            ingest_float_rows_per_s / copy_reference_rows_per_s,
            ingest_float_rows_per_s / seed_style_rows_per_s
        ),
        ">=0.5x 5x",
    );
    row(
        "ingest base64 (parse+write)",
        format!("{ingest_base64_rows_per_s:.0} rows/s"),
        format!(
            "{:.2}x COPY {:.1}x seed",
            ingest_base64_rows_per_s / copy_reference_rows_per_s,
            ingest_base64_rows_per_s / seed_style_rows_per_s
        ),
        ">=0.7x 5x",
    );
    row(
        "  ref: binary COPY into an empty table",
        format!("{copy_reference_rows_per_s:.0} rows/s"),
        String::new(),
        "",
    );
    row(
        &format!("  ref: seed-style UPDATE per row ({} rows)", seed_ids.len()),
        format!("{seed_style_rows_per_s:.0} rows/s"),
        String::new(),
        "",
    );
    row(
        &format!("ingest base64, HNSW-indexed ({hnsw_rows} rows)"),
        format!("{hnsw_rows_per_s:.0} rows/s"),
        format!(
            "{:.3}x unindexed",
            hnsw_rows_per_s / ingest_base64_rows_per_s
        ),
        "",
    );
    row(
        "peak RSS plan / ingest float / base64",
        format!("{plan_rss:.1} / {ingest_float_rss:.1} / {ingest_base64_rss:.1} MiB"),
        String::new(),
        "<= 64",
    );
    if let Some(d) = &direct {
        row(
            &format!(
                "direct, {} ms/request, {} inputs x {} in flight",
                d.latency.as_millis(),
                d.inputs_per_request,
                d.concurrency
            ),
            format!(
                "{:.1} req/s {:.0} inputs/s",
                d.requests as f64 / d.time,
                n as f64 / d.time
            ),
            format!("{:.0} tokens/s", d.tokens as f64 / d.time),
            "",
        );
        if let Some(bound) = d.latency_bound() {
            row(
                "  ref: the latency's bound (in flight / latency)",
                format!("{bound:.1} req/s"),
                String::new(),
                "",
            );
        }
    }
    if let Some(path) = &args.json {
        fs_err::write(path, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
