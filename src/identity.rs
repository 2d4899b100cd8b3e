//! Step 1: which agent is asking.
//!
//! Agents are matched in config order, first match wins. An agent is identified by its source
//! address class (`source_cidrs`), by a token (`Proxy-Authorization: Basic base64(name:token)`
//! with the token read from `token_file`), by a client certificate on the TLS listener
//! (`spiffe_id` = a URI SAN, `cert_subject` = the CN), or by several of these (then all must
//! hold). A client that presents credentials or a certificate but matches no agent, or names an
//! agent with the wrong token, gets 407 `auth_failed`, with one text whichever it was (the
//! detail, which tells them apart, goes to the audit line only); one that presents none where an agent needs them gets
//! 407 with a challenge; otherwise an unmatched client gets 403 `unknown_agent`.
//!
//! Tokens are compared in constant time and are never logged. They are re-read from their files
//! by [`Token::refresh`] (called by `reload` every second), so a rotated Kubernetes Secret takes
//! effect without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;
use ipnet::IpNet;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;

use crate::outcome::{Deny, Reason};

/// Longest token accepted from a file or a client (a Secret holds a short random string).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Index of an agent in [`Agents`]; cheap to copy, valid for the config it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentId(pub usize);

/// A proxy token read from a file.
#[derive(Debug)]
pub struct Token {
    path: PathBuf,
    /// The token; empty once revoked (an empty secret matches nothing).
    secret: ArcSwap<Vec<u8>>,
    /// Consecutive refreshes that found the file missing, unreadable or empty.
    misses: AtomicU32,
    /// A new token read once: applied when the next read finds the same bytes (a writer that
    /// truncates and then writes must not make a half-written token live).
    pending: Mutex<Option<Vec<u8>>>,
}

/// After this many consecutive missing or empty reads (one a second) the token is revoked: the
/// kubelet swaps Secret files atomically, so a file that stays gone means the key was removed.
pub const REVOKE_AFTER_MISSES: u32 = 3;

/// The live proxy tokens of an agent table, aligned with it: the self-refreshing store that
/// the reload snapshot holds (the config names only the files).
#[derive(Debug, Default)]
pub struct Tokens {
    by_agent: Vec<Option<Arc<Token>>>,
}

/// One `[[agents]]` entry, validated.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The agent's name (audit lines, metric labels, the Basic user name).
    pub name: Arc<str>,
    /// Source address classes (pod CIDRs) that identify this agent; empty = any address.
    pub source_cidrs: Vec<IpNet>,
    /// The file holding the token the agent must present, if it is identified by one. The
    /// token itself lives in the reload snapshot's [`Tokens`].
    pub token_file: Option<PathBuf>,
    /// What the agent's client certificate must say, if it is identified by one.
    pub cert: Option<CertId>,
    /// Index of the agent's policy in the config's policy table.
    pub policy: usize,
}

/// What a client certificate must say for an agent to match; every field given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertId {
    /// A URI SAN the certificate must carry (`spiffe_id`).
    pub spiffe_id: Option<String>,
    /// The subject common name the certificate must have (`cert_subject`).
    pub subject: Option<String>,
}

/// What a verified client certificate says about who the client is (from `tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The URI subject alternative names (SPIFFE IDs).
    pub uris: Vec<String>,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// Why the certificate cannot name one identity (two URI SANs, two subject CNs), if so.
    /// Such a certificate never identifies a certificate agent.
    pub ambiguous: Option<&'static str>,
    /// The validity of the presented chain, in Unix seconds: the latest `notBefore` and the
    /// earliest `notAfter` of its certificates. An identity from it holds only in between.
    pub valid: std::ops::RangeInclusive<i64>,
}

/// The ordered agent table.
#[derive(Clone, Debug, Default)]
pub struct Agents {
    agents: Vec<Agent>,
    any_token: bool,
    any_cert: bool,
}

