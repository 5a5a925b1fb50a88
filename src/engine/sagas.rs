//! Sagas in the engine: starting them, reading them, and running every event of an
//! orchestrated saga (a report, a node's answer, a timer) as one ledger write that loads the
//! saga, applies the domain transition, and stores the new state together with the commands
//! (outbox) and timers (due index) it causes. Commands are handed to delivery only after the
//! write is durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::domain::Millis;
use crate::domain::branch::{Report, Signal};
use crate::domain::ids::{Gsn, RequestId};
use crate::domain::orchestration::{self, Context, Effect, Env, Refusal, Timer, Transition};
use crate::domain::outcalls;
use crate::domain::retry::Config as RetryConfig;
use crate::domain::saga::{self, Saga, SagaMode, SagaState, StartRequest};
use crate::domain::strategy::Strategy;
use crate::engine::commands::{self, Command, Kind};
use crate::engine::metrics::Metrics;
use crate::engine::{
    Answered, DEFAULT_PAGE_SIZE, Engine, Error, ListQuery, MAX_PAGE_SIZE, Page, PageToken, Shared,
    convert, retries, strategies,
};
use crate::store::{self, DueRecord, OutboxRecord, PayloadRecord, WriteTx};

/// A filtered listing stops after examining this many sagas and hands back a token, so one
/// call never scans the whole ledger.
const MAX_EXAMINED_PER_PAGE: usize = 10_000;

/// A listing page stops once the sagas it holds would take about this many bytes to send, and
/// hands back a token. Counting sagas alone, 50 with 100 KiB payloads passed the 4 MiB a gRPC
/// client receives by default, and 500 with 1 MiB payloads built 500 MiB in one read job,
/// holding the reader lock the writer needs meanwhile.
const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// About how many bytes `saga` takes in an answer (`full`: with payload, branches and reversal
/// serials): its texts plus a generous allowance for field tags, times and numbers. An
/// estimate for the page budget, not an encoding.
fn shown_bytes(saga: &Saga, full: bool) -> usize {
    const FIELDS: usize = 128;
    let labels: usize = saga.labels.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    let basics = FIELDS
        + saga.business_type.as_str().len()
        + saga.content_type.len()
        + saga.request_id.as_str().len()
        + saga.reason.len()
        + labels;
    if !full {
        return basics;
    }
    let serials: usize = saga.reversal_serials.iter().map(|s| s.len() + 4).sum();
    let branches: usize = saga
        .branches
        .iter()
        .map(|b| {
            let status = b.last_status.as_ref().map_or(0, |s| {
                s.name.len()
                    + s.parameters
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 8)
                        .sum::<usize>()
            });
            let timeline: usize = b.timeline.iter().map(|t| t.what.len() + 24).sum();
            FIELDS
                + b.branch_id.len()
                + b.node_id.len()
                + b.caller_node_id.len()
                + b.forward_action.len()
                + b.reversal_action.len()
                + b.error_code.len()
                + status
                + timeline
        })
        .sum();
    basics + saga.payload.len() + serials + branches
}

/// What one stored transition hands to the async side.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub saga: Option<Saga>,
    /// New outbox entries, to deliver once the write is durable.
    pub deliveries: Vec<NewCommand>,
    /// Set when the transition ended the saga, for the counters (see `ended`).
    pub ended: Option<SagaState>,
    /// The transition gave up on a node's silence past the poll budget.
    pub escalated: bool,
    pub polls: u64,
    pub reversals: u64,
    /// Step timeouts that ride with the Execute commands they time (see `timers::SoftTimers`):
    /// armed in memory once the write is durable, never stored on their own.
    pub soft_timers: Vec<(Millis, Timer)>,
    /// The write's place in the ledger's order (`WriteTx::stamp`), so a follow-up that runs
    /// after a later write's never takes watchers back to the older state.
    pub stamp: u64,
}

/// An outbox entry a write created, with the payload it carries (read in the same write, so
/// delivery needs no ledger read of its own).
#[derive(Debug)]
pub(crate) struct NewCommand {
    pub outbox_id: u64,
    pub command: Command,
    pub payload: Option<PayloadRecord>,
}

/// A report as ReportState carries it.
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub request_id: String,
    pub gsn: String,
    pub branch_id: String,
    pub reporter_node_id: String,
    pub report: Report,
    pub command_id: String,
}

fn not_found(gsn: &Gsn) -> Error {
    Error::NotFound(format!("no saga has GSN {gsn}"))
}

/// The saga stored under `gsn`, without its payload.
pub(crate) fn load_saga(tx: &WriteTx<'_>, gsn: &Gsn) -> Result<Saga, Error> {
    let record = tx.saga(gsn.sequence())?.ok_or_else(|| not_found(gsn))?;
    let saga = convert::saga_from_record(record, Vec::new())?;
    // A sequence issued under another coordinator id is another saga.
    if &saga.gsn != gsn {
        return Err(not_found(gsn));
    }
    Ok(saga)
}

impl Shared {
    /// The retry configuration in force, from the cache or the ledger. Call it only inside a
    /// ledger write, so the cache follows the ledger's order.
    pub(crate) fn retry_config(&self, tx: &WriteTx<'_>) -> Result<Arc<RetryConfig>, Error> {
        if let Some(cached) = self
            .retry_config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(cached.clone());
        }
        let loaded = Arc::new(retries::load_retry_config(tx)?);
        *self.retry_config.write().unwrap_or_else(|p| p.into_inner()) = Some(loaded.clone());
        Ok(loaded)
    }

    pub(crate) fn forget_retry_config(&self) {
        *self.retry_config.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Strategy versions never change once stored, so they are cached for good.
    pub(crate) fn strategy(
        &self,
        tx: &WriteTx<'_>,
        business_type: &str,
        version: u64,
    ) -> Result<Arc<Strategy>, Error> {
        let key = (business_type.to_owned(), version);
        if let Some(found) = self
            .strategies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(found.clone());
        }
        let loaded = strategies::load_strategy(tx, business_type, version)?.ok_or_else(|| {
            Error::NotFound(format!(
                "strategy version {version} of business type {business_type:?} is not stored"
            ))
        })?;
        let loaded = Arc::new(loaded);
        self.strategies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, loaded.clone());
        Ok(loaded)
    }

    /// The latest strategy of `business_type`, from the caches or the ledger; `None` if none is
    /// stored. Call it only inside a ledger write, so the caches follow the ledger's order.
    /// StartSaga used to read and decode the latest version from the ledger for every saga.
    pub(crate) fn latest_strategy(
        &self,
        tx: &WriteTx<'_>,
        business_type: &str,
    ) -> Result<Option<Arc<Strategy>>, Error> {
        let cached = self
            .latest_strategies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(business_type)
            .copied();
        if let Some(version) = cached {
            return self.strategy(tx, business_type, version).map(Some);
        }
        let Some(latest) = strategies::load_strategy(tx, business_type, 0)? else {
            return Ok(None);
        };
        let latest = Arc::new(latest);
        self.strategies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((business_type.to_owned(), latest.version), latest.clone());
        self.latest_strategies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(business_type.to_owned(), latest.version);
        Ok(Some(latest))
    }

    /// Called by the write that stores a new version of `business_type`'s strategy.
    pub(crate) fn forget_latest_strategy(&self, business_type: &str) {
        self.latest_strategies
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(business_type);
    }
}

