//! Question: what does the method/path rule check of an intercepted request cost per request,
//! as a host's rule list grows, next to the allowlist decision every request already pays?
//!
//! Rules: a realistic OpenAI policy (5 rules) and synthetic lists of 50 and 500
//! (`POST /v1/svc{i}/items/*`, every fourth `GET /v1/svc{i}/**`). Requests: a hit on the first
//! rule, a hit on the last, a miss (the refusal path: every rule is tried), and a path refused by
//! the normalisation check (dot segment) before any rule. The allowlist reference is one exact-
//! name lookup in a 10-rule allowlist (`benches/allowlist.rs` has the full picture).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use chokepoint::intercept::rules::{parse_rule, Rules};
use chokepoint::policy::{self, Allowlist};
use chokepoint::target::{parse_authority, Kind};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;

const OPENAI: [&str; 5] = [
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "POST /v1/embeddings",
    "GET /v1/models",
    "GET /v1/models/*",
];

fn synthetic(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 4 == 3 {
                format!("GET /v1/svc{i}/**")
            } else {
                format!("POST /v1/svc{i}/items/*")
            }
        })
        .collect()
}

/// A named request: method and path.
type Request = (&'static str, Method, String);

fn compile(list: &[String]) -> Rules {
    Rules::new(list.iter().map(|r| parse_rule(r).unwrap()).collect())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("intercept_rules");
    let openai: Vec<String> = OPENAI.iter().map(|s| s.to_string()).collect();
    let cases: [(&str, Vec<String>, [Request; 4]); 3] = [
        (
            "openai",
            openai,
            [
                ("first_hit", Method::POST, "/v1/chat/completions".into()),
                ("last_hit", Method::GET, "/v1/models/gpt-4o".into()),
                ("miss", Method::DELETE, "/v1/files/file-abc".into()),
                ("refused_path", Method::GET, "/v1/models/../files".into()),
            ],
        ),
        (
            "50",
            synthetic(50),
            [
                ("first_hit", Method::POST, "/v1/svc0/items/x".into()),
                ("last_hit", Method::GET, "/v1/svc49/a/b/c".into()),
                ("miss", Method::DELETE, "/v1/svc0/items/x".into()),
                ("refused_path", Method::GET, "/v1/svc0/./x".into()),
            ],
        ),
        (
            "500",
            synthetic(500),
            [
                ("first_hit", Method::POST, "/v1/svc0/items/x".into()),
                ("last_hit", Method::GET, "/v1/svc499/a/b/c".into()),
                ("miss", Method::DELETE, "/v1/svc0/items/x".into()),
                ("refused_path", Method::GET, "/v1/svc0/./x".into()),
            ],
        ),
    ];
    for (size, list, requests) in cases {
        let rules = compile(&list);
        for (name, method, path) in requests {
            group.bench_with_input(
                BenchmarkId::new(name, size),
                &(method, path),
                |b, (m, p)| b.iter(|| black_box(rules.check(black_box(m), black_box(p)).is_ok())),
            );
        }
    }
    let mut allow = Allowlist::default();
    for i in 0..10 {
        let r = format!("api{i}.example.test");
        let (pattern, port) = policy::parse_rule(&r).unwrap();
        allow.insert(&r, pattern, port);
    }
    let target = parse_authority("api9.example.test:443", None).unwrap();
    group.bench_function("allowlist_reference/exact_hit", |b| {
        b.iter(|| black_box(allow.check(Kind::Connect, black_box(&target)).is_ok()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
