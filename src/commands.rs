//! The one-shot subcommands behind the CLI (`check`, `explain`, `propose`, `probe`): each takes
//! parsed arguments and returns the process exit status; `main.rs` only parses and dispatches.

use std::path::Path;

use crate::config::Config;

/// Exit status for a bad config, file or argument (sysexits EX_USAGE).
pub const EX_CONFIG: u8 = 64;
/// Exit status when the gateway cannot start or run (sysexits EX_UNAVAILABLE).
pub const EX_UNAVAILABLE: u8 = 69;

/// `explain`: print the decision for one agent and target; 0 allow, 1 deny, 64 usage.
pub fn explain(
    config: &Config,
    agent: Option<String>,
    client: Option<std::net::IpAddr>,
    resolve: bool,
    target: &str,
) -> u8 {
    use crate::explain::{self, Who};
    let who = match (agent, client) {
        (Some(a), _) => Who::Agent(a),
        (None, Some(c)) => Who::Client(c),
        (None, None) => unreachable!("clap requires --agent or --client"),
    };
    let mut e = match explain::explain(config, &who, target) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("chokepoint explain: {err}");
            return EX_CONFIG;
        }
    };
    if resolve {
        let Some(policy) = config.policies.iter().find(|p| *p.name == *e.policy) else {
            return EX_UNAVAILABLE;
        };
        let answer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let resolver = crate::resolve::Resolver::new(&config.dns, config.timeouts.dns)
                        .map_err(|e| e.to_string())?;
                    Ok(resolver.resolve(&e.target.host).await)
                })
            });
        match answer {
            Ok(Ok(answer)) => {
                e.addresses = Some(Ok(explain::vet_each(
                    config,
                    policy,
                    &answer.addrs,
                    e.target.port,
                )));
            }
            Ok(Err(deny)) => e.addresses = Some(Err(deny)),
            Err(msg) => {
                eprintln!("chokepoint explain: cannot resolve: {msg}");
                return EX_UNAVAILABLE;
            }
        }
    }
    print!("{e}");
    e.exit_code()
}

/// `probe`: run the lock-down checks, one line each; 0 when all pass.
pub fn probe(p: &crate::probe::Probe) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chokepoint probe: {e}");
            return EX_UNAVAILABLE;
        }
    };
    let checks = rt.block_on(crate::probe::run(p));
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!(
        "{} of {} checks passed",
        checks.len() - failed,
        checks.len()
    );
    u8::from(failed > 0)
}

/// `propose`: print allow rules that admit the `would_deny` lines of an audit log.
pub fn propose(config: &Config, audit: &Path, policy: Option<&str>) -> u8 {
    let result = if audit == Path::new("-") {
        crate::propose::propose(config, std::io::stdin().lock(), policy)
    } else {
        match std::fs::File::open(audit) {
            Ok(f) => crate::propose::propose(config, std::io::BufReader::new(f), policy),
            Err(e) => {
                eprintln!("chokepoint propose: {}: {e}", audit.display());
                return EX_CONFIG;
            }
        }
    };
    match result {
        Ok((text, sum)) => {
            eprintln!(
                "read {} audit line(s): {} would_deny, {} not audit JSON (skipped)",
                sum.lines, sum.would_deny, sum.skipped
            );
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("chokepoint propose: reading {}: {e}", audit.display());
            EX_UNAVAILABLE
        }
    }
}

