//! The operators' view of recovery (S4): which branches and sagas recovery is waiting on and
//! why, read from the ledger a bounded number of sagas at a time, plus the commands whose
//! delivery keeps failing (held in memory by delivery). Read-only: nothing here changes a saga.

use crate::domain::Millis;
use crate::domain::branch::{BranchState, Outcome};
use crate::domain::orchestration::{Policy, outcome_name};
use crate::domain::saga::{ReversalType, Saga, SagaMode, SagaState};
use crate::engine::{Engine, Error, PageToken, convert, delivery::InFlight};
use crate::store;

/// One call reads at most this many sagas (the same bound as a filtered saga listing), unless
/// asked for fewer.
pub(crate) const MAX_EXAMINED: u32 = 10_000;
/// Items per page unless asked for fewer, and never more than the maximum.
const DEFAULT_STUCK_PAGE: u32 = 100;
const MAX_STUCK_PAGE: u32 = 500;
/// Failing deliveries shown on the first page; beyond this only their number is told.
pub(crate) const MAX_DELIVERIES_SHOWN: usize = 1_000;

/// What `list_stuck` is asked for.
#[derive(Debug, Clone, Default)]
pub struct StuckQuery {
    pub page_size: u32,
    pub page_token: String,
    pub max_examined: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StuckKind {
    UnknownOutcome,
    ReversalRetrying,
    NeedsAttention,
    DeliveryFailing,
    StepRetrying,
    UnreadableSaga,
    Stalled,
}

/// One thing recovery is waiting on. Which fields are set depends on `kind` (see the
/// Operations contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub kind: StuckKind,
    pub gsn: String,
    pub branch_id: String,
    pub node_id: String,
    pub reason: String,
    pub saga_state: Option<SagaState>,
    pub branch_state: Option<BranchState>,
    pub attempts: u32,
    pub polls: u32,
    pub last_poll_outcome: Option<Outcome>,
    pub last_poll_ms: Millis,
    pub last_error: String,
    /// When the saga or branch last changed; 0 for deliveries.
    pub since_ms: Millis,
    pub outbox_id: u64,
    pub command_kind: &'static str,
    /// When a retrying branch's action is sent again; `None` while a send is on its way.
    pub next_attempt_ms: Option<Millis>,
}

impl Stuck {
    fn new(kind: StuckKind, saga: &Saga) -> Stuck {
        Stuck {
            gsn: saga.gsn.to_string(),
            saga_state: Some(saga.state),
            since_ms: saga.updated_ms,
            ..Stuck::bare(kind)
        }
    }

