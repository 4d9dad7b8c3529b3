//! The JSON result, `bench/results/envoy-<UTC stamp>.json`: serde structs ([`Json`]) built
//! from an [`Outcome`].

use std::collections::BTreeMap;

use serde::Serialize;

use super::configs::{Config, INITIALIZE, INSTR, INSTR_INIT, INSTR_SS, SCALED, STEADY};
use super::instructions::Count;
use super::report::{ConfigResult, Machine, Ordered, Outcome, Versions, added_in, per_session};
use super::run::Memory;
use super::settings::{BASE_SESSIONS, INSTR_IDLE_SECS, INSTR_INIT_SETTLE, INSTR_INIT_WARMUP, INSTR_WARMUP, Settings, Store};
use super::stats::{self, Change};

/// The JSON result document (`bench/results/envoy-<stamp>.json`). Units are in the field
/// names (`_us`: µs, `_kb`: kB, `req_s`: requests per second); `null` where a value could
/// not be computed (e.g. a ratio whose unit was not positive). Objects keyed by config
/// label keep table order.
#[derive(Serialize)]
pub struct Json<'a> {
    /// UTC start of the run, `YYYYMMDDTHHMMSSZ`.
    pub timestamp: &'a str,
    /// The machine.
    pub machine: &'a Machine,
    /// Tool versions.
    pub versions: &'a Versions,
    /// The settings of the run.
    pub settings: SettingsJson<'a>,
    /// The steady phase, by config; added costs over plain.
    pub steady: Ordered<ConfigResult>,
    /// (X − plain) / (empty − plain) on µs/req, paired per round.
    pub overhead_ratio: Pair,
    /// The same on proxy CPU µs/req.
    pub overhead_ratio_proxy_cpu: Pair,
    /// (X − plain) / (empty+pin − plain) on µs/req.
    pub overhead_ratio_to_empty_pin: Pair,
    /// (X − plain) / (empty − plain) from the medians.
    pub overhead_ratio_of_medians: Pair,
    /// `null` with `BENCH_INSTRUCTIONS=0`.
    pub instructions: Option<Instructions>,
    /// With `BENCH_SCALE` only (so are the fields below).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaled: Option<Scaled>,
    /// The initialize phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initialize: Option<InitPhase>,
    /// Sessions created in each second instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions_created: Option<Ordered<u64>>,
    /// Memory per session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryJson>,
}

/// The settings, and two constants of the method.
#[derive(Serialize)]
pub struct SettingsJson<'a> {
    /// The settings of the run.
    #[serde(flatten)]
    pub settings: &'a Settings,
    /// Envoy's `--concurrency` (1).
    pub envoy_concurrency: u32,
    /// Sessions each proxy holds before the steady phase.
    pub base_sessions: u64,
}

/// A figure for affinity and for affinity+control.
#[derive(Serialize)]
pub struct Pair {
    /// affinity.
    pub affinity: Option<f64>,
    /// affinity+control.
    #[serde(rename = "affinity+control")]
    pub control: Option<f64>,
}

/// The instruction counts.
#[derive(Serialize)]
pub struct Instructions {
    /// `callgrind`.
    pub tool: &'static str,
    /// valgrind version.
    pub valgrind: String,
    /// Requests before the counted ones.
    pub warmup_requests: u64,
    /// Requests counted.
    pub requests: u64,
    /// Length of the idle window, s.
    pub idle_seconds: u64,
    /// By config label, in table order.
    pub configs: Ordered<InstrRow>,
    /// Per MCP 2026-07-28 request without session (`tools/list`), by config label, in
    /// table order: `ratio_to_empty` near 1 means it costs what the empty filter costs.
    pub stateless: Ordered<InstrRow>,
    /// Per `initialize`; `null` with `BENCH_INSTR_INIT=0`.
    pub initialize: Option<InstrInit>,
}

/// Instructions per steady request of one config; added and ratios against its bootstrap's
/// plain (and empty, empty+pin).
#[derive(Serialize)]
pub struct InstrRow {
    /// Instructions per request, idle subtracted.
    pub per_request: f64,
    /// Minus the same bootstrap's plain.
    pub added_per_request: Option<f64>,
    /// Added cost in units of empty's (`null` for the baseline itself).
    pub ratio_to_empty: Option<f64>,
    /// Added cost in units of empty+pin's (envoy.yaml only).
    pub ratio_to_empty_pin: Option<f64>,
    /// Envoy's idle instructions per second, subtracted.
    pub idle_per_second: f64,
    /// Seconds the counted requests took (with the settle time for initializes).
    pub load_seconds: f64,
}

