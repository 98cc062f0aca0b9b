//! Local transactions begun ahead, a few at a time.
//!
//! Every [`crate::TwoPc::begin_local`] needs a transaction id from the coordinator, with
//! the coordinator's intent (which branch decides) durable before the branch commits. A
//! service committing thousands of local transactions a second would pay one Begin round
//! trip each. Instead the handle keeps, per resource, a small pool of ids begun ahead by
//! one BeginLocal (`BeginLocalRequest.count`), sized to the recent demand: about
//! [`LOOKAHEAD`] worth of the rate of the last [`WINDOW`], at most the handle's
//! `begin_ahead` setting. Each id is a transaction of its own at the coordinator (its
//! intent written and synced like any BeginLocal's), usable once the one Barrier asked
//! after that BeginLocal reports its epoch.
//!
//! Under light load (a batch of one) nothing is taken ahead: each `begin_local` makes its
//! own BeginLocal. When the pool holds less than one batch a refill runs in the background (one
//! at a time per resource), so that its BeginLocal and Barrier are answered before the pool
//! runs dry (refilling at half a batch, ids were taken before their Barrier answered and
//! ~3% of the benchmark's commits waited for it); a caller that finds the pool empty
//! begins its own id (a batch when no refill runs, else just one) rather than waiting for
//! someone else's.
//!
//! An id waits at most [`MAX_AGE`] in the pool (a quarter of its transaction timeout when
//! that is shorter, see [`max_age`]). Older ones, and those left when the handle
//! shuts down, go back with ReleaseUnused: the coordinator still asks the
//! branch (which never saw the id and answers aborted) and counts them apart
//! (`twopc_transactions_aborted_total{reason="unused"}`). An id is released only after it
//! left the pool, so no transaction ever uses an id that went back.
//!
//! This module holds the bookkeeping of the pools, pure (no lock, no clock: the time is
//! passed in); the local-commit core (`client::local::core`) owns the pools and decides
//! with them, and its driver makes the calls.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How far ahead a batch reaches, in time at the recent rate.
pub(crate) const LOOKAHEAD: Duration = Duration::from_millis(40);

/// The window over which the rate of local Begins is measured.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// The longest an id waits in the pool before it goes back unused.
pub(crate) const MAX_AGE: Duration = Duration::from_millis(250);

/// Default of [`crate::TwoPcBuilder::begin_ahead`]: at most this many ids per Begin.
pub const DEFAULT_BEGIN_AHEAD: u32 = 128;

/// The most a Begin may ask for (the coordinator's limit).
pub const MAX_BEGIN_AHEAD: u32 = 256;

/// One BeginLocal answer, as the ids it issued know it: their intents are durable once
/// the one `Barrier` asked after that answer reports their epoch. The local-commit core
/// keeps that Barrier's answer under this number while ids of the answer are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Ticket(pub(crate) u64);

/// One local transaction begun ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ahead {
    /// Its id.
    pub(crate) tx_id: String,
    /// The coordinator epoch of the BeginLocal answer.
    pub(crate) epoch: u64,
    /// The BeginLocal answer it came with: its intent is durable when the Barrier asked
    /// after that answer returns `epoch`.
    pub(crate) ticket: Ticket,
    /// When the BeginLocal answered.
    pub(crate) begun: Instant,
    /// How long it may wait in the pool: [`MAX_AGE`], or a quarter of its timeout when
    /// that is shorter ([`max_age`]).
    pub(crate) max_age: Duration,
}

/// How long an id with a transaction timeout of `timeout_ms` (0: unknown) may wait in the
/// pool: [`MAX_AGE`], or a quarter of its timeout when that is shorter, so the
/// application keeps most of the timeout for its own work.
pub(crate) fn max_age(timeout_ms: u64) -> Duration {
    match timeout_ms {
        0 => MAX_AGE,
        t => MAX_AGE.min(Duration::from_millis(t / 4)),
    }
}

/// How a caller gets its id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// One from the pool.
    Ready(Ahead),
    /// Begin this many now; the caller's id is the first, the rest go to the pool.
    Begin(u32),
}

/// What [`Pools::take`] decided besides the caller's id.
#[derive(Debug)]
pub(crate) struct Taken {
    /// The caller's id, or how many to begin.
    pub(crate) take: Take,
    /// Ids too old to hand out: release them.
    pub(crate) stale: Vec<Ahead>,
    /// Start a background refill of this many (the pool is marked refilling).
    pub(crate) refill: Option<u32>,
}

/// The pools of every resource of one handle.
#[derive(Default)]
pub(crate) struct Pools {
    by_resource: HashMap<String, Pool>,
}

