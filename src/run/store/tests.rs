use super::*;

#[test]
fn atomic_write_replaces_and_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.json");
    write_atomic(&path, b"one").unwrap();
    write_atomic(&path, b"two").unwrap();
    assert_eq!(fs_err::read(&path).unwrap(), b"two");
    let mode = fs_err::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let leftovers: Vec<_> = fs_err::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

/// Every released schema version keeps loading: fixtures written by that version.
#[test]
fn released_run_files_keep_loading() {
    for (name, text) in [
        (
            "run-v1-ingested.json",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/run-v1-ingested.json"
            )),
        ),
        (
            "run-v1-every-state.json",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/run-v1-every-state.json"
            )),
        ),
    ] {
        let run =
            parse(text.as_bytes(), Path::new(name)).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(run.schema_version, 1, "{name}");
    }
    let every = parse(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/run-v1-every-state.json"
        ))
        .as_bytes(),
        Path::new("every"),
    )
    .unwrap();
    let kinds: Vec<&str> = every
        .batches
        .iter()
        .map(|b| b.state.kind().as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "planned",
            "uploaded",
            "submitted",
            "queued",
            "expired",
            "cancelled",
            "failed",
            "downloaded",
            "ingested"
        ]
    );
}

fn fixture() -> RunFile {
    parse(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/run-v1-every-state.json"
        ))
        .as_bytes(),
        Path::new("every"),
    )
    .unwrap()
}

/// After every save, `run.json.bak` holds exactly the bytes `run.json` had before it.
#[test]
fn every_save_keeps_the_previous_file_as_backup() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = fixture();
    save(dir.path(), &run).unwrap();
    assert!(
        !dir.path().join(BACKUP_FILE).exists(),
        "no backup of nothing"
    );
    for round in 0..4 {
        let before = fs_err::read(dir.path().join(RUN_FILE)).unwrap();
        run.retry_given_up = round + 1;
        save(dir.path(), &run).unwrap();
        assert_eq!(fs_err::read(dir.path().join(BACKUP_FILE)).unwrap(), before);
        assert_eq!(load(dir.path()).unwrap(), run);
        let backup = parse(&before, Path::new("bak")).unwrap();
        assert_ne!(
            backup, run,
            "round {round}: the backup is the previous state"
        );
    }
}

#[test]
fn the_way_out_depends_on_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    let run = fixture();
    save(dir.path(), &run).unwrap();
    fs_err::write(dir.path().join(RUN_FILE), b"{\"schema_version\": 1, \"run").unwrap();
    let message = load(dir.path()).unwrap_err().to_string();
    assert!(message.contains("there is no"), "{message}");
    assert!(message.contains("plan the run again"), "{message}");
    save_backup(dir.path(), &run);
    let message = load(dir.path()).unwrap_err().to_string();
    assert!(message.contains("restore it from"), "{message}");
    assert!(message.contains("`cp "), "{message}");
    fs_err::write(dir.path().join(BACKUP_FILE), b"garbage").unwrap();
    let message = load(dir.path()).unwrap_err().to_string();
    assert!(message.contains("run.json.bak is damaged too"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

fn save_backup(dir: &Path, run: &RunFile) {
    let json = serde_json::to_vec_pretty(run).unwrap();
    fs_err::write(dir.join(BACKUP_FILE), json).unwrap();
}

#[test]
fn batch_names_that_are_not_batch_nnn_are_refused() {
    let good = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/run-v1-ingested.json"
    ));
    for bad in ["../../escape", "batch_1", "batch_00a", "/etc"] {
        let text = good.replacen("\"name\": \"batch_001\"", &format!("\"name\": {bad:?}"), 1);
        assert_ne!(text, good);
        let err = parse(text.as_bytes(), Path::new("/r/run.json")).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{bad}: {err}");
    }
}

