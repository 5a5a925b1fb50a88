//! The Strategies service at the edge: fulfillment strategies (S2) put, read and listed, and
//! the conversions between `pb` strategies and the domain's. Validation itself is the
//! domain's (`strategy_validation`); this file only moves fields across, refusing what cannot
//! be moved (a malformed Duration).

use prost::Message;
use prost_types::Duration as PbDuration;
use tonic::{Request, Response, Status};

use crate::domain::Violation;
use crate::domain::ids::RequestId;
use crate::domain::strategy::{Meaning, StepStatus, Strategy};
use crate::domain::strategy_validation::{
    ExceptionScopeInput, RuleInput, StatusMappingInput, StepInput, StrategyInput,
};
use crate::engine::Engine;
use crate::grpc::{REPLAYED_HEADER, answer, convert, fingerprint, pb, status};

pub struct StrategiesService {
    engine: Engine,
}

impl StrategiesService {
    pub fn new(engine: Engine) -> StrategiesService {
        StrategiesService { engine }
    }
}

#[tonic::async_trait]
impl pb::strategies_server::Strategies for StrategiesService {
    async fn put_strategy(
        &self,
        request: Request<pb::PutStrategyRequest>,
    ) -> Result<Response<pb::PutStrategyResponse>, Status> {
        let request = request.into_inner();
        // `version` and `created_at` are ignored on input, so they are no part of what makes
        // two requests the same: a strategy read back with GetStrategy and put again under
        // its first request_id is a repeat, not a different body.
        let mut body = request.clone();
        if let Some(strategy) = body.strategy.as_mut() {
            strategy.version = 0;
            strategy.created_at = None;
        }
        let digest = fingerprint(&mut body, |r| &mut r.request_id);
        let Some(strategy) = request.strategy else {
            let mut violations = vec![Violation::new(
                "strategy",
                "is required: the strategy to store (business_type, steps, first_set, rules, \
                 end_statuses, ...)",
            )];
            if request.request_id.is_empty() {
                violations.push(Violation::new("request_id", "is required"));
            }
            return Err(status::invalid(&violations));
        };
        let (input, mut violations) = strategy_input(strategy);
        if !violations.is_empty() {
            // Reported with the request id's and the domain's problems, so one round fixes all.
            if let Err(e) = RequestId::parse(&request.request_id) {
                violations.insert(0, Violation::new("request_id", e.to_string()));
            }
            if let Err(more) = crate::domain::strategy_validation::validate(input, 0, 0) {
                violations.extend(more);
            }
            return Err(status::invalid(&violations));
        }
        let answered = self
            .engine
            .put_strategy(&request.request_id, input, digest, |stored| {
                pb::PutStrategyResponse {
                    strategy: Some(strategy_pb(stored)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        let response = answer::<pb::PutStrategyResponse>(answered)?;
        if let Some(stored) = &response.get_ref().strategy {
            tracing::info!(
                business_type = %stored.business_type,
                version = stored.version,
                replayed = response.metadata().contains_key(REPLAYED_HEADER),
                "strategy stored"
            );
        }
        Ok(response)
    }

    async fn get_strategy(
        &self,
        request: Request<pb::GetStrategyRequest>,
    ) -> Result<Response<pb::GetStrategyResponse>, Status> {
        let request = request.get_ref();
        let strategy = self
            .engine
            .get_strategy(&request.business_type, request.version)
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::GetStrategyResponse {
            strategy: Some(strategy_pb(&strategy)),
        }))
    }

    async fn list_strategies(
        &self,
        request: Request<pb::ListStrategiesRequest>,
    ) -> Result<Response<pb::ListStrategiesResponse>, Status> {
        let request = request.get_ref();
        let page = self
            .engine
            .list_strategies(request.page_size, &request.page_token)
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::ListStrategiesResponse {
            strategies: page.strategies.iter().map(strategy_pb).collect(),
            next_page_token: page.next_page_token,
            unreadable_business_types: page.unreadable_business_types,
        }))
    }
}

