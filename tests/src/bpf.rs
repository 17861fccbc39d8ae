//! Just enough of the bpf(2) syscall to see, independently of the agent,
//! what it left in the kernel: pinned objects (`BPF_OBJ_GET`), their ids and
//! the program behind a link (`BPF_OBJ_GET_INFO_BY_FD`), every program, map
//! and link that exists (`BPF_*_GET_NEXT_ID`) and the programs attached to a
//! cgroup (`BPF_PROG_QUERY`). The attribute layouts are the kernel's
//! `union bpf_attr` members, written out by hand.

use envguard_common::programs;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// enum bpf_cmd
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// Each envguard cgroup program and the `enum bpf_attach_type` it is
/// attached with, from the hook table (`envguard_common::programs::HOOKS`).
pub const HOOKS: [(&str, u32); programs::NUM_CGROUP_HOOKS] = cgroup_hooks();

const fn cgroup_hooks() -> [(&'static str, u32); programs::NUM_CGROUP_HOOKS] {
    let mut out = [("", 0); programs::NUM_CGROUP_HOOKS];
    let (mut i, mut n) = (0, 0);
    while i < programs::HOOKS.len() {
        if let programs::Attach::Cgroup(attach_type) = programs::HOOKS[i].attach {
            out[n] = (programs::HOOKS[i].name, attach_type);
            n += 1;
        }
        i += 1;
    }
    out
}

/// `BPF_OBJ_*` commands.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `BPF_*_GET_NEXT_ID` (`start_id`) and `BPF_*_GET_FD_BY_ID` (`prog_id`,
/// `map_id`, `link_id`): the id comes first either way.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
}

fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(size_of::<A>()).expect("small attr");
    // SAFETY: attr is a valid, writable bpf_attr prefix of `size` bytes; the
    // kernel reads and writes within it only.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(rc: libc::c_long) -> OwnedFd {
    let fd = libc::c_int::try_from(rc).expect("a file descriptor fits in c_int");
    // SAFETY: the kernel just returned this new descriptor to us alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in a path"))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// An info struct, zero-filled beyond what the kernel writes; `prepare` may
/// set input fields first (e.g. an output array and its length).
fn obj_info(fd: &OwnedFd, prepare: impl FnOnce(&mut [u8; 256])) -> io::Result<[u8; 256]> {
    let mut buf = [0u8; 256];
    prepare(&mut buf);
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).expect("fd is non-negative"),
        info_len: 256,
        info: buf.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(buf)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn name_at(b: &[u8], off: usize) -> String {
    let raw = &b[off..off + 16];
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// `struct bpf_link_info`, for cgroup links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// `cgroup.cgroup_id` (cgroup links only).
    pub cgroup_id: u64,
    /// `cgroup.attach_type` (cgroup links only).
    pub attach_type: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;
/// `BPF_LINK_TYPE_RAW_TRACEPOINT`.
pub const LINK_TYPE_RAW_TRACEPOINT: u32 = 1;

/// envguard's watches: programs attached neither to a cgroup nor to an
/// interface (the tc hooks' links are per interface), by the link pin's
/// name and its `enum bpf_link_type`.
pub const WATCHES: [(&str, u32); NUM_WATCHES] = watches();

const fn count_watches() -> usize {
    let (mut i, mut n) = (0, 0);
    while i < programs::HOOKS.len() {
        if let programs::Attach::RawTracepoint(_) = programs::HOOKS[i].attach {
            n += 1;
        }
        i += 1;
    }
    n
}

const NUM_WATCHES: usize = count_watches();

const fn watches() -> [(&'static str, u32); NUM_WATCHES] {
    let mut out = [("", 0); NUM_WATCHES];
    let (mut i, mut n) = (0, 0);
    while i < programs::HOOKS.len() {
        if let programs::Attach::RawTracepoint(_) = programs::HOOKS[i].attach {
            out[n] = (programs::HOOKS[i].name, LINK_TYPE_RAW_TRACEPOINT);
            n += 1;
        }
        i += 1;
    }
    out
}

pub fn link_info(fd: &OwnedFd) -> io::Result<LinkInfo> {
    let b = obj_info(fd, |_| {})?;
    Ok(LinkInfo {
        link_type: u32_at(&b, 0),
        id: u32_at(&b, 4),
        prog_id: u32_at(&b, 8),
        cgroup_id: u64_at(&b, 16),
        attach_type: u32_at(&b, 24),
    })
}

/// The fields of `struct bpf_prog_info` the tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    /// Every map the program uses.
    pub map_ids: Vec<u32>,
}

pub fn prog_info(fd: &OwnedFd) -> io::Result<ProgInfo> {
    // First learn how many maps it uses (nr_map_ids at offset 52), then
    // fetch their ids into an array (map_ids pointer at 56).
    let b = obj_info(fd, |_| {})?;
    let n = u32_at(&b, 52);
    let mut ids = vec![0u32; n as usize];
    let ptr = ids.as_mut_ptr() as u64;
    let b = obj_info(fd, |b| {
        b[52..56].copy_from_slice(&n.to_ne_bytes());
        b[56..64].copy_from_slice(&ptr.to_ne_bytes());
    })?;
    ids.truncate(u32_at(&b, 52).min(n) as usize);
    Ok(ProgInfo {
        id: u32_at(&b, 4),
        name: name_at(&b, 64),
        map_ids: ids,
    })
}

/// The fields of `struct bpf_map_info` the tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub name: String,
}

