//! S1 as pure transitions: a saga driven by the outcalls its caller registers, and its
//! reversal. An outcall is registered before it is made, so a crash between the two leaves a
//! branch sagad can query and reverse; its branch id `<order>.<callee>` names the node it went
//! to (S1 item 1).
//!
//! Reversal. External (a request from outside with its own reversal serial): for each branch,
//! what the ledger knows decides (S1 item 3) — FAILED or already reversed: nothing to do;
//! SUCCEEDED: send Reverse (retried by the S5 policy; the first failure tells every node
//! REPROCESS); not known (TRIGGERED or UNKNOWN): ask the node with QueryStatus first, and a
//! node that has no trace of it makes the branch NOT_OCCURRED. The signal follows the asked-for
//! original: REVERSAL_FAILURE when it never happened, REVERSAL_SUCCESS otherwise.
//! Internal (S1 item 4): the outcalls are reversed one at a time in descending order, and the
//! failed or unknown one is sent Reverse too, so its node either undoes it or records that it
//! never happened (its barrier's null compensation) — either way it is settled. When nothing is
//! outstanding, every node of the saga is told the signal.

use crate::domain::Millis;
use crate::domain::branch::{Branch, BranchState, Outcome, Report, Signal, Status};
use crate::domain::orchestration::{
    self, Effect, Env, Timer, Transition, apply_reversal_answer, outcome_name, resend_reversal,
    signal_every_node, start_reversing,
};
use crate::domain::saga::{Limits, ReversalType, Saga, SagaMode, SagaState};

/// An outcall as its caller registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcall {
    pub caller_node_id: String,
    pub callee_node_id: String,
    pub forward_action: String,
    pub reversal_action: String,
    pub order: u32,
}

/// A reversal as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReversalAsked {
    pub reversal_type: ReversalType,
    /// Empty: the whole saga.
    pub branch_id: String,
    pub serial: String,
    pub reason: String,
}

/// Why an outcall event was refused; nothing changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotOutcallSaga,
    NotRunning { state: SagaState },
    OrderTaken { order: u32, branch_id: String },
    UnknownBranch { branch_id: String },
    NotAllSucceeded { branches: Vec<String> },
    Completed,
    TooManyOutcalls { max: usize },
    TooManySerials { max: usize },
}

/// `<order>.<callee>`: the callee can always be read back from a branch id.
pub fn branch_id(order: u32, callee_node_id: &str) -> String {
    format!("{order}.{callee_node_id}")
}

/// S1 item 1: the node an outcall went to, parsed from its branch id.
pub fn callee_of(branch_id: &str) -> Option<&str> {
    let (order, callee) = branch_id.split_once('.')?;
    (order.parse::<u32>().is_ok() && !callee.is_empty()).then_some(callee)
}

fn require_outcalls(saga: &Saga) -> Result<(), Refusal> {
    match saga.mode {
        SagaMode::RegisteredOutcalls => Ok(()),
        SagaMode::Orchestrated => Err(Refusal::NotOutcallSaga),
    }
}

pub fn on_outcall_registered(
    mut saga: Saga,
    outcall: Outcall,
    now: Millis,
) -> Result<Transition, Refusal> {
    require_outcalls(&saga)?;
    if saga.state != SagaState::Running {
        return Err(Refusal::NotRunning { state: saga.state });
    }
    if let Some(taken) = saga.branches.iter().find(|b| b.order == outcall.order) {
        return Err(Refusal::OrderTaken {
            order: outcall.order,
            branch_id: taken.branch_id.clone(),
        });
    }
    if saga.branches.len() >= Limits::MAX_OUTCALLS {
        return Err(Refusal::TooManyOutcalls {
            max: Limits::MAX_OUTCALLS,
        });
    }
    let id = branch_id(outcall.order, &outcall.callee_node_id);
    let mut branch = Branch {
        branch_id: id,
        node_id: outcall.callee_node_id,
        caller_node_id: outcall.caller_node_id,
        forward_action: outcall.forward_action,
        reversal_action: outcall.reversal_action,
        order: outcall.order,
        state: BranchState::Triggered,
        last_status: None,
        error_code: String::new(),
        message: String::new(),
        attempts: 1,
        retry_at_ms: None,
        earlier_reversal_sends: 0,
        created_ms: now,
        updated_ms: now,
        last_poll_outcome: None,
        last_poll_ms: 0,
        polls: 0,
        timeout_ms: 0,
        timeline: Vec::new(),
    };
    branch.note(
        now,
        format!(
            "registered by {}: {} on {}",
            branch.caller_node_id, branch.forward_action, branch.node_id
        ),
    );
    saga.branches.push(branch);
    saga.branches.sort_by_key(|b| b.order);
    saga.updated_ms = now;
    Ok(Transition {
        saga,
        effects: Vec::new(),
    })
}

