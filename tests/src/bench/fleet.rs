//! Everything a run starts, each stopped by its pid when dropped: the two canned pods
//! (`mcp-affinity-bench-pod`, release), control (release; on its own `redis-server` with
//! `BENCH_CONTROL_STORE=redis`), an Envoy per config ([`Proxy`], `--concurrency 1`) and
//! HAProxy (`nbthread 1`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use super::configs::{self, Config, TOKEN_ENV, Wiring};
use super::sequential::Connection;
use super::settings::{Settings, Store};
use crate::fixtures::control::{ControlService, TEST_TOKEN};
use crate::fixtures::mesh::{Proxy, ProxyOptions};
use crate::fixtures::redis::RedisServer;
use crate::process::{Child, free_addr, profile_bin};

/// One measured instance: where to send requests, and the process whose CPU and memory
/// count (none for direct).
pub struct Instance {
    /// `http://ADDR/mcp`.
    pub url: String,
    /// The proxy's pid.
    pub pid: Option<u32>,
    /// Envoy's admin API.
    pub admin: Option<SocketAddr>,
    _proxy: Option<Proxy>,
    _haproxy: Option<Child>,
}

/// The pods, control, Redis and every proxy of the timed phases.
pub struct Fleet {
    /// What the Envoys are wired to.
    pub wiring: Wiring,
    /// The two canned pods (release), pod 1 and pod 2.
    pub pods: Vec<Child>,
    /// Control (release build).
    pub control: ControlService,
    /// Control's `redis-server` (`BENCH_CONTROL_STORE=redis`).
    pub redis: Option<RedisServer>,
    /// Every instance of the timed phases, direct included.
    pub instances: BTreeMap<Config, Instance>,
}

/// Options of every Envoy: one worker, control's token in its environment.
pub fn envoy_options() -> ProxyOptions {
    ProxyOptions { concurrency: Some(1), vm_env: vec![(TOKEN_ENV.into(), TEST_TOKEN.into())], ..Default::default() }
}

/// The wasm modules: mcp-affinity's and the empty filter's. Errors naming `make bench-envoy`.
pub fn modules() -> Result<(PathBuf, PathBuf)> {
    let dir = crate::envoy::workspace_root().join("target/wasm32-wasip1/wasm");
    let (wasm, empty) = (dir.join("mcp_affinity_filter.wasm"), dir.join("mcp_affinity_empty_filter.wasm"));
    for m in [&wasm, &empty] {
        ensure!(m.exists(), "{} is missing: run `make bench-envoy` (it builds everything)", m.display());
    }
    Ok((wasm, empty))
}

