//! systemd-boot's view of the ESP, as plain data: the loader entries with
//! their boot counters, the order systemd-boot boots them in, each slot's
//! state, and whether a bundle may be applied. No I/O here: the caller
//! reads the directory ([`crate::apply::read_esp`]) and passes its text.
//!
//! # How the slots take turns
//!
//! Each slot has one loader entry, `loader/entries/edge-<slot>[+LEFT[-DONE]].conf`,
//! with `sort-key edge` and `version <generation>`: a number that grows with
//! every install, whatever the image version (so a deliberate downgrade is
//! still the newest install). systemd-boot 252 (bookworm's) orders entries:
//! those with no tries left last; then by sort key, then by `version`,
//! newest first; then by id. With no `default` in `loader.conf` it boots the
//! first. So:
//!
//! - a freshly applied slot (`+3`, a higher generation) boots next;
//! - systemd-boot counts a try down at each boot (`+2-1`, `+1-2`, `+0-3`);
//!   `systemd-bless-boot` drops the counter once `boot-complete.target` is
//!   reached (the agent ready for a while, the usage log verified);
//! - after three boots that never reached it the entry has no tries left,
//!   sorts last, and the old slot boots again; it reports the failed
//!   version, and nothing tries that slot again until a new apply.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Boot tries a newly applied slot gets.
pub const BOOT_TRIES: u32 = mec_image::files::BOOT_TRIES;

/// The sort key of our entries.
pub const SORT_KEY: &str = mec_image::files::LOADER_SORT_KEY;

/// One of the two root slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Root A (`root-a`), the one the image boots first.
    A,
    /// Root B (`root-b`), empty until the first update.
    B,
}

impl Slot {
    /// Both slots.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// `a` or `b`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Its partition's name in the layout (`root-a`).
    pub fn partition(self) -> String {
        format!("root-{}", self.name())
    }

    /// Its loader entry's id (`edge-a`), also its directory on the ESP
    /// (kernel, initrd, `slot.json`).
    pub fn entry_id(self) -> String {
        format!("edge-{}", self.name())
    }

    /// `a` or `b` (any case).
    pub fn parse(s: &str) -> Option<Slot> {
        match s.to_ascii_lowercase().as_str() {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }

    /// The slot named by `edge.slot=` on a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Option<Slot> {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("edge.slot="))
            .and_then(Slot::parse)
    }
}

/// A loader entry's file name: `ID[+LEFT[-DONE]].conf` (the Boot Loader
/// Specification's boot counting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    /// The id: the name without counters and suffix.
    pub id: String,
    /// Tries left; `None` when the entry is not counted (it booted well).
    pub tries_left: Option<u32>,
    /// Tries done so far.
    pub tries_done: Option<u32>,
}

impl EntryName {
    /// Parses a file name; `None` when it is not a `.conf` entry.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name
            .len()
            .checked_sub(5)
            .filter(|&n| file_name.is_char_boundary(n))
            .filter(|&n| file_name[n..].eq_ignore_ascii_case(".conf"))
            .map(|n| &file_name[..n])?;
        if stem.is_empty() {
            return None;
        }
        if let Some((id, counter)) = stem.rsplit_once('+') {
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let (left, done) = match counter.split_once('-') {
                Some((l, d)) => (l, Some(d)),
                None => (counter, None),
            };
            if !id.is_empty() && digits(left) && done.is_none_or(digits) {
                return Some(EntryName {
                    id: id.to_string(),
                    tries_left: left.parse().ok(),
                    tries_done: Some(done.and_then(|d| d.parse().ok()).unwrap_or(0)),
                });
            }
        }
        Some(EntryName {
            id: stem.to_string(),
            tries_left: None,
            tries_done: None,
        })
    }

    /// The file name these counters give (`edge-b+2-1.conf`, `edge-b.conf`).
    pub fn file_name(&self) -> String {
        match (self.tries_left, self.tries_done) {
            (Some(l), Some(d)) if d > 0 => format!("{}+{l}-{d}.conf", self.id),
            (Some(l), _) => format!("{}+{l}.conf", self.id),
            _ => format!("{}.conf", self.id),
        }
    }

    /// The file name a new entry with `tries` gets.
    pub fn counted(id: &str, tries: u32) -> String {
        format!("{id}+{tries}.conf")
    }

    /// What systemd-boot makes of the counters.
    pub fn assessment(&self) -> Assessment {
        match self.tries_left {
            None => Assessment::Good,
            Some(0) => Assessment::Bad,
            Some(_) => Assessment::Indeterminate,
        }
    }
}

