//! S2 as pure transitions: a saga driven by its fulfillment strategy. Each function takes the
//! saga, one event and the time, and returns the new saga with the effects the shell must carry
//! out (commands to nodes, signals, timers). Nothing here does I/O or reads a clock.
//!
//! The rules: start triggers the first set; each reported status is recognised (S2 item 5) as
//! normal (stored, and it fires every rule whose conditions are now all reported — a join fires
//! once its last condition arrives), end (the saga completes and every node is told) or abnormal
//! (the triggered steps in the reporting step's exception scope are reversed, then every node is
//! told). A step is triggered at most once per saga; a step that stays silent past its timeout
//! is polled with QueryStatus; a saga past its deadline is reversed.

use crate::domain::Millis;
use crate::domain::branch::{Branch, BranchState, Outcome, Report, Signal, Status};
use crate::domain::retry::{self, Redelivery};
use crate::domain::saga::{Limits, Saga, SagaState};
use crate::domain::strategy::{Meaning, StepStatus, Strategy};

/// What the shell must do after a transition is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send the branch's forward action to its node, as send number `attempt` of it.
    Execute { branch_id: String, attempt: u32 },
    /// Send the branch's reversal action to its node, as send number `attempt` of it.
    Reverse {
        branch_id: String,
        reason: String,
        attempt: u32,
    },
    /// Ask the branch's node what happened to its forward action.
    QueryStatus { branch_id: String },
    /// Tell one node how the saga ended.
    Signal {
        node_id: String,
        signal: Signal,
        reason: String,
    },
    /// Deliver `timer` to `on_timer` at `at_ms`. A step's timeout armed together with the
    /// Execute it times is needed only while that command is unanswered, so the shell may keep
    /// it with the command instead of storing it on its own; every later timeout (after a
    /// PROCESSING answer) is armed anew.
    WakeAt { at_ms: Millis, timer: Timer },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The step has had its time to report (for the given attempt; a later attempt re-arms it).
    StepTimeout { branch_id: String, attempt: u32 },
    /// Send a forward action that failed with a retryable code again (S5).
    RetryExecute { branch_id: String },
    /// Ask an UNKNOWN branch's node again.
    Poll { branch_id: String },
    /// Send a failed reversal again.
    RetryReversal { branch_id: String },
    /// The saga's deadline.
    Deadline,
}

/// How patient the saga is; the shell fills it from configuration (S5 policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Polls of an UNKNOWN branch before its node is given up on and the saga is reversed.
    pub max_polls: u32,
    /// Delay before the n-th poll, or re-ask of a reversal still processing: base ×
    /// factor^(n-1), at most cap, jittered. Failures are retried by the S5 policy instead.
    pub retry_base_ms: Millis,
    pub retry_factor: f64,
    pub retry_cap_ms: Millis,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            max_polls: 10,
            retry_base_ms: 1_000,
            retry_factor: 2.0,
            retry_cap_ms: 60_000,
        }
    }
}

impl Policy {
    /// The delay before resend number `attempt` (1-based). `jitter` in [0, 1) spreads resends
    /// between the floor (`retry_base_ms`) and the exponential value, so many sagas failing at
    /// once do not come back at once; the result never leaves [base, cap].
    pub fn retry_delay_ms(&self, attempt: u32, jitter: f64) -> Millis {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = (self.retry_base_ms as f64) * self.retry_factor.max(1.0).powi(exponent);
        let ceiling = grown
            .min(self.retry_cap_ms as f64)
            .max(self.retry_base_ms as f64);
        let floor = self.retry_base_ms as f64;
        let jitter = jitter.clamp(0.0, 1.0);
        (floor + (ceiling - floor) * jitter) as Millis
    }
}

/// What every transition may consult besides the saga: the time, the policy, the retry
/// configuration (S5), and a jitter number drawn by the shell.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    pub now: Millis,
    pub policy: Policy,
    pub retry: &'a retry::Config,
    pub jitter: f64,
}

/// An orchestrated saga's context: its strategy and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub strategy: &'a Strategy,
    pub now: Millis,
    pub policy: Policy,
    pub retry: &'a retry::Config,
    pub jitter: f64,
}

impl<'a> Context<'a> {
    pub fn env(&self) -> Env<'a> {
        Env {
            now: self.now,
            policy: self.policy,
            retry: self.retry,
            jitter: self.jitter,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub saga: Saga,
    pub effects: Vec<Effect>,
}

/// Why a report was refused; nothing changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The strategy has no such step.
    UnknownStep { branch_id: String },
    /// The step exists but was not triggered in this saga.
    NotTriggered { branch_id: String },
}

