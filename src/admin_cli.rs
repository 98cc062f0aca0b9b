//! `twopc tx`: the operator's command line over the coordinator's `twopc.v1.Admin` service.
//!
//! - `twopc tx list [--state S] [--older-than DUR] [--limit N]`: unfinished transactions,
//!   oldest first.
//! - `twopc tx show ID`: one transaction's branches (state, attempts, last error, time
//!   since the last attempt) and its audit records.
//! - `twopc tx resolve ID --commit|--abort --reason TEXT [--operator WHO] [--force]`: a
//!   heuristic decision for a stuck transaction, recorded (who, when, why) in the
//!   coordinator's decision log. What it does by state: `proto/twopc/v1/admin.proto`.
//!
//! Every command takes `--coordinator URL` (env `TWOPC_COORDINATOR`, default
//! `http://127.0.0.1:7400`) and `--json` (one JSON document on stdout, for scripts;
//! otherwise aligned tables for people). Malformed flags and ids are refused before any
//! call (exit status 2, the message names the flag); a refused call prints the gRPC
//! status code and message and exits with status 1.
//!
//! Against a coordinator with TLS and tokens (`docs/security.md`): `--token` (env
//! `TWOPC_ADMIN_TOKEN`) is sent as `authorization: Bearer <token>`; `--ca-cert FILE` (env
//! `TWOPC_CA_CERT`) dials over TLS trusting that CA (an `http://` URL is then dialed as
//! `https://`); `--client-cert`/`--client-key` present a client certificate to a
//! coordinator that requires one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use twopc_coordinator::types::TxId;
use twopc_proto::auth::BearerToken;
use twopc_proto::v1 as pb;
use twopc_proto::v1::admin_client::AdminClient;

/// `twopc tx ...`: inspect and resolve transactions through the Admin service.
#[derive(Args, Debug)]
pub struct TxArgs {
    /// gRPC URL of the coordinator.
    #[arg(
        long,
        env = "TWOPC_COORDINATOR",
        default_value = "http://127.0.0.1:7400",
        global = true,
        value_name = "URL"
    )]
    coordinator: String,
    /// Print one JSON document (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The coordinator's admin token (twopc serve --admin-token), sent with every call.
    #[arg(
        long,
        env = "TWOPC_ADMIN_TOKEN",
        global = true,
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// CA certificate (PEM) of the coordinator's TLS certificate: dial over TLS.
    #[arg(long, env = "TWOPC_CA_CERT", global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires one (mutual TLS).
    #[arg(long, env = "TWOPC_CLIENT_CERT", global = true, value_name = "FILE")]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, env = "TWOPC_CLIENT_KEY", global = true, value_name = "FILE")]
    client_key: Option<PathBuf>,
    #[command(subcommand)]
    command: TxCommand,
}

/// How `twopc tx` reaches the coordinator.
struct ConnectOptions<'a> {
    url: &'a str,
    token: Option<&'a str>,
    ca_cert: Option<&'a Path>,
    client_cert: Option<&'a Path>,
    client_key: Option<&'a Path>,
}

#[derive(Subcommand, Debug)]
enum TxCommand {
    /// Transactions the coordinator has not finished, oldest first.
    List {
        /// Only transactions in this state.
        #[arg(long, value_enum, value_name = "S")]
        state: Option<StateArg>,
        /// Only transactions at least this old, e.g. 30s, 5m, 1h (units ms, s, m, h, d).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// At most this many (1-10000).
        #[arg(
            long,
            default_value_t = 100,
            value_parser = clap::value_parser!(u32).range(1..=10_000)
        )]
        limit: u32,
    },
    /// One transaction: branches (state, attempts, last error) and audit records.
    Show {
        /// The transaction id, as returned by Begin (e.g. 5f3a09c1-7-42).
        #[arg(value_name = "ID", value_parser = parse_tx_id)]
        id: String,
    },
    /// Record and carry out a heuristic decision for a stuck transaction.
    #[command(group(ArgGroup::new("decision").required(true).args(["commit", "abort"])))]
    Resolve {
        /// The transaction id.
        #[arg(value_name = "ID", value_parser = parse_tx_id)]
        id: String,
        /// Declare the branches it still waits for committed.
        #[arg(long)]
        commit: bool,
        /// Declare the branches it still waits for aborted (aborts it if undecided).
        #[arg(long)]
        abort: bool,
        /// Why (required; at most 1024 bytes). Kept in the audit record.
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Who (kept in the audit record); defaults to $USER, else "unknown".
        #[arg(long, value_name = "WHO", env = "USER", default_value = "unknown")]
        operator: String,
        /// Carry it out even though it contradicts the transaction's known outcome.
        #[arg(long)]
        force: bool,
    },
}

