//! The tables printed at the end of a run (Markdown), from an [`Outcome`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::configs::{Config, INITIALIZE, INSTR, INSTR_INIT, INSTR_SS, SCALED, STEADY};
use super::instructions::{Count, Counts};
use super::report::{Outcome, added_in, per_session};
use super::settings::{BASE_SESSIONS, INSTR_INIT_SETTLE, INSTR_INIT_WARMUP, INSTR_WARMUP, Store};
use super::stats::{self, Change, Summary};

pub(super) fn f(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

pub(super) fn signed(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:+.decimals$}"))
}

fn ratio_text(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))
}

pub(super) fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |r| format!("{:+.1} %", (r - 1.0) * 100.0))
}

impl Outcome {
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

    fn instruction_rows(w: &mut String, counts: &BTreeMap<Config, Count>, plain: Config, empty: Config, pin: Option<Config>, configs: &[Config]) {
        for &c in configs {
            let Some(count) = counts.get(&c) else { continue };
            let added = added_in(counts, c, plain);
            let (add, r, rp) = if c == plain {
                ("".to_string(), "".to_string(), "".to_string())
            } else {
                (signed(added, 0), ratio_text(stats::ratio(added, added_in(counts, empty, plain))), pin.map_or("".into(), |p| ratio_text(stats::ratio(added, added_in(counts, p, plain)))))
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
            Self::instruction_rows(w, &counts.steady, Config::PlainSs, Config::EmptySs, None, &INSTR_SS);
            let _ = writeln!(w, "\nenvoy/envoy.yaml (ORIGINAL_DST pinning, the buffer filter ahead of the wasm filter, the filter replaying itself)\n");
        }
        let _ = writeln!(w, "| config | instructions/req | + vs plain | (X − plain) / (empty − plain) | (X − plain) / (empty+pin − plain) |\n|---|---:|---:|---:|---:|");
        Self::instruction_rows(w, &counts.steady, Config::Plain, Config::Empty, Some(Config::Pin), &INSTR);
        if !counts.stateless.is_empty() {
            let _ = writeln!(w, "\ninstructions per MCP 2026-07-28 request without session (`tools/list`, `MCP-Protocol-Version: 2026-07-28`, `Mcp-Method`; {} on the", s.instr_requests);
            let _ = writeln!(w, "same connection after {INSTR_WARMUP} warm-up): the filter reads none of it and asks for no answer, so it should cost what the empty filter costs,");
            let _ = writeln!(w, "(X − plain) / (empty − plain) ≈ 1\n");
            let _ = writeln!(w, "| config | instructions/req | + vs plain | (X − plain) / (empty − plain) |\n|---|---:|---:|---:|");
            let ss: &[Config] = if s.instr_ss { &INSTR_SS } else { &[] };
            Self::instruction_rows(w, &counts.stateless, Config::PlainSs, Config::EmptySs, None, ss);
            let plain_yaml: Vec<Config> = INSTR.iter().copied().filter(|c| *c != Config::Pin).collect();
            Self::instruction_rows(w, &counts.stateless, Config::Plain, Config::Empty, None, &plain_yaml);
        }
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

