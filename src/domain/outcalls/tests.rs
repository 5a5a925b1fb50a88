//! The S1 rules, row by row: registration, the external decision table, the ordered internal
//! reversal, signals and completion.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::domain::ids::{BusinessType, CoordinatorId, Gsn, RequestId};
use crate::domain::orchestration::Policy;
use crate::domain::retry;

const NOW: Millis = 5_000_000;

static BUILTIN_RETRY: std::sync::LazyLock<retry::Config> =
    std::sync::LazyLock::new(retry::Config::builtin);

fn env(now: Millis) -> Env<'static> {
    Env {
        now,
        policy: Policy::default(),
        retry: &BUILTIN_RETRY,
        jitter: 0.0,
    }
}

fn saga() -> Saga {
    Saga {
        gsn: Gsn::new(CoordinatorId::parse("c1").unwrap(), 9),
        business_type: BusinessType::parse("transfer").unwrap(),
        mode: SagaMode::RegisteredOutcalls,
        payload: Vec::new(),
        content_type: String::new(),
        labels: BTreeMap::new(),
        deadline_ms: None,
        state: SagaState::Running,
        created_ms: NOW,
        updated_ms: NOW,
        request_id: RequestId::parse("r").unwrap(),
        strategy_version: 0,
        branches: Vec::new(),
        reported: BTreeSet::new(),
        fired_rules: BTreeSet::new(),
        signal: None,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: None,
        reversal_target: String::new(),
    }
}

fn outcall(order: u32, callee: &str) -> Outcall {
    Outcall {
        caller_node_id: "orders".into(),
        callee_node_id: callee.into(),
        forward_action: format!("do-{callee}"),
        reversal_action: format!("undo-{callee}"),
        order,
    }
}

fn report(outcome: Outcome) -> Report {
    Report {
        outcome,
        status: None,
        error_code: String::new(),
        message: String::new(),
        attempt: None,
    }
}

/// Three outcalls registered; their outcomes as given.
fn three(outcomes: [Outcome; 3]) -> Saga {
    let mut s = saga();
    for (i, callee) in ["a", "b", "c"].iter().enumerate() {
        let order = i as u32 + 1;
        s = on_outcall_registered(s, outcall(order, callee), NOW)
            .unwrap()
            .saga;
        s = on_outcall_reported(
            s,
            &branch_id(order, callee),
            report(outcomes[i]),
            false,
            env(NOW),
        )
        .unwrap()
        .saga;
    }
    s
}

fn reverses(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reverse { branch_id, .. } => Some(branch_id.as_str()),
            _ => None,
        })
        .collect()
}

fn queries(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::QueryStatus { branch_id } => Some(branch_id.as_str()),
            _ => None,
        })
        .collect()
}

fn signals(effects: &[Effect]) -> BTreeSet<(String, Signal)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Signal {
                node_id, signal, ..
            } => Some((node_id.clone(), *signal)),
            _ => None,
        })
        .collect()
}

fn external(branch: &str, serial: &str) -> ReversalAsked {
    ReversalAsked {
        reversal_type: ReversalType::External,
        branch_id: branch.into(),
        serial: serial.into(),
        reason: String::new(),
    }
}

fn internal() -> ReversalAsked {
    ReversalAsked {
        reversal_type: ReversalType::Internal,
        branch_id: String::new(),
        serial: "rev-1".into(),
        reason: "outcall 3 failed".into(),
    }
}

#[test]
fn the_callee_is_read_back_from_the_branch_id() {
    assert_eq!(branch_id(2, "payments"), "2.payments");
    assert_eq!(callee_of("2.payments"), Some("payments"));
    assert_eq!(callee_of("2.pay.ments"), Some("pay.ments"));
    assert_eq!(callee_of("x.payments"), None);
    assert_eq!(callee_of("payments"), None);
}

#[test]
fn an_order_is_registered_once_and_only_while_running() {
    let s = on_outcall_registered(saga(), outcall(1, "a"), NOW)
        .unwrap()
        .saga;
    let taken = on_outcall_registered(s.clone(), outcall(1, "b"), NOW).unwrap_err();
    assert_eq!(
        taken,
        Refusal::OrderTaken {
            order: 1,
            branch_id: "1.a".into()
        }
    );
    let mut reversing = s;
    reversing.state = SagaState::Reversing;
    assert!(matches!(
        on_outcall_registered(reversing, outcall(2, "b"), NOW),
        Err(Refusal::NotRunning { .. })
    ));
}

