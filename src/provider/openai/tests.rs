use super::*;

const KEY: &str = "sk-test-SECRET-123";

fn options(base_url: &str) -> ClientOptions {
    ClientOptions {
        max_retries: 3,
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..ClientOptions::new(base_url, KEY)
    }
}

fn assert_no_key(error: &ApiError) {
    let shown = format!("{error} | {error:#} | {error:?}");
    assert!(!shown.contains(KEY), "key leaked: {shown}");
    assert!(!shown.contains("SECRET"), "key leaked: {shown}");
}

// -- classification ----------------------------------------------------------------------

fn body(message: &str, kind: &str, code: Option<&str>) -> String {
    serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        .to_string()
}

#[test]
fn auth_failures_stop() {
    for status in [401, 403] {
        let e = classify_status(
            status,
            None,
            &body(
                "Incorrect API key",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
        );
        assert!(
            matches!(e, ApiError::Auth { status: s, .. } if s == status),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("OPENAI_API_KEY"));
        assert!(e.to_string().contains(&format!("HTTP {status}")));
    }
}

#[test]
fn insufficient_quota_is_not_a_rate_limit() {
    let e = classify_status(
        429,
        Some(Duration::from_secs(1)),
        &body(
            "You exceeded your current quota",
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
    );
    assert!(matches!(e, ApiError::Quota { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("billing"));
    // Recognised by its type alone too.
    let e = classify_status(429, None, &body("quota", "insufficient_quota", None));
    assert!(matches!(e, ApiError::Quota { .. }), "{e:?}");
}

#[test]
fn queue_limits_are_recognised() {
    let cases = [
        (
            400,
            body(
                "Enqueued token limit reached for text-embedding-3-small in organization org-x. Limit: 3,000,000 enqueued tokens.",
                "invalid_request_error",
                None,
            ),
        ),
        (
            429,
            body(
                "Enqueued request limit reached for text-embedding-3-small",
                "invalid_request_error",
                None,
            ),
        ),
        (
            400,
            body(
                "too many tokens in flight",
                "invalid_request_error",
                Some("token_limit_exceeded"),
            ),
        ),
        (
            429,
            body(
                "enqueued TOKEN limit reached",
                "tokens",
                Some("rate_limit_exceeded"),
            ),
        ),
    ];
    for (status, text) in cases {
        let e = classify_status(status, None, &text);
        assert!(
            matches!(e, ApiError::QueueLimit { .. }),
            "{status} {text}: {e:?}"
        );
        assert!(!e.is_retryable());
    }
    // Only on 400 and 429.
    let e = classify_status(
        500,
        None,
        &body("Enqueued token limit reached", "server_error", None),
    );
    assert!(matches!(e, ApiError::Server { status: 500, .. }), "{e:?}");
}

#[test]
fn rate_limits_keep_retry_after() {
    let e = classify_status(
        429,
        Some(Duration::from_secs(7)),
        &body(
            "Rate limit reached",
            "requests",
            Some("rate_limit_exceeded"),
        ),
    );
    assert!(
        matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7)),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    let e = classify_status(429, None, "");
    assert!(
        matches!(e, ApiError::RateLimited { retry_after: None }),
        "{e:?}"
    );
}

#[test]
fn server_errors_and_others() {
    for status in [500, 502, 503, 504, 408] {
        let e = classify_status(status, None, "<html>bad gateway</html>");
        assert!(
            matches!(e, ApiError::Server { status: s, .. } if s == status),
            "{e:?}"
        );
        assert!(e.is_retryable());
    }
    let e = classify_status(
        404,
        None,
        &body("No such File object: file-x", "invalid_request_error", None),
    );
    assert!(
        matches!(&e, ApiError::NotFound { message } if message.contains("file-x")),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    let e = classify_status(
        400,
        None,
        &body("Invalid 'input_file_id'", "invalid_request_error", None),
    );
    assert!(
        matches!(&e, ApiError::BadRequest { status: 400, message } if message == "Invalid 'input_file_id'"),
        "{e:?}"
    );
    // A body that is not the provider's JSON still gives a message.
    let e = classify_status(409, None, "conflict!");
    assert!(
        matches!(&e, ApiError::BadRequest { status: 409, message } if message == "conflict!"),
        "{e:?}"
    );
    let e = classify_status(422, None, "");
    assert!(
        matches!(&e, ApiError::BadRequest { message, .. } if message.contains("empty body")),
        "{e:?}"
    );
    // Huge bodies are cut.
    let e = classify_status(400, None, &"x".repeat(10_000));
    assert!(e.to_string().chars().count() < 1000);
}

#[test]
fn retryable_and_unknown_outcome_flags() {
    let unknown = ApiError::UnknownOutcome {
        what: "upload of a.jsonl".into(),
        cause: Box::new(ApiError::Server {
            status: 502,
            provider: Provider::Openai,
        }),
    };
    assert!(unknown.is_unknown_outcome());
    assert!(
        !unknown.is_retryable(),
        "a create must never be retried blindly"
    );
    assert!(unknown.to_string().contains("look for it"));
    assert!(
        ApiError::Connection {
            message: "reset".into(),
            provider: Provider::Openai,
        }
        .is_retryable()
    );
    assert!(
        !ApiError::Connection {
            message: "reset".into(),
            provider: Provider::Openai,
        }
        .is_unknown_outcome()
    );
    assert!(
        !ApiError::Decode {
            message: "x".into(),
            provider: Provider::Openai,
        }
        .is_retryable()
    );
    assert!(
        !ApiError::QueueLimit {
            message: "x".into()
        }
        .is_retryable()
    );
}

// -- Retry-After and backoff -------------------------------------------------------------

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

#[test]
fn a_date_header_gives_the_provider_clock_skew() {
    let local = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap();
    let ahead = httpdate::fmt_http_date(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + 31 * 24 * 3600),
    );
    let reading = ClockReading::parse(&ahead, local).unwrap();
    assert_eq!(reading.skew(), chrono::Duration::days(31));
    assert_eq!(reading.date_header, ahead);
    let behind =
        httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_799_999_000));
    assert_eq!(
        ClockReading::parse(&behind, local).unwrap().skew(),
        chrono::Duration::seconds(-1000)
    );
    assert_eq!(ClockReading::parse("yesterday", local), None);
}

#[test]
fn retry_after_forms() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", "12")]), now),
        Some(Duration::from_secs(12))
    );
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", " 0 ")]), now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", "1.5")]), now),
        Some(Duration::from_millis(1500))
    );
    let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", &later)]), now),
        Some(Duration::from_secs(90))
    );
    let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", &earlier)]), now),
        Some(Duration::ZERO)
    );
    assert_eq!(
        parse_retry_after(
            &headers(&[("retry-after-ms", "250"), ("retry-after", "9")]),
            now
        ),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", "soon")]), now),
        None
    );
    assert_eq!(
        parse_retry_after(&headers(&[("retry-after", "-3")]), now),
        None
    );
    assert_eq!(parse_retry_after(&headers(&[]), now), None);
}

