//! Central failure-retry control (S5) in the engine: storing versioned retry configurations,
//! answering CheckRetry as one idempotent ledger write (read config and history, decide,
//! append to the retry check table, link the new retry serial), and reading histories. The
//! rules themselves are `domain::retry`; this file only loads, stores and converts.

use crate::domain::idempotency::RecordState;
use crate::domain::ids::RequestId;
use crate::domain::retry::{
    self, Attempt, ChannelRetry, Check, Checked, Config, Decision, DecisionKind, Draft, History,
    Overrides, Policy, Recorded, Rules, TransactionRetry,
};
use crate::domain::{Millis, Violation};
use crate::store::{
    self, ChannelRetryRecord, IdempotencyKey, IdempotencyNamespace, RetryAttemptRecord,
    RetryConfigRecord, RetryHistoryRecord, RetryPolicyRecord, TransactionRetryRecord, WriteTx,
};

use super::{Answered, Engine, Error, stored_record};

/// The result a participant's Idempotency.Finish must carry for CheckRetry to answer
/// ALREADY_SUCCEEDED from it.
pub const SUCCEEDED: &str = "SUCCEEDED";

/// The retry configuration in force: the latest stored version, or the built-in defaults as
/// version 0 if none was ever stored. For the engine's own redelivery: call it inside the
/// write that schedules the redelivery, then `retry::resolve` and `retry::redelivery`.
pub(crate) fn load_retry_config(tx: &WriteTx<'_>) -> Result<Config, Error> {
    match tx.retry_config()? {
        Some(record) => Ok(config_from_record(record)),
        None => Ok(Config::builtin()),
    }
}

fn request_id(text: &str, violations: &mut Vec<Violation>) -> Option<RequestId> {
    match RequestId::parse(text) {
        Ok(id) => Some(id),
        Err(e) => {
            violations.push(Violation::new("request_id", e.to_string()));
            None
        }
    }
}

impl Engine {
    /// Stores `draft` as the next version (1, 2, 3 …), idempotent on `request_id_text`. The
    /// new version decides from the next CheckRetry on; `encode` makes the stored response.
    pub async fn put_retry_config<F>(
        &self,
        request_id_text: &str,
        draft: Draft,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Config) -> Vec<u8> + Send + 'static,
    {
        let mut violations = Vec::new();
        let request_id = request_id(request_id_text, &mut violations);
        let rules = retry::validate(&draft)
            .map_err(|v| violations.extend(v))
            .ok();
        let (Some(request_id), Some(rules)) = (request_id, rules) else {
            return Err(Error::Invalid(violations));
        };
        let shared = self.shared.clone();
        self.idempotent_write(
            "PutRetryConfig",
            &request_id,
            fingerprint,
            move |tx, now| {
                let latest = tx.latest_retry_config_version()?;
                let config = Config::next(rules, latest, now);
                tx.put_retry_config(&config_to_record(&config))?;
                shared.forget_retry_config();
                Ok(encode(&config))
            },
        )
        .await
    }

    /// The configuration in force (version 0: the built-in defaults).
    pub async fn retry_config(&self) -> Result<Config, Error> {
        let record = self.store.read(|tx| tx.retry_config()).await??;
        Ok(record.map_or_else(Config::builtin, config_from_record))
    }

    /// S5's judgement, idempotent on `request_id_text`: one ledger write reads the
    /// configuration and the original's history, decides, appends the decision to the history
    /// and, for ALLOW, links the new retry serial to its original. Writes run one at a time, so
    /// concurrent checks of one original never hand out the same retry or too many.
    pub async fn check_retry<F>(
        &self,
        request_id_text: &str,
        check: Check,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Checked) -> Vec<u8> + Send + 'static,
    {
        let mut violations = Vec::new();
        let request_id = request_id(request_id_text, &mut violations);
        let check = retry::validate_check(check)
            .map_err(|v| violations.extend(v))
            .ok();
        let (Some(request_id), Some(check)) = (request_id, check) else {
            return Err(Error::Invalid(violations));
        };
        self.idempotent_write("CheckRetry", &request_id, fingerprint, move |tx, now| {
            let config = load_retry_config(tx)?;
            let original = original_of(tx, &check.original_serial)?;
            let history = tx
                .retry_history(&original)?
                .map(history_from_record)
                .transpose()?;
            if history.is_none() {
                retry::check_new_original(&original).map_err(|v| Error::Invalid(vec![v]))?;
            }
            let check = Check {
                original_serial: original.clone(),
                ..check
            };
            let recorded = consult_participants(tx, &check, history.as_ref(), now)?;
            let checked = retry::on_check(&config, history, &check, &recorded, now)
                .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
            tx.put_retry_history(&history_to_record(&checked.history))?;
            if let Decision::Allow { retry_serial, .. } = &checked.decision {
                tx.put_retry_link(retry_serial, &original)?;
            }
            Ok(encode(&checked))
        })
        .await
    }

