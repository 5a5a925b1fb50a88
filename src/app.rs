//! Wiring: opens the ledger, builds the engine and every gRPC service (plus health and
//! reflection), serves on a bound listener until the shutdown future resolves, then drains
//! in-flight requests within the grace period and closes the ledger durably.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::domain::orchestration::Policy;
use crate::domain::saga::Limits;
use crate::engine::{Engine, Settings};
use crate::grpc::{self, pb};
use crate::random::{SharedRandom, SystemRandom};
use crate::store::{self, Store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ledger(#[from] store::Error),
    #[error("the listener has no local address: {0}")]
    Listener(std::io::Error),
    /// With its causes: a transport error's own text is only "transport error".
    #[error("the gRPC server failed: {}", error_chain(.0))]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection could not load the contracts: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the engine could not start: {0}")]
    Engine(#[from] crate::engine::Error),
    #[error("the server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// sagad stopped after its ledger could not be made durable; a restart recovers it from
    /// what is on disk.
    #[error(
        "the ledger could not be made durable ({0}); sagad stopped: restart it, and it recovers \
         the ledger from what is on disk"
    )]
    LedgerFault(String),
}

/// `error` followed by each of its causes.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Idempotency records are collected this often, this many per ledger write.
const COLLECT_EVERY: Duration = Duration::from_secs(60);
/// Finished sagas past their retention are looked for this often. A look reads the sagas that
/// aged past the retention since the last one, plus the first saga still within it; sagas it
/// kept are read again only when they may have become removable (see `engine::retention`).
const COLLECT_SAGAS_EVERY: Duration = Duration::from_secs(1);
const COLLECT_BATCH: usize = 1_000;

/// The names health reports on, besides the whole server ("").
const SERVICE_NAMES: [&str; 5] = [
    "sagad.v1.Coordinator",
    "sagad.v1.Strategies",
    "sagad.v1.Retries",
    "sagad.v1.Idempotency",
    "sagad.v1.Operations",
];

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Opens the ledger named by `config` (blocking work, off the async workers).
pub async fn open_store(config: &Config) -> Result<Store, Error> {
    let mut options = store::Options::new(config.data.clone());
    options.durability = config.durability;
    options.cache_capacity_bytes = config.cache_capacity_bytes;
    Ok(tokio::task::spawn_blocking(move || Store::open(options)).await??)
}

/// Serves on `listener` with the system clock until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve_with(
        listener,
        config,
        Arc::new(SystemClock),
        Arc::new(SystemRandom::new()),
        shutdown,
    )
    .await
}

