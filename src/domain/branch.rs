//! A branch of a saga — one strategy step or one registered outcall on one node — and the
//! outcomes, statuses and signals that move it.

use std::collections::BTreeMap;

use crate::domain::Millis;

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
    /// Whether this answers the branch's latest send while that send still awaits its answer.
    /// It does not when it names an older send (or one of an earlier round of reversal), or
    /// when the latest send's failure was already counted and its retry waits: a late or
    /// repeated answer, which must not count against the retry budget again. Callers still
    /// take such an answer when it says the action took effect.
    pub fn answers_pending_send(&self, branch: &Branch) -> bool {
        self.attempt.unwrap_or(branch.attempts) == branch.attempts && branch.retry_at_ms.is_none()
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
    /// Sends of the current action (forward, then reversal).
    pub attempts: u32,
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
