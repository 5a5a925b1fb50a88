//! One HTTP/2 connection per participant endpoint, driven by the calling task itself: the
//! layer under tonic's generated client that replaces `tonic::transport::Channel` for sagad's
//! own calls to nodes.
//!
//! Why not `Channel`: every call through it passed a buffer task, hyper's dispatch task, and
//! then two tasks hyper spawns per request (one awaiting the response, one piping the request
//! body into the stream), so a command crossed four task hand-offs before a byte moved
//! (callgrind: ≈ a quarter of sagad's instructions per saga were that client stack; see
//! docs/benchmarks.md). Here the delivery task opens the stream, queues the whole encoded
//! request on it, and reads the answer itself; only the connection's socket I/O runs in a task
//! of its own. gRPC itself (framing, codec, status, trailers) stays tonic's.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Uri;
use http_body::{Body, Frame};

use crate::clock::{SharedClock, SystemClock};
use crate::domain::Millis;

/// Larger than HTTP/2's 64 KiB default so a node's answer, or a payload sent to it, rarely
/// waits for a window update; the numbers are hyper's client defaults, which `Channel` used.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// How often one call is sent again at once when the node refuses its stream unprocessed.
/// One is what a stream opened before the node's stream limit was known needs; a node that
/// keeps refusing is failing, and the delivery's back-off takes over.
const RESENDS_WHEN_REFUSED: u32 = 2;

/// A connection on which no call started for a whole check of this length (so idle for
/// between one and two of them) stops being current and closes once its last stream ends; the
/// next call dials again. A connection can die without a word (a node's host lost power, a
/// firewall forgot the flow), and one kept for a node that gets a command every few minutes
/// would more likely be dead than not, costing the call its whole timeout. hyper's pool closes
/// idle connections after 90 s for the same reason.
///
/// No HTTP/2 PING is sent instead: gRPC servers count a PING on a connection without calls
/// (grpc-go and grpc-java, by default) or more often than every 5 minutes as abuse, and after
/// a few close the connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_pings"), failing any
/// call on it. A call on a connection that died is caught by the call's deadline, which drops
/// the connection (`Participants::send`).
const IDLE_CHECK: Duration = Duration::from_secs(45);

/// TCP keepalive on each dialled socket: the kernel probes an idle connection after
/// `KEEPALIVE_TIME` and every `KEEPALIVE_INTERVAL` after that, and fails it after
/// `KEEPALIVE_PROBES` unanswered ones, so a connection whose peer vanished ends (and the next
/// call dials again) within about a minute without the node's gRPC stack seeing anything.
const KEEPALIVE_TIME: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;

/// After a failed dial, calls fail with its reason without dialling for this long, doubling
/// with each failed dial up to `DIAL_BACKOFF_MAX` and forgotten once a dial succeeds. Each
/// delivery backs off on its own, so without this an endpoint that refuses (in well under a
/// millisecond) was dialled, and its host name resolved, once per pending command per round:
/// at a rate that grew with the backlog. With it, a node that comes back is dialled at most
/// `DIAL_BACKOFF_MAX` late.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a call did not reach the node or came back broken at the HTTP/2 level.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {endpoint} failed: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error("the connection to {endpoint} failed: {source}")]
    Http2 {
        endpoint: String,
        #[source]
        source: h2::Error,
    },
    #[error("the request body could not be encoded: {0}")]
    Body(tonic::Status),
    /// The stream broke while the answer was read: the node's answer never came whole.
    #[error("the answer broke off: {0}")]
    Answer(#[source] h2::Error),
}

