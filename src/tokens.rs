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
//!   [`split`] cuts pieces without the regex engine (which also takes and returns a shared
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// tiktoken's own count, the reference bpe-openai must agree with. `encode_ordinary`
    /// treats `<|endoftext|>` and friends as plain text, as `count_tokens` does; the
    /// `encode_with_special_tokens` variant would turn such a marker into one special token.
    fn tiktoken_count(text: &str) -> usize {
        tiktoken_rs::cl100k_base_singleton()
            .encode_ordinary(text)
            .len()
    }

    /// Equipment-manual prose of the kind the chunks table holds: numbers, units, punctuation,
    /// code-like lines, tables, unicode, emoji, whitespace runs, tabs and CRLF line ends.
    const MANUAL_TEXTS: &[&str] = &[
        "Hydraulic Press HP-4000 — Maintenance Manual, rev. 3.2 (2019-07-14)\n\n\
         1. Before servicing, isolate the unit: turn the main breaker (Q1) to OFF and lock it out.\n\
         2. Bleed residual pressure via valve V-12 until the gauge reads 0 bar (±0.5).\n\
         WARNING: Stored energy in the accumulator can exceed 210 bar / 3,045 psi!!!\n",
        "Torque specs:\n\
         \tM8  bolts ....... 25 N·m\n\
         \tM10 bolts ....... 49 N·m\n\
         \tM12 bolts ....... 85 N·m   (do NOT exceed; use a calibrated wrench)\n\
         \n\n\n    Note:    values assume dry threads;   reduce by 20% if lubricated.   \n",
        "Error codes\r\n\
         E001  Overtemperature (>85°C) — check fan F2 & filter.\r\n\
         E017  Encoder fault; see §4.3.2.\r\n\
         E255  Unknown: call service +49 (0)89 1234-5678 or email support@example.com\r\n",
        "```\n$ sudo systemctl restart plc-gateway.service\n$ curl -s http://10.0.0.12:8080/api/v1/status | jq '.axes[0].position_mm'\n{\"ok\": true, \"temp_c\": 41.5, \"rpm\": 1_450}\nfn main() { println!(\"{}\", 0x1F_u8 << 2); }\n```\n",
        "Le compresseur doit être vérifié chaque 500 h. Die Spindel darf nicht über 12 000 min⁻¹ \
         laufen. 注意：電源を切ってから点検してください。Осторожно: высокое напряжение! \
         Ελέγξτε τη στάθμη λαδιού. בדוק את השמן. तेल की जाँच करें। 🔧⚙️🛠️ ✅ done ❌ failed 👍🏽 \
         👨‍👩‍👧 ﬁnish naïve café résumé Å Å (composed vs decomposed)",
        "   leading spaces and trailing spaces   \n\n\n\n\t\t\t\n \u{a0}non-breaking\u{a0}\u{a0}spaces\u{2003}em space\u{200b}zero-width\n\n",
        "Part no. 00-4711-ABC/rev.B; qty=12; price=$1,299.99 (ex. VAT 19%) — it's they're we'll I'd \
         IT'S THEY'RE don't can't <|endoftext|> <|fim_prefix|> ====== ------ ****** ...... ,,,,,,",
        "",
        " ",
        "\n",
        "a",
        "1234567890123456789",
    ];

    #[test]
    fn known_counts() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens("hello"), 1);
    }

    #[test]
    fn max_input_tokens_is_the_safe_limit() {
        assert_eq!(MAX_INPUT_TOKENS, 8191);
    }

    #[test]
    fn agrees_with_tiktoken_on_manual_prose() {
        for text in MANUAL_TEXTS {
            assert_eq!(count_tokens(text), tiktoken_count(text), "text: {text:?}");
        }
        // And on all of them together, a realistic chunk length of a few thousand tokens.
        let joined = MANUAL_TEXTS.concat().repeat(8);
        assert_eq!(count_tokens(&joined), tiktoken_count(&joined));
    }

    #[test]
    fn truncate_is_identity_when_under_limit() {
        let text = MANUAL_TEXTS[0];
        let n_tokens = count_tokens(text);
        assert_eq!(
            truncate_to_tokens(text, n_tokens),
            (text.to_owned(), n_tokens)
        );
        assert_eq!(
            truncate_to_tokens(text, n_tokens + 100),
            (text.to_owned(), n_tokens)
        );
        assert_eq!(truncate_to_tokens("", 0), (String::new(), 0));
    }

    #[test]
    fn truncate_long_multibyte_text() {
        let text = "héllo wörld 日本語 🔧 ".repeat(5_000);
        let n_tokens = count_tokens(&text);
        assert!(
            n_tokens > MAX_INPUT_TOKENS,
            "the test text must be too long"
        );
        for limit in [0, 1, 2, 3, 7, 100, MAX_INPUT_TOKENS] {
            let (prefix, n_prefix_tokens) = truncate_to_tokens(&text, limit);
            assert!(text.starts_with(&prefix), "limit {limit}: not a prefix");
            assert!(
                n_prefix_tokens <= limit,
                "limit {limit}: {n_prefix_tokens} tokens"
            );
            assert_eq!(n_prefix_tokens, count_tokens(&prefix));
            // A cut that keeps almost nothing would be useless to the caller: the prefix
            // should use most of the budget (a multi-token character may cost a few tokens).
            assert!(
                n_prefix_tokens + 4 >= limit,
                "limit {limit}: only {n_prefix_tokens}"
            );
        }
    }

    #[test]
    fn truncate_to_zero_is_empty() {
        assert_eq!(truncate_to_tokens("hello world", 0), (String::new(), 0));
    }

    /// Words, punctuation, digits, unicode, emoji and whitespace of the kinds the pre-tokenizer
    /// treats differently (contractions, whitespace runs before words, CR/LF runs).
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "the", "valve", "Pump", "PRESSURE", "café", "naïve", "über", "日本語", "点検",
                "Осторожно", "λάδι", "שמן", "तेल", "🔧", "⚙️", "👍🏽", "👨‍👩‍👧", "ﬁ", "e\u{301}",
            ])
            .prop_map(str::to_owned),
            2 => prop::sample::select(vec![
                ".", ",", ";", ":", "!", "?", "—", "-", "(", ")", "[", "]", "{", "}", "\"", "'",
                "'s", "'T", "'ll", "/", "\\", "$", "%", "°", "±", "·", "=>", "::", "//", "#",
                "<|endoftext|>", "...", "***", "```",
            ])
            .prop_map(str::to_owned),
            2 => prop::sample::select(vec![
                " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\u{a0}", "\u{2003}",
                "\u{200b}", "\u{3000}", "        ",
            ])
            .prop_map(str::to_owned),
            1 => (0u64..100_000_000).prop_map(|n| n.to_string()),
        ]
    }

    fn mixed_text() -> impl Strategy<Value = String> {
        prop::collection::vec(fragment(), 0..60).prop_map(|fragments| fragments.concat())
    }

    /// bpe-openai's own pieces of `text`, what [`split`] must reproduce.
    fn library_pieces(text: &str) -> Vec<&str> {
        cl100k().split(text).collect()
    }

    fn our_pieces(text: &str) -> Vec<&str> {
        let mut pieces = Vec::new();
        split(cl100k(), text, |piece| {
            pieces.push(std::str::from_utf8(piece).unwrap_or("<not UTF-8>"))
        });
        pieces
    }

    /// ASCII text weighted towards what the pre-tokenizer treats differently: apostrophes
    /// before the letters of contractions in both cases, every kind of whitespace (VT and FF
    /// included) in runs, CR/LF, digits, punctuation and control characters.
    fn ascii_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => prop::sample::select(vec![
                "'", "s", "S", "t", "T", "r", "R", "e", "E", "v", "m", "M", "l", "L", "d", "D", "x",
                "ab", " ", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "1", "22", "4444",
                ".", "(", "-", "_", "\x00", "\x1c", "\x1f", "\x7f", "/", "\"",
            ])
            .prop_map(str::to_owned),
            1 => (0u8..128).prop_map(|b| char::from(b).to_string()),
            // Non-ASCII that continues a letter, digit or whitespace run, or stops one.
            1 => prop::sample::select(vec![
                "\u{e9}", "\u{17f}", "\u{a0}", "\u{85}", "\u{2028}", "\u{3000}", "\u{b0}", "\u{663}",
                "\u{2460}", "\u{65e5}", "\u{301}", "\u{1f527}",
            ])
            .prop_map(str::to_owned),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    #[test]
    fn split_matches_the_library_on_manual_prose() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let mut texts: Vec<String> = MANUAL_TEXTS.iter().map(|text| (*text).to_owned()).collect();
        texts.extend((0..200).map(|i| {
            crate::testkit::sample::chunk_text(
                &crate::testkit::sample::FAMILIES[i % crate::testkit::sample::FAMILIES.len()],
                &mut rng,
            )
        }));
        for text in &texts {
            assert_eq!(our_pieces(text), library_pieces(text), "text: {text:?}");
            assert_eq!(count_tokens(text), cl100k().count(text.as_str()));
        }
    }

    #[test]
    fn split_edge_cases() {
        for text in [
            "",
            " ",
            "  ",
            "a",
            "'s",
            "'S",
            "'re",
            "'Re",
            "'rE",
            "'r",
            "'l",
            "'ll",
            "'LLama",
            "'",
            "''s",
            "it's",
            "x  ",
            "x \n",
            " \n ",
            "\n\n  x",
            " \t x",
            "\t(x",
            " (x",
            "  (x",
            "1234567",
            " 12",
            "a.\r\n\r\nb",
            "\x0b\x0cx",
            "end   ",
            "a\x00b",
            "\x1c\x1dx",
            " \x7f\n",
            // ASCII next to characters that continue or end its pieces differently.
            "x\u{a0}y",
            "\n \u{a0}\n",
            "\n\u{a0}",
            "  \u{a0}",
            "'s\u{e9}",
            "'r\u{e9}",
            "'\u{17f}",
            "\u{e9}'s",
            "1\u{e9}",
            "123\u{e9}",
            "12\u{663}",
            "a \u{e9}",
            " \u{e9}",
            "  \u{e9}x",
            "\t\u{e9}",
            ".\u{e9}",
            "(\u{e9}",
            ".\u{b0}\n",
            " \u{85}x",
            "x\u{301}y",
            "\u{2028}\n",
            " \x0b.",
            "\x0c\x0c.",
            "\x0b",
        ] {
            assert_eq!(our_pieces(text), library_pieces(text), "text: {text:?}");
        }
    }

    #[test]
    fn the_memo_is_bounded_and_every_count_is_the_librarys() {
        // More distinct pieces than the memo holds: it is emptied and refilled, and every
        // count stays the library's.
        // Random words of one length, so that the table's buckets hold pieces that differ only
        // in their letters (and mostly in their counts, 1 to 4 tokens).
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
        let words: Vec<String> = (0..MEMO_CAPACITY + 100)
            .map(|_| {
                let letters: String = (0..6)
                    .map(|_| char::from(b'a' + rand::Rng::random_range(&mut rng, 0..26u8)))
                    .collect();
                format!(" {letters}")
            })
            .collect();
        for round in 0..2 {
            for word in &words {
                assert_eq!(
                    count_tokens(word),
                    cl100k().count(word.as_str()),
                    "round {round}"
                );
            }
            MEMO.with_borrow(|memo| assert!(memo.table.len() <= MEMO_CAPACITY));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_agrees_with_tiktoken_on_mixed_text(text in mixed_text()) {
            prop_assert_eq!(count_tokens(&text), tiktoken_count(&text));
        }

        #[test]
        fn prop_split_matches_the_library(text in ascii_text()) {
            prop_assert_eq!(our_pieces(&text), library_pieces(&text));
            prop_assert_eq!(count_tokens(&text), cl100k().count(text.as_str()));
        }

        #[test]
        fn prop_split_matches_the_library_on_any_string(text in any::<String>()) {
            prop_assert_eq!(our_pieces(&text), library_pieces(&text));
        }

        #[test]
        fn prop_split_matches_the_library_on_mixed_text(text in mixed_text()) {
            prop_assert_eq!(our_pieces(&text), library_pieces(&text));
        }

        #[test]
        fn prop_agrees_with_tiktoken_on_any_string(text in any::<String>()) {
            prop_assert_eq!(count_tokens(&text), tiktoken_count(&text));
        }

        #[test]
        fn prop_truncate_fits_and_is_a_prefix(text in mixed_text(), limit in 0usize..40) {
            let (prefix, n_prefix_tokens) = truncate_to_tokens(&text, limit);
            prop_assert!(text.starts_with(&prefix));
            prop_assert!(n_prefix_tokens <= limit);
            prop_assert_eq!(n_prefix_tokens, count_tokens(&prefix));
            if count_tokens(&text) <= limit {
                prop_assert_eq!(prefix, text);
            }
        }
    }
}
