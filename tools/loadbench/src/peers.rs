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
//!
//! Scenarios i and j (TLS interception) run through the same Squid with ssl-bump
//! ([`squid_conf`]), given the interception CA chokepoint gets and the TLS origin's CA to verify
//! the origin with, when the installed `squid` is built with OpenSSL and has its certificate
//! helper (Debian: `squid-openssl`, whose `squid` replaces the GnuTLS build's and still serves
//! a–e): as `squid-bump` (bumping on the CONNECT) and `squid-peek-bump` (peeking at the SNI
//! first). Rows `i@squid-bump`, `j@squid-bump`, and the plain TLS tunnels through the same
//! process, `i-tunnel@squid-bump`, `j-tunnel@squid-bump`; the same for `squid-peek-bump`.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::time::{sleep, Instant};

use crate::client::{closed_loop, down_and_up, idle_rss, plain_download, Transfer, GIB};
use crate::http::{connect_request, get_absolute, within, Wire, HOST, SMALL_BUF};
use crate::machine::is_root;
use crate::origin::Origin;
use crate::proxy::{Proxy, PROCESS_WAIT};
use crate::report::Report;
use crate::scenarios::{via_script, InterceptLoad};
use crate::settings::Settings;
use crate::tls::{Pki, SECURE_HOST};

/// A proxy the scenarios also run against when it is installed, to compare with.
#[derive(Clone, Copy)]
pub(crate) enum Peer {
    Squid,
    TrafficServer,
    /// Squid with ssl-bump, bumping at step 1 (before it has seen the ClientHello): scenarios
    /// i and j only.
    SquidBump,
    /// Squid with ssl-bump, peeking at the ClientHello (its SNI) at step 1, then bumping:
    /// scenarios i and j only.
    SquidPeekBump,
}

