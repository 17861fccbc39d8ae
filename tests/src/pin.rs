//! `PinRoot`: a test's own bpffs pin root, `/sys/fs/bpf/envguard-t-<pid>-<n>`,
//! cleaned up on drop with `envguard detach` and then removed; and
//! `Footprint`: what an agent left in the kernel, read through bpf(2).
//!
//! The contract: pins live at `DIR/layout-<hex>/maps/<MAP_NAME>` and
//! `DIR/layout-<hex>/links/<program_name>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bpf::{self, HOOKS, Kind, LinkInfo, WATCHES};
use crate::sys;

/// How long objects may take to disappear once their last reference went
/// (links and maps are freed from deferred work and RCU callbacks).
pub const GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// See the module docs. The directory itself is created by the agent.
pub struct PinRoot {
    path: PathBuf,
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PinRoot {
    /// Names a new pin root; creates nothing.
    pub fn new() -> Self {
        PinRoot {
            path: Path::new(sys::BPFFS).join(sys::unique_name("envguard-t")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything below the pin root (directories included), sorted.
    pub fn entries(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out.sort();
        out
    }

    /// Every pin (anything but a directory) below the pin root, sorted.
    pub fn pins(&self) -> Vec<PathBuf> {
        self.entries().into_iter().filter(|p| !p.is_dir()).collect()
    }

    /// The `layout-<hex>` directories.
    pub fn layout_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix("layout-"))
                        .is_some_and(|hex| {
                            !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
                        })
            })
            .collect();
        dirs.sort();
        dirs
    }

