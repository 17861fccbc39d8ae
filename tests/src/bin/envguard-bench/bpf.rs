//! The few bpf(2) commands the benchmark needs, as raw syscalls: finding the
//! agent's programs, reading their info (name, run-time statistics, size),
//! BPF_PROG_TEST_RUN, loading an empty program (the floor), attaching it with
//! a link, and a bare LPM trie to time map filling; plus the
//! `kernel.bpf_stats_enabled` switch, restored by a guard.
//!
//! Attribute layouts follow `include/uapi/linux/bpf.h` (checked against the
//! installed header: `union bpf_attr` is 144 bytes on this kernel,
//! `struct bpf_prog_info` 232, `run_time_ns` at 192, `run_cnt` at 200).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Cgroup attach types (`enum bpf_attach_type`), as the hook table has them.
pub use envguard_common::programs::{
    BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET4_POST_BIND, BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_POST_BIND,
    BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_SENDMSG,
};

/// Every cgroup attach type envguard uses, for BPF_PROG_QUERY.
pub const ENVGUARD_ATTACH_TYPES: [u32; 8] = [
    BPF_CGROUP_INET_INGRESS,
    BPF_CGROUP_INET_EGRESS,
    BPF_CGROUP_INET4_CONNECT,
    BPF_CGROUP_INET6_CONNECT,
    BPF_CGROUP_UDP4_SENDMSG,
    BPF_CGROUP_UDP6_SENDMSG,
    BPF_CGROUP_INET4_POST_BIND,
    BPF_CGROUP_INET6_POST_BIND,
];

/// `union bpf_attr` as a zeroed, 8-byte aligned block the commands fill by offset.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Self {
        Attr([0; 144])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn ptr<T>(p: *const T) -> u64 {
    p as usize as u64
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable bpf_attr of the size we pass; every
    // pointer inside it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_result(r: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

/// `struct bpf_prog_info`, up to the fields the benchmark reads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProgInfo {
    pub prog_type: u32,
    pub id: u32,
    pub tag: [u8; 8],
    pub jited_prog_len: u32,
    pub xlated_prog_len: u32,
    pub jited_prog_insns: u64,
    pub xlated_prog_insns: u64,
    pub load_time: u64,
    pub created_by_uid: u32,
    pub nr_map_ids: u32,
    pub map_ids: u64,
    pub name: [u8; 16],
    pub ifindex: u32,
    pub gpl_compatible: u32,
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub nr_jited_ksyms: u32,
    pub nr_jited_func_lens: u32,
    pub jited_ksyms: u64,
    pub jited_func_lens: u64,
    pub btf_id: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub nr_func_info: u32,
    pub nr_line_info: u32,
    pub line_info: u64,
    pub jited_line_info: u64,
    pub nr_jited_line_info: u32,
    pub line_info_rec_size: u32,
    pub jited_line_info_rec_size: u32,
    pub nr_prog_tags: u32,
    pub prog_tags: u64,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
    pub verified_insns: u32,
    pub attach_btf_obj_id: u32,
    pub attach_btf_id: u32,
    pub _pad: u32,
}
const _: () = assert!(std::mem::size_of::<ProgInfo>() == 232);
const _: () = assert!(std::mem::offset_of!(ProgInfo, name) == 64);
const _: () = assert!(std::mem::offset_of!(ProgInfo, run_time_ns) == 192);
const _: () = assert!(std::mem::offset_of!(ProgInfo, run_cnt) == 200);

impl ProgInfo {
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

pub fn prog_info(fd: &OwnedFd) -> io::Result<ProgInfo> {
    // SAFETY: ProgInfo is plain integers; all zeros is a valid value and asks
    // the kernel for no arrays.
    let mut info: ProgInfo = unsafe { std::mem::zeroed() };
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32)
        .u32(4, std::mem::size_of::<ProgInfo>() as u32)
        .u64(8, ptr(&raw mut info));
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    Ok(info)
}

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, id);
    sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(fd_result)
}

/// Every loaded program's id (BPF_PROG_GET_NEXT_ID).
pub fn all_prog_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    let mut start = 0u32;
    loop {
        let mut a = Attr::new();
        a.u32(0, start);
        match sys_bpf(BPF_PROG_GET_NEXT_ID, &mut a) {
            Ok(_) => {
                start = a.get_u32(4);
                ids.push(start);
            }
            Err(_) => return ids,
        }
    }
}

