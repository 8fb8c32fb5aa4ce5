//! The evidence files of a batch (DESIGN.md §9): `input.jsonl` (what is paid for) and
//! `chunks.tsv` (how each paid vector finds its chunk and the content hash it was made from).
//!
//! `plan` records the row count and sha256 of both in `run.json` ([`FileDigest`]). Before an
//! upload, `input.jsonl` must be the file planned: a changed one is never uploaded. Before an
//! upload and before an ingest, `chunks.tsv` must be the file planned, or is rebuilt from an
//! intact `input.jsonl` when that reproduces it exactly; otherwise the command stops, naming
//! the file and the way out, and the downloaded output stays where it is. This module only
//! reads and checks (and replaces `chunks.tsv` atomically); it does not write `run.json`.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::plan::tokens;
use crate::printer::Printer;
use crate::run::layout::{CHUNKS_FILE, INPUT_FILE, batch_dir};
use crate::run::store::{self, BatchRecord, FileDigest, OnTooLong, RunFile};
use crate::tsv;

const CHUNKS_HEADER: &str = "id\tsha256\ttokens";

/// Refuses to go on when `input.jsonl` of `batch` is not the file `plan` wrote (runs planned
/// before digests were recorded have nothing to compare with and pass).
pub fn check_input(run_dir: &Path, run: &RunFile, batch: &BatchRecord) -> anyhow::Result<()> {
    let Some(files) = &batch.files else {
        return Ok(());
    };
    let path = batch_dir(run_dir, &batch.name).join(INPUT_FILE);
    let found = digest_if_present(&path, 0)?;
    if found.as_ref() != Some(&files.input) {
        bail!(
            "{} {}, so batch {} was not uploaded (embatch never uploads a file other than the one planned); restore the file if you have a copy, or `embatch cancel --run-dir {}` and plan again (the new plan takes every chunk still without an embedding, family {})",
            path.display(),
            damage(found.as_ref(), &files.input),
            batch.name,
            run_dir.display(),
            run.family_id
        );
    }
    Ok(())
}

/// What [`ensure_chunks`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunksCheck {
    /// The file is the one planned (or, in a run without digests, complete and well formed).
    Intact,
    /// It was damaged and is now rebuilt, byte for byte, from `input.jsonl`.
    Rebuilt,
}

/// Makes sure `chunks.tsv` of `batch` is the file `plan` wrote, rebuilding it from an intact
/// `input.jsonl` when it is not; otherwise an error naming the file and the way out. `kept`
/// names what the command keeps for later (the downloaded output), for the message.
pub fn ensure_chunks(
    run_dir: &Path,
    run: &RunFile,
    batch: &BatchRecord,
    kept: Option<&Path>,
    printer: &Printer,
) -> anyhow::Result<ChunksCheck> {
    let dir = batch_dir(run_dir, &batch.name);
    let chunks_path = dir.join(CHUNKS_FILE);
    let input_path = dir.join(INPUT_FILE);
    let way_out = WayOut {
        run_dir,
        run,
        kept,
        chunks_path: &chunks_path,
    };
    let Some(files) = &batch.files else {
        // Planned before digests were recorded: nothing proves an input.jsonl intact, so a
        // damaged chunks.tsv cannot be rebuilt. Still, a short or garbled one is refused.
        return match check_unrecorded(&chunks_path, batch.requests) {
            Ok(()) => Ok(ChunksCheck::Intact),
            Err(problem) => bail!(
                "{} {problem}; this run was planned before embatch recorded digests of its files, so it cannot be rebuilt; {}",
                chunks_path.display(),
                way_out.text()
            ),
        };
    };
    let found = digest_if_present(&chunks_path, FileDigest::CHUNKS_HEADER_LINES)?;
    if found.as_ref() == Some(&files.chunks) {
        return Ok(ChunksCheck::Intact);
    }
    let chunks_damage = damage(found.as_ref(), &files.chunks);
    let input = digest_if_present(&input_path, 0)?;
    if input.as_ref() != Some(&files.input) {
        bail!(
            "{} {chunks_damage}, and it cannot be rebuilt because {} {} too; {}",
            chunks_path.display(),
            input_path.display(),
            damage(input.as_ref(), &files.input),
            way_out.text()
        );
    }
    let rebuilt = rebuild_chunks(&input_path, &dir)?;
    let digest = FileDigest::of_file(rebuilt.path(), FileDigest::CHUNKS_HEADER_LINES)?;
    if digest != files.chunks {
        let why = if run.settings.on_too_long == OnTooLong::Truncate {
            " (this run truncates inputs over the token limit: chunks.tsv holds the hash of each chunk's whole content, which input.jsonl does not hold for a truncated one)"
        } else {
            ""
        };
        bail!(
            "{} {chunks_damage}, and rebuilding it from {} does not give back the file planned{why}; {}",
            chunks_path.display(),
            input_path.display(),
            way_out.text()
        );
    }
    rebuilt
        .persist(&chunks_path)
        .map_err(|err| err.error)
        .with_context(|| format!("could not replace {}", chunks_path.display()))?;
    store::sync_dir(&dir)?;
    printer.warn(&format!(
        "{} {chunks_damage}; rebuilt it from {}, which is intact (the rebuilt file matches the digest recorded at plan time)",
        chunks_path.display(),
        input_path.display()
    ));
    Ok(ChunksCheck::Rebuilt)
}

