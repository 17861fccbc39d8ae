//! The maps, named by the statics (userspace finds them by the same names,
//! which `envguard_common::maps` spells out).
use aya_ebpf::{
    bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
};
use envguard_common::{
    config::{AgentState, CgroupOffsets, Config, EnvLoss, NUM_COUNTERS, PolicyMeta},
    container::Registration,
    event::{DecisionKey, DedupKey, DedupValue},
    flow::{DecideKey, DecideValue, FlowKey, FlowVerdict, SockEnv, TcFlowKey, TupleKey},
    maps::*,
    policy::{CgroupPath, EnvName, EnvValue, IfaceEnv, PairKey, RuleKey, RuleValue},
};

// The policy maps come in two slots (see `envguard_common::maps`).

#[map]
pub static CGROUP_ENVS_A: HashMap<u64, EnvValue> = HashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
pub static CGROUP_ENVS_B: HashMap<u64, EnvValue> = HashMap::with_max_entries(MAX_CGROUPS, 0);

#[map]
pub static CIDR_ENVS_V4_A: LpmTrie<[u8; 4], EnvValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
pub static CIDR_ENVS_V4_B: LpmTrie<[u8; 4], EnvValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map]
pub static CIDR_ENVS_V6_A: LpmTrie<[u8; 16], EnvValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
pub static CIDR_ENVS_V6_B: LpmTrie<[u8; 16], EnvValue> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

// Not preallocated: they take memory for the host addresses a policy has,
// not for their capacity.
#[map]
pub static CIDR_HOSTS_V4_A: HashMap<[u8; 4], EnvValue> =
    HashMap::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static CIDR_HOSTS_V4_B: HashMap<[u8; 4], EnvValue> =
    HashMap::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static CIDR_HOSTS_V6_A: HashMap<[u8; 16], EnvValue> =
    HashMap::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static CIDR_HOSTS_V6_B: HashMap<[u8; 16], EnvValue> =
    HashMap::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

#[map]
pub static RULES_A: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);
#[map]
pub static RULES_B: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);

#[map]
pub static DENY_RULES_A: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);
#[map]
pub static DENY_RULES_B: LpmTrie<RuleKey, RuleValue> =
    LpmTrie::with_max_entries(MAX_RULE_ENTRIES, 0);

#[map]
pub static PAIR_MODES_A: HashMap<PairKey, u32> = HashMap::with_max_entries(MAX_PAIR_MODES, 0);
#[map]
pub static PAIR_MODES_B: HashMap<PairKey, u32> = HashMap::with_max_entries(MAX_PAIR_MODES, 0);

#[map]
pub static POLICY_META_A: Array<PolicyMeta> = Array::with_max_entries(1, 0);
#[map]
pub static POLICY_META_B: Array<PolicyMeta> = Array::with_max_entries(1, 0);

#[map]
pub static ENV_LOSS_A: Array<EnvLoss> = Array::with_max_entries(MAX_ENVS, 0);
#[map]
pub static ENV_LOSS_B: Array<EnvLoss> = Array::with_max_entries(MAX_ENVS, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static AGENT_STATE: Array<AgentState> = Array::with_max_entries(1, 0);

/// Written and read by the agent only; here so that it is pinned with the rest.
#[map]
pub static ENV_NAMES: Array<EnvName> = Array::with_max_entries(MAX_ENVS, 0);

/// Per CPU, so counting a repeat needs no atomic operation: each CPU keeps its
/// own window (at most one record per CPU per interval) and count, which the
/// agent sums.
#[map]
pub static DEDUP: LruPerCpuHashMap<DedupKey, DedupValue> =
    LruPerCpuHashMap::with_max_entries(MAX_DEDUP_KEYS, 0);

#[map]
pub static DECISIONS: PerCpuHashMap<DecisionKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_DECISION_KEYS, 0);

#[map]
pub static FLOW_VERDICTS: LruHashMap<FlowKey, FlowVerdict> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map]
pub static DECIDE_CACHE: LruHashMap<DecideKey, DecideValue> =
    LruHashMap::with_max_entries(MAX_DECIDE_KEYS, 0);

#[map]
pub static INBOUND_TUPLES: LruHashMap<TupleKey, FlowVerdict> =
    LruHashMap::with_max_entries(MAX_INBOUND_TUPLES, 0);

/// A map defined the way libbpf's BTF map definitions are: each setting is
/// carried by a field's *type* (`type` and `map_flags` as a pointer to an array
/// of that many ints, `key` and `value` as pointers to their types), which the
/// loader reads from the object's BTF. aya-ebpf 0.2 has no socket-storage map,
/// and the kernel needs BTF for the key and value of one.
#[repr(C)]
pub struct SockEnvsDef {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
    key: *const i32,
    value: *const SockEnv,
}
// SAFETY: never read or written at run time; only its type matters.
unsafe impl Sync for SockEnvsDef {}

#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static SOCK_ENVS: SockEnvsDef = SockEnvsDef {
    r#type: core::ptr::null(),
    map_flags: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

// The `cgroup_mkdir` watch (see `cgroup_mkdir.rs`).

#[map]
pub static LISTED_CGROUPS_A: HashMap<CgroupPath, EnvValue> =
    HashMap::with_max_entries(MAX_LISTED_PATHS, 0);
#[map]
pub static LISTED_CGROUPS_B: HashMap<CgroupPath, EnvValue> =
    HashMap::with_max_entries(MAX_LISTED_PATHS, 0);

#[map]
pub static MKDIR_OFFSETS: Array<CgroupOffsets> = Array::with_max_entries(1, 0);

/// Written and read by the agent only (no program looks at it): defined here
/// so it is created, pinned and adopted with the other maps.
#[map]
pub static REGISTERED_CGROUPS: HashMap<u64, Registration> =
    HashMap::with_max_entries(MAX_REGISTERED, BPF_F_NO_PREALLOC);
// Container endpoints (see `envguard_common::maps::ENDPOINTS_V4`). Not
// preallocated: most hosts have a few.

#[map]
pub static ENDPOINTS_V4_A: HashMap<[u8; 4], EnvValue> =
    HashMap::with_max_entries(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static ENDPOINTS_V4_B: HashMap<[u8; 4], EnvValue> =
    HashMap::with_max_entries(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static ENDPOINTS_V6_A: HashMap<[u8; 16], EnvValue> =
    HashMap::with_max_entries(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
#[map]
pub static ENDPOINTS_V6_B: HashMap<[u8; 16], EnvValue> =
    HashMap::with_max_entries(MAX_ENDPOINTS, BPF_F_NO_PREALLOC);

// The tc hooks (see `tc.rs`).

#[map]
pub static IFACE_ENVS_A: HashMap<u32, IfaceEnv> = HashMap::with_max_entries(MAX_IFACES, 0);
#[map]
pub static IFACE_ENVS_B: HashMap<u32, IfaceEnv> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map]
pub static TC_FLOWS: LruHashMap<TcFlowKey, FlowVerdict> =
    LruHashMap::with_max_entries(MAX_TC_FLOWS, 0);
