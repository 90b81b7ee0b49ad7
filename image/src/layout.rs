//! The disk's partition layout (sans-IO): where each partition sits, its
//! GPT type and fixed unique id, and the `sfdisk` script that writes the
//! table into a plain file.
//!
//! ```text
//! | GPT | esp (FAT32) | root-a (ext4) | root-b (empty) | edge-data (ext4) | GPT backup |
//! ```
//!
//! - `esp`: systemd-boot, and per slot a kernel, an initrd and a loader
//!   entry with a boot counter.
//! - `root-a`, `root-b`: the two root slots; an update (issue 9) writes the
//!   one not running. B is empty in a fresh image.
//! - `edge-data`: mounted at `/var/lib/edge`: identity, usage log, ledger,
//!   site configuration. Updates never write it.
//!
//! Ids are fixed (derived from names), so two builds of the same inputs
//! give the same table, and the kernel command line can name its root by
//! `PARTUUID`.

/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = MIB;
/// Room left for the backup GPT at the end of the disk.
const GPT_BACKUP: u64 = MIB;

/// GPT type GUIDs (the Discoverable Partitions Specification's).
pub mod types {
    /// EFI System Partition.
    pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    /// Root partition, x86-64.
    pub const ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
    /// Variable data (`/var`-like).
    pub const VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// GPT name (`esp`, `root-a`, `root-b`, `edge-data`).
    pub name: &'static str,
    /// GPT type GUID.
    pub type_guid: &'static str,
    /// The partition's own GUID (PARTUUID), fixed.
    pub uuid: String,
    /// Byte offset in the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The disk's GUID, fixed.
    pub disk_uuid: String,
    /// In table order.
    pub partitions: Vec<Partition>,
    /// The disk's size in bytes.
    pub size: u64,
}

/// Partition sizes in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// ESP.
    pub esp_mib: u64,
    /// Each root slot.
    pub root_mib: u64,
    /// The data partition.
    pub data_mib: u64,
}

impl Default for Sizes {
    fn default() -> Sizes {
        Sizes {
            esp_mib: 256,
            root_mib: 1536,
            data_mib: 512,
        }
    }
}

/// A fixed GUID for `name`: the first 16 bytes of SHA-256 over a label and
/// the name, shaped as a version-4-like GUID text.
pub fn fixed_guid(name: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("mec-image/1 {name}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Layout {
    /// The layout for `sizes`.
    pub fn new(sizes: Sizes) -> Layout {
        let parts = [
            ("esp", types::ESP, sizes.esp_mib),
            ("root-a", types::ROOT_X86_64, sizes.root_mib),
            ("root-b", types::ROOT_X86_64, sizes.root_mib),
            ("edge-data", types::VAR, sizes.data_mib),
        ];
        let mut offset = ALIGN;
        let partitions = parts
            .iter()
            .map(|&(name, type_guid, mib)| {
                let p = Partition {
                    name,
                    type_guid,
                    uuid: fixed_guid(name),
                    offset,
                    size: mib * MIB,
                };
                offset += mib * MIB;
                p
            })
            .collect();
        Layout {
            disk_uuid: fixed_guid("disk"),
            partitions,
            size: offset + GPT_BACKUP,
        }
    }

    /// The partition called `name`.
    pub fn get(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }

    /// The `sfdisk` script that writes this table (sizes in 512-byte
    /// sectors).
    pub fn sfdisk_script(&self) -> String {
        let mut s = format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\nsector-size: 512\nfirst-lba: 2048\n\n",
            self.disk_uuid
        );
        for p in &self.partitions {
            s.push_str(&format!(
                "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
                p.offset / 512,
                p.size / 512,
                p.type_guid,
                p.uuid,
                p.name
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_aligned_ordered_and_fit_before_the_backup_table() {
        let l = Layout::new(Sizes::default());
        let mut end = 0;
        for p in &l.partitions {
            assert_eq!(p.offset % ALIGN, 0, "{p:?}");
            assert!(p.offset >= end.max(ALIGN), "{p:?} overlaps");
            end = p.offset + p.size;
        }
        assert!(end + GPT_BACKUP <= l.size);
        assert_eq!(
            l.partitions.iter().map(|p| p.name).collect::<Vec<_>>(),
            ["esp", "root-a", "root-b", "edge-data"]
        );
    }

    #[test]
    fn ids_are_fixed_distinct_guids() {
        let (a, b) = (Layout::new(Sizes::default()), Layout::new(Sizes::default()));
        assert_eq!(a, b);
        let mut ids: Vec<&str> = a.partitions.iter().map(|p| p.uuid.as_str()).collect();
        ids.push(&a.disk_uuid);
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        for id in ids {
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4", "{id}");
        }
    }

    #[test]
    fn the_sfdisk_script_names_every_partition_in_sectors() {
        let l = Layout::new(Sizes {
            esp_mib: 64,
            root_mib: 512,
            data_mib: 128,
        });
        let s = l.sfdisk_script();
        assert!(s.starts_with("label: gpt\n"), "{s}");
        assert!(s.contains(&format!(
            "start=2048, size=131072, type={}, uuid={}, name=\"esp\"",
            types::ESP,
            fixed_guid("esp")
        )));
        assert!(s.contains("name=\"edge-data\""));
    }
}
