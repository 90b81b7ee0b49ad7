//! The operator's dev PKI (rcgen): an operator CA, the core's server
//! certificate, and node certificates for the nodes' own Ed25519 keys (the
//! key that signs usage records also authenticates the node in TLS, so a
//! certificate binds a node id to exactly the key its records must verify
//! with). Field enrollment comes with provisioning; this is for dev and tests.
//!
//! A node certificate names the node in its Common Name and in a URI
//! subject alternative name `urn:mec:node:<id>`; core-ingest reads the id
//! from the certificate the handshake verified, never from the payload.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;

/// How long a node certificate is valid.
pub const NODE_CERT_YEARS: i32 = 5;

/// The URI prefix of a node's subject alternative name.
pub const NODE_URI_PREFIX: &str = "urn:mec:node:";

/// A PKI error.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate that does not parse or names no node.
    #[error("certificate: {0}")]
    Parse(String),
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A new operator CA (ECDSA P-256), self-signed.
pub fn generate_ca(name: &str) -> Result<CertAndKey, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issuer(ca: &CertAndKey) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&ca.key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca.cert_pem, key)?)
}

/// The core's server certificate for `names` (DNS names or IP addresses).
pub fn issue_server_cert(ca: &CertAndKey, names: &[String]) -> Result<CertAndKey, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "core-ingest");
    for n in names {
        params.subject_alt_names.push(match n.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into()?),
        });
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A node certificate binding `node_id` to the node's public key (SPKI PEM,
/// as `identity/node.pub` holds it).
pub fn issue_node_cert(
    ca: &CertAndKey,
    node_id: &str,
    public_key_pem: &str,
) -> Result<String, PkiError> {
    if node_id.is_empty() || node_id.len() > 128 || !node_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PkiError::Parse(format!("{node_id:?} is not a node id")));
    }
    let public_key = SubjectPublicKeyInfo::from_pem(public_key_pem)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, node_id);
    params.subject_alt_names.push(SanType::URI(
        format!("{NODE_URI_PREFIX}{node_id}").try_into()?,
    ));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Valid from a day back (a box's clock may lag before it syncs) for
    // NODE_CERT_YEARS: a box is re-enrolled well within its service life.
    use chrono::Datelike;
    let since = chrono::Utc::now() - chrono::Duration::days(1);
    params.not_before = rcgen::date_time_ymd(since.year(), since.month() as u8, since.day() as u8);
    params.not_after = rcgen::date_time_ymd(
        since.year() + NODE_CERT_YEARS,
        since.month() as u8,
        since.day().min(28) as u8,
    );
    let cert = params.signed_by(&public_key, &issuer(ca)?)?;
    Ok(cert.pem())
}

/// The node id of a (verified) node certificate, from its `urn:mec:node:`
/// URI name.
pub fn node_id_of(cert_der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?
        .ok_or_else(|| PkiError::Parse("no subject alternative name".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => {
                u.strip_prefix(NODE_URI_PREFIX).map(str::to_string)
            }
            _ => None,
        })
        .ok_or_else(|| PkiError::Parse(format!("no {NODE_URI_PREFIX} name")))
}

/// The raw Ed25519 public key of a node certificate (32 bytes), to verify
/// its records with.
pub fn ed25519_key_of(cert_der: &[u8]) -> Result<ed25519_dalek::VerifyingKey, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let raw: [u8; 32] = cert
        .public_key()
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PkiError::Parse("the certificate's key is not Ed25519".into()))?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|e| PkiError::Parse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeIdentity;

    fn der(pem_text: &str) -> Vec<u8> {
        let b64: String = pem_text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
    }

    #[test]
    fn a_node_certificate_carries_the_node_id_and_its_record_key() {
        let ca = generate_ca("dev operator CA").unwrap();
        let node = NodeIdentity::generate().unwrap();
        let cert = issue_node_cert(&ca, "edge-0001", &node.public_key_pem()).unwrap();
        assert_eq!(node_id_of(&der(&cert)).unwrap(), "edge-0001");
        let cert_der = der(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
        let (from, until) = (
            parsed.validity().not_before.timestamp(),
            parsed.validity().not_after.timestamp(),
        );
        let now = chrono::Utc::now().timestamp();
        assert!(
            from <= now && now - from <= 2 * 86_400,
            "valid from about a day back"
        );
        let years = (until - from) as f64 / (365.25 * 86_400.0);
        assert!((4.9..5.1).contains(&years), "{years} years");
        assert_eq!(ed25519_key_of(&der(&cert)).unwrap(), node.verifying_key());
        let server =
            issue_server_cert(&ca, &["localhost".into(), "127.0.0.1".into(), "::1".into()])
                .unwrap();
        assert!(node_id_of(&der(&server.cert_pem)).is_err());
        assert!(issue_node_cert(&ca, "bad id", &node.public_key_pem()).is_err());
    }
}

/// The serial number of a certificate (PEM), as a CRL names it.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(cert.tbs_certificate.raw_serial().to_vec())
}

/// A revoked certificate: its serial number and when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number.
    pub serial: Vec<u8>,
    /// When it was revoked (Unix seconds).
    pub at_unix: i64,
}

/// The revoked certificates and the number of a CRL (PEM) signed by `ca`;
/// an empty text is an empty list, number 0. A CRL another issuer signed
/// is refused.
pub fn read_crl(ca: &CertAndKey, crl_pem: &str) -> Result<(Vec<Revoked>, u64), PkiError> {
    if crl_pem.trim().is_empty() {
        return Ok((Vec::new(), 0));
    }
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|e| PkiError::Parse(format!("CRL: {e}")))?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
        .map_err(|e| PkiError::Parse(format!("CRL: {e}")))?;
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca_der.as_ref())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    crl.verify_signature(ca_cert.public_key())
        .map_err(|e| PkiError::Parse(format!("CRL: not signed by the operator CA: {e}")))?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.raw_serial().to_vec(),
            at_unix: r.revocation_date.timestamp(),
        })
        .collect();
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    Ok((revoked, number))
}

/// A CRL (PEM) of `revoked`, number `number`, signed by the operator CA.
pub fn make_crl(ca: &CertAndKey, revoked: &[Revoked], number: u64) -> Result<String, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        // Valid for long: the core reads the operator's current file, and a
        // node is refused as long as the list names it.
        next_update: now + time::Duration::days(3650),
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(r.at_unix)
                    .unwrap_or(now),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer(ca)?)?.pem()?)
}