/// A boot's standing as systemd-boot and systemd-bless-boot see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assessment {
    /// No counter: it booted and was marked good.
    Good,
    /// Tries left, never marked good yet.
    Indeterminate,
    /// No tries left: it failed every try.
    Bad,
}

/// A parsed loader entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file name, parsed.
    pub name: EntryName,
    /// `title`.
    pub title: Option<String>,
    /// `version` (ours: the install generation).
    pub version: Option<String>,
    /// `sort-key`.
    pub sort_key: Option<String>,
    /// `machine-id`.
    pub machine_id: Option<String>,
    /// The slot its `options` boot (`edge.slot=`).
    pub slot: Option<Slot>,
}

impl Entry {
    /// Parses an entry file; `None` when the name is not an entry's.
    pub fn parse(file_name: &str, body: &str) -> Option<Entry> {
        let name = EntryName::parse(file_name)?;
        let mut e = Entry {
            name,
            title: None,
            version: None,
            sort_key: None,
            machine_id: None,
            slot: None,
        };
        for line in body.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = match line.split_once(char::is_whitespace) {
                Some((k, v)) => (k, v.trim().to_string()),
                None => continue,
            };
            match key {
                "title" => e.title = Some(value),
                "version" => e.version = Some(value),
                "sort-key" => e.sort_key = Some(value),
                "machine-id" => e.machine_id = Some(value),
                "options" => e.slot = e.slot.or(Slot::from_cmdline(&value)),
                _ => {}
            }
        }
        Some(e)
    }

    /// Its generation, when `version` is one.
    pub fn generation(&self) -> Option<u64> {
        self.version.as_deref().and_then(|v| v.parse().ok())
    }
}

/// systemd's `strverscmp_improved` for the strings we write (digits, ASCII
/// letters, `-`, `.`): runs of digits compare as numbers, other runs byte
/// by byte, and a string that ends first is older.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let run = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (run(a), run(b));
                let strip = |s: &[u8]| -> Vec<u8> {
                    let t: Vec<u8> = s.iter().copied().skip_while(|&c| c == b'0').collect();
                    t
                };
                let (da, db) = (strip(&a[..na]), strip(&b[..nb]));
                let o = da.len().cmp(&db.len()).then_with(|| da.cmp(&db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// systemd-boot 252's order of two entries (`config_entry_compare`):
/// `Less` boots first.
pub fn boot_order(a: &Entry, b: &Entry) -> Ordering {
    let bad = |e: &Entry| e.name.tries_left == Some(0);
    bad(a)
        .cmp(&bad(b))
        .then_with(|| a.sort_key.is_none().cmp(&b.sort_key.is_none()))
        .then_with(|| match (&a.sort_key, &b.sort_key) {
            (Some(ka), Some(kb)) => ka
                .cmp(kb)
                .then_with(|| a.machine_id.cmp(&b.machine_id))
                .then_with(|| {
                    version_cmp(
                        a.version.as_deref().unwrap_or(""),
                        b.version.as_deref().unwrap_or(""),
                    )
                    .reverse()
                }),
            _ => Ordering::Equal,
        })
        .then_with(|| version_cmp(&a.name.id, &b.name.id).reverse())
        .then_with(|| match (a.name.tries_left, b.name.tries_left) {
            (Some(la), Some(lb)) => lb
                .cmp(&la)
                .then_with(|| a.name.tries_done.cmp(&b.name.tries_done)),
            _ => Ordering::Equal,
        })
}

/// What an install left on the ESP beside a slot's kernel: `edge-<slot>/slot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The image version the slot holds.
    pub version: String,
    /// The install generation (the entry's `version`).
    pub generation: u64,
    /// SHA-256 of the signed manifest of the bundle it came from (none for
    /// the image's own slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// The ESP as read: its entries and each slot's `slot.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EspView {
    /// Every loader entry.
    pub entries: Vec<Entry>,
    /// `slot.json` of each slot that has one.
    pub slots: BTreeMap<Slot, SlotInfo>,
    /// The entry id in the EFI variable `LoaderEntryDefault` (set by the
    /// `d` key in systemd-boot's menu, or `bootctl set-default`), which
    /// overrides the order; an apply clears it.
    pub loader_default: Option<String>,
}

/// A slot's state, as `update status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Marked good by a boot that reached `boot-complete.target`.
    Good,
    /// Applied, with tries left, not marked good yet (when it is the booted
    /// slot: this boot is being assessed).
    Trying,
    /// Every try failed: systemd-boot passes it over.
    Failed,
    /// No loader entry: never installed, or an apply did not finish.
    Empty,
}

