//! Commands to nodes as the outbox stores them, and timers as the due index stores them: the
//! engine's own encodings (postcard), opaque to the store.

use serde::{Deserialize, Serialize};

use crate::domain::orchestration::Timer;
use crate::store;

/// What a command asks a node to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Execute,
    Reverse,
    QueryStatus,
    Signal,
}

/// One command as stored in the outbox: everything needed to send it again after a restart,
/// except the payload, which is read from the `payloads` table when it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub kind: Kind,
    pub gsn: String,
    pub branch_id: String,
    pub node_id: String,
    /// The forward or reversal action; empty for signals.
    pub action: String,
    pub reason: String,
    /// For signals: the signal code (see `convert::signal_code`).
    pub signal: u8,
    pub business_type: String,
    /// For Execute and Reverse: which send of the branch's action this is (1 for the first),
    /// so its answer is read as that send's. 0 when unknown: commands stored by an sagad
    /// before this field, and the kinds that are not sends of an action.
    pub attempt: u32,
}

impl Command {
    /// Which send of its branch's action this command is, if it says.
    pub fn send(&self) -> Option<u32> {
        (self.attempt > 0).then_some(self.attempt)
    }
}

/// The shape commands had before `attempt`; entries of that shape may wait in an outbox
/// through an upgrade. Field order is the format; never edit it.
#[derive(Deserialize)]
struct CommandV1 {
    kind: Kind,
    gsn: String,
    branch_id: String,
    node_id: String,
    action: String,
    reason: String,
    signal: u8,
    business_type: String,
}

pub fn encode_command(command: &Command) -> Result<Vec<u8>, store::Error> {
    store::encode_unversioned(command).map_err(|e| store::Error::Corrupt {
        table: "outbox",
        detail: format!("encoding a command: {e}"),
    })
}

/// Decodes either shape. An older entry ends where the current shape's `attempt` would begin,
/// so it never decodes as the current shape. The current shape is tried first: the older
/// shape's decoder would accept a current entry too (postcard ignores trailing bytes) and lose
/// its attempt.
pub fn decode_command(bytes: &[u8]) -> Result<Command, store::Error> {
    let current = match postcard::from_bytes::<Command>(bytes) {
        Ok(command) => return Ok(command),
        Err(e) => e,
    };
    let old: CommandV1 = postcard::from_bytes(bytes).map_err(|_| store::Error::Corrupt {
        table: "outbox",
        detail: format!("decoding a command: {current}"),
    })?;
    Ok(Command {
        kind: old.kind,
        gsn: old.gsn,
        branch_id: old.branch_id,
        node_id: old.node_id,
        action: old.action,
        reason: old.reason,
        signal: old.signal,
        business_type: old.business_type,
        attempt: 0,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum StoredTimer {
    StepTimeout { branch_id: String, attempt: u32 },
    RetryExecute { branch_id: String },
    Poll { branch_id: String },
    RetryReversal { branch_id: String },
    Deadline,
}

pub fn encode_timer(timer: &Timer) -> Result<Vec<u8>, store::Error> {
    let stored = match timer {
        Timer::StepTimeout { branch_id, attempt } => StoredTimer::StepTimeout {
            branch_id: branch_id.clone(),
            attempt: *attempt,
        },
        Timer::RetryExecute { branch_id } => StoredTimer::RetryExecute {
            branch_id: branch_id.clone(),
        },
        Timer::Poll { branch_id } => StoredTimer::Poll {
            branch_id: branch_id.clone(),
        },
        Timer::RetryReversal { branch_id } => StoredTimer::RetryReversal {
            branch_id: branch_id.clone(),
        },
        Timer::Deadline => StoredTimer::Deadline,
    };
    store::encode_unversioned(&stored).map_err(|e| store::Error::Corrupt {
        table: "due",
        detail: format!("encoding a timer: {e}"),
    })
}

pub fn decode_timer(bytes: &[u8]) -> Result<Timer, store::Error> {
    let stored: StoredTimer = postcard::from_bytes(bytes).map_err(|e| store::Error::Corrupt {
        table: "due",
        detail: format!("decoding a timer: {e}"),
    })?;
    Ok(match stored {
        StoredTimer::StepTimeout { branch_id, attempt } => {
            Timer::StepTimeout { branch_id, attempt }
        }
        StoredTimer::RetryExecute { branch_id } => Timer::RetryExecute { branch_id },
        StoredTimer::Poll { branch_id } => Timer::Poll { branch_id },
        StoredTimer::RetryReversal { branch_id } => Timer::RetryReversal { branch_id },
        StoredTimer::Deadline => Timer::Deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn commands_round_trip(gsn in ".{0,30}", branch in ".{0,20}", action in ".{0,20}", signal in 0u8..5, kind in 0u8..4, attempt in proptest::prelude::any::<u32>()) {
            let kind = [Kind::Execute, Kind::Reverse, Kind::QueryStatus, Kind::Signal][kind as usize];
            let command = Command { kind, gsn, branch_id: branch.clone(), node_id: branch, action, reason: "r".into(), signal, business_type: "order".into(), attempt };
            prop_assert_eq!(decode_command(&encode_command(&command).unwrap()).unwrap(), command);
        }

        #[test]
        fn commands_stored_before_attempts_read_with_an_unknown_attempt(gsn in ".{0,30}", branch in ".{0,20}", action in ".{0,20}", signal in 0u8..5, kind in 0u8..4) {
            #[derive(Serialize)]
            struct Written<'a> { kind: Kind, gsn: &'a str, branch_id: &'a str, node_id: &'a str, action: &'a str, reason: &'a str, signal: u8, business_type: &'a str }
            let kind = [Kind::Execute, Kind::Reverse, Kind::QueryStatus, Kind::Signal][kind as usize];
            let bytes = postcard::to_stdvec(&Written { kind, gsn: &gsn, branch_id: &branch, node_id: &branch, action: &action, reason: "r", signal, business_type: "order" }).unwrap();
            let expected = Command { kind, gsn, branch_id: branch.clone(), node_id: branch, action, reason: "r".into(), signal, business_type: "order".into(), attempt: 0 };
            prop_assert_eq!(decode_command(&bytes).unwrap(), expected);
        }

        #[test]
        fn timers_round_trip(branch_id in ".{0,20}", which in 0u8..5) {
            let timer = match which {
                0 => Timer::StepTimeout { branch_id, attempt: 2 },
                4 => Timer::RetryExecute { branch_id },
                1 => Timer::Poll { branch_id },
                2 => Timer::RetryReversal { branch_id },
                _ => Timer::Deadline,
            };
            prop_assert_eq!(decode_timer(&encode_timer(&timer).unwrap()).unwrap(), timer);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_command(&bytes);
            let _ = decode_timer(&bytes);
        }
    }
}
