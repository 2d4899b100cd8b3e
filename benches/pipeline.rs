//! Pure functions only: the addresses below are inputs to vetting, never contacted.
//!
//! Question: what do the pure per-request steps cost — parsing and normalising a target and
//! vetting resolved addresses — for every address form and target shape the gateway sees? Each
//! must stay far below the ~15 µs per-request budget of issue 6. (The audit line's encoding has
//! its own bench, `benches/audit.rs`.)

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::net::IpAddr;

use chokepoint::target::parse_authority;
use chokepoint::vet::Vetter;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn targets(c: &mut Criterion) {
    let mut g = c.benchmark_group("target");
    for (name, input) in [
        ("name", "api.openai.com:443"),
        ("upper_trailing_dot", "API.OpenAI.com.:443"),
        ("idn", "b\u{fc}cher.example:443"),
        ("ipv4", "203.0.113.7:443"),
        ("ipv6", "[2001:db8::1]:443"),
        (
            "long_name",
            "a.very.deeply.nested.subdomain.of.some.cdn.provider.example.com:443",
        ),
        ("rejected_hex_ip", "0x7f.1:443"),
    ] {
        g.bench_with_input(BenchmarkId::from_parameter(name), input, |b, i| {
            b.iter(|| black_box(parse_authority(black_box(i), None).is_ok()))
        });
    }
    g.finish();
}

fn vetting(c: &mut Criterion) {
    let mut g = c.benchmark_group("vet");
    let v = Vetter::new(
        ["127.0.0.64/26", "93.184.0.0/16", "fd00:1::/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
        ["127.0.0.1/32", "172.20.7.20/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
        vec!["172.20.0.5:3128".parse().unwrap()],
    );
    for (name, addr) in [
        ("public_v4", "104.18.7.192"),
        ("private_v4", "172.16.1.2"),
        ("metadata_mapped", "::ffff:a9fe:a9fe"),
        ("public_v6", "2606:4700::6812:7c0"),
        ("mapped_v6", "::ffff:104.18.7.192"),
        ("nat64", "64:ff9b::6812:7c0"),
        ("teredo", "2001:0:4136:e378:8000:63bf:3fff:fdd2"),
    ] {
        let ips: Vec<IpAddr> = vec![addr.parse().unwrap()];
        g.bench_with_input(BenchmarkId::from_parameter(name), &ips, |b, ips| {
            b.iter(|| black_box(v.vet(black_box(ips), 443, &[]).is_ok()))
        });
    }
    g.finish();
}

criterion_group!(benches, targets, vetting);
criterion_main!(benches);
