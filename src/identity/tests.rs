use super::*;
use http::HeaderValue;

fn agent(name: &str, cidrs: &[&str], token_file: Option<PathBuf>) -> Agent {
    Agent {
        name: name.into(),
        source_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        token_file,
        cert: None,
        policy: 0,
    }
}

/// An agent table with its live tokens, as the reload snapshot holds them.
struct Table {
    agents: Agents,
    tokens: Tokens,
}

impl Table {
    fn identify(
        &self,
        client: SocketAddr,
        headers: &HeaderMap,
        cert: Option<&PeerCert>,
    ) -> Result<AgentId, Deny> {
        self.agents
            .identify(&self.tokens, client, headers, cert, NOW)
    }

    fn get(&self, id: AgentId) -> &Agent {
        self.agents.get(id)
    }
}

fn table(agents: Vec<Agent>) -> Table {
    let agents = Agents::new(agents);
    let tokens = Tokens::load(&agents, None);
    Table { agents, tokens }
}

fn cert_agent(name: &str, spiffe_id: Option<&str>, subject: Option<&str>) -> Agent {
    Agent {
        cert: Some(CertId {
            spiffe_id: spiffe_id.map(str::to_owned),
            subject: subject.map(str::to_owned),
        }),
        ..agent(name, &[], None)
    }
}

/// The clock the table is asked at (Unix seconds); certificates are valid around it.
const NOW: i64 = 1_800_000_000;

fn peer(uris: &[&str], cn: Option<&str>) -> PeerCert {
    PeerCert {
        uris: uris.iter().map(|u| u.to_string()).collect(),
        common_name: cn.map(str::to_owned),
        ambiguous: None,
        valid: NOW - 60..=NOW + 60,
    }
}

const CODER: &str = "spiffe://cluster.local/ns/agents/sa/coder";

#[test]
fn certificate_agents_match_on_uri_san_or_common_name() {
    let agents = table(vec![
        cert_agent("by-id", Some(CODER), None),
        cert_agent("by-cn", None, Some("mailer")),
        cert_agent("both", Some("spiffe://x/y"), Some("z")),
    ]);
    let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let none = HeaderMap::new();
    let id = |c: &PeerCert| {
        agents
            .identify(client, &none, Some(c))
            .map(|a| &*agents.get(a).name)
    };
    assert_eq!(id(&peer(&["spiffe://other", CODER], None)), Ok("by-id"));
    assert_eq!(id(&peer(&[], Some("mailer"))), Ok("by-cn"));
    assert_eq!(id(&peer(&["spiffe://x/y"], Some("z"))), Ok("both"));
    // Every named field must hold; near misses do not match.
    for miss in [
        peer(&["spiffe://x/y"], Some("not-z")),
        peer(&[&format!("{CODER}/")], None),
        peer(&[], Some("Mailer")),
        peer(&[], Some(CODER)),
    ] {
        let e = agents.identify(client, &none, Some(&miss)).unwrap_err();
        assert_eq!(e.reason, Reason::AuthFailed, "{miss:?}");
    }
}

#[test]
fn no_certificate_where_agents_need_one_is_407() {
    let agents = table(vec![cert_agent("by-id", Some(CODER), None)]);
    let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let e = agents
        .identify(client, &HeaderMap::new(), None)
        .unwrap_err();
    assert_eq!(e.reason, Reason::AuthRequired);
    // Credentials do not stand in for a certificate when no agent uses tokens.
    let e = agents
        .identify(client, &basic("by-id", "x"), None)
        .unwrap_err();
    assert_eq!(e.reason, Reason::AuthRequired);
}

