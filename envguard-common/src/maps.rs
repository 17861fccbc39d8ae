//! Map names, shared so that userspace never repeats a literal.

//! The policy is double-buffered: each policy map exists twice, `_A` and `_B`;
//! `Config::generation`'s low bit says which set is in force. A new policy is
//! written into the other set and made active with one update of `CONFIG`, so
//! no packet is ever judged by a half-written policy.

/// `HashMap<u64 cgroup id, EnvValue>`: cgroups listed in the policy.
pub const CGROUP_ENVS: [&str; 2] = ["CGROUP_ENVS_A", "CGROUP_ENVS_B"];
/// `HashMap<CgroupPath, EnvValue>`: the listed cgroups by path, so the
/// `cgroup_mkdir` watch records a listed cgroup's id in `CGROUP_ENVS` (of the
/// slots whose policy lists it) as the cgroup is created.
pub const LISTED_CGROUPS: [&str; 2] = ["LISTED_CGROUPS_A", "LISTED_CGROUPS_B"];
/// `LpmTrie<[u8; 4], EnvValue>`: IPv4 CIDRs of the envs.
pub const CIDR_ENVS_V4: [&str; 2] = ["CIDR_ENVS_V4_A", "CIDR_ENVS_V4_B"];
/// `LpmTrie<[u8; 16], EnvValue>`: IPv6 CIDRs of the envs.
pub const CIDR_ENVS_V6: [&str; 2] = ["CIDR_ENVS_V6_A", "CIDR_ENVS_V6_B"];
/// `HashMap<[u8; 4], EnvValue>`: the IPv4 /32s of the envs, looked up before
/// the trie: a host address is one hash bucket instead of a walk of up to 32
/// dependent loads, whatever the size of the policy.
pub const CIDR_HOSTS_V4: [&str; 2] = ["CIDR_HOSTS_V4_A", "CIDR_HOSTS_V4_B"];
/// `HashMap<[u8; 16], EnvValue>`: the IPv6 /128s, likewise.
pub const CIDR_HOSTS_V6: [&str; 2] = ["CIDR_HOSTS_V6_A", "CIDR_HOSTS_V6_B"];
/// `HashMap<[u8; 4], EnvValue>`: IPv4 addresses of network namespaces other
/// than the agent's whose processes are all of one env (container endpoints),
/// written by the agent as it finds them; looked up for the remote side
/// before the CIDR maps. Per slot because env ids are the slot's policy's.
pub const ENDPOINTS_V4: [&str; 2] = ["ENDPOINTS_V4_A", "ENDPOINTS_V4_B"];
/// `HashMap<[u8; 16], EnvValue>`: the IPv6 endpoints, likewise.
pub const ENDPOINTS_V6: [&str; 2] = ["ENDPOINTS_V6_A", "ENDPOINTS_V6_B"];
/// `LpmTrie<RuleKey, RuleValue>`: allowed (source env, destination env, proto, port) flows.
pub const RULES: [&str; 2] = ["RULES_A", "RULES_B"];
/// `LpmTrie<RuleKey, RuleValue>`: denied flows; deny beats allow.
pub const DENY_RULES: [&str; 2] = ["DENY_RULES_A", "DENY_RULES_B"];
/// `HashMap<PairKey, u32 mode>`: env pairs whose mode differs from the global one.
pub const PAIR_MODES: [&str; 2] = ["PAIR_MODES_A", "PAIR_MODES_B"];
/// `Array<PolicyMeta>` with one entry: the cgroup walk's bounds.
pub const POLICY_META: [&str; 2] = ["POLICY_META_A", "POLICY_META_B"];
/// `Array<EnvLoss>` indexed by env id: the fail mode when the agent is gone.
pub const ENV_LOSS: [&str; 2] = ["ENV_LOSS_A", "ENV_LOSS_B"];
/// `Array<Config>` with one entry: generation (and so the active slot), mode.
pub const CONFIG: &str = "CONFIG";
/// `Array<AgentState>` with one entry: the agent's heartbeat and build.
pub const AGENT_STATE: &str = "AGENT_STATE";
/// `Array<EnvName>` indexed by env id: which name each id stands for.
pub const ENV_NAMES: &str = "ENV_NAMES";
/// `PerCpuHashMap<DecisionKey, u64>`: exact decision counters.
pub const DECISIONS: &str = "DECISIONS";
/// `LruHashMap<DedupKey, DedupValue>`: recently reported violations.
pub const DEDUP: &str = "DEDUP";
/// `LruHashMap<FlowKey, FlowVerdict>`: per-socket, per-peer verdict cache.
pub const FLOW_VERDICTS: &str = "FLOW_VERDICTS";
/// `LruHashMap<DecideKey, DecideValue>`: the socket hooks' decisions by
/// (caller's env, remote address, port, protocol), for destinations that
/// are not sockets of this host: a connection to a destination judged before
/// skips the endpoint, host and CIDR lookups and the rule tries. Stale under
/// another policy generation (every change of what decides a remote env:
/// reload, endpoints, holders); the agent-loss fail modes are checked at every
/// use, and a decision they made is never kept.
pub const DECIDE_CACHE: &str = "DECIDE_CACHE";
/// `LruHashMap<TupleKey, FlowVerdict>`: inbound TCP decisions taken on a listener,
/// adopted by the accepted socket so the connection is judged (and reported) once.
pub const INBOUND_TUPLES: &str = "INBOUND_TUPLES";
/// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`, cloned into accepted
/// sockets) of `flow::SockEnv`: each socket's env.
pub const SOCK_ENVS: &str = "SOCK_ENVS";
/// `Array<CgroupOffsets>` with one entry: what the `cgroup_mkdir` watch reads where.
pub const MKDIR_OFFSETS: &str = "MKDIR_OFFSETS";
/// `HashMap<u64 cgroup id, container::Registration>`: containers registered
/// by the runtime's hook (`envguard oci-hook`) or found at start. Only the
/// agent reads and writes it; it is pinned so registrations survive a
/// restart, and (like every pin under the root-only pin root) only a process
/// with CAP_BPF/CAP_SYS_ADMIN that may open the pin can change it.
pub const REGISTERED_CGROUPS: &str = "REGISTERED_CGROUPS";
/// `RingBuf` of `ViolationEvent`.
pub const EVENTS: &str = "EVENTS";
/// `PerCpuArray<u64>` of counters, indexed by `config::Counter`.
pub const COUNTERS: &str = "COUNTERS";

