//! The interception CA and the TLS material built from it: a leaf certificate per intercepted
//! host (minted with rcgen on first use, cached, renewed before it expires), and the rustls
//! client config that verifies upstream certificates.
//!
//! [`Interceptor`] is built at config load (a bad CA is a config error naming the key) and held
//! by the reload snapshot, which calls [`Interceptor::refresh`] every second: when cert-manager
//! rotates the CA (or an `upstream_ca` file changes), the new material is swapped in and the
//! leaf cache emptied, so new connections get leaves from the new CA. A half-written rotation
//! fails to build and the previous material stays, retried the next second.
//!
//! Leaves are only ever minted for a host the caller has already found in the agent's policy
//! (the data path asks with the CONNECT host once `[[policies.NAME.intercept]]` matched it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Where the interception material comes from (`[intercept]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterceptSettings {
    /// PEM CA certificate that agents trust for intercepted hosts.
    pub ca_cert: PathBuf,
    /// PEM private key of the CA (PKCS#8).
    pub ca_key: PathBuf,
    /// Extra PEM roots for verifying upstream certificates, besides the built-in web roots.
    pub upstream_ca: Vec<PathBuf>,
}

/// How long a minted leaf is valid. Short: a leaf that leaks is useful for a day at most, and
/// nothing is lost by minting again (one ECDSA P-256 signature).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A cached leaf is replaced once this much of its validity is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(8 * 3600);

/// A leaf's `notBefore` is set this far in the past, for clients whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// Most leaves cached (one per intercepted host name). Past it the one closest to renewal is
/// dropped; it is minted again when next needed.
pub const MAX_LEAVES: usize = 1024;

/// Largest CA, key or upstream CA file read.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// The protocols offered in ALPN on both sides: interception speaks HTTP/1.1.
const ALPN: &[&[u8]] = &[b"http/1.1"];

/// Why the interception material could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is too large, holds no PEM item, or not the one expected.
    #[error("{}: {problem}", path.display())]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The CA certificate and key do not work together (a leaf signed by the key does not
    /// verify against the certificate), or the certificate is not a usable CA.
    #[error("{} and {}: {problem}", cert.display(), key.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What failed.
        problem: String,
    },
    /// Minting a leaf failed.
    #[error("minting a certificate for {host}: {problem}")]
    Mint {
        /// The host.
        host: String,
        /// rcgen's or rustls's message.
        problem: String,
    },
}

/// What is built from one read of the files.
struct Material {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// The CA's own `notAfter`: no leaf outlives it.
    ca_not_after: SystemTime,
    upstream: Arc<ClientConfig>,
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: Instant,
}

/// The live interception material: CA, leaf cache, upstream verifier.
pub struct Interceptor {
    settings: InterceptSettings,
    current: ArcSwap<Material>,
    fingerprint: AtomicU64,
    failed: AtomicU64,
    leaves: Mutex<HashMap<Box<str>, Leaf>>,
    mints: AtomicU64,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("settings", &self.settings)
            .field("cached", &self.cached())
            .finish()
    }
}

// === impl Interceptor ===

impl Interceptor {
    /// Read and check every file: the CA pair must sign a leaf that verifies against it.
    pub fn load(settings: InterceptSettings) -> Result<Interceptor, CaError> {
        let contents = read_all(&settings)?;
        let fp = crate::fingerprint::fingerprint(&contents.concat());
        let material = build(&settings, &contents)?;
        Ok(Interceptor {
            settings,
            current: ArcSwap::from_pointee(material),
            fingerprint: AtomicU64::new(fp),
            failed: AtomicU64::new(0),
            leaves: Mutex::new(HashMap::new()),
            mints: AtomicU64::new(0),
        })
    }

    /// The settings the files came from.
    pub fn settings(&self) -> &InterceptSettings {
        &self.settings
    }

