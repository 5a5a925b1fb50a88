//! Saga retention: finished sagas (COMPLETED or REVERSED) older than the configured retention
//! are removed with their payloads, a bounded batch at a time, so the ledger of a long-running
//! coordinator stops growing. Sagas still running, reversing or needing attention are never
//! removed, whatever their age.
//!
//! The scan goes through the sagas oldest first and stays where it caught up, going on from
//! there as sagas age past the retention (GSNs follow creation). A saga it passed over and kept
//! cannot become removable before a time known when it was kept: a finished one when its
//! retention runs out, an unfinished one no sooner than a retention after it was seen
//! unfinished, since finishing is a change and sets `updated_ms` to its time. Finished sagas
//! are looked at again when theirs runs out; the scan starts again from the oldest saga only
//! when the earliest time of an unfinished one has come and the scan has caught up, so old
//! sagas that must be kept are read once a retention instead of once a second.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{Engine, Error, convert};
use crate::store;

/// Sagas examined per pass (one read, then one write of at most this many removals), so a pass
/// never holds the ledger writer for long.
const EXAMINED_PER_PASS: usize = 500;

/// Passes per collection at most: 20,000 sagas, so retention keeps pace with that many sagas
/// per tick, while a ledger full of old sagas that must be kept (still running, needing
/// attention) is read a bounded amount at a time; the next collection goes on from there.
const PASSES_PER_COLLECTION: usize = 40;

/// Finished sagas kept in memory to look at again when their retention runs out; past this
/// many, one more moves the scan's next start from the oldest saga earlier instead, so memory
/// stays bounded whatever the ledger holds.
const AWAITED_AT_MOST: usize = EXAMINED_PER_PASS * PASSES_PER_COLLECTION;

/// Where the scan stands, and when the sagas it passed over may become removable.
#[derive(Debug, Default)]
pub(crate) struct Cursor(Mutex<Scan>);

#[derive(Debug, Default)]
struct Scan {
    /// The last saga examined since the scan started from the oldest; the next pass starts
    /// after it.
    after: Option<u64>,
    /// The earliest time an unfinished saga the scan passed over could be removable (or a
    /// finished one beyond `awaited`): the scan starts from the oldest saga again then, once it
    /// has caught up.
    restart_at: Option<u64>,
    /// Finished sagas the scan passed over within their retention: (when it runs out, sequence).
    awaited: BTreeSet<(u64, u64)>,
    /// The clock at the last collection. The times above were read on it, so a clock that went
    /// back starts the scan again rather than wait for them.
    seen_ms: u64,
    /// The scan has caught up since it last started from the oldest saga. Only then does
    /// `restart_at` start it again: with a short retention and more kept sagas than one
    /// collection reads, a restart on the way would never let it reach the sagas after them.
    caught_up: bool,
}

impl Scan {
    /// Starts a collection at `now`: the sagas whose retention ran out, to look at again.
    fn begin(&mut self, now: u64) -> Vec<u64> {
        if now < self.seen_ms || (self.caught_up && self.restart_at.is_some_and(|at| at <= now)) {
            // Every saga is examined again, and whatever was awaited with them.
            *self = Scan {
                seen_ms: now,
                ..Scan::default()
            };
            return Vec::new();
        }
        self.seen_ms = now;
        let later = self.awaited.split_off(&(now.saturating_add(1), 0));
        std::mem::replace(&mut self.awaited, later)
            .into_iter()
            .map(|(_, sequence)| sequence)
            .collect()
    }

    /// Notes a saga kept, so it is looked at again once it may be removable.
    fn keep(&mut self, sequence: u64, removable: Removable) {
        match removable {
            Removable::Finished(at) if self.awaited.len() < AWAITED_AT_MOST => {
                self.awaited.insert((at, sequence));
            }
            Removable::Finished(at) | Removable::NoSoonerThan(at) => {
                self.restart_at = Some(self.restart_at.map_or(at, |t| t.min(at)));
            }
        }
    }
}

/// When a saga may be removed.
#[derive(Clone, Copy, Debug)]
enum Removable {
    /// Finished: once its retention runs out, unless it changes again, which only delays it.
    Finished(u64),
    /// Not finished: finishing it sets `updated_ms` no earlier than the time it was judged at
    /// (a write that read the clock just before may land a little earlier, which only delays
    /// its removal until the scan starts from the oldest again).
    NoSoonerThan(u64),
}

impl Removable {
    /// When the saga may be removed, judged at `now`. With `by`, the removal rule: finished,
    /// and last changed `retention_ms` or more ago.
    fn of(record: &store::SagaRecord, retention_ms: u64, now: u64) -> Removable {
        let finished = convert::saga_state_from_code(record.state).is_some_and(|s| s.is_terminal());
        if finished {
            Removable::Finished(record.updated_ms.saturating_add(retention_ms))
        } else {
            Removable::NoSoonerThan(now.saturating_add(retention_ms))
        }
    }

