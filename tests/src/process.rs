//! Processes started by tests: free loopback ports, readiness checks, and a guard that
//! stops the process by its pid when dropped.
//!
//! Every fixture (Redis, demo MCP pods, Envoy, control) is a [`Child`] owned by the test;
//! nothing outlives it. Readiness is observed (a TCP connect succeeds, or an HTTP probe
//! answers), never assumed from a sleep.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1, found by binding port 0 and releasing it.
///
/// The port is free at the time of the call, and never handed out twice by this process
/// (tests of one binary run in parallel threads, and the kernel may give a just-released
/// port again). A fixture that binds it later can still lose a race with another process,
/// which [`Child::spawn_listening`] reports as a start failure.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Hold every candidate until a new one comes up, so the kernel cannot repeat itself.
    let mut held = Vec::new();
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
        held.push(l);
        assert!(held.len() < 1000, "no new free port");
    }
}

/// A free loopback address, `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Path of a binary of this workspace, next to the running test executable
/// (`target/<profile>/<name>`). Cargo builds every binary of the workspace before it runs
/// the tests of `cargo test --workspace`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace first (`cargo build --workspace`)",
        path.display()
    );
    path
}

/// Path of a binary of this workspace built with `profile` (`release`, `debug`):
/// `<workspace>/target/<profile>/<name>`. Errors, saying what builds it, when absent.
pub fn profile_bin(profile: &str, name: &str) -> Result<PathBuf> {
    let path = crate::envoy::workspace_root().join("target").join(profile).join(name);
    if !path.exists() {
        let flag = if profile == "debug" { String::new() } else { format!("--profile {profile} ") };
        bail!("{} not found: build it (`cargo build {flag}--bin {name}`, or the make target that uses it)", path.display());
    }
    Ok(path)
}

/// Path of the filter's wasm module. `MCP_AFFINITY_WASM` overrides the default
/// `target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm` (built by `make wasm`).
pub fn filter_wasm() -> PathBuf {
    if let Ok(p) = std::env::var("MCP_AFFINITY_WASM") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm");
    assert!(
        path.exists(),
        "{} not found: run `make wasm` (cargo build -p mcp-affinity-filter --target wasm32-wasip1 --profile wasm)",
        path.display()
    );
    path
}

/// A child process that is killed (SIGKILL, by pid) and reaped when dropped.
pub struct Child {
    name: String,
    child: std::process::Child,
    /// The address the process listens on, when it is a server.
    pub addr: Option<SocketAddr>,
}

impl Child {
    /// Starts `cmd` and waits until a TCP connect to `addr` succeeds (up to 60 s, polling
    /// every 20 ms). Fails if the process exits first or never listens. Output is
    /// inherited so a failing test shows the process's logs.
    pub fn spawn_listening(name: &str, mut cmd: Command, addr: SocketAddr) -> Result<Self> {
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        let mut me = Child { name: name.to_string(), child, addr: Some(addr) };
        me.wait_listening(addr)?;
        Ok(me)
    }

    /// Starts `cmd` without waiting for anything.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        Ok(Child { name: name.to_string(), child, addr: None })
    }

    fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before listening on {addr}: {status}", self.name);
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr} within 60 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and waits until it is gone, so its port is closed when
    /// this returns.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit (graceful shutdown).
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
