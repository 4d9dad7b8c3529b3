//! Headless Chromium (the Debian package `chromium`, found on `PATH`; `make setup-chromium`
//! installs it) run as a process against a URL: the DOM after the page loaded
//! ([`dump_dom`]) or a PNG screenshot ([`screenshot`]). Each run has a fresh profile (no
//! cookie carries over from one run to the next) and is killed after [`TIMEOUT`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Longest a Chromium run may take (a cold start in a busy container takes seconds).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The Chromium binary: `chromium` on `PATH`.
///
/// # Errors
/// When there is none, saying how to install it.
pub fn binary() -> Result<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
        .context("`chromium` not found on PATH: install the Debian package (`make setup-chromium`, or `apt-get install chromium`)")
}

/// The rendered DOM of `url` (`--dump-dom`): what the browser shows once the page loaded,
/// after redirects, serialized as HTML.
///
/// # Errors
/// When Chromium is missing, fails, or runs longer than [`TIMEOUT`].
pub async fn dump_dom(url: &str) -> Result<String> {
    let out = run(&["--dump-dom".into(), url.into()]).await?;
    String::from_utf8(out).context("Chromium's DOM is not UTF-8")
}

/// Saves a PNG of `url` in a 1280×900 window to `path`.
///
/// # Errors
/// As [`dump_dom`]; also when no PNG was written.
pub async fn screenshot(url: &str, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    run(&[
        format!("--screenshot={}", path.display()),
        "--window-size=1280,900".into(),
        url.into(),
    ])
    .await?;
    let png = std::fs::read(path).with_context(|| format!("Chromium wrote no screenshot to {}", path.display()))?;
    if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
        bail!("{} is not a PNG", path.display());
    }
    Ok(())
}

/// Runs headless Chromium with `args` in a fresh profile; its standard output.
async fn run(args: &[String]) -> Result<Vec<u8>> {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let profile = std::env::temp_dir().join(format!(
        "mcp-affinity-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = tokio::process::Command::new(binary()?);
    // --no-sandbox: tests run as root in containers, where Chromium's sandbox cannot start.
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let result = tokio::time::timeout(TIMEOUT, cmd.output()).await;
    let _ = std::fs::remove_dir_all(&profile);
    let out = result
        .map_err(|_| anyhow::anyhow!("chromium {args:?} ran longer than {TIMEOUT:?}"))?
        .context("chromium")?;
    if !out.status.success() {
        bail!("chromium {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}
