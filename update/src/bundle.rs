//! The update bundle: one file, a tar archive whose entries come in a fixed
//! order, so a box can check the signature before it reads a byte of
//! payload, and read the payload from a stream (a file, or a USB stick's
//! block device: tar ends at its end-of-archive blocks).
//!
//! | entry | what |
//! |---|---|
//! | `bundle.json` | the [`BundleManifest`] (at most 1 MiB) |
//! | `bundle.json.sig` | its detached Ed25519 signature over the exact bytes (base64) |
//! | `vmlinuz` | the kernel |
//! | `initrd.img` | the initrd |
//! | `rootfs.ext4.zst` | the root filesystem, zstd |
//!
//! Each component is listed with the size and SHA-256 of its stored bytes
//! and of its content (after decompression). The key that checks the
//! signature is the operator's image key installed on the box at
//! provisioning; a bundle carries no key, and nothing in it is trusted
//! before the signature checks.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use mec_image::manifest::{self, ManifestError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's format tag.
pub const FORMAT: &str = "mec-update-bundle/1";
/// The manifest's entry name.
pub const MANIFEST_ENTRY: &str = "bundle.json";
/// The signature's entry name.
pub const SIGNATURE_ENTRY: &str = "bundle.json.sig";
/// The largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The components, in their order in the archive.
pub const COMPONENTS: [(&str, &str); 3] = [
    ("kernel", "vmlinuz"),
    ("initrd", "initrd.img"),
    ("rootfs", "rootfs.ext4.zst"),
];

/// What a box of this build accepts: the architecture's appliance.
pub fn compatible() -> String {
    format!("mec-edge-{}", std::env::consts::ARCH)
}

/// A bundle error. Every one is raised before anything is written, except
/// [`BundleError::Content`] during an apply's write pass (the slot written
/// then stays unbootable).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing a file. (The reason is in the message, not a
    /// `source`: printed with its chain, it would show twice.)
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not a bundle: not a tar, or entries missing, extra or out of order.
    #[error("not an update bundle: {0}")]
    NotABundle(String),
    /// The signature or the key.
    #[error(transparent)]
    Signature(#[from] ManifestError),
    /// The manifest parses but says something this box cannot use.
    #[error("the bundle's manifest: {0}")]
    Manifest(String),
    /// A component's stored bytes differ from the signed manifest.
    #[error(
        "{component}: {what} differs from the signed manifest (expected {expected}, found {found})"
    )]
    Stored {
        /// The component.
        component: String,
        /// `size` or `SHA-256`.
        what: &'static str,
        /// The manifest's value.
        expected: String,
        /// What the bundle holds.
        found: String,
    },
    /// A component's content (after decompression) differs.
    #[error("{component}: its content differs from the signed manifest ({source})")]
    Content {
        /// The component.
        component: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |error| BundleError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One component of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// `kernel`, `initrd` or `rootfs`.
    pub name: String,
    /// Its entry in the archive.
    pub file: String,
    /// `zstd`, or none for stored as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Bytes in the archive.
    pub size: u64,
    /// SHA-256 of those bytes.
    pub sha256: String,
    /// Bytes of content (after decompression).
    pub content_size: u64,
    /// SHA-256 of the content.
    pub content_sha256: String,
}

/// The signed manifest of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleManifest {
    /// [`FORMAT`].
    pub format: String,
    /// The image version inside.
    pub version: String,
    /// The build's time (RFC 3339).
    pub built_at: String,
    /// What box it is for ([`compatible`]).
    pub compatible: String,
    /// The components, in archive order.
    pub components: Vec<Component>,
    /// The signing key's id.
    pub signing_key_id: String,
    /// Whether a development key signed it.
    pub dev_signing_key: bool,
}

