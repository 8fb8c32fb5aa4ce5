//! `embatch serve`: the realtime path as an HTTP service (axum).
//!
//! `POST /api/v1/embed/chunk/{chunk_id}[?overwrite=true]` embeds one chunk now and answers
//! `200 {"chunk_id","model","dimensions","tokens"}`, or a JSON error: `404` unknown chunk,
//! `409` already embedded, `422` empty or over-long content, `502` the embeddings API failed
//! after its retries, `503` the database is unavailable, `401` without the bearer token.
//! Every error, down to a 405 or a 413 that no handler wrote, has the shape
//! `{"error":{"code","message"}}`. `GET /healthz` checks the database and answers only
//! `ok`/`unavailable`, except to a caller holding the bearer token, who also gets the details
//! (which database, the pool, the reason it is down).
//!
//! Hostile clients are bounded: a connection that does not finish its headers (or sits idle
//! between requests) within `--header-timeout` is closed, at most `--max-http-connections`
//! are open at once (the next ones wait to be accepted), and a body over
//! [`MAX_BODY_BYTES`] is refused with 413 — no route takes a body.
//!
//! This module owns the HTTP side only: the routes, the bearer check (constant time), the
//! single-flight table that makes a burst of requests for one chunk call the API once, the
//! connection pool and graceful shutdown. What a chunk's embedding *is* — lookup, checks, the
//! API call, the stale-safe write — is `embed`'s, shared with `embatch embed`. It never
//! touches runs or the batch state machine. The token and the API key never reach a log line
//! or a response.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt as _, StreamExt as _};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::config::{Global, ServeConfig};
use crate::pg::conn::{DbError, DbTarget};
use crate::printer::Printer;
use crate::provider::{ApiError, BatchProvider};
use crate::realtime::embed::{self, Conn, EmbedError, Outcome, Readiness, Target};

/// How long a request waits for a free database connection before answering 503.
const POOL_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// Attempts at one chunk whose content keeps changing under the call.
const STALE_ATTEMPTS: usize = 3;
/// The largest request body taken. No route reads a body, so anything bigger is a mistake or
/// an attack: 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// The pool

/// Opens [`Conn`]s with `DbTarget`'s libpq `sslmode` semantics (which deadpool-postgres's own
/// manager cannot take) and keeps each connection's prepared statements with it.
pub struct ConnManager {
    target: DbTarget,
}

impl managed::Manager for ConnManager {
    type Type = Conn;
    type Error = DbError;

    async fn create(&self) -> Result<Conn, DbError> {
        Ok(Conn::new(self.target.connect().await?))
    }

    async fn recycle(&self, conn: &mut Conn, _: &Metrics) -> RecycleResult<DbError> {
        if conn.is_closed() {
            return Err(RecycleError::message("the database connection is closed"));
        }
        Ok(())
    }
}

pub type Pool = managed::Pool<ConnManager>;

fn pool(target: DbTarget, max_connections: usize) -> anyhow::Result<Pool> {
    Pool::builder(ConnManager { target })
        .max_size(max_connections)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .recycle_timeout(Some(POOL_WAIT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("could not set up the database connection pool")
}

// ---------------------------------------------------------------------------------------------
// Replies

/// A finished answer, shared as is by every request that joined the same flight.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Arc<serde_json::Value>,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body.as_ref().clone())).into_response()
    }
}

#[derive(Serialize)]
struct Embedded<'a> {
    chunk_id: &'a str,
    model: &'a str,
    dimensions: u32,
    tokens: usize,
}

/// `{"error": {"code", "message"}}`: a stable code for programs, a sentence for people.
fn error_reply(status: StatusCode, code: &str, message: String) -> Reply {
    Reply {
        status,
        body: Arc::new(serde_json::json!({"error": {"code": code, "message": message}})),
    }
}

