//! The lease keeper: keeps the owner key's lease alive from a task on the log's runtime.
//!
//! It sends a keep-alive every third of the lease's time to live and waits (bounded) for
//! the answer. When the stream breaks (a member died, the leader changed) it opens a new
//! one at once, on the next member, retrying every 100 ms: a keep-alive missed for a whole time to live is a
//! lost shard. When etcd answers that the lease is gone (TTL 0), or no keep-alive has
//! been answered for a whole time to live, the shard may already be someone else's: the
//! keeper poisons the log (fail-stop), whose every later write fails. The fence on each
//! write would refuse them anyway once another owner exists; poisoning also stops a
//! node that merely lost its lease from writing when no one else has taken over yet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::store::{Members, ATTEMPT_TIMEOUT};
use super::Shared;

/// The running keeper; [`Keeper::stop_and_revoke`] ends it.
pub(super) struct Keeper {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    members: Arc<Members>,
    lease_id: i64,
}

impl Keeper {
    /// Starts keeping `lease_id` (time to live `ttl_s`) alive on `rt`.
    pub(super) fn start(
        rt: &tokio::runtime::Handle,
        members: Arc<Members>,
        lease_id: i64,
        ttl_s: i64,
        shared: Arc<Shared>,
    ) -> Keeper {
        let (stop, stopped) = oneshot::channel();
        let ttl = Duration::from_secs(u64::try_from(ttl_s).unwrap_or(1).max(1));
        let task = rt.spawn(keep_alive(members.clone(), lease_id, ttl, shared, stopped));
        Keeper {
            stop: Some(stop),
            task,
            members,
            lease_id,
        }
    }

    /// Stops the keeper and revokes the lease, which deletes the owner key (best effort,
    /// bounded: a lease that cannot be revoked expires on its own).
    pub(super) async fn stop_and_revoke(mut self) {
        drop(self.stop.take());
        let _ = self.task.await;
        let (_, client) = self.members.pick();
        let mut leases = client.lease_client();
        match tokio::time::timeout(ATTEMPT_TIMEOUT, leases.revoke(self.lease_id)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "revoking the owner key's lease failed; it expires on its own")
            }
            Err(_) => {
                tracing::warn!("revoking the owner key's lease timed out; it expires on its own")
            }
        }
    }
}

async fn keep_alive(
    members: Arc<Members>,
    lease_id: i64,
    ttl: Duration,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        if shared.failed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if last_ok.elapsed() >= ttl {
            shared.poison(format!(
                "the owner key's lease {lease_id:x} was not renewed for {} s (its time to live): the shard may belong to another coordinator now",
                ttl.as_secs()
            ));
            return;
        }
        let (member, client) = members.pick();
        let mut leases = client.lease_client();
        let opened = tokio::select! {
            _ = &mut stopped => return,
            r = tokio::time::timeout(every, leases.keep_alive(lease_id)) => r,
        };
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, member, "opening the lease keep-alive stream failed; trying the next member");
                members.skip(member);
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            Err(_) => {
                members.skip(member);
                continue;
            }
        };
        // One stream until it breaks.
        loop {
            if keeper.keep_alive().await.is_err() {
                break;
            }
            let answer = tokio::select! {
                _ = &mut stopped => return,
                r = tokio::time::timeout(every, stream.message()) => r,
            };
            match answer {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = Instant::now(),
                Ok(Ok(Some(_))) => {
                    shared.poison(format!(
                        "etcd says the owner key's lease {lease_id:x} has expired: the shard may belong to another coordinator now"
                    ));
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    tracing::warn!(
                        lease = lease_id,
                        member,
                        "the lease keep-alive stream broke; opening a new one"
                    );
                    members.skip(member);
                    break;
                }
            }
            if last_ok.elapsed() >= ttl {
                break;
            }
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(every.saturating_sub(last_ok.elapsed().min(every))) => {}
            }
        }
    }
}
