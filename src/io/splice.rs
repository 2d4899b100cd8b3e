//! Zero-copy tunnels on Linux: splice(2) between two TCP sockets, through a pipe per direction.
//!
//! The copy in `copy.rs` moves every byte through user space twice (`recv` into a buffer, `send`
//! out of it). Here each direction asks the kernel to move bytes from the source socket into a
//! pipe and from the pipe into the destination socket; the bytes never leave the kernel, and a
//! call moves as much as the pipe holds.
//!
//! How one direction runs:
//! * **Small reads are copied, bulk is spliced.** Splicing a few hundred bytes costs more than
//!   `recv` + `send` of them (the kernel copies small packets into a page for the pipe anyway), so
//!   a direction starts by reading into the thread's scratch buffer (the copy's) and writing; a
//!   read of [`BULK_BYTES`] or more switches it to splice, and a splice that moves less than a
//!   quarter of that switches it back. Bytes the destination cannot take at once wait in a pipe.
//! * **Fill, then drain.** Bytes are spliced into the pipe only while it is empty, then spliced
//!   out until it is empty again. So an `EAGAIN` from the source side always means "the socket has
//!   nothing" (never "the pipe is full"), which is what tokio's `try_io` needs to clear the
//!   socket's readiness correctly; and the direction never holds more than one pipeful.
//! * **Readiness from tokio.** `TcpStream::try_io` after `poll_read_ready`/`poll_write_ready`,
//!   as tokio's own reads and writes do; both directions are polled by one function, like the
//!   copy, so the tunnel's future stays small, and the readiness polls spend the task's coop
//!   budget, so a busy tunnel does not starve the other tasks of its worker.
//! * **Pipes are borrowed.** A direction takes a pipe from a per-thread pool when it has bulk
//!   to splice (or bytes its destination cannot take yet), and gives it back (empty) as soon as
//!   its source has nothing more. An idle tunnel, or one exchanging requests and responses, holds
//!   no pipe: its file descriptors are its two sockets, as with the copy. Only directions moving
//!   bulk hold a pipe (two descriptors each), and each worker thread keeps at most [`POOL_MAX`]
//!   empty ones.
//! * **Counting and caps** happen when bytes are read, as `Metered` counts reads: into the
//!   same [`Meter`], so audit bytes, metrics and the idle watchdog see no difference. Under an
//!   enforced cap a direction asks for no more than the bytes left; once none are left it asks for
//!   one byte, and if one comes the cap is passed: the tunnel ends with the cap's reason, and that
//!   byte is never written. The destination receives exactly the cap.
//! * **Half-close** as in the copy: a source at EOF shuts the destination down for writing; the
//!   relay ends when both directions have, or at the first error.
//! * **Fallback.** `EINVAL`/`ENOSYS` from splice (a kernel, filesystem or sandbox that will not
//!   splice these descriptors), or a pipe that cannot be had (out of descriptors, or only a
//!   2-page one because the user is over `fs.pipe-user-pages-soft`), ends the relay with
//!   [`Spliced::Fallback`]: what is still in the pipes comes back as [`Leftover`] bytes for the
//!   caller to write before it copies the rest the portable way. No byte is lost or reordered.
//!
//! Cost: two descriptors per direction while it moves bulk, up to [`POOL_MAX`] pooled pipes per
//! worker thread, and kernel memory that `VmRSS` does not show: a pipe's inode, files and slot
//! array (a few KiB at [`PIPE_BYTES`]) and, while bytes are in flight, references to the socket
//! buffers' pages (not copies). Every pipe's capacity counts against the user's pipe budget.

use std::cell::RefCell;
use std::fs::File;
use std::future::poll_fn;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use rustix::io::Errno;
use rustix::net::{RecvFlags, Shutdown};
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{CHUNK, SCRATCH};
use super::{Cap, CapReached, Direction, Meter};

/// Most bytes asked of one splice into a pipe. The pipe's capacity is the real bound: splicing
/// into an empty pipe moves what the socket has, up to what the pipe holds.
const MAX_MOVE: usize = 1 << 20;

