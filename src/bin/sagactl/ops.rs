//! `sagactl show`'s branches and timelines, `sagactl stuck` and `sagactl counters`: the
//! operator's view of recovery (S4) over the Coordinator and Operations contracts.

use std::time::Duration;

use sagad::grpc::pb;
use sagad::grpc::pb::operations_client::OperationsClient;
use tonic::transport::Channel;

use crate::{status_text, time_text};

/// Pages are asked for this size; `--limit` caps the rows shown overall.
const PAGE_SIZE: u32 = 200;

fn enum_name(name: Option<&str>, prefix: &str, value: i32) -> String {
    match name {
        Some(name) => name.trim_start_matches(prefix).to_owned(),
        None => value.to_string(),
    }
}

fn branch_state_name(value: i32) -> String {
    enum_name(
        pb::BranchState::try_from(value)
            .ok()
            .map(|s| s.as_str_name()),
        "BRANCH_STATE_",
        value,
    )
}

fn outcome_name(value: i32) -> String {
    enum_name(
        pb::Outcome::try_from(value).ok().map(|o| o.as_str_name()),
        "OUTCOME_",
        value,
    )
}

fn signal_name(value: i32) -> String {
    enum_name(
        pb::Signal::try_from(value).ok().map(|s| s.as_str_name()),
        "SIGNAL_",
        value,
    )
}

fn stuck_kind_name(value: i32) -> String {
    enum_name(
        pb::StuckKind::try_from(value).ok().map(|k| k.as_str_name()),
        "STUCK_KIND_",
        value,
    )
}

fn millis_of(ts: &prost_types::Timestamp) -> i128 {
    i128::from(ts.seconds) * 1000 + i128::from(ts.nanos) / 1_000_000
}

/// How long before `as_of` the instant `at` was, e.g. "4.2s".
fn age(at: &Option<prost_types::Timestamp>, as_of: &Option<prost_types::Timestamp>) -> String {
    match (at, as_of) {
        (Some(at), Some(as_of)) => {
            let ms = (millis_of(as_of) - millis_of(at)).max(0);
            let ms = u64::try_from(ms).unwrap_or(u64::MAX);
            if ms < 60_000 {
                format!("{:.1}s", ms as f64 / 1000.0)
            } else {
                humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
            }
        }
        _ => "-".to_owned(),
    }
}

fn status_text_of(status: &pb::Status) -> String {
    if status.parameters.is_empty() {
        return status.name.clone();
    }
    let parameters: Vec<String> = status
        .parameters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{} ({})", status.name, parameters.join(", "))
}

/// The saga-level lines `show` adds after the basics, then every branch with its processing
/// details (S4): state, attempts, polls, last poll, and its timeline.
pub fn print_progress(saga: &pb::Saga) {
    if saga.strategy_version != 0 {
        outln!("strategy:      version {}", saga.strategy_version);
    }
    if saga.signal != pb::Signal::Unspecified as i32 {
        outln!("signal:        {}", signal_name(saga.signal));
    }
    if !saga.reason.is_empty() {
        outln!("reason:        {}", saga.reason);
    }
    if !saga.reversal_serials.is_empty() {
        outln!("serials:       {}", saga.reversal_serials.join(", "));
    }
    if saga.branches.is_empty() {
        outln!("branches:      none");
        return;
    }
    outln!("branches:      {}", saga.branches.len());
    for branch in &saga.branches {
        outln!();
        outln!(
            "  {} on {}{}",
            branch.branch_id,
            branch.node_id,
            if branch.caller_node_id.is_empty() {
                String::new()
            } else {
                format!(" (called by {})", branch.caller_node_id)
            }
        );
        outln!("    state:      {}", branch_state_name(branch.state));
        outln!(
            "    actions:    {} / reversal {}",
            branch.forward_action,
            if branch.reversal_action.is_empty() {
                "-"
            } else {
                &branch.reversal_action
            }
        );
        if branch.next_attempt_at.is_some() {
            outln!(
                "    attempts:   {} (next at {})",
                branch.attempts,
                time_text(&branch.next_attempt_at)
            );
        } else {
            outln!("    attempts:   {}", branch.attempts);
        }
        outln!("    polls:      {}", branch.polls);
        let last_poll = if branch.last_poll_outcome == pb::Outcome::Unspecified as i32 {
            "-".to_owned()
        } else {
            format!(
                "{} at {}",
                outcome_name(branch.last_poll_outcome),
                time_text(&branch.last_poll_at)
            )
        };
        outln!("    last poll:  {last_poll}");
        if let Some(status) = &branch.last_status {
            outln!("    status:     {}", status_text_of(status));
        }
        if !branch.error_code.is_empty() {
            outln!("    error:      {}", branch.error_code);
        }
        outln!("    created:    {}", time_text(&branch.created_at));
        outln!("    updated:    {}", time_text(&branch.updated_at));
        outln!("    timeline:");
        if branch.timeline.is_empty() {
            outln!("      (empty)");
        }
        for entry in &branch.timeline {
            outln!("      {}  {}", time_text(&entry.at), entry.what);
        }
    }
}

