//! The maps, named by the statics (userspace finds them by the same names,
//! which `envguard_common::maps` spells out).
use aya_ebpf::{
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
};
use envguard_common::{
    config::{AgentState, CgroupOffsets, Config, EnvLoss, NUM_COUNTERS, PolicyMeta},
    event::{DecisionKey, DedupKey, DedupValue},
    flow::{BoundKey, BoundValue, FlowKey, FlowVerdict, TupleKey},
    maps::*,
    policy::{CgroupPath, EnvName, EnvValue, PairKey, RuleKey, RuleValue},
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
pub static INBOUND_TUPLES: LruHashMap<TupleKey, FlowVerdict> =
    LruHashMap::with_max_entries(MAX_INBOUND_TUPLES, 0);

#[map]
pub static BOUND_SOCKETS: HashMap<BoundKey, BoundValue> =
    HashMap::with_max_entries(MAX_BOUND_SOCKETS, 0);

/// Reverse index of `BOUND_SOCKETS`: the release hook cannot read a socket's
/// bound address, only its cookie.
#[map]
pub static BOUND_BY_COOKIE: HashMap<u64, BoundKey> =
    HashMap::with_max_entries(MAX_BOUND_SOCKETS, 0);

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