#[test]
fn external_reversal_of_a_failed_original_does_nothing_and_signals_success() {
    let s = three([Outcome::Failed, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    assert!(reverses(&t.effects).is_empty());
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(t.saga.signal, Some(Signal::ReversalSuccess));
    assert!(
        signals(&t.effects).contains(&("orders".into(), Signal::ReversalSuccess)),
        "the caller is told too"
    );
}

#[test]
fn a_reversal_asked_again_of_an_ended_saga_under_a_known_serial_leaves_its_last_change_alone() {
    let s = three([Outcome::Failed, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(t.saga.updated_ms, NOW);
    // The same serial, asked again a day later (under a new request id): nothing changes, so
    // the saga's retention still counts from its end.
    let again =
        on_reversal_requested(t.saga, external("1.a", "x-1"), env(NOW + 86_400_000)).unwrap();
    assert_eq!(again.saga.updated_ms, NOW);
    assert!(again.effects.is_empty());
    // A new serial is recorded on it, which is a change.
    let other =
        on_reversal_requested(again.saga, external("1.a", "x-2"), env(NOW + 86_400_001)).unwrap();
    assert_eq!(other.saga.updated_ms, NOW + 86_400_001);
    assert_eq!(other.saga.reversal_serials, ["x-1", "x-2"]);
}

#[test]
fn external_reversal_of_a_succeeded_original_sends_reverse_and_signals_success_once_it_is_done() {
    let s = three([Outcome::Succeeded, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    assert_eq!(reverses(&t.effects), ["1.a"]);
    assert!(signals(&t.effects).is_empty());
    let t = on_outcall_reversal_answered(t.saga, "1.a", report(Outcome::Succeeded), env(NOW));
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(t.saga.signal, Some(Signal::ReversalSuccess));
}

#[test]
fn external_reversal_whose_local_reversal_fails_signals_reprocess_and_retries() {
    let s = three([Outcome::Succeeded, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    let mut failure = report(Outcome::Failed);
    failure.error_code = "UNAVAILABLE".into();
    let t = on_outcall_reversal_answered(t.saga, "1.a", failure, env(NOW));
    assert_eq!(t.saga.signal, Some(Signal::Reprocess));
    assert!(
        signals(&t.effects)
            .iter()
            .all(|(_, s)| *s == Signal::Reprocess)
    );
    assert!(t.effects.iter().any(|e| matches!(
        e,
        Effect::WakeAt {
            timer: Timer::RetryReversal { .. },
            ..
        }
    )));
    let t = on_outcall_timer(
        t.saga,
        &Timer::RetryReversal {
            branch_id: "1.a".into(),
        },
        env(NOW + 2_000),
    );
    assert_eq!(reverses(&t.effects), ["1.a"]);
    let t =
        on_outcall_reversal_answered(t.saga, "1.a", report(Outcome::Succeeded), env(NOW + 2_100));
    assert_eq!(t.saga.signal, Some(Signal::ReversalSuccess));
    assert_eq!(t.saga.state, SagaState::Reversed);
}

#[test]
fn external_reversal_of_an_original_that_never_happened_records_a_tombstone_and_signals_failure() {
    let mut s = saga();
    s = on_outcall_registered(s, outcall(1, "a"), NOW).unwrap().saga;
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    assert_eq!(
        queries(&t.effects),
        ["1.a"],
        "the ledger does not know: ask the node"
    );
    let t = on_outcall_reported(
        t.saga,
        "1.a",
        report(Outcome::NotFound),
        true,
        env(NOW + 10),
    )
    .unwrap();
    assert_eq!(
        t.saga.branch("1.a").unwrap().state,
        BranchState::NotOccurred
    );
    assert_eq!(t.saga.signal, Some(Signal::ReversalFailure));
    assert!(signals(&t.effects).contains(&("a".into(), Signal::ReversalFailure)));
}

#[test]
fn external_reversal_of_an_unknown_original_keeps_asking_until_the_node_knows() {
    let mut s = saga();
    s = on_outcall_registered(s, outcall(1, "a"), NOW).unwrap().saga;
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    let t = on_outcall_reported(
        t.saga,
        "1.a",
        report(Outcome::Processing),
        true,
        env(NOW + 10),
    )
    .unwrap();
    assert!(t.effects.is_empty());
    assert_eq!(t.saga.state, SagaState::Reversing);
    let t = on_outcall_timer(
        t.saga,
        &Timer::Poll {
            branch_id: "1.a".into(),
        },
        env(NOW + 1_000),
    );
    assert_eq!(queries(&t.effects), ["1.a"], "asked again");
    let t = on_outcall_reported(
        t.saga,
        "1.a",
        report(Outcome::Succeeded),
        true,
        env(NOW + 1_010),
    )
    .unwrap();
    assert_eq!(reverses(&t.effects), ["1.a"], "it happened: undo it");
}

#[test]
fn the_same_reversal_asked_again_or_under_another_serial_changes_nothing_but_the_serials() {
    let s = three([Outcome::Succeeded, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    let t = on_reversal_requested(t.saga, external("1.a", "x-2"), env(NOW)).unwrap();
    assert!(
        t.effects.is_empty(),
        "the reversal under way answers the second request too"
    );
    assert_eq!(t.saga.reversal_serials, ["x-1", "x-2"]);
    let t = on_reversal_requested(t.saga, external("1.a", "x-1"), env(NOW)).unwrap();
    assert_eq!(t.saga.reversal_serials.len(), 2);
}

#[test]
fn internal_reversal_undoes_the_succeeded_outcalls_in_reverse_order_and_settles_the_failed_one() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Failed]);
    let t = on_reversal_requested(s, internal(), env(NOW)).unwrap();
    assert_eq!(
        reverses(&t.effects),
        ["3.c"],
        "the failed one first: reversed or proven never to have happened"
    );
    let t = on_outcall_reversal_answered(t.saga, "3.c", report(Outcome::NotFound), env(NOW));
    assert_eq!(reverses(&t.effects), ["2.b"]);
    let t = on_outcall_reversal_answered(t.saga, "2.b", report(Outcome::Succeeded), env(NOW));
    assert_eq!(reverses(&t.effects), ["1.a"]);
    let t = on_outcall_reversal_answered(t.saga, "1.a", report(Outcome::Succeeded), env(NOW));
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(
        signals(&t.effects),
        BTreeSet::from([
            ("a".into(), Signal::ReversalSuccess),
            ("b".into(), Signal::ReversalSuccess),
            ("c".into(), Signal::ReversalSuccess),
            ("orders".into(), Signal::ReversalSuccess),
        ])
    );
}

#[test]
fn internal_reversal_of_an_unknown_outcall_that_did_happen_undoes_it() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Unknown]);
    let t = on_reversal_requested(s, internal(), env(NOW)).unwrap();
    assert_eq!(reverses(&t.effects), ["3.c"]);
    let t = on_outcall_reversal_answered(t.saga, "3.c", report(Outcome::Succeeded), env(NOW));
    assert_eq!(t.saga.branch("3.c").unwrap().state, BranchState::Reversed);
    assert_eq!(reverses(&t.effects), ["2.b"]);
}

#[test]
fn completing_needs_every_outcall_succeeded_and_tells_every_node() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Unknown]);
    let err = on_completed(s.clone(), NOW).unwrap_err();
    assert_eq!(
        err,
        Refusal::NotAllSucceeded {
            branches: vec!["3.c".into()]
        }
    );
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let t = on_completed(s, NOW).unwrap();
    assert_eq!(t.saga.state, SagaState::Completed);
    assert_eq!(signals(&t.effects).len(), 4);
    assert!(
        on_completed(t.saga.clone(), NOW)
            .unwrap()
            .effects
            .is_empty(),
        "completing twice is harmless"
    );
    assert_eq!(
        on_reversal_requested(t.saga, internal(), env(NOW)).unwrap_err(),
        Refusal::Completed
    );
}

#[test]
fn a_caller_reporting_unknown_makes_sagad_ask_the_callee() {
    let s = on_outcall_registered(saga(), outcall(1, "a"), NOW)
        .unwrap()
        .saga;
    let t = on_outcall_reported(s, "1.a", report(Outcome::Unknown), false, env(NOW)).unwrap();
    assert_eq!(queries(&t.effects), ["1.a"]);
    assert_eq!(t.saga.branch("1.a").unwrap().state, BranchState::Unknown);
}

#[test]
fn a_deadline_reverses_a_running_outcall_saga_internally() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let t = on_outcall_timer(s, &Timer::Deadline, env(NOW));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&t.effects), ["3.c"]);
}

