//! The Coordinator service at the edge: sagas, registered outcalls, reports, reversals,
//! watching, and the nodes' endpoints and streams.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::domain::branch::Report;
use crate::domain::saga::ReversalType;
use crate::engine::{Engine, ListQuery, OutcallInput, ReportInput, ReversalInput};
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

/// `stream`, ended with UNAVAILABLE once sagad begins shutting down (`Engine::streams_ended`):
/// the server's graceful drain waits for every open stream, and Subscribe and WatchSaga end
/// only when their node goes away or their saga ends. UNAVAILABLE tells the client to open the
/// stream again, on this sagad once restarted or on another.
fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    engine: &Engine,
) -> ServerStream<T> {
    let open = Some((Box::pin(stream), Box::pin(engine.streams_ended())));
    Box::pin(futures::stream::unfold(open, |open| async move {
        let (mut stream, mut ended) = open?;
        tokio::select! {
            biased;
            () = &mut ended => Some((
                Err(Status::unavailable(
                    "sagad is shutting down; open the stream again once it is back",
                )),
                None,
            )),
            item = stream.next() => item.map(|item| (item, Some((stream, ended)))),
        }
    }))
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::StartSagaResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let start = convert::start_request(request).map_err(|v| status::invalid(&v))?;
        let (answered, first) = self
            .engine
            .start_saga(start, digest, |saga| {
                let response = pb::StartSagaResponse {
                    gsn: saga.gsn.to_string(),
                    saga: Some(convert::saga(saga, true)),
                };
                (response.encode_to_vec(), response)
            })
            .await
            .map_err(status::from_engine)?;
        let response = match first {
            Some(response) => tonic::Response::new(response),
            None => answer::<pb::StartSagaResponse>(answered)?,
        };
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
        let states = convert::saga_states_filter(&request.states).map_err(|value| {
            status::invalid(&[crate::domain::Violation::new(
                "states",
                format!(
                    "{value} is not a saga state (RUNNING, COMPLETED, REVERSING, REVERSED, NEEDS_ATTENTION)"
                ),
            )])
        })?;
        let full = request.full;
        let page = self
            .engine
            .list_sagas(ListQuery {
                states,
                business_type: request.business_type,
                page_size: request.page_size,
                page_token: request.page_token,
                newest_first: request.newest_first,
                with_payloads: request.full,
            })
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::ListSagasResponse {
            sagas: page.sagas.iter().map(|s| convert::saga(s, full)).collect(),
            next_page_token: page.next_page_token,
            unreadable_sequences: page.unreadable_sequences,
        }))
    }

    async fn register_outcall(
        &self,
        request: Request<pb::RegisterOutcallRequest>,
    ) -> Result<Response<pb::RegisterOutcallResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let input = OutcallInput {
            request_id: request.request_id,
            gsn: request.gsn,
            caller_node_id: request.caller_node_id,
            callee_node_id: request.callee_node_id,
            forward_action: request.forward_action,
            reversal_action: request.reversal_action,
            order: request.order,
            payload: request.payload,
            content_type: request.content_type,
        };
        let answered = self
            .engine
            .register_outcall(input, digest, |saga, branch_id| {
                pb::RegisterOutcallResponse {
                    branch_id: branch_id.to_owned(),
                    branch: saga.branch(branch_id).map(convert::branch),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    async fn report_state(
        &self,
        request: Request<pb::ReportStateRequest>,
    ) -> Result<Response<pb::ReportStateResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        if pb::Outcome::try_from(request.outcome).map_or(true, |o| o == pb::Outcome::Unspecified) {
            return Err(status::invalid(&[crate::domain::Violation::new(
                "outcome",
                "is required: OUTCOME_SUCCEEDED, OUTCOME_FAILED, OUTCOME_PROCESSING, OUTCOME_UNKNOWN, OUTCOME_NOT_FOUND or OUTCOME_REVERSED",
            )]));
        }
        let input = ReportInput {
            request_id: request.request_id,
            gsn: request.gsn,
            branch_id: request.branch_id,
            reporter_node_id: request.reporter_node_id,
            report: Report {
                outcome: convert::outcome_from_pb(request.outcome),
                status: request.status.map(convert::status_from_pb),
                error_code: request.error_code,
                message: request.message,
                // Read from command_id by the engine, if the report names its command.
                attempt: None,
            },
            command_id: request.command_id,
        };
        let answered = self
            .engine
            .report_state(input, digest, |saga, branch_id| {
                pb::ReportStateResponse {
                    branch: saga.branch(branch_id).map(convert::branch),
                    saga_state: convert::saga_state(saga.state) as i32,
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    async fn request_reversal(
        &self,
        request: Request<pb::RequestReversalRequest>,
    ) -> Result<Response<pb::RequestReversalResponse>, Status> {
        let mut request = request.into_inner();
        // `wait` is how long this call blocks, not what it asks: a repeat that waits longer or
        // shorter is the same request. Builds before this one digested it too, so a
        // registration stored under that digest still matches.
        let with_wait = request
            .wait
            .is_some()
            .then(|| fingerprint(&mut request, |r| &mut r.request_id));
        let wait_given = request.wait.take();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let reversal_type = match pb::ReversalType::try_from(request.reversal_type) {
            Ok(pb::ReversalType::External) => Some(ReversalType::External),
            Ok(pb::ReversalType::Internal) => Some(ReversalType::Internal),
            Ok(pb::ReversalType::Unspecified) | Err(_) => None,
        };
        let wait = wait_given
            .as_ref()
            .map(|d| convert::duration("wait", d))
            .transpose()
            .map_err(|v| status::invalid(&[v]))?;
        let input = ReversalInput {
            request_id: request.request_id,
            gsn: request.gsn,
            branch_id: request.branch_id,
            reversal_type,
            serial: request.reversal_serial,
            reason: request.reason,
            wait,
            digest_with_wait: with_wait,
        };
        let answered = self
            .engine
            .request_reversal(input, digest, |signal, saga| {
                pb::RequestReversalResponse {
                    signal: convert::signal_of(Some(signal)) as i32,
                    saga: Some(convert::saga(saga, true)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    async fn complete_saga(
        &self,
        request: Request<pb::CompleteSagaRequest>,
    ) -> Result<Response<pb::CompleteSagaResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let answered = self
            .engine
            .complete_saga(&request.request_id, &request.gsn, digest, |saga| {
                pb::CompleteSagaResponse {
                    saga: Some(convert::saga(saga, true)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    async fn reprocess_saga(
        &self,
        request: Request<pb::ReprocessSagaRequest>,
    ) -> Result<Response<pb::ReprocessSagaResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let answered = self
            .engine
            .reprocess_saga(&request.request_id, &request.gsn, digest, |saga| {
                pb::ReprocessSagaResponse {
                    saga: Some(convert::saga(saga, true)),
                }
                .encode_to_vec()
            })
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    type WatchSagaStream = ServerStream<pb::WatchSagaResponse>;

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let changes = self
            .engine
            .watch_saga(&request.get_ref().gsn)
            .await
            .map_err(status::from_engine)?;
        let stream = changes.map(|saga| {
            Ok(pb::WatchSagaResponse {
                saga: Some(convert::saga(&saga, false)),
            })
        });
        Ok(Response::new(until_shutdown(stream, &self.engine)))
    }

    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        let answered = self
            .engine
            .register_node(
                &request.request_id,
                &request.node_id,
                &request.endpoint,
                digest,
                |node| {
                    pb::RegisterNodeResponse {
                        node: Some(pb::Node {
                            node_id: node.node_id.clone(),
                            endpoint: node.endpoint.clone(),
                            updated_at: Some(convert::timestamp(node.updated_ms)),
                        }),
                    }
                    .encode_to_vec()
                },
            )
            .await
            .map_err(status::from_engine)?;
        answer(answered)
    }

    type SubscribeStream = ServerStream<pb::Command>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = self
            .engine
            .subscribe(&request.get_ref().node_id)
            .map_err(status::from_engine)?;
        let engine = self.engine.clone();
        let stream = subscription.into_stream().map(move |item| match item {
            Ok(outgoing) => Ok(outgoing.into_pb(Some(convert::timestamp(engine.now_ms())))),
            Err(e) => Err(status::from_engine(e)),
        });
        Ok(Response::new(until_shutdown(stream, &self.engine)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let mut request = request.into_inner();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        self.engine
            .ack(
                &request.request_id,
                &request.node_id,
                &request.command_id,
                digest,
            )
            .await
            .map_err(status::from_engine)?;
        Ok(Response::new(pb::AckResponse {}))
    }
}
