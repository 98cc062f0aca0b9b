//! The conformance suite of the [`Resource`] contract (the "# Contract" of
//! `participant-sdk/src/resource.rs`): one generic check per clause, which every adapter
//! runs against its real service (`tests/conformance.rs` stamps them for PostgreSQL,
//! PostgreSQL with the outbox, RabbitMQ and NATS JetStream).
//!
//! # How a check works
//!
//! Each check starts a fresh [`World`]: an in-process coordinator (it only hands out
//! transaction ids and takes enlistments: no check asks it to commit or abort, and its
//! transaction timeout is far beyond a check's bound), an SDK handle, and the adapter's
//! [`Fixture`] — uniquely named durable state (a database, a queue, a stream, a staging
//! directory) with a resource on it, registered with the SDK. The check opens branches
//! through the SDK the way an application does ([`Fixture::write`]), then calls the
//! resource's [`Resource`] methods itself, in the orders, repetitions and races the
//! participant server and recovery can produce, and looks at what a reader of the
//! service sees ([`Fixture::effects`]: rows in the database, messages in the queue or
//! stream). A "restart" ([`World::restart`]) shuts the SDK down, drops the resource and
//! makes a fresh one over the same durable state ([`Fixture::restart`]).
//!
//! # What it checks (one test per check and adapter)
//!
//! | check | clause of the contract |
//! |-------|------------------------|
//! | [`commit_after_a_yes_vote_is_visible_exactly_once`] | a yes vote is in doubt and invisible; commit (twice at once, then again) makes the write visible exactly once; a late prepare or abort changes nothing |
//! | [`abort_after_a_yes_vote_leaves_no_effect`] | abort answers `Aborted` (again when repeated); nothing visible, nothing in doubt; a late commit does not make the write appear, a late prepare does not vote yes |
//! | [`abort_of_an_open_branch_leaves_no_effect`] | the same for a branch that never voted; a late one-phase commit does not commit it |
//! | [`prepare_repeated_gives_the_same_vote`] | a prepare repeated (also racing itself) answers the same yes and stages once; an unknown branch votes no, every time |
//! | [`an_unknown_branch_is_presumed_aborted`] | abort of an unknown branch is `Aborted`; commit of one is `Ok` (after a yes vote that means "already committed") |
//! | [`one_phase_commit_is_visible_once_and_remembered`] | `commit_one_phase` (twice at once, then again) is `Committed` with the write once; an abort after it answers `AlreadyCommitted` and undoes nothing |
//! | [`one_phase_commit_is_not_undone_after_a_restart`] | an abort on a fresh resource never undoes a one-phase commit, and answers `AlreadyCommitted` where the adapter promises to remember it ([`Promises::one_phase_survives_restart`]) |
//! | [`a_branch_without_work_votes_as_promised`] | a branch that wrote nothing votes [`Promises::empty_branch`], every time, and is never in doubt |
//! | [`a_prepared_branch_commits_once_after_a_restart`] | a yes vote survives a restart: listed by `in_doubt`, voted yes again, committed there exactly once; an unprepared branch does not survive (votes no) |
//! | [`a_prepared_branch_aborts_after_a_restart`] | a yes vote survives a restart and is aborted there: no effect, nothing in doubt |
//!
//! "Late" calls are ones a correct coordinator does not send (a commit after an abort);
//! their answer is not checked where the contract leaves it open, only that they change
//! nothing.
//!
//! # Where adapters differ
//!
//! Two answers differ between adapters, both choices the contract leaves open (what an
//! empty branch votes; whether a one-phase commit is remembered durably); each fixture
//! states them in [`Fixture::PROMISES`] (see [`Promises`]), citing the adapter module's
//! docs. Everything else is checked the same way for every adapter, and what must hold
//! whatever the answer (no write undone, repeated or made visible late) is checked for
//! all of them.
//!
//! # Plugging in an adapter
//!
//! Write a small type that implements [`Fixture`] (make unique durable state in
//! `start`, register the resource with the SDK, write one row / message per branch,
//! count what a reader sees, open a fresh resource in `restart`, remove what outlives
//! the test process in `clean_up`) and add one line to `tests/conformance.rs`:
//!
//! ```ignore
//! conformance_tests!(kafka, KafkaFixture);
//! ```
//!
//! which stamps one `#[tokio::test]` per check into a module `kafka`.

