//! The ledger against a BTreeMap model: random write jobs (committed or rejected) and restarts,
//! comparing every table after every operation, in the manner of sled's own `tests/tree`.
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking"
)]

use proptest::prelude::*;
use proptest::sample::Index;
use sagad::store::{
    DueKey, DueRecord, IdempotencyKey, IdempotencyNamespace, IdempotencyRecord, Options,
    OutboxRecord, SagaRecord, Store,
};
use std::collections::BTreeMap;

/// A few keys, including two whose scope and key concatenate to the same text, so the length
/// prefix of the stored key is exercised.
fn idempotency_keys() -> Vec<IdempotencyKey> {
    let key = |namespace, scope: &str, key: &str| IdempotencyKey {
        namespace,
        scope: scope.into(),
        key: key.into(),
    };
    vec![
        key(IdempotencyNamespace::Coordinator, "StartSaga", "a"),
        key(IdempotencyNamespace::Coordinator, "StartSaga", "b"),
        key(IdempotencyNamespace::Participant, "StartSaga", "a"),
        key(IdempotencyNamespace::Participant, "pa", "ya"),
        key(IdempotencyNamespace::Participant, "p", "aya"),
    ]
}

/// The documented key layout, reproduced here because collection order follows it.
fn stored_key(key: &IdempotencyKey) -> Vec<u8> {
    let mut bytes = vec![key.namespace as u8];
    bytes.extend_from_slice(&(key.scope.len() as u32).to_be_bytes());
    bytes.extend_from_slice(key.scope.as_bytes());
    bytes.extend_from_slice(key.key.as_bytes());
    bytes
}

fn saga(sequence: u64, state: u8, payload_len: usize) -> SagaRecord {
    SagaRecord {
        coordinator_id: "c1".into(),
        sequence,
        business_type: "order".into(),
        mode: 1,
        payload: vec![state; payload_len],
        content_type: String::new(),
        labels: BTreeMap::new(),
        deadline_ms: 0,
        state,
        created_ms: 1,
        updated_ms: u64::from(state),
        request_id: format!("r{sequence}"),
    }
}

fn idempotency(expires_ms: u64, attempts: u32) -> IdempotencyRecord {
    IdempotencyRecord {
        fingerprint: vec![1, 2, 3],
        state: 1,
        result: String::new(),
        response: vec![attempts as u8; (attempts % 5) as usize],
        content_type: String::new(),
        created_ms: 1,
        updated_ms: 2,
        expires_ms,
        attempts,
    }
}

fn outbox(attempts: u32) -> OutboxRecord {
    OutboxRecord {
        gsn_sequence: 7,
        node_id: "node-a".into(),
        command: vec![9; attempts as usize % 7],
        created_ms: 3,
        attempts,
    }
}

fn due(timer: u8) -> DueRecord {
    DueRecord {
        gsn_sequence: 7,
        timer: vec![timer],
    }
}

/// One call inside a write job, as generated (picks not yet resolved against the model).
#[derive(Debug, Clone)]
enum Step {
    PutSaga {
        sequence: u64,
        state: u8,
        payload_len: usize,
    },
    ReadSaga {
        sequence: u64,
    },
    AllocateGsn,
    PutIdempotency {
        key: usize,
        expires_ms: u64,
        attempts: u32,
    },
    DeleteIdempotency {
        key: usize,
    },
    ReadIdempotency {
        key: usize,
    },
    CollectExpired {
        now_ms: u64,
        limit: usize,
    },
    PushOutbox {
        attempts: u32,
    },
    PutOutbox {
        pick: Index,
        attempts: u32,
    },
    DeleteOutbox {
        pick: Index,
    },
    Schedule {
        at_ms: u64,
        timer: u8,
    },
    Cancel {
        pick: Index,
    },
}

