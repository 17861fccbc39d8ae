//! tc ingress and egress (tcx links, or clsact where tcx is missing) on the
//! interfaces the policy lists: packets that cross the host without a local
//! socket — forwarded (routed) and bridged ones, from VMs on tap devices,
//! hosts behind bridges or routes. Judged by the same decision as the cgroup
//! hooks (`classify::decide`, the global `envguard_decide`).
//!
//! - Entering through a listed interface: the source is that interface's env
//!   (`ENV_FROM_INTERFACE`); the destination is the env of the interface the
//!   kernel's route sends it out of, if listed, else its address's (CIDR).
//! - Leaving through a listed interface: the destination is that interface's
//!   env; the source the env of the interface it came in by, if listed, else
//!   its address's.
//!
//! Flow state (`TC_FLOWS`): a judged packet records its verdict under its own
//! tuple and in-interface (the forward entry), and, when allowed, the reply's
//! reversed tuple under the interface it leaves by (the reply entry). Replies
//! pass by that entry alone, never by their ports. Entries are written only
//! here, by a packet that was judged, and whose source address routes back
//! through the interface it came in by (strict reverse-path check): a peer
//! cannot seed a "reply" for a flow it wants by spoofing the other side.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_fib_lookup, bpf_hdr_start_off::BPF_HDR_START_NET,
    },
    helpers::generated,
    macros::classifier,
    programs::TcContext,
};
use envguard_common::{
    config::{Config, Counter, MODE_ENFORCE},
    event::{
        AF_INET, AF_INET6, DIRECTION_EGRESS, DIRECTION_INGRESS, DedupKey, ENV_FROM_INTERFACE,
        HOOK_TC_EGRESS, HOOK_TC_INGRESS,
    },
    flow::{FlowVerdict, TcFlowKey},
    policy::IfaceEnv,
};

use crate::{
    classify::{
        Policy, Side, cidr_env, config, count, count_decision, decide, fresh, mode_of, policy,
        unjudgeable, verdict_of,
    },
    event::emit,
    ipv6::upper_layer,
    maps::{IFACE_ENVS_A, IFACE_ENVS_B, TC_FLOWS},
    net::{IPPROTO_TCP, IPPROTO_UDP, mapped_v4, unmapped_v4, v6_words},
};

/// Let the packet go on: to the next program in the tcx chain (or the next
/// filter), which keeps other tools' programs on the device in force.
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;
/// `ETH_P_IP` and `ETH_P_IPV6`, in network order as `__sk_buff.protocol` has them.
const IPPROTO_ICMPV6: u8 = 58;
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DDu16.to_be() as u32;

// On a forwarded packet whose headers cannot be read, or whose source does
// not route back through the interface it came in by (spoofed): drop in
// enforce mode, pass in audit mode, counted as unparsable. A security agent
// that cannot judge a packet crossing the host must not let it cross envs
// when it promised to enforce; audit promises never to break traffic.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    try_tc(&ctx, true).unwrap_or_else(|()| fallback())
}

// Same fallback as ingress.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    try_tc(&ctx, false).unwrap_or_else(|()| fallback())
}

#[inline(always)]
fn fallback() -> i32 {
    unjudgeable(DROP, PASS)
}

