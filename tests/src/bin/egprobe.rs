//! `egprobe`: the one-shot network probe the envguard integration tests run
//! inside their cgroups and network namespaces.
//!
//! ```text
//! egprobe [--cgroup ABS_DIR] [--netns NAME] COMMAND ...
//!   connect tcp|udp ADDR PORT [--timeout-ms N] [--bind SRC] [--ipv6-dstopts] [--ipv6-hopopts]
//!   serve   tcp|udp ADDR[,ADDR...] PORT
//!   whoami
//!   connect-loop tcp ADDR PORT [--rate N] [--duration-ms N] [--timeout-ms N]
//!   udp-burst ADDR PORT --count N
//!   flows [--rounds N] [--timeout-ms N] [--gap-ms N] tcp|udp,ADDR,PORT...
//!   ctl-race SOCKET REQUEST PROGRAM [ARGS...]
//!   ctl-flood SOCKET EVENTS IDLE
//!   hold MS
//! ```
//!
//! `--cgroup` writes the probe's pid into `ABS_DIR/cgroup.procs` and
//! `--netns` joins `/run/netns/NAME`, both before any socket is created, so
//! every socket the probe opens belongs to that cgroup and namespace.
//!
//! Every command prints exactly one JSON line on stdout:
//! - `connect`: `{"ok":true,"pid":P,"local":"IP:PORT",...}` or
//!   `{"ok":false,"errno":N,"error":"...","stage":"bind|connect|send|recv|echo","pid":P,...}`.
//!   TCP: connect (non-blocking, bounded by the timeout; a timeout is reported
//!   as errno ETIMEDOUT), send one line, read the echo. UDP: unconnected
//!   `sendto`, then `recvfrom` the echo within the timeout.
//! - `serve`: binds and listens on every address, then prints
//!   `{"ready":true,"pid":P}` and echoes forever (thread per socket and per
//!   TCP connection).
//! - `whoami`: `{"pid":P,"cgroup":"/path","netns_ino":N}`.
//!
//! Except for these, which print several lines or report many operations:
//! - `connect-loop`: prints `{"started":true,...}`, then TCP connect + line
//!   echo attempts paced at `--rate` per second (default 300, each bounded
//!   by `--timeout-ms`, default 1000), one fresh socket each, with a
//!   `{"progress":true,"attempts":N,...}` line every 100 ms, until
//!   `--duration-ms` (default 10000) passed or its stdin reached EOF; then a
//!   `{"done":true,...}` summary: counts of attempts, `connected` (connect
//!   succeeded), `ok` (echo too), `eperm` (refused at connect), `other`
//!   failures by kind, the achieved rate, the largest gap between two
//!   attempts, the CLOCK_MONOTONIC start time of every attempt
//!   (`attempt_at_mono_ns`), its end (`attempt_done_mono_ns`) and its
//!   outcome (`attempt_outcomes`, one character per attempt: `o` ok, `e`
//!   EPERM at connect, `c` connected but the echo failed, `x` any other
//!   failure), and the start times of the first connected and failed ones
//!   (`mono_ns` fields share the tests' clock).
//! - `udp-burst`: one unconnected UDP socket, `--count` `sendto`s of one
//!   datagram to ADDR PORT as fast as possible, no receive:
//!   `{"pid":P,"sent":N,"ok":K,"eperm":E,"other":O,"errors":{...},
//!   "start_mono_ns":T0,"end_mono_ns":T1,"rate":R}`.
//! - `flows`: per `--rounds` (default 3), every spec in order: TCP specs keep
//!   one connection each (connected in the first round, or again after a
//!   failure) and echo one line on it per round; UDP specs share one
//!   unconnected socket per family and `sendto` + `recvfrom` the echo;
//!   `--gap-ms` sleeps that long between rounds.
//!   `{"pid":P,"results":[{"spec":"tcp,ADDR,PORT","outcomes":["ok","connect:1",...]}]}`
//!   with each outcome `ok` or `STAGE:ERRNO`.
//!
//! - `ctl-race`: a hostile control-socket client. Connects to the unix
//!   socket SOCKET, then forks: the parent execs PROGRAM (e.g. a setuid-root
//!   `egprobe hold`) keeping its pid, the connecting one; the child waits
//!   (at most 5 s) until that pid holds CAP_NET_ADMIN in its effective set,
//!   then sends the REQUEST line on the connection and prints
//!   `{"answer":LINE,"peer_had_net_admin":BOOL}`. Run it as an unprivileged
//!   user: it shows whether the agent judges a request by what the
//!   connecting process became after connecting.
//! - `ctl-flood`: a client hogging the control socket. First EVENTS
//!   connections one after the other, each sending `{"cmd":"events"}` and
//!   reading its answer line (5 s at most); a refused one is then read to
//!   its end. Then IDLE connections that send nothing, and one more that
//!   sends `{"cmd":"status"}` (the sentinel: the agent accepts in order, so
//!   once it is answered every idle connection refused before it has its
//!   answer waiting); each idle one is then read without blocking. Prints
//!   `{"events":{"subscribed":N,"errors":{ERROR:N},"silent":N,"reset":N,
//!   "open_after_error":N},"idle":{"waiting":N,"errors":{...},"silent":N,
//!   "reset":N},"sentinel":LINE}` (`silent`: closed without a line;
//!   `waiting`: accepted, no answer yet), keeps the subscriptions and the
//!   idle connections open until its stdin closes, then exits.
//! - `hold`: sleeps MS milliseconds, prints nothing.
//!
//! `connect --ipv6-dstopts` / `--ipv6-hopopts` (TCP over IPv6): the socket
//! gets a destination-options / hop-by-hop header holding one PadN option
//! (`IPV6_DSTOPTS` / `IPV6_HOPOPTS`, CAP_NET_RAW), so every packet it sends
//! carries that extension header between the IPv6 and TCP headers.
//!
//! Setup failures (bad arguments, cgroup or namespace not joinable) print a
//! message on stderr and exit with status 2 without printing JSON.

