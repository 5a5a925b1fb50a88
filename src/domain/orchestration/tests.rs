//! Data-driven tests of every S2 rule: each feeds events to a saga and asserts the effects.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

use super::*;
use crate::domain::ids::{BusinessType, CoordinatorId, Gsn, RequestId};
use crate::domain::retry;
use crate::domain::saga::SagaMode;
use crate::domain::strategy::{Rule, StatusMapping, Step};

const NOW: Millis = 1_000_000;

fn step(id: &str, node: &str) -> Step {
    Step {
        id: id.into(),
        node_id: node.into(),
        forward_action: id.into(),
        reversal_action: format!("undo-{id}"),
        timeout_ms: 5_000,
    }
}

fn when(step_id: &str, status: &str) -> StepStatus {
    StepStatus {
        step_id: step_id.into(),
        status: status.into(),
    }
}

/// The order strategy: reserve and charge at once; ship once both RESERVED and PAID (a join);
/// SHIPPED ends it; DECLINED from charge reverses reserve only; result_code=E12 is abnormal.
fn order() -> Strategy {
    Strategy {
        business_type: "order".into(),
        version: 3,
        description: String::new(),
        steps: vec![
            step("reserve", "inventory"),
            step("charge", "payment"),
            step("ship", "shipping"),
        ],
        first_set: vec!["reserve".into(), "charge".into()],
        rules: vec![Rule {
            when: vec![when("reserve", "RESERVED"), when("charge", "PAID")],
            trigger: vec!["ship".into()],
        }],
        end_statuses: vec![when("ship", "SHIPPED")],
        abnormal_statuses: vec![when("charge", "DECLINED")],
        status_mappings: vec![StatusMapping {
            step_id: None,
            parameter: "result_code".into(),
            value: "E12".into(),
            meaning: Meaning::Abnormal,
        }],
        exception_scopes: BTreeMap::from([("charge".into(), vec!["reserve".into()])]),
        saga_timeout_ms: 0,
        created_ms: 0,
    }
}

fn new_saga() -> Saga {
    Saga {
        gsn: Gsn::new(CoordinatorId::parse("c1").unwrap(), 1),
        business_type: BusinessType::parse("order").unwrap(),
        mode: SagaMode::Orchestrated,
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

static BUILTIN_RETRY: std::sync::LazyLock<retry::Config> =
    std::sync::LazyLock::new(retry::Config::builtin);

fn ctx(strategy: &Strategy, now: Millis) -> Context<'_> {
    Context {
        strategy,
        now,
        policy: Policy::default(),
        retry: &BUILTIN_RETRY,
        jitter: 0.0,
    }
}

fn failed(code: &str) -> Report {
    Report {
        outcome: Outcome::Failed,
        status: None,
        error_code: code.into(),
        message: String::new(),
        attempt: None,
    }
}

fn processing() -> Report {
    Report {
        outcome: Outcome::Processing,
        ..failed("")
    }
}

fn succeeded(status: &str) -> Report {
    Report {
        outcome: Outcome::Succeeded,
        status: Some(Status {
            name: status.into(),
            parameters: BTreeMap::new(),
        }),
        error_code: String::new(),
        message: String::new(),
        attempt: None,
    }
}

fn executes(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Execute { branch_id, .. } => Some(branch_id.as_str()),
            _ => None,
        })
        .collect()
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

fn signals(effects: &[Effect]) -> Vec<(&str, Signal)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Signal {
                node_id, signal, ..
            } => Some((node_id.as_str(), *signal)),
            _ => None,
        })
        .collect()
}

fn started(strategy: &Strategy) -> Saga {
    on_started(new_saga(), ctx(strategy, NOW)).saga
}

fn report(saga: Saga, strategy: &Strategy, branch: &str, r: Report) -> Transition {
    on_reported(saga, branch, r, ctx(strategy, NOW + 10)).unwrap()
}

#[test]
fn start_triggers_the_first_set_with_their_timeouts() {
    let s = order();
    let t = on_started(new_saga(), ctx(&s, NOW));
    assert_eq!(executes(&t.effects), ["reserve", "charge"]);
    assert!(t.effects.contains(&Effect::WakeAt {
        at_ms: NOW + 5_000,
        timer: Timer::StepTimeout {
            branch_id: "reserve".into(),
            attempt: 1
        }
    }));
    assert_eq!(t.saga.strategy_version, 3);
    assert_eq!(t.saga.branches.len(), 2);
    assert!(
        t.saga
            .branches
            .iter()
            .all(|b| b.state == BranchState::Triggered)
    );
}

#[test]
fn start_arms_the_deadline() {
    let s = order();
    let mut saga = new_saga();
    saga.deadline_ms = Some(NOW + 60_000);
    let t = on_started(saga, ctx(&s, NOW));
    assert!(t.effects.contains(&Effect::WakeAt {
        at_ms: NOW + 60_000,
        timer: Timer::Deadline
    }));
}

#[test]
fn a_status_whose_rule_is_incomplete_is_stored_and_completes_the_join_later() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    assert!(executes(&t.effects).is_empty(), "the join waits for PAID");
    assert!(
        t.saga.reported.contains(&when("reserve", "RESERVED")),
        "the status is stored"
    );
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(
        executes(&t.effects),
        ["ship"],
        "the stored status completes the join"
    );
    assert_eq!(t.saga.fired_rules, BTreeSet::from([0]));
}

#[test]
fn a_rule_fires_once_and_a_step_is_triggered_at_most_once() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert!(executes(&t.effects).is_empty());
    assert_eq!(
        t.saga
            .branches
            .iter()
            .filter(|b| b.branch_id == "ship")
            .count(),
        1
    );
}

