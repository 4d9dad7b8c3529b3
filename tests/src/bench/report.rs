//! The results of a run: the JSON written to `bench/results/envoy-<UTC stamp>.json`
//! (serde) and the tables printed on stdout (Markdown).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use serde::{Serialize, Serializer};

use super::configs::{Config, INITIALIZE, INSTR, INSTR_INIT, INSTR_SS, SCALED, STEADY};
use super::instructions::Counts;
use super::run::{Memory, Samples};
use super::settings::{BASE_SESSIONS, INSTR_IDLE_SECS, INSTR_INIT_SETTLE, INSTR_INIT_WARMUP, INSTR_WARMUP, Settings, Store};
use super::stats::{self, Added, Change, Sample, Summary};

/// A JSON object whose keys keep the order given (config order, as in the tables).
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// The machine and what ran on it.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs available.
    pub nproc: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// /proc/loadavg (1, 5, 15 min) at the start.
    pub load_average_start: String,
    /// /proc/loadavg at the end.
    pub load_average_end: String,
    /// `rustc` processes running at the start (other builds).
    pub rustc_processes_start: usize,
    /// `rustc` processes running at the end.
    pub rustc_processes_end: usize,
}

/// First line of `cmd args` (stdout, else stderr), its `word`-th whitespace-separated word.
fn version_word(cmd: &str, args: &[&str], word: usize) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next()?.split_whitespace().nth(word).map(str::to_string)
        })
        .unwrap_or_default()
}

/// `/proc/loadavg`'s first three fields.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Processes named `rustc` running now (other builds on a shared machine).
pub fn rustc_processes() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "rustc")).count())
        .unwrap_or(0)
}

impl Machine {
    /// The machine now (end values filled in by [`Machine::end`]).
    pub fn start() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find_map(|l| Some(l.strip_prefix("model name")?.split_once(':')?.1.trim().to_string())))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            load_average_start: load_average(),
            load_average_end: String::new(),
            rustc_processes_start: rustc_processes(),
            rustc_processes_end: 0,
        }
    }

    /// Records the end of the run.
    pub fn end(&mut self) {
        self.load_average_end = load_average();
        self.rustc_processes_end = rustc_processes();
    }
}

/// Versions of the tools.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Versions {
    /// Envoy release, e.g. `1.40.0`.
    pub envoy: String,
    /// `haproxy -v` version.
    pub haproxy: String,
    /// `wrk -v` version.
    pub wrk: String,
    /// Empty without the instruction phase.
    pub valgrind: String,
}

impl Versions {
    /// Asks each tool (`envoy --version`: `…version: <hash>/1.40.0/…`).
    pub fn of(envoy: &std::path::Path) -> Versions {
        let line = Command::new(envoy).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let envoy = line.split("version: ").nth(1).and_then(|v| v.split('/').nth(1)).unwrap_or_default().to_string();
        Versions { envoy, haproxy: version_word("haproxy", &["-v"], 2), wrk: version_word("wrk", &["-v"], 1), valgrind: String::new() }
    }
}

/// One config's results in a phase.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigResult {
    /// Medians over rounds (flattened into this object).
    #[serde(flatten)]
    pub summary: Summary,
    /// 1e6 / median req/s, µs.
    pub us_per_req: Option<f64>,
    /// Medians over rounds of X − the phase's baseline in the same round.
    pub added_us_per_req: Option<f64>,
    /// The same on proxy CPU µs/req.
    pub added_proxy_cpu_us_per_req: Option<f64>,
    /// The same on p50, µs.
    pub added_p50_us: Option<f64>,
    /// Added cost in units of empty's (steady phase).
    pub ratio_to_empty: Option<f64>,
    /// The same on proxy CPU.
    pub ratio_to_empty_proxy_cpu: Option<f64>,
    /// Pods behind the config.
    pub pods: usize,
    /// Every round of the config.
    pub rounds: Vec<Sample>,
}

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

