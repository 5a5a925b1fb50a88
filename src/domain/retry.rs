//! Retry policy (S5) as pure functions: the layered configuration, which layer decides for a
//! (transaction code, channel), the CheckRetry decision over an original's history, and the
//! backoff sagad uses for its own redelivery. No clock and no randomness: `now` and a jitter
//! number in [0, 1) are handed in. This file holds the model and its resolution; the backoff
//! and redelivery are `retry/backoff.rs`, the CheckRetry decision `retry/check.rs`, and
//! validation of a submitted configuration `retry/validation.rs`.

mod backoff;
mod check;
#[cfg(test)]
mod tests;
mod validation;

pub use backoff::{GiveUp, Redelivery, backoff_ms, jittered_backoff_ms, redelivery};
pub use check::{
    Attempt, Check, Checked, CodeChanged, Decision, DecisionKind, History, Recorded, on_check,
    retry_serial,
};
pub use validation::{
    Draft, DraftPolicy, DraftTransaction, MAX_NAME_LEN, check_new_original, validate,
    validate_check,
};

use crate::domain::Millis;

/// Error codes retried when no configuration was ever stored: the failures that say "try again
/// later" rather than "this request is wrong".
pub const BUILTIN_RETRYABLE_CODES: [&str; 4] = [
    "UNAVAILABLE",
    "TIMEOUT",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
];
pub const BUILTIN_MAX_RETRIES: u32 = 5;
pub const BUILTIN_MIN_INTERVAL_MS: Millis = 1_000;
pub const BUILTIN_BACKOFF_FACTOR_MILLI: u32 = 2_000;
pub const BUILTIN_MAX_INTERVAL_MS: Millis = 60_000;

/// At most this many retries per original: the history of an original keeps every ALLOW, and
/// CheckRetry consults the participants' record of every issued retry, so both stay bounded.
pub const MAX_RETRIES_LIMIT: u32 = 100;
/// Refusals are kept in an original's history up to this many; older ones are dropped so a
/// client that polls on TOO_SOON cannot grow the record without bound. ALLOWs are never dropped.
pub const MAX_REFUSALS_KEPT: usize = 64;

/// A retry serial is `<original>.r<n>` and participants register it with Idempotency.Begin,
/// whose request ids hold at most 128 characters: an original of at most 120 leaves room for
/// `.r100`.
pub const MAX_SERIAL_LEN: usize = 120;

/// Which configuration layer a setting came from, most general first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// The transaction configuration table (or the built-in defaults, as version 0).
    Defaults,
    /// The transaction registry entry of the transaction code.
    Transaction,
    /// A channel entry that applies to every transaction code of the channel.
    Channel,
    /// A channel entry for exactly this transaction code: the most specific.
    ChannelForTransaction,
}

/// A complete policy: every setting has a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub retryable_codes: Vec<String>,
    /// Retries after the original attempt; the original itself does not count.
    pub max_retries: u32,
    /// The floor of the backoff: no two attempts closer than this.
    pub min_interval_ms: Millis,
    /// Growth of the backoff per retry, times 1000 (integers keep configurations exact).
    pub backoff_factor_milli: u32,
    /// The cap of the backoff.
    pub max_interval_ms: Millis,
}

impl Policy {
    /// What sagad does when no configuration was ever stored.
    pub fn builtin() -> Policy {
        Policy {
            retryable_codes: BUILTIN_RETRYABLE_CODES
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            max_retries: BUILTIN_MAX_RETRIES,
            min_interval_ms: BUILTIN_MIN_INTERVAL_MS,
            backoff_factor_milli: BUILTIN_BACKOFF_FACTOR_MILLI,
            max_interval_ms: BUILTIN_MAX_INTERVAL_MS,
        }
    }
}

/// A transaction code's own settings; `None` inherits the defaults of the same version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub retryable_codes: Option<Vec<String>>,
    pub max_retries: Option<u32>,
    pub min_interval_ms: Option<Millis>,
    pub backoff_factor_milli: Option<u32>,
    pub max_interval_ms: Option<Millis>,
}

/// One entry of the transaction registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRetry {
    pub transaction_code: String,
    pub overrides: Overrides,
}

/// The retryable codes of one peripheral system (channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRetry {
    pub channel: String,
    /// Empty: every transaction code of the channel.
    pub transaction_code: String,
    /// Empty: nothing the channel reports is retryable.
    pub retryable_codes: Vec<String>,
}

