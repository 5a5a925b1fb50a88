//! The ledger against a BTreeMap model: random write jobs (committed, rejected or panicking),
//! alone or several in one commit group, and restarts, comparing every table after every
//! operation, in the manner of sled's own `tests/tree`.
//! Reads inside a job (the latest strategy and retry configuration among them) must see the
//! job's own writes, so the model checks them against its state as the job goes.
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns fail the test by panicking"
)]

use proptest::prelude::*;
use proptest::sample::Index;
use sagad::store::{
    BranchRecord, DueKey, DueRecord, IdempotencyKey, IdempotencyNamespace, IdempotencyRecord,
    NodeRecord, Options, OutboxRecord, PayloadRecord, RetryAttemptRecord, RetryConfigRecord,
    RetryHistoryRecord, RetryPolicyRecord, RuleRecord, SagaRecord, StepRecord, StepStatusRecord,
    Store, StrategyRecord, TimelineRecord,
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

/// Business types whose keys test the layout: the empty one, one that is a prefix of others,
/// one with a byte below every letter, and one outside ASCII.
const BUSINESS_TYPES: [&str; 5] = ["", "a", "a b", "ab", "\u{e9}t\u{e9}"];
/// A branch id that is a prefix of another, and the saga's own payload ("").
const BRANCH_IDS: [&str; 3] = ["", "b1", "b10"];
const NODE_IDS: [&str; 4] = ["node-b", "node-a", "node-a2", ""];
const SERIALS: [&str; 4] = ["s1", "s2", "s10", "r1"];

fn saga(sequence: u64, state: u8, branches: usize) -> SagaRecord {
    let branch = |order: usize| BranchRecord {
        branch_id: BRANCH_IDS[order % BRANCH_IDS.len()].into(),
        node_id: NODE_IDS[order % NODE_IDS.len()].into(),
        caller_node_id: String::new(),
        forward_action: "pay".into(),
        reversal_action: "refund".into(),
        order: order as u32,
        state,
        last_status: "PAID".into(),
        last_status_parameters: BTreeMap::from([("k".into(), format!("{state}"))]),
        error_code: String::new(),
        message: String::new(),
        attempts: u32::from(state),
        retry_at_ms: u64::from(state) * 7,
        earlier_reversal_sends: u32::from(state),
        created_ms: 1,
        updated_ms: 2,
        last_poll_outcome: 0,
        last_poll_ms: 0,
        polls: 0,
        timeout_ms: 500,
        timeline: (0..order)
            .map(|at| TimelineRecord {
                at_ms: at as u64,
                what: format!("event {at}"),
            })
            .collect(),
    };
    SagaRecord {
        coordinator_id: "c1".into(),
        sequence,
        business_type: "order".into(),
        mode: 1,
        content_type: String::new(),
        labels: BTreeMap::from([("state".into(), format!("{state}"))]),
        deadline_ms: 0,
        state,
        created_ms: 1,
        updated_ms: u64::from(state),
        request_id: format!("r{sequence}"),
        strategy_version: u64::from(state % 3),
        branches: (0..branches).map(branch).collect(),
        reported: vec![StepStatusRecord {
            step_id: "pay".into(),
            status: format!("{state}"),
        }],
        fired_rules: (0..state as u32 % 3).collect(),
        signal: state % 2,
        reason: String::new(),
        reversal_serials: Vec::new(),
        reversal_type: 0,
        reversal_target: String::new(),
    }
}

fn payload(marker: u8, len: usize) -> PayloadRecord {
    PayloadRecord {
        data: vec![marker; len],
        content_type: format!("type/{marker}"),
    }
}

fn strategy(business_type: usize, version: u64, marker: u8) -> StrategyRecord {
    StrategyRecord {
        business_type: BUSINESS_TYPES[business_type].into(),
        version,
        description: format!("marker {marker}"),
        steps: vec![StepRecord {
            id: "pay".into(),
            node_id: "node-a".into(),
            forward_action: "pay".into(),
            reversal_action: "refund".into(),
            timeout_ms: u64::from(marker),
        }],
        first_set: vec!["pay".into()],
        rules: vec![RuleRecord {
            when: Vec::new(),
            trigger: vec!["pay".into()],
        }],
        end_statuses: Vec::new(),
        abnormal_statuses: Vec::new(),
        status_mappings: Vec::new(),
        exception_scopes: Vec::new(),
        saga_timeout_ms: 0,
        created_ms: u64::from(marker),
    }
}

fn node(node: usize, marker: u8) -> NodeRecord {
    NodeRecord {
        node_id: NODE_IDS[node].into(),
        endpoint: if marker.is_multiple_of(4) {
            String::new()
        } else {
            format!("http://127.0.0.1:{marker}")
        },
        updated_ms: u64::from(marker),
    }
}

fn retry_config(version: u64, marker: u8) -> RetryConfigRecord {
    RetryConfigRecord {
        version,
        defaults: RetryPolicyRecord {
            retryable_codes: Some(vec!["TIMEOUT".into()]),
            max_retries: Some(u32::from(marker)),
            min_interval_ms: None,
            backoff_factor_milli: Some(2_000),
            max_interval_ms: None,
        },
        transactions: Vec::new(),
        channels: Vec::new(),
        updated_ms: u64::from(marker),
    }
}

fn retry_history(serial: usize, attempts: usize) -> RetryHistoryRecord {
    RetryHistoryRecord {
        original_serial: SERIALS[serial].into(),
        transaction_code: "T1".into(),
        attempts: (0..attempts)
            .map(|attempt| RetryAttemptRecord {
                retry_serial: format!("{}-{attempt}", SERIALS[serial]),
                attempt: attempt as u32 + 1,
                error_code: "TIMEOUT".into(),
                channel: "c".into(),
                decision: 1,
                decided_ms: attempt as u64,
                config_version: 1,
            })
            .collect(),
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
        // Every kind of lease, so the model stores each shape of the current version.
        lease_kind: (attempts % 3) as u8,
        processing_lease_ms: u64::from(attempts) * 1_000,
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

fn due(timer: u8, sequence: u64) -> DueRecord {
    DueRecord {
        gsn_sequence: sequence,
        timer: vec![timer],
    }
}

/// One call inside a write job, as generated (picks not yet resolved against the model).
#[derive(Debug, Clone)]
enum Step {
    PutSaga {
        sequence: u64,
        state: u8,
        branches: usize,
    },
    ReadSaga {
        sequence: u64,
    },
    /// Removes the saga and its payloads (retention).
    DeleteSaga {
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
    /// A timer of saga `sequence`.
    Schedule {
        at_ms: u64,
        timer: u8,
        sequence: u64,
    },
    Cancel {
        pick: Index,
    },
    /// Every pending timer of one saga (it ended).
    CancelSagaTimers {
        sequence: u64,
    },
    PutPayload {
        sequence: u64,
        branch: usize,
        marker: u8,
        len: usize,
    },
    ReadPayload {
        sequence: u64,
        branch: usize,
    },
    PutStrategy {
        business_type: usize,
        version: u64,
        marker: u8,
    },
    /// Version 0 reads the latest.
    ReadStrategy {
        business_type: usize,
        version: u64,
    },
    PutNode {
        node: usize,
        marker: u8,
    },
    ReadNode {
        node: usize,
    },
    PutRetryConfig {
        version: u64,
        marker: u8,
    },
    ReadRetryConfig,
    PutRetryHistory {
        serial: usize,
        attempts: usize,
    },
    ReadRetryHistory {
        serial: usize,
    },
    PutRetryLink {
        retry: usize,
        original: usize,
    },
    ReadRetryOriginal {
        retry: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Commit,
    /// Returns `Err` after doing all its steps.
    Reject,
    /// Panics after doing all its steps.
    Panic,
}

#[derive(Debug, Clone)]
enum Op {
    /// A write job; `commit: false` returns `Err` after doing all its steps.
    Write { steps: Vec<Step>, commit: bool },
    /// Several write jobs queued at once behind a slow one, so the writer runs them in one
    /// group: each must see the committed jobs before it, and none a failed one's writes.
    Group { jobs: Vec<(Vec<Step>, Fate)> },
    /// Reopen the same folder, after `close` or after just dropping the handle.
    Restart { graceful: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1..6u64, any::<u8>(), 0..4usize)
            .prop_map(|(sequence, state, branches)| Step::PutSaga { sequence, state, branches }),
        1 => (1..6u64).prop_map(|sequence| Step::ReadSaga { sequence }),
        1 => (1..4u64).prop_map(|sequence| Step::DeleteSaga { sequence }),
        2 => Just(Step::AllocateGsn),
        3 => (0..5usize, prop_oneof![1 => Just(0u64), 3 => 1..50u64], 0..9u32)
            .prop_map(|(key, expires_ms, attempts)| Step::PutIdempotency { key, expires_ms, attempts }),
        1 => (0..5usize).prop_map(|key| Step::DeleteIdempotency { key }),
        1 => (0..5usize).prop_map(|key| Step::ReadIdempotency { key }),
        2 => (0..60u64, 0..4usize).prop_map(|(now_ms, limit)| Step::CollectExpired { now_ms, limit }),
        2 => (0..9u32).prop_map(|attempts| Step::PushOutbox { attempts }),
        1 => (any::<Index>(), 0..9u32).prop_map(|(pick, attempts)| Step::PutOutbox { pick, attempts }),
        1 => any::<Index>().prop_map(|pick| Step::DeleteOutbox { pick }),
        2 => (0..50u64, any::<u8>(), 1..4u64)
            .prop_map(|(at_ms, timer, sequence)| Step::Schedule { at_ms, timer, sequence }),
        1 => (1..4u64).prop_map(|sequence| Step::CancelSagaTimers { sequence }),
        1 => any::<Index>().prop_map(|pick| Step::Cancel { pick }),
        2 => (1..4u64, 0..3usize, any::<u8>(), prop_oneof![6 => 0..40usize, 1 => 150_000..160_000usize])
            .prop_map(|(sequence, branch, marker, len)| Step::PutPayload { sequence, branch, marker, len }),
        1 => (1..4u64, 0..3usize).prop_map(|(sequence, branch)| Step::ReadPayload { sequence, branch }),
        3 => (0..5usize, 1..4u64, any::<u8>())
            .prop_map(|(business_type, version, marker)| Step::PutStrategy { business_type, version, marker }),
        2 => (0..5usize, prop_oneof![2 => Just(0u64), 1 => 1..5u64])
            .prop_map(|(business_type, version)| Step::ReadStrategy { business_type, version }),
        1 => (0..4usize, any::<u8>()).prop_map(|(node, marker)| Step::PutNode { node, marker }),
        1 => (0..4usize).prop_map(|node| Step::ReadNode { node }),
        2 => (1..4u64, any::<u8>()).prop_map(|(version, marker)| Step::PutRetryConfig { version, marker }),
        1 => Just(Step::ReadRetryConfig),
        1 => (0..4usize, 0..3usize).prop_map(|(serial, attempts)| Step::PutRetryHistory { serial, attempts }),
        1 => (0..4usize).prop_map(|serial| Step::ReadRetryHistory { serial }),
        1 => (0..4usize, 0..4usize).prop_map(|(retry, original)| Step::PutRetryLink { retry, original }),
        1 => (0..4usize).prop_map(|retry| Step::ReadRetryOriginal { retry }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        7 => (prop::collection::vec(step(), 1..5), Just(true)).prop_map(|(steps, commit)| Op::Write { steps, commit }),
        2 => prop::collection::vec(step(), 1..5).prop_map(|steps| Op::Write { steps, commit: false }),
        3 => prop::collection::vec((prop::collection::vec(step(), 1..4), fate()), 2..5)
            .prop_map(|jobs| Op::Group { jobs }),
        1 => any::<bool>().prop_map(|graceful| Op::Restart { graceful }),
    ]
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![5 => Just(Fate::Commit), 2 => Just(Fate::Reject), 1 => Just(Fate::Panic)]
}

/// A step with its picks resolved to concrete ids (one past the largest id when the model has
/// none, so deleting a missing entry is covered too).
#[derive(Debug, Clone)]
enum Resolved {
    PutSaga(SagaRecord),
    ReadSaga(u64),
    DeleteSaga(u64),
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
    CancelSagaTimers(u64),
    PutPayload(u64, &'static str, PayloadRecord),
    ReadPayload(u64, &'static str),
    PutStrategy(StrategyRecord),
    ReadStrategy(&'static str, u64),
    PutNode(NodeRecord),
    ReadNode(&'static str),
    PutRetryConfig(RetryConfigRecord),
    ReadRetryConfig,
    PutRetryHistory(RetryHistoryRecord),
    ReadRetryHistory(&'static str),
    PutRetryLink(&'static str, &'static str),
    ReadRetryOriginal(&'static str),
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
    Payload(Option<PayloadRecord>),
    Strategy(Option<StrategyRecord>),
    Node(Option<NodeRecord>),
    RetryConfig(Option<RetryConfigRecord>),
    RetryHistory(Option<RetryHistoryRecord>),
    RetryOriginal(Option<String>),
    Failed(String),
}

#[derive(Debug, Clone, Default)]
struct Model {
    sagas: BTreeMap<u64, SagaRecord>,
    /// Keyed by the stored key bytes, which is the order collection follows among equals.
    idempotency: BTreeMap<Vec<u8>, IdempotencyRecord>,
    outbox: BTreeMap<u64, OutboxRecord>,
    due: BTreeMap<DueKey, DueRecord>,
    payloads: BTreeMap<(u64, &'static str), PayloadRecord>,
    strategies: BTreeMap<(&'static str, u64), StrategyRecord>,
    nodes: BTreeMap<&'static str, NodeRecord>,
    retry_configs: BTreeMap<u64, RetryConfigRecord>,
    retry_history: BTreeMap<&'static str, RetryHistoryRecord>,
    retry_links: BTreeMap<&'static str, &'static str>,
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
                branches,
            } => Resolved::PutSaga(saga(*sequence, *state, *branches)),
            Step::ReadSaga { sequence } => Resolved::ReadSaga(*sequence),
            Step::DeleteSaga { sequence } => Resolved::DeleteSaga(*sequence),
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
            Step::Schedule {
                at_ms,
                timer,
                sequence,
            } => Resolved::Schedule(*at_ms, due(*timer, *sequence)),
            Step::Cancel { pick } => Resolved::Cancel(self.pick_due(pick)),
            Step::CancelSagaTimers { sequence } => Resolved::CancelSagaTimers(*sequence),
            Step::PutPayload {
                sequence,
                branch,
                marker,
                len,
            } => Resolved::PutPayload(*sequence, BRANCH_IDS[*branch], payload(*marker, *len)),
            Step::ReadPayload { sequence, branch } => {
                Resolved::ReadPayload(*sequence, BRANCH_IDS[*branch])
            }
            Step::PutStrategy {
                business_type,
                version,
                marker,
            } => Resolved::PutStrategy(strategy(*business_type, *version, *marker)),
            Step::ReadStrategy {
                business_type,
                version,
            } => Resolved::ReadStrategy(BUSINESS_TYPES[*business_type], *version),
            Step::PutNode { node: id, marker } => Resolved::PutNode(node(*id, *marker)),
            Step::ReadNode { node } => Resolved::ReadNode(NODE_IDS[*node]),
            Step::PutRetryConfig { version, marker } => {
                Resolved::PutRetryConfig(retry_config(*version, *marker))
            }
            Step::ReadRetryConfig => Resolved::ReadRetryConfig,
            Step::PutRetryHistory { serial, attempts } => {
                Resolved::PutRetryHistory(retry_history(*serial, *attempts))
            }
            Step::ReadRetryHistory { serial } => Resolved::ReadRetryHistory(SERIALS[*serial]),
            Step::PutRetryLink { retry, original } => {
                Resolved::PutRetryLink(SERIALS[*retry], SERIALS[*original])
            }
            Step::ReadRetryOriginal { retry } => Resolved::ReadRetryOriginal(SERIALS[*retry]),
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
            Resolved::DeleteSaga(sequence) => {
                self.sagas.remove(sequence);
                self.payloads.retain(|(of, _), _| of != sequence);
                self.due
                    .retain(|_, record| record.gsn_sequence != *sequence);
                Outcome::Done
            }
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
            Resolved::CancelSagaTimers(sequence) => {
                let before = self.due.len();
                self.due
                    .retain(|_, record| record.gsn_sequence != *sequence);
                Outcome::Collected(before - self.due.len())
            }
            Resolved::PutPayload(sequence, branch, record) => {
                self.payloads.insert((*sequence, branch), record.clone());
                Outcome::Done
            }
            Resolved::ReadPayload(sequence, branch) => {
                Outcome::Payload(self.payloads.get(&(*sequence, branch)).cloned())
            }
            Resolved::PutStrategy(record) => {
                let business_type = BUSINESS_TYPES
                    .into_iter()
                    .find(|&t| t == record.business_type)
                    .unwrap();
                self.strategies
                    .insert((business_type, record.version), record.clone());
                Outcome::Done
            }
            Resolved::ReadStrategy(business_type, version) => {
                Outcome::Strategy(self.strategy(business_type, *version))
            }
            Resolved::PutNode(record) => {
                let id = NODE_IDS.into_iter().find(|&n| n == record.node_id).unwrap();
                self.nodes.insert(id, record.clone());
                Outcome::Done
            }
            Resolved::ReadNode(id) => Outcome::Node(self.nodes.get(id).cloned()),
            Resolved::PutRetryConfig(record) => {
                self.retry_configs.insert(record.version, record.clone());
                Outcome::Done
            }
            Resolved::ReadRetryConfig => Outcome::RetryConfig(self.latest_retry_config()),
            Resolved::PutRetryHistory(record) => {
                let serial = SERIALS
                    .into_iter()
                    .find(|&s| s == record.original_serial)
                    .unwrap();
                self.retry_history.insert(serial, record.clone());
                Outcome::Done
            }
            Resolved::ReadRetryHistory(serial) => {
                Outcome::RetryHistory(self.retry_history.get(serial).cloned())
            }
            Resolved::PutRetryLink(retry, original) => {
                self.retry_links.insert(retry, original);
                Outcome::Done
            }
            Resolved::ReadRetryOriginal(retry) => {
                Outcome::RetryOriginal(self.retry_links.get(retry).map(|o| o.to_string()))
            }
        };
        prop_assert_eq!(outcome, &expected, "step {:?}", step);
        Ok(())
    }

    /// Version 0 is the highest version of the business type.
    fn strategy(&self, business_type: &str, version: u64) -> Option<StrategyRecord> {
        let mut versions = self
            .strategies
            .iter()
            .filter(|((t, v), _)| *t == business_type && (version == 0 || *v == version));
        versions.next_back().map(|(_, record)| record.clone())
    }

    fn latest_retry_config(&self) -> Option<RetryConfigRecord> {
        self.retry_configs.values().next_back().cloned()
    }

    /// The latest version of each business type after `after`, in business-type order.
    fn latest_strategies(&self, after: Option<&str>) -> Vec<StrategyRecord> {
        let mut latest: BTreeMap<&str, &StrategyRecord> = BTreeMap::new();
        for ((business_type, _), record) in &self.strategies {
            if after.is_none_or(|after| *business_type > after) {
                latest.insert(business_type, record);
            }
        }
        latest.into_values().cloned().collect()
    }
}

fn run_step(tx: &mut sagad::store::WriteTx<'_>, step: &Resolved) -> Outcome {
    let outcome = match step {
        Resolved::PutSaga(record) => tx.put_saga(record).map(|()| Outcome::Done),
        Resolved::ReadSaga(sequence) => tx.saga(*sequence).map(Outcome::Saga),
        Resolved::DeleteSaga(sequence) => tx.delete_saga(*sequence).map(|()| Outcome::Done),
        Resolved::AllocateGsn => tx.allocate_gsn_sequence().map(Outcome::Gsn),
        Resolved::PutIdempotency(key, record) => {
            tx.put_idempotency(key, record).map(|()| Outcome::Done)
        }
        Resolved::DeleteIdempotency(key) => tx.delete_idempotency(key).map(|()| Outcome::Done),
        Resolved::ReadIdempotency(key) => tx.idempotency(key).map(Outcome::Idempotency),
        Resolved::CollectExpired { now_ms, limit } => tx
            .collect_expired_idempotency(*now_ms, *limit, &|_, _| Ok(None))
            .map(|collected| Outcome::Collected(collected.removed)),
        Resolved::PushOutbox(record) => tx.push_outbox(record).map(Outcome::OutboxId),
        Resolved::PutOutbox(id, record) => tx.put_outbox(*id, record).map(|()| Outcome::Done),
        Resolved::DeleteOutbox(id) => tx.delete_outbox(*id).map(|_| Outcome::Done),
        Resolved::Schedule(at_ms, record) => tx.schedule(*at_ms, record).map(Outcome::DueKey),
        Resolved::Cancel(key) => tx.cancel(*key).map(|()| Outcome::Done),
        Resolved::CancelSagaTimers(sequence) => {
            tx.cancel_saga_timers(*sequence).map(Outcome::Collected)
        }
        Resolved::PutPayload(sequence, branch, record) => tx
            .put_payload(*sequence, branch, record)
            .map(|()| Outcome::Done),
        Resolved::ReadPayload(sequence, branch) => {
            tx.payload(*sequence, branch).map(Outcome::Payload)
        }
        Resolved::PutStrategy(record) => tx.put_strategy(record).map(|()| Outcome::Done),
        Resolved::ReadStrategy(business_type, version) => {
            tx.strategy(business_type, *version).map(Outcome::Strategy)
        }
        Resolved::PutNode(record) => tx.put_node(record).map(|()| Outcome::Done),
        Resolved::ReadNode(id) => tx.node(id).map(Outcome::Node),
        Resolved::PutRetryConfig(record) => tx.put_retry_config(record).map(|()| Outcome::Done),
        Resolved::ReadRetryConfig => tx.retry_config().map(Outcome::RetryConfig),
        Resolved::PutRetryHistory(record) => tx.put_retry_history(record).map(|()| Outcome::Done),
        Resolved::ReadRetryHistory(serial) => tx.retry_history(serial).map(Outcome::RetryHistory),
        Resolved::PutRetryLink(retry, original) => {
            tx.put_retry_link(retry, original).map(|()| Outcome::Done)
        }
        Resolved::ReadRetryOriginal(retry) => tx.retry_original(retry).map(Outcome::RetryOriginal),
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
    payloads: Vec<Option<PayloadRecord>>,
    /// Every (business type, version 0..=4) pair, version 0 being the latest.
    strategies: Vec<Option<StrategyRecord>>,
    latest_strategies: Vec<StrategyRecord>,
    latest_strategies_after_a: Vec<StrategyRecord>,
    nodes: Vec<NodeRecord>,
    node_reads: Vec<Option<NodeRecord>>,
    retry_config: Option<RetryConfigRecord>,
    retry_history: Vec<Option<RetryHistoryRecord>>,
    retry_originals: Vec<Option<String>>,
}

fn payload_ids() -> impl Iterator<Item = (u64, &'static str)> {
    (1..4).flat_map(|sequence| BRANCH_IDS.map(|branch| (sequence, branch)))
}

fn strategy_ids() -> impl Iterator<Item = (&'static str, u64)> {
    BUSINESS_TYPES
        .into_iter()
        .flat_map(|business_type| (0..5).map(move |version| (business_type, version)))
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
            payloads: payload_ids()
                .map(|id| self.payloads.get(&id).cloned())
                .collect(),
            strategies: strategy_ids()
                .map(|(business_type, version)| self.strategy(business_type, version))
                .collect(),
            latest_strategies: self.latest_strategies(None),
            latest_strategies_after_a: self.latest_strategies(Some("a")),
            nodes: self.nodes.values().cloned().collect(),
            node_reads: NODE_IDS
                .iter()
                .map(|id| self.nodes.get(id).cloned())
                .collect(),
            retry_config: self.latest_retry_config(),
            retry_history: SERIALS
                .iter()
                .map(|s| self.retry_history.get(s).cloned())
                .collect(),
            retry_originals: SERIALS
                .iter()
                .map(|s| self.retry_links.get(s).map(|o| o.to_string()))
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
                payloads: payload_ids()
                    .map(|(sequence, branch)| tx.payload(sequence, branch).unwrap())
                    .collect(),
                strategies: strategy_ids()
                    .map(|(business_type, version)| tx.strategy(business_type, version).unwrap())
                    .collect(),
                latest_strategies: tx
                    .latest_strategies(None)
                    .collect::<Result<_, _>>()
                    .unwrap(),
                latest_strategies_after_a: tx
                    .latest_strategies(Some("a"))
                    .collect::<Result<_, _>>()
                    .unwrap(),
                nodes: tx.nodes().collect::<Result<_, _>>().unwrap(),
                node_reads: NODE_IDS.iter().map(|id| tx.node(id).unwrap()).collect(),
                retry_config: tx.retry_config().unwrap(),
                retry_history: SERIALS
                    .iter()
                    .map(|s| tx.retry_history(s).unwrap())
                    .collect(),
                retry_originals: SERIALS
                    .iter()
                    .map(|s| tx.retry_original(s).unwrap())
                    .collect(),
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
            Op::Group { jobs } => {
                let live = store.as_ref().unwrap();
                // The first job holds the writer until the rest are queued behind it.
                let hold = live.write(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    Ok::<(), ()>(())
                });
                let resolved: Vec<(Vec<Resolved>, Fate)> = jobs
                    .iter()
                    .map(|(steps, fate)| (steps.iter().map(|s| model.resolve(s)).collect(), *fate))
                    .collect();
                let writes = resolved.iter().cloned().map(|(job, fate)| {
                    live.write(move |tx| {
                        let outcomes: Vec<Outcome> =
                            job.iter().map(|step| run_step(tx, step)).collect();
                        match fate {
                            Fate::Commit => Ok(outcomes),
                            Fate::Reject => Err(outcomes),
                            Fate::Panic => panic!("a failing job"),
                        }
                    })
                });
                let (held, answers) =
                    rt.block_on(async { futures::join!(hold, futures::future::join_all(writes)) });
                held.unwrap().unwrap();
                for ((steps, fate), answer) in resolved.iter().zip(answers) {
                    let outcomes = match (answer, fate) {
                        (Ok(Ok(outcomes)), Fate::Commit) | (Ok(Err(outcomes)), Fate::Reject) => {
                            outcomes
                        }
                        (Err(sagad::store::Error::Panicked(_)), Fate::Panic) => continue,
                        (answer, _) => {
                            return Err(TestCaseError::fail(format!(
                                "{fate:?} but the job answered {answer:?}"
                            )));
                        }
                    };
                    let mut after = model.clone();
                    for (step, outcome) in steps.iter().zip(&outcomes) {
                        after.apply(step, outcome)?;
                    }
                    if *fate == Fate::Commit {
                        model = after;
                    }
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
            steps: vec![
                Step::AllocateGsn,
                Step::Schedule {
                    at_ms: 5,
                    timer: 1,
                    sequence: 7,
                },
            ],
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

/// "Latest" reads inside a job see the job's own puts: a new highest version is the latest at
/// once, a lower one is not, and after a rejected job the stored latest is back.
#[test]
fn latest_reads_inside_a_job_see_its_own_writes() {
    let put_strategy = |version, marker| Step::PutStrategy {
        business_type: 1,
        version,
        marker,
    };
    let latest_strategy = Step::ReadStrategy {
        business_type: 1,
        version: 0,
    };
    let put_config = |version, marker| Step::PutRetryConfig { version, marker };
    let ops = vec![
        Op::Write {
            steps: vec![
                latest_strategy.clone(),
                Step::ReadRetryConfig,
                put_strategy(2, 1),
                put_config(2, 1),
                latest_strategy.clone(),
                Step::ReadRetryConfig,
            ],
            commit: true,
        },
        Op::Write {
            steps: vec![
                put_strategy(1, 2),
                put_config(1, 2),
                latest_strategy.clone(),
                Step::ReadRetryConfig,
                put_strategy(3, 3),
                put_config(3, 3),
                latest_strategy.clone(),
                Step::ReadRetryConfig,
                // A neighbouring business type whose key sorts right after this one's.
                Step::PutStrategy {
                    business_type: 2,
                    version: 5,
                    marker: 4,
                },
                latest_strategy.clone(),
            ],
            commit: false,
        },
        Op::Restart { graceful: false },
        Op::Write {
            steps: vec![
                latest_strategy.clone(),
                Step::ReadRetryConfig,
                // Rewriting the stored latest version: the job's value replaces the tree's.
                put_strategy(2, 9),
                put_config(2, 9),
                latest_strategy.clone(),
                Step::ReadRetryConfig,
                Step::ReadStrategy {
                    business_type: 1,
                    version: 2,
                },
            ],
            commit: true,
        },
    ];
    run(ops).unwrap();
}
