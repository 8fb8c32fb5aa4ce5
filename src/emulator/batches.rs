//! Batches inside the emulator: the record of one batch, its lifecycle, the validation of its
//! input file and the generation of its output and error files.
//!
//! Everything here is plain functions over values, with the clock passed in: the HTTP routes
//! and the shared state (`super`) decide when to call them and store the files they produce.
//!
//! # Lifecycle
//! `validating → in_progress → finalizing → completed`, each stage lasting `stage_duration`,
//! advanced lazily when the batch is read. Validation runs when the batch is created (so a read
//! never parses a file under the lock) and its verdict is applied when `validating` ends: an
//! invalid file, or a `token_limit_exceeded` fault, turns the batch `failed`. An
//! `expire_after_fraction` fault turns `in_progress` into `expired` instead of `finalizing`.
//!
//! # Cancel
//! A cancelled batch goes `cancelling`, then `cancelled` one stage later. What was done by then
//! is kept: nothing if it was still `validating`; in `in_progress`, the fraction of the stage
//! that had elapsed (half, when stages take no time); everything once `finalizing`. Requests
//! not done get no line at all (unlike an expired batch, whose undone requests get
//! `batch_expired` error lines).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng as _;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use super::embeddings::{self, ErrorBody, RequestError};

/// The provider's cap on requests (lines) per batch file, and on embedding inputs per batch.
pub(crate) const MAX_REQUESTS_PER_BATCH: usize = 50_000;
/// Validation stops collecting errors after this many, as a long list helps nobody.
const MAX_REPORTED_ERRORS: usize = 100;
/// The completion window: the only one the provider offers.
pub(crate) const COMPLETION_WINDOW_SECS: i64 = 24 * 3600;

/// The endpoints a batch may target (the spec's enum for `CreateBatchRequest.endpoint`).
pub(crate) const ENDPOINTS: &[&str] = &[
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Status> {
        Some(match text {
            "validating" => Status::Validating,
            "failed" => Status::Failed,
            "in_progress" => Status::InProgress,
            "finalizing" => Status::Finalizing,
            "completed" => Status::Completed,
            "expired" => Status::Expired,
            "cancelling" => Status::Cancelling,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }
}

/// The faults that apply to one batch, frozen when it is created so a later `set_faults`
/// does not rewrite batches already in flight.
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchFaults {
    pub request_failure_rate: f64,
    pub fail_custom_ids: HashSet<String>,
    pub expire_after_fraction: Option<f64>,
    pub token_limit_exceeded: bool,
}

/// One entry of a batch's `errors.data` (the spec's `BatchError`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

impl BatchError {
    fn at_line(code: &str, message: impl Into<String>, line: Option<u64>) -> BatchError {
        BatchError {
            code: code.to_owned(),
            message: message.into(),
            param: None,
            line,
        }
    }
}

/// The verdict on an input file, taken when the batch is created.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Validation {
    Valid {
        n_requests: usize,
        model: Option<String>,
    },
    Invalid(Vec<BatchError>),
}

/// The non-empty lines of an input file with their 1-based line numbers. A final newline does
/// not make an empty last line; a blank line elsewhere is kept (and refused by validation).
fn input_lines(input: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let input = input.strip_suffix(b"\n").unwrap_or(input);
    let mut lines = input
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, line)| (i as u64 + 1, line.strip_suffix(b"\r").unwrap_or(line)));
    let empty = input.is_empty();
    std::iter::from_fn(move || if empty { None } else { lines.next() })
}