pub fn map_info(fd: &OwnedFd) -> io::Result<MapInfo> {
    let b = obj_info(fd, |_| {})?;
    Ok(MapInfo {
        id: u32_at(&b, 4),
        name: name_at(&b, 24),
    })
}

/// A kind of bpf object with kernel-wide ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Prog,
    Map,
    Link,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prog => "program",
            Kind::Map => "map",
            Kind::Link => "link",
        }
    }
}

/// Every id of this kind that exists right now.
pub fn all_ids(kind: Kind) -> io::Result<BTreeSet<u32>> {
    let cmd = match kind {
        Kind::Prog => BPF_PROG_GET_NEXT_ID,
        Kind::Map => BPF_MAP_GET_NEXT_ID,
        Kind::Link => BPF_LINK_GET_NEXT_ID,
    };
    let mut ids = BTreeSet::new();
    let mut start = 0;
    loop {
        let mut attr = IdAttr {
            id: start,
            ..Default::default()
        };
        match sys_bpf(cmd, &mut attr) {
            Ok(_) => {
                ids.insert(attr.next_id);
                start = attr.next_id;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(ids),
            Err(e) => return Err(e),
        }
    }
}

/// Opens an object by id.
pub fn fd_by_id(kind: Kind, id: u32) -> io::Result<OwnedFd> {
    let cmd = match kind {
        Kind::Prog => BPF_PROG_GET_FD_BY_ID,
        Kind::Map => BPF_MAP_GET_FD_BY_ID,
        Kind::Link => BPF_LINK_GET_FD_BY_ID,
    };
    let mut attr = IdAttr {
        id,
        ..Default::default()
    };
    sys_bpf(cmd, &mut attr).map(owned_fd)
}

/// Ids of the programs attached directly to the cgroup `dir` for
/// `attach_type` (not inherited from ancestors).
/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS`.
pub const TCX_INGRESS: u32 = 46;
pub const TCX_EGRESS: u32 = 47;

/// The programs attached to a device of the caller's network namespace
/// (tcx: `attach_type` [`TCX_INGRESS`] or [`TCX_EGRESS`]).
pub fn query_ifindex(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: ifindex,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: 64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(ids[..(attr.prog_cnt as usize).min(64)].to_vec())
}

pub fn query_cgroup(dir: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    let f = std::fs::File::open(dir)?;
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_fd: u32::try_from(f.as_raw_fd()).expect("fd is non-negative"),
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: 64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(ids[..(attr.prog_cnt as usize).min(64)].to_vec())
}
