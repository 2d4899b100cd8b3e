//! Deny rules: a policy's `deny = [...]` and the lists its `deny_files` name, and the compact set
//! that holds up to millions of them.
//!
//! A deny rule is written in the allow-rule grammar (`host`, `*.domain`, either with `:port`, IP
//! literals), with two differences that only make a deny rule refuse more: without a port it
//! refuses *every* port (an allow rule without one admits only 443 and 80), and `*.tld` is
//! accepted (deny all of `.zip`), where an allow rule refuses it as too broad.
//!
//! # The set
//!
//! Public blocklists run to a million names, so a [`DenySet`] is laid out for memory and for a
//! lookup that does not slow down as it grows. Every port-less name rule lives in one byte arena
//! as a record `[len: u8][exact origin: u32][below origin: u32][name]`, and a `hashbrown`
//! [`HashTable`] of `u32` arena offsets indexes the records by name: no per-name allocation, no
//! pointer, no hash stored (the table keeps 7 bits of it in its control bytes). An origin is the
//! 1-based line of a list file (or index + 1 of a `deny` rule); 0 means "no such rule", so one
//! record holds both `name` and `*.name`.
//!
//! A lookup is what [`super::Allowlist`] does: one hash probe for the exact name, then one per
//! label-boundary suffix for the `*.` rules (skipping the top-level label unless a `*.tld` rule
//! exists), so it costs O(labels) whatever the number of rules, allocates nothing, and a
//! `*.example.com` rule can only match at a label boundary below `example.com`. Rules with a port
//! and IP-literal rules are rare; they sit in small side maps probed only when not empty.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hashbrown::HashTable;

use super::allowlist::Pattern;
use crate::target::{Host, Target};

/// Keys come from the config and its lists; lookups hash client-chosen names but can only probe
/// chains the config built, so a fast seeded hash is safe here (as in the allowlist).
type Hasher = foldhash::fast::RandomState;

/// Bytes of a record before its name: length, exact origin, below origin.
const HEADER: usize = 9;

/// Port-specific name rules: name → (port, origin).
type PortRules = HashMap<Box<str>, Vec<(u16, u32)>, Hasher>;

/// A set of deny rules (see the module docs for the layout).
#[derive(Clone, Default)]
pub struct DenySet {
    arena: Vec<u8>,
    table: HashTable<u32>,
    hasher: Hasher,
    port_exact: PortRules,
    port_below: PortRules,
    ips: HashMap<IpAddr, Vec<(Option<u16>, u32)>, Hasher>,
    /// A `*.tld` rule exists, so lookups probe the last label too.
    tld_below: bool,
    rules: usize,
}

/// What [`DenySet::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new rule.
    New,
    /// The same pattern and port were already in the set (the first origin is kept).
    Duplicate,
    /// The set cannot address more names (its arena passed 4 GiB); the rule was not added.
    Full,
}

/// The rule of a [`DenySet`] that matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetHit<'a> {
    /// What the rule names.
    pub pattern: HitPattern<'a>,
    /// The rule's port; `None` refuses every port.
    pub port: Option<u16>,
    /// Where the rule came from: the 1-based line of a list file, or index + 1 of a `deny` rule.
    pub origin: u32,
}

