use super::*;
use crate::run::layout::{family_dir, run_name};

#[test]
fn family_dirs_are_percent_encoded() {
    let root = Path::new("/r");
    assert_eq!(family_dir(root, "abc-1.2_x"), PathBuf::from("/r/abc-1.2_x"));
    assert_eq!(family_dir(root, "a/b c"), PathBuf::from("/r/a%2Fb%20c"));
    assert_eq!(family_dir(root, ".."), PathBuf::from("/r/%2E%2E"));
}

#[test]
fn spellings_of_one_uuid_or_integer_share_a_key() {
    let canonical = "33333333-3333-3333-3333-33333333333a";
    for spelling in [
        canonical,
        "3333333333333333333333333333333A",
        "{33333333-3333-3333-3333-33333333333A}",
        "3333-3333-3333-3333-3333-3333-3333-333a",
    ] {
        assert_eq!(spelling_key(spelling), canonical, "{spelling}");
    }
    // What Postgres's uuid input refuses stays as it is.
    for not_uuid in [
        "{33333333-3333-3333-3333-33333333333a",
        "33333333-3333-3333-3333-33333333333a-",
        "3-3333333-3333-3333-3333-33333333333a",
        " 33333333-3333-3333-3333-33333333333a",
    ] {
        assert_eq!(spelling_key(not_uuid), not_uuid);
    }
    for (spelling, key) in [
        ("07", "7"),
        (" +7 ", "7"),
        ("-0", "0"),
        ("-007", "-7"),
        ("7", "7"),
    ] {
        assert_eq!(spelling_key(spelling), key, "{spelling:?}");
    }
    assert_eq!(spelling_key("abc"), "abc");
    assert_eq!(spelling_key("7a"), "7a");
}

#[test]
fn family_folders_name_their_family() {
    let dir = tempfile::tempdir().unwrap();
    for id in ["a/b c", "33333333-3333-3333-3333-333333333333", ".."] {
        fs_err::create_dir_all(family_dir(dir.path(), id)).unwrap();
    }
    // Not written by family_dir: not a family folder.
    fs_err::create_dir_all(dir.path().join("a b")).unwrap();
    fs_err::create_dir_all(dir.path().join("%zz")).unwrap();
    let ids: Vec<String> = family_folders(dir.path())
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, ["..", "33333333-3333-3333-3333-333333333333", "a/b c"]);
}

proptest::proptest! {
    #[test]
    fn folder_names_decode_to_their_family(id in "\\PC{1,40}") {
        let name = family_dir(Path::new(""), &id);
        let name = name.to_str().unwrap();
        proptest::prop_assert_eq!(family_folder_id(name), Some(id));
    }

    #[test]
    fn every_spelling_of_a_uuid_has_its_key(value: u128, upper: bool, braces: bool, hyphens: bool) {
        let uuid = uuid::Uuid::from_u128(value);
        let mut text = if hyphens { uuid.hyphenated().to_string() } else { uuid.simple().to_string() };
        if upper {
            text = text.to_uppercase();
        }
        if braces {
            text = format!("{{{text}}}");
        }
        proptest::prop_assert_eq!(spelling_key(&text), uuid.to_string());
        proptest::prop_assert_eq!(spelling_key(&uuid.to_string()), uuid.to_string());
    }

    #[test]
    fn every_spelling_of_an_integer_has_its_key(value: i64, zeros in 0usize..4, plus: bool) {
        let digits = value.unsigned_abs().to_string();
        let sign = if value < 0 { "-" } else if plus { "+" } else { "" };
        let text = format!(" {sign}{}{digits}\t", "0".repeat(zeros));
        proptest::prop_assert_eq!(spelling_key(&text), value.to_string());
    }
}

#[test]
fn run_names_follow_the_layout() {
    let now = DateTime::parse_from_rfc3339("2026-11-24T10:45:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let name = run_name(now, 0x7f3a);
    assert_eq!(name.run_id, "20261124T104500Z-7f3a");
    assert_eq!(name.folder, "run_20261124_104500_7f3a");
}
