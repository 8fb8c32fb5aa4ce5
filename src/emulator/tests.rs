//! The emulator through its HTTP interface, with a real client (reqwest), as embatch and the
//! integration tests will use it. The lifecycle and output rules have their own unit tests in
//! `batches`; these check the wire: routes, shapes against the OpenAPI description, faults.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::vectors::embedding;
use super::{Emulator, EmulatorConfig, Faults, LostAnswer};

struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(emulator: &Emulator) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: emulator.base_url(),
            key: emulator.api_key().to_owned(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    async fn upload_result(
        &self,
        filename: &str,
        content: &str,
    ) -> reqwest::Result<reqwest::Response> {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(content.as_bytes().to_vec())
                    .file_name(filename.to_owned()),
            );
        self.request(reqwest::Method::POST, "/files")
            .multipart(form)
            .send()
            .await
    }

    async fn upload(&self, content: &str) -> Value {
        let response = self.upload_result("input.jsonl", content).await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn create_batch_result(
        &self,
        file_id: &str,
        metadata: Value,
    ) -> reqwest::Result<reqwest::Response> {
        self.request(reqwest::Method::POST, "/batches")
            .json(&json!({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": metadata}))
            .send()
            .await
    }

    async fn create_batch(&self, file_id: &str) -> Value {
        let response = self
            .create_batch_result(file_id, Value::Null)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn wait(&self, batch_id: &str) -> Value {
        for _ in 0..500 {
            let (status, batch) = self.get_json(&format!("/batches/{batch_id}")).await;
            assert_eq!(status, 200);
            if ["completed", "failed", "expired", "cancelled"]
                .contains(&batch["status"].as_str().unwrap())
            {
                return batch;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("batch {batch_id} never finished");
    }

    async fn content(&self, file_id: &Value) -> Vec<Value> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/files/{}/content", file_id.as_str().unwrap()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

fn input_line(custom_id: &str, text: &str, extra: Value) -> String {
    let mut body = json!({"model": "text-embedding-3-small", "input": text});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let line =
        json!({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body});
    format!("{line}\n")
}

fn texts() -> Vec<(String, String)> {
    (0..6)
        .map(|i| {
            (
                format!("chunk-{i}"),
                format!("pump {i} seal leaks oil, part {}", i * 7),
            )
        })
        .collect()
}

fn input_file(extra: Value) -> String {
    texts()
        .iter()
        .map(|(id, text)| input_line(id, text, extra.clone()))
        .collect()
}

fn decode_vector(value: &Value) -> Vec<f32> {
    match value {
        Value::String(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        // serde_json parses a number into f64; the printed f32 reads back to the same f32.
        Value::Array(items) => items.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
        other => panic!("not a vector: {other}"),
    }
}

async fn start() -> (Emulator, Api) {
    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let api = Api::new(&emulator);
    (emulator, api)
}

#[tokio::test]
async fn batch_round_trip_gives_the_deterministic_vectors_in_float_and_base64() {
    let (emulator, api) = start().await;
    for (extra, dims) in [
        (json!({}), 1536),
        (json!({"dimensions": 64}), 64),
        (json!({"dimensions": 32, "encoding_format": "base64"}), 32),
    ] {
        let file = api.upload(&input_file(extra)).await;
        assert_eq!(file["purpose"], "batch");
        let created = api.create_batch(file["id"].as_str().unwrap()).await;
        assert_eq!(created["status"], "validating");
        let batch = api.wait(created["id"].as_str().unwrap()).await;
        assert_eq!(batch["status"], "completed", "{batch}");
        assert_eq!(
            batch["request_counts"],
            json!({"total": 6, "completed": 6, "failed": 0})
        );
        assert_eq!(batch["error_file_id"], Value::Null);
        assert_eq!(batch["model"], "text-embedding-3-small");
        assert!(batch["usage"]["input_tokens"].as_u64().unwrap() > 0);

        let lines = api.content(&batch["output_file_id"]).await;
        assert_eq!(lines.len(), 6);
        let mut seen = BTreeMap::new();
        for line in &lines {
            assert_eq!(line["error"], Value::Null);
            assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
            let response = &line["response"];
            assert_eq!(response["status_code"], 200);
            assert_eq!(response["body"]["object"], "list");
            assert_eq!(response["body"]["data"][0]["object"], "embedding");
            assert_eq!(response["body"]["data"][0]["index"], 0);
            *seen
                .entry(line["custom_id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
            let (_, text) = texts()
                .into_iter()
                .find(|(id, _)| id == &line["custom_id"])
                .unwrap();
            let vector = decode_vector(&response["body"]["data"][0]["embedding"]);
            assert_eq!(vector.len(), dims);
            let expected = embedding(&text, dims);
            assert!(
                vector
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "vector of {text:?} differs"
            );
            assert_eq!(
                response["body"]["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
                crate::plan::tokens::count_tokens(&text)
            );
        }
        assert_eq!(seen.len(), 6);
        assert!(seen.values().all(|n| *n == 1));
        let order: Vec<&str> = lines
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_ne!(order, sorted, "output lines are not shuffled");
    }
    let counters = emulator.counters();
    assert_eq!(
        (
            counters.uploads,
            counters.batch_creations,
            counters.downloads
        ),
        (3, 3, 3)
    );
    assert_eq!(counters.creations_by_metadata.get("-/-/-"), Some(&3));
    // 3 inputs + 3 outputs.
    assert_eq!(emulator.files().len(), 6);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_same_seed_gives_the_same_output_file() {
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let (emulator, api) = start().await;
        let file = api.upload(&input_file(json!({"dimensions": 8}))).await;
        let batch = api.create_batch(file["id"].as_str().unwrap()).await;
        let batch = api.wait(batch["id"].as_str().unwrap()).await;
        outputs.push(api.content(&batch["output_file_id"]).await);
        emulator.shutdown().await;
    }
    assert_eq!(outputs[0], outputs[1]);
}

#[tokio::test]
async fn batches_list_newest_first_and_paginate() {
    let (emulator, api) = start().await;
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            api.create_batch(file["id"].as_str().unwrap()).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (status, page1) = api.get_json("/batches?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page1["object"], "list");
    let page1_ids: Vec<&str> = page1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(page1_ids, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page1["has_more"], true);
    assert_eq!(page1["first_id"], ids[2].as_str());
    assert_eq!(page1["last_id"], ids[1].as_str());
    // Listing reads the batches, so they advance like a GET.
    assert_eq!(page1["data"][0]["status"], "completed");

    let (_, page2) = api
        .get_json(&format!("/batches?limit=2&after={}", ids[1]))
        .await;
    let page2_ids: Vec<&str> = page2["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(page2_ids, [ids[0].as_str()]);
    assert_eq!(page2["has_more"], false);

    let (_, all) = api.get_json("/batches").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);
    let (status, bad) = api.get_json("/batches?limit=zero").await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["type"], "invalid_request_error");
    emulator.shutdown().await;
}

#[tokio::test]
async fn files_list_filter_order_paginate_and_delete() {
    let (emulator, api) = start().await;
    let a = api.upload(&input_file(json!({}))).await;
    let b = api.upload(&input_file(json!({}))).await;
    let (_, desc) = api.get_json("/files?purpose=batch").await;
    assert_eq!(desc["data"][0]["id"], b["id"]);
    assert_eq!(desc["first_id"], b["id"]);
    assert_eq!(desc["last_id"], a["id"]);
    assert_eq!(desc["has_more"], false);
    let (_, asc) = api
        .get_json(&format!(
            "/files?order=asc&limit=1&after={}",
            a["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(asc["data"].as_array().unwrap().len(), 1);
    assert_eq!(asc["data"][0]["id"], b["id"]);
    let (_, none) = api.get_json("/files?purpose=batch_output").await;
    assert_eq!(none["data"], json!([]));

    let (status, file) = api
        .get_json(&format!("/files/{}", a["id"].as_str().unwrap()))
        .await;
    assert_eq!((status, &file), (200, &a));
    let response = api
        .request(
            reqwest::Method::DELETE,
            &format!("/files/{}", a["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": a["id"], "object": "file", "deleted": true})
    );
    let (status, error) = api
        .get_json(&format!("/files/{}", a["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 404);
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let response = api
        .request(
            reqwest::Method::DELETE,
            &format!("/files/{}", a["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(emulator.counters().file_deletions, 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn uploads_are_checked_like_the_provider_does() {
    let (emulator, api) = start().await;
    let response = api
        .upload_result("input.json", &input_file(json!({})))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "file");

    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .text("expires_after[anchor]", "created_at")
        .text("expires_after[seconds]", "7200")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("x.jsonl"),
        );
    let file: Value = api
        .request(reqwest::Method::POST, "/files")
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        file["expires_at"].as_i64().unwrap() - file["created_at"].as_i64().unwrap(),
        7200
    );
    assert_eq!(file["bytes"], 3);

    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .text("expires_after[anchor]", "created_at")
        .text("expires_after[seconds]", "60")
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("x.jsonl"),
        );
    let response = api
        .request(reqwest::Method::POST, "/files")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let response = api
        .request(reqwest::Method::POST, "/files")
        .body("not multipart")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(emulator.counters().uploads, 1);
    emulator.shutdown().await;
}

#[tokio::test]
async fn batch_creation_is_checked() {
    let (emulator, api) = start().await;
    let file = api.upload(&input_file(json!({}))).await;
    let file_id = file["id"].as_str().unwrap();
    for body in [
        json!({"input_file_id": "file-nope", "endpoint": "/v1/embeddings", "completion_window": "24h"}),
        json!({"input_file_id": file_id, "endpoint": "/v1/nothing", "completion_window": "24h"}),
        json!({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "48h"}),
        json!({"input_file_id": file_id, "endpoint": "/v1/embeddings"}),
        json!({"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": {"k": 1}}),
        json!([1, 2]),
    ] {
        let response = api
            .request(reqwest::Method::POST, "/batches")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    let response = api
        .request(reqwest::Method::POST, "/batches")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(emulator.counters().batch_creations, 0);

    let (status, error) = api.get_json("/batches/batch_nope").await;
    assert_eq!(status, 404);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batch_nope")
    );
    let (status, _) = api.get_json("/nothing/here").await;
    assert_eq!(status, 404);

    let response = api
        .create_batch_result(file_id, json!({"embatch_run_id": "r1", "embatch_batch": "batch_001", "embatch_submission": "1"}))
        .await
        .unwrap();
    let batch: Value = response.json().await.unwrap();
    assert_eq!(batch["metadata"]["embatch_batch"], "batch_001");
    assert_eq!(
        emulator
            .counters()
            .creations_by_metadata
            .get("r1/batch_001/1"),
        Some(&1)
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_custom_id_fails_the_batch_at_validation() {
    let (emulator, api) = start().await;
    let input = input_line("same", "one", json!({})) + &input_line("same", "two", json!({}));
    let file = api.upload(&input).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch = api.wait(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "failed");
    assert!(batch["failed_at"].is_i64());
    assert_eq!(batch["errors"]["object"], "list");
    assert_eq!(batch["errors"]["data"][0]["code"], "duplicate_custom_id");
    assert_eq!(batch["errors"]["data"][0]["line"], 2);
    assert_eq!(batch["errors"]["data"][0]["param"], Value::Null);
    assert_eq!(batch["output_file_id"], Value::Null);
    emulator.shutdown().await;
}

#[tokio::test]
async fn without_validation_broken_lines_become_400_lines() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        invalid_line_validation: false,
        ..Faults::default()
    });
    let input =
        input_line("good", "one", json!({"dimensions": 4})) + &input_line("empty", "", json!({}));
    let file = api.upload(&input).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch = api.wait(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 2, "completed": 1, "failed": 1})
    );
    let errors = api.content(&batch["error_file_id"]).await;
    assert_eq!(errors[0]["custom_id"], "empty");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    emulator.shutdown().await;
}

#[tokio::test]
async fn injected_429_and_500_come_before_any_side_effect() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 0,
        ..Faults::default()
    });
    let response = api
        .upload_result("input.jsonl", &input_file(json!({})))
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "0");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(emulator.files().is_empty());

    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let response = api
        .upload_result("input.jsonl", &input_file(json!({})))
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(emulator.files().is_empty());
    let counters = emulator.counters();
    assert_eq!((counters.uploads, counters.injected_errors), (0, 2));

    emulator.set_faults(Faults {
        rate_429: 0.5,
        retry_after_secs: 3,
        ..Faults::default()
    });
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let response = api
            .request(reqwest::Method::GET, "/batches")
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "3");
        }
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn failed_requests_go_to_the_error_file() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        fail_custom_ids: vec!["chunk-1".into(), "chunk-4".into()],
        ..Faults::default()
    });
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch = api.wait(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(
        batch["request_counts"],
        json!({"total": 6, "completed": 4, "failed": 2})
    );
    let output = api.content(&batch["output_file_id"]).await;
    assert_eq!(output.len(), 4);
    let errors = api.content(&batch["error_file_id"]).await;
    let mut failed: Vec<&str> = errors
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    failed.sort();
    assert_eq!(failed, ["chunk-1", "chunk-4"]);
    for line in &errors {
        assert_eq!(line["error"], Value::Null);
        assert_eq!(line["response"]["status_code"], 500);
        assert_eq!(line["response"]["body"]["error"]["type"], "server_error");
        assert_eq!(line["response"]["body"]["error"]["code"], Value::Null);
    }

    // Every request failing: only an error file.
    emulator.set_faults(Faults {
        request_failure_rate: 1.0,
        ..Faults::default()
    });
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch = api.wait(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed");
    assert_eq!(batch["output_file_id"], Value::Null);
    assert_eq!(api.content(&batch["error_file_id"]).await.len(), 6);
    emulator.shutdown().await;
}

#[tokio::test]
async fn an_expired_batch_returns_what_was_done() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        expire_after_fraction: Some(0.5),
        ..Faults::default()
    });
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch = api.wait(batch["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "expired");
    assert!(batch["expired_at"].is_i64());
    assert_eq!(
        batch["request_counts"],
        json!({"total": 6, "completed": 3, "failed": 3})
    );
    let output = api.content(&batch["output_file_id"]).await;
    let errors = api.content(&batch["error_file_id"]).await;
    assert_eq!(output.len(), 3);
    assert_eq!(errors.len(), 3);
    for line in &errors {
        assert_eq!(line["response"], Value::Null);
        assert_eq!(line["error"]["code"], "batch_expired");
        assert_eq!(
            line["error"]["message"],
            "This request could not be executed before the completion window expired."
        );
    }
    let mut all: Vec<&str> = output
        .iter()
        .chain(&errors)
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6);
    emulator.shutdown().await;
}

#[tokio::test]
async fn token_limit_failures_fail_the_next_batches_only() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        token_limit_failures: 1,
        ..Faults::default()
    });
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let first = api.create_batch(file["id"].as_str().unwrap()).await;
    let first = api.wait(first["id"].as_str().unwrap()).await;
    assert_eq!(first["status"], "failed");
    assert_eq!(first["errors"]["data"][0]["code"], "token_limit_exceeded");
    assert!(
        first["errors"]["data"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Enqueued token limit reached for text-embedding-3-small")
    );
    let second = api.create_batch(file["id"].as_str().unwrap()).await;
    let second = api.wait(second["id"].as_str().unwrap()).await;
    assert_eq!(second["status"], "completed");
    emulator.shutdown().await;
}

#[tokio::test]
async fn an_input_file_ttl_fault_makes_uploads_expire_early() {
    let (emulator, api) = start().await;
    emulator.update_faults(|f| f.input_file_ttl = Some(Duration::from_secs(1)));
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let created_at = file["created_at"].as_i64().unwrap();
    assert_eq!(file["expires_at"].as_i64(), Some(created_at + 1));
    // Gone once its second has passed: listed no more, and no batch can use it.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(emulator.files().is_empty());
    let refused = api
        .create_batch_result(file["id"].as_str().unwrap(), json!({}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_clock_offset_shows_in_timestamps_and_the_date_header() {
    let (emulator, api) = start().await;
    let month = 31 * 24 * 3600;
    emulator.update_faults(|f| f.clock_offset_secs = -month);
    let response = api
        .upload_result("input.jsonl", &input_file(json!({"dimensions": 4})))
        .await
        .unwrap();
    let date = response.headers()["date"].to_str().unwrap().to_owned();
    let file: Value = response.json().await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let date = chrono::DateTime::<chrono::Utc>::from(httpdate::parse_http_date(&date).unwrap());
    assert!((date.timestamp() - (now - month)).abs() <= 2, "{date}");
    let created_at = file["created_at"].as_i64().unwrap();
    assert!((created_at - (now - month)).abs() <= 2, "{file}");
    // By its own clock the file is fresh: a batch can use it.
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    assert!((batch["created_at"].as_i64().unwrap() - (now - month)).abs() <= 2);

    // A proxy's Date apart from the server's clock, and a mock's fixed expires_at.
    emulator.update_faults(|f| {
        f.date_offset_secs = Some(0);
        f.upload_answer_expires_at = Some(1_680_202_602);
    });
    let response = api
        .upload_result("input.jsonl", &input_file(json!({"dimensions": 4})))
        .await
        .unwrap();
    let date = response.headers()["date"].to_str().unwrap().to_owned();
    let date = chrono::DateTime::<chrono::Utc>::from(httpdate::parse_http_date(&date).unwrap());
    assert!((date.timestamp() - now).abs() <= 2, "{date}");
    let file: Value = response.json().await.unwrap();
    assert_eq!(file["expires_at"], 1_680_202_602);
    emulator.shutdown().await;
}

#[tokio::test]
async fn lost_answers_act_then_drop_the_connection() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        lose_answers: vec![
            LostAnswer::Upload,
            LostAnswer::CreateBatch,
            LostAnswer::Cancel,
        ],
        ..Faults::default()
    });
    let lost = api
        .upload_result("input.jsonl", &input_file(json!({"dimensions": 4})))
        .await;
    assert!(lost.is_err(), "the upload answer came through: {lost:?}");
    let files = emulator.files();
    assert_eq!(files.len(), 1);
    let file_id = files[0]["id"].as_str().unwrap().to_owned();

    let lost = api
        .create_batch_result(&file_id, json!({"embatch_run_id": "r"}))
        .await;
    assert!(lost.is_err());
    let batches = emulator.batches();
    assert_eq!(batches.len(), 1);
    let (_, listed) = api.get_json("/batches").await;
    assert_eq!(listed["data"][0]["metadata"]["embatch_run_id"], "r");

    let batch = api.create_batch(&file_id).await;
    let batch_id = batch["id"].as_str().unwrap();
    let lost = api
        .request(
            reqwest::Method::POST,
            &format!("/batches/{batch_id}/cancel"),
        )
        .send()
        .await;
    assert!(lost.is_err());
    let (_, cancelled) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(cancelled["status"], "cancelled");

    // One-shot: the next calls answer normally.
    api.upload(&input_file(json!({}))).await;
    let counters = emulator.counters();
    assert_eq!(counters.lost_answers, 3);
    assert_eq!(counters.uploads, 2);
    assert_eq!(counters.batch_creations, 2);
    emulator.shutdown().await;
}

#[tokio::test]
async fn cancel_keeps_what_was_done() {
    let (emulator, api) = start().await;
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let file_id = file["id"].as_str().unwrap();

    // Cancelled while validating: nothing done, nothing to fetch.
    let batch = api.create_batch(file_id).await;
    let batch_id = batch["id"].as_str().unwrap();
    let response = api
        .request(
            reqwest::Method::POST,
            &format!("/batches/{batch_id}/cancel"),
        )
        .send()
        .await
        .unwrap();
    let cancelling: Value = response.json().await.unwrap();
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].is_i64());
    let cancelled = api.wait(batch_id).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        (&cancelled["output_file_id"], &cancelled["error_file_id"]),
        (&Value::Null, &Value::Null)
    );

    // Cancelled while in progress: half done (stages take no time here).
    let batch = api.create_batch(file_id).await;
    let batch_id = batch["id"].as_str().unwrap();
    emulator.force_status(batch_id, "in_progress");
    let (_, held) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(held["status"], "in_progress");
    api.request(
        reqwest::Method::POST,
        &format!("/batches/{batch_id}/cancel"),
    )
    .send()
    .await
    .unwrap();
    let cancelled = api.wait(batch_id).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        cancelled["request_counts"],
        json!({"total": 6, "completed": 3, "failed": 0})
    );
    assert_eq!(api.content(&cancelled["output_file_id"]).await.len(), 3);

    // A finished batch cannot be cancelled.
    let response = api
        .request(
            reqwest::Method::POST,
            &format!("/batches/{batch_id}/cancel"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    emulator.shutdown().await;
}

#[tokio::test]
async fn force_status_ends_or_holds_a_batch() {
    let (emulator, api) = start().await;
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let file_id = file["id"].as_str().unwrap();
    let batch = api.create_batch(file_id).await;
    let batch_id = batch["id"].as_str().unwrap();
    emulator.force_status(batch_id, "expired");
    let (_, expired) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(expired["status"], "expired");
    // Still validating when forced: nothing done, every request gets a batch_expired line.
    assert_eq!(api.content(&expired["error_file_id"]).await.len(), 6);
    assert_eq!(emulator.batches()[0]["status"], "expired");

    let batch = api.create_batch(file_id).await;
    let batch_id = batch["id"].as_str().unwrap();
    emulator.force_status(batch_id, "finalizing");
    let (_, held) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(held["status"], "finalizing");
    emulator.force_status(batch_id, "completed");
    let (_, done) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(api.content(&done["output_file_id"]).await.len(), 6);
    emulator.shutdown().await;
}

#[tokio::test]
async fn timed_stages_advance_with_the_clock() {
    let config = EmulatorConfig {
        stage_duration: Duration::from_millis(300),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config).await.unwrap();
    let api = Api::new(&emulator);
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch_id = batch["id"].as_str().unwrap();
    let (_, now) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(now["status"], "validating");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, later) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(later["status"], "in_progress");
    assert_eq!(later["request_counts"]["total"], 6);
    tokio::time::sleep(Duration::from_millis(650)).await;
    let (_, done) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(done["status"], "completed");
    assert!(done["finalizing_at"].is_i64() && done["completed_at"].is_i64());
    emulator.shutdown().await;
}