    /// Reads what the agent pinned, with every cross-check the contract
    /// allows: exactly one layout directory; one link pin per program, each
    /// a cgroup link attached to `cgroup_id` with the program's attach
    /// type, plus one link of its type per [`WATCHES`] entry (the
    /// `cgroup_mkdir` raw tracepoint); the programs attached at `cgroup_dir`
    /// are exactly the linked ones. Panics, listing the pin root, otherwise.
    pub fn footprint(&self, cgroup_dir: &Path, cgroup_id: u64) -> Footprint {
        let listing = || {
            self.entries()
                .iter()
                .map(|p| format!("  {}\n", p.display()))
                .collect::<String>()
        };
        let layouts = self.layout_dirs();
        assert!(
            layouts.len() == 1,
            "expected exactly one layout-<hex> directory under {}, found {layouts:?}; contents:\n{}",
            self.path.display(),
            listing()
        );
        let layout = &layouts[0];
        let mut links = BTreeMap::new();
        let link_at = |name: &str| {
            let pin = layout.join("links").join(name);
            let fd = bpf::obj_get(&pin).unwrap_or_else(|e| {
                panic!(
                    "cannot open link pin {} ({e}); contents of the pin root:\n{}",
                    pin.display(),
                    listing()
                )
            });
            let info = bpf::link_info(&fd)
                .unwrap_or_else(|e| panic!("link info of {}: {e}", pin.display()));
            (pin, info)
        };
        for (name, attach_type) in HOOKS {
            let (pin, info) = link_at(name);
            assert!(
                info.link_type == bpf::LINK_TYPE_CGROUP
                    && info.cgroup_id == cgroup_id
                    && info.attach_type == attach_type,
                "{}: expected a cgroup link (type {}) on cgroup {cgroup_id} with attach type {attach_type}, got {info:?}",
                pin.display(),
                bpf::LINK_TYPE_CGROUP
            );
            links.insert(name.to_owned(), info);
        }
        for (name, link_type) in WATCHES {
            let (pin, info) = link_at(name);
            assert_eq!(
                info.link_type,
                link_type,
                "{}: expected a link of type {link_type}, got {info:?}",
                pin.display()
            );
            links.insert(name.to_owned(), info);
        }
        let extra: Vec<_> = std::fs::read_dir(layout.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !links.contains_key(n))
            .collect();
        assert!(
            extra.is_empty(),
            "unexpected link pins {extra:?} in {}",
            layout.join("links").display()
        );

        let mut maps = BTreeMap::new();
        for entry in std::fs::read_dir(layout.join("maps"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let pin = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let fd = bpf::obj_get(&pin)
                .unwrap_or_else(|e| panic!("cannot open map pin {} ({e})", pin.display()));
            let info =
                bpf::map_info(&fd).unwrap_or_else(|e| panic!("map info of {}: {e}", pin.display()));
            maps.insert(name, info.id);
        }
        assert!(
            !maps.is_empty(),
            "no map pins in {}; contents:\n{}",
            layout.join("maps").display(),
            listing()
        );

        let prog_ids: BTreeSet<u32> = links.values().map(|l| l.prog_id).collect();
        let mut map_ids: BTreeSet<u32> = maps.values().copied().collect();
        for &id in &prog_ids {
            let fd = bpf::fd_by_id(Kind::Prog, id)
                .unwrap_or_else(|e| panic!("cannot open program {id}: {e}"));
            let info = bpf::prog_info(&fd).unwrap_or_else(|e| panic!("program info of {id}: {e}"));
            map_ids.extend(info.map_ids);
        }
        for (name, attach_type) in HOOKS {
            let ids = bpf::query_cgroup(cgroup_dir, attach_type).unwrap_or_else(|e| {
                panic!("BPF_PROG_QUERY {name} on {}: {e}", cgroup_dir.display())
            });
            assert_eq!(
                ids,
                vec![links[name].prog_id],
                "the programs attached at {} for {name} must be exactly the one its link pin holds",
                cgroup_dir.display()
            );
        }
        Footprint {
            pins: self.pins(),
            links,
            maps,
            prog_ids,
            map_ids,
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        out.push(p.clone());
        if is_dir {
            walk(&p, out);
        }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        let out = sys::envguard_detach(&sys::envguard_bin_path(), &self.path);
        if !out.success() {
            eprintln!(
                "envguard-tests: cleanup: envguard detach --pin-root {} failed ({:?}): {}{}",
                self.path.display(),
                out.status,
                out.stdout,
                out.stderr
            );
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "envguard-tests: cleanup: cannot remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// What an agent had in the kernel at one moment (see [`PinRoot::footprint`]).
#[derive(Clone, Debug)]
pub struct Footprint {
    /// Every pin under the pin root.
    pub pins: Vec<PathBuf>,
    /// Link pins by program name.
    pub links: BTreeMap<String, LinkInfo>,
    /// Map pins: name → map id.
    pub maps: BTreeMap<String, u32>,
    /// The linked programs.
    pub prog_ids: BTreeSet<u32>,
    /// The pinned maps and every map the linked programs use.
    pub map_ids: BTreeSet<u32>,
}

impl Footprint {
    pub fn link_ids(&self) -> BTreeSet<u32> {
        self.links.values().map(|l| l.id).collect()
    }

    /// Program name → (link id, program id).
    pub fn link_progs(&self) -> BTreeMap<String, (u32, u32)> {
        self.links
            .iter()
            .map(|(n, l)| (n.clone(), (l.id, l.prog_id)))
            .collect()
    }

    /// Descriptions of every object of this footprint that still exists.
    pub fn remaining(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (kind, ids) in [
            (Kind::Prog, &self.prog_ids),
            (Kind::Map, &self.map_ids),
            (Kind::Link, &self.link_ids()),
        ] {
            match bpf::all_ids(kind) {
                Ok(all) => left.extend(
                    ids.intersection(&all)
                        .map(|id| format!("{} {id}", kind.name())),
                ),
                Err(e) => left.push(format!("cannot list {} ids: {e}", kind.name())),
            }
        }
        left
    }

    /// Polls (at most [`GONE_TIMEOUT`]) until no program, map or link of
    /// this footprint exists any more and (with `cgroup_dir`) no program is
    /// attached there for any envguard hook; panics listing what is left.
    pub fn assert_all_gone(&self, cgroup_dir: Option<&Path>, context: &str) {
        let deadline = Instant::now() + GONE_TIMEOUT;
        loop {
            let mut left = self.remaining();
            for (name, attach_type) in cgroup_dir.map_or(&[][..], |_| &HOOKS[..]) {
                let cgroup_dir = cgroup_dir.expect("only with a cgroup");
                match bpf::query_cgroup(cgroup_dir, *attach_type) {
                    Ok(ids) if ids.is_empty() => {}
                    Ok(ids) => left.push(format!(
                        "programs {ids:?} attached at {} for {name}",
                        cgroup_dir.display()
                    )),
                    Err(e) => left.push(format!("BPF_PROG_QUERY {name}: {e}")),
                }
            }
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: envguard's kernel objects are still there {GONE_TIMEOUT:?} later:\n  {}\n(recorded footprint: {self:?})",
                left.join("\n  ")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