use std::sync::Arc;
use std::time::Duration;

use twopc_coordinator::config::ServeConfig;
use twopc_participant::{AbortOutcome, OnePhase, Resource, Transaction, TwoPc, Vote};

use super::{bounded, eventually, sdk_of, Coordinator, Wait};

/// Bound of one check, start and clean-up included.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write may take to become visible after its commit returned (for an adapter
/// whose reader lags behind, e.g. a broker's delivery), polled every 20 ms.
pub const VISIBLE: Wait = Wait {
    limit: Duration::from_secs(10),
    every: Duration::from_millis(20),
};

/// One branch: a resource's part of one transaction.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Branch {
    /// The transaction id.
    pub tx_id: String,
    /// The branch id (`<service>:<resource>`).
    pub branch_id: String,
}

impl Branch {
    /// The branch `resource` has (or would have) in `tx`.
    pub fn of(tx: &Transaction, resource: &dyn Resource) -> Branch {
        Branch {
            tx_id: tx.id().to_string(),
            branch_id: tx.branch_id(resource),
        }
    }

    /// As [`Resource::in_doubt`] lists it.
    fn key(&self) -> (String, String) {
        (self.tx_id.clone(), self.branch_id.clone())
    }
}

/// What a branch that wrote nothing votes at prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyBranch {
    /// [`Vote::ReadOnly`]: finished at prepare, no part in phase two (PostgreSQL: no
    /// transaction id was assigned).
    ReadOnly,
    /// [`Vote::No`]: the adapter cannot tell an empty branch from one whose work was lost
    /// (brokers: a branch enlisted without a message; `broker.rs`, "Known limits").
    VotesNo,
}

/// What an adapter promises where the contract leaves it a choice. Each field names the
/// adapter documentation it comes from in the fixture that sets it.
#[derive(Clone, Copy, Debug)]
pub struct Promises {
    /// What a branch that wrote nothing votes.
    pub empty_branch: EmptyBranch,
    /// Whether a one-phase commit is remembered across a restart (durably), so that an
    /// abort on a fresh resource answers `AlreadyCommitted` and a repeated one-phase commit
    /// `Committed`. When `false`, the fresh resource cannot tell (the documented hazard of
    /// one-phase commit); an abort must still undo nothing.
    pub one_phase_survives_restart: bool,
}

/// One adapter under test: its durable state, a resource over it, and a reader's view.
#[tonic::async_trait]
pub trait Fixture: Send + Sync + Sized + 'static {
    /// What the adapter promises where the contract leaves it a choice.
    const PROMISES: Promises;

    /// Makes fresh, uniquely named durable state and a resource over it, registered with
    /// `sdk`.
    async fn start(sdk: &TwoPc) -> Self;

    /// The resource under test (after [`Fixture::restart`], the fresh one).
    fn resource(&self) -> Arc<dyn Resource>;

    /// Opens the resource's branch of `tx` and makes one write in it (a row, a message),
    /// identified by the branch, not committed.
    async fn write(&self, tx: &Transaction) -> Branch;

    /// Opens the resource's branch of `tx` without writing anything (a read, or just the
    /// enlistment).
    async fn open_without_work(&self, tx: &Transaction) -> Branch;

    /// How many times a reader of the service sees the write of `branch` now (committed
    /// rows, delivered messages; a duplicate counts twice). Each call sees at least what
    /// the earlier ones saw (a consumed message stays counted).
    async fn effects(&self, branch: &Branch) -> usize;

    /// Drops the resource and makes a fresh one over the same durable state, as a
    /// restarted process would (not registered with any SDK). The caller has shut down
    /// the SDK it was registered with and holds no handle on it or on its transactions.
    async fn restart(&mut self);

    /// Removes what outlives the test process (queues, streams).
    async fn clean_up(&self);
}