/// The endpoint's connection, dialled on first use and again after it breaks.
pub struct Peer {
    endpoint: String,
    /// `http://host:port/`, what tonic starts each request's URI with.
    origin: Uri,
    authority: (String, u16),
    connect_timeout: Duration,
    idle_check: Duration,
    /// Times the dial back-off. The system clock even under an engine driven by a
    /// `ManualClock`: a clock that never moves would keep a node undialled for ever.
    clock: SharedClock,
    /// Shared with each connection's task, which takes an idle connection out of it.
    state: Arc<Mutex<State>>,
    /// Held while dialling so that concurrent calls to a node that is not connected wait for
    /// one connection instead of each opening their own.
    dialling: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The live connection's sender, with the number of the dial that opened it.
    current: Option<(u64, h2::client::SendRequest<Bytes>)>,
    /// Dials started so far.
    dials: u64,
    /// Dials that failed so far, and why the last one did.
    failures: u64,
    last_failure: String,
    /// When the last dial failed, and how long after it no call dials (0: dial at once).
    failed_at_ms: Millis,
    backoff_ms: Millis,
    /// Calls made so far; a connection's task sees by it whether the connection is idle.
    calls: u64,
}

/// What a call that waited for the dial lock found.
enum Claim {
    /// A live connection (another call dialled it), with its dial number.
    Live(u64, h2::client::SendRequest<Bytes>),
    /// None: this call dials, as this dial number.
    Dial(u64),
}

impl Peer {
    /// `origin` is the endpoint's `http://host[:port]/`, already checked.
    pub fn new(endpoint: &str, origin: Uri, connect_timeout: Duration) -> Peer {
        let host = origin.host().unwrap_or_default();
        // A bracketed IPv6 literal is dialled without its brackets.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let authority = (host.to_owned(), origin.port_u16().unwrap_or(80));
        Peer {
            endpoint: endpoint.to_owned(),
            origin,
            authority,
            connect_timeout,
            idle_check: IDLE_CHECK,
            clock: Arc::new(SystemClock),
            state: Arc::new(Mutex::new(State::default())),
            dialling: tokio::sync::Mutex::new(()),
        }
    }

    pub fn origin(&self) -> &Uri {
        &self.origin
    }

