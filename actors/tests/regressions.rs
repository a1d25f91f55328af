//! Every proptest of this crate saves its failing cases to a committed file under
//! `proptest-regressions/`, and proptest reads that file (and runs its cases first) at the
//! start of every run. Each file holds a canary seed (a passing case), so a file proptest does
//! not find reads as empty here.
//!
//! Replay a saved failure: see the header of its file in `proptest-regressions/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use proptest::test_runner::{FailurePersistence, FileFailurePersistence};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The files of `dir` (under this crate) that define proptests, and their text.
fn proptest_files(dir: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&crate_dir().join(dir), &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = text.contains(&["proptest", "! {"].concat())
                || text.contains(&["proptest", "!{"].concat());
            uses.then_some((path, text))
        })
        .collect()
}

/// No proptest switches persistence off.
fn assert_persists(path: &Path, text: &str) {
    for off in [
        ["failure_persistence", ": None"].concat(),
        ["FileFailurePersistence", "::Off"].concat(),
    ] {
        assert!(
            !text.contains(&off),
            "{}: `{off}` loses failing cases; persist them to proptest-regressions/",
            path.display()
        );
    }
}

/// The proptests under `src/` use proptest's default persistence (`SourceParallel`):
/// `src/a/b.rs` saves to `proptest-regressions/a/b.txt`. Loading with the path `file!()` gives
/// those tests (relative to the workspace root) must find the committed file and its canary.
#[test]
fn every_proptest_under_src_reads_its_committed_regression_file() {
    let files = proptest_files("src");
    assert!(!files.is_empty(), "no proptest found under src/");
    let workspace = crate_dir().parent().unwrap();
    for (path, text) in files {
        assert_persists(&path, &text);
        assert!(
            !text.contains("failure_persistence"),
            "{}: configures its own persistence; check it here",
            path.display()
        );
        let rel = path.strip_prefix(crate_dir().join("src")).unwrap();
        let expected = crate_dir()
            .join("proptest-regressions")
            .join(rel)
            .with_extension("txt");
        assert!(
            expected.is_file(),
            "{} has proptests but {} is not committed",
            path.display(),
            expected.display()
        );
        let file: &'static str = Box::leak(
            path.strip_prefix(workspace)
                .unwrap()
                .to_string_lossy()
                .into_owned()
                .into_boxed_str(),
        );
        let seeds = FileFailurePersistence::default().load_persisted_failures2(Some(file));
        assert!(
            !seeds.is_empty(),
            "proptest does not read {} for {file}",
            expected.display()
        );
        let listed = std::fs::read_to_string(&expected)
            .unwrap()
            .lines()
            .filter(|l| l.split('#').next().is_some_and(|s| !s.trim().is_empty()))
            .count();
        assert_eq!(
            seeds.len(),
            listed,
            "{}: a line proptest cannot parse",
            expected.display()
        );
    }
}

/// A proptest under `tests/` has no `lib.rs` above it for the default to work from: its file
/// names its own regression file, `proptest-regressions/<test>.txt`, and checks that proptest
/// reads it (as `the_regression_file_is_read` in `sequences.rs` does).
#[test]
fn every_proptest_under_tests_names_its_committed_regression_file() {
    for (path, text) in proptest_files("tests") {
        if path.file_name().is_some_and(|n| n == "regressions.rs") {
            continue;
        }
        assert_persists(&path, &text);
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let name = format!("/proptest-regressions/{stem}.txt");
        assert!(
            text.contains(&name) && text.contains("load_persisted_failures2"),
            "{}: persist failing cases to {name} and check that proptest reads it",
            path.display()
        );
        assert!(
            crate_dir().join(&name[1..]).is_file(),
            "{name} is not committed"
        );
    }
}
