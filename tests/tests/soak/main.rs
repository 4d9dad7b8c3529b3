//! Chaos soak: N concurrent MCP sessions call continuously through two real Envoys while
//! a seeded chaos driver kills and restarts pods, Envoys, control instances and Redis.
//! The test fails on any loss.
//!
//! ```text
//!   sessions × lanes ── alternately ──▶ Envoy A ──▶ control 1 ─┐
//!                                   └─▶ Envoy B ──▶ control 2 ─┴─ Redis (AOF, fsync always)
//!   both Envoys (pinned routing) and both controls (recovery) ──▶ pod-0, pod-1, pod-2
//! ```
//!
//! `cargo test -p mcp-affinity-harness --test soak` runs the short profile (60 s of
//! traffic; part of `make test`); `make soak` the long one (5 minutes). Knobs:
//! `SOAK_DURATION_SECS` (60), `SOAK_SESSIONS` (50), `SOAK_LANES` (concurrent calls per
//! session, each through its own Envoy in turn: 2), `SOAK_THINK_MS` (upper bound of a
//! lane's pause between calls, 100; the pause is 25–100 % of it), `SOAK_SEED` (decimal or
//! 0x-hex; printed at start). The seed fixes the chaos schedule — which faults, in which
//! order, on which target, with which downtimes and gaps — and each lane's choice of
//! calls; how traffic interleaves with the faults is timing and is not replayed exactly.
//!
//! The Envoys run `envoy/envoy.yaml` with its shipped plugin configuration (control and
//! recovery timeouts as deployed), `--concurrency 2`; each control instance has
//! `--endpoints` listing the three pods. Calls: `ping` and `tools/list` (replay-safe in
//! control's default `--replay-safe-methods`; the demo server has no resources) and
//! `tools/call` of `whoami` and `echo` (not replay-safe). Beside them, `SOAK_TS_SESSIONS`
//! (2) sessions of the official TypeScript MCP SDK client call `echo` through a third Envoy,
//! C, which the chaos never restarts (the SDK's client has no second Envoy to fail over to)
//! but whose pods, control and Redis it shares. The lanes take turns at the
//! shapes real clients give a request (`mcp_client::Shape`): headers and body in one write,
//! the body written after the headers, a chunked body in pieces, HTTP/2 HEADERS then DATA.
//! The pods are dual-era: on the same endpoint `SOAK_TASK_LANES` (4) MCP 2026-07-28 clients
//! create tasks through A or B and poll them until they complete (`tasks.rs`); a task may
//! die only with its pod.
//!
//! # The chaos
//!
//! Faults run **one at a time**: each ends with the system healthy again (the process
//! restarted and ready), then the driver waits until every session has answered a call
//! through each Envoy (the fault has "settled"), then pauses a seeded gap. The design
//! promises single-fault tolerance: a pod lost while the control its Envoy talks to is
//! down cannot be recovered (the filter then passes the upstream's answer through, as
//! documented), so overlapping faults would only test that documented limit. Every
//! round of the schedule is a seeded permutation of all fault kinds; the first round
//! always completes, so every profile covers every kind.
//!
//! - **pod outage** (twice per round, different pods): SIGKILL, 1–3.5 s down, restart in
//!   place (same address, no sessions). Its sessions meet connection failures (moved to a
//!   live pod by control) and, through an Envoy still holding the old pin after the
//!   restart, 404 (control answers with its newer pin). Calls in flight at the kill reset
//!   after being sent.
//! - **pod restart in place**: SIGKILL and restart at once: the 404 ("session unknown")
//!   path.
//! - **Envoy restart** (A and B): replaced the way a Service replaces an Envoy pod — it
//!   leaves the Service (clients send new calls to the other Envoy), the clients' calls in
//!   flight finish (`http.mcp.downstream_rq_active` is then 0 too), its counters are read
//!   (they start from 0 with the new process), SIGKILL; it is back in the Service while
//!   down (endpoints lag behind a dead pod), so clients are refused and fail over to the
//!   other Envoy for that call — counted, not failures; 0.3–2 s later it restarts on the
//!   same ports with empty shared data (pins come back from control). The soak's client
//!   opens a connection per call, so a stopped Envoy means "connection refused" to it.
//!   (Stopping a listener while calls still arrive would reset connections the kernel had
//!   already accepted for it — calls whose fate the client cannot know, which is why the
//!   Envoy leaves the Service first.)
//! - **control restart** (1 and 2): counters read, SIGKILL, 0.2–1.5 s down, restart.
//! - **Redis restart**: SIGKILL, 0.2–1.5 s down, restart on the same port and append-only
//!   file (`appendonly yes`, `appendfsync always`, data directory kept). It must hold the
//!   same number of keys afterwards; the fault ends when both controls are ready again
//!   (`/readyz`, what a readiness probe waits for).
//!
//! # What must hold (the test fails otherwise)
//!
//! - no session is lost (a 404 on a session: the client would have to start anew);
//! - no replay-safe call fails;
//! - a `tools/call` fails only with JSON-RPC -32003 ("outcome unknown", not replayed) and
//!   only when a pod was killed while it was in flight; the client's count of -32003
//!   answers equals the filters' `recoveries_not_replayed`; the filters count no
//!   `recoveries_failed`;
//! - every answer is right (`echo` returns its text, `tools/list` lists both tools,
//!   `mcp-session-id` on an answer is the client's own id), and a session changes pods
//!   (`whoami`) only after a fault of its pod;
//! - every fault settles within 20 s; Redis keeps every key across its restarts.
//!
//! **Out of the filter's reach, counted apart:** the demo pods (rmcp, stateful) answer a
//! POST with an SSE stream whose headers and priming event leave before the JSON-RPC
//! response event. A pod killed in between has already had its `200` forwarded to the
//! client — the filter decides on response headers, and Envoy gives it no body before
//! that decision (envoy/README.md) — so the client sees the answer cut, not -32003. Such a
//! cut is accepted only while a pod was being killed during the call; a replay-safe call
//! is then sent again (what replay-safe means to a client), a `tools/call` counts as
//! outcome unknown.
//!
//! At the end one summary is printed: calls made, failures by cause, fail-overs, sessions
//! lost, re-initializations (control `mcp_affinity_control_reinitializations_total`, both
//! instances), recoveries by outcome (the filters' counters, both Envoys), latency
//! percentiles. Counters of restarted processes are read before each restart and summed.
//!
//! # Modules
//!
//! - `schedule`: the seeded random stream and the schedule of faults;
//! - `mesh`: the processes under test and the counters read from them;
//! - `faults`: the chaos driver — one fault at a time, then settling;
//! - `client`: the soak's MCP client (one POST, fail-over between Envoys) and the
//!   traffic's shared state;
//! - `lanes`: the traffic — lanes of calls per session slot, the TypeScript SDK lanes;
//! - `tally`: what the lanes counted, the summary and the verdict.