/// Everything a run produced.
pub struct Outcome {
    /// UTC start of the run, `YYYYMMDDTHHMMSSZ`.
    pub stamp: String,
    /// The settings of the run.
    pub settings: Settings,
    /// The machine.
    pub machine: Machine,
    /// Tool versions.
    pub versions: Versions,
    /// Every sample, by phase and config.
    pub samples: Samples,
    /// Instruction counts (`None` with `BENCH_INSTRUCTIONS=0`).
    pub counts: Option<Counts>,
    /// Sessions created in each second instance.
    pub created: BTreeMap<Config, u64>,
    /// VmRSS (kB) of each second instance before and after populating.
    pub rss: BTreeMap<Config, (u64, u64)>,
    /// Memory per session.
    pub memory: Option<Memory>,
}

fn f(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn signed(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:+.decimals$}"))
}

fn ratio_text(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |r| format!("{:+.1} %", (r - 1.0) * 100.0))
}

/// Bytes per session from RSS kB before/after and the sessions created.
fn per_session(before: u64, after: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| (after as f64 - before as f64) * 1024.0 / n as f64)
}

impl Outcome {
    fn phase(&self, phase: &str, cfg: Config) -> &[Sample] {
        self.samples.get(phase).and_then(|p| p.get(&cfg)).map_or(&[], Vec::as_slice)
    }

    /// The results of `cfg` in `phase`, added costs over `base`.
    pub fn result(&self, phase: &str, cfg: Config, base: Option<Config>) -> ConfigResult {
        let x = self.phase(phase, cfg);
        let summary = Summary::of(x);
        let added = base.map(|b| stats::added(x, self.phase(phase, b))).unwrap_or_default();
        let empty = base.map(|b| stats::added(self.phase(phase, Config::Empty), self.phase(phase, b))).unwrap_or_default();
        ConfigResult {
            us_per_req: summary.us_per_req(),
            summary,
            added_us_per_req: added.us_per_req,
            added_proxy_cpu_us_per_req: added.proxy_cpu_us_per_req,
            added_p50_us: added.p50_us,
            ratio_to_empty: stats::ratio(added.us_per_req, empty.us_per_req).filter(|_| base != Some(cfg)),
            ratio_to_empty_proxy_cpu: stats::ratio(added.proxy_cpu_us_per_req, empty.proxy_cpu_us_per_req).filter(|_| base != Some(cfg)),
            pods: cfg.pods(self.settings.baseline_pods),
            rounds: x.to_vec(),
        }
    }

    fn added(&self, phase: &str, cfg: Config, base: Config) -> Added {
        stats::added(self.phase(phase, cfg), self.phase(phase, base))
    }

    /// (X − plain) / (empty − plain) from the medians of the main table.
    fn ratio_of_medians(&self, cfg: Config) -> Option<f64> {
        let us = |c| Summary::of(self.phase("steady", c)).us_per_req();
        let plain = us(Config::Plain)?;
        stats::ratio(us(cfg).map(|x| x - plain), us(Config::Empty).map(|e| e - plain))
    }

    /// Whether any request of a measured phase failed.
    pub fn errors(&self) -> bool {
        self.samples.iter().filter(|(p, _)| !p.starts_with("warmup")).flat_map(|(_, c)| c.values().flatten()).any(|s| s.errors > 0)
    }

    fn instr_added(&self, cfg: Config, plain: Config) -> Option<f64> {
        let c = &self.counts.as_ref()?.steady;
        Some(c.get(&cfg)?.per_request.round() - c.get(&plain)?.per_request.round())
    }

