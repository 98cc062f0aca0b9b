//! The faults a campaign cycle can inject ([`FaultKind`]), each with what it does to
//! which process, and the list a campaign draws from when `--faults` names none.

/// The faults a cycle can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum FaultKind {
    /// No fault (a control cycle).
    None,
    /// SIGKILL the coordinator during the load; restart it afterwards.
    KillCoordinator,
    /// SIGKILL the coordinator during the load, then start it and SIGKILL it at a random
    /// moment of its start, one to four times (its decision log opening, recovering);
    /// restart it afterwards.
    KillCoordinatorAtStart,
    /// SIGSTOP the coordinator past its timeouts, then SIGCONT.
    PauseCoordinator,
    /// Blackhole coordinator → participant.
    DropRequests,
    /// Blackhole participant → coordinator (replies lost).
    DropReplies,
    /// Delay both directions.
    Delay,
    /// Reset the coordinator ↔ participant connections.
    Reset,
    /// SIGKILL PostgreSQL during the load; restart it afterwards.
    KillPostgres,
    /// Cut the participant off the broker.
    CutBroker,
    /// Restart the participant (new SDK handle, same port and data directory).
    RestartParticipant,
    /// Restart the coordinator armed to abort itself (SIGABRT, nothing cleaned up) right
    /// after it deleted its first batch of finished decision records, while the load
    /// runs; restart it afterwards.
    KillCoordinatorInCollection,
    /// Blackhole the participant's replies during the load and restart it while they are
    /// lost: the coordinator asks the restarted participant again (for a one-phase commit
    /// that happened, the `twopc_one_phase` marker must answer "committed").
    RestartParticipantMidLoad,
    /// After the load, stop the participant, start a real `twopc-lab order-service` process
    /// of the same service (data directory, database, broker, port) and SIGKILL it at a
    /// random moment of its start (its staging store opening, its recovery), one to four
    /// times; then the participant starts again.
    KillOrderServiceAtStart,
}

pub(super) const ALL_FAULTS: [FaultKind; 14] = [
    FaultKind::None,
    FaultKind::KillCoordinator,
    FaultKind::KillCoordinatorAtStart,
    FaultKind::KillCoordinatorInCollection,
    FaultKind::PauseCoordinator,
    FaultKind::DropRequests,
    FaultKind::DropReplies,
    FaultKind::Delay,
    FaultKind::Reset,
    FaultKind::KillPostgres,
    FaultKind::CutBroker,
    FaultKind::RestartParticipant,
    FaultKind::RestartParticipantMidLoad,
    FaultKind::KillOrderServiceAtStart,
];
