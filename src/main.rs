//! The `chokepoint` binary: CLI → config → telemetry → bind → run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use chokepoint::config::{self, Config};

use chokepoint::commands::{self, EX_CONFIG, EX_UNAVAILABLE};

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
        /// The agent name for a token class (with --proxy-token-file).
        #[arg(long, requires = "proxy_token_file")]
        proxy_user: Option<String>,
        /// A file holding the agent's proxy token (the mounted Secret), so it never appears on
        /// the command line.
        #[arg(long, requires = "proxy_user")]
        proxy_token_file: Option<PathBuf>,
        /// Time bound per check (longer than the gateway's upstream connect timeout).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
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
        proxy_user,
        proxy_token_file,
        timeout,
    }) = cli.command
    {
        let credentials = match (proxy_user, proxy_token_file) {
            (Some(user), Some(file)) => match std::fs::read_to_string(&file) {
                Ok(token) => Some(format!("{user}:{}", token.trim())),
                Err(e) => {
                    eprintln!("chokepoint probe: {}: {e}", file.display());
                    return ExitCode::from(EX_CONFIG);
                }
            },
            _ => None,
        };
        let p = chokepoint::probe::Probe {
            proxy,
            credentials,
            allowed_url,
            denied_url,
            direct,
            dns_server,
            metadata,
            timeout,
        };
        return ExitCode::from(commands::probe(&p));
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
            print!("{}", commands::summary(&config));
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
        } => ExitCode::from(commands::explain(&config, agent, client, resolve, &target)),
        Command::Propose { audit, policy } => {
            ExitCode::from(commands::propose(&config, &audit, policy.as_deref()))
        }
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
        let tls = match config.tls_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!(tls_listen = %addr, error = %e, "cannot bind the HTTPS proxy listener");
                    return ExitCode::from(EX_UNAVAILABLE);
                }
            },
            None => None,
        };
        let listeners = chokepoint::Listeners {
            proxy: listener,
            tls,
            admin,
        };
        let run = chokepoint::run(
            listeners,
            config,
            std::io::stdout(),
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