/// The coordinator, the SDK handle and the adapter's fixture of one check.
pub struct World<F: Fixture> {
    /// The adapter under test.
    pub fixture: F,
    /// The handle the fixture's resource is registered with, and transactions are begun
    /// on; `None` after [`World::restart`] shut it down.
    sdk: Option<TwoPc>,
    /// Hands out transaction ids and takes enlistments; never asked to decide.
    coordinator: Coordinator,
}

impl<F: Fixture> World<F> {
    /// A coordinator, an SDK handle of service "conf" on it (recovery only when asked) and
    /// the adapter's fixture.
    pub async fn start() -> World<F> {
        let coordinator = Coordinator::start(ServeConfig::default()).await;
        let sdk = sdk_of(&coordinator, "conf", None).await;
        let fixture = F::start(&sdk).await;
        World {
            fixture,
            sdk: Some(sdk),
            coordinator,
        }
    }

    /// Starts a world and writes one branch in a new transaction: the world, the resource
    /// under test, the transaction and its branch.
    pub async fn with_a_write() -> (World<F>, Arc<dyn Resource>, Transaction, Branch) {
        let w = World::<F>::start().await;
        let r = w.resource();
        let tx = w.begin().await;
        let b = w.fixture.write(&tx).await;
        (w, r, tx, b)
    }

    /// Writes one branch in a new transaction and has `first` answer what it must for
    /// it (e.g. prepare), before a restart: the branch (its transaction and resource
    /// handle are dropped, as a restart needs).
    pub async fn written_then<T, Fut>(
        &self,
        first: impl FnOnce(Arc<dyn Resource>, Branch) -> Fut,
    ) -> Branch
    where
        Fut: std::future::Future<Output = T>,
    {
        let r = self.resource();
        let tx = self.begin().await;
        let b = self.fixture.write(&tx).await;
        first(r, b.clone()).await;
        b
    }

    /// Begins a transaction (before a restart only).
    pub async fn begin(&self) -> Transaction {
        self.sdk
            .as_ref()
            .expect("transactions are begun before the restart")
            .begin()
            .await
            .expect("begin a transaction")
    }

    /// The resource under test.
    pub fn resource(&self) -> Arc<dyn Resource> {
        self.fixture.resource()
    }

    /// How many times the write of `b` is visible now.
    pub async fn effects(&self, b: &Branch) -> usize {
        self.fixture.effects(b).await
    }

    /// Checks that the write of `b` is visible `times` times (else fails with
    /// `wrong_count`) and that `r` holds nothing in doubt (else fails with `in_doubt`).
    pub async fn settled(
        &self,
        r: &dyn Resource,
        b: &Branch,
        times: usize,
        wrong_count: &str,
        left_in_doubt: &str,
    ) {
        assert_eq!(self.effects(b).await, times, "{wrong_count}");
        let held = in_doubt(r).await;
        assert!(held.is_empty(), "{left_in_doubt}: {held:?}");
    }

    /// Waits until the write of `b` is visible, then checks that it is visible once.
    pub async fn visible_once(&self, b: &Branch, when: &str) {
        eventually(VISIBLE, &format!("the write is visible {when}"), || async {
            self.effects(b).await >= 1
        })
        .await;
        assert_eq!(
            self.effects(b).await,
            1,
            "the write must be visible exactly once {when}"
        );
    }

    /// "Restarts the process": shuts the SDK down (dropping its hold on the resource), then
    /// has the fixture make a fresh resource over the same durable state. Every
    /// transaction and resource handle of the check must be dropped before.
    pub async fn restart(&mut self) {
        if let Some(sdk) = self.sdk.take() {
            sdk.shutdown().await;
        }
        self.fixture.restart().await;
    }

    /// Cleans up the fixture, shuts the SDK down and stops the coordinator.
    pub async fn finish(self) {
        self.fixture.clean_up().await;
        if let Some(sdk) = &self.sdk {
            sdk.shutdown().await;
        }
        self.coordinator.stop().await;
    }
}

/// Aborts `b` once per entry of `calls` (naming the call), each answering `want`.
async fn aborts_as(r: &dyn Resource, b: &Branch, want: AbortOutcome, calls: &[&str]) {
    for call in calls {
        assert_eq!(abort(r, b).await, Ok(want), "{call}");
    }
}

