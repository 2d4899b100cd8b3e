//! The CLI: `chokepoint check` on the shipped configs and on broken fixtures, whose exact messages
//! (file, line, column, key, problem) are pinned in `tests/fixtures/config/invalid/*.stderr`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

use std::path::{Path, PathBuf};
use std::process::Command;

fn check(dir: &Path, file: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chokepoint"))
        .current_dir(dir)
        .args(["check", "--config", file])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn toml_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    files
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_and_valid_configs_pass_check() {
    let (code, out, err) = check(&root(), "config/chokepoint.toml");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("config/chokepoint.toml: ok\n"), "{out}");
    assert!(
        out.contains("  local -> policy llm-apis (source 127.0.0.0/8, ::1/128)"),
        "{out}"
    );
    assert!(
        out.contains("  llm-apis: 6 allow rules, mode enforce, 20 req/s burst 40"),
        "{out}"
    );
    assert_eq!(err, "", "the shipped config has no warnings");

    for dir in ["config/examples", "tests/fixtures/config/valid"] {
        let dir = root().join(dir);
        let files = toml_files(&dir);
        assert!(!files.is_empty(), "{}", dir.display());
        for f in files {
            let (code, _, err) = check(&dir, &f);
            assert_eq!(code, 0, "{f}: {err}");
        }
    }
}

#[test]
fn invalid_configs_fail_with_the_pinned_message() {
    let dir = root().join("tests/fixtures/config/invalid");
    let files = toml_files(&dir);
    assert!(files.len() >= 5);
    for f in files {
        let expected = std::fs::read_to_string(dir.join(f.replace(".toml", ".stderr")))
            .unwrap_or_else(|_| panic!("{f} needs a .stderr file"));
        let (code, out, err) = check(&dir, &f);
        assert_eq!(code, 64, "{f}: EX_USAGE expected");
        assert_eq!(out, "", "{f}");
        assert_eq!(err, expected, "{f}");
        // Every message names the file and a line.
        for line in err.lines().skip(1).filter(|l| l.starts_with(f.as_str())) {
            let mut parts = line.splitn(4, ':');
            assert_eq!(parts.next(), Some(f.as_str()));
            assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        }
    }
}

#[test]
fn warnings_are_printed_and_do_not_fail_check() {
    let dir = root().join("tests/fixtures/config/warn");
    for f in toml_files(&dir) {
        let expected = std::fs::read_to_string(dir.join(f.replace(".toml", ".stderr"))).unwrap();
        let (code, out, err) = check(&dir, &f);
        assert_eq!(code, 0, "{f}: {err}");
        assert!(out.starts_with(&format!("{f}: ok")), "{out}");
        assert_eq!(err, expected, "{f}");
        assert!(err.lines().all(|l| l.starts_with("warning: ")), "{err}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, err) = check(&root(), "no/such/file.toml");
    assert_eq!(code, 64);
    assert!(
        err.contains("no/such/file.toml: cannot read config file"),
        "{err}"
    );
}

fn run(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chokepoint"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn explain_exit_codes() {
    let root = root();
    let cfg = "config/chokepoint.toml";
    let (code, out, _) = run(
        &root,
        &[
            "explain",
            "--config",
            cfg,
            "--agent",
            "local",
            "https://api.github.com/zen",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decision: allow") && out.contains("rule:     api.github.com"),
        "{out}"
    );
    let (code, out, _) = run(
        &root,
        &[
            "explain",
            "--config",
            cfg,
            "--client",
            "127.0.0.1",
            "example.com:443",
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason:   host_not_allowed"), "{out}");
    let (code, _, err) = run(
        &root,
        &[
            "explain",
            "--config",
            cfg,
            "--client",
            "192.0.2.1",
            "example.com:443",
        ],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("unknown_agent"), "{err}");
    let (code, _, err) = run(
        &root,
        &[
            "explain",
            "--config",
            cfg,
            "--agent",
            "nobody",
            "example.com:443",
        ],
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("no agent named `nobody` (agents: local)"),
        "{err}"
    );
    // --resolve with a static host: the answer and the vetting verdict of each address.
    let (code, out, _) = run(
        &root.join("tests/fixtures/config/valid"),
        &[
            "explain",
            "--config",
            "full.toml",
            "--agent",
            "batch",
            "--resolve",
            "tools.internal.test:443",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        out.contains("127.0.0.2: kept") && out.contains("::1: refused"),
        "{out}"
    );
}

#[test]
fn propose_then_paste_then_explain_allows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = r#"[server]
listen = "127.0.0.1:3128"

[[agents]]
name = "coder"
source_cidrs = ["127.0.0.0/8"]
policy = "llm"

[policies.llm]
mode = "report"
allow = ["api.openai.com"]
"#;
    std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
    // Lines as the gateway writes them in report mode.
    let line = |event: &str, host: &str, port: u16| {
        format!(
            r#"{{"v":1,"ts":"2026-11-23T10:00:00.000Z","event":"{event}","request_id":"01M83TVDSHSNTYQ01QDY1EFDPQ","agent":"coder","policy":"llm","client":"127.0.0.1:5000","method":"GET","host":"{host}","port":{port},"path":null,"decision":"would_deny","reason":"host_not_allowed","rule":null,"mode":"report","upstream":"127.0.0.1:443","status":200,"bytes_up":0,"bytes_down":0,"duration_ms":1}}"#
        )
    };
    let log = [
        line("connect", "pypi.org", 443),
        line("http", "mirror.test", 8080),
        line("connect", "pypi.org", 443),
    ]
    .join("\n");
    std::fs::write(dir.path().join("audit.log"), log).unwrap();
    let (code, proposal, err) = run(
        dir.path(),
        &["propose", "--config", "c.toml", "--audit", "audit.log"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("read 3 audit line(s): 3 would_deny"), "{err}");
    // Paste: replace the policy table with the proposal.
    let head = cfg.split("[policies.llm]").next().unwrap();
    std::fs::write(dir.path().join("c2.toml"), format!("{head}{proposal}")).unwrap();
    let (code, _, err) = run(dir.path(), &["check", "--config", "c2.toml"]);
    assert_eq!(code, 0, "{err}\n{proposal}");
    for target in [
        "https://pypi.org/simple/",
        "http://mirror.test:8080/",
        "https://api.openai.com/",
    ] {
        let (code, out, _) = run(
            dir.path(),
            &["explain", "--config", "c2.toml", "--agent", "coder", target],
        );
        assert_eq!(code, 0, "{target}: {out}");
    }
}

#[test]
fn open_web_example_checks_and_explains() {
    let dir = root().join("config/examples");
    let (code, out, err) = check(&dir, "open-web.toml");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("  browsing: open web (any public host, 443 CONNECT, 80 HTTP), mode enforce"),
        "{out}"
    );
    assert!(
        out.contains("    deny: 2 rules; lists/exfil.txt: "),
        "{out}"
    );
    assert_eq!(err, "", "the example has no warnings");
    let explain = |target: &str| {
        run(
            &dir,
            &[
                "explain",
                "--config",
                "open-web.toml",
                "--agent",
                "browsing-agent",
                target,
            ],
        )
    };
    let (code, out, _) = explain("https://dl.transfer.sh/x");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reason:   host_denied"), "{out}");
    assert!(
        out.contains("deny:     `*.transfer.sh` (lists/exfil.txt:"),
        "the rule and its list line: {out}"
    );
    let (code, out, _) = explain("https://news.example.org/today");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule:     *"), "{out}");
    let (code, out, _) = explain("https://203.0.113.7/");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ip_literal_not_allowed"), "{out}");
}
