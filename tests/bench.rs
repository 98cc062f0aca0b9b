//! `twopc bench coordinator` on the real binary, briefly: the JSON report has one object
//! per mode with the fields the benchmark documents (the CPU per transaction included),
//! and bad flags are refused with an error that names them. The numbers themselves are
//! not judged here: benchmarks are not timed tests.

use std::process::{Command, Output, Stdio};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twopc"))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .arg("bench")
        .arg("coordinator")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run twopc bench coordinator")
}

#[test]
fn the_json_report_has_every_mode_and_its_cpu_per_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 temp path");
    let out = bench(&[
        "--clients",
        "2",
        "--seconds",
        "1",
        "--json",
        "--dir",
        dir_arg,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let modes: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(
        modes,
        ["disk-ceiling", "coordinator-2pc", "coordinator-1pc"],
        "{stdout}"
    );
    for row in &rows {
        let mode = row["mode"].as_str().unwrap_or("?");
        for key in [
            "clients",
            "tx_per_s",
            "p50_ms",
            "p99_ms",
            "syncs_per_decision",
        ] {
            assert!(row[key].is_number(), "{mode}: {key} missing in {row}");
        }
        assert!(
            row["tx_per_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{mode}: {row}"
        );
        let cpu = &row["cpu_us_per_tx"];
        if mode == "disk-ceiling" {
            assert!(
                cpu.is_null(),
                "the disk ceiling has no CPU per transaction: {row}"
            );
        } else {
            let us = cpu.as_f64().unwrap_or(0.0);
            assert!(
                us > 0.0 && us.is_finite(),
                "{mode}: CPU per transaction {cpu} in {row}"
            );
        }
    }
    // Nothing is left in the benchmark directory.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list the benchmark directory")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_flags_are_refused_by_name() {
    for (args, flag) in [
        (["--clients", "0"], "--clients"),
        (["--seconds", "0"], "--seconds"),
    ] {
        let out = bench(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
