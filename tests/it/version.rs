//! `embatch --version`: the crate's version and the commit the binary was built from.

use crate::harness::TestEnv;

/// `embatch 0.1.0 (1a2b3c4)`, or `(unknown)` when built outside a git checkout.
#[tokio::test]
async fn version_names_the_commit() {
    let env = TestEnv::new().await;
    let run = env.run(&["--version"]);
    assert_eq!(run.code, 0, "{run:#?}");
    assert!(run.stderr.is_empty(), "{run:#?}");
    let line = run.stdout.trim_end();
    let rest = line
        .strip_prefix(&format!("embatch {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'));
    let Some(commit) = rest else {
        panic!("expected `embatch <version> (<commit>)`, got {line:?}");
    };
    let hex = (7..=40).contains(&commit.len()) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(hex || commit == "unknown", "commit {commit:?} in {line:?}");
}
