//! The serde mirror of the TOML file: exactly the file's shape, every table
//! `deny_unknown_fields`, and every value that needs a semantic check kept `Spanned` so its
//! line can be reported.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its byte span in the file.
pub(crate) type Str = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) timeouts: RawTimeouts,
    #[serde(default)]
    pub(crate) dns: RawDns,
    #[serde(default)]
    pub(crate) destinations: RawDestinations,
    #[serde(default)]
    pub(crate) sni: RawSni,
    #[serde(default)]
    pub(crate) limits: RawLimits,
    pub(crate) cluster: Option<RawCluster>,
    #[serde(default)]
    pub(crate) agents: Vec<RawAgent>,
    #[serde(default)]
    pub(crate) policies: BTreeMap<Str, RawPolicy>,
    pub(crate) intercept: Option<Spanned<RawIntercept>>,
}

/// `[intercept]`: the CA that interception leaves are signed with, and extra upstream roots.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIntercept {
    pub(crate) ca_cert: Str,
    pub(crate) ca_key: Str,
    #[serde(default)]
    pub(crate) upstream_ca: Vec<Str>,
}

/// One `[[policies.NAME.intercept]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInterceptHost {
    pub(crate) host: Str,
    #[serde(default)]
    pub(crate) inject: Vec<RawInject>,
    #[serde(default)]
    pub(crate) rules: Vec<Str>,
}

/// One `inject = [{ header, value_file, format }]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInject {
    pub(crate) header: Str,
    pub(crate) value_file: Str,
    pub(crate) format: Option<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) listen: Str,
    pub(crate) admin_listen: Option<Str>,
    pub(crate) mode: Option<Str>,
    pub(crate) max_connections: Option<Spanned<i64>>,
    pub(crate) admin_max_connections: Option<Spanned<i64>>,
    pub(crate) address_refusals_per_second: Option<Spanned<f64>>,
    pub(crate) address_refusal_burst: Option<Spanned<i64>>,
    pub(crate) summary_interval: Option<Str>,
    pub(crate) tls_listen: Option<Str>,
    pub(crate) tls_cert: Option<Str>,
    pub(crate) tls_key: Option<Str>,
    pub(crate) client_ca: Option<Str>,
    pub(crate) require_client_cert: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSni {
    pub(crate) ports: Option<Vec<Spanned<i64>>>,
    pub(crate) require: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub(crate) request_header: Option<Str>,
    pub(crate) connect: Option<Str>,
    pub(crate) dns: Option<Str>,
    pub(crate) idle: Option<Str>,
    pub(crate) shutdown_grace: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    pub(crate) nameservers: Option<Vec<Str>>,
    pub(crate) max_ttl: Option<Str>,
    #[serde(default)]
    pub(crate) hosts: BTreeMap<Str, Vec<Str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDestinations {
    #[serde(default)]
    pub(crate) deny_cidrs: Vec<Str>,
    #[serde(default)]
    pub(crate) allow_cidrs: Vec<Str>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgent {
    pub(crate) name: Str,
    pub(crate) source_cidrs: Option<Spanned<Vec<Str>>>,
    pub(crate) token_file: Option<Str>,
    pub(crate) spiffe_id: Option<Str>,
    pub(crate) cert_subject: Option<Str>,
    pub(crate) policy: Str,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub(crate) allow: Vec<Str>,
    #[serde(default)]
    pub(crate) deny: Vec<Str>,
    #[serde(default)]
    pub(crate) deny_files: Vec<Str>,
    #[serde(default)]
    pub(crate) allow_cidrs: Vec<Str>,
    pub(crate) limits: Option<Spanned<RawLimits>>,
    pub(crate) mode: Option<Str>,
    #[serde(default)]
    pub(crate) intercept: Vec<RawInterceptHost>,
}

/// `[limits]` and a policy's `limits = { … }`: every key optional (a policy overrides only what
/// it names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub(crate) max_request_header_bytes: Option<Spanned<i64>>,
    pub(crate) max_request_body_bytes: Option<Spanned<i64>>,
    pub(crate) max_tunnel_upload_bytes: Option<Spanned<i64>>,
    pub(crate) max_response_body_bytes: Option<Spanned<i64>>,
    pub(crate) requests_per_second: Option<Spanned<f64>>,
    pub(crate) burst: Option<Spanned<i64>>,
    pub(crate) max_concurrent: Option<Spanned<i64>>,
    pub(crate) max_upload_bytes_per_hour: Option<Spanned<i64>>,
    pub(crate) max_download_bytes_per_hour: Option<Spanned<i64>>,
    pub(crate) max_upload_bytes_per_day: Option<Spanned<i64>>,
    pub(crate) max_download_bytes_per_day: Option<Spanned<i64>>,
}

/// `[cluster]`: the shared limit store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) redis: Spanned<Nodes>,
    pub(crate) username: Option<Str>,
    pub(crate) password_file: Option<Str>,
    pub(crate) timeout: Option<Str>,
    pub(crate) fail_mode: Option<Str>,
    pub(crate) key_prefix: Option<Str>,
}

/// `cluster.redis`: one server URL, or a list of cluster node URLs.
#[derive(Debug)]
pub(crate) enum Nodes {
    One(String),
    Many(Vec<String>),
}

/// What the `Nodes` visitor expects (the doc tracer recognises it by this text).
pub(crate) const NODES_EXPECTED: &str = "a redis URL or an array of cluster node URLs";

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Nodes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(NODES_EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Nodes, E> {
                Ok(Nodes::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Nodes, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Nodes::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}
