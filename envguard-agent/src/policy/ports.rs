//! Port specifications: `53/udp`, `8000-8100/tcp`, `53` (TCP and UDP), `tcp`,
//! `udp`, `icmp`, `icmpv6` (any port of that protocol).
use std::fmt;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: u8,
    /// Inclusive range; `None`: any port (or a protocol without ports).
    pub ports: Option<(u16, u16)>,
}

pub fn proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        PROTO_ICMP => "icmp",
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_ICMPV6 => "icmpv6",
        _ => return None,
    })
}

fn proto_by_name(name: &str) -> Option<u8> {
    Some(match name {
        "icmp" => PROTO_ICMP,
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        "icmpv6" => PROTO_ICMPV6,
        _ => return None,
    })
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = proto_name(self.proto).unwrap_or("?");
        match self.ports {
            None => f.write_str(proto),
            Some((lo, hi)) if lo == hi => write!(f, "{lo}/{proto}"),
            Some((lo, hi)) => write!(f, "{lo}-{hi}/{proto}"),
        }
    }
}

impl PortSpec {
    /// Parses one entry of `ports`; a bare port or range means TCP and UDP.
    pub fn parse_entry(s: &str) -> Result<Vec<PortSpec>, String> {
        if let Some(proto) = proto_by_name(s) {
            return Ok(vec![PortSpec { proto, ports: None }]);
        }
        let (range, protos): (&str, &[u8]) = match s.split_once('/') {
            None => (s, &[PROTO_TCP, PROTO_UDP]),
            Some((range, "tcp")) => (range, &[PROTO_TCP]),
            Some((range, "udp")) => (range, &[PROTO_UDP]),
            Some((_, other)) => {
                return Err(format!(
                    "invalid port {s:?}: protocol {other:?} has no ports; use tcp or udp (or a bare icmp/icmpv6 entry)"
                ));
            }
        };
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "invalid port {s:?}: expected PORT, LOW-HIGH, PORT/tcp|udp or LOW-HIGH/tcp|udp with ports 1-65535"
                )),
                Ok(n) => Ok(n),
            }
        };
        let (lo, hi) = match range.split_once('-') {
            None => {
                let p = port(range)?;
                (p, p)
            }
            Some((lo, hi)) => (port(lo)?, port(hi)?),
        };
        if lo > hi {
            return Err(format!("invalid port range {s:?}: {lo} is above {hi}"));
        }
        Ok(protos
            .iter()
            .map(|&proto| PortSpec {
                proto,
                ports: Some((lo, hi)),
            })
            .collect())
    }
}
