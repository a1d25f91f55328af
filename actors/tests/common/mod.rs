//! Shared by the proptest files under `actors/tests/`: each saves its failing cases to its own
//! committed file, `proptest-regressions/<test>.txt` (see `regressions.rs`).

#![allow(dead_code)]

use proptest::test_runner::{Config, FailurePersistence, FileFailurePersistence};

/// The persistence of a test's regression file (`path`: absolute).
pub fn regressions(path: &'static str) -> FileFailurePersistence {
    FileFailurePersistence::Direct(path)
}

/// `cases` new cases after the saved ones of `path` (`PROPTEST_CASES` overrides `cases` when
/// `env_cases`). `PROPTEST_DISABLE_FAILURE_PERSISTENCE` still switches persistence off.
pub fn config(path: &'static str, cases: u32, env_cases: bool) -> Config {
    let default = Config::default();
    let cases = if env_cases {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases)
    } else {
        cases
    };
    Config {
        cases,
        failure_persistence: default
            .failure_persistence
            .is_some()
            .then(|| Box::new(regressions(path)) as Box<dyn FailurePersistence>),
        ..default
    }
}
