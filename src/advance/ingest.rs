//! Ingest: stream a downloaded batch's output and error files into the database, report every
//! failed request, and plan retry batches (DESIGN.md §5, §7).
//!
//! Lines are read one at a time and checked (status, custom_id of this batch, first line wins,
//! dimension, finite values); vectors go to the `sink` in set-based statements, committed every
//! `--update-chunk-size` rows, after which the position is saved in `run.json`: a crash redoes
//! at most one transaction, harmlessly. This module owns `failed_chunk_ids.tsv` and the retry
//! batches; the SQL of the writes belongs to `sink`, the line format to `output`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};

use anyhow::{Context, bail};
use tokio_postgres::Client;

use super::{Progress, Stepper};
use crate::output::{FailReason, LineOutcome, parse_line_bytes};
use crate::pg::sink::{RowOutcome, Sink, VectorRow};
use crate::pg::source;
use crate::run::layout::{CHUNKS_FILE, ERRORS_FILE, FAILED_FILE, OUTPUT_FILE};
use crate::run::state::{
    BatchState, Event, IngestCounts, IngestFile, IngestOutcome, IngestProgress, LineAnomalies,
    Terminal,
};
use crate::tsv;

/// The database side of a stepper, connected on first need.
pub(crate) struct DbContext {
    pub(super) client: Client,
    sink: Sink,
    /// A second connection, so that two transactions of an ingest do their work at once.
    second: Option<(Client, Sink)>,
}

/// A chunk of the batch being ingested.
struct ChunkEntry {
    sha256: String,
    seen: bool,
}

/// The running figures of one ingest.
struct Tally {
    counts: IngestCounts,
    anomalies: LineAnomalies,
    to_retry: u64,
}

/// Where failed chunks are reported, and whether they may be retried.
struct Report {
    failed: BufWriter<fs_err::File>,
    tally: Tally,
    /// Attempts remain and the run is not cancelled.
    retry_allowed: bool,
    cancelled: bool,
}

