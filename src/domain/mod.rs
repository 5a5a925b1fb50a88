//! Pure rules of sagad: identifiers, sagas and idempotence. Nothing here does I/O, reads a
//! clock, logs or names sled or tonic: time comes in as `now` (ms since the Unix epoch) and
//! decisions go out as values, so every rule is a plain unit test.

pub mod barrier;
pub mod branch;
pub mod idempotency;
pub mod ids;
pub mod orchestration;
pub mod outcalls;
pub mod retry;
pub mod saga;
pub mod strategy;
pub mod strategy_validation;

/// Milliseconds since the Unix epoch: the only notion of time the domain knows.
pub type Millis = u64;

/// A duration a client gave, in whole milliseconds, a part of one counting as a whole one: a
/// positive duration never becomes the 0 that means "none" or "at once" (a lease of 0 would
/// let every Begin take over), and one just over a bound is never let under it. Saturates.
pub fn millis_rounded_up(duration: std::time::Duration) -> Millis {
    let part = u128::from(!duration.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(duration.as_millis().saturating_add(part)).unwrap_or(Millis::MAX)
}

/// One thing wrong with a request, named by its field: the edge turns a list of these into
/// INVALID_ARGUMENT with one field violation each, so a caller can fix everything at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Violation {
        Violation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// What is wrong with a name that is matched exactly elsewhere — an action, a status, a code a
/// retry policy lists — or `None`; whether it may be empty is the caller's to say. One rule for
/// all of them, because one name is often checked by two services: a strategy's action is the
/// transaction code its retry policy is looked up by, so a rule stricter on one side would leave
/// a name that can never be configured.
pub fn name_problem(text: &str, max: usize) -> Option<String> {
    let len = text.chars().count();
    if len > max {
        Some(format!(
            "is {len} characters long; at most {max} are allowed"
        ))
    } else if let Some(c) = text.chars().find(|c| c.is_control()) {
        Some(format!(
            "contains the control character {c:?}; use printable text"
        ))
    } else if text.trim() != text {
        Some(format!(
            "{text:?} has leading or trailing spaces, which every value matched against it \
             would have to repeat exactly; remove them"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_part_of_a_millisecond_counts_as_a_whole_one() {
        assert_eq!(millis_rounded_up(Duration::ZERO), 0);
        assert_eq!(millis_rounded_up(Duration::from_nanos(1)), 1);
        assert_eq!(millis_rounded_up(Duration::from_micros(500)), 1);
        assert_eq!(millis_rounded_up(Duration::from_millis(1)), 1);
        assert_eq!(millis_rounded_up(Duration::from_nanos(1_000_001)), 2);
        assert_eq!(millis_rounded_up(Duration::new(30, 0)), 30_000);
        assert_eq!(millis_rounded_up(Duration::MAX), Millis::MAX);
    }
}
