//! Network namespaces and the standard two-namespace topology.
//!
//! ```text
//!   client netns egc-<pid>-<n>                 server netns egs-<pid>-<n>
//!   lo up                                       lo up
//!   ec-<pid>-<n>    <========= veth =========>  es-<pid>-<n>
//!     198.18.100.2/24, 2001:db8:100::2/64         198.18.100.1/24   2001:db8:100::1/64   (world)
//!     198.18.0.0/15 via 198.18.100.1              198.18.10.1/24    2001:db8:10::1/64    (prod)
//!     2001:db8::/32 via 2001:db8:100::1           198.18.20.1/24    2001:db8:20::1/64    (dev)
//!                                                 198.18.0.1/28     2001:db8:0:1::1/64   (shared)
//!                                                 198.18.30.1/24    2001:db8:30::1/64    (staging)
//! ```
//!
//! `staging` is an env only in policies built with `PolicyExtras::staging`;
//! in the standard policy its address is in no CIDR (`world`).
//!
//! The client namespace is "this host" (its processes sit in the test's env
//! cgroups); the server namespace plays the remote hosts of each env.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::sys;

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::LOCALHOST.into(),
            Family::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }
}

/// A remote "site" in the server namespace: one address per family on the
/// server's veth, each inside (or, for `World`, outside) an env's CIDRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Prod,
    Dev,
    Shared,
    /// In no env's CIDR: env `world`.
    World,
    /// In `staging`'s CIDR, an env only policies with
    /// [`crate::PolicyExtras::staging`] declare; not in [`Site::ALL`].
    Staging,
}

impl Site {
    /// The sites of the standard policy.
    pub const ALL: [Site; 4] = [Site::Prod, Site::Dev, Site::Shared, Site::World];
    /// Every address the server veth carries: [`Site::ALL`] and `Staging`.
    pub const EVERY: [Site; 5] = [
        Site::Prod,
        Site::Dev,
        Site::Shared,
        Site::World,
        Site::Staging,
    ];

    /// The env the agent must attribute this address to.
    pub fn env(self) -> &'static str {
        match self {
            Site::Prod => "prod",
            Site::Dev => "dev",
            Site::Shared => "shared",
            Site::World => "world",
            Site::Staging => "staging",
        }
    }

    /// How the agent must say it found that env (`cidr`, or `default` for world).
    pub fn env_from(self) -> &'static str {
        match self {
            Site::World => "default",
            _ => "cidr",
        }
    }

    pub fn addr(self, fam: Family) -> IpAddr {
        match (self, fam) {
            (Site::Prod, Family::V4) => Ipv4Addr::new(198, 18, 10, 1).into(),
            (Site::Dev, Family::V4) => Ipv4Addr::new(198, 18, 20, 1).into(),
            (Site::Shared, Family::V4) => Ipv4Addr::new(198, 18, 0, 1).into(),
            (Site::World, Family::V4) => Ipv4Addr::new(198, 18, 100, 1).into(),
            (Site::Staging, Family::V4) => Ipv4Addr::new(198, 18, 30, 1).into(),
            (Site::Prod, Family::V6) => Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 1).into(),
            (Site::Dev, Family::V6) => Ipv6Addr::new(0x2001, 0xdb8, 0x20, 0, 0, 0, 0, 1).into(),
            (Site::Shared, Family::V6) => Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1).into(),
            (Site::World, Family::V6) => Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1).into(),
            (Site::Staging, Family::V6) => Ipv6Addr::new(0x2001, 0xdb8, 0x30, 0, 0, 0, 0, 1).into(),
        }
    }

    fn prefix_len(self, fam: Family) -> u8 {
        match (self, fam) {
            (Site::Shared, Family::V4) => 28,
            (_, Family::V4) => 24,
            (_, Family::V6) => 64,
        }
    }

    /// Every address of every site, both families.
    pub fn all_addrs() -> Vec<IpAddr> {
        Family::ALL
            .iter()
            .flat_map(|&f| Site::ALL.iter().map(move |s| s.addr(f)))
            .collect()
    }
}

/// The client namespace's veth address (in no CIDR: `world` seen from outside).
pub fn client_addr(fam: Family) -> IpAddr {
    match fam {
        Family::V4 => Ipv4Addr::new(198, 18, 100, 2).into(),
        Family::V6 => Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2).into(),
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `PREFIX-<pid>-<n>` and brings its `lo` up.
    pub fn create(prefix: &str) -> Self {
        let name = sys::unique_name(prefix);
        sys::ip(&["netns", "add", &name]);
        let ns = Netns { name };
        sys::ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = sys::try_ip(&["netns", "del", &self.name]) {
            eprintln!("envguard-tests: cleanup: {e}");
        }
    }
}

/// The standard topology (see the module docs). Drop deletes the veth pair,
/// then both namespaces; the processes running inside must be gone first
/// (the owning [`crate::Lab`] drops them earlier).
pub struct Topology {
    // Field order is drop order: client before server is irrelevant, but
    // the veth is deleted in `Drop::drop`, i.e. before both.
    pub client: Netns,
    pub server: Netns,
    client_if: String,
}

impl Topology {
    pub fn create() -> Self {
        sys::require_ip();
        let client = Netns::create("egc");
        let server = Netns::create("egs");
        let suffix = client.name().trim_start_matches("egc");
        let client_if = format!("ec{suffix}");
        let server_if = format!("es{suffix}");
        let topo = Topology {
            client,
            server,
            client_if,
        };
        let (c, s) = (topo.client.name(), topo.server.name());
        let cif = topo.client_if.as_str();
        let sif = server_if.as_str();
        // Both ends are born inside the namespaces: nothing appears in the root netns.
        sys::ip(&[
            "-n", c, "link", "add", cif, "type", "veth", "peer", "name", sif, "netns", s,
        ]);
        for fam in Family::ALL {
            let ca = format!(
                "{}/{}",
                client_addr(fam),
                if fam == Family::V4 { 24 } else { 64 }
            );
            add_addr(c, cif, &ca);
            for site in Site::EVERY {
                add_addr(
                    s,
                    sif,
                    &format!("{}/{}", site.addr(fam), site.prefix_len(fam)),
                );
            }
        }
        sys::ip(&["-n", s, "link", "set", sif, "up"]);
        sys::ip(&["-n", c, "link", "set", cif, "up"]);
        let gw4 = Site::World.addr(Family::V4).to_string();
        let gw6 = Site::World.addr(Family::V6).to_string();
        sys::ip(&[
            "-n",
            c,
            "-4",
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            &gw4,
            "dev",
            cif,
        ]);
        sys::ip(&[
            "-n",
            c,
            "-6",
            "route",
            "add",
            "2001:db8::/32",
            "via",
            &gw6,
            "dev",
            cif,
        ]);
        topo
    }
}

fn add_addr(ns: &str, dev: &str, cidr: &str) {
    if cidr.contains(':') {
        sys::ip(&["-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad"]);
    } else {
        sys::ip(&["-n", ns, "-4", "addr", "add", cidr, "dev", dev]);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = sys::try_ip(&["-n", self.client.name(), "link", "del", &self.client_if]) {
            eprintln!("envguard-tests: cleanup: {e}");
        }
    }
}