/// The pattern of a matched rule, borrowed from the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HitPattern<'a> {
    /// Exactly this name.
    Exact(&'a str),
    /// Any name below this suffix (`*.suffix`).
    Below(&'a str),
    /// This IP literal.
    Ip(IpAddr),
}

// === impl DenySet ===

impl DenySet {
    /// An empty set with room for `rules` port-less names of about `name_bytes` bytes in all.
    pub fn with_capacity(rules: usize, name_bytes: usize) -> Self {
        DenySet {
            arena: Vec::with_capacity(name_bytes + rules * HEADER),
            table: HashTable::with_capacity(rules),
            ..DenySet::default()
        }
    }

    /// Add a parsed rule with its origin (1-based; see [`SetHit::origin`]).
    pub fn insert(&mut self, pattern: Pattern, port: Option<u16>, origin: u32) -> Inserted {
        let (below, name) = match pattern {
            Pattern::Ip(ip) => {
                let slot = self.ips.entry(ip).or_default();
                if slot.iter().any(|&(p, _)| p == port) {
                    return Inserted::Duplicate;
                }
                slot.push((port, origin));
                self.rules += 1;
                return Inserted::New;
            }
            Pattern::Exact(n) => (false, n),
            Pattern::Below(n) => (true, n),
        };
        if below && !name.contains('.') {
            self.tld_below = true;
        }
        if let Some(port) = port {
            let map = if below {
                &mut self.port_below
            } else {
                &mut self.port_exact
            };
            let slot = map.entry(name).or_default();
            if slot.iter().any(|&(p, _)| p == port) {
                return Inserted::Duplicate;
            }
            slot.push((port, origin));
            self.rules += 1;
            return Inserted::New;
        }
        let hash = self.hasher.hash_one(name.as_bytes());
        let at = if below { 5 } else { 1 };
        if let Some(&off) = self
            .table
            .find(hash, |&o| name_at(&self.arena, o) == name.as_bytes())
        {
            let field = off as usize + at;
            if read_u32(&self.arena, field) != 0 {
                return Inserted::Duplicate;
            }
            self.arena[field..field + 4].copy_from_slice(&origin.to_le_bytes());
            self.rules += 1;
            return Inserted::New;
        }
        // Names are valid DNS names (at most 253 bytes), so the length fits the header's byte.
        let (Ok(off), Ok(len)) = (u32::try_from(self.arena.len()), u8::try_from(name.len())) else {
            return Inserted::Full;
        };
        let (exact, below_origin) = if below { (0, origin) } else { (origin, 0) };
        self.arena.push(len);
        self.arena.extend_from_slice(&exact.to_le_bytes());
        self.arena.extend_from_slice(&below_origin.to_le_bytes());
        self.arena.extend_from_slice(name.as_bytes());
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table
            .insert_unique(hash, off, |&o| hasher.hash_one(name_at(arena, o)));
        self.rules += 1;
        Inserted::New
    }

    /// Give back the slack of building (the arena's and the table's growth reserve).
    pub fn shrink_to_fit(&mut self) {
        self.arena.shrink_to_fit();
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table
            .shrink_to_fit(|&o| hasher.hash_one(name_at(arena, o)));
    }

    /// Number of rules (`name` and `*.name` count as two).
    pub fn len(&self) -> usize {
        self.rules
    }

    /// True when the set refuses nothing.
    pub fn is_empty(&self) -> bool {
        self.rules == 0
    }

    /// Heap bytes the set holds (arena, table and side maps' main allocations): what a list
    /// costs in memory, for `check` and the docs.
    pub fn heap_bytes(&self) -> usize {
        let side = |m: &PortRules| {
            m.iter()
                .map(|(k, v)| k.len() + v.capacity() * 8 + 48)
                .sum::<usize>()
        };
        self.arena.capacity()
            + self.table.allocation_size()
            + side(&self.port_exact)
            + side(&self.port_below)
            + self.ips.len() * 64
    }

    /// The rule refusing `target`, if any: an exact name first, then the longest `*.` suffix.
    pub fn check(&self, target: &Target) -> Option<SetHit<'_>> {
        let port = target.port;
        let name = match &target.host {
            Host::Ip(ip) => {
                let (ip, rules) = self.ips.get_key_value(ip)?;
                return rules
                    .iter()
                    .find(|(p, _)| p.map_or(true, |p| p == port))
                    .map(|&(port, origin)| SetHit {
                        pattern: HitPattern::Ip(*ip),
                        port,
                        origin,
                    });
            }
            Host::Name(n) => &**n,
        };
        if let Some(hit) = self.probe(name, false, port) {
            return Some(hit);
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if !self.tld_below && !suffix.contains('.') {
                break;
            }
            if let Some(hit) = self.probe(suffix, true, port) {
                return Some(hit);
            }
            rest = suffix;
        }
        None
    }

    /// One name: the port-less record, then the port-specific rules.
    #[inline]
    fn probe(&self, name: &str, below: bool, port: u16) -> Option<SetHit<'_>> {
        if !self.table.is_empty() {
            let hash = self.hasher.hash_one(name.as_bytes());
            if let Some(&off) = self
                .table
                .find(hash, |&o| name_at(&self.arena, o) == name.as_bytes())
            {
                let origin = read_u32(&self.arena, off as usize + if below { 5 } else { 1 });
                if origin != 0 {
                    // The arena's copy: the hit may outlive the caller's name.
                    let stored = std::str::from_utf8(name_at(&self.arena, off)).unwrap_or("");
                    return Some(SetHit {
                        pattern: if below {
                            HitPattern::Below(stored)
                        } else {
                            HitPattern::Exact(stored)
                        },
                        port: None,
                        origin,
                    });
                }
            }
        }
        let map = if below {
            &self.port_below
        } else {
            &self.port_exact
        };
        if map.is_empty() {
            return None;
        }
        let (stored, rules) = map.get_key_value(name)?;
        let &(p, origin) = rules.iter().find(|(p, _)| *p == port)?;
        Some(SetHit {
            pattern: if below {
                HitPattern::Below(stored)
            } else {
                HitPattern::Exact(stored)
            },
            port: Some(p),
            origin,
        })
    }
}