/// What the program reads of a packet.
struct Packet {
    family: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

/// Packet bytes relative to the network header (tc sees the link-layer
/// header first, whose length depends on the device).
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u8; N]) -> Result<(), ()> {
    let ret = unsafe {
        generated::bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast(),
            offset as u32,
            dst.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    if ret == 0 { Ok(()) } else { Err(()) }
}

/// The network and transport headers (as `skb::parse`, relative to the
/// network header): `false` for what is not IP and for a non-first fragment
/// (no ports; its first fragment is judged).
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ()> {
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    if protocol != ETH_P_IP_BE && protocol != ETH_P_IPV6_BE {
        return Ok(false);
    }
    if let Some(r) = parse_direct(ctx, pkt, protocol) {
        return Ok(r);
    }
    let mut b = [0u8; 8];
    load_into(ctx, 0, &mut b)?;
    let l4 = match b[0] >> 4 {
        4 => {
            if u16::from_be_bytes([b[6], b[7]]) & 0x1fff != 0 {
                return Ok(false);
            }
            let mut addrs = [0u8; 8];
            load_into(ctx, 12, &mut addrs)?;
            pkt.family = AF_INET;
            pkt.src = mapped_v4([addrs[0], addrs[1], addrs[2], addrs[3]]);
            pkt.dst = mapped_v4([addrs[4], addrs[5], addrs[6], addrs[7]]);
            let mut proto = [0u8; 1];
            load_into(ctx, 9, &mut proto)?;
            pkt.proto = proto[0];
            ((b[0] & 0x0f) as usize) * 4
        }
        6 => {
            pkt.family = AF_INET6;
            load_into(ctx, 8, &mut pkt.src)?;
            load_into(ctx, 24, &mut pkt.dst)?;
            let next = b[6];
            match upper_layer(next, &mut b, |offset, buf| load_into(ctx, offset, buf))? {
                Some((proto, offset)) => {
                    pkt.proto = proto;
                    offset
                }
                None => return Ok(false),
            }
        }
        // Unreadable as IP although the link layer says it is.
        _ => return Err(()),
    };
    match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let mut h = [0u8; 4];
            load_into(ctx, l4, &mut h)?;
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMPV6 => {
            // Neighbour discovery and multicast listener messages are the
            // link's own business, as ARP is for IPv4 (which is not IP and
            // passes): they are link-scoped (a router never forwards them),
            // and a bridge must carry them for its ports to reach each other.
            let mut t = [0u8; 1];
            load_into(ctx, l4, &mut t)?;
            if matches!(t[0], 130..=137 | 143) {
                return Ok(false);
            }
        }
        _ => {}
    }
    Ok(true)
}

/// The common case read in place (direct packet access, no helper call per
/// field): an Ethernet header, then IPv4, or IPv6 straight to TCP or UDP, all
/// in the linear part. `None` for anything else (another link layer, VLAN
/// tags, IPv6 extension headers, headers outside the linear part), which
/// `parse` reads with the helper.
#[inline(always)]
fn parse_direct(ctx: &TcContext, pkt: &mut Packet, protocol: u32) -> Option<bool> {
    const ETH_HLEN: usize = 14;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return None;
    }
    // The Ethernet type as the kernel found it: then the network header
    // follows the 14-byte Ethernet header.
    let ether_type = unsafe { core::ptr::read_unaligned((data + 12) as *const u16) };
    if ether_type as u32 != protocol {
        return None;
    }
    let ip = data + ETH_HLEN;
    let l4 = if protocol == ETH_P_IP_BE {
        if ip + 20 > end {
            return None;
        }
        let vihl = unsafe { *(ip as *const u8) };
        if vihl >> 4 != 4 || vihl & 0x0f < 5 {
            return None;
        }
        let frag = unsafe { core::ptr::read_unaligned((ip + 6) as *const [u8; 2]) };
        if u16::from_be_bytes(frag) & 0x1fff != 0 {
            return Some(false);
        }
        pkt.family = AF_INET;
        pkt.proto = unsafe { *((ip + 9) as *const u8) };
        pkt.src = mapped_v4(unsafe { core::ptr::read_unaligned((ip + 12) as *const [u8; 4]) });
        pkt.dst = mapped_v4(unsafe { core::ptr::read_unaligned((ip + 16) as *const [u8; 4]) });
        ip + ((vihl & 0x0f) as usize) * 4
    } else {
        if ip + 40 > end {
            return None;
        }
        let next = unsafe { *((ip + 6) as *const u8) };
        if next != IPPROTO_TCP && next != IPPROTO_UDP {
            return None;
        }
        pkt.family = AF_INET6;
        pkt.proto = next;
        pkt.src = unsafe { core::ptr::read_unaligned((ip + 8) as *const [u8; 16]) };
        pkt.dst = unsafe { core::ptr::read_unaligned((ip + 24) as *const [u8; 16]) };
        ip + 40
    };
    if let IPPROTO_TCP | IPPROTO_UDP = pkt.proto {
        if l4 + 4 > end {
            return None;
        }
        let ports = unsafe { core::ptr::read_unaligned(l4 as *const [u8; 4]) };
        pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
        pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(true)
}

/// A listed interface's env in the active slot.
#[inline(always)]
fn iface_env(p: &Policy, ifindex: u32) -> Option<IfaceEnv> {
    let hit = if p.cfg.slot() == 1 {
        unsafe { IFACE_ENVS_B.get(&ifindex) }
    } else {
        unsafe { IFACE_ENVS_A.get(&ifindex) }
    };
    hit.map(|v| IfaceEnv {
        env: v.env,
        master: v.master,
    })
}

