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
use std::path::PathBuf;

use anyhow::{Context, bail};
use tokio_postgres::Client;

use crate::output::{FailReason, LineOutcome, parse_line_bytes};
use crate::pg::conn::DbTarget;
use crate::pg::sink::{RowOutcome, Sink, VectorRow};
use crate::pg::source;
use crate::printer::Printer;
use crate::run::layout::{CHUNKS_FILE, ERRORS_FILE, FAILED_FILE, OUTPUT_FILE};
use crate::run::state::{
    Downloaded, IngestCounts, IngestFile, IngestOutcome, IngestProgress, LineAnomalies, Terminal,
};
use crate::run::store::RunFile;
use crate::tsv;

/// The database side of a stepper, connected on first need.
pub(crate) struct DbContext {
    client: Client,
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
    /// Opens the batch's failure report: new, or cut back to the saved checkpoint's length,
    /// with the figures saved there.
    fn open(job: &IngestJob) -> anyhow::Result<Report> {
        let resume = job.downloaded.progress;
        Ok(Report {
            failed: open_failed_file(
                &job.dir.join(FAILED_FILE),
                resume.map(|p| p.failed_file_len),
            )?,
            tally: Tally {
                counts: resume.map(|p| p.counts).unwrap_or_default(),
                anomalies: resume.map(|p| p.anomalies).unwrap_or_default(),
                to_retry: resume.map(|p| p.to_retry).unwrap_or_default(),
            },
            retry_allowed: job.retry_allowed,
            cancelled: job.cancelled,
        })
    }

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

impl DbContext {
    /// Takes a connection to the run's database: checks it is the one the run was planned
    /// against, warns about vector indexes that make updates slow, prepares the sink, and opens
    /// a second connection when it can.
    pub(crate) async fn open(
        client: Client,
        target: &DbTarget,
        run: &RunFile,
        overwrite: bool,
        printer: &Printer,
    ) -> anyhow::Result<DbContext> {
        let identity = source::database_identity(&client).await?;
        let planned = &run.database;
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
        let source = &run.settings.source;
        let indexes = crate::pg::sink::ann_indexes(&client, source).await?;
        for index in &indexes {
            printer.warn(&index.slow_write_warning(&source.table, &source.embedding_column));
        }
        let sink = Sink::prepare(&client, source, overwrite).await?;
        // Best effort: with one connection ingest is only slower.
        let second = match target.connect().await {
            Ok(other) => match Sink::prepare(&other, source, overwrite).await {
                Ok(other_sink) => Some((other, other_sink)),
                Err(_) => None,
            },
            Err(_) => None,
        };
        Ok(DbContext {
            client,
            sink,
            second,
        })
    }