/// A status a report carries; a report without one is named after its outcome, so rules can
/// wait for a plain success (`when: reserve SUCCEEDED`).
fn status_of(report: &Report) -> Status {
    match &report.status {
        Some(status) if !status.name.is_empty() => status.clone(),
        _ => Status {
            name: outcome_name(report.outcome).to_owned(),
            parameters: report
                .status
                .as_ref()
                .map(|s| s.parameters.clone())
                .unwrap_or_default(),
        },
    }
}

pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "SUCCEEDED",
        Outcome::Failed => "FAILED",
        Outcome::Processing => "PROCESSING",
        Outcome::Unknown => "UNKNOWN",
        Outcome::NotFound => "NOT_FOUND",
        Outcome::Reversed => "REVERSED",
    }
}

/// Start: trigger the first set (S2 item 2) and arm the deadline.
pub fn on_started(mut saga: Saga, ctx: Context<'_>) -> Transition {
    saga.strategy_version = ctx.strategy.version;
    let mut effects = trigger(&mut saga, ctx, &ctx.strategy.first_set);
    if let Some(at_ms) = saga.deadline_ms {
        effects.push(Effect::WakeAt {
            at_ms,
            timer: Timer::Deadline,
        });
    }
    saga.updated_ms = ctx.now;
    Transition { saga, effects }
}

/// Triggers the given steps, each at most once per saga.
fn trigger(saga: &mut Saga, ctx: Context<'_>, step_ids: &[String]) -> Vec<Effect> {
    let mut effects = Vec::new();
    for step_id in step_ids {
        if saga.branch(step_id).is_some() {
            continue;
        }
        let Some(step) = ctx.strategy.step(step_id) else {
            continue;
        };
        let mut branch = Branch {
            branch_id: step.id.clone(),
            node_id: step.node_id.clone(),
            caller_node_id: String::new(),
            forward_action: step.forward_action.clone(),
            reversal_action: step.reversal_action.clone(),
            order: 0,
            state: BranchState::Triggered,
            last_status: None,
            error_code: String::new(),
            message: String::new(),
            attempts: 1,
            retry_at_ms: None,
            earlier_reversal_sends: 0,
            created_ms: ctx.now,
            updated_ms: ctx.now,
            last_poll_outcome: None,
            last_poll_ms: 0,
            polls: 0,
            timeout_ms: step.timeout_ms,
            timeline: Vec::new(),
        };
        branch.note(
            ctx.now,
            format!(
                "triggered: execute {} on {}",
                step.forward_action, step.node_id
            ),
        );
        effects.push(Effect::Execute {
            branch_id: step.id.clone(),
            attempt: 1,
        });
        effects.push(Effect::WakeAt {
            at_ms: ctx.now.saturating_add(step.timeout_ms),
            timer: Timer::StepTimeout {
                branch_id: step.id.clone(),
                attempt: 1,
            },
        });
        saga.branches.push(branch);
    }
    effects
}

/// A report about a branch's forward action (Execute's answer, ReportState, or a poll's answer).
pub fn on_reported(
    mut saga: Saga,
    branch_id: &str,
    report: Report,
    ctx: Context<'_>,
) -> Result<Transition, Refusal> {
    if saga.branch(branch_id).is_none() {
        return Err(if ctx.strategy.step(branch_id).is_some() {
            Refusal::NotTriggered {
                branch_id: branch_id.to_owned(),
            }
        } else {
            Refusal::UnknownStep {
                branch_id: branch_id.to_owned(),
            }
        });
    }
    let effects = apply_forward_report(&mut saga, branch_id, report, ctx);
    saga.updated_ms = ctx.now;
    Ok(Transition { saga, effects })
}

/// The answer to a QueryStatus poll (S4): recorded on the branch, then judged like a report.
pub fn on_polled(
    saga: Saga,
    branch_id: &str,
    report: Report,
    ctx: Context<'_>,
) -> Result<Transition, Refusal> {
    let mut saga = saga;
    if let Some(branch) = saga.branch_mut(branch_id) {
        branch.last_poll_outcome = Some(report.outcome);
        branch.last_poll_ms = ctx.now;
        // Polls go out only while the step is UNKNOWN. Found TRIGGERED, a retry was sent since,
        // so a poll's answer that the action did not take effect is about an earlier send and
        // must not count against the one now out; that the action took effect still counts.
        if branch.state == BranchState::Triggered
            && !matches!(report.outcome, Outcome::Succeeded | Outcome::Reversed)
        {
            branch.note(
                ctx.now,
                format!(
                    "poll answer {} ignored: it is about an earlier send than send {}",
                    outcome_name(report.outcome),
                    branch.attempts
                ),
            );
            saga.updated_ms = ctx.now;
            return Ok(Transition {
                saga,
                effects: Vec::new(),
            });
        }
    }
    on_reported(saga, branch_id, report, ctx)
}