    /// An item with only its kind set.
    fn bare(kind: StuckKind) -> Stuck {
        Stuck {
            kind,
            gsn: String::new(),
            branch_id: String::new(),
            node_id: String::new(),
            reason: String::new(),
            saga_state: None,
            branch_state: None,
            attempts: 0,
            polls: 0,
            last_poll_outcome: None,
            last_poll_ms: 0,
            last_error: String::new(),
            since_ms: 0,
            outbox_id: 0,
            command_kind: "",
            next_attempt_ms: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StuckPage {
    pub items: Vec<Stuck>,
    pub next_page_token: String,
    pub sagas_examined: u32,
    pub deliveries_not_shown: u32,
    pub as_of_ms: Millis,
}

fn state_word(state: SagaState) -> &'static str {
    match state {
        SagaState::Running => "RUNNING",
        SagaState::Completed => "COMPLETED",
        SagaState::Reversing => "REVERSING",
        SagaState::Reversed => "REVERSED",
        SagaState::NeedsAttention => "NEEDS_ATTENTION",
    }
}

/// `code: message`, or whichever of the two is set.
fn error_text(code: &str, message: &str) -> String {
    match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{code}: {message}"),
        (false, true) => code.to_owned(),
        (true, false) => message.to_owned(),
        (true, true) => String::new(),
    }
}

/// What recovery waits on in one saga, in branch order, the saga itself last. Pure, so the
/// rules of what counts as stuck are unit tests.
pub(crate) fn stuck_in(saga: &Saga, policy: &Policy) -> Vec<Stuck> {
    let mut items = Vec::new();
    for branch in &saga.branches {
        let mut item = Stuck::new(StuckKind::UnknownOutcome, saga);
        item.branch_id = branch.branch_id.clone();
        item.node_id = branch.node_id.clone();
        item.branch_state = Some(branch.state);
        item.attempts = branch.attempts;
        item.since_ms = branch.updated_ms;
        match branch.state {
            BranchState::Unknown => {
                let last = match branch.last_poll_outcome {
                    Some(outcome) => format!("last answer {}", outcome_name(outcome)),
                    None => "no poll answered yet".to_owned(),
                };
                // Orchestrated sagas poll only while RUNNING; an outcall saga's external
                // reversal also asks its unknown outcalls before deciding what to undo.
                let polled = saga.state == SagaState::Running
                    || (saga.mode == SagaMode::RegisteredOutcalls
                        && saga.state == SagaState::Reversing
                        && saga.reversal_type == Some(ReversalType::External));
                item.reason = if polled {
                    format!(
                        "outcome unknown: asking node {} with QueryStatus, {} of {} poll rounds \
                         done, {last}",
                        branch.node_id, branch.polls, policy.max_polls
                    )
                } else {
                    // Polls have stopped; the branch keeps its last word.
                    format!(
                        "outcome unknown and no longer polled: the saga is {}; {last}",
                        state_word(saga.state)
                    )
                };
                item.polls = branch.polls;
                item.last_poll_outcome = branch.last_poll_outcome;
                item.last_poll_ms = branch.last_poll_ms;
                items.push(item);
            }
            // A first reversal still on its way is progress, not a wait: only one that failed,
            // or is to be sent again, or was, is listed. (`polls` cannot tell: it may still
            // count the forward action's polls.)
            BranchState::Reversing
                if branch.attempts > 1
                    || !branch.error_code.is_empty()
                    || branch.retry_at_ms.is_some() =>
            {
                item.kind = StuckKind::ReversalRetrying;
                item.next_attempt_ms = branch.retry_at_ms;
                item.last_error = error_text(&branch.error_code, &branch.message);
                let last = if item.last_error.is_empty() {
                    "the node is still processing it".to_owned()
                } else {
                    format!("last failure {}", item.last_error)
                };
                item.reason = format!(
                    "reversal {} on node {} not done after {} sends ({last}); sent again with \
                     backoff by the retry policy",
                    branch.reversal_action, branch.node_id, branch.attempts,
                );
                items.push(item);
            }
            // A step sent again after a retryable failure (S5): while its retry waits, and while
            // that resend is out, since the resend clears `retry_at_ms` and only `attempts`
            // still shows a send failed. A first send on its way is progress, not a wait.
            BranchState::Triggered if branch.retry_at_ms.is_some() || branch.attempts > 1 => {
                item.kind = StuckKind::StepRetrying;
                item.next_attempt_ms = branch.retry_at_ms;
                item.last_error = error_text(&branch.error_code, &branch.message);
                item.reason = if branch.retry_at_ms.is_some() {
                    format!(
                        "forward action {} on node {} failed ({}) after {} sends; sent again by \
                         the retry policy",
                        branch.forward_action, branch.node_id, item.last_error, branch.attempts,
                    )
                } else {
                    format!(
                        "forward action {} on node {} failed ({}) and the retry policy sent \
                         it again; send {} has no final answer yet (it may be on its way, or \
                         the node may be working on it)",
                        branch.forward_action, branch.node_id, item.last_error, branch.attempts,
                    )
                };
                items.push(item);
            }
            BranchState::Reversing
            | BranchState::Triggered
            | BranchState::Succeeded
            | BranchState::Failed
            | BranchState::Reversed
            | BranchState::ReversalFailed
            | BranchState::NotOccurred => {}
        }
    }
    let out = saga.branches.iter().any(|b| {
        matches!(
            b.state,
            BranchState::Triggered | BranchState::Unknown | BranchState::Reversing
        )
    });
    if saga.state == SagaState::Running && saga.mode == SagaMode::Orchestrated && !out {
        let mut item = Stuck::new(StuckKind::Stalled, saga);
        item.reason = format!(
            "running with no step out: the statuses reported so far fire no rule and end \
             nothing; it moves when a step reports another status{}",
            match saga.deadline_ms {
                Some(_) => ", or is reversed at its deadline",
                None => " (it has no deadline)",
            }
        );
        items.push(item);
    }
    if saga.state == SagaState::NeedsAttention {
        let failed: Vec<String> = saga
            .branches
            .iter()
            .filter(|b| b.state == BranchState::ReversalFailed)
            .map(|b| {
                let error = error_text(&b.error_code, &b.message);
                if error.is_empty() {
                    format!("{} on {}", b.branch_id, b.node_id)
                } else {
                    format!("{} on {} ({error})", b.branch_id, b.node_id)
                }
            })
            .collect();
        let mut item = Stuck::new(StuckKind::NeedsAttention, saga);
        item.reason = if failed.is_empty() {
            // Not a failed reversal: a step of a completed saga was undone by its node.
            format!("needs an operator: {}", saga.reason)
        } else {
            format!(
                "needs an operator: the reversal of {} failed and is not retried any more; the saga \
             was reversing because {}",
                failed.join(", "),
                if saga.reason.is_empty() {
                    "(no reason recorded)"
                } else {
                    saga.reason.as_str()
                }
            )
        };
        items.push(item);
    }
    items
}

/// A delivery is listed once a send of it failed: it was sent more than once, or its last
/// send failed.
fn failing_delivery(flight: InFlight) -> Option<Stuck> {
    if flight.attempts <= 1 && flight.last_error.is_empty() {
        return None;
    }
    let reason = if flight.last_error.is_empty() {
        format!(
            "{} not answered after {} sends; sending again",
            flight.kind, flight.attempts
        )
    } else {
        format!(
            "{} not delivered after {} sends: {}",
            flight.kind, flight.attempts, flight.last_error
        )
    };
    Some(Stuck {
        gsn: flight.gsn,
        node_id: flight.node_id,
        reason,
        attempts: flight.attempts,
        last_error: flight.last_error,
        outbox_id: flight.outbox_id,
        command_kind: flight.kind,
        ..Stuck::bare(StuckKind::DeliveryFailing)
    })
}

/// A saga record this build cannot decode: recovery cannot act on it, so an operator must.
fn unreadable_saga(sequence: u64, error: &store::Error) -> Stuck {
    Stuck {
        reason: format!(
            "the saga record at ledger sequence {sequence:016} cannot be read ({error}); nothing \
             recovers it until the ledger is restored or the sagad build that wrote it runs"
        ),
        ..Stuck::bare(StuckKind::UnreadableSaga)
    }
}

fn bounded(field: &str, value: u32, default: u32, max: u32) -> Result<usize, Error> {
    let value = match value {
        0 => default,
        n if n > max => {
            return Err(Error::invalid(
                field,
                format!("is {n}; at most {max} is allowed"),
            ));
        }
        n => n,
    };
    Ok(value as usize)
}

impl Engine {
    /// What recovery is waiting on: one bounded page of the saga scan (GSN order), and on the
    /// first page the failing deliveries too.
    pub async fn list_stuck(&self, query: StuckQuery) -> Result<StuckPage, Error> {
        let page_size = bounded(
            "page_size",
            query.page_size,
            DEFAULT_STUCK_PAGE,
            MAX_STUCK_PAGE,
        )?;
        let max_examined = bounded(
            "max_examined",
            query.max_examined,
            MAX_EXAMINED,
            MAX_EXAMINED,
        )?;
        let after = if query.page_token.is_empty() {
            None
        } else {
            match PageToken::decode(&query.page_token) {
                Some(token) if !token.newest_first => Some(token.after),
                _ => {
                    return Err(Error::invalid(
                        "page_token",
                        "is not a ListStuck token this sagad issued; pass next_page_token from \
                         the previous page unchanged",
                    ));
                }
            }
        };
        let policy = self.settings.policy;
        let as_of_ms = self.clock.now_ms();
        let (mut items, last_examined, examined, exhausted) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut items = Vec::new();
                let mut last_examined = None;
                let mut examined = 0usize;
                let mut exhausted = true;
                for record in tx.scan_sagas(after, false) {
                    // A saga this build cannot read is listed too: recovery passes over it,
                    // so only an operator can act on it.
                    let (sequence, found) = match record? {
                        Ok(record) => {
                            let sequence = record.sequence;
                            match convert::saga_from_record(record, Vec::new()) {
                                Ok(saga) => (sequence, stuck_in(&saga, &policy)),
                                Err(e) => (sequence, vec![unreadable_saga(sequence, &e)]),
                            }
                        }
                        Err(undecodable) => {
                            let Some(sequence) = undecodable.key_u64() else {
                                continue;
                            };
                            (
                                sequence,
                                vec![unreadable_saga(sequence, undecodable.error())],
                            )
                        }
                    };
                    // A saga's items stay together: if they do not fit, the next page starts
                    // with this saga.
                    if !items.is_empty() && items.len() + found.len() > page_size {
                        exhausted = false;
                        break;
                    }
                    examined += 1;
                    last_examined = Some(sequence);
                    items.extend(found);
                    if items.len() >= page_size || examined >= max_examined {
                        exhausted = false;
                        break;
                    }
                }
                Ok((items, last_examined, examined, exhausted))
            })
            .await??;
        let next_page_token = match (exhausted, last_examined) {
            (false, Some(after)) => PageToken {
                after,
                newest_first: false,
            }
            .encode(),
            // Stopped before the first saga of this page: continue where this page started.
            (false, None) => query.page_token,
            (true, _) => String::new(),
        };
        let mut deliveries_not_shown = 0;
        if after.is_none() {
            let failing: Vec<Stuck> = self
                .deliveries_in_flight()
                .into_iter()
                .filter_map(failing_delivery)
                .collect();
            deliveries_not_shown =
                u32::try_from(failing.len().saturating_sub(MAX_DELIVERIES_SHOWN))
                    .unwrap_or(u32::MAX);
            items.extend(failing.into_iter().take(MAX_DELIVERIES_SHOWN));
        }
        Ok(StuckPage {
            items,
            next_page_token,
            sagas_examined: u32::try_from(examined).unwrap_or(u32::MAX),
            deliveries_not_shown,
            as_of_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::branch::{Branch, TimelineEntry};

    fn branch(id: &str, state: BranchState) -> Branch {
        Branch {
            branch_id: id.into(),
            node_id: format!("{id}-node"),
            caller_node_id: String::new(),
            forward_action: id.into(),
            reversal_action: format!("undo-{id}"),
            order: 0,
            state,
            last_status: None,
            error_code: String::new(),
            message: String::new(),
            attempts: 1,
            retry_at_ms: None,
            earlier_reversal_sends: 0,
            created_ms: 10,
            updated_ms: 20,
            last_poll_outcome: None,
            last_poll_ms: 0,
            polls: 0,
            timeout_ms: 1_000,
            timeline: vec![TimelineEntry {
                at_ms: 10,
                what: "triggered".into(),
            }],
        }
    }

    /// Built through the domain's own start rules, so new saga fields need no change here.
    fn saga(state: SagaState, branches: Vec<Branch>) -> Saga {
        let mut saga = crate::domain::saga::test_saga(7, state);
        saga.branches = branches;
        saga.reason = "step charge reported abnormal status DECLINED".into();
        saga
    }

    #[test]
    fn an_unknown_branch_is_listed_with_its_polls_and_last_answer() {
        let mut unknown = branch("reserve", BranchState::Unknown);
        unknown.polls = 3;
        unknown.last_poll_outcome = Some(Outcome::Processing);
        unknown.last_poll_ms = 25;
        let items = stuck_in(
            &saga(
                SagaState::Running,
                vec![unknown, branch("charge", BranchState::Succeeded)],
            ),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1);
        let item = &items[0];
        assert_eq!(item.kind, StuckKind::UnknownOutcome);
        assert_eq!(
            (item.branch_id.as_str(), item.node_id.as_str()),
            ("reserve", "reserve-node")
        );
        assert_eq!((item.polls, item.last_poll_ms), (3, 25));
        assert_eq!(item.last_poll_outcome, Some(Outcome::Processing));
        assert!(
            item.reason.contains("3 of 10") && item.reason.contains("PROCESSING"),
            "{}",
            item.reason
        );
    }

    #[test]
    fn an_unknown_branch_of_a_saga_no_longer_running_says_it_is_not_polled() {
        let items = stuck_in(
            &saga(
                SagaState::Reversed,
                vec![branch("charge", BranchState::Unknown)],
            ),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1);
        assert!(
            items[0].reason.contains("no longer polled"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn a_step_waiting_for_its_retry_is_listed_with_when_it_goes_out() {
        let sent = branch("reserve", BranchState::Triggered);
        let mut waiting = branch("charge", BranchState::Triggered);
        waiting.error_code = "UNAVAILABLE".into();
        waiting.retry_at_ms = Some(5_000);
        let items = stuck_in(
            &saga(SagaState::Running, vec![sent, waiting]),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1, "a step still on its way is progress");
        assert_eq!(items[0].kind, StuckKind::StepRetrying);
        assert_eq!(items[0].branch_id, "charge");
        assert_eq!(items[0].next_attempt_ms, Some(5_000));
        assert_eq!(items[0].last_error, "UNAVAILABLE");
        assert!(
            items[0]
                .reason
                .contains("failed (UNAVAILABLE) after 1 sends"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn a_step_stays_listed_as_retrying_while_its_resend_is_on_its_way() {
        // The retry timer fired: the resend is out, so no next send is due yet.
        let mut resent = branch("charge", BranchState::Triggered);
        resent.error_code = "UNAVAILABLE".into();
        resent.attempts = 2;
        let items = stuck_in(&saga(SagaState::Running, vec![resent]), &Policy::default());
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(items[0].kind, StuckKind::StepRetrying);
        assert_eq!(items[0].next_attempt_ms, None);
        assert_eq!(items[0].attempts, 2);
        assert_eq!(items[0].last_error, "UNAVAILABLE");
        assert!(
            items[0].reason.contains("send 2 has no final answer"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn a_reversal_to_be_asked_again_is_listed_before_its_second_send() {
        let mut processing = branch("reserve", BranchState::Reversing);
        processing.retry_at_ms = Some(7_000);
        let items = stuck_in(
            &saga(SagaState::Reversing, vec![processing]),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, StuckKind::ReversalRetrying);
        assert_eq!(items[0].next_attempt_ms, Some(7_000));
        assert!(
            items[0].reason.contains("still processing"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn only_reversals_that_failed_are_listed_as_retrying() {
        let first = branch("reserve", BranchState::Reversing);
        let mut failed = branch("charge", BranchState::Reversing);
        failed.error_code = "LOCKED".into();
        failed.message = "row locked".into();
        failed.attempts = 2;
        let items = stuck_in(
            &saga(SagaState::Reversing, vec![first, failed]),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, StuckKind::ReversalRetrying);
        assert_eq!(items[0].branch_id, "charge");
        assert_eq!(items[0].attempts, 2);
        assert_eq!(items[0].last_error, "LOCKED: row locked");
        assert!(
            items[0].reason.contains("after 2 sends"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn a_running_saga_with_no_step_out_is_listed_as_stalled() {
        let items = stuck_in(
            &saga(
                SagaState::Running,
                vec![
                    branch("reserve", BranchState::Succeeded),
                    branch("charge", BranchState::Succeeded),
                ],
            ),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1, "{items:?}");
        assert_eq!(items[0].kind, StuckKind::Stalled);
        assert!(
            items[0].reason.contains("no deadline"),
            "{}",
            items[0].reason
        );
        let waiting = stuck_in(
            &saga(
                SagaState::Running,
                vec![
                    branch("reserve", BranchState::Succeeded),
                    branch("charge", BranchState::Triggered),
                ],
            ),
            &Policy::default(),
        );
        assert!(waiting.iter().all(|i| i.kind != StuckKind::Stalled));
    }

    #[test]
    fn a_saga_needing_attention_names_its_failed_reversals_and_why_it_reversed() {
        let mut failed = branch("reserve", BranchState::ReversalFailed);
        failed.error_code = "LOCKED".into();
        let items = stuck_in(
            &saga(
                SagaState::NeedsAttention,
                vec![failed, branch("charge", BranchState::Succeeded)],
            ),
            &Policy::default(),
        );
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, StuckKind::NeedsAttention);
        assert!(items[0].branch_id.is_empty());
        assert!(
            items[0].reason.contains("reserve on reserve-node (LOCKED)")
                && items[0].reason.contains("DECLINED"),
            "{}",
            items[0].reason
        );
    }

    #[test]
    fn settled_branches_and_sagas_are_not_stuck() {
        let branches = [
            BranchState::Triggered,
            BranchState::Succeeded,
            BranchState::Failed,
            BranchState::Reversed,
            BranchState::NotOccurred,
        ]
        .iter()
        .map(|s| branch(&format!("{s:?}"), *s))
        .collect();
        assert!(stuck_in(&saga(SagaState::Running, branches), &Policy::default()).is_empty());
    }

    #[test]
    fn a_delivery_is_listed_once_a_send_failed() {
        let flight = |attempts, last_error: &str| InFlight {
            outbox_id: 4,
            gsn: "c1-0000000000000007".into(),
            node_id: "payment".into(),
            kind: "execute",
            attempts,
            last_error: last_error.into(),
        };
        assert_eq!(failing_delivery(flight(1, "")), None);
        let failed = failing_delivery(flight(1, "connection refused")).unwrap();
        assert_eq!(failed.kind, StuckKind::DeliveryFailing);
        assert_eq!((failed.outbox_id, failed.command_kind), (4, "execute"));
        assert!(
            failed.reason.contains("connection refused"),
            "{}",
            failed.reason
        );
        let resending = failing_delivery(flight(3, "")).unwrap();
        assert!(resending.reason.contains("3 sends"), "{}", resending.reason);
    }
}