#[tokio::test]
async fn enqueued_tokens_count_as_the_limit_does_and_by_the_clock() {
    let config = EmulatorConfig {
        stage_duration: Duration::from_millis(300),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config).await.unwrap();
    let api = Api::new(&emulator);
    let input = input_file(json!({"dimensions": 4}));
    let estimate = (input.len() as u64).div_ceil(4);
    // Room for one batch: the second is refused for the limit and counts nowhere.
    emulator.update_faults(|f| f.enqueued_token_limit = Some(estimate));
    let file = api.upload(&input).await;
    let file_id = file["id"].as_str().unwrap();
    let first = api.create_batch(file_id).await;
    let first_id = first["id"].as_str().unwrap();
    api.create_batch(file_id).await;
    let running = super::EnqueuedTokens {
        as_last_read: estimate,
        by_clock: estimate,
        created: estimate,
    };
    assert_eq!(emulator.enqueued_tokens(), running);
    // Its three stages are over, but nobody read it: the limit still counts it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        emulator.enqueued_tokens(),
        super::EnqueuedTokens {
            by_clock: 0,
            ..running
        }
    );
    let (_, done) = api.get_json(&format!("/batches/{first_id}")).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        emulator.enqueued_tokens(),
        super::EnqueuedTokens {
            as_last_read: 0,
            by_clock: 0,
            created: estimate,
        }
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn every_route_needs_the_bearer_token() {
    let (emulator, api) = start().await;
    for auth in [None, Some("sk-wrong")] {
        let mut request = api.http.get(format!("{}/batches", api.base));
        if let Some(key) = auth {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_api_key");
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert_eq!(error["error"]["param"], Value::Null);
    }
    let response = api
        .http
        .post(format!("{}/files", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(emulator.counters(), super::Counters::default());
    emulator.shutdown().await;
}

#[tokio::test]
async fn realtime_embeddings() {
    let (emulator, api) = start().await;
    let response = api
        .request(reqwest::Method::POST, "/embeddings")
        .json(&json!({"model": "text-embedding-3-small", "input": ["pump seal", "filter"], "dimensions": 16, "encoding_format": "base64"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // Not checked against the spec: it types `embedding` as an array even for base64.
    for (index, text) in ["pump seal", "filter"].iter().enumerate() {
        assert_eq!(body["data"][index]["index"], index);
        assert_eq!(
            decode_vector(&body["data"][index]["embedding"]),
            embedding(text, 16)
        );
    }
    let response = api
        .request(reqwest::Method::POST, "/embeddings")
        .json(&json!({"model": "text-embedding-3-large", "input": "x"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    check_against_spec("CreateEmbeddingResponse", &body);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 3072);
    let response = api
        .request(reqwest::Method::POST, "/embeddings")
        .json(&json!({"model": "text-embedding-3-small", "input": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    check_against_spec("ErrorResponse", &error);
    assert_eq!(emulator.counters().embedding_calls, 3);
    emulator.shutdown().await;
}

// ------------------------------------------------------------------ shapes against the spec

/// The OpenAPI description, when it sits beside the repository (as in CI).
fn spec() -> Option<Value> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/openai-openapi.json");
    let text = fs_err::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Required keys when the spec is absent, copied from it.
fn fallback_required(schema: &str) -> &'static [&'static str] {
    match schema {
        "Batch" => &[
            "id",
            "object",
            "endpoint",
            "input_file_id",
            "completion_window",
            "status",
            "created_at",
        ],
        "OpenAIFile" => &[
            "id",
            "object",
            "bytes",
            "created_at",
            "filename",
            "purpose",
            "status",
        ],
        "ListBatchesResponse" => &["object", "data", "has_more"],
        "ListFilesResponse" => &["object", "data", "first_id", "last_id", "has_more"],
        "DeleteFileResponse" => &["id", "object", "deleted"],
        "CreateEmbeddingResponse" => &["object", "model", "data", "usage"],
        "ErrorResponse" => &["error"],
        _ => &[],
    }
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &spec["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Whether `value` fits a (resolved) schema's `type`, enum, and — recursively — its required
/// keys and typed properties. Optional keys may be null: the provider sends them so.
fn check_value(spec: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(variants) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
    {
        let fits = variants.iter().any(|variant| {
            let mut inner = Vec::new();
            check_value(spec, variant, value, at, &mut inner);
            inner.is_empty()
        });
        if !fits {
            problems.push(format!("{at}: {value} fits no variant"));
        }
        return;
    }
    let fits_type = match schema.get("type").and_then(Value::as_str) {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("object") => value.is_object(),
        Some("null") => value.is_null(),
        _ => true,
    };
    if !fits_type {
        problems.push(format!("{at}: {value} is not a {}", schema["type"]));
        return;
    }
    if let (Some(allowed), Some(text)) =
        (schema.get("enum").and_then(Value::as_array), value.as_str())
        && !allowed.iter().any(|a| a == text)
    {
        problems.push(format!("{at}: {text} not in {allowed:?}"));
    }
    if let Some(object) = value.as_object() {
        for key in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = key.as_str().unwrap_or_default();
            match object.get(key) {
                None => problems.push(format!("{at}: required key {key} missing")),
                Some(Value::Null) if !nullable(spec, &schema["properties"][key]) => {
                    problems.push(format!("{at}: required key {key} is null"))
                }
                Some(_) => {}
            }
        }
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (key, property) in properties {
                match object.get(key) {
                    None | Some(Value::Null) => {}
                    Some(inner) => {
                        check_value(spec, property, inner, &format!("{at}.{key}"), problems)
                    }
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (index, item) in array.iter().enumerate() {
            check_value(spec, items, item, &format!("{at}[{index}]"), problems);
        }
    }
}

fn nullable(spec: &Value, schema: &Value) -> bool {
    let schema = resolve(spec, schema);
    schema.get("nullable") == Some(&Value::Bool(true))
        || schema
            .get("anyOf")
            .and_then(Value::as_array)
            .is_some_and(|variants| variants.iter().any(|v| v["type"] == "null"))
}

/// What is wrong with `value` as a `schema_name`: by the spec when there is one, else by the
/// hard-coded required keys.
fn spec_problems(spec: Option<&Value>, schema_name: &str, value: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    match spec {
        Some(spec) => {
            let schema = &spec["components"]["schemas"][schema_name];
            assert!(schema.is_object(), "no schema {schema_name} in the spec");
            check_value(spec, schema, value, schema_name, &mut problems);
        }
        None => {
            for key in fallback_required(schema_name) {
                if value.get(key).is_none_or(Value::is_null) {
                    problems.push(format!("{schema_name}: required key {key} missing"));
                }
            }
        }
    }
    problems
}

fn check_against_spec(schema_name: &str, value: &Value) {
    let problems = spec_problems(spec().as_ref(), schema_name, value);
    assert!(
        problems.is_empty(),
        "{schema_name}: {problems:#?}\n{value:#}"
    );
}

#[tokio::test]
async fn responses_match_the_openapi_description() {
    let (emulator, api) = start().await;
    emulator.set_faults(Faults {
        fail_custom_ids: vec!["chunk-0".into()],
        ..Faults::default()
    });
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    check_against_spec("OpenAIFile", &file);
    let created = api.create_batch(file["id"].as_str().unwrap()).await;
    check_against_spec("Batch", &created);
    let done = api.wait(created["id"].as_str().unwrap()).await;
    check_against_spec("Batch", &done);
    let (_, batches) = api.get_json("/batches").await;
    check_against_spec("ListBatchesResponse", &batches);
    let (_, files) = api.get_json("/files").await;
    check_against_spec("ListFilesResponse", &files);
    let (_, output_file) = api
        .get_json(&format!(
            "/files/{}",
            done["output_file_id"].as_str().unwrap()
        ))
        .await;
    check_against_spec("OpenAIFile", &output_file);
    assert_eq!(output_file["purpose"], "batch_output");
    let output = api.content(&done["output_file_id"]).await;
    check_against_spec("CreateEmbeddingResponse", &output[0]["response"]["body"]);
    let errors = api.content(&done["error_file_id"]).await;
    check_against_spec("ErrorResponse", &errors[0]["response"]["body"]);
    let (_, failed) = api.get_json("/batches/batch_none").await;
    check_against_spec("ErrorResponse", &failed);
    let deleted: Value = api
        .request(
            reqwest::Method::DELETE,
            &format!("/files/{}", file["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check_against_spec("DeleteFileResponse", &deleted);

    // A failed batch carries `errors` in the spec's shape.
    let bad = api
        .upload(&(input_line("x", "a", json!({})) + &input_line("x", "b", json!({}))))
        .await;
    let failed = api.create_batch(bad["id"].as_str().unwrap()).await;
    let failed = api.wait(failed["id"].as_str().unwrap()).await;
    check_against_spec("Batch", &failed);
    emulator.shutdown().await;
}

#[test]
fn the_checker_catches_a_wrong_shape() {
    let wrong = json!({"id": "b", "object": "batch", "status": "done"});
    // With the spec (when it is beside the repository) and with the fallback list.
    for spec in [spec(), None] {
        let problems = spec_problems(spec.as_ref(), "Batch", &wrong);
        assert!(
            problems.iter().any(|p| p.contains("endpoint")),
            "{problems:?}"
        );
        if spec.is_some() {
            assert!(problems.iter().any(|p| p.contains("done")), "{problems:?}");
        }
    }
}

#[tokio::test]
async fn cancel_then_forced_cancelled_keeps_the_cancel_time_progress() {
    let config = EmulatorConfig {
        stage_duration: Duration::from_secs(600),
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start(config).await.unwrap();
    let api = Api::new(&emulator);
    let file = api.upload(&input_file(json!({"dimensions": 4}))).await;
    let batch = api.create_batch(file["id"].as_str().unwrap()).await;
    let batch_id = batch["id"].as_str().unwrap();
    emulator.force_status(batch_id, "in_progress");
    let response = api
        .request(
            reqwest::Method::POST,
            &format!("/batches/{batch_id}/cancel"),
        )
        .send()
        .await
        .unwrap();
    let cancelling: Value = response.json().await.unwrap();
    assert_eq!(cancelling["status"], "cancelling");
    // Still cancelling: the stage lasts ten minutes.
    let (_, still) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(still["status"], "cancelling");
    emulator.force_status(batch_id, "cancelled");
    let (_, cancelled) = api.get_json(&format!("/batches/{batch_id}")).await;
    assert_eq!(cancelled["status"], "cancelled");
    // Cancelled at the very start of a ten-minute in_progress stage: nothing was done.
    assert_eq!(
        cancelled["request_counts"],
        json!({"total": 6, "completed": 0, "failed": 0})
    );
    assert_eq!(cancelled["output_file_id"], Value::Null);
    emulator.shutdown().await;
}
