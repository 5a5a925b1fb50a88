//! The Operations service at the edge: the operators' view of recovery (ListStuck) and the
//! engine's counters (GetCounters), converted to `pb`. Read-only.

use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::engine::operations::{Stuck, StuckKind, StuckQuery};
use crate::grpc::{convert, pb, status};

pub struct OperationsService {
    engine: Engine,
}

impl OperationsService {
    pub fn new(engine: Engine) -> OperationsService {
        OperationsService { engine }
    }
}

fn kind(kind: StuckKind) -> pb::StuckKind {
    match kind {
        StuckKind::UnknownOutcome => pb::StuckKind::UnknownOutcome,
        StuckKind::ReversalRetrying => pb::StuckKind::ReversalRetrying,
        StuckKind::NeedsAttention => pb::StuckKind::NeedsAttention,
        StuckKind::DeliveryFailing => pb::StuckKind::DeliveryFailing,
        StuckKind::StepRetrying => pb::StuckKind::StepRetrying,
        StuckKind::UnreadableSaga => pb::StuckKind::UnreadableSaga,
        StuckKind::Stalled => pb::StuckKind::Stalled,
    }
}

fn item(stuck: Stuck) -> pb::StuckItem {
    pb::StuckItem {
        kind: kind(stuck.kind) as i32,
        gsn: stuck.gsn,
        branch_id: stuck.branch_id,
        node_id: stuck.node_id,
        reason: stuck.reason,
        saga_state: stuck
            .saga_state
            .map_or(pb::SagaState::Unspecified, convert::saga_state) as i32,
        branch_state: stuck
            .branch_state
            .map_or(pb::BranchState::Unspecified, convert::branch_state)
            as i32,
        attempts: stuck.attempts,
        polls: stuck.polls,
        last_poll_outcome: stuck
            .last_poll_outcome
            .map_or(pb::Outcome::Unspecified, convert::outcome_to_pb)
            as i32,
        last_poll_at: (stuck.last_poll_ms != 0).then(|| convert::timestamp(stuck.last_poll_ms)),
        last_error: stuck.last_error,
        since: (stuck.since_ms != 0).then(|| convert::timestamp(stuck.since_ms)),
        outbox_id: stuck.outbox_id,
        command_kind: stuck.command_kind.to_owned(),
        next_attempt_at: stuck.next_attempt_ms.map(convert::timestamp),
    }
}

/// What each counter counts, for people reading an export; an unknown name gets none.
fn describe(name: &str) -> &'static str {
    match name {
        "commands_delivered" => "commands a node answered",
        "delivery_failures" => "sends of a command to a node's endpoint that failed or timed out",
        "polls_sent" => "QueryStatus polls issued for branches whose outcome is unknown (S4)",
        "poll_answers" => "answers to QueryStatus polls recorded",
        "escalations" => {
            "sagas reversed because a node never said what happened within the poll budget"
        }
        "timers_fired" => {
            "step timeouts, polls, reversal retries and deadlines that came due (one whose \
             write was taken back, e.g. over a payload that does not decode, counts too)"
        }
        "reversals_started" => "reversal actions issued to nodes",
        "sagas_completed" => "times a saga ended COMPLETED",
        "sagas_reversed" => {
            "times a saga ended REVERSED (one reopened to reverse a late success counts again \
             when it ends again)"
        }
        "sagas_needing_attention" => {
            "times a saga went to NEEDS_ATTENTION: a reversal failed past its budget, or a node \
             undid a step of a COMPLETED saga"
        }
        "ledger_flushes" => {
            "flushes that made groups of ledger writes durable (one per group, shared by its writes)"
        }
        _ => "",
    }
}

#[tonic::async_trait]
impl pb::operations_server::Operations for OperationsService {
    async fn list_stuck(
        &self,
        request: Request<pb::ListStuckRequest>,
    ) -> Result<Response<pb::ListStuckResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .engine
            .list_stuck(StuckQuery {
                page_size: request.page_size,
                page_token: request.page_token,
                max_examined: request.max_examined,
            })
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::ListStuckResponse {
            items: page.items.into_iter().map(item).collect(),
            next_page_token: page.next_page_token,
            sagas_examined: page.sagas_examined,
            deliveries_not_shown: page.deliveries_not_shown,
            as_of: Some(convert::timestamp(page.as_of_ms)),
        }))
    }

    async fn get_counters(
        &self,
        _: Request<pb::GetCountersRequest>,
    ) -> Result<Response<pb::GetCountersResponse>, Status> {
        let counters = self
            .engine
            .counters()
            .into_iter()
            .map(|(name, value)| pb::Counter {
                name: name.to_owned(),
                value,
                description: describe(name).to_owned(),
            })
            .collect();
        Ok(Response::new(pb::GetCountersResponse {
            counters,
            as_of: Some(convert::timestamp(self.engine.now_ms())),
        }))
    }
}
