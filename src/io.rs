//! Counting and idle-tracking wrappers for byte streams and HTTP bodies.
//!
//! A [`Meter`] is shared by the two halves of one request or tunnel: the wrappers add to it, the
//! audit line reads it, and the idle watchdog reads its last-activity stamp. Everything is a
//! relaxed atomic: the counters are only read after the copy has stopped, or as a watchdog hint.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::outcome::Reason;

mod copy;
#[cfg(target_os = "linux")]
pub mod splice;

pub use copy::copy_bidirectional;

/// The error type of bodies passed through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No cut recorded (a [`Reason`] code is an index into `Reason::ALL`, always below this).
const NO_CUT: u8 = u8::MAX;

/// A byte cap on one direction. `enforce = false` (report mode) only records that it was passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Most bytes allowed.
    pub max: u64,
    /// Cut the stream when passed, or only record it.
    pub enforce: bool,
    /// The reason recorded when passed (`upload_cap`, `body_too_large`, `response_cap`).
    pub reason: Reason,
}

/// The stream was cut because a [`Cap`] was passed.
#[derive(Debug, thiserror::Error)]
#[error("{0} reached; stream cut")]
pub struct CapReached(pub Reason);

/// Which way bytes flow, from the client's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

/// Byte counters, a last-activity stamp, and the first cap passed, for one request or tunnel.
#[derive(Debug)]
pub struct Meter {
    up: AtomicU64,
    down: AtomicU64,
    base: Instant,
    /// Milliseconds since `base` of the last read in either direction.
    last: AtomicU64,
    /// `Reason::code` of the first cap passed or client failure seen, or `NO_CUT`.
    cut: AtomicU8,
    /// Bytes (both ways) at which [`Meter::flush_due`] completes next; `u64::MAX`: never (no
    /// byte budget watches this meter).
    flush_mark: AtomicU64,
    flush_step: AtomicU64,
    flush: tokio::sync::Notify,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            base: Instant::now(),
            last: AtomicU64::new(0),
            cut: AtomicU8::new(NO_CUT),
            flush_mark: AtomicU64::new(u64::MAX),
            flush_step: AtomicU64::new(u64::MAX),
            flush: tokio::sync::Notify::const_new(),
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
        // One load and a compare unless a byte budget watches this meter.
        let mark = self.flush_mark.load(Relaxed);
        if mark != u64::MAX {
            let total = self.up().saturating_add(self.down());
            if total >= mark {
                let step = self.flush_step.load(Relaxed);
                self.flush_mark.store(total.saturating_add(step), Relaxed);
                self.flush.notify_one();
            }
        }
    }

    /// Make [`Meter::flush_due`] complete every `step` bytes (both ways together).
    pub fn notify_every(&self, step: u64) {
        self.flush_step.store(step, Relaxed);
        let total = self.up().saturating_add(self.down());
        self.flush_mark.store(total.saturating_add(step), Relaxed);
    }

    /// Completes once another `step` bytes have moved (see [`Meter::notify_every`]).
    pub async fn flush_due(&self) {
        self.flush.notified().await;
    }

    /// Record why the exchange was (or, in report mode, would have been) cut; the first one wins.
    pub fn cut(&self, reason: Reason) {
        let _ = self
            .cut
            .compare_exchange(NO_CUT, reason.code(), Relaxed, Relaxed);
    }

    /// The first cut recorded, if any.
    pub fn cut_reason(&self) -> Option<Reason> {
        match self.cut.load(Relaxed) {
            NO_CUT => None,
            code => Reason::from_code(code),
        }
    }

    /// How many more bytes may pass in `dir` before an enforced `cap` is passed; `None` when no
    /// enforced cap applies (none, or report mode).
    pub fn room(&self, dir: Direction, cap: Option<Cap>) -> Option<u64> {
        let cap = cap.filter(|c| c.enforce)?;
        let so_far = match dir {
            Direction::Up => self.up(),
            Direction::Down => self.down(),
        };
        Some(cap.max.saturating_sub(so_far))
    }

    /// Count `n` more bytes against `cap` in `dir`. Returns `Err` (and counts nothing) when an
    /// enforced cap would be passed; a report-mode cap only records the cut.
    pub fn admit(&self, dir: Direction, n: u64, cap: Option<Cap>) -> Result<(), CapReached> {
        if let Some(cap) = cap {
            let so_far = match dir {
                Direction::Up => self.up(),
                Direction::Down => self.down(),
            };
            if so_far.saturating_add(n) > cap.max {
                self.cut(cap.reason);
                if cap.enforce {
                    return Err(CapReached(cap.reason));
                }
            }
        }
        self.add(dir, n);
        Ok(())
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
    /// An `AsyncRead + AsyncWrite` that counts the bytes read from it (against an optional cap)
    /// and records activity on reads and writes.
    pub struct Metered<T> {
        #[pin]
        inner: T,
        meter: Arc<Meter>,
        dir: Direction,
        cap: Option<Cap>,
    }
}

