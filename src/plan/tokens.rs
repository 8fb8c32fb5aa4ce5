//! Token counting with the cl100k_base encoding, the tokenizer of every embedding model embatch
//! knows (DESIGN §2), and cutting a text down to a token budget for `--on-too-long truncate`.
//!
//! This module owns only the arithmetic on text: it does not decide what a too-long chunk
//! becomes (skip, truncate or fail is the plan's policy), does not know about models, and does
//! no I/O. The byte-pair encoding is `bpe-openai`'s, which produces the same tokens as OpenAI's
//! own tiktoken (checked against `tiktoken-rs` in the tests below).
//!
//! Counting is plan's main cost, so [`count_tokens`] adds two things around it, both exact:
//! - cl100k_base encodes each pre-tokenizer piece (a word with its leading space, a run of
//!   digits or punctuation, a whitespace run) on its own, so a piece's count never changes;
//!   each thread remembers the counts of the short pieces it met ([`MEMO_CAPACITY`] at most),
//!   and prose repeats its words.
//! - Most of a chunk is ASCII. There the pre-tokenizer's pattern reduces to byte classes, and
//!   `split` cuts pieces without the regex engine (which also takes and returns a shared
//!   cache on every piece); a piece that a non-ASCII character could change is cut by
//!   `bpe-openai`'s own splitter.
//!
//! Measured with `cargo run --release --example bench` (README, Performance).

use std::cell::RefCell;

use bpe_openai::Tokenizer;
use bpe_openai::byte_pair_encoding::BytePairEncoding;

/// The largest input the embeddings endpoint takes, in tokens. The provider's documents say
/// 8,191 in some places and 8,192 in others; a chunk at 8,192 that the API then refuses would
/// cost a failed request and a retry batch, so we take the safe one.
pub const MAX_INPUT_TOKENS: usize = 8191;

/// Pieces whose counts a thread remembers at most: 7/8 of 65,536, so that the table is
/// allocated once with 65,536 slots of 8 bytes, and the pieces' bytes take a few hundred KB
/// more (under 1 MB per counting thread). Once full it keeps what it has: the pieces met first
/// include the frequent ones.
pub const MEMO_CAPACITY: usize = 57_344;

/// Longer pieces (rare: words are short, numbers are cut in threes) are counted each time.
const MEMO_MAX_PIECE: usize = 24;

/// The counts of the pieces a thread has met: the pieces' bytes one after the other, and a
/// hash table of (start, length, count) over them. (Measured: a table of `Box<[u8]>` keys
/// took 3.4 MB per thread and was 7 % slower on prose; keys of a fixed 16 bytes, padded, were
/// a third slower on the demo's text.)
struct Memo {
    table: hashbrown::HashTable<(u32, u8, u8)>,
    bytes: Vec<u8>,
}

impl Memo {
    fn new() -> Memo {
        Memo {
            table: hashbrown::HashTable::with_capacity(MEMO_CAPACITY),
            bytes: Vec::new(),
        }
    }

    fn hash(piece: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&rustc_hash::FxBuildHasher, piece)
    }

    fn piece(bytes: &[u8], (start, len, _): (u32, u8, u8)) -> &[u8] {
        let start = start as usize;
        &bytes[start..start + usize::from(len)]
    }

    fn get(&self, hash: u64, piece: &[u8]) -> Option<usize> {
        self.table
            .find(hash, |&entry| Self::piece(&self.bytes, entry) == piece)
            .map(|&(_, _, n_tokens)| usize::from(n_tokens))
    }

    /// Remembers `piece` (at most MEMO_MAX_PIECE bytes, so at most that many tokens) unless
    /// the memory is full.
    fn insert(&mut self, hash: u64, piece: &[u8], n_tokens: usize) {
        if self.table.len() >= MEMO_CAPACITY {
            return;
        }
        let (Ok(start), Ok(len), Ok(n_tokens)) = (
            u32::try_from(self.bytes.len()),
            u8::try_from(piece.len()),
            u8::try_from(n_tokens),
        ) else {
            return;
        };
        self.bytes.extend_from_slice(piece);
        let bytes = &self.bytes;
        self.table
            .insert_unique(hash, (start, len, n_tokens), |&entry| {
                Self::hash(Self::piece(bytes, entry))
            });
    }
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::new());
}

fn cl100k() -> &'static Tokenizer {
    bpe_openai::cl100k_base()
}