/// The state and signal of a saga before a transition (`None` for one just started).
pub(crate) type Before = Option<(SagaState, Option<Signal>)>;

pub(crate) fn before(saga: &Saga) -> Before {
    Some((saga.state, saga.signal))
}

/// How a transition from `before` to `after` ended its saga, if it did, for the counters: it
/// reached COMPLETED, REVERSED or NEEDS_ATTENTION from another state, whether or not a node
/// was told (a saga without outcalls has none to tell). A REVERSED saga reopened because an
/// outcall took effect after all was counted when first reversed: its signal says so.
pub(crate) fn ended(before: Before, after: &Saga) -> Option<SagaState> {
    let (state, signal) = before.unwrap_or((SagaState::Running, None));
    if after.state == state {
        return None;
    }
    let reversed_before = matches!(
        signal,
        Some(Signal::ReversalSuccess | Signal::ReversalFailure)
    );
    match after.state {
        SagaState::Completed | SagaState::NeedsAttention => Some(after.state),
        SagaState::Reversed if !reversed_before => Some(after.state),
        SagaState::Reversed | SagaState::Running | SagaState::Reversing => None,
    }
}

/// Stores a transition from `before`: the saga, and its effects as outbox entries and due
/// timers.
pub(crate) fn store_transition(
    tx: &mut WriteTx<'_>,
    before: Before,
    transition: Transition,
    now: Millis,
) -> Result<Applied, Error> {
    let Transition { saga, effects } = transition;
    tx.put_saga(&convert::saga_to_record(&saga))?;
    let mut deliveries = Vec::new();
    let gsn = saga.gsn.to_string();
    let ended = ended(before, &saga);
    let polls = effects
        .iter()
        .filter(|e| matches!(e, Effect::QueryStatus { .. }))
        .count() as u64;
    let reversals = effects
        .iter()
        .filter(|e| matches!(e, Effect::Reverse { .. }))
        .count() as u64;
    // A step's timeout needs storing only once its command is answered (the domain arms a new
    // one then): until that, the command's outbox entry stands for it across a restart.
    let sent: Vec<(String, u32)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Execute { branch_id, attempt } => Some((branch_id.clone(), *attempt)),
            _ => None,
        })
        .collect();
    let mut soft_timers = Vec::new();
    for effect in effects {
        let (kind, branch_id, node_id, action, reason, signal, attempt) = match effect {
            Effect::WakeAt { at_ms, timer } => {
                if let Timer::StepTimeout { branch_id, attempt } = &timer
                    && sent.iter().any(|(b, a)| b == branch_id && a == attempt)
                {
                    soft_timers.push((at_ms, timer));
                    continue;
                }
                tx.schedule(
                    at_ms,
                    &DueRecord {
                        gsn_sequence: saga.gsn.sequence(),
                        timer: commands::encode_timer(&timer)?,
                    },
                )?;
                continue;
            }
            Effect::Execute { branch_id, attempt } => {
                let Some(b) = saga.branch(&branch_id) else {
                    continue;
                };
                (
                    Kind::Execute,
                    branch_id.clone(),
                    b.node_id.clone(),
                    b.forward_action.clone(),
                    String::new(),
                    0,
                    attempt,
                )
            }
            Effect::Reverse {
                branch_id,
                reason,
                attempt,
            } => {
                let Some(b) = saga.branch(&branch_id) else {
                    continue;
                };
                (
                    Kind::Reverse,
                    branch_id.clone(),
                    b.node_id.clone(),
                    b.reversal_action.clone(),
                    reason,
                    0,
                    attempt,
                )
            }
            Effect::QueryStatus { branch_id } => {
                let Some(b) = saga.branch(&branch_id) else {
                    continue;
                };
                (
                    Kind::QueryStatus,
                    branch_id.clone(),
                    b.node_id.clone(),
                    b.forward_action.clone(),
                    String::new(),
                    0,
                    0,
                )
            }
            Effect::Signal {
                node_id,
                signal,
                reason,
            } => (
                Kind::Signal,
                String::new(),
                node_id,
                String::new(),
                reason,
                convert::signal_code(Some(signal)),
                0,
            ),
        };
        let command = Command {
            kind,
            gsn: gsn.clone(),
            branch_id,
            node_id: node_id.clone(),
            action,
            reason,
            signal,
            business_type: saga.business_type.as_str().to_owned(),
            attempt,
        };
        let id = tx.push_outbox(&OutboxRecord {
            gsn_sequence: saga.gsn.sequence(),
            node_id,
            command: commands::encode_command(&command)?,
            created_ms: now,
            attempts: 0,
        })?;
        let payload = match kind {
            Kind::Execute | Kind::Reverse => Some(payload_in(tx, &saga, &command.branch_id)?),
            Kind::QueryStatus | Kind::Signal => None,
        };
        deliveries.push(NewCommand {
            outbox_id: id,
            command,
            payload,
        });
    }
    if saga.state.is_terminal() {
        // A timer of an ended saga would only come due to be dropped, at the cost of a ledger
        // write each; removing them here, in the write that ends it, costs no write at all.
        tx.cancel_saga_timers(saga.gsn.sequence())?;
    }
    Ok(Applied {
        saga: Some(saga),
        deliveries,
        ended,
        escalated: false,
        polls,
        reversals,
        soft_timers,
        stamp: tx.stamp(),
    })
}

