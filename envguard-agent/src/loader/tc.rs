//! The tc hooks on the interfaces the policy lists: attached with tcx as BPF
//! links pinned beside the cgroup links (`links/tcx_<ifindex>_<ingress|egress>`)
//! and adopted by the next agent; where the kernel has no tcx (before 6.6),
//! as clsact + cls_bpf filters (direct action), which are not links and so
//! are attached again by the next agent. Other programs on a device are never
//! touched: a tcx link is one more entry in the device's chain (appended
//! last), a cls_bpf filter one more filter.
use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{
        LinkOrder, Program, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{NlOptions, TcAttachOptions, qdisc_add_clsact},
    },
};
use envguard_common::{maps, policy::IfaceEnv, programs};

use super::{Kernel, bpf_err, bpf_msg, clsact, error_chain, io_err, map};
use crate::{bpf_sys, error::Result, interfaces, policy::compile::Compiled};

/// `BPF_LINK_TYPE_TCX`.
const LINK_TYPE_TCX: u32 = 11;
const PIN_PREFIX: &str = "tcx_";

/// How the tc hooks are on one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcMode {
    /// tcx links, pinned.
    Tcx,
    /// clsact qdisc + cls_bpf filters (no tcx in this kernel).
    Clsact,
}

/// A listed interface with the hooks on it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TcInterface {
    pub name: String,
    pub ifindex: u32,
    pub env: u32,
    pub mode: TcMode,
}

/// The listed interfaces that exist now: ifindex → (name, env, master).
type Listed = BTreeMap<u32, (String, u32, u32)>;

/// Fills one slot of `IFACE_ENVS` with the interfaces `compiled` lists that
/// exist now (a new policy, before it is made active).
pub(super) fn fill_slot(ebpf: &mut Ebpf, slot: usize, compiled: &Compiled) -> Result<()> {
    let listed = current(compiled)?;
    write_slot(ebpf, slot, &listed)
}

fn current(compiled: &Compiled) -> Result<Listed> {
    if compiled.interfaces.is_empty() {
        return Ok(Listed::new());
    }
    let links = interfaces::list().map_err(io_err("listing network interfaces (RTM_GETLINK)"))?;
    Ok(interfaces::listed(compiled, &links))
}

fn write_slot(ebpf: &mut Ebpf, slot: usize, listed: &Listed) -> Result<()> {
    let name = maps::IFACE_ENVS[slot];
    let mut m: HashMap<_, u32, IfaceEnv> = map(ebpf, name)?;
    let stale: Vec<u32> = m
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| !listed.contains_key(k))
        .collect();
    for k in stale {
        m.remove(&k)
            .map_err(|e| bpf_err(format!("updating {name}"), e))?;
    }
    for (&ifindex, &(_, env, master)) in listed {
        let want = IfaceEnv { env, master };
        if m.get(&ifindex, 0).ok() == Some(want) {
            continue;
        }
        m.insert(ifindex, want, 0)
            .map_err(|e| bpf_err(format!("updating {name}"), e))?;
    }
    Ok(())
}

fn pin_name(ifindex: u32, ingress: bool) -> String {
    format!(
        "{PIN_PREFIX}{ifindex}_{}",
        if ingress { "ingress" } else { "egress" }
    )
}

/// `bpf_link_info` of a tcx link: (type, ifindex).
fn tcx_link_info(fd: &OwnedFd) -> std::io::Result<(u32, u32)> {
    let mut info = [0u8; 64];
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: the attribute points at our buffer of the length it gives.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::from_mut(&mut attr),
            size_of::<Attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    Ok((u32_at(0), u32_at(16)))
}

impl Kernel {
    /// Brings the tc hooks in line with the policy and the interfaces that
    /// exist now: the active slot of `IFACE_ENVS` gets the listed ones, each
    /// gets its hooks (a pinned link of an earlier agent on the same device
    /// is kept, its program swapped atomically), and the hooks of interfaces
    /// no longer listed (or gone) are removed. Called at start, at every
    /// link notification (an interface that appears is attached as it
    /// appears), and by the housekeeping poll every second as a backstop.
    pub fn sync_interfaces(&mut self, compiled: &Compiled) -> Result<Vec<TcInterface>> {
        let listed = current(compiled)?;
        let slot = self.config.slot() as usize;
        write_slot(&mut self.ebpf, slot, &listed)?;
        let links_dir = self.layout_dir.join("links");
        let mut out = Vec::new();
        for (&ifindex, (name, env, _)) in &listed {
            interfaces::remember(ifindex, name);
            let mut mode = TcMode::Tcx;
            for ingress in [true, false] {
                match self.tc_hook(ifindex, name, ingress) {
                    Ok(m) => mode = m,
                    Err(e) if !exists(ifindex) => {
                        // Gone while we attached: the next poll forgets it.
                        log::info!("interface {name} went away while attaching: {e}");
                    }
                    Err(e) => return Err(e),
                }
            }
            out.push(TcInterface {
                name: name.clone(),
                ifindex,
                env: *env,
                mode,
            });
        }
        // Pins of interfaces no longer listed: removing the pin releases the
        // link, which detaches the program from that device alone.
        if let Ok(entries) = fs::read_dir(&links_dir) {
            for e in entries.filter_map(std::result::Result::ok) {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = file.strip_prefix(PIN_PREFIX) else {
                    continue;
                };
                let ifindex: Option<u32> = rest.split('_').next().and_then(|s| s.parse().ok());
                if ifindex.is_none_or(|i| !listed.contains_key(&i)) {
                    fs::remove_file(e.path())
                        .map_err(io_err(format!("removing {}", e.path().display())))?;
                }
            }
        }
        self.tc_attached.retain(|(i, _), _| listed.contains_key(i));
        Ok(out)
    }

