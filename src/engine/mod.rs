//! The persist-then-act shell around the domain: each request becomes one ledger write that
//! runs the domain's rules against the stored state, stores the outcome and the idempotency
//! record together, and is answered only once durable. The engine owns no tonic type and no
//! sled type; it is handed the store, the clock and the limits.

mod barrier;
pub(crate) mod commands;
mod convert;
mod delivery;
pub mod metrics;
mod nodes;
pub mod operations;
mod outcalls;
pub mod paging;
mod retention;
mod retries;
mod sagas;
mod strategies;
mod timers;
mod watch;

/// What the engine's modules' own tests share.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]
    use super::{Engine, Settings};
    use crate::clock::SharedClock;
    use crate::domain::ids::CoordinatorId;
    use crate::store;
    use std::sync::Arc;

    /// An engine of coordinator "c1" on a fresh ledger, on `clock`; `settings` adjusts the
    /// defaults. The ledger is opened off the async workers, as sagad does.
    pub(crate) async fn engine_on_fresh_ledger(
        clock: SharedClock,
        settings: impl FnOnce(&mut Settings),
    ) -> (tempfile::TempDir, store::Store, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let options = store::Options::new(dir.path().join("ledger"));
        let store = tokio::task::spawn_blocking(move || store::Store::open(options))
            .await
            .unwrap()
            .unwrap();
        let mut chosen = Settings::new(CoordinatorId::parse("c1").unwrap());
        settings(&mut chosen);
        let engine = Engine::new(
            store.clone(),
            clock,
            Arc::new(crate::random::FixedRandom(0.5)),
            chosen,
        );
        (dir, store, engine)
    }
}

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::clock::SharedClock;
use crate::domain::barrier::BranchKeys;
use crate::domain::idempotency::{self, Answer, Lookup, Terms};
use crate::domain::ids::{CoordinatorId, Gsn, RequestId};
use crate::domain::orchestration::Policy;
use crate::domain::saga::{Limits, Saga, SagaState, too_long};
use crate::domain::strategy::Strategy;
use crate::domain::{Millis, Violation};
use crate::random::SharedRandom;
use crate::store::{self, IdempotencyKey, IdempotencyNamespace, Store, WriteTx};

pub use convert::signal_from_code;
pub use delivery::InFlight;
pub use nodes::Subscription;
pub use outcalls::{OutcallInput, ReversalInput};
pub use paging::PageToken;
pub use sagas::ReportInput;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the request has invalid fields")]
    Invalid(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "request_id {request_id:?} was already used for a different request; send a new request \
         with a new request_id, or repeat the original request unchanged"
    )]
    RequestIdReused { request_id: String },
    #[error("the request with request_id {request_id:?} is still in progress; retry it later")]
    InProgress { request_id: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A Subscribe stream a newer Subscribe for the same node replaced.
    #[error(
        "this stream was replaced by a newer Subscribe for node {node_id:?}; run one subscriber \
         per node_id (two keep replacing each other, and each new stream is sent every \
         unanswered command again)"
    )]
    Replaced { node_id: String },
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl Error {
    fn invalid(field: &str, description: impl Into<String>) -> Error {
        Error::Invalid(vec![Violation::new(field, description)])
    }
}

/// The stored answer to a mutating request, and whether it is a replay of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub response: Vec<u8>,
    pub replayed: bool,
}

/// A day: longer than any call chain a caller makes before completing, short enough that
/// what a dead caller booked does not stay for good.
pub const DEFAULT_OUTCALL_SAGA_TIMEOUT_MS: Millis = 24 * 3_600_000;

