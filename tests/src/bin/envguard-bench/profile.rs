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
    if let Some(why) = failed(cmd.output()) {
        return why;
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

/// Why a `perf record` run gave no profile, or `None` when it did.
fn failed(rec: std::io::Result<std::process::Output>) -> Option<Value> {
    match rec {
        Ok(r) if r.status.success() => None,
        Ok(r) => Some(json!(format!(
            "perf record failed: {}",
            String::from_utf8_lossy(&r.stderr).trim()
        ))),
        Err(e) => Some(json!(format!("cannot run perf: {e}"))),
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

/// Where one BPF program's time goes: samples `pid` with call graphs for
/// `secs` seconds and attributes every sample inside the JITed program
/// `prog` to the function it called (a helper, a map operation, a BPF
/// subprogram) or to the program's own code. Also the share of all the
/// process's samples spent in the program, and in `extra` kernel functions
/// (e.g. what frees the program's per-socket storage at close).
pub fn callees(pid: u32, secs: u32, data: &Path, prog: &str, extra: &[&str]) -> Value {
    if !available() {
        return json!(UNAVAILABLE);
    }
    let rec = Command::new("perf")
        .args(["record", "-q", "-g", "-e", "cpu-clock", "-F", "4999", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &secs.to_string()])
        .output();
    if let Some(why) = failed(rec) {
        return why;
    }
    let script = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(data)
        .output();
    let _ = std::fs::remove_file(data);
    match script {
        Ok(o) if o.status.success() => attribute(&String::from_utf8_lossy(&o.stdout), prog, extra),
        _ => json!("perf script failed"),
    }
}

/// The attribution of [`callees`] over `perf script` output: one block of
/// frames per sample, innermost first, blocks separated by blank lines.
fn attribute(text: &str, prog: &str, extra: &[&str]) -> Value {
    let is_prog = |f: &str| {
        f.strip_prefix("bpf_prog_")
            .and_then(|r| r.split_once('_'))
            .is_some_and(|(tag, name)| tag.len() == 16 && name == prog)
    };
    let mut total = 0u64;
    let mut in_prog = 0u64;
    let mut extra_hits = vec![0u64; extra.len()];
    let mut by_callee: std::collections::BTreeMap<String, u64> = Default::default();
    for block in text.split("\n\n") {
        // Each line: "<ip> <symbol>+<offset>"; the symbol without its offset.
        let frames: Vec<&str> = block
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|s| s.split('+').next().unwrap_or(s))
            .collect();
        if frames.is_empty() {
            continue;
        }
        total += 1;
        for (i, name) in extra.iter().enumerate() {
            if frames.contains(name) {
                extra_hits[i] += 1;
            }
        }
        if let Some(at) = frames.iter().position(|f| is_prog(f)) {
            in_prog += 1;
            let callee = if at == 0 {
                "(its own code)".to_owned()
            } else {
                let f = frames[at - 1];
                match f.strip_prefix("bpf_prog_").and_then(|r| r.split_once('_')) {
                    Some((tag, name)) if tag.len() == 16 => format!("bpf:{name}"),
                    _ => f.to_owned(),
                }
            };
            *by_callee.entry(callee).or_default() += 1;
        }
    }
    let pct = |n: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    };
    let mut rows: Vec<(String, u64)> = by_callee.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    json!({
        "samples": total,
        "program_pct": pct(in_prog, total),
        "callees": rows.iter().take(10).map(|(s, n)| json!({"symbol": s, "pct": pct(*n, in_prog)})).collect::<Vec<_>>(),
        "extra_pct": extra.iter().zip(&extra_hits).map(|(s, n)| json!({"symbol": s, "pct": pct(*n, total)})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_given_to_the_function_the_program_called() {
        let text = "\
ffff1 bpf_sk_storage_get+0x190
ffff2 bpf_prog_0123456789abcdef_connect4+0x40
ffff3 __cgroup_bpf_run_filter_sock_addr+0x10

ffff2 bpf_prog_0123456789abcdef_connect4+0x44
ffff3 __cgroup_bpf_run_filter_sock_addr+0x10

ffff9 kmem_cache_free+0x1
ffff8 bpf_sk_storage_free+0x2
ffff7 __sk_destruct+0x3

ffffa tcp_v4_connect+0x1
";
        let v = attribute(text, "connect4", &["bpf_sk_storage_free"]);
        assert_eq!(v["samples"], 4);
        assert_eq!(v["program_pct"], 50.0);
        assert_eq!(v["callees"][0]["pct"], 50.0);
        let names: Vec<&str> = v["callees"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["symbol"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["(its own code)", "bpf_sk_storage_get"]);
        assert_eq!(v["extra_pct"][0]["pct"], 25.0);
    }
}
