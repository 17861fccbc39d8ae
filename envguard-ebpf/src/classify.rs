//! Env resolution and the decision, shared by all programs.
use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{
        bpf_ktime_get_boot_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skb_ancestor_cgroup_id,
    },
    maps::lpm_trie::Key,
};
use envguard_common::{
    config::{Config, Counter, EnvLoss, MAX_CGROUP_LEVEL, MODE_AUDIT, MODE_ENFORCE, PolicyMeta},
    decide::{self as shared, ModeLookup, RuleLookup},
    event::{
        DecisionKey, ENV_FROM_CGROUP, ENV_FROM_CIDR, ENV_FROM_DEFAULT, ENV_FROM_ENDPOINT,
        ENV_FROM_SOCKET,
    },
    flow::{DecideKey, DecideValue, FlowKey, FlowVerdict},
    policy::{
        ENV_HOST, ENV_WORLD, PairKey, RULE_AGENT_LOSS_CLOSED, RULE_AGENT_LOSS_OPEN,
        RULE_PREFIX_PORT, RuleKey,
    },
};

use crate::{
    maps::{
        AGENT_STATE, CGROUP_ENVS_A, CGROUP_ENVS_B, CIDR_ENVS_V4_A, CIDR_ENVS_V4_B, CIDR_ENVS_V6_A,
        CIDR_ENVS_V6_B, CIDR_HOSTS_V4_A, CIDR_HOSTS_V4_B, CIDR_HOSTS_V6_A, CIDR_HOSTS_V6_B, CONFIG,
        COUNTERS, DECIDE_CACHE, DECISIONS, DENY_RULES_A, DENY_RULES_B, ENDPOINTS_V4_A,
        ENDPOINTS_V4_B, ENDPOINTS_V6_A, ENDPOINTS_V6_B, ENV_LOSS_A, ENV_LOSS_B, FLOW_VERDICTS,
        PAIR_MODES_A, PAIR_MODES_B, POLICY_META_A, POLICY_META_B, RULES_A, RULES_B,
    },
    net::{IPPROTO_TCP, IPPROTO_UDP, unmapped_v4, v6_words},
};

/// An env and how it was found.
#[derive(Clone, Copy)]
pub struct Side {
    pub env: u32,
    pub from: u8,
    /// The cgroup that decided a local side, or the peer socket's cgroup.
    pub cgroup_id: u64,
}

pub use envguard_common::decide::Decision;

/// What one program run needs to know about the policy in force.
pub struct Policy {
    pub cfg: Config,
    pub meta: PolicyMeta,
}

impl Policy {
    #[inline(always)]
    fn slot_b(&self) -> bool {
        self.cfg.slot() == 1
    }
}

/// The configuration; an array entry always exists, and a zeroed one means
/// audit mode, which is what an unloaded policy is.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::new(0, MODE_AUDIT),
    }
}

/// The verdict of a packet hook on a packet it could not judge (headers it
/// cannot read, a spoofed source): counted, then `drop` in enforce mode and
/// `pass` in audit mode. Enforce promises that nothing unjudged crosses envs;
/// audit promises never to break traffic.
#[inline(always)]
pub fn unjudgeable(drop: i32, pass: i32) -> i32 {
    count(Counter::Unparsable);
    if config().mode == MODE_ENFORCE {
        drop
    } else {
        pass
    }
}

