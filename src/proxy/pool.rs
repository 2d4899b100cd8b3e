//! Idle upstream HTTP/1.1 connections, kept for the next plain-HTTP request that may use them.
//!
//! A connection is keyed by who it may serve: the agent, the normalised target (host and port)
//! and the vetted address it is connected to. The pool is asked only *after* a request's own
//! pipeline has run in full (identify → allowlist → limits → resolve → vet), with that request's
//! vetted addresses: a pooled connection is used only if its peer is one of them. So a reload
//! that removes a rule refuses the next request before the pool is consulted, and a DNS answer
//! that moves a name elsewhere (or a new `deny_cidrs` entry) simply leaves the old connections
//! unused until they expire. Nothing here dials: fresh connections come from `connect::dial`.
//!
//! A connection goes back only when its exchange ended cleanly: the response was read to its
//! end, the request body was sent in full, the response did not say `Connection: close` (nor was
//! it HTTP/1.0), and hyper still considers the connection open. The caller decides the first
//! three ([`Lease::reusable`]); [`Pool::checkin`] checks the last and the bounds.
//!
//! Bounds: [`MAX_IDLE_PER_KEY`] and [`MAX_IDLE`] idle connections (a connection over either is
//! closed instead of kept), each idle at most [`IDLE_TIMEOUT`] ([`reap`] sweeps every
//! [`SWEEP_EVERY`]). When shutdown starts, [`reap`] closes the pool: idle connections are closed
//! and connections in use are closed when their exchange ends, so they do not hold the drain up.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::io::{BoxError, Meter, MeteredBody};
use crate::target::Target;
use crate::vet::VettedAddr;

/// How long a pooled connection that hyper has not yet marked ready (its task is still winding
/// up the previous exchange) may take before it is given up for another one.
const READY_WAIT: Duration = Duration::from_secs(1);

/// Most idle connections kept for one key (agent, target, address). Agents' `max_concurrent`
/// defaults to 64, so an agent's full concurrency towards one host can be reused.
pub const MAX_IDLE_PER_KEY: usize = 64;

/// Most idle connections kept in all (each holds a file descriptor and a hyper connection task).
pub const MAX_IDLE: usize = 1024;

/// How long a connection may sit idle before it is closed. Shorter than most servers' own
/// keep-alive timeouts (nginx 75 s, cloud load balancers 60 s), so the pool rarely hands out a
/// connection the server is just closing; a request that meets one anyway is retried on a new
/// connection when that is safe (see `forward::send`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`reap`] closes expired idle connections.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Who a connection may serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    agent: Arc<str>,
    target: Target,
    peer: SocketAddr,
}

/// An upstream connection handle: hyper's sender plus the activity meter its connection task
/// watches for the idle bound.
pub struct Conn {
    /// Sends requests on the connection.
    pub sender: SendRequest<UpBody>,
    /// Activity on the connection's socket (the connection task closes it when idle too long).
    pub activity: Arc<Meter>,
}

/// A connection in use by one request, with what it takes to give it back.
pub struct Lease {
    pool: Arc<Pool>,
    key: Key,
    /// The connection.
    pub conn: Conn,
    /// True if the connection came from the pool (a request that fails on it may be retried).
    pub pooled: bool,
    /// Whether the exchange left the connection fit for another request; set by the caller.
    pub reusable: bool,
}

struct Idle {
    key: Key,
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    /// Idle connections by the hash of their key; a bucket holds every key with that hash, the
    /// most recently returned connection last (reused first: warm, and lets the rest expire).
    buckets: HashMap<u64, Vec<Idle>>,
    total: usize,
    closed: bool,
}

/// The idle-connection pool. One per process, shared by every request.
pub struct Pool {
    inner: Mutex<Inner>,
    hasher: foldhash::fast::RandomState,
}

