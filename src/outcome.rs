//! The one refusal vocabulary: [`Reason`], [`Decision`] and [`Deny`].
//!
//! Every pipeline step reports a refusal as a [`Deny`] value; only `proxy::respond` turns it into a
//! response, and only `proxy::finish` turns it into an audit line. The snake_case token of a
//! [`Reason`] is a contract: the same string appears in the `chokepoint-reason` header, the audit
//! line's `reason` field and (later) the metric label, so variants may be added but never renamed.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;

/// Why a request ended the way it did. A closed set, so it can label metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request or tunnel was allowed and completed normally.
    Allowed,
    /// The request line, authority or a header could not be parsed.
    MalformedRequest,
    /// An origin-form (`GET /path`) or asterisk-form request reached the proxy port.
    NotProxyRequest,
    /// An absolute-form request used a scheme other than `http` (https goes through CONNECT).
    UnsupportedScheme,
    /// The `Host` header disagrees with the absolute-form request target.
    HostMismatch,
    /// The client did not send a complete request head within `timeouts.request_header`.
    HeaderTimeout,
    /// The request head was larger than the proxy accepts.
    HeaderTooLarge,
    /// The client matched no `[[agents]]` entry.
    UnknownAgent,
    /// The host is not on the agent's allowlist.
    HostNotAllowed,
    /// The host is on the allowlist, but not for this port.
    PortNotAllowed,
    /// The target is an IP literal that no allow rule names.
    IpLiteralNotAllowed,
    /// Every address of the target is in a denied range (private, loopback, metadata, `deny_cidrs`).
    DeniedAddress,
    /// The name did not resolve (NXDOMAIN, SERVFAIL, no nameserver reachable).
    DnsFailed,
    /// Resolution did not finish within `timeouts.dns`.
    DnsTimeout,
    /// The name resolved, but to no address at all.
    DnsNoAddresses,
    /// Every vetted address refused or reset the connection.
    UpstreamConnectFailed,
    /// No vetted address accepted the connection within `timeouts.connect`.
    UpstreamConnectTimeout,
    /// The upstream failed after the connection was made (bad response, reset mid-stream).
    UpstreamError,
    /// The client went away or sent a broken body before the exchange completed.
    ClientClosed,
    /// A tunnel carried no bytes in either direction for `timeouts.idle`.
    IdleTimeout,
    /// The tunnel was still open when the shutdown grace period ended.
    Shutdown,
}

/// The outcome of the policy decision for one request or tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request was let through.
    Allow,
    /// The request was refused.
    Deny,
}

/// A refusal: the reason from the closed vocabulary plus a human detail for the response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deny {
    /// Stable reason token.
    pub reason: Reason,
    /// One human-readable clause saying what exactly was refused ("host not on allowlist of policy
    /// llm-apis"). Never contains secrets; may contain the target the client itself sent.
    pub detail: Cow<'static, str>,
}

// === impl Reason ===

impl Reason {
    /// Every reason, in declaration order (for docs and tests).
    pub const ALL: [Reason; 21] = [
        Reason::Allowed,
        Reason::MalformedRequest,
        Reason::NotProxyRequest,
        Reason::UnsupportedScheme,
        Reason::HostMismatch,
        Reason::HeaderTimeout,
        Reason::HeaderTooLarge,
        Reason::UnknownAgent,
        Reason::HostNotAllowed,
        Reason::PortNotAllowed,
        Reason::IpLiteralNotAllowed,
        Reason::DeniedAddress,
        Reason::DnsFailed,
        Reason::DnsTimeout,
        Reason::DnsNoAddresses,
        Reason::UpstreamConnectFailed,
        Reason::UpstreamConnectTimeout,
        Reason::UpstreamError,
        Reason::ClientClosed,
        Reason::IdleTimeout,
        Reason::Shutdown,
    ];

    /// The snake_case token used by the `chokepoint-reason` header and the audit line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::MalformedRequest => "malformed_request",
            Reason::NotProxyRequest => "not_proxy_request",
            Reason::UnsupportedScheme => "unsupported_scheme",
            Reason::HostMismatch => "host_mismatch",
            Reason::HeaderTimeout => "header_timeout",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::UnknownAgent => "unknown_agent",
            Reason::HostNotAllowed => "host_not_allowed",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::IpLiteralNotAllowed => "ip_literal_not_allowed",
            Reason::DeniedAddress => "denied_address",
            Reason::DnsFailed => "dns_failed",
            Reason::DnsTimeout => "dns_timeout",
            Reason::DnsNoAddresses => "dns_no_addresses",
            Reason::UpstreamConnectFailed => "upstream_connect_failed",
            Reason::UpstreamConnectTimeout => "upstream_connect_timeout",
            Reason::UpstreamError => "upstream_error",
            Reason::ClientClosed => "client_closed",
            Reason::IdleTimeout => "idle_timeout",
            Reason::Shutdown => "shutdown",
        }
    }

    /// The status a client sees when a request is refused for this reason.
    pub const fn status(self) -> StatusCode {
        match self {
            Reason::Allowed | Reason::IdleTimeout | Reason::Shutdown | Reason::ClientClosed => {
                StatusCode::OK
            }
            Reason::MalformedRequest
            | Reason::NotProxyRequest
            | Reason::UnsupportedScheme
            | Reason::HostMismatch => StatusCode::BAD_REQUEST,
            Reason::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::UnknownAgent
            | Reason::HostNotAllowed
            | Reason::PortNotAllowed
            | Reason::IpLiteralNotAllowed
            | Reason::DeniedAddress => StatusCode::FORBIDDEN,
            Reason::DnsFailed
            | Reason::DnsNoAddresses
            | Reason::UpstreamConnectFailed
            | Reason::UpstreamError => StatusCode::BAD_GATEWAY,
            Reason::DnsTimeout | Reason::UpstreamConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// True for refusals that are policy decisions (a retry will fail the same way), as opposed to
    /// network faults; the response body says so, so an agent knows not to retry.
    pub const fn is_policy(self) -> bool {
        matches!(
            self,
            Reason::UnknownAgent
                | Reason::HostNotAllowed
                | Reason::PortNotAllowed
                | Reason::IpLiteralNotAllowed
                | Reason::DeniedAddress
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Decision ===

impl Decision {
    /// The token used in the audit line's `decision` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

// === impl Deny ===

impl Deny {
    /// A refusal with a fixed detail.
    pub const fn new(reason: Reason, detail: &'static str) -> Self {
        Deny {
            reason,
            detail: Cow::Borrowed(detail),
        }
    }

    /// A refusal whose detail is built at run time (only ever on a refusal path).
    pub fn with_detail(reason: Reason, detail: String) -> Self {
        Deny {
            reason,
            detail: Cow::Owned(detail),
        }
    }
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn tokens_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(seen.insert(s), "duplicate token {s}");
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
        }
    }

    #[test]
    fn refusals_map_to_design_statuses() {
        assert_eq!(Reason::HostNotAllowed.status(), StatusCode::FORBIDDEN);
        assert_eq!(Reason::DeniedAddress.status(), StatusCode::FORBIDDEN);
        assert_eq!(Reason::MalformedRequest.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Reason::DnsTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            Reason::UpstreamConnectFailed.status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
