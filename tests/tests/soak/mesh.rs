//! The processes under test: three demo pods, Redis (append-only file), two control
//! instances and the Envoys (A and B for the raw lanes, C for the TypeScript SDK's),
//! started as deployed; and the counters read from them, summed over their restarts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use mcp_affinity_harness::fixtures::control::{ControlService, TEST_TOKEN};
use mcp_affinity_harness::fixtures::mesh::{Pod, Proxy, ProxyOptions};
use mcp_affinity_harness::fixtures::redis::RedisServer;
use serde_json::Value;

/// The Envoys the raw lanes alternate between, as the report names them.
pub const ENVOY_NAMES: [&str; 2] = ["A", "B"];
/// The demo pods, as their `whoami` answers name them.
pub const POD_NAMES: [&str; 3] = ["pod-0", "pod-1", "pod-2"];

/// Counters read from processes that restart (they count from 0 again after a restart):
/// read before each restart and at the end, summed.
#[derive(Debug, Default, Clone)]
pub struct Counters(BTreeMap<String, f64>);

impl Counters {
    pub fn add(&mut self, k: &str, v: f64) {
        *self.0.entry(k.to_string()).or_default() += v;
    }
    pub fn get(&self, k: &str) -> f64 {
        self.0.get(k).copied().unwrap_or(0.0)
    }
}

const FILTER_COUNTERS: &[&str] = &[
    "recoveries_replayed",
    "recoveries_not_replayed",
    "recoveries_failed",
    "sessions_verified",
    "unknown_session",
    "requests_unpinned",
    "control_lookups",
    "control_errors",
    "recovery_body_too_large",
    "tasks_pinned",
    "tasks_routed",
    "tasks_unpinned",
    "tasks_lost",
];

/// `(name, metric suffix, labels)` of control metrics summed over restarts.
const CONTROL_COUNTERS: &[(&str, &str, &str)] = &[
    ("reinitializations", "reinitializations_total", ""),
    ("recoveries replayed", "recoveries_total", "outcome=\"replayed\""),
    ("recoveries not_replayed", "recoveries_total", "outcome=\"not_replayed\""),
    ("recoveries failed", "recoveries_total", "outcome=\"failed\""),
    ("recoveries alive", "recoveries_total", "outcome=\"alive\""),
    ("replays", "replays_total", ""),
];

/// The plugin configuration shipped in `envoy/envoy.yaml` (the soak runs the filter as
/// deployed: its control and recovery timeouts, not the fixtures' shorter ones), and the
/// environment variable it reads control's token from.
fn shipped_plugin_config() -> Result<(String, String)> {
    let path = mcp_affinity_harness::envoy::shipped_bootstrap();
    let config = mcp_affinity_harness::envoy::plugin_configuration(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("the wasm filter configuration in {}", path.display()))?;
    let json: Value = serde_json::from_str(&config).context("the shipped plugin configuration is JSON")?;
    let token_env = json
        .pointer("/control/token_env")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("the shipped plugin configuration has no control.token_env: {json}"))?
        .to_string();
    Ok((config, token_env))
}

pub struct Mesh {
    pub pods: Vec<Pod>,
    pub redis: RedisServer,
    pub redis_dir: PathBuf,
    pub controls: Vec<ControlService>,
    pub envoys: Vec<Proxy>,
    /// Envoy C: the TypeScript SDK lanes' (never restarted: the SDK's client fails over to
    /// no other Envoy), paired with control 1.
    pub ts_envoy: Proxy,
    pub filter: [Counters; 2],
    pub control: [Counters; 2],
}

impl Mesh {
    pub fn start() -> Result<Mesh> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let redis_dir = std::env::temp_dir().join(format!("mcp-affinity-soak-redis-{}-{nanos}", std::process::id()));
        let redis = RedisServer::start_persistent(&redis_dir).context("redis")?;
        // Dual-era pods: 2025 sessions and MCP 2026-07-28 tasks on one endpoint.
        let pods: Vec<Pod> = POD_NAMES.iter().map(|n| Pod::start_with(n, &["--era", "dual"])).collect::<Result<_>>().context("pods")?;
        let endpoints = pods.iter().map(|p| p.addr.to_string()).collect::<Vec<_>>().join(",");
        let controls = (0..2)
            .map(|_| ControlService::start_with(&redis.url(), &["--endpoints".into(), endpoints.clone()]))
            .collect::<Result<Vec<_>>>()
            .context("control")?;
        let upstreams: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
        let (filter_config, token_env) = shipped_plugin_config()?;
        let envoy = |c: &ControlService| {
            Proxy::start(
                &upstreams,
                ProxyOptions {
                    filter_config: filter_config.clone(),
                    clusters: vec![c.proxy_cluster()],
                    vm_env: vec![(token_env.clone(), TEST_TOKEN.into())],
                    concurrency: Some(2),
                    ..Default::default()
                },
            )
        };
        let envoys = controls.iter().map(envoy).collect::<Result<Vec<_>>>().context("envoy")?;
        let ts_envoy = envoy(&controls[0]).context("envoy C")?;
        Ok(Mesh { pods, redis, redis_dir, controls, envoys, ts_envoy, filter: Default::default(), control: Default::default() })
    }

    pub async fn read_filter(&mut self, i: usize) -> Result<()> {
        for name in FILTER_COUNTERS {
            let v = self.envoys[i].metric(name).await.with_context(|| format!("Envoy {} {name}", ENVOY_NAMES[i]))?;
            self.filter[i].add(name, v as f64);
        }
        Ok(())
    }

    pub async fn read_control(&mut self, i: usize) -> Result<()> {
        for (name, suffix, labels) in CONTROL_COUNTERS {
            let v = self.controls[i].metric(suffix, labels).await.with_context(|| format!("control {} {suffix}", i + 1))?;
            self.control[i].add(name, v);
        }
        Ok(())
    }

    pub async fn envoy_stat(&self, i: usize, name: &str) -> Result<i64> {
        let text = reqwest::get(format!("http://{}/stats?filter={name}", self.envoys[i].admin)).await?.text().await?;
        text.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().parse::<i64>()))
            .ok_or_else(|| anyhow!("no stat {name} in {text:?}"))?
            .context("stat value")
    }

    pub fn redis_keys(&self) -> Result<u64> {
        let reply = self.redis.command(&["DBSIZE"])?;
        reply.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("DBSIZE answered {reply:?}"))
    }
}
