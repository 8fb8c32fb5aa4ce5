//! The realtime path against the emulator and the real test database: `embatch embed` and
//! `embatch serve` (every status code, single-flight under a burst, upstream 429/500
//! recovery, the token rule, graceful shutdown) and the batch path's vectors.

use std::time::Duration;

use embatch::emulator::vectors::embedding;
use embatch::emulator::{EmulatorConfig, Faults};
use embatch::plan::tokens::count_tokens;
use uuid::Uuid;

use crate::harness::TestEnv;

const TOKEN: &str = "test-serve-token-0123456789abcdef";

fn bits(vector: &[f32]) -> Vec<u32> {
    vector.iter().map(|x| x.to_bits()).collect()
}

async fn env_with_emulator() -> TestEnv {
    TestEnv::new()
        .await
        .with_emulator(EmulatorConfig::default())
        .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Waits until the emulator has injected `n` errors (the request is then retrying).
async fn wait_for_injected(env: &TestEnv, n: u64) {
    for _ in 0..200 {
        if env.emu().counters().injected_errors >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the emulator injected no error");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_every_status_code() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let too_long = "pressure ".repeat(9000);
    let ids = env
        .add_chunks(
            family,
            &[
                "Check the hydraulic hose for leaks.",
                "",
                "   \n\t ",
                &too_long,
                "Replace the filter every 500 hours.",
            ],
        )
        .await;
    let (ok_id, empty_id, blank_id, long_id, second_id) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let server = env
        .serve(
            &["-v"],
            &[("EMBATCH_SERVE_TOKEN", TOKEN), ("EMBATCH_API_RETRIES", "1")],
        )
        .await;
    let http = http();

    // 401: no token, a wrong one, a wrong scheme. Nothing is looked up or sent.
    for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
        let (status, body) = server.embed(&http, &ok_id.to_string(), token, "").await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(!body.to_string().contains(TOKEN));
    }
    let basic = http
        .post(server.url(&format!("/api/v1/embed/chunk/{ok_id}")))
        .basic_auth("user", Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status().as_u16(), 401);
    assert_eq!(env.emu().counters().embedding_calls, 0);

    // 200, and the stored vector is the emulator's, bit for bit.
    let (status, body) = server
        .embed(&http, &ok_id.to_string(), Some(TOKEN), "")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"chunk_id": ok_id.to_string(), "model": "text-embedding-3-small",
                           "dimensions": 1536,
                           "tokens": count_tokens("Check the hydraulic hose for leaks.")})
    );
    let stored = env.embedding_of(ok_id).await.expect("stored");
    assert_eq!(
        bits(&stored),
        bits(&embedding("Check the hydraulic hose for leaks.", 1536))
    );

    // 409 when already embedded; 200 again with ?overwrite=true (any spelling of the uuid).
    let (status, body) = server
        .embed(&http, &ok_id.to_string(), Some(TOKEN), "")
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "already_embedded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("overwrite=true")
    );
    let upper = ok_id.to_string().to_uppercase();
    let (status, body) = server
        .embed(&http, &upper, Some(TOKEN), "?overwrite=true")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["chunk_id"], ok_id.to_string());

    // 404: an unknown id, and an id that cannot be a uuid.
    for id in [Uuid::from_u128(42).to_string(), "not-a-uuid".to_owned()] {
        let (status, body) = server.embed(&http, &id, Some(TOKEN), "").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "chunk_not_found");
    }

    // 422: empty, whitespace only, over 8191 tokens. Nothing sent for any of them.
    let calls_before = env.emu().counters().embedding_calls;
    for (id, code) in [
        (empty_id, "empty_content"),
        (blank_id, "empty_content"),
        (long_id, "content_too_long"),
    ] {
        let (status, body) = server.embed(&http, &id.to_string(), Some(TOKEN), "").await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["code"], code);
        assert_eq!(env.embedding_of(id).await, None);
    }
    assert_eq!(env.emu().counters().embedding_calls, calls_before);

    // 502: the API keeps failing; the retry (one here) runs out.
    env.emu().set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let (status, body) = server
        .embed(&http, &second_id.to_string(), Some(TOKEN), "")
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{body}"
    );
    assert_eq!(env.embedding_of(second_id).await, None);
    env.emu().set_faults(Faults::default());

    // /healthz needs no token; unknown routes get a JSON 404.
    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let lost = http.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(lost.status().as_u16(), 404);

    // Neither the token nor the API key ever reaches the log (-v logs every request).
    let log = server.stderr_text();
    assert!(
        log.contains(&format!("/api/v1/embed/chunk/{ok_id} -> 200")),
        "{log}"
    );
    assert!(log.contains("-> 401"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
    assert!(!log.contains(env.emu().api_key()), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_recovers_from_upstream_429_and_500() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env
        .add_chunks(family, &["Grease the bearings.", "Tighten the belt."])
        .await;
    let server = env.serve(&[], &[("EMBATCH_API_RETRIES", "3")]).await;
    for (id, faults) in [
        (
            ids[0],
            Faults {
                rate_429: 1.0,
                retry_after_secs: 1,
                ..Faults::default()
            },
        ),
        (
            ids[1],
            Faults {
                rate_500: 1.0,
                ..Faults::default()
            },
        ),
    ] {
        let injected_before = env.emu().counters().injected_errors;
        env.emu().set_faults(faults);
        let url = server.url(&format!("/api/v1/embed/chunk/{id}"));
        let request = tokio::spawn(async move { http().post(url).send().await });
        // The first attempt fails; the provider recovers while the client backs off.
        wait_for_injected(&env, injected_before + 1).await;
        env.emu().set_faults(Faults::default());
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(env.embedding_of(id).await.is_some());
    }
    assert_eq!(env.emu().counters().embedding_calls, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_100_requests_calls_the_api_once_per_chunk() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let texts: Vec<String> = (0..81)
        .map(|i| format!("Chunk {i}: inspect valve {i} and the seal around it."))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = env.add_chunks(family, &refs).await;
    let hot = ids[0];
    // Each API call takes a while, so the burst overlaps it (as under real provider latency).
    env.emu().set_faults(Faults {
        latency: Duration::from_millis(400),
        ..Faults::default()
    });
    let server = env.serve(&[], &[("EMBATCH_SERVE_TOKEN", TOKEN)]).await;
    let http = http();

    // 20 requests for the hot chunk interleaved with one for each of 80 others.
    let mut targets: Vec<Uuid> = Vec::new();
    for i in 0..80 {
        targets.push(ids[i + 1]);
        if i % 4 == 0 {
            targets.push(hot);
        }
    }
    assert_eq!(targets.len(), 100);
    let requests = targets.iter().map(|id| {
        let http = http.clone();
        let url = server.url(&format!("/api/v1/embed/chunk/{id}"));
        async move {
            let response = http.post(url).bearer_auth(TOKEN).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(requests).await;

    let hot_bodies: Vec<&(u16, String)> = targets
        .iter()
        .zip(&answers)
        .filter(|(id, _)| **id == hot)
        .map(|(_, answer)| answer)
        .collect();
    assert_eq!(hot_bodies.len(), 20);
    for answer in &answers {
        assert_eq!(answer.0, 200, "{answer:?}");
    }
    assert!(
        hot_bodies.iter().all(|a| a.1 == hot_bodies[0].1),
        "{hot_bodies:?}"
    );
    let counters = env.emu().counters();
    assert_eq!(
        counters.embedding_inputs.get(&texts[0]),
        Some(&1),
        "hot chunk"
    );
    for text in &texts[1..] {
        assert_eq!(counters.embedding_inputs.get(text), Some(&1), "{text}");
    }
    assert_eq!(counters.embedding_calls, 81);
    for id in &ids {
        assert!(env.embedding_of(*id).await.is_some());
    }

    // Later requests find it embedded.
    let (status, _) = server.embed(&http, &hot.to_string(), Some(TOKEN), "").await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_batch_path_and_the_realtime_path_store_the_same_vector() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let text = "Bleed residual pressure via valve V-12 until the gauge reads 0 bar.";
    let ids = env.add_chunks(family, &[text]).await;
    let family = family.to_string();
    let run = env
        .exec(&["run", "--family-id", &family, "--poll-seconds", "1"])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let by_batch = env.embedding_of(ids[0]).await.expect("embedded by batch");

    env.client
        .execute("UPDATE knowledge_chunks SET embedding = NULL", &[])
        .await
        .unwrap();
    let run = env
        .exec(&["embed", "--chunk-id", &ids[0].to_string()])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let by_cli = env.embedding_of(ids[0]).await.expect("embedded by embed");
    assert_eq!(bits(&by_batch), bits(&by_cli));

    let server = env.serve(&[], &[]).await;
    let (status, body) = server
        .embed(&http(), &ids[0].to_string(), None, "?overwrite=true")
        .await;
    assert_eq!(status, 200, "{body}");
    let by_serve = env.embedding_of(ids[0]).await.expect("embedded by serve");
    assert_eq!(bits(&by_batch), bits(&by_serve));
    assert_eq!(bits(&by_batch), bits(&embedding(text, 1536)));
}

#[tokio::test(flavor = "multi_thread")]
async fn embed_reports_each_chunk_and_exits_1_unless_all_are_embedded() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let too_long = "torque ".repeat(9000);
    let ids = env
        .add_chunks(
            family,
            &[
                "Check the oil level.",
                "Clean the air filter.",
                "",
                &too_long,
            ],
        )
        .await;
    let unknown = Uuid::from_u128(7).to_string();
    let s: Vec<String> = ids.iter().map(Uuid::to_string).collect();

    // Two sendable chunks go in one request.
    let run = env
        .exec(&["embed", "--chunk-id", &s[0], "--chunk-id", &s[1]])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let (t0, t1) = (
        count_tokens("Check the oil level."),
        count_tokens("Clean the air filter."),
    );
    assert_eq!(
        run.stdout,
        format!("{}\tembedded\t{t0}\n{}\tembedded\t{t1}\n", s[0], s[1])
    );
    assert_eq!(env.emu().counters().embedding_calls, 1);
    assert_eq!(
        bits(&env.embedding_of(ids[1]).await.unwrap()),
        bits(&embedding("Clean the air filter.", 1536))
    );

    // Already embedded: kept, exit 0, no call.
    let run = env.exec(&["embed", "--chunk-id", &s[0]]).await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(run.stdout, format!("{}\talready_embedded\t\n", s[0]));
    assert_eq!(env.emu().counters().embedding_calls, 1);

    // A mix: each chunk gets its line, in the order given; exit 1 names the problems.
    let run = env
        .exec(&[
            "embed",
            "--chunk-id",
            &unknown,
            "--chunk-id",
            &s[2],
            "--chunk-id",
            &s[3],
            "--chunk-id",
            "nope",
            "--chunk-id",
            &s[0],
            "--overwrite",
        ])
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{run:#?}");
    assert_eq!(lines[0], format!("{unknown}\tnot_found\t"));
    assert_eq!(lines[1], format!("{}\tempty\t", s[2]));
    assert!(
        lines[2].starts_with(&format!("{}\ttoo_long\t", s[3])),
        "{run:#?}"
    );
    assert_eq!(lines[3], "nope\tnot_found\t");
    assert_eq!(lines[4], format!("{}\tembedded\t{t0}", s[0]));
    for needle in [
        "4 of 5 chunks were not embedded",
        "not found",
        "empty content",
        "more than the 8191",
        "is not a uuid",
    ] {
        assert!(run.stderr.contains(needle), "{needle}: {run:#?}");
    }
    assert!(!run.stderr.contains("panicked"), "{run:#?}");

    // The API failing after its retries: reported, nothing written, exit 1.
    env.client
        .execute("UPDATE knowledge_chunks SET embedding = NULL", &[])
        .await
        .unwrap();
    env.emu().set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let run = env
        .exec_env(
            &["embed", "--chunk-id", &s[0]],
            &[("EMBATCH_API_RETRIES", "0")],
        )
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(run.stdout, format!("{}\tfailed\t\n", s[0]));
    assert!(run.stderr.contains("HTTP 500"), "{run:#?}");
    assert_eq!(env.embedding_of(ids[0]).await, None);

    // Usage errors exit 2.
    let run = env.exec(&["embed"]).await;
    assert_eq!(run.code, 2, "{run:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embed_splits_requests_at_2048_inputs_on_any_table() {
    let env = env_with_emulator().await;
    env.client
        .batch_execute(
            "CREATE TABLE parts (pid bigint PRIMARY KEY, txt text NOT NULL, e vector(8));
             INSERT INTO parts SELECT i, 'part ' || i || ' gasket' FROM generate_series(1, 2100) AS i;",
        )
        .await
        .unwrap();
    let mut args: Vec<String> = [
        "embed",
        "--table",
        "parts",
        "--id-column",
        "pid",
        "--text-column",
        "txt",
        "--embedding-column",
        "e",
    ]
    .map(String::from)
    .to_vec();
    for i in 1..=2100 {
        args.push("--chunk-id".to_owned());
        args.push(i.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = env.exec(&refs).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 2100);
    assert_eq!(env.emu().counters().embedding_calls, 2, "2048 + 52 inputs");
    let row = env
        .client
        .query_one("SELECT e FROM parts WHERE pid = 2100", &[])
        .await
        .unwrap();
    let stored: pgvector::Vector = row.get(0);
    assert_eq!(
        bits(&stored.to_vec()),
        bits(&embedding("part 2100 gasket", 8))
    );

    // A --dimensions that disagrees with the column is refused before any call.
    let run = env
        .exec(&[
            "embed",
            "--table",
            "parts",
            "--id-column",
            "pid",
            "--text-column",
            "txt",
            "--embedding-column",
            "e",
            "--dimensions",
            "16",
            "--chunk-id",
            "1",
        ])
        .await;
    run.assert_error("disagrees with the column");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_public_address_without_a_token() {
    let env = env_with_emulator().await;
    let mut cmd = tokio::process::Command::from(env.command());
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        cmd.args(["serve", "--listen", "0.0.0.0:0"]).output(),
    )
    .await
    .expect("refused at once")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("EMBATCH_SERVE_TOKEN"), "{stderr}");
    assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");

    // With a token it starts (and the token is not printed).
    let mut cmd = tokio::process::Command::from(env.command());
    cmd.env("EMBATCH_SERVE_TOKEN", TOKEN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut seen = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("listening on") {
                break;
            }
        }
    })
    .await;
    assert!(seen.contains("listening on http://0.0.0.0:"), "{seen}");
    assert!(!seen.contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_requests_in_flight_finish() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env.add_chunks(family, &["Drain the coolant."]).await;
    env.emu().set_faults(Faults {
        latency: Duration::from_millis(1500),
        ..Faults::default()
    });
    let mut server = env.serve(&[], &[]).await;
    let url = server.url(&format!("/api/v1/embed/chunk/{}", ids[0]));
    let request = tokio::spawn(async move { http().post(url).send().await });
    // The request is waiting on the API (1.5 s) when the signal arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.sigterm();
    let response = request.await.unwrap().expect("answered, not cut off");
    assert_eq!(response.status().as_u16(), 200);
    assert!(env.embedding_of(ids[0]).await.is_some());
    let status = tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .expect("the server exits after its last request")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", server.stderr_text());
    assert!(server.stderr_text().contains("shutting down"));
    // New connections are refused once it is gone.
    assert!(http().get(server.url("/healthz")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn content_edited_during_the_call_is_never_given_the_old_vector() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env.add_chunks(family, &["Old text about the pump."]).await;
    let new_text = "New text about the compressor and its valves.";
    env.emu().set_faults(Faults {
        latency: Duration::from_millis(800),
        ..Faults::default()
    });
    let server = env.serve(&[], &[]).await;
    let url = server.url(&format!("/api/v1/embed/chunk/{}", ids[0]));
    let request = tokio::spawn(async move { http().post(url).send().await });
    // Edited while the first call is on its way: its vector is refused (stale) and the
    // service embeds the new content.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.client
        .execute(
            "UPDATE knowledge_chunks SET content = $2 WHERE id = $1",
            &[&ids[0], &new_text],
        )
        .await
        .unwrap();
    let response = request.await.unwrap().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["tokens"], count_tokens(new_text));
    let stored = env.embedding_of(ids[0]).await.unwrap();
    assert_eq!(bits(&stored), bits(&embedding(new_text, 1536)));
    assert_eq!(env.emu().counters().embedding_calls, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_database_is_503_and_the_pool_recovers() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env
        .add_chunks(family, &["Lubricate the chain.", "Align the rollers."])
        .await;
    let server = env.serve(&[], &[]).await;
    let http = http();
    let (status, _) = server.embed(&http, &ids[0].to_string(), None, "").await;
    assert_eq!(status, 200);

    // The database refuses new connections and drops the pool's ones.
    let database: String = env
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    let admin_url = embatch::testkit::pgtemp::ThrowawayPostgres::shared()
        .unwrap()
        .admin_url();
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {quoted} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{database}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable");
    // Without a token nobody is authenticated: no name, host, user or server text.
    assert_eq!(body["status"], "unavailable");
    for detail in [database.as_str(), "accepting", "postgres@", "port"] {
        assert!(!body.to_string().contains(detail), "{detail}: {body}");
    }
    let (status, body) = server.embed(&http, &ids[1].to_string(), None, "").await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.to_string().contains("password"), "{body}");

    // Back again: new connections replace the dead ones.
    admin
        .batch_execute(&format!("ALTER DATABASE {quoted} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    let health = http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let (status, body) = server.embed(&http, &ids[1].to_string(), None, "").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embed_reports_a_chunk_edited_during_the_call_as_stale() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env.add_chunks(family, &["Before the edit."]).await;
    env.emu().set_faults(Faults {
        latency: Duration::from_millis(1500),
        ..Faults::default()
    });
    let id = ids[0].to_string();
    let args = ["embed", "--chunk-id", &id];
    let command = env.exec(&args);
    let edit = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        env.client
            .execute(
                "UPDATE knowledge_chunks SET content = 'After the edit.' WHERE id = $1",
                &[&ids[0]],
            )
            .await
            .unwrap();
    };
    let (run, ()) = tokio::join!(command, edit);
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(run.stdout, format!("{id}\tstale\t\n"));
    assert!(
        run.stderr.contains("changed while it was being embedded"),
        "{run:#?}"
    );
    assert_eq!(env.embedding_of(ids[0]).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn embed_and_serve_say_what_is_missing() {
    // No API key (no emulator configured): refused before anything else.
    let env = TestEnv::new().await;
    let run = env
        .exec(&["embed", "--chunk-id", &Uuid::from_u128(1).to_string()])
        .await;
    run.assert_error("no OpenAI API key");
    let err = env.try_serve(&[], &[]).await.err().expect("refused");
    assert!(err.contains("no OpenAI API key"), "{err}");

    // A table that is not there: the message names the flag to check.
    let env = env_with_emulator().await;
    let run = env
        .exec(&["embed", "--table", "nope", "--chunk-id", "1"])
        .await;
    run.assert_error("check --table");
    let err = env
        .try_serve(&["--table", "nope"], &[])
        .await
        .err()
        .expect("refused");
    assert!(err.contains("check --table"), "{err}");
    assert!(err.starts_with("exit code Some(1)"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embed_prints_one_line_per_id_given_and_counts_chunks() {
    let env = env_with_emulator().await;
    let family = env.add_family(1).await;
    let ids = env
        .add_chunks(family, &["Check the oil level.", "Clean the air filter."])
        .await;
    let (a, b) = (ids[0].to_string(), ids[1].to_string());
    let upper_a = a.to_uppercase();
    let run = env
        .exec(&[
            "embed",
            "--chunk-id",
            &a,
            "--chunk-id",
            &b,
            "--chunk-id",
            &upper_a,
        ])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    let (ta, tb) = (
        count_tokens("Check the oil level."),
        count_tokens("Clean the air filter."),
    );
    assert_eq!(
        run.stdout,
        format!("{a}\tembedded\t{ta}\n{b}\tembedded\t{tb}\n{a}\tembedded\t{ta}\n")
    );
    assert!(
        run.stderr
            .contains(&format!("embedded 2 of 2 chunks ({} tokens)", ta + tb)),
        "{run:#?}"
    );
    // Each chunk was sent once.
    let counters = env.emu().counters();
    assert_eq!(counters.embedding_calls, 1);
    assert_eq!(
        counters.embedding_inputs.get("Check the oil level."),
        Some(&1)
    );

    // Problems are counted per chunk too.
    let unknown = Uuid::from_u128(7).to_string();
    let run = env
        .exec(&[
            "embed",
            "--chunk-id",
            &unknown,
            "--chunk-id",
            &a,
            "--chunk-id",
            &unknown,
            "--chunk-id",
            "nope",
            "--chunk-id",
            "nope",
        ])
        .await;
    assert_eq!(run.code, 1, "{run:#?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{unknown}\tnot_found\t"),
            format!("{a}\talready_embedded\t"),
            format!("{unknown}\tnot_found\t"),
            "nope\tnot_found\t".to_owned(),
            "nope\tnot_found\t".to_owned(),
        ]
    );
    assert!(run.stderr.contains("embedded 0 of 3 chunks"), "{run:#?}");
    assert!(
        run.stderr.contains("2 of 3 chunks were not embedded"),
        "{run:#?}"
    );
}

/// Reads from `stream` until the peer closes it, or `limit` passes (then `None`).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

async fn connect(server: &crate::harness::ServeProcess) -> tokio::net::TcpStream {
    let addr = server.base_url.trim_start_matches("http://").to_owned();
    tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to embatch serve")
}

/// The JSON body of a raw HTTP/1.1 response.
fn json_body(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON body: {response}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_closes_connections_that_stall_or_idle() {
    use tokio::io::AsyncWriteExt as _;
    let env = env_with_emulator().await;
    let server = env.serve(&["--header-timeout", "1s"], &[]).await;
    // 300 connections that never finish their headers, and one that sends nothing.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut stream = connect(&server).await;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        stalled.push(stream);
    }
    stalled.push(connect(&server).await);
    let started = std::time::Instant::now();
    for stream in &mut stalled {
        let closed = read_until_closed(stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a stalled connection stayed open");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    // A kept-alive connection is answered, then closed once idle for the timeout.
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answered = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // The server still answers.
    let health = http().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_beyond_the_bound_wait_but_not_forever() {
    let env = env_with_emulator().await;
    let server = env
        .serve(
            &["--header-timeout", "2s", "--max-http-connections", "4"],
            &[],
        )
        .await;
    // Eight idle connections: four take every slot, four wait in the kernel's queue.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect(&server).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let health = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("answered once the idle connections time out");
    let waited = started.elapsed();
    assert_eq!(health.status().as_u16(), 200);
    // It waited for a slot (the bound holds) and got one once the idle ones were closed.
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_json_and_bodies_are_bounded() {
    use tokio::io::AsyncWriteExt as _;
    let env = env_with_emulator().await;
    let server = env.serve(&["--header-timeout", "2s"], &[]).await;
    let http = http();

    // 405, with its Allow header, as JSON.
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/embed/chunk/x"),
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::DELETE, "/healthz"),
    ] {
        let response = http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method} {path}");
        assert!(response.headers().contains_key("allow"));
        let body: serde_json::Value = response.json().await.expect("a JSON 405");
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("use POST")
        );
    }
    // A path that is not valid UTF-8 once decoded: 400, as JSON.
    let response = http
        .post(server.url("/api/v1/embed/chunk/%FF"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.expect("a JSON 400");
    assert_eq!(body["error"]["code"], "bad_request");

    // A body over 64 KiB, announced by Content-Length: 413 at once.
    let mut stream = connect(&server).await;
    stream
        .write_all(
            b"POST /api/v1/embed/chunk/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        )
        .await
        .unwrap();
    let response = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(json_body(&response)["error"]["code"], "body_too_large");

    // …and sent chunked, without a length.
    let mut stream = connect(&server).await;
    let mut request =
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let size = 64 * 1024 + 1;
    request.extend_from_slice(format!("{size:x}\r\n").as_bytes());
    request.extend(std::iter::repeat_n(b'a', size));
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let response = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(json_body(&response)["error"]["code"], "body_too_large");

    // A small body is taken (and ignored); a trickled one times out with 408.
    let response = http
        .get(server.url("/healthz"))
        .body("x".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let response = read_until_closed(&mut stream, Duration::from_secs(6))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert_eq!(json_body(&response)["error"]["code"], "request_timeout");
}

/// Makes the env's database refuse connections and drops the ones open; returns its name.
async fn take_the_database_away(env: &TestEnv) -> (String, tokio_postgres::Client) {
    let database: String = env
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let admin_url = embatch::testkit::pgtemp::ThrowawayPostgres::shared()
        .unwrap()
        .admin_url();
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{database}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    (database, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_details_are_for_the_token_holder_only() {
    let env = env_with_emulator().await;
    let user: String = env
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    let server = env
        .serve(
            &["--header-timeout", "5s"],
            &[("EMBATCH_SERVE_TOKEN", TOKEN)],
        )
        .await;
    let http = http();
    let health = |token: Option<&'static str>| {
        let mut request = http.get(server.url("/healthz"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    for token in [None, Some("wrong")] {
        let (status, body) = health(token).await;
        assert_eq!(status, 200);
        assert_eq!(body, serde_json::json!({"status": "ok", "database": "ok"}));
    }
    let (status, body) = health(Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["details"]["model"], "text-embedding-3-small");
    let database: String = env
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        body["details"]["database"]
            .as_str()
            .unwrap()
            .contains(&database),
        "{body}"
    );

    let (database, admin) = take_the_database_away(&env).await;
    let (status, body) = health(None).await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["error"]["code"], "database_unavailable");
    let shown = body.to_string();
    for secret in [
        database.as_str(),
        user.as_str(),
        "accepting",
        "/tmp",
        "127.0.0.1",
        "embatch-",
    ] {
        assert!(!shown.contains(secret), "{secret}: {shown}");
    }
    assert!(body.get("details").is_none(), "{body}");
    let (status, body) = health(Some(TOKEN)).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&database),
        "{body}"
    );
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
}