#[test]
fn an_operator_reprocess_gives_failed_reversals_a_fresh_budget() {
    let s = three([Outcome::Succeeded, Outcome::Failed, Outcome::Failed]);
    let t = on_reversal_requested(s, external("1.a", "x"), env(NOW)).unwrap();
    let mut refused = report(Outcome::Failed);
    refused.error_code = "LOCKED".into();
    let t = on_outcall_reversal_answered(t.saga, "1.a", refused, env(NOW));
    assert_eq!(t.saga.state, SagaState::NeedsAttention);
    let t = on_reprocess(t.saga, NOW).unwrap();
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&t.effects), ["1.a"]);
    let t = on_outcall_reversal_answered(t.saga, "1.a", report(Outcome::Succeeded), env(NOW));
    assert_eq!(t.saga.state, SagaState::Reversed);
}

#[test]
fn an_outcall_saga_with_a_deadline_arms_it_at_start_and_one_without_arms_nothing() {
    let mut with = saga();
    with.deadline_ms = Some(NOW + 500);
    let started = on_outcall_saga_started(with);
    assert!(matches!(
        started.effects.as_slice(),
        [Effect::WakeAt { at_ms, timer: Timer::Deadline }] if *at_ms == NOW + 500
    ));
    assert!(on_outcall_saga_started(saga()).effects.is_empty());
}