/// The reply for a chunk's [`Outcome`] (`None`: stale, try again).
fn outcome_reply(target: &Target, chunk_id: &str, outcome: &Outcome) -> Option<Reply> {
    let message = outcome.message(chunk_id);
    Some(match outcome {
        Outcome::Embedded { tokens } => Reply {
            status: StatusCode::OK,
            body: Arc::new(
                serde_json::to_value(Embedded {
                    chunk_id,
                    model: &target.model,
                    dimensions: target.dims.dimensions,
                    tokens: *tokens,
                })
                .unwrap_or_default(),
            ),
        },
        Outcome::AlreadyEmbedded => error_reply(
            StatusCode::CONFLICT,
            "already_embedded",
            format!(
                "chunk {chunk_id} already has an embedding: kept; add ?overwrite=true to embed it again"
            ),
        ),
        Outcome::EmbeddedMeanwhile => error_reply(
            StatusCode::CONFLICT,
            "embedded_meanwhile",
            format!(
                "chunk {chunk_id} was embedded by another writer while this request ran: kept; add ?overwrite=true to replace it"
            ),
        ),
        Outcome::NotFound { .. } | Outcome::Deleted => {
            error_reply(StatusCode::NOT_FOUND, "chunk_not_found", message)
        }
        Outcome::Empty => error_reply(StatusCode::UNPROCESSABLE_ENTITY, "empty_content", message),
        Outcome::TooLong { .. } => error_reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            "content_too_long",
            message,
        ),
        Outcome::Failed { message } => error_reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            format!("chunk {chunk_id} was not embedded: {message}"),
        ),
        Outcome::Stale => return None,
    })
}

fn embed_error_reply(chunk_id: &str, error: &EmbedError) -> Reply {
    match error {
        EmbedError::Api(_) | EmbedError::BadOutput(_) => error_reply(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            format!("chunk {chunk_id} was not embedded: {error}"),
        ),
        EmbedError::Db(_) | EmbedError::Sink(_) => db_unavailable(&format!("{error}")),
    }
}

fn db_unavailable(detail: &str) -> Reply {
    error_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
        format!("the database is unavailable ({detail}); try again shortly"),
    )
}

// ---------------------------------------------------------------------------------------------
// Single flight

/// Requests for the same chunk (and the same `overwrite`) that arrive while one is in flight
/// join it: one lookup, one API call, one write, and every joiner gets the same reply. The
/// work runs as a task of its own, so it finishes (and its vector lands) even if every client
/// that asked hung up. The task takes its entry out of the table when its reply is ready, so a
/// request arriving later starts afresh (and finds the chunk embedded: 409).
#[derive(Default)]
pub struct Flights {
    table: Mutex<HashMap<FlightKey, (u64, Flight)>>,
    /// Tells a finished task's entry from a newer flight of the same key.
    next_generation: AtomicU64,
}

/// The chunk id (normalized) and whether the request overwrites.
type FlightKey = (String, bool);

/// A flight's reply, awaited by every request that joined it.
type Flight = Shared<BoxFuture<'static, Reply>>;

impl Flights {
    /// Joins the flight for `key`, or starts one running `work`.
    pub fn join<F, Fut>(self: &Arc<Self>, key: FlightKey, work: F) -> impl Future<Output = Reply>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, flight)) = table.get(&key) {
            return flight.clone();
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let flights = Arc::clone(self);
        let task_key = key.clone();
        let work = work();
        // Spawned while the table is locked: the task's `finish` waits for the insert below.
        let task = tokio::spawn(async move {
            let reply = work.await;
            flights.finish(&task_key, generation);
            reply
        });
        let flight = async move {
            task.await.unwrap_or_else(|_| {
                error_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the embedding task failed; try again".to_owned(),
                )
            })
        }
        .boxed()
        .shared();
        table.insert(key, (generation, flight.clone()));
        flight
    }

    fn finish(&self, key: &FlightKey, generation: u64) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.get(key).is_some_and(|(g, _)| *g == generation) {
            table.remove(key);
        }
    }

    /// Flights in the table now (for tests).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// The app