/// States `--state` accepts (the unfinished ones).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum StateArg {
    Active,
    Preparing,
    Deciding,
    Committing,
    Aborting,
}

impl StateArg {
    fn pb(self) -> pb::TxState {
        match self {
            StateArg::Active => pb::TxState::Active,
            StateArg::Preparing => pb::TxState::Preparing,
            StateArg::Deciding => pb::TxState::Deciding,
            StateArg::Committing => pb::TxState::Committing,
            StateArg::Aborting => pb::TxState::Aborting,
        }
    }
}

/// Parses `30s`, `5m`, `1h`, `250ms`, `2d`, or a sum like `1h30m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    const HELP: &str = "expected a duration like 30s, 5m or 1h (units: ms, s, m, h, d)";
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("empty duration; {HELP}"));
    }
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("{s:?} is not a duration: {HELP}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("{s:?} has no unit: {HELP}")),
            other => return Err(format!("{s:?} has an unknown unit {other:?}: {HELP}")),
        };
        rest = &rest[unit_len..];
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Checks a transaction id locally, so a typo never reaches the coordinator.
fn parse_tx_id(s: &str) -> Result<String, String> {
    s.parse::<TxId>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Runs one `twopc tx` command.
pub async fn run(args: TxArgs) -> anyhow::Result<()> {
    let mut client = connect(ConnectOptions {
        url: &args.coordinator,
        token: args.token.as_deref(),
        ca_cert: args.ca_cert.as_deref(),
        client_cert: args.client_cert.as_deref(),
        client_key: args.client_key.as_deref(),
    })
    .await?;
    let json = args.json;
    match args.command {
        TxCommand::List {
            state,
            older_than,
            limit,
        } => {
            let resp = client
                .list_transactions(pb::AdminListTransactionsRequest {
                    state: state.map_or(pb::TxState::Unspecified, StateArg::pb) as i32,
                    older_than_ms: older_than.map_or(0, |d| d.as_millis() as u64),
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let txs: Vec<Value> = resp.transactions.iter().map(summary_json).collect();
                print_json(&json!({ "transactions": txs }))?;
            } else {
                print!("{}", list_table(&resp.transactions));
            }
        }
        TxCommand::Show { id } => {
            let resp = client
                .show_transaction(pb::AdminShowTransactionRequest { tx_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&show_json(&resp))?;
            } else {
                print!("{}", show_text(&resp));
            }
        }
        TxCommand::Resolve {
            id,
            commit,
            abort,
            reason,
            operator,
            force,
        } => {
            let decision = match (commit, abort) {
                (true, false) => pb::ResolveDecision::Commit,
                (false, true) => pb::ResolveDecision::Abort,
                _ => return Err(anyhow!("give exactly one of --commit and --abort")),
            };
            let resp = client
                .resolve(pb::AdminResolveRequest {
                    tx_id: id,
                    decision: decision as i32,
                    reason,
                    operator,
                    force,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                print_json(&resolve_json(&resp))?;
            } else {
                print!("{}", resolve_text(&resp));
            }
        }
    }
    Ok(())
}

/// Reads a PEM file named by `flag`, checking it holds a `what` block.
fn read_pem(flag: &str, path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    if !String::from_utf8_lossy(&bytes).contains(what) {
        return Err(anyhow!(
            "{flag} {}: not a PEM file with a {what} block",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The TLS settings of the flags (`None`: plaintext).
fn client_tls(o: &ConnectOptions<'_>) -> anyhow::Result<Option<ClientTlsConfig>> {
    let Some(ca) = o.ca_cert else {
        if o.client_cert.is_some() || o.client_key.is_some() {
            return Err(anyhow!(
                "--client-cert and --client-key need --ca-cert (the CA of the coordinator's certificate)"
            ));
        }
        return Ok(None);
    };
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(
        "--ca-cert",
        ca,
        "-----BEGIN CERTIFICATE-----",
    )?));
    match (o.client_cert, o.client_key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read_pem("--client-cert", cert, "-----BEGIN CERTIFICATE-----")?,
                read_pem("--client-key", key, "PRIVATE KEY-----")?,
            ));
        }
        (Some(_), None) => return Err(anyhow!("--client-cert needs --client-key")),
        (None, Some(_)) => return Err(anyhow!("--client-key needs --client-cert")),
        (None, None) => {}
    }
    Ok(Some(tls))
}

async fn connect(
    o: ConnectOptions<'_>,
) -> anyhow::Result<AdminClient<InterceptedService<Channel, BearerToken>>> {
    let url = o.url;
    let auth = BearerToken::new(o.token).map_err(|e| anyhow!("--token: {e}"))?;
    let tls = client_tls(&o)?;
    let dialed = match (&tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    };
    if tls.is_none() && url.starts_with("https://") {
        return Err(anyhow!(
            "--coordinator {url:?} is https:// but --ca-cert (TWOPC_CA_CERT) is not given"
        ));
    }
    let mut endpoint = Endpoint::from_shared(dialed)
        .map_err(|e| anyhow!("--coordinator {url:?} is not a valid URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            anyhow!(
                "--ca-cert/--client-cert/--client-key cannot be used: {:#}",
                anyhow::Error::from(e)
            )
        })?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!("cannot connect to the coordinator at {url} (--coordinator, TWOPC_COORDINATOR)")
    })?;
    Ok(AdminClient::with_interceptor(channel, auth))
}

