//! Attaching and pinning: the programs attached to the cgroup (links pinned,
//! kept across restarts, replaced atomically by a new build), the
//! `cgroup_mkdir` watch, and removing pinned layouts (`envguard detach`).
use std::{
    fs::{self, File},
    os::fd::AsFd as _,
    path::Path,
};

use aya::{
    maps::Array,
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, ProgramError, links::FdLink},
};
use envguard_common::{
    config::CgroupOffsets,
    maps,
    programs::{self, Attach, Hook},
};

use super::{Kernel, bpf_err, bpf_msg, error_chain, io_err, map};
use crate::{
    bpf_sys, btf,
    error::{Error, Result},
    pinroot, sys,
};

impl Kernel {
    /// Attaches every program to `cgroup`, keeping what is already pinned:
    /// - a link of this build on this cgroup stays as it is (same program);
    /// - a link of another build gets the new program with one atomic
    ///   BPF_LINK_UPDATE;
    /// - a missing link (first start, another cgroup, another layout) is
    ///   created and pinned, and only then are links of other layouts or
    ///   cgroups removed, so the hook is never without a program.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let dir =
            File::open(cgroup).map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
        self.cgroup_id = sys::cgroup_id(cgroup).unwrap_or(0);
        let same_cgroup = self.previous.is_some_and(|p| p.cgroup_id == self.cgroup_id);
        let same_build = self
            .previous
            .is_some_and(|p| p.object_hash == self.object_hash);
        let links_dir = self.layout_dir.join("links");
        let mut stale_links = Vec::new();
        for hook in programs::HOOKS.iter().filter(|h| h.is_cgroup()) {
            let name = hook.name;
            let pin = links_dir.join(name);
            let context = || format!("attaching {name} to {}", cgroup.display());
            if pin.exists() && same_cgroup {
                if same_build {
                    continue;
                }
                let link = bpf_sys::obj_get(&pin)
                    .map_err(io_err(format!("opening pinned link {}", pin.display())))?;
                let prog = self.load_program(name)?;
                let fd = prog.fd().map_err(|e| bpf_err(context(), e))?;
                bpf_sys::link_update(link.as_fd(), fd.as_fd()).map_err(io_err(format!(
                    "replacing the program of {}",
                    pin.display()
                )))?;
                continue;
            }
            if pin.exists() {
                // Attached to another cgroup: replace it once the new one is in.
                // bpffs refuses names with a dot.
                let old = pin.with_file_name(format!("{name}_old"));
                fs::rename(&pin, &old).map_err(io_err(format!("moving {}", pin.display())))?;
                stale_links.push(old);
            }
            let prog = self.load_program(name)?;
            let link = attach_program(prog, hook, &dir).map_err(|e| bpf_msg(context(), e))?;
            link.pin(&pin)
                .map_err(|e| bpf_err(format!("pinning {}", pin.display()), e))?;
        }
        for old in stale_links {
            fs::remove_file(&old).map_err(io_err(format!("removing {}", old.display())))?;
        }
        if let Err(e) = self.watch_mkdir(same_build) {
            log::warn!(
                "no {} watch ({e}): a listed cgroup created while the agent runs is `host` until the next poll (≤ 1 s)",
                programs::CGROUP_MKDIR
            );
        }
        remove_other_layouts(&self.pin_root, &self.layout_dir)?;
        self.heartbeat()
    }

    pub(super) fn load_program(&mut self, name: &str) -> Result<&mut Program> {
        let verifier_log = self.verifier_log;
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| bpf_msg(format!("loading {name}"), "program missing from the object"))?;
        if prog.fd().is_ok() {
            return Ok(prog);
        }
        let started = std::time::Instant::now();
        let res = match prog {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::RawTracePoint(p) => p.load(),
            Program::SchedClassifier(p) => p.load(),
            _ => {
                return Err(bpf_msg(
                    format!("loading {name}"),
                    "unexpected program type",
                ));
            }
        };
        res.map_err(|e| load_error(name, e, verifier_log))?;
        log::debug!("loaded {name} (verified) in {:?}", started.elapsed());
        Ok(prog)
    }

    /// Attaches the `cgroup_mkdir` watch (raw tracepoint, not tied to a
    /// cgroup) and pins its link beside the others; a pinned one of this
    /// build is kept. Without the kernel's BTF or the fields it reads, the
    /// watch is off and listed cgroups created later wait for the poll.
    fn watch_mkdir(&mut self, same_build: bool) -> Result<()> {
        let name = programs::CGROUP_MKDIR;
        let Some(Attach::RawTracepoint(tracepoint)) = programs::by_name(name).map(|h| h.attach)
        else {
            return Err(bpf_msg(
                format!("loading {name}"),
                "not a raw tracepoint in the hook table",
            ));
        };
        let offsets = btf::Btf::from_sys_fs().and_then(|b| btf::cgroup_offsets(&b));
        // The kernel's whole type table was parsed for four offsets: give the
        // memory back (glibc keeps freed heap otherwise; about 10 MiB of RSS).
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe {
            libc::malloc_trim(0);
        }
        {
            let mut m: Array<_, CgroupOffsets> = map(&mut self.ebpf, maps::MKDIR_OFFSETS)?;
            let value = offsets.as_ref().copied().unwrap_or(CgroupOffsets {
                enabled: 0,
                cgroup_kn: 0,
                cgroup_root: 0,
                kn_id: 0,
                root_hierarchy_id: 0,
                _pad: 0,
            });
            m.set(0, value, 0)
                .map_err(|e| bpf_err(format!("writing {}", maps::MKDIR_OFFSETS), e))?;
        }
        if let Err(e) = offsets {
            log::warn!(
                "no {name} watch ({e}): a listed cgroup created while the agent runs is `host` until the next poll (≤ 1 s)"
            );
            return Ok(());
        }
        let pin = self.layout_dir.join("links").join(name);
        if pin.exists() && same_build {
            return Ok(());
        }
        let prog = self.load_program(name)?;
        let Program::RawTracePoint(p) = prog else {
            return Err(bpf_msg(
                format!("loading {name}"),
                "unexpected program type",
            ));
        };
        let context = format!("attaching {name}");
        let id = p.attach(tracepoint).map_err(|e| bpf_err(&context, e))?;
        let link = FdLink::from(p.take_link(id).map_err(|e| bpf_err(&context, e))?);
        // Another build's link goes only once this one records: rename
        // replaces the pin in one step, which releases the old link. (No dot
        // in the name: bpffs refuses those.)
        let new = pin.with_file_name(format!("{name}_next"));
        let _ = fs::remove_file(&new);
        link.pin(&new)
            .map_err(|e| bpf_err(format!("pinning {}", new.display()), e))?;
        fs::rename(&new, &pin).map_err(io_err(format!(
            "moving {} to {}",
            new.display(),
            pin.display()
        )))
    }
}