pub(crate) fn outcall_refusal(refusal: outcalls::Refusal, gsn: &Gsn) -> Error {
    use outcalls::Refusal as R;
    match refusal {
        R::NotOutcallSaga => Error::FailedPrecondition(format!(
            "saga {gsn} is driven by its strategy; outcalls, CompleteSaga and RequestReversal belong to \
             sagas started with mode SAGA_MODE_REGISTERED_OUTCALLS"
        )),
        R::NotRunning { state } => Error::FailedPrecondition(format!(
            "saga {gsn} is {}; this is possible only while it is RUNNING",
            convert::saga_state_name(state)
        )),
        R::OrderTaken { order, branch_id } => Error::AlreadyExists(format!(
            "saga {gsn} already has an outcall with order {order} ({branch_id}); give each outcall its own order"
        )),
        R::UnknownBranch { branch_id } => {
            Error::NotFound(format!("saga {gsn} has no branch {branch_id:?}"))
        }
        R::NotAllSucceeded { branches } => Error::FailedPrecondition(format!(
            "saga {gsn} cannot complete: outcalls {} have not SUCCEEDED; report them, or request a reversal",
            branches.join(", ")
        )),
        R::Completed => Error::FailedPrecondition(format!(
            "saga {gsn} is COMPLETED and is not reversed; a business undo of a completed saga is a new saga"
        )),
        R::TooManyOutcalls { max } => Error::FailedPrecondition(format!(
            "saga {gsn} already has {max} outcalls, the most one saga may register; split the work \
             into several sagas"
        )),
        R::TooManySerials { max } => Error::FailedPrecondition(format!(
            "saga {gsn} already recorded {max} reversal serials, the most one saga keeps; repeat \
             an earlier request (same request_id, or a reversal_serial already given) for its answer"
        )),
    }
}

/// Whether background work that failed with `error` may succeed if tried again: a ledger fault
/// may pass (and after a fatal one sagad stops, to try again after its restart), while a
/// corrupt record, a refused answer or a panic (a bug) fails the same way every time.
pub(crate) fn is_passing(error: &Error) -> bool {
    matches!(
        error,
        Error::Store(
            store::Error::Io(_)
                | store::Error::Storage(_)
                | store::Error::Closed
                | store::Error::Fatal(_)
        )
    )
}

/// Background work must not retry forever on what can never succeed: a passing ledger fault is
/// passed on (the work is tried again); anything else is logged and the work dropped.
fn drop_unless_passing(error: Error, what: &str, id: u64) -> Result<(), Error> {
    if is_passing(&error) {
        return Err(error);
    }
    tracing::error!(id, %error, "{what}");
    Ok(())
}

/// `drop_unless_passing` for work that yields a value: a dropped one yields the default.
fn keep_going<T: Default>(result: Result<T, Error>, what: &str, id: u64) -> Result<T, Error> {
    result.or_else(|error| drop_unless_passing(error, what, id).map(|()| T::default()))
}

fn refusal(refusal: Refusal, gsn: &Gsn) -> Error {
    match refusal {
        Refusal::UnknownStep { branch_id } => Error::NotFound(format!(
            "saga {gsn} has no branch or strategy step {branch_id:?}"
        )),
        Refusal::NotTriggered { branch_id } => Error::FailedPrecondition(format!(
            "step {branch_id:?} of saga {gsn} has not been triggered yet; a step reports only after \
             sagad sent it its command"
        )),
    }
}

