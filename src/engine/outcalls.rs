//! Registered outcalls and reversals in the engine (S1): RegisterOutcall, RequestReversal,
//! CompleteSaga and ReprocessSaga, each one ledger write around the pure rules of
//! `domain::outcalls`. RequestReversal answers with the signal the reversal ended with, so it
//! waits (up to the caller's `wait`) between a durable start and a durable answer.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::Violation;
use crate::domain::branch::Signal;
use crate::domain::idempotency::{self, Lookup, Terms};
use crate::domain::ids::{Gsn, RequestId};
use crate::domain::orchestration::{self, Transition};
use crate::domain::outcalls::{self, Outcall, ReversalAsked};
use crate::domain::saga::{Limits, ReversalType, Saga, SagaMode, SagaState, too_long};
use crate::engine::sagas::{Applied, before, load_saga, outcall_refusal, store_transition};
use crate::engine::watch::Changes;
use crate::engine::{Answered, Engine, Error, answered_with, convert, stored_record};
use crate::store::{IdempotencyKey, IdempotencyNamespace, PayloadRecord, WriteTx};

/// RegisterOutcall as it arrives.
#[derive(Debug, Clone)]
pub struct OutcallInput {
    pub request_id: String,
    pub gsn: String,
    pub caller_node_id: String,
    pub callee_node_id: String,
    pub forward_action: String,
    pub reversal_action: String,
    pub order: u32,
    pub payload: Vec<u8>,
    pub content_type: String,
}

/// RequestReversal as it arrives.
#[derive(Debug, Clone)]
pub struct ReversalInput {
    pub request_id: String,
    pub gsn: String,
    pub branch_id: String,
    pub reversal_type: Option<ReversalType>,
    pub serial: String,
    pub reason: String,
    /// `None`: the default (5 s).
    pub wait: Option<Duration>,
    /// The request's digest with its `wait` in it, as builds before `wait` was left out of the
    /// fingerprint stored it: a registration stored under it is this same request.
    pub digest_with_wait: Option<Vec<u8>>,
}

const DEFAULT_WAIT: Duration = Duration::from_secs(5);
const MAX_WAIT: Duration = Duration::from_secs(60);
const MAX_ACTION: usize = 128;

fn node_id(field: &str, text: &str) -> Result<(), Error> {
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            "must be 1 to 64 letters, digits, '.', '_' or '-'",
        ))
    }
}

fn action(field: &str, text: &str) -> Result<(), Error> {
    if text.is_empty() || text.chars().count() > MAX_ACTION {
        Err(Error::invalid(
            field,
            format!("is required, at most {MAX_ACTION} characters"),
        ))
    } else {
        Ok(())
    }
}

/// What RequestReversal answers `asked` once the reversal has stopped (`None` while it runs):
/// each request gets the S1 answer for what it asked about, whichever request started the
/// reversal (the saga's own signal is that answer for the first one only).
fn answer_for(saga: &Saga, asked: &ReversalAsked) -> Option<Signal> {
    match saga.state {
        SagaState::Reversed => Some(outcalls::reversal_answer(
            saga,
            asked.reversal_type,
            &asked.branch_id,
        )),
        SagaState::NeedsAttention => Some(Signal::Reprocess),
        SagaState::Running | SagaState::Reversing | SagaState::Completed => None,
    }
}

/// What RequestReversal's first write hands on: the reversal started (the transition stored,
/// the request registered, the saga's payload), or the stored answer of a repeat.
type Started = Result<(Applied, idempotency::Record, Vec<u8>), Answered>;

/// The saga's payload (stored apart from its record, under branch id ""); empty if it has none.
fn saga_payload(tx: &WriteTx<'_>, gsn: &Gsn) -> Result<Vec<u8>, Error> {
    Ok(tx
        .payload(gsn.sequence(), "")?
        .map(|p| p.data)
        .unwrap_or_default())
}