    /// The history of an original serial, or of the original a retry serial was issued for.
    pub async fn retry_history(&self, serial: &str) -> Result<History, Error> {
        if serial.is_empty() {
            return Err(Error::Invalid(vec![Violation::new(
                "serial",
                "is required: an original serial, or a retry serial issued by CheckRetry",
            )]));
        }
        let asked = serial.to_owned();
        let found = self
            .store
            .read(
                move |tx| -> Result<Option<RetryHistoryRecord>, store::Error> {
                    if let Some(history) = tx.retry_history(&asked)? {
                        return Ok(Some(history));
                    }
                    match tx.retry_original(&asked)? {
                        Some(original) => tx.retry_history(&original),
                        None => Ok(None),
                    }
                },
            )
            .await??;
        match found {
            Some(record) => Ok(history_from_record(record)?),
            None => Err(Error::NotFound(format!(
                "no retry history has serial {serial:?}: CheckRetry was never asked about it as \
                 an original, and it is not a retry serial CheckRetry issued"
            ))),
        }
    }
}

/// A serial with its own history is an original; otherwise a retry serial names its original
/// through its link, so asking about `X.r1` continues X's history instead of starting `X.r1.r1`.
fn original_of(tx: &WriteTx<'_>, serial: &str) -> Result<String, Error> {
    if tx.retry_history(serial)?.is_some() {
        return Ok(serial.to_owned());
    }
    Ok(tx
        .retry_original(serial)?
        .unwrap_or_else(|| serial.to_owned()))
}

/// What the participants' idempotence table holds for the original and each issued retry,
/// under the scope the request named (none named: nothing is consulted).
fn consult_participants(
    tx: &WriteTx<'_>,
    check: &Check,
    history: Option<&History>,
    now: Millis,
) -> Result<Vec<(String, Recorded)>, Error> {
    if check.idempotency_scope.is_empty() {
        return Ok(Vec::new());
    }
    let mut serials = vec![check.original_serial.clone()];
    serials.extend(history.map(History::retry_serials).unwrap_or_default());
    let mut recorded = Vec::with_capacity(serials.len());
    for serial in serials {
        let key = IdempotencyKey {
            namespace: IdempotencyNamespace::Participant,
            scope: check.idempotency_scope.clone(),
            key: serial.clone(),
        };
        let state = match stored_record(tx, &key)? {
            None => Recorded::Unknown,
            // A holder whose lease ran out is presumed gone, as Begin presumes it (the next
            // Begin takes the transaction over): answering IN_PROGRESS would hold the retry
            // back for as long as the record lives, in exactly the case CheckRetry is for.
            Some(record) if record.lease_expired(now, None) => Recorded::Unknown,
            Some(record) => match record.state {
                RecordState::Processing => Recorded::Processing,
                RecordState::Done if record.result == SUCCEEDED => Recorded::Succeeded {
                    response: record.response,
                },
                RecordState::Done => Recorded::Failed,
            },
        };
        recorded.push((serial, state));
    }
    Ok(recorded)
}

// ---- Records ----

fn policy_record(policy: &Policy) -> RetryPolicyRecord {
    RetryPolicyRecord {
        retryable_codes: Some(policy.retryable_codes.clone()),
        max_retries: Some(policy.max_retries),
        min_interval_ms: Some(policy.min_interval_ms),
        backoff_factor_milli: Some(policy.backoff_factor_milli),
        max_interval_ms: Some(policy.max_interval_ms),
    }
}

fn overrides_record(overrides: &Overrides) -> RetryPolicyRecord {
    RetryPolicyRecord {
        retryable_codes: overrides.retryable_codes.clone(),
        max_retries: overrides.max_retries,
        min_interval_ms: overrides.min_interval_ms,
        backoff_factor_milli: overrides.backoff_factor_milli,
        max_interval_ms: overrides.max_interval_ms,
    }
}

fn config_to_record(config: &Config) -> RetryConfigRecord {
    RetryConfigRecord {
        version: config.version,
        defaults: policy_record(&config.rules.defaults),
        transactions: config
            .rules
            .transactions
            .iter()
            .map(|t| TransactionRetryRecord {
                transaction_code: t.transaction_code.clone(),
                policy: overrides_record(&t.overrides),
            })
            .collect(),
        channels: config
            .rules
            .channels
            .iter()
            .map(|c| ChannelRetryRecord {
                channel: c.channel.clone(),
                transaction_code: c.transaction_code.clone(),
                retryable_codes: c.retryable_codes.clone(),
            })
            .collect(),
        updated_ms: config.updated_ms,
    }
}