/// A report about an outcall's forward action (from its caller or callee, or a poll's answer).
pub fn on_outcall_reported(
    mut saga: Saga,
    branch_id: &str,
    report: Report,
    polled: bool,
    env: Env<'_>,
) -> Result<Transition, Refusal> {
    require_outcalls(&saga)?;
    let saga_state = saga.state;
    let Some(branch) = saga.branch_mut(branch_id) else {
        return Err(Refusal::UnknownBranch {
            branch_id: branch_id.to_owned(),
        });
    };
    let mut effects = Vec::new();
    if polled {
        branch.last_poll_outcome = Some(report.outcome);
        branch.last_poll_ms = env.now;
    }
    match branch.state {
        BranchState::Reversing
        | BranchState::Reversed
        | BranchState::ReversalFailed
        | BranchState::NotOccurred => {
            branch.note(
                env.now,
                format!(
                    "late report {} ignored: the branch is being or was reversed",
                    outcome_name(report.outcome)
                ),
            );
        }
        // The participant guide's race: a poll found no trace of a forward action still on
        // its way, so the node reversed it, and it then arrived and was refused. Every other
        // node was told COMPLETED, so sagad cannot decide alone: an operator's ReprocessSaga
        // reverses the other outcalls (as for orchestrated sagas).
        BranchState::Succeeded
            if saga_state == SagaState::Completed && report.outcome == Outcome::Reversed =>
        {
            branch.note(
                env.now,
                "reported REVERSED after the saga completed: undone by its node",
            );
            // The node says so; ReprocessSaga then reverses only the others.
            branch.state = BranchState::Reversed;
            let node_id = branch.node_id.clone();
            saga.state = SagaState::NeedsAttention;
            saga.reason = format!(
                "outcall {branch_id} was undone by node {node_id} after the saga completed; \
                 ReprocessSaga reverses the saga's other outcalls"
            );
            saga.signal = Some(Signal::Reprocess);
            effects.extend(signal_every_node(&saga, Signal::Reprocess));
        }
        // Every node was told the saga completed, with every branch SUCCEEDED: a contrary
        // report cannot change that, only go on the branch's timeline for an operator.
        _ if saga_state == SagaState::Completed
            && !matches!(report.outcome, Outcome::Succeeded | Outcome::Processing) =>
        {
            branch.note(
                env.now,
                format!(
                    "late report {} ignored: the saga completed and every node was told so",
                    outcome_name(report.outcome)
                ),
            );
        }
        // The forward action took effect: that is final, as for a strategy step. A contrary
        // word that comes later (a caller whose call timed out reporting FAILED, a node that
        // lost track of it answering NOT_FOUND) must not mark it undone, or an external
        // reversal would pass over what it booked and tell every node the saga is reversed.
        BranchState::Succeeded
            if !matches!(report.outcome, Outcome::Succeeded | Outcome::Reversed) =>
        {
            branch.note(
                env.now,
                format!(
                    "late report {} ignored: the outcall already SUCCEEDED; report REVERSED \
                     if its node undid it",
                    outcome_name(report.outcome)
                ),
            );
        }
        BranchState::Triggered
        | BranchState::Unknown
        | BranchState::Succeeded
        | BranchState::Failed => {
            branch.message = report.message.clone();
            match report.outcome {
                Outcome::Succeeded => branch.state = BranchState::Succeeded,
                Outcome::Failed => {
                    branch.state = BranchState::Failed;
                    branch.error_code = report.error_code.clone();
                }
                Outcome::NotFound => branch.state = BranchState::NotOccurred,
                Outcome::Reversed => branch.state = BranchState::Reversed,
                Outcome::Processing => {}
                Outcome::Unknown => {
                    if branch.state == BranchState::Triggered {
                        branch.state = BranchState::Unknown;
                        effects.extend(ask(branch, env));
                    }
                }
            }
            if let Some(status) = named_status(&report) {
                branch.last_status = Some(status);
            }
            branch.note(
                env.now,
                format!("reported {}", outcome_name(report.outcome)),
            );
        }
    }
    // An external reversal ends without reversing an outcall reported FAILED (S1: the
    // original failed). If that outcall turns out to have taken effect after all, what it
    // booked must not stay: the reversal opens again for it (and every node is told the end
    // again once it is undone, or to wait if it cannot be).
    let took_effect_after_all = saga_state == SagaState::Reversed
        && saga
            .branch(branch_id)
            .is_some_and(|b| b.state == BranchState::Succeeded);
    if took_effect_after_all {
        saga.state = SagaState::Reversing;
        if let Some(branch) = saga.branch_mut(branch_id) {
            branch.note(
                env.now,
                "took effect after the saga was reversed: reversing it",
            );
        }
    }
    if saga_state == SagaState::Reversing || took_effect_after_all {
        effects.extend(advance(&mut saga, env));
    }
    saga.updated_ms = env.now;
    Ok(Transition { saga, effects })
}

