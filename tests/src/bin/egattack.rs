//! egattack: what a hostile workload does to get around envguard, one
//! scenario per command, for the adversarial suite (tests/adversarial.rs).
//!
//! `egattack [--cgroup ABS_DIR] [--netns NAME] [--uid N] COMMAND ARGS...`
//! joins the cgroup and network namespace, then drops to uid/gid N (an
//! unprivileged attacker) before creating any socket. Every command prints
//! JSON lines on stdout; an outcome is `"refused"` (EPERM: envguard said no),
//! `"echo"` (the peer answered), `"timeout"`, or `"error:<errno>"`.
//!
//! - `hijack ADDR PORT`: UDP to a same-host socket: send; bind ADDR:PORT
//!   itself with SO_REUSEADDR and close it; send again. Prints
//!   `{"before":O,"after_rebind":O}`.
//! - `udp-serve ADDR PORT`: a UDP echo server bound with SO_REUSEADDR;
//!   prints `{"ready":true,"pid":P}`.
//! - `udp-from SRC_ADDR SRC_PORT DST_ADDR DST_PORT`: one datagram from a
//!   chosen source port; prints `{"outcome":O}`.
//! - `tcp-from SRC_ADDR SRC_PORT DST_ADDR DST_PORT`: connect from a chosen
//!   source port (SO_REUSEADDR), exchange a line, close with a reset (no
//!   TIME_WAIT, so the same 4-tuple can be used again at once); prints
//!   `{"outcome":O}`.
//! - `tcp-serve-close ADDR PORT`: accepts connections, reads a line, answers
//!   it and resets the connection; prints `{"ready":true,"pid":P}`.
//! - `tcp-hold DST_ADDR DST_PORT`: connects, prints `{"connected":O}`, then
//!   for every line on stdin sends a line and prints `{"exchange":O}`.
//! - `push-serve tcp|udp ADDR PORT`: listens (TCP) or binds (UDP), prints
//!   `{"ready":true,"pid":P}`, takes one peer (accepts a connection, or
//!   receives a datagram, which it does not answer) and prints
//!   `{"accepted":PEER}`, then for every line on stdin sends that peer a
//!   line unasked (UDP: `sendto` on the unconnected socket) and prints
//!   `{"pushed":O}` (`"sent"`): the server speaks first. `push-serve udp
//!   ADDR PORT PEER_ADDR PEER_PORT` takes that peer without waiting for it.
//! - `await tcp|udp DST_ADDR DST_PORT [SRC_ADDR]`: connects (UDP: sends one
//!   datagram) from SRC_ADDR if given, prints `{"connected":O,"local":ADDR}`
//!   (`"ok"`), then for every line on stdin waits for one line from the
//!   peer, sending nothing, and prints `{"received":O}` (`"echo"` when one
//!   came).
//! - `tfo DST_ADDR DST_PORT`: TCP Fast Open, a connection opened by
//!   `sendto(MSG_FASTOPEN)` with its first line (no `connect()` call):
//!   prints `{"outcome":O}` (`"echo"` when the peer answered).
//! - `mptcp DST_ADDR DST_PORT`: a Multipath TCP socket (`IPPROTO_MPTCP`,
//!   no privilege needed) connects and exchanges a line: prints
//!   `{"outcome":O}`.
//! - `udplite DST_ADDR DST_PORT`: one UDP-Lite datagram (`IPPROTO_UDPLITE`,
//!   a protocol the socket hooks leave to the packet hooks; no privilege
//!   needed): prints `{"outcome":O}` (`"sent"` when the kernel took it).
//! - `ping DST_ADDR`: one ICMP (ICMPv6) echo request from a ping socket
//!   (`SOCK_DGRAM`, unprivileged where `net.ipv4.ping_group_range` allows),
//!   and its reply: prints `{"outcome":O}` (`"echo"` when it came).
//! - `listen-then-move ADDR PORT CGROUP_DIR`: binds and listens as where it
//!   started, then moves itself into CGROUP_DIR; prints `{"ready":true,
//!   "pid":P}` after the move and echoes lines on accepted connections.
//! - `raw-udp DST_ADDR DST_PORT`: a UDP datagram built by hand and sent
//!   through a raw IPv4 socket (needs CAP_NET_RAW): prints `{"outcome":O}`
//!   (`"sent"` when the kernel took it).
//! - `udp-serve-move ADDR PORT CGROUP_DIR`: a UDP echo server bound where it
//!   started; prints `{"ready":true,"pid":P}`, and moves itself into
//!   CGROUP_DIR at the first line on stdin (then prints `{"moved":true}`).
//! - `udp-hold DST_ADDR DST_PORT`: one UDP socket; for every line on stdin
//!   sends a datagram from it and prints `{"exchange":O}`.
//! - `decoy tcp|udp BIND_ADDR DST_ADDR PORT`: binds a socket of its own at
//!   BIND_ADDR:PORT (a wildcard, or DST_ADDR itself with `IP_FREEBIND`,
//!   which needs no privilege; TCP: listening), so that a same-host lookup
//!   of DST_ADDR:PORT finds it, then connects (TCP, exchanging a line) or
//!   sends a datagram (UDP) to the real DST_ADDR:PORT from another socket;
//!   prints `{"decoy":"bound"|O,"outcome":O}`.
//! - `claim ADDR`: enters a user and network namespace of its own (no
//!   privilege needed where unprivileged user namespaces are allowed), puts
//!   ADDR on its loopback device and prints `{"claimed":ADDR}`, then holds
//!   until stdin closes: a namespace that claims an address it does not own.
//! - `share-listener ADDR PORT CGROUP_DIR`: binds and listens, forks a child
//!   that moves into CGROUP_DIR holding the same socket; prints
//!   `{"ready":true,"pid":P,"child":C}`; both stay until killed.
use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(700);

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("egattack: {msg}");
    std::process::exit(2);
}

