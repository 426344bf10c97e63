#!/usr/bin/env bash
# What `make test` runs after lint and crd-check: compiles every test target, then runs them all
# against a private environment (hack/with-env.sh, which owns the environment's lifecycle).
#
#   CARGO_TEST_ARGS="--test admission"  hack/test.sh     # a subset (default: --workspace --lib
#                                                        # --bins --tests; the benchmark is `make bench`)
#   TEST_THREADS=4                      hack/test.sh     # threads per test binary
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
# shellcheck disable=SC2206 # CARGO_TEST_ARGS is a list of words on purpose
args=(${CARGO_TEST_ARGS:---workspace --lib --bins --tests})

# Compile first, so the environment does not idle through the build.
"$CARGO" test "${args[@]}" --no-run

# Every test binary runs even when an earlier one failed (--no-fail-fast), so one run reports all
# failures. Two cores: cargo's default of one test thread per core keeps the timing-sensitive
# integration tests honest; TEST_THREADS overrides it.
threads=()
[[ -n "${TEST_THREADS:-}" ]] && threads=(--test-threads "$TEST_THREADS")
exec hack/with-env.sh test-runs -- "$CARGO" test --no-fail-fast "${args[@]}" -- "${threads[@]}"