/// The status a report gives its branch, named as orchestrated sagas name it: a status with
/// parameters but no name is named after the outcome (a nameless status is stored as none, so
/// its parameters would be lost), and one with neither is no status.
fn named_status(report: &Report) -> Option<Status> {
    let status = report.status.as_ref()?;
    if !status.name.is_empty() {
        return Some(status.clone());
    }
    (!status.parameters.is_empty()).then(|| Status {
        name: outcome_name(report.outcome).to_owned(),
        parameters: status.parameters.clone(),
    })
}

/// Query the branch's node about it, and keep asking (S4).
fn ask(branch: &mut Branch, env: Env<'_>) -> Vec<Effect> {
    branch.note(env.now, "outcome unknown: asking the node");
    vec![
        Effect::QueryStatus {
            branch_id: branch.branch_id.clone(),
        },
        Effect::WakeAt {
            at_ms: env
                .now
                .saturating_add(env.policy.retry_delay_ms(branch.polls.max(1), env.jitter)),
            timer: Timer::Poll {
                branch_id: branch.branch_id.clone(),
            },
        },
    ]
}

pub fn on_reversal_requested(
    mut saga: Saga,
    asked: ReversalAsked,
    env: Env<'_>,
) -> Result<Transition, Refusal> {
    require_outcalls(&saga)?;
    if !asked.branch_id.is_empty() && saga.branch(&asked.branch_id).is_none() {
        return Err(Refusal::UnknownBranch {
            branch_id: asked.branch_id,
        });
    }
    if saga.state == SagaState::Completed {
        return Err(Refusal::Completed);
    }
    let mut changed = false;
    if !asked.serial.is_empty() && !saga.reversal_serials.contains(&asked.serial) {
        if saga.reversal_serials.len() >= Limits::MAX_REVERSAL_SERIALS {
            return Err(Refusal::TooManySerials {
                max: Limits::MAX_REVERSAL_SERIALS,
            });
        }
        saga.reversal_serials.push(asked.serial.clone());
        changed = true;
    }
    let mut effects = Vec::new();
    if saga.state == SagaState::Running {
        changed = true;
        saga.state = SagaState::Reversing;
        saga.reversal_type = Some(asked.reversal_type);
        saga.reversal_target = asked.branch_id;
        saga.reason = if asked.reason.is_empty() {
            match asked.reversal_type {
                ReversalType::External => "an external reversal was requested".to_owned(),
                ReversalType::Internal => "an internal reversal was requested".to_owned(),
            }
        } else {
            asked.reason
        };
        effects = advance(&mut saga, env);
    }
    // Already reversing or ended: the reversal under way answers this request too. A request
    // that changes nothing (a serial known already) leaves the saga's last change where it
    // was: it is what the saga's retention counts from.
    if changed {
        saga.updated_ms = env.now;
    }
    Ok(Transition { saga, effects })
}