fn apply_forward_report(
    saga: &mut Saga,
    branch_id: &str,
    report: Report,
    ctx: Context<'_>,
) -> Vec<Effect> {
    let running = saga.state == SagaState::Running;
    let status = status_of(&report);
    let Some(branch) = saga.branch_mut(branch_id) else {
        return Vec::new();
    };
    match branch.state {
        // A reversal owns the branch now; a late forward report changes nothing.
        BranchState::Reversing
        | BranchState::Reversed
        | BranchState::ReversalFailed
        | BranchState::NotOccurred => {
            branch.note(
                ctx.now,
                format!(
                    "late report {} ignored: the branch is being or was reversed",
                    outcome_name(report.outcome)
                ),
            );
            return Vec::new();
        }
        BranchState::Triggered
        | BranchState::Unknown
        | BranchState::Succeeded
        | BranchState::Failed => {}
    }
    // A success is final: the action took effect, and a contrary answer after it (a poll's
    // answer about an earlier send, or a confused repeat) must not turn it into a failure the
    // reversal would then skip. Only the node undoing it (REVERSED) changes the branch again.
    if branch.state == BranchState::Succeeded
        && !matches!(report.outcome, Outcome::Succeeded | Outcome::Reversed)
    {
        branch.note(
            ctx.now,
            format!(
                "report {} ignored: the step already succeeded, which is final",
                outcome_name(report.outcome)
            ),
        );
        return Vec::new();
    }
    if !report.answers_pending_send(branch) && report.outcome != Outcome::Succeeded {
        let about = report.attempt.unwrap_or(branch.attempts);
        branch.note(
            ctx.now,
            format!(
                "late or repeated report {} about send {about} ignored: {}",
                outcome_name(report.outcome),
                superseded_because(branch)
            ),
        );
        return Vec::new();
    }
    let mut effects = Vec::new();
    let previous = branch.state;
    branch.message = report.message.clone();
    match report.outcome {
        Outcome::Processing => {
            branch.note(ctx.now, "processing");
            // Armed again from this answer: the first timeout may have lived only as long as
            // the command it rode with (see `Effect::WakeAt`), which is answered now. Without a
            // restart the earlier one still fires first, and this one then finds the step no
            // longer waiting.
            if running && branch.state == BranchState::Triggered {
                effects.push(Effect::WakeAt {
                    at_ms: ctx.now.saturating_add(branch.timeout_ms),
                    timer: Timer::StepTimeout {
                        branch_id: branch_id.to_owned(),
                        attempt: branch.attempts,
                    },
                });
            }
            return effects;
        }
        Outcome::Unknown => {
            if branch.state == BranchState::Triggered {
                branch.state = BranchState::Unknown;
                branch.note(ctx.now, "outcome unknown: asking the node");
                effects.push(Effect::QueryStatus {
                    branch_id: branch_id.to_owned(),
                });
                effects.push(Effect::WakeAt {
                    at_ms: ctx.now.saturating_add(branch.timeout_ms),
                    timer: Timer::Poll {
                        branch_id: branch_id.to_owned(),
                    },
                });
            }
            return effects;
        }
        Outcome::Succeeded => branch.state = BranchState::Succeeded,
        Outcome::Failed => {
            branch.error_code = report.error_code.clone();
            // S5: the policy for this action on this node decides whether a failure is final.
            let resolved = retry::resolve(ctx.retry, &branch.forward_action, &branch.node_id);
            let made = branch.attempts.saturating_sub(1);
            match retry::redelivery(&resolved, &report.error_code, made, ctx.now, ctx.jitter) {
                Redelivery::RetryAt(at_ms)
                    if running
                        && matches!(
                            branch.state,
                            BranchState::Triggered | BranchState::Unknown
                        ) =>
                {
                    // While the retry waits, the failed send's timeout is stale and cannot turn
                    // the branch UNKNOWN, and a repeat of this failure is not counted again. A
                    // step whose timeout had already made it UNKNOWN is now known to have
                    // failed: the same failure is retried whether it came before or after
                    // the timeout (its polls stop, as they poll only UNKNOWN steps).
                    branch.state = BranchState::Triggered;
                    branch.retry_at_ms = Some(at_ms);
                    branch.note(
                        ctx.now,
                        format!(
                            "failed ({}): retrying as attempt {}",
                            report.error_code,
                            branch.attempts.saturating_add(1)
                        ),
                    );
                    effects.push(Effect::WakeAt {
                        at_ms,
                        timer: Timer::RetryExecute {
                            branch_id: branch_id.to_owned(),
                        },
                    });
                    return effects;
                }
                Redelivery::RetryAt(_) => {}
                Redelivery::GiveUp(give_up) => {
                    branch.note(ctx.now, format!("not retried: {}", give_up.reason()))
                }
            }
            branch.state = BranchState::Failed;
        }
        Outcome::NotFound => branch.state = BranchState::NotOccurred,
        Outcome::Reversed => branch.state = BranchState::Reversed,
    }
    // The branch is decided: a retry that was waiting (a success of an earlier send came after
    // its failure) has nothing left to do.
    branch.retry_at_ms = None;
    branch.last_status = Some(status.clone());
    branch.note(
        ctx.now,
        format!("reported {} {}", outcome_name(report.outcome), status.name),
    );
    if !running {
        effects.extend(after_the_end(
            saga,
            branch_id,
            previous,
            report.outcome,
            ctx,
        ));
        return effects;
    }
    let meaning = match report.outcome {
        Outcome::Succeeded => ctx
            .strategy
            .meaning_of(branch_id, &status.name, &status.parameters),
        // The forward action did not take effect: the flow cannot go on as planned.
        Outcome::Failed | Outcome::NotFound | Outcome::Reversed => Meaning::Abnormal,
        Outcome::Processing | Outcome::Unknown => return effects,
    };
    let reported = StepStatus {
        step_id: branch_id.to_owned(),
        status: status.name.clone(),
    };
    if saga.reported.len() < Limits::MAX_REPORTED_STATUSES || saga.reported.contains(&reported) {
        saga.reported.insert(reported);
    } else if let Some(branch) = saga.branch_mut(branch_id) {
        branch.note(
            ctx.now,
            format!(
                "status {} not stored for rules: the saga already stored {} statuses",
                status.name,
                Limits::MAX_REPORTED_STATUSES
            ),
        );
    }
    match meaning {
        // Once the end is reached no further stage is released; the steps still out are
        // only waited for.
        Meaning::Normal if !end_reached(saga, ctx.strategy) => {
            effects.extend(fire_rules(saga, ctx))
        }
        Meaning::Normal | Meaning::End => {}
        Meaning::Abnormal => {
            let reason = match report.outcome {
                Outcome::Failed => format!("step {branch_id} failed ({})", report.error_code),
                Outcome::NotFound => format!("step {branch_id} never happened on its node"),
                _ => format!("step {branch_id} reported abnormal status {}", status.name),
            };
            effects.extend(begin_reversal(
                saga,
                ctx,
                &ctx.strategy.exception_scope(branch_id),
                reason,
            ));
            return effects;
        }
    }
    effects.extend(finish_if_settled(saga, branch_id, ctx));
    effects
}

