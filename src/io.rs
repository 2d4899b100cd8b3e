//! Counting and idle-tracking wrappers for byte streams and HTTP bodies.
//!
//! A [`Meter`] is shared by the two halves of one request or tunnel: the wrappers add to it, the
//! audit line reads it, and the idle watchdog reads its last-activity stamp. Everything is a
//! relaxed atomic: the counters are only read after the copy has stopped, or as a watchdog hint.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Which way bytes flow, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

/// Byte counters and a last-activity stamp for one request or tunnel.
#[derive(Debug)]
pub struct Meter {
    up: AtomicU64,
    down: AtomicU64,
    base: Instant,
    /// Milliseconds since `base` of the last read in either direction.
    last: AtomicU64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

// === impl Meter ===

impl Meter {
    /// Bytes the client sent towards the upstream.
    pub fn up(&self) -> u64 {
        self.up.load(Relaxed)
    }

    /// Bytes the upstream sent towards the client.
    pub fn down(&self) -> u64 {
        self.down.load(Relaxed)
    }

    /// Record `n` bytes in direction `dir`, and activity now.
    pub fn add(&self, dir: Direction, n: u64) {
        match dir {
            Direction::Up => self.up.fetch_add(n, Relaxed),
            Direction::Down => self.down.fetch_add(n, Relaxed),
        };
        self.touch();
    }

    /// Record activity now without counting bytes (writes: the idle bound is about either
    /// direction moving).
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last.store(ms, Relaxed);
    }

    /// When the last byte moved (or when the meter was made).
    pub fn last_activity(&self) -> Instant {
        self.base + Duration::from_millis(self.last.load(Relaxed))
    }

    /// Completes once no byte has moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last_activity() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

pin_project! {
    /// An `AsyncRead + AsyncWrite` that counts the bytes read from it and records activity on
    /// reads and writes.
    pub struct Metered<T> {
        #[pin]
        inner: T,
        meter: Arc<Meter>,
        dir: Direction,
    }
}

// === impl Metered ===

impl<T> Metered<T> {
    /// Count reads from `inner` as bytes flowing in `dir`.
    pub fn new(inner: T, meter: Arc<Meter>, dir: Direction) -> Self {
        Metered { inner, meter, dir }
    }
}

impl<T: AsyncRead> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.inner.poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            this.meter.add(*this.dir, n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let n = ready!(this.inner.poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.meter.touch();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pin_project! {
    /// An HTTP body that counts its data bytes.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        meter: Arc<Meter>,
        dir: Direction,
    }
}

// === impl MeteredBody ===

impl<B> MeteredBody<B> {
    /// Count data frames of `inner` as bytes flowing in `dir`.
    pub fn new(inner: B, meter: Arc<Meter>, dir: Direction) -> Self {
        MeteredBody { inner, meter, dir }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.meter.add(*this.dir, data.remaining() as u64);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn metered_counts_split_reads() {
        let meter = Arc::new(Meter::default());
        let io = tokio_test::io::Builder::new()
            .read(b"hel")
            .read(b"lo")
            .build();
        let mut m = Metered::new(io, meter.clone(), Direction::Up);
        let mut out = Vec::new();
        m.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"hello");
        assert_eq!((meter.up(), meter.down()), (5, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_for_waits_for_quiet() {
        let meter = Arc::new(Meter::default());
        let m2 = meter.clone();
        let start = Instant::now();
        let watch = tokio::spawn(async move { m2.idle_for(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(6)).await;
        meter.add(Direction::Down, 1);
        watch.await.unwrap();
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(16), "{waited:?}");
        assert!(waited < Duration::from_secs(17), "{waited:?}");
    }
}
