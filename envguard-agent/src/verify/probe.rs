//! Running one probe inside an env: a child process (`envguard verify-probe`,
//! hidden) that first moves itself into a transient cgroup made below the
//! env's first listed cgroup, enters the network namespace asked for, then
//! attempts the connection or datagram and prints what it saw as one JSON
//! line. The parent makes and removes the cgroup, and tells the agent the
//! cgroup is probe run R before the child starts.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::plan::Observed;
use crate::policy::probe::ProbeProto;

/// What the child prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildResult {
    pub observed: Observed,
    pub errno: Option<i32>,
    pub detail: String,
    pub ms: u64,
}

/// `envguard verify-probe`: the child. Never returns an error: whatever goes
/// wrong is its result.
pub fn child(
    cgroup: &Path,
    netns: Option<&str>,
    addr: SocketAddr,
    proto: ProbeProto,
    timeout: Duration,
) -> ChildResult {
    let started = Instant::now();
    let r = attempt(cgroup, netns, addr, proto, timeout);
    let ms = started.elapsed().as_millis() as u64;
    match r {
        Ok(observed) => ChildResult {
            observed,
            errno: None,
            detail: String::new(),
            ms,
        },
        Err((observed, e)) => ChildResult {
            observed,
            errno: e.raw_os_error(),
            detail: e.to_string(),
            ms,
        },
    }
}

type Attempt = Result<Observed, (Observed, std::io::Error)>;

fn attempt(
    cgroup: &Path,
    netns: Option<&str>,
    addr: SocketAddr,
    proto: ProbeProto,
    timeout: Duration,
) -> Attempt {
    let setup = |e: std::io::Error, what: String| {
        (
            Observed::Error,
            std::io::Error::new(e.kind(), format!("{what}: {e}")),
        )
    };
    // First the cgroup: a socket belongs to the cgroup of the process that
    // creates it.
    std::fs::write(cgroup.join("cgroup.procs"), "0")
        .map_err(|e| setup(e, format!("joining cgroup {}", cgroup.display())))?;
    if let Some(ns) = netns {
        let path = PathBuf::from("/run/netns").join(ns);
        let f = std::fs::File::open(&path)
            .map_err(|e| setup(e, format!("opening {}", path.display())))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid fd; this process has one thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(setup(
                std::io::Error::last_os_error(),
                format!("entering network namespace {ns}"),
            ));
        }
    }
    let classify = |e: std::io::Error| {
        let o = match e.raw_os_error() {
            Some(libc::EPERM) => Observed::Eperm,
            Some(libc::ECONNREFUSED) => Observed::Refused,
            Some(libc::ETIMEDOUT) => Observed::Timeout,
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => Observed::Unreachable,
            _ if e.kind() == std::io::ErrorKind::TimedOut => Observed::Timeout,
            _ => Observed::Error,
        };
        (o, e)
    };
    match proto {
        ProbeProto::Tcp => TcpStream::connect_timeout(&addr, timeout)
            .map(|_| Observed::Connected)
            .map_err(classify),
        ProbeProto::Udp => {
            let any: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            let s = UdpSocket::bind(any).map_err(|e| setup(e, "binding a UDP socket".into()))?;
            s.send_to(b"envguard verify probe", addr)
                .map(|_| Observed::Sent)
                .map_err(classify)
        }
    }
}

/// A transient cgroup, removed on drop (once its process is gone).
pub struct TransientCgroup {
    pub dir: PathBuf,
    pub id: u64,
}

impl TransientCgroup {
    pub fn create(parent: &Path, name: &str) -> anyhow::Result<TransientCgroup> {
        if !parent.is_dir() {
            anyhow::bail!(
                "the env's cgroup {} does not exist: nothing runs there to probe from",
                parent.display()
            );
        }
        let dir = parent.join(name);
        std::fs::create_dir(&dir)
            .map_err(|e| anyhow::anyhow!("creating cgroup {}: {e}", dir.display()))?;
        let id = crate::sys::cgroup_id(&dir)
            .ok_or_else(|| anyhow::anyhow!("cgroup {} vanished", dir.display()))?;
        Ok(TransientCgroup { dir, id })
    }
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        // The child was reaped; the kernel may still be taking the cgroup's
        // last task off it for a moment (EBUSY).
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    log::warn!("cannot remove the probe cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Runs `envguard verify-probe` in `cgroup` and reads its result.
pub fn spawn_child(
    cgroup: &Path,
    netns: Option<&str>,
    addr: SocketAddr,
    proto: ProbeProto,
    timeout: Duration,
) -> anyhow::Result<ChildResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("verify-probe")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--addr")
        .arg(addr.to_string())
        .arg("--proto")
        .arg(proto.name())
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string());
    if let Some(ns) = netns {
        cmd.arg("--netns").arg(ns);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("starting the probe process: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "the probe process answered {:?} ({e}; exit {})",
            String::from_utf8_lossy(&out.stdout),
            out.status
        )
    })
}

/// Violation records seen on the agent's event stream, by local cgroup id:
/// (kind, verdict, probe run).
pub type Seen = Arc<Mutex<std::collections::HashMap<u64, Vec<(String, String, Option<String>)>>>>;

/// Subscribes to the agent's events (the subscription is confirmed before
/// this returns, so no record of a later probe is missed) and collects
/// violation records by cgroup id on a thread.
pub fn watch_events(socket: &Path) -> anyhow::Result<Seen> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", socket.display()))?;
    s.write_all(b"{\"cmd\":\"events\"}\n")?;
    let mut r = BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first)?;
    let answer: crate::control::Response = serde_json::from_str(&first)
        .map_err(|e| anyhow::anyhow!("unreadable answer to events: {first:?}: {e}"))?;
    if !answer.ok {
        anyhow::bail!(
            "events subscription refused: {}",
            answer.error.unwrap_or_default()
        );
    }
    let seen: Seen = Arc::default();
    let out = seen.clone();
    std::thread::spawn(move || {
        for line in r.lines() {
            let Ok(line) = line else { return };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let kind = v["kind"].as_str().unwrap_or_default();
            if kind != "violation" && kind != "violation_rollup" {
                continue;
            }
            let Some(cg) = v["process"]["cgroup_id"].as_u64() else {
                continue;
            };
            let verdict = v["verdict"].as_str().unwrap_or_default().to_owned();
            let probe = v["probe"].as_str().map(str::to_owned);
            out.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(cg)
                .or_default()
                .push((kind.to_owned(), verdict, probe));
        }
    });
    Ok(seen)
}

/// Waits up to `timeout` for a record of cgroup `id`; its verdict.
pub fn wait_record(seen: &Seen, id: u64, timeout: Duration) -> Option<(String, Option<String>)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((_, verdict, probe)) = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .and_then(|v| v.first())
        {
            return Some((verdict.clone(), probe.clone()));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
