//! Bad input: every Coordinator RPC fed random and malformed messages.
//!
//! Each test starts one real coordinator in-process (gRPC over loopback, the real sled
//! decision log, one participant that votes yes) and creates three reference transactions:
//! a COMMITTED one, an ABORTED one and an ACTIVE "canary" with two enlisted branches. Then a
//! proptest property runs against that one server, case after case:
//!
//! - every call gets an answer (OK or a status) within a deadline, and no server thread
//!   panics;
//! - every refusal has the code the proto and the input call for, and a message that names
//!   the offending field or value. The expectations come from an oracle written from the
//!   proto's rules (`branch_id_problem`, `parse_canonical`, `join`, ...), not from the
//!   coordinator's own validation code;
//! - BeginLocal, ReportLocalCommits and ReleaseUnused refuse what only a local
//!   transaction takes, and a coordinator with one-phase commits off refuses BeginLocal
//!   naming the setting;
//! - after every case the reference transactions read back exactly as before (their age
//!   aside), ListTransactions still answers, and the log holds no new COMMIT decision.
//!
//! The inputs: arbitrary unicode, control characters and multi-KB strings in every string
//! field; out-of-range enums; huge numbers; many and duplicated branches; well-formed ids of
//! other nodes, epochs and sequences; protobuf garbage inside a correct gRPC frame (a raw
//! codec on `tonic::client::Grpc`); and hand-built gRPC frames (bad flags, lengths,
//! truncation) sent as a raw HTTP/2 request. `malformed_requests_get_the_documented_code`
//! pins the exact code of specific cases.
//!
//! A failure names its seed: `PROPTEST_RNG_SEED=<seed>` replays it, `PROPTEST_CASES=<n>`
//! changes the number of cases. Failures are not persisted to any file.
//!
//! One participant answer is bad input too: an abort answered without a result
//! (`ABORT_RESULT_UNSPECIFIED`) is a failed delivery, asked again, never an abort
//! (`an_abort_answered_without_a_result_is_asked_again`).
//!
//! Endpoints that a transaction accepted here may be contacted (the courtesy abort of an
//! aborted transaction): those all point at this test's own participant on 127.0.0.1 (or at
//! `localhost` / `[::1]` on its port). Other valid-looking endpoints are only ever sent to
//! be refused.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};
use prost::bytes::{Buf, BufMut};
use prost::Message as _;
use tokio::sync::oneshot;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::Body as HttpBody;
use tonic::codegen::Service as _;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::{DecisionLog, SledLog, SledLogOptions};
use twopc_proto::v1 as pb;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::participant::{AlwaysYes, Behaviour, Services, TestParticipant};
use twopc_testkit::requests;

mod support;
use support::{quick_retries, serve};

type Client = CoordinatorClient<Channel>;
type Fallible<T> = Result<T, TestCaseError>;

/// Longest transaction timeout (proto: "At most 24 hours").
const DAY_MS: u64 = 24 * 3600 * 1000;
/// Longest phase-two wait (coordinator's documented maximum).
const MAX_WAIT_MS: u64 = 600_000;
/// Most local transactions one BeginLocal begins.
const MAX_LOCAL_BEGIN: u32 = 256;
/// Most transactions one ReportLocalCommits carries.
const MAX_LOCAL_REPORTS: usize = 1024;
/// Longest abort reason, in bytes.
const MAX_REASON: usize = 1024;
/// Largest ListTransactions limit.
const MAX_LIMIT: u32 = 10_000;
/// The coordinator's default --max-branches.
const MAX_BRANCHES: usize = 64;
/// Longest tx id, in bytes.
const MAX_TX_ID: usize = 64;
/// Every call must be answered within this.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// The codes the Coordinator service documents for its refusals.
const DOCUMENTED: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::Unavailable,
];
/// What tonic's own gRPC framing and protobuf decoding answer for garbage, besides those.
const DECODE_CODES: &[Code] = &[Code::Internal, Code::OutOfRange, Code::ResourceExhausted];

// ---------------------------------------------------------------------------------------
// Panics on server threads
// ---------------------------------------------------------------------------------------

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static PANIC_HOOK: Once = Once::new();

/// Records every panic on a thread of a test's runtime ("bad-input-*"), then lets the
/// previous hook print it as usual.
fn install_panic_recorder() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if name.starts_with("bad-input-") {
                if let Ok(mut p) = PANICS.lock() {
                    p.push(format!("[{name}] {info}"));
                }
            }
            previous(info);
        }));
    });
}