#[derive(Debug, Clone)]
pub struct Settings {
    pub coordinator_id: CoordinatorId,
    pub limits: Limits,
    pub idempotency_retention: Duration,
    /// How long finished sagas are kept after their last change (`--saga-retention`); zero
    /// keeps them. Removing them is the app's task; this tells how long records that must
    /// live as long as a saga are held.
    pub saga_retention: Duration,
    /// How sagas poll and retry reversals.
    pub policy: Policy,
    /// A call to a participant's endpoint fails after this long.
    pub participant_timeout: Duration,
    /// A command sent on a Subscribe stream and not answered is sent again after this long.
    pub resend_after: Duration,
    /// Redelivery to an unreachable endpoint backs off from `redelivery_base` to `redelivery_cap`.
    pub redelivery_base: Duration,
    pub redelivery_cap: Duration,
    /// The deadline a registered-outcall saga started without one gets, this long after its
    /// start; 0 gives none. Such a saga has no steps of sagad's own to time out, so without
    /// it a caller that died before CompleteSaga would leave what it booked in place forever.
    pub outcall_saga_timeout_ms: Millis,
}

impl Settings {
    pub fn new(coordinator_id: CoordinatorId) -> Settings {
        Settings {
            coordinator_id,
            limits: Limits {
                max_payload_bytes: 1024 * 1024,
            },
            idempotency_retention: Duration::from_secs(7 * 24 * 3600),
            saga_retention: Duration::ZERO,
            policy: Policy::default(),
            participant_timeout: Duration::from_secs(10),
            resend_after: Duration::from_secs(5),
            redelivery_base: Duration::from_millis(200),
            redelivery_cap: Duration::from_secs(10),
            outcall_saga_timeout_ms: DEFAULT_OUTCALL_SAGA_TIMEOUT_MS,
        }
    }
}

/// What `list_sagas` is asked for.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub states: Vec<SagaState>,
    pub business_type: String,
    pub page_size: u32,
    pub page_token: String,
    pub newest_first: bool,
    pub with_payloads: bool,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub sagas: Vec<Saga>,
    pub next_page_token: String,
    /// Sequences of saga records in the page's range that do not decode, passed over.
    pub unreadable_sequences: Vec<u64>,
}

/// What `begin` tells a participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    New(idempotency::Record),
    InProgress(idempotency::Record),
    Done(idempotency::Record),
}

#[derive(Clone)]
pub struct Engine {
    store: Store,
    clock: SharedClock,
    random: SharedRandom,
    settings: Settings,
    shared: Arc<Shared>,
}

/// Listings return this many items unless asked for fewer, and never more than the maximum.
pub(crate) const DEFAULT_PAGE_SIZE: u32 = 50;
pub(crate) const MAX_PAGE_SIZE: u32 = 500;

/// What every clone of the engine shares: caches and the delivery runtime.
pub(crate) struct Shared {
    /// Strategy versions by (business type, version); a stored version never changes.
    strategies: RwLock<HashMap<(String, u64), Arc<Strategy>>>,
    /// The latest version of each business type that StartSaga has looked up. Only ledger
    /// writes fill it (StartSaga) or drop an entry (PutStrategy, in the write that stores a new
    /// version), and they run one at a time, so it never answers with an older version than the
    /// ledger holds. Only stored business types get an entry.
    latest_strategies: RwLock<HashMap<String, u64>>,
    /// The retry configuration in force, read once instead of on every transition. Only ledger
    /// writes fill or clear it (they run one at a time), and the write that stores a new version
    /// clears it, so a later write never decides by an old version.
    retry_config: RwLock<Option<Arc<crate::domain::retry::Config>>>,
    delivery: delivery::Delivery,
    watchers: watch::Watchers,
    retention_cursor: retention::Cursor,
    retention_reported: retention::Reported,
    metrics: metrics::Metrics,
    soft_timers: timers::SoftTimers,
}

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The idempotency record under `key`, as the domain sees it.
pub(crate) fn stored_record(
    tx: &WriteTx<'_>,
    key: &IdempotencyKey,
) -> Result<Option<idempotency::Record>, store::Error> {
    tx.idempotency(key)?
        .map(convert::idempotency_from_record)
        .transpose()
}

/// The record of one of sagad's own requests, finished with `response` (its encoded answer).
pub(crate) fn answered_with(
    registered: idempotency::Record,
    response: Vec<u8>,
    terms: Terms,
    now: Millis,
) -> idempotency::Record {
    idempotency::finished(
        registered,
        Answer {
            result: "OK".to_owned(),
            response,
            content_type: String::new(),
        },
        terms,
        now,
    )
}

