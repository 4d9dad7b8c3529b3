//! Control's status page (`GET /status`, issue 26 item 4) in a real headless Chromium,
//! during a real scenario: 3 demo pods, control (memory store, a read-only status token)
//! and Envoy (`--concurrency 2`) running the filter. Sessions are opened on every pod, one
//! pod is killed (its sessions are recovered at their next request), another is drained
//! (some of its sessions move, the others stay idle on it). Chromium then opens the page
//! with the read-only token, and the test checks what it shows: each upstream's live
//! sessions as the test counted them, the drain with its moved count, the recoveries with
//! their outcome, the store's health. The screenshot goes to `target/status-page.png`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mcp_affinity_harness::chromium;
use mcp_affinity_harness::fixtures::control::TEST_TOKEN;
use mcp_affinity_harness::fixtures::deployment::{Bootstrap, Deployment};
use mcp_affinity_harness::mcp_client::{self, Session};

/// The read-only token of the status page (`--status-token-file`).
const STATUS_TOKEN: &str = "status-read-only-token-42";

/// Upper bound of one wait (a bug shows as a failure, not a hang).
const WAIT: Duration = Duration::from_secs(60);

/// Sessions per pod before anything fails.
const PER_POD: usize = 2;

/// Opens sessions through `d`'s Envoy until every pod holds at least [`PER_POD`]; the
/// sessions by the pod that answered (Envoy round-robins per worker, so 100 are plenty).
async fn sessions_on_every_pod(d: &Deployment) -> BTreeMap<String, Vec<Session>> {
    let mut on: BTreeMap<String, Vec<Session>> = d.pods.iter().map(|p| (p.name.clone(), Vec::new())).collect();
    for _ in 0..100 {
        if on.values().all(|s| s.len() >= PER_POD) {
            return on;
        }
        let s = mcp_client::connect(&d.proxy.url()).await.unwrap();
        on.get_mut(&s.whoami().await.unwrap()).expect("a known pod").push(s);
    }
    panic!(
        "100 sessions did not put {PER_POD} on every pod: {:?}",
        on.iter().map(|(p, s)| (p, s.len())).collect::<Vec<_>>()
    );
}

