//! Profiles of the missed targets: `perf record -e cpu-clock` of one
//! process (the VM has no hardware counters, so no cycles or instructions),
//! reported flat by symbol. perf (Debian: linux-perf) is optional: without
//! it the profile says so.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

pub const UNAVAILABLE: &str = "perf is not installed (Debian: linux-perf): no profile";

pub fn available() -> bool {
    Command::new("perf")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Samples `pid` (all its threads, kernel included) for `secs` seconds into
/// `data`; the top symbols as [{"pct", "symbol"}], or a string saying why
/// there are none.
pub fn record(pid: u32, secs: u32, data: &Path) -> Value {
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-q", "-e", "cpu-clock", "-F", "4999", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &secs.to_string()]);
    run(cmd, data)
}

/// Samples a whole command run (`program args…`), as [`record`].
pub fn record_command(program: &Path, args: &[&std::ffi::OsStr], data: &Path) -> Value {
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-o"])
        .arg(data)
        .arg("--")
        .arg(program)
        .args(args)
        .stdout(std::process::Stdio::null());
    run(cmd, data)
}

fn run(mut cmd: Command, data: &Path) -> Value {
    if !available() {
        return json!(UNAVAILABLE);
    }
    let rec = cmd.output();
    match rec {
        Ok(r) if r.status.success() => {}
        Ok(r) => {
            return json!(format!(
                "perf record failed: {}",
                String::from_utf8_lossy(&r.stderr).trim()
            ));
        }
        Err(e) => return json!(format!("cannot run perf: {e}")),
    }
    let report = Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "sym",
            "--stdio",
            "--percent-limit",
            "1",
            "-i",
        ])
        .arg(data)
        .output();
    let _ = std::fs::remove_file(data);
    match report {
        Ok(o) if o.status.success() => parse_report(&String::from_utf8_lossy(&o.stdout)),
        _ => json!("perf report failed"),
    }
}

/// `perf report --stdio` lines ("  20.40%  [k] symbol") as
/// [{"pct", "symbol"}]; `bpf_prog_<tag>_<name>` becomes `bpf:<name>`,
/// Rust paths keep their last two segments.
fn parse_report(text: &str) -> Value {
    let rows: Vec<Value> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pct: f64 = it.next()?.strip_suffix('%')?.parse().ok()?;
            let _ring = it.next()?;
            let sym = it.collect::<Vec<_>>().join(" ");
            // JITed programs are `bpf_prog_<16 hex digit tag>_<name>`; kernel
            // functions such as `bpf_prog_test_run_skb` are not.
            let prog = sym.strip_prefix("bpf_prog_").and_then(|rest| {
                let (tag, name) = rest.split_once('_')?;
                (tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit())).then_some(name)
            });
            let sym = match prog {
                Some(name) => format!("bpf:{name}"),
                None => short(&sym),
            };
            Some(json!({"pct": pct, "symbol": sym}))
        })
        .take(15)
        .collect();
    json!(rows)
}

/// `a::b::c::d` → `c::d` (generic arguments dropped).
fn short(sym: &str) -> String {
    let base = sym.split('<').next().unwrap_or(sym);
    let parts: Vec<&str> = base.split("::").collect();
    if parts.len() > 2 {
        parts[parts.len() - 2..].join("::")
    } else {
        sym.to_owned()
    }
}