/// Checks that `r` holds nothing in doubt; else fails naming `what` was found in doubt.
async fn nothing_in_doubt(r: &dyn Resource, what: &str) {
    let held = in_doubt(r).await;
    assert!(held.is_empty(), "{what} is in doubt: {held:?}");
}

/// The branches `r` reports in doubt, sorted.
async fn in_doubt(r: &dyn Resource) -> Vec<(String, String)> {
    let mut list = r.in_doubt().await.expect("in_doubt");
    list.sort();
    list
}

async fn prepare(r: &dyn Resource, b: &Branch) -> Vote {
    r.prepare(&b.tx_id, &b.branch_id).await
}

async fn commit(r: &dyn Resource, b: &Branch) -> Result<(), twopc_participant::Retry> {
    r.commit(&b.tx_id, &b.branch_id).await
}

async fn abort(r: &dyn Resource, b: &Branch) -> Result<AbortOutcome, twopc_participant::Retry> {
    r.abort(&b.tx_id, &b.branch_id).await
}

async fn one_phase(r: &dyn Resource, b: &Branch) -> Result<OnePhase, twopc_participant::Retry> {
    r.commit_one_phase(&b.tx_id, &b.branch_id).await
}

/// Prepare → yes: in doubt, invisible. Commit, twice at once and then again: visible
/// exactly once, no longer in doubt. A late prepare or abort after the commit changes
/// nothing (and answers as before where the adapter remembers the commit).
pub async fn commit_after_a_yes_vote_is_visible_exactly_once<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let (w, r, tx, b) = World::<F>::with_a_write().await;
        assert_eq!(w.effects(&b).await, 0, "an open branch's write is visible");
        assert_eq!(prepare(&*r, &b).await, Vote::Yes, "prepare of a write");
        assert_eq!(
            in_doubt(&*r).await,
            vec![b.key()],
            "a branch that voted yes is in doubt"
        );
        assert_eq!(
            w.effects(&b).await,
            0,
            "a prepared branch's write is visible"
        );

        let (first, racing) = tokio::join!(commit(&*r, &b), commit(&*r, &b));
        first.expect("commit after a yes vote");
        racing.expect("a commit racing the first one");
        w.visible_once(&b, "after the commit").await;
        commit(&*r, &b).await.expect("a repeated commit is Ok");
        w.settled(
            &*r,
            &b,
            1,
            "a repeated commit applied the write again",
            "a committed branch is still in doubt",
        )
        .await;

        let late_prepare = prepare(&*r, &b).await;
        let late_abort = abort(&*r, &b).await.expect("an abort after the commit");
        // A branch committed in two phases is remembered: a late call gets the answer
        // its first one would have.
        assert_eq!(late_prepare, Vote::Yes, "a prepare after the commit");
        assert_eq!(
            late_abort,
            AbortOutcome::AlreadyCommitted,
            "an abort after the commit"
        );
        w.settled(
            &*r,
            &b,
            1,
            "a late prepare / abort undid or repeated the committed write",
            "a late prepare put the committed branch in doubt again",
        )
        .await;
        drop((r, tx));
        w.finish().await;
    })
    .await;
}

/// Prepare → yes, abort → `Aborted`, again `Aborted`: nothing visible, nothing in doubt.
/// A late commit does not make the write appear; a late prepare does not vote yes.
pub async fn abort_after_a_yes_vote_leaves_no_effect<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let (w, r, tx, b) = World::<F>::with_a_write().await;
        assert_eq!(prepare(&*r, &b).await, Vote::Yes, "prepare of a write");
        let calls = ["abort", "a repeated abort"];
        aborts_as(&*r, &b, AbortOutcome::Aborted, &calls).await;
        nothing_in_doubt(&*r, "an aborted branch").await;
        assert_eq!(
            w.effects(&b).await,
            0,
            "an aborted branch's write is visible"
        );

        // Whatever a late commit answers, the write must not appear.
        let _ = commit(&*r, &b).await;
        let late = prepare(&*r, &b).await;
        assert!(
            matches!(late, Vote::No(_)),
            "a prepare after the abort must vote no (nothing is held any more), got {late:?}"
        );
        let calls = ["an abort after the late calls"];
        aborts_as(&*r, &b, AbortOutcome::Aborted, &calls).await;
        w.settled(
            &*r,
            &b,
            0,
            "a late commit / prepare after the abort made the write visible",
            "a late call put the aborted branch in doubt",
        )
        .await;
        drop((r, tx));
        w.finish().await;
    })
    .await;
}