/// Sends `whoami` on `s` until a pod other than `pod` answers it (the filter moves a
/// session off a draining pod once it polled the draining list); that pod.
async fn until_off(s: &Session, pod: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = s.whoami_keeping_id().await;
        if now != pod {
            return now;
        }
        assert!(Instant::now() < deadline, "a session did not move off draining {pod}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` on control with `token` as bearer (and no redirects followed): the status.
async fn status_of(d: &Deployment, method: reqwest::Method, path: &str, token: Option<&str>) -> u16 {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut r = client.request(method, format!("{}{path}", d.control.base_url()));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().status().as_u16()
}

/// `GET /v1/status` with the read-only token.
async fn report(d: &Deployment) -> serde_json::Value {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/status", d.control.base_url()))
        .bearer_auth(STATUS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The `<tr>` of `upstream` in the page's DOM.
fn upstream_row<'a>(dom: &'a str, upstream: SocketAddr) -> &'a str {
    let start = dom
        .find(&format!("data-upstream=\"{upstream}\""))
        .unwrap_or_else(|| panic!("no row of {upstream} in the page:\n{dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// The recovery rows of the page's DOM with outcome `outcome`.
fn recovery_rows<'a>(dom: &'a str, outcome: &str) -> Vec<&'a str> {
    let marker = format!("<tr class=\"recovery\" data-outcome=\"{outcome}\">");
    dom.match_indices(&marker)
        .map(|(i, _)| &dom[i..dom[i..].find("</tr>").map_or(dom.len(), |e| i + e)])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_sessions_drains_and_recoveries_in_chromium() {
    chromium::binary().unwrap();
    let token_file = std::env::temp_dir().join(format!("mcp-affinity-status-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{STATUS_TOKEN}\n")).unwrap();
    let mut d = Deployment::start_with_control(
        Bootstrap::OriginalDst,
        3,
        &[],
        "",
        &["--status-token-file".into(), token_file.display().to_string()],
    );
    let addr: BTreeMap<String, SocketAddr> = d.pods.iter().map(|p| (p.name.clone(), p.addr)).collect();
    let mut on = sessions_on_every_pod(&d).await;
    let total: usize = on.values().map(Vec::len).sum();

    // pod-0 dies: each of its sessions is recovered (connect failure, replayed) at its next request.
    d.pods[0].kill();
    let victims = std::mem::take(on.get_mut("pod-0").unwrap());
    let recovered = victims.len();
    for s in victims {
        let now = s.whoami_keeping_id().await;
        assert_ne!(now, "pod-0");
        on.get_mut(&now).unwrap().push(s);
    }
    // pod-1 drains: all of its sessions but one make a request and move; the last stays idle on it.
    assert_eq!(d.control.drain(addr["pod-1"], false).await.unwrap(), 200);
    let mut leaving = std::mem::take(on.get_mut("pod-1").unwrap());
    let idle = leaving.pop().unwrap();
    let moved = leaving.len();
    for s in leaving {
        let now = until_off(&s, "pod-1").await;
        on.get_mut(&now).unwrap().push(s);
    }
    on.get_mut("pod-1").unwrap().push(idle);
    let expected: BTreeMap<SocketAddr, usize> = on.iter().map(|(pod, s)| (addr[pod], s.len())).collect();
    assert_eq!(expected.values().sum::<usize>(), total);
    eprintln!("{total} sessions; {recovered} recovered off killed pod-0, {moved} moved off draining pod-1; now {expected:?}");

    // Control has every pin (the filter writes new sessions' records asynchronously).
    let deadline = Instant::now() + WAIT;
    loop {
        let r = report(&d).await;
        let seen: BTreeMap<SocketAddr, usize> = r["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["upstream"].as_str().unwrap().parse().unwrap(),
                    u["sessions"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        if seen == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "control's sessions by upstream {seen:?}, the test's {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What Chromium shows, opened with the read-only token (?token= → cookie → page).
    let url = format!("{}/status?token={STATUS_TOKEN}", d.control.base_url());
    let dom = chromium::dump_dom(&url).await.unwrap();
    assert!(dom.contains("<h1>mcp-affinity control</h1>"), "not the status page:\n{dom}");
    for (upstream, n) in &expected {
        let row = upstream_row(&dom, *upstream);
        assert!(
            row.contains(&format!("<td class=\"sessions\">{n}</td>")),
            "{upstream} should show {n} sessions: {row}"
        );
        assert!(row.contains("<td class=\"endpoint\">yes</td>"), "{row}");
        let state = if *upstream == addr["pod-1"] { "draining" } else { "serving" };
        assert!(
            row.contains(&format!("<td class=\"state {state}\">{state}</td>")),
            "{upstream} should be {state}: {row}"
        );
    }
    let drain = upstream_row(&dom, addr["pod-1"]);
    assert!(
        drain.contains("source admin") && drain.contains(&format!("moved {moved}</span>")),
        "drain of pod-1, {moved} moved: {drain}"
    );
    let replayed = recovery_rows(&dom, "replayed");
    assert_eq!(replayed.len(), recovered, "one replayed recovery per session of pod-0:\n{dom}");
    for row in &replayed {
        assert!(row.contains("<td class=\"reason\">connect_failure</td>"), "{row}");
        assert!(row.contains(&format!("<td class=\"from\">{}</td>", addr["pod-0"])), "{row}");
    }
    let moves = recovery_rows(&dom, "moved");
    assert_eq!(moves.len(), moved, "one drain-move per moved session:\n{dom}");
    assert!(
        moves
            .iter()
            .all(|r| r.contains(&format!("<td class=\"from\">{}</td>", addr["pod-1"]))),
        "{moves:?}"
    );
    assert!(
        dom.contains("<td class=\"health ok\">ok</td>") && dom.contains("<td class=\"backend\">memory</td>"),
        "store health:\n{dom}"
    );

    // Wrong tokens get nothing; the read-only token opens nothing else.
    let wrong = chromium::dump_dom(&format!("{}/status?token=wrong", d.control.base_url()))
        .await
        .unwrap();
    assert!(wrong.contains("unauthorized") && !wrong.contains("<h1>"), "{wrong}");
    assert_eq!(status_of(&d, reqwest::Method::GET, "/status", None).await, 401);
    assert_eq!(status_of(&d, reqwest::Method::GET, "/v1/status", Some("wrong")).await, 401);
    assert_eq!(
        status_of(&d, reqwest::Method::GET, "/v1/status", Some(TEST_TOKEN)).await,
        200,
        "the API token works too"
    );
    let drain_path = format!("/v1/upstreams/{}/drain", addr["pod-2"]);
    assert_eq!(status_of(&d, reqwest::Method::POST, &drain_path, Some(STATUS_TOKEN)).await, 401);
    assert_eq!(
        status_of(
            &d,
            reqwest::Method::DELETE,
            &format!("/v1/upstreams/{}/drain", addr["pod-1"]),
            Some(STATUS_TOKEN)
        )
        .await,
        401
    );
    assert_eq!(
        status_of(&d, reqwest::Method::GET, "/v1/upstreams/draining", Some(STATUS_TOKEN)).await,
        401
    );
    let draining = d.control.draining().await.unwrap();
    assert_eq!(
        draining["draining"].as_array().unwrap().len(),
        1,
        "nothing was drained or undrained with the read-only token: {draining}"
    );

    let png = mcp_affinity_harness::envoy::workspace_root().join("target").join("status-page.png");
    chromium::screenshot(&url, &png).await.unwrap();
    eprintln!("status page screenshot: {}", png.display());
    let _ = std::fs::remove_file(&token_file);
}
