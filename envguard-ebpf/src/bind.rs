//! cgroup/post_bind4 and cgroup/post_bind6: a bound socket is a possible
//! same-host destination, so it gets its env — on the socket itself, where no
//! other socket can change or remove it, and whence it goes with the socket.
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::cgroup_sock,
    programs::SockContext,
};
use envguard_common::{
    config::Counter,
    flow::{SOCK_F_HOLDER, SockEnv},
};

use crate::{
    classify::{config, count, local_env, policy},
    net::sock_proto,
    sockenv,
};

/// Verdict of a cgroup_sock program that lets the call proceed. envguard judges
/// traffic, never binds, so these programs always return it.
const PROCEED: i32 = 1;

#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    record(&ctx);
    PROCEED
}

#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    record(&ctx);
    PROCEED
}

#[inline(always)]
fn record(ctx: &SockContext) {
    let sk = ctx.sock;
    if sock_proto(unsafe { (*sk).protocol }).is_none() {
        return;
    }
    let p = policy(config());
    let local = local_env(&p, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    });
    // Its own cookie as origin: a listener's storage is cloned into the
    // connections it accepts, which find its decisions by it.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let init = SockEnv::new(local.env, unsafe { bpf_get_current_cgroup_id() }, cookie, 0);
    match sockenv::get_or_create(sk.cast(), &init) {
        // The agent's word on who holds it stands.
        Some(s) if s.flags & SOCK_F_HOLDER != 0 => s.origin_cookie = cookie,
        Some(s) => {
            s.env = init.env;
            s.cgroup_id = init.cgroup_id;
            s.origin_cookie = cookie;
        }
        None => count(Counter::SockStorageFull),
    }
}
