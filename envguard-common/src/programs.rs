//! The hook table: every kernel program, once — its name (the kernel
//! function's, and its link pin's), program type, how it attaches, the id its
//! events carry and its label. The loader, the event decoder, `policy_loaded`'s
//! `hooks`, the schema test and the README test all read it, so a new hook is
//! its program plus one entry here.
use crate::event::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SKB_EGRESS, HOOK_SKB_INGRESS,
    HOOK_TC_EGRESS, HOOK_TC_INGRESS,
};

/// The kernel's program type (`enum bpf_prog_type`, as aya names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgType {
    CgroupSockAddr,
    CgroupSock,
    CgroupSkb,
    RawTracepoint,
    SchedClassifier,
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// To the agent's cgroup, with this `enum bpf_attach_type`; reported in
    /// `policy_loaded`'s `hooks`.
    Cgroup(u32),
    /// To a raw tracepoint, not to any cgroup (a watch, not a hook of flows).
    RawTracepoint(&'static str),
    /// To the listed interfaces (tcx, else clsact): `true` for ingress.
    Tc(bool),
}

/// `enum bpf_attach_type` values of the cgroup hooks.
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_INET4_POST_BIND: u32 = 12;
pub const BPF_CGROUP_INET6_POST_BIND: u32 = 13;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

/// One kernel program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The kernel function's name: the program in the object, its link pin,
    /// and the `hook` of its records.
    pub name: &'static str,
    pub prog_type: ProgType,
    pub attach: Attach,
    /// `HOOK_*` in `ViolationEvent::hook`; 0 for a program that never reports.
    pub event_id: u8,
    /// Where it sits, for people (the README's "hook" column).
    pub label: &'static str,
}

impl Hook {
    pub const fn is_cgroup(&self) -> bool {
        matches!(self.attach, Attach::Cgroup(_))
    }

    pub const fn is_tc(&self) -> bool {
        matches!(self.attach, Attach::Tc(_))
    }
}

pub const CONNECT4: &str = "connect4";
pub const CONNECT6: &str = "connect6";
pub const SENDMSG4: &str = "sendmsg4";
pub const SENDMSG6: &str = "sendmsg6";
pub const POST_BIND4: &str = "post_bind4";
pub const POST_BIND6: &str = "post_bind6";
pub const SKB_INGRESS: &str = "skb_ingress";
pub const SKB_EGRESS: &str = "skb_egress";
pub const TC_INGRESS: &str = "tc_ingress";
pub const TC_EGRESS: &str = "tc_egress";
/// Raw tracepoint `cgroup_mkdir`: records a listed cgroup's id as it is created.
pub const CGROUP_MKDIR: &str = "cgroup_mkdir";

const fn hook(
    name: &'static str,
    prog_type: ProgType,
    attach: Attach,
    event_id: u8,
    label: &'static str,
) -> Hook {
    Hook {
        name,
        prog_type,
        attach,
        event_id,
        label,
    }
}