#[test]
fn certificate_and_token_agents_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let agents = table(vec![
        cert_agent("by-id", Some(CODER), None),
        agent("tok", &[], Some(token(&dir, "t", "s3cret"))),
        agent("lan", &["127.0.0.0/8"], None),
    ]);
    let remote: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let name = |r: Result<AgentId, Deny>| r.map(|a| &*agents.get(a).name).map_err(|d| d.reason);
    assert_eq!(
        name(agents.identify(remote, &basic("tok", "s3cret"), None)),
        Ok("tok")
    );
    assert_eq!(
        name(agents.identify(remote, &HeaderMap::new(), Some(&peer(&[CODER], None)))),
        Ok("by-id")
    );
    assert_eq!(
        name(agents.identify(remote, &HeaderMap::new(), None)),
        Err(Reason::AuthRequired)
    );
    assert_eq!(
        name(agents.identify(remote, &basic("tok", "wrong"), None)),
        Err(Reason::AuthFailed)
    );
    // An address agent ignores a certificate meant for nobody here.
    assert_eq!(
        name(agents.identify(
            "127.0.0.5:1".parse().unwrap(),
            &HeaderMap::new(),
            Some(&peer(&[], None))
        )),
        Ok("lan")
    );
}

fn token(dir: &tempfile::TempDir, name: &str, secret: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, secret).unwrap();
    path
}

fn basic(user: &str, pass: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    h.insert(
        PROXY_AUTHORIZATION,
        HeaderValue::from_str(&format!("Basic {enc}")).unwrap(),
    );
    h
}

#[test]
fn first_address_match_wins() {
    let agents = table(vec![
        agent("narrow", &["127.0.0.10/32"], None),
        agent("wide", &["127.0.0.0/8", "::1/128"], None),
    ]);
    let none = HeaderMap::new();
    let id = |s: &str| {
        agents
            .identify(s.parse().unwrap(), &none, None)
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

#[test]
fn tokens_identify_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let agents = table(vec![
        agent("coder", &[], Some(token(&dir, "coder", "s3cret\n"))),
        agent(
            "pinned",
            &["127.0.0.5/32"],
            Some(token(&dir, "pinned", "other")),
        ),
        agent("fallback", &["10.0.0.0/8"], None),
    ]);
    let client = "127.0.0.1:1000".parse().unwrap();
    let id =
        |h: &HeaderMap, c: SocketAddr| agents.identify(c, h, None).map(|a| &*agents.get(a).name);
    assert_eq!(
        id(&basic("coder", "s3cret"), client),
        Ok("coder"),
        "trailing newline trimmed"
    );
    assert_eq!(
        id(&basic("coder", "wrong"), client).unwrap_err().reason,
        Reason::AuthFailed
    );
    assert_eq!(
        id(&basic("nobody", "s3cret"), client).unwrap_err().reason,
        Reason::AuthFailed
    );
    assert_eq!(
        id(&HeaderMap::new(), client).unwrap_err().reason,
        Reason::AuthRequired
    );
    // Token and address both required for "pinned".
    assert_eq!(
        id(&basic("pinned", "other"), client).unwrap_err().reason,
        Reason::AuthFailed
    );
    assert_eq!(
        id(&basic("pinned", "other"), "127.0.0.5:1".parse().unwrap()),
        Ok("pinned")
    );
    // Address-only agent still reachable.
    assert_eq!(
        id(&HeaderMap::new(), "10.1.1.1:1".parse().unwrap()),
        Ok("fallback")
    );
    // A token containing ':' survives (split at the first colon only).
    let colon = table(vec![agent("c", &[], Some(token(&dir, "c", "a:b")))]);
    assert!(colon.identify(client, &basic("c", "a:b"), None).is_ok());
}

#[test]
fn malformed_credentials_refuse_only_where_a_token_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let agents = table(vec![
        agent("coder", &[], Some(token(&dir, "coder", "s3cret"))),
        agent("local", &["127.0.0.10/32"], None),
    ]);
    let needs_token = "127.0.0.1:1".parse().unwrap();
    let by_address = "127.0.0.10:1".parse().unwrap();
    for v in [
        "Bearer abc",
        "Basic",
        "Basic !!!",
        "Basic dXNlcg==",
        "basic",
    ] {
        let mut h = HeaderMap::new();
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_static(v));
        assert_eq!(
            agents.identify(needs_token, &h, None).unwrap_err().reason,
            Reason::AuthFailed,
            "{v}"
        );
        assert_eq!(
            agents.identify(by_address, &h, None),
            Ok(AgentId(1)),
            "{v}: address agent"
        );
    }
}