/// Abort of a branch that never voted → `Aborted`, again `Aborted`; a late prepare votes
/// no, a late one-phase commit does not commit; nothing visible, nothing in doubt.
pub async fn abort_of_an_open_branch_leaves_no_effect<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let (w, r, tx, b) = World::<F>::with_a_write().await;
        let calls = ["abort", "a repeated abort"];
        aborts_as(&*r, &b, AbortOutcome::Aborted, &calls).await;
        let late = prepare(&*r, &b).await;
        assert!(
            matches!(late, Vote::No(_)),
            "a prepare after the abort must vote no, got {late:?}"
        );
        let late = one_phase(&*r, &b).await;
        assert!(
            !matches!(late, Ok(OnePhase::Committed)),
            "a one-phase commit after the abort must not commit"
        );
        w.settled(
            &*r,
            &b,
            0,
            "an aborted branch's write is visible",
            "an aborted branch is in doubt",
        )
        .await;
        drop((r, tx));
        w.finish().await;
    })
    .await;
}

/// A prepare repeated, also racing itself, answers the same yes, and the branch is in
/// doubt once. A branch this resource never opened votes no, and no again.
pub async fn prepare_repeated_gives_the_same_vote<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let (w, r, tx, b) = World::<F>::with_a_write().await;
        let (first, racing) = tokio::join!(prepare(&*r, &b), prepare(&*r, &b));
        assert_eq!(first, Vote::Yes, "prepare of a write");
        assert_eq!(racing, Vote::Yes, "a prepare racing the first one");
        assert_eq!(prepare(&*r, &b).await, Vote::Yes, "a repeated prepare");
        assert_eq!(
            in_doubt(&*r).await,
            vec![b.key()],
            "a branch prepared repeatedly is in doubt once"
        );

        let other = w.begin().await;
        let unknown = Branch::of(&other, &*r);
        let no = prepare(&*r, &unknown).await;
        assert!(
            matches!(no, Vote::No(_)),
            "a branch never opened here must vote no, got {no:?}"
        );
        assert_eq!(
            prepare(&*r, &unknown).await,
            no,
            "a repeated prepare of an unknown branch"
        );

        aborts_as(&*r, &b, AbortOutcome::Aborted, &["abort"]).await;
        assert_eq!(
            w.effects(&b).await,
            0,
            "an aborted branch's write is visible"
        );
        drop((r, tx, other));
        w.finish().await;
    })
    .await;
}

/// Presumed abort: an abort of a branch this resource never held is `Aborted` (also when
/// repeated); a commit of one is `Ok` (after a yes vote, "no such branch" means it was
/// committed already). Neither leaves an effect or anything in doubt.
pub async fn an_unknown_branch_is_presumed_aborted<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let w = World::<F>::start().await;
        let r = w.resource();
        let (tx1, tx2) = (w.begin().await, w.begin().await);
        let aborted = Branch::of(&tx1, &*r);
        let calls = [
            "abort of an unknown branch",
            "a repeated abort of an unknown branch",
        ];
        aborts_as(&*r, &aborted, AbortOutcome::Aborted, &calls).await;
        let committed = Branch::of(&tx2, &*r);
        commit(&*r, &committed)
            .await
            .expect("commit of a branch this resource does not hold means already committed");
        commit(&*r, &committed)
            .await
            .expect("and so does a repeated one");
        assert_eq!(w.effects(&aborted).await, 0);
        assert_eq!(w.effects(&committed).await, 0);
        nothing_in_doubt(&*r, "an unknown branch").await;
        drop((r, tx1, tx2));
        w.finish().await;
    })
    .await;
}