#[test]
fn an_end_status_completes_the_saga_and_tells_every_node() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    let t = report(t.saga, &s, "ship", succeeded("SHIPPED"));
    assert_eq!(t.saga.state, SagaState::Completed);
    assert_eq!(
        signals(&t.effects),
        [
            ("inventory", Signal::Completed),
            ("payment", Signal::Completed),
            ("shipping", Signal::Completed)
        ]
    );
}

#[test]
fn an_abnormal_status_reverses_exactly_the_triggered_steps_in_its_exception_scope() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("DECLINED"));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(
        reverses(&t.effects),
        ["reserve"],
        "charge's scope is reserve only"
    );
    assert!(t.saga.reason.contains("DECLINED"));
    let t = on_reversal_answered(t.saga, "reserve", succeeded("RELEASED"), ctx(&s, NOW + 20));
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(
        signals(&t.effects),
        [
            ("inventory", Signal::ReversalSuccess),
            ("payment", Signal::ReversalSuccess)
        ]
    );
}

#[test]
fn a_status_is_recognised_as_abnormal_by_its_preset_parameter() {
    let s = order();
    let mut r = succeeded("RESERVED");
    r.status
        .as_mut()
        .unwrap()
        .parameters
        .insert("result_code".into(), "E12".into());
    let t = report(started(&s), &s, "reserve", r);
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(
        reverses(&t.effects),
        ["reserve", "charge"],
        "no scope for reserve: every triggered step"
    );
}

#[test]
fn a_failed_forward_action_is_abnormal_and_is_not_itself_reversed() {
    let s = order();
    let t = report(started(&s), &s, "reserve", failed("OUT_OF_STOCK"));
    assert_eq!(reverses(&t.effects), ["charge"]);
    assert_eq!(t.saga.branch("reserve").unwrap().state, BranchState::Failed);
    assert_eq!(t.saga.branch("reserve").unwrap().error_code, "OUT_OF_STOCK");
}

#[test]
fn a_report_for_an_untriggered_or_unknown_step_is_refused() {
    let s = order();
    let err = on_reported(started(&s), "ship", succeeded("SHIPPED"), ctx(&s, NOW)).unwrap_err();
    assert_eq!(
        err,
        Refusal::NotTriggered {
            branch_id: "ship".into()
        }
    );
    let err = on_reported(started(&s), "nope", succeeded("X"), ctx(&s, NOW)).unwrap_err();
    assert_eq!(
        err,
        Refusal::UnknownStep {
            branch_id: "nope".into()
        }
    );
}

#[test]
fn a_report_without_a_status_is_named_after_its_outcome() {
    let mut s = order();
    s.rules[0].when[0].status = "SUCCEEDED".into();
    let plain = Report {
        outcome: Outcome::Succeeded,
        status: None,
        error_code: String::new(),
        message: String::new(),
        attempt: None,
    };
    let t = report(started(&s), &s, "reserve", plain);
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(executes(&t.effects), ["ship"]);
}

#[test]
fn a_silent_step_becomes_unknown_and_is_polled_then_its_answer_counts() {
    let s = order();
    let saga = started(&s);
    let t = on_timer(
        saga,
        &Timer::StepTimeout {
            branch_id: "reserve".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    );
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::Unknown
    );
    assert!(t.effects.contains(&Effect::QueryStatus {
        branch_id: "reserve".into()
    }));
    assert!(t.effects.iter().any(|e| matches!(
        e,
        Effect::WakeAt {
            timer: Timer::Poll { .. },
            ..
        }
    )));
    let t = on_polled(
        t.saga,
        "reserve",
        succeeded("RESERVED"),
        ctx(&s, NOW + 5_100),
    )
    .unwrap();
    let branch = t.saga.branch("reserve").unwrap();
    assert_eq!(branch.state, BranchState::Succeeded);
    assert_eq!(branch.last_poll_outcome, Some(Outcome::Succeeded));
}

#[test]
fn a_step_that_reported_in_time_is_not_polled() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = on_timer(
        t.saga,
        &Timer::StepTimeout {
            branch_id: "reserve".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    );
    assert!(t.effects.is_empty());
}

#[test]
fn a_node_that_never_answers_polls_is_given_up_on_and_the_saga_reversed() {
    let s = order();
    let mut saga = on_timer(
        started(&s),
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW),
    )
    .saga;
    let mut last = Vec::new();
    for i in 0..Policy::default().max_polls {
        let t = on_timer(
            saga,
            &Timer::Poll {
                branch_id: "charge".into(),
            },
            ctx(&s, NOW + u64::from(i)),
        );
        saga = t.saga;
        last = t.effects;
    }
    assert_eq!(saga.state, SagaState::Reversing);
    assert_eq!(
        reverses(&last),
        ["reserve", "charge"],
        "its scope (reserve), and the silent step itself"
    );
}

#[test]
fn a_saga_past_its_deadline_is_reversed() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = on_timer(t.saga, &Timer::Deadline, ctx(&s, NOW + 99_000));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&t.effects), ["reserve", "charge"]);
    assert_eq!(t.saga.reason, "the saga's deadline passed");
}

#[test]
fn a_failed_reversal_is_retried_by_the_retry_policy_then_needs_attention() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("DECLINED"));
    let mut saga = t.saga;
    let builtin = retry::Policy::builtin();
    for attempt in 1..=builtin.max_retries {
        let t = on_reversal_answered(saga, "reserve", failed("UNAVAILABLE"), ctx(&s, NOW));
        if attempt == 1 {
            assert!(
                signals(&t.effects)
                    .iter()
                    .all(|(_, signal)| *signal == Signal::Reprocess)
                    && !signals(&t.effects).is_empty(),
                "the first failure tells every node REPROCESS"
            );
        } else {
            assert!(signals(&t.effects).is_empty(), "REPROCESS is told once");
        }
        let retry_at = t.effects.iter().find_map(|e| match e {
            Effect::WakeAt {
                at_ms,
                timer: Timer::RetryReversal { .. },
            } => Some(*at_ms),
            _ => None,
        });
        let retry_at = retry_at.expect("a retryable failure is retried");
        assert!(
            retry_at >= NOW + builtin.min_interval_ms,
            "never sooner than the minimum interval"
        );
        let t = on_timer(
            t.saga,
            &Timer::RetryReversal {
                branch_id: "reserve".into(),
            },
            ctx(&s, retry_at),
        );
        assert_eq!(reverses(&t.effects), ["reserve"]);
        saga = t.saga;
    }
    let t = on_reversal_answered(saga, "reserve", failed("UNAVAILABLE"), ctx(&s, NOW));
    assert_eq!(
        t.saga.state,
        SagaState::NeedsAttention,
        "the retry budget is spent"
    );
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::ReversalFailed
    );
}