/// Ids of the programs attached directly to `cgroup` for `attach_type`.
pub fn query_cgroup(cgroup: &std::fs::File, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = Attr::new();
    a.u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, attach_type)
        .u64(16, ptr(ids.as_mut_ptr()))
        .u32(24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut a)?;
    ids.truncate(a.get_u32(24) as usize);
    Ok(ids)
}

/// A program found by name among those attached to a cgroup.
pub struct Prog {
    pub name: String,
    pub id: u32,
    pub fd: OwnedFd,
}

/// The programs attached directly to `cgroup_dir`, found the way the brief
/// asks (walking every loaded program's id and reading its name) and kept
/// only if BPF_PROG_QUERY says they are attached there: other agents (tests
/// running concurrently) load programs of the same names.
pub fn programs_at(cgroup_dir: &std::path::Path) -> io::Result<Vec<Prog>> {
    let dir = std::fs::File::open(cgroup_dir)?;
    let mut attached = std::collections::BTreeSet::new();
    for t in ENVGUARD_ATTACH_TYPES {
        attached.extend(query_cgroup(&dir, t)?);
    }
    let mut out = Vec::new();
    for id in all_prog_ids() {
        if !attached.contains(&id) {
            continue;
        }
        let Ok(fd) = prog_fd_by_id(id) else { continue };
        let info = prog_info(&fd)?;
        out.push(Prog {
            name: info.name(),
            id,
            fd,
        });
    }
    Ok(out)
}

/// The programs behind an agent's pinned links
/// (`<pin root>/layout-*/links/<program>`), every hook it attached, the
/// ones outside any cgroup included; sorted by name.
pub fn pinned_programs(pin_root: &std::path::Path) -> io::Result<Vec<Prog>> {
    let mut out = Vec::new();
    for layout in std::fs::read_dir(pin_root)? {
        let links = layout?.path().join("links");
        let Ok(entries) = std::fs::read_dir(&links) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(io::Error::other)?;
            let mut a = Attr::new();
            a.u64(0, ptr(c.as_ptr()));
            let link = sys_bpf(BPF_OBJ_GET, &mut a).map(fd_result)?;
            // struct bpf_link_info: type, id, prog_id, then per-type data.
            let mut info = [0u32; 16];
            let mut a = Attr::new();
            a.u32(0, link.as_raw_fd() as u32)
                .u32(4, std::mem::size_of_val(&info) as u32)
                .u64(8, ptr(info.as_mut_ptr()));
            sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
            let id = info[2];
            let fd = prog_fd_by_id(id)?;
            let name = prog_info(&fd)?.name();
            out.push(Prog { name, id, fd });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `r0 = 1; exit`: a cgroup_skb program that passes every packet.
pub fn load_empty_skb(expected_attach_type: u32) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1; BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [u64::from(0xb7u8) | (1u64 << 32), u64::from(0x95u8)];
    let license = c"GPL";
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_CGROUP_SKB)
        .u32(4, insns.len() as u32)
        .u64(8, ptr(insns.as_ptr()))
        .u64(16, ptr(license.as_ptr()))
        .u32(68, expected_attach_type);
    a.0[48..48 + 9].copy_from_slice(b"eg_empty\0");
    sys_bpf(BPF_PROG_LOAD, &mut a).map(fd_result)
}

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `r0 = -1 (TC_ACT_UNSPEC: "next"); exit`: a tc program that passes
/// every packet on, as envguard's tc programs do for what they let through.
pub fn load_empty_tc() -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1; BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [
        u64::from(0xb7u8) | (0xffff_ffffu64 << 32),
        u64::from(0x95u8),
    ];
    let license = c"GPL";
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, insns.len() as u32)
        .u64(8, ptr(insns.as_ptr()))
        .u64(16, ptr(license.as_ptr()));
    a.0[48..48 + 9].copy_from_slice(b"eg_empty\0");
    sys_bpf(BPF_PROG_LOAD, &mut a).map(fd_result)
}

/// The programs on a device's tcx hook (`BPF_TCX_INGRESS` 46, `BPF_TCX_EGRESS`
/// 47), in the caller's network namespace.
pub fn query_tcx(ifindex: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut a = Attr::new();
    a.u32(0, ifindex)
        .u32(4, attach_type)
        .u64(16, ptr(ids.as_mut_ptr()))
        .u32(24, 64);
    sys_bpf(BPF_PROG_QUERY, &mut a)?;
    let n = (a.get_u32(24) as usize).min(64);
    Ok(ids[..n].to_vec())
}

