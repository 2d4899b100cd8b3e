//! No network: the client is a scripted reader in memory.
//!
//! Question: how much CPU does the tunnels' ClientHello reader (`proxy::hello::read`, the SNI
//! check's input) spend on a hello, as a function of how the client splits it? A client picks
//! the split: TLS records as small as one byte, and writes that arrive one record or one byte
//! per read. Issue 14 measured about 1.2 s of CPU for one 128 KiB hello sent as 1-byte records,
//! because every read re-parsed (and re-joined) everything received so far: quadratic. The
//! reader must cost time linear in the bytes received, and refuse a hello split into more
//! records than any real client uses.
//!
//! Cases (each runs `hello::read` to its verdict, on a current-thread runtime):
//! * `typical_one_read`: a 2 KiB hello (server name plus padding) in one record and one read;
//! * `records_1B_per_read/128KiB`: the worst case, a 60 KB hello in 1-byte records, one
//!   record per read, until the reader gives up (128 KiB buffered, or the record cap);
//! * `records_16KiB_bytes_1/60KiB`: the largest hello in 16 KiB records, one byte per read;
//! * `records_max_per_read/2KiB`: a 2 KiB hello split into `sni::MAX_HELLO_RECORDS`-many
//!   records (the most accepted), one record per read.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chokepoint::proxy::hello;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio::io::{AsyncRead, ReadBuf};

/// How the scripted client hands its bytes over.
#[derive(Clone, Copy)]
enum Step {
    /// Up to this many bytes per read.
    Bytes(usize),
    /// One whole TLS record per read.
    Records,
}

/// A client that sends `data` in the steps given, then closes (every case reaches a verdict
/// before that).
struct Trickle<'a> {
    data: &'a [u8],
    at: usize,
    step: Step,
    /// Bytes of the current record not handed over yet (`Step::Records`): a read into a
    /// buffer with less room ends mid-record, and the next read goes on from there.
    left: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.data[self.at..];
        if rest.is_empty() {
            return Poll::Ready(Ok(())); // end of stream
        }
        if let (Step::Records, 0) = (self.step, self.left) {
            self.left = match rest.get(3..5) {
                Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => rest.len(),
            };
        }
        let want = match self.step {
            Step::Bytes(n) => n,
            Step::Records => self.left,
        };
        let n = want.min(rest.len()).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        if let Step::Records = self.step {
            self.left -= n;
        }
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A ClientHello handshake message for `api.example.com`, padded (extension 21) to about
/// `size` bytes.
fn handshake(size: usize) -> Vec<u8> {
    let name = b"api.example.com";
    let mut exts = Vec::new();
    let list_len = 3 + name.len();
    exts.extend_from_slice(&[0, 0]);
    exts.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    exts.extend_from_slice(&(list_len as u16).to_be_bytes());
    exts.push(0);
    exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
    exts.extend_from_slice(name);
    let pad = size.saturating_sub(exts.len() + 60);
    exts.extend_from_slice(&[0, 21]);
    exts.extend_from_slice(&(pad as u16).to_be_bytes());
    exts.resize(exts.len() + pad, 0);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    hs
}

/// `hs` in TLS records of at most `size` payload bytes.
fn records(hs: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(hs.len() + 5 * (hs.len() / size + 1));
    for part in hs.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Run the reader to its verdict; true if it found a hello.
fn verdict(rt: &tokio::runtime::Runtime, data: &[u8], step: Step) -> bool {
    rt.block_on(async {
        let mut client = Trickle {
            data,
            at: 0,
            step,
            left: 0,
        };
        let read = hello::read(&mut client, &[], Duration::from_secs(3600)).await;
        read.hello.is_ok()
    })
}

fn reader(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let typical = records(&handshake(2048), 16 * 1024);
    let worst = records(&handshake(60_000), 1);
    let largest = records(&handshake(60_000), 16 * 1024);
    // 2 KiB in 64 records: the most a hello may be split into (`sni::MAX_HELLO_RECORDS`).
    let split = records(&handshake(2048), 2048usize.div_ceil(64) + 1);
    assert!(verdict(&rt, &typical, Step::Records));
    assert!(verdict(&rt, &largest, Step::Records));
    assert!(
        !verdict(&rt, &worst, Step::Records),
        "refused one way or another"
    );

    let mut g = c.benchmark_group("hello");
    g.sample_size(10);
    g.bench_function("typical_one_read", |b| {
        b.iter(|| black_box(verdict(&rt, black_box(&typical), Step::Bytes(usize::MAX))))
    });
    g.bench_function("records_1B_per_read/128KiB", |b| {
        b.iter(|| black_box(verdict(&rt, black_box(&worst), Step::Records)))
    });
    g.bench_function("records_16KiB_bytes_1/60KiB", |b| {
        b.iter(|| black_box(verdict(&rt, black_box(&largest), Step::Bytes(1))))
    });
    g.bench_function("records_max_per_read/2KiB", |b| {
        b.iter(|| black_box(verdict(&rt, black_box(&split), Step::Records)))
    });
    g.finish();
}

criterion_group!(benches, reader);
criterion_main!(benches);