/// A one-phase commit (twice at once, then again) is `Committed` with the write visible
/// once; an abort after it answers `AlreadyCommitted`, also when repeated, and undoes
/// nothing (the contract: remembered until `outcome_known`).
pub async fn one_phase_commit_is_visible_once_and_remembered<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let (w, r, tx, b) = World::<F>::with_a_write().await;
        let (first, racing) = tokio::join!(one_phase(&*r, &b), one_phase(&*r, &b));
        assert_eq!(first, Ok(OnePhase::Committed), "one-phase commit");
        assert_eq!(
            racing,
            Ok(OnePhase::Committed),
            "a one-phase commit racing the first one"
        );
        w.visible_once(&b, "after the one-phase commit").await;
        assert_eq!(
            one_phase(&*r, &b).await,
            Ok(OnePhase::Committed),
            "a repeated one-phase commit"
        );
        let after = "an abort after a one-phase commit (a restarted coordinator settles it so)";
        aborts_as(&*r, &b, AbortOutcome::AlreadyCommitted, &[after, after]).await;
        assert_eq!(
            one_phase(&*r, &b).await,
            Ok(OnePhase::Committed),
            "a one-phase commit after the aborts"
        );
        w.settled(
            &*r,
            &b,
            1,
            "the repeats or the aborts changed the write",
            "a one-phase commit is in doubt",
        )
        .await;
        drop((r, tx));
        w.finish().await;
    })
    .await;
}

/// After a one-phase commit and a restart, an abort on the fresh resource undoes
/// nothing; where the adapter remembers one-phase commits durably it answers
/// `AlreadyCommitted` (every time) and a repeated one-phase commit `Committed`.
pub async fn one_phase_commit_is_not_undone_after_a_restart<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let mut w = World::<F>::start().await;
        let b = w
            .written_then(|r, b| async move {
                let answer = one_phase(&*r, &b).await;
                assert_eq!(answer, Ok(OnePhase::Committed), "one-phase commit");
            })
            .await;
        w.visible_once(&b, "after the one-phase commit").await;
        w.restart().await;
        let r = w.resource();
        let answer = abort(&*r, &b).await.expect("an abort after the restart");
        if F::PROMISES.one_phase_survives_restart {
            assert_eq!(
                answer,
                AbortOutcome::AlreadyCommitted,
                "an abort after the restart"
            );
            let calls = ["a repeated abort after the restart"];
            aborts_as(&*r, &b, AbortOutcome::AlreadyCommitted, &calls).await;
            assert_eq!(
                one_phase(&*r, &b).await,
                Ok(OnePhase::Committed),
                "a repeated one-phase commit after the restart"
            );
        }
        w.settled(
            &*r,
            &b,
            1,
            "an abort after the restart changed the one-phase commit's write",
            "a one-phase commit is in doubt after the restart",
        )
        .await;
        drop(r);
        w.finish().await;
    })
    .await;
}

/// A branch that wrote nothing votes as the adapter promises ([`Promises::empty_branch`]),
/// the same when asked again, is never in doubt, and aborts as `Aborted`.
pub async fn a_branch_without_work_votes_as_promised<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let w = World::<F>::start().await;
        let r = w.resource();
        let tx = w.begin().await;
        let b = w.fixture.open_without_work(&tx).await;
        let vote = prepare(&*r, &b).await;
        match F::PROMISES.empty_branch {
            EmptyBranch::ReadOnly => assert_eq!(vote, Vote::ReadOnly, "prepare of no work"),
            EmptyBranch::VotesNo => assert!(
                matches!(vote, Vote::No(_)),
                "prepare of no work must vote no, got {vote:?}"
            ),
        }
        assert_eq!(
            prepare(&*r, &b).await,
            vote,
            "a repeated prepare of no work"
        );
        nothing_in_doubt(&*r, "a branch without work").await;
        let calls = ["abort of a branch without work"];
        aborts_as(&*r, &b, AbortOutcome::Aborted, &calls).await;
        assert_eq!(w.effects(&b).await, 0);
        drop((r, tx));
        w.finish().await;
    })
    .await;
}