#[test]
fn re_asking_a_reversal_still_processing_spends_no_failure_retry() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("DECLINED"));
    let mut saga = t.saga;
    let builtin = retry::Policy::builtin();
    // The forward action is still running on the node: its barrier keeps the reversal waiting,
    // as many times as the retry budget has retries.
    for _ in 0..builtin.max_retries {
        let t = on_reversal_answered(saga, "reserve", processing(), ctx(&s, NOW));
        let t = on_timer(
            t.saga,
            &Timer::RetryReversal {
                branch_id: "reserve".into(),
            },
            ctx(&s, NOW),
        );
        assert_eq!(reverses(&t.effects), ["reserve"]);
        saga = t.saga;
    }
    // Then one transient failure: the first failure, so it is retried.
    let t = on_reversal_answered(saga, "reserve", failed("UNAVAILABLE"), ctx(&s, NOW));
    assert_eq!(t.saga.state, SagaState::Reversing, "{:?}", t.saga.reason);
    assert!(t.effects.iter().any(|e| matches!(
        e,
        Effect::WakeAt {
            timer: Timer::RetryReversal { .. },
            ..
        }
    )));
}

#[test]
fn a_reversal_failing_with_a_code_that_is_not_retryable_needs_attention_at_once() {
    let s = order();
    let t = report(started(&s), &s, "charge", succeeded("DECLINED"));
    let t = on_reversal_answered(t.saga, "reserve", failed("LOCKED"), ctx(&s, NOW));
    assert_eq!(t.saga.state, SagaState::NeedsAttention);
}

#[test]
fn a_forward_action_failing_with_a_retryable_code_is_executed_again() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    assert_eq!(t.saga.state, SagaState::Running, "not abnormal yet");
    assert!(reverses(&t.effects).is_empty());
    let at = retry_execute_at(&t.effects, "charge").expect("a retry is scheduled");
    let t = on_timer(
        t.saga,
        &Timer::RetryExecute {
            branch_id: "charge".into(),
        },
        ctx(&s, at),
    );
    assert_eq!(executes(&t.effects), ["charge"]);
    assert_eq!(t.saga.branch("charge").unwrap().attempts, 2);
    assert!(t.effects.contains(&Effect::WakeAt {
        at_ms: at + 5_000,
        timer: Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 2
        }
    }));
    // The first attempt's timeout is stale now and changes nothing.
    let stale = on_timer(
        t.saga.clone(),
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, at + 1),
    );
    assert!(stale.effects.is_empty());
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(
        t.saga.branch("charge").unwrap().state,
        BranchState::Succeeded
    );
}

#[test]
fn a_retryable_failure_reported_after_the_step_timed_out_is_retried_too() {
    let s = order();
    let t = on_timer(
        started(&s),
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    );
    assert_eq!(
        t.saga.branch("charge").unwrap().state,
        BranchState::Unknown,
        "timed out: sagad asks the node"
    );
    // The node's answer (or its own late report): the attempt failed, retryably.
    let t = report(t.saga, &s, "charge", failed("UNAVAILABLE"));
    assert_eq!(t.saga.state, SagaState::Running);
    assert!(reverses(&t.effects).is_empty());
    let at = retry_execute_at(&t.effects, "charge")
        .expect("a retry is scheduled, as for a failure reported before the timeout");
    // The poll that was due meanwhile asks nothing more.
    let polled = on_timer(
        t.saga.clone(),
        &Timer::Poll {
            branch_id: "charge".into(),
        },
        ctx(&s, at - 1),
    );
    assert!(polled.effects.is_empty());
    let t = retry_execute(t.saga, &s, "charge", at);
    assert_eq!(executes(&t.effects), ["charge"]);
    assert_eq!(t.saga.branch("charge").unwrap().attempts, 2);
}

#[test]
fn a_retry_decided_by_the_policy_is_not_pre_empted_by_the_failed_attempts_timeout() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let t = on_timer(
        t.saga,
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    );
    assert!(
        t.effects.is_empty(),
        "the retry is waiting; the first attempt's timeout is stale"
    );
    assert_eq!(
        t.saga.branch("charge").unwrap().state,
        BranchState::Triggered
    );
}

#[test]
fn a_reversal_gets_its_own_poll_budget_after_its_step_was_polled() {
    let s = order();
    let mut saga = on_timer(
        started(&s),
        &Timer::StepTimeout {
            branch_id: "reserve".into(),
            attempt: 1,
        },
        ctx(&s, NOW),
    )
    .saga;
    for i in 0..Policy::default().max_polls - 1 {
        saga = on_timer(
            saga,
            &Timer::Poll {
                branch_id: "reserve".into(),
            },
            ctx(&s, NOW + u64::from(i)),
        )
        .saga;
    }
    let saga = on_polled(saga, "reserve", succeeded("RESERVED"), ctx(&s, NOW + 100))
        .unwrap()
        .saga;
    let saga = report(saga, &s, "charge", succeeded("DECLINED")).saga;
    let t = on_reversal_answered(saga, "reserve", processing(), ctx(&s, NOW + 200));
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::Reversing,
        "asked again, not given up"
    );
    assert!(t.effects.iter().any(|e| matches!(
        e,
        Effect::WakeAt {
            timer: Timer::RetryReversal { .. },
            ..
        }
    )));
}