/// Validates an input file as the provider does before running it. With `strict` false only
/// the count of lines is taken (the `invalid_line_validation` fault switched off), and broken
/// lines become 400 lines of the error file instead.
pub(crate) fn validate(input: &[u8], endpoint: &str, strict: bool) -> Validation {
    let mut errors = Vec::new();
    let mut seen_ids = HashSet::new();
    let mut model: Option<String> = None;
    let mut n_requests = 0usize;
    let mut n_inputs = 0usize;
    for (line_no, line) in input_lines(input) {
        n_requests += 1;
        if !strict {
            if model.is_none() {
                model = serde_json::from_slice::<Value>(line)
                    .ok()
                    .and_then(|v| v["body"]["model"].as_str().map(str::to_owned));
            }
            continue;
        }
        if errors.len() >= MAX_REPORTED_ERRORS {
            continue;
        }
        let line_no = Some(line_no);
        let value: Value = match serde_json::from_slice(line) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                errors.push(BatchError::at_line(
                    "invalid_json_line",
                    "This line is not parseable as valid JSON.",
                    line_no,
                ));
                continue;
            }
        };
        match value.get("custom_id") {
            Some(Value::String(id)) => {
                if !seen_ids.insert(id.clone()) {
                    errors.push(BatchError::at_line(
                        "duplicate_custom_id",
                        format!("The custom_id '{id}' is duplicated: custom_id must be unique for each request in a batch."),
                        line_no,
                    ));
                    continue;
                }
            }
            _ => {
                errors.push(BatchError::at_line(
                    "missing_required_parameter",
                    "Missing required parameter: 'custom_id' (a string).",
                    line_no,
                ));
                continue;
            }
        }
        if value.get("method").and_then(Value::as_str) != Some("POST") {
            errors.push(BatchError::at_line(
                "invalid_method",
                "The method of each request must be POST.",
                line_no,
            ));
            continue;
        }
        if value.get("url").and_then(Value::as_str) != Some(endpoint) {
            errors.push(BatchError::at_line(
                "invalid_url",
                format!("The URL provided for this request does not match the batch endpoint {endpoint}."),
                line_no,
            ));
            continue;
        }
        let Some(body) = value.get("body").filter(|b| b.is_object()) else {
            errors.push(BatchError::at_line(
                "invalid_request",
                "The body of each request must be a JSON object.",
                line_no,
            ));
            continue;
        };
        let Some(line_model) = body.get("model").and_then(Value::as_str) else {
            errors.push(BatchError::at_line(
                "missing_required_parameter",
                "Missing required parameter: 'body.model'.",
                line_no,
            ));
            continue;
        };
        match &model {
            None => model = Some(line_model.to_owned()),
            Some(first) if first != line_model => {
                errors.push(BatchError::at_line(
                    "mismatched_model",
                    format!("The model '{line_model}' does not match the model '{first}' of the other requests: a batch uses one model."),
                    line_no,
                ));
                continue;
            }
            Some(_) => {}
        }
        let empty_input = match body.get("input") {
            None | Some(Value::Null) => true,
            Some(Value::String(text)) => text.is_empty(),
            Some(Value::Array(items)) => items.is_empty(),
            Some(_) => false,
        };
        if endpoint == "/v1/embeddings" && empty_input {
            errors.push(BatchError::at_line(
                "invalid_request",
                "The request body must have a non-empty 'input'.",
                line_no,
            ));
            continue;
        }
        n_inputs += embeddings::n_inputs(body);
    }

    if strict && n_requests == 0 {
        errors.push(BatchError::at_line(
            "empty_file",
            "The batch input file is empty.",
            None,
        ));
    }
    if strict && n_requests > MAX_REQUESTS_PER_BATCH {
        errors.push(BatchError::at_line(
            "too_many_requests",
            format!("The batch input file has {n_requests} requests, more than the {MAX_REQUESTS_PER_BATCH} maximum."),
            None,
        ));
    }
    if strict && endpoint == "/v1/embeddings" && n_inputs > MAX_REQUESTS_PER_BATCH {
        errors.push(BatchError::at_line(
            "too_many_embedding_inputs",
            format!("The batch has {n_inputs} embedding inputs, more than the {MAX_REQUESTS_PER_BATCH} maximum."),
            None,
        ));
    }
    if errors.is_empty() {
        Validation::Valid { n_requests, model }
    } else {
        Validation::Invalid(errors)
    }
}

/// The error a batch gets when the organisation's enqueued-token limit is reached.
fn token_limit_error(model: Option<&str>) -> BatchError {
    let model = model.unwrap_or("text-embedding-3-small");
    BatchError::at_line(
        "token_limit_exceeded",
        format!(
            "Enqueued token limit reached for {model} in organization org-emulator. Limit: 3,000,000 enqueued tokens. Please try again once some in_progress batches have been completed."
        ),
        None,
    )
}

