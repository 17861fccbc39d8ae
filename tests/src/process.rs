//! Processes the tests start: long-running echo servers (guarded) and
//! one-shot connection probes, both `egprobe` placed in a cgroup and a netns.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::sys;

/// Transport protocol of a probe or server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Where an `egprobe` runs: which network namespace (`None`: the test
/// runner's) and which cgroup directory (`None`: the test runner's).
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub netns: Option<String>,
    pub cgroup: Option<PathBuf>,
}

impl Place {
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(cg) = &self.cgroup {
            a.push("--cgroup".into());
            a.push(cg.display().to_string());
        }
        if let Some(ns) = &self.netns {
            a.push("--netns".into());
            a.push(ns.clone());
        }
        a
    }
}

/// Makes a child die with the test process should the test process itself
/// be killed (normal cleanup goes through the guards).
fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the hook.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::c_ulong::try_from(sig).unwrap_or(9),
            );
            Ok(())
        });
    }
}

/// A running `egprobe serve`, killed and reaped on drop.
pub struct Server {
    child: Child,
    pid: u32,
    desc: String,
}

impl Server {
    /// Starts `egprobe serve PROTO ADDRS PORT` at `place` and waits (10 s at
    /// most) for its readiness line, printed after every socket is bound
    /// and listening.
    pub fn spawn(
        egprobe: &Path,
        place: &Place,
        proto: Proto,
        addrs: &[IpAddr],
        port: u16,
    ) -> Server {
        let list = addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let desc = format!(
            "egprobe server {} {list} port {port} at {place:?}",
            proto.name()
        );
        let args = ["serve", proto.name(), &list, &port.to_string()].map(str::to_owned);
        Server::start(egprobe, place, &args, desc)
    }

    /// Starts `program [place args] ARGS...` and waits (10 s at most) for its
    /// first stdout line to be a readiness line (`"ready": true`).
    pub fn start(program: &Path, place: &Place, args: &[String], desc: String) -> Server {
        let mut cmd = Command::new(program);
        cmd.args(place.args())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let server = Server { child, pid, desc };
        let first = rx.recv_timeout(Duration::from_secs(10));
        let ready = match &first {
            Ok(Some(Ok(line))) => serde_json::from_str::<Value>(line)
                .map(|v| v["ready"] == Value::Bool(true))
                .unwrap_or(false),
            _ => false,
        };
        if !ready {
            let mut server = server;
            let stderr = server.kill_and_stderr();
            panic!(
                "{} did not report readiness (first stdout line: {first:?}); stderr: {stderr}",
                server.desc
            );
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn kill_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("envguard-tests: cleanup: kill {}: {e}", self.desc);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("envguard-tests: cleanup: wait {}: {e}", self.desc);
        }
    }
}

/// What one `egprobe connect` reported.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub ok: bool,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// `socket`, `bind`, `connect`, `send`, `recv` or `echo`.
    pub stage: Option<String>,
    pub pid: u32,
    /// The socket's local address once known.
    pub local: Option<SocketAddr>,
    /// The raw JSON line.
    pub raw: String,
}

impl ProbeResult {
    /// Refused by an enforcing hook: EPERM at connect (TCP) or send (UDP).
    pub fn is_refused(&self) -> bool {
        !self.ok
            && self.errno == Some(libc::EPERM)
            && matches!(self.stage.as_deref(), Some("connect" | "send"))
    }
}

/// One `egprobe connect` run.
#[derive(Clone, Debug)]
pub struct Probe {
    pub place: Place,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub bind: Option<IpAddr>,
    pub timeout_ms: u32,
}

impl Probe {
    /// Runs the probe to completion (it bounds its own run time) and parses
    /// its report; panics with its stderr if it did not produce one.
    pub fn run(&self, egprobe: &Path) -> ProbeResult {
        let mut cmd = Command::new(egprobe);
        cmd.args(self.place.args()).args([
            "connect",
            self.proto.name(),
            &self.dst.ip().to_string(),
            &self.dst.port().to_string(),
            "--timeout-ms",
            &self.timeout_ms.to_string(),
        ]);
        if let Some(b) = self.bind {
            cmd.args(["--bind", &b.to_string()]);
        }
        cmd.stdin(Stdio::null());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {self:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{self:?} printed no JSON report ({e}); status {}, stdout {stdout:?}, stderr {stderr:?}", out.status)
        });
        let pid = v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("probe report without pid: {stdout}"));
        ProbeResult {
            ok: v["ok"]
                .as_bool()
                .unwrap_or_else(|| panic!("probe report without ok: {stdout}")),
            errno: v["errno"].as_i64().and_then(|e| i32::try_from(e).ok()),
            error: v["error"].as_str().map(str::to_owned),
            stage: v["stage"].as_str().map(str::to_owned),
            pid,
            local: v["local"].as_str().and_then(|s| s.parse().ok()),
            raw: stdout,
        }
    }
}