/// A wire duration in signed milliseconds, so that a negative one reaches validation and is
/// explained there. A positive duration under a millisecond rounds up to one, rather than
/// down to a zero the caller never wrote. A Duration the protobuf spec calls invalid (nanos
/// beyond ±999,999,999, or of another sign than seconds) is refused, as `convert::duration`
/// refuses it for the other services: its meaning would be a guess.
fn duration_ms(field: &str, d: &PbDuration) -> Result<i64, Violation> {
    if !(-999_999_999..=999_999_999).contains(&d.nanos) {
        return Err(Violation::new(
            field,
            format!(
                "has nanos {}; nanos must be -999,999,999 to 999,999,999 (whole seconds go in \
                 seconds)",
                d.nanos
            ),
        ));
    }
    if d.seconds.signum() * i64::from(d.nanos.signum()) < 0 {
        return Err(Violation::new(
            field,
            format!(
                "has seconds {} and nanos {} of opposite signs; give both the sign of the \
                 duration",
                d.seconds, d.nanos
            ),
        ));
    }
    let whole = d.seconds.saturating_mul(1000);
    let nanos = i64::from(d.nanos);
    let part = if nanos > 0 {
        (nanos + 999_999) / 1_000_000
    } else {
        nanos / 1_000_000
    };
    Ok(whole.saturating_add(part))
}

fn duration_pb(ms: u64) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// `None` for UNSPECIFIED and for numbers this sagad does not know; validation explains both.
fn meaning(value: i32) -> Option<Meaning> {
    match pb::StatusMeaning::try_from(value).ok()? {
        pb::StatusMeaning::Unspecified => None,
        pb::StatusMeaning::Normal => Some(Meaning::Normal),
        pb::StatusMeaning::Abnormal => Some(Meaning::Abnormal),
        pb::StatusMeaning::End => Some(Meaning::End),
    }
}

fn meaning_pb(meaning: Meaning) -> pb::StatusMeaning {
    match meaning {
        Meaning::Normal => pb::StatusMeaning::Normal,
        Meaning::Abnormal => pb::StatusMeaning::Abnormal,
        Meaning::End => pb::StatusMeaning::End,
    }
}

fn step_status(s: pb::StepStatus) -> StepStatus {
    StepStatus {
        step_id: s.step_id,
        status: s.status,
    }
}

fn step_status_pb(s: &StepStatus) -> pb::StepStatus {
    pb::StepStatus {
        step_id: s.step_id.clone(),
        status: s.status.clone(),
    }
}

/// A submitted strategy as the domain's plain input; `version` and `created_at` are ignored,
/// as the contract says.
/// The domain's input and the problems of fields that cannot be moved across; such a field is
/// left unset, so validation does not report it a second time.
fn strategy_input(s: pb::Strategy) -> (StrategyInput, Vec<Violation>) {
    let mut violations = Vec::new();
    let mut ms = |field: String, d: Option<PbDuration>| {
        d.and_then(|d| duration_ms(&field, &d).map_err(|v| violations.push(v)).ok())
    };
    let input = StrategyInput {
        business_type: s.business_type,
        description: s.description,
        steps: s
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| StepInput {
                id: step.id,
                node_id: step.node_id,
                forward_action: step.forward_action,
                reversal_action: step.reversal_action,
                timeout_ms: ms(format!("strategy.steps[{i}].timeout"), step.timeout),
            })
            .collect(),
        first_set: s.first_set,
        rules: s
            .rules
            .into_iter()
            .map(|r| RuleInput {
                when: r.when.into_iter().map(step_status).collect(),
                trigger: r.trigger,
            })
            .collect(),
        end_statuses: s.end_statuses.into_iter().map(step_status).collect(),
        abnormal_statuses: s.abnormal_statuses.into_iter().map(step_status).collect(),
        status_mappings: s
            .status_mappings
            .into_iter()
            .map(|m| StatusMappingInput {
                step_id: m.step_id,
                parameter: m.parameter,
                value: m.value,
                meaning: meaning(m.meaning),
            })
            .collect(),
        exception_scopes: s
            .exception_scopes
            .into_iter()
            .map(|e| ExceptionScopeInput {
                step_id: e.step_id,
                reverse: e.reverse,
            })
            .collect(),
        saga_timeout_ms: ms("strategy.saga_timeout".to_owned(), s.saga_timeout),
    };
    (input, violations)
}

