//! Identifiers and plain data shared by the engine, the decision log and the service.
//!
//! Nothing here does I/O. [`TxId`] is the one place that knows the transaction-id format,
//! so the engine (which issues ids), the log (which keys records by them) and the gRPC
//! layer (which parses them from untrusted input) cannot disagree about it.

use std::fmt;
use std::str::FromStr;

/// Longest accepted transaction id, in bytes. Keeps PostgreSQL gids (< 200 bytes) safe.
pub const MAX_TX_ID_LEN: usize = 64;
/// Longest accepted branch id, in bytes.
pub const MAX_BRANCH_ID_LEN: usize = 64;
/// Longest accepted participant endpoint, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 256;

/// A transaction id: `<node>-<epoch>-<seq>`, e.g. `5f3a09c1-7-42`.
///
/// * `node` is chosen at random when a data directory is created, so two coordinators
///   never hand out the same id to branches that share a database.
/// * `epoch` grows by one on every start of the coordinator on that data directory; a
///   late message carrying an id of an older epoch can never be mistaken for a newer
///   transaction, and an old-epoch id without a decision record is presumed aborted.
/// * `seq` counts transactions within the epoch, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId {
    /// Identifies the coordinator's data directory.
    pub node: u32,
    /// The coordinator start that issued the id.
    pub epoch: u64,
    /// Position within the epoch, from 1.
    pub seq: u64,
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}-{}-{}", self.node, self.epoch, self.seq)
    }
}

/// Why a string is not a transaction id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxIdError {
    /// Empty input.
    #[error("transaction id is empty")]
    Empty,
    /// Longer than [`MAX_TX_ID_LEN`].
    #[error("transaction id is {0} bytes long; at most {MAX_TX_ID_LEN} are allowed")]
    TooLong(usize),
    /// Not `<8 hex digits>-<epoch>-<seq>`.
    #[error("transaction id {0:?} is malformed: expected <8 hex digits>-<epoch>-<sequence>, as returned by Begin")]
    Malformed(String),
}

impl FromStr for TxId {
    type Err = TxIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TxIdError::Empty);
        }
        if s.len() > MAX_TX_ID_LEN {
            return Err(TxIdError::TooLong(s.len()));
        }
        let malformed = || TxIdError::Malformed(s.to_string());
        let mut parts = s.split('-');
        let (Some(node), Some(epoch), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if node.len() != 8 || !node.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        if !digits(epoch) || !digits(seq) {
            return Err(malformed());
        }
        let tx = TxId {
            node: u32::from_str_radix(node, 16).map_err(|_| malformed())?,
            epoch: epoch.parse().map_err(|_| malformed())?,
            seq: seq.parse().map_err(|_| malformed())?,
        };
        // Only the canonical spelling is accepted, so one transaction has one id string.
        if tx.to_string() != s {
            return Err(malformed());
        }
        Ok(tx)
    }
}

/// What kind of resource a branch wraps (mirrors `twopc.v1.BranchKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BranchKind {
    /// A database transaction.
    Database,
    /// A batch of broker messages.
    Broker,
    /// Anything else.
    #[default]
    Other,
}

impl BranchKind {
    /// Stable numeric code, used by the decision log's encoding and the wire enum.
    pub fn code(self) -> i32 {
        match self {
            BranchKind::Database => 1,
            BranchKind::Broker => 2,
            BranchKind::Other => 3,
        }
    }

    /// The commit tier the SDK gives this kind by default: databases (0) before other
    /// resources (5) before brokers (10), so a consumer that sees an event finds its row.
    pub fn default_commit_order(self) -> u32 {
        match self {
            BranchKind::Database => 0,
            BranchKind::Other => 5,
            BranchKind::Broker => 10,
        }
    }

    /// Inverse of [`BranchKind::code`]; unknown codes (including 0) map to `Other`.
    pub fn from_code(code: i32) -> Self {
        match code {
            1 => BranchKind::Database,
            2 => BranchKind::Broker,
            _ => BranchKind::Other,
        }
    }
}

/// A branch as enlisted: everything the coordinator needs to drive it after a crash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BranchSpec {
    /// Unique within the transaction.
    pub branch_id: String,
    /// gRPC endpoint of the participant holding the branch.
    pub endpoint: String,
    /// Phase-two tier: lower tiers are committed before higher ones.
    pub commit_order: u32,
    /// For operators.
    pub kind: BranchKind,
}

/// Longest accepted resolution reason, in bytes (the same bound as an abort reason).
pub const MAX_RESOLVE_REASON_LEN: usize = 1024;
/// Longest accepted operator name of a resolution, in bytes.
pub const MAX_OPERATOR_LEN: usize = 128;

/// What an operator decides for a stuck transaction (mirrors `twopc.v1.ResolveDecision`):
/// the branches the coordinator is still waiting for are to be treated as committed or as
/// aborted. See the engine's resolution semantics ([`crate::engine`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeuristicDecision {
    /// The branches are (to be treated as) committed.
    Commit,
    /// The branches are (to be treated as) aborted.
    Abort,
}

impl HeuristicDecision {
    /// Upper-case name for messages and records.
    pub fn name(self) -> &'static str {
        match self {
            HeuristicDecision::Commit => "COMMIT",
            HeuristicDecision::Abort => "ABORT",
        }
    }

    /// Stable numeric code, used by the decision log's encoding and the wire enum.
    pub fn code(self) -> i32 {
        match self {
            HeuristicDecision::Commit => 1,
            HeuristicDecision::Abort => 2,
        }
    }

    /// Inverse of [`HeuristicDecision::code`]; `None` for any other code (including 0).
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(HeuristicDecision::Commit),
            2 => Some(HeuristicDecision::Abort),
            _ => None,
        }
    }
}

