//! Real containers for the tests: podman (Debian's, with `runc`: crun
//! refuses this machine kind's hybrid cgroup layout) running a root
//! filesystem made of Debian's static busybox (`--rootfs`, no registry),
//! on dual-stack networks the test creates with explicit `--subnet`s in a
//! /22 of 198.18.0.0/15 and a /48 of 2001:db8::/32 it claims (blackholed
//! while the test runs), with the OCI
//! hooks of the test's own hooks directory (`--hooks-dir`: nothing is
//! installed system-wide). Containers go into the test's cgroup tree
//! (`--cgroup-parent`), below the agent's attach point.
//!
//! Every guard removes what it made on drop: containers (`podman rm -f`),
//! networks (`podman network rm -f`), the blackhole route, and the cgroup v1
//! directories podman's cgroupfs manager makes for the parent (the v2 side
//! is the [`CgroupTree`]'s).

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::cgroup::CgroupTree;
use crate::sinks::TempDir;
use crate::sys;

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// `podman --runtime runc --hooks-dir DIR`, or a readable panic when podman
/// or runc is missing.
pub fn podman(hooks_dir: &Path) -> Command {
    for (tool, arg) in [("podman", "--version"), ("runc", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{tool} is missing: install podman, runc and busybox-static with `cargo xtask setup`"
        );
    }
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--hooks-dir"]).arg(hooks_dir);
    c
}

pub fn output(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = output(cmd, what);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test's container world: a busybox root filesystem, a hooks directory,
/// the cgroup parent and a claimed /22 of addresses.
pub struct Pod {
    dir: TempDir,
    pub block: Block,
    cgroup_parent: String,
    _v1: V1Parent,
}

impl Pod {
    /// Everything under `tree` (its root is the containers' cgroup parent).
    pub fn new(tree: &CgroupTree) -> Pod {
        sys::require_root();
        assert!(
            Path::new(BUSYBOX).is_file(),
            "{BUSYBOX} is missing: install busybox-static with `cargo xtask setup`"
        );
        let dir = TempDir::new();
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("make the rootfs");
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox into the rootfs");
        std::fs::create_dir(dir.join("hooks")).expect("make the hooks dir");
        let cgroup_parent = tree.rel("");
        Pod {
            _v1: V1Parent(cgroup_parent.clone()),
            block: Block::claim(),
            cgroup_parent,
            dir,
        }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn hooks_dir(&self) -> PathBuf {
        self.dir.join("hooks")
    }

    /// Where the hook's log (its stderr) goes.
    pub fn hook_log(&self) -> PathBuf {
        self.dir.join("hook.log")
    }

    /// Installs `envguard oci-hook ARGS` as this pod's createRuntime hook
    /// (`contrib/oci/envguard-hook.json` with the test's binary and args),
    /// through a wrapper that appends its stderr to [`Pod::hook_log`].
    pub fn install_hook(&self, args: &[&str]) {
        let wrapper = self.dir.join("envguard-hook");
        let script = format!(
            "#!/bin/sh\nRUST_LOG=info exec {} oci-hook {} 2>>{}\n",
            sys::envguard_bin().display(),
            args.join(" "),
            self.hook_log().display()
        );
        std::fs::write(&wrapper, script).expect("write the hook wrapper");
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the hook wrapper");
        let shipped: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/oci/envguard-hook.json"),
            )
            .expect("read contrib/oci/envguard-hook.json"),
        )
        .expect("contrib/oci/envguard-hook.json is JSON");
        let mut hook = shipped.clone();
        hook["hook"]["path"] = wrapper.display().to_string().into();
        hook["hook"]["args"] = serde_json::json!(["envguard-hook"]);
        std::fs::write(
            self.hooks_dir().join("envguard.json"),
            serde_json::to_string_pretty(&hook).unwrap(),
        )
        .expect("write the hook json");
    }

    pub fn podman(&self) -> Command {
        podman(&self.hooks_dir())
    }

    /// `podman run` with what every test container needs; `extra` goes
    /// before the command (`--name`, `--network`, `--annotation`, `-d`).
    pub fn run_cmd(&self, extra: &[&str], command: &[&str]) -> Command {
        let mut c = self.podman();
        c.args(["run", "--cgroup-parent", &self.cgroup_parent])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(extra)
            .arg("--rootfs")
            .arg(self.rootfs())
            .args(command);
        c
    }

    /// A dual-stack network named uniquely from `name`, with the `n`th /24
    /// and the `n`th IPv6 /64 of the block.
    pub fn network(&self, name: &str, n: u8) -> Network {
        assert!(n < 4, "a block has four /24s");
        let name = sys::unique_name(&format!("eg-{name}"));
        let subnet = format!("{}/24", self.block.net(n, 0));
        let subnet6 = format!("{}/64", self.block.net6(n, 0));
        run_ok(
            self.podman().args([
                "network", "create", "--subnet", &subnet, "--subnet", &subnet6, &name,
            ]),
            "podman network create",
        );
        Network {
            hooks: self.hooks_dir(),
            name,
            subnet,
        }
    }

    /// A container name unique to this test run, removed on drop.
    pub fn container(&self, name: &str) -> Container {
        Container {
            hooks: self.hooks_dir(),
            name: sys::unique_name(&format!("eg-{name}")),
        }
    }
}