#[derive(Default)]
struct Pool {
    ids: VecDeque<Ahead>,
    /// A BeginLocal of more than one id runs for this pool (a background refill, or a
    /// caller's batch): no second one starts meanwhile.
    refilling: bool,
    /// The coordinator did not begin a local transaction when asked (it runs with
    /// one-phase commits off): take nothing ahead for this resource.
    off: bool,
    /// The recent rate of Begins, which sizes a batch.
    demand: Demand,
}

/// The recent rate of local Begins of one resource.
#[derive(Default)]
struct Demand {
    /// Takes since `since`.
    takes: u32,
    /// Start of the current window.
    since: Option<Instant>,
    /// The rate measured over the last full window.
    per_s: f64,
}

impl Demand {
    fn note(&mut self, now: Instant) {
        self.takes += 1;
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= WINDOW {
            self.per_s = f64::from(self.takes) / elapsed.as_secs_f64();
            self.takes = 0;
            self.since = Some(now);
        }
    }

    /// Ids to begin at once: [`LOOKAHEAD`] at the measured rate, 1 to `max`.
    fn batch(&self, max: u32) -> u32 {
        let want = (self.per_s * LOOKAHEAD.as_secs_f64()).ceil();
        (want as u32).clamp(1, max.max(1))
    }
}

impl Pools {
    /// Takes an id for a local transaction of `resource` (batches of at most `max`).
    pub(crate) fn take(&mut self, resource: &str, max: u32, now: Instant) -> Taken {
        let pool = self.by_resource.entry(resource.to_string()).or_default();
        pool.demand.note(now);
        let mut stale = Vec::new();
        while let Some(a) = pool.ids.front() {
            if now.saturating_duration_since(a.begun) < a.max_age {
                break;
            }
            stale.extend(pool.ids.pop_front());
        }
        let batch = if pool.off || max <= 1 {
            1
        } else {
            pool.demand.batch(max)
        };
        let take = match pool.ids.pop_front() {
            Some(a) => Take::Ready(a),
            None if pool.refilling || batch == 1 => Take::Begin(1),
            None => {
                // The caller refills: mark it so no background refill starts meanwhile.
                pool.refilling = true;
                Take::Begin(batch)
            }
        };
        let low = pool.ids.len() < batch as usize;
        let refill = if batch > 1 && low && !pool.refilling {
            pool.refilling = true;
            Some(batch)
        } else {
            None
        };
        Taken {
            take,
            stale,
            refill,
        }
    }

    /// Adds ids begun ahead for `resource`.
    pub(crate) fn put(&mut self, resource: &str, ids: Vec<Ahead>) {
        self.by_resource
            .entry(resource.to_string())
            .or_default()
            .ids
            .extend(ids);
    }

    /// The refill of `resource`'s pool that [`Pools::take`] started ([`Taken::refill`], or
    /// a [`Take::Begin`] of more than one) has been answered, whatever the answer.
    pub(crate) fn end_refill(&mut self, resource: &str) {
        if let Some(pool) = self.by_resource.get_mut(resource) {
            pool.refilling = false;
        }
    }

    /// The coordinator begins no local transactions: stop taking ids ahead for
    /// `resource`.
    pub(crate) fn turn_off(&mut self, resource: &str) {
        self.by_resource
            .entry(resource.to_string())
            .or_default()
            .off = true;
    }

    /// How many ids wait in the pools.
    pub(crate) fn len(&self) -> usize {
        self.by_resource.values().map(|p| p.ids.len()).sum()
    }

    /// Every id still pooled (they leave the pools).
    pub(crate) fn drain(&mut self) -> Vec<Ahead> {
        self.by_resource
            .values_mut()
            .flat_map(|p| p.ids.drain(..))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize, begun: Instant) -> Vec<Ahead> {
        (0..n)
            .map(|i| Ahead {
                tx_id: format!("t{i}"),
                epoch: 1,
                ticket: Ticket(1),
                begun,
                max_age: MAX_AGE,
            })
            .collect()
    }

    fn begin_count(t: &Taken) -> Option<u32> {
        match t.take {
            Take::Begin(n) => Some(n),
            Take::Ready(_) => None,
        }
    }

    #[test]
    fn light_load_takes_nothing_ahead() {
        let mut p = Pools::default();
        let t0 = Instant::now();
        for i in 0..20u64 {
            // Ten a second: a batch of one, no refill.
            let t = p.take("db", 64, t0 + Duration::from_millis(100 * i));
            assert_eq!(begin_count(&t), Some(1));
            assert_eq!(t.refill, None);
        }
    }

