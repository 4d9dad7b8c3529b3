//! Pins in Envoy shared data, written against a [`SharedData`] interface so the rules are
//! unit-tested natively; the proxy-wasm layer implements it with `proxy_get_shared_data` /
//! `proxy_set_shared_data`.
//!
//! Shared data is keyed per vm_id and shared by every worker thread's VM; a write carries
//! the CAS number read before it, so a concurrent writer wins cleanly instead of being
//! overwritten (proxy-wasm ABI v0.2.1; proxy-wasm-cpp-host `src/shared_data.cc`: CAS values
//! start at 1 and grow with every write, cas 0 / `None` writes unconditionally). There is
//! no delete: a forgotten pin becomes an empty value (tombstone).

use std::collections::VecDeque;

use hashbrown::HashSet;

use crate::pin::{self, DecodeError, Pin};

/// Shared data as the proxy-wasm ABI offers it.
pub trait SharedData {
    /// `proxy_get_shared_data`: the value and its CAS number, `None` when the key is unknown
    /// (or the host refused).
    fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)>;
    /// `proxy_set_shared_data`: false on CAS_MISMATCH (another writer was first) or when
    /// the host refused.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// A pin read from shared data together with its CAS number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub pin: Pin,
    pub cas: Option<u32>,
}

/// Reads the pin of `session_id`. Tombstones, undecodable values and missing keys are
/// all `None`.
pub fn get(shared: &dyn SharedData, session_id: &str) -> Option<Stored> {
    read(shared, &pin::key(session_id))
}

fn read(shared: &dyn SharedData, key: &str) -> Option<Stored> {
    let (value, cas) = shared.get(key)?;
    match Pin::decode(&value) {
        Ok(pin) => Some(Stored { pin, cas }),
        Err(DecodeError::Tombstone) => None,
        Err(DecodeError::Invalid) => {
            log::warn!("mcp-affinity: ignoring undecodable shared data under {key}");
            None
        }
    }
}

/// Writes `pin` for `session_id` and indexes its key for the sweep. `cas`: the number read
/// before (`None` = unconditional). Returns false when another writer got there first.
pub fn put(shared: &mut dyn SharedData, index: &mut SweepIndex, session_id: &str, pin: &Pin, cas: Option<u32>) -> bool {
    let key = pin::key(session_id);
    let ok = shared.set(&key, &pin.encode(), cas);
    if ok {
        index.insert(key);
    }
    ok
}

/// Marks the pin of `session_id` as past `notifications/initialized` (read-modify-write
/// with CAS, retried once if another worker wrote in between).
pub fn mark_recorded(shared: &mut dyn SharedData, index: &mut SweepIndex, session_id: &str) {
    for _ in 0..2 {
        let Some(mut stored) = get(shared, session_id) else { return };
        if stored.pin.recorded {
            return;
        }
        stored.pin.recorded = true;
        if put(shared, index, session_id, &stored.pin, stored.cas) {
            return;
        }
    }
}

/// Tombstones the pin of `session_id` (unconditionally).
pub fn forget(shared: &mut dyn SharedData, index: &mut SweepIndex, session_id: &str) {
    let key = pin::key(session_id);
    shared.set(&key, &[], None);
    index.remove(&key);
}

/// Keys this VM wrote, so its root context's tick can sweep them. Shared data cannot be
/// enumerated (ABI v0.2.1 has no such call); every VM sweeps what it wrote or refreshed.
///
/// The sweep is incremental: each tick looks at a bounded batch of keys in ring order
/// ([`sweep`]), so a tick's cost does not grow with the number of sessions.
#[derive(Debug, Default)]
pub struct SweepIndex {
    /// The indexed keys.
    keys: HashSet<String>,
    /// Sweep order; may hold keys removed since (skipped when reached).
    ring: VecDeque<String>,
}

impl SweepIndex {
    /// Indexes `key` (once).
    pub fn insert(&mut self, key: String) {
        if !self.keys.contains(&key) {
            self.keys.insert(key.clone());
            self.ring.push_back(key);
        }
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &str) {
        self.keys.remove(key);
    }

