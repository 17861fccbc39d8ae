//! Section 4: events. An agent in audit mode with stdout redirected to a
//! file; a sender in env `dev` calls connect() on one UDP socket towards
//! prod (198.18.10.1:9000, allowed by no rule) as fast as it can: every call
//! is judged by connect4 and makes one violation record, and no packet is
//! sent. Every call is accounted for: either a `violation` line in the file
//! or part of a `lost_events` count (ring buffer full). The agent's CPU
//! comes from /proc/<pid>/stat, its RSS from /proc/<pid>/status.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agentrun::{BenchAgent, Sink};
use crate::env::BenchEnv;
use crate::policygen::{GenPolicy, VIOLATION_PORT};
use crate::sysinfo::{proc_cpu_secs, proc_status_kib};
use crate::worker::Worker;

/// Incremental reader of the agent's output file.
struct Tail {
    file: std::fs::File,
    pos: u64,
    partial: String,
    violations: u64,
    lost: u64,
    bytes: u64,
}

impl Tail {
    fn poll(&mut self) {
        let _ = self.file.seek(SeekFrom::Start(self.pos));
        let mut r = BufReader::new(&self.file);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.pos += n as u64;
                    self.partial.push_str(&line);
                    if !self.partial.ends_with('\n') {
                        continue;
                    }
                    let l = std::mem::take(&mut self.partial);
                    if l.contains("\"kind\":\"violation\"") {
                        self.violations += 1;
                        self.bytes += l.len() as u64;
                    } else if l.contains("\"kind\":\"lost_events\"") {
                        let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
                        self.lost += v["count"].as_u64().unwrap_or(0);
                    }
                }
            }
        }
    }
}

pub fn run(env: &BenchEnv) -> Value {
    let secs = if env.quick { 1 } else { 5 };
    let root = env.mkdir("ev");
    let dev = env.mkdir("ev/dev");
    let policy = GenPolicy::new(10, 3, 42);
    let file = env.file(
        "policy-ev.toml",
        &policy.toml("audit", std::slice::from_ref(&dev)),
    );
    let sink = env.tmp.path().join("events.jsonl");
    // An agent that folds repeats of one flow in the kernel would turn the
    // flood into a handful of records: ask for every one.
    let dedup = crate::agentrun::run_supports(&env.agent_bin, "--dedup-interval");
    let agent_args: Vec<&str> = if dedup {
        vec!["--dedup-interval", "0"]
    } else {
        Vec::new()
    };
    let agent = BenchAgent::start(
        &env.agent_bin,
        &file,
        &root,
        Sink::File(sink.clone()),
        env.tmp.path(),
        &agent_args,
    );
    let pid = agent.pid();
    let rss_idle = proc_status_kib(pid, "VmRSS");
    let mut tail = Tail {
        file: std::fs::File::open(&sink).expect("the agent's output file"),
        pos: 0,
        partial: String::new(),
        violations: 0,
        lost: 0,
        bytes: 0,
    };
    tail.poll();
    let cpu0 = proc_cpu_secs(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let r = Worker::spawn(
        &env.client("ev/dev"),
        json!({"job": "udp_connect_flood", "addr": "198.18.10.1", "port": VIOLATION_PORT, "ms": secs * 1000}),
    )
    .result(Duration::from_secs(secs + 60));
    let calls = r["calls"].as_u64().expect("calls");
    let sender_secs = r["secs"].as_f64().expect("secs");
    // Wait until every call is accounted for (the agent reports losses on
    // its once-a-second housekeeping tick).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_growth = Instant::now();
    let mut seen = 0;
    let done_at = loop {
        crate::check_interrupted();
        tail.poll();
        if tail.violations != seen {
            seen = tail.violations;
            last_growth = Instant::now();
        }
        if tail.violations + tail.lost >= calls {
            break last_growth;
        }
        assert!(
            Instant::now() < deadline,
            "the agent accounted for {} of {calls} violating calls ({} written, {} lost) within 120 s",
            tail.violations + tail.lost,
            tail.violations,
            tail.lost
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let cpu = proc_cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let rss_after = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
    // Where the agent's time goes under the same flood (full run only; not
    // part of the figures above).
    let profile = if env.quick {
        json!("full run only")
    } else {
        let w = Worker::spawn(
            &env.client("ev/dev"),
            json!({"job": "udp_connect_flood", "addr": "198.18.10.1", "port": VIOLATION_PORT, "ms": 3_000}),
        );
        let p = crate::profile::record(pid, 2, &env.tmp.path().join("perf-agent.data"));
        let _ = w.result(Duration::from_secs(60));
        p
    };
    agent.stop();
    let elapsed = (done_at - t0).as_secs_f64();
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(env.tmp.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({
        "sender_seconds": sender_secs,
        "violating_calls": calls,
        "offered_per_s": calls as f64 / sender_secs,
        "written": tail.violations,
        "lost": tail.lost,
        "written_per_s": tail.violations as f64 / elapsed,
        "window_s": elapsed,
        "bytes_per_record": tail.bytes as f64 / tail.violations.max(1) as f64,
        "agent_cpu_s": cpu,
        "agent_cpu_ms_per_1000": cpu * 1e3 / tail.violations.max(1) as f64 * 1000.0,
        "agent_cpu_utilisation": cpu / elapsed,
        "sink_filesystem": fs,
        "agent_args": agent_args,
        "agent_profile": profile,
        "agent_threads": threads,
        "rss_idle_kib": rss_idle,
        "rss_after_kib": rss_after,
        "hwm_kib": hwm,
    })
}
