//! The batch provider: what embatch asks of the service that embeds (files, batches, the
//! realtime endpoint). `openai` is the OpenAI client (Files and Batches, streamed upload and
//! download, retries and error classes); the emulator speaks the same protocol.

pub mod openai;
