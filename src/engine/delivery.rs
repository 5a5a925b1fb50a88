//! Delivery of outbox commands to nodes, at least once: pushed to a node's Participant
//! endpoint (retried with backoff while it is down), or sent on the node's Subscribe stream
//! (sent again until the node answers with ReportState or Ack). A command leaves the outbox only
//! in the same ledger write that applies its answer, so a crash repeats a delivery but never
//! loses one; nodes de-duplicate by command id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::engine::commands::{Command, Kind};
use crate::engine::metrics::Metrics;
use crate::engine::sagas::{command_id, is_passing};
use crate::engine::{Engine, Error};
use crate::store;
use crate::transport::{Answer, Outgoing, Participants};

/// A command being delivered, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub outbox_id: u64,
    pub gsn: String,
    pub node_id: String,
    pub kind: &'static str,
    pub attempts: u32,
    /// Why the last attempt did not get an answer; empty if none failed yet.
    pub last_error: String,
}

/// How a node is reached right now.
enum Route {
    /// An endpoint, with the stamp of the registration that set it.
    Push(String, u64),
    /// A Subscribe stream, with its subscription's id.
    Pull(u64, mpsc::Sender<Queued>),
    Nowhere,
}

/// Which route a delivery used, to tell a change of its own node's route from another's.
#[derive(Debug, PartialEq, Eq)]
enum Used {
    /// With the registration's stamp: a node that restarted and registered the same endpoint
    /// again is a new route too (its old connection is gone).
    Push(String, u64),
    Pull(u64),
    Nowhere,
}

impl Route {
    fn used(&self) -> Used {
        match self {
            Route::Push(endpoint, stamp) => Used::Push(endpoint.clone(), *stamp),
            Route::Pull(id, _) => Used::Pull(*id),
            Route::Nowhere => Used::Nowhere,
        }
    }
}

struct Subscription {
    id: u64,
    sender: mpsc::Sender<Queued>,
    /// Told when a newer Subscribe for the same node replaces this one, so its stream ends
    /// saying why instead of as if sagad had nothing more to send.
    replaced: oneshot::Sender<()>,
}

/// A command waiting in a Subscribe stream's queue.
pub(crate) struct Queued {
    outbox_id: u64,
    outgoing: Outgoing,
    /// Its delivery waits for this before it counts down to sending the command again.
    taken: oneshot::Sender<()>,
}

impl Queued {
    /// The command, as the stream takes it off its queue; `None` if its delivery no longer
    /// waits for it (the command was answered, or sagad is stopping, or the delivery moved on
    /// to the node's newer stream), so a node catching up on a backlog is not sent what it
    /// already answered.
    pub(crate) fn take(self, delivery: &Delivery) -> Option<Outgoing> {
        // The answer's write ends the delivery before its task wakes to let go of `taken`.
        if !delivery.is_pending(self.outbox_id) {
            return None;
        }
        self.taken.send(()).ok().map(|()| self.outgoing)
    }
}

/// A node's side of its Subscribe stream, from `Delivery::subscribe`.
pub(crate) struct Subscribed {
    pub(crate) id: u64,
    pub(crate) queue: mpsc::Receiver<Queued>,
    /// Resolves (with `Ok`) when a newer Subscribe for the node replaced this one.
    pub(crate) replaced: oneshot::Receiver<()>,
}

pub(crate) struct Delivery {
    participants: Participants,
    /// Each node's endpoint ("" for none), with the stamp of the write that stored it.
    endpoints: Mutex<HashMap<String, (String, u64)>>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    /// Outbox ids with a delivery task; the notify wakes it when the command is acknowledged.
    pending: Mutex<HashMap<u64, Arc<Notify>>>,
    /// What operators see of each delivery in flight. Written only under the `pending` lock
    /// (taken first), so an entry is added only while its delivery is pending: a task still
    /// reporting a failed send after the command was answered would otherwise leave it listed
    /// for ever.
    progress: Mutex<HashMap<u64, InFlight>>,
    /// Bumped whenever a node's route changes; a waiting delivery then looks whether its own
    /// node's route changed (`route_changed`) and if so tries again at once.
    routes: watch::Sender<u64>,
    stopping: watch::Sender<bool>,
    /// Set when shutdown begins: open Subscribe and WatchSaga streams end, as the server's
    /// drain waits for every open stream and these would otherwise outlast any grace period.
    streams_ending: watch::Sender<bool>,
    next_subscription: AtomicU64,
    /// A command a stream took off its queue and that is not answered within this time is
    /// sent again; one still queued is not.
    resend_after: Duration,
    retry_base: Duration,
    retry_cap: Duration,
}

/// Subscribe streams buffer this many commands before delivery waits for the node.
const STREAM_BUFFER: usize = 1024;

