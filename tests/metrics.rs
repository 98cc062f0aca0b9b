//! The Prometheus endpoint of the real `twopc serve` process (`--metrics-listen`): runs
//! transactions against in-test participants, scrapes `/metrics` over plain HTTP/1.1,
//! parses the text exposition format and checks the numbers against what was done.
//!
//! Every test has its own data directory and ports and an overall deadline, and waits by
//! polling scrapes, never by fixed sleeps.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use support::{
    begin, commit, commit_in_background, coordinator_with_participant, expect_status, get_tx,
    twopc_tx, with_deadline, Coordinator, MsgKind, PrepareScript, ResState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use twopc_proto::v1 as pb;

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(40);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(10);

const METRICS_FLAGS: &[(&str, &str)] = &[("--metrics-listen", "127.0.0.1:0")];

// ---------------------------------------------------------------------------------------
// A plain HTTP/1.1 client and an exposition-format parser
// ---------------------------------------------------------------------------------------

/// One HTTP response.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` over a fresh connection (`Connection: close`), read to the end.
async fn http(addr: SocketAddr, method: &str, path: &str) -> HttpResponse {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response within the deadline")
        .expect("read response");
    let raw = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let resp = HttpResponse {
        status,
        headers,
        body: body.to_string(),
    };
    if let Some(len) = resp.header("content-length") {
        assert_eq!(
            len.parse::<usize>().expect("numeric content-length"),
            resp.body.len(),
            "content-length matches the body"
        );
    }
    resp
}

/// One sample line: `name{k="v",...} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    /// Family name → type from `# TYPE` lines.
    types: HashMap<String, String>,
}

fn parse_value(v: &str) -> f64 {
    match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {v:?}")),
    }
}

/// Parses `{k="v",k2="v2"}` (the braces included); returns the labels and the rest.
fn parse_labels(s: &str) -> (Vec<(String, String)>, &str) {
    let mut labels = Vec::new();
    let bytes = s.as_bytes();
    assert_eq!(bytes.first(), Some(&b'{'));
    let mut i = 1;
    loop {
        if bytes[i] == b'}' {
            return (labels, &s[i + 1..]);
        }
        let eq = s[i..].find('=').expect("label '='") + i;
        let key = s[i..eq].trim().to_string();
        assert_eq!(bytes[eq + 1], b'"', "label value is quoted in {s:?}");
        let mut value = String::new();
        let mut j = eq + 2;
        loop {
            match bytes[j] {
                b'\\' => {
                    value.push(match bytes[j + 1] {
                        b'n' => '\n',
                        other => other as char,
                    });
                    j += 2;
                }
                b'"' => break,
                _ => {
                    let c = s[j..].chars().next().expect("char");
                    value.push(c);
                    j += c.len_utf8();
                }
            }
        }
        labels.push((key, value));
        i = j + 1;
        if bytes[i] == b',' {
            i += 1;
        }
    }
}

fn parse_exposition(text: &str) -> Scrape {
    let mut samples = Vec::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("# TYPE name type");
            types.insert(name.to_string(), ty.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("sample has a value");
        let name = line[..name_end].to_string();
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().expect("sample value"));
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Scrape { samples, types }
}

impl Scrape {
    /// The one sample of `name` whose labels include `labels`.
    #[track_caller]
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected exactly one sample {name}{labels:?}, found {found:?}"
        );
        found[0].value
    }

    /// A sample without labels.
    #[track_caller]
    fn value(&self, name: &str) -> f64 {
        self.get(name, &[])
    }

    /// The sum over every sample of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// A histogram's `_count`, checked against its `+Inf` bucket and its buckets'
    /// monotonicity.
    #[track_caller]
    fn histogram_count(&self, name: &str) -> f64 {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name} is a histogram"
        );
        let count = self.value(&format!("{name}_count"));
        let buckets: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .map(|s| s.value)
            .collect();
        assert!(!buckets.is_empty(), "{name} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name} buckets are cumulative: {buckets:?}"
        );
        assert_eq!(
            self.get(&format!("{name}_bucket"), &[("le", "+Inf")]),
            count,
            "{name}: +Inf bucket equals count"
        );
        count
    }
}

