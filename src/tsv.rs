//! TSV files of the run folder (`chunks.tsv`, `skipped.tsv`, `failed_chunk_ids.tsv`).
//!
//! Fields are escaped as Postgres's COPY text format does, so a user can load them with
//! `\copy … FROM 'chunks.tsv' WITH (HEADER)`. Owns escaping and the line format; it does not
//! decide which files exist.

use std::io::{self, BufRead, Write};

/// Appends `field` to `out`, escaped as COPY's text format (backslash, tab, newline, CR).
pub fn escape_into(field: &str, out: &mut Vec<u8>) {
    for byte in field.bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
}

/// Reverses [`escape_into`]; also accepts COPY's other backslash escapes (`\b \f \v`).
pub fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Writes one TSV record (fields escaped, tab-separated, newline-terminated).
pub fn write_record<W: Write>(writer: &mut W, fields: &[&str]) -> io::Result<()> {
    let mut line = Vec::with_capacity(64);
    push_record(&mut line, fields);
    writer.write_all(&line)
}

/// Appends one TSV record to `out`, as [`write_record`] writes it.
pub fn push_record(out: &mut Vec<u8>, fields: &[&str]) {
    for (idx, field) in fields.iter().enumerate() {
        if idx > 0 {
            out.push(b'\t');
        }
        escape_into(field, out);
    }
    out.push(b'\n');
}

/// Reads the records of a TSV file with a header line, calling `each` with the unescaped
/// fields of every data line. Streams: one line in memory at a time.
pub fn for_each_record<R: BufRead>(
    mut reader: R,
    mut each: impl FnMut(Vec<String>) -> io::Result<()>,
) -> io::Result<()> {
    let mut line = String::new();
    let mut is_header = true;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if is_header {
            is_header = false;
            continue;
        }
        let trimmed = line.strip_suffix('\n').unwrap_or(&line);
        if trimmed.is_empty() {
            continue;
        }
        each(trimmed.split('\t').map(unescape).collect())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_like_copy_text() {
        let mut out = Vec::new();
        escape_into("a\tb\nc\\d\re", &mut out);
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re");
    }

    proptest! {
        #[test]
        fn records_round_trip(fields in proptest::collection::vec(".*", 1..5)) {
            let mut buf = Vec::new();
            write_record(&mut buf, &["h"; 1]).unwrap();
            let refs: Vec<&str> = fields.iter().map(String::as_str).collect();
            write_record(&mut buf, &refs).unwrap();
            let mut seen = Vec::new();
            for_each_record(&buf[..], |rec| { seen.push(rec); Ok(()) }).unwrap();
            // An all-empty single field writes an empty line, which readers skip.
            if fields.len() == 1 && fields[0].is_empty() {
                prop_assert!(seen.is_empty());
            } else {
                prop_assert_eq!(seen, vec![fields]);
            }
        }
    }
}
