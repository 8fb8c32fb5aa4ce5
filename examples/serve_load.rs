//! A load figure for `embatch serve`: requests/s and latency percentiles on loopback.
//!
//! Starts a throwaway Postgres with pgvector and the built-in emulator, loads sample chunks,
//! starts `embatch serve` (through the binary's own code path, `cli::parse` + `embatch::run`,
//! on its own runtime thread), then drives it with `--concurrency` clients, each request a
//! different chunk (so every request is a real lookup, API call and write). It first measures
//! the emulator's own latency for a one-input `/v1/embeddings` call, so the serve figure can be
//! read against it, and prints the machine's load average before and after (the machine may be
//! shared).
//!
//! `cargo run --release --example serve_load -- [--requests 5000] [--concurrency 32]
//!   [--emulator-latency-ms 0]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use embatch::emulator::{Emulator, EmulatorConfig, Faults};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use uuid::Uuid;

struct Args {
    requests: usize,
    concurrency: usize,
    emulator_latency: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        requests: 5000,
        concurrency: 32,
        emulator_latency: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let number: u64 = value
            .parse()
            .with_context(|| format!("{flag} takes a number, not {value:?}"))?;
        match flag.as_str() {
            "--requests" => args.requests = number as usize,
            "--concurrency" => args.concurrency = (number as usize).max(1),
            "--emulator-latency-ms" => args.emulator_latency = Duration::from_millis(number),
            other => anyhow::bail!(
                "unknown flag {other}; use --requests N, --concurrency N, --emulator-latency-ms N"
            ),
        }
    }
    Ok(args)
}

fn load_average() -> String {
    fs_err::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    eprintln!("load average before: {}", load_average());
    let pg = ThrowawayPostgres::start().context("could not start the throwaway Postgres")?;
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let (url, client) = pg.create_default_database().await?;
    let family = Uuid::from_u128(0xfa00 << 64);
    client
        .execute(
            "INSERT INTO equipment_families (id, name) VALUES ($1, 'load')",
            &[&family],
        )
        .await?;
    let chunks = embatch::testkit::sample::generate(args.requests, 11, false);
    let ids: Vec<Uuid> = (0..chunks.len()).map(|_| Uuid::new_v4()).collect();
    let contents: Vec<&str> = chunks.iter().map(|c| c.content.as_str()).collect();
    client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
             SELECT i, $2, c FROM unnest($1::uuid[], $3::text[]) AS u(i, c)",
            &[&ids, &family, &contents],
        )
        .await?;
    let mean_tokens = contents
        .iter()
        .map(|c| embatch::plan::tokens::count_tokens(c))
        .sum::<usize>() as f64
        / contents.len().max(1) as f64;

    // The emulator's own latency: one-input calls, one at a time, straight to it.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let mut emulator_times = Vec::new();
    for content in contents.iter().take(200) {
        let started = Instant::now();
        let response = http
            .post(format!("{}/embeddings", emulator.base_url()))
            .bearer_auth(emulator.api_key())
            .json(&serde_json::json!({"model": "text-embedding-3-small", "input": [content]}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "emulator: {}",
            response.status()
        );
        response.bytes().await?;
        emulator_times.push(started.elapsed());
    }
    emulator_times.sort();
    emulator.set_faults(Faults {
        latency: args.emulator_latency,
        ..Faults::default()
    });

    // `embatch serve` on its own runtime, through the binary's code path.
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let argv = vec![
        "embatch".to_owned(),
        "--database-url".to_owned(),
        url.clone(),
        "--base-url".to_owned(),
        emulator.base_url(),
        "--api-key".to_owned(),
        emulator.api_key().to_owned(),
        "-q".to_owned(),
        "serve".to_owned(),
        "--listen".to_owned(),
        listen.clone(),
    ];
    let parsed = embatch::cli::parse(argv).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime for the server");
        if let Err(e) = runtime.block_on(embatch::run(parsed.config)) {
            eprintln!("embatch serve failed: {e:#}");
            std::process::exit(1);
        }
    });
    let base = format!("http://{listen}");
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(response) = http.get(format!("{base}/healthz")).send().await
            && response.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(ready, "embatch serve did not come up on {base}");

    // The load: each worker takes the next chunk until every chunk was asked for once.
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (ids, next, http, base) = (
            Arc::clone(&ids),
            Arc::clone(&next),
            http.clone(),
            base.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut times = Vec::new();
            let mut statuses: Vec<u16> = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(index) else { break };
                let sent = Instant::now();
                let status = match http
                    .post(format!("{base}/api/v1/embed/chunk/{id}"))
                    .send()
                    .await
                {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    Err(_) => 0,
                };
                times.push(sent.elapsed());
                statuses.push(status);
            }
            (times, statuses)
        }));
    }
    let mut times = Vec::new();
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    for worker in workers {
        let (t, s) = worker.await?;
        times.extend(t);
        for status in s {
            *statuses.entry(status).or_default() += 1;
        }
    }
    let elapsed = started.elapsed();
    times.sort();
    let n = times.len();
    let embedded: i64 = client
        .query_one(
            "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL",
            &[],
        )
        .await?
        .get(0);

    println!("embatch serve on loopback, emulator-backed, throwaway Postgres 16 + pgvector");
    println!(
        "  requests: {n} (each a different chunk, ~{mean_tokens:.0} tokens, vector(1536)), concurrency {}",
        args.concurrency
    );
    println!("  statuses: {statuses:?}; rows embedded: {embedded}");
    println!(
        "  throughput: {:.0} requests/s over {:.2} s",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "  latency: p50 {}, p90 {}, p99 {}, max {}",
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.90)),
        ms(percentile(&times, 0.99)),
        ms(percentile(&times, 1.0))
    );
    println!(
        "  emulator alone (one input, sequential, {} calls): p50 {}, p99 {}; injected latency during the load: {}",
        emulator_times.len(),
        ms(percentile(&emulator_times, 0.50)),
        ms(percentile(&emulator_times, 0.99)),
        ms(args.emulator_latency)
    );
    println!(
        "  load average: {} after (1, 5, 15 min; {} cores)",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Stop the server as an operator would (SIGTERM: it finishes and closes its pool) before
    // the throwaway Postgres goes away.
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM)?;
    tokio::task::spawn_blocking(move || server_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
    drop(pg);
    Ok(())
}
