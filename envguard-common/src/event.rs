//! The violation record the kernel sends through the `EVENTS` ring buffer.

/// Which program saw the flow.
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_SKB_INGRESS: u8 = 5;
pub const HOOK_SKB_EGRESS: u8 = 6;
/// tc/tcx on a listed interface: forwarded and bridged packets.
pub const HOOK_TC_INGRESS: u8 = 7;
pub const HOOK_TC_EGRESS: u8 = 8;

pub const DIRECTION_EGRESS: u8 = 1;
pub const DIRECTION_INGRESS: u8 = 2;

pub const VERDICT_DENIED: u8 = 1;
pub const VERDICT_AUDITED: u8 = 2;

/// Key of the per-CPU `DECISIONS` counters: one per (pair, verdict, direction,
/// protocol). Counted once per decision (a connection or datagram flow judged,
/// a call refused), whatever happens to events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub src_env: u32,
    pub dst_env: u32,
    /// `VERDICT_*`, or `VERDICT_ALLOWED`.
    pub verdict: u8,
    pub direction: u8,
    pub proto: u8,
    /// `config::MODE_*` the decision was taken in (the pair's, or the global).
    pub mode: u8,
}
const _: () = assert!(core::mem::size_of::<DecisionKey>() == 12);

impl DecisionKey {
    pub const fn new(
        src_env: u32,
        dst_env: u32,
        verdict: u8,
        direction: u8,
        proto: u8,
        mode: u8,
    ) -> Self {
        Self {
            src_env,
            dst_env,
            verdict,
            direction,
            proto,
            mode,
        }
    }
}

/// A decision that allowed the flow (only in counters, never in events).
pub const VERDICT_ALLOWED: u8 = 3;

/// How a side's env was found.
pub const ENV_FROM_DEFAULT: u8 = 0;
pub const ENV_FROM_CGROUP: u8 = 1;
pub const ENV_FROM_CIDR: u8 = 2;
pub const ENV_FROM_SOCKET: u8 = 3;
/// A container's address: the agent found it in a network namespace whose
/// processes are all of one env (`ENDPOINTS_V4/V6`).
pub const ENV_FROM_ENDPOINT: u8 = 4;
/// The interface the packet entered (source) or leaves (destination) the
/// host through is listed in the env's `interfaces`.
pub const ENV_FROM_INTERFACE: u8 = 5;

/// Address families, as in `<sys/socket.h>`.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// One violation. Addresses are IPv4-mapped IPv6 when `family` is `AF_INET`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationEvent {
    /// `bpf_ktime_get_boot_ns`: CLOCK_BOOTTIME, which keeps counting in suspend.
    pub boot_ns: u64,
    /// The local socket's cgroup.
    pub cgroup_id: u64,
    /// The peer socket's cgroup for a same-host peer (`ENV_FROM_SOCKET`), else 0.
    pub peer_cgroup_id: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// The calling task's name; zeros when not known (skb hooks).
    pub comm: [u8; 16],
    /// Thread group id; 0 when not known (skb hooks).
    pub pid: u32,
    /// `u32::MAX` when not known.
    pub uid: u32,
    pub src_env: u32,
    pub dst_env: u32,
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u8,
    pub proto: u8,
    pub hook: u8,
    pub verdict: u8,
    pub direction: u8,
    pub src_env_from: u8,
    pub dst_env_from: u8,
    /// `config::MODE_*` in force when the decision was taken.
    pub mode: u8,
    /// The deciding rule (`policy::RULE_NONE` when no rule decided).
    pub rule: u32,
    /// The listed interface a tc hook saw the packet on; 0 for other hooks.
    pub ifindex: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ViolationEvent>() == 112);

/// `DEDUP` key: a violating flow's identity. Repeats of one key within the
/// dedup interval are counted instead of sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub cgroup_id: u64,
    pub remote_addr: [u8; 16],
    pub src_env: u32,
    pub dst_env: u32,
    /// The destination port (the remote one for egress, the local one for ingress).
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    /// `VERDICT_DENIED` or `VERDICT_AUDITED`: a mode switch starts a new key.
    pub verdict: u8,
    pub hook: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DedupKey>() == 40);

/// `DEDUP` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupValue {
    /// When the key's last record was sent: the window opens there.
    pub window_start_ns: u64,
    /// The latest repeat.
    pub last_ns: u64,
    /// Repeats counted instead of sent, ever (the agent reports differences).
    pub suppressed: u64,
}
const _: () = assert!(core::mem::size_of::<DedupValue>() == 24);
