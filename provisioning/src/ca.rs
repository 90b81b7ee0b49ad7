//! The operator CA on the technician's side (`edgeprov ca`): an offline CA
//! directory holding `ca.crt` and `ca.key` (0600). It issues node
//! certificates for keys made on the boxes and signs factory-reset
//! authorizations.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use mec_node::pki::{generate_ca, issue_node_cert, CertAndKey};

/// A CA error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory already holds a CA.
    #[error("{0} already holds a CA (ca.key); refusing to overwrite it")]
    Exists(PathBuf),
    /// rcgen or the key refused.
    #[error("operator CA: {0}")]
    Pki(String),
}

/// An operator CA loaded from its directory.
pub struct OperatorCa {
    /// `ca.crt` and `ca.key`.
    pub pair: CertAndKey,
    /// Its directory.
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl OperatorCa {
    /// Makes a new CA in `dir` (created if missing); refuses to replace one.
    pub fn init(dir: &Path, name: &str) -> Result<OperatorCa, CaError> {
        let key_path = dir.join("ca.key");
        if key_path.exists() {
            return Err(CaError::Exists(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let pair = generate_ca(name).map_err(|e| CaError::Pki(e.to_string()))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io(&key_path))?;
        f.write_all(pair.key_pem.as_bytes())
            .map_err(io(&key_path))?;
        f.sync_all().map_err(io(&key_path))?;
        let cert_path = dir.join("ca.crt");
        crate::device::write_atomically(&cert_path, pair.cert_pem.as_bytes())
            .map_err(io(&cert_path))?;
        Ok(OperatorCa {
            pair,
            dir: dir.to_path_buf(),
        })
    }

    /// Loads the CA in `dir`: `ca.crt` and `ca.key`, or core-ingest's dev
    /// CA files `operator-ca.crt` and `operator-ca.key`.
    pub fn load(dir: &Path) -> Result<OperatorCa, CaError> {
        let (cert_path, key_path) =
            if !dir.join("ca.key").exists() && dir.join("operator-ca.key").exists() {
                (dir.join("operator-ca.crt"), dir.join("operator-ca.key"))
            } else {
                (dir.join("ca.crt"), dir.join("ca.key"))
            };
        Ok(OperatorCa {
            pair: CertAndKey {
                cert_pem: fs::read_to_string(&cert_path).map_err(io(&cert_path))?,
                key_pem: fs::read_to_string(&key_path).map_err(io(&key_path))?,
            },
            dir: dir.to_path_buf(),
        })
    }

    /// A node certificate for `node_id` and the box's public key (SPKI PEM).
    pub fn issue(&self, node_id: &str, public_key_pem: &str) -> Result<String, CaError> {
        issue_node_cert(&self.pair, node_id, public_key_pem)
            .map_err(|e| CaError::Pki(e.to_string()))
    }

    /// Signs a factory-reset authorization for one box's challenge.
    pub fn sign_reset(&self, device_id: &str, nonce: &[u8]) -> Result<Vec<u8>, CaError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.pair.key_pem.as_bytes())
            .map_err(|e| CaError::Pki(format!("ca.key is not PEM: {e}")))?;
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &pem.contents,
            &rng,
        )
        .map_err(|e| CaError::Pki(format!("ca.key is not an ECDSA P-256 key: {e}")))?;
        let signature = key
            .sign(&rng, &crate::reset_message(device_id, nonce))
            .map_err(|e| CaError::Pki(format!("signing: {e}")))?;
        Ok(signature.as_ref().to_vec())
    }
}