/// A refused or failed call: the status code's canonical name and the coordinator's
/// message.
fn status_error(s: Status) -> anyhow::Error {
    let code = match s.code() {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    };
    let transport_hint = " (is the coordinator up? does it serve TLS (--ca-cert) or require a \
                          client certificate (--client-cert, --client-key)?)";
    let hint = match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            " (give the coordinator's admin token with --token or TWOPC_ADMIN_TOKEN)"
        }
        Code::Unknown | Code::Unavailable | Code::Cancelled => transport_hint,
        // A plaintext client talking to a TLS port sees the TLS bytes as bad frames.
        Code::Internal if s.message().contains("h2 protocol error") => transport_hint,
        _ => "",
    };
    // The transport's own reason (a TLS alert, a refused connection) is in the sources.
    let mut message = s.message().to_string();
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    anyhow!("{code}: {message}{hint}")
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("cannot encode the JSON output")?;
    println!("{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Names, times, durations
// ---------------------------------------------------------------------------------------

fn state_name(code: i32) -> &'static str {
    match pb::TxState::try_from(code) {
        Ok(pb::TxState::Active) => "ACTIVE",
        Ok(pb::TxState::Preparing) => "PREPARING",
        Ok(pb::TxState::Deciding) => "DECIDING",
        Ok(pb::TxState::Committing) => "COMMITTING",
        Ok(pb::TxState::Committed) => "COMMITTED",
        Ok(pb::TxState::Aborting) => "ABORTING",
        Ok(pb::TxState::Aborted) => "ABORTED",
        Ok(pb::TxState::Forgotten) => "FORGOTTEN",
        _ => "-",
    }
}

fn outcome_name(code: i32) -> &'static str {
    match pb::Outcome::try_from(code) {
        Ok(pb::Outcome::Committed) => "COMMITTED",
        Ok(pb::Outcome::Aborted) => "ABORTED",
        Ok(pb::Outcome::Forgotten) => "FORGOTTEN",
        _ => "-",
    }
}

fn branch_state_name(code: i32) -> &'static str {
    match pb::BranchState::try_from(code) {
        Ok(pb::BranchState::Enlisted) => "ENLISTED",
        Ok(pb::BranchState::Preparing) => "PREPARING",
        Ok(pb::BranchState::Prepared) => "PREPARED",
        Ok(pb::BranchState::ReadOnly) => "READ_ONLY",
        Ok(pb::BranchState::VotedNo) => "VOTED_NO",
        Ok(pb::BranchState::Committed) => "COMMITTED",
        Ok(pb::BranchState::Aborted) => "ABORTED",
        _ => "-",
    }
}

fn decision_name(code: i32) -> &'static str {
    match pb::ResolveDecision::try_from(code) {
        Ok(pb::ResolveDecision::Commit) => "COMMIT",
        Ok(pb::ResolveDecision::Abort) => "ABORT",
        _ => "-",
    }
}

/// `850ms`, `12.3s`, `5m03s`, `2h05m`, `3d04h`.
fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", s, (ms % 1000) / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// RFC 3339 in UTC with milliseconds, from ms since the Unix epoch.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                l.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                l.push_str(cell);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

