//! What every section shares: a temp directory, the benchmark's cgroup tree
//! (the harness's `CgroupTree`, `<cg2>/envguard-t-<pid>-<n>`) and the
//! harness's two-namespace topology. Sections create their own children of
//! the tree and own their agents, workers and nft tables, which are dropped
//! before this (field order is drop order: topology, then cgroups, then the
//! temp directory).

use std::path::{Path, PathBuf};

use envguard_tests::{CgroupTree, Topology, sys};

use crate::worker::Place;

pub struct BenchEnv {
    pub topo: Topology,
    pub cg: CgroupTree,
    pub tmp: TempDir,
    pub agent_bin: PathBuf,
    pub quick: bool,
}

impl BenchEnv {
    pub fn new(agent_bin: PathBuf, quick: bool) -> BenchEnv {
        let tmp = TempDir::new();
        let cg = CgroupTree::create();
        let topo = Topology::create();
        BenchEnv {
            topo,
            cg,
            tmp,
            agent_bin,
            quick,
        }
    }

    /// The largest policy: 100 000 CIDRs; 20 000 in a quick run, which is a
    /// smoke test (and an agent that loads big policies slowly would
    /// otherwise make it slow).
    pub fn big(&self) -> usize {
        if self.quick { 20_000 } else { 100_000 }
    }

    /// Creates `sub` (and its parents) in the tree; returns its path
    /// relative to the cgroup2 mount.
    pub fn mkdir(&self, sub: &str) -> String {
        let mut path = String::new();
        for part in sub.split('/') {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            if !self.cg.abs(&path).exists() {
                self.cg.mkdir(&path);
            }
        }
        self.cg.rel(sub)
    }

    /// A process in the tree's cgroup `sub`, in the client netns.
    pub fn client(&self, sub: &str) -> Place {
        Place {
            cgroup: Some(self.cg.abs(sub)),
            netns: Some(self.topo.client.name().to_owned()),
        }
    }

    /// A remote host: the server netns, in the benchmark's own cgroup
    /// (outside every attach point).
    pub fn server(&self) -> Place {
        Place {
            cgroup: None,
            netns: Some(self.topo.server.name().to_owned()),
        }
    }

    /// Only the client netns (for `nft`), in the benchmark's own cgroup.
    pub fn client_ns(&self) -> Place {
        Place {
            cgroup: None,
            netns: Some(self.topo.client.name().to_owned()),
        }
    }

    /// The ifindex of the client netns's veth (its only device besides lo).
    pub fn client_ifindex(&self) -> u32 {
        let out = sys::ip_output(&["-n", self.topo.client.name(), "-o", "link", "show"]);
        out.lines()
            .filter(|l| !l.contains(": lo:"))
            .find_map(|l| l.split(':').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no veth in the client netns: {out}"))
    }

    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", p.display()));
        p
    }
}

/// `<tmp>/envguard-bench-<pid>-<n>`, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(sys::unique_name("envguard-bench"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "envguard-bench: cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}