impl Fleet {
    /// Starts pods, Redis (when asked), control, then the Envoys of `envoys` and HAProxy
    /// for `haproxies`; waits until each is ready. `run_dir` holds HAProxy's configs and
    /// logs.
    pub fn start(s: &Settings, envoys: &[Config], haproxies: &[Config], run_dir: &Path) -> Result<Fleet> {
        let pod_bin = profile_bin("release", "mcp-affinity-bench-pod")?;
        let mut pods = Vec::new();
        let addrs = [free_addr(), free_addr()];
        for (i, addr) in addrs.iter().enumerate() {
            let mut cmd = Command::new(&pod_bin);
            cmd.args(["--listen", &addr.to_string(), "--id", &(i + 1).to_string()]);
            pods.push(Child::spawn_listening(&format!("pod-{}", i + 1), cmd, *addr)?);
        }
        let redis = match s.control_store {
            Store::Redis => Some(RedisServer::start().context("redis-server (`make setup-redis`)")?),
            Store::Memory => None,
        };
        let store = redis.as_ref().map_or_else(|| "memory".to_string(), |r| format!("{}/0", r.url().trim_end_matches('/')));
        let replay = free_addr();
        // Room for every session of the run: no eviction skews the memory numbers.
        let control = ControlService::start_binary(
            profile_bin("release", "mcp-affinity-control")?,
            &store,
            &[
                "--max-sessions".into(),
                (4 * s.scale + 2_000_000).to_string(),
                "--endpoints".into(),
                format!("{},{}", addrs[0], addrs[1]),
                "--replay-listen".into(),
                replay.to_string(),
            ],
        )?;
        let (wasm, empty_wasm) = modules()?;
        let wiring = Wiring { pods: addrs, control: control.addr, replay, wasm, empty_wasm, baseline_pods: s.baseline_pods };
        let mut fleet = Fleet { wiring, pods, control, redis, instances: BTreeMap::new() };
        for &cfg in envoys {
            let (bootstrap, render) = configs::render(cfg, &fleet.wiring, false).context("not an Envoy config")?;
            let proxy = Proxy::start_rendered(&bootstrap, &render, envoy_options()).with_context(|| format!("Envoy {}", cfg.label()))?;
            let instance = Instance { url: proxy.url(), pid: proxy.pid(), admin: Some(proxy.admin), _proxy: Some(proxy), _haproxy: None };
            fleet.instances.insert(cfg, instance);
        }
        for &cfg in haproxies {
            let child = haproxy(&fleet.wiring.pods, run_dir, cfg)?;
            let url = format!("http://{}/mcp", child.addr.context("haproxy address")?);
            fleet.instances.insert(cfg, Instance { url, pid: Some(child.pid()), admin: None, _proxy: None, _haproxy: Some(child) });
        }
        let direct = format!("http://{}/mcp", fleet.wiring.pods[0]);
        fleet.instances.insert(Config::Direct, Instance { url: direct, pid: None, admin: None, _proxy: None, _haproxy: None });
        Ok(fleet)
    }

    /// The instance of `cfg`. Panics when it was not started (a bug of the phase lists).
    pub fn get(&self, cfg: Config) -> &Instance {
        self.instances.get(&cfg).unwrap_or_else(|| panic!("{} was not started", cfg.label()))
    }

    /// Sessions the pods have issued so far (their `GET /sessions`, summed).
    pub fn pod_sessions(&self) -> Result<u64> {
        let mut total = 0;
        for addr in self.wiring.pods {
            let a = Connection::open(&format!("http://{addr}/"), Duration::from_secs(5))?.get("/sessions")?;
            total += a.body.trim().parse::<u64>().with_context(|| format!("pod {addr} /sessions: {:?}", a.body))?;
        }
        Ok(total)
    }
}

/// Starts HAProxy for `cfg` over both pods: session affinity the HAProxy way (learn
/// `Mcp-Session-Id` from the response to initialize, route every request carrying it to the
/// server that issued it), one thread as Envoy. Config and log in `run_dir`.
fn haproxy(pods: &[SocketAddr; 2], run_dir: &Path, cfg: Config) -> Result<Child> {
    let addr = free_addr();
    let name = if cfg == Config::Haproxy { "haproxy" } else { "haproxy-2nd" };
    let path = run_dir.join(format!("{name}.cfg"));
    let text = format!(
        "global\n    nbthread 1\n    maxconn 4096\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout http-keep-alive 60s\n\
         frontend mcp\n    bind {addr}\n    default_backend pods\nbackend pods\n    balance roundrobin\n    stick-table type string len 128 size 4m expire 2h\n\
         \x20   stick match req.hdr(mcp-session-id)\n    stick store-response res.hdr(mcp-session-id)\n    server pod-1 {}\n    server pod-2 {}\n",
        pods[0], pods[1]
    );
    std::fs::write(&path, text)?;
    let check = Command::new("haproxy").args(["-c", "-q", "-f"]).arg(&path).status().context("run haproxy")?;
    ensure!(check.success(), "haproxy rejected {}", path.display());
    let log = std::fs::File::create(run_dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&path).stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
    Child::spawn_listening(name, cmd, addr)
}