/// An operator re-drives an outcall saga that needs attention. One whose failed reversals wait
/// gets them sent again with a fresh budget (as an orchestrated saga); one that completed and
/// then had an outcall undone by its node is reversed internally, one outcall at a time from
/// the highest order down, as every internal reversal of an outcall saga is.
pub fn on_outcall_reprocess(mut saga: Saga, env: Env<'_>) -> Option<Transition> {
    if saga.state != SagaState::NeedsAttention {
        return None;
    }
    if saga
        .branches
        .iter()
        .any(|b| b.state == BranchState::ReversalFailed)
    {
        return crate::domain::orchestration::on_reprocess(saga, env.now);
    }
    saga.state = SagaState::Reversing;
    saga.reversal_type = Some(ReversalType::Internal);
    saga.reversal_target.clear();
    let effects = advance(&mut saga, env);
    saga.updated_ms = env.now;
    Some(Transition { saga, effects })
}

/// Moves the reversal on: the highest-order branch that needs something gets it; when nothing
/// is outstanding, the saga ends and every node is told.
fn advance(saga: &mut Saga, env: Env<'_>) -> Vec<Effect> {
    if saga.state != SagaState::Reversing {
        return Vec::new();
    }
    let external = saga.reversal_type == Some(ReversalType::External);
    let reason = saga.reason.clone();
    let mut order: Vec<usize> = (0..saga.branches.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(saga.branches[i].order));
    for i in order {
        let branch = &mut saga.branches[i];
        match branch.state {
            BranchState::Reversed | BranchState::NotOccurred | BranchState::ReversalFailed => {
                continue;
            }
            // One at a time: wait for this one before the next lower one.
            BranchState::Reversing => return Vec::new(),
            BranchState::Failed if external => continue,
            // Still asking its node; past the poll budget only Reverse can settle it.
            BranchState::Unknown if external && branch.polls < env.policy.max_polls => {
                return Vec::new();
            }
            BranchState::Triggered if external => {
                branch.state = BranchState::Unknown;
                return ask(branch, env);
            }
            BranchState::Succeeded
            | BranchState::Failed
            | BranchState::Triggered
            | BranchState::Unknown => {
                if branch.reversal_action.is_empty() {
                    branch.note(
                        env.now,
                        "nothing to reverse: the outcall has no reversal action",
                    );
                    branch.state = BranchState::Reversed;
                    continue;
                }
                return vec![start_reversing(branch, env.now, &reason, "reversing")];
            }
        }
    }
    settle(saga)
}

fn settle(saga: &mut Saga) -> Vec<Effect> {
    if saga
        .branches
        .iter()
        .any(|b| b.state == BranchState::ReversalFailed)
    {
        saga.state = SagaState::NeedsAttention;
        saga.signal = Some(Signal::Reprocess);
        return signal_every_node(saga, Signal::Reprocess);
    }
    let signal = match saga.reversal_type {
        Some(reversal_type) => reversal_answer(saga, reversal_type, &saga.reversal_target),
        None => Signal::ReversalSuccess,
    };
    saga.state = SagaState::Reversed;
    saga.signal = Some(signal);
    signal_every_node(saga, signal)
}

/// The S1 answer to a reversal request of a saga whose reversal has ended: REVERSAL_FAILURE
/// if what it asked about never happened (an external request's own original, `branch_id`;
/// without one, every outcall of the saga), REVERSAL_SUCCESS otherwise. The saga's signal is
/// this answer for the request that started the reversal; every later request is answered by
/// the same rule for what it asked about, not by the first request's answer.
pub fn reversal_answer(saga: &Saga, reversal_type: ReversalType, branch_id: &str) -> Signal {
    let never_happened = match reversal_type {
        ReversalType::External if !branch_id.is_empty() => saga
            .branch(branch_id)
            .is_some_and(|b| b.state == BranchState::NotOccurred),
        ReversalType::External => {
            !saga.branches.is_empty()
                && saga
                    .branches
                    .iter()
                    .all(|b| b.state == BranchState::NotOccurred)
        }
        ReversalType::Internal => false,
    };
    if never_happened {
        Signal::ReversalFailure
    } else {
        Signal::ReversalSuccess
    }
}