/// Whether a step reported an end status (S2 item 4) that still stands.
fn end_reached(saga: &Saga, strategy: &Strategy) -> bool {
    saga.branches.iter().any(|b| {
        b.state == BranchState::Succeeded
            && b.last_status.as_ref().is_some_and(|s| {
                strategy.meaning_of(&b.branch_id, &s.name, &s.parameters) == Meaning::End
            })
    })
}

/// After a running saga's step reported normally: the saga completes once an end status was
/// reported and no step is still out (a parallel step that fails later must be able to reverse
/// the saga, not find it COMPLETED). With nothing out and no end it waits: a step may report
/// further statuses (PICKED, then PACKED), and only its deadline ends the wait by itself
/// (ListStuck shows such a saga as STALLED).
fn finish_if_settled(saga: &mut Saga, branch_id: &str, ctx: Context<'_>) -> Vec<Effect> {
    let outstanding: Vec<String> = saga
        .branches
        .iter()
        .filter(|b| matches!(b.state, BranchState::Triggered | BranchState::Unknown))
        .map(|b| b.branch_id.clone())
        .collect();
    let ended = end_reached(saga, ctx.strategy);
    if !outstanding.is_empty() {
        if ended && let Some(branch) = saga.branch_mut(branch_id) {
            branch.note(
                ctx.now,
                format!("the saga completes once {} settle", outstanding.join(", ")),
            );
        }
        return Vec::new();
    }
    if ended {
        return complete(saga, ctx.now);
    }
    Vec::new()
}