#[test]
fn retry_after_beats_backoff_but_is_capped() {
    let max = Duration::from_secs(60);
    let limited = |secs| ApiError::RateLimited {
        retry_after: Some(Duration::from_secs(secs)),
    };
    assert_eq!(
        next_delay(&limited(5), Some(Duration::from_secs(1)), max),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        next_delay(&limited(3600), Some(Duration::from_secs(1)), max),
        Some(max)
    );
    assert_eq!(
        next_delay(
            &ApiError::Server {
                status: 503,
                provider: Provider::Openai,
            },
            Some(Duration::from_secs(2)),
            max
        ),
        Some(Duration::from_secs(2))
    );
    // A zero Retry-After is no hint: the exponential delay applies.
    assert_eq!(
        next_delay(&limited(0), Some(Duration::from_millis(300)), max),
        Some(Duration::from_millis(300))
    );
    // Retries exhausted: no delay, whatever the server asked.
    assert_eq!(next_delay(&limited(5), None, max), None);
}

// -- pure helpers ------------------------------------------------------------------------

#[test]
fn urls_are_built_segment_by_segment() {
    for base in ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"] {
        let client = ApiClient::new(options(base)).unwrap();
        assert_eq!(
            client.url(&["files", "file-1", "content"]).as_str(),
            "http://127.0.0.1:9/v1/files/file-1/content"
        );
        assert_eq!(
            client.url(&["batches", "a/b?c"]).as_str(),
            "http://127.0.0.1:9/v1/batches/a%2Fb%3Fc"
        );
    }
}

#[test]
fn bad_settings_are_refused_without_the_key() {
    for base in [
        "not a url",
        "ftp://x/v1",
        "mailto:x@y",
        "http://u:p@host/v1",
    ] {
        let e = ApiClient::new(options(base)).unwrap_err();
        assert!(matches!(e, ApiError::Config { .. }), "{base}: {e:?}");
        assert_no_key(&e);
    }
    let e = ApiClient::new(ClientOptions::new("http://x/v1", "  ")).unwrap_err();
    assert!(e.to_string().contains("OPENAI_API_KEY"));
    let e = ApiClient::new(ClientOptions::new("http://x/v1", format!("{KEY}\n"))).unwrap_err();
    assert!(e.to_string().contains("OPENAI_API_KEY"));
    assert_no_key(&e);
}

#[test]
fn debug_output_hides_the_key() {
    let opts = ClientOptions {
        organization: Some("org-1".into()),
        ..options("http://127.0.0.1:9/v1")
    };
    let shown = format!("{opts:?}");
    assert!(!shown.contains(KEY) && shown.contains("org-1"), "{shown}");
    let client = ApiClient::new(opts).unwrap();
    let shown = format!("{client:?} {client:#?}");
    assert!(
        !shown.contains(KEY) && shown.contains("redacted"),
        "{shown}"
    );
}

#[test]
fn echoed_keys_are_scrubbed() {
    let client = ApiClient::new(options("http://127.0.0.1:9/v1")).unwrap();
    let e = client.scrub_error(classify_status(
        400,
        None,
        &body(&format!("bad key {KEY} here"), "x", None),
    ));
    assert_no_key(&e);
    assert!(e.to_string().contains("bad key [redacted] here"));
}

