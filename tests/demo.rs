//! `twopc-lab demo` end to end, as a newcomer runs it: the real binary against the machine's
//! PostgreSQL (or the private cluster it starts when prepared transactions are off),
//! RabbitMQ and NATS. The demo checks its own invariants from the outside and exits
//! non-zero if any is broken; this test also reads its table.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_demo(broker: &str, stage_events: &str) -> String {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_twopc-lab"))
        .args(["demo", "--orders", "12", "--broker", broker])
        .args(["--stage-events", stage_events])
        .env_remove("RUST_LOG")
        .output()
        .expect("run twopc-lab demo");
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

fn check(stdout: &str, stage_events: &str) {
    assert!(stdout.contains("all invariants hold"), "{stdout}");
    // 12 orders: orders 3, 6 and 8 are designed to fail (duplicate id, refused at
    // PREPARE, aborted by the service after writing).
    for (label, want) in [
        ("orders placed", "12"),
        ("orders committed", "9 (rows in orders: 9)"),
        ("events delivered", "9 applied"),
        ("duplicates removed", " 1 "),
        ("aborted orders", "3 (3 with neither row nor event)"),
        ("prepared transactions left", " 0 "),
        ("staged messages left", " 0 "),
        ("outbox rows left", " 0 "),
    ] {
        assert!(
            row(stdout, label).contains(want),
            "{label}: want {want:?} in {stdout}"
        );
    }
    // The deferred FK check fails where the branch's transaction ends: at PREPARE with a
    // broker branch beside it, at the one-phase COMMIT when the event is staged in it.
    let refusal = match stage_events {
        "broker" => "voted no: PREPARE TRANSACTION failed",
        _ => "refused to commit: COMMIT failed",
    };
    assert!(stdout.contains(refusal), "the deferred FK case: {stdout}");
}

#[test]
fn demo_with_rabbitmq_commits_rows_and_events_together() {
    check(&run_demo("rabbitmq", "broker"), "broker");
}

#[test]
fn demo_with_events_staged_in_the_database_commits_in_one_phase() {
    let stdout = run_demo("rabbitmq", "database");
    check(&stdout, "database");
    assert!(stdout.contains("staged in the orders database"), "{stdout}");
}

#[test]
fn demo_with_nats_jetstream_commits_rows_and_events_together() {
    check(&run_demo("nats", "broker"), "broker");
}
