//! sagad-bench: sagas per second and latency against the gRPC and disk floors (being written).

fn main() {}
