//! cgroup_skb/ingress and cgroup_skb/egress: inbound connections, and packets of
//! flows the sock_addr hooks did not see start (accepted connections, sockets
//! older than the agent). A flow is classified once and its decision cached.
use aya_ebpf::{
    bindings::{BPF_TCP_LISTEN, bpf_sock},
    helpers::{bpf_get_socket_cookie, bpf_sk_fullsock, bpf_skb_cgroup_id, generated},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use envguard_common::{
    config::{Config, MODE_ENFORCE},
    event::{
        AF_INET, AF_INET6, DIRECTION_EGRESS, DIRECTION_INGRESS, DedupKey, ENV_FROM_DEFAULT,
        ENV_FROM_SOCKET, HOOK_SKB_EGRESS, HOOK_SKB_INGRESS,
    },
    flow::{FlowKey, FlowVerdict, SOCK_F_ACTIVE, SOCK_F_HOLDER, SOCK_F_VERDICT, SockEnv, TupleKey},
    policy::ENV_HOST,
};

use crate::{
    classify::{
        Side, cidr_env, config, count_decision, decide, fresh, local_peer_env, mode_of, policy,
        remember, skb_local_env, unjudgeable, verdict_of,
    },
    event::{emit, set_sides},
    ipv6::upper_layer,
    maps::{FLOW_VERDICTS, INBOUND_TUPLES},
    net::{IPPROTO_TCP, IPPROTO_UDP, mapped_v4},
    sockenv,
};

const PASS: i32 = 1;
const DROP: i32 = 0;
/// Every network namespace's loopback device has this index.
const LOOPBACK_IFINDEX: u32 = 1;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Not a `FlowVerdict::inbound` value (0 or 1).
const NO_DECISION: u8 = 2;
/// `SOCK_RAW`.
const SOCK_RAW: u32 = 3;

// On an unreadable header: drop in enforce mode, pass in audit mode. Enforce
// promises that nothing unjudged crosses envs; audit promises never to break
// traffic. Both are counted.
#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    try_skb(&ctx, DIRECTION_INGRESS).unwrap_or_else(|()| fallback())
}

// Same fallback as ingress.
#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    try_skb(&ctx, DIRECTION_EGRESS).unwrap_or_else(|()| fallback())
}

#[inline(always)]
fn fallback() -> i32 {
    unjudgeable(DROP, PASS)
}

/// What the program reads of a packet. `src` and `dst` are adjacent, in
/// the order of the IPv6 header, so that both addresses are one read.
#[repr(C)]
struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    proto: u8,
    tcp_flags: u8,
    sport: u16,
    dport: u16,
}

/// Copies `len` packet bytes at `offset` to `dst`, without a stack
/// temporary: the program's state is close to the 512-byte BPF stack limit.
#[inline(always)]
fn load_raw(ctx: &SkBuffContext, offset: usize, dst: *mut u8, len: u32) -> Result<(), ()> {
    let ret = unsafe {
        generated::bpf_skb_load_bytes(ctx.skb.skb.cast(), offset as u32, dst.cast(), len)
    };
    if ret == 0 { Ok(()) } else { Err(()) }
}

#[inline(always)]
fn load_into<const N: usize>(
    ctx: &SkBuffContext,
    offset: usize,
    dst: &mut [u8; N],
) -> Result<(), ()> {
    load_raw(ctx, offset, dst.as_mut_ptr(), N as u32)
}

