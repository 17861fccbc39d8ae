//! The .deb `cargo xtask dist` built (`ENVGUARD_DIST`), installed and purged
//! on this host with dpkg:
//!
//! - `dpkg -i` installs `/usr/bin/envguard` (the static binary, same
//!   `--version`), the unit, `/etc/envguard/policy.toml` as a conffile in
//!   audit mode and the docs; postinst starts nothing (no envguard process,
//!   no pin root made).
//! - `envguard check --policy /etc/envguard/policy.toml` passes;
//!   `systemd-analyze verify` passes on the installed unit (and fails on a
//!   copy pointing at a missing binary: the check is not vacuous).
//! - Pinned state: the installed binary runs an agent on the test's own pin
//!   root and cgroup tree and stops (SIGTERM leaves enforcement pinned);
//!   `dpkg --purge` with `ENVGUARD_PIN_ROOT` naming that pin root runs
//!   `envguard detach`: no pin, program, link or map is left, and dev→prod
//!   flows again. Every file the package listed is gone, `/etc/envguard` too,
//!   and dpkg knows nothing of the package.
//!
//! The host must not have envguard installed (the test would replace it);
//! a guard purges the package should the test stop short.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use envguard_tests::sinks::TempDir;
use envguard_tests::{Agent, AgentOptions, Client, Family, Lab, Mode, Proto, Site, sys};

const EGPROBE: &str = env!("CARGO_BIN_EXE_egprobe");
const UNIT: &str = "/lib/systemd/system/envguard.service";

fn deb_path() -> PathBuf {
    let dir = std::env::var_os("ENVGUARD_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "ENVGUARD_DIST is not set: run the artifact tests with `cargo xtask dist --test`"
            )
        });
    let version = std::env::var("ENVGUARD_DIST_VERSION").unwrap_or_else(|_| {
        panic!("ENVGUARD_DIST_VERSION is not set: run `cargo xtask dist --test`")
    });
    let deb = dir.join(format!("envguard_{version}_amd64.deb"));
    assert!(
        deb.is_file(),
        "no package at {}: run `cargo xtask dist` first",
        deb.display()
    );
    deb
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (dpkg and systemd-analyze come with `cargo xtask setup`)")
    })
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "envguard"]))
        .stdout
        .starts_with(b"installed")
}

fn known_to_dpkg() -> bool {
    run(Command::new("dpkg-query").args(["-W", "envguard"]))
        .status
        .success()
}

/// Purges the package on drop should the test stop short.
struct Installed {
    pin_root: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if known_to_dpkg() {
            let _ = Command::new("dpkg")
                .args(["--purge", "envguard"])
                .env("ENVGUARD_PIN_ROOT", &self.pin_root)
                .output();
        }
    }
}