/// Everything the emulator knows about one batch.
#[derive(Debug)]
pub(crate) struct BatchRecord {
    pub id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<Map<String, Value>>,
    /// `output_expires_after.seconds`, applied to the output and error files.
    pub output_expires_after: Option<i64>,
    pub created_at: i64,
    pub created_instant: Instant,
    pub status: Status,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub input_tokens: u64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub errors: Option<Vec<BatchError>>,
    pub model: Option<String>,
    /// When the current stage began (in the emulator's virtual time: stage ends are
    /// `stage_started + stage_duration` even when the read that notices comes later).
    pub stage_started: Instant,
    /// Set by `force_status` to a non-terminal status: the batch stays there.
    pub held: bool,
    /// An output generation is running for this batch; other readers see the status as is.
    pub generating: bool,
    /// Requests done when the batch was cancelled (see the module doc).
    pub n_done_at_cancel: usize,
    pub validation: Validation,
    /// The input file's content, kept so deleting the input file mid-run changes nothing.
    pub input: Bytes,
    pub seed: u64,
    pub faults: BatchFaults,
    /// A Voyage batch's `request_params` (the `voyage` translation), shown in its answers.
    pub request_params: Option<Value>,
}

impl BatchRecord {
    /// The Unix time (seconds) of an instant of this batch's life.
    pub(crate) fn unix_at(&self, at: Instant) -> i64 {
        self.created_at + at.saturating_duration_since(self.created_instant).as_secs() as i64
    }

    /// The spec's `Batch` object. Every optional key is present (null when unknown), as the
    /// provider sends them.
    pub(crate) fn to_json(&self) -> Value {
        let mut batch = json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": self.errors.as_ref().map(|data| json!({"object": "list", "data": data})),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.created_at + COMPLETION_WINDOW_SECS,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens,
            },
            "metadata": self.metadata,
        });
        if let Some(params) = &self.request_params {
            batch["request_params"] = params.clone();
        }
        batch
    }

    /// How many requests count as done if the batch stops now (cancel, forced expiry).
    pub(crate) fn n_done_now(&self, now: Instant, stage_duration: Duration) -> usize {
        let total = self.total as usize;
        match self.status {
            Status::Validating => 0,
            // Already stopping: what was done when it was cancelled.
            Status::Cancelling => self.n_done_at_cancel,
            Status::InProgress if stage_duration.is_zero() => total / 2,
            Status::InProgress => {
                let elapsed = now.saturating_duration_since(self.stage_started);
                let fraction = (elapsed.as_secs_f64() / stage_duration.as_secs_f64()).min(1.0);
                (total as f64 * fraction).floor() as usize
            }
            _ => total,
        }
    }

    /// Whether the batch counts against the enqueued-token limit: not refused for it (nor
    /// for an injected token-limit failure).
    pub(crate) fn counts_as_enqueued(&self) -> bool {
        !self.faults.token_limit_exceeded
    }

    /// Whether the clock alone has not ended the batch yet at `now`, whether or not a client
    /// read it since: its remaining stages (each `stage_duration`) reach past `now`, or it is
    /// held by `force_status`. What the provider would still be working on.
    pub(crate) fn running_by_clock(&self, now: Instant, stage_duration: Duration) -> bool {
        if self.status.is_terminal() {
            return false;
        }
        if self.held {
            return true;
        }
        let expires = self.faults.expire_after_fraction.is_some();
        let stages_left: u32 = match self.status {
            // Refused or invalid: it fails when validation ends.
            Status::Validating
                if self.faults.token_limit_exceeded
                    || matches!(self.validation, Validation::Invalid(_)) =>
            {
                1
            }
            Status::Validating if expires => 2,
            Status::Validating => 3,
            Status::InProgress if expires => 1,
            Status::InProgress => 2,
            // Finalizing, cancelling.
            _ => 1,
        };
        now < self.stage_started + stage_duration * stages_left
    }

    fn fail(&mut self, at: i64, errors: Vec<BatchError>) {
        self.status = Status::Failed;
        self.failed_at = Some(at);
        self.errors = Some(errors);
    }

    /// Turns the batch `cancelling` (the caller checked it may be).
    pub(crate) fn cancel(&mut self, now: Instant, stage_duration: Duration) {
        self.n_done_at_cancel = self.n_done_now(now, stage_duration);
        self.status = Status::Cancelling;
        self.cancelling_at = Some(self.unix_at(now));
        self.stage_started = now;
        self.held = false;
    }
}

/// How a batch's run ends, which decides which requests get lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Completed,
    Expired,
    Cancelled,
}

