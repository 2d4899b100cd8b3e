//! Step 3: does the agent's policy admit this target?
//!
//! A [`Policy`] is built once at config load; [`Policy::check`] is the only thing the data path
//! calls. A refusal says which policy refused and what rule would fix it, so an agent (or the
//! person reading its transcript) can tell a policy decision from a network fault.

mod allowlist;

use std::sync::Arc;

pub use allowlist::{parse_rule, Allowlist, Miss, Pattern, Rule};

use crate::outcome::{Deny, Reason};
use crate::target::{Kind, Target};

/// A named policy: its allowlist (limits and mode arrive with the per-agent work).
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy's name from `[policies.NAME]`.
    pub name: Arc<str>,
    /// The compiled allow rules.
    pub allowlist: Allowlist,
}

// === impl Policy ===

impl Policy {
    /// The rule admitting `target`, or a refusal naming the policy and the fix.
    pub fn check(&self, kind: Kind, target: &Target) -> Result<&Rule, Deny> {
        self.allowlist
            .check(kind, target)
            .map_err(|miss| self.refusal(miss, kind, target))
    }

    #[cold]
    fn refusal(&self, miss: Miss, kind: Kind, target: &Target) -> Deny {
        let name = &self.name;
        match miss {
            Miss::Host => Deny::with_detail(
                Reason::HostNotAllowed,
                format!(
                    "host not on allowlist of policy {name} (to allow it, add `{}` to policy {name})",
                    target.host
                ),
            ),
            Miss::Port => {
                let usual = match kind {
                    Kind::Connect => 443,
                    Kind::Http => 80,
                };
                Deny::with_detail(
                    Reason::PortNotAllowed,
                    format!(
                        "port {} not allowed for this host by policy {name} (rules without a port admit only {usual} here; to allow it, add `{target}`)",
                        target.port
                    ),
                )
            }
            Miss::IpLiteral => Deny::with_detail(
                Reason::IpLiteralNotAllowed,
                format!(
                    "IP-literal targets are denied unless policy {name} names the address; use the host name"
                ),
            ),
        }
    }
}
