//! Pins in Envoy shared data, in a bounded number of buckets, written against a
//! [`SharedData`] interface so the rules are unit-tested natively; the proxy-wasm layer
//! implements it with `proxy_get_shared_data` / `proxy_set_shared_data`.
//!
//! Shared data is keyed per vm_id and shared by every worker thread's VM; a write carries
//! the CAS number read before it, so a concurrent writer wins cleanly instead of being
//! overwritten (proxy-wasm ABI v0.2.1; proxy-wasm-cpp-host `src/shared_data.cc`: CAS values
//! start at 1 and grow with every write). The ABI has **no delete**: a key once written
//! stays until Envoy restarts. One key per session would grow without bound as sessions
//! come and go, so sessions live in [`Layout::buckets`] keys instead:
//!
//! - key `mcp-affinity/pins/<n>`, `n` = FNV-1a(session id) mod `buckets`;
//! - value: up to [`Layout::capacity`] lines `<client session id> <pin>` (the [`Pin`]
//!   format; session ids are visible ASCII, so neither space nor newline appears in one);
//! - every change is a read-modify-write of the bucket with CAS, retried on a concurrent
//!   write ([`update`]), so writers of different sessions never undo each other;
//! - a full bucket evicts its least recently used pin for a new one (counted by the
//!   caller): a ceiling of `buckets × capacity` pins and about
//!   `buckets × (20 + capacity × (60 + 2 × id length))` bytes of shared data, whatever the
//!   traffic. An evicted session is found again through control (or, without control,
//!   gets 404 and the client re-initialises, MCP `basic/transports`);
//! - the sweep walks the buckets incrementally ([`sweep`]) and drops idle pins.

use crate::pin::{DecodeError, MAX_DECIMAL, Pin, to_decimal};

/// Shared data as the proxy-wasm ABI offers it.
pub trait SharedData {
    /// `proxy_get_shared_data`: the value and its CAS number, `None` when the key is unknown
    /// (or the host refused).
    fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)>;
    /// `proxy_set_shared_data`: false on CAS_MISMATCH (another writer was first) or when
    /// the host refused.
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// How pins are spread over shared-data keys (plugin configuration `shared_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of bucket keys.
    pub buckets: u32,
    /// Most pins per bucket.
    pub capacity: usize,
}

/// Prefix of every shared-data key this filter writes.
pub const KEY_PREFIX: &str = "mcp-affinity/pins/";

/// How many times a read-modify-write is retried when another VM wrote the bucket first.
const CAS_ATTEMPTS: usize = 8;

/// FNV-1a, 32 bits: a stable hash (the same in every worker VM and across restarts).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

impl Layout {
    /// The bucket of `session_id`.
    pub fn bucket(&self, session_id: &str) -> u32 {
        fnv1a(session_id.as_bytes()) % self.buckets.max(1)
    }

    /// The shared-data key of bucket `n`, `mcp-affinity/pins/<n>` (built on the stack: it
    /// is made on every request).
    pub fn key(n: u32) -> BucketKey {
        let mut key = BucketKey { bytes: [0; BucketKey::MAX], len: KEY_PREFIX.len() };
        key.bytes[..KEY_PREFIX.len()].copy_from_slice(KEY_PREFIX.as_bytes());
        let mut buf = [0; MAX_DECIMAL];
        let digits = to_decimal(u64::from(n), &mut buf);
        key.bytes[key.len..key.len + digits.len()].copy_from_slice(digits);
        key.len += digits.len();
        key
    }
}

/// A bucket's shared-data key ([`Layout::key`]): [`KEY_PREFIX`] and a `u32` in decimal.
#[derive(Debug, Clone, Copy)]
pub struct BucketKey {
    bytes: [u8; BucketKey::MAX],
    len: usize,
}

impl BucketKey {
    /// Longest key: the prefix and 10 digits.
    const MAX: usize = KEY_PREFIX.len() + 10;
}

impl std::ops::Deref for BucketKey {
    type Target = str;

