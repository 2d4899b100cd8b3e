//! Question: how long does one allowlist decision take as the policy grows, and is the hashed
//! label-suffix matcher at least as fast as a globset `GlobSet` built from the same rules?
//!
//! Rules: `n` names, half exact (`api{i}.svc{i}.example`), half wildcards (`*.cdn{i}.example`).
//! Lookups: an exact hit, a wildcard hit two labels deep, and a miss (the common refusal path).
//! globset is given the equivalent globs (`*.cdn{i}.example` with `literal_separator` off matches
//! across dots, so we add the `.` boundary explicitly) and queried with `is_match`.
//!
//! Second question (issue #17): does a deny list of a million entries keep one policy decision
//! under 200 ns, and how long does such a list take to load? `denylist`: an open-web policy
//! (`allow = ["*"]`) with the synthetic list of `benches/fixtures/denylist.rs` (one line per
//! entry, every eighth a `*.` rule) at 10,000 and 1,000,000 entries; `Policy::check` for a name
//! the list misses (admitted: the common path), an exact hit and a wildcard hit three labels
//! deep (refused: the `Deny` detail is formatted, a cold path), and `varied_miss`, which cycles
//! through 4,096 different missing names so the table's memory is not all in cache.
//! `denylist_load`: parsing the 1,000,000-line text into the set (the file read is not
//! included; a list of that size is about 25 MB).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use std::sync::Arc;

use chokepoint::limits::Limits;
use chokepoint::policy::{deny_file, parse_rule, Allowlist, DenyFile, Denylist, Mode, Policy};
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

#[path = "fixtures/denylist.rs"]
mod deny_fixture;

fn open_web(text: &str) -> Policy {
    let file = Arc::new(DenyFile {
        shown: "bench.txt".into(),
        path: "bench.txt".into(),
        set: deny_file::parse(text).unwrap(),
    });
    Policy {
        name: "web".into(),
        allowlist: Allowlist::open_web("*", None),
        deny: Denylist::new(Default::default(), vec![file]),
        limits: Limits::default(),
        mode: Mode::Enforce,
        allow_cidrs: Vec::new(),
        intercept: Default::default(),
    }
}

fn bench_denylist(c: &mut Criterion) {
    let mut group = c.benchmark_group("denylist");
    for n in [10_000usize, 1_000_000] {
        let policy = open_web(&deny_fixture::text(n));
        let exact = format!("{}:443", deny_fixture::name(n - 2));
        let wild = format!("a.b.c.{}:443", deny_fixture::name(n - 1));
        let cases = [
            ("miss", "news.example.org:443".to_owned(), true),
            ("exact_hit", exact, false),
            ("wildcard_hit", wild, false),
        ];
        for (name, authority, allowed) in cases {
            let target = parse_authority(&authority, None).unwrap();
            assert_eq!(
                policy.check(Kind::Connect, &target).is_ok(),
                allowed,
                "{name}"
            );
            group.bench_with_input(BenchmarkId::new(name, n), &target, |b, t| {
                b.iter(|| black_box(policy.check(Kind::Connect, black_box(t)).is_ok()))
            });
        }
        let varied: Vec<Target> = (0..4096)
            .map(|i| {
                parse_authority(&format!("www.site{i}.example{}.org:443", i % 97), None).unwrap()
            })
            .collect();
        group.bench_with_input(BenchmarkId::new("varied_miss", n), &varied, |b, ts| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(policy.check(Kind::Connect, black_box(&ts[i])).is_ok())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("denylist_load");
    group.sample_size(10);
    let text = deny_fixture::text(1_000_000);
    group.bench_with_input(BenchmarkId::from_parameter(1_000_000), &text, |b, t| {
        b.iter(|| black_box(deny_file::parse(t).unwrap().len()))
    });
    group.finish();
}

criterion_group!(benches, bench, bench_denylist);
criterion_main!(benches);