/// A stored strategy on the wire. Every step carries its effective timeout (the default
/// filled in), so a reader sees exactly what a saga will wait.
pub(crate) fn strategy_pb(s: &Strategy) -> pb::Strategy {
    pb::Strategy {
        business_type: s.business_type.clone(),
        version: s.version,
        description: s.description.clone(),
        steps: s
            .steps
            .iter()
            .map(|step| pb::Step {
                id: step.id.clone(),
                node_id: step.node_id.clone(),
                forward_action: step.forward_action.clone(),
                reversal_action: step.reversal_action.clone(),
                timeout: Some(duration_pb(step.timeout_ms)),
            })
            .collect(),
        first_set: s.first_set.clone(),
        rules: s
            .rules
            .iter()
            .map(|r| pb::Rule {
                when: r.when.iter().map(step_status_pb).collect(),
                trigger: r.trigger.clone(),
            })
            .collect(),
        end_statuses: s.end_statuses.iter().map(step_status_pb).collect(),
        abnormal_statuses: s.abnormal_statuses.iter().map(step_status_pb).collect(),
        status_mappings: s
            .status_mappings
            .iter()
            .map(|m| pb::StatusMapping {
                step_id: m.step_id.clone().unwrap_or_default(),
                parameter: m.parameter.clone(),
                value: m.value.clone(),
                meaning: meaning_pb(m.meaning) as i32,
            })
            .collect(),
        exception_scopes: s
            .exception_scopes
            .iter()
            .map(|(step_id, reverse)| pb::ExceptionScope {
                step_id: step_id.clone(),
                reverse: reverse.clone(),
            })
            .collect(),
        saga_timeout: (s.saga_timeout_ms != 0).then(|| duration_pb(s.saga_timeout_ms)),
        created_at: Some(convert::timestamp(s.created_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::strategy_validation::validate;

    fn wire_order() -> pb::Strategy {
        let step = |id: &str, node_id: &str| pb::Step {
            id: id.into(),
            node_id: node_id.into(),
            forward_action: id.into(),
            reversal_action: format!("undo-{id}"),
            timeout: None,
        };
        let status = |step_id: &str, status: &str| pb::StepStatus {
            step_id: step_id.into(),
            status: status.into(),
        };
        pb::Strategy {
            business_type: "order".into(),
            version: 99,
            description: "reserve and charge, then ship".into(),
            steps: vec![
                step("reserve", "inventory"),
                pb::Step {
                    timeout: Some(PbDuration {
                        seconds: 5,
                        nanos: 250_000_000,
                    }),
                    ..step("charge", "payment")
                },
                step("ship", "shipping"),
            ],
            first_set: vec!["reserve".into(), "charge".into()],
            rules: vec![pb::Rule {
                when: vec![status("reserve", "RESERVED"), status("charge", "PAID")],
                trigger: vec!["ship".into()],
            }],
            end_statuses: vec![status("ship", "SHIPPED")],
            abnormal_statuses: vec![status("charge", "DECLINED")],
            status_mappings: vec![pb::StatusMapping {
                step_id: String::new(),
                parameter: "result_code".into(),
                value: "E12".into(),
                meaning: pb::StatusMeaning::Abnormal as i32,
            }],
            exception_scopes: vec![pb::ExceptionScope {
                step_id: "charge".into(),
                reverse: vec!["reserve".into()],
            }],
            saga_timeout: Some(PbDuration {
                seconds: 600,
                nanos: 0,
            }),
            created_at: None,
        }
    }

    #[test]
    fn a_wire_strategy_comes_back_as_sent_with_defaults_filled_in() {
        let sent = wire_order();
        let (input, violations) = strategy_input(sent.clone());
        assert_eq!(violations, []);
        let stored = validate(input, 1, 1_500).unwrap();
        let back = strategy_pb(&stored);
        assert_eq!(back.version, 1, "the version is sagad's, not the caller's");
        assert_eq!(back.created_at, Some(convert::timestamp(1_500)));
        assert_eq!(
            back.steps[0].timeout,
            Some(PbDuration {
                seconds: 30,
                nanos: 0
            })
        );
        assert_eq!(back.steps[1].timeout, sent.steps[1].timeout);
        assert_eq!(back.rules, sent.rules);
        assert_eq!(back.status_mappings, sent.status_mappings);
        assert_eq!(back.exception_scopes, sent.exception_scopes);
        assert_eq!(back.saga_timeout, sent.saga_timeout);
    }

    #[test]
    fn wire_durations_become_signed_milliseconds() {
        for (seconds, nanos, ms) in [
            (30, 0, 30_000),
            (1, 500_000_000, 1_500),
            (0, 1, 1),
            (0, 0, 0),
            (-1, 0, -1_000),
            (0, -500_000_000, -500),
            (i64::MAX, 0, i64::MAX),
        ] {
            assert_eq!(
                duration_ms("timeout", &PbDuration { seconds, nanos }),
                Ok(ms),
                "{seconds}s {nanos}ns"
            );
        }
    }

    #[test]
    fn an_unspecified_or_unknown_meaning_is_left_for_validation_to_explain() {
        assert_eq!(meaning(pb::StatusMeaning::Unspecified as i32), None);
        assert_eq!(meaning(42), None);
        assert_eq!(meaning(pb::StatusMeaning::End as i32), Some(Meaning::End));
    }
}
