//! Destination vetting for every IP form, against a reference written from the documented rules.
//!
//! Input: up to 10 addresses (raw 4/16 bytes, or IPv4 carried as IPv4-mapped, IPv4-compatible,
//! NAT64 `64:ff9b::/96`, 6to4 `2002::/16` or Teredo `2001::/32`, or a well-known special address),
//! a port, small operator `deny_cidrs` / `allow_cidrs`, a policy's `allow_cidrs`, and the proxy's
//! own listen addresses. Ranges are what the config loader accepts (no host bits, no IPv4-mapped
//! range of /96 or longer).
//!
//! Properties:
//! * never panics;
//! * the result equals a reference vetter written here: canonical form first (IPv4-mapped is
//!   IPv4), the proxy's own address refused, then per address (and per IPv4 address an IPv6 one
//!   carries) the longest matching operator prefix decides with ties denying, a metadata address
//!   needs an allow of exactly itself, and otherwise the built-in deny set (as a CIDR list, matched
//!   with `IpNet::contains`) refuses;
//! * an IPv6 address carrying an IPv4 address that is refused is refused;
//! * an address in the built-in set with no operator allow covering it (or what it carries) is
//!   refused;
//! * allowed results are only ever (canonical) input addresses, in input order, with the port.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use chokepoint::vet::{Refusal, Vetter, MAX_ADDRS};
use ipnet::IpNet;

/// The documented built-in deny set (README, design.md, RFC 6890 / 6666 / 6052 / 8215 / 7343 /
/// 9637), as ranges. IPv6 `::/8` is reserved except the well-known NAT64 prefix, whose IPv4 part
/// is vetted instead.
const BUILTIN: [&str; 30] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "168.63.129.16/32",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
    "2001:db8::/32",
    "3fff::/20",
    "100::/64",
    "2001:2::/48",
    "64:ff9b:1::/48",
    "2001:10::/28",
    "2001:20::/28",
];
const METADATA: [&str; 3] = ["169.254.169.254", "fd00:ec2::254", "168.63.129.16"];

/// Addresses worth hitting exactly.
const SPECIAL: [&str; 14] = [
    "169.254.169.254",
    "fd00:ec2::254",
    "168.63.129.16",
    "127.0.0.1",
    "::1",
    "::",
    "0.0.0.0",
    "255.255.255.255",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a9fe:a9fe",
    "::ffff:169.254.169.254",
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "8.8.8.8",
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
    Mapped([u8; 4]),
    Compatible([u8; 4]),
    Nat64([u8; 4]),
    SixToFour([u8; 4], u16, u64),
    Teredo([u8; 4], [u8; 4], u32),
    Special(u8),
}

#[derive(Arbitrary, Debug)]
struct Net {
    base: Addr,
    len: u8,
}

/// One fuzz case: the resolved addresses, the port, the ranges and the proxy's own addresses.
#[derive(Arbitrary, Debug)]
pub(crate) struct Input {
    addrs: Vec<Addr>,
    port: u16,
    deny: Vec<Net>,
    allow: Vec<Net>,
    policy_allow: Vec<Net>,
    own: Vec<(Addr, u16)>,
}

/// Check one input; panics on a disagreement with the reference.
pub(crate) fn run(input: &Input) {
    let addrs: Vec<IpAddr> = input.addrs.iter().take(10).map(|a| a.ip()).collect();
    let deny = nets(&input.deny);
    let allow = nets(&input.allow);
    let policy_allow = nets(&input.policy_allow);
    // The proxy's own addresses come from `server.listen`/`admin_listen`, as written.
    let own: Vec<SocketAddr> = input
        .own
        .iter()
        .take(2)
        .map(|(a, p)| SocketAddr::new(canonical(a.ip()), *p))
        .collect();
    let vetter = Vetter::new(deny.clone(), allow.clone(), own.clone());
    let r = Reference {
        deny,
        allow: allow.iter().chain(&policy_allow).copied().collect(),
        own,
    };

    let got = vetter.vet(&addrs, input.port, &policy_allow);
    let want = r.vet(&addrs, input.port);
    match (&got, &want) {
        (Ok(g), Some(w)) => {
            let g: Vec<SocketAddr> = g.iter().map(|v| v.addr()).collect();
            assert_eq!(&g, w, "allowed sets differ for {addrs:?}");
            // Only input addresses, in order, with the port.
            let inputs: Vec<IpAddr> = addrs.iter().map(|&a| canonical(a)).collect();
            let mut at = 0;
            for a in &g {
                assert_eq!(a.port(), input.port);
                let pos = inputs[at..]
                    .iter()
                    .position(|i| *i == a.ip())
                    .unwrap_or_else(|| panic!("{a} is not an input address (or out of order)"));
                at += pos + 1;
            }
        }
        (Err(_), None) => {}
        _ => panic!(
            "vet {got:?}, reference {want:?} for {addrs:?} port {} with {r:?}, policy {policy_allow:?}",
            input.port
        ),
    }

    // One address at a time: the embedding and built-in properties on their own.
    for &ip in &addrs {
        let ip = canonical(ip);
        let verdict = vetter.check_with(ip, input.port, &policy_allow);
        if let IpAddr::V6(v6) = ip {
            for inner in carried(v6) {
                let inner_verdict = vetter.check_with(IpAddr::V4(inner), input.port, &policy_allow);
                if matches!(inner_verdict, Err(e) if e != Refusal::SelfLoop) {
                    assert!(
                        verdict.is_err(),
                        "{v6} allowed though it carries refused {inner}: {inner_verdict:?}"
                    );
                }
            }
        }
        let mut all = vec![ip];
        if let IpAddr::V6(v6) = ip {
            all.extend(carried(v6).into_iter().map(IpAddr::V4));
        }
        let covered = |a: &IpAddr| r.allow.iter().any(|n| n.contains(a));
        if all.iter().any(|a| builtin(*a) && !covered(a)) {
            assert!(
                verdict.is_err(),
                "{ip}: built-in range without an allow, yet allowed"
            );
        }
    }
}