#[test]
fn embeddings_come_back_in_input_order() {
    let data = vec![
        Embedding {
            index: 1,
            embedding: vec![1.0],
        },
        Embedding {
            index: 0,
            embedding: vec![0.0],
        },
    ];
    assert_eq!(
        order_embeddings(Provider::Openai, data, 2).unwrap(),
        vec![vec![0.0], vec![1.0]]
    );
    let short = vec![Embedding {
        index: 0,
        embedding: vec![0.0],
    }];
    assert!(matches!(
        order_embeddings(Provider::Openai, short, 2),
        Err(ApiError::Decode { .. })
    ));
    let repeated = vec![
        Embedding {
            index: 0,
            embedding: vec![0.0],
        },
        Embedding {
            index: 0,
            embedding: vec![0.0],
        },
    ];
    assert!(matches!(
        order_embeddings(Provider::Openai, repeated, 2),
        Err(ApiError::Decode { .. })
    ));
}

#[test]
fn batch_parses_the_spec_example_shape() {
    let json = serde_json::json!({
        "id": "batch_abc123", "object": "batch", "endpoint": "/v1/embeddings",
        "errors": {"object": "list", "data": [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "param": null, "line": null}]},
        "input_file_id": "file-abc123", "completion_window": "24h", "status": "failed",
        "output_file_id": null, "error_file_id": null, "created_at": 1711471533,
        "in_progress_at": null, "expires_at": 1711557933, "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": {"embatch_run_id": "r1"}, "usage": {"input_tokens": 0}
    });
    let batch: Batch = serde_json::from_value(json).unwrap();
    assert!(batch.is_terminal());
    assert_eq!(batch.metadata_value("embatch_run_id"), Some("r1"));
    assert_eq!(
        batch.errors.unwrap().data[0].code.as_deref(),
        Some("token_limit_exceeded")
    );
    assert_eq!(batch.output_file_id, None);
}

#[test]
fn temp_files_sit_beside_their_destination() {
    let temp = temp_path_for(Path::new("/a/b/output.jsonl"));
    assert_eq!(temp.parent(), Some(Path::new("/a/b")));
    assert!(
        temp.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".output.jsonl.")
    );
}

// -- wire-level faults, against a tiny raw HTTP server -----------------------------------
//
// The emulator covers the API's behaviour; these cover what only a raw socket can do:
// a connection closed with no answer, or a body shorter than its Content-Length.

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// Serves each connection with `answer(n)` (n counts connections from 0): `None` closes
/// the connection after reading the request; `Some(bytes)` writes them and closes.
async fn raw_server(
    answer: impl Fn(usize) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let served = Arc::clone(&count);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let n = served.fetch_add(1, Ordering::SeqCst);
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                read_request(&mut socket).await;
                if let Some(bytes) = answer(n) {
                    let _ = socket.write_all(&bytes).await;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    (format!("http://{address}/v1"), count)
}

/// Reads one request: headers, then a Content-Length body.
async fn read_request(socket: &mut tokio::net::TcpStream) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            return;
        }
    }
}