use std::io::{self, BufRead, BufReader, Write};
use std::mem;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("egprobe: {msg}");
    std::process::exit(2);
}

fn usage() -> ! {
    die("usage: egprobe [--cgroup DIR] [--netns NAME] \
         (connect tcp|udp ADDR PORT [--timeout-ms N] [--bind SRC] [--ipv6-dstopts] [--ipv6-hopopts] | serve tcp|udp ADDR[,ADDR...] PORT | whoami \
         | connect-loop tcp ADDR PORT [--rate N] [--duration-ms N] [--timeout-ms N] | udp-burst ADDR PORT --count N \
         | flows [--rounds N] [--timeout-ms N] [--gap-ms N] tcp|udp,ADDR,PORT... \
         | ctl-race SOCKET REQUEST PROGRAM [ARGS...] | ctl-flood SOCKET EVENTS IDLE | hold MS)")
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut cgroup: Option<PathBuf> = None;
    let mut netns: Option<String> = None;
    while let Some(first) = args.first() {
        match first.as_str() {
            "--cgroup" if args.len() >= 2 => {
                cgroup = Some(PathBuf::from(args.remove(1)));
                args.remove(0);
            }
            "--netns" if args.len() >= 2 => {
                netns = Some(args.remove(1));
                args.remove(0);
            }
            _ => break,
        }
    }
    if let Some(dir) = &cgroup {
        let procs = dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            die(format!("cannot join cgroup {}: {e}", procs.display()));
        }
    }
    if let Some(name) = &netns {
        join_netns(name);
    }
    if args.is_empty() {
        usage();
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "connect" => connect(&args),
        "serve" => serve(&args),
        "whoami" => whoami(),
        "connect-loop" => connect_loop(&args),
        "udp-burst" => udp_burst(&args),
        "flows" => flows(&args),
        "ctl-race" => ctl_race(&args),
        "ctl-flood" => ctl_flood(&args),
        "hold" => {
            let ms: u64 = parse_num("duration", args.first().unwrap_or_else(|| usage()));
            std::thread::sleep(Duration::from_millis(ms));
        }
        _ => usage(),
    }
}

fn join_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file =
        std::fs::File::open(&path).unwrap_or_else(|e| die(format!("cannot open {path}: {e}")));
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        die(format!("setns({path}): {}", io::Error::last_os_error()));
    }
}

fn parse_proto(s: &str) -> bool {
    match s {
        "tcp" => true,
        "udp" => false,
        _ => die(format!("unknown protocol {s:?} (tcp|udp)")),
    }
}

fn parse_ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| die(format!("bad IP address {s:?}")))
}

fn parse_port(s: &str) -> u16 {
    s.parse().unwrap_or_else(|_| die(format!("bad port {s:?}")))
}

