//! The MCP 2026-07-28 era beside the 2025 sessions on the same endpoint: task lanes create
//! tasks (`tools/call` of the dual-era pods' `slow_task`, declaring the tasks extension)
//! through Envoy A or B and poll them (`tasks/get`, routed by `Mcp-Name`) until they end,
//! failing over between the Envoys as a client of a Service over both does. A task must
//! complete; the excuses are a pod's death during the task's life (its tasks die with it:
//! "unknown task" -32602, or a call cut). An Envoy's restart or a control or Redis fault is
//! no excuse: the task's pin is written through to control and read back.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mcp_affinity_harness::era2026_client::{self, Error, INVALID_PARAMS, ToolAnswer};
use serde_json::json;

use crate::client::{FAILOVER_DEADLINE, Shared, secs};
use crate::schedule::Rng;

/// Longest a task is polled before the lane gives up on it (a failure).
const TASK_DEADLINE: Duration = Duration::from_secs(60);

/// What the task lanes counted.
#[derive(Debug, Default)]
pub struct TaskTally {
    pub created: u64,
    pub completed: u64,
    /// Tasks whose pod died during their life: answered "unknown task" (excused).
    pub lost_with_their_pod: u64,
    /// Calls cut while a pod died (excused).
    pub cut_while_a_pod_died: u64,
    pub failures: Vec<String>,
}

impl TaskTally {
    pub fn merge(&mut self, o: TaskTally) {
        self.created += o.created;
        self.completed += o.completed;
        self.lost_with_their_pod += o.lost_with_their_pod;
        self.cut_while_a_pod_died += o.cut_while_a_pod_died;
        self.failures.extend(o.failures);
    }
}

/// `call(url)` through Envoy `envoy`, counted in flight for the chaos driver; an Envoy that
/// left the Service, or that does not answer at all (stopped), is left for the other one,
/// back and forth up to [`FAILOVER_DEADLINE`]. The Envoy that answered, and its answer.
async fn failover<T, F, Fut>(shared: &Shared, mut envoy: usize, call: F) -> (usize, Result<T, Error>)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    loop {
        match shared.through_gate(envoy, call(shared.urls[envoy].clone())).await {
            Some(Err(Error::Transport(_))) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            None => tokio::time::sleep(Duration::from_millis(5)).await,
            Some(answer) => return (envoy, answer),
        }
        envoy = 1 - envoy;
    }
}

/// One task lane (`index`): tasks of 100–700 ms, one after another, until the soak stops.
pub async fn run_task_lane(shared: Arc<Shared>, index: usize, mut rng: Rng) -> TaskTally {
    let mut t = TaskTally::default();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let start = shared.now();
        let ms = 100 + rng.below(600);
        let (envoy, created) = failover(&shared, index % 2, |url| async move { era2026_client::call_tool_as_task(&url, "slow_task", json!({"ms": ms})).await }).await;
        let task = match created {
            Ok(ToolAnswer::Task(task)) => task,
            Ok(other) => {
                t.failures.push(format!("task{index}-{n}: tools/call answered no task: {other:?}"));
                continue;
            }
            Err(e) => {
                t.excuse_or_fail(&shared, start, format!("task{index}-{n}: tools/call: {e}"));
                continue;
            }
        };
        t.created += 1;
        let id = task.task_id;
        let poll = Duration::from_millis(task.poll_interval_ms.unwrap_or(100).clamp(20, 500));
        let begun = Instant::now();
        loop {
            tokio::time::sleep(poll).await;
            let (_, state) = failover(&shared, envoy, |url| {
                let id = id.clone();
                async move { era2026_client::get_task(&url, &id).await }
            })
            .await;
            match state {
                Ok(s) if s.status == "completed" => {
                    t.completed += 1;
                    break;
                }
                Ok(s) if s.is_terminal() => {
                    t.failures.push(format!("task{index}-{n} {id}: ended {}", s.status));
                    break;
                }
                Ok(_) if begun.elapsed() < TASK_DEADLINE => {}
                Ok(s) => {
                    t.failures.push(format!("task{index}-{n} {id}: still {} after {TASK_DEADLINE:?}", s.status));
                    break;
                }
                Err(e) if e.rpc_code() == Some(INVALID_PARAMS) && shared.pod_fault_during(None, start, shared.now()) => {
                    t.lost_with_their_pod += 1;
                    break;
                }
                Err(e) => {
                    t.excuse_or_fail(&shared, start, format!("task{index}-{n} {id}: tasks/get [{}..{}]: {e}", secs(start), secs(shared.now())));
                    break;
                }
            }
        }
    }
    t
}

impl TaskTally {
    /// A call that failed otherwise than with an answer: excused when a pod died meanwhile.
    fn excuse_or_fail(&mut self, shared: &Shared, start: u64, failure: String) {
        if shared.pod_fault_during(None, start, shared.now()) {
            self.cut_while_a_pod_died += 1;
        } else {
            self.failures.push(failure);
        }
    }
}