/// Builds the tokenizer's tables now (a tenth of a second or so, once per process) and counts
/// one short text, so that a caller can have it done on another thread while it waits for
/// the database.
///
/// Call it on a thread that counts nothing afterwards (or ends), before counting on several
/// threads. The pre-tokenizer
/// regex keeps its scratch caches in a pool that gives the first thread to use it a private
/// slot; measured here, two threads counting while one of them held that slot ran at the speed
/// of one (65 MB/s on the 2-core development machine), and at 105 MB/s once the slot belonged
/// to a thread that had ended. (Only text that is not pure ASCII still goes through it.)
pub fn warm_up() {
    let _ = cl100k().count("warm up \u{e9}");
}

/// Exact cl100k_base token count of `text`, as the provider counts (and bills) it.
///
/// bpe-openai knows no special tokens, so a marker such as `<|endoftext|>` in a chunk counts
/// as ordinary text (tiktoken's `encode_ordinary`), a few tokens rather than one.
pub fn count_tokens(text: &str) -> usize {
    let tokenizer = cl100k();
    let count = |memo: &mut Memo| {
        let mut n_tokens = 0;
        let mut add = |piece: &[u8]| n_tokens += count_piece(memo, &tokenizer.bpe, piece);
        split(tokenizer, text, &mut add);
        n_tokens
    };
    // The memory is this thread's; it is gone only while the thread ends.
    MEMO.try_with(|memo| count(&mut memo.borrow_mut()))
        .unwrap_or_else(|_| count(&mut Memo::new()))
}

/// The count of one pre-tokenizer piece, remembered.
fn count_piece(memo: &mut Memo, bpe: &BytePairEncoding, piece: &[u8]) -> usize {
    if piece.len() > MEMO_MAX_PIECE {
        return bpe.count(piece);
    }
    let hash = Memo::hash(piece);
    if let Some(n_tokens) = memo.get(hash, piece) {
        return n_tokens;
    }
    let n_tokens = bpe.count(piece);
    memo.insert(hash, piece, n_tokens);
    n_tokens
}

/// Byte classes of ASCII for the pre-tokenizer: letters (`\p{L}`), digits (`\p{N}`),
/// whitespace (`\s`, Unicode White_Space: tab, LF, VT, FF, CR, space), line ends (`[\r\n]`),
/// and everything else, control characters included (`[^\s\p{L}\p{N}]`).
const LETTER: u8 = 1;
const DIGIT: u8 = 2;
const SPACE: u8 = 4;
const LINE_END: u8 = 8;
const OTHER: u8 = 16;