fn config_from_record(record: RetryConfigRecord) -> Config {
    // Stored defaults are always complete (validation completes them); a missing setting
    // could only come from a hand-made record, and then the built-in value is the safe reading.
    let builtin = Policy::builtin();
    let d = record.defaults;
    Config {
        version: record.version,
        updated_ms: record.updated_ms,
        rules: Rules {
            defaults: Policy {
                retryable_codes: d.retryable_codes.unwrap_or(builtin.retryable_codes),
                max_retries: d.max_retries.unwrap_or(builtin.max_retries),
                min_interval_ms: d.min_interval_ms.unwrap_or(builtin.min_interval_ms),
                backoff_factor_milli: d
                    .backoff_factor_milli
                    .unwrap_or(builtin.backoff_factor_milli),
                max_interval_ms: d.max_interval_ms.unwrap_or(builtin.max_interval_ms),
            },
            transactions: record
                .transactions
                .into_iter()
                .map(|t| TransactionRetry {
                    transaction_code: t.transaction_code,
                    overrides: Overrides {
                        retryable_codes: t.policy.retryable_codes,
                        max_retries: t.policy.max_retries,
                        min_interval_ms: t.policy.min_interval_ms,
                        backoff_factor_milli: t.policy.backoff_factor_milli,
                        max_interval_ms: t.policy.max_interval_ms,
                    },
                })
                .collect(),
            channels: record
                .channels
                .into_iter()
                .map(|c| ChannelRetry {
                    channel: c.channel,
                    transaction_code: c.transaction_code,
                    retryable_codes: c.retryable_codes,
                })
                .collect(),
        },
    }
}

fn history_to_record(history: &History) -> RetryHistoryRecord {
    RetryHistoryRecord {
        original_serial: history.original_serial.clone(),
        transaction_code: history.transaction_code.clone(),
        attempts: history
            .attempts
            .iter()
            .map(|a| RetryAttemptRecord {
                retry_serial: a.retry_serial.clone(),
                attempt: a.attempt,
                error_code: a.error_code.clone(),
                channel: a.channel.clone(),
                decision: a.decision.code(),
                decided_ms: a.decided_ms,
                config_version: a.config_version,
            })
            .collect(),
    }
}

fn history_from_record(record: RetryHistoryRecord) -> Result<History, store::Error> {
    let mut attempts = Vec::with_capacity(record.attempts.len());
    for a in record.attempts {
        let decision =
            DecisionKind::from_code(a.decision).ok_or_else(|| store::Error::Corrupt {
                table: "retry_history",
                detail: format!(
                    "original {:?} has a decision numbered {}, which this sagad does not know",
                    record.original_serial, a.decision
                ),
            })?;
        attempts.push(Attempt {
            retry_serial: a.retry_serial,
            attempt: a.attempt,
            error_code: a.error_code,
            channel: a.channel,
            decision,
            decided_ms: a.decided_ms,
            config_version: a.config_version,
        });
    }
    Ok(History {
        original_serial: record.original_serial,
        transaction_code: record.transaction_code,
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_survives_its_record() {
        let config = Config {
            version: 4,
            updated_ms: 99,
            rules: Rules {
                defaults: Policy::builtin(),
                transactions: vec![TransactionRetry {
                    transaction_code: "payments.charge".into(),
                    overrides: Overrides {
                        retryable_codes: Some(vec!["TIMEOUT".into()]),
                        max_interval_ms: Some(5_000),
                        ..Overrides::default()
                    },
                }],
                channels: vec![ChannelRetry {
                    channel: "mobile".into(),
                    transaction_code: String::new(),
                    retryable_codes: Vec::new(),
                }],
            },
        };
        assert_eq!(config_from_record(config_to_record(&config)), config);
    }

    #[test]
    fn a_history_survives_its_record_and_an_unknown_decision_is_corrupt() {
        let history = History {
            original_serial: "T-1".into(),
            transaction_code: "t".into(),
            attempts: vec![Attempt {
                retry_serial: "T-1.r1".into(),
                attempt: 1,
                error_code: "TIMEOUT".into(),
                channel: "mobile".into(),
                decision: DecisionKind::Allow,
                decided_ms: 5,
                config_version: 2,
            }],
        };
        let mut record = history_to_record(&history);
        assert_eq!(history_from_record(record.clone()).ok(), Some(history));
        record.attempts[0].decision = 42;
        assert!(matches!(
            history_from_record(record),
            Err(store::Error::Corrupt { .. })
        ));
    }
}
