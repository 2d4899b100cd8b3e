//! [`ConfigBuilder`]: a test's config stated in types and serialised to TOML with the `toml`
//! crate, so a test never edits config text (an edit of text that silently matches nothing once
//! the template changes).
//!
//! The shape mirrors the file (`[server]`, `[timeouts]`, `[dns]`, `[destinations]`, `[sni]`,
//! `[limits]`, `[[agents]]`, `[policies.NAME]`); every field is public, so a test can set what the
//! chained methods do not cover with [`ConfigBuilder::with`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// `[server]`.
#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_max_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_refusals_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_refusal_burst: Option<u64>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub summary_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_client_cert: Option<bool>,
}

/// `[timeouts]`; a bound left `None` takes the gateway's default.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub request_header: Option<Duration>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub connect: Option<Duration>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub dns: Option<Duration>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<Duration>,
}

/// A duration the way the file spells it (`"2s"`, `"500ms"`).
fn human<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// `[dns]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dns {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Vec<String>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, Vec<String>>,
}

/// `[destinations]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Destinations {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_cidrs: Vec<String>,
}

/// `[sni]`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sni {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require: Option<bool>,
}

/// `[limits]`, and a policy's `limits`: a policy overrides only what it names.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_header_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tunnel_upload_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_response_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes_per_hour: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_download_bytes_per_hour: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upload_bytes_per_day: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_download_bytes_per_day: Option<u64>,
}

/// `[cluster]`: the shared limit store.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub redis: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(serialize_with = "human", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
}

/// One `[[agents]]` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_cidrs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_subject: Option<String>,
    pub policy: String,
}

impl Agent {
    /// An agent with no way to be recognised yet: set `source_cidrs`, `token_file`,
    /// `spiffe_id` or `cert_subject`.
    pub fn new(name: &str, policy: &str) -> Agent {
        Agent {
            name: name.into(),
            source_cidrs: None,
            token_file: None,
            spiffe_id: None,
            cert_subject: None,
            policy: policy.into(),
        }
    }

    /// An agent known by its source addresses.
    pub fn cidrs(name: &str, cidrs: &[&str], policy: &str) -> Agent {
        Agent {
            name: name.into(),
            source_cidrs: Some(cidrs.iter().map(|c| c.to_string()).collect()),
            token_file: None,
            spiffe_id: None,
            cert_subject: None,
            policy: policy.into(),
        }
    }

    /// An agent known by a proxy token read from `token_file` (relative to the config file, or
    /// absolute).
    pub fn token(name: &str, token_file: impl AsRef<Path>, policy: &str) -> Agent {
        Agent {
            name: name.into(),
            source_cidrs: None,
            token_file: Some(path_str(token_file.as_ref())),
            spiffe_id: None,
            cert_subject: None,
            policy: policy.into(),
        }
    }

    /// Also require the client to come from `cidrs`.
    pub fn with_cidrs(mut self, cidrs: &[&str]) -> Agent {
        self.source_cidrs = Some(cidrs.iter().map(|c| c.to_string()).collect());
        self
    }
}

/// One `[policies.NAME]` table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Policy {
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Deny lists, as the file names them (relative to the config file's directory).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_files: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub intercept: Vec<InterceptHost>,
}

/// `[intercept]`: the interception CA and extra upstream roots.
#[derive(Debug, Clone, Serialize)]
pub struct Intercept {
    pub ca_cert: String,
    pub ca_key: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream_ca: Vec<String>,
}

/// One `[[policies.NAME.intercept]]` entry.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InterceptHost {
    pub host: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inject: Vec<Inject>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
}

/// One `inject` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Inject {
    pub header: String,
    pub value_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

impl Policy {
    /// The policy's `limits` table, created empty if absent.
    pub fn limits(&mut self) -> &mut Limits {
        self.limits.get_or_insert_with(Limits::default)
    }
}

/// A whole config file.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigBuilder {
    pub server: Server,
    pub timeouts: Timeouts,
    pub dns: Dns,
    pub destinations: Destinations,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<Sni>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<Agent>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub policies: BTreeMap<String, Policy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<Intercept>,
}

/// The agent and policy of the standard test config.
pub const TESTER: &str = "tester";
/// The policy of the standard test agent.
pub const TEST_POLICY: &str = "test";

