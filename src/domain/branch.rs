//! A branch of a saga — one strategy step or one registered outcall on one node — and the
//! outcomes, statuses and signals that move it.

use std::collections::BTreeMap;

use crate::domain::saga::{Limits, too_long};
use crate::domain::{Millis, Violation};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BranchState {
    Triggered,
    Succeeded,
    Failed,
    Unknown,
    Reversing,
    Reversed,
    ReversalFailed,
    NotOccurred,
}

impl BranchState {
    /// The forward action may have taken effect and has not been undone: a reversal must
    /// reach this branch.
    pub fn may_need_reversal(self) -> bool {
        match self {
            BranchState::Triggered | BranchState::Succeeded | BranchState::Unknown => true,
            BranchState::Failed
            | BranchState::Reversing
            | BranchState::Reversed
            | BranchState::ReversalFailed
            | BranchState::NotOccurred => false,
        }
    }
}

/// The execution status of an action as a node reports it (S4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Succeeded,
    Failed,
    Processing,
    Unknown,
    NotFound,
    Reversed,
}

/// What every node of a saga is told when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    ReversalSuccess,
    Reprocess,
    ReversalFailure,
    Completed,
}

/// A status as reported (S2): a name and its parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub parameters: BTreeMap<String, String>,
}

/// A report about a branch's action: from the node's answer to a command, or from ReportState.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub status: Option<Status>,
    pub error_code: String,
    pub message: String,
    /// Which send of the branch's current action this answers (1 for the first), when the
    /// answer says so (it names the command it answers); `None` means the latest send.
    pub attempt: Option<u32>,
}