impl SlotState {
    /// `good`, `trying`, `failed` or `empty` (as in `update status`).
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Good => "good",
            SlotState::Trying => "trying",
            SlotState::Failed => "failed",
            SlotState::Empty => "empty",
        }
    }
}

/// One slot in `update status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// The slot.
    pub slot: Slot,
    /// Whether the running system booted from it.
    pub booted: bool,
    /// Whether systemd-boot boots it next.
    pub next_boot: bool,
    /// Its state.
    pub state: SlotState,
    /// The image version it holds, when known.
    pub version: Option<String>,
    /// Its install generation, when known.
    pub generation: Option<u64>,
    /// Boot tries left (counted entries only).
    pub tries_left: Option<u32>,
    /// Boot tries done (counted entries only).
    pub tries_done: Option<u32>,
    /// Its loader entry's file name.
    pub entry: Option<String>,
}

impl EspView {
    /// The entry of `slot` (the first, should there be several).
    pub fn entry(&self, slot: Slot) -> Option<&Entry> {
        let id = slot.entry_id();
        self.entries.iter().find(|e| e.name.id == id)
    }

    /// The entries in systemd-boot's order.
    pub fn ordered(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.iter().collect();
        v.sort_by(|a, b| boot_order(a, b));
        v
    }

    /// The slot systemd-boot boots next: the first entry in its order
    /// (`loader.conf` names no default).
    pub fn next_boot(&self) -> Option<Slot> {
        if let Some(id) = &self.loader_default {
            // A default naming an entry that is not there is ignored.
            if let Some(e) = self
                .entries
                .iter()
                .find(|e| format!("{}.conf", e.name.id) == *id)
            {
                return e.slot;
            }
        }
        self.ordered().first().and_then(|e| e.slot)
    }

    /// Both slots' status.
    pub fn status(&self, booted: Option<Slot>) -> Vec<SlotStatus> {
        let next = self.next_boot();
        Slot::ALL
            .iter()
            .map(|&slot| {
                let entry = self.entry(slot);
                let info = self.slots.get(&slot);
                let state = match entry.map(|e| e.name.assessment()) {
                    None => SlotState::Empty,
                    Some(Assessment::Good) => SlotState::Good,
                    Some(Assessment::Indeterminate) => SlotState::Trying,
                    Some(Assessment::Bad) => SlotState::Failed,
                };
                SlotStatus {
                    slot,
                    booted: booted == Some(slot),
                    next_boot: next == Some(slot),
                    state,
                    version: info.map(|i| i.version.clone()),
                    generation: info
                        .map(|i| i.generation)
                        .or_else(|| entry.and_then(Entry::generation)),
                    tries_left: entry.and_then(|e| e.name.tries_left),
                    tries_done: entry.and_then(|e| e.name.tries_done),
                    entry: entry.map(|e| e.name.file_name()),
                }
            })
            .collect()
    }

    /// The highest generation installed so far.
    pub fn generation(&self) -> u64 {
        let from_info = self.slots.values().map(|i| i.generation);
        let from_entries = self.entries.iter().filter_map(Entry::generation);
        from_info.chain(from_entries).max().unwrap_or(0)
    }
}