/// Processes whose executable is `exe`.
fn processes_of(exe: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| {
                        p == exe || p.to_string_lossy() == format!("{} (deleted)", exe.display())
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn deb_installs_checks_verifies_and_purges_without_a_trace() {
    sys::require_root();
    let deb = deb_path();
    assert!(
        !known_to_dpkg(),
        "envguard is already known to dpkg on this host; this test installs and purges its own package, \
         so remove it first (`dpkg --purge envguard`)"
    );
    let default_pins = Path::new("/sys/fs/bpf/envguard").exists();
    let mut lab = Lab::new(EGPROBE, Mode::Enforce);
    let any: IpAddr = Ipv6Addr::UNSPECIFIED.into();
    lab.serve(&lab.remote_place(), Proto::Tcp, &[any], 9000);
    let guard = Installed {
        pin_root: lab.pin_root().path().to_owned(),
    };

    let out = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(
        out.status.success(),
        "dpkg -i {}: {}",
        deb.display(),
        text(&out)
    );
    assert!(
        installed(),
        "dpkg -i succeeded but the package is not installed"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not started"),
        "postinst must say that it started nothing: {}",
        text(&out)
    );
    let bin = Path::new("/usr/bin/envguard");
    assert!(
        processes_of(bin).is_empty(),
        "postinst started an envguard: {:?}",
        processes_of(bin)
    );
    assert_eq!(
        Path::new("/sys/fs/bpf/envguard").exists(),
        default_pins,
        "installing the package must not pin anything under /sys/fs/bpf/envguard"
    );
    let files: Vec<PathBuf> =
        String::from_utf8_lossy(&run(Command::new("dpkg").args(["-L", "envguard"])).stdout)
            .lines()
            .map(PathBuf::from)
            .collect();
    for want in [
        bin,
        Path::new(UNIT),
        Path::new("/etc/envguard/policy.toml"),
        Path::new("/usr/share/doc/envguard/copyright"),
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "the package must ship {}: {files:?}",
            want.display()
        );
    }
    // The package's own files (not the directories it shares, like /lib).
    let shipped: Vec<PathBuf> = files
        .iter()
        .filter(|f| f.symlink_metadata().is_ok_and(|m| m.is_file()))
        .cloned()
        .collect();
    assert!(
        shipped.len() >= 10,
        "too few files in the package: {shipped:?}"
    );
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "envguard"]));
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/envguard/policy.toml "),
        "/etc/envguard/policy.toml must be a conffile: {}",
        text(&conffiles)
    );
    let policy =
        std::fs::read_to_string("/etc/envguard/policy.toml").expect("read the installed policy");
    assert!(
        policy.lines().any(|l| l.trim() == "mode = \"audit\""),
        "the installed policy must be in audit mode:\n{policy}"
    );
    let dist_version = run(Command::new(sys::envguard_bin()).arg("--version"));
    let version = run(Command::new(bin).arg("--version"));
    assert!(version.status.success(), "{}", text(&version));
    assert_eq!(
        version.stdout, dist_version.stdout,
        "/usr/bin/envguard must be the dist binary"
    );

    let check = run(Command::new(bin).args(["check", "--policy", "/etc/envguard/policy.toml"]));
    assert!(
        check.status.success(),
        "envguard check of the installed policy: {}",
        text(&check)
    );

    let verify = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verify.status.success(),
        "systemd-analyze verify {UNIT}: {}",
        text(&verify)
    );
    let tmp = TempDir::new();
    let bad = tmp.join("envguard.service");
    let unit = std::fs::read_to_string(UNIT).expect("read the unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/envguard run"),
        "the unit must run /usr/bin/envguard:\n{unit}"
    );
    std::fs::write(
        &bad,
        unit.replace("/usr/bin/envguard", "/nonexistent/envguard"),
    )
    .expect("write");
    let verify_bad = run(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(
        !verify_bad.status.success(),
        "systemd-analyze verify must fail on a unit whose binary is missing, or it checks nothing: {}",
        text(&verify_bad)
    );

    // Pinned state left by an agent of the installed binary.
    let prod = SocketAddr::new(Site::Prod.addr(Family::V4), 9000);
    let agent = Agent::start(
        lab.policy_path(),
        &lab.cg.rel(""),
        Mode::Enforce,
        lab.pin_root().path(),
        &AgentOptions::pinned().binary(bin),
    );
    agent.stop();
    let footprint = lab.footprint();
    assert!(
        !footprint.link_ids().is_empty(),
        "the stopped agent must leave its links pinned"
    );
    let r = lab.probe(Client::Dev, Proto::Tcp, prod, 1500);
    assert!(
        r.is_refused(),
        "dev -> prod must stay refused with no agent running: {}",
        r.raw
    );

    let purge = run(Command::new("dpkg")
        .args(["--purge", "envguard"])
        .env("ENVGUARD_PIN_ROOT", lab.pin_root().path()));
    assert!(
        purge.status.success(),
        "dpkg --purge envguard: {}",
        text(&purge)
    );
    footprint.assert_all_gone(Some(&lab.cg.abs("")), "after dpkg --purge");
    assert!(
        lab.pin_root().layout_dirs().is_empty(),
        "dpkg --purge left pinned layouts: {:?}",
        lab.pin_root().layout_dirs()
    );
    let r = lab.probe(Client::Dev, Proto::Tcp, prod, 3000);
    assert!(
        r.ok,
        "dev -> prod must flow once the purge detached everything: {}",
        r.raw
    );
    assert!(!known_to_dpkg(), "dpkg still knows envguard after --purge");
    let left: Vec<&PathBuf> = shipped
        .iter()
        .filter(|f| f.symlink_metadata().is_ok())
        .collect();
    assert!(
        left.is_empty(),
        "files of the package left after purge: {left:?}"
    );
    for dir in ["/etc/envguard", "/usr/share/doc/envguard"] {
        assert!(!Path::new(dir).exists(), "{dir} left after purge");
    }
    assert_eq!(
        Path::new("/sys/fs/bpf/envguard").exists(),
        default_pins,
        "the package must not leave /sys/fs/bpf/envguard behind"
    );
    assert!(
        processes_of(bin).is_empty(),
        "an envguard process is left: {:?}",
        processes_of(bin)
    );
    drop(guard);
}