/// Everything the handlers share: one pool, one HTTP client, the checked target.
pub struct AppState {
    pub pool: Pool,
    pub api: Box<dyn BatchProvider>,
    pub target: Target,
    /// sha256 of the bearer token: compared in constant time, and the token itself is not
    /// kept.
    token_sha256: Option<[u8; 32]>,
    pub flights: Arc<Flights>,
    verbose: bool,
    /// The time a request's body has to arrive (the header timeout).
    header_timeout: Duration,
}

#[derive(Deserialize)]
struct EmbedQuery {
    #[serde(default)]
    overwrite: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/embed/chunk/{chunk_id}", post(embed_chunk))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), bearer));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(|| async {
            error_reply(
                StatusCode::NOT_FOUND,
                "no_such_route",
                "no such route: use POST /api/v1/embed/chunk/{chunk_id} or GET /healthz".to_owned(),
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            limit_body,
        ))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            log_request,
        ))
        .with_state(state)
}

/// With `-v`: one line per request — method, path, status, time. Never a header (the token
/// travels in one) and never a query string.
async fn log_request(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !state.verbose {
        return next.run(request).await;
    }
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    eprintln!(
        "{method} {path} -> {} in {} ms",
        response.status().as_u16(),
        started.elapsed().as_millis()
    );
    response
}

/// Whether `headers` carry `Authorization: Bearer <token>` whose sha256 is `expected`. Both
/// sides are hashed first, so the comparison takes the same time whatever the length or
/// content presented.
fn bearer_matches(expected: &[u8; 32], headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            // The scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .map(|token| Sha256::digest(token.as_bytes()))
        .is_some_and(|p| bool::from(p.as_slice().ct_eq(expected.as_slice())))
}

