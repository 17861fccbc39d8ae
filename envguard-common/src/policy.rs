//! Keys and values of the policy maps.

/// Env ids 0 and 1 are reserved; declared envs start at `FIRST_DECLARED_ENV`.
pub const ENV_HOST: u32 = 0;
pub const ENV_WORLD: u32 = 1;
pub const FIRST_DECLARED_ENV: u32 = 2;
/// The env of an address that more than one env claims (two network
/// namespaces of different envs with the same address, or a namespace holding
/// processes of two envs). Never given to a declared env and never in a rule:
/// every flow to or from such an address is a violation, whatever the
/// claimants' rules allow (see the README, "Container endpoints").
pub const ENV_CONFLICT: u32 = crate::maps::MAX_ENVS - 1;
/// Its name in records and `status`.
pub const ENV_CONFLICT_NAME: &str = "endpoint-conflict";

/// Value of `CGROUP_ENVS`, `CIDR_ENVS_V4` and `CIDR_ENVS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvValue {
    pub env: u32,
}
const _: () = assert!(core::mem::size_of::<EnvValue>() == 4);

/// Value of `IFACE_ENVS`: a listed interface's env, and the bridge it is a
/// port of (0 if none): a packet entering a bridge port routes back through
/// the bridge, which the source-address check accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceEnv {
    pub env: u32,
    pub master: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceEnv>() == 8);

/// Data part of a `RULES` key. The trie matches its bytes most significant first,
/// so a rule for "any port" is a prefix of 64 bits (both envs), a rule for any port
/// of one protocol is 72 bits, and a port range is split into prefixes of the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKey {
    /// Big-endian env ids, so that prefix bits follow the byte order.
    pub src_env: [u8; 4],
    pub dst_env: [u8; 4],
    /// IP protocol number.
    pub proto: u8,
    /// Big-endian port: the port's high bits come first in the prefix.
    pub port: [u8; 2],
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<RuleKey>() == 12);

/// Bits of `RuleKey` that a rule for any port and protocol matches on.
pub const RULE_PREFIX_PAIR: u32 = 64;
/// Bits up to and including the protocol.
pub const RULE_PREFIX_PROTO: u32 = 72;
/// Bits up to and including the whole port.
pub const RULE_PREFIX_PORT: u32 = 88;

impl RuleKey {
    pub const fn new(src_env: u32, dst_env: u32, proto: u8, port: u16) -> Self {
        Self {
            src_env: src_env.to_be_bytes(),
            dst_env: dst_env.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
            _pad: 0,
        }
    }
}

/// Rule id for a decision no rule took (same env, or no rule matched).
pub const RULE_NONE: u32 = u32::MAX;
/// Rule ids of the agent-loss fail modes.
pub const RULE_AGENT_LOSS_OPEN: u32 = u32::MAX - 3;
pub const RULE_AGENT_LOSS_CLOSED: u32 = u32::MAX - 4;

/// Value of `RULES`: the rule that allowed the flow, for attribution.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub rule: u32,
}
const _: () = assert!(core::mem::size_of::<RuleValue>() == 4);

/// Key of `PAIR_MODES_A/B`: an ordered env pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub src_env: u32,
    pub dst_env: u32,
}
const _: () = assert!(core::mem::size_of::<PairKey>() == 8);

impl PairKey {
    pub const fn new(src_env: u32, dst_env: u32) -> Self {
        Self { src_env, dst_env }
    }
}

/// Longest env name, so a name fits one `EnvName`.
pub const MAX_ENV_NAME: usize = 63;

/// `ENV_NAMES` entry, indexed by env id: the name an id stands for, so ids stay
/// stable across reloads and restarts (counters and bound sockets keep them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvName {
    /// NUL-padded UTF-8; all zeros for an unused id.
    pub name: [u8; MAX_ENV_NAME + 1],
}
const _: () = assert!(core::mem::size_of::<EnvName>() == 64);

/// Size of a `LISTED_CGROUPS` key: a cgroup's path from the v2 hierarchy's
/// root, NUL-padded. Longer paths (at most `MAX_CGROUP_PATH - 2` bytes fit,
/// so that a path the kernel cut short never matches) are left to the
/// agent's poll.
pub const MAX_CGROUP_PATH: usize = 256;

/// Key of `LISTED_CGROUPS_A/B`: a listed cgroup's path as the kernel's
/// `cgroup_mkdir` tracepoint spells it (`/a/b`, from the hierarchy's root).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupPath {
    /// The path's bytes, then zeros.
    pub bytes: [u8; MAX_CGROUP_PATH],
}
const _: () = assert!(core::mem::size_of::<CgroupPath>() == MAX_CGROUP_PATH);

impl CgroupPath {
    /// The key of `path`, or `None` when it does not fit.
    pub fn new(path: &str) -> Option<Self> {
        let b = path.as_bytes();
        if b.len() > MAX_CGROUP_PATH - 2 || b.contains(&0) {
            return None;
        }
        let mut bytes = [0; MAX_CGROUP_PATH];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self { bytes })
    }
}
