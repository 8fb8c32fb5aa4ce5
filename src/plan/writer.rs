//! The batch writer: rows in, batch folders out (`input.jsonl`, `chunks.tsv`, `skipped.tsv`),
//! as the sharder places them. Rows are prepared (tokens, hash, request line) on worker threads,
//! in rounds, and written in id order on the caller's thread. `plan` writes a run with it, and
//! the retry planning of `advance` writes retry batches with it.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::bail;
use sha2::{Digest, Sha256};

use crate::pg::source::{ChunkRow, PendingRow};
use crate::plan::request::RequestTemplate;
use crate::plan::sharder::{BatchTally, ItemSize, Placement, Sharder};
use crate::plan::tokens;
use crate::run::folders::HeldChunks;
use crate::run::layout::{CHUNKS_FILE, INPUT_FILE, batch_dir, batch_name};
use crate::run::state::{BatchState, Planned};
use crate::run::store::{self, BatchRecord, OnTooLong};
use crate::tsv;

/// Why a chunk is never sent (the `reason` of `skipped.tsv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SkipReason {
    Empty,
    TooLong,
    TooLargeForBatch,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Empty => "empty",
            SkipReason::TooLong => "too_long",
            SkipReason::TooLargeForBatch => "too_large_for_batch",
        }
    }
}

/// Creates a folder (and its missing parents) readable by its owner only.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    make_private_dir(path, true)
}

pub(super) fn make_private_dir(path: &Path, recursive: bool) -> std::io::Result<()> {
    // fs-err has no DirBuilder: name the folder in the error ourselves.
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(path)
        .map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("failed to create directory `{}`: {err}", path.display()),
            )
        })
}

/// What the writer produced.
pub(crate) struct Written {
    pub(crate) batches: Vec<BatchRecord>,
    pub(crate) chunks: u64,
    pub(crate) tokens: u64,
    pub(crate) truncated: u64,
    pub(crate) skipped: BTreeMap<SkipReason, u64>,
    /// Chunks left out, per holding run (indexes of `HeldChunks::runs`).
    pub(super) held: Vec<u64>,
}

/// The batch being filled.
struct OpenBatch {
    name: String,
    dir: PathBuf,
    input: BufWriter<fs_err::File>,
    chunks: BufWriter<fs_err::File>,
    /// Bytes of `input` written since its writeback was last started.
    unsynced: u64,
}

