//! Validation of a retry configuration as submitted, and of a CheckRetry request: every problem
//! is reported at once, each with the field path a caller must fix
//! (`config.transactions[2].transaction_code`).

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::ids::RequestId;
use crate::domain::retry::{
    ChannelRetry, Check, MAX_RETRIES_LIMIT, MAX_SERIAL_LEN, Overrides, Policy, Rules,
    TransactionRetry,
};
use crate::domain::{Millis, Violation};

/// At most this many transaction or channel entries: the whole configuration is one record,
/// read by every decision.
pub const MAX_ENTRIES: usize = 1_000;
/// At most this many retryable codes in one list.
pub const MAX_CODES: usize = 100;
/// Codes, channels and transaction codes are names of at most this many characters, as action
/// names and error codes are.
pub const MAX_NAME_LEN: usize = 128;
/// Intervals longer than a day are a unit mistake, not a policy.
pub const MAX_INTERVAL_LIMIT_MS: Millis = 24 * 60 * 60 * 1_000;
pub const MAX_BACKOFF_FACTOR: f64 = 100.0;

/// One policy as submitted: anything unset inherits (a transaction from the defaults, the
/// defaults from the built-in defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DraftPolicy {
    /// Empty: inherit.
    pub retryable_codes: Vec<String>,
    pub max_retries: Option<u32>,
    pub min_interval_ms: Option<Millis>,
    pub backoff_factor: Option<f64>,
    pub max_interval_ms: Option<Millis>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DraftTransaction {
    pub transaction_code: String,
    pub policy: DraftPolicy,
}

/// A configuration as submitted to PutRetryConfig.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub defaults: DraftPolicy,
    pub transactions: Vec<DraftTransaction>,
    pub channels: Vec<ChannelRetry>,
}

fn shown(ms: Millis) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// Transaction codes, channels and retryable codes follow the rule of the names they are
/// matched against (a step's action and node, a node's error code), so every action a strategy
/// accepts can be given a policy.
fn check_name(field: &str, text: &str, violations: &mut Vec<Violation>) {
    if text.is_empty() {
        violations.push(Violation::new(field, "is required"));
    } else if let Some(problem) = crate::domain::name_problem(text, MAX_NAME_LEN) {
        violations.push(Violation::new(field, problem));
    }
}

/// A code of the longest length that ends in '…' has the shape of an error code sagad cut
/// from a node's longer one (`Report::clamped`); listing it would retry every error whose
/// first characters happen to match, so it is refused rather than matched by accident.
fn looks_cut(code: &str) -> bool {
    code.ends_with('…') && code.chars().count() == MAX_NAME_LEN
}

fn check_codes(field: &str, codes: &[String], violations: &mut Vec<Violation>) {
    if codes.len() > MAX_CODES {
        violations.push(Violation::new(
            field,
            format!("has {} codes; at most {MAX_CODES} are allowed", codes.len()),
        ));
    }
    let mut first_at: HashMap<&str, usize> = HashMap::new();
    for (i, code) in codes.iter().enumerate() {
        let path = format!("{field}[{i}]");
        check_name(&path, code, violations);
        if looks_cut(code) {
            violations.push(Violation::new(
                &path,
                format!(
                    "is {MAX_NAME_LEN} characters ending in '…', the shape of an error code sagad \
                     cut from a longer one, which no longer says which error it was; list a \
                     shorter code"
                ),
            ));
        }
        if let Some(first) = first_at.get(code.as_str()) {
            violations.push(Violation::new(
                path,
                format!("duplicates {field}[{first}] ({code:?})"),
            ));
        } else {
            first_at.insert(code, i);
        }
    }
}

/// Checks each setting on its own; returns the factor times 1000 when it is usable.
fn check_policy(
    prefix: &str,
    policy: &DraftPolicy,
    violations: &mut Vec<Violation>,
) -> Option<u32> {
    check_codes(
        &format!("{prefix}.retryable_codes"),
        &policy.retryable_codes,
        violations,
    );
    if let Some(max) = policy.max_retries.filter(|m| *m > MAX_RETRIES_LIMIT) {
        violations.push(Violation::new(
            format!("{prefix}.max_retries"),
            format!("is {max}; at most {MAX_RETRIES_LIMIT} retries are allowed"),
        ));
    }
    for (name, value) in [
        ("min_interval", policy.min_interval_ms),
        ("max_interval", policy.max_interval_ms),
    ] {
        if let Some(ms) = value.filter(|ms| *ms > MAX_INTERVAL_LIMIT_MS) {
            violations.push(Violation::new(
                format!("{prefix}.{name}"),
                format!(
                    "is {}; at most {} is allowed",
                    shown(ms),
                    shown(MAX_INTERVAL_LIMIT_MS)
                ),
            ));
        }
    }
    let factor = policy.backoff_factor?;
    if !factor.is_finite() || !(1.0..=MAX_BACKOFF_FACTOR).contains(&factor) {
        violations.push(Violation::new(
            format!("{prefix}.backoff_factor"),
            format!(
                "is {factor}; it must be at least 1 (1 keeps the interval constant) and at most \
                 {MAX_BACKOFF_FACTOR}"
            ),
        ));
        return None;
    }
    // In [1000, 100000] here, so the conversion is exact to a thousandth.
    Some((factor * 1_000.0).round() as u32)
}

