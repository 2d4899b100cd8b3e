//! `deny_files`: plain-text lists of deny rules, in the formats public blocklists ship.
//!
//! One entry per line; blank lines and comments (`#` anywhere after whitespace or at the start,
//! `!` at the start, an `[Adblock Plus …]` header) are skipped. A line is one of:
//!
//! * a deny rule in the config's grammar: `paste.example`, `*.paste.example`,
//!   `paste.example:8443`, `203.0.113.7`, `[2001:db8::1]:443` (what plain domain lists hold);
//! * a hosts-file line, `0.0.0.0 name [name…]` (any IP address first; `127.0.0.1`, `::` and `::1`
//!   are the usual ones): each name is an exact rule, as a hosts file would resolve exactly it;
//! * an adblock-style domain rule `||name^`: `name` and every name below it (`name` plus
//!   `*.name`), as adblock syntax means it. Other adblock rules (options `$…`, paths, `@@`
//!   exceptions, cosmetic `##`) are errors, not silently ignored: a list that relies on them is not
//!   a domain list.
//!
//! Unlike the config, a list is not required to be written normalised: third-party lists carry
//! the odd upper-case letter or trailing dot, so names are normalised as a target would be (lower
//! case, one trailing dot dropped, IDNs to punycode); what cannot be a host name is an error with
//! file, line and column. A name listed twice is kept once (merged lists repeat names).

use std::io::Read;
use std::path::Path;

use super::allowlist::{parse_rule_as, Pattern, RuleUse};
use super::denylist::{DenySet, Inserted};
use crate::fingerprint::FileStamp;
use crate::target::{self, Host};

/// Largest list file read (bytes): a bound on what a typo in a path can make the gateway load.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;
/// Most rules one list may hold.
pub const MAX_FILE_RULES: usize = 2_000_000;
/// Problems reported per list before the rest are only counted.
const MAX_ISSUES: usize = 10;

/// A parsed rule, or why the text is not one.
type Parsed = Result<(Pattern, Option<u16>), String>;

/// One problem on one line of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineIssue {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (characters).
    pub col: usize,
    /// What is wrong, with the fix where known.
    pub problem: String,
}

/// Why a list could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The file could not be opened or read.
    #[error("cannot read deny list: {0}")]
    Read(#[source] std::io::Error),
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("deny list is {0} bytes, more than the {MAX_FILE_BYTES} a list may have")]
    TooLarge(u64),
    /// Some lines are not rules: the first [`MAX_ISSUES`], and how many more there were.
    #[error("{} line(s) of the deny list are not rules", .issues.len() + .more)]
    Lines {
        /// The first problems, in file order.
        issues: Vec<LineIssue>,
        /// Problems past those.
        more: usize,
    },
}

/// Read and parse the list at `path`, with the file's stamp. The stamp is taken before the
/// read, so a file changed during it is seen as changed on the next poll.
pub fn read(path: &Path) -> (Option<FileStamp>, Result<DenySet, ListError>) {
    let stamp = FileStamp::of(path);
    (stamp, read_list(path))
}

fn read_list(path: &Path) -> Result<DenySet, ListError> {
    let file = std::fs::File::open(path).map_err(ListError::Read)?;
    let size = file.metadata().map_err(ListError::Read)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ListError::TooLarge(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ListError::Read)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ListError::TooLarge(bytes.len() as u64));
    }
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let before = &bytes[..e.valid_up_to()];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
            return Err(ListError::Lines {
                issues: vec![LineIssue {
                    line,
                    col,
                    problem: "not UTF-8 text".into(),
                }],
                more: 0,
            });
        }
    };
    parse(text)
}

/// Parse list text into a set whose origins are line numbers.
pub fn parse(text: &str) -> Result<DenySet, ListError> {
    let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
    let mut set = DenySet::with_capacity(lines.min(MAX_FILE_RULES), text.len());
    let mut issues = Vec::new();
    let mut more = 0;
    let mut report = |line: usize, col: usize, problem: String| {
        if issues.len() < MAX_ISSUES {
            issues.push(LineIssue { line, col, problem });
        } else {
            more += 1;
        }
    };
    for (i, raw) in text.split('\n').enumerate() {
        let n = i + 1;
        let origin = u32::try_from(n).unwrap_or(u32::MAX);
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let content = strip_comment(line);
        let mut tokens = tokens(content);
        let Some((col, first)) = tokens.next() else {
            continue;
        };
        let second = tokens.next();
        let rules: Vec<(usize, Parsed)> = match second {
            None => match first.strip_prefix("||") {
                Some(rest) => match adblock(rest) {
                    Ok(name) => vec![
                        (col, Ok((Pattern::Exact(name.clone()), None))),
                        (col, Ok((Pattern::Below(name), None))),
                    ],
                    Err(e) => vec![(col, Err(e))],
                },
                None if first.starts_with("@@") => vec![(
                    col,
                    Err(format!(
                        "`{first}`: adblock exception rules (`@@…`) cannot be part of a deny list: it only denies"
                    )),
                )],
                None => vec![(col, rule(first))],
            },
            Some(second) => match hosts_address(first) {
                Some(()) => std::iter::once(second)
                    .chain(tokens)
                    .map(|(c, name)| (c, hosts_name(name)))
                    .collect(),
                None => vec![(
                    second.0,
                    Err("one rule per line; or a hosts-file line `0.0.0.0 NAME…`".into()),
                )],
            },
        };
        for (col, parsed) in rules {
            match parsed {
                Ok((pattern, port)) => {
                    if set.len() >= MAX_FILE_RULES {
                        report(
                            n,
                            col,
                            format!("more than {MAX_FILE_RULES} rules in one list; split it"),
                        );
                        continue;
                    }
                    if set.insert(pattern, port, origin) == Inserted::Full {
                        report(n, col, "the list is too large to index; split it".into());
                    }
                }
                Err(problem) => report(n, col, problem),
            }
        }
    }
    if issues.is_empty() {
        set.shrink_to_fit();
        Ok(set)
    } else {
        Err(ListError::Lines { issues, more })
    }
}