fn print(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let (mut cgroup, mut netns, mut uid) = (None::<PathBuf>, None::<String>, None::<u32>);
    while args.len() >= 2 {
        match args[0].as_str() {
            "--cgroup" => cgroup = Some(args[1].clone().into()),
            "--netns" => netns = Some(args[1].clone()),
            "--uid" => uid = Some(args[1].parse().unwrap_or_else(|_| die("bad --uid"))),
            _ => break,
        }
        args.drain(..2);
    }
    if let Some(dir) = &cgroup {
        join_cgroup(dir);
    }
    if let Some(name) = &netns {
        let path = format!("/run/netns/{name}");
        let f = std::fs::File::open(&path).unwrap_or_else(|e| die(format!("{path}: {e}")));
        // SAFETY: plain syscall on a valid descriptor.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            die(format!("setns {path}: {}", io::Error::last_os_error()));
        }
    }
    if let Some(uid) = uid {
        // SAFETY: plain syscalls; the gid first, while still privileged.
        let ok = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(uid, uid, uid) == 0
                && libc::setresuid(uid, uid, uid) == 0
        };
        if !ok {
            die(format!(
                "dropping to uid {uid}: {}",
                io::Error::last_os_error()
            ));
        }
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["hijack", addr, port] => hijack(sa(addr, port)),
        ["udp-serve", addr, port] => udp_serve(sa(addr, port)),
        ["udp-from", sa_, sp, da, dp] => {
            print(json!({"outcome": udp_from(sa(sa_, sp), sa(da, dp))}));
        }
        ["tcp-from", sa_, sp, da, dp] => {
            print(json!({"outcome": tcp_from(sa(sa_, sp), sa(da, dp))}));
        }
        ["tcp-serve-close", addr, port] => tcp_serve_close(sa(addr, port)),
        ["tcp-hold", addr, port] => tcp_hold(sa(addr, port)),
        ["tfo", addr, port] => print(json!({"outcome": tfo(sa(addr, port))})),
        ["mptcp", addr, port] => print(json!({"outcome": mptcp(sa(addr, port))})),
        ["udplite", addr, port] => print(json!({"outcome": udplite(sa(addr, port))})),
        ["ping", addr] => print(json!({"outcome": ping(sa(addr, "0"))})),
        ["push-serve", proto, addr, port] => push_serve(tcp(proto), sa(addr, port), None),
        ["push-serve", "udp", addr, port, peer, peer_port] => {
            push_serve(false, sa(addr, port), Some(sa(peer, peer_port)));
        }
        ["await", proto, addr, port] => await_push(tcp(proto), sa(addr, port), None),
        ["await", proto, addr, port, src] => {
            await_push(tcp(proto), sa(addr, port), Some(sa(src, "0")));
        }
        ["listen-then-move", addr, port, dir] => listen_then_move(sa(addr, port), dir),
        ["share-listener", addr, port, dir] => share_listener(sa(addr, port), dir),
        ["udp-serve-move", addr, port, dir] => udp_serve_move(sa(addr, port), dir),
        ["udp-hold", addr, port] => udp_hold(sa(addr, port)),
        ["raw-udp", addr, port] => print(json!({"outcome": raw_udp(sa(addr, port))})),
        ["decoy", proto, bind, dst, port] => decoy(proto, sa(bind, port), sa(dst, port)),
        ["claim", addr] => claim(sa(addr, "0").ip()),
        _ => die(format!("unknown command {args:?} (see the module docs)")),
    }
}