/// Why a token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty (after trimming whitespace) or too long.
    #[error("token file {} must hold 1 to {MAX_TOKEN_BYTES} bytes (surrounding whitespace is ignored)", path.display())]
    Length {
        /// The file.
        path: PathBuf,
    },
}

// === impl Token ===

impl Token {
    /// Read the token from `path`.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let secret = read_token(path)?;
        Ok(Token {
            path: path.to_owned(),
            secret: ArcSwap::from_pointee(secret),
            misses: AtomicU32::new(0),
            pending: Mutex::new(None),
        })
    }

    /// A token whose file could not be read at load: it matches nothing until the file appears
    /// (picked up by [`Token::refresh`]). Starting revoked keeps a gateway whose Secret key was
    /// removed running for every other agent.
    pub fn revoked(path: &Path) -> Self {
        Token {
            path: path.to_owned(),
            secret: ArcSwap::from_pointee(Vec::new()),
            misses: AtomicU32::new(REVOKE_AFTER_MISSES),
            pending: Mutex::new(None),
        }
    }

    /// The file the token comes from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-read the file; returns true if the token changed. A new token is applied once two
    /// reads in a row find it (`at_once`, for SIGHUP: on the first). A missing, unreadable or
    /// empty file keeps the old token for a moment and revokes it after
    /// [`REVOKE_AFTER_MISSES`] reads in a row; the error is returned for logging.
    pub fn refresh(&self, at_once: bool) -> Result<bool, TokenError> {
        let fresh = match read_token(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let misses = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
                if misses >= REVOKE_AFTER_MISSES && !self.secret.load().is_empty() {
                    self.secret.store(Arc::new(Vec::new()));
                    tracing::warn!(file = %self.path.display(), "token file gone: token revoked");
                }
                return Err(e);
            }
        };
        self.misses.store(0, Ordering::Relaxed);
        let mut pending = self.pending.lock();
        if **self.secret.load() == fresh {
            *pending = None;
            return Ok(false);
        }
        if !at_once && pending.as_ref() != Some(&fresh) {
            *pending = Some(fresh);
            return Ok(false);
        }
        *pending = None;
        self.secret.store(Arc::new(fresh));
        Ok(true)
    }

    /// True when the token has been revoked (its file stayed missing or empty).
    pub fn is_revoked(&self) -> bool {
        self.secret.load().is_empty()
    }

    /// Constant-time comparison with a presented token. An empty secret (revoked) matches
    /// nothing, not even an empty presented token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let secret = self.secret.load();
        !secret.is_empty() && bool::from(secret.as_slice().ct_eq(presented))
    }
}

fn read_token(path: &Path) -> Result<Vec<u8>, TokenError> {
    use std::io::Read;
    let read_err = |source| TokenError::Read {
        path: path.to_owned(),
        source,
    };
    // Bounded: a path naming a device or a huge file must not exhaust memory (one byte past
    // the longest padded token is enough to refuse it).
    let limit = (2 * MAX_TOKEN_BYTES + 1) as u64;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit).read_to_end(&mut bytes))
        .map_err(read_err)?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() || trimmed.len() > MAX_TOKEN_BYTES || bytes.len() as u64 == limit {
        return Err(TokenError::Length {
            path: path.to_owned(),
        });
    }
    Ok(trimmed.to_vec())
}

// === impl Tokens ===

impl Tokens {
    /// The tokens of `agents`. A token file that `prev` already watches keeps its store (its
    /// current token and its count of missing reads: a reload neither re-reads it nor resets
    /// the grace before revocation); a new one is read now, and starts revoked if it cannot
    /// be (validation has warned about it).
    pub fn load(agents: &Agents, prev: Option<&Tokens>) -> Tokens {
        let watched: Vec<&Arc<Token>> = prev
            .map(|p| p.by_agent.iter().flatten().collect())
            .unwrap_or_default();
        let by_agent = agents
            .iter()
            .map(|a| {
                let path = a.token_file.as_deref()?;
                if let Some(t) = watched.iter().find(|t| t.path() == path) {
                    return Some(Arc::clone(t));
                }
                Some(Arc::new(
                    Token::load(path).unwrap_or_else(|_| Token::revoked(path)),
                ))
            })
            .collect();
        Tokens { by_agent }
    }

