//! The network interfaces of the agent's network namespace, for the policy's
//! `interfaces`: listed with one rtnetlink dump (RTM_GETLINK), matched
//! against the envs' patterns, and remembered by index so that events name
//! the interface even after it is gone.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::Mutex,
};

use crate::{
    netlink,
    policy::{compile::Compiled, interfaces::IfacePattern},
};

/// One interface of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// The bridge (or bond) it is a port of; 0 if none.
    pub master: u32,
}

const RTM_GETLINK: u16 = 18;
const RTM_NEWLINK: u16 = 16;
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;

/// Every interface of the agent's network namespace.
pub fn list() -> io::Result<Vec<Link>> {
    let mut links = Vec::new();
    netlink::dump(RTM_GETLINK, IFINFOMSG_LEN, RTM_NEWLINK, |p| {
        links.extend(parse_link(p));
    })?;
    Ok(links)
}

/// An RTM_NEWLINK payload: ifinfomsg, then attributes.
fn parse_link(p: &[u8]) -> Option<Link> {
    let ifindex = i32::from_ne_bytes(p.get(4..8)?.try_into().ok()?) as u32;
    let (mut name, mut master) = (None, 0);
    for (kind, data) in netlink::attrs(p, IFINFOMSG_LEN) {
        match kind {
            IFLA_IFNAME => {
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
            }
            IFLA_MASTER if data.len() >= 4 => {
                master = u32::from_ne_bytes(data[0..4].try_into().ok()?);
            }
            _ => {}
        }
    }
    Some(Link {
        ifindex,
        name: name?,
        master,
    })
}

/// The interfaces the policy lists, by index: (name, env id, master).
pub fn listed(compiled: &Compiled, links: &[Link]) -> BTreeMap<u32, (String, u32, u32)> {
    links
        .iter()
        .filter_map(|l| {
            env_of(&compiled.interfaces, &l.name)
                .map(|env| (l.ifindex, (l.name.clone(), env, l.master)))
        })
        .collect()
}

/// The env id whose pattern matches `name`.
pub fn env_of(patterns: &[(IfacePattern, u32)], name: &str) -> Option<u32> {
    patterns
        .iter()
        .find(|(p, _)| p.matches(name))
        .map(|&(_, env)| env)
}

/// A netlink socket subscribed to link changes (`RTNLGRP_LINK`): readable
/// when an interface appears, goes away or changes, so the agent attaches
/// to a matching interface as it appears rather than at its next poll.
pub struct LinkEvents(std::os::fd::OwnedFd);

impl LinkEvents {
    pub fn open() -> io::Result<LinkEvents> {
        let fd = netlink::route_socket(libc::SOCK_NONBLOCK)?;
        // SAFETY: zeroed sockaddr_nl is valid; family and groups set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: binding our socket to a valid sockaddr_nl of its size.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(LinkEvents(fd))
    }

    /// Reads every pending notification; their content does not matter (the
    /// agent lists the interfaces again). Overflow (ENOBUFS) counts as news.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: receiving into our buffer, without blocking.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                any = true;
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                any = true;
                continue;
            }
            return any;
        }
    }
}

impl std::os::fd::AsRawFd for LinkEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

static NAMES: Mutex<Option<HashMap<u32, String>>> = Mutex::new(None);

/// Remembers an interface's name for the events that name it.
pub fn remember(ifindex: u32, name: &str) {
    let mut g = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .insert(ifindex, name.to_owned());
}

/// The name of an interface the tc hooks saw: as remembered when it was
/// attached, else as the kernel names that index now.
pub fn name_of(ifindex: u32) -> Option<String> {
    if let Some(n) = NAMES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|m| m.get(&ifindex))
    {
        return Some(n.clone());
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_loopback() {
        let links = list().expect("RTM_GETLINK dump");
        assert!(
            links.iter().any(|l| l.name == "lo" && l.ifindex == 1),
            "{links:?}"
        );
    }

    #[test]
    fn listed_matches_names_and_prefixes_to_env_ids() {
        let policy = crate::policy::Policy::parse(
            std::path::Path::new("p.toml"),
            "[envs.dev]\ninterfaces = [\"tap-dev*\"]\n[envs.prod]\ninterfaces = [\"br-prod\"]\n",
        )
        .unwrap();
        let compiled = crate::policy::compile::compile(&policy).unwrap();
        let link = |ifindex, name: &str, master| Link {
            ifindex,
            name: name.into(),
            master,
        };
        let links = [
            link(1, "lo", 0),
            link(7, "tap-dev0", 0),
            link(8, "tap-dev12", 9),
            link(9, "br-prod", 0),
            link(10, "br-prod2", 0),
        ];
        let dev = compiled.env_id("dev").unwrap();
        let prod = compiled.env_id("prod").unwrap();
        let got: Vec<(u32, (String, u32, u32))> = listed(&compiled, &links).into_iter().collect();
        assert_eq!(
            got,
            [
                (7, ("tap-dev0".into(), dev, 0)),
                (8, ("tap-dev12".into(), dev, 9)),
                (9, ("br-prod".into(), prod, 0)),
            ]
        );
    }

    #[test]
    fn parses_an_attribute_list() {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&7i32.to_ne_bytes());
        // IFLA_IFNAME "tap0\0" (len 9, padded to 12), IFLA_MASTER 3.
        p.extend(9u16.to_ne_bytes());
        p.extend(IFLA_IFNAME.to_ne_bytes());
        p.extend(b"tap0\0\0\0\0");
        p.extend(8u16.to_ne_bytes());
        p.extend(IFLA_MASTER.to_ne_bytes());
        p.extend(3u32.to_ne_bytes());
        assert_eq!(
            parse_link(&p),
            Some(Link {
                ifindex: 7,
                name: "tap0".into(),
                master: 3
            })
        );
    }
}
