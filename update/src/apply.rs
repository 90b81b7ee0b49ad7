//! Applying a bundle on a box, and reading its slots: the I/O around
//! [`crate::boot`] and [`crate::bundle`].
//!
//! The order of an apply is what makes a power cut harmless:
//!
//! 1. the manifest's signature, with the operator's key; the decision
//!    ([`crate::boot::plan`]): the running slot is good, the version is newer,
//!    it did not fail here before;
//! 2. the whole bundle read once, every stored byte checked against the
//!    signed manifest. Nothing has been written until here;
//! 3. the target slot's loader entry and `slot.json` removed (and the
//!    directory synced): from now on the target is not bootable;
//! 4. kernel and initrd to `edge-<slot>/` on the ESP, the root filesystem to
//!    the slot's partition, each checked again against the manifest as it
//!    is written (decompressed content), then synced;
//! 5. `slot.json`, then the loader entry `edge-<slot>+3.conf`, each written
//!    to a temporary name and renamed, then the directory synced.
//!
//! A cut before step 5 leaves no entry for the target, so the running slot
//! is the one that boots; systemd-boot ignores the temporary names.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ed25519_dalek::VerifyingKey;
use mec_image::layout::{Layout, Sizes};
use serde::{Deserialize, Serialize};

use crate::boot::{self, ApplyOptions, Entry, EspView, Refusal, Slot, SlotInfo, SlotStatus};
use crate::bundle::{self, BundleError, BundleReader, ContentReader};

/// An update error.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The bundle: unreadable, not signed by the operator's key, or its
    /// bytes differ from its manifest.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The bundle is fine but is not applied here (see the reason).
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// A file of the box.
    /// (The reason is in the message, not a `source`: printed with its
    /// chain, it would show twice.)
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The box is not in a state to take an update.
    #[error("{0}")]
    Box(String),
    /// Another apply runs (nothing was done).
    #[error("another update is being applied on this box; try again when it ends")]
    Busy,
    /// Writing the target slot failed after it was made unbootable: it
    /// stays so, and the running slot still boots. A new apply starts over.
    #[error("writing slot {slot:?} failed ({source}); that slot is left unbootable and the running slot still boots")]
    Interrupted {
        /// The slot being written.
        slot: Slot,
        /// Why.
        source: Box<UpdateError>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |error| UpdateError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Where things are on a box. [`BoxPaths::system`] is the appliance's;
/// tests point them into a directory.
#[derive(Debug, Clone)]
pub struct BoxPaths {
    /// The ESP's mount point (`/efi`).
    pub esp: PathBuf,
    /// The running root's image info (`/usr/share/edge/image.json`).
    pub image_info: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// Each slot's block device.
    pub devices: BTreeMap<Slot, PathBuf>,
    /// The EFI variables (`/sys/firmware/efi/efivars`).
    pub efivars: PathBuf,
}

/// systemd-boot's vendor GUID for its EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Variables that override the boot order; an apply clears them.
const LOADER_OVERRIDES: [&str; 2] = ["LoaderEntryDefault", "LoaderEntryOneShot"];

/// A loader variable's string (efivarfs: 4 bytes of attributes, then
/// UTF-16LE up to a NUL), if set.
fn loader_variable(paths: &BoxPaths, name: &str) -> Option<String> {
    let bytes = std::fs::read(paths.efivars.join(format!("{name}-{LOADER_GUID}"))).ok()?;
    let units: Vec<u16> = bytes
        .get(4..)?
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

/// The exclusive lock one apply holds on the ESP's root directory
/// (`flock`: released when the file closes, also when the process dies).
fn lock_box(paths: &BoxPaths) -> Result<std::fs::File, UpdateError> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(&paths.esp).map_err(io(&paths.esp))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            UpdateError::Busy
        } else {
            io(&paths.esp)(e)
        });
    }
    Ok(dir)
}

/// Deletes a variable file. efivarfs makes its files immutable: when the
/// unlink is refused, the flag is cleared (as `chattr -i` does) and the
/// unlink tried again.
fn remove_variable(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::fd::AsRawFd;
            const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
            const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
            const FS_IMMUTABLE_FL: libc::c_int = 0x10;
            let f = std::fs::File::open(path)?;
            let mut flags: libc::c_int = 0;
            // SAFETY: both ioctls read or write one int through a valid pointer.
            unsafe {
                if libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS as _, &mut flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                flags &= !FS_IMMUTABLE_FL;
                if libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS as _, &flags) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            std::fs::remove_file(path)
        }
        other => other,
    }
}

