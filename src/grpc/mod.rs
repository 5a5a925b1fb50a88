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
/// the same request. `btree_map` in build.rs makes map fields encode in a stable order. The id
/// is taken out for the encoding and put back, rather than the request copied, payload and
/// all; an empty string field encodes to nothing, so the digest is the one a copy with the
/// id cleared gave (stored digests stay valid).
fn fingerprint<M: Message>(request: &mut M, request_id: impl Fn(&mut M) -> &mut String) -> Vec<u8> {
    let id = std::mem::take(request_id(request));
    let digest = Sha256::digest(request.encode_to_vec()).to_vec();
    *request_id(request) = id;
    digest
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored idempotency records hold digests computed from a copy of the request with its
    /// id cleared; the digest must stay that, and the request must come back whole.
    #[test]
    fn a_fingerprint_is_the_digest_without_the_request_id_and_leaves_the_request_whole() {
        let mut request = pb::StartSagaRequest {
            request_id: "order-7".into(),
            business_type: "order".into(),
            payload: b"{\"sku\":42}".to_vec(),
            labels: [("region".to_owned(), "eu".to_owned())].into(),
            ..Default::default()
        };
        let original = request.clone();
        let mut cleared = request.clone();
        cleared.request_id.clear();
        let digest = fingerprint(&mut request, |r| &mut r.request_id);
        assert_eq!(digest, Sha256::digest(cleared.encode_to_vec()).to_vec());
        assert_eq!(request, original);
        let mut other_id = pb::StartSagaRequest {
            request_id: "order-8".into(),
            ..original
        };
        assert_eq!(fingerprint(&mut other_id, |r| &mut r.request_id), digest);
    }
}
