//! Step 3: does the agent's policy admit this target?
//!
//! A [`Policy`] is built once at config load; [`Policy::check`] is the only thing the data path
//! calls. A refusal says which policy refused and what rule would fix it, so an agent (or the
//! person reading its transcript) can tell a policy decision from a network fault.
//!
//! The deny rules ([`Denylist`]: `deny` and `deny_files`) are checked first and win over any
//! allow rule; then the allowlist, or, for an open-web policy (`allow = ["*"]`), any name on the
//! rule's ports. Destination vetting comes later in the pipeline and is the same for both kinds
//! of policy.

mod allowlist;
pub mod deny_file;
mod denylist;

use std::sync::Arc;

use ipnet::IpNet;

pub use allowlist::{
    open_web_rule, parse_rule, parse_rule_as, Allowlist, Miss, Pattern, Rule, RuleUse,
};
pub use denylist::{DenyFile, DenyHit, DenySet, Denylist, HitPattern, Inserted, SetHit};

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
    /// The deny rules, which win over the allow rules.
    pub deny: Denylist,
    /// The limits in force (the `[limits]` defaults with this policy's overrides).
    pub limits: Limits,
    /// Enforce or report.
    pub mode: Mode,
    /// Exceptions to the built-in deny set that hold only for this policy's agents.
    pub allow_cidrs: Vec<IpNet>,
    /// The hosts this policy's CONNECTs are intercepted for (`[[policies.NAME.intercept]]`).
    pub intercept: crate::intercept::Intercepts,
}

// === impl Policy ===

impl Policy {
    /// The rule admitting `target`, or a refusal naming the policy and the fix (for a deny
    /// rule: the rule and where it is written).
    #[inline]
    pub fn check(&self, kind: Kind, target: &Target) -> Result<&Rule, Deny> {
        if let Some(hit) = self.deny.check(target) {
            return Err(self.denied(&hit));
        }
        self.allowlist
            .check(kind, target)
            .map_err(|miss| self.refusal(miss, kind, target))
    }

    /// The deny rule refusing `target`, if one does (for the audit line, `explain`, `propose`).
    pub fn denied_by(&self, target: &Target) -> Option<DenyHit<'_>> {
        self.deny.check(target)
    }

    /// True for an open-web policy (`allow = ["*"]`).
    pub fn is_open_web(&self) -> bool {
        self.allowlist.is_open_web()
    }

    #[cold]
    fn denied(&self, hit: &DenyHit<'_>) -> Deny {
        let name = &self.name;
        let rule = hit.rule;
        let detail = match hit.file {
            Some(f) => format!(
                "host is denied by rule `{rule}` of policy {name} (deny list {}, line {})",
                f.shown, rule.origin
            ),
            None => format!("host is denied by rule `{rule}` of policy {name}"),
        };
        Deny::with_detail(Reason::HostDenied, detail)
    }

    #[cold]
    fn refusal(&self, miss: Miss, kind: Kind, target: &Target) -> Deny {
        let name = &self.name;
        if self.is_open_web() {
            return self.open_web_refusal(miss, kind, target);
        }
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

    /// An open-web policy refuses only a port its rule does not cover and IP literals.
    #[cold]
    fn open_web_refusal(&self, miss: Miss, kind: Kind, target: &Target) -> Deny {
        let name = &self.name;
        match miss {
            Miss::IpLiteral => Deny::with_detail(
                Reason::IpLiteralNotAllowed,
                format!(
                    "open-web policy {name} admits host names only, never IP-literal targets; use the host name"
                ),
            ),
            Miss::Host | Miss::Port => {
                let ports = match (self.allowlist.rules().first().and_then(|r| r.port), kind) {
                    (Some(p), _) => p,
                    (None, Kind::Connect) => 443,
                    (None, Kind::Http) => 80,
                };
                Deny::with_detail(
                    Reason::PortNotAllowed,
                    format!(
                        "port {} not allowed by open-web policy {name}, which admits port {ports} here",
                        target.port
                    ),
                )
            }
        }
    }
}
