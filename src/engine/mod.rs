//! The persist-then-act shell around the domain: each request becomes one ledger write that
//! runs the domain's rules against the stored state, stores the outcome and the idempotency
//! record together, and is answered only once durable. The engine owns no tonic type and no
//! sled type; it is handed the store, the clock and the limits.

mod convert;
pub mod paging;

use std::time::Duration;

use crate::clock::SharedClock;
use crate::domain::idempotency::{self, Answer, Lookup, Terms};
use crate::domain::ids::{CoordinatorId, Gsn, RequestId};
use crate::domain::saga::{self, Limits, Saga, SagaMode, SagaState, StartRequest};
use crate::domain::{Millis, Violation};
use crate::store::{self, IdempotencyKey, IdempotencyNamespace, Store, WriteTx};

pub use paging::PageToken;

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

#[derive(Debug, Clone)]
pub struct Settings {
    pub coordinator_id: CoordinatorId,
    pub limits: Limits,
    pub idempotency_retention: Duration,
}

/// What `list_sagas` is asked for.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub states: Vec<SagaState>,
    pub business_type: String,
    pub page_size: u32,
    pub page_token: String,
    pub newest_first: bool,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub sagas: Vec<Saga>,
    pub next_page_token: String,
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
    settings: Settings,
}

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 500;
/// A filtered listing stops after examining this many sagas and hands back a token, so one
/// call never scans the whole ledger.
const MAX_EXAMINED_PER_PAGE: usize = 10_000;

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The idempotency record under `key`, as the domain sees it.
fn stored_record(
    tx: &WriteTx<'_>,
    key: &IdempotencyKey,
) -> Result<Option<idempotency::Record>, store::Error> {
    tx.idempotency(key)?
        .map(convert::idempotency_from_record)
        .transpose()
}

fn scope_text(scope: &str, field: &str) -> Result<(), Error> {
    RequestId::parse(scope)
        .map(|_| ())
        .map_err(|e| Error::invalid(field, e.to_string()))
}

impl Engine {
    pub fn new(store: Store, clock: SharedClock, settings: Settings) -> Engine {
        Engine {
            store,
            clock,
            settings,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn now_ms(&self) -> Millis {
        self.clock.now_ms()
    }

    fn terms(&self, processing_lease_ms: Option<Millis>) -> Terms {
        Terms {
            retention_ms: millis(self.settings.idempotency_retention),
            processing_lease_ms,
        }
    }

    /// Starts a saga (idempotent on its request id). `encode` turns the new saga into the
    /// response bytes stored for replay, so every repeat gets exactly the first answer.
    pub async fn start_saga<F>(
        &self,
        request: StartRequest,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&Saga) -> Vec<u8> + Send + 'static,
    {
        let now = self.clock.now_ms();
        let start =
            saga::validate_start(request, self.settings.limits, now).map_err(Error::Invalid)?;
        let key = IdempotencyKey {
            namespace: IdempotencyNamespace::Coordinator,
            scope: "StartSaga".to_owned(),
            key: start.request_id.as_str().to_owned(),
        };
        let coordinator = self.settings.coordinator_id.clone();
        let terms = self.terms(None);
        self.store
            .write(move |tx| {
                let existing = stored_record(tx, &key)?;
                let registered =
                    match idempotency::on_lookup(existing.as_ref(), &fingerprint, terms, now) {
                        Lookup::Register(registered) => registered,
                        Lookup::Replay(done) => {
                            return Ok(Answered {
                                response: done.response,
                                replayed: true,
                            });
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
                if start.mode == SagaMode::Orchestrated {
                    // Strategies arrive with the engine issue; until then no business type has
                    // one, and an orchestrated saga must never run as something else.
                    return Err(Error::NotFound(format!(
                        "no fulfillment strategy is stored for business type {:?}; store one with \
                         Strategies.PutStrategy, or start the saga with mode \
                         SAGA_MODE_REGISTERED_OUTCALLS",
                        start.business_type.as_str()
                    )));
                }
                let sequence = tx.allocate_gsn_sequence()?;
                let saga = saga::on_started(start, Gsn::new(coordinator, sequence), now);
                tx.put_saga(&convert::saga_to_record(&saga))?;
                let response = encode(&saga);
                let done = idempotency::finished(
                    registered,
                    Answer {
                        result: "STARTED".to_owned(),
                        response: response.clone(),
                        content_type: String::new(),
                    },
                    terms,
                    now,
                );
                tx.put_idempotency(&key, &convert::idempotency_to_record(&done))?;
                Ok(Answered {
                    response,
                    replayed: false,
                })
            })
            .await?
    }

    fn parse_gsn(&self, text: &str) -> Result<Gsn, Error> {
        Gsn::parse(text).map_err(|e| Error::invalid("gsn", e.to_string()))
    }

    pub async fn get_saga(&self, gsn_text: &str) -> Result<Saga, Error> {
        let gsn = self.parse_gsn(gsn_text)?;
        let sequence = gsn.sequence();
        let found = self
            .store
            .read(move |tx| tx.saga(sequence))
            .await??
            .map(convert::saga_from_record)
            .transpose()?;
        match found {
            // A sequence issued under another coordinator id is another saga.
            Some(saga) if saga.gsn == gsn => Ok(saga),
            _ => Err(Error::NotFound(format!("no saga has GSN {gsn}"))),
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
            let token = PageToken::decode(&query.page_token)
                .ok_or_else(|| Error::invalid("page_token", "is not a token this sagad issued; pass next_page_token from the previous page unchanged"))?;
            if token.newest_first != query.newest_first {
                return Err(Error::invalid(
                    "page_token",
                    "was issued for the other order; keep newest_first the same across pages",
                ));
            }
            Some(token.after)
        };
        let states = query.states;
        let business_type = query.business_type;
        let newest_first = query.newest_first;
        let (records, last_examined, exhausted) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut matched = Vec::new();
                let mut last_examined = None;
                let mut examined = 0usize;
                for record in tx.sagas(after, newest_first) {
                    let record = record?;
                    examined += 1;
                    last_examined = Some(record.sequence);
                    let state_matches = states.is_empty()
                        || convert::saga_state_from_code(record.state)
                            .is_some_and(|s| states.contains(&s));
                    let type_matches =
                        business_type.is_empty() || record.business_type == business_type;
                    if state_matches && type_matches {
                        matched.push(record);
                        if matched.len() == page_size {
                            return Ok((matched, last_examined, false));
                        }
                    }
                    if examined >= MAX_EXAMINED_PER_PAGE {
                        return Ok((matched, last_examined, false));
                    }
                }
                Ok((matched, last_examined, true))
            })
            .await??;
        let sagas = records
            .into_iter()
            .map(convert::saga_from_record)
            .collect::<Result<Vec<_>, _>>()?;
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
        })
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
        if processing_lease.is_some_and(|lease| lease.is_zero()) {
            return Err(Error::invalid(
                "processing_timeout",
                "must be longer than zero, or unset",
            ));
        }
        let terms = self.terms(processing_lease.map(millis));
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
        if answer.response.len() > self.settings.limits.max_payload_bytes {
            return Err(Error::invalid(
                "response",
                format!(
                    "is {} bytes; at most {} are allowed",
                    answer.response.len(),
                    self.settings.limits.max_payload_bytes
                ),
            ));
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

    /// Deletes expired idempotency records, at most `limit`; returns how many.
    pub async fn collect_expired(&self, limit: usize) -> Result<usize, Error> {
        let now = self.clock.now_ms();
        Ok(self
            .store
            .write(move |tx| tx.collect_expired_idempotency(now, limit))
            .await??)
    }
}
