//! The idempotence detection table's rules (S3, steps S11–S17) over one record: what a request
//! finds when it looks up its serial number, and what finishing it stores.
//!
//! S14/S15 ("registration failed because another request registered the same serial
//! concurrently: query again") have no race window here: every lookup-and-register runs inside
//! one ledger write, and the ledger runs writes one at a time, so the second of two concurrent
//! requests always *finds* the first one's record at S12 and is judged by S16/S17.

use crate::domain::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Registered (S13), not yet finished.
    Processing,
    /// Finished: result and response stored.
    Done,
}

/// The processing lease a PROCESSING record holds. It is the lease given when the record was
/// registered or last taken over, never a later asker's: otherwise a caller with a short lease
/// could take over work that its owner, given a long one, is still doing, and both would run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Registered by a sagad that did not keep the lease: judged by each asker's lease, exactly
    /// as that sagad judged it, so records it left behave as they did.
    Unrecorded,
    /// Never taken over: barrier registrations, and sagad's own writes.
    Never,
    /// Taken over by the next caller once PROCESSING this long since its last change.
    After(Millis),
}

impl Lease {
    /// The lease a registration made with `terms` holds.
    pub fn given(terms: Terms) -> Lease {
        terms.processing_lease_ms.map_or(Lease::Never, Lease::After)
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Digest of the request body; empty when the caller gave none (then bodies are not compared).
    pub fingerprint: Vec<u8>,
    pub state: RecordState,
    pub result: String,
    pub response: Vec<u8>,
    pub content_type: String,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    /// When the record may be collected; 0 = never.
    pub expires_ms: Millis,
    pub attempts: u32,
    /// The lease given at registration or at the last takeover.
    pub lease: Lease,
}

impl Record {
    /// Whether a PROCESSING record's holder is presumed gone at `now`: its lease ran out, so
    /// the next Begin takes the transaction over. A record that kept no lease is judged by
    /// `asker_lease_ms`, the lease of whoever asks (`None`: never expires).
    pub fn lease_expired(&self, now: Millis, asker_lease_ms: Option<Millis>) -> bool {
        let lease_ms = match self.lease {
            Lease::After(lease_ms) => Some(lease_ms),
            Lease::Never => None,
            Lease::Unrecorded => asker_lease_ms,
        };
        self.state == RecordState::Processing
            && lease_ms.is_some_and(|lease| now.saturating_sub(self.updated_ms) >= lease)
    }
}

/// What a request finds when it looks up its serial number (S12, S16, S17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not known, or its processing lease expired: register it (S13) and process it.
    Register(Record),
    /// Registered by another request that has not finished: answer "in progress" (S17).
    InProgress(Record),
    /// Finished: answer with the stored response, never process it again (S17).
    Replay(Record),
    /// The serial number was used before for a different request body.
    Mismatch,
}

/// How long records live, and how long a processing registration holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// A record expires this long after its last change; 0 = never.
    pub retention_ms: Millis,
    /// The lease this request asks for: a record it registers (or takes over) holds it, and a
    /// record that kept no lease (`Lease::Unrecorded`) is judged by it; `None` = never.
    pub processing_lease_ms: Option<Millis>,
}

fn expiry(now: Millis, terms: Terms) -> Millis {
    if terms.retention_ms == 0 {
        0
    } else {
        now.saturating_add(terms.retention_ms)
    }
}

fn fingerprints_differ(stored: &[u8], given: &[u8]) -> bool {
    !stored.is_empty() && !given.is_empty() && stored != given
}