#[test]
fn an_escalated_step_is_reversed_even_outside_its_own_exception_scope() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let mut saga = on_timer(
        t.saga,
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW),
    )
    .saga;
    let mut last = Vec::new();
    for i in 0..Policy::default().max_polls {
        let t = on_timer(
            saga,
            &Timer::Poll {
                branch_id: "charge".into(),
            },
            ctx(&s, NOW + u64::from(i)),
        );
        saga = t.saga;
        last = t.effects;
    }
    assert_eq!(
        reverses(&last),
        ["reserve", "charge"],
        "the silent charge may have taken effect"
    );
}

#[test]
fn a_forward_action_failing_with_a_code_that_is_not_retryable_starts_the_reversal_at_once() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", failed("INSUFFICIENT_FUNDS"));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(reverses(&t.effects), ["reserve"]);
}

#[test]
fn a_forward_action_that_keeps_failing_is_given_up_after_the_retry_budget() {
    let s = order();
    let mut saga = started(&s);
    for _ in 0..retry::Policy::builtin().max_retries {
        let t = report(saga, &s, "charge", failed("UNAVAILABLE"));
        saga = on_timer(
            t.saga,
            &Timer::RetryExecute {
                branch_id: "charge".into(),
            },
            ctx(&s, NOW + 1_000_000),
        )
        .saga;
    }
    let t = report(saga, &s, "charge", failed("UNAVAILABLE"));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(t.saga.branch("charge").unwrap().state, BranchState::Failed);
}

#[test]
fn a_reversal_of_what_never_happened_settles_as_not_occurred() {
    let s = order();
    let t = report(started(&s), &s, "charge", succeeded("DECLINED"));
    let not_found = Report {
        outcome: Outcome::NotFound,
        status: None,
        error_code: String::new(),
        message: String::new(),
        attempt: None,
    };
    let t = on_reversal_answered(t.saga, "reserve", not_found, ctx(&s, NOW));
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::NotOccurred
    );
    assert_eq!(t.saga.state, SagaState::Reversed);
}

#[test]
fn a_late_forward_report_after_reversal_began_changes_nothing() {
    let s = order();
    let t = report(started(&s), &s, "charge", succeeded("DECLINED"));
    let t = report(t.saga, &s, "reserve", succeeded("RESERVED"));
    assert!(t.effects.is_empty());
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::Reversing
    );
}

fn about(mut r: Report, attempt: u32) -> Report {
    r.attempt = Some(attempt);
    r
}

fn execute_attempts(effects: &[Effect], branch: &str) -> Vec<u32> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Execute {
                branch_id, attempt, ..
            } if branch_id == branch => Some(*attempt),
            _ => None,
        })
        .collect()
}

/// When the retry of `branch`'s forward action is scheduled, if it is.
fn retry_execute_at(effects: &[Effect], branch: &str) -> Option<Millis> {
    effects.iter().find_map(|e| match e {
        Effect::WakeAt {
            at_ms,
            timer: Timer::RetryExecute { branch_id },
        } if branch_id == branch => Some(*at_ms),
        _ => None,
    })
}

fn retry_execute(saga: Saga, strategy: &Strategy, branch: &str, now: Millis) -> Transition {
    let timer = Timer::RetryExecute {
        branch_id: branch.into(),
    };
    on_timer(saga, &timer, ctx(strategy, now))
}

#[test]
fn a_repeated_failure_report_does_not_count_again_against_the_retry_budget() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let waiting = t.saga.branch("charge").unwrap().clone();
    assert!(waiting.retry_at_ms.is_some(), "a retry waits");
    assert_eq!(waiting.attempts, 1, "one send made so far");
    // The same failure again: the inline answer and a ReportState, or two ReportStates.
    for repeat in [failed("UNAVAILABLE"), about(failed("UNAVAILABLE"), 1)] {
        let again = report(t.saga.clone(), &s, "charge", repeat);
        assert!(again.effects.is_empty(), "no second retry is scheduled");
        let branch = again.saga.branch("charge").unwrap();
        assert_eq!(branch.attempts, 1);
        assert_eq!(branch.retry_at_ms, waiting.retry_at_ms);
        assert!(
            branch
                .timeline
                .last()
                .unwrap()
                .what
                .contains("late or repeated report FAILED about send 1 ignored"),
            "{:?}",
            branch.timeline.last()
        );
    }
    let t = retry_execute(t.saga, &s, "charge", NOW + 60_000);
    assert_eq!(execute_attempts(&t.effects, "charge"), [2]);
    let branch = t.saga.branch("charge").unwrap();
    assert_eq!((branch.attempts, branch.retry_at_ms), (2, None));
}

#[test]
fn a_late_failure_of_an_earlier_send_is_superseded_by_the_resend() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let t = retry_execute(t.saga, &s, "charge", NOW + 60_000);
    let late = report(
        t.saga.clone(),
        &s,
        "charge",
        about(failed("UNAVAILABLE"), 1),
    );
    assert!(
        late.effects.is_empty(),
        "send 2 is out; send 1's failure was counted"
    );
    assert_eq!(
        late.saga.branch("charge").unwrap().state,
        BranchState::Triggered
    );
    // Neither a late UNKNOWN nor PROCESSING about send 1 makes the branch wait on a poll.
    for outcome in [Outcome::Unknown, Outcome::Processing, Outcome::NotFound] {
        let mut r = about(failed(""), 1);
        r.outcome = outcome;
        let late = report(t.saga.clone(), &s, "charge", r);
        assert!(late.effects.is_empty(), "{outcome:?}");
        assert_eq!(
            late.saga.branch("charge").unwrap().state,
            BranchState::Triggered
        );
    }
    // The answer about send 2 counts.
    let t = report(t.saga, &s, "charge", about(failed("UNAVAILABLE"), 2));
    assert!(t.saga.branch("charge").unwrap().retry_at_ms.is_some());
}