fn http_answer(status: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn raw_closed_connection_on_create_is_unknown_outcome() {
    let (base, served) = raw_server(|_| None).await;
    let client = ApiClient::new(options(&base)).unwrap();
    let e = client
        .create_batch("file-1", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(e.is_unknown_outcome(), "{e:?}");
    assert_eq!(served.load(Ordering::SeqCst), 1, "a create is sent once");
    assert_no_key(&e);

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    fs_err::write(&input, b"{}\n").unwrap();
    let e = client
        .upload_file(&input, "x.jsonl", Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(e.is_unknown_outcome(), "{e:?}");
    assert_eq!(served.load(Ordering::SeqCst), 2, "an upload is sent once");
    assert_no_key(&e);
}

#[tokio::test]
async fn raw_refused_connection_on_create_is_a_plain_connection_error() {
    // Bind then drop: nothing listens on that port any more.
    let address = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = ApiClient::new(options(&format!("http://{address}/v1"))).unwrap();
    let e = client
        .create_batch("file-1", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Connection { .. }), "{e:?}");
    assert_no_key(&e);
}

#[tokio::test]
async fn raw_server_error_on_create_is_unknown_and_client_error_is_not() {
    let (base, served) = raw_server(|n| {
        Some(if n == 0 {
            http_answer("502 Bad Gateway", "", "<html>oops</html>")
        } else {
            http_answer(
                "400 Bad Request",
                "content-type: application/json\r\n",
                &body("Invalid file", "invalid_request_error", None),
            )
        })
    })
    .await;
    let client = ApiClient::new(options(&base)).unwrap();
    let e = client
        .create_batch("file-1", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::UnknownOutcome { cause, .. } if matches!(**cause, ApiError::Server { status: 502, .. })),
        "{e:?}"
    );
    let e = client
        .create_batch("file-1", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::BadRequest { status: 400, .. }),
        "{e:?}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn raw_upload_refusal_after_the_body_is_its_own_variant() {
    // Records each request, then answers 429 (a clear refusal) or 503 (ambiguous).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        for status in ["429 Too Many Requests", "503 Service Unavailable"] {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 8192];
            // Read until the multipart closing boundary has arrived.
            while !request.ends_with(b"--\r\n") {
                let n = socket.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the client closed early");
                request.extend_from_slice(&chunk[..n]);
            }
            sender.send(request).unwrap();
            let error = body(
                "Rate limit reached",
                "requests",
                Some("rate_limit_exceeded"),
            );
            socket
                .write_all(&http_answer(status, "", &error))
                .await
                .unwrap();
            let _ = socket.shutdown().await;
        }
    });
    let client = ApiClient::new(options(&base)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    fs_err::write(&input, b"{\"custom_id\":\"a\"}\n").unwrap();

    let e = client
        .upload_file(
            &input,
            "embatch-r-batch_001.jsonl",
            Duration::from_secs(7200),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::RateLimited { .. }), "{e:?}");
    let request = String::from_utf8(received.recv().await.unwrap()).unwrap();
    let lower = request.to_ascii_lowercase();
    assert!(
        lower.starts_with("post /v1/files http/1.1\r\n"),
        "{request}"
    );
    assert!(lower.contains("authorization: bearer sk-test-secret-123\r\n"));
    assert!(lower.contains(&format!(
        "user-agent: embatch/{}\r\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(lower.contains("content-type: multipart/form-data; boundary="));
    assert!(
        lower.contains("content-length: "),
        "a known length, not chunked"
    );
    for part in [
        "name=\"purpose\"\r\n\r\nbatch\r\n",
        "name=\"expires_after[anchor]\"\r\n\r\ncreated_at\r\n",
        "name=\"expires_after[seconds]\"\r\n\r\n7200\r\n",
        "name=\"file\"; filename=\"embatch-r-batch_001.jsonl\"",
        "{\"custom_id\":\"a\"}\n",
    ] {
        assert!(request.contains(part), "missing {part:?} in {request}");
    }

    let e = client
        .upload_file(
            &input,
            "embatch-r-batch_001.jsonl",
            Duration::from_secs(7200),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::UnknownOutcome { cause, .. } if matches!(**cause, ApiError::Server { status: 503, .. })),
        "{e:?}"
    );
    assert_no_key(&e);
}

/// A server that reads each request, writes `prefix`, then holds the connection open
/// without another byte.
async fn stalling_server(prefix: &'static [u8]) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let served = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            served.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                read_request(&mut socket).await;
                let _ = socket.write_all(prefix).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (base, count)
}

fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_millis(300),
        idle: Duration::from_millis(200),
        upload_answer: Duration::from_millis(300),
    }
}

#[tokio::test]
async fn raw_timeouts_end_stalled_calls() {
    // An upload that gets no answer is an unknown outcome, not a hang.
    let (base, served) = stalling_server(b"").await;
    let client = ApiClient::with_timeouts(options(&base), short_timeouts()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.jsonl");
    fs_err::write(&input, b"{}\n").unwrap();
    let e = client
        .upload_file(&input, "a.jsonl", Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ApiError::UnknownOutcome { cause, .. } if cause.to_string().contains("no answer")),
        "{e:?}"
    );
    // A JSON read times out and is retried.
    let e = client.get_batch("batch_x").await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Connection { message, .. } if message.contains("timed out")),
        "{e:?}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 1 + 4);

    // A download whose body stops flowing fails on the idle limit, and is retried.
    let (base, served) =
        stalling_server(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial").await;
    let client = ApiClient::with_timeouts(options(&base), short_timeouts()).unwrap();
    let dest = dir.path().join("output.jsonl");
    let e = client.download_file("file-1", &dest).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Connection { message, .. } if message.contains("stalled")),
        "{e:?}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 4);
    assert!(!dest.exists());
}

