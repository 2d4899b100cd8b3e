//! Step 3: does the agent's policy admit this target?
//!
//! A [`Policy`] is built once at config load; [`Policy::check`] is the only thing the data path
//! calls. A refusal says which policy refused and what rule would fix it, so an agent (or the
//! person reading its transcript) can tell a policy decision from a network fault.

mod allowlist;

use std::sync::Arc;

use ipnet::IpNet;

pub use allowlist::{parse_rule, Allowlist, Miss, Pattern, Rule};

use crate::limits::Limits;
pub use crate::outcome::Mode;
use crate::outcome::{Deny, Reason};
use crate::target::{Kind, Target};

/// A named policy: allowlist, limits, mode and its own address exceptions.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy's name from `[policies.NAME]`.
    pub name: Arc<str>,
    /// The compiled allow rules.
    pub allowlist: Allowlist,
    /// The limits in force (the `[limits]` defaults with this policy's overrides).
    pub limits: Limits,
    /// Enforce or report.
    pub mode: Mode,
    /// Exceptions to the built-in deny set that hold only for this policy's agents.
    pub allow_cidrs: Vec<IpNet>,
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