#[test]
fn a_late_success_of_an_earlier_send_still_counts() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let t = report(t.saga, &s, "charge", about(succeeded("PAID"), 1));
    let branch = t.saga.branch("charge").unwrap();
    assert_eq!(
        branch.state,
        BranchState::Succeeded,
        "the action took effect"
    );
    assert_eq!(branch.retry_at_ms, None, "nothing waits any more");
    let t = retry_execute(t.saga, &s, "charge", NOW + 60_000);
    assert!(t.effects.is_empty(), "the retry has nothing to do");
}

#[test]
fn a_waiting_retry_is_dropped_when_the_saga_stops_running() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let t = on_timer(t.saga, &Timer::Deadline, ctx(&s, NOW + 20));
    // The deadline reverses every step, the waiting one too.
    assert_eq!(
        t.saga.branch("charge").unwrap().state,
        BranchState::Reversing
    );
    assert_eq!(t.saga.branch("charge").unwrap().retry_at_ms, None);
    // A step outside the reversal's scope keeps its state, but not its waiting retry.
    let mut s = order();
    s.exception_scopes
        .insert("reserve".into(), vec!["reserve".into()]);
    let t = report(started(&s), &s, "charge", failed("UNAVAILABLE"));
    let abnormal = Report {
        status: Some(Status {
            name: "RESERVED".into(),
            parameters: BTreeMap::from([("result_code".into(), "E12".into())]),
        }),
        ..succeeded("RESERVED")
    };
    let t = report(t.saga, &s, "reserve", abnormal);
    assert_ne!(t.saga.state, SagaState::Running);
    let charge = t.saga.branch("charge").unwrap();
    assert_eq!(charge.state, BranchState::Triggered);
    assert_eq!(charge.retry_at_ms, None, "no retry is shown as coming");
    assert_eq!(
        charge.timeline.last().unwrap().what,
        "retry not sent: the saga no longer runs"
    );
    let t = retry_execute(t.saga, &s, "charge", NOW + 60_000);
    assert!(executes(&t.effects).is_empty(), "the retry is not sent");
    assert_eq!(t.saga.branch("charge").unwrap().retry_at_ms, None);
}

#[test]
fn a_step_answering_processing_gets_a_timeout_of_its_own() {
    let s = order();
    let t = report(started(&s), &s, "charge", processing());
    assert_eq!(
        t.effects,
        [Effect::WakeAt {
            at_ms: NOW + 10 + 5_000,
            timer: Timer::StepTimeout {
                branch_id: "charge".into(),
                attempt: 1
            }
        }]
    );
    assert!(step_timeout_is_live(&t.saga, "charge", 1));
    assert!(
        !step_timeout_is_live(&t.saga, "charge", 2),
        "not a send made"
    );
    assert!(!step_timeout_is_live(&t.saga, "ship", 1), "not triggered");
    // Once the step is polled, PROCESSING arms nothing more: the poll has its own timer.
    let polled = on_timer(
        t.saga,
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_010),
    );
    assert!(!step_timeout_is_live(&polled.saga, "charge", 1));
    let again = on_polled(polled.saga, "charge", processing(), ctx(&s, NOW + 5_020)).unwrap();
    assert!(again.effects.is_empty());
    // Nor once the saga stops running (charge outside reserve's narrowed exception scope).
    let mut s = order();
    s.exception_scopes
        .insert("reserve".into(), vec!["reserve".into()]);
    let abnormal = Report {
        status: Some(Status {
            name: "RESERVED".into(),
            parameters: BTreeMap::from([("result_code".into(), "E12".into())]),
        }),
        ..succeeded("RESERVED")
    };
    let t = report(started(&s), &s, "reserve", abnormal);
    assert_ne!(t.saga.state, SagaState::Running);
    let t = report(t.saga, &s, "charge", processing());
    assert!(t.effects.is_empty());
}

#[test]
fn a_retry_stored_before_retry_times_were_kept_is_sent_once_with_its_counted_attempt() {
    // sagad before saga record version 3 counted the resend when it scheduled it.
    let s = order();
    let mut saga = started(&s);
    let charge = saga.branch_mut("charge").unwrap();
    charge.attempts = 2;
    charge.retry_at_ms = None;
    let t = retry_execute(saga, &s, "charge", NOW + 60_000);
    assert_eq!(execute_attempts(&t.effects, "charge"), [2]);
    assert_eq!(t.saga.branch("charge").unwrap().attempts, 2);
}