fn assert_clear(result: Result<RunFile, StoreError>) {
    if let Err(err) = result {
        assert!(
            matches!(err, StoreError::Damaged { .. } | StoreError::TooNew { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains("/r/run.json"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
}

/// A JSON value of any shape, nested a few levels.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces the value at a random place of `value` (chosen by `path`) with `with`.
fn replace_somewhere(value: &mut serde_json::Value, path: &[usize], with: serde_json::Value) {
    let Some((&first, rest)) = path.split_first() else {
        *value = with;
        return;
    };
    let child = match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            let n = map.len();
            map.values_mut().nth(first % n)
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            let n = items.len();
            items.get_mut(first % n)
        }
        _ => None,
    };
    match child {
        Some(child) => replace_somewhere(child, rest, with),
        None => *value = with,
    }
}

use proptest::prelude::*;

proptest! {
    /// Arbitrary bytes never panic the loader: Ok, or a one-line error naming the file.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        assert_clear(parse(&bytes, Path::new("/r/run.json")));
    }

    /// A valid file cut short, with bytes flipped, or with any value replaced by a value
    /// of any type: never a panic, always Ok or a clear error.
    #[test]
    fn mutated_valid_files_never_panic(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        path in proptest::collection::vec(any::<usize>(), 0..6),
        with in any_json(),
    ) {
        let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/run-v1-every-state.json")).as_bytes();
        assert_clear(parse(&text[..cut.index(text.len() + 1)], Path::new("/r/run.json")));
        let mut flipped = text.to_vec();
        for (at, byte) in &flips {
            let at = at.index(flipped.len());
            flipped[at] = *byte;
        }
        assert_clear(parse(&flipped, Path::new("/r/run.json")));
        let mut value: serde_json::Value = serde_json::from_slice(text).unwrap();
        replace_somewhere(&mut value, &path, with);
        let bytes = serde_json::to_vec(&value).unwrap();
        assert_clear(parse(&bytes, Path::new("/r/run.json")));
    }
}

#[test]
fn huge_and_deep_files_are_refused_without_a_crash() {
    let path = Path::new("/r/run.json");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_clear(parse(deep.as_bytes(), path));
    let deep_object = format!(
        "{{\"schema_version\": 1, \"run_id\": {}{}}}",
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    assert_clear(parse(deep_object.as_bytes(), path));
    let huge_number = format!("{{\"schema_version\": 1{}}}", "0".repeat(100_000));
    assert!(matches!(
        parse(huge_number.as_bytes(), path),
        Err(StoreError::Damaged { .. })
    ));
    let huge_version = "{\"schema_version\": 99999999999999999999999}";
    assert!(matches!(
        parse(huge_version.as_bytes(), path),
        Err(StoreError::Damaged { .. })
    ));
    assert!(matches!(
        parse(b"{\"schema_version\": 4294967295}", path),
        Err(StoreError::TooNew { .. })
    ));
}

#[test]
fn damaged_and_newer_files_are_refused_with_the_way_out() {
    let path = Path::new("/r/run.json");
    let err = parse(b"{\"schema_version\": 1, \"run_id\"", path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("/r/run.json is damaged"), "{msg}");
    assert!(msg.contains("/r/run.json.bak"), "{msg}");
    let err = parse(b"not json", path).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }));
    let err = parse(b"{\"schema_version\": 99}", path).unwrap_err();
    assert!(err.to_string().contains("upgrade embatch"), "{err}");
}

/// The serde types write back what a released file holds: typed fields (`IdType`, the states)
/// read and write the very same JSON values.
#[test]
fn released_run_files_round_trip_to_the_same_json() {
    for text in [
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/run-v1-ingested.json"
        )),
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/run-v1-every-state.json"
        )),
    ] {
        let run = parse(text.as_bytes(), Path::new("fixture")).unwrap();
        let written = serde_json::to_value(&run).unwrap();
        let released: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(written, released);
    }
}

/// `--content-hash-column` is recorded only when given: a run planned without it keeps the
/// bytes it always had, and one planned with it says so.
#[test]
fn content_hash_column_is_recorded_only_when_given() {
    let mut run = fixture();
    let plain = serde_json::to_string(&run).unwrap();
    assert!(!plain.contains("content_hash_column"), "{plain}");
    run.settings.source.content_hash_column = Some("content_sha256".to_owned());
    let with = serde_json::to_string(&run).unwrap();
    assert!(
        with.contains("\"content_hash_column\":\"content_sha256\""),
        "{with}"
    );
    let back = parse(with.as_bytes(), Path::new("with")).unwrap();
    assert_eq!(
        back.settings.source.content_hash_column.as_deref(),
        Some("content_sha256")
    );
}
