//! `apply` on a box laid out in a directory: a real ESP tree, slot
//! "partitions" as files, real bundles signed with real keys. A refused
//! bundle changes no byte; a cut at any step before the entry leaves the
//! running slot the one that boots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use mec_update::apply::{self, BoxPaths, UpdateError};
use mec_update::boot::{ApplyOptions, Slot, SlotState};
use mec_update::bundle::{self, BundleInputs};

const SLOT_BYTES: u64 = 8 << 20;

struct TestBox {
    dir: tempfile::TempDir,
    paths: BoxPaths,
    key: SigningKey,
}

impl TestBox {
    /// A box as the image leaves it once its first boot was marked good:
    /// slot A good, running 0.1.0; slot B empty.
    fn new() -> TestBox {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let esp = d.join("efi");
        std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
        std::fs::create_dir_all(esp.join("edge-a")).unwrap();
        let (_, body) = mec_image::files::loader_entry(
            &mec_image::layout::Layout::new(Default::default()),
            "a",
            "0.1.0",
            1,
        );
        std::fs::write(esp.join("loader/entries/edge-a.conf"), body).unwrap();
        std::fs::write(
            esp.join("edge-a/slot.json"),
            r#"{"version": "0.1.0", "generation": 1}"#,
        )
        .unwrap();
        std::fs::write(d.join("image.json"), r#"{"version": "0.1.0"}"#).unwrap();
        std::fs::write(d.join("cmdline"), "root=PARTUUID=x ro edge.slot=a quiet\n").unwrap();
        std::fs::write(d.join("mountinfo"), "").unwrap();
        let mut devices = BTreeMap::new();
        for s in Slot::ALL {
            let p = d.join(format!("root-{}.part", s.name()));
            std::fs::write(&p, vec![0xAAu8; SLOT_BYTES as usize]).unwrap();
            devices.insert(s, p);
        }
        let key =
            mec_image::manifest::generate_signing_key(&d.join("image.key"), &d.join("image.pub"))
                .unwrap();
        let paths = BoxPaths {
            esp,
            image_info: d.join("image.json"),
            cmdline: d.join("cmdline"),
            mountinfo: d.join("mountinfo"),
            devices,
            efivars: d.join("efivars"),
        };
        TestBox { dir, paths, key }
    }

    /// A bundle of `version` signed with `key`, its root filesystem marked
    /// with the version.
    fn bundle(&self, version: &str, key: &SigningKey) -> PathBuf {
        let d = self.dir.path().join(format!("in-{version}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut rootfs = vec![0u8; 3 << 20];
        rootfs[4096..4096 + version.len()].copy_from_slice(version.as_bytes());
        std::fs::write(d.join("rootfs.ext4"), &rootfs).unwrap();
        std::fs::write(d.join("vmlinuz"), format!("kernel {version}")).unwrap();
        std::fs::write(d.join("initrd.img"), format!("initrd {version}")).unwrap();
        let out = self.dir.path().join(format!("edge-{version}.bundle"));
        bundle::write(
            &out,
            &BundleInputs {
                version,
                epoch: 1_700_000_000,
                rootfs: &d.join("rootfs.ext4"),
                kernel: &d.join("vmlinuz"),
                initrd: &d.join("initrd.img"),
                key,
                dev_signing_key: true,
            },
        )
        .unwrap();
        out
    }

    fn apply(&self, bundle: &Path, opts: ApplyOptions) -> Result<apply::Applied, UpdateError> {
        apply::apply(
            &self.paths,
            bundle,
            &self.key.verifying_key(),
            opts,
            &mut |_| {},
        )
    }

    /// Every file under the box's directory but the bundles, with contents.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_none_or(|x| x != "bundle") {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    fn slot(&self, s: Slot) -> mec_update::boot::SlotStatus {
        apply::status(&self.paths).unwrap().slots[s as usize].clone()
    }
}

#[test]
fn a_good_bundle_fills_the_other_slot_and_boots_next() {
    let b = TestBox::new();
    let before = apply::status(&b.paths).unwrap();
    assert_eq!(before.booted, Some(Slot::A));
    assert_eq!(before.next_boot, Some(Slot::A));
    assert_eq!(before.running_version.as_deref(), Some("0.1.0"));
    assert_eq!(before.slots[1].state, SlotState::Empty);

    let bundle = b.bundle("0.2.0", &b.key);
    let mut stages = Vec::new();
    let applied = apply::apply(
        &b.paths,
        &bundle,
        &b.key.verifying_key(),
        ApplyOptions::default(),
        &mut |p| stages.push(p.stage),
    )
    .unwrap();
    assert_eq!((applied.slot, applied.generation), (Slot::B, 2));
    assert_eq!(applied.entry, "edge-b+3.conf");
    assert_eq!(stages.first(), Some(&"verify"));
    assert_eq!(stages.last(), Some(&"entry"));

    let after = apply::status(&b.paths).unwrap();
    assert_eq!(after.next_boot, Some(Slot::B));
    let slot_b = &after.slots[1];
    assert_eq!(slot_b.state, SlotState::Trying);
    assert_eq!(slot_b.version.as_deref(), Some("0.2.0"));
    assert_eq!(slot_b.tries_left, Some(3));
    // The partition holds the root filesystem, the rest of it untouched.
    let part = std::fs::read(&b.paths.devices[&Slot::B]).unwrap();
    assert_eq!(&part[4096..4101], b"0.2.0");
    assert!(part[..3 << 20]
        .iter()
        .enumerate()
        .all(|(i, &x)| x == 0 || (4096..4101).contains(&i)));
    assert!(part[3 << 20..].iter().all(|&x| x == 0xAA));
    assert_eq!(
        std::fs::read_to_string(b.paths.esp.join("edge-b/vmlinuz")).unwrap(),
        "kernel 0.2.0"
    );
    let entry = std::fs::read_to_string(b.paths.esp.join("loader/entries/edge-b+3.conf")).unwrap();
    assert!(
        entry.contains("edge.slot=b") && entry.contains("version 2"),
        "{entry}"
    );
    // Slot A, the fallback, is as it was.
    assert_eq!(
        std::fs::read(&b.paths.devices[&Slot::A]).unwrap(),
        vec![0xAAu8; SLOT_BYTES as usize]
    );
    assert_eq!(b.slot(Slot::A).state, SlotState::Good);
}

#[test]
fn refused_bundles_change_nothing() {
    let b = TestBox::new();
    let other_key = SigningKey::from_bytes(&[9u8; 32]);
    type Case = (&'static str, PathBuf, fn(&UpdateError) -> bool);
    let cases: Vec<Case> = vec![
        ("older", b.bundle("0.0.9", &b.key), |e| {
            matches!(
                e,
                UpdateError::Refused(mec_update::boot::Refusal::NotNewer { .. })
            )
        }),
        ("same", b.bundle("0.1.0", &b.key), |e| {
            matches!(
                e,
                UpdateError::Refused(mec_update::boot::Refusal::NotNewer { .. })
            )
        }),
        ("another key", b.bundle("0.2.0", &other_key), |e| {
            e.to_string().contains("was not signed by key")
        }),
        (
            "flipped byte",
            {
                let p = b.bundle("0.3.0", &b.key);
                let zst = bundle::verify(&p, &b.key.verifying_key())
                    .unwrap()
                    .manifest
                    .component("rootfs")
                    .unwrap()
                    .size as usize;
                let mut bytes = std::fs::read(&p).unwrap();
                // The root filesystem's data follows its 512-byte tar header.
                let header = bytes
                    .windows(15)
                    .rposition(|w| w == b"rootfs.ext4.zst")
                    .unwrap();
                bytes[header + 512 + zst / 2] ^= 0x01;
                std::fs::write(&p, bytes).unwrap();
                p
            },
            |e| e.to_string().contains("differs from the signed manifest"),
        ),
        (
            "not a bundle",
            {
                let p = b.dir.path().join("junk.bundle");
                std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
                p
            },
            |e| e.to_string().contains("not an update bundle"),
        ),
    ];
    let before = b.snapshot();
    for (name, bundle, expected) in cases {
        let e = b.apply(&bundle, ApplyOptions::default()).unwrap_err();
        assert!(expected(&e), "{name}: {e}");
        assert!(b.snapshot() == before, "{name}: the box changed");
    }
    // Told to downgrade, the older bundle goes in.
    let older = b.bundle("0.0.9", &b.key);
    let applied = b
        .apply(
            &older,
            ApplyOptions {
                allow_downgrade: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(applied.version, "0.0.9");
    assert_eq!(apply::status(&b.paths).unwrap().next_boot, Some(Slot::B));
}

#[test]
fn a_default_set_in_the_firmware_is_shown_and_cleared_by_the_next_apply() {
    let b = TestBox::new();
    // `d` in systemd-boot's menu on slot A: LoaderEntryDefault=edge-a.conf
    // (efivarfs: 4 bytes of attributes, UTF-16LE, a NUL).
    let vars = b.dir.path().join("efivars");
    std::fs::create_dir_all(&vars).unwrap();
    let mut value = vec![7u8, 0, 0, 0];
    for u in "edge-a.conf\0".encode_utf16() {
        value.extend_from_slice(&u.to_le_bytes());
    }
    let var = vars.join("LoaderEntryDefault-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f");
    std::fs::write(&var, value).unwrap();
    let s = apply::status(&b.paths).unwrap();
    assert_eq!(s.loader_default.as_deref(), Some("edge-a.conf"));
    let bundle = b.bundle("0.2.0", &b.key);
    b.apply(&bundle, ApplyOptions::default()).unwrap();
    assert!(!var.exists(), "the override survived the apply");
    let s = apply::status(&b.paths).unwrap();
    assert_eq!((s.loader_default, s.next_boot), (None, Some(Slot::B)));
}

#[test]
fn a_second_apply_while_one_runs_is_refused_and_writes_nothing() {
    let b = TestBox::new();
    let bundle = b.bundle("0.2.0", &b.key);
    let before = b.snapshot();
    // Another apply holds the box (the lock an apply takes first).
    let held = std::fs::File::open(&b.paths.esp).unwrap();
    // SAFETY: flock on a descriptor the test owns.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let e = b.apply(&bundle, ApplyOptions::default()).unwrap_err();
    assert!(matches!(e, UpdateError::Busy), "{e}");
    assert!(b.snapshot() == before, "a refused apply wrote");
    drop(held);
    b.apply(&bundle, ApplyOptions::default())
        .expect("once the other ends, the apply goes in");
}

#[test]
fn a_mounted_target_or_a_running_slot_on_trial_is_refused() {
    let b = TestBox::new();
    let bundle = b.bundle("0.2.0", &b.key);
    std::fs::write(
        &b.paths.mountinfo,
        format!(
            "30 1 254:3 / /mnt rw,relatime - ext4 {} rw\n",
            b.paths.devices[&Slot::B].display()
        ),
    )
    .unwrap();
    let e = b.apply(&bundle, ApplyOptions::default()).unwrap_err();
    assert!(e.to_string().contains("is mounted"), "{e}");
    std::fs::write(&b.paths.mountinfo, "").unwrap();

    // Running from A while A's own boot is still being assessed.
    let entries = b.paths.esp.join("loader/entries");
    std::fs::rename(entries.join("edge-a.conf"), entries.join("edge-a+2-1.conf")).unwrap();
    let e = b.apply(&bundle, ApplyOptions::default()).unwrap_err();
    assert!(e.to_string().contains("still being tried"), "{e}");
}

#[test]
fn a_cut_at_any_step_before_the_entry_leaves_the_running_slot_booting() {
    for cut_at in ["verify", "kernel", "initrd", "rootfs"] {
        let b = TestBox::new();
        let bundle = b.bundle("0.2.0", &b.key);
        // The cut: the process dies inside the stage (a panic stands for
        // the power going; nothing after it runs).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apply::apply(
                &b.paths,
                &bundle,
                &b.key.verifying_key(),
                ApplyOptions::default(),
                &mut |p| {
                    if p.stage == cut_at {
                        panic!("power cut in {cut_at}");
                    }
                },
            )
        }));
        assert!(r.is_err(), "{cut_at}: the cut did not happen");
        let s = apply::status(&b.paths).unwrap();
        assert_eq!(s.next_boot, Some(Slot::A), "{cut_at}");
        assert_eq!(s.slots[1].state, SlotState::Empty, "{cut_at}");
        // The next apply, after the reboot, completes.
        let applied = b.apply(&bundle, ApplyOptions::default()).unwrap();
        assert_eq!(applied.slot, Slot::B, "{cut_at}");
        assert_eq!(apply::status(&b.paths).unwrap().next_boot, Some(Slot::B));
    }
}

#[test]
fn after_three_failed_boots_the_old_slot_reports_the_failed_version_and_it_is_not_retried() {
    let b = TestBox::new();
    let bundle = b.bundle("0.2.0", &b.key);
    b.apply(&bundle, ApplyOptions::default()).unwrap();
    // systemd-boot counted three tries that never reached
    // boot-complete.target; the box is back on A.
    let entries = b.paths.esp.join("loader/entries");
    std::fs::rename(
        entries.join("edge-b+3.conf"),
        entries.join("edge-b+0-3.conf"),
    )
    .unwrap();
    let s = apply::status(&b.paths).unwrap();
    assert_eq!(s.next_boot, Some(Slot::A));
    assert_eq!(s.slots[1].state, SlotState::Failed);
    assert_eq!(s.slots[1].version.as_deref(), Some("0.2.0"));
    let e = b.apply(&bundle, ApplyOptions::default()).unwrap_err();
    assert!(e.to_string().contains("failed every boot try"), "{e}");
    // A fixed release goes in.
    let fixed = b.bundle("0.2.1", &b.key);
    let applied = b.apply(&fixed, ApplyOptions::default()).unwrap();
    assert_eq!((applied.slot, applied.generation), (Slot::B, 3));
    let s = apply::status(&b.paths).unwrap();
    assert_eq!(s.next_boot, Some(Slot::B));
    assert_eq!(s.slots[1].entry.as_deref(), Some("edge-b+3.conf"));
}

#[test]
fn the_service_answers_status_applies_and_rejects_bad_requests() {
    use mec_update::service::{serve_one, Outcome};
    let b = TestBox::new();
    let key = b.key.verifying_key();
    let ask = |request: &str, key: Option<ed25519_dalek::VerifyingKey>| {
        let mut out = Vec::new();
        let outcome = serve_one(
            &b.paths,
            || key.ok_or_else(|| "not provisioned: no operator image key".to_string()),
            request.as_bytes(),
            &mut out,
        )
        .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (outcome, lines)
    };

    let (o, lines) = ask("{\"op\": \"status\"}\n", Some(key));
    assert_eq!(o, Outcome::Done);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["status"]["booted"], "a", "{lines:?}");

