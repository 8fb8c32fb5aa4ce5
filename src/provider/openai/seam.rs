//! OpenAI behind the provider seam: [`ApiClient`] as a [`BatchProvider`], and the translation
//! of its wire types (`FileObject`, `Batch`) into the seam's values. Nothing else outside this
//! module reads OpenAI's objects.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{ApiClient, ApiError, Batch, ByteObserver, ClockReading, FileObject};
use crate::provider::{BatchProvider, RemoteBatch, RemoteFile};
use crate::run::state::{RemoteError, RemoteSnapshot, RequestCounts};

/// Unix seconds → a time (the provider's timestamps; now for one out of range).
fn from_unix(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_else(Utc::now)
}

/// What the seam keeps of a `FileObject`.
pub fn remote_file(file: &FileObject) -> RemoteFile {
    RemoteFile {
        id: file.id.clone(),
        filename: file.filename.clone(),
        bytes: file.bytes,
        created_at: from_unix(file.created_at),
        expires_at: file.expires_at.map(from_unix),
    }
}

/// What the state machine keeps of a `Batch`.
pub fn snapshot(batch: &Batch) -> RemoteSnapshot {
    RemoteSnapshot {
        status: batch.status.as_str().into(),
        request_counts: batch
            .request_counts
            .as_ref()
            .map(|c| RequestCounts {
                total: c.total,
                completed: c.completed,
                failed: c.failed,
            })
            .unwrap_or_default(),
        output_file_id: batch.output_file_id.clone(),
        error_file_id: batch.error_file_id.clone(),
        expires_at: batch.expires_at.map(from_unix),
        errors: batch
            .errors
            .as_ref()
            .map(|e| {
                e.data
                    .iter()
                    .map(|d| RemoteError {
                        code: d.code.clone(),
                        message: d.message.clone(),
                        line: d.line,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The seam's view of a `Batch`; `batch.json` gets the object as OpenAI sent it.
pub fn remote_batch(batch: &Batch) -> Result<RemoteBatch, ApiError> {
    let record = serde_json::to_string_pretty(batch).map_err(|e| ApiError::Decode {
        provider: crate::models::Provider::Openai,
        message: format!("could not encode batch {}: {e}", batch.id),
    })?;
    Ok(RemoteBatch {
        id: batch.id.clone(),
        created_at: from_unix(batch.created_at),
        metadata: batch.metadata.clone().unwrap_or_default(),
        snapshot: snapshot(batch),
        record,
    })
}

impl BatchProvider for ApiClient {
    fn upload<'a>(
        &'a self,
        path: &'a Path,
        filename: &'a str,
        expires_after: Duration,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move {
            let file = self
                .upload_file_observed(path, filename, expires_after, observe)
                .await?;
            Ok(remote_file(&file))
        }
        .boxed()
    }

    fn find_files_named<'a>(
        &'a self,
        filename: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteFile>, ApiError>> {
        async move {
            let files = ApiClient::find_files_named(self, filename).await?;
            Ok(files.iter().map(remote_file).collect())
        }
        .boxed()
    }

    fn get_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteFile, ApiError>> {
        async move { Ok(remote_file(&ApiClient::get_file(self, id).await?)) }.boxed()
    }

    fn delete_file<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        ApiClient::delete_file(self, id).boxed()
    }

    fn download_file<'a>(
        &'a self,
        id: &'a str,
        dest: &'a Path,
        observe: ByteObserver,
    ) -> BoxFuture<'a, Result<u64, ApiError>> {
        self.download_file_observed(id, dest, observe).boxed()
    }

    fn create_batch<'a>(
        &'a self,
        input_file_id: &'a str,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move { remote_batch(&ApiClient::create_batch(self, input_file_id, metadata).await?) }
            .boxed()
    }

    fn get_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move { remote_batch(&ApiClient::get_batch(self, id).await?) }.boxed()
    }

    fn cancel_batch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<RemoteBatch, ApiError>> {
        async move { remote_batch(&ApiClient::cancel_batch(self, id).await?) }.boxed()
    }

    fn find_batches<'a>(
        &'a self,
        not_before: DateTime<Utc>,
        metadata: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<RemoteBatch>, ApiError>> {
        async move {
            let found = ApiClient::find_batches(self, not_before, |b| {
                metadata
                    .iter()
                    .all(|(key, value)| b.metadata_value(key) == Some(value.as_str()))
            })
            .await?;
            found.iter().map(remote_batch).collect()
        }
        .boxed()
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: &'a [String],
        dimensions: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, ApiError>> {
        ApiClient::embed(self, model, inputs, dimensions).boxed()
    }

    fn clock_reading(&self) -> Option<ClockReading> {
        ApiClient::clock_reading(self)
    }

    fn read_clock(&self) -> BoxFuture<'_, Result<(), ApiError>> {
        async move {
            self.list_batches(None, 1).await?;
            Ok(())
        }
        .boxed()
    }
}