/// Options of `update apply`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Apply a version older than (or the same as) the running one.
    pub allow_downgrade: bool,
    /// Apply a version that failed its boots on this box before.
    pub retry_failed: bool,
}

/// What applying a bundle will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The slot written: the one not running.
    pub target: Slot,
    /// The new install's generation.
    pub generation: u64,
}

/// Why a bundle is not applied. Nothing has been written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The running system does not say which slot it booted.
    #[error("the running system names no slot (no edge.slot= on the kernel command line): not booted from the appliance disk")]
    UnknownBootedSlot,
    /// The running slot is itself on trial: writing the other slot would
    /// destroy the fallback.
    #[error("the running slot {0:?} is still being tried (not marked good yet): its fallback, the other slot, must not be overwritten now; wait for the boot to be marked good")]
    RunningNotGood(Slot),
    /// A version string that is not semver.
    #[error("version {0:?} is not a semantic version")]
    BadVersion(String),
    /// The bundle is not newer than what runs.
    #[error("the bundle's version {bundle} is not newer than the running {running}; pass --allow-downgrade to install it anyway")]
    NotNewer {
        /// The running version.
        running: String,
        /// The bundle's.
        bundle: String,
    },
    /// This version failed its boots here before.
    #[error(
        "version {0} failed every boot try on this box before; pass --retry-failed to try it again"
    )]
    FailedBefore(String),
}

