use super::*;
use proptest::prelude::*;

fn ok_line(id: &str, embedding: &str) -> String {
    format!(
        r#"{{"id":"r1","custom_id":"{id}","response":{{"status_code":200,"request_id":"q","body":{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{embedding}}}],"model":"m","usage":{{"prompt_tokens":1,"total_tokens":1}}}}}},"error":null}}"#
    )
}

#[test]
fn float_and_base64_vectors_parse_alike() {
    let floats = ok_line("a", "[0.5,-0.25,1e-3]");
    let b64 = base64::engine::general_purpose::STANDARD.encode(
        [0.5f32, -0.25, 1e-3]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let base64_line = ok_line("a", &format!("\"{b64}\""));
    let want = LineOutcome::Vector {
        custom_id: "a".to_owned(),
        vector: vec![0.5, -0.25, 1e-3],
    };
    assert_eq!(parse_line(&floats, 3), want);
    assert_eq!(parse_line(&base64_line, 3), want);
}

#[test]
fn floats_read_exactly_as_f32() {
    // The shortest forms that read back to these f32s exactly.
    for value in [0.1f32, 1.0e-38, 3.4028235e38, -0.000_123_45, 0.333_333_34] {
        let line = ok_line("a", &format!("[{value}]"));
        assert_eq!(
            parse_line(&line, 1),
            LineOutcome::Vector {
                custom_id: "a".to_owned(),
                vector: vec![value]
            }
        );
    }
    assert!(matches!(
        parse_line(&ok_line("a", "[NaN]"), 1),
        LineOutcome::Failed { .. }
    ));
    assert!(matches!(
        parse_line(&ok_line("a", "[1e999]"), 1),
        LineOutcome::Failed { .. }
    ));
}

#[test]
fn wrong_dimension_and_nan_are_bad_output() {
    let short = parse_line(&ok_line("a", "[0.5]"), 3);
    assert!(matches!(
        short,
        LineOutcome::Failed {
            reason: FailReason::BadOutput,
            ..
        }
    ));
    // JSON has no NaN, but a base64 vector can carry one.
    let nan = base64::engine::general_purpose::STANDARD.encode(f32::NAN.to_le_bytes());
    let line = ok_line("a", &format!("\"{nan}\""));
    let out = parse_line(&line, 1);
    assert!(
        matches!(&out, LineOutcome::Failed { reason: FailReason::BadOutput, custom_id: Some(id), .. } if id == "a"),
        "{out:?}"
    );
}

#[test]
fn error_shapes_map_to_reasons() {
    let http = r#"{"id":"r","custom_id":"b","response":{"status_code":429,"request_id":"q","body":{"error":{"message":"slow down","type":"rate_limit","param":null,"code":"rate_limit_exceeded"}}},"error":null}"#;
    let none = r#"{"id":"r","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"expired"}}"#;
    let bad = r#"{"id":"r","custom_id":"d","response":{"status_code":400,"body":{"error":{"message":"too many tokens","code":null}}},"error":null}"#;
    let reason = |line: &str| match parse_line(line, 3) {
        LineOutcome::Failed { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(reason(http), FailReason::RateLimited);
    assert_eq!(reason(none), FailReason::Expired);
    assert_eq!(reason(bad), FailReason::InvalidRequest);
    assert!(!FailReason::InvalidRequest.is_retryable());
    assert!(FailReason::Expired.is_retryable());
    assert_eq!(reason("{truncated"), FailReason::BadOutput);
}

/// The number parser's answer for a whole token, or `None` when it refuses it.
fn number(text: &str) -> Option<f32> {
    match parse_number(text.as_bytes(), 0) {
        Some((value, end)) if end == text.len() => Some(value),
        _ => None,
    }
}

#[test]
fn numbers_json_forbids_are_refused() {
    for bad in [
        "01", ".5", "1.", "+1", "-", "1e", "1e+", "NaN", "inf", "-inf", "0x1", "[1]",
    ] {
        assert_eq!(number(bad), None, "{bad:?}");
        assert!(parse_float_array(&format!("[{bad}]")).is_none(), "[{bad}]");
    }
    // Halfway between two f32s, and just off it: ties go to even, like std.
    for text in [
        "16777217",
        "16777217.0000001",
        "-16777219",
        "3.4028235e38",
        "1e-45",
    ] {
        assert_eq!(
            number(text).map(f32::to_bits),
            text.parse::<f32>().ok().map(f32::to_bits)
        );
    }
    assert_eq!(parse_float_array("[ 1 , -0.5e1 ]"), Some(vec![1.0, -5.0]));
    assert_eq!(parse_float_array("[1,]"), None);
    assert_eq!(parse_float_array("[1 2]"), None);
}

#[test]
fn the_fast_path_is_only_taken_where_the_embedding_belongs() {
    // An "embedding" key elsewhere in the line (here inside the error object) must not be
    // taken for the vector.
    let line = r#"{"custom_id":"a","error":{"embedding":[1,2,3],"code":null},"response":{"status_code":200,"body":{"data":[{"embedding":[0.5,0.25,4]}]}}}"#;
    assert_eq!(
        parse_line(line, 3),
        LineOutcome::Vector {
            custom_id: "a".to_owned(),
            vector: vec![0.5, 0.25, 4.0]
        }
    );
}

fn reason_of(outcome: &LineOutcome) -> Option<(Option<&str>, FailReason)> {
    match outcome {
        LineOutcome::Failed {
            custom_id, reason, ..
        } => Some((custom_id.as_deref(), *reason)),
        LineOutcome::Vector { .. } => None,
    }
}

fn items_line(items: &str) -> String {
    format!(
        r#"{{"custom_id":"a","response":{{"status_code":200,"body":{{"object":"list","data":[{items}]}}}},"error":null}}"#
    )
}

#[test]
fn of_several_items_the_one_of_index_0_is_taken() {
    let vector = |v: &[f32]| LineOutcome::Vector {
        custom_id: "a".to_owned(),
        vector: v.to_vec(),
    };
    // Index 0 second: the fast path decoded the first item, which is not the one.
    let line = items_line(r#"{"index":1,"embedding":[9,9]},{"index":0,"embedding":[0.5,0.25]}"#);
    assert_eq!(parse_line(&line, 2), vector(&[0.5, 0.25]));
    let line = items_line(r#"{"index":0,"embedding":[0.5,0.25]},{"index":1,"embedding":[9,9]}"#);
    assert_eq!(parse_line(&line, 2), vector(&[0.5, 0.25]));
    // A lone item without an index is the request's one input.
    assert_eq!(
        parse_line(&items_line(r#"{"embedding":[1,2]}"#), 2),
        vector(&[1.0, 2.0])
    );
    for bad in [
        r#"{"index":1,"embedding":[1,2]}"#,
        r#"{"index":1,"embedding":[1,2]},{"index":2,"embedding":[1,2]}"#,
        r#"{"index":0,"embedding":[1,2]},{"index":0,"embedding":[3,4]}"#,
        r#"{"embedding":[1,2]},{"embedding":[3,4]}"#,
        "",
    ] {
        let out = parse_line(&items_line(bad), 2);
        assert_eq!(
            reason_of(&out),
            Some((Some("a"), FailReason::BadOutput)),
            "{bad}: {out:?}"
        );
    }
}

#[test]
fn an_all_zero_vector_is_bad_output() {
    for zeros in ["[0,0,0]", "[0.0,-0.0,0e5]"] {
        let out = parse_line(&ok_line("a", zeros), 3);
        assert_eq!(
            reason_of(&out),
            Some((Some("a"), FailReason::BadOutput)),
            "{out:?}"
        );
    }
    let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 12]);
    let out = parse_line(&ok_line("a", &format!("\"{zeros}\"")), 3);
    assert_eq!(reason_of(&out), Some((Some("a"), FailReason::BadOutput)));
    assert!(matches!(
        parse_line(&ok_line("a", "[0,0,1e-30]"), 3),
        LineOutcome::Vector { .. }
    ));
}

#[test]
fn a_line_that_is_not_utf8_is_bad_output_and_keeps_its_id_when_it_can() {
    let good = ok_line("chunk-7", "[0.5,0.25]");
    let mut broken = good.clone().into_bytes();
    // A stray byte inside the vector: the id is intact.
    let at = good.find("0.25").unwrap();
    broken.insert(at, 0xff);
    let out = parse_line_bytes(&broken, 2);
    assert_eq!(
        reason_of(&out),
        Some((Some("chunk-7"), FailReason::BadOutput)),
        "{out:?}"
    );
    // Inside the id: the id cannot be trusted.
    let mut broken = good.clone().into_bytes();
    broken.insert(good.find("chunk-7").unwrap() + 3, 0xc3);
    let out = parse_line_bytes(&broken, 2);
    assert_eq!(
        reason_of(&out),
        Some((None, FailReason::BadOutput)),
        "{out:?}"
    );
    assert_eq!(parse_line_bytes(good.as_bytes(), 2), parse_line(&good, 2));
}

proptest! {
    /// Bytes of any kind never panic the byte-level parser.
    #[test]
    fn never_panics_on_bytes(line in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_line_bytes(&line, 3);
    }

    /// The fast number parser agrees with std's (correctly rounded) parser bit for bit, on
    /// the shortest forms providers print and on longer and exponent forms.
    #[test]
    fn numbers_parse_as_std_does(bits in any::<u32>(), precision in 0usize..14) {
        let value = f32::from_bits(bits);
        prop_assume!(value.is_finite());
        for text in [
            format!("{value}"),
            format!("{value:e}"),
            format!("{value:.precision$}"),
            format!("{value:.precision$e}"),
            format!("{}", f64::from(value) * 1.000_000_1),
        ] {
            let want = text.parse::<f32>().map(f32::to_bits).ok();
            prop_assert_eq!(number(&text).map(f32::to_bits), want, "{}", text);
        }
    }

    /// Decimals within a hair of the halfway point between two f32s, where rounding
    /// through f64 first can go the wrong way.
    #[test]
    fn near_halfway_numbers_parse_as_std_does(bits in 0x0080_0000u32..0x7f00_0000, digits in 8usize..15) {
        let low = f64::from(f32::from_bits(bits));
        let high = f64::from(f32::from_bits(bits + 1));
        let halfway = (low + high) / 2.0;
        for text in [format!("{halfway:.digits$e}"), format!("{:.digits$e}", -halfway)] {
            let want = text.parse::<f32>().map(f32::to_bits).ok();
            prop_assert_eq!(number(&text).map(f32::to_bits), want, "{}", text);
        }
    }

    #[test]
    fn decimal_strings_parse_as_std_does(
        negative in any::<bool>(),
        int in "0|[1-9][0-9]{0,20}",
        frac in proptest::option::of("[0-9]{1,25}"),
        exp in proptest::option::of(-60i32..60),
    ) {
        let mut text = String::new();
        if negative { text.push('-'); }
        text.push_str(&int);
        if let Some(frac) = frac { text.push('.'); text.push_str(&frac); }
        if let Some(exp) = exp { text.push_str(&format!("e{exp}")); }
        let want = text.parse::<f32>().map(f32::to_bits).ok();
        prop_assert_eq!(number(&text).map(f32::to_bits), want, "{}", text);
    }

    /// No line, however broken or huge, makes the parser panic.
    #[test]
    fn never_panics(line in ".{0,400}", dims in 0usize..8) {
        let _ = parse_line(&line, dims);
    }

    #[test]
    fn never_panics_on_mangled_valid_lines(cut in 0usize..300, junk in "[\\[\\]{}\",:0-9a-z.eE+-]{0,20}") {
        let line = ok_line("x", "[0.1,0.2,0.3]");
        let cut = cut.min(line.len());
        let mangled = format!("{}{}{}", &line[..cut], junk, &line[cut..]);
        let _ = parse_line(&mangled, 3);
    }
}

/// Voyage's documented result and error lines (docs.voyageai.com, "Batch inference").
#[test]
fn voyage_result_and_error_lines_are_read() {
    let ok = r#"{"batch_id":"batch-abc123","custom_id":"task_0","response":{"status_code":200,"body":{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25]}],"model":"voyage-3.5","usage":{"total_tokens":33}}},"error":null}"#;
    assert_eq!(
        parse_line(ok, 2),
        LineOutcome::Vector {
            custom_id: "task_0".to_owned(),
            vector: vec![0.5, -0.25],
        }
    );
    let server = r#"{"batch_id":"batch-abc123","custom_id":"task_1","response":{"status_code":500,"message":"Internal Server Error"},"error":null}"#;
    assert_eq!(
        parse_line(server, 2),
        LineOutcome::Failed {
            custom_id: Some("task_1".to_owned()),
            reason: FailReason::ServerError,
            detail: "HTTP 500 Internal Server Error".to_owned(),
        }
    );
    let refused = r#"{"batch_id":"b","custom_id":"task_3","response":{"status_code":400,"body":{"detail":"Input is too long"}},"error":null}"#;
    assert_eq!(
        parse_line(refused, 2),
        LineOutcome::Failed {
            custom_id: Some("task_3".to_owned()),
            reason: FailReason::InvalidRequest,
            detail: "HTTP 400 Input is too long".to_owned(),
        }
    );
    let expired = r#"{"batch_id":"batch-abc123","custom_id":"task_2","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
    assert_eq!(
        reason_of(&parse_line(expired, 2)),
        Some((Some("task_2"), FailReason::Expired))
    );
}

/// Gemini's result and error lines (ai.google.dev, Batch API: `{"key", "response"}` and
/// `{"key", "error"}`); vectors are scaled to length 1, as Gemini leaves those below 3,072
/// dimensions unnormalised.
#[test]
fn gemini_result_and_error_lines_are_read_and_normalised() {
    let ok = r#"{"key":"task_0","response":{"embedding":{"values":[3.0,-4.0]},"tokenCount":"12"}}"#;
    assert_eq!(
        parse_line(ok, 2),
        LineOutcome::Vector {
            custom_id: "task_0".to_owned(),
            vector: vec![0.6, -0.8],
        }
    );
    let unit = r#"{"key":"u","response":{"embedding":{"values":[0.0,1.0]}}}"#;
    assert_eq!(
        parse_line(unit, 2),
        LineOutcome::Vector {
            custom_id: "u".to_owned(),
            vector: vec![0.0, 1.0],
        }
    );
    let cases = [
        (
            r#"{"key":"a","error":{"code":13,"message":"boom","status":"INTERNAL"}}"#,
            FailReason::ServerError,
        ),
        (
            r#"{"key":"a","error":{"code":4,"message":"late","status":"DEADLINE_EXCEEDED"}}"#,
            FailReason::Expired,
        ),
        (
            r#"{"key":"a","error":{"code":3,"message":"too long","status":"INVALID_ARGUMENT"}}"#,
            FailReason::InvalidRequest,
        ),
        (
            r#"{"key":"a","error":{"code":429,"message":"slow down","status":"RESOURCE_EXHAUSTED"}}"#,
            FailReason::RateLimited,
        ),
        (r#"{"key":"a","error":{"code":1}}"#, FailReason::Cancelled),
        // Neither a response nor an error: an error line, retried.
        (r#"{"key":"a"}"#, FailReason::ServerError),
        (
            r#"{"key":"a","response":{"tokenCount":"3"}}"#,
            FailReason::BadOutput,
        ),
    ];
    for (line, reason) in cases {
        assert_eq!(
            reason_of(&parse_line(line, 2)),
            Some((Some("a"), reason)),
            "{line}"
        );
    }
    assert_eq!(
        reason_of(&parse_line(
            r#"{"key":"z","response":{"embedding":{"values":[0,0]}}}"#,
            2
        )),
        Some((Some("z"), FailReason::BadOutput))
    );
    assert_eq!(
        reason_of(&parse_line(r#"{"key":7,"response":{}}"#, 2)),
        Some((None, FailReason::BadOutput))
    );
}