/// The line without its comment: `#` at the start or after whitespace (a name never holds `#`),
/// `!` at the start (adblock), and the `[Adblock Plus 2.0]` header.
fn strip_comment(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with('!')
        || trimmed
            .get(..8)
            .is_some_and(|h| h.eq_ignore_ascii_case("[adblock"))
    {
        return "";
    }
    match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Whitespace-separated tokens with their 1-based character columns.
fn tokens(line: &str) -> impl Iterator<Item = (usize, &str)> {
    line.split([' ', '\t'])
        .scan(0usize, |at, tok| {
            let start = *at;
            *at += tok.len() + 1;
            Some((start, tok))
        })
        .filter(|(_, t)| !t.is_empty())
        .map(move |(start, t)| (line[..start].chars().count() + 1, t))
}

/// One deny rule in the config grammar, normalising the name first if it needs it.
fn rule(text: &str) -> Parsed {
    match parse_rule_as(text, RuleUse::Deny) {
        Ok(r) => Ok(r),
        Err(first) => {
            // Only spelling differences are forgiven: case, a trailing dot, Unicode.
            let lower = relaxed(text).ok_or_else(|| format!("`{text}`: {first}"))?;
            parse_rule_as(&lower, RuleUse::Deny).map_err(|e| format!("`{text}`: {e}"))
        }
    }
}

/// The rule with its name normalised (`*.` and `:port` kept), if that changes anything.
fn relaxed(text: &str) -> Option<String> {
    if text.starts_with('[') {
        return None;
    }
    let (wild, rest) = match text.strip_prefix("*.") {
        Some(r) => ("*.", r),
        None => ("", text),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (rest, None),
    };
    let normal = match target::normalise_host(host).ok()? {
        Host::Name(n) => n.to_string(),
        Host::Ip(ip) => ip.to_string(),
    };
    let out = match port {
        Some(p) => format!("{wild}{normal}:{p}"),
        None => format!("{wild}{normal}"),
    };
    (out != text).then_some(out)
}

/// The name of an adblock `||name^` rule.
fn adblock(rest: &str) -> Result<Box<str>, String> {
    let Some(name) = rest.strip_suffix('^') else {
        return Err(format!(
            "`||{rest}`: only the domain form `||name^` of adblock rules is a deny rule (no options, paths or wildcards)"
        ));
    };
    match rule(name)? {
        (Pattern::Exact(n), None) => Ok(n),
        _ => Err(format!(
            "`||{rest}`: only the domain form `||name^` of adblock rules is a deny rule (a plain host name)"
        )),
    }
}

/// The first token of a hosts-file line: an IP address (a zone id `%eth0` allowed).
fn hosts_address(token: &str) -> Option<()> {
    let addr = token.split_once('%').map_or(token, |(a, _)| a);
    addr.parse::<std::net::IpAddr>().ok().map(|_| ())
}

/// A name of a hosts-file line: an exact rule (hosts files have no wildcards or ports).
fn hosts_name(name: &str) -> Parsed {
    match rule(name)? {
        (p @ (Pattern::Exact(_) | Pattern::Ip(_)), None) => Ok((p, None)),
        _ => Err(format!(
            "`{name}`: a hosts-file line lists plain host names (no `*.` or port)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::parse_authority;

    fn denied(set: &DenySet, authority: &str) -> Option<String> {
        let t = parse_authority(authority, None).unwrap();
        set.check(&t).map(|h| format!("{h}@{}", h.origin))
    }

    #[test]
    fn common_formats() {
        let text = "\
# a comment
! adblock comment
[Adblock Plus 2.0]
plain.example
*.wild.example   # trailing comment
port.example:8443
0.0.0.0 hosts-a.example hosts-b.example
127.0.0.1\tTabbed.Example.
::1 localhost
||ad.example^

Upper.Example
\u{00FC}ber.example
203.0.113.7
[2001:db8::1]:443
*.zip
plain.example
";
        let set = parse(text).unwrap();
        let table = [
            ("plain.example:443", Some("plain.example@4")),
            ("plain.example:22", Some("plain.example@4")),
            ("www.plain.example:443", None),
            ("a.wild.example:443", Some("*.wild.example@5")),
            ("wild.example:443", None),
            ("port.example:8443", Some("port.example:8443@6")),
            ("port.example:443", None),
            ("hosts-a.example:443", Some("hosts-a.example@7")),
            ("hosts-b.example:80", Some("hosts-b.example@7")),
            ("tabbed.example:443", Some("tabbed.example@8")),
            ("localhost:443", Some("localhost@9")),
            ("ad.example:443", Some("ad.example@10")),
            ("x.y.ad.example:443", Some("*.ad.example@10")),
            ("bad.example:443", None),
            ("upper.example:443", Some("upper.example@12")),
            ("xn--ber-goa.example:443", Some("xn--ber-goa.example@13")),
            ("203.0.113.7:443", Some("203.0.113.7@14")),
            ("203.0.113.8:443", None),
            ("[2001:db8::1]:443", Some("[2001:db8::1]:443@15")),
            ("[2001:db8::1]:80", None),
            ("download.zip:443", Some("*.zip@16")),
        ];
        for (authority, want) in table {
            assert_eq!(denied(&set, authority).as_deref(), want, "{authority}");
        }
        // The repeated `plain.example` is kept once, `||ad.example^` is two rules.
        assert_eq!(set.len(), 14);
    }

    #[test]
    fn bad_lines_name_line_and_column() {
        let text = "ok.example\n  bad..example\n||ad.example^$third-party\n@@||x.example^\nnot an ip\n0.0.0.0 *.x.example\n*\nexample.com/path\n";
        let Err(ListError::Lines { issues, more }) = parse(text) else {
            panic!("accepted")
        };
        assert_eq!(more, 0);
        let at: Vec<(usize, usize)> = issues.iter().map(|i| (i.line, i.col)).collect();
        assert_eq!(
            at,
            [(2, 3), (3, 1), (4, 1), (5, 5), (6, 9), (7, 1), (8, 1)],
            "{issues:#?}"
        );
        assert!(issues[1].problem.contains("`||name^`"), "{issues:#?}");
        assert!(issues[4].problem.contains("hosts-file"), "{issues:#?}");
        assert!(issues[5].problem.contains("every host"), "{issues:#?}");
    }

    #[test]
    fn many_bad_lines_are_counted_not_listed() {
        let text = "bad..x\n".repeat(25);
        let Err(ListError::Lines { issues, more }) = parse(&text) else {
            panic!("accepted")
        };
        assert_eq!((issues.len(), more), (MAX_ISSUES, 15));
    }

    proptest::proptest! {
        /// Any text: never a panic; a list that loads denies every plain name it lists.
        #[test]
        fn any_text_loads_or_names_its_lines(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,12}){1,3}",
                    "\\*\\.[a-z]{1,8}\\.[a-z]{2,4}(:[0-9]{1,5})?",
                    "(0\\.0\\.0\\.0|::1|127\\.0\\.0\\.1)[ \t]+[A-Za-z.]{1,20}",
                    "\\|\\|[a-z.]{1,20}\\^?",
                    "[#!@\\[ ].{0,20}",
                    "\\PC{0,30}",
                ],
                0..20,
            )
        ) {
            let text = lines.join("\n");
            match parse(&text) {
                Ok(set) => {
                    for (i, line) in lines.iter().enumerate() {
                        let plain = !line.is_empty() && line.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
                        if let (true, Ok(t)) = (plain, parse_authority(&format!("{line}:443"), None)) {
                            proptest::prop_assert!(set.check(&t).is_some(), "line {}: {line:?} not denied", i + 1);
                        }
                    }
                }
                Err(ListError::Lines { issues, more }) => {
                    proptest::prop_assert!(!issues.is_empty() && issues.len() <= MAX_ISSUES);
                    for i in &issues {
                        proptest::prop_assert!(i.line >= 1 && i.line <= lines.len().max(1), "{i:?}");
                        proptest::prop_assert!(i.col >= 1, "{i:?}");
                    }
                    proptest::prop_assert!(more == 0 || issues.len() == MAX_ISSUES);
                }
                Err(e) => proptest::prop_assert!(false, "{e}"),
            }
        }
    }

    #[test]
    fn crlf_and_no_final_newline() {
        let set = parse("a.example\r\nb.example").unwrap();
        assert_eq!(set.len(), 2);
        assert!(denied(&set, "a.example:443").is_some());
        assert!(denied(&set, "b.example:443").is_some());
    }

    #[test]
    fn not_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.txt");
        std::fs::write(&path, b"a.example\nb\xffc.example\n").unwrap();
        let (stamp, Err(ListError::Lines { issues, .. })) = read(&path) else {
            panic!("accepted")
        };
        assert!(stamp.is_some());
        assert_eq!((issues[0].line, issues[0].col), (2, 2));
        assert!(matches!(
            read(&dir.path().join("missing.txt")),
            (None, Err(ListError::Read(_)))
        ));
    }
}
