//! The one integration-test binary: every test goes through `harness::TestEnv`, which starts
//! a real Postgres with pgvector (a database per test) and runs the real `embatch` binary.

mod advance;
mod campaign;
mod damage;
mod direct;
mod family;
mod gemini;
mod harness;
mod ingest;
mod layers;
mod plan;
mod resilience;
mod security;
mod serve;
mod status;
mod sync;
mod tls_front;
mod ux;
mod version;
mod voyage;
