//! The randomized fault campaign, run by CI: `twopc-lab campaign` places orders through the
//! SDK while seeded random faults strike (coordinator SIGKILL/SIGSTOP, during the load or
//! while it starts, dropped, delayed and reset links in each direction, PostgreSQL
//! SIGKILL, broker cut off, participant restart after or during the load, a real order
//! service process killed while it starts), lets recovery finish, and checks every invariant
//! from PostgreSQL and the broker directly. Each order stages its event in a broker branch
//! or in the database branch's outbox table (drawn from the seed), and the coordinator's
//! one-phase optimisation alternates every ten cycles, so database-staged orders commit in
//! one phase and through `PREPARE TRANSACTION` under every fault. It prints its seed, a
//! reproduce command and a JSON summary.
//!
//! `TWOPC_CAMPAIGN_CYCLES` (default 100) and `TWOPC_CAMPAIGN_SEED` (default random) are
//! passed through, so `TWOPC_CAMPAIGN_CYCLES=5000 cargo test --test campaign` runs a long one.

use std::process::Command;

fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad summary {line:?}: {e}"))
}

fn campaign(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twopc-lab"))
        .arg("campaign")
        .args(args)
        .env_remove("RUST_LOG")
        .env("TWOPC_BIN", env!("CARGO_BIN_EXE_twopc"))
        .output()
        .expect("run twopc-lab campaign");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `count` (a number in the summary) is above 0; `what` says what it would mean if not.
#[track_caller]
fn assert_some(count: &serde_json::Value, what: &str, stdout: &str) {
    assert!(count.as_u64().unwrap_or(0) > 0, "{what}: {stdout}");
}

#[test]
fn randomized_fault_campaign_finds_no_violation() {
    let cycles = std::env::var("TWOPC_CAMPAIGN_CYCLES").unwrap_or_else(|_| "100".into());
    let (ok, stdout, stderr) = campaign(&["--cycles", &cycles]);
    // The seed and the reproduce command are in stdout: show them whatever happens.
    println!("{stdout}");
    let s = summary(&stdout);
    assert!(ok, "campaign failed:\n{stdout}\n{stderr}");
    assert_eq!(s["violations"], 0, "{stdout}");
    assert_eq!(s["cycles"].as_u64(), cycles.parse().ok(), "{stdout}");
    assert_some(&s["faults"], "no fault was injected", &stdout);
    assert_some(&s["ok"], "nothing committed", &stdout);
    // Both ways of staging the event ran, and database-staged orders committed both in one
    // phase and in two.
    let staged = |how: &str, key: &str| s["staging"][how][key].as_u64().unwrap_or(0);
    assert!(
        staged("broker", "ok") > 0,
        "no broker-staged order committed: {stdout}"
    );
    assert!(
        staged("database", "transactions") > 0,
        "no database-staged order ran: {stdout}"
    );
    assert!(
        staged("database", "one_phase_on_ok") > 0,
        "no database-staged order committed in one phase: {stdout}"
    );
    if s["cycles"].as_u64().unwrap_or(0) > 10 {
        assert!(
            staged("database", "one_phase_off_ok") > 0,
            "no database-staged order committed with one-phase off: {stdout}"
        );
    }
}

/// The faults that kill a process while it starts: the coordinator (its decision log
/// opening, its recovery) and a real `twopc-lab order-service` process of the campaign's
/// participant (its staging store opening, its recovery), one to four times in a row.
/// Every later start must work and every invariant hold.
#[test]
fn campaign_kills_the_coordinator_and_the_order_service_while_they_start() {
    let (ok, stdout, stderr) = campaign(&[
        "--faults",
        "kill-coordinator-at-start,kill-order-service-at-start",
        "--cycles",
        "16",
    ]);
    println!("{stdout}");
    let s = summary(&stdout);
    assert!(ok, "campaign failed:\n{stdout}\n{stderr}");
    assert_eq!(s["violations"], 0, "{stdout}");
    let counts = &s["fault_counts"];
    for fault in ["KillCoordinatorAtStart", "KillOrderServiceAtStart"] {
        assert_some(&counts[fault], &format!("no {fault}"), &stdout);
    }
    let kills = &s["kills_while_starting"];
    assert_some(
        &kills["coordinator"],
        "no kill struck a starting coordinator",
        &stdout,
    );
    assert_some(
        &kills["order_service"],
        "no kill struck a starting order service",
        &stdout,
    );
    assert_some(&s["ok"], "nothing committed", &stdout);
}

/// The coordinator aborts itself right after deleting a batch of finished decision
/// records (a short retention keeps collection running through the load); the restarted
/// one must find every decision it still owes, and every invariant hold. Transactions
/// collected by then answer FORGOTTEN at the check and are judged on their branches.
#[test]
fn campaign_kills_the_coordinator_while_it_collects_finished_records() {
    let (ok, stdout, stderr) = campaign(&[
        "--faults",
        "kill-coordinator-in-collection,none",
        "--cycles",
        "10",
        "--decision-retention-ms",
        "500",
    ]);
    println!("{stdout}");
    let s = summary(&stdout);
    assert!(ok, "campaign failed:\n{stdout}\n{stderr}");
    assert_eq!(s["violations"], 0, "{stdout}");
    assert_some(
        &s["kills_in_collection"]["landed"],
        "no kill struck a collection",
        &stdout,
    );
    assert_some(&s["ok"], "nothing committed", &stdout);
}

/// The checker is not blind: a coordinator that sends commits before its decision is
/// durable (a test-only switch of failpoints builds), killed mid-load, is caught. One-phase
/// off: every transaction, database-staged ones too, goes through the decision log.
#[cfg(feature = "failpoints")]
#[test]
fn campaign_catches_a_coordinator_that_commits_before_the_decision_is_durable() {
    let (ok, stdout, stderr) = campaign(&[
        "--broken",
        "--faults",
        "kill-coordinator",
        "--cycles",
        "10",
        "--seed",
        "1",
        "--one-phase",
        "off",
    ]);
    println!("{stdout}");
    let s = summary(&stdout);
    assert!(
        !ok,
        "the broken variant passed the checker:\n{stdout}\n{stderr}"
    );
    assert!(s["violations"].as_u64().unwrap_or(0) > 0, "{stdout}");
    assert!(stdout.contains("VIOLATION"), "{stdout}");
}
