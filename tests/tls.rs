#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The TLS issue end to end: the HTTPS proxy listener (curl, reqwest), client-certificate
//! agents (good, wrong CA, none, required), certificate rotation without a restart, and the SNI
//! check on tunnels to TLS ports (curl, openssl s_client fronting, a ClientHello split byte by
//! byte and record by record, non-TLS bytes, no SNI) against a rustls origin that records
//! whether any byte reached it. Certificates are generated here (rcgen); nothing is committed.
//! Every address is on 127.0.0.1.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{
    curl, read_head, wait_until, Agent, ConfigBuilder, Gateway, InProcess, Origin, Proxy, Timeouts,
};

const WAIT: Duration = Duration::from_secs(10);
const SPIFFE: &str = "spiffe://cluster.local/ns/agents-prod/sa/coding-agent";

/// A test CA and the leaves it signs, as PEM files in a temporary directory (which also holds
/// the gateway's config).
struct Pki {
    root: std::path::PathBuf,
    /// Handed to the gateway by [`Pki::start`] (the files live as long as it runs).
    dir: std::cell::RefCell<Option<tempfile::TempDir>>,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            root: dir.path().to_owned(),
            dir: std::cell::RefCell::new(Some(dir)),
            ca: Issuer::new(params, key),
        }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_owned()
    }

    /// A leaf for `sans` (names or IP addresses), with an optional URI SAN and CN, written to
    /// `<file>.crt` and `<file>.key`.
    fn leaf(&self, file: &str, sans: &[&str], uri: Option<&str>, cn: &str) {
        self.leaf_with(file, sans, |params| {
            params.distinguished_name.push(DnType::CommonName, cn);
            if let Some(u) = uri {
                params
                    .subject_alt_names
                    .push(SanType::URI(u.try_into().unwrap()));
            }
        });
    }

    /// A leaf for `sans` whose parameters `edit` sets (names, validity), written to
    /// `<file>.crt` and `<file>.key`.
    fn leaf_with(&self, file: &str, sans: &[&str], edit: impl FnOnce(&mut CertificateParams)) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        // Written to a temporary name and renamed, as the kubelet swaps Secret files.
        for (ext, text) in [("crt", cert.pem()), ("key", key.serialize_pem())] {
            let tmp = self.path(&format!(".{file}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(&format!("{file}.{ext}"))).unwrap();
        }
    }

    /// The gateway's serving certificate (127.0.0.1 and localhost).
    fn server(&self, cn: &str) {
        self.leaf("tls", &["127.0.0.1", "localhost"], None, cn);
    }

    /// Start the gateway with its config in this directory.
    fn start(&self, config: &ConfigBuilder) -> Proxy {
        let dir = self.dir.borrow_mut().take().expect("one gateway per Pki");
        Proxy::of_in(dir, config)
    }

    /// Run the gateway in this process on a paused clock, with its config in this directory.
    fn start_in_process(&self, config: &ConfigBuilder) -> InProcess {
        let dir = self.dir.borrow_mut().take().expect("one gateway per Pki");
        InProcess::of_in(dir, config)
    }
}

/// A TLS origin (rustls) on 127.0.0.1 for `allowed.test`. It records every connection and every
/// connection on which at least one byte arrived (before any TLS processing), and answers each
/// request with `ok`.
struct TlsOrigin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    spoken_to: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl TlsOrigin {
    fn start(pki: &Pki) -> TlsOrigin {
        pki.leaf("origin", &["allowed.test"], None, "allowed.test");
        let chain = CertificateDer::pem_file_iter(pki.path("origin.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("origin.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let spoken_to = Arc::new(AtomicUsize::new(0));
        let (conns, spoken) = (connections.clone(), spoken_to.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (acceptor, spoken) = (acceptor.clone(), spoken.clone());
                tokio::spawn(async move {
                    let mut one = [0u8; 1];
                    match tokio::time::timeout(WAIT, stream.peek(&mut one)).await {
                        Ok(Ok(n)) if n > 0 => spoken.fetch_add(1, Ordering::SeqCst),
                        _ => return,
                    };
                    serve_ok(acceptor, stream).await;
                });
            }
        });
        TlsOrigin {
            addr,
            connections,
            spoken_to,
            _rt: rt,
        }
    }