#[test]
fn an_outcall_reported_succeeded_after_an_external_reversal_skipped_it_is_reversed_then() {
    // 1.a was reported FAILED, so the external reversal ended without undoing it...
    let s = three([Outcome::Failed, Outcome::Failed, Outcome::Failed]);
    let ended = on_reversal_requested(s, external("1.a", "x-1"), env(NOW)).unwrap();
    assert_eq!(ended.saga.state, SagaState::Reversed);
    // ...then its callee says it took effect after all: it must be undone, not kept.
    let t = on_outcall_reported(
        ended.saga,
        "1.a",
        report(Outcome::Succeeded),
        false,
        env(NOW + 1),
    )
    .unwrap();
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&t.effects), ["1.a"]);
    let t = on_outcall_reversal_answered(t.saga, "1.a", report(Outcome::Succeeded), env(NOW + 2));
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(t.saga.signal, Some(Signal::ReversalSuccess));
    assert_eq!(
        t.saga.branch("1.a").map(|b| b.state),
        Some(BranchState::Reversed)
    );
}

/// A caller whose call timed out reports FAILED after the callee reported SUCCEEDED: the
/// charge is booked all the same, so an external reversal must undo it, not pass over it.
#[test]
fn a_failed_report_after_a_succeeded_one_keeps_the_outcall_succeeded_and_an_external_reversal_undoes_it()
 {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let t = on_outcall_reported(s, "2.b", report(Outcome::Failed), false, env(NOW + 1)).unwrap();
    let branch = t.saga.branch("2.b").unwrap();
    assert_eq!(branch.state, BranchState::Succeeded);
    assert!(
        branch
            .timeline
            .iter()
            .any(|e| e.what.contains("late report FAILED ignored")),
        "{:?}",
        branch.timeline
    );
    let t = on_reversal_requested(t.saga, external("2.b", "x-1"), env(NOW + 2)).unwrap();
    assert_eq!(reverses(&t.effects), ["3.c"]);
    let t = on_outcall_reversal_answered(t.saga, "3.c", report(Outcome::Succeeded), env(NOW + 3));
    assert_eq!(
        reverses(&t.effects),
        ["2.b"],
        "the booked outcall is undone"
    );
}

/// The same with NOT_FOUND: an outcall that SUCCEEDED is not exempt from a reversal because a
/// later answer found no trace of it; its node's Reverse says whether there is anything to undo.
#[test]
fn a_not_found_report_after_a_succeeded_one_does_not_exempt_the_outcall_from_reversal() {
    for outcome in [Outcome::NotFound, Outcome::Unknown, Outcome::Processing] {
        let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
        let t = on_outcall_reported(s, "3.c", report(outcome), false, env(NOW + 1)).unwrap();
        assert_eq!(
            t.saga.branch("3.c").map(|b| b.state),
            Some(BranchState::Succeeded),
            "{outcome:?}"
        );
        assert!(t.effects.is_empty(), "{outcome:?}: {:?}", t.effects);
        let t = on_reversal_requested(t.saga, internal(), env(NOW + 2)).unwrap();
        assert_eq!(reverses(&t.effects), ["3.c"], "{outcome:?}");
    }
}