/// What `sagactl attention` shows under a saga: first the branches whose reversal failed, on
/// which node and with what error, since that node is where the operator must look; then the
/// saga's reason, which was set when the reversal started and so names what the saga was
/// undoing (e.g. a step that declined), not what stopped it.
pub fn attention_lines(saga: &pb::Saga) -> Vec<String> {
    let mut lines: Vec<String> = saga
        .branches
        .iter()
        .filter(|b| b.state == pb::BranchState::ReversalFailed as i32)
        .map(|b| {
            let error = if b.error_code.is_empty() {
                "no error code".to_owned()
            } else {
                format!("error {}", b.error_code)
            };
            let latest = match b.timeline.last() {
                Some(entry) => format!("; latest: {}", entry.what),
                None => String::new(),
            };
            format!(
                "failed reversal: {} of {} on node {}, {error}{latest}",
                if b.reversal_action.is_empty() {
                    "-"
                } else {
                    &b.reversal_action
                },
                b.branch_id,
                b.node_id
            )
        })
        .collect();
    let reason = if saga.reason.is_empty() {
        "(none recorded)"
    } else {
        saga.reason.as_str()
    };
    if lines.is_empty() {
        // No failed reversal: a step of a completed saga was undone by its node, and the
        // reason says which.
        lines.push(format!("reason: {reason}"));
    } else {
        lines.push(format!("reversing because (original reason): {reason}"));
    }
    lines
}

fn print_stuck_row(item: &pb::StuckItem, as_of: &Option<prost_types::Timestamp>) {
    let what = if item.kind == pb::StuckKind::DeliveryFailing as i32 {
        format!("{} #{}", item.command_kind, item.outbox_id)
    } else if item.branch_id.is_empty() {
        "(saga)".to_owned()
    } else {
        item.branch_id.clone()
    };
    let polls = if item.kind == pb::StuckKind::UnknownOutcome as i32 {
        item.polls.to_string()
    } else {
        "-".to_owned()
    };
    let last_poll = if item.last_poll_outcome == pb::Outcome::Unspecified as i32 {
        "-".to_owned()
    } else {
        format!(
            "{} {} ago",
            outcome_name(item.last_poll_outcome),
            age(&item.last_poll_at, as_of)
        )
    };
    // How long since the branch or saga last changed: how long recovery has been at it.
    let changed = match age(&item.since, as_of).as_str() {
        "-" => "-".to_owned(),
        age => format!("{age} ago"),
    };
    let reason = match &item.next_attempt_at {
        // `age` counts from its first instant to its second: here, from now to the resend.
        Some(_) => format!(
            "{} (next send in {})",
            item.reason,
            age(as_of, &item.next_attempt_at)
        ),
        None => item.reason.clone(),
    };
    outln!(
        "{:<18} {:<20} {:<16} {:<12} {:>8} {:>5}  {:<22} {:<10} {}",
        stuck_kind_name(item.kind),
        item.gsn,
        what,
        if item.node_id.is_empty() {
            "-"
        } else {
            &item.node_id
        },
        item.attempts,
        polls,
        last_poll,
        changed,
        reason
    );
}