    fn spoken_to(&self) -> usize {
        self.spoken_to.load(Ordering::SeqCst)
    }
}

/// Complete the handshake, read one request head, answer `ok`.
async fn serve_ok(acceptor: tokio_rustls::TlsAcceptor, stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, acceptor.accept(stream)).await else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let _ = tls
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        .await;
    let _ = tls.shutdown().await;
}

/// The config: a plain and an HTTPS listener, static hosts for the plain origin and the TLS
/// origin, the SNI check on the TLS origin's port, and one agent `local` for all of loopback
/// with policy `p`, which allows both origins.
fn config(origin: SocketAddr, tls_origin: SocketAddr) -> ConfigBuilder {
    let (port, tls_port) = (origin.port(), tls_origin.port());
    ConfigBuilder::bare()
        .with(|c| {
            c.timeouts = Timeouts {
                request_header: Some(Duration::from_secs(2)),
                idle: Some(Duration::from_secs(30)),
                shutdown_grace: Some(Duration::from_secs(5)),
                ..Timeouts::default()
            }
        })
        .tls("tls.crt", "tls.key")
        .hosts_to_loopback(&["origin.test", "allowed.test", "fronted.test"])
        .dest_allow("127.0.0.1/32")
        .sni_ports(&[tls_port])
        .agent(Agent::cidrs("local", &["127.0.0.0/8"], "p"))
        .policy("p", |p| {
            p.allow = vec![
                format!("origin.test:{port}"),
                format!("allowed.test:{tls_port}"),
            ]
        })
}

/// curl through the gateway's HTTPS listener, trusting the test CA for the proxy and origin.
fn curl_https_proxy(
    proxy: &Proxy,
    pki_dir: &str,
    extra: &[&str],
    url: &str,
) -> (i32, String, String) {
    let proxy_url = format!("https://127.0.0.1:{}", proxy.https.unwrap().port());
    let ca = format!("{pki_dir}/ca.pem");
    let mut args = vec![
        "--proxy",
        &proxy_url,
        "--proxy-cacert",
        &ca,
        "--cacert",
        &ca,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args)
}

