//! Participant nodes: their push endpoints (RegisterNode, and `--node` at start, both stored in
//! the ledger so the latest registration wins across restarts), their Subscribe streams, and
//! saga watchers.

use std::future::Future;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::domain::ids::{NodeId, RequestId};
use crate::domain::saga::{Limits, Saga};
use crate::engine::delivery::{Queued, Subscribed};
use crate::engine::{Answered, Engine, Error};
use crate::store::NodeRecord;
use crate::transport::Outgoing;

fn check_node_id(node_id: &str) -> Result<(), Error> {
    NodeId::parse(node_id)
        .map(|_| ())
        .map_err(|e| Error::invalid("node_id", e.to_string()))
}

fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    if endpoint.is_empty() {
        return Ok(());
    }
    if endpoint.len() > Limits::MAX_ENDPOINT {
        return Err(Error::invalid(
            "endpoint",
            format!(
                "is {} bytes long; at most {} are allowed",
                endpoint.len(),
                Limits::MAX_ENDPOINT
            ),
        ));
    }
    match crate::transport::endpoint_problem(endpoint) {
        None => Ok(()),
        Some(problem) => Err(Error::invalid(
            "endpoint",
            format!("{problem}; or empty for a node that subscribes"),
        )),
    }
}

/// A node's Subscribe stream: commands until the client goes away or a newer Subscribe for
/// the same node replaces it.
pub struct Subscription {
    queue: mpsc::Receiver<Queued>,
    replaced: oneshot::Receiver<()>,
    guard: SubscriptionGuard,
}

/// Forgets the stream when it is dropped (the client disconnected).
struct SubscriptionGuard {
    engine: Engine,
    node_id: String,
    id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.engine
            .shared
            .delivery
            .unsubscribe(&self.node_id, self.id);
    }
}

impl Subscription {
    /// The commands, as the node reads them; ends with `Error::Replaced` once a newer
    /// Subscribe for the node replaced this one.
    pub fn into_stream(self) -> impl Stream<Item = Result<Outgoing, Error>> + Send + 'static {
        futures::stream::unfold(Some(self), |subscription| async move {
            let mut subscription = subscription?;
            loop {
                let queued = tokio::select! {
                    // Before what is still queued: the delivery tasks send it on the new stream.
                    biased;
                    replaced = &mut subscription.replaced => {
                        // `Err` only if delivery is gone, which ends the stream anyway.
                        replaced.ok()?;
                        let node_id = subscription.guard.node_id.clone();
                        return Some((Err(Error::Replaced { node_id }), None));
                    }
                    queued = subscription.queue.recv() => queued?,
                };
                if let Some(outgoing) = queued.take(&subscription.guard.engine.shared.delivery) {
                    return Some((Ok(outgoing), Some(subscription)));
                }
            }
        })
    }

    pub fn node_id(&self) -> &str {
        &self.guard.node_id
    }
}

impl Engine {
    /// Stores the endpoints given at start, where they differ from the ledger's.
    pub async fn register_configured_nodes(&self, nodes: &[(String, String)]) -> Result<(), Error> {
        for (node_id, endpoint) in nodes {
            check_node_id(node_id)?;
            check_endpoint(endpoint)?;
            let record = NodeRecord {
                node_id: node_id.clone(),
                endpoint: endpoint.clone(),
                updated_ms: self.clock.now_ms(),
            };
            self.store
                .write(move |tx| -> Result<(), Error> {
                    if tx
                        .node(&record.node_id)?
                        .is_none_or(|n| n.endpoint != record.endpoint)
                    {
                        tx.put_node(&record)?;
                    }
                    Ok(())
                })
                .await??;
        }
        Ok(())
    }