/// What a peer that intercepts TLS (scenarios i and j) is given: the certificates chokepoint
/// gets (the interception CA to sign leaves with, the origin's CA to verify the origin with),
/// and the TLS origin's port.
#[derive(Clone, Copy)]
pub(crate) struct Interception<'a> {
    /// The run's certificates, the same as chokepoint's.
    pub(crate) pki: &'a Pki,
    /// Where the TLS origin listens on 127.0.0.1.
    pub(crate) tls_port: u16,
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
            Peer::SquidBump => "squid-bump",
            Peer::SquidPeekBump => "squid-peek-bump",
        }
    }

    /// Whether it intercepts TLS (runs i and j, and only those).
    pub(crate) fn intercepts(self) -> bool {
        matches!(self, Peer::SquidBump | Peer::SquidPeekBump)
    }

    /// The program looked for on `PATH`.
    pub(crate) fn binary(self) -> &'static str {
        match self {
            Peer::Squid | Peer::SquidBump | Peer::SquidPeekBump => "squid",
            Peer::TrafficServer => "traffic_server",
        }
    }

    /// Write the peer's config into `dir`: listen on 127.0.0.1:`port`, forward to
    /// `origin.test:origin_port` only (and, for the peers that bump, to `tls`'s origin).
    fn prepare(
        self,
        dir: &Path,
        port: u16,
        origin_port: u16,
        tls: Option<Interception<'_>>,
    ) -> Result<PeerLaunch, String> {
        let bump = match (self, tls) {
            (Peer::TrafficServer, _) => {
                return trafficserver_layout(dir, port, origin_port)
                    .map_err(|e| format!("writing its config in {}: {e}", dir.display()))
            }
            (Peer::Squid, _) => None,
            (Peer::SquidBump | Peer::SquidPeekBump, Some(tls)) => {
                Some(bump_files(dir, tls, matches!(self, Peer::SquidPeekBump))?)
            }
            (Peer::SquidBump | Peer::SquidPeekBump, None) => {
                return Err("no TLS origin to intercept for".into())
            }
        };
        let conf = dir.join("squid.conf");
        std::fs::write(&conf, squid_conf(port, origin_port, dir, bump.as_ref()))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        Ok(PeerLaunch {
            args: vec!["squid".into(), "-N".into(), "-f".into(), path_arg(&conf)],
            access_log: dir.join("access.log"),
            diag_log: dir.join("cache.log"),
        })
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
        tls: Option<Interception<'_>>,
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
        std::fs::write(&hosts, format!("127.0.0.1 {HOST} {SECURE_HOST}\n"))
            .map_err(|e| format!("write {}: {e}", hosts.display()))?;
        let launch = peer.prepare(path, port, origin_port, tls)?;
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
///
/// With `bump` (the `squid-bump` and `squid-peek-bump` peers) it also intercepts, as
/// chokepoint's config for i and j does: `secure.origin.test` is bumped with leaves signed by
/// chokepoint's interception CA (made by `security_file_certgen`, kept in its database), and
/// sent on over TLS verified against the origin's CA only (no system CAs; an origin it cannot
/// verify gets the client a 503, never the origin's answer); `origin.test` on the TLS port stays
/// a plain tunnel (spliced). Two ways to bump:
///
/// - `squid-bump`: bump at step 1, on the CONNECT alone ("client-first"): the leaf is made for
///   the CONNECT name, kept in Squid's memory cache (`dynamic_cert_mem_cache_size`), and the
///   origin is connected to after the client's handshake;
/// - `squid-peek-bump`: peek at the ClientHello at step 1 and decide on its SNI (as chokepoint
///   reads the SNI of every tunnel), then bump at step 2: Squid connects to the origin first
///   and mimics its certificate. Squid 5 then skips its memory cache (`getSslContextStart`:
///   "Disable caching for bumpPeekAndSplice mode") and asks the helper, which finds the leaf
///   in its database, on every connection.
///
/// Leaves are ECDSA P-256 either way (Squid gives them the CA's key type), as chokepoint's.
fn squid_conf(port: u16, origin_port: u16, dir: &Path, bump: Option<&BumpFiles>) -> String {
    let dir = dir.display();
    let user = if is_root() {
        "cache_effective_user proxy\n"
    } else {
        ""
    };
    let (listen_tls, bump_conf, bump_access) = match bump {
        None => (String::new(), String::new(), String::new()),
        Some(b) => (
            format!(
                " ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB \
                 tls-cert={dir}/{GATEWAY_CA_CERT} tls-key={dir}/{GATEWAY_CA_KEY}"
            ),
            format!(
                "sslcrtd_program {certgen} -s {dir}/{SSL_DB} -M 4MB\n\
                 sslcrtd_children 2 startup=1 idle=1\n\
                 tls_outgoing_options cafile={dir}/{ORIGIN_CA} default-ca=off\n\
                 {steps}\
                 ssl_bump splice bench_tunnelled\n\
                 ssl_bump bump all\n",
                certgen = b.certgen.display(),
                steps = if b.peek {
                    format!(
                        "acl bench_step1 at_step SslBump1\n\
                         acl bench_tunnelled ssl::server_name {HOST}\n\
                         ssl_bump peek bench_step1\n"
                    )
                } else {
                    format!("acl bench_tunnelled dstdomain {HOST}\n")
                },
            ),
            format!(
                "acl bench_tls_origin dstdomain {HOST} {SECURE_HOST}\n\
                 acl bench_tls_port port {tls_port}\n\
                 http_access allow bench_client bench_tls_origin bench_tls_port\n",
                tls_port = b.tls_port
            ),
        ),
    };
    format!(
        r#"http_port 127.0.0.1:{port}{listen_tls}
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
{bump_conf}acl bench_client src 127.0.0.0/8
acl bench_origin dstdomain {HOST}
acl bench_port port {origin_port}
http_access allow bench_client bench_origin bench_port
{bump_access}http_access deny all
"#
    )
}

/// Files of `squid-bump`'s config, in its temp dir: chokepoint's interception CA (certificate,
/// key), the TLS origin's CA, and the certificate helper's database.
const GATEWAY_CA_CERT: &str = "gateway-ca.crt";
const GATEWAY_CA_KEY: &str = "gateway-ca.key";
const ORIGIN_CA: &str = "origin-ca.crt";
const SSL_DB: &str = "ssl_db";

/// What [`squid_conf`] needs for ssl-bump, once [`bump_files`] has written the files.
struct BumpFiles {
    /// `security_file_certgen`.
    certgen: PathBuf,
    /// The TLS origin's port.
    tls_port: u16,
    /// Peek at the ClientHello before bumping (`squid-peek-bump`).
    peek: bool,
}

/// Write the CAs into `dir` and initialise the certificate helper's database there
/// (`security_file_certgen -c`), writable by the user Squid runs as.
fn bump_files(dir: &Path, tls: Interception<'_>, peek: bool) -> Result<BumpFiles, String> {
    let certgen = squid_certgen()?;
    let pki = tls.pki;
    for (name, pem) in [
        (GATEWAY_CA_CERT, &pki.gateway_ca.0),
        (GATEWAY_CA_KEY, &pki.gateway_ca.1),
        (ORIGIN_CA, &pki.origin_ca),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let db = dir.join(SSL_DB);
    let out = output_within(
        Command::new(&certgen)
            .args(["-c", "-s"])
            .arg(&db)
            .args(["-M", "4MB"]),
        PROCESS_WAIT,
    )
    .map_err(|e| format!("{} -c: {e}", certgen.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -c -s {} failed ({}): {}",
            certgen.display(),
            db.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Created as root, used by the helper as Squid's user: open it up (a throwaway database of
    // throwaway leaves). Two levels: `ssl_db/` holds `index.txt`, `size` and `certs/`.
    let open_up = |path: &Path| {
        let mode = if path.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", path.display()))
    };
    open_up(&db)?;
    let entries = std::fs::read_dir(&db).map_err(|e| format!("{}: {e}", db.display()))?;
    for entry in entries.flatten() {
        open_up(&entry.path())?;
        if entry.path().is_dir() {
            for inner in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                open_up(&inner.path())?;
            }
        }
    }
    Ok(BumpFiles {
        certgen,
        tls_port: tls.tls_port,
        peek,
    })
}

/// The certificate helper of the installed Squid if that Squid can bump TLS: `squid -v` names
/// `--with-openssl` (Squid bumps with OpenSSL only; Debian's `squid` package is built with
/// GnuTLS, its `squid-openssl` with OpenSSL) and `--enable-ssl-crtd`, and
/// `security_file_certgen` is in its `--libexecdir`. `Err` says what is missing.
pub(crate) fn squid_certgen() -> Result<PathBuf, String> {
    let out = output_within(Command::new("squid").arg("-v"), PROCESS_WAIT)
        .map_err(|e| format!("squid -v: {e}"))?;
    let version = String::from_utf8_lossy(&out.stdout);
    let built_with = |option: &str| version.contains(&format!("'{option}"));
    if !built_with("--with-openssl") {
        return Err(
            "squid is built without OpenSSL (`squid -v` has no --with-openssl), \
                    so it cannot bump TLS; Debian: apt-get install squid-openssl"
                .into(),
        );
    }
    if !built_with("--enable-ssl-crtd") {
        return Err("squid is built without --enable-ssl-crtd (no certificate helper)".into());
    }
    let libexec = version
        .split('\'')
        .find_map(|option| option.strip_prefix("--libexecdir="))
        .unwrap_or("/usr/lib/squid");
    let certgen = Path::new(libexec).join("security_file_certgen");
    if certgen.is_file() {
        Ok(certgen)
    } else {
        Err(format!("{} is missing", certgen.display()))
    }
}

/// Run `cmd` to its end, at most `wait`; its stdout and stderr. A command still running then is
/// killed (by its pid) and is an error.
fn output_within(cmd: &mut Command, wait: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    // The thread ends when the child does, which the kill below bounds.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(wait) {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(format!("still running after {wait:?}; killed"))
        }
    }
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
        let proxy = match Proxy::start_peer(peer, port, None, s).await {
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
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), None, s).await {
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
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), None, s).await {
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

/// Scenarios i and j through `peer`, a Squid with ssl-bump, the same load as chokepoint's: one
/// Squid for both (as one chokepoint carries both), and in each the plain TLS tunnels first,
/// then the intercepted connections. Without a Squid that can bump, a note says why.
pub(crate) async fn run_bump_peer(
    s: &Settings,
    origin: &Origin,
    peer: Peer,
    tls: Interception<'_>,
    report: &mut Report,
) {
    let name = peer.name();
    if let Err(e) = squid_certgen() {
        report.notes.push(format!("{name}: not run: {e}"));
        return;
    }
    let first = if s.wants('i') { "i" } else { "j" };
    let proxy = match Proxy::start_peer(peer, origin.addr.port(), Some(tls), s).await {
        Ok(p) => p,
        Err(e) => return peer_down(report, peer, first, &e),
    };
    for id in ['i', 'j'] {
        if !s.wants(id) {
            continue;
        }
        let load = InterceptLoad::new(id, tls.tls_port, tls.pki);
        let tunnel_id = format!("{id}-tunnel");
        let id = id.to_string();
        let tag = format!("{tunnel_id}@{name}");
        let plain = closed_loop(proxy.addr, &load.tunnel, s, Some(&proxy), &tag).await;
        let tag = format!("{id}@{name}");
        let via = closed_loop(proxy.addr, &load.intercepted, s, Some(&proxy), &tag).await;
        report.peer_closed(&tunnel_id, load.tunnel_title, load.unit, peer, &plain);
        report.peer_closed(&id, load.title, load.unit, peer, &via);
    }
    let log = proxy.stop().await;
    report
        .notes
        .push(log.note_as("access log", &format!("i/j@{name}")));
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

    /// Every Squid config listens on loopback only, asks only 127.0.0.1 for names and ends its
    /// access rules with a denial; a bumping one verifies the origin against the origin's CA
    /// alone and never turns verification off, and peeks only when asked to.
    #[test]
    fn squid_configs_stay_on_loopback_and_verify_the_origin() {
        let dir = Path::new("/tmp/bench");
        let bump = |peek| BumpFiles {
            certgen: PathBuf::from("/usr/lib/squid/security_file_certgen"),
            tls_port: 8443,
            peek,
        };
        let (client_first, peeking) = (bump(false), bump(true));
        for (name, conf, peeks) in [
            ("plain", squid_conf(3128, 8080, dir, None), None),
            (
                "bump",
                squid_conf(3128, 8080, dir, Some(&client_first)),
                Some(false),
            ),
            (
                "peek",
                squid_conf(3128, 8080, dir, Some(&peeking)),
                Some(true),
            ),
        ] {
            assert!(conf.starts_with("http_port 127.0.0.1:3128"), "{name}");
            assert!(conf.contains("\ndns_nameservers 127.0.0.1\n"), "{name}");
            let last_access = conf.lines().rfind(|l| l.starts_with("http_access"));
            assert_eq!(last_access, Some("http_access deny all"), "{name}");
            for lax in ["DONT_VERIFY", "sslproxy_cert_error", "NO_DEFAULT_CA"] {
                assert!(!conf.contains(lax), "{name}: {lax}");
            }
            let Some(peeks) = peeks else {
                assert!(!conf.contains("ssl"), "{name}");
                continue;
            };
            assert!(
                conf.contains(" ssl-bump generate-host-certificates=on "),
                "{name}"
            );
            assert!(
                conf.contains(
                    "\ntls_outgoing_options cafile=/tmp/bench/origin-ca.crt default-ca=off\n"
                ),
                "{name}"
            );
            assert!(conf.contains("\nacl bench_tls_port port 8443\n"), "{name}");
            assert_eq!(conf.contains("ssl_bump peek"), peeks, "{name}");
            assert!(conf.ends_with("http_access deny all\n"), "{name}");
        }
    }
}