/// The configuration and the active slot's facts.
#[inline(always)]
pub fn policy(cfg: Config) -> Policy {
    let meta = if cfg.slot() == 1 {
        POLICY_META_B.get(0)
    } else {
        POLICY_META_A.get(0)
    };
    Policy {
        cfg,
        // With no policy loaded the walk is empty: min above max.
        meta: meta.copied().unwrap_or(PolicyMeta::new(1, 0)),
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

/// The env of a local cgroup, given a way to read its ancestor at a level: the
/// deepest listed ancestor wins, so nested envs and cgroups created after the
/// policy was loaded are covered without userspace.
#[inline(always)]
pub fn local_env(p: &Policy, ancestor: impl Fn(i32) -> u64) -> Side {
    let mut side = Side {
        env: ENV_HOST,
        from: ENV_FROM_DEFAULT,
        cgroup_id: 0,
    };
    let mut level = p.meta.min_level;
    let max = if p.meta.max_level < MAX_CGROUP_LEVEL {
        p.meta.max_level
    } else {
        MAX_CGROUP_LEVEL
    };
    // A constant trip count is what lets the verifier prove the loop ends; the
    // levels that matter are counted beside it.
    #[allow(clippy::explicit_counter_loop)]
    for _ in 0..=MAX_CGROUP_LEVEL {
        if level > max {
            break;
        }
        let id = ancestor(level as i32);
        if id == 0 {
            // The cgroup is shallower than `level`.
            break;
        }
        let hit = if p.slot_b() {
            unsafe { CGROUP_ENVS_B.get(&id) }
        } else {
            unsafe { CGROUP_ENVS_A.get(&id) }
        };
        if let Some(v) = hit {
            side.env = v.env;
            side.from = ENV_FROM_CGROUP;
            side.cgroup_id = id;
        }
        level += 1;
    }
    side
}

/// The env of the socket of a packet: its cgroup's deepest listed ancestor.
#[inline(always)]
pub fn skb_local_env(p: &Policy, skb: *mut __sk_buff) -> Side {
    let id =
        envguard_skb_listed_ancestor(skb, p.slot_b() as u32, p.meta.min_level, p.meta.max_level);
    let hit = if id == 0 {
        None
    } else if p.slot_b() {
        unsafe { CGROUP_ENVS_B.get(&id) }
    } else {
        unsafe { CGROUP_ENVS_A.get(&id) }
    };
    match hit {
        Some(v) => Side {
            env: v.env,
            from: ENV_FROM_CGROUP,
            cgroup_id: id,
        },
        None => Side {
            env: ENV_HOST,
            from: ENV_FROM_DEFAULT,
            cgroup_id: 0,
        },
    }
}

/// The cgroup walk of the packet hooks as a global BPF function, verified
/// once on its own: inlined, its bounded loop was re-verified on every path
/// of the program, most of the verifier's work. The deepest listed ancestor
/// of the packet's socket's cgroup, or 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn envguard_skb_listed_ancestor(
    skb: *mut __sk_buff,
    slot_b: u32,
    min_level: u32,
    max_level: u32,
) -> u64 {
    let p = Policy {
        cfg: Config::new(slot_b, MODE_AUDIT),
        meta: PolicyMeta::new(min_level, max_level),
    };
    local_env(&p, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb.cast(), level)
    })
    .cgroup_id
}

/// The env of a remote address: a container endpoint's env when the agent
/// found the address in a network namespace of one env, else by
/// longest-prefix match over the policy's CIDRs.
#[inline(always)]
pub fn cidr_env(p: &Policy, addr: &[u8; 16]) -> Side {
    // One exact-match bucket; an endpoint is more specific than any CIDR the
    // operator wrote for its network.
    let endpoint = match (unmapped_v4(addr), p.slot_b()) {
        (Some(v4), false) => unsafe { ENDPOINTS_V4_A.get(&v4) },
        (Some(v4), true) => unsafe { ENDPOINTS_V4_B.get(&v4) },
        (None, false) => unsafe { ENDPOINTS_V6_A.get(addr) },
        (None, true) => unsafe { ENDPOINTS_V6_B.get(addr) },
    };
    if let Some(v) = endpoint {
        return Side {
            env: v.env,
            from: ENV_FROM_ENDPOINT,
            cgroup_id: 0,
        };
    }
    // An exact host entry is the longest prefix there is: when one matches,
    // the trie has nothing longer to say.
    let hit = match (unmapped_v4(addr), p.slot_b()) {
        (Some(v4), false) => {
            unsafe { CIDR_HOSTS_V4_A.get(&v4) }.or_else(|| CIDR_ENVS_V4_A.get(Key::new(32, v4)))
        }
        (Some(v4), true) => {
            unsafe { CIDR_HOSTS_V4_B.get(&v4) }.or_else(|| CIDR_ENVS_V4_B.get(Key::new(32, v4)))
        }
        (None, false) => unsafe { CIDR_HOSTS_V6_A.get(addr) }
            .or_else(|| CIDR_ENVS_V6_A.get(Key::new(128, *addr))),
        (None, true) => unsafe { CIDR_HOSTS_V6_B.get(addr) }
            .or_else(|| CIDR_ENVS_V6_B.get(Key::new(128, *addr))),
    };
    match hit {
        Some(v) => Side {
            env: v.env,
            from: ENV_FROM_CIDR,
            cgroup_id: 0,
        },
        None => Side {
            env: ENV_WORLD,
            from: ENV_FROM_DEFAULT,
            cgroup_id: 0,
        },
    }
}