/// The end of a refusal about `chunks.tsv`: how to get out of it.
struct WayOut<'a> {
    run_dir: &'a Path,
    run: &'a RunFile,
    kept: Option<&'a Path>,
    chunks_path: &'a Path,
}

impl WayOut<'_> {
    fn text(&self) -> String {
        let kept = match self.kept {
            Some(kept) => format!(" ({} is kept)", kept.display()),
            None => String::new(),
        };
        format!(
            "restore {} from a copy and run the command again{kept}; without a copy, its chunks cannot be matched to their vectors safely: `embatch cancel --run-dir {}` and plan them again with `embatch plan --family-id {} --force` (they are paid for again)",
            self.chunks_path.display(),
            self.run_dir.display(),
            self.run.family_id
        )
    }
}

/// The file's digest, or `None` when it does not exist.
pub(crate) fn digest_if_present(
    path: &Path,
    header_lines: u64,
) -> anyhow::Result<Option<FileDigest>> {
    match FileDigest::of_file(path, header_lines) {
        Ok(digest) => Ok(Some(digest)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(anyhow::Error::from(err)),
    }
}

/// How a file differs from its recorded digest, for messages.
pub(crate) fn damage(found: Option<&FileDigest>, planned: &FileDigest) -> String {
    match found {
        None => "is missing".to_owned(),
        Some(found) => format!(
            "differs from the file planned ({} rows, sha256 {}…; run.json records {} rows, sha256 {}…)",
            found.rows,
            short(&found.sha256),
            planned.rows,
            short(&planned.sha256)
        ),
    }
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// OpenAI's and Voyage's line (`custom_id`, `body.input`), or Gemini's (`key`,
/// `request.content.parts[0].text`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RequestLine<'a> {
    Openai {
        #[serde(borrow)]
        custom_id: Cow<'a, str>,
        #[serde(borrow)]
        body: RequestBody<'a>,
    },
    Gemini {
        #[serde(borrow)]
        key: Cow<'a, str>,
        #[serde(borrow)]
        request: GeminiRequest<'a>,
    },
}

#[derive(Deserialize)]
struct GeminiRequest<'a> {
    #[serde(borrow)]
    content: GeminiContent<'a>,
}

#[derive(Deserialize)]
struct GeminiContent<'a> {
    #[serde(borrow)]
    parts: Vec<GeminiPart<'a>>,
}

#[derive(Deserialize)]
struct GeminiPart<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RequestBody<'a> {
    #[serde(borrow)]
    input: RequestInput<'a>,
}