impl BundleManifest {
    /// The component `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Checks what the box needs before any payload is read.
    pub fn check(&self) -> Result<(), BundleError> {
        if self.format != FORMAT {
            return Err(BundleError::Manifest(format!(
                "format {:?}, this box reads {FORMAT:?}",
                self.format
            )));
        }
        if self.compatible != compatible() {
            return Err(BundleError::Manifest(format!(
                "made for {:?}, this box is {:?}",
                self.compatible,
                compatible()
            )));
        }
        let names: Vec<(&str, &str)> = self
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.file.as_str()))
            .collect();
        if names != COMPONENTS {
            return Err(BundleError::Manifest(format!(
                "components {names:?}, expected {COMPONENTS:?}"
            )));
        }
        for c in &self.components {
            match c.compression.as_deref() {
                None if c.size == c.content_size && c.sha256 == c.content_sha256 => {}
                Some("zstd") => {}
                other => {
                    return Err(BundleError::Manifest(format!(
                        "{}: compression {other:?} with these sizes is not readable here",
                        c.name
                    )))
                }
            }
        }
        Ok(())
    }
}

/// What [`write`] is given.
#[derive(Debug, Clone)]
pub struct BundleInputs<'a> {
    /// The image version.
    pub version: &'a str,
    /// The build's time (Unix seconds): the manifest's `built_at` and every
    /// entry's time, so bundles of the same inputs match.
    pub epoch: i64,
    /// The root filesystem image.
    pub rootfs: &'a Path,
    /// The kernel.
    pub kernel: &'a Path,
    /// The initrd.
    pub initrd: &'a Path,
    /// The image-signing key.
    pub key: &'a SigningKey,
    /// Whether that key is a development key.
    pub dev_signing_key: bool,
}

/// SHA-256 and length of everything `r` gives.
fn hash_reader(mut r: impl Read) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((hex::encode(h.finalize()), n));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Writes the bundle `out` (the compressed root filesystem is made beside
/// it first, then removed).
pub fn write(out: &Path, i: &BundleInputs<'_>) -> Result<BundleManifest, BundleError> {
    let zst = out.with_extension("rootfs.zst.tmp");
    {
        let src = std::fs::File::open(i.rootfs).map_err(io(i.rootfs))?;
        let dst = std::fs::File::create(&zst).map_err(io(&zst))?;
        zstd::stream::copy_encode(src, std::io::BufWriter::new(dst), 3).map_err(io(&zst))?;
    }
    let mut components = Vec::new();
    for (name, file) in COMPONENTS {
        let content = match name {
            "kernel" => i.kernel,
            "initrd" => i.initrd,
            _ => i.rootfs,
        };
        let stored = if name == "rootfs" {
            zst.as_path()
        } else {
            content
        };
        let (content_sha256, content_size) =
            hash_reader(std::fs::File::open(content).map_err(io(content))?).map_err(io(content))?;
        let (sha256, size) =
            hash_reader(std::fs::File::open(stored).map_err(io(stored))?).map_err(io(stored))?;
        components.push(Component {
            name: name.into(),
            file: file.into(),
            compression: (name == "rootfs").then(|| "zstd".to_string()),
            size,
            sha256,
            content_size,
            content_sha256,
        });
    }
    let m = BundleManifest {
        format: FORMAT.into(),
        version: i.version.into(),
        built_at: mec_image::build::rfc3339(i.epoch),
        compatible: compatible(),
        components,
        signing_key_id: manifest::key_id(&i.key.verifying_key()),
        dev_signing_key: i.dev_signing_key,
    };
    let bytes = serde_json::to_vec_pretty(&m).map_err(|e| BundleError::Manifest(e.to_string()))?;
    let sig = manifest::sign_bytes(&bytes, i.key);

    let tmp = out.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(i.epoch.max(0) as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h
    };
    let mut append = |name: &str, size: u64, data: &mut dyn Read| -> Result<(), BundleError> {
        let mut h = header(size);
        tar.append_data(&mut h, name, data).map_err(io(&tmp))
    };
    append(MANIFEST_ENTRY, bytes.len() as u64, &mut bytes.as_slice())?;
    append(SIGNATURE_ENTRY, sig.len() as u64, &mut sig.as_bytes())?;
    for c in &m.components {
        let path = match c.name.as_str() {
            "kernel" => i.kernel,
            "initrd" => i.initrd,
            _ => zst.as_path(),
        };
        let mut f = std::fs::File::open(path).map_err(io(path))?;
        append(&c.file, c.size, &mut f)?;
    }
    let mut w = tar.into_inner().map_err(io(&tmp))?;
    w.flush().map_err(io(&tmp))?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io(out))?;
    let _ = std::fs::remove_file(&zst);
    Ok(m)
}

