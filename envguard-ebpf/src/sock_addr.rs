//! The decision shared by the connect and sendmsg hooks.
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    programs::SockAddrContext,
};
use envguard_common::{
    config::{Counter, MODE_ENFORCE},
    event::{
        AF_INET, AF_INET6, DIRECTION_EGRESS, DIRECTION_INGRESS, DedupKey, ENV_FROM_SOCKET,
        HOOK_CONNECT4, HOOK_CONNECT6,
    },
    flow::{DECISION_ALLOW, FlowKey, FlowVerdict, SOCK_F_ACTIVE, SOCK_F_VERDICT, SockEnv},
};

use crate::{
    classify::{
        Decision, Side, cidr_env, config, count, count_decision, decide, fresh, local_env,
        local_peer_env, mode_of, policy, remember, remote_decision, verdict_of,
    },
    event::{emit, set_sides},
    maps::FLOW_VERDICTS,
    net::{IPPROTO_TCP, mapped_v4, read_v6_words, sock_proto, unmapped_v4},
    sockenv,
};

/// Verdicts of a sock_addr program: 1 lets the call proceed, 0 fails it with EPERM.
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0;

/// Judges the destination of a connect() or sendmsg() call.
///
/// A flow this socket already has an allowed verdict for passes at once: that
/// is how a UDP server answers a client whose datagram the ingress hook
/// allowed, without letting the server start flows the policy does not allow.
/// An answer is judged as the flow it answers: one the ingress hook let in
/// under audit passes while its pair stays audited (reported there), and
/// one taken under an earlier policy is judged again that way first.
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: u8, family: u8) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = sock_proto(unsafe { (*sa).protocol }) else {
        return ALLOW;
    };
    let remote_addr = if family == AF_INET {
        mapped_v4(unsafe { core::ptr::read_volatile(&(*sa).user_ip4) }.to_ne_bytes())
    } else {
        unsafe { read_v6_words(&raw const (*sa).user_ip6) }
    };
    let remote_port = u16::from_be(unsafe { core::ptr::read_volatile(&(*sa).user_port) } as u16);

    let cfg = config();
    // A TCP socket connects once: there is no earlier verdict of its own to
    // find, and its decision is kept on the socket (`label`), not in the
    // cache, which needs the socket's cookie only if that fails.
    let cookie = if proto == IPPROTO_TCP {
        0
    } else {
        unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
    };
    let key = FlowKey::new(cookie, remote_addr, remote_port, proto);
    // Whether this datagram answers a peer that spoke first under an earlier
    // policy: the flow is then judged again the way it goes, below.
    let mut answers = false;
    if proto != IPPROTO_TCP
        && let Some(v) = unsafe { FLOW_VERDICTS.get(&key) }
    {
        if fresh(v, &cfg) {
            // Allowed, or an answer to a flow the packet hooks let in (an
            // audited one: `fresh` says its pair's mode is still the one it
            // was let in under). A flow they refused is answered by nothing:
            // this datagram is judged as a flow of its own.
            if v.allows() || (v.inbound != 0 && u32::from(v.mode) != MODE_ENFORCE) {
                return ALLOW;
            }
        } else {
            answers = v.inbound != 0;
        }
    }
    let p = policy(cfg);
    let local = local_env(&p, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    });
    let peer = local_peer_env(ctx.sock_addr.cast(), None, &remote_addr, remote_port, proto);
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let local_port = if sk.is_null() {
        0
    } else {
        (unsafe { (*sk).src_port }) as u16
    };
    if answers {
        let remote = match peer {
            Some(peer) => peer,
            None => cidr_env(&p, &remote_addr),
        };
        let decision = decide(&p, remote.env, local.env, proto, local_port);
        let mode = mode_of(&cfg, remote.env, local.env);
        if decision.decision == DECISION_ALLOW || mode != MODE_ENFORCE {
            let v = FlowVerdict::new(
                cfg.generation,
                decision.decision,
                mode,
                true,
                remote.env,
                local.env,
            )
            .with_peer_local(remote.from == ENV_FROM_SOCKET);
            remember(&key, &v);
            count_decision(
                remote.env,
                local.env,
                decision.decision,
                mode,
                DIRECTION_INGRESS,
                proto,
            );
            if decision.decision != DECISION_ALLOW {
                // A sending socket is bound: its address is known (unless
                // it is a wildcard), unlike at a first connect().
                let local_addr = if sk.is_null() {
                    [0; 16]
                } else if family == AF_INET {
                    mapped_v4(unsafe { (*sk).src_ip4 }.to_ne_bytes())
                } else {
                    unsafe { read_v6_words(&raw const (*sk).src_ip6) }
                };
                report(
                    mode,
                    hook,
                    family,
                    proto,
                    DIRECTION_INGRESS,
                    &local,
                    &local_addr,
                    &remote,
                    &remote_addr,
                    remote_port,
                    local_port,
                    &decision,
                );
            }
            return ALLOW;
        }
    }
    let (remote, decision) = match peer {
        Some(peer) => (peer, decide(&p, local.env, peer.env, proto, remote_port)),
        None => remote_decision(&p, local.env, &remote_addr, proto, remote_port),
    };
    let mode = mode_of(&cfg, local.env, remote.env);
    let verdict = FlowVerdict::new(
        cfg.generation,
        decision.decision,
        mode,
        false,
        local.env,
        remote.env,
    )
    .with_peer_local(remote.from == ENV_FROM_SOCKET);
    if !label(ctx, hook, proto, &local, &verdict) {
        // A TCP socket's key was not needed until now.
        let key = if cookie == 0 {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            FlowKey::new(cookie, remote_addr, remote_port, proto)
        } else {
            key
        };
        remember(&key, &verdict);
    }
    count_decision(
        local.env,
        remote.env,
        decision.decision,
        mode,
        DIRECTION_EGRESS,
        proto,
    );
    if decision.decision == DECISION_ALLOW {
        return ALLOW;
    }
    report(
        mode,
        hook,
        family,
        proto,
        DIRECTION_EGRESS,
        &local,
        // The local address is not chosen yet when connect() runs.
        &[0; 16],
        &remote,
        &remote_addr,
        remote_port,
        local_port,
        &decision,
    );
    if mode == MODE_ENFORCE { REFUSE } else { ALLOW }
}

