//! What envguard needs from the host: where cgroup v2 is, cgroup ids and paths,
//! the host name and clocks.
use std::{
    collections::HashMap,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The cgroup v2 mount point, from /proc/self/mountinfo: `/sys/fs/cgroup` on
/// unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
        context: "reading /proc/self/mountinfo".into(),
        source,
    })?;
    parse_cgroup2_mount(&info).ok_or(Error::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source super
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mountpoint = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&oct, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&oct);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Joins a policy cgroup path ("/a/b", relative to the mount) onto the mount.
pub fn cgroup_dir(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// The kernel's id of a cgroup: on cgroup2 it is the directory's inode number.
/// `None` when the cgroup does not exist (yet).
pub fn cgroup_id(dir: &Path) -> Option<u64> {
    fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
}

/// FNV-1a: stable across builds and Rust versions, unlike std's hasher.
pub fn fnv1a(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in chunks {
        for &b in *chunk {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// 128 random bits as 32 hex digits, from the kernel's generator.
pub fn random_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: valid buffer; getrandom on Linux fills it or fails.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Unreachable on Linux ≥ 3.17 with a seeded pool; still unique per run.
        let t = clock_ns(libc::CLOCK_REALTIME) ^ i128::from(std::process::id());
        b = (t as u128).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Seconds since the Unix epoch, now.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`).
pub fn kernel_boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// CLOCK_BOOTTIME now, the clock of `bpf_ktime_get_boot_ns`.
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME) as u64
}

/// Wall-clock time of a CLOCK_BOOTTIME instant, in ns since the epoch.
pub fn boot_ns_to_unix_ns(boot_ns: u64) -> i128 {
    let offset = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME);
    offset + i128::from(boot_ns)
}

/// Resolves cgroup ids to paths with open_by_handle_at (the id is the kernfs
/// file handle), caching the answers. Paths are relative to the cgroup2 mount.
pub struct CgroupNames {
    mount: PathBuf,
    mount_fd: Option<fs::File>,
    cache: HashMap<u64, Option<String>>,
}

/// `FILEID_KERNFS`: the file handle type of kernfs (cgroupfs) inodes.
const FILEID_KERNFS: i32 = 0xfe;
/// Bounds the cache; a host churning through containers must not grow it forever.
const MAX_CACHED: usize = 4096;

#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

impl CgroupNames {
    pub fn new(mount: &Path) -> Self {
        Self {
            mount: mount.to_owned(),
            mount_fd: fs::File::open(mount).ok(),
            cache: HashMap::new(),
        }
    }

    /// Remembers a path the agent already knows (the policy's cgroups).
    pub fn insert(&mut self, id: u64, path: String) {
        self.cache.insert(id, Some(path));
    }

    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.cache.get(&id) {
            return p.clone();
        }
        let found = self.resolve(id);
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(id, found.clone());
        found
    }

    /// Whether the cgroup exists now (never from the cache).
    pub fn exists(&self, id: u64) -> bool {
        self.resolve(id).is_some()
    }

    fn resolve(&self, id: u64) -> Option<String> {
        let mount_fd = self.mount_fd.as_ref()?;
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` is a valid file_handle with 8 bytes of payload.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount_fd.as_raw_fd(),
                (&raw mut handle).cast(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY,
            )
        };
        if fd < 0 {
            return None;
        }
        let link = fs::read_link(format!("/proc/self/fd/{fd}"));
        // SAFETY: we own fd.
        unsafe { libc::close(fd) };
        let full = link.ok()?;
        let rel = full.strip_prefix(&self.mount).ok()?;
        Some(format!("/{}", rel.display()))
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `pin_root` can be created on a bpffs: mounts one at
/// /sys/fs/bpf when the pin root is below it and nothing is mounted there.
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let mut existing = pin_root;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(default) && default.is_dir() {
        // Agents starting at once must not stack one bpffs on another (each
        // would hide the other's pins): mount under a lock, then look again.
        let guard = fs::File::open(default).map_err(|source| Error::Io {
            context: "opening /sys/fs/bpf".into(),
            source,
        })?;
        // SAFETY: valid fd; blocks until the other agent is done.
        unsafe { libc::flock(guard.as_raw_fd(), libc::LOCK_EX) };
        if is_bpffs(default) {
            return Ok(());
        }
        // 0700 as systemd mounts it: bpffs defaults to 1777, where any user
        // could make the pin root before envguard does.
        // SAFETY: constant, valid C strings.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if r == 0 {
            log::info!("mounted bpffs at /sys/fs/bpf (mode 0700)");
            return Ok(());
        }
        return Err(Error::Io {
            context:
                "mounting bpffs at /sys/fs/bpf (try `mount -t bpf -o mode=0700 bpf /sys/fs/bpf`)"
                    .into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Err(Error::NoBpffs {
        pin_root: pin_root.to_owned(),
    })
}

/// Checks the pin root `dir` (see `pinroot`), creates it and takes an
/// exclusive lock on it, held as long as the returned file is open: one agent
/// per pin root.
pub fn lock_dir(dir: &Path, operation: &str) -> Result<fs::File> {
    let f = crate::pinroot::open(dir, operation)?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::AlreadyRunning {
                pin_root: dir.to_owned(),
            });
        }
        return Err(Error::Io {
            context: format!("locking {}", dir.display()),
            source,
        });
    }
    Ok(f)
}

/// Raises the soft RLIMIT_NOFILE to at least `want` (as far as the hard limit
/// allows): the control socket alone may hold 2 048 connections, more than
/// the 1 024 a service gets by default.
pub fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= want {
        return;
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        log::warn!("could not raise the open-file limit to {want}");
    }
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF maps against it
/// (before 5.11); harmless where memory cgroups account for them instead.
pub fn raise_memlock_limit() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / /a\\040b rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/a b"))
        );
    }
}
