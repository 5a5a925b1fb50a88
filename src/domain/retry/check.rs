//! The CheckRetry decision (S5): the retry check table of one original, what the participants'
//! idempotence table says about it, and the server-side judgement that allows a retry under a
//! linked serial or refuses with its reason.

use crate::domain::Millis;
use crate::domain::retry::{
    Config, Layer, MAX_REFUSALS_KEPT, Resolved, backoff_ms, layer_name, resolve,
};

/// A validated CheckRetry request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub original_serial: String,
    pub transaction_code: String,
    /// Empty: no channel layer applies.
    pub channel: String,
    pub error_code: String,
    /// Empty: the participants' idempotence table is not consulted.
    pub idempotency_scope: String,
}

/// What the participants' idempotence table (S3) holds for one serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// Nothing registered (or no scope given), or registered by a holder whose processing
    /// lease ran out (a Begin would take it over).
    Unknown,
    /// Registered and being processed by a holder still within its lease (or with none).
    Processing,
    /// Done with result "SUCCEEDED": the stored response answers every repeat.
    Succeeded { response: Vec<u8> },
    /// Done with any other result: the attempt failed, so a retry may help.
    Failed,
}

/// The kinds of decision, numbered as the contract and the stored history number them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    Allow = 1,
    NotRetryable = 2,
    Exhausted = 3,
    TooSoon = 4,
    AlreadySucceeded = 5,
    InProgress = 6,
}

impl DecisionKind {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<DecisionKind> {
        match code {
            1 => Some(DecisionKind::Allow),
            2 => Some(DecisionKind::NotRetryable),
            3 => Some(DecisionKind::Exhausted),
            4 => Some(DecisionKind::TooSoon),
            5 => Some(DecisionKind::AlreadySucceeded),
            6 => Some(DecisionKind::InProgress),
            _ => None,
        }
    }
}

/// The judgement of one CheckRetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        attempt: u32,
        retry_serial: String,
        layer: Layer,
    },
    NotRetryable {
        error_code: String,
        layer: Layer,
    },
    Exhausted {
        attempts: u32,
        layer: Layer,
    },
    TooSoon {
        retry_after_ms: Millis,
        layer: Layer,
    },
    /// `serial` is the original or the retry that succeeded.
    AlreadySucceeded {
        serial: String,
        response: Vec<u8>,
    },
    InProgress {
        serial: String,
    },
}

impl Decision {
    pub fn kind(&self) -> DecisionKind {
        match self {
            Decision::Allow { .. } => DecisionKind::Allow,
            Decision::NotRetryable { .. } => DecisionKind::NotRetryable,
            Decision::Exhausted { .. } => DecisionKind::Exhausted,
            Decision::TooSoon { .. } => DecisionKind::TooSoon,
            Decision::AlreadySucceeded { .. } => DecisionKind::AlreadySucceeded,
            Decision::InProgress { .. } => DecisionKind::InProgress,
        }
    }

    /// The layer whose setting decided; the idempotence table's answers have none.
    pub fn layer(&self) -> Option<Layer> {
        match self {
            Decision::Allow { layer, .. }
            | Decision::NotRetryable { layer, .. }
            | Decision::Exhausted { layer, .. }
            | Decision::TooSoon { layer, .. } => Some(*layer),
            Decision::AlreadySucceeded { .. } | Decision::InProgress { .. } => None,
        }
    }

    /// The decision in words, for the caller and the operator.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow {
                attempt,
                retry_serial,
                layer,
            } => format!(
                "retry {attempt} allowed under serial {retry_serial} (codes from {})",
                layer_name(*layer)
            ),
            Decision::NotRetryable { error_code, layer } => format!(
                "error code {error_code:?} is not retryable according to {}",
                layer_name(*layer)
            ),
            Decision::Exhausted { attempts, layer } => format!(
                "all {attempts} allowed retries were made (max_retries from {})",
                layer_name(*layer)
            ),
            Decision::TooSoon {
                retry_after_ms,
                layer,
            } => format!(
                "the interval since the last retry has not passed; retry after {retry_after_ms} ms \
                 (backoff from {})",
                layer_name(*layer)
            ),
            Decision::AlreadySucceeded { serial, .. } => format!(
                "{serial} already succeeded; its stored response is returned and it must not be \
                 executed again"
            ),
            Decision::InProgress { serial } => {
                format!("{serial} is still being processed; do not retry it yet")
            }
        }
    }
}

/// One decision in an original's history (the retry check table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Empty for a refusal.
    pub retry_serial: String,
    /// For an ALLOW the retry's number; for a refusal the number the retry would have had.
    pub attempt: u32,
    pub error_code: String,
    pub channel: String,
    pub decision: DecisionKind,
    pub decided_ms: Millis,
    pub config_version: u64,
}

/// Every decision about one original transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub original_serial: String,
    pub transaction_code: String,
    pub attempts: Vec<Attempt>,
}

impl History {
    pub fn new(original_serial: &str, transaction_code: &str) -> History {
        History {
            original_serial: original_serial.to_owned(),
            transaction_code: transaction_code.to_owned(),
            attempts: Vec::new(),
        }
    }

    fn allows(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts
            .iter()
            .filter(|a| a.decision == DecisionKind::Allow)
    }

