//! Each socket's env, kept on the socket (socket-local storage): set when it
//! binds or starts a flow, cloned into the sockets a listener accepts, and
//! changed afterwards only by the agent. Nothing another socket does can
//! change or remove it, and it goes away with the socket.
use aya_ebpf::{bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get};
use envguard_common::flow::SockEnv;

use crate::maps::SOCK_ENVS;

#[inline(always)]
fn map() -> *mut core::ffi::c_void {
    (&raw const SOCK_ENVS).cast_mut().cast()
}

/// The storage of `sk`, if it has one. `sk` is a socket pointer the verifier
/// knows as one (a context's socket, or what `bpf_sk_lookup_*` returned).
#[inline(always)]
pub fn get(sk: *mut core::ffi::c_void) -> Option<&'static mut SockEnv> {
    let v = unsafe { bpf_sk_storage_get(map(), sk, core::ptr::null_mut(), 0) };
    // SAFETY: the kernel returns a pointer to this socket's value, which lives
    // as long as the socket, or null.
    unsafe { v.cast::<SockEnv>().as_mut() }
}

/// The storage of `sk`, created with `init` if it had none; `None` only when
/// the kernel could not allocate it.
#[inline(always)]
pub fn get_or_create(sk: *mut core::ffi::c_void, init: &SockEnv) -> Option<&'static mut SockEnv> {
    let v = unsafe {
        bpf_sk_storage_get(
            map(),
            sk,
            (init as *const SockEnv).cast_mut().cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    };
    // SAFETY: as in `get`.
    unsafe { v.cast::<SockEnv>().as_mut() }
}