#[test]
fn without_token_agents_credentials_never_turn_403_into_407() {
    let agents = table(vec![agent("a", &["127.0.0.10/32"], None)]);
    let stranger = "127.0.0.12:1".parse().unwrap();
    assert_eq!(
        agents
            .identify(stranger, &basic("a", "x"), None)
            .unwrap_err()
            .reason,
        Reason::UnknownAgent
    );
    let mut h = HeaderMap::new();
    h.insert(PROXY_AUTHORIZATION, HeaderValue::from_static("Bearer x"));
    assert_eq!(
        agents.identify(stranger, &h, None).unwrap_err().reason,
        Reason::UnknownAgent
    );
}

#[test]
fn rotation_is_picked_up_and_bad_files_keep_the_old_token() {
    let dir = tempfile::tempdir().unwrap();
    let t = Token::load(&token(&dir, "t", "one")).unwrap();
    assert!(t.matches(b"one"));
    assert!(!t.refresh(false).unwrap());
    std::fs::write(t.path(), "two").unwrap();
    assert!(
        !t.refresh(false).unwrap(),
        "a new token is read twice first"
    );
    assert!(t.matches(b"one"));
    assert!(t.refresh(false).unwrap());
    assert!(t.matches(b"two") && !t.matches(b"one"));
    std::fs::write(t.path(), "  \n").unwrap();
    assert!(t.refresh(false).is_err());
    assert!(t.matches(b"two"), "an empty file keeps the previous token");
    std::fs::remove_file(t.path()).unwrap();
    assert!(t.refresh(false).is_err());
    assert!(
        t.matches(b"two"),
        "a brief absence (2 misses: empty, then gone) keeps the token"
    );
    assert!(!t.is_revoked());
    assert!(t.refresh(false).is_err());
    assert!(
        t.is_revoked(),
        "missing or empty for {REVOKE_AFTER_MISSES} reads: revoked"
    );
    assert!(!t.matches(b"two"));
    assert!(
        !t.matches(b""),
        "a revoked token never matches an empty secret"
    );
    std::fs::write(t.path(), "three").unwrap();
    assert!(t.refresh(true).unwrap(), "SIGHUP applies at once");
    assert!(t.matches(b"three") && !t.is_revoked());
}

#[test]
fn a_token_written_in_two_steps_never_serves_its_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = token(&dir, "t", "old-token-value");
    let t = Token::load(&path).unwrap();
    // A writer truncates and writes the first 8 bytes; the poll reads them.
    std::fs::write(&path, "new-toke").unwrap();
    assert!(!t.refresh(false).unwrap());
    // It writes the rest before the next poll: that poll sees other bytes than the first.
    std::fs::write(&path, "new-token-value").unwrap();
    assert!(!t.refresh(false).unwrap());
    assert!(t.matches(b"old-token-value") && !t.matches(b"new-toke"));
    // The next poll reads the same bytes again: now it applies.
    assert!(t.refresh(false).unwrap());
    assert!(t.matches(b"new-token-value") && !t.matches(b"new-toke"));
}

#[test]
fn an_empty_presented_token_never_matches() {
    let dir = tempfile::tempdir().unwrap();
    let agents = table(vec![agent(
        "coder",
        &[],
        Some(token(&dir, "coder", "s3cret")),
    )]);
    let r = agents.identify("127.0.0.1:1".parse().unwrap(), &basic("coder", ""), None);
    assert_eq!(r.unwrap_err().reason, Reason::AuthFailed);
}