/// The record of a scanned entry, or `None` (logged) for one that does not decode.
fn decoded<T>(entry: Result<T, store::Undecodable>) -> Option<T> {
    match entry {
        Ok(record) => Some(record),
        Err(undecodable) => {
            tracing::warn!(
                table = undecodable.table(),
                key = %undecodable.key_hex(),
                error = %undecodable.error(),
                "a record does not decode; it is passed over"
            );
            None
        }
    }
}

fn scope_text(scope: &str, field: &str) -> Result<(), Error> {
    RequestId::parse(scope)
        .map(|_| ())
        .map_err(|e| Error::invalid(field, e.to_string()))
}

impl Engine {
    pub fn new(
        store: Store,
        clock: SharedClock,
        random: SharedRandom,
        settings: Settings,
    ) -> Engine {
        let shared = Arc::new(Shared {
            strategies: RwLock::new(HashMap::new()),
            latest_strategies: RwLock::new(HashMap::new()),
            retry_config: RwLock::new(None),
            delivery: delivery::Delivery::new(
                settings.participant_timeout,
                settings.resend_after,
                settings.redelivery_base,
                settings.redelivery_cap,
            ),
            watchers: watch::Watchers::default(),
            retention_cursor: retention::Cursor::default(),
            retention_reported: retention::Reported::default(),
            metrics: metrics::Metrics::default(),
            soft_timers: timers::SoftTimers::default(),
        });
        Engine {
            store,
            clock,
            random,
            settings,
            shared,
        }
    }

    /// Recovery and the background work: loads node endpoints, re-sends every command still in
    /// the outbox (nothing acknowledged is forgotten across a restart), and starts the timer
    /// loop. Returns once recovery is queued; `stop` ends the background work.
    pub async fn start(&self) -> Result<(), Error> {
        // A record that does not decode is logged and passed over rather than refusing to
        // start: every other saga would stop with it.
        let (stamp, nodes) = self
            .store
            .read(|tx| (tx.stamp(), tx.scan_nodes().collect::<Result<Vec<_>, _>>()))
            .await?;
        for node in nodes?.into_iter().filter_map(decoded) {
            self.shared
                .delivery
                .set_endpoint(&node.node_id, &node.endpoint, stamp);
        }
        // An outbox entry that does not decode is kept, like one whose command does not: it
        // is read only here, and it is the one trace of the command for an operator.
        let outbox = self
            .store
            .read(|tx| tx.scan_outbox().collect::<Result<Vec<_>, _>>())
            .await??;
        let outbox: Vec<_> = outbox.into_iter().filter_map(decoded).collect();
        let resumed = outbox.len();
        let mut resumable = Vec::with_capacity(resumed);
        let mut unanswered = Vec::new();
        for (id, record) in outbox {
            match commands::decode_command(&record.command) {
                Ok(command) => {
                    if command.kind == commands::Kind::Execute {
                        unanswered.push((record.gsn_sequence, record.created_ms, command.clone()));
                    }
                    resumable.push((id, command));
                }
                Err(e) => {
                    tracing::error!(outbox_id = id, error = %e, "an outbox entry does not decode; it is kept for an operator")
                }
            }
        }
        // Before the commands go out, so an answer always finds its step's timeout to drop.
        timers::rearm_step_timeouts(self, unanswered).await?;
        for (id, command) in resumable {
            self.shared.delivery.spawn(self.clone(), id, command, None);
        }
        if resumed > 0 {
            tracing::info!(
                commands = resumed,
                "resuming delivery of commands from the outbox"
            );
        }
        tokio::spawn(timers::run(self.clone(), self.shared.delivery.stopping()));
        Ok(())
    }

    /// Stops delivery and timers; what they had not finished stays in the ledger.
    pub fn stop(&self) {
        self.shared.delivery.stop();
    }

