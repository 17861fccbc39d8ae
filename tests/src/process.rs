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
    fn args(&self) -> Vec<String> {
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
        let mut cmd = Command::new(egprobe);
        cmd.args(place.args())
            .args(["serve", proto.name(), &list, &port.to_string()])
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
