//! A router in its own network namespace with hosts behind it, for the tc
//! hooks: the agent runs *inside* the router's namespace (through
//! `nsenter --net`), so every interface it sees and attaches to is one this
//! test made, and forwarding is switched on in that namespace only (no host
//! sysctl is touched).
//!
//! Addresses: host `n` is `198.18.<n>.2/24` and `2001:db8:<n>::2/64` behind
//! the router's `198.18.<n>.1` / `2001:db8:<n>::1` on its own veth. The
//! namespaces isolate them from other tests using the same ranges.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::netns::{Family, Netns};
use crate::sys;

/// The router namespace; hosts are added with [`Router::host`].
pub struct Router {
    pub ns: Netns,
    /// Kept for the drop order: hosts (and their veths) go before the router.
    wrapper: PathBuf,
}

/// A namespace behind one of the router's interfaces. Dropping it deletes
/// the veth pair (from the router's side), then the namespace.
pub struct Host {
    pub ns: Netns,
    router_ns: String,
    /// The router's end.
    pub ifname: String,
    v4: IpAddr,
    v6: IpAddr,
}

/// A bridge in the router's namespace (`198.18.<index>.1/24`,
/// `2001:db8:<index>::1/64` on it), deleted on drop (after its hosts).
pub struct Bridge {
    router_ns: String,
    pub name: String,
    pub index: u8,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Err(e) = sys::try_ip(&["-n", &self.router_ns, "link", "del", &self.name]) {
            eprintln!("envguard-tests: cleanup: {e}");
        }
    }
}

impl Router {
    /// Creates the namespace with forwarding on (IPv4 and IPv6, in it only)
    /// and a wrapper that runs the agent binary inside it.
    pub fn create() -> Router {
        Router::with_agent(&sys::envguard_bin())
    }