/// The `check` report: what the gateway would enforce.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}: ok", config.source.display());
    let _ = writeln!(s, "listen: {}", config.listen);
    if let (Some(at), Some(t)) = (config.tls_listen, &config.tls) {
        let clients = match (&t.client_ca, t.require_client_cert) {
            (Some(ca), true) => format!("client certificate required ({})", ca.display()),
            (Some(ca), false) => format!("client certificate optional ({})", ca.display()),
            (None, _) => "no client certificates".to_owned(),
        };
        let _ = writeln!(s, "https listen: {at} ({}; {clients})", t.cert.display());
    }
    if let Some(i) = &config.intercept {
        let _ = writeln!(
            s,
            "intercept: CA {} (key {}); upstream roots: web{}",
            i.ca_cert.display(),
            i.ca_key.display(),
            i.upstream_ca
                .iter()
                .map(|p| format!(" + {}", p.display()))
                .collect::<String>()
        );
    }
    let ports: Vec<String> = config.sni.ports.iter().map(u16::to_string).collect();
    let _ = writeln!(
        s,
        "sni check: ports [{}]{}",
        ports.join(", "),
        if config.sni.require {
            ", server name required"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "agents: {}", config.agents.len());
    for a in config.agents.iter() {
        let mut by = Vec::new();
        if !a.source_cidrs.is_empty() {
            let cidrs: Vec<String> = a.source_cidrs.iter().map(ToString::to_string).collect();
            by.push(format!("source {}", cidrs.join(", ")));
        }
        if let Some(t) = &a.token_file {
            by.push(format!("token {}", t.display()));
        }
        if let Some(c) = &a.cert {
            let fields = [("spiffe_id", &c.spiffe_id), ("cert_subject", &c.subject)];
            for (k, v) in fields {
                if let Some(v) = v {
                    by.push(format!("certificate {k} {v}"));
                }
            }
        }
        let _ = writeln!(
            s,
            "  {} -> policy {} ({})",
            a.name,
            config.policies[a.policy].name,
            by.join("; ")
        );
    }
    let _ = match &config.cluster {
        Some(c) => writeln!(
            s,
            "limits: cluster-wide (rate, concurrency) through {}",
            c.describe()
        ),
        None => writeln!(s, "limits: per process (no [cluster])"),
    };
    let _ = writeln!(s, "policies: {}", config.policies.len());
    for p in &config.policies {
        let l = &p.limits;
        let rules = if p.is_open_web() {
            let ports = match p.allowlist.rules().first().and_then(|r| r.port) {
                Some(port) => format!("port {port}"),
                None => "443 CONNECT, 80 HTTP".to_owned(),
            };
            format!("open web (any public host, {ports})")
        } else {
            format!("{} allow rules", p.allowlist.len())
        };
        let _ = writeln!(
            s,
            "  {}: {rules}, mode {}, {} req/s burst {}, {} concurrent, body {} B, upload {} B, response {} B{}",
            p.name,
            p.mode.as_str(),
            l.requests_per_second,
            l.burst,
            l.max_concurrent,
            l.max_request_body_bytes,
            l.max_tunnel_upload_bytes,
            l.max_response_body_bytes,
            if p.allow_cidrs.is_empty() {
                String::new()
            } else {
                format!(", {} allow_cidrs", p.allow_cidrs.len())
            }
        );
        if !p.deny.rules().is_empty() || !p.deny.files().is_empty() {
            let mut parts = vec![format!("{} rules", p.deny.rules().len())];
            for f in p.deny.files() {
                parts.push(format!(
                    "{}: {} rules, {:.1} MiB",
                    f.shown,
                    f.set.len(),
                    f.set.heap_bytes() as f64 / (1024.0 * 1024.0)
                ));
            }
            let _ = writeln!(s, "    deny: {}", parts.join("; "));
        }
        for i in p.intercept.iter() {
            let _ = writeln!(s, "    {}", crate::explain::intercept_line(i));
        }
    }
    let _ = writeln!(
        s,
        "destinations: {} deny_cidrs, {} allow_cidrs (plus the built-in deny set)",
        config.vetter.deny_cidrs().len(),
        config.vetter.allow_cidrs().len()
    );
    let dns = match &config.dns.nameservers {
        Some(ns) => format!("{} nameservers", ns.len()),
        None => "system resolver".to_owned(),
    };
    let _ = writeln!(s, "dns: {dns}, {} static hosts", config.dns.hosts.len());
    s
}
