//! The image's manifest: what the disk holds, hash by hash, signed with the
//! image-signing key (Ed25519) as a detached signature over the manifest
//! file's exact bytes.
//!
//! Files written by the build, beside the disk `NAME.img`:
//! - `NAME.img.manifest.json`: this manifest. Its top-level `size` and
//!   `sha256` are the whole disk's, which is what `edgeprov flash` and
//!   `verify` compare a device with;
//! - `NAME.img.manifest.json.sig`: 64 signature bytes, base64;
//! - the signing key's public half (SPKI PEM), to install on boxes and to
//!   give `edgeprov --image-key`.
//!
//! Signing the file's bytes, not a re-serialisation, means a verifier never
//! has to reproduce our JSON formatting: it checks the bytes it read, then
//! parses them.

use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A manifest error.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file that is not an Ed25519 key in PEM.
    #[error("{path}: not an Ed25519 key in PEM ({reason})")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The signature is missing, malformed or does not verify.
    #[error("the manifest's signature does not verify with the image key: {0}")]
    Signature(String),
    /// The manifest does not parse.
    #[error("the manifest is not valid: {0}")]
    Format(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One partition's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// GPT name.
    pub name: String,
    /// PARTUUID.
    pub uuid: String,
    /// Byte offset in the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes (hex).
    pub sha256: String,
}

/// A file of ours in the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path in the image.
    pub path: String,
    /// SHA-256 (hex).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// A Debian package in the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format of this file.
    pub format: String,
    /// The image's version.
    pub image_version: String,
    /// When it was built (the build's fixed time, RFC 3339).
    pub built_at: String,
    /// The disk's size in bytes.
    pub size: u64,
    /// The disk's SHA-256 (hex).
    pub sha256: String,
    /// Each partition.
    pub partitions: Vec<PartitionEntry>,
    /// Our binaries, the model, the configuration.
    pub files: Vec<FileEntry>,
    /// The Debian packages.
    pub packages: Vec<Package>,
    /// The signing key's id (hex of the first 8 bytes of its public key).
    pub signing_key_id: String,
    /// Whether that key is a development key made by the build.
    pub dev_signing_key: bool,
}

/// The manifest file beside `disk`.
pub fn manifest_path(disk: &Path) -> PathBuf {
    PathBuf::from(format!("{}.manifest.json", disk.display()))
}

/// Its signature file.
pub fn signature_path(disk: &Path) -> PathBuf {
    PathBuf::from(format!("{}.manifest.json.sig", disk.display()))
}

/// A key's id: hex of the first 8 bytes of the public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&key.as_bytes()[..8])
}

/// Reads an Ed25519 private key (PKCS#8 PEM).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, ManifestError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| ManifestError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads an Ed25519 public key (SPKI PEM).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, ManifestError> {
    let pem = std::fs::read_to_string(path).map_err(io(path))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| ManifestError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Makes a new key pair at `private` (0600) and `public`.
pub fn generate_signing_key(private: &Path, public: &Path) -> Result<SigningKey, ManifestError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| ManifestError::Key {
        path: private.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key = SigningKey::from_bytes(&seed);
    let key_err = |e: String| ManifestError::Key {
        path: private.to_path_buf(),
        reason: e,
    };
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| key_err(e.to_string()))?;
    let pub_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| key_err(e.to_string()))?;
    if let Some(dir) = private.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(private)
            .map_err(io(private))?;
        f.write_all(pem.as_bytes()).map_err(io(private))?;
    }
    std::fs::write(public, pub_pem).map_err(io(public))?;
    Ok(key)
}

/// An Ed25519 public key from SPKI PEM text.
pub fn parse_verifying_key(pem: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|e| format!("not an Ed25519 public key in PEM ({e})"))
}

/// A detached signature over `bytes`: 64 bytes, base64, with a newline.
pub fn sign_bytes(bytes: &[u8], key: &SigningKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.sign(bytes).to_bytes()) + "\n"
}

/// Checks a detached signature made by [`sign_bytes`]; `what` names the
/// signed thing in the error.
pub fn verify_bytes(
    bytes: &[u8],
    signature: &str,
    key: &VerifyingKey,
    what: &str,
) -> Result<(), ManifestError> {
    let sig_bytes = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|e| ManifestError::Signature(format!("{what}: {e}")))?;
    let sig = ed25519_dalek::Signature::from_slice(&sig_bytes)
        .map_err(|e| ManifestError::Signature(format!("{what}: {e}")))?;
    // The strict equation, as every signature check of the product.
    key.verify_strict(bytes, &sig).map_err(|_| {
        ManifestError::Signature(format!("{what} was not signed by key {}", key_id(key)))
    })
}

/// Writes the manifest and its signature beside `disk`.
pub fn write_signed(disk: &Path, m: &Manifest, key: &SigningKey) -> Result<(), ManifestError> {
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| ManifestError::Format(e.to_string()))?;
    let path = manifest_path(disk);
    std::fs::write(&path, &bytes).map_err(io(&path))?;
    let sig_path = signature_path(disk);
    std::fs::write(&sig_path, sign_bytes(&bytes, key)).map_err(io(&sig_path))?;
    Ok(())
}

/// Reads the manifest beside `disk`, checking its signature with `key`
/// first.
pub fn read_verified(disk: &Path, key: &VerifyingKey) -> Result<Manifest, ManifestError> {
    let path = manifest_path(disk);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let sig_path = signature_path(disk);
    let sig_text = std::fs::read_to_string(&sig_path).map_err(io(&sig_path))?;
    verify_bytes(&bytes, &sig_text, key, &path.display().to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| ManifestError::Format(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(key: &SigningKey) -> Manifest {
        Manifest {
            format: "mec-image-manifest/1".into(),
            image_version: "0.1.0".into(),
            built_at: "2026-11-23T00:00:00Z".into(),
            size: 4096,
            sha256: "00".repeat(32),
            partitions: vec![],
            files: vec![],
            packages: vec![Package {
                name: "systemd".into(),
                version: "252".into(),
            }],
            signing_key_id: key_id(&key.verifying_key()),
            dev_signing_key: true,
        }
    }

    #[test]
    fn a_signed_manifest_reads_back_and_any_change_or_other_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
        let key = generate_signing_key(&private, &public).unwrap();
        let disk = dir.path().join("disk.img");
        let m = sample(&key);
        write_signed(&disk, &m, &key).unwrap();
        let vk = read_verifying_key(&public).unwrap();
        assert_eq!(read_verified(&disk, &vk).unwrap(), m);
        assert_eq!(
            read_signing_key(&private).unwrap().to_bytes(),
            key.to_bytes()
        );

        // One byte changed in the manifest.
        let path = manifest_path(&disk);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"size\": 4096", "\"size\": 4097")).unwrap();
        assert!(matches!(
            read_verified(&disk, &vk),
            Err(ManifestError::Signature(_))
        ));
        std::fs::write(&path, &text).unwrap();

        // Another key.
        let other =
            generate_signing_key(&dir.path().join("o.pem"), &dir.path().join("o.pub")).unwrap();
        assert!(matches!(
            read_verified(&disk, &other.verifying_key()),
            Err(ManifestError::Signature(_))
        ));
        // No signature.
        std::fs::remove_file(signature_path(&disk)).unwrap();
        assert!(matches!(
            read_verified(&disk, &vk),
            Err(ManifestError::Io { .. })
        ));
    }
}