impl Report {
    /// Reports one failed chunk: retried when its reason allows and attempts remain,
    /// otherwise given up (and counted as failed).
    fn fail(&mut self, id: &str, reason: FailReason) -> anyhow::Result<()> {
        let (reason, retry) = match (reason.is_retryable(), self.retry_allowed) {
            (true, true) => (reason, true),
            // The user cancelled: keep the real reason, but no retry.
            (true, false) if self.cancelled => (reason, false),
            (true, false) => (FailReason::AttemptsExhausted, false),
            (false, _) => (reason, false),
        };
        tsv::write_record(
            &mut self.failed,
            &[id, reason.as_str(), if retry { "true" } else { "false" }],
        )?;
        if retry {
            self.tally.to_retry += 1;
        } else {
            self.tally.counts.failed += 1;
        }
        Ok(())
    }
}

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
            let identity = source::database_identity(&client).await?;
            let planned = &self.run.database;
            let same_system = match (&planned.system_identifier, &identity.system_identifier) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if !same_system || planned.database != identity.database {
                bail!(
                    "this run was planned against database `{}` (system {}), but DATABASE_URL points at `{}` (system {}); point DATABASE_URL at the run's database",
                    planned.database,
                    planned.system_identifier.as_deref().unwrap_or("unknown"),
                    identity.database,
                    identity.system_identifier.as_deref().unwrap_or("unknown"),
                );
            }
            let source = &self.run.settings.source;
            let indexes = crate::pg::sink::ann_indexes(&client, source).await?;
            for index in &indexes {
                self.printer
                    .warn(&index.slow_write_warning(&source.table, &source.embedding_column));
            }
            let overwrite = self.opts.overwrite || self.run.settings.reembed;
            let sink = Sink::prepare(&client, source, overwrite).await?;
            // Best effort: with one connection ingest is only slower.
            let second = match target.connect().await {
                Ok(other) => match Sink::prepare(&other, source, overwrite).await {
                    Ok(other_sink) => Some((other, other_sink)),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            self.db = Some(DbContext {
                client,
                sink,
                second,
            });
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
        let Some(db) = self.db.take() else {
            bail!("internal error: no database connection");
        };
        // On an error the connections are dropped; the next need connects again.
        let (outcome, db) = self.ingest_with(db, idx, &downloaded).await?;
        self.db = Some(db);
        let name = self.name(idx).to_owned();
        let c = outcome.counts;
        self.printer.info(&format!(
            "{name}: {} written, {} already present, {} stale, {} failed, {} to retry",
            c.ingested, c.already_present, c.stale, c.failed, outcome.to_retry
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

    async fn ingest_with(
        &mut self,
        db: DbContext,
        idx: usize,
        downloaded: &crate::run::state::Downloaded,
    ) -> anyhow::Result<(IngestOutcome, DbContext)> {
        let dir = self.dir(idx);
        let batch = &self.run.batches[idx];
        // chunks.tsv decides which paid vector goes where: it must be the file planned.
        let kept = dir.join(OUTPUT_FILE);
        let kept = downloaded.has_output.then_some(kept.as_path());
        crate::run::evidence::ensure_chunks(&self.run_dir, &self.run, batch, kept, &self.printer)?;
        let mut chunks = load_chunks(&dir.join(CHUNKS_FILE))?;

        let dims = self.run.settings.dimensions as usize;
        let statement_rows = Sink::MAX_ROWS_PER_STATEMENT.min(self.opts.update_chunk_size.max(1));
        let rows_per_tx = self.opts.update_chunk_size.max(1);

        let resume = downloaded.progress;
        let failed_path = dir.join(FAILED_FILE);
        let mut report = Report {
            failed: open_failed_file(&failed_path, resume.map(|p| p.failed_file_len))?,
            tally: Tally {
                counts: resume.map(|p| p.counts).unwrap_or_default(),
                anomalies: resume.map(|p| p.anomalies).unwrap_or_default(),
                to_retry: resume.map(|p| p.to_retry).unwrap_or_default(),
            },
            retry_allowed: !self.run.cancelled && batch.attempt < self.opts.max_attempts.max(1),
            cancelled: self.run.cancelled,
        };
        let files: Vec<(IngestFile, &str)> = [
            (IngestFile::Output, downloaded.has_output, OUTPUT_FILE),
            (IngestFile::Errors, downloaded.has_errors, ERRORS_FILE),
        ]
        .into_iter()
        .filter(|(_, has, _)| *has)
        .map(|(file, _, name)| (file, name))
        .collect();
        // A downloaded file lost before its ingest finished: say how to fetch it again rather
        // than fail on a bare "no such file" (the remote copy is only deleted after ingest).
        for (_, name) in &files {
            let path = dir.join(name);
            if !path.exists() {
                bail!(
                    "{} is missing: batch {} was downloaded but not yet ingested; fetch it again with `embatch ingest --run-dir {} --redownload`",
                    path.display(),
                    batch.name,
                    self.run_dir.display()
                );
            }
        }
        // On resume, the lines before the saved position were handled: mark their ids seen so
        // that "the first line wins" still holds.
        if let Some(progress) = resume {
            for (file, name) in &files {
                let limit = match (*file, progress.file) {
                    (f, p) if f == p => progress.offset,
                    (IngestFile::Output, IngestFile::Errors) => u64::MAX,
                    _ => 0,
                };
                mark_seen_before(&dir.join(name), limit, &mut chunks)?;
            }
        }

        let bar = self.printer.row_bar("ingesting", batch.requests);
        let mut writers = Writers::start(db);
        let mut group: Vec<WriteRow> = Vec::with_capacity(statement_rows);
        for (file, name) in files {
            let start = match resume {
                Some(p) if p.file == file => p.offset,
                Some(p) if p.file == IngestFile::Errors && file == IngestFile::Output => continue,
                _ => 0,
            };
            let path = dir.join(name);
            // Parsing (most of the CPU for float output) runs on its own thread, a bounded
            // channel ahead of this loop, so it overlaps with the database's work.
            let (sender, mut receiver) = tokio::sync::mpsc::channel(PARSED_BATCHES_IN_FLIGHT);
            let mut parser = Some(tokio::task::spawn_blocking(move || {
                parse_file(&path, start, dims, sender)
            }));
            let mut pending = Vec::new().into_iter();
            let mut offset = start;
            let mut at_end = false;
            // One transaction per `--update-chunk-size` rows, then a checkpoint. Transactions
            // alternate between the two connections and do their work at the same time, but
            // each commits only once the one before it is committed and checkpointed, so the
            // saved offset never claims an uncommitted row and a crash redoes at most one
            // transaction (the next one is still waiting for its turn and rolls back).
            while !at_end {
                let seq = writers.next_seq;
                writers.make_room(self, idx, &mut report, file).await?;
                writers.begin().await?;
                let mut segment = Segment::default();
                let mut rows_in_tx = 0usize;
                loop {
                    let parsed: ParsedLine = match pending.next() {
                        Some(parsed) => parsed,
                        None => match receiver.recv().await {
                            Some(batch) => {
                                pending = batch.into_iter();
                                continue;
                            }
                            None => {
                                at_end = true;
                                break;
                            }
                        },
                    };
                    offset = parsed.end_offset;
                    let Some(outcome) = parsed.outcome else {
                        continue;
                    };
                    bar.inc(1);
                    match outcome {
                        LineOutcome::Vector { custom_id, vector } => {
                            match chunks.get_mut(&custom_id) {
                                None => segment.anomalies.unknown_custom_id += 1,
                                Some(entry) if entry.seen => {
                                    segment.anomalies.repeated_custom_id += 1
                                }
                                Some(entry) => {
                                    entry.seen = true;
                                    group.push(WriteRow {
                                        id: custom_id,
                                        vector,
                                        sha256: entry.sha256.clone(),
                                    });
                                }
                            }
                        }
                        LineOutcome::Failed {
                            custom_id: Some(custom_id),
                            reason,
                            detail: _,
                        } => match chunks.get_mut(&custom_id) {
                            None => segment.anomalies.unknown_custom_id += 1,
                            Some(entry) if entry.seen => segment.anomalies.repeated_custom_id += 1,
                            Some(entry) => {
                                entry.seen = true;
                                segment.failed.push((custom_id, reason));
                            }
                        },
                        LineOutcome::Failed {
                            custom_id: None, ..
                        } => segment.anomalies.unparseable += 1,
                    }
                    if group.len() >= statement_rows {
                        rows_in_tx += group.len();
                        writers
                            .rows(std::mem::replace(
                                &mut group,
                                Vec::with_capacity(statement_rows),
                            ))
                            .await?;
                        if rows_in_tx >= rows_per_tx {
                            break;
                        }
                    }
                }
                if !group.is_empty() {
                    writers
                        .rows(std::mem::replace(
                            &mut group,
                            Vec::with_capacity(statement_rows),
                        ))
                        .await?;
                }
                if at_end && let Some(parser) = parser.take() {
                    // The parser stopped: at the end of the file, or on a read error, which
                    // must not pass for the end (nothing after it would be ingested).
                    parser
                        .await
                        .context("the output parser stopped unexpectedly")??;
                }
                segment.seq = seq;
                segment.end_offset = offset;
                writers.commit(segment).await?;
            }
            // Every transaction of this file committed and checkpointed before the next file.
            writers.drain(self, idx, &mut report, file).await?;
        }
        let db = writers.stop().await?;
        bar.finish_and_clear();

        // Chunks no line spoke of.
        let missing_reason = match downloaded.terminal {
            Terminal::Expired => FailReason::Expired,
            Terminal::Cancelled => FailReason::Cancelled,
            Terminal::Completed => FailReason::BadOutput,
        };
        let mut missing: Vec<&String> = chunks
            .iter()
            .filter(|(_, entry)| !entry.seen)
            .map(|(id, _)| id)
            .collect();
        missing.sort();
        for id in missing {
            report.fail(id, missing_reason)?;
        }
        finish_failed_file(report.failed)?;
        let tally = report.tally;
        Ok((
            IngestOutcome {
                counts: tally.counts,
                anomalies: tally.anomalies,
                to_retry: tally.to_retry,
            },
            db,
        ))
    }

    /// After a commit: make the failure report durable, then save where to resume.
    fn checkpoint(
        &mut self,
        idx: usize,
        report: &mut Report,
        file: IngestFile,
        offset: u64,
    ) -> anyhow::Result<()> {
        let (failed, tally) = (&mut report.failed, &report.tally);
        failed.flush()?;
        failed.get_ref().sync_all()?;
        let failed_file_len = failed.get_ref().metadata()?.len();
        crate::crashpoint::crashpoint("ingest_commit");
        self.apply(
            idx,
            Event::IngestCommitted {
                progress: IngestProgress {
                    file,
                    offset,
                    counts: tally.counts,
                    anomalies: report.tally.anomalies,
                    to_retry: tally.to_retry,
                    failed_file_len,
                },
            },
        )
    }
}

/// Parsed lines sent at once from the parser thread to the writer, and how many such batches
/// may wait in the channel: enough to keep both busy, a few MB at most (a float line is
/// ~18 KB, its vector 6 KB).
const PARSED_LINES_PER_BATCH: usize = 64;
const PARSED_BATCHES_IN_FLIGHT: usize = 2;

/// One line of an output or error file, parsed.
struct ParsedLine {
    /// The byte just past this line: where a resume starts once it is handled.
    end_offset: u64,
    /// `None` for a blank line, which is passed over.
    outcome: Option<LineOutcome>,
}

/// Reads `path` from byte `start` and sends its lines, parsed, in order. Stops early when the
/// receiver is gone (the writer failed).
fn parse_file(
    path: &std::path::Path,
    start: u64,
    dims: usize,
    sender: tokio::sync::mpsc::Sender<Vec<ParsedLine>>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, fs_err::File::open(path)?);
    reader.seek(SeekFrom::Start(start))?;
    let mut offset = start;
    let mut line = Vec::with_capacity(64 * 1024);
    let mut batch = Vec::with_capacity(PARSED_LINES_PER_BATCH);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        // A line that is not UTF-8 is parsed (and so reported) like any other: only a blank
        // line says nothing.
        let blank = text.iter().all(u8::is_ascii_whitespace);
        let outcome = (!blank).then(|| parse_line_bytes(text, dims));
        batch.push(ParsedLine {
            end_offset: offset,
            outcome,
        });
        if batch.len() >= PARSED_LINES_PER_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(PARSED_LINES_PER_BATCH));
            if sender.blocking_send(full).is_err() {
                return Ok(());
            }
        }
    }
    if !batch.is_empty() {
        let _ = sender.blocking_send(batch);
    }
    Ok(())
}

