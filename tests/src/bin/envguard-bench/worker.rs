//! Child processes of the benchmark: the bench binary itself, started as
//! `envguard-bench __worker JSON`, joins a cgroup and a network namespace
//! (both optional, before any socket exists) and then runs one job: a
//! server, a load generator, the BPF_PROG_TEST_RUN driver, or `exec` of a
//! tool (nft, iperf3) in that place. Servers print `{"ready":true}` once
//! listening; clients print one JSON line with their counts and exit.
//!
//! The parent side, [`Worker`], kills and reaps its child on drop, and every
//! child gets `PR_SET_PDEATHSIG` so nothing outlives the benchmark.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where a worker runs: absolute cgroup directory and netns name.
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub cgroup: Option<std::path::PathBuf>,
    pub netns: Option<String>,
}

/// A running worker (see the module docs).
pub struct Worker {
    child: Child,
    desc: String,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn command(place: &Place, job: &Value) -> Command {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let mut spec = job.clone();
    if let Some(cg) = &place.cgroup {
        spec["cgroup"] = json!(cg.display().to_string());
    }
    if let Some(ns) = &place.netns {
        spec["netns"] = json!(ns);
    }
    let mut cmd = Command::new(exe);
    cmd.arg("__worker").arg(spec.to_string());
    // SAFETY: prctl is async-signal-safe; nothing else runs in the hook.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd
}

impl Worker {
    /// Starts a job; its stdout lines arrive through [`Worker::line`].
    pub fn spawn(place: &Place, job: Value) -> Worker {
        let desc = format!("worker {job} at {place:?}");
        let mut cmd = command(place, &job);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more: keep draining.
                    continue;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let stderr = std::sync::Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut s = String::new();
                let mut r = BufReader::new(err);
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    *stderr.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
                }
            });
        }
        Worker {
            child,
            desc,
            lines,
            stderr,
        }
    }

    /// Starts a server job and waits (10 s at most) for its readiness line.
    pub fn server(place: &Place, job: Value) -> Worker {
        let w = Worker::spawn(place, job);
        w.wait_line(Duration::from_secs(10), |l| l.contains("\"ready\":true"));
        w
    }

    /// Waits for a stdout line satisfying `pred`; panics with the worker's
    /// stderr when it does not come within `timeout` or the worker exits.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            crate::check_interrupted();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "{}: no expected output within {timeout:?}; stderr: {}",
                    self.desc,
                    self.stderr()
                );
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) if pred(&l) => return l,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{}: exited without the expected output; stderr: {}",
                    self.desc,
                    self.stderr()
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for a client job's JSON result line (within `timeout`), then for
    /// the worker to exit.
    pub fn result(mut self, timeout: Duration) -> Value {
        let line = self.wait_line(timeout, |l| l.starts_with('{'));
        let _ = self.child.wait();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: bad result line {line:?}: {e}", self.desc))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a job to completion: its stdout and stderr, and whether it succeeded
/// (for `exec` of short tools: `nft -f`, `iperf3 -c`).
pub fn run_to_end(place: &Place, job: Value) -> (bool, String, String) {
    let mut cmd = command(place, &job);
    cmd.stdin(Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run worker {job}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ------------------------------------------------------------ child side

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("envguard-bench worker: {msg}");
    std::process::exit(2);
}

fn print_line(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Entry point of `envguard-bench __worker JSON`.
pub fn main(spec: &str) -> ! {
    let spec: Value = serde_json::from_str(spec).unwrap_or_else(|e| die(format!("bad spec: {e}")));
    if let Some(cg) = spec["cgroup"].as_str() {
        let procs = std::path::Path::new(cg).join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            die(format!("cannot join {}: {e}", procs.display()));
        }
    }
    if let Some(ns) = spec["netns"].as_str() {
        let path = format!("/run/netns/{ns}");
        let f = std::fs::File::open(&path).unwrap_or_else(|e| die(format!("{path}: {e}")));
        // SAFETY: plain syscall on a valid descriptor.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            die(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
    }
    let addr = |k: &str| -> IpAddr {
        spec[k]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| die(format!("missing address {k}")))
    };
    let num = |k: &str| -> u64 {
        spec[k]
            .as_u64()
            .unwrap_or_else(|| die(format!("missing number {k}")))
    };
    let port = |k: &str| -> u16 { u16::try_from(num(k)).unwrap_or_else(|_| die("bad port")) };
    let dur = |k: &str| Duration::from_millis(num(k));
    match spec["job"].as_str().unwrap_or("") {
        "exec" => {
            let argv: Vec<String> = spec["argv"]
                .as_array()
                .unwrap_or_else(|| die("exec without argv"))
                .iter()
                .map(|a| a.as_str().unwrap_or_default().to_owned())
                .collect();
            let err = Command::new(&argv[0]).args(&argv[1..]).exec();
            die(format!("exec {argv:?}: {err}"))
        }
        "crr_server" => crr_server(SocketAddr::new(addr("addr"), port("port"))),
        "echo_server" => echo_server(SocketAddr::new(addr("addr"), port("port"))),
        "udp_echo_server" => udp_echo_server(SocketAddr::new(addr("addr"), port("port"))),
        "crr_client" => crr_client(SocketAddr::new(addr("addr"), port("port")), dur("ms")),
        "rr_client" => rr_client(SocketAddr::new(addr("addr"), port("port")), dur("ms")),
        "mixed_client" => mixed_client(&spec, dur("ms")),
        "mode_watch" => mode_watch(SocketAddr::new(addr("addr"), port("port"))),
        "probe_connect" => probe_connect(SocketAddr::new(addr("addr"), port("port")), dur("ms")),
        "udp_connect_flood" => {
            udp_connect_flood(SocketAddr::new(addr("addr"), port("port")), dur("ms"))
        }
        "testrun" => crate::kernel::testrun_worker(&spec),
        "testrun_loop" => crate::kernel::testrun_loop_worker(&spec),
        other => die(format!("unknown job {other:?}")),
    }
    std::process::exit(0)
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A socket of `addr`'s family, as an owned fd.
fn socket(addr: &SocketAddr, ty: libc::c_int) -> OwnedFd {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        die(format!("socket: {}", errno()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `sockaddr_storage` for `addr` and its length.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn connect_fd(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and address.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const ss).cast(), len) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn bind_fd(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and address.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const ss).cast(), len) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn listener(addr: SocketAddr) -> OwnedFd {
    let fd = socket(&addr, libc::SOCK_STREAM);
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    bind_fd(&fd, &addr).unwrap_or_else(|e| die(format!("bind {addr}: {e}")));
    // SAFETY: valid fd.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        die(format!("listen {addr}: {}", errno()));
    }
    fd
}

fn accept(l: &OwnedFd) -> OwnedFd {
    loop {
        // SAFETY: valid listening fd; no address wanted.
        let fd = unsafe {
            libc::accept4(
                l.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor.
            return unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let e = errno();
        if e.kind() != std::io::ErrorKind::Interrupted
            && e.raw_os_error() != Some(libc::ECONNABORTED)
        {
            die(format!("accept: {e}"));
        }
    }
}

fn write1(fd: &OwnedFd, b: u8) -> bool {
    // SAFETY: valid fd and 1-byte buffer.
    unsafe { libc::write(fd.as_raw_fd(), (&raw const b).cast(), 1) == 1 }
}

fn read1(fd: &OwnedFd) -> Option<u8> {
    let mut b = 0u8;
    // SAFETY: valid fd and 1-byte buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut b).cast(), 1) };
    (n == 1).then_some(b)
}

/// Abortive close: no TIME_WAIT on either side, so a long run never runs out
/// of ports or piles up timewait sockets.
fn close_rst(fd: OwnedFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and linger buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(fd);
}

/// Iterative connect/accept/close server: accepts, writes one byte, closes.
fn crr_server(addr: SocketAddr) {
    let l = listener(addr);
    print_line(&json!({"ready": true, "pid": std::process::id()}));
    loop {
        let c = accept(&l);
        let _ = write1(&c, b'x');
        drop(c);
    }
}

/// Iterative echo server: one connection at a time, echoes until EOF.
fn echo_server(addr: SocketAddr) {
    let l = listener(addr);
    print_line(&json!({"ready": true, "pid": std::process::id()}));
    loop {
        let c = accept(&l);
        setsockopt_int(&c, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::read(c.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            // SAFETY: valid fd; n bytes of buf are initialised.
            if unsafe { libc::write(c.as_raw_fd(), buf.as_ptr().cast(), n as usize) } != n {
                break;
            }
        }
    }
}

fn udp_echo_server(addr: SocketAddr) {
    let s = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| die(format!("bind {addr}: {e}")));
    print_line(&json!({"ready": true, "pid": std::process::id()}));
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

/// Connections per second: connect, read the server's byte, close (RST).
fn crr_client(addr: SocketAddr, d: Duration) {
    let start = Instant::now();
    let (mut ops, mut errors) = (0u64, 0u64);
    while start.elapsed() < d {
        let fd = socket(&addr, libc::SOCK_STREAM);
        if connect_fd(&fd, &addr).is_err() || read1(&fd).is_none() {
            errors += 1;
            if errors > 1000 {
                die(format!("crr: too many errors: {}", errno()));
            }
            continue;
        }
        close_rst(fd);
        ops += 1;
    }
    print_line(&json!({"ops": ops, "errors": errors, "secs": start.elapsed().as_secs_f64()}));
}

/// Request/response rate: one byte each way on one connection.
fn rr_client(addr: SocketAddr, d: Duration) {
    let fd = socket(&addr, libc::SOCK_STREAM);
    connect_fd(&fd, &addr).unwrap_or_else(|e| die(format!("connect {addr}: {e}")));
    setsockopt_int(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < d {
        if !write1(&fd, b'r') || read1(&fd).is_none() {
            die(format!("rr: connection broke: {}", errno()));
        }
        ops += 1;
    }
    print_line(&json!({"ops": ops, "secs": start.elapsed().as_secs_f64()}));
}

/// Traffic that runs every envguard program: TCP over both families with an
/// explicit bind first (post_bind4/6, connect4/6, both packet hooks), and
/// unconnected UDP datagrams (sendmsg4/6).
fn mixed_client(spec: &Value, d: Duration) {
    let sa = |k: &str| -> SocketAddr {
        spec[k]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| die(format!("missing socket address {k}")))
    };
    let (tcp4, tcp6, udp4, udp6) = (sa("tcp4"), sa("tcp6"), sa("udp4"), sa("udp6"));
    let (bind4, bind6) = (sa("bind4"), sa("bind6"));
    let start = Instant::now();
    let mut counts = [0u64; 4];
    let mut buf = [0u8; 64];
    while start.elapsed() < d {
        for (i, (dst, bind)) in [(tcp4, bind4), (tcp6, bind6)].into_iter().enumerate() {
            let fd = socket(&dst, libc::SOCK_STREAM);
            bind_fd(&fd, &bind).unwrap_or_else(|e| die(format!("bind {bind}: {e}")));
            connect_fd(&fd, &dst).unwrap_or_else(|e| die(format!("connect {dst}: {e}")));
            if !write1(&fd, b'm') || read1(&fd).is_none() {
                die(format!("echo from {dst} failed"));
            }
            close_rst(fd);
            counts[i] += 1;
        }
        for (i, dst) in [(2, udp4), (3, udp6)] {
            let s = std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                .unwrap_or_else(|e| die(format!("udp bind: {e}")));
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap_or_else(|e| die(e));
            for _ in 0..4 {
                s.send_to(b"m", dst)
                    .unwrap_or_else(|e| die(format!("sendto {dst}: {e}")));
                s.recv_from(&mut buf)
                    .unwrap_or_else(|e| die(format!("recvfrom {dst}: {e}")));
                counts[i] += 1;
            }
        }
    }
    print_line(&json!({
        "tcp4_connections": counts[0], "tcp6_connections": counts[1],
        "udp4_datagrams": counts[2], "udp6_datagrams": counts[3],
        "secs": start.elapsed().as_secs_f64()
    }));
}

/// connect() of one UDP socket, over and over: each call is judged by
/// connect4/6 and, for a violating destination, makes one event record;
/// no packet is sent, so the sender costs little besides the hook.
fn udp_connect_flood(addr: SocketAddr, d: Duration) {
    let fd = socket(&addr, libc::SOCK_DGRAM);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut failed = 0u64;
    'outer: loop {
        for _ in 0..256 {
            match connect_fd(&fd, &addr) {
                Ok(()) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        if start.elapsed() >= d {
            break 'outer;
        }
    }
    print_line(&json!({"calls": sent, "failed": failed, "secs": start.elapsed().as_secs_f64()}));
}

/// One TCP connect bounded by a timeout: `connected`, `EPERM` (refused by a
/// cgroup hook), `refused` (RST), `timeout` (dropped) or another error.
fn probe_connect(addr: SocketAddr, timeout: Duration) {
    let fd = socket(&addr, libc::SOCK_STREAM | libc::SOCK_NONBLOCK);
    let result = match connect_fd(&fd, &addr) {
        Ok(()) => "connected".to_owned(),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&raw mut pfd, 1, timeout.as_millis() as libc::c_int) };
            if n == 0 {
                "timeout".to_owned()
            } else {
                let mut err: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: valid fd and buffers.
                unsafe {
                    libc::getsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&raw mut err).cast(),
                        &raw mut len,
                    )
                };
                match err {
                    0 => "connected".to_owned(),
                    libc::ECONNREFUSED => "refused".to_owned(),
                    e => std::io::Error::from_raw_os_error(e).to_string(),
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => "EPERM".to_owned(),
        Err(e) => e.to_string(),
    };
    print_line(&json!({"result": result}));
}

/// CLOCK_MONOTONIC in ns (what `Instant` uses, comparable across processes).
pub fn monotonic_ns() -> u64 {
    // SAFETY: all zeros is a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and buffer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Watches the mode in force from the outside: connect() of one UDP socket
/// to a destination the policy does not allow, over and over (no packet is
/// sent); prints `{"state":"ok"|"EPERM","t_ns":MONOTONIC}` at every change
/// (audit lets the call through, enforce refuses it), until killed.
fn mode_watch(addr: SocketAddr) {
    let fd = socket(&addr, libc::SOCK_DGRAM);
    let mut last: Option<bool> = None;
    print_line(&json!({"ready": true, "pid": std::process::id()}));
    loop {
        let refused =
            matches!(connect_fd(&fd, &addr), Err(e) if e.raw_os_error() == Some(libc::EPERM));
        if last != Some(refused) {
            let t = monotonic_ns();
            last = Some(refused);
            print_line(&json!({"state": if refused { "EPERM" } else { "ok" }, "t_ns": t}));
        }
    }
}
