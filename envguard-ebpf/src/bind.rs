//! cgroup/post_bind4, cgroup/post_bind6 and cgroup/sock_release: the table of
//! bound local sockets, so a same-host peer is judged by its own env.
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::cgroup_sock,
    programs::SockContext,
};
use envguard_common::{
    config::Counter,
    event::{AF_INET, AF_INET6},
    flow::{BoundKey, BoundValue},
};

use crate::{
    classify::{bound_addr, config, count, local_env, policy},
    maps::{BOUND_BY_COOKIE, BOUND_SOCKETS},
    net::{IPPROTO_TCP, IPPROTO_UDP, read_v6_words},
};

/// Verdict of a cgroup_sock program that lets the call proceed. envguard judges
/// traffic, never binds, so these programs always return it.
const PROCEED: i32 = 1;

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    record(&ctx, AF_INET);
    PROCEED
}

#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    record(&ctx, AF_INET6);
    PROCEED
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    forget(&ctx);
    PROCEED
}

#[inline(always)]
fn record(ctx: &SockContext, family: u8) {
    let sk = ctx.sock;
    let proto = unsafe { (*sk).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let port = unsafe { (*sk).src_port } as u16;
    let addr = if family == AF_INET {
        bound_addr(
            family,
            unsafe { core::ptr::read_volatile(&(*sk).src_ip4) },
            [0; 16],
        )
    } else {
        bound_addr(family, 0, unsafe {
            read_v6_words(&raw const (*sk).src_ip6)
        })
    };
    let netns = unsafe { bpf_get_netns_cookie(sk.cast()) };
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let p = policy(config());
    let local = local_env(&p, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    });
    let key = BoundKey::new(netns, addr, port, proto, family);
    let value = BoundValue::new(cookie, unsafe { bpf_get_current_cgroup_id() }, local.env);
    if BOUND_SOCKETS.insert(&key, &value, 0).is_err()
        || BOUND_BY_COOKIE.insert(&cookie, &key, 0).is_err()
    {
        count(Counter::BoundTableFull);
    }
}

#[inline(always)]
fn forget(ctx: &SockContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let Some(key) = (unsafe { BOUND_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // A newer socket may have bound the same address since (SO_REUSEPORT, or a
    // restart racing the old socket's close): only remove our own entry.
    if let Some(v) = unsafe { BOUND_SOCKETS.get(&key) }
        && v.cookie == cookie
    {
        let _ = BOUND_SOCKETS.remove(&key);
    }
    let _ = BOUND_BY_COOKIE.remove(&cookie);
}
