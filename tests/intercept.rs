#![allow(clippy::unwrap_used, clippy::expect_used)]
//! TLS interception end to end (issue #15), with real clients through the gateway binary:
//! curl, Python requests and httpx, and the OpenAI Python SDK (chat completions, streamed and
//! not), against a fake OpenAI-compatible TLS upstream on 127.0.0.1 whose certificates come from
//! its own CA (given to the gateway as `upstream_ca`). The agent trusts only the gateway's
//! interception CA (`--cacert`, `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`). Names map to 127.0.0.1
//! through `[dns] hosts`; every address is on loopback. Certificates are generated here.
//!
//! What is asserted: the upstream receives the injected key (the agent sent another, or none);
//! the key never reaches the agent nor an audit line; a request outside the rules never reaches
//! the upstream; a rotated key is used from the next request on, and a removed one refuses
//! requests with 503; a host not listed for interception still gets a plain end-to-end tunnel
//! with the SNI check; a bad upstream certificate gives 502 `upstream_tls_failed`; streamed
//! server-sent events reach the SDK one by one (the upstream holds the second event back until
//! the client has shown the first, so a gateway that buffered would never deliver it).

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{
    curl, path_str, skip_unless_ci, AuditMatch, ConfigBuilder, Inject, Intercept, InterceptHost,
    Proxy,
};

const WAIT: Duration = Duration::from_secs(20);
/// The key the gateway injects; the agent never holds it.
const KEY_1: &str = "sk-gateway-held-key-1";
const KEY_2: &str = "sk-gateway-held-key-2";
/// What the agent sends (an SDK insists on some key): replaced by the gateway.
const AGENT_KEY: &str = "sk-agent-has-no-real-key";

/// A CA that signs leaves, and its certificate file.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A rustls server config with a leaf for `names`.
    fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// One request as the fake upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A fake OpenAI-compatible API over TLS on 127.0.0.1: `GET /v1/models`, `POST
/// /v1/chat/completions` (JSON, or server-sent events with `"stream": true`: the first event at
/// once, the rest only after [`FakeOpenAi::release`]), anything else `200 reached`. Every
/// request is recorded.
struct FakeOpenAi {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
    release: tokio::sync::mpsc::UnboundedSender<()>,
    _rt: tokio::runtime::Runtime,
}

type Released = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<()>>>;

impl FakeOpenAi {
    fn start(ca: &Ca, names: &[&str]) -> FakeOpenAi {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(names));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel();
        let (release, released) = tokio::sync::mpsc::unbounded_channel();
        let released: Released = Arc::new(tokio::sync::Mutex::new(released));
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, tx, released) = (acceptor.clone(), tx.clone(), released.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        answer(req, tx.clone(), released.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        FakeOpenAi {
            addr,
            seen,
            release,
            _rt: rt,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next request the upstream received.
    fn next_seen(&self) -> Seen {
        self.seen
            .recv_timeout(WAIT)
            .expect("the upstream received no request")
    }

    /// Every request received so far (none waited for).
    fn drain(&self) -> Vec<Seen> {
        self.seen.try_iter().collect()
    }

    /// Let a held-back event stream go on.
    fn release(&self) {
        self.release.send(()).unwrap();
    }
}

/// A streaming response body fed by a channel.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

type Answer = http_body_util::Either<Full<Bytes>, Chunks>;

fn sse(content: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-test\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

async fn answer(
    mut req: hyper::Request<Incoming>,
    tx: mpsc::Sender<Seen>,
    released: Released,
) -> Result<hyper::Response<Answer>, std::convert::Infallible> {
    let websocket = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let seen = Seen {
        method: req.method().to_string(),
        path: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect(),
    };
    if websocket {
        // Not a real WebSocket server: after the 101 it echoes bytes upper-cased, which is all
        // the relay test needs to see both directions.
        let _ = tx.send(seen);
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(up) = on.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(up);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let _ = io.write_all(&buf[..n].to_ascii_uppercase()).await;
            }
        });
        return Ok(hyper::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-accept", "test")
            .body(Answer::Left(Full::new(Bytes::new())))
            .unwrap());
    }
    let (method, path) = (seen.method.clone(), req.uri().path().to_string());
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body = body.unwrap_or_default();
    let _ = tx.send(seen);
    let json = |s: &str| {
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Answer::Left(Full::new(Bytes::from(s.to_string()))))
            .unwrap()
    };
    Ok(match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => json(
            r#"{"object":"list","data":[{"id":"gpt-test","object":"model","created":0,"owned_by":"test"}]}"#,
        ),
        ("POST", "/v1/chat/completions")
            if String::from_utf8_lossy(&body)
                .replace(' ', "")
                .contains("\"stream\":true") =>
        {
            let (chunks, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let _ = chunks.send(sse("first")).await;
                // Held back until the test has seen the first event arrive at the client.
                let _ = released.lock().await.recv().await;
                let _ = chunks.send(sse("second")).await;
                let _ = chunks.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Answer::Right(Chunks(rx)))
                .unwrap()
        }
        ("POST", "/v1/chat/completions") => json(
            r#"{"id":"c1","object":"chat.completion","created":0,"model":"gpt-test","choices":[{"index":0,"message":{"role":"assistant","content":"hello from upstream"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#,
        ),
        _ => hyper::Response::new(Answer::Left(Full::new(Bytes::from_static(b"reached\n")))),
    })
}