/// `Authorization: Bearer <EMBATCH_SERVE_TOKEN>`, when a token is set.
async fn bearer(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token_sha256
        && !bearer_matches(expected, request.headers())
    {
        let mut response = error_reply(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <EMBATCH_SERVE_TOKEN>`"
                .to_owned(),
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    next.run(request).await
}

/// `GET /healthz`: `ok` (200) or `unavailable` (503), nothing more — it needs no token, and a
/// probe must not learn the database's name, host or user, or the server's error text. A
/// caller with the bearer token (when one is set) also gets `details`; without a token, `-v`
/// logs why the database is unavailable.
async fn healthz(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Reply {
    let checked = async {
        let conn = state.pool.get().await.map_err(|e| format!("{e}"))?;
        conn.client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| format!("{e}"))?;
        Ok::<(), String>(())
    }
    .await;
    let authorized = state
        .token_sha256
        .as_ref()
        .is_some_and(|expected| bearer_matches(expected, &headers));
    let (status, mut body) = match &checked {
        Ok(()) => (
            StatusCode::OK,
            serde_json::json!({"status": "ok", "database": "ok"}),
        ),
        Err(detail) => {
            if state.verbose {
                eprintln!("healthz: the database is unavailable: {detail}");
            }
            let message = if authorized {
                format!("the database is unavailable ({detail}); try again shortly")
            } else {
                "the database is unavailable; try again shortly (GET /healthz with the bearer token, or serve -v, says why)".to_owned()
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "unavailable", "database": "unavailable",
                                   "error": {"code": "database_unavailable", "message": message}}),
            )
        }
    };
    if authorized {
        let pool = state.pool.status();
        body["details"] = serde_json::json!({
            "database": state.pool.manager().target.display_safe(),
            "table": state.target.settings.table,
            "model": state.target.model,
            "dimensions": state.target.dims.dimensions,
            "pool": {"max_size": pool.max_size, "size": pool.size, "available": pool.available,
                     "waiting": pool.waiting},
            "flights": state.flights.len(),
        });
    }
    Reply {
        status,
        body: Arc::new(body),
    }
}

/// Reads the request body whole before any handler runs, refusing one over
/// [`MAX_BODY_BYTES`] (413, at once when `Content-Length` says so) or one that does not
/// arrive within the header timeout (408): a client cannot hold a connection open by trickling
/// a body.
async fn limit_body(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let too_large = || {
        error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is over {} KiB; no route takes a body: send none",
                MAX_BODY_BYTES / 1024
            ),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let mut stream = body.into_data_stream();
    let read = async {
        let mut taken: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| ())?;
            if taken.len() + chunk.len() > MAX_BODY_BYTES {
                return Ok(None);
            }
            taken.extend_from_slice(&chunk);
        }
        Ok(Some(taken))
    };
    match tokio::time::timeout(state.header_timeout, read).await {
        Ok(Ok(Some(taken))) => {
            next.run(Request::from_parts(parts, Body::from(taken)))
                .await
        }
        Ok(Ok(None)) => too_large(),
        Ok(Err(())) => error_reply(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the request body could not be read; send none".to_owned(),
        )
        .into_response(),
        Err(_) => error_reply(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s; send none",
                state.header_timeout.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Gives every error response that no handler of ours wrote (axum's 405 for a wrong method,
/// a 400 for a path it cannot decode, …) the documented JSON shape, keeping its status and
/// headers (`Allow` for a 405).
async fn json_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!(
                "{method} is not allowed here: use POST /api/v1/embed/chunk/{{chunk_id}} or GET /healthz"
            ),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            "the request body is too large; no route takes a body: send none".to_owned(),
        ),
        StatusCode::BAD_REQUEST => (
            "bad_request",
            "the request is not understood (a path that is not valid percent-encoded UTF-8?)"
                .to_owned(),
        ),
        _ => (
            "http_error",
            format!(
                "the request failed: {}",
                status.canonical_reason().unwrap_or("error")
            ),
        ),
    };
    let (mut parts, _) = response.into_parts();
    let (json_parts, body) = error_reply(status, code, message)
        .into_response()
        .into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, body)
}

async fn embed_chunk(
    State(state): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
    query: Result<Query<EmbedQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Ok(Query(query)) = query else {
        return error_reply(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "the query string is not understood: the only parameter is overwrite=true|false"
                .to_owned(),
        );
    };
    match embed::normalize_id(state.target.source.id_type, &raw_id) {
        Err(why) => error_reply(
            StatusCode::NOT_FOUND,
            "chunk_not_found",
            format!("chunk {raw_id} not found: {why}"),
        ),
        Ok(chunk_id) => {
            let key = (chunk_id.clone(), query.overwrite);
            let work_state = Arc::clone(&state);
            state
                .flights
                .join(key, move || async move {
                    embed_one(&work_state, &chunk_id, query.overwrite).await
                })
                .await
        }
    }
}

/// The work of one flight: look up, check, call the API, write.
async fn embed_one(state: &AppState, chunk_id: &str, overwrite: bool) -> Reply {
    let ids = [chunk_id.to_owned()];
    for _ in 0..STALE_ATTEMPTS {
        let loaded = {
            let mut conn = match state.pool.get().await {
                Ok(conn) => conn,
                Err(e) => return db_unavailable(&format!("{e}")),
            };
            match conn.load(&state.target, &ids).await {
                Ok(loaded) => loaded,
                Err(e) => return embed_error_reply(chunk_id, &e),
            }
        };
        let Some(chunk) = loaded.get(chunk_id) else {
            let outcome = Outcome::NotFound {
                why: format!(
                    "no row of {} has this {}",
                    state.target.settings.table, state.target.settings.id_column
                ),
            };
            return outcome_reply(&state.target, chunk_id, &outcome).unwrap_or_else(|| {
                error_reply(StatusCode::NOT_FOUND, "chunk_not_found", String::new())
            });
        };
        let ready = match embed::classify(chunk, overwrite, state.target.provider) {
            Readiness::Done(outcome) => {
                if let Some(reply) = outcome_reply(&state.target, chunk_id, &outcome) {
                    return reply;
                }
                continue;
            }
            Readiness::Ready(ready) => ready,
        };
        // No connection is held during the API call: a slow provider must not starve the pool.
        let ready = [ready];
        let vectors = match embed::fetch_vectors(state.api.as_ref(), &state.target, &ready).await {
            Ok(vectors) => vectors,
            Err(e) => return embed_error_reply(chunk_id, &e),
        };
        let outcomes = {
            let mut conn = match state.pool.get().await {
                Ok(conn) => conn,
                Err(e) => return db_unavailable(&format!("{e}")),
            };
            match conn.store(&state.target, overwrite, &ready, &vectors).await {
                Ok(outcomes) => outcomes,
                Err(e) => return embed_error_reply(chunk_id, &e),
            }
        };
        match outcomes.first() {
            Some(outcome) => {
                if let Some(reply) = outcome_reply(&state.target, chunk_id, outcome) {
                    return reply;
                }
                // Stale: the content changed during the call; embed the new content.
            }
            None => return db_unavailable("the write returned no outcome"),
        }
    }
    error_reply(
        StatusCode::CONFLICT,
        "content_changing",
        format!(
            "chunk {chunk_id} changed {STALE_ATTEMPTS} times while it was being embedded: not written; try again when edits settle"
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Starting and stopping

/// The rule for where the service may listen: anywhere with a token, only on loopback
/// without one (an open embedding endpoint spends the API key's money).
pub fn check_listen(addr: SocketAddr, has_token: bool) -> anyhow::Result<()> {
    if has_token || addr.ip().is_loopback() {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {addr} without a token: anyone who can reach it could spend the API key; set EMBATCH_SERVE_TOKEN to a long random secret (clients send `Authorization: Bearer <token>`), or listen on 127.0.0.1"
    )
}

/// Builds the shared state: the API client, the pool (one connection opened now, so a wrong
/// `DATABASE_URL` fails at start), and the checked target.
pub async fn app_state(global: &Global, cfg: &ServeConfig) -> anyhow::Result<Arc<AppState>> {
    let api = crate::provider::connect::realtime_provider_for(&global.api, cfg.realtime.provider)?;
    let db_target = embed::db_target(global)?;
    let pool = pool(db_target, cfg.max_connections)?;
    let target = {
        let conn = pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(db) => anyhow::Error::new(db),
            other => anyhow::anyhow!("could not open a database connection: {other}"),
        })?;
        Target::inspect(&conn.client, &cfg.realtime).await?
    };
    Ok(Arc::new(AppState {
        pool,
        api,
        target,
        token_sha256: cfg
            .token
            .as_ref()
            .map(|t| Sha256::digest(t.as_bytes()).into()),
        flights: Arc::new(Flights::default()),
        verbose: global.output.verbose,
        header_timeout: cfg.header_timeout,
    }))
}

/// What one client may hold: see [`accept_loop`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to send a request's headers, and to stay idle between two requests.
    pub header_timeout: Duration,
}

/// Accepts connections until `stop`, at most `limits.max_connections` open at once: at the
/// bound it stops accepting, so the next clients wait in the kernel's queue (served in turn as
/// connections close) rather than being refused. Each connection is HTTP/1.1 with
/// `header_read_timeout` — which hyper also applies while a kept-alive connection waits for its
/// next request — so a client that sends nothing, or half a header, holds its place for at
/// most `limits.header_timeout`. On `stop` it closes the listener, asks every connection to
/// finish its request in flight and close, and returns when all have.
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                tokio::spawn(serve_connection(
                    stream,
                    router.clone(),
                    limits.header_timeout,
                    stop.clone(),
                    permit,
                ));
            }
            // Out of file descriptors and the like: pause rather than spin, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    drop(listener);
    // Every connection gives its permit back when it is closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Serves one connection until it closes, times out, or the server stops (then the request
/// in flight finishes first). The permit is given back when it returns.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        router.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // A client that hangs up or times out is its own business: nothing to report.
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.as_mut().await;
        }
    }
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// `embatch serve --listen ADDR`: serves until SIGTERM or ctrl-c, then stops accepting,
/// finishes the requests in flight (up to a minute) and returns.
/// Asks the provider once, at start, whether it takes the API key (a file lookup: free, and
/// refused with 401 for a wrong key), so a wrong key is a warning now rather than a 502 on
/// every request later. Only a refusal is reported; no answer within 5 s, or any other answer,
/// says nothing about the key and is let pass.
async fn check_api_key(api: &dyn BatchProvider, printer: &Printer) {
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        api.get_file("file-embatch-serve-key-check"),
    )
    .await;
    if let Ok(Err(err @ (ApiError::Auth { .. } | ApiError::Quota { .. }))) = answer {
        printer.warn(&format!(
            "{err}; serving anyway, but every embedding request will fail with 502 until the key is fixed"
        ));
    }
}

pub async fn serve_command(
    global: &Global,
    cfg: &ServeConfig,
    printer: &Printer,
) -> anyhow::Result<()> {
    check_listen(cfg.listen, cfg.token.is_some())?;
    let state = app_state(global, cfg).await?;
    check_api_key(state.api.as_ref(), printer).await;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; choose another --listen address",
                cfg.listen
            )
        })?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    if cfg.token.is_none() {
        printer.warn("no EMBATCH_SERVE_TOKEN: requests are not authenticated (loopback only)");
    }
    // Always printed, even with -q: a caller that asked for port 0 needs the real one.
    eprintln!(
        "embatch serve listening on http://{addr} (model {}, vector({}), table {})",
        state.target.model, state.target.dims.dimensions, state.target.settings.table
    );
    let stop = CancellationToken::new();
    let limits = ConnectionLimits {
        max_connections: cfg.max_http_connections,
        header_timeout: cfg.header_timeout,
    };
    let mut server = tokio::spawn(accept_loop(
        listener,
        router(Arc::clone(&state)),
        limits,
        stop.clone(),
    ));
    tokio::select! {
        result = &mut server => {
            result.context("the server task failed")?;
            return Ok(());
        }
        () = shutdown_signal() => {}
    }
    printer.info("shutting down: finishing the requests in flight");
    stop.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(result) => result.context("the server task failed")?,
        Err(_) => {
            server.abort();
            anyhow::bail!(
                "requests were still running {} s after the shutdown signal and were cut off",
                SHUTDOWN_GRACE.as_secs()
            );
        }
    }
    // Flights whose clients all hung up still run as tasks of their own: let them land.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !state.flights.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.pool.close();
    printer.info("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert!(check_listen(loopback, false).is_ok());
        assert!(check_listen(loopback6, false).is_ok());
        assert!(check_listen(public, true).is_ok());
        let err = check_listen(public, false).unwrap_err().to_string();
        assert!(err.contains("EMBATCH_SERVE_TOKEN"), "{err}");
    }

    #[tokio::test]
    async fn a_burst_runs_the_work_once_and_shares_the_reply() {
        let flights = Arc::new(Flights::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let flights = Arc::clone(&flights);
            let calls = Arc::clone(&calls);
            tasks.push(tokio::spawn(async move {
                flights
                    .join(("c1".to_owned(), false), || async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        error_reply(StatusCode::OK, "x", "same".to_owned())
                    })
                    .await
            }));
        }
        for task in tasks {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(flights.is_empty(), "the finished flight left the table");
    }

    #[tokio::test]
    async fn a_flight_finishes_when_every_client_hung_up() {
        let flights = Arc::new(Flights::default());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let waiting = flights.join(("c1".to_owned(), false), || async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            error_reply(StatusCode::OK, "x", "done".to_owned())
        });
        drop(waiting);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        assert!(flights.is_empty());
    }
}