impl ConfigBuilder {
    /// The standard test config: proxy on 127.0.0.1:0; short bounds (`request_header`, `connect`
    /// and `dns` 2 s, `idle` 30 s, `shutdown_grace` 10 s); a nameserver on the discard port so
    /// only static hosts resolve; 127.0.0.1 excepted from the built-in loopback deny so local
    /// origins are reachable, and 127.0.0.64/26 denied as the "internal network"; one agent
    /// `tester` for all of 127.0.0.0/8 with policy `test`, which allows nothing yet.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder::bare()
            .dest_allow("127.0.0.1/32")
            .dest_deny("127.0.0.64/26")
            .agent(Agent::cidrs(TESTER, &["127.0.0.0/8"], TEST_POLICY))
            .policy(TEST_POLICY, |_| {})
    }

    /// The standard listener, bounds and nameserver only: no destination exceptions, agents or
    /// policies.
    pub fn bare() -> ConfigBuilder {
        ConfigBuilder {
            server: Server {
                listen: "127.0.0.1:0".into(),
                admin_listen: None,
                mode: None,
                max_connections: None,
                admin_max_connections: None,
                address_refusals_per_second: None,
                address_refusal_burst: None,
                summary_interval: None,
                tls_listen: None,
                tls_cert: None,
                tls_key: None,
                client_ca: None,
                require_client_cert: None,
            },
            timeouts: Timeouts {
                request_header: Some(Duration::from_secs(2)),
                connect: Some(Duration::from_secs(2)),
                dns: Some(Duration::from_secs(2)),
                idle: Some(Duration::from_secs(30)),
                shutdown_grace: Some(Duration::from_secs(10)),
            },
            dns: Dns {
                nameservers: Some(vec!["127.0.0.1:9".into()]),
                hosts: BTreeMap::new(),
            },
            destinations: Destinations::default(),
            sni: None,
            limits: None,
            cluster: None,
            agents: Vec::new(),
            policies: BTreeMap::new(),
            intercept: None,
        }
    }

    /// Apply `f` to the whole config (for what the chained setters do not cover).
    pub fn with(mut self, f: impl FnOnce(&mut ConfigBuilder)) -> ConfigBuilder {
        f(&mut self);
        self
    }

    /// Change `[server]`.
    pub fn server(mut self, f: impl FnOnce(&mut Server)) -> ConfigBuilder {
        f(&mut self.server);
        self
    }

    /// An admin listener on 127.0.0.1:0.
    pub fn admin(self) -> ConfigBuilder {
        self.server(|s| s.admin_listen = Some("127.0.0.1:0".into()))
    }

    /// `server.mode` (`"enforce"` or `"report"`).
    pub fn mode(self, mode: &str) -> ConfigBuilder {
        self.server(|s| s.mode = Some(mode.into()))
    }

    /// `server.max_connections`.
    pub fn max_connections(self, n: u64) -> ConfigBuilder {
        self.server(|s| s.max_connections = Some(n))
    }

    /// `server.admin_max_connections`.
    pub fn admin_max_connections(self, n: u64) -> ConfigBuilder {
        self.server(|s| s.admin_max_connections = Some(n))
    }

    /// `server.address_refusals_per_second` and `server.address_refusal_burst`: each client
    /// address's budget of refusals before identification.
    pub fn refusal_budget(self, per_second: f64, burst: u64) -> ConfigBuilder {
        self.server(|s| {
            s.address_refusals_per_second = Some(per_second);
            s.address_refusal_burst = Some(burst);
        })
    }

    /// `server.summary_interval`.
    pub fn summary_interval(self, d: Duration) -> ConfigBuilder {
        self.server(|s| s.summary_interval = Some(d))
    }

    /// An HTTPS listener on 127.0.0.1:0 serving `cert` and `key` (paths as the file names them).
    pub fn tls(self, cert: &str, key: &str) -> ConfigBuilder {
        self.server(|s| {
            s.tls_listen = Some("127.0.0.1:0".into());
            s.tls_cert = Some(cert.into());
            s.tls_key = Some(key.into());
        })
    }

    /// `timeouts.request_header`.
    pub fn request_header(mut self, d: Duration) -> ConfigBuilder {
        self.timeouts.request_header = Some(d);
        self
    }

    /// `timeouts.connect`.
    pub fn connect(mut self, d: Duration) -> ConfigBuilder {
        self.timeouts.connect = Some(d);
        self
    }

    /// `timeouts.dns`.
    pub fn dns_timeout(mut self, d: Duration) -> ConfigBuilder {
        self.timeouts.dns = Some(d);
        self
    }

    /// `timeouts.idle`.
    pub fn idle(mut self, d: Duration) -> ConfigBuilder {
        self.timeouts.idle = Some(d);
        self
    }

    /// `timeouts.shutdown_grace`.
    pub fn shutdown_grace(mut self, d: Duration) -> ConfigBuilder {
        self.timeouts.shutdown_grace = Some(d);
        self
    }

    /// `dns.nameservers`: just `addr`.
    pub fn nameserver(mut self, addr: std::net::SocketAddr) -> ConfigBuilder {
        self.dns.nameservers = Some(vec![addr.to_string()]);
        self
    }

    /// A static host: `name` resolves to `ips`.
    pub fn host(mut self, name: &str, ips: &[&str]) -> ConfigBuilder {
        self.dns
            .hosts
            .insert(name.into(), ips.iter().map(|i| i.to_string()).collect());
        self
    }

    /// Static hosts, each resolving to 127.0.0.1.
    pub fn hosts_to_loopback(mut self, names: &[&str]) -> ConfigBuilder {
        for n in names {
            self = self.host(n, &["127.0.0.1"]);
        }
        self
    }

    /// Add `cidr` to `[destinations] allow_cidrs`.
    pub fn dest_allow(mut self, cidr: &str) -> ConfigBuilder {
        self.destinations.allow_cidrs.push(cidr.into());
        self
    }

    /// Add `cidr` to `[destinations] deny_cidrs`.
    pub fn dest_deny(mut self, cidr: &str) -> ConfigBuilder {
        self.destinations.deny_cidrs.push(cidr.into());
        self
    }

    /// Change `[sni]` (created empty if absent).
    pub fn sni(mut self, f: impl FnOnce(&mut Sni)) -> ConfigBuilder {
        f(self.sni.get_or_insert_with(Sni::default));
        self
    }

    /// `sni.ports`.
    pub fn sni_ports(self, ports: &[u16]) -> ConfigBuilder {
        self.sni(|s| s.ports = Some(ports.to_vec()))
    }

    /// Change the global `[limits]` (created empty if absent).
    pub fn limits(mut self, f: impl FnOnce(&mut Limits)) -> ConfigBuilder {
        f(self.limits.get_or_insert_with(Limits::default));
        self
    }

    /// `[cluster]` on the store at `redis` (a URL), changed by `f`.
    pub fn cluster(mut self, redis: &str, f: impl FnOnce(&mut Cluster)) -> ConfigBuilder {
        let mut c = Cluster {
            redis: redis.into(),
            username: None,
            password_file: None,
            timeout: None,
            fail_mode: None,
            key_prefix: None,
        };
        f(&mut c);
        self.cluster = Some(c);
        self
    }

    /// Append an agent (agents match in file order).
    pub fn agent(mut self, agent: Agent) -> ConfigBuilder {
        self.agents.push(agent);
        self
    }

    /// Put an agent before all others (it matches first).
    pub fn agent_first(mut self, agent: Agent) -> ConfigBuilder {
        self.agents.insert(0, agent);
        self
    }

    /// Change agent `name`; panics if there is none.
    pub fn edit_agent(mut self, name: &str, f: impl FnOnce(&mut Agent)) -> ConfigBuilder {
        let agent = self
            .agents
            .iter_mut()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no agent {name:?} in the test config"));
        f(agent);
        self
    }

    /// Change policy `name`, creating it (allowing nothing) if absent.
    pub fn policy(mut self, name: &str, f: impl FnOnce(&mut Policy)) -> ConfigBuilder {
        f(self.policies.entry(name.into()).or_default());
        self
    }

    /// Add `rule` to the allow list of policy `test`.
    pub fn allow(self, rule: impl Into<String>) -> ConfigBuilder {
        let rule = rule.into();
        self.policy(TEST_POLICY, |p| p.allow.push(rule))
    }

    /// Add every rule of `rules` to the allow list of policy `test`.
    pub fn allow_all(self, rules: &[String]) -> ConfigBuilder {
        rules.iter().fold(self, |c, r| c.allow(r.clone()))
    }

    /// Change the limits of policy `test`.
    pub fn test_limits(self, f: impl FnOnce(&mut Limits)) -> ConfigBuilder {
        self.policy(TEST_POLICY, |p| f(p.limits()))
    }

    /// The config file text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a test config serialises to TOML")
    }
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder::new()
    }
}

/// A path as the config file spells it.
pub fn path_str(p: &Path) -> String {
    p.to_str().expect("test paths are UTF-8").to_string()
}