/// S11–S13 and S16–S17: judge a request against what the table holds for its serial number.
pub fn on_lookup(
    existing: Option<&Record>,
    fingerprint: &[u8],
    terms: Terms,
    now: Millis,
) -> Lookup {
    let Some(record) = existing else {
        return Lookup::Register(Record {
            fingerprint: fingerprint.to_vec(),
            state: RecordState::Processing,
            result: String::new(),
            response: Vec::new(),
            content_type: String::new(),
            created_ms: now,
            updated_ms: now,
            expires_ms: expiry(now, terms),
            attempts: 1,
            lease: Lease::given(terms),
        });
    };
    if fingerprints_differ(&record.fingerprint, fingerprint) {
        return Lookup::Mismatch;
    }
    match record.state {
        RecordState::Done => Lookup::Replay(record.clone()),
        RecordState::Processing => {
            if record.lease_expired(now, terms.processing_lease_ms) {
                // The new holder's lease is the one its own Begin gave, as at a registration.
                Lookup::Register(Record {
                    updated_ms: now,
                    expires_ms: expiry(now, terms),
                    attempts: record.attempts.saturating_add(1),
                    lease: Lease::given(terms),
                    ..record.clone()
                })
            } else {
                Lookup::InProgress(record.clone())
            }
        }
    }
}

/// The answer to store for a request, given as Finish gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub result: String,
    pub response: Vec<u8>,
    pub content_type: String,
}

/// What finishing a registered request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Store this record: the request is done.
    Store(Record),
    /// It was already finished with the same answer: nothing to store (a repeated Finish).
    AlreadyDone(Record),
    /// Nothing was registered under this serial number (never begun, or collected).
    NotBegun,
    /// It was already finished with a different answer.
    Conflict(Record),
}

pub fn on_finish(existing: Option<&Record>, answer: Answer, terms: Terms, now: Millis) -> Finish {
    let Some(record) = existing else {
        return Finish::NotBegun;
    };
    match record.state {
        RecordState::Processing => Finish::Store(finished(record.clone(), answer, terms, now)),
        RecordState::Done => {
            let same = record.result == answer.result
                && record.response == answer.response
                && record.content_type == answer.content_type;
            if same {
                Finish::AlreadyDone(record.clone())
            } else {
                Finish::Conflict(record.clone())
            }
        }
    }
}