#[test]
fn a_repeated_reversal_failure_schedules_one_retry() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("DECLINED"));
    let t = on_reversal_answered(t.saga, "reserve", failed("UNAVAILABLE"), ctx(&s, NOW));
    let retries = |effects: &[Effect]| {
        effects
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::WakeAt {
                        timer: Timer::RetryReversal { .. },
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(retries(&t.effects), 1);
    for repeat in [failed("UNAVAILABLE"), about(failed("UNAVAILABLE"), 1)] {
        let again = on_reversal_answered(t.saga.clone(), "reserve", repeat, ctx(&s, NOW + 1));
        assert_eq!(
            retries(&again.effects),
            0,
            "the failure was counted already"
        );
        assert_eq!(again.saga.branch("reserve").unwrap().attempts, 1);
    }
    // A repeat of the first failure after the resend went out is late, too.
    let timer = Timer::RetryReversal {
        branch_id: "reserve".into(),
    };
    let t = on_timer(t.saga, &timer, ctx(&s, NOW + 60_000));
    assert!(t.effects.contains(&Effect::Reverse {
        branch_id: "reserve".into(),
        reason: t.saga.reason.clone(),
        attempt: 2,
    }));
    let late = on_reversal_answered(
        t.saga.clone(),
        "reserve",
        about(failed("UNAVAILABLE"), 1),
        ctx(&s, NOW + 60_001),
    );
    assert!(late.effects.is_empty());
    // Whatever send says the undo is done settles the branch.
    let done = on_reversal_answered(
        t.saga,
        "reserve",
        about(succeeded("RELEASED"), 1),
        ctx(&s, NOW + 60_002),
    );
    assert_eq!(
        done.saga.branch("reserve").unwrap().state,
        BranchState::Reversed
    );
    assert_eq!(done.saga.state, SagaState::Reversed);
}

#[test]
fn a_reversal_answer_from_an_earlier_round_does_not_count_in_a_reprocessed_one() {
    let s = order();
    let t = report(started(&s), &s, "charge", succeeded("DECLINED"));
    let t = on_reversal_answered(t.saga, "reserve", failed("LOCKED"), ctx(&s, NOW));
    assert_eq!(t.saga.state, SagaState::NeedsAttention);
    let t = on_reprocess(t.saga, NOW + 1).unwrap();
    // The new round goes on numbering the reversal's sends: its first is send 2.
    assert!(t.effects.contains(&Effect::Reverse {
        branch_id: "reserve".into(),
        reason: t.saga.reason.clone(),
        attempt: 2,
    }));
    // The first round's send 1, answered again late (say its ReportState after the inline
    // answer), is not about this round's send.
    let stale = on_reversal_answered(
        t.saga.clone(),
        "reserve",
        about(failed("LOCKED"), 1),
        ctx(&s, NOW + 2),
    );
    assert_eq!(stale.saga.state, SagaState::Reversing);
    assert!(stale.effects.is_empty());
    // A late answer that the undo is done still settles the branch, whichever round it is from.
    let done = on_reversal_answered(
        t.saga.clone(),
        "reserve",
        about(succeeded("RELEASED"), 1),
        ctx(&s, NOW + 2),
    );
    assert_eq!(done.saga.state, SagaState::Reversed);
    let now = on_reversal_answered(
        t.saga,
        "reserve",
        about(failed("LOCKED"), 2),
        ctx(&s, NOW + 2),
    );
    assert_eq!(now.saga.state, SagaState::NeedsAttention);
}

#[test]
fn a_reprocessed_reversal_gets_the_whole_retry_budget_again() {
    let s = order();
    let budget = retry::Policy::builtin().max_retries;
    let timer = Timer::RetryReversal {
        branch_id: "reserve".into(),
    };
    let retried = |effects: &[Effect]| {
        effects.iter().any(|e| {
            matches!(
                e,
                Effect::WakeAt {
                    timer: Timer::RetryReversal { .. },
                    ..
                }
            )
        })
    };
    // Sends `first` to `first + budget` of the reversal fail; all but the last are retried.
    let fail_a_round = |mut saga: Saga, first: u32, at: Millis| {
        for send in first..first + budget {
            let t = on_reversal_answered(
                saga,
                "reserve",
                about(failed("UNAVAILABLE"), send),
                ctx(&s, at),
            );
            assert!(retried(&t.effects), "send {send} is retried");
            saga = on_timer(t.saga, &timer, ctx(&s, at + 1_000_000)).saga;
        }
        let last = first + budget;
        assert_eq!(saga.branch("reserve").unwrap().attempts, last);
        let t = on_reversal_answered(
            saga,
            "reserve",
            about(failed("UNAVAILABLE"), last),
            ctx(&s, at),
        );
        assert!(!retried(&t.effects), "send {last} spends the budget");
        t.saga
    };
    let t = report(started(&s), &s, "charge", succeeded("DECLINED"));
    let saga = fail_a_round(t.saga, 1, NOW);
    assert_eq!(saga.state, SagaState::NeedsAttention);
    let t = on_reprocess(saga, NOW + 10_000_000).unwrap();
    let second = budget + 2;
    assert_eq!(t.saga.branch("reserve").unwrap().attempts, second);
    let saga = fail_a_round(t.saga, second, NOW + 10_000_001);
    assert_eq!(saga.state, SagaState::NeedsAttention);
}

#[test]
fn retry_delays_stay_between_the_floor_and_the_cap() {
    let policy = Policy::default();
    assert_eq!(policy.retry_delay_ms(1, 0.0), 1_000);
    assert_eq!(policy.retry_delay_ms(3, 1.0), 4_000);
    assert_eq!(policy.retry_delay_ms(30, 1.0), 60_000);
}

/// reserve and charge in parallel; RESERVED alone ends the saga, so charge may still be out
/// when the end is reported.
fn end_before_a_parallel_step() -> Strategy {
    Strategy {
        rules: Vec::new(),
        end_statuses: vec![when("reserve", "RESERVED")],
        ..order()
    }
}

#[test]
fn an_end_status_reported_while_a_parallel_step_is_out_completes_once_that_step_succeeds() {
    let s = end_before_a_parallel_step();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    assert_eq!(t.saga.state, SagaState::Running, "charge is still out");
    assert!(
        signals(&t.effects).is_empty(),
        "nobody is told COMPLETED yet"
    );
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(t.saga.state, SagaState::Completed);
    assert_eq!(signals(&t.effects).len(), 2);
}

#[test]
fn an_end_status_reported_while_a_parallel_step_is_out_is_reversed_when_that_step_fails() {
    let s = end_before_a_parallel_step();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", failed("CARD_EXPIRED"));
    assert_eq!(t.saga.state, SagaState::Reversing);
    assert_eq!(
        reverses(&t.effects),
        ["reserve"],
        "charge's exception scope"
    );
}

#[test]
fn a_saga_with_nothing_out_and_no_end_waits_for_a_further_status() {
    let s = order();
    // PICKED is no status any rule waits for: with charge PAID nothing is out and no rule fires.
    let t = report(started(&s), &s, "reserve", succeeded("PICKED"));
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(t.saga.state, SagaState::Running);
    assert!(t.effects.is_empty());
    // The step reports its next status, which completes ship's join.
    let t = report(t.saga, &s, "reserve", succeeded("RESERVED"));
    assert_eq!(executes(&t.effects), ["ship"]);
}

#[test]
fn a_failure_reported_after_a_success_does_not_undo_the_success() {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "reserve", failed("UNAVAILABLE"));
    assert_eq!(t.saga.state, SagaState::Running);
    assert!(t.effects.is_empty());
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::Succeeded
    );
    // So a later reversal still undoes it.
    let t = report(t.saga, &s, "charge", failed("CARD_EXPIRED"));
    assert_eq!(reverses(&t.effects), ["reserve"]);
}