/// Connect to the plain listener and open a tunnel to `authority`; panics unless it gets 200.
fn tunnel(proxy: &impl Gateway, authority: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// The bytes of a rustls ClientHello: for `name`, or without SNI when `name` is an IP.
fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// The same handshake bytes re-split into records of `size` bytes of payload each.
fn records_of(hello: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in hello[5..].chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// The handshake bytes in as many records as the gateway accepts (`sni::MAX_HELLO_RECORDS`),
/// each as small as that allows.
fn most_records(hello: &[u8]) -> Vec<u8> {
    records_of(hello, (hello.len() - 5).div_ceil(64))
}

/// Write `bytes` one at a time (each its own TCP segment, as far as the sender can make it),
/// until they are all written or the gateway closes the connection.
fn trickle(s: &mut TcpStream, bytes: &[u8]) {
    for b in bytes {
        if s.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// True when the peer closed the connection (EOF or reset) within [`WAIT`]; false if it sent
/// bytes or stayed open.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn the_https_listener_forwards_http_and_tunnels_tls_with_curl() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let dir = pki.path("");
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));

    let url = format!("http://origin.test:{}/over-tls", origin.addr.port());
    let (code, body, err) = curl_https_proxy(&proxy, &dir, &[], &url);
    assert_eq!(code, 0, "{err}");
    assert!(body.starts_with("GET /over-tls HTTP/1.1"), "{body}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str(), a.sni),
        ("http", "allowed", None)
    );

    // HTTPS through the HTTPS proxy: TLS inside TLS, and the SNI check passes.
    let url = format!("https://allowed.test:{}/", tls_origin.addr.port());
    let (code, body, err) = curl_https_proxy(&proxy, &dir, &[], &url);
    assert_eq!((code, body.as_str()), (0, "ok\n"), "{err}");
    let a = proxy.audit();
    assert_eq!(a.event, "connect");
    assert_eq!(a.reason, "allowed");
    assert_eq!(a.sni.as_deref(), Some("allowed.test"));
    assert!(a.bytes_up > 0 && a.bytes_down > 0, "{a:?}");
}

#[test]
fn a_rust_client_uses_the_https_listener() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let ca = std::fs::read(pki.path("ca.pem")).unwrap();
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let proxy_url = format!("https://127.0.0.1:{}", proxy.https.unwrap().port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(&proxy_url).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(WAIT)
            .build()
            .unwrap();
        let url = format!("http://origin.test:{}/from-reqwest", origin.addr.port());
        let resp = client.get(url).send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    assert_eq!(status, 200);
    assert!(body.starts_with("GET /from-reqwest HTTP/1.1"), "{body}");
    assert_eq!(proxy.audit().reason, "allowed");
}

#[test]
fn client_certificates_identify_agents_and_bad_ones_are_refused() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    pki.leaf("coder", &["coder.local"], Some(SPIFFE), "coding-agent");
    pki.leaf("mailer", &["mailer.local"], None, "mail-agent");
    let rogue = Pki::new("rogue CA");
    rogue.leaf("rogue", &["coder.local"], Some(SPIFFE), "coding-agent");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let dir = pki.path("");
    let (coder_crt, coder_key) = (pki.path("coder.crt"), pki.path("coder.key"));
    let (mailer_crt, mailer_key) = (pki.path("mailer.crt"), pki.path("mailer.key"));
    let (rogue_crt, rogue_key) = (rogue.path("rogue.crt"), rogue.path("rogue.key"));
    let proxy = pki.start(
        &config(origin.addr, tls_origin.addr)
            .server(|s| s.client_ca = Some("ca.pem".into()))
            .with(|c| {
                c.agents = vec![
                    Agent {
                        spiffe_id: Some(SPIFFE.into()),
                        ..Agent::new("coder", "p")
                    },
                    Agent {
                        cert_subject: Some("mail-agent".into()),
                        ..Agent::new("mailer", "p")
                    },
                ]
            }),
    );
    let url = format!("http://origin.test:{}/", origin.addr.port());

    for (crt, key, agent) in [
        (&coder_crt, &coder_key, "coder"),
        (&mailer_crt, &mailer_key, "mailer"),
    ] {
        let (code, _, err) = curl_https_proxy(
            &proxy,
            &dir,
            &[
                "--proxy-cert",
                crt,
                "--proxy-key",
                key,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ],
            &url,
        );
        assert_eq!(code, 0, "{err}");
        let a = proxy.audit();
        assert_eq!(
            (a.agent.as_deref(), a.reason.as_str()),
            (Some(agent), "allowed")
        );
    }

    // No certificate: the handshake passes (certificates are optional), identity does not.
    let (code, out, err) = curl_https_proxy(
        &proxy,
        &dir,
        &["-o", "/dev/null", "-w", "%{http_code}"],
        &url,
    );
    assert_eq!((code, out.as_str()), (0, "407"), "{err}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "auth_required")
    );
    assert_eq!(origin.connections(), 2);

    // A certificate from another CA fails the handshake, and is audited.
    let (code, _, _) = curl_https_proxy(
        &proxy,
        &dir,
        &["--proxy-cert", &rogue_crt, "--proxy-key", &rogue_key],
        &url,
    );
    assert_ne!(code, 0);
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("reject", "tls_handshake_failed")
    );
    assert_eq!((a.agent, a.status), (None, None));
    assert_eq!(origin.connections(), 2);

    // The plain listener never identifies a certificate agent.
    let (code, out, _) = curl(&[
        "-x",
        &format!("http://{}", proxy.addr),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "407"));
    assert_eq!(proxy.audit().reason, "auth_required");
}