fn panics_on(threads: &str) -> Vec<String> {
    PANICS
        .lock()
        .map(|p| {
            p.iter()
                .filter(|m| m.starts_with(&format!("[{threads}]")))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------

/// What a call must answer: OK, or this code with a message containing every needle.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    Ok,
    Err(Code, Vec<String>),
}

fn want(code: Code, needles: &[&str]) -> Want {
    Want::Err(code, needles.iter().map(|s| s.to_string()).collect())
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

/// A refusal is clean: a code from `allowed` and a message that says something.
fn clean_status(what: &str, s: &Status, allowed: &[Code]) -> Fallible<()> {
    if !allowed.contains(&s.code()) {
        return Err(fail(format!(
            "{what}: code {:?} is not among {allowed:?}; message {:?}",
            s.code(),
            s.message()
        )));
    }
    if s.message().trim().is_empty() {
        return Err(fail(format!(
            "{what}: {:?} with an empty message",
            s.code()
        )));
    }
    Ok(())
}

thread_local! {
    /// How often each call answered each code, for the summary a property prints.
    static SEEN: std::cell::RefCell<std::collections::BTreeMap<String, u64>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

fn seen(what: &str, code: Code) {
    SEEN.with(|s| {
        *s.borrow_mut()
            .entry(format!("{what} {code:?}"))
            .or_default() += 1
    });
}

/// An Abort or a ReleaseUnused that was answered (`answered`: its outcome and the whole
/// answer) must have answered ABORTED; then whatever `checked` (its [`check`]) found.
fn ended_as_aborted(
    rpc: &str,
    answered: Option<(i32, String)>,
    checked: Fallible<()>,
) -> Fallible<()> {
    if let Some((outcome, r)) = answered {
        if outcome != pb::Outcome::Aborted as i32 {
            return Err(fail(format!("{rpc} answered {r}")));
        }
    }
    checked
}

fn check<T: Debug>(what: &str, got: &Result<T, Status>, want: &Want) -> Fallible<()> {
    seen(what, got.as_ref().map_or_else(Status::code, |_| Code::Ok));
    match (got, want) {
        (Ok(_), Want::Ok) => Ok(()),
        (Err(s), Want::Err(code, needles)) => {
            clean_status(what, s, DOCUMENTED)?;
            if s.code() != *code {
                return Err(fail(format!(
                    "{what}: expected {code:?} (naming {needles:?}), got {:?}: {:?}",
                    s.code(),
                    s.message()
                )));
            }
            for n in needles {
                if !s.message().contains(n.as_str()) {
                    return Err(fail(format!(
                        "{what}: {code:?} message {:?} does not contain {n:?}",
                        s.message()
                    )));
                }
            }
            Ok(())
        }
        (Ok(v), Want::Err(code, needles)) => Err(fail(format!(
            "{what}: expected {code:?} (naming {needles:?}), got OK: {v:?}"
        ))),
        (Err(s), Want::Ok) => Err(fail(format!(
            "{what}: expected OK, got {:?}: {:?}",
            s.code(),
            s.message()
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// The oracle: the proto's rules, written independently of the coordinator's code
// ---------------------------------------------------------------------------------------

/// `<8 lowercase hex>-<epoch>-<seq>`, decimal without leading zeros, fitting u64.
fn parse_canonical(s: &str) -> Option<(u32, u64, u64)> {
    let mut parts = s.split('-');
    let (node, epoch, seq) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    if node.len() != 8
        || !node
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let number = |p: &str| -> Option<u64> {
        if p.is_empty()
            || !p.bytes().all(|b| b.is_ascii_digit())
            || (p.len() > 1 && p.starts_with('0'))
        {
            return None;
        }
        p.parse().ok()
    };
    Some((
        u32::from_str_radix(node, 16).ok()?,
        number(epoch)?,
        number(seq)?,
    ))
}

/// Why a branch id breaks "1-64 characters of [A-Za-z0-9._:-]": the needles its refusal
/// must contain. None when it is fine.
fn branch_id_problem(id: &str) -> Option<Vec<String>> {
    if id.is_empty() {
        return Some(vec!["branch_id is empty".into()]);
    }
    if id.len() > 64 {
        return Some(vec!["branch_id".into(), format!("{} bytes long", id.len())]);
    }
    let bad = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))?;
    Some(vec![
        "branch_id".into(),
        format!("{id:?}"),
        format!("{bad:?}"),
    ])
}

/// Needles for an endpoint known to be invalid.
fn endpoint_needles(e: &str) -> Vec<String> {
    if e.is_empty() {
        vec!["participant_endpoint is empty".into()]
    } else if e.len() > 256 {
        vec![
            "participant_endpoint".into(),
            format!("{} bytes long", e.len()),
        ]
    } else {
        vec!["participant_endpoint".into(), format!("{e:?}")]
    }
}

/// A generated branch, with what is wrong with its endpoint (known by construction).
#[derive(Clone, Debug)]
struct GenBranch {
    branch: pb::Branch,
    endpoint_problem: Option<Vec<String>>,
}

/// The refusal a branch earns on its own (the service checks id, endpoint, kind in turn).
fn branch_problem(g: &GenBranch) -> Option<Vec<String>> {
    if let Some(n) = branch_id_problem(&g.branch.branch_id) {
        return Some(n);
    }
    if let Some(n) = &g.endpoint_problem {
        return Some(n.clone());
    }
    if !(0..=3).contains(&g.branch.kind) {
        return Some(vec![
            format!("kind {}", g.branch.kind),
            format!("{:?}", g.branch.branch_id),
        ]);
    }
    None
}

/// A branch as the coordinator stores it: BRANCH_KIND_UNSPECIFIED is treated as OTHER.
fn normalized(b: &pb::Branch) -> pb::Branch {
    let mut b = b.clone();
    if b.kind == pb::BranchKind::Unspecified as i32 {
        b.kind = pb::BranchKind::Other as i32;
    }
    b
}

/// Valid branches joining a transaction that has `existing`: the list afterwards, or the
/// refusal (same id with other fields: ALREADY_EXISTS; more than the maximum:
/// INVALID_ARGUMENT). Re-enlisting an identical branch changes nothing.
fn join(
    existing: &[pb::Branch],
    new: impl IntoIterator<Item = pb::Branch>,
) -> Result<Vec<pb::Branch>, Want> {
    let mut list: Vec<pb::Branch> = existing.iter().map(normalized).collect();
    for b in new {
        let b = normalized(&b);
        match list.iter().find(|x| x.branch_id == b.branch_id) {
            Some(x) if *x == b => continue,
            Some(_) => {
                return Err(Want::Err(
                    Code::AlreadyExists,
                    vec![format!("{:?}", b.branch_id), "already enlisted".into()],
                ))
            }
            None => {}
        }
        if list.len() + 1 > MAX_BRANCHES {
            return Err(want(
                Code::InvalidArgument,
                &[&format!("at most {MAX_BRANCHES} branches")],
            ));
        }
        list.push(b);
    }
    Ok(list)
}

/// What a transaction id designates, seen from the coordinator under test.
#[derive(Clone, Debug, PartialEq)]
enum TxClass {
    /// Not a transaction id at all: the needles of its INVALID_ARGUMENT.
    Invalid(Vec<String>),
    /// Well-formed, never issued here (other node, later epoch, sequence 0 or not yet).
    Unknown,
    /// An earlier epoch of this node: presumed aborted.
    Earlier,
    /// Issued in this epoch and aborted.
    Aborted,
    Committed,
    Canary,
    /// The case's own ACTIVE transaction.
    Scratch,
}

/// Whom a case addresses.
#[derive(Clone, Debug)]
enum Target {
    Canary,
    Committed,
    Aborted,
    /// A fresh ACTIVE transaction begun for the case with these branches.
    Scratch(Vec<pb::Branch>),
    /// Any string.
    Id(String),
}

// ---------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------

/// GetTransaction without what changes by itself.
fn stable(mut v: pb::GetTransactionResponse) -> pb::GetTransactionResponse {
    v.age_ms = 0;
    v
}

/// The reference transactions of a [`Harness`], begun (and two of them finished) before
/// any case runs.
struct Known {
    /// Active until the case is over (a day's timeout), with two branches.
    canary: String,
    canary_branches: Vec<pb::Branch>,
    canary_view: pb::GetTransactionResponse,
    /// Right after the canary's Begin answered: its age is at least the time since.
    canary_begun: Instant,
    /// Finished COMMITTED.
    committed: String,
    committed_view: pb::GetTransactionResponse,
    /// Finished ABORTED.
    aborted: String,
    aborted_view: pb::GetTransactionResponse,
}

/// One coordinator with its reference transactions, shared by all cases of a property.
struct Harness {
    stop: Vec<oneshot::Sender<()>>,
    /// The participant of every branch: votes yes, commits, aborts.
    _yes: TestParticipant,
    threads: String,
    client: Client,
    channel: Channel,
    addr: String,
    log: Arc<SledLog>,
    node: u32,
    epoch: u64,
    next_seq: std::cell::Cell<u64>,
    participant_port: u16,
    participant: String,
    /// The transactions begun before any case, whose states every case must leave alone.
    known: Known,
    decisions: u64,
    /// Server panics already reported (each is reported by the case that caused it).
    panics_reported: std::cell::Cell<usize>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
    }
}

async fn connect(addr: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(addr.to_string())
            .expect("uri")
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The coordinator's view of `tx`.
async fn view(c: &mut Client, tx: &str) -> pb::GetTransactionResponse {
    c.get_transaction(requests::get(tx))
        .await
        .expect("GetTransaction")
        .into_inner()
}

async fn get_until(c: &mut Client, tx: &str, state: pb::TxState) -> pb::GetTransactionResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = view(c, tx).await;
        if v.state == state as i32 && v.branches.is_empty() {
            return stable(v);
        }
        assert!(
            Instant::now() < deadline,
            "{tx} never reached {state:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn local_branch(id: &str, endpoint: &str, order: u32, kind: pb::BranchKind) -> pb::Branch {
    pb::Branch {
        branch_id: id.into(),
        participant_endpoint: endpoint.into(),
        commit_order: order,
        kind: kind as i32,
    }
}

impl Harness {
    fn start(name: &str) -> Harness {
        Harness::start_with(name, true)
    }

    /// A harness whose coordinator runs with one-phase commits on or off (`--one-phase`).
    fn start_with(name: &str, one_phase: bool) -> Harness {
        install_panic_recorder();
        let threads = format!("bad-input-{name}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(threads.clone())
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let mut stop = Vec::new();
        let (log, addr, channel, yes) = rt.block_on(async {
            // A first start on the data directory, so that epoch - 1 is a real earlier
            // epoch (with nothing decided in it).
            drop(SledLog::open(&path, SledLogOptions::default()).expect("first open"));
            let log = Arc::new(SledLog::open(&path, SledLogOptions::default()).expect("open"));

            let yes = TestParticipant::start(Arc::new(AlwaysYes), Services::UnaryOnly)
                .await
                .expect("start the participant");

            let cfg = ServeConfig {
                one_phase,
                ..quick_retries()
            };
            let served = serve(cfg, log.clone()).await;
            let addr = served.url;
            stop.push(served.stop);
            let channel = connect(&addr).await;
            (log, addr, channel, yes)
        });
        let participant_port = yes.addr.port();
        let participant = yes.endpoint.clone();
        let mut c = CoordinatorClient::new(channel.clone());
        let p = participant.clone();
        let known = rt.block_on(async move {
            let begin = |c: &mut Client, timeout_ms: u64, branches: Vec<pb::Branch>| {
                let mut c = c.clone();
                async move {
                    c.begin(pb::BeginRequest {
                        timeout_ms,
                        branches,
                    })
                    .await
                    .expect("Begin")
                    .into_inner()
                    .tx_id
                }
            };
            let committed = begin(
                &mut c,
                0,
                vec![
                    local_branch("d1", &p, 0, pb::BranchKind::Database),
                    local_branch("d2", &p, 10, pb::BranchKind::Broker),
                ],
            )
            .await;
            let r = c
                .commit(requests::commit_waiting(&committed, Some(5_000)))
                .await
                .expect("Commit")
                .into_inner();
            assert_eq!(r.outcome, pb::Outcome::Committed as i32);
            let committed_view = get_until(&mut c, &committed, pb::TxState::Committed).await;

            let aborted = begin(
                &mut c,
                0,
                vec![local_branch("x1", &p, 0, pb::BranchKind::Other)],
            )
            .await;
            c.abort(pb::AbortRequest {
                tx_id: aborted.clone(),
                reason: "set-up".into(),
            })
            .await
            .expect("Abort");
            let aborted_view = get_until(&mut c, &aborted, pb::TxState::Aborted).await;

            let canary_branches = vec![
                local_branch("c1", &p, 0, pb::BranchKind::Database),
                local_branch("c2", &p, 10, pb::BranchKind::Broker),
            ];
            let canary = begin(&mut c, DAY_MS, canary_branches.clone()).await;
            let canary_begun = Instant::now();
            let canary_view = stable(view(&mut c, &canary).await);
            Known {
                canary,
                canary_branches,
                canary_view,
                canary_begun,
                committed,
                committed_view,
                aborted,
                aborted_view,
            }
        });
        let (node, epoch, seq) = parse_canonical(&known.canary).expect("canary id");
        assert_eq!(node, log.node_id());
        assert_eq!(epoch, log.epoch());
        assert!(epoch >= 2, "epoch {epoch}: the first start did not count");
        let canary_view = &known.canary_view;
        assert_eq!(
            canary_view.state,
            pb::TxState::Active as i32,
            "{canary_view:?}"
        );
        assert_eq!(canary_view.branches.len(), 2, "{canary_view:?}");
        let decisions = log.stats().decisions;
        assert_eq!(
            decisions, 1,
            "one COMMIT decision (the committed transaction)"
        );
        Harness {
            stop,
            _yes: yes,
            threads,
            client: CoordinatorClient::new(channel.clone()),
            channel,
            addr,
            log,
            node,
            epoch,
            next_seq: std::cell::Cell::new(seq + 1),
            participant_port,
            participant,
            known,
            decisions,
            panics_reported: std::cell::Cell::new(0),
            rt,
            _dir: dir,
        }
    }

    /// Runs one call with a deadline: its answer, or a test failure if none came.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Fallible<Result<T, Status>>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let c = self.client.clone();
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_DEADLINE, f(c)).await {
                Ok(r) => Ok(r.map(Response::into_inner)),
                Err(_) => Err(fail(format!("{what}: no answer within {CALL_DEADLINE:?}"))),
            }
        })
    }

    fn get(&self, tx_id: &str) -> Fallible<Result<pb::GetTransactionResponse, Status>> {
        let req = requests::get(tx_id);
        self.call("GetTransaction", |mut c| async move {
            c.get_transaction(req).await
        })
    }

    fn abort(&self, tx_id: &str, reason: &str) -> Fallible<Result<pb::AbortResponse, Status>> {
        let req = pb::AbortRequest {
            tx_id: tx_id.to_string(),
            reason: reason.to_string(),
        };
        self.call("Abort", |mut c| async move { c.abort(req).await })
    }

    /// A transaction was begun: the sequence moves on.
    fn note_begun(&self, tx_id: &str) {
        if let Some((_, _, seq)) = parse_canonical(tx_id) {
            if seq >= self.next_seq.get() {
                self.next_seq.set(seq + 1);
            }
        }
    }

    /// Begins an ACTIVE transaction for one case.
    fn begin_scratch(&self, branches: &[pb::Branch]) -> Fallible<String> {
        let req = pb::BeginRequest {
            timeout_ms: DAY_MS,
            branches: branches.to_vec(),
        };
        let r = self.call("Begin (scratch)", |mut c| async move { c.begin(req).await })?;
        let tx = r
            .map_err(|s| fail(format!("Begin of a scratch transaction failed: {s:?}")))?
            .tx_id;
        self.note_begun(&tx);
        Ok(tx)
    }

    /// Aborts a transaction of the case's own; it must work.
    fn clean_up(&self, tx_id: &str) -> Fallible<()> {
        let r = self.abort(tx_id, "")?;
        check("Abort (clean-up)", &r, &Want::Ok)
            .map_err(|e| fail(format!("clean-up of {tx_id}: {e}")))
    }

    fn classify(&self, s: &str, scratch: Option<&str>) -> TxClass {
        if s.is_empty() {
            return TxClass::Invalid(vec!["tx_id".into(), "empty".into()]);
        }
        if s.len() > MAX_TX_ID {
            return TxClass::Invalid(vec!["tx_id".into(), format!("{} bytes long", s.len())]);
        }
        let Some((node, epoch, seq)) = parse_canonical(s) else {
            return TxClass::Invalid(vec!["tx_id".into(), format!("{s:?}")]);
        };
        if node != self.node || epoch > self.epoch || seq == 0 {
            return TxClass::Unknown;
        }
        if epoch < self.epoch {
            return TxClass::Earlier;
        }
        if seq >= self.next_seq.get() {
            return TxClass::Unknown;
        }
        if s == self.known.canary {
            TxClass::Canary
        } else if s == self.known.committed {
            TxClass::Committed
        } else if Some(s) == scratch {
            TxClass::Scratch
        } else {
            TxClass::Aborted
        }
    }

    fn target_id(&self, t: &Target, scratch: Option<&str>) -> String {
        match t {
            Target::Canary => self.known.canary.clone(),
            Target::Committed => self.known.committed.clone(),
            Target::Aborted => self.known.aborted.clone(),
            Target::Scratch(_) => scratch.unwrap_or_default().to_string(),
            Target::Id(s) => s.clone(),
        }
    }

    /// After every case: the server still answers, the reference transactions read back
    /// as before, no COMMIT decision was added, no server thread panicked.
    fn probe(&self) -> Fallible<()> {
        let list = self.call("probe ListTransactions", |mut c| async move {
            c.list_transactions(pb::ListTransactionsRequest::default())
                .await
        })?;
        let list = list.map_err(|s| fail(format!("probe: ListTransactions refused: {s:?}")))?;
        if !list
            .transactions
            .iter()
            .any(|t| t.tx_id == self.known.canary)
        {
            return Err(fail(format!(
                "probe: the canary {} is missing from ListTransactions: {list:?}",
                self.known.canary
            )));
        }
        for (id, before) in [
            (&self.known.canary, &self.known.canary_view),
            (&self.known.committed, &self.known.committed_view),
            (&self.known.aborted, &self.known.aborted_view),
        ] {
            let now = self
                .get(id)?
                .map_err(|s| fail(format!("probe: GetTransaction({id}) refused: {s:?}")))?;
            let now = stable(now);
            if now != *before {
                return Err(fail(format!(
                    "probe: record of {id} changed:\n before {before:?}\n now    {now:?}"
                )));
            }
        }
        let decisions = self.log.stats().decisions;
        if decisions != self.decisions {
            return Err(fail(format!(
                "probe: the log holds {decisions} COMMIT decisions; {} before",
                self.decisions
            )));
        }
        let panics = panics_on(&self.threads);
        if panics.len() > self.panics_reported.get() {
            let new = &panics[self.panics_reported.get()..];
            self.panics_reported.set(panics.len());
            return Err(fail(format!("probe: server threads panicked: {new:#?}")));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Running a property
// ---------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `test` on `cases` inputs from `strategy` (PROPTEST_CASES overrides), from the seed
/// PROPTEST_RNG_SEED or a random one, which a failure reports.
fn check_property<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Fallible<()>)
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = env_u64("PROPTEST_RNG_SEED").unwrap_or_else(|| {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(Instant::now())
    });
    let cases = env_u64("PROPTEST_CASES").map_or(cases, |n| n as u32);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        fork: false,
        timeout: 0,
        max_shrink_iters: 1_000,
        max_shrink_time: 60_000,
        max_local_rejects: 100_000,
        max_global_rejects: cases.saturating_mul(4),
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    };
    let started = Instant::now();
    SEEN.with(|s| s.borrow_mut().clear());
    let mut runner = TestRunner::new(config);
    match runner.run(&strategy, test) {
        Ok(()) => {
            let answers = SEEN.with(|s| {
                s.borrow()
                    .iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            });
            eprintln!(
                "{name}: {cases} cases passed in {:.1?} (PROPTEST_RNG_SEED={seed}); answers: {answers}",
                started.elapsed()
            )
        }
        Err(e) => panic!("{name} failed; replay with PROPTEST_RNG_SEED={seed}\n{e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn string_of(chars: Vec<char>) -> String {
    chars.into_iter().collect()
}

/// Characters that may not appear in a branch id.
fn non_id_char() -> BoxedStrategy<char> {
    any::<char>()
        .prop_filter("a character outside [A-Za-z0-9._:-]", |c| {
            !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        })
        .boxed()
}

fn valid_branch_id() -> BoxedStrategy<String> {
    "[A-Za-z0-9._:-]{1,64}".boxed()
}

fn branch_id() -> BoxedStrategy<String> {
    prop_oneof![
        5 => valid_branch_id(),
        2 => "[ab][0-2]",
        1 => Just(String::new()),
        1 => vec(any::<char>(), 0..40).prop_map(string_of),
        2 => ("[A-Za-z0-9]{0,20}", non_id_char(), "[A-Za-z0-9._-]{0,20}")
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        1 => "[A-Za-z0-9._:-]{65,3000}",
        1 => vec(any::<char>(), 17..1500).prop_map(string_of),
        1 => select(vec!["..", "a b", "../../etc/passwd", "b\n", "\u{0}", "ä", "x/y", "*"])
            .prop_map(String::from),
    ]
    .boxed()
}

fn scheme() -> BoxedStrategy<&'static str> {
    select(vec!["http", "https"]).boxed()
}

fn host() -> BoxedStrategy<&'static str> {
    select(vec!["127.0.0.1", "localhost", "[::1]"]).boxed()
}

/// Endpoints that are valid and, if ever contacted, reach this test's participant port.
fn valid_endpoint(port: u16) -> BoxedStrategy<String> {
    (scheme(), host(), any::<bool>())
        .prop_map(move |(s, h, slash)| format!("{s}://{h}:{port}{}", if slash { "/" } else { "" }))
        .boxed()
}

/// Characters that cannot appear in a URI authority.
fn non_uri_char() -> BoxedStrategy<char> {
    prop_oneof![
        (0u8..0x20).prop_map(char::from),
        select(vec![
            '\x7f', ' ', '"', '<', '>', '\\', '^', '`', '{', '|', '}'
        ]),
        any::<char>().prop_filter("non-ASCII", |c| !c.is_ascii()),
    ]
    .boxed()
}

/// An endpoint and, when it is invalid, the needles of its refusal.
fn endpoint(port: u16) -> BoxedStrategy<(String, Option<Vec<String>>)> {
    let bad = |v: String, why: &str| {
        let mut n = endpoint_needles(&v);
        n.push(why.to_string());
        (v, Some(n))
    };
    prop_oneof![
        6 => valid_endpoint(port).prop_map(|v| (v, None)),
        1 => Just((String::new(), Some(endpoint_needles("")))),
        1 => (scheme(), host(), any::<bool>())
            .prop_map(move |(s, h, slash)| bad(format!("{s}://{h}{}", if slash { "/" } else { "" }), "port")),
        1 => (select(vec!["ftp", "grpc", "file", "ws", "h2c", "unix"]), host())
            .prop_map(move |(s, h)| bad(format!("{s}://{h}:{port}"), "scheme")),
        1 => (valid_endpoint(port), "[a-z0-9._~-]{1,12}").prop_map(move |(e, p)| {
            bad(format!("{}/{p}", e.trim_end_matches('/')), "no path, query or fragment")
        }),
        1 => (valid_endpoint(port), "[a-z]{1,5}=[a-z0-9]{0,5}")
            .prop_map(move |(e, q)| bad(format!("{e}?{q}"), "no path, query or fragment")),
        1 => (250usize..3000).prop_map(|n| {
            let v = format!("http://{}:1", "a".repeat(n));
            (v.clone(), Some(endpoint_needles(&v)))
        }),
        1 => (scheme(), "[a-z0-9]{0,8}", non_uri_char(), "[a-z0-9]{0,8}")
            .prop_map(move |(s, a, c, b)| {
                let v = format!("{s}://{a}{c}{b}:{port}");
                (v.clone(), Some(endpoint_needles(&v)))
            }),
        1 => vec(any::<char>(), 0..600)
            .prop_map(string_of)
            .prop_filter("not http-like", |s| !s.to_ascii_lowercase().starts_with("http"))
            .prop_map(|v| (v.clone(), Some(endpoint_needles(&v)))),
    ]
    .boxed()
}

fn commit_order() -> BoxedStrategy<u32> {
    prop_oneof![3 => 0u32..16, 1 => any::<u32>()].boxed()
}

fn kind() -> BoxedStrategy<i32> {
    prop_oneof![
        8 => 0i32..=3,
        1 => any::<i32>(),
        1 => select(vec![4, 99, -1, i32::MIN, i32::MAX]),
    ]
    .boxed()
}

fn gen_branch(port: u16, ids: BoxedStrategy<String>) -> BoxedStrategy<GenBranch> {
    (ids, endpoint(port), commit_order(), kind())
        .prop_map(|(id, (ep, problem), order, kind)| GenBranch {
            branch: pb::Branch {
                branch_id: id,
                participant_endpoint: ep,
                commit_order: order,
                kind,
            },
            endpoint_problem: problem,
        })
        .boxed()
}

fn valid_branch(port: u16, ids: BoxedStrategy<String>) -> BoxedStrategy<pb::Branch> {
    (ids, valid_endpoint(port), commit_order(), 0i32..=3)
        .prop_map(|(id, ep, order, kind)| pb::Branch {
            branch_id: id,
            participant_endpoint: ep,
            commit_order: order,
            kind,
        })
        .boxed()
}

/// A branch with at least one invalid field.
fn invalid_branch(port: u16) -> BoxedStrategy<GenBranch> {
    gen_branch(port, branch_id())
        .prop_filter("an invalid branch", |g| branch_problem(g).is_some())
        .boxed()
}

/// `b` with one field changed (0: none), always to a valid value. A kind changed from
/// UNSPECIFIED to OTHER (or back) is no change for the coordinator.
fn variant_of(b: &pb::Branch, how: u8, port: u16) -> pb::Branch {
    let mut d = b.clone();
    match how % 5 {
        0 => {}
        1 => d.commit_order = d.commit_order.wrapping_add(1),
        2 => {
            d.participant_endpoint = if d.participant_endpoint.ends_with('/') {
                d.participant_endpoint.trim_end_matches('/').to_string()
            } else {
                format!("{}/", d.participant_endpoint)
            }
        }
        3 => d.kind = (d.kind + 1) % 4,
        _ => d.participant_endpoint = format!("http://127.0.0.1:{}", port ^ 1),
    }
    d
}

fn wrap(b: pb::Branch) -> GenBranch {
    GenBranch {
        branch: b,
        endpoint_problem: None,
    }
}

fn begin_branches(port: u16) -> BoxedStrategy<Vec<GenBranch>> {
    prop_oneof![
        4 => vec(gen_branch(port, branch_id()), 0..6),
        1 => (0usize..=80).prop_map(move |n| {
            (0..n)
                .map(|i| {
                    wrap(local_branch(
                        &format!("b{i}"),
                        &format!("http://127.0.0.1:{port}"),
                        0,
                        pb::BranchKind::Database,
                    ))
                })
                .collect()
        }),
        2 => (vec(valid_branch(port, valid_branch_id()), 1..5), any::<Index>(), any::<u8>())
            .prop_map(move |(v, i, how)| {
                let dup = variant_of(&v[i.index(v.len())], how, port);
                let mut v: Vec<GenBranch> = v.into_iter().map(wrap).collect();
                v.push(wrap(dup));
                v
            }),
    ]
    .boxed()
}

fn timeout_ms() -> BoxedStrategy<u64> {
    prop_oneof![
        2 => Just(0u64),
        2 => 10_000u64..=DAY_MS,
        1 => Just(DAY_MS),
        1 => Just(DAY_MS + 1),
        1 => DAY_MS + 1..=u64::MAX,
        1 => 1u64..10_000,
        1 => Just(u64::MAX),
    ]
    .boxed()
}

/// Transaction ids: well-formed ones around this coordinator's node, epoch and sequence,
/// and malformed ones of every kind.
fn tx_id(node: u32, epoch: u64) -> BoxedStrategy<String> {
    let nodes = prop_oneof![
        4 => Just(node),
        1 => Just(node ^ 1),
        1 => Just(node.wrapping_add(0x100)),
        1 => any::<u32>(),
        1 => select(vec![0, u32::MAX]),
    ];
    let epochs = prop_oneof![
        4 => Just(epoch),
        2 => Just(epoch - 1),
        1 => Just(epoch + 1),
        1 => Just(0u64),
        1 => any::<u64>(),
        1 => Just(u64::MAX),
    ];
    let seqs = prop_oneof![
        2 => select(vec![0u64, 1, 2, 3]),
        2 => 4u64..300,
        1 => 1_000_000u64..,
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    let parts = (nodes, epochs, seqs);
    let canonical = parts
        .clone()
        .prop_map(|(n, e, s)| format!("{n:08x}-{e}-{s}"));
    let mutated = (parts, 0u8..16).prop_map(|((n, e, s), how)| match how {
        0 => format!("{n:08X}-{e}-{s}"),
        1 => format!("{n:08x}-0{e}-{s}"),
        2 => format!("{n:08x}-{e}-0{s}"),
        3 => format!("{n:08x}-{e}-+{s}"),
        4 => format!("{n:08x}-{e}-{s}-1"),
        5 => format!("{n:08x}-{e}"),
        6 => format!("{:07x}-{e}-{s}", n & 0x0fff_ffff),
        7 => format!("0{n:08x}-{e}-{s}"),
        8 => format!(" {n:08x}-{e}-{s}"),
        9 => format!("{n:08x}-{e}-{s}\n"),
        10 => format!("{n:08x}-{e}-{s}\0"),
        11 => format!("{n:08x}-{e}-\u{663}"),
        12 => format!("{n:08x}-18446744073709551616-{s}"),
        13 => format!("{n:08x}\u{2010}{e}\u{2010}{s}"),
        14 => format!("0x{n:x}-{e}-{s}"),
        _ => format!("{n:08x}--{s}"),
    });
    prop_oneof![
        4 => canonical,
        3 => mutated,
        1 => Just(String::new()),
        1 => vec(any::<char>(), 65..1500).prop_map(string_of),
        1 => vec(any::<char>(), 1..=16).prop_map(string_of),
        1 => "[0-9a-fA-F-]{1,30}",
        1 => select(vec!["..", "../../etc/passwd", "-", "--", "%2e%2e", "null", "0-0-0"])
            .prop_map(String::from),
    ]
    .boxed()
}

fn reason() -> BoxedStrategy<String> {
    prop_oneof![
        3 => vec(any::<char>(), 0..200).prop_map(string_of),
        1 => select(vec![MAX_REASON - 1, MAX_REASON, MAX_REASON + 1]).prop_map(|n| "r".repeat(n)),
        1 => (1000usize..1100).prop_map(|n| "x".repeat(n)),
        1 => (300usize..700).prop_map(|n| "é".repeat(n)),
        1 => vec(any::<char>(), 300..2000).prop_map(string_of),
    ]
    .boxed()
}

/// Reasons that are always too long.
fn long_reason() -> BoxedStrategy<String> {
    prop_oneof![
        (MAX_REASON + 1..4000).prop_map(|n| "x".repeat(n)),
        (MAX_REASON / 2 + 1..2000).prop_map(|n| "é".repeat(n)),
        vec(any::<char>(), MAX_REASON + 1..2500).prop_map(string_of),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------
// Raw gRPC: garbage in a correct frame, and hand-built frames
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    Begin,
    BeginLocal,
    Enlist,
    Commit,
    ReportLocalCommits,
    Abort,
    ReleaseUnused,
    GetTransaction,
    ListTransactions,
}

const METHODS: [Method; 9] = [
    Method::Begin,
    Method::BeginLocal,
    Method::Enlist,
    Method::Commit,
    Method::ReportLocalCommits,
    Method::Abort,
    Method::ReleaseUnused,
    Method::GetTransaction,
    Method::ListTransactions,
];

impl Method {
    fn path(self) -> &'static str {
        match self {
            Method::Begin => "/twopc.v1.Coordinator/Begin",
            Method::BeginLocal => "/twopc.v1.Coordinator/BeginLocal",
            Method::Enlist => "/twopc.v1.Coordinator/Enlist",
            Method::Commit => "/twopc.v1.Coordinator/Commit",
            Method::ReportLocalCommits => "/twopc.v1.Coordinator/ReportLocalCommits",
            Method::Abort => "/twopc.v1.Coordinator/Abort",
            Method::ReleaseUnused => "/twopc.v1.Coordinator/ReleaseUnused",
            Method::GetTransaction => "/twopc.v1.Coordinator/GetTransaction",
            Method::ListTransactions => "/twopc.v1.Coordinator/ListTransactions",
        }
    }

    /// Whether `bytes` decode as this method's request, and the tx ids it names.
    fn decode(self, bytes: &[u8]) -> Option<Vec<String>> {
        match self {
            Method::Begin => pb::BeginRequest::decode(bytes).ok().map(|_| Vec::new()),
            Method::BeginLocal => pb::BeginLocalRequest::decode(bytes)
                .ok()
                .map(|_| Vec::new()),
            Method::Enlist => pb::EnlistRequest::decode(bytes).ok().map(|r| vec![r.tx_id]),
            Method::Commit => pb::CommitRequest::decode(bytes).ok().map(|r| vec![r.tx_id]),
            Method::ReportLocalCommits => pb::ReportLocalCommitsRequest::decode(bytes)
                .ok()
                .map(|r| r.tx_ids),
            Method::Abort => pb::AbortRequest::decode(bytes).ok().map(|r| vec![r.tx_id]),
            Method::ReleaseUnused => pb::ReleaseUnusedRequest::decode(bytes)
                .ok()
                .map(|r| vec![r.tx_id]),
            Method::GetTransaction => pb::GetTransactionRequest::decode(bytes)
                .ok()
                .map(|r| vec![r.tx_id]),
            Method::ListTransactions => pb::ListTransactionsRequest::decode(bytes)
                .ok()
                .map(|_| Vec::new()),
        }
    }
}

/// Sends its bytes as they are and hands back the response's bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// One protobuf field, possibly broken: any field number and wire type (including the
/// invalid 0, 6 and 7), with a value that fits, is truncated, overlong or mis-sized.
fn pb_field(nested: Option<BoxedStrategy<Vec<u8>>>) -> BoxedStrategy<Vec<u8>> {
    let content = match nested {
        Some(inner) => prop_oneof![
            3 => vec(any::<u8>(), 0..64),
            2 => "\\PC{0,32}".prop_map(String::into_bytes),
            2 => select(vec![
                vec![0xffu8],
                vec![0xc0, 0x80],
                vec![0xed, 0xa0, 0x80],
                vec![b'a', 0x80],
                vec![0xf4, 0x90, 0x80, 0x80],
            ]),
            3 => vec(inner, 0..4).prop_map(|v| v.concat()),
        ]
        .boxed(),
        None => prop_oneof![
            vec(any::<u8>(), 0..64),
            "\\PC{0,32}".prop_map(String::into_bytes),
            select(vec![vec![0xffu8], vec![0xc0, 0x80], vec![0xed, 0xa0, 0x80]]),
        ]
        .boxed(),
    };
    let delimited = (
        content,
        prop_oneof![4 => Just(0i64), 1 => -3i64..=3, 1 => Just(i64::MAX)],
    )
        .prop_map(|(c, delta)| {
            let len = if delta == i64::MAX {
                u64::MAX >> 1
            } else {
                (c.len() as i64 + delta).max(0) as u64
            };
            [varint(len), c].concat()
        });
    let payload = prop_oneof![
        any::<u64>().prop_map(varint),
        Just(vec![0xffu8; 11]),
        Just(vec![0x80u8]),
        vec(any::<u8>(), 0..9),
        delimited,
    ];
    (
        prop_oneof![4 => 0u64..=6, 1 => any::<u32>().prop_map(|n| u64::from(n >> 3))],
        0u64..8,
        payload,
    )
        .prop_map(|(field, wire, p)| [varint((field << 3) | wire), p].concat())
        .boxed()
}

/// A few well-formed requests (none naming a reference transaction) to corrupt.
fn sample_requests(port: u16) -> Vec<Vec<u8>> {
    let b = local_branch(
        "g1",
        &format!("http://127.0.0.1:{port}"),
        0,
        pb::BranchKind::Database,
    );
    vec![
        pb::BeginRequest {
            timeout_ms: 0,
            branches: vec![b.clone()],
        }
        .encode_to_vec(),
        pb::EnlistRequest {
            tx_id: "0badc0de-1-1".into(),
            branch: Some(b),
        }
        .encode_to_vec(),
        requests::commit_waiting("0badc0de-1-2", Some(10)).encode_to_vec(),
        pb::BeginLocalRequest {
            branch: Some(local_branch(
                "g2",
                &format!("http://127.0.0.1:{port}"),
                0,
                pb::BranchKind::Database,
            )),
            timeout_ms: 0,
            count: 2,
        }
        .encode_to_vec(),
        pb::ReportLocalCommitsRequest {
            tx_ids: vec!["0badc0de-1-4".into(), "0badc0de-1-5".into()],
            answer_before_durable: true,
        }
        .encode_to_vec(),
        pb::ReleaseUnusedRequest {
            tx_id: "0badc0de-1-6".into(),
        }
        .encode_to_vec(),
        pb::AbortRequest {
            tx_id: "0badc0de-1-3".into(),
            reason: "because".into(),
        }
        .encode_to_vec(),
        pb::ListTransactionsRequest {
            state: 1,
            min_age_ms: 5,
            limit: 7,
        }
        .encode_to_vec(),
    ]
}

fn garbage(port: u16) -> BoxedStrategy<Vec<u8>> {
    let level0 = pb_field(None);
    let level1 = pb_field(Some(level0.clone()));
    let samples = sample_requests(port);
    prop_oneof![
        3 => vec(any::<u8>(), 0..2048),
        4 => vec(level1, 0..6).prop_map(|v| v.concat()),
        3 => (select(samples), any::<Index>(), 0u8..3, vec(any::<u8>(), 1..8)).prop_map(
            |(mut m, at, how, junk)| {
                let i = at.index(m.len());
                match how {
                    0 => m.truncate(i),
                    1 => m[i] ^= junk[0] | 1,
                    _ => m.extend(junk),
                }
                m
            }
        ),
    ]
    .boxed()
}

/// A gRPC frame: flag byte, 4-byte big-endian declared length, payload. Kept valid UTF-8
/// (every header byte below 0x80) so the body can travel as a `String`.
fn frame(flag: u8, declared: u32, payload: &str) -> String {
    let mut s = String::new();
    for b in std::iter::once(flag).chain(declared.to_be_bytes()) {
        assert!(b < 0x80, "frame header byte {b:#x} would not survive UTF-8");
        s.push(char::from(b));
    }
    s.push_str(payload);
    s
}

fn ascii_payload(port: u16) -> BoxedStrategy<String> {
    let samples: Vec<String> = sample_requests(port)
        .into_iter()
        .filter(|m| m.len() < 100 && m.iter().all(|b| *b < 0x80))
        .map(|m| String::from_utf8(m).expect("ASCII"))
        .chain([
            String::new(),
            String::from_utf8(requests::get("x").encode_to_vec()).expect("ASCII"),
        ])
        .collect();
    prop_oneof![select(samples), "[\\x00-\\x7f]{0,100}"].boxed()
}

/// Bodies of a raw gRPC request: well-framed or not.
fn raw_body(port: u16) -> BoxedStrategy<String> {
    let one = (
        select(vec![0u8, 0, 0, 1, 2, 0x7f]),
        ascii_payload(port),
        prop_oneof![
            4 => Just(None),
            2 => (1u32..=10).prop_map(Some),
            1 => Just(Some(0x0040_0001)),
            1 => Just(Some(0x7f7f_7f7f)),
            1 => Just(Some(0)),
        ],
    )
        .prop_map(|(flag, payload, declared)| {
            let len = payload.len() as u32;
            let declared = match declared {
                None => len,
                Some(d) if d <= 10 => len + d,
                Some(d) => d,
            };
            frame(flag, declared, &payload)
        });
    prop_oneof![
        1 => Just(String::new()),
        6 => one.clone(),
        2 => (one.clone(), one).prop_map(|(a, b)| a + &b),
        1 => "[\\x00-\\x7f]{1,4}",
        2 => vec(any::<char>(), 1..200).prop_map(string_of),
    ]
    .boxed()
}

/// What came back from a raw HTTP/2 gRPC request.
#[derive(Debug)]
struct RawAnswer {
    http: http::StatusCode,
    status: Option<Status>,
    data: Vec<u8>,
}

impl Harness {
    fn send_garbage(&self, m: Method, bytes: Vec<u8>) -> Fallible<Result<Vec<u8>, Status>> {
        let channel = self.channel.clone();
        self.rt.block_on(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            let call = async {
                grpc.ready()
                    .await
                    .map_err(|e| Status::unknown(format!("channel not ready: {e}")))?;
                grpc.unary(
                    Request::new(bytes),
                    http::uri::PathAndQuery::from_static(m.path()),
                    RawCodec,
                )
                .await
            };
            match tokio::time::timeout(CALL_DEADLINE, call).await {
                Ok(r) => Ok(r.map(Response::into_inner)),
                Err(_) => Err(fail(format!(
                    "{m:?} (garbage): no answer within {CALL_DEADLINE:?}"
                ))),
            }
        })
    }

    fn send_raw(&self, m: Method, body: String) -> Fallible<RawAnswer> {
        let mut channel = self.channel.clone();
        let uri = format!("{}{}", self.addr, m.path());
        self.rt.block_on(async move {
            let call = async {
                std::future::poll_fn(|cx| channel.poll_ready(cx))
                    .await
                    .map_err(|e| format!("channel not ready: {e}"))?;
                let req = http::Request::builder()
                    .method(http::Method::POST)
                    .uri(uri)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(tonic::body::Body::new(body))
                    .map_err(|e| format!("request: {e}"))?;
                let resp = channel
                    .call(req)
                    .await
                    .map_err(|e| format!("the call failed (connection dropped?): {e:?}"))?;
                let http = resp.status();
                let mut status = Status::from_header_map(resp.headers());
                let mut body = resp.into_body();
                let mut data = Vec::new();
                loop {
                    let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                    match next {
                        None => break,
                        Some(Err(e)) => return Err(format!("the response body failed: {e:?}")),
                        Some(Ok(f)) => match f.into_data() {
                            Ok(d) => data.extend_from_slice(&d),
                            Err(f) => {
                                if let Ok(t) = f.into_trailers() {
                                    status = status.or_else(|| Status::from_header_map(&t));
                                }
                            }
                        },
                    }
                }
                Ok(RawAnswer { http, status, data })
            };
            match tokio::time::timeout(CALL_DEADLINE, call).await {
                Ok(Ok(a)) => Ok(a),
                Ok(Err(e)) => Err(fail(format!("{m:?} (raw frame): {e}"))),
                Err(_) => Err(fail(format!(
                    "{m:?} (raw frame): no answer within {CALL_DEADLINE:?}"
                ))),
            }
        })
    }

    /// A call of `m` went through with garbage: a Begin's transaction is noted and
    /// aborted; a BeginLocal's transactions are noted and left to their timeout (their
    /// branch may name a participant that is not there to settle them now).
    fn begun_by_garbage(&self, m: Method, response: &[u8]) -> Fallible<()> {
        match m {
            Method::Begin => {
                let r = pb::BeginResponse::decode(response).map_err(|e| {
                    fail(format!(
                        "Begin answered OK with an undecodable response: {e}"
                    ))
                })?;
                self.note_begun(&r.tx_id);
                self.clean_up(&r.tx_id)
            }
            Method::BeginLocal => {
                let r = pb::BeginLocalResponse::decode(response).map_err(|e| {
                    fail(format!(
                        "BeginLocal answered OK with an undecodable response: {e}"
                    ))
                })?;
                for tx in &r.tx_ids {
                    self.note_begun(tx);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

impl Harness {
    fn begin_case(&self, timeout_ms: u64, branches: Vec<GenBranch>) -> Fallible<()> {
        let expected = (|| {
            for g in &branches {
                if let Some(n) = branch_problem(g) {
                    return Err(Want::Err(Code::InvalidArgument, n));
                }
            }
            if timeout_ms > DAY_MS {
                return Err(want(
                    Code::InvalidArgument,
                    &["timeout_ms", &timeout_ms.to_string()],
                ));
            }
            join(&[], branches.iter().map(|g| g.branch.clone()))
        })();
        let req = pb::BeginRequest {
            timeout_ms,
            branches: branches.iter().map(|g| g.branch.clone()).collect(),
        };
        let next = self.next_seq.get();
        let got = self.call("Begin", |mut c| async move { c.begin(req).await })?;
        if let Ok(r) = &got {
            self.note_begun(&r.tx_id);
        }
        let w = expected.as_ref().map_or_else(Clone::clone, |_| Want::Ok);
        let mut verdict = check("Begin", &got, &w);
        if let (Ok(r), Ok(list), Ok(())) = (&got, &expected, &verdict) {
            verdict = self.verify_begun(r, next, timeout_ms, list);
        }
        if let Ok(r) = &got {
            self.clean_up(&r.tx_id)?;
        }
        verdict?;
        self.probe()
    }

    /// A Begin that went through issued the next id and stored exactly these branches.
    fn verify_begun(
        &self,
        r: &pb::BeginResponse,
        seq: u64,
        timeout_ms: u64,
        list: &[pb::Branch],
    ) -> Fallible<()> {
        let id = format!("{:08x}-{}-{seq}", self.node, self.epoch);
        if r.tx_id != id {
            return Err(fail(format!("Begin issued {:?}; expected {id:?}", r.tx_id)));
        }
        if timeout_ms == 0 || timeout_ms >= 10_000 {
            let v = self.get(&r.tx_id)?;
            let v = v.map_err(|s| fail(format!("GetTransaction of a new tx: {s:?}")))?;
            let stored: Vec<pb::Branch> =
                v.branches.iter().filter_map(|b| b.branch.clone()).collect();
            if v.state != pb::TxState::Active as i32 || stored != list {
                return Err(fail(format!(
                    "Begin stored {v:?}; expected ACTIVE with branches {list:?}"
                )));
            }
        }
        Ok(())
    }

    fn enlist_case(&self, target: Target, branch: Option<GenBranch>) -> Fallible<()> {
        let scratch = match &target {
            Target::Scratch(b) => Some((self.begin_scratch(b)?, b.clone())),
            _ => None,
        };
        let scratch_id = scratch.as_ref().map(|(id, _)| id.as_str());
        let tx = self.target_id(&target, scratch_id);
        let class = self.classify(&tx, scratch_id);
        let existing = match (&class, &scratch) {
            (TxClass::Canary, _) => self.known.canary_branches.clone(),
            (TxClass::Scratch, Some((_, b))) => b.clone(),
            _ => Vec::new(),
        };
        let problem = branch.as_ref().and_then(branch_problem);
        let expected: Result<Vec<pb::Branch>, Want> = match (&class, &branch, problem) {
            (TxClass::Invalid(n), _, _) => Err(Want::Err(Code::InvalidArgument, n.clone())),
            (_, None, _) => Err(want(Code::InvalidArgument, &["branch is missing"])),
            (_, _, Some(n)) => Err(Want::Err(Code::InvalidArgument, n)),
            (TxClass::Unknown, _, _) => Err(want(Code::NotFound, &[&tx])),
            (TxClass::Earlier | TxClass::Aborted | TxClass::Committed, _, _) => {
                Err(want(Code::FailedPrecondition, &[&tx]))
            }
            (TxClass::Canary | TxClass::Scratch, Some(g), None) => {
                join(&existing, [g.branch.clone()])
            }
        };
        if class == TxClass::Canary && matches!(&expected, Ok(l) if l.len() != existing.len()) {
            return Err(TestCaseError::reject("would add a branch to the canary"));
        }
        let req = pb::EnlistRequest {
            tx_id: tx.clone(),
            branch: branch.map(|g| g.branch),
        };
        let got = self.call("Enlist", |mut c| async move { c.enlist(req).await })?;
        let w = expected.as_ref().map_or_else(Clone::clone, |_| Want::Ok);
        let checked = check("Enlist", &got, &w);
        if let Some((id, before)) = &scratch {
            let after = match &expected {
                Ok(l) if got.is_ok() => l.clone(),
                _ => before.iter().map(normalized).collect(),
            };
            let v = self
                .get(id)?
                .map_err(|s| fail(format!("GetTransaction of the scratch tx: {s:?}")))?;
            let stored: Vec<pb::Branch> =
                v.branches.iter().filter_map(|b| b.branch.clone()).collect();
            self.clean_up(id)?;
            checked.clone()?;
            if stored != after {
                return Err(fail(format!(
                    "after Enlist the scratch tx holds {stored:?}; expected {after:?}"
                )));
            }
        }
        checked?;
        self.probe()
    }

    fn commit_case(&self, target: Target, wait: Option<u64>) -> Fallible<()> {
        let tx = self.target_id(&target, None);
        let class = self.classify(&tx, None);
        let expected = match (&class, wait) {
            (TxClass::Invalid(n), _) => Want::Err(Code::InvalidArgument, n.clone()),
            (_, Some(w)) if w > MAX_WAIT_MS => want(
                Code::InvalidArgument,
                &["phase_two_wait_ms", &w.to_string()],
            ),
            (class, _) => match class {
                TxClass::Unknown => want(Code::NotFound, &[&tx]),
                TxClass::Earlier | TxClass::Aborted => want(Code::Aborted, &[&tx]),
                TxClass::Committed => Want::Ok,
                TxClass::Canary | TxClass::Scratch => {
                    return Err(TestCaseError::reject("would commit the canary"))
                }
                TxClass::Invalid(_) => unreachable!("handled above"),
            },
        };
        let req = requests::commit_waiting(tx, wait);
        let got = self.call("Commit", |mut c| async move { c.commit(req).await })?;
        check("Commit", &got, &expected)?;
        if let Ok(r) = &got {
            if r.outcome != pb::Outcome::Committed as i32 || !r.pending_branches.is_empty() {
                return Err(fail(format!("Commit of the committed tx answered {r:?}")));
            }
        }
        self.probe()
    }

    fn abort_case(&self, target: Target, reason: String) -> Fallible<()> {
        let scratch = match &target {
            Target::Scratch(b) => Some(self.begin_scratch(b)?),
            _ => None,
        };
        let tx = self.target_id(&target, scratch.as_deref());
        let class = self.classify(&tx, scratch.as_deref());
        let expected = match &class {
            TxClass::Invalid(n) => Want::Err(Code::InvalidArgument, n.clone()),
            _ if reason.len() > MAX_REASON => want(
                Code::InvalidArgument,
                &["reason", &format!("{} bytes", reason.len())],
            ),
            TxClass::Unknown => want(Code::NotFound, &[&tx]),
            TxClass::Earlier | TxClass::Aborted | TxClass::Scratch => Want::Ok,
            TxClass::Committed => want(Code::FailedPrecondition, &[&tx, "COMMITTED"]),
            TxClass::Canary => return Err(TestCaseError::reject("would abort the canary")),
        };
        let req = pb::AbortRequest {
            tx_id: tx,
            reason: reason.clone(),
        };
        let got = self.call("Abort", |mut c| async move { c.abort(req).await })?;
        let checked = check("Abort", &got, &expected);
        if let Some(id) = &scratch {
            let why = if reason.is_empty() {
                "aborted by the client".to_string()
            } else {
                format!("aborted by the client: {reason}")
            };
            let ended = got.is_ok().then_some(why.as_str());
            self.check_scratch_after("Abort", id, ended)?;
        }
        let outcome = got.as_ref().ok().map(|r| (r.outcome, format!("{r:?}")));
        ended_as_aborted("Abort", outcome, checked)?;
        self.probe()
    }

    fn begin_local_case(
        &self,
        branch: Option<GenBranch>,
        timeout_ms: u64,
        count: u32,
    ) -> Fallible<()> {
        let expected = match &branch {
            None => want(Code::InvalidArgument, &["branch is missing"]),
            Some(g) => match branch_problem(g) {
                Some(n) => Want::Err(Code::InvalidArgument, n),
                None if timeout_ms > DAY_MS => want(
                    Code::InvalidArgument,
                    &["timeout_ms", &timeout_ms.to_string()],
                ),
                None if count > MAX_LOCAL_BEGIN => {
                    want(Code::InvalidArgument, &[&format!("count is {count}")])
                }
                None => Want::Ok,
            },
        };
        // What it begins is left to its timeout: the branch may name a participant that
        // is not there.
        let got = self.begin_local_req(branch.map(|g| g.branch), timeout_ms, count, false)?;
        check("BeginLocal", &got, &expected)?;
        if let Ok(r) = &got {
            let timeout = match timeout_ms {
                0 => ServeConfig::default().tx_timeout_ms,
                t => t,
            };
            let distinct: std::collections::HashSet<&String> = r.tx_ids.iter().collect();
            if r.tx_ids.len() != count.max(1) as usize
                || distinct.len() != r.tx_ids.len()
                || r.epoch != self.epoch
                || r.timeout_ms != timeout
            {
                return Err(fail(format!(
                    "BeginLocal of {count} with timeout_ms {timeout_ms} answered {r:?}"
                )));
            }
        }
        self.probe()
    }

    /// What reporting the local commit of `tx` (alone) answers.
    fn report_expected(&self, tx: &str) -> Want {
        match self.classify(tx, None) {
            TxClass::Invalid(n) => Want::Err(Code::InvalidArgument, n),
            TxClass::Unknown => want(Code::NotFound, &[tx]),
            TxClass::Earlier | TxClass::Aborted => want(Code::Aborted, &[tx]),
            // Finished COMMITTED: the report is answered from the outcome.
            TxClass::Committed => Want::Ok,
            TxClass::Canary | TxClass::Scratch => {
                want(Code::FailedPrecondition, &[tx, "not begun"])
            }
        }
    }

    fn report_case(&self, targets: Vec<Target>, answer_before_durable: bool) -> Fallible<()> {
        let txs: Vec<String> = targets.iter().map(|t| self.target_id(t, None)).collect();
        let invalid = txs
            .iter()
            .enumerate()
            .find_map(|(i, tx)| match self.classify(tx, None) {
                TxClass::Invalid(n) => Some((i, n)),
                _ => None,
            });
        let expected = if txs.is_empty() {
            want(Code::InvalidArgument, &["tx_ids is empty"])
        } else if txs.len() > MAX_LOCAL_REPORTS {
            want(
                Code::InvalidArgument,
                &["tx_ids holds", &format!("{} ids", txs.len())],
            )
        } else if let Some((i, mut n)) = invalid {
            n.push(format!("tx_ids[{i}]"));
            Want::Err(Code::InvalidArgument, n)
        } else {
            // The first failure in the order of the ids, named by its transaction when
            // the report holds several.
            txs.iter()
                .map(|tx| (tx, self.report_expected(tx)))
                .find(|(_, w)| !matches!(w, Want::Ok))
                .map_or(Want::Ok, |(tx, w)| match w {
                    Want::Err(code, mut n) if txs.len() > 1 => {
                        n.push(format!("transaction {tx}: "));
                        Want::Err(code, n)
                    }
                    w => w,
                })
        };
        let req = pb::ReportLocalCommitsRequest {
            tx_ids: txs.clone(),
            answer_before_durable,
        };
        let got = self.call("ReportLocalCommits", |mut c| async move {
            c.report_local_commits(req).await
        })?;
        check("ReportLocalCommits", &got, &expected)?;
        if let Ok(r) = &got {
            if r.recorded as usize != txs.len() || r.epoch != self.epoch {
                return Err(fail(format!(
                    "a report of {} transactions answered {r:?}",
                    txs.len()
                )));
            }
        }
        self.probe()
    }

    /// ReleaseUnused of `target`, or (`local`) of a local transaction begun for the case.
    fn release_case(&self, target: Target, local: bool) -> Fallible<()> {
        let scratch = match &target {
            _ if local => {
                let branch = local_branch("l1", &self.participant, 0, pb::BranchKind::Database);
                let r = self
                    .begin_local_req(Some(branch), DAY_MS, 1, false)?
                    .map_err(|s| fail(format!("BeginLocal of a scratch tx failed: {s:?}")))?;
                Some(r.tx_ids.first().cloned().unwrap_or_default())
            }
            Target::Scratch(b) => Some(self.begin_scratch(b)?),
            _ => None,
        };
        let tx = match &scratch {
            Some(id) if local => id.clone(),
            _ => self.target_id(&target, scratch.as_deref()),
        };
        let expected = match self.classify(&tx, scratch.as_deref()) {
            TxClass::Scratch if local => Want::Ok,
            TxClass::Invalid(n) => Want::Err(Code::InvalidArgument, n),
            TxClass::Unknown => want(Code::NotFound, &[&tx]),
            TxClass::Earlier | TxClass::Aborted => Want::Ok,
            TxClass::Committed => want(Code::FailedPrecondition, &[&tx, "COMMITTED"]),
            TxClass::Canary | TxClass::Scratch => {
                want(Code::FailedPrecondition, &[&tx, "not begun"])
            }
        };
        let req = pb::ReleaseUnusedRequest { tx_id: tx.clone() };
        let got = self.call("ReleaseUnused", |mut c| async move {
            c.release_unused(req).await
        })?;
        let checked = check("ReleaseUnused", &got, &expected);
        if let Some(id) = &scratch {
            // A local scratch tx is released whatever its reason reads.
            self.check_scratch_after("ReleaseUnused", id, local.then_some(""))?;
        }
        let outcome = got.as_ref().ok().map(|r| (r.outcome, format!("{r:?}")));
        ended_as_aborted("ReleaseUnused", outcome, checked)?;
        self.probe()
    }

    /// After `rpc` (an Abort or a ReleaseUnused) of the scratch transaction `id`: where
    /// it `ended` the transaction, `id` must read ABORTED (and, for a reason that is not
    /// empty, because of it); where it was refused, `id` must be untouched (and is cleaned
    /// up).
    fn check_scratch_after(&self, rpc: &str, id: &str, ended: Option<&str>) -> Fallible<()> {
        let v = self
            .get(id)?
            .map_err(|s| fail(format!("GetTransaction of the scratch tx: {s:?}")))?;
        match ended {
            Some(why) => {
                let wrong_reason = !why.is_empty() && !v.branches.is_empty() && v.reason != why;
                if v.outcome != pb::Outcome::Aborted as i32 || wrong_reason {
                    return Err(fail(format!(
                        "after {rpc} the scratch tx reads {v:?}; expected ABORTED because {why:?}"
                    )));
                }
            }
            None => {
                if v.state != pb::TxState::Active as i32 {
                    return Err(fail(format!(
                        "a refused {rpc} changed the scratch tx: {v:?}"
                    )));
                }
                self.clean_up(id)?;
            }
        }
        Ok(())
    }

    fn get_case(&self, target: Target) -> Fallible<()> {
        let tx = self.target_id(&target, None);
        let class = self.classify(&tx, None);
        let expected = match &class {
            TxClass::Invalid(n) => Want::Err(Code::InvalidArgument, n.clone()),
            TxClass::Unknown => want(Code::NotFound, &[&tx]),
            _ => Want::Ok,
        };
        let got = self.get(&tx)?;
        check("GetTransaction", &got, &expected)?;
        if let Ok(v) = got {
            let v = stable(v);
            let ok = match class {
                TxClass::Canary => v == self.known.canary_view,
                TxClass::Committed => v == self.known.committed_view,
                TxClass::Earlier | TxClass::Aborted => {
                    v.tx_id == tx
                        && v.outcome == pb::Outcome::Aborted as i32
                        && [pb::TxState::Aborted as i32, pb::TxState::Aborting as i32]
                            .contains(&v.state)
                }
                _ => false,
            };
            if !ok {
                return Err(fail(format!(
                    "GetTransaction({tx:?}) as {class:?} read {v:?}"
                )));
            }
        }
        self.probe()
    }

    fn list_case(&self, state: i32, min_age_ms: u64, limit: u32) -> Fallible<()> {
        let expected = if pb::TxState::try_from(state).is_err() {
            want(Code::InvalidArgument, &[&format!("state {state}")])
        } else if limit > MAX_LIMIT {
            want(Code::InvalidArgument, &["limit", &limit.to_string()])
        } else {
            Want::Ok
        };
        let at_least = self.known.canary_begun.elapsed().as_millis() as u64;
        let req = pb::ListTransactionsRequest {
            state,
            min_age_ms,
            limit,
        };
        let got = self.call("ListTransactions", |mut c| async move {
            c.list_transactions(req).await
        })?;
        let at_most = self.known.canary_begun.elapsed().as_millis() as u64 + 1_000;
        check("ListTransactions", &got, &expected)?;
        if let Ok(r) = &got {
            // The only live transaction is the canary (ACTIVE).
            let shown = r.transactions.iter().any(|t| t.tx_id == self.known.canary);
            let state_fits = state == 0 || state == pb::TxState::Active as i32;
            let stray = r.transactions.iter().any(|t| t.tx_id != self.known.canary);
            let must = state_fits && min_age_ms <= at_least;
            let must_not = !state_fits || min_age_ms > at_most;
            if stray || (must && !shown) || (must_not && shown) {
                return Err(fail(format!(
                    "ListTransactions(state {state}, min_age {min_age_ms}, limit {limit}) \
                     answered {r:?}"
                )));
            }
            if let Some(t) = r.transactions.first() {
                if t.state != pb::TxState::Active as i32 || t.branch_count != 2 {
                    return Err(fail(format!("the canary is listed as {t:?}")));
                }
            }
        }
        self.probe()
    }

    fn garbage_case(&self, m: Method, bytes: Vec<u8>) -> Fallible<()> {
        let decoded = m.decode(&bytes);
        if let Some(txs) = &decoded {
            if txs.contains(&self.known.canary) && m != Method::GetTransaction {
                return Err(TestCaseError::reject("names the canary"));
            }
        }
        let got = self.send_garbage(m, bytes)?;
        let what = format!("{m:?} with garbage");
        let kind = if decoded.is_some() {
            "decodable"
        } else {
            "undecodable"
        };
        seen(
            &format!("{m:?} {kind}"),
            got.as_ref().map_or_else(Status::code, |_| Code::Ok),
        );
        match (&decoded, &got) {
            (None, Ok(v)) => {
                return Err(fail(format!(
                    "{what}: undecodable request answered OK ({v:?})"
                )))
            }
            (None, Err(s)) => {
                if s.code() != Code::Internal || !s.message().contains("decode") {
                    return Err(fail(format!(
                        "{what}: undecodable request answered {:?}: {:?}; expected INTERNAL \
                         from the decoder",
                        s.code(),
                        s.message()
                    )));
                }
            }
            (Some(_), Err(s)) => clean_status(&what, s, DOCUMENTED)?,
            (Some(_), Ok(r)) => self.begun_by_garbage(m, r)?,
        }
        self.probe()
    }

    fn raw_case(&self, m: Method, body: String) -> Fallible<()> {
        let a = self.send_raw(m, body)?;
        let what = format!("{m:?} with a raw frame");
        if a.http != http::StatusCode::OK {
            return Err(fail(format!("{what}: HTTP {} ({a:?})", a.http)));
        }
        let Some(s) = &a.status else {
            return Err(fail(format!("{what}: no grpc-status ({a:?})")));
        };
        seen(&format!("{m:?}"), s.code());
        if s.code() != Code::Ok {
            let allowed: Vec<Code> = DOCUMENTED.iter().chain(DECODE_CODES).copied().collect();
            clean_status(&what, s, &allowed)?;
        } else {
            let payload = a.data.get(5..).unwrap_or_default();
            self.begun_by_garbage(m, payload)?;
        }
        self.probe()
    }
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

const CASES: u32 = 512;

/// Targets for calls that may not change the canary: the strategy gives the canary only
/// with inputs that must be refused.
fn target(h: &Harness, with_scratch: bool) -> BoxedStrategy<Target> {
    let port = h.participant_port;
    let ids = tx_id(h.node, h.epoch);
    let scratch = vec(valid_branch(port, "s[0-3]".boxed()), 0..4).prop_map(|v| {
        // Unique ids, so that the scratch Begin itself goes through.
        let mut seen = std::collections::HashSet::new();
        Target::Scratch(
            v.into_iter()
                .filter(|b| seen.insert(b.branch_id.clone()))
                .collect(),
        )
    });
    if with_scratch {
        prop_oneof![
            1 => Just(Target::Committed),
            1 => Just(Target::Aborted),
            2 => scratch,
            5 => ids.prop_map(Target::Id),
        ]
        .boxed()
    } else {
        prop_oneof![
            1 => Just(Target::Committed),
            1 => Just(Target::Aborted),
            5 => ids.prop_map(Target::Id),
        ]
        .boxed()
    }
}

#[test]
fn begin_with_random_branches_is_answered_cleanly() {
    let h = Harness::start("begin");
    let strategy = (timeout_ms(), begin_branches(h.participant_port));
    check_property("Begin", CASES, strategy, |(t, b)| h.begin_case(t, b));
}

#[test]
fn enlist_with_random_input_is_answered_cleanly() {
    let h = Harness::start("enlist");
    let port = h.participant_port;
    let canary = h.known.canary_branches.clone();
    let any_branch = || {
        prop_oneof![
            4 => gen_branch(port, prop_oneof![branch_id(), "s[0-4]".boxed()].boxed()).prop_map(Some),
            1 => Just(None),
        ]
    };
    let on_canary = prop_oneof![
        3 => (select(canary), 1u8..5).prop_map(move |(b, how)| Some(wrap(variant_of(&b, how, port)))),
        1 => select(h.known.canary_branches.clone()).prop_map(|b| Some(wrap(b))),
        2 => invalid_branch(port).prop_map(Some),
        1 => Just(None),
    ];
    let strategy = prop_oneof![
        2 => (Just(Target::Canary), on_canary),
        6 => (target(&h, true), any_branch()),
    ];
    check_property("Enlist", CASES, strategy, |(t, b)| h.enlist_case(t, b));
}

#[test]
fn commit_with_random_input_is_answered_cleanly() {
    let h = Harness::start("commit");
    let waits = prop_oneof![
        2 => Just(None),
        1 => Just(Some(0u64)),
        2 => (1u64..=MAX_WAIT_MS).prop_map(Some),
        1 => Just(Some(MAX_WAIT_MS)),
        1 => Just(Some(MAX_WAIT_MS + 1)),
        1 => (MAX_WAIT_MS + 1..).prop_map(Some),
    ];
    let strategy = prop_oneof![
        1 => (Just(Target::Canary), (MAX_WAIT_MS + 1..).prop_map(Some)),
        5 => (target(&h, false), waits),
    ];
    check_property("Commit", CASES, strategy, |(t, w)| h.commit_case(t, w));
}

#[test]
fn abort_with_random_input_is_answered_cleanly() {
    let h = Harness::start("abort");
    let strategy = prop_oneof![
        1 => (Just(Target::Canary), long_reason()),
        5 => (target(&h, true), reason()),
    ];
    check_property("Abort", CASES, strategy, |(t, r)| h.abort_case(t, r));
}

#[test]
fn begin_local_with_random_input_is_answered_cleanly() {
    let h = Harness::start("begin-local");
    let port = h.participant_port;
    let branch = prop_oneof![
        1 => Just(None),
        6 => gen_branch(port, branch_id()).prop_map(Some),
    ];
    let counts = prop_oneof![
        6 => 0u32..=4,
        1 => 5u32..=MAX_LOCAL_BEGIN,
        1 => Just(MAX_LOCAL_BEGIN + 1),
        1 => MAX_LOCAL_BEGIN + 1..,
    ];
    let strategy = (branch, timeout_ms(), counts);
    check_property("BeginLocal", CASES, strategy, |(b, t, n)| {
        h.begin_local_case(b, t, n)
    });
}

#[test]
fn report_local_commits_with_random_ids_is_answered_cleanly() {
    let h = Harness::start("report");
    let one = prop_oneof![
        1 => Just(Target::Canary),
        6 => target(&h, false),
    ];
    let strategy = prop_oneof![
        1 => Just(Vec::new()),
        6 => vec(one, 1..5),
        1 => (MAX_LOCAL_REPORTS - 1..MAX_LOCAL_REPORTS + 40)
            .prop_map(|n| vec![Target::Committed; n]),
    ];
    check_property(
        "ReportLocalCommits",
        CASES,
        (strategy, any::<bool>()),
        |(t, before_durable)| h.report_case(t, before_durable),
    );
}

#[test]
fn release_unused_with_random_ids_is_answered_cleanly() {
    let h = Harness::start("release");
    let strategy = prop_oneof![
        1 => (Just(Target::Canary), Just(false)),
        2 => (Just(Target::Committed), Just(true)),
        5 => (target(&h, true), Just(false)),
    ];
    check_property("ReleaseUnused", CASES, strategy, |(t, l)| {
        h.release_case(t, l)
    });
}

#[test]
fn get_transaction_with_random_ids_is_answered_cleanly() {
    let h = Harness::start("get");
    let strategy = prop_oneof![1 => Just(Target::Canary), 6 => target(&h, false)];
    check_property("GetTransaction", CASES, strategy, |t| h.get_case(t));
}

#[test]
fn list_transactions_with_random_filters_is_answered_cleanly() {
    let h = Harness::start("list");
    let states = prop_oneof![
        4 => 0i32..=7,
        1 => select(vec![-1, 8, 99, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ];
    let ages = prop_oneof![
        3 => Just(0u64),
        2 => 0u64..100_000,
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ];
    let limits = prop_oneof![
        2 => Just(0u32),
        2 => 1u32..=MAX_LIMIT,
        1 => select(vec![MAX_LIMIT, MAX_LIMIT + 1, u32::MAX]),
        1 => any::<u32>(),
    ];
    let strategy = (states, ages, limits);
    check_property("ListTransactions", CASES, strategy, |(s, a, l)| {
        h.list_case(s, a, l)
    });
}

#[test]
fn protobuf_garbage_gets_a_status_not_a_crash() {
    let h = Harness::start("garbage");
    let strategy = (select(METHODS.to_vec()), garbage(h.participant_port));
    check_property("garbage", CASES, strategy, |(m, b)| h.garbage_case(m, b));
}

#[test]
fn malformed_grpc_frames_get_a_status_not_a_crash() {
    let h = Harness::start("frames");
    let strategy = (select(METHODS.to_vec()), raw_body(h.participant_port));
    check_property("raw frames", CASES, strategy, |(m, b)| h.raw_case(m, b));
}

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

/// Collects the table's mismatches, so one run reports them all.
#[derive(Default)]
struct Table {
    failures: Vec<String>,
}

impl Table {
    fn expect<T: Debug>(&mut self, name: &str, got: Fallible<Result<T, Status>>, w: Want) {
        match got {
            Err(e) => self.failures.push(format!("{name}: {e}")),
            Ok(got) => {
                if let Err(e) = check(name, &got, &w) {
                    self.failures.push(e.to_string());
                }
            }
        }
    }

    fn note(&mut self, r: Fallible<()>) {
        if let Err(e) = r {
            self.failures.push(e.to_string());
        }
    }

    /// Probes the coordinator one last time, then fails the test with every failure
    /// the table collected.
    fn finish(mut self, h: &Harness) {
        self.note(h.probe());
        assert!(
            self.failures.is_empty(),
            "{} failures:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

impl Harness {
    fn begin_req(
        &self,
        timeout_ms: u64,
        branches: Vec<pb::Branch>,
    ) -> Fallible<Result<pb::BeginResponse, Status>> {
        let req = pb::BeginRequest {
            timeout_ms,
            branches,
        };
        let r = self.call("Begin", |mut c| async move { c.begin(req).await })?;
        if let Ok(b) = &r {
            self.note_begun(&b.tx_id);
            self.clean_up(&b.tx_id)?;
        }
        Ok(r)
    }

    fn enlist_req(
        &self,
        tx: &str,
        branch: Option<pb::Branch>,
    ) -> Fallible<Result<pb::EnlistResponse, Status>> {
        let req = pb::EnlistRequest {
            tx_id: tx.to_string(),
            branch,
        };
        self.call("Enlist", |mut c| async move { c.enlist(req).await })
    }

    fn commit_req(&self, tx: &str, wait: u64) -> Fallible<Result<pb::CommitResponse, Status>> {
        let req = requests::commit_waiting(tx, Some(wait));
        self.call("Commit", |mut c| async move { c.commit(req).await })
    }

    /// A BeginLocal; whatever it begins is noted as begun and, where `release`, released
    /// again at once (a case that leaves it instead lets it time out).
    fn begin_local_req(
        &self,
        branch: Option<pb::Branch>,
        timeout_ms: u64,
        count: u32,
        release: bool,
    ) -> Fallible<Result<pb::BeginLocalResponse, Status>> {
        let req = pb::BeginLocalRequest {
            branch,
            timeout_ms,
            count,
        };
        let r = self.call(
            "BeginLocal",
            |mut c| async move { c.begin_local(req).await },
        )?;
        if let Ok(b) = &r {
            for tx in &b.tx_ids {
                self.note_begun(tx);
                if release {
                    self.release_req(tx)?
                        .map_err(|s| fail(format!("ReleaseUnused of {tx} (clean-up): {s:?}")))?;
                }
            }
        }
        Ok(r)
    }

    fn report_req(&self, txs: &[&str]) -> Fallible<Result<pb::ReportLocalCommitsResponse, Status>> {
        let req = pb::ReportLocalCommitsRequest {
            tx_ids: txs.iter().map(|t| t.to_string()).collect(),
            answer_before_durable: false,
        };
        self.call("ReportLocalCommits", |mut c| async move {
            c.report_local_commits(req).await
        })
    }

    fn release_req(&self, tx: &str) -> Fallible<Result<pb::ReleaseUnusedResponse, Status>> {
        let req = pb::ReleaseUnusedRequest {
            tx_id: tx.to_string(),
        };
        self.call("ReleaseUnused", |mut c| async move {
            c.release_unused(req).await
        })
    }

    fn list_req(
        &self,
        state: i32,
        limit: u32,
    ) -> Fallible<Result<pb::ListTransactionsResponse, Status>> {
        let req = pb::ListTransactionsRequest {
            state,
            min_age_ms: 0,
            limit,
        };
        self.call("ListTransactions", |mut c| async move {
            c.list_transactions(req).await
        })
    }
}

#[test]
fn malformed_requests_get_the_documented_code() {
    use Code::{Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound};
    let h = Harness::start("table");
    let p = h.participant.clone();
    let (node, epoch) = (h.node, h.epoch);
    let ok_branch = |id: &str| local_branch(id, &p, 0, pb::BranchKind::Database);
    let with_endpoint = |e: &str| local_branch("e1", e, 0, pb::BranchKind::Database);
    let inv = |n: &[&str]| want(InvalidArgument, n);
    let inv_ep = |why: &str| inv(&["participant_endpoint", why]);
    let mut t = Table::default();

    // Transaction ids.
    let long = "a".repeat(65);
    let upper = format!("ABCDEF{:02X}-{epoch}-1", node & 0xff);
    t.expect("empty tx id", h.get(""), inv(&["tx_id", "empty"]));
    t.expect("65-char tx id", h.get(&long), inv(&["tx_id", "65 bytes"]));
    t.expect(
        "uppercase hex node",
        h.get(&upper),
        inv(&["tx_id", &format!("{upper:?}")]),
    );
    if h.known.canary.chars().any(|c| c.is_ascii_lowercase()) {
        let u = h.known.canary.to_uppercase();
        t.expect(
            "uppercase canary id",
            h.abort(&u, ""),
            inv(&["tx_id", &format!("{u:?}")]),
        );
    }
    t.expect(
        "`..` as tx id",
        h.commit_req("..", 0),
        inv(&["tx_id", "\"..\""]),
    );
    t.expect(
        "`../../x` as tx id",
        h.enlist_req("../../x", Some(ok_branch("e"))),
        inv(&["tx_id", "\"../../x\""]),
    );
    let padded = format!("{}\n", h.known.committed);
    t.expect(
        "tx id with a newline",
        h.abort(&padded, ""),
        inv(&["tx_id", "\\n"]),
    );
    let zero = format!("{node:08x}-0{epoch}-1");
    t.expect(
        "epoch with a leading zero",
        h.get(&zero),
        inv(&["tx_id", &zero]),
    );
    let overflow = format!("{node:08x}-18446744073709551616-1");
    t.expect(
        "epoch past u64",
        h.get(&overflow),
        inv(&["tx_id", &overflow]),
    );

    // Endpoints and branches.
    for (what, ep, why) in [
        ("endpoint without port", "http://127.0.0.1", "port"),
        ("ftp scheme", "ftp://127.0.0.1:21", "scheme"),
        ("port out of range", "http://127.0.0.1:65536", "1 to 65535"),
        ("port zero", "http://127.0.0.1:0", "1 to 65535"),
        ("port with a sign", "http://127.0.0.1:+1", "1 to 65535"),
        (
            "credentials in endpoint",
            "http://user:pw@127.0.0.1:1",
            "credentials",
        ),
        (
            "fragment in endpoint",
            "http://127.0.0.1:1#frag",
            "fragment",
        ),
        ("path in endpoint", "http://127.0.0.1:7001/x", "no path"),
        (
            "query in endpoint",
            "http://127.0.0.1:7001?a=1",
            "no path, query or fragment",
        ),
        ("no scheme", "127.0.0.1:7001", "scheme"),
        // The message names the field and the value; its reason ("a port is required")
        // is misleading for a port that is present but out of range.
        (
            "port out of range",
            "http://127.0.0.1:65536",
            "\"http://127.0.0.1:65536\"",
        ),
    ] {
        t.expect(what, h.begin_req(0, vec![with_endpoint(ep)]), inv_ep(why));
    }
    t.expect(
        "empty endpoint",
        h.begin_req(0, vec![with_endpoint("")]),
        inv(&["participant_endpoint is empty"]),
    );
    let long_ep = format!("http://{}:1", "h".repeat(300));
    t.expect(
        "endpoint over 256 bytes",
        h.begin_req(0, vec![with_endpoint(&long_ep)]),
        inv_ep(&format!("{} bytes", long_ep.len())),
    );
    t.expect(
        "branch id with space",
        h.begin_req(0, vec![ok_branch("a b")]),
        inv(&["branch_id", "\"a b\"", "' '"]),
    );
    t.expect(
        "empty branch id",
        h.begin_req(0, vec![ok_branch("")]),
        inv(&["branch_id is empty"]),
    );
    t.expect(
        "65-char branch id",
        h.begin_req(0, vec![ok_branch(&long)]),
        inv(&["branch_id", "65 bytes"]),
    );
    let mut k99 = ok_branch("k");
    k99.kind = 99;
    t.expect(
        "kind = 99",
        h.begin_req(0, vec![k99]),
        inv(&["kind 99", "\"k\""]),
    );
    let mut kneg = ok_branch("k");
    kneg.kind = -1;
    t.expect("kind = -1", h.begin_req(0, vec![kneg]), inv(&["kind -1"]));
    t.expect(
        "timeout_ms over 24 h",
        h.begin_req(DAY_MS + 1, vec![]),
        inv(&["timeout_ms", &(DAY_MS + 1).to_string()]),
    );
    t.expect("timeout_ms of 24 h", h.begin_req(DAY_MS, vec![]), Want::Ok);
    let many: Vec<pb::Branch> = (0..=MAX_BRANCHES)
        .map(|i| ok_branch(&format!("m{i}")))
        .collect();
    t.expect(
        "65 branches",
        h.begin_req(0, many.clone()),
        inv(&[&format!("at most {MAX_BRANCHES} branches")]),
    );
    let mut other_order = ok_branch("d");
    other_order.commit_order = 1;
    t.expect(
        "duplicated branch id, other commit_order",
        h.begin_req(0, vec![ok_branch("d"), other_order]),
        want(AlreadyExists, &["\"d\"", "already enlisted"]),
    );
    let mut unspecified = ok_branch("u");
    unspecified.kind = 0;
    let mut other = ok_branch("u");
    other.kind = pb::BranchKind::Other as i32;
    t.expect(
        "kind UNSPECIFIED and OTHER are the same branch",
        h.begin_req(0, vec![unspecified, other]),
        Want::Ok,
    );

    // ListTransactions.
    t.expect("state = 99", h.list_req(99, 0), inv(&["state 99"]));
    t.expect("state = -1", h.list_req(-1, 0), inv(&["state -1"]));
    t.expect(
        "limit = 10001",
        h.list_req(0, MAX_LIMIT + 1),
        inv(&["limit", "10001"]),
    );
    t.expect("limit = 10000", h.list_req(0, MAX_LIMIT), Want::Ok);

    // Commit, Abort, Enlist against real transactions.
    t.expect(
        "phase_two_wait_ms over the max",
        h.commit_req(&h.known.canary, MAX_WAIT_MS + 1),
        inv(&["phase_two_wait_ms", &(MAX_WAIT_MS + 1).to_string()]),
    );
    t.expect(
        "reason over 1024 bytes",
        h.abort(&h.known.canary, &"x".repeat(MAX_REASON + 1)),
        inv(&["reason", "1025 bytes"]),
    );
    t.expect(
        "reason of 513 two-byte characters",
        h.abort(&h.known.canary, &"é".repeat(MAX_REASON / 2 + 1)),
        inv(&["reason", "1026 bytes"]),
    );
    t.expect(
        "Enlist with missing branch",
        h.enlist_req(&h.known.canary, None),
        inv(&["branch is missing"]),
    );
    let mut moved = h.known.canary_branches[0].clone();
    moved.participant_endpoint = "http://127.0.0.1:9".into();
    t.expect(
        "Enlist of a canary branch with another endpoint",
        h.enlist_req(&h.known.canary, Some(moved)),
        want(AlreadyExists, &["\"c1\"", "already enlisted"]),
    );
    t.expect(
        "Enlist of a canary branch, identical",
        h.enlist_req(&h.known.canary, Some(h.known.canary_branches[1].clone())),
        Want::Ok,
    );
    let unknown = format!("{node:08x}-{epoch}-1000000");
    t.expect(
        "Commit of an unknown id of this node",
        h.commit_req(&unknown, 0),
        want(NotFound, &[&unknown]),
    );
    let other_node = format!("{:08x}-{epoch}-1", node ^ 1);
    t.expect(
        "GetTransaction of another node's id",
        h.get(&other_node),
        want(NotFound, &[&other_node]),
    );
    let later = format!("{node:08x}-{}-1", epoch + 1);
    t.expect(
        "Abort of a later epoch's id",
        h.abort(&later, ""),
        want(NotFound, &[&later]),
    );
    let seq0 = format!("{node:08x}-{epoch}-0");
    t.expect(
        "Enlist into sequence 0",
        h.enlist_req(&seq0, Some(ok_branch("e"))),
        want(NotFound, &[&seq0]),
    );
    let earlier = format!("{node:08x}-{}-5", epoch - 1);
    t.expect(
        "Commit of an earlier epoch's id",
        h.commit_req(&earlier, 0),
        want(Aborted, &[&earlier]),
    );
    t.expect(
        "Abort of an earlier epoch's id",
        h.abort(&earlier, "again"),
        Want::Ok,
    );
    t.expect(
        "GetTransaction of an earlier epoch's id",
        h.get(&earlier),
        Want::Ok,
    );
    t.expect(
        "Abort of a committed tx",
        h.abort(&h.known.committed, "changed my mind"),
        want(FailedPrecondition, &[&h.known.committed, "COMMITTED"]),
    );
    t.expect(
        "Abort of a committed tx, reason of exactly 1024 bytes",
        h.abort(&h.known.committed, &"y".repeat(MAX_REASON)),
        want(FailedPrecondition, &[&h.known.committed, "COMMITTED"]),
    );
    t.expect(
        "Enlist into a committed tx",
        h.enlist_req(&h.known.committed, Some(ok_branch("late"))),
        want(FailedPrecondition, &[&h.known.committed]),
    );
    t.expect(
        "Commit of a committed tx again",
        h.commit_req(&h.known.committed, MAX_WAIT_MS),
        Want::Ok,
    );
    t.expect(
        "Commit of an aborted tx",
        h.commit_req(&h.known.aborted, 0),
        want(Aborted, &[&h.known.aborted]),
    );
    t.expect(
        "Abort of an aborted tx again",
        h.abort(&h.known.aborted, ""),
        Want::Ok,
    );

    // A transaction at the branch limit refuses one more through Enlist; `..` is a legal
    // branch id (the proto allows dots).
    match h.begin_scratch(&many[..MAX_BRANCHES]) {
        Ok(full) => {
            t.expect(
                "Enlist of a 65th branch",
                h.enlist_req(&full, Some(ok_branch("one-more"))),
                inv(&[&format!("at most {MAX_BRANCHES} branches")]),
            );
            t.note(h.clean_up(&full));
        }
        Err(e) => t.failures.push(format!("Begin of 64 branches: {e}")),
    }
    match h.begin_scratch(&[]) {
        Ok(s) => {
            t.expect(
                "Enlist of `..` as branch id",
                h.enlist_req(&s, Some(ok_branch(".."))),
                Want::Ok,
            );
            t.note(h.clean_up(&s));
        }
        Err(e) => t.failures.push(format!("Begin of a scratch tx: {e}")),
    }

    // BeginLocal.
    t.expect(
        "BeginLocal without a branch",
        h.begin_local_req(None, 0, 1, true),
        inv(&["branch is missing"]),
    );
    t.expect(
        "BeginLocal with a bad branch id",
        h.begin_local_req(Some(ok_branch("a b")), 0, 1, true),
        inv(&["branch_id", "\"a b\""]),
    );
    t.expect(
        "BeginLocal with a bad endpoint",
        h.begin_local_req(Some(with_endpoint("ftp://127.0.0.1:21")), 0, 1, true),
        inv_ep("scheme"),
    );
    t.expect(
        "BeginLocal with timeout_ms over 24 h",
        h.begin_local_req(Some(ok_branch("l")), DAY_MS + 1, 1, true),
        inv(&["timeout_ms", &(DAY_MS + 1).to_string()]),
    );
    t.expect(
        "BeginLocal of 257",
        h.begin_local_req(Some(ok_branch("l")), 0, MAX_LOCAL_BEGIN + 1, true),
        inv(&["count is 257", "at most 256"]),
    );
    t.expect(
        "BeginLocal of 256",
        h.begin_local_req(Some(ok_branch("l")), 0, MAX_LOCAL_BEGIN, true),
        Want::Ok,
    );

    // ReportLocalCommits.
    t.expect(
        "ReportLocalCommits of no ids",
        h.report_req(&[]),
        inv(&["tx_ids is empty"]),
    );
    let many_ids = vec![h.known.committed.as_str(); MAX_LOCAL_REPORTS + 1];
    t.expect(
        "ReportLocalCommits of 1025 ids",
        h.report_req(&many_ids),
        inv(&["tx_ids holds 1025 ids", "at most 1024"]),
    );
    t.expect(
        "ReportLocalCommits of 1024 ids (the committed tx)",
        h.report_req(&many_ids[1..]),
        Want::Ok,
    );
    t.expect(
        "ReportLocalCommits with an invalid second id (nothing recorded)",
        h.report_req(&[h.known.committed.as_str(), ".."]),
        inv(&["tx_ids[1]", "\"..\""]),
    );
    t.expect(
        "ReportLocalCommits of an ordinary transaction",
        h.report_req(&[h.known.canary.as_str()]),
        want(FailedPrecondition, &[&h.known.canary, "not begun"]),
    );
    t.expect(
        "ReportLocalCommits naming an ordinary transaction second",
        h.report_req(&[h.known.committed.as_str(), h.known.canary.as_str()]),
        want(
            FailedPrecondition,
            &[&format!("transaction {}: ", h.known.canary)],
        ),
    );
    t.expect(
        "ReportLocalCommits of an unknown id",
        h.report_req(&[unknown.as_str()]),
        want(NotFound, &[&unknown]),
    );
    t.expect(
        "ReportLocalCommits of an aborted tx",
        h.report_req(&[h.known.aborted.as_str()]),
        want(Aborted, &[&h.known.aborted]),
    );

    // ReleaseUnused.
    t.expect(
        "ReleaseUnused of an empty id",
        h.release_req(""),
        inv(&["tx_id", "empty"]),
    );
    t.expect(
        "ReleaseUnused of an ordinary transaction",
        h.release_req(&h.known.canary),
        want(FailedPrecondition, &[&h.known.canary, "not begun"]),
    );
    t.expect(
        "ReleaseUnused of a committed tx",
        h.release_req(&h.known.committed),
        want(FailedPrecondition, &[&h.known.committed, "COMMITTED"]),
    );
    t.expect(
        "ReleaseUnused of an unknown id",
        h.release_req(&unknown),
        want(NotFound, &[&unknown]),
    );

    t.finish(&h);
}

/// A coordinator running with one-phase commits off refuses BeginLocal, naming the
/// setting; everything else answers as usual.
#[test]
fn local_begins_name_the_setting_when_one_phase_commits_are_off() {
    let h = Harness::start_with("one-phase-off", false);
    let mut t = Table::default();
    let branch = local_branch("l", &h.participant, 0, pb::BranchKind::Database);
    for count in [0, 1, 5] {
        t.expect(
            &format!("BeginLocal of {count} with one-phase commits off"),
            h.begin_local_req(Some(branch.clone()), 0, count, true),
            want(
                Code::FailedPrecondition,
                &["local commits need one-phase commits", "--one-phase"],
            ),
        );
    }
    // Input is still checked first.
    t.expect(
        "BeginLocal without a branch, one-phase commits off",
        h.begin_local_req(None, 0, 1, true),
        want(Code::InvalidArgument, &["branch is missing"]),
    );
    t.expect(
        "Begin of the same branch, one-phase commits off",
        h.begin_req(0, vec![branch]),
        Want::Ok,
    );
    t.expect(
        "ReportLocalCommits of an ordinary transaction, one-phase commits off",
        h.report_req(&[h.known.canary.as_str()]),
        want(Code::FailedPrecondition, &[&h.known.canary, "not begun"]),
    );
    t.finish(&h);
}

/// Votes yes on branch "a" and no on branch "b"; answers aborts without a result while
/// `silent`, then with ABORTED.
struct SilentAborts {
    silent: std::sync::atomic::AtomicBool,
    aborts: std::sync::atomic::AtomicU64,
}

impl Behaviour for SilentAborts {
    fn prepare(&self, req: &pb::PrepareRequest) -> Result<pb::PrepareResponse, Status> {
        let vote = if req.branch_id == "b" {
            pb::Vote::No
        } else {
            pb::Vote::Yes
        };
        Ok(pb::PrepareResponse {
            vote: vote as i32,
            reason: "no, for the test".into(),
        })
    }

    fn abort(&self, _req: &pb::AbortBranchRequest) -> Result<pb::AbortBranchResponse, Status> {
        use std::sync::atomic::Ordering;
        self.aborts.fetch_add(1, Ordering::SeqCst);
        let result = if self.silent.load(Ordering::SeqCst) {
            pb::AbortResult::Unspecified
        } else {
            pb::AbortResult::Aborted
        };
        Ok(pb::AbortBranchResponse {
            result: result as i32,
        })
    }
}

/// A prepared branch whose participant answers its abort without a result has not been
/// aborted: the coordinator records the failed delivery (naming the participant and the
/// field), keeps the transaction ABORTING and asks again, and finishes it only once the
/// participant answers ABORTED.
#[test]
fn an_abort_answered_without_a_result_is_asked_again() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        let behaviour = Arc::new(SilentAborts {
            silent: AtomicBool::new(true),
            aborts: AtomicU64::new(0),
        });
        let participant = TestParticipant::start(behaviour.clone(), Services::UnaryOnly)
            .await
            .expect("start the participant");
        let log = Arc::new(SledLog::open(dir.path(), SledLogOptions::default()).expect("open"));
        let served = serve(quick_retries(), log).await;
        let (stop, server) = (served.stop, served.task);
        let mut c = CoordinatorClient::new(connect(&served.url).await);
        let endpoint = participant.endpoint.clone();
        let tx_id = c
            .begin(pb::BeginRequest {
                timeout_ms: 0,
                branches: vec![
                    local_branch("a", &endpoint, 0, pb::BranchKind::Database),
                    local_branch("b", &endpoint, 0, pb::BranchKind::Database),
                ],
            })
            .await
            .expect("Begin")
            .into_inner()
            .tx_id;
        let e = c
            .commit(requests::commit(&tx_id))
            .await
            .expect_err("branch b votes no");
        assert_eq!(e.code(), Code::Aborted, "{e:?}");
        // Answered without a result, again and again: the prepared branch is not aborted.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = view(&mut c, &tx_id).await;
            assert_eq!(v.state, pb::TxState::Aborting as i32, "{v:?}");
            let a = requests::branch_of(&v, "a").expect("branch a is still held");
            assert_ne!(a.state, pb::BranchState::Aborted as i32, "{v:?}");
            if a.attempts >= 3 && behaviour.aborts.load(Ordering::SeqCst) >= 3 {
                for needle in [
                    endpoint.as_str(),
                    "AbortBranchResponse.result",
                    "without a result",
                ] {
                    assert!(a.last_error.contains(needle), "{needle:?} in {a:?}");
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the abort was not asked again: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Once the participant says ABORTED, the transaction finishes.
        behaviour.silent.store(false, Ordering::SeqCst);
        let v = get_until(&mut c, &tx_id, pb::TxState::Aborted).await;
        assert_eq!(v.outcome, pb::Outcome::Aborted as i32, "{v:?}");
        let _ = stop.send(());
        let _ = server.await;
        drop(participant);
    });
}