/// `HashMap<u32 ifindex, IfaceEnv>`: the interfaces listed in envs'
/// `interfaces` that exist now (the agent adds and removes them as they come
/// and go).
pub const IFACE_ENVS: [&str; 2] = ["IFACE_ENVS_A", "IFACE_ENVS_B"];
/// `LruHashMap<TcFlowKey, FlowVerdict>`: forwarded flows judged at the tc
/// hooks, and the replies the judged packets let in.
pub const TC_FLOWS: &str = "TC_FLOWS";

/// Every map, for pinning and removal.
pub const ALL: [&str; 42] = [
    DECIDE_CACHE,
    DEDUP,
    DENY_RULES[0],
    DENY_RULES[1],
    PAIR_MODES[0],
    PAIR_MODES[1],
    ENV_NAMES,
    DECISIONS,
    CGROUP_ENVS[0],
    CGROUP_ENVS[1],
    CIDR_ENVS_V4[0],
    CIDR_ENVS_V4[1],
    CIDR_ENVS_V6[0],
    CIDR_ENVS_V6[1],
    CIDR_HOSTS_V4[0],
    CIDR_HOSTS_V4[1],
    CIDR_HOSTS_V6[0],
    CIDR_HOSTS_V6[1],
    RULES[0],
    RULES[1],
    POLICY_META[0],
    POLICY_META[1],
    ENV_LOSS[0],
    ENV_LOSS[1],
    CONFIG,
    AGENT_STATE,
    FLOW_VERDICTS,
    INBOUND_TUPLES,
    SOCK_ENVS,
    EVENTS,
    COUNTERS,
    LISTED_CGROUPS[0],
    LISTED_CGROUPS[1],
    MKDIR_OFFSETS,
    REGISTERED_CGROUPS,
    ENDPOINTS_V4[0],
    ENDPOINTS_V4[1],
    ENDPOINTS_V6[0],
    ENDPOINTS_V6[1],
    IFACE_ENVS[0],
    IFACE_ENVS[1],
    TC_FLOWS,
];

/// Bump when a map's type, key, value or meaning changes: pinned maps of
/// another layout are never adopted, only replaced.
pub const LAYOUT_VERSION: u32 = 5;

/// Number of env ids (`host`, `world` and the declared envs).
pub const MAX_ENVS: u32 = 1024;
/// Capacity of `DEDUP`.
pub const MAX_DEDUP_KEYS: u32 = 65_536;
/// Capacity of `PAIR_MODES`.
pub const MAX_PAIR_MODES: u32 = 65_536;
/// Capacity of `DECISIONS`.
pub const MAX_DECISION_KEYS: u32 = 65_536;
/// Capacity of `CGROUP_ENVS`.
pub const MAX_CGROUPS: u32 = 16_384;
/// Capacity of `REGISTERED_CGROUPS`.
pub const MAX_REGISTERED: u32 = 4096;
/// Capacity of `LISTED_CGROUPS` (paths beyond it are left to the agent's poll).
pub const MAX_LISTED_PATHS: u32 = 4096;
/// Capacity of each CIDR trie.
pub const MAX_CIDRS: u32 = 262_144;
/// Capacity of `RULES` (after expanding wildcards and port ranges).
pub const MAX_RULE_ENTRIES: u32 = 262_144;
/// Capacity of each `ENDPOINTS` map.
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Capacity of `FLOW_VERDICTS`.
pub const MAX_FLOWS: u32 = 65_536;
/// Capacity of `INBOUND_TUPLES`.
pub const MAX_INBOUND_TUPLES: u32 = 16_384;
/// Capacity of `DECIDE_CACHE` (an LRU).
pub const MAX_DECIDE_KEYS: u32 = 16_384;
/// Size of `EVENTS` in bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;
/// Capacity of `IFACE_ENVS`.
pub const MAX_IFACES: u32 = 4096;
/// Capacity of `TC_FLOWS` (forward and reply entries: two per flow).
pub const MAX_TC_FLOWS: u32 = 131_072;