    fn deref(&self) -> &str {
        // The prefix is ASCII and so are the digits.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// The pin part of a bucket line when the line is `session_id`'s (`<session id> <pin>`).
fn pin_of<'a>(line: &'a [u8], session_id: &str) -> Option<&'a [u8]> {
    line.strip_prefix(session_id.as_bytes())?.strip_prefix(b" ")
}

/// The pin part of `session_id`'s line in a bucket value, if any.
fn find<'a>(bucket: &'a [u8], session_id: &str) -> Option<&'a [u8]> {
    bucket.split(|b| *b == b'\n').find_map(|line| pin_of(line, session_id))
}

/// Reads the pin of `session_id`; `None` when absent or undecodable (logged).
pub fn get(shared: &dyn SharedData, layout: Layout, session_id: &str) -> Option<Pin> {
    let (value, _) = shared.get(&Layout::key(layout.bucket(session_id)))?;
    match Pin::decode(find(&value, session_id)?) {
        Ok(pin) => Some(pin),
        Err(DecodeError::Tombstone | DecodeError::Invalid) => {
            log::warn!("mcp-affinity: ignoring an undecodable pin of {session_id}");
            None
        }
    }
}

/// What [`update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    /// Written (or nothing to change).
    Done,
    /// Written; another session's pin was evicted to make room.
    Evicted,
    /// Other VMs kept writing the bucket; gave up after a few attempts (logged).
    Contended,
}

/// Replaces the pin of `session_id` by `f(current)` (`None` removes it), as a CAS
/// read-modify-write of its bucket, retried when another VM wrote the bucket first. A
/// new pin in a full bucket evicts the least recently used one.
pub fn update(shared: &mut dyn SharedData, layout: Layout, session_id: &str, mut f: impl FnMut(Option<Pin>) -> Option<Pin>) -> Updated {
    let key = Layout::key(layout.bucket(session_id));
    for _ in 0..CAS_ATTEMPTS {
        let (value, cas) = shared.get(&key).unwrap_or_default();
        let lines = || value.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        let own = find(&value, session_id);
        let current = own.and_then(|p| Pin::decode(p).ok());
        let next = f(current.clone());
        if next == current {
            return Updated::Done;
        }
        // A new pin in a full bucket takes the place of its least recently used one.
        let evict = if own.is_none() && next.is_some() && lines().count() >= layout.capacity { lines().min_by_key(|l| last_seen(l)) } else { None };
        // The bucket rewritten in one buffer: the other lines as they are, this session's
        // line replaced in place, removed, or appended.
        let mut written = Vec::with_capacity(value.len() + session_id.len() + 2 * MAX_DECIMAL + 64);
        for line in lines() {
            // Lines are told apart by address: two lines of equal bytes stay two lines.
            if own.is_some_and(|o| pin_of(line, session_id).is_some_and(|p| std::ptr::eq(p, o))) {
                if let Some(pin) = &next {
                    push_pin_line(&mut written, session_id, pin);
                }
            } else if !evict.is_some_and(|e| std::ptr::eq(e, line)) {
                new_line(&mut written);
                written.extend_from_slice(line);
            }
        }
        if own.is_none()
            && let Some(pin) = &next
        {
            push_pin_line(&mut written, session_id, pin);
        }
        // A bucket's first write has no CAS to guard it (the ABI cannot create-if-absent):
        // read it back, and go round again if another VM's first write won.
        let landed = match cas {
            Some(_) => shared.set(&key, &written, cas),
            None => shared.set(&key, &written, None) && shared.get(&key).is_some_and(|(v, _)| v == written),
        };
        if landed {
            return if evict.is_some() { Updated::Evicted } else { Updated::Done };
        }
    }
    log::warn!("mcp-affinity: shared-data bucket of {session_id} kept changing; update dropped");
    Updated::Contended
}

/// Starts a line of a bucket value being written (lines are separated by `\n`).
fn new_line(out: &mut Vec<u8>) {
    if !out.is_empty() {
        out.push(b'\n');
    }
}

/// Appends the line `<session id> <pin>` to a bucket value being written.
fn push_pin_line(out: &mut Vec<u8>, session_id: &str, pin: &Pin) {
    new_line(out);
    out.extend_from_slice(session_id.as_bytes());
    out.push(b' ');
    pin.encode_into(out);
}

