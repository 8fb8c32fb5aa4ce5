//! Retry planning: the retryable failures of ingested batches become new batches of the same
//! run, built from each chunk's current content and written with plan's batch writer.

use std::io::{BufReader, BufWriter, Write};

use anyhow::Context;

use super::Stepper;
use crate::output::FailReason;
use crate::pg::source::{self, ChunkRow, quote_ident, quote_qualified};
use crate::plan::request::RequestTemplate;
use crate::plan::{Numbering, RunWriter};
use crate::run::folders::HeldChunks;
use crate::run::layout::{FAILED_FILE, RETRY_SKIPPED_FILE};
use crate::run::state::{BatchState, Event};
use crate::run::store::OnTooLong;
use crate::tsv;

impl Stepper {
    /// Turns the retryable failures of ingested batches into new batches of the same run,
    /// built from each chunk's current content.
    pub(crate) async fn plan_retries(&mut self) -> anyhow::Result<()> {
        let sources: Vec<usize> = (0..self.run.batches.len())
            .filter(|&i| {
                matches!(&self.run.batches[i].state, BatchState::Ingested(ing) if !ing.retries_planned)
            })
            .collect();
        if sources.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        for &i in &sources {
            let path = self.dir(i).join(FAILED_FILE);
            let reader = BufReader::new(fs_err::File::open(&path)?);
            tsv::for_each_record(reader, |fields| {
                if fields.get(2).map(String::as_str) == Some("true")
                    && let Some(id) = fields.into_iter().next()
                {
                    ids.push(id);
                }
                Ok(())
            })?;
        }
        let attempt = sources
            .iter()
            .map(|&i| self.run.batches[i].attempt)
            .max()
            .unwrap_or(1)
            + 1;
        let retry_of: Vec<String> = sources.iter().map(|&i| self.name(i).to_owned()).collect();
        let rows = self.current_rows(&ids).await?;
        let found: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let deleted: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains(id.as_str()))
            .cloned()
            .collect();

        let settings = &self.run.settings;
        let template = RequestTemplate {
            model: settings.model.clone(),
            dimensions: settings.send_dimensions.then_some(settings.dimensions),
            encoding_format: settings.encoding_format,
            provider: settings.provider,
            task_type: settings.task_type,
        };
        // A retry never aborts the run: an input now over the limit is skipped, not fatal.
        let on_too_long = match settings.on_too_long {
            OnTooLong::Fail => OnTooLong::Skip,
            other => other,
        };
        let skipped_path = self.run_dir.join(RETRY_SKIPPED_FILE);
        let held = HeldChunks::default();
        let mut writer = RunWriter::new(
            &self.run_dir,
            template,
            on_too_long,
            settings.limits,
            &held,
            Numbering {
                first: self.run.batches.len() + 1,
                attempt,
                retry_of,
            },
            &skipped_path,
        )?;
        for row in rows {
            writer.add(row)?;
        }
        let written = writer.finish()?;
        if !deleted.is_empty() {
            let mut file = BufWriter::new(
                fs_err::OpenOptions::new()
                    .append(true)
                    .open(&skipped_path)?,
            );
            for id in &deleted {
                tsv::write_record(&mut file, &[id, FailReason::Deleted.as_str()])?;
            }
            file.flush()?;
        }
        let given_up = written.skipped.values().sum::<u64>() + deleted.len() as u64;
        self.run.retry_given_up += given_up;
        let n_new = written.batches.len();
        self.run.batches.extend(written.batches);
        // The new batches and the marks on their sources reach run.json in one save: a crash
        // between two saves would leave a source unmarked, and the next advance would plan
        // its retries again and pay twice for the same chunks.
        for i in sources {
            self.transition(i, Event::RetriesPlanned)?;
        }
        self.save()?;
        self.printer.info(&format!(
            "planned {n_new} retry batch{} (attempt {attempt}) for {} chunks{}",
            if n_new == 1 { "" } else { "es" },
            ids.len() as u64 - given_up,
            if given_up > 0 {
                format!("; {given_up} could not be sent again (see {RETRY_SKIPPED_FILE})")
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The current content of the given chunks, in id order.
    async fn current_rows(&mut self, ids: &[String]) -> anyhow::Result<Vec<ChunkRow>> {
        let source = self.run.settings.source.clone();
        let db = self.database().await?;
        let id_type = source.id_type.as_str();
        let order = source::order_suffix(source.id_type);
        let sql = format!(
            "SELECT t.{id}::text, t.{text} FROM {table} AS t WHERE t.{id} = ANY($1::text[]::{id_type}[]) ORDER BY t.{id}{order}",
            id = quote_ident(&source.id_column),
            text = quote_ident(&source.text_column),
            table = quote_qualified(&source.table),
        );
        let mut rows = Vec::with_capacity(ids.len());
        for part in ids.chunks(5000) {
            let part: Vec<&str> = part.iter().map(String::as_str).collect();
            for row in db
                .client()
                .query(&sql, &[&part])
                .await
                .context("could not read the chunks to retry")?
            {
                rows.push(ChunkRow {
                    id: row.get(0),
                    content: row.get(1),
                });
            }
        }
        Ok(rows)
    }
}