/// Gives the calling socket its env if it has none yet, so that an unbound
/// socket (a UDP client's) is judged by it when it is the destination; marks a
/// connecting TCP socket as the side that opened its connection, and gives it
/// its decision, which its packets then find on the socket. Returns whether
/// the decision is kept on the socket (else it goes to the verdict cache).
#[inline(always)]
fn label(ctx: &SockAddrContext, hook: u8, proto: u8, local: &Side, verdict: &FlowVerdict) -> bool {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    let connecting = proto == IPPROTO_TCP && (hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6);
    let flags = if connecting { SOCK_F_ACTIVE } else { 0 };
    let init = SockEnv::new(local.env, unsafe { bpf_get_current_cgroup_id() }, 0, flags);
    match sockenv::get_or_create(sk.cast(), &init) {
        Some(s) => {
            s.flags |= flags;
            if connecting {
                s.verdict = *verdict;
                s.flags |= SOCK_F_VERDICT;
            }
            connecting
        }
        None => {
            count(Counter::SockStorageFull);
            false
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    mode: u32,
    hook: u8,
    family: u8,
    proto: u8,
    direction: u8,
    local: &Side,
    local_addr: &[u8; 16],
    remote: &Side,
    remote_addr: &[u8; 16],
    remote_port: u16,
    local_port: u16,
    decision: &Decision,
) {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let dedup = DedupKey {
        cgroup_id,
        remote_addr: *remote_addr,
        src_env: if direction == DIRECTION_EGRESS {
            local.env
        } else {
            remote.env
        },
        dst_env: if direction == DIRECTION_EGRESS {
            remote.env
        } else {
            local.env
        },
        dst_port: if direction == DIRECTION_EGRESS {
            remote_port
        } else {
            local_port
        },
        proto,
        direction,
        verdict: verdict_of(decision.decision, mode),
        hook,
        _pad: [0; 2],
    };
    emit(mode, true, &dedup, |ev| {
        ev.hook = hook;
        ev.proto = proto;
        ev.family = if family == AF_INET6 && unmapped_v4(remote_addr).is_some() {
            AF_INET
        } else {
            family
        };
        ev.cgroup_id = cgroup_id;
        set_sides(
            ev,
            direction,
            local,
            local_addr,
            local_port,
            remote,
            remote_addr,
            remote_port,
            decision,
        );
    });
}
