#!/usr/bin/env bash
# Runs the whole twopc test suite on a fresh machine: installs missing services (as root,
# with apt) and starts the ones that are down, checks formatting and lints, then runs every
# unit, conformance, model-check, integration, crash and fault-campaign test.
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

# --- Set-up: what the tests talk to -------------------------------------------------------
# Private PostgreSQL clusters (initdb/postgres), NATS servers and etcd clusters are started
# by the tests themselves; RabbitMQ, NATS and PostgreSQL on their standard loopback ports must be up.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  return 1
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
  command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
  # The etcd decision log's tests start private etcd clusters; its client crate (etcd-client)
  # compiles etcd's protobuf files, which needs protoc and the well-known types.
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  [ -e /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi
if ! port_open 5672 && command -v rabbitmq-server >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port 5672 90 || { echo "error: RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
fi
if ! port_open 4222 && command -v nats-server >/dev/null 2>&1; then
  log "starting NATS (JetStream)"
  mkdir -p /tmp/twopc-nats
  nohup nats-server -a 127.0.0.1 -p 4222 -js -sd /tmp/twopc-nats >/tmp/twopc-nats.log 2>&1 &
  wait_port 4222 20 || { echo "error: NATS did not come up on 127.0.0.1:4222" >&2; exit 1; }
fi
if ! port_open 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  log "starting the system PostgreSQL"
  for v in /etc/postgresql/*; do pg_ctlcluster --skip-systemctl-redirect "$(basename "$v")" main start || true; done
  wait_port 5432 30 || echo "note: the system PostgreSQL is not up; the test that reads its settings is skipped"
fi
for p in 5672 4222; do
  port_open "$p" || { echo "error: nothing listens on 127.0.0.1:$p (RabbitMQ 5672, NATS 4222); install and start it" >&2; exit 1; }
done

if [ "${TWOPC_SKIP_LINT:-0}" != 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy (all targets, warnings are errors)"
  cargo clippy --workspace --all-targets --features failpoints,lab -- -D warnings
fi

log "cargo test (workspace, failpoints compiled in)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --workspace --all-targets --features failpoints,lab -- --test-threads=4 2>&1 | tee "$out"

# One closing line for the whole run: cargo prints a summary per test binary.
read -r passed failed < <(awk '/^test result:/ {
  for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) }
} END { print p + 0, f + 0 }' "$out")
echo
echo "summary: ${passed} passed, ${failed} failed"
