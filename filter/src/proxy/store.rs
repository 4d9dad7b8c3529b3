//! Pins in Envoy shared data (`proxy_get_shared_data` / `proxy_set_shared_data`).
//!
//! Shared data is keyed per vm_id and shared by every worker thread's VM; a write carries
//! the CAS number read before it, so a concurrent writer wins cleanly instead of being
//! overwritten (proxy-wasm ABI v0.2.1; Envoy `source/extensions/common/wasm/context.cc`).
//! There is no delete: a forgotten pin becomes an empty value (tombstone).

use std::cell::RefCell;
use std::rc::Rc;

use hashbrown::HashSet;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::pin::{self, DecodeError, Pin};

/// Keys this VM wrote, so its root context's tick can sweep them. Shared data cannot be
/// enumerated (ABI v0.2.1 has no such call); every VM sweeps what it wrote or refreshed.
pub type SweepIndex = Rc<RefCell<HashSet<String>>>;

/// A pin read from shared data together with its CAS number.
pub struct Stored {
    pub pin: Pin,
    pub cas: Option<u32>,
}

/// Reads the pin of `session_id`. Tombstones, undecodable values and missing keys are
/// all `None`.
pub fn get(session_id: &str) -> Option<Stored> {
    read(&pin::key(session_id))
}

fn read(key: &str) -> Option<Stored> {
    let (value, cas) = hostcalls::get_shared_data(key).ok()?;
    match Pin::decode(value.as_deref()?) {
        Ok(pin) => Some(Stored { pin, cas }),
        Err(DecodeError::Tombstone) => None,
        Err(DecodeError::Invalid) => {
            log::warn!("mcp-affinity: ignoring undecodable shared data under {key}");
            None
        }
    }
}

/// Writes `pin` for `session_id`. `cas`: the number read before (None = unconditional).
/// Returns false when another writer got there first (CAS_MISMATCH).
pub fn put(index: &SweepIndex, session_id: &str, pin: &Pin, cas: Option<u32>) -> bool {
    let key = pin::key(session_id);
    let ok = match hostcalls::set_shared_data(&key, Some(&pin.encode()), cas) {
        Ok(()) => true,
        Err(Status::CasMismatch) => false,
        Err(status) => {
            log::warn!("mcp-affinity: set_shared_data({key}) failed: {status:?}");
            false
        }
    };
    if ok {
        index.borrow_mut().insert(key);
    }
    ok
}

/// Marks the pin of `session_id` as past `notifications/initialized` (read-modify-write
/// with CAS, retried once if another worker wrote in between).
pub fn mark_recorded(index: &SweepIndex, session_id: &str) {
    for _ in 0..2 {
        let Some(mut stored) = get(session_id) else { return };
        if stored.pin.recorded {
            return;
        }
        stored.pin.recorded = true;
        if put(index, session_id, &stored.pin, stored.cas) {
            return;
        }
    }
}

/// Tombstones the pin of `session_id` (unconditionally).
pub fn forget(index: &SweepIndex, session_id: &str) {
    let key = pin::key(session_id);
    let _ = hostcalls::set_shared_data(&key, Some(&[]), None);
    index.borrow_mut().remove(&key);
}

/// Tombstones every indexed pin idle for `ttl_secs` or more; returns how many expired.
/// A pin refreshed by another VM since it was indexed is kept (its timestamp is newer).
/// The CAS guard keeps a concurrent refresh from being wiped.
pub fn sweep(index: &SweepIndex, now: u64, ttl_secs: u64) -> u64 {
    let mut expired = 0;
    index.borrow_mut().retain(|key| match read(key) {
        None => false,
        Some(stored) if stored.pin.is_expired(now, ttl_secs) => {
            if hostcalls::set_shared_data(key, Some(&[]), stored.cas).is_ok() {
                expired += 1;
                false
            } else {
                true // refreshed concurrently: look again next tick
            }
        }
        Some(_) => true,
    });
    expired
}