#[derive(Debug, Clone)]
enum Op {
    /// A write job; `commit: false` returns `Err` after doing all its steps.
    Write { steps: Vec<Step>, commit: bool },
    /// Reopen the same folder, after `close` or after just dropping the handle.
    Restart { graceful: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1..6u64, any::<u8>(), prop_oneof![4 => 0..40usize, 1 => 150_000..160_000usize])
            .prop_map(|(sequence, state, payload_len)| Step::PutSaga { sequence, state, payload_len }),
        1 => (1..6u64).prop_map(|sequence| Step::ReadSaga { sequence }),
        2 => Just(Step::AllocateGsn),
        3 => (0..5usize, prop_oneof![1 => Just(0u64), 3 => 1..50u64], 0..9u32)
            .prop_map(|(key, expires_ms, attempts)| Step::PutIdempotency { key, expires_ms, attempts }),
        1 => (0..5usize).prop_map(|key| Step::DeleteIdempotency { key }),
        1 => (0..5usize).prop_map(|key| Step::ReadIdempotency { key }),
        2 => (0..60u64, 0..4usize).prop_map(|(now_ms, limit)| Step::CollectExpired { now_ms, limit }),
        2 => (0..9u32).prop_map(|attempts| Step::PushOutbox { attempts }),
        1 => (any::<Index>(), 0..9u32).prop_map(|(pick, attempts)| Step::PutOutbox { pick, attempts }),
        1 => any::<Index>().prop_map(|pick| Step::DeleteOutbox { pick }),
        2 => (0..50u64, any::<u8>()).prop_map(|(at_ms, timer)| Step::Schedule { at_ms, timer }),
        1 => any::<Index>().prop_map(|pick| Step::Cancel { pick }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        7 => (prop::collection::vec(step(), 1..5), Just(true)).prop_map(|(steps, commit)| Op::Write { steps, commit }),
        2 => prop::collection::vec(step(), 1..5).prop_map(|steps| Op::Write { steps, commit: false }),
        1 => any::<bool>().prop_map(|graceful| Op::Restart { graceful }),
    ]
}

/// A step with its picks resolved to concrete ids (one past the largest id when the model has
/// none, so deleting a missing entry is covered too).
#[derive(Debug, Clone)]
enum Resolved {
    PutSaga(SagaRecord),
    ReadSaga(u64),
    AllocateGsn,
    PutIdempotency(IdempotencyKey, IdempotencyRecord),
    DeleteIdempotency(IdempotencyKey),
    ReadIdempotency(IdempotencyKey),
    CollectExpired { now_ms: u64, limit: usize },
    PushOutbox(OutboxRecord),
    PutOutbox(u64, OutboxRecord),
    DeleteOutbox(u64),
    Schedule(u64, DueRecord),
    Cancel(DueKey),
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Done,
    Saga(Option<SagaRecord>),
    Idempotency(Option<IdempotencyRecord>),
    Gsn(u64),
    OutboxId(u64),
    DueKey(DueKey),
    Collected(usize),
    Failed(String),
}

#[derive(Debug, Clone, Default)]
struct Model {
    sagas: BTreeMap<u64, SagaRecord>,
    /// Keyed by the stored key bytes, which is the order collection follows among equals.
    idempotency: BTreeMap<Vec<u8>, IdempotencyRecord>,
    outbox: BTreeMap<u64, OutboxRecord>,
    due: BTreeMap<DueKey, DueRecord>,
    last_gsn: u64,
    /// The largest ids any committed write has been given.
    last_outbox_id: u64,
    last_due_id: u64,
}