/// The remote side of a flow from env `src` to `addr` (not a socket of this
/// host) and the decision for it, from `DECIDE_CACHE` when it holds one of
/// this policy generation, else looked up (`cidr_env`, `decide`) and kept
/// there. The agent-loss fail modes depend on the time, not on the flow:
/// they are checked at every use, and a decision they made is not kept.
#[inline(always)]
pub fn remote_decision(
    p: &Policy,
    src: u32,
    addr: &[u8; 16],
    proto: u8,
    port: u16,
) -> (Side, Decision) {
    let key = DecideKey::new(src, *addr, port, proto);
    if let Some(c) = unsafe { DECIDE_CACHE.get(&key) }
        && c.generation == p.cfg.generation
    {
        let remote = Side {
            env: c.dst_env,
            from: c.from,
            cgroup_id: 0,
        };
        let kept = Decision {
            decision: c.decision as u32,
            rule: c.rule,
        };
        let decision = shared::agent_loss(&Slot(p.slot_b()), src, remote.env).unwrap_or(kept);
        return (remote, decision);
    }
    let remote = cidr_env(p, addr);
    let decision = decide(p, src, remote.env, proto, port);
    if decision.rule != RULE_AGENT_LOSS_OPEN && decision.rule != RULE_AGENT_LOSS_CLOSED {
        let v = DecideValue::new(
            p.cfg.generation,
            remote.env,
            remote.from,
            decision.decision,
            decision.rule,
        );
        // Full or not, the decision stands; the cache only saves lookups.
        let _ = DECIDE_CACHE.insert(&key, &v, 0);
    }
    (remote, decision)
}

/// The env of a destination on this host, if a local socket would receive
/// traffic for it: that socket's env, recorded when it was bound. Works for
/// loopback and for the host's own addresses alike, in the caller's netns.
#[inline(always)]
///
/// `src`, when known, is the local end of an established flow: the lookup
/// then finds the connected socket at the other end rather than its listener.
pub fn local_peer_env(
    ctx: *mut core::ffi::c_void,
    src: Option<(&[u8; 16], u16)>,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
) -> Option<Side> {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match unmapped_v4(addr) {
        Some(v4) => {
            tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(v4);
            tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
            if let Some((a, p)) = src
                && let Some(s4) = unmapped_v4(a)
            {
                tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(s4);
                tuple.__bindgen_anon_1.ipv4.sport = p.to_be();
            }
            core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 })
        }
        None => {
            tuple.__bindgen_anon_1.ipv6.daddr = v6_words(addr);
            tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
            if let Some((a, p)) = src {
                tuple.__bindgen_anon_1.ipv6.saddr = v6_words(a);
                tuple.__bindgen_anon_1.ipv6.sport = p.to_be();
            }
            core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv6 })
        }
    } as u32;
    let sk: *mut bpf_sock = unsafe {
        match proto {
            IPPROTO_TCP => bpf_sk_lookup_tcp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0),
            _ => return None,
        }
    };
    if sk.is_null() {
        return None;
    }
    // The socket that would receive the flow carries its own env; read it,
    // then release the reference before anything else can return: the
    // verifier insists it is dropped on every path.
    let side = match crate::sockenv::get(sk.cast()) {
        Some(s) => Side {
            env: s.env,
            from: ENV_FROM_SOCKET,
            cgroup_id: s.cgroup_id,
        },
        // A socket the agent has not labelled yet (bound before it started,
        // outside its cgroup tree): `host`.
        None => Side {
            env: ENV_HOST,
            from: ENV_FROM_DEFAULT,
            cgroup_id: 0,
        },
    };
    unsafe { bpf_sk_release(sk.cast()) };
    Some(side)
}

/// The policy's decision for a flow from `src` to `dst` on `proto`/`port`,
/// overridden by the envs' fail modes when the agent has been gone too long:
/// the shared decision (`envguard_common::decide`) over this slot's maps.
#[inline(always)]
pub fn decide(p: &Policy, src: u32, dst: u32, proto: u8, port: u16) -> Decision {
    let packed = envguard_decide(p.slot_b() as u32, src, dst, proto as u32, port as u32);
    Decision {
        decision: (packed >> 32) as u32,
        rule: packed as u32,
    }
}

