//! The operator's command line (`twopc tx list|show|resolve`) against a real `twopc serve`
//! process, with in-test participants: a transaction stuck in phase two is visible with a
//! growing age, its branches show attempts and last errors, a resolution that contradicts
//! the logged COMMIT is refused unless forced, a heuristic COMMIT finishes it, and every
//! use is in the audit trail (`tx show`, `--json`). Malformed flags and ids fail clearly.
//!
//! Every CLI call is the real binary in a child process; waits poll observable state.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{
    begin, commit, commit_in_background, coordinator_with_participant, expect_status, get_tx,
    reflected_services, twopc_tx, with_deadline, CliRun as Run, Coordinator, MsgKind,
    PrepareScript, ResState, TestParticipant,
};
use tonic::Code;
use twopc_proto::v1 as pb;

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(10);

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "CLI failed: {self:?}");
        self
    }

    #[track_caller]
    fn json(self) -> Value {
        let run = self.ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("--json output does not parse ({e}): {:?}", run.stdout))
    }

    /// Exits `code`, saying every needle on stderr (and nothing on stdout).
    #[track_caller]
    fn fails(self, code: i32, needles: &[&str]) -> Run {
        assert_eq!(self.code, Some(code), "want exit status {code}: {self:?}");
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr does not mention {n:?}: {self:?}"
            );
        }
        assert!(
            self.stdout.is_empty(),
            "nothing on stdout on failure: {self:?}"
        );
        self
    }
}

/// Runs `twopc tx <args>` (with `--coordinator url` when given).
async fn tx(url: Option<&str>, args: &[&str]) -> Run {
    tx_env(url, args, &[]).await
}

