//! Talking to etcd: the fenced write every change goes through, linearizable reads (one
//! key, a read-only transaction, a whole prefix page by page at one revision), and the
//! retry of requests that failed on the way (a dead member in the balancer, a leader
//! election).
//!
//! Each endpoint has a client of its own, and requests go to one member until it fails
//! on the way, then to the next: a balancer over all of them keeps sending to a dead
//! member (it stays in the set) until each request times out, which stalls every write
//! for that long. Each attempt is bounded by [`ATTEMPT_TIMEOUT`].
//!
//! Retrying is safe because every write of the log is idempotent and fenced: a decision
//! is `If version == 0 Then Put Else Get` (a repeat finds its own record), the other
//! writes are blind puts and deletes of the same values, and the owner compare makes a
//! retry after losing the shard fail as fenced instead of writing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, Error as EtcdError, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};

use super::keys::{prefix_end, Keys};

/// Bound on one attempt of a request (etcd answers in milliseconds; a leader election
/// takes about a second): past it the next member is tried.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

/// One client per etcd endpoint, and the one requests go to now.
pub(super) struct Members {
    clients: Vec<Client>,
    /// Index into `clients`; moves on when a request to that member fails on the way.
    current: AtomicUsize,
}

impl Members {
    /// Clients for `endpoints` (connecting lazily: a member that is down now is no error).
    pub(super) async fn connect(
        endpoints: &[String],
        options: etcd_client::ConnectOptions,
    ) -> Result<Members, String> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let client = Client::connect([e.as_str()], Some(options.clone()))
                .await
                .map_err(|err| format!("etcd endpoint {e:?}: {err}"))?;
            clients.push(client);
        }
        if clients.is_empty() {
            return Err("no etcd endpoints given".into());
        }
        Ok(Members {
            clients,
            current: AtomicUsize::new(0),
        })
    }

    /// The member to ask now: its index and client.
    pub(super) fn pick(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Acquire) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Member `i` failed on the way: move on to the next (unless someone already did).
    pub(super) fn skip(&self, i: usize) {
        let next = (i + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Keys a range read asks for at a time (keeps responses far below gRPC's 4 MiB limit).
const PAGE: i64 = 512;

/// Why a write did not happen.
#[derive(Debug)]
pub(super) enum WriteError {
    /// The owner key's create revision is no longer our epoch (0: the key is gone): the
    /// shard belongs to someone else, or to nobody, and nothing was written.
    Fenced {
        /// The owner key's create revision now (0 if it does not exist).
        current: u64,
        /// Its value (who owns it now), for messages.
        owner: String,
    },
    /// The request failed (after retries), or a failure was injected; it may or may not
    /// have been applied.
    Failed(String),
}

/// The etcd client of one open log, with its keys and epoch.
pub(super) struct Store {
    /// The clients (cheap to clone: every call clones one, their methods take `&mut self`).
    members: Arc<Members>,
    pub(super) keys: Keys,
    /// The owner key's create revision at open: the compare of every write.
    epoch: i64,
    /// How long a request that fails on the way is retried before it counts as failed.
    retry_for: Duration,
    /// Fault injection ([`super::EtcdLogOptions::fail_writes`]).
    fail_writes: Option<Arc<AtomicBool>>,
}

/// Whether `e` may go away on a retry (a member down, no leader yet, a timeout) rather
/// than being an answer.
pub(super) fn transient(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
        ),
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        _ => false,
    }
}

/// Runs `attempt` on the current member until it succeeds, fails for good, or
/// `retry_for` has passed, moving on to the next member after each failure on the way.
pub(super) async fn retrying<T, F, Fut>(
    members: &Members,
    retry_for: Duration,
    what: &str,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, EtcdError>>,
{
    let deadline = Instant::now() + retry_for;
    let mut pause = Duration::from_millis(5);
    loop {
        let (i, client) = members.pick();
        match attempt(client).await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, what, member = i, "etcd request failed; trying the next member");
                members.skip(i);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("etcd {what} failed: {e}")),
        }
    }
}

