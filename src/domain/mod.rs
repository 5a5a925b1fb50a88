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