pin_project! {
    /// The request body as sent upstream: the client's, counted and capped (or an empty one for
    /// a bodiless request sent again); when hyper is done with it (sent, or failed), dropping it
    /// signals `done`.
    pub struct UpBody {
        #[pin]
        inner: Either<MeteredBody<Incoming>, Empty<Bytes>>,
        done: oneshot::Sender<()>,
    }
}

// === impl UpBody ===

impl UpBody {
    /// Wrap a body; the receiver completes (with an error: the sender is dropped) once hyper
    /// is done with it.
    pub fn new(
        inner: Either<MeteredBody<Incoming>, Empty<Bytes>>,
    ) -> (UpBody, oneshot::Receiver<()>) {
        let (done, request_done) = oneshot::channel();
        (UpBody { inner, done }, request_done)
    }
}

impl Body for UpBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Key ===

impl Key {
    /// The key of a connection to `peer` for `agent`'s requests to `target`.
    pub fn new(agent: Arc<str>, target: Target, peer: VettedAddr) -> Key {
        Key {
            agent,
            target,
            peer: peer.addr(),
        }
    }

    /// The vetted address the connection is connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn is(&self, agent: &str, target: &Target, peer: SocketAddr) -> bool {
        self.peer == peer && *self.agent == *agent && self.target == *target
    }
}

// === impl Lease ===

impl Lease {
    /// A freshly dialled connection, to go back to `pool` when released.
    pub fn fresh(pool: Arc<Pool>, key: Key, conn: Conn) -> Lease {
        Lease {
            pool,
            key,
            conn,
            pooled: false,
            reusable: false,
        }
    }

    /// The vetted address the connection is connected to.
    pub fn peer(&self) -> SocketAddr {
        self.key.peer
    }

    /// The exchange is over: give the connection back to its pool (kept if [`Lease::reusable`]
    /// and the pool's checks pass, else closed).
    pub fn release(self) {
        let pool = self.pool.clone();
        pool.checkin(self);
    }
}

// === impl Pool ===

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Pool")
            .field("idle", &inner.total)
            .field("closed", &inner.closed)
            .finish()
    }
}