fn print_line(v: Value) {
    let mut out = io::stdout().lock();
    // A closed stdout only means nobody listens any more.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- connect

struct Failure {
    stage: &'static str,
    err: io::Error,
}

fn fail(stage: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |err| Failure { stage, err }
}

fn connect(args: &[String]) {
    if args.len() < 3 {
        usage();
    }
    let tcp = parse_proto(&args[0]);
    let dst = SocketAddr::new(parse_ip(&args[1]), parse_port(&args[2]));
    let mut timeout = Duration::from_millis(3000);
    let mut bind: Option<IpAddr> = None;
    let mut rest = args[3..].iter();
    while let Some(opt) = rest.next() {
        match opt.as_str() {
            "--ipv6-dstopts" | "--ipv6-hopopts" => {
                ipv6_ext_hdrs().push(if opt == "--ipv6-dstopts" {
                    libc::IPV6_DSTOPTS
                } else {
                    libc::IPV6_HOPOPTS
                });
                continue;
            }
            _ => {}
        }
        let val = rest.next().unwrap_or_else(|| usage());
        match opt.as_str() {
            "--timeout-ms" => {
                timeout = Duration::from_millis(
                    val.parse()
                        .unwrap_or_else(|_| die(format!("bad timeout {val:?}"))),
                )
            }
            "--bind" => bind = Some(parse_ip(val)),
            _ => usage(),
        }
    }
    // Whatever happens, never outlive a few timeouts.
    let secs = u32::try_from(timeout.as_secs())
        .unwrap_or(60)
        .saturating_mul(3)
        + 5;
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(secs) };

    let start = Instant::now();
    let mut local: Option<SocketAddr> = None;
    let result = if tcp {
        tcp_exchange(dst, bind, timeout, &mut local)
    } else {
        udp_exchange(dst, bind, timeout, &mut local)
    };
    let elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let local = local.map(|a| a.to_string());
    let pid = std::process::id();
    match result {
        Ok(()) => {
            print_line(json!({"ok": true, "pid": pid, "local": local, "elapsed_ms": elapsed_ms}))
        }
        Err(Failure { stage, err }) => print_line(json!({
            "ok": false,
            "errno": err.raw_os_error(),
            "error": err.to_string(),
            "stage": stage,
            "pid": pid,
            "local": local,
            "elapsed_ms": elapsed_ms,
        })),
    }
}

fn payload() -> String {
    format!("egprobe {} says hello\n", std::process::id())
}