/// Runs `egprobe ARGS...` at `place` to completion (it bounds its own run
/// time) and parses the one JSON line it prints; panics with its stderr if
/// there is none.
pub fn run_json(egprobe: &Path, place: &Place, args: &[String]) -> Value {
    let mut cmd = Command::new(egprobe);
    cmd.args(place.args()).args(args).stdin(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGKILL);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run egprobe {args:?} at {place:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "egprobe {args:?} at {place:?} printed no JSON report ({e}); status {}, stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `egprobe udp-burst`: `count` datagrams from one unconnected UDP socket to
/// `dst`, as fast as possible. Returns its report (`pid`, `ok`, `eperm`,
/// `other`, ...).
pub fn udp_burst(egprobe: &Path, place: &Place, dst: SocketAddr, count: u32) -> Value {
    run_json(
        egprobe,
        place,
        &[
            "udp-burst".into(),
            dst.ip().to_string(),
            dst.port().to_string(),
            "--count".into(),
            count.to_string(),
        ],
    )
}

/// One destination of `egprobe flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSpec {
    pub proto: Proto,
    pub dst: SocketAddr,
}

impl FlowSpec {
    /// As egprobe writes it: `tcp,ADDR,PORT`.
    pub fn arg(&self) -> String {
        format!(
            "{},{},{}",
            self.proto.name(),
            self.dst.ip(),
            self.dst.port()
        )
    }
}

/// What `egprobe flows` reported.
#[derive(Clone, Debug)]
pub struct FlowsReport {
    pub pid: u32,
    /// Per spec, one outcome per round: `ok` or `STAGE:ERRNO`.
    pub outcomes: Vec<Vec<String>>,
}

/// `egprobe flows`: `rounds` rounds over `specs` from one process (one TCP
/// connection per TCP spec, kept across rounds; one UDP socket per family).
pub fn flows(egprobe: &Path, place: &Place, rounds: u32, specs: &[FlowSpec]) -> FlowsReport {
    flows_with_gap(egprobe, place, rounds, Duration::ZERO, specs)
}

/// [`flows`] with a pause of `gap` between rounds (`--gap-ms`).
pub fn flows_with_gap(
    egprobe: &Path,
    place: &Place,
    rounds: u32,
    gap: Duration,
    specs: &[FlowSpec],
) -> FlowsReport {
    let mut args = vec!["flows".to_owned(), "--rounds".into(), rounds.to_string()];
    args.extend(["--gap-ms".to_owned(), gap.as_millis().to_string()]);
    args.extend(specs.iter().map(FlowSpec::arg));
    let v = run_json(egprobe, place, &args);
    let pid = v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("flows report without pid: {v}"));
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("flows report without results: {v}"));
    assert_eq!(results.len(), specs.len(), "one result per spec: {v}");
    let outcomes = results
        .iter()
        .zip(specs)
        .map(|(r, spec)| {
            assert_eq!(r["spec"], spec.arg(), "results in spec order: {v}");
            r["outcomes"]
                .as_array()
                .unwrap_or_else(|| panic!("no outcomes: {r}"))
                .iter()
                .map(|o| o.as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .collect();
    FlowsReport { pid, outcomes }
}

/// How many attempts of a connect loop's summary started between the
/// CLOCK_MONOTONIC instants `from_ns` and `to_ns`.
pub fn attempts_between(summary: &Value, from_ns: u64, to_ns: u64) -> usize {
    summary["attempt_at_mono_ns"]
        .as_array()
        .unwrap_or_else(|| panic!("connect-loop summary without attempt times"))
        .iter()
        .filter_map(Value::as_u64)
        .filter(|t| (from_ns..=to_ns).contains(t))
        .count()
}

/// One attempt of a connect loop, from its summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopAttempt {
    /// CLOCK_MONOTONIC start and end, ns.
    pub at_ns: u64,
    pub done_ns: u64,
    /// `o` ok, `e` EPERM at connect, `c` connected but the exchange
    /// failed, `x` any other failure.
    pub outcome: char,
}

/// Every attempt of a connect loop's summary, in order. Panics if the
/// summary's per-attempt lists are missing or disagree in length.
pub fn loop_attempts(summary: &Value) -> Vec<LoopAttempt> {
    let times = |field: &str| -> Vec<u64> {
        summary[field]
            .as_array()
            .unwrap_or_else(|| panic!("connect-loop summary without {field}: {summary}"))
            .iter()
            .map(|t| {
                t.as_u64()
                    .unwrap_or_else(|| panic!("bad time in {field}: {t}"))
            })
            .collect()
    };
    let at = times("attempt_at_mono_ns");
    let done = times("attempt_done_mono_ns");
    let outcomes: Vec<char> = summary["attempt_outcomes"]
        .as_str()
        .unwrap_or_else(|| panic!("connect-loop summary without attempt_outcomes"))
        .chars()
        .collect();
    assert!(
        at.len() == done.len() && at.len() == outcomes.len(),
        "connect-loop summary: {} attempt starts, {} ends, {} outcomes",
        at.len(),
        done.len(),
        outcomes.len()
    );
    at.into_iter()
        .zip(done)
        .zip(outcomes)
        .map(|((at_ns, done_ns), outcome)| LoopAttempt {
            at_ns,
            done_ns,
            outcome,
        })
        .collect()
}

#[derive(Default)]
struct LoopLines {
    lines: Vec<Value>,
    bad: Vec<String>,
    eof: bool,
}

/// A running `egprobe connect-loop` (see egprobe's docs): its progress
/// lines are collected by a reader thread; [`ConnectLoop::finish`] closes
/// its stdin, which ends the loop, and returns the summary. Killed on drop.
pub struct ConnectLoop {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    shared: std::sync::Arc<(std::sync::Mutex<LoopLines>, std::sync::Condvar)>,
    desc: String,
}

impl ConnectLoop {
    /// Starts the loop and waits (10 s at most) for its `started` line.
    /// `max` bounds its run time should [`ConnectLoop::finish`] never come.
    pub fn start(
        egprobe: &Path,
        place: &Place,
        dst: SocketAddr,
        rate: u32,
        max: Duration,
    ) -> ConnectLoop {
        let desc = format!("egprobe connect-loop tcp {dst} at {rate}/s at {place:?}");
        let mut cmd = Command::new(egprobe);
        cmd.args(place.args())
            .args([
                "connect-loop",
                "tcp",
                &dst.ip().to_string(),
                &dst.port().to_string(),
                "--rate",
                &rate.to_string(),
                "--duration-ms",
                &max.as_millis().to_string(),
                "--timeout-ms",
                "1000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let shared = std::sync::Arc::new((
            std::sync::Mutex::new(LoopLines::default()),
            std::sync::Condvar::new(),
        ));
        {
            let shared = std::sync::Arc::clone(&shared);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => s.lines.push(v),
                        _ => s.bad.push(line),
                    }
                    shared.1.notify_all();
                }
                shared.0.lock().unwrap_or_else(|p| p.into_inner()).eof = true;
                shared.1.notify_all();
            });
        }
        let lp = ConnectLoop {
            child,
            stdin,
            shared,
            desc,
        };
        lp.wait_line("its started line", Duration::from_secs(10), |v| {
            v["started"] == true
        });
        lp
    }

    /// Waits (at most `timeout`) for a line matching `pred`; panics naming
    /// `what` otherwise.
    fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = s.lines.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || s.eof {
                panic!(
                    "{}: no line for {what} within {timeout:?} (its stdout {}); last line {:?}; bad lines {:?}",
                    self.desc,
                    if s.eof { "closed" } else { "is open" },
                    s.lines.last(),
                    s.bad
                );
            }
            s = self
                .shared
                .1
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for a progress line with at least `attempts` attempts and
    /// returns it.
    pub fn wait_attempts(&self, attempts: u64, timeout: Duration) -> Value {
        self.wait_line(&format!("{attempts} attempts"), timeout, |v| {
            v["progress"] == true && v["attempts"].as_u64().is_some_and(|a| a >= attempts)
        })
    }

    /// The latest progress line, if any.
    pub fn latest(&self) -> Option<Value> {
        let s = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        s.lines
            .iter()
            .rev()
            .find(|v| v["progress"] == true)
            .cloned()
    }

    /// Ends the loop (closes its stdin) and returns its summary line.
    pub fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let done = self.wait_line("its summary", Duration::from_secs(10), |v| {
            v["done"] == true
        });
        let _ = self.child.wait();
        done
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `egprobe whoami` at `place`: returns (pid, cgroup path, netns inode).
pub fn whoami(egprobe: &Path, place: &Place) -> (u32, String, u64) {
    let out = Command::new(egprobe)
        .args(place.args())
        .arg("whoami")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run egprobe whoami: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "egprobe whoami at {place:?}: no JSON ({e}): {stdout:?} {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        v["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .expect("whoami pid"),
        v["cgroup"].as_str().expect("whoami cgroup").to_owned(),
        v["netns_ino"].as_u64().expect("whoami netns_ino"),
    )
}

/// Whether the process `pid` is gone (or a zombie nobody will see again).
pub fn gone(pid: u32) -> bool {
    !sys::process_exists(pid)
}