impl Ending {
    pub(crate) fn status(self) -> Status {
        match self {
            Ending::Completed => Status::Completed,
            Ending::Expired => Status::Expired,
            Ending::Cancelled => Status::Cancelled,
        }
    }
}

/// The work of producing a batch's output and error files: everything needed, owned, so it runs
/// without the lock.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub batch_id: String,
    pub endpoint: String,
    pub input: Bytes,
    pub seed: u64,
    pub faults: BatchFaults,
    pub ending: Ending,
    /// Requests (in shuffled order) that get executed; the rest are not done.
    pub n_done: usize,
    /// The status the batch had when the job was made: a result that arrives after the batch
    /// moved on (a `force_status`) is dropped.
    pub from_status: Status,
    /// When the batch ends, in Unix seconds.
    pub ends_at: i64,
}

/// What a [`Job`] produced.
#[derive(Debug, Default)]
pub(crate) struct Generated {
    pub output: Vec<u8>,
    pub errors: Vec<u8>,
    pub n_completed: u64,
    pub n_failed: u64,
    pub input_tokens: u64,
}

/// What a read of a batch has to do next.
#[derive(Debug)]
pub(crate) enum Advance {
    /// Nothing more until time passes (or the batch is terminal or held).
    Settled,
    /// The batch must end now and its output be generated first.
    NeedsOutput(Box<Job>),
}

/// Moves a batch as far as the clock allows without generating output.
pub(crate) fn advance(record: &mut BatchRecord, now: Instant, stage_duration: Duration) -> Advance {
    loop {
        if record.held || record.generating || record.status.is_terminal() {
            return Advance::Settled;
        }
        let due = record.stage_started + stage_duration;
        if now < due {
            // Reads during the run see the requests done so far, as the provider reports them.
            if matches!(record.status, Status::InProgress | Status::Finalizing) {
                record.completed = record.n_done_now(now, stage_duration) as u64;
            }
            return Advance::Settled;
        }
        let due_unix = record.unix_at(due);
        let ending = match record.status {
            Status::Validating => {
                if record.faults.token_limit_exceeded {
                    let error = token_limit_error(record.model.as_deref());
                    record.fail(due_unix, vec![error]);
                    continue;
                }
                match &record.validation {
                    Validation::Invalid(errors) => {
                        let errors = errors.clone();
                        record.fail(due_unix, errors);
                    }
                    Validation::Valid { n_requests, .. } => {
                        record.status = Status::InProgress;
                        record.in_progress_at = Some(due_unix);
                        record.total = *n_requests as u64;
                        record.stage_started = due;
                    }
                }
                continue;
            }
            Status::InProgress => {
                if record.faults.expire_after_fraction.is_some() {
                    Ending::Expired
                } else {
                    record.status = Status::Finalizing;
                    record.finalizing_at = Some(due_unix);
                    record.stage_started = due;
                    continue;
                }
            }
            Status::Finalizing => Ending::Completed,
            Status::Cancelling => Ending::Cancelled,
            // Terminal statuses returned above.
            _ => return Advance::Settled,
        };
        let total = record.total as usize;
        let n_done = match ending {
            Ending::Completed => total,
            Ending::Expired => {
                let fraction = record
                    .faults
                    .expire_after_fraction
                    .unwrap_or(0.0)
                    .clamp(0.0, 1.0);
                (total as f64 * fraction).floor() as usize
            }
            Ending::Cancelled => record.n_done_at_cancel,
        };
        record.generating = true;
        return Advance::NeedsOutput(Box::new(job(record, ending, n_done, due_unix)));
    }
}

/// A job that ends `record` with `ending` at `ends_at`.
pub(crate) fn job(record: &BatchRecord, ending: Ending, n_done: usize, ends_at: i64) -> Job {
    Job {
        batch_id: record.id.clone(),
        endpoint: record.endpoint.clone(),
        input: record.input.clone(),
        seed: record.seed,
        faults: record.faults.clone(),
        ending,
        n_done,
        from_status: record.status,
        ends_at,
    }
}

