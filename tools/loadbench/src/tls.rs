//! Certificates and TLS settings of scenarios i and j (TLS interception), minted at start: the
//! interception CA the proxy signs its leaves with, and the origin's own CA and leaf (for
//! `origin.test` and `secure.origin.test`), which the proxy trusts as `upstream_ca`.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::error::Error;
use crate::http::{Stream, HOST};

/// The intercepted name: a second static host of the origin, so one proxy can carry both a
/// plain tunnel (to [`HOST`]) and an intercepted one (to this) to the same TLS origin.
pub(crate) const SECURE_HOST: &str = "secure.origin.test";

/// Everything the TLS scenarios need.
pub(crate) struct Pki {
    /// PEM of the interception CA certificate and key (files for the proxy's `[intercept]`).
    pub(crate) gateway_ca: (String, String),
    /// PEM of the origin's CA (the proxy's `upstream_ca`).
    pub(crate) origin_ca: String,
    /// The origin's server config.
    pub(crate) origin: Arc<ServerConfig>,
    /// A client trusting the origin's CA (straight, or through a plain tunnel).
    pub(crate) to_origin: Arc<ClientConfig>,
    /// A client trusting the interception CA (through an intercepted tunnel).
    pub(crate) to_gateway: Arc<ClientConfig>,
}

fn ca(name: &str) -> Result<(Issuer<'static, KeyPair>, String, String), rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    Ok((Issuer::new(params, key), cert_pem, key_pem))
}

fn client(ca_pem: &str) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let c = c.map_err(|e| Error::Tls(e.to_string()))?;
        roots.add(c).map_err(|e| Error::Tls(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Pki {
    /// Mint both CAs and the origin's leaf.
    pub(crate) fn new() -> Result<Pki, Error> {
        let tls = |e: rcgen::Error| Error::Tls(e.to_string());
        let (_, gw_cert, gw_key) = ca("loadbench interception CA").map_err(tls)?;
        let (origin_issuer, origin_ca, _) = ca("loadbench origin CA").map_err(tls)?;
        let params =
            CertificateParams::new(vec![HOST.to_owned(), SECURE_HOST.to_owned()]).map_err(tls)?;
        let key = KeyPair::generate().map_err(tls)?;
        let cert = params.signed_by(&key, &origin_issuer).map_err(tls)?;
        let private = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
            .map_err(|e| Error::Tls(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut origin = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], private)
            .map_err(|e| Error::Tls(e.to_string()))?;
        origin.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Pki {
            to_origin: client(&origin_ca)?,
            to_gateway: client(&gw_cert)?,
            gateway_ca: (gw_cert, gw_key),
            origin_ca,
            origin: Arc::new(origin),
        })
    }
}

/// Start TLS as a client on `tcp` for `name`.
pub(crate) async fn connect(
    config: &Arc<ClientConfig>,
    name: &str,
    tcp: TcpStream,
) -> std::io::Result<Stream> {
    let name =
        ServerName::try_from(name.to_owned()).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?;
    Ok(Stream::Client(Box::new(tls)))
}