impl Model {
    fn resolve(&self, step: &Step) -> Resolved {
        let keys = idempotency_keys();
        match step {
            Step::PutSaga {
                sequence,
                state,
                payload_len,
            } => Resolved::PutSaga(saga(*sequence, *state, *payload_len)),
            Step::ReadSaga { sequence } => Resolved::ReadSaga(*sequence),
            Step::AllocateGsn => Resolved::AllocateGsn,
            Step::PutIdempotency {
                key,
                expires_ms,
                attempts,
            } => Resolved::PutIdempotency(keys[*key].clone(), idempotency(*expires_ms, *attempts)),
            Step::DeleteIdempotency { key } => Resolved::DeleteIdempotency(keys[*key].clone()),
            Step::ReadIdempotency { key } => Resolved::ReadIdempotency(keys[*key].clone()),
            Step::CollectExpired { now_ms, limit } => Resolved::CollectExpired {
                now_ms: *now_ms,
                limit: *limit,
            },
            Step::PushOutbox { attempts } => Resolved::PushOutbox(outbox(*attempts)),
            Step::PutOutbox { pick, attempts } => {
                Resolved::PutOutbox(self.pick_outbox(pick), outbox(*attempts))
            }
            Step::DeleteOutbox { pick } => Resolved::DeleteOutbox(self.pick_outbox(pick)),
            Step::Schedule { at_ms, timer } => Resolved::Schedule(*at_ms, due(*timer)),
            Step::Cancel { pick } => Resolved::Cancel(self.pick_due(pick)),
        }
    }

    fn pick_outbox(&self, pick: &Index) -> u64 {
        let ids: Vec<u64> = self.outbox.keys().copied().collect();
        if ids.is_empty() {
            self.last_outbox_id + 1
        } else {
            ids[pick.index(ids.len())]
        }
    }

    fn pick_due(&self, pick: &Index) -> DueKey {
        let keys: Vec<DueKey> = self.due.keys().copied().collect();
        if keys.is_empty() {
            DueKey {
                at_ms: 3,
                id: self.last_due_id + 1,
            }
        } else {
            keys[pick.index(keys.len())]
        }
    }

    /// Applies one step, checking the store's outcome against what the model expects.
    fn apply(&mut self, step: &Resolved, outcome: &Outcome) -> Result<(), TestCaseError> {
        let expected = match step {
            Resolved::PutSaga(record) => {
                self.sagas.insert(record.sequence, record.clone());
                Outcome::Done
            }
            Resolved::ReadSaga(sequence) => Outcome::Saga(self.sagas.get(sequence).cloned()),
            Resolved::AllocateGsn => {
                // Documented as exactly 1, 2, 3, ...: rejected writes consume nothing.
                self.last_gsn += 1;
                Outcome::Gsn(self.last_gsn)
            }
            Resolved::PutIdempotency(key, record) => {
                self.idempotency.insert(stored_key(key), record.clone());
                Outcome::Done
            }
            Resolved::DeleteIdempotency(key) => {
                self.idempotency.remove(&stored_key(key));
                Outcome::Done
            }
            Resolved::ReadIdempotency(key) => {
                Outcome::Idempotency(self.idempotency.get(&stored_key(key)).cloned())
            }
            Resolved::CollectExpired { now_ms, limit } => {
                let mut expired: Vec<(u64, Vec<u8>)> = self
                    .idempotency
                    .iter()
                    .filter(|(_, r)| r.expires_ms != 0 && r.expires_ms <= *now_ms)
                    .map(|(k, r)| (r.expires_ms, k.clone()))
                    .collect();
                expired.sort();
                expired.truncate(*limit);
                for (_, key) in &expired {
                    self.idempotency.remove(key);
                }
                Outcome::Collected(expired.len())
            }
            Resolved::PushOutbox(record) => match outcome {
                // Only "unique and increasing" is promised for outbox ids.
                Outcome::OutboxId(id) if *id > self.last_outbox_id => {
                    self.last_outbox_id = *id;
                    self.outbox.insert(*id, record.clone());
                    outcome.clone()
                }
                _ => Outcome::Failed(format!("an outbox id above {}", self.last_outbox_id)),
            },
            Resolved::PutOutbox(id, record) => {
                self.outbox.insert(*id, record.clone());
                Outcome::Done
            }
            Resolved::DeleteOutbox(id) => {
                self.outbox.remove(id);
                Outcome::Done
            }
            Resolved::Schedule(at_ms, record) => match outcome {
                Outcome::DueKey(key) if key.at_ms == *at_ms && key.id > self.last_due_id => {
                    self.last_due_id = key.id;
                    self.due.insert(*key, record.clone());
                    outcome.clone()
                }
                _ => Outcome::Failed(format!(
                    "a due key at {at_ms} with an id above {}",
                    self.last_due_id
                )),
            },
            Resolved::Cancel(key) => {
                self.due.remove(key);
                Outcome::Done
            }
        };
        prop_assert_eq!(outcome, &expected, "step {:?}", step);
        Ok(())
    }
}