fn tcp_exchange(
    dst: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
    local: &mut Option<SocketAddr>,
) -> Result<(), Failure> {
    let fd = raw_socket(&dst, libc::SOCK_STREAM).map_err(fail("socket"))?;
    set_ipv6_ext_hdrs(&fd).map_err(fail("setsockopt"))?;
    if let Some(src) = bind {
        sys_bind(&fd, SocketAddr::new(src, 0)).map_err(fail("bind"))?;
        *local = sock_name(&fd).ok();
    }
    nonblocking_connect(&fd, dst, timeout).map_err(fail("connect"))?;
    *local = sock_name(&fd).ok();
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false).map_err(fail("connect"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(fail("recv"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(fail("send"))?;
    let msg = payload();
    (&stream).write_all(msg.as_bytes()).map_err(fail("send"))?;
    let mut reader = BufReader::new(&stream);
    let mut echo = String::new();
    reader.read_line(&mut echo).map_err(fail("recv"))?;
    if echo != msg {
        return Err(Failure {
            stage: "echo",
            err: io::Error::other(format!("echo mismatch: sent {msg:?}, got {echo:?}")),
        });
    }
    Ok(())
}

fn udp_exchange(
    dst: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
    local: &mut Option<SocketAddr>,
) -> Result<(), Failure> {
    let src = bind.unwrap_or(match dst {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
    });
    let sock = UdpSocket::bind(SocketAddr::new(src, 0)).map_err(fail("bind"))?;
    *local = sock.local_addr().ok();
    sock.set_read_timeout(Some(timeout)).map_err(fail("recv"))?;
    let msg = payload();
    sock.send_to(msg.as_bytes(), dst).map_err(fail("send"))?;
    *local = sock.local_addr().ok();
    let mut buf = [0u8; 2048];
    let (n, _from) = sock.recv_from(&mut buf).map_err(|e| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Failure {
                stage: "recv",
                err: io::Error::from_raw_os_error(libc::ETIMEDOUT),
            }
        } else {
            Failure {
                stage: "recv",
                err: e,
            }
        }
    })?;
    if &buf[..n] != msg.as_bytes() {
        return Err(Failure {
            stage: "echo",
            err: io::Error::other(format!(
                "echo mismatch: sent {msg:?}, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            )),
        });
    }
    Ok(())
}

fn raw_socket(dst: &SocketAddr, ty: libc::c_int) -> io::Result<OwnedFd> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the descriptor is owned right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*std::ptr::addr_of!(*storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Ok(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*std::ptr::addr_of!(*storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        f => Err(io::Error::other(format!("unexpected address family {f}"))),
    }
}

/// The extension headers `connect --ipv6-dstopts/--ipv6-hopopts` asked for
/// (`IPV6_DSTOPTS`, `IPV6_HOPOPTS`).
fn ipv6_ext_hdrs() -> std::sync::MutexGuard<'static, Vec<libc::c_int>> {
    static HDRS: std::sync::Mutex<Vec<libc::c_int>> = std::sync::Mutex::new(Vec::new());
    HDRS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives the socket the asked-for extension headers, each 8 bytes: next
/// header (the kernel fills it in), length 0 (8 bytes), one PadN option with
/// 4 zero bytes.
fn set_ipv6_ext_hdrs(fd: &OwnedFd) -> io::Result<()> {
    let hdr: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    for &opt in ipv6_ext_hdrs().iter() {
        // SAFETY: hdr is a readable buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                hdr.as_ptr().cast(),
                hdr.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn sys_bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = envguard_tests::sockaddr::to_sockaddr(addr);
    // SAFETY: sa/len describe a valid socket address.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(sa).cast(), len) };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sock_name(fd: &OwnedFd) -> io::Result<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut sa: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: sa/len describe a writable buffer of the right size.
    let rc =
        unsafe { libc::getsockname(fd.as_raw_fd(), std::ptr::addr_of_mut!(sa).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    from_sockaddr(&sa)
}

fn nonblocking_connect(fd: &OwnedFd, dst: SocketAddr, timeout: Duration) -> io::Result<()> {
    let (sa, len) = envguard_tests::sockaddr::to_sockaddr(dst);
    // SAFETY: sa/len describe a valid socket address.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(sa).cast(), len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(err);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut soerr: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: soerr/len describe a writable c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::addr_of_mut!(soerr).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        return if soerr == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(soerr))
        };
    }
}

// ------------------------------------------------------------------ serve

fn serve(args: &[String]) {
    if args.len() != 3 {
        usage();
    }
    let tcp = parse_proto(&args[0]);
    let addrs: Vec<SocketAddr> = args[1]
        .split(',')
        .map(|a| SocketAddr::new(parse_ip(a), parse_port(&args[2])))
        .collect();
    let mut threads = Vec::new();
    if tcp {
        for addr in &addrs {
            let listener =
                TcpListener::bind(addr).unwrap_or_else(|e| die(format!("bind tcp {addr}: {e}")));
            threads.push(std::thread::spawn(move || tcp_accept_loop(listener)));
        }
    } else {
        for addr in &addrs {
            let sock =
                UdpSocket::bind(addr).unwrap_or_else(|e| die(format!("bind udp {addr}: {e}")));
            threads.push(std::thread::spawn(move || udp_echo_loop(sock)));
        }
    }
    print_line(json!({"ready": true, "pid": std::process::id()}));
    for t in threads {
        let _ = t.join();
    }
}

fn tcp_accept_loop(listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, _peer)) => {
                std::thread::spawn(move || tcp_echo(stream));
            }
            Err(e) => {
                eprintln!("egprobe: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn tcp_echo(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if (&stream).write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

fn udp_echo_loop(sock: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    eprintln!("egprobe: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("egprobe: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ----------------------------------------------------------------- whoami

fn whoami() {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        });
    let netns_ino = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    print_line(json!({"pid": std::process::id(), "cgroup": cgroup, "netns_ino": netns_ino}));
}

// ----------------------------------------------------------- connect-loop

/// CLOCK_MONOTONIC in ns: the same clock in every process, so the tests can
/// place the probe's events relative to their own.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Whether stdin reached EOF or was closed; never blocks. Input is discarded.
fn stdin_closed() -> bool {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
        return false;
    }
    if pfd.revents & libc::POLLIN != 0 {
        let mut buf = [0u8; 256];
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        return n <= 0;
    }
    pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

fn parse_num<T: std::str::FromStr>(what: &str, s: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| die(format!("bad {what} {s:?}")))
}

/// Keeps at most this many timestamps per list in the summary.
const MAX_TIMES: usize = 100;

#[derive(Default)]
struct LoopStats {
    attempts: u64,
    connected: u64,
    ok: u64,
    eperm: u64,
    other: u64,
    errors: std::collections::BTreeMap<String, u64>,
    connected_at_ns: Vec<u64>,
    failed_at_ns: Vec<u64>,
    /// Start of every attempt (up to `MAX_ATTEMPT_TIMES`).
    attempt_at_ns: Vec<u64>,
    /// End of every attempt (as many as `attempt_at_ns`).
    attempt_done_ns: Vec<u64>,
    /// Outcome of every attempt (as many as `attempt_at_ns`): `o` ok, `e`
    /// EPERM at connect, `c` connected but the exchange failed, `x` other.
    outcomes: String,
    max_gap_ns: u64,
}

/// Keeps at most this many attempt start times (about 3 minutes at 300/s).
const MAX_ATTEMPT_TIMES: usize = 60_000;

impl LoopStats {
    fn counts(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("attempts".into(), self.attempts.into());
        m.insert("connected".into(), self.connected.into());
        m.insert("ok".into(), self.ok.into());
        m.insert("eperm".into(), self.eperm.into());
        m.insert("other".into(), self.other.into());
        m
    }
}

fn connect_loop(args: &[String]) {
    if args.len() < 3 || !parse_proto(&args[0]) {
        die("connect-loop supports tcp only");
    }
    let dst = SocketAddr::new(parse_ip(&args[1]), parse_port(&args[2]));
    let mut rate: u64 = 300;
    let mut duration_ms: u64 = 10_000;
    let mut timeout_ms: u64 = 1000;
    let mut rest = args[3..].iter();
    while let Some(opt) = rest.next() {
        let val = rest.next().unwrap_or_else(|| usage());
        match opt.as_str() {
            "--rate" => rate = parse_num("rate", val),
            "--duration-ms" => duration_ms = parse_num("duration", val),
            "--timeout-ms" => timeout_ms = parse_num("timeout", val),
            _ => usage(),
        }
    }
    if rate == 0 {
        die("--rate must be positive");
    }
    // Whatever happens, never outlive the duration by much.
    let secs = u32::try_from((duration_ms + 2 * timeout_ms) / 1000 + 10).unwrap_or(u32::MAX);
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(secs) };
    let timeout = Duration::from_millis(timeout_ms);
    let period_ns = 1_000_000_000 / rate;
    let pid = std::process::id();
    let start = mono_ns();
    print_line(json!({"started": true, "pid": pid, "mono_ns": start}));

    let mut st = LoopStats::default();
    let mut last: Option<u64> = None;
    let mut next_progress = start + 100_000_000;
    let progress = |st: &LoopStats, now: u64| {
        let mut m = st.counts();
        m.insert("progress".into(), true.into());
        m.insert("mono_ns".into(), now.into());
        print_line(Value::Object(m));
    };
    loop {
        let now = mono_ns();
        if now - start >= duration_ms * 1_000_000 || stdin_closed() {
            break;
        }
        let due = start + st.attempts * period_ns;
        if now < due {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        let t = mono_ns();
        if let Some(prev) = last {
            st.max_gap_ns = st.max_gap_ns.max(t - prev);
        }
        last = Some(t);
        st.attempts += 1;
        if st.attempt_at_ns.len() < MAX_ATTEMPT_TIMES {
            st.attempt_at_ns.push(t);
        }
        let mut local = None;
        let outcome = match tcp_exchange(dst, None, timeout, &mut local) {
            Ok(()) => {
                st.connected += 1;
                st.ok += 1;
                if st.connected_at_ns.len() < MAX_TIMES {
                    st.connected_at_ns.push(t);
                }
                'o'
            }
            Err(Failure { stage, err }) => {
                let o = if stage == "connect" && err.raw_os_error() == Some(libc::EPERM) {
                    st.eperm += 1;
                    'e'
                } else {
                    st.other += 1;
                    *st.errors.entry(format!("{stage}: {err}")).or_default() += 1;
                    if stage != "connect" && stage != "socket" {
                        st.connected += 1;
                        if st.connected_at_ns.len() < MAX_TIMES {
                            st.connected_at_ns.push(t);
                        }
                        'c'
                    } else {
                        'x'
                    }
                };
                if st.failed_at_ns.len() < MAX_TIMES {
                    st.failed_at_ns.push(t);
                }
                o
            }
        };
        let now = mono_ns();
        if st.attempt_done_ns.len() < st.attempt_at_ns.len() {
            st.attempt_done_ns.push(now);
            st.outcomes.push(outcome);
        }
        if now >= next_progress {
            progress(&st, now);
            next_progress = now + 100_000_000;
        }
    }
    let end = mono_ns();
    let elapsed_ns = (end - start).max(1);
    let mut m = st.counts();
    m.insert("done".into(), true.into());
    m.insert("pid".into(), pid.into());
    m.insert("errors".into(), json!(st.errors));
    m.insert("elapsed_ms".into(), (elapsed_ns / 1_000_000).into());
    m.insert(
        "rate".into(),
        (st.attempts as f64 * 1e9 / elapsed_ns as f64).into(),
    );
    m.insert("max_gap_ms".into(), (st.max_gap_ns as f64 / 1e6).into());
    m.insert("start_mono_ns".into(), start.into());
    m.insert("end_mono_ns".into(), end.into());
    m.insert("connected_at_mono_ns".into(), json!(st.connected_at_ns));
    m.insert("failed_at_mono_ns".into(), json!(st.failed_at_ns));
    m.insert("attempt_at_mono_ns".into(), json!(st.attempt_at_ns));
    m.insert("attempt_done_mono_ns".into(), json!(st.attempt_done_ns));
    m.insert("attempt_outcomes".into(), st.outcomes.into());
    print_line(Value::Object(m));
}

// -------------------------------------------------------------- udp-burst

fn unspecified(dst: &SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::from([0u8; 4]), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::from([0u16; 8]), 0),
    }
}

fn udp_burst(args: &[String]) {
    if args.len() != 4 || args[2] != "--count" {
        usage();
    }
    let dst = SocketAddr::new(parse_ip(&args[0]), parse_port(&args[1]));
    let count: u64 = parse_num("count", &args[3]);
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(60) };
    let sock = UdpSocket::bind(unspecified(&dst))
        .unwrap_or_else(|e| die(format!("bind udp for {dst}: {e}")));
    let msg = payload();
    let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let start = mono_ns();
    for _ in 0..count {
        match sock.send_to(msg.as_bytes(), dst) {
            Ok(_) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(e) => {
                other += 1;
                *errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    let end = mono_ns();
    print_line(json!({
        "pid": std::process::id(),
        "local": sock.local_addr().ok().map(|a| a.to_string()),
        "sent": count,
        "ok": ok,
        "eperm": eperm,
        "other": other,
        "errors": errors,
        "start_mono_ns": start,
        "end_mono_ns": end,
        "rate": count as f64 * 1e9 / (end - start).max(1) as f64,
    }));
}

// ------------------------------------------------------------------ flows

fn outcome(stage: &str, err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(n) => format!("{stage}:{n}"),
        None => format!("{stage}:{err}"),
    }
}

/// One round of a TCP spec: (re)connect if needed, then echo one line.
fn flow_tcp(conn: &mut Option<TcpStream>, dst: SocketAddr, timeout: Duration, tag: &str) -> String {
    if conn.is_none() {
        let connected = raw_socket(&dst, libc::SOCK_STREAM)
            .map_err(|e| outcome("socket", &e))
            .and_then(|fd| {
                nonblocking_connect(&fd, dst, timeout).map_err(|e| outcome("connect", &e))?;
                let s = TcpStream::from(fd);
                s.set_nonblocking(false)
                    .and_then(|()| s.set_read_timeout(Some(timeout)))
                    .and_then(|()| s.set_write_timeout(Some(timeout)))
                    .map_err(|e| outcome("connect", &e))?;
                Ok(s)
            });
        match connected {
            Ok(s) => *conn = Some(s),
            Err(o) => return o,
        }
    }
    let stream = conn.as_ref().expect("connected above");
    let msg = format!("{tag}\n");
    let result = (|| {
        (&*stream)
            .write_all(msg.as_bytes())
            .map_err(|e| outcome("send", &e))?;
        let mut echo = String::new();
        BufReader::new(stream)
            .read_line(&mut echo)
            .map_err(|e| outcome("recv", &e))?;
        if echo == msg {
            Ok(())
        } else {
            Err(format!("echo:{echo:?}"))
        }
    })();
    match result {
        Ok(()) => "ok".into(),
        Err(o) => {
            *conn = None;
            o
        }
    }
}

/// One round of a UDP spec: sendto, then receive the echo (older, late
/// echoes of other datagrams are skipped).
fn flow_udp(sock: &UdpSocket, dst: SocketAddr, timeout: Duration, tag: &str) -> String {
    if let Err(e) = sock.send_to(tag.as_bytes(), dst) {
        return outcome("send", &e);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return format!("recv:{}", libc::ETIMEDOUT);
        }
        if let Err(e) = sock.set_read_timeout(Some(left)) {
            return outcome("recv", &e);
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == tag.as_bytes() => return "ok".into(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return format!("recv:{}", libc::ETIMEDOUT);
            }
            Err(e) => return outcome("recv", &e),
        }
    }
}

fn flows(args: &[String]) {
    let mut rounds: usize = 3;
    let mut timeout_ms: u64 = 2000;
    let mut gap_ms: u64 = 0;
    let mut specs: Vec<(bool, SocketAddr, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = parse_num("rounds", it.next().unwrap_or_else(|| usage())),
            "--timeout-ms" => {
                timeout_ms = parse_num("timeout", it.next().unwrap_or_else(|| usage()))
            }
            "--gap-ms" => gap_ms = parse_num("gap", it.next().unwrap_or_else(|| usage())),
            spec => {
                let parts: Vec<&str> = spec.split(',').collect();
                if parts.len() != 3 {
                    die(format!("bad flow spec {spec:?} (tcp|udp,ADDR,PORT)"));
                }
                let dst = SocketAddr::new(parse_ip(parts[1]), parse_port(parts[2]));
                specs.push((parse_proto(parts[0]), dst, spec.to_owned()));
            }
        }
    }
    if specs.is_empty() {
        usage();
    }
    let timeout = Duration::from_millis(timeout_ms);
    let ops = u64::try_from(rounds * specs.len()).unwrap_or(u64::MAX);
    let gaps = u64::try_from(rounds)
        .unwrap_or(u64::MAX)
        .saturating_mul(gap_ms);
    let secs =
        u32::try_from((ops.saturating_mul(timeout_ms) + gaps) / 1000 + 10).unwrap_or(u32::MAX);
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(secs) };
    let pid = std::process::id();
    let bind_udp = |dst: &SocketAddr| {
        UdpSocket::bind(unspecified(dst)).unwrap_or_else(|e| die(format!("bind udp: {e}")))
    };
    let udp4 = bind_udp(&"0.0.0.0:0".parse().expect("literal"));
    let udp6 = bind_udp(&"[::]:0".parse().expect("literal"));
    let mut conns: Vec<Option<TcpStream>> = specs.iter().map(|_| None).collect();
    let mut outcomes: Vec<Vec<String>> = specs.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        if round > 0 {
            std::thread::sleep(Duration::from_millis(gap_ms));
        }
        for (i, (tcp, dst, _)) in specs.iter().enumerate() {
            let tag = format!("egprobe {pid} flow {i} round {round}");
            let o = if *tcp {
                flow_tcp(&mut conns[i], *dst, timeout, &tag)
            } else {
                let sock = if dst.is_ipv4() { &udp4 } else { &udp6 };
                flow_udp(sock, *dst, timeout, &tag)
            };
            outcomes[i].push(o);
        }
    }
    let results: Vec<Value> = specs
        .iter()
        .zip(outcomes)
        .map(|((_, _, spec), o)| json!({"spec": spec, "outcomes": o}))
        .collect();
    print_line(json!({"pid": pid, "results": results}));
}