#[tokio::test]
async fn raw_short_download_is_retried_then_reported() {
    let (base, served) = raw_server(|_| {
        // Promises 100 bytes, sends 10, closes.
        Some(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n0123456789"
                .to_vec(),
        )
    })
    .await;
    let client = ApiClient::new(options(&base)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("output.jsonl");
    let e = client.download_file("file-1", &dest).await.unwrap_err();
    assert!(matches!(e, ApiError::Connection { .. }), "{e:?}");
    assert_eq!(
        served.load(Ordering::SeqCst),
        4,
        "one try and three retries"
    );
    assert_eq!(client.retry_count(), 3);
    assert!(!dest.exists());
    let leftovers: Vec<_> = fs_err::read_dir(dir.path()).unwrap().collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
}

#[tokio::test]
async fn raw_retry_after_is_honoured_then_success() {
    let (base, served) = raw_server(|n| {
            Some(if n == 0 {
                http_answer("429 Too Many Requests", "retry-after-ms: 30\r\n", &body("Rate limit reached", "requests", Some("rate_limit_exceeded")))
            } else {
                http_answer("200 OK", "content-type: application/json\r\n", r#"{"id":"file-1","object":"file","bytes":3,"created_at":1,"filename":"a.jsonl","purpose":"batch","status":"processed"}"#)
            })
        })
        .await;
    let client = ApiClient::new(options(&base)).unwrap();
    let file = client.get_file("file-1").await.unwrap();
    assert_eq!(file.filename, "a.jsonl");
    assert_eq!(served.load(Ordering::SeqCst), 2);
    assert_eq!(client.retry_count(), 1);
}

// -- against the project's emulator --------------------------------------------------

use crate::emulator::{Emulator, EmulatorConfig, Faults, LostAnswer};

/// An emulator configuration whose key is the secret under test, so any leak would show.
fn keyed() -> EmulatorConfig {
    EmulatorConfig {
        api_key: KEY.to_owned(),
        ..EmulatorConfig::default()
    }
}

/// The setup every emulator test starts from: an emulator, a client of it holding the secret
/// under test (3 quick retries unless the test says otherwise), and a temp folder for input
/// files.
struct Fixture {
    emu: Emulator,
    client: ApiClient,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// The emulator expects the client's key.
    async fn new() -> Self {
        Self::with(keyed(), |options| options).await
    }

    /// An emulator of `config` and a client of `client(options)`.
    async fn with(
        config: EmulatorConfig,
        client: impl FnOnce(ClientOptions) -> ClientOptions,
    ) -> Self {
        let emu = Emulator::start(config).await.unwrap();
        let client = ApiClient::new(client(options(&emu.base_url()))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        Self { emu, client, dir }
    }

    /// A batch input file of `n` requests in the fixture's folder, and its bytes.
    fn input(&self, n: usize) -> (PathBuf, Vec<u8>) {
        write_input(self.dir.path(), n)
    }

    /// `n` requests uploaded as `in.jsonl`.
    async fn upload(&self, n: usize) -> FileObject {
        let (path, _) = self.input(n);
        self.client
            .upload_file(&path, "in.jsonl", WEEK)
            .await
            .unwrap()
    }
}

/// A small valid batch input file of `n` embedding requests.
fn write_input(dir: &Path, n: usize) -> (PathBuf, Vec<u8>) {
    let mut content = Vec::new();
    for i in 0..n {
        let line = serde_json::json!({
            "custom_id": format!("chunk-{i}"), "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": format!("pump {i} seal"), "dimensions": 8}
        });
        content.extend_from_slice(line.to_string().as_bytes());
        content.push(b'\n');
    }
    let path = dir.join("input.jsonl");
    fs_err::write(&path, &content).unwrap();
    (path, content)
}

fn metadata(run: &str, batch: &str, submission: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("embatch_run_id".to_owned(), run.to_owned()),
        ("embatch_batch".to_owned(), batch.to_owned()),
        ("embatch_submission".to_owned(), submission.to_string()),
    ])
}

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

#[tokio::test]
async fn emu_upload_sends_name_bytes_and_expiry() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, dir } = &fx;
    let (path, content) = fx.input(3);
    let name = "embatch-run1-batch_001.jsonl";

    let file = client.upload_file(&path, name, WEEK).await.unwrap();
    assert_eq!(file.filename, name);
    assert_eq!(file.bytes, content.len() as u64);
    assert_eq!(file.purpose, "batch");
    assert_eq!(
        file.expires_at,
        Some(file.created_at + WEEK.as_secs() as i64)
    );

    let remote = emu.files();
    assert_eq!(remote.len(), 1);
    assert_eq!(remote[0]["id"], file.id.as_str());
    assert_eq!(remote[0]["filename"], name);
    assert_eq!(remote[0]["bytes"], content.len());
    assert_eq!(
        remote[0]["expires_at"],
        file.created_at + WEEK.as_secs() as i64
    );
    assert_eq!(emu.counters().uploads, 1);

    assert_eq!(client.get_file(&file.id).await.unwrap(), file);
    assert_eq!(
        client.find_files_named(name).await.unwrap(),
        vec![file.clone()]
    );
    assert!(
        client
            .find_files_named("other.jsonl")
            .await
            .unwrap()
            .is_empty()
    );
    // The bytes that arrived are the bytes on disk.
    let dest = dir.path().join("back.jsonl");
    assert_eq!(
        client.download_file(&file.id, &dest).await.unwrap(),
        content.len() as u64
    );
    assert_eq!(fs_err::read(&dest).unwrap(), content);

    // An expiry outside the API's range is refused before anything is sent.
    let e = client
        .upload_file(&path, name, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Config { .. }), "{e:?}");
    assert_eq!(emu.counters().uploads, 1);
}