fn run_step(tx: &mut sagad::store::WriteTx<'_>, step: &Resolved) -> Outcome {
    let outcome = match step {
        Resolved::PutSaga(record) => tx.put_saga(record).map(|()| Outcome::Done),
        Resolved::ReadSaga(sequence) => tx.saga(*sequence).map(Outcome::Saga),
        Resolved::AllocateGsn => tx.allocate_gsn_sequence().map(Outcome::Gsn),
        Resolved::PutIdempotency(key, record) => {
            tx.put_idempotency(key, record).map(|()| Outcome::Done)
        }
        Resolved::DeleteIdempotency(key) => tx.delete_idempotency(key).map(|()| Outcome::Done),
        Resolved::ReadIdempotency(key) => tx.idempotency(key).map(Outcome::Idempotency),
        Resolved::CollectExpired { now_ms, limit } => tx
            .collect_expired_idempotency(*now_ms, *limit)
            .map(Outcome::Collected),
        Resolved::PushOutbox(record) => tx.push_outbox(record).map(Outcome::OutboxId),
        Resolved::PutOutbox(id, record) => tx.put_outbox(*id, record).map(|()| Outcome::Done),
        Resolved::DeleteOutbox(id) => tx.delete_outbox(*id).map(|()| Outcome::Done),
        Resolved::Schedule(at_ms, record) => tx.schedule(*at_ms, record).map(Outcome::DueKey),
        Resolved::Cancel(key) => tx.cancel(*key).map(|()| Outcome::Done),
    };
    outcome.unwrap_or_else(|e| Outcome::Failed(e.to_string()))
}

/// Everything a reader can see, in the shape of the model.
#[derive(Debug, PartialEq)]
struct Snapshot {
    sagas: Vec<SagaRecord>,
    sagas_descending_before_4: Vec<SagaRecord>,
    sagas_after_2: Vec<SagaRecord>,
    idempotency: Vec<Option<IdempotencyRecord>>,
    outbox: Vec<(u64, OutboxRecord)>,
    due: Vec<(DueKey, DueRecord)>,
    due_until_20: Vec<(DueKey, DueRecord)>,
}

impl Model {
    fn snapshot(&self) -> Snapshot {
        let keys = idempotency_keys();
        Snapshot {
            sagas: self.sagas.values().cloned().collect(),
            sagas_descending_before_4: self
                .sagas
                .range(..4)
                .rev()
                .map(|(_, s)| s.clone())
                .collect(),
            sagas_after_2: self.sagas.range(3..).map(|(_, s)| s.clone()).collect(),
            idempotency: keys
                .iter()
                .map(|k| self.idempotency.get(&stored_key(k)).cloned())
                .collect(),
            outbox: self.outbox.iter().map(|(id, r)| (*id, r.clone())).collect(),
            due: self.due.iter().map(|(k, r)| (*k, r.clone())).collect(),
            due_until_20: self
                .due
                .range(..DueKey { at_ms: 21, id: 0 })
                .map(|(k, r)| (*k, r.clone()))
                .collect(),
        }
    }
}

