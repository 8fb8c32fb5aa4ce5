use super::*;
use crate::emulator::{Api, Emulator, EmulatorConfig, Faults, LostAnswer};
use crate::provider::openai::Timeouts;
use std::sync::Arc;

const MODEL: &str = "gemini-embedding-001";

fn params(output_dimensionality: Option<u32>) -> BatchParams {
    BatchParams {
        model: MODEL.to_owned(),
        output_dimensionality,
        task_type: TaskType::RetrievalDocument,
    }
}

async fn gemini_emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        api: Api::Gemini,
        ..EmulatorConfig::default()
    })
    .await
    .unwrap()
}

fn provider_for(emu: &Emulator, key: &str) -> GeminiProvider {
    let options = ClientOptions {
        base_url: emu.base_url(),
        api_key: key.to_owned(),
        max_retries: 2,
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        provider: Provider::Gemini,
        auth_header: AuthHeader::GoogApiKey,
        ..ClientOptions::default()
    };
    let timeouts = Timeouts {
        idle: Duration::from_secs(5),
        upload_answer: Duration::from_secs(5),
        ..Timeouts::default()
    };
    GeminiProvider::with_client(
        ApiClient::with_timeouts(options, timeouts).unwrap(),
        params(Some(768)),
    )
}

fn write_input(dir: &Path, lines: &[(&str, &str)]) -> std::path::PathBuf {
    let template = crate::plan::request::RequestTemplate {
        model: MODEL.to_owned(),
        dimensions: Some(768),
        encoding_format: crate::models::EncodingFormat::Float,
        provider: Provider::Gemini,
        task_type: Some(TaskType::RetrievalDocument),
    };
    let mut out = Vec::new();
    for (id, text) in lines {
        template.write_line(id, text, &mut out);
    }
    let path = dir.join("input.jsonl");
    fs_err::write(&path, out).unwrap();
    path
}

/// `a` and `b` within a few ulps: the client's normalisation of a scaled vector rounds.
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
}

fn norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn file_ids_are_deterministic_and_valid() {
    let id = file_id_for("embatch-2026-run-batch_001.jsonl");
    assert_eq!(id, file_id_for("embatch-2026-run-batch_001.jsonl"));
    assert_ne!(id, file_id_for("embatch-2026-run-batch_002.jsonl"));
    assert_eq!(id.len(), 40);
    assert!(id.starts_with("eb-"));
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    );
}

#[test]
fn display_names_carry_the_metadata_both_ways() {
    let metadata: BTreeMap<String, String> = [
        ("embatch_run_id".to_owned(), "run 1=a%b".to_owned()),
        ("embatch_batch".to_owned(), "batch_001".to_owned()),
    ]
    .into();
    let name = encode_display_name(&metadata);
    assert_eq!(
        name,
        "embatch embatch_batch=batch_001 embatch_run_id=run%201%3Da%25b"
    );
    assert_eq!(decode_display_name(&name), Some(metadata));
    assert_eq!(decode_display_name("my own batch"), None);
}

#[test]
fn states_of_both_spellings_map_to_the_state_machines_words() {
    let op = |state: &str| json!({"name": "batches/x", "metadata": {"state": state, "createTime": "2025-09-10T13:37:39Z"}});
    for (state, word) in [
        ("BATCH_STATE_PENDING", "validating"),
        ("BATCH_STATE_RUNNING", "in_progress"),
        ("BATCH_STATE_SUCCEEDED", "completed"),
        ("BATCH_STATE_FAILED", "failed"),
        ("BATCH_STATE_CANCELLED", "cancelled"),
        ("BATCH_STATE_EXPIRED", "expired"),
        ("JOB_STATE_SUCCEEDED", "completed"),
        ("JOB_STATE_PENDING", "validating"),
        ("JOB_STATE_EXPIRED", "expired"),
    ] {
        assert_eq!(snapshot(&op(state)).status.as_str(), word, "{state}");
    }
    // Unknown but done: cancelled by its error code 1, else completed.
    let mut done = op("BATCH_STATE_NEW");
    done["done"] = json!(true);
    assert_eq!(snapshot(&done).status.as_str(), "completed");
    done["error"] = json!({"code": 1, "message": "CANCELLED"});
    assert_eq!(snapshot(&done).status.as_str(), "cancelled");
    assert_eq!(
        snapshot(&op("BATCH_STATE_NEW")).status.as_str(),
        "BATCH_STATE_NEW"
    );
    let counted = json!({"name": "batches/x", "metadata": {"state": "BATCH_STATE_RUNNING",
        "createTime": "2025-09-10T13:37:39Z",
        "batchStats": {"requestCount": "10", "successfulRequestCount": "7", "failedRequestCount": "1"},
        "output": {"responsesFile": "files/batch-x"}}});
    let snap = snapshot(&counted);
    assert_eq!(
        (
            snap.request_counts.total,
            snap.request_counts.completed,
            snap.request_counts.failed
        ),
        (10, 7, 1)
    );
    assert_eq!(snap.output_file_id.as_deref(), Some("files/batch-x"));
    assert_eq!(snap.error_file_id, None);
}