/// One vector on its way to a writer, with the content hash recorded at plan time.
struct WriteRow {
    id: String,
    vector: Vec<f32>,
    sha256: String,
}

/// What a transaction's lines said besides its vectors, applied to the report only when the
/// transaction is committed, in order, so that a checkpoint counts exactly the lines before
/// its offset.
#[derive(Default)]
struct Segment {
    seq: u64,
    end_offset: u64,
    failed: Vec<(String, FailReason)>,
    anomalies: LineAnomalies,
}

enum Job {
    Begin {
        /// Fires when every earlier transaction is committed and checkpointed.
        turn: tokio::sync::oneshot::Receiver<()>,
    },
    Rows(Vec<WriteRow>),
    Commit {
        seq: u64,
    },
}

struct Done {
    seq: u64,
    outcomes: Vec<(String, RowOutcome)>,
}

struct Writer {
    jobs: tokio::sync::mpsc::Sender<Job>,
    task: tokio::task::JoinHandle<(Client, Sink)>,
}

/// The ingest's writers: one task per connection, each running the transactions given to it.
struct Writers {
    writers: Vec<Writer>,
    done: tokio::sync::mpsc::Receiver<anyhow::Result<Done>>,
    /// Transactions sent and not yet checkpointed, oldest first.
    in_flight: std::collections::VecDeque<Segment>,
    /// The turn of the newest transaction, when an older one is still in flight.
    waiting_turn: Option<tokio::sync::oneshot::Sender<()>>,
    next_seq: u64,
    /// The writer of the transaction being filled.
    current: usize,
}