/// A /22 of 198.18.0.0/15 this test claims: blackholed (high metric, so the
/// networks' own routes win) while the test runs, so no test packet can
/// leave the host.
pub struct Block {
    base: Ipv4Addr,
    /// Which /22 (0..128); its IPv6 twin is `2001:db8:c0KK::/48`.
    k: u32,
    /// Whether the IPv6 blackhole is ours (to remove).
    v6: bool,
}

impl Block {
    fn claim() -> Block {
        let routes = sys::ip_output(&["-4", "route", "show", "table", "all"]);
        let routes6 = sys::ip_output(&["-6", "route", "show", "table", "all"]);
        let seed = std::process::id().wrapping_mul(2_654_435_761);
        for i in 0..128u32 {
            // 198.18.0.0/15 has 128 /22s; start somewhere that depends on
            // the pid so parallel runs rarely probe the same ones.
            let k = (seed.wrapping_add(i.wrapping_mul(37))) % 128;
            let base = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (k << 10));
            let o = base.octets();
            let v6 = format!("2001:db8:c0{k:02x}:");
            // Any route in the block (another test's) makes it taken.
            let taken = (0..4)
                .any(|j| routes.contains(&format!("{}.{}.{}.", o[0], o[1], o[2] + j)))
                || routes6.contains(&v6);
            if taken {
                continue;
            }
            let cidr = format!("{base}/22");
            // The route is the claim: a second claimer's add fails.
            if sys::try_ip(&["route", "add", "blackhole", &cidr, "metric", "4242"]).is_err() {
                continue;
            }
            let mut block = Block { base, k, v6: false };
            if sys::try_ip(&[
                "-6",
                "route",
                "add",
                "blackhole",
                &block.v6_cidr(),
                "metric",
                "4242",
            ])
            .is_ok()
            {
                block.v6 = true;
                return block;
            }
            // Dropping it gives the IPv4 claim back.
        }
        panic!(
            "no free /22 in 198.18.0.0/15 (with its 2001:db8::/32 twin) for the test's container networks"
        );
    }

    /// The IPv6 /48 of the block, `2001:db8:c0KK::/48`.
    fn v6_cidr(&self) -> String {
        format!("2001:db8:c0{:02x}::/48", self.k)
    }

    /// Address `host` of the `n`th /24.
    pub fn net(&self, n: u8, host: u8) -> Ipv4Addr {
        let o = self.base.octets();
        Ipv4Addr::new(o[0], o[1], o[2] + n, host)
    }

    /// Address `host` of the `n`th IPv6 /64.
    pub fn net6(&self, n: u8, host: u16) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xc000 + self.k as u16,
            n.into(),
            0,
            0,
            0,
            host,
        )
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let cidr = format!("{}/22", self.base);
        if let Err(e) = sys::try_ip(&["route", "del", "blackhole", &cidr, "metric", "4242"]) {
            eprintln!("envguard-tests: cleanup: cannot remove blackhole {cidr}: {e}");
        }
        let cidr = self.v6_cidr();
        if self.v6
            && let Err(e) =
                sys::try_ip(&["-6", "route", "del", "blackhole", &cidr, "metric", "4242"])
        {
            eprintln!("envguard-tests: cleanup: cannot remove blackhole {cidr}: {e}");
        }
    }
}