/// Capacity asked for each new pipe (`F_SETPIPE_SZ`): one splice moves at most this much. Best
/// effort: past the user's pipe budget the kernel refuses, and the pipe keeps its 64 KiB.
///
/// Against the default 64 KiB this took a third less CPU per GiB tunnelled; 1 MiB saved a fifth
/// more downstream and nothing upstream, and an unprivileged user's pipe budget
/// (`fs.pipe-user-pages-soft`: 16,384 pages for all the user's processes) holds 256 pipes of
/// this size but only 64 of 1 MiB (docs/benchmarks.md).
pub const PIPE_BYTES: usize = 256 * 1024;

/// A copied read of at least this much starts bulk mode (splice); a splice that moves less than
/// a quarter of it ends it (the next reads are copied). The gap keeps a transfer whose reads
/// vary around the threshold from switching back and forth.
pub const BULK_BYTES: usize = 16 * 1024;

/// Smallest pipe worth splicing through (the default pipe size; a user over the pipe budget
/// gets 8 KiB).
const MIN_PIPE_BYTES: usize = 64 * 1024;

/// Empty pipes kept per worker thread for the next direction that has data. A pooled pipe holds
/// two descriptors and its share of the user's pipe budget while no tunnel uses it.
pub const POOL_MAX: usize = 4;

