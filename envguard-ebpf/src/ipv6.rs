//! IPv6 extension headers at the packet hooks: the chain between the fixed
//! header and TCP/UDP is walked, so a flow whose packets carry hop-by-hop,
//! routing, destination-options, fragment or AH headers is judged like any
//! other.

/// Hop-by-hop options.
pub const IPPROTO_HOPOPTS: u8 = 0;
/// Routing header.
pub const IPPROTO_ROUTING: u8 = 43;
/// Fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// Authentication header (RFC 4302): its length counts 4-byte units.
pub const IPPROTO_AH: u8 = 51;
/// Destination options.
pub const IPPROTO_DSTOPTS: u8 = 60;
/// The most extension headers walked; a longer chain is unparsable. A
/// constant bound is what lets the verifier prove the walk ends.
pub const MAX_EXT_HEADERS: usize = 6;

/// The fixed IPv6 header.
const FIXED_LEN: usize = 40;

/// The upper-layer protocol of an IPv6 packet and the offset of its header,
/// given the fixed header's next-header field: `Ok(None)` for a non-first
/// fragment (it carries no ports, and without its first fragment, which is
/// judged, the datagram cannot be reassembled anyway). `Err` when a header
/// cannot be read, the chain is longer than [`MAX_EXT_HEADERS`], or it holds
/// an extension header that is not walked.
///
/// `load(offset, buf)` reads 8 bytes of the packet at `offset` into `buf`
/// (every extension header is at least 8 bytes long); `buf` is the caller's,
/// so the walk adds nothing to the program's stack.
#[inline(always)]
pub fn upper_layer(
    mut next: u8,
    buf: &mut [u8; 8],
    load: impl Fn(usize, &mut [u8; 8]) -> Result<(), ()>,
) -> Result<Option<(u8, usize)>, ()> {
    let mut offset = FIXED_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                load(offset, buf)?;
                (buf[1] as usize + 1) * 8
            }
            IPPROTO_AH => {
                load(offset, buf)?;
                (buf[1] as usize + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                load(offset, buf)?;
                if u16::from_be_bytes([buf[2], buf[3]]) & 0xfff8 != 0 {
                    return Ok(None);
                }
                8
            }
            _ => break,
        };
        next = buf[0];
        offset += len;
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS => {
            Err(())
        }
        // Extension headers that are not walked (RFC 7045: Mobility, HIP,
        // Shim6, the two experimental values): Linux delivers none of them
        // to a TCP or UDP socket.
        135 | 139 | 140 | 253 | 254 => Err(()),
        n => Ok(Some((n, offset))),
    }
}
