//! `twopc-lab bench coordinator` and `twopc-lab bench dual-write` (against the real PostgreSQL
//! and RabbitMQ) on the real binary, briefly: the JSON report has one object per mode with
//! the fields the benchmark documents (the CPU per transaction included), and bad flags
//! are refused with an error that names them. The numbers themselves are not judged
//! here: benchmarks are not timed tests.

use std::process::{Command, Output, Stdio};

fn bench(args: &[&str]) -> Output {
    bench_of("coordinator", args, None)
}

/// `twopc-lab bench <which> <args>`, in `dir` if given.
fn bench_of(which: &str, args: &[&str], dir: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc-lab"));
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .arg("bench")
        .arg(which)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run twopc-lab bench {which}: {e}"))
}

/// `twopc-lab bench dual-write` in `dir`, briefly: `clients` clients, `seconds` per
/// slice, one round, a JSON report; `more` flags after those.
fn dual_write(dir: &std::path::Path, clients: &str, seconds: &str, more: &[&str]) -> Output {
    let brief = [
        "--clients",
        clients,
        "--seconds",
        seconds,
        "--rounds",
        "1",
        "--json",
    ];
    let args: Vec<&str> = brief.iter().chain(more).copied().collect();
    bench_of("dual-write", &args, Some(dir))
}

/// The lines of a successful run's stdout, each a JSON object (notes go to stderr).
#[track_caller]
fn json_rows(out: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The rows of a successful run's report, which must be those of `modes` in that order,
/// each with its mode.
#[track_caller]
fn report_of(out: &Output, modes: &[&str]) -> Vec<(String, serde_json::Value)> {
    let rows = json_rows(out);
    let names: Vec<&str> = rows.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(names, modes, "{rows:?}");
    let names: Vec<String> = names.into_iter().map(String::from).collect();
    names.into_iter().zip(rows).collect()
}

/// What every mode of either benchmark reports.
const EVERY_MODE_REPORTS: [&str; 4] = ["clients", "tx_per_s", "p50_ms", "p99_ms"];

/// The benchmark left nothing in `dir` (its directory, or its working directory).
#[track_caller]
fn assert_nothing_left(dir: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("list the directory")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
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
    let modes = ["disk-ceiling", "coordinator-2pc", "coordinator-1pc"];
    for (mode, row) in report_of(&out, &modes) {
        for key in EVERY_MODE_REPORTS.iter().chain(&["syncs_per_decision"]) {
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
    assert_nothing_left(dir.path());
}

#[test]
fn bad_flags_are_refused_by_name() {
    for (which, args, flag) in [
        ("coordinator", ["--clients", "0"], "--clients"),
        ("coordinator", ["--seconds", "0"], "--seconds"),
        ("dual-write", ["--clients", "0"], "--clients"),
        ("dual-write", ["--rounds", "0"], "--rounds"),
        (
            "dual-write",
            ["--relay-interval-ms", "0"],
            "--relay-interval-ms",
        ),
        ("dual-write", ["--modes", "bogus"], "--modes"),
        ("dual-write", ["--db-connections", "1"], "--db-connections"),
    ] {
        let out = bench_of(which, &args, None);
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// The dual-write benchmark, each mode briefly, against the real PostgreSQL (a private
/// cluster where the system one has no prepared transactions) and RabbitMQ: four JSON
/// lines, every event delivered, the throughput ratios on the naive and outbox lines, the
/// CPU per order of the process and of the machine, and nothing left behind.
#[test]
fn the_dual_write_json_report_has_every_mode_delivered_and_its_cpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dual_write(dir.path(), "2", "2", &[]);
    let modes = ["naive", "outbox", "twopc", "twopc-2pc"];
    for (mode, row) in report_of(&out, &modes) {
        let mode = mode.as_str();
        for key in EVERY_MODE_REPORTS.iter().chain(&[
            "delivery_p50_ms",
            "delivery_p99_ms",
            "cpu_us_per_tx",
            "machine_cpu_us_per_tx",
        ]) {
            let v = row[*key].as_f64();
            assert!(
                v.is_some_and(|v| v > 0.0 && v.is_finite()),
                "{mode}: {key} in {row}"
            );
        }
        assert_eq!(row["undelivered"].as_u64(), Some(0), "{mode}: {row}");
        // The sustained rate counts the drains too: never above the slices' rate.
        let (rate, sustained) = (row["tx_per_s"].as_f64(), row["sustained_tx_per_s"].as_f64());
        assert!(
            rate.zip(sustained).is_some_and(|(r, s)| s > 0.0 && s <= r),
            "{mode}: sustained rate in {row}"
        );
        for key in ["twopc_throughput_ratio", "twopc_sustained_ratio"] {
            assert_eq!(
                row[key].is_number(),
                mode == "naive" || mode == "outbox" || mode == "twopc-2pc",
                "{mode}: {key} in {row}"
            );
        }
        assert_eq!(
            row["syncs_per_decision"].is_number(),
            mode.starts_with("twopc"),
            "{mode}: {row}"
        );
        // The twopc modes split their latency into steps, p50 <= p99 each; the others
        // have no steps to report.
        for step in ["begin", "statements", "commit"] {
            let (p50, p99) = (
                &row[format!("{step}_p50_ms").as_str()],
                &row[format!("{step}_p99_ms").as_str()],
            );
            if !mode.starts_with("twopc") {
                assert!(p50.is_null() && p99.is_null(), "{mode}: {step} in {row}");
                continue;
            }
            let (p50, p99) = (p50.as_f64(), p99.as_f64());
            assert!(
                p50.zip(p99).is_some_and(|(a, b)| a >= 0.0 && a <= b),
                "{mode}: {step} in {row}"
            );
            if step != "begin" {
                // Every order runs an INSERT and commits: never instant.
                assert!(p50.is_some_and(|v| v > 0.0), "{mode}: {step} in {row}");
            }
        }
    }
    assert_nothing_left(dir.path());
}

/// `--modes` runs only the modes it names, in the report's usual order whatever the
/// order given, each once; without a twopc line there is no ratio to report.
#[test]
fn the_dual_write_modes_flag_runs_only_the_named_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dual_write(
        dir.path(),
        "1",
        "1",
        &["--modes", "twopc-2pc,naive,twopc-2pc"],
    );
    for (_, row) in report_of(&out, &["naive", "twopc-2pc"]) {
        assert!(row["tx_per_s"].as_f64().is_some_and(|v| v > 0.0), "{row}");
        assert!(row["twopc_throughput_ratio"].is_null(), "{row}");
        assert_eq!(row["undelivered"].as_u64(), Some(0), "{row}");
    }
    assert_nothing_left(dir.path());
}
