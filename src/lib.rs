//! sagad: a saga coordinator. Crate map (dependencies point one way, top to bottom):
//!
//! - [`app`]: wiring — opens the ledger, builds the engine and the gRPC services, serves.
//! - [`config`]: flags, environment and defaults turned into one validated [`config::Config`].
//! - [`grpc`]: the only module with tonic server types and generated `pb` code; converts at the edge.
//! - [`engine`]: persist-then-act shell around the domain: one transaction per event.
//! - [`transport`]: calls to participant nodes' Participant services (push delivery).
//! - [`store`]: the ledger, the only module that names sled.
//! - [`domain`]: pure rules (ids, sagas, idempotence); no I/O, no clock.
//! - [`clock`], [`random`]: the one homes of wall-clock reads and of randomness.

pub mod app;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod grpc;
pub mod random;
pub mod store;
pub mod transport;
