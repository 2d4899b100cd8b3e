//! What both config targets assert about one load.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chokepoint::config::{self, ConfigError, ConfigIssue};
use chokepoint::policy::parse_rule;

/// The config's path: an empty directory, so relative `token_file`s name nothing.
pub(crate) fn config_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("chokepoint-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("chokepoint.toml")
    })
}

/// True when the text names a token, TLS or deny-list file outside that empty directory
/// (`/dev/zero`, `../x`): the loader would read it, which is the operator's business, not the
/// fuzzer's.
pub(crate) fn reads_outside(src: &str) -> bool {
    let Ok(value) = src.parse::<toml::Table>() else {
        return false;
    };
    // A file key whose value is not a plain name (or not a string at all).
    fn outside(v: &toml::Value) -> bool {
        match v.as_str() {
            Some(s) => s.contains('/') || s.contains('\\') || s.starts_with('.'),
            None => true,
        }
    }
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t.iter().any(|(k, v)| {
                (matches!(
                    k.as_str(),
                    "token_file" | "tls_cert" | "tls_key" | "client_ca"
                ) && outside(v))
                    || (k == "deny_files"
                        && v.as_array().map_or(true, |files| files.iter().any(outside)))
                    || walk(v)
            }),
            toml::Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    walk(&toml::Value::Table(value))
}

/// Load `src` and check the result.
pub(crate) fn load_and_check(src: &str) {
    if reads_outside(src) {
        return;
    }
    let path = config_path();
    let lines = src.split('\n').count();
    match config::parse(path, src) {
        Ok(cfg) => {
            assert_eq!(cfg.fingerprint, config::fingerprint(src.as_bytes()));
            for w in &cfg.warnings {
                check_issue(w, src, lines);
            }
            for p in &cfg.policies {
                for r in p.allowlist.rules() {
                    let (_, port) = parse_rule(&r.text)
                        .unwrap_or_else(|e| panic!("loaded rule {:?} refused: {e}", r.text));
                    assert_eq!(port, r.port, "rule {:?}", r.text);
                }
                assert!(p.limits.max_request_header_bytes >= 1024);
                assert!(p.limits.requests_per_second > 0.0);
                assert!(p.limits.burst >= 1 && p.limits.max_concurrent >= 1);
            }
            for n in cfg
                .vetter
                .deny_cidrs()
                .iter()
                .chain(cfg.vetter.allow_cidrs())
            {
                assert_eq!(n.trunc(), *n, "range {n} kept with host bits");
            }
            for a in cfg.agents.iter() {
                assert!(
                    a.policy < cfg.policies.len(),
                    "agent {} policy index",
                    a.name
                );
            }
            assert!(cfg.max_connections >= 1);
        }
        Err(ConfigError::Syntax {
            file,
            line,
            col,
            message,
            ..
        }) => {
            assert_eq!(file, path);
            assert!(
                (1..=lines).contains(&line),
                "syntax error on line {line} of {lines}"
            );
            assert!(col >= 1);
            assert!(!message.is_empty(), "syntax error without a message");
        }
        Err(ConfigError::Invalid(issues)) => {
            assert!(!issues.is_empty(), "invalid config without an issue");
            for i in &issues {
                check_issue(i, src, lines);
            }
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse read a file: {e}"),
    }
}

fn check_issue(i: &ConfigIssue, src: &str, lines: usize) {
    assert_eq!(i.file, config_path());
    assert!((1..=lines).contains(&i.line), "{i}: line of {lines}");
    let line_len = src
        .split('\n')
        .nth(i.line - 1)
        .map_or(0, |l| l.chars().count());
    assert!(
        (1..=line_len + 1).contains(&i.col),
        "{i}: column past the line"
    );
    assert!(!i.key.is_empty(), "{i}: no key");
    assert!(!i.key.starts_with('.') && !i.key.ends_with('.'), "{i}: key");
    assert!(!i.problem.is_empty(), "{i}: no problem text");
    let _ = i.to_string();
}