/// A forward report that arrives once the saga no longer runs changes no stage, but two
/// answers still matter. A step counted as failed that took effect after all is reversed too
/// (the reversal skipped it), reopening a REVERSED saga. A step of a COMPLETED saga that its
/// node undid breaks "done everywhere": the saga needs an operator, whose ReprocessSaga then
/// reverses its other steps.
fn after_the_end(
    saga: &mut Saga,
    branch_id: &str,
    previous: BranchState,
    outcome: Outcome,
    ctx: Context<'_>,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    match (saga.state, previous, outcome) {
        (
            SagaState::Reversing | SagaState::Reversed | SagaState::NeedsAttention,
            BranchState::Failed,
            Outcome::Succeeded,
        ) => {
            let reason = saga.reason.clone();
            let Some(branch) = saga.branch_mut(branch_id) else {
                return effects;
            };
            if branch.reversal_action.is_empty() {
                branch.note(
                    ctx.now,
                    "took effect after the saga began reversing; it has no reversal action",
                );
                return effects;
            }
            effects.push(start_reversing(
                branch,
                ctx.now,
                &reason,
                "took effect after the saga began reversing: reversing it too",
            ));
            if saga.state == SagaState::Reversed {
                saga.state = SagaState::Reversing;
            }
        }
        (SagaState::Completed, BranchState::Succeeded, Outcome::Reversed) => {
            let node_id = saga
                .branch(branch_id)
                .map(|b| b.node_id.clone())
                .unwrap_or_default();
            saga.state = SagaState::NeedsAttention;
            saga.reason = format!(
                "step {branch_id} was undone by node {node_id} after the saga completed; \
                 ReprocessSaga reverses the saga's other steps"
            );
            saga.signal = Some(Signal::Reprocess);
            effects.extend(signal_every_node(saga, Signal::Reprocess));
        }
        _ => {}
    }
    effects
}

/// S2 items 3 and 7: every rule whose conditions are all reported fires once; a status no rule
/// waits for is only stored.
fn fire_rules(saga: &mut Saga, ctx: Context<'_>) -> Vec<Effect> {
    let mut effects = Vec::new();
    for (index, rule) in ctx.strategy.rules.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        if saga.fired_rules.contains(&index) || !rule.when.iter().all(|c| saga.reported.contains(c))
        {
            continue;
        }
        saga.fired_rules.insert(index);
        effects.extend(trigger(saga, ctx, &rule.trigger));
    }
    effects
}

pub(crate) fn signal_every_node(saga: &Saga, signal: Signal) -> Vec<Effect> {
    saga.nodes()
        .into_iter()
        .map(|node_id| Effect::Signal {
            node_id,
            signal,
            reason: saga.reason.clone(),
        })
        .collect()
}

/// S2 item 4: an end status finishes the flow.
fn complete(saga: &mut Saga, now: Millis) -> Vec<Effect> {
    saga.state = SagaState::Completed;
    drop_waiting_retries(saga, now);
    saga.signal = Some(Signal::Completed);
    signal_every_node(saga, Signal::Completed)
}

/// Forward retries go out only while the saga runs: once it ends or reverses, a step still
/// waiting for one (outside the reversal's scope, or the saga ended by another step) keeps its
/// state but no longer shows a retry to come.
fn drop_waiting_retries(saga: &mut Saga, now: Millis) {
    for branch in saga.branches.iter_mut() {
        if branch.state == BranchState::Triggered && branch.retry_at_ms.take().is_some() {
            branch.note(now, "retry not sent: the saga no longer runs");
        }
    }
}

/// S2 item 6: reverse the triggered steps in `scope` that may have taken effect.
fn begin_reversal(
    saga: &mut Saga,
    ctx: Context<'_>,
    scope: &[String],
    reason: String,
) -> Vec<Effect> {
    saga.state = SagaState::Reversing;
    saga.reason = reason.clone();
    drop_waiting_retries(saga, ctx.now);
    let mut effects = Vec::new();
    for branch in saga.branches.iter_mut() {
        if !scope.contains(&branch.branch_id) || !branch.state.may_need_reversal() {
            continue;
        }
        if branch.reversal_action.is_empty() {
            branch.note(
                ctx.now,
                "nothing to reverse: the step has no reversal action",
            );
            continue;
        }
        effects.push(start_reversing(branch, ctx.now, &reason, "reversing"));
    }
    effects.extend(settle_if_done(saga));
    effects
}