impl Delivery {
    pub(crate) fn new(
        call_timeout: Duration,
        resend_after: Duration,
        retry_base: Duration,
        retry_cap: Duration,
    ) -> Delivery {
        Delivery {
            participants: Participants::new(call_timeout),
            endpoints: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            routes: watch::channel(0).0,
            stopping: watch::channel(false).0,
            streams_ending: watch::channel(false).0,
            next_subscription: AtomicU64::new(1),
            resend_after,
            retry_base,
            retry_cap,
        }
    }

    fn routes_changed(&self) {
        self.routes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Routes `node_id` to the endpoint a write with `stamp` stored. Registrations of one
    /// node answered together have their follow-ups run in any order, so an older one that
    /// comes after a newer one is ignored: routing follows the ledger. A removed endpoint
    /// keeps its stamp for that.
    pub(crate) fn set_endpoint(&self, node_id: &str, endpoint: &str, stamp: u64) {
        let previous = {
            let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
            if endpoints.get(node_id).is_some_and(|(_, set)| *set > stamp) {
                return;
            }
            endpoints.insert(node_id.to_owned(), (endpoint.to_owned(), stamp))
        };
        match previous {
            Some((previous, _)) if !previous.is_empty() && previous != endpoint => {
                self.participants.forget(&previous);
            }
            // The node registered again (it restarted): every waiting delivery wakes to send
            // to it now, which a dial back-off from while it was down would refuse.
            Some((_, set)) if set < stamp => self.participants.dial_now(endpoint),
            _ => {}
        }
        self.routes_changed();
    }

    /// A node's new Subscribe stream; it replaces the node's previous one, which is told so.
    pub(crate) fn subscribe(&self, node_id: &str) -> Subscribed {
        let (sender, queue) = mpsc::channel(STREAM_BUFFER);
        let (replaced, replaced_receiver) = oneshot::channel();
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        let previous = self
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                node_id.to_owned(),
                Subscription {
                    id,
                    sender,
                    replaced,
                },
            );
        if let Some(previous) = previous {
            // Its stream may have ended already.
            let _ = previous.replaced.send(());
        }
        self.routes_changed();
        Subscribed {
            id,
            queue,
            replaced: replaced_receiver,
        }
    }

    /// Forgets a stream that ended, unless a newer one already replaced it.
    pub(crate) fn unsubscribe(&self, node_id: &str, id: u64) {
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if subscriptions.get(node_id).is_some_and(|s| s.id == id) {
            subscriptions.remove(node_id);
        }
    }

    fn route(&self, node_id: &str) -> Route {
        let subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(subscription) = subscriptions.get(node_id)
            && !subscription.sender.is_closed()
        {
            return Route::Pull(subscription.id, subscription.sender.clone());
        }
        drop(subscriptions);
        match self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
        {
            Some((endpoint, stamp)) if !endpoint.is_empty() => {
                Route::Push(endpoint.clone(), *stamp)
            }
            _ => Route::Nowhere,
        }
    }

    /// Resolves once `node_id` is reached another way than `used`. Every node's route change
    /// wakes every delivery's receiver, but only its own node's may cut a delivery's wait short:
    /// otherwise one node subscribing again would resend every command waiting on another
    /// node's stream at once, and deliveries backing off from a node that is down would all
    /// retry together on any registration.
    async fn route_changed(&self, routes: &mut watch::Receiver<u64>, node_id: &str, used: &Used) {
        loop {
            if routes.changed().await.is_err() {
                // The sender lives as long as this `Delivery`, so this is never reached while
                // a delivery runs.
                return std::future::pending().await;
            }
            if self.route(node_id).used() != *used {
                return;
            }
        }
    }