/// A node that undid a SUCCEEDED outcall of a running saga may still say so.
#[test]
fn a_reversed_report_after_a_succeeded_one_still_marks_the_outcall_reversed() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let t = on_outcall_reported(s, "1.a", report(Outcome::Reversed), false, env(NOW + 1)).unwrap();
    assert_eq!(
        t.saga.branch("1.a").map(|b| b.state),
        Some(BranchState::Reversed)
    );
}

#[test]
fn a_contrary_report_after_completion_changes_no_branch() {
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let done = on_completed(s, NOW).unwrap().saga;
    for outcome in [Outcome::Failed, Outcome::NotFound, Outcome::Unknown] {
        let t =
            on_outcall_reported(done.clone(), "2.b", report(outcome), false, env(NOW + 1)).unwrap();
        assert_eq!(t.saga.state, SagaState::Completed);
        assert_eq!(
            t.saga.branch("2.b").map(|b| b.state),
            Some(BranchState::Succeeded),
            "{outcome:?}"
        );
        assert!(t.effects.is_empty());
    }
}

/// The participant guide's race after completion: a node undid an outcall (its poll found no
/// trace, then the late call was refused). The saga needs an operator, every node is told to
/// wait, and ReprocessSaga reverses the other outcalls.
#[test]
fn an_outcall_undone_by_its_node_after_completion_needs_attention_and_reprocess_reverses_the_rest()
{
    let s = three([Outcome::Succeeded, Outcome::Succeeded, Outcome::Succeeded]);
    let done = on_completed(s, NOW).unwrap().saga;
    let t =
        on_outcall_reported(done, "2.b", report(Outcome::Reversed), false, env(NOW + 1)).unwrap();
    assert_eq!(t.saga.state, SagaState::NeedsAttention);
    assert!(t.saga.reason.contains("2.b"), "{}", t.saga.reason);
    assert!(
        t.effects.iter().all(|e| matches!(
            e,
            Effect::Signal {
                signal: Signal::Reprocess,
                ..
            }
        )) && !t.effects.is_empty()
    );
    assert_eq!(
        t.saga.branch("2.b").map(|b| b.state),
        Some(BranchState::Reversed),
        "its node undid it"
    );
    // One at a time from the highest order down, passing over the one already undone.
    let again = on_outcall_reprocess(t.saga, env(NOW + 2)).expect("it needs attention");
    assert_eq!(again.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&again.effects), ["3.c"]);
    let next =
        on_outcall_reversal_answered(again.saga, "3.c", report(Outcome::Succeeded), env(NOW + 3));
    assert_eq!(reverses(&next.effects), ["1.a"]);
    let done =
        on_outcall_reversal_answered(next.saga, "1.a", report(Outcome::Succeeded), env(NOW + 4));
    assert_eq!(done.saga.state, SagaState::Reversed);
}

#[test]
fn a_reported_status_without_a_name_is_named_after_the_outcome_and_keeps_its_parameters() {
    let registered = on_outcall_registered(saga(), outcall(1, "a"), NOW)
        .unwrap()
        .saga;
    let id = branch_id(1, "a");
    let with = |name: &str, parameters: &[(&str, &str)]| Report {
        status: Some(Status {
            name: name.into(),
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }),
        ..report(Outcome::Succeeded)
    };
    let last_status = |report: Report| {
        on_outcall_reported(registered.clone(), &id, report, false, env(NOW))
            .unwrap()
            .saga
            .branch(&id)
            .unwrap()
            .last_status
            .clone()
    };
    let nameless = last_status(with("", &[("result_code", "E12")])).unwrap();
    assert_eq!(nameless.name, "SUCCEEDED");
    assert_eq!(nameless.parameters["result_code"], "E12");
    assert_eq!(last_status(with("PAID", &[])).unwrap().name, "PAID");
    assert_eq!(last_status(with("", &[])), None, "an empty status is none");
    assert_eq!(last_status(report(Outcome::Succeeded)), None);
}