    fn tc_hook(&mut self, ifindex: u32, ifname: &str, ingress: bool) -> Result<TcMode> {
        let prog_name = if ingress {
            programs::TC_INGRESS
        } else {
            programs::TC_EGRESS
        };
        let pin = self
            .layout_dir
            .join("links")
            .join(pin_name(ifindex, ingress));
        // Already done by this agent: nothing to do at the poll.
        match self.tc_attached.get(&(ifindex, ingress)) {
            Some(TcMode::Clsact) => return Ok(TcMode::Clsact),
            Some(TcMode::Tcx) if pin.exists() => return Ok(TcMode::Tcx),
            _ => {}
        }
        let context = || format!("attaching {prog_name} to {ifname}");
        if pin.exists() {
            let link = bpf_sys::obj_get(&pin)
                .map_err(io_err(format!("opening pinned link {}", pin.display())))?;
            match tcx_link_info(&link) {
                Ok((LINK_TYPE_TCX, i)) if i == ifindex => {
                    // Ours, on this very device: keep the link (no moment
                    // without a program), give it this build's program.
                    let prog = self.load_program(prog_name)?;
                    let fd = prog.fd().map_err(|e| bpf_err(context(), e))?;
                    bpf_sys::link_update(link.as_fd(), fd.as_fd()).map_err(io_err(format!(
                        "replacing the program of {}",
                        pin.display()
                    )))?;
                    self.tc_attached.insert((ifindex, ingress), TcMode::Tcx);
                    return Ok(TcMode::Tcx);
                }
                // A device that went away (its links are defunct) and an
                // index that came back for another one: start afresh.
                _ => {
                    fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?
                }
            }
        }
        let attach_type = if ingress {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let force_clsact = self.force_clsact;
        let prog = self.load_program(prog_name)?;
        let Program::SchedClassifier(p) = prog else {
            return Err(bpf_msg(context(), "not a tc program"));
        };
        let tcx = if force_clsact {
            None
        } else {
            Some(p.attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ))
        };
        let (mode, keep) = match tcx {
            Some(Ok(id)) => {
                let link = p.take_link(id).map_err(|e| bpf_err(context(), e))?;
                let link = FdLink::try_from(link).map_err(|e| bpf_err(context(), e))?;
                link.pin(&pin)
                    .map_err(|e| bpf_err(format!("pinning {}", pin.display()), e))?;
                (TcMode::Tcx, None)
            }
            Some(Err(e)) if !no_tcx(&e) => return Err(bpf_err(context(), e)),
            other => {
                if let Some(Err(e)) = other {
                    log::warn!(
                        "no tcx in this kernel ({}): {ifname} gets clsact + cls_bpf filters",
                        error_chain(&e)
                    );
                }
                let keep =
                    attach_clsact(p, ifname, attach_type).map_err(|m| bpf_msg(context(), m))?;
                // A tcx link an earlier agent pinned for this device (it ran
                // with tcx): this filter replaces it.
                if pin.exists() {
                    fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
                }
                (TcMode::Clsact, Some(keep))
            }
        };
        // The new hook is in: earlier agents' filters of this pin root go
        // (whatever their build, they would keep running before or after it).
        // Failing that leaves an extra filter, which is said, not a device
        // without its hook: the attach stands.
        match clsact::remove_own(ifindex, ingress, &self.own_maps, keep) {
            Ok(0) => {}
            Ok(n) => log::info!("{ifname}: removed {n} cls_bpf filter(s) of an earlier agent"),
            Err(e) => log::warn!(
                "{ifname}: cannot remove earlier envguard cls_bpf filters ({e}); `tc filter show dev {ifname}` lists them"
            ),
        }
        self.tc_attached.insert((ifindex, ingress), mode);
        Ok(mode)
    }
}

fn exists(ifindex: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes.
    !unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) }.is_null()
}

/// The kernel does not know tcx attach types (before 6.6).
fn no_tcx(e: &aya::programs::ProgramError) -> bool {
    let msg = error_chain(e);
    [libc::EINVAL, libc::EOPNOTSUPP, libc::ENOTSUP]
        .iter()
        .any(|n| msg.contains(&std::io::Error::from_raw_os_error(*n).to_string()))
}

/// clsact (kept if it exists: other filters may hang off it) and one more
/// cls_bpf filter, which outlives the agent (it is not a link); returns its
/// (priority, handle).
fn attach_clsact(
    p: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
) -> std::result::Result<(u16, u32), String> {
    if let Err(e) = qdisc_add_clsact(ifname)
        && !error_chain(&e).contains(&std::io::Error::from_raw_os_error(libc::EEXIST).to_string())
    {
        return Err(format!("adding clsact: {}", error_chain(&e)));
    }
    let id = p
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| error_chain(&e))?;
    let link = p.take_link(id).map_err(|e| error_chain(&e))?;
    let at = (
        link.priority().map_err(|e| error_chain(&e))?,
        u32::from(link.handle().map_err(|e| error_chain(&e))?),
    );
    // Dropping the link would remove the filter: it stays with the device.
    std::mem::forget(link);
    Ok(at)
}
