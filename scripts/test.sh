#!/usr/bin/env bash
# Runs the whole twopc test suite on a fresh machine: checks formatting and lints, then
# every unit, conformance, integration and crash test of the workspace.
#
# Usage: scripts/test.sh            (from anywhere inside the repository)
# Env:   TWOPC_SKIP_LINT=1          skip cargo fmt / clippy (quicker local runs)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not installed; install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1

if [ "${TWOPC_SKIP_LINT:-0}" != 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy (all targets, warnings are errors)"
  cargo clippy --workspace --all-targets --features failpoints -- -D warnings
fi

log "cargo test (workspace, failpoints compiled in)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --workspace --all-targets --features failpoints -- --test-threads=4 2>&1 | tee "$out"

# One closing line for the whole run: cargo prints a summary per test binary.
read -r passed failed < <(awk '/^test result:/ {
  for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) }
} END { print p + 0, f + 0 }' "$out")
echo
echo "summary: ${passed} passed, ${failed} failed"
