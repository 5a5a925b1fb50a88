//! The participants' branch barrier as pure rules: each branch action runs at most once, a
//! reversal of what never ran is a null compensation, and a forward action after its reversal
//! is refused (hanging). No clock, no I/O: the caller reads both records of the branch, passes
//! `now`, and stores what the decision says, all in one ledger write.
//!
//! A branch on one node has two records in the idempotence table (S3): the forward action's and
//! the reversal action's. The barrier judges a Guard call over both at once, because the rules
//! that matter cross them: a reversal record of any kind refuses the forward action, and a
//! reversal is only run after its forward action finished.

use crate::domain::idempotency::{self, Answer, Lease, Record, RecordState, Terms};
use crate::domain::ids::{Gsn, RequestId, command_sequence};
use crate::domain::{Millis, Violation};

/// Which action of a branch a Guard call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Forward,
    Reversal,
}

/// The result stored on the reversal record of a branch whose forward action never ran. It is
/// the tombstone that makes a late forward action HANGING.
pub const NULL_COMPENSATION: &str = "NULL_COMPENSATION";

/// The result that marks an action as failed with nothing done (or, for a reversal, nothing
/// undone): a Guard of that action for a new command (another command id) runs it again.
pub const FAILED: &str = "FAILED";

/// What the participant is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Proceed,
    Duplicate,
    InProgress,
    NullCompensation,
    Hanging,
}

/// The barrier's decision. Each variant holds the record the participant is shown; `write`
/// says which record, if any, must be stored with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `registered` (PROCESSING) is stored under `action`'s key; the participant runs the
    /// action and finishes the record.
    Proceed { action: Action, registered: Record },
    /// `action` already finished: the participant answers with `done.response`.
    Duplicate { action: Action, done: Record },
    /// `action` is registered and not finished: the asked action itself, or, for a reversal,
    /// the forward action still running. Nothing runs now; the participant is asked again.
    InProgress { action: Action, running: Record },
    /// The forward action never ran: `tombstone` (DONE, result NULL_COMPENSATION) is stored
    /// under the reversal's key and nothing runs.
    NullCompensation { tombstone: Record },
    /// A reversal record exists, so the forward action must never run.
    Hanging { reversal: Record },
}

impl Decision {
    pub fn verdict(&self) -> Verdict {
        match self {
            Decision::Proceed { .. } => Verdict::Proceed,
            Decision::Duplicate { .. } => Verdict::Duplicate,
            Decision::InProgress { .. } => Verdict::InProgress,
            Decision::NullCompensation { .. } => Verdict::NullCompensation,
            Decision::Hanging { .. } => Verdict::Hanging,
        }
    }

    /// The record to store, and which action's key it goes under; `None`: nothing changes.
    pub fn write(&self) -> Option<(Action, &Record)> {
        match self {
            Decision::Proceed { action, registered } => Some((*action, registered)),
            Decision::NullCompensation { tombstone } => Some((Action::Reversal, tombstone)),
            Decision::Duplicate { .. } | Decision::InProgress { .. } | Decision::Hanging { .. } => {
                None
            }
        }
    }

    /// The record the verdict is about, and which action's key it lives under: what the
    /// participant is shown (and, after PROCEED, what it finishes).
    pub fn shown(&self) -> (Action, &Record) {
        match self {
            Decision::Proceed { action, registered } => (*action, registered),
            Decision::Duplicate { action, done } => (*action, done),
            Decision::InProgress { action, running } => (*action, running),
            Decision::NullCompensation { tombstone } => (Action::Reversal, tombstone),
            Decision::Hanging { reversal } => (Action::Reversal, reversal),
        }
    }
}