/// The gateway with interception set up, its upstreams and the files it reads.
struct Setup {
    proxy: Proxy,
    api: FakeOpenAi,
    bad: FakeOpenAi,
    root: PathBuf,
}

const API: &str = "api.openai.test";
const PLAIN: &str = "plain.openai.test";
const BAD: &str = "bad.openai.test";

impl Setup {
    /// The gateway CA and the upstream CA; `api.openai.test` (and `plain.openai.test`, not
    /// intercepted) served by one fake upstream with an upstream-CA certificate, and
    /// `bad.openai.test` by one whose certificate names another host.
    fn start() -> Setup {
        let gateway_ca = Ca::new("chokepoint interception CA");
        let upstream_ca = Ca::new("upstream CA");
        let api = FakeOpenAi::start(&upstream_ca, &[API, PLAIN]);
        let bad = FakeOpenAi::start(&upstream_ca, &["wrong.test"]);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::write(root.join("gw-ca.crt"), &gateway_ca.cert_pem).unwrap();
        std::fs::write(root.join("gw-ca.key"), &gateway_ca.key_pem).unwrap();
        std::fs::write(root.join("upstream-ca.crt"), &upstream_ca.cert_pem).unwrap();
        std::fs::write(root.join("openai-key"), format!("{KEY_1}\n")).unwrap();
        let cfg = Setup::config(api.port(), bad.port(), true);
        let proxy = Proxy::of_in(dir, &cfg);
        Setup {
            proxy,
            api,
            bad,
            root,
        }
    }

    /// The gateway's config: `api.openai.test` allowed and intercepted with a credential and
    /// rules (neither when `with_api` is false), `plain.openai.test` a plain tunnel,
    /// `bad.openai.test` intercepted without a credential.
    fn config(port: u16, bad_port: u16, with_api: bool) -> ConfigBuilder {
        let mut cfg = ConfigBuilder::new()
            .admin()
            .hosts_to_loopback(&[API, PLAIN, BAD])
            .sni_ports(&[port, bad_port]);
        if with_api {
            cfg = cfg.allow(format!("{API}:{port}"));
        }
        cfg.allow(format!("{PLAIN}:{port}"))
            .allow(format!("{BAD}:{bad_port}"))
            .policy(support::TEST_POLICY, |p| {
                p.intercept = vec![InterceptHost {
                    host: format!("{BAD}:{bad_port}"),
                    ..InterceptHost::default()
                }];
                if !with_api {
                    return;
                }
                p.intercept.push(InterceptHost {
                    host: format!("{API}:{port}"),
                    inject: vec![Inject {
                        header: "authorization".into(),
                        value_file: "openai-key".into(),
                        format: Some("Bearer {}".into()),
                    }],
                    rules: vec![
                        "POST /v1/chat/completions".into(),
                        "GET /v1/models".into(),
                        "GET /v1/realtime".into(),
                    ],
                });
            })
            .with(|c| {
                c.intercept = Some(Intercept {
                    ca_cert: "gw-ca.crt".into(),
                    ca_key: "gw-ca.key".into(),
                    upstream_ca: vec!["upstream-ca.crt".into()],
                })
            })
    }

