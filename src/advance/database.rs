//! The stepper's database side: one connection (and a second for ingest) made on first need,
//! the ingest of a downloaded batch — run by `ingest`, whose checkpoints are saved here — and
//! `ingest --redownload` of a batch ingested before.

use anyhow::{Context, bail};

use super::ingest::{self, DbContext, IngestJob};
use super::{Progress, Stepper};
use crate::printer::number;
use crate::run::layout::{ERRORS_FILE, FAILED_FILE, OUTPUT_FILE};
use crate::run::state::{BatchState, Event};

impl Stepper {
    /// Connects to the run's database (once), checks it is the one the run was planned
    /// against, and warns about vector indexes that make updates slow.
    pub(super) async fn database(&mut self) -> anyhow::Result<&mut DbContext> {
        if self.db.is_none() {
            let target = self
                .database
                .target()
                .context("this run writes to the database it was planned against")?;
            let client = target.connect().await?;
            self.db_reached = true;
            let overwrite = self.opts.overwrite || self.run.settings.reembed;
            let db = DbContext::open(client, target, &self.run, overwrite, &self.printer).await?;
            self.db = Some(db);
        }
        self.db
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("internal error: no database connection"))
    }

    /// `ingest --redownload` of an ingested batch: Ingested → Downloaded, its output and error
    /// files fetched again (or, when the provider's copy is gone, the local copy kept), so
    /// that the next step writes its vectors again (over existing ones with `--overwrite`).
    /// A batch whose output is gone everywhere is refused with the reason.
    pub(crate) async fn ingest_again(&mut self, idx: usize) -> anyhow::Result<()> {
        let BatchState::Ingested(ingested) = &self.run.batches[idx].state else {
            return Ok(());
        };
        let name = self.name(idx).to_owned();
        let Some(done) = ingested.done.clone() else {
            bail!(
                "batch {name} cannot be ingested again: run.json does not record which files the provider returned for it"
            );
        };
        let dir = self.dir(idx);
        let mut has = [false, false];
        for (slot, (file_id, file_name)) in [
            (done.remote.output_file_id, OUTPUT_FILE),
            (done.remote.error_file_id, ERRORS_FILE),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(file_id) = file_id else { continue };
            let path = dir.join(file_name);
            match self
                .api
                .download_file(&file_id, &path, std::sync::Arc::new(|_| {}))
                .await
            {
                Ok(_) => {}
                Err(crate::provider::ApiError::NotFound { .. }) if path.exists() => {
                    self.printer.warn(&format!(
                        "{name}: the provider no longer has {file_name} ({file_id}); ingesting the local copy {}",
                        path.display()
                    ));
                }
                Err(crate::provider::ApiError::NotFound { .. }) => bail!(
                    "batch {name} cannot be ingested again: the provider no longer has its {file_name} ({file_id}; embatch deletes it after an ingest unless --keep-remote-files) and the local copy {} is gone too",
                    path.display()
                ),
                Err(err) => {
                    return Err(anyhow::Error::from(err)
                        .context(format!("could not download {file_name} of {name}")));
                }
            }
            has[slot] = true;
        }
        if has == [false, false] {
            // The provider returned nothing for it: there is nothing to write again.
            return Ok(());
        }
        self.printer.info(&format!("{name}: ingesting it again"));
        self.apply(
            idx,
            Event::IngestAgain {
                has_output: has[0],
                has_errors: has[1],
            },
        )
    }

    /// Downloaded → Ingested.
    pub(crate) async fn ingest(&mut self, idx: usize) -> anyhow::Result<Progress> {
        let BatchState::Downloaded(downloaded) = self.run.batches[idx].state.clone() else {
            return Ok(Progress::Wait);
        };
        self.database().await?;
        let dir = self.dir(idx);
        let batch = &self.run.batches[idx];
        // chunks.tsv decides which paid vector goes where: it must be the file planned.
        let kept = dir.join(OUTPUT_FILE);
        let kept = downloaded.has_output.then_some(kept.as_path());
        crate::run::evidence::ensure_chunks(&self.run_dir, &self.run, batch, kept, &self.printer)?;
        let job = IngestJob {
            dir: dir.clone(),
            name: batch.name.clone(),
            run_dir: self.run_dir.clone(),
            requests: batch.requests,
            downloaded,
            dims: self.run.settings.dimensions as usize,
            update_chunk_size: self.opts.update_chunk_size,
            retry_allowed: !self.run.cancelled && batch.attempt < self.opts.max_attempts.max(1),
            cancelled: self.run.cancelled,
        };
        let Some(db) = self.db.take() else {
            bail!("internal error: no database connection");
        };
        let printer = self.printer;
        // On an error the connections are dropped; the next need connects again.
        let (outcome, db) = ingest::ingest(db, &job, &printer, &mut |progress| {
            self.apply(idx, Event::IngestCommitted { progress })
        })
        .await?;
        self.db = Some(db);
        let name = self.name(idx).to_owned();
        let c = outcome.counts;
        self.printer.info(&format!(
            "{name}: {} written, {} already present, {} stale, {} failed, {} to retry",
            number(c.ingested),
            number(c.already_present),
            number(c.stale),
            number(c.failed),
            number(outcome.to_retry)
        ));
        let a = outcome.anomalies;
        if a.unknown_custom_id + a.repeated_custom_id + a.unparseable > 0 {
            // Every line is accounted for: these are counted in run.json and shown by status.
            self.printer.warn(&format!(
                "{name}: in {} and {ERRORS_FILE}: {} lines with a custom_id not in this batch (refused), {} repeated custom_ids (the first line was kept), {} unparseable lines; a chunk left without a readable line is reported failed (see {FAILED_FILE})",
                self.dir(idx).join(OUTPUT_FILE).display(),
                a.unknown_custom_id,
                a.repeated_custom_id,
                a.unparseable
            ));
        }
        self.apply(idx, Event::ResultsIngested { outcome })?;
        Ok(Progress::Moved)
    }
}
