//! Security of every gRPC endpoint, on a real `twopc serve` process: TLS on the
//! coordinator's port, bearer tokens of the Coordinator and Admin APIs, mutual TLS from
//! the coordinator to participants (the SDK's embedded server) and from clients to the
//! coordinator. Every refused call is shown to change nothing: no transaction is created,
//! none changes state, no participant hears of it, no audit record is written.
//!
//! Certificates are made at test time (rcgen) in each test's own temp directory: a CA, a
//! server certificate for `localhost` and `127.0.0.1`, client certificates, and a second,
//! unrelated CA. No key is committed. Waits poll observable state, each test has an
//! overall deadline.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use support::{expect_status, twopc_tx, with_deadline, Coordinator, MsgKind, TestParticipant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use twopc_participant::resource::{AbortOutcome, BranchKind, OnePhase, Resource, Retry, Vote};
use twopc_participant::{BearerToken, Error as SdkError, TwoPc};
use twopc_proto::v1 as pb;
use twopc_proto::v1::admin_client::AdminClient;
use twopc_proto::v1::coordinator_client::CoordinatorClient;
use twopc_testkit::requests;

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(90);
/// Bound on connecting to anything.
const CONNECT: Duration = Duration::from_secs(5);

const CLIENT_TOKEN: &str = "client-token-6f1c2a9e0b7d4c3a";
const ADMIN_TOKEN: &str = "admin-token-93be0c7a51d24f68";
const WRONG_TOKEN: &str = "wrong-token-0000000000000000";

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A certificate and its key, as PEM text and as files.
struct Pair {
    cert_pem: String,
    key_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Pair {
    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn cert_arg(&self) -> &str {
        self.cert.to_str().expect("utf-8 temp path")
    }

    fn key_arg(&self) -> &str {
        self.key.to_str().expect("utf-8 temp path")
    }
}

/// A test CA and what it signed, in a temp dir of its own.
struct Pki {
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM text and file).
    ca_pem: String,
    ca: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`.
    server: Pair,
    /// Client certificate.
    client: Pair,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM file");
    path
}

impl Pki {
    /// A fresh CA named `name` with one server and one client certificate.
    fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("twopc-pki-")
            .tempdir()
            .expect("temp dir for certificates");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("twopc test CA {name}"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |cn: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("sign the leaf");
            let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
            Pair {
                cert: write(dir.path(), &format!("{file}.crt"), &cert_pem),
                key: write(dir.path(), &format!("{file}.key"), &key_pem),
                cert_pem,
                key_pem,
            }
        };
        let server = leaf(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        let client = leaf(
            "twopc test client",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        let ca_pem = ca_cert.pem();
        Pki {
            ca: write(dir.path(), "ca.crt", &ca_pem),
            ca_pem,
            server,
            client,
            _dir: dir,
        }
    }

    fn ca_arg(&self) -> &str {
        self.ca.to_str().expect("utf-8 temp path")
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// A TLS channel to `coord` trusting `ca_pem`, presenting `identity` if given.
async fn tls_channel(
    coord: &Coordinator,
    ca_pem: &str,
    identity: Option<Identity>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    let ep = Endpoint::from_shared(format!("https://{}", coord.addr()))
        .expect("https url")
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e:?}"))?;
    connect(ep).await
}

/// A plaintext channel to `coord`.
async fn plain_channel(coord: &Coordinator) -> Result<Channel, String> {
    connect(Endpoint::from_shared(coord.url()).expect("http url")).await
}

/// A channel through `ep`, the connection bounded by [`CONNECT`] and each call by 15 s.
async fn connect(ep: Endpoint) -> Result<Channel, String> {
    let ep = ep.connect_timeout(CONNECT).timeout(Duration::from_secs(15));
    match tokio::time::timeout(CONNECT * 2, ep.connect()).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("connect timed out".into()),
    }
}

type Authed = InterceptedService<Channel, BearerToken>;

fn bearer(token: Option<&str>) -> BearerToken {
    BearerToken::new(token).expect("a valid token")
}

fn coordinator_client(ch: &Channel, token: Option<&str>) -> CoordinatorClient<Authed> {
    CoordinatorClient::with_interceptor(ch.clone(), bearer(token))
}

fn admin_client(ch: &Channel, token: Option<&str>) -> AdminClient<Authed> {
    AdminClient::with_interceptor(ch.clone(), bearer(token))
}

fn begin_req(branches: Vec<pb::Branch>) -> pb::BeginRequest {
    pb::BeginRequest {
        timeout_ms: 0,
        branches,
    }
}

fn commit_req(tx_id: &str) -> pb::CommitRequest {
    requests::commit_waiting(tx_id, Some(5_000))
}

fn list_req() -> pb::AdminListTransactionsRequest {
    pb::AdminListTransactionsRequest {
        state: pb::TxState::Unspecified as i32,
        older_than_ms: 0,
        limit: 100,
    }
}

/// The ids the Admin API lists as unfinished (asked with the admin token).
async fn listed(admin: &mut AdminClient<Authed>) -> Vec<String> {
    admin
        .list_transactions(list_req())
        .await
        .expect("ListTransactions with the admin token")
        .into_inner()
        .transactions
        .into_iter()
        .map(|t| t.tx_id)
        .collect()
}

async fn state_of(client: &mut CoordinatorClient<Authed>, tx_id: &str) -> pb::TxState {
    let resp = client
        .get_transaction(requests::get(tx_id))
        .await
        .expect("GetTransaction with a valid token")
        .into_inner();
    pb::TxState::try_from(resp.state).unwrap_or(pb::TxState::Unspecified)
}

/// Runs `twopc tx <args> --coordinator url` with `env` as the only `TWOPC_*` variables.
async fn tx_cli(url: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let run = twopc_tx(Some(url), args, env).await;
    (run.code, run.stdout, run.stderr)
}

// ---------------------------------------------------------------------------------------
// (a) TLS on the coordinator's port
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_serves_clients_that_trust_its_ca_and_no_one_else() {
    with_deadline(TEST_DEADLINE, async {
        let pki = Pki::new("main");
        let other = Pki::new("other");
        let coord = Coordinator::start(&[
            ("--tls-cert", pki.server.cert_arg()),
            ("--tls-key", pki.server.key_arg()),
        ])
        .await;
        let p = TestParticipant::start("p").await;

        // A client trusting the CA commits a two-branch transaction.
        let ch = tls_channel(&coord, &pki.ca_pem, None)
            .await
            .expect("TLS client with the right CA connects");
        let mut client = coordinator_client(&ch, None);
        let id = client
            .begin(begin_req(vec![p.branch("a"), p.branch("b")]))
            .await
            .expect("Begin over TLS")
            .into_inner()
            .tx_id;
        client
            .commit(commit_req(&id))
            .await
            .expect("Commit over TLS");
        assert_eq!(state_of(&mut client, &id).await, pb::TxState::Committed);
        assert!(p.saw(&id, MsgKind::Prepare) && p.saw(&id, MsgKind::Commit));
        // Health answers over TLS too, without a token.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health over TLS")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        // A plaintext client gets nowhere: the connection or the call fails.
        let before = listed(&mut admin_client(&ch, None)).await;
        if let Ok(plain) = plain_channel(&coord).await {
            let res = coordinator_client(&plain, None)
                .begin(begin_req(vec![p.branch("c")]))
                .await;
            let status = res.expect_err("a plaintext call to a TLS port must fail");
            assert_ne!(status.code(), Code::Ok);
        }
        // A client trusting another CA refuses the server's certificate.
        match tls_channel(&coord, &other.ca_pem, None).await {
            Err(e) => assert!(
                e.to_lowercase().contains("certificate") || e.contains("invalid peer"),
                "{e}"
            ),
            Ok(ch) => {
                let res = coordinator_client(&ch, None)
                    .begin(begin_req(vec![p.branch("d")]))
                    .await;
                res.expect_err("a client trusting another CA must not get through");
            }
        }
        assert_eq!(
            listed(&mut admin_client(&ch, None)).await,
            before,
            "refused clients created nothing"
        );
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// (b) Tokens
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_refuse_calls_and_refused_calls_change_nothing() {
    with_deadline(TEST_DEADLINE, async {
        let dir = tempfile::tempdir().expect("temp dir");
        // The admin token from a file (with the newline editors add), the client token
        // from the environment: neither appears in argv.
        let admin_file = write(dir.path(), "admin-token", &format!("{ADMIN_TOKEN}\n"));
        let coord = Coordinator::start_with_env(
            &[(
                "--admin-token-file",
                admin_file.to_str().expect("utf-8 path"),
            )],
            &[("TWOPC_CLIENT_TOKEN", CLIENT_TOKEN)],
        )
        .await;
        let p = TestParticipant::start("p").await;
        let ch = plain_channel(&coord).await.expect("connect");
        let mut admin = admin_client(&ch, Some(ADMIN_TOKEN));
        assert!(listed(&mut admin).await.is_empty());

        // Begin without a token, with a wrong one, with a malformed header: refused, and
        // no transaction exists afterwards.
        let s = expect_status(
            coordinator_client(&ch, None)
                .begin(begin_req(vec![p.branch("a")]))
                .await,
            Code::Unauthenticated,
            &["Bearer", "client token"],
        );
        assert!(!s.message().contains(CLIENT_TOKEN));
        let s = expect_status(
            coordinator_client(&ch, Some(WRONG_TOKEN))
                .begin(begin_req(vec![p.branch("a")]))
                .await,
            Code::Unauthenticated,
            &["not valid"],
        );
        assert!(!s.message().contains(WRONG_TOKEN), "{}", s.message());
        let mut raw = CoordinatorClient::new(ch.clone());
        let mut req = tonic::Request::new(begin_req(vec![p.branch("a")]));
        req.metadata_mut().insert(
            "authorization",
            format!("Basic {CLIENT_TOKEN}").parse().expect("ascii"),
        );
        expect_status(
            raw.begin(req).await,
            Code::Unauthenticated,
            &["Bearer <token>"],
        );
        assert!(
            listed(&mut admin).await.is_empty(),
            "a refused Begin created a transaction"
        );

        // The client token works; so does the admin token on the client API.
        let mut client = coordinator_client(&ch, Some(CLIENT_TOKEN));
        let id = client
            .begin(begin_req(vec![p.branch("a"), p.branch("b")]))
            .await
            .expect("Begin with the client token")
            .into_inner()
            .tx_id;
        let mut as_admin = coordinator_client(&ch, Some(ADMIN_TOKEN));
        assert_eq!(state_of(&mut as_admin, &id).await, pb::TxState::Active);
        assert_eq!(listed(&mut admin).await, vec![id.clone()]);

        // Commit and Abort without a valid token: refused, the transaction stays ACTIVE
        // and no participant hears of it.
        for token in [None, Some(WRONG_TOKEN)] {
            expect_status(
                coordinator_client(&ch, token).commit(commit_req(&id)).await,
                Code::Unauthenticated,
                &[],
            );
            expect_status(
                coordinator_client(&ch, token)
                    .abort(pb::AbortRequest {
                        tx_id: id.clone(),
                        reason: "refused".into(),
                    })
                    .await,
                Code::Unauthenticated,
                &[],
            );
            expect_status(
                coordinator_client(&ch, token)
                    .enlist(pb::EnlistRequest {
                        tx_id: id.clone(),
                        branch: Some(p.branch("c")),
                    })
                    .await,
                Code::Unauthenticated,
                &[],
            );
        }
        assert_eq!(state_of(&mut client, &id).await, pb::TxState::Active);
        assert!(p.received().is_empty(), "{:?}", p.received());

        // The Admin API: no token, a wrong one, the client token: refused.
        expect_status(
            admin_client(&ch, None).list_transactions(list_req()).await,
            Code::Unauthenticated,
            &["admin token"],
        );
        expect_status(
            admin_client(&ch, Some(WRONG_TOKEN))
                .list_transactions(list_req())
                .await,
            Code::Unauthenticated,
            &[],
        );
        let resolve = |force| pb::AdminResolveRequest {
            tx_id: id.clone(),
            decision: pb::ResolveDecision::Abort as i32,
            reason: "testing the token".into(),
            operator: "tester".into(),
            force,
        };
        expect_status(
            admin_client(&ch, Some(CLIENT_TOKEN))
                .resolve(resolve(true))
                .await,
            Code::PermissionDenied,
            &["client token may not use the admin API", "admin token"],
        );
        expect_status(
            admin_client(&ch, None).resolve(resolve(true)).await,
            Code::Unauthenticated,
            &[],
        );
        // ... and changed nothing: no audit record, same state, same outcome.
        let shown = admin
            .show_transaction(pb::AdminShowTransactionRequest { tx_id: id.clone() })
            .await
            .expect("ShowTransaction with the admin token")
            .into_inner();
        assert!(shown.audits.is_empty(), "{:?}", shown.audits);
        assert_eq!(shown.state, pb::TxState::Active as i32);
        assert_eq!(shown.outcome, pb::Outcome::Unspecified as i32);
        assert!(p.received().is_empty());

        // Health and reflection stay open.
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "twopc.v1.Coordinator".into(),
            })
            .await
            .expect("health needs no token");

        // The CLI: with the admin token (flag or environment) it lists the transaction;
        // without one, or with the client token, it fails clearly.
        let url = coord.url();
        let (code, out, err) = tx_cli(&url, &["list", "--json", "--token", ADMIN_TOKEN], &[]).await;
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains(&id), "{out}");
        let (code, out, err) = tx_cli(
            &url,
            &["list", "--json"],
            &[("TWOPC_ADMIN_TOKEN", ADMIN_TOKEN)],
        )
        .await;
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains(&id), "{out}");
        let (code, out, err) = tx_cli(&url, &["list"], &[]).await;
        assert_eq!(code, Some(1), "stdout {out:?} stderr {err:?}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("UNAUTHENTICATED") && err.contains("--token"),
            "{err}"
        );
        let (code, _, err) = tx_cli(
            &url,
            &[
                "resolve",
                &id,
                "--abort",
                "--reason",
                "x",
                "--token",
                CLIENT_TOKEN,
            ],
            &[],
        )
        .await;
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("PERMISSION_DENIED"), "{err}");
        assert!(!err.contains(CLIENT_TOKEN), "{err}");
        assert_eq!(state_of(&mut client, &id).await, pb::TxState::Active);

        // With the admin token the same resolution goes through (and is audited): what
        // the refused calls would have done.
        let resp = admin
            .resolve(resolve(false))
            .await
            .expect("Resolve with the admin token")
            .into_inner();
        assert!(resp.record.is_some_and(|r| r.accepted));
        let shown = admin
            .show_transaction(pb::AdminShowTransactionRequest { tx_id: id.clone() })
            .await
            .expect("ShowTransaction")
            .into_inner();
        assert_eq!(shown.audits.len(), 1);
        assert_eq!(shown.outcome, pb::Outcome::Aborted as i32);
        assert!(p.violations().is_empty(), "{:?}", p.violations());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_security_settings_stop_the_start_naming_the_flag() {
    with_deadline(TEST_DEADLINE, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new("main");
        let not_pem = write(dir.path(), "not.pem", "hello\n");
        let not_pem = not_pem.to_str().expect("utf-8 path");
        let weak = write(dir.path(), "weak-token", "short\n");
        let weak = weak.to_str().expect("utf-8 path");
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().expect("utf-8 path");
        for (flags, needles) in [
            (
                vec![("--tls-cert", pki.server.cert_arg())],
                vec!["tls-key", "both or neither"],
            ),
            (
                vec![("--tls-cert", missing), ("--tls-key", pki.server.key_arg())],
                vec!["--tls-cert", "missing.pem"],
            ),
            (
                vec![
                    ("--tls-cert", pki.server.cert_arg()),
                    ("--tls-key", pki.server.key_arg()),
                    ("--tls-client-ca", not_pem),
                ],
                vec!["--tls-client-ca", "no PEM certificate"],
            ),
            (
                // The key of another certificate.
                vec![
                    ("--tls-cert", pki.server.cert_arg()),
                    ("--tls-key", pki.client.key_arg()),
                ],
                vec!["--tls-cert/--tls-key"],
            ),
            (
                vec![("--participant-ca", not_pem)],
                vec!["--participant-ca", "no PEM certificate"],
            ),
            (
                vec![("--admin-token-file", weak)],
                vec!["--admin-token-file", "16"],
            ),
            (
                vec![("--client-token", "short")],
                vec!["client-token", "16"],
            ),
        ] {
            let data = dir.path().join("data");
            let exited =
                Coordinator::run_expecting_exit(&data, &flags, Duration::from_secs(20)).await;
            assert!(!exited.status.success(), "{flags:?} started: {exited:?}");
            assert!(
                !exited.stdout.contains("listening"),
                "{flags:?}: bound the port before checking: {exited:?}"
            );
            for n in &needles {
                assert!(
                    exited.stderr.contains(n),
                    "{flags:?}: {:?} lacks {n:?}",
                    exited.stderr
                );
            }
            assert!(!exited.stderr.contains("= short"), "{:?}", exited.stderr);
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// (c) Mutual TLS between the coordinator and participants, and on the coordinator's port
// ---------------------------------------------------------------------------------------

/// What a [`MemResource`] did with one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mem {
    Prepared,
    Committed,
    Aborted,
}

/// An in-memory resource: records every branch's state and every call.
struct MemResource {
    name: String,
    branches: Mutex<HashMap<(String, String), Mem>>,
    calls: Mutex<Vec<String>>,
}

impl MemResource {
    fn new(name: &str) -> Arc<MemResource> {
        Arc::new(MemResource {
            name: name.into(),
            branches: Mutex::new(HashMap::new()),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, tx_id: &str, branch_id: &str, call: &str, to: Mem) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(call.into());
        self.branches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((tx_id.into(), branch_id.into()), to);
    }

    fn state(&self, tx_id: &str) -> Option<Mem> {
        self.branches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|((t, _), _)| t == tx_id)
            .map(|(_, s)| *s)
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl Resource for MemResource {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> BranchKind {
        BranchKind::Database
    }

    async fn prepare(&self, tx_id: &str, branch_id: &str) -> Vote {
        self.set(tx_id, branch_id, "prepare", Mem::Prepared);
        Vote::Yes
    }

    async fn commit(&self, tx_id: &str, branch_id: &str) -> Result<(), Retry> {
        self.set(tx_id, branch_id, "commit", Mem::Committed);
        Ok(())
    }

    async fn commit_one_phase(&self, tx_id: &str, branch_id: &str) -> Result<OnePhase, Retry> {
        self.set(tx_id, branch_id, "commit_one_phase", Mem::Committed);
        Ok(OnePhase::Committed)
    }

    async fn abort(&self, tx_id: &str, branch_id: &str) -> Result<AbortOutcome, Retry> {
        self.set(tx_id, branch_id, "abort", Mem::Aborted);
        Ok(AbortOutcome::Aborted)
    }

    async fn in_doubt(&self) -> Result<Vec<(String, String)>, Retry> {
        Ok(self
            .branches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, s)| **s == Mem::Prepared)
            .map(|(k, _)| k.clone())
            .collect())
    }
}

/// An SDK whose participant server requires client certificates of `pki`'s CA, talking
/// to `coord` over TLS with the client token; two in-memory resources registered.
async fn mtls_sdk(
    coord: &Coordinator,
    pki: &Pki,
    service: &str,
) -> (TwoPc, Arc<MemResource>, Arc<MemResource>) {
    let sdk = TwoPc::builder(coord.url())
        .service(service)
        .recovery_interval(Duration::from_secs(3600))
        .coordinator_ca(pki.ca_pem.clone())
        .token(CLIENT_TOKEN)
        .participant_tls(pki.server.cert_pem.clone(), pki.server.key_pem.clone())
        .participant_client_ca(pki.ca_pem.clone())
        .start()
        .await
        .expect("start the SDK with TLS");
    assert!(sdk.endpoint().starts_with("https://"), "{}", sdk.endpoint());
    let a = sdk.register(MemResource::new("a")).expect("register a");
    let b = sdk.register(MemResource::new("b")).expect("register b");
    (sdk, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_participants_commits_and_a_coordinator_without_the_certificate_cannot_reach_them(
) {
    with_deadline(TEST_DEADLINE, async {
        let pki = Pki::new("main");
        let tls_and_tokens = [
            ("--tls-cert", pki.server.cert_arg()),
            ("--tls-key", pki.server.key_arg()),
            ("--client-token", CLIENT_TOKEN),
            ("--admin-token", ADMIN_TOKEN),
            ("--participant-ca", pki.ca_arg()),
        ];

        // With its client certificate, the coordinator runs both phases over mutual TLS.
        let mut flags = tls_and_tokens.to_vec();
        flags.extend([
            ("--participant-cert", pki.client.cert_arg()),
            ("--participant-key", pki.client.key_arg()),
        ]);
        let coord = Coordinator::start(&flags).await;
        let (sdk, a, b) = mtls_sdk(&coord, &pki, "orders").await;
        let tx = sdk.begin().await.expect("Begin over TLS with the token");
        tx.enlist(&*a).await.expect("enlist a");
        tx.enlist(&*b).await.expect("enlist b");
        let id = tx.id().to_string();
        tx.commit().await.expect("two-phase commit over mutual TLS");
        assert_eq!(a.calls(), ["prepare", "commit"]);
        assert_eq!(a.state(&id), Some(Mem::Committed));
        assert_eq!(b.state(&id), Some(Mem::Committed));
        // Recovery's GetTransaction carries the token too.
        let got = sdk
            .coordinator()
            .get_transaction(requests::get(&id))
            .await
            .expect("GetTransaction through the SDK's client");
        assert_eq!(got.into_inner().outcome, pb::Outcome::Committed as i32);
        assert_eq!(sdk.recover_now().await, 0);
        sdk.shutdown().await;

        // Without the client certificate the participant refuses the handshake: prepare
        // cannot be delivered and the transaction aborts, touching nothing.
        let no_cert = Coordinator::start(
            &[
                tls_and_tokens.as_slice(),
                &[("--prepare-timeout-ms", "3000")],
            ]
            .concat(),
        )
        .await;
        let (sdk, a, b) = mtls_sdk(&no_cert, &pki, "orders2").await;
        let tx = sdk.begin().await.expect("Begin");
        tx.enlist(&*a).await.expect("enlist a");
        tx.enlist(&*b).await.expect("enlist b");
        let id = tx.id().to_string();
        match tx.commit().await {
            Err(SdkError::Aborted(why)) => assert!(!why.is_empty()),
            other => panic!("a coordinator without its client certificate committed: {other:?}"),
        }
        assert!(a.calls().is_empty(), "{:?}", a.calls());
        assert!(b.calls().is_empty(), "{:?}", b.calls());
        let mut admin = admin_client(
            &tls_channel(&no_cert, &pki.ca_pem, None)
                .await
                .expect("admin over TLS"),
            Some(ADMIN_TOKEN),
        );
        let shown = admin
            .show_transaction(pb::AdminShowTransactionRequest { tx_id: id.clone() })
            .await
            .expect("ShowTransaction")
            .into_inner();
        assert_eq!(shown.outcome, pb::Outcome::Aborted as i32, "{shown:?}");
        sdk.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_with_client_ca_refuses_clients_without_a_certificate_of_that_ca() {
    with_deadline(TEST_DEADLINE, async {
        let pki = Pki::new("main");
        let other = Pki::new("other");
        let coord = Coordinator::start(&[
            ("--tls-cert", pki.server.cert_arg()),
            ("--tls-key", pki.server.key_arg()),
            ("--tls-client-ca", pki.ca_arg()),
        ])
        .await;
        let p = TestParticipant::start("p").await;

        // With a client certificate of the CA: served.
        let ch = tls_channel(&coord, &pki.ca_pem, Some(pki.client.identity()))
            .await
            .expect("connect with a client certificate");
        let mut client = coordinator_client(&ch, None);
        let id = client
            .begin(begin_req(vec![p.branch("a")]))
            .await
            .expect("Begin with a client certificate")
            .into_inner()
            .tx_id;
        let mut admin = admin_client(&ch, None);
        assert_eq!(listed(&mut admin).await, vec![id.clone()]);

        // Without one, or with one of another CA: the handshake (or the first call) fails
        // and nothing is created.
        for identity in [None, Some(other.client.identity())] {
            let described = format!("identity {}", identity.is_some());
            if let Ok(ch) = tls_channel(&coord, &pki.ca_pem, identity).await {
                let res = coordinator_client(&ch, None)
                    .begin(begin_req(vec![p.branch("b")]))
                    .await;
                let status = res.expect_err(&described);
                assert_ne!(status.code(), Code::Ok, "{described}");
            }
        }
        assert_eq!(listed(&mut admin).await, vec![id]);
        // The CLI with its client certificate, and without.
        let url = format!("https://{}", coord.addr());
        let (code, out, err) = tx_cli(
            &url,
            &[
                "list",
                "--json",
                "--ca-cert",
                pki.ca_arg(),
                "--client-cert",
                pki.client.cert_arg(),
                "--client-key",
                pki.client.key_arg(),
            ],
            &[],
        )
        .await;
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("transactions"), "{out}");
        let (code, out, _) = tx_cli(&url, &["list", "--ca-cert", pki.ca_arg()], &[]).await;
        assert_eq!(code, Some(1));
        assert!(out.is_empty());
        let (code, _, err) = tx_cli(&url, &["list"], &[]).await;
        assert_eq!(code, Some(1));
        assert!(err.contains("--ca-cert"), "{err}");
    })
    .await;
}
