//! A run and its folder (DESIGN.md §4, §5): the batch state machine (`state`), `run.json`'s
//! serde types and their durable save (`store`), the lock that one writing command holds
//! (`lock`), the digests that prove a batch's files are the ones planned (`evidence`), and the
//! one place every file and folder name of a run is spelled (`layout`).
//!
//! Nothing here talks to the database or the provider. Only `store` writes `run.json`.

pub mod evidence;
pub mod folders;
pub mod layout;
pub mod lock;
pub mod state;
pub mod store;
