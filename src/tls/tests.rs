#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType,
};

use super::*;

/// A CA and leaves it signs, written as PEM files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            ca: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS SANs), with an optional URI SAN and CN; returns (cert, key) PEM.
    fn leaf(&self, names: &[&str], uri: Option<&str>, cn: Option<&str>) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = DistinguishedName::new();
        if let Some(u) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn settings(&self, client_ca: bool) -> TlsSettings {
        let (cert, key) = self.leaf(&["localhost"], None, None);
        TlsSettings {
            cert: self.write("tls.crt", &cert),
            key: self.write("tls.key", &key),
            client_ca: client_ca.then(|| self.dir.path().join("ca.pem")),
            require_client_cert: false,
        }
    }
}

#[test]
fn loads_a_certificate_and_key() {
    let pki = Pki::new();
    let files = TlsFiles::load(pki.settings(true)).unwrap();
    assert_eq!(
        files.server_config().alpn_protocols,
        vec![b"http/1.1".to_vec()]
    );
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let pki = Pki::new();
    let s = pki.settings(false);
    let (_, other_key) = pki.leaf(&["localhost"], None, None);
    std::fs::write(&s.key, other_key).unwrap();
    let e = TlsFiles::load(s).unwrap_err();
    assert!(matches!(e, TlsError::Rejected(_)), "{e}");
}

#[test]
fn missing_and_empty_files_name_the_file() {
    let pki = Pki::new();
    let mut s = pki.settings(false);
    s.cert = pki.dir.path().join("absent.crt");
    let e = TlsFiles::load(s.clone()).unwrap_err();
    assert!(e.to_string().contains("absent.crt"), "{e}");
    s.cert = pki.write("empty.crt", "");
    let e = TlsFiles::load(s.clone()).unwrap_err();
    assert!(matches!(e, TlsError::Empty { .. }), "{e}");
    s.cert = pki.write(
        "garbage.crt",
        "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n",
    );
    let e = TlsFiles::load(s).unwrap_err();
    assert!(e.to_string().contains("garbage.crt"), "{e}");
}

#[test]
fn refresh_swaps_in_a_rotated_certificate() {
    let pki = Pki::new();
    let s = pki.settings(false);
    let files = TlsFiles::load(s.clone()).unwrap();
    let before = files.server_config();
    assert!(
        !files.refresh().unwrap(),
        "unchanged files are not a rotation"
    );
    let (cert, key) = pki.leaf(&["localhost"], None, None);
    std::fs::write(&s.cert, cert).unwrap();
    std::fs::write(&s.key, key).unwrap();
    assert!(files.refresh().unwrap());
    assert!(!Arc::ptr_eq(&before, &files.server_config()));
    // rcgen's default validity ends in 4096.
    assert_eq!(files.not_after(), 67090118400); // 4096-01-01T00:00:00Z
}

#[test]
fn a_half_written_rotation_keeps_the_old_config_and_reports_once() {
    let pki = Pki::new();
    let s = pki.settings(false);
    let files = TlsFiles::load(s.clone()).unwrap();
    let before = files.server_config();
    let (cert, _) = pki.leaf(&["localhost"], None, None);
    std::fs::write(&s.cert, cert).unwrap(); // the key has not followed yet
    assert!(files.refresh().is_err());
    assert!(
        !files.refresh().unwrap(),
        "the same failure is reported once"
    );
    assert!(Arc::ptr_eq(&before, &files.server_config()));
    std::fs::remove_file(&s.key).unwrap();
    assert!(files.refresh().is_err(), "a new failure is reported");
    assert!(Arc::ptr_eq(&before, &files.server_config()));
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[test]
fn peer_identity_reads_uri_sans_and_common_name() {
    let pki = Pki::new();
    let (pem, _) = pki.leaf(
        &["agent.local"],
        Some("spiffe://cluster.local/ns/agents/sa/coder"),
        Some("coder"),
    );
    let peer = peer_cert(&[der(&pem)]).unwrap();
    assert_eq!(peer.uris, vec!["spiffe://cluster.local/ns/agents/sa/coder"]);
    assert_eq!(peer.common_name.as_deref(), Some("coder"));
    assert_eq!(peer.ambiguous, None);
    let (pem, _) = pki.leaf(&["agent.local"], None, None);
    let peer = peer_cert(&[der(&pem)]).unwrap();
    assert!(peer.uris.is_empty() && peer.common_name.is_none());
    assert_eq!(
        peer_cert(&[CertificateDer::from(b"not der".to_vec())]),
        None
    );
    assert_eq!(peer_cert(&[]), None);
}

#[test]
fn a_chain_is_valid_only_while_every_certificate_is() {
    let mut params = CertificateParams::new(vec!["a.local".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2026, 1, 1);
    params.not_after = rcgen::date_time_ymd(2026, 6, 1);
    let key = KeyPair::generate().unwrap();
    let leaf = params.self_signed(&key).unwrap();
    let mut params = CertificateParams::new(vec!["b.local".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2026, 2, 1);
    params.not_after = rcgen::date_time_ymd(2027, 1, 1);
    let other = params.self_signed(&key).unwrap();
    let peer = peer_cert(&[der(&leaf.pem()), der(&other.pem())]).unwrap();
    // 2026-02-01 .. 2026-06-01, both midnight UTC.
    assert_eq!(peer.valid, 1_769_904_000..=1_780_272_000);
}

#[test]
fn a_certificate_naming_two_identities_is_ambiguous() {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    for u in [
        "spiffe://cluster.local/ns/a/sa/one",
        "spiffe://cluster.local/ns/a/sa/two",
    ] {
        params
            .subject_alt_names
            .push(SanType::URI(u.try_into().unwrap()));
    }
    let key = KeyPair::generate().unwrap();
    let two_uris = params.self_signed(&key).unwrap();
    let peer = peer_cert(&[der(&two_uris.pem())]).unwrap();
    assert!(peer.ambiguous.unwrap().contains("URI"), "{peer:?}");

    // rcgen keeps one value per attribute type: openssl writes the two common names.
    let dir = tempfile::tempdir().unwrap();
    let (k, c) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=coder/CN=mailer",
            "-keyout",
        ])
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(ok.status.success(), "{ok:?}");
    let peer = peer_cert(&[der(&std::fs::read_to_string(&c).unwrap())]).unwrap();
    assert_eq!(peer.common_name.as_deref(), Some("coder"));
    assert!(peer.ambiguous.unwrap().contains("common name"), "{peer:?}");
}

#[test]
fn an_oversized_pem_file_is_refused() {
    let pki = Pki::new();
    let mut s = pki.settings(false);
    s.cert = pki.write("big.crt", &"A".repeat(2 << 20));
    let e = TlsFiles::load(s).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}
