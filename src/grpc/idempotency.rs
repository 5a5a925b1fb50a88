//! The Idempotency service at the edge: the S3 table offered to participants, and the branch
//! barrier (Guard) built on it.

use tonic::{Request, Response, Status};

use crate::domain::Violation;
use crate::domain::barrier::{Action, BranchKeys, Verdict};
use crate::domain::idempotency::Answer;
use crate::engine::{Begun, Engine, Error};
use crate::grpc::{convert, pb, status};

pub struct IdempotencyService {
    engine: Engine,
}

impl IdempotencyService {
    pub fn new(engine: Engine) -> IdempotencyService {
        IdempotencyService { engine }
    }
}

#[tonic::async_trait]
impl pb::idempotency_server::Idempotency for IdempotencyService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let request = request.into_inner();
        let lease = request
            .processing_timeout
            .as_ref()
            .map(|d| convert::duration("processing_timeout", d))
            .transpose()
            .map_err(|v| status::invalid(&[v]))?;
        let begun = self
            .engine
            .begin(
                &request.scope,
                &request.request_id,
                request.fingerprint,
                lease,
            )
            .await
            .map_err(status::from_engine)?;
        let (outcome, record) = match &begun {
            Begun::New(record) => (pb::BeginOutcome::New, record),
            Begun::InProgress(record) => (pb::BeginOutcome::InProgress, record),
            Begun::Done(record) => (pb::BeginOutcome::Done, record),
        };
        Ok(Response::new(pb::BeginResponse {
            outcome: outcome as i32,
            record: Some(convert::idempotency_record(
                &request.scope,
                &request.request_id,
                record,
            )),
        }))
    }

    async fn finish(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .engine
            .finish(
                &request.scope,
                &request.request_id,
                Answer {
                    result: request.result,
                    response: request.response,
                    content_type: request.content_type,
                },
            )
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::FinishResponse {
            record: Some(convert::idempotency_record(
                &request.scope,
                &request.request_id,
                &record,
            )),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRecordRequest>,
    ) -> Result<Response<pb::GetRecordResponse>, Status> {
        let request = request.into_inner();
        let record = self
            .engine
            .get_record(&request.scope, &request.request_id)
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::GetRecordResponse {
            record: Some(convert::idempotency_record(
                &request.scope,
                &request.request_id,
                &record,
            )),
        }))
    }

    async fn guard(
        &self,
        request: Request<pb::GuardRequest>,
    ) -> Result<Response<pb::GuardResponse>, Status> {
        let request = request.into_inner();
        let action = match pb::BranchAction::try_from(request.action) {
            Ok(pb::BranchAction::Forward) => Action::Forward,
            Ok(pb::BranchAction::Reversal) => Action::Reversal,
            Ok(pb::BranchAction::Unspecified) | Err(_) => {
                // Reported together with whatever else is wrong, so one round trip shows it all.
                let mut violations = vec![Violation::new(
                    "action",
                    "must be BRANCH_ACTION_FORWARD or BRANCH_ACTION_REVERSAL",
                )];
                if let Err(more) =
                    BranchKeys::parse(&request.node_id, &request.gsn, &request.branch_id)
                {
                    violations.extend(more);
                }
                return Err(status::from_engine(Error::Invalid(violations)));
            }
        };
        let guarded = self
            .engine
            .guard(
                &request.node_id,
                &request.gsn,
                &request.branch_id,
                action,
                &request.command_id,
            )
            .await
            .map_err(status::from_engine)?;
        let verdict = match guarded.verdict {
            Verdict::Proceed => pb::GuardVerdict::Proceed,
            Verdict::Duplicate => pb::GuardVerdict::Duplicate,
            Verdict::InProgress => pb::GuardVerdict::InProgress,
            Verdict::NullCompensation => pb::GuardVerdict::NullCompensation,
            Verdict::Hanging => pb::GuardVerdict::Hanging,
        };
        Ok(Response::new(pb::GuardResponse {
            verdict: verdict as i32,
            record: Some(convert::idempotency_record(
                &guarded.scope,
                &guarded.request_id,
                &guarded.record,
            )),
        }))
    }
}