/// A bundle being read, entry by entry, from a file or a block device.
pub struct BundleReader {
    path: PathBuf,
    archive: tar::Archive<std::io::BufReader<std::fs::File>>,
}

impl BundleReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<BundleReader, BundleError> {
        let f = std::fs::File::open(path).map_err(io(path))?;
        Ok(BundleReader {
            path: path.to_path_buf(),
            archive: tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f)),
        })
    }

    /// Reads the manifest and checks its signature with `key`, then checks
    /// it fits this box; then hands each component's stored bytes to
    /// `each`, in order, refusing any entry out of place. Returns the
    /// manifest.
    pub fn read(
        &mut self,
        key: &VerifyingKey,
        each: impl FnMut(&BundleManifest, &Component, &mut dyn Read) -> Result<(), BundleError>,
    ) -> Result<Verified, BundleError> {
        self.read_inner(key, true, each)
    }

    /// Reads and checks only the manifest and its signature.
    pub fn manifest(&mut self, key: &VerifyingKey) -> Result<Verified, BundleError> {
        self.read_inner(key, false, |_, _, _| Ok(()))
    }

    fn read_inner(
        &mut self,
        key: &VerifyingKey,
        components: bool,
        mut each: impl FnMut(&BundleManifest, &Component, &mut dyn Read) -> Result<(), BundleError>,
    ) -> Result<Verified, BundleError> {
        let path = self.path.clone();
        let not = |m: String| BundleError::NotABundle(format!("{}: {m}", path.display()));
        let mut entries = self
            .archive
            .entries()
            .map_err(|e| not(format!("not a tar archive ({e})")))?;
        let mut next = |want: &str| -> Result<tar::Entry<'_, _>, BundleError> {
            let e = entries
                .next()
                .ok_or_else(|| not(format!("ends before {want}")))?
                .map_err(|e| not(format!("a broken tar header before {want} ({e})")))?;
            let name = e
                .path()
                .map_err(|e| not(format!("an entry name ({e})")))?
                .to_string_lossy()
                .into_owned();
            if name != want {
                return Err(not(format!("found {name:?} where {want:?} belongs")));
            }
            if e.header().entry_type() != tar::EntryType::Regular {
                return Err(not(format!("{want} is not a regular file")));
            }
            Ok(e)
        };
        let read_small = |e: &mut dyn Read, what: &str| -> Result<Vec<u8>, BundleError> {
            let mut v = Vec::new();
            e.take(MAX_MANIFEST_BYTES + 1)
                .read_to_end(&mut v)
                .map_err(|e| not(format!("{what}: {e}")))?;
            if v.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(not(format!("{what} is over {MAX_MANIFEST_BYTES} bytes")));
            }
            Ok(v)
        };
        let bytes = read_small(&mut next(MANIFEST_ENTRY)?, MANIFEST_ENTRY)?;
        let sig = read_small(&mut next(SIGNATURE_ENTRY)?, SIGNATURE_ENTRY)?;
        manifest::verify_bytes(
            &bytes,
            &String::from_utf8_lossy(&sig),
            key,
            &format!("{} ({MANIFEST_ENTRY})", path.display()),
        )?;
        let m: BundleManifest = serde_json::from_slice(&bytes)
            .map_err(|e| BundleError::Manifest(format!("does not parse: {e}")))?;
        m.check()?;
        let verified = Verified {
            manifest_sha256: hex::encode(Sha256::digest(&bytes)),
            manifest: m,
        };
        if !components {
            return Ok(verified);
        }
        let m = &verified.manifest;
        for c in &m.components {
            let mut e = next(&c.file)?;
            if e.header().size().ok() != Some(c.size) {
                return Err(BundleError::Stored {
                    component: c.name.clone(),
                    what: "size",
                    expected: c.size.to_string(),
                    found: e.header().size().map(|s| s.to_string()).unwrap_or_default(),
                });
            }
            each(m, c, &mut e)?;
        }
        Ok(verified)
    }
}

