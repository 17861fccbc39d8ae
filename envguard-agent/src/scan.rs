//! Finds the local sockets that were bound before the agent started, so that a
//! same-host peer is judged by its env even after a restart. The kernel's
//! post_bind programs only see binds that happen while they are attached.
//!
//! For every process below the attach point it duplicates each socket fd with
//! pidfd_getfd(2) and asks the socket itself: family, protocol, bound address,
//! cookie and network-namespace cookie — the same facts the kernel records.
use std::{
    collections::HashSet,
    fs,
    net::{SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use envguard_common::{
    event::{AF_INET, AF_INET6},
    flow::{BoundKey, BoundValue, bound_v4},
    policy::ENV_HOST,
};

use crate::sys;

const IPPROTO_TCP: i32 = 6;
const IPPROTO_UDP: i32 = 17;
/// Not in every libc crate version; stable kernel ABI since 5.14.
const SO_NETNS_COOKIE: i32 = 71;

/// Bound TCP listeners and UDP sockets of the processes whose cgroup is at or
/// below `root`, with their env (from `env_of`, given the cgroup path).
/// Processes and fds that vanish during the walk are skipped.
pub fn bound_sockets(
    mount: &Path,
    root: &str,
    env_of: impl Fn(&str) -> u32,
) -> Vec<(BoundKey, BoundValue)> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Some(cgroup) = process_cgroup(pid) else {
            continue;
        };
        if !crate::daemon::is_below(&cgroup, root) {
            continue;
        }
        let fds = socket_fds(pid);
        if fds.is_empty() {
            continue;
        }
        let Some(pidfd) = pidfd_open(pid) else {
            continue;
        };
        let cgroup_id = sys::cgroup_id(&sys::cgroup_dir(mount, &cgroup)).unwrap_or(0);
        let env = env_of(&cgroup);
        for fd in fds {
            let Some(sock) = pidfd_getfd(&pidfd, fd) else {
                continue;
            };
            let Some((key, cookie)) = describe(&sock) else {
                continue;
            };
            if seen.insert(cookie) {
                out.push((key, BoundValue::new(cookie, cgroup_id, env)));
            }
        }
    }
    out
}

/// The env of a cgroup path: its deepest listed ancestor's, as the kernel decides.
pub fn env_of_cgroup(path: &str, listed: &[(String, u32)]) -> u32 {
    deepest_listed(path, listed).map_or(ENV_HOST, |(_, env)| *env)
}

/// The listed (cgroup path, env id) that decides a cgroup path's env: its
/// deepest listed ancestor, the path itself included; `None` means `host`.
pub fn deepest_listed<'a>(path: &str, listed: &'a [(String, u32)]) -> Option<&'a (String, u32)> {
    listed
        .iter()
        .filter(|(c, _)| crate::daemon::is_below(path, c))
        .max_by_key(|(c, _)| crate::policy::cgroup_level(c))
}

/// The process's cgroup v2 path (the `0::` line).
fn process_cgroup(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

fn socket_fds(pid: i32) -> Vec<i32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; the result is a new fd we own.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup as i32) })
}

fn sockopt<T: Default>(fd: &OwnedFd, level: i32, name: i32) -> Option<T> {
    let mut v = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `v` is a valid buffer of `len` bytes.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    (r == 0 && len as usize == size_of::<T>()).then_some(v)
}

/// The socket's `BoundKey` and cookie, if it is a bound TCP listener or UDP socket.
fn describe(fd: &OwnedFd) -> Option<(BoundKey, u64)> {
    let domain: i32 = sockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let proto: i32 = sockopt(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    match proto {
        IPPROTO_UDP => {}
        // Connected and accepted TCP sockets are not what a peer connects to.
        IPPROTO_TCP if sockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 1 => {}
        _ => return None,
    }
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is large enough for any socket address.
    if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut storage).cast(), &mut len) } != 0 {
        return None;
    }
    let (family, addr, port) = match domain {
        libc::AF_INET => {
            // SAFETY: the kernel filled a sockaddr_in for an AF_INET socket.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let a = SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            );
            (AF_INET, bound_v4(a.ip().octets()), a.port())
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel filled a sockaddr_in6 for an AF_INET6 socket.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let a = SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            );
            (AF_INET6, a.ip().octets(), a.port())
        }
        _ => return None,
    };
    if port == 0 {
        return None;
    }
    let cookie: u64 = sockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)?;
    let netns: u64 = sockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)?;
    Some((
        BoundKey::new(netns, addr, port, proto as u8, family),
        cookie,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepest_listed_ancestor_decides() {
        let listed = vec![
            ("/a".to_owned(), 2),
            ("/a/b".to_owned(), 3),
            ("/c".to_owned(), 4),
        ];
        assert_eq!(env_of_cgroup("/a/b/x", &listed), 3);
        assert_eq!(env_of_cgroup("/a/bx", &listed), 2);
        assert_eq!(env_of_cgroup("/a", &listed), 2);
        assert_eq!(env_of_cgroup("/d", &listed), ENV_HOST);
    }

    #[test]
    fn finds_its_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let fd: OwnedFd = l.try_clone().unwrap().into();
        let (key, cookie) = describe(&fd).expect("a listener is described");
        assert_eq!(key.port, port);
        assert_eq!(key.proto, 6);
        assert_eq!(key.family, AF_INET);
        assert_eq!(key.addr, envguard_common::flow::mapped_v4([127, 0, 0, 1]));
        assert_ne!(cookie, 0);
        assert_ne!(key.netns, 0);
    }
}