fn complete_defaults(draft: &DraftPolicy, factor_milli: Option<u32>) -> Policy {
    let builtin = Policy::builtin();
    Policy {
        retryable_codes: if draft.retryable_codes.is_empty() {
            builtin.retryable_codes
        } else {
            draft.retryable_codes.clone()
        },
        max_retries: draft.max_retries.unwrap_or(builtin.max_retries),
        min_interval_ms: draft.min_interval_ms.unwrap_or(builtin.min_interval_ms),
        backoff_factor_milli: factor_milli.unwrap_or(builtin.backoff_factor_milli),
        max_interval_ms: draft.max_interval_ms.unwrap_or(builtin.max_interval_ms),
    }
}

/// Validates a submitted configuration, reporting every problem. The defaults come back
/// complete (unset settings take the built-in defaults), so a stored version means the same
/// thing forever, whatever later releases choose as built-ins.
pub fn validate(draft: &Draft) -> Result<Rules, Vec<Violation>> {
    let mut violations = Vec::new();

    let factor = check_policy("config.defaults", &draft.defaults, &mut violations);
    let defaults = complete_defaults(&draft.defaults, factor);
    if defaults.max_interval_ms < defaults.min_interval_ms {
        let (field, description) = if draft.defaults.max_interval_ms.is_some() {
            (
                "config.defaults.max_interval",
                format!(
                    "is {}, below min_interval {}; the cap of the backoff cannot be below its \
                     floor",
                    shown(defaults.max_interval_ms),
                    shown(defaults.min_interval_ms)
                ),
            )
        } else {
            (
                "config.defaults.min_interval",
                format!(
                    "is {}, above the built-in max_interval {}; set max_interval too",
                    shown(defaults.min_interval_ms),
                    shown(defaults.max_interval_ms)
                ),
            )
        };
        violations.push(Violation::new(field, description));
    }

    if draft.transactions.len() > MAX_ENTRIES {
        violations.push(Violation::new(
            "config.transactions",
            format!(
                "has {} entries; at most {MAX_ENTRIES} are allowed",
                draft.transactions.len()
            ),
        ));
    }
    let mut transactions = Vec::with_capacity(draft.transactions.len());
    let mut first_code: HashMap<&str, usize> = HashMap::new();
    for (i, entry) in draft.transactions.iter().enumerate() {
        let prefix = format!("config.transactions[{i}]");
        let code_field = format!("{prefix}.transaction_code");
        check_name(&code_field, &entry.transaction_code, &mut violations);
        if !entry.transaction_code.is_empty() {
            if let Some(first) = first_code.get(entry.transaction_code.as_str()) {
                violations.push(Violation::new(
                    &code_field,
                    format!(
                        "duplicates config.transactions[{first}] ({:?}); one entry per \
                         transaction code",
                        entry.transaction_code
                    ),
                ));
            } else {
                first_code.insert(&entry.transaction_code, i);
            }
        }
        let policy_prefix = format!("{prefix}.policy");
        let own = &entry.policy;
        let factor = check_policy(&policy_prefix, own, &mut violations);
        let overrides = Overrides {
            retryable_codes: (!own.retryable_codes.is_empty()).then(|| own.retryable_codes.clone()),
            max_retries: own.max_retries,
            min_interval_ms: own.min_interval_ms,
            backoff_factor_milli: factor,
            max_interval_ms: own.max_interval_ms,
        };
        check_interval_range(&policy_prefix, &overrides, &defaults, &mut violations);
        transactions.push(TransactionRetry {
            transaction_code: entry.transaction_code.clone(),
            overrides,
        });
    }

    if draft.channels.len() > MAX_ENTRIES {
        violations.push(Violation::new(
            "config.channels",
            format!(
                "has {} entries; at most {MAX_ENTRIES} are allowed",
                draft.channels.len()
            ),
        ));
    }
    let mut first_pair: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, entry) in draft.channels.iter().enumerate() {
        let prefix = format!("config.channels[{i}]");
        check_name(
            &format!("{prefix}.channel"),
            &entry.channel,
            &mut violations,
        );
        if !entry.transaction_code.is_empty() {
            check_name(
                &format!("{prefix}.transaction_code"),
                &entry.transaction_code,
                &mut violations,
            );
        }
        check_codes(
            &format!("{prefix}.retryable_codes"),
            &entry.retryable_codes,
            &mut violations,
        );
        let pair = (entry.channel.as_str(), entry.transaction_code.as_str());
        if entry.channel.is_empty() {
            continue;
        }
        if let Some(first) = first_pair.get(&pair) {
            violations.push(Violation::new(
                prefix,
                format!(
                    "duplicates config.channels[{first}]: the same channel {:?} and \
                     transaction_code {:?}",
                    entry.channel, entry.transaction_code
                ),
            ));
        } else {
            first_pair.insert(pair, i);
        }
    }

    if violations.is_empty() {
        Ok(Rules {
            defaults,
            transactions,
            channels: draft.channels.clone(),
        })
    } else {
        Err(violations)
    }
}