    /// The host and port dialled.
    #[cfg(test)]
    pub fn address(&self) -> (&str, u16) {
        (&self.authority.0, self.authority.1)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The next call dials at once, whatever dials failed before.
    pub fn end_backoff(&self) {
        self.state().backoff_ms = 0;
    }

    /// Forgets connection `dial` once a call found it broken or got no answer on it, unless a
    /// newer one replaced it. The next call dials again; calls still on it keep it.
    pub fn drop_connection(&self, dial: u64) {
        forget(&mut self.state(), dial);
    }

    /// A sender on a live connection, ready to open a stream, with the connection's dial number.
    async fn ready_sender(&self) -> Result<(u64, h2::client::SendRequest<Bytes>), Error> {
        let (current, failures_seen) = {
            let mut state = self.state();
            state.calls = state.calls.wrapping_add(1);
            (state.current.clone(), state.failures)
        };
        if let Some((dial, sender)) = current {
            match sender.ready().await {
                Ok(sender) => return Ok((dial, sender)),
                // The connection broke since the last call (the node restarted, say): the
                // request has not left, so dial again once rather than fail the call.
                Err(e) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %e, "connection closed; dialling again");
                    self.drop_connection(dial);
                }
            }
        }
        let (dial, sender) = {
            let _dialling = self.dialling.lock().await;
            match self.claim(failures_seen)? {
                Claim::Live(dial, sender) => (dial, sender),
                Claim::Dial(dial) => (dial, self.dial_as(dial).await?),
            }
        };
        let sender = sender.ready().await.map_err(|source| {
            self.drop_connection(dial);
            Error::Http2 {
                endpoint: self.endpoint.clone(),
                source,
            }
        })?;
        Ok((dial, sender))
    }

    /// Under the dial lock: the connection another call opened meanwhile, or the number of the
    /// dial this call makes. A dial that failed while this call waited for the lock means the
    /// node is not there now: fail with that dial's reason rather than queue one more connect
    /// behind it (each may take the whole connect timeout); the delivery backs off and tries
    /// again. So does one within the back-off after the last failed dial.
    fn claim(&self, failures_seen: u64) -> Result<Claim, Error> {
        let mut state = self.state();
        if let Some((dial, sender)) = state.current.clone() {
            return Ok(Claim::Live(dial, sender));
        }
        if state.failures != failures_seen {
            return Err(Error::Connect {
                endpoint: self.endpoint.clone(),
                detail: state.last_failure.clone(),
            });
        }
        let now = self.clock.now_ms();
        // A clock set back ends the wait rather than stretching it.
        let since = now.checked_sub(state.failed_at_ms);
        if let Some(since) = since.filter(|since| *since < state.backoff_ms) {
            return Err(Error::Connect {
                endpoint: self.endpoint.clone(),
                detail: format!(
                    "{} (a dial {since} ms ago; the next in {} ms)",
                    state.last_failure,
                    state.backoff_ms - since
                ),
            });
        }
        state.dials += 1;
        Ok(Claim::Dial(state.dials))
    }

    /// Dials as dial number `dial`, and records the connection or why it failed.
    async fn dial_as(&self, dial: u64) -> Result<h2::client::SendRequest<Bytes>, Error> {
        match self.dial(dial).await {
            Ok(sender) => {
                let mut state = self.state();
                state.current = Some((dial, sender.clone()));
                state.backoff_ms = 0;
                Ok(sender)
            }
            Err(e) => {
                let failed_at_ms = self.clock.now_ms();
                let mut state = self.state();
                state.failures += 1;
                state.last_failure = match &e {
                    Error::Connect { detail, .. } => detail.clone(),
                    other => other.to_string(),
                };
                state.failed_at_ms = failed_at_ms;
                state.backoff_ms = next_backoff(state.backoff_ms);
                Err(e)
            }
        }
    }

    async fn dial(&self, dial: u64) -> Result<h2::client::SendRequest<Bytes>, Error> {
        let connect_error = |detail: String| Error::Connect {
            endpoint: self.endpoint.clone(),
            detail,
        };
        let (host, port) = (&self.authority.0, self.authority.1);
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| connect_error(format!("no connection within {:?}", self.connect_timeout)))?
        .map_err(|e| connect_error(e.to_string()))?;
        // Commands are small and answered one by one: Nagle's delay would hold each back.
        stream
            .set_nodelay(true)
            .map_err(|e| connect_error(e.to_string()))?;
        // Only a help to notice a dead peer sooner (idle close and call deadlines do it too):
        // a system that refuses the options must not make every node unreachable.
        if let Err(e) = keep_alive(&stream) {
            tracing::warn!(endpoint = %self.endpoint, error = %e, "TCP keepalive could not be set on a connection to a node");
        }
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| connect_error(format!("HTTP/2 handshake: {e}")))?;
        let endpoint = self.endpoint.clone();
        let idle = idle(Arc::downgrade(&self.state), dial, self.idle_check);
        tokio::spawn(async move {
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(%endpoint, error = %e, "connection to a node ended");
                    }
                    return;
                }
                () = idle => {
                    tracing::debug!(%endpoint, "closing an idle connection to a node");
                }
            }
            // No longer current, the connection sends GOAWAY and ends once the calls still on
            // it are answered.
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "connection to a node ended");
            }
        });
        Ok(sender)
    }

    /// Sends one gRPC request as tonic built it and returns the response, its body read from
    /// the stream as the caller polls it.
    /// The number of the connection the request was sent on goes to `sent_on`, so that a
    /// caller that gives up waiting can drop that connection (`drop_connection`).
    pub async fn call(
        &self,
        request: http::Request<tonic::body::Body>,
        sent_on: &AtomicU64,
    ) -> Result<http::Response<ResponseBody>, Error> {
        let (parts, mut body) = request.into_parts();
        let data = collect(&mut body).await.map_err(Error::Body)?;
        let mut refusals = 0;
        loop {
            match self.exchange(head(&parts), data.clone(), sent_on).await {
                // REFUSED_STREAM means the node did not process the request (RFC 9113, 8.7),
                // typically a stream opened before the node's SETTINGS told its stream limit:
                // send it again now instead of failing the send and waiting out a back-off.
                Err(Error::Http2 { source, .. })
                    if refusals < RESENDS_WHEN_REFUSED
                        && source.is_remote()
                        && source.reason() == Some(h2::Reason::REFUSED_STREAM) =>
                {
                    refusals += 1;
                    tracing::debug!(endpoint = %self.endpoint, "stream refused; sending again");
                }
                other => return other,
            }
        }
    }

    /// One send of the request on the live connection, and the response's head.
    async fn exchange(
        &self,
        head: http::Request<()>,
        data: Bytes,
        sent_on: &AtomicU64,
    ) -> Result<http::Response<ResponseBody>, Error> {
        let (dial, mut sender) = self.ready_sender().await?;
        sent_on.store(dial, Ordering::Relaxed);
        let broken = |source: h2::Error| Error::Http2 {
            endpoint: self.endpoint.clone(),
            source,
        };
        let (response, mut stream) = sender.send_request(head, data.is_empty()).map_err(broken)?;
        if !data.is_empty() {
            // Queued whole: h2 sends it as the peer's window allows, and a unary request
            // fits the window this connection opens with.
            stream.send_data(data, true).map_err(broken)?;
        }
        let response = response.await.map_err(broken)?;
        Ok(response.map(|recv| ResponseBody {
            recv,
            data_done: false,
            done: false,
        }))
    }
}

