//! The upstream connection pool of plain-HTTP forwarding, through the real binary: keep-alive
//! connections are reused for later requests of the same agent to the same host and vetted
//! address, never across agents or hosts, never past a reload that removed the rule or moved the
//! name, never after a response that was not read to its end or that said `Connection: close`;
//! a server that closes an idle pooled connection does not fail the next request; and every
//! request still gets its own complete audit line.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::*;

/// Body size of `GET /big`: far more than loopback socket buffers hold, so a client that stops
/// reading stops the proxy reading too.
const BIG: usize = 64 << 20;

/// One request as the scripted origin saw it.
#[derive(Debug)]
struct Hit {
    /// Which accepted connection (1-based) carried it.
    conn: usize,
    request_line: String,
    body: usize,
}

/// An HTTP/1.1 origin on std sockets whose behaviour per request is chosen by its path:
/// `/big` answers 64 MiB; `/close` answers with `Connection: close` but keeps the connection
/// open (so only the proxy's own rule stops reuse); `/bye` answers, then closes the connection
/// (no header: a server timing out an idle keep-alive connection); `/drop-next` answers, then
/// reads the next request on the same connection and closes without answering (the close races
/// the request); anything else answers `conn N` (the connection that carried it).
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    hits: Receiver<Hit>,
}

impl Scripted {
    fn start(bind: &str) -> Scripted {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, hits) = mpsc::channel();
        let count = connections.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
                let tx = tx.clone();
                thread::spawn(move || serve(stream, conn, &tx));
            }
        });
        Scripted {
            addr,
            connections,
            hits,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn hit(&self) -> Hit {
        self.hits.recv_timeout(WAIT).expect("origin saw no request")
    }

    fn no_more_hits(&self) {
        if let Ok(h) = self.hits.recv_timeout(Duration::from_millis(200)) {
            panic!("unexpected request at the origin: {h:?}");
        }
    }
}

/// Read one request head and its `Content-Length` body; `None` at EOF or on an error.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, usize)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let request_line = line.trim_end().to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((request_line, len))
}

fn serve(stream: TcpStream, conn: usize, tx: &mpsc::Sender<Hit>) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let mut drop_next = false;
    while let Some((request_line, body)) = read_request(&mut r) {
        let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
        let _ = tx.send(Hit {
            conn,
            request_line,
            body,
        });
        if drop_next {
            return; // read the request, answer nothing, close
        }
        let ok = match path.as_str() {
            "/big" => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n");
                let chunk = vec![0u8; 64 * 1024];
                w.write_all(head.as_bytes()).is_ok()
                    && (0..BIG / chunk.len()).all(|_| w.write_all(&chunk).is_ok())
            }
            "/close" => w
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nclose",
                )
                .is_ok(),
            _ => {
                let body = format!("conn {conn}");
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                w.write_all(head.as_bytes()).is_ok() && w.write_all(body.as_bytes()).is_ok()
            }
        };
        if !ok || path == "/bye" {
            return;
        }
        drop_next = path == "/drop-next";
    }
}

/// Send `request` on a new client connection and read the response: (status line, body).
fn exchange(proxy: &Proxy, request: &str) -> (String, String) {
    let mut s = raw(proxy);
    s.write_all(request.as_bytes()).unwrap();
    let head = read_head(&mut s);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    let status = head.lines().next().unwrap_or("").to_string();
    (status, String::from_utf8(body).unwrap())
}

fn get(proxy: &Proxy, host: &str, port: u16, path: &str) -> (String, String) {
    exchange(
        proxy,
        &format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"),
    )
}

/// Replace a file atomically, as editors and `kubectl` do.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The standard test config with `hosts` on 127.0.0.1 and `a.test`, `b.test` allowed on
/// `origin_port`.
fn base(hosts: &[&str], origin_port: u16) -> ConfigBuilder {
    ConfigBuilder::new()
        .hosts_to_loopback(hosts)
        .allow(format!("a.test:{origin_port}"))
        .allow(format!("b.test:{origin_port}"))
}

fn start(hosts: &[&str], origin_port: u16) -> Proxy {
    Proxy::of(&base(hosts, origin_port))
}

