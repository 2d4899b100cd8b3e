//! The one place a [`Deny`] becomes a response: status, `chokepoint-reason` header, and one
//! plain-text line that says what was refused, for which agent, and why — so a person or an LLM
//! agent can act on it (and tell a policy refusal, which retrying will not fix, from a fault).

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, PROXY_AUTHENTICATE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::ctx::RequestCtx;
use crate::outcome::Deny;

/// The response header carrying the reason token.
pub const REASON_HEADER: &str = "chokepoint-reason";

/// Longest raw request target echoed back when it could not be parsed.
const MAX_ECHO: usize = 200;

/// Build the refusal response for `deny`; `raw_target` is echoed (sanitised) when no target was
/// parsed.
pub fn render(ctx: &RequestCtx, deny: &Deny, raw_target: &str) -> Response<Full<Bytes>> {
    let status = deny.reason.status();
    let line = body_line(ctx, deny, status, raw_target);
    let mut resp = Response::new(Full::new(Bytes::from(line)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        REASON_HEADER,
        HeaderValue::from_static(deny.reason.as_str()),
    );
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"chokepoint\""),
        );
    }
    if let Some(secs) = deny.retry_after {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == StatusCode::BAD_REQUEST {
        // After a request we could not make sense of, the connection's framing is suspect.
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn body_line(ctx: &RequestCtx, deny: &Deny, status: StatusCode, raw_target: &str) -> String {
    let target = match &ctx.target {
        Some(t) => t.to_string(),
        None => sanitise(raw_target),
    };
    let verb = if status.is_server_error() {
        "could not complete"
    } else {
        "denied"
    };
    let who = match &ctx.agent {
        Some(a) => format!("agent {a}"),
        None => format!("client {}", ctx.client.ip()),
    };
    let tail = if deny.reason.is_policy() {
        " [policy decision: retrying will not help]"
    } else {
        ""
    };
    let method = ctx.method.as_ref().map_or("request", |m| m.as_str());
    // A reason that withholds its detail says its one text; the detail is in the audit line.
    let detail = deny.reason.fixed_text().unwrap_or(&deny.detail);
    format!(
        "{} chokepoint {verb} {method} {target} for {who}: {detail}{tail}\n",
        status.as_u16(),
    )
}

/// Printable ASCII only, bounded: the raw target came from the client.
fn sanitise(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .take(MAX_ECHO)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if raw.len() > MAX_ECHO {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Reason;
    use crate::target;

    #[test]
    fn body_is_one_actionable_line() {
        let mut ctx = RequestCtx::new(
            "127.0.0.1:5000".parse().unwrap(),
            Some(http::Method::CONNECT),
        );
        ctx.agent = Some("coding-agent".into());
        ctx.target = Some(target::parse_authority("evil.test:443", None).unwrap());
        let deny = Deny::new(
            Reason::HostNotAllowed,
            "host not on allowlist of policy llm-apis",
        );
        let resp = render(&ctx, &deny, "evil.test:443");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[REASON_HEADER], "host_not_allowed");
        let line = body_line(&ctx, &deny, StatusCode::FORBIDDEN, "");
        assert_eq!(
            line,
            "403 chokepoint denied CONNECT evil.test:443 for agent coding-agent: host not on allowlist of policy llm-apis [policy decision: retrying will not help]\n"
        );
    }

    #[test]
    fn auth_failures_say_one_text_whatever_the_detail() {
        let ctx = RequestCtx::new("127.0.0.1:5000".parse().unwrap(), Some(http::Method::GET));
        let lines: Vec<String> = [
            "wrong proxy token for agent coder",
            "proxy credentials match no agent allowed from this address",
        ]
        .into_iter()
        .map(|d| {
            let deny = Deny::new(Reason::AuthFailed, d);
            body_line(&ctx, &deny, deny.reason.status(), "http://x/")
        })
        .collect();
        assert_eq!(lines[0], lines[1]);
        assert!(!lines[0].contains("coder"), "{}", lines[0]);
    }

    #[test]
    fn raw_target_is_sanitised() {
        assert_eq!(sanitise("/a b\u{7f}c"), "/a?b?c");
        assert_eq!(sanitise(&"x".repeat(300)).len(), MAX_ECHO + 3);
    }
}