// === the input's addresses ===

impl Addr {
    fn ip(self) -> IpAddr {
        let v4 = |b: [u8; 4]| u128::from(u32::from_be_bytes(b));
        match self {
            Addr::V4(b) => IpAddr::V4(Ipv4Addr::from(b)),
            Addr::V6(b) => IpAddr::V6(Ipv6Addr::from(b)),
            Addr::Mapped(b) => IpAddr::V6(Ipv6Addr::from((0xffff << 32) | v4(b))),
            Addr::Compatible(b) => IpAddr::V6(Ipv6Addr::from(v4(b))),
            Addr::Nat64(b) => IpAddr::V6(Ipv6Addr::from((0x0064_ff9b << 96) | v4(b))),
            Addr::SixToFour(b, subnet, iface) => IpAddr::V6(Ipv6Addr::from(
                (0x2002 << 112) | (v4(b) << 80) | (u128::from(subnet) << 64) | u128::from(iface),
            )),
            Addr::Teredo(server, client, flags_port) => IpAddr::V6(Ipv6Addr::from(
                (0x2001_0000 << 96)
                    | (v4(server) << 64)
                    | (u128::from(flags_port) << 32)
                    | u128::from(!u32::from_be_bytes(client)),
            )),
            Addr::Special(i) => SPECIAL[usize::from(i) % SPECIAL.len()]
                .parse()
                .expect("SPECIAL holds addresses"),
        }
    }
}

/// Ranges as the config loader admits them.
fn nets(list: &[Net]) -> Vec<IpNet> {
    list.iter()
        .take(4)
        .filter_map(|n| {
            let ip = n.base.ip();
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let net = IpNet::new(ip, n.len % (max + 1)).ok()?.trunc();
            match net {
                IpNet::V6(v6)
                    if v6.prefix_len() >= 96 && v6.network().to_ipv4_mapped().is_some() =>
                {
                    None
                }
                _ => Some(net),
            }
        })
        .collect()
}

// === the reference ===

/// `::ffff:a.b.c.d` is the IPv4 address; nothing else changes.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..5] == [0; 5] && s[5] == 0xffff {
                let o = v6.octets();
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                ip
            }
        }
        v4 => v4,
    }
}

/// The IPv4 addresses an IPv6 address carries (RFC 4291 compatible and mapped, RFC 6052 NAT64,
/// RFC 3056 6to4, RFC 4380 Teredo), from the octets.
fn carried(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let o = v6.octets();
    let at = |i: usize| Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
    let zero = |r: std::ops::Range<usize>| o[r].iter().all(|&b| b == 0);
    let mapped = zero(0..10) && o[10] == 0xff && o[11] == 0xff;
    let compatible = zero(0..12);
    let nat64 = o[..4] == [0, 0x64, 0xff, 0x9b] && zero(4..12);
    if mapped || compatible || nat64 {
        vec![at(12)]
    } else if o[..2] == [0x20, 0x02] {
        vec![at(2)]
    } else if o[..4] == [0x20, 0x01, 0, 0] {
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        vec![at(4), client]
    } else {
        Vec::new()
    }
}

fn builtin(ip: IpAddr) -> bool {
    static NETS: OnceLock<Vec<IpNet>> = OnceLock::new();
    let nets = NETS.get_or_init(|| {
        BUILTIN
            .iter()
            .map(|s| s.parse().expect("BUILTIN holds ranges"))
            .collect()
    });
    if nets.iter().any(|n| n.contains(&ip)) {
        return true;
    }
    let reserved: IpNet = "::/8".parse().expect("range");
    let nat64: IpNet = "64:ff9b::/96".parse().expect("range");
    reserved.contains(&ip) && !nat64.contains(&ip)
}

#[derive(Debug)]
struct Reference {
    deny: Vec<IpNet>,
    /// Operator and policy exceptions together.
    allow: Vec<IpNet>,
    own: Vec<SocketAddr>,
}

impl Reference {
    fn vet(&self, addrs: &[IpAddr], port: u16) -> Option<Vec<SocketAddr>> {
        let ok: Vec<SocketAddr> = addrs
            .iter()
            .take(MAX_ADDRS)
            .map(|&a| canonical(a))
            .filter(|&ip| self.admits(ip, port))
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        (!ok.is_empty()).then_some(ok)
    }

    fn admits(&self, ip: IpAddr, port: u16) -> bool {
        let own = self.own.iter().any(|o| {
            o.port() == port && (o.ip() == ip || (o.ip().is_unspecified() && ip.is_loopback()))
        });
        if own {
            return false;
        }
        let inner = match ip {
            IpAddr::V6(v6) => carried(v6),
            IpAddr::V4(_) => Vec::new(),
        };
        self.one(ip) && inner.into_iter().all(|v4| self.one(IpAddr::V4(v4)))
    }

    fn one(&self, ip: IpAddr) -> bool {
        let longest = |nets: &[IpNet]| {
            nets.iter()
                .filter(|n| n.contains(&ip))
                .map(|n| (n.prefix_len(), n.max_prefix_len()))
                .max()
        };
        let metadata = METADATA
            .iter()
            .any(|m| m.parse::<IpAddr>().ok() == Some(ip));
        match (longest(&self.deny), longest(&self.allow)) {
            (Some((d, _)), Some((a, max))) if a > d => !metadata || a == max,
            (Some(_), _) => false,
            (None, Some((a, max))) => !metadata || a == max,
            (None, None) => !builtin(ip),
        }
    }
}