/// A manifest whose signature checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The manifest.
    pub manifest: BundleManifest,
    /// SHA-256 of its signed bytes: the bundle's identity (it names every
    /// component's hash).
    pub manifest_sha256: String,
}

/// Reads `r` to its end through a SHA-256, failing if the bytes or their
/// count differ from what `c` says of the stored bytes.
pub fn check_stored(c: &Component, r: &mut dyn Read) -> Result<(), BundleError> {
    let (sha, n) =
        hash_reader(r).map_err(|e| BundleError::NotABundle(format!("{}: {e}", c.file)))?;
    if n != c.size {
        return Err(BundleError::Stored {
            component: c.name.clone(),
            what: "size",
            expected: c.size.to_string(),
            found: n.to_string(),
        });
    }
    if sha != c.sha256 {
        return Err(BundleError::Stored {
            component: c.name.clone(),
            what: "SHA-256",
            expected: c.sha256.clone(),
            found: sha,
        });
    }
    Ok(())
}

/// Checks a whole bundle with `key`, writing nothing: the signature, the
/// manifest, and every component's stored bytes.
pub fn verify(path: &Path, key: &VerifyingKey) -> Result<Verified, BundleError> {
    BundleReader::open(path)?.read(key, |_, c, r| check_stored(c, r))
}

/// A reader of a component's content (decompressed) that fails at its end
/// if the content's length or SHA-256 differ from the manifest: a slot
/// written from it is only made bootable after it reached the end cleanly.
pub struct ContentReader<'a> {
    inner: Box<dyn Read + 'a>,
    hasher: Sha256,
    read: u64,
    component: Component,
}