/// A Guard call: judge `asked` over the branch's two records.
///
/// The barrier never takes over a PROCESSING registration (`terms.processing_lease_ms` is not
/// consulted): running an action twice is exactly what it exists to prevent, so only the
/// participant's Finish, or the record's retention, ends a registration.
///
/// `sent_as` is the command id of the Execute or Reverse being guarded, exactly as sagad sent
/// it ("" when the participant did not give it). A run is registered under it, so that an
/// action Finished FAILED runs again only for a new command (a new send: a retry, or for a
/// reversal ReprocessSaga), never for a redelivery of the command that failed, which keeps
/// its id.
pub fn on_guard(
    asked: Action,
    forward: Option<&Record>,
    reversal: Option<&Record>,
    sent_as: &str,
    terms: Terms,
    now: Millis,
) -> Decision {
    match asked {
        Action::Forward => on_forward_guarded(forward, reversal, sent_as, terms, now),
        Action::Reversal => on_reversal_guarded(forward, reversal, sent_as, terms, now),
    }
}

fn on_forward_guarded(
    forward: Option<&Record>,
    reversal: Option<&Record>,
    sent_as: &str,
    terms: Terms,
    now: Millis,
) -> Decision {
    // Checked first: once a reversal was asked for, in any state, running the forward action
    // would leave an effect nobody will reverse (the "hanging" transaction).
    if let Some(reversal) = reversal {
        return Decision::Hanging {
            reversal: reversal.clone(),
        };
    }
    match forward {
        None => Decision::Proceed {
            action: Action::Forward,
            registered: registered_as(sent_as, terms, now),
        },
        Some(record) => match record.state {
            // A forward action Finished FAILED did nothing. A new Execute is sagad's retry
            // policy sending the step again (it judged the error_code retryable); answering it
            // from the failed record would spend every retry without running the action once.
            RecordState::Done if runs_again(record, sent_as) => Decision::Proceed {
                action: Action::Forward,
                registered: registered_again(record, sent_as, terms, now),
            },
            RecordState::Done => Decision::Duplicate {
                action: Action::Forward,
                done: record.clone(),
            },
            RecordState::Processing => Decision::InProgress {
                action: Action::Forward,
                running: record.clone(),
            },
        },
    }
}

fn on_reversal_guarded(
    forward: Option<&Record>,
    reversal: Option<&Record>,
    sent_as: &str,
    terms: Terms,
    now: Millis,
) -> Decision {
    if let Some(record) = reversal {
        return match record.state {
            // A reversal Finished FAILED undid nothing (that is what the result must mean for a
            // reversal). A new Reverse (another command id) is sagad trying again: its retry
            // policy's resend, or an operator's ReprocessSaga; answering it from the failed
            // record would fail every later attempt too, leaving the saga needing an operator
            // who can do nothing about it. A redelivery of the Reverse that failed keeps its
            // id and is answered from the record, or a slow reversal would run again on every
            // redelivery, outside the retry policy.
            RecordState::Done if runs_again(record, sent_as) => Decision::Proceed {
                action: Action::Reversal,
                registered: registered_again(record, sent_as, terms, now),
            },
            RecordState::Done => Decision::Duplicate {
                action: Action::Reversal,
                done: record.clone(),
            },
            RecordState::Processing => Decision::InProgress {
                action: Action::Reversal,
                running: record.clone(),
            },
        };
    }
    match forward {
        // Nothing ran, so nothing is undone; the stored record doubles as the tombstone that
        // refuses the forward action if it arrives later.
        None => Decision::NullCompensation {
            tombstone: idempotency::finished(
                registered(terms, now),
                Answer {
                    result: NULL_COMPENSATION.to_owned(),
                    response: Vec::new(),
                    content_type: String::new(),
                },
                terms,
                now,
            ),
        },
        Some(record) => match record.state {
            // The forward action is running now: reversing half-done work would undo what is
            // not there yet, and a tombstone would contradict a forward that then finishes.
            RecordState::Processing => Decision::InProgress {
                action: Action::Forward,
                running: record.clone(),
            },
            RecordState::Done => Decision::Proceed {
                action: Action::Reversal,
                registered: registered_as(sent_as, terms, now),
            },
        },
    }
}

