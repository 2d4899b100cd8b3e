//! The one refusal vocabulary: [`Reason`], [`Decision`], [`Deny`]; and the one verdict:
//! [`Mode::verdict`] and the [`Outcome`] it builds.
//!
//! Every pipeline step reports a refusal as a [`Deny`] value. What a refusal does is decided in
//! one place, [`Outcome::refuse`]: under the agent's [`Mode`] it either ends the request (`deny`)
//! or, in report mode, is recorded as `would_deny` and the request goes on. The proxy, the
//! tunnels' SNI check, the caps passed while streaming and `chokepoint explain` all fold their
//! refusals in through it. Only `proxy::respond` turns a refusal into a response, and only the
//! audit guard (`proxy::ctx::Audited`) turns the [`Outcome`] into an audit line. The snake_case token of a
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
    /// Credentials are required (an agent uses tokens) and none were sent.
    AuthRequired,
    /// The credentials sent do not match any agent.
    AuthFailed,
    /// The client certificate that identified the agent is past its validity (a certificate of
    /// its chain expired after the handshake, or is not yet valid).
    ClientCertExpired,
    /// An open tunnel or client connection was closed because a reload or a token change
    /// revoked what admitted it: its agent is gone, its credential or certificate no longer
    /// identifies it, or its host or port is no longer allowed.
    Revoked,
    /// The agent is over its request rate (`requests_per_second`, `burst`).
    RateLimited,
    /// The agent has `max_concurrent` requests and tunnels open already.
    TooManyConcurrent,
    /// The shared limit store (`[cluster]`) could not be asked in time and `fail_mode` is
    /// `closed`.
    LimitStoreUnavailable,
    /// The agent has used up a byte budget (`max_{upload,download}_bytes_per_{hour,day}`):
    /// new requests are refused until the window ends; an open tunnel that passes it is closed.
    ByteBudget,
    /// The request body is larger than `max_request_body_bytes`.
    BodyTooLarge,
    /// A tunnel's client-to-upstream bytes passed `max_tunnel_upload_bytes`; it was closed.
    UploadCap,
    /// A response body passed `max_response_body_bytes`; it was cut.
    ResponseCap,
    /// The host is not on the agent's allowlist.
    HostNotAllowed,
    /// The host is on the allowlist, but not for this port.
    PortNotAllowed,
    /// The target is an IP literal that no allow rule names.
    IpLiteralNotAllowed,
    /// A deny rule of the agent's policy (`deny`, `deny_files`) names the host; it wins over
    /// every allow rule.
    HostDenied,
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
    /// A tunnel to a TLS port sent a ClientHello for another name than the CONNECT host.
    SniMismatch,
    /// A tunnel to a TLS port sent a ClientHello without a server name (`[sni] require`).
    SniMissing,
    /// A tunnel to a TLS port did not start with a TLS ClientHello (or a malformed one).
    NotTls,
    /// A client of the TLS listener failed the handshake (e.g. an untrusted client certificate),
    /// or an agent failed the handshake of an intercepted tunnel (it does not trust the
    /// interception CA, or pins the host's certificate).
    TlsHandshakeFailed,
    /// A request inside an intercepted tunnel used a method or path that no rule of the host
    /// admits (or a path that could be read as another one).
    PathNotAllowed,
    /// The upstream of an intercepted host failed TLS verification (untrusted or wrong-name
    /// certificate) or the TLS handshake.
    UpstreamTlsFailed,
    /// A credential to inject into an intercepted request is unavailable (its secret file is
    /// missing or unreadable): the request is refused rather than sent without it.
    CredentialUnavailable,
}

/// The outcome of the policy decision for one request or tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request was let through.
    Allow,
    /// The request was refused.
    Deny,
    /// Report mode: the request would have been refused, and was let through.
    WouldDeny,
}

/// Whether refusals are enforced or only reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Refuse what the policy does not allow.
    #[default]
    Enforce,
    /// Let allowlist and limit refusals through, audited as `would_deny` (for rolling a policy
    /// out). Destination vetting is enforced in every mode.
    Report,
}

/// What a refusal does under a [`Mode`]: the one report-mode rule, [`Mode::verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The request or tunnel ends here, refused.
    Refuse,
    /// Report mode: recorded as `would_deny`, and the request goes on.
    Report,
}

