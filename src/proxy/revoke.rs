//! Revocation: what admitted an open tunnel or client connection is checked again whenever the
//! live config or a token changes, and the connection is closed when it no longer holds.
//!
//! Lifecycle: every request subscribes to [`Live::subscribe`] before it loads its snapshot, so
//! no change after that load goes unseen. An admitted request leaves a [`Grant`]: the agent it
//! was admitted as, the credentials it presented and its target. A tunnel keeps its grant and a
//! [`Watch`] for its whole life; a client connection keeps the grant of its latest admitted
//! request in its [`Granted`] slot and waits on its own subscription. On each change the holder
//! runs [`Grant::recheck`] on the new snapshot: the client must still be identified as the same
//! agent (same address class, a token that still matches, a certificate still valid) and, in
//! enforce mode, the agent's policy must still allow the target. A connection that fails is
//! closed at once and audited `revoked`; one that passes is left alone, so an unrelated reload
//! drops nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::PROXY_AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use tokio::sync::watch;

use crate::identity::PeerCert;
use crate::outcome::{Deny, Reason};
use crate::policy::Mode;
use crate::reload::{Live, Snapshot};
use crate::target::{Kind, Target};

/// What admitted a request, kept to check it again under a later snapshot.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The agent the request was admitted as.
    pub agent: Arc<str>,
    /// The client's address.
    pub client: SocketAddr,
    /// The first two `Proxy-Authorization` values sent (two make the credentials malformed,
    /// which must stay so when identified again).
    pub authorization: [Option<HeaderValue>; 2],
    /// The verified client certificate of a TLS connection.
    pub cert: Option<Arc<PeerCert>>,
    /// Tunnel or plain HTTP.
    pub kind: Kind,
    /// Where the request went.
    pub target: Target,
}

/// The grant of a client connection's latest admitted request.
#[derive(Debug, Default)]
pub struct Granted(parking_lot::Mutex<Option<Grant>>);

/// A tunnel's view of the changes that may revoke it.
#[derive(Debug)]
pub struct Watch {
    /// Where the current snapshot is.
    pub live: Arc<Live>,
    /// Subscribed before the snapshot that admitted the tunnel was loaded.
    pub changes: watch::Receiver<u64>,
    /// What admitted the tunnel.
    pub grant: Grant,
}

// === impl Grant ===

impl Grant {
    /// The grant of a request admitted as `agent` to `target`, with the credentials in
    /// `headers` and the connection's certificate.
    pub fn new(
        agent: Arc<str>,
        client: SocketAddr,
        headers: &HeaderMap,
        cert: Option<Arc<PeerCert>>,
        kind: Kind,
        target: Target,
    ) -> Grant {
        let mut values = headers.get_all(PROXY_AUTHORIZATION).iter().cloned();
        Grant {
            agent,
            client,
            authorization: [values.next(), values.next()],
            cert,
            kind,
            target,
        }
    }

    /// `Ok` while `snap` (at `now`, Unix seconds) still admits this grant: the client is
    /// identified as the same agent, and an enforcing policy of that agent allows the target.
    /// Limits are not checked again: they govern new requests, not open ones.
    pub fn recheck(&self, snap: &Snapshot, now: i64) -> Result<(), Deny> {
        let cfg = &snap.config;
        let mut headers = HeaderMap::new();
        for v in self.authorization.iter().flatten() {
            headers.append(PROXY_AUTHORIZATION, v.clone());
        }
        let id = cfg
            .agents
            .identify(
                &snap.tokens,
                self.client,
                &headers,
                self.cert.as_deref(),
                now,
            )
            .map_err(|deny| {
                revoked(format!(
                    "the client no longer identifies as agent {}: {}",
                    self.agent,
                    deny.reason.as_str()
                ))
            })?;
        let agent = cfg.agents.get(id);
        if agent.name != self.agent {
            return Err(revoked(format!(
                "the client now identifies as agent {}, not {}",
                agent.name, self.agent
            )));
        }
        let policy = cfg.policy_of(agent);
        // Report mode admits what its allowlist refuses; it keeps doing so for open tunnels.
        if policy.mode == Mode::Enforce {
            policy.check(self.kind, &self.target).map_err(|deny| {
                revoked(format!(
                    "policy {} no longer allows {}:{} ({})",
                    policy.name,
                    self.target.host,
                    self.target.port,
                    deny.reason.as_str()
                ))
            })?;
        }
        Ok(())
    }
}