/// The dial back-off after one more failed dial, given the one before it (0: none).
fn next_backoff(backoff_ms: Millis) -> Millis {
    let min = millis(DIAL_BACKOFF_MIN);
    let max = millis(DIAL_BACKOFF_MAX);
    backoff_ms.saturating_mul(2).clamp(min, max)
}

fn millis(duration: Duration) -> Millis {
    Millis::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes connection `dial` out of `state` unless a newer one replaced it.
fn forget(state: &mut State, dial: u64) {
    if state.current.as_ref().is_some_and(|(n, _)| *n == dial) {
        state.current = None;
    }
}

/// Resolves once no call was made for a whole `check` after connection `dial` became
/// current, having taken it out of `state`; never if it stopped being current first or the
/// peer is gone (which drops its sender, so the connection ends by itself).
async fn idle(state: Weak<Mutex<State>>, dial: u64, check: Duration) {
    let mut seen = None;
    loop {
        tokio::time::sleep(check).await;
        let Some(state) = state.upgrade() else {
            return std::future::pending().await;
        };
        let current = {
            let mut state = lock(&state);
            let current = state.current.as_ref().is_some_and(|(n, _)| *n == dial);
            if current && seen == Some(state.calls) {
                forget(&mut state, dial);
                return;
            }
            seen = Some(state.calls);
            current
        };
        if !current {
            return std::future::pending().await;
        }
    }
}

/// Turns on TCP keepalive probes (see `KEEPALIVE_TIME`).
fn keep_alive(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&probes)
}

/// A request's head as tonic built it, for one send (a refused stream is sent again).
fn head(parts: &http::request::Parts) -> http::Request<()> {
    let mut head = http::Request::new(());
    *head.method_mut() = parts.method.clone();
    *head.uri_mut() = parts.uri.clone();
    *head.version_mut() = parts.version;
    *head.headers_mut() = parts.headers.clone();
    head
}

