//! Test-only failpoints (feature `fault-injection`, which only this crate's own tests
//! enable): a named point in a multi-key change where a test makes the change stop, as a
//! kill -9 would. What was written before the point stays (sled recovers writes in order);
//! nothing after it happens. Armed per scope (an account id), so tests running in parallel
//! do not trip each other's points, and one-shot.

use std::collections::HashSet;
use std::sync::Mutex;

static ARMED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

fn armed() -> std::sync::MutexGuard<'static, Option<HashSet<(String, String)>>> {
    ARMED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Arms failpoint `name` for `scope`: the next time it is reached there, it fires.
pub fn arm(name: &str, scope: &str) {
    armed()
        .get_or_insert_with(HashSet::new)
        .insert((name.to_owned(), scope.to_owned()));
}

/// True (once) if failpoint `name` is armed for `scope`: the caller stops there.
pub fn hit(name: &str, scope: &str) -> bool {
    armed()
        .as_mut()
        .is_some_and(|s| s.remove(&(name.to_owned(), scope.to_owned())))
}