impl Writers {
    fn start(db: DbContext) -> Writers {
        let (done_sender, done) = tokio::sync::mpsc::channel(4);
        let mut connections = vec![(db.client, db.sink)];
        connections.extend(db.second);
        let writers = connections
            .into_iter()
            .map(|(client, sink)| {
                let (jobs, receiver) = tokio::sync::mpsc::channel(1);
                let task = tokio::spawn(write_transactions(
                    client,
                    sink,
                    receiver,
                    done_sender.clone(),
                ));
                Writer { jobs, task }
            })
            .collect();
        Writers {
            writers,
            done,
            in_flight: std::collections::VecDeque::new(),
            waiting_turn: None,
            next_seq: 0,
            current: 0,
        }
    }

    /// Waits until the writer of the next transaction is free.
    async fn make_room(
        &mut self,
        stepper: &mut Stepper,
        idx: usize,
        report: &mut Report,
        file: IngestFile,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.writers.len() {
            self.finish_oldest(stepper, idx, report, file).await?;
        }
        Ok(())
    }

    async fn begin(&mut self) -> anyhow::Result<()> {
        self.current = (self.next_seq % self.writers.len() as u64) as usize;
        let (turn_sender, turn) = tokio::sync::oneshot::channel();
        if self.in_flight.is_empty() {
            let _ = turn_sender.send(());
        } else {
            self.waiting_turn = Some(turn_sender);
        }
        self.send(Job::Begin { turn }).await
    }

