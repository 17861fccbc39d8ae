//! rtnetlink as the agent uses it: a route socket, a dump read to its end
//! (RTM_GETADDR for the endpoints, RTM_GETLINK for the interfaces,
//! RTM_GETTFILTER for the clsact filters), a request and its
//! acknowledgement (RTM_DELTFILTER), and the attributes of one message.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `NLA_TYPE_MASK`: an attribute's type without its nested/byte-order bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A `NETLINK_ROUTE` socket; `flags` adds `SOCK_*` flags (e.g. `SOCK_NONBLOCK`).
pub fn route_socket(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Dumps `request` for every family (its family header, `header_len` bytes,
/// all zero) in the calling thread's network namespace, and hands the payload
/// of each `reply` message to `each`, until the dump's end.
pub fn dump(
    request: u16,
    header_len: usize,
    reply: u16,
    each: impl FnMut(&[u8]),
) -> io::Result<()> {
    dump_with(request, &vec![0; header_len], reply, each)
}

/// [`dump`] with a family header of the caller's (e.g. a `tcmsg` naming
/// one device and parent).
pub fn dump_with(
    request: u16,
    header: &[u8],
    reply: u16,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let sock = route_socket(0)?;
    send(&sock, request, NLM_F_REQUEST | NLM_F_DUMP, header)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&sock, &mut buf)?;
        if messages(&buf[..n], reply, &mut each)? {
            return Ok(());
        }
    }
}

/// Sends one `request` with `payload` (family header and attributes) and
/// waits for the kernel's acknowledgement; its error as an error.
pub fn request(request: u16, payload: &[u8]) -> io::Result<()> {
    let sock = route_socket(0)?;
    send(&sock, request, NLM_F_REQUEST | NLM_F_ACK, payload)?;
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = recv(&sock, &mut buf)?;
        if messages(&buf[..n], 0, &mut |_| {})? {
            return Ok(());
        }
    }
}

fn send(sock: &OwnedFd, request: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut req = Vec::with_capacity(len);
    req.extend((len as u32).to_ne_bytes());
    req.extend(request.to_ne_bytes());
    req.extend(flags.to_ne_bytes());
    req.extend(1u32.to_ne_bytes());
    req.extend(0u32.to_ne_bytes());
    req.extend(payload);
    // SAFETY: sending our buffer on our socket (to the kernel: no address needed).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: receiving into our buffer of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One attribute, padded to 4 bytes, appended to `out`.
pub fn push_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend((len as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// One datagram of a dump: the payload of each `reply` message to `each`;
/// true at the dump's end, the kernel's error as an error.
pub fn messages(mut b: &[u8], reply: u16, each: &mut impl FnMut(&[u8])) -> io::Result<bool> {
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(b[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = b
                    .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                    .map_or(0, |e| i32::from_ne_bytes(e.try_into().expect("4 bytes")));
                // Error 0 is an acknowledgement: the request is done.
                if errno == 0 {
                    return Ok(true);
                }
                return Err(io::Error::from_raw_os_error(-errno));
            }
            k if k == reply => each(&b[NLMSG_HDRLEN..len]),
            _ => {}
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(false)
}

/// The attributes of a message's payload after its `header_len`-byte family
/// header, as (type, value); stops at the first malformed one.
pub fn attrs(payload: &[u8], header_len: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut b = payload.get(header_len..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_with_their_padding_and_stop_at_a_bad_length() {
        let mut p = vec![0u8; 4];
        p.extend(9u16.to_ne_bytes());
        p.extend(3u16.to_ne_bytes());
        p.extend(b"tap0\0\0\0\0");
        p.extend(8u16.to_ne_bytes());
        p.extend((10u16 | 0x8000).to_ne_bytes());
        p.extend(3u32.to_ne_bytes());
        p.extend(200u16.to_ne_bytes());
        p.extend(1u16.to_ne_bytes());
        let got: Vec<(u16, Vec<u8>)> = attrs(&p, 4).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(
            got,
            [(3, b"tap0\0".to_vec()), (10, 3u32.to_ne_bytes().to_vec())]
        );
    }

    #[test]
    fn an_error_message_is_the_kernels_errno() {
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&20u32.to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        let e = messages(&m, 20, &mut |_| {}).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Error 0: the acknowledgement of a request.
        m[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert!(messages(&m, 20, &mut |_| {}).expect("an ack"));
    }

    #[test]
    fn an_attribute_is_padded_and_walks_back() {
        let mut p = vec![0u8; 4];
        push_attr(&mut p, 1, b"bpf\0");
        push_attr(&mut p, 7, &[1, 2, 3, 4, 5]);
        assert_eq!(p.len(), 4 + 8 + 12);
        let got: Vec<(u16, Vec<u8>)> = attrs(&p, 4).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got, [(1, b"bpf\0".to_vec()), (7, vec![1, 2, 3, 4, 5])]);
    }
}