/// Parses the network header (IPv6: through its extension headers, see
/// `ipv6`) and the first bytes of TCP or UDP, in as few reads as the
/// headers allow (each `bpf_skb_load_bytes` is a helper call and a copy):
/// the first 8 bytes, then IPv4's protocol and addresses or IPv6's two
/// addresses in one read, then the ports (and TCP's flags) in one. `false`
/// for a non-first fragment: it carries no ports, and without its first
/// fragment (which is judged) the datagram cannot be reassembled anyway;
/// `false` too for what is not IP.
#[inline(always)]
fn parse(ctx: &SkBuffContext, pkt: &mut Packet) -> Result<bool, ()> {
    let mut b = [0u8; 8];
    // IPv4 bytes 8..20 (TTL, protocol, checksum, addresses), then TCP's
    // first 14 bytes (ports … flags).
    let mut h = [0u8; 14];
    load_into(ctx, 0, &mut b)?;
    let l4 = match b[0] >> 4 {
        4 => {
            if u16::from_be_bytes([b[6], b[7]]) & 0x1fff != 0 {
                return Ok(false);
            }
            load_raw(ctx, 8, h.as_mut_ptr(), 12)?;
            pkt.family = AF_INET;
            pkt.proto = h[1];
            pkt.src = mapped_v4([h[4], h[5], h[6], h[7]]);
            pkt.dst = mapped_v4([h[8], h[9], h[10], h[11]]);
            ((b[0] & 0x0f) as usize) * 4
        }
        6 => {
            pkt.family = AF_INET6;
            // Both addresses: `dst` follows `src` in the struct as in the header.
            load_raw(ctx, 8, pkt.src.as_mut_ptr(), 32)?;
            // Through the extension headers, if any (`b` is reused).
            let next = b[6];
            match upper_layer(next, &mut b, |offset, buf| load_into(ctx, offset, buf))? {
                Some((proto, offset)) => {
                    pkt.proto = proto;
                    offset
                }
                None => return Ok(false),
            }
        }
        _ => return Ok(false),
    };
    match pkt.proto {
        IPPROTO_TCP => {
            // A TCP header is at least 20 bytes: 14 are always there.
            load_into(ctx, l4, &mut h)?;
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
            pkt.tcp_flags = h[13];
        }
        IPPROTO_UDP => {
            // A UDP header is 8 bytes; a datagram may end right after it.
            load_raw(ctx, l4, h.as_mut_ptr(), 4)?;
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        // Other protocols have no ports; only pair-wide rules match them.
        _ => {}
    }
    Ok(true)
}

#[inline(always)]
fn try_skb(ctx: &SkBuffContext, direction: u8) -> Result<i32, ()> {
    let raw = ctx.skb.skb;
    // An established TCP flow: its socket holds its decision. Nothing else
    // (no header, no cache key) is needed while that decision holds.
    let sk = unsafe { (*raw).__bindgen_anon_2.sk };
    // Which way a stale decision kept on the socket said the flow goes:
    // `NO_DECISION` when the socket keeps none.
    let mut kept_inbound = NO_DECISION;
    let loopback = unsafe { (*raw).ifindex } == LOOPBACK_IFINDEX;
    if !sk.is_null()
        && let Some(s) = sockenv::get(sk.cast())
        && s.flags & SOCK_F_VERDICT != 0
    {
        let cfg = config();
        if fresh(&s.verdict, &cfg) && s.verdict.holds_on(loopback) {
            return Ok(verdict(&cfg, &s.verdict));
        }
        kept_inbound = s.verdict.inbound;
    }
    let mut pkt = Packet {
        src: [0; 16],
        dst: [0; 16],
        family: 0,
        proto: 0,
        tcp_flags: 0,
        sport: 0,
        dport: 0,
    };
    if !parse(ctx, &mut pkt)? {
        return Ok(PASS);
    }
    let ingress = direction == DIRECTION_INGRESS;
    let (local_addr, local_port, remote_addr, remote_port) = if ingress {
        (&pkt.dst, pkt.dport, &pkt.src, pkt.sport)
    } else {
        (&pkt.src, pkt.sport, &pkt.dst, pkt.dport)
    };
    let cfg = config();
    let cookie = unsafe { bpf_get_socket_cookie(raw.cast()) };
    let flow = FlowKey::new(cookie, *remote_addr, remote_port, pkt.proto);
    // Also on loopback: a same-host flow judged at connect() follows a mode
    // switch at its next packet, like any other.
    // A decision taken for a same-host peer does not hold for a packet that
    // leaves the host: it is judged by its address below, and replaces it.
    if let Some(v) = crate::classify::cached(&flow, &cfg)
        && v.holds_on(loopback)
    {
        keep_on_socket(sk, pkt.proto, &v);
        return Ok(verdict(&cfg, &v));
    }
    let is_tcp = pkt.proto == IPPROTO_TCP;
    let p = policy(cfg);
    // Same-host traffic crosses the loopback device; the sender's connect or
    // sendmsg hook judged it with the receiving socket's env, and reported
    // it. It is judged here only when the decision recorded for it no longer
    // holds (another policy, another mode: judged and reported again, the
    // way the conversation went), and when a datagram arrives at a socket
    // that never sent to its source: its sender's decision is taken over,
    // quietly, so that this socket's answers follow it.
    let mut quiet = false;
    let (inbound, remote, sk, syn_only) = if loopback {
        // A connecting TCP socket keeps its decision on itself, others in
        // the cache.
        let inbound = if kept_inbound != NO_DECISION {
            kept_inbound != 0
        } else {
            match unsafe { FLOW_VERDICTS.get(&flow) } {
                Some(old) => old.inbound != 0,
                None if ingress && pkt.proto == IPPROTO_UDP => {
                    quiet = true;
                    true
                }
                // A raw socket's packet: no socket hook saw it (they judge
                // TCP and UDP sockets), and its receiver cannot tell it from
                // a datagram of whatever socket its source names. Judged
                // here, by the sender's own env, and reported.
                None if !ingress && raw_socket(sk) => false,
                None => return Ok(PASS),
            }
        };
        let peer = local_peer_env(
            raw.cast(),
            Some((local_addr, local_port)),
            remote_addr,
            remote_port,
            pkt.proto,
        )
        .unwrap_or(Side {
            env: ENV_HOST,
            from: ENV_FROM_DEFAULT,
            cgroup_id: 0,
        });
        (Some(inbound), peer, sk, false)
    } else {
        let syn_only = is_tcp && pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
        // What the socket's storage says, read into plain scalars: the
        // verifier refuses code that reads an absent value's fields, which an
        // `Option` of the whole record lets the compiler emit.
        let mut labelled = false;
        let mut active = false;
        // An accepted connection: its listener judged (and reported) the SYN.
        // Only the listener's own decisions are adopted, and never by a SYN,
        // which is always judged afresh.
        let mut listener = 0;
        if !sk.is_null()
            && let Some(s) = sockenv::get(sk.cast())
        {
            labelled = true;
            active = s.flags & SOCK_F_ACTIVE != 0;
            if s.origin_cookie != cookie {
                listener = s.origin_cookie;
            }
        }
        if is_tcp
            && !syn_only
            && listener != 0
            && let Some(v) = unsafe {
                INBOUND_TUPLES.get(&TupleKey::new(
                    listener,
                    *local_addr,
                    *remote_addr,
                    local_port,
                    remote_port,
                ))
            }
            && fresh(v, &cfg)
        {
            let v = *v;
            remember(&flow, &v);
            keep_on_socket(sk, pkt.proto, &v);
            return Ok(verdict(&cfg, &v));
        }
        // Which way the conversation goes. A datagram and a SYN go the way
        // they travel: a reply is let through only by the state its socket
        // recorded when it sent (the verdict cache, written by these programs
        // only), never because its ports look like one. Within a TCP
        // connection, the socket says who opened it.
        let inbound = if syn_only {
            Some(ingress)
        } else if !is_tcp {
            // The state recorded when one side spoke first still says who
            // did after the policy changed under the flow (the decision is
            // stale, the direction is not): a reply to a datagram this
            // socket sent stays a reply, judged the way the flow goes.
            match unsafe { FLOW_VERDICTS.get(&flow) } {
                Some(old) => Some(old.inbound != 0),
                None => Some(ingress),
            }
        } else if labelled && active {
            Some(false)
        } else if labelled && listener != 0 {
            Some(true)
        } else {
            // Established before envguard saw it open.
            None
        };
        (inbound, cidr_env(&p, remote_addr), sk, syn_only)
    };
    let mut local = skb_local_env(&p, raw);
    // The agent found who holds the socket: their env is the socket's, even
    // when it was created elsewhere.
    if !sk.is_null()
        && let Some(s) = sockenv::get(sk.cast())
        && s.flags & SOCK_F_HOLDER != 0
        && s.env != local.env
    {
        local = Side {
            env: s.env,
            from: ENV_FROM_SOCKET,
            cgroup_id: s.cgroup_id,
        };
    }
    // The flow's own direction, not this packet's: a reply is judged, counted
    // and reported as the flow it answers (who opened it is the source), and
    // handled in that pair's mode. By the packet's direction, an answer
    // judged again after a policy change would fall under the reverse pair's
    // mode, and an audited `dev -> prod` flow's answers would be dropped
    // wherever `prod -> dev` is enforced.
    let (decision, flow_inbound) = match inbound {
        Some(true) => (
            decide(&p, remote.env, local.env, pkt.proto, local_port),
            true,
        ),
        Some(false) => (
            decide(&p, local.env, remote.env, pkt.proto, remote_port),
            false,
        ),
        None => {
            // Either direction may have opened it: allowed if one is.
            let this_way = if ingress {
                decide(&p, remote.env, local.env, pkt.proto, local_port)
            } else {
                decide(&p, local.env, remote.env, pkt.proto, remote_port)
            };
            let other_way = if ingress {
                decide(&p, local.env, remote.env, pkt.proto, remote_port)
            } else {
                decide(&p, remote.env, local.env, pkt.proto, local_port)
            };
            if this_way.is_violation() && !other_way.is_violation() {
                (other_way, !ingress)
            } else {
                (this_way, ingress)
            }
        }
    };
    let (src, dst, flow_direction, service_port) = if flow_inbound {
        (remote.env, local.env, DIRECTION_INGRESS, local_port)
    } else {
        (local.env, remote.env, DIRECTION_EGRESS, remote_port)
    };
    let mode = mode_of(&cfg, src, dst);
    let v = FlowVerdict::new(
        cfg.generation,
        decision.decision,
        mode,
        flow_inbound,
        src,
        dst,
    )
    .with_peer_local(remote.from == ENV_FROM_SOCKET);
    if is_tcp && ingress && syn_only && !sk.is_null() {
        // The listener keeps its own cookie in its storage, which the kernel
        // clones into the connections it accepts: that is how they find this.
        let init = SockEnv::new(local.env, unsafe { bpf_skb_cgroup_id(raw) }, cookie, 0);
        if let Some(s) = sockenv::get_or_create(sk.cast(), &init)
            && s.origin_cookie == 0
        {
            s.origin_cookie = cookie;
        }
        let tuple = TupleKey::new(cookie, *local_addr, *remote_addr, local_port, remote_port);
        let _ = INBOUND_TUPLES.insert(&tuple, &v, 0);
    }
    remember(&flow, &v);
    if !syn_only {
        keep_on_socket(sk, pkt.proto, &v);
    }
    if quiet {
        return Ok(verdict(&cfg, &v));
    }
    count_decision(src, dst, decision.decision, mode, flow_direction, pkt.proto);
    if decision.is_violation() {
        let cgroup_id = unsafe { bpf_skb_cgroup_id(raw) };
        let dedup = DedupKey {
            cgroup_id,
            remote_addr: *remote_addr,
            src_env: src,
            dst_env: dst,
            dst_port: service_port,
            proto: pkt.proto,
            direction: flow_direction,
            verdict: verdict_of(decision.decision, mode),
            hook: if ingress {
                HOOK_SKB_INGRESS
            } else {
                HOOK_SKB_EGRESS
            },
            _pad: [0; 2],
        };
        emit(mode, false, &dedup, |ev| {
            ev.hook = dedup.hook;
            ev.family = pkt.family;
            ev.proto = pkt.proto;
            ev.cgroup_id = cgroup_id;
            ev.uid = ctx.get_socket_uid();
            set_sides(
                ev,
                flow_direction,
                &local,
                local_addr,
                local_port,
                &remote,
                remote_addr,
                remote_port,
                &decision,
            );
        });
    }
    Ok(verdict(&cfg, &v))
}

/// Whether the packet's socket is a raw one (`SOCK_RAW`).
#[inline(always)]
fn raw_socket(sk: *mut bpf_sock) -> bool {
    if sk.is_null() {
        return false;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    !full.is_null() && unsafe { (*full).type_ } == SOCK_RAW
}

/// Keeps a TCP socket's decision on the socket, where its next packets find
/// it first. Not for a listener: its packets come from many peers.
#[inline(always)]
fn keep_on_socket(sk: *mut bpf_sock, proto: u8, v: &FlowVerdict) {
    if proto != IPPROTO_TCP || sk.is_null() {
        return;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() || unsafe { (*full).state } == BPF_TCP_LISTEN {
        return;
    }
    if let Some(s) = sockenv::get(full.cast()) {
        s.verdict = *v;
        s.flags |= SOCK_F_VERDICT;
    }
}

/// What a decision means for this packet, in the flow's pair's current mode.
#[inline(always)]
fn verdict(cfg: &Config, v: &FlowVerdict) -> i32 {
    if !v.allows() && mode_of(cfg, v.src_env, v.dst_env) == MODE_ENFORCE {
        DROP
    } else {
        PASS
    }
}