#[tokio::test]
async fn a_batch_goes_through_the_emulator_and_is_adopted_by_display_name() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[("a", "first text"), ("b", "second text")]);
    let size = fs_err::metadata(&input).unwrap().len();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let observer = Arc::clone(&seen);
    let file = provider
        .upload(
            &input,
            "run-1_batch_001.jsonl",
            Duration::from_secs(7200),
            Arc::new(move |n| observer.store(n, std::sync::atomic::Ordering::Relaxed)),
        )
        .await
        .unwrap();
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), size);
    assert_eq!(
        file.id,
        format!("files/{}", file_id_for("run-1_batch_001.jsonl"))
    );
    assert_eq!(file.filename, "run-1_batch_001.jsonl");
    assert_eq!(file.bytes, size);
    // Gemini's files live 48 h, whatever was asked.
    let life = file.expires_at.unwrap() - file.created_at;
    assert_eq!(life.num_hours(), 48);
    let found = BatchProvider::find_files_named(&provider, "run-1_batch_001.jsonl")
        .await
        .unwrap();
    assert_eq!(found, vec![file.clone()]);
    assert!(
        BatchProvider::find_files_named(&provider, "run-1_batch_002.jsonl")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(provider.get_file(&file.id).await.unwrap(), file);

    let metadata: BTreeMap<String, String> = [
        ("embatch_run_id".to_owned(), "run-1".to_owned()),
        ("embatch_batch".to_owned(), "batch_001".to_owned()),
    ]
    .into();
    emu.set_faults(Faults {
        lose_answers: vec![LostAnswer::CreateBatch],
        ..Faults::default()
    });
    let lost = provider
        .create_batch(&file.id, &metadata)
        .await
        .unwrap_err();
    assert!(lost.is_unknown_outcome(), "{lost}");
    let not_before = file.created_at - chrono::Duration::seconds(5);
    let adopted = provider.find_batches(not_before, &metadata).await.unwrap();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].metadata, metadata);
    let other: BTreeMap<String, String> =
        [("embatch_run_id".to_owned(), "run-2".to_owned())].into();
    assert!(
        provider
            .find_batches(not_before, &other)
            .await
            .unwrap()
            .is_empty()
    );
    let later = file.created_at + chrono::Duration::hours(1);
    assert!(
        provider
            .find_batches(later, &metadata)
            .await
            .unwrap()
            .is_empty()
    );

    let batch = provider.get_batch(&adopted[0].id).await.unwrap();
    assert!(batch.id.starts_with("batches/"), "{}", batch.id);
    assert_eq!(batch.snapshot.status.as_str(), "completed");
    assert_eq!(batch.snapshot.request_counts.completed, 2);
    assert!(
        batch.record.contains("\"BATCH_STATE_SUCCEEDED\""),
        "{}",
        batch.record
    );
    let output = batch.snapshot.output_file_id.clone().unwrap();
    let dest = dir.path().join("output.jsonl");
    provider
        .download_file(&output, &dest, Arc::new(|_| {}))
        .await
        .unwrap();
    let text = fs_err::read_to_string(&dest).unwrap();
    let mut ids = Vec::new();
    for line in text.lines() {
        assert!(line.starts_with("{\"key\":"), "{line}");
        match crate::output::parse_line(line, 768) {
            crate::output::LineOutcome::Vector { custom_id, vector } => {
                let want = if custom_id == "a" {
                    "first text"
                } else {
                    "second text"
                };
                assert_close(&vector, &crate::emulator::vectors::embedding(want, 768));
                assert!((norm(&vector) - 1.0).abs() < 1e-5);
                ids.push(custom_id);
            }
            other => panic!("{other:?}"),
        }
    }
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    // Cancelling a finished batch is fine.
    assert_eq!(
        provider
            .cancel_batch(&batch.id)
            .await
            .unwrap()
            .snapshot
            .status
            .as_str(),
        "completed"
    );
    provider.delete_file(&file.id).await.unwrap();
    provider.delete_file(&file.id).await.unwrap();
    assert!(
        BatchProvider::find_files_named(&provider, "run-1_batch_001.jsonl")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(provider.clock_reading().is_some());
}