    async fn rows(&mut self, rows: Vec<WriteRow>) -> anyhow::Result<()> {
        self.send(Job::Rows(rows)).await
    }

    async fn commit(&mut self, segment: Segment) -> anyhow::Result<()> {
        let seq = segment.seq;
        self.in_flight.push_back(segment);
        self.next_seq += 1;
        self.send(Job::Commit { seq }).await
    }

    async fn send(&mut self, job: Job) -> anyhow::Result<()> {
        if self.writers[self.current].jobs.send(job).await.is_err() {
            // The writer stopped on an error: its report is in the done channel.
            return Err(self.writer_error().await);
        }
        Ok(())
    }

    async fn writer_error(&mut self) -> anyhow::Error {
        loop {
            match self.done.recv().await {
                Some(Err(err)) => return err,
                Some(Ok(_)) => continue,
                None => return anyhow::anyhow!("the database writer stopped unexpectedly"),
            }
        }
    }

    /// Waits for the oldest transaction's commit, applies what its lines said, checkpoints,
    /// and gives the next transaction its turn to commit.
    async fn finish_oldest(
        &mut self,
        stepper: &mut Stepper,
        idx: usize,
        report: &mut Report,
        file: IngestFile,
    ) -> anyhow::Result<()> {
        let done = match self.done.recv().await {
            Some(Ok(done)) => done,
            Some(Err(err)) => return Err(err),
            None => bail!("the database writers stopped unexpectedly"),
        };
        let Some(segment) = self.in_flight.pop_front() else {
            bail!("internal error: a transaction committed that was never sent");
        };
        if segment.seq != done.seq {
            bail!(
                "internal error: transaction {} committed before transaction {}",
                done.seq,
                segment.seq
            );
        }
        for (id, reason) in segment.failed {
            report.fail(&id, reason)?;
        }
        let a = &mut report.tally.anomalies;
        a.unknown_custom_id += segment.anomalies.unknown_custom_id;
        a.repeated_custom_id += segment.anomalies.repeated_custom_id;
        a.unparseable += segment.anomalies.unparseable;
        for (id, outcome) in done.outcomes {
            match outcome {
                RowOutcome::Written => report.tally.counts.ingested += 1,
                RowOutcome::AlreadyPresent => report.tally.counts.already_present += 1,
                RowOutcome::Stale => {
                    report.tally.counts.stale += 1;
                    report.fail(&id, FailReason::Stale)?;
                }
                RowOutcome::Deleted => report.fail(&id, FailReason::Deleted)?,
            }
        }
        stepper.checkpoint(idx, report, file, segment.end_offset)?;
        if let Some(turn) = self.waiting_turn.take() {
            let _ = turn.send(());
        }
        Ok(())
    }

    async fn drain(
        &mut self,
        stepper: &mut Stepper,
        idx: usize,
        report: &mut Report,
        file: IngestFile,
    ) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.finish_oldest(stepper, idx, report, file).await?;
        }
        Ok(())
    }

    /// Ends the writer tasks and gives back the connections.
    async fn stop(self) -> anyhow::Result<DbContext> {
        let mut connections = Vec::new();
        for writer in self.writers {
            drop(writer.jobs);
            connections.push(writer.task.await.context("a database writer failed")?);
        }
        let mut connections = connections.into_iter();
        let Some((client, sink)) = connections.next() else {
            bail!("internal error: no database connection");
        };
        Ok(DbContext {
            client,
            sink,
            second: connections.next(),
        })
    }
}

