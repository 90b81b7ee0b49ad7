//! `edgeprov flash` and `edgeprov verify` on file-backed devices: the image
//! is written and read back; a corrupted byte is caught with its offset; a
//! manifest is checked before anything is written; the disk the system runs
//! from is refused.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn edgeprov(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeprov"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {stdout}"));
    (out.status.code().unwrap_or(-1), v)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A deterministic image of `len` bytes.
fn image(path: &Path, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn an_image_is_written_read_back_and_a_flipped_byte_is_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, dev) = (tmp.path().join("edge.img"), tmp.path().join("disk"));
    let bytes = image(&img, 9 * 1024 * 1024 + 77); // not a whole number of chunks
                                                   // A "disk" larger than the image, holding old data.
    std::fs::write(&dev, vec![0xaa; 12 * 1024 * 1024]).unwrap();
    let (code, v) = edgeprov(&["flash", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["ok"], true);
    assert_eq!(v["report"]["expected_from"], "image");
    assert_eq!(v["report"]["bytes"], bytes.len());
    let disk = std::fs::read(&dev).unwrap();
    assert_eq!(&disk[..bytes.len()], &bytes[..]);
    assert!(
        disk[bytes.len()..].iter().all(|&b| b == 0xaa),
        "nothing past the image"
    );

    let (code, v) = edgeprov(&["verify", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(code, 0, "{v}");
    // One flipped byte on the disk.
    let mut disk = disk;
    disk[5_000_001] ^= 0x04;
    std::fs::write(&dev, &disk).unwrap();
    let (code, v) = edgeprov(&["verify", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(code, 1);
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("MISMATCH") && err.contains("byte 5000001"),
        "{err}"
    );
}

#[test]
fn a_manifest_is_the_reference_and_a_corrupt_image_is_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (img, dev) = (tmp.path().join("edge.img"), tmp.path().join("disk"));
    let bytes = image(&img, 3 * 1024 * 1024);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let manifest = tmp.path().join("edge.img.manifest.json");
    std::fs::write(
        &manifest,
        serde_json::json!({"size": bytes.len(), "sha256": sha}).to_string(),
    )
    .unwrap();
    std::fs::write(&dev, b"").unwrap();
    let (code, v) = edgeprov(&["flash", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["expected_from"], "manifest");
    assert_eq!(v["report"]["device_sha256"], sha.as_str());

    // The image goes bad after its manifest was written: refused, and the
    // target is not touched.
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    std::fs::write(&img, &bad).unwrap();
    std::fs::write(&dev, b"old contents").unwrap();
    let (code, v) = edgeprov(&["flash", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(code, 1);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("does not match its manifest"),
        "{v}"
    );
    assert_eq!(std::fs::read(&dev).unwrap(), b"old contents");
}

#[test]
fn the_disk_the_system_runs_from_is_refused() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root_source = mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let dash = f.iter().position(|x| *x == "-")?;
        (f.get(4) == Some(&"/")).then(|| f.get(dash + 2).map(|s| s.to_string()))?
    });
    let Some(root) = root_source
        .clone()
        .filter(|s| s.starts_with("/dev/") && Path::new(s).exists())
    else {
        eprintln!("SKIPPED: the root filesystem is not on a block device here ({root_source:?})");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("edge.img");
    image(&img, 4096);
    let (code, v) = edgeprov(&["flash", "--image", s(&img), "--device", &root]);
    assert_eq!(code, 1);
    assert!(
        v["error"].as_str().unwrap().contains("running system"),
        "{v}"
    );
}

#[test]
fn with_the_image_key_only_a_manifest_it_signed_is_trusted() {
    use mec_image::manifest::{self, Manifest};
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let (img, dev) = (tmp.path().join("edge.img"), tmp.path().join("disk"));
    let bytes = image(&img, 3 * 1024 * 1024 + 5);
    std::fs::write(&dev, &bytes).unwrap();
    let (key_file, pub_file) = (tmp.path().join("image.key"), tmp.path().join("image.pub"));
    let key = manifest::generate_signing_key(&key_file, &pub_file).unwrap();
    let m = Manifest {
        format: "mec-image-manifest/1".into(),
        image_version: "test".into(),
        built_at: "2026-11-23T00:00:00Z".into(),
        size: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        partitions: vec![],
        files: vec![],
        packages: vec![],
        signing_key_id: manifest::key_id(&key.verifying_key()),
        dev_signing_key: true,
    };
    manifest::write_signed(&img, &m, &key).unwrap();
    let verify = |key: &Path| {
        edgeprov(&[
            "verify",
            "--image",
            s(&img),
            "--device",
            s(&dev),
            "--image-key",
            s(key),
        ])
    };
    let (code, v) = verify(&pub_file);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["expected_from"], "signed manifest", "{v}");

    // A device that differs.
    let mut other = bytes.clone();
    other[2_000_000] ^= 1;
    std::fs::write(&dev, &other).unwrap();
    let (code, v) = verify(&pub_file);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("first difference at byte 2000000"),
        "{v}"
    );
    std::fs::write(&dev, &bytes).unwrap();

    // Another key; then a manifest changed after signing (the image and the
    // manifest changed together, as an attacker would).
    let other_pub = tmp.path().join("other.pub");
    manifest::generate_signing_key(&tmp.path().join("other.key"), &other_pub).unwrap();
    let (code, v) = verify(&other_pub);
    assert_eq!(code, 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
    let path = manifest::manifest_path(&img);
    let mut tampered: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut evil = bytes.clone();
    evil[10] ^= 0xff;
    std::fs::write(&img, &evil).unwrap();
    std::fs::write(&dev, &evil).unwrap();
    tampered["sha256"] = Value::String(hex::encode(sha2::Sha256::digest(&evil)));
    std::fs::write(&path, serde_json::to_vec_pretty(&tampered).unwrap()).unwrap();
    let (code, v) = verify(&pub_file);
    assert_eq!(code, 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
    // Without the key the same files pass: the key is what makes it a proof.
    let (code, v) = edgeprov(&["verify", "--image", s(&img), "--device", s(&dev)]);
    assert_eq!(
        (code, &v["report"]["expected_from"]),
        (0, &Value::from("manifest")),
        "{v}"
    );
}