/// Applies a finished job: the batch reaches its terminal status with these files. Returns
/// false (and changes nothing but the `generating` mark) if the batch moved on meanwhile.
pub(crate) fn finish(
    record: &mut BatchRecord,
    job: &Job,
    generated: &Generated,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
) -> bool {
    record.generating = false;
    if record.status != job.from_status || record.status.is_terminal() {
        return false;
    }
    record.status = job.ending.status();
    match job.ending {
        Ending::Completed => record.completed_at = Some(job.ends_at),
        Ending::Expired => record.expired_at = Some(job.ends_at),
        Ending::Cancelled => record.cancelled_at = Some(job.ends_at),
    }
    if job.ending == Ending::Completed && record.finalizing_at.is_none() {
        record.finalizing_at = Some(job.ends_at);
    }
    record.completed = generated.n_completed;
    record.failed = generated.n_failed;
    record.input_tokens = generated.input_tokens;
    record.output_file_id = output_file_id;
    record.error_file_id = error_file_id;
    true
}

/// One line of an output or error file.
#[derive(Serialize)]
struct OutputLine<'a, B: Serialize> {
    id: String,
    custom_id: &'a str,
    response: Option<LineResponse<B>>,
    error: Option<LineError>,
}

#[derive(Serialize)]
struct LineResponse<B: Serialize> {
    status_code: u16,
    request_id: String,
    body: B,
}

#[derive(Serialize)]
struct LineError {
    code: &'static str,
    message: &'static str,
}

/// A stable hex id for line `index` of batch `batch_id`, so reruns with the same seed produce the
/// same files.
fn line_id(kind: &str, batch_id: &str, index: usize) -> String {
    let digest = Sha256::digest(format!("{kind}:{batch_id}:{index}"));
    hex::encode(&digest[..16])
}

/// The outcome of one executed request.
enum Executed {
    Ok(embeddings::EmbeddingResponse),
    Err(RequestError),
}