    /// The JSON document.
    pub fn json(&self) -> Json<'_> {
        let s = &self.settings;
        let pair = |f: &dyn Fn(Config) -> Option<f64>| Pair { affinity: f(Config::Affinity), control: f(Config::Control) };
        let steady_added = |c, base| self.added("steady", c, base);
        let instructions = self.counts.as_ref().map(|counts| {
            let ss: &[Config] = if s.instr_ss { &INSTR_SS } else { &[] };
            let configs = INSTR
                .iter()
                .chain(ss)
                .filter_map(|&c| {
                    let count = counts.steady.get(&c)?;
                    let (plain, empty, pin) = if INSTR_SS.contains(&c) { (Config::PlainSs, Config::EmptySs, None) } else { (Config::Plain, Config::Empty, Some(Config::Pin)) };
                    let added = self.instr_added(c, plain);
                    let row = InstrRow {
                        per_request: count.per_request.round(),
                        added_per_request: added,
                        ratio_to_empty: (c != plain).then(|| stats::ratio(added, self.instr_added(empty, plain))).flatten(),
                        ratio_to_empty_pin: pin.filter(|_| c != plain).and_then(|p| stats::ratio(added, self.instr_added(p, plain))),
                        idle_per_second: count.idle_per_second.round(),
                        load_seconds: count.load_seconds,
                    };
                    Some((c.label().to_string(), row))
                })
                .collect();
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

    /// The tables, as printed at the end of a run.
    pub fn tables(&self) -> String {
        let s = &self.settings;
        let (m, v) = (&self.machine, &self.versions);
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "\nmcp-affinity on real Envoy — steady request of one pinned session (tools/call with Mcp-Session-Id)");
        let _ = writeln!(w, "machine: {} cores, {}; Envoy {} (--concurrency 1), HAProxy {} (nbthread 1), wrk {}", m.nproc, m.cpu, v.envoy, v.haproxy, v.wrk);
        let _ = writeln!(w, "load: {} connections, 1 wrk thread, {}s per config per round, {} interleaved rounds, medians over rounds; {BASE_SESSIONS} sessions per proxy", s.connections, s.seconds, s.rounds);
        let _ = writeln!(w, "pods: 2 behind empty+pin, affinity, affinity+control, haproxy; {} behind plain and empty; direct = pod 1", s.baseline_pods);
        let _ = writeln!(w, "load average: {} at start, {} at end; rustc processes running: {} at start, {} at end\n", m.load_average_start, m.load_average_end, m.rustc_processes_start, m.rustc_processes_end);
        let _ = writeln!(w, "| config | req/s | req/s range | p50 µs | p99 µs | µs/req | proxy CPU µs/req | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|");
        for c in STEADY {
            let r = Summary::of(self.phase("steady", c));
            let range = match (r.req_s_min, r.req_s_max) {
                (Some(lo), Some(hi)) => format!("{lo:.0}–{hi:.0}"),
                _ => "-".into(),
            };
            let _ = writeln!(w, "| {} | {} | {range} | {} | {} | {} | {} | {} |", c.label(), f(r.req_s, 0), f(r.p50_us, 0), f(r.p99_us, 0), f(r.us_per_req(), 2), f(r.proxy_cpu_us_per_req, 2), r.errors);
        }
        let _ = writeln!(w, "\noverhead over plain Envoy, and ratio (X − plain) / (empty − plain): X's added time per request in units of the empty filter's\n");
        let _ = writeln!(w, "| config | +µs/req vs plain | ratio to empty | +proxy CPU µs/req vs plain | ratio to empty |\n|---|---:|---:|---:|---:|");
        let empty = self.added("steady", Config::Empty, Config::Plain);
        for c in [Config::Empty, Config::Pin, Config::Affinity, Config::Control] {
            let a = self.added("steady", c, Config::Plain);
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                c.label(),
                signed(a.us_per_req, 2),
                ratio_text(stats::ratio(a.us_per_req, empty.us_per_req)),
                signed(a.proxy_cpu_us_per_req, 2),
                ratio_text(stats::ratio(a.proxy_cpu_us_per_req, empty.proxy_cpu_us_per_req))
            );
        }
        let pin = self.added("steady", Config::Pin, Config::Plain).us_per_req;
        let to_pin = |c| ratio_text(stats::ratio(self.added("steady", c, Config::Plain).us_per_req, pin));
        let _ = writeln!(w, "\n(+µs/req: median over rounds of X − plain in the same round, on 1e6 / req/s; ratio = X's added cost / empty's.");
        let _ = writeln!(w, " The same ratio from the medians of the main table: affinity {}, affinity+control {}.)", ratio_text(self.ratio_of_medians(Config::Affinity)), ratio_text(self.ratio_of_medians(Config::Control)));
        let _ = writeln!(w, "(added cost in units of empty+pin's — a filter doing only a pinned request's necessary work, routed the same way:");
        let _ = writeln!(w, " affinity {}, affinity+control {}.)", to_pin(Config::Affinity), to_pin(Config::Control));
        if let Some(counts) = &self.counts {
            self.instruction_tables(w, counts);
        }
        if s.scale > 0 {
            self.scale_tables(w);
        }
        o
    }