#[test]
fn sequential_requests_of_one_agent_to_one_host_share_one_upstream_connection() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let proxy = start(&["a.test"], port);
    for i in 0..5 {
        // A new client connection each time: the pool is not tied to the client's connection.
        let (status, body) = get(&proxy, "a.test", port, &format!("/r{i}"));
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(body, "conn 1");
        let hit = origin.hit();
        assert_eq!(hit.request_line, format!("GET /r{i} HTTP/1.1"));
        // Every request keeps its own complete audit line, as without the pool.
        let a = proxy.audit();
        assert_eq!(
            (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
            ("http", "allow", "allowed")
        );
        assert_eq!(a.method.as_deref(), Some("GET"));
        assert_eq!(a.host.as_deref(), Some("a.test"));
        assert_eq!(a.port, Some(port));
        assert_eq!(a.path, Some(format!("/r{i}")));
        assert_eq!(a.rule, Some(format!("a.test:{port}")));
        assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
        assert_eq!(a.status, Some(200));
        assert_eq!((a.bytes_up, a.bytes_down), (0, "conn 1".len() as u64));
    }
    assert_eq!(origin.connections(), 1);

    // A body both ways is counted per request on a reused connection too.
    let (status, body) = exchange(
        &proxy,
        &format!(
            "POST http://a.test:{port}/up HTTP/1.1\r\nHost: a.test:{port}\r\nContent-Length: 7\r\n\r\npayload"
        ),
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "conn 1");
    assert_eq!(origin.hit().body, 7);
    let a = proxy.audit();
    assert_eq!((a.bytes_up, a.bytes_down), (7, 6));
    assert_eq!(origin.connections(), 1);
}

#[test]
fn no_reuse_across_agents_or_hosts() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let cfg = base(&["a.test", "b.test"], port)
        .edit_agent(TESTER, |a| {
            a.source_cidrs = Some(vec!["127.0.0.10/32".into()])
        })
        .agent(Agent::cidrs("other", &["127.0.0.20/32"], TEST_POLICY));
    let proxy = Proxy::of(&cfg);
    // (client address, host) → which upstream connection answers.
    let via = |from: &str, host: &str| {
        let (_, out, err) = curl(&[
            "--interface",
            from,
            "-x",
            &proxy.url(),
            &format!("http://{host}:{port}/"),
        ]);
        let a = proxy.audit(); // written once the connection is back in the pool
        assert_eq!(a.reason, "allowed", "{a:?} {err}");
        (a.agent.unwrap(), out)
    };
    assert_eq!(
        via("127.0.0.10", "a.test"),
        ("tester".into(), "conn 1".into())
    );
    assert_eq!(
        via("127.0.0.10", "a.test"),
        ("tester".into(), "conn 1".into())
    );
    assert_eq!(
        via("127.0.0.20", "a.test"),
        ("other".into(), "conn 2".into()),
        "another agent never gets the first agent's connection"
    );
    assert_eq!(
        via("127.0.0.10", "b.test"),
        ("tester".into(), "conn 3".into()),
        "another host (same address and port) never gets a.test's connection"
    );
    assert_eq!(
        via("127.0.0.20", "a.test"),
        ("other".into(), "conn 2".into())
    );
    assert_eq!(
        via("127.0.0.10", "b.test"),
        ("tester".into(), "conn 3".into())
    );
    assert_eq!(origin.connections(), 3);
}

#[test]
fn a_rule_removed_by_reload_refuses_the_next_request_despite_an_idle_connection() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let cfg = base(&["a.test", "b.test"], port);
    let proxy = Proxy::of(&cfg);
    let (status, _) = get(&proxy, "a.test", port, "/first");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    origin.hit();
    assert_eq!(proxy.audit().reason, "allowed");

    let without_a = cfg.policy(TEST_POLICY, |p| p.allow = vec![format!("b.test:{port}")]);
    replace(&proxy.config_path, &without_a.to_toml());
    proxy.wait_log("config reloaded");
    let (status, _) = get(&proxy, "a.test", port, "/second");
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.upstream),
        ("deny", "host_not_allowed", None)
    );
    origin.no_more_hits();
    assert_eq!(origin.connections(), 1);
}

#[test]
fn a_name_moved_by_reload_goes_to_its_new_address_despite_an_idle_connection() {
    // The same port on another loopback address: only the vetted address tells them apart. The
    // port the kernel picks for 127.0.0.1 may be taken on 127.0.0.2 by a parallel test: retry.
    let (old, new) = (0..50)
        .find_map(|_| {
            let old = Scripted::start("127.0.0.1:0");
            let free = TcpListener::bind(("127.0.0.2", old.addr.port())).is_ok();
            free.then(|| {
                let new = Scripted::start(&format!("127.0.0.2:{}", old.addr.port()));
                (old, new)
            })
        })
        .expect("a port free on both 127.0.0.1 and 127.0.0.2");
    let port = old.addr.port();
    let cfg = |to: &str| {
        ConfigBuilder::new()
            .host("a.test", &[to])
            .allow(format!("a.test:{port}"))
            .dest_allow("127.0.0.2/32")
            .to_toml()
    };
    let proxy = Proxy::start(&cfg("127.0.0.1"));
    assert_eq!(get(&proxy, "a.test", port, "/").1, "conn 1");
    assert_eq!(proxy.audit().upstream, Some(format!("127.0.0.1:{port}")));

    replace(&proxy.config_path, &cfg("127.0.0.2"));
    proxy.wait_log("config reloaded");
    assert_eq!(get(&proxy, "a.test", port, "/").1, "conn 1");
    let a = proxy.audit();
    assert_eq!(a.upstream, Some(format!("127.0.0.2:{port}")));
    assert_eq!((old.connections(), new.connections()), (1, 1));
    old.hit();
    old.no_more_hits();
    new.hit();
}