#[test]
fn a_poll_answer_about_an_earlier_send_does_not_count_against_the_send_now_out() {
    let s = order();
    let t = on_timer(
        started(&s),
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    );
    let t = report(t.saga, &s, "charge", failed("UNAVAILABLE"));
    let at = retry_execute_at(&t.effects, "charge").expect("a retry is scheduled");
    let t = retry_execute(t.saga, &s, "charge", at);
    assert_eq!(t.saga.branch("charge").unwrap().attempts, 2);
    // The answer to the poll sent while send 1 was unknown arrives now.
    let t = on_polled(t.saga, "charge", failed("UNAVAILABLE"), ctx(&s, at + 10)).unwrap();
    assert!(t.effects.is_empty());
    let charge = t.saga.branch("charge").unwrap();
    assert_eq!(charge.state, BranchState::Triggered);
    assert_eq!(charge.retry_at_ms, None, "no second retry was scheduled");
}

#[test]
fn a_retried_send_gets_the_whole_poll_budget() {
    let s = order();
    let mut saga = on_timer(
        started(&s),
        &Timer::StepTimeout {
            branch_id: "charge".into(),
            attempt: 1,
        },
        ctx(&s, NOW + 5_000),
    )
    .saga;
    for i in 1..=3 {
        saga = on_timer(
            saga,
            &Timer::Poll {
                branch_id: "charge".into(),
            },
            ctx(&s, NOW + 5_000 + i * 10_000),
        )
        .saga;
    }
    assert_eq!(saga.branch("charge").unwrap().polls, 3);
    let t = report(saga, &s, "charge", failed("UNAVAILABLE"));
    let at = retry_execute_at(&t.effects, "charge").expect("a retry is scheduled");
    let t = retry_execute(t.saga, &s, "charge", at);
    assert_eq!(t.saga.branch("charge").unwrap().polls, 0);
}

#[test]
fn a_step_that_took_effect_after_it_was_counted_failed_is_reversed_too() {
    let s = order();
    let t = report(started(&s), &s, "charge", failed("CARD_EXPIRED"));
    assert_eq!(reverses(&t.effects), ["reserve"]);
    // reserve's reversal ends the saga REVERSED before charge's late success arrives.
    let t = on_reversal_answered(t.saga, "reserve", succeeded(""), ctx(&s, NOW + 20));
    assert_eq!(t.saga.state, SagaState::Reversed);
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    assert_eq!(t.saga.state, SagaState::Reversing, "reopened for charge");
    assert_eq!(reverses(&t.effects), ["charge"]);
    let t = on_reversal_answered(t.saga, "charge", succeeded(""), ctx(&s, NOW + 30));
    assert_eq!(t.saga.state, SagaState::Reversed);
    assert_eq!(
        signals(&t.effects).len(),
        2,
        "every node is told the end again"
    );
}

#[test]
fn a_step_undone_by_its_node_after_the_saga_completed_needs_attention_and_reprocess_reverses_the_rest()
 {
    let s = order();
    let t = report(started(&s), &s, "reserve", succeeded("RESERVED"));
    let t = report(t.saga, &s, "charge", succeeded("PAID"));
    let t = report(t.saga, &s, "ship", succeeded("SHIPPED"));
    assert_eq!(t.saga.state, SagaState::Completed);
    let undone = Report {
        outcome: Outcome::Reversed,
        ..succeeded("")
    };
    let t = report(t.saga, &s, "reserve", undone);
    assert_eq!(t.saga.state, SagaState::NeedsAttention);
    assert!(t.saga.reason.contains("reserve"), "{}", t.saga.reason);
    let t = on_reprocess(t.saga, NOW + 100).unwrap();
    assert_eq!(t.saga.state, SagaState::Reversing);
    let mut reversed = reverses(&t.effects);
    reversed.sort();
    assert_eq!(reversed, ["charge", "ship"]);
}

#[test]
fn a_saga_stores_a_bounded_number_of_reported_statuses() {
    let s = order();
    let mut saga = started(&s);
    saga.reported = (0..Limits::MAX_REPORTED_STATUSES)
        .map(|i| when("charge", &format!("S{i}")))
        .collect();
    let t = report(saga, &s, "reserve", succeeded("RESERVED"));
    assert_eq!(t.saga.reported.len(), Limits::MAX_REPORTED_STATUSES);
    assert!(!t.saga.reported.contains(&when("reserve", "RESERVED")));
    assert_eq!(
        t.saga.branch("reserve").unwrap().state,
        BranchState::Succeeded,
        "the branch still changes"
    );
}

