//! Same-host listeners of each env: TCP sockets in LISTEN and bound UDP
//! sockets, in the network namespace the probes run in, with the env of the
//! processes that hold them.
//!
//! Source: `/proc/<pid>/fd` (which socket inodes a process holds, as the
//! agent's holder pass reads them) and `/proc/<pid>/cgroup` (its cgroup, so
//! its env: deepest listed cgroup, as the kernel resolves it), then the
//! socket tables `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` of a holder in that
//! namespace for the state and bound address of each inode. A socket takes
//! its holders' env in the kernel too (the holder pass), so this is the env
//! the kernel judges a same-host peer of the socket against.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::policy::probe::ProbeProto;

/// One socket line of `/proc/net/{tcp,udp}{,6}` that matters here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLine {
    pub local: SocketAddr,
    /// The kernel's state number (TCP_LISTEN = 0x0A, UDP unconnected = 0x07).
    pub state: u8,
    pub inode: u64,
}

/// Parses a `/proc/net/tcp`-style table (IPv4 or IPv6 by address width).
pub fn parse_table(text: &str) -> Vec<SocketLine> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = match addr.len() {
                8 => IpAddr::V4(Ipv4Addr::from(
                    u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
                )),
                32 => {
                    let mut b = [0u8; 16];
                    for i in 0..4 {
                        let w = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                _ => return None,
            };
            Some(SocketLine {
                local: SocketAddr::new(ip, port),
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Where a peer on this host reaches a socket bound to `local`: a wildcard
/// bind is reached over loopback.
pub fn reach(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// A listener found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub env: String,
    /// The holder's cgroup (relative to the cgroup2 mount).
    pub cgroup: String,
    pub pid: u32,
    pub comm: String,
    pub local: SocketAddr,
    pub proto: ProbeProto,
}

impl Listener {
    pub fn label(&self) -> String {
        format!(
            "listener {}/{} ({}: pid {} {})",
            self.local,
            self.proto.name(),
            self.env,
            self.pid,
            self.comm
        )
    }
}

/// Every listener held by a process of a listed env (`listed`: cgroup path
/// → env name) in the network namespace `netns` (`net:[inode]` as
/// `/proc/<pid>/ns/net` links read), one per socket, sorted.
pub fn discover(
    listed: &[(String, u32)],
    env_name: impl Fn(u32) -> String,
    netns: &str,
) -> Vec<Listener> {
    let mut holders: HashMap<u64, (String, String, u32, String)> = HashMap::new();
    let mut table_pid = None;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let base = p.path();
        let Ok(ns) = std::fs::read_link(base.join("ns/net")) else {
            continue;
        };
        if ns.to_string_lossy() != netns {
            continue;
        }
        let Some(cgroup) = std::fs::read_to_string(base.join("cgroup"))
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
        else {
            continue;
        };
        let Some((_, env)) = crate::cgroups::deepest_listed(&cgroup, listed) else {
            continue;
        };
        let env = env_name(*env);
        let comm = std::fs::read_to_string(base.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                holders
                    .entry(inode)
                    .or_insert_with(|| (env.clone(), cgroup.clone(), pid, comm.clone()));
                table_pid.get_or_insert(pid);
            }
        }
    }
    let Some(tpid) = table_pid else {
        return Vec::new();
    };
    let mut out: BTreeMap<(String, SocketAddr, ProbeProto), Listener> = BTreeMap::new();
    for (file, proto, state) in [
        ("tcp", ProbeProto::Tcp, 0x0a),
        ("tcp6", ProbeProto::Tcp, 0x0a),
        ("udp", ProbeProto::Udp, 0x07),
        ("udp6", ProbeProto::Udp, 0x07),
    ] {
        let text = std::fs::read_to_string(format!("/proc/{tpid}/net/{file}")).unwrap_or_default();
        for line in parse_table(&text) {
            if line.state != state || line.local.port() == 0 {
                continue;
            }
            if let Some((env, cgroup, pid, comm)) = holders.get(&line.inode) {
                out.entry((env.clone(), line.local, proto))
                    .or_insert(Listener {
                        env: env.clone(),
                        cgroup: cgroup.clone(),
                        pid: *pid,
                        comm: comm.clone(),
                        local: line.local,
                        proto,
                    });
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_tables_parse() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 050A12C6:D431 050A12C6:1538 01 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        assert_eq!(
            parse_table(tcp),
            [
                SocketLine {
                    local: "127.0.0.1:8080".parse().unwrap(),
                    state: 0x0a,
                    inode: 12345
                },
                SocketLine {
                    local: "198.18.10.5:54321".parse().unwrap(),
                    state: 1,
                    inode: 777
                },
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n   1: B80D0120000000000000000005000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4343 2\n";
        let l = parse_table(tcp6);
        assert_eq!(l[0].local, "[::]:53".parse().unwrap());
        assert_eq!(l[1].local, "[2001:db8::5]:53".parse().unwrap());
        assert_eq!((l[1].state, l[1].inode), (7, 4343));
    }

    #[test]
    fn wildcards_are_reached_over_loopback() {
        assert_eq!(
            reach("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            reach("[::]:80".parse().unwrap()),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            reach("[::ffff:198.18.10.5]:80".parse().unwrap()),
            "198.18.10.5:80".parse().unwrap()
        );
        assert_eq!(
            reach("198.18.10.5:80".parse().unwrap()),
            "198.18.10.5:80".parse().unwrap()
        );
    }
}