// --------------------------------------------------------------- ctl-race

/// Whether process `pid` holds CAP_NET_ADMIN (bit 12) in its effective set.
fn has_net_admin(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

fn ctl_race(args: &[String]) {
    use std::os::unix::process::CommandExt;
    if args.len() < 3 {
        usage();
    }
    let (socket, request, program) = (&args[0], &args[1], &args[2]);
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| die(format!("connect {socket}: {e}")));
    let parent = std::process::id();
    // SAFETY: fork in a single-threaded process; the child only uses
    // async-signal-safe calls until it runs plain Rust code of its own.
    match unsafe { libc::fork() } {
        -1 => die(format!("fork: {}", io::Error::last_os_error())),
        0 => {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !has_net_admin(parent) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let had = has_net_admin(parent);
            let mut w = &stream;
            let _ = w.write_all(format!("{request}\n").as_bytes());
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut answer = String::new();
            let _ = BufReader::new(&stream).read_line(&mut answer);
            print_line(json!({"answer": answer.trim(), "peer_had_net_admin": had}));
            std::process::exit(0);
        }
        _ => {
            // Keep the pid that connected; the connection stays open in the child.
            let err = std::process::Command::new(program).args(&args[3..]).exec();
            die(format!("exec {program}: {err}"));
        }
    }
}

