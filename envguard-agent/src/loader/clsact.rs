//! The tc hooks' fallback where the kernel has no tcx (before 6.6): cls_bpf
//! filters under a clsact qdisc. Unlike links they are not pinned, so no file
//! says which are envguard's, and a filter outlives the agent that made it:
//! each restart would add one more (an old build's program running before
//! the new one, on maps an upgrade left behind), and `detach` would leave
//! them.
//!
//! Which filters are whose: a filter belongs to this pin root when its
//! program uses a map pinned under it, in any layout (`own_maps`, read before
//! an agent removes another layout's pins). That names every earlier agent's
//! filter of this pin root, whatever its build, and never another tool's, nor
//! another agent's with a pin root of its own (they share no map).
use std::{collections::BTreeSet, fs, io, path::Path};

use aya::{maps::MapInfo, programs::loaded_programs};

use crate::netlink::{self, attrs, push_attr};

const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
/// `struct tcmsg`.
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS | TC_H_MIN_EGRESS)`.
const PARENT_INGRESS: u32 = 0xffff_fff2;
const PARENT_EGRESS: u32 = 0xffff_fff3;

/// One cls_bpf filter of a device's clsact hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// The protocol it matches, as the kernel keeps it (network order).
    pub protocol: u16,
    pub handle: u32,
    pub prog_id: u32,
}

fn parent(ingress: bool) -> u32 {
    if ingress {
        PARENT_INGRESS
    } else {
        PARENT_EGRESS
    }
}

fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut h = vec![0u8; TCMSG_LEN];
    h[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    h[8..12].copy_from_slice(&handle.to_ne_bytes());
    h[12..16].copy_from_slice(&parent.to_ne_bytes());
    h[16..20].copy_from_slice(&info.to_ne_bytes());
    h
}

/// An RTM_NEWTFILTER payload: the filter, if it is a cls_bpf one with a
/// program (a chain's header message has no handle).
fn parse_filter(p: &[u8]) -> Option<Filter> {
    let word = |o: usize| Some(u32::from_ne_bytes(p.get(o..o + 4)?.try_into().ok()?));
    let handle = word(8)?;
    let info = word(16)?;
    let mut bpf = false;
    let mut prog_id = None;
    for (kind, value) in attrs(p, TCMSG_LEN) {
        match kind {
            TCA_KIND => bpf = value.split(|&b| b == 0).next() == Some(b"bpf"),
            TCA_OPTIONS => {
                prog_id = attrs(value, 0)
                    .find(|(k, _)| *k == TCA_BPF_ID)
                    .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)));
            }
            _ => {}
        }
    }
    (bpf && handle != 0).then_some(Filter {
        priority: (info >> 16) as u16,
        protocol: info as u16,
        handle,
        prog_id: prog_id?,
    })
}

/// The cls_bpf filters of one direction of a device; none if it has no
/// clsact qdisc.
pub fn filters(ifindex: u32, ingress: bool) -> io::Result<Vec<Filter>> {
    let mut out = Vec::new();
    let header = tcmsg(ifindex, 0, parent(ingress), 0);
    match netlink::dump_with(RTM_GETTFILTER, &header, RTM_NEWTFILTER, |p| {
        out.extend(parse_filter(p));
    }) {
        Ok(()) => Ok(out),
        // No clsact on the device: no hook to list.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn delete(ifindex: u32, ingress: bool, f: &Filter) -> io::Result<()> {
    let info = (u32::from(f.priority) << 16) | u32::from(f.protocol);
    let mut p = tcmsg(ifindex, f.handle, parent(ingress), info);
    push_attr(&mut p, TCA_KIND, b"bpf\0");
    match netlink::request(RTM_DELTFILTER, &p) {
        // Gone already (the device, or another remover): nothing left to do.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// The ids of the maps pinned under `pin_root`, in every layout.
pub fn own_maps(pin_root: &Path) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(layouts) = fs::read_dir(pin_root) else {
        return ids;
    };
    for layout in layouts.filter_map(Result::ok) {
        if !layout.file_name().to_string_lossy().starts_with("layout-") {
            continue;
        }
        let Ok(maps) = fs::read_dir(layout.path().join("maps")) else {
            continue;
        };
        for m in maps.filter_map(Result::ok) {
            if let Ok(info) = MapInfo::from_pin(m.path()) {
                ids.insert(info.id());
            }
        }
    }
    ids
}

/// The programs (by id) among `ids` that use one of `maps`.
fn programs_using(ids: &BTreeSet<u32>, maps: &BTreeSet<u32>) -> BTreeSet<u32> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|m| m.iter().any(|id| maps.contains(id)))
        })
        .map(|p| p.id())
        .collect()
}

/// Removes this pin root's filters (see the module docs) from one direction
/// of a device, but `keep` (the filter just attached); returns how many.
pub fn remove_own(
    ifindex: u32,
    ingress: bool,
    own_maps: &BTreeSet<u32>,
    keep: Option<(u16, u32)>,
) -> io::Result<usize> {
    let found: Vec<Filter> = filters(ifindex, ingress)?
        .into_iter()
        .filter(|f| keep != Some((f.priority, f.handle)))
        .collect();
    if found.is_empty() || own_maps.is_empty() {
        return Ok(0);
    }
    let ids = found.iter().map(|f| f.prog_id).collect();
    let ours = programs_using(&ids, own_maps);
    let mut removed = 0;
    for f in found.iter().filter(|f| ours.contains(&f.prog_id)) {
        delete(ifindex, ingress, f)?;
        removed += 1;
    }
    Ok(removed)
}

/// Removes this pin root's filters from every device of the calling
/// thread's network namespace; returns how many.
pub fn remove_all_own(own_maps: &BTreeSet<u32>) -> io::Result<usize> {
    if own_maps.is_empty() {
        return Ok(0);
    }
    let mut removed = 0;
    for link in crate::interfaces::list()? {
        for ingress in [true, false] {
            // One device that cannot be read or changed does not keep the
            // others' filters: it is named, and the rest goes on.
            match remove_own(link.ifindex, ingress, own_maps, None) {
                Ok(n) => removed += n,
                Err(e) => log::warn!(
                    "{}: cannot remove envguard's cls_bpf filters ({e}); `tc filter del dev {} {}` does",
                    link.name,
                    link.name,
                    if ingress { "ingress" } else { "egress" }
                ),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(handle: u32, info: u32, kind: &[u8], prog: Option<u32>) -> Vec<u8> {
        let mut p = tcmsg(7, handle, PARENT_INGRESS, info);
        push_attr(&mut p, TCA_KIND, kind);
        let mut opts = Vec::new();
        push_attr(&mut opts, 7, b"tc_ingress\0");
        if let Some(id) = prog {
            push_attr(&mut opts, TCA_BPF_ID, &id.to_ne_bytes());
        }
        push_attr(&mut p, TCA_OPTIONS | 0x8000, &opts);
        p
    }

    #[test]
    fn a_bpf_filter_is_read_and_a_chain_header_or_another_kind_is_not() {
        let info = (49151 << 16) | u32::from(0x0003u16.to_be());
        assert_eq!(
            parse_filter(&message(1, info, b"bpf\0", Some(42))),
            Some(Filter {
                priority: 49151,
                protocol: 0x0003u16.to_be(),
                handle: 1,
                prog_id: 42,
            })
        );
        assert_eq!(parse_filter(&message(0, info, b"bpf\0", None)), None);
        assert_eq!(parse_filter(&message(1, info, b"u32\0", Some(42))), None);
        assert_eq!(parse_filter(&message(1, info, b"bpf\0", None)), None);
    }
}