impl<'a> ContentReader<'a> {
    /// Wraps the stored bytes `stored` of `c`.
    pub fn new(c: &Component, stored: &'a mut dyn Read) -> std::io::Result<ContentReader<'a>> {
        let inner: Box<dyn Read + 'a> = match c.compression.as_deref() {
            Some("zstd") => Box::new(zstd::stream::read::Decoder::new(stored)?),
            _ => Box::new(stored),
        };
        Ok(ContentReader {
            inner,
            hasher: Sha256::new(),
            read: 0,
            component: c.clone(),
        })
    }
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.component.content_size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("over {} bytes of content", self.component.content_size),
            ));
        }
        if n == 0 {
            let sha = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if self.read != self.component.content_size || sha != self.component.content_sha256 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} bytes with SHA-256 {sha}, expected {} bytes with {}",
                        self.read, self.component.content_size, self.component.content_sha256
                    ),
                ));
            }
            self.hasher = Sha256::new();
            self.read = self.component.content_size;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        key: SigningKey,
        public: VerifyingKey,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = manifest::generate_signing_key(&dir.path().join("k"), &dir.path().join("k.pub"))
            .unwrap();
        let public = key.verifying_key();
        // A root filesystem with zeros and data, a kernel, an initrd.
        let mut rootfs = vec![0u8; 3 << 20];
        rootfs[1 << 20..(1 << 20) + 11].copy_from_slice(b"hello slots");
        std::fs::write(dir.path().join("rootfs.ext4"), &rootfs).unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"kernel bytes").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"initrd bytes").unwrap();
        Fixture { dir, key, public }
    }

    fn build(f: &Fixture, version: &str) -> PathBuf {
        let out = f.dir.path().join(format!("edge-{version}.bundle"));
        write(
            &out,
            &BundleInputs {
                version,
                epoch: 1_700_000_000,
                rootfs: &f.dir.path().join("rootfs.ext4"),
                kernel: &f.dir.path().join("vmlinuz"),
                initrd: &f.dir.path().join("initrd.img"),
                key: &f.key,
                dev_signing_key: true,
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn a_bundle_verifies_and_gives_back_its_content() {
        let f = fixture();
        let b = build(&f, "0.2.0");
        let m = verify(&b, &f.public).unwrap().manifest;
        assert_eq!(m.version, "0.2.0");
        let rootfs = m.component("rootfs").unwrap();
        assert!(rootfs.size < rootfs.content_size / 10, "{rootfs:?}");
        let mut got = Vec::new();
        BundleReader::open(&b)
            .unwrap()
            .read(&f.public, |_, c, r| {
                let mut v = Vec::new();
                ContentReader::new(c, r)
                    .unwrap()
                    .read_to_end(&mut v)
                    .unwrap();
                got.push((c.name.clone(), v));
                Ok(())
            })
            .unwrap();
        assert_eq!(got[0], ("kernel".into(), b"kernel bytes".to_vec()));
        assert_eq!(
            got[2].1,
            std::fs::read(f.dir.path().join("rootfs.ext4")).unwrap()
        );
        // Same inputs, same bytes.
        let again = f.dir.path().join("again.bundle");
        std::fs::copy(&b, &again).unwrap();
        build(&f, "0.2.0");
        assert_eq!(std::fs::read(&b).unwrap(), std::fs::read(&again).unwrap());
    }

    #[test]
    fn another_key_a_flipped_byte_or_a_cut_bundle_is_refused() {
        let f = fixture();
        let b = build(&f, "0.2.0");
        let other = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let e = verify(&b, &other).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");

        let bytes = std::fs::read(&b).unwrap();
        // A byte of the compressed root filesystem (the last entry's data,
        // after its 512-byte header).
        let zst = verify(&b, &f.public)
            .unwrap()
            .manifest
            .component("rootfs")
            .unwrap()
            .size as usize;
        let header = bytes
            .windows(15)
            .rposition(|w| w == b"rootfs.ext4.zst")
            .unwrap();
        let mut flipped = bytes.clone();
        flipped[header + 512 + zst / 2] ^= 0x40;
        let p = f.dir.path().join("flipped.bundle");
        std::fs::write(&p, &flipped).unwrap();
        let e = verify(&p, &f.public).unwrap_err();
        assert!(
            matches!(
                e,
                BundleError::Stored {
                    what: "SHA-256",
                    ..
                }
            ),
            "{e}"
        );
        // A byte of the manifest: the signature no longer holds.
        let mut flipped = bytes.clone();
        let at = bytes.windows(7).position(|w| w == b"\"0.2.0\"").unwrap() + 3;
        flipped[at] = b'9';
        std::fs::write(&p, &flipped).unwrap();
        let e = verify(&p, &f.public).unwrap_err();
        assert!(matches!(e, BundleError::Signature(_)), "{e}");
        // Cut short.
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(verify(&p, &f.public).is_err());
        // Not a tar at all.
        std::fs::write(&p, b"MZ not a bundle").unwrap();
        let e = verify(&p, &f.public).unwrap_err();
        assert!(matches!(e, BundleError::NotABundle(_)), "{e}");
    }

    #[test]
    fn entries_out_of_order_are_refused_before_their_payload_is_used() {
        let f = fixture();
        let p = f.dir.path().join("odd.bundle");
        let mut tar = tar::Builder::new(std::fs::File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        tar.append_data(&mut h, "vmlinuz", &b"abc"[..]).unwrap();
        tar.finish().unwrap();
        drop(tar);
        let e = verify(&p, &f.public).unwrap_err().to_string();
        assert!(e.contains("\"vmlinuz\" where \"bundle.json\""), "{e}");
    }

    #[test]
    fn content_that_differs_from_the_manifest_fails_at_its_end() {
        let c = Component {
            name: "kernel".into(),
            file: "vmlinuz".into(),
            compression: None,
            size: 3,
            sha256: hex::encode(Sha256::digest(b"abc")),
            content_size: 3,
            content_sha256: hex::encode(Sha256::digest(b"abc")),
        };
        let mut ok = &b"abc"[..];
        let mut v = Vec::new();
        ContentReader::new(&c, &mut ok)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        let mut bad = &b"abd"[..];
        assert!(ContentReader::new(&c, &mut bad)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .is_err());
        let mut long = &b"abcd"[..];
        assert!(ContentReader::new(&c, &mut long)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .is_err());
    }
}