/// Clears the variables that would boot another entry than the order says.
/// A failure is logged: the slot is written, and `update status` shows the
/// override.
fn clear_loader_overrides(paths: &BoxPaths) {
    for name in LOADER_OVERRIDES {
        if let Some(value) = loader_variable(paths, name) {
            let path = paths.efivars.join(format!("{name}-{LOADER_GUID}"));
            match remove_variable(&path) {
                Ok(()) => tracing::info!(variable = name, %value, "cleared a boot loader override"),
                Err(e) => {
                    tracing::warn!(variable = name, %value, error = %e, "could not clear a boot loader override: the next boot follows it")
                }
            }
        }
    }
}

impl BoxPaths {
    /// The appliance's paths: the slots' partitions by their fixed GUIDs.
    pub fn system() -> BoxPaths {
        let layout = Layout::new(Sizes::default());
        let devices = Slot::ALL
            .iter()
            .filter_map(|&s| {
                layout.get(&s.partition()).map(|p| {
                    (
                        s,
                        PathBuf::from(format!("/dev/disk/by-partuuid/{}", p.uuid.to_lowercase())),
                    )
                })
            })
            .collect();
        BoxPaths {
            esp: "/efi".into(),
            image_info: mec_image::files::IMAGE_INFO.into(),
            cmdline: "/proc/cmdline".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            devices,
            efivars: "/sys/firmware/efi/efivars".into(),
        }
    }

    fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.esp.join(slot.entry_id())
    }
}

/// Reads the ESP: every loader entry and each slot's `slot.json`. A
/// `slot.json` that does not parse counts as absent (the slot's entry, if
/// any, still says whether it boots).
pub fn read_esp(paths: &BoxPaths) -> Result<EspView, UpdateError> {
    let dir = paths.entries_dir();
    let mut view = EspView::default();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type().map_err(io(&e.path()))?.is_file() {
            continue;
        }
        let Some(_) = boot::EntryName::parse(&name) else {
            continue;
        };
        let body = std::fs::read_to_string(e.path()).map_err(io(&e.path()))?;
        if let Some(entry) = Entry::parse(&name, &body) {
            view.entries.push(entry);
        }
    }
    view.entries.sort_by(|a, b| a.name.id.cmp(&b.name.id));
    view.loader_default = loader_variable(paths, "LoaderEntryDefault");
    for slot in Slot::ALL {
        let p = paths.slot_dir(slot).join("slot.json");
        match std::fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice::<SlotInfo>(&bytes) {
                Ok(info) => {
                    view.slots.insert(slot, info);
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "a slot.json that does not parse")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    Ok(view)
}

/// `update status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The slot the running system booted from.
    pub booted: Option<Slot>,
    /// The running root's image version.
    pub running_version: Option<String>,
    /// The slot systemd-boot boots next.
    pub next_boot: Option<Slot>,
    /// Both slots.
    pub slots: Vec<SlotStatus>,
    /// A default entry set in the firmware (`LoaderEntryDefault`), which
    /// overrides the order until the next apply clears it.
    pub loader_default: Option<String>,
}

fn running_version(paths: &BoxPaths) -> Option<String> {
    let bytes = std::fs::read(&paths.image_info).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v["version"].as_str().map(str::to_string)
}

fn booted(paths: &BoxPaths) -> Option<Slot> {
    std::fs::read_to_string(&paths.cmdline)
        .ok()
        .and_then(|c| Slot::from_cmdline(&c))
}

/// The box's slots as they stand.
pub fn status(paths: &BoxPaths) -> Result<Status, UpdateError> {
    let esp = read_esp(paths)?;
    let booted = booted(paths);
    Ok(Status {
        booted,
        running_version: running_version(paths),
        next_boot: esp.next_boot(),
        slots: esp.status(booted),
        loader_default: esp.loader_default.clone(),
    })
}

/// Progress of an apply, for a bar or a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// `verify`, `kernel`, `initrd`, `rootfs`, `entry`.
    pub stage: &'static str,
    /// Bytes done in this stage.
    pub done: u64,
    /// Bytes in this stage.
    pub total: u64,
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Applied {
    /// The slot written.
    pub slot: Slot,
    /// The version now in it.
    pub version: String,
    /// Its install generation.
    pub generation: u64,
    /// Its new loader entry.
    pub entry: String,
    /// Seconds spent checking the bundle before any write.
    pub verify_s: f64,
    /// Seconds spent writing and syncing.
    pub write_s: f64,
}