    /// The first connection, for reads between ingests (retry planning).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
}

/// One downloaded batch to ingest: what the ingest needs of its run, owned, so that the caller
/// stays free to save the checkpoints the ingest reports.
pub(crate) struct IngestJob {
    /// The batch's folder (its `chunks.tsv`, output and error files, failure report).
    pub(crate) dir: PathBuf,
    pub(crate) name: String,
    /// The run's folder, named in the command that fetches a lost file again.
    pub(crate) run_dir: PathBuf,
    /// Requests in the batch: the length of the progress bar.
    pub(crate) requests: u64,
    pub(crate) downloaded: Downloaded,
    pub(crate) dims: usize,
    /// Rows per transaction (`--update-chunk-size`).
    pub(crate) update_chunk_size: usize,
    /// Attempts remain and the run is not cancelled: retryable failures are retried.
    pub(crate) retry_allowed: bool,
    pub(crate) cancelled: bool,
}

/// Where the ingest hands each checkpoint: the caller records it (in `run.json`) before the
/// next transaction may commit.
pub(crate) type SaveCheckpoint<'a> = dyn FnMut(IngestProgress) -> anyhow::Result<()> + 'a;

/// Ingests one downloaded batch, resuming from `job.downloaded.progress`. Its `chunks.tsv` must
/// have been checked against the run's evidence (`run::evidence::ensure_chunks`). After each
/// committed transaction `save` gets the position and figures to resume from; the connections
/// come back with the outcome (on an error they are dropped).
pub(crate) async fn ingest(
    db: DbContext,
    job: &IngestJob,
    printer: &Printer,
    save: &mut SaveCheckpoint<'_>,
) -> anyhow::Result<(IngestOutcome, DbContext)> {
    let resume = job.downloaded.progress;
    let mut chunks = load_chunks(&job.dir.join(CHUNKS_FILE))?;
    let files = files_to_read(job, &mut chunks)?;
    let statement_rows = Sink::MAX_ROWS_PER_STATEMENT.min(job.update_chunk_size.max(1));
    let mut run = Ingestion {
        report: Report::open(job)?,
        chunks,
        writers: Writers::start(db),
        group: Vec::with_capacity(statement_rows),
        statement_rows,
        rows_per_tx: job.update_chunk_size.max(1),
        dims: job.dims,
        bar: printer.row_bar("ingesting", job.requests),
    };
    for (file, name) in files {
        let start = match resume {
            Some(p) if p.file == file => p.offset,
            Some(p) if p.file == IngestFile::Errors && file == IngestFile::Output => continue,
            _ => 0,
        };
        run.file(job.dir.join(name), file, start, save).await?;
    }
    let Ingestion {
        mut report,
        chunks,
        writers,
        bar,
        ..
    } = run;
    let db = writers.stop().await?;
    bar.finish_and_clear();
    fail_unanswered(&chunks, job.downloaded.terminal, &mut report)?;
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

/// The files the provider returned for the batch, in the order they are read. On resume, the
/// ids of the lines before the saved position are marked seen, so that "the first line wins"
/// still holds.
fn files_to_read(
    job: &IngestJob,
    chunks: &mut HashMap<String, ChunkEntry>,
) -> anyhow::Result<Vec<(IngestFile, &'static str)>> {
    let downloaded = &job.downloaded;
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
        let path = job.dir.join(name);
        if !path.exists() {
            bail!(
                "{} is missing: batch {} was downloaded but not yet ingested; fetch it again with `embatch ingest --run-dir {} --redownload`",
                path.display(),
                job.name,
                job.run_dir.display()
            );
        }
    }
    if let Some(progress) = downloaded.progress {
        for (file, name) in &files {
            let limit = match (*file, progress.file) {
                (f, p) if f == p => progress.offset,
                (IngestFile::Output, IngestFile::Errors) => u64::MAX,
                _ => 0,
            };
            mark_seen_before(&job.dir.join(name), limit, chunks)?;
        }
    }
    Ok(files)
}

/// Reports the chunks no line spoke of, for the reason the batch's end gives.
fn fail_unanswered(
    chunks: &HashMap<String, ChunkEntry>,
    terminal: Terminal,
    report: &mut Report,
) -> anyhow::Result<()> {
    let reason = match terminal {
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
        report.fail(id, reason)?;
    }
    Ok(())
}

/// One ingest under way: its report, the batch's chunks, the writers and the rows gathered for
/// the next statement.
struct Ingestion {
    report: Report,
    chunks: HashMap<String, ChunkEntry>,
    writers: Writers,
    group: Vec<WriteRow>,
    /// Rows per statement and per transaction.
    statement_rows: usize,
    rows_per_tx: usize,
    dims: usize,
    bar: indicatif::ProgressBar,
}

impl Ingestion {
    /// Reads one file from byte `start` to its end, every transaction committed and
    /// checkpointed before it returns.
    async fn file(
        &mut self,
        path: PathBuf,
        file: IngestFile,
        start: u64,
        save: &mut SaveCheckpoint<'_>,
    ) -> anyhow::Result<()> {
        // Parsing (most of the CPU for float output) runs on its own thread, a bounded
        // channel ahead of this loop, so it overlaps with the database's work.
        let (sender, mut receiver) = tokio::sync::mpsc::channel(PARSED_BATCHES_IN_FLIGHT);
        let dims = self.dims;
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
            let seq = self.writers.next_seq;
            self.writers.make_room(&mut self.report, file, save).await?;
            self.writers.begin().await?;
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
                self.bar.inc(1);
                self.sort(outcome, &mut segment);
                if self.group.len() >= self.statement_rows {
                    rows_in_tx += self.group.len();
                    self.send_rows().await?;
                    if rows_in_tx >= self.rows_per_tx {
                        break;
                    }
                }
            }
            if !self.group.is_empty() {
                self.send_rows().await?;
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
            self.writers.commit(segment).await?;
        }
        // Every transaction of this file committed and checkpointed before the next file.
        self.writers.drain(&mut self.report, file, save).await
    }

    /// Where one line goes: a vector of a chunk not seen yet to the next statement, a failure
    /// or an anomaly to the transaction's segment (applied once it commits).
    fn sort(&mut self, outcome: LineOutcome, segment: &mut Segment) {
        match outcome {
            LineOutcome::Vector { custom_id, vector } => match self.chunks.get_mut(&custom_id) {
                None => segment.anomalies.unknown_custom_id += 1,
                Some(entry) if entry.seen => segment.anomalies.repeated_custom_id += 1,
                Some(entry) => {
                    entry.seen = true;
                    self.group.push(WriteRow {
                        id: custom_id,
                        vector,
                        sha256: entry.sha256.clone(),
                    });
                }
            },
            LineOutcome::Failed {
                custom_id: Some(custom_id),
                reason,
                detail: _,
            } => match self.chunks.get_mut(&custom_id) {
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
    }

    /// Sends the gathered rows to the current transaction as one statement.
    async fn send_rows(&mut self) -> anyhow::Result<()> {
        let rows = std::mem::replace(&mut self.group, Vec::with_capacity(self.statement_rows));
        self.writers.rows(rows).await
    }
}

/// After a commit: make the failure report durable, then hand over where to resume.
fn checkpoint(
    report: &mut Report,
    file: IngestFile,
    offset: u64,
    save: &mut SaveCheckpoint<'_>,
) -> anyhow::Result<()> {
    let (failed, tally) = (&mut report.failed, &report.tally);
    failed.flush()?;
    failed.get_ref().sync_all()?;
    let failed_file_len = failed.get_ref().metadata()?.len();
    crate::crashpoint::crashpoint("ingest_commit");
    save(IngestProgress {
        file,
        offset,
        counts: tally.counts,
        anomalies: tally.anomalies,
        to_retry: tally.to_retry,
        failed_file_len,
    })
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
        report: &mut Report,
        file: IngestFile,
        save: &mut SaveCheckpoint<'_>,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.writers.len() {
            self.finish_oldest(report, file, save).await?;
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
        report: &mut Report,
        file: IngestFile,
        save: &mut SaveCheckpoint<'_>,
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
        checkpoint(report, file, segment.end_offset, save)?;
        if let Some(turn) = self.waiting_turn.take() {
            let _ = turn.send(());
        }
        Ok(())
    }

    async fn drain(
        &mut self,
        report: &mut Report,
        file: IngestFile,
        save: &mut SaveCheckpoint<'_>,
    ) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.finish_oldest(report, file, save).await?;
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
        /// Gemini's result lines name the request `key`.
        #[serde(alias = "key")]
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
