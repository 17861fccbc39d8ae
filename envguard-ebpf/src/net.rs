//! Address helpers. Every address is kept as 16 bytes, IPv4 as IPv4-mapped IPv6,
//! so one key type serves both families.

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Multipath TCP: its socket's protocol; what it carries is TCP.
const IPPROTO_MPTCP: u32 = 262;

/// The protocol a socket's flows are judged as, from its `protocol`: TCP
/// (also for a Multipath TCP socket, whose number does not fit a byte) or
/// UDP; `None` for what the socket hooks leave to the packet hooks.
#[inline(always)]
pub fn sock_proto(protocol: u32) -> Option<u8> {
    match protocol {
        6 | IPPROTO_MPTCP => Some(IPPROTO_TCP),
        17 => Some(IPPROTO_UDP),
        _ => None,
    }
}

pub use envguard_common::flow::mapped_v4;

/// The IPv4 address inside an IPv4-mapped IPv6 address.
#[inline(always)]
pub fn unmapped_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
        | u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]);
    if prefix == 0 && addr[8] == 0 && addr[9] == 0 && addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// Reads a network-order IPv6 address given as four `u32` words from a context.
/// Each word is read on its own (volatile) because the verifier rejects the wider
/// loads the compiler would otherwise merge them into.
///
/// # Safety
/// `words` must point into a readable context or socket structure.
#[inline(always)]
pub unsafe fn read_v6_words(words: *const [u32; 4]) -> [u8; 16] {
    let w = words as *const u32;
    let a = unsafe { core::ptr::read_volatile(w) }.to_ne_bytes();
    let b = unsafe { core::ptr::read_volatile(w.add(1)) }.to_ne_bytes();
    let c = unsafe { core::ptr::read_volatile(w.add(2)) }.to_ne_bytes();
    let d = unsafe { core::ptr::read_volatile(w.add(3)) }.to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Converts 16 bytes into the four network-order words of a `bpf_sock_tuple`.
#[inline(always)]
pub fn v6_words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