/// How a request or tunnel ended, as the audit line and the metrics record it: the decision,
/// the reason, and the status line the client was sent (none when no response went out: a
/// failed TLS handshake, a client that left, a head hyper gave up on without answering).
///
/// It starts as `allow`/`allowed` and changes only through its methods: [`Outcome::refuse`]
/// for refusals, [`Outcome::ended`] for the ways an allowed exchange ends, [`Outcome::answered`]
/// where a response is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    decision: Decision,
    reason: Reason,
    status: Option<u16>,
}

/// A refusal: the reason from the closed vocabulary plus a human detail for the response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deny {
    /// Stable reason token.
    pub reason: Reason,
    /// One human-readable clause saying what exactly was refused ("host not on allowlist of policy
    /// llm-apis"). Never contains secrets; may contain the target the client itself sent.
    pub detail: Cow<'static, str>,
    /// For 429: seconds until a retry can succeed (the `Retry-After` header).
    pub retry_after: Option<u64>,
}

// === impl Reason ===

impl Reason {
    /// Every reason, in declaration order (for docs and tests).
    pub const ALL: [Reason; 40] = [
        Reason::Allowed,
        Reason::MalformedRequest,
        Reason::NotProxyRequest,
        Reason::UnsupportedScheme,
        Reason::HostMismatch,
        Reason::HeaderTimeout,
        Reason::HeaderTooLarge,
        Reason::UnknownAgent,
        Reason::AuthRequired,
        Reason::AuthFailed,
        Reason::RateLimited,
        Reason::TooManyConcurrent,
        Reason::BodyTooLarge,
        Reason::UploadCap,
        Reason::ResponseCap,
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
        Reason::SniMismatch,
        Reason::SniMissing,
        Reason::NotTls,
        Reason::TlsHandshakeFailed,
        Reason::ClientCertExpired,
        Reason::Revoked,
        Reason::HostDenied,
        Reason::LimitStoreUnavailable,
        Reason::ByteBudget,
        Reason::PathNotAllowed,
        Reason::UpstreamTlsFailed,
        Reason::CredentialUnavailable,
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
            Reason::AuthRequired => "auth_required",
            Reason::AuthFailed => "auth_failed",
            Reason::RateLimited => "rate_limited",
            Reason::TooManyConcurrent => "too_many_concurrent",
            Reason::LimitStoreUnavailable => "limit_store_unavailable",
            Reason::ByteBudget => "byte_budget",
            Reason::BodyTooLarge => "body_too_large",
            Reason::UploadCap => "upload_cap",
            Reason::ResponseCap => "response_cap",
            Reason::HostNotAllowed => "host_not_allowed",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::IpLiteralNotAllowed => "ip_literal_not_allowed",
            Reason::HostDenied => "host_denied",
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
            Reason::SniMismatch => "sni_mismatch",
            Reason::SniMissing => "sni_missing",
            Reason::NotTls => "not_tls",
            Reason::TlsHandshakeFailed => "tls_handshake_failed",
            Reason::ClientCertExpired => "client_cert_expired",
            Reason::Revoked => "revoked",
            Reason::PathNotAllowed => "path_not_allowed",
            Reason::UpstreamTlsFailed => "upstream_tls_failed",
            Reason::CredentialUnavailable => "credential_unavailable",
        }
    }

    /// The status a client sees when a request is refused for this reason.
    pub const fn status(self) -> StatusCode {
        match self {
            Reason::Allowed
            | Reason::IdleTimeout
            | Reason::Shutdown
            | Reason::ClientClosed
            | Reason::UploadCap
            | Reason::SniMismatch
            | Reason::SniMissing
            | Reason::NotTls => StatusCode::OK,
            Reason::AuthRequired | Reason::AuthFailed | Reason::ClientCertExpired => {
                StatusCode::PROXY_AUTHENTICATION_REQUIRED
            }
            Reason::RateLimited | Reason::TooManyConcurrent | Reason::ByteBudget => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::MalformedRequest
            | Reason::TlsHandshakeFailed
            | Reason::NotProxyRequest
            | Reason::UnsupportedScheme
            | Reason::HostMismatch => StatusCode::BAD_REQUEST,
            Reason::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::UnknownAgent
            | Reason::HostNotAllowed
            | Reason::PortNotAllowed
            | Reason::IpLiteralNotAllowed
            | Reason::HostDenied
            | Reason::DeniedAddress
            | Reason::Revoked
            | Reason::PathNotAllowed => StatusCode::FORBIDDEN,
            Reason::UpstreamTlsFailed => StatusCode::BAD_GATEWAY,
            Reason::CredentialUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reason::DnsFailed
            | Reason::DnsNoAddresses
            | Reason::UpstreamConnectFailed
            | Reason::UpstreamError
            | Reason::ResponseCap => StatusCode::BAD_GATEWAY,
            Reason::DnsTimeout | Reason::UpstreamConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::LimitStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
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
                | Reason::HostDenied
                | Reason::DeniedAddress
                | Reason::BodyTooLarge
                | Reason::SniMismatch
                | Reason::SniMissing
                | Reason::NotTls
                | Reason::Revoked
                | Reason::PathNotAllowed
        )
    }

    /// True for the refusals that report mode turns into `would_deny`: the allowlist and the
    /// per-agent limits. Identity, parsing and destination vetting are enforced in every mode.
    pub const fn is_reportable(self) -> bool {
        matches!(
            self,
            Reason::HostNotAllowed
                | Reason::PortNotAllowed
                | Reason::IpLiteralNotAllowed
                | Reason::HostDenied
                | Reason::RateLimited
                | Reason::TooManyConcurrent
                | Reason::LimitStoreUnavailable
                | Reason::ByteBudget
                | Reason::HeaderTooLarge
                | Reason::BodyTooLarge
                | Reason::UploadCap
                | Reason::ResponseCap
                | Reason::SniMismatch
                | Reason::SniMissing
                | Reason::NotTls
                | Reason::PathNotAllowed
        )
    }

    /// True for the refusals that make the decision `deny` when enforced: those the client or
    /// its policy caused (a 4xx, a policy refusal, a reportable limit or cap). Network faults on
    /// the way to an allowed destination are not refusals of the request.
    pub fn is_refusal(self) -> bool {
        self.status().is_client_error() || self.is_policy() || self.is_reportable()
    }

    /// True for refusals whose response withholds the detail and says one fixed text instead
    /// ([`Reason::fixed_text`]); the detail goes to the audit line only. Failed proxy
    /// authentication: telling "wrong token for this agent" from "no such agent here" would let
    /// a client enumerate agent names and their address scopes.
    pub const fn withholds_detail(self) -> bool {
        matches!(self, Reason::AuthFailed)
    }

    /// The one response text of a reason that [withholds its detail](Reason::withholds_detail).
    pub const fn fixed_text(self) -> Option<&'static str> {
        match self {
            Reason::AuthFailed => Some(
                "proxy authentication failed: send Proxy-Authorization: Basic base64(agent:token) with the agent's current token, or a valid client certificate, from an address the agent may use",
            ),
            _ => None,
        }
    }

    /// True for the refusals of the policy's host rules: the allowlist's (host, port, IP
    /// literal) and the deny rules' (`host_denied`).
    pub const fn is_allowlist(self) -> bool {
        matches!(
            self,
            Reason::HostNotAllowed
                | Reason::PortNotAllowed
                | Reason::IpLiteralNotAllowed
                | Reason::HostDenied
        )
    }

    /// The index of this reason in [`Reason::ALL`] (a compact code for atomics).
    pub fn code(self) -> u8 {
        Reason::ALL
            .iter()
            .position(|r| *r == self)
            .map_or(0, |i| i as u8)
    }

    /// The reason with this [`Reason::code`].
    pub fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Mode ===

