//! Gives every socket the env of the processes that hold it. The kernel labels
//! a socket with its creator's env when it binds or starts a flow; but a
//! socket can change hands — systemd socket activation, a supervisor passing
//! the fd, a process moved into another cgroup after binding — and it then
//! belongs to whoever holds it now. Sockets that existed before the agent
//! started have no label at all.
//!
//! A pass walks the processes below the attach point (`/proc/<pid>/cgroup`,
//! `/proc/<pid>/fd`), groups socket fds by inode, and for each socket whose
//! wanted env differs from what it last found, duplicates one fd with
//! pidfd_getfd(2) and reads and writes the socket's storage through it.
//! Sockets already seen with the same holders cost one readlink per fd.
use crate::cgroups::{env_of_cgroup, is_below};
use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use envguard_common::{
    flow::{SOCK_F_HOLDER, SockEnv},
    policy::ENV_HOST,
};

use crate::{loader::Kernel, sys, sys::CgroupNames};

const IPPROTO_TCP: i32 = 6;
const IPPROTO_UDP: i32 = 17;

/// A socket held by processes of more than one env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub inode: u64,
    pub cookie: u64,
    /// Env ids of the holders, sorted.
    pub envs: Vec<u32>,
    /// One holder pid per env, in the order of `envs`.
    pub pids: Vec<i32>,
    /// The env the socket was given.
    pub env: u32,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Sockets whose env was written.
    pub relabeled: usize,
    /// Sockets newly found shared between envs (each reported once while it stays so).
    pub shared: Vec<Shared>,
}

/// Per socket inode: the holders' envs and the env it was found or left with.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    holders: BTreeSet<u32>,
    env: Option<u32>,
}

/// The reconciler's memory between passes.
#[derive(Default)]
pub struct Holders {
    seen: HashMap<u64, Seen>,
}

/// One socket fd and the env of the process holding it.
struct Held {
    pid: i32,
    fd: i32,
    env: u32,
    cgroup: String,
}

impl Holders {
    /// Forgets what earlier passes found: the next pass looks at every socket
    /// again (after a reload, when the envs of cgroups may have changed).
    pub fn forget(&mut self) {
        self.seen.clear();
    }

    /// One pass over the processes whose cgroup is at or below `root`;
    /// `visit` sees every process of the walk with its cgroup.
    pub fn pass(
        &mut self,
        kernel: &mut Kernel,
        mount: &Path,
        root: &str,
        listed: &[(String, u32)],
        names: &mut CgroupNames,
        visit: &mut dyn FnMut(i32, &str),
    ) -> Pass {
        let started = std::time::Instant::now();
        let mut by_inode: HashMap<u64, Vec<Held>> = HashMap::new();
        let Ok(procs) = fs::read_dir("/proc") else {
            return Pass::default();
        };
        for p in procs.filter_map(Result::ok) {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Some(cgroup) = process_cgroup(pid) else {
                continue;
            };
            // Every process, below the attach point or not (the endpoints'
            // namespaces are judged by all their processes).
            visit(pid, &cgroup);
            if !is_below(&cgroup, root) {
                continue;
            }
            let env = env_of_cgroup(&cgroup, listed);
            for (fd, inode) in socket_fds(pid) {
                by_inode.entry(inode).or_default().push(Held {
                    pid,
                    fd,
                    env,
                    cgroup: cgroup.clone(),
                });
            }
        }
        let mut out = Pass::default();
        let mut next = HashMap::with_capacity(by_inode.len());
        for (inode, held) in by_inode {
            let holders: BTreeSet<u32> = held
                .iter()
                .map(|h| h.env)
                .filter(|&e| e != ENV_HOST)
                .collect();
            if let Some(prev) = self.seen.remove(&inode)
                && prev.holders == holders
            {
                next.insert(inode, prev);
                continue;
            }
            let env = relabel(kernel, mount, listed, names, &held, &holders, &mut out);
            if holders.len() > 1
                && let Some(env) = env
            {
                let (envs, pids) = holders
                    .iter()
                    .filter_map(|e| held.iter().find(|h| h.env == *e).map(|h| (*e, h.pid)))
                    .unzip();
                out.shared.push(Shared {
                    inode,
                    cookie: env.1,
                    envs,
                    pids,
                    env: env.0,
                });
            }
            next.insert(
                inode,
                Seen {
                    holders,
                    env: env.map(|e| e.0),
                },
            );
        }
        self.seen = next;
        log::debug!(
            "holder pass: {} sockets, {} relabelled, in {} µs",
            self.seen.len(),
            out.relabeled,
            started.elapsed().as_micros()
        );
        out
    }
}

/// Brings one socket's env in line with its holders; returns the env it has
/// now and its cookie, or `None` when it is not a TCP/UDP socket or went away.
fn relabel(
    kernel: &mut Kernel,
    mount: &Path,
    listed: &[(String, u32)],
    names: &mut CgroupNames,
    held: &[Held],
    holders: &BTreeSet<u32>,
    out: &mut Pass,
) -> Option<(u32, u64)> {
    let first = held.first()?;
    let pidfd = pidfd_open(first.pid)?;
    let sock = pidfd_getfd(&pidfd, first.fd)?;
    let domain: i32 = sockopt(&sock, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return None;
    }
    let proto: i32 = sockopt(&sock, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let cookie: u64 = sockopt(&sock, libc::SOL_SOCKET, libc::SO_COOKIE)?;
    let current = kernel.sock_env(&sock);
    let wanted = match holders.len() {
        // Held only by processes in no env: the socket keeps its creator's
        // env, as the policy in force sees the creator's cgroup.
        0 => match current {
            Some(c) if c.flags & SOCK_F_HOLDER == 0 => names
                .path(c.cgroup_id)
                .map_or(c.env, |p| env_of_cgroup(&p, listed)),
            Some(c) => c.env,
            None => return Some((ENV_HOST, cookie)),
        },
        1 => *holders.first()?,
        // Shared: it keeps its env if one of its holders has it, else it goes
        // to the first by id; reported either way.
        _ => match current {
            Some(c) if holders.contains(&c.env) => c.env,
            _ => *holders.first()?,
        },
    };
    if current.is_some_and(|c| c.env == wanted) {
        return Some((wanted, cookie));
    }
    let holder = held.iter().find(|h| h.env == wanted).unwrap_or(first);
    let cgroup_id = sys::cgroup_id(&sys::cgroup_dir(mount, &holder.cgroup)).unwrap_or(0);
    let listening = sockopt::<i32>(&sock, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    let value = match current {
        Some(c) => SockEnv::new(wanted, cgroup_id, c.origin_cookie, c.flags | SOCK_F_HOLDER),
        // Older than the agent: a bound socket (a listener or a UDP socket)
        // is its own origin, as the kernel would have made it.
        None => SockEnv::new(
            wanted,
            cgroup_id,
            if listening || proto == IPPROTO_UDP {
                cookie
            } else {
                0
            },
            SOCK_F_HOLDER,
        ),
    };
    match kernel.set_sock_env(&sock, &value) {
        Ok(()) => {
            out.relabeled += 1;
            Some((wanted, cookie))
        }
        Err(e) => {
            log::warn!(
                "labelling socket (cookie {cookie}) held by pid {}: {e}",
                first.pid
            );
            current.map(|c| (c.env, cookie))
        }
    }
}

/// The process's cgroup v2 path (the `0::` line).
pub(crate) fn process_cgroup(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// The process's socket fds and their inodes.
fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let link = fs::read_link(e.path()).ok()?;
            let inode = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((e.file_name().to_str()?.parse().ok()?, inode))
        })
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
