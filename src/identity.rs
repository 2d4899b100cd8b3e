//! Step 1: which agent is asking.
//!
//! Agents are matched in config order, first match wins. This step knows the client's source
//! address only; credentials (Proxy-Authorization) and client certificates add further ways to
//! match without changing the shape: `identify` returns the agent or a refusal.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::outcome::{Deny, Reason};

/// Index of an agent in [`Agents`]; cheap to copy, valid for the config it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentId(pub usize);

/// One `[[agents]]` entry, validated.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The agent's name (audit lines and, later, metric labels).
    pub name: Arc<str>,
    /// Source address classes (pod CIDRs) that identify this agent.
    pub source_cidrs: Vec<IpNet>,
    /// Index of the agent's policy in the config's policy table.
    pub policy: usize,
}

/// The ordered agent table.
#[derive(Clone, Debug, Default)]
pub struct Agents {
    agents: Vec<Agent>,
}

// === impl Agents ===

impl Agents {
    /// Build from validated agents, in config order.
    pub fn new(agents: Vec<Agent>) -> Self {
        Agents { agents }
    }

    /// The agent with this id.
    pub fn get(&self, id: AgentId) -> &Agent {
        &self.agents[id.0]
    }

    /// All agents, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Agent> {
        self.agents.iter()
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when no agent is configured.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The first agent whose source CIDRs contain the client's address.
    pub fn identify(&self, client: SocketAddr) -> Result<AgentId, Deny> {
        let ip = canonical(client.ip());
        self.agents
            .iter()
            .position(|a| a.source_cidrs.iter().any(|n| n.contains(&ip)))
            .map(AgentId)
            .ok_or(Deny::new(
                Reason::UnknownAgent,
                "client address matches no [[agents]] entry",
            ))
    }
}

/// A client on a dual-stack listener shows up as `::ffff:a.b.c.d`; match it as the IPv4 it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, cidrs: &[&str]) -> Agent {
        Agent {
            name: name.into(),
            source_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            policy: 0,
        }
    }

    #[test]
    fn first_match_wins() {
        let agents = Agents::new(vec![
            agent("narrow", &["127.0.0.10/32"]),
            agent("wide", &["127.0.0.0/8", "::1/128"]),
        ]);
        let id = |s: &str| {
            agents
                .identify(s.parse().unwrap())
                .map(|a| &*agents.get(a).name)
        };
        assert_eq!(id("127.0.0.10:1000"), Ok("narrow"));
        assert_eq!(id("127.0.0.11:1000"), Ok("wide"));
        assert_eq!(
            id("[::ffff:127.0.0.10]:1000"),
            Ok("narrow"),
            "mapped client address"
        );
        assert_eq!(id("[::1]:1000"), Ok("wide"));
        assert_eq!(
            id("192.0.2.1:1000").unwrap_err().reason,
            Reason::UnknownAgent
        );
    }
}