/// `sagactl stuck`: follows ListStuck's pages until the scan ends or `limit` rows are shown.
pub async fn stuck(channel: Channel, limit: u32) -> Result<(), String> {
    let mut client = OperationsClient::new(channel);
    let mut page_token = String::new();
    let mut shown = 0u32;
    let mut examined = 0u64;
    let mut not_shown = 0u32;
    let mut more = false;
    outln!(
        "{:<18} {:<20} {:<16} {:<12} {:>8} {:>5}  {:<22} {:<10} REASON",
        "KIND",
        "GSN",
        "WHAT",
        "NODE",
        "ATTEMPTS",
        "POLLS",
        "LAST POLL",
        "CHANGED"
    );
    loop {
        let page = client
            .list_stuck(pb::ListStuckRequest {
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
                max_examined: 0,
            })
            .await
            .map_err(status_text)?
            .into_inner();
        examined += u64::from(page.sagas_examined);
        not_shown = not_shown.max(page.deliveries_not_shown);
        for item in &page.items {
            if shown == limit {
                more = true;
                break;
            }
            print_stuck_row(item, &page.as_of);
            shown += 1;
        }
        if more || page.next_page_token.is_empty() {
            more = more || !page.next_page_token.is_empty();
            break;
        }
        page_token = page.next_page_token;
    }
    if shown == 0 && !more {
        outln!("(nothing is stuck: {examined} sagas examined, no failing delivery)");
    } else {
        outln!("({shown} shown; {examined} sagas examined)");
    }
    if not_shown > 0 {
        outln!("({not_shown} more failing deliveries not shown)");
    }
    if more {
        // The scan stopped at the limit, so what lies past it was not read.
        outln!("(the scan stopped at --limit {limit}; there may be more: raise it)");
    }
    Ok(())
}

/// `sagactl counters`: every engine counter, as name, value and meaning.
pub async fn counters(channel: Channel) -> Result<(), String> {
    let response = OperationsClient::new(channel)
        .get_counters(pb::GetCountersRequest {})
        .await
        .map_err(status_text)?
        .into_inner();
    outln!("{:<26} {:>12}  MEANING", "COUNTER", "VALUE");
    for counter in &response.counters {
        outln!(
            "{:<26} {:>12}  {}",
            counter.name,
            counter.value,
            counter.description
        );
    }
    outln!(
        "(since sagad started; read at {})",
        time_text(&response.as_of)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(id: &str, node: &str, state: pb::BranchState, error_code: &str) -> pb::Branch {
        pb::Branch {
            branch_id: id.to_owned(),
            node_id: node.to_owned(),
            reversal_action: format!("undo-{id}"),
            state: state as i32,
            error_code: error_code.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn attention_names_the_node_whose_reversal_failed_before_the_original_reason() {
        let mut locked = branch("charge", "bank", pb::BranchState::ReversalFailed, "LOCKED");
        locked.timeline.push(pb::TimelineEntry {
            at: None,
            what: "reversal failed: not retryable; needs an operator".to_owned(),
        });
        let saga = pb::Saga {
            reason: "step ship reported abnormal status DECLINED".to_owned(),
            branches: vec![
                branch("ship", "depot", pb::BranchState::Failed, "DECLINED"),
                locked,
            ],
            ..Default::default()
        };
        assert_eq!(
            attention_lines(&saga),
            [
                "failed reversal: undo-charge of charge on node bank, error LOCKED; latest: \
                 reversal failed: not retryable; needs an operator",
                "reversing because (original reason): step ship reported abnormal status DECLINED",
            ]
        );
    }

    #[test]
    fn attention_without_a_failed_reversal_shows_the_sagas_reason() {
        let saga = pb::Saga {
            reason: "step pay of the completed saga was undone by node bank".to_owned(),
            branches: vec![branch("pay", "bank", pb::BranchState::Reversed, "")],
            ..Default::default()
        };
        assert_eq!(
            attention_lines(&saga),
            ["reason: step pay of the completed saga was undone by node bank"]
        );
    }
}
