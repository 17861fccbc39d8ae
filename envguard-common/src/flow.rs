//! Verdict cache and local-socket table.

/// `FLOW_VERDICTS` key: one local socket talking to one remote endpoint.
/// Keyed by socket cookie (not by 4-tuple) because the connect hook runs before
/// the local port is chosen; keyed by peer as well because an unconnected UDP
/// socket or a listener talks to many peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub cookie: u64,
    /// IPv4 addresses are stored as IPv4-mapped IPv6 addresses.
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 32);

impl FlowKey {
    pub const fn new(cookie: u64, remote_addr: [u8; 16], remote_port: u16, proto: u8) -> Self {
        Self {
            cookie,
            remote_addr,
            remote_port,
            proto,
            _pad: [0; 5],
        }
    }
}

/// `INBOUND_TUPLES` key: a TCP connection by its addresses, as seen locally.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<TupleKey>() == 40);

impl TupleKey {
    pub const fn new(
        local_addr: [u8; 16],
        remote_addr: [u8; 16],
        local_port: u16,
        remote_port: u16,
    ) -> Self {
        Self {
            local_addr,
            remote_addr,
            local_port,
            remote_port,
            _pad: [0; 4],
        }
    }
}

pub const DECISION_ALLOW: u32 = 1;
pub const DECISION_VIOLATION: u32 = 2;

/// A cached decision. The mode is applied when the verdict is used, not stored,
/// so a mode switch (global or of the flow's env pair) takes effect on
/// established flows at their next packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub generation: u32,
    pub decision: u32,
    /// The pair's envs, for its mode.
    pub src_env: u32,
    pub dst_env: u32,
}
const _: () = assert!(core::mem::size_of::<FlowVerdict>() == 16);

impl FlowVerdict {
    pub const fn new(generation: u32, decision: u32, src_env: u32, dst_env: u32) -> Self {
        Self {
            generation,
            decision,
            src_env,
            dst_env,
        }
    }
}

/// `::ffff:a.b.c.d`: how every key holds an IPv4 address.
pub const fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// An IPv4 socket's bound address in `BoundKey` form: the wildcard is all
/// zeros, as it is for IPv6, anything else IPv4-mapped.
pub const fn bound_v4(v4: [u8; 4]) -> [u8; 16] {
    if u32::from_ne_bytes(v4) == 0 {
        [0; 16]
    } else {
        mapped_v4(v4)
    }
}

/// `BOUND_SOCKETS` key: a local socket's bound address, per network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundKey {
    pub netns: u64,
    /// As bound: an IPv4 socket's address is IPv4-mapped, a wildcard is all zeros
    /// for both families, so a dual-stack `[::]` and a `0.0.0.0` socket differ only by `family`.
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<BoundKey>() == 32);

impl BoundKey {
    pub const fn new(netns: u64, addr: [u8; 16], port: u16, proto: u8, family: u8) -> Self {
        Self {
            netns,
            addr,
            port,
            proto,
            family,
            _pad: [0; 4],
        }
    }
}

/// `BOUND_SOCKETS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundValue {
    /// Cookie of the socket that bound, so a release only removes its own entry.
    pub cookie: u64,
    pub cgroup_id: u64,
    pub env: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<BoundValue>() == 24);

impl BoundValue {
    pub const fn new(cookie: u64, cgroup_id: u64, env: u32) -> Self {
        Self {
            cookie,
            cgroup_id,
            env,
            _pad: 0,
        }
    }
}
