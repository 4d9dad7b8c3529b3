//! Per-session async mutexes: the in-process half of recovery single flight (the lease
//! in the store is the cross-instance half). Entries exist only while someone holds or
//! waits for the lock of a session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A map of async mutexes keyed by session id.
#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one key; dropping it unlocks and removes the entry when nobody else
/// holds or awaits it.
pub struct KeyedGuard {
    locks: Arc<KeyedLocks>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits for the lock of `key`.
    pub async fn lock(self: &Arc<Self>, key: &str) -> KeyedGuard {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        // Build the guard before awaiting so that a cancelled wait still cleans up.
        let mut guard = KeyedGuard { locks: self.clone(), key: key.to_string(), guard: None };
        guard.guard = Some(mutex.lock_owned().await);
        guard
    }

    /// Number of keys with a holder or a waiter (tests).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `true` when no key is locked (tests).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map still references the mutex: nobody holds or awaits it.
        if map.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn serializes_one_key_and_cleans_up() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("a").await;
        let other = locks.lock("b").await; // other keys are independent
        drop(other);
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock("a").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        let g2 = waiter.await.unwrap();
        assert_eq!(locks.len(), 1);
        drop(g2);
        assert!(locks.is_empty());
        // A cancelled wait leaves nothing behind.
        let g = locks.lock("c").await;
        let l3 = locks.clone();
        let w = tokio::spawn(async move { l3.lock("c").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        w.abort();
        let _ = w.await;
        drop(g);
        assert!(locks.is_empty());
    }
}