/// As `serve`, with time read from `clock` and randomness drawn from `random`.
pub async fn serve_with(
    listener: TcpListener,
    config: Config,
    clock: SharedClock,
    random: SharedRandom,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let store = open_store(&config).await?;
    let engine = Engine::new(
        store.clone(),
        clock,
        random,
        Settings {
            limits: Limits {
                max_payload_bytes: config.max_payload_bytes,
            },
            idempotency_retention: config.idempotency_retention,
            saga_retention: config.saga_retention,
            participant_timeout: config.participant_timeout,
            policy: Policy {
                max_polls: config.max_polls,
                ..Policy::default()
            },
            outcall_saga_timeout_ms: crate::domain::millis_rounded_up(config.outcall_saga_timeout),
            ..Settings::new(config.coordinator_id.clone())
        },
    );
    // Its write is the first of a start, so the first to meet a ledger that cannot be made
    // durable: that must exit 74 (restart me) like any later fault, not 1.
    engine
        .register_configured_nodes(&config.nodes)
        .await
        .map_err(|e| ledger_fault(e.into()))?;
    engine.start().await.map_err(|e| ledger_fault(e.into()))?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;

    // grpcurl 1.8 speaks only reflection v1alpha; newer clients use v1. Serve both.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(grpc::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let collector = tokio::spawn(collect_expired_forever(engine.clone()));
    let saga_collector = (!config.saga_retention.is_zero()).then(|| {
        tokio::spawn(collect_finished_sagas_forever(
            engine.clone(),
            config.saga_retention,
        ))
    });

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Nagle's algorithm stays on unless asked: with it, p99 latency at 64 in flight is ~7x worse.
    // A peer that vanished without closing (a host lost, a NAT entry dropped) would otherwise
    // hold its connection, and a Subscribe stream on it would be taken for a live node's.
    let keepalive = (!config.keepalive.is_zero()).then_some(config.keepalive);
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(keepalive);
    let router = Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::coordinator_server::CoordinatorServer::new(
            grpc::CoordinatorService::new(engine.clone()),
        ))
        .add_service(pb::idempotency_server::IdempotencyServer::new(
            grpc::IdempotencyService::new(engine.clone()),
        ))
        .add_service(pb::strategies_server::StrategiesServer::new(
            grpc::StrategiesService::new(engine.clone()),
        ))
        .add_service(pb::retries_server::RetriesServer::new(
            grpc::RetriesService::new(engine.clone()),
        ))
        .add_service(pb::operations_server::OperationsServer::new(
            grpc::OperationsService::new(engine.clone()),
        ));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(%addr, coordinator_id = %config.coordinator_id, data = %config.data.display(), durability = ?config.durability, "sagad is serving");

    let stop = tokio::select! {
        served = &mut server => Stop::Served(served),
        () = shutdown => Stop::Asked,
        detail = store.fatal_fault() => Stop::LedgerFault(detail),
    };
    let fault = match &stop {
        Stop::LedgerFault(detail) => Some(detail.clone()),
        Stop::Served(_) | Stop::Asked => None,
    };
    let result = match stop {
        // The server stopped by itself: that is a failure, not a shutdown.
        Stop::Served(served) => served
            .map_err(Error::from)
            .and_then(|r| r.map_err(Error::from)),
        Stop::Asked | Stop::LedgerFault(_) => {
            match &fault {
                Some(detail) => tracing::error!(
                    error = %detail,
                    grace = ?config.shutdown_grace,
                    "the ledger could not be made durable: sagad stops, so that a restart \
                     recovers from what is on disk; draining in-flight requests"
                ),
                None => {
                    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight requests")
                }
            }
            set_health(&health_reporter, ServingStatus::NotServing).await;
            // Subscribe and WatchSaga streams end first: the drain waits for every open
            // stream, and these would otherwise hold it for the whole grace period.
            engine.end_streams();
            let _ = stop_tx.send(());
            match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(served) => served
                    .map_err(Error::from)
                    .and_then(|r| r.map_err(Error::from)),
                Err(_) => {
                    tracing::warn!(
                        "the grace period ended with requests still in flight; they are dropped unanswered"
                    );
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    collector.abort();
    if let Some(saga_collector) = saga_collector {
        saga_collector.abort();
    }
    engine.stop();
    let closed = store.close().await;
    if let Some(detail) = fault {
        // Whatever the drain and the close said, the cause to report is the fault.
        return Err(Error::LedgerFault(detail));
    }
    closed.map_err(|e| ledger_fault(e.into()))?;
    tracing::info!("sagad stopped; the ledger is closed");
    result
}

/// A fatal ledger fault met on a path where serving ends early (start-up, or the close after a
/// shutdown asked for) is reported as one, so that `main` exits 74 for a supervisor to restart
/// sagad, as it does for a fault met while serving.
fn ledger_fault(error: Error) -> Error {
    match error {
        Error::Ledger(store::Error::Fatal(detail))
        | Error::Engine(crate::engine::Error::Store(store::Error::Fatal(detail))) => {
            Error::LedgerFault(detail)
        }
        other => other,
    }
}

/// Why serving ended.
enum Stop {
    /// The server ended by itself.
    Served(Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>),
    /// The shutdown future resolved.
    Asked,
    /// The ledger had a fatal fault (`Store::fatal_fault`).
    LedgerFault(String),
}

/// Removes finished sagas past their retention, catching up on each tick.
async fn collect_finished_sagas_forever(engine: Engine, saga_retention: Duration) {
    let mut ticker = tokio::time::interval(COLLECT_SAGAS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match engine.collect_finished_sagas(saga_retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "finished sagas past their retention removed"),
            Err(e) => tracing::warn!(error = %e, "removing finished sagas failed; will retry"),
        }
    }
}

/// Collects expired idempotency records.
async fn collect_expired_forever(engine: Engine) {
    let mut ticker = tokio::time::interval(COLLECT_EVERY);
    loop {
        ticker.tick().await;
        loop {
            match engine.collect_expired(COLLECT_BATCH).await {
                Ok(collected) => {
                    if collected.removed > 0 {
                        tracing::debug!(
                            collected = collected.removed,
                            "expired idempotency records collected"
                        );
                    }
                    // Records held for their saga use up the batch without being collected,
                    // so a full batch looked at, not removed, says there may be more due.
                    if collected.examined < COLLECT_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "collecting expired idempotency records failed; will retry");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_ledger_fault_met_at_start_or_close_is_reported_as_a_ledger_fault() {
        let fatal = || store::Error::Fatal("fdatasync failed".into());
        for error in [
            Error::Ledger(fatal()),
            Error::Engine(crate::engine::Error::Store(fatal())),
        ] {
            assert!(
                matches!(ledger_fault(error), Error::LedgerFault(d) if d == "fdatasync failed")
            );
        }
        let other = ledger_fault(Error::Ledger(store::Error::Closed));
        assert!(matches!(other, Error::Ledger(store::Error::Closed)));
    }
}
