//! Step 8a, before the first byte goes upstream: read a tunnel client's TLS ClientHello
//! (bounded in size and time) so the SNI check can judge it. The bytes read are returned so the
//! tunnel can send them on, unchanged, once the check passes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::outcome::{Deny, Reason};
use crate::sni::{self, ClientHello, NotHello};

/// Most bytes buffered while waiting for a complete ClientHello: the largest hello plus the
/// record headers of one split into many small records.
pub const MAX_BUFFERED: usize = 2 * sni::MAX_HELLO_BYTES;

/// What the client sent before the verdict: the hello (if it parsed) and every byte read.
#[derive(Debug)]
pub struct Read {
    /// The bytes read from the client, in order (to be sent upstream if the tunnel goes on).
    pub bytes: Vec<u8>,
    /// The ClientHello, or why there is none.
    pub hello: Result<ClientHello, Deny>,
}

/// Read from `client` until its bytes hold a complete ClientHello, are not one, pass
/// [`MAX_BUFFERED`], or `within` runs out. `pending` are bytes the client already sent (read
/// together with the CONNECT head); they come first. A client that closes first is
/// `client_closed`.
pub async fn read<R: AsyncRead + Unpin>(client: &mut R, pending: &[u8], within: Duration) -> Read {
    let mut bytes = Vec::with_capacity(pending.len().max(2048));
    bytes.extend_from_slice(pending);
    let hello = match tokio::time::timeout(within, fill(client, &mut bytes)).await {
        Ok(r) => r,
        Err(_) => Err(Deny::with_detail(
            Reason::NotTls,
            format!(
                "no complete TLS ClientHello within {within:?} ({} bytes received)",
                bytes.len()
            ),
        )),
    };
    Read { bytes, hello }
}

async fn fill<R: AsyncRead + Unpin>(
    client: &mut R,
    bytes: &mut Vec<u8>,
) -> Result<ClientHello, Deny> {
    // Kept across reads: each read costs only the bytes it brought (the client picks how small
    // its records and writes are).
    let mut parser = sni::HelloParser::default();
    loop {
        match parser.parse(bytes) {
            Ok(Some(hello)) => return Ok(hello),
            Ok(None) if bytes.len() >= MAX_BUFFERED => return Err(not_tls(NotHello::TooLarge)),
            Ok(None) => {}
            Err(e) => return Err(not_tls(e)),
        }
        // Never read past the bound; a read may return less.
        let room = MAX_BUFFERED - bytes.len();
        let n = (&mut *client)
            .take(room as u64)
            .read_buf(bytes)
            .await
            .map_err(|e| Deny::with_detail(Reason::ClientClosed, e.to_string()))?;
        if n == 0 {
            return Err(Deny::new(
                Reason::ClientClosed,
                "the client closed the tunnel before its ClientHello was complete",
            ));
        }
    }
}

fn not_tls(e: NotHello) -> Deny {
    Deny::with_detail(Reason::NotTls, e.to_string())
}
