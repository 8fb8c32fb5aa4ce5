//! Token counting with the cl100k_base encoding, the tokenizer of every embedding model embatch
//! knows (DESIGN §2), and cutting a text down to a token budget for `--on-too-long truncate`.
//!
//! This module owns only the arithmetic on text: it does not decide what a too-long chunk
//! becomes (skip, truncate or fail is the plan's policy), does not know about models, and does
//! no I/O. Counting goes through `bpe-openai`, which produces the same tokens as OpenAI's own
//! tiktoken (checked against `tiktoken-rs` in the tests below) and counts without building the
//! token list.

use bpe_openai::Tokenizer;

/// The largest input the embeddings endpoint takes, in tokens. The provider's documents say
/// 8,191 in some places and 8,192 in others; a chunk at 8,192 that the API then refuses would
/// cost a failed request and a retry batch, so we take the safe one.
pub const MAX_INPUT_TOKENS: usize = 8191;

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
/// to a thread that had ended.
pub fn warm_up() {
    let _ = cl100k().count("warm up");
}

/// Exact cl100k_base token count of `text`, as the provider counts (and bills) it.
///
/// bpe-openai knows no special tokens, so a marker such as `<|endoftext|>` in a chunk counts
/// as ordinary text (tiktoken's `encode_ordinary`), a few tokens rather than one.
pub fn count_tokens(text: &str) -> usize {
    cl100k().count(text)
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_agrees_with_tiktoken_on_mixed_text(text in mixed_text()) {
            prop_assert_eq!(count_tokens(&text), tiktoken_count(&text));
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
