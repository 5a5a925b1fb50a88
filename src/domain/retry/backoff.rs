//! The backoff between attempts and sagad's own redelivery decision: pure, with `now` and the
//! jitter number handed in, so every wait can be replayed in a test.

use crate::domain::Millis;
use crate::domain::retry::{Layer, Policy, Resolved, layer_name};

/// The wait before retry `retry` (1 for the first): `min(cap, min_interval × factor^(retry−1))`,
/// never below the minimum interval. Retry 0 is read as 1.
pub fn backoff_ms(policy: &Policy, retry: u32) -> Millis {
    let floor = policy.min_interval_ms;
    // A configuration that slipped past validation with cap < floor still keeps the floor:
    // "never closer than the minimum interval" is the promise S5 makes.
    let cap = policy.max_interval_ms.max(floor);
    let factor = f64::from(policy.backoff_factor_milli.max(1_000)) / 1_000.0;
    let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
    let grown = floor as f64 * factor.powi(exponent);
    if !grown.is_finite() || grown >= cap as f64 {
        cap
    } else {
        // `grown` is in [floor, cap) here, so the conversion neither saturates nor truncates
        // below the floor by more than the fraction.
        (grown as Millis).clamp(floor, cap)
    }
}

/// `backoff_ms` spread by `jitter` in [0, 1) so that many waiters do not wake together. The
/// window is half a backoff wide, placed at [base, 1.5 × base] and pushed down by the cap, so
/// the result is never below the minimum interval nor above the cap.
pub fn jittered_backoff_ms(policy: &Policy, retry: u32, jitter: f64) -> Millis {
    let floor = policy.min_interval_ms;
    let cap = policy.max_interval_ms.max(floor);
    let base = backoff_ms(policy, retry);
    let half = base / 2;
    let high = base.saturating_add(half).min(cap);
    let low = high.saturating_sub(half).max(floor).min(high);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let spread = ((high - low) as f64 * jitter) as Millis;
    low.saturating_add(spread).min(high)
}

/// Why sagad stops redelivering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    NotRetryable { error_code: String, layer: Layer },
    Exhausted { attempts: u32, layer: Layer },
}

/// What sagad does after a delivery to a node failed with an error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redelivery {
    /// Deliver again at this instant.
    RetryAt(Millis),
    GiveUp(GiveUp),
}

/// sagad's own redelivery of a command or reversal, by the same policy as CheckRetry:
/// `attempts_made` counts the redeliveries already made (0 after the first delivery failed).
pub fn redelivery(
    resolved: &Resolved,
    error_code: &str,
    attempts_made: u32,
    now: Millis,
    jitter: f64,
) -> Redelivery {
    if !resolved.is_retryable(error_code) {
        return Redelivery::GiveUp(GiveUp::NotRetryable {
            error_code: error_code.to_owned(),
            layer: resolved.codes_layer,
        });
    }
    if attempts_made >= resolved.policy.max_retries {
        return Redelivery::GiveUp(GiveUp::Exhausted {
            attempts: attempts_made,
            layer: resolved.max_retries_layer,
        });
    }
    let wait = jittered_backoff_ms(&resolved.policy, attempts_made.saturating_add(1), jitter);
    Redelivery::RetryAt(now.saturating_add(wait))
}

impl GiveUp {
    pub fn reason(&self) -> String {
        match self {
            GiveUp::NotRetryable { error_code, layer } => {
                format!(
                    "error code {error_code:?} is not retryable ({})",
                    layer_name(*layer)
                )
            }
            GiveUp::Exhausted { attempts, layer } => format!(
                "all {attempts} retries are used (max_retries from {})",
                layer_name(*layer)
            ),
        }
    }
}