/// Every program, in attach order: socket bookkeeping and packet hooks first,
/// the hooks that refuse calls last, so that by the time a connect() is
/// judged, every later packet of it will be too; the watch after them.
pub const HOOKS: [Hook; 11] = [
    hook(
        POST_BIND4,
        ProgType::CgroupSock,
        Attach::Cgroup(BPF_CGROUP_INET4_POST_BIND),
        0,
        "cgroup/post_bind",
    ),
    hook(
        POST_BIND6,
        ProgType::CgroupSock,
        Attach::Cgroup(BPF_CGROUP_INET6_POST_BIND),
        0,
        "cgroup/post_bind",
    ),
    hook(
        SKB_INGRESS,
        ProgType::CgroupSkb,
        Attach::Cgroup(BPF_CGROUP_INET_INGRESS),
        HOOK_SKB_INGRESS,
        "cgroup_skb ingress",
    ),
    hook(
        SKB_EGRESS,
        ProgType::CgroupSkb,
        Attach::Cgroup(BPF_CGROUP_INET_EGRESS),
        HOOK_SKB_EGRESS,
        "cgroup_skb egress",
    ),
    hook(
        CONNECT4,
        ProgType::CgroupSockAddr,
        Attach::Cgroup(BPF_CGROUP_INET4_CONNECT),
        HOOK_CONNECT4,
        "cgroup/connect",
    ),
    hook(
        CONNECT6,
        ProgType::CgroupSockAddr,
        Attach::Cgroup(BPF_CGROUP_INET6_CONNECT),
        HOOK_CONNECT6,
        "cgroup/connect",
    ),
    hook(
        SENDMSG4,
        ProgType::CgroupSockAddr,
        Attach::Cgroup(BPF_CGROUP_UDP4_SENDMSG),
        HOOK_SENDMSG4,
        "cgroup/sendmsg",
    ),
    hook(
        SENDMSG6,
        ProgType::CgroupSockAddr,
        Attach::Cgroup(BPF_CGROUP_UDP6_SENDMSG),
        HOOK_SENDMSG6,
        "cgroup/sendmsg",
    ),
    hook(
        CGROUP_MKDIR,
        ProgType::RawTracepoint,
        Attach::RawTracepoint("cgroup_mkdir"),
        0,
        "raw_tracepoint cgroup_mkdir",
    ),
    hook(
        TC_INGRESS,
        ProgType::SchedClassifier,
        Attach::Tc(true),
        HOOK_TC_INGRESS,
        "tcx ingress (listed interfaces)",
    ),
    hook(
        TC_EGRESS,
        ProgType::SchedClassifier,
        Attach::Tc(false),
        HOOK_TC_EGRESS,
        "tcx egress (listed interfaces)",
    ),
];

const fn count_cgroup() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < HOOKS.len() {
        if HOOKS[i].is_cgroup() {
            n += 1;
        }
        i += 1;
    }
    n
}

/// How many programs attach to the cgroup.
pub const NUM_CGROUP_HOOKS: usize = count_cgroup();

const fn cgroup_names() -> [&'static str; NUM_CGROUP_HOOKS] {
    let mut names = [""; NUM_CGROUP_HOOKS];
    let (mut i, mut n) = (0, 0);
    while i < HOOKS.len() {
        if HOOKS[i].is_cgroup() {
            names[n] = HOOKS[i].name;
            n += 1;
        }
        i += 1;
    }
    names
}

/// The cgroup hooks' names in attach order (`policy_loaded`'s `hooks`).
pub const CGROUP_PROGRAMS: [&str; NUM_CGROUP_HOOKS] = cgroup_names();

/// The program whose events carry `id`.
pub fn by_event_id(id: u8) -> Option<&'static Hook> {
    if id == 0 {
        return None;
    }
    HOOKS.iter().find(|h| h.event_id == id)
}

/// The program named `name`.
pub fn by_name(name: &str) -> Option<&'static Hook> {
    HOOKS.iter().find(|h| h.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_event_ids_are_unique() {
        for (i, a) in HOOKS.iter().enumerate() {
            for b in &HOOKS[i + 1..] {
                assert_ne!(a.name, b.name);
                assert!(a.event_id == 0 || a.event_id != b.event_id, "{}", a.name);
            }
            // Only programs that judge flows report them.
            assert_eq!(
                a.event_id != 0,
                a.prog_type != ProgType::CgroupSock && (a.is_cgroup() || a.is_tc())
            );
            assert_eq!(by_name(a.name), Some(a));
        }
        assert_eq!(
            by_event_id(HOOK_SKB_EGRESS).map(|h| h.name),
            Some(SKB_EGRESS)
        );
        assert_eq!(by_event_id(0), None);
        assert_eq!(CGROUP_PROGRAMS.len(), 8);
        assert!(!CGROUP_PROGRAMS.contains(&CGROUP_MKDIR));
    }
}
