//! Instructions Envoy executes, counted by valgrind's callgrind: the Envoy ELF to run under
//! it, the command line, `callgrind_control -z` / `-d` on the running process, the dump's
//! total, and instructions per request with Envoy's idle rate subtracted.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// Whether `path` is an ELF executable (valgrind cannot follow a script).
fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok() && magic == *b"\x7fELF"
}

/// The Envoy executable itself behind `envoy`: `envoy` when it is an ELF; for the PyPI
/// package's Python wrapper (`bin/envoy` execs `envoy/_bin/envoy` of its site-packages),
/// that file. Errors when there is none.
pub fn envoy_elf(envoy: &Path) -> Result<PathBuf> {
    let envoy = envoy.canonicalize().with_context(|| format!("{}", envoy.display()))?;
    if is_elf(&envoy) {
        return Ok(envoy);
    }
    let lib = envoy.parent().and_then(Path::parent).map(|venv| venv.join("lib")).context("no venv around Envoy")?;
    for entry in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))?.flatten() {
        let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
        if entry.file_name().to_string_lossy().starts_with("python3") && is_elf(&candidate) {
            return Ok(candidate.canonicalize()?);
        }
    }
    bail!("no Envoy executable (ELF) behind {} for valgrind: ENVOY=/path/to/envoy, or BENCH_INSTRUCTIONS=0", envoy.display())
}

/// `valgrind --tool=callgrind --callgrind-out-file=<out_prefix>.%p --smc-check=all-non-file
/// <elf>`: the command that runs Envoy under callgrind (Envoy's arguments follow). V8
/// writes machine code at run time, which callgrind must see change (`--smc-check`).
pub fn command(elf: &Path, out_prefix: &Path) -> Vec<OsString> {
    let mut out = OsString::from("--callgrind-out-file=");
    out.push(out_prefix.as_os_str());
    out.push(".%p");
    vec!["valgrind".into(), "--tool=callgrind".into(), out, "--smc-check=all-non-file".into(), elf.into()]
}

/// `valgrind --version` without its `valgrind-` prefix.
pub fn valgrind_version() -> String {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().trim_start_matches("valgrind-").to_string())
        .unwrap_or_default()
}

/// The total of a callgrind dump: the number of its `summary:` or `totals:` line (the
/// event is `Ir`, instructions). Errors when it has neither.
pub fn dump_total(dump: &str) -> Result<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no summary:/totals: line in the callgrind dump")
}

/// The callgrind process `pid`, its dumps named `<out_prefix>.<pid>.<n>`.
pub struct Counter {
    pid: u32,
    out_prefix: PathBuf,
    last_dump: u32,
}

impl Counter {
    /// The counter of valgrind process `pid` started with [`command`]`(_, out_prefix)`.
    pub fn new(pid: u32, out_prefix: &Path) -> Counter {
        Counter { pid, out_prefix: out_prefix.to_path_buf(), last_dump: 0 }
    }

    fn control(&self, flag: &str) -> Result<()> {
        let out = Command::new("callgrind_control").args([flag, &self.pid.to_string()]).output().context("run callgrind_control")?;
        ensure!(out.status.success(), "callgrind_control {flag} {} failed: {}{}", self.pid, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Zeroes the counters (`callgrind_control -z`).
    pub fn zero(&mut self) -> Result<()> {
        self.control("-z")
    }

    /// Dumps (`callgrind_control -d`) and returns the instructions since the last zero.
    /// Errors when no new dump appears or it has no total.
    pub fn dump(&mut self) -> Result<u64> {
        self.control("-d")?;
        let dir = self.out_prefix.parent().context("dump directory")?;
        let stem = format!("{}.{}.", self.out_prefix.file_name().context("dump name")?.to_string_lossy(), self.pid);
        let newest = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(&stem)?.parse::<u32>().ok())
            .filter(|n| *n > self.last_dump)
            .max()
            .with_context(|| format!("callgrind_control -d wrote no new dump {}{stem}*", dir.display()))?;
        self.last_dump = newest;
        let path = dir.join(format!("{stem}{newest}"));
        dump_total(&std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?).with_context(|| format!("{}", path.display()))
    }
}

/// Envoy's instructions while idle, per second.
pub fn idle_rate(idle_instructions: u64, idle_seconds: f64) -> f64 {
    idle_instructions as f64 / idle_seconds
}

/// Instructions per request: (total − idle rate × load seconds) / requests.
pub fn per_request(total: u64, idle_per_second: f64, load_seconds: f64, requests: u64) -> f64 {
    (total as f64 - idle_per_second * load_seconds) / requests as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_totals() {
        let dump = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 12\ncmd: envoy\npositions: line\nevents: Ir\nsummary: 123456789\n\nfn=(1) x\n";
        assert_eq!(dump_total(dump).unwrap(), 123_456_789);
        assert_eq!(dump_total("events: Ir\ntotals: 42\n").unwrap(), 42);
        assert!(dump_total("events: Ir\n").is_err());
    }

    #[test]
    fn idle_is_subtracted_at_its_rate() {
        let idle = idle_rate(30_000_000, 15.0);
        assert_eq!(idle, 2_000_000.0);
        // 3000 requests in 2.5 s: 5e6 of the total is idle.
        assert_eq!(per_request(755_000_000, idle, 2.5, 3000), 250_000.0);
    }

    #[test]
    fn command_line() {
        let c = command(Path::new("/x/envoy"), Path::new("/run/cg-plain"));
        assert_eq!(c, ["valgrind", "--tool=callgrind", "--callgrind-out-file=/run/cg-plain.%p", "--smc-check=all-non-file", "/x/envoy"].map(OsString::from));
        assert!(!is_elf(Path::new("/nonexistent")));
    }
}