/// Whether a finished action runs again for the command `sent_as`: only one Finished FAILED
/// (nothing took effect), and only for a command sagad issued after the one it last ran for.
/// A redelivery keeps its id, and a copy of an older command that comes late (a node working
/// on its commands concurrently) has a lower number, so neither runs it again. Without both
/// ids (a Guard that does not say which command it guards, a run registered without one, or
/// an id sagad did not issue) a resend cannot be told from a redelivery, so FAILED is final.
fn runs_again(record: &Record, sent_as: &str) -> bool {
    let ran_for = std::str::from_utf8(&record.fingerprint)
        .ok()
        .and_then(command_sequence);
    record.result == FAILED
        && matches!((ran_for, command_sequence(sent_as)), (Some(ran), Some(new)) if new > ran)
}

/// The registration of a run after a failed one: the record keeps its first registration's
/// time and counts the run.
fn registered_again(failed: &Record, sent_as: &str, terms: Terms, now: Millis) -> Record {
    Record {
        created_ms: failed.created_ms,
        attempts: failed.attempts.saturating_add(1),
        ..registered_as(sent_as, terms, now)
    }
}

/// A run's registration, keeping the command id it runs for where Begin's records keep a
/// request digest (the barrier's records have none, and no Begin ever reads them).
fn registered_as(sent_as: &str, terms: Terms, now: Millis) -> Record {
    Record {
        fingerprint: sent_as.as_bytes().to_vec(),
        ..registered(terms, now)
    }
}

/// A fresh PROCESSING registration (S13) with no fingerprint: the barrier's keys are derived
/// from the branch, so there is no request body to compare.
fn registered(terms: Terms, now: Millis) -> Record {
    Record {
        fingerprint: Vec::new(),
        state: RecordState::Processing,
        result: String::new(),
        response: Vec::new(),
        content_type: String::new(),
        created_ms: now,
        updated_ms: now,
        expires_ms: if terms.retention_ms == 0 {
            0
        } else {
            now.saturating_add(terms.retention_ms)
        },
        attempts: 1,
        // Running a guarded action twice is what the barrier prevents: no Begin may take over
        // its registration, whatever lease that Begin asks for.
        lease: Lease::Never,
    }
}

/// Where a branch's two records live in the participants' part of the table: scope
/// `guard/<node_id>/<gsn>`, request ids `<branch_id>/forward` and `<branch_id>/reversal`.
/// A participant finishes a guarded action with exactly these names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchKeys {
    pub scope: String,
    pub forward: String,
    pub reversal: String,
}

impl BranchKeys {
    /// Node ids follow RegisterNode's rule, and in particular contain no `/`: that keeps
    /// `guard/<node_id>/<gsn>` unambiguous, so two branches can never share a scope.
    pub const NODE_ID_MAX_LEN: usize = 64;
    const NODE_ID_ALLOWED: &'static str = "._-";
    const SCOPE_PREFIX: &'static str = "guard/";
    const FORWARD_SUFFIX: &'static str = "/forward";
    const REVERSAL_SUFFIX: &'static str = "/reversal";

    /// Whether `scope` is in the barrier's part of the table. Only Guard registers there: a
    /// Begin in it would register a forward action without reading its reversal's record,
    /// running it after its compensation.
    pub fn is_barrier_scope(scope: &str) -> bool {
        scope.starts_with(Self::SCOPE_PREFIX)
    }

