//! The Idempotency service at the edge: the S3 table offered to participants.

use tonic::{Request, Response, Status};

use crate::domain::idempotency::Answer;
use crate::engine::{Begun, Engine};
use crate::grpc::unimplemented::not_yet;
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
        _: Request<pb::GuardRequest>,
    ) -> Result<Response<pb::GuardResponse>, Status> {
        Err(not_yet(
            "Idempotency.Guard",
            "the reversal protocol's participant barrier (S1)",
        ))
    }
}
