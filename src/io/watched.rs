//! A future and its watchdogs, polled separately.
//!
//! `tokio::select!` polls every branch whenever the task wakes. For a connection task that wakes
//! a few times per request, that means re-polling its idle timer and its cancellation token on
//! every wake-up (callgrind: some 500 instructions a time, a tenth of the upstream task's own
//! work). [`Watched`] polls the main future on every wake-up, and the watchdog only when the
//! watchdog's own waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;
use pin_project_lite::pin_project;

pin_project! {
    /// Runs `main` to completion unless `watch` completes first (then `main` is dropped with
    /// this future). Resolves to `Some(output)` of `main`, or `None` when the watchdog fired.
    pub struct Watched<F, W> {
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
    task: Mutex<Option<Waker>>,
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

// === impl Watched ===

impl<F, W> Watched<F, W> {
    /// Watch `main` with `watch`.
    pub fn new(main: F, watch: W) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_a_main_future_that_never_does() {
        let main = std::future::pending::<()>();
        let watch = tokio::time::sleep(Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        assert_eq!(Watched::new(main, watch).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn main_wins_when_it_ends_first() {
        let main = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            7
        };
        let watch = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(Watched::new(main, watch).await, Some(7));
    }

    #[tokio::test]
    async fn a_watchdog_woken_from_another_task_is_seen() {
        let token = tokio_util::sync::CancellationToken::new();
        let cancel = token.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let watched = tokio::spawn(Watched::new(rx, async move { token.cancelled().await }));
        tokio::task::yield_now().await;
        cancel.cancel();
        assert!(watched.await.unwrap().is_none());
        drop(tx);
    }
}