fn server_error() -> RequestError {
    RequestError {
        status: 500,
        message: "The server had an error while processing your request. Sorry about that!"
            .to_owned(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// Produces the output and error files of a batch (see the module doc for which requests get
/// which lines). Pure: the same job gives the same bytes.
pub(crate) fn generate(job: &Job) -> Generated {
    let lines: Vec<(u64, &[u8])> = input_lines(&job.input).collect();
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(job.seed));
    // Failure draws are made in input order, so whether a request fails does not depend on
    // the shuffle or on how many requests got done.
    let mut fault_rng = StdRng::seed_from_u64(job.seed ^ 0x5eed_fa11);
    let draws: Vec<f64> = lines.iter().map(|_| fault_rng.random::<f64>()).collect();

    let mut generated = Generated::default();
    for (position, &index) in order.iter().enumerate() {
        let (_, line) = lines[index];
        let parsed: Option<Value> = serde_json::from_slice(line).ok();
        let custom_id = parsed
            .as_ref()
            .and_then(|v| v.get("custom_id"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let id = format!("batch_req_{}", line_id("line", &job.batch_id, index));
        if position >= job.n_done {
            if job.ending == Ending::Expired {
                write_line(
                    &mut generated.errors,
                    &OutputLine::<()> {
                        id,
                        custom_id,
                        response: None,
                        error: Some(LineError {
                            code: "batch_expired",
                            message: "This request could not be executed before the completion window expired.",
                        }),
                    },
                );
                generated.n_failed += 1;
            }
            continue;
        }
        let request_id = line_id("request", &job.batch_id, index);
        let executed = if job.faults.fail_custom_ids.contains(custom_id)
            || draws[index] < job.faults.request_failure_rate
        {
            Executed::Err(server_error())
        } else {
            match &parsed {
                Some(value)
                    if value.get("url").and_then(Value::as_str) != Some(job.endpoint.as_str()) =>
                {
                    Executed::Err(RequestError::invalid(
                        "The URL of this request does not match the batch endpoint.",
                        Some("url"),
                    ))
                }
                Some(value) if job.endpoint == "/v1/embeddings" => {
                    match embeddings::execute(&value["body"]) {
                        Ok(response) => Executed::Ok(response),
                        Err(error) => Executed::Err(error),
                    }
                }
                Some(_) => Executed::Err(RequestError::invalid(
                    format!(
                        "The emulator only executes /v1/embeddings requests, not {}.",
                        job.endpoint
                    ),
                    None,
                )),
                None => Executed::Err(RequestError::invalid(
                    "This line is not parseable as valid JSON.",
                    None,
                )),
            }
        };
        match executed {
            Executed::Ok(body) => {
                generated.input_tokens += body.usage.prompt_tokens;
                generated.n_completed += 1;
                write_line(
                    &mut generated.output,
                    &OutputLine {
                        id,
                        custom_id,
                        response: Some(LineResponse {
                            status_code: 200,
                            request_id,
                            body,
                        }),
                        error: None,
                    },
                );
            }
            Executed::Err(error) => {
                generated.n_failed += 1;
                write_line(
                    &mut generated.errors,
                    &OutputLine::<ErrorBody> {
                        id,
                        custom_id,
                        response: Some(LineResponse {
                            status_code: error.status,
                            request_id,
                            body: error.body(),
                        }),
                        error: None,
                    },
                );
            }
        }
    }
    generated
}

fn write_line<B: Serialize>(out: &mut Vec<u8>, line: &OutputLine<'_, B>) {
    // Serializing these types cannot fail: no maps with non-string keys, no non-finite floats
    // (embeddings are always finite).
    if serde_json::to_writer(&mut *out, line).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_record(input: &str) -> (BatchRecord, Instant) {
        let now = Instant::now();
        let validation = validate(input.as_bytes(), "/v1/embeddings", true);
        let record = BatchRecord {
            id: "batch_test".into(),
            endpoint: "/v1/embeddings".into(),
            input_file_id: "file-x".into(),
            completion_window: "24h".into(),
            metadata: None,
            output_expires_after: None,
            created_at: 1_700_000_000,
            created_instant: now,
            status: Status::Validating,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            total: 0,
            completed: 0,
            failed: 0,
            input_tokens: 0,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            model: None,
            stage_started: now,
            held: false,
            generating: false,
            n_done_at_cancel: 0,
            validation,
            input: Bytes::from(input.to_owned()),
            seed: 7,
            faults: BatchFaults::default(),
            request_params: None,
        };
        (record, now)
    }

    fn lines(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "{{\"custom_id\":\"c{i}\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{{\"model\":\"text-embedding-3-small\",\"input\":\"text {i}\",\"dimensions\":4}}}}\n"
                )
            })
            .collect()
    }

    #[test]
    fn validation_reports_lines() {
        let good = lines(3);
        assert_eq!(
            validate(good.as_bytes(), "/v1/embeddings", true),
            Validation::Valid {
                n_requests: 3,
                model: Some("text-embedding-3-small".into())
            }
        );
        let duplicate = format!("{}{}", lines(1), lines(1));
        let Validation::Invalid(errors) = validate(duplicate.as_bytes(), "/v1/embeddings", true)
        else {
            panic!("duplicate accepted")
        };
        assert_eq!(errors[0].code, "duplicate_custom_id");
        assert_eq!(errors[0].line, Some(2));

        let mixed = lines(1)
            + &lines(2)
                .lines()
                .nth(1)
                .unwrap()
                .replace("3-small", "3-large")
            + "\nnot json\n";
        let Validation::Invalid(errors) = validate(mixed.as_bytes(), "/v1/embeddings", true) else {
            panic!("mixed accepted")
        };
        let codes: Vec<_> = errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        assert_eq!(
            codes,
            [
                ("mismatched_model", Some(2)),
                ("invalid_json_line", Some(3))
            ]
        );

        let Validation::Invalid(errors) = validate(b"", "/v1/embeddings", true) else {
            panic!("empty accepted")
        };
        assert_eq!(errors[0].code, "empty_file");
        let wrong_url = lines(1).replace("/v1/embeddings", "/v1/completions");
        assert!(matches!(
            validate(wrong_url.as_bytes(), "/v1/embeddings", true),
            Validation::Invalid(e) if e[0].code == "invalid_url"
        ));
    }

    #[test]
    fn lifecycle_with_zero_stages_reaches_the_end_in_one_read() {
        let (mut record, now) = new_record(&lines(5));
        let Advance::NeedsOutput(job) = advance(&mut record, now, Duration::ZERO) else {
            panic!("no output needed")
        };
        assert_eq!(record.status, Status::Finalizing);
        assert!(matches!(
            advance(&mut record, now, Duration::ZERO),
            Advance::Settled
        ));
        let generated = generate(&job);
        assert_eq!((generated.n_completed, generated.n_failed), (5, 0));
        assert!(generated.errors.is_empty());
        assert!(finish(
            &mut record,
            &job,
            &generated,
            Some("file-o".into()),
            None
        ));
        assert_eq!(record.status, Status::Completed);
        assert_eq!(
            record.to_json()["request_counts"],
            json!({"total": 5, "completed": 5, "failed": 0})
        );
    }

    #[test]
    fn request_counts_grow_while_in_progress() {
        let stage = Duration::from_secs(10);
        let (mut record, start) = new_record(&lines(10));
        advance(&mut record, start + stage, stage);
        assert_eq!(record.status, Status::InProgress);
        advance(&mut record, start + stage + stage / 2, stage);
        assert_eq!(
            record.to_json()["request_counts"],
            json!({"total": 10, "completed": 5, "failed": 0})
        );
        advance(&mut record, start + stage * 2 + stage / 2, stage);
        assert_eq!(record.status, Status::Finalizing);
        assert_eq!(record.to_json()["request_counts"]["completed"], 10);
    }

    #[test]
    fn lifecycle_waits_for_each_stage() {
        let stage = Duration::from_secs(10);
        let (mut record, start) = new_record(&lines(2));
        assert!(matches!(
            advance(&mut record, start, stage),
            Advance::Settled
        ));
        assert_eq!(record.status, Status::Validating);
        assert!(matches!(
            advance(&mut record, start + stage, stage),
            Advance::Settled
        ));
        assert_eq!(record.status, Status::InProgress);
        assert_eq!(record.in_progress_at, Some(1_700_000_010));
        assert!(matches!(
            advance(&mut record, start + stage * 2, stage),
            Advance::Settled
        ));
        assert_eq!(record.status, Status::Finalizing);
        assert!(matches!(
            advance(&mut record, start + stage * 3, stage),
            Advance::NeedsOutput(_)
        ));
    }

    #[test]
    fn generation_is_deterministic_and_shuffled() {
        let (mut record, now) = new_record(&lines(50));
        let Advance::NeedsOutput(job) = advance(&mut record, now, Duration::ZERO) else {
            panic!("no output needed")
        };
        let first = generate(&job);
        assert_eq!(first.output, generate(&job).output);
        let ids: Vec<String> = first
            .output
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["custom_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id[1..].parse::<u32>().unwrap());
        assert_ne!(ids, sorted, "output not shuffled");
        assert_eq!(sorted, (0..50).map(|i| format!("c{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn expiry_and_cancel_keep_what_was_done() {
        let (mut record, now) = new_record(&lines(10));
        record.faults.expire_after_fraction = Some(0.3);
        let Advance::NeedsOutput(job) = advance(&mut record, now, Duration::ZERO) else {
            panic!("no output needed")
        };
        assert_eq!(job.ending, Ending::Expired);
        let generated = generate(&job);
        assert_eq!((generated.n_completed, generated.n_failed), (3, 7));
        let text = String::from_utf8(generated.errors).unwrap();
        assert_eq!(text.matches("batch_expired").count(), 7);

        let (mut record, now) = new_record(&lines(10));
        record.cancel(now, Duration::ZERO);
        let Advance::NeedsOutput(job) = advance(&mut record, now, Duration::ZERO) else {
            panic!("no output needed")
        };
        let generated = generate(&job);
        assert_eq!((generated.n_completed, generated.n_failed), (0, 0));
    }

    #[test]
    fn too_long_inputs_fail_alone_with_400() {
        let long = "word ".repeat(9000);
        let input = format!(
            "{}{{\"custom_id\":\"long\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{{\"model\":\"text-embedding-3-small\",\"input\":\"{long}\"}}}}\n",
            lines(2)
        );
        let (mut record, now) = new_record(&input);
        let Advance::NeedsOutput(job) = advance(&mut record, now, Duration::ZERO) else {
            panic!("no output needed")
        };
        let generated = generate(&job);
        assert_eq!((generated.n_completed, generated.n_failed), (2, 1));
        let error: Value = serde_json::from_slice(generated.errors.trim_ascii_end()).unwrap();
        assert_eq!(error["custom_id"], "long");
        assert_eq!(error["response"]["status_code"], 400);
        assert_eq!(
            error["response"]["body"]["error"]["type"],
            "invalid_request_error"
        );
        assert_eq!(error["error"], Value::Null);
    }
}