    let bundle = b.bundle("0.2.0", &b.key);
    let req = serde_json::json!({ "op": "apply", "bundle": bundle }).to_string() + "\n";
    let (o, lines) = ask(&req, None);
    assert_eq!(o, Outcome::Refused);
    assert!(lines[0]["reason"]
        .as_str()
        .unwrap()
        .contains("not provisioned"));

    let (o, lines) = ask(&req, Some(key));
    assert_eq!(o, Outcome::Done, "{lines:?}");
    assert_eq!(lines.first().unwrap()["event"], "progress");
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "applied", "{last}");
    assert_eq!(last["applied"]["slot"], "b");
    assert_eq!(apply::status(&b.paths).unwrap().next_boot, Some(Slot::B));

    // An older bundle: refused, nothing written.
    let older = b.bundle("0.0.1", &b.key);
    let req = serde_json::json!({ "op": "apply", "bundle": older }).to_string();
    let (o, lines) = ask(&req, Some(key));
    assert_eq!(o, Outcome::Refused);
    assert!(
        lines[0]["reason"].as_str().unwrap().contains("not newer"),
        "{lines:?}"
    );

    for bad in [
        "",
        "not json\n",
        "{\"op\": \"format-disk\"}\n",
        "{\"op\": \"apply\"}\n",
        "{\"op\": \"status\", \"extra\": 1}\n",
    ] {
        let (o, lines) = ask(bad, Some(key));
        assert_eq!(o, Outcome::Error, "{bad:?}");
        assert_eq!(lines[0]["event"], "error", "{bad:?}");
    }
    let huge = "x".repeat(70 * 1024);
    let (o, lines) = ask(&huge, Some(key));
    assert_eq!(o, Outcome::Error);
    assert!(
        lines[0]["message"].as_str().unwrap().contains("over"),
        "{lines:?}"
    );
}
