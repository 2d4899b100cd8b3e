//! The origin: a keep-alive HTTP/1.1 server on 127.0.0.1 in this process, answering what the
//! scenarios ask for.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::http::{
    within, write_zeros, Head, Stream, Wire, BULK_TIMEOUT, IO_TIMEOUT, MAX_EXCHANGES, SMALL_BUF,
};

/// The origin's answer to every request that is not `/bulk/N`: 100 bytes of body.
const SMALL_RESPONSE: &[u8] = concat!(
    "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "0123456789012345678901234567890123456789012345678901234567890123456789",
    "012345678901234567890123456789"
)
.as_bytes();
/// An origin connection that sends no request for this long is closed.
const ORIGIN_IDLE: Duration = Duration::from_secs(120);

/// A keep-alive HTTP/1.1 origin on 127.0.0.1: `GET /bulk/N` gets N zero bytes, anything else
/// 100 bytes; a request body is read and dropped first.
pub(crate) struct Origin {
    /// Where it listens (127.0.0.1, a port the kernel chose).
    pub(crate) addr: SocketAddr,
    stop: CancellationToken,
}

impl Origin {
    /// Bind 127.0.0.1:0 and serve until dropped; the listener is kept, so the port is never
    /// free for anyone else meanwhile.
    pub(crate) async fn start() -> Result<Origin, Error> {
        Origin::start_with(None).await
    }

    /// The same origin speaking TLS with `tls` (scenarios i and j).
    pub(crate) async fn start_with(tls: Option<Arc<ServerConfig>>) -> Result<Origin, Error> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::io("bind the origin on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io("the origin's address"))?;
        let stop = CancellationToken::new();
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(origin_accept(listener, stop.clone(), tls));
        Ok(Origin { addr, stop })
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accept until `stop`.
async fn origin_accept(
    listener: TcpListener,
    stop: CancellationToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => match &tls {
                None => {
                    tokio::spawn(origin_serve(Wire::new(stream, SMALL_BUF), stop.clone()));
                }
                Some(acceptor) => {
                    let (acceptor, stop) = (acceptor.clone(), stop.clone());
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        if let Ok(Ok(tls)) = timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                            let wire = Wire::over(Stream::Server(Box::new(tls)), SMALL_BUF);
                            origin_serve(wire, stop).await;
                        }
                    });
                }
            },
            // Out of descriptors, most likely: the load side sees the failures.
            Err(_) => sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn origin_serve(mut wire: Wire, stop: CancellationToken) {
    for _ in 0..MAX_EXCHANGES {
        let head = tokio::select! {
            () = stop.cancelled() => return,
            r = timeout(ORIGIN_IDLE, wire.read_head()) => match r {
                Ok(Ok(Some(head))) => head,
                _ => return,
            },
        };
        if within(BULK_TIMEOUT, origin_answer(&mut wire, &head))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn origin_answer(wire: &mut Wire, head: &Head) -> io::Result<()> {
    wire.discard(head.content_length.unwrap_or(0)).await?;
    match head.bulk {
        Some(n) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            wire.stream.write_all(head.as_bytes()).await?;
            write_zeros(&mut wire.stream, n).await
        }
        None => wire.stream.write_all(SMALL_RESPONSE).await,
    }
}