fn revoked(detail: String) -> Deny {
    Deny::with_detail(Reason::Revoked, detail)
}

// === impl Granted ===

impl Granted {
    /// Keep `grant` as the connection's latest.
    pub fn set(&self, grant: Grant) {
        *self.0.lock() = Some(grant);
    }

    /// Check the latest grant, if any, under `snap`.
    pub fn recheck(&self, snap: &Snapshot, now: i64) -> Result<(), Deny> {
        match &*self.0.lock() {
            Some(grant) => grant.recheck(snap, now),
            None => Ok(()),
        }
    }
}

// === impl Watch ===

impl Watch {
    /// Completes with the refusal when a change revokes the tunnel; never completes while every
    /// change leaves it admitted (or once the live config is gone, at shutdown).
    pub async fn revoked(&mut self) -> Deny {
        loop {
            if self.changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            let snap = self.live.load();
            if let Err(deny) = self.grant.recheck(&snap, super::unix_now()) {
                return deny;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::metrics::Metrics;
    use crate::target::Host;

    const NOW: i64 = 1_800_000_000;

    fn snapshot(agents_and_policies: &str) -> Snapshot {
        let src = format!("[server]\nlisten = \"127.0.0.1:0\"\n{agents_and_policies}");
        let config = crate::config::parse(std::path::Path::new("t.toml"), &src).unwrap();
        Snapshot::build(config, &[], None, &Metrics::new().unwrap()).unwrap()
    }

    fn grant(agent: &str, client: [u8; 4], host: &str, port: u16) -> Grant {
        Grant::new(
            agent.into(),
            (client, 40000).into(),
            &HeaderMap::new(),
            None,
            Kind::Connect,
            Target {
                host: Host::Name(host.into()),
                port,
            },
        )
    }

    const BASE: &str = r#"
[[agents]]
name = "a"
source_cidrs = ["10.0.0.0/8"]
policy = "p"
"#;

    #[test]
    fn a_grant_holds_while_the_same_agent_may_reach_the_target() {
        let snap = snapshot(&format!("{BASE}[policies.p]\nallow = [\"x.test:443\"]\n"));
        let g = grant("a", [10, 1, 2, 3], "x.test", 443);
        assert_eq!(g.recheck(&snap, NOW).map_err(|d| d.reason), Ok(()));
    }

    #[test]
    fn what_revokes_a_grant() {
        let snap = snapshot(&format!("{BASE}[policies.p]\nallow = [\"x.test:443\"]\n"));
        let table = [
            ("another port", grant("a", [10, 1, 2, 3], "x.test", 8443)),
            ("another host", grant("a", [10, 1, 2, 3], "y.test", 443)),
            ("an agent gone", grant("gone", [10, 1, 2, 3], "x.test", 443)),
            (
                "an address no agent claims",
                grant("a", [192, 0, 2, 1], "x.test", 443),
            ),
        ];
        for (case, g) in table {
            let deny = g.recheck(&snap, NOW).expect_err(case);
            assert_eq!(deny.reason, Reason::Revoked, "{case}");
            assert!(!deny.detail.is_empty(), "{case}");
        }
    }

    #[test]
    fn report_mode_keeps_what_its_allowlist_refuses_but_not_a_lost_identity() {
        let snap = snapshot(&format!(
            "{BASE}[policies.p]\nmode = \"report\"\nallow = [\"x.test:443\"]\n"
        ));
        assert!(grant("a", [10, 1, 2, 3], "y.test", 443)
            .recheck(&snap, NOW)
            .is_ok());
        assert!(grant("a", [192, 0, 2, 1], "x.test", 443)
            .recheck(&snap, NOW)
            .is_err());
    }
}