// ---------------------------------------------------------------------------------------
// list
// ---------------------------------------------------------------------------------------

fn summary_json(t: &pb::AdminTransaction) -> Value {
    json!({
        "tx_id": t.tx_id,
        "state": state_name(t.state),
        "outcome": outcome_name(t.outcome),
        "age_ms": t.age_ms,
        "branch_count": t.branch_count,
        "pending_branch_count": t.pending_branch_count,
        "heuristic": t.heuristic,
    })
}

fn list_table(txs: &[pb::AdminTransaction]) -> String {
    if txs.is_empty() {
        return "no unfinished transactions match\n".into();
    }
    let rows: Vec<Vec<String>> = txs
        .iter()
        .map(|t| {
            vec![
                t.tx_id.clone(),
                state_name(t.state).into(),
                outcome_name(t.outcome).into(),
                human_duration(t.age_ms),
                t.branch_count.to_string(),
                t.pending_branch_count.to_string(),
                if t.heuristic { "yes" } else { "-" }.into(),
            ]
        })
        .collect();
    table(
        &[
            "TX ID",
            "STATE",
            "OUTCOME",
            "AGE",
            "BRANCHES",
            "PENDING",
            "HEURISTIC",
        ],
        &rows,
    )
}

// ---------------------------------------------------------------------------------------
// show
// ---------------------------------------------------------------------------------------

fn audit_json(a: &pb::AuditRecord) -> Value {
    json!({
        "tx_id": a.tx_id,
        "decision": decision_name(a.decision),
        "operator": a.operator,
        "reason": a.reason,
        "force": a.force,
        "at_ms": a.at_ms,
        "at": rfc3339(a.at_ms),
        "prior_state": a.prior_state,
        "accepted": a.accepted,
        "contradicts": a.contradicts,
        "branches": a.branches,
        "detail": a.detail,
    })
}

fn branch_json(b: &pb::AdminBranch) -> Value {
    let spec = b.branch.clone().unwrap_or_default();
    json!({
        "branch_id": spec.branch_id,
        "participant_endpoint": spec.participant_endpoint,
        "commit_order": spec.commit_order,
        "state": branch_state_name(b.state),
        "attempts": b.attempts,
        "last_error": b.last_error,
        "last_attempt_age_ms": b.last_attempt_age_ms,
        "heuristic": match decision_name(b.heuristic) {
            "-" => Value::Null,
            d => Value::from(d),
        },
    })
}

fn show_json(r: &pb::AdminShowTransactionResponse) -> Value {
    json!({
        "tx_id": r.tx_id,
        "state": state_name(r.state),
        "outcome": outcome_name(r.outcome),
        "age_ms": r.age_ms,
        "reason": r.reason,
        "heuristic": r.heuristic,
        "branches": r.branches.iter().map(branch_json).collect::<Vec<_>>(),
        "audits": r.audits.iter().map(audit_json).collect::<Vec<_>>(),
    })
}

fn audit_text(out: &mut String, a: &pb::AuditRecord) {
    let result = match (a.accepted, a.contradicts) {
        (false, _) => "REFUSED",
        (true, true) => "ACCEPTED (CONTRADICTS the outcome)",
        (true, false) => "ACCEPTED",
    };
    let _ = writeln!(
        out,
        "  {}  {} by {}{} on {}: {}",
        rfc3339(a.at_ms),
        decision_name(a.decision),
        a.operator,
        if a.force { " (force)" } else { "" },
        a.prior_state,
        result
    );
    let _ = writeln!(out, "      reason:  {}", a.reason);
    if !a.branches.is_empty() {
        let _ = writeln!(out, "      branches: {}", a.branches.join(", "));
    }
    let _ = writeln!(out, "      detail:  {}", a.detail);
}