mod client;
mod faults;
mod lanes;
mod mesh;
mod schedule;
mod tally;
mod tasks;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser as _;

use crate::client::{FAILOVER_DEADLINE, REQUEST_TIMEOUT, Shared, secs};
use crate::faults::{Chaos, ChaosLog};
use crate::lanes::{Slot, join_lanes, run_lane, run_ts_lane};
use crate::tasks::{TaskTally, run_task_lane};
use crate::mesh::{ENVOY_NAMES, Mesh};
use crate::schedule::{Rng, Schedule, fault_label};
use crate::tally::{Ending, Tally, TsTally};

/// The run's knobs, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    duration: Duration,
    sessions: usize,
    lanes: usize,
    think_ms: u64,
    /// Sessions of the official TypeScript MCP SDK client (`SOAK_TS_SESSIONS`, 2; 0: none).
    ts_sessions: usize,
    /// MCP 2026-07-28 task lanes (`SOAK_TASK_LANES`, 4; 0: none).
    task_lanes: usize,
    seed: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => parse_u64(&v).unwrap_or_else(|| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seed = match std::env::var("SOAK_SEED") {
            Ok(v) if !v.trim().is_empty() => parse_u64(&v).unwrap_or_else(|| panic!("SOAK_SEED={v:?} is not a number")),
            _ => {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
                Rng(nanos ^ u64::from(std::process::id())).next()
            }
        };
        let s = Settings {
            duration: Duration::from_secs(env_u64("SOAK_DURATION_SECS", 60)),
            sessions: env_u64("SOAK_SESSIONS", 50) as usize,
            lanes: env_u64("SOAK_LANES", 2) as usize,
            think_ms: env_u64("SOAK_THINK_MS", 100),
            ts_sessions: env_u64("SOAK_TS_SESSIONS", 2) as usize,
            task_lanes: env_u64("SOAK_TASK_LANES", 4) as usize,
            seed,
        };
        assert!(s.sessions >= 1 && s.lanes >= 1, "SOAK_SESSIONS and SOAK_LANES must be ≥ 1");
        assert!(s.duration >= Duration::from_secs(20), "SOAK_DURATION_SECS must be ≥ 20");
        s
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_loses_nothing() {
    let settings = Settings::from_env();
    println!(
        "soak: seed {:#018x} (SOAK_SEED={:#x} replays the schedule), {} s, {} sessions × {} lanes",
        settings.seed,
        settings.seed,
        settings.duration.as_secs(),
        settings.sessions,
        settings.lanes
    );
    let mut rng = Rng(settings.seed);
    let mut schedule = Schedule::new(rng.fork(1));

    let mut mesh = tokio::task::block_in_place(Mesh::start).expect("start the mesh");
    let replay_safe: BTreeSet<String> = mcp_affinity_control::config::Config::try_parse_from(["mcp-affinity-control"])
        .expect("control's default flags")
        .replay_safe_methods
        .into_iter()
        .collect();
    assert!(replay_safe.contains("ping") && replay_safe.contains("tools/list") && !replay_safe.contains("tools/call"), "{replay_safe:?}");

    let shared = Arc::new(Shared::new([mesh.envoys[0].url(), mesh.envoys[1].url()], replay_safe));

    // Sessions, opened alternately through A and B before any chaos.
    let opened = futures::future::join_all((0..settings.sessions).map(|i| {
        let shared = shared.clone();
        async move { shared.open_session(i % 2).await.with_context(|| format!("open session {i}")) }
    }))
    .await;
    let slots: Vec<Arc<Slot>> = opened
        .into_iter()
        .enumerate()
        .map(|(index, id)| Arc::new(Slot::new(index, id.expect("initial sessions"), settings.lanes)))
        .collect();
    println!("soak: [{}] {} sessions open; traffic starts", secs(shared.now()), slots.len());

    let traffic_start = Instant::now();
    let lanes: Vec<_> = slots
        .iter()
        .flat_map(|slot| (0..settings.lanes).map(move |lane| (slot.clone(), lane)))
        .map(|(slot, lane)| {
            let lane_rng = rng.fork(1000 + (slot.index * 16 + lane) as u64);
            tokio::spawn(run_lane(shared.clone(), slot, lane, lane_rng, settings.think_ms))
        })
        .collect();
    let task_lanes: Vec<_> = (0..settings.task_lanes).map(|i| tokio::spawn(run_task_lane(shared.clone(), i, rng.fork(5000 + i as u64)))).collect();
    let ts_lanes: Vec<_> = (0..settings.ts_sessions).map(|i| tokio::spawn(run_ts_lane(shared.clone(), mesh.ts_envoy.url(), i, settings.think_ms))).collect();

    // Chaos: warm-up, then faults one at a time until too little time is left for one
    // more fault and its settling (the first round always completes).
    let quiet_tail = Duration::from_secs(8);
    let mut chaos = Chaos { mesh: &mut mesh, shared: &shared, slots: &slots, log: ChaosLog::default() };
    chaos.settle(0, "warm-up").await;
    loop {
        let (round, fault) = schedule.next();
        let left = settings.duration.saturating_sub(traffic_start.elapsed());
        if round > 1 && left < quiet_tail + fault.down + fault.gap + Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(fault.gap).await;
        if let Err(e) = chaos.run(&fault).await {
            let line = format!("fault {:?} failed: {e:#}", fault.kind);
            chaos.note(line.clone());
            chaos.log.problems.push(line);
            break;
        }
        let end = shared.now();
        chaos.settle(end, &fault_label(fault.kind)).await;
        if schedule.round.is_empty() {
            chaos.log.rounds_done = round;
        }
    }
    let chaos_end = traffic_start.elapsed();
    let mut log = std::mem::take(&mut chaos.log);
    drop(chaos);
    // Quiet traffic until the duration is over (at least the quiet tail).
    let until = settings.duration.max(chaos_end + quiet_tail);
    tokio::time::sleep(until.saturating_sub(traffic_start.elapsed())).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    // A lane stops after its current call (bounded by the request and fail-over deadlines).
    let join_deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT + FAILOVER_DEADLINE + Duration::from_secs(10);
    join_lanes(lanes, join_deadline, "a lane", &mut log.problems, |t| tally.merge(t)).await;
    let mut ts = TsTally::default();
    join_lanes(ts_lanes, join_deadline, "a TypeScript SDK lane", &mut log.problems, |t| ts.merge(t)).await;
    let mut tasks = TaskTally::default();
    join_lanes(task_lanes, join_deadline, "a task lane", &mut log.problems, |t| tasks.merge(t)).await;
    let ts_not_replayed = mesh.ts_envoy.metric("recoveries_not_replayed").await.unwrap_or(-1) as f64;
    let traffic_secs = traffic_start.elapsed().as_secs_f64();
    for (i, name) in ENVOY_NAMES.iter().enumerate() {
        if let Err(e) = mesh.read_filter(i).await {
            log.problems.push(format!("final filter counters of Envoy {name}: {e:#}"));
        }
        if let Err(e) = mesh.read_control(i).await {
            log.problems.push(format!("final control counters of control {}: {e:#}", i + 1));
        }
    }

    let ending = Ending {
        settings: &settings,
        traffic_secs,
        tally,
        ts,
        tasks,
        ts_not_replayed,
        log,
        lost: shared.lost.lock().unwrap().clone(),
        pod_faults: shared.pod_faults.lock().unwrap().len() as u64,
        filter: &mesh.filter,
        control: &mesh.control,
    };
    let violations = ending.violations();
    let summary = ending.summary(&violations);
    println!("{summary}");
    if !violations.is_empty() {
        let report = ending.failure_report(&violations, &summary);
        let _ = std::fs::remove_dir_all(&mesh.redis_dir);
        panic!("{report}");
    }
    let _ = std::fs::remove_dir_all(&mesh.redis_dir);
}