/// How often the writeback of a batch file being written is started (see
/// [`start_writeback`]).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Asks the kernel to start writing the file's dirty pages to disk now, without waiting, so
/// that the fsync when the batch is sealed has little left to do and the plan does not stall
/// on it. Only a hint: nothing depends on it, and where it is not available it does nothing.
fn start_writeback(file: &fs_err::File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for
        // as long as `file` is borrowed. Offset 0 and length 0 mean the whole file.
        let _ = unsafe {
            libc::sync_file_range(file.file().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// How new batches are named and what they record about their origin.
#[derive(Debug, Clone)]
pub struct Numbering {
    /// Number of the first batch written (`batch_001` is 1).
    pub first: usize,
    pub attempt: u32,
    pub retry_of: Vec<String>,
}

impl Numbering {
    pub const FIRST_ATTEMPT: Numbering = Numbering {
        first: 1,
        attempt: 1,
        retry_of: Vec::new(),
    };
}

/// The batch folders being written: the open batch and the records of the sealed ones.
struct BatchFiles {
    run_dir: PathBuf,
    numbering: Numbering,
    open: Option<OpenBatch>,
    written: Written,
}

impl BatchFiles {
    fn open_next(&mut self) -> anyhow::Result<()> {
        let name = batch_name(self.numbering.first + self.written.batches.len());
        let dir = batch_dir(&self.run_dir, &name);
        create_private_dir(&dir)?;
        let input = BufWriter::with_capacity(1 << 20, fs_err::File::create(dir.join(INPUT_FILE))?);
        let mut chunks = BufWriter::new(fs_err::File::create(dir.join(CHUNKS_FILE))?);
        tsv::write_record(&mut chunks, &["id", "sha256", "tokens"])?;
        self.open = Some(OpenBatch {
            name,
            dir,
            input,
            chunks,
            unsynced: 0,
        });
        Ok(())
    }

    /// Flushes and fsyncs the open batch, and records it with the sharder's tally.
    fn seal(&mut self, tally: BatchTally) -> anyhow::Result<()> {
        let Some(open) = self.open.take() else {
            bail!("internal error: sealing a batch that was never opened");
        };
        for writer in [open.input, open.chunks] {
            let file = writer.into_inner().map_err(|err| err.into_error())?;
            file.sync_all()?;
        }
        store::sync_dir(&open.dir)?;
        // The evidence of what was written, read back from disk (DESIGN.md §9).
        let files = store::BatchFiles {
            input: store::FileDigest::of_file(&open.dir.join(INPUT_FILE), 0)?,
            chunks: store::FileDigest::of_file(
                &open.dir.join(CHUNKS_FILE),
                store::FileDigest::CHUNKS_HEADER_LINES,
            )?,
        };
        self.written.batches.push(BatchRecord {
            name: open.name,
            attempt: self.numbering.attempt,
            retry_of: self.numbering.retry_of.clone(),
            requests: u64::from(tally.requests),
            bytes: tally.bytes,
            tokens: tally.tokens,
            files: Some(files),
            state: BatchState::Planned(Planned::default()),
        });
        Ok(())
    }
}

/// A round of rows prepared ahead, off the writing thread: for each row its id, and for a
/// sendable one its token count, request line and `chunks.tsv` record, the lines and records
/// of the round packed one after the other so that a run of rows going to the same batch is
/// written with one call.
struct PreparedRound {
    ids: String,
    lines: Vec<u8>,
    records: Vec<u8>,
    rows: Vec<PreparedRow>,
}

struct PreparedRow {
    /// Where the id is in [`PreparedRound::ids`].
    id: Range<usize>,
    prep: Prep,
}

enum Prep {
    /// No content, or only whitespace: never sent.
    Empty,
    /// Within the model's input limit; where its line and record are in the round.
    Ready {
        n_tokens: usize,
        line: Range<usize>,
        record: Range<usize>,
    },
    /// Over the model's input limit: what `--on-too-long` decides needs the content.
    TooLong {
        n_tokens: usize,
        hash: String,
        content: String,
    },
}

impl PreparedRound {
    fn with_capacity(rows: usize) -> PreparedRound {
        PreparedRound {
            ids: String::with_capacity(rows * 40),
            lines: Vec::with_capacity(rows * 1024),
            records: Vec::with_capacity(rows * 120),
            rows: Vec::with_capacity(rows),
        }
    }

    /// Prepares one row: counts its tokens, hashes its content (sha256 of the content as
    /// stored, even when a truncated prefix is sent: ingest compares it with the row's current
    /// content) and writes its request line and record.
    fn push(&mut self, template: &RequestTemplate, id: &str, content: Option<&str>) {
        let start = self.ids.len();
        self.ids.push_str(id);
        let id_range = start..self.ids.len();
        let prep = match content {
            Some(content) if !content.trim().is_empty() => {
                let n_tokens = tokens::count_tokens(content);
                let mut hex = [0u8; 64];
                // 32 bytes always fit 64 hex digits.
                let hash = hex::encode_to_slice(Sha256::digest(content.as_bytes()), &mut hex)
                    .ok()
                    .and_then(|()| std::str::from_utf8(&hex).ok())
                    .unwrap_or_default();
                if template.is_too_long(content, n_tokens) {
                    Prep::TooLong {
                        n_tokens,
                        hash: hash.to_owned(),
                        content: content.to_owned(),
                    }
                } else {
                    self.ready(template, id, content, hash, n_tokens)
                }
            }
            _ => Prep::Empty,
        };
        self.rows.push(PreparedRow { id: id_range, prep });
    }

    /// Writes the request line of `input` and the record of a sendable row.
    fn ready(
        &mut self,
        template: &RequestTemplate,
        id: &str,
        input: &str,
        hash: &str,
        n_tokens: usize,
    ) -> Prep {
        let line_start = self.lines.len();
        template.write_line(id, input, &mut self.lines);
        let record_start = self.records.len();
        tsv::push_record(&mut self.records, &[id, hash, &n_tokens.to_string()]);
        Prep::Ready {
            n_tokens,
            line: line_start..self.lines.len(),
            record: record_start..self.records.len(),
        }
    }

    /// A round of one row ready to send, with `input` as its request's text.
    fn single_ready(
        template: &RequestTemplate,
        id: &str,
        input: &str,
        hash: &str,
        n_tokens: usize,
    ) -> PreparedRound {
        let mut round = PreparedRound::with_capacity(1);
        round.ids.push_str(id);
        let prep = round.ready(template, id, input, hash, n_tokens);
        round.rows.push(PreparedRow {
            id: 0..id.len(),
            prep,
        });
        round
    }
}

/// Streams chunks into batch folders as the sharder decides. The decisions (sharding, token
/// limits) belong to the sharder and tokens modules; this only applies them and writes.
pub(crate) struct RunWriter<'a> {
    template: RequestTemplate,
    on_too_long: OnTooLong,
    held: &'a HeldChunks,
    sharder: Sharder,
    files: BatchFiles,
    skipped_file: BufWriter<fs_err::File>,
    /// Started by the first [`RunWriter::add_many`].
    preparer: Option<Preparer>,
}

/// Rounds of rows being prepared (tokens, hash, request line) on two worker threads while
/// this thread fetches and writes: a round in, its prepared rows out, written in order.
struct Preparer {
    rounds: Option<std::sync::mpsc::SyncSender<(u64, Vec<PendingRow>)>>,
    prepared: std::sync::mpsc::Receiver<(u64, anyhow::Result<PreparedRound>)>,
    /// Rounds prepared out of order, waiting for an earlier one.
    early: BTreeMap<u64, anyhow::Result<PreparedRound>>,
    next_in: u64,
    next_out: u64,
}

/// Rounds in flight at most: enough that the workers stay busy while this thread seals a
/// batch or waits for rows; memory stays a few MB (measured at 100,000 rows: 512 × 8 was
/// 4 % faster than 1,024 × 4 and 256 × 16 no better).
const ROUNDS_IN_FLIGHT: u64 = 8;

impl Preparer {
    fn start(template: &RequestTemplate) -> Preparer {
        let (rounds, inbox) = std::sync::mpsc::sync_channel::<(u64, Vec<PendingRow>)>(2);
        let inbox = std::sync::Arc::new(std::sync::Mutex::new(inbox));
        let (outbox, prepared) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let inbox = std::sync::Arc::clone(&inbox);
            let outbox = outbox.clone();
            let template = template.clone();
            std::thread::spawn(move || {
                loop {
                    // A poisoned lock means the other worker panicked: stop too.
                    let next = match inbox.lock() {
                        Ok(inbox) => inbox.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, rows)) = next else { return };
                    let prepared = Self::prepare(&template, &rows);
                    // The rows (and the server's buffers they point into) are freed here.
                    drop(rows);
                    if outbox.send((seq, prepared)).is_err() {
                        return;
                    }
                }
            });
        }
        Preparer {
            rounds: Some(rounds),
            prepared,
            early: BTreeMap::new(),
            next_in: 0,
            next_out: 0,
        }
    }

    fn prepare(template: &RequestTemplate, rows: &[PendingRow]) -> anyhow::Result<PreparedRound> {
        let mut round = PreparedRound::with_capacity(rows.len());
        for row in rows {
            round.push(template, row.id()?, row.content()?);
        }
        Ok(round)
    }

    /// The next round in order, waiting for it; `None` when every round sent came back.
    fn next_ready(&mut self) -> anyhow::Result<Option<PreparedRound>> {
        if self.next_out == self.next_in {
            return Ok(None);
        }
        loop {
            if let Some(ready) = self.early.remove(&self.next_out) {
                self.next_out += 1;
                return ready.map(Some);
            }
            let Ok((seq, round)) = self.prepared.recv() else {
                bail!("internal error: the plan's tokenizer threads stopped");
            };
            self.early.insert(seq, round);
        }
    }
}