fn join_cgroup(dir: &std::path::Path) {
    let procs = dir.join("cgroup.procs");
    if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
        die(format!("joining {}: {e}", procs.display()));
    }
}

fn sa(addr: &str, port: &str) -> SocketAddr {
    let ip: IpAddr = addr
        .parse()
        .unwrap_or_else(|_| die(format!("bad address {addr}")));
    SocketAddr::new(
        ip,
        port.parse()
            .unwrap_or_else(|_| die(format!("bad port {port}"))),
    )
}

fn outcome(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "refused".into(),
        Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINPROGRESS) => "timeout".into(),
        _ if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            "timeout".into()
        }
        Some(n) => format!("error:{n}"),
        None => format!("error:{e}"),
    }
}

/// A socket of `ty` for `addr`'s family with SO_REUSEADDR, bound to `addr`.
fn reuse_socket(addr: SocketAddr, ty: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls; the fd is owned at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let (storage, len) = envguard_tests::sockaddr::to_sockaddr(addr);
    // SAFETY: storage holds a valid address of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// One datagram from a fresh unbound socket, and its echo.
fn udp_send(dst: SocketAddr) -> String {
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(any).unwrap_or_else(|e| die(format!("udp socket: {e}")));
    exchange_udp(&s, dst)
}

fn exchange_udp(s: &UdpSocket, dst: SocketAddr) -> String {
    s.set_read_timeout(Some(TIMEOUT)).ok();
    if let Err(e) = s.send_to(b"ping\n", dst) {
        return outcome(&e);
    }
    let mut buf = [0u8; 64];
    match s.recv_from(&mut buf) {
        Ok(_) => "echo".into(),
        Err(e) => outcome(&e),
    }
}

fn hijack(dst: SocketAddr) {
    let before = udp_send(dst);
    let rebind = match reuse_socket(dst, libc::SOCK_DGRAM) {
        Ok(fd) => {
            drop(fd);
            "bound".to_owned()
        }
        Err(e) => outcome(&e),
    };
    let after = udp_send(dst);
    print(json!({"before": before, "rebind": rebind, "after_rebind": after}));
}

fn decoy(proto: &str, bind: SocketAddr, dst: SocketAddr) {
    let ty = match proto {
        "tcp" => libc::SOCK_STREAM,
        "udp" => libc::SOCK_DGRAM,
        _ => die(format!("decoy: protocol {proto}: tcp or udp")),
    };
    let family = if bind.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on a descriptor owned at once; valid buffers.
    let decoy = unsafe {
        let fd = libc::socket(family, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            die(format!("socket: {}", io::Error::last_os_error()));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let (level, opt) = if bind.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_FREEBIND)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let (storage, len) = envguard_tests::sockaddr::to_sockaddr(bind);
        if libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) != 0
            || (ty == libc::SOCK_STREAM && libc::listen(fd.as_raw_fd(), 8) != 0)
        {
            Err(io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    };
    let bound = match &decoy {
        Ok(_) => "bound".to_owned(),
        Err(e) => outcome(e),
    };
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let o = if ty == libc::SOCK_STREAM {
        tcp_from(any, dst)
    } else {
        udp_send(dst)
    };
    print(json!({"decoy": bound, "outcome": o}));
}

fn claim(addr: IpAddr) {
    // SAFETY: plain syscall; this process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        die(format!(
            "unshare(CLONE_NEWUSER | CLONE_NEWNET): {} (unprivileged user namespaces must be allowed for this test)",
            io::Error::last_os_error()
        ));
    }
    const RTM_NEWLINK: u16 = 16;
    const RTM_NEWADDR: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLM_F_CREATE: u16 = 0x400;
    const NLM_F_EXCL: u16 = 0x200;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        die(format!("netlink socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = |kind: u16, flags: u16, body: &[u8]| {
        let mut m = Vec::with_capacity(16 + body.len());
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        // SAFETY: valid buffers of their lengths.
        if unsafe { libc::send(sock.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) } < 0 {
            die(format!("netlink send: {}", io::Error::last_os_error()));
        }
        let mut buf = [0u8; 1024];
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // The ack: NLMSG_ERROR with error 0.
        let errno = if n >= 20 {
            i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"))
        } else {
            -libc::EIO
        };
        if errno != 0 {
            die(format!(
                "netlink request {kind}: {}",
                io::Error::from_raw_os_error(-errno)
            ));
        }
    };
    // Loopback (index 1) up: ifinfomsg with IFF_UP in flags and change.
    let mut link = Vec::new();
    link.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    link.extend_from_slice(&1i32.to_ne_bytes());
    link.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    link.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    request(RTM_NEWLINK, 0, &link);
    let (family, bytes, prefix) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec(), 32u8),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec(), 128u8),
    };
    let mut body = vec![family, prefix, 0, 0];
    body.extend_from_slice(&1u32.to_ne_bytes());
    for kind in [IFA_LOCAL, IFA_ADDRESS] {
        body.extend_from_slice(&((4 + bytes.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&bytes);
    }
    request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body);
    print(json!({"claimed": addr.to_string()}));
    for _ in io::stdin().lock().lines() {}
}