    fn by(self, now: u64) -> bool {
        matches!(self, Removable::Finished(at) if at <= now)
    }
}

/// Sagas a pass found undecodable and reported. A scan that starts again from the oldest
/// passes them again, so each is logged once, not once a scan.
#[derive(Debug, Default)]
pub(crate) struct Reported(Mutex<HashSet<Vec<u8>>>);

impl Reported {
    fn report(&self, undecodable: &store::Undecodable) {
        let first = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(undecodable.key().to_vec());
        if first {
            tracing::warn!(
                table = undecodable.table(),
                key = %undecodable.key_hex(),
                error = %undecodable.error(),
                "a saga does not decode; retention passes over it"
            );
        }
    }
}

/// What a collection did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Collection {
    pub(crate) removed: usize,
    /// Sagas read: by the scan, and awaited ones looked at again.
    pub(crate) examined: usize,
}

/// What one pass did.
struct Pass {
    removed: usize,
    examined: usize,
    /// The scan reached the end of the sagas, or a saga created too recently to be past the
    /// retention (GSNs follow creation, so every later saga is younger still).
    caught_up: bool,
}

impl Engine {
    /// Removes finished sagas last changed more than `retention` ago, pass after pass until
    /// the scan has caught up (or `PASSES_PER_COLLECTION` passes), so retention keeps pace with
    /// a sustained rate of sagas; returns how many it removed. Sagas created within the
    /// retention are never examined.
    pub async fn collect_finished_sagas(&self, retention: Duration) -> Result<usize, Error> {
        Ok(self.collect_sagas(retention).await?.removed)
    }