#[test]
fn a_required_client_certificate_is_enforced_at_the_handshake() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    pki.leaf("coder", &["coder.local"], Some(SPIFFE), "coding-agent");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let dir = pki.path("");
    let (crt, key) = (pki.path("coder.crt"), pki.path("coder.key"));
    let proxy = pki.start(&config(origin.addr, tls_origin.addr).server(|s| {
        s.client_ca = Some("ca.pem".into());
        s.require_client_cert = Some(true);
    }));
    let url = format!("http://origin.test:{}/", origin.addr.port());
    let (code, _, _) = curl_https_proxy(&proxy, &dir, &[], &url);
    assert_ne!(code, 0, "no certificate must fail the handshake");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("reject", "tls_handshake_failed")
    );
    assert_eq!(origin.connections(), 0);

    // With one, the address agent is used (a certificate only matters to certificate agents).
    let (code, _, err) = curl_https_proxy(
        &proxy,
        &dir,
        &["--proxy-cert", &crt, "--proxy-key", &key],
        &url,
    );
    assert_eq!(code, 0, "{err}");
    let a = proxy.audit();
    assert_eq!(
        (a.agent.as_deref(), a.reason.as_str()),
        (Some("local"), "allowed")
    );

    // A handshake that fails after half a second is audited with how long it took (the
    // duration counts from the connection, not from the failure).
    let mut slow = TcpStream::connect(proxy.https.unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let a = proxy.audit();
    assert_eq!(a.reason, "tls_handshake_failed");
    assert!(a.duration_ms >= 400, "duration_ms {}", a.duration_ms);
}

/// The subject CN of the certificate the HTTPS listener serves now.
fn served_cn(https: SocketAddr, ca: &str) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &https.to_string(), "-CAfile", ca])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("subject=")
                .or_else(|| l.strip_prefix("subject ="))
        })
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let pki = Pki::new("test CA");
    pki.server("first");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let ca = pki.path("ca.pem");
    let dir = pki.path("");
    let rotate_dir = dir.clone();
    // The next certificate is signed now (the Pki moves into the proxy) and renamed into place
    // later, as the kubelet swaps a Secret's files.
    pki.leaf("next", &["127.0.0.1", "localhost"], None, "second");
    let proxy = pki.start(&config(origin.addr, tls_origin.addr).admin());
    let https = proxy.https.unwrap();
    assert!(served_cn(https, &ca).contains("first"));
    // rcgen certificates are valid until 4096-01-01.
    let metrics = format!("http://{}/metrics", proxy.admin.unwrap());
    let (_, scrape, _) = curl(&[&metrics]);
    assert!(
        scrape.contains("\nchokepoint_tls_cert_expiry_timestamp_seconds 67090118400\n"),
        "{scrape}"
    );

    for ext in ["crt", "key"] {
        let (from, to) = (
            format!("{rotate_dir}/next.{ext}"),
            format!("{rotate_dir}/tls.{ext}"),
        );
        std::fs::rename(from, to).unwrap();
    }
    proxy.wait_log("TLS files changed");
    assert!(served_cn(https, &ca).contains("second"));
    // And it still proxies.
    let url = format!("http://origin.test:{}/", origin.addr.port());
    let (code, _, err) = curl_https_proxy(&proxy, &dir, &[], &url);
    assert_eq!(code, 0, "{err}");

    // A broken rotation (a key that is not the certificate's) keeps the second certificate.
    std::fs::write(
        format!("{rotate_dir}/tls.key"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    proxy.wait_log("TLS files unusable");
    assert!(served_cn(https, &ca).contains("second"));
}

#[test]
fn curl_through_the_plain_listener_passes_the_sni_check() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let ca = pki.path("ca.pem");
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let url = format!("https://allowed.test:{}/", tls_origin.addr.port());
    let (code, body, err) = curl(&[
        "-x",
        &format!("http://{}", proxy.addr),
        "--cacert",
        &ca,
        &url,
    ]);
    assert_eq!((code, body.as_str()), (0, "ok\n"), "{err}");
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.sni.as_deref()),
        ("allowed", Some("allowed.test"))
    );
}