/// GET /metrics, checked and parsed.
async fn scrape(coord: &Coordinator) -> Scrape {
    let resp = http(coord.metrics_addr(), "GET", "/metrics").await;
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.body);
    let ctype = resp.header("content-type").unwrap_or_default();
    assert!(
        ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
        "content type {ctype:?}"
    );
    parse_exposition(&resp.body)
}

/// Scrapes until `cond` holds (panics with the last scrape after [`WAIT`]).
async fn scrape_until(coord: &Coordinator, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(coord).await;
        if cond(&s) {
            return s;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out waiting for: {what}; last scrape: {s:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `twopc tx resolve <tx_id> <args>` against `coord` and returns its exit status and
/// output (the real binary, as an operator would run it).
async fn resolve_cli(coord: &Coordinator, tx_id: &str, args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<&str> = ["resolve", tx_id].iter().chain(args).copied().collect();
    let run = twopc_tx(Some(&coord.url()), &args, &[]).await;
    (run.code, format!("{}{}", run.stdout, run.stderr))
}

/// `twopc_heuristic_resolutions_total{decision, result}`.
#[track_caller]
fn resolutions(s: &Scrape, decision: &str, result: &str) -> f64 {
    s.get(
        "twopc_heuristic_resolutions_total",
        &[("decision", decision), ("result", result)],
    )
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_outcomes_phases_and_in_doubt_transactions() {
    with_deadline(TEST_DEADLINE, async {
        let (coord, p, mut c) = coordinator_with_participant(METRICS_FLAGS).await;

        // Fresh process: every series exists (label children included) and is zero.
        let s0 = scrape(&coord).await;
        for name in [
            "twopc_transactions_begun_total",
            "twopc_transactions_committed_total",
            "twopc_transactions_live",
            "twopc_transactions_in_doubt",
            "twopc_transactions_in_doubt_oldest_age_seconds",
            "twopc_halted",
        ] {
            assert_eq!(s0.value(name), 0.0, "{name} at start");
        }
        for reason in [
            "vote_no",
            "prepare_timeout",
            "tx_timeout",
            "client",
            "recovery",
        ] {
            assert_eq!(
                s0.get("twopc_transactions_aborted_total", &[("reason", reason)]),
                0.0
            );
        }
        assert_eq!(s0.types["twopc_transactions_begun_total"], "counter");
        assert_eq!(s0.types["twopc_transactions_in_doubt"], "gauge");
        assert_eq!(s0.histogram_count("twopc_commit_seconds"), 0.0);

        // Unknown paths are 404, other methods on /metrics 405; the endpoint still works.
        for path in ["/", "/nope", "/metrics/", "/metricsx"] {
            let r = http(coord.metrics_addr(), "GET", path).await;
            assert_eq!(r.status, 404, "GET {path}");
        }
        let r = http(coord.metrics_addr(), "POST", "/metrics").await;
        assert_eq!(r.status, 405, "POST /metrics");

        // Three two-phase commits.
        for i in 0..3 {
            let tx = begin(
                &mut c,
                vec![p.branch(&format!("a{i}")), p.branch(&format!("b{i}"))],
            )
            .await;
            let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
            assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
            assert!(resp.pending_branches.is_empty(), "phase two finished");
        }
        // One abort by a no vote, one by the client.
        p.script("no", PrepareScript::No("out of stock".into()));
        let tx = begin(&mut c, vec![p.branch("no"), p.branch("fine")]).await;
        let err = commit(&mut c, &tx, 5_000)
            .await
            .expect_err("a no vote aborts");
        assert_eq!(err.code(), Code::Aborted);
        let tx = begin(&mut c, vec![p.branch("c1"), p.branch("c2")]).await;
        c.abort(pb::AbortRequest {
            tx_id: tx.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("Abort");

        let s = scrape_until(&coord, "every transaction finished", |s| {
            s.value("twopc_transactions_live") == 0.0
        })
        .await;
        assert_eq!(s.value("twopc_transactions_begun_total"), 5.0);
        assert_eq!(s.value("twopc_transactions_committed_total"), 3.0);
        assert_eq!(s.sum("twopc_transactions_aborted_total"), 2.0);
        assert_eq!(
            s.get("twopc_transactions_aborted_total", &[("reason", "vote_no")]),
            1.0
        );
        assert_eq!(
            s.get("twopc_transactions_aborted_total", &[("reason", "client")]),
            1.0
        );
        // Every committed transaction went through each phase once.
        for h in [
            "twopc_prepare_round_seconds",
            "twopc_decision_force_seconds",
            "twopc_phase_two_seconds",
            "twopc_commit_seconds",
        ] {
            assert_eq!(s.histogram_count(h), 3.0, "{h}_count");
            let sum = s.value(&format!("{h}_sum"));
            assert!(sum > 0.0 && sum < 30.0, "{h}_sum = {sum}");
        }
        // The log: three decisions, at least one sync, batches adding up to the decisions.
        assert_eq!(s.value("twopc_log_decisions_total"), 3.0);
        assert!(s.value("twopc_log_syncs_total") >= 1.0);
        let batches = s.histogram_count("twopc_log_sync_batch_size");
        assert!((1.0..=3.0).contains(&batches), "batches {batches}");
        assert_eq!(s.value("twopc_log_sync_batch_size_sum"), 3.0);
        // Nothing was retried, nothing ignored, nothing in doubt.
        assert_eq!(s.sum("twopc_phase_two_retries_total"), 0.0);
        assert_eq!(s.sum("twopc_participant_answers_ignored_total"), 0.0);
        assert_eq!(s.value("twopc_transactions_in_doubt"), 0.0);
        assert_eq!(
            s.value("twopc_transactions_in_doubt_oldest_age_seconds"),
            0.0
        );
        assert_eq!(s.value("twopc_halted"), 0.0);

        // A participant refuses commits: the transaction is decided but stays in doubt,
        // and its age grows from one scrape to the next.
        p.refuse_commits("stuck", true);
        let tx = begin(&mut c, vec![p.branch("stuck"), p.branch("ok")]).await;
        let resp = commit(&mut c, &tx, 100).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert_eq!(resp.pending_branches, vec!["stuck".to_string()]);
        let first = scrape_until(&coord, "a commit retry", |s| {
            s.get("twopc_phase_two_retries_total", &[("message", "commit")]) >= 1.0
        })
        .await;
        assert_eq!(first.value("twopc_transactions_in_doubt"), 1.0);
        assert_eq!(first.value("twopc_transactions_live"), 1.0);
        assert_eq!(first.value("twopc_transactions_committed_total"), 4.0);
        assert_eq!(first.histogram_count("twopc_commit_seconds"), 3.0);
        let age1 = first.value("twopc_transactions_in_doubt_oldest_age_seconds");
        assert!(age1 > 0.0, "oldest age {age1}");
        let second = scrape_until(&coord, "the in-doubt age grows", |s| {
            s.value("twopc_transactions_in_doubt_oldest_age_seconds") > age1
        })
        .await;
        assert_eq!(second.value("twopc_transactions_in_doubt"), 1.0);

        // Once the participant accepts, it finishes and nothing is in doubt any more.
        p.refuse_commits("stuck", false);
        let done = scrape_until(&coord, "the stuck transaction finished", |s| {
            s.value("twopc_transactions_in_doubt") == 0.0
        })
        .await;
        assert_eq!(p.state(&tx, "stuck"), Some(ResState::Committed));
        assert_eq!(
            done.value("twopc_transactions_in_doubt_oldest_age_seconds"),
            0.0
        );
        assert_eq!(done.value("twopc_transactions_live"), 0.0);
        assert_eq!(done.histogram_count("twopc_commit_seconds"), 4.0);
        assert_eq!(done.histogram_count("twopc_phase_two_seconds"), 4.0);
        let retries = done.get("twopc_phase_two_retries_total", &[("message", "commit")]);
        let refused = p.count(&tx, "stuck", MsgKind::Commit) as f64;
        // Every commit the participant saw beyond the first was a retry.
        assert_eq!(retries, refused - 1.0, "retries vs commits received");
        assert_eq!(
            done.get("twopc_phase_two_retries_total", &[("message", "abort")]),
            0.0
        );
        assert_eq!(done.value("twopc_transactions_begun_total"), 6.0);
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_recovery_progress_after_a_restart() {
    with_deadline(TEST_DEADLINE, async {
        let (mut coord, p, mut c) = coordinator_with_participant(METRICS_FLAGS).await;

        // A decided transaction whose phase two cannot finish, then a crash.
        p.refuse_commits("x", true);
        let tx = begin(&mut c, vec![p.branch("x"), p.branch("y")]).await;
        let resp = commit(&mut c, &tx, 100).await.expect("Commit");
        assert_eq!(resp.pending_branches, vec!["x".to_string()]);
        let s = scrape(&coord).await;
        assert_eq!(
            s.get("twopc_recovery_transactions", &[("kind", "commit")]),
            0.0
        );
        coord.restart().await;

        // The new process found one commit to re-drive; it stays in doubt while refused.
        // (The metrics port answers as soon as it is bound; recovery is scheduled a moment
        // later, so wait for it rather than race it.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            let s = scrape(&coord).await;
            if s.get("twopc_recovery_transactions", &[("kind", "commit")]) >= 1.0
                || std::time::Instant::now() > deadline
            {
                break s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(
            s.get("twopc_recovery_transactions", &[("kind", "commit")]),
            1.0
        );
        assert_eq!(
            s.get("twopc_recovery_transactions", &[("kind", "abort")]),
            0.0
        );
        assert_eq!(
            s.get("twopc_recovery_remaining", &[("kind", "commit")]),
            1.0
        );
        assert_eq!(s.value("twopc_transactions_in_doubt"), 1.0);
        // Decided by the earlier process: not counted again here.
        assert_eq!(s.value("twopc_transactions_committed_total"), 0.0);
        assert_eq!(s.value("twopc_transactions_begun_total"), 0.0);

        p.refuse_commits("x", false);
        let s = scrape_until(&coord, "recovery finished", |s| {
            s.get("twopc_recovery_remaining", &[("kind", "commit")]) == 0.0
        })
        .await;
        assert_eq!(p.state(&tx, "x"), Some(ResState::Committed));
        assert_eq!(
            s.get("twopc_recovery_transactions", &[("kind", "commit")]),
            1.0
        );
        assert_eq!(s.value("twopc_transactions_in_doubt"), 0.0);
        assert_eq!(s.value("twopc_transactions_committed_total"), 0.0);
        // Not timed: its phases started in the earlier process.
        assert_eq!(s.histogram_count("twopc_commit_seconds"), 0.0);
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heuristic_resolutions_count_as_outcomes_once_and_as_resolutions() {
    with_deadline(TEST_DEADLINE, async {
        let (coord, p, mut c) = coordinator_with_participant(METRICS_FLAGS).await;

        let s0 = scrape(&coord).await;
        assert_eq!(s0.types["twopc_heuristic_resolutions_total"], "counter");
        for decision in ["commit", "abort"] {
            for result in ["accepted", "contradicting", "refused"] {
                assert_eq!(resolutions(&s0, decision, result), 0.0);
            }
        }
        assert_eq!(
            s0.get(
                "twopc_transactions_aborted_total",
                &[("reason", "operator")]
            ),
            0.0
        );

        // A transaction stuck in PREPARING (one prepare never answers), resolved to ABORT
        // with the CLI: exactly one more abort, by the operator, and one resolution.
        p.script("h", PrepareScript::Hang);
        let tx = begin(&mut c, vec![p.branch("a"), p.branch("h")]).await;
        let waiting = commit_in_background(&coord.client().await, &tx, 0);
        scrape_until(&coord, "the transaction is in doubt", |s| {
            s.value("twopc_transactions_in_doubt") == 1.0
        })
        .await;
        let before = scrape(&coord).await;
        let aborted_before = before.sum("twopc_transactions_aborted_total");
        let (code, out) = resolve_cli(
            &coord,
            &tx,
            &["--abort", "--reason", "prepare stuck", "--operator", "ops"],
        )
        .await;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("ABORT accepted"), "{out}");
        expect_status(waiting.await.expect("commit task"), Code::Aborted, &[]);
        let got = get_tx(&mut c, &tx).await.expect("GetTransaction");
        assert_eq!(got.outcome, pb::Outcome::Aborted as i32);

        // The hung prepare answers late, the aborts are acknowledged: the transaction
        // finishes, and none of that is a second abort.
        p.release("h");
        let s = scrape_until(&coord, "the resolved transaction finished", |s| {
            s.value("twopc_transactions_live") == 0.0
        })
        .await;
        assert_eq!(
            s.sum("twopc_transactions_aborted_total"),
            aborted_before + 1.0,
            "exactly one abort: {s:#?}"
        );
        assert_eq!(
            s.get(
                "twopc_transactions_aborted_total",
                &[("reason", "operator")]
            ),
            1.0
        );
        assert_eq!(resolutions(&s, "abort", "accepted"), 1.0);
        assert_eq!(s.sum("twopc_heuristic_resolutions_total"), 1.0);
        assert_eq!(s.value("twopc_transactions_committed_total"), 0.0);

        // A decided transaction stuck in phase two: ABORT without force is refused, COMMIT
        // finishes it. Both are counted as resolutions; neither is a second decision.
        p.refuse_commits("x", true);
        let tx2 = begin(&mut c, vec![p.branch("x"), p.branch("y")]).await;
        let resp = commit(&mut c, &tx2, 100).await.expect("Commit");
        assert_eq!(resp.pending_branches, vec!["x".to_string()]);
        let (code, out) = resolve_cli(
            &coord,
            &tx2,
            &["--abort", "--reason", "try", "--operator", "ops"],
        )
        .await;
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains("FAILED_PRECONDITION"), "{out}");
        let (code, out) = resolve_cli(
            &coord,
            &tx2,
            &["--commit", "--reason", "x verified", "--operator", "ops"],
        )
        .await;
        assert_eq!(code, Some(0), "{out}");
        let s = scrape_until(&coord, "the committed transaction finished", |s| {
            s.value("twopc_transactions_live") == 0.0
        })
        .await;
        assert_eq!(s.value("twopc_transactions_committed_total"), 1.0);
        assert_eq!(
            s.sum("twopc_transactions_aborted_total"),
            aborted_before + 1.0
        );
        assert_eq!(resolutions(&s, "abort", "refused"), 1.0);
        assert_eq!(resolutions(&s, "commit", "accepted"), 1.0);

        // Forced against the logged COMMIT: counted as contradicting, outcome unchanged.
        let (code, out) = resolve_cli(
            &coord,
            &tx2,
            &[
                "--abort",
                "--force",
                "--reason",
                "undone by hand",
                "--operator",
                "ops",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "{out}");
        let s = scrape(&coord).await;
        assert_eq!(resolutions(&s, "abort", "contradicting"), 1.0);
        assert_eq!(s.sum("twopc_heuristic_resolutions_total"), 4.0);
        assert_eq!(s.value("twopc_transactions_committed_total"), 1.0);
        assert_eq!(
            s.sum("twopc_transactions_aborted_total"),
            aborted_before + 1.0
        );
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}