    /// How many retries were allowed so far.
    pub fn retries_allowed(&self) -> u32 {
        u32::try_from(self.allows().count()).unwrap_or(u32::MAX)
    }

    /// Every retry serial issued, in order.
    pub fn retry_serials(&self) -> Vec<String> {
        self.allows().map(|a| a.retry_serial.clone()).collect()
    }

    /// Appends `attempt`, dropping the oldest refusal beyond `MAX_REFUSALS_KEPT`.
    fn record(&mut self, attempt: Attempt) {
        self.attempts.push(attempt);
        let refusals = self
            .attempts
            .iter()
            .filter(|a| a.decision != DecisionKind::Allow)
            .count();
        if refusals > MAX_REFUSALS_KEPT
            && let Some(oldest) = self
                .attempts
                .iter()
                .position(|a| a.decision != DecisionKind::Allow)
        {
            self.attempts.remove(oldest);
        }
    }
}

/// The serial number of retry `attempt` of `original`.
pub fn retry_serial(original: &str, attempt: u32) -> String {
    format!("{original}.r{attempt}")
}

/// What CheckRetry stores and answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub config_version: u64,
    /// The history with this decision appended.
    pub history: History,
}

/// A CheckRetry named another transaction code than the original was first checked with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "original {original_serial:?} was checked as transaction code {stored:?}; one original \
     keeps one transaction code"
)]
pub struct CodeChanged {
    pub original_serial: String,
    pub stored: String,
}

/// S5's server-side judgement. `recorded` is what the idempotence table holds for the original
/// and for each retry serial issued so far (in any order; missing serials count as unknown).
/// Order of the questions: already succeeded? still in progress? retryable code? retries left?
/// interval passed? The first retry may run at once (sagad does not know when the original
/// ran); retry n ≥ 2 waits `backoff_ms(n)` after retry n−1 was allowed.
pub fn on_check(
    config: &Config,
    history: Option<History>,
    check: &Check,
    recorded: &[(String, Recorded)],
    now: Millis,
) -> Result<Checked, CodeChanged> {
    let mut history =
        history.unwrap_or_else(|| History::new(&check.original_serial, &check.transaction_code));
    if history.transaction_code != check.transaction_code {
        return Err(CodeChanged {
            original_serial: history.original_serial,
            stored: history.transaction_code,
        });
    }
    let resolved = resolve(config, &check.transaction_code, &check.channel);
    let decision = decide(&resolved, &history, check, recorded, now);
    // A refusal records the number the retry would have had, so the table reads in order.
    let (retry_serial, attempt) = match &decision {
        Decision::Allow {
            attempt,
            retry_serial,
            ..
        } => (retry_serial.clone(), *attempt),
        Decision::NotRetryable { .. }
        | Decision::Exhausted { .. }
        | Decision::TooSoon { .. }
        | Decision::AlreadySucceeded { .. }
        | Decision::InProgress { .. } => {
            (String::new(), history.retries_allowed().saturating_add(1))
        }
    };
    history.record(Attempt {
        retry_serial,
        attempt,
        error_code: check.error_code.clone(),
        channel: check.channel.clone(),
        decision: decision.kind(),
        decided_ms: now,
        config_version: config.version,
    });
    Ok(Checked {
        decision,
        config_version: config.version,
        history,
    })
}

fn decide(
    resolved: &Resolved,
    history: &History,
    check: &Check,
    recorded: &[(String, Recorded)],
    now: Millis,
) -> Decision {
    // The original first, then its retries in issue order: the answer names the earliest
    // serial the table knows as succeeded or in progress.
    let mut serials = vec![history.original_serial.clone()];
    serials.extend(history.retry_serials());
    let state_of = |serial: &str| {
        recorded
            .iter()
            .find(|(s, _)| s == serial)
            .map(|(_, r)| r)
            .unwrap_or(&Recorded::Unknown)
    };
    for serial in &serials {
        if let Recorded::Succeeded { response } = state_of(serial) {
            return Decision::AlreadySucceeded {
                serial: serial.clone(),
                response: response.clone(),
            };
        }
    }
    if let Some(serial) = serials
        .iter()
        .find(|s| *state_of(s) == Recorded::Processing)
    {
        return Decision::InProgress {
            serial: serial.clone(),
        };
    }
    if !resolved.is_retryable(&check.error_code) {
        return Decision::NotRetryable {
            error_code: check.error_code.clone(),
            layer: resolved.codes_layer,
        };
    }
    let allowed = history.retries_allowed();
    if allowed >= resolved.policy.max_retries {
        return Decision::Exhausted {
            attempts: allowed,
            layer: resolved.max_retries_layer,
        };
    }
    let next = allowed.saturating_add(1);
    let last_allow = history
        .allows()
        .map(|a| a.decided_ms)
        .max()
        .filter(|_| next >= 2);
    if let Some(last) = last_allow {
        let due = last.saturating_add(backoff_ms(&resolved.policy, next));
        if now < due {
            return Decision::TooSoon {
                retry_after_ms: due - now,
                layer: resolved.interval_layer,
            };
        }
    }
    Decision::Allow {
        attempt: next,
        retry_serial: retry_serial(&history.original_serial, next),
        layer: resolved.codes_layer,
    }
}