/// Instructions per `initialize`.
#[derive(Serialize)]
pub struct InstrInit {
    /// Label of the baseline config.
    pub baseline: &'static str,
    /// Requests before the counted ones.
    pub warmup_requests: u64,
    /// Requests counted.
    pub requests: u64,
    /// Seconds after the counted initializes, inside the window.
    pub settle_seconds: u64,
    /// By config label, in table order.
    pub configs: Ordered<InitRow>,
}

/// One config's instructions per `initialize`, added over plain (2 pods).
#[derive(Serialize)]
pub struct InitRow {
    /// Instructions per initialize, idle subtracted.
    pub per_initialize: f64,
    /// Minus plain (2 pods).
    pub added_per_initialize: Option<f64>,
    /// Envoy's idle instructions per second, subtracted.
    pub idle_per_second: f64,
    /// Seconds the counted requests took (with the settle time for initializes).
    pub load_seconds: f64,
}

/// The same-time A/B of 10 vs 10 + N sessions.
#[derive(Serialize)]
pub struct Scaled {
    /// How the change is computed.
    pub method: &'static str,
    /// By config label, in table order.
    pub configs: Ordered<ScaledRow>,
}

/// One config's two instances and the change from the first to the second.
#[derive(Serialize)]
pub struct ScaledRow {
    /// Sessions of the 1st instance.
    pub sessions: u64,
    /// Sessions of the 2nd instance.
    pub sessions_2nd: u64,
    /// 2nd / 1st, medians over rounds of same-round ratios (flattened).
    #[serde(flatten)]
    pub change: Change,
    /// The 1st instance.
    #[serde(rename = "1st")]
    pub first: ConfigResult,
    /// The 2nd instance, populated.
    #[serde(rename = "2nd")]
    pub second: ConfigResult,
}

/// The initialize phase; added costs over plain (2 pods).
#[derive(Serialize)]
pub struct InitPhase {
    /// Label of the baseline config.
    pub baseline: &'static str,
    /// wrk connections.
    pub connections: u32,
    /// Every round of the config.
    pub rounds: u32,
    /// Seconds per config per round.
    pub seconds: u64,
    /// How added costs are computed.
    pub added: &'static str,
    /// By config label, in table order.
    pub configs: Ordered<ConfigResult>,
}

/// Memory per session: control's (and Redis'), and each populated instance's by label.
#[derive(Serialize)]
pub struct MemoryJson {
    /// Control's store.
    pub control_store: Store,
    /// Memory per session.
    #[serde(flatten)]
    pub memory: Memory,
    /// Growth of control's RSS per session created, bytes.
    pub control_bytes_per_session: Option<f64>,
    /// Each populated instance by label (flattened).
    #[serde(flatten)]
    pub instances: Ordered<Rss>,
}

/// VmRSS of an instance before and after populating it.
#[derive(Serialize)]
pub struct Rss {
    /// VmRSS before populating, kB.
    pub rss_kb_before: u64,
    /// VmRSS after populating, kB.
    pub rss_kb_after: u64,
    /// (after − before) × 1024 / sessions created.
    pub bytes_per_session: Option<f64>,
}

