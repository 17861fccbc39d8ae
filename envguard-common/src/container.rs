//! A registered container, as kept in the pinned `REGISTERED_CGROUPS` map.

use crate::policy::{CgroupPath, EnvName, MAX_CGROUP_PATH, MAX_ENV_NAME};

/// Longest container id kept (runtimes use 64 hex digits).
pub const MAX_CONTAINER_ID: usize = 128;
/// Longest container name kept.
pub const MAX_CONTAINER_NAME: usize = 128;

/// `REGISTERED_CGROUPS` value: which env a container's cgroup was registered
/// in, by env *name* (ids may change with the policy), and which container
/// it is. Strings are NUL-padded UTF-8, cut at their field's size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The cgroup's path from the v2 hierarchy's root (`/a/b`), to tell a
    /// removed cgroup from a live one.
    pub path: CgroupPath,
    pub env: EnvName,
    pub container_id: [u8; MAX_CONTAINER_ID],
    pub container_name: [u8; MAX_CONTAINER_NAME],
    /// When it was registered (seconds since the Unix epoch).
    pub registered_unix_s: u64,
}
const _: () = assert!(
    core::mem::size_of::<Registration>()
        == MAX_CGROUP_PATH + MAX_ENV_NAME + 1 + MAX_CONTAINER_ID + MAX_CONTAINER_NAME + 8
);

/// `s` NUL-padded into `N` bytes, cut at a character boundary if longer
/// than `N - 1`.
pub fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// The string of a NUL-padded field (lossless for what [`padded`] wrote).
pub fn unpadded(b: &[u8]) -> &str {
    let len = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..len]).unwrap_or("")
}