#[test]
fn domain_fronting_with_openssl_is_cut_before_the_origin_sees_a_byte() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let ca = pki.path("ca.pem");
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-proxy",
            &proxy.addr.to_string(),
            "-connect",
            &format!("allowed.test:{}", tls_origin.addr.port()),
            "-servername",
            "fronted.test",
            "-CAfile",
            &ca,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(!out.status.success(), "the handshake must not complete");
    let a = proxy.audit();
    assert_eq!(a.event, "connect");
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "sni_mismatch")
    );
    assert_eq!(a.sni.as_deref(), Some("fronted.test"));
    assert_eq!(a.host.as_deref(), Some("allowed.test"));
    assert_eq!(
        tls_origin.spoken_to(),
        0,
        "the origin saw the fronted bytes"
    );
}

#[test]
fn a_client_hello_split_byte_by_byte_is_read_whole() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let authority = format!("allowed.test:{}", tls_origin.addr.port());

    // One record, one byte per TCP write: the check passes and the origin answers with its
    // ServerHello (a handshake record).
    let mut s = tunnel(&proxy, &authority);
    trickle(&mut s, &client_hello("allowed.test"));
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 22, "expected the origin's ServerHello");
    drop(s);
    let a = proxy.audit();
    assert_eq!(a.sni.as_deref(), Some("allowed.test"));
    assert_eq!(tls_origin.spoken_to(), 1);

    // The most records a hello may span, one byte per write, for another name: cut, and the
    // origin saw nothing.
    let mut s = tunnel(&proxy, &authority);
    trickle(&mut s, &most_records(&client_hello("fronted.test")));
    assert!(closed(&mut s));
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.sni.as_deref()),
        ("sni_mismatch", Some("fronted.test"))
    );
    assert_eq!(a.bytes_up, 0);
    assert_eq!(
        tls_origin.spoken_to(),
        1,
        "the origin saw the fronted bytes"
    );

    // The same split for the right name is joined and passed on.
    let mut s = tunnel(&proxy, &authority);
    trickle(&mut s, &most_records(&client_hello("allowed.test")));
    s.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 22);
    drop(s);
    assert_eq!(proxy.audit().sni.as_deref(), Some("allowed.test"));
    wait_until(WAIT, "the origin to see the hello", || {
        tls_origin.spoken_to() == 2
    });

    // One byte per record, for the right name: more records than any client uses. Refused
    // once the 65th record arrives, not after the whole hello; the origin sees nothing.
    let mut s = tunnel(&proxy, &authority);
    trickle(&mut s, &records_of(&client_hello("allowed.test"), 1));
    assert!(closed(&mut s));
    let a = proxy.audit();
    assert_eq!((a.reason.as_str(), a.sni.as_deref()), ("not_tls", None));
    assert_eq!(a.bytes_up, 0);
    assert_eq!(tls_origin.spoken_to(), 2, "the origin saw the split hello");
}