#[tokio::test]
async fn a_lost_upload_answer_is_found_by_its_id_and_a_second_upload_is_refused() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[("a", "first text")]);
    emu.set_faults(Faults {
        lose_answers: vec![LostAnswer::Upload],
        ..Faults::default()
    });
    let lost = provider
        .upload(&input, "x.jsonl", Duration::ZERO, Arc::new(|_| {}))
        .await
        .unwrap_err();
    assert!(lost.is_unknown_outcome(), "{lost}");
    let found = BatchProvider::find_files_named(&provider, "x.jsonl")
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].bytes, fs_err::metadata(&input).unwrap().len());
    // The name is taken: a second upload says the first may exist, never makes a copy.
    let again = provider
        .upload(&input, "x.jsonl", Duration::ZERO, Arc::new(|_| {}))
        .await
        .unwrap_err();
    assert!(again.is_unknown_outcome(), "{again}");
    assert_eq!(emu.counters().uploads, 1);
}

#[tokio::test]
async fn the_batch_list_is_read_to_its_last_page() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[("a", "text")]);
    let file = provider
        .upload(&input, "list.jsonl", Duration::ZERO, Arc::new(|_| {}))
        .await
        .unwrap();
    // The emulator answers at most 20 a page, oldest first: the one looked for is on the
    // second page.
    for n in 0..25 {
        let metadata: BTreeMap<String, String> =
            [("embatch_batch".to_owned(), format!("b{n}"))].into();
        provider.create_batch(&file.id, &metadata).await.unwrap();
    }
    let wanted: BTreeMap<String, String> = [("embatch_batch".to_owned(), "b23".to_owned())].into();
    let not_before = file.created_at - chrono::Duration::seconds(5);
    let found = provider.find_batches(not_before, &wanted).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].metadata, wanted);
}

