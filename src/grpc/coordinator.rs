//! The Coordinator service at the edge: StartSaga, GetSaga and ListSagas are served; the
//! methods of later issues answer UNIMPLEMENTED with what is missing.

use std::pin::Pin;

use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, ListQuery};
use crate::grpc::unimplemented::not_yet;
use crate::grpc::{answer, convert, fingerprint, pb, status};

pub struct CoordinatorService {
    engine: Engine,
}

impl CoordinatorService {
    pub fn new(engine: Engine) -> CoordinatorService {
        CoordinatorService { engine }
    }
}

type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const OUTCALLS: &str = "the reversal protocol (registered outcalls, S1)";
const ENGINE: &str = "the saga engine (strategies driving participants, S2)";

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let request = request.into_inner();
        let digest = fingerprint(&request, |r| r.request_id.clear());
        let start = convert::start_request(request).map_err(|v| status::invalid(&v))?;
        let answered = self
            .engine
            .start_saga(start, digest, |saga| {
                pb::StartSagaResponse {
                    gsn: saga.gsn.to_string(),
                    saga: Some(convert::saga(saga, true)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        let response = answer::<pb::StartSagaResponse>(answered)?;
        tracing::info!(gsn = %response.get_ref().gsn, replayed = response.metadata().contains_key(crate::grpc::REPLAYED_HEADER), "saga started");
        Ok(response)
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::GetSagaResponse>, Status> {
        let saga = self
            .engine
            .get_saga(&request.get_ref().gsn)
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::GetSagaResponse {
            saga: Some(convert::saga(&saga, true)),
        }))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let request = request.into_inner();
        let mut states = Vec::with_capacity(request.states.len());
        for value in &request.states {
            match convert::saga_state_from_pb(*value) {
                Some(state) => states.push(state),
                None => {
                    return Err(status::invalid(&[crate::domain::Violation::new(
                        "states",
                        format!(
                            "{value} is not a saga state (RUNNING, COMPLETED, REVERSING, REVERSED, NEEDS_ATTENTION)"
                        ),
                    )]));
                }
            }
        }
        let full = request.full;
        let page = self
            .engine
            .list_sagas(ListQuery {
                states,
                business_type: request.business_type,
                page_size: request.page_size,
                page_token: request.page_token,
                newest_first: request.newest_first,
            })
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::ListSagasResponse {
            sagas: page.sagas.iter().map(|s| convert::saga(s, full)).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn register_outcall(
        &self,
        _: Request<pb::RegisterOutcallRequest>,
    ) -> Result<Response<pb::RegisterOutcallResponse>, Status> {
        Err(not_yet("Coordinator.RegisterOutcall", OUTCALLS))
    }

    async fn report_state(
        &self,
        _: Request<pb::ReportStateRequest>,
    ) -> Result<Response<pb::ReportStateResponse>, Status> {
        Err(not_yet("Coordinator.ReportState", ENGINE))
    }

    async fn request_reversal(
        &self,
        _: Request<pb::RequestReversalRequest>,
    ) -> Result<Response<pb::RequestReversalResponse>, Status> {
        Err(not_yet("Coordinator.RequestReversal", OUTCALLS))
    }

    async fn complete_saga(
        &self,
        _: Request<pb::CompleteSagaRequest>,
    ) -> Result<Response<pb::CompleteSagaResponse>, Status> {
        Err(not_yet("Coordinator.CompleteSaga", OUTCALLS))
    }

    async fn reprocess_saga(
        &self,
        _: Request<pb::ReprocessSagaRequest>,
    ) -> Result<Response<pb::ReprocessSagaResponse>, Status> {
        Err(not_yet("Coordinator.ReprocessSaga", OUTCALLS))
    }

    type WatchSagaStream = ServerStream<pb::WatchSagaResponse>;

    async fn watch_saga(
        &self,
        _: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        Err(not_yet("Coordinator.WatchSaga", ENGINE))
    }

    async fn register_node(
        &self,
        _: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        Err(not_yet("Coordinator.RegisterNode", ENGINE))
    }

    type SubscribeStream = ServerStream<pb::Command>;

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(not_yet("Coordinator.Subscribe", ENGINE))
    }

    async fn ack(&self, _: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        Err(not_yet("Coordinator.Ack", ENGINE))
    }
}
