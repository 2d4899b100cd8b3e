//! Step 5: turn a host into addresses, with a deadline. No policy here: every answer, static or
//! from DNS, goes through `vet` next.
//!
//! Names are looked up fully qualified (a trailing dot is added), so the pod's resolv.conf search
//! list and `ndots` never turn `api.example.com` into `api.example.com.default.svc.cluster.local`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::ResolveErrorKind;
use hickory_resolver::TokioResolver;

use crate::outcome::{Deny, Reason};
use crate::target::Host;
use crate::vet::MAX_ADDRS;

/// The `[dns]` section, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers to ask; `None` uses the system resolver configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
    /// Static answers by normalised name, checked before DNS.
    pub hosts: HashMap<Box<str>, Vec<IpAddr>>,
    /// Longest an answer is cached, whatever TTL it carries (`dns.max_ttl`): a hostile or
    /// broken nameserver's 0xFFFFFFFF would otherwise pin an address for 136 years.
    pub max_ttl: Duration,
}

/// Default for `dns.max_ttl`, as caching resolvers cap answers.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: None,
            hosts: HashMap::new(),
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

/// A resolver's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The addresses, in answer order (at most `MAX_ADDRS`).
    pub addrs: Vec<IpAddr>,
    /// True when DNS was asked (not an IP literal or a static host).
    pub from_dns: bool,
}

/// The resolver: static hosts, then hickory, bounded by a timeout.
pub struct Resolver {
    hosts: HashMap<Box<str>, Vec<IpAddr>>,
    dns: TokioResolver,
    timeout: Duration,
}

/// A resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// The system resolver configuration could not be read.
    #[error("reading the system DNS configuration (set [dns] nameservers to avoid it)")]
    SystemConfig(#[source] hickory_resolver::ResolveError),
}

// === impl Resolver ===

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("static_hosts", &self.hosts.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Build from the `[dns]` section and the lookup timeout.
    pub fn new(cfg: &DnsConfig, timeout: Duration) -> Result<Self, ResolverError> {
        let provider = TokioConnectionProvider::default();
        let mut builder = match &cfg.nameservers {
            Some(servers) => {
                let mut group = NameServerConfigGroup::new();
                for s in servers {
                    let one = NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true);
                    group.merge(one);
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    provider,
                )
            }
            None => TokioResolver::builder(provider).map_err(ResolverError::SystemConfig)?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.ndots = 0;
        // Answers come from `[dns] hosts` and the nameservers only: the pod's /etc/hosts
        // (hostname, hostAliases) must not silently override the configured resolver.
        opts.use_hosts_file = ResolveHosts::Never;
        // The gateway's answers are only as fresh as DNS says; a long negative cache would hide
        // a record the operator just added.
        opts.negative_max_ttl = Some(Duration::from_secs(30));
        opts.positive_max_ttl = Some(cfg.max_ttl);
        Ok(Resolver {
            hosts: cfg.hosts.clone(),
            dns: builder.build(),
            timeout,
        })
    }

    /// Resolve `host`: an IP literal is its own answer; a name is looked up in `hosts`, then DNS.
    /// Every error comes from DNS.
    pub async fn resolve(&self, host: &Host) -> Result<Answer, Deny> {
        let name = match host {
            Host::Ip(ip) => {
                return Ok(Answer {
                    addrs: vec![*ip],
                    from_dns: false,
                })
            }
            Host::Name(n) => n,
        };
        if let Some(ips) = self.hosts.get(&**name) {
            return Ok(Answer {
                addrs: ips.clone(),
                from_dns: false,
            });
        }
        let mut fqdn = String::with_capacity(name.len() + 1);
        fqdn.push_str(name);
        fqdn.push('.');
        let lookup = tokio::time::timeout(self.timeout, self.dns.lookup_ip(fqdn)).await;
        match lookup {
            Err(_) => Err(Deny::new(Reason::DnsTimeout, "DNS lookup timed out")),
            Ok(Err(e)) => Err(dns_refusal(&e)),
            Ok(Ok(answer)) => {
                let ips: Vec<IpAddr> = answer.iter().take(MAX_ADDRS).collect();
                if ips.is_empty() {
                    Err(Deny::new(
                        Reason::DnsNoAddresses,
                        "name has no A or AAAA records",
                    ))
                } else {
                    Ok(Answer {
                        addrs: ips,
                        from_dns: true,
                    })
                }
            }
        }
    }
}

#[cold]
fn dns_refusal(e: &hickory_resolver::ResolveError) -> Deny {
    let ResolveErrorKind::Proto(p) = e.kind() else {
        return Deny::with_detail(Reason::DnsFailed, format!("DNS lookup failed: {e}"));
    };
    match p.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain => {
                Deny::new(Reason::DnsFailed, "name does not exist (NXDOMAIN)")
            }
            ResponseCode::NoError => {
                Deny::new(Reason::DnsNoAddresses, "name has no A or AAAA records")
            }
            code => Deny::with_detail(
                Reason::DnsFailed,
                format!("DNS server answered {code} for this name"),
            ),
        },
        ProtoErrorKind::Timeout => Deny::new(Reason::DnsTimeout, "DNS lookup timed out"),
        _ => Deny::with_detail(Reason::DnsFailed, format!("DNS lookup failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A UDP nameserver on loopback that answers the n-th A query with 127.0.0.(n + 1), TTL
    /// 0xFFFFFFFF, and counts the queries. It ends with the test's runtime.
    async fn greedy_nameserver() -> (SocketAddr, Arc<AtomicUsize>) {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // Bounded: a test asks a handful of times.
            for _ in 0..64 {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries().first().cloned() else {
                    continue;
                };
                let mut resp = Message::new();
                resp.set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(OpCode::Query)
                    .set_recursion_available(true)
                    .add_query(q.clone());
                if q.query_type() == RecordType::A {
                    let nth = count.fetch_add(1, Ordering::SeqCst);
                    let ip = Ipv4Addr::new(127, 0, 0, 1 + nth as u8);
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        u32::MAX,
                        RData::A(A(ip)),
                    ));
                }
                let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn a_huge_ttl_is_cached_for_max_ttl_only() {
        let (ns, asked) = greedy_nameserver().await;
        let cfg = DnsConfig {
            nameservers: Some(vec![ns]),
            hosts: HashMap::new(),
            max_ttl: Duration::from_millis(600),
        };
        let resolver = Resolver::new(&cfg, Duration::from_secs(5)).unwrap();
        let host = Host::Name("huge-ttl.test".into());
        let first = resolver.resolve(&host).await.unwrap().addrs;
        assert_eq!(first, [IpAddr::from([127, 0, 0, 1])]);
        let a_queries = asked.load(Ordering::SeqCst);
        assert_eq!(
            resolver.resolve(&host).await.unwrap().addrs,
            first,
            "cached"
        );
        assert_eq!(
            asked.load(Ordering::SeqCst),
            a_queries,
            "served from the cache"
        );
        // Past max_ttl the answer is asked for again, though its TTL said 136 years.
        tokio::time::sleep(Duration::from_millis(900)).await;
        let again = resolver.resolve(&host).await.unwrap().addrs;
        assert!(asked.load(Ordering::SeqCst) > a_queries, "asked again");
        assert_ne!(again, first);
    }
}
