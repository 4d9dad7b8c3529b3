//! The results of a run ([`Outcome`]): machine, versions, every sample and count, and
//! what is computed from them per config. [`super::json`] writes them as the JSON result,
//! [`super::tables`] prints them.

use std::collections::BTreeMap;
use std::process::Command;

use serde::{Serialize, Serializer};

use super::configs::Config;
use super::instructions::{Count, Counts};
use super::run::{Memory, Samples};
use super::settings::Settings;
use super::stats::{self, Added, Sample, Summary};

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

/// Bytes per session from RSS kB before/after and the sessions created.
pub(super) fn per_session(before: u64, after: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| (after as f64 - before as f64) * 1024.0 / n as f64)
}

impl Outcome {
    pub(super) fn phase(&self, phase: &str, cfg: Config) -> &[Sample] {
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

    pub(super) fn added(&self, phase: &str, cfg: Config, base: Config) -> Added {
        stats::added(self.phase(phase, cfg), self.phase(phase, base))
    }

    /// (X − plain) / (empty − plain) from the medians of the main table.
    pub(super) fn ratio_of_medians(&self, cfg: Config) -> Option<f64> {
        let us = |c| Summary::of(self.phase("steady", c)).us_per_req();
        let plain = us(Config::Plain)?;
        stats::ratio(us(cfg).map(|x| x - plain), us(Config::Empty).map(|e| e - plain))
    }

    /// Whether any request of a measured phase failed.
    pub fn errors(&self) -> bool {
        self.samples.iter().filter(|(p, _)| !p.starts_with("warmup")).flat_map(|(_, c)| c.values().flatten()).any(|s| s.errors > 0)
    }

}

/// `cfg`'s instructions per request minus `plain`'s, both of `counts` (rounded first).
pub(super) fn added_in(counts: &BTreeMap<Config, Count>, cfg: Config, plain: Config) -> Option<f64> {
    Some(counts.get(&cfg)?.per_request.round() - counts.get(&plain)?.per_request.round())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::instructions::Count;
    use crate::bench::settings::BASE_SESSIONS;
    use crate::bench::tables::{pct, signed};

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
        for (c, n) in [(Config::Plain, 190_000.0), (Config::Empty, 220_000.0), (Config::Affinity, 219_000.0), (Config::Control, 221_500.0)] {
            counts.stateless.insert(c, count(n));
        }
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
        let st = &j["instructions"]["stateless"];
        assert_eq!(st["affinity"]["added_per_request"].as_f64(), Some(29_000.0));
        assert!((st["affinity"]["ratio_to_empty"].as_f64().unwrap() - 29.0 / 30.0).abs() < 1e-9);
        assert_eq!(st["affinity+control"]["ratio_to_empty"].as_f64(), Some(1.05));
        assert_eq!(j["settings"]["base_sessions"], BASE_SESSIONS);
        assert!(j.get("scaled").is_none() && j.get("memory").is_none());
        let tables = o.tables();
        assert!(tables.contains("| affinity | 245000 | +45000 | 1.29 | 0.90 |"), "{tables}");
        assert!(tables.contains("| affinity | 270000 | +90000 |"), "{tables}");
        assert!(tables.contains("| affinity+control | 221500 | +31500 | 1.05 |"), "the 2026-era table: {tables}");
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