#[test]
fn non_tls_bytes_and_a_hello_without_sni_are_refused() {
    // In this process on a paused clock: the hello wait is crossed by moving the clock.
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let cfg = config(origin.addr, tls_origin.addr);
    let hello_bound = cfg.timeouts.request_header.unwrap();
    let proxy = pki.start_in_process(&cfg);
    let authority = format!("allowed.test:{}", tls_origin.addr.port());

    let mut s = tunnel(&proxy, &authority);
    s.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .unwrap();
    assert!(closed(&mut s));
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.sni),
        ("deny", "not_tls", None)
    );

    // rustls sends no SNI for an IP address.
    let mut s = tunnel(&proxy, &authority);
    s.write_all(&client_hello("127.0.0.1")).unwrap();
    assert!(closed(&mut s));
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "sni_missing")
    );

    // A client that sends nothing is cut after timeouts.request_header.
    let mut s = tunnel(&proxy, &authority);
    proxy.advance(hello_bound);
    assert!(closed(&mut s));
    assert_eq!(proxy.audit().reason, "not_tls");
    assert_eq!(tls_origin.spoken_to(), 0);
    assert!(tls_origin.connections.load(Ordering::SeqCst) >= 3);
}

#[test]
fn report_mode_lets_a_fronted_tunnel_through_as_would_deny() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let proxy = pki.start(&config(origin.addr, tls_origin.addr).mode("report"));
    let mut s = tunnel(&proxy, &format!("allowed.test:{}", tls_origin.addr.port()));
    s.write_all(&client_hello("fronted.test")).unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 22);
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("would_deny", "sni_mismatch")
    );
    assert_eq!(a.sni.as_deref(), Some("fronted.test"));
}

#[test]
fn tls_keys_without_a_listener_and_bad_files_are_config_errors() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    std::fs::write(pki.path("empty.pem"), "").unwrap();
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n";
    let tail = "\n[[agents]]\nname = \"a\"\nspiffe_id = \"spiffe://x/y\"\npolicy = \"p\"\n\n[policies.p]\nallow = [\"a.test\"]\n";
    let cases: [(&str, &[&str]); 3] = [
        ("tls_cert = \"tls.crt\"\n", &["server.tls_cert: only used with server.tls_listen", "server.client_ca: agent `a` is identified by a client certificate"]),
        ("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"empty.pem\"\ntls_key = \"tls.key\"\n", &["server.tls_cert:", "holds no PEM"]),
        ("tls_listen = \"127.0.0.1:0\"\ntls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\nrequire_client_cert = true\n", &["server.require_client_cert: needs server.client_ca"]),
    ];
    for (server, expected) in cases {
        let path = pki.root.join("bad.toml");
        std::fs::write(&path, format!("{base}{server}{tail}")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_chokepoint"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        for e in expected {
            assert!(err.contains(e), "missing {e:?} in:\n{err}");
        }
    }
}

#[test]
fn the_https_listener_speaks_tls_1_2_and_1_3_only() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let ca = pki.path("ca.pem");
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let https = proxy.https.unwrap().to_string();
    for (flag, session) in [
        ("-tls1_3", Some("New, TLSv1.3")),
        ("-tls1_2", Some("New, TLSv1.2")),
        ("-tls1_1", None),
    ] {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &https, "-CAfile", &ca, flag])
            .stdin(Stdio::null())
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        match session {
            Some(line) => assert!(
                text.contains(line) && text.contains("Verify return code: 0 (ok)"),
                "{flag}:\n{text}"
            ),
            None => assert!(text.contains("New, (NONE)"), "{flag}:\n{text}"),
        }
    }
}

#[test]
fn a_client_hello_sent_with_the_connect_head_is_checked() {
    // Eager clients write the CONNECT head and their ClientHello in one go: hyper reads both,
    // and the check must see the hello among the bytes hyper already holds.
    let pki = Pki::new("test CA");
    pki.server("gateway");
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let proxy = pki.start(&config(origin.addr, tls_origin.addr));
    let authority = format!("allowed.test:{}", tls_origin.addr.port());
    for (name, passes) in [("fronted.test", false), ("allowed.test", true)] {
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut bytes =
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").into_bytes();
        bytes.extend(client_hello(name));
        s.write_all(&bytes).unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        if passes {
            let mut first = [0u8; 1];
            s.read_exact(&mut first).unwrap();
            assert_eq!(first[0], 22, "expected the origin's ServerHello");
        } else {
            assert!(closed(&mut s));
        }
        drop(s);
        let a = proxy.audit();
        assert_eq!(a.sni.as_deref(), Some(name));
        let expected = if passes { "allowed" } else { "sni_mismatch" };
        assert_eq!(a.reason, expected);
    }
    assert_eq!(
        tls_origin.spoken_to(),
        1,
        "only the allowed hello reached the origin"
    );
}