/// The interface the kernel routes `dst` out of when it arrives on `in_if`
/// from `src`: `Ok(Some(ifindex))` when it would be forwarded, `Ok(None)`
/// when it would not (delivered locally, blackholed, unreachable, forwarding
/// off on `in_if`), `Err` when the lookup itself fails.
#[inline(always)]
fn route(
    ctx: &TcContext,
    family: u8,
    in_if: u32,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Result<Option<u32>, ()> {
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = family;
    fib.ifindex = in_if;
    match (unmapped_v4(src), unmapped_v4(dst)) {
        (Some(s), Some(d)) => {
            fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(s);
            fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(d);
        }
        _ => {
            fib.__bindgen_anon_3.ipv6_src = v6_words(src);
            fib.__bindgen_anon_4.ipv6_dst = v6_words(dst);
        }
    }
    let ret = unsafe {
        generated::bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret < 0 {
        return Err(());
    }
    // The route is found before the neighbour: without a neighbour entry yet
    // the packet still goes out of `ifindex` once it is resolved.
    if ret as u32 == BPF_FIB_LKUP_RET_SUCCESS || ret as u32 == BPF_FIB_LKUP_RET_NO_NEIGH {
        Ok(Some(fib.ifindex))
    } else {
        Ok(None)
    }
}

#[inline(always)]
fn verdict(cfg: &Config, v: &FlowVerdict) -> i32 {
    if !v.allows() && mode_of(cfg, v.src_env, v.dst_env) == MODE_ENFORCE {
        DROP
    } else {
        PASS
    }
}

#[inline(always)]
fn try_tc(ctx: &TcContext, ingress: bool) -> Result<i32, ()> {
    let raw = ctx.skb.skb;
    let ifindex = unsafe { (*raw).ifindex };
    let in_if = if ingress {
        ifindex
    } else {
        // A packet a local socket sent (it has that socket), or one the host
        // made itself (it never came in: no input interface), is judged by
        // the cgroup hooks. Neither can come from a peer: the kernel never
        // forwards a packet that has a socket (`ip_forward` drops it), and a
        // received packet always has the interface it came in by.
        let in_if = unsafe { (*raw).ingress_ifindex };
        if in_if == 0 || !unsafe { (*raw).__bindgen_anon_2.sk }.is_null() {
            return Ok(PASS);
        }
        in_if
    };
    let cfg = config();
    let mut pkt = Packet {
        family: 0,
        proto: 0,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
    };
    if !parse(ctx, &mut pkt)? {
        return Ok(PASS);
    }
    let key = TcFlowKey::new(in_if, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    let mut stale_reply = None;
    if let Some(v) = unsafe { TC_FLOWS.get(&key) } {
        if fresh(v, &cfg) {
            return Ok(verdict(&cfg, v));
        }
        if v.inbound != 0 {
            // A reply entry of another policy: the flow it answers is judged
            // again below, in its own direction, with the envs it had.
            stale_reply = Some((v.src_env, v.dst_env));
        }
    }
    let p = policy(cfg);
    // Attached but not listed by the policy in force (a reload dropped it;
    // the agent detaches it next): nothing to judge. (An established flow
    // was found above: its entry is of this policy generation, under which
    // the interface was listed.)
    let Some(here) = iface_env(&p, ifindex) else {
        return Ok(PASS);
    };
    // Where the packet goes. On ingress: local delivery (a local socket, the
    // cgroup hooks' business), or nowhere, is not ours.
    let out_if = if ingress {
        match route(ctx, pkt.family, in_if, &pkt.src, &pkt.dst)? {
            Some(o) => o,
            None => return Ok(PASS),
        }
    } else {
        ifindex
    };
    // Strict reverse-path check: the source must route back through the
    // interface it came in by (or the bridge that interface is a port of,
    // or, leaving a bridge port, that bridge).
    let in_listed = if ingress {
        Some(here)
    } else {
        iface_env(&p, in_if)
    };
    let back = route(ctx, pkt.family, in_if, &pkt.dst, &pkt.src)?;
    let in_master = match in_listed {
        Some(l) => l.master,
        None => 0,
    };
    let back = match back {
        Some(b) if b == in_if || (b != 0 && (b == in_master || (!ingress && b == here.master))) => {
            b
        }
        _ => return Err(()),
    };
    // Bridged: a flow judged where the route said it leaves by the bridge
    // recorded its reply under the bridge; the reply itself comes in by a
    // port of it. The source routes back through that bridge (just
    // checked), so that entry is this packet's.
    if back != in_if && stale_reply.is_none() {
        let bridged = TcFlowKey::new(back, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
        if let Some(v) = unsafe { TC_FLOWS.get(&bridged) }
            && fresh(v, &cfg)
        {
            return Ok(verdict(&cfg, v));
        }
    }
    let (src, dst, dst_port, proto) = match stale_reply {
        Some((fwd_src, fwd_dst)) => (
            Side {
                env: fwd_src,
                from: ENV_FROM_INTERFACE,
                cgroup_id: 0,
            },
            Side {
                env: fwd_dst,
                from: ENV_FROM_INTERFACE,
                cgroup_id: 0,
            },
            pkt.sport,
            pkt.proto,
        ),
        None => {
            let src = match in_listed {
                Some(l) => Side {
                    env: l.env,
                    from: ENV_FROM_INTERFACE,
                    cgroup_id: 0,
                },
                None => cidr_env(&p, &pkt.src),
            };
            let out_listed = if ingress {
                iface_env(&p, out_if)
            } else {
                Some(here)
            };
            let dst = match out_listed {
                Some(l) => Side {
                    env: l.env,
                    from: ENV_FROM_INTERFACE,
                    cgroup_id: 0,
                },
                None => cidr_env(&p, &pkt.dst),
            };
            (src, dst, pkt.dport, pkt.proto)
        }
    };
    let decision = decide(&p, src.env, dst.env, proto, dst_port);
    let mode = mode_of(&cfg, src.env, dst.env);
    let reply = stale_reply.is_some();
    let v = FlowVerdict::new(
        cfg.generation,
        decision.decision,
        mode,
        reply,
        src.env,
        dst.env,
    );
    if TC_FLOWS.insert(&key, &v, 0).is_err() {
        count(Counter::FlowCacheFull);
    }
    if !reply {
        // The way back: from the destination, entering by the interface this
        // packet leaves through. Also for a violation in audit mode, so its
        // replies are not reported as flows of their own.
        let back_key = TcFlowKey::new(out_if, pkt.dst, pkt.src, pkt.dport, pkt.sport, pkt.proto);
        let back = FlowVerdict::new(
            cfg.generation,
            decision.decision,
            mode,
            true,
            src.env,
            dst.env,
        );
        if TC_FLOWS.insert(&back_key, &back, 0).is_err() {
            count(Counter::FlowCacheFull);
        }
    }
    let direction = if ingress {
        DIRECTION_INGRESS
    } else {
        DIRECTION_EGRESS
    };
    count_decision(src.env, dst.env, decision.decision, mode, direction, proto);
    if decision.is_violation() {
        let hook = if ingress {
            HOOK_TC_INGRESS
        } else {
            HOOK_TC_EGRESS
        };
        // A reply re-judged under a new policy reports the flow it answers,
        // the way that flow goes.
        let (from, sport, to, dport) = if reply {
            (&pkt.dst, pkt.dport, &pkt.src, pkt.sport)
        } else {
            (&pkt.src, pkt.sport, &pkt.dst, pkt.dport)
        };
        // No cgroup at tc: the dedup key's cgroup slot holds the interface.
        let dedup = DedupKey {
            cgroup_id: ifindex as u64,
            remote_addr: *to,
            src_env: src.env,
            dst_env: dst.env,
            dst_port,
            proto,
            direction,
            verdict: verdict_of(decision.decision, mode),
            hook,
            _pad: [0; 2],
        };
        emit(mode, false, &dedup, |ev| {
            ev.hook = hook;
            ev.family = pkt.family;
            ev.proto = proto;
            ev.direction = direction;
            ev.ifindex = ifindex;
            ev.rule = decision.rule;
            ev.src_addr = *from;
            ev.src_port = sport;
            ev.src_env = src.env;
            ev.src_env_from = src.from;
            ev.dst_addr = *to;
            ev.dst_port = dport;
            ev.dst_env = dst.env;
            ev.dst_env_from = dst.from;
        });
    }
    Ok(verdict(&cfg, &v))
}