#[test]
fn a_huge_token_file_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge");
    std::fs::write(&path, vec![b'a'; 4 * 1024 * 1024]).unwrap();
    assert!(matches!(Token::load(&path), Err(TokenError::Length { .. })));
    // Whitespace padding up to the read bound is still trimmed away.
    std::fs::write(
        &path,
        format!("{}tok{}", " ".repeat(4000), "\n".repeat(4000)),
    )
    .unwrap();
    assert!(Token::load(&path).unwrap().matches(b"tok"));
}

#[test]
fn a_reload_keeps_the_token_store_of_a_file_it_still_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = token(&dir, "t", "one");
    let first = table(vec![agent("coder", &[], Some(path.clone()))]);
    // The file goes missing: one miss counted, the token still serves.
    std::fs::remove_file(&path).unwrap();
    let t = first.tokens.get(AgentId(0)).unwrap();
    assert!(t.refresh(false).is_err());
    // A reload (the agent renamed and moved, the file the same) keeps that store: the grace
    // before revocation goes on counting instead of starting revoked.
    let agents = Agents::new(vec![
        agent("other", &["127.0.0.0/8"], None),
        agent("coder-2", &[], Some(path.clone())),
    ]);
    let tokens = Tokens::load(&agents, Some(&first.tokens));
    let kept = tokens.get(AgentId(1)).unwrap();
    assert!(std::ptr::eq(kept, t), "same store");
    assert!(kept.matches(b"one"));
    assert!(tokens.get(AgentId(0)).is_none());
    // Without a previous store the missing file starts revoked.
    assert!(Tokens::load(&agents, None)
        .get(AgentId(1))
        .unwrap()
        .is_revoked());
}

#[test]
fn an_agent_whose_token_is_not_loaded_matches_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let agents = Agents::new(vec![agent("coder", &[], Some(token(&dir, "c", "s3cret")))]);
    let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let r = agents.identify(
        &Tokens::default(),
        client,
        &basic("coder", "s3cret"),
        None,
        NOW,
    );
    assert_eq!(r.unwrap_err().reason, Reason::AuthFailed);
}

#[test]
fn a_certificate_identity_ends_at_not_after() {
    let agents = Agents::new(vec![cert_agent("by-id", Some(CODER), None)]);
    let tokens = Tokens::default();
    let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let cert = peer(&[CODER], None);
    let at = |now| {
        agents
            .identify(&tokens, client, &HeaderMap::new(), Some(&cert), now)
            .map_err(|d| d.reason)
    };
    assert_eq!(at(NOW), Ok(AgentId(0)));
    assert_eq!(at(NOW + 60), Ok(AgentId(0)), "notAfter itself is inside");
    assert_eq!(at(NOW + 61), Err(Reason::ClientCertExpired));
    assert_eq!(
        at(NOW - 61),
        Err(Reason::ClientCertExpired),
        "not yet valid"
    );
}

#[test]
fn a_certificate_naming_two_identities_identifies_no_certificate_agent() {
    let agents = table(vec![
        cert_agent("one", Some(CODER), None),
        cert_agent(
            "two",
            Some("spiffe://cluster.local/ns/agents/sa/other"),
            None,
        ),
    ]);
    let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut both = peer(&[CODER, "spiffe://cluster.local/ns/agents/sa/other"], None);
    both.ambiguous = Some("it carries more than one URI subject alternative name");
    let e = agents
        .identify(client, &HeaderMap::new(), Some(&both))
        .unwrap_err();
    assert_eq!(e.reason, Reason::AuthFailed);
    assert!(e.detail.contains("ambiguous"), "{e}");
    // An address agent listed first still matches: a certificate matters to certificate
    // agents only.
    let agents = table(vec![
        agent("lan", &["127.0.0.0/8"], None),
        cert_agent("one", Some(CODER), None),
    ]);
    assert_eq!(
        agents.identify(client, &HeaderMap::new(), Some(&both)),
        Ok(AgentId(0))
    );
}
