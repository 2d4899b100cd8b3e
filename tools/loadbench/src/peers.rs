//! Peers: other proxies under the same load. When `squid` or `traffic_server` is on `PATH`
//! (Debian: `apt-get install -y squid trafficserver`), the selected scenarios run again through
//! each, after chokepoint's, with the same load code: one worker (`squid -N`; one Traffic
//! Server event thread), no cache, access log on, config generated in a temp dir, pinned like
//! the proxy. Each listens on 127.0.0.1 only, on a port held for it ([`reserve_port`]), and is
//! only asked for `origin.test` (squid refuses anything else), which its hosts file maps to
//! 127.0.0.1; its only nameserver is 127.0.0.1 (Traffic Server may ask it; nothing answers). CPU
//! and memory are those of the peer's process tree. The report's second table, "peers", prints
//! their rows with chokepoint's throughput and CPU/op divided by theirs; their JSON ids are
//! `a@squid`, …, `e@trafficserver`.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::time::{sleep, Instant};

use crate::client::{closed_loop, down_and_up, idle_rss, plain_download, Transfer, GIB};
use crate::http::{connect_request, get_absolute, within, Wire, HOST, SMALL_BUF};
use crate::machine::is_root;
use crate::origin::Origin;
use crate::proxy::{Proxy, PROCESS_WAIT};
use crate::report::Report;
use crate::scenarios::via_script;
use crate::settings::Settings;

/// A proxy the scenarios also run against when it is installed, to compare with.
#[derive(Clone, Copy)]
pub(crate) enum Peer {
    Squid,
    TrafficServer,
}

/// What starts a peer: its command line, and the files its logs go to.
struct PeerLaunch {
    args: Vec<String>,
    /// The access log, one line per request or tunnel.
    access_log: PathBuf,
    /// Where it says why it did not start.
    diag_log: PathBuf,
}

