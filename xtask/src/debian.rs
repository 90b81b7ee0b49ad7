//! The Debian tools the image's build and its QEMU tests need: installed with
//! apt-get in **one** transaction, then checked one by one.
//!
//! Why one transaction: a new machine of this project's kind comes with
//! `qemu-utils` from bookworm-backports (10.x) and no `qemu-system-x86`.
//! Installing bookworm's `qemu-system-x86` (7.2) on its own makes apt remove
//! that newer `qemu-utils`, and `qemu-img` is gone. So `qemu-utils` is asked
//! for at the very version apt will install `qemu-system-x86` at (a downgrade
//! where the machine has a newer one), beside it, and every tool is looked
//! for again after the install: a missing one is an error that names it and
//! its package, never a `NotFound` minutes later in a test.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use crate::{output, run};

/// How a tool is found.
#[derive(Clone, Copy)]
pub enum Probe {
    /// A command on `PATH` (or in `/usr/sbin`, `/sbin`).
    Command(&'static str),
    /// A file at a fixed path (firmware).
    File(&'static str),
}

/// A tool and the Debian package that carries it.
#[derive(Clone, Copy)]
pub struct Tool {
    pub probe: Probe,
    pub package: &'static str,
}

const fn cmd(name: &'static str, package: &'static str) -> Tool {
    Tool {
        probe: Probe::Command(name),
        package,
    }
}

/// What `mec_image::build` runs (its `TOOLS`), with the packages that carry
/// them. `systemd` brings the `systemd-boot` pieces the ESP is made from.
pub const IMAGE: [Tool; 12] = [
    cmd("debootstrap", "debootstrap"),
    cmd("mke2fs", "e2fsprogs"),
    cmd("debugfs", "e2fsprogs"),
    cmd("objcopy", "binutils"),
    cmd("mkfs.fat", "dosfstools"),
    cmd("mcopy", "mtools"),
    cmd("mmd", "mtools"),
    cmd("sfdisk", "fdisk"),
    cmd("qemu-img", "qemu-utils"),
    cmd("chroot", "coreutils"),
    cmd("tar", "tar"),
    cmd("systemctl", "systemd"),
];

/// What the image's QEMU tests run besides: the emulator, the UEFI firmware,
/// `mdir` to read the ESP of a live disk, `qemu-img` for overlays.
pub const BOOT: [Tool; 5] = [
    cmd("qemu-system-x86_64", "qemu-system-x86"),
    Tool {
        probe: Probe::File("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        package: "ovmf",
    },
    cmd("mdir", "mtools"),
    cmd("qemu-img", "qemu-utils"),
    cmd("debugfs", "e2fsprogs"),
];

/// PostgreSQL for the core's store tests (a throw-away server each test
/// binary starts, `mec_sync::pg_server`): Debian's server package, whose
/// binaries live in `/usr/lib/postgresql/15/bin` (bookworm's version).
pub const POSTGRES: [Tool; 2] = [
    Tool {
        probe: Probe::File("/usr/lib/postgresql/15/bin/initdb"),
        package: "postgresql-15",
    },
    Tool {
        probe: Probe::File("/usr/lib/postgresql/15/bin/psql"),
        package: "postgresql-client-15",
    },
];

fn present(tool: &Tool) -> bool {
    match tool.probe {
        Probe::Command(name) => mec_image::build::which(name),
        Probe::File(path) => Path::new(path).exists(),
    }
}

fn describe(tool: &Tool) -> String {
    match tool.probe {
        Probe::Command(name) => format!("{name} (package {})", tool.package),
        Probe::File(path) => format!("{path} (package {})", tool.package),
    }
}

/// The tools of `sets` that are not here, described.
pub fn missing(sets: &[&[Tool]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in sets.iter().flat_map(|s| s.iter()).filter(|t| !present(t)) {
        let d = describe(t);
        // A tool in two sets (qemu-img, debugfs) is named once.
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The packages to install for `sets`, in one list (each once).
fn packages(sets: &[&[Tool]]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for t in sets.iter().flat_map(|s| s.iter()) {
        if !out.contains(&t.package) {
            out.push(t.package);
        }
    }
    out
}

/// apt's candidate version of `package` (`apt-cache policy`), if any.
fn candidate(package: &str) -> anyhow::Result<Option<String>> {
    let policy = output(Command::new("apt-cache").args(["policy", package]))?;
    Ok(parse_candidate(&policy))
}

fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty() && v != "(none)")
}

/// The install arguments: every package, with `qemu-utils` pinned to the
/// version `qemu-system-x86` will be installed at when both are wanted.
fn install_args(packages: &[&str], qemu_version: Option<&str>) -> Vec<String> {
    packages
        .iter()
        .map(|p| match (p, qemu_version) {
            (&"qemu-utils", Some(v)) => format!("qemu-utils={v}"),
            _ => p.to_string(),
        })
        .collect()
}

/// Makes every tool of `sets` present: nothing when they all are; else one
/// `apt-get install` of all their packages, then a check of each tool.
pub fn ensure(sets: &[&[Tool]]) -> anyhow::Result<()> {
    let before = missing(sets);
    if before.is_empty() {
        return Ok(());
    }
    let packages = packages(sets);
    eprintln!("xtask: missing {before:?}: installing {packages:?} with apt-get");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    let qemu_version = if packages.contains(&"qemu-system-x86") {
        candidate("qemu-system-x86")?
    } else {
        None
    };
    let args = install_args(&packages, qemu_version.as_deref());
    let installed = run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let after = missing(sets);
    match (installed, after.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => bail!(
            "apt-get installed {args:?}, and these are still missing: {}",
            after.join(", ")
        ),
        (Err(e), _) => bail!(
            "{e:#}\nmissing: {} (install the packages {packages:?} as root)",
            after.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_is_read_from_apt_cache_policy() {
        let policy = "qemu-system-x86:\n  Installed: (none)\n  Candidate: 1:7.2+dfsg-7+deb12u18+b3\n  Version table:\n";
        assert_eq!(
            parse_candidate(policy).as_deref(),
            Some("1:7.2+dfsg-7+deb12u18+b3")
        );
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn qemu_utils_is_pinned_to_the_emulator_s_version_in_the_same_install() {
        let p = packages(&[&IMAGE, &BOOT]);
        assert_eq!(p.iter().filter(|x| **x == "qemu-utils").count(), 1, "{p:?}");
        assert!(p.contains(&"qemu-system-x86") && p.contains(&"ovmf"));
        let args = install_args(&p, Some("1:7.2+dfsg-7"));
        assert!(args.contains(&"qemu-utils=1:7.2+dfsg-7".to_string()));
        assert!(args.contains(&"qemu-system-x86".to_string()));
        // Without the emulator in the list, qemu-utils is not pinned.
        assert_eq!(install_args(&["qemu-utils"], None), vec!["qemu-utils"]);
    }

    #[test]
    fn every_tool_the_image_build_runs_has_a_package() {
        for t in mec_image::build::TOOLS {
            assert!(
                IMAGE
                    .iter()
                    .any(|x| matches!(x.probe, Probe::Command(n) if n == t)),
                "{t} is in mec_image::build::TOOLS but not in debian::IMAGE"
            );
        }
    }

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let set = [
            cmd("surely-not-a-command-here", "some-package"),
            cmd("sh", "dash"),
        ];
        assert_eq!(
            missing(&[&set]),
            vec!["surely-not-a-command-here (package some-package)"]
        );
        // Named once when two sets hold it.
        assert_eq!(missing(&[&set, &set]).len(), 1);
    }
}