/// `last_seen` of a bucket line (0 when undecodable, so it goes first).
fn last_seen(line: &[u8]) -> u64 {
    line.iter().position(|b| *b == b' ').and_then(|i| Pin::decode(&line[i + 1..]).ok()).map_or(0, |p| p.last_seen)
}

/// Writes `pin` for `session_id`.
pub fn put(shared: &mut dyn SharedData, layout: Layout, session_id: &str, pin: &Pin) -> Updated {
    update(shared, layout, session_id, |_| Some(pin.clone()))
}

/// Refreshes the last-seen time of `session_id`'s pin, whatever its other fields are now
/// (a concurrent re-pin is kept).
pub fn touch(shared: &mut dyn SharedData, layout: Layout, session_id: &str, now: u64) {
    update(shared, layout, session_id, |cur| cur.map(|p| Pin { last_seen: now.max(p.last_seen), ..p }));
}

/// Marks the pin of `session_id` as past `notifications/initialized`.
pub fn mark_recorded(shared: &mut dyn SharedData, layout: Layout, session_id: &str) {
    update(shared, layout, session_id, |cur| cur.map(|p| Pin { recorded: true, ..p }));
}

/// Removes the pin of `session_id`.
pub fn forget(shared: &mut dyn SharedData, layout: Layout, session_id: &str) {
    update(shared, layout, session_id, |_| None);
}