/// Decides whether a bundle of `bundle_version` may be applied on a box
/// running `running_version` from `booted`.
pub fn plan(
    esp: &EspView,
    booted: Option<Slot>,
    running_version: &str,
    bundle_version: &str,
    opts: ApplyOptions,
) -> Result<Plan, Refusal> {
    let booted = booted.ok_or(Refusal::UnknownBootedSlot)?;
    if let Some(e) = esp.entry(booted) {
        if e.name.assessment() != Assessment::Good {
            return Err(Refusal::RunningNotGood(booted));
        }
    }
    let parse = |v: &str| {
        semver::Version::parse(v.trim_start_matches('v'))
            .map_err(|_| Refusal::BadVersion(v.to_string()))
    };
    let (running, bundle) = (parse(running_version)?, parse(bundle_version)?);
    if bundle <= running && !opts.allow_downgrade {
        return Err(Refusal::NotNewer {
            running: running_version.into(),
            bundle: bundle_version.into(),
        });
    }
    let target = booted.other();
    let failed_here = esp.entry(target).map(|e| e.name.assessment()) == Some(Assessment::Bad)
        && esp.slots.get(&target).map(|i| i.version.as_str()) == Some(bundle_version);
    if failed_here && !opts.retry_failed {
        return Err(Refusal::FailedBefore(bundle_version.into()));
    }
    Ok(Plan {
        target,
        generation: esp.generation() + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_set_in_the_firmware_overrides_the_order() {
        let entry = |name: &str, slot: &str, generation: u64| {
            Entry::parse(
                name,
                &format!("title t\nsort-key edge\nversion {generation}\nlinux /x\noptions edge.slot={slot}\n"),
            )
            .unwrap()
        };
        let mut view = EspView {
            entries: vec![entry("edge-a.conf", "a", 1), entry("edge-b+3.conf", "b", 2)],
            ..EspView::default()
        };
        assert_eq!(view.next_boot(), Some(Slot::B));
        view.loader_default = Some("edge-a.conf".into());
        assert_eq!(view.next_boot(), Some(Slot::A));
        view.loader_default = Some("gone.conf".into());
        assert_eq!(view.next_boot(), Some(Slot::B));
    }

    #[test]
    fn state_names_are_the_json_names() {
        for st in [
            SlotState::Good,
            SlotState::Trying,
            SlotState::Failed,
            SlotState::Empty,
        ] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.name());
        }
    }

    fn entry(file: &str, slot: Slot, generation: u64) -> Entry {
        Entry::parse(
            file,
            &mec_image::files::loader_entry_body(slot.name(), "PARTUUID-X", "0.1.0", generation),
        )
        .unwrap()
    }

    fn esp(entries: Vec<Entry>, slots: &[(Slot, &str, u64)]) -> EspView {
        EspView {
            entries,
            slots: slots
                .iter()
                .map(|&(s, v, g)| {
                    (
                        s,
                        SlotInfo {
                            version: v.into(),
                            generation: g,
                            manifest_sha256: None,
                        },
                    )
                })
                .collect(),
            loader_default: None,
        }
    }

    #[test]
    fn entry_names_carry_the_boot_counters() {
        let n = EntryName::parse("edge-b+2-1.conf").unwrap();
        assert_eq!(
            (n.id.as_str(), n.tries_left, n.tries_done),
            ("edge-b", Some(2), Some(1))
        );
        assert_eq!(n.assessment(), Assessment::Indeterminate);
        let n = EntryName::parse("edge-a+3.conf").unwrap();
        assert_eq!((n.tries_left, n.tries_done), (Some(3), Some(0)));
        let n = EntryName::parse("edge-b+0-3.conf").unwrap();
        assert_eq!(n.assessment(), Assessment::Bad);
        let n = EntryName::parse("edge-a.conf").unwrap();
        assert_eq!(
            (n.id.as_str(), n.assessment()),
            ("edge-a", Assessment::Good)
        );
        // A '+' that is not a counter belongs to the id.
        let n = EntryName::parse("edge+x.conf").unwrap();
        assert_eq!((n.id.as_str(), n.tries_left), ("edge+x", None));
        for not_entry in ["edge-a.conf.tmp", "loader.conf.bak", ".conf", "edge-a", "é"] {
            assert_eq!(EntryName::parse(not_entry), None, "{not_entry}");
        }
        assert_eq!(EntryName::counted("edge-b", 3), "edge-b+3.conf");
        for f in [
            "edge-b+2-1.conf",
            "edge-b+3.conf",
            "edge-a.conf",
            "edge-b+0-3.conf",
        ] {
            assert_eq!(EntryName::parse(f).unwrap().file_name(), f);
        }
    }

    #[test]
    fn the_image_entry_parses_with_its_slot_sort_key_and_generation() {
        let e = entry("edge-a+3.conf", Slot::A, 1);
        assert_eq!(e.slot, Some(Slot::A));
        assert_eq!(e.sort_key.as_deref(), Some(SORT_KEY));
        assert_eq!(e.generation(), Some(1));
        assert!(e.title.unwrap().contains("0.1.0"));
    }

    #[test]
    fn versions_compare_as_systemd_does_for_our_strings() {
        use Ordering::*;
        for (a, b, o) in [
            ("9", "10", Less),
            ("10", "10", Equal),
            ("010", "10", Equal),
            ("edge-a", "edge-b", Less),
            ("1.2", "1.10", Less),
            ("2", "2a", Less),
            ("", "1", Less),
        ] {
            assert_eq!(version_cmp(a, b), o, "{a} vs {b}");
            assert_eq!(version_cmp(b, a), o.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn the_newest_install_boots_first_and_a_failed_one_falls_behind() {
        // The image: A, blessed.
        let mut view = esp(
            vec![entry("edge-a.conf", Slot::A, 1)],
            &[(Slot::A, "0.1.0", 1)],
        );
        assert_eq!(view.next_boot(), Some(Slot::A));
        // An update to B: B boots next, on trial.
        view.entries.push(entry("edge-b+3.conf", Slot::B, 2));
        assert_eq!(view.next_boot(), Some(Slot::B));
        // Tries run down: still B while tries are left.
        view.entries[1] = entry("edge-b+1-2.conf", Slot::B, 2);
        assert_eq!(view.next_boot(), Some(Slot::B));
        // None left: A again.
        view.entries[1] = entry("edge-b+0-3.conf", Slot::B, 2);
        assert_eq!(view.next_boot(), Some(Slot::A));
        // Blessed instead: B stays first.
        view.entries[1] = entry("edge-b.conf", Slot::B, 2);
        assert_eq!(view.next_boot(), Some(Slot::B));
        // The next update goes to A with generation 3 and wins, even as a
        // generation with more digits.
        view.entries[0] = entry("edge-a+3.conf", Slot::A, 10);
        assert_eq!(view.next_boot(), Some(Slot::A));
    }

    #[test]
    fn status_reports_each_slot() {
        let view = esp(
            vec![
                entry("edge-a.conf", Slot::A, 1),
                entry("edge-b+0-3.conf", Slot::B, 2),
            ],
            &[(Slot::A, "0.1.0", 1), (Slot::B, "0.3.0", 2)],
        );
        let s = view.status(Some(Slot::A));
        assert_eq!(s[0].slot, Slot::A);
        assert!(s[0].booted && s[0].next_boot);
        assert_eq!(s[0].state, SlotState::Good);
        assert_eq!(s[1].state, SlotState::Failed);
        assert_eq!(s[1].version.as_deref(), Some("0.3.0"));
        assert_eq!((s[1].tries_left, s[1].tries_done), (Some(0), Some(3)));
        assert_eq!(s[1].entry.as_deref(), Some("edge-b+0-3.conf"));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json[1]["state"], "failed");
        // The image as built: B has no entry.
        let fresh = esp(
            vec![entry("edge-a+3.conf", Slot::A, 1)],
            &[(Slot::A, "0.1.0", 1)],
        );
        let s = fresh.status(Some(Slot::A));
        assert_eq!(s[0].state, SlotState::Trying);
        assert_eq!(s[1].state, SlotState::Empty);
        assert!(!s[1].next_boot);
    }

    #[test]
    fn plan_writes_the_other_slot_only_when_it_is_safe() {
        let good = esp(
            vec![entry("edge-a.conf", Slot::A, 1)],
            &[(Slot::A, "0.1.0", 1)],
        );
        let opts = ApplyOptions::default();
        assert_eq!(
            plan(&good, Some(Slot::A), "0.1.0", "0.2.0", opts),
            Ok(Plan {
                target: Slot::B,
                generation: 2
            })
        );
        assert_eq!(
            plan(&good, None, "0.1.0", "0.2.0", opts),
            Err(Refusal::UnknownBootedSlot)
        );
        assert!(matches!(
            plan(&good, Some(Slot::A), "0.1.0", "0.1.0", opts),
            Err(Refusal::NotNewer { .. })
        ));
        assert!(matches!(
            plan(&good, Some(Slot::A), "0.2.0", "0.1.0", opts),
            Err(Refusal::NotNewer { .. })
        ));
        let down = ApplyOptions {
            allow_downgrade: true,
            ..opts
        };
        assert_eq!(
            plan(&good, Some(Slot::A), "0.2.0", "0.1.0", down).map(|p| p.target),
            Ok(Slot::B)
        );
        assert_eq!(
            plan(&good, Some(Slot::A), "0.1.0", "next", opts),
            Err(Refusal::BadVersion("next".into()))
        );
        // Running on trial: the fallback is not to be touched.
        let trying = esp(
            vec![
                entry("edge-a.conf", Slot::A, 1),
                entry("edge-b+2-1.conf", Slot::B, 2),
            ],
            &[(Slot::A, "0.1.0", 1), (Slot::B, "0.2.0", 2)],
        );
        assert_eq!(
            plan(&trying, Some(Slot::B), "0.2.0", "0.3.0", opts),
            Err(Refusal::RunningNotGood(Slot::B))
        );
        // A version that failed here is not tried again unless asked.
        let failed = esp(
            vec![
                entry("edge-a.conf", Slot::A, 1),
                entry("edge-b+0-3.conf", Slot::B, 2),
            ],
            &[(Slot::A, "0.1.0", 1), (Slot::B, "0.2.0", 2)],
        );
        assert_eq!(
            plan(&failed, Some(Slot::A), "0.1.0", "0.2.0", opts),
            Err(Refusal::FailedBefore("0.2.0".into()))
        );
        let retry = ApplyOptions {
            retry_failed: true,
            ..opts
        };
        assert_eq!(
            plan(&failed, Some(Slot::A), "0.1.0", "0.2.0", retry),
            Ok(Plan {
                target: Slot::B,
                generation: 3
            })
        );
        assert_eq!(
            plan(&failed, Some(Slot::A), "0.1.0", "0.2.1", opts).map(|p| p.generation),
            Ok(3)
        );
    }
}
