//! The Retries service at the edge: central failure-retry control (S5). Converts the contract's
//! messages to the domain's retry values and back; the decisions are made in `domain::retry`
//! and stored by the engine.

use prost::Message;
use prost_types::Duration as PbDuration;
use tonic::{Request, Response, Status};

use crate::domain::retry::{
    ChannelRetry, Check, Checked, Config, Decision, DecisionKind, Draft, DraftPolicy,
    DraftTransaction, History, Layer, Overrides, Policy,
};
use crate::domain::{Millis, Violation};
use crate::engine::Engine;
use crate::grpc::{answer, convert, fingerprint, pb, status};

pub struct RetriesService {
    engine: Engine,
}

impl RetriesService {
    pub fn new(engine: Engine) -> RetriesService {
        RetriesService { engine }
    }
}

#[tonic::async_trait]
impl pb::retries_server::Retries for RetriesService {
    async fn check_retry(
        &self,
        request: Request<pb::CheckRetryRequest>,
    ) -> Result<Response<pb::CheckRetryResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let check = Check {
            original_serial: request.original_serial,
            transaction_code: request.transaction_code,
            channel: request.channel,
            error_code: request.error_code,
            idempotency_scope: request.idempotency_scope,
        };
        let answered = self
            .engine
            .check_retry(&request.request_id, check, digest, |checked| {
                check_response(checked).encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        let response = answer::<pb::CheckRetryResponse>(answered)?;
        let body = response.get_ref();
        tracing::debug!(
            retry_serial = %body.retry_serial,
            decision = body.decision().as_str_name(),
            config_version = body.config_version,
            replayed = response.metadata().contains_key(crate::grpc::REPLAYED_HEADER),
            "retry checked"
        );
        Ok(response)
    }

    async fn put_retry_config(
        &self,
        request: Request<pb::PutRetryConfigRequest>,
    ) -> Result<Response<pb::PutRetryConfigResponse>, Status> {
        let request = request.into_inner();
        // `version` and `updated_at` are ignored on input, so they are no part of what makes
        // two requests the same: a configuration read back with GetRetryConfig and put again
        // under its first request_id is a repeat, not a different body.
        let mut body = request.clone();
        if let Some(config) = body.config.as_mut() {
            config.version = 0;
            config.updated_at = None;
        }
        let digest = fingerprint(&mut body, |r| &mut r.request_id);
        let Some(config) = request.config else {
            return Err(status::invalid(&[Violation::new(
                "config",
                "is required; send an empty RetryConfig to return to the built-in defaults",
            )]));
        };
        let (draft, mut violations) = draft_from_pb(config);
        if !violations.is_empty() {
            // Report the edge's problems together with the domain's, so one round fixes all.
            if let Err(more) = crate::domain::retry::validate(&draft) {
                violations.extend(more);
            }
            return Err(status::invalid(&violations));
        }
        let answered = self
            .engine
            .put_retry_config(&request.request_id, draft, digest, |config| {
                pb::PutRetryConfigResponse {
                    config: Some(config_to_pb(config)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        let response = answer::<pb::PutRetryConfigResponse>(answered)?;
        tracing::info!(
            version = response.get_ref().config.as_ref().map_or(0, |c| c.version),
            replayed = response
                .metadata()
                .contains_key(crate::grpc::REPLAYED_HEADER),
            "retry configuration stored"
        );
        Ok(response)
    }

    async fn get_retry_config(
        &self,
        _: Request<pb::GetRetryConfigRequest>,
    ) -> Result<Response<pb::GetRetryConfigResponse>, Status> {
        let config = self
            .engine
            .retry_config()
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::GetRetryConfigResponse {
            config: Some(config_to_pb(&config)),
        }))
    }

    async fn get_retry_history(
        &self,
        request: Request<pb::GetRetryHistoryRequest>,
    ) -> Result<Response<pb::GetRetryHistoryResponse>, Status> {
        let history = self
            .engine
            .retry_history(&request.get_ref().serial)
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(history_to_pb(&history)))
    }
}

fn duration_ms(
    field: &str,
    value: Option<&PbDuration>,
    violations: &mut Vec<Violation>,
) -> Option<Millis> {
    match convert::duration(field, value?) {
        // Rounded up, as every duration a client gives, so a bound is never let under.
        Ok(d) => Some(crate::domain::millis_rounded_up(d)),
        Err(v) => {
            violations.push(v);
            None
        }
    }
}

fn draft_policy(
    prefix: &str,
    policy: Option<pb::RetryPolicy>,
    violations: &mut Vec<Violation>,
) -> DraftPolicy {
    let Some(policy) = policy else {
        return DraftPolicy::default();
    };
    DraftPolicy {
        min_interval_ms: duration_ms(
            &format!("{prefix}.min_interval"),
            policy.min_interval.as_ref(),
            violations,
        ),
        max_interval_ms: duration_ms(
            &format!("{prefix}.max_interval"),
            policy.max_interval.as_ref(),
            violations,
        ),
        retryable_codes: policy.retryable_codes,
        max_retries: policy.max_retries,
        backoff_factor: policy.backoff_factor,
    }
}

/// The submitted configuration, and what could not be read of it (negative durations). The
/// version and update time are sagad's to assign and are ignored.
fn draft_from_pb(config: pb::RetryConfig) -> (Draft, Vec<Violation>) {
    let mut violations = Vec::new();
    let defaults = draft_policy("config.defaults", config.defaults, &mut violations);
    let transactions = config
        .transactions
        .into_iter()
        .enumerate()
        .map(|(i, t)| DraftTransaction {
            transaction_code: t.transaction_code,
            policy: draft_policy(
                &format!("config.transactions[{i}].policy"),
                t.policy,
                &mut violations,
            ),
        })
        .collect();
    let channels = config
        .channels
        .into_iter()
        .map(|c| ChannelRetry {
            channel: c.channel,
            transaction_code: c.transaction_code,
            retryable_codes: c.retryable_codes,
        })
        .collect();
    (
        Draft {
            defaults,
            transactions,
            channels,
        },
        violations,
    )
}

fn factor(milli: u32) -> f64 {
    f64::from(milli) / 1_000.0
}

fn policy_to_pb(policy: &Policy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        retryable_codes: policy.retryable_codes.clone(),
        max_retries: Some(policy.max_retries),
        min_interval: Some(convert::duration_pb(policy.min_interval_ms)),
        backoff_factor: Some(factor(policy.backoff_factor_milli)),
        max_interval: Some(convert::duration_pb(policy.max_interval_ms)),
    }
}

fn overrides_to_pb(overrides: &Overrides) -> pb::RetryPolicy {
    pb::RetryPolicy {
        retryable_codes: overrides.retryable_codes.clone().unwrap_or_default(),
        max_retries: overrides.max_retries,
        min_interval: overrides.min_interval_ms.map(convert::duration_pb),
        backoff_factor: overrides.backoff_factor_milli.map(factor),
        max_interval: overrides.max_interval_ms.map(convert::duration_pb),
    }
}

fn config_to_pb(config: &Config) -> pb::RetryConfig {
    let rules = &config.rules;
    pb::RetryConfig {
        version: config.version,
        defaults: Some(policy_to_pb(&rules.defaults)),
        transactions: rules
            .transactions
            .iter()
            .map(|t| pb::TransactionRetry {
                transaction_code: t.transaction_code.clone(),
                policy: Some(overrides_to_pb(&t.overrides)),
            })
            .collect(),
        channels: rules
            .channels
            .iter()
            .map(|c| pb::ChannelRetry {
                channel: c.channel.clone(),
                transaction_code: c.transaction_code.clone(),
                retryable_codes: c.retryable_codes.clone(),
            })
            .collect(),
        // The built-in configuration (version 0) was never stored.
        updated_at: (config.version != 0).then(|| convert::timestamp(config.updated_ms)),
    }
}

fn decision_pb(kind: DecisionKind) -> pb::RetryDecision {
    match kind {
        DecisionKind::Allow => pb::RetryDecision::Allow,
        DecisionKind::NotRetryable => pb::RetryDecision::NotRetryable,
        DecisionKind::Exhausted => pb::RetryDecision::Exhausted,
        DecisionKind::TooSoon => pb::RetryDecision::TooSoon,
        DecisionKind::AlreadySucceeded => pb::RetryDecision::AlreadySucceeded,
        DecisionKind::InProgress => pb::RetryDecision::InProgress,
    }
}

fn layer_pb(layer: Option<Layer>) -> pb::RetryLayer {
    match layer {
        None => pb::RetryLayer::Unspecified,
        Some(Layer::Defaults) => pb::RetryLayer::Defaults,
        Some(Layer::Transaction) => pb::RetryLayer::Transaction,
        // The contract has one channel layer; the reason says whether the entry was the
        // channel's own for this transaction code.
        Some(Layer::Channel | Layer::ChannelForTransaction) => pb::RetryLayer::Channel,
    }
}

fn check_response(checked: &Checked) -> pb::CheckRetryResponse {
    let decision = &checked.decision;
    let mut response = pb::CheckRetryResponse {
        decision: decision_pb(decision.kind()) as i32,
        retry_serial: String::new(),
        attempt: 0,
        retry_after: None,
        layer: layer_pb(decision.layer()) as i32,
        stored_response: Vec::new(),
        config_version: checked.config_version,
        reason: decision.reason(),
    };
    match decision {
        Decision::Allow {
            attempt,
            retry_serial,
            ..
        } => {
            response.attempt = *attempt;
            response.retry_serial = retry_serial.clone();
        }
        Decision::Exhausted { attempts, .. } => response.attempt = *attempts,
        Decision::TooSoon { retry_after_ms, .. } => {
            response.retry_after = Some(convert::duration_pb(*retry_after_ms));
        }
        Decision::AlreadySucceeded {
            response: stored, ..
        } => response.stored_response = stored.clone(),
        Decision::NotRetryable { .. } | Decision::InProgress { .. } => {}
    }
    response
}

fn history_to_pb(history: &History) -> pb::GetRetryHistoryResponse {
    pb::GetRetryHistoryResponse {
        original_serial: history.original_serial.clone(),
        transaction_code: history.transaction_code.clone(),
        attempts: history
            .attempts
            .iter()
            .map(|a| pb::RetryAttempt {
                retry_serial: a.retry_serial.clone(),
                attempt: a.attempt,
                error_code: a.error_code.clone(),
                decision: decision_pb(a.decision) as i32,
                decided_at: Some(convert::timestamp(a.decided_ms)),
                config_version: a.config_version,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_duration_is_reported_with_its_path() {
        let (_, violations) = draft_from_pb(pb::RetryConfig {
            transactions: vec![pb::TransactionRetry {
                transaction_code: "t".into(),
                policy: Some(pb::RetryPolicy {
                    min_interval: Some(PbDuration {
                        seconds: -1,
                        nanos: 0,
                    }),
                    ..pb::RetryPolicy::default()
                }),
            }],
            ..pb::RetryConfig::default()
        });
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["config.transactions[0].policy.min_interval"]);
    }

    #[test]
    fn the_builtin_config_shows_as_version_zero_without_an_update_time() {
        let shown = config_to_pb(&Config::builtin());
        assert_eq!(shown.version, 0);
        assert!(shown.updated_at.is_none());
        let defaults = shown.defaults.unwrap_or_default();
        assert_eq!(defaults.max_retries, Some(5));
        assert_eq!(defaults.backoff_factor, Some(2.0));
        assert_eq!(
            defaults.min_interval,
            Some(PbDuration {
                seconds: 1,
                nanos: 0
            })
        );
    }

    #[test]
    fn a_draft_read_from_pb_validates_to_what_config_to_pb_shows() {
        let submitted = pb::RetryConfig {
            version: 77,
            defaults: Some(pb::RetryPolicy {
                retryable_codes: vec!["TIMEOUT".into()],
                max_retries: Some(2),
                min_interval: Some(convert::duration_pb(1_500)),
                backoff_factor: Some(1.5),
                max_interval: Some(convert::duration_pb(30_000)),
            }),
            transactions: vec![pb::TransactionRetry {
                transaction_code: "payments.charge".into(),
                policy: Some(pb::RetryPolicy {
                    max_retries: Some(1),
                    ..pb::RetryPolicy::default()
                }),
            }],
            channels: vec![pb::ChannelRetry {
                channel: "mobile".into(),
                transaction_code: String::new(),
                retryable_codes: vec!["NETWORK_LOST".into()],
            }],
            updated_at: None,
        };
        let (draft, violations) = draft_from_pb(submitted.clone());
        assert!(violations.is_empty());
        let rules = crate::domain::retry::validate(&draft).expect("valid");
        let shown = config_to_pb(&Config::next(rules, Some(3), 0));
        assert_eq!(shown.version, 4);
        assert_eq!(shown.defaults, submitted.defaults);
        assert_eq!(shown.transactions, submitted.transactions);
        assert_eq!(shown.channels, submitted.channels);
    }
}