    #[test]
    fn heavy_load_begins_batches_and_refills_one_at_a_time() {
        let mut p = Pools::default();
        let t0 = Instant::now();
        let max = DEFAULT_BEGIN_AHEAD;
        // 2,000 a second for one window: the rate is known from then on.
        let mut now = t0;
        for _ in 0..=200 {
            let t = p.take("db", max, now);
            // The caller began a batch (the rest goes to the pool), or a background
            // refill started: either is answered at once.
            let pooled = match (begin_count(&t), t.refill) {
                (Some(n), _) if n > 1 => n - 1,
                (_, Some(n)) => n,
                _ => 0,
            };
            if pooled > 0 {
                p.put("db", ids(pooled as usize, now));
                p.end_refill("db");
            }
            now += Duration::from_micros(500);
        }
        let mut t = p.take("db", max, now);
        // ~2,000/s × 40 ms = ~80 per batch; the pool holds the rest of the last one.
        assert!(
            matches!(t.take, Take::Ready(_)),
            "pooled ids are handed out"
        );
        // Drained below one batch, one background refill starts (while a batch's worth
        // is still pooled, so that its Begin and Barrier finish before the pool runs dry),
        // and no second; once the pool is empty (the refill still in flight), a caller
        // begins just its own id.
        let mut refills = 0;
        let mut emptied = false;
        for _ in 0..200 {
            if let Some(n) = t.refill {
                assert!((80..=81).contains(&n), "{n}");
                assert!(p.len() >= 70, "refill began with {} pooled", p.len());
                refills += 1;
            }
            if let Some(n) = begin_count(&t) {
                assert_eq!(
                    n, 1,
                    "a refill is in flight: the caller begins its own id only"
                );
                emptied = true;
                break;
            }
            t = p.take("db", max, now);
        }
        assert!(emptied, "the pool runs dry without its refill");
        assert_eq!(refills, 1, "one refill in flight per resource");
        // The cap holds.
        p.end_refill("db");
        let t = p.take("db", 8, now);
        assert!(t.refill.unwrap_or(8) <= 8 && begin_count(&t).unwrap_or(8) <= 8);
    }

    #[test]
    fn a_refill_ends_when_answered_and_its_ids_are_pooled() {
        let mut p = Pools::default();
        let t0 = Instant::now();
        // Under load: the caller finds the pool empty and begins a batch (refilling).
        for i in 0..800u64 {
            let t = p.take("db", 64, t0 + Duration::from_micros(250 * i));
            if let Take::Begin(n) = t.take {
                if n > 1 {
                    assert_eq!(t.refill, None, "the caller's batch is the refill");
                    let again = p.take("db", 64, t0 + Duration::from_micros(250 * i));
                    assert_eq!(
                        (begin_count(&again), again.refill),
                        (Some(1), None),
                        "while it runs, no second batch starts"
                    );
                    p.put("db", ids(n as usize - 1, t0));
                    p.end_refill("db");
                    assert_eq!(p.len(), n as usize - 1, "its ids are pooled");
                    return;
                }
            }
        }
        panic!("no batch was ever begun");
    }

    #[test]
    fn old_ids_go_back_and_are_never_handed_out() {
        let mut p = Pools::default();
        let t0 = Instant::now();
        p.put("db", ids(3, t0));
        let later = t0 + MAX_AGE;
        let t = p.take("db", 64, later);
        assert_eq!(t.stale.len(), 3, "every id of MAX_AGE goes back");
        assert_eq!(begin_count(&t), Some(1), "and the caller begins its own");
        assert!(p.drain().is_empty());
        p.put("db", ids(2, later));
        let t = p.take("db", 64, later + MAX_AGE / 2);
        assert!(t.stale.is_empty() && matches!(t.take, Take::Ready(_)));
        assert_eq!(p.drain().len(), 1, "shutdown releases what is left");
    }

    #[test]
    fn ids_wait_at_most_a_quarter_of_their_timeout() {
        assert_eq!(max_age(0), MAX_AGE, "unknown timeout");
        assert_eq!(max_age(60_000), MAX_AGE);
        assert_eq!(max_age(400), Duration::from_millis(100));
        let mut p = Pools::default();
        let t0 = Instant::now();
        let mut short = ids(1, t0);
        short[0].max_age = max_age(400);
        p.put("db", short);
        let t = p.take("db", 64, t0 + Duration::from_millis(100));
        assert_eq!(t.stale.len(), 1);
    }

    #[test]
    fn a_coordinator_without_local_begins_turns_the_pool_off() {
        let mut p = Pools::default();
        let t0 = Instant::now();
        for i in 0..400u64 {
            p.take("db", 64, t0 + Duration::from_micros(500 * i));
        }
        p.turn_off("db");
        let t = p.take("db", 64, t0 + Duration::from_millis(300));
        assert_eq!(begin_count(&t), Some(1));
        assert_eq!(t.refill, None);
        // Another resource is not affected.
        let other = p.take("mq", 64, t0);
        assert_eq!(begin_count(&other), Some(1));
    }
}