// A property: random strategies (a chain of stages with fan-out) and random report orders;
// every saga ends COMPLETED or REVERSED once every triggered step answered, and no step is
// ever reversed unless it was triggered; a COMPLETED saga has every step succeeded.
fn chain_strategy(stages: usize, width: usize) -> Strategy {
    let mut steps = Vec::new();
    let mut rules = Vec::new();
    for stage in 0..stages {
        for i in 0..width {
            steps.push(step(&format!("s{stage}_{i}"), &format!("node{i}")));
        }
        if stage > 0 {
            rules.push(Rule {
                when: (0..width)
                    .map(|i| when(&format!("s{}_{i}", stage - 1), "OK"))
                    .collect(),
                trigger: (0..width).map(|i| format!("s{stage}_{i}")).collect(),
            });
        }
    }
    Strategy {
        business_type: "chain".into(),
        version: 1,
        description: String::new(),
        steps,
        first_set: (0..width).map(|i| format!("s0_{i}")).collect(),
        rules,
        end_statuses: vec![when(&format!("s{}_0", stages - 1), "OK")],
        abnormal_statuses: Vec::new(),
        status_mappings: Vec::new(),
        exception_scopes: BTreeMap::new(),
        saga_timeout_ms: 0,
        created_ms: 0,
    }
}

proptest! {
    #[test]
    fn every_saga_ends_completed_or_reversed_and_only_triggered_steps_are_reversed(
        stages in 1usize..4,
        width in 1usize..4,
        picks in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..10), 1..60),
    ) {
        let s = chain_strategy(stages, width);
        let mut saga = started(&s);
        let mut answered: BTreeSet<String> = BTreeSet::new();
        let mut reversed_ever: BTreeSet<String> = BTreeSet::new();
        for (pick, roll) in picks {
            let open: Vec<String> = saga
                .branches
                .iter()
                .filter(|b| matches!(b.state, BranchState::Triggered | BranchState::Reversing))
                .map(|b| b.branch_id.clone())
                .collect();
            if open.is_empty() {
                break;
            }
            let id = open[pick.index(open.len())].clone();
            let effects = if saga.branch(&id).unwrap().state == BranchState::Reversing {
                let t = on_reversal_answered(saga, &id, succeeded("UNDONE"), ctx(&s, NOW));
                saga = t.saga;
                t.effects
            } else {
                let r = if roll == 0 { failed("DECLINED_FOR_GOOD") } else { succeeded("OK") };
                answered.insert(id.clone());
                let t = on_reported(saga, &id, r, ctx(&s, NOW)).unwrap();
                saga = t.saga;
                t.effects
            };
            for b in reverses(&effects) {
                prop_assert!(saga.branch(b).is_some(), "reversed {b}, which was never triggered");
                reversed_ever.insert(b.to_owned());
            }
        }
        // Drain: answer everything still open, successfully.
        loop {
            let open: Vec<(String, BranchState)> = saga
                .branches
                .iter()
                .filter(|b| matches!(b.state, BranchState::Triggered | BranchState::Reversing))
                .map(|b| (b.branch_id.clone(), b.state))
                .collect();
            if open.is_empty() { break; }
            for (id, state) in open {
                let effects = if state == BranchState::Reversing {
                    let t = on_reversal_answered(saga, &id, succeeded("UNDONE"), ctx(&s, NOW));
                    saga = t.saga;
                    t.effects
                } else {
                    let t = on_reported(saga, &id, succeeded("OK"), ctx(&s, NOW)).unwrap();
                    saga = t.saga;
                    t.effects
                };
                for b in reverses(&effects) {
                    prop_assert!(saga.branch(b).is_some());
                }
            }
        }
        prop_assert!(matches!(saga.state, SagaState::Completed | SagaState::Reversed), "ended {:?}", saga.state);
        if saga.state == SagaState::Completed {
            for b in &saga.branches {
                prop_assert_eq!(b.state, BranchState::Succeeded, "{} in a COMPLETED saga", b.branch_id);
            }
        }
        let triggered: BTreeSet<String> = saga.branches.iter().map(|b| b.branch_id.clone()).collect();
        prop_assert!(reversed_ever.is_subset(&triggered));
    }
}

// A property: however failure reports of one step are repeated or delayed, each counted
// failure leads to exactly one resend, sends are numbered 1, 2, 3... with none repeated, and
// the step is given up only after the whole retry budget was sent.
proptest! {
    #[test]
    fn repeated_and_late_failures_never_spend_the_retry_budget_twice(
        ops in proptest::collection::vec((0u8..3, 1u32..8), 1..80),
    ) {
        let s = order();
        let mut saga = started(&s);
        let mut sends = vec![1u32];
        let mut pending_retries = 0usize;
        let mut now = NOW;
        for (op, k) in ops {
            now += 1;
            let branch = saga.branch("charge").unwrap().clone();
            if branch.state != BranchState::Triggered {
                break;
            }
            let effects = match op {
                // A failure with no send named: the latest, or a repeat.
                0 => {
                    let t = on_reported(saga, "charge", failed("UNAVAILABLE"), ctx(&s, now)).unwrap();
                    saga = t.saga;
                    t.effects
                }
                // A failure naming some send made so far (possibly an old one).
                1 => {
                    let named = 1 + (k - 1) % branch.attempts;
                    let t = on_reported(saga, "charge", about(failed("UNAVAILABLE"), named), ctx(&s, now)).unwrap();
                    saga = t.saga;
                    t.effects
                }
                // A scheduled retry comes due.
                _ if pending_retries > 0 => {
                    pending_retries -= 1;
                    let t = retry_execute(saga, &s, "charge", now);
                    saga = t.saga;
                    t.effects
                }
                _ => continue,
            };
            pending_retries += effects
                .iter()
                .filter(|e| matches!(e, Effect::WakeAt { timer: Timer::RetryExecute { .. }, .. }))
                .count();
            prop_assert!(pending_retries <= 1, "one retry waits at most");
            sends.extend(execute_attempts(&effects, "charge"));
            let expected: Vec<u32> = (1..=u32::try_from(sends.len()).unwrap()).collect();
            prop_assert_eq!(&sends, &expected);
            prop_assert_eq!(saga.branch("charge").unwrap().attempts, *sends.last().unwrap());
        }
        if saga.branch("charge").unwrap().state == BranchState::Failed {
            prop_assert_eq!(sends.len(), 1 + retry::Policy::builtin().max_retries as usize);
        }
    }
}