    fn instruction_rows(&self, w: &mut String, counts: &Counts, plain: Config, empty: Config, pin: Option<Config>, configs: &[Config]) {
        for &c in configs {
            let Some(count) = counts.steady.get(&c) else { continue };
            let added = self.instr_added(c, plain);
            let (add, r, rp) = if c == plain {
                ("".to_string(), "".to_string(), "".to_string())
            } else {
                (signed(added, 0), ratio_text(stats::ratio(added, self.instr_added(empty, plain))), pin.map_or("".into(), |p| ratio_text(stats::ratio(added, self.instr_added(p, plain)))))
            };
            let mut row = format!("| {} | {:.0} | {add} | {r} |", c.label(), count.per_request);
            if pin.is_some() {
                row.push_str(&format!(" {rp} |"));
            }
            let _ = writeln!(w, "{row}");
        }
    }

    fn instruction_tables(&self, w: &mut String, counts: &Counts) {
        let s = &self.settings;
        let _ = writeln!(w, "\ninstructions executed by Envoy per steady request (valgrind {} --tool=callgrind, every thread; {} requests", self.versions.valgrind, s.instr_requests);
        let _ = writeln!(w, "on one connection after {INSTR_WARMUP} warm-up; Envoy's idle instructions subtracted): independent of machine load\n");
        if s.instr_ss {
            let _ = writeln!(w, "the default, envoy/envoy-stateful-session.yaml (stateful-session pinning; the route of requests with a session id retries");
            let _ = writeln!(w, "once to control's replay listener), and the Istio shape on that bootstrap, against plain and empty Envoy on it\n");
            let _ = writeln!(w, "| config | instructions/req | + vs plain (stateful session) | (X − plain) / (empty − plain), stateful session |\n|---|---:|---:|---:|");
            self.instruction_rows(w, counts, Config::PlainSs, Config::EmptySs, None, &INSTR_SS);
            let _ = writeln!(w, "\nenvoy/envoy.yaml (ORIGINAL_DST pinning, the buffer filter ahead of the wasm filter, the filter replaying itself)\n");
        }
        let _ = writeln!(w, "| config | instructions/req | + vs plain | (X − plain) / (empty − plain) | (X − plain) / (empty+pin − plain) |\n|---|---:|---:|---:|---:|");
        self.instruction_rows(w, counts, Config::Plain, Config::Empty, Some(Config::Pin), &INSTR);
        if s.instr_init > 0 {
            let _ = writeln!(w, "\ninstructions executed by Envoy per initialize (a new session each; {} on one connection after {INSTR_INIT_WARMUP} warm-up,", s.instr_init);
            let _ = writeln!(w, "then {INSTR_INIT_SETTLE}s for records sent to control on the filter's timer; Envoy's idle instructions subtracted, that second included)\n");
            let _ = writeln!(w, "| config | instructions/initialize | + vs plain (2 pods) |\n|---|---:|---:|");
            let base = counts.initialize.get(&Config::Plain2).map(|c| c.per_request.round());
            for c in INSTR_INIT {
                let Some(count) = counts.initialize.get(&c) else { continue };
                let add = if c == Config::Plain2 { "-".into() } else { signed(base.map(|b| count.per_request.round() - b), 0) };
                let _ = writeln!(w, "| {} | {:.0} | {add} |", c.label(), count.per_request);
            }
        }
    }

