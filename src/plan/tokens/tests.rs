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
