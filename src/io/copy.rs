//! A bidirectional copy that holds no buffer while a tunnel is idle.
//!
//! `tokio::io::copy_bidirectional` owns one buffer per direction for the tunnel's whole life
//! (2 × 16 KiB here), which dominates the memory of thousands of idle agent tunnels. This copy
//! reads into a per-thread scratch buffer and writes straight from it; only when the writer
//! cannot take everything does a direction allocate a buffer for the rest, and it keeps that
//! buffer only while data keeps flowing: once a read finds nothing to do, the buffer is freed.
//! Semantics otherwise match tokio's: each side is shut down for writing when the other reaches
//! EOF, writes are flushed before waiting on a read, and the first error ends the copy.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes moved per read. Idle tunnels hold none of it (the scratch buffer is per thread), so it
/// can be large: 64 KiB cut tunnel CPU per GiB by about 30% against 16 KiB (docs/benchmarks.md).
pub(super) const CHUNK: usize = 64 * 1024;

thread_local! {
    /// Reads land here first; only bytes the writer could not take are copied out of it.
    pub(super) static SCRATCH: RefCell<Box<[u8; CHUNK]>> = RefCell::new(Box::new([0; CHUNK]));
}

/// One direction of the copy.
#[derive(Debug, Default)]
struct Half {
    /// Bytes read but not yet written: `buf[pos..len]`. `None` while idle.
    buf: Option<Box<[u8; CHUNK]>>,
    pos: usize,
    len: usize,
    read_done: bool,
    shut_down: bool,
    need_flush: bool,
    total: u64,
}

/// Copy both ways until both sides have reached EOF (or an error); returns the bytes moved
/// a → b and b → a.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    poll_fn(|cx| {
        let ab = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let ba = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (ab, ba) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

// === impl Half ===

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            ready!(self.poll_drain(cx, w))?;
            if self.read_done {
                self.buf = None; // drained: a half-closed tunnel holds nothing for this side
                if !self.shut_down {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.shut_down = true;
                }
                return Poll::Ready(Ok(self.total));
            }
            match self.poll_read_and_write(cx, r, w) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing to read: flush what was written, and hold no buffer while idle.
                    self.buf = None;
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Write out `buf[pos..len]`, if any.
    fn poll_drain<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let Some(buf) = &self.buf else {
            return Poll::Ready(Ok(()));
        };
        while self.pos < self.len {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
            self.total += n as u64;
            self.need_flush = true;
        }
        self.pos = 0;
        self.len = 0;
        Poll::Ready(Ok(()))
    }

    /// Read one chunk and write as much of it as the writer takes now; keep the rest in `buf`.
    fn poll_read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        // Busy direction: read straight into its own buffer.
        if let Some(buf) = &mut self.buf {
            let mut rb = ReadBuf::new(&mut buf[..]);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.read_done = true;
            }
            self.len = n;
            return Poll::Ready(Ok(()));
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.read_done = true;
                return Poll::Ready(Ok(()));
            }
            let mut written = 0;
            while written < n {
                match Pin::new(&mut *w).poll_write(cx, &scratch[written..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(k)) => written += k,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            self.total += written as u64;
            self.need_flush |= written > 0;
            if written < n {
                // The writer is slow: keep the rest (and the buffer, while busy).
                let mut buf = Box::new([0u8; CHUNK]);
                buf[..n - written].copy_from_slice(&scratch[written..n]);
                self.buf = Some(buf);
                self.pos = 0;
                self.len = n - written;
            }
            Poll::Ready(Ok(()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both directions carry a payload larger than many chunks through small duplex pipes (so
    /// writes are partial and buffers get allocated), byte for byte, and EOF propagates.
    #[tokio::test]
    async fn carries_both_ways_through_slow_pipes() {
        let (mut client, mut a) = tokio::io::duplex(1000);
        let (mut b, mut server) = tokio::io::duplex(777);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let up: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..150_000u32).map(|i| (i * 13) as u8).collect();
        let (u, d) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let mut got = vec![0; u.len()];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(&d).await.unwrap();
            server.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        });
        client.write_all(&up).await.unwrap();
        let mut got = vec![0; down.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == down, "downstream bytes differ");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (server_got, server_rest) = server_task.await.unwrap();
        assert!(server_got == up, "upstream bytes differ");
        assert!(server_rest.is_empty());
        let (ab, ba) = copy.await.unwrap().unwrap();
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// A direction whose writer stalls keeps its rest in a buffer; once drained and idle, the
    /// buffer is gone.
    #[tokio::test]
    async fn buffers_exist_only_while_busy() {
        let (mut client, mut reader) = tokio::io::duplex(CHUNK * 2);
        let (mut writer, mut sink) = tokio::io::duplex(100); // takes 100 bytes, then stalls
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut half = Half::default();
        assert!(half
            .poll_copy(&mut cx, &mut reader, &mut writer)
            .is_pending());
        assert!(half.buf.is_none(), "idle: no buffer");
        client.write_all(&[7u8; 1000]).await.unwrap();
        assert!(half
            .poll_copy(&mut cx, &mut reader, &mut writer)
            .is_pending());
        assert!(half.buf.is_some(), "900 bytes wait for the writer");
        let mut drained = 0;
        for _ in 0..20 {
            let mut chunk = [0u8; 100];
            drained += sink.read(&mut chunk).await.unwrap();
            let _ = half.poll_copy(&mut cx, &mut reader, &mut writer);
            if half.buf.is_none() {
                break;
            }
        }
        assert!(half.buf.is_none(), "drained and idle again: buffer freed");
        assert_eq!(half.total, 1000);
        assert!(drained >= 900, "{drained}");
    }

    #[tokio::test]
    async fn errors_end_the_copy() {
        let (client, mut a) = tokio::io::duplex(64);
        let (b_side, mut b) = tokio::io::duplex(64);
        drop(b_side);
        drop(client);
        // Both peers gone: the copy finishes (EOF on a, write error or EOF on b), never hangs.
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            copy_bidirectional(&mut a, &mut b),
        )
        .await;
        assert!(r.is_ok(), "copy did not end");
    }
}
