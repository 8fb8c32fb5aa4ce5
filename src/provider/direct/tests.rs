use super::*;
use crate::output::{FailReason, LineOutcome, parse_line};

fn item(id: &str, input: &str) -> Item {
    Item {
        custom_id: id.to_owned(),
        input: input.to_owned(),
    }
}

#[test]
fn file_ids_name_their_batch_and_nothing_else() {
    for id in [
        FileId::Input("batch_001".into()),
        FileId::Output("batch_012".into()),
        FileId::Errors("batch_003".into()),
    ] {
        assert_eq!(FileId::parse(&id.to_string()), Some(id));
    }
    assert_eq!(FileId::parse("file-abc"), None);
    assert_eq!(FileId::parse("direct-input-../../etc"), None);
    assert_eq!(FileId::parse("direct-other-batch_001"), None);
    assert_eq!(batch_of_job("direct-batch_001"), Some("batch_001"));
    assert_eq!(batch_of_job("direct-../x"), None);
    assert_eq!(batch_of_job("batch_x"), None);
}

#[test]
fn answer_lines_are_batch_output_lines() {
    let ok = success_line(&item("c1", "x"), "m", "[0.5,-0.25]");
    assert!(ok.ok);
    assert_eq!(
        parse_line(&ok.text, 2),
        LineOutcome::Vector {
            custom_id: "c1".into(),
            vector: vec![0.5, -0.25]
        }
    );
    for (status, reason) in [
        (400, FailReason::InvalidRequest),
        (429, FailReason::RateLimited),
        (500, FailReason::ServerError),
    ] {
        let line = error_line(&item("c\"2", "x"), status, "code", "it \"failed\"\nbadly");
        assert!(!line.ok);
        assert!(!line.text.contains('\n'));
        match parse_line(&line.text, 2) {
            LineOutcome::Failed {
                custom_id,
                reason: got,
                ..
            } => {
                assert_eq!(custom_id.as_deref(), Some("c\"2"));
                assert_eq!(got, reason);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_torn_tail_ends_the_answers() {
    let a = success_line(&item("a", ""), "m", "[1]").text;
    let b = error_line(&item("b", ""), 500, "server_error", "x").text;
    let c = success_line(&item("c", ""), "m", "[1]").text;
    let whole = format!("{a}\n{b}\n");
    let (answers, valid) = scan_answers(whole.as_bytes()).unwrap();
    assert_eq!(valid, whole.len() as u64);
    assert_eq!((answers.completed, answers.failed), (1, 1));
    assert_eq!(answers.answered.len(), 2);
    // A kill in the middle of the third line: it is not an answer, and is cut.
    for cut in [1, c.len() / 2, c.len()] {
        let torn = format!("{whole}{}", &c[..cut]);
        let (answers, valid) = scan_answers(torn.as_bytes()).unwrap();
        assert_eq!(valid, whole.len() as u64, "cut at {cut}");
        assert!(!answers.answered.contains("c"));
    }
    // A repeated custom_id counts once (the first line wins, as in ingest).
    let repeated = format!("{a}\n{a}\n");
    let (answers, _) = scan_answers(repeated.as_bytes()).unwrap();
    assert_eq!(answers.completed, 1);
}

#[test]
fn recover_cuts_the_file_to_its_last_complete_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("answers.jsonl");
    let a = success_line(&item("a", ""), "m", "[1]").text;
    fs_err::write(&path, format!("{a}\n{{\"custom_id\":\"b\",\"resp")).unwrap();
    let answers = recover_answers(&path).unwrap();
    assert_eq!(answers.answered.len(), 1);
    assert_eq!(fs_err::read_to_string(&path).unwrap(), format!("{a}\n"));
    assert_eq!(
        recover_answers(&dir.path().join("none")).unwrap(),
        Answers::default()
    );
}

fn input_file(dir: &Path, lines: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.join("input.jsonl");
    let text: String = lines
        .iter()
        .map(|(id, model, input)| {
            format!(
                "{}\n",
                serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": model, "input": input}})
            )
        })
        .collect();
    fs_err::write(&path, text).unwrap();
    path
}

#[test]
fn groups_skip_answered_lines_and_respect_every_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = input_file(
        dir.path(),
        &[
            ("1", "m", "aaaa"),
            ("2", "m", "bbbb"),
            ("3", "m", "cccc"),
            ("4", "m", "dddddddddddd"),
            ("5", "n", "eeee"),
            ("6", "n", "ffff"),
        ],
    );
    let opts = DirectOptions {
        inputs_per_request: 2,
        max_request_bytes: 10,
        ..DirectOptions::default()
    };
    let answered: HashSet<String> = ["2".to_owned()].into();
    let mut reader = InputReader::open(&path).unwrap();
    let groups = reader.next_groups(&answered, &opts, 10).unwrap();
    let ids: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.items.iter().map(|i| i.custom_id.as_str()).collect())
        .collect();
    // 2 is answered; 4 is over the byte cap alone; the model changes before 5.
    assert_eq!(ids, vec![vec!["1", "3"], vec!["4"], vec!["5", "6"]]);
    assert_eq!(groups[2].model, "n");
    assert_eq!(
        groups[0].body(),
        serde_json::json!({"model": "m", "input": ["aaaa", "cccc"]})
    );
    assert_eq!(reader.count_lines().unwrap(), 6);

    // A window of one group at a time reads every line once, in order.
    let mut reader = InputReader::open(&path).unwrap();
    let mut seen = Vec::new();
    let first = reader.next_groups(&HashSet::new(), &opts, 1).unwrap();
    // What is left unread still counts.
    let mut counting = InputReader::open(&path).unwrap();
    counting.next_groups(&HashSet::new(), &opts, 1).unwrap();
    assert_eq!(counting.count_lines().unwrap(), 6);
    seen.extend(first[0].items.iter().map(|i| i.custom_id.clone()));
    loop {
        let groups = reader.next_groups(&HashSet::new(), &opts, 1).unwrap();
        if groups.is_empty() {
            break;
        }
        seen.extend(groups[0].items.iter().map(|i| i.custom_id.clone()));
    }
    assert_eq!(seen, ["1", "2", "3", "4", "5", "6"]);
}

#[test]
fn split_halves_a_group() {
    let group = Group {
        model: "m".into(),
        rest: Map::new(),
        items: vec![item("1", "a"), item("2", "b"), item("3", "c")],
        tokens: 3,
    };
    let (first, second) = group.split();
    assert_eq!(first.items.len() + second.items.len(), 3);
    assert_eq!(first.items[0].custom_id, "1");
    assert_eq!(second.items.last().unwrap().custom_id, "3");
}

#[test]
fn vector_sizes_as_sent() {
    assert_eq!(vector_len("[1, 2.5, -3e-2]"), Some(3));
    assert_eq!(vector_len("[]"), Some(0));
    use base64::Engine as _;
    let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let base64 = format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    assert_eq!(vector_len(&base64), Some(2));
    assert_eq!(vector_len("\"not base64!\""), None);
    assert_eq!(vector_len("{}"), None);
}

#[tokio::test]
async fn pace_spreads_requests_and_tokens_over_the_minute() {
    use std::time::Instant;
    // 1200 requests a minute: one every 50 ms, no burst.
    let pace = Pace::new(NonZeroU32::new(1200), None);
    let started = Instant::now();
    for _ in 0..5 {
        pace.wait(1).await;
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(190), "{elapsed:?}");
    // 60,000 tokens a minute (1,000 a second, bursts of 6,000): 6,500 tokens take 0.5 s
    // beyond the burst, however they are split into requests.
    let pace = Pace::new(None, NonZeroU32::new(60_000));
    let started = Instant::now();
    pace.wait(6_500).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // No limit: no wait.
    let started = Instant::now();
    Pace::new(None, None).wait(1_000_000).await;
    assert!(started.elapsed() < Duration::from_millis(50));
}