    /// Validates the three names and composes the keys; every problem is reported at once,
    /// each naming its field.
    pub fn parse(node_id: &str, gsn: &str, branch_id: &str) -> Result<BranchKeys, Vec<Violation>> {
        let mut violations = Vec::new();
        check_node_id(node_id, &mut violations);
        // A GSN, not any text: the scope is the branch's across its commands only if every
        // command of the saga names it the same way, and collection reads the GSN back from it
        // to keep the records while the saga may still reverse. A participant that passed its
        // command_id here would get a scope per command, and a reversal would find no forward
        // record (a null compensation, leaving the effect in place). A GSN has at most 49
        // characters, so the scope, at most 120, always fits in 128.
        if let Err(e) = Gsn::parse(gsn) {
            violations.push(Violation::new(
                "gsn",
                format!("{e}: pass the gsn the command carried, not its command_id"),
            ));
        }
        let branch_ok = check_text("branch_id", branch_id, &mut violations);
        let scope = format!("{}{node_id}/{gsn}", Self::SCOPE_PREFIX);
        // The reversal suffix is the longer one, so it alone decides the limit.
        let reversal = format!("{branch_id}{}", Self::REVERSAL_SUFFIX);
        if branch_ok {
            check_composed(
                "branch_id",
                &reversal,
                "the request_id <branch_id>/reversal",
                &mut violations,
            );
        }
        if violations.is_empty() {
            Ok(BranchKeys {
                scope,
                forward: format!("{branch_id}{}", Self::FORWARD_SUFFIX),
                reversal,
            })
        } else {
            Err(violations)
        }
    }

    /// The GSN a barrier record's scope names, if `scope` is a barrier scope
    /// (`guard/<node_id>/<gsn>`); node ids contain no `/`, so the GSN is what follows the
    /// second one.
    pub fn gsn_of_scope(scope: &str) -> Option<&str> {
        let rest = scope.strip_prefix(Self::SCOPE_PREFIX)?;
        let (_node_id, gsn) = rest.split_once('/')?;
        Some(gsn)
    }

    /// The request id of `action`'s record.
    pub fn request_id(&self, action: Action) -> &str {
        match action {
            Action::Forward => &self.forward,
            Action::Reversal => &self.reversal,
        }
    }
}

fn check_node_id(node_id: &str, violations: &mut Vec<Violation>) {
    let valid = !node_id.is_empty()
        && node_id.chars().count() <= BranchKeys::NODE_ID_MAX_LEN
        && node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || BranchKeys::NODE_ID_ALLOWED.contains(c));
    if !valid {
        violations.push(Violation::new(
            "node_id",
            format!(
                "must be 1 to {} letters, digits, '.', '_' or '-' (the node id sagad knows the node by)",
                BranchKeys::NODE_ID_MAX_LEN
            ),
        ));
    }
}

/// Any printable text, as request ids are; length is judged on the composed key.
fn check_text(field: &str, text: &str, violations: &mut Vec<Violation>) -> bool {
    match RequestId::parse(text) {
        Ok(_) => true,
        Err(e) => {
            violations.push(Violation::new(field, e.to_string()));
            false
        }
    }
}