    /// RegisterNode (idempotent on its request id).
    pub async fn register_node<F>(
        &self,
        request_id: &str,
        node_id: &str,
        endpoint: &str,
        fingerprint: Vec<u8>,
        encode: F,
    ) -> Result<Answered, Error>
    where
        F: FnOnce(&NodeRecord) -> Vec<u8> + Send + 'static,
    {
        let request_id = RequestId::parse(request_id)
            .map_err(|e| Error::invalid("request_id", e.to_string()))?;
        check_node_id(node_id)?;
        check_endpoint(endpoint)?;
        let node_id = node_id.to_owned();
        let endpoint = endpoint.to_owned();
        let written =
            self.idempotent_write_with("RegisterNode", &request_id, fingerprint, move |tx, now| {
                let record = NodeRecord {
                    node_id,
                    endpoint,
                    updated_ms: now,
                };
                tx.put_node(&record)?;
                Ok((encode(&record), (tx.stamp(), record)))
            });
        // Routed on the write's own task, so a caller that gives up mid-write does not leave
        // the endpoint stored but unused until the next start.
        let engine = self.clone();
        self.commit(async move {
            let (answered, stored) = written.await?;
            if let Some((stamp, record)) = stored {
                tracing::info!(node = %record.node_id, endpoint = %record.endpoint, "node registered");
                engine
                    .shared
                    .delivery
                    .set_endpoint(&record.node_id, &record.endpoint, stamp);
            }
            Ok(answered)
        })
        .await
    }

    /// Subscribe: the node's commands on a stream, starting with every one still undelivered.
    pub fn subscribe(&self, node_id: &str) -> Result<Subscription, Error> {
        check_node_id(node_id)?;
        let Subscribed {
            id,
            queue,
            replaced,
        } = self.shared.delivery.subscribe(node_id);
        tracing::info!(node = %node_id, "node subscribed");
        Ok(Subscription {
            queue,
            replaced,
            guard: SubscriptionGuard {
                engine: self.clone(),
                node_id: node_id.to_owned(),
                id,
            },
        })
    }

    /// Shutdown begins: Subscribe and WatchSaga streams end now (see `streams_ended`), before
    /// the server drains, while delivery and the ledger keep working for requests in flight.
    pub fn end_streams(&self) {
        self.shared.delivery.end_streams();
    }

    /// Resolves once shutdown began: a Subscribe or WatchSaga stream ends then, because the
    /// server's drain waits for every open stream and these end only when their node goes
    /// away or their saga ends.
    pub fn streams_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        self.shared.delivery.streams_ended()
    }

    /// WatchSaga: the saga now, then after every change, ending once it is terminal.
    pub async fn watch_saga(
        &self,
        gsn_text: &str,
    ) -> Result<impl Stream<Item = Arc<Saga>> + Send + 'static, Error> {
        // Subscribe before the read, so no change stored between the two is missed; the GSN
        // names the sequence, so one read is enough. A GSN that names no saga leaves an
        // unwatched entry, which the next sweep removes. The receiver keeps the version it
        // subscribed at: a change published before the read is still seen as new, so a
        // terminal state published meanwhile is never lost; the stamps tell it apart.
        let sequence = self.parse_gsn(gsn_text)?.sequence();
        let changes = self.shared.watchers.subscribe(sequence);
        let (read_stamp, current) = self.stamped_saga(gsn_text).await?;
        let state = (Some(Arc::new(current)), changes, read_stamp, false);
        Ok(futures::stream::unfold(
            state,
            |(pending, mut changes, mut last, done)| async move {
                if done {
                    return None;
                }
                if let Some(saga) = pending {
                    let terminal = saga.state.is_terminal();
                    return Some((saga, (None, changes, last, terminal)));
                }
                loop {
                    changes.changed().await.ok()?;
                    let latest = changes.borrow_and_update().clone();
                    // A state no newer than the last one shown (the read may have seen a write
                    // whose publication comes after it) would take the watcher back.
                    if let Some(published) = latest.filter(|p| p.stamp > last) {
                        last = published.stamp;
                        let saga = published.saga;
                        let terminal = saga.state.is_terminal();
                        return Some((saga, (None, changes, last, terminal)));
                    }
                }
            },
        ))
    }
}