pub struct Network {
    hooks: PathBuf,
    pub name: String,
    pub subnet: String,
}

impl Drop for Network {
    fn drop(&mut self) {
        let out = podman(&self.hooks)
            .args(["network", "rm", "-f", &self.name])
            .output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "envguard-tests: cleanup: podman network rm {} failed: {out:?}",
                self.name
            );
        }
    }
}

/// A container's name, `podman rm -f`'d on drop.
pub struct Container {
    hooks: PathBuf,
    pub name: String,
}

impl Container {
    /// Its full id (`podman inspect`).
    pub fn id(&self) -> String {
        run_ok(
            podman(&self.hooks).args(["inspect", "--format", "{{.Id}}", &self.name]),
            "podman inspect",
        )
        .trim()
        .to_owned()
    }

    /// Its address on its (first) network.
    pub fn ip(&self) -> String {
        run_ok(
            podman(&self.hooks).args([
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &self.name,
            ]),
            "podman inspect",
        )
        .trim()
        .to_owned()
    }

    /// `podman exec NAME ARGS`.
    pub fn exec(&self, args: &[&str]) -> Output {
        output(
            podman(&self.hooks).arg("exec").arg(&self.name).args(args),
            "podman exec",
        )
    }

    /// `podman rm -f` now (the drop does it again, harmlessly).
    pub fn remove(&self) {
        run_ok(
            podman(&self.hooks).args(["rm", "-f", "-t", "0", &self.name]),
            "podman rm",
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&self.hooks)
            .args(["rm", "-f", "-t", "0", "--ignore", &self.name])
            .output();
    }
}

/// The cgroup v1 directories of the containers' parent: podman's cgroupfs
/// manager makes `<controller>/<parent>` (and `conmon` below it) in every v1
/// hierarchy of this hybrid layout. Removed deepest-first on drop.
struct V1Parent(String);

impl Drop for V1Parent {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 || f[2] != "cgroup" {
                continue;
            }
            let dir = Path::new(f[1]).join(self.0.trim_start_matches('/'));
            rmdir_tree(&dir);
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!(
        "envguard-tests: cleanup: cannot remove cgroup {}",
        dir.display()
    );
}

/// Nanoseconds since the Unix epoch of a record's `time`
/// (`2026-11-30T15:54:40.123456789Z`).
pub fn unix_ns(rfc3339: &str) -> i128 {
    let b = rfc3339.as_bytes();
    let num = |r: std::ops::Range<usize>| -> i64 {
        rfc3339[r]
            .parse()
            .unwrap_or_else(|_| panic!("not an RFC 3339 time: {rfc3339}"))
    };
    assert!(
        b.len() == 30 && b[29] == b'Z',
        "not a record time: {rfc3339}"
    );
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    i128::from(secs) * 1_000_000_000 + i128::from(num(20..29))
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_times_parse() {
        assert_eq!(
            super::unix_ns("1970-01-01T00:00:01.000000002Z"),
            1_000_000_002
        );
        assert_eq!(
            super::unix_ns("2026-11-30T15:54:40.000000000Z"),
            1_796_054_080_000_000_000
        );
    }
}
