//! cgroup/connect4 and cgroup/connect6: outgoing TCP connections and connected UDP.
//!
//! There is no fallback verdict: `judge` has no error path, every outcome is a
//! decision (the maps it reads are looked up, never allocated).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use envguard_common::event::{AF_INET, AF_INET6, HOOK_CONNECT4, HOOK_CONNECT6};

use crate::sock_addr::judge;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_CONNECT4, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge(&ctx, HOOK_CONNECT6, AF_INET6)
}