impl fmt::Debug for DenySet {
    // Not the entries: a set can hold a million of them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenySet")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// The name of the record at `off`. Offsets come only from the table, which holds only offsets
/// of records this set wrote, so the slice is in bounds; an empty name is returned otherwise.
#[inline]
fn name_at(arena: &[u8], off: u32) -> &[u8] {
    let off = off as usize;
    let len = arena.get(off).map_or(0, |&l| usize::from(l));
    arena
        .get(off + HEADER..off + HEADER + len)
        .unwrap_or_default()
}

#[inline]
fn read_u32(arena: &[u8], at: usize) -> u32 {
    arena
        .get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

// === impl SetHit ===

impl fmt::Display for SetHit<'_> {
    /// The rule as the grammar writes it: `name`, `*.name`, `203.0.113.7`, `[2001:db8::1]`,
    /// each with `:port` when it has one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pattern {
            HitPattern::Exact(n) => f.write_str(n)?,
            HitPattern::Below(n) => write!(f, "*.{n}")?,
            HitPattern::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
            HitPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// A loaded `deny_files` list, shared by every policy that names it.
#[derive(Debug)]
pub struct DenyFile {
    /// The file as the config names it (shown in refusals: a path relative to the config file
    /// stays relative).
    pub shown: Arc<str>,
    /// The file's path (relative names resolved against the config file's directory).
    pub path: PathBuf,
    /// Its rules; origins are line numbers.
    pub set: DenySet,
}

/// A policy's deny rules: its own `deny` list and the lists of its `deny_files`.
#[derive(Clone, Debug, Default)]
pub struct Denylist {
    rules: DenySet,
    files: Vec<Arc<DenyFile>>,
}

/// The deny rule that refused a target, and where it is written.
#[derive(Clone, Copy, Debug)]
pub struct DenyHit<'a> {
    /// The rule.
    pub rule: SetHit<'a>,
    /// Its list: `None` for the policy's own `deny`, else the file.
    pub file: Option<&'a DenyFile>,
}

// === impl Denylist ===

impl Denylist {
    /// The policy's own rules (origins: index + 1 in `deny`) and its lists.
    pub fn new(rules: DenySet, files: Vec<Arc<DenyFile>>) -> Self {
        Denylist { rules, files }
    }

    /// The first rule refusing `target`: the policy's own rules, then each file in order.
    #[inline]
    pub fn check(&self, target: &Target) -> Option<DenyHit<'_>> {
        if !self.rules.is_empty() {
            if let Some(rule) = self.rules.check(target) {
                return Some(DenyHit { rule, file: None });
            }
        }
        self.files.iter().find_map(|f| {
            f.set.check(target).map(|rule| DenyHit {
                rule,
                file: Some(f),
            })
        })
    }

    /// True when the policy has no deny rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.files.iter().all(|f| f.set.is_empty())
    }

    /// The policy's own `deny` rules.
    pub fn rules(&self) -> &DenySet {
        &self.rules
    }

    /// The lists of its `deny_files`, in config order.
    pub fn files(&self) -> &[Arc<DenyFile>] {
        &self.files
    }
}

// === impl DenyHit ===

impl DenyHit<'_> {
    /// Where the rule is written: `deny[2]` or `lists/exfil.txt:17`.
    pub fn source(&self) -> String {
        match self.file {
            Some(f) => format!("{}:{}", f.shown, self.rule.origin),
            None => format!("deny[{}]", self.rule.origin.saturating_sub(1)),
        }
    }
}

#[cfg(test)]
#[path = "denylist_tests.rs"]
mod tests;