    /// The token of an agent, if it has one.
    pub fn get(&self, agent: AgentId) -> Option<&Token> {
        self.by_agent.get(agent.0)?.as_deref()
    }

    /// Every token, with the name of its agent.
    pub fn iter<'a>(&'a self, agents: &'a Agents) -> impl Iterator<Item = (&'a str, &'a Token)> {
        agents
            .iter()
            .zip(&self.by_agent)
            .filter_map(|(a, t)| Some((&*a.name, t.as_deref()?)))
    }
}

// === impl Agents ===

impl Agents {
    /// Build from validated agents, in config order.
    pub fn new(agents: Vec<Agent>) -> Self {
        let any_token = agents.iter().any(|a| a.token_file.is_some());
        let any_cert = agents.iter().any(|a| a.cert.is_some());
        Agents {
            agents,
            any_token,
            any_cert,
        }
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

    /// True when some agent is identified by a token (unmatched clients then get 407).
    pub fn uses_tokens(&self) -> bool {
        self.any_token
    }

    /// The first agent that matches the client's address, certificate and credentials. `cert`
    /// is the verified client certificate of a TLS connection, if one was presented.
    ///
    /// Credentials only matter to token agents: an address-only agent is matched whatever
    /// `Proxy-Authorization` holds (its client may send credentials meant for another proxy).
    /// Malformed credentials count as no usable credentials; they are the refusal only when no
    /// agent matches at all. Likewise a certificate only matters to certificate agents.
    /// `tokens` are the live tokens of this table; an agent whose token is missing from them
    /// matches no credentials. `now` (Unix seconds) is checked against the certificate's
    /// validity when a certificate agent is chosen: an identity ends at `notAfter`, on every
    /// request of a kept-alive connection too, not only at the handshake. A certificate that
    /// names two identities identifies no certificate agent.
    pub fn identify(
        &self,
        tokens: &Tokens,
        client: SocketAddr,
        headers: &HeaderMap,
        cert: Option<&PeerCert>,
        now: i64,
    ) -> Result<AgentId, Deny> {
        let ip = client.ip().to_canonical();
        let creds = credentials(headers);
        let usable = match &creds {
            Ok(Some(c)) => Some(c),
            _ => None,
        };
        // The first refusal by an agent the client addressed (its token agent's name with the
        // wrong token, its certificate agent with an expired or ambiguous certificate): the
        // answer unless a later agent matches the client without credentials.
        let mut refused: Option<Deny> = None;
        for (i, a) in self.agents.iter().enumerate() {
            if !a.source_cidrs.is_empty() && !a.source_cidrs.iter().any(|n| n.contains(&ip)) {
                continue;
            }
            if let Some(want) = &a.cert {
                let Some(c) = cert else { continue };
                if let Some(why) = c.ambiguous {
                    refused.get_or_insert_with(|| {
                        Deny::with_detail(
                            Reason::AuthFailed,
                            format!("the client certificate is ambiguous ({why}); it identifies no agent"),
                        )
                    });
                    continue;
                }
                if !want.matches(c) {
                    continue;
                }
                if !c.valid.contains(&now) {
                    refused.get_or_insert(Deny::new(
                        Reason::ClientCertExpired,
                        "the client certificate is outside its validity; present a current one",
                    ));
                    continue;
                }
            }
            if a.token_file.is_none() {
                return Ok(AgentId(i));
            }
            match usable {
                Some(c) if c.user() == a.name.as_bytes() => {
                    let matched = tokens
                        .get(AgentId(i))
                        .is_some_and(|t| t.matches(c.secret()));
                    if matched {
                        return Ok(AgentId(i));
                    }
                    // The detail reaches the audit line only (`Reason::withholds_detail`).
                    refused.get_or_insert_with(|| {
                        Deny::with_detail(
                            Reason::AuthFailed,
                            format!("wrong proxy token for agent {}", a.name),
                        )
                    });
                }
                _ => continue,
            }
        }
        if let Some(deny) = refused {
            return Err(deny);
        }
        if self.any_cert {
            if let Some(deny) = self.cert_refusal(cert, &creds) {
                return Err(deny);
            }
        }
        Err(match (self.any_token, creds) {
            (false, _) => Deny::new(
                Reason::UnknownAgent,
                "client address matches no [[agents]] entry",
            ),
            (true, Err(malformed)) => malformed,
            (true, Ok(Some(_))) => Deny::new(
                Reason::AuthFailed,
                "proxy credentials match no agent allowed from this address",
            ),
            (true, Ok(None)) => Deny::new(
                Reason::AuthRequired,
                "proxy credentials required: Proxy-Authorization: Basic base64(agent:token)",
            ),
        })
    }
}

// === impl Agents (certificates) ===

impl Agents {
    /// When certificate agents exist and nothing matched: a certificate that matches no agent
    /// is 407 `auth_failed`; no certificate and no token is 407 `auth_required`. `None` leaves
    /// the decision to the token rules (the client sent credentials).
    fn cert_refusal(
        &self,
        cert: Option<&PeerCert>,
        creds: &Result<Option<Credentials>, Deny>,
    ) -> Option<Deny> {
        match cert {
            Some(_) => Some(Deny::new(
                Reason::AuthFailed,
                "the client certificate matches no agent allowed from this address",
            )),
            None if !self.any_token || matches!(creds, Ok(None)) => Some(Deny::new(
                Reason::AuthRequired,
                if self.any_token {
                    "a client certificate (on the TLS listener) or proxy credentials are required"
                } else {
                    "a client certificate is required: connect to the TLS listener with one"
                },
            )),
            None => None,
        }
    }
}

// === impl CertId ===

impl CertId {
    /// True when the certificate carries every field this agent names.
    pub fn matches(&self, cert: &PeerCert) -> bool {
        self.spiffe_id
            .as_ref()
            .map_or(true, |id| cert.uris.iter().any(|u| u == id))
            && self
                .subject
                .as_ref()
                .map_or(true, |s| cert.common_name.as_ref() == Some(s))
    }
}

/// Decoded Basic credentials: `user:token`.
struct Credentials {
    decoded: Vec<u8>,
    colon: usize,
}

impl Credentials {
    fn user(&self) -> &[u8] {
        &self.decoded[..self.colon]
    }

    fn secret(&self) -> &[u8] {
        &self.decoded[self.colon + 1..]
    }
}

/// The Basic credentials of `Proxy-Authorization`, if sent. Malformed credentials are a refusal,
/// not "no credentials".
fn credentials(headers: &HeaderMap) -> Result<Option<Credentials>, Deny> {
    let mut values = headers.get_all(PROXY_AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let malformed = || {
        Deny::new(
            Reason::AuthFailed,
            "malformed Proxy-Authorization: expected one `Basic base64(agent:token)`",
        )
    };
    if values.next().is_some() {
        return Err(malformed());
    }
    let value = value.as_bytes();
    let (scheme, encoded) = match value.iter().position(|&b| b == b' ') {
        Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
        None => return Err(malformed()),
    };
    if !scheme.eq_ignore_ascii_case(b"basic") || encoded.len() > 2 * MAX_TOKEN_BYTES {
        return Err(malformed());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| malformed())?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(malformed)?;
    Ok(Some(Credentials { decoded, colon }))
}

#[cfg(test)]
mod tests;
