//! Question: did `io::Watched` (poll the watchdogs only when their own waker fired) save enough
//! to justify its custom waker over a plain `tokio::select!` that polls every branch on every
//! wake-up? Its one user was the task that drives a pooled upstream connection
//! (`proxy/forward.rs`, `fresh`): hyper's client connection, watched by the connection's idle
//! timer (`Meter::idle_for`) and the shutdown token. It did not (about 0.15 µs per request, see
//! docs/benchmarks.md) and was replaced by a `biased` `select!`; its code is kept below, as the
//! alternative this bench measures.
//!
//! Three measures, for each shape, with the real watchdogs:
//! * `poll`: one poll of the combined future while its main future is pending: what a wake-up
//!   the watchdogs did not cause costs on top of the main future;
//! * `wake`: one wake-up of a spawned task on a current-thread runtime (a message in, a reply
//!   out through bounded channels);
//! * `request`: one `GET` through a hyper HTTP/1.1 client connection driven by the watched task
//!   to a hyper server on 127.0.0.1 in this process, 100-byte answer; the bench also prints how
//!   many times the connection task was polled per request.
//!
//! Only loopback sockets; one connection per shape, requests bounded by criterion's sampling.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chokepoint::io::Meter;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The upstream idle timeout: far beyond the bench, so the timer never fires.
const IDLE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
enum Shape {
    /// The removed `io::Watched`: the watchdogs' own `select!`, polled only when it woke.
    Watched,
    /// One plain `tokio::select!` over the main future, the idle timer and the token.
    Select,
    /// The same, `biased` to poll the main future first: what `proxy/forward.rs` does now.
    Biased,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Watched => "watched",
            Shape::Select => "select",
            Shape::Biased => "biased",
        }
    }

    /// `main` with its watchdogs, in this shape; `None` when a watchdog fired.
    fn wrap<F>(
        self,
        main: F,
        meter: Arc<Meter>,
        abort: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = Option<F::Output>> + Send>>
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        // Boxed once per connection (as the spawned task is), never per poll.
        match self {
            Shape::Watched => {
                let watchdogs = async move {
                    tokio::select! {
                        () = meter.idle_for(IDLE) => {}
                        () = abort.cancelled() => {}
                    }
                };
                Box::pin(Watched::new(main, watchdogs))
            }
            Shape::Select => Box::pin(async move {
                tokio::select! {
                    out = main => Some(out),
                    () = meter.idle_for(IDLE) => None,
                    () = abort.cancelled() => None,
                }
            }),
            Shape::Biased => Box::pin(async move {
                tokio::select! {
                    biased;
                    out = main => Some(out),
                    () = meter.idle_for(IDLE) => None,
                    () = abort.cancelled() => None,
                }
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// `io::Watched` as it was (removed from `src/io/`): runs `main` to completion unless
    /// `watch` completes first. `Some(output)` of `main`, or `None` when the watchdog fired.
    struct Watched<F, W> {
        #[pin]
        main: F,
        #[pin]
        watch: W,
        flag: Arc<Flag>,
    }
}

/// The watchdog's waker: notes that the watchdog wants polling, and wakes the task.
#[derive(Default)]
struct Flag {
    fired: AtomicBool,
    task: parking_lot::Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = self.task.lock().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F, W> Watched<F, W> {
    fn new(main: F, watch: W) -> Self {
        let flag = Arc::new(Flag::default());
        // Polled once at the start, whatever the flag says: that is where it registers.
        flag.fired.store(true, Ordering::Relaxed);
        Watched { main, watch, flag }
    }
}

impl<F: Future, W: Future<Output = ()>> Future for Watched<F, W> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.main.poll(cx) {
            return Poll::Ready(Some(out));
        }
        {
            // The task to wake must be in place before the flag is checked, or a watchdog that
            // fires in between would wake nobody.
            let mut task = this.flag.task.lock();
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if this.flag.fired.swap(false, Ordering::Acquire) {
            let waker = Waker::from(this.flag.clone());
            if this.watch.poll(&mut Context::from_waker(&waker)).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// Counts the polls of the future inside.
    struct Counted<F> {
        #[pin]
        inner: F,
        polls: Arc<AtomicU64>,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.polls.fetch_add(1, Relaxed);
        this.inner.poll(cx)
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One poll of a watched future whose main future stays pending.
fn poll(c: &mut Criterion, shape: Shape) {
    let rt = runtime();
    let _in_rt = rt.enter();
    let meter = Arc::new(Meter::default());
    let mut fut = shape.wrap(
        std::future::pending::<()>(),
        meter,
        CancellationToken::new(),
    );
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    // The first poll registers the timer and the token.
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    c.bench_function(&format!("watched/poll/{}", shape.name()), |b| {
        b.iter(|| black_box(fut.as_mut().poll(&mut cx).is_pending()))
    });
}

/// One wake-up of the watched task: a message in, a reply out.
fn wake(c: &mut Criterion, shape: Shape) {
    let rt = runtime();
    let (req_tx, mut req_rx) = mpsc::channel::<()>(1);
    let (resp_tx, mut resp_rx) = mpsc::channel::<()>(1);
    let main = async move {
        while req_rx.recv().await.is_some() {
            if resp_tx.send(()).await.is_err() {
                return;
            }
        }
    };
    let abort = CancellationToken::new();
    let task = rt.spawn(shape.wrap(main, Arc::new(Meter::default()), abort.clone()));
    c.bench_function(&format!("watched/wake/{}", shape.name()), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    req_tx.send(()).await.unwrap();
                    resp_rx.recv().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    // The watchdog still works after the measurement: cancelling ends the task.
    abort.cancel();
    assert_eq!(rt.block_on(task).unwrap(), None);
}

/// A hyper HTTP/1.1 server on 127.0.0.1:0 that serves one connection, answering every request
/// with 100 bytes.
async fn origin() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let answer = hyper::service::service_fn(|_req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&[b'x'; 100]))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), answer)
            .await;
    });
    addr
}

/// One request through a pooled-style upstream connection whose task is watched.
fn request(c: &mut Criterion, shape: Shape) {
    let rt = runtime();
    let abort = CancellationToken::new();
    let polls = Arc::new(AtomicU64::new(0));
    let (mut sender, task) = rt.block_on(async {
        let addr = origin().await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
        let conn = Counted {
            inner: conn,
            polls: polls.clone(),
        };
        let task = tokio::spawn(shape.wrap(conn, Arc::new(Meter::default()), abort.clone()));
        (sender, task)
    });
    let mut requests = 0u64;
    let polls_before = polls.load(Relaxed);
    c.bench_function(&format!("watched/request/{}", shape.name()), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    sender.ready().await.unwrap();
                    let req = Request::get("/")
                        .header("host", "origin.test")
                        .body(Empty::new())
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(body.len(), 100);
                }
                requests += iters;
                start.elapsed()
            })
        })
    });
    let per_request = (polls.load(Relaxed) - polls_before) as f64 / requests as f64;
    eprintln!(
        "watched/request/{}: the connection task was polled {per_request:.2} times per request \
         ({requests} requests)",
        shape.name()
    );
    abort.cancel();
    drop(sender);
    let _ = rt.block_on(task).unwrap();
}

fn bench(c: &mut Criterion) {
    for shape in [Shape::Watched, Shape::Select, Shape::Biased] {
        poll(c, shape);
    }
    for shape in [Shape::Watched, Shape::Select, Shape::Biased] {
        wake(c, shape);
    }
    for shape in [Shape::Watched, Shape::Select, Shape::Biased] {
        request(c, shape);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