/// A TLS connection to the gateway's HTTPS listener presenting `<file>.crt` as its client
/// certificate (rustls, the test CA as the only root), for requests written by hand.
fn tls_client(
    proxy: &Proxy,
    pki: &Pki,
    file: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(pki.path(&format!("{file}.crt")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{file}.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let server = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let tcp = TcpStream::connect(proxy.https.unwrap()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// One response from `s`: the head, and a Content-Length body if there is one.
fn read_tls_response(s: &mut impl Read) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("response head cut short ({other:?}): {head:?}"),
        }
    }
    let head = String::from_utf8(head).unwrap();
    let len = support::head_header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

/// `openssl s_client` to the HTTPS listener with `args`, sending `input` and waiting for the
/// server to close; returns what it printed (both streams).
fn s_client(proxy: &Proxy, args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.https.unwrap().to_string(),
            "-ign_eof",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_certificate_identity_ends_at_not_after_on_open_connections_and_resumed_sessions() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    // Valid for 3 more seconds (X.509 times are whole seconds).
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + time::Duration::seconds(3);
    pki.leaf_with("short", &["coder.local"], |p| {
        p.distinguished_name
            .push(DnType::CommonName, "coding-agent");
        p.subject_alt_names
            .push(SanType::URI(SPIFFE.try_into().unwrap()));
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = not_after;
    });
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let (crt, key, ca) = (
        pki.path("short.crt"),
        pki.path("short.key"),
        pki.path("ca.pem"),
    );
    let dir = tempfile::tempdir().unwrap();
    let sessions = |v: &str| {
        dir.path()
            .join(format!("{v}.sess"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let proxy = pki.start(
        &config(origin.addr, tls_origin.addr)
            .server(|s| s.client_ca = Some("ca.pem".into()))
            .request_header(Duration::from_secs(20))
            .with(|c| {
                c.agents = vec![Agent {
                    spiffe_id: Some(SPIFFE.into()),
                    ..Agent::new("coder", "p")
                }]
            }),
    );
    let authority = format!("origin.test:{}", origin.addr.port());
    let get = format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n");

    // Before notAfter: a request on a kept-alive connection, a tunnel, and sessions saved for
    // resumption over TLS 1.3 and 1.2.
    let mut kept = tls_client(&proxy, &pki, "short");
    kept.write_all(get.as_bytes()).unwrap();
    let (head, _) = read_tls_response(&mut kept);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    proxy.find_audit(support::AuditMatch::of("http", "allow", "allowed"));
    let mut tunnel = tls_client(&proxy, &pki, "short");
    write!(
        tunnel,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_tls_response(&mut tunnel);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let close = format!(
        "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    for (v, flag) in [("tls13", "-tls1_3"), ("tls12", "-tls1_2")] {
        let out = s_client(
            &proxy,
            &[
                flag,
                "-cert",
                &crt,
                "-key",
                &key,
                "-CAfile",
                &ca,
                "-sess_out",
                &sessions(v),
            ],
            &close,
        );
        assert!(out.contains("HTTP/1.1 200"), "{v}: {out}");
    }
    let dialled = origin.connections();

    // Past notAfter.
    let past = std::time::SystemTime::from(not_after) + Duration::from_millis(1500);
    if let Ok(wait) = past.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(wait);
    }
    // The open tunnel has been closed, audited like a refusal.
    let mut buf = [0u8; 16];
    assert!(
        matches!(tunnel.read(&mut buf), Ok(0) | Err(_)),
        "tunnel still open"
    );
    proxy.find_audit(support::AuditMatch::of(
        "connect",
        "deny",
        "client_cert_expired",
    ));
    // The kept-alive connection gets 407 on its next request.
    kept.write_all(get.as_bytes()).unwrap();
    let (head, _) = read_tls_response(&mut kept);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert_eq!(
        support::head_header(&head, "chokepoint-reason"),
        Some("client_cert_expired")
    );
    proxy.find_audit(support::AuditMatch::of(
        "http",
        "deny",
        "client_cert_expired",
    ));
    // A resumed session (or a new handshake) gets no tunnel, over TLS 1.3 and 1.2.
    let connect =
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    for (v, flag) in [("tls13", "-tls1_3"), ("tls12", "-tls1_2")] {
        let out = s_client(
            &proxy,
            &[
                flag,
                "-cert",
                &crt,
                "-key",
                &key,
                "-CAfile",
                &ca,
                "-sess_in",
                &sessions(v),
            ],
            &connect,
        );
        assert!(
            !out.contains("HTTP/1.1 200"),
            "{v}: a tunnel after notAfter: {out}"
        );
    }
    assert_eq!(
        origin.connections(),
        dialled,
        "nothing dialled after notAfter"
    );
}

#[test]
fn a_certificate_naming_two_identities_is_refused() {
    let pki = Pki::new("test CA");
    pki.server("gateway");
    pki.leaf_with("two-uris", &["coder.local"], |p| {
        p.distinguished_name
            .push(DnType::CommonName, "coding-agent");
        for u in [
            SPIFFE,
            "spiffe://cluster.local/ns/agents-prod/sa/mail-agent",
        ] {
            p.subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
    });
    let origin = Origin::http();
    let tls_origin = TlsOrigin::start(&pki);
    let proxy = pki.start(
        &config(origin.addr, tls_origin.addr)
            .server(|s| s.client_ca = Some("ca.pem".into()))
            .with(|c| {
                c.agents = vec![
                    Agent {
                        spiffe_id: Some(SPIFFE.into()),
                        ..Agent::new("coder", "p")
                    },
                    Agent {
                        spiffe_id: Some(
                            "spiffe://cluster.local/ns/agents-prod/sa/mail-agent".into(),
                        ),
                        ..Agent::new("mailer", "p")
                    },
                    Agent {
                        cert_subject: Some("coding-agent".into()),
                        ..Agent::new("by-cn", "p")
                    },
                ]
            }),
    );
    let authority = format!("origin.test:{}", origin.addr.port());
    let mut s = tls_client(&proxy, &pki, "two-uris");
    write!(
        s,
        "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_tls_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    let a = proxy.find_audit(support::AuditMatch::of("http", "deny", "auth_failed"));
    assert_eq!(a.agent, None, "identified as neither agent");
    assert_eq!(origin.connections(), 0);

    // Two subject CNs (openssl writes them; rcgen keeps one per attribute).
    let (k, csr, c) = (
        pki.path("two-cns.key"),
        pki.path("two-cns.csr"),
        pki.path("two-cns.crt"),
    );
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    run(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=coding-agent/CN=mail-agent",
        "-keyout",
        &k,
        "-out",
        &csr,
    ]);
    // Signed by the test CA: its key is only in memory, so write it out for openssl.
    std::fs::write(pki.path("ca.key"), pki.ca.key().serialize_pem()).unwrap();
    // Extensions make it an X.509 v3 certificate, which webpki requires.
    let ext = pki.path("two-cns.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &pki.path("ca.pem"),
        "-CAkey",
        &pki.path("ca.key"),
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &c,
    ]);
    let mut s = tls_client(&proxy, &pki, "two-cns");
    write!(
        s,
        "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let (head, _) = read_tls_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    let a = proxy.find_audit(support::AuditMatch::of("http", "deny", "auth_failed"));
    assert_eq!(a.agent, None);
    assert_eq!(origin.connections(), 0);
}
