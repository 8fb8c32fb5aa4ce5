//! Puts the commit the binary is built from into `EMBATCH_COMMIT`, for `embatch --version`:
//! `git rev-parse --short HEAD` of the checkout, or `unknown` where there is none (a source
//! archive or sdist, a crate from a registry, no git on the machine).
//!
//! It reruns only when `HEAD` or the branch it points to moves (not on every build, which
//! would recompile the whole library each time). No `-dirty` mark: a changed source file
//! recompiles the crate without rerunning this script, so the mark would go stale.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let commit = match git_commit() {
        Some((commit, watch)) => {
            for path in watch {
                println!("cargo:rerun-if-changed={}", path.display());
            }
            commit
        }
        None => {
            // Nothing of git to watch: run again only if this script changes.
            println!("cargo:rerun-if-changed=build.rs");
            "unknown".to_owned()
        }
    };
    println!("cargo:rustc-env=EMBATCH_COMMIT={commit}");
}

/// The short commit and the files whose change moves it, or `None` outside a checkout of
/// this crate.
fn git_commit() -> Option<(String, Vec<PathBuf>)> {
    // An sdist unpacked inside some other repository must not take that repository's commit:
    // the manifest has to be a file of the checkout.
    git(&["ls-files", "--error-unmatch", "Cargo.toml"])?;
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // HEAD lives in the worktree's own git folder; the branch it points to (`refs/heads/…`,
    // or `HEAD` when detached) in the common one, loose or in `packed-refs`.
    let head = PathBuf::from(git(&["rev-parse", "--git-path", "HEAD"])?);
    let common = PathBuf::from(git(&["rev-parse", "--git-common-dir"])?);
    let branch = git(&["rev-parse", "--symbolic-full-name", "HEAD"])?;
    let mut watch = vec![head];
    if branch.starts_with("refs/") {
        watch.push(common.join(&branch));
    }
    watch.push(common.join("packed-refs"));
    // A path that does not exist would rerun this script on every build.
    watch.retain(|path| Path::new(path).is_file());
    Some((commit, watch))
}

/// One git command in the crate's folder; its trimmed stdout, or `None` if it fails or git
/// is missing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}