/// Once no reversal is outstanding, the saga ends and every node is told how.
fn settle_if_done(saga: &mut Saga) -> Vec<Effect> {
    if saga.state != SagaState::Reversing
        || saga
            .branches
            .iter()
            .any(|b| b.state == BranchState::Reversing)
    {
        return Vec::new();
    }
    if saga
        .branches
        .iter()
        .any(|b| b.state == BranchState::ReversalFailed)
    {
        saga.state = SagaState::NeedsAttention;
        saga.signal = Some(Signal::Reprocess);
        signal_every_node(saga, Signal::Reprocess)
    } else {
        saga.state = SagaState::Reversed;
        saga.signal = Some(Signal::ReversalSuccess);
        signal_every_node(saga, Signal::ReversalSuccess)
    }
}

/// The node's answer to a Reverse command.
pub fn on_reversal_answered(
    mut saga: Saga,
    branch_id: &str,
    report: Report,
    ctx: Context<'_>,
) -> Transition {
    let mut effects = apply_reversal_answer(&mut saga, branch_id, report, ctx.env());
    effects.extend(settle_if_done(&mut saga));
    saga.updated_ms = ctx.now;
    Transition { saga, effects }
}

/// How a Reverse answer changes its branch — shared by both ways of running a saga. A failure
/// is retried by the S5 policy (and the first one tells every node REPROCESS); a reversal still
/// processing is asked again within the poll budget.
pub(crate) fn apply_reversal_answer(
    saga: &mut Saga,
    branch_id: &str,
    report: Report,
    env: Env<'_>,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    let mut failed = false;
    if let Some(branch) = saga.branch_mut(branch_id)
        && branch.state == BranchState::Reversing
    {
        // A late or repeated answer still counts when it says there is nothing left to undo.
        let settles = matches!(
            report.outcome,
            Outcome::Succeeded | Outcome::Reversed | Outcome::NotFound
        );
        if !settles && !report.answers_pending_send(branch) {
            let about = report.attempt.unwrap_or(branch.attempts);
            branch.note(
                env.now,
                format!(
                    "late or repeated reversal answer {} about send {about} ignored: {}",
                    outcome_name(report.outcome),
                    superseded_because(branch)
                ),
            );
            return effects;
        }
        if settles {
            branch.retry_at_ms = None;
        }
        match report.outcome {
            Outcome::Succeeded | Outcome::Reversed => {
                branch.state = BranchState::Reversed;
                branch.note(env.now, "reversed");
            }
            // Null compensation: the forward action never ran, so there is nothing to undo,
            // and the node will refuse it if it arrives late.
            Outcome::NotFound => {
                branch.state = BranchState::NotOccurred;
                branch.note(
                    env.now,
                    "reversal found nothing to undo: the forward action never happened",
                );
            }
            Outcome::Unknown | Outcome::Processing => {
                // Not a failure: the node is still at it. Ask again later, within the poll budget.
                branch.polls += 1;
                if branch.polls >= env.policy.max_polls {
                    branch.state = BranchState::ReversalFailed;
                    branch.note(env.now, "the reversal's outcome stayed unknown past the poll budget: needs an operator");
                } else {
                    let delay = env.policy.retry_delay_ms(branch.polls, env.jitter);
                    let at_ms = env.now.saturating_add(delay);
                    branch.retry_at_ms = Some(at_ms);
                    branch.note(
                        env.now,
                        format!(
                            "reversal {}: asking again in {delay} ms",
                            outcome_name(report.outcome)
                        ),
                    );
                    effects.push(Effect::WakeAt {
                        at_ms,
                        timer: Timer::RetryReversal {
                            branch_id: branch_id.to_owned(),
                        },
                    });
                }
            }
            Outcome::Failed => {
                failed = true;
                branch.error_code = report.error_code.clone();
                branch.message = report.message.clone();
                let resolved = retry::resolve(env.retry, &branch.reversal_action, &branch.node_id);
                // Resends that re-asked a reversal still PROCESSING were no failures: they
                // follow the poll budget, not the retry policy's; nor do an earlier round's.
                let made = branch
                    .attempts
                    .saturating_sub(1)
                    .saturating_sub(branch.earlier_reversal_sends)
                    .saturating_sub(branch.polls);
                match retry::redelivery(&resolved, &report.error_code, made, env.now, env.jitter) {
                    Redelivery::RetryAt(at_ms) => {
                        branch.retry_at_ms = Some(at_ms);
                        branch.note(
                            env.now,
                            format!("reversal failed ({}): retrying", report.error_code),
                        );
                        effects.push(Effect::WakeAt {
                            at_ms,
                            timer: Timer::RetryReversal {
                                branch_id: branch_id.to_owned(),
                            },
                        });
                    }
                    Redelivery::GiveUp(give_up) => {
                        branch.state = BranchState::ReversalFailed;
                        branch.note(
                            env.now,
                            format!("reversal failed: {}; needs an operator", give_up.reason()),
                        );
                    }
                }
            }
        }
    }
    // DESIGN: a failed reversal tells every node REPROCESS (once), then the final signal.
    if failed && saga.signal != Some(Signal::Reprocess) {
        saga.signal = Some(Signal::Reprocess);
        effects.extend(signal_every_node(saga, Signal::Reprocess));
    }
    effects
}

