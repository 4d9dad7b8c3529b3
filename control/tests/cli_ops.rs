//! The operator commands of the `mcp-affinity-control` binary (`status`, `sessions get`,
//! `drain`, `undrain`) against the real service run in-process on a free loopback port:
//! their output and exit codes, the errors included (wrong or missing token, control
//! down, unknown session, upstream not draining or invalid, store unavailable).

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mcp_affinity_control::api::{AppState, router};
use mcp_affinity_control::auth::Auth;
use mcp_affinity_control::config::Config;
use mcp_affinity_control::metrics::Metrics;
use mcp_affinity_control::recover::endpoints::EndpointSource;
use mcp_affinity_control::recover::{Recovery, RecoverySettings};
use mcp_affinity_control::store::SessionStore;
use mcp_affinity_control::store::memory::MemoryStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-affinity-control");
const TOKEN: &str = "t0ken";

/// A control service serving in this process until dropped.
struct Control {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Control {
    /// `mcp_affinity_control::serve` with token [`TOKEN`] and `extra` flags.
    async fn serve(extra: &[&str]) -> Control {
        let args = ["mcp-affinity-control", "--token", TOKEN].iter().chain(extra).copied();
        let config = Config::try_parse_from(args).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            mcp_affinity_control::serve(config, listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Control { addr, _stop: stop }
    }

    /// The real router over `store`, which the test keeps (to count drain-moves).
    async fn over(store: Arc<MemoryStore>) -> Control {
        let settings = RecoverySettings {
            endpoints: EndpointSource::Static(Vec::new()),
            replay_safe_methods: Default::default(),
            timeout: Duration::from_secs(1),
            max_response_bytes: 1024,
        };
        let state = AppState { store, metrics: Arc::new(Metrics::new()), recovery: Arc::new(Recovery::new(settings).unwrap()) };
        let app = router(state, Auth::token(TOKEN), 1 << 20, 64);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Control { addr, _stop: stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The binary without the test run's `MCP_AFFINITY_CONTROL_*` environment.
fn command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("MCP_AFFINITY_CONTROL_") {
            cmd.env_remove(key);
        }
    }
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `args` against `control` with the token in the environment.
async fn run(control: &Control, args: &[&str]) -> Output {
    command().args(args).env("MCP_AFFINITY_CONTROL_URL", control.url()).env("MCP_AFFINITY_CONTROL_TOKEN", TOKEN).output().await.unwrap()
}

fn text(out: &Output) -> (i32, String, String) {
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts exit `code` and one `error: …` line on stderr containing `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let (got, stdout, stderr) = text(out);
    assert_eq!(got, code, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{needle:?} expected:\n{stderr}");
}

async fn put_session(control: &Control, id: &str, upstream: &str) {
    let body = serde_json::json!({
        "upstream": upstream,
        "initialize": r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"ops-test","version":"0.1"}}}"#,
        "protocol_version": "2025-06-18",
    });
    let r = reqwest::Client::new()
        .put(format!("{}/v1/sessions/{id}", control.url()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_health_store_metrics_and_drains() {
    let control = Control::serve(&[]).await;
    let (code, out, err) = text(&run(&control, &["status"]).await);
    assert_eq!(code, 0, "{out}{err}");
    for line in [&format!("control     {}: up", control.url()) as &str, "store       ready", "records     0 (memory store", "recoveries  replayed 0", "draining    none"] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    let (code, out, _) = text(&run(&control, &["drain", "10.0.0.7:8080", "--wait", "0"]).await);
    assert_eq!((code, out.as_str()), (0, "10.0.0.7:8080: draining (sessions move to other pods at their next request)\n"));
    let (code, out, err) = text(&run(&control, &["status"]).await);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("draining    1 upstream\n  10.0.0.7:8080  source admin  for ") && out.contains("moved 0  failed 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_and_control_down() {
    let control = Control::serve(&[]).await;
    for args in [&["status"][..], &["sessions", "get", "s1"], &["drain", "10.0.0.7:8080"], &["undrain", "10.0.0.7:8080"]] {
        let out = command().args(args).env("MCP_AFFINITY_CONTROL_URL", control.url()).env("MCP_AFFINITY_CONTROL_TOKEN", "wrong").output().await.unwrap();
        assert_fails(&out, 4, "control refused the token (401 unauthorized)");
        let out = command().args(args).args(["--url", &control.url()]).output().await.unwrap();
        assert_fails(&out, 4, "no token given; pass --token-file PATH or set MCP_AFFINITY_CONTROL_TOKEN");
    }
    // Nothing listens on this port.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for args in [&["status"][..], &["sessions", "get", "s1"], &["drain", "10.0.0.7:8080"], &["undrain", "10.0.0.7:8080"]] {
        let out = command().args(args).args(["--url", &format!("http://{down}")]).env("MCP_AFFINITY_CONTROL_TOKEN", TOKEN).output().await.unwrap();
        assert_fails(&out, 3, &format!("control at http://{down} is not reachable: Connection refused"));
    }
    // A URL that is not one.
    let out = command().args(["status", "--url", "not a url"]).output().await.unwrap();
    assert_fails(&out, 2, "invalid --url");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_and_environment_select_control_and_token() {
    let control = Control::serve(&[]).await;
    let token_file = std::env::temp_dir().join(format!("mcp-affinity-cli-ops-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // --token-file after the subcommand, and before it; --url given as a flag.
    let out = command().args(["status", "--url", &control.url(), "--token-file"]).arg(&token_file).output().await.unwrap();
    assert_eq!(text(&out).0, 0, "{:?}", text(&out));
    let out = command().arg("--token-file").arg(&token_file).args(["status", "--url", &control.url()]).output().await.unwrap();
    assert_eq!(text(&out).0, 0, "{:?}", text(&out));
    // No --url: the address of --listen (MCP_AFFINITY_CONTROL_LISTEN), as control's own container has it.
    let out = command().arg("status").env("MCP_AFFINITY_CONTROL_LISTEN", control.addr.to_string()).env("MCP_AFFINITY_CONTROL_TOKEN_FILE", &token_file).output().await.unwrap();
    assert_eq!(text(&out).0, 0, "{:?}", text(&out));
    assert!(text(&out).1.contains(&format!("control     {}: up", control.url())), "{:?}", text(&out));
    let out = command().args(["status", "--token-file", "/nonexistent/token", "--url", &control.url()]).output().await.unwrap();
    assert_fails(&out, 2, "cannot read token file /nonexistent/token");
    std::fs::remove_file(&token_file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_get_prints_the_record_or_says_it_is_unknown() {
    let control = Control::serve(&[]).await;
    put_session(&control, "s-1", "10.0.0.7:8080").await;
    let (code, out, err) = text(&run(&control, &["sessions", "get", "s-1"]).await);
    assert_eq!(code, 0, "{out}{err}");
    for line in ["session         s-1\n", "upstream        10.0.0.7:8080\n", "generation      1\n", "protocol        2025-06-18\n", "client          ops-test 0.1 (initialize: ", "initialized     no\n", "created         20"] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    assert!(!out.contains("capabilities"), "the initialize body is summarised, not printed:\n{out}");
    let (code, out, _) = text(&run(&control, &["sessions", "get", "s-1", "--json"]).await);
    assert_eq!(code, 0);
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((record["session_id"].as_str(), record["generation"].as_u64()), (Some("s-1"), Some(1)));
    // Ids with characters a path must encode.
    put_session(&control, "a%2Fb", "10.0.0.8:8080").await;
    let (code, out, _) = text(&run(&control, &["sessions", "get", "a/b"]).await);
    assert!(code == 0 && out.contains("upstream        10.0.0.8:8080"), "{out}");
    assert_fails(&run(&control, &["sessions", "get", "nobody"]).await, 5, r#"no session "nobody""#);
    assert_fails(&run(&control, &["sessions", "get", ""]).await, 2, "the session id is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_undrain_answers_and_errors() {
    let control = Control::serve(&[]).await;
    let (code, out, _) = text(&run(&control, &["drain", "10.0.0.7:8080", "--wait", "0"]).await);
    assert_eq!((code, out.as_str()), (0, "10.0.0.7:8080: draining (sessions move to other pods at their next request)\n"));
    // Idempotent; a percent-encoded or an IPv6 address works too.
    let (code, out, _) = text(&run(&control, &["drain", "10.0.0.7:8080", "--wait", "0"]).await);
    assert!(code == 0 && out.starts_with("10.0.0.7:8080: already draining (source admin, for ") && out.ends_with("moved 0, failed 0\n"), "{out}");
    let (code, out, _) = text(&run(&control, &["drain", "[fd00:0::7]:80", "--wait", "0"]).await);
    assert_eq!((code, out.as_str()), (0, "[fd00::7]:80: draining (sessions move to other pods at their next request)\n"));
    let (code, out, _) = text(&run(&control, &["undrain", "10.0.0.7:8080"]).await);
    assert!(code == 0 && out.starts_with("10.0.0.7:8080: undrained after ") && out.ends_with("(moved 0, failed 0)\n"), "{out}");
    let (code, out, _) = text(&run(&control, &["undrain", "[fd00::7]:80"]).await);
    assert!(code == 0 && out.starts_with("[fd00::7]:80: undrained after "), "{out}");
    assert_fails(&run(&control, &["undrain", "10.0.0.7:8080"]).await, 5, "upstream 10.0.0.7:8080 is not draining");
    assert_fails(&run(&control, &["drain", "pod-7", "--wait", "0"]).await, 2, r#"invalid upstream "pod-7": expected ip:port"#);
    assert_fails(&run(&control, &["undrain", "10.0.0.7"]).await, 2, r#"invalid upstream "10.0.0.7""#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_shows_progress_and_settles() {
    let store = Arc::new(MemoryStore::new(Duration::from_secs(60), 10));
    let control = Control::over(store.clone()).await;
    let upstream: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    let cli = run(&control, &["drain", "10.0.0.9:8080", "--wait", "60", "--settle", "2"]);
    let moves = async {
        // Until the command has drained the upstream, then two sessions move and one fails.
        while store.draining().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for moved in [true, true, false] {
            tokio::time::sleep(Duration::from_millis(700)).await;
            store.record_drain_move(upstream, moved).await.unwrap().unwrap();
        }
    };
    let (out, ()) = tokio::join!(cli, moves);
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "10.0.0.9:8080: draining (sessions move to other pods at their next request)", "{out}");
    for progress in ["  moved 1, failed 0, last move ", "  moved 2, failed 0, last move ", "  moved 2, failed 1, last move "] {
        assert!(lines.iter().any(|l| l.starts_with(progress)), "{progress:?} missing:\n{out}");
    }
    let last = lines.last().unwrap();
    assert!(last.starts_with("10.0.0.9:8080: settled, no move for 2s: moved 2, failed 1, last move "), "{out}");
}

/// A pod's preStop hook: the drain settles only once the upstream's MCP 2026-07-28 tasks
/// ended (seen terminal), however long no session moved; until then `--wait` runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_the_upstream_s_unfinished_tasks() {
    let store = Arc::new(MemoryStore::new(Duration::from_secs(60), 10));
    let control = Control::over(store.clone()).await;
    store.put_task("t1", "10.0.0.9:8080", Duration::from_secs(60), false).await.unwrap();
    store.put_task("t2", "10.0.0.8:8080", Duration::from_secs(60), false).await.unwrap();
    let (code, out, _) = text(&run(&control, &["drain", "10.0.0.9:8080", "--wait", "2", "--settle", "1"]).await);
    assert_eq!(code, 6, "a task left: {out}");
    assert!(out.ends_with("10.0.0.9:8080: not settled within --wait 2s: moved 0, failed 0, unfinished tasks 1\n"), "{out}");
    let cli = run(&control, &["drain", "10.0.0.9:8080", "--wait", "60", "--settle", "1"]);
    let ends = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        store.put_task("t1", "10.0.0.9:8080", Duration::from_secs(60), true).await.unwrap();
    };
    let (out, ()) = tokio::join!(cli, ends);
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.lines().any(|l| l == "  moved 0, failed 0"), "the task's end is progress: {out}");
    assert!(out.ends_with("10.0.0.9:8080: settled, no move for 1s: moved 0, failed 0\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_waiting_when_undrained_or_when_the_wait_ends() {
    let store = Arc::new(MemoryStore::new(Duration::from_secs(60), 10));
    let control = Control::over(store.clone()).await;
    // --wait shorter than --settle: exit 6.
    let (code, out, _) = text(&run(&control, &["drain", "10.0.0.9:8080", "--wait", "1", "--settle", "30"]).await);
    assert_eq!(code, 6, "{out}");
    assert!(out.ends_with("10.0.0.9:8080: not settled within --wait 1s: moved 0, failed 0\n"), "{out}");
    // Undrained while watched: exit 0.
    let upstream: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    let cli = run(&control, &["drain", "10.0.0.9:8080", "--wait", "60", "--settle", "30"]);
    let undrain = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(store.undrain(upstream).await.unwrap());
    };
    let (out, ()) = tokio::join!(cli, undrain);
    let (code, out, err) = text(&out);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("10.0.0.9:8080: already draining (source admin"), "{out}");
    assert!(out.ends_with("10.0.0.9:8080: no longer draining (undrained, or the drain expired): moved 0, failed 0\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_watching_while_control_is_away() {
    let store = Arc::new(MemoryStore::new(Duration::from_secs(60), 10));
    let control = Control::over(store.clone()).await;
    let child = command()
        .args(["drain", "10.0.0.9:8080", "--wait", "3", "--settle", "30"])
        .env("MCP_AFFINITY_CONTROL_URL", control.url())
        .env("MCP_AFFINITY_CONTROL_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let Control { addr, _stop: stop } = control;
    let cli = async { child.wait_with_output().await.unwrap() };
    let away = async move {
        while store.draining().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        drop(stop);
    };
    let (out, ()) = tokio::join!(cli, away);
    let (code, out, err) = text(&out);
    assert_eq!(code, 6, "{out}{err}");
    assert!(out.contains(&format!("  cannot read the draining list (control at http://{addr} is not reachable: ")), "{out}");
    assert_eq!(out.matches("retrying").count(), 1, "said once:\n{out}");
    assert!(out.ends_with("10.0.0.9:8080: not settled within --wait 3s: control did not answer\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_the_commands_and_they_need_their_arguments() {
    let out = command().arg("--help").output().await.unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for words in ["status", "sessions", "drain", "undrain", "Usage: mcp-affinity-control [OPTIONS] [COMMAND]"] {
        assert!(help.contains(words), "{words:?} missing:\n{help}");
    }
    let out = command().args(["drain", "--help"]).output().await.unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for words in ["--wait", "--settle", "--url", "MCP_AFFINITY_CONTROL_URL", "--token-file", "[default: 120]", "[default: 10]"] {
        assert!(help.contains(words), "{words:?} missing:\n{help}");
    }
    for args in [&["sessions"][..], &["sessions", "get"], &["drain"], &["undrain"], &["drain", "10.0.0.1:1", "--settle", "0"]] {
        let out = command().args(args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_when_the_store_is_unreachable() {
    // Redis on a port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let control = Control::serve(&["--store", &format!("redis://{closed}/0"), "--redis-timeout-ms", "300"]).await;
    let (code, out, err) = text(&run(&control, &["status"]).await);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("store       NOT READY: ") && out.contains("(store_unavailable)"), "{out}");
    assert!(out.contains("draining    unknown (control answered 503 store_unavailable"), "{out}");
    assert!(out.contains("errors      1 answers 5xx, 1 store operations failed"), "{out}");
    assert_fails(&run(&control, &["sessions", "get", "s1"]).await, 1, "control answered 503 store_unavailable");
}
