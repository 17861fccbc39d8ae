//! The single-entry configuration map and the kernel's counters.

/// Modes, as stored in `Config::mode`.
pub const MODE_AUDIT: u32 = 0;
pub const MODE_ENFORCE: u32 = 1;

/// Deepest cgroup level the kernel walks when looking for a listed ancestor.
/// The verifier needs a constant bound; real hierarchies (systemd, kubelet)
/// stay well below it, and the agent refuses a policy that lists a deeper cgroup.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// Global settings, read by every program run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `MODE_AUDIT` or `MODE_ENFORCE`.
    pub mode: u32,
    /// Bumped on every policy load; cached verdicts from another generation are stale.
    pub generation: u32,
    /// Shallowest level of a listed cgroup (the walk starts there).
    pub min_level: u32,
    /// Deepest level of a listed cgroup (the walk stops there).
    pub max_level: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

impl Config {
    pub const fn new(mode: u32, generation: u32, min_level: u32, max_level: u32) -> Self {
        Self {
            mode,
            generation,
            min_level,
            max_level,
        }
    }
}

/// Indexes into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Violation events the ring buffer had no room for.
    EventsLost = 0,
    /// Verdict-cache insertions that failed (the flow is classified again next time).
    FlowCacheFull = 1,
    /// Bound-socket insertions that failed (that socket's env is unknown to peers).
    BoundTableFull = 2,
    /// Packets whose headers could not be read (passed or dropped by the fallback verdict).
    Unparsable = 3,
}
pub const NUM_COUNTERS: u32 = 4;
