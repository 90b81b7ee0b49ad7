//! Certificates as the box checks them: the node certificate (for the box's
//! Ed25519 key, naming its node id) and the operator CA that issued it, whose
//! key also authorises factory resets.

use ed25519_dalek::VerifyingKey;
use x509_parser::prelude::*;

fn der_of(pem: &str, what: &str) -> Result<Vec<u8>, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!(
            "{what} is a {:?} block, not a CERTIFICATE",
            block.label
        ));
    }
    Ok(block.contents)
}

/// A parsed node certificate.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// DER.
    pub der: Vec<u8>,
    /// From its `urn:mec:node:` name.
    pub node_id: String,
    /// The node's record and TLS key.
    pub public_key: VerifyingKey,
    /// End of validity, RFC 3339.
    pub not_after: String,
}

impl NodeCert {
    /// Parses a node certificate (PEM).
    pub fn parse(pem: &str) -> Result<NodeCert, String> {
        let der = der_of(pem, "the node certificate")?;
        let node_id = mec_node::pki::node_id_of(&der).map_err(|e| e.to_string())?;
        let public_key = mec_node::pki::ed25519_key_of(&der).map_err(|e| e.to_string())?;
        let (_, cert) = parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        let not_after = chrono::DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        Ok(NodeCert {
            der,
            node_id,
            public_key,
            not_after,
        })
    }
}

/// A parsed operator CA certificate.
#[derive(Debug, Clone)]
pub struct CaCert {
    /// DER.
    pub der: Vec<u8>,
}

impl CaCert {
    /// Parses a CA certificate (PEM): it must be a CA.
    pub fn parse(pem: &str) -> Result<CaCert, String> {
        let der = der_of(pem, "the operator CA")?;
        let (_, cert) = parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        if !cert.is_ca() {
            return Err("the operator CA certificate is not a CA".into());
        }
        Ok(CaCert { der })
    }

    fn cert(&self) -> X509Certificate<'_> {
        parse_x509_certificate(&self.der).expect("parsed before").1
    }

    /// Checks that this CA signed `node` and that `node` is valid now.
    pub fn check_issued(&self, node: &NodeCert) -> Result<(), String> {
        let ca = self.cert();
        let (_, cert) = parse_x509_certificate(&node.der).map_err(|e| e.to_string())?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| "the node certificate was not issued by this operator CA".to_string())?;
        if !cert.validity().is_valid() {
            return Err(format!(
                "the node certificate is not valid now (valid until {})",
                node.not_after
            ));
        }
        Ok(())
    }

    /// Checks `signature` over `message` with the CA's key (ECDSA P-256
    /// SHA-256, ASN.1 DER, as rcgen's default CA key signs).
    pub fn verify_signature(&self, message: &[u8], signature: &[u8]) -> bool {
        let ca = self.cert();
        let spki = ca.public_key();
        let key = spki.subject_public_key.data.as_ref();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
            .verify(message, signature)
            .is_ok()
    }
}