/// Looks at the next `batch` buckets from `*cursor` (wrapping) and drops pins idle for
/// `ttl_secs` or more; returns how many expired. A bucket written concurrently is left for
/// the next round. The cost of a call is bounded by `batch`, whatever the number of
/// sessions.
pub fn sweep(shared: &mut dyn SharedData, layout: Layout, cursor: &mut u32, now: u64, ttl_secs: u64, batch: u32) -> u64 {
    let mut expired = 0;
    for _ in 0..batch.min(layout.buckets) {
        let key = Layout::key(*cursor);
        *cursor = (*cursor + 1) % layout.buckets.max(1);
        let Some((value, cas)) = shared.get(&key) else { continue };
        let lines: Vec<&[u8]> = value.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
        let live: Vec<&[u8]> = lines
            .iter()
            .copied()
            .filter(|l| l.iter().position(|b| *b == b' ').and_then(|i| Pin::decode(&l[i + 1..]).ok()).is_some_and(|p| !p.is_expired(now, ttl_secs)))
            .collect();
        if live.len() < lines.len() && shared.set(&key, &live.join(&b'\n'), cas) {
            expired += (lines.len() - live.len()) as u64;
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

    impl MemorySharedData {
        /// Number of keys and bytes held (keys + values).
        pub fn footprint(&self) -> (usize, usize) {
            (self.map.len(), self.map.iter().map(|(k, (v, _))| k.len() + v.len()).sum())
        }
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

    const ONE: Layout = Layout { buckets: 1, capacity: 3 };

    #[test]
    fn bucket_keys_are_the_prefix_and_the_number() {
        for n in [0, 7, 10, 65_535, u32::MAX] {
            assert_eq!(&*Layout::key(n), format!("{KEY_PREFIX}{n}"));
        }
    }
    const MANY: Layout = Layout { buckets: 64, capacity: 4 };

    fn pin(last_seen: u64) -> Pin {
        Pin { upstream: "127.0.0.1:1".into(), generation: 1, last_seen, backend_session_id: "s".into(), recorded: false }
    }

    #[test]
    fn put_get_forget() {
        let mut shared = MemorySharedData::default();
        assert!(get(&shared, MANY, "s").is_none());
        assert_eq!(put(&mut shared, MANY, "s", &pin(1)), Updated::Done);
        assert_eq!(get(&shared, MANY, "s").unwrap(), pin(1));
        forget(&mut shared, MANY, "s");
        assert!(get(&shared, MANY, "s").is_none());
    }

    #[test]
    fn sessions_sharing_a_bucket_do_not_see_or_undo_each_other() {
        let mut shared = MemorySharedData::default();
        put(&mut shared, ONE, "a", &pin(1));
        put(&mut shared, ONE, "ab", &pin(2)); // "a" is a prefix of "ab"
        assert_eq!(get(&shared, ONE, "a").unwrap().last_seen, 1);
        assert_eq!(get(&shared, ONE, "ab").unwrap().last_seen, 2);
        forget(&mut shared, ONE, "a");
        assert!(get(&shared, ONE, "a").is_none());
        assert_eq!(get(&shared, ONE, "ab").unwrap().last_seen, 2);
    }

    /// A writer that lost the race re-reads and applies its change to the new value:
    /// another VM's write between our read and our write is never undone.
    #[test]
    fn a_concurrent_write_is_retried_not_clobbered() {
        struct Racy {
            inner: MemorySharedData,
            race_once: bool,
        }
        impl SharedData for Racy {
            fn get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
                self.inner.get(key)
            }
            fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
                if std::mem::take(&mut self.race_once) {
                    // Another VM re-pins "x" just before our write lands.
                    put(&mut self.inner, ONE, "x", &Pin { generation: 2, ..pin(5) });
                }
                self.inner.set(key, value, cas)
            }
        }
        let mut shared = Racy { inner: MemorySharedData::default(), race_once: false };
        put(&mut shared, ONE, "x", &pin(1));
        shared.race_once = true;
        touch(&mut shared, ONE, "x", 9);
        let now = get(&shared, ONE, "x").unwrap();
        assert_eq!((now.generation, now.last_seen), (2, 9), "the touch applied to the re-pin, not over it");
    }

    #[test]
    fn a_full_bucket_evicts_its_least_recently_used_pin() {
        let mut shared = MemorySharedData::default();
        put(&mut shared, ONE, "a", &pin(30));
        put(&mut shared, ONE, "b", &pin(10));
        put(&mut shared, ONE, "c", &pin(20));
        assert_eq!(put(&mut shared, ONE, "d", &pin(40)), Updated::Evicted);
        assert!(get(&shared, ONE, "b").is_none(), "b was idle longest");
        for id in ["a", "c", "d"] {
            assert!(get(&shared, ONE, id).is_some(), "{id}");
        }
        assert_eq!(put(&mut shared, ONE, "a", &pin(50)), Updated::Done, "replacing is not evicting");
    }

    #[test]
    fn shared_data_stays_bounded_however_many_sessions_come_and_go() {
        let mut shared = MemorySharedData::default();
        for i in 0..10_000 {
            put(&mut shared, MANY, &format!("session-{i:05}"), &pin(i));
        }
        let (keys, bytes) = shared.footprint();
        assert!(keys <= 64, "{keys} keys");
        assert!(bytes <= 64 * (20 + 4 * (60 + 2 * 13)), "{bytes} bytes");
    }

    #[test]
    fn mark_recorded_and_touch_change_only_their_field() {
        let mut shared = MemorySharedData::default();
        put(&mut shared, MANY, "s", &pin(1));
        mark_recorded(&mut shared, MANY, "s");
        touch(&mut shared, MANY, "s", 7);
        assert_eq!(get(&shared, MANY, "s").unwrap(), Pin { recorded: true, last_seen: 7, ..pin(1) });
        touch(&mut shared, MANY, "unknown", 7);
        assert!(get(&shared, MANY, "unknown").is_none(), "a touch never creates a pin");
    }

    #[test]
    fn the_sweep_is_bounded_per_call_and_reaches_every_bucket_in_turn() {
        let mut shared = MemorySharedData::default();
        let layout = Layout { buckets: 8, capacity: 64 };
        for i in 0..40 {
            put(&mut shared, layout, &format!("s{i}"), &pin(if i % 2 == 0 { 100 } else { 190 }));
        }
        let mut cursor = 0;
        let mut expired = 0;
        for _ in 0..4 {
            expired += sweep(&mut shared, layout, &mut cursor, 200, 50, 2);
        }
        assert_eq!(expired, 20, "every idle pin, once, in 4 calls of 2 buckets");
        assert_eq!(cursor, 0, "wrapped around");
        assert!((0..40).all(|i| get(&shared, layout, &format!("s{i}")).is_some() == (i % 2 == 1)));
    }
}
