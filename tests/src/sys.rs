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
    let path = envguard_bin_path();
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

/// Where the agent binary should be (see [`envguard_bin`]); never panics.
pub fn envguard_bin_path() -> PathBuf {
    match std::env::var_os("ENVGUARD_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/envguard"),
    }
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

/// CLOCK_MONOTONIC now, in ns: the clock `egprobe connect-loop` reports
/// times in, so both sides can be compared.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The bpffs under which the tests' pin roots live.
pub const BPFFS: &str = "/sys/fs/bpf";

const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Whether `dir` is on a bpf file system.
pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C path and a writable buffer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type's width differs between targets; BPF_FS_MAGIC fits in 32 bits.
    rc == 0 && (st.f_type as u64 & 0xffff_ffff) == u64::from(BPF_FS_MAGIC)
}

/// Makes sure a bpffs is mounted at [`BPFFS`] before any agent starts: the
/// agent mounts one itself when it is missing, but agents that start at the
/// same moment (tests run in parallel) would each mount one, stacked, and
/// hide each other's pins. Mounting it once here, as the agent would (mode
/// 0700), avoids that. Panics saying what to do if it cannot.
pub fn ensure_bpffs() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let res = DONE.get_or_init(|| {
        let dir = Path::new(BPFFS);
        if is_bpffs(dir) {
            return Ok(());
        }
        // SAFETY: constant, NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 && !is_bpffs(dir) {
            return Err(format!(
                "{BPFFS} is not a bpf file system and mounting one failed ({}): run `mount -t bpf bpf {BPFFS}`",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    });
    if let Err(e) = res {
        panic!("the envguard integration tests pin state under {BPFFS}: {e}");
    }
}

/// What a one-shot `envguard` command did.
#[derive(Debug)]
pub struct CmdOutput {
    /// `None`: it did not exit within the timeout and was killed.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `envguard ARGS...` to completion, killing it after `timeout`.
/// Never panics (drop paths use it); a missing binary is reported as a
/// failed run.
pub fn run_envguard(bin: &Path, args: &[&str], timeout: std::time::Duration) -> CmdOutput {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CmdOutput {
                status: None,
                stdout: String::new(),
                stderr: format!("cannot run {} {}: {e}", bin.display(), args.join(" ")),
            };
        }
    };
    fn read_all(p: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let readers = [read_all(child.stdout.take()), read_all(child.stderr.take())];
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    CmdOutput {
        status,
        stdout: out,
        stderr: err,
    }
}

/// `envguard detach --pin-root DIR`.
pub fn envguard_detach(bin: &Path, pin_root: &Path) -> CmdOutput {
    let dir = pin_root.display().to_string();
    run_envguard(
        bin,
        &["detach", "--pin-root", &dir],
        std::time::Duration::from_secs(20),
    )
}