impl Engine {
    pub(crate) fn env<'a>(&self, retry: &'a RetryConfig, now: Millis) -> Env<'a> {
        Env {
            now,
            policy: self.settings.policy,
            retry,
            jitter: self.random.unit(),
        }
    }

    pub(crate) fn context<'a>(
        &self,
        strategy: &'a Strategy,
        retry: &'a RetryConfig,
        now: Millis,
    ) -> Context<'a> {
        Context {
            strategy,
            now,
            policy: self.settings.policy,
            retry,
            jitter: self.random.unit(),
        }
    }

    /// A command was answered (pushed and answered, or acknowledged on a stream): its delivery
    /// stops. It counts as delivered only if the write that applied the answer `removed` it
    /// from the outbox: a replayed request, or a second answer to a command (inline and by
    /// ReportState), delivers nothing new.
    pub(crate) fn command_done(&self, outbox_id: u64, removed: bool) {
        if removed {
            Metrics::bump(&self.shared.metrics.commands_delivered);
        }
        self.shared.delivery.acknowledged(outbox_id);
    }

    /// Hands what a durable write produced to delivery and to watchers, and counts it.
    pub(crate) fn after_commit(&self, applied: Applied) {
        let metrics = &self.shared.metrics;
        metrics
            .polls_sent
            .fetch_add(applied.polls, Ordering::Relaxed);
        metrics
            .reversals_started
            .fetch_add(applied.reversals, Ordering::Relaxed);
        if applied.escalated {
            Metrics::bump(&metrics.escalations);
        }
        match applied.ended {
            Some(SagaState::Completed) => Metrics::bump(&metrics.sagas_completed),
            Some(SagaState::Reversed) => Metrics::bump(&metrics.sagas_reversed),
            Some(SagaState::NeedsAttention) => Metrics::bump(&metrics.sagas_needing_attention),
            Some(SagaState::Running | SagaState::Reversing) | None => {}
        }
        // Armed before the commands go out, so a quick answer that ends the saga always finds
        // them to drop.
        if let Some(saga) = &applied.saga {
            let soft = &self.shared.soft_timers;
            let sequence = saga.gsn.sequence();
            // Step timeouts change nothing once the saga stops running.
            if saga.state != SagaState::Running {
                soft.forget_saga(sequence);
            }
            for (at_ms, timer) in applied.soft_timers {
                soft.arm(sequence, at_ms, timer);
            }
        }
        for new in applied.deliveries {
            self.shared
                .delivery
                .spawn(self.clone(), new.outbox_id, new.command, new.payload);
        }
        if let Some(saga) = applied.saga {
            self.shared.watchers.publish(saga, applied.stamp);
        }
    }

    /// Starts a saga (idempotent on its request id). `answer` builds the response from the new
    /// saga: its encoding is stored for replays, so every repeat gets exactly the first answer,
    /// and the response itself comes back beside it (`None` for a replay), so a first answer is
    /// not decoded again from its own bytes.
    pub async fn start_saga<F, R>(
        &self,
        request: StartRequest,
        fingerprint: Vec<u8>,
        answer: F,
    ) -> Result<(Answered, Option<R>), Error>
    where
        F: FnOnce(&Saga) -> (Vec<u8>, R) + Send + 'static,
        R: Send + 'static,
    {
        // Validated here, off the writer thread, but refused only for a request id not seen
        // before: a repeat gets the stored answer even once its deadline has passed (S3: the
        // first answer, always).
        let request_id = RequestId::parse(&request.request_id);
        let validated = saga::validate_start(request, self.settings.limits, self.clock.now_ms());
        let Ok(request_id) = request_id else {
            // Nothing to look up without a request id: report every problem at once.
            return Err(Error::Invalid(validated.err().unwrap_or_default()));
        };
        let coordinator = self.settings.coordinator_id.clone();
        let shared = self.shared.clone();
        let jitter = self.random.unit();
        let policy = self.settings.policy;
        let outcall_saga_timeout_ms = self.settings.outcall_saga_timeout_ms;
        let written = self
            .idempotent_write_with("StartSaga", &request_id, fingerprint, move |tx, now| {
                let start = validated.map_err(Error::Invalid)?;
                let strategy = match start.mode {
                    SagaMode::Orchestrated => {
                        let latest = shared
                            .latest_strategy(tx, start.business_type.as_str())?
                            .ok_or_else(|| {
                                Error::NotFound(format!(
                                    "no fulfillment strategy is stored for business type {:?}; store one \
                                     with Strategies.PutStrategy (or sagactl strategy put), or start the \
                                     saga with mode SAGA_MODE_REGISTERED_OUTCALLS",
                                    start.business_type.as_str()
                                ))
                            })?;
                        Some(latest)
                    }
                    SagaMode::RegisteredOutcalls => None,
                };
                let sequence = tx.allocate_gsn_sequence()?;
                let mut saga = saga::on_started(start, Gsn::new(coordinator, sequence), now);
                let default_timeout_ms = match &strategy {
                    Some(strategy) => strategy.saga_timeout_ms,
                    None => outcall_saga_timeout_ms,
                };
                if saga.deadline_ms.is_none() && default_timeout_ms > 0 {
                    saga.deadline_ms = Some(now.saturating_add(default_timeout_ms));
                }
                if !saga.payload.is_empty() {
                    tx.put_payload(
                        sequence,
                        "",
                        &PayloadRecord {
                            data: saga.payload.clone(),
                            content_type: saga.content_type.clone(),
                        },
                    )?;
                }
                let payload = std::mem::take(&mut saga.payload);
                let applied = match &strategy {
                    Some(strategy) => {
                        let retry = shared.retry_config(tx)?;
                        let ctx = Context {
                            strategy,
                            now,
                            policy,
                            retry: &retry,
                            jitter,
                        };
                        store_transition(tx, None, orchestration::on_started(saga, ctx), now)?
                    }
                    None => {
                        store_transition(tx, None, outcalls::on_outcall_saga_started(saga), now)?
                    }
                };
                let mut shown = applied.saga.clone().ok_or_else(|| Error::FailedPrecondition("no saga".into()))?;
                shown.payload = payload;
                let (encoded, response) = answer(&shown);
                Ok((encoded, (applied, response)))
            });
        let engine = self.clone();
        self.commit(async move {
            let (answered, started) = written.await?;
            // A replay has nothing to follow up: the first answer's task did.
            let response = started.map(|(applied, response)| {
                engine.after_commit(applied);
                response
            });
            Ok((answered, response))
        })
        .await
    }

    pub(crate) fn parse_gsn(&self, text: &str) -> Result<Gsn, Error> {
        Gsn::parse(text).map_err(|e| Error::invalid("gsn", e.to_string()))
    }

    pub async fn get_saga(&self, gsn_text: &str) -> Result<Saga, Error> {
        Ok(self.stamped_saga(gsn_text).await?.1)
    }

    /// The saga, with the stamp of the last write the read saw (`ReadTx::stamp`).
    pub(crate) async fn stamped_saga(&self, gsn_text: &str) -> Result<(u64, Saga), Error> {
        let gsn = self.parse_gsn(gsn_text)?;
        let sequence = gsn.sequence();
        let (stamp, record, payload) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let record = tx.saga(sequence)?;
                let payload = match record {
                    Some(_) => tx
                        .payload(sequence, "")?
                        .map(|p| p.data)
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                Ok((tx.stamp(), record, payload))
            })
            .await??;
        let found = record
            .map(|r| convert::saga_from_record(r, payload))
            .transpose()?;
        match found {
            // A sequence issued under another coordinator id is another saga.
            Some(saga) if saga.gsn == gsn => Ok((stamp, saga)),
            _ => Err(not_found(&gsn)),
        }
    }

    pub async fn list_sagas(&self, query: ListQuery) -> Result<Page, Error> {
        let page_size = match query.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("is {n}; at most {MAX_PAGE_SIZE} are allowed"),
                ));
            }
            n => n,
        } as usize;
        let after = if query.page_token.is_empty() {
            None
        } else {
            let token = PageToken::decode(&query.page_token).ok_or_else(|| {
                Error::invalid(
                    "page_token",
                    "is not a token this sagad issued; pass next_page_token from the previous page unchanged",
                )
            })?;
            if token.newest_first != query.newest_first {
                return Err(Error::invalid(
                    "page_token",
                    "was issued for the other order; keep newest_first the same across pages",
                ));
            }
            Some(token.after)
        };
        let ListQuery {
            states,
            business_type,
            newest_first,
            with_payloads,
            ..
        } = query;
        let (sagas, unreadable_sequences, last_examined, exhausted) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut matched = Vec::new();
                let mut unreadable = Vec::new();
                let mut last_examined = None;
                let mut examined = 0usize;
                let mut bytes = 0usize;
                let mut exhausted = true;
                for record in tx.scan_sagas(after, newest_first) {
                    examined += 1;
                    // One saga this build cannot read must not hide every saga after it.
                    let record = match record? {
                        Ok(record) => record,
                        Err(undecodable) => {
                            tracing::warn!(
                                key = %undecodable.key_hex(),
                                error = %undecodable.error(),
                                "a saga does not decode; the listing passes over it"
                            );
                            if let Some(sequence) = undecodable.key_u64() {
                                unreadable.push(sequence);
                                last_examined = Some(sequence);
                            }
                            if examined >= MAX_EXAMINED_PER_PAGE {
                                exhausted = false;
                                break;
                            }
                            continue;
                        }
                    };
                    // Where the next page starts should this saga not fit on this one.
                    let before = last_examined;
                    last_examined = Some(record.sequence);
                    let state_matches = states.is_empty()
                        || convert::saga_state_from_code(record.state)
                            .is_some_and(|s| states.contains(&s));
                    let type_matches =
                        business_type.is_empty() || record.business_type == business_type;
                    if state_matches && type_matches {
                        let sequence = record.sequence;
                        // A payload that does not decode makes its saga unreadable, as GetSaga
                        // finds it, rather than failing the whole page.
                        let payload = if with_payloads {
                            match tx.payload(sequence, "") {
                                Ok(payload) => Ok(payload.map(|p| p.data).unwrap_or_default()),
                                Err(
                                    error @ (store::Error::Corrupt { .. }
                                    | store::Error::UnknownVersion { .. }),
                                ) => Err(error),
                                Err(other) => return Err(other),
                            }
                        } else {
                            Ok(Vec::new())
                        };
                        match payload.and_then(|payload| convert::saga_from_record(record, payload))
                        {
                            Ok(saga) => {
                                let size = shown_bytes(&saga, with_payloads);
                                // Taken whole or left for the next page: a page of 2 MiB less
                                // a little plus one 3 MiB payload passed the 4 MiB a client
                                // receives, while a saga alone on its page fits.
                                if !matched.is_empty() && bytes.saturating_add(size) > PAGE_BYTES {
                                    last_examined = before;
                                    exhausted = false;
                                    break;
                                }
                                bytes = bytes.saturating_add(size);
                                matched.push(saga);
                            }
                            Err(error) => {
                                tracing::warn!(
                                    sequence,
                                    %error,
                                    "a saga does not decode; the listing passes over it"
                                );
                                unreadable.push(sequence);
                            }
                        }
                    }
                    // A page holds at least one saga, even one larger than the budget alone.
                    if matched.len() == page_size
                        || bytes >= PAGE_BYTES
                        || examined >= MAX_EXAMINED_PER_PAGE
                    {
                        exhausted = false;
                        break;
                    }
                }
                Ok((matched, unreadable, last_examined, exhausted))
            })
            .await??;
        let next_page_token = match (exhausted, last_examined) {
            (false, Some(after)) => PageToken {
                after,
                newest_first,
            }
            .encode(),
            _ => String::new(),
        };
        Ok(Page {
            sagas,
            next_page_token,
            unreadable_sequences,
        })
    }

    /// ReportState: a node (or an outcall's caller) reports a branch. When it answers a
    /// command from its Subscribe stream, `command_id` names it: the command is then done, and
    /// the report is read as that command's answer (a reversal's, a poll's or an execution's).
    pub async fn report_state<F>(
        &self,
        input: ReportInput,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Saga, &str) -> Vec<u8> + Send + 'static,
    {
        let request_id = RequestId::parse(&input.request_id)
            .map_err(|e| Error::invalid("request_id", e.to_string()))?;
        let gsn = self.parse_gsn(&input.gsn)?;
        if input.branch_id.is_empty() {
            return Err(Error::invalid("branch_id", "is required"));
        }
        if input.reporter_node_id.is_empty() {
            return Err(Error::invalid("reporter_node_id", "is required"));
        }
        let violations = input.report.violations();
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        let answering = if input.command_id.is_empty() {
            None
        } else {
            Some(parse_command_id(&input.command_id, &gsn)?)
        };
        if answering.is_some_and(|a| a.kind == Kind::Signal) {
            return Err(Error::FailedPrecondition(format!(
                "command {} is a Signal, which needs no report: acknowledge it with Ack; \
                 ReportState answers Execute, Reverse and QueryStatus",
                input.command_id
            )));
        }
        let engine = self.clone();
        let written =
            self.idempotent_write_with("ReportState", &request_id, fingerprint, move |tx, now| {
                let saga = load_saga(tx, &gsn)?;
                let Some(branch) = saga.branch(&input.branch_id) else {
                    let strategy = engine.strategy_of(tx, &saga)?;
                    let refused = match strategy.as_deref().and_then(|s| s.step(&input.branch_id)) {
                        Some(_) => Refusal::NotTriggered {
                            branch_id: input.branch_id,
                        },
                        None => Refusal::UnknownStep {
                            branch_id: input.branch_id,
                        },
                    };
                    return Err(refusal(refused, &gsn));
                };
                if branch.node_id != input.reporter_node_id
                    && branch.caller_node_id != input.reporter_node_id
                {
                    // An outcall's caller may report it too: a refusal naming the callee
                    // alone would send the reporter looking for the wrong node.
                    let allowed = if branch.caller_node_id.is_empty() {
                        format!("it belongs to node {:?}", branch.node_id)
                    } else {
                        format!(
                            "only its node {:?} or the outcall's caller {:?} can",
                            branch.node_id, branch.caller_node_id
                        )
                    };
                    return Err(Error::FailedPrecondition(format!(
                        "node {:?} cannot report branch {:?} of saga {gsn}: {allowed}",
                        input.reporter_node_id, input.branch_id
                    )));
                }
                // Whether this write took the answered command out of the outbox.
                let mut removed = false;
                if let Some(answering) = answering {
                    // The command answered must be this branch's: an id of another branch's
                    // command would take that command out of the outbox (its delivery would
                    // stop with nothing recorded) and attribute the wrong send here. One that
                    // is gone was answered already; the report is then judged as late.
                    if let Some(entry) = tx.outbox_entry(answering.outbox_id)? {
                        // An entry that does not decode can never be sent again, so nothing is
                        // lost by letting the report take it out.
                        let stored = commands::decode_command(&entry.command).ok();
                        let about = stored
                            .as_ref()
                            .map_or(input.branch_id.as_str(), |c| c.branch_id.as_str());
                        if entry.gsn_sequence != gsn.sequence() || about != input.branch_id {
                            return Err(Error::FailedPrecondition(format!(
                                "command_id {:?} is not a command about branch {:?} of saga {gsn}: \
                                 give the command_id of the Execute, Reverse or QueryStatus this \
                                 report answers",
                                input.command_id, input.branch_id
                            )));
                        }
                        // The kind and send in the id decide how the report is read (a
                        // reversal's answer, a poll's, which send failed), so an id edited on
                        // its way back must not take the entry out: a Reverse read as a poll
                        // would leave the saga REVERSING with nothing left to resend it.
                        if let Some(stored) = stored
                            .filter(|c| c.kind != answering.kind || c.send() != answering.attempt)
                        {
                            return Err(Error::FailedPrecondition(format!(
                                "command_id {:?} does not match the command sagad sent under that \
                                 number, {:?}: report with the command_id exactly as received",
                                input.command_id,
                                command_id_of(&stored, answering.outbox_id)
                            )));
                        }
                        removed = tx.delete_outbox(answering.outbox_id)?;
                    }
                }
                let kind = answering.map(|a| a.kind).unwrap_or(Kind::Execute);
                let mut report = input.report;
                report.attempt = answering.and_then(|a| a.attempt);
                let applied = engine.apply_answer(tx, saga, &input.branch_id, kind, report, now)?;
                let saga = applied.saga.clone().ok_or_else(|| not_found(&gsn))?;
                Ok((encode(&saga, &input.branch_id), (applied, removed)))
            });
        let engine = self.clone();
        self.commit(async move {
            let (answered, applied) = written.await?;
            if let Some(answering) = answering {
                let removed = applied.as_ref().is_some_and(|(_, removed)| *removed);
                engine.command_done(answering.outbox_id, removed);
            }
            if let Some((applied, _)) = applied {
                engine.after_commit(applied);
            }
            Ok(answered)
        })
        .await
    }

    /// The strategy an orchestrated saga runs with; `None` for registered-outcall sagas.
    pub(crate) fn strategy_of(
        &self,
        tx: &WriteTx<'_>,
        saga: &Saga,
    ) -> Result<Option<Arc<Strategy>>, Error> {
        match saga.mode {
            SagaMode::Orchestrated => self
                .shared
                .strategy(tx, saga.business_type.as_str(), saga.strategy_version)
                .map(Some),
            SagaMode::RegisteredOutcalls => Ok(None),
        }
    }

    /// Applies a node's answer to a command of `kind` about `branch_id`.
    pub(crate) fn apply_answer(
        &self,
        tx: &mut WriteTx<'_>,
        saga: Saga,
        branch_id: &str,
        kind: Kind,
        report: Report,
        now: Millis,
    ) -> Result<Applied, Error> {
        let gsn = saga.gsn.clone();
        let from = before(&saga);
        if kind == Kind::QueryStatus {
            Metrics::bump(&self.shared.metrics.poll_answers);
        }
        let retry = self.shared.retry_config(tx)?;
        let Some(strategy) = self.strategy_of(tx, &saga)? else {
            let env = self.env(&retry, now);
            let transition = match kind {
                Kind::Execute | Kind::QueryStatus => outcalls::on_outcall_reported(
                    saga,
                    branch_id,
                    report,
                    kind == Kind::QueryStatus,
                    env,
                )
                .map_err(|r| outcall_refusal(r, &gsn))?,
                Kind::Reverse => {
                    outcalls::on_outcall_reversal_answered(saga, branch_id, report, env)
                }
                Kind::Signal => return Ok(Applied::default()),
            };
            return store_transition(tx, from, transition, now);
        };
        let ctx = self.context(&strategy, &retry, now);
        let transition = match kind {
            Kind::Execute => orchestration::on_reported(saga, branch_id, report, ctx)
                .map_err(|r| refusal(r, &gsn))?,
            Kind::QueryStatus => orchestration::on_polled(saga, branch_id, report, ctx)
                .map_err(|r| refusal(r, &gsn))?,
            Kind::Reverse => orchestration::on_reversal_answered(saga, branch_id, report, ctx),
            Kind::Signal => return Ok(Applied::default()),
        };
        store_transition(tx, from, transition, now)
    }

    /// A stored timer came due: it is removed and its transition stored in the same write.
    pub(crate) async fn fire_timer(
        &self,
        key: store::DueKey,
        record: DueRecord,
    ) -> Result<(), Error> {
        let timer = commands::decode_timer(&record.timer);
        self.apply_timer(Some(key), record.gsn_sequence, key.at_ms, timer)
            .await
    }

    /// A step timeout kept in memory came due. Most belong to steps that answered long ago, so
    /// a read decides first, and only a timeout that still changes something costs a write.
    pub(crate) async fn fire_soft_timer(
        &self,
        gsn_sequence: u64,
        at_ms: Millis,
        timer: Timer,
    ) -> Result<(), Error> {
        let Timer::StepTimeout { branch_id, attempt } = timer.clone() else {
            return self.apply_timer(None, gsn_sequence, at_ms, Ok(timer)).await;
        };
        let live = self
            .store
            .read(move |tx| -> Result<bool, Error> {
                let Some(stored) = tx.saga(gsn_sequence)? else {
                    return Ok(false);
                };
                let saga = convert::saga_from_record(stored, Vec::new())?;
                Ok(orchestration::step_timeout_is_live(
                    &saga, &branch_id, attempt,
                ))
            })
            .await
            .map_err(Error::from)
            .and_then(|live| live);
        // Like a stored timer, one that cannot be read (a corrupt saga) is dropped, not tried
        // again every round; only a storage fault keeps it for the next.
        let live = keep_going(
            live,
            "a step timeout could not be applied; it is dropped",
            gsn_sequence,
        )?;
        if !live {
            return Ok(());
        }
        self.apply_timer(None, gsn_sequence, at_ms, Ok(timer)).await
    }

    /// Applies a timer that came due in one write, which also removes it from the due index
    /// when it is stored there (`key`). A timer that cannot be applied is dropped. It runs on
    /// the timer loop, which no caller can drop mid-write, so its follow-up needs no task of
    /// its own (`commit`).
    async fn apply_timer(
        &self,
        key: Option<store::DueKey>,
        gsn_sequence: u64,
        at_ms: Millis,
        timer: Result<Timer, store::Error>,
    ) -> Result<(), Error> {
        let engine = self.clone();
        let applied = self
            .store
            .write(move |tx| -> Result<Applied, Error> {
                if let Some(key) = key {
                    tx.cancel(key)?;
                }
                let timer = timer?;
                let Some(stored) = tx.saga(gsn_sequence)? else {
                    return Ok(Applied::default());
                };
                let saga = convert::saga_from_record(stored, Vec::new())?;
                if saga.state.is_terminal() {
                    return Ok(Applied::default());
                }
                let now = at_ms.max(engine.clock.now_ms());
                let retry = engine.shared.retry_config(tx)?;
                let from = before(&saga);
                let transition = match engine.strategy_of(tx, &saga)? {
                    Some(strategy) => {
                        let ctx = engine.context(&strategy, &retry, now);
                        orchestration::on_timer(saga, &timer, ctx)
                    }
                    None => outcalls::on_outcall_timer(saga, &timer, engine.env(&retry, now)),
                };
                Metrics::bump(&engine.shared.metrics.timers_fired);
                // A poll that stops a running saga gave up on the node's silence, in either
                // way of running a saga.
                let escalated = matches!(timer, Timer::Poll { .. })
                    && from.is_some_and(|(state, _)| state == SagaState::Running)
                    && transition.saga.state != SagaState::Running;
                let applied = store_transition(tx, from, transition, now)?;
                Ok(Applied {
                    escalated,
                    ..applied
                })
            })
            .await
            // A closure that panicked is judged like one that failed: dropped, not retried.
            .map_err(Error::from)
            .and_then(|applied| applied);
        match applied {
            Ok(applied) => self.after_commit(applied),
            // The failed write was taken back whole: kept, a transition stored in part (the
            // saga moved on, its commands not all in the outbox) would stop the saga for good.
            // The timer alone goes, in a write of its own.
            Err(error) => {
                drop_unless_passing(
                    error,
                    "a timer could not be applied; it is dropped",
                    gsn_sequence,
                )?;
                if let Some(key) = key {
                    self.store.write(move |tx| tx.cancel(key)).await??;
                }
            }
        }
        Ok(())
    }

    /// A pushed command was answered: the command is done, and the answer is applied, in one
    /// write. It runs on the command's delivery task, which no caller can drop mid-write, so
    /// its follow-up needs no task of its own (`commit`).
    /// Returns whether the write took the command out of the outbox (a ReportState may
    /// have answered it first).
    pub(crate) async fn command_answered(
        &self,
        outbox_id: u64,
        command: Command,
        report: Option<Report>,
    ) -> Result<bool, Error> {
        let Some(report) = report else {
            // An acknowledged signal changes nothing but the outbox. Losing this delete in a
            // crash only sends the signal again, which nodes de-duplicate by command id, so it
            // need not wait for (or cost) a flush of its own.
            let removed = self
                .store
                .write_unflushed(move |tx| tx.delete_outbox(outbox_id))
                .await??;
            return Ok(removed);
        };
        let mut report = report.clamped();
        let engine = self.clone();
        let applied = self
            .store
            .write(move |tx| -> Result<(Applied, bool), Error> {
                let removed = tx.delete_outbox(outbox_id)?;
                let gsn = Gsn::parse(&command.gsn).map_err(|e| store::Error::Corrupt {
                    table: "outbox",
                    detail: e.to_string(),
                })?;
                let saga = load_saga(tx, &gsn)?;
                let now = engine.clock.now_ms();
                report.attempt = command.send();
                let applied =
                    engine.apply_answer(tx, saga, &command.branch_id, command.kind, report, now)?;
                Ok((applied, removed))
            })
            .await
            .map_err(Error::from)
            .and_then(|applied| applied);
        match applied {
            Ok((applied, removed)) => {
                self.after_commit(applied);
                Ok(removed)
            }
            // As for a timer: nothing of the failed transition is kept, and the command alone
            // leaves the outbox, its answer dropped.
            Err(error) => {
                drop_unless_passing(
                    error,
                    "a node's answer could not be applied; it is dropped",
                    outbox_id,
                )?;
                Ok(self
                    .store
                    .write(move |tx| tx.delete_outbox(outbox_id))
                    .await??)
            }
        }
    }

    /// Ack: a node acknowledges a command from its Subscribe stream that needs no report.
    pub async fn ack(
        &self,
        request_id: &str,
        node_id: &str,
        command_id: &str,
        fingerprint: Vec<u8>,
    ) -> Result<Answered, Error> {
        let request_id = RequestId::parse(request_id)
            .map_err(|e| Error::invalid("request_id", e.to_string()))?;
        if node_id.is_empty() {
            return Err(Error::invalid("node_id", "is required"));
        }
        let (gsn_text, _) = command_id.rsplit_once(':').ok_or_else(|| {
            Error::invalid(
                "command_id",
                "is not a command id sagad issued (<gsn>:<kind><number>)",
            )
        })?;
        let gsn = self
            .parse_gsn(gsn_text)
            .map_err(|_| Error::invalid("command_id", "does not start with a GSN"))?;
        let command = parse_command_id(command_id, &gsn)?;
        let rpc = match command.kind {
            Kind::Signal => None,
            Kind::Execute => Some("Execute"),
            Kind::Reverse => Some("Reverse"),
            Kind::QueryStatus => Some("QueryStatus"),
        };
        // Acknowledging is for commands that need no answer. Taking an Execute, Reverse or
        // QueryStatus out of the outbox would stop its delivery and its step timeout with no
        // outcome recorded: the saga would wait for ever.
        if let Some(rpc) = rpc {
            return Err(Error::FailedPrecondition(format!(
                "command {command_id} is {rpc}, which needs an outcome: report it with \
                 ReportState (command_id {command_id}); Ack is only for Signal commands"
            )));
        }
        let outbox_id = command.outbox_id;
        let (node, command_id) = (node_id.to_owned(), command_id.to_owned());
        let acknowledging =
            self.idempotent_write_with("Ack", &request_id, fingerprint, move |tx, _| {
                let removed = match tx.outbox_entry(outbox_id)? {
                    // Already acknowledged (or its saga removed): done either way.
                    None => false,
                    Some(entry) if entry.gsn_sequence != gsn.sequence() => {
                        return Err(Error::invalid(
                            "command_id",
                            format!("{command_id:?} is not a command sagad issued"),
                        ));
                    }
                    Some(entry) if entry.node_id != node => {
                        return Err(Error::FailedPrecondition(format!(
                            "command {command_id} was sent to node {:?}, not {node:?}: only the \
                             node that received it acknowledges it",
                            entry.node_id
                        )));
                    }
                    // The id claims a Signal; the entry under its number must be one. A Reverse
                    // has no timer: its entry is all that sends it again, so taking it out on
                    // an edited id would leave the saga REVERSING for ever. (An entry that does
                    // not decode can never be sent, so nothing is lost by taking it out.)
                    Some(entry) => {
                        if let Ok(stored) = commands::decode_command(&entry.command)
                            && stored.kind != Kind::Signal
                        {
                            return Err(Error::FailedPrecondition(format!(
                                "command {command_id} is not what sagad sent under that number: \
                                 it sent {}, which needs an outcome; acknowledge a Signal with \
                                 its command_id exactly as received",
                                command_id_of(&stored, outbox_id)
                            )));
                        }
                        tx.delete_outbox(outbox_id)?
                    }
                };
                Ok((Vec::new(), removed))
            });
        let engine = self.clone();
        self.commit(async move {
            let (answered, removed) = acknowledging.await?;
            engine.command_done(outbox_id, removed.unwrap_or(false));
            Ok(answered)
        })
        .await
    }

    /// The payload sent with a command, read from the ledger (for commands resumed from the
    /// outbox; a new command gets it from the write that created it). `None` when the saga is
    /// no longer in the ledger: retention removed it, finished, with the command still out.
    pub(crate) async fn payload_of(
        &self,
        command: &Command,
    ) -> Result<Option<PayloadRecord>, Error> {
        let gsn = Gsn::parse(&command.gsn).map_err(|e| Error::invalid("gsn", e.to_string()))?;
        let sequence = gsn.sequence();
        let branch_id = command.branch_id.clone();
        Ok(self
            .store
            .read(move |tx| {
                // Only whether it is there: a record that does not decode still is, and a
                // restart resumes every waiting command through here.
                if !tx.has_saga(sequence)? {
                    return Ok(None);
                }
                command_payload(&branch_id, |of| tx.payload(sequence, of)).map(Some)
            })
            .await??)
    }

    /// Whether the command's saga is still in the ledger (retention removes finished ones).
    pub(crate) async fn saga_of_command_exists(&self, command: &Command) -> Result<bool, Error> {
        let gsn = Gsn::parse(&command.gsn).map_err(|e| Error::invalid("gsn", e.to_string()))?;
        let sequence = gsn.sequence();
        Ok(self.store.read(move |tx| tx.has_saga(sequence)).await??)
    }

    /// Takes out of the outbox a command whose saga retention removed: it would reach its node
    /// without the saga's payload, for a saga that ended long ago.
    pub(crate) async fn drop_command_of_removed_saga(&self, outbox_id: u64) -> Result<(), Error> {
        self.store
            .write(move |tx| tx.delete_outbox(outbox_id).map(|_| ()))
            .await??;
        self.shared.delivery.acknowledged(outbox_id);
        Ok(())
    }
}

