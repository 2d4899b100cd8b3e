//! Step 6: vet resolved addresses before any connection is made.
//!
//! The only constructor of [`VettedAddr`] is [`Vetter::vet`], and `connect::dial` accepts nothing
//! else, so the pipeline cannot connect to an address that was not checked — and since the vetted
//! address is the one dialled, a DNS answer that changes later (rebinding) cannot redirect it.
//!
//! Order of decision for one address:
//! 1. the longest matching prefix among the operator's `deny_cidrs` and `allow_cidrs` decides
//!    (a tie denies); a cloud-metadata address is only admitted by an allow of exactly that address;
//! 2. otherwise the built-in deny set (loopback, RFC 1918, CGNAT, link-local, ULA, multicast, …);
//! 3. otherwise allowed.
//!
//! An IPv6 address that embeds an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) is
//! allowed only if the IPv6 address *and* every IPv4 address it carries are allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::outcome::{Deny, Reason};

/// Most addresses of one name that are vetted and tried; the rest of a long answer is ignored.
pub const MAX_ADDRS: usize = 8;

/// An address that passed vetting, with the port to dial. Only [`Vetter::vet`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VettedAddr(SocketAddr);

/// The compiled destination rules of `[destinations]`.
#[derive(Clone, Debug, Default)]
pub struct Vetter {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
    /// The proxy's own listen addresses: a tunnel to itself is a loop.
    own: Vec<SocketAddr>,
}

/// Why one address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// In a built-in range; the string names it ("loopback", "private (RFC 1918)", …).
    BuiltIn(&'static str),
    /// In an operator `deny_cidrs` range.
    DenyCidr(IpNet),
    /// A cloud-metadata address, admitted only by an allow of exactly that address.
    Metadata,
    /// One of the proxy's own listen addresses.
    SelfLoop,
}

/// Cloud metadata and credential endpoints: AWS/GCP/Azure/OpenStack IPv4 and AWS's IPv6
/// metadata, Azure's WireServer (a public address that every Azure VM and AKS pod can reach,
/// serving credentials), the ECS task-credential endpoint, EKS Pod Identity (IPv4 and IPv6),
/// Alibaba Cloud's metadata and Oracle Cloud's (a reserved address outside link-local). Each is
/// admitted only by an allow of exactly that address, never by a wider range.
const METADATA: [IpAddr; 8] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(a, b, c, d), len)
}

/// Built-in IPv4 deny set (RFC 6890 special-purpose registry, minus the globally reachable ones).
const BUILTIN_V4: [((Ipv4Addr, u8), &str); 17] = [
    (v4(0, 0, 0, 0, 8), "this-network (0.0.0.0/8)"),
    (v4(10, 0, 0, 0, 8), "private (RFC 1918)"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT (100.64.0.0/10)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (
        v4(168, 63, 129, 16, 32),
        "Azure WireServer (cloud metadata)",
    ),
    (v4(169, 254, 0, 0, 16), "link-local (cloud metadata range)"),
    (v4(172, 16, 0, 0, 12), "private (RFC 1918)"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation (TEST-NET-1)"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private (RFC 1918)"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation (TEST-NET-2)"),
    (v4(203, 0, 113, 0, 24), "documentation (TEST-NET-3)"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved (240.0.0.0/4)"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
];

/// Built-in IPv6 deny set. IPv4-embedding prefixes are not listed: their IPv4 part is vetted.
fn builtin_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let bits = u128::from(ip);
    let in_net = |prefix: u128, len: u32| (bits ^ prefix) >> (128 - len) == 0;
    if bits == 0 {
        return Some("unspecified (::)");
    }
    if bits == 1 {
        return Some("loopback");
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Some("unique-local (fc00::/7)");
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Some("link-local (fe80::/10)");
    }
    if s[0] & 0xffc0 == 0xfec0 {
        return Some("site-local (fec0::/10)");
    }
    if s[0] & 0xff00 == 0xff00 {
        return Some("multicast");
    }
    if in_net(0x2001_0db8 << 96, 32) || in_net(0x3fff << 112, 20) {
        return Some("documentation");
    }
    if in_net(0x0100 << 112, 64) {
        return Some("discard-only (100::/64)");
    }
    if in_net(0x2001_0002 << 96, 48) {
        return Some("benchmarking (2001:2::/48)");
    }
    if in_net(0x0064_ff9b_0001 << 80, 48) {
        return Some("local-use NAT64 (64:ff9b:1::/48)");
    }
    if in_net(0x2001_0010 << 96, 28) || in_net(0x2001_0020 << 96, 28) {
        return Some("ORCHID");
    }
    // ::/8 is reserved; it holds the IPv4-compatible (::a.b.c.d) and IPv4-translated
    // (::ffff:0:a.b.c.d) forms. Only the well-known NAT64 prefix inside it is routable, and its
    // embedded IPv4 address is vetted separately.
    if s[0] & 0xff00 == 0 && !in_net(0x0064_ff9b << 96, 96) {
        return Some("reserved (::/8)");
    }
    None
}

/// The IPv4 addresses an IPv6 address carries, by the well-known embeddings.
pub fn embedded_v4(ip: Ipv6Addr) -> impl Iterator<Item = Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    let s = ip.segments();
    let mut out: [Option<Ipv4Addr>; 2] = [None, None];
    if bits >> 32 == 0xffff {
        out[0] = Some(low32); // IPv4-mapped ::ffff:a.b.c.d
    } else if bits >> 32 == 0 {
        out[0] = Some(low32); // IPv4-compatible ::a.b.c.d (deprecated)
    } else if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        out[0] = Some(low32); // NAT64 well-known prefix 64:ff9b::/96
    } else if s[0] == 0x2002 {
        // 6to4: 2002:AABB:CCDD::/48
        out[0] = Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo: server in bits 32..64, client obfuscated (inverted) in the low 32 bits.
        out[0] = Some(Ipv4Addr::from(((bits >> 64) & 0xffff_ffff) as u32));
        out[1] = Some(Ipv4Addr::from(!(bits as u32)));
    }
    out.into_iter().flatten()
}

