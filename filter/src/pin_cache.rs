//! A VM's own copy of the pins it used recently, so that a pinned request reads no shared
//! data. Every value a host call returns is copied into the VM through a call back into it
//! (`proxy_on_memory_allocate`; proxy-wasm-cpp-host `WasmBase::copyToPointerSize`), and on
//! Envoy 1.40 with V8 that costs a pinned request as much as the rest of the filter's work
//! (measured with callgrind, bench/README.md).
//!
//! Shared data stays the truth that every worker VM sees. A cached pin is used only while
//! no pin has *changed* since it was cached, anywhere in the process: re-pinned by a
//! recovery or a drain move, or forgotten after `DELETE`. Changes are counted in an Envoy
//! counter (`pins_changed`), which every VM reads per request with a host call that returns
//! a number, not bytes (`proxy_get_metric`), and bumps right after its shared-data write.
//! A change anywhere makes every VM's cached pins stale at once; each is read again from
//! shared data on its next use. New pins (`initialize`, or a lookup in control) are no
//! change: no VM can hold a copy of a pin that did not exist.
//!
//! Bounded: at most `capacity` entries; a full cache is emptied (the next requests read
//! shared data again). Entries carry the pin's `last_seen`, so an idle pin expires here as
//! it does in shared data.

use hashbrown::HashMap;

use crate::pin::Pin;

/// See the module docs.
#[derive(Debug, Default)]
pub struct PinCache {
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    pin: Pin,
    /// `pins_changed` when the pin was read from shared data (or written by this VM).
    changes: u64,
}

impl PinCache {
    /// The cached pin of `session_id`, if it was cached when the process-wide change count
    /// was `changes` (the count now) and is not idle for `ttl_secs` at `now`.
    pub fn get(&self, session_id: &str, changes: u64, now: u64, ttl_secs: u64) -> Option<&Pin> {
        let e = self.entries.get(session_id)?;
        (e.changes == changes && !e.pin.is_expired(now, ttl_secs)).then_some(&e.pin)
    }

    /// Caches `pin` as read or written when the change count was `changes`; empties a full
    /// cache first. `capacity` 0 caches nothing.
    pub fn put(&mut self, session_id: &str, pin: &Pin, changes: u64, capacity: usize) {
        if capacity == 0 {
            return;
        }
        match self.entries.get_mut(session_id) {
            Some(e) => {
                e.pin.clone_from(pin);
                e.changes = changes;
            }
            None => {
                if self.entries.len() >= capacity {
                    self.entries.clear();
                }
                self.entries.insert(session_id.to_string(), Entry { pin: pin.clone(), changes });
            }
        }
    }

    /// Applies `f` to the cached pin of `session_id`, if any (this VM's own updates that
    /// are no change for other VMs: last seen, recorded).
    pub fn update(&mut self, session_id: &str, f: impl FnOnce(&mut Pin)) {
        if let Some(e) = self.entries.get_mut(session_id) {
            f(&mut e.pin);
        }
    }

    /// Drops the cached pin of `session_id`.
    pub fn remove(&mut self, session_id: &str) {
        self.entries.remove(session_id);
    }

    /// Number of cached pins.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No pin is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(upstream: &str, last_seen: u64) -> Pin {
        Pin { upstream: upstream.into(), generation: 1, last_seen, backend_session_id: "s".into(), recorded: true }
    }

    #[test]
    fn a_pin_is_used_while_no_pin_changed() {
        let mut c = PinCache::default();
        c.put("s", &pin("a:1", 100), 7, 10);
        assert_eq!(c.get("s", 7, 100, 60).map(|p| p.upstream.as_str()), Some("a:1"));
        assert!(c.get("s", 8, 100, 60).is_none(), "a change anywhere makes it stale");
        assert!(c.get("other", 7, 100, 60).is_none());
        c.put("s", &pin("b:2", 100), 8, 10);
        assert_eq!(c.get("s", 8, 100, 60).map(|p| p.upstream.as_str()), Some("b:2"));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn idle_pins_expire_and_updates_apply() {
        let mut c = PinCache::default();
        c.put("s", &pin("a:1", 100), 0, 10);
        assert!(c.get("s", 0, 160, 60).is_none(), "idle for the TTL");
        c.update("s", |p| p.last_seen = 150);
        assert!(c.get("s", 0, 160, 60).is_some());
        c.remove("s");
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_and_off_at_zero() {
        let mut c = PinCache::default();
        for i in 0..25 {
            c.put(&format!("s{i}"), &pin("a:1", 100), 0, 10);
            assert!(c.len() <= 10);
        }
        assert!(c.get("s24", 0, 100, 60).is_some(), "the newest pin is kept");
        let mut off = PinCache::default();
        off.put("s", &pin("a:1", 100), 0, 0);
        assert!(off.is_empty());
    }
}