/// The payload a write sends with the command it creates about `branch_id` (see
/// `command_payload`). Only outcalls register payloads of their own, so a command of an
/// orchestrated saga skips that lookup (it was a ledger read per command that always missed).
fn payload_in(tx: &WriteTx<'_>, saga: &Saga, branch_id: &str) -> Result<PayloadRecord, Error> {
    let sequence = saga.gsn.sequence();
    let own = match saga.mode {
        SagaMode::RegisteredOutcalls => branch_id,
        SagaMode::Orchestrated => "",
    };
    Ok(command_payload(own, |of| tx.payload(sequence, of))?)
}

/// The payload sent with a command about `branch_id`: an outcall's own payload if it
/// registered one, else the saga's (stored under branch id ""), else none. `payload` reads the
/// saga's payload stored under a branch id.
fn command_payload(
    branch_id: &str,
    payload: impl Fn(&str) -> Result<Option<PayloadRecord>, store::Error>,
) -> Result<PayloadRecord, store::Error> {
    if !branch_id.is_empty()
        && let Some(own) = payload(branch_id)?
    {
        return Ok(own);
    }
    Ok(payload("")?.unwrap_or_default())
}

/// Command ids are `<gsn>:<kind letter><outbox id>`, and for a send of an action
/// `.<attempt>` after it, stable across redeliveries because the outbox entry is, so a node
/// can de-duplicate by them. The kind tells how to read a report that answers the command, and
/// the attempt which send it answers, without a ledger lookup (the entry is gone once answered,
/// and a repeated answer must still be known as one).
pub(crate) fn command_id(gsn: &str, kind: Kind, outbox_id: u64, attempt: u32) -> String {
    let letter = match kind {
        Kind::Execute => 'e',
        Kind::Reverse => 'r',
        Kind::QueryStatus => 'q',
        Kind::Signal => 's',
    };
    if attempt == 0 {
        format!("{gsn}:{letter}{outbox_id}")
    } else {
        format!("{gsn}:{letter}{outbox_id}.{attempt}")
    }
}

