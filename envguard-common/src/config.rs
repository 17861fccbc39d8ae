//! The global configuration, the agent's state and the kernel's counters.

/// Modes, as stored in `Config::mode` and `PAIR_MODES_A/B` values.
pub const MODE_AUDIT: u32 = 0;
pub const MODE_ENFORCE: u32 = 1;

/// What a violation gets: reported only (`audit`) or refused too (`enforce`).
/// The one place that knows its kernel encoding and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Mode {
    Audit,
    Enforce,
}

impl Mode {
    /// `MODE_AUDIT` or `MODE_ENFORCE`.
    pub const fn kernel(self) -> u32 {
        match self {
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        }
    }

    /// A kernel value: `MODE_ENFORCE` is enforce, anything else audit (as
    /// the programs read it).
    pub const fn from_kernel(v: u32) -> Mode {
        if v == MODE_ENFORCE {
            Mode::Enforce
        } else {
            Mode::Audit
        }
    }

    /// `audit` or `enforce`, as in policy files, requests and records.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        }
    }

    /// The mode named `s`, if it is one.
    pub fn from_name(s: &str) -> Option<Mode> {
        match s {
            "audit" => Some(Mode::Audit),
            "enforce" => Some(Mode::Enforce),
            _ => None,
        }
    }
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Deepest cgroup level the kernel walks when looking for a listed ancestor.
/// The verifier needs a constant bound; real hierarchies (systemd, kubelet)
/// stay well below it, and the agent refuses a policy that lists a deeper cgroup.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// The single entry of `CONFIG`. Eight bytes, so that one update is one
/// aligned 8-byte copy: a program never sees a new generation with an old mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Bumped on every policy load. Its low bit selects the active slot of the
    /// double-buffered policy maps (`*_A` for 0, `*_B` for 1); cached verdicts
    /// of another generation are stale.
    pub generation: u32,
    /// `MODE_AUDIT` or `MODE_ENFORCE`.
    pub mode: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

impl Config {
    pub const fn new(generation: u32, mode: u32) -> Self {
        Self { generation, mode }
    }

    /// 0 or 1: which set of policy maps is in force.
    pub const fn slot(&self) -> u32 {
        self.generation & 1
    }
}

/// The single entry of `POLICY_META_A/B`: facts about one policy slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyMeta {
    /// Shallowest level of a listed cgroup (the walk starts there).
    pub min_level: u32,
    /// Deepest level of a listed cgroup (the walk stops there).
    pub max_level: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyMeta>() == 8);

impl PolicyMeta {
    pub const fn new(min_level: u32, max_level: u32) -> Self {
        Self {
            min_level,
            max_level,
        }
    }
}

/// What the kernel does with new flows of an env once the agent is gone.
pub const ON_LOSS_KEEP: u32 = 0;
pub const ON_LOSS_OPEN: u32 = 1;
pub const ON_LOSS_CLOSED: u32 = 2;
/// `host` or `world` whose `[defaults]` allow flows: never triggers anything on
/// its own, but lets a peer env's `open` open the pair (see `agent_loss`).
pub const ON_LOSS_FOLLOW: u32 = 3;

/// `ENV_LOSS_A/B` entry, indexed by env id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnvLoss {
    /// Heartbeat age after which `mode` applies.
    pub timeout_ns: u64,
    /// `ON_LOSS_*`.
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EnvLoss>() == 16);

impl EnvLoss {
    pub const fn new(mode: u32, timeout_ns: u64) -> Self {
        Self {
            timeout_ns,
            mode,
            _pad: 0,
        }
    }
}

/// Pending bytes in the `EVENTS` ring buffer from which a new record wakes
/// the agent (below it, records wait for the agent's drain timer,
/// `EVENTS_DRAIN_INTERVAL_MS`): one wake-up per batch instead of per record.
/// An eighth of a smaller ring, so that it never fills unwoken.
pub const fn events_wakeup_bytes(ring_bytes: u64) -> u64 {
    let eighth = ring_bytes / 8;
    if eighth < 64 * 1024 {
        eighth
    } else {
        64 * 1024
    }
}
/// How often the agent drains the ring buffer without being woken: the
/// longest a record waits below `events_wakeup_bytes`.
pub const EVENTS_DRAIN_INTERVAL_MS: u64 = 10;

/// The single entry of `AGENT_STATE`, written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// CLOCK_BOOTTIME of the agent's last heartbeat; 0 before the first.
    pub heartbeat_ns: u64,
    /// Identifies the build whose programs the pinned links run, so a restart
    /// of the same build keeps them and an upgrade replaces them.
    pub object_hash: u64,
    /// The cgroup the pinned links are attached to.
    pub cgroup_id: u64,
    /// How much of `Counter::EventsLost` agents have reported so far, so a
    /// restarted agent reports exactly the losses nobody reported.
    pub lost_reported: u64,
    /// Repeats of a violation within this long of its last record are only
    /// counted (in `DEDUP`), not sent; 0 sends every one.
    pub dedup_interval_ns: u64,
    /// `events_wakeup_bytes` of the ring buffer's size; 0 (no agent has said
    /// yet): every record may wake the agent, as the kernel decides.
    pub events_wakeup_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<AgentState>() == 48);

/// The single entry of `MKDIR_OFFSETS`: where the `cgroup_mkdir` watch finds
/// what it reads in the kernel's structures, from the running kernel's BTF
/// (`struct cgroup`'s `kn` and `root`, `struct kernfs_node`'s `id`, `struct
/// cgroup_root`'s `hierarchy_id`). `enabled == 0`: the watch does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub enabled: u32,
    pub cgroup_kn: u32,
    pub cgroup_root: u32,
    pub kn_id: u32,
    pub root_hierarchy_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CgroupOffsets>() == 24);

/// Indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Violation events the ring buffer had no room for.
    EventsLost = 0,
    /// Verdict-cache insertions that failed (the flow is classified again next time).
    FlowCacheFull = 1,
    /// Socket envs the kernel could not store (out of memory: that socket is
    /// `host` to its same-host peers).
    SockStorageFull = 2,
    /// Packets whose headers could not be read (passed or dropped by the fallback verdict).
    Unparsable = 3,
}
pub const NUM_COUNTERS: u32 = 4;
