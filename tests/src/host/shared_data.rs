//! Envoy shared data: a process-wide key/value map per vm_id with compare-and-swap.
//!
//! Semantics follow proxy-wasm-cpp-host `src/shared_data.cc` (`SharedData::get`/`set`):
//! - keyed by (vm_id, key), shared by every VM (worker thread) with that vm_id;
//! - each key's CAS number starts at 1 on first set and grows by one on every set;
//! - `set` with cas 0 is unconditional; with a cas that is not the current one it fails
//!   with CAS_MISMATCH (also when the key does not exist yet);
//! - there is no TTL and no delete (an empty value is a value);
//! - it lives as long as the process: an Envoy restart loses it (the dev proxy's too).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Handle to the process's shared data; clones share the same map.
#[derive(Clone, Default)]
pub struct SharedData {
    inner: Arc<Mutex<HashMap<(String, String), (Vec<u8>, u32)>>>,
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
        self.inner.lock().unwrap().get(&(vm_id.to_string(), key.to_string())).cloned()
    }

    /// Stores `value` under `key` if `cas` is 0 or equals the current CAS number.
    pub fn set(&self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> SetResult {
        let mut map = self.inner.lock().unwrap();
        let slot = map.entry((vm_id.to_string(), key.to_string()));
        match slot {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let current = e.get().1;
                if cas != 0 && cas != current {
                    return SetResult::CasMismatch;
                }
                *e.get_mut() = (value.to_vec(), current.wrapping_add(1).max(1));
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                if cas != 0 {
                    return SetResult::CasMismatch;
                }
                e.insert((value.to_vec(), 1));
            }
        }
        SetResult::Ok
    }

    /// Number of keys (tombstones included) in `vm_id`'s namespace.
    pub fn len(&self, vm_id: &str) -> usize {
        self.inner.lock().unwrap().keys().filter(|(v, _)| v == vm_id).count()
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
        assert_eq!(d.set("vm", "k", b"a", 5), SetResult::CasMismatch, "cas on a missing key");
        assert_eq!(d.set("vm", "k", b"a", 0), SetResult::Ok);
        assert_eq!(d.get("vm", "k"), Some((b"a".to_vec(), 1)));
        assert_eq!(d.set("vm", "k", b"b", 1), SetResult::Ok);
        assert_eq!(d.set("vm", "k", b"c", 1), SetResult::CasMismatch, "stale cas");
        assert_eq!(d.get("vm", "k"), Some((b"b".to_vec(), 2)));
        assert_eq!(d.get("other", "k"), None, "namespaced by vm_id");
    }
}
