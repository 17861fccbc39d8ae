//! Host facts and small utilities: root and tool checks, the cgroup2 mount,
//! unique names, running `ip`, locating the binaries under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Panics unless the tests run as root, with a message saying how to run them.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "the envguard integration tests need root (they create cgroups, network namespaces and \
             load eBPF programs): run them with `cargo xtask test` as root"
        );
    }
}

/// Panics unless iproute2's `ip` can be run.
pub fn require_ip() {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    let res = OK.get_or_init(|| match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`ip -V` failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run `ip`: {e}")),
    });
    if let Err(e) = res {
        panic!("the envguard integration tests need iproute2's `ip` command: {e}");
    }
}

/// The mount point of the cgroup v2 hierarchy, read from /proc/self/mountinfo.
/// Panics if there is none.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match MOUNT.get_or_init(find_cgroup2_mount) {
        Ok(p) => p,
        Err(e) => panic!("the envguard integration tests need a cgroup v2 hierarchy: {e}"),
    }
}

fn find_cgroup2_mount() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    for line in info.lines() {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 || fields[3] != "/" {
            continue;
        }
        let mount = PathBuf::from(unescape_mountinfo(fields[4]));
        if mount.join("cgroup.procs").exists() {
            return Ok(mount);
        }
    }
    Err("no cgroup2 file system is mounted (no `cgroup2` entry with root `/` in /proc/self/mountinfo)".into())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `PREFIX-<pid>-<n>`, unique among everything this test process creates
/// and, through the pid, among concurrently running test processes.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// Runs `ip ARGS...`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    if let Err(e) = try_ip(args) {
        panic!("{e}");
    }
}

/// Runs `ip ARGS...`; returns a readable error if it fails.
pub fn try_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip ARGS...` and returns its stdout; panics if it fails.
pub fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The envguard agent binary: `$ENVGUARD_BIN`, else
/// `<tests crate>/../target/debug/envguard`. Panics if it does not exist.
pub fn envguard_bin() -> PathBuf {
    let path = match std::env::var_os("ENVGUARD_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/envguard"),
    };
    if !path.is_file() {
        panic!(
            "the envguard agent binary is missing at {}: run the suite with `cargo xtask test` \
             (which builds the agent and sets ENVGUARD_BIN), or build the agent first and set \
             ENVGUARD_BIN to its path",
            path.display()
        );
    }
    path
}

/// This host's node name, as `uname -n` prints it.
pub fn hostname() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        panic!("uname failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates nodename.
    unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Sends `sig` to `pid`; errors (e.g. the process is gone) are ignored.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