#[tokio::test]
async fn emu_batches_create_get_list_paginate_find() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, .. } = &fx;
    let file = fx.upload(2).await;
    let started = Utc::now() - chrono::Duration::hours(1);

    let mut created = Vec::new();
    for i in 1..=5 {
        let batch = client
            .create_batch(&file.id, &metadata("run1", &format!("batch_{i:03}"), 1))
            .await
            .unwrap();
        assert_eq!(batch.input_file_id, file.id);
        assert_eq!(
            batch.metadata_value("embatch_batch"),
            Some(format!("batch_{i:03}").as_str())
        );
        created.push(batch);
    }
    assert_eq!(emu.counters().batch_creations, 5);
    assert_eq!(
        emu.counters().creations_by_metadata.get("run1/batch_003/1"),
        Some(&1)
    );
    let remote = emu.batches();
    assert_eq!(remote[0]["endpoint"], "/v1/embeddings");
    assert_eq!(remote[0]["completion_window"], "24h");

    let got = client.get_batch(&created[2].id).await.unwrap();
    assert_eq!(got.id, created[2].id);
    assert_eq!(got.metadata, created[2].metadata);

    // Pages of two, newest first, cover all five exactly once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = client.list_batches(after.as_deref(), 2).await.unwrap();
        assert!(page.data.len() <= 2);
        seen.extend(page.data.iter().map(|b| b.id.clone()));
        if !page.has_more {
            break;
        }
        after = page.last_id.clone();
    }
    let mut newest_first: Vec<String> = created.iter().map(|b| b.id.clone()).collect();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let found = client
        .find_batches(started, |b| {
            b.metadata_value("embatch_batch") == Some("batch_003")
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, created[2].id);
    let all = client.find_batches(started, |_| true).await.unwrap();
    assert_eq!(all.len(), 5);
    // Batches created before `not_before` are not looked at.
    let future = Utc::now() + chrono::Duration::hours(1);
    assert!(
        client
            .find_batches(future, |_| true)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn emu_download_equals_remote_content() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, dir } = &fx;
    let file = fx.upload(20).await;
    let batch = client
        .create_batch(&file.id, &metadata("r", "batch_001", 1))
        .await
        .unwrap();
    // With the default stage duration of zero a batch is done at its first read.
    let batch = client.get_batch(&batch.id).await.unwrap();
    assert_eq!(batch.status, "completed", "{batch:?}");
    assert_eq!(
        batch.request_counts,
        Some(RequestCounts {
            total: 20,
            completed: 20,
            failed: 0
        })
    );
    let output_id = batch.output_file_id.clone().unwrap();

    let dest = dir.path().join("output.jsonl");
    // An old, longer file in the way is replaced whole.
    fs_err::write(&dest, vec![b'x'; 100_000]).unwrap();
    let n = client.download_file(&output_id, &dest).await.unwrap();
    let on_disk = fs_err::read(&dest).unwrap();
    assert_eq!(n, on_disk.len() as u64);
    assert_eq!(client.get_file(&output_id).await.unwrap().bytes, n);
    // The remote content, fetched independently.
    let remote = reqwest::Client::new()
        .get(format!("{}/files/{output_id}/content", emu.base_url()))
        .bearer_auth(emu.api_key())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(on_disk, remote.to_vec());
    assert_eq!(
        on_disk
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        20
    );
    let names: Vec<String> = fs_err::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".part")),
        "temp file left: {names:?}"
    );
}