/// One writer: runs the transactions sent to it, each committed only on its turn. Stops at
/// the first error (the transaction rolls back) or when the jobs end.
async fn write_transactions(
    mut client: Client,
    sink: Sink,
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    done: tokio::sync::mpsc::Sender<anyhow::Result<Done>>,
) -> (Client, Sink) {
    while let Some(job) = jobs.recv().await {
        let Job::Begin { turn } = job else {
            let _ = done
                .send(Err(anyhow::anyhow!(
                    "internal error: a transaction's rows came before it began"
                )))
                .await;
            break;
        };
        let result = async {
            let tx = client
                .transaction()
                .await
                .context("could not start a transaction")?;
            let mut outcomes = Vec::new();
            let seq = loop {
                match jobs.recv().await {
                    Some(Job::Rows(rows)) => {
                        let refs: Vec<VectorRow> = rows
                            .iter()
                            .map(|row| VectorRow {
                                id: &row.id,
                                vector: &row.vector,
                                content_sha256: &row.sha256,
                            })
                            .collect();
                        let written = sink.write(&tx, &refs).await?;
                        outcomes.extend(rows.into_iter().map(|row| row.id).zip(written));
                    }
                    Some(Job::Commit { seq }) => break seq,
                    // The ingest stopped: roll back.
                    Some(Job::Begin { .. }) | None => {
                        bail!("the ingest stopped before this transaction was complete")
                    }
                }
            };
            turn.await.map_err(|_| {
                anyhow::anyhow!("the ingest stopped before this transaction's turn to commit")
            })?;
            tx.commit()
                .await
                .context("could not commit the ingest transaction")?;
            anyhow::Ok(Done { seq, outcomes })
        }
        .await;
        let failed = result.is_err();
        if done.send(result).await.is_err() || failed {
            break;
        }
    }
    (client, sink)
}

fn load_chunks(path: &std::path::Path) -> anyhow::Result<HashMap<String, ChunkEntry>> {
    let reader = BufReader::new(fs_err::File::open(path).with_context(|| {
        format!(
            "the batch's chunk list is missing; restore {} or plan the run again",
            path.display()
        )
    })?);
    let mut chunks = HashMap::new();
    tsv::for_each_record(reader, |fields| {
        let mut fields = fields.into_iter();
        if let (Some(id), Some(sha256)) = (fields.next(), fields.next()) {
            chunks.insert(
                id,
                ChunkEntry {
                    sha256,
                    seen: false,
                },
            );
        }
        Ok(())
    })?;
    Ok(chunks)
}

/// Opens `failed_chunk_ids.tsv`: new with a header, or cut back to `resume_len` bytes.
fn open_failed_file(
    path: &std::path::Path,
    resume_len: Option<u64>,
) -> anyhow::Result<BufWriter<fs_err::File>> {
    let mut file = fs_err::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    match resume_len {
        Some(len) => {
            file.set_len(len)?;
            file.seek(SeekFrom::End(0))?;
            Ok(BufWriter::new(file))
        }
        None => {
            file.set_len(0)?;
            let mut writer = BufWriter::new(file);
            tsv::write_record(&mut writer, &["id", "reason", "retryable"])?;
            Ok(writer)
        }
    }
}

fn finish_failed_file(mut failed: BufWriter<fs_err::File>) -> anyhow::Result<()> {
    failed.flush()?;
    failed.get_ref().sync_all()?;
    Ok(())
}

/// Marks as seen the chunks named by the lines of `path` before byte `limit`.
fn mark_seen_before(
    path: &std::path::Path,
    limit: u64,
    chunks: &mut HashMap<String, ChunkEntry>,
) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        custom_id: Option<String>,
    }
    if limit == 0 {
        return Ok(());
    }
    let mut reader = BufReader::new(fs_err::File::open(path)?);
    let mut line = Vec::new();
    let mut offset = 0u64;
    while offset < limit {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if let Ok(IdOnly {
            custom_id: Some(id),
        }) = serde_json::from_slice(&line)
            && let Some(entry) = chunks.get_mut(&id)
        {
            entry.seen = true;
        }
    }
    Ok(())
}
