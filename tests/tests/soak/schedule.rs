//! The seeded chaos schedule: the run's random stream ([`Rng`], whose seed `SOAK_SEED`
//! replays), the fault kinds, and the rounds of faults — each round a seeded permutation
//! of every kind, with seeded downtimes and gaps. What a fault does is `faults.rs`.

use std::time::Duration;

use crate::mesh::ENVOY_NAMES;

/// splitmix64: small, seedable, good enough for a schedule.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// An independent stream derived from this one.
    pub fn fork(&mut self, salt: u64) -> Rng {
        Rng(self.next() ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }
}

/// What a fault does (described in the test's docs, run by `faults.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    PodOutage,
    PodRestartInPlace,
    EnvoyRestart(usize),
    ControlRestart(usize),
    RedisRestart,
}

/// One scheduled fault: its kind, the pod it hits (pod faults), how long the process
/// stays down, and the pause before it.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub pod: usize,
    pub down: Duration,
    pub gap: Duration,
}

/// The seeded schedule: rounds, each a permutation of every fault kind (two pod outages
/// on different pods and one restart in place).
pub struct Schedule {
    pub rng: Rng,
    pub round: Vec<Fault>,
    pub rounds: u64,
}

impl Schedule {
    /// The schedule `rng` draws, before its first round.
    pub fn new(rng: Rng) -> Schedule {
        Schedule { rng, round: Vec::new(), rounds: 0 }
    }

    /// The next fault and the round it belongs to (from 1).
    pub fn next(&mut self) -> (u64, Fault) {
        if self.round.is_empty() {
            self.rounds += 1;
            let rng = &mut self.rng;
            let mut pods = [0, 1, 2];
            rng.shuffle(&mut pods);
            let mut kinds = vec![
                (FaultKind::PodOutage, pods[0]),
                (FaultKind::PodOutage, pods[1]),
                (FaultKind::PodRestartInPlace, pods[2]),
                (FaultKind::EnvoyRestart(0), 0),
                (FaultKind::EnvoyRestart(1), 0),
                (FaultKind::ControlRestart(0), 0),
                (FaultKind::ControlRestart(1), 0),
                (FaultKind::RedisRestart, 0),
            ];
            rng.shuffle(&mut kinds);
            self.round = kinds
                .into_iter()
                .rev()
                .map(|(kind, pod)| {
                    let down = match kind {
                        FaultKind::PodOutage => rng.millis(1000, 3500),
                        FaultKind::PodRestartInPlace => Duration::ZERO,
                        FaultKind::EnvoyRestart(_) => rng.millis(300, 2000),
                        FaultKind::ControlRestart(_) | FaultKind::RedisRestart => rng.millis(200, 1500),
                    };
                    Fault { kind, pod, down, gap: rng.millis(500, 2000) }
                })
                .collect();
        }
        (self.rounds, self.round.pop().expect("a round has faults"))
    }
}

/// How the timeline and the summary name a fault kind.
pub fn fault_label(k: FaultKind) -> String {
    match k {
        FaultKind::PodOutage => "pod outage (kill, down, restart in place)".into(),
        FaultKind::PodRestartInPlace => "pod restart in place (immediate)".into(),
        FaultKind::EnvoyRestart(i) => format!("Envoy {} restart", ENVOY_NAMES[i]),
        FaultKind::ControlRestart(i) => format!("control {} restart", i + 1),
        FaultKind::RedisRestart => "Redis restart (AOF kept)".into(),
    }
}
