//! cgroup/sendmsg4 and cgroup/sendmsg6: datagrams of unconnected UDP sockets.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use envguard_common::event::{AF_INET, AF_INET6, HOOK_SENDMSG4, HOOK_SENDMSG6};

use crate::sock_addr::judge;

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_SENDMSG4, AF_INET)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_SENDMSG6, AF_INET6)
}
