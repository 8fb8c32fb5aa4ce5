//! The database: everything embatch says to Postgres.
//!
//! - `conn`: `DbTarget`, the parsed `DATABASE_URL` (URL or `key=value`), and connecting with
//!   libpq's `sslmode`/`sslrootcert` semantics over rustls (`tls`).
//! - `source`: catalog checks, identifier quoting, the streaming chunk SELECT, the database's
//!   identity.
//! - `sink`: the set-based, binary, stale-safe UPDATE that writes vectors (batch ingest and the
//!   realtime path alike).
//!
//! It owns no run folder and no provider: callers hand it rows and get rows back.

pub mod conn;
pub mod sink;
pub mod source;
mod tls;