/// Attaches `prog` to `cgroup` with a BPF link (multi-attach, like the
/// agent's); detached when the returned fd is closed.
pub fn link_cgroup(
    prog: &OwnedFd,
    cgroup: &std::fs::File,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, cgroup.as_raw_fd() as u32)
        .u32(8, attach_type);
    sys_bpf(BPF_LINK_CREATE, &mut a).map(fd_result)
}

/// What one BPF_PROG_TEST_RUN call reported.
pub struct TestRun {
    pub retval: u32,
    /// Mean ns per run over `repeat` runs, as the kernel measured it.
    pub duration_ns: u32,
}

/// BPF_PROG_TEST_RUN of a cgroup_skb program on `data` (starting with an
/// Ethernet header, which the kernel strips) with an `__sk_buff` context
/// whose only non-zero field is `ifindex` (the device the packet seems to
/// cross; 0 or 1 means loopback).
pub fn test_run_skb(prog: &OwnedFd, data: &[u8], ifindex: u32, repeat: u32) -> io::Result<TestRun> {
    // struct __sk_buff is 192 bytes; ifindex is at offset 40.
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u64(16, ptr(data.as_ptr()))
        .u32(32, repeat)
        .u32(40, ctx.len() as u32)
        .u64(48, ptr(ctx.as_ptr()));
    sys_bpf(BPF_PROG_TEST_RUN, &mut a)?;
    Ok(TestRun {
        retval: a.get_u32(4),
        duration_ns: a.get_u32(36),
    })
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled`.
pub fn stats_sysctl() -> String {
    std::fs::read_to_string(STATS_SYSCTL)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// `kernel.bpf_stats_enabled = 1` while this lives; the previous value is
/// written back on drop (also when a panic or SIGINT/SIGTERM unwinds).
pub struct StatsGuard {
    previous: String,
}

pub fn enable_stats() -> io::Result<StatsGuard> {
    let previous = std::fs::read_to_string(STATS_SYSCTL)?.trim().to_owned();
    std::fs::write(STATS_SYSCTL, "1")?;
    Ok(StatsGuard { previous })
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "envguard-bench: cleanup: cannot restore kernel.bpf_stats_enabled = {}: {e}",
                self.previous
            );
        }
    }
}

/// A bare IPv4 LPM trie with the agent's key and value sizes and capacity.
pub fn create_lpm_v4(max_entries: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_LPM_TRIE)
        .u32(4, 8)
        .u32(8, 4)
        .u32(12, max_entries)
        .u32(16, BPF_F_NO_PREALLOC);
    a.0[28..28 + 9].copy_from_slice(b"eg_bench\0");
    sys_bpf(BPF_MAP_CREATE, &mut a).map(fd_result)
}

/// One BPF_MAP_UPDATE_ELEM of an LPM key (`prefixlen`, address) → `value`.
pub fn lpm_v4_update(map: &OwnedFd, prefixlen: u32, addr: [u8; 4], value: u32) -> io::Result<()> {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&prefixlen.to_ne_bytes());
    key[4..].copy_from_slice(&addr);
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr(key.as_ptr()))
        .u64(16, ptr(&raw const value));
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// One BPF_MAP_UPDATE_BATCH of LPM keys: what the kernel says about it.
pub fn lpm_v4_update_batch(map: &OwnedFd, entries: &[(u32, [u8; 4], u32)]) -> io::Result<()> {
    let keys: Vec<[u8; 8]> = entries
        .iter()
        .map(|&(p, a, _)| {
            let mut k = [0u8; 8];
            k[..4].copy_from_slice(&p.to_ne_bytes());
            k[4..].copy_from_slice(&a);
            k
        })
        .collect();
    let values: Vec<u32> = entries.iter().map(|e| e.2).collect();
    let mut a = Attr::new();
    a.u64(16, ptr(keys.as_ptr()))
        .u64(24, ptr(values.as_ptr()))
        .u32(32, entries.len() as u32)
        .u32(36, map.as_raw_fd() as u32);
    sys_bpf(BPF_MAP_UPDATE_BATCH, &mut a).map(drop)
}