fn show_text(r: &pb::AdminShowTransactionResponse) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: &str| {
        let _ = writeln!(out, "{k:<12} {v}");
    };
    field("transaction", &r.tx_id);
    field("state", state_name(r.state));
    field("outcome", outcome_name(r.outcome));
    field(
        "age",
        &if r.age_ms == 0 {
            "-".to_string()
        } else {
            human_duration(r.age_ms)
        },
    );
    field("heuristic", yes_no(r.heuristic));
    if !r.reason.is_empty() {
        field("reason", &r.reason);
    }
    out.push('\n');
    if r.state == pb::TxState::Forgotten as i32 {
        out.push_str(
            "finished; its decision record was collected after the coordinator's retention \
             (--decision-retention-ms), so its outcome is no longer kept: learn it from the \
             branches\n",
        );
    } else if r.branches.is_empty() {
        out.push_str("no branch details (the coordinator no longer holds this transaction)\n");
    } else {
        let rows: Vec<Vec<String>> = r
            .branches
            .iter()
            .map(|b| {
                let spec = b.branch.clone().unwrap_or_default();
                vec![
                    spec.branch_id,
                    branch_state_name(b.state).into(),
                    b.attempts.to_string(),
                    if b.last_attempt_age_ms == 0 {
                        "-".into()
                    } else {
                        format!("{} ago", human_duration(b.last_attempt_age_ms))
                    },
                    match decision_name(b.heuristic) {
                        "-" => "-".to_string(),
                        d => d.to_string(),
                    },
                    if spec.participant_endpoint.is_empty() {
                        "-".into()
                    } else {
                        spec.participant_endpoint
                    },
                    if b.last_error.is_empty() {
                        "-".into()
                    } else {
                        b.last_error.replace('\n', " ")
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "BRANCH",
                "STATE",
                "ATTEMPTS",
                "LAST TRY",
                "HEURISTIC",
                "ENDPOINT",
                "LAST ERROR",
            ],
            &rows,
        ));
    }
    out.push('\n');
    if r.audits.is_empty() {
        out.push_str("no resolutions recorded\n");
    } else {
        out.push_str("resolutions (oldest first):\n");
        for a in &r.audits {
            audit_text(&mut out, a);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// resolve
// ---------------------------------------------------------------------------------------

fn resolve_json(r: &pb::AdminResolveResponse) -> Value {
    json!({
        "record": r.record.as_ref().map(audit_json),
        "state": state_name(r.state),
        "outcome": outcome_name(r.outcome),
        "heuristic_branches": r.heuristic_branches,
    })
}

fn resolve_text(r: &pb::AdminResolveResponse) -> String {
    let mut out = String::new();
    let Some(a) = &r.record else {
        return "resolved (no record returned)\n".into();
    };
    let _ = writeln!(
        out,
        "{}: {} accepted{}, recorded at {} by {}",
        a.tx_id,
        decision_name(a.decision),
        if a.contradicts {
            " (FORCED: contradicts the outcome)"
        } else {
            ""
        },
        rfc3339(a.at_ms),
        a.operator
    );
    let _ = writeln!(
        out,
        "state {}, outcome {}",
        state_name(r.state),
        outcome_name(r.outcome)
    );
    if r.heuristic_branches.is_empty() {
        out.push_str("no branch marked heuristic\n");
    } else {
        let _ = writeln!(
            out,
            "heuristically {}: {}",
            if a.decision == pb::ResolveDecision::Commit as i32 {
                "committed"
            } else {
                "aborted"
            },
            r.heuristic_branches.join(", ")
        );
    }
    let _ = writeln!(out, "{}", a.detail);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_name_the_problem() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "5", "x", "5x", "m5", "1.5s", "-1s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("30s"), "{bad:?}: {err}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn times_and_ages_read_well() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_345), "12.3s");
        assert_eq!(human_duration(303_000), "5m03s");
        assert_eq!(human_duration(7_500_000), "2h05m");
        assert_eq!(human_duration(273_600_000), "3d04h");
    }

    /// A collected transaction shows as FORGOTTEN, with what that means, not as an abort.
    #[test]
    fn a_forgotten_transaction_shows_what_it_means() {
        let r = pb::AdminShowTransactionResponse {
            tx_id: "6fbf49ed-3-1042".into(),
            state: pb::TxState::Forgotten as i32,
            outcome: pb::Outcome::Forgotten as i32,
            ..Default::default()
        };
        let text = show_text(&r);
        assert!(text.contains("state        FORGOTTEN"), "{text}");
        assert!(text.contains("outcome      FORGOTTEN"), "{text}");
        assert!(text.contains("outcome is no longer kept"), "{text}");
        assert!(!text.contains("ABORTED"), "{text}");
        let json = show_json(&r);
        assert_eq!(json["state"], "FORGOTTEN");
        assert_eq!(json["outcome"], "FORGOTTEN");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB", "C"],
            &[vec!["xxx".into(), "y".into(), "last one".into()]],
        );
        assert_eq!(t, "A    BB  C\nxxx  y   last one\n");
    }
}