impl Engine {
    fn gsn(&self, text: &str) -> Result<Gsn, Error> {
        Gsn::parse(text).map_err(|e| Error::invalid("gsn", e.to_string()))
    }

    fn request_id(text: &str) -> Result<RequestId, Error> {
        RequestId::parse(text).map_err(|e| Error::invalid("request_id", e.to_string()))
    }

    pub async fn register_outcall<F>(
        &self,
        input: OutcallInput,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Saga, &str) -> Vec<u8> + Send + 'static,
    {
        let request_id = Self::request_id(&input.request_id)?;
        let gsn = self.gsn(&input.gsn)?;
        node_id("caller_node_id", &input.caller_node_id)?;
        node_id("callee_node_id", &input.callee_node_id)?;
        action("forward_action", &input.forward_action)?;
        action("reversal_action", &input.reversal_action)?;
        if input.order == 0 {
            return Err(Error::invalid(
                "order",
                "is required: the outcall's position in the saga, from 1",
            ));
        }
        self.check_size("payload", input.payload.len())?;
        if let Some(violation) = too_long(
            "content_type",
            &input.content_type,
            Limits::MAX_CONTENT_TYPE,
        ) {
            return Err(Error::Invalid(vec![violation]));
        }
        let written = self.idempotent_write_with(
            "RegisterOutcall",
            &request_id,
            fingerprint,
            move |tx, now| {
                let saga = load_saga(tx, &gsn)?;
                let outcall = Outcall {
                    caller_node_id: input.caller_node_id,
                    callee_node_id: input.callee_node_id,
                    forward_action: input.forward_action,
                    reversal_action: input.reversal_action,
                    order: input.order,
                };
                let branch_id = outcalls::branch_id(outcall.order, &outcall.callee_node_id);
                let from = before(&saga);
                let transition = outcalls::on_outcall_registered(saga, outcall, now)
                    .map_err(|r| outcall_refusal(r, &gsn))?;
                if !input.payload.is_empty() {
                    tx.put_payload(
                        gsn.sequence(),
                        &branch_id,
                        &PayloadRecord {
                            data: input.payload,
                            content_type: input.content_type,
                        },
                    )?;
                }
                let applied = store_transition(tx, from, transition, now)?;
                let saga = applied
                    .saga
                    .clone()
                    .ok_or_else(|| Error::NotFound(format!("no saga has GSN {gsn}")))?;
                Ok((encode(&saga, &branch_id), applied))
            },
        );
        self.commit_saga_write(written).await
    }

    /// Awaits a saga write and its follow-up on a task of their own (`commit`).
    async fn commit_saga_write<W>(&self, written: W) -> Result<Answered, Error>
    where
        W: Future<Output = Result<(Answered, Option<Applied>), Error>> + Send + 'static,
    {
        let engine = self.clone();
        self.commit(async move {
            let (answered, applied) = written.await?;
            if let Some(applied) = applied {
                engine.after_commit(applied);
            }
            Ok(answered)
        })
        .await
    }

    /// One idempotent request that moves a stored saga by `step` (a pure transition) and
    /// answers with `encode` of the saga after it.
    async fn saga_request<S, F>(
        &self,
        method: &'static str,
        request_id: &str,
        gsn: &str,
        fingerprint: Vec<u8>,
        step: S,
        encode: F,
    ) -> Result<Answered, Error>
    where
        S: FnOnce(Saga, &Gsn, u64, &WriteTx<'_>) -> Result<Transition, Error> + Send + 'static,
        F: FnOnce(&Saga) -> Vec<u8> + Send + 'static,
    {
        let request_id = Self::request_id(request_id)?;
        let gsn = self.gsn(gsn)?;
        let written =
            self.idempotent_write_with(method, &request_id, fingerprint, move |tx, now| {
                let saga = load_saga(tx, &gsn)?;
                let from = before(&saga);
                let transition = step(saga, &gsn, now, tx)?;
                let applied = store_transition(tx, from, transition, now)?;
                let mut saga = applied
                    .saga
                    .clone()
                    .ok_or_else(|| Error::NotFound(format!("no saga has GSN {gsn}")))?;
                // The answer shows the saga with its payload, as GetSaga does; the saga record
                // holds none (it is stored once, apart).
                saga.payload = saga_payload(tx, &gsn)?;
                Ok((encode(&saga), applied))
            });
        self.commit_saga_write(written).await
    }

    pub async fn complete_saga<F>(
        &self,
        request_id: &str,
        gsn: &str,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Saga) -> Vec<u8> + Send + 'static,
    {
        let step = |saga: Saga, gsn: &Gsn, now: u64, _: &WriteTx<'_>| {
            outcalls::on_completed(saga, now).map_err(|r| outcall_refusal(r, gsn))
        };
        self.saga_request("CompleteSaga", request_id, gsn, fingerprint, step, encode)
            .await
    }