impl Outcome {
    /// The JSON document.
    pub fn json(&self) -> Json<'_> {
        let s = &self.settings;
        let pair = |f: &dyn Fn(Config) -> Option<f64>| Pair { affinity: f(Config::Affinity), control: f(Config::Control) };
        let steady_added = |c, base| self.added("steady", c, base);
        let instructions = self.counts.as_ref().map(|counts| {
            let ss: &[Config] = if s.instr_ss { &INSTR_SS } else { &[] };
            let configs = instr_rows(&counts.steady, INSTR.iter().chain(ss));
            let stateless = instr_rows(&counts.stateless, INSTR.iter().chain(ss));
            let base = counts.initialize.get(&Config::Plain2).map(|c| c.per_request.round());
            let initialize = (s.instr_init > 0).then(|| InstrInit {
                baseline: Config::Plain2.label(),
                warmup_requests: INSTR_INIT_WARMUP,
                requests: s.instr_init,
                settle_seconds: INSTR_INIT_SETTLE,
                configs: Ordered(
                    INSTR_INIT
                        .iter()
                        .filter_map(|&c| {
                            let count = counts.initialize.get(&c)?;
                            let row = InitRow {
                                per_initialize: count.per_request.round(),
                                added_per_initialize: (c != Config::Plain2).then(|| base.map(|b| count.per_request.round() - b)).flatten(),
                                idle_per_second: count.idle_per_second.round(),
                                load_seconds: count.load_seconds,
                            };
                            Some((c.label().to_string(), row))
                        })
                        .collect(),
                ),
            });
            Instructions {
                tool: "callgrind",
                valgrind: self.versions.valgrind.clone(),
                warmup_requests: INSTR_WARMUP,
                requests: s.instr_requests,
                idle_seconds: INSTR_IDLE_SECS,
                configs: Ordered(configs),
                stateless: Ordered(stateless),
                initialize,
            }
        });
        let created = |c: Config| self.created.get(&c.second()).copied().unwrap_or(0);
        let scaled = (s.scale > 0).then(|| Scaled {
            method: "two instances of each config, the 2nd populated; both measured in every round; *_ratio = median over rounds of 2nd / 1st in the same round",
            configs: Ordered(
                SCALED
                    .iter()
                    .map(|&c| {
                        let row = ScaledRow {
                            sessions: BASE_SESSIONS,
                            sessions_2nd: BASE_SESSIONS + created(c),
                            change: stats::change(self.phase("scaled", c), self.phase("scaled", c.second())),
                            first: self.result("scaled", c, None),
                            second: self.result("scaled", c.second(), None),
                        };
                        (c.label().to_string(), row)
                    })
                    .collect(),
            ),
        });
        let initialize = (s.scale > 0).then(|| InitPhase {
            baseline: Config::Plain2.label(),
            connections: s.init_connections,
            rounds: s.init_rounds,
            seconds: s.init_seconds,
            added: "median over rounds of X − baseline in the same round",
            configs: Ordered(INITIALIZE.iter().map(|&c| (c.label().to_string(), self.result("initialize", c, Some(Config::Plain2)))).collect()),
        });
        let memory = self.memory.as_ref().map(|m| MemoryJson {
            control_store: s.control_store,
            memory: m.clone(),
            control_bytes_per_session: per_session(m.control_rss_kb_before, m.control_rss_kb_after, created(Config::Control)),
            instances: Ordered(
                SCALED
                    .iter()
                    .filter_map(|&c| {
                        let &(before, after) = self.rss.get(&c.second())?;
                        Some((c.label().to_string(), Rss { rss_kb_before: before, rss_kb_after: after, bytes_per_session: per_session(before, after, created(c)) }))
                    })
                    .collect(),
            ),
        });
        Json {
            timestamp: &self.stamp,
            machine: &self.machine,
            versions: &self.versions,
            settings: SettingsJson { settings: s, envoy_concurrency: 1, base_sessions: BASE_SESSIONS },
            steady: Ordered(STEADY.iter().map(|&c| (c.label().to_string(), self.result("steady", c, Some(Config::Plain)))).collect()),
            overhead_ratio: pair(&|c| stats::ratio(steady_added(c, Config::Plain).us_per_req, steady_added(Config::Empty, Config::Plain).us_per_req)),
            overhead_ratio_proxy_cpu: pair(&|c| {
                stats::ratio(steady_added(c, Config::Plain).proxy_cpu_us_per_req, steady_added(Config::Empty, Config::Plain).proxy_cpu_us_per_req)
            }),
            overhead_ratio_to_empty_pin: pair(&|c| stats::ratio(steady_added(c, Config::Plain).us_per_req, steady_added(Config::Pin, Config::Plain).us_per_req)),
            overhead_ratio_of_medians: pair(&|c| self.ratio_of_medians(c)),
            instructions,
            scaled,
            initialize,
            sessions_created: (s.scale > 0).then(|| Ordered(SCALED.iter().map(|&c| (c.label().to_string(), created(c))).collect())),
            memory,
        }
    }
}

/// One [`InstrRow`] per config of `configs` counted in `counts`, against its bootstrap's
/// plain and empty (and empty+pin on `envoy/envoy.yaml`).
fn instr_rows<'a>(counts: &BTreeMap<Config, Count>, configs: impl Iterator<Item = &'a Config>) -> Vec<(String, InstrRow)> {
    configs
        .filter_map(|&c| {
            let count = counts.get(&c)?;
            let (plain, empty, pin) = if INSTR_SS.contains(&c) { (Config::PlainSs, Config::EmptySs, None) } else { (Config::Plain, Config::Empty, Some(Config::Pin)) };
            let added = added_in(counts, c, plain);
            let row = InstrRow {
                per_request: count.per_request.round(),
                added_per_request: added,
                ratio_to_empty: (c != plain).then(|| stats::ratio(added, added_in(counts, empty, plain))).flatten(),
                ratio_to_empty_pin: pin.filter(|_| c != plain).and_then(|p| stats::ratio(added, added_in(counts, p, plain))),
                idle_per_second: count.idle_per_second.round(),
                load_seconds: count.load_seconds,
            };
            Some((c.label().to_string(), row))
        })
        .collect()
}
