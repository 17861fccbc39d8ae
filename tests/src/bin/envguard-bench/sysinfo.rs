//! What the machine is and how busy it is: CPU model and count, kernel,
//! date, load; CPU time from /proc/stat and /proc/<pid>/stat; RSS.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Jiffies (USER_HZ) of all CPUs from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuStat {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    pub idle: u64,
    pub steal: u64,
}

impl CpuStat {
    pub fn now() -> CpuStat {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal guest guest_nice
        CpuStat {
            busy: g(0) + g(1) + g(2) + g(5) + g(6) + g(7),
            idle: g(3) + g(4),
            steal: g(7),
        }
    }

    /// (busy CPU seconds, steal seconds, total CPU seconds) since `before`.
    pub fn since(&self, before: &CpuStat) -> (f64, f64, f64) {
        let hz = clock_ticks();
        let busy = self.busy.saturating_sub(before.busy) as f64 / hz;
        let steal = self.steal.saturating_sub(before.steal) as f64 / hz;
        let idle = self.idle.saturating_sub(before.idle) as f64 / hz;
        (busy, steal, busy + idle)
    }
}

pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised comm; utime and stime are fields 14, 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ut + st) as f64 / clock_ticks())
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |k| k / 1024)
}

/// Now as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn machine() -> Value {
    json!({
        "cpu_model": cpu_model(),
        "cpus": cpus(),
        "kernel": kernel(),
        "mem_total_mib": mem_total_mib(),
        "date": utc_now(),
        "loadavg_at_start": loadavg(),
        "mitigations": mitigations(),
    })
}

/// The kernel's speculative-execution mitigations that tax every call and
/// return (helper calls, the programs' own dispatch): what
/// `/sys/devices/system/cpu/vulnerabilities/` says of them.
pub fn mitigations() -> Value {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{name}"))
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
    };
    json!({
        "spectre_v2": read("spectre_v2"),
        "spec_rstack_overflow": read("spec_rstack_overflow"),
        "retbleed": read("retbleed"),
    })
}