/// Why the reason of a resolution is not acceptable: required, at most
/// [`MAX_RESOLVE_REASON_LEN`] bytes.
pub fn validate_resolve_reason(reason: &str) -> Result<(), String> {
    if reason.trim().is_empty() {
        return Err("reason is required: say why the transaction is resolved by hand".into());
    }
    check_len("reason", reason, MAX_RESOLVE_REASON_LEN)?;
    Ok(())
}

/// Why the operator name of a resolution is not acceptable: required, at most
/// [`MAX_OPERATOR_LEN`] bytes, no control characters.
pub fn validate_operator(operator: &str) -> Result<(), String> {
    if operator.trim().is_empty() {
        return Err("operator is required: say who resolves the transaction".into());
    }
    check_len("operator", operator, MAX_OPERATOR_LEN)?;
    if operator.chars().any(char::is_control) {
        return Err(format!(
            "operator {operator:?} contains a control character"
        ));
    }
    Ok(())
}

/// `value` of `field` must be at most `max` bytes long.
fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes long; at most {max} are allowed",
            value.len()
        ));
    }
    Ok(())
}

/// Why a branch id is not acceptable.
pub fn validate_branch_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("branch_id is empty".into());
    }
    check_len("branch_id", id, MAX_BRANCH_ID_LEN)?;
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "branch_id {id:?} contains {c:?}; only A-Z a-z 0-9 . _ : - are allowed"
        ));
    }
    Ok(())
}

/// Why a participant endpoint is not acceptable: it must be `http(s)://host:port[/]`.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.is_empty() {
        return Err("participant_endpoint is empty".into());
    }
    check_len("participant_endpoint", endpoint, MAX_ENDPOINT_LEN)?;
    let bad = |why: &str| {
        Err(format!(
            "participant_endpoint {endpoint:?} is malformed: {why}"
        ))
    };
    let uri: http::Uri = match endpoint.parse() {
        Ok(u) => u,
        Err(e) => return bad(&e.to_string()),
    };
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return bad("the scheme must be http or https"),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => {}
        _ => return bad("a host is required"),
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
    if authority.contains('@') {
        return bad("credentials are not allowed in an endpoint");
    }
    match authority.rsplit_once(':') {
        Some((_, port)) if !port.is_empty() => {
            let canonical = port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0');
            if !canonical || !matches!(port.parse::<u32>(), Ok(1..=65535)) {
                return bad("the port must be a number from 1 to 65535");
            }
        }
        _ => return bad("a port is required"),
    }
    if uri.path() != "/" && !uri.path().is_empty()
        || uri.query().is_some()
        || endpoint.contains('#')
    {
        return bad("no path, query or fragment is allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_id_round_trips() {
        let tx = TxId {
            node: 0x5f3a09c1,
            epoch: 7,
            seq: 42,
        };
        assert_eq!(tx.to_string(), "5f3a09c1-7-42");
        assert_eq!("5f3a09c1-7-42".parse::<TxId>(), Ok(tx));
    }

    #[test]
    fn tx_id_rejects_non_canonical_and_garbage() {
        for bad in [
            "",
            "x",
            "5f3a09c1-7",
            "5f3a09c1-7-42-1",
            "5f3a09c-7-42",
            "5f3a09c1-07-42",
            "5f3a09c1--42",
            "5f3a09c1-7-+4",
            "5F3A09C1-7-42",
            "5f3a09c1-99999999999999999999-1",
        ] {
            assert!(bad.parse::<TxId>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("a".repeat(65).parse::<TxId>(), Err(TxIdError::TooLong(65)));
    }

    #[test]
    fn resolution_fields_are_checked() {
        assert!(validate_resolve_reason("participant gone for good").is_ok());
        assert!(validate_resolve_reason(" ").is_err());
        assert!(validate_resolve_reason(&"r".repeat(1024)).is_ok());
        assert!(validate_resolve_reason(&"r".repeat(1025)).is_err());
        assert!(validate_operator("alice@ops").is_ok());
        assert!(validate_operator("").is_err());
        assert!(validate_operator("a\nb").is_err());
        assert!(validate_operator(&"o".repeat(129)).is_err());
        for d in [HeuristicDecision::Commit, HeuristicDecision::Abort] {
            assert_eq!(HeuristicDecision::from_code(d.code()), Some(d));
        }
        assert_eq!(HeuristicDecision::from_code(0), None);
    }

    #[test]
    fn branch_ids_and_endpoints_are_checked() {
        let too_long = "a".repeat(65);
        for (id, ok) in [
            ("db-1:orders_v2.x", true),
            ("", false),
            ("a b", false),
            (too_long.as_str(), false),
        ] {
            assert_eq!(validate_branch_id(id).is_ok(), ok, "{id:?}");
        }
        assert!(validate_endpoint("http://127.0.0.1:7001").is_ok());
        assert!(validate_endpoint("https://svc.local:443/").is_ok());
        for bad in [
            "",
            "127.0.0.1:7001",
            "ftp://h:1",
            "http://h",
            "http://:80",
            "http://h:1/x",
            "not a uri",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
