//! What the run counted and the verdict: each lane's [`Tally`] (the TypeScript SDK lanes'
//! [`TsTally`]), merged at the end; the failures kept for the report; and, from those and
//! the counters read from the mesh ([`Ending`]), the printed summary, the list of
//! violations that fails the test, and the report it fails with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::Settings;
use crate::client::{Micros, secs};
use crate::faults::ChaosLog;
use crate::lanes::{Call, Lost};
use crate::mesh::{Counters, ENVOY_NAMES};
use crate::tasks::TaskTally;

/// What the TypeScript SDK lanes counted.
#[derive(Debug, Default)]
pub struct TsTally {
    pub sessions: u64,
    pub calls: u64,
    pub ok: u64,
    /// `tools/call` answered -32003 "outcome unknown" (a reset after the request was sent);
    /// cross-checked with the filters' `recoveries_not_replayed` like the raw lanes'.
    pub rpc_32003: u64,
    /// Calls that failed otherwise while a pod had a fault (an SSE answer cut after its
    /// headers); bounded by the pod faults.
    pub cut_while_a_pod_died: u64,
    /// Connects (`initialize`) that failed while a pod had a fault and were made again, as
    /// a client does.
    pub connects_retried: u64,
    pub failures: Vec<String>,
}

impl TsTally {
    pub fn merge(&mut self, o: TsTally) {
        self.sessions += o.sessions;
        self.calls += o.calls;
        self.ok += o.ok;
        self.rpc_32003 += o.rpc_32003;
        self.cut_while_a_pod_died += o.cut_while_a_pod_died;
        self.connects_retried += o.connects_retried;
        self.failures.extend(o.failures);
    }
}

/// A failed call, kept for the report.
#[derive(Debug, Clone)]
pub struct Failure {
    pub start: Micros,
    pub end: Micros,
    pub slot: usize,
    pub session_id: String,
    pub envoy: usize,
    pub call: Call,
    pub cause: String,
    pub detail: String,
}

/// What one lane counted (merged at the end).
#[derive(Debug, Default)]
pub struct Tally {
    pub calls: u64,
    pub ok: u64,
    pub safe_calls: u64,
    pub safe_failed: u64,
    pub tool_calls: u64,
    pub tool_failed: u64,
    /// -32003 on a `tools/call` with a pod fault during the call.
    pub outcome_unknown: u64,
    /// Every -32003 the client got (any method, explained or not).
    pub rpc_32003: u64,
    /// `tools/call` answers cut after their headers while a pod died (outcome unknown to
    /// the client, not -32003: out of the filter's reach).
    pub tool_cut: u64,
    /// Replay-safe calls sent again after their answer was cut while a pod died.
    pub safe_resent_after_cut: u64,
    /// Connections refused by a stopped Envoy, each retried on the other Envoy.
    pub refused: u64,
    /// Calls sent to the other Envoy because the chosen one had left the Service.
    pub out_of_service: u64,
    pub calls_failed_over: u64,
    pub moves: u64,
    pub unexplained_moves: Vec<String>,
    pub causes: BTreeMap<String, u64>,
    pub failures: Vec<Failure>,
    pub failures_total: u64,
    pub latencies_us: Vec<u32>,
}

impl Tally {
    pub fn merge(&mut self, o: Tally) {
        self.calls += o.calls;
        self.ok += o.ok;
        self.safe_calls += o.safe_calls;
        self.safe_failed += o.safe_failed;
        self.tool_calls += o.tool_calls;
        self.tool_failed += o.tool_failed;
        self.outcome_unknown += o.outcome_unknown;
        self.rpc_32003 += o.rpc_32003;
        self.tool_cut += o.tool_cut;
        self.safe_resent_after_cut += o.safe_resent_after_cut;
        self.refused += o.refused;
        self.out_of_service += o.out_of_service;
        self.calls_failed_over += o.calls_failed_over;
        self.moves += o.moves;
        self.unexplained_moves.extend(o.unexplained_moves);
        for (k, v) in o.causes {
            *self.causes.entry(k).or_default() += v;
        }
        self.failures_total += o.failures_total;
        self.failures.extend(o.failures);
        self.latencies_us.extend(o.latencies_us);
    }
}