    /// `collect_finished_sagas`, also telling how many sagas it read, which is what the scan's
    /// cursor saves.
    pub(crate) async fn collect_sagas(&self, retention: Duration) -> Result<Collection, Error> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        let now = self.clock.now_ms();
        let due = self.scan_state(|scan| scan.begin(now));
        let mut collection = Collection::default();
        for batch in due.chunks(EXAMINED_PER_PASS) {
            collection.examined += batch.len();
            collection.removed += self.remove(batch.to_vec(), retention_ms, now).await?;
        }
        for _ in 0..PASSES_PER_COLLECTION {
            let pass = self.retention_pass(retention_ms, now).await?;
            collection.removed += pass.removed;
            collection.examined += pass.examined;
            if pass.caught_up {
                break;
            }
        }
        Ok(collection)
    }

    fn scan_state<R>(&self, f: impl FnOnce(&mut Scan) -> R) -> R {
        f(&mut self
            .shared
            .retention_cursor
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    async fn retention_pass(&self, retention_ms: u64, now: u64) -> Result<Pass, Error> {
        let after = self.scan_state(|scan| scan.after);
        let shared = self.shared.clone();
        let (candidates, kept, last, examined, caught_up) = self
            .store
            .read(move |tx| -> Result<_, store::Error> {
                let mut candidates = Vec::new();
                let mut kept = Vec::new();
                let mut last = after;
                let mut examined = 0;
                for record in tx.scan_sagas(after, false).take(EXAMINED_PER_PASS) {
                    // A saga that cannot be read cannot be judged finished, so it is kept, and
                    // awaits no time: no time makes it removable. The cursor moves past it, or
                    // it would stop retention for good.
                    let record = match record? {
                        Ok(record) => record,
                        Err(undecodable) => {
                            shared.retention_reported.report(&undecodable);
                            examined += 1;
                            last = undecodable.key_u64().or(last);
                            continue;
                        }
                    };
                    // The cursor stays before it, so it is examined once it is old enough.
                    if record.created_ms.saturating_add(retention_ms) > now {
                        return Ok((candidates, kept, last, examined, true));
                    }
                    examined += 1;
                    last = Some(record.sequence);
                    let removable = Removable::of(&record, retention_ms, now);
                    if removable.by(now) {
                        candidates.push(record.sequence);
                    } else {
                        kept.push((record.sequence, removable));
                    }
                }
                Ok((
                    candidates,
                    kept,
                    last,
                    examined,
                    examined < EXAMINED_PER_PASS,
                ))
            })
            .await??;
        // Once caught up, the cursor stays where the scan stopped: the sagas before it are
        // awaited as `Scan::keep` noted, the later ones are examined as they age.
        self.scan_state(|scan| {
            scan.after = last;
            scan.caught_up |= caught_up;
            for (sequence, removable) in kept {
                scan.keep(sequence, removable);
            }
        });
        let removed = self.remove(candidates, retention_ms, now).await?;
        Ok(Pass {
            removed,
            examined,
            caught_up,
        })
    }

    /// Removes those of `sequences` that are removable at `now`; the others are kept and noted.
    async fn remove(
        &self,
        sequences: Vec<u64>,
        retention_ms: u64,
        now: u64,
    ) -> Result<usize, Error> {
        if sequences.is_empty() {
            return Ok(0);
        }
        let removal = self
            .store
            .write(move |tx| -> Result<_, Error> {
                let mut removed = 0;
                let mut kept = Vec::new();
                for sequence in sequences {
                    // Checked again inside the write: the saga may have changed since it was
                    // read (a COMPLETED saga undone by its node), and the rule is decided where
                    // the ledger is consistent.
                    let Some(record) = tx.saga(sequence)? else {
                        continue;
                    };
                    let removable = Removable::of(&record, retention_ms, now);
                    if removable.by(now) {
                        tx.delete_saga(sequence)?;
                        removed += 1;
                    } else {
                        kept.push((sequence, removable));
                    }
                }
                Ok((removed, kept))
            })
            .await
            .map_err(Error::from)
            .and_then(|written| written);
        match removal {
            Ok((removed, kept)) => {
                self.scan_state(|scan| {
                    for (sequence, removable) in kept {
                        scan.keep(sequence, removable);
                    }
                });
                Ok(removed)
            }
            Err(e) => {
                // The cursor has moved past these sagas: the next collection starts from the
                // oldest, so none is left unexamined until a later restart.
                self.scan_state(|scan| scan.restart_at = Some(now));
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::clock::ManualClock;
    use crate::domain::saga::{Deadline, SagaMode, StartRequest};

    const DAY_MS: u64 = 24 * 3600 * 1000;
    const RETENTION: Duration = Duration::from_secs(3 * 24 * 3600);

    async fn engine() -> (tempfile::TempDir, store::Store, Arc<ManualClock>, Engine) {
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let (dir, store, engine) =
            crate::engine::testing::engine_on_fresh_ledger(clock.clone(), |_| {}).await;
        (dir, store, clock, engine)
    }

    /// Starts a registered-outcall saga (it runs until completed); returns its GSN.
    async fn start(engine: &Engine, request_id: &str) -> String {
        let request = StartRequest {
            request_id: request_id.into(),
            business_type: "transfer".into(),
            mode: Some(SagaMode::RegisteredOutcalls),
            payload: b"a payload".to_vec(),
            content_type: String::new(),
            labels: BTreeMap::new(),
            deadline: Deadline::None,
        };
        let (_, gsn) = engine
            .start_saga(request, Vec::new(), |saga| {
                (Vec::new(), saga.gsn.to_string())
            })
            .await
            .unwrap();
        gsn.unwrap()
    }

    async fn complete(engine: &Engine, gsn: &str) {
        engine
            .complete_saga(&format!("done-{gsn}"), gsn, Vec::new(), |_| Vec::new())
            .await
            .unwrap();
    }

    async fn exists(engine: &Engine, gsn: &str) -> bool {
        match engine.get_saga(gsn).await {
            Ok(_) => true,
            Err(Error::NotFound(_)) => false,
            Err(e) => panic!("{gsn}: {e}"),
        }
    }

    /// Sagas kept running for longer than the retention.
    async fn old_running_sagas(engine: &Engine, clock: &ManualClock, count: usize) -> Vec<String> {
        let mut gsns = Vec::new();
        for i in 0..count {
            gsns.push(start(engine, &format!("old-{i}")).await);
        }
        clock.advance_ms(4 * DAY_MS);
        gsns
    }

    #[test]
    fn a_scan_on_its_way_is_started_again_from_the_oldest_only_once_it_has_caught_up() {
        let mut scan = Scan::default();
        assert!(scan.begin(1_000).is_empty());
        scan.after = Some(20_000);
        scan.keep(7, Removable::NoSoonerThan(5_000));
        // Due to start again, but the sagas after the cursor have not been read yet.
        scan.begin(6_000);
        assert_eq!(scan.after, Some(20_000), "the scan goes on");
        scan.caught_up = true;
        scan.begin(7_000);
        assert_eq!(scan.after, None, "caught up, it starts from the oldest");
        assert!(!scan.caught_up && scan.restart_at.is_none());
        // A clock that went back starts it again at once.
        scan.after = Some(5);
        scan.begin(6_999);
        assert_eq!(scan.after, None);
    }

    #[tokio::test]
    async fn a_collection_soon_after_one_that_caught_up_does_not_read_old_unfinished_sagas_again() {
        let (_dir, store, clock, engine) = engine().await;
        old_running_sagas(&engine, &clock, 50).await;
        let first = engine.collect_sagas(RETENTION).await.unwrap();
        assert_eq!(
            first,
            Collection {
                removed: 0,
                examined: 50
            }
        );
        for _ in 0..3 {
            clock.advance_ms(1_000);
            let next = engine.collect_sagas(RETENTION).await.unwrap();
            assert_eq!(next, Collection::default(), "nothing read again");
        }
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_saga_finishing_after_the_scan_passed_it_is_removed_once_its_retention_has_passed() {
        let (_dir, store, clock, engine) = engine().await;
        let gsns = old_running_sagas(&engine, &clock, 10).await;
        engine.collect_sagas(RETENTION).await.unwrap();
        clock.advance_ms(3_600_000);
        complete(&engine, &gsns[3]).await;
        clock.advance_ms(1_000);
        assert_eq!(engine.collect_sagas(RETENTION).await.unwrap().examined, 0);

        // A retention after the first look the scan starts from the oldest again; the saga
        // finished an hour later, so it is awaited, not removed.
        clock.advance_ms(3 * DAY_MS - 3_601_000);
        let again = engine.collect_sagas(RETENTION).await.unwrap();
        assert_eq!(
            again,
            Collection {
                removed: 0,
                examined: 10
            }
        );
        assert!(exists(&engine, &gsns[3]).await);

        clock.advance_ms(3_600_000 - 1);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection::default()
        );
        clock.advance_ms(1);
        let removing = engine.collect_sagas(RETENTION).await.unwrap();
        assert_eq!(
            removing,
            Collection {
                removed: 1,
                examined: 1
            },
            "only the awaited saga is read"
        );
        assert!(!exists(&engine, &gsns[3]).await);
        for gsn in gsns.iter().filter(|g| *g != &gsns[3]) {
            assert!(exists(&engine, gsn).await, "{gsn} is still running");
        }
        store.close().await.unwrap();
    }

    /// The scan stays where it caught up, before the first saga too young to examine, and goes
    /// on from there.
    #[tokio::test]
    async fn sagas_ageing_past_the_retention_are_removed_without_reading_older_kept_ones_again() {
        let (_dir, store, clock, engine) = engine().await;
        for i in 0..20 {
            start(&engine, &format!("old-{i}")).await;
        }
        clock.advance_ms(2 * DAY_MS);
        let mut finished = Vec::new();
        for i in 0..5 {
            let gsn = start(&engine, &format!("new-{i}")).await;
            complete(&engine, &gsn).await;
            finished.push(gsn);
        }
        clock.advance_ms(DAY_MS / 2);
        let young = start(&engine, "young").await;
        complete(&engine, &young).await;
        clock.advance_ms(3 * DAY_MS / 2);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection {
                removed: 0,
                examined: 20
            },
            "the scan stops at the first saga created within the retention"
        );

        clock.advance_ms(DAY_MS);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection {
                removed: 5,
                examined: 5
            }
        );
        for gsn in &finished {
            assert!(!exists(&engine, gsn).await, "{gsn} was removed");
        }
        assert!(exists(&engine, &young).await, "still within its retention");

        clock.advance_ms(DAY_MS / 2);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection {
                removed: 1,
                examined: 1
            }
        );
        assert!(!exists(&engine, &young).await);
        store.close().await.unwrap();
    }

    /// Under steady load, sagas past the point where the scan caught up finish a moment after
    /// it passed them; they are looked at again when their own retention runs out, which would
    /// otherwise start the scan from the oldest saga again every second.
    #[tokio::test]
    async fn a_saga_finished_within_its_retention_when_passed_is_removed_without_rereading_old_sagas()
     {
        let (_dir, store, clock, engine) = engine().await;
        for i in 0..20 {
            start(&engine, &format!("old-{i}")).await;
        }
        let late = start(&engine, "late").await;
        clock.advance_ms(2 * DAY_MS);
        complete(&engine, &late).await;
        clock.advance_ms(2 * DAY_MS);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection {
                removed: 0,
                examined: 21
            }
        );
        clock.advance_ms(1_000);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection::default()
        );
        clock.advance_ms(DAY_MS - 1_000);
        assert_eq!(
            engine.collect_sagas(RETENTION).await.unwrap(),
            Collection {
                removed: 1,
                examined: 1
            }
        );
        assert!(!exists(&engine, &late).await);
        store.close().await.unwrap();
    }

    /// The times awaited were read on the clock; one stepped back would make them wait for too long.
    #[tokio::test]
    async fn a_clock_stepped_back_starts_the_scan_from_the_oldest_saga_again() {
        let (_dir, store, clock, engine) = engine().await;
        old_running_sagas(&engine, &clock, 10).await;
        assert_eq!(engine.collect_sagas(RETENTION).await.unwrap().examined, 10);
        clock.advance_ms(1_000);
        assert_eq!(engine.collect_sagas(RETENTION).await.unwrap().examined, 0);
        clock.set_ms(crate::clock::Clock::now_ms(&*clock) - 2_000);
        assert_eq!(engine.collect_sagas(RETENTION).await.unwrap().examined, 10);
        store.close().await.unwrap();
    }
}