/// The block device's (or file's) size.
fn device_size(path: &Path) -> Result<u64, UpdateError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::End(0)).map_err(io(path))
}

/// Whether `device` is mounted (its canonical path is a mount's source).
fn mounted(paths: &BoxPaths, device: &Path) -> Result<bool, UpdateError> {
    let dev = std::fs::canonicalize(device).map_err(io(device))?;
    let table = match std::fs::read_to_string(&paths.mountinfo) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&paths.mountinfo)(e)),
    };
    Ok(table.lines().any(|l| {
        // `... - fstype source options`: the source follows the separator.
        l.split(" - ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|src| std::fs::canonicalize(src).ok())
            .is_some_and(|src| src == dev)
    }))
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Writes `bytes` to `path` by a temporary name and a rename.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Copies `r` into `w`, reporting progress; returns the bytes copied.
fn copy(
    stage: &'static str,
    total: u64,
    r: &mut dyn Read,
    w: &mut dyn Write,
    progress: &mut dyn FnMut(Progress),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_report = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            progress(Progress { stage, done, total });
            return Ok(done);
        }
        w.write_all(&buf[..n])?;
        done += n as u64;
        if done - last_report >= 64 << 20 {
            last_report = done;
            progress(Progress { stage, done, total });
        }
    }
}

