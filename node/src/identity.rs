//! Node identity: the Ed25519 key pair of one box.
//!
//! Layout of an identity directory (later issues add `node.crt` and
//! `operator-ca.crt` beside these):
//!
//! | file       | content                               | mode |
//! |------------|---------------------------------------|------|
//! | `node.key` | private key, PKCS#8 PEM               | 0600 |
//! | `node.pub` | public key, SubjectPublicKeyInfo PEM  | 0644 |
//!
//! The private key is generated on the box and never leaves it. A key file
//! that group or others can read is refused: a leaked signing key would let
//! anyone forge usage records in this node's name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// File name of the private key inside an identity directory.
pub const KEY_FILE: &str = "node.key";
/// File name of the public key inside an identity directory.
pub const PUB_FILE: &str = "node.pub";

/// Errors loading or creating a node identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The private key file is readable by group or others.
    #[error("{path}: private key has mode {mode:o}; it must not be readable by group or others (run `chmod 600 {path}`)")]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file is not a valid PEM key of the expected kind.
    #[error("{path}: not an Ed25519 {kind} PEM key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// "PKCS#8 private" or "SubjectPublicKeyInfo public".
        kind: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// `node.pub` does not belong to `node.key`.
    #[error("{path}: public key does not match the private key in {KEY_FILE}")]
    Mismatch {
        /// The public key file.
        path: PathBuf,
    },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One node's signing identity.
#[derive(Clone)]
pub struct NodeIdentity {
    signing_key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// `key_id` of a public key: lowercase hex of the first 8 bytes of SHA-256 over
/// the raw 32-byte key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

impl NodeIdentity {
    /// Wraps an existing key (tests and benchmarks).
    pub fn from_signing_key(signing_key: SigningKey) -> NodeIdentity {
        let key_id = key_id(&signing_key.verifying_key());
        NodeIdentity {
            signing_key,
            key_id,
        }
    }

    /// Generates a fresh key from the operating system's random source.
    pub fn generate() -> Result<NodeIdentity, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(NodeIdentity::from_signing_key(SigningKey::from_bytes(
            &seed,
        )))
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing_key
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// The key id written into every record.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> String {
        self.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("an Ed25519 public key always encodes")
    }

    /// Loads the identity in `dir`, refusing a key file others can read and a
    /// `node.pub` that does not match.
    pub fn load(dir: &Path) -> Result<NodeIdentity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let meta = fs::metadata(&key_path).map_err(io_err(&key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::InsecureKeyFile {
                path: key_path,
                mode,
            });
        }
        let pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let signing_key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| IdentityError::BadKey {
            path: key_path.clone(),
            kind: "PKCS#8 private",
            reason: e.to_string(),
        })?;
        let identity = NodeIdentity::from_signing_key(signing_key);
        let pub_path = dir.join(PUB_FILE);
        if pub_path.exists() {
            let public = load_public_key(&pub_path)?;
            if public != identity.verifying_key() {
                return Err(IdentityError::Mismatch { path: pub_path });
            }
        }
        Ok(identity)
    }

    /// Writes a newly generated identity into `dir` (created if missing).
    /// Refuses to overwrite an existing `node.key`.
    pub fn create(dir: &Path) -> Result<NodeIdentity, IdentityError> {
        let identity = NodeIdentity::generate()?;
        identity.write_to(dir)?;
        Ok(identity)
    }

    /// Loads the identity in `dir`, or creates one when `dir` has no `node.key`.
    pub fn load_or_create(dir: &Path) -> Result<NodeIdentity, IdentityError> {
        if dir.join(KEY_FILE).exists() {
            NodeIdentity::load(dir)
        } else {
            NodeIdentity::create(dir)
        }
    }

    /// Writes this identity's key files into `dir`. The private key is created
    /// with mode 0600 from the start (never chmod-ed after the fact) and
    /// exclusively: an existing key is never overwritten.
    pub fn write_to(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join(KEY_FILE);
        let pem = self
            .signing_key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("an Ed25519 private key always encodes");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io_err(&key_path))?;
        f.write_all(pem.as_bytes()).map_err(io_err(&key_path))?;
        f.sync_all().map_err(io_err(&key_path))?;

        let pub_path = dir.join(PUB_FILE);
        let tmp = dir.join(format!("{PUB_FILE}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(self.public_key_pem().as_bytes())
            .map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &pub_path).map_err(io_err(&pub_path))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        Ok(())
    }
}

/// Reads a SubjectPublicKeyInfo PEM Ed25519 public key (`node.pub`).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, IdentityError> {
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| IdentityError::BadKey {
        path: path.to_path_buf(),
        kind: "SubjectPublicKeyInfo public",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_gives_the_same_key_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let created = NodeIdentity::create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = NodeIdentity::load(dir.path()).unwrap();
        assert_eq!(created.verifying_key(), loaded.verifying_key());
        assert_eq!(created.key_id(), loaded.key_id());
        assert_eq!(
            load_public_key(&dir.path().join(PUB_FILE)).unwrap(),
            created.verifying_key()
        );
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeIdentity::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::InsecureKeyFile { mode: 0o644, .. }),
            "{err}"
        );
    }

    #[test]
    fn existing_key_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::create(dir.path()).unwrap();
        assert!(matches!(
            NodeIdentity::create(dir.path()),
            Err(IdentityError::Io { .. })
        ));
    }

    #[test]
    fn mismatched_public_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        NodeIdentity::create(a.path()).unwrap();
        NodeIdentity::create(b.path()).unwrap();
        fs::copy(b.path().join(PUB_FILE), a.path().join(PUB_FILE)).unwrap();
        assert!(matches!(
            NodeIdentity::load(a.path()),
            Err(IdentityError::Mismatch { .. })
        ));
    }

    #[test]
    fn garbage_key_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(KEY_FILE);
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        fs::write(&key, "not a key").unwrap();
        let err = NodeIdentity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("node.key") && err.contains("PKCS#8"), "{err}");
    }
}