impl Peer {
    /// Its name in rows, ids (`a@squid`) and notes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Squid => "squid",
            Peer::TrafficServer => "trafficserver",
        }
    }

    /// The program looked for on `PATH`.
    pub(crate) fn binary(self) -> &'static str {
        match self {
            Peer::Squid => "squid",
            Peer::TrafficServer => "traffic_server",
        }
    }

    /// Write the peer's config into `dir`: listen on 127.0.0.1:`port`, forward to
    /// `origin.test:origin_port` only.
    fn prepare(self, dir: &Path, port: u16, origin_port: u16) -> io::Result<PeerLaunch> {
        match self {
            Peer::Squid => {
                let conf = dir.join("squid.conf");
                std::fs::write(&conf, squid_conf(port, origin_port, dir))?;
                Ok(PeerLaunch {
                    args: vec!["squid".into(), "-N".into(), "-f".into(), path_arg(&conf)],
                    access_log: dir.join("access.log"),
                    diag_log: dir.join("cache.log"),
                })
            }
            Peer::TrafficServer => trafficserver_layout(dir, port, origin_port),
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

impl Proxy {
    /// `peer` with a config for this bench in a temp dir, pinned like chokepoint; ready once a
    /// GET through it gets the origin's answer (Traffic Server holds the first requests for
    /// seconds after it listens). `Err` carries why it did not start, with the end of its
    /// stderr and of its own log.
    pub(crate) async fn start_peer(
        peer: Peer,
        origin_port: u16,
        s: &Settings,
    ) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let path = dir.path();
        // Started as root, a peer drops to its own user, which writes its logs here.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        let (reserved, port) =
            reserve_port().map_err(|e| format!("no port on 127.0.0.1 to give it: {e}"))?;
        let hosts = path.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 {HOST}\n"))
            .map_err(|e| format!("write {}: {e}", hosts.display()))?;
        let launch = peer
            .prepare(path, port, origin_port)
            .map_err(|e| format!("writing its config in {}: {e}", path.display()))?;
        let stderr_path = path.join("stderr");
        let stderr = File::create(&stderr_path).map_err(|e| format!("stderr file: {e}"))?;
        // As for chokepoint: its own session (autogroup), and `taskset` execs in place.
        let mut cmd = Command::new("setsid");
        if s.pinned {
            cmd.args(["taskset", "-c", "0"]);
        }
        let child = cmd
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{} did not start: {e}", peer.name()))?;
        let mut proxy = Proxy {
            pid: child.id(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            audit: launch.access_log,
            peer: Some(peer),
            _reserved: Some(reserved),
            _dir: dir,
        };
        let why = |what: String| {
            format!(
                "{what}; stderr: {}; {}: {}",
                tail(&stderr_path, 5),
                launch.diag_log.display(),
                tail(&launch.diag_log, 5)
            )
        };
        let deadline = Instant::now() + PROCESS_WAIT;
        // Each pass sleeps; the deadline bounds them.
        loop {
            if let Some(Ok(Some(status))) = proxy.child.as_mut().map(Child::try_wait) {
                proxy.child = None;
                return Err(why(format!("{} exited ({status})", peer.name())));
            }
            let probe = get_absolute(origin_port, "/");
            let answered = within(Duration::from_secs(1), async {
                Wire::connect(proxy.addr, SMALL_BUF)
                    .await?
                    .exchange(&probe)
                    .await
            })
            .await;
            if answered.is_ok() {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                // Dropping `proxy` kills it.
                return Err(why(format!(
                    "{} did not answer a GET on {} within {PROCESS_WAIT:?}",
                    peer.name(),
                    proxy.addr
                )));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Where Debian's Traffic Server package keeps its config; copied, then adjusted.
const TRAFFICSERVER_ETC: &str = "/etc/trafficserver";

/// Traffic Server (9.2) in `dir` as a runroot: the package's config files copied to `dir/etc`
/// and adjusted — listen on 127.0.0.1:`port` only, forward proxy (no remap), no cache (no
/// storage, no RAM cache), one event thread (it runs on one pinned core, like squid's one
/// worker), access log on (the package's `squid` format, as text), CONNECT allowed to the
/// origin's port only, and names from `dir/hosts` with nameserver 127.0.0.1 (never asked), so
/// it only ever connects to 127.0.0.1.
fn trafficserver_layout(dir: &Path, port: u16, origin_port: u16) -> io::Result<PeerLaunch> {
    let etc = dir.join("etc");
    let [run, log, cache] = ["run", "log", "cache"].map(|d| dir.join(d));
    for d in [&etc, &run, &log, &cache] {
        std::fs::create_dir(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777))?;
    }
    for entry in std::fs::read_dir(TRAFFICSERVER_ETC)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = etc.join(entry.file_name());
            std::fs::copy(entry.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::fs::write(etc.join("storage.config"), "")?;
    let logging = std::fs::read_to_string(etc.join("logging.yaml"))?;
    std::fs::write(
        etc.join("logging.yaml"),
        logging.replace("mode: binary", "mode: ascii"),
    )?;
    let dir_s = dir.display();
    // records.config: a variable set again further down overrides the package's value.
    let mut records = std::fs::read_to_string(etc.join("records.config"))?;
    records.push_str(&format!(
        "\n# chokepoint's load bench\n\
         CONFIG proxy.config.http.server_ports STRING {port}:ipv4:ip-in=127.0.0.1\n\
         CONFIG proxy.config.url_remap.remap_required INT 0\n\
         CONFIG proxy.config.reverse_proxy.enabled INT 0\n\
         CONFIG proxy.config.http.cache.http INT 0\n\
         CONFIG proxy.config.cache.ram_cache.size INT 0\n\
         CONFIG proxy.config.exec_thread.autoconfig INT 0\n\
         CONFIG proxy.config.exec_thread.limit INT 1\n\
         CONFIG proxy.config.exec_thread.affinity INT 0\n\
         CONFIG proxy.config.accept_threads INT 0\n\
         CONFIG proxy.config.task_threads INT 1\n\
         CONFIG proxy.config.dns.nameservers STRING 127.0.0.1\n\
         CONFIG proxy.config.dns.resolv_conf STRING NULL\n\
         CONFIG proxy.config.hostdb.host_file.path STRING {dir_s}/hosts\n\
         CONFIG proxy.config.http.connect_ports STRING {origin_port}\n\
         CONFIG proxy.config.log.logfile_dir STRING {dir_s}/log\n\
         CONFIG proxy.config.log.rolling_enabled INT 0\n\
         CONFIG proxy.config.body_factory.template_sets_dir STRING {TRAFFICSERVER_ETC}/body_factory\n"
    ));
    std::fs::write(etc.join("records.config"), records)?;
    let runroot = dir.join("runroot.yaml");
    std::fs::write(
        &runroot,
        format!(
            "prefix: /usr\nexec_prefix: /usr\nbindir: /usr/bin\nsbindir: /usr/sbin\n\
             sysconfdir: {etc}\ndatadir: {cache}\nincludedir: /usr/include\n\
             libdir: /usr/lib/trafficserver\nlibexecdir: /usr/lib/trafficserver/modules\n\
             localstatedir: {run}\nruntimedir: {run}\nlogdir: {log}\ncachedir: {cache}\n",
            etc = etc.display(),
            cache = cache.display(),
            run = run.display(),
            log = log.display(),
        ),
    )?;
    Ok(PeerLaunch {
        args: vec![
            "traffic_server".into(),
            format!("--run-root={}", runroot.display()),
        ],
        access_log: log.join("squid.log"),
        diag_log: log.join("diags.log"),
    })
}

/// A port on 127.0.0.1 for a peer that must be given its port in a config file, held so that
/// it cannot go to anyone else: a socket bound to 127.0.0.1:0 with `SO_REUSEADDR`, never
/// listening. While it is open the kernel hands the port to no one else (neither to a bind of
/// port 0 nor as a connection's source port), yet a process that binds it by number with
/// `SO_REUSEADDR` may bind and listen on it (Linux allows this while no other socket on the port
/// listens). Squid and Traffic Server both set `SO_REUSEADDR` on their listening sockets. Keep
/// the socket until the peer is gone; it is close-on-exec, so the peer does not inherit it.
pub(crate) fn reserve_port() -> io::Result<(TcpSocket, u16)> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// The last `n` lines of a file, joined with " | "; "-" if it is empty or unreadable.
pub(crate) fn tail(file: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(n)..].join(" | ");
    if last.is_empty() {
        "-".into()
    } else {
        last
    }
}

/// Squid as the issue measured it, on loopback: one worker, no cache (disk or memory), access
/// log on (its default `daemon` module, so a `log_file_daemon` helper writes it). It forwards
/// only to `origin.test:PORT`, which its hosts file maps to 127.0.0.1; its only nameserver is
/// 127.0.0.1, which nothing answers and which the hosts file keeps it from asking. ICP, HTCP,
/// the pinger and netdb are off, so it sends nothing anywhere else.
fn squid_conf(port: u16, origin_port: u16, dir: &Path) -> String {
    let dir = dir.display();
    let user = if is_root() {
        "cache_effective_user proxy\n"
    } else {
        ""
    };
    format!(
        r#"http_port 127.0.0.1:{port}
workers 1
{user}visible_hostname chokepoint-bench
pid_filename {dir}/squid.pid
coredump_dir {dir}
cache_log {dir}/cache.log
access_log daemon:{dir}/access.log squid
cache_store_log none
cache deny all
cache_mem 0 MB
shutdown_lifetime 0 seconds
hosts_file {dir}/hosts
dns_nameservers 127.0.0.1
icp_port 0
htcp_port 0
pinger_enable off
netdb_filename none
acl bench_client src 127.0.0.0/8
acl bench_origin dstdomain {HOST}
acl bench_port port {origin_port}
http_access allow bench_client bench_origin bench_port
http_access deny all
"#
    )
}

/// The selected scenarios against `peer`, the same load as chokepoint's; stops at the first
/// scenario the peer could not be started for.
pub(crate) async fn run_peer(s: &Settings, origin: &Origin, peer: Peer, report: &mut Report) {
    let closed = [
        ('a', "a: plain HTTP, keep-alive", "req/s"),
        ('b', "b: GETs in tunnels", "req/s"),
        ('c', "c: new tunnel + 1 GET", "tunnels/s"),
    ];
    for (id, name, unit) in closed {
        if !s.wants(id) {
            continue;
        }
        let port = origin.addr.port();
        let proxy = match Proxy::start_peer(peer, port, s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, &id.to_string(), &e),
        };
        let tag = format!("{id}@{}", peer.name());
        let via = closed_loop(proxy.addr, &via_script(id, port), s, Some(&proxy), &tag).await;
        let log = proxy.stop().await;
        report.peer_closed(&id.to_string(), name, unit, peer, &via);
        report.notes.push(log.note_as("access log", &tag));
    }
    if s.wants('d') {
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, "d", &e),
        };
        match peer_bulk(s, origin, &proxy).await {
            Ok((down, up, plain)) => {
                report.peer_bulk("d-down", "d: tunnel, 1 GiB down", peer, &down);
                report.peer_bulk("d-up", "d: tunnel, 1 GiB up", peer, &up);
                report.peer_bulk("d3", "d3: plain HTTP, 1 GiB down", peer, &plain);
            }
            Err(e) => report.peer_failed("d", peer, &e.to_string()),
        }
        let log = proxy.stop().await;
        report
            .notes
            .push(log.note_as("access log", &format!("d@{}", peer.name())));
    }
    if s.wants('e') {
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, "e", &e),
        };
        match idle_rss(s, origin, &proxy).await {
            Ok(idle) => report.peer_idle(peer, idle),
            Err(e) => report.peer_failed("e", peer, &e.to_string()),
        }
        let log = proxy.stop().await;
        report
            .notes
            .push(log.note_as("access log", &format!("e@{}", peer.name())));
    }
}