    pub async fn reprocess_saga<F>(
        &self,
        request_id: &str,
        gsn: &str,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Saga) -> Vec<u8> + Send + 'static,
    {
        let engine = self.clone();
        let step = move |saga: Saga, gsn: &Gsn, now: u64, tx: &WriteTx<'_>| {
            let state = saga.state;
            let reprocessed = match saga.mode {
                SagaMode::Orchestrated => orchestration::on_reprocess(saga, now),
                SagaMode::RegisteredOutcalls => {
                    let retry = engine.shared.retry_config(tx)?;
                    outcalls::on_outcall_reprocess(saga, engine.env(&retry, now))
                }
            };
            let transition = reprocessed.ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "saga {gsn} is {}; only a saga in NEEDS_ATTENTION is reprocessed",
                    convert::saga_state_name(state)
                ))
            })?;
            tracing::info!(gsn = %gsn, "saga reprocessed by an operator");
            Ok(transition)
        };
        self.saga_request("ReprocessSaga", request_id, gsn, fingerprint, step, encode)
            .await
    }

    /// RequestReversal: starts the reversal durably, waits up to `wait` for its signal, and
    /// stores that answer for every repeat of the request. If the reversal has not ended by
    /// then (or waits for an operator in NEEDS_ATTENTION), the answer is REPROCESS and nothing
    /// is stored: a repeat of the same request asks again and gets the final signal once there
    /// is one (a crash between the two steps is covered the same way, by the registration's
    /// lease).
    pub async fn request_reversal<F>(
        &self,
        input: ReversalInput,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: Fn(Signal, &Saga) -> Vec<u8> + Send + Sync + 'static,
    {
        let request_id = Self::request_id(&input.request_id)?;
        let gsn = self.gsn(&input.gsn)?;
        let Some(reversal_type) = input.reversal_type else {
            return Err(Error::invalid(
                "reversal_type",
                "is required: REVERSAL_TYPE_EXTERNAL (a reversal request from outside) or REVERSAL_TYPE_INTERNAL \
                 (reverse the earlier outcalls of an ordered saga)",
            ));
        };
        let wait = input.wait.unwrap_or(DEFAULT_WAIT);
        if wait > MAX_WAIT {
            return Err(Error::invalid(
                "wait",
                format!("is {wait:?}; at most {MAX_WAIT:?}"),
            ));
        }
        let violations: Vec<Violation> = [
            too_long(
                "reversal_serial",
                &input.serial,
                Limits::MAX_REVERSAL_SERIAL,
            ),
            too_long("reason", &input.reason, Limits::MAX_REASON),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        let serial = if input.serial.is_empty() {
            input.request_id.clone()
        } else {
            input.serial.clone()
        };
        let key = IdempotencyKey {
            namespace: IdempotencyNamespace::Coordinator,
            scope: "RequestReversal".to_owned(),
            key: request_id.as_str().to_owned(),
        };
        let terms = Terms {
            retention_ms: u64::try_from(self.settings.idempotency_retention.as_millis())
                .unwrap_or(u64::MAX),
            processing_lease_ms: Some(
                u64::try_from((wait + Duration::from_secs(30)).as_millis()).unwrap_or(u64::MAX),
            ),
        };
        let encode = Arc::new(encode);
        let changes = self.shared.watchers.subscribe(gsn.sequence());
        let now = self.clock.now_ms();
        let engine = self.clone();
        let asked = ReversalAsked {
            reversal_type,
            branch_id: input.branch_id.clone(),
            serial,
            reason: input.reason.clone(),
        };
        let start_key = key.clone();
        let answering = asked.clone();
        let digest_with_wait = input.digest_with_wait.clone();
        let start = move |tx: &mut WriteTx<'_>| -> Result<Started, Error> {
            let existing = stored_record(tx, &start_key)?;
            let fingerprint = match (&existing, &digest_with_wait) {
                (Some(record), Some(older)) if record.fingerprint == *older => older,
                _ => &fingerprint,
            };
            let registered =
                match idempotency::on_lookup(existing.as_ref(), fingerprint, terms, now) {
                    Lookup::Register(registered) => registered,
                    Lookup::Replay(done) => {
                        return Ok(Err(Answered {
                            response: done.response,
                            replayed: true,
                        }));
                    }
                    Lookup::InProgress(_) => {
                        return Err(Error::InProgress {
                            request_id: start_key.key,
                        });
                    }
                    Lookup::Mismatch => {
                        return Err(Error::RequestIdReused {
                            request_id: start_key.key,
                        });
                    }
                };
            let saga = load_saga(tx, &gsn)?;
            let from = before(&saga);
            let retry = engine.shared.retry_config(tx)?;
            let env = engine.env(&retry, now);
            let transition = outcalls::on_reversal_requested(saga, asked, env)
                .map_err(|r| outcall_refusal(r, &gsn))?;
            tx.put_idempotency(&start_key, &convert::idempotency_to_record(&registered))?;
            let payload = saga_payload(tx, &gsn)?;
            Ok(Ok((
                store_transition(tx, from, transition, now)?,
                registered,
                payload,
            )))
        };
        let gsn_text = input.gsn.clone();
        let concluding = self.clone();
        // The registration, its follow-up and the wait for the answer run on a task of their
        // own. A caller may give up mid-write, and the reversal's commands must still go out;
        // and a caller whose deadline is shorter than `wait` must not leave its registration
        // PROCESSING, which would refuse every repeat as in progress for `wait` + 30 s.
        self.commit(async move {
            let started = concluding.store.write(start).await??;
            let (applied, registered, payload) = match started {
                Ok(started) => started,
                Err(replayed) => return Ok(replayed),
            };
            let saga = applied
                .saga
                .clone()
                .ok_or_else(|| Error::NotFound(format!("no saga has GSN {gsn_text}")))?;
            let stamp = applied.stamp;
            concluding.after_commit(applied);
            concluding
                .conclude_reversal(
                    (stamp, saga),
                    payload,
                    changes,
                    wait,
                    answering,
                    gsn_text,
                    key,
                    registered,
                    terms,
                    encode,
                )
                .await
        })
        .await
    }

    /// Waits up to `wait` for the answer to `answering`, then stores it for the request's
    /// repeats, or, if there is none yet, removes the request's registration. It starts from
    /// the saga the registering write stored, with that write's stamp.
    #[allow(clippy::too_many_arguments)]
    async fn conclude_reversal<F>(
        &self,
        (mut stamp, mut saga): (u64, Saga),
        payload: Vec<u8>,
        mut changes: Changes,
        wait: Duration,
        answering: ReversalAsked,
        gsn_text: String,
        key: IdempotencyKey,
        registered: idempotency::Record,
        terms: Terms,
        encode: Arc<F>,
    ) -> Result<Answered, Error>
    where
        F: Fn(Signal, &Saga) -> Vec<u8> + Send + Sync + 'static,
    {
        // Wait for the end, from the published transitions.
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        while answer_for(&saga, &answering).is_none() {
            tokio::select! {
                () = &mut deadline => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        // The saga ended and its watch closed; read the final state.
                        saga = self.get_saga(&gsn_text).await?;
                        break;
                    }
                    // Only a state newer than the one known: follow-ups run in any order.
                    let latest = changes.borrow_and_update().clone();
                    if let Some(latest) = latest.filter(|p| p.stamp > stamp) {
                        stamp = latest.stamp;
                        saga = (*latest.saga).clone();
                    }
                }
            }
        }
        let now = self.clock.now_ms();
        // NEEDS_ATTENTION is not an end: its REPROCESS is answered but not stored, so a repeat
        // of the request (S1: "try again later") learns the outcome once an operator has
        // reprocessed the saga.
        let answer = answer_for(&saga, &answering);
        // The answer shows the saga with its payload, as GetSaga does; the sagas published to
        // watchers carry none. It never changes, so the one read at the start serves.
        saga.payload = payload;
        match answer.filter(|_| saga.state == SagaState::Reversed) {
            Some(signal) => {
                let response = encode(signal, &saga);
                let done = answered_with(registered, response.clone(), terms, now);
                self.store
                    .write(move |tx| {
                        tx.put_idempotency(&key, &convert::idempotency_to_record(&done))
                    })
                    .await??;
                Ok(Answered {
                    response,
                    replayed: false,
                })
            }
            None => {
                self.store
                    .write(move |tx| -> Result<(), Error> {
                        // Only our own registration: a takeover after the lease is another's.
                        if stored_record(tx, &key)?
                            .is_some_and(|r| r.attempts == registered.attempts)
                        {
                            tx.delete_idempotency(&key)?;
                        }
                        Ok(())
                    })
                    .await??;
                Ok(Answered {
                    response: encode(answer.unwrap_or(Signal::Reprocess), &saga),
                    replayed: false,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::saga::{Deadline, SagaMode, StartRequest};
    use crate::engine::testing::engine_on_fresh_ledger;

    /// Builds before `wait` was left out of RequestReversal's fingerprint stored the digest with
    /// it: a repeat of such a request across the upgrade is still the same request.
    #[tokio::test]
    async fn a_reversal_registered_under_the_digest_with_its_wait_is_replayed_after_the_upgrade() {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let (_dir, _store, engine) = engine_on_fresh_ledger(clock, |_| {}).await;
        let (_, gsn) = engine
            .start_saga(
                StartRequest {
                    request_id: "t-upgrade".into(),
                    business_type: "transfer".into(),
                    mode: Some(SagaMode::RegisteredOutcalls),
                    payload: Vec::new(),
                    content_type: String::new(),
                    labels: Default::default(),
                    deadline: Deadline::None,
                },
                Vec::new(),
                |saga| (Vec::new(), saga.gsn.to_string()),
            )
            .await
            .unwrap();
        let input = |digest_with_wait: Option<Vec<u8>>| ReversalInput {
            request_id: "r-upgrade".into(),
            gsn: gsn.clone().unwrap(),
            branch_id: String::new(),
            reversal_type: Some(ReversalType::External),
            serial: String::new(),
            reason: String::new(),
            wait: Some(Duration::from_secs(5)),
            digest_with_wait,
        };
        // Stored by the older build: its only digest had the wait in it.
        let first = engine
            .request_reversal(input(None), b"with wait".to_vec(), |_, _| b"ended".to_vec())
            .await
            .unwrap();
        assert!(!first.replayed);
        let repeat = engine
            .request_reversal(
                input(Some(b"with wait".to_vec())),
                b"without wait".to_vec(),
                |_, _| b"again".to_vec(),
            )
            .await
            .unwrap();
        assert!(repeat.replayed);
        assert_eq!(repeat.response, b"ended");
        let other = engine
            .request_reversal(
                input(Some(b"another body".to_vec())),
                b"another body, no wait".to_vec(),
                |_, _| b"again".to_vec(),
            )
            .await;
        assert!(
            matches!(other, Err(Error::RequestIdReused { .. })),
            "{other:?}"
        );
    }
}