/// The node's answer to a Reverse of an outcall.
pub fn on_outcall_reversal_answered(
    mut saga: Saga,
    branch_id: &str,
    report: Report,
    env: Env<'_>,
) -> Transition {
    let mut effects = apply_reversal_answer(&mut saga, branch_id, report, env);
    effects.extend(advance(&mut saga, env));
    saga.updated_ms = env.now;
    Transition { saga, effects }
}

/// CompleteSaga: every outcall succeeded, so the saga is done everywhere.
pub fn on_completed(mut saga: Saga, now: Millis) -> Result<Transition, Refusal> {
    require_outcalls(&saga)?;
    match saga.state {
        SagaState::Completed => {
            return Ok(Transition {
                saga,
                effects: Vec::new(),
            });
        }
        SagaState::Running => {}
        state @ (SagaState::Reversing | SagaState::Reversed | SagaState::NeedsAttention) => {
            return Err(Refusal::NotRunning { state });
        }
    }
    let unfinished: Vec<String> = saga
        .branches
        .iter()
        .filter(|b| b.state != BranchState::Succeeded)
        .map(|b| b.branch_id.clone())
        .collect();
    if !unfinished.is_empty() {
        return Err(Refusal::NotAllSucceeded {
            branches: unfinished,
        });
    }
    saga.state = SagaState::Completed;
    saga.signal = Some(Signal::Completed);
    saga.updated_ms = now;
    let effects = signal_every_node(&saga, Signal::Completed);
    Ok(Transition { saga, effects })
}

/// Start of an outcall saga: nothing to trigger (its caller registers the outcalls), but its
/// deadline is armed, so a caller that dies before CompleteSaga or RequestReversal does not
/// leave what it booked in place forever.
pub fn on_outcall_saga_started(saga: Saga) -> Transition {
    let effects = saga
        .deadline_ms
        .map(|at_ms| Effect::WakeAt {
            at_ms,
            timer: Timer::Deadline,
        })
        .into_iter()
        .collect();
    Transition { saga, effects }
}

/// A timer of an outcall saga came due.
pub fn on_outcall_timer(mut saga: Saga, timer: &Timer, env: Env<'_>) -> Transition {
    let effects = match timer {
        Timer::Deadline if saga.state == SagaState::Running => {
            saga.state = SagaState::Reversing;
            saga.reversal_type = Some(ReversalType::Internal);
            saga.reason = "the saga's deadline passed".to_owned();
            advance(&mut saga, env)
        }
        Timer::Poll { branch_id } => {
            let mut effects = Vec::new();
            if let Some(branch) = saga.branch_mut(branch_id)
                && branch.state == BranchState::Unknown
            {
                branch.polls += 1;
                if branch.polls >= env.policy.max_polls {
                    // The node never says: send Reverse, which its barrier answers either by
                    // undoing the outcall or by recording that it never happened.
                    branch.note(
                        env.now,
                        "the node never answered its polls: reversing to settle it",
                    );
                    if saga.state == SagaState::Running {
                        saga.state = SagaState::Reversing;
                        saga.reversal_type = Some(ReversalType::Internal);
                        saga.reason = format!("the outcome of outcall {branch_id} stayed unknown");
                    }
                    effects = advance(&mut saga, env);
                } else {
                    effects = ask(branch, env);
                }
            }
            effects
        }
        Timer::RetryReversal { branch_id } => resend_reversal(&mut saga, branch_id, env.now),
        Timer::Deadline | Timer::StepTimeout { .. } | Timer::RetryExecute { .. } => Vec::new(),
    };
    saga.updated_ms = env.now;
    Transition { saga, effects }
}

/// Re-drives a saga in NEEDS_ATTENTION (both ways of running a saga share it).
pub fn on_reprocess(saga: Saga, now: Millis) -> Option<Transition> {
    orchestration::on_reprocess(saga, now)
}

#[cfg(test)]
mod tests;