// === impl Vetter ===

impl Vetter {
    /// Build from operator ranges and the proxy's own listen addresses.
    pub fn new(deny: Vec<IpNet>, allow: Vec<IpNet>, own: Vec<SocketAddr>) -> Self {
        Vetter { deny, allow, own }
    }

    /// Replace the proxy's own addresses (once the listener is bound and its port is known).
    pub fn with_own(mut self, own: Vec<SocketAddr>) -> Self {
        self.own = own;
        self
    }

    /// The operator's extra deny ranges.
    pub fn deny_cidrs(&self) -> &[IpNet] {
        &self.deny
    }

    /// The operator's exception ranges.
    pub fn allow_cidrs(&self) -> &[IpNet] {
        &self.allow
    }

    /// Vet every address (at most [`MAX_ADDRS`]) with the policy's own exceptions
    /// `policy_allow` added to `allow_cidrs`; keep the allowed ones in answer order. Refused when
    /// none is left; the detail names the first refused address and why.
    pub fn vet(
        &self,
        addrs: &[IpAddr],
        port: u16,
        policy_allow: &[IpNet],
    ) -> Result<Vec<VettedAddr>, Deny> {
        let mut ok = Vec::with_capacity(addrs.len().min(MAX_ADDRS));
        let mut first_refusal = None;
        for &ip in addrs.iter().take(MAX_ADDRS) {
            let ip = ip.to_canonical();
            match self.check_with(ip, port, policy_allow) {
                Ok(()) => ok.push(VettedAddr(SocketAddr::new(ip, port))),
                Err(r) => {
                    first_refusal.get_or_insert((ip, r));
                }
            }
        }
        if !ok.is_empty() {
            return Ok(ok);
        }
        Err(match first_refusal {
            Some((ip, r)) => Deny::with_detail(
                Reason::DeniedAddress,
                format!("address {ip} is {r}; destinations there are never reached"),
            ),
            None => Deny::new(Reason::DnsNoAddresses, "name resolved to no address"),
        })
    }

    /// Decide one address (an IPv4-mapped address is decided as the IPv4 address it is).
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        self.check_with(ip, port, &[])
    }

    /// Decide one address with extra exceptions (a policy's `allow_cidrs`).
    pub fn check_with(&self, ip: IpAddr, port: u16, extra_allow: &[IpNet]) -> Result<(), Refusal> {
        let ip = ip.to_canonical();
        if self.own.iter().any(|o| {
            o.port() == port && (o.ip() == ip || (o.ip().is_unspecified() && ip.is_loopback()))
        }) {
            return Err(Refusal::SelfLoop);
        }
        self.check_one(ip, extra_allow)?;
        if let IpAddr::V6(v6) = ip {
            for inner in embedded_v4(v6) {
                self.check_one(IpAddr::V4(inner), extra_allow)?;
            }
        }
        Ok(())
    }

    fn check_one(&self, ip: IpAddr, extra_allow: &[IpNet]) -> Result<(), Refusal> {
        let longest = |nets: &[IpNet]| {
            nets.iter()
                .filter(|n| n.contains(&ip))
                .max_by_key(|n| n.prefix_len())
                .copied()
        };
        let allow = match (longest(&self.allow), longest(extra_allow)) {
            (Some(a), Some(b)) => Some(if b.prefix_len() > a.prefix_len() {
                b
            } else {
                a
            }),
            (a, b) => a.or(b),
        };
        match (longest(&self.deny), allow) {
            (Some(d), Some(a)) if a.prefix_len() > d.prefix_len() => {
                return self.metadata_guard(ip, a)
            }
            (Some(d), _) => return Err(Refusal::DenyCidr(d)),
            (None, Some(a)) => return self.metadata_guard(ip, a),
            (None, None) => {}
        }
        match builtin(ip) {
            Some(name) => Err(Refusal::BuiltIn(name)),
            None => Ok(()),
        }
    }

    /// An allow range admits a metadata address only if it is exactly that address.
    fn metadata_guard(&self, ip: IpAddr, allow: IpNet) -> Result<(), Refusal> {
        if METADATA.contains(&ip) && allow.prefix_len() != allow.max_prefix_len() {
            return Err(Refusal::Metadata);
        }
        Ok(())
    }
}

/// The built-in deny range an address falls in, if any.
pub fn builtin(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            BUILTIN_V4.iter().find_map(|((net, len), name)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                (bits & mask == u32::from(*net)).then_some(*name)
            })
        }
        IpAddr::V6(v6) => builtin_v6(v6),
    }
}

// === impl VettedAddr ===

impl VettedAddr {
    /// The socket address to dial.
    pub fn addr(&self) -> SocketAddr {
        self.0
    }
}

impl fmt::Display for VettedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === impl Refusal ===

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BuiltIn(name) => write!(f, "in a built-in denied range: {name}"),
            Refusal::DenyCidr(net) => write!(f, "in deny_cidrs range {net}"),
            Refusal::Metadata => f.write_str(
                "a cloud-metadata address (only an allow_cidrs entry of exactly this address admits it)",
            ),
            Refusal::SelfLoop => f.write_str("the proxy's own listen address"),
        }
    }
}

#[cfg(test)]
mod tests;