    fn scale_tables(&self, w: &mut String) {
        let s = &self.settings;
        let _ = writeln!(w, "\nsteady request with {BASE_SESSIONS} vs {BASE_SESSIONS} + {} live sessions: two instances of each config, up side by side on the same pods,", s.scale);
        let _ = writeln!(w, "the second populated with {} sessions; every round measures both, back to back ({} rounds, {}s each, {} connections).", s.scale, s.rounds, s.seconds, s.connections);
        let _ = writeln!(w, "change = median over rounds of (2nd instance / 1st instance) measured in the same round; other columns: medians over rounds\n");
        let _ = writeln!(w, "| config | sessions | req/s | p50 µs | p99 µs | proxy CPU µs/req | errors | p50 change | p99 change | CPU change |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in SCALED {
            let (a, b) = (Summary::of(self.phase("scaled", c)), Summary::of(self.phase("scaled", c.second())));
            let ch: Change = stats::change(self.phase("scaled", c), self.phase("scaled", c.second()));
            let n2 = BASE_SESSIONS + self.created.get(&c.second()).copied().unwrap_or(0);
            let _ = writeln!(w, "| {} | {BASE_SESSIONS} | {} | {} | {} | {} | {} | | | |", c.label(), f(a.req_s, 0), f(a.p50_us, 0), f(a.p99_us, 0), f(a.proxy_cpu_us_per_req, 2), a.errors);
            let _ = writeln!(
                w,
                "| {} | {n2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label(),
                f(b.req_s, 0),
                f(b.p50_us, 0),
                f(b.p99_us, 0),
                f(b.proxy_cpu_us_per_req, 2),
                b.errors,
                pct(ch.p50_ratio),
                pct(ch.p99_ratio),
                pct(ch.proxy_cpu_ratio)
            );
        }
        let _ = writeln!(w, "\ninitialize (POST without session id; a new session each), {} connection(s), {}s x {} interleaved rounds, medians over rounds;", s.init_connections, s.init_seconds, s.init_rounds);
        let _ = writeln!(w, "baseline: plain Envoy with both pods (round robin: every initialize is a new session); +p50 and +CPU: median over rounds of X − baseline in the same round\n");
        let _ = writeln!(w, "| config | pods | req/s | p50 µs | p99 µs | +p50 µs vs plain (2 pods) | proxy CPU µs/req | +proxy CPU µs/req vs plain (2 pods) | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in INITIALIZE {
            let r = self.result("initialize", c, Some(Config::Plain2));
            let base = c == Config::Plain2;
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label(),
                r.pods,
                f(r.summary.req_s, 0),
                f(r.summary.p50_us, 0),
                f(r.summary.p99_us, 0),
                if base { "-".into() } else { signed(r.added_p50_us, 1) },
                f(r.summary.proxy_cpu_us_per_req, 2),
                if base { "-".into() } else { signed(r.added_proxy_cpu_us_per_req, 2) },
                r.summary.errors
            );
        }
        let _ = writeln!(w, "\nmemory per session (VmRSS of the populated 2nd instances and of control before/after creating the sessions; RSS includes allocator slack)");
        if let Some(m) = &self.memory {
            let n = self.created.get(&Config::ControlBig).copied().unwrap_or(0);
            let records = if s.control_store == Store::Redis { format!("{} in Redis", m.redis_keys.unwrap_or(0)) } else { m.control_records.to_string() };
            let _ = writeln!(w, "  control ({} store): {} kB → {} kB for {n} sessions (records: {records}): {} bytes/session", s.control_store, m.control_rss_kb_before, m.control_rss_kb_after, f(per_session(m.control_rss_kb_before, m.control_rss_kb_after, n), 0));
            for c in SCALED.map(Config::second) {
                if let Some(&(b, a)) = self.rss.get(&c) {
                    let n = self.created.get(&c).copied().unwrap_or(0);
                    let _ = writeln!(w, "  {:<23} {b} kB → {a} kB for {n} sessions: {} bytes/session", c.label(), f(per_session(b, a, n), 0));
                }
            }
            if let (Some(b), Some(a), Some(k)) = (m.redis_used_memory_before, m.redis_used_memory_after, m.redis_keys) {
                let _ = writeln!(w, "  redis: used_memory {b} → {a} bytes, {k} keys: {} bytes/session; MEMORY USAGE of one session key: {} bytes", f((n > 0).then(|| (a as f64 - b as f64) / n as f64), 0), m.redis_memory_usage_one_key.map_or("-".into(), |v| v.to_string()));
            }
            if m.control_records_lost {
                let _ = writeln!(w, "  warning: control holds {} records, fewer than the {n} sessions created through affinity+control (2nd): affinity+control's numbers are not valid", m.control_records);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::instructions::Count;

    fn outcome(scale: u64) -> Outcome {
        let settings = Settings { scale, ..Settings::from(&|_: &str| None).unwrap() };
        let sample = |round, us: f64, cpu: f64| Sample { round, req_s: 1e6 / us, p50_us: us * 16.0, p99_us: us * 40.0, proxy_cpu_us_per_req: Some(cpu), errors: 0 };
        let mut samples = Samples::new();
        // plain 60 µs/req, empty +10, affinity +12, control +15 (CPU likewise, minus 5).
        for (c, add) in [(Config::Plain, 0.0), (Config::Empty, 10.0), (Config::Pin, 14.0), (Config::Affinity, 12.0), (Config::Control, 15.0), (Config::Haproxy, -30.0), (Config::Direct, -40.0)] {
            let v = (1..=3).map(|r| sample(r, 60.0 + add + r as f64, 55.0 + add)).collect();
            samples.entry("steady").or_default().insert(c, v);
        }
        let count = |per_request| Count { per_request, idle_per_second: 1e6, load_seconds: 2.0 };
        let mut counts = Counts::default();
        for (c, n) in [(Config::Plain, 200_000.0), (Config::Empty, 235_000.0), (Config::Pin, 250_000.0), (Config::Affinity, 245_000.0), (Config::Control, 250_000.0)] {
            counts.steady.insert(c, count(n));
        }
        counts.initialize.insert(Config::Plain2, count(180_000.0));
        counts.initialize.insert(Config::Affinity, count(270_000.4));
        Outcome {
            stamp: "20261206T000000Z".into(),
            settings,
            machine: Machine::start(),
            versions: Versions::default(),
            samples,
            counts: Some(counts),
            created: BTreeMap::new(),
            rss: BTreeMap::new(),
            memory: None,
        }
    }

    #[test]
    fn json_shape_and_values() {
        let o = outcome(0);
        let text = serde_json::to_string(&o.json()).unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Config order as in the tables (serde_json's own maps would sort the keys).
        let at = |k: &str| text.find(&format!("\"{k}\":{{")).unwrap();
        assert!(at("plain") < at("empty") && at("empty") < at("empty+pin") && at("affinity") < at("haproxy"));
        let a = &j["steady"]["affinity"];
        assert_eq!(a["rounds"].as_array().unwrap().len(), 3, "the per-round list, not a count");
        assert!((a["added_us_per_req"].as_f64().unwrap() - 12.0).abs() < 1e-9);
        assert!((a["ratio_to_empty"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert!((j["overhead_ratio"]["affinity+control"].as_f64().unwrap() - 1.5).abs() < 1e-9);
        assert!((j["overhead_ratio_proxy_cpu"]["affinity"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(j["steady"]["plain"]["ratio_to_empty"], serde_json::Value::Null);
        assert_eq!(j["steady"]["direct"]["pods"], 1);
        let i = &j["instructions"]["configs"];
        assert_eq!(i["affinity"]["added_per_request"], 45_000.0);
        assert!((i["affinity"]["ratio_to_empty"].as_f64().unwrap() - 45.0 / 35.0).abs() < 1e-9);
        assert_eq!(i["affinity"]["ratio_to_empty_pin"], 0.9);
        assert_eq!(i["plain"]["ratio_to_empty"], serde_json::Value::Null);
        assert!(i.get("affinity+control, no matcher").is_none(), "only what was counted");
        assert_eq!(j["instructions"]["initialize"]["configs"]["affinity"]["added_per_initialize"], 90_000.0);
        assert_eq!(j["settings"]["base_sessions"], BASE_SESSIONS);
        assert!(j.get("scaled").is_none() && j.get("memory").is_none());
        let tables = o.tables();
        assert!(tables.contains("| affinity | 245000 | +45000 | 1.29 | 0.90 |"), "{tables}");
        assert!(tables.contains("| affinity | 270000 | +90000 |"), "{tables}");
        assert!(tables.contains("| affinity | +12.00 | 1.20 | +12.00 | 1.20 |"), "{tables}");
    }

    #[test]
    fn ordered_keeps_order_and_formatting() {
        let j = serde_json::to_string(&Ordered(vec![("b".to_string(), 1), ("a".to_string(), 2)])).unwrap();
        assert_eq!(j, r#"{"b":1,"a":2}"#);
        assert_eq!(pct(Some(1.041)), "+4.1 %");
        assert_eq!(pct(None), "-");
        assert_eq!(signed(Some(-3.0), 0), "-3");
        assert_eq!(per_session(1000, 2000, 1024), Some(1000.0));
        assert_eq!(per_session(1000, 2000, 0), None);
    }
}
