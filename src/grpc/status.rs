//! The one mapping from engine errors to gRPC statuses. Client mistakes are logged at DEBUG;
//! internal faults at ERROR with their detail, while the caller gets a generic message.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::Violation;
use crate::engine::Error;
use crate::store;

pub fn invalid(violations: &[Violation]) -> Status {
    let mut details = ErrorDetails::new();
    let mut message = String::from("invalid request: ");
    for (i, v) in violations.iter().enumerate() {
        if i > 0 {
            message.push_str("; ");
        }
        message.push_str(&format!("{} {}", v.field, v.description));
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

pub fn from_engine(error: Error) -> Status {
    match error {
        Error::Invalid(violations) => {
            tracing::debug!(?violations, "refused an invalid request");
            invalid(&violations)
        }
        Error::NotFound(message) => {
            tracing::debug!(%message, "not found");
            Status::not_found(message)
        }
        e @ Error::RequestIdReused { .. } => {
            tracing::debug!(error = %e, "request id reused");
            Status::failed_precondition(e.to_string())
        }
        e @ Error::InProgress { .. } => Status::aborted(e.to_string()),
        e @ Error::Replaced { .. } => {
            tracing::info!(error = %e, "a Subscribe stream ends");
            Status::aborted(e.to_string())
        }
        Error::AlreadyExists(message) => {
            tracing::debug!(%message, "already exists");
            Status::already_exists(message)
        }
        Error::FailedPrecondition(message) => {
            tracing::debug!(%message, "failed precondition");
            Status::failed_precondition(message)
        }
        Error::Store(store::Error::Closed) => {
            Status::unavailable("sagad is shutting down; retry on another instance or later")
        }
        Error::Store(e @ store::Error::Fatal(_)) => {
            tracing::error!(error = %e, "refused: the ledger had a fatal fault");
            Status::unavailable(
                "sagad's ledger could not be made durable; sagad must be restarted, which \
                 recovers from what is on disk: retry the request (same request_id) once it is back",
            )
        }
        Error::Store(e @ (store::Error::Corrupt { .. } | store::Error::UnknownVersion { .. })) => {
            tracing::error!(error = %e, "a stored record cannot be read");
            Status::data_loss(
                "a stored record this request needs cannot be read (damaged, or written by a \
                 newer sagad); the detail is in sagad's log",
            )
        }
        Error::Store(e) => {
            tracing::error!(error = %e, "ledger failure");
            Status::internal("internal error; the detail is in sagad's log")
        }
    }
}
