use super::*;
use crate::emulator::{Api, Emulator, EmulatorConfig, Faults, LostAnswer};
use crate::provider::openai::Timeouts;
use std::sync::Arc;

fn params(output_dimension: Option<u32>) -> BatchParams {
    BatchParams {
        model: "voyage-3.5".to_owned(),
        output_dimension,
        input_type: InputType::Document,
    }
}

async fn voyage_emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        api: Api::Voyage,
        ..EmulatorConfig::default()
    })
    .await
    .unwrap()
}

fn provider_for(emu: &Emulator, key: &str) -> VoyageProvider {
    let options = ClientOptions {
        base_url: emu.base_url(),
        api_key: key.to_owned(),
        max_retries: 2,
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        provider: Provider::Voyage,
        ..ClientOptions::default()
    };
    let timeouts = Timeouts {
        idle: Duration::from_secs(5),
        upload_answer: Duration::from_secs(5),
        ..Timeouts::default()
    };
    VoyageProvider::with_client(
        ApiClient::with_timeouts(options, timeouts).unwrap(),
        params(Some(512)),
    )
}

fn write_input(dir: &Path, lines: &[(&str, &str)]) -> std::path::PathBuf {
    let template = crate::plan::request::RequestTemplate {
        model: "voyage-3.5".to_owned(),
        dimensions: Some(512),
        encoding_format: crate::models::EncodingFormat::Float,
        provider: Provider::Voyage,
        task_type: None,
    };
    let mut out = Vec::new();
    for (id, text) in lines {
        template.write_line(id, text, &mut out);
    }
    let path = dir.join("input.jsonl");
    fs_err::write(&path, out).unwrap();
    path
}

#[test]
fn voyage_times_parse_in_both_documented_formats() {
    let at = parse_time(&json!("2025-02-11T19:52:02.536100+00:00")).unwrap();
    assert_eq!(at.timestamp(), 1_739_303_522);
    let old = parse_time(&json!("2025-01-29 13:05:05")).unwrap();
    assert_eq!(old.to_rfc3339(), "2025-01-29T13:05:05+00:00");
    assert_eq!(parse_time(&json!("yesterday")), None);
}

#[test]
fn request_params_carry_the_model_type_and_size() {
    assert_eq!(
        params(Some(512)).request_params(),
        json!({"model": "voyage-3.5", "output_dtype": "float", "input_type": "document", "output_dimension": 512})
    );
    let none = BatchParams {
        input_type: InputType::None,
        ..params(None)
    };
    assert_eq!(
        none.request_params(),
        json!({"model": "voyage-3.5", "output_dtype": "float"})
    );
}

#[test]
fn an_undocumented_ending_with_files_is_ingested_as_completed() {
    let batch = json!({"id": "batch-1", "status": "partially_completed", "output_file_id": "file-o", "created_at": "2025-01-29 13:05:05"});
    assert_eq!(snapshot(&batch).status.as_str(), "completed");
    let running =
        json!({"id": "batch-1", "status": "queued_somewhere", "created_at": "2025-01-29 13:05:05"});
    assert_eq!(snapshot(&running).status.as_str(), "queued_somewhere");
}

#[tokio::test]
async fn a_batch_goes_through_the_emulator_and_is_adopted_by_metadata() {
    let emu = voyage_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &[("a", "first text"), ("b", "second text")]);
    let file = provider
        .upload(
            &input,
            "run-1_batch_001.jsonl",
            Duration::from_secs(7200),
            Arc::new(|_| {}),
        )
        .await
        .unwrap();
    assert_eq!(file.filename, "run-1_batch_001.jsonl");
    // Voyage's files live 30 days, whatever was asked.
    let life = file.expires_at.unwrap() - file.created_at;
    assert_eq!(life.num_days(), 30);
    let found = BatchProvider::find_files_named(&provider, "run-1_batch_001.jsonl")
        .await
        .unwrap();
    assert_eq!(found, vec![file.clone()]);

    let metadata: BTreeMap<String, String> =
        [("embatch_run_id".to_owned(), "run-1".to_owned())].into();
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
    let other: BTreeMap<String, String> =
        [("embatch_run_id".to_owned(), "run-2".to_owned())].into();
    assert!(
        provider
            .find_batches(not_before, &other)
            .await
            .unwrap()
            .is_empty()
    );

    let batch = provider.get_batch(&adopted[0].id).await.unwrap();
    assert_eq!(batch.snapshot.status.as_str(), "completed");
    assert!(
        batch.record.contains("\"request_params\""),
        "{}",
        batch.record
    );
    assert!(batch.snapshot.expires_at.is_some());
    let output = batch.snapshot.output_file_id.clone().unwrap();
    let dest = dir.path().join("output.jsonl");
    provider
        .download_file(&output, &dest, Arc::new(|_| {}))
        .await
        .unwrap();
    let text = fs_err::read_to_string(&dest).unwrap();
    let mut ids = Vec::new();
    for line in text.lines() {
        match crate::output::parse_line(line, 512) {
            crate::output::LineOutcome::Vector { custom_id, vector } => {
                let want = if custom_id == "a" {
                    "first text"
                } else {
                    "second text"
                };
                assert_eq!(vector, crate::emulator::vectors::embedding(want, 512));
                ids.push(custom_id);
            }
            other => panic!("{other:?}"),
        }
        assert!(line.contains("\"batch_id\""), "{line}");
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
    assert!(provider.clock_reading().is_some());
}

#[tokio::test]
async fn errors_name_voyages_variables_and_read_its_detail() {
    let emu = voyage_emulator().await;
    let wrong = provider_for(&emu, "pa-wrong");
    let err = wrong.read_clock().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the API rejected the key (HTTP 401): check VOYAGE_API_KEY (or --api-key)"
    );
    let provider = provider_for(&emu, emu.api_key());
    let err = provider
        .create_batch("file-nope", &BTreeMap::new())
        .await
        .unwrap_err();
    match err {
        ApiError::BadRequest {
            status: 400,
            message,
        } => {
            assert!(message.contains("file-nope"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let vectors = provider
        .embed(
            "voyage-3.5",
            &["one".to_owned(), "two".to_owned()],
            Some(256),
        )
        .await
        .unwrap();
    assert_eq!(vectors[1], crate::emulator::vectors::embedding("two", 256));
}

#[tokio::test]
async fn a_429_on_creation_is_the_queue_limit() {
    let emu = voyage_emulator().await;
    let provider = provider_for(&emu, emu.api_key());
    emu.set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let err = provider
        .create_batch("file-x", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::QueueLimit { .. }), "{err:?}");
}

#[tokio::test]
async fn the_realtime_client_speaks_voyage() {
    let emu = voyage_emulator().await;
    let client = ApiClient::new(ClientOptions {
        base_url: emu.base_url(),
        api_key: emu.api_key().to_owned(),
        provider: Provider::Voyage,
        ..ClientOptions::default()
    })
    .unwrap();
    let vectors = client
        .embed("voyage-3.5", &["a text".to_owned()], Some(256))
        .await
        .unwrap();
    assert_eq!(
        vectors,
        [crate::emulator::vectors::embedding("a text", 256)]
    );
}
