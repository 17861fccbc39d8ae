//! Container endpoints: the addresses of network namespaces other than the
//! agent's whose processes are all of one env belong to that env.
//!
//! A process's env is its cgroup's as the kernel sees it: the deepest
//! ancestor whose id is in the active slot's `CGROUP_ENVS` (what the policy
//! lists, what the `cgroup_mkdir` watch recorded, and whatever else was
//! registered at run time), never re-derived from the policy file.
//!
//! Each holder pass (`scan`, every 500 ms) hands over the processes it walked;
//! [`observe`] groups them by network namespace (`/proc/<pid>/ns/net`), reads
//! each candidate namespace's addresses over rtnetlink from a thread that
//! entered it, and [`resolve`] turns that into the address → env table and
//! its conflicts. [`Endpoints::update`] says what to write into the kernel.
//!
//! Rules (pure, in [`resolve`]):
//! - a namespace whose processes are all of one declared env claims its
//!   addresses (IPv4 and IPv6; loopback and link-local skipped) for it;
//! - a namespace with processes of one env and of `host` claims nothing: a
//!   runtime helper or an operator's `nsenter` shell in it says nothing
//!   about whose addresses they are;
//! - a namespace with processes of two or more declared envs claims its
//!   addresses as a conflict;
//! - an address claimed by two envs (or as a conflict) is `endpoint-conflict`
//!   ([`ENV_CONFLICT`]), which no rule names: every flow to it is a violation.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::SystemTime,
};

use envguard_common::policy::{ENV_CONFLICT, ENV_HOST};

use crate::{netlink, sys};

/// One process of a namespace and its cgroup's ancestors' ids, root first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub pid: i32,
    pub ancestors: Vec<u64>,
}

/// A network namespace as one pass found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u64,
    pub members: Vec<Member>,
    pub addrs: Vec<IpAddr>,
}

/// An address claimed by more than one env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub address: IpAddr,
    /// The claiming envs' ids, sorted, without repeats.
    pub envs: Vec<u32>,
    /// The claiming namespaces' inodes, sorted.
    pub netns: Vec<u64>,
    /// One process per (namespace, env), in the order found.
    pub pids: Vec<i32>,
}

/// An address's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub env: u32,
    /// The claiming namespace (the lowest inode when several agree).
    pub netns: u64,
}

/// The table one observation gives, under one map of cgroup envs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub table: BTreeMap<IpAddr, Owner>,
    pub conflicts: Vec<Conflict>,
}

/// A process's env: its deepest ancestor listed in `cgroup_envs`, else `host`.
pub fn env_of(ancestors: &[u64], cgroup_envs: &HashMap<u64, u32>) -> u32 {
    ancestors
        .iter()
        .rev()
        .find_map(|id| cgroup_envs.get(id).copied())
        .unwrap_or(ENV_HOST)
}

/// Whether an address can be an endpoint: not loopback, link-local,
/// unspecified or multicast.
pub fn eligible(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_multicast())
        }
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !(v6.is_loopback() || link_local || v6.is_unspecified() || v6.is_multicast())
                && v6.to_ipv4_mapped().is_none()
        }
    }
}

/// The address table and its conflicts (see the module docs).
pub fn resolve(namespaces: &[Namespace], cgroup_envs: &HashMap<u64, u32>) -> Resolution {
    // Per address: (env claimed, namespace, pid) for every claim.
    let mut claims: BTreeMap<IpAddr, Vec<(u32, u64, i32)>> = BTreeMap::new();
    for ns in namespaces {
        let mut by_env: BTreeMap<u32, i32> = BTreeMap::new();
        for m in &ns.members {
            by_env
                .entry(env_of(&m.ancestors, cgroup_envs))
                .or_insert(m.pid);
        }
        let declared: Vec<(u32, i32)> = by_env
            .iter()
            .filter(|&(&e, _)| e != ENV_HOST)
            .map(|(&e, &p)| (e, p))
            .collect();
        let has_host = by_env.contains_key(&ENV_HOST);
        // Only a namespace of exactly one env claims: one shared with `host`
        // processes or with another env's is host-like (as the agent's own
        // namespace is), and its addresses stay whatever the CIDRs say.
        // Making it conflicted instead would let whoever joins a namespace
        // turn its addresses into refusals for everyone, and every such
        // change would make every cached verdict stale.
        let claimants = match declared.len() {
            1 if !has_host => declared,
            _ => continue,
        };
        for a in ns.addrs.iter().filter(|a| eligible(a)) {
            let c = claims.entry(*a).or_default();
            for &(env, pid) in &claimants {
                c.push((env, ns.inode, pid));
            }
        }
    }
    let mut out = Resolution::default();
    for (address, c) in claims {
        let envs: BTreeSet<u32> = c.iter().map(|x| x.0).collect();
        let netns: BTreeSet<u64> = c.iter().map(|x| x.1).collect();
        let first_ns = *netns.first().expect("a claim has a namespace");
        if envs.len() == 1 {
            let env = *envs.first().expect("one env");
            out.table.insert(
                address,
                Owner {
                    env,
                    netns: first_ns,
                },
            );
            continue;
        }
        out.table.insert(
            address,
            Owner {
                env: ENV_CONFLICT,
                netns: first_ns,
            },
        );
        out.conflicts.push(Conflict {
            address,
            envs: envs.into_iter().collect(),
            netns: netns.into_iter().collect(),
            pids: c.iter().map(|x| x.2).collect(),
        });
    }
    out
}