/// The peer did not start for scenario `id`: a failed row and a note with the reason.
fn peer_down(report: &mut Report, peer: Peer, id: &str, error: &str) {
    report.peer_failed(id, peer, "did not start (see the notes)");
    report.notes.push(format!(
        "{}: did not start for {id}, its other scenarios skipped: {error}",
        peer.name()
    ));
}

/// d and d3 through a peer, as `bulk` runs them through chokepoint.
async fn peer_bulk(
    s: &Settings,
    origin: &Origin,
    proxy: &Proxy,
) -> io::Result<(Transfer, Transfer, Transfer)> {
    let port = origin.addr.port();
    let connect = connect_request(port);
    let (down, up) = down_and_up(s, proxy.addr, Some(&connect), port, Some(proxy)).await?;
    let get = get_absolute(port, &format!("/bulk/{GIB}"));
    let plain = plain_download(s, proxy.addr, &get, Some(proxy)).await?;
    Ok((down, up, plain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// The reserved port is held (refused to a bind that does not ask to share it, and nothing
    /// answers on it), yet a server that binds it by number with `SO_REUSEADDR`, as Squid and
    /// Traffic Server do, listens and accepts on it.
    #[tokio::test]
    async fn a_reserved_port_is_held_for_the_peer() {
        let (_held, port) = reserve_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let other = TcpSocket::new_v4().unwrap();
        assert_eq!(
            other.bind(addr).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );

        let peer = TcpSocket::new_v4().unwrap();
        peer.set_reuseaddr(true).unwrap();
        peer.bind(addr).unwrap();
        let listener = peer.listen(16).unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        assert_eq!(client.unwrap().peer_addr().unwrap(), addr);
        assert_eq!(accepted.unwrap().1.ip(), addr.ip());
    }
}