fn check_composed(field: &str, composed: &str, what: &str, violations: &mut Vec<Violation>) {
    let len = composed.chars().count();
    if len > RequestId::MAX_LEN {
        violations.push(Violation::new(
            field,
            format!(
                "is too long: {what} would be {len} characters, and at most {} are allowed",
                RequestId::MAX_LEN
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TERMS: Terms = Terms {
        retention_ms: 1_000,
        processing_lease_ms: None,
    };
    const NOW: Millis = 50;

    fn record(state: RecordState, result: &str) -> Record {
        Record {
            fingerprint: Vec::new(),
            state,
            result: result.to_owned(),
            response: result.as_bytes().to_vec(),
            content_type: String::new(),
            created_ms: 10,
            updated_ms: 20,
            expires_ms: 1_020,
            attempts: 1,
            lease: Lease::Never,
        }
    }

    /// A record in a row of the table: absent, processing, or done.
    #[derive(Debug, Clone, Copy)]
    enum Held {
        None,
        Processing,
        Done,
    }

    fn held(h: Held, done_result: &str) -> Option<Record> {
        match h {
            Held::None => None,
            Held::Processing => Some(record(RecordState::Processing, "")),
            Held::Done => Some(record(RecordState::Done, done_result)),
        }
    }

    /// Every combination of (asked action, forward record, reversal record): the verdict, the
    /// record shown (whose, and its result), and what is written (whose, state, result).
    #[test]
    fn every_row_of_the_barrier_table() {
        use Action::{Forward as F, Reversal as R};
        use Held::{Done as D, None as N, Processing as P};
        use RecordState::{Done as SD, Processing as SP};
        use Verdict::*;
        type Written = Option<(Action, RecordState, &'static str)>;
        #[rustfmt::skip]
        let rows: [(Action, Held, Held, Verdict, Action, &str, Written); 18] = [
            // asked forward: any reversal record refuses it, whatever the forward record says.
            (F, N, N, Proceed,          F, "",               Some((F, SP, ""))),
            (F, P, N, InProgress,       F, "",               None),
            (F, D, N, Duplicate,        F, "SUCCEEDED",      None),
            (F, N, P, Hanging,          R, "",               None),
            (F, P, P, Hanging,          R, "",               None),
            (F, D, P, Hanging,          R, "",               None),
            (F, N, D, Hanging,          R, "rev-done",       None),
            (F, P, D, Hanging,          R, "rev-done",       None),
            (F, D, D, Hanging,          R, "rev-done",       None),
            // asked reversal: its own record first, then the forward's.
            (R, N, N, NullCompensation, R, NULL_COMPENSATION, Some((R, SD, NULL_COMPENSATION))),
            (R, P, N, InProgress,       F, "",               None),
            (R, D, N, Proceed,          R, "",               Some((R, SP, ""))),
            (R, N, P, InProgress,       R, "",               None),
            (R, P, P, InProgress,       R, "",               None),
            (R, D, P, InProgress,       R, "",               None),
            (R, N, D, Duplicate,        R, "rev-done",       None),
            (R, P, D, Duplicate,        R, "rev-done",       None),
            (R, D, D, Duplicate,        R, "rev-done",       None),
        ];
        for (asked, fwd, rev, verdict, shown_of, shown_result, written) in rows {
            let row = format!("{asked:?} forward={fwd:?} reversal={rev:?}");
            let forward = held(fwd, "SUCCEEDED");
            let reversal = held(rev, "rev-done");
            let decision = on_guard(asked, forward.as_ref(), reversal.as_ref(), "", TERMS, NOW);
            assert_eq!(decision.verdict(), verdict, "{row}");
            let (whose, shown) = decision.shown();
            assert_eq!(
                (whose, shown.result.as_str()),
                (shown_of, shown_result),
                "{row}"
            );
            let write = decision
                .write()
                .map(|(whose, r)| (whose, r.state, r.result.as_str()));
            assert_eq!(write, written, "{row}");
        }
    }

    #[test]
    fn written_records_are_new_and_expire_after_the_retention() {
        for asked in [Action::Forward, Action::Reversal] {
            let decision = on_guard(asked, None, None, "", TERMS, NOW);
            let (_, written) = decision.write().expect("a fresh branch writes a record");
            assert_eq!(
                (written.created_ms, written.updated_ms, written.expires_ms),
                (NOW, NOW, NOW + TERMS.retention_ms)
            );
            assert_eq!(written.attempts, 1);
        }
    }

    #[test]
    fn a_reversal_finished_failed_runs_again_only_for_a_new_reverse() {
        let forward = record(RecordState::Done, "SUCCEEDED");
        let failed = Record {
            attempts: 2,
            fingerprint: b"c1-0000000000000007:r12.1".to_vec(),
            ..record(RecordState::Done, FAILED)
        };
        let guard = |sent_as: &str, reversal: &Record| {
            on_guard(
                Action::Reversal,
                Some(&forward),
                Some(reversal),
                sent_as,
                TERMS,
                NOW,
            )
        };
        let again = guard("c1-0000000000000007:r15.2", &failed);
        assert_eq!(
            again.verdict(),
            Verdict::Proceed,
            "a new send runs it again"
        );
        let (whose, written) = again.write().expect("the reversal is registered again");
        assert_eq!(whose, Action::Reversal);
        assert_eq!(written.state, RecordState::Processing);
        assert_eq!((written.result.as_str(), written.response.len()), ("", 0));
        assert_eq!((written.created_ms, written.updated_ms), (10, NOW));
        assert_eq!(written.attempts, 3);
        assert_eq!(written.fingerprint, b"c1-0000000000000007:r15.2");
        assert_eq!(written.lease, Lease::Never);
        // A redelivery of the Reverse that failed, or a Guard that does not say which Reverse
        // it guards, is answered from the failed record.
        for sent_as in ["c1-0000000000000007:r12.1", "c1-0000000000000007:r11.1", ""] {
            assert_eq!(
                guard(sent_as, &failed).verdict(),
                Verdict::Duplicate,
                "{sent_as:?}"
            );
        }
        let hanging = on_guard(
            Action::Forward,
            Some(&forward),
            Some(&failed),
            "",
            TERMS,
            NOW,
        );
        assert_eq!(hanging.verdict(), Verdict::Hanging);
        // Any other result is final, the tombstone included.
        for result in ["SUCCEEDED", NULL_COMPENSATION, "failed", "ERROR"] {
            let done = record(RecordState::Done, result);
            assert_eq!(
                guard("another", &done).verdict(),
                Verdict::Duplicate,
                "{result}"
            );
        }
    }

    #[test]
    fn a_forward_action_finished_failed_runs_again_only_for_a_new_execute() {
        let failed = Record {
            fingerprint: b"c1-0000000000000007:e3.1".to_vec(),
            ..record(RecordState::Done, FAILED)
        };
        let guard = |sent_as: &str, forward: &Record, reversal: Option<&Record>| {
            on_guard(
                Action::Forward,
                Some(forward),
                reversal,
                sent_as,
                TERMS,
                NOW,
            )
        };
        let again = guard("c1-0000000000000007:e9.2", &failed, None);
        assert_eq!(
            again.verdict(),
            Verdict::Proceed,
            "sagad's retry runs it again"
        );
        let (whose, written) = again
            .write()
            .expect("the forward action is registered again");
        assert_eq!(whose, Action::Forward);
        assert_eq!(written.state, RecordState::Processing);
        assert_eq!((written.created_ms, written.updated_ms), (10, NOW));
        assert_eq!(written.attempts, 2);
        assert_eq!(written.fingerprint, b"c1-0000000000000007:e9.2");
        // A redelivery of the Execute that failed, a late copy of an older one, or a Guard that
        // does not say which Execute it guards (or names none sagad issued) is answered from
        // the failed record.
        for sent_as in [
            "c1-0000000000000007:e3.1",
            "c1-0000000000000007:e2.1",
            "",
            "my-own-id",
        ] {
            assert_eq!(
                guard(sent_as, &failed, None).verdict(),
                Verdict::Duplicate,
                "{sent_as:?}"
            );
        }
        // Once its reversal was asked for, nothing runs it again: it would never be undone.
        let reversal = record(RecordState::Done, "SUCCEEDED");
        assert_eq!(
            guard("c1-0000000000000007:e9.2", &failed, Some(&reversal)).verdict(),
            Verdict::Hanging
        );
        // Any other result is final.
        for result in ["SUCCEEDED", "DECLINED", "failed"] {
            let done = record(RecordState::Done, result);
            assert_eq!(
                guard("another", &done, None).verdict(),
                Verdict::Duplicate,
                "{result}"
            );
        }
        // A first run keeps the command it ran for, so its redelivery is told apart later; a
        // run registered without one cannot be, so for it FAILED is final.
        let first = on_guard(Action::Forward, None, None, "g:e1.1", TERMS, NOW);
        assert_eq!(first.write().unwrap().1.fingerprint, b"g:e1.1");
        let unnamed = record(RecordState::Done, FAILED);
        assert_eq!(
            guard("c1-0000000000000007:e9.2", &unnamed, None).verdict(),
            Verdict::Duplicate
        );
    }

    #[test]
    fn a_duplicate_shows_the_stored_response() {
        let mut done = record(RecordState::Done, "SUCCEEDED");
        done.response = b"reserved 3".to_vec();
        let decision = on_guard(Action::Forward, Some(&done), None, "", TERMS, NOW);
        assert_eq!(decision.shown().1.response, b"reserved 3");
    }

    #[test]
    fn keys_name_the_node_the_saga_and_the_branch() {
        let keys = BranchKeys::parse("inventory", "c1-0000000000000042", "reserve").unwrap();
        assert_eq!(keys.scope, "guard/inventory/c1-0000000000000042");
        assert_eq!(keys.request_id(Action::Forward), "reserve/forward");
        assert_eq!(keys.request_id(Action::Reversal), "reserve/reversal");
    }

    #[test]
    fn bad_names_are_each_reported_by_field() {
        let fields = |r: Result<BranchKeys, Vec<Violation>>| -> Vec<String> {
            r.unwrap_err().into_iter().map(|v| v.field).collect()
        };
        const GSN: &str = "c1-0000000000000042";
        assert_eq!(
            fields(BranchKeys::parse("", "", "")),
            ["node_id", "gsn", "branch_id"]
        );
        assert_eq!(fields(BranchKeys::parse("a/b", GSN, "b")), ["node_id"]);
        assert_eq!(fields(BranchKeys::parse("n", GSN, "b\n")), ["branch_id"]);
        // The longest node id and the longest GSN still make a scope that fits.
        let longest_gsn = format!("{}-0000000000000042", "c".repeat(32));
        assert!(BranchKeys::parse(&"n".repeat(64), &longest_gsn, "b").is_ok());
        // 119 + "/reversal" = 128 is the longest branch id.
        assert!(BranchKeys::parse("n", GSN, &"b".repeat(119)).is_ok());
        assert_eq!(
            fields(BranchKeys::parse("n", GSN, &"b".repeat(120))),
            ["branch_id"]
        );
    }

    /// A command_id (or any other text) in place of the GSN would give each command of a
    /// branch a scope of its own, so a reversal would never find its forward record.
    #[test]
    fn a_gsn_that_is_not_a_gsn_is_refused() {
        for bad in [
            "g",
            "g\n",
            "c1-0000000000000042:e7.1",
            "c1-42",
            "c1/x-0000000000000042",
        ] {
            let violations = BranchKeys::parse("n", bad, "b").unwrap_err();
            assert_eq!(violations.len(), 1, "{bad:?}");
            assert_eq!(violations[0].field, "gsn", "{bad:?}");
            assert!(
                violations[0].description.contains("not its command_id"),
                "{}",
                violations[0].description
            );
        }
    }

    /// One call a participant (or a confused one) may make for the branch.
    #[derive(Debug, Clone)]
    enum Call {
        /// A Guard for the action, sent as one of a few command ids ("" for none given).
        Guard(Action, &'static str),
        Finish(Action, &'static str),
    }

    fn call() -> impl Strategy<Value = Call> {
        let action = prop_oneof![Just(Action::Forward), Just(Action::Reversal)];
        // sagad's ids in the order it issues them, one it never issues, and none.
        let sent_as = prop_oneof![
            Just(""),
            Just("g:e1.1"),
            Just("g:e2.2"),
            Just("g:e3.3"),
            Just("own-id"),
        ];
        prop_oneof![
            (action.clone(), sent_as).prop_map(|(a, id)| Call::Guard(a, id)),
            (action, prop_oneof![Just("SUCCEEDED"), Just("FAILED")])
                .prop_map(|(a, r)| Call::Finish(a, r)),
        ]
    }

    /// Whether `sent_as` is a command sagad issued after the one a run was for.
    fn issued_after(sent_as: &str, ran_for: Option<u64>) -> bool {
        matches!((command_sequence(sent_as), ran_for), (Some(new), Some(ran)) if new > ran)
    }

    proptest! {
        /// Whatever the order of Guards and Finishes: each action is PROCEEDed again only
        /// after each earlier run of it was Finished FAILED (never while one runs, never after
        /// one succeeded), and only for a Guard naming a command sagad issued after the one
        /// whose run failed; the forward action is never PROCEEDed once its reversal has a record; a
        /// reversal is PROCEEDed only after its forward action ran and finished.
        #[test]
        fn the_barrier_never_runs_an_action_twice_or_out_of_order(
            calls in proptest::collection::vec(call(), 1..40)
        ) {
            let mut forward: Option<Record> = None;
            let mut reversal: Option<Record> = None;
            let (mut forward_runs, mut forward_failures) = (0, 0);
            let (mut reversal_runs, mut reversal_failures) = (0, 0);
            // The latest command each action ran for, by its place in sagad's order of issue.
            let (mut forward_ran_for, mut reversal_ran_for) = (None, None);
            // Set once a reversal has a record (registered, run or tombstoned). A Reverse that
            // only waited for the running forward action leaves none, and the forward action
            // may then still run again after a failure: the reversal, asked again, follows it.
            let mut reversal_recorded = false;
            for (i, call) in calls.into_iter().enumerate() {
                let now = 1_000 + i as Millis;
                match call {
                    Call::Guard(asked, sent_as) => {
                        let decision = on_guard(
                            asked,
                            forward.as_ref(),
                            reversal.as_ref(),
                            sent_as,
                            TERMS,
                            now,
                        );
                        match (asked, decision.verdict()) {
                            (Action::Forward, Verdict::Proceed) => {
                                prop_assert!(!reversal_recorded, "forward run after its reversal was recorded");
                                prop_assert_eq!(
                                    forward_runs, forward_failures,
                                    "a forward run again while one runs or after one succeeded"
                                );
                                if forward_runs > 0 {
                                    prop_assert!(
                                        issued_after(sent_as, forward_ran_for),
                                        "a failed forward run again for a redelivery or an older command"
                                    );
                                }
                                forward_ran_for = command_sequence(sent_as);
                                forward_runs += 1;
                            }
                            (Action::Reversal, Verdict::Proceed) => {
                                prop_assert!(forward_runs >= 1, "reversal of a forward that never ran");
                                prop_assert_eq!(
                                    forward.as_ref().map(|r| r.state),
                                    Some(RecordState::Done),
                                    "reversal while the forward runs"
                                );
                                prop_assert_eq!(
                                    reversal_runs, reversal_failures,
                                    "a reversal run again while one runs or after one succeeded"
                                );
                                if reversal_runs > 0 {
                                    prop_assert!(
                                        issued_after(sent_as, reversal_ran_for),
                                        "a failed reversal run again for a redelivery or an older command"
                                    );
                                }
                                reversal_ran_for = command_sequence(sent_as);
                                reversal_runs += 1;
                            }
                            (Action::Forward, _) | (Action::Reversal, _) => {}
                        }
                        if decision.shown().0 == Action::Reversal {
                            reversal_recorded = true;
                        }
                        if let Some((whose, written)) = decision.write() {
                            let slot = match whose {
                                Action::Forward => &mut forward,
                                Action::Reversal => &mut reversal,
                            };
                            *slot = Some(written.clone());
                        }
                    }
                    Call::Finish(whose, result) => {
                        let slot = match whose {
                            Action::Forward => &mut forward,
                            Action::Reversal => &mut reversal,
                        };
                        let answer = Answer {
                            result: result.to_owned(),
                            response: result.as_bytes().to_vec(),
                            content_type: String::new(),
                        };
                        match idempotency::on_finish(slot.as_ref(), answer, TERMS, now) {
                            idempotency::Finish::Store(done) => {
                                if result == FAILED {
                                    match whose {
                                        Action::Forward => forward_failures += 1,
                                        Action::Reversal => reversal_failures += 1,
                                    }
                                }
                                *slot = Some(done);
                            }
                            idempotency::Finish::AlreadyDone(_)
                            | idempotency::Finish::NotBegun
                            | idempotency::Finish::Conflict(_) => {}
                        }
                    }
                }
                prop_assert!(
                    forward_runs <= forward_failures + 1 && reversal_runs <= reversal_failures + 1
                );
            }
        }
    }
}
