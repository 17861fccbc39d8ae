//! Map names, shared so that userspace never repeats a literal.

/// `HashMap<u64 cgroup id, EnvValue>`: cgroups listed in the policy.
pub const CGROUP_ENVS: &str = "CGROUP_ENVS";
/// `LpmTrie<[u8; 4], EnvValue>`: IPv4 CIDRs of the envs.
pub const CIDR_ENVS_V4: &str = "CIDR_ENVS_V4";
/// `LpmTrie<[u8; 16], EnvValue>`: IPv6 CIDRs of the envs.
pub const CIDR_ENVS_V6: &str = "CIDR_ENVS_V6";
/// `LpmTrie<RuleKey, RuleValue>`: allowed (source env, destination env, proto, port) flows.
pub const RULES: &str = "RULES";
/// `Array<Config>` with one entry: mode, policy generation, walk bounds.
pub const CONFIG: &str = "CONFIG";
/// `LruHashMap<FlowKey, FlowVerdict>`: per-socket, per-peer verdict cache.
pub const FLOW_VERDICTS: &str = "FLOW_VERDICTS";
/// `LruHashMap<TupleKey, FlowVerdict>`: inbound TCP decisions taken on a listener,
/// adopted by the accepted socket so the connection is judged (and reported) once.
pub const INBOUND_TUPLES: &str = "INBOUND_TUPLES";
/// `HashMap<BoundKey, BoundValue>`: explicitly bound local sockets and their env.
pub const BOUND_SOCKETS: &str = "BOUND_SOCKETS";
/// `HashMap<u64 socket cookie, BoundKey>`: reverse index of `BOUND_SOCKETS`.
pub const BOUND_BY_COOKIE: &str = "BOUND_BY_COOKIE";
/// `RingBuf` of `ViolationEvent`.
pub const EVENTS: &str = "EVENTS";
/// `PerCpuArray<u64>` of counters, indexed by `config::Counter`.
pub const COUNTERS: &str = "COUNTERS";

/// Capacity of `CGROUP_ENVS`.
pub const MAX_CGROUPS: u32 = 16_384;
/// Capacity of each CIDR trie.
pub const MAX_CIDRS: u32 = 262_144;
/// Capacity of `RULES` (after expanding wildcards and port ranges).
pub const MAX_RULE_ENTRIES: u32 = 262_144;
/// Capacity of `FLOW_VERDICTS`.
pub const MAX_FLOWS: u32 = 65_536;
/// Capacity of `INBOUND_TUPLES`.
pub const MAX_INBOUND_TUPLES: u32 = 16_384;
/// Capacity of `BOUND_SOCKETS`.
pub const MAX_BOUND_SOCKETS: u32 = 65_536;
/// Size of `EVENTS` in bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;
