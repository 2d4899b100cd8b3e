//! The splice relay on real loopback sockets: `app` ⇄ `client` (the proxy's client side) and
//! `upstream` (the proxy's upstream side) ⇄ `origin`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::outcome::Reason;

/// Bound on every test (a hung relay fails instead of hanging the suite).
const LIMIT: Duration = Duration::from_secs(20);

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// `app`, the proxy's two sockets, `origin`.
async fn tunnel() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let (app, client) = pair().await;
    let (upstream, origin) = pair().await;
    (app, client, upstream, origin)
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

fn upload_cap(max: u64, enforce: bool) -> Option<Cap> {
    Some(Cap {
        max,
        enforce,
        reason: Reason::UploadCap,
    })
}

/// Run the relay on its own task; it returns the meter with the result.
fn spawn_relay(
    client: TcpStream,
    upstream: TcpStream,
    cap: Option<Cap>,
) -> (Arc<Meter>, tokio::task::JoinHandle<io::Result<Spliced>>) {
    let meter = Arc::new(Meter::default());
    let m = meter.clone();
    let relay = tokio::spawn(async move {
        let r = splice_bidirectional(&client, &upstream, &m, cap).await;
        drop((client, upstream)); // closing both sides is what ends a tunnel
        r
    });
    (meter, relay)
}

/// Megabytes both ways at once, byte for byte; then each half-close order: the side that shuts
/// down first still receives everything the other side sends after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carries_both_ways_and_half_closes_either_way() {
    for client_closes_first in [true, false] {
        tokio::time::timeout(LIMIT, both_ways(client_closes_first))
            .await
            .unwrap();
    }
}

async fn both_ways(client_closes_first: bool) {
    let (mut app, client, upstream, mut origin) = tunnel().await;
    let (meter, relay) = spawn_relay(client, upstream, upload_cap(u64::MAX, true));
    let up = pattern(3 << 20, 1);
    let down = pattern(5 << 20, 2);
    let tail = b"after the other side closed".to_vec();

    let (u, d, t) = (up.clone(), down.clone(), tail.clone());
    let origin_side = tokio::spawn(async move {
        let mut got = vec![0; u.len()];
        let (mut r, mut w) = origin.split();
        let (read, wrote) = tokio::join!(r.read_exact(&mut got), w.write_all(&d));
        read.unwrap();
        wrote.unwrap();
        assert!(got == u, "upstream bytes differ");
        if client_closes_first {
            // The client is done sending: EOF here, and this side still gets through.
            let mut rest = Vec::new();
            origin.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            origin.write_all(&t).await.unwrap();
            origin.shutdown().await.unwrap();
        } else {
            origin.shutdown().await.unwrap();
            let mut rest = Vec::new();
            origin.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, t);
        }
    });
    let mut got = vec![0; down.len()];
    let (mut r, mut w) = app.split();
    let (read, wrote) = tokio::join!(r.read_exact(&mut got), w.write_all(&up));
    read.unwrap();
    wrote.unwrap();
    assert!(got == down, "downstream bytes differ");
    if client_closes_first {
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, tail);
    } else {
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        app.write_all(&tail).await.unwrap();
        app.shutdown().await.unwrap();
    }
    origin_side.await.unwrap();
    assert!(matches!(relay.await.unwrap().unwrap(), Spliced::Done));
    let tail = tail.len() as u64;
    let (up, down) = (up.len() as u64, down.len() as u64);
    let expected = if client_closes_first {
        (up, down + tail)
    } else {
        (up + tail, down)
    };
    assert_eq!((meter.up(), meter.down()), expected);
    assert_eq!(meter.cut_reason(), None);
}

/// Request/response traffic: a short read clears the socket's readiness (`read_draining`), so
/// every later message must still wake the relay. Small messages both ways, some sent in two
/// parts with a pause between, some right after the previous answer, on two worker threads (so
/// the I/O driver can run on the other thread between a read and its clearing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_after_short_reads_all_arrive() {
    tokio::time::timeout(LIMIT, async {
        let (mut app, client, upstream, mut origin) = tunnel().await;
        let (meter, relay) = spawn_relay(client, upstream, None);
        let mut sent = 0u64;
        for round in 0..200u32 {
            let request = format!("request {round}\n");
            let (head, tail) = request.as_bytes().split_at(4);
            app.write_all(head).await.unwrap();
            if round % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            app.write_all(tail).await.unwrap();
            let mut got = vec![0; request.len()];
            origin.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request.as_bytes(), "round {round} upstream");
            let answer = format!("answer {round}\n");
            origin.write_all(answer.as_bytes()).await.unwrap();
            let mut got = vec![0; answer.len()];
            app.read_exact(&mut got).await.unwrap();
            assert_eq!(got, answer.as_bytes(), "round {round} downstream");
            sent += request.len() as u64;
        }
        assert_eq!(meter.up(), sent);
        drop((app, origin));
        relay.await.unwrap().unwrap();
    })
    .await
    .unwrap();
}