/// OpenAI's line carries its one input as a string, Voyage's as an array of one string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RequestInput<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    List(#[serde(borrow)] Vec<Cow<'a, str>>),
}

/// Calls `each(custom_id, input text)` for every request line of an `input.jsonl`, in order,
/// one line at a time. A line that is not a request line is an error naming it.
pub(crate) fn for_each_request(
    input_path: &Path,
    mut each: impl FnMut(&str, &str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, fs_err::File::open(input_path)?);
    let mut line = Vec::with_capacity(64 * 1024);
    let mut line_no = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let request: RequestLine = serde_json::from_slice(&line).with_context(|| {
            format!(
                "line {line_no} of {} is not a request line",
                input_path.display()
            )
        })?;
        let (custom_id, body) = match &request {
            RequestLine::Openai { custom_id, body } => (custom_id, body),
            RequestLine::Gemini { key, request } => match request.content.parts.as_slice() {
                [part] => {
                    each(key, &part.text)?;
                    continue;
                }
                parts => anyhow::bail!(
                    "line {line_no} of {} carries {} parts, not one",
                    input_path.display(),
                    parts.len()
                ),
            },
        };
        let input = match &body.input {
            RequestInput::One(text) => text,
            RequestInput::List(texts) => match texts.as_slice() {
                [text] => text,
                _ => anyhow::bail!(
                    "line {line_no} of {} carries {} inputs, not one",
                    input_path.display(),
                    texts.len()
                ),
            },
        };
        each(custom_id, input)?;
    }
}

/// Writes, into a temp file beside `input_path`, the `chunks.tsv` that `plan` wrote for these
/// requests: id = custom_id, sha256 of the input text's UTF-8, its tokens. Streams.
fn rebuild_chunks(input_path: &Path, dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    // tempfile creates the file with mode 0600.
    let temp = tempfile::Builder::new()
        .prefix(".tmp-chunks-")
        .tempfile_in(dir)
        .with_context(|| format!("could not write a file in {}", dir.display()))?;
    let mut out = BufWriter::new(temp.as_file());
    tsv::write_record(&mut out, &["id", "sha256", "tokens"])?;
    for_each_request(input_path, |custom_id, input| {
        let hash = hex::encode(Sha256::digest(input.as_bytes()));
        let n_tokens = tokens::count_tokens(input).to_string();
        tsv::write_record(&mut out, &[custom_id, &hash, &n_tokens])?;
        Ok(())
    })?;
    out.flush()?;
    drop(out);
    temp.as_file().sync_all()?;
    Ok(temp)
}

