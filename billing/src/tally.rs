//! The in-flight tally: how many tokens each running stream has handed to
//! its client, kept where the death of the process cannot take it, so that
//! the next start bills them.
//!
//! Why: a streamed answer reaches the client token by token, while its usage
//! record is written when the generation ends. An agent killed in between
//! (SIGKILL, the OOM killer, a panic that aborts) would leave tokens the
//! subscriber received that nobody billed. So every token of a stream is
//! counted here *before* it goes to the client, and at start-up, before the
//! API opens, every slot still live becomes a usage record: outcome
//! `cancelled` when the client had already left, `failed` otherwise, billing
//! the prompt and the tokens counted. A slot whose request id is already in
//! the usage log (the kill fell between the record's append and the slot's
//! release) is only released.
//!
//! Only streams have slots: a non-streamed answer is sent after its record is
//! durable, so a kill before that delivers nothing and bills nothing.
//!
//! ## Format (`STATE_DIR/inflight.tally`)
//!
//! Slots of [`SLOT_BYTES`] bytes, slot `i` at offset `i × SLOT_BYTES`:
//!
//! | bytes | content |
//! |---|---|
//! | 0..4 | payload length, u32 LE (0: the slot is free) |
//! | 4..8 | CRC-32C of the payload, u32 LE |
//! | 8.. | the payload: [`Entry`] as JSON, then zeros |
//!
//! Writes are `pwrite`s of one whole slot, without `fsync`: the page cache
//! outlives the process, which is the failure this file is for. A power cut
//! is the usage log's business; after one, a slot may be stale or torn. A
//! torn slot fails its CRC and is reported, never guessed at.
//!
//! The file is read once at start-up. Slots the previous process left are
//! adopted by the new one ([`Tally::adopt`]) and stay in the file until
//! their stream is billed, which may be later than the start when the log
//! is full; the other slots are reused while the agent runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use mec_metering::rating::{AppliedRate, Rate};
use serde::{Deserialize, Serialize};

/// Bytes of one slot.
pub const SLOT_BYTES: usize = 1024;
const HEADER: usize = 8;

/// What one live stream has cost so far: enough to write its usage record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The request id (the record's `record_id`), hex.
    pub request_id: String,
    /// The subscriber.
    pub imsi: String,
    /// The app.
    pub app: String,
    /// The model.
    pub model: String,
    /// Arrival, Unix milliseconds.
    pub started_ms: i64,
    /// Last count, Unix milliseconds.
    pub updated_ms: i64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens handed to the client (or about to be).
    pub completion_tokens: u64,
    /// Tokens reserved for the request.
    pub reserved_tokens: u64,
    /// The client closed the stream before the end.
    pub client_left: bool,
    /// The usage log's durable seq when the request began: its record, if
    /// any, comes after.
    pub log_seq: u64,
    /// The app's end-user id (bounded by the API: an entry fits its slot).
    #[serde(default)]
    pub end_user: String,
    /// Choices (`n`); 0 in entries written before the field.
    #[serde(default)]
    pub choices: u32,
    /// The output constraint, empty for none.
    #[serde(default)]
    pub constraint: String,
    /// The rate the stream is billed at; absent in entries written before
    /// rating (one unit a token).
    #[serde(default)]
    pub rate: RateEntry,
}

/// A rate in a slot, compact (a slot is 1 KiB): `[prompt, cached,
/// completion]` thousandths, and the table's version (its digest is found
/// by version among the tables the box kept: [`crate::BillingConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateEntry(pub [u64; 3], pub u64);

impl Default for RateEntry {
    fn default() -> RateEntry {
        RateEntry::of(&AppliedRate::default())
    }
}

impl RateEntry {
    /// The slot's form of `applied`.
    pub fn of(applied: &AppliedRate) -> RateEntry {
        let r = applied.rate;
        RateEntry(
            [r.prompt_milli, r.cached_milli, r.completion_milli],
            applied.version,
        )
    }

