//! `CgroupTree`: a test's own cgroup subtree, `<cg2>/envguard-t-<pid>-<n>`,
//! removed (with everything below it) when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;

/// A cgroup directory this test created under the cgroup2 mount, plus any
/// children created through it. On drop the whole subtree is removed
/// deepest-first; processes still inside (all started by this test) are
/// killed first. Drop never panics.
pub struct CgroupTree {
    mount: PathBuf,
    /// Path relative to the cgroup2 mount, e.g. `/envguard-t-1234-0`.
    rel: String,
}

impl CgroupTree {
    /// Creates `<cg2>/envguard-t-<pid>-<n>`.
    pub fn create() -> Self {
        let mount = sys::cgroup2_mount().to_path_buf();
        let rel = format!("/{}", sys::unique_name("envguard-t"));
        let tree = CgroupTree { mount, rel };
        std::fs::create_dir(tree.abs(""))
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", tree.abs("").display()));
        tree
    }

    /// Path relative to the cgroup2 mount of `sub` (`""` = the tree's root),
    /// e.g. `/envguard-t-1234-0/dev/late`.
    pub fn rel(&self, sub: &str) -> String {
        if sub.is_empty() {
            self.rel.clone()
        } else {
            format!("{}/{sub}", self.rel)
        }
    }

    /// Absolute directory of `sub` (`""` = the tree's root).
    pub fn abs(&self, sub: &str) -> PathBuf {
        let rel = self.rel(sub);
        self.mount.join(rel.trim_start_matches('/'))
    }

    /// Creates the child cgroup `sub` (e.g. `"dev"`, `"dev/late"`).
    pub fn mkdir(&self, sub: &str) {
        let dir = self.abs(sub);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
    }

    /// The cgroup id of `sub`: on cgroup v2 it is the directory's inode number.
    pub fn id(&self, sub: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.abs(sub);
        std::fs::metadata(&dir)
            .unwrap_or_else(|e| panic!("cannot stat cgroup {}: {e}", dir.display()))
            .ino()
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let root = self.abs("");
        if let Err(e) = remove_tree(&root) {
            eprintln!(
                "envguard-tests: cleanup: cannot remove cgroup tree {}: {e}",
                root.display()
            );
        }
    }
}

fn remove_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let mut first_err = None;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read_dir {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && let Err(e) = remove_tree(&entry.path())
        {
            first_err.get_or_insert(e);
        }
    }
    empty_cgroup(dir);
    // rmdir fails with EBUSY while the last killed task is still exiting.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) if Instant::now() >= deadline => {
                first_err.get_or_insert(format!("rmdir {}: {e}", dir.display()));
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Kills every process left in this cgroup (only this test's processes can
/// be there) and waits until it is unpopulated.
fn empty_cgroup(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if procs.trim().is_empty() {
        return;
    }
    eprintln!(
        "envguard-tests: cleanup: killing processes left in {}: {}",
        dir.display(),
        procs.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            sys::signal(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l == "populated 0") || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