impl Store {
    pub(super) fn new(
        members: Arc<Members>,
        keys: Keys,
        epoch: i64,
        retry_for: Duration,
        fail_writes: Option<Arc<AtomicBool>>,
    ) -> Store {
        Store {
            members,
            keys,
            epoch,
            retry_for,
            fail_writes,
        }
    }

    /// `Txn If create_revision(owner) == epoch Then ops Else Get(owner)`, retried while it
    /// fails on the way. `Ok` holds the responses of `ops`, in order.
    pub(super) async fn fenced(
        &self,
        what: &str,
        ops: Vec<TxnOp>,
    ) -> Result<Vec<TxnOpResponse>, WriteError> {
        if self
            .fail_writes
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
        {
            return Err(WriteError::Failed(format!(
                "injected etcd write failure ({what}; EtcdLogOptions::fail_writes)"
            )));
        }
        let owner = self.keys.owner();
        let txn = Txn::new()
            .when([Compare::create_revision(
                owner.clone(),
                CompareOp::Equal,
                self.epoch,
            )])
            .and_then(ops)
            .or_else([TxnOp::get(owner, None)]);
        let resp: TxnResponse = retrying(&self.members, self.retry_for, what, |client| {
            let mut kv = client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(WriteError::Failed)?;
        if resp.succeeded() {
            return Ok(resp.op_responses());
        }
        let (current, owner) = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                Some(kv) => (
                    u64::try_from(kv.create_revision()).unwrap_or(0),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ),
                None => (0, "nobody (the owner key is gone)".into()),
            },
            _ => (0, "unknown (no answer to the owner read)".into()),
        };
        Err(WriteError::Fenced { current, owner })
    }

    /// A read-only transaction of `ops` (atomic and linearizable), retried.
    pub(super) async fn read_txn(&self, ops: Vec<TxnOp>) -> Result<Vec<TxnOpResponse>, String> {
        let txn = Txn::new().and_then(ops);
        let resp = retrying(&self.members, self.retry_for, "read", |client| {
            let mut kv = client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        Ok(resp.op_responses())
    }

    /// The value of `key`, if it exists (linearizable).
    pub(super) async fn get(&self, key: Vec<u8>) -> Result<Option<KeyValue>, String> {
        let resp = retrying(&self.members, self.retry_for, "read", |client| {
            let mut kv = client.kv_client();
            let key = key.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        Ok(resp.kvs().first().cloned())
    }

    /// Every key from `from` (inclusive) to `to` (exclusive), at most `limit` (`None`:
    /// all), read page by page at one revision (`at`, or that of the first page) so the
    /// pages make one consistent picture. Returns them in key order and the revision.
    pub(super) async fn range(
        &self,
        from: Vec<u8>,
        to: Vec<u8>,
        limit: Option<usize>,
        keys_only: bool,
        at: Option<i64>,
    ) -> Result<(Vec<KeyValue>, i64), String> {
        let mut out: Vec<KeyValue> = Vec::new();
        let mut start = from;
        let mut revision = at.unwrap_or(0);
        loop {
            let want = match limit {
                Some(l) => PAGE.min(i64::try_from(l - out.len()).unwrap_or(PAGE)),
                None => PAGE,
            };
            let mut opts = GetOptions::new().with_range(to.clone()).with_limit(want);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            if keys_only {
                opts = opts.with_keys_only();
            }
            let resp = retrying(&self.members, self.retry_for, "range read", |client| {
                let mut kv = client.kv_client();
                let (start, opts) = (start.clone(), opts.clone());
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.kvs();
            out.extend_from_slice(kvs);
            let done = limit.is_some_and(|l| out.len() >= l);
            match kvs.last() {
                Some(last) if more && !done => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    /// [`Store::range`] of every key starting with `prefix`.
    pub(super) async fn scan(
        &self,
        prefix: Vec<u8>,
        keys_only: bool,
        at: Option<i64>,
    ) -> Result<(Vec<KeyValue>, i64), String> {
        let end = prefix_end(&prefix);
        self.range(prefix, end, None, keys_only, at).await
    }
}
