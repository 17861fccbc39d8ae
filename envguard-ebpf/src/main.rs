//! envguard's kernel programs.
//!
//! Every program is a thin wrapper around a `try_` function; the wrapper holds
//! the fallback verdict for the rare error path and says why it was chosen.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: a by-value key is one more copy
// on the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod bind;
mod cgroup_mkdir;
mod classify;
mod connect;
mod event;
mod ipv6;
mod maps;
mod net;
mod sendmsg;
mod skb;
mod sock_addr;
mod sockenv;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