/// The record of a registered request once it is finished with `answer`. sagad's own RPCs
/// register and finish in the same ledger write, so they are never observed half done.
pub fn finished(registered: Record, answer: Answer, terms: Terms, now: Millis) -> Record {
    Record {
        state: RecordState::Done,
        result: answer.result,
        response: answer.response,
        content_type: answer.content_type,
        updated_ms: now,
        expires_ms: expiry(now, terms),
        ..registered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMS: Terms = Terms {
        retention_ms: 1_000,
        processing_lease_ms: None,
    };

    fn answer(text: &str) -> Answer {
        Answer {
            result: "SUCCEEDED".into(),
            response: text.as_bytes().to_vec(),
            content_type: String::new(),
        }
    }

    fn registered(now: Millis) -> Record {
        match on_lookup(None, b"body", TERMS, now) {
            Lookup::Register(record) => record,
            other => panic!("expected Register, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_serial_is_registered_as_processing() {
        let record = registered(10);
        assert_eq!(record.state, RecordState::Processing);
        assert_eq!(
            (record.created_ms, record.expires_ms, record.attempts),
            (10, 1_010, 1)
        );
    }

    #[test]
    fn a_repeat_while_processing_is_told_in_progress() {
        let record = registered(10);
        assert!(matches!(
            on_lookup(Some(&record), b"body", TERMS, 20),
            Lookup::InProgress(_)
        ));
    }

    #[test]
    fn a_repeat_after_finishing_gets_the_stored_response() {
        let record = registered(10);
        let Finish::Store(done) = on_finish(Some(&record), answer("gsn-1"), TERMS, 20) else {
            panic!("expected Store");
        };
        let Lookup::Replay(replayed) = on_lookup(Some(&done), b"body", TERMS, 30) else {
            panic!("expected Replay");
        };
        assert_eq!(replayed.response, b"gsn-1");
    }

    #[test]
    fn a_serial_reused_for_another_body_is_refused() {
        let record = registered(10);
        assert_eq!(
            on_lookup(Some(&record), b"other", TERMS, 20),
            Lookup::Mismatch
        );
    }

    #[test]
    fn bodies_are_not_compared_when_no_fingerprint_was_given() {
        let record = match on_lookup(None, b"", TERMS, 10) {
            Lookup::Register(record) => record,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            on_lookup(Some(&record), b"any", TERMS, 20),
            Lookup::InProgress(_)
        ));
    }

    #[test]
    fn an_expired_processing_lease_is_taken_over() {
        let terms = Terms {
            processing_lease_ms: Some(100),
            ..TERMS
        };
        // The lease is the one the registration gave (see `Lease`), so it registers with it.
        let Lookup::Register(record) = on_lookup(None, b"body", terms, 10) else {
            panic!("expected Register");
        };
        assert!(matches!(
            on_lookup(Some(&record), b"body", terms, 109),
            Lookup::InProgress(_)
        ));
        let Lookup::Register(taken) = on_lookup(Some(&record), b"body", terms, 110) else {
            panic!("expected takeover");
        };
        assert_eq!(
            (taken.attempts, taken.created_ms, taken.updated_ms),
            (2, 10, 110)
        );
    }

    #[test]
    fn a_processing_record_is_judged_by_the_lease_it_was_registered_with_not_the_askers() {
        let long = Terms {
            processing_lease_ms: Some(60_000),
            ..TERMS
        };
        let short = Terms {
            processing_lease_ms: Some(1_000),
            ..TERMS
        };
        let Lookup::Register(record) = on_lookup(None, b"body", long, 10) else {
            panic!("expected Register");
        };
        assert_eq!(record.lease, Lease::After(60_000));
        // A later caller's shorter lease does not shorten the holder's.
        assert!(matches!(
            on_lookup(Some(&record), b"body", short, 2_010),
            Lookup::InProgress(_)
        ));
        // Nor does asking with no lease lengthen it.
        let Lookup::Register(taken) = on_lookup(Some(&record), b"body", TERMS, 60_010) else {
            panic!("expected takeover once the registered lease ran out");
        };
        // The taker holds the lease it asked for: none, so nobody takes it over again.
        assert_eq!((taken.attempts, taken.lease), (2, Lease::Never));
        assert!(matches!(
            on_lookup(Some(&taken), b"body", short, u64::MAX),
            Lookup::InProgress(_)
        ));
    }

    #[test]
    fn a_record_registered_without_a_lease_is_never_taken_over() {
        let record = registered(10);
        assert_eq!(record.lease, Lease::Never);
        let tiny = Terms {
            processing_lease_ms: Some(1),
            ..TERMS
        };
        assert!(matches!(
            on_lookup(Some(&record), b"body", tiny, 1_000_000),
            Lookup::InProgress(_)
        ));
    }

    #[test]
    fn a_record_that_kept_no_lease_is_judged_by_the_askers_lease() {
        let record = Record {
            lease: Lease::Unrecorded,
            ..registered(10)
        };
        let lease = Terms {
            processing_lease_ms: Some(100),
            ..TERMS
        };
        assert!(matches!(
            on_lookup(Some(&record), b"body", lease, 109),
            Lookup::InProgress(_)
        ));
        assert!(matches!(
            on_lookup(Some(&record), b"body", TERMS, 1_000_000),
            Lookup::InProgress(_)
        ));
        let Lookup::Register(taken) = on_lookup(Some(&record), b"body", lease, 110) else {
            panic!("expected takeover");
        };
        assert_eq!(taken.lease, Lease::After(100));
    }

    #[test]
    fn finishing_twice_with_the_same_answer_is_harmless_and_with_another_is_a_conflict() {
        let Finish::Store(done) = on_finish(Some(&registered(10)), answer("a"), TERMS, 20) else {
            panic!("expected Store");
        };
        assert!(matches!(
            on_finish(Some(&done), answer("a"), TERMS, 30),
            Finish::AlreadyDone(_)
        ));
        assert!(matches!(
            on_finish(Some(&done), answer("b"), TERMS, 30),
            Finish::Conflict(_)
        ));
    }

    #[test]
    fn finishing_what_was_never_begun_is_refused() {
        assert_eq!(on_finish(None, answer("a"), TERMS, 30), Finish::NotBegun);
    }

    #[test]
    fn zero_retention_never_expires() {
        let terms = Terms {
            retention_ms: 0,
            processing_lease_ms: None,
        };
        let Lookup::Register(record) = on_lookup(None, b"", terms, 10) else {
            panic!()
        };
        assert_eq!(record.expires_ms, 0);
    }
}
