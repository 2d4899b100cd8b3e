//! Question: does the hand-written audit encoder (`AuditRecord::to_line`) save at least 300 ns
//! per line over serde_json through the record's own `#[derive(Serialize)]` (the reference the
//! property test in `src/audit.rs` holds it to)? If not, the derive replaces it.
//!
//! Two real lines, filled as `RequestCtx::audit_line` fills them: an allowed CONNECT tunnel
//! (with SNI, upstream and byte counts) and an allowed plain-HTTP request with a path. Each is
//! encoded in the production shape (a fresh `String` handed to the audit queue) and into a
//! reused buffer (the encoding alone). Pure functions only: the addresses are documentation
//! addresses used as text, never contacted.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use chokepoint::audit::{AuditRecord, SCHEMA_VERSION};
use chokepoint::target::Host;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// An allowed CONNECT tunnel to an LLM API, as the load bench's scenario c writes it.
fn connect_line(host: &Host) -> AuditRecord<'_> {
    AuditRecord {
        v: SCHEMA_VERSION,
        ts: "2026-11-23T09:12:34.865Z",
        event: "connect",
        request_id: "01M83TVDSHSNTYQ01QDY1EFDPQ",
        agent: Some("coding-agent"),
        policy: Some("llm-apis"),
        client: "127.0.0.19:54212".parse().unwrap(),
        method: Some("CONNECT"),
        host: Some(host),
        port: Some(443),
        path: None,
        decision: "allow",
        reason: "allowed",
        rule: Some("api.anthropic.com:443"),
        mode: "enforce",
        upstream: Some("203.0.113.10:443".parse().unwrap()),
        sni: Some("api.anthropic.com"),
        intercepted: false,
        credential: None,
        status: Some(200),
        bytes_up: 4811,
        bytes_down: 23160,
        duration_ms: 1532,
        detail: None,
    }
}

/// An allowed plain-HTTP GET with a path, as the load bench's scenario a writes it.
fn http_line(host: &Host) -> AuditRecord<'_> {
    AuditRecord {
        v: SCHEMA_VERSION,
        ts: "2026-11-23T09:12:35.101Z",
        event: "http",
        request_id: "01M83TVDT4ZQ8W1G0S6K3B9XNA",
        agent: Some("build-agent"),
        policy: Some("package-mirrors"),
        client: "127.0.0.23:40118".parse().unwrap(),
        method: Some("GET"),
        host: Some(host),
        port: Some(80),
        path: Some("/debian/pool/main/c/curl/libcurl4_7.88.1-10+deb12u8_amd64.deb"),
        decision: "allow",
        reason: "allowed",
        rule: Some("*.debian.org:80"),
        mode: "enforce",
        upstream: Some("198.51.100.42:80".parse().unwrap()),
        sni: None,
        intercepted: false,
        credential: None,
        status: Some(200),
        bytes_up: 0,
        bytes_down: 361_448,
        duration_ms: 87,
        detail: None,
    }
}

/// Room for a typical line (the size `to_line` reserves).
const LINE_CAPACITY: usize = 512;

fn encode(c: &mut Criterion) {
    let anthropic = Host::Name("api.anthropic.com".into());
    let mirror = Host::Name("deb.debian.org".into());
    let lines = [
        ("connect", connect_line(&anthropic)),
        ("http", http_line(&mirror)),
    ];
    let mut g = c.benchmark_group("audit");
    for (name, rec) in &lines {
        // Same bytes from both encoders, or the comparison means nothing.
        assert_eq!(rec.to_line(), serde_json::to_string(rec).unwrap());

        // Production shape: a new `String` per line, moved into the audit queue.
        g.bench_with_input(BenchmarkId::new("hand_to_line", name), rec, |b, r| {
            b.iter(|| black_box(black_box(r).to_line()))
        });
        g.bench_with_input(BenchmarkId::new("serde_to_string", name), rec, |b, r| {
            b.iter(|| black_box(serde_json::to_string(black_box(r)).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("serde_presized", name), rec, |b, r| {
            b.iter(|| {
                let mut v = Vec::with_capacity(LINE_CAPACITY);
                serde_json::to_writer(&mut v, black_box(r)).unwrap();
                black_box(String::from_utf8(v).unwrap())
            })
        });

        // The encoding alone: one buffer, cleared before each line.
        g.bench_with_input(BenchmarkId::new("hand_reused", name), rec, |b, r| {
            let mut out = String::with_capacity(LINE_CAPACITY);
            b.iter(|| {
                out.clear();
                black_box(r).write_line(&mut out);
                black_box(out.len())
            })
        });
        g.bench_with_input(BenchmarkId::new("serde_reused", name), rec, |b, r| {
            let mut out = Vec::with_capacity(LINE_CAPACITY);
            b.iter(|| {
                out.clear();
                serde_json::to_writer(&mut out, black_box(r)).unwrap();
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