async fn snapshot(store: &Store) -> Snapshot {
    store
        .read(|tx| {
            let keys = idempotency_keys();
            Snapshot {
                sagas: tx.sagas(None, false).collect::<Result<_, _>>().unwrap(),
                sagas_descending_before_4: tx
                    .sagas(Some(4), true)
                    .collect::<Result<_, _>>()
                    .unwrap(),
                sagas_after_2: tx.sagas(Some(2), false).collect::<Result<_, _>>().unwrap(),
                idempotency: keys.iter().map(|k| tx.idempotency(k).unwrap()).collect(),
                outbox: tx.outbox().collect::<Result<_, _>>().unwrap(),
                due: tx.due_until(u64::MAX).collect::<Result<_, _>>().unwrap(),
                due_until_20: tx.due_until(20).collect::<Result<_, _>>().unwrap(),
            }
        })
        .await
        .unwrap()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::new(dir.path().join("ledger"));
    options.cache_capacity_bytes = 4 * 1024 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut store = Some(Store::open(options.clone()).unwrap());
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Write { steps, commit } => {
                let live = store.as_ref().unwrap();
                let resolved: Vec<Resolved> = steps.iter().map(|s| model.resolve(s)).collect();
                let job = resolved.clone();
                let answer = rt
                    .block_on(live.write(move |tx| {
                        let outcomes: Vec<Outcome> =
                            job.iter().map(|step| run_step(tx, step)).collect();
                        if commit { Ok(outcomes) } else { Err(outcomes) }
                    }))
                    .unwrap();
                let outcomes = match (&answer, commit) {
                    (Ok(outcomes), true) | (Err(outcomes), false) => outcomes,
                    _ => {
                        return Err(TestCaseError::fail(format!(
                            "commit {commit} but the job answered {answer:?}"
                        )));
                    }
                };
                // Inside the job the steps see each other's writes, committed or not.
                let mut after = model.clone();
                for (step, outcome) in resolved.iter().zip(outcomes) {
                    after.apply(step, outcome)?;
                }
                if commit {
                    model = after;
                }
            }
            Op::Restart { graceful } => {
                let old = store.take().unwrap();
                if graceful {
                    rt.block_on(old.close()).unwrap();
                }
                drop(old);
                store = Some(Store::open(options.clone()).unwrap());
            }
        }
        let seen = rt.block_on(snapshot(store.as_ref().unwrap()));
        prop_assert_eq!(seen, model.snapshot());
    }
    rt.block_on(store.unwrap().close()).unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_behaves_like_the_model_across_restarts(ops in prop::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}

/// A restart right after rejected work must not hand out its numbers as if they were used, and
/// a reopened ledger continues from the committed counters.
#[test]
fn counters_continue_after_a_restart_and_skip_nothing() {
    let ops = vec![
        Op::Write {
            steps: vec![Step::AllocateGsn, Step::PushOutbox { attempts: 0 }],
            commit: true,
        },
        Op::Write {
            steps: vec![Step::AllocateGsn, Step::AllocateGsn],
            commit: false,
        },
        Op::Restart { graceful: false },
        Op::Write {
            steps: vec![Step::AllocateGsn, Step::PushOutbox { attempts: 1 }],
            commit: true,
        },
        Op::Restart { graceful: true },
        Op::Write {
            steps: vec![Step::AllocateGsn, Step::Schedule { at_ms: 5, timer: 1 }],
            commit: true,
        },
    ];
    run(ops).unwrap();
}

/// Collection inside one job must see the job's own puts and deletes, and keep the expiry
/// index in step when a record's expiry changes twice before commit.
#[test]
fn collection_sees_the_jobs_own_writes() {
    let ops = vec![
        Op::Write {
            steps: vec![
                Step::PutIdempotency {
                    key: 0,
                    expires_ms: 10,
                    attempts: 1,
                },
                Step::PutIdempotency {
                    key: 1,
                    expires_ms: 5,
                    attempts: 1,
                },
                Step::PutIdempotency {
                    key: 0,
                    expires_ms: 40,
                    attempts: 2,
                },
                Step::CollectExpired {
                    now_ms: 20,
                    limit: 3,
                },
            ],
            commit: true,
        },
        Op::Write {
            steps: vec![
                Step::DeleteIdempotency { key: 0 },
                Step::PutIdempotency {
                    key: 2,
                    expires_ms: 1,
                    attempts: 0,
                },
                Step::CollectExpired {
                    now_ms: 59,
                    limit: 3,
                },
            ],
            commit: true,
        },
    ];
    run(ops).unwrap();
}