const CLASS: [u8; 128] = {
    let mut class = [OTHER; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        class[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'\n' || c == b'\r' {
            SPACE | LINE_END
        } else if c == b' ' || c == b'\t' || c == 0x0b || c == 0x0c {
            SPACE
        } else {
            OTHER
        };
        b += 1;
    }
    class
};

/// Splits `text` into the pieces of cl100k_base's pre-tokenizer, in order, as
/// `tokenizer.split` does: where the text is ASCII by [`ascii_piece`], elsewhere by the
/// library, one piece at a time.
///
/// The library cuts each piece with an anchored match on the rest of the text, so asking it
/// for the first piece of `text[start..]` gives the piece it would cut at `start`.
fn split<'t>(tokenizer: &Tokenizer, text: &'t str, mut each: impl FnMut(&'t [u8])) {
    let bytes = text.as_bytes();
    let len = bytes.len();
    let mut start = 0;
    // The first non-ASCII byte at or after `start`, or the end.
    let mut ascii_end = 0;
    while start < len {
        if ascii_end <= start {
            ascii_end = bytes[start..]
                .iter()
                .position(|b| !b.is_ascii())
                .map_or(len, |i| start + i);
        }
        let n = match ascii_piece(&bytes[start..ascii_end], ascii_end == len) {
            Some(n) => n,
            None => text
                .get(start..)
                .and_then(|rest| tokenizer.split(rest).next())
                .map_or(len - start, str::len),
        };
        // Every pattern matches at least one character; the guard only keeps the loop finite.
        let end = (start + n.max(1)).min(len);
        each(&bytes[start..end]);
        start = end;
    }
}

/// The length of the pre-tokenizer's first piece of the ASCII bytes `text`, or `None` when
/// `text` is followed by more (`whole` false) and that first piece could depend on it.
///
/// The pattern, as bpe-openai writes tiktoken's look-ahead `\s+(?!\S)` (a match of the second
/// pattern gives back its last character), is tried in this order, the first that matches
/// winning:
///
/// ```text
/// (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,3}
///   | ' '?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+$        then  \s+\s (look-ahead)  then  \s+
/// ```
///
/// A piece decided by the byte that ends it is certain when that byte is inside `text`; a
/// whitespace piece depends on the whole whitespace run (which non-ASCII spaces continue).
/// The tests compare every piece with bpe-openai's own splitter.
fn ascii_piece(text: &[u8], whole: bool) -> Option<usize> {
    let len = text.len();
    let class = |i: usize| text.get(i).map_or(0, |&b| CLASS[usize::from(b & 0x7f)]);
    let run = |mut i: usize, of: u8| {
        while class(i) & of != 0 {
            i += 1;
        }
        i
    };
    let here = class(0);
    let (end, decided_by) = if len == 0 {
        return None;
    } else if let Some(n) = contraction(text) {
        (n, n)
    } else if here & LETTER != 0 {
        let end = run(0, LETTER);
        (end, end)
    } else if here & (LINE_END | DIGIT) == 0 && class(1) & LETTER != 0 {
        // One character that is no letter, digit or line end, then letters.
        let end = run(1, LETTER);
        (end, end)
    } else if here & DIGIT != 0 {
        let end = (1..3.min(len))
            .find(|&i| class(i) & DIGIT == 0)
            .unwrap_or(3.min(len));
        (end, end)
    } else if text[0] == b' ' && class(1) & OTHER != 0 {
        let end = run(run(1, OTHER), LINE_END);
        (end, end)
    } else if here & OTHER != 0 {
        let end = run(run(0, OTHER), LINE_END);
        (end, end)
    } else {
        // Whitespace: up to its last line end, else to the end of the text, else all but
        // its last character (which goes with what follows), else the single character.
        let stop = run(0, SPACE);
        let end = match (0..stop).rev().find(|&i| class(i) & LINE_END != 0) {
            Some(last) => last + 1,
            None if stop == len || stop == 1 => stop,
            None => stop - 1,
        };
        (end, stop)
    };
    (whole || decided_by < len).then_some(end)
}

/// The length of an English contraction (`'s`, `'T`, `'re`, `'LL`…) at the start of `text`.
fn contraction(text: &[u8]) -> Option<usize> {
    let lower = |i: usize| text.get(i).map(u8::to_ascii_lowercase);
    if text.first() != Some(&b'\'') {
        return None;
    }
    match (lower(1)?, lower(2)) {
        (b's' | b't' | b'm' | b'd', _) => Some(2),
        (b'r' | b'v', Some(b'e')) | (b'l', Some(b'l')) => Some(3),
        _ => None,
    }
}

/// Cuts `text` to at most `limit` tokens and returns the prefix with its own token count.
///
/// The cut falls on a token boundary of the whole text that is also a char boundary, so the
/// result is always a prefix of `text`. When `text` already fits it comes back whole. The
/// returned count is the count of the prefix tokenized on its own, which is what the provider
/// will see; it can differ from the number of tokens the prefix took inside the whole text
/// (the pre-tokenizer looks ahead, so the end of a prefix may split differently), and the cut
/// moves back until that recount fits.
pub fn truncate_to_tokens(text: &str, limit: usize) -> (String, usize) {
    let tokenizer = cl100k();

    // Fast path: `count_till_limit` stops early on long texts, so checking whether a text fits
    // costs O(limit) rather than O(text). cl100k_base does no normalization, so this borrows.
    let normalized = tokenizer.normalize(text);
    if let Some(n_tokens) = tokenizer.count_till_limit(&normalized, limit) {
        return (text.to_owned(), n_tokens);
    }

    let tokens = tokenizer.encode(text);
    let mut n_kept = tokens.len().min(limit);
    loop {
        // Reaching zero tokens always ends the loop: the empty prefix decodes and counts 0.
        let Some(prefix) = tokenizer.decode(&tokens[..n_kept]) else {
            // The cut split a multi-byte character across tokens: a UTF-8 char spans at most
            // four bytes, so stepping back a token at a time ends within a few steps.
            n_kept -= 1;
            continue;
        };
        let n_prefix_tokens = count_tokens(&prefix);
        if n_prefix_tokens <= limit {
            debug_assert!(text.starts_with(prefix.as_str()));
            return (prefix, n_prefix_tokens);
        }
        // Re-tokenizing the prefix found more tokens than we kept. Step back by the excess
        // (at least one token) rather than one by one, so a large gap closes in a few rounds.
        n_kept = n_kept.saturating_sub((n_prefix_tokens - limit).max(1));
    }
}

#[cfg(test)]
mod tests;
