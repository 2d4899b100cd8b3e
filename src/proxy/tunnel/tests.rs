//! Taking the client connection back from hyper, and the relay's choice of path. The whole tunnel
//! through the real binary is in `tests/connect.rs`; what needs a stream type the binary never
//! serves (the copy fallback for a non-TCP listener) is here.

use std::time::Duration;

use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;

const LIMIT: Duration = Duration::from_secs(20);

const CONNECT: &[u8] = b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n";

fn cap(max: u64) -> Cap {
    Cap {
        max,
        enforce: true,
        reason: Reason::UploadCap,
    }
}

/// Serve `io` with hyper as the proxy does (HTTP/1.1 with upgrades), answer its `CONNECT` with
/// 200, and return the upgraded connection.
async fn upgrade<I>(io: I) -> Upgraded
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let on = hyper::upgrade::on(&mut req);
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(on.await);
        });
        async { Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new())) }
    });
    tokio::spawn(
        http1::Builder::new()
            .serve_connection(io, svc)
            .with_upgrades(),
    );
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Send `CONNECT` and the first payload in one write, as an eager client does; read the 200.
async fn connect_eagerly<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, first: &[u8]) {
    s.write_all(&[CONNECT, first].concat()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
}

async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// The proxy listener's connection type comes back as the raw socket, with the bytes hyper read
/// past the head as the prefix; they reach the upstream first, counted, and the rest is spliced.
#[tokio::test]
async fn tcp_client_comes_back_raw_with_hyper_s_bytes_and_is_spliced() {
    let (mut app, served) = loopback_pair().await;
    let io: ServerIo = TokioIo::new(Metered::new(
        served,
        Arc::new(Meter::default()),
        Direction::Up,
    ));
    let (upgraded, ()) = tokio::join!(upgrade(io), connect_eagerly(&mut app, b"first "));
    let client = Client::take(upgraded);
    assert!(matches!(client.io, ClientIo::Tcp(_)), "{:?}", client.io);
    assert_eq!(&client.prefix[..], b"first ");

    let (mut upstream, mut origin) = loopback_pair().await;
    let meter = Arc::new(Meter::default());
    send_prefix(&mut upstream, client.prefix, &meter, cap(1000))
        .await
        .unwrap();
    let m = meter.clone();
    let relay = tokio::spawn(async move { relay(client.io, upstream, &m, cap(1000)).await });
    app.write_all(b"then the rest").await.unwrap();
    app.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, origin.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"first then the rest");
    origin.write_all(b"reply").await.unwrap();
    origin.shutdown().await.unwrap();
    let mut back = Vec::new();
    app.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"reply");
    let path = relay.await.unwrap().unwrap();
    let expected = if cfg!(target_os = "linux") {
        Relay::Splice
    } else {
        Relay::Copy
    };
    assert_eq!(path, expected);
    assert_eq!((meter.up(), meter.down()), (19, 5));
}

/// Any other stream hyper served (a TLS listener's, here an in-memory pipe) cannot be spliced:
/// it stays hyper's upgraded stream, which itself yields the bytes hyper had read, and the tunnel
/// takes the copy path with the same counting and the same upload cap.
#[tokio::test]
async fn other_streams_take_the_copy_path_with_the_same_counting_and_cap() {
    let (mut app, served) = tokio::io::duplex(64 * 1024);
    let (upgraded, ()) = tokio::join!(
        upgrade(TokioIo::new(served)),
        connect_eagerly(&mut app, b"early bytes, ")
    );
    let client = Client::take(upgraded);
    assert!(
        matches!(client.io, ClientIo::Upgraded(_)),
        "{:?}",
        client.io
    );
    assert!(
        client.prefix.is_empty(),
        "hyper's stream yields them itself"
    );

    let (upstream, mut origin) = loopback_pair().await;
    let meter = Arc::new(Meter::default());
    let m = meter.clone();
    // 13 + 7 bytes fit under the cap of 30; the next write passes it.
    let relay = tokio::spawn(async move { relay(client.io, upstream, &m, cap(30)).await });
    app.write_all(b"then 7").await.unwrap();
    let mut got = vec![0; 19];
    tokio::time::timeout(LIMIT, origin.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"early bytes, then 7");
    origin.write_all(b"down").await.unwrap();
    let mut back = [0; 4];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"down");
    app.write_all(b"and far too many more bytes").await.unwrap();
    let err = tokio::time::timeout(LIMIT, relay)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("upload_cap"), "{err}");
    assert_eq!((meter.up(), meter.down()), (19, 4));
    assert_eq!(meter.cut_reason(), Some(Reason::UploadCap));
}

/// hyper's bytes count against the upload cap like any others: only what fits is sent, and the
/// tunnel ends with the cap's reason.
#[tokio::test]
async fn a_prefix_over_the_cap_sends_only_what_fits() {
    let (mut upstream, mut origin) = loopback_pair().await;
    let meter = Meter::default();
    let err = send_prefix(
        &mut upstream,
        Bytes::from_static(b"0123456789"),
        &meter,
        cap(4),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("upload_cap"), "{err}");
    drop(upstream);
    let mut got = Vec::new();
    origin.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"0123");
    assert_eq!(meter.up(), 4);
    assert_eq!(meter.cut_reason(), Some(Reason::UploadCap));
}

/// splice(2) refusing the sockets part way (`EINVAL`: the upstream socket is opened for
/// appending, which splice refuses and `write` ignores) hands the tunnel to the copy: the bytes
/// splice had taken arrive first, nothing is lost, reordered or counted twice.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn refused_splice_hands_over_to_the_copy_losslessly() {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};

    let (mut app, client) = loopback_pair().await;
    let (upstream, mut origin) = loopback_pair().await;
    fcntl_setfl(&upstream, fcntl_getfl(&upstream).unwrap() | OFlags::APPEND).unwrap();
    let meter = Arc::new(Meter::default());
    let m = meter.clone();
    let relay =
        tokio::spawn(
            async move { relay(ClientIo::Tcp(client), upstream, &m, cap(u64::MAX)).await },
        );
    let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    app.write_all(&up[..1000]).await.unwrap();
    let mut got = vec![0; 1000];
    tokio::time::timeout(LIMIT, origin.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    app.write_all(&up[1000..]).await.unwrap();
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, origin.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    got.extend_from_slice(&rest);
    assert!(got == up, "upstream bytes differ");
    origin.write_all(b"reply").await.unwrap();
    origin.shutdown().await.unwrap();
    let mut back = Vec::new();
    app.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"reply");
    assert_eq!(relay.await.unwrap().unwrap(), Relay::Copy);
    assert_eq!((meter.up(), meter.down()), (up.len() as u64, 5));
}
