//! Consumer-side deduplication by message id.
//!
//! twopc publishes every message of a committed transaction with a deterministic id
//! (`<tx_id>:<branch_id>:<index>`), and phase two may publish it more than once (a retry after a lost
//! confirm, a participant restart). Brokers deduplicate only within a window (NATS
//! JetStream's `duplicate_window`; RabbitMQ not at all), so a consumer that must apply
//! each event once records the ids it has processed **in the same database transaction
//! as the effects**: either both commit or neither does.
//!
//! Table (created by [`ensure_table`]):
//!
//! ```sql
//! CREATE TABLE twopc_processed_messages (
//!     consumer     text        NOT NULL,  -- who processed it (one row per consumer)
//!     message_id   text        NOT NULL,
//!     processed_at timestamptz NOT NULL DEFAULT now(),
//!     PRIMARY KEY (consumer, message_id)
//! );
//! ```
//!
//! ## The pattern
//! 1. `BEGIN` a transaction in the consumer's database.
//! 2. [`first_time`]`(&tx, consumer, message_id)`: `true` the first time; `false` if this
//!    consumer has processed the id before (or another delivery of it is being processed
//!    concurrently and commits first: the insert waits for that transaction).
//! 3. Only if `true`: apply the effects in the same transaction.
//! 4. `COMMIT`.
//! 5. Only then acknowledge the delivery. A crash before the ack means a redelivery,
//!    which step 2 turns into a no-op (then ack it).
//!
//! RabbitMQ (lapin): the id is the `message_id` property.
//!
//! ```ignore
//! let id = delivery.properties.message_id().as_ref().map(|s| s.as_str().to_string())
//!     .ok_or("message without message_id")?;
//! let mut conn = pool.get().await?;
//! let tx = conn.transaction().await?;
//! if twopc_participant::dedup::first_time(&tx, "billing", &id).await? {
//!     tx.execute("INSERT INTO invoices (order_id) VALUES ($1)", &[&order_id]).await?;
//! }
//! tx.commit().await?;
//! delivery.ack(lapin::options::BasicAckOptions::default()).await?;
//! ```
//!
//! NATS JetStream (async-nats): the id is the `Nats-Msg-Id` header.
//!
//! ```ignore
//! let id = message.headers.as_ref()
//!     .and_then(|h| h.get("Nats-Msg-Id"))
//!     .map(|v| v.as_str().to_string())
//!     .ok_or("message without Nats-Msg-Id")?;
//! let mut conn = pool.get().await?;
//! let tx = conn.transaction().await?;
//! if twopc_participant::dedup::first_time(&tx, "billing", &id).await? {
//!     tx.execute("INSERT INTO invoices (order_id) VALUES ($1)", &[&order_id]).await?;
//! }
//! tx.commit().await?;
//! message.ack().await?;
//! ```
//!
//! A consumer that is itself a twopc participant (its effects are a branch of another
//! transaction) uses [`first_time_in_branch`] on its [`PgBranch`] instead.
//!
//! The table grows by one row per message and consumer; [`forget_older_than`] deletes
//! rows older than any redelivery can be (keep well beyond the broker's retention).

use std::time::Duration;

use crate::error::Result;
use crate::postgres::PgBranch;

/// The table the processed ids are kept in.
pub const TABLE: &str = "twopc_processed_messages";

const INSERT: &str =
    "INSERT INTO twopc_processed_messages (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// Creates the table if it does not exist (idempotent; safe to run at every start,
/// also by several processes at once).
pub async fn ensure_table(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let res = client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS twopc_processed_messages (\
                 consumer text NOT NULL, \
                 message_id text NOT NULL, \
                 processed_at timestamptz NOT NULL DEFAULT now(), \
                 PRIMARY KEY (consumer, message_id))",
        )
        .await;
    match res {
        // Two sessions racing on CREATE TABLE IF NOT EXISTS: one of them gets a
        // duplicate error for the type or table the other one just created.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
                || e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Records that `consumer` processes `message_id`, in the caller's transaction `tx`.
/// `true` the first time (apply the effects, then commit, then ack); `false` when it was
/// processed before (skip the effects, ack). Rolling `tx` back forgets the record too.
pub async fn first_time(
    tx: &tokio_postgres::Transaction<'_>,
    consumer: &str,
    message_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(tx.execute(INSERT, &[&consumer, &message_id]).await? == 1)
}

/// [`first_time`] inside a twopc PostgreSQL branch (the record commits or aborts with
/// the distributed transaction).
pub async fn first_time_in_branch(
    branch: &PgBranch,
    consumer: &str,
    message_id: &str,
) -> Result<bool> {
    Ok(branch.execute(INSERT, &[&consumer, &message_id]).await? == 1)
}

/// Deletes records older than `age`; returns how many. Run it now and then, with an age
/// well beyond the longest time a message can be redelivered.
pub async fn forget_older_than(
    client: &tokio_postgres::Client,
    age: Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM twopc_processed_messages WHERE processed_at < now() - make_interval(secs => $1)",
            &[&age.as_secs_f64()],
        )
        .await
}
