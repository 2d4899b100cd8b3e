//! The Markdown in README.md and docs/ links only inside the repository: no link target is an
//! `http://` or `https://` address (example URLs inside code, like `curl -x http://…`, are text,
//! not links), every relative target exists, and every `#anchor` names a heading of its file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// README.md and every docs/*.md.
fn markdown_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let docs = std::fs::read_dir(root.join("docs")).expect("docs/ is readable");
    for entry in docs {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The lines of `text` outside fenced code blocks (1-based number, text), with inline code spans
/// blanked out.
fn prose(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Text between backticks is code: keep only the segments outside them.
        let outside: Vec<&str> = line.split('`').step_by(2).collect();
        out.push((n + 1, outside.join(" ")));
    }
    out
}

/// Link targets on a prose line: inline `[text](target)`, reference definitions
/// `[label]: target` and autolinks `<scheme://…>`.
fn targets(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let end = after.find(')').unwrap_or(after.len());
        found.push(after[..end].trim().to_owned());
        rest = &after[end..];
    }
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        if let Some(i) = trimmed.find("]:") {
            found.push(trimmed[i + 2..].trim().to_owned());
        }
    }
    let mut rest = line;
    while let Some(i) = rest.find('<') {
        let after = &rest[i + 1..];
        let end = after.find('>').unwrap_or(after.len());
        if after[..end].contains("://") {
            found.push(after[..end].to_owned());
        }
        rest = &after[end..];
    }
    found
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings.
fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#').trim()));
        }
    }
    out
}

#[test]
fn markdown_links_stay_inside_the_repository() {
    let mut problems = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("markdown file is readable");
        let name = file.display();
        for (n, line) in prose(&text) {
            for target in targets(&line) {
                let at = format!("{name}:{n}: `{target}`");
                let lower = target.to_ascii_lowercase();
                if lower.starts_with("http://") || lower.starts_with("https://") {
                    problems.push(format!("{at}: links outside the repository"));
                    continue;
                }
                if target.contains("://") || lower.starts_with("mailto:") {
                    problems.push(format!("{at}: not a path in the repository"));
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let dest = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().expect("file has a directory").join(path)
                };
                if !dest.exists() {
                    problems.push(format!("{at}: no such file"));
                } else if let Some(anchor) = anchor {
                    if !anchors(&dest).contains(anchor) {
                        problems.push(format!("{at}: no heading with this anchor"));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_link_reader_sees_what_it_must() {
    let line = "see [a](https://example.com/x) and [`b`](docs/b.md#c), <http://d.test/>";
    let seen = targets(&prose(line)[0].1);
    assert_eq!(
        seen,
        ["https://example.com/x", "docs/b.md#c", "http://d.test/"]
    );
    assert_eq!(
        targets("[label]: https://example.com"),
        ["https://example.com"]
    );
    // Code is text, not links: in a span or a fenced block.
    assert!(prose("`[x](https://e.test)`")[0].1.trim().is_empty());
    assert!(prose("```\n[x](https://e.test)\n```").is_empty());
    assert_eq!(slug("The SNI check"), "the-sni-check");
    assert_eq!(slug("e: idle tunnels — met"), "e-idle-tunnels--met");
}