    /// Back to the rate, with its table's digest and the model's tier in it.
    pub fn applied(&self, digest: Vec<u8>, tier: Option<String>) -> AppliedRate {
        let [p, c, k] = self.0;
        AppliedRate {
            rate: Rate {
                prompt_milli: p,
                cached_milli: c,
                completion_milli: k,
            },
            version: self.1,
            digest,
            tier,
        }
    }
}

/// A slot as read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
// Slots are read once, at start-up, a few at a time: their size is no cost.
#[allow(clippy::large_enum_variant)]
pub enum Slot {
    /// Nothing in it.
    Free,
    /// A stream the previous process did not settle.
    Live(Entry),
    /// Bytes that are neither: why.
    Corrupt(String),
}

/// Errors of the tally file.
#[derive(Debug, thiserror::Error)]
pub enum TallyError {
    /// An entry too large for a slot (ids beyond their configured limits).
    #[error("an in-flight entry of {0} bytes does not fit a {SLOT_BYTES}-byte slot")]
    TooLarge(usize),
    /// The file. (The reason is in the message, not a `source`: printed
    /// with its chain, it would show twice.)
    #[error("in-flight tally {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

/// The bytes of a slot holding `entry`.
pub fn encode_slot(entry: &Entry) -> Result<[u8; SLOT_BYTES], TallyError> {
    let payload = serde_json::to_vec(entry).expect("an entry serialises");
    if payload.len() > SLOT_BYTES - HEADER {
        return Err(TallyError::TooLarge(payload.len()));
    }
    let mut slot = [0u8; SLOT_BYTES];
    slot[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    slot[4..8].copy_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    slot[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
    Ok(slot)
}

/// Reads one slot's bytes (a short last slot is a torn extension).
pub fn decode_slot(bytes: &[u8]) -> Slot {
    if bytes.len() < HEADER {
        return if bytes.iter().all(|&b| b == 0) {
            Slot::Free
        } else {
            Slot::Corrupt(format!("a torn slot of {} bytes", bytes.len()))
        };
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    if len == 0 {
        return Slot::Free;
    }
    if len > SLOT_BYTES - HEADER || HEADER + len > bytes.len() {
        return Slot::Corrupt(format!("a payload length of {len} bytes"));
    }
    let payload = &bytes[HEADER..HEADER + len];
    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
    if crc32c::crc32c(payload) != crc {
        return Slot::Corrupt("the payload fails its CRC".into());
    }
    match serde_json::from_slice(payload) {
        Ok(e) => Slot::Live(e),
        Err(e) => Slot::Corrupt(format!("the payload is not an entry: {e}")),
    }
}

/// Every slot of a file's bytes, in order.
pub fn decode_file(bytes: &[u8]) -> Vec<Slot> {
    bytes.chunks(SLOT_BYTES).map(decode_slot).collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The tally file of a running agent.
pub struct Tally {
    file: File,
    path: PathBuf,
    free: Mutex<Vec<u32>>,
    next: AtomicU32,
    /// Slots in use, with the log position their stream started at.
    live: Mutex<std::collections::BTreeMap<u32, u64>>,
}

impl Tally {
    /// Opens (creating) the file and returns what the previous process left
    /// in it, each slot with its index. The caller adopts the live ones
    /// ([`Tally::adopt`]) and frees each once its stream is billed; the free
    /// and unreadable slots are reused.
    pub fn open(path: &Path) -> Result<(Tally, Vec<(u32, Slot)>), TallyError> {
        let io = |error| TallyError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let bytes = std::fs::read(path).map_err(io)?;
        let slots = decode_file(&bytes);
        let mut free = Vec::new();
        let mut left = Vec::new();
        for (i, slot) in slots.iter().enumerate() {
            match slot {
                Slot::Live(_) => left.push((i as u32, slot.clone())),
                Slot::Free => free.push(i as u32),
                Slot::Corrupt(_) => {
                    left.push((i as u32, slot.clone()));
                    free.push(i as u32);
                }
            }
        }
        // Lowest index first when reused.
        free.reverse();
        Ok((
            Tally {
                file,
                path: path.to_path_buf(),
                free: Mutex::new(free),
                next: AtomicU32::new(slots.len() as u32),
                live: Mutex::new(std::collections::BTreeMap::new()),
            },
            left,
        ))
    }

    /// Takes over slot `index` of the previous process (holding `entry`):
    /// it stays written until its stream is billed and the slot released.
    pub fn adopt(self: &Arc<Self>, index: u32, entry: Entry) -> Counting {
        self.live.lock().unwrap().insert(index, entry.log_seq);
        Counting {
            tally: self.clone(),
            index,
            entry,
        }
    }

    /// Makes the slots' writes durable (`fdatasync`). Slots are written
    /// without it (the page cache outlives the process); before the store
    /// forgets record ids, the releases must outlive a power cut too, or a
    /// slot freed in memory could come back at the next start with its
    /// record id forgotten.
    pub fn sync(&self) -> Result<(), TallyError> {
        self.file.sync_data().map_err(|error| TallyError::Io {
            path: self.path.clone(),
            error,
        })
    }

    /// The lowest log position any live slot started at: records at or
    /// below it can no longer be asked about by a slot.
    pub fn min_live_log_seq(&self) -> Option<u64> {
        self.live.lock().unwrap().values().min().copied()
    }

    /// Takes a slot for `entry`; the stream may start once this returned.
    pub fn begin(self: &Arc<Self>, entry: Entry) -> Result<Counting, TallyError> {
        let index = self
            .free
            .lock()
            .unwrap()
            .pop()
            .unwrap_or_else(|| self.next.fetch_add(1, Ordering::Relaxed));
        let log_seq = entry.log_seq;
        let counting = Counting {
            tally: self.clone(),
            index,
            entry,
        };
        // On failure the slot may hold part of the entry: it is not reused.
        counting.write()?;
        self.live.lock().unwrap().insert(index, log_seq);
        Ok(counting)
    }

    fn write_slot(&self, index: u32, bytes: &[u8]) -> Result<(), TallyError> {
        self.file
            .write_all_at(bytes, index as u64 * SLOT_BYTES as u64)
            .map_err(|error| TallyError::Io {
                path: self.path.clone(),
                error,
            })
    }
}

/// One stream's slot, counting.
pub struct Counting {
    tally: Arc<Tally>,
    index: u32,
    entry: Entry,
}

impl Counting {
    fn write(&self) -> Result<(), TallyError> {
        self.tally
            .write_slot(self.index, &encode_slot(&self.entry)?)
    }

    /// What the slot holds.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Counts `tokens` more, before they go to the client.
    pub fn count(&mut self, tokens: u64) -> Result<(), TallyError> {
        if tokens == 0 {
            return Ok(());
        }
        self.entry.completion_tokens += tokens;
        self.entry.updated_ms = now_ms();
        self.write()
    }

    /// Notes that the client left.
    pub fn client_left(&mut self) -> Result<(), TallyError> {
        self.entry.client_left = true;
        self.entry.updated_ms = now_ms();
        self.write()
    }

    /// Frees the slot: the stream's record is durable, or it made nothing
    /// to bill. A slot that cannot be freed is kept out of use (the next
    /// start finds its record in the log and only releases it).
    pub fn release(self) {
        // Zeroed first, then out of the live set: the store prunes record ids
        // only below live slots, after syncing this file (see `Tally::sync`).
        // A slot that cannot be zeroed stays live.
        match self.tally.write_slot(self.index, &[0u8; HEADER]) {
            Ok(()) => {
                self.tally.live.lock().unwrap().remove(&self.index);
                self.tally.free.lock().unwrap().push(self.index);
            }
            Err(e) => tracing::warn!(error = %e, "could not free an in-flight slot"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> Entry {
        Entry {
            end_user: String::new(),
            choices: 1,
            constraint: String::new(),
            request_id: format!("{n:032x}"),
            imsi: "001010000000001".into(),
            app: "app".into(),
            model: "m".into(),
            started_ms: 1,
            updated_ms: 2,
            prompt_tokens: 10,
            completion_tokens: n,
            reserved_tokens: 100,
            client_left: false,
            log_seq: 7,
            rate: RateEntry::default(),
        }
    }

    #[test]
    fn an_entry_at_the_apis_limits_fits_its_slot() {
        // Ids of 128 bytes, an end user of 128 quotes (each escaped in
        // JSON), a table's rate and digest, the largest numbers.
        let e = Entry {
            request_id: "f".repeat(32),
            imsi: "0".repeat(15),
            app: "a".repeat(128),
            model: "m".repeat(128),
            started_ms: i64::MAX,
            updated_ms: i64::MAX,
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            reserved_tokens: u64::MAX,
            client_left: true,
            log_seq: u64::MAX,
            end_user: "\"".repeat(128),
            choices: u32::MAX,
            constraint: "json_schema".into(),
            rate: RateEntry([u64::MAX; 3], u64::MAX),
        };
        let bytes = encode_slot(&e).unwrap();
        assert_eq!(decode_slot(&bytes), Slot::Live(e));
    }

    #[test]
    fn a_slot_round_trips_and_any_flipped_payload_byte_is_caught() {
        let e = entry(3);
        let bytes = encode_slot(&e).unwrap();
        assert_eq!(decode_slot(&bytes), Slot::Live(e));
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        for i in HEADER..HEADER + len {
            let mut bad = bytes;
            bad[i] ^= 0x20;
            assert!(
                matches!(decode_slot(&bad), Slot::Corrupt(_)),
                "flipped byte {i}"
            );
        }
        assert_eq!(decode_slot(&[0u8; SLOT_BYTES]), Slot::Free);
        assert!(matches!(
            decode_slot(&bytes[..HEADER + 4]),
            Slot::Corrupt(_)
        ));
        let mut long = bytes;
        long[0..4].copy_from_slice(&(SLOT_BYTES as u32).to_le_bytes());
        assert!(matches!(decode_slot(&long), Slot::Corrupt(_)));
    }

    #[test]
    fn an_entry_too_large_for_a_slot_is_refused() {
        let mut e = entry(1);
        e.app = "a".repeat(SLOT_BYTES);
        assert!(matches!(encode_slot(&e), Err(TallyError::TooLarge(_))));
    }

    #[test]
    fn what_a_process_left_is_read_back_and_released_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inflight.tally");
        let (tally, left) = Tally::open(&path).unwrap();
        assert!(left.is_empty());
        let tally = Arc::new(tally);
        let mut a = tally.begin(entry(0)).unwrap();
        let b = tally.begin(entry(0)).unwrap();
        a.count(2).unwrap();
        a.count(0).unwrap();
        a.client_left().unwrap();
        b.release();
        let c = tally.begin(entry(5)).unwrap();
        assert_eq!(c.index, 1, "the released slot is reused");
        drop((a, c, tally)); // the process dies: nothing is released

        let (tally, left) = Tally::open(&path).unwrap();
        let tally = Arc::new(tally);
        match &left[..] {
            [(0, Slot::Live(a)), (1, Slot::Live(c))] => {
                assert_eq!((a.completion_tokens, a.client_left), (2, true), "{a:?}");
                assert_eq!(c, &entry(5));
                // Adopted, billed, released: the next process finds nothing.
                tally.adopt(0, a.clone()).release();
                let c = tally.adopt(1, c.clone());
                assert_eq!(tally.min_live_log_seq(), Some(7));
                // A new stream takes the freed slot, never the adopted one.
                assert_eq!(tally.begin(entry(1)).unwrap().index, 0);
                c.release();
            }
            other => panic!("{other:?}"),
        }
        drop(tally);
        let (_, left) = Tally::open(&path).unwrap();
        assert_eq!(
            left.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0],
            "only the stream begun after the adoption (never released) is left"
        );
    }
}
