//! Writing a disk image to a device and proving it is there
//! (`edgeprov flash`, `edgeprov verify`), as balenaEtcher and bmaptool do:
//! write, sync, drop the cached pages, read back, compare SHA-256.
//!
//! The expected hash comes from the image's manifest when there is one
//! (`IMAGE.manifest.json`: `{"size": N, "sha256": "hex"}`, written by the
//! image build), else from the image file itself. A device that is mounted,
//! or that holds the running system's root filesystem, is refused before a
//! byte is written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const CHUNK: usize = 4 << 20;

/// Why flashing or verifying failed.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// The target must not be written.
    #[error("refusing {device}: {reason}")]
    Refused {
        /// The device.
        device: PathBuf,
        /// Why.
        reason: String,
    },
    /// The image does not match its own manifest.
    #[error("the image {image} does not match its manifest: {reason}")]
    BadImage {
        /// The image.
        image: PathBuf,
        /// How.
        reason: String,
    },
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FlashError + '_ {
    move |source| FlashError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the image should hash to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// The manifest beside `image`, if there is one.
pub fn manifest_of(image: &Path) -> Result<Option<Manifest>, FlashError> {
    let path = PathBuf::from(format!("{}.manifest.json", image.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| FlashError::BadImage {
                image: image.to_path_buf(),
                reason: format!("{}: {e}", path.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Refuses a target that is mounted or holds the running system.
pub fn check_target(device: &Path) -> Result<(), FlashError> {
    let refuse = |reason: String| FlashError::Refused {
        device: device.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(device).map_err(io(device))?;
    let canonical = std::fs::canonicalize(device).map_err(io(device))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // mountinfo: id parent major:minor root mountpoint ... - fstype source options
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (devno, mountpoint) = (
            fields.get(2).copied().unwrap_or(""),
            fields.get(4).copied().unwrap_or(""),
        );
        let source = fields.get(dash + 2).copied().unwrap_or("");
        let mounted_here = if meta.file_type().is_block_device() {
            let (maj, min) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            devno == format!("{maj}:{min}") || is_partition_of(devno, maj, min)
        } else {
            false
        };
        let named_here = is_same_or_partition(source, &canonical.to_string_lossy());
        if mounted_here || named_here {
            let what = if mountpoint == "/" {
                "it holds the running system's root filesystem".to_string()
            } else {
                format!("it is mounted at {mountpoint}; unmount it first")
            };
            return Err(refuse(what));
        }
    }
    if meta.file_type().is_file() || meta.file_type().is_block_device() {
        Ok(())
    } else {
        Err(refuse("not a block device or an image file".into()))
    }
}

/// Whether the mount source `source` is `disk` or one of its partitions
/// (`/dev/sda1` of `/dev/sda`, `/dev/nvme0n1p2` of `/dev/nvme0n1`).
fn is_same_or_partition(source: &str, disk: &str) -> bool {
    let Some(rest) = source.strip_prefix(disk) else {
        return false;
    };
    let rest = rest.strip_prefix('p').unwrap_or(rest);
    rest.chars().all(|c| c.is_ascii_digit())
}

/// Whether `devno` (major:minor) is a partition of the disk `maj:min`, per sysfs.
fn is_partition_of(devno: &str, maj: u32, min: u32) -> bool {
    let Ok(link) = std::fs::canonicalize(format!("/sys/dev/block/{devno}")) else {
        return false;
    };
    let Some(parent) = link.parent() else {
        return false;
    };
    std::fs::read_to_string(parent.join("dev"))
        .map(|d| d.trim() == format!("{maj}:{min}"))
        .unwrap_or(false)
}

/// What a flash or a verify found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlashReport {
    /// Bytes of the image.
    pub bytes: u64,
    /// What the image should hash to.
    pub expected_sha256: String,
    /// Where the expectation came from: "manifest" or "image".
    pub expected_from: &'static str,
    /// What the device holds over the image's length.
    pub device_sha256: String,
    /// They agree.
    pub ok: bool,
    /// The first byte that differs, when they do not.
    pub first_difference: Option<u64>,
}

/// Hashes `len` bytes of `file` from the start, calling `progress(bytes)`.
fn hash_prefix(
    file: &mut File,
    path: &Path,
    len: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<String, FlashError> {
    file.seek(SeekFrom::Start(0)).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want]).map_err(io(path))?;
        if n == 0 {
            return Err(io(path)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("ends at byte {done}, before the image's {len}"),
            )));
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The expected hash of `image`: its manifest's (after checking the image
/// against it) or its own. With `image_key`, the manifest must carry a
/// signature by that key (`IMAGE.manifest.json.sig`, see `mec_image`), or
/// nothing is trusted.
fn expected(
    image: &Path,
    image_key: Option<&ed25519_dalek::VerifyingKey>,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, String, &'static str), FlashError> {
    let signed = match image_key {
        Some(key) => {
            mec_image::manifest::read_verified(image, key).map_err(|e| FlashError::BadImage {
                image: image.to_path_buf(),
                reason: e.to_string(),
            })?;
            true
        }
        None => false,
    };
    let mut file = File::open(image).map_err(io(image))?;
    let len = file.metadata().map_err(io(image))?.len();
    let own = hash_prefix(&mut file, image, len, progress)?;
    match manifest_of(image)? {
        Some(m) if m.size != len || !m.sha256.eq_ignore_ascii_case(&own) => {
            Err(FlashError::BadImage {
                image: image.to_path_buf(),
                reason: format!(
                "the manifest says {} bytes with SHA-256 {}, the file has {len} bytes with {own}",
                m.size, m.sha256
            ),
            })
        }
        Some(m) if signed => Ok((len, m.sha256.to_lowercase(), "signed manifest")),
        Some(m) => Ok((len, m.sha256.to_lowercase(), "manifest")),
        None => Ok((len, own, "image")),
    }
}

/// Drops the cached pages of `file` so the next reads come from the device.
fn drop_cache(file: &File) {
    // SAFETY: a valid fd; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn first_difference(image: &Path, device: &Path, len: u64) -> Result<Option<u64>, FlashError> {
    let (mut a, mut b) = (
        File::open(image).map_err(io(image))?,
        File::open(device).map_err(io(device))?,
    );
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(CHUNK as u64) as usize;
        a.read_exact(&mut x[..want]).map_err(io(image))?;
        b.read_exact(&mut y[..want]).map_err(io(device))?;
        if let Some(i) = x[..want].iter().zip(&y[..want]).position(|(p, q)| p != q) {
            return Ok(Some(at + i as u64));
        }
        at += want as u64;
    }
    Ok(None)
}

/// Compares what `device` holds with `image` (and its manifest).
/// `progress(phase, bytes, total)`.
pub fn verify(
    image: &Path,
    image_key: Option<&ed25519_dalek::VerifyingKey>,
    device: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<FlashReport, FlashError> {
    let total = std::fs::metadata(image).map_err(io(image))?.len();
    let (len, expected_sha256, expected_from) =
        expected(image, image_key, &mut |b| progress("image", b, total))?;
    let mut dev = File::open(device).map_err(io(device))?;
    drop_cache(&dev);
    let device_sha256 = hash_prefix(&mut dev, device, len, &mut |b| {
        progress("read back", b, len)
    })?;
    let ok = device_sha256 == expected_sha256;
    let first_difference = if ok {
        None
    } else {
        first_difference(image, device, len)?
    };
    Ok(FlashReport {
        bytes: len,
        expected_sha256,
        expected_from,
        device_sha256,
        ok,
        first_difference,
    })
}

/// Writes `image` to `device`, syncs, and verifies by reading back.
pub fn flash(
    image: &Path,
    image_key: Option<&ed25519_dalek::VerifyingKey>,
    device: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<FlashReport, FlashError> {
    check_target(device)?;
    let total = std::fs::metadata(image).map_err(io(image))?.len();
    // A corrupt image (against its manifest) is refused before writing.
    expected(image, image_key, &mut |b| progress("check image", b, total))?;
    let mut src = File::open(image).map_err(io(image))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(io(device))?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io(image))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(io(device))?;
        done += n as u64;
        progress("write", done, total);
    }
    dst.sync_all().map_err(io(device))?;
    drop_cache(&dst);
    drop(dst);
    verify(image, image_key, device, progress)
}
