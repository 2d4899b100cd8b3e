//! Question: how long does one allowlist decision take as the policy grows, and is the hashed
//! label-suffix matcher at least as fast as a globset `GlobSet` built from the same rules?
//!
//! Rules: `n` names, half exact (`api{i}.svc{i}.example`), half wildcards (`*.cdn{i}.example`).
//! Lookups: an exact hit, a wildcard hit two labels deep, and a miss (the common refusal path).
//! globset is given the equivalent globs (`*.cdn{i}.example` with `literal_separator` off matches
//! across dots, so we add the `.` boundary explicitly) and queried with `is_match`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use chokepoint::policy::{parse_rule, Allowlist};
use chokepoint::target::{parse_authority, Kind, Target};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use globset::{Glob, GlobSetBuilder};

fn rules(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                format!("api{i}.svc{i}.example")
            } else {
                format!("*.cdn{i}.example")
            }
        })
        .collect()
}

fn lookups(n: usize) -> [(&'static str, Target); 3] {
    let exact = format!("api{}.svc{}.example:443", n / 2 * 2 - 2, n / 2 * 2 - 2);
    let wild = format!("a.b.cdn{}.example:443", n - 1);
    [
        ("exact_hit", parse_authority(&exact, None).unwrap()),
        ("wildcard_hit", parse_authority(&wild, None).unwrap()),
        (
            "miss",
            parse_authority("exfil.attacker.test:443", None).unwrap(),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("allowlist");
    for n in [10usize, 1_000, 10_000, 100_000] {
        let rules = rules(n);
        let mut list = Allowlist::default();
        let mut globs = GlobSetBuilder::new();
        for r in &rules {
            let (pattern, port) = parse_rule(r).unwrap();
            list.insert(r, pattern, port);
            globs.add(Glob::new(r).unwrap());
        }
        let globs = globs.build().unwrap();
        for (name, target) in lookups(n) {
            group.bench_with_input(
                BenchmarkId::new(format!("chokepoint/{name}"), n),
                &target,
                |b, t| b.iter(|| black_box(list.check(Kind::Connect, black_box(t)).is_ok())),
            );
            let host = target.host.to_string();
            group.bench_with_input(
                BenchmarkId::new(format!("globset/{name}"), n),
                &host,
                |b, h| b.iter(|| black_box(globs.is_match(black_box(h.as_str())))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
