//! The HTTPS proxy listener's TLS: the rustls server config built from PEM files, kept fresh as
//! cert-manager rotates them, and the identity a client certificate carries.
//!
//! [`TlsFiles`] is built at config load (a bad file is a config error naming the key) and
//! re-read by `reload` every second: when the certificate, key or client CA files change, a new
//! rustls config is swapped in for new connections; open connections keep theirs. A half-written
//! rotation (a certificate without its key yet) fails to build and the previous config stays,
//! retried the next second.
//!
//! Client certificates are verified by rustls against `client_ca` (webpki: chain, validity,
//! key usage). With `require_client_cert` a client without a trusted certificate fails the
//! handshake; without it, the certificate is optional and the agent table decides (an agent
//! with `spiffe_id` or `cert_subject` needs one). A presented but untrusted certificate always
//! fails the handshake.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::PeerCert;

/// Where the TLS material comes from (`[server] tls_cert`, `tls_key`, `client_ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to, if clients may present one.
    pub client_ca: Option<PathBuf>,
    /// Refuse the handshake of a client without a trusted certificate.
    pub require_client_cert: bool,
}

/// The live TLS server config of the HTTPS listener.
#[derive(Debug)]
pub struct TlsFiles {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
    /// Hash of the file contents `current` was built from.
    fingerprint: AtomicU64,
    /// Hash of contents that last failed to build (reported once, not every second).
    failed: AtomicU64,
    /// When the serving certificate in use expires (Unix seconds; 0 if unknown).
    not_after: AtomicI64,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind needed.
    #[error("{} holds no PEM {what}", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// A file is not valid PEM.
    #[error("{} is not valid PEM: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// rustls refused the material (key does not match the certificate, unsupported key, bad CA).
    #[error("{0}")]
    Rejected(String),
}

/// Largest certificate, key or CA file read (a CA bundle of a few hundred certificates fits).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// The protocols the listener offers in ALPN: the proxy speaks HTTP/1.1 only.
const ALPN: &[&[u8]] = &[b"http/1.1"];

// === impl TlsFiles ===

impl TlsFiles {
    /// Read and check every file.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let (config, fp, not_after) = build(&settings)?;
        Ok(TlsFiles {
            settings,
            current: ArcSwap::from_pointee(config),
            fingerprint: AtomicU64::new(fp),
            failed: AtomicU64::new(0),
            not_after: AtomicI64::new(not_after),
        })
    }

    /// The settings the files came from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// When the serving certificate in use expires, in Unix seconds (0 if it cannot be read).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// The server config for a new connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-read the files; returns true if a new config was swapped in. Unchanged files cost three
    /// reads and a hash. A failure keeps the previous config and is returned only the first time
    /// for the same content (for logging).
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let (fp, built) = match read_all(&self.settings) {
            Ok(contents) => {
                let fp = crate::fingerprint::fingerprint(&contents.concat());
                if fp == self.fingerprint.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let built =
                    config_from(&self.settings, &contents).map(|c| (c, expiry(&contents[0])));
                (fp, built)
            }
            // A file gone (a Secret key removed): keep serving with what was loaded.
            Err(e) => (
                crate::fingerprint::fingerprint(e.to_string().as_bytes()),
                Err(e),
            ),
        };
        match built {
            Ok((config, not_after)) => {
                self.current.store(Arc::new(config));
                self.not_after.store(not_after, Ordering::Relaxed);
                self.fingerprint.store(fp, Ordering::Relaxed);
                self.failed.store(0, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if self.failed.swap(fp, Ordering::Relaxed) != fp => Err(e),
            Err(_) => Ok(false),
        }
    }
}

/// The contents of the cert, key and (if any) CA files, in that order.
fn read_all(s: &TlsSettings) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut paths = vec![&s.cert, &s.key];
    paths.extend(s.client_ca.as_ref());
    paths
        .into_iter()
        .map(|p| {
            use std::io::Read;
            // Bounded: a path naming a device or a huge file must not exhaust memory.
            let mut bytes = Vec::new();
            let read = std::fs::File::open(p)
                .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes));
            match read {
                Ok(n) if n as u64 > MAX_PEM_BYTES => Err(TlsError::Rejected(format!(
                    "{} is larger than {MAX_PEM_BYTES} bytes",
                    p.display()
                ))),
                Ok(_) => Ok(bytes),
                Err(source) => Err(TlsError::Read {
                    path: p.clone(),
                    source,
                }),
            }
        })
        .collect()
}

fn build(s: &TlsSettings) -> Result<(ServerConfig, u64, i64), TlsError> {
    let contents = read_all(s)?;
    let fp = crate::fingerprint::fingerprint(&contents.concat());
    Ok((config_from(s, &contents)?, fp, expiry(&contents[0])))
}

/// The `notAfter` of the first certificate in a PEM chain, in Unix seconds (0 if unreadable).
fn expiry(pem: &[u8]) -> i64 {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .and_then(|der| {
            x509_parser::parse_x509_certificate(&der)
                .ok()
                .map(|(_, c)| c.validity().not_after.timestamp())
        })
        .unwrap_or(0)
}

/// The rustls config from file contents as read by [`read_all`].
fn config_from(s: &TlsSettings, contents: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&s.cert, &contents[0])?;
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| pem_error(&s.key, &e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected(e.to_string()))?;
    let builder = match (&s.client_ca, contents.get(2)) {
        (Some(path), Some(pem)) => {
            builder.with_client_cert_verifier(client_verifier(path, pem, s, provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Rejected(format!("{} and {}: {e}", s.cert.display(), s.key.display()))
    })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn client_verifier(
    path: &Path,
    pem: &[u8],
    s: &TlsSettings,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(path, pem)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Rejected(format!("{}: {e}", path.display())))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if s.require_client_cert {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| TlsError::Rejected(format!("{}: {e}", path.display())))
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &e))?;
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "CERTIFICATE",
        });
    }
    Ok(chain)
}

fn pem_error(path: &Path, e: &rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_owned(),
            what: "item of the expected kind",
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            message: format!("{other:?}"),
        },
    }
}

/// The identity in a client's (already verified) certificate chain, leaf first: the leaf's
/// URI SANs and subject CN (and whether it names more than one of either), and the chain's
/// validity. `None` if a certificate does not parse (rustls verified them, so this does not
/// happen for a completed handshake) or the chain is empty.
pub fn peer_cert(chain: &[CertificateDer<'_>]) -> Option<PeerCert> {
    let (leaf, rest) = chain.split_first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let mut names = cert
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().ok().map(str::to_owned));
    let common_name = names.next().flatten();
    let two_names = names.next().is_some();
    let uris: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    // An X.509-SVID carries exactly one URI SAN; a certificate with two names two agents.
    let ambiguous = if uris.len() > 1 {
        Some("it carries more than one URI subject alternative name")
    } else if two_names {
        Some("its subject has more than one common name")
    } else {
        None
    };
    let mut from = cert.validity().not_before.timestamp();
    let mut until = cert.validity().not_after.timestamp();
    for der in rest {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        from = from.max(c.validity().not_before.timestamp());
        until = until.min(c.validity().not_after.timestamp());
    }
    Some(PeerCert {
        uris,
        common_name,
        ambiguous,
        valid: from..=until,
    })
}

#[cfg(test)]
mod tests;