/// An endpoint as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub owner: Owner,
    pub since: SystemTime,
}

/// What the kernel must be told after a pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Addresses to write (new, or with another env).
    pub set: Vec<(IpAddr, u32)>,
    /// Addresses to remove.
    pub remove: Vec<IpAddr>,
    /// Conflicts not reported yet (each once while it lasts unchanged).
    pub new_conflicts: Vec<Conflict>,
}

/// The agent's memory of endpoints between passes.
#[derive(Default)]
pub struct Endpoints {
    /// What the kernel's active slot holds.
    known: BTreeMap<IpAddr, Known>,
    /// Conflicts reported, by address: reported again only when the
    /// claimants change.
    reported: BTreeMap<IpAddr, (Vec<u32>, Vec<u64>)>,
    /// The last pass's namespaces, to resolve again under a new policy.
    last: Vec<Namespace>,
}

impl Endpoints {
    pub fn known(&self) -> &BTreeMap<IpAddr, Known> {
        &self.known
    }

    pub fn last(&self) -> &[Namespace] {
        &self.last
    }

    /// Takes a pass's namespaces and resolution; returns what to change.
    pub fn update(&mut self, namespaces: Vec<Namespace>, r: Resolution, now: SystemTime) -> Diff {
        self.last = namespaces;
        let mut diff = Diff::default();
        for (a, owner) in &r.table {
            match self.known.get(a) {
                Some(k) if k.owner.env == owner.env => {
                    // Same env; the namespace shown may change without the
                    // kernel noticing.
                    let since = k.since;
                    self.known.insert(
                        *a,
                        Known {
                            owner: *owner,
                            since,
                        },
                    );
                }
                _ => {
                    diff.set.push((*a, owner.env));
                    self.known.insert(
                        *a,
                        Known {
                            owner: *owner,
                            since: now,
                        },
                    );
                }
            }
        }
        let gone: Vec<IpAddr> = self
            .known
            .keys()
            .filter(|a| !r.table.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            self.known.remove(&a);
            diff.remove.push(a);
        }
        let mut reported = BTreeMap::new();
        for c in r.conflicts {
            let key = (c.envs.clone(), c.netns.clone());
            if self.reported.get(&c.address) != Some(&key) {
                diff.new_conflicts.push(c.clone());
            }
            reported.insert(c.address, key);
        }
        self.reported = reported;
        diff
    }

    /// Replaces the table with one resolved under a new policy (reload):
    /// what the new slot was written with.
    pub fn replace(&mut self, r: &Resolution, now: SystemTime) {
        let old = std::mem::take(&mut self.known);
        for (a, owner) in &r.table {
            let since = match old.get(a) {
                Some(k) if k.owner.env == owner.env => k.since,
                _ => now,
            };
            self.known.insert(
                *a,
                Known {
                    owner: *owner,
                    since,
                },
            );
        }
    }
}

/// The network namespace inode of a process (`/proc/<pid>/ns/net`).
pub fn netns_of(pid: &str) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Collects, during the holder pass's walk, the processes of namespaces
/// other than the agent's.
pub struct Collector {
    own: Option<u64>,
    /// Namespace inode → (pid, cgroup path).
    by_ns: HashMap<u64, Vec<(i32, String)>>,
}

impl Collector {
    pub fn new() -> Collector {
        Collector {
            own: netns_of("self"),
            by_ns: HashMap::new(),
        }
    }

    /// One process of the walk.
    pub fn visit(&mut self, pid: i32, cgroup: &str) {
        let Some(ns) = netns_of(&pid.to_string()) else {
            return;
        };
        if Some(ns) == self.own {
            return;
        }
        self.by_ns
            .entry(ns)
            .or_default()
            .push((pid, cgroup.to_owned()));
    }

    /// A walk of its own (at start, before the first holder pass).
    pub fn walk(&mut self) {
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for p in procs.filter_map(Result::ok) {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(cgroup) = crate::scan::process_cgroup(pid) {
                self.visit(pid, &cgroup);
            }
        }
    }