    /// Starts delivering an outbox entry, unless a task already delivers it.
    /// `payload` is the command's payload when the caller has it; `None` reads it from the
    /// ledger if the command carries one.
    pub(crate) fn spawn(
        &self,
        engine: Engine,
        outbox_id: u64,
        command: Command,
        payload: Option<store::PayloadRecord>,
    ) {
        let notify = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if pending.contains_key(&outbox_id) {
                return;
            }
            let notify = Arc::new(Notify::new());
            pending.insert(outbox_id, notify.clone());
            notify
        };
        tokio::spawn(deliver(engine, outbox_id, command, payload, notify));
    }

    pub(crate) fn in_flight(&self) -> Vec<InFlight> {
        let mut all: Vec<InFlight> = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|f| f.outbox_id);
        all
    }

    fn record_attempt(&self, outbox_id: u64, command: &Command, attempts: u32, last_error: String) {
        let kind = match command.kind {
            crate::engine::commands::Kind::Execute => "execute",
            crate::engine::commands::Kind::Reverse => "reverse",
            crate::engine::commands::Kind::QueryStatus => "query_status",
            crate::engine::commands::Kind::Signal => "signal",
        };
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.contains_key(&outbox_id) {
            return;
        }
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                outbox_id,
                InFlight {
                    outbox_id,
                    gsn: command.gsn.clone(),
                    node_id: command.node_id.clone(),
                    kind,
                    attempts,
                    last_error,
                },
            );
    }

    /// The command was answered through ReportState or Ack: its delivery task stops.
    pub(crate) fn acknowledged(&self, outbox_id: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&outbox_id);
        if let Some(notify) = pending.remove(&outbox_id) {
            notify.notify_one();
        }
    }

    /// A command that can never be sent: its delivery stops, and operators still see it
    /// among the deliveries in flight, with `why`, until it is answered or sagad restarts.
    fn give_up(&self, outbox_id: u64, command: &Command, why: String) {
        self.record_attempt(outbox_id, command, 0, why);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&outbox_id);
    }

    fn is_pending(&self, outbox_id: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&outbox_id)
    }

    pub(crate) fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Ends the open streams (and any opened later), leaving delivery running.
    pub(crate) fn end_streams(&self) {
        self.streams_ending.send_replace(true);
    }

    /// Resolves once `end_streams` was called.
    pub(crate) fn streams_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ending = self.streams_ending.subscribe();
        async move {
            // An error means the engine is gone, which ends the streams as well.
            let _ = ending.wait_for(|ending| *ending).await;
        }
    }

    /// Stops every delivery task; the outbox keeps their commands for the next start.
    pub(crate) fn stop(&self) {
        self.stopping.send_replace(true);
    }

    fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1).min(30)).unwrap_or(30);
        let grown = self.retry_base.as_secs_f64() * 2f64.powi(exponent);
        let ceiling = grown.min(self.retry_cap.as_secs_f64());
        let floor = self.retry_base.as_secs_f64().min(ceiling);
        Duration::from_secs_f64(floor + (ceiling - floor) * jitter.clamp(0.0, 1.0))
    }
}