/// Rows of a round placed in the open batch one after the other, not yet written: where their
/// lines and records are in the round, written with one call each.
struct Run {
    lines: Range<usize>,
    records: Range<usize>,
}

impl<'a> RunWriter<'a> {
    /// `skipped_path` receives the chunks that cannot be sent; it is created with a header
    /// line, or appended to when it exists.
    pub(crate) fn new(
        run_dir: &Path,
        template: RequestTemplate,
        on_too_long: OnTooLong,
        limits: crate::plan::sharder::BatchLimits,
        held: &'a HeldChunks,
        numbering: Numbering,
        skipped_path: &Path,
    ) -> anyhow::Result<RunWriter<'a>> {
        let exists = skipped_path.exists();
        let file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(skipped_path)?;
        let mut skipped_file = BufWriter::new(file);
        if !exists {
            tsv::write_record(&mut skipped_file, &["id", "reason"])?;
        }
        Ok(RunWriter {
            template,
            on_too_long,
            held,
            sharder: Sharder::new(limits),
            files: BatchFiles {
                run_dir: run_dir.to_path_buf(),
                numbering,
                open: None,
                written: Written {
                    batches: Vec::new(),
                    chunks: 0,
                    tokens: 0,
                    truncated: 0,
                    skipped: BTreeMap::new(),
                    held: vec![0; held.runs.len()],
                },
            },
            skipped_file,
            preparer: None,
        })
    }

    fn skip(&mut self, id: &str, reason: SkipReason) -> anyhow::Result<()> {
        tsv::write_record(&mut self.skipped_file, &[id, reason.as_str()])?;
        *self.files.written.skipped.entry(reason).or_insert(0) += 1;
        Ok(())
    }

    /// Adds one row, after every row given before; prepared on this thread.
    pub(crate) fn add(&mut self, row: ChunkRow) -> anyhow::Result<()> {
        while self.write_next_round()? {}
        let mut round = PreparedRound::with_capacity(1);
        round.push(&self.template, &row.id, row.content.as_deref());
        self.write_round(&round)
    }

    /// Adds `rows` in order, as [`RunWriter::add`] one by one would, after every row given
    /// before. The costly part of each row (tokens, hash, request line) is computed on two
    /// worker threads, a few rounds ahead; placing and writing stay on this thread, in order.
    /// [`RunWriter::finish`] writes the rounds still in flight.
    pub(crate) fn add_many(&mut self, rows: Vec<PendingRow>) -> anyhow::Result<()> {
        let template = &self.template;
        let preparer = self
            .preparer
            .get_or_insert_with(|| Preparer::start(template));
        let Some(rounds) = &preparer.rounds else {
            bail!("internal error: rows added after the plan's rounds ended");
        };
        if rounds.send((preparer.next_in, rows)).is_err() {
            bail!("internal error: the plan's tokenizer threads stopped");
        }
        preparer.next_in += 1;
        while self
            .preparer
            .as_ref()
            .is_some_and(|p| p.next_in - p.next_out >= ROUNDS_IN_FLIGHT)
        {
            self.write_next_round()?;
        }
        Ok(())
    }

    /// Writes the oldest prepared round; false when none is in flight.
    fn write_next_round(&mut self) -> anyhow::Result<bool> {
        let Some(preparer) = self.preparer.as_mut() else {
            return Ok(false);
        };
        let Some(round) = preparer.next_ready()? else {
            return Ok(false);
        };
        self.write_round(&round)?;
        Ok(true)
    }

    /// Places each row of a prepared round, in order, and writes it to its batch.
    fn write_round(&mut self, round: &PreparedRound) -> anyhow::Result<()> {
        let mut run = None;
        for row in &round.rows {
            let id = &round.ids[row.id.clone()];
            if !self.held.is_empty()
                && let Some(run_idx) = self.held.holder(id)
            {
                self.files.written.held[run_idx] += 1;
                continue;
            }
            match &row.prep {
                Prep::Empty => self.skip(id, SkipReason::Empty)?,
                Prep::Ready {
                    n_tokens,
                    line,
                    record,
                } => {
                    let item = ItemSize {
                        tokens: *n_tokens as u64,
                        line_bytes: line.len() as u64,
                    };
                    if self.place(id, item, round, &mut run)? {
                        self.gather(round, &mut run, line, record)?;
                        self.count(*n_tokens);
                    }
                }
                Prep::TooLong {
                    n_tokens,
                    hash,
                    content,
                } => {
                    // The rows gathered so far go first, to keep the order.
                    self.write_run(round, &mut run)?;
                    self.add_too_long(id, *n_tokens, hash, content)?;
                }
            }
        }
        self.write_run(round, &mut run)
    }

    /// Adds a placed row to the run of rows to write, after writing the run when the row does
    /// not follow it in the round (a row between them was left out).
    fn gather(
        &mut self,
        round: &PreparedRound,
        run: &mut Option<Run>,
        line: &Range<usize>,
        record: &Range<usize>,
    ) -> anyhow::Result<()> {
        if let Some(gathered) = run.as_mut() {
            if gathered.lines.end == line.start && gathered.records.end == record.start {
                gathered.lines.end = line.end;
                gathered.records.end = record.end;
                return Ok(());
            }
            self.write_run(round, run)?;
        }
        *run = Some(Run {
            lines: line.clone(),
            records: record.clone(),
        });
        Ok(())
    }

    fn count(&mut self, n_tokens: usize) {
        self.files.written.chunks += 1;
        self.files.written.tokens += n_tokens as u64;
    }

    /// Decides where a row goes. Before a new batch opens, the rows gathered for the one
    /// before are written. False when the row is skipped as too large for any batch.
    fn place(
        &mut self,
        id: &str,
        item: ItemSize,
        round: &PreparedRound,
        run: &mut Option<Run>,
    ) -> anyhow::Result<bool> {
        match self.sharder.place(item) {
            Placement::TooLarge(_) => {
                self.skip(id, SkipReason::TooLargeForBatch)?;
                return Ok(false);
            }
            Placement::StartsNew { sealed } => {
                self.write_run(round, run)?;
                self.files.seal(sealed)?;
                self.files.open_next()?;
            }
            Placement::Current if self.files.open.is_none() => self.files.open_next()?,
            Placement::Current => {}
        }
        Ok(true)
    }

    /// Writes the gathered rows of `round` to the open batch.
    fn write_run(&mut self, round: &PreparedRound, run: &mut Option<Run>) -> anyhow::Result<()> {
        let Some(Run { lines, records }) = run.take() else {
            return Ok(());
        };
        let Some(open) = self.files.open.as_mut() else {
            bail!("internal error: no open batch for placed rows");
        };
        open.input.write_all(&round.lines[lines.clone()])?;
        open.chunks.write_all(&round.records[records])?;
        open.unsynced += lines.len() as u64;
        if open.unsynced >= WRITEBACK_EVERY {
            open.unsynced = 0;
            start_writeback(open.input.get_ref());
        }
        Ok(())
    }

    /// A row over the model's input limit, as `--on-too-long` says: skipped, an error, or
    /// truncated (placed and written as a round of its own).
    fn add_too_long(
        &mut self,
        id: &str,
        n_tokens: usize,
        hash: &str,
        content: &str,
    ) -> anyhow::Result<()> {
        match self.on_too_long {
            OnTooLong::Skip => self.skip(id, SkipReason::TooLong),
            OnTooLong::Fail => bail!(
                "chunk {id} has {n_tokens} tokens, over the model's limit of {}; shorten it, or plan with --on-too-long skip or truncate",
                self.template.input_limit()
            ),
            OnTooLong::Truncate => {
                let (prefix, count) = self.template.truncate(content);
                self.files.written.truncated += 1;
                let single = PreparedRound::single_ready(&self.template, id, &prefix, hash, count);
                self.write_round(&single)
            }
        }
    }

    pub(crate) fn finish(mut self) -> anyhow::Result<Written> {
        while self.write_next_round()? {}
        if let Some(preparer) = self.preparer.as_mut() {
            // The workers end when their channel closes.
            preparer.rounds = None;
        }
        if let Some(tally) = self.sharder.finish() {
            self.files.seal(tally)?;
        }
        let file = self
            .skipped_file
            .into_inner()
            .map_err(|err| err.into_error())?;
        file.sync_all()?;
        Ok(self.files.written)
    }
}
