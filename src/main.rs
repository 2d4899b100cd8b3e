//! The `chokepoint` binary: CLI → config → telemetry → bind → run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use chokepoint::config::{self, Config};

/// sysexits EX_USAGE: the config is wrong.
const EX_CONFIG: u8 = 64;
/// sysexits EX_UNAVAILABLE: the gateway could not start or failed.
const EX_UNAVAILABLE: u8 = 69;

/// chokepoint: egress gateway for AI agents (HTTP forward proxy with per-agent allowlists).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "CHOKEPOINT_CONFIG",
        default_value = "/etc/chokepoint/chokepoint.toml"
    )]
    config: PathBuf,

    /// Format of diagnostic logs on stderr (audit lines always go to stdout as JSON).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config and print a summary; exits non-zero naming file, line and key on error.
    Check,
    /// Show what the gateway would decide for one agent and one target (exit 0 allow, 1 deny).
    Explain {
        /// The agent, by name.
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        agent: Option<String>,
        /// A client address, matched as a connection without credentials would be.
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// Also resolve the host (static hosts, then DNS) and show which addresses vetting keeps.
        #[arg(long)]
        resolve: bool,
        /// A URL (`https://host/...` = CONNECT, `http://host/...` = plain HTTP) or `host:port`.
        target: String,
    },
    /// From inside an agent pod: prove that only the gateway leads out (one line per check;
    /// exit 0 when every check passes). Needs no config file.
    Probe {
        /// The gateway, `http://[agent:token@]host:port`.
        #[arg(long, default_value = "http://chokepoint.chokepoint-system.svc:3128")]
        proxy: String,
        /// A URL the agent's policy allows (https = CONNECT, http = GET).
        #[arg(long)]
        allowed_url: String,
        /// A URL the agent's policy does not allow.
        #[arg(long)]
        denied_url: String,
        /// An outside address that must not be reachable directly.
        #[arg(long, default_value = "1.1.1.1:443")]
        direct: std::net::SocketAddr,
        /// A resolver other than the cluster's that must not answer.
        #[arg(long, default_value = "8.8.8.8:53")]
        dns_server: std::net::SocketAddr,
        /// The cloud metadata endpoint.
        #[arg(long, default_value = "169.254.169.254:80")]
        metadata: std::net::SocketAddr,
        /// Time bound per check.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Propose allow rules that admit the would_deny requests of an audit log (report mode).
    Propose {
        /// Audit log file (JSON lines); `-` for standard input.
        #[arg(long)]
        audit: PathBuf,
        /// Only this policy.
        #[arg(long)]
        policy: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe {
        proxy,
        allowed_url,
        denied_url,
        direct,
        dns_server,
        metadata,
        timeout,
    }) = cli.command
    {
        let p = chokepoint::probe::Probe {
            proxy,
            allowed_url,
            denied_url,
            direct,
            dns_server,
            metadata,
            timeout,
        };
        return probe(&p);
    }
    let config = match config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chokepoint: invalid config\n{e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", summary(&config));
            ExitCode::SUCCESS
        }
        Command::Run => {
            init_tracing(cli.log_format);
            serve(config)
        }
        Command::Explain {
            agent,
            client,
            resolve,
            target,
        } => explain(&config, agent, client, resolve, &target),
        Command::Propose { audit, policy } => propose(&config, &audit, policy.as_deref()),
        Command::Probe { .. } => unreachable!("handled before loading a config"),
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %config.listen, error = %e, "cannot bind the proxy listener");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        let admin = match config.admin_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(admin_listen = %addr, error = %e, "cannot bind the admin listener");
                    return ExitCode::from(EX_UNAVAILABLE);
                }
            },
            None => None,
        };
        let listeners = chokepoint::Listeners {
            proxy: listener,
            admin,
        };
        let run = chokepoint::run(
            listeners,
            config,
            tokio::io::stdout(),
            chokepoint::shutdown::signal(),
        );
        match run.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "gateway failed");
                ExitCode::from(EX_UNAVAILABLE)
            }
        }
    })
}

fn explain(
    config: &Config,
    agent: Option<String>,
    client: Option<std::net::IpAddr>,
    resolve: bool,
    target: &str,
) -> ExitCode {
    use chokepoint::explain::{self, Who};
    let who = match (agent, client) {
        (Some(a), _) => Who::Agent(a),
        (None, Some(c)) => Who::Client(c),
        (None, None) => unreachable!("clap requires --agent or --client"),
    };
    let mut e = match explain::explain(config, &who, target) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("chokepoint explain: {err}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if resolve {
        let Some(policy) = config.policies.iter().find(|p| *p.name == *e.policy) else {
            return ExitCode::from(EX_UNAVAILABLE);
        };
        let answer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let resolver =
                        chokepoint::resolve::Resolver::new(&config.dns, config.timeouts.dns)
                            .map_err(|e| e.to_string())?;
                    Ok(resolver.resolve(&e.target.host).await)
                })
            });
        match answer {
            Ok(Ok(addrs)) => {
                e.addresses = Some(Ok(explain::vet_each(config, policy, &addrs, e.target.port)));
            }
            Ok(Err(deny)) => e.addresses = Some(Err(deny)),
            Err(msg) => {
                eprintln!("chokepoint explain: cannot resolve: {msg}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        }
    }
    print!("{e}");
    ExitCode::from(e.exit_code())
}

fn probe(p: &chokepoint::probe::Probe) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chokepoint probe: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let checks = rt.block_on(chokepoint::probe::run(p));
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    println!(
        "{} of {} checks passed",
        checks.len() - failed,
        checks.len()
    );
    ExitCode::from(u8::from(failed > 0))
}

fn propose(config: &Config, audit: &std::path::Path, policy: Option<&str>) -> ExitCode {
    let result = if audit == std::path::Path::new("-") {
        chokepoint::propose::propose(config, std::io::stdin().lock(), policy)
    } else {
        match std::fs::File::open(audit) {
            Ok(f) => chokepoint::propose::propose(config, std::io::BufReader::new(f), policy),
            Err(e) => {
                eprintln!("chokepoint propose: {}: {e}", audit.display());
                return ExitCode::from(EX_CONFIG);
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("chokepoint propose: reading {}: {e}", audit.display());
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CHOKEPOINT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The `check` report: what the gateway would enforce.
fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}: ok", config.source.display());
    let _ = writeln!(s, "listen: {}", config.listen);
    let _ = writeln!(s, "agents: {}", config.agents.len());
    for a in config.agents.iter() {
        let mut by = Vec::new();
        if !a.source_cidrs.is_empty() {
            let cidrs: Vec<String> = a.source_cidrs.iter().map(ToString::to_string).collect();
            by.push(format!("source {}", cidrs.join(", ")));
        }
        if let Some(t) = &a.token {
            by.push(format!("token {}", t.path().display()));
        }
        let _ = writeln!(
            s,
            "  {} -> policy {} ({})",
            a.name,
            config.policies[a.policy].name,
            by.join("; ")
        );
    }
    let _ = writeln!(s, "policies: {}", config.policies.len());
    for p in &config.policies {
        let l = &p.limits;
        let _ = writeln!(
            s,
            "  {}: {} allow rules, mode {}, {} req/s burst {}, {} concurrent, body {} B, upload {} B, response {} B{}",
            p.name,
            p.allowlist.len(),
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