fn attach_program(
    prog: &mut Program,
    hook: &Hook,
    dir: &File,
) -> std::result::Result<FdLink, String> {
    // aya attaches through BPF links, which the kernel always treats as
    // multi-attach (and refuses any flag for): whatever else is attached here
    // (systemd's, other tools') stays in force, and a call or packet passes
    // only if every program passes it.
    let mode = CgroupAttachMode::Single;
    let prog_err = |e: ProgramError| error_chain(&e);
    let link_err = |e: aya::programs::links::LinkError| error_chain(&e);
    match prog {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(dir, mode).map_err(prog_err)?;
            FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)
        }
        Program::CgroupSock(p) => {
            let id = p.attach(dir, mode).map_err(prog_err)?;
            FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)
        }
        Program::CgroupSkb(p) => {
            let ty = match hook.attach {
                Attach::Cgroup(programs::BPF_CGROUP_INET_INGRESS) => CgroupSkbAttachType::Ingress,
                Attach::Cgroup(programs::BPF_CGROUP_INET_EGRESS) => CgroupSkbAttachType::Egress,
                _ => return Err("a cgroup_skb program needs an ingress or egress hook".to_owned()),
            };
            let id = p.attach(dir, ty, mode).map_err(prog_err)?;
            FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)
        }
        _ => Err("unexpected program type".to_owned()),
    }
}

fn load_error(name: &str, e: ProgramError, verifier_log: bool) -> Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log: log,
        } => {
            let message = if verifier_log {
                format!("the kernel verifier rejected it ({io_error}):\n{log}")
            } else {
                format!(
                    "the kernel verifier rejected it ({io_error}); run with --verifier-log to see why"
                )
            };
            bpf_msg(format!("loading {name}"), message)
        }
        other => bpf_err(format!("loading {name}"), other),
    }
}

/// Removes the pins of other layouts: their links first (which detaches their
/// programs, the current layout's being attached already), then their maps.
fn remove_other_layouts(pin_root: &Path, keep: &Path) -> Result<()> {
    let entries =
        fs::read_dir(pin_root).map_err(io_err(format!("listing {}", pin_root.display())))?;
    for e in entries.filter_map(std::result::Result::ok) {
        let path = e.path();
        if path != keep && e.file_name().to_string_lossy().starts_with("layout-") {
            log::info!(
                "removing pinned state of another layout: {}",
                path.display()
            );
            remove_layout(&path)?;
        }
    }
    Ok(())
}

fn remove_layout(dir: &Path) -> Result<()> {
    for sub in ["links", "maps"] {
        let d = dir.join(sub);
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.filter_map(std::result::Result::ok) {
                fs::remove_file(e.path())
                    .map_err(io_err(format!("removing {}", e.path().display())))?;
            }
            fs::remove_dir(&d).map_err(io_err(format!("removing {}", d.display())))?;
        }
    }
    fs::remove_dir(dir).map_err(io_err(format!("removing {}", dir.display())))
}

/// Removes everything envguard pinned under `pin_root`: every link (detaching
/// its program), every map, the directories. Refuses while an agent holds it.
pub fn detach(pin_root: &Path) -> Result<usize> {
    if !pinroot::check_existing(pin_root, "detaching")? {
        return Ok(0);
    }
    let lock = sys::lock_dir(pin_root, "detaching")?;
    // Before the pins go: they say which cls_bpf filters are this pin root's.
    let filters = super::clsact::remove_all_own(&super::clsact::own_maps(pin_root))
        .map_err(io_err("removing envguard's cls_bpf filters (RTM_GETLINK)"))?;
    if filters > 0 {
        log::info!("removed {filters} cls_bpf filter(s) of the tc hooks");
    }
    let mut removed = 0;
    let entries =
        fs::read_dir(pin_root).map_err(io_err(format!("listing {}", pin_root.display())))?;
    for e in entries.filter_map(std::result::Result::ok) {
        if e.file_name().to_string_lossy().starts_with("layout-") {
            remove_layout(&e.path())?;
            removed += 1;
        }
    }
    drop(lock);
    match fs::remove_dir(pin_root) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            log::warn!(
                "{} holds files envguard did not make; left in place",
                pin_root.display()
            );
        }
        Err(e) => return Err(io_err(format!("removing {}", pin_root.display()))(e)),
    }
    Ok(removed)
}