/// An enforced upload cap: the upstream receives exactly the cap, the tunnel ends with the cap's
/// reason, and the byte that proved the client wanted more is never sent.
#[tokio::test]
async fn enforced_cap_delivers_exactly_the_cap() {
    let (mut app, client, upstream, mut origin) = tunnel().await;
    let cap = 100_000;
    let (meter, relay) = spawn_relay(client, upstream, upload_cap(cap, true));
    let sent = pattern(300_000, 3);
    let writer = tokio::spawn(async move {
        let _ = app.write_all(&sent).await; // cut off part way: an error is expected
        app
    });
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, origin.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len() as u64, cap);
    assert!(got == pattern(300_000, 3)[..cap as usize], "bytes differ");
    let err = relay.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("upload_cap"), "{err}");
    assert_eq!(meter.up(), cap);
    assert_eq!(meter.cut_reason(), Some(Reason::UploadCap));
    drop(writer.await.unwrap());
}

/// Exactly the cap and then EOF is no cut; report mode lets everything through and records it.
#[tokio::test]
async fn cap_reached_exactly_is_fine_and_report_mode_only_records() {
    for (enforce, send, cut) in [
        (true, 50_000, None),
        (false, 80_000, Some(Reason::UploadCap)),
    ] {
        let (mut app, client, upstream, mut origin) = tunnel().await;
        let (meter, relay) = spawn_relay(client, upstream, upload_cap(50_000, enforce));
        let sent = pattern(send, 4);
        app.write_all(&sent).await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, origin.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == sent, "enforce={enforce}: bytes differ");
        origin.shutdown().await.unwrap();
        assert!(matches!(relay.await.unwrap().unwrap(), Spliced::Done));
        assert_eq!(meter.up(), send as u64);
        assert_eq!(meter.cut_reason(), cut, "enforce={enforce}");
    }
}

/// Small exchanges are copied and never touch a pipe; a bulk burst is spliced, and a direction
/// holds its pipe only while it moves data: once idle, every pipe made is back in this thread's
/// pool, and later bursts reuse them instead of making new ones.
#[tokio::test]
async fn pipes_only_for_bulk_and_only_while_busy() {
    let pooled = || POOL.with(|p| p.borrow().len());
    let made = || MADE.with(|m| m.get());
    assert_eq!((made(), pooled()), (0, 0), "a fresh test thread");
    let (mut app, client, upstream, mut origin) = tunnel().await;
    let (meter, relay) = spawn_relay(client, upstream, None);
    for round in 0..3u8 {
        let ping = [round; 1000];
        app.write_all(&ping).await.unwrap();
        let mut got = [0u8; 1000];
        origin.read_exact(&mut got).await.unwrap();
        origin.write_all(&got).await.unwrap();
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ping);
    }
    assert_eq!(made(), 0, "request-sized exchanges are copied");
    let bulk = pattern(4 << 20, 6);
    for round in 0..3 {
        let (mut r, mut w) = origin.split();
        let mut got = vec![0; bulk.len()];
        let (wrote, read) = tokio::join!(app.write_all(&bulk), r.read_exact(&mut got));
        wrote.unwrap();
        read.unwrap();
        assert!(got == bulk, "round {round}: bytes differ");
        let (mut r, _) = app.split();
        let (wrote, read) = tokio::join!(w.write_all(&bulk), r.read_exact(&mut got));
        wrote.unwrap();
        read.unwrap();
        assert!(got == bulk, "round {round}: bytes back differ");
        // Let the relay (on this thread) run into "nothing to read" in both directions.
        let deadline = tokio::time::Instant::now() + LIMIT;
        while pooled() < made() || made() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "pipes not returned");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The direction that finished hands its pipe to the one that starts.
        assert!(made() <= 2, "round {round}: {} pipes made", made());
    }
    drop((app, origin));
    let _ = relay.await.unwrap();
    let total = 3000 + 3 * bulk.len() as u64;
    assert_eq!((meter.up(), meter.down()), (total, total));
}

/// splice(2) refusing a descriptor (`EINVAL`: here because the upstream socket is opened for
/// appending, which splice refuses and `write` ignores) ends the relay with a fallback that hands
/// back the bytes already taken from the client, counted once, in order. (The first read is
/// copied, with `write`; the bulk that follows is spliced, and refused.)
#[tokio::test]
async fn refused_splice_falls_back_with_the_bytes_in_flight() {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

    let (mut app, client, upstream, mut origin) = tunnel().await;
    let flags = fcntl_getfl(&upstream).unwrap();
    fcntl_setfl(&upstream, flags | OFlags::APPEND).unwrap();
    let meter = Meter::default();
    let sent = pattern(1 << 20, 5);
    let writer = tokio::spawn(async move {
        app.write_all(&sent).await.unwrap();
        app
    });
    let ended = tokio::time::timeout(
        LIMIT,
        splice_bidirectional(&client, &upstream, &meter, None),
    )
    .await
    .unwrap()
    .unwrap();
    let Spliced::Fallback(f) = ended else {
        panic!("splice should have been refused")
    };
    assert!(f.unsupported, "{:?}", f.cause);
    assert_eq!(Errno::from_io_error(&f.cause), Some(Errno::INVAL));
    assert!(f.leftover.down.is_empty());
    // Delivered (copied) and handed back (in the pipe): the first `meter.up()` bytes, in order.
    drop(upstream);
    let mut delivered = Vec::new();
    origin.read_to_end(&mut delivered).await.unwrap();
    assert!(!f.leftover.up.is_empty());
    delivered.extend_from_slice(&f.leftover.up);
    assert_eq!(delivered.len() as u64, meter.up());
    assert!(
        delivered == pattern(1 << 20, 5)[..delivered.len()],
        "bytes differ"
    );
    drop(client);
    drop(writer);
}