#[test]
fn connection_close_and_unfinished_responses_are_not_reused() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let proxy = start(&["a.test"], port);

    // `Connection: close` (the origin keeps the socket open anyway): never reused.
    for _ in 0..2 {
        let (status, body) = get(&proxy, "a.test", port, "/close");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(body, "close");
        assert_eq!(proxy.audit().reason, "allowed");
    }
    assert_eq!(origin.connections(), 2);

    // A response the client stops reading is not read to its end: not reused.
    let (_, body) = get(&proxy, "a.test", port, "/");
    assert_eq!(body, "conn 3");
    assert_eq!(proxy.audit().reason, "allowed");
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://a.test:{port}/big HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.read_exact(&mut [0u8; 1024]).unwrap();
    drop(s);
    let a = proxy.audit();
    assert_eq!(a.reason, "client_closed");
    assert!(a.bytes_down < BIG as u64, "{a:?}");
    let (_, body) = get(&proxy, "a.test", port, "/");
    assert_eq!(
        body, "conn 4",
        "the connection of the unfinished response was reused"
    );
    assert_eq!(proxy.audit().reason, "allowed");
}

#[test]
fn an_upstream_closing_an_idle_pooled_connection_does_not_fail_the_next_request() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let proxy = start(&["a.test"], port);

    // The server closes the connection after answering (as on its keep-alive timeout).
    let (_, body) = get(&proxy, "a.test", port, "/bye");
    assert_eq!(body, "conn 1");
    assert_eq!(proxy.audit().reason, "allowed");
    let (status, body) = get(&proxy, "a.test", port, "/");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "conn 2");
    assert_eq!(proxy.audit().reason, "allowed");

    // The close races the next request (it reaches the server, which closes unanswered): a GET
    // is safe to repeat, and is sent again on a new connection.
    let (_, body) = get(&proxy, "a.test", port, "/drop-next");
    assert_eq!(body, "conn 2");
    assert_eq!(proxy.audit().reason, "allowed");
    for _ in 0..3 {
        origin.hit();
    }
    let (status, body) = get(&proxy, "a.test", port, "/again");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "conn 3");
    let (lost, resent) = (origin.hit(), origin.hit());
    assert_eq!((lost.conn, resent.conn), (2, 3));
    assert_eq!(resent.request_line, "GET /again HTTP/1.1");
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.status, a.upstream),
        ("allowed", Some(200), Some(format!("127.0.0.1:{port}")))
    );
    assert_eq!(a.bytes_down, "conn 3".len() as u64);

    // A POST that reached the server is not repeated: the client gets the failure.
    let (_, body) = get(&proxy, "a.test", port, "/drop-next");
    assert_eq!(body, "conn 3");
    assert_eq!(proxy.audit().reason, "allowed");
    origin.hit();
    let (status, _) = exchange(
        &proxy,
        &format!(
            "POST http://a.test:{port}/once HTTP/1.1\r\nHost: a.test:{port}\r\nContent-Length: 4\r\n\r\nbody"
        ),
    );
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("allow", "upstream_error")
    );
    assert_eq!(origin.hit().request_line, "POST /once HTTP/1.1");
    origin.no_more_hits();
    assert_eq!(origin.connections(), 3);
}

#[test]
fn shutdown_does_not_wait_for_idle_pooled_connections() {
    let origin = Scripted::start("127.0.0.1:0");
    let port = origin.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["a.test"])
        .allow(format!("a.test:{port}"))
        // A grace longer than any wait of this test: exiting within the wait means the idle
        // connection did not hold the drain up.
        .shutdown_grace(Duration::from_secs(120))
        .idle(Duration::from_secs(120));
    let mut proxy = Proxy::of(&cfg);
    assert_eq!(get(&proxy, "a.test", port, "/").1, "conn 1");
    assert_eq!(proxy.audit().reason, "allowed");
    proxy.sigterm();
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
}
