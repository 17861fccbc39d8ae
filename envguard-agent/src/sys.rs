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

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
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