#[tokio::test]
async fn emu_delete_twice_is_fine() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, dir } = &fx;
    let file = fx.upload(1).await;
    client.delete_file(&file.id).await.unwrap();
    client.delete_file(&file.id).await.unwrap();
    assert!(emu.files().is_empty());
    assert_eq!(emu.counters().file_deletions, 1);
    let e = client.get_file(&file.id).await.unwrap_err();
    assert!(matches!(e, ApiError::NotFound { .. }), "{e:?}");
    assert_no_key(&e);
    let e = client
        .download_file(&file.id, &dir.path().join("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::NotFound { .. }), "{e:?}");
    assert_eq!(client.retry_count(), 0, "a 404 is not retried");
}

#[tokio::test]
async fn emu_wrong_key_is_auth_and_never_retried() {
    // The client holds the secret; the emulator expects another key.
    let fx = Fixture::with(EmulatorConfig::default(), |options| options).await;
    let Fixture { client, dir, .. } = &fx;
    let (path, _) = fx.input(1);
    let errors = [
        client.get_batch("batch_x").await.unwrap_err(),
        client.list_files(None, None, 10).await.unwrap_err(),
        client
            .create_batch("file-x", &BTreeMap::new())
            .await
            .unwrap_err(),
        client
            .download_file("file-x", &dir.path().join("o"))
            .await
            .unwrap_err(),
        client
            .embed("text-embedding-3-small", &["a".to_owned()], None)
            .await
            .unwrap_err(),
    ];
    for e in &errors {
        assert!(matches!(e, ApiError::Auth { status: 401, .. }), "{e:?}");
        assert!(!e.is_retryable() && !e.is_unknown_outcome());
        assert!(e.to_string().contains("OPENAI_API_KEY"));
        assert_no_key(e);
    }
    let e = client
        .upload_file(&path, "in.jsonl", WEEK)
        .await
        .unwrap_err();
    assert_upload_refused(&e, |e| matches!(e, ApiError::Auth { status: 401, .. }));
    assert_no_key(&e);
    assert_eq!(client.retry_count(), 0);
}

/// The emulator refuses an upload (401, injected 429) before reading its body and closes
/// the connection, so the client may get a broken pipe while still sending instead of the
/// answer. The real API's front reads the whole body first. Either way the upload is sent
/// once and is not retried: the refusal, or an unknown outcome from a broken connection.
fn assert_upload_refused(e: &ApiError, refusal: impl Fn(&ApiError) -> bool) {
    let broken_pipe = matches!(e, ApiError::UnknownOutcome { cause, .. }
            if matches!(**cause, ApiError::Connection { .. }));
    assert!(refusal(e) || broken_pipe, "{e:?}");
}

#[tokio::test]
async fn emu_429_then_success_is_retried() {
    let fx = Fixture::with(keyed(), |options| ClientOptions {
        max_retries: 100,
        ..options
    })
    .await;
    let Fixture { emu, client, .. } = &fx;
    let file = fx.upload(1).await;

    emu.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 0,
        ..Faults::default()
    });
    let task = {
        let client = client.clone();
        let id = file.id.clone();
        tokio::spawn(async move { client.get_file(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    emu.set_faults(Faults::default());
    let got = task.await.unwrap().unwrap();
    assert_eq!(got.id, file.id);
    let injected = emu.counters().injected_errors;
    assert!(injected >= 1, "no 429 was injected");
    assert_eq!(
        client.retry_count() as u64,
        injected,
        "one retry per injected 429"
    );
}

#[tokio::test]
async fn emu_429_and_500_run_out_of_retries() {
    let Fixture { emu, client, .. } = &Fixture::new().await; // 3 retries
    emu.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 0,
        ..Faults::default()
    });
    let e = client.list_batches(None, 10).await.unwrap_err();
    assert!(
        matches!(e, ApiError::RateLimited { retry_after: Some(d) } if d.is_zero()),
        "{e:?}"
    );
    assert_eq!(emu.counters().injected_errors, 4);
    assert_no_key(&e);

    emu.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let e = client.get_batch("batch_x").await.unwrap_err();
    assert!(matches!(e, ApiError::Server { status: 500, .. }), "{e:?}");
    assert_eq!(emu.counters().injected_errors, 8);
    let e = client
        .embed("text-embedding-3-small", &["a".to_owned()], None)
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Server { status: 500, .. }), "{e:?}");
    assert_eq!(emu.counters().injected_errors, 12);
    assert_no_key(&e);
}

#[tokio::test]
async fn emu_500_on_a_read_is_retried_to_success() {
    let Fixture { emu, client, .. } =
        &Fixture::with(EmulatorConfig { seed: 7, ..keyed() }, |options| {
            ClientOptions {
                max_retries: 30,
                ..options
            }
        })
        .await;
    emu.set_faults(Faults {
        rate_500: 0.5,
        ..Faults::default()
    });
    for _ in 0..10 {
        client.list_files(Some("batch"), None, 10).await.unwrap();
    }
    let injected = emu.counters().injected_errors;
    assert!(
        injected >= 1,
        "a seeded 50% rate over 10+ calls injected nothing"
    );
    assert_eq!(client.retry_count() as u64, injected);
}

#[tokio::test]
async fn emu_creates_are_sent_once() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, .. } = &fx;
    let (path, _) = fx.input(1);

    // A clear refusal is its own variant; a 500 may have acted, so it is unknown.
    emu.set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let e = client
        .create_batch("file-x", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::RateLimited { .. }), "{e:?}");
    let e = client
        .upload_file(&path, "in.jsonl", WEEK)
        .await
        .unwrap_err();
    assert_upload_refused(&e, |e| matches!(e, ApiError::RateLimited { .. }));
    emu.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let e = client
        .create_batch("file-x", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(e.is_unknown_outcome(), "{e:?}");
    assert_no_key(&e);
    let e = client
        .upload_file(&path, "in.jsonl", WEEK)
        .await
        .unwrap_err();
    assert!(e.is_unknown_outcome(), "{e:?}");
    assert_no_key(&e);
    assert_eq!(
        emu.counters().injected_errors,
        4,
        "each create call sent exactly once"
    );
    assert_eq!(client.retry_count(), 0);
}

#[tokio::test]
async fn emu_lost_upload_answer_is_unknown_and_the_file_can_be_adopted() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, .. } = &fx;
    let (path, content) = fx.input(4);
    let name = "embatch-run1-batch_001.jsonl";
    emu.set_faults(Faults {
        lose_answers: vec![LostAnswer::Upload],
        ..Faults::default()
    });

    let e = client.upload_file(&path, name, WEEK).await.unwrap_err();
    assert!(e.is_unknown_outcome() && !e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains(name), "{e}");
    assert_no_key(&e);
    let counters = emu.counters();
    assert_eq!((counters.uploads, counters.lost_answers), (1, 1));

    let found = client.find_files_named(name).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].bytes, content.len() as u64);
    assert_eq!(emu.counters().uploads, 1, "looking does not upload");
}