fn udp_serve(addr: SocketAddr) {
    let fd = reuse_socket(addr, libc::SOCK_DGRAM).unwrap_or_else(|e| die(format!("bind: {e}")));
    let s = UdpSocket::from(fd);
    print(json!({"ready": true, "pid": std::process::id()}));
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

fn udp_from(src: SocketAddr, dst: SocketAddr) -> String {
    match reuse_socket(src, libc::SOCK_DGRAM) {
        Ok(fd) => exchange_udp(&UdpSocket::from(fd), dst),
        Err(e) => format!("bind:{}", outcome(&e)),
    }
}

/// A socket of `ty` and `proto` for `dst`'s family.
fn socket_for(dst: SocketAddr, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sendto(2)` of `buf` to `dst` with `flags`.
fn send_to(fd: &OwnedFd, buf: &[u8], flags: libc::c_int, dst: SocketAddr) -> io::Result<()> {
    let (storage, len) = envguard_tests::sockaddr::to_sockaddr(dst);
    // SAFETY: our buffer and a valid address of `len` bytes.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags,
            (&raw const storage).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bounds a blocking connect (and send) by SO_SNDTIMEO: a dropped SYN
/// costs `TIMEOUT`, not the kernel's two minutes of retries.
fn send_timeout(fd: &OwnedFd) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: TIMEOUT.as_micros() as libc::suseconds_t,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

fn connect_fd(fd: &OwnedFd, dst: SocketAddr) -> io::Result<()> {
    let (storage, len) = envguard_tests::sockaddr::to_sockaddr(dst);
    // SAFETY: storage holds a valid address of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes with a reset: SO_LINGER 0.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn line_exchange(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    stream.set_write_timeout(Some(TIMEOUT)).ok();
    if let Err(e) = stream.write_all(b"ping\n") {
        return outcome(&e);
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(_) => "echo".into(),
        Err(e) => outcome(&e),
    }
}

fn tcp_from(src: SocketAddr, dst: SocketAddr) -> String {
    let fd = match reuse_socket(src, libc::SOCK_STREAM) {
        Ok(fd) => fd,
        Err(e) => return format!("bind:{}", outcome(&e)),
    };
    send_timeout(&fd);
    if let Err(e) = connect_fd(&fd, dst) {
        return outcome(&e);
    }
    let mut stream = TcpStream::from(fd);
    let o = line_exchange(&mut stream);
    reset(stream);
    o
}

/// `IPPROTO_MPTCP` (not in every libc crate release).
const IPPROTO_MPTCP: libc::c_int = 262;

fn mptcp(dst: SocketAddr) -> String {
    let fd = match socket_for(dst, libc::SOCK_STREAM, IPPROTO_MPTCP) {
        Ok(fd) => fd,
        Err(e) => return format!("socket:{}", outcome(&e)),
    };
    send_timeout(&fd);
    if let Err(e) = connect_fd(&fd, dst) {
        return outcome(&e);
    }
    line_exchange(&mut TcpStream::from(fd))
}

fn udplite(dst: SocketAddr) -> String {
    match datagram(dst, libc::IPPROTO_UDPLITE, b"ping\n") {
        Ok(_) => "sent".into(),
        Err(o) => o,
    }
}

fn ping(dst: SocketAddr) -> String {
    // An echo request: type, code, checksum, id and sequence (the kernel
    // fills in the checksum and id of a ping socket), then a payload.
    let (proto, kind) = if dst.is_ipv4() {
        (libc::IPPROTO_ICMP, 8)
    } else {
        (libc::IPPROTO_ICMPV6, 128)
    };
    let request = [kind, 0, 0, 0, 0, 0, 0, 1, b'p', b'i', b'n', b'g'];
    let fd = match datagram(dst, proto, &request) {
        Ok(fd) => fd,
        Err(o) => return o,
    };
    // The peer's kernel answers an echo request by itself.
    let s = UdpSocket::from(fd);
    s.set_read_timeout(Some(TIMEOUT)).ok();
    let mut buf = [0u8; 64];
    match s.recv(&mut buf) {
        Ok(_) => "echo".into(),
        Err(e) => outcome(&e),
    }
}

/// One datagram from a `SOCK_DGRAM` socket of `proto`; the socket, or the
/// outcome of a failure.
fn datagram(dst: SocketAddr, proto: libc::c_int, payload: &[u8]) -> Result<OwnedFd, String> {
    let fd =
        socket_for(dst, libc::SOCK_DGRAM, proto).map_err(|e| format!("socket:{}", outcome(&e)))?;
    send_to(&fd, payload, 0, dst).map_err(|e| outcome(&e))?;
    Ok(fd)
}

fn tfo(dst: SocketAddr) -> String {
    let fd = match socket_for(dst, libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => return outcome(&e),
    };
    send_timeout(&fd);
    if let Err(e) = send_to(&fd, b"ping\n", libc::MSG_FASTOPEN, dst) {
        return outcome(&e);
    }
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => "closed".into(),
        Ok(_) => "echo".into(),
        Err(e) => outcome(&e),
    }
}

fn tcp_serve_close(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| die(format!("listen {addr}: {e}")));
    print(json!({"ready": true, "pid": std::process::id()}));
    for mut s in l.incoming().flatten() {
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(TIMEOUT)).ok();
        if let Ok(n) = s.read(&mut buf) {
            let _ = s.write_all(&buf[..n]);
        }
        reset(s);
    }
}

fn tcp_hold(dst: SocketAddr) {
    let mut stream = match TcpStream::connect_timeout(&dst, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            print(json!({"connected": outcome(&e)}));
            return;
        }
    };
    print(json!({"connected": line_exchange(&mut stream)}));
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        print(json!({"exchange": line_exchange(&mut stream)}));
    }
}

/// Long enough for a line a loaded machine delays; only a lost one costs
/// all of it.
const AWAIT: Duration = Duration::from_secs(5);

fn tcp(proto: &str) -> bool {
    match proto {
        "tcp" => true,
        "udp" => false,
        _ => die(format!("protocol {proto}: tcp or udp")),
    }
}

/// Prints `{"pushed":O}` for every line on stdin, `push` giving O.
fn push_on_demand(mut push: impl FnMut() -> io::Result<()>) {
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let pushed = match push() {
            Ok(()) => "sent".to_owned(),
            Err(e) => outcome(&e),
        };
        print(json!({"pushed": pushed}));
    }
}

fn push_serve(tcp: bool, addr: SocketAddr, peer: Option<SocketAddr>) {
    if tcp {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| die(format!("listen {addr}: {e}")));
        print(json!({"ready": true, "pid": std::process::id()}));
        let (mut s, peer) = l.accept().unwrap_or_else(|e| die(format!("accept: {e}")));
        print(json!({"accepted": peer.to_string()}));
        push_on_demand(|| s.write_all(b"push\n"));
    } else {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| die(format!("bind {addr}: {e}")));
        print(json!({"ready": true, "pid": std::process::id()}));
        let peer = peer.unwrap_or_else(|| {
            let mut buf = [0u8; 64];
            let (_, peer) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| die(format!("recv: {e}")));
            print(json!({"accepted": peer.to_string()}));
            peer
        });
        push_on_demand(|| s.send_to(b"push\n", peer).map(drop));
    }
}

/// Prints `{"received":O}` for every line on stdin, `recv` giving O.
fn await_on_demand(mut recv: impl FnMut() -> io::Result<usize>) {
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let received = match recv() {
            Ok(n) if n > 0 => "echo".to_owned(),
            Ok(_) => "closed".to_owned(),
            Err(e) => outcome(&e),
        };
        print(json!({"received": received}));
    }
}

fn await_push(tcp: bool, dst: SocketAddr, src: Option<SocketAddr>) {
    let any = SocketAddr::new(
        if dst.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    );
    let ty = if tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let fd = reuse_socket(src.unwrap_or(any), ty).and_then(|fd| {
        if tcp {
            let (storage, len) = envguard_tests::sockaddr::to_sockaddr(dst);
            // SAFETY: storage holds a valid address of `len` bytes.
            if unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(fd)
    });
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            print(json!({"connected": outcome(&e)}));
            return;
        }
    };
    if tcp {
        let stream = TcpStream::from(fd);
        let local = stream.local_addr().map(|a| a.to_string()).ok();
        print(json!({"connected": "ok", "local": local}));
        stream.set_read_timeout(Some(AWAIT)).ok();
        let mut reader = io::BufReader::new(&stream);
        let mut got = String::new();
        await_on_demand(|| {
            got.clear();
            reader.read_line(&mut got)
        });
    } else {
        let s = UdpSocket::from(fd);
        if let Err(e) = s.send_to(b"hello\n", dst) {
            print(json!({"connected": outcome(&e)}));
            return;
        }
        let local = s.local_addr().map(|a| a.to_string()).ok();
        print(json!({"connected": "ok", "local": local}));
        s.set_read_timeout(Some(AWAIT)).ok();
        let mut buf = [0u8; 64];
        await_on_demand(|| s.recv_from(&mut buf).map(|(n, _)| n));
    }
}

fn echo_forever(l: TcpListener) -> ! {
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    die("listener closed")
}

fn listen_then_move(addr: SocketAddr, dir: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| die(format!("listen {addr}: {e}")));
    join_cgroup(std::path::Path::new(dir));
    print(json!({"ready": true, "pid": std::process::id()}));
    echo_forever(l)
}

fn share_listener(addr: SocketAddr, dir: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| die(format!("listen {addr}: {e}")));
    // SAFETY: single-threaded here; the child only joins a cgroup and sleeps.
    let child = unsafe { libc::fork() };
    if child < 0 {
        die(format!("fork: {}", io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: prctl has no memory preconditions.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
        join_cgroup(std::path::Path::new(dir));
        let _keep = &l;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // The child is ready once it is in its cgroup.
    let procs = std::path::Path::new(dir).join("cgroup.procs");
    for _ in 0..2000 {
        let text = std::fs::read_to_string(&procs).unwrap_or_default();
        if text.lines().any(|l| l.trim() == child.to_string()) {
            print(json!({"ready": true, "pid": std::process::id(), "child": child}));
            echo_forever(l)
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    die("the child never joined its cgroup")
}

fn raw_udp(dst: SocketAddr) -> String {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 17) };
    if fd < 0 {
        return outcome(&io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Source port 40000; a zero checksum means "none" for UDP over IPv4.
    let mut dgram = vec![0x9c, 0x40];
    dgram.extend(dst.port().to_be_bytes());
    dgram.extend(((8 + 5) as u16).to_be_bytes());
    dgram.extend([0, 0]);
    dgram.extend(b"ping\n");
    match send_to(&fd, &dgram, 0, SocketAddr::new(dst.ip(), 0)) {
        Ok(()) => "sent".into(),
        Err(e) => outcome(&e),
    }
}

fn udp_serve_move(addr: SocketAddr, dir: &str) {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| die(format!("bind {addr}: {e}")));
    let echo = s.try_clone().unwrap_or_else(|e| die(format!("clone: {e}")));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    print(json!({"ready": true, "pid": std::process::id()}));
    let mut line = String::new();
    if io::stdin().read_line(&mut line).is_ok() {
        join_cgroup(std::path::Path::new(dir));
        print(json!({"moved": true}));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn udp_hold(dst: SocketAddr) {
    let any: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(any).unwrap_or_else(|e| die(format!("udp socket: {e}")));
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        print(json!({"exchange": exchange_udp(&s, dst)}));
    }
}