/// Why a late or repeated answer about `branch`'s action changes nothing, for its timeline.
fn superseded_because(branch: &Branch) -> String {
    if branch.retry_at_ms.is_some() {
        format!(
            "send {} was answered already and its retry is scheduled",
            branch.attempts
        )
    } else {
        format!("send {} is the latest", branch.attempts)
    }
}

/// Starts a branch's reversal: the one place that sets it REVERSING with a fresh retry budget
/// and its own poll budget (polls of the forward action do not count against the reversal).
/// A reversal that failed in an earlier round goes on numbering its sends, so that round's
/// answers, arriving late, name sends older than the latest and do not count in this one.
pub(crate) fn start_reversing(branch: &mut Branch, now: Millis, reason: &str, why: &str) -> Effect {
    if branch.state == BranchState::ReversalFailed {
        branch.earlier_reversal_sends = branch.attempts;
        branch.attempts = branch.attempts.saturating_add(1);
    } else {
        branch.earlier_reversal_sends = 0;
        branch.attempts = 1;
    }
    branch.state = BranchState::Reversing;
    branch.retry_at_ms = None;
    branch.polls = 0;
    branch.note(
        now,
        format!("{why}: {} on {}", branch.reversal_action, branch.node_id),
    );
    Effect::Reverse {
        branch_id: branch.branch_id.clone(),
        reason: reason.to_owned(),
        attempt: branch.attempts,
    }
}

/// Resends a reversal whose retry came due.
pub(crate) fn resend_reversal(saga: &mut Saga, branch_id: &str, now: Millis) -> Vec<Effect> {
    let reason = saga.reason.clone();
    match saga.branch_mut(branch_id) {
        Some(branch) if branch.state == BranchState::Reversing => {
            branch.attempts += 1;
            branch.retry_at_ms = None;
            branch.note(now, format!("reversal attempt {}", branch.attempts));
            vec![Effect::Reverse {
                branch_id: branch_id.to_owned(),
                reason,
                attempt: branch.attempts,
            }]
        }
        _ => Vec::new(),
    }
}

/// An operator re-drives a saga that needs attention: each failed reversal gets a fresh budget.
pub fn on_reprocess(mut saga: Saga, now: Millis) -> Option<Transition> {
    if saga.state != SagaState::NeedsAttention {
        return None;
    }
    saga.state = SagaState::Reversing;
    let reason = saga.reason.clone();
    let mut effects = Vec::new();
    // A saga that reached NEEDS_ATTENTION without a failed reversal was completed, then one of
    // its steps was undone by its node: reprocessing reverses the rest.
    let after_completion = !saga
        .branches
        .iter()
        .any(|b| b.state == BranchState::ReversalFailed);
    for branch in saga.branches.iter_mut() {
        let why = match branch.state {
            BranchState::ReversalFailed => "reprocessed by an operator: reversing again",
            state
                if after_completion
                    && state.may_need_reversal()
                    && !branch.reversal_action.is_empty() =>
            {
                "reprocessed by an operator: reversing"
            }
            _ => continue,
        };
        effects.push(start_reversing(branch, now, &reason, why));
    }
    effects.extend(settle_if_done(&mut saga));
    saga.updated_ms = now;
    Some(Transition { saga, effects })
}