#[tokio::test]
async fn emu_lost_create_answer_is_unknown_and_the_batch_can_be_adopted() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, .. } = &fx;
    let file = fx.upload(2).await;
    let started = Utc::now() - chrono::Duration::hours(1);
    client
        .create_batch(&file.id, &metadata("run1", "batch_001", 1))
        .await
        .unwrap();
    emu.set_faults(Faults {
        lose_answers: vec![LostAnswer::CreateBatch],
        ..Faults::default()
    });

    let wanted = metadata("run1", "batch_002", 1);
    let e = client.create_batch(&file.id, &wanted).await.unwrap_err();
    assert!(e.is_unknown_outcome() && !e.is_retryable(), "{e:?}");
    assert_no_key(&e);
    assert_eq!(emu.counters().batch_creations, 2);
    assert_eq!(emu.counters().lost_answers, 1);

    let found = client
        .find_batches(started, |b| b.metadata.as_ref() == Some(&wanted))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].input_file_id, file.id);
    assert_eq!(emu.counters().batch_creations, 2, "looking does not create");
}

#[tokio::test]
async fn emu_cancel_is_retried_and_repeatable() {
    let fx = Fixture::with(
        EmulatorConfig {
            stage_duration: Duration::from_secs(60),
            ..keyed()
        },
        |options| options,
    )
    .await;
    let Fixture { emu, client, .. } = &fx;
    let file = fx.upload(2).await;
    let batch = client
        .create_batch(&file.id, &BTreeMap::new())
        .await
        .unwrap();
    assert!(!batch.is_terminal());
    emu.set_faults(Faults {
        lose_answers: vec![LostAnswer::Cancel],
        ..Faults::default()
    });
    let cancelled = client.cancel_batch(&batch.id).await.unwrap();
    assert!(
        matches!(cancelled.status.as_str(), "cancelling" | "cancelled"),
        "{cancelled:?}"
    );
    assert_eq!(emu.counters().lost_answers, 1);
    assert!(
        client.retry_count() >= 1,
        "the lost cancel answer was retried"
    );
}

#[tokio::test]
async fn emu_token_limit_failure_is_reported_on_the_batch() {
    let fx = Fixture::new().await;
    let Fixture { emu, client, .. } = &fx;
    let file = fx.upload(2).await;
    emu.set_faults(Faults {
        token_limit_failures: 1,
        ..Faults::default()
    });
    let batch = client
        .create_batch(&file.id, &BTreeMap::new())
        .await
        .unwrap();
    let batch = client.get_batch(&batch.id).await.unwrap();
    assert_eq!(batch.status, "failed");
    let codes: Vec<_> = batch
        .errors
        .unwrap()
        .data
        .into_iter()
        .filter_map(|e| e.code)
        .collect();
    assert_eq!(codes, ["token_limit_exceeded"]);
}

#[tokio::test]
async fn emu_embed_returns_the_emulator_vectors_in_order() {
    let Fixture { client, .. } = &Fixture::new().await;
    let inputs: Vec<String> = ["pump seal leak", "valve", "motor bearing"]
        .map(String::from)
        .to_vec();
    let vectors = client
        .embed("text-embedding-3-small", &inputs, Some(16))
        .await
        .unwrap();
    assert_eq!(vectors.len(), 3);
    for (text, vector) in inputs.iter().zip(&vectors) {
        assert_eq!(vector, &crate::emulator::vectors::embedding(text, 16));
    }
    let native = client
        .embed("text-embedding-3-small", &inputs[..1], None)
        .await
        .unwrap();
    assert_eq!(native[0].len(), 1536);
    let e = client
        .embed("text-embedding-3-small", &["".to_owned()], None)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ApiError::BadRequest { status: 400, .. }),
        "{e:?}"
    );
    assert_no_key(&e);
}

/// The seam translates a Batch object into the values the state machine keeps, and keeps
/// OpenAI's own object (pretty JSON) for batch.json.
#[test]
fn a_batch_is_translated_at_the_seam() {
    let wire: Batch = serde_json::from_value(serde_json::json!({
        "id": "batch_1", "status": "failed", "input_file_id": "file-in",
        "output_file_id": null, "error_file_id": "file-err",
        "created_at": 1_790_000_000, "expires_at": 1_790_086_400,
        "request_counts": {"total": 3, "completed": 1, "failed": 2},
        "errors": {"data": [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached", "line": null}]},
        "metadata": {"embatch_batch": "batch_001"}
    }))
    .unwrap();
    let remote = seam::remote_batch(&wire).unwrap();
    assert_eq!(remote.id, "batch_1");
    assert_eq!(remote.created_at.timestamp(), 1_790_000_000);
    assert_eq!(remote.metadata["embatch_batch"], "batch_001");
    assert_eq!(
        remote.snapshot.status,
        crate::run::state::RemoteStatus::Failed
    );
    assert_eq!(remote.snapshot.request_counts.failed, 2);
    assert_eq!(remote.snapshot.error_file_id.as_deref(), Some("file-err"));
    assert_eq!(
        remote.snapshot.expires_at.map(|t| t.timestamp()),
        Some(1_790_086_400)
    );
    assert!(remote.snapshot.is_queue_refusal());
    assert_eq!(remote.record, serde_json::to_string_pretty(&wire).unwrap());
}