impl Mode {
    /// The token used in the audit line's `mode` field and in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
        }
    }

    /// Parse the config value.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "enforce" => Some(Mode::Enforce),
            "report" => Some(Mode::Report),
            _ => None,
        }
    }

    /// The one report-mode rule: in report mode the reportable refusals (the allowlist, the
    /// per-agent limits and caps, the SNI check) are recorded and let through; every other
    /// refusal (identity, parsing, destination vetting, upstream faults) ends the request in
    /// every mode.
    pub const fn verdict(self, reason: Reason) -> Verdict {
        match self {
            Mode::Report if reason.is_reportable() => Verdict::Report,
            _ => Verdict::Refuse,
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// Allowed, nothing sent yet: how every request starts.
    pub const ALLOWED: Outcome = Outcome {
        decision: Decision::Allow,
        reason: Reason::Allowed,
        status: None,
    };

    /// A request refused before it could be tied to an agent or a mode (a head that did not
    /// parse, a failed TLS handshake): the refusal under [`Mode::Enforce`].
    pub fn refused(reason: Reason) -> Outcome {
        let mut outcome = Outcome::ALLOWED;
        outcome.refuse(Mode::Enforce, reason);
        outcome
    }

    /// Fold a refusal in under `mode` and say what it does ([`Mode::verdict`]).
    ///
    /// - [`Verdict::Report`]: recorded as `would_deny`. The first one counts, except that an
    ///   allowlist reason replaces a limit reason recorded before it: the allowlist is what a
    ///   report-mode rollout evaluates, and what `propose` turns into rules.
    /// - [`Verdict::Refuse`]: the reason is recorded. The decision becomes `deny` for the
    ///   refusals a client or its policy caused (4xx, policy and cap refusals, also those after
    ///   a 200 such as the SNI check); a fault on the way to an allowed destination (DNS,
    ///   connect, upstream: 5xx) keeps the decision made so far (`allow`, or `would_deny` in
    ///   report mode) with the fault as its reason.
    pub fn refuse(&mut self, mode: Mode, reason: Reason) -> Verdict {
        let verdict = mode.verdict(reason);
        match verdict {
            Verdict::Report => {
                let first = self.decision == Decision::Allow;
                let upgrade = self.decision == Decision::WouldDeny
                    && !self.reason.is_allowlist()
                    && reason.is_allowlist();
                if first || upgrade {
                    self.decision = Decision::WouldDeny;
                    self.reason = reason;
                }
            }
            Verdict::Refuse => {
                if reason.is_refusal() {
                    self.decision = Decision::Deny;
                }
                self.reason = reason;
            }
        }
        verdict
    }

    /// Record how an allowed exchange ended (`idle_timeout`, `client_closed`, `shutdown`,
    /// `upstream_error` mid-body). A reason already recorded (report mode's would-be refusal,
    /// a cap) is kept: it is the one that matters to the operator.
    pub fn ended(&mut self, how: Reason) {
        if self.reason == Reason::Allowed {
            self.reason = how;
        }
    }

    /// Record the status line written to the client (where a response is written: the 200 of
    /// a tunnel, a forwarded response's head, a refusal, hyper's answer to a broken head).
    pub fn answered(&mut self, status: http::StatusCode) {
        self.status = Some(status.as_u16());
    }

    /// Allow, deny or would_deny.
    pub const fn decision(&self) -> Decision {
        self.decision
    }

    /// Why it ended as it did.
    pub const fn reason(&self) -> Reason {
        self.reason
    }

    /// The status line sent to the client, if one was.
    pub const fn status(&self) -> Option<u16> {
        self.status
    }
}

// === impl Decision ===

impl Decision {
    /// The token used in the audit line's `decision` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::WouldDeny => "would_deny",
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
            retry_after: None,
        }
    }

    /// A refusal whose detail is built at run time (only ever on a refusal path). The detail is
    /// cut to [`MAX_DETAIL_BYTES`]: it may quote what the client sent (a server name, a DNS
    /// error about its host), and it reaches the response, the log and the audit line.
    pub fn with_detail(reason: Reason, mut detail: String) -> Self {
        if detail.len() > MAX_DETAIL_BYTES {
            let end = floor_char_boundary(&detail, MAX_DETAIL_BYTES - '…'.len_utf8());
            detail.truncate(end);
            detail.push('…');
        }
        Deny {
            reason,
            detail: Cow::Owned(detail),
            retry_after: None,
        }
    }

    /// Add a `Retry-After` (whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }
}

