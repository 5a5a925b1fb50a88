//! The gRPC edge: the only module that names tonic server types and the generated `pb` code.
//! It converts requests into domain values, calls the engine, and maps every engine error to a
//! `tonic::Status` in one place (`status.rs`).

pub(crate) mod convert;
mod coordinator;
mod idempotency;
mod operations;
mod retries;
mod status;
mod strategies;

pub use coordinator::CoordinatorService;
pub use idempotency::IdempotencyService;
pub use operations::OperationsService;
pub use retries::RetriesService;
pub use strategies::StrategiesService;

/// Code generated from `proto/sagad/v1/*.proto`, clients and servers both.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::nursery)]
    tonic::include_proto!("sagad.v1");
}

/// The encoded descriptors of every sagad contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sagad_descriptor.bin"));

/// Response header set on a replayed answer to a repeated request_id.
pub const REPLAYED_HEADER: &str = "sagad-replayed";

use prost::Message;
use sha2::{Digest, Sha256};

use crate::engine::Answered;

/// Digest of a request without its request id: two requests with the same id and digest are
/// the same request. `btree_map` in build.rs makes map fields encode in a stable order.
fn fingerprint<M: Message + Clone>(request: &M, clear_request_id: impl FnOnce(&mut M)) -> Vec<u8> {
    let mut body = request.clone();
    clear_request_id(&mut body);
    Sha256::digest(body.encode_to_vec()).to_vec()
}

/// Turns a stored answer into the response, marking replays with `sagad-replayed: true`.
fn answer<M: Message + Default>(answered: Answered) -> Result<tonic::Response<M>, tonic::Status> {
    let message = M::decode(answered.response.as_slice()).map_err(|e| {
        tracing::error!(error = %e, "a stored response does not decode");
        tonic::Status::internal("internal error; the detail is in sagad's log")
    })?;
    let mut response = tonic::Response::new(message);
    if answered.replayed {
        response.metadata_mut().insert(
            REPLAYED_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    Ok(response)
}
