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

/// `DECIDE_CACHE` key: what a decision of the socket hooks depends on once
/// the caller's env is known and the destination is not a socket of this
/// host — the remote address, port and protocol. Everything else the
/// decision reads is the policy in force (the generation in the value) or
/// the agent's heartbeat (checked at every use).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecideKey {
    /// IPv4 addresses are stored as IPv4-mapped IPv6 addresses.
    pub remote_addr: [u8; 16],
    pub src_env: u32,
    /// Host byte order.
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<DecideKey>() == 24);

impl DecideKey {
    pub const fn new(src_env: u32, remote_addr: [u8; 16], remote_port: u16, proto: u8) -> Self {
        Self {
            remote_addr,
            src_env,
            remote_port,
            proto,
            _pad: 0,
        }
    }
}

/// `DECIDE_CACHE` value: the remote side's env and how it was found, and the
/// policy's decision, under the policy generation they were taken in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecideValue {
    pub generation: u32,
    pub dst_env: u32,
    /// The deciding rule id, as in events.
    pub rule: u32,
    /// `DECISION_*`.
    pub decision: u8,
    /// `event::ENV_FROM_*` of `dst_env`.
    pub from: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DecideValue>() == 16);

impl DecideValue {
    pub const fn new(generation: u32, dst_env: u32, from: u8, decision: u32, rule: u32) -> Self {
        Self {
            generation,
            dst_env,
            rule,
            decision: decision as u8,
            from,
            _pad: [0; 2],
        }
    }
}

/// `INBOUND_TUPLES` key: a TCP connection by its addresses, as seen locally,
/// and the listener that judged its SYN. The listener's cookie is what an
/// attacker cannot share: a listener of the same addresses in another network
/// namespace has another cookie, so its decisions are never adopted here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleKey {
    pub listener: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<TupleKey>() == 48);

impl TupleKey {
    pub const fn new(
        listener: u64,
        local_addr: [u8; 16],
        remote_addr: [u8; 16],
        local_port: u16,
        remote_port: u16,
    ) -> Self {
        Self {
            listener,
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

/// A cached decision. A violation remembers the mode it was judged and
/// reported in: once the pair's mode differs, the flow is judged (and
/// reported) again at its next packet, so a mode switch reaches established
/// flows and the new verdict has its record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowVerdict {
    pub generation: u32,
    /// `DECISION_*`.
    pub decision: u8,
    /// `config::MODE_*` the decision was taken in.
    pub mode: u8,
    /// 1 when the remote side opened the conversation (an inbound connection
    /// or datagram), 0 when this socket did.
    pub inbound: u8,
    /// 1 when the peer's env came from a socket of this host (`bpf_sk_lookup`
    /// at connect or sendmsg). Such a decision holds only for packets that
    /// really stay on the host (the loopback device): the lookup also finds a
    /// wildcard or `IP_FREEBIND` socket of the caller's own for an address
    /// that is not local, whose packets then leave the host and are judged
    /// afresh by their address.
    pub peer_local: u8,
    /// The pair's envs, for its mode.
    pub src_env: u32,
    pub dst_env: u32,
}
const _: () = assert!(core::mem::size_of::<FlowVerdict>() == 16);

impl FlowVerdict {
    pub const fn new(
        generation: u32,
        decision: u32,
        mode: u32,
        inbound: bool,
        src_env: u32,
        dst_env: u32,
    ) -> Self {
        Self {
            generation,
            decision: decision as u8,
            mode: mode as u8,
            inbound: inbound as u8,
            peer_local: 0,
            src_env,
            dst_env,
        }
    }

    /// The decision with its peer's env taken from a socket of this host.
    pub const fn with_peer_local(mut self, local: bool) -> Self {
        self.peer_local = local as u8;
        self
    }

    /// Whether the decision holds for a packet that is (`true`) or is not on
    /// the loopback device.
    pub const fn holds_on(&self, loopback: bool) -> bool {
        self.peer_local == 0 || loopback
    }

    pub const fn allows(&self) -> bool {
        self.decision as u32 == DECISION_ALLOW
    }
}

/// `::ffff:a.b.c.d`: how every key holds an IPv4 address.
pub const fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// `SOCK_ENVS` (socket-local storage) value: a socket's env, kept on the socket
/// itself so that no other socket can change or remove it (a table keyed by
/// address could be overwritten by another env binding the same address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEnv {
    /// The cgroup that decided `env` (the creator's listed ancestor, or the
    /// holder's when the agent reassigned it); 0 for `host`.
    pub cgroup_id: u64,
    /// Cookie of the listener this socket was accepted from; its own cookie
    /// for a listener. The storage is cloned into accepted sockets, so this is
    /// what ties a connection to the listener that judged its SYN.
    pub origin_cookie: u64,
    pub env: u32,
    /// `SOCK_F_*`.
    pub flags: u32,
    /// A connected TCP socket's decision for its one peer (with
    /// `SOCK_F_VERDICT`): the packet hooks read it before parsing anything,
    /// so an established flow costs one lookup on the socket.
    pub verdict: FlowVerdict,
}
const _: () = assert!(core::mem::size_of::<SockEnv>() == 40);

/// The agent set `env` from the processes holding the socket: the kernel keeps it.
pub const SOCK_F_HOLDER: u32 = 1;
/// The socket started its conversation (connect() or a first send): its
/// packets are judged as its own outbound flow.
pub const SOCK_F_ACTIVE: u32 = 2;
/// `SockEnv::verdict` holds the socket's decision for its peer.
pub const SOCK_F_VERDICT: u32 = 4;

impl SockEnv {
    pub const fn new(env: u32, cgroup_id: u64, origin_cookie: u64, flags: u32) -> Self {
        Self {
            cgroup_id,
            origin_cookie,
            env,
            // Checked only under SOCK_F_VERDICT, which nothing sets here.
            flags: flags & !SOCK_F_VERDICT,
            verdict: FlowVerdict::new(0, 0, 0, false, 0, 0),
        }
    }
}

/// `TC_FLOWS` key: a packet's 5-tuple and the interface it entered the host
/// through (for a packet leaving, `ingress_ifindex`). A forward entry is
/// keyed by the judged packet's own tuple and interface; the reply entry it
/// creates by the reversed tuple and the interface the forward packet left
/// through, so only a packet arriving from the original destination, on the
/// way back, finds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcFlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub ifindex: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<TcFlowKey>() == 44);

impl TcFlowKey {
    pub const fn new(
        ifindex: u32,
        src_addr: [u8; 16],
        dst_addr: [u8; 16],
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            ifindex,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }
}
