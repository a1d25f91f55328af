#!/usr/bin/env bash
# The soak (issue 10), long version: the `soak` integration test on the release build, for
# 10 minutes (or $1 seconds) with a kill -9 every 30 s (or $2), billable usage aggregated in
# 1 s windows (or $3; 0: one meter event per entry). The test suite runs the same test for
# 20 s with a kill every 4 s, unaggregated. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
METERD_SOAK_SECS="${1:-600}" METERD_SOAK_KILL_S="${2:-30}" METERD_SOAK_AGGREGATE_S="${3:-1}" \
    cargo test --release --locked --test it soak:: -- --nocapture --test-threads 1