#[tokio::test]
async fn errors_are_read_from_google_status_bodies() {
    let emu = gemini_emulator().await;
    let wrong = provider_for(&emu, "AIza-wrong");
    let err = wrong.read_clock().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the API rejected the key (HTTP 400): check GEMINI_API_KEY (or --api-key)"
    );
    let provider = provider_for(&emu, emu.api_key());
    // A file that is not there: 403 "… or it may not exist" is no such object.
    let err = provider.get_file("files/eb-nope").await.unwrap_err();
    assert!(matches!(err, ApiError::NotFound { .. }), "{err:?}");
    let err = provider
        .create_batch("files/eb-nope", &BTreeMap::new())
        .await
        .unwrap_err();
    match err {
        ApiError::BadRequest {
            status: 400,
            message,
        } => assert!(message.contains("eb-nope"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A 429 with RetryInfo and no Retry-After: the wait is the RetryInfo's.
    emu.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 7,
        ..Faults::default()
    });
    let no_retries = GeminiProvider::new(
        ClientOptions {
            base_url: emu.base_url(),
            api_key: emu.api_key().to_owned(),
            max_retries: 0,
            ..ClientOptions::default()
        },
        params(None),
    )
    .unwrap();
    let err = no_retries.read_clock().await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)), "{err:?}");
    // On creation, a 429 is the queue limit.
    let err = provider
        .create_batch("files/eb-x", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::QueueLimit { .. }), "{err:?}");
    // 500s are retried, then reported as the server's.
    emu.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let err = provider.get_batch("batches/x").await.unwrap_err();
    assert!(
        matches!(err, ApiError::Server { status: 500, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_enqueued_token_limit_refuses_the_creation_as_a_queue_limit() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[("a", "text")]);
    let file = provider
        .upload(&input, "limit.jsonl", Duration::ZERO, Arc::new(|_| {}))
        .await
        .unwrap();
    emu.set_faults(Faults {
        token_limit_failures: 1,
        ..Faults::default()
    });
    let err = provider
        .create_batch(&file.id, &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::QueueLimit { .. }), "{err:?}");
    assert_eq!(emu.counters().batch_creations, 0);
    assert!(emu.batches().is_empty());
    provider
        .create_batch(&file.id, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(emu.counters().batch_creations, 1);
}

#[tokio::test]
async fn realtime_vectors_come_in_order_normalised_in_parts_of_100() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let inputs: Vec<String> = (0..150).map(|i| format!("text number {i}")).collect();
    let vectors = provider.embed(MODEL, &inputs, Some(256)).await.unwrap();
    assert_eq!(vectors.len(), 150);
    for (text, vector) in inputs.iter().zip(&vectors) {
        assert_close(vector, &crate::emulator::vectors::embedding(text, 256));
        assert!((norm(vector) - 1.0).abs() < 1e-5);
    }
    assert_eq!(emu.counters().embedding_calls, 2);
    let native = provider
        .embed(MODEL, &["one".to_owned()], None)
        .await
        .unwrap();
    assert_close(
        &native[0],
        &crate::emulator::vectors::embedding("one", 3072),
    );
}

#[tokio::test]
async fn the_key_goes_in_x_goog_api_key_only() {
    let emu = gemini_emulator().await;
    // A bearer token is not a Gemini key: the emulator refuses a call without
    // `x-goog-api-key`.
    let bearer = ApiClient::new(ClientOptions {
        base_url: emu.base_url(),
        api_key: emu.api_key().to_owned(),
        provider: Provider::Gemini,
        auth_header: AuthHeader::Bearer,
        max_retries: 0,
        ..ClientOptions::default()
    })
    .unwrap();
    let err = GeminiProvider::with_client(bearer, params(None))
        .read_clock()
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Auth { status: 403, .. }), "{err:?}");
    // `new` sets the header style whatever the options said.
    let provider = GeminiProvider::new(
        ClientOptions {
            base_url: emu.base_url(),
            api_key: emu.api_key().to_owned(),
            ..ClientOptions::default()
        },
        params(None),
    )
    .unwrap();
    provider.read_clock().await.unwrap();
}

#[tokio::test]
async fn deleting_the_responses_file_leaves_nothing_of_the_batch_behind() {
    let emu = gemini_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<(String, String)> = (0..20)
        .map(|i| (format!("c{i}"), format!("text {i}")))
        .collect();
    let pairs: Vec<(&str, &str)> = texts
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let input = write_input(dir.path(), &pairs);
    let file = provider
        .upload(
            &input,
            "run-1_batch_001.jsonl",
            Duration::from_secs(7200),
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
    // Some requests fail: the emulator's shared model keeps their error lines in a file of
    // its own, which Gemini's one responses file stands for.
    emu.set_faults(Faults {
        request_failure_rate: 0.5,
        ..Faults::default()
    });
    let batch = provider
        .create_batch(&file.id, &BTreeMap::new())
        .await
        .unwrap();
    let batch = provider.get_batch(&batch.id).await.unwrap();
    let responses = batch.snapshot.output_file_id.expect("a responses file");
    let dest = dir.path().join("output.jsonl");
    provider
        .download_file(&responses, &dest, Arc::new(|_| {}))
        .await
        .unwrap();
    let lines = fs_err::read_to_string(&dest).unwrap();
    assert_eq!(lines.lines().count(), 20, "{lines}");
    let errors = lines.lines().filter(|l| l.contains("\"error\"")).count();
    assert!(errors > 0 && errors < 20, "{lines}");
    provider.delete_file(&file.id).await.unwrap();
    provider.delete_file(&responses).await.unwrap();
    assert_eq!(emu.files(), Vec::<Value>::new());
}
