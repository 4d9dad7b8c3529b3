//! The `mcp-affinity-control` binary: `--help`, refusing to start without a token, and
//! graceful shutdown on SIGTERM.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-affinity-control");

fn clean_command() -> Command {
    let mut cmd = Command::new(BIN);
    // The environment of the test run must not configure the binary.
    for (key, _) in std::env::vars() {
        if key.starts_with("MCP_AFFINITY_CONTROL_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn help_names_every_flag_and_its_environment_variable() {
    let out = clean_command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen", "--store", "--redis-key-prefix", "--redis-timeout-ms", "--session-ttl-secs",
        "--max-sessions", "--max-body-bytes", "--max-in-flight", "--log-format", "--token-file", "--token", "--insecure-no-auth",
        "--endpoints-refresh-secs", "--drain-ttl-secs", "--drain-from-endpointslices", "--replay-listen",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    for env in [
        "MCP_AFFINITY_CONTROL_LISTEN", "MCP_AFFINITY_CONTROL_STORE", "MCP_AFFINITY_CONTROL_TOKEN_FILE",
        "MCP_AFFINITY_CONTROL_TOKEN", "MCP_AFFINITY_CONTROL_SESSION_TTL_SECS", "MCP_AFFINITY_CONTROL_DRAIN_TTL_SECS",
        "MCP_AFFINITY_CONTROL_ENDPOINTS_REFRESH_SECS", "MCP_AFFINITY_CONTROL_REPLAY_LISTEN",
    ] {
        assert!(help.contains(env), "--help lacks {env}:\n{help}");
    }
    for words in ["[default: 127.0.0.1:9901]", "[default: memory]", "redis://", "least-recently-seen", "ps"] {
        assert!(help.contains(words), "--help lacks {words:?}:\n{help}");
    }
}

#[test]
fn refuses_to_start_without_a_token() {
    let out = clean_command().args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no API token configured") && err.contains("--insecure-no-auth"), "{err}");
}

/// Without the cargo feature `kube` (the default build), the EndpointSlice drain source
/// is refused at start with a clear error instead of being silently ignored.
#[cfg(not(feature = "kube"))]
#[test]
fn endpointslices_need_the_kube_feature() {
    let out = clean_command()
        .args(["--listen", "127.0.0.1:0", "--insecure-no-auth", "--drain-from-endpointslices", "mcp/mcp-server-headless"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cargo feature `kube`"), "{err}");
}

#[test]
fn sigterm_stops_gracefully() {
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let token_file = std::env::temp_dir().join(format!("mcp-affinity-control-cli-{}", std::process::id()));
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let mut child = clean_command()
        .args(["--listen", &addr.to_string(), "--log-format", "json", "--token-file"])
        .arg(&token_file)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "exited before listening");
        assert!(Instant::now() < deadline, "did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    std::fs::remove_file(&token_file).unwrap();
    assert!(out.status.success(), "exit status after SIGTERM: {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "SIGTERM: shutting down"), "{logs}");
    assert!(!logs.contains("t0ken"), "the token must never be logged");
}