/// The rules of one configuration, as validated: defaults complete, codes unique, entries
/// unique, every effective interval range non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub defaults: Policy,
    pub transactions: Vec<TransactionRetry>,
    pub channels: Vec<ChannelRetry>,
}

/// One stored version of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// 1, 2, 3 … as stored; 0 is the built-in configuration, never stored.
    pub version: u64,
    pub updated_ms: Millis,
    pub rules: Rules,
}

impl Config {
    /// The configuration in force before any was stored, shown as version 0.
    pub fn builtin() -> Config {
        Config {
            version: 0,
            updated_ms: 0,
            rules: Rules {
                defaults: Policy::builtin(),
                transactions: Vec::new(),
                channels: Vec::new(),
            },
        }
    }

    /// The version that replaces `latest` (none stored yet: version 1).
    pub fn next(rules: Rules, latest: Option<u64>, now: Millis) -> Config {
        Config {
            version: latest.map_or(1, |v| v.saturating_add(1)),
            updated_ms: now,
            rules,
        }
    }
}

/// The policy in force for one (transaction code, channel), and which layer set each part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub config_version: u64,
    pub policy: Policy,
    /// Who said which codes are retryable.
    pub codes_layer: Layer,
    /// Who set `max_retries`.
    pub max_retries_layer: Layer,
    /// Who set the backoff: `Transaction` if the transaction entry set any of min interval,
    /// factor or cap.
    pub interval_layer: Layer,
}

impl Resolved {
    pub fn is_retryable(&self, error_code: &str) -> bool {
        self.policy.retryable_codes.iter().any(|c| c == error_code)
    }
}

fn pick<T: Clone>(own: &Option<T>, inherited: &T) -> (T, bool) {
    match own {
        Some(value) => (value.clone(), true),
        None => (inherited.clone(), false),
    }
}

/// The most specific setting wins: for retryable codes channel + transaction code > channel >
/// transaction > defaults; for max retries, min interval, factor and cap, transaction >
/// defaults (channels configure codes only).
pub fn resolve(config: &Config, transaction_code: &str, channel: &str) -> Resolved {
    let rules = &config.rules;
    let defaults = &rules.defaults;
    let own = rules
        .transactions
        .iter()
        .find(|t| t.transaction_code == transaction_code)
        .map(|t| &t.overrides);
    let none = Overrides::default();
    let own = own.unwrap_or(&none);

    let (mut codes, codes_own) = pick(&own.retryable_codes, &defaults.retryable_codes);
    let mut codes_layer = if codes_own {
        Layer::Transaction
    } else {
        Layer::Defaults
    };
    if !channel.is_empty() {
        let exact = rules
            .channels
            .iter()
            .find(|c| c.channel == channel && c.transaction_code == transaction_code);
        let whole = rules
            .channels
            .iter()
            .find(|c| c.channel == channel && c.transaction_code.is_empty());
        if let Some(entry) = exact {
            codes = entry.retryable_codes.clone();
            codes_layer = Layer::ChannelForTransaction;
        } else if let Some(entry) = whole {
            codes = entry.retryable_codes.clone();
            codes_layer = Layer::Channel;
        }
    }

    let (max_retries, max_own) = pick(&own.max_retries, &defaults.max_retries);
    let (min_interval_ms, min_own) = pick(&own.min_interval_ms, &defaults.min_interval_ms);
    let (backoff_factor_milli, factor_own) =
        pick(&own.backoff_factor_milli, &defaults.backoff_factor_milli);
    let (max_interval_ms, cap_own) = pick(&own.max_interval_ms, &defaults.max_interval_ms);
    let layer = |own: bool| {
        if own {
            Layer::Transaction
        } else {
            Layer::Defaults
        }
    };
    Resolved {
        config_version: config.version,
        policy: Policy {
            retryable_codes: codes,
            max_retries,
            min_interval_ms,
            backoff_factor_milli,
            max_interval_ms,
        },
        codes_layer,
        max_retries_layer: layer(max_own),
        interval_layer: layer(min_own || factor_own || cap_own),
    }
}

/// A layer in words, for reasons.
fn layer_name(layer: Layer) -> &'static str {
    match layer {
        Layer::Defaults => "the defaults",
        Layer::Transaction => "the transaction's entry",
        Layer::Channel => "the channel's entry",
        Layer::ChannelForTransaction => "the channel's entry for this transaction code",
    }
}
