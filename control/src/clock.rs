//! Time sources: wall-clock Unix milliseconds for record timestamps and a monotonic
//! instant for idle expiry. Injectable so the memory store's expiry and eviction can be
//! tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time, for expiry deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time in Unix milliseconds, for `created_at_ms` / `last_seen_ms`.
    fn unix_ms(&self) -> u64;
}

/// The real clocks of the process.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn unix_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when [`ManualClock::advance`] is called (tests).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    base_unix_ms: u64,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock starting now, at Unix time `unix_ms`.
    pub fn new(unix_ms: u64) -> Self {
        ManualClock { base: Instant::now(), base_unix_ms: unix_ms, offset: Mutex::new(Duration::ZERO) }
    }

    /// Moves both clocks forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }

    fn offset(&self) -> Duration {
        *self.offset.lock().unwrap()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + self.offset()
    }
    fn unix_ms(&self) -> u64 {
        self.base_unix_ms + self.offset().as_millis() as u64
    }
}