/// Applies `bundle` to the slot not running (see the module's docs for the
/// order of the steps). `key` is the operator's image key.
pub fn apply(
    paths: &BoxPaths,
    bundle_path: &Path,
    key: &VerifyingKey,
    opts: ApplyOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Applied, UpdateError> {
    // One apply at a time, whoever asks (a USB stick, the admin API, a
    // shell): an exclusive lock on the ESP's root directory, held to the end.
    let _lock = lock_box(paths)?;
    // 1. The signature and the decision.
    let verified = BundleReader::open(bundle_path)?.manifest(key)?;
    let m = &verified.manifest;
    let esp = read_esp(paths)?;
    let running = running_version(paths).ok_or_else(|| {
        UpdateError::Box(format!(
            "{} does not say which version runs",
            paths.image_info.display()
        ))
    })?;
    let plan = boot::plan(&esp, booted(paths), &running, &m.version, opts)?;
    let target = plan.target;
    let device = paths
        .devices
        .get(&target)
        .ok_or_else(|| UpdateError::Box(format!("no device for slot {}", target.name())))?
        .clone();
    let rootfs = m
        .component("rootfs")
        .ok_or_else(|| UpdateError::Box("the bundle has no rootfs".into()))?;
    let size = device_size(&device)?;
    if rootfs.content_size > size {
        return Err(UpdateError::Box(format!(
            "the root filesystem ({} bytes) does not fit slot {}'s partition {} ({size} bytes)",
            rootfs.content_size,
            target.name(),
            device.display()
        )));
    }
    if mounted(paths, &device)? {
        return Err(UpdateError::Box(format!(
            "slot {}'s partition {} is mounted: refusing to write it",
            target.name(),
            device.display()
        )));
    }

    // 2. Every stored byte, before any write.
    let started = Instant::now();
    let total: u64 = m.components.iter().map(|c| c.size).sum();
    let mut done = 0u64;
    let again = BundleReader::open(bundle_path)?.read(key, |_, c, r| {
        bundle::check_stored(c, r)?;
        done += c.size;
        progress(Progress {
            stage: "verify",
            done,
            total,
        });
        Ok(())
    })?;
    if again.manifest_sha256 != verified.manifest_sha256 {
        return Err(UpdateError::Box(
            "the bundle changed while it was read".into(),
        ));
    }
    let verify_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let entry = write_slot(
        paths,
        bundle_path,
        key,
        m,
        &verified,
        plan,
        &device,
        progress,
    )
    .map_err(|e| UpdateError::Interrupted {
        slot: target,
        source: Box::new(e),
    })?;
    clear_loader_overrides(paths);
    progress(Progress {
        stage: "entry",
        done: 1,
        total: 1,
    });
    tracing::info!(slot = target.name(), version = %m.version, generation = plan.generation, %entry, "update applied; the slot boots next");
    Ok(Applied {
        slot: target,
        version: m.version.clone(),
        generation: plan.generation,
        entry,
        verify_s,
        write_s: started.elapsed().as_secs_f64(),
    })
}

/// Steps 3 to 5 of an apply (see the module's docs).
#[allow(clippy::too_many_arguments)]
fn write_slot(
    paths: &BoxPaths,
    bundle_path: &Path,
    key: &VerifyingKey,
    m: &bundle::BundleManifest,
    verified: &bundle::Verified,
    plan: boot::Plan,
    device: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<String, UpdateError> {
    let target = plan.target;
    // 3. The target stops being bootable.
    let entries = paths.entries_dir();
    for e in std::fs::read_dir(&entries).map_err(io(&entries))? {
        let e = e.map_err(io(&entries))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if boot::EntryName::parse(&name).is_some_and(|n| n.id == target.entry_id()) {
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    sync_dir(&entries)?;
    let slot_dir = paths.slot_dir(target);
    std::fs::create_dir_all(&slot_dir).map_err(io(&slot_dir))?;
    match std::fs::remove_file(slot_dir.join("slot.json")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&slot_dir.join("slot.json"))(e)),
    }
    sync_dir(&slot_dir)?;

    // 4. Kernel, initrd, root filesystem, each checked as written.
    BundleReader::open(bundle_path)?.read(key, |_, c, stored| {
        let content_err = |source| BundleError::Content {
            component: c.name.clone(),
            source,
        };
        let mut content = ContentReader::new(c, stored).map_err(content_err)?;
        match c.name.as_str() {
            "kernel" | "initrd" => {
                // The bundle's names are the ones the loader entry boots
                // (`/edge-<slot>/vmlinuz`, `/edge-<slot>/initrd.img`).
                let name = &c.file;
                let dst = slot_dir.join(name);
                let tmp = slot_dir.join(format!("{name}.tmp"));
                let mut f = std::fs::File::create(&tmp).map_err(|e| BundleError::Io {
                    path: tmp.clone(),
                    error: e,
                })?;
                copy(
                    stage_of(&c.name),
                    c.content_size,
                    &mut content,
                    &mut f,
                    progress,
                )
                .map_err(|e| classify(e, &tmp, &c.name))?;
                f.sync_all().map_err(|e| BundleError::Io {
                    path: tmp.clone(),
                    error: e,
                })?;
                std::fs::rename(&tmp, &dst).map_err(|e| BundleError::Io {
                    path: dst.clone(),
                    error: e,
                })?;
            }
            _ => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(device)
                    .map_err(|e| BundleError::Io {
                        path: device.to_path_buf(),
                        error: e,
                    })?;
                copy("rootfs", c.content_size, &mut content, &mut f, progress)
                    .map_err(|e| classify(e, device, &c.name))?;
                f.sync_data().map_err(|e| BundleError::Io {
                    path: device.to_path_buf(),
                    error: e,
                })?;
            }
        }
        Ok(())
    })?;
    sync_dir(&slot_dir)?;

    // 5. The slot's record, then its entry: now it boots next.
    let info = SlotInfo {
        version: m.version.clone(),
        generation: plan.generation,
        manifest_sha256: Some(verified.manifest_sha256.clone()),
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|e| UpdateError::Box(e.to_string()))?;
    replace_file(&slot_dir.join("slot.json"), &json)?;
    sync_dir(&slot_dir)?;
    let layout = Layout::new(Sizes::default());
    let (entry, body) =
        mec_image::files::loader_entry(&layout, target.name(), &m.version, plan.generation);
    let entry_path = entries.join(&entry);
    // `edge-b+3.tmp`: not a `.conf`, so systemd-boot never reads it.
    replace_file(&entry_path, body.as_bytes())?;
    sync_dir(&entries)?;
    Ok(entry)
}

/// The component's name as a `'static` stage name for [`Progress`].
fn stage_of(name: &str) -> &'static str {
    bundle::COMPONENTS
        .iter()
        .map(|(n, _)| *n)
        .find(|n| *n == name)
        .unwrap_or("rootfs")
}

/// A copy's error: the content check (`InvalidData` from
/// [`ContentReader`]) or the write.
fn classify(e: std::io::Error, path: &Path, component: &str) -> BundleError {
    if e.kind() == std::io::ErrorKind::InvalidData {
        BundleError::Content {
            component: component.into(),
            source: e,
        }
    } else {
        BundleError::Io {
            path: path.to_path_buf(),
            error: e,
        }
    }
}