/// A transaction's effective floor and cap (its own, or inherited) must still form a range.
/// Reported at the setting the transaction gave; a range broken by the defaults alone was
/// reported there.
fn check_interval_range(
    prefix: &str,
    own: &Overrides,
    defaults: &Policy,
    violations: &mut Vec<Violation>,
) {
    let floor = own.min_interval_ms.unwrap_or(defaults.min_interval_ms);
    let cap = own.max_interval_ms.unwrap_or(defaults.max_interval_ms);
    if cap >= floor {
        return;
    }
    let described = match (own.min_interval_ms, own.max_interval_ms) {
        (_, Some(_)) => (
            "max_interval",
            format!(
                "is {}, below min_interval {}{}; the cap of the backoff cannot be below its floor",
                shown(cap),
                shown(floor),
                if own.min_interval_ms.is_some() {
                    ""
                } else {
                    " (inherited from the defaults)"
                }
            ),
        ),
        (Some(_), None) => (
            "min_interval",
            format!(
                "is {}, above max_interval {} (inherited from the defaults); set max_interval \
                 too, or a smaller min_interval",
                shown(floor),
                shown(cap)
            ),
        ),
        (None, None) => return,
    };
    violations.push(Violation::new(
        format!("{prefix}.{}", described.0),
        described.1,
    ));
}

/// What any serial CheckRetry is asked about must be: an original, or a retry serial it issued
/// (up to 8 characters longer than an original may be). Whether it may start a history of its
/// own is `check_new_original`'s question, answered once the ledger says it has none.
fn check_serial(field: &str, text: &str, violations: &mut Vec<Violation>) {
    if text.is_empty() {
        violations.push(Violation::new(field, "is required"));
        return;
    }
    let len = text.chars().count();
    if len > RequestId::MAX_LEN {
        violations.push(Violation::new(
            field,
            format!(
                "is {len} characters long; an original serial has at most {MAX_SERIAL_LEN}, and \
                 a retry serial CheckRetry issued at most {}",
                RequestId::MAX_LEN
            ),
        ));
    } else if let Some(found) = text.chars().find(|c| c.is_control() || c.is_whitespace()) {
        violations.push(Violation::new(
            field,
            format!("contains {found:?}; control characters and spaces are not allowed"),
        ));
    }
}

/// Whether `serial`, which has no history and is no retry serial CheckRetry issued, may start
/// a history as an original. It must leave room for the retry suffix, and must not look like a
/// retry serial itself: CheckRetry could later issue that very serial for another original,
/// and the participants' records of the two transactions would then answer for each other.
pub fn check_new_original(serial: &str) -> Result<(), Violation> {
    let len = serial.chars().count();
    if len > MAX_SERIAL_LEN {
        return Err(Violation::new(
            "original_serial",
            format!(
                "is {len} characters long; at most {MAX_SERIAL_LEN} are allowed for an original \
                 (retry serials add a suffix like .r12 and must stay within {})",
                RequestId::MAX_LEN
            ),
        ));
    }
    // Exactly the shape issued: `.r`, then an attempt number from 1, without leading zeros.
    if let Some((original, _)) = serial.rsplit_once(".r").filter(|(_, n)| {
        !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
    }) {
        return Err(Violation::new(
            "original_serial",
            format!(
                "{serial:?} has the shape of a retry serial CheckRetry issues, but it issued no \
                 such serial (or its history has expired): ask about the original, {original:?}, \
                 or give the transaction a serial that does not end in .r and a number"
            ),
        ));
    }
    Ok(())
}

/// Validates a CheckRetry request's fields, reporting every problem at once.
pub fn validate_check(check: Check) -> Result<Check, Vec<Violation>> {
    let mut violations = Vec::new();
    check_serial("original_serial", &check.original_serial, &mut violations);
    check_name("transaction_code", &check.transaction_code, &mut violations);
    if !check.channel.is_empty() {
        check_name("channel", &check.channel, &mut violations);
    }
    // The code is what the attempt failed with, as a node reports it, so it is bounded only as
    // a reported one is; one no configuration can list is simply not retryable.
    if check.error_code.is_empty() {
        violations.push(Violation::new("error_code", "is required"));
    } else if let Some(long) =
        crate::domain::saga::too_long("error_code", &check.error_code, MAX_NAME_LEN)
    {
        violations.push(long);
    }
    if !check.idempotency_scope.is_empty()
        && let Err(e) = RequestId::parse(&check.idempotency_scope)
    {
        violations.push(Violation::new("idempotency_scope", e.to_string()));
    }
    if violations.is_empty() {
        Ok(check)
    } else {
        Err(violations)
    }
}
