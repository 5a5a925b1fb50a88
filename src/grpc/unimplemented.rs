//! Services whose behaviour arrives with later issues: they answer UNIMPLEMENTED, naming what
//! is missing, so a client learns it from the status rather than from a hang or a wrong answer.

use tonic::Status;

pub fn not_yet(method: &str, arrives_with: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not implemented in this build of sagad yet; it arrives with {arrives_with}"
    ))
}