impl Pool {
    /// An empty, open pool.
    pub fn new() -> Pool {
        Pool {
            inner: Mutex::new(Inner::default()),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn hash(&self, agent: &str, target: &Target, peer: SocketAddr) -> u64 {
        let mut h = self.hasher.build_hasher();
        agent.hash(&mut h);
        target.hash(&mut h);
        peer.hash(&mut h);
        h.finish()
    }

    /// [`Pool::checkout`], skipping connections that hyper has not marked ready within
    /// [`READY_WAIT`] (dropped): what a request sends on, or `None` for a new connection.
    pub async fn checkout_ready(
        self: &Arc<Self>,
        agent: &str,
        target: &Target,
        vetted: &[VettedAddr],
    ) -> Option<Lease> {
        // Bounded: every checkout takes a connection out of the pool.
        while let Some(mut lease) = self.checkout(agent, target, vetted) {
            if lease.conn.sender.is_ready() {
                return Some(lease);
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, lease.conn.sender.ready()).await {
                return Some(lease);
            }
        }
        None
    }

    /// An idle connection for `agent`'s request to `target` whose peer is one of `vetted` (this
    /// request's own vetted addresses, tried in order). Connections found closed or expired on
    /// the way are dropped.
    pub fn checkout(
        self: &Arc<Self>,
        agent: &str,
        target: &Target,
        vetted: &[VettedAddr],
    ) -> Option<Lease> {
        for addr in vetted.iter().take(crate::connect::MAX_ATTEMPTS) {
            let peer = addr.addr();
            let hash = self.hash(agent, target, peer);
            loop {
                // One candidate per lock: a stale one is dropped after the lock is released.
                let idle = {
                    let mut inner = self.inner.lock();
                    let Some(bucket) = inner.buckets.get_mut(&hash) else {
                        break;
                    };
                    let Some(i) = bucket.iter().rposition(|e| e.key.is(agent, target, peer)) else {
                        break;
                    };
                    let idle = bucket.remove(i);
                    if bucket.is_empty() {
                        inner.buckets.remove(&hash);
                    }
                    inner.total -= 1;
                    idle
                };
                if idle.conn.sender.is_closed() || idle.since.elapsed() >= IDLE_TIMEOUT {
                    continue;
                }
                // The idle bound of the connection task restarts with the new exchange.
                idle.conn.activity.touch();
                return Some(Lease {
                    pool: self.clone(),
                    key: idle.key,
                    conn: idle.conn,
                    pooled: true,
                    reusable: false,
                });
            }
        }
        None
    }

    /// Take a connection back after its exchange. Kept only if the caller marked it reusable,
    /// hyper has not seen it close, the pool is open and under its bounds; otherwise it is
    /// dropped, which closes it.
    fn checkin(&self, lease: Lease) {
        if !lease.reusable || lease.conn.sender.is_closed() {
            return;
        }
        let hash = self.hash(&lease.key.agent, &lease.key.target, lease.key.peer);
        let mut inner = self.inner.lock();
        if inner.closed || inner.total >= MAX_IDLE {
            drop(inner);
            return; // `lease` is dropped (and closed) after the lock is released
        }
        let bucket = inner.buckets.entry(hash).or_default();
        // A bucket holds the key's connections and those of any key with the same hash, so it
        // is only worth counting once it could be full.
        let full = bucket.len() >= MAX_IDLE_PER_KEY
            && bucket.iter().filter(|e| e.key == lease.key).count() >= MAX_IDLE_PER_KEY;
        if full {
            drop(inner);
            return;
        }
        let Lease { key, conn, .. } = lease;
        bucket.push(Idle {
            key,
            conn,
            since: Instant::now(),
        });
        inner.total += 1;
    }

    /// Idle connections held now.
    pub fn idle(&self) -> usize {
        self.inner.lock().total
    }

    /// Drop idle connections that expired or that their server closed.
    pub fn sweep(&self) {
        let mut gone = Vec::new();
        {
            let mut inner = self.inner.lock();
            let mut removed = 0;
            inner.buckets.retain(|_, bucket| {
                let before = bucket.len();
                let mut i = 0;
                while i < bucket.len() {
                    let e = &bucket[i];
                    if e.conn.sender.is_closed() || e.since.elapsed() >= IDLE_TIMEOUT {
                        gone.push(bucket.remove(i));
                    } else {
                        i += 1;
                    }
                }
                removed += before - bucket.len();
                !bucket.is_empty()
            });
            inner.total -= removed;
        }
        drop(gone); // closes them, outside the lock
    }

    /// Close the pool: drop every idle connection and keep none from now on.
    pub fn close(&self) {
        let buckets = {
            let mut inner = self.inner.lock();
            inner.closed = true;
            inner.total = 0;
            std::mem::take(&mut inner.buckets)
        };
        drop(buckets);
    }
}

/// Sweep `pool` every [`SWEEP_EVERY`] until `stop` (shutdown) is set, then close it.
pub async fn reap(pool: Arc<Pool>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(SWEEP_EVERY) => pool.sweep(),
        }
    }
    pool.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target;
    use crate::vet::Vetter;
    use hyper_util::rt::TokioIo;
    use tokio::io::DuplexStream;