    /// The namespaces with their members' cgroup ancestry and, for those
    /// that can claim addresses under `cgroup_envs`, their addresses.
    pub fn finish(self, mount: &Path, cgroup_envs: &HashMap<u64, u32>) -> Vec<Namespace> {
        let mut ids: HashMap<String, Option<u64>> = HashMap::new();
        let mut ancestry = |path: &str| -> Vec<u64> {
            let mut out = Vec::new();
            let mut prefix = String::new();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                prefix.push('/');
                prefix.push_str(part);
                let id = *ids
                    .entry(prefix.clone())
                    .or_insert_with(|| sys::cgroup_id(&sys::cgroup_dir(mount, &prefix)));
                if let Some(id) = id {
                    out.push(id);
                }
            }
            out
        };
        let mut namespaces: Vec<Namespace> = self
            .by_ns
            .into_iter()
            .map(|(inode, procs)| Namespace {
                inode,
                members: procs
                    .into_iter()
                    .map(|(pid, cg)| Member {
                        pid,
                        ancestors: ancestry(&cg),
                    })
                    .collect(),
                addrs: Vec::new(),
            })
            .collect();
        namespaces.sort_by_key(|n| n.inode);
        // Only namespaces with a declared env among their processes can claim
        // anything (under this policy; a reload resolves them again, and a
        // namespace with no env has no addresses kept until the next pass).
        // Each with every member's pid: one that exits meanwhile must not
        // make its namespace lose its addresses for a pass.
        let wanted: Vec<(usize, u64, Vec<i32>)> = namespaces
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.members
                    .iter()
                    .any(|m| env_of(&m.ancestors, cgroup_envs) != ENV_HOST)
            })
            .map(|(i, n)| (i, n.inode, n.members.iter().map(|m| m.pid).collect()))
            .collect();
        if wanted.is_empty() {
            return namespaces;
        }
        // setns(2) changes the calling thread's namespace only: a thread of
        // its own enters each namespace in turn and ends with the pass.
        let found = std::thread::scope(|s| {
            s.spawn(|| {
                wanted
                    .iter()
                    .map(|(i, inode, pids)| {
                        let mut result = Err(std::io::Error::other("no process"));
                        for &pid in pids {
                            result = addresses_in(pid, *inode);
                            if result.is_ok() {
                                break;
                            }
                        }
                        (*i, result)
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap_or_default()
        });
        for (i, addrs) in found {
            match addrs {
                Ok(a) => namespaces[i].addrs = a,
                Err(e) => log::debug!(
                    "reading the addresses of network namespace {}: {e}",
                    namespaces[i].inode
                ),
            }
        }
        namespaces
    }
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

/// The addresses of `pid`'s network namespace, if it is still `inode`; must
/// run on a thread that may be left in that namespace.
fn addresses_in(pid: i32, inode: u64) -> std::io::Result<Vec<IpAddr>> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // The pid may have gone and been reused since the walk: only the
    // namespace the walk saw is read.
    if ns.metadata()?.ino() != inode {
        return Err(std::io::Error::other(format!(
            "pid {pid} is in another network namespace now"
        )));
    }
    // Only a namespace of the agent's own user namespace speaks for its
    // addresses: making one takes root, and so does wiring it to the host,
    // which is what container runtimes do. Anyone may make a user namespace
    // and a network namespace in it, and put any address there, e.g. prod's
    // database's, or a prod container's: such a claim would make that
    // address theirs (or a conflict, refused to its owner's peers).
    if owner_userns(&ns)? != own_userns()? {
        return Err(std::io::Error::other(
            "the namespace belongs to another user namespace: its addresses are not the host's to give",
        ));
    }
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    dump_addresses()
}

/// `NS_GET_USERNS` (`_IO(0xb7, 0x1)`): an fd of the user namespace that owns
/// a namespace.
const NS_GET_USERNS: libc::Ioctl = 0xb701;

/// The inode of the user namespace that owns the namespace `ns`.
fn owner_userns(ns: &fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: plain ioctl on an fd we own; the result is a new fd we own.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let owner = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(owner.metadata()?.ino())
}

/// The inode of the agent's own user namespace.
fn own_userns() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata("/proc/self/ns/user")?.ino())
}

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFADDRMSG_LEN: usize = 8;

/// Every address of the calling thread's network namespace (RTM_GETADDR).
fn dump_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    netlink::dump(RTM_GETADDR, IFADDRMSG_LEN, RTM_NEWADDR, |p| {
        out.extend(parse_addr(p));
    })?;
    Ok(out)
}

/// The address of one RTM_NEWADDR payload: IFA_LOCAL (an IPv4 interface's
/// own address, which IFA_ADDRESS is not on point-to-point links), else
/// IFA_ADDRESS.
fn parse_addr(p: &[u8]) -> Option<IpAddr> {
    let family = *p.first()?;
    let (mut local, mut address) = (None, None);
    for (kind, v) in netlink::attrs(p, IFADDRMSG_LEN) {
        let ip = match (family as i32, v.len()) {
            (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(v).expect("4 bytes"),
            ))),
            (libc::AF_INET6, 16) => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(v).expect("16 bytes"),
            ))),
            _ => None,
        };
        match kind {
            IFA_LOCAL => local = ip,
            IFA_ADDRESS => address = ip,
            _ => {}
        }
    }
    local.or(address)
}

#[cfg(test)]
mod tests;
