//! Reports of local commits: batches, one at a time after a failure, the backoff.

use super::*;

#[test]
fn reports_queued_while_one_runs_go_together_in_the_next() {
    let mut r = Rig::new(128);
    let c = r.committed("t1");
    let (first, ids) = report_call(&c);
    assert_eq!(ids, vec!["t1"]);
    assert!(r.committed("t2").is_empty(), "one report call in flight");
    assert!(r.committed("t3").is_empty());
    let c = r.reported(first, ReportAnswer::Recorded(7));
    let reports = report_calls(&c);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1, vec!["t2", "t3"]);
    // The recorded commit waits for a Barrier of its epoch.
    let (barrier, _) = barrier_call(&c);
    assert_eq!(
        r.barrier(barrier, Ok(7)),
        vec![Command::Forget(vec![entry("t1", 7)])]
    );
}

#[test]
fn a_report_carries_at_most_1024_commits() {
    let mut r = Rig::new(128);
    let (mut call, _) = report_call(&r.committed("first"));
    for i in 0..2_500 {
        assert!(r.committed(&format!("t{i}")).is_empty());
    }
    let mut sizes = Vec::new();
    loop {
        let c = r.reported(call, ReportAnswer::Recorded(7));
        match report_calls(&c).as_slice() {
            [(next, ids)] => {
                sizes.push(ids.len());
                call = *next;
            }
            [] => break,
            more => panic!("one batch call at a time: {more:?}"),
        }
    }
    assert_eq!(
        sizes,
        vec![REPORT_BATCH, REPORT_BATCH, 2_500 - 2 * REPORT_BATCH]
    );
    assert_eq!(r.core.reports_pending(), 0);
}

#[test]
fn a_failed_batch_is_reported_one_commit_at_a_time() {
    let mut r = Rig::new(128);
    let (first, _) = report_call(&r.committed("t1"));
    r.committed("t2");
    r.committed("t3");
    let c = r.reported(first, ReportAnswer::Recorded(7));
    let (batch, _) = report_call(&c);
    r.committed("t4");
    // Refused or unreachable alike: a failed batch goes one by one.
    for retryable in [true, false] {
        let mut r2 = Rig::new(128);
        let (b, _) = report_call(&r2.committed("a"));
        r2.committed("b");
        r2.committed("c");
        let c = r2.reported(b, ReportAnswer::Recorded(7));
        let (batch2, _) = report_call(&c);
        let alone: Vec<Vec<String>> = report_calls(&r2.reported(batch2, failed_report(retryable)))
            .into_iter()
            .map(|(_, ids)| ids)
            .collect();
        assert_eq!(alone, vec![vec!["b".to_string()], vec!["c".to_string()]]);
    }
    let c = r.reported(batch, failed_report(true));
    let ids: Vec<Vec<String>> = report_calls(&c).into_iter().map(|(_, ids)| ids).collect();
    assert_eq!(
        ids,
        vec![
            vec!["t2".to_string()],
            vec!["t3".to_string()],
            vec!["t4".to_string()]
        ],
        "each alone, then what was queued meanwhile"
    );
}

#[test]
fn a_report_alone_is_tried_20_times_with_backoff_from_100_ms_to_2_s() {
    let mut r = Rig::new(128);
    let (mut call, _) = report_call(&r.committed("t1"));
    let mut waits = Vec::new();
    let mut attempts = 1;
    loop {
        let c = r.reported(call, failed_report(true));
        assert!(report_calls(&c).is_empty(), "not before its backoff");
        let Some(at) = r.core.deadline() else { break };
        waits.push(at - r.now);
        // Just before: nothing; at the deadline: the next attempt.
        let before = at - r.t0 - ms(1);
        assert!(r.at(before).step(Event::Tick).is_empty());
        let c = r.at(at - r.t0).step(Event::Tick);
        let (next, ids) = report_call(&c);
        assert_eq!(ids, vec!["t1"]);
        attempts += 1;
        call = next;
    }
    assert_eq!(attempts, REPORT_ATTEMPTS);
    let mut expected = vec![ms(100), ms(200), ms(400), ms(800), ms(1_600)];
    expected.resize(REPORT_ATTEMPTS as usize - 1, BARRIER_RETRY_MAX);
    assert_eq!(waits, expected);
    assert_eq!(
        r.core.reports_pending(),
        0,
        "given up after the last attempt"
    );
}

#[test]
fn a_refused_report_alone_is_not_tried_again() {
    let mut r = Rig::new(128);
    let (call, _) = report_call(&r.committed("t1"));
    assert!(r.reported(call, failed_report(false)).is_empty());
    assert_eq!(r.core.deadline(), None);
    assert_eq!(r.core.reports_pending(), 0);
}

#[test]
fn a_report_that_got_through_on_a_later_attempt_is_forgotten_after_a_barrier() {
    let mut r = Rig::new(128);
    let (call, _) = report_call(&r.committed("t1"));
    r.reported(call, failed_report(true));
    let c = r.at(BARRIER_RETRY_MIN).step(Event::Tick);
    let (again, _) = report_call(&c);
    let c = r.reported(again, ReportAnswer::Recorded(9));
    let (barrier, _) = barrier_call(&c);
    assert_eq!(
        r.barrier(barrier, Ok(9)),
        vec![Command::Forget(vec![entry("t1", 9)])]
    );
}