/// The id sagad sends `command`, stored under `outbox_id`, with.
fn command_id_of(command: &Command, outbox_id: u64) -> String {
    command_id(&command.gsn, command.kind, outbox_id, command.attempt)
}

/// What a command id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CommandRef {
    pub outbox_id: u64,
    pub kind: Kind,
    /// The send of the action it carried; `None` in ids without one (older ids, and commands
    /// that are not sends of an action).
    pub attempt: Option<u32>,
}

fn parse_command_id(text: &str, gsn: &Gsn) -> Result<CommandRef, Error> {
    let bad = || {
        Error::invalid(
            "command_id",
            format!("{text:?} is not a command id sagad issued for saga {gsn}"),
        )
    };
    let (prefix, rest) = text.rsplit_once(':').ok_or_else(bad)?;
    if prefix != gsn.to_string() {
        return Err(bad());
    }
    let mut chars = rest.chars();
    let kind = match chars.next() {
        Some('e') => Kind::Execute,
        Some('r') => Kind::Reverse,
        Some('q') => Kind::QueryStatus,
        Some('s') => Kind::Signal,
        _ => return Err(bad()),
    };
    let (id, attempt) = match chars.as_str().split_once('.') {
        Some((id, attempt)) => (id, Some(attempt.parse::<u32>().map_err(|_| bad())?)),
        None => (chars.as_str(), None),
    };
    if attempt == Some(0) {
        return Err(bad());
    }
    let outbox_id = id.parse::<u64>().map_err(|_| bad())?;
    Ok(CommandRef {
        outbox_id,
        kind,
        attempt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ids::CoordinatorId;

    /// The barrier orders the commands a Guard names by the outbox number in their ids (a
    /// failed action runs again only for a later one), so every id issued must read back.
    #[test]
    fn every_command_id_issued_reads_back_as_its_outbox_number() {
        for kind in [
            Kind::Execute,
            Kind::Reverse,
            Kind::QueryStatus,
            Kind::Signal,
        ] {
            for (outbox_id, attempt) in [(1, 0), (41, 2), (u64::MAX, u32::MAX)] {
                let id = command_id("c1-0000000000000007", kind, outbox_id, attempt);
                assert_eq!(
                    crate::domain::ids::command_sequence(&id),
                    Some(outbox_id),
                    "{id}"
                );
            }
        }
    }

    #[test]
    fn background_work_drops_what_cannot_succeed_and_keeps_what_a_storage_fault_stopped() {
        let corrupt = Error::Store(store::Error::Corrupt {
            table: "sagas",
            detail: "cut short".into(),
        });
        // A step timeout kept in memory whose saga does not decode: dropped, not live.
        assert!(!keep_going::<bool>(Err(corrupt), "dropped", 1).unwrap());
        let fault = Error::Store(store::Error::Storage("disk full".into()));
        assert!(keep_going::<bool>(Err(fault), "kept", 1).is_err());
        assert!(keep_going::<bool>(Ok(true), "live", 1).unwrap());
    }

    #[test]
    fn background_work_whose_transition_panicked_is_dropped_not_retried() {
        let panicked = Error::Store(store::Error::Panicked("a ledger write job panicked".into()));
        assert!(!keep_going::<bool>(Err(panicked), "dropped", 1).unwrap());
        // After a fatal fault sagad stops; the work stays for the restart.
        let fatal = Error::Store(store::Error::Fatal("fdatasync failed".into()));
        assert!(keep_going::<bool>(Err(fatal), "kept", 1).is_err());
    }

    #[test]
    fn command_ids_carry_their_kind_and_round_trip() {
        let gsn = Gsn::new(CoordinatorId::parse("c1").unwrap(), 7);
        for kind in [
            Kind::Execute,
            Kind::Reverse,
            Kind::QueryStatus,
            Kind::Signal,
        ] {
            for attempt in [0, 1, 7, u32::MAX] {
                let id = command_id(&gsn.to_string(), kind, 42, attempt);
                assert_eq!(
                    parse_command_id(&id, &gsn).unwrap(),
                    CommandRef {
                        outbox_id: 42,
                        kind,
                        attempt: (attempt > 0).then_some(attempt),
                    }
                );
            }
        }
        let other = Gsn::new(CoordinatorId::parse("c1").unwrap(), 8);
        assert!(
            parse_command_id(&command_id(&gsn.to_string(), Kind::Execute, 1, 1), &other).is_err()
        );
        for bad in ["x1", "e", "e1.", "e1.0", "e1.x", "e.2", "e1.2.3", "e-1"] {
            assert!(
                parse_command_id(&format!("{gsn}:{bad}"), &gsn).is_err(),
                "{bad} is refused"
            );
        }
    }
}