/// A yes vote survives a restart: the fresh resource lists the branch in doubt, votes yes
/// again, and commits it exactly once (also when the commit is repeated). A branch that
/// was written but not prepared does not survive: it votes no and is never visible.
pub async fn a_prepared_branch_commits_once_after_a_restart<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let mut w = World::<F>::start().await;
        let (prepared, unprepared) = {
            let r = w.resource();
            let (tx1, tx2) = (w.begin().await, w.begin().await);
            let prepared = w.fixture.write(&tx1).await;
            assert_eq!(prepare(&*r, &prepared).await, Vote::Yes, "prepare");
            let unprepared = w.fixture.write(&tx2).await;
            (prepared, unprepared)
        };
        w.restart().await;
        let r = w.resource();
        assert_eq!(
            in_doubt(&*r).await,
            vec![prepared.key()],
            "a fresh resource lists the prepared branch (and only it) in doubt"
        );
        assert_eq!(
            prepare(&*r, &prepared).await,
            Vote::Yes,
            "a repeated prepare after the restart"
        );
        assert_eq!(
            w.effects(&prepared).await,
            0,
            "a prepared branch is visible after the restart"
        );
        commit(&*r, &prepared)
            .await
            .expect("commit after the restart");
        w.visible_once(&prepared, "after the commit on the fresh resource")
            .await;
        commit(&*r, &prepared)
            .await
            .expect("a repeated commit after the restart");
        assert_eq!(
            w.effects(&prepared).await,
            1,
            "a repeated commit applied the write again"
        );
        nothing_in_doubt(&*r, "a committed branch").await;

        let lost = prepare(&*r, &unprepared).await;
        assert!(
            matches!(lost, Vote::No(_)),
            "a branch not prepared before the restart lost its work and must vote no, got {lost:?}"
        );
        assert_eq!(w.effects(&unprepared).await, 0);
        drop(r);
        w.finish().await;
    })
    .await;
}

/// A yes vote survives a restart and is aborted there: `Aborted` (again when repeated),
/// nothing visible, nothing in doubt; a late commit does not make it appear.
pub async fn a_prepared_branch_aborts_after_a_restart<F: Fixture>() {
    bounded(CHECK_TIMEOUT, async {
        let mut w = World::<F>::start().await;
        let b = w
            .written_then(|r, b| async move {
                assert_eq!(prepare(&*r, &b).await, Vote::Yes, "prepare");
            })
            .await;
        w.restart().await;
        let r = w.resource();
        assert_eq!(
            in_doubt(&*r).await,
            vec![b.key()],
            "a fresh resource lists the prepared branch in doubt"
        );
        let calls = [
            "abort after the restart",
            "a repeated abort after the restart",
        ];
        aborts_as(&*r, &b, AbortOutcome::Aborted, &calls).await;
        nothing_in_doubt(&*r, "an aborted branch").await;
        let _ = commit(&*r, &b).await;
        assert_eq!(
            w.effects(&b).await,
            0,
            "an aborted branch's write is visible"
        );
        drop(r);
        w.finish().await;
    })
    .await;
}

/// Stamps one `#[tokio::test]` per check of this suite into a module `$adapter`, for the
/// [`Fixture`] type `$fixture` (named as seen from the invoking module).
#[macro_export]
macro_rules! conformance_tests {
    ($adapter:ident, $fixture:ty) => {
        conformance_tests!(@each $adapter, $fixture, [
            commit_after_a_yes_vote_is_visible_exactly_once,
            abort_after_a_yes_vote_leaves_no_effect,
            abort_of_an_open_branch_leaves_no_effect,
            prepare_repeated_gives_the_same_vote,
            an_unknown_branch_is_presumed_aborted,
            one_phase_commit_is_visible_once_and_remembered,
            one_phase_commit_is_not_undone_after_a_restart,
            a_branch_without_work_votes_as_promised,
            a_prepared_branch_commits_once_after_a_restart,
            a_prepared_branch_aborts_after_a_restart,
        ]);
    };
    (@each $adapter:ident, $fixture:ty, [$($test:ident),* $(,)?]) => {
        mod $adapter {
            #[allow(unused_imports)]
            use super::*;
            use $crate::support::conformance as suite;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    suite::$test::<$fixture>().await;
                }
            )*
        }
    };
}