impl Report {
    /// What ReportState must refuse: each free-text field is kept on the branch (and an error
    /// code in the saga's reason), so each is bounded.
    pub fn violations(&self) -> Vec<Violation> {
        let mut violations: Vec<Violation> = [
            too_long("error_code", &self.error_code, Limits::MAX_ERROR_CODE),
            too_long("message", &self.message, Limits::MAX_MESSAGE),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Some(status) = &self.status {
            violations.extend(too_long(
                "status.name",
                &status.name,
                Limits::MAX_STATUS_NAME,
            ));
            let count = status.parameters.len();
            if count > Limits::MAX_STATUS_PARAMETERS {
                violations.push(Violation::new(
                    "status.parameters",
                    format!(
                        "has {count} entries; at most {} are allowed",
                        Limits::MAX_STATUS_PARAMETERS
                    ),
                ));
            }
            for (key, value) in &status.parameters {
                violations.extend(too_long(
                    "status.parameters",
                    key,
                    Limits::MAX_STATUS_PARAMETER_KEY,
                ));
                violations.extend(too_long(
                    &format!("status.parameters[{key}]"),
                    value,
                    Limits::MAX_STATUS_PARAMETER_VALUE,
                ));
            }
        }
        violations
    }

    /// A node's answer to a pushed command cannot be refused (the outcome is what matters and
    /// there is no caller to tell), so what is over a bound is cut to it instead. A cut text
    /// ends in '…', so an operator sees it was cut, and a cut error code never equals a
    /// retryable code (a retry configuration refuses codes of that shape) and so is never
    /// retried by accident.
    pub fn clamped(mut self) -> Report {
        clamp(&mut self.error_code, Limits::MAX_ERROR_CODE);
        clamp(&mut self.message, Limits::MAX_MESSAGE);
        if let Some(status) = &mut self.status {
            clamp(&mut status.name, Limits::MAX_STATUS_NAME);
            if status.parameters.len() > Limits::MAX_STATUS_PARAMETERS
                || status.parameters.iter().any(|(k, v)| {
                    k.chars().count() > Limits::MAX_STATUS_PARAMETER_KEY
                        || v.chars().count() > Limits::MAX_STATUS_PARAMETER_VALUE
                })
            {
                status.parameters = std::mem::take(&mut status.parameters)
                    .into_iter()
                    .take(Limits::MAX_STATUS_PARAMETERS)
                    .map(|(mut key, mut value)| {
                        clamp(&mut key, Limits::MAX_STATUS_PARAMETER_KEY);
                        clamp(&mut value, Limits::MAX_STATUS_PARAMETER_VALUE);
                        (key, value)
                    })
                    .collect();
            }
        }
        self
    }

    /// Whether this answers the branch's latest send while that send still awaits its answer.
    /// It does not when it names an older send (or one of an earlier round of reversal), or
    /// when the latest send's failure was already counted and its retry waits: a late or
    /// repeated answer, which must not count against the retry budget again. Callers still
    /// take such an answer when it says the action took effect.
    pub fn answers_pending_send(&self, branch: &Branch) -> bool {
        self.attempt.unwrap_or(branch.attempts) == branch.attempts && branch.retry_at_ms.is_none()
    }
}

/// Cuts `text` to at most `max` characters, the last of them '…'.
fn clamp(text: &mut String, max: usize) {
    if text.chars().count() > max {
        let keep = text
            .char_indices()
            .nth(max.saturating_sub(1))
            .map_or(text.len(), |(at, _)| at);
        text.truncate(keep);
        text.push('…');
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEntry {
    pub at_ms: Millis,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub branch_id: String,
    pub node_id: String,
    pub caller_node_id: String,
    pub forward_action: String,
    pub reversal_action: String,
    pub order: u32,
    pub state: BranchState,
    pub last_status: Option<Status>,
    pub error_code: String,
    pub message: String,
    /// Sends of the current action (forward, then reversal). A reversal an operator re-drives
    /// (ReprocessSaga) goes on counting, so an answer to an earlier round's send reads as late.
    pub attempts: u32,
    /// Of `attempts`, the reversal's sends in rounds before the current one: the retry policy
    /// counts only the current round's, so each round gets the whole budget.
    pub earlier_reversal_sends: u32,
    /// When a failure of the latest send was counted and the retry policy resends it: the time
    /// of that resend. While it waits, no answer can be about a send still to come.
    pub retry_at_ms: Option<Millis>,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub last_poll_outcome: Option<Outcome>,
    pub last_poll_ms: Millis,
    pub polls: u32,
    pub timeout_ms: Millis,
    pub timeline: Vec<TimelineEntry>,
}

/// Timelines keep their latest entries only, so a branch polled for days stays small.
const TIMELINE_LIMIT: usize = 32;

impl Branch {
    pub fn note(&mut self, now: Millis, what: impl Into<String>) {
        if self.timeline.len() == TIMELINE_LIMIT {
            self.timeline.remove(0);
        }
        self.timeline.push(TimelineEntry {
            at_ms: now,
            what: what.into(),
        });
        self.updated_ms = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(error_code: String, message: String, status: Status) -> Report {
        Report {
            outcome: Outcome::Failed,
            status: Some(status),
            error_code,
            message,
            attempt: None,
        }
    }

    #[test]
    fn an_oversized_answer_from_a_node_is_cut_to_the_bounds_and_keeps_its_outcome() {
        let parameters = (0..40)
            .map(|i| (format!("{i:02}{}", "k".repeat(200)), "v".repeat(300)))
            .collect();
        let big = report(
            "E".repeat(10_000),
            "é".repeat(10_000),
            Status {
                name: "N".repeat(500),
                parameters,
            },
        );
        let cut = big.clamped();
        assert_eq!(cut.outcome, Outcome::Failed);
        assert_eq!(cut.error_code.chars().count(), Limits::MAX_ERROR_CODE);
        assert!(cut.error_code.ends_with('…'));
        assert_eq!(cut.message.chars().count(), Limits::MAX_MESSAGE);
        let status = cut.status.as_ref().unwrap();
        assert_eq!(status.name.chars().count(), Limits::MAX_STATUS_NAME);
        assert_eq!(status.parameters.len(), Limits::MAX_STATUS_PARAMETERS);
        assert!(status.parameters.iter().all(|(k, v)| {
            k.chars().count() == Limits::MAX_STATUS_PARAMETER_KEY
                && v.chars().count() == Limits::MAX_STATUS_PARAMETER_VALUE
        }));
        assert!(cut.violations().is_empty(), "{:?}", cut.violations());
    }

    #[test]
    fn an_answer_within_the_bounds_is_kept_as_it_is() {
        let at_limit = report(
            "E".repeat(Limits::MAX_ERROR_CODE),
            "m".repeat(Limits::MAX_MESSAGE),
            Status {
                name: "N".repeat(Limits::MAX_STATUS_NAME),
                parameters: (0..Limits::MAX_STATUS_PARAMETERS)
                    .map(|i| {
                        (
                            format!("{i:02}").repeat(Limits::MAX_STATUS_PARAMETER_KEY / 2),
                            "v".repeat(Limits::MAX_STATUS_PARAMETER_VALUE),
                        )
                    })
                    .collect(),
            },
        );
        assert_eq!(at_limit.violations(), Vec::new());
        assert_eq!(at_limit.clone().clamped(), at_limit);
    }
}