    /// Number of indexed keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No key is indexed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Looks at up to `batch` indexed pins (the next ones in ring order) and tombstones those
/// idle for `ttl_secs` or more; returns how many expired. A pin refreshed by another VM
/// since it was indexed is kept (its timestamp is newer); the CAS guard keeps a
/// concurrent refresh from being wiped. Each key is looked at once per
/// `len / batch` calls.
pub fn sweep(shared: &mut dyn SharedData, index: &mut SweepIndex, now: u64, ttl_secs: u64, batch: usize) -> u64 {
    let mut expired = 0;
    for _ in 0..batch.min(index.ring.len()) {
        let Some(key) = index.ring.pop_front() else { break };
        if !index.keys.contains(&key) {
            continue; // forgotten since it was indexed
        }
        let keep = match read(shared, &key) {
            None => false,
            Some(stored) if stored.pin.is_expired(now, ttl_secs) => {
                if shared.set(&key, &[], stored.cas) {
                    expired += 1;
                    false
                } else {
                    true // refreshed concurrently: look again next time
                }
            }
            Some(_) => true,
        };
        if keep {
            index.ring.push_back(key);
        } else {
            index.keys.remove(&key);
        }
    }
    expired
}

/// In-memory shared data with the CAS rules of proxy-wasm-cpp-host `src/shared_data.cc`
/// (one global counter, starting at 1, bumped on every write), for native tests and
/// benchmarks of the stream machine.
pub mod memory {
    use hashbrown::HashMap;

    /// See the module docs.
    #[derive(Debug, Default)]
    pub struct MemorySharedData {
        map: HashMap<String, (Vec<u8>, u32)>,
        next_cas: u32,
    }

    impl super::SharedData for MemorySharedData {
        fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
            self.map.get(key).map(|(v, cas)| (v.clone(), Some(*cas)))
        }

        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            if let (Some(want), Some((_, have))) = (cas.filter(|c| *c != 0), self.map.get(key))
                && want != *have
            {
                return false;
            }
            self.next_cas += 1;
            self.map.insert(key.to_string(), (value.to_vec(), self.next_cas));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemorySharedData;
    use super::*;

    fn pin(last_seen: u64) -> Pin {
        Pin { upstream: "127.0.0.1:1".into(), generation: 1, last_seen, backend_session_id: "s".into(), recorded: false }
    }

    #[test]
    fn put_get_forget() {
        let (mut shared, mut index) = (MemorySharedData::default(), SweepIndex::default());
        assert!(get(&shared, "s").is_none());
        assert!(put(&mut shared, &mut index, "s", &pin(1), None));
        assert_eq!(get(&shared, "s").unwrap().pin, pin(1));
        forget(&mut shared, &mut index, "s");
        assert!(get(&shared, "s").is_none(), "a tombstone reads as no pin");
        assert!(index.is_empty());
    }

    #[test]
    fn a_stale_cas_loses() {
        let (mut shared, mut index) = (MemorySharedData::default(), SweepIndex::default());
        put(&mut shared, &mut index, "s", &pin(1), None);
        let first = get(&shared, "s").unwrap();
        assert!(put(&mut shared, &mut index, "s", &pin(2), first.cas));
        assert!(!put(&mut shared, &mut index, "s", &pin(3), first.cas), "the CAS read before the last write is stale");
        assert_eq!(get(&shared, "s").unwrap().pin.last_seen, 2);
    }

    #[test]
    fn mark_recorded_sets_the_flag_once() {
        let (mut shared, mut index) = (MemorySharedData::default(), SweepIndex::default());
        put(&mut shared, &mut index, "s", &pin(1), None);
        mark_recorded(&mut shared, &mut index, "s");
        assert!(get(&shared, "s").unwrap().pin.recorded);
        mark_recorded(&mut shared, &mut index, "unknown");
        assert!(get(&shared, "unknown").is_none());
    }

    #[test]
    fn sweep_expires_only_idle_pins() {
        let (mut shared, mut index) = (MemorySharedData::default(), SweepIndex::default());
        put(&mut shared, &mut index, "old", &pin(100), None);
        put(&mut shared, &mut index, "new", &pin(190), None);
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 16), 1);
        assert!(get(&shared, "old").is_none());
        assert!(get(&shared, "new").is_some());
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn the_sweep_is_bounded_per_call_and_reaches_every_key_in_turn() {
        let (mut shared, mut index) = (MemorySharedData::default(), SweepIndex::default());
        for i in 0..10 {
            put(&mut shared, &mut index, &format!("s{i}"), &pin(100), None);
        }
        put(&mut shared, &mut index, "s0", &pin(100), None); // indexed once
        forget(&mut shared, &mut index, "s1");
        assert_eq!(index.len(), 9);
        // 3 keys per call: the forgotten s1 costs a slot, not a read.
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 3), 2);
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 3), 3);
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 3), 3);
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 3), 1);
        assert!(index.is_empty());
        assert_eq!(sweep(&mut shared, &mut index, 200, 50, 3), 0);
    }
}
