//! The chaos driver: runs one fault of the schedule at a time on the mesh — killing and
//! restarting a pod, an Envoy (after it left the Service and its calls drained), a
//! control instance or Redis — to its end, then waits until the traffic has settled; and
//! logs what it did.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::client::{Micros, PodFault, REQUEST_TIMEOUT, Shared, secs};
use crate::lanes::Slot;
use crate::mesh::{ENVOY_NAMES, Mesh, POD_NAMES};
use crate::schedule::{Fault, FaultKind, fault_label};

/// A fault must settle (every session answered through each Envoy) within this.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `f` every 20 ms until it holds (returns how long that took) or `timeout` passes.
async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the chaos driver did.
#[derive(Debug, Default)]
pub struct ChaosLog {
    pub timeline: Vec<String>,
    pub counts: BTreeMap<String, u64>,
    pub rounds_done: u64,
    pub settle_timeouts: Vec<String>,
    pub problems: Vec<String>,
    pub redis_keys: Vec<(u64, u64)>,
    pub max_settle: Duration,
}

/// The chaos driver: the mesh it breaks, the traffic it watches settle, its log.
pub struct Chaos<'a> {
    pub mesh: &'a mut Mesh,
    pub shared: &'a Shared,
    pub slots: &'a [Arc<Slot>],
    pub log: ChaosLog,
}

impl Chaos<'_> {
    pub fn note(&mut self, line: String) {
        let line = format!("[{}] {line}", secs(self.shared.now()));
        println!("soak: {line}");
        self.log.timeline.push(line);
    }

    /// Runs one fault to its end (the system healthy again). Errors are problems of the
    /// harness or of a process that does not come back.
    pub async fn run(&mut self, f: &Fault) -> Result<()> {
        match f.kind {
            FaultKind::PodOutage | FaultKind::PodRestartInPlace => {
                let name = POD_NAMES[f.pod];
                // Registered (open-ended) before the kill: a call that sees its effect checks
                // the log as soon as it ends, maybe before the kill returns.
                let from = self.shared.now();
                let at = {
                    let mut faults = self.shared.pod_faults.lock().unwrap();
                    faults.push(PodFault { pod: f.pod, from, to: Micros::MAX });
                    faults.len() - 1
                };
                let close = |to: Micros| self.shared.pod_faults.lock().unwrap()[at].to = to;
                if f.kind == FaultKind::PodRestartInPlace {
                    let restarted = tokio::task::block_in_place(|| self.mesh.pods[f.pod].restart());
                    let to = self.shared.now();
                    close(to);
                    restarted?;
                    self.note(format!("pod {name}: SIGKILL + restart in place (sessions lost) during [{}, {}]", secs(from), secs(to)));
                } else {
                    tokio::task::block_in_place(|| self.mesh.pods[f.pod].kill());
                    let to = self.shared.now();
                    close(to);
                    self.note(format!("pod {name}: SIGKILL during [{}, {}], down for {:?}", secs(from), secs(to), f.down));
                    tokio::time::sleep(f.down).await;
                    tokio::task::block_in_place(|| self.mesh.pods[f.pod].restart())?;
                    self.note(format!("pod {name}: restarted in place"));
                }
            }
            FaultKind::EnvoyRestart(i) => {
                let name = ENVOY_NAMES[i];
                // Replaced the way a Service replaces an Envoy pod: it leaves the Service
                // (clients send new calls to the other Envoy), the calls in flight finish,
                // then it stops. Stopping a listener with calls still arriving would reset
                // connections the kernel had accepted for it: calls whose outcome the client
                // could not know.
                self.shared.out_of_service[i].store(true, Ordering::SeqCst);
                let shared = self.shared;
                let drained = poll_until(&format!("Envoy {name}: client calls in flight finish"), REQUEST_TIMEOUT + Duration::from_secs(10), || async move {
                    shared.in_flight[i].load(Ordering::SeqCst) == 0
                })
                .await?;
                let mesh = &*self.mesh;
                poll_until(&format!("Envoy {name}: no request active (http.mcp.downstream_rq_active) once no client call is in flight"), Duration::from_secs(5), || async move {
                    mesh.envoy_stat(i, "http.mcp.downstream_rq_active").await.is_ok_and(|n| n == 0)
                })
                .await?;
                self.mesh.read_filter(i).await?;
                tokio::task::block_in_place(|| self.mesh.envoys[i].kill());
                // Back in the Service while it is down (endpoints lag behind a dead pod):
                // clients try it, are refused, and fail over.
                self.shared.out_of_service[i].store(false, Ordering::SeqCst);
                self.note(format!(
                    "Envoy {name}: left the Service, in-flight calls done after {drained:?}, counters read, SIGKILL, down for {:?} (connections refused)",
                    f.down
                ));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.envoys[i].restart())?;
                self.note(format!("Envoy {name}: restarted (empty shared data)"));
            }
            FaultKind::ControlRestart(i) => {
                self.mesh.read_control(i).await?;
                tokio::task::block_in_place(|| self.mesh.controls[i].kill());
                self.note(format!("control {}: counters read, SIGKILL, down for {:?}", i + 1, f.down));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.controls[i].restart())?;
                self.note(format!("control {}: restarted", i + 1));
            }
            FaultKind::RedisRestart => {
                let before = self.mesh.redis_keys()?;
                tokio::task::block_in_place(|| self.mesh.redis.kill());
                self.note(format!("redis: {before} keys, SIGKILL, down for {:?}", f.down));
                tokio::time::sleep(f.down).await;
                tokio::task::block_in_place(|| self.mesh.redis.restart())?;
                let after = self.mesh.redis_keys()?;
                self.log.redis_keys.push((before, after));
                let bases: Vec<String> = self.mesh.controls.iter().map(|c| c.base_url()).collect();
                let ready = poll_until("both controls ready after the Redis restart", Duration::from_secs(15), || {
                    let bases = bases.clone();
                    async move {
                        for b in &bases {
                            match reqwest::get(format!("{b}/readyz")).await {
                                Ok(r) if r.status().is_success() => {}
                                _ => return false,
                            }
                        }
                        true
                    }
                })
                .await?;
                self.note(format!("redis: restarted from its append-only file with {after} keys; controls ready after {ready:?}"));
            }
        }
        *self.log.counts.entry(fault_label(f.kind)).or_default() += 1;
        Ok(())
    }

    /// Waits until every session has answered through each Envoy since `since`, and every
    /// call in flight at `since` has finished (so no recovery the fault caused is still
    /// running when the next fault starts).
    pub async fn settle(&mut self, since: Micros, what: &str) {
        let slots = self.slots;
        let r = poll_until(&format!("settle after {what}"), SETTLE_TIMEOUT, || async move {
            slots.iter().all(|s| {
                s.last_ok.iter().all(|t| t.load(Ordering::Relaxed) > since) && s.lane_done.iter().all(|t| t.load(Ordering::Relaxed) > since)
            })
        })
        .await;
        match r {
            Ok(d) => self.log.max_settle = self.log.max_settle.max(d),
            Err(e) => {
                let behind: Vec<usize> =
                    slots.iter().filter(|s| s.last_ok.iter().chain(&s.lane_done).any(|t| t.load(Ordering::Relaxed) <= since)).map(|s| s.index).collect();
                let line = format!("{e:#}; slots without a success through both Envoys (or with a call in flight) since: {behind:?}");
                self.note(format!("SETTLE TIMEOUT: {line}"));
                self.log.settle_timeouts.push(line);
            }
        }
    }
}