async fn deliver(
    engine: Engine,
    outbox_id: u64,
    command: Command,
    payload: Option<store::PayloadRecord>,
    acked: Arc<Notify>,
) {
    let delivery = &engine.shared.delivery;
    let mut routes = delivery.routes.subscribe();
    let mut stopping = delivery.stopping.subscribe();
    // Only Execute and Reverse carry the payload. A new command brings its own for its first
    // send, and a resumed one reads it at once, so that one whose payload cannot be read (or
    // whose saga is gone) is shown to operators (or dropped) at start; after a round that got
    // no answer, or while it waits for room on its node's full stream, it is read again for
    // the next send rather than kept, up to 1 MiB per command for as long as its node is away
    // or not reading.
    let Some(first) = Box::pin(payload_to_send(&engine, outbox_id, &command, payload)).await else {
        return;
    };
    let mut payload = Some(first);
    let mut attempt = 0u32;
    'rounds: loop {
        if *stopping.borrow() || !delivery.is_pending(outbox_id) {
            return;
        }
        // Counted when sent: a round in which the node cannot be reached sends nothing, so the
        // node's first real send is attempt 1 however long it was away.
        let send = |attempt: u32, payload: store::PayloadRecord| {
            delivery.record_attempt(outbox_id, &command, attempt, String::new());
            Outgoing {
                command_id: command_id(&command.gsn, command.kind, outbox_id, command.attempt),
                kind: command.kind,
                gsn: command.gsn.clone(),
                branch_id: command.branch_id.clone(),
                action: command.action.clone(),
                reason: command.reason.clone(),
                signal: command.signal,
                business_type: command.business_type.clone(),
                payload: payload.data,
                content_type: payload.content_type,
                attempt,
            }
        };
        routes.borrow_and_update();
        let route = delivery.route(&command.node_id);
        let used = route.used();
        let wait = match route {
            // The call and the write are boxed so that this task stays small: tokio copies a
            // task's whole future when it spawns and when it finishes it, and with these two
            // inline it was 4 KB, copied for every command (docs/benchmarks.md).
            Route::Push(endpoint, _) => {
                let next = payload_to_send(&engine, outbox_id, &command, payload.take());
                let Some(next) = Box::pin(next).await else {
                    return;
                };
                attempt = attempt.saturating_add(1);
                let outgoing = send(attempt, next);
                match Box::pin(delivery.participants.send(&endpoint, outgoing)).await {
                    Ok(answer) => {
                        let report = match answer {
                            Answer::Report(report) => Some(report),
                            Answer::Acknowledged => None,
                        };
                        match Box::pin(engine.command_answered(outbox_id, command.clone(), report))
                            .await
                        {
                            Ok(removed) => {
                                engine.command_done(outbox_id, removed);
                                return;
                            }
                            Err(Error::Store(store::Error::Closed)) => return,
                            Err(e) => {
                                tracing::warn!(outbox_id, gsn = %command.gsn, error = %e, "storing a node's answer failed; sending again");
                                delivery.backoff(attempt, engine.random.unit())
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(outbox_id, node = %command.node_id, attempt, error = %e, "delivery failed; will retry");
                        Metrics::bump(&engine.shared.metrics.delivery_failures);
                        delivery.record_attempt(outbox_id, &command, attempt, e.to_string());
                        // An Execute's or Reverse's next send reads its payload, which finds a
                        // removed saga; a Signal reads nothing, so it is looked for here.
                        if matches!(command.kind, Kind::Signal)
                            && Box::pin(dropped_with_its_saga(&engine, outbox_id, &command)).await
                        {
                            return;
                        }
                        delivery.backoff(attempt, engine.random.unit())
                    }
                }
            }
            Route::Pull(_, sender) => 'pull: {
                // Room on the stream first, then the payload: a node that does not read keeps
                // every other delivery of its commands waiting here, and they must not hold
                // their payloads meanwhile (one read again once there is room costs less).
                let reserved = match sender.try_reserve_owned() {
                    Ok(permit) => Some(permit),
                    Err(mpsc::error::TrySendError::Full(sender)) => {
                        payload = None;
                        // A node that went away without closing its stream may never read
                        // again: wait for room only until the command is answered (a
                        // ReportState arrives by another way), the node's route changes (it
                        // subscribed again) or sagad stops.
                        tokio::select! {
                            reserved = Box::pin(sender.reserve_owned()) => reserved.ok(),
                            () = acked.notified() => return,
                            () = delivery.route_changed(&mut routes, &command.node_id, &used) => continue 'rounds,
                            _ = stopping.changed() => return,
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => None,
                };
                let Some(permit) = reserved else {
                    // The stream ended since the lookup: look again shortly.
                    break 'pull Duration::from_millis(50);
                };
                let next = payload_to_send(&engine, outbox_id, &command, payload.take());
                let Some(next) = Box::pin(next).await else {
                    return;
                };
                attempt = attempt.saturating_add(1);
                let (taken, on_the_stream) = oneshot::channel();
                permit.send(Queued {
                    outbox_id,
                    outgoing: send(attempt, next),
                    taken,
                });
                // The resend clock starts once the stream takes the command off its queue, not
                // now: a node working through a backlog would otherwise be queued a copy of
                // every command it has not reached yet each `resend_after`, and spend its time
                // on duplicates. Until then no copy is queued again.
                // Biased: a command the old stream already took was sent, so a route change
                // seen in the same poll must not take its attempt back and send it again.
                tokio::select! {
                    biased;
                    taken = on_the_stream => {
                        if taken.is_ok() {
                            delivery.resend_after
                        } else {
                            // The stream ended (or was replaced) with the command still
                            // queued: nothing was sent.
                            attempt = attempt.saturating_sub(1);
                            Duration::from_millis(50)
                        }
                    }
                    () = acked.notified() => return,
                    () = delivery.route_changed(&mut routes, &command.node_id, &used) => {
                        // Still queued on a stream its node left: send on the new route at once.
                        attempt = attempt.saturating_sub(1);
                        continue 'rounds;
                    }
                    _ = stopping.changed() => return,
                }
            }
            Route::Nowhere => {
                // Not held while the node is nowhere.
                payload = None;
                if Box::pin(dropped_with_its_saga(&engine, outbox_id, &command)).await {
                    return;
                }
                delivery.record_attempt(
                    outbox_id,
                    &command,
                    attempt,
                    "the node has no endpoint and no Subscribe stream".to_owned(),
                );
                delivery.resend_after
            }
        };
        tokio::select! {
            () = acked.notified() => return,
            () = tokio::time::sleep(wait) => {}
            () = delivery.route_changed(&mut routes, &command.node_id, &used) => {}
            _ = stopping.changed() => return,
        }
    }
}

/// The payload for the next send of `command`: `held` if the task has it, none for commands
/// that carry none, else read from the ledger. `None` when the delivery ends instead: the saga
/// was removed by retention (the command is dropped), the payload cannot be read (the entry is
/// kept for an operator), or the ledger closed.
async fn payload_to_send(
    engine: &Engine,
    outbox_id: u64,
    command: &Command,
    held: Option<store::PayloadRecord>,
) -> Option<store::PayloadRecord> {
    if !matches!(command.kind, Kind::Execute | Kind::Reverse) {
        return Some(store::PayloadRecord::default());
    }
    if let Some(held) = held {
        return Some(held);
    }
    loop {
        match engine.payload_of(command).await {
            Ok(Some(payload)) => return Some(payload),
            Ok(None) => {
                tracing::warn!(outbox_id, gsn = %command.gsn, node_id = %command.node_id, "the command's saga was removed by retention; the command is dropped, not sent without its payload");
                if let Err(e) = engine.drop_command_of_removed_saga(outbox_id).await {
                    tracing::warn!(outbox_id, error = %e, "dropping the command failed; it is looked at again at the next start");
                }
                return None;
            }
            Err(Error::Store(store::Error::Closed)) => return None,
            Err(e) if is_passing(&e) => {
                tracing::warn!(outbox_id, error = %e, "reading a command's payload failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            // Read again every second it would fail the same way for ever. Like an outbox
            // entry that does not decode, the entry is kept for an operator.
            Err(e) => {
                tracing::error!(outbox_id, gsn = %command.gsn, error = %e, "a command's payload cannot be read; its delivery stops and its outbox entry is kept for an operator");
                engine.shared.delivery.give_up(
                    outbox_id,
                    command,
                    format!("its payload cannot be read: {e}"),
                );
                return None;
            }
        }
    }
}

/// Drops a Signal, Execute or Reverse whose saga retention removed, as reading an Execute's or
/// Reverse's payload for a send does (`payload_to_send`); true if it did. A Signal reads no
/// payload, and a command for a node that is nowhere is not sent, so without this one to a node
/// that never comes back would be tried for ever after its saga is long gone. Looked at only
/// after a round that could not deliver, so a delivered command costs no read.
async fn dropped_with_its_saga(engine: &Engine, outbox_id: u64, command: &Command) -> bool {
    if !matches!(command.kind, Kind::Signal | Kind::Execute | Kind::Reverse) {
        return false;
    }
    match engine.saga_of_command_exists(command).await {
        Ok(true) => false,
        Ok(false) => {
            tracing::warn!(outbox_id, gsn = %command.gsn, node_id = %command.node_id, "the command's saga was removed by retention before its node got it; the command is dropped");
            if let Err(e) = engine.drop_command_of_removed_saga(outbox_id).await {
                tracing::warn!(outbox_id, error = %e, "dropping the command failed; it is looked at again at the next start");
                // Its task ends all the same: a command about a saga no longer there would
                // find it gone again.
                engine.shared.delivery.acknowledged(outbox_id);
            }
            true
        }
        // Asked again after the next round.
        Err(e) => {
            tracing::debug!(outbox_id, error = %e, "could not look whether a signal's saga is still there");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;

    /// An engine on a fresh ledger, on the system clock; `settings` adjusts the defaults.
    async fn engine(
        settings: impl FnOnce(&mut crate::engine::Settings),
    ) -> (tempfile::TempDir, store::Store, Engine) {
        crate::engine::testing::engine_on_fresh_ledger(
            Arc::new(crate::clock::SystemClock),
            settings,
        )
        .await
    }

    /// Waits (boundedly) for delivery `id` to stop, and checks that nothing is left in flight.
    async fn dropped(delivery: &Delivery, id: u64) {
        for _ in 0..500 {
            if !delivery.is_pending(id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!delivery.is_pending(id));
        assert_eq!(delivery.in_flight(), Vec::new());
    }

    /// `outgoing` queued with no delivery waiting for it.
    fn unwatched(outgoing: Outgoing) -> Queued {
        Queued {
            outbox_id: 0,
            outgoing,
            taken: oneshot::channel().0,
        }
    }

    /// A COMPLETED signal about saga `gsn` for `node_id`.
    fn signal_to(node_id: &str, gsn: &str) -> Command {
        Command {
            kind: Kind::Signal,
            gsn: gsn.to_owned(),
            branch_id: String::new(),
            node_id: node_id.to_owned(),
            action: String::new(),
            reason: String::new(),
            signal: 1,
            business_type: "order".to_owned(),
            attempt: 0,
        }
    }

    /// A node that subscribed, stopped reading (its stream's buffer is full) and subscribed
    /// again gets the command on its new stream: the delivery waiting for room on the old
    /// one gives up when the route changes.
    #[tokio::test]
    async fn a_delivery_waiting_on_a_full_abandoned_stream_sends_on_the_next_one() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        let _abandoned = delivery.subscribe("inventory");
        let Route::Pull(_, old) = delivery.route("inventory") else {
            panic!("the node subscribed");
        };
        let filler = Outgoing::test_signal("filler", "c1-0000000000000001");
        while old.try_send(unwatched(filler.clone())).is_ok() {}
        let command = signal_to("inventory", "c1-0000000000000002");
        delivery.spawn(engine.clone(), 7, command, None);
        // Let the delivery find the old stream full and wait on it.
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut renewed = delivery.subscribe("inventory");
        let sent = tokio::time::timeout(Duration::from_secs(5), renewed.queue.recv())
            .await
            .expect("the command reached the new stream")
            .unwrap()
            .take(delivery)
            .unwrap();
        assert_eq!(sent.gsn, "c1-0000000000000002", "{sent:?}");
        engine.stop();
        store.close().await.unwrap();
    }

    fn pushed_to(delivery: &Delivery, node_id: &str) -> Option<String> {
        match delivery.route(node_id) {
            Route::Push(endpoint, _) => Some(endpoint),
            Route::Pull(..) | Route::Nowhere => None,
        }
    }

    /// A node that comes back registers again, and every delivery waiting for it wakes to send
    /// now: the dial back-off it earned while down must not refuse them (they would each back
    /// off again, up to `redelivery_cap`, with the node up).
    #[tokio::test]
    async fn a_node_registered_again_at_its_endpoint_is_dialled_at_once_despite_the_back_off() {
        let endpoint = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let second = Duration::from_secs(1);
        let delivery = Delivery::new(second, second, second, second);
        delivery.set_endpoint("payment", &endpoint, 1);
        let call = || {
            delivery.participants.send(
                &endpoint,
                Outgoing::test_signal("s-1", "c1-0000000000000001"),
            )
        };
        let dialled = call().await.unwrap_err().to_string();
        assert!(!dialled.contains("the next in"), "{dialled}");
        let held = call().await.unwrap_err().to_string();
        assert!(held.contains("the next in"), "within the back-off: {held}");
        delivery.set_endpoint("payment", &endpoint, 2);
        let again = call().await.unwrap_err().to_string();
        assert!(!again.contains("the next in"), "dialled again: {again}");
    }

    #[test]
    fn a_registration_routed_after_a_newer_one_of_the_same_node_is_ignored() {
        let second = Duration::from_secs(1);
        let delivery = Delivery::new(second, second, second, second);
        delivery.set_endpoint("payment", "http://127.0.0.1:2", 8);
        // The follow-up of an earlier registration answered in the same group, run late.
        delivery.set_endpoint("payment", "http://127.0.0.1:1", 7);
        assert_eq!(
            pushed_to(&delivery, "payment").as_deref(),
            Some("http://127.0.0.1:2")
        );
        // A newer registration without an endpoint removes it, and keeps its stamp.
        delivery.set_endpoint("payment", "", 9);
        delivery.set_endpoint("payment", "http://127.0.0.1:1", 7);
        assert_eq!(pushed_to(&delivery, "payment"), None);
        delivery.set_endpoint("payment", "http://127.0.0.1:3", 10);
        assert_eq!(
            pushed_to(&delivery, "payment").as_deref(),
            Some("http://127.0.0.1:3")
        );
    }

    /// A command sent on node P's stream waits out `resend_after` before it is sent again, however
    /// often other nodes subscribe or register meanwhile.
    #[tokio::test]
    async fn a_command_on_a_stream_is_not_resent_when_another_node_subscribes_or_registers() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        let mut stream = delivery.subscribe("payment").queue;
        delivery.spawn(
            engine.clone(),
            7,
            signal_to("payment", "c1-0000000000000001"),
            None,
        );
        let first = tokio::time::timeout(Duration::from_secs(5), stream.recv())
            .await
            .expect("the command was sent")
            .unwrap()
            .take(delivery)
            .unwrap();
        assert_eq!(first.attempt, 1);

        for round in 0..5u64 {
            let _other = delivery.subscribe("inventory");
            delivery.set_endpoint("shipping", "http://127.0.0.1:9", round + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            stream.try_recv().is_err(),
            "sent again before resend_after on another node's route change"
        );
        engine.stop();
        store.close().await.unwrap();
    }

    /// A push delivery backing off from its node that is down keeps backing off when another
    /// node registers or subscribes: only its own node's new route makes it try at once.
    #[tokio::test]
    async fn a_push_delivery_backing_off_is_not_retried_when_another_node_registers() {
        let (_dir, store, engine) = engine(|settings| {
            settings.redelivery_base = Duration::from_secs(30);
            settings.redelivery_cap = Duration::from_secs(30);
        })
        .await;
        let delivery = &engine.shared.delivery;
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        delivery.set_endpoint("payment", &refused, 1);
        // A QueryStatus, which needs no saga in the ledger to be sent again.
        let query = Command {
            kind: Kind::QueryStatus,
            branch_id: "pay".to_owned(),
            action: "charge".to_owned(),
            ..signal_to("payment", "c1-0000000000000001")
        };
        delivery.spawn(engine.clone(), 7, query, None);
        let attempts = || {
            delivery
                .in_flight()
                .iter()
                .find(|f| f.outbox_id == 7 && !f.last_error.is_empty())
                .map(|f| f.attempts)
        };
        for _ in 0..500 {
            if attempts().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(attempts(), Some(1), "{:?}", delivery.in_flight());

        for round in 0..5u64 {
            delivery.set_endpoint("shipping", "http://127.0.0.1:9", round + 1);
            let _other = delivery.subscribe("inventory");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(attempts(), Some(1), "{:?}", delivery.in_flight());

        // Its own node registering again, at the same endpoint (it restarted) or a new one, is
        // tried at once.
        for (stamp, endpoint) in [(2, refused.as_str()), (3, "http://127.0.0.1:9")] {
            delivery.set_endpoint("payment", endpoint, stamp);
            let expected = Some(stamp as u32);
            for _ in 0..500 {
                if attempts() == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(attempts(), expected, "{:?}", delivery.in_flight());
        }
        engine.stop();
        store.close().await.unwrap();
    }

    /// Outbox id `n`'s Signal about saga `c1-<n>` for `node_id`, handed to delivery.
    fn spawn_signal(engine: &Engine, node_id: &str, n: u64) {
        let gsn = format!("c1-{n:016}");
        engine
            .shared
            .delivery
            .spawn(engine.clone(), n, signal_to(node_id, &gsn), None);
    }

    /// The commands waiting in `stream`'s queue now, read without waiting for more (so none
    /// of them is sent again meanwhile).
    fn read_what_is_queued(
        stream: impl futures::Stream<Item = Result<Outgoing, Error>>,
    ) -> Vec<String> {
        use futures::{FutureExt, StreamExt};
        let mut stream = std::pin::pin!(stream);
        let mut read = Vec::new();
        while let Some(Some(next)) = stream.next().now_or_never() {
            read.push(next.unwrap().command_id);
        }
        read
    }

    /// A node that has not read its stream for several `resend_after` (back after an outage
    /// with a backlog, or slower than its commands come) is not queued a copy of a command
    /// still waiting there: the clock starts when the stream takes the command, so reading
    /// the backlog gives each command once rather than piles of duplicates.
    #[tokio::test]
    async fn a_command_still_queued_on_a_stream_the_node_has_not_read_is_not_queued_again() {
        let (_dir, store, engine) = engine(|settings| {
            settings.resend_after = Duration::from_millis(100);
        })
        .await;
        let subscription = engine.subscribe("payment").unwrap();
        for n in 1..=3 {
            spawn_signal(&engine, "payment", n);
        }
        // More than twice resend_after with nothing read.
        tokio::time::sleep(Duration::from_millis(450)).await;

        let mut read = read_what_is_queued(subscription.into_stream());
        read.sort();
        let mut once = read.clone();
        once.dedup();
        assert_eq!(read, once, "a command was queued again");
        assert_eq!(read.len(), 3, "{read:?}");
        engine.stop();
        store.close().await.unwrap();
    }

    /// The promise the clock keeps: a command the stream took and the node did not answer is
    /// sent again once `resend_after` has passed, with the same id.
    #[tokio::test]
    async fn a_command_the_stream_took_and_the_node_left_unanswered_is_sent_again() {
        use futures::StreamExt;
        let (_dir, store, engine) = engine(|settings| {
            settings.resend_after = Duration::from_millis(100);
        })
        .await;
        let mut stream = Box::pin(engine.subscribe("payment").unwrap().into_stream());
        spawn_signal(&engine, "payment", 1);
        let mut sends = Vec::new();
        for _ in 0..2 {
            let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("sent within the limit")
                .unwrap()
                .unwrap();
            sends.push((next.command_id, next.attempt));
        }
        assert_eq!(sends[0].0, sends[1].0);
        assert_eq!((sends[0].1, sends[1].1), (1, 2));
        engine.stop();
        store.close().await.unwrap();
    }

    /// A command answered (by a ReportState on another connection, say) while it still waits
    /// in the stream's queue is not handed to the node when it gets there.
    #[tokio::test]
    async fn a_command_answered_while_still_queued_on_a_stream_is_not_sent_on_it() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        let subscription = engine.subscribe("payment").unwrap();
        spawn_signal(&engine, "payment", 1);
        spawn_signal(&engine, "payment", 2);
        for _ in 0..500 {
            if delivery.in_flight().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        delivery.acknowledged(1);

        let read = read_what_is_queued(subscription.into_stream());
        assert_eq!(read.len(), 1, "{read:?}");
        assert!(read[0].starts_with("c1-0000000000000002"), "{read:?}");
        engine.stop();
        store.close().await.unwrap();
    }

    /// A delivery waiting for room on its node's full stream does not hold its payload: it
    /// reads it again once there is room. Shown by a command whose saga is gone by then
    /// (none is in the ledger): it is dropped on that read instead of sent with the payload it
    /// came with.
    #[tokio::test]
    async fn a_delivery_waiting_for_room_on_a_full_stream_does_not_hold_its_payload() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        let mut stream = delivery.subscribe("inventory");
        let Route::Pull(_, sender) = delivery.route("inventory") else {
            panic!("the node subscribed");
        };
        let filler = Outgoing::test_signal("filler", "c1-0000000000000001");
        while sender.try_send(unwatched(filler.clone())).is_ok() {}
        let execute = Command {
            kind: Kind::Execute,
            branch_id: "pay".to_owned(),
            action: "charge".to_owned(),
            ..signal_to("inventory", "c1-0000000000000002")
        };
        let held = store::PayloadRecord {
            data: b"{\"amount\":1}".to_vec(),
            content_type: "application/json".to_owned(),
        };
        delivery.spawn(engine.clone(), 7, execute, Some(held));
        // Let it find the stream full and wait for room, then make room.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let first = stream.queue.recv().await.unwrap();
        assert_eq!(first.outgoing.command_id, "filler");

        dropped(delivery, 7).await;
        while let Ok(queued) = stream.queue.try_recv() {
            assert_eq!(queued.outgoing.command_id, "filler");
        }
        engine.stop();
        store.close().await.unwrap();
    }

    /// Two subscribers for one node_id keep replacing each other; the replaced stream ends
    /// with an error that says so, rather than as if sagad had nothing more to send.
    #[tokio::test]
    async fn a_stream_replaced_by_a_newer_subscribe_ends_with_an_error_saying_so() {
        use futures::StreamExt;
        let (_dir, store, engine) = engine(|_| {}).await;
        let mut first = Box::pin(engine.subscribe("payment").unwrap().into_stream());
        let _second = engine.subscribe("payment").unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), first.next())
            .await
            .expect("the replaced stream ends");
        assert!(
            matches!(&ended, Some(Err(Error::Replaced { node_id })) if node_id == "payment"),
            "{ended:?}"
        );
        assert!(first.next().await.is_none());
        engine.stop();
        store.close().await.unwrap();
    }

    /// A delivery whose command is answered (ReportState) while its push call is still failing
    /// leaves the list of deliveries in flight: the failure the task reports afterwards is
    /// not recorded.
    #[test]
    fn a_delivery_answered_while_its_send_fails_is_not_listed_afterwards() {
        let second = Duration::from_secs(1);
        let delivery = Delivery::new(second, second, second, second);
        delivery
            .pending
            .lock()
            .unwrap()
            .insert(7, Arc::new(Notify::new()));
        let command = signal_to("payment", "c1-0000000000000001");
        delivery.record_attempt(7, &command, 1, String::new());
        assert_eq!(delivery.in_flight().len(), 1);
        delivery.acknowledged(7);
        delivery.record_attempt(7, &command, 1, "connection refused".to_owned());
        assert_eq!(delivery.in_flight(), Vec::new());
    }

    /// A Signal to a node that has no endpoint and no stream, of a saga retention removed, is
    /// dropped from the outbox instead of being tried every `resend_after` for ever.
    #[tokio::test]
    async fn a_signal_of_a_removed_saga_to_a_node_that_is_nowhere_is_dropped() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        // No saga c1-...01 is in the ledger: as after retention removed it.
        delivery.spawn(
            engine.clone(),
            7,
            signal_to("gone", "c1-0000000000000001"),
            None,
        );
        dropped(delivery, 7).await;
        engine.stop();
        store.close().await.unwrap();
    }

    /// An Execute whose saga retention removed while it waited for a node that is nowhere is
    /// dropped, though its task holds no payload to read (the read that drops a resumed one).
    #[tokio::test]
    async fn an_execute_of_a_removed_saga_to_a_node_that_is_nowhere_is_dropped() {
        let (_dir, store, engine) = engine(|_| {}).await;
        let delivery = &engine.shared.delivery;
        let execute = Command {
            kind: Kind::Execute,
            branch_id: "pay".to_owned(),
            action: "charge".to_owned(),
            ..signal_to("gone", "c1-0000000000000001")
        };
        // As a new command brings it: no ledger read before its first round.
        delivery.spawn(
            engine.clone(),
            7,
            execute,
            Some(store::PayloadRecord::default()),
        );
        dropped(delivery, 7).await;
        engine.stop();
        store.close().await.unwrap();
    }
}