// === impl Metered ===

impl<T> Metered<T> {
    /// Count reads from `inner` as bytes flowing in `dir`.
    pub fn new(inner: T, meter: Arc<Meter>, dir: Direction) -> Self {
        Metered {
            inner,
            meter,
            dir,
            cap: None,
        }
    }

    /// Apply a cap to the bytes read: a read that would pass an enforced cap is discarded (none
    /// of its bytes are passed on) and fails with [`CapReached`].
    pub fn with_cap(mut self, cap: Cap) -> Self {
        self.cap = Some(cap);
        self
    }

    /// The wrapped stream (a tunnel takes the client's socket back from the HTTP server).
    pub fn into_inner(self) -> T {
        self.inner
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
            if let Err(e) = this.meter.admit(*this.dir, n as u64, *this.cap) {
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::other(e)));
            }
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
    /// An HTTP body that counts its data bytes against an optional cap. A frame that would pass
    /// an enforced cap is not passed on: the body fails instead, so the next hop never receives
    /// a complete over-cap body. An error of the inner body is recorded as `client_closed` when
    /// this is the client's request body.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        meter: Arc<Meter>,
        dir: Direction,
        cap: Option<Cap>,
    }
}

// === impl MeteredBody ===

impl<B> MeteredBody<B> {
    /// Count data frames of `inner` as bytes flowing in `dir`.
    pub fn new(inner: B, meter: Arc<Meter>, dir: Direction) -> Self {
        MeteredBody {
            inner,
            meter,
            dir,
            cap: None,
        }
    }

    /// Apply a cap to the data bytes.
    pub fn with_cap(mut self, cap: Cap) -> Self {
        self.cap = Some(cap);
        self
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = match ready!(this.inner.poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => {
                if *this.dir == Direction::Up {
                    this.meter.cut(Reason::ClientClosed);
                }
                return Poll::Ready(Some(Err(e.into())));
            }
            Some(Ok(f)) => f,
        };
        if let Some(data) = frame.data_ref() {
            if let Err(e) = this
                .meter
                .admit(*this.dir, data.remaining() as u64, *this.cap)
            {
                return Poll::Ready(Some(Err(Box::new(e))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
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

    #[tokio::test]
    async fn enforced_cap_passes_nothing_beyond_it_report_cap_only_records() {
        let cap = Cap {
            max: 6,
            enforce: true,
            reason: Reason::UploadCap,
        };
        let meter = Arc::new(Meter::default());
        let io = tokio_test::io::Builder::new()
            .read(b"12345")
            .read(b"678")
            .build();
        let mut m = Metered::new(io, meter.clone(), Direction::Up).with_cap(cap);
        let mut buf = [0u8; 16];
        assert_eq!(m.read(&mut buf).await.unwrap(), 5);
        let err = m.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("upload_cap"), "{err}");
        assert_eq!(
            meter.up(),
            5,
            "the over-cap read is not counted or passed on"
        );
        assert_eq!(meter.cut_reason(), Some(Reason::UploadCap));

        let report = Cap {
            enforce: false,
            ..cap
        };
        let meter = Arc::new(Meter::default());
        let io = tokio_test::io::Builder::new()
            .read(b"12345")
            .read(b"678")
            .build();
        let mut m = Metered::new(io, meter.clone(), Direction::Up).with_cap(report);
        let mut out = Vec::new();
        m.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"12345678");
        assert_eq!(meter.cut_reason(), Some(Reason::UploadCap));
    }

    #[test]
    fn first_cut_wins() {
        let m = Meter::default();
        assert_eq!(m.cut_reason(), None);
        m.cut(Reason::BodyTooLarge);
        m.cut(Reason::ClientClosed);
        assert_eq!(m.cut_reason(), Some(Reason::BodyTooLarge));
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