    fn file(&self, name: &str) -> String {
        path_str(&self.root.join(name))
    }

    fn url(&self, path: &str) -> String {
        format!("https://{API}:{}{path}", self.api.port())
    }

    /// curl through the gateway trusting only the gateway CA; returns (exit, head+body, stderr).
    fn curl(&self, args: &[&str]) -> (i32, String, String) {
        let proxy = self.proxy.url();
        let ca = self.file("gw-ca.crt");
        let mut all = vec![
            "-i",
            "--suppress-connect-headers",
            "--proxy",
            &proxy,
            "--cacert",
            &ca,
        ];
        all.extend_from_slice(args);
        curl(&all)
    }

    /// The value of the metric series `series` (name and labels as exported), 0 if absent.
    fn metric(&self, series: &str) -> u64 {
        let admin = format!("http://{}/metrics", self.proxy.admin.unwrap());
        let (code, body, _) = curl(&[&admin]);
        assert_eq!(code, 0);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Replace the secret file atomically (as the kubelet swaps Secret files).
    fn rotate(&self, key: &str) {
        let tmp = self.root.join(".openai-key.tmp");
        std::fs::write(&tmp, key).unwrap();
        std::fs::rename(&tmp, self.root.join("openai-key")).unwrap();
    }
}

#[test]
fn curl_gets_the_injected_key_and_never_sees_it() {
    let s = Setup::start();
    let auth = format!("authorization: Bearer {AGENT_KEY}");
    let (code, out, err) = s.curl(&["-H", &auth, &s.url("/v1/models")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("gpt-test"), "{out}");
    assert!(
        !out.contains(KEY_1) && !err.contains(KEY_1),
        "the agent saw the key"
    );
    let seen = s.api.next_seen();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(
        seen.all("authorization"),
        [format!("Bearer {KEY_1}")],
        "injected, and the agent's own dropped"
    );
    assert_eq!(
        seen.header("host"),
        Some(&*format!("{API}:{}", s.api.port()))
    );
    assert!(seen.header("proxy-authorization").is_none());
    let line = s.proxy.find_audit(
        AuditMatch::of("http", "allow", "allowed")
            .method(Some("GET"))
            .path(Some("/v1/models"))
            .status(200)
            .rule(Some("GET /v1/models"))
            .and("intercepted", |a| a.intercepted)
            .and("credential", |a| {
                a.credential.as_deref() == Some("openai-key")
            }),
    );
    assert!(line.bytes_down > 0, "{line}");
    // The tunnel's own line, written when curl closes it.
    s.proxy.find_audit(
        AuditMatch::of("connect", "allow", "allowed")
            .host(Some(API))
            .status(200)
            .sni(Some(API))
            .and("intercepted", |a| a.intercepted && a.credential.is_none()),
    );
    // A client that does not trust the interception CA fails its handshake: audited.
    let proxy = s.proxy.url();
    let (code, _, _) = curl(&["--proxy", &proxy, &s.url("/v1/models")]);
    assert_ne!(
        code, 0,
        "curl must refuse the gateway's leaf without its CA"
    );
    s.proxy.find_audit(
        AuditMatch::of("connect", "deny", "tls_handshake_failed")
            .status(200)
            .and("intercepted", |a| a.intercepted),
    );
    assert!(
        s.api.drain().is_empty(),
        "the refused handshake reached the upstream"
    );
    assert_eq!(
        s.metric("chokepoint_intercepted_tunnels_total{result=\"ok\"}"),
        1
    );
    assert_eq!(
        s.metric("chokepoint_intercepted_tunnels_total{result=\"handshake_failed\"}"),
        1
    );
    // One leaf for the host, reused by the second tunnel.
    assert_eq!(
        s.metric("chokepoint_intercept_certificates_minted_total"),
        1
    );
    assert_eq!(s.metric("chokepoint_intercept_certificates_cached"), 1);
}

#[test]
fn a_request_outside_the_rules_never_reaches_the_upstream() {
    let s = Setup::start();
    for (method, path, extra) in [
        ("POST", "/v1/files", None),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/v1/models/../files", Some("--path-as-is")),
    ] {
        let url = s.url(path);
        let mut args = vec!["-X", method, &url];
        args.extend(extra);
        let (code, out, err) = s.curl(&args);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("HTTP/1.1 403"), "{method} {path}: {out}");
        assert!(out.contains("chokepoint-reason: path_not_allowed"), "{out}");
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(body.lines().count(), 1, "one line: {body}");
        assert!(body.contains("policy decision"), "{body}");
        s.proxy.find_audit(
            AuditMatch::of("http", "deny", "path_not_allowed")
                .method(Some(method))
                .status(403)
                .and("intercepted", |a| a.intercepted),
        );
    }
    // An allowed request after them is the first the upstream sees.
    let (code, out, _) = s.curl(&[&s.url("/v1/models")]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = s.api.drain();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/v1/models");
    // Another virtual host of the same server through the intercepted tunnel: refused.
    let (code, out, _) = s.curl(&["-H", "host: other.test", &s.url("/v1/models")]);
    assert_eq!(code, 0);
    assert!(out.contains("chokepoint-reason: host_mismatch"), "{out}");
    assert!(s.api.drain().is_empty());
}

#[test]
fn key_rotation_takes_effect_on_the_next_request_and_removal_refuses() {
    let s = Setup::start();
    let (_, out, _) = s.curl(&[&s.url("/v1/models")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        s.api.next_seen().header("authorization"),
        Some(&*format!("Bearer {KEY_1}"))
    );
    s.rotate(KEY_2);
    // Applied once two polls a second apart read the same bytes: within a few seconds.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, out, _) = s.curl(&[&s.url("/v1/models")]);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let auth = s
            .api
            .next_seen()
            .header("authorization")
            .unwrap()
            .to_string();
        if auth == format!("Bearer {KEY_2}") {
            break;
        }
        assert_eq!(
            auth,
            format!("Bearer {KEY_1}"),
            "only the old or the new key"
        );
        assert!(Instant::now() < deadline, "the rotated key was never used");
        std::thread::sleep(Duration::from_millis(200));
    }
    // From then on, the new key only.
    for _ in 0..2 {
        s.curl(&[&s.url("/v1/models")]);
        assert_eq!(
            s.api.next_seen().header("authorization"),
            Some(&*format!("Bearer {KEY_2}"))
        );
    }
    // The Secret key removed: after a few polls, requests are refused, never sent keyless.
    std::fs::remove_file(s.root.join("openai-key")).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, out, _) = s.curl(&[&s.url("/v1/models")]);
        if out.starts_with("HTTP/1.1 503") {
            assert!(
                out.contains("chokepoint-reason: credential_unavailable"),
                "{out}"
            );
            break;
        }
        assert_eq!(
            s.api.next_seen().header("authorization"),
            Some(&*format!("Bearer {KEY_2}"))
        );
        assert!(
            Instant::now() < deadline,
            "the removed key was never noticed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        s.api.drain().is_empty(),
        "a request went out without its key"
    );
    s.proxy.find_audit(
        AuditMatch::of("http", "allow", "credential_unavailable")
            .status(503)
            .and("credential", |a| {
                a.credential.as_deref() == Some("openai-key")
            }),
    );
}

#[test]
fn a_host_not_intercepted_keeps_the_plain_tunnel_and_the_sni_check() {
    let s = Setup::start();
    let proxy = s.proxy.url();
    let url = format!("https://{PLAIN}:{}/v1/models", s.api.port());
    // End-to-end TLS with the upstream: its own CA verifies, and nothing is injected.
    let upstream_ca = s.file("upstream-ca.crt");
    let (code, out, err) = curl(&[
        "-i",
        "--suppress-connect-headers",
        "--proxy",
        &proxy,
        "--cacert",
        &upstream_ca,
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = s.api.next_seen();
    assert!(seen.header("authorization").is_none(), "{seen:?}");
    s.proxy.find_audit(
        AuditMatch::of("connect", "allow", "allowed")
            .host(Some(PLAIN))
            .sni(Some(PLAIN))
            .and("not intercepted", |a| !a.intercepted),
    );
    // The gateway CA does not vouch for it: no leaf is minted for a host not intercepted.
    let gw_ca = s.file("gw-ca.crt");
    let (code, _, _) = curl(&["--proxy", &proxy, "--cacert", &gw_ca, &url]);
    assert_ne!(code, 0);
    // Fronting through it is cut by the SNI check.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-proxy",
            &s.proxy.addr.to_string(),
            "-connect",
            &format!("{PLAIN}:{}", s.api.port()),
            "-servername",
            API,
            "-CAfile",
            &upstream_ca,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(!out.status.success());
    s.proxy.find_audit(
        AuditMatch::of("connect", "deny", "sni_mismatch")
            .host(Some(PLAIN))
            .sni(Some(API)),
    );
}

#[test]
fn a_bad_upstream_certificate_gives_502_inside_the_session() {
    let s = Setup::start();
    let url = format!("https://{BAD}:{}/v1/models", s.bad.port());
    let (code, out, err) = s.curl(&[&url]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.contains("chokepoint-reason: upstream_tls_failed"),
        "{out}"
    );
    s.proxy.find_audit(
        AuditMatch::of("http", "allow", "upstream_tls_failed")
            .host(Some(BAD))
            .status(502),
    );
    assert!(
        s.bad.drain().is_empty(),
        "a request went to an unverified upstream"
    );
    assert_eq!(
        s.metric("chokepoint_intercept_upstream_tls_failures_total"),
        1
    );
}

/// The Python interpreter with `modules`, or `None` (a skip; under CI a failure).
fn python(modules: &str) -> Option<String> {
    let py = std::env::var("CHOKEPOINT_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip_unless_ci(&format!(
            "{py} with {modules} (pip install requests httpx openai; .ci/run installs them)"
        ));
        return None;
    }
    Some(py)
}

/// Run `script` with the agent's usual environment: the gateway as `HTTPS_PROXY`, its CA as
/// `SSL_CERT_FILE` and `REQUESTS_CA_BUNDLE`.
fn run_python(py: &str, s: &Setup, script: &str) -> std::process::Child {
    Command::new(py)
        .args(["-u", "-c", script])
        .env("HTTPS_PROXY", s.proxy.url())
        .env("https_proxy", s.proxy.url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .env("SSL_CERT_FILE", s.file("gw-ca.crt"))
        .env("REQUESTS_CA_BUNDLE", s.file("gw-ca.crt"))
        .env("BASE", s.url("/v1"))
        .env("OPENAI_API_KEY", AGENT_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn python_requests_and_httpx_through_https_proxy() {
    let Some(py) = python("requests, httpx") else {
        return;
    };
    let s = Setup::start();
    let script = r#"
import os, requests, httpx
base = os.environ["BASE"]
r = requests.get(base + "/models", headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
print("requests", r.status_code, r.json()["data"][0]["id"], dict(r.headers).get("authorization"))
with httpx.Client(trust_env=True) as c:
    r = c.get(base + "/models")
    print("httpx", r.status_code, r.json()["data"][0]["id"])
    r = c.post(base + "/embeddings", json={})
    print("httpx", r.status_code, r.headers.get("chokepoint-reason"))
"#;
    let out = output(run_python(&py, &s, script));
    assert!(out.contains("requests 200 gpt-test None"), "{out}");
    assert!(out.contains("httpx 200 gpt-test"), "{out}");
    assert!(out.contains("httpx 403 path_not_allowed"), "{out}");
    assert!(!out.contains(KEY_1));
    let seen = s.api.drain();
    assert_eq!(
        seen.len(),
        2,
        "the refused request reached the upstream: {seen:?}"
    );
    for r in &seen {
        assert_eq!(r.all("authorization"), [format!("Bearer {KEY_1}")]);
    }
}

#[test]
fn the_openai_sdk_completes_and_streams_through_interception() {
    let Some(py) = python("openai") else {
        return;
    };
    let s = Setup::start();
    let script = r#"
import os, sys
from openai import OpenAI
client = OpenAI(base_url=os.environ["BASE"])
r = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
print("complete", r.choices[0].message.content, flush=True)
stream = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print("delta", chunk.choices[0].delta.content, flush=True)
print("done", flush=True)
"#;
    let mut child = run_python(&py, &s, script);
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let next = || lines.recv_timeout(WAIT).ok();
    let first = next();
    assert_eq!(
        first.as_deref(),
        Some("complete hello from upstream"),
        "{}",
        stderr_of(&mut child)
    );
    // The first event must reach the SDK while the upstream still holds the second back.
    let delta = next();
    assert_eq!(
        delta.as_deref(),
        Some("delta first"),
        "the stream was buffered: {}",
        stderr_of(&mut child)
    );
    s.api.release();
    assert_eq!(next().as_deref(), Some("delta second"));
    assert_eq!(next().as_deref(), Some("done"));
    assert!(child.wait().unwrap().success());
    let seen = s.api.drain();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(
            r.all("authorization"),
            [format!("Bearer {KEY_1}")],
            "the SDK's own key was replaced"
        );
    }
    s.proxy.find_audit(
        AuditMatch::of("http", "allow", "allowed")
            .path(Some("/v1/chat/completions"))
            .and("streamed", |a| a.intercepted && a.bytes_down > 0),
    );
}

fn stderr_of(child: &mut std::process::Child) -> String {
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    err
}

#[test]
fn plain_http_to_an_intercepted_host_follows_its_rules_and_gets_no_credential() {
    let origin = support::Origin::http();
    let ca = Ca::new("chokepoint interception CA");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gw-ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(dir.path().join("gw-ca.key"), &ca.key_pem).unwrap();
    std::fs::write(dir.path().join("key"), KEY_1).unwrap();
    let host = format!("docs.openai.test:{}", origin.addr.port());
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["docs.openai.test"])
        .allow(host.clone())
        .policy(support::TEST_POLICY, |p| {
            p.intercept = vec![InterceptHost {
                host: host.clone(),
                inject: vec![Inject {
                    header: "x-api-key".into(),
                    value_file: "key".into(),
                    format: None,
                }],
                rules: vec!["GET /docs/**".into()],
            }];
        })
        .with(|c| {
            c.intercept = Some(Intercept {
                ca_cert: "gw-ca.crt".into(),
                ca_key: "gw-ca.key".into(),
                upstream_ca: vec![],
            })
        });
    let gw = support::InProcess::of_in(dir, &cfg);
    let proxy = gw.url();
    let (code, out, _) = curl(&["-i", "--proxy", &proxy, &format!("http://{host}/docs/a/b")]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = origin.next_seen();
    assert!(
        seen.header("x-api-key").is_none(),
        "a credential went out in clear"
    );
    gw.find_audit(AuditMatch::of("http", "allow", "allowed").path(Some("/docs/a/b")));
    let (_, out, _) = curl(&["-i", "--proxy", &proxy, &format!("http://{host}/admin")]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("chokepoint-reason: path_not_allowed"), "{out}");
    gw.find_audit(AuditMatch::of("http", "deny", "path_not_allowed").path(Some("/admin")));
    assert_eq!(
        origin.connections(),
        1,
        "the refused request reached the origin"
    );
}

/// A TLS session with the gateway inside a CONNECT tunnel to `authority`, trusting only the
/// gateway CA (a raw client, for exact bytes after a WebSocket handshake).
fn tls_tunnel(
    s: &Setup,
    authority: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use std::io::Write;
    let mut tcp = support::raw(&s.proxy);
    write!(
        tcp,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let head = support::read_head(&mut tcp);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(s.root.join("gw-ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(API).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Read a response head (through `\r\n\r\n`) from `r`.
fn head_of(r: &mut impl std::io::Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(r.read(&mut byte).unwrap(), 1, "closed after {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn a_websocket_the_rules_allow_is_relayed_with_the_credential() {
    use std::io::{Read, Write};
    let s = Setup::start();
    let authority = format!("{API}:{}", s.api.port());
    let handshake = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {AGENT_KEY}\r\n\r\n"
        )
    };
    // A path outside the rules: refused inside the session, never upstream.
    let mut tls = tls_tunnel(&s, &authority);
    tls.write_all(handshake("/v1/other").as_bytes()).unwrap();
    let head = head_of(&mut tls);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("chokepoint-reason: path_not_allowed"),
        "{head}"
    );
    assert!(s.api.drain().is_empty());
    drop(tls);

    let mut tls = tls_tunnel(&s, &authority);
    tls.write_all(handshake("/v1/realtime").as_bytes()).unwrap();
    let head = head_of(&mut tls);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    let seen = s.api.next_seen();
    assert_eq!(seen.path, "/v1/realtime");
    assert_eq!(seen.all("authorization"), [format!("Bearer {KEY_1}")]);
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    for word in ["ping", "second frame"] {
        tls.write_all(word.as_bytes()).unwrap();
        let mut back = vec![0u8; word.len()];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(back, word.to_ascii_uppercase().as_bytes());
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    drop(tls);
    let line = s.proxy.find_audit(
        AuditMatch::of("http", "allow", "allowed")
            .path(Some("/v1/realtime"))
            .status(101)
            .and("intercepted", |a| a.intercepted),
    );
    assert_eq!((line.bytes_up, line.bytes_down), (16, 16), "{line}");
}

/// Issue #14 item 1 for an intercepted session: a reload that no longer allows its host closes
/// it within a second, with the tunnel's line audited `revoked`; a session to a host still
/// allowed stays open and keeps working.
#[test]
fn a_reload_that_no_longer_allows_the_host_closes_the_intercepted_session() {
    use std::io::{Read, Write};
    let s = Setup::start();
    let authority = format!("{API}:{}", s.api.port());
    let get = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>| {
        tls.write_all(format!("GET /v1/models HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
            .unwrap();
        let head = head_of(tls);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .expect("a Content-Length");
        let mut body = vec![0u8; len];
        tls.read_exact(&mut body).unwrap();
        head
    };
    let mut tls = tls_tunnel(&s, &authority);
    assert!(get(&mut tls).starts_with("HTTP/1.1 200"));
    assert_eq!(s.api.next_seen().path, "/v1/models");

    // An unrelated reload (the plain host's rule dropped) leaves the session alone.
    let with_api = Setup::config(s.api.port(), s.bad.port(), true).allow("unrelated.test:443");
    std::fs::write(&s.proxy.config_path, with_api.to_toml()).unwrap();
    s.proxy.signal("HUP");
    s.proxy.wait_log("config reloaded");
    assert!(get(&mut tls).starts_with("HTTP/1.1 200"));

    // The host leaves the allowlist (and interception with it): the session is closed.
    let without = Setup::config(s.api.port(), s.bad.port(), false);
    std::fs::write(&s.proxy.config_path, without.to_toml()).unwrap();
    s.proxy.signal("HUP");
    let reloaded = Instant::now();
    s.proxy.wait_log("config reloaded");
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 512];
    loop {
        match tls.sock.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {} // a close_notify or alert, then the end
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "the intercepted session is still open 1 s after the reload"
                );
                break;
            }
        }
    }
    eprintln!(
        "revoked session closed {:?} after the HUP",
        reloaded.elapsed()
    );
    for _ in 0..2 {
        s.proxy.expect_audit(
            AuditMatch::of("http", "allow", "allowed")
                .path(Some("/v1/models"))
                .status(200),
        );
    }
    s.proxy.expect_audit(
        AuditMatch::of("connect", "deny", "revoked")
            .host(Some(API))
            .status(200)
            .and("intercepted", |a| a.intercepted),
    );
    let seen = s.api.drain();
    assert_eq!(
        seen.len(),
        1,
        "the request after the unrelated reload, none after the revoking one: {seen:?}"
    );
}