/// A unary request's encoded body: tonic yields it at once, in one frame for a unary call.
async fn collect(body: &mut tonic::body::Body) -> Result<Bytes, tonic::Status> {
    let mut first: Option<Bytes> = None;
    let mut rest: Option<BytesMut> = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            // A request's trailers: gRPC requests have none.
            continue;
        };
        match (&mut first, &mut rest) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut joined = BytesMut::from(head.as_ref());
                joined.extend_from_slice(&data);
                rest = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
    }
    Ok(match rest {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// A response body read straight from its HTTP/2 stream: its data, then its trailers (where
/// gRPC puts the call's status).
#[derive(Debug)]
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    // Ours, not h2's: tonic turns a body error into the call's status with the error as its
    // source, and only our own type tells `Participants::send` that the node's answer broke
    // off rather than that the node answered with an error.
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read means consumed: give the window back, or the node stalls once
                    // the connection's window is spent.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::Answer(e))));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Error::Answer(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    /// Deliveries queued behind a dial that fails (the node is down) fail with that dial's
    /// reason instead of each dialling in turn, which for an address that does not answer
    /// would cost every one of them the whole connect timeout.
    #[tokio::test]
    async fn calls_waiting_on_a_failed_dial_fail_with_its_reason_instead_of_dialling_again() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let origin: Uri = format!("{endpoint}/").parse().unwrap();
        let peer = Arc::new(Peer::new(&endpoint, origin, Duration::from_secs(2)));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let peer = peer.clone();
                tokio::spawn(async move { peer.ready_sender().await.err() })
            })
            .collect();
        for call in calls {
            let error = call.await.unwrap().expect("nothing listens there");
            assert!(
                matches!(&error, Error::Connect { endpoint: e, .. } if *e == endpoint),
                "{error}"
            );
        }
        let state = peer.state();
        assert!(state.dials < 8, "{} dials for 8 calls", state.dials);
        assert_eq!(state.failures, state.dials);
        assert!(!state.last_failure.is_empty());
    }

    /// A peer of `endpoint` whose dial back-off is timed by a manual clock starting at `ms`.
    fn peer_on_manual_clock(endpoint: &str, ms: u64) -> (Peer, Arc<crate::clock::ManualClock>) {
        let clock = Arc::new(crate::clock::ManualClock::new(ms));
        let mut peer = Peer::new(
            endpoint,
            format!("{endpoint}/").parse().unwrap(),
            Duration::from_secs(2),
        );
        peer.clock = clock.clone();
        (peer, clock)
    }

    /// A port nothing listens on, so a dial to it is refused at once.
    fn refusing_endpoint() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    }

    /// Each delivery backs off on its own, so a node with a backlog got one dial (and one DNS
    /// lookup) per pending command per round. Now one failed dial holds the next back for
    /// `DIAL_BACKOFF_MIN`, doubling up to `DIAL_BACKOFF_MAX`, whatever the number of calls.
    #[tokio::test]
    async fn many_deliveries_to_a_refusing_endpoint_dial_it_at_a_bounded_rate() {
        let endpoint = refusing_endpoint();
        let (peer, clock) = peer_on_manual_clock(&endpoint, 1_000_000);
        for _ in 0..100 {
            let Err(error) = peer.ready_sender().await else {
                panic!("nothing listens at {endpoint}");
            };
            assert!(
                matches!(&error, Error::Connect { endpoint: e, detail } if *e == endpoint && !detail.is_empty()),
                "{error}"
            );
        }
        assert_eq!(peer.state().dials, 1, "100 calls at one instant dial once");

        // A minute of 5 calls every 10 ms: 30,000 calls.
        let minute_ms: u64 = 60_000;
        for _ in 0..minute_ms / 10 {
            clock.advance_ms(10);
            for _ in 0..5 {
                assert!(peer.ready_sender().await.is_err());
            }
        }
        let state = peer.state();
        let dials = state.dials - 1;
        let cap = minute_ms / millis(DIAL_BACKOFF_MAX);
        assert!(
            dials <= cap + 8,
            "{dials} dials in a minute; the back-off allows about {cap}"
        );
        assert!(
            dials + 2 > cap,
            "the node is still tried every {DIAL_BACKOFF_MAX:?}: {dials} dials"
        );
        assert_eq!(state.failures, state.dials);
        assert_eq!(state.backoff_ms, millis(DIAL_BACKOFF_MAX));
    }

    /// A node that comes back is dialled by the first call once the back-off after the failed
    /// dial has passed, and a dial that succeeds forgets the back-off.
    #[tokio::test]
    async fn a_node_that_comes_back_is_dialled_by_the_first_call_after_the_back_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = format!("http://{addr}");
        let (peer, clock) = peer_on_manual_clock(&endpoint, 1_000_000);
        assert!(peer.ready_sender().await.is_err());

        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            // Serve until the client goes away; no request is made here.
            while let Some(Ok(request)) = connection.accept().await {
                drop(request);
            }
        });
        clock.advance_ms(millis(DIAL_BACKOFF_MIN) - 1);
        assert!(peer.ready_sender().await.is_err(), "within the back-off");
        assert_eq!(peer.state().dials, 1);
        clock.advance_ms(1);
        assert!(peer.ready_sender().await.is_ok());
        assert!(peer.state().current.is_some());
        assert_eq!(peer.state().backoff_ms, 0);
        drop(peer);
        server.await.unwrap();
    }

    /// A clock set back ends the back-off rather than holding the node back until it catches up.
    #[tokio::test]
    async fn a_clock_set_back_does_not_stretch_the_dial_back_off() {
        let endpoint = refusing_endpoint();
        let (peer, clock) = peer_on_manual_clock(&endpoint, 10_000_000);
        assert!(peer.ready_sender().await.is_err());
        clock.set_ms(10_000_000 - 3_600_000);
        assert!(peer.ready_sender().await.is_err());
        assert_eq!(peer.state().dials, 2, "dialled again");
    }

    #[test]
    fn the_dial_back_off_doubles_from_its_least_to_its_most() {
        let mut backoff = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            backoff = next_backoff(backoff);
            seen.push(backoff);
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    /// The HTTP/2 frame types in what a client sent on one connection, after its preface.
    fn frame_types(mut sent: &[u8]) -> Vec<u8> {
        sent = sent
            .strip_prefix(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        let mut types = Vec::new();
        while sent.len() >= 9 {
            let length =
                usize::from(sent[0]) << 16 | usize::from(sent[1]) << 8 | usize::from(sent[2]);
            types.push(sent[3]);
            sent = &sent[(9 + length).min(sent.len())..];
        }
        types
    }

    /// A connection with no call on it is never PINGed (gRPC servers take that for abuse and
    /// close the connection) but closed once idle, and the next call dials a new one.
    #[tokio::test]
    async fn an_idle_connection_is_closed_without_a_ping_and_the_next_call_dials_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (closed, mut connections) = tokio::sync::mpsc::unbounded_channel();
        let node = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let closed = closed.clone();
                tokio::spawn(async move {
                    // An empty SETTINGS frame, and then only listening, until the client
                    // closes the connection.
                    socket
                        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                        .await
                        .unwrap();
                    let mut sent = Vec::new();
                    socket.read_to_end(&mut sent).await.unwrap();
                    let _ = closed.send(sent);
                });
            }
        });
        let mut peer = Peer::new(
            &endpoint,
            format!("{endpoint}/").parse().unwrap(),
            Duration::from_secs(2),
        );
        peer.idle_check = Duration::from_millis(50);
        let (first, _) = peer.ready_sender().await.unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(5), connections.recv())
            .await
            .expect("the idle connection was closed")
            .unwrap();
        let types = frame_types(&sent);
        const PING: u8 = 6;
        assert!(!types.contains(&PING), "frames sent: {types:?}");
        let (second, _) = peer.ready_sender().await.unwrap();
        assert_ne!(first, second, "the next call dialled again");
        node.abort();
    }

    /// A connection that gets a call in every idle check stays current.
    #[tokio::test]
    async fn a_connection_in_use_is_not_closed_as_idle() {
        let (mut peer, server) = peer_and_server(Vec::new()).await;
        peer.idle_check = Duration::from_millis(100);
        for _ in 0..20 {
            let (dial, _) = peer.ready_sender().await.unwrap();
            assert_eq!(dial, 1);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        drop(peer);
        assert_eq!(server.await.unwrap(), 0);
    }

    /// The kernel probes a dialled connection that stays idle, so one whose peer vanished
    /// fails instead of being kept.
    #[tokio::test]
    async fn a_dialled_socket_has_tcp_keepalive_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        keep_alive(&stream).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_TIME);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    /// A call that found connection N broken forgets it only if it is still the current one:
    /// a slower call that saw an older connection break must not drop the newer one.
    #[tokio::test]
    async fn a_broken_connection_is_forgotten_only_by_the_number_of_its_own_dial() {
        let (peer, server) = peer_and_server(Vec::new()).await;
        assert!(peer.ready_sender().await.is_ok());
        let current = || peer.state().current.as_ref().map(|(dial, _)| *dial);
        assert_eq!(current(), Some(1));
        peer.drop_connection(0);
        assert_eq!(current(), Some(1), "an older dial's failure leaves it");
        peer.drop_connection(1);
        assert_eq!(current(), None);
        drop(peer);
        assert_eq!(server.await.unwrap(), 0);
    }

    /// An h2 server answering each stream in turn with one of `answers`: `None` refuses the
    /// stream unprocessed, `Some(())` answers it; returns how many streams it saw.
    async fn serve_answers(listener: tokio::net::TcpListener, answers: Vec<Option<()>>) -> usize {
        let (socket, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(socket).await.unwrap();
        let mut answers = answers.into_iter();
        let mut streams = 0;
        while let Some(Ok((_request, mut respond))) = connection.accept().await {
            streams += 1;
            match answers.next().flatten() {
                None => respond.send_reset(h2::Reason::REFUSED_STREAM),
                Some(()) => {
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(response, false).unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    send.send_trailers(trailers).unwrap();
                }
            }
        }
        streams
    }

    async fn peer_and_server(answers: Vec<Option<()>>) -> (Peer, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(serve_answers(listener, answers));
        let origin = format!("{endpoint}/").parse().unwrap();
        (Peer::new(&endpoint, origin, Duration::from_secs(2)), server)
    }

    fn request(peer: &Peer) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .method("POST")
            .uri(format!("{}sagad.v1.Participant/Signal", peer.origin()))
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(String::from("\0\0\0\0\0")))
            .unwrap()
    }

    /// A stream the node refuses unprocessed (RFC 9113 8.7: REFUSED_STREAM, as a node does
    /// past a stream limit sagad did not know yet) is sent again at once: the call succeeds
    /// instead of counting as a failed send and waiting out a back-off.
    #[tokio::test]
    async fn a_refused_stream_is_sent_again_at_once() {
        let (peer, server) = peer_and_server(vec![None, Some(())]).await;
        let response = peer.call(request(&peer), &AtomicU64::new(0)).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        drop(response);
        drop(peer);
        assert_eq!(
            server.await.unwrap(),
            2,
            "the refused send and the one answered"
        );
    }

    /// A node that keeps refusing gets a bounded number of resends, then the call fails
    /// with the refusal, and the delivery's back-off takes over.
    #[tokio::test]
    async fn a_node_that_keeps_refusing_fails_the_call_after_a_bounded_number_of_resends() {
        let (peer, server) = peer_and_server(vec![None; 10]).await;
        let error = peer
            .call(request(&peer), &AtomicU64::new(0))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::Http2 { source, .. } if source.reason() == Some(h2::Reason::REFUSED_STREAM)),
            "{error}"
        );
        drop(peer);
        let streams = server.await.unwrap();
        assert_eq!(streams as u32, 1 + RESENDS_WHEN_REFUSED);
    }
}