/// The decision as a BPF-to-BPF function of global linkage, which the
/// verifier checks once, on its own, rather than again on every path that
/// calls it: inlined, it was most of every program and multiplied the
/// verifier's work past its limit. Scalars in, the decision and rule packed
/// into one scalar out, as a global function must.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn envguard_decide(slot_b: u32, src: u32, dst: u32, proto: u32, port: u32) -> u64 {
    let d = shared::decide(&Slot(slot_b != 0), src, dst, proto as u8, port as u16);
    ((d.decision as u64) << 32) | d.rule as u64
}

/// One slot of the double-buffered policy maps.
struct Slot(bool);

impl Slot {
    #[inline(always)]
    fn slot_b(&self) -> bool {
        self.0
    }
}

/// The kernel's answers to the shared decision's questions: the slot's
/// maps, the agent's heartbeat and the boot clock.
impl RuleLookup for Slot {
    #[inline(always)]
    fn deny_rule(&self, key: &RuleKey) -> Option<u32> {
        let key = Key::new(RULE_PREFIX_PORT, *key);
        let hit = if self.slot_b() {
            DENY_RULES_B.get(&key)
        } else {
            DENY_RULES_A.get(&key)
        };
        hit.map(|v| v.rule)
    }

    #[inline(always)]
    fn allow_rule(&self, key: &RuleKey) -> Option<u32> {
        let key = Key::new(RULE_PREFIX_PORT, *key);
        let hit = if self.slot_b() {
            RULES_B.get(key)
        } else {
            RULES_A.get(key)
        };
        hit.map(|v| v.rule)
    }

    #[inline(always)]
    fn env_loss(&self, env: u32) -> Option<&EnvLoss> {
        if self.slot_b() {
            ENV_LOSS_B.get(env)
        } else {
            ENV_LOSS_A.get(env)
        }
    }

    #[inline(always)]
    fn heartbeat_ns(&self) -> u64 {
        match AGENT_STATE.get(0) {
            Some(s) => s.heartbeat_ns,
            None => 0,
        }
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        unsafe { bpf_ktime_get_boot_ns() }
    }
}

/// A cached decision that still holds: taken under this policy generation
/// and, for a violation, in the mode its pair has now.
#[inline(always)]
pub fn cached(key: &FlowKey, cfg: &Config) -> Option<FlowVerdict> {
    match unsafe { FLOW_VERDICTS.get(key) } {
        Some(v) if fresh(v, cfg) => Some(*v),
        _ => None,
    }
}

#[inline(always)]
pub fn fresh(v: &FlowVerdict, cfg: &Config) -> bool {
    v.generation == cfg.generation
        && (v.allows() || mode_of(cfg, v.src_env, v.dst_env) == v.mode as u32)
}

#[inline(always)]
pub fn remember(key: &FlowKey, verdict: &FlowVerdict) {
    if FLOW_VERDICTS.insert(key, verdict, 0).is_err() {
        count(Counter::FlowCacheFull);
    }
}

/// The mode a violation between two envs is handled in: the pair's own mode
/// when the policy or an operator set one, else the global mode.
#[inline(always)]
pub fn mode_of(cfg: &Config, src: u32, dst: u32) -> u32 {
    shared::mode_of(&Modes(cfg), src, dst)
}

/// The modes in force: the configuration and the active slot's pair modes.
struct Modes<'a>(&'a Config);

impl ModeLookup for Modes<'_> {
    #[inline(always)]
    fn global_mode(&self) -> u32 {
        self.0.mode
    }

    #[inline(always)]
    fn pair_mode(&self, src: u32, dst: u32) -> Option<u32> {
        let key = PairKey::new(src, dst);
        let pair = if self.0.slot() == 1 {
            unsafe { PAIR_MODES_B.get(&key) }
        } else {
            unsafe { PAIR_MODES_A.get(&key) }
        };
        pair.copied()
    }
}

/// Counts one decision; exact whatever happens to events.
#[inline(always)]
pub fn count_decision(src: u32, dst: u32, decision: u32, mode: u32, direction: u8, proto: u8) {
    let key = DecisionKey::new(
        src,
        dst,
        verdict_of(decision, mode),
        direction,
        proto,
        mode as u8,
    );
    match DECISIONS.get_ptr_mut(&key) {
        // Per-CPU slot: no other writer.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = DECISIONS.insert(&key, &1, 0);
        }
    }
}

/// The verdict byte of a decision in a mode.
#[inline(always)]
pub fn verdict_of(decision: u32, mode: u32) -> u8 {
    shared::verdict_of(decision, mode)
}