thread_local! {
    /// Empty pipes, ready for the next busy direction on this thread.
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Pipes made on this thread, so tests can tell pooled pipes from held ones.
    static MADE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How a splice relay ended without an error.
#[derive(Debug)]
pub enum Spliced {
    /// Both directions reached EOF and shut their destination down.
    Done,
    /// Splice cannot carry this tunnel: copy the rest, after writing the [`Leftover`].
    Fallback(Fallback),
}

/// Why splicing stopped, and the bytes it had taken from a socket but not delivered.
#[derive(Debug)]
pub struct Fallback {
    /// The error that stopped it.
    pub cause: io::Error,
    /// True when splice(2) itself refused (`EINVAL`, `ENOSYS`): it will refuse other tunnels
    /// too. False when only this tunnel could not get a pipe.
    pub unsupported: bool,
    /// Bytes already counted and taken from the sockets, still to be written.
    pub leftover: Leftover,
}

/// Bytes read from one side but not yet written to the other. Already counted in the [`Meter`].
#[derive(Debug, Default)]
pub struct Leftover {
    /// For the upstream (read from the client).
    pub up: Vec<u8>,
    /// For the client (read from the upstream).
    pub down: Vec<u8>,
}

/// Move bytes both ways between `client` and `upstream` until both directions reach EOF or an
/// error ends the tunnel. Client → upstream bytes count as [`Direction::Up`] against `upload`.
///
/// An enforced cap being passed ends it with an error wrapping [`CapReached`], as the copy does.
pub async fn splice_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    meter: &Meter,
    upload: Option<Cap>,
) -> io::Result<Spliced> {
    let mut up = Half::default();
    let mut down = Half::default();
    // One poll function for both directions, as in the copy: the tunnel's future holds two
    // small `Half`s and no readiness futures (an idle tunnel's memory is mostly its future).
    let ended = poll_fn(|cx| {
        let a = up.poll_pump(cx, client, upstream, meter, Direction::Up, upload)?;
        let b = down.poll_pump(cx, upstream, client, meter, Direction::Down, None)?;
        match (a, b) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let (cause, unsupported) = match ended {
        Ok(_) => return Ok(Spliced::Done),
        Err(Stop::Io(e)) => return Err(e),
        Err(Stop::Unsupported(e)) => (e, true),
        Err(Stop::NoPipe(e)) => (e, false),
    };
    let leftover = Leftover {
        up: up.take_pending()?,
        down: down.take_pending()?,
    };
    Ok(Spliced::Fallback(Fallback {
        cause,
        unsupported,
        leftover,
    }))
}

/// Why one direction stopped early.
enum Stop {
    /// splice(2) refuses these descriptors.
    Unsupported(io::Error),
    /// No pipe could be had (out of descriptors or memory, or over the user's pipe budget).
    NoPipe(io::Error),
    /// The tunnel ends: a socket error, or a cap.
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        match Errno::from_io_error(&e) {
            Some(Errno::INVAL | Errno::NOSYS) => Stop::Unsupported(e),
            _ => Stop::Io(e),
        }
    }
}

/// A pipe: bytes spliced into `w` come out of `r`.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    /// An empty pipe: from this thread's pool, or a new one.
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten() {
            return Ok(p);
        }
        // Non-blocking on both ends: a full or empty pipe must never block the worker thread.
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        #[cfg(test)]
        MADE.with(|m| m.set(m.get() + 1));
        // Fewer, larger moves per syscall. Refused past the user's pipe budget: the pipe then
        // keeps the size it was given.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_BYTES);
        // A user over `fs.pipe-user-pages-soft` gets 2-page pipes: splicing 8 KiB per call costs
        // more than the copy's 64 KiB reads, so such a tunnel copies instead.
        let size = rustix::pipe::fcntl_getpipe_size(&w)?;
        if size < MIN_PIPE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "pipe of {size} bytes: over the user's pipe budget (fs.pipe-user-pages-soft)"
                ),
            ));
        }
        Ok(Pipe { r, w })
    }

    /// Return an empty pipe for reuse on this thread (or close it if the pool is full).
    fn give_back(self) {
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// One direction's state: kept outside its future, so a fallback can recover the pipe's bytes
/// after the futures are gone.
#[derive(Debug, Default)]
struct Half {
    /// Held only while the direction is moving data.
    pipe: Option<Pipe>,
    /// Bytes in `pipe` not yet spliced to the destination (`> 0` only with a pipe).
    pending: usize,
    /// The source reached EOF and the destination was shut down for writing.
    done: bool,
    /// Moving bulk: splice. Otherwise read into the thread's scratch buffer and write.
    bulk: bool,
}

// === impl Half ===

impl Half {
    /// Move `src` → `dst` until EOF (then shut `dst` down for writing) or an error.
    ///
    /// Readiness comes from `poll_read_ready`/`poll_write_ready`, which also spend the task's
    /// coop budget, so a tunnel that always has data still yields to the other tasks.
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter,
        dir: Direction,
        cap: Option<Cap>,
    ) -> Poll<Result<(), Stop>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pending > 0 {
                ready!(self.poll_drain(cx, dst, meter))?;
                continue;
            }
            let room = meter.room(dir, cap);
            // At the cap, ask for one byte: it tells "more is coming" from EOF, and is never sent.
            let want = room.map_or(MAX_MOVE, |r| {
                usize::try_from(r).map_or(MAX_MOVE, |r| r.clamp(1, MAX_MOVE))
            });
            ready!(src.poll_read_ready(cx))?;
            let moved = if self.bulk {
                self.splice_in(src, want)?
            } else {
                self.copy_through(src, dst, want, room == Some(0))?
            };
            match moved {
                Some(0) => {
                    self.release();
                    break;
                }
                Some(n) => {
                    if room == Some(0) {
                        return Poll::Ready(Err(Stop::Io(cap_passed(meter, cap))));
                    }
                    meter
                        .admit(dir, n as u64, cap)
                        .map_err(|e| Stop::Io(io::Error::other(e)))?;
                }
                // Nothing to read after all: readiness is cleared, the next poll waits for more,
                // holding no pipe.
                None => self.release(),
            }
        }
        rustix::net::shutdown(dst, Shutdown::Write).map_err(|e| Stop::Io(e.into()))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }

    /// Give back the pipe, which is empty whenever this direction waits to read.
    fn release(&mut self) {
        if let Some(p) = self.pipe.take() {
            p.give_back();
        }
    }

    /// Splice up to `want` bytes from `src` into an (empty) pipe. `None`: nothing to read.
    fn splice_in(&mut self, src: &TcpStream, want: usize) -> Result<Option<usize>, Stop> {
        let pipe = match self.pipe.take() {
            Some(p) => p,
            None => Pipe::take().map_err(Stop::NoPipe)?,
        };
        let moved = src.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                src,
                None,
                &pipe.w,
                None,
                want,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )?)
        });
        match moved {
            Ok(0) => {
                pipe.give_back();
                Ok(Some(0))
            }
            Ok(n) => {
                self.pipe = Some(pipe);
                self.pending = n;
                // The burst is over: small reads are cheaper copied.
                self.bulk = n >= BULK_BYTES / 4;
                Ok(Some(n))
            }
            // Hold no pipe while waiting for more.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                Ok(None)
            }
            Err(e) => {
                // Nothing entered the pipe: it is still empty, and reusable.
                pipe.give_back();
                Err(e.into())
            }
        }
    }

    /// Read up to `want` bytes from `src` into this thread's scratch buffer and write what `dst`
    /// takes now; the rest goes into a pipe, to be spliced out like any other. A large read
    /// starts bulk mode. `probe`: the byte read is past the cap and is not written.
    /// `None`: nothing to read.
    fn copy_through(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        want: usize,
        probe: bool,
    ) -> Result<Option<usize>, Stop> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let buf = &mut scratch[..want.min(CHUNK)];
            let n = match read_draining(src, buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if n == 0 || probe {
                return Ok(Some(n));
            }
            self.bulk = n >= BULK_BYTES;
            let written = match dst.try_write(&buf[..n]) {
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e.into()),
            };
            if written < n {
                let pipe = match self.pipe.take() {
                    Some(p) => p,
                    None => Pipe::take().map_err(Stop::NoPipe)?,
                };
                // The pipe is empty and holds at least `CHUNK` (`MIN_PIPE_BYTES`), so this
                // write takes everything.
                let stashed = rustix::io::write(&pipe.w, &buf[written..n]).map_err(io::Error::from);
                self.pipe = Some(pipe);
                let stashed = stashed?;
                self.pending = stashed;
                if written + stashed < n {
                    return Err(Stop::Io(io::Error::other(
                        "pipe took less than its capacity",
                    )));
                }
            }
            Ok(Some(n))
        })
    }

    /// Splice what is in the pipe out to `dst`, as far as `dst` takes it now.
    fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        meter: &Meter,
    ) -> Poll<Result<(), Stop>> {
        let Some(pipe) = &self.pipe else {
            self.pending = 0; // unreachable: bytes are pending only in a pipe
            return Poll::Ready(Ok(()));
        };
        ready!(dst.poll_write_ready(cx))?;
        let moved = dst.try_io(Interest::WRITABLE, || {
            Ok(rustix::pipe::splice(
                &pipe.r,
                None,
                dst,
                None,
                self.pending,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            )?)
        });
        match moved {
            Ok(0) => Poll::Ready(Err(Stop::Io(io::ErrorKind::WriteZero.into()))),
            Ok(n) => {
                self.pending -= n.min(self.pending);
                meter.touch();
                Poll::Ready(Ok(()))
            }
            // `dst` is full: readiness is cleared, so the next poll waits for room.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }

    /// The bytes still in the pipe (the pipe is closed).
    fn take_pending(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; self.pending];
        if let Some(pipe) = self.pipe.take() {
            // The bytes are in the pipe, so the non-blocking read cannot find it empty.
            File::from(pipe.r).read_exact(&mut bytes)?;
        }
        self.pending = 0;
        Ok(bytes)
    }
}

/// Read what `src` has into `buf`. A read that fills less than `buf` has emptied the socket's
/// receive queue, so it also clears tokio's read readiness, as tokio's own `poll_read` does:
/// the next poll waits for the next edge instead of a `recv` that would only say `EAGAIN`. A
/// request/response exchange then costs one `recv` per message, not two. The readiness cleared
/// is the one observed before the read (`try_io` takes it first), so data that arrives after
/// the read raises a new edge and is not lost. `None`: nothing to read.
fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut short = None;
    let len = buf.len();
    let read = src.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(src, &mut *buf, RecvFlags::empty())?;
        if n > 0 && n < len {
            // Handed back as `WouldBlock` so that `try_io` clears the readiness.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(short),
        Err(e) => Err(e),
    }
}

/// Record that `cap` was passed and make the error that ends the tunnel.
fn cap_passed(meter: &Meter, cap: Option<Cap>) -> io::Error {
    match cap {
        Some(cap) => {
            meter.cut(cap.reason);
            io::Error::other(CapReached(cap.reason))
        }
        None => io::Error::other("cap passed without a cap"), // `room` is Some only with a cap
    }
}

#[cfg(test)]
mod tests;