async fn tx_env(url: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Run {
    twopc_tx(url, args, env).await
}

/// Runs `twopc tx <args>` (a `--json` one) until `cond` holds for its output.
async fn poll_json(
    url: Option<&str>,
    args: &[&str],
    what: &str,
    mut cond: impl FnMut(&Value) -> bool,
) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let doc = tx(url, args).await.json();
        if cond(&doc) {
            return doc;
        }
        if Instant::now() >= end {
            panic!("timed out after {WAIT:?} waiting until {what}; last output {doc}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The entry of `tx_id` in a `tx list --json` document.
fn listed<'a>(doc: &'a Value, tx_id: &str) -> Option<&'a Value> {
    doc["transactions"]
        .as_array()
        .expect("transactions array")
        .iter()
        .find(|t| t["tx_id"] == tx_id)
}

fn branch<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["branches"]
        .as_array()
        .expect("branches array")
        .iter()
        .find(|b| b["branch_id"] == id)
        .unwrap_or_else(|| panic!("no branch {id} in {doc}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A committed transaction whose branch `b` refuses every commit (its participant is
/// "down" for commits): COMMIT is durable, phase two keeps retrying `b`.
async fn stuck_in_phase_two(coord: &Coordinator, p: &TestParticipant) -> String {
    let mut client = coord.client().await;
    p.refuse_commits("b", true);
    let id = begin(&mut client, vec![p.branch("a"), p.branch("b")]).await;
    let resp = commit(&mut client, &id, 100).await.expect("commit");
    assert_eq!(resp.pending_branches, vec!["b".to_string()]);
    id
}

/// The arguments of `twopc tx resolve <id> <how> --reason <reason> --operator <operator>`,
/// where `how` is the decision with its other flags (`--abort --force`, `--commit --json`).
fn resolve<'a>(id: &'a str, how: &[&'a str], reason: &'a str, operator: &'a str) -> Vec<&'a str> {
    let mut args = vec!["resolve", id];
    args.extend(how);
    args.extend(["--reason", reason, "--operator", operator]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_resolve_a_transaction_stuck_in_phase_two() {
    with_deadline(TEST_DEADLINE, async {
        let (coord, p, mut client) = coordinator_with_participant(&[]).await;
        let url = coord.url();
        let url = Some(url.as_str());
        let id = stuck_in_phase_two(&coord, &p).await;

        // Listed, with its age growing between two lists.
        let first = tx(url, &["list", "--json"]).await.json();
        let entry = listed(&first, &id).unwrap_or_else(|| panic!("{id} not listed: {first}"));
        assert_eq!(entry["state"], "COMMITTING");
        assert_eq!(entry["outcome"], "COMMITTED");
        assert_eq!(entry["branch_count"], 2);
        assert_eq!(entry["pending_branch_count"], 1);
        assert_eq!(entry["heuristic"], false);
        let age1 = entry["age_ms"].as_u64().expect("age_ms");
        poll_json(
            url,
            &["list", "--json"],
            "the listed age grows past 300 ms",
            |doc| {
                let age2 = listed(doc, &id)
                    .and_then(|t| t["age_ms"].as_u64())
                    .unwrap_or(0);
                age2 > age1 && age2 > 300
            },
        )
        .await;
        // --older-than and --state filter.
        let old = tx(url, &["list", "--older-than", "250ms", "--json"])
            .await
            .json();
        assert!(listed(&old, &id).is_some(), "older than 250 ms: {old}");
        let young = tx(url, &["list", "--older-than", "1h", "--json"])
            .await
            .json();
        assert!(listed(&young, &id).is_none(), "not older than 1 h: {young}");
        let committing = tx(url, &["list", "--state", "committing", "--json"])
            .await
            .json();
        assert!(listed(&committing, &id).is_some());
        let aborting = tx(url, &["list", "--state", "aborting", "--json"])
            .await
            .json();
        assert!(listed(&aborting, &id).is_none());
        // For people: an aligned table.
        let table = tx(url, &["list"]).await.ok().stdout;
        let header = table.lines().next().expect("header");
        assert!(
            header.starts_with("TX ID") && header.contains("PENDING"),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{id} not in {table}"));
        assert!(row.contains("COMMITTING"), "{row}");
        assert_eq!(
            header.find("STATE"),
            row.find("COMMITTING"),
            "columns are aligned:\n{table}"
        );

        // Show: the stuck branch with its attempts and last error.
        let shown = poll_json(
            url,
            &["show", &id, "--json"],
            "the stuck branch has been tried 3 times",
            |doc| branch(doc, "b")["attempts"].as_u64().unwrap_or(0) >= 3,
        )
        .await;
        assert_eq!(shown["state"], "COMMITTING");
        assert_eq!(shown["audits"], Value::Array(vec![]));
        let a = branch(&shown, "a");
        assert_eq!(a["state"], "COMMITTED");
        assert_eq!(a["attempts"], 2, "prepare + commit: {a}");
        assert_eq!(a["last_error"], "");
        let b = branch(&shown, "b");
        assert_eq!(b["state"], "PREPARED");
        assert!(
            b["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused")),
            "{b}"
        );
        assert_eq!(b["participant_endpoint"], p.endpoint());
        assert_eq!(b["heuristic"], Value::Null);
        let text = tx(url, &["show", &id]).await.ok().stdout;
        assert!(
            text.contains("LAST ERROR") && text.contains("commits of branch b are refused"),
            "{text}"
        );
        assert!(text.contains("no resolutions recorded"), "{text}");

        // ABORT contradicts the durable COMMIT: refused without --force (and recorded).
        tx(url, &resolve(&id, &["--abort"], "try abort", "bob"))
            .await
            .fails(1, &["FAILED_PRECONDITION", "COMMITTED", "force"]);
        let still = tx(url, &["list", "--json"]).await.json();
        assert!(listed(&still, &id).is_some(), "a refusal changes nothing");

        // COMMIT: the stuck branch is heuristically committed and the transaction finishes.
        let before = now_ms();
        let reason = "participant host p decommissioned; rows verified by hand";
        let resolved = tx(url, &resolve(&id, &["--commit", "--json"], reason, "alice"))
            .await
            .json();
        let after = now_ms();
        assert_eq!(resolved["state"], "COMMITTED");
        assert_eq!(resolved["outcome"], "COMMITTED");
        assert_eq!(resolved["heuristic_branches"], serde_json::json!(["b"]));
        let rec = &resolved["record"];
        assert_eq!(rec["operator"], "alice");
        assert_eq!(rec["reason"], reason);
        assert_eq!(rec["decision"], "COMMIT");
        assert_eq!(rec["accepted"], true);
        assert_eq!(rec["contradicts"], false);
        assert_eq!(rec["prior_state"], "COMMITTING");
        let at = rec["at_ms"].as_u64().expect("at_ms");
        assert!(before <= at && at <= after, "{before} <= {at} <= {after}");

        let gone = tx(url, &["list", "--json"]).await.json();
        assert!(listed(&gone, &id).is_none(), "finished: {gone}");
        let got = get_tx(&mut client, &id).await.expect("GetTransaction");
        assert_eq!(got.outcome, pb::Outcome::Committed as i32);
        let commits_then = p.count(&id, "b", MsgKind::Commit);

        // The audit trail: the refusal and the resolution, with who, when and why.
        let shown = tx(url, &["show", &id, "--json"]).await.json();
        assert_eq!(shown["state"], "COMMITTED");
        assert_eq!(shown["heuristic"], true);
        let audits = shown["audits"].as_array().expect("audits");
        assert_eq!(audits.len(), 2, "{shown}");
        assert_eq!(
            (
                &audits[0]["operator"],
                &audits[0]["decision"],
                &audits[0]["accepted"]
            ),
            (
                &Value::from("bob"),
                &Value::from("ABORT"),
                &Value::from(false)
            )
        );
        assert!(audits[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("COMMITTED")));
        assert_eq!(audits[1]["operator"], "alice");
        assert_eq!(audits[1]["reason"], reason);
        assert_eq!(audits[1]["at_ms"], at);
        assert!(audits[1]["at"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(audits[1]["branches"], serde_json::json!(["b"]));
        assert_eq!(branch(&shown, "a")["state"], "COMMITTED");
        assert_eq!(branch(&shown, "b")["heuristic"], "COMMIT");
        let text = tx(url, &["show", &id]).await.ok().stdout;
        for needle in [
            "alice",
            reason,
            "REFUSED",
            "ACCEPTED",
            "COMMIT by alice",
            "bob",
        ] {
            assert!(
                text.contains(needle),
                "show does not mention {needle:?}:\n{text}"
            );
        }

        // A forced ABORT of the (finished, COMMITTED) transaction is accepted and recorded
        // as contradicting; participants are still told COMMITTED.
        let forced = tx(
            url,
            &resolve(
                &id,
                &["--abort", "--force", "--json"],
                "rolled back by hand",
                "carol",
            ),
        )
        .await
        .json();
        assert_eq!(forced["record"]["accepted"], true);
        assert_eq!(forced["record"]["contradicts"], true);
        assert_eq!(forced["outcome"], "COMMITTED");
        let shown = tx(url, &["show", &id, "--json"]).await.json();
        let audits = shown["audits"].as_array().expect("audits");
        assert_eq!(audits.len(), 3);
        assert_eq!(audits[2]["operator"], "carol");
        assert_eq!(audits[2]["force"], true);
        let got = get_tx(&mut client, &id).await.expect("GetTransaction");
        assert_eq!(got.outcome, pb::Outcome::Committed as i32);

        // The coordinator forgot it: the refusing participant gets no more commits.
        assert_eq!(p.count(&id, "b", MsgKind::Commit), commits_then);
        assert_eq!(p.state(&id, "b"), Some(ResState::Prepared));
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_abort_of_a_live_commit_and_abort_of_an_undecided_one() {
    with_deadline(TEST_DEADLINE, async {
        let (coord, p, mut client) = coordinator_with_participant(&[]).await;
        let url = coord.url();
        let url = Some(url.as_str());

        // A live COMMITTING transaction, forced to ABORT: the stuck branch gets no more
        // commits, the decision log still says COMMITTED.
        let id = stuck_in_phase_two(&coord, &p).await;
        let forced = tx(
            url,
            &resolve(
                &id,
                &["--abort", "--force", "--json"],
                "rolled b back by hand",
                "dave",
            ),
        )
        .await
        .json();
        assert_eq!(forced["record"]["contradicts"], true);
        assert_eq!(forced["record"]["prior_state"], "COMMITTING");
        assert_eq!(forced["heuristic_branches"], serde_json::json!(["b"]));
        assert_eq!(forced["outcome"], "COMMITTED");
        let text = tx(url, &["show", &id]).await.ok().stdout;
        assert!(text.contains("CONTRADICTS"), "{text}");
        let doc = tx(url, &["list", "--json"]).await.json();
        assert!(listed(&doc, &id).is_none());
        let got = get_tx(&mut client, &id).await.expect("GetTransaction");
        assert_eq!(got.outcome, pb::Outcome::Committed as i32);
        assert_eq!(p.state(&id, "b"), Some(ResState::Prepared));

        // An undecided transaction (a prepare hangs): COMMIT is refused even forced,
        // ABORT aborts it and the waiting Commit call is told ABORTED.
        p.script("h", PrepareScript::Hang);
        let id2 = begin(&mut client, vec![p.branch("a2"), p.branch("h")]).await;
        let waiting = commit_in_background(&coord.client().await, &id2, 0);
        poll_json(
            url,
            &["list", "--state", "preparing", "--json"],
            "the transaction is PREPARING",
            |doc| listed(doc, &id2).is_some(),
        )
        .await;
        tx(
            url,
            &resolve(&id2, &["--commit", "--force"], "please", "eve"),
        )
        .await
        .fails(1, &["FAILED_PRECONDITION", "undecided"]);
        let aborted = tx(url, &resolve(&id2, &["--abort"], "stuck prepare", "eve"))
            .await
            .ok()
            .stdout;
        assert!(aborted.contains("ABORT accepted"), "{aborted}");
        assert!(aborted.contains("outcome ABORTED"), "{aborted}");
        let status = expect_status(waiting.await.expect("commit task"), Code::Aborted, &[]);
        assert!(
            status
                .message()
                .contains("resolved to ABORT by operator eve"),
            "{status:?}"
        );
        let got = get_tx(&mut client, &id2).await.expect("GetTransaction");
        assert_eq!(got.outcome, pb::Outcome::Aborted as i32);
        p.release("h");
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flags_and_ids_give_clear_errors() {
    with_deadline(TEST_DEADLINE, async {
        let (coord, p, mut client) = coordinator_with_participant(&[]).await;
        let url = coord.url();
        let url = Some(url.as_str());
        let id = begin(&mut client, vec![p.branch("a")]).await;

        // Refused before any call (exit status 2), naming the flag or argument.
        tx(url, &["show", "not-a-tx"])
            .await
            .fails(2, &["<ID>", "malformed"]);
        tx(url, &["list", "--older-than", "5x"])
            .await
            .fails(2, &["--older-than", "5x"]);
        tx(url, &["list", "--older-than", "10"])
            .await
            .fails(2, &["--older-than", "unit"]);
        tx(url, &["list", "--state", "bogus"])
            .await
            .fails(2, &["--state", "bogus"]);
        tx(url, &["resolve", &id, "--commit"])
            .await
            .fails(2, &["--reason"]);
        tx(url, &["resolve", &id, "--reason", "x"])
            .await
            .fails(2, &["--commit", "--abort"]);
        tx(
            url,
            &["resolve", &id, "--commit", "--abort", "--reason", "x"],
        )
        .await
        .fails(2, &["--abort", "cannot be used with"]);

        // Refused by the coordinator (exit status 1, its status and message).
        tx(url, &["show", "00000000-1-1"])
            .await
            .fails(1, &["NOT_FOUND", "never issued"]);
        let long = "r".repeat(1025);
        tx(url, &["resolve", &id, "--abort", "--reason", &long])
            .await
            .fails(1, &["INVALID_ARGUMENT", "reason", "1024"]);
        tx(
            url,
            &["resolve", &id, "--abort", "--reason", "x", "--operator", ""],
        )
        .await
        .fails(1, &["INVALID_ARGUMENT", "operator"]);
        // Nothing was recorded for invalid requests, and the transaction is untouched.
        let shown = tx(url, &["show", &id, "--json"]).await.json();
        assert_eq!(shown["audits"], Value::Array(vec![]));
        assert_eq!(shown["state"], "ACTIVE");

        // The coordinator: unreachable, malformed, or from the environment.
        tx(Some("http://127.0.0.1:1"), &["list"]).await.fails(
            1,
            &["cannot connect", "http://127.0.0.1:1", "--coordinator"],
        );
        tx(Some("not a url"), &["list"])
            .await
            .fails(1, &["--coordinator", "not a valid URL"]);
        let doc = tx_env(
            None,
            &["list", "--json"],
            &[("TWOPC_COORDINATOR", &coord.url())],
        )
        .await
        .json();
        assert!(
            listed(&doc, &id).is_some(),
            "TWOPC_COORDINATOR is used: {doc}"
        );
        // --operator defaults to $USER.
        let resolved = tx_env(
            url,
            &[
                "resolve",
                &id,
                "--abort",
                "--reason",
                "test cleanup",
                "--json",
            ],
            &[("USER", "frank")],
        )
        .await
        .json();
        assert_eq!(resolved["record"]["operator"], "frank");
        assert_eq!(resolved["outcome"], "ABORTED");

        // gRPC reflection lists the Admin service next to the Coordinator.
        let services = reflected_services(coord.channel().await).await;
        for want in ["twopc.v1.Admin", "twopc.v1.Coordinator"] {
            assert!(
                services.iter().any(|s| s == want),
                "{want} missing: {services:?}"
            );
        }
    })
    .await;
}