    /// Payloads and stored responses are bounded by the configured maximum.
    pub(crate) fn check_size(&self, field: &str, len: usize) -> Result<(), Error> {
        let max = self.settings.limits.max_payload_bytes;
        if len > max {
            return Err(Error::invalid(
                field,
                format!("is {len} bytes; at most {max} are allowed"),
            ));
        }
        Ok(())
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.shared.metrics
    }

    /// Every counter by name, for export: the engine's, then the ledger's.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut counters = self.shared.metrics.snapshot();
        counters.push(("ledger_flushes", self.store.flush_count()));
        counters
    }

    /// Commands being delivered right now: (outbox id, node, attempts so far, last error).
    pub fn deliveries_in_flight(&self) -> Vec<delivery::InFlight> {
        self.shared.delivery.in_flight()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Runs `work` — a ledger write and what must follow it once it is durable (handing its
    /// commands to delivery, arming its step timeouts, publishing it to watchers, routing a
    /// node) — on a task of its own, and awaits it. A caller's future may be dropped at any
    /// await (hyper drops a handler when its client resets the stream, tonic when grpc-timeout
    /// runs out), while a write it queued still runs; and nothing looks at the outbox again
    /// until the next start. Run here, a write's follow-up cannot be lost with its caller.
    pub(crate) async fn commit<T, W>(&self, work: W) -> Result<T, Error>
    where
        W: Future<Output = Result<T, Error>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(work).await.map_err(|e| {
            let detail = format!("the task of a ledger write and its follow-up failed: {e}");
            Error::Store(if e.is_panic() {
                store::Error::Panicked(detail)
            } else {
                store::Error::Storage(detail)
            })
        })?
    }

    fn terms(&self, processing_lease_ms: Option<Millis>) -> Terms {
        Terms {
            retention_ms: millis(self.settings.idempotency_retention),
            processing_lease_ms,
        }
    }

    /// Runs `op` as one ledger write guarded by the idempotency table: a repeat of
    /// `(method, request_id)` with the same `fingerprint` gets the stored response, another
    /// body is `RequestIdReused`. `op` returns the response bytes to store; if it fails,
    /// nothing is written and nothing is remembered, so the caller may fix and retry.
    pub(crate) async fn idempotent_write<F>(
        &self,
        method: &'static str,
        request_id: &RequestId,
        fingerprint: Vec<u8>,
        op: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&mut WriteTx<'_>, Millis) -> Result<Vec<u8>, Error> + Send + 'static,
    {
        let (answered, _) = self
            .idempotent_write_with(method, request_id, fingerprint, move |tx, now| {
                op(tx, now).map(|r| (r, ()))
            })
            .await?;
        Ok(answered)
    }

    /// As `idempotent_write`, with a side result `X` for the caller (not stored; `None` on a
    /// replay, when `op` did not run). The future owns what it needs, so a caller with a
    /// follow-up can hand it to `commit`; nothing is queued until it is first polled.
    pub(crate) fn idempotent_write_with<F, X>(
        &self,
        method: &'static str,
        request_id: &RequestId,
        fingerprint: Vec<u8>,
        op: F,
    ) -> impl Future<Output = Result<(Answered, Option<X>), Error>> + Send + 'static
    where
        F: FnOnce(&mut WriteTx<'_>, Millis) -> Result<(Vec<u8>, X), Error> + Send + 'static,
        X: Send + 'static,
    {
        let key = IdempotencyKey {
            namespace: IdempotencyNamespace::Coordinator,
            scope: method.to_owned(),
            key: request_id.as_str().to_owned(),
        };
        let terms = self.terms(None);
        let now = self.clock.now_ms();
        let store = self.store.clone();
        async move {
            store
                .write(move |tx| {
                    let existing = stored_record(tx, &key)?;
                    let registered =
                        match idempotency::on_lookup(existing.as_ref(), &fingerprint, terms, now) {
                            Lookup::Register(registered) => registered,
                            Lookup::Replay(done) => {
                                let answered = Answered {
                                    response: done.response,
                                    replayed: true,
                                };
                                return Ok((answered, None));
                            }
                            Lookup::InProgress(_) => {
                                return Err(Error::InProgress {
                                    request_id: key.key,
                                });
                            }
                            Lookup::Mismatch => {
                                return Err(Error::RequestIdReused {
                                    request_id: key.key,
                                });
                            }
                        };
                    let (response, extra) = op(tx, now)?;
                    let done = answered_with(registered, response.clone(), terms, now);
                    tx.put_idempotency(&key, &convert::idempotency_to_record(&done))?;
                    let answered = Answered {
                        response,
                        replayed: false,
                    };
                    Ok((answered, Some(extra)))
                })
                .await?
        }
    }

    fn participant_key(scope: &str, request_id: &str) -> Result<IdempotencyKey, Error> {
        scope_text(scope, "scope")?;
        RequestId::parse(request_id).map_err(|e| Error::invalid("request_id", e.to_string()))?;
        Ok(IdempotencyKey {
            namespace: IdempotencyNamespace::Participant,
            scope: scope.to_owned(),
            key: request_id.to_owned(),
        })
    }

    /// S3 for participants: register the transaction, or say what the table knows of it.
    pub async fn begin(
        &self,
        scope: &str,
        request_id: &str,
        fingerprint: Vec<u8>,
        processing_lease: Option<Duration>,
    ) -> Result<Begun, Error> {
        let key = Self::participant_key(scope, request_id)?;
        if BranchKeys::is_barrier_scope(scope) {
            return Err(Error::invalid(
                "scope",
                format!(
                    "{scope:?} is a branch barrier scope (it starts with \"guard/\"): register a \
                     guarded action with Idempotency.Guard, which also checks its reversal; \
                     Finish and Get take this scope, Begin does not"
                ),
            ));
        }
        if fingerprint.len() > Limits::MAX_FINGERPRINT_BYTES {
            return Err(Error::invalid(
                "fingerprint",
                format!(
                    "is {} bytes; at most {} are allowed: send a digest of the request body \
                     (e.g. its SHA-256), not the body",
                    fingerprint.len(),
                    Limits::MAX_FINGERPRINT_BYTES
                ),
            ));
        }
        if processing_lease.is_some_and(|lease| lease.is_zero()) {
            return Err(Error::invalid(
                "processing_timeout",
                "must be longer than zero, or unset",
            ));
        }
        // Rounded up: a lease under 1 ms truncated to 0 would have expired at once, and every
        // concurrent Begin would take the transaction over and run it again.
        let terms = self.terms(processing_lease.map(crate::domain::millis_rounded_up));
        let now = self.clock.now_ms();
        self.store
            .write(move |tx| {
                let existing = stored_record(tx, &key)?;
                match idempotency::on_lookup(existing.as_ref(), &fingerprint, terms, now) {
                    Lookup::Register(record) => {
                        tx.put_idempotency(&key, &convert::idempotency_to_record(&record))?;
                        Ok(Begun::New(record))
                    }
                    Lookup::InProgress(record) => Ok(Begun::InProgress(record)),
                    Lookup::Replay(record) => Ok(Begun::Done(record)),
                    Lookup::Mismatch => Err(Error::RequestIdReused {
                        request_id: key.key,
                    }),
                }
            })
            .await?
    }

    pub async fn finish(
        &self,
        scope: &str,
        request_id: &str,
        answer: Answer,
    ) -> Result<idempotency::Record, Error> {
        let key = Self::participant_key(scope, request_id)?;
        if answer.result.is_empty() || answer.result.chars().count() > 64 {
            return Err(Error::invalid(
                "result",
                "is required, at most 64 characters (e.g. SUCCEEDED or FAILED)",
            ));
        }
        self.check_size("response", answer.response.len())?;
        if let Some(violation) = too_long(
            "content_type",
            &answer.content_type,
            Limits::MAX_CONTENT_TYPE,
        ) {
            return Err(Error::Invalid(vec![violation]));
        }
        let terms = self.terms(None);
        let now = self.clock.now_ms();
        self.store
            .write(move |tx| {
                let existing = stored_record(tx, &key)?;
                match idempotency::on_finish(existing.as_ref(), answer, terms, now) {
                    idempotency::Finish::Store(record) => {
                        tx.put_idempotency(&key, &convert::idempotency_to_record(&record))?;
                        Ok(record)
                    }
                    idempotency::Finish::AlreadyDone(record) => Ok(record),
                    idempotency::Finish::NotBegun => Err(Error::NotFound(format!(
                        "nothing is registered under scope {:?} and request_id {:?}: call Begin first \
                         (or the record expired)",
                        key.scope, key.key
                    ))),
                    idempotency::Finish::Conflict(_) => Err(Error::FailedPrecondition(format!(
                        "request_id {:?} in scope {:?} is already finished with another result or \
                         response; a finished transaction's answer never changes",
                        key.key, key.scope
                    ))),
                }
            })
            .await?
    }

    pub async fn get_record(
        &self,
        scope: &str,
        request_id: &str,
    ) -> Result<idempotency::Record, Error> {
        let key = Self::participant_key(scope, request_id)?;
        let shown = key.clone();
        let found = self
            .store
            .read(move |tx| tx.idempotency(&key))
            .await??
            .map(convert::idempotency_from_record)
            .transpose()?;
        found.ok_or_else(|| {
            Error::NotFound(format!(
                "nothing is registered under scope {:?} and request_id {:?} (never begun, or expired)",
                shown.scope, shown.key
            ))
        })
    }

    /// Deletes expired idempotency records, looking at most `limit`. A barrier record of a
    /// saga that may still reverse is kept instead: a forward record gone would make its
    /// reversal look like a null compensation (and a running forward's record gone would let
    /// it run twice). That is every saga this sagad still holds but a REVERSED one: a
    /// COMPLETED saga is reversed after all when a node undoes one of its steps and an
    /// operator reprocesses it, however long after. A saga still under way holds its records
    /// for another idempotency retention; a COMPLETED one, which only saga retention removes,
    /// until a retention after its removal is due, so its records are not rewritten every
    /// idempotency retention for as long as it is kept.
    pub async fn collect_expired(&self, limit: usize) -> Result<store::Collected, Error> {
        let now = self.clock.now_ms();
        let idempotency_retention = millis(self.settings.idempotency_retention);
        let saga_retention = millis(self.settings.saga_retention);
        let coordinator = self.settings.coordinator_id.clone();
        let hold_while_saga_may_reverse = move |tx: &WriteTx<'_>, key: &IdempotencyKey| {
            let gsn = match key.namespace {
                IdempotencyNamespace::Participant => BranchKeys::gsn_of_scope(&key.scope)
                    .and_then(|gsn| Gsn::parse(gsn).ok())
                    .filter(|gsn| gsn.coordinator() == &coordinator),
                IdempotencyNamespace::Coordinator => None,
            };
            let Some(gsn) = gsn else {
                return Ok(None);
            };
            let another_retention = now.saturating_add(idempotency_retention);
            // A saga record this build cannot read is kept too: better a record kept a while
            // longer than a reversal misjudged.
            let record = match tx.saga(gsn.sequence()) {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(None),
                Err(store::Error::Corrupt { .. } | store::Error::UnknownVersion { .. }) => {
                    return Ok(Some(another_retention));
                }
                Err(other) => return Err(other),
            };
            Ok(match convert::saga_state_from_code(record.state) {
                Some(SagaState::Reversed) => None,
                Some(SagaState::Completed) if saga_retention > 0 => Some(
                    record
                        .updated_ms
                        .saturating_add(saga_retention)
                        .max(now)
                        .saturating_add(idempotency_retention),
                ),
                _ => Some(another_retention),
            })
        };
        Ok(self
            .store
            .write(move |tx| {
                tx.collect_expired_idempotency(now, limit, &hold_while_saga_may_reverse)
            })
            .await??)
    }
}