/// Whether a step's timeout for send `attempt` would still change anything: the saga runs,
/// and that send is the step's latest, unanswered, with no retry waiting. The shell asks this
/// before spending a ledger write on a timeout it kept only in memory.
pub fn step_timeout_is_live(saga: &Saga, branch_id: &str, attempt: u32) -> bool {
    saga.state == SagaState::Running
        && saga.branch(branch_id).is_some_and(|branch| {
            branch.state == BranchState::Triggered
                && branch.attempts == attempt
                && branch.retry_at_ms.is_none()
        })
}

/// A timer came due.
pub fn on_timer(mut saga: Saga, timer: &Timer, ctx: Context<'_>) -> Transition {
    let mut effects = Vec::new();
    match timer {
        Timer::Deadline => {
            if saga.state == SagaState::Running {
                let every_step: Vec<String> =
                    ctx.strategy.steps.iter().map(|s| s.id.clone()).collect();
                effects = begin_reversal(
                    &mut saga,
                    ctx,
                    &every_step,
                    "the saga's deadline passed".to_owned(),
                );
            }
        }
        Timer::StepTimeout { branch_id, attempt } => {
            if step_timeout_is_live(&saga, branch_id, *attempt)
                && let Some(branch) = saga.branch_mut(branch_id)
            {
                branch.state = BranchState::Unknown;
                branch.note(
                    ctx.now,
                    "no report within the step's timeout: asking the node",
                );
                effects.push(Effect::QueryStatus {
                    branch_id: branch_id.clone(),
                });
                effects.push(Effect::WakeAt {
                    at_ms: ctx.now.saturating_add(branch.timeout_ms),
                    timer: Timer::Poll {
                        branch_id: branch_id.clone(),
                    },
                });
            }
        }
        Timer::Poll { branch_id } => {
            let mut give_up = None;
            if saga.state == SagaState::Running
                && let Some(branch) = saga.branch_mut(branch_id)
                && branch.state == BranchState::Unknown
            {
                branch.polls += 1;
                if branch.polls >= ctx.policy.max_polls {
                    give_up = Some(format!(
                        "node {} never said what happened to step {branch_id}",
                        branch.node_id
                    ));
                } else {
                    branch.note(ctx.now, format!("still unknown: poll {}", branch.polls + 1));
                    effects.push(Effect::QueryStatus {
                        branch_id: branch_id.clone(),
                    });
                    let backoff = ctx
                        .policy
                        .retry_delay_ms(branch.polls, ctx.jitter)
                        .max(branch.timeout_ms);
                    effects.push(Effect::WakeAt {
                        at_ms: ctx.now.saturating_add(backoff),
                        timer: Timer::Poll {
                            branch_id: branch_id.clone(),
                        },
                    });
                }
            }
            if let Some(reason) = give_up {
                // The silent step may have taken effect: it is reversed too, whatever its scope
                // says (its node's barrier undoes it, or records that it never ran).
                let mut scope = ctx.strategy.exception_scope(branch_id);
                if !scope.contains(branch_id) {
                    scope.push(branch_id.clone());
                }
                effects = begin_reversal(&mut saga, ctx, &scope, reason);
            }
        }
        Timer::RetryExecute { branch_id } => {
            if saga.state == SagaState::Running
                && let Some(branch) = saga.branch_mut(branch_id)
                && branch.state == BranchState::Triggered
            {
                // A branch stored by an sagad before `retry_at_ms` existed counted the resend
                // when it scheduled it.
                if branch.retry_at_ms.take().is_some() {
                    branch.attempts = branch.attempts.saturating_add(1);
                }
                // Each send gets the whole poll budget should its outcome become unknown.
                branch.polls = 0;
                branch.note(ctx.now, format!("execute attempt {}", branch.attempts));
                effects.push(Effect::Execute {
                    branch_id: branch_id.clone(),
                    attempt: branch.attempts,
                });
                effects.push(Effect::WakeAt {
                    at_ms: ctx.now.saturating_add(branch.timeout_ms),
                    timer: Timer::StepTimeout {
                        branch_id: branch_id.clone(),
                        attempt: branch.attempts,
                    },
                });
            }
        }
        Timer::RetryReversal { branch_id } => {
            effects = resend_reversal(&mut saga, branch_id, ctx.now)
        }
    }
    saga.updated_ms = ctx.now;
    Transition { saga, effects }
}

#[cfg(test)]
mod tests;