    /// [`Router::create`] with another agent binary.
    pub fn with_agent(agent: &Path) -> Router {
        sys::require_ip();
        let ns = Netns::create("egr");
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sysctl_in(ns.name(), key);
        }
        let wrapper = std::env::temp_dir().join(format!("{}.sh", sys::unique_name("egr-agent")));
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec nsenter --net=/run/netns/{} -- {} \"$@\"\n",
                ns.name(),
                agent.display()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", wrapper.display()));
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", wrapper.display()));
        Router { ns, wrapper }
    }

    /// `sysctl -w KEY=VALUE` in the router's namespace.
    pub fn sysctl(&self, key_value: &str) {
        sysctl_in(self.ns.name(), key_value);
    }

    /// The program to run as the agent (`AgentOptions::binary`): envguard in
    /// the router's namespace.
    pub fn agent_binary(&self) -> &Path {
        &self.wrapper
    }

    /// Adds bridge `name` with the router's addresses of subnet `index` on it.
    pub fn bridge(&self, name: &str, index: u8) -> Bridge {
        let r = self.ns.name();
        sys::ip(&["-n", r, "link", "add", name, "type", "bridge"]);
        let b = Bridge {
            router_ns: r.to_owned(),
            name: name.to_owned(),
            index,
        };
        sys::ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("198.18.{index}.1/24"),
            "dev",
            name,
        ]);
        sys::ip(&[
            "-n",
            r,
            "-6",
            "addr",
            "add",
            &format!("2001:db8:{index}::1/64"),
            "dev",
            name,
            "nodad",
        ]);
        sys::ip(&["-n", r, "link", "set", name, "up"]);
        b
    }

    /// Adds a host on `bridge`'s subnet (`.<octet>`), its veth's router end
    /// `port` a port of the bridge.
    pub fn bridged_host(&self, bridge: &Bridge, port: &str, octet: u8) -> Host {
        let ns = Netns::create("egh");
        let r = self.ns.name().to_owned();
        let index = bridge.index;
        sys::ip(&[
            "-n",
            &r,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        let host = Host {
            ns,
            router_ns: r.clone(),
            ifname: port.to_owned(),
            v4: format!("198.18.{index}.{octet}").parse().unwrap(),
            v6: format!("2001:db8:{index}::{octet:x}").parse().unwrap(),
        };
        let h = host.ns.name();
        sys::ip(&["-n", &r, "link", "set", port, "master", &bridge.name]);
        sys::ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("{}/24", host.v4),
            "dev",
            "eth0",
        ]);
        sys::ip(&[
            "-n",
            h,
            "-6",
            "addr",
            "add",
            &format!("{}/64", host.v6),
            "dev",
            "eth0",
            "nodad",
        ]);
        sys::ip(&["-n", &r, "link", "set", port, "up"]);
        sys::ip(&["-n", h, "link", "set", "eth0", "up"]);
        host
    }

    /// Adds host `index` behind the router's interface `ifname`.
    pub fn host(&self, index: u8, ifname: &str) -> Host {
        let ns = Netns::create("egh");
        let r = self.ns.name().to_owned();
        sys::ip(&[
            "-n",
            &r,
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        let host = Host {
            ns,
            router_ns: r.clone(),
            ifname: ifname.to_owned(),
            v4: format!("198.18.{index}.2").parse().unwrap(),
            v6: format!("2001:db8:{index}::2").parse().unwrap(),
        };
        let h = host.ns.name();
        sys::ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("198.18.{index}.1/24"),
            "dev",
            ifname,
        ]);
        sys::ip(&[
            "-n",
            &r,
            "-6",
            "addr",
            "add",
            &format!("2001:db8:{index}::1/64"),
            "dev",
            ifname,
            "nodad",
        ]);
        sys::ip(&[
            "-n",
            h,
            "addr",
            "add",
            &format!("198.18.{index}.2/24"),
            "dev",
            "eth0",
        ]);
        sys::ip(&[
            "-n",
            h,
            "-6",
            "addr",
            "add",
            &format!("2001:db8:{index}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        sys::ip(&["-n", &r, "link", "set", ifname, "up"]);
        sys::ip(&["-n", h, "link", "set", "eth0", "up"]);
        sys::ip(&[
            "-n",
            h,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{index}.1"),
        ]);
        sys::ip(&[
            "-n",
            h,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("2001:db8:{index}::1"),
        ]);
        host
    }
}

impl Host {
    pub fn addr(&self, fam: Family) -> IpAddr {
        match fam {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// The router's interface index of this host's veth.
    pub fn ifindex(&self) -> u32 {
        let out = sys::ip_output(&[
            "-n",
            &self.router_ns,
            "-j",
            "link",
            "show",
            "dev",
            &self.ifname,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ip -j link show` printed no JSON ({e}): {out}"));
        v[0]["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or_else(|| panic!("no ifindex for {}: {out}", self.ifname))
    }
}

/// A cls_bpf filter's program: (name, id).
pub type ClsBpf = (String, u64);

impl Router {
    /// The cls_bpf filters on `ifname`'s clsact hook, ingress then egress,
    /// as (program name, program id), from `tc -j filter show`.
    pub fn cls_bpf_filters(&self, ifname: &str) -> (Vec<ClsBpf>, Vec<ClsBpf>) {
        let list = |dir: &str| -> Vec<ClsBpf> {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    self.ns.name(),
                    "tc",
                    "-j",
                    "filter",
                    "show",
                ])
                .args(["dev", ifname, dir])
                .output()
                .unwrap_or_else(|e| panic!("running tc (iproute2): {e}"));
            assert!(
                out.status.success(),
                "tc filter show dev {ifname} {dir}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            // No clsact qdisc: tc prints nothing at all.
            if text.trim().is_empty() {
                return Vec::new();
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("tc -j filter show printed no JSON ({e}): {text}"));
            v.as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["kind"] == "bpf" && f["options"]["handle"].is_string())
                .map(|f| {
                    let prog = &f["options"]["prog"];
                    (
                        prog["name"].as_str().unwrap_or("?").to_owned(),
                        prog["id"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        };
        (list("ingress"), list("egress"))
    }

    /// The names of the programs on `ifname`'s tcx ingress and egress, as
    /// the kernel reports them (queried from a thread that joined the
    /// router's namespace).
    pub fn tcx_programs(&self, ifname: &str) -> (Vec<String>, Vec<String>) {
        let ns = format!("/run/netns/{}", self.ns.name());
        let ifname = ifname.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("open {ns}: {e}"));
            // SAFETY: setns on this thread only (a thread of our own that ends here).
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            let c = std::ffi::CString::new(ifname.clone()).unwrap();
            // SAFETY: a NUL-terminated name.
            let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert_ne!(idx, 0, "no interface {ifname} in {ns}");
            let names = |attach| -> Vec<String> {
                crate::bpf::query_ifindex(idx, attach)
                    .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {ifname}: {e}"))
                    .into_iter()
                    .map(|id| {
                        let fd = crate::bpf::fd_by_id(crate::bpf::Kind::Prog, id)
                            .unwrap_or_else(|e| panic!("program {id}: {e}"));
                        crate::bpf::prog_info(&fd)
                            .unwrap_or_else(|e| panic!("program {id} info: {e}"))
                            .name
                    })
                    .collect()
            };
            (
                names(crate::bpf::TCX_INGRESS),
                names(crate::bpf::TCX_EGRESS),
            )
        })
        .join()
        .expect("query thread")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Err(e) = sys::try_ip(&["-n", &self.router_ns, "link", "del", &self.ifname]) {
            eprintln!("envguard-tests: cleanup: {e}");
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.wrapper) {
            eprintln!(
                "envguard-tests: cleanup: cannot remove {}: {e}",
                self.wrapper.display()
            );
        }
    }
}

/// Writes `/proc/sys/<key>` inside `ns` (what `sysctl -w` does, without
/// needing procps): net sysctls are per namespace.
fn sysctl_in(ns: &str, key_value: &str) {
    let (key, value) = key_value
        .split_once('=')
        .unwrap_or_else(|| panic!("not KEY=VALUE: {key_value}"));
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            "printf %s \"$1\" > \"$2\"",
            "sh",
        ])
        .args([value, path.as_str()])
        .output()
        .unwrap_or_else(|e| panic!("cannot write {path} in {ns}: {e}"));
    assert!(
        out.status.success(),
        "writing {value} to {path} in netns {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
