//! One HTTP/1.1 connection, either side (the load client's and the origin's), and the
//! requests the load client sends. `Content-Length` bodies only: that is all the origin sends
//! and all chokepoint forwards here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The name the proxy resolves (statically) to the origin.
pub(crate) const HOST: &str = "origin.test";
/// Read and write size of bulk transfers (and the largest buffer any `Wire` grows to).
pub(crate) const BULK_CHUNK: usize = 256 * 1024;
/// Initial read buffer of a connection; enough for any head this bench sees.
pub(crate) const SMALL_BUF: usize = 4 * 1024;
/// Bound on one exchange (connect, CONNECT, request and small response).
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one 1 GiB transfer.
pub(crate) const BULK_TIMEOUT: Duration = Duration::from_secs(300);
/// A bound on exchanges per worker and per origin connection, besides the deadline.
pub(crate) const MAX_EXCHANGES: u64 = 100_000_000;

static ZEROS: [u8; BULK_CHUNK] = [0; BULK_CHUNK];

// === Wire ===

/// What the bench needs from a request or response head.
#[derive(Debug, Default)]
pub(crate) struct Head {
    /// Status code of a response; 0 for a request.
    pub(crate) status: u16,
    /// For a request to `/bulk/N`: N, the size of the body asked for.
    pub(crate) bulk: Option<u64>,
    /// The `Content-Length` header's value.
    pub(crate) content_length: Option<u64>,
}

/// A connection: plain TCP, or TLS on either side (scenarios i and j).
pub(crate) enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// The load client's TLS session.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The origin's TLS session.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether the load client's TLS handshake resumed an earlier session (`None` for a plain
    /// or origin-side stream): a resumed handshake skips the certificate and its signature.
    pub(crate) fn resumed(&self) -> Option<bool> {
        match self {
            Stream::Client(s) => {
                Some(s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
            }
            Stream::Tcp(_) | Stream::Server(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Client(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Stream::Client(s) => Pin::new(s).poll_write(cx, b),
            Stream::Server(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Client(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A stream with a read buffer holding `buf[start..end]`.
pub(crate) struct Wire {
    pub(crate) stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Wire {
    /// `stream` with a read buffer of `capacity` bytes (grown to `BULK_CHUNK` for bulk bodies).
    pub(crate) fn new(stream: TcpStream, capacity: usize) -> Wire {
        // Requests and responses go out in one write each; Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        Wire::over(Stream::Tcp(stream), capacity)
    }

    /// A wire over any stream (a TLS session).
    pub(crate) fn over(stream: Stream, capacity: usize) -> Wire {
        Wire {
            stream,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// A new connection to `addr`.
    pub(crate) async fn connect(addr: SocketAddr, capacity: usize) -> io::Result<Wire> {
        Ok(Wire::new(TcpStream::connect(addr).await?, capacity))
    }

    /// Read one head; `None` if the peer closed before sending a byte of it.
    pub(crate) async fn read_head(&mut self) -> io::Result<Option<Head>> {
        let mut scanned = self.start;
        // Each pass reads at least one byte or returns; the buffer bounds the head.
        loop {
            let from = scanned.saturating_sub(3).max(self.start);
            if let Some(at) = find_blank_line(&self.buf[from..self.end]) {
                let head_end = from + at + 4;
                let head = parse_head(&self.buf[self.start..head_end])?;
                self.start = head_end;
                return Ok(Some(head));
            }
            scanned = self.end;
            if self.end == self.buf.len() {
                if self.start == 0 {
                    return Err(invalid("head larger than the read buffer"));
                }
                self.buf.copy_within(self.start..self.end, 0);
                scanned -= self.start;
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.end += n;
        }
    }

    /// Read and drop `n` body bytes (buffered ones first). Any bytes read past them stay buffered.
    pub(crate) async fn discard(&mut self, n: u64) -> io::Result<()> {
        let buffered = (self.end - self.start) as u64;
        let take = n.min(buffered);
        self.start += take as usize;
        let mut left = n - take;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if left > BULK_CHUNK as u64 && self.buf.len() < BULK_CHUNK {
            self.buf.resize(BULK_CHUNK, 0);
        }
        // The buffer is empty whenever this loop reads; each pass consumes at least one byte.
        while left > 0 {
            let got = self.stream.read(&mut self.buf[..]).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if got as u64 > left {
                self.start = left as usize;
                self.end = got;
                left = 0;
            } else {
                left -= got as u64;
            }
        }
        Ok(())
    }

    /// Send `request`, read a `200` head and drop its body (a CONNECT answer has none).
    pub(crate) async fn exchange(&mut self, request: &[u8]) -> io::Result<Head> {
        self.stream.write_all(request).await?;
        self.read_response().await
    }

    /// Send a head announcing `n` body bytes, then `n` zero bytes; read the `200` answer.
    pub(crate) async fn upload(&mut self, head: &[u8], n: u64) -> io::Result<Head> {
        self.stream.write_all(head).await?;
        write_zeros(&mut self.stream, n).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> io::Result<Head> {
        let head = self
            .read_head()
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if head.status != 200 {
            return Err(io::Error::other(format!("status {}", head.status)));
        }
        self.discard(head.content_length.unwrap_or(0)).await?;
        Ok(head)
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

fn parse_head(bytes: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (word, second) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let mut head = Head::default();
    if word.starts_with("HTTP/1.") {
        head.status = second.parse().map_err(|_| invalid("bad status code"))?;
    } else {
        head.bulk = second
            .split_once("/bulk/")
            .and_then(|(_, n)| n.parse().ok());
    }
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            let n = value.trim().parse().map_err(|_| invalid("bad length"))?;
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "transfer-encoding: this bench reads Content-Length bodies only",
            ));
        }
    }
    Ok(head)
}

/// An `InvalidData` error saying `what`.
pub(crate) fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// `n` zero bytes to `stream`.
pub(crate) async fn write_zeros<W: AsyncWrite + Unpin>(stream: &mut W, n: u64) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(BULK_CHUNK as u64) as usize;
        stream.write_all(&ZEROS[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// `f`, failing with `TimedOut` after `limit`.
pub(crate) async fn within<T>(
    limit: Duration,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

// === requests ===

/// An absolute-form GET of `path` on the origin, as sent to a forward proxy.
pub(crate) fn get_absolute(port: u16, path: &str) -> Vec<u8> {
    format!("GET http://{HOST}:{port}{path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

/// An origin-form GET of `path`, as sent to the origin itself or inside a tunnel.
pub(crate) fn get_origin_form(port: u16, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

/// A CONNECT to the origin.
pub(crate) fn connect_request(port: u16) -> Vec<u8> {
    format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

/// The head of a POST to the origin announcing `len` body bytes.
pub(crate) fn post_head(port: u16, len: u64) -> Vec<u8> {
    format!("POST /sink HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len}\r\n\r\n")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_the_bench_reads() {
        let response = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n").unwrap();
        assert_eq!(
            (response.status, response.content_length, response.bulk),
            (200, Some(100), None)
        );
        let request = parse_head(&get_origin_form(8080, "/bulk/1073741824")).unwrap();
        assert_eq!(
            (request.status, request.bulk, request.content_length),
            (0, Some(1 << 30), None)
        );
        let upload = parse_head(&post_head(8080, 7)).unwrap();
        assert_eq!((upload.bulk, upload.content_length), (None, Some(7)));
    }

    #[test]
    fn chunked_bodies_are_refused() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_head(chunked).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