// -------------------------------------------------------------- ctl-flood

/// One line (without its newline) read byte by byte within `timeout`, so
/// nothing after it is consumed: `Ok(None)` at end of stream.
fn read_line_from(stream: &std::os::unix::net::UnixStream) -> io::Result<Option<String>> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*stream).read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[derive(Default)]
struct Answers {
    subscribed: u64,
    waiting: u64,
    errors: std::collections::BTreeMap<String, u64>,
    silent: u64,
    reset: u64,
    other: Vec<String>,
    open_after_error: u64,
}

impl Answers {
    /// Files the answer `line` of one connection; true if it subscribed.
    fn file(&mut self, answer: io::Result<Option<String>>) -> bool {
        match answer {
            Ok(None) => self.silent += 1,
            Ok(Some(line)) => match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["ok"] == true && v["result"] == "subscribed" => {
                    self.subscribed += 1;
                    return true;
                }
                Ok(v) if v["ok"] == false && v["error"].is_string() => {
                    let e = v["error"].as_str().unwrap_or_default().to_owned();
                    *self.errors.entry(e).or_default() += 1;
                }
                _ => self.other.push(line),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.waiting += 1,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => self.reset += 1,
            Err(e) => self.other.push(format!("read error: {e}")),
        }
        false
    }