/// The `p` quantile of `sorted` (microseconds), in milliseconds.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// The run at its end: the merged tallies, the chaos log, the sessions lost and the
/// counters read from the mesh (both Envoys, both controls, summed over restarts).
pub struct Ending<'a> {
    pub settings: &'a Settings,
    pub traffic_secs: f64,
    pub tally: Tally,
    pub ts: TsTally,
    pub tasks: TaskTally,
    /// Envoy C's `recoveries_not_replayed` (-1 when it could not be read).
    pub ts_not_replayed: f64,
    pub log: ChaosLog,
    pub lost: Vec<Lost>,
    /// How many pod faults the chaos made.
    pub pod_faults: u64,
    pub filter: &'a [Counters; 2],
    pub control: &'a [Counters; 2],
}

impl Ending<'_> {
    /// A filter counter, both Envoys.
    fn filter(&self, k: &str) -> f64 {
        self.filter[0].get(k) + self.filter[1].get(k)
    }

    /// A control counter, both instances.
    fn control(&self, k: &str) -> f64 {
        self.control[0].get(k) + self.control[1].get(k)
    }

    /// What must hold and did not (empty: the soak passes).
    pub fn violations(&self) -> Vec<String> {
        let Ending { settings, tally, ts, tasks, ts_not_replayed, log, lost, pod_faults, .. } = self;
        let (ts_not_replayed, pod_faults) = (*ts_not_replayed, *pod_faults);
        let filter = |k: &str| self.filter(k);
        let mut violations: Vec<String> = Vec::new();
        if !lost.is_empty() {
            let lines: Vec<String> = lost.iter().take(20).map(|l| format!("  {l}")).collect();
            violations.push(format!("{} sessions lost:\n{}", lost.len(), lines.join("\n")));
        }
        if tally.safe_failed > 0 {
            violations.push(format!("{} replay-safe calls failed", tally.safe_failed));
        }
        if tally.tool_failed > 0 {
            violations.push(format!("{} tools/call failed otherwise than -32003 during a pod fault", tally.tool_failed));
        }
        // A cut answer is excused only by a fault of its session's pod during the call; and a pod
        // fault can cut at most the calls in flight at once (one per lane of each session).
        let cut_bound = pod_faults * (settings.sessions * settings.lanes) as u64;
        if tally.tool_cut + tally.safe_resent_after_cut > cut_bound {
            violations.push(format!(
                "{} answers cut while a pod died, more than {pod_faults} pod faults can cut ({cut_bound}: sessions × lanes each)",
                tally.tool_cut + tally.safe_resent_after_cut
            ));
        }
        if tally.rpc_32003 as f64 != filter("recoveries_not_replayed") {
            violations.push(format!(
                "the client saw {} -32003 answers, the filters counted {} recoveries_not_replayed",
                tally.rpc_32003,
                filter("recoveries_not_replayed")
            ));
        }
        // Each request the filter did not replay reached the client as -32003, or as a call
        // cut while a pod died (the SDK may wait out an SSE answer cut after the filter's
        // decision instead of surfacing the -32003), or was the SDK's standalone GET stream,
        // which is never replayed and which the SDK reopens without a word: one per session,
        // at most once per pod fault.
        let get_streams = pod_faults * settings.ts_sessions as u64;
        if ts_not_replayed < ts.rpc_32003 as f64 || ts_not_replayed > (ts.rpc_32003 + ts.cut_while_a_pod_died + get_streams) as f64 {
            violations.push(format!(
                "the TypeScript SDK saw {} -32003 answers and {} calls cut while a pod died; Envoy C's filter counted {ts_not_replayed} recoveries_not_replayed",
                ts.rpc_32003, ts.cut_while_a_pod_died
            ));
        }
        if !ts.failures.is_empty() {
            let lines: Vec<String> = ts.failures.iter().take(20).map(|l| format!("  {l}")).collect();
            violations.push(format!("{} TypeScript SDK calls failed:\n{}", ts.failures.len(), lines.join("\n")));
        }
        if ts.sessions != settings.ts_sessions as u64 || (settings.ts_sessions > 0 && ts.ok == 0) {
            violations.push(format!("TypeScript SDK lanes: {} of {} sessions ran, {} calls ok", ts.sessions, settings.ts_sessions, ts.ok));
        }
        if ts.cut_while_a_pod_died > pod_faults * settings.ts_sessions as u64 {
            violations.push(format!("{} TypeScript SDK calls cut while a pod died, more than {pod_faults} pod faults can cut", ts.cut_while_a_pod_died));
        }
        if !tasks.failures.is_empty() {
            let lines: Vec<String> = tasks.failures.iter().take(20).map(|l| format!("  {l}")).collect();
            violations.push(format!("{} MCP 2026-07-28 tasks failed:\n{}", tasks.failures.len(), lines.join("\n")));
        }
        if settings.task_lanes > 0 && tasks.completed == 0 {
            violations.push("no MCP 2026-07-28 task completed".into());
        }
        if filter("recoveries_failed") > 0.0 {
            violations.push(format!("the filters counted {} recoveries_failed", filter("recoveries_failed")));
        }
        if !tally.unexplained_moves.is_empty() {
            violations.push(format!("unexplained session moves: {:#?}", &tally.unexplained_moves[..tally.unexplained_moves.len().min(20)]));
        }
        if !log.settle_timeouts.is_empty() {
            violations.push(format!("faults that did not settle: {:#?}", log.settle_timeouts));
        }
        // Writes may land between the count and the kill, or right after the restart (the
        // task lanes write pins all the time): a restart may add keys, never lose one.
        if let Some((a, b)) = log.redis_keys.iter().find(|(a, b)| b < a) {
            violations.push(format!("Redis had {a} keys before its restart and {b} after"));
        }
        if log.rounds_done < 1 {
            violations.push("the first round of faults did not complete".into());
        }
        violations.extend(log.problems.iter().cloned());
        violations
    }

    /// The summary printed at the end, its verdict line from `violations`.
    pub fn summary(&self, violations: &[String]) -> String {
        let Ending { settings, traffic_secs, tally, ts, ts_not_replayed, log, lost, .. } = self;
        let traffic_secs = *traffic_secs;
        let filter = |k: &str| self.filter(k);
        let control = |k: &str| self.control(k);
        let lost_working = lost.iter().filter(|l| l.had_worked).count();
        let mut lat = tally.latencies_us.clone();
        lat.sort_unstable();
        let mut s = String::new();
        let _ = writeln!(s, "================ mcp-affinity chaos soak: summary ================");
        let _ = writeln!(
            s,
            "seed {:#018x} | traffic {traffic_secs:.1} s | {} sessions × {} lanes | 2 Envoys (--concurrency 2) → 2 controls → Redis (AOF) | 3 pods",
            settings.seed, settings.sessions, settings.lanes
        );
        let _ = writeln!(
            s,
            "faults: {} (complete rounds: {}; longest settle {:?}): {}",
            log.counts.values().sum::<u64>(),
            log.rounds_done,
            log.max_settle,
            log.counts.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            s,
            "calls: {} made, {} ok ({:.0}/s) | replay-safe (ping, tools/list): {} made, {} failed | tools/call: {} made, {} failed",
            tally.calls,
            tally.ok,
            tally.calls as f64 / traffic_secs,
            tally.safe_calls,
            tally.safe_failed,
            tally.tool_calls,
            tally.tool_failed
        );
        let _ = writeln!(
            s,
            "failed by cause: {}",
            if tally.causes.is_empty() {
                "none".to_string()
            } else {
                tally.causes.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
            }
        );
        let _ = writeln!(
            s,
            "outcome unknown (tools/call -32003 while a pod died, not replayed; not failures): {} | all -32003 seen by the client: {} | filter recoveries_not_replayed: {}",
            tally.outcome_unknown,
            tally.rpc_32003,
            filter("recoveries_not_replayed")
        );
        let _ = writeln!(
            s,
            "answers cut after their headers while a pod died (out of the filter's reach; not failures): tools/call {} (outcome unknown), replay-safe {} (sent again)",
            tally.tool_cut, tally.safe_resent_after_cut
        );
        let _ = writeln!(
            s,
            "fail-overs to the other Envoy (not failures): {} connections refused by a stopped Envoy, {} calls while an Envoy was leaving the Service; {} calls concerned",
            tally.refused, tally.out_of_service, tally.calls_failed_over
        );
        let _ = writeln!(s, "sessions lost: {} ({} after having worked)", lost.len(), lost_working);
        let _ = writeln!(
            s,
            "re-initializations (control, both instances): {} | control recoveries: replayed {}, not_replayed {}, failed {}, alive {} | replays {}",
            control("reinitializations"),
            control("recoveries replayed"),
            control("recoveries not_replayed"),
            control("recoveries failed"),
            control("recoveries alive"),
            control("replays")
        );
        let _ = writeln!(
            s,
            "recoveries (filters, both Envoys): replayed {}, not_replayed {}, failed {} | unknown_session {}, requests_unpinned {}, control_lookups {}, control_errors {}",
            filter("recoveries_replayed"),
            filter("recoveries_not_replayed"),
            filter("recoveries_failed"),
            filter("unknown_session"),
            filter("requests_unpinned"),
            filter("control_lookups"),
            filter("control_errors")
        );
        let redis = if log.redis_keys.iter().all(|(a, b)| a == b) {
            let counts: BTreeSet<u64> = log.redis_keys.iter().map(|(a, _)| *a).collect();
            format!("{} restarts, every key kept ({})", log.redis_keys.len(), counts.iter().map(|n| format!("{n}→{n}")).collect::<Vec<_>>().join(", "))
        } else {
            log.redis_keys.iter().map(|(a, b)| format!("{a}→{b}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            s,
            "session moves (whoami changed pod): {}, unexplained: {} | Redis keys before→after restart: {redis}",
            tally.moves,
            tally.unexplained_moves.len()
        );
        let _ = writeln!(
            s,
            "latency of successful calls: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0)
        );
        let _ = writeln!(
            s,
            "TypeScript SDK client (through Envoy C): {} sessions, {} calls, {} ok, {} -32003 (Envoy C recoveries_not_replayed {ts_not_replayed}), {} cut while a pod died, {} failed, {} connects made again after a pod's death",
            ts.sessions,
            ts.calls,
            ts.ok,
            ts.rpc_32003,
            ts.cut_while_a_pod_died,
            ts.failures.len(),
            ts.connects_retried
        );
        let tasks = &self.tasks;
        let _ = writeln!(
            s,
            "MCP 2026-07-28 tasks (dual-era pods, through Envoys A and B): {} created, {} completed, {} lost with their pod, {} cut while a pod died, {} failed | filters: tasks_pinned {}, tasks_routed {}, tasks_unpinned {}, tasks_lost {}",
            tasks.created,
            tasks.completed,
            tasks.lost_with_their_pod,
            tasks.cut_while_a_pod_died,
            tasks.failures.len(),
            self.filter("tasks_pinned"),
            self.filter("tasks_routed"),
            self.filter("tasks_unpinned"),
            self.filter("tasks_lost")
        );
        let _ = writeln!(s, "verdict: {}", if violations.is_empty() { "PASS — nothing lost" } else { "FAIL" });
        let _ = write!(s, "==================================================================");
        s
    }

    /// What the failing test panics with: the violations, the failed calls (the first 40
    /// by start), the chaos timeline and the summary.
    pub fn failure_report(&self, violations: &[String], summary: &str) -> String {
        let Ending { settings, tally, log, .. } = self;
        let mut failures: Vec<&Failure> = tally.failures.iter().collect();
        failures.sort_by_key(|f| f.start);
        let details: Vec<String> = failures
            .iter()
            .take(40)
            .map(|f| {
                format!(
                    "[{}..{}] slot {} session {} via Envoy {} {}: {} — {}",
                    secs(f.start),
                    secs(f.end),
                    f.slot,
                    f.session_id,
                    ENVOY_NAMES[f.envoy],
                    f.call.label(),
                    f.cause,
                    f.detail.chars().take(400).collect::<String>()
                )
            })
            .collect();
        format!(
            "chaos soak failed (seed {:#x}; replay with SOAK_SEED={:#x}):\n- {}\n\nfailed calls (first {} of {}):\n{}\n\nchaos timeline:\n{}\n\n{summary}",
            settings.seed,
            settings.seed,
            violations.join("\n- "),
            details.len(),
            tally.failures_total,
            details.join("\n"),
            log.timeline.join("\n")
        )
    }
}
