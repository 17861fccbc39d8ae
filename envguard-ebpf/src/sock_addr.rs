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
        AF_INET, AF_INET6, DIRECTION_EGRESS, DedupKey, ENV_FROM_SOCKET, HOOK_CONNECT4,
        HOOK_CONNECT6,
    },
    flow::{DECISION_ALLOW, FlowKey, FlowVerdict, SOCK_F_ACTIVE, SOCK_F_VERDICT, SockEnv},
};

use crate::{
    classify::{
        Decision, Side, cached, config, count, count_decision, decide, local_env, local_peer_env,
        mode_of, policy, remember, remote_decision, verdict_of,
    },
    event::{emit, set_sides},
    net::{IPPROTO_TCP, IPPROTO_UDP, mapped_v4, read_v6_words, unmapped_v4},
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
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: u8, family: u8) -> i32 {
    let sa = ctx.sock_addr;
    let proto = unsafe { (*sa).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
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
    if proto != IPPROTO_TCP
        && let Some(v) = cached(&FlowKey::new(cookie, remote_addr, remote_port, proto), &cfg)
        && v.allows()
    {
        return ALLOW;
    }
    let p = policy(cfg);
    let local = local_env(&p, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    });
    let (remote, decision) =
        match local_peer_env(ctx.sock_addr.cast(), None, &remote_addr, remote_port, proto) {
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
        let cookie = if cookie == 0 {
            unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
        } else {
            cookie
        };
        remember(
            &FlowKey::new(cookie, remote_addr, remote_port, proto),
            &verdict,
        );
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
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let local_port = if sk.is_null() {
        0
    } else {
        (unsafe { (*sk).src_port }) as u16
    };
    report(
        mode,
        hook,
        family,
        proto,
        &local,
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
    local: &Side,
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
        src_env: local.env,
        dst_env: remote.env,
        dst_port: remote_port,
        proto,
        direction: DIRECTION_EGRESS,
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
        // The local address is not chosen yet when connect() runs.
        set_sides(
            ev,
            DIRECTION_EGRESS,
            local,
            &[0; 16],
            local_port,
            remote,
            remote_addr,
            remote_port,
            decision,
        );
    });
}
