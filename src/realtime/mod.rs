//! The realtime path: new chunks embedded now through the provider's synchronous endpoint,
//! without a run. `embed` is its core (shared by the `embed` command and the service) and
//! `serve` the HTTP service with single-flight per chunk.
//!
//! It never reads or writes a run folder, `run.json` or a lock, and no batch module calls it; it
//! shares only `pg` (connection, source checks, the sink), `tokens` and the provider client.

pub mod embed;
pub mod serve;
