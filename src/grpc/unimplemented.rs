//! Services whose behaviour arrives with later issues: they answer UNIMPLEMENTED, naming what
//! is missing, so a client learns it from the status rather than from a hang or a wrong answer.

use tonic::{Request, Response, Status};

use crate::grpc::pb;

pub fn not_yet(method: &str, arrives_with: &str) -> Status {
    Status::unimplemented(format!(
        "{method} is not implemented in this build of sagad yet; it arrives with {arrives_with}"
    ))
}

const STRATEGIES: &str = "the saga engine (fulfillment strategies, S2)";
const RETRIES: &str = "central failure-retry control (S5)";

#[derive(Debug, Default, Clone)]
pub struct StrategiesService;

#[tonic::async_trait]
impl pb::strategies_server::Strategies for StrategiesService {
    async fn put_strategy(
        &self,
        _: Request<pb::PutStrategyRequest>,
    ) -> Result<Response<pb::PutStrategyResponse>, Status> {
        Err(not_yet("Strategies.PutStrategy", STRATEGIES))
    }
    async fn get_strategy(
        &self,
        _: Request<pb::GetStrategyRequest>,
    ) -> Result<Response<pb::GetStrategyResponse>, Status> {
        Err(not_yet("Strategies.GetStrategy", STRATEGIES))
    }
    async fn list_strategies(
        &self,
        _: Request<pb::ListStrategiesRequest>,
    ) -> Result<Response<pb::ListStrategiesResponse>, Status> {
        Err(not_yet("Strategies.ListStrategies", STRATEGIES))
    }
}

#[derive(Debug, Default, Clone)]
pub struct RetriesService;

#[tonic::async_trait]
impl pb::retries_server::Retries for RetriesService {
    async fn check_retry(
        &self,
        _: Request<pb::CheckRetryRequest>,
    ) -> Result<Response<pb::CheckRetryResponse>, Status> {
        Err(not_yet("Retries.CheckRetry", RETRIES))
    }
    async fn put_retry_config(
        &self,
        _: Request<pb::PutRetryConfigRequest>,
    ) -> Result<Response<pb::PutRetryConfigResponse>, Status> {
        Err(not_yet("Retries.PutRetryConfig", RETRIES))
    }
    async fn get_retry_config(
        &self,
        _: Request<pb::GetRetryConfigRequest>,
    ) -> Result<Response<pb::GetRetryConfigResponse>, Status> {
        Err(not_yet("Retries.GetRetryConfig", RETRIES))
    }
    async fn get_retry_history(
        &self,
        _: Request<pb::GetRetryHistoryRequest>,
    ) -> Result<Response<pb::GetRetryHistoryResponse>, Status> {
        Err(not_yet("Retries.GetRetryHistory", RETRIES))
    }
}