    fn json(&self) -> Value {
        json!({
            "subscribed": self.subscribed,
            "waiting": self.waiting,
            "errors": self.errors,
            "silent": self.silent,
            "reset": self.reset,
            "other": self.other,
            "open_after_error": self.open_after_error,
        })
    }
}

fn ctl_flood(args: &[String]) {
    use std::os::unix::net::UnixStream;
    if args.len() != 3 {
        usage();
    }
    let socket = &args[0];
    let n_events: usize = parse_num("EVENTS", &args[1]);
    let n_idle: usize = parse_num("IDLE", &args[2]);
    let timeout = Duration::from_secs(5);
    // Over a thousand sockets: more than a default soft limit allows.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let open =
        || UnixStream::connect(socket).unwrap_or_else(|e| die(format!("connect {socket}: {e}")));
    let mut held = Vec::new();
    let mut events = Answers::default();
    for _ in 0..n_events {
        let s = open();
        let _ = (&s).write_all(b"{\"cmd\":\"events\"}\n");
        let _ = s.set_read_timeout(Some(timeout));
        if events.file(read_line_from(&s)) {
            held.push(s);
            continue;
        }
        // Refused: the agent closes the connection (its place free first).
        let mut rest = Vec::new();
        if std::io::Read::read_to_end(&mut &s, &mut rest).is_err() || !rest.is_empty() {
            events.open_after_error += 1;
        }
    }
    let idle_conns: Vec<UnixStream> = (0..n_idle).map(|_| open()).collect();
    let sentinel = open();
    let _ = (&sentinel).write_all(b"{\"cmd\":\"status\"}\n");
    let _ = sentinel.set_read_timeout(Some(timeout));
    let sentinel_answer = match read_line_from(&sentinel) {
        Ok(Some(l)) => Value::String(l),
        Ok(None) => Value::String("(closed without an answer)".into()),
        Err(e) => Value::String(format!("(read error: {e})")),
    };
    let mut idle = Answers::default();
    for s in &idle_conns {
        let _ = s.set_nonblocking(true);
        idle.file(read_line_from(s));
    }
    print_line(json!({
        "events": events.json(),
        "idle": idle.json(),
        "sentinel": sentinel_answer,
    }));
    // Hold everything until told to go.
    let _ = io::stdin().lock().read_line(&mut String::new());
    drop((held, idle_conns, sentinel));
}
