//! Env resolution and the decision, shared by all programs.
use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    maps::lpm_trie::Key,
};
use envguard_common::{
    config::{Config, Counter, MAX_CGROUP_LEVEL, MODE_AUDIT},
    event::{ENV_FROM_CGROUP, ENV_FROM_CIDR, ENV_FROM_DEFAULT, ENV_FROM_SOCKET},
    flow::{BoundKey, DECISION_ALLOW, DECISION_VIOLATION, FlowKey, FlowVerdict},
    policy::{ENV_HOST, ENV_WORLD, RULE_NONE, RULE_PREFIX_PORT, RuleKey},
};

use crate::{
    maps::{
        BOUND_SOCKETS, CGROUP_ENVS, CIDR_ENVS_V4, CIDR_ENVS_V6, CONFIG, COUNTERS, FLOW_VERDICTS,
        RULES,
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

#[derive(Clone, Copy)]
pub struct Decision {
    pub decision: u32,
    pub rule: u32,
}

impl Decision {
    #[inline(always)]
    pub fn is_violation(&self) -> bool {
        self.decision == DECISION_VIOLATION
    }
}

/// The configuration; an array entry always exists, and a zeroed one means
/// audit mode with no cgroups listed, which is what an unloaded policy is.
#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::new(MODE_AUDIT, 0, 1, 0),
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
pub fn local_env(cfg: &Config, ancestor: impl Fn(i32) -> u64) -> Side {
    let mut side = Side {
        env: ENV_HOST,
        from: ENV_FROM_DEFAULT,
        cgroup_id: 0,
    };
    let mut level = cfg.min_level;
    let max = if cfg.max_level < MAX_CGROUP_LEVEL {
        cfg.max_level
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
        if let Some(v) = unsafe { CGROUP_ENVS.get(&id) } {
            side.env = v.env;
            side.from = ENV_FROM_CGROUP;
            side.cgroup_id = id;
        }
        level += 1;
    }
    side
}

/// The env of a remote address by longest-prefix match.
#[inline(always)]
pub fn cidr_env(addr: &[u8; 16]) -> Side {
    let hit = match unmapped_v4(addr) {
        Some(v4) => CIDR_ENVS_V4.get(Key::new(32, v4)),
        None => CIDR_ENVS_V6.get(Key::new(128, *addr)),
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

/// The env of a destination on this host, if a local socket would receive
/// traffic for it: that socket's env, recorded when it was bound. Works for
/// loopback and for the host's own addresses alike, in the caller's netns.
#[inline(always)]
pub fn local_peer_env(
    ctx: *mut core::ffi::c_void,
    netns: u64,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
) -> Option<Side> {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match unmapped_v4(addr) {
        Some(v4) => {
            tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(v4);
            tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
            core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 })
        }
        None => {
            tuple.__bindgen_anon_1.ipv6.daddr = v6_words(addr);
            tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
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
    // Read what identifies the bound socket, then release it before anything
    // else can return: the verifier insists the reference is dropped on every path.
    let family = unsafe { (*sk).family } as u8;
    let bound_port = unsafe { (*sk).src_port } as u16;
    let v4 = unsafe { (*sk).src_ip4 };
    let v6 = unsafe { crate::net::read_v6_words(&raw const (*sk).src_ip6) };
    unsafe { bpf_sk_release(sk.cast()) };
    let bound_addr = bound_addr(family, v4, v6);
    let key = BoundKey::new(netns, bound_addr, bound_port, proto, family);
    Some(match unsafe { BOUND_SOCKETS.get(&key) } {
        Some(v) => Side {
            env: v.env,
            from: ENV_FROM_SOCKET,
            cgroup_id: v.cgroup_id,
        },
        // Bound before envguard started or outside its cgroup tree.
        None => Side {
            env: ENV_HOST,
            from: ENV_FROM_DEFAULT,
            cgroup_id: 0,
        },
    })
}

/// A socket's bound address in `BoundKey` form.
#[inline(always)]
pub fn bound_addr(family: u8, v4: u32, v6: [u8; 16]) -> [u8; 16] {
    if family == envguard_common::event::AF_INET {
        envguard_common::flow::bound_v4(v4.to_ne_bytes())
    } else {
        v6
    }
}

/// The policy's decision for a flow from `src` to `dst` on `proto`/`port`.
#[inline(always)]
pub fn decide(src: u32, dst: u32, proto: u8, port: u16) -> Decision {
    if src == dst {
        return Decision {
            decision: DECISION_ALLOW,
            rule: RULE_NONE,
        };
    }
    match RULES.get(Key::new(
        RULE_PREFIX_PORT,
        RuleKey::new(src, dst, proto, port),
    )) {
        Some(v) => Decision {
            decision: DECISION_ALLOW,
            rule: v.rule,
        },
        None => Decision {
            decision: DECISION_VIOLATION,
            rule: RULE_NONE,
        },
    }
}

/// A cached decision of this policy generation, if any.
#[inline(always)]
pub fn cached(key: &FlowKey, generation: u32) -> Option<u32> {
    match unsafe { FLOW_VERDICTS.get(key) } {
        Some(v) if v.generation == generation => Some(v.decision),
        _ => None,
    }
}

#[inline(always)]
pub fn remember(key: &FlowKey, generation: u32, decision: u32) {
    if FLOW_VERDICTS
        .insert(key, &FlowVerdict::new(generation, decision), 0)
        .is_err()
    {
        count(Counter::FlowCacheFull);
    }
}