/// A `chunks.tsv` without a recorded digest: its header, then exactly `requests` records of an
/// id, a 64-digit lowercase hex sha256 and a token count. `Err` says what is wrong.
pub(crate) fn check_unrecorded(path: &Path, requests: u64) -> Result<(), String> {
    let file = match fs_err::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err("is missing".to_owned());
        }
        Err(err) => return Err(format!("cannot be read ({err})")),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut records = 0u64;
    let mut line_no = 0u64;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => return Err(format!("cannot be read ({err})")),
        }
        line_no += 1;
        let Some(text) = line
            .strip_suffix(b"\n")
            .and_then(|l| std::str::from_utf8(l).ok())
        else {
            return Err(format!(
                "is damaged (line {line_no} is cut short or not UTF-8)"
            ));
        };
        if line_no == 1 {
            if text != CHUNKS_HEADER {
                return Err("is damaged (its header line is not `id sha256 tokens`)".to_owned());
            }
            continue;
        }
        let fields: Vec<&str> = text.split('\t').collect();
        let well_formed = match fields.as_slice() {
            [id, sha256, n_tokens] => {
                !id.is_empty()
                    && sha256.len() == 64
                    && sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    && n_tokens.parse::<u64>().is_ok()
            }
            _ => false,
        };
        if !well_formed {
            return Err(format!(
                "is damaged (line {line_no} is not id, sha256, tokens)"
            ));
        }
        records += 1;
    }
    if line_no == 0 {
        return Err("is damaged (it is empty)".to_owned());
    }
    if records != requests {
        return Err(format!(
            "is damaged (it lists {records} chunks; the batch has {requests} requests)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs_err::write(path, text).unwrap();
    }

    #[test]
    fn the_digest_counts_rows_and_hashes_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write(&path, "id\tsha256\ttokens\na\tb\t1\n");
        let digest = FileDigest::of_file(&path, 1).unwrap();
        assert_eq!(digest.rows, 1);
        assert_eq!(
            digest.sha256,
            hex::encode(Sha256::digest(b"id\tsha256\ttokens\na\tb\t1\n"))
        );
        // A last line without its newline is a row too; an empty file has none.
        write(&path, "x\ny");
        assert_eq!(FileDigest::of_file(&path, 0).unwrap().rows, 2);
        write(&path, "");
        assert_eq!(FileDigest::of_file(&path, 1).unwrap().rows, 0);
    }

    #[test]
    fn a_chunk_list_without_a_digest_must_be_complete_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHUNKS_FILE);
        let hash = "a".repeat(64);
        let good = format!("{CHUNKS_HEADER}\nid1\t{hash}\t3\nid2\t{hash}\t4\n");
        write(&path, &good);
        assert_eq!(check_unrecorded(&path, 2), Ok(()));
        let short = check_unrecorded(&path, 3).unwrap_err();
        assert!(short.contains("lists 2 chunks"), "{short}");
        write(&path, &good[..good.len() - 5]);
        assert!(check_unrecorded(&path, 2).is_err());
        write(&path, &good.replace("\t3\n", "\tx\n"));
        assert!(check_unrecorded(&path, 2).is_err());
        write(&path, &good.replace(CHUNKS_HEADER, "garbage"));
        assert!(check_unrecorded(&path, 2).is_err());
        write(&path, "");
        assert!(check_unrecorded(&path, 0).is_err());
        assert_eq!(
            check_unrecorded(&dir.path().join("none"), 0),
            Err("is missing".to_owned())
        );
    }

    #[test]
    fn a_rebuilt_chunk_list_is_what_plan_writes() {
        a_rebuilt_chunk_list_is_what_plan_writes_for(crate::models::Provider::Openai);
    }

    #[test]
    fn a_rebuilt_chunk_list_is_what_plan_writes_for_voyage() {
        a_rebuilt_chunk_list_is_what_plan_writes_for(crate::models::Provider::Voyage);
    }

    #[test]
    fn a_rebuilt_chunk_list_is_what_plan_writes_for_gemini() {
        a_rebuilt_chunk_list_is_what_plan_writes_for(crate::models::Provider::Gemini);
    }

    fn a_rebuilt_chunk_list_is_what_plan_writes_for(provider: crate::models::Provider) {
        use crate::models::EncodingFormat;
        use crate::plan::request::RequestTemplate;
        let dir = tempfile::tempdir().unwrap();
        let template = RequestTemplate {
            model: "text-embedding-3-small".to_owned(),
            dimensions: None,
            encoding_format: EncodingFormat::Float,
            provider,
            task_type: None,
        };
        let rows = [
            ("id-1", "Grease the bearing every 200 hours."),
            (
                "id\t2",
                "Unicode: Überdruckventil prüfen — \"quoted\"\nnew line",
            ),
        ];
        let mut input = Vec::new();
        let mut planned = Vec::new();
        tsv::push_record(&mut planned, &["id", "sha256", "tokens"]);
        for (id, content) in rows {
            template.write_line(id, content, &mut input);
            let hash = hex::encode(Sha256::digest(content.as_bytes()));
            let n = tokens::count_tokens(content).to_string();
            tsv::push_record(&mut planned, &[id, &hash, &n]);
        }
        let input_path = dir.path().join(INPUT_FILE);
        fs_err::write(&input_path, &input).unwrap();
        let rebuilt = rebuild_chunks(&input_path, dir.path()).unwrap();
        assert_eq!(fs_err::read(rebuilt.path()).unwrap(), planned);
    }
}
