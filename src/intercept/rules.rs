//! The method/path rules of an intercepted host: `"METHOD /path"`, compiled at load, matched on
//! the data path.
//!
//! Grammar (deliberately small): a method (an upper-case token such as `GET`, or `*` for any
//! method), one space, then an absolute path of `/`-separated segments. A segment is literal
//! text, `*` (exactly one non-empty segment) or, as the last segment only, `**` (any rest,
//! including nothing). `GET /v1/models` matches exactly that path; `GET /v1/models/*` matches
//! `/v1/models/gpt-4o` but not `/v1/models` nor `/v1/models/a/b`; `POST /v1/**` matches
//! `/v1` and everything below it.
//!
//! Matching compares raw path segments, so a path an upstream would read differently from its
//! bytes must never match a rule by accident: [`check_path`] refuses dot segments (`.`, `..`),
//! empty segments inside the path (`//`), backslashes and percent-encoded `.`, `/` and `\`
//! before any rule is consulted. A literal segment is compared byte for byte, so a client that
//! percent-encodes an ordinary character (`/%761/models`) is refused rather than let through.

use http::Method;

/// One compiled rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    /// The rule as written (for `check`, `explain` and refusal messages).
    pub text: Box<str>,
    /// `None` = any method (`*`).
    method: Option<Method>,
    segments: Vec<Segment>,
    /// The path ends with `**`: any rest matches.
    rest: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Exactly this text.
    Literal(Box<str>),
    /// Any one non-empty segment.
    One,
}

/// The rules of one intercepted host. Empty = every method and path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<PathRule>,
}

/// Longest rule accepted, in bytes.
const MAX_RULE_BYTES: usize = 1024;

/// Parse one rule. The error is a sentence for the config report, with the fix when known.
pub fn parse_rule(text: &str) -> Result<PathRule, String> {
    if text.len() > MAX_RULE_BYTES {
        return Err(format!("longer than {MAX_RULE_BYTES} bytes"));
    }
    let Some((method, path)) = text.split_once(' ') else {
        return Err("write `METHOD /path`, e.g. `POST /v1/chat/completions`".into());
    };
    let method = match method {
        "*" => None,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            Some(Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not a method"))?)
        }
        m => {
            return Err(format!(
            "`{m}` is not a method: use an upper-case method such as GET or POST, or `*` for any"
        ))
        }
    };
    let Some(path) = path.strip_prefix('/') else {
        return Err("the path must start with `/` (one space after the method)".into());
    };
    let mut segments = Vec::new();
    let mut rest = false;
    let parts: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "**" if last => rest = true,
            "**" => return Err("`**` may only be the last segment".into()),
            "*" => segments.push(Segment::One),
            "" if last => segments.push(Segment::Literal("".into())),
            "" => return Err("empty segment (`//`) in the path".into()),
            "." | ".." => return Err("dot segments (`.`, `..`) are not allowed".into()),
            s if s.contains('*') => return Err(
                "`*` is only allowed as a whole segment (`/v1/*/x`), `**` as the whole last one"
                    .into(),
            ),
            s => {
                if let Some(c) = s
                    .chars()
                    .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '\\'))
                {
                    return Err(format!(
                        "character {c:?} is not allowed in a path rule (no query, fragment, spaces or backslashes)"
                    ));
                }
                if has_encoded_separator(s) {
                    return Err("percent-encoded `.`, `/` or `\\` is not allowed".into());
                }
                segments.push(Segment::Literal(s.into()));
            }
        }
    }
    Ok(PathRule {
        text: text.into(),
        method,
        segments,
        rest,
    })
}

/// True when `s` holds `%2e`, `%2f` or `%5c` (any case).
fn has_encoded_separator(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    })
}

/// Refuse a request path that a server could read as another path than its bytes say: dot
/// segments, empty inner segments, backslashes, percent-encoded separators. `path` has no query.
/// The error is the clause for the refusal.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("the path is not absolute");
    };
    if path.contains('\\') {
        return Err("the path holds a backslash");
    }
    if has_encoded_separator(path) {
        return Err("the path holds a percent-encoded `.`, `/` or `\\`; send it decoded");
    }
    let mut segs = rest.split('/').peekable();
    while let Some(seg) = segs.next() {
        match seg {
            "." | ".." => return Err("the path holds a dot segment; send it normalised"),
            "" if segs.peek().is_some() => return Err("the path holds an empty segment (`//`)"),
            _ => {}
        }
    }
    Ok(())
}

// === impl PathRule ===

