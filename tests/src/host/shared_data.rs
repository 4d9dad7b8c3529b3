//! Envoy shared data: a process-wide key/value map per vm_id with compare-and-swap.
//!
//! Semantics follow proxy-wasm-cpp-host `src/shared_data.cc` (`SharedData::get`/`set`):
//! - keyed by (vm_id, key), shared by every VM (worker thread) with that vm_id;
//! - CAS numbers come from one process-wide counter (`nextCas()`: starts at 1, skips 0),
//!   so every set gives the key a new, larger number;
//! - `set` with cas 0 is unconditional; with a cas that is not the key's current one it
//!   fails with CAS_MISMATCH; a key that does not exist yet is created whatever the cas;
//! - there is no TTL and no delete (an empty value is a value);
//! - it lives as long as the process: an Envoy restart loses it (the dev proxy's too).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Handle to the process's shared data; clones share the same map.
#[derive(Clone, Default)]
pub struct SharedData {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    data: HashMap<(String, String), (Vec<u8>, u32)>,
    /// The last CAS number handed out.
    cas: u32,
}

impl Inner {
    fn next_cas(&mut self) -> u32 {
        self.cas = self.cas.wrapping_add(1).max(1);
        self.cas
    }
}

/// Outcome of [`SharedData::set`].
#[derive(Debug, PartialEq, Eq)]
pub enum SetResult {
    /// Stored.
    Ok,
    /// The caller's CAS number is stale.
    CasMismatch,
}

impl SharedData {
    /// Value and CAS of `key` in `vm_id`'s namespace.
    pub fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.lock().unwrap().data.get(&(vm_id.to_string(), key.to_string())).cloned()
    }

    /// Stores `value` under `key` if `cas` is 0 or equals the current CAS number.
    pub fn set(&self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> SetResult {
        let mut inner = self.inner.lock().unwrap();
        let key = (vm_id.to_string(), key.to_string());
        if let Some((_, current)) = inner.data.get(&key)
            && cas != 0
            && cas != *current
        {
            return SetResult::CasMismatch;
        }
        let next = inner.next_cas();
        inner.data.insert(key, (value.to_vec(), next));
        SetResult::Ok
    }

    /// Number of keys (tombstones included) in `vm_id`'s namespace.
    pub fn len(&self, vm_id: &str) -> usize {
        self.inner.lock().unwrap().data.keys().filter(|(v, _)| v == vm_id).count()
    }

    /// True when `vm_id` has no keys.
    pub fn is_empty(&self, vm_id: &str) -> bool {
        self.len(vm_id) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics() {
        let d = SharedData::default();
        assert_eq!(d.set("vm", "k", b"a", 5), SetResult::Ok, "a missing key is created whatever the cas");
        assert_eq!(d.get("vm", "k"), Some((b"a".to_vec(), 1)));
        assert_eq!(d.set("vm", "other", b"x", 0), SetResult::Ok);
        assert_eq!(d.get("vm", "other"), Some((b"x".to_vec(), 2)), "one counter for all keys");
        assert_eq!(d.set("vm", "k", b"b", 1), SetResult::Ok);
        assert_eq!(d.set("vm", "k", b"c", 1), SetResult::CasMismatch, "stale cas");
        assert_eq!(d.get("vm", "k"), Some((b"b".to_vec(), 3)));
        assert_eq!(d.get("other", "k"), None, "namespaced by vm_id");
    }
}