    /// A live hyper client connection over an in-memory pipe (nothing is dialled); the returned
    /// server half keeps it open until dropped.
    async fn conn() -> (Conn, DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, UpBody>(TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(connection);
        let activity = Arc::new(Meter::default());
        (Conn { sender, activity }, server)
    }

    fn vetted(ports: &[u16]) -> Vec<VettedAddr> {
        let v = Vetter::new(vec![], vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        let ip = "127.0.0.1".parse().unwrap();
        ports
            .iter()
            .map(|&p| v.vet(&[ip], p, &[]).unwrap()[0])
            .collect()
    }

    fn target(t: &str) -> Target {
        target::parse_authority(t, Some(80)).unwrap()
    }

    /// Check a connection for (`agent`, `t`, `port`) in; returns the pipe's server half.
    async fn put(pool: &Arc<Pool>, agent: &str, t: &str, port: u16) -> DuplexStream {
        let (c, server) = conn().await;
        let key = Key::new(agent.into(), target(t), vetted(&[port])[0]);
        let mut lease = Lease::fresh(pool.clone(), key, c);
        lease.reusable = true;
        lease.release();
        server
    }

    #[tokio::test]
    async fn checkout_needs_the_same_agent_target_and_a_vetted_peer() {
        let pool = Arc::new(Pool::new());
        let _s = put(&pool, "a", "x.test:80", 8080).await;
        let t = target("x.test:80");
        assert!(pool.checkout("b", &t, &vetted(&[8080])).is_none(), "agent");
        assert!(
            pool.checkout("a", &target("y.test:80"), &vetted(&[8080]))
                .is_none(),
            "host"
        );
        assert!(
            pool.checkout("a", &target("x.test:81"), &vetted(&[8080]))
                .is_none(),
            "port"
        );
        assert!(pool.checkout("a", &t, &vetted(&[8081])).is_none(), "peer");
        assert_eq!(pool.idle(), 1);
        let lease = pool.checkout("a", &t, &vetted(&[8081, 8080])).unwrap();
        assert!(lease.pooled);
        assert_eq!(lease.peer().port(), 8080);
        assert_eq!(pool.idle(), 0);
        assert!(
            pool.checkout("a", &t, &vetted(&[8080])).is_none(),
            "handed out once"
        );
    }

    #[tokio::test]
    async fn bounded_per_key_and_in_all() {
        let pool = Arc::new(Pool::new());
        let mut servers = Vec::new();
        for _ in 0..MAX_IDLE_PER_KEY + 1 {
            servers.push(put(&pool, "a", "x.test:80", 8080).await);
        }
        assert_eq!(pool.idle(), MAX_IDLE_PER_KEY);
        for port in 1..=(MAX_IDLE / MAX_IDLE_PER_KEY) as u16 {
            for _ in 0..MAX_IDLE_PER_KEY {
                servers.push(put(&pool, "a", "x.test:80", 9000 + port).await);
            }
        }
        assert_eq!(pool.idle(), MAX_IDLE);
    }

    #[tokio::test]
    async fn unreusable_closed_and_expired_connections_are_not_kept() {
        tokio::time::pause();
        let pool = Arc::new(Pool::new());
        let t = target("x.test:80");
        let (c, _server) = conn().await;
        let key = Key::new("a".into(), t.clone(), vetted(&[8080])[0]);
        Lease::fresh(pool.clone(), key, c).release(); // not marked reusable
        assert_eq!(pool.idle(), 0);

        let server = put(&pool, "a", "x.test:80", 8080).await;
        drop(server); // the server closes: hyper's connection task sees EOF
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(pool.checkout("a", &t, &vetted(&[8080])).is_none());
        assert_eq!(pool.idle(), 0);

        let _server = put(&pool, "a", "x.test:80", 8080).await;
        tokio::time::advance(IDLE_TIMEOUT).await;
        assert!(pool.checkout("a", &t, &vetted(&[8080])).is_none());
        let _server = put(&pool, "a", "x.test:80", 8080).await;
        tokio::time::advance(IDLE_TIMEOUT).await;
        pool.sweep();
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_closed_pool_keeps_nothing() {
        let pool = Arc::new(Pool::new());
        let _s = put(&pool, "a", "x.test:80", 8080).await;
        assert_eq!(pool.idle(), 1);
        pool.close();
        assert_eq!(pool.idle(), 0);
        let _s = put(&pool, "a", "x.test:80", 8080).await;
        assert_eq!(pool.idle(), 0);
        assert!(pool
            .checkout("a", &target("x.test:80"), &vetted(&[8080]))
            .is_none());
    }
}