/// Longest refusal detail, in bytes (see [`Deny::with_detail`]); the fixed details are far
/// shorter.
pub const MAX_DETAIL_BYTES: usize = 512;

/// The largest char boundary of `s` at or below `at`.
pub fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    let mut end = at;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
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
        assert_eq!(
            Reason::AuthRequired.status(),
            StatusCode::PROXY_AUTHENTICATION_REQUIRED
        );
        assert_eq!(Reason::RateLimited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(Reason::BodyTooLarge.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn codes_round_trip_and_retry_after_rounds_up() {
        use std::time::Duration;
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        let d = Deny::new(Reason::RateLimited, "x");
        let after = |ms| d.clone().retry_after(Duration::from_millis(ms)).retry_after;
        assert_eq!(after(1), Some(1));
        assert_eq!(after(2001), Some(3));
        assert_eq!(after(0), Some(1));
    }

    #[test]
    fn one_verdict_for_every_mode_and_reason() {
        for r in Reason::ALL {
            assert_eq!(Mode::Enforce.verdict(r), Verdict::Refuse, "{r}");
            let report = if r.is_reportable() {
                Verdict::Report
            } else {
                Verdict::Refuse
            };
            assert_eq!(Mode::Report.verdict(r), report, "{r}");
        }
    }

    #[test]
    fn outcome_folds_refusals_as_the_audit_line_records_them() {
        let fold = |mode, reasons: &[Reason]| {
            let mut o = Outcome::ALLOWED;
            for &r in reasons {
                o.refuse(mode, r);
            }
            (o.decision(), o.reason())
        };
        use Reason::*;
        type Case<'a> = (&'a str, Mode, &'a [Reason], (Decision, Reason));
        let table: &[Case<'_>] = &[
            (
                "enforced allowlist",
                Mode::Enforce,
                &[HostNotAllowed],
                (Decision::Deny, HostNotAllowed),
            ),
            (
                "reported allowlist",
                Mode::Report,
                &[HostNotAllowed],
                (Decision::WouldDeny, HostNotAllowed),
            ),
            (
                "report: first limit counts",
                Mode::Report,
                &[RateLimited, BodyTooLarge],
                (Decision::WouldDeny, RateLimited),
            ),
            (
                "report: allowlist replaces a limit",
                Mode::Report,
                &[RateLimited, PortNotAllowed],
                (Decision::WouldDeny, PortNotAllowed),
            ),
            (
                "report: vetting is enforced",
                Mode::Report,
                &[HostNotAllowed, DeniedAddress],
                (Decision::Deny, DeniedAddress),
            ),
            (
                "a fault keeps allow",
                Mode::Enforce,
                &[DnsFailed],
                (Decision::Allow, DnsFailed),
            ),
            (
                "a fault keeps would_deny",
                Mode::Report,
                &[HostNotAllowed, UpstreamConnectFailed],
                (Decision::WouldDeny, UpstreamConnectFailed),
            ),
            (
                "a cap after the 200 is a deny",
                Mode::Enforce,
                &[UploadCap],
                (Decision::Deny, UploadCap),
            ),
            (
                "SNI after the 200 is a deny",
                Mode::Enforce,
                &[SniMismatch],
                (Decision::Deny, SniMismatch),
            ),
            (
                "client gone is no refusal",
                Mode::Enforce,
                &[ClientClosed],
                (Decision::Allow, ClientClosed),
            ),
        ];
        for (name, mode, reasons, want) in table {
            assert_eq!(fold(*mode, reasons), *want, "{name}");
        }
        let mut o = Outcome::ALLOWED;
        o.refuse(Mode::Report, TooManyConcurrent);
        o.ended(IdleTimeout);
        assert_eq!(
            o.reason(),
            TooManyConcurrent,
            "a recorded refusal outlives the end"
        );
        let mut o = Outcome::refused(MalformedRequest);
        assert_eq!((o.decision(), o.status()), (Decision::Deny, None));
        o.answered(StatusCode::BAD_REQUEST);
        assert_eq!(o.status(), Some(400));
    }

    #[test]
    fn only_reasons_that_withhold_their_detail_have_a_fixed_text() {
        for r in Reason::ALL {
            assert_eq!(r.withholds_detail(), r.fixed_text().is_some(), "{r}");
        }
    }

    #[test]
    fn run_time_details_are_bounded() {
        let d = Deny::with_detail(Reason::SniMismatch, "é".repeat(1000));
        assert!(d.detail.len() <= MAX_DETAIL_BYTES, "{}", d.detail.len());
        assert!(d.detail.ends_with('…'));
        let short = Deny::with_detail(Reason::SniMismatch, "short".into());
        assert_eq!(short.detail, "short");
    }

    #[test]
    fn every_reason_is_documented() {
        let doc = include_str!("../docs/audit-log.md");
        for r in Reason::ALL {
            assert!(
                doc.contains(&format!("| `{}` |", r.as_str())),
                "docs/audit-log.md lacks {r}"
            );
        }
    }
}
