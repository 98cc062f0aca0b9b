//! `twopc demo` end to end, as a newcomer runs it: the real binary against the machine's
//! PostgreSQL (or the private cluster it starts when prepared transactions are off),
//! RabbitMQ and NATS. The demo checks its own invariants from the outside and exits
//! non-zero if any is broken; this test also reads its table.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_demo(broker: &str) -> String {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args(["demo", "--orders", "12", "--broker", broker])
        .env_remove("RUST_LOG")
        .output()
        .expect("run twopc demo");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "demo --broker {broker} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "demo took {:?}",
        started.elapsed()
    );
    stdout
}

fn row<'a>(table: &'a str, label: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{table}"))
}

fn check(stdout: &str) {
    assert!(stdout.contains("all invariants hold"), "{stdout}");
    // 12 orders: orders 3, 6 and 8 are designed to fail (duplicate id, refused at
    // PREPARE, aborted by the service after writing).
    assert!(row(stdout, "orders placed").contains("12"), "{stdout}");
    assert!(
        row(stdout, "orders committed").contains("9 (rows in orders: 9)"),
        "{stdout}"
    );
    assert!(
        row(stdout, "events delivered").contains("9 applied"),
        "{stdout}"
    );
    assert!(
        row(stdout, "duplicates removed").contains(" 1 "),
        "{stdout}"
    );
    assert!(
        row(stdout, "aborted orders").contains("3 (3 with neither row nor event)"),
        "{stdout}"
    );
    assert!(
        row(stdout, "prepared transactions left").contains(" 0 "),
        "{stdout}"
    );
    assert!(
        row(stdout, "staged messages left").contains(" 0 "),
        "{stdout}"
    );
    assert!(
        stdout.contains("voted no: PREPARE TRANSACTION failed"),
        "the deferred FK case: {stdout}"
    );
}

#[test]
fn demo_with_rabbitmq_commits_rows_and_events_together() {
    check(&run_demo("rabbitmq"));
}

#[test]
fn demo_with_nats_jetstream_commits_rows_and_events_together() {
    check(&run_demo("nats"));
}