    /// Re-read the files; returns true when new material was swapped in (and the leaf cache
    /// emptied). A failure keeps the previous material and is returned only the first time for
    /// the same content.
    pub fn refresh(&self) -> Result<bool, CaError> {
        let (fp, built) = match read_all(&self.settings) {
            Ok(contents) => {
                let fp = crate::fingerprint::fingerprint(&contents.concat());
                if fp == self.fingerprint.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                (fp, build(&self.settings, &contents))
            }
            Err(e) => (
                crate::fingerprint::fingerprint(e.to_string().as_bytes()),
                Err(e),
            ),
        };
        match built {
            Ok(material) => {
                self.current.store(Arc::new(material));
                self.leaves.lock().clear();
                self.fingerprint.store(fp, Ordering::Relaxed);
                self.failed.store(0, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if self.failed.swap(fp, Ordering::Relaxed) != fp => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// The TLS server config presenting a leaf for `host` (a normalised name the agent's
    /// policy intercepts): the cached one, or one minted now. The bool is true when it was
    /// minted now.
    pub fn server_config(&self, host: &str) -> Result<(Arc<ServerConfig>, bool), CaError> {
        let now = Instant::now();
        if let Some(leaf) = self.leaves.lock().get(host) {
            if leaf.renew_at > now {
                return Ok((leaf.config.clone(), false));
            }
        }
        // Minted outside the lock (a signature and a key generation); two connections racing
        // for a new host each mint one, and the later one is kept.
        let material = self.current.load_full();
        let (config, valid_for) = mint(&material, host)?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        let renew_at = now + valid_for.saturating_sub(RENEW_BEFORE.min(valid_for / 3));
        let mut leaves = self.leaves.lock();
        if leaves.len() >= MAX_LEAVES && !leaves.contains_key(host) {
            let oldest = leaves
                .iter()
                .min_by_key(|(_, l)| l.renew_at)
                .map(|(h, _)| h.clone());
            if let Some(h) = oldest {
                leaves.remove(&h);
            }
        }
        leaves.insert(
            host.into(),
            Leaf {
                config: config.clone(),
                renew_at,
            },
        );
        Ok((config, true))
    }

    /// The rustls client config for upstream connections (web roots plus `upstream_ca`).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current.load().upstream.clone()
    }

    /// Leaves cached now.
    pub fn cached(&self) -> usize {
        self.leaves.lock().len()
    }

    /// Leaves minted since start.
    pub fn minted(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The CA certificate in use (DER), for `check` and tests.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.current.load().ca_der.clone()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|source| CaError::Read {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(CaError::Bad {
            path: path.to_owned(),
            problem: format!("larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// The CA certificate, the CA key and each upstream CA file, in that order.
fn read_all(s: &InterceptSettings) -> Result<Vec<Vec<u8>>, CaError> {
    [&s.ca_cert, &s.ca_key]
        .into_iter()
        .chain(&s.upstream_ca)
        .map(|p| read_file(p))
        .collect()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(path: &Path, problem: impl Into<String>) -> CaError {
    CaError::Bad {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not valid PEM: {e:?}")))?;
    if chain.is_empty() {
        return Err(bad(path, "holds no PEM CERTIFICATE"));
    }
    Ok(chain)
}

fn build(s: &InterceptSettings, contents: &[Vec<u8>]) -> Result<Material, CaError> {
    let ca = certs(&s.ca_cert, &contents[0])?;
    let ca_der = ca[0].clone();
    let ca_pem = std::str::from_utf8(&contents[0]).map_err(|_| bad(&s.ca_cert, "not UTF-8 PEM"))?;
    let key_pem = std::str::from_utf8(&contents[1]).map_err(|_| bad(&s.ca_key, "not UTF-8 PEM"))?;
    // rcgen signs with PKCS#8 keys (ECDSA P-256/P-384, Ed25519, RSA): cert-manager writes one
    // with `privateKey.encoding: PKCS8`.
    let key = KeyPair::from_pem(key_pem).map_err(|e| {
        bad(
            &s.ca_key,
            format!("not a PKCS#8 private key rcgen can sign with ({e}); cert-manager: set privateKey.encoding: PKCS8"),
        )
    })?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, key).map_err(|e| {
        bad(
            &s.ca_cert,
            format!("not a CA certificate rcgen can use ({e})"),
        )
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| bad(&s.ca_cert, format!("does not parse ({e})")))?;
    let ca_not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));

    let mut upstream_roots = RootCertStore::empty();
    upstream_roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for (path, pem) in s.upstream_ca.iter().zip(&contents[2..]) {
        for c in certs(path, pem)? {
            upstream_roots
                .add(c)
                .map_err(|e| bad(path, format!("not a usable root: {e}")))?;
        }
    }
    let mut upstream = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&s.ca_cert, e.to_string()))?
        .with_root_certificates(upstream_roots)
        .with_no_client_auth();
    upstream.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();

    let material = Material {
        issuer,
        ca_der,
        ca_not_after,
        upstream: Arc::new(upstream),
    };
    verify_pair(s, &material)?;
    Ok(material)
}

/// Mint a leaf for a name no one uses and verify it against the CA certificate as a client
/// would: catches a key that is not the certificate's, and a certificate that is not a CA.
fn verify_pair(s: &InterceptSettings, m: &Material) -> Result<(), CaError> {
    const PROBE: &str = "chokepoint-ca-check.invalid";
    let mismatch = |problem: String| CaError::Mismatch {
        cert: s.ca_cert.clone(),
        key: s.ca_key.clone(),
        problem,
    };
    let (leaf, _) = leaf_der(m, PROBE)?;
    let mut roots = RootCertStore::empty();
    roots
        .add(m.ca_der.clone())
        .map_err(|e| mismatch(format!("the CA certificate is not a usable root: {e}")))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| mismatch(e.to_string()))?;
    let name = ServerName::try_from(PROBE).map_err(|e| mismatch(e.to_string()))?;
    verifier
        .verify_server_cert(&leaf[0], &[], &name, &[], UnixTime::now())
        .map_err(|e| {
            mismatch(format!(
                "a certificate signed with the key does not verify against the certificate ({e}); is it the CA's key, and the certificate a CA (basicConstraints CA:TRUE, keyCertSign)?"
            ))
        })?;
    Ok(())
}

/// A leaf for `host` (certificate, then the CA) with its key, and how long it is valid.
fn leaf_der(
    m: &Material,
    host: &str,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        (PrivateKeyDer<'static>, Duration),
    ),
    CaError,
> {
    let fail = |e: rcgen::Error| CaError::Mint {
        host: host.to_owned(),
        problem: e.to_string(),
    };
    let key = KeyPair::generate().map_err(fail)?;
    let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(fail)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    let now = SystemTime::now();
    let not_after = (now + LEAF_VALIDITY).min(m.ca_not_after);
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &m.issuer).map_err(fail)?;
    let valid_for = not_after.duration_since(now).unwrap_or(Duration::ZERO);
    let chain = vec![cert.der().clone(), m.ca_der.clone()];
    let private = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((chain, (private, valid_for)))
}

fn mint(m: &Material, host: &str) -> Result<(Arc<ServerConfig>, Duration), CaError> {
    let (chain, (key, valid_for)) = leaf_der(m, host)?;
    let fail = |e: rustls::Error| CaError::Mint {
        host: host.to_owned(),
        problem: e.to_string(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(fail)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(fail)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), valid_for))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA pair written to `dir`: (cert path, key path).
    pub(crate) fn write_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn settings(c: PathBuf, k: PathBuf) -> InterceptSettings {
        InterceptSettings {
            ca_cert: c,
            ca_key: k,
            upstream_ca: vec![],
        }
    }

    #[test]
    fn leaves_are_cached_per_host_and_renewed_with_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_ca(dir.path(), "ca-one");
        let i = Interceptor::load(settings(c.clone(), k.clone())).unwrap();
        let (a, minted) = i.server_config("api.example.test").unwrap();
        assert!(minted);
        let (b, minted) = i.server_config("api.example.test").unwrap();
        assert!(!minted && Arc::ptr_eq(&a, &b), "cached");
        i.server_config("other.example.test").unwrap();
        assert_eq!((i.cached(), i.minted()), (2, 2));
        assert!(!i.refresh().unwrap(), "unchanged files");
        // Rotation: a new pair at the same paths empties the cache.
        let (c2, k2) = write_ca(dir.path(), "ca-two");
        std::fs::rename(c2, &c).unwrap();
        std::fs::rename(k2, &k).unwrap();
        assert!(i.refresh().unwrap());
        assert_eq!(i.cached(), 0);
    }

    #[test]
    fn a_key_that_is_not_the_cas_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = write_ca(dir.path(), "ca-one");
        let (_, other_key) = write_ca(dir.path(), "ca-two");
        let e = Interceptor::load(settings(c, other_key)).unwrap_err();
        assert!(matches!(e, CaError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_ca(dir.path(), "ca-one");
        let i = Interceptor::load(settings(c, k.clone())).unwrap();
        // The minted leaf with the CA's key: not a CA, so leaves it "signs" do not verify.
        let m = i.current.load_full();
        let (chain, _) = leaf_der(&m, "leaf.test").unwrap();
        let leaf_path = dir.path().join("leaf.crt");
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &chain[0])
        );
        std::fs::write(&leaf_path, pem).unwrap();
        let e = Interceptor::load(settings(leaf_path, k)).unwrap_err();
        assert!(
            matches!(e, CaError::Mismatch { .. } | CaError::Bad { .. }),
            "{e}"
        );
    }
}