impl PathRule {
    /// True when `method` and `path` (no query; already passed [`check_path`]) match.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        // "/" is the root: no segments at all.
        let mut got = (!rest.is_empty())
            .then(|| rest.split('/'))
            .into_iter()
            .flatten();
        for want in &self.segments {
            let Some(seg) = got.next() else { return false };
            let ok = match want {
                Segment::Literal(l) => **l == *seg,
                Segment::One => !seg.is_empty(),
            };
            if !ok {
                return false;
            }
        }
        self.rest || got.next().is_none()
    }
}

// === impl Rules ===

impl Rules {
    /// Rules from compiled ones, in config order.
    pub fn new(rules: Vec<PathRule>) -> Rules {
        Rules { rules }
    }

    /// True when no rule is given (every method and path is allowed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &PathRule> {
        self.rules.iter()
    }

    /// Whether the request may go on: `Ok(None)` when there are no rules, `Ok(Some(rule))` for
    /// the first rule that admits it, `Err(clause)` when it is refused (a path no rule admits,
    /// or one that could be read as another path).
    pub fn check(&self, method: &Method, path: &str) -> Result<Option<&PathRule>, &'static str> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        check_path(path)?;
        self.rules
            .iter()
            .find(|r| r.matches(method, path))
            .map(Some)
            .ok_or("no rule of this host admits the method and path")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[&str]) -> Rules {
        Rules::new(list.iter().map(|r| parse_rule(r).unwrap()).collect())
    }

    #[test]
    fn grammar_refuses_what_it_cannot_mean() {
        for (bad, why) in [
            ("GET", "METHOD /path"),
            ("get /x", "not a method"),
            ("GET x", "start with `/`"),
            ("GET  /x", "start with `/`"),
            ("GET /a/**/b", "last segment"),
            ("GET /a*", "whole segment"),
            ("GET /a//b", "empty segment"),
            ("GET /a/../b", "dot segments"),
            ("GET /a?x=1", "not allowed"),
            ("GET /a b", "not allowed"),
            ("GET /%2e%2e/x", "percent-encoded"),
            ("GET /a%2Fb", "percent-encoded"),
        ] {
            let e = parse_rule(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        for ok in [
            "GET /",
            "* /**",
            "POST /v1/chat/completions",
            "DELETE /v1/files/*",
            "GET /v1/",
        ] {
            parse_rule(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn segments_match_at_their_boundaries() {
        let r = rules(&[
            "POST /v1/chat/completions",
            "GET /v1/models",
            "GET /v1/models/*",
            "DELETE /v1/files/*/content",
            "* /v2/**",
        ]);
        let yes = |m: Method, p: &str| r.check(&m, p).is_ok_and(|r| r.is_some());
        assert!(yes(Method::POST, "/v1/chat/completions"));
        assert!(!yes(Method::GET, "/v1/chat/completions"), "method");
        assert!(!yes(Method::POST, "/v1/chat/completions/x"), "longer");
        assert!(!yes(Method::POST, "/v1/chat"), "shorter");
        assert!(
            !yes(Method::POST, "/v1/chat/completionsx"),
            "segment prefix"
        );
        assert!(yes(Method::GET, "/v1/models"));
        assert!(yes(Method::GET, "/v1/models/gpt-4o"));
        assert!(!yes(Method::GET, "/v1/models/a/b"), "* is one segment");
        assert!(!yes(Method::GET, "/v1/models/"), "* is not empty");
        assert!(yes(Method::DELETE, "/v1/files/f1/content"));
        assert!(!yes(Method::DELETE, "/v1/files/f1"), "needs the tail");
        assert!(yes(Method::PUT, "/v2"), "** matches nothing");
        assert!(yes(Method::PATCH, "/v2/a/b/c"));
        assert!(!yes(Method::GET, "/v20"), "** is below a whole segment");
    }

    #[test]
    fn paths_that_read_as_another_path_are_refused() {
        let r = rules(&["GET /v1/models/*", "* /public/**"]);
        for p in [
            "/v1/models/..",
            "/public/../admin",
            "/public/./x",
            "/public//x",
            "/v1/models/%2e%2e",
            "/v1/models/a%2Fb",
            "/public/a%5cb",
            "/public\\..\\admin",
        ] {
            assert!(r.check(&Method::GET, p).is_err(), "{p}");
        }
        // An encoded ordinary character is not decoded: it matches no literal segment.
        let exact = rules(&["GET /v1/models"]);
        assert!(exact.check(&Method::GET, "/%761/models").is_err());
        // No rules: everything goes, unchecked (the plain tunnel would carry it too).
        assert_eq!(Rules::default().check(&Method::GET, "/a/../b"), Ok(None));
    }

    #[test]
    fn root_and_trailing_slash() {
        let r = rules(&["GET /", "GET /v1/"]);
        assert!(r.check(&Method::GET, "/").unwrap().is_some());
        assert!(r.check(&Method::GET, "/v1/").unwrap().is_some());
        assert!(r.check(&Method::GET, "/v1").is_err());
    }
}
