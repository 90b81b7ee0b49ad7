//! QUIC endpoints of the upload, with mutual TLS 1.3 (rustls, ring): the
//! core accepts only client certificates issued by the operator CA; the edge
//! accepts only a core certificate issued by it. ALPN `mec-usage/1`. No
//! 0-RTT: nothing is accepted before the client certificate is verified.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::wire::ALPN;

/// A TLS or QUIC set-up error.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// A PEM file that does not hold what it should.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file.
        what: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// The endpoint could not be opened.
    #[error("QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
}

/// Transport settings both sides share.
#[derive(Debug, Clone, Copy)]
pub struct TransportOptions {
    /// Idle timeout (the connection closes after this long without packets).
    pub idle_timeout: Duration,
    /// Keep-alive pings, below the idle timeout.
    pub keep_alive: Duration,
    /// UDP segmentation offload (off works around kernel and NIC bugs).
    pub segmentation_offload: bool,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            segmentation_offload: true,
        }
    }
}

fn transport(o: &TransportOptions) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(o.idle_timeout).ok());
    t.keep_alive_interval(Some(o.keep_alive));
    t.enable_segmentation_offload(o.segmentation_offload);
    // Batches of up to a few MiB in flight on one stream.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates of a PEM text.
pub fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| QuicError::Pem {
            what: what.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(QuicError::Pem {
            what: what.into(),
            reason: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, QuicError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| QuicError::Pem {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, QuicError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "operator CA")? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// Certificate revocation lists of a PEM text (none in an empty text).
pub fn crls(pem: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, QuicError> {
    CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| QuicError::Pem {
            what: "certificate revocation list".into(),
            reason: e.to_string(),
        })
}

/// The core's TLS and transport configuration: its certificate and key, the
/// operator CA for clients, and the operator's CRL (`crl_pem`; a node whose
/// certificate it lists is refused in the handshake). core-ingest builds it
/// again when the CRL file changes.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    crl_pem: &str,
    options: &TransportOptions,
) -> Result<quinn::ServerConfig, QuicError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .with_crls(crls(crl_pem)?)
            .build()
            .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem, "core certificate")?,
            key(key_pem, "core key")?,
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(options));
    Ok(config)
}

/// The core's endpoint ([`server_config`]) bound to `listen`.
pub fn server_endpoint(
    listen: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    crl_pem: &str,
    options: &TransportOptions,
) -> Result<quinn::Endpoint, QuicError> {
    let config = server_config(cert_pem, key_pem, ca_pem, crl_pem, options)?;
    let socket = std::net::UdpSocket::bind(listen)?;
    let (reset_key, cid_key) = restart_keys(key_pem);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    Ok(quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// The keys of the core's stateless reset tokens and of its connection ids,
/// derived from its private key, so that a core restarted with the same key
/// recognises its previous life's connection ids and answers them with the
/// tokens it promised: an edge still sending on such a connection gets a
/// stateless reset at once and reconnects, instead of waiting out the idle
/// timeout. (quinn's default keys are random per process, so a restarted
/// core drops those packets as invalid.)
fn restart_keys(key_pem: &str) -> (ring::hmac::Key, u64) {
    use ring::hkdf;
    /// An HKDF output length in bytes.
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    // HKDF-SHA256 (RFC 5869) keyed by the core's private key, one label each.
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"mec-usage/1 restart keys").extract(key_pem.as_bytes());
    let reset = ring::hmac::Key::from(
        prk.expand(&[b"stateless reset key"], ring::hmac::HMAC_SHA256)
            .expect("a 32-byte output is within HKDF's limit"),
    );
    let mut cid = [0u8; 8];
    prk.expand(&[b"connection id key"], Len(cid.len()))
        .and_then(|okm| okm.fill(&mut cid))
        .expect("an 8-byte output is within HKDF's limit");
    (reset, u64::from_le_bytes(cid))
}

/// The edge's endpoint: its node certificate and key, the operator CA for
/// the core.
pub fn client_endpoint(
    bind: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    options: &TransportOptions,
) -> Result<quinn::Endpoint, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(
            certs(cert_pem, "node certificate")?,
            key(key_pem, "node key")?,
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(options));
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The verified client certificate of a connection (the first of its chain).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}
