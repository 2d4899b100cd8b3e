//! Opt-in TLS interception: which hosts a policy intercepts, what is injected into their
//! requests, and which methods and paths they may carry.
//!
//! A policy lists hosts under `[[policies.NAME.intercept]]` (exact names or `*.domain`, with an
//! optional port, each also admitted by the policy's allowlist). For a CONNECT to such a host the
//! gateway completes TLS with the agent itself, presenting a leaf for the host signed by the
//! `[intercept]` CA ([`ca`]), checks each request inside against the host's [`rules`], injects
//! the host's credentials from their live [`secrets`] stores, and sends the request on over a
//! verified TLS connection to the vetted upstream address (`proxy::intercept`). Every other
//! CONNECT stays a plain tunnel with the SNI check.
//!
//! Compiled at load ([`Intercepts`], one per policy); the data path only calls
//! [`Intercepts::find`], [`rules::Rules::check`] and [`Inject::value`].

pub mod ca;
pub mod rules;
pub mod secrets;

use std::path::PathBuf;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

pub use ca::{CaError, InterceptSettings, Interceptor};
pub use rules::{PathRule, Rules};
pub use secrets::{Secret, Secrets};

use crate::policy::{Allowlist, Pattern};
use crate::target::{Kind, Target};

/// One credential to inject: a header whose value is a secret file's content in a format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inject {
    /// The header set on every request (whatever the agent sent under it is dropped first).
    pub header: HeaderName,
    /// The secret file (resolved against the config file's directory).
    pub value_file: PathBuf,
    /// The name the audit line gives the credential: `value_file` as written in the config.
    pub name: Arc<str>,
    /// The format's text before and after its `{}`.
    prefix: Box<str>,
    suffix: Box<str>,
}

/// One intercepted host of a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intercept {
    /// The `host` as written (normalised), e.g. `api.openai.com` or `*.githubusercontent.com`.
    pub host: Arc<str>,
    /// Credentials injected into every request.
    pub inject: Vec<Inject>,
    /// Methods and paths allowed; empty = any.
    pub rules: Rules,
    /// The `credential` field of the audit lines: the injected secrets' names, comma-separated.
    pub credential: Option<Arc<str>>,
}

/// The intercepted hosts of one policy, compiled.
#[derive(Clone, Debug, Default)]
pub struct Intercepts {
    matcher: Allowlist,
    entries: Vec<Intercept>,
}

// === impl Inject ===

impl Inject {
    /// An injection; `format` must hold exactly one `{}` (checked by [`split_format`]).
    pub fn new(
        header: HeaderName,
        value_file: PathBuf,
        name: &str,
        format: &str,
    ) -> Option<Inject> {
        let (prefix, suffix) = split_format(format)?;
        Some(Inject {
            header,
            value_file,
            name: name.into(),
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The header value for `secret`, marked sensitive. `None` if the result is not a valid
    /// header value (the format and the secret were both checked; this does not happen).
    pub fn value(&self, secret: &[u8]) -> Option<HeaderValue> {
        let mut v = Vec::with_capacity(self.prefix.len() + secret.len() + self.suffix.len());
        v.extend_from_slice(self.prefix.as_bytes());
        v.extend_from_slice(secret);
        v.extend_from_slice(self.suffix.as_bytes());
        let mut value = HeaderValue::from_bytes(&v).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

/// The text before and after the one `{}` of a format; `None` unless there is exactly one and
/// the rest is printable (a header value's characters).
pub fn split_format(format: &str) -> Option<(&str, &str)> {
    let (prefix, suffix) = format.split_once("{}")?;
    let printable = |s: &str| s.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    (!suffix.contains("{}") && printable(prefix) && printable(suffix)).then_some((prefix, suffix))
}

/// Header names an injection may not set: hop-by-hop and framing headers, and `host` (the
/// gateway sets it to the intercepted host).
pub const RESERVED_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

// === impl Intercepts ===

impl Intercepts {
    /// Add an intercepted host (a pattern from `policy::parse_rule`). False if the same host
    /// and port are already listed.
    pub fn insert(&mut self, pattern: Pattern, port: Option<u16>, entry: Intercept) -> bool {
        if !self.matcher.insert(&entry.host, pattern, port) {
            return false;
        }
        self.entries.push(entry);
        true
    }

    /// The interception of a CONNECT to `target`, if the policy intercepts it. A host without a
    /// port in the config is intercepted on 443 only.
    pub fn find(&self, target: &Target) -> Option<&Intercept> {
        self.find_for(Kind::Connect, target)
    }

    /// The intercepted host whose rules hold for a plain-HTTP request to `target`: a host
    /// without a port in the config covers port 80, one with a port that port (as allow rules).
    pub fn find_http(&self, target: &Target) -> Option<&Intercept> {
        self.find_for(Kind::Http, target)
    }

    /// The entry of the rule that admits a `kind` request to `target`.
    fn find_for(&self, kind: Kind, target: &Target) -> Option<&Intercept> {
        let rule = self.matcher.check(kind, target).ok()?;
        let i = self
            .matcher
            .rules()
            .iter()
            .position(|r| std::ptr::eq(r, rule))?;
        self.entries.get(i)
    }

    /// Every intercepted host, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Intercept> {
        self.entries.iter()
    }

    /// True when the policy intercepts nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The host text with its port, as the config states it (`api.openai.com`, `x.test:8443`).
    pub fn host_text(&self, i: usize) -> Option<&str> {
        self.matcher.rules().get(i).map(|r| &*r.text)
    }
}

/// Every secret file the policies inject, for the live store.
pub fn secret_files<'a>(
    policies: impl IntoIterator<Item = &'a crate::policy::Policy>,
) -> impl Iterator<Item = &'a std::path::Path> {
    policies
        .into_iter()
        .flat_map(|p| p.intercept.iter())
        .flat_map(|i| i.inject.iter())
        .map(|j| j.value_file.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target;

    #[test]
    fn formats_hold_one_placeholder() {
        assert_eq!(split_format("Bearer {}"), Some(("Bearer ", "")));
        assert_eq!(split_format("{}"), Some(("", "")));
        assert_eq!(split_format("token={};x"), Some(("token=", ";x")));
        assert_eq!(split_format("Bearer"), None);
        assert_eq!(split_format("{} {}"), None);
        assert_eq!(split_format("a\r\n{}"), None);
    }

    #[test]
    fn find_needs_the_host_and_port() {
        let mut t = Intercepts::default();
        let entry = |h: &str| Intercept {
            host: h.into(),
            inject: vec![],
            rules: Rules::default(),
            credential: None,
        };
        let (p, port) = crate::policy::parse_rule("api.example.test").unwrap();
        assert!(t.insert(p, port, entry("api.example.test")));
        let (p, port) = crate::policy::parse_rule("*.wild.test:8443").unwrap();
        assert!(t.insert(p, port, entry("*.wild.test:8443")));
        let (p, port) = crate::policy::parse_rule("api.example.test").unwrap();
        assert!(!t.insert(p, port, entry("api.example.test")), "duplicate");
        let at = |s: &str| {
            t.find(&target::parse_authority(s, None).unwrap())
                .map(|i| &*i.host)
        };
        assert_eq!(at("api.example.test:443"), Some("api.example.test"));
        assert_eq!(at("api.example.test:8443"), None);
        assert_eq!(at("a.wild.test:8443"), Some("*.wild.test:8443"));
        assert_eq!(at("wild.test:8443"), None);
        assert_eq!(at("other.test:443"), None);
    }
}
